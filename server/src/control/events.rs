//! `GET /v1/exports/{name}/events[?rate=N]`: the export's live events as Server-Sent Events, for
//! the live page and `nbdfault ctl watch`.
//!
//! Each subscriber has its own bounded queue in the export's [`EventHub`]; this stream takes it
//! every [`TICK`] and writes it out in one piece. A subscriber that falls [`QUEUE`] events behind
//! is dropped: a last `dropped` event says why and the stream ends. The data path never waits for
//! a subscriber.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ControlState};
use crate::activity::events::{
    Aggregate, BINS, ChangedBy, DEFAULT_RATE, Ending, Event, EventHub, QUEUE, SLOT, Subscription,
};
use crate::activity::metrics::outcome_name;
use crate::activity::nanos;
use crate::fault::Clock;
use crate::wire::{command_flags, errno};

/// How often a stream takes its queue and writes what it holds.
pub const TICK: Duration = Duration::from_millis(50);
/// A comment line after this long without an event, so proxies and clients see the stream alive.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    /// Request events per second sent one by one; the rest are aggregated. 0: every one.
    rate: Option<u32>,
}

pub(super) async fn events(
    State(state): State<ControlState>,
    Path(name): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(format!("{e}; use ?rate=EVENTS_PER_SECOND")))?;
    let export = Arc::clone(state.export(&name)?);
    let rate = query.rate.unwrap_or(DEFAULT_RATE);
    let hub = Arc::clone(&export.activity().events);
    let subscription =
        hub.subscribe(rate).map_err(|error| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string()))?;
    tracing::info!(export = %export.name, rate, "event subscriber attached");
    let hello = json!({
        "export": export.name,
        "size": export.size(),
        "time_ns": nanos(state.clock.now()),
        "rate": rate,
        "queue": QUEUE,
        "tick_ms": TICK.as_millis() as u64,
        "slot_ms": SLOT.as_millis() as u64,
        "bins": BINS,
        "bin_bytes": hub.bin_bytes(),
    });
    let mut first = String::new();
    write_event(&mut first, "hello", None, &hello);
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = Stream {
        subscription,
        hub,
        clock: state.clock,
        export: export.name.clone(),
        events: VecDeque::with_capacity(QUEUE),
        pending: Some(Bytes::from(first)),
        ticker,
        quiet: Duration::ZERO,
        ended: false,
    };
    let body = futures_util::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), stream))
    });
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream")),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        (header::HeaderName::from_static("x-accel-buffering"), HeaderValue::from_static("no")),
    ];
    Ok((headers, Body::from_stream(body)).into_response())
}

/// Ends every event stream once the server stops taking work: each says so in a last `dropped`
/// event, so the connections can close and shutdown need not wait for them.
pub(super) fn end_streams_at_shutdown(exports: Arc<crate::export::Exports>, mut shutdown: crate::shutdown::Shutdown) {
    tokio::spawn(async move {
        shutdown.stopping().await;
        for export in exports.iter() {
            export.activity().events.close("the server is shutting down");
        }
    });
}

/// One subscriber's stream.
struct Stream {
    subscription: Subscription,
    hub: Arc<EventHub>,
    clock: Clock,
    export: String,
    /// The queue taken from the hub; its capacity goes back and forth, so neither side allocates.
    events: VecDeque<(u64, Event)>,
    pending: Option<Bytes>,
    ticker: tokio::time::Interval,
    quiet: Duration,
    ended: bool,
}

impl Stream {
    /// The next piece of the body; `None` once the stream is over.
    async fn next(&mut self) -> Option<Bytes> {
        if let Some(first) = self.pending.take() {
            return Some(first);
        }
        if self.ended {
            tracing::info!(export = %self.export, "event subscriber detached");
            return None;
        }
        loop {
            self.ticker.tick().await;
            let taken = self.subscription.take(&mut self.events, true);
            let mut out = String::new();
            let mut written = Vec::new();
            for (id, event) in self.events.drain(..) {
                match event {
                    Event::Aggregate(aggregate) => {
                        write_event(&mut out, "aggregate", None, &describe_aggregate(&aggregate, self.hub.bin_bytes()));
                        written.push(aggregate);
                    }
                    event => {
                        let (kind, data) = describe(&event, self.hub.bin_bytes());
                        write_event(&mut out, kind, Some(id), &data);
                    }
                }
            }
            if !written.is_empty() {
                self.subscription.recycle(written);
            }
            if let Some(reason) = taken.dropped {
                tracing::info!(export = %self.export, %reason, "event subscriber dropped");
                write_event(
                    &mut out,
                    "dropped",
                    None,
                    &json!({ "reason": reason, "time_ns": nanos(self.clock.now()) }),
                );
                self.ended = true;
            }
            if !out.is_empty() {
                self.quiet = Duration::ZERO;
                return Some(Bytes::from(out));
            }
            self.quiet += TICK;
            if self.quiet >= KEEP_ALIVE {
                self.quiet = Duration::ZERO;
                return Some(Bytes::from_static(b": keep-alive\n\n"));
            }
        }
    }
}

