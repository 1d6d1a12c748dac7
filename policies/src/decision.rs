//! What the engine tells the server to do with one request.
//!
//! The server applies a decision in this order: wait (a delay or a stall holds only this request),
//! then the power cut, then the action, then the reply.

use std::sync::Arc;
use std::time::Duration;

use crate::request::Errno;

/// The engine's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The rule that decided, or the origin of the bad sector that failed the request. `None`:
    /// nothing touched this request; pass it through and log nothing.
    pub rule: Option<Arc<str>>,
    /// This request's position in the export's request stream, from 0.
    pub request_index: u64,
    pub wait: Wait,
    /// Cut the export's power before the action: drop every connection of the export, undo
    /// every write not yet flushed, and keep the export off as [`PowerCut`] says.
    pub power_cut: Option<PowerCut>,
    pub action: Action,
    pub reply: Reply,
    /// True when a bad sector, not the rule, chose the action and reply.
    pub bad_sector: bool,
    /// Triggers this decision armed and disarmed (already applied by the engine).
    pub armed: Arc<[Arc<str>]>,
    pub disarmed: Arc<[Arc<str>]>,
}

impl Decision {
    /// The decision for a request no rule touched.
    pub(crate) fn pass(request_index: u64, none: &Arc<[Arc<str>]>) -> Self {
        Decision {
            rule: None,
            request_index,
            wait: Wait::None,
            power_cut: None,
            action: Action::Perform,
            reply: Reply::Ok,
            bad_sector: false,
            armed: none.clone(),
            disarmed: none.clone(),
        }
    }

    /// True when the request goes through untouched: no wait, the I/O done, a successful reply.
    pub fn is_pass_through(&self) -> bool {
        self.wait == Wait::None && self.power_cut.is_none() && self.action == Action::Perform && self.reply == Reply::Ok
    }
}

/// A power cut, and how long the export stays off after it: new connections are refused at the
/// handshake until `until` is armed or `timeout` has passed (whichever comes first), or the
/// control API powers it on. With neither, the power is back at once: clients may reconnect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCut {
    pub until: Option<Arc<str>>,
    pub timeout: Option<Duration>,
}

impl PowerCut {
    /// True when the export stays off after the cut.
    pub fn stays_off(&self) -> bool {
        self.until.is_some() || self.timeout.is_some()
    }
}

/// What to wait for before acting. Either way only this request waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    None,
    Delay(Duration),
    /// Hold the request until `trigger` is armed (check [`crate::Engine::is_armed`] after
    /// subscribing to [`crate::Engine::trigger_changes`]: it may already be armed), or until
    /// `timeout` passes. Without a timeout the request waits for the release or the disconnect.
    Until {
        trigger: Arc<str>,
        timeout: Option<Duration>,
    },
}

/// What to do with the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Do the I/O.
    Perform,
    /// Do not do it: a write does not reach storage, a read returns no data.
    Skip,
    /// Write only the first `persist` bytes of the request (never more than its length).
    Torn { persist: u64 },
    /// Read, then corrupt `bytes` bytes of the data with [`crate::corrupt`] and `seed`.
    CorruptRead { seed: u64, bytes: u32 },
}

/// What the client hears.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error(Errno),
    /// Close the connection without replying.
    Disconnect,
}
