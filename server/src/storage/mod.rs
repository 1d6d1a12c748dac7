//! Storage: what an export's bytes live on, behind one trait.
//!
//! Backends (`memory`, `file`, `overlay`) implement [`BlockDevice`], and so does the fault layer
//! that wraps them, so the protocol code cannot tell a faulty device from a healthy one.

mod chunks;
pub mod engine;
pub mod file;
pub mod memory;
pub mod overlay;

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;

use crate::wire::errno;

pub use file::FileDevice;
pub use memory::MemoryDevice;
pub use overlay::OverlayDevice;

/// The future every device operation returns. Boxed so devices can be stacked behind `dyn`.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, IoError>> + Send + 'a>>;

/// Which request an operation serves. Storage ignores it; the fault layer matches and logs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoContext {
    pub connection: u64,
    pub cookie: u64,
    /// The request's command flags as they arrived (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// The power cycle of the export the connection attached in (see
    /// [`crate::fault::power::Power`]): after a power cut, the fault layer lets no I/O of an
    /// older cycle reach storage.
    pub power_cycle: u64,
}

/// What WRITE_ZEROES may do and must not do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// NO_HOLE: the range must stay allocated.
    pub no_hole: bool,
    /// FAST_ZERO: fail at once with ENOTSUP, changing nothing, unless zeroing is cheap.
    pub fast: bool,
    pub fua: bool,
}

/// One run of bytes with the same allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// `NBD_STATE_HOLE` and `NBD_STATE_ZERO` bits of `base:allocation`.
    pub flags: u32,
}

/// What a device can do; becomes the export's transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub read_only: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    /// Zeroing is cheaper than writing zeroes (hole punching, or memory), so FAST_ZERO can work.
    pub fast_zero: bool,
    pub cache: bool,
    /// A flush covers writes completed on every connection, so clients may open several.
    pub multi_conn: bool,
}

/// Why an operation failed, with the NBD error the client gets.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("{message}")]
    Failed { errno: u32, message: Cow<'static, str> },
    /// The device asks for the connection to be dropped without a reply (an injected disconnect).
    #[error("connection dropped: {reason}")]
    Disconnect { reason: String },
}

impl IoError {
    pub fn new(errno: u32, message: impl Into<Cow<'static, str>>) -> IoError {
        IoError::Failed { errno, message: message.into() }
    }

    /// The error a client sees.
    pub fn errno(&self) -> u32 {
        match self {
            IoError::Failed { errno, .. } => *errno,
            IoError::Disconnect { .. } => errno::EIO,
        }
    }

    pub fn unsupported(message: impl Into<Cow<'static, str>>) -> IoError {
        IoError::new(errno::ENOTSUP, message)
    }
}

impl From<io::Error> for IoError {
    /// Maps an OS error to the NBD error that tells a client what happened: ENOSPC for lack of
    /// space, EPERM for a read-only medium, EIO for the rest.
    fn from(error: io::Error) -> IoError {
        let nbd_errno = match error.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => errno::ENOSPC,
            Some(libc::EROFS | libc::EPERM | libc::EACCES) => errno::EPERM,
            Some(libc::EOPNOTSUPP) => errno::ENOTSUP,
            Some(libc::EINVAL) => errno::EINVAL,
            _ => errno::EIO,
        };
        IoError::Failed { errno: nbd_errno, message: error.to_string().into() }
    }
}

/// A block device as the NBD protocol needs it. Offsets and lengths are already range-checked
/// against [`BlockDevice::size`] by the protocol layer.
pub trait BlockDevice: Send + Sync {
    fn size(&self) -> u64;
    fn features(&self) -> Features;
    fn read(&self, ctx: IoContext, offset: u64, length: u32) -> IoFuture<'_, Bytes>;
    /// Durable before it returns when `fua` is set.
    fn write(&self, ctx: IoContext, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()>;
    /// Makes every write completed before it, on any connection, durable.
    fn flush(&self, ctx: IoContext) -> IoFuture<'_, ()>;
    /// Advisory: may discard all, part or none of the range.
    fn trim(&self, ctx: IoContext, offset: u64, length: u64, fua: bool) -> IoFuture<'_, ()>;
    fn write_zeroes(&self, ctx: IoContext, offset: u64, length: u64, flags: ZeroFlags) -> IoFuture<'_, ()>;
    /// A hint to prefetch; may do nothing.
    fn cache(&self, ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, ()>;
    /// Allocation extents from `offset`: at least one, covering at most up to the end of the
    /// device. They may cover less than `length`, and the last may run past it.
    fn extents(&self, ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>>;
    /// How a file under this device is read and written, for the control API; `None` for
    /// storage without a file.
    fn data_path(&self) -> Option<file::FileDataPath> {
        None
    }
    /// Waits until every operation started before it has finished with the storage, also one
    /// whose future was dropped while a thread still did its I/O: after this, nothing asked for
    /// earlier can change the contents. Storage that does its work inside the future (memory,
    /// overlay) has nothing to wait for.
    fn settle(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
    /// Returns the contents to their pristine state, when the backend knows one.
    fn reset(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Err(IoError::unsupported("this storage has no pristine state to return to")) })
    }
}

/// Merges neighbouring extents with the same flags, in place.
pub fn coalesce(extents: &mut Vec<Extent>) {
    let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
    for extent in extents.drain(..) {
        match merged.last_mut() {
            Some(last) if last.flags == extent.flags => last.length += extent.length,
            _ if extent.length == 0 => {}
            _ => merged.push(extent),
        }
    }
    *extents = merged;
}
