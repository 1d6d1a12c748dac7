//! The transmission phase of one connection.
//!
//! A reader loop decodes requests and spawns one task per request; a single writer task sends
//! replies in the order requests complete, each written whole. A request that waits (a slow disk,
//! an injected delay) never holds up the requests behind it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::export::{Counters, Export};
use crate::handshake::Session;
use crate::shutdown::Shutdown;
use crate::storage::{BlockDevice, Extent, IoContext, IoError, ZeroFlags};
use crate::wire::request::{Command, MAX_PAYLOAD, Negotiated, RequestHeader, validate};
use crate::wire::{BASE_ALLOCATION_ID, chunk, command, command_flags, errno, reply};

pub(crate) mod reader;
mod replies;
pub use reader::RequestReader;
use replies::{Head, Outgoing, Reply, write_replies};

/// What a request without a payload costs against the in-flight budget.
const MIN_COST: u32 = 4096;

/// What a request holds against the in-flight budget while it is served: its payload or its
/// read buffer. A WRITE too large to serve is drained, never held.
fn cost(header: &RequestHeader) -> u32 {
    match header.kind {
        command::WRITE if header.length > MAX_PAYLOAD => MIN_COST,
        command::WRITE | command::READ => header.length.clamp(MIN_COST, MAX_PAYLOAD),
        _ => MIN_COST,
    }
}
/// The most replies the reader gathers from requests done at once before handing them over.
const MAX_READY: usize = 64;

/// How the transmission phase ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client sent NBD_CMD_DISC; in-flight requests were finished and replied to.
    Disconnect,
    /// The client closed the connection.
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The device asked for the connection to be dropped (an injected disconnect).
    Dropped,
    /// The export lost power: every connection of it is dropped at once, without replies.
    PowerCut,
}

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("request magic {0:#x} is not NBD_REQUEST_MAGIC; closing the connection")]
    BadMagic(u32),
    #[error("the client closed the connection in the middle of a request")]
    Truncated,
    #[error("WRITE of {0} bytes is too large to drain; closing the connection")]
    PayloadTooLarge(u32),
}

/// Limits for one connection.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Bytes of payloads and read buffers in flight before the server stops reading requests.
    pub max_in_flight: u32,
    /// The server's memory budget, shared by every connection (and the control API's `data`
    /// transfers): in-flight bytes count against it too.
    pub memory: Arc<Semaphore>,
}

/// What a request holds while it is served, freed once its reply is sent: its share of the
/// connection's in-flight bound and of the server's memory budget.
pub struct Held {
    _connection: OwnedSemaphorePermit,
    _server: OwnedSemaphorePermit,
}

