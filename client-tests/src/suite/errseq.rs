//! The errseq rules: which descriptions get the error report, and how many times, for fsync,
//! fdatasync, msync, sync_file_range and syncfs. One scenario per call, each on a fresh
//! filesystem, because every report consumes a cursor.
//!
//! Sequence: descriptions W (writer) and B (opened before the error); dirty a page through W's
//! mapping and one with write(); fail the writeback with sync() (which consumes no cursor); then
//! call on A (opened after the error, before anyone saw it), on W twice, on B, on a dup() of B,
//! and on C (opened after the error was reported).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::IntoRawFd;

use serde_json::json;

use super::env::Env;
use super::{CheckSpec, Findings, Scenario, Step, StepError, Target, always_holds};
use crate::invariants::Class::{Guaranteed as G, VersionDependent as VD};
use crate::os::mapping::Mapping;
use crate::os::{self, RangeSync, outcome};
use crate::pattern::{NEW, OLD};
use crate::policy::Op;
use crate::report::Verdict;

/// Per-descriptor syncfs reporting arrived in 5.8.
pub(super) fn syncfs_reports(t: &Target) -> Option<Verdict> {
    t.kernel.map(|k| if k.at_least(5, 8) { Verdict::Holds } else { Verdict::Violated })
}

/// Reporting to a late opener arrived in 4.17.
fn late_open_reports(t: &Target) -> Option<Verdict> {
    t.kernel.map(|k| if k.at_least(4, 17) { Verdict::Holds } else { Verdict::Violated })
}

macro_rules! errseq_checks {
    ($call:literal, $report_inv:literal, $report_class:expr, $once:literal, $dup:literal, $late_unseen:literal, $late_seen:literal, $late_class:expr, $expect:expr, $late_expect:expr) => {
        [
            CheckSpec::new(
                concat!($call, ".late-open-unseen"),
                $late_unseen,
                $late_class,
                concat!($call, " on a description opened after the error, before anyone saw it, returns EIO"),
                $late_expect,
            ),
            CheckSpec::new(
                concat!($call, ".writer"),
                $report_inv,
                $report_class,
                concat!($call, " on the description that wrote returns EIO"),
                $expect,
            ),
            CheckSpec::new(
                concat!($call, ".writer-once"),
                $once,
                $report_class,
                concat!("a second ", $call, " on the writer returns 0"),
                $expect,
            ),
            CheckSpec::new(
                concat!($call, ".other-fd"),
                $report_inv,
                $report_class,
                concat!($call, " on another description opened before the error returns EIO"),
                $expect,
            ),
            CheckSpec::new(
                concat!($call, ".dup-shares"),
                $dup,
                $report_class,
                concat!($call, " on a dup() of a description that already reported returns 0"),
                $expect,
            ),
            CheckSpec::new(
                concat!($call, ".late-open-seen"),
                $late_seen,
                $report_class,
                concat!($call, " on a description opened after the error was reported returns 0"),
                $expect,
            ),
        ]
    };
}

const FSYNC: [CheckSpec; 6] = errseq_checks!("fsync", 1, G, 2, 3, 4, 5, VD, always_holds, late_open_reports);
const FDATASYNC: [CheckSpec; 6] = errseq_checks!("fdatasync", 1, G, 2, 3, 4, 5, VD, always_holds, late_open_reports);
const MSYNC: [CheckSpec; 6] = errseq_checks!("msync", 7, G, 7, 3, 4, 5, VD, always_holds, late_open_reports);
const SYNC_FILE_RANGE: [CheckSpec; 6] =
    errseq_checks!("sync_file_range", 8, G, 8, 3, 4, 5, VD, always_holds, late_open_reports);
const SYNCFS: [CheckSpec; 6] = errseq_checks!("syncfs", 9, VD, 9, 9, 9, 9, VD, syncfs_reports, syncfs_reports);

