//! The file I/O engine: where a file export's reads and writes go when they may wait for a device.
//!
//! What the page cache or a memory-backed filesystem can serve at once never comes here: the
//! file storage does it on the async thread (see `storage/file.rs`), and so are whole-page
//! buffered writes where `RWF_NOWAIT` writes are refused (ext4), unless they were slow lately. The rest goes to a fixed set
//! of I/O threads fed by one queue, shared by every export (nbdkit's model): the number of
//! threads is bounded whatever the load, and requests wait in the queue instead. Each job owns
//! its file handle and its buffer, so a request whose future is dropped (its client went away,
//! shutdown gave up on it) leaves its I/O to finish and its buffer to be freed then: no buffer
//! handed to the kernel is ever freed while the kernel may still use it.
//!
//! `NBDFAULT_FILE_IO=threads` sends every file request to the I/O threads, even those the async
//! thread could serve at once: the path a file takes where the fast path is refused, forced, so
//! both paths are tested.

mod threads;

use std::fs::File;
use std::io;
use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};

pub use threads::Threads;

/// The environment variable that chooses the file data path: `auto` (the default) or `threads`.
pub const PATH_VARIABLE: &str = "NBDFAULT_FILE_IO";

/// How many I/O threads serve every file export together.
pub const IO_THREADS: usize = 2;

pub struct Engine {
    threads: Threads,
    /// Whether requests the page cache can answer at once are served on the async thread.
    inline: bool,
}

/// The engine every file export shares, started on first use.
pub fn shared() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let wanted = std::env::var(PATH_VARIABLE).unwrap_or_default();
        let inline = match wanted.trim() {
            "threads" => false,
            "" | "auto" => true,
            other => {
                tracing::warn!("{PATH_VARIABLE}={other:?} is not auto or threads; using auto");
                true
            }
        };
        let engine = Engine { threads: Threads::start(IO_THREADS).expect("cannot start the I/O threads"), inline };
        tracing::info!(path = engine.name(), io_threads = IO_THREADS, "file data path");
        engine
    })
}

impl Engine {
    /// `inline+threads` (what the page cache can serve at once on the async thread, the rest on
    /// the I/O threads) or `threads` (everything on the I/O threads).
    pub fn name(&self) -> &'static str {
        if self.inline { "inline+threads" } else { "threads" }
    }

    /// Whether file requests may be served on the async thread when they cannot wait.
    pub fn inline(&self) -> bool {
        self.inline
    }

    /// Reads at `offset + buffer.len()` until `buffer` holds `length` bytes; the end of the file
    /// before that is an error.
    pub async fn read(&self, file: &Arc<File>, offset: u64, buffer: BytesMut, length: usize) -> io::Result<BytesMut> {
        let file = Arc::clone(file);
        self.threads.run(move || read_exact_into(&file, buffer, length, offset)).await?
    }

    /// Writes all of `data` at `offset`; with `sync`, then makes it durable (fdatasync).
    pub async fn write(&self, file: &Arc<File>, offset: u64, data: Bytes, sync: bool) -> io::Result<()> {
        let file = Arc::clone(file);
        self.threads
            .run(move || {
                std::os::unix::fs::FileExt::write_all_at(&*file, &data, offset)?;
                if sync { file.sync_data() } else { Ok(()) }
            })
            .await?
    }

    /// Makes every completed write to `file` durable (fdatasync).
    pub async fn sync_data(&self, file: &Arc<File>) -> io::Result<()> {
        let file = Arc::clone(file);
        self.threads.run(move || file.sync_data()).await?
    }

    /// Waits until every job queued so far has finished, also those whose requests were dropped
    /// (their client went away): a power cut undoes unflushed writes only after this, so none
    /// of them lands after the undo.
    pub async fn fence(&self) -> io::Result<()> {
        self.threads.fence().await
    }

    /// Runs other blocking work (hole punching in pieces, SEEK_DATA walks, prefetch hints) on an
    /// I/O thread.
    pub async fn run<T, F>(&self, job: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        self.threads.run(job).await
    }
}

