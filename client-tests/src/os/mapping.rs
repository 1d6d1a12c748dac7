//! Shared file mappings whose loads and stores survive SIGBUS, and page-cache residency (mincore).
//!
//! A load or store through a mapping can raise SIGBUS (a read fault whose disk read fails, a write
//! fault on a shut-down XFS). The suite must observe that, not die of it, and it must make the
//! access *in this process*: a forked child has no page-table entries of its own, so its first
//! access would fault and re-read the page, hiding the very state under test (a mapped page that
//! is no longer Uptodate). So accesses run inside [`guarded`]: a SIGBUS handler, armed for the
//! mapping's address range only, records the address and maps an anonymous page over the faulting
//! one, so the access completes and the caller learns it faulted.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

use super::page_size;

static ARMED_START: AtomicUsize = AtomicUsize::new(0);
static ARMED_END: AtomicUsize = AtomicUsize::new(0);
static FAULT_ADDR: AtomicUsize = AtomicUsize::new(0);
static PAGE: AtomicUsize = AtomicUsize::new(4096);
static INSTALL: Once = Once::new();
/// One guarded access at a time: the armed range is process-wide.
static GUARD: Mutex<()> = Mutex::new(());

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler; si_addr is the fault address.
    let addr = unsafe { (*info).si_addr() } as usize;
    let (start, end) = (ARMED_START.load(Ordering::SeqCst), ARMED_END.load(Ordering::SeqCst));
    if addr >= start && addr < end {
        FAULT_ADDR.store(addr, Ordering::SeqCst);
        let page = addr & !(PAGE.load(Ordering::SeqCst) - 1);
        // SAFETY: replaces exactly the faulting page of a mapping this module owns; mmap is async-signal-safe.
        let ret = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                PAGE.load(Ordering::SeqCst),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if ret != libc::MAP_FAILED {
            return;
        }
    }
    // Not ours, or no way to recover: restore the default action so the retried access ends the
    // process as it would have without this handler.
    // SAFETY: signal() with SIG_DFL is async-signal-safe.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}

