//! The fault layer: a [`BlockDevice`] over another one that fails, delays, stalls, tears, drops
//! or corrupts requests as the export's policy engine decides.
//!
//! It runs inside the request's own task, so a delay or a stall holds only that request: later
//! requests on the same connection complete and are answered first, and the client kernel meets
//! the error in its completion path.

pub mod journal;
pub mod log;
pub mod power;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbdfault_policies::{
    Action, CutRecord, Decision, Engine, Op, PowerEvent, PowerOffRecord, PowerOrigin, PowerRecord, Reply, Request,
    RequestFlags, Wait,
};

use crate::activity::Activity;
use crate::activity::events::Event;
use crate::storage::{BlockDevice, Extent, Features, IoContext, IoError, IoFuture, ZeroFlags};
use crate::wire::command_flags;
use journal::UndoJournal;
use log::{FaultLog, Finished};
use power::{Exclusive, Off, Power};

/// How much a power-cut journal may hold per export before later writes become undoable no more.
pub const DEFAULT_JOURNAL_LIMIT: u64 = 1 << 30;

/// The server's clock: time since the server started, as the policy engine counts it.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock { started: Instant::now() }
    }

    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }
}

pub struct FaultLayer {
    export: String,
    inner: Arc<dyn BlockDevice>,
    engine: Arc<Engine>,
    log: Arc<FaultLog>,
    clock: Clock,
    journal: Mutex<UndoJournal>,
    /// Metrics and live events of the requests that pass.
    activity: Activity,
    power: Arc<Power>,
}

/// Dropped once a power cut is in the fault log (or never will be).
type CutLogged = tokio::sync::oneshot::Sender<()>;

/// What a power cut did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// False when the cut found the power cycle it was to end already over (its request's
    /// connection died in an earlier cut): it did nothing.
    pub happened: bool,
    /// Connections attached when the power went.
    pub connections: u64,
    /// Unflushed writes undone, and their bytes.
    pub undone_writes: usize,
    pub undone_bytes: u64,
    /// Writes since the last flush that did not fit in the journal: they survived the cut.
    pub unjournaled_writes: u64,
    /// Whether the journal was kept (the policy says the device has a volatile cache).
    pub journaled: bool,
    /// The export stays off after it.
    pub off: bool,
    /// When the power went, since server start; the power cycle it started; the request index
    /// the export's next request got then.
    pub at: Duration,
    pub cycle: u64,
    pub next_request_index: u64,
    /// How long the export stays off, once the power is cut.
    pub stays_off: Option<Off>,
    /// The ranges the undo wrote back, `(offset, length)`, newest write first.
    pub undone_ranges: Vec<(u64, u64)>,
}

impl CutReport {
    /// The cut as the fault log records it.
    pub fn record(&self) -> CutRecord {
        let mut record = CutRecord {
            connections: self.connections,
            journaled: self.journaled,
            undone_writes: self.undone_writes as u64,
            undone_bytes: self.undone_bytes,
            unjournaled_writes: self.unjournaled_writes,
            ..CutRecord::default()
        };
        record.set_undone_ranges(self.undone_ranges.iter().copied());
        record
    }

    /// How the export stays off, as the fault log records it: `until` and the timeout from the
    /// cut (both absent: until `POST .../power-on`).
    pub fn power_off(&self) -> Option<PowerOffRecord> {
        self.stays_off.as_ref().map(|off| PowerOffRecord {
            until: off.until.as_deref().map(str::to_string),
            timeout_ns: off.on_at.map(|on_at| crate::activity::nanos(on_at.saturating_sub(self.at))),
        })
    }
}

impl FaultLayer {
    pub fn new(
        export: &str,
        inner: Arc<dyn BlockDevice>,
        engine: Arc<Engine>,
        log: Arc<FaultLog>,
        clock: Clock,
    ) -> FaultLayer {
        FaultLayer {
            export: export.to_string(),
            engine,
            log,
            clock,
            journal: Mutex::new(UndoJournal::new(DEFAULT_JOURNAL_LIMIT)),
            activity: Activity::new(inner.size()),
            inner,
            power: Arc::new(Power::new()),
        }
    }

