//! `when:`, the conditions of a rule.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::error::Invalid;
use crate::policy::compiled::Nth;
use crate::policy::de::{ListOf, ParseContext, checked_map, present};
use crate::policy::values::{Count, LengthRange, Name, Probability, Unit, names};
use crate::request::Op;
use crate::units::{ByteRange, HumanDuration, format_duration};

/// The checked `when` of a rule.
#[derive(Debug, Clone, Default)]
pub(crate) struct When {
    pub ops: Option<Vec<Op>>,
    pub ranges: Vec<ByteRange>,
    /// Request lengths admitted, both bounds included; empty means every length.
    pub lengths: Vec<(u64, u64)>,
    pub flags_set: u8,
    pub flags_clear: u8,
    pub connections: Option<Vec<u64>>,
    pub requests: Option<Vec<u64>>,
    pub nth: Nth,
    pub limit: Option<u64>,
    pub probability: Option<f64>,
    pub armed_by: Vec<Arc<str>>,
    pub disarmed_by: Vec<Arc<str>>,
    pub from: Option<Duration>,
    pub until: Option<Duration>,
    pub since_armed: bool,
    pub cycle: Option<(Duration, Duration)>,
    /// `count:` as written, if it was.
    pub count: Option<CountScope>,
}

/// What occurrence counts (`nth`, `limit`, the draws of `probability`) count over.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum CountScope {
    /// From 0 again each time the rule's `armed_by` triggers are armed again.
    PerArming,
    /// From the moment the policy is installed, across armings.
    Lifetime,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWhen {
    #[serde(default, deserialize_with = "present")]
    op: Option<ListOf<Op>>,
    #[serde(default, deserialize_with = "present")]
    range: Option<ListOf<Unit<ByteRange>>>,
    #[serde(default, deserialize_with = "present")]
    length: Option<ListOf<Unit<LengthRange>>>,
    #[serde(default, deserialize_with = "present")]
    fua: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    no_hole: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    fast_zero: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    df: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    req_one: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    connection: Option<ListOf<u64>>,
    #[serde(default, deserialize_with = "present")]
    request: Option<ListOf<u64>>,
    #[serde(default, deserialize_with = "present")]
    nth: Option<NthSpec>,
    #[serde(default, deserialize_with = "present")]
    limit: Option<Count>,
    #[serde(default, deserialize_with = "present")]
    probability: Option<Probability>,
    #[serde(default, deserialize_with = "present")]
    count: Option<CountScope>,
    #[serde(default, deserialize_with = "present")]
    armed_by: Option<ListOf<Name>>,
    #[serde(default, deserialize_with = "present")]
    disarmed_by: Option<ListOf<Name>>,
    #[serde(default, deserialize_with = "present")]
    from: Option<Unit<HumanDuration>>,
    #[serde(default, deserialize_with = "present")]
    until: Option<Unit<HumanDuration>>,
    #[serde(default, deserialize_with = "present")]
    since: Option<Since>,
    #[serde(default, deserialize_with = "present")]
    cycle: Option<Cycle>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(super) enum Since {
    Start,
    Armed,
}

impl<'de> Deserialize<'de> for When {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "the conditions of a rule: a mapping such as { op: write }", check_when)
    }
}

