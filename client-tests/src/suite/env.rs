//! What every scenario needs: a fresh filesystem, files whose blocks are known, policies armed at
//! the right moment, the three views of a byte range, eviction, and the kernel log.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::{Fs, Step, StepError, SuiteConfig, Target};
use crate::control::{Control, FaultRecord};
use crate::kmsg::{Kmsg, KmsgLine};
use crate::os::btrfs;
use crate::os::fiemap::{self, Extent};
use crate::os::mapping::{Mapping, SigBus, resident_pages};
use crate::os::pageflags::{PageState, page_state};
use crate::os::{self, outcome};
use crate::pattern::{self, Pattern};
use crate::policy::{FailPolicy, Op, merge_ranges};

/// A scenario's world: the export, the mounted filesystem and the kernel log since it began.
pub struct Env<'a> {
    pub control: &'a Control,
    pub device: PathBuf,
    pub mnt: PathBuf,
    pub target: Target,
    pub delay: Duration,
    kmsg: Option<Kmsg>,
    log: Vec<KmsgLine>,
    mounted: bool,
    triggers: u32,
    /// The fault-log records of the last armed window, for error messages.
    last_records: Vec<Value>,
}

/// A file the scenario made, with the writer's descriptor kept open (so the inode, and the error
/// state it carries, stays in memory) and its extents.
pub struct TestFile {
    pub path: PathBuf,
    pub writer: File,
    pub len: u64,
    /// Where the file's bytes are on the device (for btrfs translated from its logical
    /// addresses through the chunk tree).
    pub extents: Vec<Extent>,
    pub fs: Fs,
}

impl TestFile {
    /// Opens another description of the file, read-write.
    pub fn open_again(&self) -> Result<File, StepError> {
        OpenOptions::new().read(true).write(true).open(&self.path).step("open the file again")
    }

    /// The device byte ranges behind file bytes `offset..offset + len`.
    pub fn device_ranges(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        merge_ranges(fiemap::device_ranges(&self.extents, offset, len))
    }

    /// Re-reads the extent map (after fallocate or allocation).
    pub fn refresh_extents(&mut self, len: u64) -> Result<(), StepError> {
        self.extents = device_extents(self.fs, &self.writer, len, false)?;
        Ok(())
    }
}

/// FIEMAP of `file`'s first `len` bytes, with device offsets: on btrfs FIEMAP answers in logical
/// addresses, mapped to the device through the chunk tree (an extent outside every chunk is
/// marked unknown, so nothing treats it as located).
fn device_extents(fs: Fs, file: &File, len: u64, sync: bool) -> Result<Vec<Extent>, StepError> {
    let extents = fiemap::extents(file, 0, len, sync).step("FIEMAP the file")?;
    if fs != Fs::Btrfs {
        return Ok(extents);
    }
    let chunks = btrfs::chunks(file).step("read the btrfs chunk tree")?;
    Ok(extents
        .into_iter()
        .map(|mut e| {
            if e.located() {
                match btrfs::logical_to_device(&chunks, e.physical, e.physical + e.length).first() {
                    Some((start, _)) => e.physical = *start,
                    None => e.flags |= fiemap::EXTENT_UNKNOWN,
                }
            }
            e
        })
        .collect())
}

/// A policy on the export whose trigger is armed.
pub struct Armed {
    pub policy: FailPolicy,
    /// The fault log's last sequence number before arming.
    since: u64,
}

/// One byte range as seen through an mmap load, read() and the server's disk.
pub struct Views {
    pub offset: u64,
    pub mmap: Option<Result<Vec<u8>, SigBus>>,
    pub read: Result<Vec<u8>, String>,
    pub disk: Result<Vec<u8>, String>,
}

impl Views {
    pub fn mmap_bytes(&self) -> Option<&[u8]> {
        self.mmap.as_ref().and_then(|m| m.as_ref().ok()).map(Vec::as_slice)
    }

    pub fn read_bytes(&self) -> Option<&[u8]> {
        self.read.as_ref().ok().map(Vec::as_slice)
    }

    pub fn disk_bytes(&self) -> Option<&[u8]> {
        self.disk.as_ref().ok().map(Vec::as_slice)
    }

