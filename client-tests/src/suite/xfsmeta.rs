//! XFS metadata write errors and their configuration (invariant 27):
//! `/sys/fs/xfs/<dev>/error/metadata/EIO/{max_retries,retry_timeout_seconds}` and
//! `/sys/fs/xfs/<dev>/error/fail_at_unmount`. Every write outside the log fails, so the log
//! commits and the metadata it logged (inodes, directory blocks, AG headers) is written back in
//! place by the AIL, where it fails. The log worker pushes the AIL every
//! `fs.xfs.xfssyncd_centisecs`, set to one second for the scenario.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::env::{Env, log_texts};
use super::layout::xfs_log_range;
use super::views::SHUTDOWN_LINES;
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, always_holds};
use crate::control::FaultRecord;
use crate::invariants::Class::Guaranteed as G;
use crate::kmsg::matching;
use crate::os;
use crate::policy::Op;
use crate::report::Verdict;

pub static RETRY_FOREVER: Scenario = Scenario {
    name: "xfs-metadata-retry",
    about: "XFS metadata writes fail with max_retries=-1: retried, no shutdown; fail_at_unmount=1 lets unmount finish",
    checks: &[
        CheckSpec::new(
            "xfs-metadata.retry-forever-keeps-running",
            27,
            G,
            "with max_retries=-1 a failing metadata write is retried and XFS does not shut down; once the disk heals it carries on",
            always_holds,
        )
        .only(Fs::Xfs),
        CheckSpec::new(
            "xfs-metadata.fail-at-unmount",
            27,
            G,
            "with fail_at_unmount=1, unmount finishes while metadata writes still fail",
            always_holds,
        )
        .only(Fs::Xfs),
    ],
    run: |e, f| run(e, f, Mode::RetryForever),
};

pub static MAX_RETRIES: Scenario = Scenario {
    name: "xfs-metadata-max-retries",
    about: "XFS metadata writes fail with max_retries=2: XFS shuts down after the retries",
    checks: &[CheckSpec::new(
        "xfs-metadata.max-retries-shuts-down",
        27,
        G,
        "with max_retries=2, XFS shuts down once a failing metadata buffer has been retried twice",
        always_holds,
    )
    .only(Fs::Xfs)],
    run: |e, f| run(e, f, Mode::MaxRetries),
};

pub static RETRY_TIMEOUT: Scenario = Scenario {
    name: "xfs-metadata-timeout",
    about: "XFS metadata writes fail with retry_timeout_seconds=3: XFS shuts down after about 3 s",
    checks: &[CheckSpec::new(
        "xfs-metadata.retry-timeout-shuts-down",
        27,
        G,
        "with max_retries=-1 and retry_timeout_seconds=3, XFS shuts down once a metadata buffer has failed for 3 s, not before",
        always_holds,
    )
    .only(Fs::Xfs)],
    run: |e, f| run(e, f, Mode::Timeout),
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    RetryForever,
    MaxRetries,
    Timeout,
}

const TIMEOUT_SECS: u64 = 3;
const MAX_RETRIES_VALUE: i64 = 2;

/// A sysfs or procfs value set for the scenario and put back afterwards.
fn setting(path: PathBuf, value: &str) -> Result<os::Setting, StepError> {
    os::Setting::set(path, value).step("configure XFS")
}

/// Makes dirty metadata: a directory of empty files, committed to the log by syncfs.
fn dirty_metadata(env: &Env, dir: &str, files: usize) -> Result<(), StepError> {
    let d = env.path(dir);
    std::fs::create_dir_all(&d).step("make a directory")?;
    for i in 0..files {
        std::fs::File::create(d.join(format!("f{i}"))).step("create an empty file")?;
    }
    let handle = std::fs::File::open(&d).step("open the directory")?;
    os::syncfs(&handle).step("syncfs (commits the log; its writes pass)")
}

/// Failed requests per device offset, most failed first.
fn failures_by_offset(records: &[FaultRecord]) -> Vec<(u64, usize)> {
    let mut by: BTreeMap<u64, usize> = BTreeMap::new();
    for r in records.iter().filter(|r| r.failed()) {
        *by.entry(r.offset).or_default() += 1;
    }
    let mut v: Vec<(u64, usize)> = by.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v
}

