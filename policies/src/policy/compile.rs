//! From the checked grammar to the compiled form: trigger names become positions, operations
//! and flags bit sets, outcomes the actions the engine performs, and the rules get their index.

use std::collections::HashMap;
use std::sync::Arc;

use super::compiled::{ActionSpec, Compiled, Counting, Outcome, Rule, Window};
use super::grammar::{CountScope, PolicySpec, Then, When};
use crate::decision::Reply;
use crate::index::{IndexEntry, RuleIndex};
use crate::random::name_hash;
use crate::request::Op;

impl Compiled {
    pub(super) fn new(spec: PolicySpec) -> Compiled {
        let mut triggers = TriggerTable::default();
        let scheduled = spec.schedule.len();
        let mut rules = Vec::with_capacity(scheduled + spec.rules.len());
        for entry in spec.schedule {
            let when = When { ops: Some(vec![entry.op]), requests: Some(vec![entry.request]), ..When::default() };
            let mut rule = Rule::compile(entry.rule, &when, entry.then, &mut triggers);
            rule.outcome.bad_sector = entry.bad_sector;
            rules.push(rule);
        }
        for rule in spec.rules {
            rules.push(Rule::compile(rule.name, &rule.when, rule.then, &mut triggers));
        }
        let index = RuleIndex::new(rules.iter().map(|rule| IndexEntry {
            ops: rule.ops,
            ranges: &rule.ranges,
            requests: rule.requests.as_deref(),
        }));
        let cuts_power = rules.iter().any(|rule| rule.outcome.power_cut.is_some());
        Compiled {
            seed: spec.seed,
            rules,
            scheduled,
            bad_sectors: spec.bad_sectors,
            triggers: triggers.names,
            index,
            volatile_cache: spec.volatile_cache.unwrap_or(cuts_power),
        }
    }
}

#[derive(Default)]
struct TriggerTable {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, usize>,
}

impl TriggerTable {
    fn id(&mut self, name: &Arc<str>) -> usize {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        self.names.push(name.clone());
        self.ids.insert(name.clone(), self.names.len() - 1);
        self.names.len() - 1
    }
}

impl Rule {
    fn compile(name: Arc<str>, when: &When, then: Then, triggers: &mut TriggerTable) -> Rule {
        let ops = match &when.ops {
            Some(ops) => ops.iter().fold(0, |bits, op| bits | op.bit()),
            None => Op::ALL.iter().fold(0, |bits, op| bits | op.bit()),
        };
        // A power cut drops every connection of the export: nobody hears a reply.
        let reply = if then.disconnect || then.power_cut.is_some() {
            Reply::Disconnect
        } else if let Some(errno) = then.error {
            Reply::Error(errno)
        } else {
            Reply::Ok
        };
        let action = if let Some(tear) = then.torn {
            ActionSpec::Torn(tear)
        } else if let Some((bytes, seed)) = then.corrupt {
            ActionSpec::Corrupt { bytes, seed }
        } else if then.drop || (reply != Reply::Ok && !then.persist) {
            ActionSpec::Skip
        } else {
            ActionSpec::Perform
        };
        let threshold = when.probability.and_then(|probability| {
            // 2^64 * p, except that p = 1 must mean "always", which no u64 threshold expresses.
            (probability < 1.0).then_some((probability * 18_446_744_073_709_551_616.0) as u64)
        });
        let stall = then.stall.map(|(trigger, timeout)| {
            triggers.id(&trigger);
            (trigger, timeout)
        });
        if let Some(until) = then.power_cut.as_ref().and_then(|cut| cut.until.as_ref()) {
            triggers.id(until);
        }
        let window = (when.from.is_some() || when.until.is_some() || when.cycle.is_some()).then(|| Window {
            since_armed: when.since_armed,
            from: when.from.unwrap_or_default(),
            until: when.until,
            cycle: when.cycle,
        });
        Rule {
            name_hash: name_hash(&name),
            name,
            ops,
            ranges: when.ranges.iter().map(|range| (range.start, range.end_or_max())).collect(),
            lengths: when.lengths.clone(),
            flags_set: when.flags_set,
            flags_clear: when.flags_clear,
            connections: when.connections.clone(),
            requests: when.requests.clone(),
            armed_by: when.armed_by.iter().map(|name| triggers.id(name)).collect(),
            disarmed_by: when.disarmed_by.iter().map(|name| triggers.id(name)).collect(),
            window,
            nth: when.nth,
            counting: Counting {
                per_arming: when.count.map_or(!when.armed_by.is_empty(), |count| count == CountScope::PerArming),
                explicit: when.count.is_some(),
            },
            limit: when.limit,
            threshold,
            outcome: Outcome {
                delay: then.delay,
                stall,
                action,
                reply,
                power_cut: then.power_cut,
                sticky: if then.sticky { then.error } else { None },
                arm_ids: then.arm.iter().map(|name| triggers.id(name)).collect(),
                disarm_ids: then.disarm.iter().map(|name| triggers.id(name)).collect(),
                arm: then.arm.into(),
                disarm: then.disarm.into(),
                bad_sector: false,
            },
        }
    }
}