    /// What each view holds, and where pairs of views first differ.
    pub fn evidence(&self) -> Value {
        let o = self.offset;
        let mut ev = serde_json::Map::new();
        if let Some(m) = &self.mmap {
            ev.insert(
                "mmap".into(),
                match m {
                    Ok(b) => pattern::describe(o, b),
                    Err(bus) => json!({ "sigbus_at_mapping_offset": bus.offset }),
                },
            );
        }
        ev.insert(
            "read".into(),
            match &self.read {
                Ok(b) => pattern::describe(o, b),
                Err(e) => json!({ "error": e }),
            },
        );
        ev.insert(
            "disk".into(),
            match &self.disk {
                Ok(b) => pattern::describe(o, b),
                Err(e) => json!({ "error": e }),
            },
        );
        let pairs = [
            ("mmap_vs_read", self.mmap_bytes(), self.read_bytes()),
            ("read_vs_disk", self.read_bytes(), self.disk_bytes()),
            ("mmap_vs_disk", self.mmap_bytes(), self.disk_bytes()),
        ];
        for (name, a, b) in pairs {
            if let (Some(a), Some(b)) = (a, b)
                && let Some(d) = pattern::first_difference(o, a, b)
            {
                ev.insert(format!("first_difference_{name}"), d);
            }
        }
        Value::Object(ev)
    }
}

/// The state of the first pages of a mapping, as the kernel reports it at one moment.
pub struct PageStates(Vec<std::io::Result<PageState>>);

impl PageStates {
    pub fn of(map: &Mapping, pages: usize) -> Self {
        PageStates((0..pages).map(|i| page_state(map.address(i * crate::os::page_size()))).collect())
    }

    /// Whether any page is in the thread's bug state (mapped, not Uptodate); `None` when some
    /// page's flags could not be read.
    pub fn any_mapped_but_not_uptodate(&self) -> Option<bool> {
        self.0
            .iter()
            .map(|s| s.as_ref().ok().and_then(PageState::mapped_but_not_uptodate))
            .collect::<Option<Vec<bool>>>()
            .map(|states| states.into_iter().any(|b| b))
    }

    pub fn first(&self) -> Option<&PageState> {
        self.0.first().and_then(|s| s.as_ref().ok())
    }

    pub fn evidence(&self) -> Value {
        json!(
            self.0
                .iter()
                .map(|s| s.as_ref().map(|s| json!(s)).unwrap_or_else(|e| json!({ "error": e.to_string() })))
                .collect::<Vec<_>>()
        )
    }
}

/// Pushes periodic background writeback an hour away for the suite's lifetime, so pages are
/// written back when a scenario says so. (Zero would be worse: the flusher is then kicked at once
/// whenever an inode is dirtied.) Restores the old settings on drop.
pub struct QuietWriteback {
    _settings: [os::Setting; 2],
}

const EXPIRE: &str = "/proc/sys/vm/dirty_expire_centisecs";
const WRITEBACK: &str = "/proc/sys/vm/dirty_writeback_centisecs";

pub fn quiet_background_writeback() -> std::io::Result<QuietWriteback> {
    Ok(QuietWriteback { _settings: [os::Setting::set(EXPIRE, "360000")?, os::Setting::set(WRITEBACK, "360000")?] })
}

impl<'a> Env<'a> {
    /// Heals and resets the export, makes a fresh filesystem and mounts it.
    pub fn prepare(config: &'a SuiteConfig, target: Target) -> Result<Self, StepError> {
        let mut env = Env {
            control: &config.control,
            device: config.device.clone(),
            mnt: config.mountpoint.clone(),
            target,
            delay: config.delay,
            kmsg: Kmsg::open().ok(),
            log: Vec::new(),
            mounted: false,
            triggers: 0,
            last_records: Vec::new(),
        };
        env.heal()?;
        // Back to the pristine contents: zeros for a memory export, the base image for an
        // overlay. A base image that already holds the filesystem (the VM harness makes one per
        // filesystem) saves an mkfs per scenario; otherwise, or when the export cannot reset
        // (a file export), make a fresh one.
        let reset = env.control.reset().is_ok();
        os::flush_buffers(&env.device).step("flush the device's buffer cache")?;
        let (at, len) = super::layout::probe_range(target.fs);
        let pristine =
            reset && env.control.read_data(at, len).is_ok_and(|probe| super::layout::has_filesystem(target.fs, &probe));
        if !pristine {
            target.fs.make(&env.device).step("make the filesystem")?;
        }
        target.fs.mount(&env.device, &env.mnt).step("mount the filesystem")?;
        env.mounted = true;
        Ok(env)
    }

