//! A sparse, sharded map of fixed-size chunks: the memory backend's contents and the overlay's
//! copy-on-write layer. Absent chunks cost nothing; what they read as is up to the owner.
//!
//! A chunk is the unit of the allocation map (extents, whole-chunk TRIM); its bytes are held a
//! page at a time, allocated when first written. A 4 KiB write into a fresh region allocates one
//! page and copies into it, with nothing to zero or fetch first, and scattered small writes hold
//! only the pages they wrote.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard};

use bytes::BytesMut;

/// Bytes per chunk. Big enough that a 1 GiB disk is at most 16384 entries in the allocation
/// map, small enough that allocation answers stay precise.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Bytes per page: the unit chunks are allocated and copied in.
pub const PAGE_SIZE: u64 = 4096;
const PAGES: usize = (CHUNK_SIZE / PAGE_SIZE) as usize;
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

type Page = Box<[u8; PAGE_SIZE as usize]>;

/// A chunk: the pages written so far, and what the others read as.
struct Chunk {
    /// Pages not held read as zeros (a zeroed chunk, or memory's), rather than as the owner's
    /// default (an overlay's base).
    zeros: bool,
    pages: [Option<Page>; PAGES],
}

impl Chunk {
    fn new(zeros: bool) -> Chunk {
        Chunk { zeros, pages: Default::default() }
    }

    fn state(&self) -> ChunkState {
        if self.zeros && self.pages.iter().all(Option::is_none) { ChunkState::Zero } else { ChunkState::Data }
    }

    fn page(&self, page: usize) -> Option<&[u8]> {
        self.pages[page].as_deref().map(|bytes| &bytes[..])
    }

    fn page_mut(&mut self, page: usize) -> Option<&mut [u8]> {
        self.pages[page].as_deref_mut().map(|bytes| &mut bytes[..])
    }

    /// Holds `page` with `bytes` (a whole page), copied without zeroing first; zeros without.
    fn hold(&mut self, page: usize, bytes: Option<&[u8]>) -> &mut [u8] {
        let fresh: Box<[u8]> = match bytes {
            Some(bytes) => bytes.into(),
            None => vec![0; PAGE_SIZE as usize].into_boxed_slice(),
        };
        &mut self.pages[page].insert(fresh.try_into().expect("a page's worth of bytes"))[..]
    }
}

/// What [`ChunkStore::clear`] took out of the store; dropping it frees the memory.
pub struct Cleared {
    chunks: Vec<Shard>,
    _held: BTreeMap<u64, ChunkState>,
}

impl Cleared {
    /// Frees the contents on a blocking thread, not on one that serves NBD, and logs how much.
    pub fn free_in_background(self) {
        tokio::task::spawn_blocking(move || {
            let bytes = self.bytes();
            drop(self);
            tracing::debug!(bytes, "the old contents of a reset store are freed");
        });
    }

    /// Bytes of data it holds: the pages written before the clear.
    fn bytes(&self) -> u64 {
        let pages =
            self.chunks.iter().flat_map(|shard| shard.values()).map(|chunk| chunk.pages.iter().flatten().count());
        pages.sum::<usize>() as u64 * PAGE_SIZE
    }
}

/// Writing part of an absent chunk needs its previous contents first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedsContents;

/// Chunk indices are integers the store chose itself, not input an attacker shapes for
/// collisions: a multiply-xorshift mix (splitmix64's finaliser) spreads them over the table at a
/// fraction of SipHash's cost.
#[derive(Default)]
struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

type Shard = HashMap<u64, Chunk, BuildHasherDefault<IndexHasher>>;

#[derive(Default)]
pub struct ChunkStore {
    shards: Vec<Mutex<Shard>>,
    /// The state of every chunk that holds something, in order, so extent queries jump over
    /// holes instead of probing each chunk. Updated under the chunk's shard lock (always shard
    /// first, then this), and read on its own.
    held: Mutex<BTreeMap<u64, ChunkState>>,
}

