//! The grammar of a policy file, one module per section, checked while it is read.

mod bad_sectors;
mod rules;
mod schedule;
mod then;
mod when;

use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::compiled::DeclaredBadSector;
use super::de::{ParseContext, names_read_by, present, recovering, recovering_list};
use crate::error::Invalid;

pub(crate) use rules::RuleSpec;
pub(crate) use schedule::ScheduleEntry;
pub(crate) use then::Then;
pub(crate) use when::{CountScope, When};

/// A whole policy file, every section checked.
pub(crate) struct PolicySpec {
    pub seed: u64,
    pub volatile_cache: Option<bool>,
    pub description: Option<String>,
    pub bad_sectors: Vec<DeclaredBadSector>,
    pub rules: Vec<RuleSpec>,
    pub schedule: Vec<ScheduleEntry>,
}

const NOTHING_TO_DO: &str =
    "the policy has no rules, no schedule, no bad sectors and no `volatile_cache: true`, so it would do nothing";
const NOTHING_TO_DO_FIX: &str =
    "add `rules:` with at least one rule, such as `rules: [{ when: { op: flush }, then: { error: EIO } }]`";

impl<'de> Deserialize<'de> for PolicySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;
        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = PolicySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a policy: a mapping with seed, bad_sectors, rules and schedule")
            }
            // An empty file reads as null.
            fn visit_unit<E: de::Error>(self) -> Result<PolicySpec, E> {
                Err(Invalid::new(NOTHING_TO_DO, NOTHING_TO_DO_FIX).into_serde())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicySpec, A::Error> {
                let skipped = ParseContext::skipped();
                let raw = RawPolicy::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let whole = ParseContext::skipped() == skipped;
                let nothing = raw.rules.is_empty() && raw.schedule.is_empty() && raw.bad_sectors.is_empty();
                // A device with a volatile cache and nothing else loses writes to API power cuts.
                if whole && nothing && raw.volatile_cache != Some(true) {
                    return Err(Invalid::new(NOTHING_TO_DO, NOTHING_TO_DO_FIX).into_serde());
                }
                Ok(PolicySpec {
                    seed: raw.seed,
                    volatile_cache: raw.volatile_cache,
                    description: raw.description,
                    bad_sectors: raw.bad_sectors,
                    rules: raw.rules,
                    schedule: raw.schedule,
                })
            }
        }
        deserializer.deserialize_map(PolicyVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default, deserialize_with = "recovering")]
    seed: u64,
    #[serde(default, deserialize_with = "present")]
    description: Option<String>,
    #[serde(default, deserialize_with = "present")]
    volatile_cache: Option<bool>,
    #[serde(default, deserialize_with = "recovering_list")]
    bad_sectors: Vec<DeclaredBadSector>,
    #[serde(default, deserialize_with = "recovering_list")]
    rules: Vec<RuleSpec>,
    #[serde(default, deserialize_with = "recovering_list")]
    schedule: Vec<ScheduleEntry>,
}

/// The keys of every mapping of the grammar, read from the types, by the name the JSON schema
/// gives the mapping. The schema is checked against them.
#[cfg(test)]
pub(crate) fn mapping_keys() -> Vec<(&'static str, &'static [&'static str])> {
    vec![
        ("policy", names_read_by::<RawPolicy>()),
        ("bad_sector", names_read_by::<bad_sectors::RawBadSector>()),
        ("rule", names_read_by::<rules::RawRule>()),
        ("when", names_read_by::<when::RawWhen>()),
        ("nth", names_read_by::<when::RawNth>()),
        ("cycle", names_read_by::<when::RawCycle>()),
        ("then", names_read_by::<then::RawThen>()),
        ("stall", names_read_by::<then::RawStall>()),
        ("torn", names_read_by::<then::RawTorn>()),
        ("corrupt", names_read_by::<then::RawCorrupt>()),
        ("power_cut", names_read_by::<then::RawPowerCut>()),
        ("schedule_entry", names_read_by::<schedule::RawScheduleEntry>()),
    ]
}

/// The values `count:` accepts.
pub(crate) fn count_values() -> &'static [&'static str] {
    names_read_by::<when::CountScope>()
}

/// The values `since:` accepts.
pub(crate) fn since_values() -> &'static [&'static str] {
    names_read_by::<when::Since>()
}
