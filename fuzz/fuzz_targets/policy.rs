//! The policy parser: YAML text to a checked policy, its warnings, and the compiled form the
//! engine decides requests with.
#![no_main]

use std::time::Duration;

use nbdfault_policies::{Engine, Op, Policy, Request, RequestFlags};

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let Ok(policy) = Policy::from_yaml(text, "fuzz.yaml") else { return };
    let _ = policy.warnings();
    let engine = Engine::new(Some(policy));
    for (i, op) in Op::ALL.into_iter().enumerate() {
        let flags = RequestFlags { fua: i % 2 == 0, ..RequestFlags::default() };
        let request = Request { op, offset: (i as u64) << 12, length: 4096, flags, connection: 1, cookie: i as u64 };
        let _ = engine.decide(&request, Duration::from_millis(i as u64));
    }
});
