//! Live events for subscribers of `GET /v1/exports/{name}/events`.
//!
//! The data path publishes into the export's [`EventHub`]. While nobody subscribes, that is one
//! relaxed atomic load per request and nothing else. With subscribers, each event is numbered and
//! queued for each of them under one short lock (no allocation: queues are allocated when a
//! subscriber arrives). The stream task of each subscriber takes its queue every tick and writes
//! it out.
//!
//! Bounds: a subscriber's queue holds at most [`QUEUE`] events. Request events beyond the
//! subscriber's rate (per 100 ms slot) are not queued one by one but counted into an aggregate of
//! that slot (per op: requests, bytes, errors, latency, and where on the disk). A subscriber
//! whose queue is full is dropped on the spot: it stops receiving, its stream says so and ends,
//! and the data path stops paying for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nbdfault_policies::{LogEntry, Op, Outcome};

/// Events a subscriber may have waiting; one more and it is dropped.
pub const QUEUE: usize = 8192;
/// Subscribers per export at once; more are refused (503). Each holds one of the control API's
/// connections while it streams.
pub const MAX_SUBSCRIBERS: usize = 8;
/// Request events a subscriber gets one by one per second unless it asks otherwise.
pub const DEFAULT_RATE: u32 = 2000;
/// The length of a rate slot and of an aggregate.
pub const SLOT: Duration = Duration::from_millis(100);
/// Parts of the disk an aggregate counts requests in.
pub const BINS: usize = 128;

/// How a request ended, as the client heard it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Ok,
    /// An error reply with this NBD errno.
    Error(u32),
    /// The connection was dropped instead of a reply (an injected disconnect).
    Disconnect,
    /// The request's task ended first: the client went away, or the server shut down.
    Cancelled,
}

/// One request, as an event: when it began and ended, what it was, what touched it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEvent {
    pub op: Op,
    pub offset: u64,
    pub length: u64,
    /// The NBD command flags.
    pub flags: u16,
    pub connection: u64,
    pub cookie: u64,
    /// Nanoseconds since server start.
    pub start_ns: u64,
    pub end_ns: u64,
    pub ending: Ending,
    /// The rule that decided the request (or the bad sector's origin), and what it did.
    pub rule: Option<Arc<str>>,
    pub outcome: Option<Outcome>,
}

/// A request the engine decided to hold: a delay or a stall, shown as pending until it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingEvent {
    pub op: Op,
    pub offset: u64,
    pub length: u64,
    pub connection: u64,
    pub cookie: u64,
    pub start_ns: u64,
    pub rule: Arc<str>,
    /// The stall's release trigger; `None` for a delay.
    pub until: Option<Arc<str>>,
    pub delay_ns: u64,
}

/// Who changed a trigger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangedBy {
    ControlApi,
    Rule,
}

/// Everything a subscriber hears about.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Request(RequestEvent),
    Pending(PendingEvent),
    /// A fault-log record: a request a rule touched, or a power change no request decided.
    Fault(Arc<LogEntry>),
    Trigger {
        name: Arc<str>,
        armed: bool,
        by: ChangedBy,
        time_ns: u64,
    },
    /// A policy was installed (`origin` and its rules) or removed (`None`).
    Policy {
        time_ns: u64,
        policy: Option<Box<(String, Vec<Arc<str>>)>>,
    },
    Reset {
        time_ns: u64,
    },
    /// Power was cut (`on: false`) or came back (`on: true`) through the control API.
    Power {
        time_ns: u64,
        on: bool,
    },
    /// One subscriber's request events over its rate, summed up, where they belong in its stream
    /// (numbered 0: aggregates are per subscriber).
    Aggregate(Box<Aggregate>),
}

/// Requests of one op in one aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpAggregate {
    pub requests: u64,
    pub bytes: u64,
    pub errors: u64,
    pub latency_sum_ns: u64,
    pub latency_max_ns: u64,
    /// Requests per part of the disk (by start offset).
    pub bins: [u32; BINS],
}

impl Default for OpAggregate {
    fn default() -> Self {
        OpAggregate { requests: 0, bytes: 0, errors: 0, latency_sum_ns: 0, latency_max_ns: 0, bins: [0; BINS] }
    }
}

/// The request events of one slot that went over a subscriber's rate, counted instead of sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Aggregate {
    pub from_ns: u64,
    pub to_ns: u64,
    pub ops: [OpAggregate; Op::ALL.len()],
    pub requests: u64,
}

