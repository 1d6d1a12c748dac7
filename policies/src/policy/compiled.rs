//! The compiled form of a policy: what the engine reads, and all it reads of this module.
//!
//! Everything here is plain data checked by the grammar and arranged for matching: operations
//! as bit sets, ranges as half-open pairs, triggers as positions in [`Compiled::triggers`].

use std::sync::Arc;
use std::time::Duration;

use crate::decision::{PowerCut, Reply};
use crate::index::RuleIndex;
use crate::request::Errno;
use crate::units::{ByteRange, DurationSpread};

/// A policy ready for matching.
#[derive(Debug)]
pub(crate) struct Compiled {
    pub seed: u64,
    /// Schedule entries first, then the rules, in file order: the evaluation order.
    pub rules: Vec<Rule>,
    /// How many of `rules` are schedule entries.
    pub scheduled: usize,
    pub bad_sectors: Vec<DeclaredBadSector>,
    /// Every trigger the policy names; rules refer to them by position.
    pub triggers: Vec<Arc<str>>,
    pub index: RuleIndex,
    /// The device loses unflushed writes in a power cut: `volatile_cache:`, or by default
    /// whether a rule cuts power. The server journals unflushed writes then.
    pub volatile_cache: bool,
}

/// One rule, ready for matching.
#[derive(Debug)]
pub(crate) struct Rule {
    pub name: Arc<str>,
    pub name_hash: u64,
    /// Bit set of [`crate::Op::bit`].
    pub ops: u8,
    /// Half-open ranges; empty means every offset.
    pub ranges: Vec<(u64, u64)>,
    /// Request lengths admitted, both bounds included; empty means every length.
    pub lengths: Vec<(u64, u64)>,
    /// Flags that must be set, and flags that must be clear ([`crate::RequestFlags::bits`]).
    pub flags_set: u8,
    pub flags_clear: u8,
    pub connections: Option<Vec<u64>>,
    pub requests: Option<Vec<u64>>,
    /// Policy trigger ids that must all be armed, and any of which disables the rule.
    pub armed_by: Vec<usize>,
    pub disarmed_by: Vec<usize>,
    pub window: Option<Window>,
    pub nth: Nth,
    pub counting: Counting,
    pub limit: Option<u64>,
    /// Fires when a draw is below this; `None` means always.
    pub threshold: Option<u64>,
    pub outcome: Outcome,
}

/// When a rule is active, in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Measure from the moment the `armed_by` triggers were (last) armed, not from server start.
    pub since_armed: bool,
    pub from: Duration,
    pub until: Option<Duration>,
    /// dm-flakey style: `up` then `down`, repeating; the rule is active in the down part.
    pub cycle: Option<(Duration, Duration)>,
}

impl Window {
    pub(crate) fn admits(&self, elapsed: Duration) -> bool {
        if elapsed < self.from || self.until.is_some_and(|until| elapsed >= until) {
            return false;
        }
        match self.cycle {
            None => true,
            Some((up, down)) => {
                let period = (up + down).as_nanos();
                let phase = elapsed.as_nanos() % period;
                phase >= up.as_nanos()
            }
        }
    }
}

/// What the occurrence counts (`nth`, `limit`, the draws of `probability`) count over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counting {
    /// Restart at each new arming of the `armed_by` triggers (`count: per_arming`, the default
    /// with `armed_by`); otherwise count from the policy's installation (`count: lifetime`).
    pub per_arming: bool,
    /// `count:` was written, so the author chose; warnings about ambiguity stay quiet.
    pub explicit: bool,
}

/// Which occurrences may fire, counting the requests that met every other condition (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nth {
    pub after: u64,
    pub every: u64,
    pub first: Option<u64>,
}

impl Default for Nth {
    fn default() -> Self {
        Nth { after: 0, every: 1, first: None }
    }
}

impl Nth {
    pub(crate) fn admits(&self, occurrence: u64) -> bool {
        let Some(counted) = occurrence.checked_sub(self.after).filter(|&counted| counted > 0) else {
            return false;
        };
        counted % self.every == 0 && self.first.is_none_or(|first| counted <= first)
    }
}

/// What a rule does when it fires.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub delay: Option<DurationSpread>,
    pub stall: Option<(Arc<str>, Option<Duration>)>,
    pub action: ActionSpec,
    pub reply: Reply,
    pub power_cut: Option<PowerCut>,
    /// With `sticky: true`, the errno the failed range keeps returning to reads.
    pub sticky: Option<Errno>,
    pub arm: Arc<[Arc<str>]>,
    pub disarm: Arc<[Arc<str>]>,
    pub arm_ids: Vec<usize>,
    pub disarm_ids: Vec<usize>,
    /// Schedule entries only: the logged decision came from a bad sector.
    pub bad_sector: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActionSpec {
    Perform,
    Skip,
    Torn(Tear),
    Corrupt { bytes: u32, seed: Option<u64> },
}

/// How many bytes of a torn write persist: a fixed count, or a seeded choice in `min..=max` in
/// steps of `align`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tear {
    pub min: u64,
    pub max: u64,
    pub align: u64,
}

/// A range the policy declares bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeclaredBadSector {
    pub range: ByteRange,
    pub errno: Errno,
    pub write_failures: u32,
    pub name: Arc<str>,
}

impl Rule {
    /// True when the rule decides every request of its operations: nothing else narrows it.
    pub(crate) fn always_fires(&self) -> bool {
        self.ranges.is_empty()
            && self.lengths.is_empty()
            && self.flags_set == 0
            && self.flags_clear == 0
            && self.connections.is_none()
            && self.requests.is_none()
            && self.armed_by.is_empty()
            && self.disarmed_by.is_empty()
            && self.window.is_none()
            && self.nth == Nth::default()
            && self.limit.is_none()
            && self.threshold.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nth_counts_after_skipping_and_within_first() {
        let every_third = Nth { after: 0, every: 3, first: None };
        assert_eq!((1..=9).filter(|&k| every_third.admits(k)).collect::<Vec<_>>(), [3, 6, 9]);
        let after_two = Nth { after: 2, every: 1, first: Some(2) };
        assert_eq!((1..=9).filter(|&k| after_two.admits(k)).collect::<Vec<_>>(), [3, 4]);
        let third_only = Nth { after: 2, every: 1, first: Some(1) };
        assert_eq!((1..=9).filter(|&k| third_only.admits(k)).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_cycle_is_active_only_in_its_down_part() {
        let window = Window {
            since_armed: false,
            from: Duration::ZERO,
            until: None,
            cycle: Some((Duration::from_secs(9), Duration::from_secs(1))),
        };
        assert!(!window.admits(Duration::from_millis(8999)));
        assert!(window.admits(Duration::from_millis(9000)));
        assert!(window.admits(Duration::from_millis(9999)));
        assert!(!window.admits(Duration::from_millis(10_000)));
        assert!(window.admits(Duration::from_millis(19_500)));
    }
}
