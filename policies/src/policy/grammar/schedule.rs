//! `schedule:`, requests decided by their index, as a replayed fault log writes them.

use std::sync::Arc;

use serde::Deserialize;
use serde::de::Deserializer;

use super::rules::check_against_ops;
use super::then::Then;
use super::when::When;
use crate::error::Invalid;
use crate::policy::de::{CONTEXT, checked_map, recovering};
use crate::policy::values::Name;
use crate::request::Op;

/// One request decided by its index, as [`crate::replay_policy`] writes them.
pub(crate) struct ScheduleEntry {
    pub request: u64,
    pub op: Op,
    pub rule: Arc<str>,
    pub then: Then,
    pub bad_sector: bool,
}

/// Stands in for an entry whose errors were reported; never compiled.
impl Default for ScheduleEntry {
    fn default() -> Self {
        ScheduleEntry { request: 0, op: Op::Read, rule: Arc::from(""), then: Then::default(), bad_sector: false }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawScheduleEntry {
    request: u64,
    op: Op,
    rule: Name,
    #[serde(deserialize_with = "recovering")]
    then: Then,
    /// The logged failure came from a bad sector, not from the rule itself.
    #[serde(default)]
    bad_sector: bool,
}

impl<'de> Deserialize<'de> for ScheduleEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(
            deserializer,
            "a schedule entry: a mapping with request, op, rule and then",
            |raw: RawScheduleEntry| {
                let fresh = CONTEXT.with(|context| {
                    let mut context = context.borrow_mut();
                    context.check_room()?;
                    Ok::<_, Invalid>(context.scheduled.insert(raw.request))
                })?;
                if !fresh {
                    return Err(Invalid::new(
                        format!("request {} is scheduled twice", raw.request),
                        "keep one entry per request index",
                    ));
                }
                check_against_ops(Some(&[raw.op]), &When::default(), &raw.then)?;
                if raw.bad_sector && raw.then.error.is_none() {
                    return Err(Invalid::new(
                        "`bad_sector: true` marks a failure from a bad sector, but `then` has no `error`",
                        "add the errno the bad sector returned, such as `error: EIO`",
                    ));
                }
                Ok(ScheduleEntry {
                    request: raw.request,
                    op: raw.op,
                    rule: raw.rule.0,
                    then: raw.then,
                    bad_sector: raw.bad_sector,
                })
            },
        )
    }
}
