//! The control API's answers, as docs/control-api.md documents them. Fields the server adds
//! later are ignored, so an older client keeps working with a newer server.

use serde::Deserialize;

use nbdfault_policies::{Errno, FaultRecord};

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
    pub records: Vec<FaultRecord>,
    /// The `seq` of the last record (the `x-last-seq` header); `None` when there is none.
    pub last_seq: Option<u64>,
    /// Records that fell out of the server's memory (`x-dropped`).
    pub dropped: u64,
}
