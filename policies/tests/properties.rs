//! Property tests of matching and of the trigger and counter state machine, against a model that
//! is the documented combination semantics written as plainly as possible, and robustness of the
//! parser against arbitrary input.

use std::sync::LazyLock;
use std::time::Duration;

use nbdfault_policies::{Engine, Op, Policy, Request, RequestFlags};
use proptest::prelude::*;

const TRIGGERS: [&str; 2] = ["t0", "t1"];

const SCENARIOS: [&str; 5] = [
    include_str!("../scenarios/issue-example.yaml"),
    include_str!("../scenarios/bad-sectors.yaml"),
    include_str!("../scenarios/torn-writes.yaml"),
    include_str!("../scenarios/stall-then-fail.yaml"),
    include_str!("../scenarios/corrupt-reads.yaml"),
];

static SCHEMA: LazyLock<jsonschema::Validator> =
    LazyLock::new(|| jsonschema::validator_for(&nbdfault_policies::json_schema()).expect("a valid JSON Schema"));

fn has_tag(value: &serde_yaml::Value) -> bool {
    match value {
        serde_yaml::Value::Tagged(_) => true,
        serde_yaml::Value::Sequence(items) => items.iter().any(has_tag),
        serde_yaml::Value::Mapping(entries) => entries.iter().any(|(key, value)| has_tag(key) || has_tag(value)),
        _ => false,
    }
}

/// The schema must accept whatever the parser accepts, or editors would flag valid policies.
fn assert_schema_accepts(yaml: &str) -> Result<(), TestCaseError> {
    let value: serde_yaml::Value =
        serde_yaml::from_str(yaml).map_err(|error| TestCaseError::fail(error.to_string()))?;
    // YAML tags (`!foo`) have no JSON form; language servers set them aside before validating.
    if has_tag(&value) {
        return Ok(());
    }
    let json = serde_json::to_value(value).map_err(|error| TestCaseError::fail(error.to_string()))?;
    let errors: Vec<String> = SCHEMA.iter_errors(&json).map(|error| error.to_string()).collect();
    prop_assert!(errors.is_empty(), "the parser accepts but the schema refuses:\n{}\n{:?}", yaml, errors);
    Ok(())
}

const OPS: [Op; 3] = [Op::Read, Op::Write, Op::Flush];

#[derive(Debug, Clone)]
struct ModelRule {
    op: Op,
    range: Option<(u64, u64)>,
    armed_by: Option<usize>,
    disarmed_by: Option<usize>,
    after: u64,
    every: u64,
    first: Option<u64>,
    limit: Option<u64>,
    arm: Option<usize>,
    disarm: Option<usize>,
    fua: Option<bool>,
    connection: Option<u64>,
    /// `count: lifetime`; otherwise the default, per arming when there is an `armed_by`.
    lifetime: bool,
}

impl ModelRule {
    fn yaml(&self, index: usize) -> String {
        let mut when = vec![format!("op: {}", self.op)];
        if let (Some((start, end)), true) = (self.range, self.op != Op::Flush) {
            when.push(format!("range: {start}..{end}"));
        }
        if let Some(trigger) = self.armed_by {
            when.push(format!("armed_by: {}", TRIGGERS[trigger]));
        }
        if let Some(fua) = self.fua {
            when.push(format!("fua: {fua}"));
        }
        if let Some(connection) = self.connection {
            when.push(format!("connection: {connection}"));
        }
        if let Some(trigger) = self.disarmed_by.filter(|&trigger| Some(trigger) != self.armed_by) {
            when.push(format!("disarmed_by: {}", TRIGGERS[trigger]));
        }
        let mut nth = vec![format!("after: {}", self.after), format!("every: {}", self.every)];
        if let Some(first) = self.first {
            nth.push(format!("first: {first}"));
        }
        when.push(format!("nth: {{ {} }}", nth.join(", ")));
        if let Some(limit) = self.limit {
            when.push(format!("limit: {limit}"));
        }
        if self.lifetime {
            when.push("count: lifetime".to_string());
        }
        let mut then = vec!["error: EIO".to_string()];
        if let Some(trigger) = self.arm {
            then.push(format!("arm: {}", TRIGGERS[trigger]));
        }
        if let Some(trigger) = self.disarm.filter(|&trigger| Some(trigger) != self.arm) {
            then.push(format!("disarm: {}", TRIGGERS[trigger]));
        }
        format!("  - {{ name: r{index}, when: {{ {} }}, then: {{ {} }} }}\n", when.join(", "), then.join(", "))
    }

