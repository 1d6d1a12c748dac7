//! Reading requests off a connection: the 28-byte header, then a WRITE's payload (or, for a WRITE
//! too large to serve, its drain).
//!
//! Bytes arrive through one growing buffer: a pipelining client sends many headers per packet, so
//! one `recv` serves many requests, and a WRITE's payload that is already in the buffer is split
//! off without a copy or an allocation of its own.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::TransmissionError;
use crate::wire::request::{MAX_PAYLOAD, REQUEST_HEADER_LEN, RequestHeader};
use crate::wire::{REQUEST_MAGIC, command};

/// A WRITE over [`MAX_PAYLOAD`] up to this size is drained and refused; above it the connection
/// is dropped rather than read (a denial-of-service bound, as in nbdkit).
pub const MAX_DRAIN: u32 = 64 << 20;
const _: () = assert!(MAX_DRAIN >= MAX_PAYLOAD);
/// How much one read from the socket asks for at least. Payloads larger than this are read
/// straight into a buffer of their own size.
const READ_CHUNK: usize = 64 << 10;
/// Below this much free room the buffer is renewed before reading: a read into a sliver of space
/// would cost a system call for a few bytes.
const MIN_ROOM: usize = 16 << 10;

/// Owns the reading side of a connection and hands out one request at a time.
pub struct RequestReader<R> {
    stream: R,
    /// Bytes received and not yet handed out.
    buffer: BytesMut,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    pub fn new(stream: R) -> RequestReader<R> {
        RequestReader { stream, buffer: BytesMut::with_capacity(READ_CHUNK) }
    }

    /// The next request's header. `None` is a clean end of the connection between requests.
    /// A header that is not a request, or a WRITE too large even to drain, is an error: the
    /// connection cannot go on.
    pub async fn header(&mut self) -> Result<Option<RequestHeader>, TransmissionError> {
        if let Some(header) = self.buffered_header() {
            return header.map(Some);
        }
        while self.buffer.len() < REQUEST_HEADER_LEN {
            let at_boundary = self.buffer.is_empty();
            match self.fill(REQUEST_HEADER_LEN).await {
                Ok(0) if at_boundary => return Ok(None),
                Ok(0) => return Err(TransmissionError::Truncated),
                Ok(_) => {}
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset && at_boundary => return Ok(None),
                Err(error) => return Err(error.into()),
            }
        }
        self.buffered_header().expect("a whole header is buffered").map(Some)
    }

    /// The next request's header if it is already received, without waiting for the client.
    pub fn buffered_header(&mut self) -> Option<Result<RequestHeader, TransmissionError>> {
        let bytes: &[u8; REQUEST_HEADER_LEN] =
            self.buffer.get(..REQUEST_HEADER_LEN)?.try_into().expect("length checked");
        let header = RequestHeader::decode(bytes);
        self.buffer.advance(REQUEST_HEADER_LEN);
        if header.magic != REQUEST_MAGIC {
            return Some(Err(TransmissionError::BadMagic(header.magic)));
        }
        if header.kind == command::WRITE && header.length > MAX_DRAIN {
            return Some(Err(TransmissionError::PayloadTooLarge(header.length)));
        }
        Some(Ok(header))
    }

    /// The payload that follows `header`: a WRITE's data, empty for every other request. A
    /// WRITE over [`MAX_PAYLOAD`] is read and thrown away (the request is refused afterwards),
    /// so its payload is empty too.
    pub async fn payload(&mut self, header: &RequestHeader) -> Result<Bytes, TransmissionError> {
        if header.kind != command::WRITE || header.length == 0 {
            return Ok(Bytes::new());
        }
        let length = header.length as usize;
        if header.length > MAX_PAYLOAD {
            self.skip(length).await?;
            return Ok(Bytes::new());
        }
        while self.buffer.len() < length {
            if self.fill(length).await.map_err(truncated)? == 0 {
                return Err(TransmissionError::Truncated);
            }
        }
        Ok(self.buffer.split_to(length).freeze())
    }

    /// The payload that follows `header` if it is already received (see [`Self::payload`]);
    /// `None` when reading it would wait for the client.
    pub fn buffered_payload(&mut self, header: &RequestHeader) -> Option<Bytes> {
        if header.kind != command::WRITE || header.length == 0 {
            return Some(Bytes::new());
        }
        let length = header.length as usize;
        if header.length > MAX_PAYLOAD || self.buffer.len() < length {
            return None;
        }
        Some(self.buffer.split_to(length).freeze())
    }

    /// Whether the next request (its header, and a WRITE's payload) is already received, so
    /// reading it will not wait for the client.
    pub fn has_request(&self) -> bool {
        let Some(bytes) = self.buffer.get(..REQUEST_HEADER_LEN) else { return false };
        let header = RequestHeader::decode(bytes.try_into().expect("length checked"));
        let payload = if header.kind == command::WRITE { header.length as usize } else { 0 };
        self.buffer.len() >= REQUEST_HEADER_LEN + payload
    }

    /// Reads and discards `length` bytes, never holding more than one read's worth.
    async fn skip(&mut self, mut length: usize) -> Result<(), TransmissionError> {
        loop {
            let take = length.min(self.buffer.len());
            self.buffer.advance(take);
            length -= take;
            if length == 0 {
                return Ok(());
            }
            if self.fill(READ_CHUNK).await.map_err(truncated)? == 0 {
                return Err(TransmissionError::Truncated);
            }
        }
    }

