//! A sparse, sharded map of fixed-size chunks: the memory backend's contents and the overlay's
//! copy-on-write layer. Absent chunks cost nothing; what they read as is up to the owner.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

/// Bytes per chunk. Big enough that a 1 GiB disk is at most 16384 entries, small enough that a
/// 4 KiB write into a fresh region allocates little.
pub const CHUNK_SIZE: u64 = 64 * 1024;
const SHARDS: usize = 64;

/// What the store holds for one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkState {
    /// Nothing stored: the owner decides (zeros for memory, the base image for an overlay).
    Absent,
    /// Known to read as zeros, without storage behind it.
    Zero,
    Data,
}

enum Slot {
    Zero,
    Data(Box<[u8]>),
}

/// Writing part of an absent chunk needs its previous contents first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsContents;

#[derive(Default)]
pub struct ChunkStore {
    shards: Vec<Mutex<HashMap<u64, Slot>>>,
    /// The state of every chunk that holds something, in order, so extent queries jump over
    /// holes instead of probing each chunk. Updated under the chunk's shard lock (always shard
    /// first, then this), and read on its own.
    held: Mutex<BTreeMap<u64, ChunkState>>,
}

impl ChunkStore {
    pub fn new() -> ChunkStore {
        ChunkStore {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            held: Mutex::new(BTreeMap::new()),
        }
    }

    fn held(&self) -> MutexGuard<'_, BTreeMap<u64, ChunkState>> {
        self.held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The chunks from `first` (included) to `end` (excluded) that hold something, in order,
    /// at most `limit` of them. Chunks not listed are absent.
    pub fn held_in(&self, first: u64, end: u64, limit: usize) -> Vec<(u64, ChunkState)> {
        self.held().range(first..end).take(limit).map(|(&index, &state)| (index, state)).collect()
    }

    fn shard(&self, index: u64) -> MutexGuard<'_, HashMap<u64, Slot>> {
        // A panic while holding a shard cannot leave a chunk half-updated (each update is one
        // assignment or copy), so a poisoned lock is still safe to use.
        self.shards[(index % SHARDS as u64) as usize].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Copies bytes `start..start + out.len()` of chunk `index` into `out` when the chunk holds
    /// something, and says what it held.
    pub fn read(&self, index: u64, start: usize, out: &mut [u8]) -> ChunkState {
        match self.shard(index).get(&index) {
            None => ChunkState::Absent,
            Some(Slot::Zero) => {
                out.fill(0);
                ChunkState::Zero
            }
            Some(Slot::Data(data)) => {
                out.copy_from_slice(&data[start..start + out.len()]);
                ChunkState::Data
            }
        }
    }

    /// Writes `data` at `start` inside chunk `index`. A write covering the whole chunk always
    /// succeeds; a partial write into an absent chunk needs `contents` (the chunk's previous
    /// bytes) and returns [`NeedsContents`] without them.
    pub fn write(
        &self,
        index: u64,
        start: usize,
        data: &[u8],
        contents: Option<Box<[u8]>>,
    ) -> Result<(), NeedsContents> {
        let mut shard = self.shard(index);
        if data.len() as u64 == CHUNK_SIZE {
            shard.insert(index, Slot::Data(data.into()));
            self.held().insert(index, ChunkState::Data);
            return Ok(());
        }
        match shard.get(&index) {
            Some(Slot::Data(_)) => {}
            Some(Slot::Zero) => {
                shard.insert(index, Slot::Data(vec![0; CHUNK_SIZE as usize].into_boxed_slice()));
                self.held().insert(index, ChunkState::Data);
            }
            None => {
                let contents = contents.ok_or(NeedsContents)?;
                debug_assert_eq!(contents.len() as u64, CHUNK_SIZE);
                shard.insert(index, Slot::Data(contents));
                self.held().insert(index, ChunkState::Data);
            }
        }
        let Some(Slot::Data(chunk)) = shard.get_mut(&index) else { unreachable!("a data slot was just ensured") };
        chunk[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// Zeroes bytes `start..start + length` of a chunk that holds data; other chunks are left
    /// alone. Returns what the chunk held before.
    pub fn zero_part(&self, index: u64, start: usize, length: usize) -> ChunkState {
        match self.shard(index).get_mut(&index) {
            None => ChunkState::Absent,
            Some(Slot::Zero) => ChunkState::Zero,
            Some(Slot::Data(chunk)) => {
                chunk[start..start + length].fill(0);
                ChunkState::Data
            }
        }
    }

    /// Marks a whole chunk as zeros without storing them.
    pub fn set_zero(&self, index: u64) {
        let mut shard = self.shard(index);
        shard.insert(index, Slot::Zero);
        self.held().insert(index, ChunkState::Zero);
    }

    /// Forgets a whole chunk, so it reads as the owner's default again.
    pub fn remove(&self, index: u64) {
        let mut shard = self.shard(index);
        shard.remove(&index);
        self.held().remove(&index);
    }

    pub fn clear(&self) {
        // Every shard locked first, so no write lands between clearing the data and the index.
        let mut shards: Vec<_> =
            self.shards.iter().map(|shard| shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())).collect();
        for shard in &mut shards {
            shard.clear();
        }
        self.held().clear();
    }

    /// Bytes of chunk data held in memory.
    #[cfg(test)]
    pub fn resident_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                shard.values().filter(|slot| matches!(slot, Slot::Data(_))).count() as u64 * CHUNK_SIZE
            })
            .sum()
    }
}

