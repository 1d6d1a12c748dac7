//! The journal's own requests fail: a cache flush (NBD_CMD_FLUSH, sent for REQ_PREFLUSH and
//! blkdev_issue_flush) or a write with FUA (the commit block of ext4's journal, XFS's log
//! writes). What do ext4 (data=ordered) and XFS do, what does fsync return, and what do a mapped
//! page and read() show afterwards?

use std::os::unix::fs::FileExt;

use serde_json::json;

use super::env::{Env, PageStates, log_texts};
use super::logfail::page_kept;
use super::views::SHUTDOWN_LINES;
use super::{CheckSpec, Findings, Scenario, Step, StepError, always_holds, unknown};
use crate::invariants::Class::{Guaranteed as G, KnownBug as BUG, SetupDependent as SETUP};
use crate::kmsg::matching;
use crate::os::mapping::Mapping;
use crate::os::{self, outcome};
use crate::pattern::{NEW, OLD, classify};
use crate::policy::Op;
use crate::report::Verdict;

pub static FLUSH: Scenario = Scenario {
    name: "flush-failure",
    about: "the cache flush behind fsync fails: fsync's answer, shutdown or abort, mmap and read()",
    checks: &[
        CheckSpec::new("flush.fsync-reports", 1, G, "fsync returns EIO when its cache flush fails", always_holds),
        CheckSpec::new(
            "flush.shuts-down",
            26,
            SETUP,
            "a failed cache flush shuts XFS down or aborts the ext4 journal",
            unknown,
        ),
        CheckSpec::new(
            "flush.mmap-read-agree",
            14,
            BUG,
            "after the failed flush, an mmap load and read() of the dirtied pages agree (or, if read() is refused, the mapped pages stay Uptodate)",
            page_kept,
        ),
    ],
    run: |e, f| run(e, f, Kind::Flush),
};

pub static FUA: Scenario = Scenario {
    name: "fua-failure",
    about: "every write with FUA fails (journal commit blocks, log writes): fsync, shutdown or abort, mmap and read()",
    checks: &[
        CheckSpec::new(
            "fua.fsync-reports",
            1,
            G,
            "fsync returns an error when the journal's FUA write fails",
            always_holds,
        ),
        CheckSpec::new(
            "fua.shuts-down",
            26,
            G,
            "a failed FUA write of the log or journal shuts XFS down or aborts the ext4 journal",
            always_holds,
        ),
        CheckSpec::new(
            "fua.mmap-read-agree",
            14,
            BUG,
            "after the failed FUA write, an mmap load and read() of the dirtied pages agree (or, if read() is refused, the mapped pages stay Uptodate)",
            page_kept,
        ),
    ],
    run: |e, f| run(e, f, Kind::Fua),
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Flush,
    Fua,
}

const LEN: u64 = 16 * 1024;

fn run(env: &mut Env, f: &mut Findings, kind: Kind) -> Result<(), StepError> {
    let prefix = if kind == Kind::Flush { "flush" } else { "fua" };
    let file = env.create("journal", OLD, LEN)?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    env.kernel_log();
    let armed = match kind {
        Kind::Flush => env.fail(Op::Flush, Vec::new(), "fail-flush")?,
        Kind::Fua => env.fail_matching(Op::Write, Vec::new(), Some(true), "fail-fua-writes")?,
    };
    // Dirty data (one page through the mapping, one with write()) and metadata (a new file), so
    // fsync has both data and a journal commit to make durable.
    map.store(0, &NEW.bytes(0, 4096)).step("store")?.map_err(|b| StepError::new("store", b))?;
    file.writer.write_all_at(&NEW.bytes(4096, 4096), 4096).step("write()")?;
    let side = std::fs::File::create(env.path("new-file")).and_then(|g| {
        g.write_all_at(b"metadata", 0)?;
        Ok(g)
    });
    let fsync_new = side.as_ref().map(|g| outcome(&os::fsync(g))).unwrap_or_else(|e| format!("create failed: {e}"));
    let first = outcome(&os::fsync(&file.writer));
    let failed = env.disarm(&armed)?;
    env.heal()?;
    if failed.is_empty() {
        return Err(StepError::new(
            "fail the journal's requests",
            format!(
                "the server failed no {} request (fsync returned {first})",
                if kind == Kind::Flush { "flush" } else { "FUA write" }
            ),
        ));
    }
    let second = outcome(&os::fsync(&file.writer));
    let health = env.still_writable();
    let lines = env.kernel_log();
    let gave_up = matching(&lines, SHUTDOWN_LINES);
    let views = env.views(&file, Some(&map), 0, 8192)?;
    let states = PageStates::of(&map, 2);
    let ev = json!({
        "failed_requests": failed.len(),
        "first_failed": crate::control::record_json(&failed[0]),
        "fsync_of_a_new_file": fsync_new,
        "fsync": first,
        "fsync_again_after_healing": second,
        "health_after": health,
        "shutdown_lines": log_texts(&gave_up),
        "views_pages_0_1": views.evidence(),
        "page_flags": states.evidence(),
    });
    let reported = first != "0" || fsync_new != "0";
    f.judge(
        &format!("{prefix}.fsync-reports"),
        reported,
        format!("fsync returned {first} (and {fsync_new} for the new file)"),
        ev.clone(),
    );
    let down = !gave_up.is_empty() || health["write_and_fsync_new_file"] != "0";
    f.judge(
        &format!("{prefix}.shuts-down"),
        down,
        "the filesystem neither logged a shutdown or abort nor refused a new write and fsync",
        ev.clone(),
    );
    let id = format!("{prefix}.mmap-read-agree");
    let what = format!(
        "mmap shows {}, read() {}",
        views.mmap_bytes().map(|b| classify(0, b)).unwrap_or("SIGBUS"),
        views.read.as_ref().map(|b| classify(0, b).to_string()).unwrap_or_else(|e| format!("fails with {e}"))
    );
    match (views.mmap_bytes(), &views.read) {
        (Some(m), Ok(r)) => f.judge(&id, m == r.as_slice(), what, ev),
        (None, Ok(_)) => f.set(&id, Verdict::Violated, Some(what), ev),
        // A shut-down XFS refuses read(): what matters then is whether the mapped pages are
        // still Uptodate (the mapping shows what the page cache holds) or the thread's state.
        (_, Err(_)) => match states.any_mapped_but_not_uptodate() {
            Some(true) => {
                f.set(&id, Verdict::Violated, Some(format!("{what}; a mapped page is no longer Uptodate")), ev)
            }
            Some(false) => f.set(&id, Verdict::Holds, Some(format!("{what}; the mapped pages are still Uptodate")), ev),
            None => f.set(&id, Verdict::NotApplicable, Some(format!("{what}; the page flags are unreadable")), ev),
        },
    }
    Ok(())
}
