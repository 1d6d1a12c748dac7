//! Writing replies: one writer per connection, so each reply (header and data) goes out whole,
//! and every reply ready at the same moment goes out in one vectored write, its data sent from
//! where it lies (no copy into a write buffer).

use std::io::IoSlice;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

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
    /// Replies that were ready together, handed over at once.
    Batch(Vec<Outgoing>),
    /// Close the connection without another reply (an injected disconnect).
    Disconnect {
        reason: String,
    },
}

/// One reply: its header, the data after it (READ), and the in-flight budget it frees once sent.
pub struct Reply {
    pub head: Head,
    pub data: Option<Bytes>,
    pub _permit: Option<super::Held>,
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

/// Sends replies as they complete; each goes out whole. Gives up when shutdown abandons
/// in-flight work: a client that does not read its replies must not hold the server past the
/// grace period. When it ends, for whatever reason, `closed` tells the reader to stop.
pub async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
    closed: watch::Sender<bool>,
    mut shutdown: Shutdown,
    power_cut: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let sending = async {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut slices = Vec::with_capacity(2 * MAX_BATCH);
        while let Some(outgoing) = rx.recv().await {
            let mut disconnect = take(outgoing, &mut batch);
            // Whatever else is ready goes out in the same write.
            while disconnect.is_none() && batch.len() < MAX_BATCH {
                let Ok(outgoing) = rx.try_recv() else { break };
                disconnect = take(outgoing, &mut batch);
            }
            write_batch(&mut writer, &batch, &mut slices).await?;
            // Sent: their data and their share of the in-flight budget are released here.
            batch.clear();
            if let Some(reason) = disconnect {
                tracing::info!(%reason, "dropping the connection");
                return Ok(());
            }
        }
        writer.shutdown().await
    };
    tokio::pin!(sending);
    let result = tokio::select! {
        result = &mut sending => result,
        // A device without power answers nothing more: the replies not sent yet are lost.
        () = power_cut => {
            tracing::info!("the export lost power: dropping the connection");
            Ok(())
        }
        () = shutdown.abandoned() => {
            // The requests still in flight are being answered ESHUTDOWN right now: send those
            // answers too, but give a client that does not read them only a moment more.
            match tokio::time::timeout(LAST_REPLIES, &mut sending).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::info!("the client did not take its replies before the shutdown grace period ended; closing");
                    Ok(())
                }
            }
        }
    };
    // Whatever the reason, the reader must stop: nothing more will be sent on this connection.
    closed.send_replace(true);
    result
}

/// Adds `outgoing` to `batch`; returns the reason when it asks to drop the connection (the
/// replies before it in the batch still go out).
fn take(outgoing: Outgoing, batch: &mut Vec<Reply>) -> Option<String> {
    match outgoing {
        Outgoing::Reply(reply) => {
            batch.push(reply);
            None
        }
        Outgoing::Batch(several) => {
            let mut disconnect = None;
            for outgoing in several {
                if disconnect.is_none() {
                    disconnect = take(outgoing, batch);
                }
            }
            disconnect
        }
        Outgoing::Disconnect { reason } => Some(reason),
    }
}

/// Writes every reply of `batch` whole, in as few system calls as the socket allows.
async fn write_batch<'a, W: AsyncWrite + Unpin>(
    writer: &mut W,
    batch: &'a [Reply],
    slices: &mut Vec<IoSlice<'static>>,
) -> std::io::Result<()> {
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
            break Ok(());
        }
        match writer.write_vectored(left).await {
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
