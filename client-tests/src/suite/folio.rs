//! Large folios: XFS (and ext4 from 6.16) caches a file in folios larger than a page. One 4 KiB
//! block inside such a folio fails; what happens to the other blocks of the folio? The device is
//! limited to 4 KiB requests for the scenario, so the server fails exactly that block and the
//! other blocks' writes succeed.

use std::os::unix::fs::FileExt;

use serde_json::{Value, json};

use super::env::{Env, PageStates, read_at};
use super::{CheckSpec, Findings, Fs, Scenario, Step, StepError, always_holds, unknown};
use crate::invariants::Class::{Guaranteed as G, VersionDependent as VD};
use crate::os::mapping::Mapping;
use crate::pattern::{NEW, OLD, classify};
use crate::policy::Op;
use crate::report::Verdict;

pub static SCENARIO: Scenario = Scenario {
    name: "large-folio",
    about: "one 4 KiB block inside a large folio fails: the other blocks of the folio, cached and after eviction",
    checks: &[
        CheckSpec::new(
            "large-folio.cached-read-new",
            13,
            G,
            "while cached, read() returns the new data in every block of the folio, the failed one included",
            always_holds,
        ),
        CheckSpec::new(
            "large-folio.only-failed-block-lost",
            17,
            VD,
            "after eviction only the failed block reads the old data: the folio's other blocks reached the disk",
            unknown,
        ),
    ],
    run,
};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 16;
const LEN: u64 = BLOCK * BLOCKS;
/// The block that fails, inside the first folio.
const FAILED: u64 = 5;

/// Limits the device to 4 KiB requests while alive, so one failed request is one block.
fn small_requests(device: &std::path::Path) -> std::io::Result<crate::os::Setting> {
    let name = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    crate::os::Setting::set(format!("/sys/block/{name}/queue/max_sectors_kb"), "4")
}

/// Which pages start a folio: runs of a head page and its tails, as page counts.
fn folio_sizes(states: &Value) -> Vec<usize> {
    let mut sizes = Vec::new();
    for s in states.as_array().into_iter().flatten() {
        let tail = s["folio_tail"].as_bool().unwrap_or(false);
        match sizes.last_mut() {
            Some(n) if tail => *n += 1,
            _ => sizes.push(1),
        }
    }
    sizes
}

fn per_block(data: &Result<Vec<u8>, String>) -> Value {
    match data {
        Ok(b) => {
            json!(b.chunks(BLOCK as usize).enumerate().map(|(i, c)| classify(i as u64 * BLOCK, c)).collect::<Vec<_>>())
        }
        Err(e) => json!({ "error": e }),
    }
}

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    if env.fs() == Fs::Btrfs {
        let why =
            "copy-on-write sends the new blocks somewhere new, so one block of them cannot be singled out to fail";
        for id in ["large-folio.cached-read-new", "large-folio.only-failed-block-lost"] {
            f.set(id, Verdict::NotApplicable, Some(why.into()), json!({}));
        }
        return Ok(());
    }
    let _small = small_requests(&env.device).step("limit the device to 4 KiB requests")?;
    let file = env.create("large-folio", OLD, LEN)?;
    // Start from an empty cache so the write below builds its own (large) folios.
    let resident = env.evict(&file.writer, LEN)?;
    if resident.iter().any(|r| *r) {
        return Err(StepError::new("evict the file", format!("pages stay cached: {resident:?}")));
    }
    let failing = file.device_ranges(FAILED * BLOCK, BLOCK);
    let policy = env.fail(Op::Write, failing.clone(), "fail-one-block")?;
    file.writer.write_all_at(&NEW.bytes(0, LEN as usize), 0).step("write() the whole file")?;
    let map = Mapping::shared(&file.writer, LEN as usize).step("mmap the file")?;
    map.load(0, LEN as usize).step("load every page")?.map_err(|b| StepError::new("load", b))?;
    let before = PageStates::of(&map, BLOCKS as usize).evidence();
    let failed = env.sync_and_heal(policy)?;
    let after = PageStates::of(&map, BLOCKS as usize).evidence();
    let cached = read_at(&file.writer, 0, LEN);
    let mmap = map.load(0, LEN as usize).step("load every page")?;
    let disk = env.disk(&file, 0, LEN);
    drop(map);
    let resident = env.evict(&file.writer, LEN)?;
    let evicted = read_at(&file.writer, 0, LEN);
    let sizes = folio_sizes(&before);
    let ev = json!({
        "failed_block": FAILED,
        "failed_requests": failed.iter().map(|r| json!({ "offset": r.offset, "length": r.length })).collect::<Vec<_>>(),
        "failing_device_range": failing,
        "folio_pages_before_writeback": sizes,
        "large_folios": sizes.iter().any(|n| *n > 1),
        "page_flags_before_writeback": before,
        "page_flags_after_writeback": after,
        "cached_read_blocks": per_block(&cached),
        "cached_mmap_blocks": per_block(&mmap.map_err(|b| b.to_string())),
        "disk_blocks": per_block(&disk),
        "resident_after_eviction": resident,
        "evicted_read_blocks": per_block(&evicted),
    });
    if !sizes.iter().any(|n| *n > 1) {
        let why = "the kernel cached the file in single pages, not in a large folio";
        for id in ["large-folio.cached-read-new", "large-folio.only-failed-block-lost"] {
            f.set(id, Verdict::NotApplicable, Some(why.into()), ev.clone());
        }
        return Ok(());
    }
    f.judge(
        "large-folio.cached-read-new",
        cached.as_ref().is_ok_and(|b| NEW.matches(0, b)),
        "read() of the cached file does not return the new data in every block",
        ev.clone(),
    );
    if resident.iter().any(|r| *r) {
        f.set(
            "large-folio.only-failed-block-lost",
            Verdict::Error,
            Some("pages stayed cached after eviction".into()),
            ev,
        );
        return Ok(());
    }
    let expected = |i: u64, b: &[u8]| if i == FAILED { OLD.matches(i * BLOCK, b) } else { NEW.matches(i * BLOCK, b) };
    let only_failed =
        evicted.as_ref().is_ok_and(|b| b.chunks(BLOCK as usize).enumerate().all(|(i, c)| expected(i as u64, c)));
    f.judge(
        "large-folio.only-failed-block-lost",
        only_failed,
        "after eviction the file is not new data with only the failed block old (see evicted_read_blocks and disk_blocks)",
        ev,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folio_sizes_count_a_head_and_its_tails() {
        let states = json!([
            {"folio_head": true, "folio_tail": false},
            {"folio_head": false, "folio_tail": true},
            {"folio_head": false, "folio_tail": true},
            {"folio_head": false, "folio_tail": false},
            {"present": false},
        ]);
        assert_eq!(folio_sizes(&states), vec![3, 1, 1]);
    }
}
