//! Failed writes into unwritten extents: inside the file (fallocate) and past its end (append into
//! preallocated blocks). Free blocks are seeded with a known pattern below the filesystem, so a
//! read that returns them is a stale-data leak, not zeros.

use std::os::unix::fs::FileExt;

use serde_json::json;

use super::env::{Env, TestFile, read_at};
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, Target, unknown};
use crate::invariants::Class::VersionDependent as VD;
use crate::os::{self, fiemap};
use crate::pattern::{NEW, OLD, STALE, classify};
use crate::policy::Op;
use crate::report::Verdict;

/// XFS skips unwritten conversion on error; ext4 converted anyway until e856f93e0fb2 (6.15,
/// taken into 6.12.y and 6.6.90).
fn zeros_expected(t: &Target) -> Option<Verdict> {
    match t.fs {
        Fs::Xfs => Some(Verdict::Holds),
        Fs::Ext4 => t.kernel.map(|k| {
            let fixed =
                k.at_least(6, 15) || (k.major, k.minor) == (6, 12) || ((k.major, k.minor) == (6, 6) && k.patch >= 90);
            if fixed { Verdict::Holds } else { Verdict::Violated }
        }),
        Fs::Btrfs => None,
    }
}

/// XFS skips the on-disk size update on error; the catalogue has no ext4 prediction.
fn size_reverts(t: &Target) -> Option<Verdict> {
    match t.fs {
        Fs::Xfs => Some(Verdict::Holds),
        Fs::Ext4 | Fs::Btrfs => unknown(t),
    }
}

pub static SCENARIO: Scenario = Scenario {
    name: "unwritten",
    about: "failed write into fallocated (unwritten) extents over stale blocks",
    checks: &[CheckSpec::new(
        "unwritten.evicted-read-zeros",
        18,
        VD,
        "after eviction, a failed write into unwritten extents reads as zeros, not the blocks' stale contents",
        zeros_expected,
    )],
    run: run_unwritten,
};

pub static APPEND: Scenario = Scenario {
    name: "append",
    about: "failed append into preallocated blocks: size and contents after eviction and remount",
    checks: &[
        CheckSpec::new(
            "append.evicted-read-zeros",
            18,
            VD,
            "after eviction, the failed appended range reads as zeros, not stale blocks",
            zeros_expected,
        ),
        CheckSpec::new(
            "append.size-after-remount",
            19,
            VD,
            "after remount the file has its last persisted size",
            size_reverts,
        ),
    ],
    run: run_append,
};

const LEN: u64 = 64 * 1024;

fn unwritten_ranges(file: &TestFile, offset: u64, len: u64) -> Result<Vec<(u64, u64)>, String> {
    let inside: Vec<&fiemap::Extent> =
        file.extents.iter().filter(|e| e.logical < offset + len && offset < e.logical + e.length).collect();
    if inside.iter().any(|e| !e.located() || !e.unwritten()) {
        return Err(format!("the preallocated range is not all unwritten extents: {:?}", file.extents));
    }
    let ranges = file.device_ranges(offset, len);
    let covered: u64 = ranges.iter().map(|(s, e)| e - s).sum();
    if covered != len {
        return Err(format!("only {covered} of {len} preallocated bytes have blocks"));
    }
    Ok(ranges)
}

fn read_verdict(
    f: &mut Findings,
    id: &'static str,
    offset: u64,
    read: &Result<Vec<u8>, String>,
    ev: serde_json::Value,
) {
    match read {
        Ok(bytes) if bytes.iter().all(|b| *b == 0) => f.set(id, Verdict::Holds, None, ev),
        Ok(bytes) => {
            let what = classify(offset, bytes);
            let why = if what == "stale" {
                "read() returned the blocks' stale contents (stale-data exposure)".to_string()
            } else {
                format!("read() returned {what} data, not zeros")
            };
            f.set(id, Verdict::Violated, Some(why), ev);
        }
        Err(e) => f.set(id, Verdict::Error, Some(format!("read() failed: {e}")), ev),
    }
}