fn install_handler() {
    INSTALL.call_once(|| {
        PAGE.store(page_size(), Ordering::SeqCst);
        // SAFETY: a zeroed sigaction is valid; we set the handler, SA_SIGINFO and an empty mask.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

/// Runs `f` with SIGBUS in `start..end` caught. Returns `f`'s value and the first faulting address.
fn guarded<T>(start: usize, end: usize, f: impl FnOnce() -> T) -> (T, Option<usize>) {
    install_handler();
    let _one_at_a_time = GUARD.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    FAULT_ADDR.store(0, Ordering::SeqCst);
    ARMED_START.store(start, Ordering::SeqCst);
    ARMED_END.store(end, Ordering::SeqCst);
    let value = f();
    ARMED_START.store(0, Ordering::SeqCst);
    ARMED_END.store(0, Ordering::SeqCst);
    let fault = FAULT_ADDR.swap(0, Ordering::SeqCst);
    (value, (fault != 0).then_some(fault))
}

/// A SIGBUS raised by an access through a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("SIGBUS at mapping offset {offset}")]
pub struct SigBus {
    /// Offset of the faulting address from the start of the mapping.
    pub offset: usize,
}

/// A `MAP_SHARED` mapping of the start of a file, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `file` from offset 0, readable and writable.
    pub fn shared(file: &File, len: usize) -> io::Result<Self> {
        Self::map(file, 0, len, libc::PROT_READ | libc::PROT_WRITE)
    }

    fn map(file: &File, offset: u64, len: usize, prot: libc::c_int) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "cannot map zero bytes"));
        }
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED), of an open descriptor.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), offset as libc::off_t)
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The virtual address of byte `offset`, for page-flag lookups.
    pub fn address(&self, offset: usize) -> usize {
        self.ptr.as_ptr() as usize + offset
    }

    fn bounds(&self, offset: usize, len: usize) -> io::Result<()> {
        if offset.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "access outside the mapping"));
        }
        Ok(())
    }

    /// Loads `len` bytes at `offset`, byte by byte, through the existing page-table entries.
    pub fn load(&self, offset: usize, len: usize) -> io::Result<Result<Vec<u8>, SigBus>> {
        self.bounds(offset, len)?;
        let base = self.ptr.as_ptr();
        let (data, fault) = guarded(self.address(0), self.address(self.len), || {
            (offset..offset + len)
                // SAFETY: in bounds of a live mapping; volatile so every byte is really loaded.
                .map(|i| unsafe { std::ptr::read_volatile(base.add(i)) })
                .collect::<Vec<u8>>()
        });
        Ok(match fault {
            Some(addr) => Err(SigBus { offset: addr - self.address(0) }),
            None => Ok(data),
        })
    }

    /// Stores `data` at `offset`.
    pub fn store(&self, offset: usize, data: &[u8]) -> io::Result<Result<(), SigBus>> {
        self.bounds(offset, data.len())?;
        let base = self.ptr.as_ptr();
        let ((), fault) = guarded(self.address(0), self.address(self.len), || {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: in bounds of a live, writable mapping.
                unsafe { std::ptr::write_volatile(base.add(offset + i), *b) };
            }
        });
        Ok(match fault {
            Some(addr) => Err(SigBus { offset: addr - self.address(0) }),
            None => Ok(()),
        })
    }

    /// `msync(2)` over the whole mapping; `sync` picks MS_SYNC, else MS_ASYNC.
    pub fn msync(&self, sync: bool) -> io::Result<()> {
        let flags = if sync { libc::MS_SYNC } else { libc::MS_ASYNC };
        // SAFETY: the range is exactly this live mapping.
        let ret = unsafe { libc::msync(self.ptr.as_ptr().cast(), self.len, flags) };
        if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the range mmap returned; nothing borrows it past self.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Which pages of `file`'s first `len` bytes are in the page cache, without touching them (a fresh
/// read-only mapping and `mincore(2)`).
pub fn resident_pages(file: &File, len: usize) -> io::Result<Vec<bool>> {
    let mapping = Mapping::map(file, 0, len, libc::PROT_READ)?;
    let pages = len.div_ceil(page_size());
    let mut vec = vec![0u8; pages];
    // SAFETY: the range is the live mapping; vec has one byte per page as mincore requires.
    let ret = unsafe { libc::mincore(mapping.ptr.as_ptr().cast(), len, vec.as_mut_ptr()) };
    if ret == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(vec.iter().map(|b| b & 1 == 1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str, len: usize) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("nbdfault-map-{name}-{}", std::process::id()));
        let mut file =
            std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.write_all(&vec![b'a'; len]).unwrap();
        (path, file)
    }

    #[test]
    fn store_then_load_through_a_shared_mapping_reaches_the_file() {
        let (path, file) = temp_file("rw", 8192);
        let map = Mapping::shared(&file, 8192).unwrap();
        map.store(4096, b"hello").unwrap().unwrap();
        assert_eq!(map.load(4096, 5).unwrap().unwrap(), b"hello");
        map.msync(true).unwrap();
        drop(map);
        assert_eq!(&std::fs::read(&path).unwrap()[4096..4101], b"hello");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn access_past_end_of_file_raises_sigbus_and_the_caller_survives() {
        let (path, file) = temp_file("bus", 4096);
        // Two pages mapped over a one-page file: the second page is past EOF, so touching it is SIGBUS.
        let map = Mapping::shared(&file, 8192).unwrap();
        let fault = map.load(4096, 16).unwrap().unwrap_err();
        assert_eq!(fault.offset, 4096);
        assert_eq!(map.store(4100, b"x").unwrap(), Ok(()), "the faulting page was replaced, later stores land");
        assert_eq!(map.load(0, 4).unwrap().unwrap(), b"aaaa");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn access_outside_the_mapping_is_refused_before_touching_memory() {
        let (path, file) = temp_file("oob", 4096);
        let map = Mapping::shared(&file, 4096).unwrap();
        assert!(map.load(4000, 200).is_err());
        assert!(map.store(usize::MAX, b"x").is_err());
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn freshly_written_pages_are_resident() {
        let (path, file) = temp_file("mincore", 8192);
        assert_eq!(resident_pages(&file, 8192).unwrap(), vec![true, true]);
        std::fs::remove_file(path).unwrap();
    }
}
