//! Handshake options: the client's option requests and the server's option replies.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::consts::{OPTION_REPLY_MAGIC, info, opt};

/// Bytes in an option header: `u64 IHAVEOPT, u32 option, u32 length`.
pub const OPTION_HEADER_LEN: usize = 16;

/// An option header as it arrived; the data follows on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub magic: u64,
    pub code: u32,
    pub length: u32,
}

impl OptionHeader {
    pub fn decode(bytes: &[u8; OPTION_HEADER_LEN]) -> OptionHeader {
        let mut buf = &bytes[..];
        OptionHeader { magic: buf.get_u64(), code: buf.get_u32(), length: buf.get_u32() }
    }

    /// What a client sends; for the tests.
    #[cfg(test)]
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.magic);
        out.put_u32(self.code);
        out.put_u32(self.length);
    }
}

/// An option request with its data understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName {
        name: String,
    },
    Abort,
    List,
    Info {
        name: String,
        requests: Vec<u16>,
    },
    Go {
        name: String,
        requests: Vec<u16>,
    },
    StructuredReply,
    ListMetaContext {
        export: String,
        queries: Vec<String>,
    },
    SetMetaContext {
        export: String,
        queries: Vec<String>,
    },
    StartTls,
    /// EXTENDED_HEADERS, PEEK_EXPORT and codes we do not know: answered ERR_UNSUP.
    Unsupported {
        code: u32,
    },
}

/// Why an option's data could not be understood. Answered with `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct OptionInvalid(pub String);

fn invalid(message: impl Into<String>) -> OptionInvalid {
    OptionInvalid(message.into())
}

/// The longest name or query string the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

impl OptionRequest {
    /// Understands the data of option `code`. The caller has already read exactly `data.len()`
    /// bytes, so a parse error never desynchronises the stream.
    pub fn parse(code: u32, data: Bytes) -> Result<OptionRequest, OptionInvalid> {
        match code {
            opt::EXPORT_NAME => Ok(OptionRequest::ExportName { name: string(&data, "export name")? }),
            opt::ABORT => Ok(OptionRequest::Abort),
            opt::LIST => {
                require_empty(&data, "LIST")?;
                Ok(OptionRequest::List)
            }
            opt::STARTTLS => {
                require_empty(&data, "STARTTLS")?;
                Ok(OptionRequest::StartTls)
            }
            opt::STRUCTURED_REPLY => {
                require_empty(&data, "STRUCTURED_REPLY")?;
                Ok(OptionRequest::StructuredReply)
            }
            opt::INFO | opt::GO => {
                let (name, requests) = parse_info_request(data)?;
                Ok(if code == opt::INFO {
                    OptionRequest::Info { name, requests }
                } else {
                    OptionRequest::Go { name, requests }
                })
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let (export, queries) = parse_meta_context_request(data)?;
                Ok(if code == opt::LIST_META_CONTEXT {
                    OptionRequest::ListMetaContext { export, queries }
                } else {
                    OptionRequest::SetMetaContext { export, queries }
                })
            }
            _ => Ok(OptionRequest::Unsupported { code }),
        }
    }
}

/// The data of an INFO or GO request, as a client sends it; for the tests.
#[cfg(test)]
pub fn info_request_data(name: &str, requests: &[u16]) -> Bytes {
    let mut data = BytesMut::with_capacity(6 + name.len() + 2 * requests.len());
    data.put_u32(name.len() as u32);
    data.put_slice(name.as_bytes());
    data.put_u16(requests.len() as u16);
    for request in requests {
        data.put_u16(*request);
    }
    data.freeze()
}

/// The data of a LIST_META_CONTEXT or SET_META_CONTEXT request, as a client sends it; for the
/// tests.
#[cfg(test)]
pub fn meta_context_request_data(export: &str, queries: &[&str]) -> Bytes {
    let mut data = BytesMut::new();
    data.put_u32(export.len() as u32);
    data.put_slice(export.as_bytes());
    data.put_u32(queries.len() as u32);
    for query in queries {
        data.put_u32(query.len() as u32);
        data.put_slice(query.as_bytes());
    }
    data.freeze()
}

