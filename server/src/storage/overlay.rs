//! A copy-on-write overlay in memory over a read-only base image. The base never changes;
//! `reset` drops the overlay, so the export is back to the base's contents at once.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use super::chunks::{CHUNK_SIZE, ChunkState, ChunkStore, page_pieces, pieces};
use super::{BlockDevice, Extent, Features, IoContext, IoFuture, ZeroFlags};
use crate::wire::allocation;

pub struct OverlayDevice {
    base: Arc<dyn BlockDevice>,
    chunks: ChunkStore,
}

impl OverlayDevice {
    pub fn new(base: Arc<dyn BlockDevice>) -> OverlayDevice {
        OverlayDevice { base, chunks: ChunkStore::new() }
    }

    /// Bytes the overlay holds in memory.
    #[cfg(test)]
    pub fn resident_bytes(&self) -> u64 {
        self.chunks.resident_bytes()
    }

    /// The base's bytes for one whole chunk, padded with zeros past the end of the device.
    async fn base_chunk(&self, ctx: IoContext, index: u64) -> Result<Box<[u8]>, super::IoError> {
        let start = index * CHUNK_SIZE;
        let length = CHUNK_SIZE.min(self.base.size() - start) as u32;
        let data = self.base.read(ctx, start, length).await?;
        let mut chunk = vec![0; CHUNK_SIZE as usize];
        chunk[..data.len()].copy_from_slice(&data);
        Ok(chunk.into_boxed_slice())
    }

    /// Writes a piece within one chunk. Whole pages need nothing from the base; a page written
    /// in part is first copied from it.
    async fn write_piece(&self, ctx: IoContext, index: u64, start: usize, data: &[u8]) -> Result<(), super::IoError> {
        if self.chunks.write(index, start, data, None).is_ok() {
            return Ok(());
        }
        let contents = self.base_chunk(ctx, index).await?;
        // Another writer may have filled the pages meanwhile; `write` then ignores `contents`.
        self.chunks.write(index, start, data, Some(contents)).expect("contents were supplied");
        Ok(())
    }

    async fn zero_range(&self, ctx: IoContext, offset: u64, length: u64) -> Result<(), super::IoError> {
        for (count, (index, start, take, _)) in pieces(offset, length).enumerate() {
            if take as u64 == CHUNK_SIZE {
                self.chunks.set_zero(index);
            } else if self.chunks.zero_part(index, start, take) == ChunkState::Absent {
                self.write_piece(ctx, index, start, &vec![0; take]).await?;
            }
            if count % 1024 == 1023 {
                tokio::task::yield_now().await;
            }
        }
        Ok(())
    }
}

impl BlockDevice for OverlayDevice {
    fn size(&self) -> u64 {
        self.base.size()
    }

    fn features(&self) -> Features {
        Features { read_only: false, trim: true, write_zeroes: true, fast_zero: true, cache: true, multi_conn: true }
    }

    fn read(&self, ctx: IoContext, offset: u64, length: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            // Nothing written over this range yet: the base's bytes as they come, with no buffer
            // to zero and copy them into (a 1 MiB read of the base cost a quarter more CPU).
            let (first, end) = (offset / CHUNK_SIZE, (offset + u64::from(length)).div_ceil(CHUNK_SIZE));
            if !self.chunks.holds_any(first, end) {
                return self.base.read(ctx, offset, length).await;
            }
            let mut out = BytesMut::zeroed(length as usize);
            let mut from_base: Vec<(usize, u64, usize)> = Vec::new();
            for (index, start, take, position) in page_pieces(offset, u64::from(length)) {
                if self.chunks.read(index, start, &mut out[position..position + take]) == ChunkState::Absent {
                    match from_base.last_mut() {
                        Some((at, _, len)) if *at + *len == position => *len += take,
                        _ => from_base.push((position, index * CHUNK_SIZE + start as u64, take)),
                    }
                }
            }
            for (position, base_offset, take) in from_base {
                let data = self.base.read(ctx, base_offset, take as u32).await?;
                out[position..position + take].copy_from_slice(&data);
            }
            Ok(out.freeze())
        })
    }

    fn write(&self, ctx: IoContext, offset: u64, data: Bytes, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            for (index, start, take, position) in pieces(offset, data.len() as u64) {
                self.write_piece(ctx, index, start, &data[position..position + take]).await?;
            }
            Ok(())
        })
    }

    fn flush(&self, _ctx: IoContext) -> IoFuture<'_, ()> {
        // The overlay lives in memory by design: there is nothing more durable to move it to.
        Box::pin(async { Ok(()) })
    }

    fn trim(&self, ctx: IoContext, offset: u64, length: u64, _fua: bool) -> IoFuture<'_, ()> {
        Box::pin(self.zero_range(ctx, offset, length))
    }

    fn write_zeroes(&self, ctx: IoContext, offset: u64, length: u64, _flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.zero_range(ctx, offset, length))
    }

    fn cache(&self, _ctx: IoContext, _offset: u64, _length: u64) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn extents(&self, ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(async move {
            let end = offset.saturating_add(length).min(self.size());
            let mut extents = Vec::new();
            let mut position = offset;
            // Held chunks are the overlay's own; between them the base shows through.
            let held = self.chunks.held_in(offset / CHUNK_SIZE, end.div_ceil(CHUNK_SIZE), MAX_EXTENTS);
            for (index, state) in held {
                let start = (index * CHUNK_SIZE).max(position);
                if start > position && !base_extents(&*self.base, ctx, position, start - position, &mut extents).await?
                {
                    return Ok(finish(extents));
                }
                let chunk_end = ((index + 1) * CHUNK_SIZE).min(end);
                let flags = if state == ChunkState::Data { 0 } else { allocation::HOLE | allocation::ZERO };
                extents.push(Extent { length: chunk_end - start, flags });
                position = chunk_end;
                if extents.len() >= MAX_EXTENTS {
                    return Ok(finish(extents));
                }
            }
            if position < end {
                base_extents(&*self.base, ctx, position, end - position, &mut extents).await?;
            }
            Ok(finish(extents))
        })
    }

    fn data_path(&self) -> Option<super::file::FileDataPath> {
        self.base.data_path()
    }

    fn reset(&self) -> IoFuture<'_, ()> {
        Box::pin(async {
            // Up to the whole export's memory to free: not on a thread that serves NBD.
            self.chunks.clear().free_in_background();
            Ok(())
        })
    }
}