const FSYNC_CHECKS: &[CheckSpec] = &[
    FSYNC[0],
    FSYNC[1],
    FSYNC[2],
    FSYNC[3],
    FSYNC[4],
    FSYNC[5],
    CheckSpec::new(
        "fsync.sync-reports-nothing",
        10,
        G,
        "sync() after the error leaves the report for fsync",
        always_holds,
    ),
    CheckSpec::new(
        "fsync.close-returns-0",
        11,
        G,
        "close() of a description that never reported returns 0",
        always_holds,
    ),
];
const MSYNC_CHECKS: &[CheckSpec] = &[
    CheckSpec::new(
        "msync.async-reports-nothing",
        7,
        G,
        "msync(MS_ASYNC) after the error returns 0 and leaves the report",
        always_holds,
    ),
    MSYNC[0],
    MSYNC[1],
    MSYNC[2],
    MSYNC[3],
    MSYNC[4],
    MSYNC[5],
];
const SFR_CHECKS: &[CheckSpec] = &[
    CheckSpec::new(
        "sync_file_range.write-only-reports-nothing",
        8,
        G,
        "sync_file_range(SYNC_FILE_RANGE_WRITE) returns 0 and leaves the report",
        always_holds,
    ),
    SYNC_FILE_RANGE[0],
    SYNC_FILE_RANGE[1],
    SYNC_FILE_RANGE[2],
    SYNC_FILE_RANGE[3],
    SYNC_FILE_RANGE[4],
    SYNC_FILE_RANGE[5],
];

pub static SCENARIOS: [Scenario; 5] = [
    Scenario {
        name: "errseq-fsync",
        about: "who gets fsync's error report",
        checks: FSYNC_CHECKS,
        run: |e, f| run(e, f, Call::Fsync),
    },
    Scenario {
        name: "errseq-fdatasync",
        about: "who gets fdatasync's error report",
        checks: &FDATASYNC,
        run: |e, f| run(e, f, Call::Fdatasync),
    },
    Scenario {
        name: "errseq-msync",
        about: "who gets msync's error report",
        checks: MSYNC_CHECKS,
        run: |e, f| run(e, f, Call::Msync),
    },
    Scenario {
        name: "errseq-sync_file_range",
        about: "who gets sync_file_range's error report",
        checks: SFR_CHECKS,
        run: |e, f| run(e, f, Call::SyncFileRange),
    },
    Scenario {
        name: "errseq-syncfs",
        about: "who gets syncfs's error report",
        checks: &SYNCFS,
        run: |e, f| run(e, f, Call::Syncfs),
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Fsync,
    Fdatasync,
    Msync,
    SyncFileRange,
    Syncfs,
}

impl Call {
    fn name(self) -> &'static str {
        match self {
            Call::Fsync => "fsync",
            Call::Fdatasync => "fdatasync",
            Call::Msync => "msync",
            Call::SyncFileRange => "sync_file_range",
            Call::Syncfs => "syncfs",
        }
    }
}

/// An open description, with a one-page mapping of it when the call is msync.
struct Description {
    file: File,
    map: Option<Mapping>,
}

impl Description {
    fn new(file: File, call: Call) -> Result<Self, StepError> {
        let map =
            if call == Call::Msync { Some(Mapping::shared(&file, 4096).step("mmap a description")?) } else { None };
        Ok(Description { file, map })
    }

    fn call(&self, call: Call) -> String {
        let result = match call {
            Call::Fsync => os::fsync(&self.file),
            Call::Fdatasync => os::fdatasync(&self.file),
            Call::Msync => self.map.as_ref().map_or(Ok(()), |m| m.msync(true)),
            Call::SyncFileRange => os::sync_file_range(&self.file, RangeSync::WriteAndWait),
            Call::Syncfs => os::syncfs(&self.file),
        };
        outcome(&result)
    }
}

const LEN: u64 = 16 * 1024;