    /// The device's power: attach connections through it, cut it, power it on.
    pub fn power(&self) -> &Arc<Power> {
        &self.power
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// What the requests through this layer did: metrics and live events.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Installs a policy (`None` removes it). A policy swap is no power event: writes not yet
    /// flushed stay undoable while the new policy keeps the journal (`volatile_cache:`, or a
    /// `power_cut` rule). One that keeps none drops the journal, and with it the cost of keeping
    /// it: a later power cut undoes nothing of what was written before. Returns what was dropped,
    /// to be freed where the caller runs (off the runtime for a large journal).
    pub fn set_policy(&self, policy: Option<nbdfault_policies::Policy>) -> journal::Forgotten {
        self.engine.set_policy(policy);
        if self.engine.tracks_unflushed_writes() {
            return journal::Forgotten::default();
        }
        let forgotten = self.journal().clear();
        if forgotten.writes > 0 {
            tracing::info!(
                export = %self.export, writes = forgotten.writes, bytes = forgotten.bytes,
                "the new policy keeps no journal: unflushed writes are no longer undone by a power cut"
            );
        }
        forgotten
    }

    /// Bytes of unflushed writes a power cut would undo now.
    pub fn unflushed_bytes(&self) -> u64 {
        self.journal().bytes()
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, UndoJournal> {
        // Journal updates are single assignments; a panic elsewhere cannot leave one half done.
        self.journal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn decide(&self, op: Op, ctx: IoContext, offset: u64, length: u64, now: Duration) -> (Request, Decision) {
        let request = Request {
            op,
            offset,
            length,
            flags: request_flags(ctx.flags),
            connection: ctx.connection,
            cookie: ctx.cookie,
        };
        let decision = self.engine.decide(&request, now);
        (request, decision)
    }

    /// Waits as the decision says. Only this request's task waits. `None` when a power cut
    /// ended the request's power cycle meanwhile: its connection is dead.
    async fn wait(&self, wait: &Wait, cycle: u64) -> Option<Duration> {
        if *wait == Wait::None {
            return Some(Duration::ZERO);
        }
        // tokio's clock, so a paused test clock measures the wait it skipped.
        let started = tokio::time::Instant::now();
        tokio::select! {
            () = self.wait_for(wait) => Some(started.elapsed()),
            () = self.power.cut_after(cycle) => None,
        }
    }

    async fn wait_for(&self, wait: &Wait) {
        match wait {
            Wait::None => {}
            Wait::Delay(delay) => tokio::time::sleep(*delay).await,
            Wait::Until { trigger, timeout } => {
                let mut changes = self.engine.trigger_changes();
                let released = async {
                    // Subscribed first, then checked: an arm between the two is not missed.
                    while !self.engine.is_armed(trigger) {
                        if changes.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                };
                match timeout {
                    Some(timeout) => {
                        let _ = tokio::time::timeout(*timeout, released).await;
                    }
                    None => released.await,
                }
            }
        }
    }

    /// Does a request's storage I/O, unless a power cut ended the power cycle its connection
    /// attached in: then nothing reaches storage, and the connection is being dropped.
    async fn powered<T>(
        &self,
        cycle: u64,
        io: impl std::future::Future<Output = Result<T, IoError>>,
    ) -> Result<T, IoError> {
        let Some(_gate) = self.power.enter(cycle).await else {
            return Err(power_lost());
        };
        io.await
    }

    /// Cuts the power now (the control API): every connection of the export drops, every write
    /// not yet flushed is undone, and the export stays off as `off` says.
    /// The fault log gets a record of it (`origin: control_api`).
    pub async fn cut_power(&self, off: Option<Off>) -> Result<CutReport, IoError> {
        let exclusive = self.power.exclusive().await;
        let (exclusive, report, logged) = self.cut_locked(exclusive, None, off).await?;
        drop(exclusive);
        let mut record = power_record(&self.export, &self.engine, PowerEvent::PowerCut, PowerOrigin::ControlApi);
        record.time_ns = crate::activity::nanos(report.at);
        record.next_request_index = report.next_request_index;
        record.cut = Some(report.record());
        record.power_off = report.power_off();
        self.activity.fault(&self.log.record_power(record));
        drop(logged);
        Ok(report)
    }

    /// Powers the export on (the control API); returns whether it was off. The fault log gets
    /// a record of it when it was.
    pub fn power_on(&self) -> bool {
        let now = self.clock.now();
        let changed = self.power.power_on(None, now);
        if changed {
            self.activity.power(true, now);
            tracing::info!(export = %self.export, "power on");
            let mut record = power_record(&self.export, &self.engine, PowerEvent::PowerOn, PowerOrigin::ControlApi);
            record.time_ns = crate::activity::nanos(now);
            self.activity.fault(&self.log.record_power(record));
        }
        changed
    }

    /// The cut itself, holding the gate alone: the next power cycle starts (every connection
    /// attached before dies, and none of their I/O reaches storage any more), the export stays
    /// off as `off` says, and the journal is undone, newest first, once the storage has settled.
    /// With `only_in`, the cut only happens if that power cycle is still the current one (a
    /// request's own cut). Hands the gate back, still held alone, with the report and a guard
    /// to drop once the cut is in the fault log: a power-on by a trigger or a timeout is logged
    /// only after that.
    async fn cut_locked(
        &self,
        exclusive: Exclusive,
        only_in: Option<u64>,
        mut off: Option<Off>,
    ) -> Result<(Exclusive, CutReport, CutLogged), IoError> {
        let (logged, cut_in_log) = tokio::sync::oneshot::channel();
        if only_in.is_some_and(|cycle| cycle != self.power.cycle()) {
            return Ok((exclusive, CutReport::default(), logged));
        }
        // Off until a trigger that is armed already: on at once, as a stall on it would not wait.
        if off.as_ref().is_some_and(|off| {
            off.on_at.is_none() && off.until.as_ref().is_some_and(|trigger| self.engine.is_armed(trigger))
        }) {
            off = None;
        }
        let now = self.clock.now();
        let stays_off = off.clone();
        let (cycle, connections) = self.power.cut(&exclusive, off, now);
        self.activity.power(false, now);
        let journaled = self.engine.tracks_unflushed_writes();
        let (undo, unjournaled_writes) = self.journal().take_for_undo();
        let report = CutReport {
            happened: true,
            connections,
            undone_writes: undo.len(),
            undone_bytes: undo.iter().map(|(_, before)| before.len() as u64).sum(),
            unjournaled_writes,
            journaled,
            off: stays_off.is_some(),
            at: now,
            cycle,
            next_request_index: self.engine.requests_decided(),
            stays_off,
            undone_ranges: undo.iter().map(|(offset, before)| (*offset, before.len() as u64)).collect(),
        };
        tracing::warn!(
            export = %self.export, cycle, connections, undone_writes = report.undone_writes,
            undone_bytes = report.undone_bytes, off = report.off, "power cut"
        );
        if unjournaled_writes > 0 {
            tracing::warn!(
                writes = unjournaled_writes,
                "power cut: the undo journal was full; these writes survive it"
            );
        }
        // In a task of its own, holding the gate: a caller dropped half-way (its client went
        // away) must not leave the storage half undone and open to requests again.
        let inner = Arc::clone(&self.inner);
        let undoing = tokio::spawn(async move {
            let undone = undo_unflushed(&*inner, undo).await;
            (exclusive, undone)
        });
        let undone = undoing.await;
        if undone.is_ok() {
            self.power_on_later(&report, cut_in_log);
        }
        match undone {
            Ok((exclusive, Ok(()))) => Ok((exclusive, report, logged)),
            Ok((_, Err(error))) => Err(error),
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => Err(IoError::new(crate::wire::errno::ESHUTDOWN, "the server is shutting down")),
        }
    }

    /// After a cut that left the export off until a trigger or a timeout: powers it on then,
    /// unless a power-on or another cut comes first, and logs it, after the cut's own record
    /// (`cut_in_log` ends when that is written, or will not be).
    fn power_on_later(&self, report: &CutReport, cut_in_log: tokio::sync::oneshot::Receiver<()>) {
        let Some(off) = report.stays_off.clone().filter(|off| off.until.is_some() || off.on_at.is_some()) else {
            return;
        };
        let cycle = report.cycle;
        let (power, engine, clock, export) =
            (Arc::clone(&self.power), Arc::clone(&self.engine), self.clock, self.export.clone());
        let (events, log) = (Arc::clone(&self.activity.events), Arc::clone(&self.log));
        tokio::spawn(async move {
            let mut changes = engine.trigger_changes();
            let armed = async {
                let Some(trigger) = &off.until else { return std::future::pending().await };
                while !engine.is_armed(trigger) {
                    if changes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            let timeout = async {
                match off.on_at {
                    Some(on_at) => tokio::time::sleep(on_at.saturating_sub(clock.now())).await,
                    None => std::future::pending().await,
                }
            };
            let origin = tokio::select! {
                () = armed => PowerOrigin::Trigger,
                () = timeout => PowerOrigin::Timeout,
                () = power.on_or_cut_after(cycle) => return,
            };
            let _ = cut_in_log.await;
            let now = clock.now();
            if power.power_on(Some(cycle), now) {
                events.publish(Event::Power { time_ns: crate::activity::nanos(now), on: true });
                tracing::info!(%export, ?origin, "power on");
                let mut record = power_record(&export, &engine, PowerEvent::PowerOn, origin);
                record.time_ns = crate::activity::nanos(now);
                record.trigger =
                    (origin == PowerOrigin::Trigger).then(|| off.until.as_deref().unwrap_or_default().to_string());
                events.publish(Event::Fault(log.record_power(record)));
            }
        });
    }

    /// Remembers what `[offset, offset + length)` holds before it is overwritten, when the policy
    /// can cut power. FUA writes are durable at once: they cancel older undo entries instead.
    async fn journal_before_write(&self, offset: u64, length: u64, fua: bool) -> Result<(), IoError> {
        if !self.engine.tracks_unflushed_writes() || length == 0 {
            return Ok(());
        }
        if fua {
            self.journal().forget_range(offset, length);
            return Ok(());
        }
        let epoch = {
            let mut journal = self.journal();
            if !journal.has_room(length) {
                journal.count_unjournaled();
                return Ok(());
            }
            journal.epoch()
        };
        // Asked again within the epoch: a policy swap that stops the journal empties it after
        // the swap, so either this sees the new policy or the epoch has ended by the record.
        if !self.engine.tracks_unflushed_writes() {
            return Ok(());
        }
        let before = self.read_range(offset, length).await?;
        self.journal().record(epoch, offset, before);
        Ok(())
    }

    /// Reads any length (write-zeroes ranges can exceed one read's limit) from the storage below.
    async fn read_range(&self, offset: u64, length: u64) -> Result<Bytes, IoError> {
        const STEP: u64 = 32 << 20;
        let mut out = BytesMut::with_capacity(length as usize);
        let mut at = offset;
        while at < offset + length {
            if at > offset {
                // Memory reads never wait: a long range gives the thread to other tasks between steps.
                tokio::task::yield_now().await;
            }
            let take = STEP.min(offset + length - at) as u32;
            out.extend_from_slice(&self.inner.read(IoContext::default(), at, take).await?);
            at += u64::from(take);
        }
        Ok(out.freeze())
    }

    /// The one path every request takes through this layer: the engine decides (at once, before
    /// anything awaits, so decisions follow the order requests arrive in), then a request no
    /// rule touched falls through to the storage below as it is, and any other gets the wait,
    /// the power cut, the action, the log record and the reply its decision says. `perform` does
    /// the request's I/O as the action allows and returns its result and the bytes it persisted.
    async fn intercept<T, F, Fut>(
        &self,
        op: Op,
        ctx: IoContext,
        offset: u64,
        length: u64,
        perform: F,
    ) -> Result<T, IoError>
    where
        F: FnOnce(Action) -> Fut,
        Fut: std::future::Future<Output = Result<(T, u64), IoError>>,
        T: Default,
    {
        // One clock read for both: the request arrives when the engine decides it.
        let now = self.clock.now();
        let mut watch = self.activity.watch(op, ctx, offset, length, self.clock, now);
        let (request, decision) = self.decide(op, ctx, offset, length, now);
        let result = if decision.rule.is_none() {
            // The storage's future is made here, in this one's state, not moved into another:
            // every request takes this path, and its state is copied whenever it moves.
            match self.power.enter(ctx.power_cycle).await {
                Some(_gate) => perform(Action::Perform).await.map(|(value, _)| value),
                None => Err(power_lost()),
            }
        } else {
            watch.decided(&decision);
            // Boxed: the rare path's larger state does not weigh on every request's future.
            Box::pin(self.apply(request, ctx.power_cycle, decision, perform)).await
        };
        watch.finish(&result);
        result
    }

    /// Applies what comes after the wait: the power cut, then the action via `perform`, then the
    /// reply. `perform` gets the action and returns the result and the bytes it persisted.
    async fn apply<T, F, Fut>(&self, request: Request, cycle: u64, decision: Decision, perform: F) -> Result<T, IoError>
    where
        F: FnOnce(Action) -> Fut,
        Fut: std::future::Future<Output = Result<(T, u64), IoError>>,
        T: Default,
    {
        let mut pending = Pending {
            layer: self,
            request,
            decision,
            started: tokio::time::Instant::now(),
            waited: None,
            cut: None,
            logged: false,
        };
        let Some(waited) = self.wait(&pending.decision.wait, cycle).await else {
            // The power went while this request waited: it never reached the device.
            pending.finish(0);
            return Err(power_lost());
        };
        pending.waited = Some(waited);
        let action = pending.decision.action;
        let done = match pending.decision.power_cut.clone() {
            // Cut, then the action, both holding the gate alone: a write torn by the power cut
            // reached the medium, so it is not journaled for the next cut either.
            Some(cut) => {
                let exclusive = self.power.exclusive().await;
                let off = cut.stays_off().then(|| Off {
                    until: cut.until.clone(),
                    on_at: cut.timeout.map(|timeout| self.clock.now() + timeout),
                });
                let (_exclusive, report, logged) = self.cut_locked(exclusive, Some(cycle), off).await?;
                if report.happened {
                    pending.cut = Some((report.record(), logged));
                }
                let done = match action {
                    _ if !report.happened => Err(power_lost()),
                    Action::Skip => Ok((T::default(), 0)),
                    action => perform(action).await,
                };
                if report.happened {
                    drop(self.journal().clear());
                }
                done
            }
            None => match action {
                Action::Skip => Ok((T::default(), 0)),
                action => self.powered(cycle, perform(action)).await,
            },
        };
        let (result, persisted) = match done {
            Ok((value, persisted)) => (Ok(value), persisted),
            Err(error) => (Err(error), 0),
        };
        let decision = pending.finish(persisted);
        let rule = decision.rule.as_deref().unwrap_or("a bad sector");
        match decision.reply {
            Reply::Ok => result,
            Reply::Error(injected) => {
                Err(IoError::new(injected.wire_value(), format!("{} injected by {rule}", injected.name())))
            }
            Reply::Disconnect => Err(IoError::Disconnect { reason: format!("disconnect injected by {rule}") }),
        }
    }

    async fn write_data(&self, offset: u64, data: Bytes, fua: bool) -> Result<((), u64), IoError> {
        let length = data.len() as u64;
        self.journal_before_write(offset, length, fua).await?;
        self.inner.write(IoContext::default(), offset, data, fua).await?;
        Ok(((), length))
    }
}

/// A decided request on its way: logged exactly once, when it finishes, or when its task is
/// dropped before that (the client went away, the server gave up at shutdown), so that every
/// decision the engine made is in the fault log and a replay meets the same request sequence.
struct Pending<'a> {
    layer: &'a FaultLayer,
    request: Request,
    decision: Decision,
    started: tokio::time::Instant,
    /// How long the decided wait took, once it is over.
    waited: Option<Duration>,
    /// What the power cut the request met did, and the guard its power-on waits for.
    cut: Option<(CutRecord, CutLogged)>,
    logged: bool,
}

impl Pending<'_> {
    fn record(&mut self, persisted: u64) {
        let waited = self.waited.unwrap_or_else(|| self.started.elapsed());
        let layer = self.layer;
        let (cut, logged) = self.cut.take().unzip();
        let finished = Finished { waited, persisted, at: layer.clock.now(), cut };
        let record = layer.log.record(&layer.export, &self.request, &self.decision, finished);
        if let Some(record) = record {
            layer.activity.fault(&record);
        }
        drop(logged);
    }

    /// Logs the finished request and hands its decision back.
    fn finish(mut self, persisted: u64) -> Decision {
        self.record(persisted);
        self.logged = true;
        self.decision.clone()
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.logged {
            tracing::debug!(cookie = self.request.cookie, "a decided request was cancelled before it finished");
            self.record(0);
        }
    }
}

/// A power record of `export` without `seq` (the log numbers it) and time: the next request
/// index says where in the request stream it happened.
fn power_record(export: &str, engine: &Engine, event: PowerEvent, origin: PowerOrigin) -> PowerRecord {
    PowerRecord {
        seq: 0,
        time_ns: 0,
        export: export.to_string(),
        event,
        origin,
        next_request_index: engine.requests_decided(),
        trigger: None,
        cut: None,
        power_off: None,
    }
}

/// Writes back what unflushed writes overwrote, newest first, once nothing started earlier can
/// still reach the storage: a write whose request was dropped while an I/O thread did it (its
/// client went away just before the cut) would otherwise land after the undo.
async fn undo_unflushed(storage: &dyn BlockDevice, undo: Vec<(u64, Bytes)>) -> Result<(), IoError> {
    if undo.is_empty() {
        return Ok(());
    }
    storage.settle().await?;
    // Memory and overlay writes finish without ever waiting, so an undo of up to the journal's
    // limit (1 GiB) would hold its runtime thread throughout: other exports' requests get the
    // thread between pieces. Tiny pieces count as a page each.
    const YIELD_EVERY: usize = 1 << 20;
    let mut since_yield = 0;
    for (offset, before) in undo {
        since_yield += before.len().max(4096);
        storage.write(IoContext::default(), offset, before, false).await?;
        if since_yield >= YIELD_EVERY {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    Ok(())
}

/// The error of a request whose connection a power cut killed: the connection is being dropped,
/// so no reply is sent.
fn power_lost() -> IoError {
    IoError::Disconnect { reason: "the export lost power".to_string() }
}

/// What a read returns: the data, or with a corrupting action the data with some bytes changed.
fn corrupted(action: Action, data: Bytes) -> Bytes {
    match action {
        Action::CorruptRead { seed, bytes } => {
            let mut data = BytesMut::from(&data[..]);
            nbdfault_policies::corrupt(&mut data, seed, bytes);
            data.freeze()
        }
        _ => data,
    }
}

/// How much of a request's range an action lets through: a torn one only its first bytes.
fn torn_length(action: Action, length: u64) -> u64 {
    match action {
        Action::Torn { persist } => persist.min(length),
        _ => length,
    }
}

/// The policy's view of a request's command flags.
fn request_flags(flags: u16) -> RequestFlags {
    RequestFlags {
        fua: flags & command_flags::FUA != 0,
        no_hole: flags & command_flags::NO_HOLE != 0,
        fast_zero: flags & command_flags::FAST_ZERO != 0,
        df: flags & command_flags::DF != 0,
        req_one: flags & command_flags::REQ_ONE != 0,
    }
}

impl BlockDevice for FaultLayer {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn features(&self) -> Features {
        self.inner.features()
    }

    fn read(&self, ctx: IoContext, offset: u64, length: u32) -> IoFuture<'_, Bytes> {
        Box::pin(async move {
            let data: Bytes = self
                .intercept(Op::Read, ctx, offset, u64::from(length), |action| async move {
                    let data = self.inner.read(ctx, offset, length).await?;
                    Ok((corrupted(action, data), 0))
                })
                .await?;
            // A skipped read still answers with the length asked for.
            Ok(if data.is_empty() && length > 0 { Bytes::from(vec![0; length as usize]) } else { data })
        })
    }

    fn write(&self, ctx: IoContext, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(self.intercept(Op::Write, ctx, offset, data.len() as u64, move |action| async move {
            let keep = torn_length(action, data.len() as u64) as usize;
            self.write_data(offset, data.slice(..keep), fua).await
        }))
    }

    fn flush(&self, ctx: IoContext) -> IoFuture<'_, ()> {
        // A flush covers the writes completed before it, not those racing with it.
        let mark = self.journal().mark();
        Box::pin(self.intercept(Op::Flush, ctx, 0, 0, move |_| async move {
            self.inner.flush(ctx).await?;
            // Only a flush that really happened makes those writes durable; a dropped one
            // (reported done, not done) leaves them for a power cut to undo.
            self.journal().clear_through(mark);
            Ok(((), 0))
        }))
    }

    fn trim(&self, ctx: IoContext, offset: u64, length: u64, fua: bool) -> IoFuture<'_, ()> {
        // Trimmed contents are undefined until rewritten, so a power cut need not restore them.
        Box::pin(self.intercept(Op::Trim, ctx, offset, length, move |action| async move {
            let length = torn_length(action, length);
            self.inner.trim(ctx, offset, length, fua).await.map(|()| ((), length))
        }))
    }

    fn write_zeroes(&self, ctx: IoContext, offset: u64, length: u64, flags: ZeroFlags) -> IoFuture<'_, ()> {
        Box::pin(self.intercept(Op::WriteZeroes, ctx, offset, length, move |action| async move {
            let length = torn_length(action, length);
            self.journal_before_write(offset, length, flags.fua).await?;
            self.inner.write_zeroes(ctx, offset, length, flags).await.map(|()| ((), length))
        }))
    }

    fn cache(&self, ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, ()> {
        Box::pin(self.intercept(Op::Cache, ctx, offset, length, move |_| async move {
            self.inner.cache(ctx, offset, length).await.map(|()| ((), 0))
        }))
    }

    fn extents(&self, ctx: IoContext, offset: u64, length: u64) -> IoFuture<'_, Vec<Extent>> {
        Box::pin(self.intercept(Op::BlockStatus, ctx, offset, length, move |_| async move {
            self.inner.extents(ctx, offset, length).await.map(|extents| (extents, 0))
        }))
    }

    fn data_path(&self) -> Option<crate::storage::file::FileDataPath> {
        self.inner.data_path()
    }

    fn reset(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.inner.reset().await?;
            // Freed after the journal's lock is let go.
            let forgotten = self.journal().clear();
            forgotten.free_in_background();
            self.engine.clear_bad_sectors();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryDevice;
    use nbdfault_policies::{LogEntry, Outcome, Policy};

    const CTX: IoContext = IoContext { connection: 1, cookie: 9, flags: 0, power_cycle: 0 };
    const FUA: IoContext = IoContext { connection: 1, cookie: 10, flags: command_flags::FUA, power_cycle: 0 };

    struct Fixture {
        storage: Arc<MemoryDevice>,
        layer: Arc<FaultLayer>,
        log: Arc<FaultLog>,
    }

    const MIB: u64 = 1 << 20;

    fn fixture(policy: &str) -> Fixture {
        fixture_of_size(policy, 16 * MIB)
    }

    fn fixture_of_size(policy: &str, size: u64) -> Fixture {
        let storage = Arc::new(MemoryDevice::new(size));
        let policy = Policy::from_yaml(policy, "test").unwrap();
        let engine = Arc::new(Engine::new(Some(policy)));
        let log = Arc::new(FaultLog::in_memory(64));
        let layer = Arc::new(FaultLayer::new("disk", storage.clone(), engine, log.clone(), Clock::start()));
        Fixture { storage, layer, log }
    }

    async fn stored(storage: &MemoryDevice, offset: u64, length: u32) -> Bytes {
        storage.read(IoContext::default(), offset, length).await.unwrap()
    }

    fn block(byte: u8) -> Bytes {
        Bytes::from(vec![byte; 4096])
    }

    #[tokio::test]
    async fn an_injected_error_keeps_the_write_off_storage_and_is_logged() {
        let f = fixture("rules: [{name: fail, when: {op: write, range: 0..4KiB}, then: {error: ENOSPC}}]");
        let error = f.layer.write(CTX, 0, block(1), false).await.unwrap_err();
        assert_eq!(error.errno(), crate::wire::errno::ENOSPC);
        assert_eq!(stored(&f.storage, 0, 4).await, Bytes::from_static(&[0; 4]));
        f.layer.write(CTX, 4096, block(2), false).await.unwrap();
        assert_eq!(stored(&f.storage, 4096, 1).await[0], 2);
        let records = f.log.requests();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].rule.as_str(), records[0].offset, records[0].persisted), ("fail", 0, 0));
    }

