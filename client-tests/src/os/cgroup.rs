//! A memory cgroup (v2) to evict a file's pages by memory pressure, the way reclaim does when
//! memory runs short, instead of drop_caches: pages charged to the group are reclaimed through
//! `memory.reclaim` (5.19 and later) or by lowering `memory.high` below what the group uses.

use std::io;
use std::path::{Path, PathBuf};

const ROOT: &str = "/sys/fs/cgroup";

/// A child of the root cgroup with the memory controller. The process leaves it and it is
/// removed on drop.
pub struct MemoryCgroup {
    dir: PathBuf,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

impl MemoryCgroup {
    /// Mounts cgroup2 at /sys/fs/cgroup if nothing is there (the guest's init mounts none),
    /// enables the memory controller for the root's children and makes `name`.
    pub fn create(name: &str) -> io::Result<MemoryCgroup> {
        let root = Path::new(ROOT);
        if !root.join("cgroup.controllers").exists() {
            std::fs::create_dir_all(root)?;
            super::mount(Path::new("cgroup2"), root, "cgroup2", "")?;
        }
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))?;
        if !controllers.split_whitespace().any(|c| c == "memory") {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "the kernel has no memory cgroup controller"));
        }
        write(&root.join("cgroup.subtree_control"), "+memory")?;
        let dir = root.join(name);
        if !dir.exists() {
            std::fs::create_dir(&dir)?;
        }
        Ok(MemoryCgroup { dir })
    }

    /// Moves this process in: page cache it fills from now on is charged to the group.
    pub fn enter(&self) -> io::Result<()> {
        write(&self.dir.join("cgroup.procs"), &std::process::id().to_string())
    }

    /// Moves this process back to the root; what the group was charged stays charged to it.
    pub fn leave(&self) -> io::Result<()> {
        write(&Path::new(ROOT).join("cgroup.procs"), &std::process::id().to_string())
    }

    /// `memory.current`: bytes charged to the group.
    pub fn current(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join("memory.current")).ok()?.trim().parse().ok()
    }

    /// Reclaims everything it can from the group and says how. Call it after [`Self::leave`], so
    /// no task of ours is throttled by a lowered limit.
    pub fn reclaim(&self) -> io::Result<&'static str> {
        let proactive = self.dir.join("memory.reclaim");
        if proactive.exists() {
            // Asks reclaim for more than the group holds: EAGAIN once nothing more can go.
            for _ in 0..3 {
                let _ = std::fs::write(&proactive, "1G");
            }
            return Ok("memory.reclaim");
        }
        // Before 5.19: a memory.high below the usage makes the writer reclaim down to it.
        let high = self.dir.join("memory.high");
        let result = write(&high, "0");
        write(&high, "max")?;
        result.map(|()| "memory.high=0")
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        let _ = self.leave();
        let _ = std::fs::remove_dir(&self.dir);
    }
}
