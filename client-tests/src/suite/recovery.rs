//! After the error: a second error before anyone asked (one report), and what recovery looks like
//! once the server heals: fsync succeeds without the data, and only a new store brings it back.

use serde_json::json;

use super::env::Env;
use super::{CheckSpec, Findings, Scenario, Step, StepError, always_holds};
use crate::invariants::Class::Guaranteed as G;
use crate::os::mapping::Mapping;
use crate::os::{self, outcome};
use crate::pattern::{NEW, OLD, REDIRTY, classify};
use crate::policy::Op;
use std::os::unix::fs::FileExt;

pub static TWO_ERRORS: Scenario = Scenario {
    name: "two-errors",
    about: "two failed writebacks before any fsync give one report",
    checks: &[CheckSpec::new(
        "errseq.two-errors-one-report",
        12,
        G,
        "two writeback errors with no fsync between them are reported once",
        always_holds,
    )],
    run: run_two_errors,
};

pub static SCENARIO: Scenario = Scenario {
    name: "recovery",
    about: "heal the server, fsync again, store again",
    checks: &[
        CheckSpec::new(
            "recovery.fsync-after-heal-hides-loss",
            15,
            G,
            "after the report, fsync returns 0 once the server heals, yet the disk still has the old data",
            always_holds,
        ),
        CheckSpec::new(
            "recovery.store-redirties",
            20,
            G,
            "a store to the page after the error redirties it, and the next msync writes the whole page",
            always_holds,
        ),
    ],
    run: run_recovery,
};

const LEN: u64 = 16 * 1024;

fn store(map: &Mapping, offset: u64, data: &[u8]) -> Result<(), StepError> {
    map.store(offset as usize, data)
        .step("store through the mapping")?
        .map_err(|b| StepError::new("store through the mapping", b))
}

fn run_two_errors(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let file = env.create("two-errors", OLD, LEN)?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    let ranges = env.write_ranges(&file, 0, LEN)?;
    let first = env.fail(Op::Write, ranges.clone(), "fail-file-data")?;
    store(&map, 0, &NEW.bytes(0, 4096))?;
    let failed_first = env.sync_and_heal(first)?;
    let second = env.fail(Op::Write, ranges, "fail-file-data-again")?;
    store(&map, 0, &REDIRTY.bytes(0, 4096))?;
    let failed_second = env.sync_and_heal(second)?;
    let e1 = outcome(&os::fsync(&file.writer));
    let e2 = outcome(&os::fsync(&file.writer));
    f.judge(
        "errseq.two-errors-one-report",
        e1 == "EIO" && e2 == "0",
        format!("fsync returned {e1}, then {e2}"),
        json!({ "failed_requests": [failed_first.len(), failed_second.len()], "fsync": [e1, e2] }),
    );
    Ok(())
}

fn run_recovery(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let file = env.create("recovery", OLD, LEN)?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    let policy = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    store(&map, 0, &NEW.bytes(0, 4096))?;
    file.writer.write_all_at(&NEW.bytes(4096, 4096), 4096).step("write()")?;
    let failed = env.sync_and_heal(policy)?;
    f.share("failed_requests", json!(failed.len()));

    // The server is healthy again. The error is reported once, then fsync succeeds, but nothing
    // rewrites the clean pages: the disk keeps the old data.
    let e1 = outcome(&os::fsync(&file.writer));
    let e2 = outcome(&os::fsync(&file.writer));
    let disk = env.disk(&file, 0, 8192);
    let lost = disk.as_ref().is_ok_and(|d| OLD.matches(0, d));
    f.judge(
        "recovery.fsync-after-heal-hides-loss",
        e2 == "0" && lost,
        format!(
            "fsync returned {e1} then {e2}; the disk holds {}",
            disk.as_ref().map(|d| classify(0, d)).unwrap_or("?")
        ),
        json!({ "fsync": [e1, e2], "disk_pages_0_1": disk.as_ref().map(|d| classify(0, d)).map_err(Clone::clone) }),
    );

    // A store into the still-mapped page goes through page_mkwrite and dirties it again.
    let stored = map.store(0, &REDIRTY.bytes(0, 100)).step("store after the error")?;
    let msync = outcome(&map.msync(true));
    let page = env.disk(&file, 0, 4096);
    let whole_page = page.as_ref().is_ok_and(|p| REDIRTY.matches(0, &p[..100]) && NEW.matches(100, &p[100..]));
    let page1 = env.disk(&file, 4096, 4096);
    f.judge(
        "recovery.store-redirties",
        stored.is_ok() && msync == "0" && whole_page,
        "the store did not bring the page (with the earlier failed bytes) to disk",
        json!({
            "store": stored.map(|()| "ok".to_string()).unwrap_or_else(|b| b.to_string()),
            "msync": msync,
            "disk_page_0": page.as_ref().map(|p| json!({ "first_100": classify(0, &p[..100]), "rest": classify(100, &p[100..]) })).unwrap_or_else(|e| json!({ "error": e })),
            "disk_page_1_written_by_write_not_restored": page1.as_ref().map(|p| classify(4096, p)).map_err(Clone::clone),
        }),
    );
    Ok(())
}