fn check_when(raw: RawWhen) -> Result<When, Invalid> {
    let mut flags_set = 0u8;
    let mut flags_clear = 0u8;
    for (bit, flag) in [raw.fua, raw.no_hole, raw.fast_zero, raw.df, raw.req_one].into_iter().enumerate() {
        match flag {
            Some(true) => flags_set |= 1 << bit,
            Some(false) => flags_clear |= 1 << bit,
            None => {}
        }
    }
    let mut ops = raw.op.map(|list| list.0);
    if let Some(ops) = &mut ops {
        ops.sort_unstable();
        ops.dedup();
    }
    let from = raw.from.map(|from| from.0.0);
    let until = raw.until.map(|until| until.0.0);
    if let (Some(from), Some(until)) = (from, until)
        && until <= from
    {
        return Err(Invalid::new(
            format!(
                "the time window is empty: `until` ({}) is not after `from` ({})",
                format_duration(until),
                format_duration(from)
            ),
            "make `until` later than `from`, or remove one of them",
        ));
    }
    let armed_by = names(raw.armed_by);
    let disarmed_by = names(raw.disarmed_by);
    if let Some(both) = armed_by.iter().find(|name| disarmed_by.contains(name)) {
        return Err(Invalid::new(
            format!("the trigger `{both}` is in both `armed_by` and `disarmed_by`, so the rule can never be active"),
            format!("keep `{both}` in one of them"),
        ));
    }
    let since_armed = raw.since == Some(Since::Armed);
    if since_armed && armed_by.is_empty() {
        return Err(Invalid::new(
            "`since: armed` measures time from the arming of the `armed_by` triggers, but there are none",
            "add `armed_by: TRIGGER`, or write `since: start`",
        ));
    }
    if raw.count == Some(CountScope::PerArming) && armed_by.is_empty() {
        return Err(Invalid::new(
            "`count: per_arming` restarts the counts at each arming of the `armed_by` triggers, but there are none",
            "add `armed_by: TRIGGER`, or write `count: lifetime`",
        ));
    }
    if raw.since.is_some() && from.is_none() && until.is_none() && raw.cycle.is_none() {
        return Err(Invalid::new(
            "`since` says where `from`, `until` and `cycle` count from, but none of them is set",
            "add `from:`, `until:` or `cycle:`, or remove `since`",
        ));
    }
    let nth = raw.nth.map(|nth| nth.0).unwrap_or_default();
    Ok(When {
        ops,
        ranges: raw.range.map(|list| list.0.into_iter().map(|range| range.0).collect()).unwrap_or_default(),
        lengths: raw
            .length
            .map(|list| list.0.into_iter().map(|length| (length.0.min, length.0.max)).collect())
            .unwrap_or_default(),
        flags_set,
        flags_clear,
        connections: raw.connection.map(|list| list.0),
        requests: raw.request.map(|list| list.0),
        nth,
        limit: raw.limit.map(|limit| limit.0),
        probability: raw.probability.map(|probability| probability.0),
        armed_by,
        disarmed_by,
        from,
        until,
        since_armed,
        cycle: raw.cycle.map(|cycle| (cycle.up, cycle.down)),
        count: raw.count,
    })
}

/// `nth: 3` (exactly the third) or `nth: { first: N, every: N, after: N }`.
struct NthSpec(Nth);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNth {
    #[serde(default, deserialize_with = "present")]
    first: Option<Count>,
    #[serde(default, deserialize_with = "present")]
    every: Option<Count>,
    #[serde(default, deserialize_with = "present")]
    after: Option<u64>,
}

impl<'de> Deserialize<'de> for NthSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NthVisitor;
        impl<'de> Visitor<'de> for NthVisitor {
            type Value = NthSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an occurrence number such as 3, or a mapping with first, every and after")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NthSpec, E> {
                if v == 0 {
                    return Err(Invalid::new(
                        "occurrences count from 1, so `nth: 0` never fires",
                        "write `nth: 1` for the first occurrence",
                    )
                    .into_serde());
                }
                Ok(NthSpec(Nth { after: v - 1, every: 1, first: Some(1) }))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NthSpec, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => {
                        Err(Invalid::new(format!("`nth: {v}` is negative"), "write `nth: 1` or more").into_serde())
                    }
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<NthSpec, A::Error> {
                let skipped = ParseContext::skipped();
                let raw = RawNth::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if ParseContext::skipped() != skipped {
                    return Ok(NthSpec(Nth::default()));
                }
                if raw.first.is_none() && raw.every.is_none() && raw.after.is_none() {
                    return Err(Invalid::new(
                        "`nth` is empty",
                        "write `first: N`, `every: N` or `after: N` in it, or remove it",
                    )
                    .into_serde());
                }
                let nth = Nth {
                    after: raw.after.unwrap_or(0),
                    every: raw.every.map_or(1, |every| every.0),
                    first: raw.first.map(|first| first.0),
                };
                if let Some(first) = nth.first
                    && first < nth.every
                {
                    return Err(Invalid::new(
                        format!("`every: {}` never fires within `first: {first}`", nth.every),
                        format!("make `first` at least {}, or remove one of them", nth.every),
                    )
                    .into_serde());
                }
                Ok(NthSpec(nth))
            }
        }
        deserializer.deserialize_any(NthVisitor)
    }
}

/// dm-flakey's up and down intervals.
#[derive(Default)]
struct Cycle {
    up: Duration,
    down: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCycle {
    up: Unit<HumanDuration>,
    down: Unit<HumanDuration>,
}

impl<'de> Deserialize<'de> for Cycle {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "a mapping such as { up: 9s, down: 1s }", |raw: RawCycle| {
            let (up, down) = (raw.up.0.0, raw.down.0.0);
            if down.is_zero() {
                return Err(Invalid::new(
                    "with `down: 0` the cycle is never down, so the rule never fires",
                    "give `down` a length such as 1s",
                ));
            }
            Ok(Cycle { up, down })
        })
    }
}
