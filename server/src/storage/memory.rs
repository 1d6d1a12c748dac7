//! A sparse in-memory disk: unwritten regions cost nothing and read as zeros. Contents are lost
//! when the server exits; `reset` returns it to all zeros.

use bytes::{Bytes, BytesMut};

use super::chunks::{CHUNK_SIZE, ChunkState, ChunkStore, page_pieces, pieces};
use super::{BlockDevice, Extent, Features, IoContext, IoFuture, ZeroFlags};
use crate::wire::allocation;

/// How many chunks a long TRIM or WRITE_ZEROES handles before it lets other tasks run.
const CHUNKS_PER_YIELD: usize = 1024;
/// How many held chunks one BLOCK_STATUS answer describes at most.
const MAX_HELD_PER_REPLY: usize = 16384;

/// `length` zero bytes: a slice of one static buffer when it is long enough, so reading holes
/// neither allocates nor fills memory.
fn zeros(length: usize) -> Bytes {
    static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
    match ZEROS.get(..length) {
        Some(zeros) => Bytes::from_static(zeros),
        None => Bytes::from(vec![0; length]),
    }
}

pub struct MemoryDevice {
    size: u64,
    chunks: ChunkStore,
}

impl MemoryDevice {
    pub fn new(size: u64) -> MemoryDevice {
        MemoryDevice { size, chunks: ChunkStore::new() }
    }

    /// Bytes of data held.
    #[cfg(test)]
    pub fn resident_bytes(&self) -> u64 {
        self.chunks.resident_bytes()
    }

    fn read_now(&self, offset: u64, length: u32) -> Bytes {
        let length = length as usize;
        let mut out = BytesMut::new();
        for (index, start, take, position) in page_pieces(offset, length as u64) {
            if out.capacity() == 0 {
                // Nothing but zeros so far: no buffer until data shows up.
                if self.chunks.read(index, start, &mut []) != ChunkState::Data {
                    continue;
                }
                out.reserve(length);
                out.resize(position, 0);
            }
            if self.chunks.read_into(index, start, take, &mut out) == ChunkState::Absent {
                out.resize(out.len() + take, 0);
            }
        }
        if out.capacity() == 0 {
            // A read of nothing but holes shares one buffer of zeros.
            return zeros(length);
        }
        out.freeze()
    }

    fn write_now(&self, offset: u64, data: &[u8]) {
        // A chunk at a time: one lookup and lock for its pages (a page at a time, a 1 MiB write
        // took 256 of them).
        for (index, start, take, position) in pieces(offset, data.len() as u64) {
            // An absent chunk is all zeros, which is what it starts from.
            self.chunks.write_over_zeros(index, start, &data[position..position + take]);
        }
    }

    /// Zeroes a range: whole chunks are dropped (they read as zeros), partial ones are zeroed in
    /// place. Only chunks that hold something are visited, so zeroing a huge empty range costs
    /// little. A range over many chunks lets the requests behind it go first, and yields now
    /// and then so a 4 GiB request does not hold a worker thread.
    async fn zero_range(&self, offset: u64, length: u64) {
        let end = offset + length;
        // Whole chunks from `first` to `last` (excluded), and the partial ones around them.
        let (first, last) = (offset.div_ceil(CHUNK_SIZE), end / CHUNK_SIZE);
        if first > last {
            // Inside one chunk.
            self.chunks.zero_part(offset / CHUNK_SIZE, (offset % CHUNK_SIZE) as usize, length as usize);
            return;
        }
        if offset % CHUNK_SIZE != 0 {
            let start = offset % CHUNK_SIZE;
            self.chunks.zero_part(offset / CHUNK_SIZE, start as usize, (CHUNK_SIZE - start) as usize);
        }
        if end % CHUNK_SIZE != 0 {
            self.chunks.zero_part(last, 0, (end % CHUNK_SIZE) as usize);
        }
        if last - first > CHUNKS_PER_YIELD as u64 {
            tokio::task::yield_now().await;
        }
        let mut from = first;
        while from < last {
            let held = self.chunks.held_in(from, last, CHUNKS_PER_YIELD);
            let Some(&(next, _)) = held.last() else { break };
            for (index, _) in held {
                self.chunks.remove(index);
            }
            from = next + 1;
            tokio::task::yield_now().await;
        }
    }

    fn extents_now(&self, offset: u64, length: u64) -> Vec<Extent> {
        const HOLE: u32 = allocation::HOLE | allocation::ZERO;
        let end = offset.saturating_add(length).min(self.size);
        let mut extents = Vec::new();
        let mut position = offset;
        // Holes cost nothing to describe; held chunks are listed, a bounded number per reply
        // (a reply may describe less than asked, and the client asks again).
        for (index, state) in self.chunks.held_in(offset / CHUNK_SIZE, end.div_ceil(CHUNK_SIZE), MAX_HELD_PER_REPLY) {
            let start = (index * CHUNK_SIZE).max(position);
            if start > position {
                extents.push(Extent { length: start - position, flags: HOLE });
            }
            let chunk_end = ((index + 1) * CHUNK_SIZE).min(end);
            let flags = if state == ChunkState::Data { 0 } else { HOLE };
            extents.push(Extent { length: chunk_end - start, flags });
            position = chunk_end;
        }
        if extents.len() < MAX_HELD_PER_REPLY && position < end {
            extents.push(Extent { length: end - position, flags: HOLE });
        }
        super::coalesce(&mut extents);
        extents
    }
}