    #[tokio::test]
    async fn persist_then_error_writes_the_data_and_still_fails_the_request() {
        let f = fixture("rules: [{when: {op: write}, then: {error: EIO, persist: true}}]");
        assert!(f.layer.write(CTX, 0, block(3), false).await.is_err());
        assert_eq!(stored(&f.storage, 0, 1).await[0], 3);
        assert_eq!(f.log.requests()[0].persisted, 4096);
    }

    #[tokio::test]
    async fn a_dropped_write_reports_success_without_reaching_storage() {
        let f = fixture("rules: [{when: {op: write}, then: {drop: true}}]");
        f.layer.write(CTX, 0, block(4), false).await.unwrap();
        assert_eq!(stored(&f.storage, 0, 1).await[0], 0);
    }

    #[tokio::test]
    async fn a_torn_write_persists_only_its_first_bytes() {
        let f = fixture("rules: [{when: {op: write}, then: {torn: 1KiB, error: EIO}}]");
        assert!(f.layer.write(CTX, 0, block(5), false).await.is_err());
        let data = stored(&f.storage, 0, 4096).await;
        assert!(data[..1024].iter().all(|&b| b == 5));
        assert!(data[1024..].iter().all(|&b| b == 0));
        assert_eq!(f.log.requests()[0].persisted, 1024);
    }

