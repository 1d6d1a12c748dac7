//! Writing replies: each reply (header and data) goes out whole, and every reply ready at the
//! same moment goes out in one vectored write, its data sent from where it lies (no copy into a
//! write buffer).
//!
//! The writer runs in the connection's own task, next to the request reader: replies of requests
//! done at once reach it through the [`Outbox`] without a task switch or a wake-up, and requests
//! that had to wait (in tasks of their own) put theirs in the same outbox and wake it. The outbox
//! also keeps the connection's in-flight budget: what a request costs is held from the moment it
//! is read until its reply is sent.

use std::io::IoSlice;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;

use crate::shutdown::Shutdown;

/// The most replies one vectored write carries: two slices each, within the kernel's IOV_MAX.
const MAX_BATCH: usize = 256;
/// How long the replies to abandoned requests (ESHUTDOWN) may take to go out once the shutdown
/// grace period is over.
const LAST_REPLIES: Duration = Duration::from_millis(200);
/// Reply headers up to this size are kept inline, without an allocation of their own.
const INLINE_HEAD: usize = 32;

/// What the writer is given.
pub enum Outgoing {
    Reply(Reply),
    /// Close the connection without another reply (an injected disconnect).
    Disconnect {
        reason: String,
    },
}

/// One reply: its header, the data after it (READ), and the in-flight budget it frees once sent.
pub struct Reply {
    pub head: Head,
    pub data: Option<Bytes>,
    pub cost: u32,
}

/// A reply header: the usual ones inline, an error message or a list of extents on the heap.
pub enum Head {
    Inline { bytes: [u8; INLINE_HEAD], len: u8 },
    Heap(Bytes),
}

impl Head {
    /// A header that `encode` writes; it must fit [`INLINE_HEAD`] bytes.
    pub fn inline(encode: impl FnOnce(&mut &mut [u8])) -> Head {
        let mut bytes = [0u8; INLINE_HEAD];
        let left = {
            let mut out = &mut bytes[..];
            encode(&mut out);
            out.remaining_mut()
        };
        Head::Inline { bytes, len: (INLINE_HEAD - left) as u8 }
    }
}

impl std::ops::Deref for Head {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Head::Inline { bytes, len } => &bytes[..usize::from(*len)],
            Head::Heap(bytes) => bytes,
        }
    }
}

/// Replies on their way to the writer, and the connection's in-flight budget.
pub struct Outbox {
    state: Mutex<State>,
    max_in_flight: u64,
    /// The server's memory budget, shared with every other connection: what a request holds of
    /// the connection's budget it also holds of this one. Taken a request at a time and given
    /// back a batch of replies at a time (permits forgotten when taken, added when given back).
    memory: Arc<Semaphore>,
}

struct State {
    /// Replies not yet taken by the writer, in the order they were handed over.
    queue: Vec<Outgoing>,
    /// No reply will be added any more: the writer sends what is queued and ends.
    closed: bool,
    /// Bytes held by requests read and not yet answered, of both budgets.
    in_flight: u64,
    /// The writer, waiting for replies.
    writer: Option<Waker>,
    /// The reader, waiting for budget.
    reader: Option<Waker>,
}

