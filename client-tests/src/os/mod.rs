//! The system calls the suite makes, each returning what the kernel said so that a check can record
//! it: the sync family, fadvise, fallocate, drop_caches, mount. Memory mappings, extent maps and
//! page flags have modules of their own.

pub mod btrfs;
pub mod cgroup;
pub mod fanotify;
pub mod fiemap;
pub mod mapping;
pub mod pageflags;

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// The name of an errno value, as a user reads it in a man page.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::EPIPE => "EPIPE",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ESHUTDOWN => "ESHUTDOWN",
        libc::EUCLEAN => "EUCLEAN",
        libc::EDQUOT => "EDQUOT",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// What a call returned, as evidence: `"0"` for success, else the errno's name.
pub fn outcome(result: &io::Result<()>) -> String {
    match result {
        Ok(()) => "0".to_string(),
        Err(e) => e.raw_os_error().map(errno_name).unwrap_or_else(|| e.to_string()),
    }
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// `fsync(2)`.
pub fn fsync(file: &File) -> io::Result<()> {
    // SAFETY: fsync only reads the descriptor number, which `file` keeps open.
    check(unsafe { libc::fsync(file.as_raw_fd()) })
}

/// `fdatasync(2)`.
pub fn fdatasync(file: &File) -> io::Result<()> {
    // SAFETY: as for fsync.
    check(unsafe { libc::fdatasync(file.as_raw_fd()) })
}

/// `syncfs(2)`.
pub fn syncfs(file: &File) -> io::Result<()> {
    // SAFETY: as for fsync.
    check(unsafe { libc::syncfs(file.as_raw_fd()) })
}

/// `sync(2)`: starts and waits for writeback of every filesystem; reports nothing.
pub fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() }
}

/// Which flags to give `sync_file_range(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeSync {
    /// `SYNC_FILE_RANGE_WRITE`: start writeback, wait for nothing.
    WriteOnly,
    /// `WAIT_BEFORE | WRITE | WAIT_AFTER`: write and wait, reporting errors.
    WriteAndWait,
}

/// `sync_file_range(2)` over the whole file.
pub fn sync_file_range(file: &File, how: RangeSync) -> io::Result<()> {
    let flags = match how {
        RangeSync::WriteOnly => libc::SYNC_FILE_RANGE_WRITE,
        RangeSync::WriteAndWait => {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE | libc::SYNC_FILE_RANGE_WAIT_AFTER
        }
    };
    // SAFETY: plain syscall on an open descriptor; offset 0 and length 0 mean the whole file.
    check(unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, flags) })
}

/// `pwrite(2)` of `data` at `offset` through a new `O_DIRECT` description of `path`, from a
/// page-aligned copy of `data` (O_DIRECT needs aligned memory, offset and length).
pub fn pwrite_direct(path: &Path, offset: u64, data: &[u8]) -> io::Result<usize> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path)?;
    let page = page_size();
    let mut buf = vec![0u8; data.len() + page];
    let skip = buf.as_ptr().align_offset(page);
    buf[skip..skip + data.len()].copy_from_slice(data);
    file.write_at(&buf[skip..skip + data.len()], offset)
}

/// `posix_fadvise(POSIX_FADV_DONTNEED)` over the whole file: drops clean, unmapped cached pages.
pub fn fadvise_dontneed(file: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    let ret = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if ret == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(ret)) }
}

/// `fallocate(2)`. `keep_size` adds `FALLOC_FL_KEEP_SIZE` (preallocate past end of file).
pub fn fallocate(file: &File, offset: u64, len: u64, keep_size: bool) -> io::Result<()> {
    let mode = if keep_size { libc::FALLOC_FL_KEEP_SIZE } else { 0 };
    // SAFETY: plain syscall on an open descriptor.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, len as libc::off_t) })
}

/// Writes `3` to `/proc/sys/vm/drop_caches`: drops clean page cache, dentries, inodes and (through
/// the shrinkers) filesystem metadata buffers that nobody holds.
pub fn drop_caches() -> io::Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3")
}

