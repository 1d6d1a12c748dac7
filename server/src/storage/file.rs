//! A disk image or block device: positional reads and writes, fdatasync for FLUSH and FUA, hole
//! punching for TRIM and WRITE_ZEROES where the filesystem allows, SEEK_DATA/SEEK_HOLE extents.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::engine::{self, Engine};
use super::{BlockDevice, Extent, Features, IoContext, IoError, IoFuture, ZeroFlags};
use crate::wire::{allocation, errno};

/// TRIM and WRITE_ZEROES are done this many bytes at a time, so one 4 GiB request never holds a
/// blocking thread for long or needs a buffer of its size.
const PIECE: u64 = 256 << 20;
/// The zero buffer used when the filesystem cannot zero a range itself.
const ZERO_BUFFER: usize = 1 << 20;
/// The most extents one BLOCK_STATUS reply lists; the client asks again for the rest.
const MAX_EXTENTS: usize = 4096;
/// Reads up to this size are served on the async thread when they cannot wait (the page cache
/// holds them, or the file lives in memory). Larger ones go to the I/O threads, where the copy
/// out of the page cache overlaps with sending the previous reply: 1 MiB reads inline ran at 0.86
/// to 0.90 of the I/O threads' rate (docs/performance.md).
const INLINE_READ_MAX: usize = 256 << 10;
/// Writes up to this size are served on the async thread when they cannot wait: a write's payload
/// was just received on this thread, and copying it from here into the page cache saved a
/// quarter of the server's CPU per 1 MiB write against handing it to an I/O thread.
const INLINE_WRITE_MAX: usize = 1 << 20;
/// `statfs` magic numbers of filesystems that live in memory: their reads and writes copy
/// to or from memory and never wait for a device.
const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6;
/// A buffered write done on the async thread that takes longer than this (the page cache had to
/// wait: dirty-page throttling, a journal commit, a page under writeback) sends the writes after
/// it to the I/O threads for [`SLOW_BACKOFF`], after which one is tried on the async thread
/// again; each slow one in a row doubles the wait, up to [`MAX_BACKOFF`], so a file system that
/// keeps throttling holds the async thread up once in seconds, not ten times a second.
const SLOW_WRITE: Duration = Duration::from_millis(1);
const SLOW_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(6);
/// The page size the page cache works in: only writes of whole pages never read the disk first.
const PAGE: u64 = 4096;

pub struct FileDevice {
    file: Arc<File>,
    size: u64,
    read_only: bool,
    /// The file lives in memory (tmpfs, ramfs): small reads and writes are done on the async
    /// thread as they are, since they cannot wait for a device. Such filesystems refuse
    /// `RWF_NOWAIT` altogether.
    memory_backed: bool,
    /// Whether `RWF_NOWAIT` reads and writes work on this file, each direction on its own (ext4
    /// takes NOWAIT reads from the page cache but refuses buffered NOWAIT writes); cleared on the
    /// first refusal.
    nowait_reads: AtomicBool,
    nowait_writes: AtomicBool,
    /// Where `RWF_NOWAIT` writes are refused (buffered writes on ext4), whole-page writes are done
    /// on the async thread as they are, as nbdkit does them on the thread that read the request:
    /// they only copy into the page cache. A slow one backs them off to the I/O threads awhile.
    buffered: BufferedWrites,
    engine: &'static Engine,
}

/// Buffered writes done on the async thread, and when they last had to wait.
struct BufferedWrites {
    /// Whether they are allowed at all (not when `NBDFAULT_FILE_IO=threads`).
    enabled: bool,
    /// When this device was opened; the clock `slow_until` counts on.
    opened: Instant,
    /// Nanoseconds since `opened` until which writes go to the I/O threads.
    slow_until: AtomicU64,
    /// Slow writes in a row.
    slow_streak: AtomicU64,
}

