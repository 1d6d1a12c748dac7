//! A failed O_DIRECT write: the error comes back to the writer at once, and the page cache must
//! not keep bytes the disk does not have. The range is cached (read) and its first page mapped
//! before the write, so a stale page would show.

use serde_json::json;

use super::env::{Env, read_at};
use super::{CheckSpec, Findings, Scenario, Step, StepError, always_holds};
use crate::invariants::Class::Guaranteed as G;
use crate::os::mapping::{Mapping, resident_pages};
use crate::os::{self, outcome};
use crate::pattern::{NEW, OLD, classify};
use crate::policy::Op;

pub static SCENARIO: Scenario = Scenario {
    name: "direct",
    about: "an O_DIRECT write over cached (and mapped) pages fails: what the writer, read(), mmap and the disk see",
    checks: &[
        CheckSpec::new(
            "direct.write-returns-eio",
            1,
            G,
            "the failed O_DIRECT write returns EIO to its caller",
            always_holds,
        ),
        CheckSpec::new(
            "direct.views-match-disk",
            14,
            G,
            "after the failed O_DIRECT write, read() and an mmap load return what the disk holds (no stale cached page)",
            always_holds,
        ),
    ],
    run,
};

const LEN: u64 = 16 * 1024;

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let file = env.create("direct", OLD, LEN)?;
    read_at(&file.writer, 0, LEN).map_err(|e| StepError::new("read the file into the cache", e))?;
    let map = Mapping::shared(&file.writer, 4096).step("mmap page 0")?;
    map.load(0, 16).step("load page 0")?.map_err(|b| StepError::new("load page 0", b))?;
    let resident_before = resident_pages(&file.writer, LEN as usize).step("mincore")?;
    let armed = env.fail(Op::Write, env.write_ranges(&file, 0, LEN)?, "fail-file-data")?;
    let written = os::pwrite_direct(&file.path, 0, &NEW.bytes(0, LEN as usize));
    let failed = env.disarm(&armed)?;
    env.heal()?;
    let write = match &written {
        Ok(n) => format!("wrote {n} bytes"),
        Err(e) => outcome(&Err(std::io::Error::from_raw_os_error(e.raw_os_error().unwrap_or(0)))),
    };
    let resident_after = resident_pages(&file.writer, LEN as usize).step("mincore")?;
    let views = env.views(&file, Some(&map), 0, 4096)?;
    let whole = read_at(&file.writer, 0, LEN);
    let disk = env.disk(&file, 0, LEN);
    let fsync = outcome(&os::fsync(&file.writer));
    let ev = json!({
        "o_direct_write": write,
        "failed_requests": failed.len(),
        "resident_pages_before": resident_before,
        "resident_pages_after": resident_after,
        "page_0": views.evidence(),
        "read_whole_file": whole.as_ref().map(|b| classify(0, b)).map_err(Clone::clone),
        "disk_whole_file": disk.as_ref().map(|b| classify(0, b)).map_err(Clone::clone),
        "fsync_after": fsync,
    });
    if failed.is_empty() {
        return Err(StepError::new(
            "fail the O_DIRECT write",
            format!("the server failed no write of the file's blocks ({write})"),
        ));
    }
    f.judge("direct.write-returns-eio", write == "EIO", format!("the O_DIRECT write returned {write}"), ev.clone());
    let agree = match (&whole, &disk, views.mmap_bytes()) {
        (Ok(r), Ok(d), Some(m)) => r == d && m == &d[..4096],
        _ => false,
    };
    let summary = format!(
        "read() shows {}, page 0 through the mapping {}, the disk {}",
        whole.as_ref().map(|b| classify(0, b)).unwrap_or("an error"),
        views.mmap_bytes().map(|b| classify(0, b)).unwrap_or("SIGBUS"),
        disk.as_ref().map(|b| classify(0, b)).unwrap_or("?"),
    );
    f.judge("direct.views-match-disk", agree, summary, ev);
    Ok(())
}
