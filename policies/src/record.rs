//! The fault log: one JSON line per request a rule (or a bad sector) touched ([`FaultRecord`]),
//! and one per change of an export's power that no request decided ([`PowerRecord`]: a power cut
//! through the control API, a power-on); [`LogEntry`] is either.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::decision::{Action, Decision, PowerCut, Reply, Wait};
use crate::request::{Errno, Op, Request, RequestFlags};

/// What happened to a request, in one word, for people and for filtering the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A rule touched the request but changed nothing (it only armed or disarmed triggers).
    Pass,
    /// Held for a time, then done and replied to normally.
    Delay,
    /// Held until a trigger or a timeout, then done and replied to normally.
    Stall,
    /// Not done, and the reply is an error.
    Error,
    /// Done, but the reply is an error.
    PersistedError,
    /// Not done, but the reply says success.
    SilentLoss,
    Torn,
    CorruptRead,
    Disconnect,
    PowerCut,
    /// Failed by a bad sector.
    BadSector,
}

impl Outcome {
    pub fn of(decision: &Decision) -> Outcome {
        if decision.bad_sector {
            return Outcome::BadSector;
        }
        if decision.power_cut.is_some() {
            return Outcome::PowerCut;
        }
        match (decision.action, decision.reply) {
            (_, Reply::Disconnect) => Outcome::Disconnect,
            (Action::Torn { .. }, _) => Outcome::Torn,
            (Action::CorruptRead { .. }, _) => Outcome::CorruptRead,
            (Action::Skip, Reply::Error(_)) => Outcome::Error,
            (Action::Perform, Reply::Error(_)) => Outcome::PersistedError,
            (Action::Skip, Reply::Ok) => Outcome::SilentLoss,
            (Action::Perform, Reply::Ok) => match decision.wait {
                Wait::None => Outcome::Pass,
                Wait::Delay(_) => Outcome::Delay,
                Wait::Until { .. } => Outcome::Stall,
            },
        }
    }
}

/// What the server did with the data, as logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionRecord {
    Perform,
    Skip,
    Torn,
    CorruptRead,
}

/// What the client heard, as logged (the errno is in [`FaultRecord::errno`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyRecord {
    Ok,
    Error,
    Disconnect,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StallRecord {
    pub trigger: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ns: Option<u64>,
}

/// How long a power cut kept the export off: until a trigger, a timeout, or both.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerOffRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ns: Option<u64>,
}

impl PowerOffRecord {
    fn of(cut: &PowerCut) -> Option<PowerOffRecord> {
        cut.stays_off().then(|| PowerOffRecord {
            until: cut.until.as_deref().map(str::to_string),
            timeout_ns: cut.timeout.map(nanos),
        })
    }
}

/// The most undone ranges a record lists; past that it counts the rest.
pub const MAX_UNDONE_RANGES: usize = 1024;

/// What a power cut did to its export: the connections it dropped and the unflushed writes it
/// undid. Timing decides it (what other connections wrote and flushed), so it is left out of the
/// decision view and replay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutRecord {
    /// Connections attached when the power went; every one was dropped.
    pub connections: u64,
    /// Whether the policy kept the journal of unflushed writes (`volatile_cache:`); without it
    /// nothing was undone.
    pub journaled: bool,
    /// Unflushed writes undone, and their bytes.
    pub undone_writes: u64,
    pub undone_bytes: u64,
    /// The ranges the undo wrote back, as `[offset, length]`, merged and in offset order; at most
    /// [`MAX_UNDONE_RANGES`], the rest counted in `undone_ranges_left_out`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undone: Vec<[u64; 2]>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub undone_ranges_left_out: u64,
    /// Writes since the last flush that did not fit in the journal: they survived the cut.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unjournaled_writes: u64,
}