    fn concerns(&self, request: &Request, armed: &[bool; 2]) -> bool {
        let disarmed_by = self.disarmed_by.filter(|&trigger| Some(trigger) != self.armed_by);
        self.op == request.op
            && (self.op == Op::Flush
                || self
                    .range
                    .is_none_or(|(start, end)| start < request.offset + request.length && request.offset < end))
            && self.fua.is_none_or(|fua| fua == request.flags.fua)
            && self.connection.is_none_or(|connection| connection == request.connection)
            && self.armed_by.is_none_or(|trigger| armed[trigger])
            && disarmed_by.is_none_or(|trigger| !armed[trigger])
    }

    fn admits(&self, occurrence: u64, fired: u64) -> bool {
        occurrence > self.after
            && (occurrence - self.after) % self.every == 0
            && self.first.is_none_or(|first| occurrence - self.after <= first)
            && self.limit.is_none_or(|limit| fired < limit)
    }
}

fn rule_strategy() -> impl Strategy<Value = ModelRule> {
    let trigger = prop::option::of(0usize..2);
    (
        prop::sample::select(OPS.to_vec()),
        prop::option::of((0u64..16, 1u64..8).prop_map(|(start, length)| (start * 512, (start + length) * 512))),
        (trigger.clone(), trigger.clone(), trigger.clone(), trigger),
        (0u64..3, 1u64..4, prop::option::of(0u64..4), prop::option::of(1u64..4)),
        (prop::option::of(any::<bool>()), prop::option::of(0u64..2), any::<bool>()),
    )
        .prop_map(
            |(
                op,
                range,
                (armed_by, disarmed_by, arm, disarm),
                (after, every, first_extra, limit),
                (fua, connection, lifetime),
            )| {
                ModelRule {
                    op,
                    range,
                    armed_by,
                    disarmed_by,
                    after,
                    every,
                    // `first` below `every` is refused by validation, so draw it from there up.
                    first: first_extra.map(|extra| every + extra),
                    limit,
                    arm,
                    disarm,
                    fua,
                    connection,
                    lifetime,
                }
            },
        )
}

#[derive(Debug, Clone)]
enum Step {
    Request(Op, u64, u64, bool, u64),
    Arm(usize),
    Disarm(usize),
}