fn run_unwritten(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let mut file = env.create("unwritten", OLD, 0)?;
    os::fallocate(&file.writer, 0, LEN, false).step("fallocate")?;
    file.refresh_extents(LEN)?;
    let ranges = match unwritten_ranges(&file, 0, LEN) {
        Ok(r) => r,
        Err(why) => {
            f.set("unwritten.evicted-read-zeros", Verdict::NotApplicable, Some(why), json!({}));
            return Ok(());
        }
    };
    env.seed(&file, 0, &STALE.bytes(0, LEN as usize))?;
    // btrfs writes into preallocated extents in place (no copy-on-write), but fail its whole data
    // area in case it does not.
    let ranges = if env.fs() == Fs::Btrfs { env.write_ranges(&file, 0, LEN)? } else { ranges };
    let policy = env.fail(Op::Write, ranges, "fail-unwritten")?;
    file.writer.write_all_at(&NEW.bytes(0, LEN as usize), 0).step("write()")?;
    let failed = env.sync_and_heal(policy)?;
    let cached = env.views(&file, None, 0, LEN)?;
    let resident = env.evict(&file.writer, LEN)?;
    let evicted = env.views(&file, None, 0, LEN)?;
    let after = fiemap::extents(&file.writer, 0, LEN, false).step("FIEMAP after")?;
    let ev = json!({
        "failed_requests": failed.len(),
        "cached": cached.evidence(),
        "resident_after_eviction": resident,
        "evicted": evicted.evidence(),
        "extents_unwritten_after": after.iter().map(|e| e.unwritten()).collect::<Vec<_>>(),
    });
    if resident.iter().any(|r| *r) {
        f.set("unwritten.evicted-read-zeros", Verdict::Error, Some("pages stayed cached after eviction".into()), ev);
    } else {
        read_verdict(f, "unwritten.evicted-read-zeros", 0, &evicted.read, ev);
    }
    Ok(())
}

const OLD_LEN: u64 = 16 * 1024;
const APPENDED: u64 = 32 * 1024;

fn run_append(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let mut file = env.create("append", OLD, OLD_LEN)?;
    os::fallocate(&file.writer, OLD_LEN, APPENDED, true).step("fallocate past the end (KEEP_SIZE)")?;
    file.refresh_extents(OLD_LEN + APPENDED)?;
    let ranges = match unwritten_ranges(&file, OLD_LEN, APPENDED) {
        Ok(r) => r,
        Err(why) => {
            for id in ["append.evicted-read-zeros", "append.size-after-remount"] {
                f.set(id, Verdict::NotApplicable, Some(why.clone()), json!({}));
            }
            return Ok(());
        }
    };
    env.seed(&file, OLD_LEN, &STALE.bytes(OLD_LEN, APPENDED as usize))?;
    let ranges = if env.fs() == Fs::Btrfs { env.write_ranges(&file, OLD_LEN, APPENDED)? } else { ranges };
    let policy = env.fail(Op::Write, ranges, "fail-appended")?;
    file.writer.write_all_at(&NEW.bytes(OLD_LEN, APPENDED as usize), OLD_LEN).step("append with write()")?;
    let failed = env.sync_and_heal(policy)?;
    let size_cached = file.writer.metadata().step("stat")?.len();
    let resident = env.evict(&file.writer, OLD_LEN + APPENDED)?;
    let size_evicted = file.writer.metadata().step("stat")?.len();
    let read = read_at(&file.writer, OLD_LEN, APPENDED);
    let ev = json!({
        "failed_requests": failed.len(),
        "size_cached": size_cached,
        "size_after_page_eviction": size_evicted,
        "resident_after_eviction": resident,
        "read_appended_after_eviction": read.as_ref().map(|b| classify(OLD_LEN, b)).map_err(Clone::clone),
    });
    read_verdict(f, "append.evicted-read-zeros", OLD_LEN, &read, ev.clone());

    let path = file.path.clone();
    drop(file);
    env.remount()?;
    let size = std::fs::metadata(&path).step("stat after remount")?.len();
    let reopened = std::fs::File::open(&path).step("open after remount")?;
    let tail = if size > OLD_LEN { Some(read_at(&reopened, OLD_LEN, size - OLD_LEN)) } else { None };
    let mut ev = ev;
    ev["size_after_remount"] = json!(size);
    ev["last_persisted_size"] = json!(OLD_LEN);
    if let Some(tail) = &tail {
        ev["read_appended_after_remount"] = json!(tail.as_ref().map(|b| classify(OLD_LEN, b)).map_err(Clone::clone));
    }
    f.judge(
        "append.size-after-remount",
        size == OLD_LEN,
        format!("the size after remount is {size}, not {OLD_LEN}"),
        ev,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::KernelVersion;

    #[test]
    fn ext4_stale_exposure_is_expected_before_the_fix_and_its_backports() {
        let ext4 = |v| Target { fs: Fs::Ext4, kernel: Some(v) };
        assert_eq!(zeros_expected(&ext4(KernelVersion::new(5, 10, 262))), Some(Verdict::Violated));
        assert_eq!(zeros_expected(&ext4(KernelVersion::new(6, 1, 192))), Some(Verdict::Violated));
        assert_eq!(zeros_expected(&ext4(KernelVersion::new(6, 6, 90))), Some(Verdict::Holds));
        assert_eq!(zeros_expected(&ext4(KernelVersion::new(6, 12, 118))), Some(Verdict::Holds));
        assert_eq!(zeros_expected(&Target { fs: Fs::Xfs, kernel: None }), Some(Verdict::Holds));
    }
}