impl BlockDevice for MemoryDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        Features { read_only: false, trim: true, write_zeroes: true, fast_zero: true, cache: true, multi_conn: true }
    }

    fn read(&self, _ctx: IoContext, offset: u64, length: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move { Ok(self.read_now(offset, length)) })
    }

    fn write(&self, _ctx: IoContext, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.write_now(offset, &data);
            Ok(())
        })
    }

    fn flush(&self, _ctx: IoContext) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, _ctx: IoContext, offset: u64, length: u64, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.zero_range(offset, length).await;
            Ok(())
        })
    }

    fn write_zeroes(&self, _ctx: IoContext, offset: u64, length: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        // NO_HOLE only asks that the range stays allocated; memory has no allocation to lose.
        Box::pin(async move {
            self.zero_range(offset, length).await;
            Ok(())
        })
    }

    fn cache(&self, _ctx: IoContext, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn extents(&self, _ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move { Ok(self.extents_now(offset, length)) })
    }

    fn reset(&self) -> IoFuture<'_, ()> {
        Box::pin(async {
            // Up to the whole export's memory to free: not on a thread that serves NBD.
            self.chunks.clear().free_in_background();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: IoContext = IoContext { connection: 1, cookie: 1, flags: 0, power_cycle: 0 };

    #[tokio::test]
    async fn unwritten_memory_reads_as_zeros_and_is_a_hole() {
        let device = MemoryDevice::new(1 << 30);
        assert_eq!(device.read(CTX, 12345, 100).await.unwrap(), Bytes::from(vec![0; 100]));
        let extents = device.extents(CTX, 0, 1 << 30).await.unwrap();
        assert_eq!(extents[0].flags, allocation::HOLE | allocation::ZERO);
        assert_eq!(device.resident_bytes(), 0);
    }

    #[tokio::test]
    async fn writes_across_chunks_read_back() {
        let device = MemoryDevice::new(1 << 30);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        device.write(CTX, CHUNK_SIZE - 7, Bytes::from(data.clone()), false).await.unwrap();
        assert_eq!(device.read(CTX, CHUNK_SIZE - 7, data.len() as u32).await.unwrap(), Bytes::from(data));
        let extents = device.extents(CTX, 0, 5 * CHUNK_SIZE).await.unwrap();
        assert_eq!(extents[0], Extent { length: 5 * CHUNK_SIZE, flags: 0 });
    }

    #[tokio::test]
    async fn trim_and_zero_read_back_as_zeros_and_free_whole_chunks() {
        let device = MemoryDevice::new(1 << 20);
        device.write(CTX, 0, Bytes::from(vec![0xaa; 4 * CHUNK_SIZE as usize]), false).await.unwrap();
        device.trim(CTX, 10, 2 * CHUNK_SIZE, false).await.unwrap();
        let back = device.read(CTX, 0, (4 * CHUNK_SIZE) as u32).await.unwrap();
        assert!(back[..10].iter().all(|&b| b == 0xaa));
        assert!(back[10..10 + 2 * CHUNK_SIZE as usize].iter().all(|&b| b == 0));
        assert!(back[10 + 2 * CHUNK_SIZE as usize..].iter().all(|&b| b == 0xaa));
        assert_eq!(device.resident_bytes(), 3 * CHUNK_SIZE);
        device.write_zeroes(CTX, 0, 4 * CHUNK_SIZE, ZeroFlags::default()).await.unwrap();
        assert_eq!(device.resident_bytes(), 0);
    }

    #[tokio::test]
    async fn extents_jump_over_huge_holes_and_stop_at_the_end_of_the_device() {
        let device = MemoryDevice::new(1 << 42);
        device.write(CTX, (1 << 41) + 10, Bytes::from_static(b"data"), false).await.unwrap();
        let extents = device.extents(CTX, 0, u64::MAX).await.unwrap();
        assert_eq!(
            extents,
            vec![
                Extent { length: 1 << 41, flags: allocation::HOLE | allocation::ZERO },
                Extent { length: CHUNK_SIZE, flags: 0 },
                Extent { length: (1 << 41) - CHUNK_SIZE, flags: allocation::HOLE | allocation::ZERO },
            ]
        );
        let from_inside = device.extents(CTX, (1 << 41) + 100, 10).await.unwrap();
        assert_eq!(from_inside, vec![Extent { length: 10, flags: 0 }]);
    }

    #[tokio::test]
    async fn reset_forgets_everything() {
        let device = MemoryDevice::new(1 << 20);
        device.write(CTX, 0, Bytes::from_static(b"data"), false).await.unwrap();
        device.reset().await.unwrap();
        assert_eq!(&device.read(CTX, 0, 4).await.unwrap()[..], b"\0\0\0\0");
    }
}
