//! fanotify `FAN_FS_ERROR` (invariant 29): since 7.0 iomap reports a failed buffered write
//! through fserror, so a listener on XFS hears of it; ext4's own buffered path does not report.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use serde_json::json;

use super::env::Env;
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, Target};
use crate::invariants::Class::VersionDependent as VD;
use crate::os::fanotify::ErrorWatch;
use crate::pattern::{NEW, OLD};
use crate::policy::Op;
use crate::report::Verdict;

const ID: &str = "fanotify.buffered-write-error";

/// fserror (7.0) reports buffered write errors of iomap filesystems; FAN_FS_ERROR itself arrived
/// in 5.16, so before that there is nothing to listen to.
fn fserror_expected(t: &Target) -> Option<Verdict> {
    let k = t.kernel?;
    if !k.at_least(5, 16) {
        return None;
    }
    match t.fs {
        Fs::Xfs => Some(if k.at_least(7, 0) { Verdict::Holds } else { Verdict::Violated }),
        Fs::Ext4 => Some(Verdict::Violated),
        Fs::Btrfs => None,
    }
}

pub static SCENARIO: Scenario = Scenario {
    name: "fanotify",
    about: "a fanotify FAN_FS_ERROR listener on the filesystem: does a failed buffered write reach it?",
    checks: &[CheckSpec::new(
        ID,
        29,
        VD,
        "fanotify FAN_FS_ERROR on the filesystem reports a failed buffered write",
        fserror_expected,
    )],
    run,
};

const LEN: u64 = 16 * 1024;

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let watch = match ErrorWatch::on(&env.mnt) {
        Ok(w) => w,
        Err(e) => {
            let why = format!("cannot listen for FAN_FS_ERROR on this kernel ({e}; it arrived in 5.16)");
            f.set(ID, Verdict::NotApplicable, Some(why), json!({ "fanotify_mark": e.to_string() }));
            return Ok(());
        }
    };
    if env.target.kernel.is_some_and(|k| !k.at_least(5, 16)) {
        let why = "FAN_FS_ERROR arrived in 5.16: this kernel accepts the mark but has no such event";
        f.set(ID, Verdict::NotApplicable, Some(why.into()), json!({ "fanotify_mark": "0" }));
        return Ok(());
    }
    let earlier = watch.events(Duration::ZERO).step("read fanotify events")?;
    let file = env.create("fanotify", OLD, LEN)?;
    let policy = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    file.writer.write_all_at(&NEW.bytes(0, LEN as usize), 0).step("write()")?;
    let failed = env.sync_and_heal(policy)?;
    let events = watch.events(Duration::from_secs(3)).step("read fanotify events")?;
    let errors: Vec<_> = events.iter().filter(|e| e.mask & libc::FAN_FS_ERROR != 0).collect();
    f.judge(
        ID,
        !errors.is_empty(),
        "no FAN_FS_ERROR event arrived within 3 s of the failed writeback",
        json!({
            "failed_requests": failed.len(),
            "events_before_the_write": earlier,
            "events_after_the_failed_writeback": events,
        }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::KernelVersion;

    #[test]
    fn xfs_reports_from_7_0_ext4_never_and_nothing_is_predicted_before_5_16() {
        let t = |fs, v| Target { fs, kernel: Some(v) };
        assert_eq!(fserror_expected(&t(Fs::Xfs, KernelVersion::new(7, 2, 13))), Some(Verdict::Holds));
        assert_eq!(fserror_expected(&t(Fs::Xfs, KernelVersion::new(6, 12, 118))), Some(Verdict::Violated));
        assert_eq!(fserror_expected(&t(Fs::Ext4, KernelVersion::new(7, 2, 13))), Some(Verdict::Violated));
        assert_eq!(fserror_expected(&t(Fs::Xfs, KernelVersion::new(5, 10, 262))), None);
    }
}
