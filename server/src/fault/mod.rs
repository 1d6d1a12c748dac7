//! The fault layer: a [`BlockDevice`] over another one that fails, delays, stalls, tears, drops
//! or corrupts requests as the export's policy engine decides.
//!
//! It runs inside the request's own task, so a delay or a stall holds only that request: later
//! requests on the same connection complete and are answered first, and the client kernel meets
//! the error in its completion path.

pub mod journal;
pub mod log;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use nbdfault_policies::{Action, Decision, Engine, Op, Reply, Request, RequestFlags, Wait};

use crate::storage::{BlockDevice, Extent, Features, IoContext, IoError, IoFuture, ZeroFlags};
use crate::wire::command_flags;
use journal::UndoJournal;
use log::FaultLog;

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
            inner,
            engine,
            log,
            clock,
            journal: Mutex::new(UndoJournal::new(DEFAULT_JOURNAL_LIMIT)),
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Bytes of unflushed writes a power cut would undo now.
    pub fn unflushed_bytes(&self) -> u64 {
        self.journal().bytes()
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, UndoJournal> {
        // Journal updates are single assignments; a panic elsewhere cannot leave one half done.
        self.journal.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn decide(&self, op: Op, ctx: IoContext, offset: u64, length: u64) -> (Request, Decision) {
        let request = Request {
            op,
            offset,
            length,
            flags: request_flags(ctx.flags),
            connection: ctx.connection,
            cookie: ctx.cookie,
        };
        let decision = self.engine.decide(&request, self.clock.now());
        (request, decision)
    }

    /// Waits as the decision says. Only this request's task waits.
    async fn wait(&self, wait: &Wait) -> Duration {
        // tokio's clock, so a paused test clock measures the wait it skipped.
        let started = tokio::time::Instant::now();
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
        started.elapsed()
    }

    /// Undoes every write since the last successful flush, newest first.
    async fn power_cut(&self) -> Result<(), IoError> {
        let (undo, lost) = self.journal().take_for_undo();
        if lost > 0 {
            tracing::warn!(writes = lost, "power cut: the undo journal was full; these writes survive it");
        }
        for (offset, before) in undo {
            self.inner.write(IoContext::default(), offset, before, false).await?;
        }
        Ok(())
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
        if !self.journal().has_room(length) {
            self.journal().count_unjournaled();
            return Ok(());
        }
        let before = self.read_range(offset, length).await?;
        self.journal().record(offset, before);
        Ok(())
    }

    /// Reads any length (write-zeroes ranges can exceed one read's limit) from the storage below.
    async fn read_range(&self, offset: u64, length: u64) -> Result<Bytes, IoError> {
        const STEP: u64 = 32 << 20;
        let mut out = BytesMut::with_capacity(length as usize);
        let mut at = offset;
        while at < offset + length {
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
        let (request, decision) = self.decide(op, ctx, offset, length);
        if decision.rule.is_none() {
            return perform(Action::Perform).await.map(|(value, _)| value);
        }
        self.apply(request, decision, perform).await
    }

    /// Applies what comes after the wait: the power cut, then the action via `perform`, then the
    /// reply. `perform` gets the action and returns the result and the bytes it persisted.
    async fn apply<T, F, Fut>(&self, request: Request, decision: Decision, perform: F) -> Result<T, IoError>
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
            logged: false,
        };
        pending.waited = Some(self.wait(&pending.decision.wait).await);
        if pending.decision.power_cut {
            self.power_cut().await?;
        }
        let (result, persisted) = match pending.decision.action {
            Action::Skip => (Ok(T::default()), 0),
            action => match perform(action).await {
                Ok((value, persisted)) => (Ok(value), persisted),
                Err(error) => (Err(error), 0),
            },
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
    logged: bool,
}

impl Pending<'_> {
    fn record(&self, persisted: u64) {
        let waited = self.waited.unwrap_or_else(|| self.started.elapsed());
        let layer = self.layer;
        layer.log.record(&layer.export, &self.request, &self.decision, waited, persisted, layer.clock.now());
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
            self.journal().clear();
            self.engine.clear_bad_sectors();
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryDevice;
    use nbdfault_policies::Policy;

    const CTX: IoContext = IoContext { connection: 1, cookie: 9, flags: 0 };
    const FUA: IoContext = IoContext { connection: 1, cookie: 10, flags: command_flags::FUA };

    struct Fixture {
        storage: Arc<MemoryDevice>,
        layer: Arc<FaultLayer>,
        log: Arc<FaultLog>,
    }

    fn fixture(policy: &str) -> Fixture {
        let storage = Arc::new(MemoryDevice::new(16 << 20));
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
        let records = f.log.since(None, 0);
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].rule.as_str(), records[0].offset, records[0].persisted), ("fail", 0, 0));
    }

    #[tokio::test]
    async fn persist_then_error_writes_the_data_and_still_fails_the_request() {
        let f = fixture("rules: [{when: {op: write}, then: {error: EIO, persist: true}}]");
        assert!(f.layer.write(CTX, 0, block(3), false).await.is_err());
        assert_eq!(stored(&f.storage, 0, 1).await[0], 3);
        assert_eq!(f.log.since(None, 0)[0].persisted, 4096);
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
        assert_eq!(f.log.since(None, 0)[0].persisted, 1024);
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
        assert!(f.log.since(None, 0)[0].waited_ns.unwrap() >= 50_000_000);
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
        assert!(f.log.since(None, 0).is_empty());
        stalled.abort();
        assert!(stalled.await.unwrap_err().is_cancelled());
        let records = f.log.since(None, 0);
        assert_eq!((records.len(), records[0].rule.as_str(), records[0].persisted), (1, "hold", 0));
    }

    #[tokio::test]
    async fn an_injected_disconnect_asks_to_drop_the_connection() {
        let f = fixture("rules: [{when: {op: flush}, then: {disconnect: true}}]");
        assert!(matches!(f.layer.flush(CTX).await, Err(IoError::Disconnect { .. })));
    }

    #[tokio::test]
    async fn a_power_cut_undoes_unflushed_writes_and_keeps_flushed_and_fua_ones() {
        let f = fixture("rules: [{name: cut, when: {op: write, armed_by: cut}, then: {power_cut: true, error: EIO}}]");
        f.layer.write(CTX, 0, block(1), false).await.unwrap();
        f.layer.flush(CTX).await.unwrap();
        f.layer.write(CTX, 0, block(2), false).await.unwrap();
        f.layer.write(CTX, 8192, block(3), false).await.unwrap();
        f.layer.write(FUA, 8192, block(4), true).await.unwrap();
        f.layer.write_zeroes(CTX, 16384, 4096, ZeroFlags::default()).await.unwrap();
        assert_eq!(f.layer.unflushed_bytes(), 2 * 4096);
        f.layer.engine().arm("cut", Duration::ZERO);
        assert!(f.layer.write(CTX, 65536, block(9), false).await.is_err());
        assert_eq!(stored(&f.storage, 0, 1).await[0], 1, "the flushed write survives");
        assert_eq!(stored(&f.storage, 8192, 1).await[0], 4, "the FUA write survives");
        assert_eq!(stored(&f.storage, 65536, 1).await[0], 0, "the cutting write never happened");
        assert_eq!(f.layer.unflushed_bytes(), 0);
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