/// Serves requests from `reader` until DISC, EOF, shutdown or a protocol violation.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    session: Session,
    connection: u64,
    limits: ConnectionLimits,
    mut shutdown: Shutdown,
) -> Result<End, TransmissionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut requests = RequestReader::new(reader);
    let (tx, rx) = mpsc::unbounded_channel();
    let (closed_tx, mut closed) = watch::channel(false);
    let export = Arc::clone(&session.export);
    let power = Arc::clone(export.power());
    let _attached = power.attach();
    let writer_power_cut = {
        let (power, cycle) = (Arc::clone(&power), session.power_cycle);
        async move { power.cut_after(cycle).await }
    };
    let writer_task = tokio::spawn(write_replies(writer, rx, closed_tx, shutdown.clone(), writer_power_cut));
    let budget = Arc::new(Semaphore::new(limits.max_in_flight as usize));
    let negotiated = Negotiated {
        size: export.size(),
        flags: session.flags,
        structured_replies: session.structured_replies,
        meta_context: session.meta_context,
    };
    let mut tasks = JoinSet::new();
    // Replies of requests that were done at once, handed to the writer together when the reader
    // is about to wait (or has gathered enough): one wake-up and one write for all of them.
    let mut ready: Vec<Outgoing> = Vec::new();
    let hand_over = |ready: &mut Vec<Outgoing>| {
        if !ready.is_empty() {
            let _ = tx.send(Outgoing::Batch(std::mem::replace(ready, Vec::with_capacity(MAX_READY))));
        }
    };

    let power_cut = power.cut_after(session.power_cycle);
    tokio::pin!(power_cut);
    let outcome: Result<End, TransmissionError> = async {
        loop {
            while tasks.try_join_next().is_some() {}
            let header = tokio::select! {
                biased;
                () = &mut power_cut => return Ok(End::PowerCut),
                _ = closed.wait_for(|closed| *closed) => return Ok(End::Dropped),
                _ = shutdown.stopping() => return Ok(End::Shutdown),
                header = requests.header() => header?,
            };
            let Some(header) = header else { return Ok(End::Closed) };
            Counters::add(&export.counters.requests, 1);
            // Backpressure: at the connection's bound, or when the server's memory budget is
            // spent, stop reading requests until replies free budget.
            let held = match acquire(&budget, &limits.memory, cost(&header)) {
                Some(held) => held,
                None => {
                    // The replies gathered here hold budget too: they must go before waiting.
                    hand_over(&mut ready);
                    tokio::select! {
                        biased;
                        () = &mut power_cut => return Ok(End::PowerCut),
                        _ = closed.wait_for(|closed| *closed) => return Ok(End::Dropped),
                        _ = shutdown.stopping() => return Ok(End::Shutdown),
                        held = acquire_waiting(&budget, &limits.memory, cost(&header)) => held,
                    }
                }
            };
            // A client may finish sending a payload during the shutdown grace period, not after.
            let payload = tokio::select! {
                payload = requests.payload(&header) => payload?,
                _ = shutdown.abandoned() => return Ok(End::Shutdown),
            };
            let cmd = match validate(&header, &negotiated) {
                Ok(Command::Disc) => return Ok(End::Disconnect),
                Ok(cmd) => cmd,
                Err(rejection) => {
                    tracing::debug!(cookie = header.cookie, kind = header.kind, errno = rejection.errno, reason = %rejection.reason, "request refused");
                    Counters::add(&export.counters.errors, 1);
                    let (head, data) = encode_error(&header, rejection.errno, &rejection.reason, session.structured_replies);
                    ready.push(Outgoing::Reply(Reply { head, data, _permit: Some(held) }));
                    if !requests.has_request() || ready.len() >= MAX_READY {
                        hand_over(&mut ready);
                    }
                    continue;
                }
            };
            let request = RequestTask {
                export: Arc::clone(&export),
                cmd,
                header,
                payload,
                ctx: IoContext {
                    connection,
                    cookie: header.cookie,
                    flags: header.flags,
                    power_cycle: session.power_cycle,
                },
                structured: session.structured_replies,
                held,
                shutdown: shutdown.clone(),
            };
            let span = tracing::debug_span!("request", cookie = header.cookie, cmd = cmd.name(), offset = header.offset, length = header.length);
            // Started here, in the order requests arrive: the device takes its order-dependent
            // decisions (the fault layer's request index, occurrence counts, seeded draws) before
            // its first await, and that order must not depend on how the runtime happens to
            // schedule request tasks. Whatever the request then waits for runs in its own task.
            let mut task = Box::pin(request.run().instrument(span));
            match start(task.as_mut()) {
                Poll::Ready(outgoing) => ready.push(outgoing),
                Poll::Pending => {
                    // Polled again once spawned, so it wakes through the runtime from then on.
                    let tx = tx.clone();
                    tasks.spawn(async move {
                        // The writer is gone only when the connection is; the reply has nobody
                        // to go to then.
                        let _ = tx.send(task.await);
                    });
                }
            }
            // Before the reader may wait for the client, the replies it holds go out.
            if !requests.has_request() || ready.len() >= MAX_READY {
                hand_over(&mut ready);
            }
        }
    }
    .await;
    hand_over(&mut ready);

    drop(tx);
    match outcome {
        // The client asked to leave, or finished sending (a client that half-closed the
        // connection still reads its replies), or the server is leaving: finish what was asked
        // first, unless the replies can no longer be sent.
        Ok(End::Disconnect | End::Closed | End::Shutdown) => {
            let finished = tokio::select! {
                () = join_all(&mut tasks) => true,
                _ = closed.wait_for(|closed| *closed) => false,
            };
            if !finished {
                tasks.abort_all();
            }
        }
        // The power went: the writer sends nothing more. The requests in flight end at once (a
        // wait ends with the power, storage I/O is refused), and are not aborted: one aborted in
        // the middle of a write could let the write land after the cut undid the journal.
        Ok(End::PowerCut) => join_all(&mut tasks).await,
        // The connection is broken, or the device asked to drop it.
        _ => tasks.abort_all(),
    }
    while tasks.join_next().await.is_some() {}
    // The writer ends once every reply sender is gone; its errors only mean the client left.
    if let Ok(Err(error)) = writer_task.await {
        tracing::debug!(%error, "writing replies failed");
    }
    outcome
}

/// Polls a request once, here and now. Outside the cooperative budget: once the reader has used
/// its budget up, `tokio::select!` would return before the request even reached the device.
fn start<T>(task: Pin<&mut impl Future<Output = T>>) -> Poll<T> {
    let mut task = Some(task);
    let mut once = tokio::task::coop::unconstrained(std::future::poll_fn(|cx| {
        Poll::Ready(task.take().expect("poll_fn is polled once").poll(cx))
    }));
    match Pin::new(&mut once).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(first) => first,
        Poll::Pending => unreachable!("poll_fn above is always ready"),
    }
}