    pub fn fs(&self) -> Fs {
        self.target.fs
    }

    /// Removes the policy: every request passes through again.
    pub fn heal(&self) -> Result<(), StepError> {
        match self.control.delete_policy() {
            Ok(()) => Ok(()),
            // No policy to remove is fine.
            Err(error) if error.status() == Some(404) => Ok(()),
            Err(e) => Err(StepError::new("remove the policy", e)),
        }
    }

    /// Unmounts (healing first), and returns the kernel log lines of the scenario.
    pub fn finish(mut self) -> Vec<String> {
        let _ = self.heal();
        if self.mounted {
            self.unmount_quietly();
        }
        self.kernel_log();
        self.log.iter().map(|l| format!("[{:>6}.{:06}] {}", l.usec / 1_000_000, l.usec % 1_000_000, l.text)).collect()
    }

    fn unmount_quietly(&mut self) {
        for _ in 0..5 {
            if os::umount(&self.mnt).is_ok() {
                self.mounted = false;
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Something still holds it: detach it so the next scenario can mount afresh.
        let target = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        self.mounted = false;
    }

    /// Notes that the filesystem was unmounted by the scenario itself.
    pub fn mark_unmounted(&mut self) {
        self.mounted = false;
    }

    /// Unmounts and mounts again: every inode and page of the filesystem leaves memory.
    pub fn remount(&mut self) -> Result<(), StepError> {
        os::umount(&self.mnt).step("unmount")?;
        self.mounted = false;
        self.fs().mount(&self.device, &self.mnt).step("mount again")?;
        self.mounted = true;
        Ok(())
    }

    /// New kernel log lines since the last call (all of them are kept for the scenario's evidence).
    pub fn kernel_log(&mut self) -> Vec<KmsgLine> {
        let fresh = self.kmsg.as_mut().and_then(|k| k.drain().ok()).unwrap_or_default();
        self.log.extend(fresh.iter().cloned());
        fresh
    }

    /// Every kernel log line of the scenario so far.
    pub fn whole_log(&mut self) -> &[KmsgLine] {
        self.kernel_log();
        &self.log
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.mnt.join(name)
    }

    /// Creates `name` holding `pattern` for `len` bytes, fsynced, with its extents mapped.
    pub fn create(&self, name: &str, fill: Pattern, len: u64) -> Result<TestFile, StepError> {
        let path = self.path(name);
        let mut writer = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .step("create the file")?;
        writer.write_all(&fill.bytes(0, len as usize)).step("write the first contents")?;
        writer.sync_all().step("fsync the first contents")?;
        let extents = device_extents(self.fs(), &writer, len, true)?;
        let file = TestFile { path, writer, len, extents, fs: self.fs() };
        let covered: u64 = file.device_ranges(0, len).iter().map(|(s, e)| e - s).sum();
        if covered != len {
            return Err(StepError::new(
                "map the file's blocks",
                format!("FIEMAP located {covered} of {len} bytes: {:?}", file.extents),
            ));
        }
        Ok(file)
    }

    fn next_trigger(&mut self) -> String {
        self.triggers += 1;
        format!("go-{}", self.triggers)
    }

    /// Puts a policy failing `op` requests in `ranges` (everywhere when empty) and arms its
    /// trigger: from now on the server fails them. Arm before dirtying the pages, not just before
    /// starting writeback: the kernel may write them back on its own within a second (a new
    /// device's share of the dirty threshold is tiny), and those writes must fail too.
    pub fn fail(&mut self, op: Op, ranges: Vec<(u64, u64)>, name: &str) -> Result<Armed, StepError> {
        self.fail_matching(op, ranges, None, name)
    }

    /// [`Self::fail`], only for requests whose FUA flag is `fua`.
    pub fn fail_matching(
        &mut self,
        op: Op,
        ranges: Vec<(u64, u64)>,
        fua: Option<bool>,
        name: &str,
    ) -> Result<Armed, StepError> {
        let policy = FailPolicy {
            name: name.to_string(),
            op,
            ranges: merge_ranges(ranges),
            trigger: self.next_trigger(),
            delay: self.delay,
            fua,
        };
        self.control.put_policy(&policy.to_yaml()).step("put the policy")?;
        let since = self.control.last_fault_seq().step("read the fault log")?;
        self.control.arm(&policy.trigger).step("arm the trigger")?;
        Ok(Armed { policy, since })
    }

    /// Disarms and returns the requests in the policy's ranges the server failed while armed.
    pub fn disarm(&mut self, armed: &Armed) -> Result<Vec<FaultRecord>, StepError> {
        let policy = &armed.policy;
        self.control.disarm(&policy.trigger).step("disarm the trigger")?;
        let records = self.control.faults_since(armed.since).step("read the fault log")?;
        self.last_records = records.iter().map(crate::control::record_json).collect();
        Ok(records
            .into_iter()
            .filter(|r| r.failed())
            .filter(|r| policy.ranges.is_empty() || policy.ranges.iter().any(|(s, e)| r.overlaps(*s, *e)))
            .collect())
    }

    /// sync() (starts writeback and waits for it, consuming nobody's error report), then disarms
    /// and heals. Errors when no request in the policy's ranges failed: then the scenario did not
    /// test what it meant to.
    pub fn sync_and_heal(&mut self, armed: Armed) -> Result<Vec<FaultRecord>, StepError> {
        os::sync();
        let failed = self.disarm(&armed)?;
        self.heal()?;
        if failed.is_empty() {
            return Err(StepError::new(
                "fail the writeback",
                format!(
                    "the server failed no {:?} request in {:?} while the trigger was armed; the fault log recorded {} request(s) then: {}",
                    armed.policy.op,
                    armed.policy.ranges,
                    self.last_records.len(),
                    Value::Array(self.last_records.iter().take(5).cloned().collect())
                ),
            ));
        }
        Ok(failed)
    }

    /// The device ranges a write of file bytes `offset..offset + len` goes to. In place on XFS
    /// and ext4: the file's blocks. Copy-on-write on btrfs: somewhere in the data block groups,
    /// so all of them (nothing else writes data while a scenario runs).
    pub fn write_ranges(&self, file: &TestFile, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, StepError> {
        match self.fs() {
            Fs::Btrfs => {
                let chunks = btrfs::chunks(&file.writer).step("read the btrfs chunk tree")?;
                Ok(merge_ranges(btrfs::ranges_of_kind(&chunks, btrfs::BLOCK_GROUP_DATA)))
            }
            Fs::Xfs | Fs::Ext4 => Ok(file.device_ranges(offset, len)),
        }
    }

    /// The bytes the server stores for file bytes `offset..offset + len`. On btrfs the extent map
    /// is read again first: a successful copy-on-write moves the file's blocks.
    pub fn disk(&self, file: &TestFile, offset: u64, len: u64) -> Result<Vec<u8>, String> {
        let moved;
        let extents = if self.fs() == Fs::Btrfs {
            moved = device_extents(Fs::Btrfs, &file.writer, offset + len, false).map_err(|e| e.to_string())?;
            &moved
        } else {
            &file.extents
        };
        let ranges = fiemap::device_ranges(extents, offset, len);
        let covered: u64 = ranges.iter().map(|(s, e)| e - s).sum();
        if covered != len {
            return Err(format!("only {covered} of {len} bytes have blocks"));
        }
        let mut out = Vec::with_capacity(len as usize);
        for (start, end) in ranges {
            out.extend(self.control.read_data(start, end - start).map_err(|e| e.to_string())?);
        }
        Ok(out)
    }

    /// Writes `data` straight into the server's storage at the file's blocks for `offset`.
    pub fn seed(&self, file: &TestFile, offset: u64, data: &[u8]) -> Result<(), StepError> {
        let mut done = 0u64;
        for (start, end) in fiemap::device_ranges(&file.extents, offset, data.len() as u64) {
            let n = end - start;
            self.control.write_data(start, &data[done as usize..(done + n) as usize]).step("seed the disk")?;
            done += n;
        }
        if done != data.len() as u64 {
            return Err(StepError::new("seed the disk", format!("only {done} of {} bytes have blocks", data.len())));
        }
        Ok(())
    }

    /// All three views of file bytes `offset..offset + len`.
    pub fn views(&self, file: &TestFile, mapping: Option<&Mapping>, offset: u64, len: u64) -> Result<Views, StepError> {
        let mmap = match mapping {
            Some(m) => Some(m.load(offset as usize, len as usize).step("load through the mapping")?),
            None => None,
        };
        Ok(Views { offset, mmap, read: read_at(&file.writer, offset, len), disk: self.disk(file, offset, len) })
    }

    /// Drops the file's clean, unmapped pages (fadvise DONTNEED, then drop_caches) and returns
    /// which of its pages are still cached.
    pub fn evict(&self, file: &File, len: u64) -> Result<Vec<bool>, StepError> {
        for _ in 0..3 {
            os::fadvise_dontneed(file).step("POSIX_FADV_DONTNEED")?;
            os::drop_caches().step("drop_caches")?;
            let resident = resident_pages(file, len as usize).step("mincore")?;
            if !resident.iter().any(|r| *r) {
                return Ok(resident);
            }
        }
        resident_pages(file, len as usize).step("mincore")
    }

    /// Drops metadata buffers too: XFS frees a buffer only after several shrinker passes.
    pub fn drop_metadata(&self) -> Result<(), StepError> {
        for _ in 0..8 {
            os::drop_caches().step("drop_caches")?;
        }
        Ok(())
    }

    /// Whether the filesystem still takes a write and an fsync, with the outcomes.
    pub fn still_writable(&self) -> Value {
        let path = self.path("health-probe");
        let result = OpenOptions::new().create(true).truncate(true).write(true).open(&path).and_then(|mut f| {
            f.write_all(b"probe")?;
            f.sync_all()
        });
        let _ = std::fs::remove_file(&path);
        json!({ "write_and_fsync_new_file": outcome(&result) })
    }
}

/// `pread` of exactly `len` bytes, or the errno's name.
pub fn read_at(file: &File, offset: u64, len: u64) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len as usize];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => Ok(buf),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err("short read (past end of file)".into()),
        Err(e) => Err(outcome(&Err(e))),
    }
}

