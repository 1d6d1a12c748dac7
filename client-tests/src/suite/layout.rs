//! Where the XFS log and the ext4 journal live on the device, read from the superblocks, so a
//! scenario can fail log writes on purpose (and every other scenario can keep away from them).

/// Why a superblock could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("no {fs} superblock at the start of the device (magic {found})")]
    BadMagic { fs: &'static str, found: String },
    #[error("superblock too short: {0} bytes")]
    Short(usize),
    #[error("the {0} log is on an external device; this device holds none of it")]
    External(&'static str),
    #[error("the ext4 journal inode's extent tree {0}")]
    JournalExtents(String),
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(b, at)) << 32) | u64::from(be_u32(b, at + 4))
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The device bytes (offset, length) that show whether a device holds `fs`: the first 2 KiB for
/// XFS and ext4, btrfs's magic in its superblock at 64 KiB.
pub fn probe_range(fs: super::Fs) -> (u64, u64) {
    match fs {
        super::Fs::Xfs | super::Fs::Ext4 => (0, 2048),
        super::Fs::Btrfs => (BTRFS_SUPER + 0x40, 8),
    }
}

/// btrfs's primary superblock.
const BTRFS_SUPER: u64 = 64 * 1024;

/// True when `probe` (the bytes at [`probe_range`]) shows a superblock of `fs`.
pub fn has_filesystem(fs: super::Fs, probe: &[u8]) -> bool {
    match fs {
        super::Fs::Xfs => probe.get(0..4) == Some(b"XFSB".as_slice()),
        super::Fs::Ext4 => probe.len() >= 1024 + 0x3A && le_u16(probe, 1024 + 0x38) == 0xEF53,
        super::Fs::Btrfs => probe.get(0..8) == Some(b"_BHRfS_M".as_slice()),
    }
}

/// The device byte range of an internal XFS log, from the first 512 bytes of the device.
pub fn xfs_log_range(sb: &[u8]) -> Result<(u64, u64), LayoutError> {
    if sb.len() < 128 {
        return Err(LayoutError::Short(sb.len()));
    }
    if &sb[0..4] != b"XFSB" {
        return Err(LayoutError::BadMagic { fs: "XFS", found: crate::pattern::escape(&sb[0..4], 4) });
    }
    let blocksize = u64::from(be_u32(sb, 4));
    let logstart = be_u64(sb, 48);
    let agblocks = u64::from(be_u32(sb, 84));
    let logblocks = u64::from(be_u32(sb, 96));
    let agblklog = u32::from(sb[124]);
    if logstart == 0 {
        return Err(LayoutError::External("XFS"));
    }
    // logstart is an "fsblock": the AG number above agblklog bits, the block within the AG below.
    let agno = logstart >> agblklog;
    let agbno = logstart & ((1u64 << agblklog) - 1);
    let start = (agno * agblocks + agbno) * blocksize;
    Ok((start, start + logblocks * blocksize))
}

/// Where ext4 keeps inode `ino` on the device: the byte offset of its on-disk inode, from the
/// superblock (the 1024 bytes at device offset 1024) and the group descriptor table (read at
/// `gdt_offset`, which [`ext4_gdt_offset`] gives) as `read(offset, len)` returns them.
pub fn ext4_inode_offset(
    sb: &[u8],
    ino: u64,
    read: &mut dyn FnMut(u64, u64) -> Option<Vec<u8>>,
) -> Result<u64, LayoutError> {
    if sb.len() < 0x100 {
        return Err(LayoutError::Short(sb.len()));
    }
    if le_u16(sb, 0x38) != 0xEF53 {
        return Err(LayoutError::BadMagic { fs: "ext4", found: format!("{:#06x}", le_u16(sb, 0x38)) });
    }
    let blocksize = 1024u64 << le_u32(sb, 0x18);
    let per_group = u64::from(le_u32(sb, 0x28));
    let inode_size = u64::from(le_u16(sb, 0x58));
    let desc_size = if le_u32(sb, 0x60) & 0x80 != 0 { u64::from(le_u16(sb, 0xFE)).max(32) } else { 32 };
    let group = (ino - 1) / per_group;
    let gdt = (u64::from(le_u32(sb, 0x14)) + 1) * blocksize;
    let desc = read(gdt + group * desc_size, desc_size).ok_or(LayoutError::Short(0))?;
    let mut table = u64::from(le_u32(&desc, 8));
    if desc_size >= 64 {
        table |= u64::from(le_u32(&desc, 0x28)) << 32;
    }
    Ok(table * blocksize + ((ino - 1) % per_group) * inode_size)
}