impl CutRecord {
    /// Sets `undone` from the undone writes' ranges (`(offset, length)`, in any order): merged
    /// where they overlap or touch, in offset order, at most [`MAX_UNDONE_RANGES`].
    pub fn set_undone_ranges(&mut self, ranges: impl IntoIterator<Item = (u64, u64)>) {
        let mut ranges: Vec<(u64, u64)> = ranges.into_iter().filter(|&(_, length)| length > 0).collect();
        ranges.sort_unstable();
        let mut merged: Vec<[u64; 2]> = Vec::new();
        for (offset, length) in ranges {
            let end = offset.saturating_add(length);
            match merged.last_mut() {
                Some([start, len]) if offset <= *start + *len => *len = (*len).max(end - *start),
                _ => merged.push([offset, length]),
            }
        }
        self.undone_ranges_left_out = merged.len().saturating_sub(MAX_UNDONE_RANGES) as u64;
        merged.truncate(MAX_UNDONE_RANGES);
        self.undone = merged;
    }
}

/// A change of an export's power.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerEvent {
    PowerCut,
    PowerOn,
}

/// What changed the power. A rule's power cut is the record of its request instead
/// ([`FaultRecord::cut`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerOrigin {
    /// `POST .../power-cut`, `POST .../power-on` (and `nbdfault ctl`).
    ControlApi,
    /// The trigger an "off" waited for was armed.
    Trigger,
    /// The timeout of an "off" passed.
    Timeout,
}

/// One line of the fault log for a power change no request decided: a power cut through the
/// control API, or the power coming back. Outside input as a trigger armed through the API is,
/// so replay does not reproduce it (it says so).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerRecord {
    /// Position in the fault log of the server (all exports), from 1.
    pub seq: u64,
    /// When it happened, in nanoseconds since server start.
    pub time_ns: u64,
    pub export: String,
    pub event: PowerEvent,
    pub origin: PowerOrigin,
    /// The request index the export's next request gets: the change came after every request
    /// with a lower index was decided.
    pub next_request_index: u64,
    /// With `origin: trigger`: the trigger that was armed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<String>,
    /// For a cut: what it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutRecord>,
    /// For a cut that left the export off: until a trigger and/or for a time (both absent: until
    /// `POST .../power-on`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_off: Option<PowerOffRecord>,
}

/// One line of the fault log: a request a rule touched, or a power change no request decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum LogEntry {
    Request(FaultRecord),
    Power(PowerRecord),
}

impl LogEntry {
    pub fn seq(&self) -> u64 {
        match self {
            LogEntry::Request(record) => record.seq,
            LogEntry::Power(record) => record.seq,
        }
    }

    pub fn export(&self) -> &str {
        match self {
            LogEntry::Request(record) => &record.export,
            LogEntry::Power(record) => &record.export,
        }
    }

    pub fn time_ns(&self) -> u64 {
        match self {
            LogEntry::Request(record) => record.time_ns,
            LogEntry::Power(record) => record.time_ns,
        }
    }

    /// The request record, if this is one.
    pub fn request(&self) -> Option<&FaultRecord> {
        match self {
            LogEntry::Request(record) => Some(record),
            LogEntry::Power(_) => None,
        }
    }

    /// The power record, if this is one.
    pub fn power(&self) -> Option<&PowerRecord> {
        match self {
            LogEntry::Request(_) => None,
            LogEntry::Power(record) => Some(record),
        }
    }

    /// The entry as one JSON line (without the newline).
    pub fn to_json_line(&self) -> String {
        // Cannot fail: records hold only strings, integers, booleans and lists of them.
        serde_json::to_string(self).expect("a fault-log entry always serializes")
    }
}

impl<'de> Deserialize<'de> for LogEntry {
    /// A line with an `event` is a power record, any other a request record; each is read
    /// strictly (unknown fields are errors), with the error of the kind the line is.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<LogEntry, D::Error> {
        use serde::de::Error;
        let value = serde_json::Value::deserialize(deserializer)?;
        if value.get("event").is_some() {
            serde_json::from_value(value).map(LogEntry::Power).map_err(D::Error::custom)
        } else {
            serde_json::from_value(value).map(LogEntry::Request).map_err(D::Error::custom)
        }
    }
}

