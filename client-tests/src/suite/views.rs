//! The overwrite case: what an mmap load, a read() and the server's disk show after the writeback
//! of previously written blocks failed: while the pages are cached, once they are evicted, and
//! after a second write. This is the "teleport backwards" of the 2020 thread.

use std::os::unix::fs::FileExt;

use serde_json::json;

use super::env::{Env, log_texts, read_at};
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, always_holds};
use crate::invariants::Class::Guaranteed as G;
use crate::kmsg::matching;
use crate::os::mapping::{Mapping, resident_pages};
use crate::os::{self, outcome};
use crate::pattern::{NEW, OLD, SECOND, classify};
use crate::policy::Op;

pub static SCENARIO: Scenario = Scenario {
    name: "views",
    about: "overwrite: mmap, read() and disk while cached, after eviction, after a second write",
    checks: CHECKS,
    run,
};

const CHECKS: &[CheckSpec] = &[
    CheckSpec::new(
        "views.cached-read-new",
        13,
        G,
        "read() of a cached page whose writeback failed returns the unpersisted data",
        always_holds,
    ),
    CheckSpec::new(
        "views.cached-mmap-agrees",
        14,
        G,
        "an mmap load and read() agree while the page is cached",
        always_holds,
    ),
    CheckSpec::new(
        "views.mapped-not-evicted",
        16,
        G,
        "POSIX_FADV_DONTNEED and drop_caches leave mapped pages cached",
        always_holds,
    ),
    CheckSpec::new(
        "views.evicted-read-old",
        17,
        G,
        "after eviction, read() and a new mmap return the old on-disk data",
        always_holds,
    ),
    CheckSpec::new(
        "views.second-write-keeps-old",
        17,
        G,
        "a small write after eviction leaves the rest of the page as the old data: the failed bytes are gone",
        always_holds,
    ),
    CheckSpec::new("views.kernel-logged", 30, G, "the kernel logs the data writeback error", always_holds),
    CheckSpec::new(
        "views.no-shutdown",
        25,
        G,
        "a data write error leaves the filesystem writable (no shutdown, no journal abort)",
        always_holds,
    ),
];

const LEN: u64 = 64 * 1024;
/// Pages 0..4 are dirtied through the mapping, 4..8 through write(); 8..16 stay clean.
const STORED: u64 = 16 * 1024;
const DIRTY: u64 = 32 * 1024;

/// Kernel log lines that report a data writeback error, per filesystem.
pub fn data_error_lines(fs: Fs) -> &'static [&'static str] {
    match fs {
        Fs::Xfs => &["writeback error on inode", "writeback error on sector", "lost async page write"],
        Fs::Ext4 => &["writing to inode", "Buffer I/O error", "lost async page write"],
        Fs::Btrfs => &["errs: wr", "lost page write", "writeback error", "lost async page write"],
    }
}