/// Splits `[offset, offset + length)` into per-chunk pieces: `(chunk index, start in chunk,
/// length in chunk, position in the request)`.
pub fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let end = offset + length;
    let mut position = offset;
    std::iter::from_fn(move || {
        if position >= end {
            return None;
        }
        let index = position / CHUNK_SIZE;
        let start = (position % CHUNK_SIZE) as usize;
        let take = (CHUNK_SIZE - start as u64).min(end - position) as usize;
        let piece = (index, start, take, (position - offset) as usize);
        position += take as u64;
        Some(piece)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let split: Vec<_> = pieces(CHUNK_SIZE - 10, 30).collect();
        assert_eq!(split, vec![(0, (CHUNK_SIZE - 10) as usize, 10, 0), (1, 0, 20, 10)]);
        assert_eq!(pieces(0, 0).count(), 0);
        assert_eq!(pieces(0, 3 * CHUNK_SIZE).count(), 3);
    }

    #[test]
    fn partial_write_into_absent_chunk_asks_for_contents() {
        let store = ChunkStore::new();
        assert_eq!(store.write(0, 10, b"abc", None), Err(NeedsContents));
        store.write(0, 10, b"abc", Some(vec![7; CHUNK_SIZE as usize].into())).unwrap();
        let mut out = [0; 5];
        assert_eq!(store.read(0, 9, &mut out), ChunkState::Data);
        assert_eq!(&out, b"\x07abc\x07");
    }

    #[test]
    fn whole_chunk_write_needs_no_contents() {
        let store = ChunkStore::new();
        store.write(3, 0, &vec![1; CHUNK_SIZE as usize], None).unwrap();
        assert_eq!(store.held_in(3, 4, 1), vec![(3, ChunkState::Data)]);
        assert_eq!(store.resident_bytes(), CHUNK_SIZE);
    }

    #[test]
    fn zero_chunks_become_data_on_partial_write() {
        let store = ChunkStore::new();
        store.set_zero(1);
        let mut out = [9; 4];
        assert_eq!(store.read(1, 0, &mut out), ChunkState::Zero);
        assert_eq!(out, [0; 4]);
        store.write(1, 2, b"x", None).unwrap();
        assert_eq!(store.read(1, 0, &mut out), ChunkState::Data);
        assert_eq!(&out, b"\0\0x\0");
    }

    #[test]
    fn the_index_lists_held_chunks_in_order_with_their_state() {
        let store = ChunkStore::new();
        store.write(7, 0, &vec![1; CHUNK_SIZE as usize], None).unwrap();
        store.set_zero(3);
        store.write(1_000_000, 5, b"x", Some(vec![0; CHUNK_SIZE as usize].into())).unwrap();
        assert_eq!(
            store.held_in(0, u64::MAX, 10),
            vec![(3, ChunkState::Zero), (7, ChunkState::Data), (1_000_000, ChunkState::Data)]
        );
        assert_eq!(store.held_in(4, 1_000_000, 10), vec![(7, ChunkState::Data)]);
        store.write(3, 0, b"y", None).unwrap();
        store.remove(7);
        assert_eq!(store.held_in(0, 100, 10), vec![(3, ChunkState::Data)]);
        assert_eq!(store.held_in(0, u64::MAX, 1).len(), 1);
        store.clear();
        assert!(store.held_in(0, u64::MAX, 10).is_empty());
    }

    #[test]
    fn zero_part_only_touches_data_chunks() {
        let store = ChunkStore::new();
        assert_eq!(store.zero_part(0, 0, 4), ChunkState::Absent);
        store.write(0, 0, &vec![5; CHUNK_SIZE as usize], None).unwrap();
        assert_eq!(store.zero_part(0, 1, 2), ChunkState::Data);
        let mut out = [0; 4];
        store.read(0, 0, &mut out);
        assert_eq!(out, [5, 0, 0, 5]);
        store.clear();
        assert!(store.held_in(0, 1, 1).is_empty());
    }
}