impl From<FaultRecord> for LogEntry {
    fn from(record: FaultRecord) -> LogEntry {
        LogEntry::Request(record)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorruptRecord {
    pub seed: u64,
    pub bytes: u32,
}

/// One line of the fault log. Everything needed to make the same decision again is here
/// (see [`crate::replay_policy`]); `seq`, `time_ns`, `cookie`, `waited_ns` and `cut` describe this
/// run only and are left out of the [decision view](FaultRecord::decision_view).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRecord {
    /// Position in the fault log of the server (all exports), from 1.
    pub seq: u64,
    /// When the server finished the request, in nanoseconds since server start.
    pub time_ns: u64,
    pub export: String,
    pub connection: u64,
    pub cookie: u64,
    pub request_index: u64,
    pub op: Op,
    pub offset: u64,
    pub length: u64,
    pub flags: RequestFlags,
    pub rule: String,
    pub outcome: Outcome,
    pub action: ActionRecord,
    pub reply: ReplyRecord,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<Errno>,
    /// The delay the engine decided (0 for none or for a stall).
    pub delay_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stall: Option<StallRecord>,
    /// For a torn write: the bytes the engine decided to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torn_persist: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<CorruptRecord>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub power_cut: bool,
    /// With a power cut that kept the export off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_off: Option<PowerOffRecord>,
    /// With a power cut: what it did (absent when the request's connection had died in an
    /// earlier cut, so this one did not happen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut: Option<CutRecord>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub bad_sector: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub armed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disarmed: Vec<String>,
    /// Bytes that reached storage, as the server reports after doing the action.
    pub persisted: u64,
    /// How long the request actually waited (a stall ends on release or timeout), if the
    /// server measured it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waited_ns: Option<u64>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The part of a record that the same seed and the same request sequence reproduce exactly.
#[derive(Serialize)]
struct DecisionView<'a> {
    export: &'a str,
    connection: u64,
    request_index: u64,
    op: Op,
    offset: u64,
    length: u64,
    flags: RequestFlags,
    rule: &'a str,
    outcome: Outcome,
    action: ActionRecord,
    reply: ReplyRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    errno: Option<Errno>,
    delay_ns: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    stall: &'a Option<StallRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    torn_persist: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    corrupt: Option<CorruptRecord>,
    #[serde(skip_serializing_if = "is_false")]
    power_cut: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    power_off: &'a Option<PowerOffRecord>,
    #[serde(skip_serializing_if = "is_false")]
    bad_sector: bool,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    armed: &'a [String],
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    disarmed: &'a [String],
    persisted: u64,
}

impl FaultRecord {
    /// True when the client was answered with an error (not a disconnect, not a silent loss).
    pub fn failed(&self) -> bool {
        self.reply == ReplyRecord::Error
    }

    /// True when the request's range overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.offset < end && start < self.offset.saturating_add(self.length)
    }

