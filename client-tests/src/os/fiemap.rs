//! FIEMAP: where a file's bytes live on the device, so a policy can fail exactly those blocks.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `FS_IOC_FIEMAP`, `_IOWR('f', 11, struct fiemap)`.
const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
/// `FIEMAP_FLAG_SYNC`: write dirty data back first, so delayed allocations get real blocks.
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const HEADER: usize = 32;
const EXTENT: usize = 56;
const BATCH: usize = 64;

pub const EXTENT_LAST: u32 = 0x1;
pub const EXTENT_UNKNOWN: u32 = 0x2;
pub const EXTENT_DELALLOC: u32 = 0x4;
pub const EXTENT_UNWRITTEN: u32 = 0x800;
pub const EXTENT_SHARED: u32 = 0x2000;

/// One mapped extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Offset in the file.
    pub logical: u64,
    /// Offset on the device.
    pub physical: u64,
    pub length: u64,
    pub flags: u32,
}

impl Extent {
    pub fn unwritten(&self) -> bool {
        self.flags & EXTENT_UNWRITTEN != 0
    }

    /// True when the device offset is meaningful (not delayed, not unknown).
    pub fn located(&self) -> bool {
        self.flags & (EXTENT_UNKNOWN | EXTENT_DELALLOC) == 0
    }
}

/// The extents covering `start..start + len` of `file`. `sync` writes dirty data back first.
pub fn extents(file: &File, start: u64, len: u64, sync: bool) -> io::Result<Vec<Extent>> {
    let mut out = Vec::new();
    let end = start.saturating_add(len);
    let mut next = start;
    // u64 storage keeps the buffer aligned for the kernel's struct.
    let mut buf = vec![0u64; (HEADER + BATCH * EXTENT) / 8];
    while next < end {
        buf.iter_mut().for_each(|w| *w = 0);
        let bytes: &mut [u8] = bytemuck_bytes(&mut buf);
        bytes[0..8].copy_from_slice(&next.to_ne_bytes());
        bytes[8..16].copy_from_slice(&(end - next).to_ne_bytes());
        bytes[16..20].copy_from_slice(&(if sync { FIEMAP_FLAG_SYNC } else { 0 }).to_ne_bytes());
        bytes[24..28].copy_from_slice(&(BATCH as u32).to_ne_bytes());
        // SAFETY: buf holds a struct fiemap header followed by room for BATCH extents, as declared.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, buf.as_mut_ptr()) };
        if ret == -1 {
            return Err(io::Error::last_os_error());
        }
        let bytes: &[u8] = bytemuck_bytes(&mut buf);
        let mapped = u32::from_ne_bytes(bytes[20..24].try_into().unwrap_or_default()) as usize;
        if mapped == 0 {
            break;
        }
        let mut last = false;
        for i in 0..mapped.min(BATCH) {
            let e = &bytes[HEADER + i * EXTENT..HEADER + (i + 1) * EXTENT];
            let field = |at: usize| u64::from_ne_bytes(e[at..at + 8].try_into().unwrap_or_default());
            let extent = Extent {
                logical: field(0),
                physical: field(8),
                length: field(16),
                flags: u32::from_ne_bytes(e[40..44].try_into().unwrap_or_default()),
            };
            last |= extent.flags & EXTENT_LAST != 0;
            next = extent.logical + extent.length;
            out.push(extent);
        }
        if last {
            break;
        }
    }
    Ok(out)
}

fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and every byte pattern is a valid u8; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// The device byte ranges holding file bytes `start..start + len`, clipped to that range.
pub fn device_ranges(extents: &[Extent], start: u64, len: u64) -> Vec<(u64, u64)> {
    let end = start + len;
    extents
        .iter()
        .filter(|e| e.located())
        .filter_map(|e| {
            let from = e.logical.max(start);
            let to = (e.logical + e.length).min(end);
            (from < to).then(|| (e.physical + (from - e.logical), e.physical + (to - e.logical)))
        })
        .collect()
}

/// The device offset of file byte `offset`, if an extent maps it.
pub fn device_offset(extents: &[Extent], offset: u64) -> Option<u64> {
    extents
        .iter()
        .filter(|e| e.located())
        .find(|e| offset >= e.logical && offset < e.logical + e.length)
        .map(|e| e.physical + (offset - e.logical))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn ext(logical: u64, physical: u64, length: u64, flags: u32) -> Extent {
        Extent { logical, physical, length, flags }
    }

    #[test]
    fn device_ranges_clip_to_the_file_range_and_skip_unlocated_extents() {
        let extents = [
            ext(0, 1 << 20, 8192, 0),
            ext(8192, 4 << 20, 8192, EXTENT_DELALLOC),
            ext(16384, 8 << 20, 8192, EXTENT_LAST),
        ];
        assert_eq!(
            device_ranges(&extents, 4096, 16384),
            vec![((1 << 20) + 4096, (1 << 20) + 8192), (8 << 20, (8 << 20) + 4096)]
        );
        assert_eq!(device_offset(&extents, 17000), Some((8 << 20) + 17000 - 16384));
        assert_eq!(device_offset(&extents, 9000), None);
    }

    #[test]
    fn extents_of_a_real_file_cover_what_was_written() {
        let path = std::env::temp_dir().join(format!("nbdfault-fiemap-{}", std::process::id()));
        let mut file =
            std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.write_all(&vec![7u8; 65536]).unwrap();
        match extents(&file, 0, 65536, true) {
            Ok(extents) => {
                let covered: u64 = extents.iter().map(|e| e.length).sum();
                assert!(covered >= 65536, "{extents:?}");
                assert!(extents.last().unwrap().flags & EXTENT_LAST != 0);
            }
            // Some filesystems (tmpfs, overlayfs on old kernels) have no FIEMAP; that is not this code's fault.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EOPNOTSUPP), "{e}"),
        }
        std::fs::remove_file(path).unwrap();
    }
}
