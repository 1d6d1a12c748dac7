//! Cost of reading a policy and of its warnings as it grows, and of refusing hostile input:
//! the work the control plane does for `PUT .../policy` and `nbdfault policy check`.
//!
//! Run: `cargo bench -p nbdfault-policies --bench check`

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use nbdfault_policies::Policy;

/// `rules` rules that an unranged rule above them shadows: every one of them gets a warning.
fn shadowed(rules: usize) -> String {
    let mut yaml = String::from("rules:\n  - name: all-reads\n    when: { op: read }\n    then: { delay: 1ms }\n");
    for i in 0..rules {
        let _ = writeln!(
            yaml,
            "  - name: r{i}\n    when: {{ op: read, range: {i}MiB..+4KiB }}\n    then: {{ error: EIO }}"
        );
    }
    yaml
}

fn check(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for rules in [1_000, 10_000, 20_000] {
        let yaml = shadowed(rules);
        group.bench_with_input(BenchmarkId::new("from_yaml", rules), &yaml, |b, yaml| {
            b.iter(|| Policy::from_yaml(black_box(yaml), "bench.yaml").unwrap());
        });
        let policy = Policy::from_yaml(&yaml, "bench.yaml").unwrap();
        group.bench_with_input(BenchmarkId::new("warnings", rules), &policy, |b, policy| {
            b.iter(|| assert_eq!(black_box(policy).warnings().len(), rules));
        });
    }
    let nested = format!("rules: {}{}\n", "[".repeat(80_000), "]".repeat(80_000));
    group.bench_function("refuse_nested_80000", |b| {
        b.iter(|| Policy::from_yaml(black_box(&nested), "bench.yaml").unwrap_err());
    });
    group.finish();
}

criterion_group!(benches, check);
criterion_main!(benches);
