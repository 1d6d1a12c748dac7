//! The policy fuzz target's committed inputs (fuzz/seeds/policy: seeds, and every input a fuzzer
//! once crashed on), replayed the way the target runs them: parse, warnings, a decision per
//! operation. A crash found by `scripts/fuzz.sh policy` is added there and stays tested here.

use std::time::Duration;

use nbdfault_policies::{Engine, Op, Policy, Request, RequestFlags};

#[test]
fn every_committed_policy_fuzz_input_parses_or_is_refused_without_a_panic() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/policy");
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).expect("fuzz/seeds/policy is committed") {
        let path = entry.expect("a directory entry").path();
        let bytes = std::fs::read(&path).expect("a fuzz input");
        count += 1;
        let Ok(text) = std::str::from_utf8(&bytes) else { continue };
        let Ok(policy) = Policy::from_yaml(text, &path.display().to_string()) else { continue };
        let _ = policy.warnings();
        let engine = Engine::new(Some(policy));
        for (i, op) in Op::ALL.into_iter().enumerate() {
            let flags = RequestFlags { fua: i % 2 == 0, ..RequestFlags::default() };
            let request =
                Request { op, offset: (i as u64) << 12, length: 4096, flags, connection: 1, cookie: i as u64 };
            let _ = engine.decide(&request, Duration::from_millis(i as u64));
        }
    }
    assert!(count > 0, "no inputs in {}", dir.display());
}