/// Appends one SSE event: `event:`, `id:` (the export's event number) and one `data:` line.
fn write_event(out: &mut String, kind: &str, id: Option<u64>, data: &Value) {
    let _ = writeln!(out, "event: {kind}");
    if let Some(id) = id {
        let _ = writeln!(out, "id: {id}");
    }
    // serde_json escapes newlines inside strings: the data is always one line.
    let _ = write!(out, "data: {data}\n\n");
}

fn flag_names(flags: u16) -> Vec<&'static str> {
    [
        (command_flags::FUA, "fua"),
        (command_flags::NO_HOLE, "no_hole"),
        (command_flags::DF, "df"),
        (command_flags::REQ_ONE, "req_one"),
        (command_flags::FAST_ZERO, "fast_zero"),
    ]
    .into_iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

/// An event's SSE type and JSON data.
fn describe(event: &Event, bin_bytes: u64) -> (&'static str, Value) {
    match event {
        Event::Request(request) => {
            let mut data = json!({
                "op": request.op.name(),
                "offset": request.offset,
                "length": request.length,
                "flags": flag_names(request.flags),
                "connection": request.connection,
                "cookie": request.cookie,
                "start_ns": request.start_ns,
                "end_ns": request.end_ns,
            });
            let (reply, errno) = match request.ending {
                Ending::Ok => ("ok", None),
                Ending::Error(value) => ("error", Some(errno::name(value))),
                Ending::Disconnect => ("disconnect", None),
                Ending::Cancelled => ("cancelled", None),
            };
            data["reply"] = json!(reply);
            if let Some(errno) = errno {
                data["errno"] = json!(errno);
            }
            if let Some(rule) = &request.rule {
                data["rule"] = json!(&**rule);
            }
            if let Some(outcome) = request.outcome {
                data["outcome"] = json!(outcome_name(outcome));
            }
            ("request", data)
        }
        Event::Pending(pending) => {
            let mut data = json!({
                "op": pending.op.name(),
                "offset": pending.offset,
                "length": pending.length,
                "connection": pending.connection,
                "cookie": pending.cookie,
                "start_ns": pending.start_ns,
                "rule": &*pending.rule,
            });
            match &pending.until {
                Some(trigger) => data["until"] = json!(&**trigger),
                None => data["delay_ns"] = json!(pending.delay_ns),
            }
            ("pending", data)
        }
        Event::Fault(record) => ("fault", serde_json::to_value(&**record).unwrap_or_default()),
        Event::Trigger { name, armed, by, time_ns } => {
            let by = match by {
                ChangedBy::ControlApi => "control_api",
                ChangedBy::Rule => "rule",
            };
            ("trigger", json!({ "trigger": &**name, "armed": armed, "by": by, "time_ns": time_ns }))
        }
        Event::Policy { time_ns, policy } => match policy {
            Some(policy) => {
                let (origin, rules) = &**policy;
                let rules: Vec<&str> = rules.iter().map(|rule| &**rule).collect();
                ("policy", json!({ "time_ns": time_ns, "installed": true, "origin": origin, "rules": rules }))
            }
            None => ("policy", json!({ "time_ns": time_ns, "installed": false })),
        },
        Event::Reset { time_ns } => ("reset", json!({ "time_ns": time_ns })),
        Event::Power { time_ns, on } => ("power", json!({ "time_ns": time_ns, "on": on })),
        Event::Aggregate(aggregate) => ("aggregate", describe_aggregate(aggregate, bin_bytes)),
    }
}

/// An aggregate's JSON: per op the counts, latency and the non-empty bins as `[bin, requests]`.
fn describe_aggregate(aggregate: &Aggregate, bin_bytes: u64) -> Value {
    let mut ops = serde_json::Map::new();
    for (op, counts) in nbdfault_policies::Op::ALL.iter().zip(&aggregate.ops) {
        if counts.requests == 0 {
            continue;
        }
        let bins: Vec<[u64; 2]> = counts
            .bins
            .iter()
            .enumerate()
            .filter(|(_, count)| **count > 0)
            .map(|(bin, count)| [bin as u64, u64::from(*count)])
            .collect();
        ops.insert(
            op.name().to_string(),
            json!({
                "requests": counts.requests,
                "bytes": counts.bytes,
                "errors": counts.errors,
                "latency_sum_ns": counts.latency_sum_ns,
                "latency_max_ns": counts.latency_max_ns,
                "bins": bins,
            }),
        );
    }
    json!({
        "from_ns": aggregate.from_ns,
        "to_ns": aggregate.to_ns,
        "requests": aggregate.requests,
        "bin_bytes": bin_bytes,
        "ops": ops,
    })
}
