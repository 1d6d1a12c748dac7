//! A read fault on a page that is not cached, while the disk read fails: SIGBUS for the mapping,
//! EIO for read().

use serde_json::json;

use super::env::{Env, read_at};
use super::{CheckSpec, Findings, Scenario, Step, StepError, always_holds};
use crate::invariants::Class::Guaranteed as G;
use crate::os::mapping::Mapping;
use crate::pattern::{OLD, classify};
use crate::policy::Op;

pub static SCENARIO: Scenario = Scenario {
    name: "read-fault",
    about: "failed reads of uncached pages: SIGBUS through mmap, EIO through read()",
    checks: &[
        CheckSpec::new(
            "readfault.mmap-sigbus",
            23,
            G,
            "a load from an uncached page whose disk read fails raises SIGBUS",
            always_holds,
        ),
        CheckSpec::new(
            "readfault.read-eio",
            23,
            G,
            "read() of an uncached page whose disk read fails returns EIO",
            always_holds,
        ),
    ],
    run,
};

const LEN: u64 = 64 * 1024;

fn run(env: &mut Env, f: &mut Findings) -> Result<(), StepError> {
    let file = env.create("read-fault", OLD, LEN)?;
    let resident = env.evict(&file.writer, LEN)?;
    if resident.iter().any(|r| *r) {
        return Err(StepError::new("evict the file", format!("pages stay cached: {resident:?}")));
    }
    let armed = env.fail(Op::Read, file.device_ranges(0, LEN), "fail-file-reads")?;
    let load = Mapping::shared(&file.writer, LEN as usize)
        .and_then(|m| m.load(0, 16))
        .map(|r| r.map(|b| classify(0, &b).to_string()))
        .map_err(|e| e.to_string());
    // read() a page the mapping's readahead did not ask for.
    let read = read_at(&file.writer, LEN - 4096, 4096);
    let failed = env.disarm(&armed)?;
    env.heal()?;
    if failed.is_empty() {
        return Err(StepError::new("fail the reads", "the server failed no read of the file's blocks"));
    }
    let load = load.step("mmap and load")?;
    let after = Mapping::shared(&file.writer, LEN as usize)
        .step("mmap after healing")?
        .load(0, 16)
        .step("load after healing")?;
    let ev = json!({
        "failed_reads": failed.len(),
        "mmap_load": match &load { Ok(c) => json!({ "content": c }), Err(bus) => json!({ "sigbus_at_mapping_offset": bus.offset }) },
        "read": read.as_ref().map(|b| classify(LEN - 4096, b).to_string()).unwrap_or_else(|e| format!("error {e}")),
        "mmap_load_after_healing": after.as_ref().map(|b| classify(0, b).to_string()).unwrap_or_else(|b| b.to_string()),
    });
    f.judge("readfault.mmap-sigbus", load.is_err(), "the load did not raise SIGBUS", ev.clone());
    f.judge("readfault.read-eio", read.as_ref().err().is_some_and(|e| e == "EIO"), "read() did not return EIO", ev);
    Ok(())
}
