//! The power of an export's device, as a real disk has one: a power cut drops every connection of
//! the export at once (the host's I/O to it is lost in flight) and undoes every write not yet
//! flushed (the fault layer's journal); the device may then stay off until a trigger is armed, a
//! timeout passes or the control API powers it on. While it is off, clients cannot attach: the
//! handshake answers `NBD_REP_ERR_UNKNOWN` ("export not available"), as a disk that lost power is
//! gone from the bus rather than failing requests.
//!
//! Ordering. Every request of the export does its storage I/O holding the [`Power::gate`] shared,
//! and only if its connection attached in the current power cycle; a cut holds the gate alone
//! while it starts the next cycle and undoes the journal. A request dropped while its I/O still
//! runs on a storage thread (its client went away) lets go of the gate early, so the cut also
//! waits for the storage to settle ([`crate::storage::BlockDevice::settle`]) before it undoes
//! anything, and holds the gate in a task of its own, which a dropped caller does not cancel. So
//! no write of a connection from before the cut reaches storage after it, and nothing reads the
//! storage half undone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, OwnedRwLockWriteGuard, RwLock, RwLockReadGuard, watch};

/// How long the export stays off after a cut, besides `POST .../power-on`, which always ends it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Off {
    /// Until this trigger is armed.
    pub until: Option<Arc<str>>,
    /// Until this time since server start.
    pub on_at: Option<Duration>,
}

/// The power state as the control API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PowerView {
    pub on: bool,
    /// Power cuts since the server started.
    pub cuts: u64,
    /// Connections attached now.
    pub connections: u64,
    /// Time since server start of the last cut or power-on; zero if neither happened.
    pub since_ns: u64,
    /// While off: the trigger whose arming powers the export on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<Arc<str>>,
    /// While off with a timeout: the time since server start when the power comes back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_at_ns: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct State {
    /// Power cuts so far: the current power cycle.
    cycle: u64,
    off: Option<Off>,
    since: Duration,
}

pub struct Power {
    /// Read without a lock on every request, under the gate.
    cycle: AtomicU64,
    state: watch::Sender<State>,
    /// Shared by requests doing storage I/O; held alone by a cut, owned, so the task that undoes
    /// the journal keeps it however its caller ends.
    gate: Arc<Gate>,
    attached: Arc<AtomicU64>,
    /// Serializes state changes (cuts and power-ons) with their watch updates.
    changes: Mutex<()>,
}

/// The gate between requests' storage I/O and power cuts. While no cut holds or waits for it, a
/// request enters and leaves with one atomic add each (no lock, no wait list); a cut closes it
/// (then requests wait in a queue), waits for the requests inside to leave, and opens it again
/// when it is done.
pub struct Gate {
    /// Requests inside, plus [`CLOSED`] while a cut holds the gate or waits for it.
    inside: AtomicU64,
    /// Woken when a request leaves a closed gate.
    left: Notify,
    /// Held for writing by a cut (so cuts come one at a time), and for reading by the requests
    /// that found the gate closed: they go in once the cut is over.
    queue: Arc<RwLock<()>>,
}

const CLOSED: u64 = 1 << 63;

impl Gate {
    fn new() -> Gate {
        Gate { inside: AtomicU64::new(0), left: Notify::new(), queue: Arc::new(RwLock::new(())) }
    }

    fn leave(&self) {
        // Release: the request's I/O happens before the cut that sees it gone.
        if self.inside.fetch_sub(1, Ordering::Release) == CLOSED + 1 {
            self.left.notify_one();
        }
    }
}

/// A request inside the gate, doing storage I/O: no cut starts until it is dropped.
pub enum Entered<'a> {
    /// Went in while the gate was open.
    Open(&'a Gate),
    /// Waited while a cut held the gate; in while the guard is held.
    Queued(#[allow(dead_code, reason = "held for its drop")] RwLockReadGuard<'a, ()>),
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if let Entered::Open(gate) = self {
            gate.leave();
        }
    }
}

/// The gate held alone, by a cut: no request does storage I/O while it is held. Owned, so a task
/// of its own can keep it however its caller ends.
pub struct Exclusive {
    gate: Arc<Gate>,
    _queue: OwnedRwLockWriteGuard<()>,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        // Open again (Release: the cut's work happens before any request that goes in after it),
        // then the queued requests go in as the write lock goes.
        self.gate.inside.fetch_and(!CLOSED, Ordering::Release);
    }
}

