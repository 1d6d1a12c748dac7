//! The filesystems under test: making them (with the host's mkfs), mounting, unmounting. XFS and
//! ext4 are what the invariant catalogue (docs/invariants.md) covers; btrfs (copy-on-write, checksummed) is the third, with its
//! own columns and findings.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::str::FromStr;

use crate::os;

/// A filesystem the suite knows how to test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fs {
    Xfs,
    Ext4,
    Btrfs,
}

impl Fs {
    pub const ALL: [Fs; 3] = [Fs::Xfs, Fs::Ext4, Fs::Btrfs];

    pub fn name(self) -> &'static str {
        match self {
            Fs::Xfs => "xfs",
            Fs::Ext4 => "ext4",
            Fs::Btrfs => "btrfs",
        }
    }

    /// The mkfs program, as the guest's initramfs names it.
    pub fn mkfs_program(self) -> &'static str {
        match self {
            Fs::Xfs => "mkfs.xfs",
            Fs::Ext4 => "mkfs.ext4",
            Fs::Btrfs => "mkfs.btrfs",
        }
    }

    /// The mkfs command for `device`: quiet, forced, and without discarding the whole device.
    /// `sector_4k` gives XFS 4096-byte sectors, for an image that will be served to a device with
    /// 4096-byte logical blocks (`nbd-client -b 4096`): on a device mkfs.xfs reads the sector
    /// size from the device, in a file it would pick 512, which such a device refuses to mount.
    pub fn mkfs_command(self, device: &Path, sector_4k: bool) -> Command {
        let mut cmd = match self {
            Fs::Xfs => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-f", "-q", "-K"]);
                if sector_4k {
                    c.args(["-s", "size=4096"]);
                }
                c
            }
            Fs::Ext4 => {
                let mut c = Command::new("mkfs.ext4");
                c.args(["-F", "-q", "-E", "nodiscard"]);
                c
            }
            // Single data and DUP metadata on one device; 4096-byte sectors are btrfs's default.
            Fs::Btrfs => {
                let mut c = Command::new("mkfs.btrfs");
                c.args(["-f", "-q", "-K"]);
                c
            }
        };
        cmd.arg(device);
        cmd
    }

    /// Mount options. ext4's lazy inode-table zeroing would write in the background during the
    /// scenarios; `noinit_itable` keeps the device quiet.
    pub fn mount_options(self) -> &'static str {
        match self {
            Fs::Xfs | Fs::Btrfs => "",
            Fs::Ext4 => "noinit_itable",
        }
    }

    /// Makes a fresh filesystem on `device`.
    pub fn make(self, device: &Path) -> Result<(), String> {
        self.run_mkfs(self.mkfs_command(device, false))
    }

    /// Makes a fresh filesystem in an image file to be served with 4096-byte logical blocks.
    pub fn make_image(self, image: &Path) -> Result<(), String> {
        self.run_mkfs(self.mkfs_command(image, true))
    }

    fn run_mkfs(self, mut cmd: Command) -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
        if !out.status.success() {
            return Err(format!(
                "{:?} failed ({}): {}",
                cmd.get_program(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Mounts `device` on `target`.
    pub fn mount(self, device: &Path, target: &Path) -> std::io::Result<()> {
        os::mount(device, target, self.name(), self.mount_options())
    }
}

impl fmt::Display for Fs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Fs {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "xfs" => Ok(Fs::Xfs),
            "ext4" => Ok(Fs::Ext4),
            "btrfs" => Ok(Fs::Btrfs),
            other => Err(format!("unknown filesystem `{other}`: use xfs, ext4 or btrfs")),
        }
    }
}

/// Parses `xfs`, `ext4`, `btrfs`, a comma-separated list of them, or `all`.
pub fn parse_list(s: &str) -> Result<Vec<Fs>, String> {
    if s == "all" {
        return Ok(Fs::ALL.to_vec());
    }
    s.split(',').map(|p| p.trim().parse()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filesystem_lists_parse_all_and_commas() {
        assert_eq!(parse_list("all").unwrap(), vec![Fs::Xfs, Fs::Ext4, Fs::Btrfs]);
        assert_eq!(parse_list("ext4").unwrap(), vec![Fs::Ext4]);
        assert_eq!(parse_list("ext4,btrfs").unwrap(), vec![Fs::Ext4, Fs::Btrfs]);
        assert!(parse_list("zfs").unwrap_err().contains("xfs, ext4 or btrfs"));
    }

    #[test]
    fn mkfs_never_discards_the_whole_device() {
        for fs in Fs::ALL {
            let cmd = fs.mkfs_command(Path::new("/dev/nbd0"), true);
            let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
            assert!(args.iter().any(|a| a == "-K" || a == "nodiscard"), "{args:?}");
            assert_eq!(args.last().unwrap(), "/dev/nbd0");
        }
    }

    #[test]
    fn xfs_images_get_4096_byte_sectors_and_mount_as_such() {
        nbdfault_testing::require!(
            nbdfault_testing::MKFS_XFS,
            nbdfault_testing::MKFS_EXT4,
            nbdfault_testing::MKFS_BTRFS
        );
        let image = std::env::temp_dir().join(format!("nbdfault-fs-image-{}", std::process::id()));
        std::fs::File::create(&image).unwrap().set_len(1 << 30).unwrap();
        Fs::Xfs.make_image(&image).unwrap();
        let sb = std::fs::read(&image).unwrap();
        // sb_sectsize, big-endian u16 at offset 102.
        assert_eq!(u16::from_be_bytes([sb[102], sb[103]]), 4096);
        Fs::Ext4.make_image(&image).unwrap();
        let probe = |fs: Fs, bytes: &[u8]| {
            let (at, len) = crate::suite::layout::probe_range(fs);
            crate::suite::layout::has_filesystem(fs, &bytes[at as usize..(at + len) as usize])
        };
        assert!(probe(Fs::Ext4, &std::fs::read(&image).unwrap()));
        Fs::Btrfs.make_image(&image).unwrap();
        assert!(probe(Fs::Btrfs, &std::fs::read(&image).unwrap()));
        std::fs::remove_file(image).unwrap();
    }

    #[test]
    fn mkfs_failure_names_the_program_and_its_message() {
        let err = Fs::Xfs.make(Path::new("/nonexistent/device")).unwrap_err();
        assert!(err.contains("mkfs.xfs"), "{err}");
    }
}
