//! From a fault log back to a policy: a `schedule:` that decides each logged request, by its
//! index in the request stream, exactly as it was decided. Requests the log does not mention pass
//! through, as they did. Power records (a cut through the control API, a power-on) are input from
//! outside, as triggers armed through the API are: the policy lists them in a comment, with the
//! request index each came before, and does not reproduce them.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Duration;

use crate::record::{ActionRecord, FaultRecord, LogEntry, PowerEvent, PowerOrigin, PowerRecord, ReplyRecord};
use crate::units::format_duration;

/// Why a fault log cannot be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    #[error("the fault log has no records, so there is nothing to replay")]
    Empty,
    #[error(
        "the fault log has no request records, only {0} power records (power cuts through the control API, \
         power-ons), which replay does not reproduce: there is nothing to replay"
    )]
    OnlyPowerRecords(usize),
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
/// The entries must come from one export; power records are listed in a comment, not replayed.
pub fn replay_policy(entries: &[LogEntry]) -> Result<String, ReplayError> {
    let first = entries.first().ok_or(ReplayError::Empty)?;
    if let Some(other) = entries.iter().find(|entry| entry.export() != first.export()) {
        return Err(ReplayError::MixedExports(first.export().to_string(), other.export().to_string()));
    }
    let records: Vec<&FaultRecord> = entries.iter().filter_map(LogEntry::request).collect();
    let mut power: Vec<&PowerRecord> = entries.iter().filter_map(LogEntry::power).collect();
    if records.is_empty() {
        return Err(ReplayError::OnlyPowerRecords(power.len()));
    }
    power.sort_by_key(|record| record.seq);
    let mut sorted = records;
    sorted.sort_by_key(|record| record.request_index);
    if let Some((record, field)) = sorted.iter().find_map(|record| Some((record, record.missing_field()?))) {
        return Err(ReplayError::Incomplete { request: record.request_index, field });
    }
    let mut seen = HashSet::new();
    if let Some(duplicate) = sorted.iter().find(|record| !seen.insert(record.request_index)) {
        return Err(ReplayError::DuplicateRequest(duplicate.request_index));
    }
    let export: String = first.export().chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut yaml = format!(
        "# Replays {} decisions of export \"{export}\" from a fault log, by request index.\n\
         # Requests not listed pass through. Same request sequence, same decisions.\n",
        sorted.len()
    );
    if !power.is_empty() {
        let _ = writeln!(
            yaml,
            "# Not replayed: {} power records. Cuts and power-ons through the control API are input from\n\
             # outside, as triggers armed through the API are: make them again at the same points of the\n\
             # request stream. A power-on by a trigger or a timeout follows from the cut before it.",
            power.len()
        );
        for record in &power {
            let _ = writeln!(yaml, "#   {}", not_replayed(record));
        }
    }
    yaml.push_str("schedule:\n");
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

/// One power record, as the replay's comment lists it.
fn not_replayed(record: &PowerRecord) -> String {
    let before = format!("before request {} (fault log seq {})", record.next_request_index, record.seq);
    match (record.event, record.origin) {
        (PowerEvent::PowerCut, _) => {
            format!("{before}: a power cut through the control API (`nbdfault ctl power-cut`)")
        }
        (PowerEvent::PowerOn, PowerOrigin::ControlApi) => {
            format!("{before}: power on through the control API (`nbdfault ctl power-on`)")
        }
        (PowerEvent::PowerOn, PowerOrigin::Trigger) => format!(
            "{before}: power on as the trigger `{}` was armed",
            record.trigger.as_deref().unwrap_or("?").replace(|c: char| c.is_control(), " ")
        ),
        (PowerEvent::PowerOn, PowerOrigin::Timeout) => format!("{before}: power on as the off timeout passed"),
    }
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
