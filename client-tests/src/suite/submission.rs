//! The 2020 thread's own bug class: writeback that fails *before* the bio is sent (at submission),
//! here because block allocation for delayed-allocation pages needs metadata reads and the server
//! fails every read. Old kernels then leave the page mapped but no longer Uptodate, so mmap loads
//! show data that read() no longer returns.
//!
//! XFS must read its AG header (AGF) to allocate. ext4's allocator skips a block group whose
//! bitmap it cannot read and allocates elsewhere, so failing reads alone let its writeback
//! succeed; but before allocating, ext4 looks the block up in the file's extent tree, and a tree
//! deeper than the four extents the inode holds lives in a block on disk. So on ext4 the file
//! first gets six one-block extents beyond the range under test: the lookup then reads that
//! block, the read fails, and `mpage_map_and_submit_extent` gives up on the write ("Delayed
//! block allocation failed ... error -5"), invalidating the pages.

use std::os::unix::fs::FileExt;

use serde_json::{Value, json};

use super::env::{Env, PageStates, TestFile, log_texts, read_at};
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, Target, layout};
use crate::invariants::Class::KnownBug as BUG;
use crate::kmsg::matching;
use crate::os::mapping::Mapping;
use crate::os::{self, fiemap, outcome};
use crate::pattern::{NEW, OLD, REDIRTY, SECOND, classify};
use crate::policy::Op;
use crate::report::Verdict;

/// XFS stopped invalidating pages on submission errors in 5.19 (e9c3a8e820ed). ext4's fix
/// (9b25f381de6b, unmapping the invalidated folios) reached mainline after 7.0, with stable
/// backports to 6.1+ whose presence in a Debian build is unknown, so 6.1 to 7.0 are not
/// predicted.
pub fn submission_fixed(t: &Target) -> Option<Verdict> {
    let k = t.kernel?;
    match t.fs {
        Fs::Xfs => Some(if k.at_least(5, 19) { Verdict::Holds } else { Verdict::Violated }),
        Fs::Ext4 if k.at_least(7, 1) => Some(Verdict::Holds),
        Fs::Ext4 => (!k.at_least(6, 1)).then_some(Verdict::Violated),
        Fs::Btrfs => None,
    }
}

/// Where the file's extent tree block is and whether the block device's page cache still holds
/// it after every drop (mincore on a mapping of the device): evidence for why allocation does or
/// does not read it.
fn extent_tree_block(env: &Env, file: &TestFile, device: &std::fs::File) -> Value {
    use std::os::unix::fs::MetadataExt;
    let ino = match file.writer.metadata() {
        Ok(m) => m.ino(),
        Err(e) => return json!({ "error": e.to_string() }),
    };
    let Ok(sb) = env.control.read_data(1024, 1024) else { return json!({ "error": "cannot read the superblock" }) };
    let mut read = |offset, len| env.control.read_data(offset, len).ok();
    let block = layout::ext4_inode_offset(&sb, ino, &mut read).ok().and_then(|at| {
        let inode = env.control.read_data(at, 0x28 + 60).ok()?;
        layout::ext4_first_tree_block(&inode[0x28..])
    });
    let Some(block) = block else { return json!({ "inode": ino, "tree_block": null }) };
    let resident = crate::os::mapping::resident_pages(device, ((block + 1) * 4096) as usize)
        .map(|pages| pages.last().copied().unwrap_or(false))
        .map_err(|e| e.to_string());
    json!({ "inode": ino, "tree_block": block, "device_offset": block * 4096, "cached_after_every_drop": resident })
}

/// ext4 keeps four extents in the inode; the fifth moves the tree into a block of its own.
const EXT4_TREE_EXTENTS: u64 = 6;
/// The first file block of those extents: well past the range under test.
const EXT4_TREE_FIRST_BLOCK: u64 = 16;

/// Gives the ext4 file an extent tree with a leaf block on disk: one-block extents with holes
/// between them, each fsynced so it is allocated on its own. Then the leaf must be droppable:
/// sync() writes it to its home location (the journal alone holds it until then, pinned), and a
/// further commit lets jbd2 release its checkpointed buffers.
fn deepen_extent_tree(env: &Env, file: &TestFile) -> Result<(), StepError> {
    for i in 0..EXT4_TREE_EXTENTS {
        let at = (EXT4_TREE_FIRST_BLOCK + 2 * i) * 4096;
        file.writer.write_all_at(&OLD.bytes(at, 4096), at).step("write a one-block extent")?;
        file.writer.sync_all().step("fsync the extent")?;
    }
    os::sync();
    let other = std::fs::File::create(env.path("another-commit")).step("create a file")?;
    other.sync_all().step("fsync it (another journal commit)")?;
    os::sync();
    Ok(())
}