    /// The record for a request the server has finished. `None` when no rule touched it
    /// (`decision.rule` is `None`): such requests are not logged.
    pub fn new(
        seq: u64,
        elapsed: Duration,
        export: &str,
        request: &Request,
        decision: &Decision,
        persisted_bytes: u64,
    ) -> Option<FaultRecord> {
        let rule = decision.rule.as_deref()?;
        let (action, torn_persist, corrupt) = match decision.action {
            Action::Perform => (ActionRecord::Perform, None, None),
            Action::Skip => (ActionRecord::Skip, None, None),
            Action::Torn { persist } => (ActionRecord::Torn, Some(persist), None),
            Action::CorruptRead { seed, bytes } => {
                (ActionRecord::CorruptRead, None, Some(CorruptRecord { seed, bytes }))
            }
        };
        let (reply, errno) = match decision.reply {
            Reply::Ok => (ReplyRecord::Ok, None),
            Reply::Error(errno) => (ReplyRecord::Error, Some(errno)),
            Reply::Disconnect => (ReplyRecord::Disconnect, None),
        };
        let (delay_ns, stall) = match &decision.wait {
            Wait::None => (0, None),
            Wait::Delay(delay) => (nanos(*delay), None),
            Wait::Until { trigger, timeout } => {
                (0, Some(StallRecord { trigger: trigger.to_string(), timeout_ns: timeout.map(nanos) }))
            }
        };
        Some(FaultRecord {
            seq,
            time_ns: nanos(elapsed),
            export: export.to_string(),
            connection: request.connection,
            cookie: request.cookie,
            request_index: decision.request_index,
            op: request.op,
            offset: request.offset,
            length: request.length,
            flags: request.flags,
            rule: rule.to_string(),
            outcome: Outcome::of(decision),
            action,
            reply,
            errno,
            delay_ns,
            stall,
            torn_persist,
            corrupt,
            power_cut: decision.power_cut.is_some(),
            power_off: decision.power_cut.as_ref().and_then(PowerOffRecord::of),
            cut: None,
            bad_sector: decision.bad_sector,
            armed: decision.armed.iter().map(|name| name.to_string()).collect(),
            disarmed: decision.disarmed.iter().map(|name| name.to_string()).collect(),
            persisted: persisted_bytes,
            waited_ns: None,
        })
    }

    /// The record as one JSON line (without the newline).
    pub fn to_json_line(&self) -> String {
        // Cannot fail: the record holds only strings, integers, booleans and lists of them.
        serde_json::to_string(self).expect("a fault record always serializes")
    }

    /// The record without what differs between runs (`seq`, `time_ns`, `cookie`, `waited_ns`, `cut`),
    /// as one JSON line: two runs with the same seed and request sequence give the same text.
    pub fn decision_view(&self) -> String {
        let view = DecisionView {
            export: &self.export,
            connection: self.connection,
            request_index: self.request_index,
            op: self.op,
            offset: self.offset,
            length: self.length,
            flags: self.flags,
            rule: &self.rule,
            outcome: self.outcome,
            action: self.action,
            reply: self.reply,
            errno: self.errno,
            delay_ns: self.delay_ns,
            stall: &self.stall,
            torn_persist: self.torn_persist,
            corrupt: self.corrupt,
            power_cut: self.power_cut,
            power_off: &self.power_off,
            bad_sector: self.bad_sector,
            armed: &self.armed,
            disarmed: &self.disarmed,
            persisted: self.persisted,
        };
        // Cannot fail, as above.
        serde_json::to_string(&view).expect("a decision view always serializes")
    }

    /// The field a decision of this record's action and reply needs but the record lacks (a log
    /// edited by hand, or written by something else).
    pub(crate) fn missing_field(&self) -> Option<&'static str> {
        if self.action == ActionRecord::Torn && self.torn_persist.is_none() {
            Some("torn_persist")
        } else if self.action == ActionRecord::CorruptRead && self.corrupt.is_none() {
            Some("corrupt")
        } else if self.reply == ReplyRecord::Error && self.errno.is_none() {
            Some("errno")
        } else {
            None
        }
    }

    /// The decision this record logged, rebuilt: what [`crate::Engine::decide`] returned.
    /// `None` when the record lacks a field its action or reply needs.
    pub fn decision(&self) -> Option<Decision> {
        if self.missing_field().is_some() {
            return None;
        }
        let names = |list: &[String]| list.iter().map(|name| std::sync::Arc::from(name.as_str())).collect();
        Some(Decision {
            rule: Some(std::sync::Arc::from(self.rule.as_str())),
            request_index: self.request_index,
            wait: match &self.stall {
                Some(stall) => Wait::Until {
                    trigger: std::sync::Arc::from(stall.trigger.as_str()),
                    timeout: stall.timeout_ns.map(Duration::from_nanos),
                },
                None if self.delay_ns > 0 => Wait::Delay(Duration::from_nanos(self.delay_ns)),
                None => Wait::None,
            },
            power_cut: self.power_cut.then(|| PowerCut {
                until: self.power_off.as_ref().and_then(|off| off.until.as_deref()).map(std::sync::Arc::from),
                timeout: self.power_off.as_ref().and_then(|off| off.timeout_ns).map(Duration::from_nanos),
            }),
            action: match self.action {
                ActionRecord::Perform => Action::Perform,
                ActionRecord::Skip => Action::Skip,
                ActionRecord::Torn => Action::Torn { persist: self.torn_persist? },
                ActionRecord::CorruptRead => {
                    let corrupt = self.corrupt?;
                    Action::CorruptRead { seed: corrupt.seed, bytes: corrupt.bytes }
                }
            },
            reply: match self.reply {
                ReplyRecord::Ok => Reply::Ok,
                ReplyRecord::Error => Reply::Error(self.errno?),
                ReplyRecord::Disconnect => Reply::Disconnect,
            },
            bad_sector: self.bad_sector,
            armed: names(&self.armed),
            disarmed: names(&self.disarmed),
        })
    }
}