impl ChunkStore {
    pub fn new() -> ChunkStore {
        ChunkStore {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
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

    /// Whether any chunk from `first` to `end` (excluded) holds something.
    pub fn holds_any(&self, first: u64, end: u64) -> bool {
        self.held().range(first..end).next().is_some()
    }

    fn shard(&self, index: u64) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard cannot leave a chunk half-updated (each update is one
        // assignment or copy), so a poisoned lock is still safe to use.
        self.shards[(index % SHARDS as u64) as usize].lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Copies bytes `start..start + out.len()` of chunk `index`, within one page (see
    /// [`page_pieces`]), into `out` when the store holds them or knows them to be zeros, and says
    /// which: `Absent` leaves `out` alone, for the owner to fill.
    pub fn read(&self, index: u64, start: usize, out: &mut [u8]) -> ChunkState {
        self.read_with(index, start, out.len(), |bytes| match bytes {
            Some(bytes) => out.copy_from_slice(bytes),
            None => out.fill(0),
        })
    }

    /// Appends bytes `start..start + length` of chunk `index`, within one page, to `out` when
    /// the store holds them or knows them to be zeros (nothing when `Absent`).
    pub fn read_into(&self, index: u64, start: usize, length: usize, out: &mut BytesMut) -> ChunkState {
        self.read_with(index, start, length, |bytes| match bytes {
            Some(bytes) => out.extend_from_slice(bytes),
            None => out.resize(out.len() + length, 0),
        })
    }

    /// Looks up bytes `start..start + length` of chunk `index`, within one page, and hands them
    /// to `copy` while the shard is locked: `Some(bytes)` when the store holds them, `None` when
    /// they are zeros. `copy` is not called when they are `Absent`.
    fn read_with(&self, index: u64, start: usize, length: usize, copy: impl FnOnce(Option<&[u8]>)) -> ChunkState {
        let shard = self.shard(index);
        let Some(chunk) = shard.get(&index) else { return ChunkState::Absent };
        let page = start / PAGE_SIZE as usize;
        let at = start % PAGE_SIZE as usize;
        match chunk.page(page) {
            Some(bytes) => {
                copy(Some(&bytes[at..at + length]));
                ChunkState::Data
            }
            None if chunk.zeros => {
                copy(None);
                ChunkState::Zero
            }
            None => ChunkState::Absent,
        }
    }

    /// Writes `data` at `start` inside chunk `index`. Pages the write covers whole never need
    /// anything else; a page it covers in part needs that page's previous bytes: kept ones, zeros
    /// in a zeroed chunk, or else from `contents` (the whole chunk's previous bytes). Without
    /// them it returns [`NeedsContents`] and changes nothing.
    pub fn write(
        &self,
        index: u64,
        start: usize,
        data: &[u8],
        contents: Option<Box<[u8]>>,
    ) -> Result<(), NeedsContents> {
        self.write_with(index, start, data, false, contents.as_deref())
    }

    /// Writes `data` at `start` inside chunk `index`; what was never written reads as zeros.
    pub fn write_over_zeros(&self, index: u64, start: usize, data: &[u8]) {
        let _ = self.write_with(index, start, data, true, None);
    }

    fn write_with(
        &self,
        index: u64,
        start: usize,
        data: &[u8],
        zeros: bool,
        contents: Option<&[u8]>,
    ) -> Result<(), NeedsContents> {
        let page_size = PAGE_SIZE as usize;
        let end = start + data.len();
        let mut shard = self.shard(index);
        let (chunk, created) = match shard.entry(index) {
            Entry::Occupied(slot) => (slot.into_mut(), false),
            Entry::Vacant(slot) => {
                if contents.is_none() && !zeros && (start % page_size != 0 || end % page_size != 0) {
                    return Err(NeedsContents);
                }
                (slot.insert(Chunk::new(zeros)), true)
            }
        };
        if !chunk.zeros && contents.is_none() {
            // Check first, so a refused write changes nothing.
            let partial = |page: usize| {
                let (from, to) = (page * page_size, (page + 1) * page_size);
                chunk.pages[page].is_none() && (start > from || end < to)
            };
            let (first, last) = (start / page_size, (end - 1) / page_size);
            if !data.is_empty() && (partial(first) || partial(last)) {
                return Err(NeedsContents);
            }
        }
        let was = if created { ChunkState::Absent } else { chunk.state() };
        let mut position = start;
        while position < end {
            let page = position / page_size;
            let at = position % page_size;
            let take = (page_size - at).min(end - position);
            let piece = &data[position - start..position - start + take];
            if let Some(bytes) = chunk.page_mut(page) {
                bytes[at..at + take].copy_from_slice(piece);
            } else {
                // A new page: a copy of what is written when it covers the page, else the
                // page's previous bytes (zeros, or from `contents`) with the piece over them.
                let before = contents
                    .filter(|_| !chunk.zeros)
                    .map(|contents| &contents[page * page_size..(page + 1) * page_size]);
                if take == page_size {
                    chunk.hold(page, Some(piece));
                } else {
                    chunk.hold(page, before)[at..at + take].copy_from_slice(piece);
                }
            }
            position += take;
        }
        if was != ChunkState::Data {
            self.held().insert(index, ChunkState::Data);
        }
        Ok(())
    }

    /// Zeroes bytes `start..start + length` of a chunk that holds something. Returns what the
    /// chunk held before; `Absent` when the owner must write the zeros itself (the chunk, or a
    /// page only partly in the range, reads as the owner's default).
    pub fn zero_part(&self, index: u64, start: usize, length: usize) -> ChunkState {
        let page_size = PAGE_SIZE as usize;
        let mut shard = self.shard(index);
        let Some(chunk) = shard.get_mut(&index) else { return ChunkState::Absent };
        let state = chunk.state();
        let end = start + length;
        let mut position = start;
        while position < end {
            let page = position / page_size;
            let at = position % page_size;
            let take = (page_size - at).min(end - position);
            let zeros = chunk.zeros;
            match chunk.page_mut(page) {
                Some(bytes) => bytes[at..at + take].fill(0),
                // Reads as zeros already.
                None if zeros => {}
                None if take == page_size => _ = chunk.hold(page, None),
                None => return ChunkState::Absent,
            }
            position += take;
        }
        state
    }

    /// Marks a whole chunk as zeros without storing them.
    pub fn set_zero(&self, index: u64) {
        let mut shard = self.shard(index);
        shard.insert(index, Chunk::new(true));
        self.held().insert(index, ChunkState::Zero);
    }

    /// Forgets a whole chunk, so it reads as the owner's default again.
    pub fn remove(&self, index: u64) {
        let mut shard = self.shard(index);
        shard.remove(&index);
        self.held().remove(&index);
    }

    /// Empties the store and hands back what it held. Only the maps are swapped out under the
    /// locks: freeing a full gigabyte takes tens of milliseconds, which the caller spends off
    /// the locks (and off the threads serving NBD) by dropping the answer there.
    #[must_use = "dropping the contents frees them; do it where a long free harms nothing"]
    pub fn clear(&self) -> Cleared {
        // Every shard locked first, so no write lands between clearing the data and the index.
        let mut shards: Vec<_> =
            self.shards.iter().map(|shard| shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner())).collect();
        let chunks = shards.iter_mut().map(|shard| std::mem::take(&mut **shard)).collect();
        let held = std::mem::take(&mut *self.held());
        Cleared { chunks, _held: held }
    }

    /// Bytes of data held in memory: the pages written.
    #[cfg(test)]
    pub fn resident_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                shard.values().map(|chunk| chunk.pages.iter().flatten().count() as u64).sum::<u64>() * PAGE_SIZE
            })
            .sum()
    }
}

