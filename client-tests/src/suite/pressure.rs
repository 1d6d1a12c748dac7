//! Eviction by memory pressure instead of drop_caches: the file's pages are charged to a memory
//! cgroup, the writeback fails, and the group's memory is reclaimed. Reclaim, unlike drop_caches
//! and POSIX_FADV_DONTNEED, may also take mapped pages: do the views change?

use std::os::unix::fs::FileExt;

use serde_json::json;

use super::env::{Env, PageStates, read_at};
use super::{CheckSpec, Findings, Scenario, Step, StepError, always_holds};
use crate::invariants::Class::Guaranteed as G;
use crate::os::cgroup::MemoryCgroup;
use crate::os::mapping::{Mapping, resident_pages};
use crate::pattern::{NEW, OLD, classify};
use crate::policy::Op;
use crate::report::Verdict;

pub static SCENARIO: Scenario = Scenario {
    name: "pressure",
    about: "reclaim in a memory-limited cgroup evicts the failed pages: what mmap, read() and the disk show",
    checks: &[
        CheckSpec::new(
            "pressure.evicted-read-old",
            17,
            G,
            "pages of the failed write reclaimed under memory pressure read back as the old on-disk data",
            always_holds,
        ),
        CheckSpec::new(
            "pressure.mmap-read-agree",
            14,
            G,
            "after reclaim, a load through the mapping kept all along and read() agree",
            always_holds,
        ),
    ],
    run,
};

const LEN: u64 = 64 * 1024;
/// Pages 0..4 are dirtied through the mapping (kept), 4..16 with write().
const MAPPED: u64 = 16 * 1024;

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let cgroup = match MemoryCgroup::create("nbdfault-pressure") {
        Ok(c) => c,
        Err(e) => {
            for id in ["pressure.evicted-read-old", "pressure.mmap-read-agree"] {
                f.set(id, Verdict::NotApplicable, Some(format!("no memory cgroup: {e}")), json!({}));
            }
            return Ok(());
        }
    };
    cgroup.enter().step("enter the memory cgroup")?;
    let file = env.create("pressure", OLD, LEN)?;
    let map = Mapping::shared(&file.writer, MAPPED as usize).step("mmap the file")?;
    let policy = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    map.store(0, &NEW.bytes(0, MAPPED as usize)).step("store")?.map_err(|b| StepError::new("store", b))?;
    file.writer.write_all_at(&NEW.bytes(MAPPED, (LEN - MAPPED) as usize), MAPPED).step("write()")?;
    let failed = env.sync_and_heal(policy)?;
    cgroup.leave().step("leave the memory cgroup")?;
    let charged_before = cgroup.current();
    let resident_before = resident_pages(&file.writer, LEN as usize).step("mincore")?;
    let how = cgroup.reclaim().step("reclaim the cgroup's memory")?;
    let charged_after = cgroup.current();
    let resident_after = resident_pages(&file.writer, LEN as usize).step("mincore")?;
    // Page flags first: a load or read() would bring evicted pages back.
    let flags = PageStates::of(&map, (MAPPED / 4096) as usize);
    let mapped = map.load(0, MAPPED as usize).step("load through the mapping")?;
    let read_mapped = read_at(&file.writer, 0, MAPPED);
    let read_rest = read_at(&file.writer, MAPPED, LEN - MAPPED);
    let disk = env.disk(&file, 0, LEN);
    let ev = json!({
        "failed_requests": failed.len(),
        "reclaimed_with": how,
        "cgroup_bytes_before": charged_before,
        "cgroup_bytes_after": charged_after,
        "resident_pages_before": resident_before,
        "resident_pages_after": resident_after,
        "mapped_page_flags_after": flags.evidence(),
        "mmap_pages_0_3": mapped.as_ref().map(|b| classify(0, b).to_string()).unwrap_or_else(|b| b.to_string()),
        "read_pages_0_3": read_mapped.as_ref().map(|b| classify(0, b)).map_err(Clone::clone),
        "read_pages_4_15": read_rest.as_ref().map(|b| classify(MAPPED, b)).map_err(Clone::clone),
        "disk": disk.as_ref().map(|b| classify(0, b)).map_err(Clone::clone),
    });
    drop(cgroup);
    let unmapped_gone = resident_after[(MAPPED / 4096) as usize..].iter().all(|r| !*r);
    if unmapped_gone {
        f.judge(
            "pressure.evicted-read-old",
            read_rest.as_ref().is_ok_and(|b| OLD.matches(MAPPED, b)),
            format!(
                "the reclaimed pages read back as {}",
                read_rest.as_ref().map(|b| classify(MAPPED, b)).unwrap_or("an error")
            ),
            ev.clone(),
        );
    } else {
        f.set(
            "pressure.evicted-read-old",
            Verdict::NotApplicable,
            Some("reclaim left some of the unmapped pages cached".into()),
            ev.clone(),
        );
    }
    let agree = matches!((&mapped, &read_mapped), (Ok(m), Ok(r)) if m == r);
    f.judge("pressure.mmap-read-agree", agree, "the mapping and read() show different bytes after reclaim", ev);
    Ok(())
}