/// Takes `cost` from the connection's bound and the server's budget at once, or nothing.
fn acquire(connection: &Arc<Semaphore>, server: &Arc<Semaphore>, cost: u32) -> Option<Held> {
    let connection = Arc::clone(connection).try_acquire_many_owned(cost).ok()?;
    let server = Arc::clone(server).try_acquire_many_owned(cost).ok()?;
    Some(Held { _connection: connection, _server: server })
}

/// Waits for `cost` from the connection's bound, then from the server's budget. Holding the
/// first while waiting for the second deadlocks nothing: what holds the server's budget is
/// freed by replies being sent, which waits for no budget.
async fn acquire_waiting(connection: &Arc<Semaphore>, server: &Arc<Semaphore>, cost: u32) -> Held {
    let connection = Arc::clone(connection).acquire_many_owned(cost).await.expect("the budget is never closed");
    let server = Arc::clone(server).acquire_many_owned(cost).await.expect("the budget is never closed");
    Held { _connection: connection, _server: server }
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// One request on its way through the device.
struct RequestTask {
    export: Arc<Export>,
    cmd: Command,
    header: RequestHeader,
    payload: Bytes,
    ctx: IoContext,
    structured: bool,
    held: Held,
    shutdown: Shutdown,
}

/// What a successful request returns.
enum Done {
    Nothing,
    Data(Bytes),
    Extents(Vec<Extent>),
}

impl RequestTask {
    /// Serves the request and returns its reply.
    async fn run(mut self) -> Outgoing {
        let device = Arc::clone(&self.export.device);
        let result = tokio::select! {
            result = execute(&*device, self.cmd, &self.header, std::mem::take(&mut self.payload), self.ctx) => result,
            _ = self.shutdown.abandoned() => Err(IoError::new(errno::ESHUTDOWN, "the server is shutting down")),
        };
        let counters = &self.export.counters;
        match result {
            Ok(done) => {
                match self.cmd {
                    Command::Read => Counters::add(&counters.bytes_read, u64::from(self.header.length)),
                    Command::Write => Counters::add(&counters.bytes_written, u64::from(self.header.length)),
                    _ => {}
                }
                let (head, data) = encode_success(&self.header, done, self.structured);
                Outgoing::Reply(Reply { head, data, _permit: Some(self.held) })
            }
            Err(IoError::Disconnect { reason }) => Outgoing::Disconnect { reason },
            Err(IoError::Failed { errno, message }) => {
                Counters::add(&counters.errors, 1);
                tracing::debug!(errno = errno::name(errno), %message, "request failed");
                let (head, data) = encode_error(&self.header, errno, &message, self.structured);
                Outgoing::Reply(Reply { head, data, _permit: Some(self.held) })
            }
        }
    }
}

async fn execute(
    device: &dyn BlockDevice,
    cmd: Command,
    header: &RequestHeader,
    payload: Bytes,
    ctx: IoContext,
) -> Result<Done, IoError> {
    let fua = header.flags & command_flags::FUA != 0;
    let (offset, length) = (header.offset, u64::from(header.length));
    match cmd {
        Command::Read if length == 0 => Ok(Done::Data(Bytes::new())),
        Command::Read => device.read(ctx, offset, header.length).await.map(Done::Data),
        Command::Write if length == 0 => Ok(Done::Nothing),
        Command::Write => device.write(ctx, offset, payload, fua).await.map(|()| Done::Nothing),
        Command::Flush => device.flush(ctx).await.map(|()| Done::Nothing),
        Command::Trim if length == 0 => Ok(Done::Nothing),
        Command::Trim => device.trim(ctx, offset, length, fua).await.map(|()| Done::Nothing),
        Command::WriteZeroes if length == 0 => Ok(Done::Nothing),
        Command::WriteZeroes => {
            let flags = ZeroFlags {
                no_hole: header.flags & command_flags::NO_HOLE != 0,
                fast: header.flags & command_flags::FAST_ZERO != 0,
                fua,
            };
            device.write_zeroes(ctx, offset, length, flags).await.map(|()| Done::Nothing)
        }
        Command::Cache => device.cache(ctx, offset, length).await.map(|()| Done::Nothing),
        Command::BlockStatus => device.extents(ctx, offset, length).await.map(Done::Extents),
        Command::Disc => unreachable!("DISC ends the reader loop and is never executed"),
    }
}

/// Fits extents to a BLOCK_STATUS reply: with REQ_ONE exactly one, no longer than the request;
/// otherwise as many as it takes to cover the request, none longer than what is left of it.
fn fit_extents(extents: Vec<Extent>, length: u32, req_one: bool) -> Vec<(u32, u32)> {
    let mut fitted = Vec::new();
    let mut covered: u64 = 0;
    for extent in extents.into_iter().filter(|extent| extent.length > 0) {
        let take = extent.length.min(u64::from(length) - covered);
        fitted.push((take as u32, extent.flags));
        covered += take;
        if req_one || covered == u64::from(length) {
            break;
        }
    }
    if fitted.is_empty() {
        // A device that could not say: "allocated, not known to be zero" is always true.
        fitted.push((length, 0));
    }
    fitted
}

fn encode_success(header: &RequestHeader, done: Done, structured: bool) -> (Head, Option<Bytes>) {
    let cookie = header.cookie;
    match done {
        Done::Data(data) if structured && data.is_empty() => (Head::inline(|out| reply::none_chunk(out, cookie)), None),
        Done::Data(data) if structured => {
            let length = data.len() as u32;
            let head =
                Head::inline(|out| reply::offset_data_header(out, chunk::FLAG_DONE, cookie, header.offset, length));
            (head, Some(data))
        }
        Done::Data(data) => (Head::inline(|out| reply::simple(out, 0, cookie)), Some(data)),
        Done::Extents(extents) => {
            let req_one = header.flags & command_flags::REQ_ONE != 0;
            let fitted = fit_extents(extents, header.length, req_one);
            let mut head = BytesMut::with_capacity(reply::CHUNK_HEADER_LEN + 4 + 8 * fitted.len());
            reply::block_status_chunk(&mut head, chunk::FLAG_DONE, cookie, BASE_ALLOCATION_ID, &fitted);
            (Head::Heap(head.freeze()), None)
        }
        Done::Nothing => (Head::inline(|out| reply::simple(out, 0, cookie)), None),
    }
}

/// An error reply. With structured replies, READ and BLOCK_STATUS must answer in chunks.
fn encode_error(header: &RequestHeader, errno: u32, message: &str, structured: bool) -> (Head, Option<Bytes>) {
    let chunked = structured && matches!(header.kind, command::READ | command::BLOCK_STATUS);
    if chunked {
        let mut head = BytesMut::with_capacity(64);
        reply::error_chunk(&mut head, chunk::FLAG_DONE, header.cookie, errno, message);
        (Head::Heap(head.freeze()), None)
    } else {
        (Head::inline(|out| reply::simple(out, errno, header.cookie)), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::REQUEST_MAGIC;

    #[test]
    fn req_one_gives_exactly_one_extent_no_longer_than_the_request() {
        let extents = vec![Extent { length: 1 << 40, flags: 3 }, Extent { length: 4096, flags: 0 }];
        assert_eq!(fit_extents(extents, 8192, true), vec![(8192, 3)]);
        let extents = vec![Extent { length: 512, flags: 0 }, Extent { length: 4096, flags: 3 }];
        assert_eq!(fit_extents(extents, 8192, true), vec![(512, 0)]);
    }

    #[test]
    fn extents_cover_the_request_and_stop_there() {
        let extents = vec![
            Extent { length: 4096, flags: 0 },
            Extent { length: 4096, flags: 3 },
            Extent { length: 1 << 33, flags: 0 },
        ];
        assert_eq!(fit_extents(extents, 10_000, false), vec![(4096, 0), (4096, 3), (1808, 0)]);
        assert_eq!(fit_extents(vec![], 512, false), vec![(512, 0)]);
        assert_eq!(fit_extents(vec![Extent { length: 0, flags: 3 }], 512, false), vec![(512, 0)]);
    }

    #[test]
    fn structured_read_errors_are_chunks_and_other_errors_may_be_simple() {
        let read =
            RequestHeader { magic: REQUEST_MAGIC, flags: 0, kind: command::READ, cookie: 7, offset: 0, length: 1 };
        let (head, data) = encode_error(&read, errno::EIO, "boom", true);
        assert!(data.is_none());
        let (decoded, _) = reply::decode(&head).unwrap();
        assert!(matches!(decoded, reply::DecodedReply::Chunk { chunk_type: chunk::ERROR, cookie: 7, .. }));
        let write = RequestHeader { kind: command::WRITE, ..read };
        let (head, _) = encode_error(&write, errno::EIO, "boom", true);
        assert_eq!(reply::decode(&head).unwrap().0, reply::DecodedReply::Simple { errno: errno::EIO, cookie: 7 });
    }

    #[test]
    fn zero_length_structured_read_is_a_none_chunk() {
        let read =
            RequestHeader { magic: REQUEST_MAGIC, flags: 0, kind: command::READ, cookie: 9, offset: 0, length: 0 };
        let (head, data) = encode_success(&read, Done::Data(Bytes::new()), true);
        assert!(data.is_none());
        assert!(matches!(reply::decode(&head).unwrap().0, reply::DecodedReply::Chunk { chunk_type: chunk::NONE, .. }));
    }
}