/// Splits `[offset, offset + length)` into per-chunk pieces: `(chunk index, start in chunk,
/// length in chunk, position in the request)`.
pub fn pieces(offset: u64, length: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    split(CHUNK_SIZE, offset, length)
}

/// Like [`pieces`], also cut at page boundaries: each piece lies within one page of one chunk.
pub fn page_pieces(offset: u64, length: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    split(PAGE_SIZE, offset, length)
}

fn split(unit: u64, offset: u64, length: u64) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let end = offset + length;
    let mut position = offset;
    std::iter::from_fn(move || {
        if position >= end {
            return None;
        }
        let take = (unit - position % unit).min(end - position) as usize;
        let piece = (position / CHUNK_SIZE, (position % CHUNK_SIZE) as usize, take, (position - offset) as usize);
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
    fn whole_pages_need_no_contents_and_a_refused_partial_page_changes_nothing() {
        let store = ChunkStore::new();
        store.write(5, 4096, &[1; PAGE_SIZE as usize], None).unwrap();
        assert_eq!(store.resident_bytes(), PAGE_SIZE);
        // The other pages of the chunk still read as the owner's default.
        assert_eq!(store.read(5, 0, &mut [0; 4]), ChunkState::Absent);
        assert_eq!(store.read(5, 4096, &mut [0; 4]), ChunkState::Data);
        assert_eq!(store.write(5, 10, b"x", None), Err(NeedsContents));
        assert_eq!(store.write(5, 4000, &[2; 200], None), Err(NeedsContents), "straddles a held and an absent page");
        assert_eq!(store.resident_bytes(), PAGE_SIZE);
        let mut out = [0; 2];
        store.read(5, 4096, &mut out);
        assert_eq!(out, [1, 1], "a refused write left the held page alone");
    }

    #[test]
    fn writes_over_zeros_hold_only_the_pages_written() {
        let store = ChunkStore::new();
        store.write_over_zeros(2, 8190, b"abcd");
        assert_eq!(store.resident_bytes(), 2 * PAGE_SIZE);
        let mut out = [9; 6];
        assert_eq!(store.read(2, 8189, &mut out[..3]), ChunkState::Data);
        assert_eq!(&out[..3], b"\0ab");
        assert_eq!(store.read(2, 0, &mut out), ChunkState::Zero, "a page never written reads as zeros");
        assert_eq!(out, [0; 6]);
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
        drop(store.clear());
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
        drop(store.clear());
        assert!(store.held_in(0, 1, 1).is_empty());
    }

    #[test]
    fn a_cleared_store_is_empty_and_writable_while_what_it_held_is_still_being_freed() {
        let store = ChunkStore::new();
        store.write(0, 0, &vec![9; CHUNK_SIZE as usize], None).unwrap();
        store.write(5, 0, &vec![8; PAGE_SIZE as usize], None).unwrap();
        let cleared = store.clear();
        // The old contents are all in hand, and none of them is in the store any more.
        assert_eq!(cleared.bytes(), CHUNK_SIZE + PAGE_SIZE);
        assert!(store.held_in(0, u64::MAX, 10).is_empty());
        store.write(5, 0, &vec![7; PAGE_SIZE as usize], None).unwrap();
        let mut out = [0; 2];
        store.read(5, 0, &mut out);
        assert_eq!(out, [7, 7]);
        drop(cleared);
        assert_eq!(store.held_in(0, u64::MAX, 10), vec![(5, ChunkState::Data)]);
    }
}
