//! The file I/O engine: where a file export's reads and writes go when they may wait for a device.
//!
//! What the page cache or a memory-backed filesystem can serve at once never comes here: the
//! file storage does it on the async thread (see `storage/file.rs`). The rest goes to a fixed set
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
pub fn read_into(file: &File, buffer: &mut BytesMut, length: usize, offset: u64, flags: libc::c_int) -> io::Result<usize> {
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