pub static SCENARIO: Scenario = Scenario {
    name: "submission",
    about: "writeback fails at submission (block allocation's metadata reads fail): do mmap and read() disagree?",
    checks: &[
        CheckSpec::new(
            "submission.mmap-read-agree",
            14,
            BUG,
            "after a submission-time writeback failure, an mmap load and read() still agree",
            submission_fixed,
        ),
        CheckSpec::new(
            "submission.partial-write-keeps-page",
            24,
            BUG,
            "a partial write() after the failure keeps the rest of the page",
            submission_fixed,
        ),
        CheckSpec::new(
            "submission.store-no-warning",
            22,
            BUG,
            "a store after the failure does not hit a mapped page that is not Uptodate (no kernel warning)",
            submission_fixed,
        ),
    ],
    run,
};

const LEN: u64 = 16 * 1024;
const IDS: [&str; 3] =
    ["submission.mmap-read-agree", "submission.partial-write-keeps-page", "submission.store-no-warning"];

/// Lines that show the allocation failed at submission.
const SUBMISSION_LINES: &[&str] = &[
    "Delayed block allocation failed",
    "This should not happen",
    "metadata I/O error",
    "page discard",
    "Cannot read block bitmap",
    "writeback error",
    "I/O error",
];
/// A kernel WARN starts with this; the thread's WARN_ON_ONCE sits in page_mkwrite (iomap) or
/// __folio_mark_dirty (ext4).
const WARNING_LINES: &[&str] = &["WARNING:"];

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    // A new, empty file; then the metadata caches are dropped and every read starts failing.
    let mut file = env.create("submission", NEW, 0)?;
    if env.fs() == Fs::Ext4 {
        deepen_extent_tree(env, &file)?;
    }
    env.drop_metadata()?;
    if env.fs() == Fs::Ext4 {
        // ext4's metadata lives in the block device's page cache: drop that too.
        os::flush_buffers(&env.device).step("BLKFLSBUF")?;
        let device = std::fs::File::open(&env.device).step("open the device")?;
        os::fadvise_dontneed(&device).step("POSIX_FADV_DONTNEED on the device")?;
        f.share("ext4_extent_tree_block", extent_tree_block(env, &file, &device));
    }
    env.kernel_log();
    let armed = env.fail(Op::Read, Vec::new(), "fail-every-read")?;
    // Write it with write(): delayed allocation, no blocks yet, no reads needed. Map it, load
    // every page (page-table entries now point at them) and store into the first.
    file.writer.write_all_at(&NEW.bytes(0, LEN as usize), 0).step("write()")?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    map.load(0, LEN as usize).step("load every page")?.map_err(|b| StepError::new("load", b))?;
    map.store(0, &NEW.bytes(0, 64)).step("store")?.map_err(|b| StepError::new("store", b))?;
    // Writeback must allocate blocks, and allocation must read metadata: that fails.
    os::sync();
    let failed = env.disarm(&armed)?;
    env.heal()?;
    let lines = env.kernel_log();
    let submission_lines = matching(&lines, SUBMISSION_LINES);
    file.refresh_extents(LEN)?;
    let located = file.extents.iter().any(fiemap::Extent::located);
    let disk = if located { env.disk(&file, 0, LEN).ok() } else { None };
    let whole = fiemap::extents(&file.writer, 0, 1 << 30, false).map(|e| e.len()).map_err(|e| e.to_string());
    let context = json!({
        "file_extents_in_all": whole,
        "failed_reads": failed.len(),
        "first_failed_read": failed.first().map(crate::control::record_json),
        "extents_after": file.extents.iter().map(|e| json!({ "logical": e.logical, "physical": e.physical, "length": e.length, "flags": e.flags })).collect::<Vec<_>>(),
        "kernel_lines": log_texts(&submission_lines),
    });
    f.share("writeback", context);
    if failed.is_empty() {
        let why = "block allocation read no metadata while reads were failing (it was still cached), so writeback did not fail at submission";
        for id in IDS {
            f.set(id, Verdict::NotApplicable, Some(why.into()), Value::Null);
        }
        return Ok(());
    }
    if disk.as_deref().is_some_and(|d| NEW.matches(0, d)) {
        for id in IDS {
            f.set(id, Verdict::NotApplicable, Some("writeback succeeded despite the failed metadata reads (the allocator skipped what it could not read and wrote the data elsewhere)".into()), Value::Null);
        }
        return Ok(());
    }

    // The state of the mapped pages right after the failure, before anything touches them: a
    // read() would re-read a page that is not Uptodate and so hide the state.
    let states = PageStates::of(&map, 4);
    let bug_state = states.any_mapped_but_not_uptodate();
    f.share("page_flags_after_failure", states.evidence());

    // Page 1: a store through the mapping.
    env.kernel_log();
    let stored = map.store(4096, &REDIRTY.bytes(4096, 100)).step("store after the failure")?;
    let lines = env.kernel_log();
    let warnings = matching(&lines, WARNING_LINES);
    let ev = json!({
        "store": stored.map(|()| "ok".to_string()).unwrap_or_else(|b| b.to_string()),
        "warnings": log_texts(&warnings),
        "warning_context": log_texts(&lines.iter().take(12).collect::<Vec<_>>()),
    });
    f.judge(
        "submission.store-no-warning",
        warnings.is_empty(),
        "the kernel warned about dirtying a page that is not Uptodate",
        ev,
    );

    // Page 2: a partial write().
    let written = outcome(&file.writer.write_all_at(&SECOND.bytes(8192, 100), 8192));
    let page = read_at(&file.writer, 8192, 4096);
    let ev = json!({
        "write": written,
        "page_after": page.as_ref().map(|p| json!({ "first_100": classify(8192, &p[..100]), "rest": classify(8292, &p[100..]) })).unwrap_or_else(|e| json!({ "error": e })),
    });
    match &page {
        Ok(p) => f.judge(
            "submission.partial-write-keeps-page",
            NEW.matches(8292, &p[100..]),
            format!(
                "the rest of the page became {}: the write re-read a page the kernel had invalidated",
                classify(8292, &p[100..])
            ),
            ev,
        ),
        Err(e) => f.set(
            "submission.partial-write-keeps-page",
            Verdict::NotApplicable,
            Some(format!("read() fails with {e}")),
            ev,
        ),
    }

    // Page 0: an mmap load, then read().
    let views = env.views(&file, Some(&map), 0, 4096)?;
    let ev = json!({ "views": views.evidence() });
    match (views.mmap_bytes(), &views.read) {
        (Some(m), Ok(r)) => f.judge(
            "submission.mmap-read-agree",
            m == r.as_slice(),
            format!(
                "mmap shows {} data but read() returns {}: the page stayed mapped after it stopped being Uptodate",
                classify(0, m),
                classify(0, r)
            ),
            ev,
        ),
        (_, Err(e)) => match bug_state {
            Some(true) => f.set(
                "submission.mmap-read-agree",
                Verdict::Violated,
                Some(format!(
                    "read() fails with {e} while the mapping still shows the data of a page that is not Uptodate"
                )),
                ev,
            ),
            Some(false) => f.set(
                "submission.mmap-read-agree",
                Verdict::Holds,
                Some(format!("read() fails with {e} (filesystem shut down), but the mapped pages are still Uptodate")),
                ev,
            ),
            None => f.set(
                "submission.mmap-read-agree",
                Verdict::NotApplicable,
                Some(format!("read() fails with {e} and the page flags are unreadable")),
                ev,
            ),
        },
        (None, _) => {
            f.set("submission.mmap-read-agree", Verdict::Error, Some("the mapping raised SIGBUS on a load".into()), ev)
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::version::KernelVersion;

    #[test]
    fn xfs_is_expected_fixed_from_5_19_and_ext4_broken_on_5_x_and_fixed_after_7_0() {
        let t = |fs, v| Target { fs, kernel: Some(v) };
        assert_eq!(submission_fixed(&t(Fs::Xfs, KernelVersion::new(5, 10, 262))), Some(Verdict::Violated));
        assert_eq!(submission_fixed(&t(Fs::Xfs, KernelVersion::new(6, 1, 0))), Some(Verdict::Holds));
        assert_eq!(submission_fixed(&t(Fs::Ext4, KernelVersion::new(5, 10, 262))), Some(Verdict::Violated));
        assert_eq!(submission_fixed(&t(Fs::Ext4, KernelVersion::new(6, 12, 0))), None);
        assert_eq!(submission_fixed(&t(Fs::Ext4, KernelVersion::new(7, 2, 13))), Some(Verdict::Holds));
    }
}