/// `mount(2)` of a block device.
pub fn mount(device: &Path, target: &Path, fstype: &str, options: &str) -> io::Result<()> {
    let device = cstring(device.as_os_str().as_bytes())?;
    let target = cstring(target.as_os_str().as_bytes())?;
    let fstype = cstring(fstype.as_bytes())?;
    let options = cstring(options.as_bytes())?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    check(unsafe { libc::mount(device.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, options.as_ptr().cast()) })
}

/// `umount(2)`.
pub fn umount(target: &Path) -> io::Result<()> {
    let target = cstring(target.as_os_str().as_bytes())?;
    // SAFETY: a NUL-terminated path that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), 0) })
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `BLKFLSBUF`: drops the block device's cached buffers, so nothing read before the export was
/// reset below the kernel is used again.
pub fn flush_buffers(device: &Path) -> io::Result<()> {
    const BLKFLSBUF: libc::c_ulong = 0x1261;
    let file = File::open(device)?;
    // SAFETY: BLKFLSBUF takes no argument; the descriptor is open for the call.
    check(unsafe { libc::ioctl(file.as_raw_fd(), BLKFLSBUF, 0) })
}

/// A value written to a sysctl or sysfs file for a while: the old value is written back on drop.
#[derive(Debug)]
pub struct Setting {
    path: std::path::PathBuf,
    saved: String,
}

impl Setting {
    /// Reads what `path` holds, then writes `value` to it.
    pub fn set(path: impl Into<std::path::PathBuf>, value: &str) -> io::Result<Setting> {
        let path = path.into();
        let with_path = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let saved = std::fs::read_to_string(&path).map_err(with_path)?.trim().to_string();
        std::fs::write(&path, value).map_err(with_path)?;
        Ok(Setting { path, saved })
    }
}

impl Drop for Setting {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, &self.saved);
    }
}

/// The system page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as usize } else { 4096 }
}

/// Puts a terminal (a serial port) into raw mode so bytes pass unchanged; other files are left
/// alone.
pub fn make_raw_if_terminal(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: isatty only inspects the descriptor.
    if unsafe { libc::isatty(fd) } != 1 {
        return Ok(());
    }
    // SAFETY: a zeroed termios is filled by tcgetattr before use; both calls get a valid pointer.
    unsafe {
        let mut tio: libc::termios = std::mem::zeroed();
        check(libc::tcgetattr(fd, &mut tio))?;
        libc::cfmakeraw(&mut tio);
        check(libc::tcsetattr(fd, libc::TCSANOW, &tio))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn outcome_names_success_and_errno() {
        assert_eq!(outcome(&Ok(())), "0");
        assert_eq!(outcome(&Err(io::Error::from_raw_os_error(libc::EIO))), "EIO");
        assert_eq!(outcome(&Err(io::Error::from_raw_os_error(4095))), "errno 4095");
    }

    #[test]
    fn sync_family_succeeds_on_a_healthy_temp_file() {
        let path = std::env::temp_dir().join(format!("nbdfault-os-{}", std::process::id()));
        let mut file =
            std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.write_all(b"hello").unwrap();
        assert_eq!(outcome(&fsync(&file)), "0");
        assert_eq!(outcome(&fdatasync(&file)), "0");
        assert_eq!(outcome(&syncfs(&file)), "0");
        assert_eq!(outcome(&sync_file_range(&file, RangeSync::WriteOnly)), "0");
        assert_eq!(outcome(&sync_file_range(&file, RangeSync::WriteAndWait)), "0");
        assert_eq!(outcome(&fadvise_dontneed(&file)), "0");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_setting_is_written_and_put_back_on_drop() {
        let path = std::env::temp_dir().join(format!("nbdfault-setting-{}", std::process::id()));
        std::fs::write(&path, "3000\n").unwrap();
        let setting = Setting::set(&path, "100").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "100");
        drop(setting);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3000");
        let err = Setting::set("/nonexistent/setting", "1").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/setting"), "{err}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn raw_mode_leaves_regular_files_alone() {
        let file = File::open("/proc/self/status").unwrap();
        make_raw_if_terminal(&file).unwrap();
    }

    #[test]
    fn mount_reports_the_errno_of_a_missing_device() {
        let err = mount(Path::new("/nonexistent-device"), Path::new("/nonexistent-dir"), "xfs", "").unwrap_err();
        assert!(err.raw_os_error().is_some());
    }
}