/// The kernel log lines as strings, for evidence.
pub fn log_texts(lines: &[&KmsgLine]) -> Value {
    json!(lines.iter().map(|l| l.text.clone()).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pattern::{NEW, OLD};

    #[test]
    fn views_evidence_names_each_view_and_the_first_differences() {
        let views = Views {
            offset: 4096,
            mmap: Some(Ok(NEW.bytes(4096, 64))),
            read: Ok(NEW.bytes(4096, 64)),
            disk: Ok(OLD.bytes(4096, 64)),
        };
        let ev = views.evidence();
        assert_eq!(ev["mmap"]["content"], "new");
        assert_eq!(ev["disk"]["content"], "old");
        assert!(ev.get("first_difference_mmap_vs_read").is_none());
        assert_eq!(ev["first_difference_read_vs_disk"]["file_offset"], 4096);
        assert_eq!(ev["first_difference_mmap_vs_disk"]["b"], String::from_utf8(OLD.bytes(4096, 16)).unwrap());
    }

    #[test]
    fn views_evidence_records_errors_and_sigbus() {
        let views =
            Views { offset: 0, mmap: Some(Err(SigBus { offset: 8 })), read: Err("EIO".into()), disk: Err("x".into()) };
        let ev = views.evidence();
        assert_eq!(ev["mmap"]["sigbus_at_mapping_offset"], 8);
        assert_eq!(ev["read"]["error"], "EIO");
    }

    #[test]
    fn read_at_names_errno_and_short_reads() {
        let path = std::env::temp_dir().join(format!("nbdfault-env-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_at(&file, 0, 3).unwrap(), b"abc");
        assert!(read_at(&file, 0, 10).unwrap_err().contains("short read"));
        std::fs::remove_file(path).unwrap();
    }
}