    /// Reads what the socket has, with room for at least `wanted` buffered bytes. Returns 0 at
    /// the end of the stream.
    async fn fill(&mut self, wanted: usize) -> std::io::Result<usize> {
        let needed = wanted.saturating_sub(self.buffer.len()).max(MIN_ROOM);
        if self.buffer.capacity() - self.buffer.len() < needed {
            // Reclaims the buffer in place once every payload split off it is gone; otherwise
            // takes a fresh one, and the payloads still in flight keep theirs.
            self.buffer.reserve(needed.max(READ_CHUNK));
        }
        self.stream.read_buf(&mut self.buffer).await
    }
}

fn truncated(error: std::io::Error) -> TransmissionError {
    if error.kind() == std::io::ErrorKind::UnexpectedEof { TransmissionError::Truncated } else { error.into() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn request(kind: u16, cookie: u64, length: u32) -> Vec<u8> {
        let mut out = BytesMut::new();
        RequestHeader { magic: REQUEST_MAGIC, flags: 0, kind, cookie, offset: 0, length }.encode(&mut out);
        out.to_vec()
    }

    #[tokio::test]
    async fn requests_and_payloads_come_out_in_order_across_odd_packet_boundaries() {
        let mut bytes = request(command::WRITE, 1, 5);
        bytes.extend_from_slice(b"hello");
        bytes.extend(request(command::READ, 2, 4096));
        bytes.extend(request(command::WRITE, 3, 3));
        bytes.extend_from_slice(b"abc");
        // A client that sends one byte at a time still gives whole requests.
        let mut mock = tokio_test_stream(&bytes, 1);
        let mut reader = RequestReader::new(&mut mock);
        let first = reader.header().await.unwrap().unwrap();
        assert_eq!((first.cookie, &reader.payload(&first).await.unwrap()[..]), (1, &b"hello"[..]));
        let second = reader.header().await.unwrap().unwrap();
        assert_eq!((second.cookie, reader.payload(&second).await.unwrap().len()), (2, 0));
        let third = reader.header().await.unwrap().unwrap();
        assert_eq!(&reader.payload(&third).await.unwrap()[..], b"abc");
        assert!(reader.header().await.unwrap().is_none(), "a clean end between requests");
    }

    #[tokio::test]
    async fn an_end_inside_a_header_or_payload_is_truncation() {
        let bytes = request(command::READ, 1, 0);
        let mut reader = RequestReader::new(&bytes[..10]);
        assert!(matches!(reader.header().await, Err(TransmissionError::Truncated)));
        let mut bytes = request(command::WRITE, 1, 100);
        bytes.extend_from_slice(&[0; 50]);
        let mut reader = RequestReader::new(&bytes[..]);
        let header = reader.header().await.unwrap().unwrap();
        assert!(matches!(reader.payload(&header).await, Err(TransmissionError::Truncated)));
    }

    #[tokio::test]
    async fn an_oversized_write_is_drained_and_the_next_request_follows() {
        let length = MAX_PAYLOAD + 1;
        let mut bytes = request(command::WRITE, 1, length);
        bytes.resize(bytes.len() + length as usize, 7);
        bytes.extend(request(command::FLUSH, 2, 0));
        let mut reader = RequestReader::new(&bytes[..]);
        let header = reader.header().await.unwrap().unwrap();
        assert!(reader.payload(&header).await.unwrap().is_empty());
        assert_eq!(reader.header().await.unwrap().unwrap().cookie, 2);
    }

    #[tokio::test]
    async fn bad_magic_and_undrainable_writes_end_the_connection() {
        let mut bytes = request(command::READ, 1, 0);
        bytes[0] ^= 1;
        assert!(matches!(RequestReader::new(&bytes[..]).header().await, Err(TransmissionError::BadMagic(_))));
        let bytes = request(command::WRITE, 1, MAX_DRAIN + 1);
        let error = RequestReader::new(&bytes[..]).header().await.unwrap_err();
        assert!(matches!(error, TransmissionError::PayloadTooLarge(_)));
    }

    #[tokio::test]
    async fn payloads_larger_than_one_read_arrive_whole() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
        let mut bytes = request(command::WRITE, 1, data.len() as u32);
        bytes.put_slice(&data);
        let mut mock = tokio_test_stream(&bytes, 70_000);
        let mut reader = RequestReader::new(&mut mock);
        let header = reader.header().await.unwrap().unwrap();
        assert_eq!(&reader.payload(&header).await.unwrap()[..], &data[..]);
    }

    /// A stream that gives at most `step` bytes per read.
    fn tokio_test_stream(bytes: &[u8], step: usize) -> impl AsyncRead + Unpin {
        struct Trickle {
            bytes: Vec<u8>,
            at: usize,
            step: usize,
        }
        impl AsyncRead for Trickle {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                _cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                let take = self.step.min(self.bytes.len() - self.at).min(buf.remaining());
                let at = self.at;
                buf.put_slice(&self.bytes[at..at + take]);
                self.at += take;
                std::task::Poll::Ready(Ok(()))
            }
        }
        Trickle { bytes: bytes.to_vec(), at: 0, step }
    }
}
