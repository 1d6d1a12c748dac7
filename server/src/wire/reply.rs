//! Transmission-phase replies: simple replies and structured reply chunks.

use bytes::BufMut;
#[cfg(test)]
use bytes::{Buf, Bytes};

use super::consts::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, chunk};

#[cfg(test)]
pub const SIMPLE_REPLY_LEN: usize = 16;
pub const CHUNK_HEADER_LEN: usize = 20;

/// `u32 magic, u32 error, u64 cookie`; READ data follows only when `error == 0`.
pub fn simple(out: &mut impl BufMut, errno: u32, cookie: u64) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(errno);
    out.put_u64(cookie);
}

/// `u32 magic, u16 flags, u16 type, u64 cookie, u32 length`.
pub fn chunk_header(out: &mut impl BufMut, flags: u16, chunk_type: u16, cookie: u64, length: u32) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(flags);
    out.put_u16(chunk_type);
    out.put_u64(cookie);
    out.put_u32(length);
}

/// The header of an `OFFSET_DATA` chunk and its offset; `data_len` bytes of data follow it.
pub fn offset_data_header(out: &mut impl BufMut, flags: u16, cookie: u64, offset: u64, data_len: u32) {
    chunk_header(out, flags, chunk::OFFSET_DATA, cookie, data_len + 8);
    out.put_u64(offset);
}

/// A `NONE` chunk: success, and the end of the reply.
pub fn none_chunk(out: &mut impl BufMut, cookie: u64) {
    chunk_header(out, chunk::FLAG_DONE, chunk::NONE, cookie, 0);
}

/// An `ERROR` chunk with a human-readable message (cut to fit its u16 length).
pub fn error_chunk(out: &mut impl BufMut, flags: u16, cookie: u64, errno: u32, message: &str) {
    let message = cut(message, 1024);
    chunk_header(out, flags, chunk::ERROR, cookie, 6 + message.len() as u32);
    out.put_u32(errno);
    out.put_u16(message.len() as u16);
    out.put_slice(message.as_bytes());
}

/// A `BLOCK_STATUS` chunk for one meta context: `u32 id` then `(u32 length, u32 flags)` pairs.
pub fn block_status_chunk(out: &mut impl BufMut, flags: u16, cookie: u64, context_id: u32, extents: &[(u32, u32)]) {
    chunk_header(out, flags, chunk::BLOCK_STATUS, cookie, 4 + 8 * extents.len() as u32);
    out.put_u32(context_id);
    for &(length, extent_flags) in extents {
        out.put_u32(length);
        out.put_u32(extent_flags);
    }
}

fn cut(text: &str, limit: usize) -> &str {
    let mut end = text.len().min(limit);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A reply as a client reads it; used by the tests to check what the server sent.
#[cfg(test)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodedReply {
    Simple { errno: u32, cookie: u64 },
    Chunk { flags: u16, chunk_type: u16, cookie: u64, payload: Bytes },
}

/// Decodes one reply header (and, for chunks, its payload) from the front of `bytes`.
/// Simple READ replies carry data the decoder cannot know the length of; the caller takes it.
#[cfg(test)]
pub fn decode(bytes: &[u8]) -> Option<(DecodedReply, usize)> {
    let mut buf = bytes;
    if buf.len() < 4 {
        return None;
    }
    match buf.get_u32() {
        SIMPLE_REPLY_MAGIC if buf.len() >= 12 => {
            Some((DecodedReply::Simple { errno: buf.get_u32(), cookie: buf.get_u64() }, SIMPLE_REPLY_LEN))
        }
        STRUCTURED_REPLY_MAGIC if buf.len() >= 16 => {
            let flags = buf.get_u16();
            let chunk_type = buf.get_u16();
            let cookie = buf.get_u64();
            let length = buf.get_u32() as usize;
            if buf.len() < length {
                return None;
            }
            let payload = Bytes::copy_from_slice(&buf[..length]);
            Some((DecodedReply::Chunk { flags, chunk_type, cookie, payload }, CHUNK_HEADER_LEN + length))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    #[test]
    fn simple_reply_round_trips() {
        let mut out = BytesMut::new();
        simple(&mut out, 5, 0x0102_0304_0506_0708);
        assert_eq!(out.len(), SIMPLE_REPLY_LEN);
        assert_eq!(decode(&out), Some((DecodedReply::Simple { errno: 5, cookie: 0x0102_0304_0506_0708 }, 16)));
    }

    #[test]
    fn offset_data_chunk_counts_the_offset_in_its_length() {
        let mut out = BytesMut::new();
        offset_data_header(&mut out, chunk::FLAG_DONE, 9, 4096, 3);
        out.put_slice(b"abc");
        let (reply, used) = decode(&out).unwrap();
        assert_eq!(used, CHUNK_HEADER_LEN + 11);
        let DecodedReply::Chunk { flags, chunk_type, cookie, mut payload } = reply else { panic!("not a chunk") };
        assert_eq!((flags, chunk_type, cookie), (chunk::FLAG_DONE, chunk::OFFSET_DATA, 9));
        assert_eq!(payload.get_u64(), 4096);
        assert_eq!(&payload[..], b"abc");
    }

    #[test]
    fn error_chunk_carries_errno_and_message() {
        let mut out = BytesMut::new();
        error_chunk(&mut out, chunk::FLAG_DONE, 1, 5, "injected");
        let (DecodedReply::Chunk { chunk_type, mut payload, .. }, _) = decode(&out).unwrap() else { panic!() };
        assert_eq!(chunk_type, chunk::ERROR);
        assert_eq!(payload.get_u32(), 5);
        assert_eq!(payload.get_u16(), 8);
        assert_eq!(&payload[..], b"injected");
    }

    #[test]
    fn block_status_chunk_lists_extents_after_the_context_id() {
        let mut out = BytesMut::new();
        block_status_chunk(&mut out, chunk::FLAG_DONE, 2, 1, &[(4096, 0), (8192, 3)]);
        let (DecodedReply::Chunk { chunk_type, payload, .. }, _) = decode(&out).unwrap() else { panic!() };
        assert_eq!(chunk_type, chunk::BLOCK_STATUS);
        assert_eq!(payload.len(), 4 + 16);
    }

    #[test]
    fn none_chunk_is_done_and_empty() {
        let mut out = BytesMut::new();
        none_chunk(&mut out, 3);
        assert_eq!(
            decode(&out),
            Some((
                DecodedReply::Chunk {
                    flags: chunk::FLAG_DONE,
                    chunk_type: chunk::NONE,
                    cookie: 3,
                    payload: Bytes::new()
                },
                CHUNK_HEADER_LEN
            ))
        );
    }

    #[test]
    fn decode_refuses_bad_magic_and_short_input() {
        assert_eq!(decode(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode(&SIMPLE_REPLY_MAGIC.to_be_bytes()), None);
    }
}
