//! The error lives in the in-core inode: once the inode is evicted before anyone asked, fsync on
//! the file opened again has nothing to report (invariant 6, a documented limitation). The
//! superblock keeps its own record of it for syncfs (since 5.8), which survives the eviction.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use serde_json::json;

use super::env::{Env, read_at};
use super::errseq::syncfs_reports;
use super::{CheckSpec, Findings, Scenario, Step, StepError, always_holds};
use crate::invariants::Class::{Guaranteed as G, VersionDependent as VD};
use crate::os::mapping::resident_pages;
use crate::os::{self, outcome};
use crate::pattern::{NEW, OLD, classify};
use crate::policy::Op;

pub static SCENARIO: Scenario = Scenario {
    name: "eviction",
    about: "the inode is evicted before anyone saw the error: what fsync and syncfs on a new open report",
    checks: &[
        CheckSpec::new(
            "eviction.error-lost",
            6,
            G,
            "once the inode is evicted before anyone saw the error, fsync on the reopened file returns 0: the error is lost (documented limitation)",
            always_holds,
        ),
        CheckSpec::new(
            "eviction.syncfs-still-reports",
            9,
            VD,
            "syncfs on the reopened file still reports the error: the superblock kept it through the eviction",
            syncfs_reports,
        ),
    ],
    run,
};

const LEN: u64 = 16 * 1024;

/// `/proc/sys/fs/inode-nr`: inodes allocated and free, for evidence that inodes went.
fn inode_counts() -> serde_json::Value {
    let text = std::fs::read_to_string("/proc/sys/fs/inode-nr").unwrap_or_default();
    let n: Vec<u64> = text.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    json!({ "nr_inodes": n.first(), "nr_free_inodes": n.get(1) })
}

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let file = env.create("eviction", OLD, LEN)?;
    let policy = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    file.writer.write_all_at(&NEW.bytes(0, LEN as usize), 0).step("write()")?;
    let failed = env.sync_and_heal(policy)?;
    // Close every description: nothing holds the inode any more. Then drop_caches frees the
    // dentry, and with it the inode (and its page cache, and its wb_err).
    let path = file.path.clone();
    let before = inode_counts();
    drop(file);
    for _ in 0..3 {
        os::drop_caches().step("drop_caches")?;
    }
    let after = inode_counts();
    let reopened = OpenOptions::new().read(true).write(true).open(&path).step("open the file again")?;
    let resident = resident_pages(&reopened, LEN as usize).step("mincore")?;
    let fsync = outcome(&os::fsync(&reopened));
    let read = read_at(&reopened, 0, LEN);
    let syncfs = outcome(&os::syncfs(&reopened));
    let ev = json!({
        "failed_requests": failed.len(),
        "inodes_before_drop_caches": before,
        "inodes_after_drop_caches": after,
        "resident_pages_after_reopen": resident,
        "fsync_on_reopened": fsync,
        "read_after_reopen": read.as_ref().map(|b| classify(0, b)).map_err(Clone::clone),
        "syncfs_on_reopened": syncfs,
    });
    if resident.iter().any(|r| *r) {
        let why = "the file's pages stayed cached after every description was closed and caches dropped, so the inode was not evicted";
        for id in ["eviction.error-lost", "eviction.syncfs-still-reports"] {
            f.set(id, crate::report::Verdict::NotApplicable, Some(why.into()), ev.clone());
        }
        return Ok(());
    }
    f.judge(
        "eviction.error-lost",
        fsync == "0",
        format!("fsync on the reopened file returned {fsync}: the error outlived the inode"),
        ev.clone(),
    );
    f.judge(
        "eviction.syncfs-still-reports",
        syncfs == "EIO",
        format!("syncfs on the reopened file returned {syncfs}"),
        ev,
    );
    Ok(())
}
