//! A failed log (XFS) or journal (ext4) write, on purpose: XFS shuts down and ext4 aborts its
//! journal. On XFS this is also a way to the thread's bug state on 5.10: the dirty
//! mapped page's writeback then fails at submission, which cleared Uptodate before 5.19.

use std::os::unix::fs::FileExt;

use serde_json::json;

use super::env::{Env, PageStates, log_texts};
use super::layout::{ext4_journal_ranges, xfs_log_range};
use super::submission::submission_fixed;
use super::views::SHUTDOWN_LINES;
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, Target, always_holds};
use crate::invariants::Class::{Guaranteed as G, KnownBug as BUG, SetupDependent as SETUP};
use crate::kmsg::matching;
use crate::os::mapping::Mapping;
use crate::os::{self, outcome};
use crate::pattern::{NEW, OLD, REDIRTY, classify};
use crate::policy::Op;
use crate::report::Verdict;

/// ext4 leaves the pages dirty and Uptodate after an abort; XFS follows the submission rule.
pub(super) fn page_kept(t: &Target) -> Option<Verdict> {
    match t.fs {
        Fs::Xfs => submission_fixed(t),
        Fs::Ext4 => Some(Verdict::Holds),
        Fs::Btrfs => None,
    }
}

pub static SCENARIO: Scenario = Scenario {
    name: "log-failure",
    about: "fail the XFS log or ext4 journal: shutdown, then what the dirty mapped page shows",
    checks: &[
        CheckSpec::new(
            "logfail.shuts-down",
            26,
            G,
            "a log or journal write error shuts XFS down or aborts the ext4 journal",
            always_holds,
        ),
        CheckSpec::new(
            "logfail.mapped-page-uptodate",
            14,
            BUG,
            "after the shutdown, writeback of a dirty mapped page leaves it Uptodate",
            page_kept,
        ),
        CheckSpec::new(
            "logfail.store-sigbus",
            21,
            SETUP,
            "a store on the shut-down XFS raises SIGBUS while loads of mapped pages work",
            always_holds,
        )
        .only(Fs::Xfs),
        CheckSpec::new(
            "logfail.dirty-pages-kept",
            28,
            SETUP,
            "after the journal abort, the dirty page stays dirty and Uptodate (never written back)",
            always_holds,
        )
        .only(Fs::Ext4),
    ],
    run,
};

const LEN: u64 = 16 * 1024;

fn log_ranges(env: &Env) -> Result<Vec<(u64, u64)>, StepError> {
    match env.fs() {
        Fs::Xfs => {
            let sb = env.control.read_data(0, 512).step("read the XFS superblock")?;
            Ok(vec![xfs_log_range(&sb).step("find the XFS log")?])
        }
        Fs::Ext4 => {
            let sb = env.control.read_data(1024, 1024).step("read the ext4 superblock")?;
            ext4_journal_ranges(&sb).step("find the ext4 journal")
        }
        // btrfs has no log area: every metadata write is copy-on-write into the metadata (and
        // system) block groups, both copies. Failing them is its equivalent.
        Fs::Btrfs => {
            let mnt = std::fs::File::open(&env.mnt).step("open the mount point")?;
            let chunks = crate::os::btrfs::chunks(&mnt).step("read the btrfs chunk tree")?;
            let kinds = crate::os::btrfs::BLOCK_GROUP_METADATA | crate::os::btrfs::BLOCK_GROUP_SYSTEM;
            Ok(crate::os::btrfs::ranges_of_kind(&chunks, kinds))
        }
    }
}

fn create_and_fsync(env: &Env, name: &str) -> String {
    let result =
        std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(env.path(name)).and_then(|f| {
            f.write_all_at(b"log", 0)?;
            f.sync_all()
        });
    outcome(&result)
}

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let fs = env.fs();
    let file = env.create("log-failure", OLD, LEN)?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    map.store(0, &NEW.bytes(0, 4096)).step("store")?.map_err(|b| StepError::new("store", b))?;
    file.writer.write_all_at(&NEW.bytes(4096, 4096), 4096).step("write()")?;
    map.load(4096, 4096).step("load page 1")?.map_err(|b| StepError::new("load", b))?;
    let ranges = log_ranges(env)?;
    f.share("log_ranges", json!(ranges));

    let armed = env.fail(Op::Write, ranges, "fail-log")?;
    let first = create_and_fsync(env, "force-the-log");
    let failed = env.disarm(&armed)?;
    env.heal()?;
    if failed.is_empty() {
        return Err(StepError::new("fail the log", "the server failed no write to the log or journal"));
    }
    // ext4 notices the aborted journal when the next handle starts.
    let second = create_and_fsync(env, "after-the-abort");
    let lines = env.kernel_log();
    let gave_up = matching(&lines, SHUTDOWN_LINES);
    f.judge(
        "logfail.shuts-down",
        !gave_up.is_empty() && second != "0",
        "no shutdown or journal abort was logged, or the filesystem still takes fsync",
        json!({ "failed_log_writes": failed.len(), "fsync_that_forced_the_log": first, "fsync_after": second, "lines": log_texts(&gave_up) }),
    );

    // Writeback of the dirty pages now fails at submission (XFS) or is refused (ext4).
    let msync = outcome(&map.msync(true));
    let fsync = outcome(&os::fsync(&file.writer));
    let views = env.views(&file, Some(&map), 0, 8192)?;
    let states = PageStates::of(&map, 2);
    let ev = json!({ "msync": msync, "fsync": fsync, "views": views.evidence(), "page_flags": states.evidence() });
    let bug = states.any_mapped_but_not_uptodate();
    match bug {
        Some(b) => f.judge(
            "logfail.mapped-page-uptodate",
            !b,
            "a page is still mapped but no longer Uptodate (the 2020 thread's state)",
            ev.clone(),
        ),
        None => f.set(
            "logfail.mapped-page-uptodate",
            Verdict::NotApplicable,
            Some("the page flags are unreadable (no /proc/kpageflags, or not root)".into()),
            ev.clone(),
        ),
    }

    match fs {
        Fs::Xfs => {
            let stored = map.store(0, &REDIRTY.bytes(0, 16)).step("store after the shutdown")?;
            let load = map.load(4096, 16).step("load after the shutdown")?;
            f.judge(
                "logfail.store-sigbus",
                stored.is_err() && load.is_ok(),
                "the store did not raise SIGBUS, or the load of a mapped page failed",
                json!({
                    "store": stored.map(|()| "ok".to_string()).unwrap_or_else(|b| b.to_string()),
                    "load_page_1": load.as_ref().map(|b| classify(4096, b).to_string()).unwrap_or_else(|b| b.to_string()),
                    "before": ev,
                }),
            );
        }
        Fs::Btrfs => {}
        Fs::Ext4 => {
            let dirty = states.first().and_then(|s| s.dirty.zip(s.uptodate));
            let read = match &views.read {
                Ok(b) => classify(0, b).to_string(),
                Err(e) => format!("error {e}"),
            };
            match dirty {
                Some((d, u)) => f.judge(
                    "logfail.dirty-pages-kept",
                    d && u,
                    format!("the page is dirty: {d}, Uptodate: {u}"),
                    json!({ "read_after_abort": read, "before": ev }),
                ),
                None => f.set(
                    "logfail.dirty-pages-kept",
                    Verdict::NotApplicable,
                    Some("the page flags are unreadable".into()),
                    ev,
                ),
            }
        }
    }
    Ok(())
}