/// Waits up to `limit` for a shutdown line in the kernel log; returns the lines and when.
fn wait_for_shutdown(env: &mut Env, limit: Duration) -> (Vec<String>, Option<Duration>) {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < limit {
        let lines = env.kernel_log();
        let hits = matching(&lines, SHUTDOWN_LINES);
        if !hits.is_empty() {
            seen.extend(hits.iter().map(|l| l.text.clone()));
            return (seen, Some(start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    (seen, None)
}

/// Unmounts in a thread; if it has not finished after `limit`, heals the server so it can.
/// Returns whether it finished within the limit and what umount returned.
fn unmount_within(env: &mut Env, limit: Duration) -> Result<(bool, String, Duration), StepError> {
    let mnt: PathBuf = env.mnt.clone();
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let worker = std::thread::spawn(move || {
        let r = os::umount(Path::new(&mnt));
        let _ = tx.send(os::outcome(&r));
    });
    let (in_time, result) = match rx.recv_timeout(limit) {
        Ok(r) => (true, r),
        Err(_) => {
            env.heal()?;
            (false, rx.recv().unwrap_or_else(|_| "umount thread died".into()))
        }
    };
    let _ = worker.join();
    if result == "0" {
        env.mark_unmounted();
    }
    Ok((in_time, result, start.elapsed()))
}

fn run(env: &mut Env, f: &mut Findings, mode: Mode) -> Result<(), StepError> {
    if env.fs() != Fs::Xfs {
        return Ok(());
    }
    let dev = env.device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let cfg = PathBuf::from(format!("/sys/fs/xfs/{dev}/error"));
    let (retries, timeout) = match mode {
        Mode::RetryForever => ("-1".to_string(), "-1".to_string()),
        Mode::MaxRetries => (MAX_RETRIES_VALUE.to_string(), "-1".to_string()),
        Mode::Timeout => ("-1".to_string(), TIMEOUT_SECS.to_string()),
    };
    // The log worker is queued at mount with the interval in force then, and the error
    // configuration is made per mount: shorten the interval, mount again, then configure.
    let _syncd = setting(PathBuf::from("/proc/sys/fs/xfs/xfssyncd_centisecs"), "100")?;
    env.remount()?;
    let _retries = setting(cfg.join("metadata/EIO/max_retries"), &retries)?;
    let _timeout = setting(cfg.join("metadata/EIO/retry_timeout_seconds"), &timeout)?;
    let _unmount = setting(cfg.join("fail_at_unmount"), "1")?;
    let config = json!({ "max_retries": retries, "retry_timeout_seconds": timeout, "fail_at_unmount": 1, "xfssyncd_centisecs": 100 });
    let sb = env.control.read_data(0, 512).step("read the XFS superblock")?;
    let (log_start, log_end) = xfs_log_range(&sb).step("find the XFS log")?;
    let outside_log = vec![(0, log_start), (log_end, 1 << 50)];
    env.kernel_log();

    let armed = env.fail(Op::Write, outside_log.clone(), "fail-metadata-writes")?;
    let started = Instant::now();
    dirty_metadata(env, "d1", 64)?;
    let (shutdown, after) = match mode {
        // Long enough for several log-worker pushes (one a second) and xfsaild's retries.
        Mode::RetryForever => wait_for_shutdown(env, Duration::from_secs(6)),
        Mode::MaxRetries => wait_for_shutdown(env, Duration::from_secs(20)),
        Mode::Timeout => wait_for_shutdown(env, Duration::from_secs(TIMEOUT_SECS + 15)),
    };
    let failing_for = started.elapsed();
    let failed = env.disarm(&armed)?;
    env.heal()?;
    let by_offset = failures_by_offset(&failed);
    let most_retried = by_offset.first().map(|(_, n)| *n).unwrap_or(0);
    let first_last = {
        let times: Vec<u64> = failed.iter().map(|r| r.time_ns).collect();
        json!({ "first_ns": times.iter().min(), "last_ns": times.iter().max() })
    };
    let lines = env.whole_log().to_vec();
    let errors = matching(&lines, &["metadata I/O error", "Metadata I/O Error", "I/O Error Detected"]);
    let mut ev = json!({
        "config": config,
        "failed_requests": failed.len(),
        "failures_by_device_offset": by_offset.iter().take(5).map(|(o, n)| json!({ "offset": o, "failed": n })).collect::<Vec<_>>(),
        "failure_times": first_last,
        "failing_for_ms": failing_for.as_millis() as u64,
        "shutdown_after_ms": after.map(|d| d.as_millis() as u64),
        "shutdown_lines": shutdown,
        "metadata_error_lines": log_texts(&errors.into_iter().take(6).collect::<Vec<_>>()),
    });
    if failed.is_empty() {
        return Err(StepError::new(
            "fail metadata writes",
            format!("no metadata write reached the server in {failing_for:?}: {ev}"),
        ));
    }
    match mode {
        Mode::RetryForever => {
            // Healed: the next push writes the buffers; the filesystem goes on.
            std::thread::sleep(Duration::from_secs(2));
            let health = env.still_writable();
            let (late, _) = wait_for_shutdown(env, Duration::ZERO);
            ev["health_after_healing"] = health.clone();
            f.judge(
                "xfs-metadata.retry-forever-keeps-running",
                after.is_none() && most_retried >= 2 && late.is_empty() && health["write_and_fsync_new_file"] == "0",
                format!(
                    "shut down: {}; the most retried block failed {most_retried} time(s); after healing: {}",
                    after.is_some() || !late.is_empty(),
                    health["write_and_fsync_new_file"]
                ),
                ev.clone(),
            );
            // Now fail them again and unmount: fail_at_unmount must end the retries.
            let armed = env.fail(Op::Write, outside_log, "fail-metadata-writes-at-unmount")?;
            dirty_metadata(env, "d2", 64)?;
            let (in_time, umount, took) = unmount_within(env, Duration::from_secs(30))?;
            let failed = env.disarm(&armed)?;
            env.heal()?;
            let unmount_ev = json!({
                "config": config,
                "umount": umount,
                "umount_took_ms": took.as_millis() as u64,
                "finished_while_failing": in_time,
                "failed_requests_during_unmount": failed.len(),
                "kernel_lines": log_texts(&matching(&env.kernel_log(), SHUTDOWN_LINES)),
            });
            if failed.is_empty() {
                f.set(
                    "xfs-metadata.fail-at-unmount",
                    Verdict::Error,
                    Some("no metadata write failed during the unmount".into()),
                    unmount_ev,
                );
            } else {
                f.judge(
                    "xfs-metadata.fail-at-unmount",
                    in_time && umount == "0",
                    format!("unmount returned {umount} after {took:?} (within 30 s: {in_time})"),
                    unmount_ev,
                );
            }
        }
        Mode::MaxRetries => f.judge(
            "xfs-metadata.max-retries-shuts-down",
            after.is_some() && most_retried <= (MAX_RETRIES_VALUE as usize) + 3,
            format!("shut down: {}; the most retried block failed {most_retried} time(s)", after.is_some()),
            ev,
        ),
        Mode::Timeout => {
            let waited = after.map(|d| d.as_secs_f64()).unwrap_or(0.0);
            f.judge(
                "xfs-metadata.retry-timeout-shuts-down",
                after.is_some() && waited >= TIMEOUT_SECS as f64 && most_retried >= 2,
                format!("shut down after {waited:.1} s of failing (timeout {TIMEOUT_SECS} s); the most retried block failed {most_retried} time(s)"),
                ev,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_counted_per_offset_most_first() {
        let rec = |seq, offset| crate::control::test_record(seq, offset, 4096, true);
        let v = failures_by_offset(&[rec(1, 8192), rec(2, 4096), rec(3, 8192), rec(4, 8192)]);
        assert_eq!(v, vec![(8192, 3), (4096, 1)]);
    }
}