impl Aggregate {
    fn empty() -> Box<Aggregate> {
        Box::new(Aggregate { from_ns: 0, to_ns: 0, ops: std::array::from_fn(|_| OpAggregate::default()), requests: 0 })
    }

    fn add(&mut self, event: &RequestEvent, bin_bytes: u64) {
        if self.requests == 0 {
            self.from_ns = event.end_ns;
        }
        self.requests += 1;
        self.to_ns = self.to_ns.max(event.end_ns);
        let op = &mut self.ops[event.op as usize];
        op.requests += 1;
        if event.ending == Ending::Ok {
            op.bytes += event.length;
        } else {
            op.errors += 1;
        }
        let latency = event.end_ns.saturating_sub(event.start_ns);
        op.latency_sum_ns += latency;
        op.latency_max_ns = op.latency_max_ns.max(latency);
        let bin = (event.offset / bin_bytes.max(1)).min(BINS as u64 - 1) as usize;
        op.bins[bin] = op.bins[bin].saturating_add(1);
    }

    fn clear(&mut self) {
        self.requests = 0;
        self.from_ns = 0;
        self.to_ns = 0;
        for op in &mut self.ops {
            *op = OpAggregate::default();
        }
    }
}

/// What a subscriber's stream learns each tick, besides its events.
pub struct Taken {
    /// Set when the subscriber was dropped: why. Nothing follows.
    pub dropped: Option<String>,
}

// Aggregates are boxed (4 KiB each) so that closing a slot moves a pointer, not the counts.
#[allow(clippy::vec_box)]
struct Subscriber {
    key: u64,
    queue: VecDeque<(u64, Event)>,
    /// Request events one by one per slot; 0: all of them.
    per_slot: u32,
    slot: u64,
    sent_in_slot: u32,
    /// The aggregate of the current slot.
    current: Box<Aggregate>,
    /// Spare aggregates, reused so that a busy subscriber allocates none per slot.
    spare: Vec<Box<Aggregate>>,
    dropped: Option<String>,
}

impl Subscriber {
    fn push(&mut self, id: u64, event: Event) -> bool {
        if self.queue.len() == QUEUE {
            // What was queued is lost either way: free it now, not when the stream ends.
            self.queue = VecDeque::new();
            self.dropped = Some(format!(
                "dropped: {QUEUE} events were waiting for this subscriber, which reads too slowly; \
                 reconnect, ask for fewer request events (?rate=N), or read the fault log (GET .../faults)"
            ));
            return false;
        }
        self.queue.push_back((id, event));
        true
    }

    /// Folds a request over the rate into the aggregate of its slot.
    fn aggregate(&mut self, event: &RequestEvent, bin_bytes: u64) {
        self.current.add(event, bin_bytes);
    }

    /// Queues the current aggregate, if it counted anything, in its place in the stream.
    fn close_slot(&mut self) -> bool {
        if self.current.requests == 0 {
            return true;
        }
        let next = self.spare.pop().unwrap_or_else(Aggregate::empty);
        let done = std::mem::replace(&mut self.current, next);
        self.push(0, Event::Aggregate(done))
    }
}

struct Hub {
    next_id: u64,
    next_key: u64,
    subscribers: Vec<Subscriber>,
}

/// One export's events and their subscribers.
pub struct EventHub {
    /// Subscribers still receiving: the data path's only check while there are none.
    active: AtomicUsize,
    dropped_total: AtomicU64,
    hub: Mutex<Hub>,
    /// Bytes per aggregate bin: the export's size over [`BINS`].
    bin_bytes: u64,
}

/// Why a subscription was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{MAX_SUBSCRIBERS} subscribers already watch this export; close one and retry")]
pub struct TooManySubscribers;