fn require_empty(data: &[u8], name: &str) -> Result<(), OptionInvalid> {
    if data.is_empty() { Ok(()) } else { Err(invalid(format!("{name} takes no data, {} bytes sent", data.len()))) }
}

fn string(bytes: &[u8], what: &str) -> Result<String, OptionInvalid> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(invalid(format!("{what} is {} bytes; the limit is {MAX_STRING_LEN}", bytes.len())));
    }
    if bytes.contains(&0) {
        return Err(invalid(format!("{what} contains a NUL byte")));
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| invalid(format!("{what} is not UTF-8")))
}

/// Reads `u32 length, bytes` and returns the string.
fn length_prefixed(data: &mut Bytes, what: &str) -> Result<String, OptionInvalid> {
    if data.remaining() < 4 {
        return Err(invalid(format!("data ends before the length of the {what}")));
    }
    let length = data.get_u32() as usize;
    if length > data.remaining() {
        return Err(invalid(format!("{what} length {length} runs past the end of the option data")));
    }
    let bytes = data.split_to(length);
    string(&bytes, what)
}

/// INFO and GO: `u32 namelen, name, u16 n, u16 info[n]`, with the total length exact.
fn parse_info_request(mut data: Bytes) -> Result<(String, Vec<u16>), OptionInvalid> {
    let total = data.len();
    if total < 6 {
        return Err(invalid(format!("INFO/GO data is {total} bytes; at least 6 are needed")));
    }
    let name = length_prefixed(&mut data, "export name")?;
    if data.remaining() < 2 {
        return Err(invalid("INFO/GO data ends before the number of information requests"));
    }
    let count = usize::from(data.get_u16());
    if data.remaining() != count * 2 {
        return Err(invalid(format!(
            "INFO/GO announces {count} information requests but carries {} bytes for them",
            data.remaining()
        )));
    }
    let requests = (0..count).map(|_| data.get_u16()).collect();
    Ok((name, requests))
}

/// LIST_META_CONTEXT and SET_META_CONTEXT: `u32 namelen, name, u32 n, {u32 len, query}[n]`.
fn parse_meta_context_request(mut data: Bytes) -> Result<(String, Vec<String>), OptionInvalid> {
    let export = length_prefixed(&mut data, "export name")?;
    if data.remaining() < 4 {
        return Err(invalid("meta context data ends before the number of queries"));
    }
    let count = data.get_u32() as usize;
    // Each query needs at least its 4-byte length, so this bounds the allocation by the data.
    if count > data.remaining() / 4 {
        return Err(invalid(format!("{count} queries cannot fit in {} bytes", data.remaining())));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        queries.push(length_prefixed(&mut data, "meta context query")?);
    }
    if data.has_remaining() {
        return Err(invalid(format!("{} bytes follow the last meta context query", data.remaining())));
    }
    Ok((export, queries))
}

/// One option reply: `u64 magic, u32 option, u32 type, u32 length, data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Bytes,
}

impl OptionReply {
    pub fn new(option: u32, reply_type: u32, data: impl Into<Bytes>) -> OptionReply {
        OptionReply { option, reply_type, data: data.into() }
    }

    /// `NBD_REP_SERVER` for LIST: `u32 namelen, name, description`.
    pub fn server(name: &str, description: &str) -> OptionReply {
        let mut data = BytesMut::with_capacity(4 + name.len() + description.len());
        data.put_u32(name.len() as u32);
        data.put_slice(name.as_bytes());
        data.put_slice(description.as_bytes());
        OptionReply::new(opt::LIST, super::consts::reply_type::SERVER, data.freeze())
    }

    /// `NBD_REP_INFO` with `NBD_INFO_EXPORT`: size and transmission flags (length exactly 12).
    pub fn info_export(option: u32, size: u64, flags: u16) -> OptionReply {
        let mut data = BytesMut::with_capacity(12);
        data.put_u16(info::EXPORT);
        data.put_u64(size);
        data.put_u16(flags);
        OptionReply::new(option, super::consts::reply_type::INFO, data.freeze())
    }

