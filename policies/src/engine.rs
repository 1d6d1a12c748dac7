//! The engine: one per export, shared by all its connections, deciding every request.
//!
//! How rules combine (docs/policy-reference.md says the same for policy authors):
//! 1. The index yields the rules whose `op`, `range` and `request` can concern the request.
//! 2. In policy order (schedule entries first), each rule whose other conditions hold (flags,
//!    connection, triggers, time window) counts the request as its next occurrence. Every such
//!    rule counts it, whether or not an earlier rule fires: a rule's count never depends on the
//!    other rules.
//! 3. A rule whose occurrence passes `nth`, whose `limit` is not used up, and whose seeded
//!    `probability` draw succeeds is eligible. The first eligible rule decides the request and
//!    uses up one of its `limit`; later eligible rules do nothing this time.
//! 4. Bad sectors: if the deciding outcome would do the I/O and reply success (or no rule
//!    decided), a read of a bad range, or a write over one with write failures left, fails with
//!    its errno instead. The rule's wait still applies.
//! 5. The deciding rule's `arm` and `disarm` take effect after the decision: they change what the
//!    next request sees, not this one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::bad_sectors::{BadSector, BadSectors};
use crate::decision::{Action, Decision, Reply, Wait};
use crate::index::Scratch;
use crate::policy::Policy;
use crate::policy::compiled::{ActionSpec, Rule};
use crate::random::{Purpose, below, draw};
use crate::request::{Op, Request};

/// Decides what happens to every request of one export. `Send + Sync`: share it in an `Arc`.
pub struct Engine {
    state: Mutex<State>,
    changes: watch::Sender<u64>,
    /// The empty trigger list, shared by every decision that arms nothing.
    none: Arc<[Arc<str>]>,
}

/// A named trigger as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TriggerState {
    pub name: Arc<str>,
    pub armed: bool,
    /// Time since server start of the last arm or disarm; zero if it never changed.
    #[serde(rename = "since_ns", serialize_with = "as_nanos")]
    pub since: Duration,
}

/// How often a rule met its conditions and how often it decided a request, since its policy was
/// installed (across armings, even when `nth` and `limit` count per arming).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleCounter {
    pub rule: Arc<str>,
    /// Requests that met every condition except `nth`, `limit` and `probability`.
    pub occurrences: u64,
    /// Requests this rule decided.
    pub fired: u64,
}

fn as_nanos<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX))
}

#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    /// What `nth`, `limit` and the draws read: counted since the policy was installed, or since
    /// the latest arming of the rule's `armed_by` triggers with `count: per_arming`.
    occurrences: u64,
    fired: u64,
    /// The arming the counts above belong to: the sum of the `armings` of the rule's `armed_by`
    /// triggers, which grows with every new arming of any of them and never otherwise.
    arming: u64,
    /// Since the policy was installed, for the control API.
    total_occurrences: u64,
    total_fired: u64,
}

#[derive(Debug)]
struct Trigger {
    name: Arc<str>,
    armed: bool,
    since: Duration,
    /// How many times it went from disarmed to armed.
    armings: u64,
}

/// What a policy swap builds before it takes the lock: the time it takes grows with the policy.
struct Prepared {
    counters: Vec<Counter>,
    declared: BadSectors,
}

impl Prepared {
    fn new(policy: Option<&Policy>) -> Prepared {
        match policy {
            Some(policy) => Prepared {
                counters: vec![Counter::default(); policy.compiled().rules.len()],
                declared: BadSectors::declared(&policy.compiled().bad_sectors),
            },
            None => Prepared { counters: Vec::new(), declared: BadSectors::default() },
        }
    }
}

/// What a policy swap replaced, dropped after the lock is released: freeing a large policy
/// takes time no request should wait for.
struct Replaced {
    _policy: Option<Arc<Policy>>,
    _counters: Vec<Counter>,
    _bad_sectors: BadSectors,
}

struct State {
    policy: Option<Arc<Policy>>,
    /// One per rule of `policy`.
    counters: Vec<Counter>,
    /// Every trigger ever named by a policy or the control API; never removed, so a trigger
    /// keeps its state across policy swaps.
    triggers: Vec<Trigger>,
    trigger_ids: HashMap<Arc<str>, usize>,
    /// Position in `triggers` of each trigger of `policy`, by the policy's own numbering.
    policy_triggers: Vec<usize>,
    next_request: u64,
    bad_sectors: BadSectors,
    /// Reused lookup buffers, so a decision allocates nothing.
    scratch: Scratch,
}

impl State {
    fn trigger_slot(&mut self, name: &str) -> usize {
        if let Some(&slot) = self.trigger_ids.get(name) {
            return slot;
        }
        let name: Arc<str> = Arc::from(name);
        self.triggers.push(Trigger { name: name.clone(), armed: false, since: Duration::ZERO, armings: 0 });
        self.trigger_ids.insert(name, self.triggers.len() - 1);
        self.triggers.len() - 1
    }

