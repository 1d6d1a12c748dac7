//! From a fault log back to a policy: a `schedule:` that decides each logged request, by its
//! index in the request stream, exactly as it was decided. Requests the log does not mention pass
//! through, as they did.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use crate::record::{ActionRecord, FaultRecord, ReplyRecord};
use crate::units::format_duration;

/// Why a fault log cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("the fault log has no records, so there is nothing to replay")]
    Empty,
    #[error(
        "the fault log mixes exports `{0}` and `{1}`: replay one export at a time (filter the records by `export`)"
    )]
    MixedExports(String, String),
    #[error("request {0} appears twice in the fault log: a log of one server run has each request index once")]
    DuplicateRequest(u64),
    #[error("the record of request {request} has no `{field}`, which its action or reply needs")]
    Incomplete { request: u64, field: &'static str },
}

/// Writes a policy that makes the logged decisions again for the same request sequence.
/// The records must come from one export.
pub fn replay_policy(records: &[FaultRecord]) -> Result<String, ReplayError> {
    let first = records.first().ok_or(ReplayError::Empty)?;
    if let Some(other) = records.iter().find(|record| record.export != first.export) {
        return Err(ReplayError::MixedExports(first.export.clone(), other.export.clone()));
    }
    let mut sorted: Vec<&FaultRecord> = records.iter().collect();
    sorted.sort_by_key(|record| record.request_index);
    if let Some((record, field)) = sorted.iter().find_map(|record| Some((record, record.missing_field()?))) {
        return Err(ReplayError::Incomplete { request: record.request_index, field });
    }
    let mut seen = HashSet::new();
    if let Some(duplicate) = sorted.iter().find(|record| !seen.insert(record.request_index)) {
        return Err(ReplayError::DuplicateRequest(duplicate.request_index));
    }
    let export: String = first.export.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut yaml = format!(
        "# Replays {} decisions of export \"{export}\" from a fault log, by request index.\n\
         # Requests not listed pass through. Same request sequence, same decisions.\n\
         schedule:\n",
        sorted.len()
    );
    for record in sorted {
        let bad_sector = if record.bad_sector { ", bad_sector: true" } else { "" };
        let _ = writeln!(
            yaml,
            "  - {{ request: {}, op: {}, rule: {}, then: {{ {} }}{bad_sector} }}",
            record.request_index,
            record.op,
            record.rule,
            then(record).join(", ")
        );
    }
    Ok(yaml)
}

/// The `then` entries that reproduce one record's decision.
fn then(record: &FaultRecord) -> Vec<String> {
    let mut then = Vec::new();
    match record.reply {
        ReplyRecord::Ok => {}
        ReplyRecord::Error => {
            if let Some(errno) = record.errno {
                then.push(format!("error: {errno}"));
            }
        }
        ReplyRecord::Disconnect => then.push("disconnect: true".to_string()),
    }
    let failed = record.reply != ReplyRecord::Ok;
    match record.action {
        ActionRecord::Perform if failed => then.push("persist: true".to_string()),
        ActionRecord::Skip if !failed => then.push("drop: true".to_string()),
        ActionRecord::Perform | ActionRecord::Skip => {}
        ActionRecord::Torn => {
            if let Some(persist) = record.torn_persist {
                then.push(format!("torn: {persist}"));
            }
        }
        ActionRecord::CorruptRead => {
            if let Some(corrupt) = record.corrupt {
                then.push(format!("corrupt: {{ bytes: {}, seed: {} }}", corrupt.bytes, corrupt.seed));
            }
        }
    }
    if let Some(stall) = &record.stall {
        match stall.timeout_ns {
            Some(timeout) => then.push(format!(
                "stall: {{ until: {}, timeout: {} }}",
                stall.trigger,
                format_duration(Duration::from_nanos(timeout))
            )),
            None => then.push(format!("stall: {}", stall.trigger)),
        }
    } else if record.delay_ns > 0 {
        then.push(format!("delay: {}", format_duration(Duration::from_nanos(record.delay_ns))));
    }
    match (&record.power_off, record.power_cut) {
        (Some(off), true) => {
            let mut fields = Vec::new();
            if let Some(until) = &off.until {
                fields.push(format!("until: {until}"));
            }
            if let Some(timeout) = off.timeout_ns {
                fields.push(format!("timeout: {}", format_duration(Duration::from_nanos(timeout))));
            }
            then.push(format!("power_cut: {{ {} }}", fields.join(", ")));
        }
        (None, true) => then.push("power_cut: true".to_string()),
        (_, false) => {}
    }
    if !record.armed.is_empty() {
        then.push(format!("arm: [{}]", record.armed.join(", ")));
    }
    if !record.disarmed.is_empty() {
        then.push(format!("disarm: [{}]", record.disarmed.join(", ")));
    }
    then
}