    /// `NBD_REP_INFO` with `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`.
    pub fn info_text(option: u32, info_type: u16, text: &str) -> OptionReply {
        let mut data = BytesMut::with_capacity(2 + text.len());
        data.put_u16(info_type);
        data.put_slice(text.as_bytes());
        OptionReply::new(option, super::consts::reply_type::INFO, data.freeze())
    }

    /// `NBD_REP_INFO` with `NBD_INFO_BLOCK_SIZE` (length exactly 14).
    pub fn info_block_size(option: u32, minimum: u32, preferred: u32, maximum: u32) -> OptionReply {
        let mut data = BytesMut::with_capacity(14);
        data.put_u16(info::BLOCK_SIZE);
        data.put_u32(minimum);
        data.put_u32(preferred);
        data.put_u32(maximum);
        OptionReply::new(option, super::consts::reply_type::INFO, data.freeze())
    }

    /// `NBD_REP_META_CONTEXT`: `u32 id, name`.
    pub fn meta_context(option: u32, id: u32, name: &str) -> OptionReply {
        let mut data = BytesMut::with_capacity(4 + name.len());
        data.put_u32(id);
        data.put_slice(name.as_bytes());
        OptionReply::new(option, super::consts::reply_type::META_CONTEXT, data.freeze())
    }

    pub fn ack(option: u32) -> OptionReply {
        OptionReply::new(option, super::consts::reply_type::ACK, Bytes::new())
    }

    /// An error reply; the message is UTF-8 text for humans, cut to the protocol's 4096 bytes.
    pub fn error(option: u32, reply_type: u32, message: &str) -> OptionReply {
        let mut end = message.len().min(MAX_STRING_LEN);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        OptionReply::new(option, reply_type, Bytes::copy_from_slice(&message.as_bytes()[..end]))
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(20 + self.data.len());
        out.put_u64(OPTION_REPLY_MAGIC);
        out.put_u32(self.option);
        out.put_u32(self.reply_type);
        out.put_u32(self.data.len() as u32);
        out.put_slice(&self.data);
    }