fn run(env: &mut Env, f: &mut Findings, call: Call) -> Result<(), StepError> {
    let name = call.name();
    let file = env.create("errseq", OLD, LEN)?;
    let writer = Description {
        file: file.writer.try_clone().step("dup the writer")?,
        map: Some(Mapping::shared(&file.writer, LEN as usize).step("mmap the writer")?),
    };
    let before = Description::new(file.open_again()?, call)?;
    let never_reports = file.open_again()?;
    let policy = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    if let Some(map) = &writer.map {
        map.store(0, &NEW.bytes(0, 4096)).step("store through the mapping")?.map_err(|b| StepError::new("store", b))?;
    }
    writer.file.write_all_at(&NEW.bytes(4096, 4096), 4096).step("write()")?;
    let failed = env.sync_and_heal(policy)?;

    let mut sequence = Vec::new();
    let mut note = |who: &str, what: &str, returned: &str| {
        sequence.push(json!({ "description": who, "call": what, "returned": returned }))
    };
    note("any", "sync()", "(void)");

    // Calls that must not consume the report come first.
    let silent = match call {
        Call::Msync => writer.map.as_ref().map(|m| outcome(&m.msync(false))),
        Call::SyncFileRange => Some(outcome(&os::sync_file_range(&writer.file, RangeSync::WriteOnly))),
        _ => None,
    };
    if let Some(r) = &silent {
        let what = if call == Call::Msync { "msync(MS_ASYNC)" } else { "sync_file_range(WRITE)" };
        note("W (writer)", what, r);
    }

    let late = Description::new(file.open_again()?, call)?;
    let a1 = late.call(call);
    note("A (opened after the error)", name, &a1);
    let w1 = writer.call(call);
    note("W (writer)", name, &w1);
    let w2 = writer.call(call);
    note("W (writer)", name, &w2);
    let b1 = before.call(call);
    note("B (opened before the error)", name, &b1);
    let dup = Description::new(before.file.try_clone().step("dup()")?, call)?;
    let d1 = dup.call(call);
    note("dup(B)", name, &d1);
    let seen = Description::new(file.open_again()?, call)?;
    let c1 = seen.call(call);
    note("C (opened after the report)", name, &c1);

    f.share("sequence", json!(sequence));
    f.share("failed_requests", json!(failed.len()));
    let id = |suffix: &str| format!("{name}.{suffix}");
    let returned = |r: &str| format!("returned {r}");
    f.judge(&id("late-open-unseen"), a1 == "EIO", returned(&a1), json!({ "returned": a1 }));
    f.judge(&id("writer"), w1 == "EIO", returned(&w1), json!({ "returned": w1 }));
    f.judge(&id("writer-once"), w2 == "0", returned(&w2), json!({ "returned": w2 }));
    f.judge(&id("other-fd"), b1 == "EIO", returned(&b1), json!({ "returned": b1 }));
    f.judge(&id("dup-shares"), d1 == "0", returned(&d1), json!({ "returned": d1, "original_returned": b1 }));
    f.judge(&id("late-open-seen"), c1 == "0", returned(&c1), json!({ "returned": c1 }));
    match call {
        Call::Fsync => {
            f.judge(
                "fsync.sync-reports-nothing",
                w1 == "EIO",
                "the writer's fsync after sync() did not report the error",
                json!({ "writer_fsync": w1 }),
            );
            // SAFETY: the descriptor is owned here and closed exactly once.
            let closed = unsafe { libc::close(never_reports.into_raw_fd()) };
            let closed = if closed == 0 { "0".to_string() } else { outcome(&Err(std::io::Error::last_os_error())) };
            f.judge("fsync.close-returns-0", closed == "0", returned(&closed), json!({ "returned": closed }));
        }
        Call::Msync => {
            let r = silent.unwrap_or_default();
            f.judge(
                "msync.async-reports-nothing",
                r == "0" && w1 == "EIO",
                format!("MS_ASYNC returned {r}, then MS_SYNC returned {w1}"),
                json!({ "ms_async": r, "then_ms_sync": w1 }),
            );
        }
        Call::SyncFileRange => {
            let r = silent.unwrap_or_default();
            f.judge(
                "sync_file_range.write-only-reports-nothing",
                r == "0" && w1 == "EIO",
                format!("WRITE returned {r}, then WAIT_BEFORE|WRITE|WAIT_AFTER returned {w1}"),
                json!({ "write_only": r, "then_write_and_wait": w1 }),
            );
        }
        Call::Fdatasync | Call::Syncfs => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::suite::Fs;
    use crate::version::KernelVersion;

    #[test]
    fn every_call_has_the_six_description_checks() {
        for scenario in &SCENARIOS {
            for suffix in ["late-open-unseen", "writer", "writer-once", "other-fd", "dup-shares", "late-open-seen"] {
                let prefix = scenario.name.trim_start_matches("errseq-");
                assert!(
                    scenario.checks.iter().any(|c| c.id == format!("{prefix}.{suffix}")),
                    "{} lacks {suffix}",
                    scenario.name
                );
            }
        }
    }

    #[test]
    fn syncfs_is_expected_to_report_from_5_8() {
        let t = |v| Target { fs: Fs::Xfs, kernel: Some(v) };
        assert_eq!(syncfs_reports(&t(KernelVersion::new(5, 7, 19))), Some(Verdict::Violated));
        assert_eq!(syncfs_reports(&t(KernelVersion::new(5, 10, 0))), Some(Verdict::Holds));
        assert_eq!(syncfs_reports(&Target { fs: Fs::Ext4, kernel: None }), None);
    }
}
