//! btrfs addresses: FIEMAP on btrfs answers in the filesystem's *logical* address space, which
//! the chunk tree maps onto the device. This reads the chunk tree through
//! `BTRFS_IOC_TREE_SEARCH` (root only), so a file's logical extents can be turned into device
//! byte ranges, and so whole classes of block groups (data, metadata) can be failed at once:
//! copy-on-write sends an overwrite to new blocks, not to the file's current ones.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// `_IOWR(0x94, 17, struct btrfs_ioctl_search_args)`, 4096 bytes.
const BTRFS_IOC_TREE_SEARCH: libc::c_ulong = 0xD000_9411;
const CHUNK_TREE_OBJECTID: u64 = 3;
const FIRST_CHUNK_TREE_OBJECTID: u64 = 256;
const CHUNK_ITEM_KEY: u32 = 228;
const SEARCH_KEY_LEN: usize = 104;
const SEARCH_HEADER_LEN: usize = 32;
const CHUNK_LEN: usize = 48;
const STRIPE_LEN: usize = 32;

/// Block group type bits.
pub const BLOCK_GROUP_DATA: u64 = 1;
pub const BLOCK_GROUP_SYSTEM: u64 = 2;
pub const BLOCK_GROUP_METADATA: u64 = 4;

/// One chunk: a logical range and where its copies live on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub logical: u64,
    pub length: u64,
    pub kind: u64,
    /// Device offsets of each stripe (two for DUP metadata, one for single data).
    pub stripes: Vec<u64>,
}

impl Chunk {
    /// The device byte ranges of logical `start..end` (clipped to this chunk), one per copy.
    pub fn device_ranges(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let (from, to) = (start.max(self.logical), end.min(self.logical + self.length));
        if from >= to {
            return Vec::new();
        }
        self.stripes.iter().map(|s| (s + (from - self.logical), s + (to - self.logical))).collect()
    }

    /// The device byte ranges of the whole chunk.
    pub fn all_device_ranges(&self) -> Vec<(u64, u64)> {
        self.device_ranges(self.logical, self.logical + self.length)
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or_default())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or_default())
}

/// Decodes one `struct btrfs_chunk` item (little-endian on disk and in the ioctl's buffer).
pub fn parse_chunk(logical: u64, item: &[u8]) -> Option<Chunk> {
    if item.len() < CHUNK_LEN {
        return None;
    }
    let stripes = usize::from(u16_at(item, 44));
    if item.len() < CHUNK_LEN + stripes * STRIPE_LEN {
        return None;
    }
    Some(Chunk {
        logical,
        length: u64_at(item, 0),
        kind: u64_at(item, 24),
        stripes: (0..stripes).map(|i| u64_at(item, CHUNK_LEN + i * STRIPE_LEN + 8)).collect(),
    })
}

/// Every chunk of the filesystem `any_file` lives on.
pub fn chunks(any_file: &File) -> io::Result<Vec<Chunk>> {
    let mut out = Vec::new();
    let mut min_offset = 0u64;
    loop {
        // u64 storage keeps the buffer aligned for the kernel's struct.
        let mut args = vec![0u64; 4096 / 8];
        {
            let b = bytes(&mut args);
            let key: [u64; 7] = [
                CHUNK_TREE_OBJECTID,
                FIRST_CHUNK_TREE_OBJECTID,
                FIRST_CHUNK_TREE_OBJECTID,
                min_offset,
                u64::MAX,
                0,
                u64::MAX,
            ];
            for (i, v) in key.iter().enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
            }
            b[56..60].copy_from_slice(&CHUNK_ITEM_KEY.to_le_bytes());
            b[60..64].copy_from_slice(&CHUNK_ITEM_KEY.to_le_bytes());
            b[64..68].copy_from_slice(&4096u32.to_le_bytes());
        }
        // SAFETY: args is the 4096-byte struct btrfs_ioctl_search_args the ioctl reads and fills.
        let ret = unsafe { libc::ioctl(any_file.as_raw_fd(), BTRFS_IOC_TREE_SEARCH, args.as_mut_ptr()) };
        if ret == -1 {
            return Err(io::Error::last_os_error());
        }
        let b = bytes(&mut args);
        let found = u32_at(b, 64) as usize;
        if found == 0 {
            break;
        }
        let mut at = SEARCH_KEY_LEN;
        let mut last = None;
        for _ in 0..found {
            if at + SEARCH_HEADER_LEN > b.len() {
                break;
            }
            let offset = u64_at(b, at + 16);
            let kind = u32_at(b, at + 24);
            let len = u32_at(b, at + 28) as usize;
            let item = &b[at + SEARCH_HEADER_LEN..(at + SEARCH_HEADER_LEN + len).min(b.len())];
            if kind == CHUNK_ITEM_KEY
                && let Some(chunk) = parse_chunk(offset, item)
            {
                out.push(chunk);
            }
            last = Some(offset);
            at += SEARCH_HEADER_LEN + len;
        }
        match last {
            Some(offset) if offset < u64::MAX => min_offset = offset + 1,
            _ => break,
        }
    }
    Ok(out)
}

fn bytes(words: &mut [u64]) -> &mut [u8] {
    // SAFETY: u64 has no padding and every byte pattern is a valid u8; the length covers exactly the slice.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), words.len() * 8) }
}

/// The device ranges behind logical `start..end`, through every chunk that covers part of it.
pub fn logical_to_device(chunks: &[Chunk], start: u64, end: u64) -> Vec<(u64, u64)> {
    chunks.iter().flat_map(|c| c.device_ranges(start, end)).collect()
}

/// The device ranges of every chunk of `kind` (a `BLOCK_GROUP_*` bit).
pub fn ranges_of_kind(chunks: &[Chunk], kind: u64) -> Vec<(u64, u64)> {
    chunks.iter().filter(|c| c.kind & kind != 0).flat_map(Chunk::all_device_ranges).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk_item(length: u64, kind: u64, stripes: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; CHUNK_LEN];
        b[0..8].copy_from_slice(&length.to_le_bytes());
        b[24..32].copy_from_slice(&kind.to_le_bytes());
        b[44..46].copy_from_slice(&(stripes.len() as u16).to_le_bytes());
        for s in stripes {
            let mut stripe = vec![0u8; STRIPE_LEN];
            stripe[0..8].copy_from_slice(&1u64.to_le_bytes());
            stripe[8..16].copy_from_slice(&s.to_le_bytes());
            b.extend(stripe);
        }
        b
    }

    #[test]
    fn chunk_items_decode_and_map_logical_to_device_offsets() {
        let data = parse_chunk(13 << 20, &chunk_item(8 << 20, BLOCK_GROUP_DATA, &[22 << 20])).unwrap();
        let meta =
            parse_chunk(30 << 20, &chunk_item(4 << 20, BLOCK_GROUP_METADATA | 32, &[40 << 20, 44 << 20])).unwrap();
        assert_eq!(data.stripes, vec![22 << 20]);
        let chunks = [data, meta];
        assert_eq!(
            logical_to_device(&chunks, (13 << 20) + 4096, (13 << 20) + 8192),
            vec![((22 << 20) + 4096, (22 << 20) + 8192)]
        );
        assert_eq!(ranges_of_kind(&chunks, BLOCK_GROUP_METADATA), vec![(40 << 20, 44 << 20), (44 << 20, 48 << 20)]);
        assert!(logical_to_device(&chunks, 0, 4096).is_empty());
        assert!(parse_chunk(0, &[0u8; 10]).is_none());
    }
}
