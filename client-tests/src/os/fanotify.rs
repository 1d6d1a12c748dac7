//! fanotify `FAN_FS_ERROR` on a whole filesystem: the events the kernel sends when a filesystem
//! reports an error (since 5.16 for ext4's `ext4_error()`, since 7.0 also for buffered write errors
//! of iomap filesystems, through fserror).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

/// `struct fanotify_event_metadata` is 24 bytes.
const METADATA_LEN: usize = 24;

/// One event, decoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsEvent {
    pub mask: u64,
    /// The errno of the `FAN_EVENT_INFO_TYPE_ERROR` record (positive, as the kernel sends it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<i32>,
    /// How many errors the kernel folded into this event.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_count: Option<u32>,
    /// Whether a file handle (`FAN_EVENT_INFO_TYPE_FID`) came with it.
    pub has_fid: bool,
}

/// A fanotify group listening for `FAN_FS_ERROR` on one filesystem.
pub struct ErrorWatch {
    fd: File,
}

impl ErrorWatch {
    /// Marks the filesystem mounted at `mountpoint`. Fails with EINVAL on kernels without
    /// `FAN_FS_ERROR` (before 5.16), EPERM without CAP_SYS_ADMIN.
    pub fn on(mountpoint: &Path) -> io::Result<ErrorWatch> {
        let flags = libc::FAN_CLASS_NOTIF | libc::FAN_REPORT_FID | libc::FAN_NONBLOCK | libc::FAN_CLOEXEC;
        // SAFETY: plain syscall; the descriptor it returns is owned by the File below.
        let fd = unsafe { libc::fanotify_init(flags, libc::O_RDONLY as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        let path = CString::new(mountpoint.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
        // SAFETY: a NUL-terminated path that outlives the call, on the group just made.
        let ret = unsafe {
            libc::fanotify_mark(
                file.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                libc::FAN_FS_ERROR,
                libc::AT_FDCWD,
                path.as_ptr(),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ErrorWatch { fd: file })
    }

    /// The events queued now, waiting up to `wait` for the first one (fserror reports from a
    /// workqueue, so the event may trail the failed writeback a little).
    pub fn events(&self, wait: Duration) -> io::Result<Vec<FsEvent>> {
        let start = Instant::now();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: reads into a buffer we own, at most its length.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                return Ok(parse_events(&buf[..n as usize]));
            }
            let err = io::Error::last_os_error();
            if n == 0 || err.kind() != io::ErrorKind::WouldBlock {
                return if n == 0 { Ok(Vec::new()) } else { Err(err) };
            }
            if start.elapsed() >= wait {
                return Ok(Vec::new());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Decodes a buffer of events: each a metadata header, then info records (type, padding,
/// length) of which the error record carries the errno and count.
pub fn parse_events(buf: &[u8]) -> Vec<FsEvent> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(event_len) = u32_at(buf, at).map(|l| l as usize) {
        if event_len < METADATA_LEN || at + event_len > buf.len() {
            break;
        }
        let event = &buf[at..at + event_len];
        let metadata_len = u16_at(event, 6).map(usize::from).unwrap_or(METADATA_LEN);
        let mask = u64::from_ne_bytes(event[8..16].try_into().unwrap_or_default());
        let mut ev = FsEvent { mask, error: None, error_count: None, has_fid: false };
        let mut info = metadata_len;
        while info + 4 <= event.len() {
            let kind = event[info];
            let len = usize::from(u16_at(event, info + 2).unwrap_or(0));
            if len < 4 || info + len > event.len() {
                break;
            }
            match kind {
                libc::FAN_EVENT_INFO_TYPE_ERROR => {
                    ev.error = u32_at(event, info + 4).map(|e| e as i32);
                    ev.error_count = u32_at(event, info + 8);
                }
                libc::FAN_EVENT_INFO_TYPE_FID => ev.has_fid = true,
                _ => {}
            }
            info += len;
        }
        out.push(ev);
        at += event_len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An FS_ERROR event as the kernel lays it out: metadata, an error record, a FID record.
    fn event(error: i32, count: u32) -> Vec<u8> {
        let mut e = Vec::new();
        let error_record = [
            &[libc::FAN_EVENT_INFO_TYPE_ERROR, 0][..],
            &12u16.to_ne_bytes(),
            &error.to_ne_bytes(),
            &count.to_ne_bytes(),
        ]
        .concat();
        let fid_record = [&[libc::FAN_EVENT_INFO_TYPE_FID, 0][..], &20u16.to_ne_bytes(), &[0u8; 16]].concat();
        let total = (METADATA_LEN + error_record.len() + fid_record.len()) as u32;
        e.extend(total.to_ne_bytes());
        e.extend([3u8, 0]);
        e.extend((METADATA_LEN as u16).to_ne_bytes());
        e.extend(libc::FAN_FS_ERROR.to_ne_bytes());
        e.extend((-1i32).to_ne_bytes());
        e.extend(0i32.to_ne_bytes());
        e.extend(error_record);
        e.extend(fid_record);
        e
    }

    #[test]
    fn error_events_yield_their_errno_count_and_file_handle() {
        let mut buf = event(5, 1);
        buf.extend(event(5, 3));
        let events = parse_events(&buf);
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[0],
            FsEvent { mask: libc::FAN_FS_ERROR, error: Some(5), error_count: Some(1), has_fid: true }
        );
        assert_eq!(events[1].error_count, Some(3));
    }

    #[test]
    fn a_truncated_buffer_yields_only_whole_events() {
        let buf = event(5, 1);
        assert_eq!(parse_events(&buf[..buf.len() - 1]).len(), 0);
        assert!(parse_events(&[]).is_empty());
    }
}