impl BufferedWrites {
    fn new(enabled: bool) -> BufferedWrites {
        BufferedWrites {
            enabled,
            opened: Instant::now(),
            slow_until: AtomicU64::new(0),
            slow_streak: AtomicU64::new(0),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.duration_since(self.opened).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether a plain write of `length` bytes at `offset` may be done on the async thread now,
    /// given the time: whole pages only (a partial page may need a read from the disk first).
    fn allowed(&self, offset: u64, length: usize, now: Instant) -> bool {
        self.enabled
            && offset % PAGE == 0
            && length as u64 % PAGE == 0
            && self.nanos(now) >= self.slow_until.load(Ordering::Relaxed)
    }

    /// A write done on the async thread took from `started` to `ended`: if that was long, the next
    /// ones go to the I/O threads for a while.
    fn took(&self, started: Instant, ended: Instant) {
        if ended.duration_since(started) <= SLOW_WRITE {
            if self.slow_streak.load(Ordering::Relaxed) != 0 {
                self.slow_streak.store(0, Ordering::Relaxed);
            }
            return;
        }
        let streak = self.slow_streak.fetch_add(1, Ordering::Relaxed).min(16) as u32;
        let backoff = SLOW_BACKOFF.saturating_mul(1 << streak).min(MAX_BACKOFF);
        self.slow_until.store(self.nanos(ended + backoff), Ordering::Relaxed);
    }
}

/// Why a file could not be used as an export.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: no such file; create it first (for example `truncate -s 1G {path}`) or use memory:SIZE")]
    NotFound { path: String },
    #[error("{path}: {source}; check its permissions, or export it read-only")]
    Permission { path: String, source: io::Error },
    #[error("{path}: is a directory; name an image file or a block device")]
    Directory { path: String },
    #[error("{path}: the file is empty; grow it first (for example `truncate -s 1G {path}`)")]
    Empty { path: String },
    #[error("{path}: {source}")]
    Other { path: String, source: io::Error },
}

impl FileDevice {
    pub fn open(path: &Path, read_only: bool) -> Result<FileDevice, OpenError> {
        let shown = path.display().to_string();
        let mut file =
            OpenOptions::new().read(true).write(!read_only).open(path).map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => OpenError::NotFound { path: shown.clone() },
                io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                    OpenError::Permission { path: shown.clone(), source }
                }
                io::ErrorKind::IsADirectory => OpenError::Directory { path: shown.clone() },
                _ => OpenError::Other { path: shown.clone(), source },
            })?;
        if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
            return Err(OpenError::Directory { path: shown });
        }
        // Seeking to the end also sizes block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0)).map_err(|source| OpenError::Other { path: shown.clone(), source })?;
        if size == 0 {
            return Err(OpenError::Empty { path: shown });
        }
        let engine = engine::shared();
        let inline = engine.inline();
        Ok(FileDevice {
            memory_backed: inline && lives_in_memory(&file),
            file: Arc::new(file),
            size,
            read_only,
            nowait_reads: AtomicBool::new(inline),
            nowait_writes: AtomicBool::new(inline),
            buffered: BufferedWrites::new(inline),
            engine,
        })
    }

    /// How this file's reads and writes are served, for the control API: `inline` on the async
    /// thread, `nowait` on the async thread what the page cache holds, `threads` on the I/O
    /// threads. What cannot be served inline always goes to the I/O threads.
    pub fn data_path(&self) -> FileDataPath {
        let path = |nowait: &AtomicBool| match () {
            () if self.memory_backed => "inline",
            () if nowait.load(Ordering::Relaxed) => "nowait",
            () => "threads",
        };
        let writes = match path(&self.nowait_writes) {
            "threads" if self.buffered.enabled && !self.read_only => "buffered",
            other => other,
        };
        FileDataPath {
            engine: self.engine.name(),
            io_threads: engine::IO_THREADS,
            reads: path(&self.nowait_reads),
            writes,
        }
    }

    /// Runs a blocking file operation on the I/O threads.
    fn blocking<T, F>(&self, op: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&File) -> Result<T, IoError> + Send + 'static,
    {
        let file = Arc::clone(&self.file);
        Box::pin(async move {
            self.engine
                .run(move || op(&file))
                .await
                .unwrap_or_else(|error| Err(IoError::new(errno::EIO, format!("storage task failed: {error}"))))
        })
    }
}

/// How a file export's reads and writes are served right now; see [`FileDevice::data_path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FileDataPath {
    /// `inline+threads`, or `threads` when `NBDFAULT_FILE_IO=threads` forced every request there.
    pub engine: &'static str,
    pub io_threads: usize,
    /// `inline`, `nowait` or `threads`; writes may also be `buffered`.
    pub reads: &'static str,
    pub writes: &'static str,
}