/// Kernel log lines that mean the filesystem gave up.
pub const SHUTDOWN_LINES: &[&str] = &[
    "shut down",
    "Shutting down",
    "shutdown",
    "Remounting filesystem read-only",
    "Aborting journal",
    "aborted journal",
    "forced readonly",
    "Transaction aborted",
    // btrfs since 6.x: "Transaction 7 aborted (error -5)"; the "forced readonly" line that
    // followed it on older kernels does not always come (7.2's cleanup path).
    "aborted (error",
];

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let file = env.create("views", OLD, LEN)?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    let policy = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    map.store(0, &NEW.bytes(0, STORED as usize))
        .step("store through the mapping")?
        .map_err(|bus| StepError::new("store through the mapping", bus))?;
    file.writer.write_all_at(&NEW.bytes(STORED, (DIRTY - STORED) as usize), STORED).step("write()")?;
    let failed = env.sync_and_heal(policy)?;
    f.share("failed_requests", json!({ "count": failed.len(), "first": crate::control::record_json(&failed[0]) }));

    // While cached.
    let cached = env.views(&file, Some(&map), 0, DIRTY)?;
    if cached.disk_bytes().is_some_and(|d| !OLD.matches(0, d)) {
        return Err(StepError::new(
            "check the disk",
            format!("the disk does not hold the old data: {}", cached.evidence()),
        ));
    }
    let ev = json!({ "cached": cached.evidence() });
    let read_new = cached.read_bytes().is_some_and(|r| NEW.matches(0, r));
    f.judge("views.cached-read-new", read_new, "read() did not return the data of the failed write", ev.clone());
    let agree = cached.mmap_bytes().is_some() && cached.mmap_bytes() == cached.read_bytes();
    f.judge("views.cached-mmap-agrees", agree, "the mmap load and read() differ", ev);

    // Eviction attempts while mapped must leave the mapped pages alone.
    os::fadvise_dontneed(&file.writer).step("POSIX_FADV_DONTNEED")?;
    os::drop_caches().step("drop_caches")?;
    let resident = resident_pages(&file.writer, LEN as usize).step("mincore")?;
    let mapped_pages = (STORED / 4096) as usize;
    let still = map.load(0, STORED as usize).step("load again")?;
    f.judge(
        "views.mapped-not-evicted",
        resident[..mapped_pages].iter().all(|r| *r),
        "a mapped page left the page cache",
        json!({ "resident_pages": resident, "mapped_pages": mapped_pages, "mmap_after": still.as_ref().map(|b| classify(0, b)).map_err(|b| b.to_string()) }),
    );

    // Eviction: unmap first, then drop the pages.
    drop(map);
    let resident = env.evict(&file.writer, LEN)?;
    if resident.iter().any(|r| *r) {
        return Err(StepError::new(
            "evict the file",
            format!("pages stay cached after munmap, DONTNEED and drop_caches: {resident:?}"),
        ));
    }
    let fresh = Mapping::shared(&file.writer, LEN as usize).step("mmap again")?;
    let evicted = env.views(&file, Some(&fresh), 0, DIRTY)?;
    let all_old = [evicted.mmap_bytes(), evicted.read_bytes(), evicted.disk_bytes()]
        .iter()
        .all(|v| v.is_some_and(|b| OLD.matches(0, b)));
    f.judge(
        "views.evicted-read-old",
        all_old,
        "after eviction a view did not show the old on-disk data",
        json!({ "cached": cached.evidence(), "evicted": evicted.evidence(), "resident_pages_before_reading": resident }),
    );
    drop(fresh);

    // A second, small write into the first page: the page comes back from disk, old data and all.
    file.writer.write_all_at(&SECOND.bytes(0, 100), 0).step("second write()")?;
    let page = read_at(&file.writer, 0, 4096);
    let kept_old = page.as_ref().is_ok_and(|p| SECOND.matches(0, &p[..100]) && OLD.matches(100, &p[100..]));
    let fsync = outcome(&os::fsync(&file.writer));
    let disk = env.disk(&file, 0, 4096);
    f.judge(
        "views.second-write-keeps-old",
        kept_old,
        "the rest of the page is not the old data",
        json!({
            "page_after_second_write": page.as_ref().map(|p| json!({ "first_100": classify(0, &p[..100]), "rest": classify(100, &p[100..]) })).unwrap_or_else(|e| json!({ "error": e })),
            "fsync": fsync,
            "disk_rest_of_page": disk.map(|d| classify(100, &d[100..]).to_string()).unwrap_or_else(|e| e),
        }),
    );

    let health = env.still_writable();
    let fs = env.fs();
    let log = env.whole_log().to_vec();
    let logged = matching(&log, data_error_lines(fs));
    f.judge(
        "views.kernel-logged",
        !logged.is_empty(),
        "no writeback error line in the kernel log",
        json!({ "lines": log_texts(&logged) }),
    );
    let gave_up = matching(&log, SHUTDOWN_LINES);
    f.judge(
        "views.no-shutdown",
        gave_up.is_empty() && health["write_and_fsync_new_file"] == "0",
        "the filesystem stopped taking writes after a data error",
        json!({ "health": health, "lines": log_texts(&gave_up) }),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::SHUTDOWN_LINES;
    use crate::kmsg::{KmsgLine, matching};

    #[test]
    fn each_filesystems_way_of_giving_up_is_a_shutdown_line_and_a_write_error_is_not() {
        let lines: Vec<KmsgLine> = [
            "XFS (nbd0): log I/O error -5",
            "XFS (nbd0): Filesystem has been shut down due to log error (0x2).",
            "EXT4-fs error (device nbd1): ext4_journal_check_start:84: comm x: Detected aborted journal",
            "EXT4-fs (nbd1): Remounting filesystem read-only",
            "BTRFS: error (device nbd2) in btrfs_commit_transaction:2494: errno=-5 IO failure",
            "BTRFS info (device nbd2): forced readonly",
            "BTRFS error (device nbd2 state A): Transaction 7 aborted (error -5)",
            "block nbd2: Other side returned error (5)",
        ]
        .iter()
        .enumerate()
        .map(|(i, text)| KmsgLine::parse(&format!("3,{i},{i},-;{text}")).expect("a kmsg record"))
        .collect();
        let texts: Vec<&str> = matching(&lines, SHUTDOWN_LINES).iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts.len(), 5, "{texts:#?}");
        assert!(texts.contains(&"BTRFS error (device nbd2 state A): Transaction 7 aborted (error -5)"));
        assert!(!texts.iter().any(|t| t.contains("Other side returned error")));
        assert!(!texts.iter().any(|t| t.contains("log I/O error") || t.contains("errno=-5 IO failure")));
    }
}