/// The decision log of a set of records: their decision views sorted by export and request
/// index, one per line. Completion order varies from run to run (delays overtake each other);
/// this text does not.
pub fn decision_log<'a>(records: impl IntoIterator<Item = &'a FaultRecord>) -> String {
    let mut sorted: Vec<&FaultRecord> = records.into_iter().collect();
    sorted.sort_by(|a, b| (&a.export, a.request_index).cmp(&(&b.export, b.request_index)));
    sorted.iter().map(|record| record.decision_view() + "\n").collect()
}

/// A fault-log line that could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct FaultLogError {
    /// 1-based line number.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for FaultLogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Reads a fault log (JSON lines; blank lines are skipped): request records and power records.
pub fn parse_fault_log(text: &str) -> Result<Vec<LogEntry>, FaultLogError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(number, line)| {
            serde_json::from_str(line).map_err(|error| FaultLogError { line: number + 1, message: error.to_string() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn decision(action: Action, reply: Reply, wait: Wait) -> Decision {
        let none: Arc<[Arc<str>]> = Arc::from(Vec::new());
        Decision {
            rule: Some(Arc::from("r")),
            request_index: 3,
            wait,
            power_cut: None,
            action,
            reply,
            bad_sector: false,
            armed: Arc::from(vec![Arc::from("t")]),
            disarmed: none,
        }
    }

    fn request() -> Request {
        Request {
            op: Op::Write,
            offset: 4096,
            length: 8192,
            flags: RequestFlags { fua: true, ..RequestFlags::default() },
            connection: 1,
            cookie: 77,
        }
    }

    #[test]
    fn outcomes_name_the_action_and_reply_pairs() {
        let eio = Reply::Error(Errno::EIO);
        assert_eq!(Outcome::of(&decision(Action::Skip, eio, Wait::None)), Outcome::Error);
        assert_eq!(Outcome::of(&decision(Action::Perform, eio, Wait::None)), Outcome::PersistedError);
        assert_eq!(Outcome::of(&decision(Action::Skip, Reply::Ok, Wait::None)), Outcome::SilentLoss);
        assert_eq!(Outcome::of(&decision(Action::Torn { persist: 1 }, eio, Wait::None)), Outcome::Torn);
        assert_eq!(Outcome::of(&decision(Action::Perform, Reply::Ok, Wait::Delay(Duration::MAX))), Outcome::Delay);
        assert_eq!(Outcome::of(&decision(Action::Skip, Reply::Disconnect, Wait::None)), Outcome::Disconnect);
    }

    #[test]
    fn a_record_round_trips_through_json_and_rebuilds_its_decision() {
        let original =
            decision(Action::Torn { persist: 512 }, Reply::Error(Errno::ENOSPC), Wait::Delay(Duration::from_millis(5)));
        let record = FaultRecord::new(9, Duration::from_secs(1), "disk", &request(), &original, 512).unwrap();
        let line = record.to_json_line();
        assert!(line.contains(r#""flags":["fua"]"#), "{line}");
        assert!(line.contains(r#""errno":"ENOSPC""#), "{line}");
        let parsed = parse_fault_log(&format!("{line}\n\n{line}\n")).unwrap();
        assert_eq!(parsed, [LogEntry::Request(record.clone()), LogEntry::Request(record.clone())]);
        assert_eq!(record.decision(), Some(original));
        let incomplete = FaultRecord { torn_persist: None, ..record };
        assert_eq!(incomplete.missing_field(), Some("torn_persist"));
        assert!(incomplete.decision().is_none());
    }

    #[test]
    fn the_decision_view_leaves_out_what_differs_between_runs() {
        let decided = decision(Action::Skip, Reply::Error(Errno::EIO), Wait::None);
        let first = FaultRecord::new(1, Duration::from_secs(1), "disk", &request(), &decided, 0).unwrap();
        let mut second =
            FaultRecord::new(40, Duration::from_secs(9), "disk", &Request { cookie: 5, ..request() }, &decided, 0)
                .unwrap();
        second.waited_ns = Some(12);
        assert_ne!(first, second);
        assert_eq!(first.decision_view(), second.decision_view());
        assert!(!first.decision_view().contains("seq"));
        second.offset += 1;
        assert_ne!(first.decision_view(), second.decision_view());
    }

    #[test]
    fn requests_no_rule_touched_are_not_logged() {
        let mut untouched = decision(Action::Perform, Reply::Ok, Wait::None);
        untouched.rule = None;
        assert!(FaultRecord::new(1, Duration::ZERO, "disk", &request(), &untouched, 8192).is_none());
    }

    #[test]
    fn power_records_and_request_records_share_the_log_and_each_line_is_read_as_its_kind() {
        let mut cut = CutRecord {
            connections: 2,
            journaled: true,
            undone_writes: 3,
            undone_bytes: 12288,
            ..CutRecord::default()
        };
        cut.set_undone_ranges([(8192, 4096), (0, 4096), (4096, 4096), (65536, 4096)]);
        assert_eq!(cut.undone, vec![[0, 12288], [65536, 4096]], "merged where they touch, in offset order");
        let power = PowerRecord {
            seq: 2,
            time_ns: 5,
            export: "disk".into(),
            event: PowerEvent::PowerCut,
            origin: PowerOrigin::ControlApi,
            next_request_index: 17,
            trigger: None,
            cut: Some(cut),
            power_off: Some(PowerOffRecord { until: Some("power-on".into()), timeout_ns: None }),
        };
        let line = LogEntry::Power(power.clone()).to_json_line();
        assert!(line.contains(r#""event":"power_cut","origin":"control_api""#), "{line}");
        assert!(line.contains(r#""undone":[[0,12288],[65536,4096]]"#), "{line}");
        let decided = decision(Action::Skip, Reply::Error(Errno::EIO), Wait::None);
        let request = FaultRecord::new(1, Duration::ZERO, "disk", &request(), &decided, 0).unwrap();
        let text = format!("{}\n{line}\n", request.to_json_line());
        let entries = parse_fault_log(&text).unwrap();
        assert_eq!(entries, [LogEntry::Request(request), LogEntry::Power(power)]);
        assert_eq!((entries[1].seq(), entries[1].export(), entries[1].request().is_none()), (2, "disk", true));
        // A power line is read as one, strictly: its own error, not a request's.
        let error = parse_fault_log(&line.replace("\"origin\"", "\"origins\"")).unwrap_err();
        assert!(error.message.contains("origins"), "{error}");
    }

    #[test]
    fn undone_ranges_are_bounded_and_the_rest_counted() {
        let mut cut = CutRecord::default();
        cut.set_undone_ranges((0..MAX_UNDONE_RANGES as u64 + 5).map(|i| (i * 8192, 4096)));
        assert_eq!((cut.undone.len(), cut.undone_ranges_left_out), (MAX_UNDONE_RANGES, 5));
    }

    #[test]
    fn a_bad_line_is_reported_with_its_number() {
        let error = parse_fault_log("\n{not json}\n").unwrap_err();
        assert_eq!(error.line, 2);
    }
}