fn step_strategy() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (prop::sample::select(OPS.to_vec()), 0u64..24, 1u64..6, any::<bool>(), 0u64..2)
            .prop_map(|(op, block, blocks, fua, connection)| Step::Request(op, block * 512, blocks * 512, fua, connection)),
        1 => (0usize..2).prop_map(Step::Arm),
        1 => (0usize..2).prop_map(Step::Disarm),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn the_engine_follows_the_documented_combination_semantics(
        rules in prop::collection::vec(rule_strategy(), 1..8),
        steps in prop::collection::vec(step_strategy(), 1..80),
    ) {
        let yaml: String = std::iter::once("rules:\n".to_string())
            .chain(rules.iter().enumerate().map(|(index, rule)| rule.yaml(index)))
            .collect();
        let policy = Policy::from_yaml(&yaml, "model.yaml").map_err(|error| TestCaseError::fail(format!("{error}\n{yaml}")))?;
        assert_schema_accepts(&yaml)?;
        let engine = Engine::new(Some(policy));
        let mut armed = [false; 2];
        // Disarmed-to-armed changes per trigger, and per rule the arming its counts belong to:
        // with `armed_by` (and no `count: lifetime`) the counts restart at each new arming.
        let mut armings = [0u64; 2];
        let mut counted_arming = vec![0u64; rules.len()];
        let mut occurrences = vec![0u64; rules.len()];
        let mut fired = vec![0u64; rules.len()];
        let mut total_occurrences = vec![0u64; rules.len()];
        let mut total_fired = vec![0u64; rules.len()];
        let arm = |armed: &mut [bool; 2], armings: &mut [u64; 2], trigger: usize| {
            armings[trigger] += u64::from(!armed[trigger]);
            armed[trigger] = true;
        };
        for step in steps {
            let request = match step {
                Step::Arm(trigger) => {
                    engine.arm(TRIGGERS[trigger], Duration::ZERO);
                    arm(&mut armed, &mut armings, trigger);
                    continue;
                }
                Step::Disarm(trigger) => {
                    engine.disarm(TRIGGERS[trigger], Duration::ZERO);
                    armed[trigger] = false;
                    continue;
                }
                Step::Request(op, offset, length, fua, connection) => {
                    let (offset, length) = if op == Op::Flush { (0, 0) } else { (offset, length) };
                    let flags = RequestFlags { fua, ..RequestFlags::default() };
                    Request { op, offset, length, flags, connection, cookie: 0 }
                }
            };
            // The model: every concerned rule counts the request; the first eligible one decides.
            let mut deciding = None;
            for (index, rule) in rules.iter().enumerate() {
                if !rule.concerns(&request, &armed) {
                    continue;
                }
                if let Some(trigger) = rule.armed_by.filter(|_| !rule.lifetime)
                    && counted_arming[index] != armings[trigger]
                {
                    counted_arming[index] = armings[trigger];
                    occurrences[index] = 0;
                    fired[index] = 0;
                }
                occurrences[index] += 1;
                total_occurrences[index] += 1;
                if deciding.is_none() && rule.admits(occurrences[index], fired[index]) {
                    fired[index] += 1;
                    total_fired[index] += 1;
                    deciding = Some(index);
                }
            }
            if let Some(rule) = deciding.map(|index| &rules[index]) {
                // Arms first, then disarms, as the engine applies them.
                if let Some(trigger) = rule.arm { arm(&mut armed, &mut armings, trigger); }
                if let Some(trigger) = rule.disarm.filter(|&trigger| Some(trigger) != rule.arm) { armed[trigger] = false; }
            }
            let decision = engine.decide(&request, Duration::ZERO);
            prop_assert_eq!(decision.rule.as_deref().map(str::to_string), deciding.map(|index| format!("r{index}")), "{:?}\n{}", request, yaml);
            for (trigger, &expected) in TRIGGERS.iter().zip(&armed) {
                prop_assert_eq!(engine.is_armed(trigger), expected);
            }
        }
        let counters = engine.rule_counters();
        prop_assert_eq!(counters.iter().map(|counter| counter.occurrences).collect::<Vec<_>>(), total_occurrences);
        prop_assert_eq!(counters.iter().map(|counter| counter.fired).collect::<Vec<_>>(), total_fired);
    }

    #[test]
    fn any_text_is_refused_or_accepted_without_panicking(text in "\\PC{0,200}") {
        let _ = Policy::from_yaml(&text, "fuzz.yaml");
    }

    #[test]
    fn damaged_scenarios_are_refused_with_a_location_or_accepted_by_the_schema_too(
        scenario in 0..SCENARIOS.len(),
        cut in 0usize..2000,
        insert in "[ -~\\n]{0,12}",
    ) {
        let original = SCENARIOS[scenario];
        let mut at = cut.min(original.len());
        while !original.is_char_boundary(at) { at -= 1; }
        let damaged = format!("{}{insert}{}", &original[..at], &original[at..]);
        match Policy::from_yaml(&damaged, "damaged.yaml") {
            Ok(_) => assert_schema_accepts(&damaged)?,
            Err(errors) => {
                for error in errors.iter() {
                    prop_assert!(error.line >= 1 && error.column >= 1);
                    prop_assert!(!error.fix.is_empty(), "no fix: {}", error);
                }
            }
        }
    }
}
