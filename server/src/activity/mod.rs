//! What an export's requests did, for those who watch: counters and latency histograms for
//! `GET /metrics`, and live events for `GET /v1/exports/{name}/events` (the live page and `ctl
//! watch`).
//!
//! The fault layer's one request path ([`crate::fault::FaultLayer`]) reports every request here
//! through a [`Watch`]: two clock reads and a few relaxed atomic adds per request, no lock and no
//! allocation; events cost one more atomic load while nobody subscribes.

pub mod events;
pub mod metrics;

use std::sync::Arc;
use std::time::Duration;

use nbdfault_policies::{Decision, LogEntry, Op, Outcome, Wait};

use crate::fault::Clock;
use crate::storage::{IoContext, IoError};
use events::{ChangedBy, Ending, Event, EventHub, PendingEvent, RequestEvent};
use metrics::RequestMetrics;

/// One export's activity.
pub struct Activity {
    pub metrics: Arc<RequestMetrics>,
    pub events: Arc<EventHub>,
}

impl Activity {
    pub fn new(export_size: u64) -> Activity {
        Activity { metrics: Arc::new(RequestMetrics::default()), events: Arc::new(EventHub::new(export_size)) }
    }

    /// A request entered the fault layer at `start` (`clock.now()`).
    #[inline]
    pub fn watch(&self, op: Op, ctx: IoContext, offset: u64, length: u64, clock: Clock, start: Duration) -> Watch<'_> {
        self.metrics.began(in_flight_bytes(op, length));
        Watch { activity: self, clock, op, ctx, offset, length, start, touched: None, done: false }
    }

    /// A fault-log record was written. Request records count in the faults metric; power
    /// records (no rule, no outcome) go to subscribers only.
    pub fn fault(&self, entry: &Arc<LogEntry>) {
        if let LogEntry::Request(record) = &**entry {
            self.metrics.fault(&record.rule, record.outcome);
        }
        self.events.publish(Event::Fault(Arc::clone(entry)));
    }

    /// The control API armed or disarmed a trigger.
    pub fn trigger_set(&self, name: &str, armed: bool, now: Duration) {
        if self.events.is_watched() {
            self.events.publish(Event::Trigger {
                name: Arc::from(name),
                armed,
                by: ChangedBy::ControlApi,
                time_ns: nanos(now),
            });
        }
    }

    /// A policy was installed (its origin and rule names) or removed.
    pub fn policy_set(&self, policy: Option<&nbdfault_policies::Policy>, now: Duration) {
        if self.events.is_watched() {
            let policy = policy.map(|policy| {
                Box::new((policy.origin().to_string(), policy.rule_names().map(Arc::from).collect::<Vec<Arc<str>>>()))
            });
            self.events.publish(Event::Policy { time_ns: nanos(now), policy });
        }
    }

    /// The export was reset to its pristine contents.
    pub fn reset(&self, now: Duration) {
        self.events.publish(Event::Reset { time_ns: nanos(now) });
    }

    /// Power was cut (`on: false`: by a rule or the control API) or came back (`on: true`).
    pub fn power(&self, on: bool, now: Duration) {
        self.events.publish(Event::Power { time_ns: nanos(now), on });
    }
}

/// The bytes a request holds in flight: what it reads or writes.
fn in_flight_bytes(op: Op, length: u64) -> u64 {
    if matches!(op, Op::Read | Op::Write) { length } else { 0 }
}

pub fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One request on its way through the fault layer; reports it when it ends (or is cancelled).
pub struct Watch<'a> {
    activity: &'a Activity,
    clock: Clock,
    op: Op,
    ctx: IoContext,
    offset: u64,
    length: u64,
    start: Duration,
    /// The deciding rule and its outcome, kept only while someone subscribes.
    touched: Option<(Arc<str>, Outcome)>,
    done: bool,
}

impl Watch<'_> {
    /// The engine decided the request and a rule (or a bad sector) touched it: subscribers hear of
    /// the triggers it armed or disarmed and, if it will wait, that it is pending.
    pub fn decided(&mut self, decision: &Decision) {
        let hub = &self.activity.events;
        if !hub.is_watched() {
            return;
        }
        let Some(rule) = &decision.rule else { return };
        self.touched = Some((Arc::clone(rule), Outcome::of(decision)));
        let time_ns = nanos(self.start);
        for (names, armed) in [(&decision.armed, true), (&decision.disarmed, false)] {
            for name in names.iter() {
                hub.publish(Event::Trigger { name: Arc::clone(name), armed, by: ChangedBy::Rule, time_ns });
            }
        }
        let (until, delay_ns) = match &decision.wait {
            Wait::None => return,
            Wait::Delay(delay) => (None, nanos(*delay)),
            Wait::Until { trigger, .. } => (Some(Arc::clone(trigger)), 0),
        };
        hub.publish(Event::Pending(PendingEvent {
            op: self.op,
            offset: self.offset,
            length: self.length,
            connection: self.ctx.connection,
            cookie: self.ctx.cookie,
            start_ns: time_ns,
            rule: Arc::clone(rule),
            until,
            delay_ns,
        }));
    }

    /// The request is answered.
    #[inline]
    pub fn finish<T>(mut self, result: &Result<T, IoError>) {
        let now = self.clock.now();
        self.done = true;
        let ending = match result {
            Ok(_) => Ending::Ok,
            Err(IoError::Failed { errno, .. }) => Ending::Error(*errno),
            Err(IoError::Disconnect { .. }) => Ending::Disconnect,
        };
        let metrics = &self.activity.metrics;
        metrics.ended(in_flight_bytes(self.op, self.length));
        metrics.finished(self.op, self.length, ending != Ending::Ok, now.saturating_sub(self.start));
        self.report(ending, now);
    }

    fn report(&mut self, ending: Ending, now: Duration) {
        let hub = &self.activity.events;
        if !hub.is_watched() {
            return;
        }
        let (rule, outcome) = match self.touched.take() {
            Some((rule, outcome)) => (Some(rule), Some(outcome)),
            None => (None, None),
        };
        hub.publish(Event::Request(RequestEvent {
            op: self.op,
            offset: self.offset,
            length: self.length,
            flags: self.ctx.flags,
            connection: self.ctx.connection,
            cookie: self.ctx.cookie,
            start_ns: nanos(self.start),
            end_ns: nanos(now),
            ending,
            rule,
            outcome,
        }));
    }
}

impl Drop for Watch<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.activity.metrics.ended(in_flight_bytes(self.op, self.length));
            self.report(Ending::Cancelled, self.clock.now());
        }
    }
}
