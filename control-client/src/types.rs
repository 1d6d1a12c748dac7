//! The control API's answers, as docs/control-api.md documents them. Fields the server adds
//! later are ignored, so an older client keeps working with a newer server.

use serde::Deserialize;

use nbdfault_policies::{Errno, FaultRecord, PowerRecord};

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub uptime_ms: u64,
    pub exports: usize,
}

/// One export, as `GET /v1/exports/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ExportView {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub storage: String,
    pub size: u64,
    pub read_only: bool,
    pub transmission_flags: u16,
    pub flags: Vec<String>,
    pub policy: Option<PolicyView>,
    pub triggers: Vec<TriggerState>,
    #[serde(default)]
    pub bad_sectors: Vec<BadSector>,
    pub counters: Counters,
    pub requests_decided: u64,
    pub faults_logged: usize,
    pub unflushed_bytes: u64,
    /// The device's power (absent from servers before power cuts were device-wide).
    #[serde(default)]
    pub power: Option<PowerView>,
    /// How a file export is read and written (absent for memory storage), as the server says it.
    #[serde(default)]
    pub data_path: Option<serde_json::Value>,
}

impl ExportView {
    /// The hit counts of the installed policy's rule named `rule`.
    pub fn rule(&self, rule: &str) -> Option<&RuleCounter> {
        self.policy.as_ref()?.rules.iter().find(|counter| counter.rule == rule)
    }

    /// Whether the trigger is armed (a trigger never named is not).
    pub fn is_armed(&self, trigger: &str) -> bool {
        self.triggers.iter().any(|state| state.name == trigger && state.armed)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PolicyView {
    pub origin: String,
    #[serde(default)]
    pub description: Option<String>,
    pub seed: u64,
    pub rules: Vec<RuleCounter>,
    pub source: String,
}

/// How often a rule met its conditions (`occurrences`) and how often it decided (`fired`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RuleCounter {
    pub rule: String,
    pub occurrences: u64,
    pub fired: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TriggerState {
    pub name: String,
    pub armed: bool,
    /// Time since server start of the last arm or disarm.
    pub since_ns: u64,
}

/// A range that fails reads (and writes, while it has write failures left).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BadSector {
    pub start: u64,
    pub end: u64,
    pub errno: Errno,
    /// How many more writes over this range fail before one remaps it.
    pub write_failures: u32,
    /// The rule that made it bad, or the `name` of the declared entry.
    pub origin: String,
    /// True when the policy declared it, false when a sticky rule's failed write left it.
    pub declared: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Counters {
    pub connections: u64,
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub errors: u64,
}

/// The power of an export's device: on, or off after a power cut.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PowerView {
    pub on: bool,
    /// Power cuts since the server started.
    pub cuts: u64,
    /// Connections attached now.
    pub connections: u64,
    /// Time since server start of the last cut or power-on.
    pub since_ns: u64,
    /// While off: the trigger whose arming powers the export on.
    #[serde(default)]
    pub until: Option<String>,
    /// While off with a timeout: when the power comes back, since server start.
    #[serde(default)]
    pub on_at_ns: Option<u64>,
}

/// How long an export stays off after a power cut through the API.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerOff {
    /// Until `POST .../power-on` (implied by the other two).
    pub off: bool,
    /// Until this trigger is armed.
    pub until: Option<String>,
    /// For this long.
    pub timeout: Option<std::time::Duration>,
}

/// The answer to `POST .../power-cut`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PowerCutAnswer {
    pub export: String,
    pub power: PowerView,
    /// Connections attached when the power went: every one of them was dropped.
    pub dropped_connections: u64,
    /// Writes not yet flushed that the cut undid, and their bytes.
    pub undone_writes: u64,
    pub undone_bytes: u64,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The answer to `POST .../power-on`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PowerOnAnswer {
    pub export: String,
    pub power: PowerView,
    /// False when it was on already.
    pub changed: bool,
}

/// The answer to `PUT .../policy`: the export afterwards and the policy's warnings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PolicyAnswer {
    #[serde(flatten)]
    pub export: ExportView,
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// The answer to `GET .../faults`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultPage {
    /// The records of requests a rule touched.
    pub records: Vec<FaultRecord>,
    /// The records of power changes no request decided: power cuts through the control API,
    /// power-ons.
    pub power: Vec<PowerRecord>,
    /// The `seq` of the last record of either kind (the `x-last-seq` header); `None` when there is none.
    pub last_seq: Option<u64>,
    /// Records that fell out of the server's memory (`x-dropped`).
    pub dropped: u64,
}