    /// Reads one reply back, for the tests. Returns the reply and the bytes it used.
    #[cfg(test)]
    pub fn decode(bytes: &[u8]) -> Option<(OptionReply, usize)> {
        let mut buf = bytes;
        if buf.len() < 20 || buf.get_u64() != OPTION_REPLY_MAGIC {
            return None;
        }
        let option = buf.get_u32();
        let reply_type = buf.get_u32();
        let length = buf.get_u32() as usize;
        if buf.len() < length {
            return None;
        }
        Some((OptionReply::new(option, reply_type, Bytes::copy_from_slice(&buf[..length])), 20 + length))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::consts::{IHAVEOPT, reply_type};

    #[test]
    fn option_header_round_trips() {
        let header = OptionHeader { magic: IHAVEOPT, code: opt::GO, length: 42 };
        let mut out = BytesMut::new();
        header.encode(&mut out);
        assert_eq!(OptionHeader::decode(out[..].try_into().unwrap()), header);
    }

    #[test]
    fn go_and_info_parse_name_and_requests() {
        let parsed = OptionRequest::parse(opt::GO, info_request_data("disk", &[info::BLOCK_SIZE, info::NAME])).unwrap();
        assert_eq!(parsed, OptionRequest::Go { name: "disk".into(), requests: vec![info::BLOCK_SIZE, info::NAME] });
        let parsed = OptionRequest::parse(opt::INFO, info_request_data("", &[])).unwrap();
        assert_eq!(parsed, OptionRequest::Info { name: String::new(), requests: vec![] });
    }

    #[test]
    fn go_rejects_short_data_and_count_mismatch() {
        assert!(OptionRequest::parse(opt::GO, Bytes::from_static(&[0, 0, 0, 0, 0])).is_err());
        let mut bad = BytesMut::from(&info_request_data("disk", &[1])[..]);
        bad.put_u8(0);
        assert!(OptionRequest::parse(opt::GO, bad.freeze()).unwrap_err().0.contains("announces 1"));
        // Name length past the end of the data.
        let mut lying = BytesMut::new();
        lying.put_u32(100);
        lying.put_slice(b"ab");
        lying.put_u16(0);
        assert!(OptionRequest::parse(opt::GO, lying.freeze()).unwrap_err().0.contains("runs past"));
    }

    #[test]
    fn export_names_must_be_utf8_without_nul_and_bounded() {
        assert!(OptionRequest::parse(opt::EXPORT_NAME, Bytes::from_static(b"a\0b")).is_err());
        assert!(OptionRequest::parse(opt::EXPORT_NAME, Bytes::from_static(&[0xff, 0xfe])).is_err());
        assert!(OptionRequest::parse(opt::EXPORT_NAME, Bytes::from(vec![b'x'; 5000])).is_err());
        assert_eq!(
            OptionRequest::parse(opt::EXPORT_NAME, Bytes::from_static(b"disk")).unwrap(),
            OptionRequest::ExportName { name: "disk".into() }
        );
    }

    #[test]
    fn list_and_structured_reply_refuse_data() {
        assert_eq!(OptionRequest::parse(opt::LIST, Bytes::new()).unwrap(), OptionRequest::List);
        assert!(OptionRequest::parse(opt::LIST, Bytes::from_static(b"x")).is_err());
        assert!(OptionRequest::parse(opt::STRUCTURED_REPLY, Bytes::from_static(b"x")).is_err());
        assert_eq!(OptionRequest::parse(opt::ABORT, Bytes::from_static(b"ignored")).unwrap(), OptionRequest::Abort);
    }

    #[test]
    fn meta_context_requests_parse_and_reject_malformed_lengths() {
        let parsed =
            OptionRequest::parse(opt::SET_META_CONTEXT, meta_context_request_data("disk", &["base:allocation"]))
                .unwrap();
        assert_eq!(
            parsed,
            OptionRequest::SetMetaContext { export: "disk".into(), queries: vec!["base:allocation".into()] }
        );
        let parsed = OptionRequest::parse(opt::LIST_META_CONTEXT, meta_context_request_data("", &[])).unwrap();
        assert_eq!(parsed, OptionRequest::ListMetaContext { export: String::new(), queries: vec![] });
        let mut huge_count = BytesMut::new();
        huge_count.put_u32(0);
        huge_count.put_u32(u32::MAX);
        assert!(OptionRequest::parse(opt::LIST_META_CONTEXT, huge_count.freeze()).is_err());
        let mut trailing = BytesMut::from(&meta_context_request_data("d", &["base:"])[..]);
        trailing.put_u8(7);
        assert!(OptionRequest::parse(opt::LIST_META_CONTEXT, trailing.freeze()).is_err());
    }

    #[test]
    fn unknown_and_later_options_are_unsupported_not_invalid() {
        for code in [opt::EXTENDED_HEADERS, opt::PEEK_EXPORT, 0x0765_4321] {
            assert_eq!(
                OptionRequest::parse(code, Bytes::from_static(b"abcd")).unwrap(),
                OptionRequest::Unsupported { code }
            );
        }
    }

    #[test]
    fn replies_encode_with_exact_lengths() {
        let mut out = BytesMut::new();
        OptionReply::info_export(opt::GO, 1 << 30, 0x0d6d).encode(&mut out);
        assert_eq!(out.len(), 20 + 12);
        let (reply, used) = OptionReply::decode(&out).unwrap();
        assert_eq!((reply.option, reply.reply_type, reply.data.len(), used), (opt::GO, reply_type::INFO, 12, 32));

        let mut out = BytesMut::new();
        OptionReply::info_block_size(opt::GO, 1, 4096, 32 << 20).encode(&mut out);
        assert_eq!(out.len(), 20 + 14);

        let mut out = BytesMut::new();
        OptionReply::server("disk", "a disk").encode(&mut out);
        let (reply, _) = OptionReply::decode(&out).unwrap();
        assert_eq!(&reply.data[..], b"\0\0\0\x04diska disk");
    }

    #[test]
    fn error_messages_are_cut_on_a_character_boundary() {
        let message = "é".repeat(3000);
        let reply = OptionReply::error(opt::GO, reply_type::ERR_UNKNOWN, &message);
        assert!(reply.data.len() <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&reply.data).is_ok());
    }
}