/// A connection attached to the export; counted until dropped.
pub struct Attachment {
    attached: Arc<AtomicU64>,
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.attached.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Default for Power {
    fn default() -> Self {
        Power::new()
    }
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl Power {
    pub fn new() -> Power {
        Power {
            cycle: AtomicU64::new(0),
            state: watch::Sender::new(State::default()),
            gate: Arc::new(Gate::new()),
            attached: Arc::new(AtomicU64::new(0)),
            changes: Mutex::new(()),
        }
    }

    /// The current power cycle: how many cuts there were.
    pub fn cycle(&self) -> u64 {
        self.cycle.load(Ordering::Acquire)
    }

    /// The power cycle a client attaching now gets, or `None` while the export is off.
    pub fn admits(&self) -> Option<u64> {
        let state = self.state.borrow();
        state.off.is_none().then_some(state.cycle)
    }

    /// Why a client cannot attach now, for the handshake's error message; `None` when it can.
    pub fn refusal(&self, export: &str) -> Option<String> {
        let state = self.state.borrow();
        let off = state.off.as_ref()?;
        let mut until = Vec::new();
        if let Some(trigger) = &off.until {
            until.push(format!("the trigger {trigger:?} is armed"));
        }
        if let Some(on_at) = off.on_at {
            until.push(format!("{:.1} s after server start", on_at.as_secs_f64()));
        }
        until.push("the control API powers it on (POST .../power-on)".to_string());
        Some(format!("export {export:?} is powered off after a power cut, until {}", until.join(", or ")))
    }

    /// Counts a connection as attached until the attachment is dropped.
    pub fn attach(&self) -> Attachment {
        self.attached.fetch_add(1, Ordering::Relaxed);
        Attachment { attached: Arc::clone(&self.attached) }
    }

    /// Resolves once a cut ends power cycle `cycle`: a connection attached in it is dead then.
    pub async fn cut_after(&self, cycle: u64) {
        let mut state = self.state.subscribe();
        // The sender lives as long as `self`, which this borrows.
        let _ = state.wait_for(|state| state.cycle > cycle).await;
    }

    /// Storage I/O of a request of a connection attached in `cycle`: `None` when a cut has ended
    /// that cycle (the request's connection is dead, its I/O must not happen).
    pub async fn enter(&self, cycle: u64) -> Option<Entered<'_>> {
        let gate = &*self.gate;
        // Acquire: what a cut did before it opened the gate, the new cycle included, is seen.
        let entered = if gate.inside.fetch_add(1, Ordering::Acquire) & CLOSED == 0 {
            Entered::Open(gate)
        } else {
            gate.leave();
            Entered::Queued(gate.queue.read().await)
        };
        (self.cycle() == cycle).then_some(entered)
    }

    /// Waits until no request does storage I/O, then holds everyone else off. The caller then
    /// [`Power::cut`]s (or finds it need not) and undoes the journal while holding this.
    pub async fn exclusive(&self) -> Exclusive {
        let queue = Arc::clone(&self.gate.queue).write_owned().await;
        // Closed from here (a dropped wait below opens it again, with the guard).
        let exclusive = Exclusive { gate: Arc::clone(&self.gate), _queue: queue };
        let gate = &*self.gate;
        gate.inside.fetch_or(CLOSED, Ordering::AcqRel);
        loop {
            let left = gate.left.notified();
            let mut left = std::pin::pin!(left);
            left.as_mut().enable();
            // Acquire: the I/O of the requests that left happened before.
            if gate.inside.load(Ordering::Acquire) & !CLOSED == 0 {
                return exclusive;
            }
            left.await;
        }
    }

    /// Starts the next power cycle (every connection attached before it dies) and leaves the
    /// export off as `off` says; call it holding [`Power::exclusive`]. Returns the new cycle and
    /// how many connections were attached.
    pub fn cut(&self, _exclusive: &Exclusive, off: Option<Off>, now: Duration) -> (u64, u64) {
        let _changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        // Counted before the connections learn of the cut and start to leave.
        let attached = self.attached.load(Ordering::Relaxed);
        let cycle = self.cycle() + 1;
        self.cycle.store(cycle, Ordering::Release);
        self.state.send_replace(State { cycle, off, since: now });
        (cycle, attached)
    }

    /// Powers the export on; returns whether it was off. With `cycle`, only if it is still off
    /// from the cut that started that cycle (a later cut, or a power-on, came first otherwise).
    pub fn power_on(&self, cycle: Option<u64>, now: Duration) -> bool {
        let _changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        self.state.send_if_modified(|state| {
            if state.off.is_none() || cycle.is_some_and(|cycle| cycle != state.cycle) {
                return false;
            }
            state.off = None;
            state.since = now;
            true
        })
    }

    /// Resolves when the power is on, or a cut after `cycle` came.
    pub async fn on_or_cut_after(&self, cycle: u64) {
        let mut state = self.state.subscribe();
        let _ = state.wait_for(|state| state.off.is_none() || state.cycle != cycle).await;
    }

    pub fn view(&self) -> PowerView {
        let state = self.state.borrow().clone();
        PowerView {
            on: state.off.is_none(),
            cuts: state.cycle,
            connections: self.attached.load(Ordering::Relaxed),
            since_ns: nanos(state.since),
            until: state.off.as_ref().and_then(|off| off.until.clone()),
            on_at_ns: state.off.as_ref().and_then(|off| off.on_at).map(nanos),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_request_is_inside_the_gate_while_a_cut_holds_it_under_contention() {
        use std::sync::atomic::{AtomicBool, AtomicI64};
        let power = Arc::new(Power::new());
        let inside = Arc::new(AtomicI64::new(0));
        let cutting = Arc::new(AtomicBool::new(false));
        let mut requests = Vec::new();
        for _ in 0..8 {
            let (power, inside, cutting) = (Arc::clone(&power), Arc::clone(&inside), Arc::clone(&cutting));
            requests.push(tokio::spawn(async move {
                for round in 0..100u64 {
                    let entered = power.enter(0).await.expect("no cut changes the cycle here");
                    inside.fetch_add(1, Ordering::SeqCst);
                    assert!(!cutting.load(Ordering::SeqCst), "a request went in while a cut held the gate");
                    // Inside for a while now and then (I/O that waits), else just through.
                    if round % 4 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    inside.fetch_sub(1, Ordering::SeqCst);
                    drop(entered);
                }
            }));
        }
        for _ in 0..50 {
            let exclusive = power.exclusive().await;
            cutting.store(true, Ordering::SeqCst);
            assert_eq!(inside.load(Ordering::SeqCst), 0, "a cut holds the gate with a request inside");
            // Requests arriving now wait in the queue.
            tokio::time::sleep(Duration::from_millis(1)).await;
            assert_eq!(inside.load(Ordering::SeqCst), 0);
            cutting.store(false, Ordering::SeqCst);
            drop(exclusive);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for request in requests {
            request.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_cut_waits_for_the_requests_inside_and_holds_off_the_next_until_it_is_done() {
        let power = Arc::new(Power::new());
        let inside = power.enter(0).await.unwrap();
        let also = power.enter(0).await.unwrap();
        let cutting = tokio::spawn({
            let power = Arc::clone(&power);
            async move {
                let exclusive = power.exclusive().await;
                power.cut(&exclusive, None, Duration::ZERO);
                tokio::task::yield_now().await;
                exclusive
            }
        });
        tokio::task::yield_now().await;
        assert!(!cutting.is_finished(), "two requests are inside");
        drop(inside);
        tokio::task::yield_now().await;
        assert!(!cutting.is_finished(), "one request is still inside");
        drop(also);
        let exclusive = cutting.await.unwrap();
        // While the cut holds the gate, a request waits, and goes in (to be refused: its power
        // cycle is over) once the gate opens again.
        let waiting = tokio::spawn({
            let power = Arc::clone(&power);
            async move { power.enter(0).await.is_none() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the gate is closed");
        drop(exclusive);
        assert!(waiting.await.unwrap(), "the old cycle's I/O is refused");
        assert!(power.enter(1).await.is_some(), "the new cycle's goes in at once");
        // A cut that gave up while waiting leaves the gate open.
        let held = power.enter(1).await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(10), power.exclusive()).await;
        assert!(gave_up.is_err());
        drop(held);
        assert!(power.enter(1).await.is_some());
        drop(power.exclusive().await);
    }

    #[tokio::test]
    async fn a_cut_ends_the_cycle_of_every_attached_connection_and_refuses_new_ones_while_off() {
        let power = Power::new();
        let cycle = power.admits().unwrap();
        let first = power.attach();
        let second = power.attach();
        assert!(power.enter(cycle).await.is_some());
        let exclusive = power.exclusive().await;
        let (next, attached) = power.cut(&exclusive, Some(Off::default()), Duration::from_secs(3));
        drop(exclusive);
        assert_eq!((next, attached), (1, 2));
        assert!(power.enter(cycle).await.is_none(), "the old cycle's I/O is refused");
        power.cut_after(cycle).await;
        assert_eq!(power.admits(), None);
        assert!(power.refusal("disk").unwrap().contains("powered off"));
        assert!(!power.power_on(Some(0), Duration::ZERO), "a power-on for an older cut changes nothing");
        assert!(power.power_on(Some(1), Duration::from_secs(4)));
        assert_eq!(power.admits(), Some(1));
        drop((first, second));
        let view = power.view();
        assert_eq!((view.on, view.cuts, view.connections, view.since_ns), (true, 1, 0, 4_000_000_000));
    }
}