/// The most extents one answer carries; the client asks again for the rest.
const MAX_EXTENTS: usize = 16384;

fn finish(mut extents: Vec<Extent>) -> Vec<Extent> {
    super::coalesce(&mut extents);
    extents
}

/// Appends the base's extents for `[offset, offset + length)`, cut at the end and asking the base
/// again where its answer stops short. Returns false when it stopped early at [`MAX_EXTENTS`].
async fn base_extents(
    base: &dyn BlockDevice,
    ctx: IoContext,
    offset: u64,
    length: u64,
    extents: &mut Vec<Extent>,
) -> Result<bool, super::IoError> {
    let mut covered = 0;
    while covered < length {
        if extents.len() >= MAX_EXTENTS {
            return Ok(false);
        }
        let answer = base.extents(ctx, offset + covered, length - covered).await?;
        if answer.is_empty() {
            extents.push(Extent { length: length - covered, flags: 0 });
            break;
        }
        for extent in answer {
            let take = extent.length.min(length - covered);
            extents.push(Extent { length: take, flags: extent.flags });
            covered += take;
            if covered == length {
                break;
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryDevice;

    const CTX: IoContext = IoContext { connection: 1, cookie: 1, flags: 0, power_cycle: 0 };

    async fn base_with_pattern() -> Arc<MemoryDevice> {
        let base = Arc::new(MemoryDevice::new(4 * CHUNK_SIZE + 100));
        base.write(CTX, 0, Bytes::from(vec![0x11; (4 * CHUNK_SIZE + 100) as usize]), false).await.unwrap();
        base
    }

    #[tokio::test]
    async fn reads_fall_through_to_the_base_until_written() {
        let base = base_with_pattern().await;
        let overlay = OverlayDevice::new(base.clone());
        overlay.write(CTX, CHUNK_SIZE - 2, Bytes::from_static(b"abcd"), false).await.unwrap();
        let back = overlay.read(CTX, CHUNK_SIZE - 4, 8).await.unwrap();
        assert_eq!(&back[..], b"\x11\x11abcd\x11\x11");
        // The base never changes.
        assert_eq!(&base.read(CTX, CHUNK_SIZE - 2, 4).await.unwrap()[..], b"\x11\x11\x11\x11");
    }

    #[tokio::test]
    async fn a_read_sees_a_write_in_its_last_chunk_and_not_past_its_end() {
        let base = base_with_pattern().await;
        let overlay = OverlayDevice::new(base);
        overlay.write(CTX, 2 * CHUNK_SIZE, Bytes::from_static(b"wxyz"), false).await.unwrap();
        // Up to the written chunk: the base's bytes, through the path for untouched ranges.
        let before = overlay.read(CTX, CHUNK_SIZE, CHUNK_SIZE as u32).await.unwrap();
        assert!(before.iter().all(|&b| b == 0x11));
        // Two bytes into it: the write.
        let into = overlay.read(CTX, CHUNK_SIZE, CHUNK_SIZE as u32 + 2).await.unwrap();
        assert!(into[..CHUNK_SIZE as usize].iter().all(|&b| b == 0x11));
        assert_eq!(&into[CHUNK_SIZE as usize..], b"wx");
    }

    #[tokio::test]
    async fn a_partial_last_chunk_is_padded_and_reads_back() {
        let base = base_with_pattern().await;
        let overlay = OverlayDevice::new(base);
        overlay.write(CTX, 4 * CHUNK_SIZE + 98, Bytes::from_static(b"zz"), false).await.unwrap();
        assert_eq!(&overlay.read(CTX, 4 * CHUNK_SIZE + 96, 4).await.unwrap()[..], b"\x11\x11zz");
    }

    #[tokio::test]
    async fn zeroing_masks_the_base_and_reset_restores_it() {
        let base = base_with_pattern().await;
        let overlay = OverlayDevice::new(base);
        overlay.write_zeroes(CTX, 10, 2 * CHUNK_SIZE, ZeroFlags::default()).await.unwrap();
        let back = overlay.read(CTX, 0, (3 * CHUNK_SIZE) as u32).await.unwrap();
        assert!(back[..10].iter().all(|&b| b == 0x11));
        assert!(back[10..10 + 2 * CHUNK_SIZE as usize].iter().all(|&b| b == 0));
        assert!(back[10 + 2 * CHUNK_SIZE as usize..].iter().all(|&b| b == 0x11));
        let extents = overlay.extents(CTX, 0, 4 * CHUNK_SIZE).await.unwrap();
        assert_eq!(extents.iter().map(|e| e.length).sum::<u64>(), 4 * CHUNK_SIZE);
        assert!(extents.iter().any(|e| e.flags == allocation::HOLE | allocation::ZERO));
        overlay.reset().await.unwrap();
        assert!(overlay.read(CTX, 0, 100).await.unwrap().iter().all(|&b| b == 0x11));
        assert_eq!(overlay.resident_bytes(), 0);
    }
}