    #[tokio::test]
    async fn a_corrupted_read_changes_what_the_client_sees_but_not_storage() {
        let f = fixture("seed: 1\nrules: [{when: {op: read}, then: {corrupt: 8}}]");
        f.storage.write(IoContext::default(), 0, block(6), false).await.unwrap();
        let seen = f.layer.read(CTX, 0, 4096).await.unwrap();
        let changed = seen.iter().filter(|&&b| b != 6).count();
        assert!((1..=8).contains(&changed), "{changed} bytes changed");
        assert!(stored(&f.storage, 0, 4096).await.iter().all(|&b| b == 6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_request_is_overtaken_by_a_later_one() {
        let f = fixture("rules: [{when: {op: write}, then: {error: EIO, delay: 50ms}}]");
        let layer = f.layer.clone();
        let mut delayed = tokio::spawn(async move { layer.write(CTX, 0, block(7), false).await });
        tokio::task::yield_now().await;
        // The read goes through while the write still waits: nothing holds it up.
        f.layer.read(CTX, 0, 16).await.unwrap();
        assert!(futures_poll_pending(&mut delayed).await);
        assert!(delayed.await.unwrap().is_err());
        assert!(f.log.requests()[0].waited_ns.unwrap() >= 50_000_000);
    }

    /// True when the task has not finished yet, without waiting for it.
    async fn futures_poll_pending<T>(task: &mut tokio::task::JoinHandle<T>) -> bool {
        tokio::select! {
            biased;
            _ = task => false,
            _ = std::future::ready(()) => true,
        }
    }

    #[tokio::test]
    async fn a_stalled_request_waits_for_its_release_trigger() {
        let f = fixture("rules: [{name: hold, when: {op: write}, then: {stall: release, error: EIO}}]");
        let layer = f.layer.clone();
        let mut stalled = tokio::spawn(async move { layer.write(CTX, 0, block(8), false).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(futures_poll_pending(&mut stalled).await);
        f.layer.engine().arm("release", Duration::ZERO);
        assert!(stalled.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn a_decided_request_cancelled_before_it_finishes_is_still_logged() {
        let f = fixture("rules: [{name: hold, when: {op: write}, then: {stall: never-armed, error: EIO}}]");
        let layer = f.layer.clone();
        let stalled = tokio::spawn(async move { layer.write(CTX, 0, block(8), false).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(f.log.requests().is_empty());
        stalled.abort();
        assert!(stalled.await.unwrap_err().is_cancelled());
        let records = f.log.requests();
        assert_eq!((records.len(), records[0].rule.as_str(), records[0].persisted), (1, "hold", 0));
    }

    #[tokio::test]
    async fn a_long_undo_lets_other_tasks_of_its_thread_run_between_its_pieces() {
        let storage = Arc::new(MemoryDevice::new(16 * MIB));
        let undo: Vec<(u64, Bytes)> = (0..16).map(|i| (i * MIB, Bytes::from(vec![1u8; MIB as usize]))).collect();
        // One thread (this test's runtime): the second task runs only when the first yields.
        let undoing = tokio::spawn({
            let storage = Arc::clone(&storage);
            async move { undo_unflushed(storage.as_ref(), undo).await }
        });
        let observer = tokio::spawn({
            let storage = Arc::clone(&storage);
            async move {
                let mut undone = 0;
                for i in 0..16 {
                    undone += usize::from(storage.read(CTX, i * MIB, 1).await.unwrap()[0] == 1);
                }
                undone
            }
        });
        undoing.await.unwrap().unwrap();
        let undone_when_it_ran = observer.await.unwrap();
        assert!(undone_when_it_ran < 16, "the other task ran only after all 16 MiB were undone");
        assert_eq!(stored(&storage, 15 * MIB, 1).await[0], 1);
    }

    #[tokio::test]
    async fn journaling_a_long_write_zeroes_lets_other_tasks_of_its_thread_run() {
        let Fixture { storage, layer, .. } = fixture_of_size(
            "rules: [{name: cut, when: {op: write, armed_by: cut}, then: {power_cut: true}}]",
            96 * MIB,
        );
        layer.write(CTX, 0, block(1), false).await.unwrap();
        // The journal first reads the 64 MiB the zeroes overwrite, in two steps; the second task
        // runs only when the first yields (one thread: this test's runtime).
        let zeroing = tokio::spawn({
            let layer = Arc::clone(&layer);
            async move { layer.write_zeroes(CTX, 0, 64 * MIB, ZeroFlags::default()).await }
        });
        let observer = tokio::spawn({
            let storage = Arc::clone(&storage);
            async move { stored(&storage, 0, 1).await[0] }
        });
        zeroing.await.unwrap().unwrap();
        assert_eq!(observer.await.unwrap(), 1, "the other task ran only after the zeroes were written");
        assert_eq!(stored(&storage, 0, 1).await[0], 0);
        assert_eq!(layer.unflushed_bytes(), 64 * MIB + 4096, "the zeroes and the first write");
    }

    #[tokio::test]
    async fn an_injected_disconnect_asks_to_drop_the_connection() {
        let f = fixture("rules: [{when: {op: flush}, then: {disconnect: true}}]");
        assert!(matches!(f.layer.flush(CTX).await, Err(IoError::Disconnect { .. })));
    }

    #[tokio::test]
    async fn a_power_cut_undoes_unflushed_writes_and_keeps_flushed_and_fua_ones() {
        let f = fixture("rules: [{name: cut, when: {op: write, armed_by: cut}, then: {power_cut: true}}]");
        f.layer.write(CTX, 0, block(1), false).await.unwrap();
        f.layer.flush(CTX).await.unwrap();
        f.layer.write(CTX, 0, block(2), false).await.unwrap();
        f.layer.write(CTX, 8192, block(3), false).await.unwrap();
        f.layer.write(FUA, 8192, block(4), true).await.unwrap();
        f.layer.write_zeroes(CTX, 16384, 4096, ZeroFlags::default()).await.unwrap();
        assert_eq!(f.layer.unflushed_bytes(), 2 * 4096);
        f.layer.engine().arm("cut", Duration::ZERO);
        assert!(matches!(f.layer.write(CTX, 65536, block(9), false).await, Err(IoError::Disconnect { .. })));
        assert_eq!(stored(&f.storage, 0, 1).await[0], 1, "the flushed write survives");
        assert_eq!(stored(&f.storage, 8192, 1).await[0], 4, "the FUA write survives");
        assert_eq!(stored(&f.storage, 65536, 1).await[0], 0, "the cutting write never happened");
        assert_eq!(f.layer.unflushed_bytes(), 0);
        let record = f.log.requests().pop().unwrap();
        let cut = record.cut.expect("the cutting request's record says what the cut did");
        assert_eq!((cut.journaled, cut.undone_writes, cut.undone_bytes), (true, 2, 8192));
        assert_eq!(cut.undone, vec![[0, 4096], [16384, 4096]]);
        assert!(f.log.power_records().is_empty(), "a rule's cut is its request's record");
        // Every request of the power cycle before the cut is refused, whatever connection sent it.
        let other = IoContext { connection: 2, ..CTX };
        assert!(matches!(f.layer.read(other, 0, 512).await, Err(IoError::Disconnect { .. })));
        assert!(matches!(f.layer.write(other, 0, block(7), false).await, Err(IoError::Disconnect { .. })));
        assert_eq!(stored(&f.storage, 0, 1).await[0], 1, "no write of a dead connection lands");
        f.layer.engine().disarm("cut", Duration::ZERO);
        let after = IoContext { power_cycle: 1, ..CTX };
        f.layer.write(after, 0, block(8), false).await.unwrap();
        assert_eq!(stored(&f.storage, 0, 1).await[0], 8, "a connection attached after the cut writes");
    }

    #[tokio::test]
    async fn a_cut_through_the_api_undoes_the_journal_of_a_volatile_cache_and_counts_it() {
        let f = fixture("volatile_cache: true");
        f.layer.write(CTX, 0, block(1), false).await.unwrap();
        f.layer.flush(CTX).await.unwrap();
        f.layer.write(CTX, 0, block(2), false).await.unwrap();
        f.layer.write(IoContext { connection: 2, ..CTX }, 4096, block(3), false).await.unwrap();
        let report = f.layer.cut_power(None).await.unwrap();
        assert_eq!((report.happened, report.journaled, report.off), (true, true, false));
        assert_eq!((report.undone_writes, report.undone_bytes), (2, 8192));
        assert_eq!(stored(&f.storage, 0, 1).await[0], 1);
        assert_eq!(stored(&f.storage, 4096, 1).await[0], 0);
        assert_eq!(f.layer.power().admits(), Some(1), "on again at once");
        // The fault log has it, after the requests before it, and says what it did.
        let power = f.log.power_records();
        assert_eq!(power.len(), 1);
        let cut = power[0].cut.clone().unwrap();
        assert_eq!(
            (power[0].event, power[0].origin, power[0].next_request_index, power[0].power_off.clone()),
            (PowerEvent::PowerCut, PowerOrigin::ControlApi, 4, None)
        );
        assert_eq!((cut.undone_writes, cut.undone_bytes, cut.undone), (2, 8192, vec![[0, 8192]]));
        // Without a volatile cache nothing is journaled, so nothing is undone.
        let f = fixture("rules: [{when: {op: trim}, then: {}}]");
        f.layer.write(CTX, 0, block(2), false).await.unwrap();
        let report = f.layer.cut_power(None).await.unwrap();
        assert_eq!((report.journaled, report.undone_writes), (false, 0));
        assert_eq!(stored(&f.storage, 0, 1).await[0], 2);
    }

    /// Polls a future once: true when it is still pending.
    fn pending_after_one_poll<F: std::future::Future + Unpin>(future: &mut F) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::pin::Pin::new(future).poll(&mut cx).is_pending()
    }

    #[tokio::test]
    async fn a_power_cut_waits_for_a_dropped_write_still_on_an_io_thread_before_it_undoes() {
        use crate::storage::{FileDevice, engine};
        // An image in memory: the journal's read of the old contents and the undo are done on
        // the async thread, WRITE_ZEROES always on the I/O threads.
        let dir = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm (tmpfs)");
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
        let storage = Arc::new(FileDevice::open(&path, false).unwrap());
        assert_eq!(storage.data_path().writes, "inline", "the image must live in memory (tmpfs)");
        let policy = Policy::from_yaml("volatile_cache: true", "test").unwrap();
        let log = Arc::new(FaultLog::in_memory(64));
        let engine = Arc::new(Engine::new(Some(policy)));
        let layer = Arc::new(FaultLayer::new("disk", storage.clone(), engine, log, Clock::start()));
        layer.write(CTX, 0, block(1), false).await.unwrap();
        layer.flush(CTX).await.unwrap();

        // Every I/O thread busy until `hold` is dropped.
        let (started, running) = std::sync::mpsc::channel();
        let (mut busy, mut hold) = (Vec::new(), Vec::new());
        for _ in 0..engine::IO_THREADS {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            hold.push(release);
            let started = started.clone();
            let mut job = Box::pin(engine::shared().run(move || {
                let _ = started.send(());
                let _ = wait.recv();
            }));
            assert!(pending_after_one_poll(&mut job));
            busy.push(job);
        }
        for _ in 0..engine::IO_THREADS {
            running.recv().unwrap();
        }
        // An unflushed WRITE_ZEROES: journaled, then queued behind them; then its client goes
        // away and the request is dropped. Its job stays queued: it will zero the block.
        let mut zeroing = layer.write_zeroes(CTX, 0, 4096, ZeroFlags::default());
        assert!(pending_after_one_poll(&mut zeroing));
        assert_eq!(layer.unflushed_bytes(), 4096, "journaled before it was queued");
        drop(zeroing);

        let cutting = tokio::spawn({
            let layer = Arc::clone(&layer);
            async move { layer.cut_power(None).await }
        });
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert!(!cutting.is_finished(), "the undo waits while the dropped write can still land");
        drop(hold);
        let report = cutting.await.unwrap().unwrap();
        assert_eq!((report.undone_writes, report.undone_bytes), (1, 4096));
        for job in busy {
            job.await.unwrap();
        }
        engine::shared().fence().await.unwrap();
        let stored = stored_in(&*storage, 0, 4096).await;
        assert!(stored.iter().all(|&b| b == 1), "storage holds the flushed write, not {:?}...", &stored[..8]);
    }

    async fn stored_in(storage: &dyn BlockDevice, offset: u64, length: u32) -> Bytes {
        storage.read(IoContext::default(), offset, length).await.unwrap()
    }

    #[tokio::test]
    async fn a_policy_swap_keeps_unflushed_writes_undoable_only_while_the_new_policy_keeps_the_journal() {
        let f = fixture("volatile_cache: true");
        f.layer.write(CTX, 0, block(1), false).await.unwrap();
        let policy = |text: &str| Some(Policy::from_yaml(text, "swap").unwrap());
        // Another policy with a volatile cache: no power event, the write stays unflushed.
        let kept = f.layer.set_policy(policy("rules: [{name: cut, when: {op: flush}, then: {power_cut: true}}]"));
        assert_eq!((kept.writes, f.layer.unflushed_bytes()), (0, 4096));
        // One without: the journal goes, and what it held can no longer be undone.
        let dropped = f.layer.set_policy(policy("rules: [{when: {op: trim}, then: {error: EIO}}]"));
        assert_eq!((dropped.writes, dropped.bytes, f.layer.unflushed_bytes()), (1, 4096, 0));
        f.layer.write(CTX, 4096, block(2), false).await.unwrap();
        assert_eq!(f.layer.unflushed_bytes(), 0, "nothing is journaled without a volatile cache");
        // A volatile cache again starts from an empty journal: only later writes are undone.
        f.layer.set_policy(policy("volatile_cache: true"));
        f.layer.write(CTX, 8192, block(3), false).await.unwrap();
        let report = f.layer.cut_power(None).await.unwrap();
        assert_eq!(report.undone_writes, 1);
        assert_eq!(stored(&f.storage, 0, 1).await[0], 1, "written before the swap: survives");
        assert_eq!(stored(&f.storage, 4096, 1).await[0], 2);
        assert_eq!(stored(&f.storage, 8192, 1).await[0], 0, "written after it: undone");
        // Removing the policy drops the journal too.
        let after = IoContext { power_cycle: 1, ..CTX };
        f.layer.write(after, 0, block(4), false).await.unwrap();
        assert_eq!(f.layer.set_policy(None).writes, 1);
        assert_eq!(f.layer.unflushed_bytes(), 0);
    }

    #[tokio::test]
    async fn a_power_cut_ends_a_stalled_request_of_another_connection_without_its_write() {
        let f = fixture(
            "rules:\n  - {name: hold, when: {op: write, connection: 2}, then: {stall: never-armed}}\n  \
             - {name: cut, when: {op: flush, connection: 1}, then: {power_cut: true}}\n",
        );
        let layer = f.layer.clone();
        let held = IoContext { connection: 2, ..CTX };
        let mut stalled = tokio::spawn(async move { layer.write(held, 0, block(5), false).await });
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(futures_poll_pending(&mut stalled).await);
        assert!(matches!(f.layer.flush(CTX).await, Err(IoError::Disconnect { .. })));
        assert!(matches!(stalled.await.unwrap(), Err(IoError::Disconnect { .. })));
        assert_eq!(stored(&f.storage, 0, 1).await[0], 0, "the stalled write never happened");
    }

    #[tokio::test]
    async fn a_write_torn_by_the_power_cut_keeps_its_first_bytes_through_the_next_cut() {
        let f = fixture("rules: [{name: cut, when: {op: write, request: 1}, then: {power_cut: true, torn: 1KiB}}]");
        f.layer.write(CTX, 0, block(1), false).await.unwrap();
        assert!(f.layer.write(CTX, 8192, block(2), false).await.is_err());
        assert_eq!(stored(&f.storage, 0, 1).await[0], 0, "the unflushed write is undone");
        let torn = stored(&f.storage, 8192, 4096).await;
        assert!(torn[..1024].iter().all(|&b| b == 2) && torn[1024..].iter().all(|&b| b == 0));
        assert_eq!(f.layer.unflushed_bytes(), 0, "what reached the medium at the cut is not journaled");
        f.layer.cut_power(None).await.unwrap();
        assert_eq!(stored(&f.storage, 8192, 1).await[0], 2);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_cut_the_export_stays_off_until_its_trigger_or_timeout_or_a_power_on() {
        let f = fixture("rules: [{name: cut, when: {op: flush}, then: {power_cut: {until: power-on, timeout: 10s}}}]");
        let power = f.layer.power().clone();
        assert!(f.layer.flush(CTX).await.is_err());
        assert_eq!(power.admits(), None);
        f.layer.engine().arm("power-on", Duration::ZERO);
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(power.admits(), Some(1), "arming the trigger powers on");
        // Armed already at the next cut: the trigger does not hold the power off, which comes back
        // as soon as the power-on task runs, long before the timeout.
        let now = IoContext { power_cycle: 1, ..CTX };
        assert!(f.layer.flush(now).await.is_err());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(power.admits(), Some(2), "an armed trigger powers on at once");
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(power.admits(), Some(2), "the timeout then finds the power on and changes nothing");
        f.layer.cut_power(Some(Off::default())).await.unwrap();
        assert_eq!(power.admits(), None);
        assert!(f.layer.power_on());
        assert!(!f.layer.power_on(), "on already");
        assert_eq!(power.admits(), Some(3));
        let on_at = f.layer.clock.now() + Duration::from_secs(5);
        f.layer.cut_power(Some(Off { until: None, on_at: Some(on_at) })).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(power.admits(), Some(4), "the timeout powers on");
        // Every power-on is logged, after the cut it ends, and says what did it (the second cut's
        // trigger was armed already: the power came back at once, as a stall on it would not wait).
        // Timeouts to the millisecond: the server's clock runs while the test's is paused.
        let ms = |off: &Option<PowerOffRecord>| {
            off.clone().map(|off| PowerOffRecord {
                timeout_ns: off.timeout_ns.map(|ns| (ns + 500_000) / 1_000_000 * 1_000_000),
                ..off
            })
        };
        let changes: Vec<_> = f
            .log
            .since(None, 0)
            .iter()
            .map(|entry| match &**entry {
                LogEntry::Request(record) => (record.outcome == Outcome::PowerCut, None, None, ms(&record.power_off)),
                LogEntry::Power(record) => (
                    record.event == PowerEvent::PowerCut,
                    Some(record.origin),
                    record.trigger.clone(),
                    ms(&record.power_off),
                ),
            })
            .collect();
        let off = |until: Option<&str>, timeout_ns: Option<u64>| {
            Some(PowerOffRecord { until: until.map(str::to_string), timeout_ns })
        };
        assert_eq!(
            changes,
            vec![
                (true, None, None, off(Some("power-on"), Some(10_000_000_000))),
                (false, Some(PowerOrigin::Trigger), Some("power-on".to_string()), None),
                (true, None, None, off(Some("power-on"), Some(10_000_000_000))),
                (false, Some(PowerOrigin::Trigger), Some("power-on".to_string()), None),
                (true, Some(PowerOrigin::ControlApi), None, off(None, None)),
                (false, Some(PowerOrigin::ControlApi), None, None),
                (true, Some(PowerOrigin::ControlApi), None, off(None, Some(5_000_000_000))),
                (false, Some(PowerOrigin::Timeout), None, None),
            ]
        );
    }

    #[tokio::test]
    async fn a_sticky_write_error_makes_reads_fail_until_rewritten_and_reset_heals_it() {
        let f = fixture("rules: [{name: bad, when: {op: write, nth: 1}, then: {error: EIO, sticky: true}}]");
        assert!(f.layer.write(CTX, 0, block(1), false).await.is_err());
        assert!(f.layer.read(CTX, 0, 512).await.is_err());
        f.layer.write(CTX, 0, block(2), false).await.unwrap();
        assert_eq!(f.layer.read(CTX, 0, 1).await.unwrap()[0], 2);

        let f = fixture("rules: [{name: bad, when: {op: write, nth: 1}, then: {error: EIO, sticky: true}}]");
        assert!(f.layer.write(CTX, 0, block(1), false).await.is_err());
        f.layer.reset().await.unwrap();
        assert!(f.layer.read(CTX, 0, 512).await.is_ok());
    }
}