/// Whether the file is on a filesystem that keeps its data in memory.
fn lives_in_memory(file: &File) -> bool {
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::zeroed();
    // SAFETY: fstatfs writes one statfs into `stat`, which is valid for writes; the fd is open.
    let result = unsafe { libc::fstatfs(file.as_raw_fd(), stat.as_mut_ptr()) };
    if result != 0 {
        return false;
    }
    // SAFETY: fstatfs succeeded, so it filled the struct (which started zeroed anyway).
    #[allow(clippy::unnecessary_cast, reason = "f_type is i64 here but u32 or i32 on other targets")]
    let kind = unsafe { stat.assume_init() }.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

/// What a `RWF_NOWAIT` attempt did.
enum NoWait {
    /// All of it was done without blocking.
    Done,
    /// The first `n` bytes were done; the rest would block (not in the page cache, or the
    /// filesystem would have to wait for a lock or an allocation).
    Partial(usize),
    /// This file does not take `RWF_NOWAIT` at all.
    Unsupported,
}

/// Reads into `buffer` only what the page cache holds, without ever blocking the calling thread,
/// so cached reads are served on the async thread instead of a trip to the I/O threads.
fn read_nowait(file: &File, buffer: &mut BytesMut, length: usize, offset: u64) -> io::Result<NoWait> {
    while buffer.len() < length {
        match engine::read_into(file, buffer, length, offset, libc::RWF_NOWAIT) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(error) => return nowait_refusal(error, buffer.len()),
        }
    }
    Ok(NoWait::Done)
}

/// Writes `data` at `offset` as far as it can without blocking (see [`read_nowait`]).
fn write_nowait(file: &File, data: &[u8], offset: u64) -> io::Result<NoWait> {
    let mut done = 0;
    while done < data.len() {
        let rest = &data[done..];
        let iov = libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
        // SAFETY: the iovec points at `rest`, which lives for the whole call; pwritev2 only reads it.
        let result = unsafe {
            libc::pwritev2(file.as_raw_fd(), &iov, 1, (offset + done as u64) as libc::off_t, libc::RWF_NOWAIT)
        };
        match result {
            n if n > 0 => done += n as usize,
            0 => return Ok(NoWait::Partial(done)),
            _ => return nowait_refusal(io::Error::last_os_error(), done),
        }
    }
    Ok(NoWait::Done)
}