impl EventHub {
    pub fn new(export_size: u64) -> EventHub {
        EventHub {
            active: AtomicUsize::new(0),
            dropped_total: AtomicU64::new(0),
            hub: Mutex::new(Hub { next_id: 1, next_key: 0, subscribers: Vec::new() }),
            bin_bytes: export_size.div_ceil(BINS as u64).max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// True when someone receives events: only then is there anything to publish.
    #[inline]
    pub fn is_watched(&self) -> bool {
        self.active.load(Ordering::Relaxed) > 0
    }

    pub fn bin_bytes(&self) -> u64 {
        self.bin_bytes
    }

    /// Subscribers receiving now.
    pub fn subscribers(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Subscribers dropped for reading too slowly, since the start.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Adds a subscriber that gets `rate` request events per second one by one (0: all).
    pub fn subscribe(self: &Arc<Self>, rate: u32) -> Result<Subscription, TooManySubscribers> {
        let mut hub = self.lock();
        if hub.subscribers.iter().filter(|subscriber| subscriber.dropped.is_none()).count() >= MAX_SUBSCRIBERS {
            return Err(TooManySubscribers);
        }
        let key = hub.next_key;
        hub.next_key += 1;
        hub.subscribers.push(Subscriber {
            key,
            queue: VecDeque::with_capacity(QUEUE),
            per_slot: if rate == 0 {
                0
            } else {
                rate.div_ceil((Duration::from_secs(1).as_nanos() / SLOT.as_nanos()) as u32)
            },
            slot: 0,
            sent_in_slot: 0,
            current: Aggregate::empty(),
            spare: vec![Aggregate::empty(), Aggregate::empty()],
            dropped: None,
        });
        self.active.fetch_add(1, Ordering::Relaxed);
        Ok(Subscription { hub: Arc::clone(self), key })
    }

    /// Queues an event for every subscriber. Request events over a subscriber's rate go into
    /// its aggregate instead.
    pub fn publish(&self, event: Event) {
        if !self.is_watched() {
            return;
        }
        let mut hub = self.lock();
        let id = hub.next_id;
        hub.next_id += 1;
        let mut dropped = 0;
        let slot = match &event {
            Event::Request(request) => request.end_ns / SLOT.as_nanos() as u64,
            _ => 0,
        };
        for subscriber in hub.subscribers.iter_mut().filter(|subscriber| subscriber.dropped.is_none()) {
            let queued = match &event {
                Event::Request(request) if subscriber.per_slot > 0 => {
                    if slot != subscriber.slot {
                        subscriber.slot = slot;
                        subscriber.sent_in_slot = 0;
                    }
                    if subscriber.sent_in_slot >= subscriber.per_slot {
                        subscriber.aggregate(request, self.bin_bytes);
                        continue;
                    }
                    subscriber.sent_in_slot += 1;
                    // What was summed up so far comes before this request in the stream.
                    subscriber.close_slot() && subscriber.push(id, event.clone())
                }
                _ => subscriber.close_slot() && subscriber.push(id, event.clone()),
            };
            if !queued {
                dropped += 1;
            }
        }
        drop(hub);
        if dropped > 0 {
            self.active.fetch_sub(dropped, Ordering::Relaxed);
            self.dropped_total.fetch_add(dropped as u64, Ordering::Relaxed);
            tracing::info!(dropped, "event subscribers dropped: they read too slowly");
        }
    }

    /// Ends every subscription (the server is stopping): each stream says why and ends.
    pub fn close(&self, reason: &str) {
        let mut hub = self.lock();
        let mut closed = 0;
        for subscriber in hub.subscribers.iter_mut().filter(|subscriber| subscriber.dropped.is_none()) {
            subscriber.dropped = Some(reason.to_string());
            closed += 1;
        }
        drop(hub);
        self.active.fetch_sub(closed, Ordering::Relaxed);
    }
}

/// One subscriber's place in the hub; leaves it when dropped.
pub struct Subscription {
    hub: Arc<EventHub>,
    key: u64,
}

impl Subscription {
    /// Takes what waits for this subscriber: its events, swapped into `events` (numbered,
    /// oldest first, aggregates numbered 0; the buffers trade places, so neither side allocates),
    /// with the current aggregate closed first when `flush`; and the reason it was dropped, if it
    /// was.
    pub fn take(&self, events: &mut VecDeque<(u64, Event)>, flush: bool) -> Taken {
        events.clear();
        let mut hub = self.hub.lock();
        let Some(subscriber) = hub.subscribers.iter_mut().find(|subscriber| subscriber.key == self.key) else {
            return Taken { dropped: Some("unsubscribed".into()) };
        };
        if flush && subscriber.dropped.is_none() && !subscriber.close_slot() {
            self.hub.active.fetch_sub(1, Ordering::Relaxed);
            self.hub.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
        std::mem::swap(&mut subscriber.queue, events);
        if subscriber.queue.capacity() < QUEUE && subscriber.dropped.is_none() {
            subscriber.queue.reserve(QUEUE);
        }
        Taken { dropped: subscriber.dropped.clone() }
    }

    /// Gives aggregates back for reuse once written out.
    pub fn recycle(&self, aggregates: impl IntoIterator<Item = Box<Aggregate>>) {
        let mut hub = self.hub.lock();
        if let Some(subscriber) = hub.subscribers.iter_mut().find(|subscriber| subscriber.key == self.key) {
            for mut aggregate in aggregates {
                if subscriber.spare.len() < 4 {
                    aggregate.clear();
                    subscriber.spare.push(aggregate);
                }
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut hub = self.hub.lock();
        if let Some(at) = hub.subscribers.iter().position(|subscriber| subscriber.key == self.key) {
            let subscriber = hub.subscribers.swap_remove(at);
            if subscriber.dropped.is_none() {
                self.hub.active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(end_ns: u64, offset: u64) -> Event {
        Event::Request(RequestEvent {
            op: Op::Write,
            offset,
            length: 4096,
            flags: 0,
            connection: 1,
            cookie: end_ns,
            start_ns: end_ns.saturating_sub(1000),
            end_ns,
            ending: Ending::Ok,
            rule: None,
            outcome: None,
        })
    }

    fn reset(time_ns: u64) -> Event {
        Event::Reset { time_ns }
    }

    #[test]
    fn nothing_is_queued_while_nobody_subscribes_and_events_are_numbered_in_order() {
        let hub = Arc::new(EventHub::new(1 << 20));
        assert!(!hub.is_watched());
        hub.publish(reset(1));
        let subscription = hub.subscribe(0).unwrap();
        assert!(hub.is_watched());
        for time in 2..6 {
            hub.publish(reset(time));
        }
        let mut buffer = VecDeque::new();
        let taken = subscription.take(&mut buffer, false);
        assert_eq!(buffer.iter().map(|(id, _)| *id).collect::<Vec<_>>(), [1, 2, 3, 4]);
        assert_eq!(buffer[0].1, reset(2));
        assert!(taken.dropped.is_none());
        drop(subscription);
        assert!(!hub.is_watched());
    }

    #[test]
    fn requests_over_the_rate_are_aggregated_per_slot_and_other_events_never_are() {
        let hub = Arc::new(EventHub::new(128 << 20));
        // 10 per second: one request event per 100 ms slot.
        let subscription = hub.subscribe(10).unwrap();
        let slot = SLOT.as_nanos() as u64;
        hub.publish(request(slot, 0));
        hub.publish(request(slot + 1, 1 << 20));
        hub.publish(request(slot + 2, 127 << 20));
        hub.publish(reset(slot + 3));
        hub.publish(request(2 * slot, 0));
        let mut buffer = VecDeque::new();
        subscription.take(&mut buffer, false);
        let kinds: Vec<_> = buffer
            .iter()
            .map(|(_, event)| match event {
                Event::Request(_) => "request",
                Event::Aggregate(_) => "aggregate",
                _ => "other",
            })
            .collect();
        assert_eq!(kinds, ["request", "aggregate", "other", "request"], "the sum comes before the reset");
        let Event::Aggregate(aggregate) = &buffer[1].1 else { unreachable!() };
        let write = &aggregate.ops[Op::Write as usize];
        assert_eq!((write.requests, write.bytes), (2, 8192));
        assert_eq!((write.bins[1], write.bins[127]), (1, 1), "1 MiB and 127 MiB of a 128 MiB disk");
        subscription.take(&mut buffer, true);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_subscriber_that_does_not_read_is_dropped_at_its_bound_and_costs_nothing_after() {
        let hub = Arc::new(EventHub::new(1 << 20));
        let slow = hub.subscribe(0).unwrap();
        let reader = hub.subscribe(0).unwrap();
        let mut buffer = VecDeque::new();
        for time in 0..(QUEUE as u64 + 10) {
            hub.publish(reset(time));
            if time % 1000 == 0 {
                assert!(reader.take(&mut buffer, false).dropped.is_none());
            }
        }
        assert_eq!((hub.subscribers(), hub.dropped_total()), (1, 1));
        let taken = slow.take(&mut buffer, false);
        assert!(buffer.is_empty(), "what was queued is freed when it is dropped");
        assert!(taken.dropped.unwrap().contains("reads too slowly"));
        assert!(reader.take(&mut buffer, false).dropped.is_none());
        drop(slow);
        assert_eq!(hub.subscribers(), 1);
    }

    #[test]
    fn subscribers_are_bounded_and_closing_ends_every_stream() {
        let hub = Arc::new(EventHub::new(1 << 20));
        let all: Vec<_> = (0..MAX_SUBSCRIBERS).map(|_| hub.subscribe(0).unwrap()).collect();
        assert!(hub.subscribe(0).is_err());
        hub.close("the server is shutting down");
        assert!(!hub.is_watched());
        let mut buffer = VecDeque::new();
        assert_eq!(all[0].take(&mut buffer, false).dropped.as_deref(), Some("the server is shutting down"));
    }
}
