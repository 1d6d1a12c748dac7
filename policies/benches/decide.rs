//! Cost of `Engine::decide` per request as policies grow: 10, 1,000 and 10,000 rules.
//!
//! The rules look like large generated policies do: each targets one range (a file extent) on
//! one or two operations, some counted, some random, a few armed by triggers, plus a handful of
//! rules without a range. Requests go to random offsets across the whole device, so most meet no
//! rule and some meet one, as in a real workload.
//!
//! Run: `cargo bench -p nbdfault-policies --bench decide`

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use nbdfault_policies::{Engine, Op, Policy, Request, RequestFlags};

const EXTENT: u64 = 64 << 10;

fn policy(rules: usize) -> Policy {
    let mut yaml = String::from("seed: 1\nrules:\n");
    // A few unranged rules, which every request of their op meets.
    yaml.push_str("  - { name: slow-flush, when: { op: flush, probability: 0.1 }, then: { delay: 1ms..5ms } }\n");
    yaml.push_str("  - { name: fua, when: { op: write, fua: true, nth: { every: 1000 } }, then: { error: EIO } }\n");
    for i in 0..rules.saturating_sub(2) {
        let ops = ["write", "read", "[write, write_zeroes]", "trim"][i % 4];
        let start = (i as u64) * 2 * EXTENT;
        let extra = match i % 5 {
            0 => ", nth: { every: 3 }".to_string(),
            1 => ", probability: 0.5".to_string(),
            2 => format!(", armed_by: t{}", i % 7),
            3 => ", limit: 100".to_string(),
            _ => String::new(),
        };
        let then = if ops == "read" { "{ delay: 1ms }" } else { "{ error: EIO }" };
        let _ = writeln!(
            yaml,
            "  - {{ name: r{i}, when: {{ op: {ops}, range: {start}..+{EXTENT}{extra} }}, then: {then} }}"
        );
    }
    Policy::from_yaml(&yaml, "bench.yaml").expect("the generated policy is valid")
}

fn requests(rules: usize) -> Vec<Request> {
    // A fixed pseudo-random stream over twice the space the rules cover.
    let span = (rules as u64).max(8) * 4 * EXTENT;
    let mut state = 0x1234_5678_9abc_def0u64;
    (0..4096)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let op = [Op::Read, Op::Write, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes][i % 6];
            Request {
                op,
                offset: if op == Op::Flush { 0 } else { (state % span) & !4095 },
                length: if op == Op::Flush { 0 } else { 4096 << (state >> 60 & 3) },
                flags: RequestFlags { fua: state & 1 == 1, ..RequestFlags::default() },
                connection: 0,
                cookie: i as u64,
            }
        })
        .collect()
}

fn decide(c: &mut Criterion) {
    let mut group = c.benchmark_group("decide");
    group.throughput(Throughput::Elements(1));
    // 0: no policy at all, the fixed cost of the lock and the request index.
    for rules in [0usize, 10, 1_000, 10_000] {
        let engine = Engine::new((rules > 0).then(|| policy(rules)));
        for trigger in 0..7 {
            if trigger % 2 == 0 {
                engine.arm(&format!("t{trigger}"), Duration::ZERO);
            }
        }
        let requests = requests(rules);
        let mut next = 0;
        group.bench_function(BenchmarkId::from_parameter(rules), |b| {
            b.iter(|| {
                let request = &requests[next % requests.len()];
                next += 1;
                black_box(engine.decide(black_box(request), Duration::from_secs(1)))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);
