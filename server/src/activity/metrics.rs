//! Per-export request counters and latency histograms, recorded with relaxed atomics only: no
//! lock and no allocation per request. `/metrics` reads them when it is scraped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nbdfault_policies::{Op, Outcome};

/// Upper bounds of the latency buckets, in seconds: from a page-cache hit to a stall.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 5.0, 30.0,
];

/// The same bounds in nanoseconds, for recording.
const BUCKET_NS: [u64; 18] = {
    let mut out = [0u64; 18];
    let mut i = 0;
    while i < LATENCY_BUCKETS.len() {
        out[i] = (LATENCY_BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    out
};

/// Distinct rules counted per export; faults of later rules count under `rule="(other)"`, so a
/// long run that swaps many generated policies cannot grow the table without bound.
pub const MAX_FAULT_RULES: usize = 4096;
/// Every outcome, in the order of their counts.
const OUTCOMES: [Outcome; 11] = [
    Outcome::Pass,
    Outcome::Delay,
    Outcome::Stall,
    Outcome::Error,
    Outcome::PersistedError,
    Outcome::SilentLoss,
    Outcome::Torn,
    Outcome::CorruptRead,
    Outcome::Disconnect,
    Outcome::PowerCut,
    Outcome::BadSector,
];
/// The rule name the rules beyond [`MAX_FAULT_RULES`] are counted under.
pub const OTHER_RULES: &str = "(other)";

/// One operation's counters.
#[derive(Default)]
struct OpCounters {
    requests: AtomicU64,
    errors: AtomicU64,
    bytes: AtomicU64,
    latency_sum_ns: AtomicU64,
    /// Requests per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
}

/// What one operation's counters hold at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct OpSnapshot {
    pub op: Op,
    pub requests: u64,
    pub errors: u64,
    pub bytes: u64,
    pub latency_sum: f64,
    /// Requests per bucket (not cumulative), by upper bound, +Inf last.
    pub buckets: Vec<(f64, u64)>,
    /// Requests in the histogram: the sum of `buckets`.
    pub latency_count: u64,
}

/// Counters of one export.
#[derive(Default)]
pub struct RequestMetrics {
    ops: [OpCounters; Op::ALL.len()],
    in_flight_requests: AtomicU64,
    in_flight_bytes: AtomicU64,
    connections_open: AtomicU64,
    faults: Mutex<HashMap<Arc<str>, [u64; OUTCOMES.len()]>>,
}

impl RequestMetrics {
    /// A request entered the device: counted in flight until [`RequestMetrics::ended`].
    pub fn began(&self, bytes: u64) {
        self.in_flight_requests.fetch_add(1, Ordering::Relaxed);
        if bytes > 0 {
            self.in_flight_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// A request left the device, finished or cancelled.
    pub fn ended(&self, bytes: u64) {
        self.in_flight_requests.fetch_sub(1, Ordering::Relaxed);
        if bytes > 0 {
            self.in_flight_bytes.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// A request was answered: `bytes` it moved (counted only when it succeeded), whether it
    /// failed, and how long it took.
    pub fn finished(&self, op: Op, bytes: u64, failed: bool, latency: Duration) {
        let counters = &self.ops[op as usize];
        counters.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            counters.errors.fetch_add(1, Ordering::Relaxed);
        } else if bytes > 0 {
            counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        let nanos = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        counters.latency_sum_ns.fetch_add(nanos, Ordering::Relaxed);
        let bucket = BUCKET_NS.partition_point(|&bound| bound < nanos);
        counters.buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// A rule (or a bad sector) touched a request. Faults are rarer than requests and already
    /// take the fault log's lock, so a small map under a lock is fine here.
    pub fn fault(&self, rule: &str, outcome: Outcome) {
        let mut faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let slot = OUTCOMES.iter().position(|&known| known == outcome).unwrap_or(0);
        if let Some(counts) = faults.get_mut(rule) {
            counts[slot] += 1;
            return;
        }
        let rule = if faults.len() < MAX_FAULT_RULES { rule } else { OTHER_RULES };
        faults.entry(Arc::from(rule)).or_insert([0; OUTCOMES.len()])[slot] += 1;
    }

    /// A connection attached to the export: it counts as open while the guard lives.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.connections_open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(self))
    }

    pub fn snapshot(&self, op: Op) -> OpSnapshot {
        let counters = &self.ops[op as usize];
        let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&counters.buckets)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        OpSnapshot {
            op,
            requests: counters.requests.load(Ordering::Relaxed),
            errors: counters.errors.load(Ordering::Relaxed),
            bytes: counters.bytes.load(Ordering::Relaxed),
            latency_sum: counters.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
            latency_count: buckets.iter().map(|(_, count)| count).sum(),
            buckets,
        }
    }

    pub fn in_flight(&self) -> (u64, u64) {
        (self.in_flight_requests.load(Ordering::Relaxed), self.in_flight_bytes.load(Ordering::Relaxed))
    }

    pub fn connections_open(&self) -> u64 {
        self.connections_open.load(Ordering::Relaxed)
    }

    /// Faults per (rule, outcome), sorted by rule.
    pub fn faults(&self) -> Vec<(Arc<str>, Outcome, u64)> {
        let faults = self.faults.lock().unwrap_or_else(PoisonError::into_inner);
        let mut rules: Vec<_> = faults.iter().collect();
        rules.sort_by(|a, b| a.0.cmp(b.0));
        rules
            .into_iter()
            .flat_map(|(rule, counts)| {
                OUTCOMES
                    .iter()
                    .zip(counts)
                    .filter(|(_, count)| **count > 0)
                    .map(|(outcome, count)| (rule.clone(), *outcome, *count))
            })
            .collect()
    }
}

/// An open connection, counted until dropped.
pub struct OpenConnection(Arc<RequestMetrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An outcome's name as the fault log writes it.
pub fn outcome_name(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Pass => "pass",
        Outcome::Delay => "delay",
        Outcome::Stall => "stall",
        Outcome::Error => "error",
        Outcome::PersistedError => "persisted_error",
        Outcome::SilentLoss => "silent_loss",
        Outcome::Torn => "torn",
        Outcome::CorruptRead => "corrupt_read",
        Outcome::Disconnect => "disconnect",
        Outcome::PowerCut => "power_cut",
        Outcome::BadSector => "bad_sector",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_land_in_the_first_bucket_that_holds_them() {
        let metrics = RequestMetrics::default();
        metrics.finished(Op::Write, 4096, false, Duration::from_micros(10));
        metrics.finished(Op::Write, 4096, false, Duration::from_micros(11));
        metrics.finished(Op::Write, 4096, true, Duration::from_secs(60));
        let write = metrics.snapshot(Op::Write);
        assert_eq!((write.requests, write.errors, write.bytes), (3, 1, 8192));
        assert_eq!(write.buckets[0], (0.000_01, 1), "10 us is within the 10 us bound");
        assert_eq!(write.buckets[1], (0.000_025, 1));
        assert_eq!(write.buckets[LATENCY_BUCKETS.len() - 1].1, 0, "60 s is over the last bound");
        assert_eq!(*write.buckets.last().unwrap(), (f64::INFINITY, 1));
        assert_eq!(write.latency_count, 3);
        assert!((write.latency_sum - 60.000_021).abs() < 1e-9, "{}", write.latency_sum);
        assert_eq!(metrics.snapshot(Op::Read).requests, 0);
    }

    #[test]
    fn in_flight_and_open_connections_go_up_and_down() {
        let metrics = Arc::new(RequestMetrics::default());
        metrics.began(4096);
        metrics.began(0);
        assert_eq!(metrics.in_flight(), (2, 4096));
        metrics.ended(4096);
        assert_eq!(metrics.in_flight(), (1, 0));
        let open = metrics.connection_opened();
        assert_eq!(metrics.connections_open(), 1);
        drop(open);
        assert_eq!(metrics.connections_open(), 0);
    }

    #[test]
    fn faults_are_counted_per_rule_and_outcome_within_a_bounded_table() {
        let metrics = RequestMetrics::default();
        metrics.fault("a", Outcome::Error);
        metrics.fault("a", Outcome::Error);
        metrics.fault("a", Outcome::Delay);
        assert_eq!(metrics.faults(), vec![(Arc::from("a"), Outcome::Delay, 1), (Arc::from("a"), Outcome::Error, 2)]);
        for i in 0..MAX_FAULT_RULES + 10 {
            metrics.fault(&format!("r{i}"), Outcome::Error);
        }
        let faults = metrics.faults();
        assert_eq!(faults.len(), MAX_FAULT_RULES + 2);
        let other = faults.iter().find(|(rule, _, _)| &**rule == OTHER_RULES).unwrap();
        assert_eq!(other.2, 11, "the rules beyond the table's size are counted together");
    }
}