fn nowait_refusal(error: io::Error, done: usize) -> io::Result<NoWait> {
    match error.raw_os_error() {
        Some(libc::EAGAIN) => Ok(NoWait::Partial(done)),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) if done == 0 => Ok(NoWait::Unsupported),
        Some(libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Ok(NoWait::Partial(done)),
        _ => Err(error),
    }
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, length: u64) -> io::Result<()> {
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file` and open.
    let result = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset as libc::off_t, length as libc::off_t) };
    if result == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

fn is_unsupported(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL | libc::ENODEV))
}

/// Applies `op` to `[offset, offset + length)` in pieces of at most [`PIECE`] bytes.
fn in_pieces(offset: u64, length: u64, mut op: impl FnMut(u64, u64) -> io::Result<()>) -> io::Result<()> {
    let end = offset + length;
    let mut position = offset;
    while position < end {
        let take = PIECE.min(end - position);
        op(position, take)?;
        position += take;
    }
    Ok(())
}

fn write_zero_bytes(file: &File, offset: u64, length: u64) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_BUFFER.min(length as usize)];
    let end = offset + length;
    let mut position = offset;
    while position < end {
        let take = (zeros.len() as u64).min(end - position) as usize;
        file.write_all_at(&zeros[..take], position)?;
        position += take as u64;
    }
    Ok(())
}

/// `lseek(SEEK_DATA | SEEK_HOLE)`; `None` when there is no data past `offset` (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek takes integers only. It moves the shared file position, which nothing here
    // relies on: every read and write is positional (pread/pwrite).
    let result = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if result >= 0 {
        return Ok(Some(result as u64));
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ENXIO) { Ok(None) } else { Err(error) }
}

fn extents_of(file: &File, offset: u64, end: u64) -> io::Result<Vec<Extent>> {
    const HOLE: u32 = allocation::HOLE | allocation::ZERO;
    let mut extents = Vec::new();
    let mut position = offset;
    while position < end && extents.len() < MAX_EXTENTS {
        let data_start = match seek(file, position, libc::SEEK_DATA) {
            Ok(Some(start)) => start.min(end),
            Ok(None) => end,
            // Block devices and some filesystems cannot say: everything is data.
            Err(error) if is_unsupported(&error) => {
                extents.push(Extent { length: end - position, flags: 0 });
                break;
            }
            Err(error) => return Err(error),
        };
        if data_start > position {
            extents.push(Extent { length: data_start - position, flags: HOLE });
            position = data_start;
            continue;
        }
        let data_end = seek(file, position, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        // A racing write can make the hole vanish between the two seeks; never return 0 bytes.
        let data_end = data_end.max(position + 1);
        extents.push(Extent { length: data_end - position, flags: 0 });
        position = data_end;
    }
    super::coalesce(&mut extents);
    Ok(extents)
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn features(&self) -> Features {
        let writable = !self.read_only;
        Features {
            read_only: self.read_only,
            trim: writable,
            write_zeroes: writable,
            fast_zero: writable,
            cache: true,
            multi_conn: true,
        }
    }

    fn read(&self, _ctx: IoContext, offset: u64, length: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let length = length as usize;
            let mut buffer = BytesMut::with_capacity(length);
            if length <= INLINE_READ_MAX {
                if self.memory_backed {
                    return Ok(engine::read_exact_into(&self.file, buffer, length, offset)?.freeze());
                }
                if self.nowait_reads.load(Ordering::Relaxed) {
                    match read_nowait(&self.file, &mut buffer, length, offset)? {
                        NoWait::Done => return Ok(buffer.freeze()),
                        NoWait::Partial(_) => {}
                        NoWait::Unsupported => self.nowait_reads.store(false, Ordering::Relaxed),
                    }
                }
            }
            // What the page cache did not hold is read where blocking is allowed.
            Ok(self.engine.read(&self.file, offset, buffer, length).await?.freeze())
        })
    }

    fn write(&self, _ctx: IoContext, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if data.len() <= INLINE_WRITE_MAX {
                if self.memory_backed {
                    self.file.write_all_at(&data, offset)?;
                    if fua {
                        self.file.sync_data()?;
                    }
                    return Ok(());
                }
                // A FUA write waits for the disk anyway; only plain writes try the fast path.
                if !fua && self.nowait_writes.load(Ordering::Relaxed) {
                    match write_nowait(&self.file, &data, offset)? {
                        NoWait::Done => return Ok(()),
                        NoWait::Partial(done) => {
                            return Ok(self
                                .engine
                                .write(&self.file, offset + done as u64, data.slice(done..), fua)
                                .await?);
                        }
                        NoWait::Unsupported => self.nowait_writes.store(false, Ordering::Relaxed),
                    }
                }
                if !fua && !self.nowait_writes.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    if self.buffered.allowed(offset, data.len(), started) {
                        self.file.write_all_at(&data, offset)?;
                        self.buffered.took(started, Instant::now());
                        return Ok(());
                    }
                }
            }
            Ok(self.engine.write(&self.file, offset, data, fua).await?)
        })
    }

    fn flush(&self, _ctx: IoContext) -> IoFuture<'_, ()> {
        // One fd is shared by every connection, so fdatasync covers all completed writes.
        Box::pin(async move {
            if self.memory_backed {
                // Nothing to wait for: the data has no device to reach.
                return Ok(self.file.sync_data()?);
            }
            Ok(self.engine.sync_data(&self.file).await?)
        })
    }

    fn trim(&self, _ctx: IoContext, offset: u64, length: u64, fua: bool) -> IoFuture<'_, ()> {
        self.blocking(move |file| {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            match in_pieces(offset, length, |at, take| fallocate(file, punch, at, take)) {
                // TRIM is advisory: where holes cannot be punched, doing nothing is correct.
                Err(error) if is_unsupported(&error) => {}
                other => other?,
            }
            if fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }

    fn write_zeroes(&self, _ctx: IoContext, offset: u64, length: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        self.blocking(move |file| {
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let zero_range = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            let mut modes = Vec::with_capacity(2);
            if !flags.no_hole {
                modes.push(punch);
            }
            modes.push(zero_range);
            let mut done = false;
            for mode in modes {
                match in_pieces(offset, length, |at, take| fallocate(file, mode, at, take)) {
                    Ok(()) => {
                        done = true;
                        break;
                    }
                    Err(error) if is_unsupported(&error) => continue,
                    Err(error) => return Err(error.into()),
                }
            }
            if !done {
                if flags.fast {
                    return Err(IoError::unsupported("this file cannot zero a range faster than writing zeroes"));
                }
                write_zero_bytes(file, offset, length)?;
            }
            if flags.fua {
                file.sync_data()?;
            }
            Ok(())
        })
    }

    fn cache(&self, _ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, ()> {
        self.blocking(move |file| {
            // SAFETY: posix_fadvise takes integers only; the fd is open for the call's duration.
            let result = unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    offset as libc::off_t,
                    length as libc::off_t,
                    libc::POSIX_FADV_WILLNEED,
                )
            };
            // A prefetch hint that cannot be given is not an error for the client.
            if result != 0 {
                tracing::debug!(error = %io::Error::from_raw_os_error(result), "posix_fadvise(WILLNEED) failed");
            }
            Ok(())
        })
    }

    fn data_path(&self) -> Option<FileDataPath> {
        Some(FileDevice::data_path(self))
    }

    fn settle(&self) -> IoFuture<'_, ()> {
        // A dropped request's job still runs on an I/O thread; the engine's fence waits for it.
        Box::pin(async move { Ok(self.engine.fence().await?) })
    }

    fn extents(&self, _ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        let end = offset.saturating_add(length).min(self.size);
        self.blocking(move |file| Ok(extents_of(file, offset, end)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const CTX: IoContext = IoContext { connection: 1, cookie: 1, flags: 0, power_cycle: 0 };

    fn image(size: u64) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(size).unwrap();
        (dir, path)
    }

    #[test]
    fn opening_reports_missing_empty_and_directory_paths_precisely() {
        let dir = tempfile::tempdir().unwrap();
        let missing = FileDevice::open(&dir.path().join("nope.img"), false).err().unwrap();
        assert!(matches!(missing, OpenError::NotFound { .. }), "{missing}");
        let empty = dir.path().join("empty.img");
        File::create(&empty).unwrap();
        assert!(matches!(FileDevice::open(&empty, false).err().unwrap(), OpenError::Empty { .. }));
        assert!(matches!(FileDevice::open(dir.path(), true).err().unwrap(), OpenError::Directory { .. }));
    }

    #[tokio::test]
    async fn writes_read_back_and_reach_the_file() {
        let (_dir, path) = image(1 << 20);
        let device = FileDevice::open(&path, false).unwrap();
        device.write(CTX, 4096, Bytes::from_static(b"hello"), true).await.unwrap();
        assert_eq!(&device.read(CTX, 4096, 5).await.unwrap()[..], b"hello");
        device.flush(CTX).await.unwrap();
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4096..4101], b"hello");
    }

    #[tokio::test]
    async fn write_zeroes_and_trim_read_back_as_zeros() {
        let (_dir, path) = image(1 << 20);
        let device = FileDevice::open(&path, false).unwrap();
        device.write(CTX, 0, Bytes::from(vec![0xee; 1 << 20]), false).await.unwrap();
        device.write_zeroes(CTX, 4096, 8192, ZeroFlags::default()).await.unwrap();
        device.write_zeroes(CTX, 65536, 4096, ZeroFlags { no_hole: true, ..Default::default() }).await.unwrap();
        let back = device.read(CTX, 0, 1 << 20).await.unwrap();
        assert!(back[4096..12288].iter().all(|&b| b == 0));
        assert!(back[65536..69632].iter().all(|&b| b == 0));
        assert_eq!(back[12288], 0xee);
        device.trim(CTX, 0, 1 << 20, false).await.unwrap();
        // TRIM is advisory; the range must still read as either old data or zeros, never garbage.
        let after = device.read(CTX, 0, 1 << 20).await.unwrap();
        assert!(after.iter().all(|&b| b == 0 || b == 0xee));
    }

    #[tokio::test]
    async fn extents_distinguish_data_from_holes() {
        let (_dir, path) = image(16 << 20);
        let device = FileDevice::open(&path, false).unwrap();
        device.write(CTX, 8 << 20, Bytes::from(vec![1; 1 << 20]), false).await.unwrap();
        let extents = device.extents(CTX, 0, 16 << 20).await.unwrap();
        let total: u64 = extents.iter().map(|e| e.length).sum();
        assert_eq!(total, 16 << 20);
        // Where the filesystem reports holes, the written megabyte must be data and the start a hole.
        if extents.len() > 1 {
            assert_eq!(extents[0].flags, allocation::HOLE | allocation::ZERO);
            let mut position = 0;
            for extent in &extents {
                if position <= 8 << 20 && position + extent.length > 8 << 20 {
                    assert_eq!(extent.flags, 0);
                }
                position += extent.length;
            }
        }
    }

    #[tokio::test]
    async fn cached_and_uncached_ranges_read_back_the_same_bytes() {
        let (_dir, path) = image(8 << 20);
        let pattern: Vec<u8> = (0..8u32 << 20).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &pattern).unwrap();
        let device = FileDevice::open(&path, false).unwrap();
        // SAFETY: posix_fadvise takes integers only; drops the file's pages so reads must block.
        unsafe { libc::posix_fadvise(device.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        let cold = device.read(CTX, 4096 + 7, 200_000).await.unwrap();
        let warm = device.read(CTX, 4096 + 7, 200_000).await.unwrap();
        assert_eq!(&cold[..], &pattern[4103..4103 + 200_000]);
        assert_eq!(cold, warm);
        device.write(CTX, 100, Bytes::from_static(b"fast path"), false).await.unwrap();
        assert_eq!(&device.read(CTX, 100, 9).await.unwrap()[..], b"fast path");
    }

    #[test]
    fn nowait_refusals_mean_try_elsewhere_and_real_errors_stay_errors() {
        let refusal = |errno: i32, done: usize| nowait_refusal(io::Error::from_raw_os_error(errno), done);
        assert!(matches!(refusal(libc::EAGAIN, 0), Ok(NoWait::Partial(0))));
        assert!(matches!(refusal(libc::EAGAIN, 512), Ok(NoWait::Partial(512))));
        assert!(matches!(refusal(libc::EOPNOTSUPP, 0), Ok(NoWait::Unsupported)));
        assert!(matches!(refusal(libc::EOPNOTSUPP, 4096), Ok(NoWait::Partial(4096))));
        assert_eq!(refusal(libc::EIO, 0).err().and_then(|e| e.raw_os_error()), Some(libc::EIO));
    }

    #[tokio::test]
    async fn a_file_in_memory_is_served_inline_in_both_directions() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else { return };
        let path = dir.path().join("disk.img");
        File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let device = FileDevice::open(&path, false).unwrap();
        if engine::shared().inline() {
            assert_eq!((device.data_path().reads, device.data_path().writes), ("inline", "inline"));
        }
        device.write(CTX, 10, Bytes::from_static(b"in memory"), true).await.unwrap();
        assert_eq!(&device.read(CTX, 10, 9).await.unwrap()[..], b"in memory");
        // Larger than the inline limit: the I/O threads take it, with the same result.
        device.write(CTX, 0, Bytes::from(vec![3; 1 << 20]), false).await.unwrap();
        assert!(device.read(CTX, 0, 1 << 20).await.unwrap().iter().all(|&b| b == 3));
    }

    #[test]
    fn buffered_writes_take_whole_pages_and_back_off_after_a_slow_one() {
        let writes = BufferedWrites::new(true);
        let now = Instant::now();
        assert!(writes.allowed(8192, 4096, now));
        assert!(writes.allowed(0, 65536, now));
        assert!(!writes.allowed(512, 4096, now), "a partial page may need a read first");
        assert!(!writes.allowed(4096, 1000, now));
        writes.took(now, now + Duration::from_micros(20));
        assert!(writes.allowed(4096, 4096, now + Duration::from_micros(20)), "a fast write changes nothing");
        let ended = now + Duration::from_millis(5);
        writes.took(now, ended);
        assert!(!writes.allowed(4096, 4096, ended + SLOW_BACKOFF / 2), "after a slow one, the I/O threads");
        assert!(writes.allowed(4096, 4096, ended + SLOW_BACKOFF), "then the async thread again");
        // Slow again: twice as long, and so on; a fast one starts the count again.
        let again = ended + SLOW_BACKOFF;
        writes.took(again, again + Duration::from_millis(2));
        let ended = again + Duration::from_millis(2);
        assert!(!writes.allowed(4096, 4096, ended + SLOW_BACKOFF * 3 / 2));
        assert!(writes.allowed(4096, 4096, ended + SLOW_BACKOFF * 2));
        for _ in 0..20 {
            writes.took(ended, ended + Duration::from_millis(2));
        }
        assert!(writes.allowed(4096, 4096, ended + Duration::from_millis(2) + MAX_BACKOFF), "never longer than this");
        writes.took(ended, ended);
        writes.took(ended, ended + Duration::from_millis(2));
        assert!(writes.allowed(4096, 4096, ended + Duration::from_millis(2) + SLOW_BACKOFF));
        assert!(!BufferedWrites::new(false).allowed(0, 4096, now), "never when the I/O threads are forced");
    }

    #[tokio::test]
    async fn whole_page_writes_where_nowait_writes_are_refused_are_buffered_and_read_back() {
        let (_dir, path) = image(1 << 20);
        let device = FileDevice::open(&path, false).unwrap();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        device.write(CTX, 4096, Bytes::from(pattern.clone()), false).await.unwrap();
        device.write(CTX, 100, Bytes::from_static(b"partial"), false).await.unwrap();
        device.write(CTX, 65536, Bytes::from(vec![9; 4096]), true).await.unwrap();
        assert_eq!(&device.read(CTX, 4096, 8192).await.unwrap()[..], &pattern[..]);
        assert_eq!(&device.read(CTX, 100, 7).await.unwrap()[..], b"partial");
        assert!(device.read(CTX, 65536, 4096).await.unwrap().iter().all(|&b| b == 9));
        let writes = device.data_path().writes;
        if engine::shared().inline() && !device.memory_backed {
            // ext4 refuses RWF_NOWAIT buffered writes; XFS and btrfs take them.
            let expected = if device.nowait_writes.load(Ordering::Relaxed) { "nowait" } else { "buffered" };
            assert_eq!(writes, expected);
        }
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[4096..12288], &pattern[..]);
    }

    #[tokio::test]
    async fn writes_and_reads_on_both_sides_of_the_inline_limits_land_and_read_back() {
        let (_dir, path) = image(8 << 20);
        let device = FileDevice::open(&path, false).unwrap();
        let page = PAGE as usize;
        // Inline (on this thread) up to the limits, on the I/O threads past them.
        for (at, length) in
            [(0, INLINE_WRITE_MAX), (2 << 20, INLINE_WRITE_MAX + page), (4 << 20, INLINE_READ_MAX + page)]
        {
            let data: Vec<u8> = (0..length).map(|i| (i / page + at / page + 1) as u8).collect();
            device.write(CTX, at as u64, Bytes::from(data.clone()), false).await.unwrap();
            for (from, take) in [(0, INLINE_READ_MAX), (0, INLINE_READ_MAX + page), (page, length - page)] {
                let read = device.read(CTX, (at + from) as u64, take as u32).await.unwrap();
                assert!(read[..] == data[from..from + take], "{length} bytes at {at}: {take} read at +{from}");
            }
        }
        let on_disk = std::fs::read(&path).unwrap();
        assert!(on_disk[(2 << 20) + INLINE_WRITE_MAX..(2 << 20) + INLINE_WRITE_MAX + page].iter().all(|&b| b != 0));
    }

    #[tokio::test]
    async fn read_only_files_advertise_no_writes() {
        let (_dir, path) = image(4096);
        let device = FileDevice::open(&path, true).unwrap();
        assert!(device.features().read_only);
        assert!(!device.features().trim);
    }
}