/// Reads until `buffer` holds `length` bytes, retrying short reads; blocks.
pub fn read_exact_into(file: &File, mut buffer: BytesMut, length: usize, offset: u64) -> io::Result<BytesMut> {
    while buffer.len() < length {
        match read_into(file, &mut buffer, length, offset, 0) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(buffer)
}

/// One `preadv2` at `offset + buffer.len()` into `buffer`'s spare room, never past `length`
/// bytes in all: returns how many bytes it read (0 at the end of the file). `flags` is 0 or
/// `RWF_NOWAIT`. No zeroing first: the kernel fills the bytes it reports.
pub fn read_into(
    file: &File,
    buffer: &mut BytesMut,
    length: usize,
    offset: u64,
    flags: libc::c_int,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    let filled = buffer.len();
    buffer.reserve(length - filled);
    let spare = &mut buffer.spare_capacity_mut()[..length - filled];
    let iov = libc::iovec { iov_base: spare.as_mut_ptr().cast(), iov_len: spare.len() };
    let at = (offset + filled as u64) as libc::off_t;
    // SAFETY: the iovec covers `spare`, memory owned by `buffer` and writable for the whole call.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, at, flags) };
    if read < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel initialised the first `read` bytes of the spare room, within `length`.
    unsafe { buffer.set_len(filled + read as usize) };
    Ok(read as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    fn engine() -> Engine {
        Engine { threads: Threads::start(1).unwrap(), inline: true }
    }

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        (dir, Arc::new(file))
    }

    #[tokio::test]
    async fn reads_continue_where_a_partial_read_stopped_and_writes_land_whole() {
        let (_dir, file) = file_with(&(0..=255u8).cycle().take(1 << 20).collect::<Vec<_>>());
        let engine = engine();
        // A buffer that already holds the first bytes (what a NOWAIT attempt got) is completed.
        let mut started = BytesMut::with_capacity(10_000);
        started.extend_from_slice(&[7, 8, 9]);
        let read = engine.read(&file, 7, started, 10_000).await.unwrap();
        assert_eq!(&read[..3], &[7, 8, 9]);
        assert_eq!(read[3], 10, "continues at offset + the bytes already there");
        assert_eq!(read.len(), 10_000);
        engine.write(&file, 100, Bytes::from(vec![0xee; 300_000]), true).await.unwrap();
        let back = engine.read(&file, 99, BytesMut::new(), 300_002).await.unwrap();
        assert_eq!((back[0], back[1], back[300_000], back[300_001]), (99, 0xee, 0xee, (300_100 % 256) as u8));
    }

    #[tokio::test]
    async fn a_read_past_the_end_is_a_short_read_and_then_an_error() {
        let (_dir, file) = file_with(&[1; 100]);
        let mut buffer = BytesMut::new();
        assert_eq!(read_into(&file, &mut buffer, 4096, 50, 0).unwrap(), 50, "one call returns what there is");
        let error = engine().read(&file, 50, BytesMut::new(), 4096).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn system_call_errors_reach_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("read-only");
        std::fs::write(&path, [0; 4096]).unwrap();
        let read_only = Arc::new(File::open(&path).unwrap());
        let error = engine().write(&read_only, 0, Bytes::from_static(b"x"), false).await.unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EBADF));
    }

    #[tokio::test]
    async fn a_dropped_request_still_finishes_with_its_own_buffer_and_nothing_else_waits_for_it() {
        let (_dir, file) = file_with(&[0; 4096]);
        let engine = engine();
        let finished = Arc::new(AtomicUsize::new(0));
        // The only I/O thread is busy until released; the next job waits in the queue behind it,
        // then its caller leaves. (Jobs are queued when their future is first polled.)
        let (started, running) = std::sync::mpsc::channel();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let mut busy = Box::pin(engine.run(move || {
            started.send(()).unwrap();
            hold.recv().unwrap();
        }));
        assert!(futures_poll_once(busy.as_mut()).await.is_none());
        running.recv().unwrap();
        let counted = Arc::clone(&finished);
        let file_for_job = Arc::clone(&file);
        let mut dropped = Box::pin(engine.run(move || {
            std::os::unix::fs::FileExt::write_all_at(&*file_for_job, b"written after the caller left", 0).unwrap();
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        // Polled once (so it is queued), then dropped: a request cancelled in flight.
        assert!(futures_poll_once(dropped.as_mut()).await.is_none(), "the only thread is busy");
        drop(dropped);
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        release.send(()).unwrap();
        busy.await.unwrap();
        // The queue runs in order on the single thread: a later job sees the dropped one done.
        engine.run(|| ()).await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        let mut head = [0u8; 7];
        std::os::unix::fs::FileExt::read_exact_at(&*file, &mut head, 0).unwrap();
        assert_eq!(&head, b"written");
    }

    #[tokio::test]
    async fn a_fence_waits_for_every_job_queued_before_it_also_dropped_ones_and_survives_a_panic() {
        let threads = Threads::start(2).unwrap();
        // A job that panics loses its result, not its thread: the fence still needs both.
        assert!(threads.run(|| panic!("a job that panics")).await.is_err());
        let finished = Arc::new(AtomicUsize::new(0));
        // The jobs wait until `hold` is dropped.
        let mut hold = Vec::new();
        for _ in 0..3 {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            hold.push(release);
            let counted = Arc::clone(&finished);
            let mut job = Box::pin(threads.run(move || {
                let _ = wait.recv();
                counted.fetch_add(1, Ordering::SeqCst);
            }));
            // Queued, then its caller leaves.
            assert!(futures_poll_once(job.as_mut()).await.is_none());
        }
        let mut fence = Box::pin(threads.fence());
        for _ in 0..20 {
            assert!(futures_poll_once(fence.as_mut()).await.is_none(), "jobs before it still wait");
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(hold);
        fence.await.unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 3, "every job queued before the fence has run");
    }

    #[test]
    fn shutting_down_finishes_the_queued_jobs_and_ends_every_thread() {
        let finished = Arc::new(AtomicUsize::new(0));
        let threads = Threads::start(2).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        // No job can finish before every one is queued: they wait for the gate.
        let gate = Arc::new(std::sync::RwLock::new(()));
        let closed = gate.write().unwrap();
        for _ in 0..8 {
            let counted = Arc::clone(&finished);
            let gate = Arc::clone(&gate);
            let job = threads.run(move || {
                drop(gate.read().unwrap());
                std::thread::sleep(Duration::from_millis(5));
                counted.fetch_add(1, Ordering::SeqCst);
            });
            // Queued, and its caller gone at once.
            runtime.block_on(async { assert!(futures_poll_once(Box::pin(job).as_mut()).await.is_none()) });
        }
        assert_eq!(finished.load(Ordering::SeqCst), 0);
        drop(closed);
        drop(threads);
        assert_eq!(finished.load(Ordering::SeqCst), 8, "every queued job ran before the threads ended");
    }

    /// Polls a future once: `Some` if it finished.
    async fn futures_poll_once<F: std::future::Future + Unpin>(mut future: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut future).poll(cx) {
                std::task::Poll::Ready(value) => Some(value),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