/// The block of the first leaf (or index block) below an inode's extent root, when the tree is
/// deeper than the inode: `i_block` is the 60 bytes at offset 0x28 of the on-disk inode.
pub fn ext4_first_tree_block(i_block: &[u8]) -> Option<u64> {
    if i_block.len() < 24 || le_u16(i_block, 0) != 0xF30A || le_u16(i_block, 6) == 0 || le_u16(i_block, 2) == 0 {
        return None;
    }
    Some(u64::from(le_u32(i_block, 16)) | u64::from(le_u16(i_block, 20)) << 32)
}

/// The device byte ranges of an internal ext4 journal, from the 1024-byte superblock found at
/// device offset 1024. Uses the superblock's backup of the journal inode's block map.
pub fn ext4_journal_ranges(sb: &[u8]) -> Result<Vec<(u64, u64)>, LayoutError> {
    if sb.len() < 0x150 {
        return Err(LayoutError::Short(sb.len()));
    }
    if le_u16(sb, 0x38) != 0xEF53 {
        return Err(LayoutError::BadMagic { fs: "ext4", found: format!("{:#06x}", le_u16(sb, 0x38)) });
    }
    if le_u32(sb, 0xE0) == 0 || le_u32(sb, 0xE4) != 0 {
        return Err(LayoutError::External("ext4"));
    }
    let blocksize = 1024u64 << le_u32(sb, 0x18);
    let i_block = &sb[0x10C..0x10C + 60];
    if le_u16(i_block, 0) != 0xF30A {
        return Err(LayoutError::JournalExtents(
            "has no extent header (an indirect-block journal is not supported)".into(),
        ));
    }
    let entries = usize::from(le_u16(i_block, 2));
    if le_u16(i_block, 6) != 0 {
        return Err(LayoutError::JournalExtents("is deeper than the inode (more than 4 extents)".into()));
    }
    if entries == 0 || entries > 4 {
        return Err(LayoutError::JournalExtents(format!("claims {entries} extents in the inode")));
    }
    Ok((0..entries)
        .map(|i| {
            let e = &i_block[12 + 12 * i..24 + 12 * i];
            // Lengths above 32768 mark unwritten extents; a journal has none, but keep the real length.
            let len = u64::from(le_u16(e, 4) & 0x7FFF);
            let start = (u64::from(le_u16(e, 6)) << 32) | u64::from(le_u32(e, 8));
            (start * blocksize, (start + len) * blocksize)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbdfault_testing::{DEBUGFS, MKFS_EXT4, MKFS_XFS, XFS_DB, require};
    use std::process::Command;

    fn xfs_sb(blocksize: u32, logstart: u64, agblocks: u32, logblocks: u32, agblklog: u8) -> Vec<u8> {
        let mut sb = vec![0u8; 512];
        sb[0..4].copy_from_slice(b"XFSB");
        sb[4..8].copy_from_slice(&blocksize.to_be_bytes());
        sb[48..56].copy_from_slice(&logstart.to_be_bytes());
        sb[84..88].copy_from_slice(&agblocks.to_be_bytes());
        sb[96..100].copy_from_slice(&logblocks.to_be_bytes());
        sb[124] = agblklog;
        sb
    }

    #[test]
    fn xfs_log_start_decodes_the_ag_number_from_the_fsblock() {
        // AG 2 of 16384-block AGs (agblklog 14), block 5 within it.
        let sb = xfs_sb(4096, (2 << 14) | 5, 16384, 100, 14);
        let (start, end) = xfs_log_range(&sb).unwrap();
        assert_eq!(start, (2 * 16384 + 5) * 4096);
        assert_eq!(end - start, 100 * 4096);
    }

    #[test]
    fn superblock_magic_identifies_the_filesystem() {
        let mut dev = vec![0u8; 2048];
        assert!(!has_filesystem(super::super::Fs::Xfs, &dev));
        dev[0..4].copy_from_slice(b"XFSB");
        assert!(has_filesystem(super::super::Fs::Xfs, &dev));
        assert!(!has_filesystem(super::super::Fs::Ext4, &dev));
        dev[1024 + 0x38..1024 + 0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert!(has_filesystem(super::super::Fs::Ext4, &dev));
        assert!(!has_filesystem(super::super::Fs::Ext4, &dev[..1070]));
        assert!(has_filesystem(super::super::Fs::Btrfs, b"_BHRfS_M"));
        assert!(!has_filesystem(super::super::Fs::Btrfs, &dev[..8]));
    }

    #[test]
    fn xfs_external_log_and_bad_magic_are_errors() {
        assert_eq!(xfs_log_range(&xfs_sb(4096, 0, 1, 1, 1)), Err(LayoutError::External("XFS")));
        assert!(matches!(xfs_log_range(&[0u8; 512]), Err(LayoutError::BadMagic { .. })));
        assert_eq!(xfs_log_range(&[0u8; 10]), Err(LayoutError::Short(10)));
    }

    #[test]
    fn ext4_first_tree_block_reads_the_first_index_entry() {
        let mut ib = vec![0u8; 60];
        ib[0..2].copy_from_slice(&0xF30Au16.to_le_bytes());
        ib[2..4].copy_from_slice(&1u16.to_le_bytes());
        assert_eq!(ext4_first_tree_block(&ib), None, "depth 0: the extents are in the inode");
        ib[6..8].copy_from_slice(&1u16.to_le_bytes());
        ib[12..16].copy_from_slice(&16u32.to_le_bytes());
        ib[16..20].copy_from_slice(&33795u32.to_le_bytes());
        assert_eq!(ext4_first_tree_block(&ib), Some(33795));
    }

    #[test]
    fn ext4_journal_extents_come_from_the_superblock_backup() {
        let mut sb = vec![0u8; 1024];
        sb[0x38..0x3A].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x18..0x1C].copy_from_slice(&2u32.to_le_bytes()); // 4096-byte blocks
        sb[0xE0..0xE4].copy_from_slice(&8u32.to_le_bytes());
        let ib = 0x10C;
        sb[ib..ib + 2].copy_from_slice(&0xF30Au16.to_le_bytes());
        sb[ib + 2..ib + 4].copy_from_slice(&1u16.to_le_bytes());
        sb[ib + 12 + 4..ib + 12 + 6].copy_from_slice(&16384u16.to_le_bytes());
        sb[ib + 12 + 8..ib + 12 + 12].copy_from_slice(&131072u32.to_le_bytes());
        assert_eq!(ext4_journal_ranges(&sb).unwrap(), vec![(131072 * 4096, (131072 + 16384) * 4096)]);
        sb[0xE4] = 1;
        assert_eq!(ext4_journal_ranges(&sb), Err(LayoutError::External("ext4")));
    }

    fn image(name: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("nbdfault-layout-{name}-{}.img", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(1 << 30).unwrap();
        path
    }

    fn run(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (install xfsprogs and e2fsprogs)"));
        assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn xfs_log_range_matches_xfs_db_on_a_real_filesystem() {
        require!(MKFS_XFS, XFS_DB);
        let img = image("xfs");
        run(Command::new("mkfs.xfs").args(["-f", "-q", "-K"]).arg(&img));
        let bytes = std::fs::read(&img).unwrap();
        let (start, end) = xfs_log_range(&bytes[..512]).unwrap();
        let db =
            run(Command::new("xfs_db").args(["-r", "-c", "sb 0", "-c", "p logstart logblocks blocksize"]).arg(&img));
        let field = |name: &str| -> u64 {
            db.lines().find_map(|l| l.strip_prefix(&format!("{name} = "))).unwrap().trim().parse().unwrap()
        };
        // `convert` prints "0x100030 (1048624)": the 512-byte sector in hex, then in decimal.
        let convert = run(Command::new("xfs_db")
            .args(["-r", "-c", &format!("convert fsb {} daddr", field("logstart"))])
            .arg(&img));
        let daddr: u64 = convert.split_whitespace().nth(1).unwrap().trim_matches(['(', ')']).parse().unwrap();
        assert_eq!(start, daddr * 512, "xfs_db said {db}");
        assert_eq!(end - start, field("logblocks") * field("blocksize"));
        std::fs::remove_file(img).unwrap();
    }

    #[test]
    fn ext4_journal_range_matches_debugfs_on_a_real_filesystem() {
        require!(MKFS_EXT4, DEBUGFS);
        let img = image("ext4");
        run(Command::new("mkfs.ext4").args(["-F", "-q", "-E", "nodiscard"]).arg(&img));
        let bytes = std::fs::read(&img).unwrap();
        let ranges = ext4_journal_ranges(&bytes[1024..2048]).unwrap();
        let first = run(Command::new("debugfs").args(["-R", "bmap <8> 0"]).arg(&img));
        let block: u64 = first.trim().parse().unwrap();
        assert_eq!(ranges[0].0, block * 4096);
        let size = run(Command::new("debugfs").args(["-R", "stat <8>"]).arg(&img));
        let bytes_total: u64 = size.split("Size: ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
        assert_eq!(ranges.iter().map(|(s, e)| e - s).sum::<u64>(), bytes_total);
        std::fs::remove_file(img).unwrap();
    }
}
