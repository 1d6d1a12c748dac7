//! The transmission phase of one connection.
//!
//! One task per connection reads requests and writes replies: the reader starts each request as
//! it arrives and, when the device answers at once (memory, the page cache), hands the reply to
//! the writer in the same task. A request that has to wait (a slow disk, an injected delay) goes
//! on in a task of its own and never holds up the requests behind it; its reply joins the others
//! when it is done. Replies go out in the order requests complete, each written whole.

use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::export::{Counters, Export};
use crate::fault::power::Power;
use crate::handshake::Session;
use crate::shutdown::Shutdown;
use crate::storage::{BlockDevice, Extent, IoContext, IoError, ZeroFlags};
use crate::wire::request::{Command, MAX_PAYLOAD, Negotiated, RequestHeader, validate};
use crate::wire::{BASE_ALLOCATION_ID, chunk, command, command_flags, errno, reply};

pub(crate) mod reader;
mod replies;
pub use reader::RequestReader;
use replies::{Head, Outbox, Outgoing, Reply, write_replies};

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
/// The most replies the reader gathers from requests done at once before it lets the writer
/// send them.
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
    /// The device asked for the connection to be dropped (an injected disconnect), or the
    /// replies could no longer be sent.
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

/// Serves requests from `reader` until DISC, EOF, shutdown or a protocol violation.
pub async fn serve<R, W>(
    reader: R,
    writer: W,
    session: Session,
    connection: u64,
    limits: ConnectionLimits,
    shutdown: Shutdown,
) -> Result<End, TransmissionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let outbox = Arc::new(Outbox::new(limits.max_in_flight, limits.memory));
    let power = Arc::clone(session.export.power());
    let _attached = power.attach();
    let power_on = PowerOn { power: &power, cycle: session.power_cycle };
    let mut tasks = JoinSet::new();
    let mut writing = pin!(write_replies(writer, &outbox, shutdown.clone(), power_on));
    // What the writer ended with, once it has.
    let mut written = None;
    let outcome = {
        let reading = read_requests(reader, &session, connection, &outbox, &mut tasks, power_on, shutdown);
        // Both in this task: the reader first, then the writer sends what the reader handed
        // over. When the writer ends first (an injected disconnect, a client that is gone), so
        // does the reader.
        tokio::select! {
            biased;
            outcome = reading => outcome,
            result = &mut writing => {
                written = Some(result);
                Ok(End::Dropped)
            }
        }
    };
    // The client asked to leave, or finished sending (a client that half-closed the connection
    // still reads its replies), or the server is leaving: finish what was asked first, unless
    // the replies can no longer be sent. Otherwise the connection is broken, or the device
    // asked to drop it: what is still in flight is abandoned.
    if written.is_none() && matches!(outcome, Ok(End::Disconnect | End::Closed | End::Shutdown)) {
        tokio::select! {
            biased;
            () = join_all(&mut tasks) => {}
            result = &mut writing => written = Some(result),
        }
    }
    if let Ok(End::PowerCut) = outcome {
        // The power went: the writer sends nothing more. The requests in flight end at once (a
        // wait ends with the power, storage I/O is refused), and are not aborted: one aborted in
        // the middle of a write could let the write land after the cut undid the journal.
        join_all(&mut tasks).await;
        written = Some(Ok(()));
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    // The writer sends what is queued, then ends.
    outbox.close();
    let written = match written {
        Some(result) => result,
        None => writing.await,
    };
    // What unsent replies and abandoned requests still hold goes back to the server's budget.
    outbox.release_all();
    // Errors writing replies only mean the client left.
    if let Err(error) = written {
        tracing::debug!(%error, "writing replies failed");
    }
    outcome
}

