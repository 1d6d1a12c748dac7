//! The nbdfault policy language and its engine.
//!
//! A [`Policy`] is read from YAML and checked before use ([`Policy::from_yaml`]); an [`Engine`]
//! holds one per export and answers, for every request, what to do with it ([`Engine::decide`]);
//! a [`FaultRecord`] is the fault-log line for a request a rule touched (a [`PowerRecord`] the
//! line for a power change no request decided), and [`replay_policy`] turns a fault log back into
//! a policy that makes the same decisions.

mod bad_sectors;
mod decision;
mod engine;
mod error;
mod index;
mod policy;
mod random;
mod record;
mod replay;
mod request;
mod schema;
pub mod units;

pub use bad_sectors::BadSector;
pub use decision::{Action, Decision, PowerCut, Reply, Wait};
pub use engine::{Engine, RuleCounter, TriggerState};
pub use error::{PolicyError, PolicyErrors};
pub use policy::{Policy, PolicyLimits, PolicyWarning};
pub use random::corrupt;
pub use record::{
    ActionRecord, CorruptRecord, CutRecord, FaultLogError, FaultRecord, LogEntry, MAX_UNDONE_RANGES, Outcome,
    PowerEvent, PowerOffRecord, PowerOrigin, PowerRecord, ReplyRecord, StallRecord, decision_log, parse_fault_log,
};
pub use replay::{ReplayError, replay_policy};
pub use request::{Errno, Op, Request, RequestFlags};
pub use schema::json_schema;