    /// Installs `policy` and hands back the one it replaces, for the caller to drop after
    /// releasing the lock: freeing a large policy takes time no request should wait for.
    #[must_use]
    fn install(&mut self, policy: Option<Arc<Policy>>, prepared: Prepared) -> Replaced {
        let Prepared { counters, declared } = prepared;
        let bad_sectors = self.bad_sectors.replace_declared(declared);
        let counters = std::mem::replace(&mut self.counters, counters);
        self.policy_triggers = match &policy {
            Some(policy) => policy.compiled().triggers.iter().map(|name| self.trigger_slot(name)).collect(),
            None => Vec::new(),
        };
        Replaced {
            _policy: std::mem::replace(&mut self.policy, policy),
            _counters: counters,
            _bad_sectors: bad_sectors,
        }
    }

    /// Sets a trigger; returns whether it changed.
    fn set_trigger(&mut self, slot: usize, armed: bool, now: Duration) -> bool {
        set(&mut self.triggers, slot, armed, now)
    }
}

impl Engine {
    pub fn new(policy: Option<Policy>) -> Engine {
        Engine::with_shared_policy(policy.map(Arc::new))
    }

    /// Like [`Engine::new`], for a policy also kept elsewhere (the control API shows its source).
    pub fn with_shared_policy(policy: Option<Arc<Policy>>) -> Engine {
        let mut state = State {
            policy: None,
            counters: Vec::new(),
            triggers: Vec::new(),
            trigger_ids: HashMap::new(),
            policy_triggers: Vec::new(),
            next_request: 0,
            bad_sectors: BadSectors::default(),
            scratch: Scratch::default(),
        };
        let prepared = Prepared::new(policy.as_deref());
        let _none = state.install(policy, prepared);
        Engine { state: Mutex::new(state), changes: watch::Sender::new(0), none: Arc::from(Vec::new()) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent at every await-free step, so a panic elsewhere while the lock
        // was held leaves nothing half-done worth refusing service over.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides one request. Call it for every request of the export, in the order they arrive,
    /// so request indices (and so replay) line up. `now` is the time since server start.
    pub fn decide(&self, request: &Request, now: Duration) -> Decision {
        let mut guard = self.lock();
        let State { policy, counters, triggers, policy_triggers, next_request, bad_sectors, scratch, .. } = &mut *guard;
        let request_index = *next_request;
        *next_request += 1;
        let Some(policy) = policy.as_deref().map(Policy::compiled) else {
            return Decision::pass(request_index, &self.none);
        };
        let armed = |id: usize| triggers[policy_triggers[id]].armed;
        let ranged = request.op != Op::Flush;
        policy.index.candidates(request.op, request.offset, request.end(), ranged, request_index, scratch);

        let mut deciding: Option<(&Rule, u64)> = None;
        for &id in &scratch.candidates {
            let rule = &policy.rules[id as usize];
            if !conditions_hold(rule, request, request_index, now, &armed, |id| triggers[policy_triggers[id]].since) {
                continue;
            }
            let counter = &mut counters[id as usize];
            if rule.counting.per_arming {
                let arming = rule.armed_by.iter().map(|&id| triggers[policy_triggers[id]].armings).sum();
                if counter.arming != arming {
                    *counter = Counter { occurrences: 0, fired: 0, arming, ..*counter };
                }
            }
            counter.occurrences += 1;
            counter.total_occurrences += 1;
            let occurrence = counter.occurrences;
            if deciding.is_some()
                || !rule.nth.admits(occurrence)
                || rule.limit.is_some_and(|limit| counter.fired >= limit)
                || rule.threshold.is_some_and(|threshold| {
                    draw(policy.seed, rule.name_hash, occurrence, Purpose::Probability) >= threshold
                })
            {
                continue;
            }
            counter.fired += 1;
            counter.total_fired += 1;
            deciding = Some((rule, occurrence));
        }

        let mut decision = match deciding {
            Some((rule, occurrence)) => outcome(policy.seed, rule, occurrence, request, request_index),
            None => Decision::pass(request_index, &self.none),
        };
        apply_bad_sectors(bad_sectors, deciding.map(|(rule, _)| rule), request, &mut decision);

        let mut changed = false;
        if let Some((rule, _)) = deciding {
            for &id in &rule.outcome.arm_ids {
                let slot = policy_triggers[id];
                changed |= set(triggers, slot, true, now);
            }
            for &id in &rule.outcome.disarm_ids {
                let slot = policy_triggers[id];
                changed |= set(triggers, slot, false, now);
            }
        }
        drop(guard);
        if changed {
            self.changes.send_modify(|version| *version += 1);
        }
        decision
    }

    /// Replaces the policy at once, without draining I/O: requests already decided keep their
    /// decision, the next one sees the new policy. Kept: trigger states, the request index, and
    /// bad sectors left by sticky rules. Reset: rule counters (they belong to the old rules), and
    /// declared bad sectors (replaced by the new policy's).
    pub fn set_policy(&self, policy: Option<Policy>) {
        self.set_shared_policy(policy.map(Arc::new));
    }

    pub fn set_shared_policy(&self, policy: Option<Arc<Policy>>) {
        let prepared = Prepared::new(policy.as_deref());
        let replaced = self.lock().install(policy, prepared);
        drop(replaced);
    }

    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.lock().policy.clone()
    }

    /// Arms a trigger (a no-op if it is armed already); returns whether it changed. Any name may
    /// be armed, also one no rule mentions yet: a policy installed later sees it armed.
    pub fn arm(&self, trigger: &str, now: Duration) -> bool {
        self.set_trigger(trigger, true, now)
    }

    /// Disarms a trigger; returns whether it changed.
    pub fn disarm(&self, trigger: &str, now: Duration) -> bool {
        self.set_trigger(trigger, false, now)
    }

    fn set_trigger(&self, trigger: &str, armed: bool, now: Duration) -> bool {
        let changed = {
            let mut state = self.lock();
            let slot = state.trigger_slot(trigger);
            state.set_trigger(slot, armed, now)
        };
        if changed {
            self.changes.send_modify(|version| *version += 1);
        }
        changed
    }

    pub fn is_armed(&self, trigger: &str) -> bool {
        let state = self.lock();
        state.trigger_ids.get(trigger).is_some_and(|&slot| state.triggers[slot].armed)
    }

    /// Every trigger the current policy names or the control API touched, sorted by name.
    pub fn triggers(&self) -> Vec<TriggerState> {
        let state = self.lock();
        let mut triggers: Vec<TriggerState> = state
            .triggers
            .iter()
            .map(|trigger| TriggerState { name: trigger.name.clone(), armed: trigger.armed, since: trigger.since })
            .collect();
        triggers.sort_by(|a, b| a.name.cmp(&b.name));
        triggers
    }

    /// A receiver whose value changes on every arm and disarm, from the API or from a rule, so
    /// a stalled request can wait for its release.
    pub fn trigger_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True when the policy says the device has a volatile cache (`volatile_cache:`, or a rule
    /// that cuts power): the server must then journal unflushed writes so a power cut can undo
    /// them. A policy swapped in later may change the answer.
    pub fn tracks_unflushed_writes(&self) -> bool {
        self.lock().policy.as_ref().is_some_and(|policy| policy.has_volatile_cache())
    }

    /// The bad ranges, declared and acquired, in offset order.
    pub fn bad_sectors(&self) -> Vec<BadSector> {
        self.lock().bad_sectors.list()
    }

    /// Forgets every bad range, declared ones included (until the next policy swap).
    pub fn clear_bad_sectors(&self) {
        self.lock().bad_sectors.clear();
    }

    /// Per-rule counts for the current policy, in evaluation order (schedule entries first).
    pub fn rule_counters(&self) -> Vec<RuleCounter> {
        let state = self.lock();
        let Some(policy) = &state.policy else { return Vec::new() };
        policy
            .compiled()
            .rules
            .iter()
            .zip(&state.counters)
            .map(|(rule, counter)| RuleCounter {
                rule: rule.name.clone(),
                occurrences: counter.total_occurrences,
                fired: counter.total_fired,
            })
            .collect()
    }

    /// How many requests have been decided: the index the next one gets.
    pub fn requests_decided(&self) -> u64 {
        self.lock().next_request
    }
}

/// The decision of the rule that fired, its random choices drawn for this occurrence.
fn outcome(seed: u64, rule: &Rule, occurrence: u64, request: &Request, request_index: u64) -> Decision {
    let outcome = &rule.outcome;
    let random = |purpose| draw(seed, rule.name_hash, occurrence, purpose);
    let wait = match (&outcome.stall, &outcome.delay) {
        (Some((trigger, timeout)), _) => Wait::Until { trigger: trigger.clone(), timeout: *timeout },
        (None, Some(spread)) => match spread.pick(random(Purpose::Delay)) {
            delay if delay.is_zero() => Wait::None,
            delay => Wait::Delay(delay),
        },
        (None, None) => Wait::None,
    };
    let action = match outcome.action {
        ActionSpec::Perform => Action::Perform,
        ActionSpec::Skip => Action::Skip,
        ActionSpec::Torn(tear) => {
            // Saturating: `torn: { persist: 0..16EiB, align: 1 }` has 2^64 steps.
            let steps = ((tear.max - tear.min) / tear.align).saturating_add(1);
            let persist = tear.min + below(random(Purpose::Tear), steps) * tear.align;
            Action::Torn { persist: persist.min(request.length) }
        }
        ActionSpec::Corrupt { bytes, seed: fixed } => {
            Action::CorruptRead { seed: fixed.unwrap_or_else(|| random(Purpose::Corruption)), bytes }
        }
    };
    Decision {
        rule: Some(rule.name.clone()),
        request_index,
        wait,
        power_cut: outcome.power_cut.clone(),
        action,
        reply: outcome.reply,
        bad_sector: outcome.bad_sector,
        armed: outcome.arm.clone(),
        disarmed: outcome.disarm.clone(),
    }
}

fn set(triggers: &mut [Trigger], slot: usize, armed: bool, now: Duration) -> bool {
    let trigger = &mut triggers[slot];
    if trigger.armed == armed {
        return false;
    }
    trigger.armed = armed;
    trigger.since = now;
    trigger.armings += u64::from(armed);
    true
}

/// Everything but `op`/`range` (which the index already checked, except for rules found by
/// request index) and the occurrence tests.
fn conditions_hold(
    rule: &Rule,
    request: &Request,
    request_index: u64,
    now: Duration,
    armed: &impl Fn(usize) -> bool,
    armed_since: impl Fn(usize) -> Duration,
) -> bool {
    let flags = request.flags.bits();
    if rule.ops & request.op.bit() == 0
        || flags & rule.flags_set != rule.flags_set
        || flags & rule.flags_clear != 0
        || rule.connections.as_ref().is_some_and(|connections| !connections.contains(&request.connection))
        || (!rule.lengths.is_empty() && !rule.lengths.iter().any(|&(min, max)| (min..=max).contains(&request.length)))
        || !rule.armed_by.iter().all(|&id| armed(id))
        || rule.disarmed_by.iter().any(|&id| armed(id))
    {
        return false;
    }
    if let Some(requests) = &rule.requests {
        let in_range = rule.ranges.is_empty()
            || (request.op != Op::Flush
                && rule.ranges.iter().any(|&(start, end)| start < request.end() && request.offset < end));
        if !requests.contains(&request_index) || !in_range {
            return false;
        }
    }
    match &rule.window {
        None => true,
        Some(window) => {
            let origin = if window.since_armed {
                rule.armed_by.iter().map(|&id| armed_since(id)).max().unwrap_or_default()
            } else {
                Duration::ZERO
            };
            window.admits(now.saturating_sub(origin))
        }
    }
}

/// Step 4 of the combination rules, and the bad-sector bookkeeping of writes.
fn apply_bad_sectors(bad_sectors: &mut BadSectors, rule: Option<&Rule>, request: &Request, decision: &mut Decision) {
    let writes_data = matches!(request.op, Op::Write | Op::WriteZeroes);
    let span_end = request.offset.saturating_add(request.length);
    if !bad_sectors.is_empty() && decision.action == Action::Perform && decision.reply == Reply::Ok {
        let medium = match request.op {
            Op::Read | Op::Cache => bad_sectors.read_error(request.offset, request.end()),
            Op::Write | Op::WriteZeroes => bad_sectors.write_error(request.offset, request.end()),
            _ => None,
        };
        if let Some(medium) = medium {
            decision.rule = Some(medium.origin);
            decision.action = Action::Skip;
            decision.reply = Reply::Error(medium.errno);
            decision.bad_sector = true;
            return;
        }
    }
    if !writes_data {
        return;
    }
    if let Some(errno) = rule.and_then(|rule| rule.outcome.sticky) {
        let origin = decision.rule.clone().unwrap_or_else(|| Arc::from("sticky"));
        bad_sectors.insert(request.offset, span_end, errno, 0, origin, false);
    } else if decision.reply == Reply::Ok {
        // A successful write remaps what it covered.
        match decision.action {
            Action::Perform => bad_sectors.remove(request.offset, span_end),
            Action::Torn { persist } => bad_sectors.remove(request.offset, request.offset.saturating_add(persist)),
            Action::Skip | Action::CorruptRead { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::PowerCut;
    use crate::request::{Errno, RequestFlags};

    fn policy(text: &str) -> Policy {
        Policy::from_yaml(text, "test.yaml").unwrap_or_else(|error| panic!("{error}"))
    }

    fn request(op: Op, offset: u64, length: u64) -> Request {
        Request { op, offset, length, flags: RequestFlags::default(), connection: 0, cookie: 0 }
    }

    fn fua_write(offset: u64) -> Request {
        Request { flags: RequestFlags { fua: true, ..RequestFlags::default() }, ..request(Op::Write, offset, 4096) }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn without_a_policy_every_request_passes_and_gets_an_index() {
        let engine = Engine::new(None);
        let first = engine.decide(&request(Op::Write, 0, 512), Duration::ZERO);
        let second = engine.decide(&request(Op::Read, 0, 512), Duration::ZERO);
        assert!(first.rule.is_none() && first.is_pass_through());
        assert_eq!((first.request_index, second.request_index), (0, 1));
    }

    #[test]
    fn the_issue_example_behaves_as_its_comments_say() {
        let engine = Engine::new(Some(policy(include_str!("../scenarios/issue-example.yaml"))));
        let at = Duration::from_secs(1);
        // fail-file-data is inactive until "go" is armed.
        let before = engine.decide(&request(Op::Write, MIB, 4096), at);
        assert!(before.rule.is_none());
        engine.arm("go", at);
        let armed = engine.decide(&request(Op::Write, 2 * MIB - 512, 4096), at);
        assert_eq!(armed.rule.as_deref(), Some("fail-file-data"));
        assert_eq!(armed.reply, Reply::Error(Errno::EIO));
        assert_eq!(armed.action, Action::Skip);
        assert_eq!(armed.wait, Wait::Delay(Duration::from_millis(50)));
        // Half-open: a write starting at 2MiB does not overlap.
        assert!(engine.decide(&request(Op::Write, 2 * MIB, 4096), at).rule.is_none());

        // every-third-fua-write: the 3rd, 6th, ... FUA write, at most 5 times.
        let fired = (0..30)
            .filter(|_| engine.decide(&fua_write(8 * MIB), at).rule.as_deref() == Some("every-third-fua-write"))
            .count();
        assert_eq!(fired, 5);

        // flaky-flush: about a quarter of flushes, each with a delay in 10..=200 ms.
        let mut failures = 0;
        for _ in 0..4000 {
            let decision = engine.decide(&request(Op::Flush, 0, 0), at);
            if decision.rule.is_some() {
                failures += 1;
                assert_eq!(decision.reply, Reply::Error(Errno::EIO));
                let Wait::Delay(delay) = decision.wait else { panic!("no delay: {decision:?}") };
                assert!(delay >= Duration::from_millis(10) && delay <= Duration::from_millis(200));
            }
        }
        assert!((850..1150).contains(&failures), "{failures} of 4000 flushes failed");

        // slow-reads: every read is delayed 5 ms and succeeds.
        let read = engine.decide(&request(Op::Read, 0, 4096), at);
        assert_eq!(read.wait, Wait::Delay(Duration::from_millis(5)));
        assert_eq!((read.action, read.reply), (Action::Perform, Reply::Ok));
    }

    #[test]
    fn every_third_counts_only_requests_that_meet_the_other_conditions() {
        let engine = Engine::new(Some(policy(include_str!("../scenarios/issue-example.yaml"))));
        let mut fired = Vec::new();
        for i in 1..=9 {
            // Writes without FUA in between do not count.
            engine.decide(&request(Op::Write, 0, 512), Duration::ZERO);
            if engine.decide(&fua_write(0), Duration::ZERO).rule.is_some() {
                fired.push(i);
            }
        }
        assert_eq!(fired, [3, 6, 9]);
    }

    #[test]
    fn a_rule_firing_arms_a_trigger_for_the_next_requests() {
        let engine = Engine::new(Some(policy(
            "rules:
  - name: first-flush-fails
    when: { op: flush, nth: 1 }
    then: { error: EIO, arm: flush-failed }
  - name: then-writes-fail
    when: { op: write, range: 0..1MiB, armed_by: flush-failed }
    then: { error: EIO }
",
        )));
        let mut changes = engine.trigger_changes();
        assert!(engine.decide(&request(Op::Write, 0, 4096), Duration::ZERO).rule.is_none());
        let flush = engine.decide(&request(Op::Flush, 0, 0), Duration::from_secs(2));
        assert_eq!(flush.rule.as_deref(), Some("first-flush-fails"));
        assert_eq!(&*flush.armed, [Arc::from("flush-failed")]);
        assert!(changes.has_changed().unwrap());
        assert!(engine.is_armed("flush-failed"));
        assert_eq!(engine.triggers()[0].since, Duration::from_secs(2));
        let write = engine.decide(&request(Op::Write, 4096, 4096), Duration::ZERO);
        assert_eq!(write.rule.as_deref(), Some("then-writes-fail"));
        assert!(engine.decide(&request(Op::Write, MIB, 4096), Duration::ZERO).rule.is_none());
        // The second flush passes: nth: 1.
        assert!(engine.decide(&request(Op::Flush, 0, 0), Duration::ZERO).rule.is_none());
        changes.mark_unchanged();
        engine.disarm("flush-failed", Duration::ZERO);
        assert!(changes.has_changed().unwrap());
        assert!(engine.decide(&request(Op::Write, 4096, 4096), Duration::ZERO).rule.is_none());
    }

    #[test]
    fn the_first_eligible_rule_decides_and_later_rules_still_count() {
        let engine = Engine::new(Some(policy(
            "rules:
  - { name: a, when: { op: write, nth: { every: 2 } }, then: { error: EIO } }
  - { name: b, when: { op: write, nth: 2 }, then: { error: ENOSPC } }
  - { name: c, when: { op: write, nth: 3 }, then: { error: EPERM } }
",
        )));
        let rules: Vec<Option<Arc<str>>> =
            (0..4).map(|_| engine.decide(&request(Op::Write, 0, 512), Duration::ZERO).rule).collect();
        // Write 2: a and b are both eligible, a decides; b's one firing is then gone for good
        // (its nth counted write 2). Write 3: c.
        assert_eq!(rules, [None, Some(Arc::from("a")), Some(Arc::from("c")), Some(Arc::from("a"))]);
        let counters = engine.rule_counters();
        assert_eq!(counters.iter().map(|counter| counter.occurrences).collect::<Vec<_>>(), [4, 4, 4]);
        assert_eq!(counters.iter().map(|counter| counter.fired).collect::<Vec<_>>(), [2, 0, 1]);
    }

    #[test]
    fn sticky_write_failures_make_reads_fail_until_a_write_succeeds() {
        let engine = Engine::new(Some(policy(
            "rules:
  - name: fail-once-sticky
    when: { op: write, range: 0..64KiB, nth: 1 }
    then: { error: EIO, sticky: true }
  - name: slow-reads
    when: { op: read }
    then: { delay: 1ms }
",
        )));
        let at = Duration::ZERO;
        assert_eq!(engine.decide(&request(Op::Write, 4096, 8192), at).reply, Reply::Error(Errno::EIO));
        let read = engine.decide(&request(Op::Read, 8192, 512), at);
        assert_eq!(read.reply, Reply::Error(Errno::EIO));
        assert!(read.bad_sector);
        assert_eq!(read.rule.as_deref(), Some("fail-once-sticky"));
        // The read keeps the delay of the rule that decided it.
        assert_eq!(read.wait, Wait::Delay(Duration::from_millis(1)));
        assert_eq!(engine.decide(&request(Op::Read, 0, 4096), at).reply, Reply::Ok);
        // Rewriting half of the range heals that half only.
        assert_eq!(engine.decide(&request(Op::Write, 4096, 4096), at).reply, Reply::Ok);
        assert_eq!(engine.decide(&request(Op::Read, 4096, 4096), at).reply, Reply::Ok);
        assert_eq!(engine.decide(&request(Op::Read, 8192, 4096), at).reply, Reply::Error(Errno::EIO));
        assert_eq!(engine.bad_sectors().len(), 1);
    }

    #[test]
    fn declared_bad_sectors_fail_writes_while_they_have_write_failures() {
        let engine = Engine::new(Some(policy(
            "bad_sectors:
  - 0..+4KiB
  - { range: 1MiB..+512, error: ENOSPC, write_failures: 1, name: media }
",
        )));
        let at = Duration::ZERO;
        assert_eq!(engine.decide(&request(Op::Read, 0, 512), at).reply, Reply::Error(Errno::EIO));
        let write = engine.decide(&request(Op::Write, MIB, 512), at);
        assert_eq!((write.reply, write.rule.as_deref()), (Reply::Error(Errno::ENOSPC), Some("media")));
        assert_eq!(engine.decide(&request(Op::Write, MIB, 512), at).reply, Reply::Ok);
        assert_eq!(engine.decide(&request(Op::Read, MIB, 512), at).reply, Reply::Ok);
        // A write over the first range remaps it at once (no write failures).
        assert_eq!(engine.decide(&request(Op::Write, 0, 4096), at).reply, Reply::Ok);
        assert!(engine.bad_sectors().is_empty());
    }

    #[test]
    fn a_policy_swap_keeps_triggers_and_acquired_bad_sectors_and_resets_counters() {
        let engine = Engine::new(Some(policy(
            "bad_sectors: [ 1MiB..+512 ]\nrules:\n  - { name: s, when: { op: write, nth: 1 }, then: { error: EIO, sticky: true } }\n",
        )));
        engine.arm("go", Duration::ZERO);
        engine.decide(&request(Op::Write, 0, 512), Duration::ZERO);
        engine.set_policy(Some(policy(
            "rules:\n  - { name: t, when: { op: write, armed_by: go, nth: 1 }, then: { error: EPERM } }\n",
        )));
        assert_eq!(engine.bad_sectors().iter().map(|sector| sector.start).collect::<Vec<_>>(), [0]);
        assert!(engine.is_armed("go"));
        let write = engine.decide(&request(Op::Write, 4096, 512), Duration::ZERO);
        assert_eq!(write.reply, Reply::Error(Errno::EPERM));
        assert_eq!(write.request_index, 1);
        assert_eq!(engine.decide(&request(Op::Read, 0, 512), Duration::ZERO).reply, Reply::Error(Errno::EIO));
    }

    #[test]
    fn outcomes_map_to_actions_and_replies() {
        let engine = Engine::new(Some(policy(
            "rules:
  - { name: persisted, when: { op: write, request: 0 }, then: { error: EIO, persist: true } }
  - { name: lost, when: { op: write, request: 1 }, then: { drop: true } }
  - { name: torn, when: { op: write, request: 2 }, then: { torn: 4KiB, error: EIO } }
  - { name: torn-short, when: { op: write, request: 3 }, then: { torn: 4KiB } }
  - { name: rot, when: { op: read, request: 4 }, then: { corrupt: { bytes: 3, seed: 9 } } }
  - { name: gone, when: { request: 5 }, then: { disconnect: true, power_cut: true } }
  - { name: held, when: { request: 6 }, then: { stall: { until: release, timeout: 5s } } }
",
        )));
        let at = Duration::ZERO;
        let d = |op, length| engine.decide(&request(op, 0, length), at);
        let persisted = d(Op::Write, 8192);
        assert_eq!((persisted.action, persisted.reply), (Action::Perform, Reply::Error(Errno::EIO)));
        let lost = d(Op::Write, 8192);
        assert_eq!((lost.action, lost.reply), (Action::Skip, Reply::Ok));
        let torn = d(Op::Write, 8192);
        assert_eq!((torn.action, torn.reply), (Action::Torn { persist: 4096 }, Reply::Error(Errno::EIO)));
        let short = d(Op::Write, 1024);
        assert_eq!((short.action, short.reply), (Action::Torn { persist: 1024 }, Reply::Ok));
        assert_eq!(d(Op::Read, 512).action, Action::CorruptRead { seed: 9, bytes: 3 });
        let gone = d(Op::Trim, 512);
        assert_eq!(
            (gone.action, gone.reply, gone.power_cut),
            (Action::Skip, Reply::Disconnect, Some(PowerCut::default()))
        );
        let held = d(Op::Read, 512);
        assert_eq!(held.wait, Wait::Until { trigger: Arc::from("release"), timeout: Some(Duration::from_secs(5)) });
        assert!(engine.tracks_unflushed_writes());
    }

    #[test]
    fn time_windows_count_from_start_or_from_arming() {
        let engine = Engine::new(Some(policy(
            "rules:
  - { name: window, when: { op: read, from: 10s, until: 20s }, then: { error: EIO } }
  - { name: after-arming, when: { op: write, armed_by: go, since: armed, until: 1s }, then: { error: EIO } }
",
        )));
        let read_at = |secs| engine.decide(&request(Op::Read, 0, 512), Duration::from_secs(secs)).rule.is_some();
        assert_eq!([read_at(9), read_at(10), read_at(19), read_at(20)], [false, true, true, false]);
        engine.arm("go", Duration::from_secs(100));
        let write_at =
            |millis| engine.decide(&request(Op::Write, 0, 512), Duration::from_millis(millis)).rule.is_some();
        assert_eq!([write_at(100_000), write_at(100_999), write_at(101_000)], [true, true, false]);
    }

    #[test]
    fn connection_and_flag_conditions_filter_requests() {
        let engine = Engine::new(Some(policy(
            "rules:\n  - { name: c, when: { op: write, connection: [2, 3], fua: false }, then: { error: EIO } }\n",
        )));
        let on = |connection, fua| {
            let request = Request {
                connection,
                flags: RequestFlags { fua, ..RequestFlags::default() },
                ..request(Op::Write, 0, 512)
            };
            engine.decide(&request, Duration::ZERO).rule.is_some()
        };
        assert_eq!([on(1, false), on(2, false), on(3, true), on(3, false)], [false, true, false, true]);
    }

    #[test]
    fn a_power_cut_drops_the_connection_and_says_how_long_the_power_stays_off() {
        let engine = Engine::new(Some(policy(
            "rules:
  - { name: now, when: { op: flush, request: 0 }, then: { power_cut: true } }
  - { name: off, when: { op: write, request: 1 }, then: { power_cut: { until: power-on, timeout: 5s }, torn: 512 } }
  - { name: kept, when: { op: write, request: 2 }, then: { power_cut: { timeout: 1s }, persist: true } }
",
        )));
        let at = Duration::ZERO;
        let now = engine.decide(&request(Op::Flush, 0, 0), at);
        assert_eq!(
            (now.reply, now.action, now.power_cut.clone()),
            (Reply::Disconnect, Action::Skip, Some(PowerCut::default()))
        );
        let off = engine.decide(&request(Op::Write, 0, 4096), at);
        assert_eq!((off.reply, off.action), (Reply::Disconnect, Action::Torn { persist: 512 }));
        assert_eq!(
            off.power_cut,
            Some(PowerCut { until: Some(Arc::from("power-on")), timeout: Some(Duration::from_secs(5)) })
        );
        let kept = engine.decide(&request(Op::Write, 0, 4096), at);
        assert_eq!((kept.reply, kept.action), (Reply::Disconnect, Action::Perform));
        assert!(engine.tracks_unflushed_writes());
    }

    #[test]
    fn occurrence_counts_restart_at_each_arming_unless_they_count_over_the_lifetime() {
        let engine = Engine::new(Some(policy(
            "seed: 5
rules:
  - { name: first-flush, when: { op: flush, armed_by: go, nth: 1 }, then: { error: EIO } }
  - { name: first-flush-ever, when: { op: flush, armed_by: go, nth: 2, count: lifetime }, then: { error: ENOSPC } }
  - { name: two-writes, when: { op: write, armed_by: go, limit: 2 }, then: { error: EIO } }
  - { name: draws, when: { op: read, armed_by: go, probability: 0.5 }, then: { error: EIO } }
",
        )));
        let at = Duration::ZERO;
        let decide = |op| engine.decide(&request(op, 0, 512), at).rule.map(|rule| rule.to_string());
        let mut armings = Vec::new();
        for _ in 0..3 {
            // Arming an armed trigger is not a new arming: it restarts nothing.
            engine.arm("go", at);
            let flushes = [decide(Op::Flush), decide(Op::Flush)];
            engine.arm("go", at);
            let writes = [decide(Op::Write), decide(Op::Write), decide(Op::Write)];
            let reads: Vec<bool> = (0..32).map(|_| decide(Op::Read).is_some()).collect();
            engine.disarm("go", at);
            // Disarmed, nothing counts.
            assert_eq!(decide(Op::Flush), None);
            armings.push((flushes, writes, reads));
        }
        let first = |name: &str| Some(name.to_string());
        assert_eq!(armings[0].0, [first("first-flush"), first("first-flush-ever")]);
        assert_eq!(armings[1].0, [first("first-flush"), None], "nth: 1 fires again; the lifetime nth: 2 is past");
        assert_eq!(armings[2].0, [first("first-flush"), None]);
        for (_, writes, _) in &armings {
            assert_eq!(writes, &[first("two-writes"), first("two-writes"), None], "the limit is per arming");
        }
        assert!(armings[0].2.contains(&true) && armings[0].2.contains(&false));
        assert!(armings.iter().all(|arming| arming.2 == armings[0].2), "each arming draws the same");
        // The control API's counters run across armings.
        let counters = engine.rule_counters();
        assert_eq!((counters[0].occurrences, counters[0].fired), (6, 3));
        assert_eq!((counters[2].occurrences, counters[2].fired), (9, 6));
    }

    #[test]
    fn length_conditions_match_exact_lengths_inclusive_ranges_and_comparisons() {
        let engine = Engine::new(Some(policy(
            "rules:
  - { name: exact, when: { op: write, length: 64KiB }, then: { error: EIO } }
  - { name: range, when: { op: read, length: 4KiB..8KiB }, then: { error: EIO } }
  - { name: large, when: { op: trim, length: '>=1MiB' }, then: { error: EIO } }
  - { name: small, when: { op: write_zeroes, length: [ '<4KiB', 1MiB.. ] }, then: { error: EIO } }
",
        )));
        let rule = |op, length| engine.decide(&request(op, 0, length), Duration::ZERO).rule;
        let named = |name: &str| Some(Arc::from(name));
        assert_eq!(
            [rule(Op::Write, 65536), rule(Op::Write, 65535), rule(Op::Write, 65537)],
            [named("exact"), None, None]
        );
        assert_eq!(
            [rule(Op::Read, 4095), rule(Op::Read, 4096), rule(Op::Read, 8192), rule(Op::Read, 8193)],
            [None, named("range"), named("range"), None],
            "both ends of a length range are included"
        );
        assert_eq!(
            [rule(Op::Trim, MIB - 1), rule(Op::Trim, MIB), rule(Op::Trim, 1 << 31)],
            [None, named("large"), named("large")]
        );
        assert_eq!(
            [rule(Op::WriteZeroes, 4095), rule(Op::WriteZeroes, 4096), rule(Op::WriteZeroes, 2 * MIB)],
            [named("small"), None, named("small")]
        );
        // A length condition narrows a rule, so a rule below it is not hidden.
        let policy = policy(
            "rules:\n  - { name: big, when: { op: write, length: '>64KiB' }, then: { delay: 1ms } }\n  - { name: all, when: { op: write }, then: { error: EIO } }\n",
        );
        assert!(policy.warnings().is_empty(), "{:?}", policy.warnings());
    }

    #[test]
    fn a_torn_range_as_wide_as_the_address_space_does_not_overflow() {
        let engine = Engine::new(Some(policy(
            "rules:\n  - { when: { op: write }, then: { torn: { persist: 0..18446744073709551615, align: 1 } } }\n",
        )));
        let decision = engine.decide(&request(Op::Write, 0, 4096), Duration::ZERO);
        assert!(matches!(decision.action, Action::Torn { persist } if persist <= 4096));
    }

    #[test]
    fn the_engine_is_send_and_sync() {
        fn shared<T: Send + Sync>() {}
        shared::<Engine>();
    }
}