/// Reads requests and starts each one until DISC, EOF, shutdown or a protocol violation.
async fn read_requests<R: AsyncRead + Unpin>(
    reader: R,
    session: &Session,
    connection: u64,
    outbox: &Arc<Outbox>,
    tasks: &mut JoinSet<()>,
    power_on: PowerOn<'_>,
    shutdown: Shutdown,
) -> Result<End, TransmissionError> {
    let mut requests = RequestReader::new(reader);
    let export = &session.export;
    let negotiated = Negotiated {
        size: export.size(),
        flags: session.flags,
        structured_replies: session.structured_replies,
        meta_context: session.meta_context,
    };
    let structured = session.structured_replies;
    // Waited for at every step, so made once: a fresh wait per request would register and
    // unregister with the shutdown signal each time.
    let (mut stop_signal, mut abandon_signal) = (shutdown.clone(), shutdown.clone());
    let mut stopping = pin!(stop_signal.stopping());
    let mut abandoned = pin!(abandon_signal.abandoned());
    let mut power_cut = pin!(power_on.power.cut_after(power_on.cycle));
    // Replies of requests that were done at once, handed to the writer together when the reader
    // is about to wait (or has gathered enough).
    let mut ready: Vec<Outgoing> = Vec::with_capacity(MAX_READY);
    let outcome = loop {
        if !tasks.is_empty() {
            while tasks.try_join_next().is_some() {}
        }
        let header = match requests.buffered_header() {
            // Received already: only a cheap look at the power and the shutdown signal, no
            // wait set up.
            Some(_) if !power_on.is() => break Ok(End::PowerCut),
            Some(_) if shutdown.is_stopping() => break Ok(End::Shutdown),
            Some(header) => Some(header?),
            None => tokio::select! {
                biased;
                () = &mut power_cut => break Ok(End::PowerCut),
                _ = &mut stopping => break Ok(End::Shutdown),
                header = requests.header() => header?,
            },
        };
        let Some(header) = header else { break Ok(End::Closed) };
        Counters::add(&export.counters.requests, 1);
        // Backpressure: at the connection's bound, or when the server's memory budget is spent,
        // stop reading requests until sent replies free budget.
        let cost = cost(&header);
        if !outbox.try_acquire(cost) {
            // The replies gathered here hold budget too: they must go before waiting.
            outbox.hand_over(&mut ready);
            tokio::select! {
                biased;
                () = &mut power_cut => break Ok(End::PowerCut),
                _ = &mut stopping => break Ok(End::Shutdown),
                () = outbox.acquire(cost) => {}
            }
        }
        // A client may finish sending a payload during the shutdown grace period, not after.
        let payload = match requests.buffered_payload(&header) {
            Some(payload) => payload,
            None => tokio::select! {
                biased;
                payload = requests.payload(&header) => payload?,
                () = &mut power_cut => break Ok(End::PowerCut),
                _ = &mut abandoned => break Ok(End::Shutdown),
            },
        };
        let cmd = match validate(&header, &negotiated) {
            Ok(Command::Disc) => break Ok(End::Disconnect),
            Ok(cmd) => cmd,
            Err(rejection) => {
                tracing::debug!(cookie = header.cookie, kind = header.kind, errno = rejection.errno, reason = %rejection.reason, "request refused");
                Counters::add(&export.counters.errors, 1);
                let (head, data) = encode_error(&header, rejection.errno, &rejection.reason, structured);
                ready.push(Outgoing::Reply(Reply { head, data, cost }));
                if !requests.has_request() || ready.len() >= MAX_READY {
                    outbox.hand_over(&mut ready);
                }
                continue;
            }
        };
        let request = Request { cmd, header, structured, cost };
        let span = tracing::debug_span!(
            "request",
            cookie = header.cookie,
            cmd = cmd.name(),
            offset = header.offset,
            length = header.length
        );
        let ctx = IoContext { connection, cookie: header.cookie, flags: header.flags, power_cycle: power_on.cycle };
        let mut work = Box::pin(execute(Arc::clone(&export.device), cmd, header, payload, ctx));
        // Started here, in the order requests arrive: the device takes its order-dependent
        // decisions (the fault layer's request index, occurrence counts, seeded draws) before
        // its first await, and that order must not depend on how the runtime happens to
        // schedule request tasks. Whatever the request then waits for runs in its own task.
        match span.in_scope(|| start(work.as_mut())) {
            Poll::Ready(result) => ready.push(span.in_scope(|| request.reply(result, export))),
            Poll::Pending => {
                let (outbox, export, mut shutdown) = (Arc::clone(outbox), Arc::clone(export), shutdown.clone());
                tasks.spawn(
                    async move {
                        // Polled again here, so it wakes through the runtime from then on.
                        let result = tokio::select! {
                            biased;
                            result = work => result,
                            _ = shutdown.abandoned() => Err(IoError::new(errno::ESHUTDOWN, "the server is shutting down")),
                        };
                        outbox.send(request.reply(result, &export));
                    }
                    .instrument(span),
                );
            }
        }
        // Before the reader may wait for the client, the replies it holds go to the writer.
        if !requests.has_request() {
            outbox.hand_over(&mut ready);
        } else if ready.len() >= MAX_READY {
            outbox.hand_over(&mut ready);
            // Lets the writer, in this same task, send them before more requests are read.
            tokio::task::yield_now().await;
        }
    };
    outbox.hand_over(&mut ready);
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

/// The power cycle a connection attached in, and a cheap look at whether it still runs.
#[derive(Clone, Copy)]
pub(crate) struct PowerOn<'a> {
    power: &'a Power,
    cycle: u64,
}

impl PowerOn<'_> {
    /// Whether no power cut has ended the connection's power cycle.
    pub fn is(&self) -> bool {
        self.power.cycle() == self.cycle
    }
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// What the reply to a request needs once the device is done with it.
struct Request {
    cmd: Command,
    header: RequestHeader,
    structured: bool,
    cost: u32,
}

/// What a successful request returns.
enum Done {
    Nothing,
    Data(Bytes),
    Extents(Vec<Extent>),
}

impl Request {
    /// The reply to the request, given what the device did.
    fn reply(self, result: Result<Done, IoError>, export: &Export) -> Outgoing {
        let counters = &export.counters;
        let (head, data) = match result {
            Ok(done) => {
                match self.cmd {
                    Command::Read => Counters::add(&counters.bytes_read, u64::from(self.header.length)),
                    Command::Write => Counters::add(&counters.bytes_written, u64::from(self.header.length)),
                    _ => {}
                }
                encode_success(&self.header, done, self.structured)
            }
            Err(IoError::Disconnect { reason }) => return Outgoing::Disconnect { reason },
            Err(IoError::Failed { errno, message }) => {
                Counters::add(&counters.errors, 1);
                tracing::debug!(errno = errno::name(errno), %message, "request failed");
                encode_error(&self.header, errno, &message, self.structured)
            }
        };
        Outgoing::Reply(Reply { head, data, cost: self.cost })
    }
}

async fn execute(
    device: Arc<dyn BlockDevice>,
    cmd: Command,
    header: RequestHeader,
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