impl Outbox {
    pub fn new(max_in_flight: u32, memory: Arc<Semaphore>) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                queue: Vec::with_capacity(64),
                closed: false,
                in_flight: 0,
                writer: None,
                reader: None,
            }),
            max_in_flight: u64::from(max_in_flight),
            memory,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update under this lock is a few assignments; a panic cannot leave one half done.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Reserves `cost` of the connection's bound if there is room (one request alone always
    /// fits: a cost never exceeds the bound anyway).
    fn reserve(&self, state: &mut State, cost: u32) -> bool {
        if state.in_flight == 0 || state.in_flight + u64::from(cost) <= self.max_in_flight {
            state.in_flight += u64::from(cost);
            true
        } else {
            false
        }
    }

    fn unreserve(&self, cost: u32) {
        let mut state = self.state();
        state.in_flight -= u64::from(cost).min(state.in_flight);
    }

    /// Takes `cost` bytes of both budgets if they are free now, or nothing.
    pub fn try_acquire(&self, cost: u32) -> bool {
        if !self.reserve(&mut self.state(), cost) {
            return false;
        }
        match self.memory.try_acquire_many(cost) {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => {
                self.unreserve(cost);
                false
            }
        }
    }

    /// Takes `cost` bytes of both budgets: of the connection's bound once sent replies free it,
    /// then of the server's budget. Holding the first while waiting for the second deadlocks
    /// nothing: what holds the server's budget is freed by replies being sent, which waits for
    /// no budget.
    pub async fn acquire(&self, cost: u32) {
        std::future::poll_fn(|cx| {
            let mut state = self.state();
            if self.reserve(&mut state, cost) {
                return Poll::Ready(());
            }
            state.reader = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        // Given back if this wait is given up (the connection is ending).
        let reserved = Reserved { outbox: self, cost };
        self.memory.acquire_many(cost).await.expect("the memory budget is never closed").forget();
        std::mem::forget(reserved);
    }

    /// Hands replies over from the connection's own task. The writer runs in that same task
    /// and looks at the outbox whenever the task runs, so no wake-up is needed.
    pub fn hand_over(&self, ready: &mut Vec<Outgoing>) {
        if ready.is_empty() {
            return;
        }
        let mut state = self.state();
        if state.queue.is_empty() {
            std::mem::swap(&mut state.queue, ready);
        } else {
            state.queue.append(ready);
        }
    }

    /// Hands one reply over from a request's own task, and wakes the writer.
    pub fn send(&self, outgoing: Outgoing) {
        let waker = {
            let mut state = self.state();
            state.queue.push(outgoing);
            state.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// No more replies will come: the writer sends what is queued and ends.
    pub fn close(&self) {
        let waker = {
            let mut state = self.state();
            state.closed = true;
            state.writer.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Moves the queued replies into `batch` (empty); `Ready(false)` once closed and empty.
    fn poll_take(&self, batch: &mut Vec<Outgoing>, cx: &mut Context<'_>) -> Poll<bool> {
        let mut state = self.state();
        if !state.queue.is_empty() {
            std::mem::swap(&mut state.queue, batch);
            return Poll::Ready(true);
        }
        if state.closed {
            return Poll::Ready(false);
        }
        if !state.writer.as_ref().is_some_and(|waker| waker.will_wake(cx.waker())) {
            state.writer = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Gives back the budget of replies that were sent.
    fn release(&self, cost: u64) {
        let (waker, cost) = {
            let mut state = self.state();
            let cost = cost.min(state.in_flight);
            state.in_flight -= cost;
            (state.reader.take(), cost)
        };
        self.memory.add_permits(cost as usize);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Gives back all the budget still held, once the connection is done: that of replies
    /// never sent and requests abandoned.
    pub fn release_all(&self) {
        let held = std::mem::take(&mut self.state().in_flight);
        self.memory.add_permits(held as usize);
    }
}

/// The connection's bound reserved for a request still waiting for the server's budget.
struct Reserved<'a> {
    outbox: &'a Outbox,
    cost: u32,
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        self.outbox.unreserve(self.cost);
    }
}

/// Sends replies as they are handed over; each goes out whole. Ends when the outbox is closed
/// and empty, on an injected disconnect, or when the client can no longer be written to. Gives
/// up when shutdown abandons in-flight work: a client that does not read its replies must not
/// hold the server past the grace period. Once the export lost power it sends nothing more.
pub async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    outbox: &Outbox,
    mut shutdown: Shutdown,
    power_on: super::PowerOn<'_>,
) -> std::io::Result<()> {
    let mut give_up = GiveUp { abandoned: Box::pin(async move { shutdown.abandoned().await }), last: None };
    let mut batch = Vec::with_capacity(64);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    let mut slices = Vec::with_capacity(2 * MAX_BATCH);
    // Idle, the writer waits for replies only: at shutdown the requests in flight are answered
    // (ESHUTDOWN if they are abandoned) and the outbox is closed, so the wait always ends.
    while std::future::poll_fn(|cx| outbox.poll_take(&mut batch, cx)).await {
        let mut disconnect = None;
        let mut outgoing = batch.drain(..);
        loop {
            // Up to MAX_BATCH replies per write, stopping at a disconnect.
            for next in outgoing.by_ref() {
                match next {
                    Outgoing::Reply(reply) => replies.push(reply),
                    Outgoing::Disconnect { reason } => {
                        disconnect = Some(reason);
                        break;
                    }
                }
                if replies.len() == MAX_BATCH {
                    break;
                }
            }
            if replies.is_empty() {
                break;
            }
            if !power_on.is() {
                // A device without power answers nothing more: the replies not sent are lost.
                tracing::info!("the export lost power: dropping the connection");
                return Ok(());
            }
            if !write_batch(&mut writer, &replies, &mut slices, &mut give_up).await? {
                tracing::info!("the client did not take its replies before the shutdown grace period ended; closing");
                return Ok(());
            }
            // Sent: their data and their share of the in-flight budget are released here.
            outbox.release(replies.iter().map(|reply| u64::from(reply.cost)).sum());
            replies.clear();
            if disconnect.is_some() {
                break;
            }
        }
        drop(outgoing);
        if let Some(reason) = disconnect {
            tracing::info!(%reason, "dropping the connection");
            return Ok(());
        }
    }
    tokio::select! {
        biased;
        result = writer.shutdown() => result,
        () = std::future::poll_fn(|cx| give_up.poll(cx)) => Ok(()),
    }
}

/// When a writer blocked by a client that does not read gives up: [`LAST_REPLIES`] after
/// shutdown abandoned the requests in flight (their ESHUTDOWN answers may still go out then).
struct GiveUp<'a> {
    abandoned: Pin<Box<dyn Future<Output = ()> + Send + 'a>>,
    last: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl GiveUp<'_> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.last.is_none() {
            std::task::ready!(self.abandoned.as_mut().poll(cx));
            self.last = Some(Box::pin(tokio::time::sleep(LAST_REPLIES)));
        }
        self.last.as_mut().expect("set above").as_mut().poll(cx)
    }
}

/// Writes every reply of `batch` whole, in as few system calls as the socket allows. Returns
/// false when it gave up on a client that does not read.
async fn write_batch<'a, W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &'a [Reply],
    slices: &mut Vec<IoSlice<'static>>,
    give_up: &mut GiveUp<'_>,
) -> std::io::Result<bool> {
    // `slices` only lends its allocation from one batch to the next; it is empty between calls.
    let mut borrowed: Vec<IoSlice<'a>> = reuse(std::mem::take(slices));
    for reply in batch {
        borrowed.push(IoSlice::new(&reply.head));
        if let Some(data) = reply.data.as_ref().filter(|data| !data.is_empty()) {
            borrowed.push(IoSlice::new(data));
        }
    }
    let mut left = &mut borrowed[..];
    let result = loop {
        if left.is_empty() {
            break Ok(true);
        }
        // The shutdown deadline is only looked at while the socket makes the writer wait.
        let written = tokio::select! {
            biased;
            written = writer.write_vectored(left) => written,
            () = std::future::poll_fn(|cx| give_up.poll(cx)) => break Ok(false),
        };
        match written {
            Ok(0) => break Err(std::io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut left, written),
            Err(error) => break Err(error),
        }
    };
    *slices = reuse(borrowed);
    result
}

/// An empty vector of slices with the allocation of `slices`, for any lifetime.
fn reuse<'b>(mut slices: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    slices.clear();
    slices.into_iter().map(|_| unreachable!("the vector is empty")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_held_by_requests_goes_back_to_the_server_as_replies_are_sent_and_when_the_connection_ends() {
        let memory = Arc::new(Semaphore::new(10 << 20));
        let outbox = Outbox::new(1 << 20, Arc::clone(&memory));
        assert!(outbox.try_acquire(4096) && outbox.try_acquire(4096) && outbox.try_acquire(4096));
        assert_eq!(memory.available_permits(), (10 << 20) - 3 * 4096);
        // The connection's own bound refuses what would pass it; the server's budget is untouched.
        assert!(!outbox.try_acquire(1 << 20));
        assert_eq!(memory.available_permits(), (10 << 20) - 3 * 4096);
        outbox.release(4096);
        assert_eq!(memory.available_permits(), (10 << 20) - 2 * 4096);
        // Replies never sent and requests abandoned: given back when the connection is done.
        outbox.release_all();
        assert_eq!(memory.available_permits(), 10 << 20);
        // A spent server budget refuses too, and takes nothing from the connection's bound.
        let spent = Outbox::new(1 << 20, Arc::new(Semaphore::new(100)));
        assert!(!spent.try_acquire(4096));
        assert_eq!(spent.state().in_flight, 0);
    }
}
