//! `rules:`, each a `when` and a `then`, and the checks that need both.

use std::sync::Arc;

use serde::Deserialize;
use serde::de::Deserializer;

use super::then::Then;
use super::when::When;
use crate::error::Invalid;
use crate::policy::de::{CONTEXT, checked_map, present, recovering};
use crate::policy::values::Name;
use crate::request::Op;

pub(crate) struct RuleSpec {
    pub name: Arc<str>,
    pub when: When,
    pub then: Then,
}

/// Stands in for a rule whose errors were reported; never compiled.
impl Default for RuleSpec {
    fn default() -> Self {
        RuleSpec { name: Arc::from(""), when: When::default(), then: Then::default() }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRule {
    #[serde(default, deserialize_with = "present")]
    name: Option<Name>,
    #[allow(dead_code)] // Documentation for people reading the policy.
    #[serde(default, deserialize_with = "present")]
    description: Option<String>,
    #[serde(default, deserialize_with = "recovering")]
    when: When,
    #[serde(deserialize_with = "recovering")]
    then: Then,
}

impl<'de> Deserialize<'de> for RuleSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "a rule: a mapping with name, when and then", check_rule)
    }
}

fn check_rule(raw: RawRule) -> Result<RuleSpec, Invalid> {
    let position = CONTEXT.with(|context| {
        let mut context = context.borrow_mut();
        context.check_room()?;
        context.rules += 1;
        Ok::<_, Invalid>(context.rules)
    })?;
    let name = match raw.name {
        Some(name) => name.0,
        None => Arc::from(format!("rule-{position}")),
    };
    let fresh = CONTEXT.with(|context| context.borrow_mut().names.insert(name.clone()));
    if !fresh {
        return Err(Invalid::new(
            format!("the rule name `{name}` is already used by an earlier rule"),
            format!("give this rule its own name, such as `{name}-{position}`"),
        ));
    }
    check_against_ops(raw.when.ops.as_deref(), &raw.when, &raw.then)?;
    Ok(RuleSpec { name, when: raw.when, then: raw.then })
}

/// Checks what can only be judged knowing both the operations matched and the outcome.
pub(super) fn check_against_ops(ops: Option<&[Op]>, when: &When, then: &Then) -> Result<(), Invalid> {
    let described = match ops {
        Some(ops) => ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(", "),
        None => "every operation (no `op`)".to_string(),
    };
    let only = |allowed: &[Op]| ops.is_some_and(|ops| ops.iter().all(|op| allowed.contains(op)));
    let data_writes = [Op::Write, Op::WriteZeroes];
    let side_effects = [Op::Write, Op::WriteZeroes, Op::Trim, Op::Flush];
    if then.torn.is_some() && !only(&data_writes) {
        return Err(Invalid::new(
            format!("`torn` tears a write, but this rule matches {described}"),
            "add `op: write` (or write_zeroes) to `when`",
        ));
    }
    if then.corrupt.is_some() && !only(&[Op::Read]) {
        return Err(Invalid::new(
            format!("`corrupt` damages the data of a read, but this rule matches {described}"),
            "add `op: read` to `when`; to lose or damage writes use `drop` or `torn`",
        ));
    }
    if then.sticky && !only(&data_writes) {
        return Err(Invalid::new(
            format!("`sticky` leaves the range of a failed write bad, but this rule matches {described}"),
            "add `op: write` to `when`; for ranges that are bad from the start use `bad_sectors:`",
        ));
    }
    if then.persist && !only(&side_effects) {
        return Err(Invalid::new(
            format!("`persist` keeps the effect of a failed request, but this rule matches {described}"),
            "add `op: write` (or write_zeroes, trim, flush) to `when`",
        ));
    }
    if then.drop && !only(&side_effects) {
        return Err(Invalid::new(
            format!("`drop` loses a write while reporting success, but this rule matches {described}"),
            "add `op: write` (or write_zeroes, trim, flush) to `when`",
        ));
    }
    if let Some(ops) = ops {
        if !when.ranges.is_empty() && ops.contains(&Op::Flush) {
            return Err(Invalid::new(
                "flush has no byte range, so `range` can never match it",
                "move `flush` to a rule of its own without `range`",
            ));
        }
        if !when.lengths.is_empty() && ops.contains(&Op::Flush) {
            return Err(Invalid::new(
                "flush has no length, so `length` can never match it",
                "move `flush` to a rule of its own without `length`",
            ));
        }
        for (flag, carriers) in [
            (1u8 << 1, &[Op::WriteZeroes][..]),
            (1 << 2, &[Op::WriteZeroes][..]),
            (1 << 3, &[Op::Read][..]),
            (1 << 4, &[Op::BlockStatus][..]),
        ] {
            if when.flags_set & flag != 0 && !ops.iter().any(|op| carriers.contains(op)) {
                let name = crate::request::RequestFlags::NAMES[flag.trailing_zeros() as usize];
                return Err(Invalid::new(
                    format!("the `{name}` flag only comes with {}, which this rule does not match", carriers[0]),
                    format!("add {} to `op`, or remove `{name}: true`", carriers[0]),
                ));
            }
        }
    }
    Ok(())
}
