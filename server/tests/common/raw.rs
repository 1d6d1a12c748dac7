//! A raw NBD client over `std::net::TcpStream`, for what real clients never send. Its constants
//! and layouts are written out from the protocol document, not taken from the server's code, so
//! a mistake in the server's codec cannot hide itself.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const FLAG_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_NO_ZEROES: u32 = 2;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1;
pub const CMD_FLAG_NO_HOLE: u16 = 2;
pub const CMD_FLAG_DF: u16 = 4;
pub const CMD_FLAG_REQ_ONE: u16 = 8;
pub const CMD_FLAG_FAST_ZERO: u16 = 0x10;

pub const HAS_FLAGS: u16 = 1;
pub const READ_ONLY: u16 = 2;
pub const SEND_FLUSH: u16 = 4;
pub const SEND_FUA: u16 = 8;
pub const SEND_TRIM: u16 = 0x20;
pub const SEND_WRITE_ZEROES: u16 = 0x40;
pub const SEND_DF: u16 = 0x80;
pub const SEND_CACHE: u16 = 0x400;

/// `base:allocation` extent flags.
pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// How long a raw client waits for the server before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub struct RawClient {
    pub stream: TcpStream,
}

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// One structured reply chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub flags: u16,
    pub chunk_type: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

/// What a negotiated export looks like.
#[derive(Debug, Clone, Copy)]
pub struct Attached {
    pub size: u64,
    pub flags: u16,
}

impl RawClient {
    pub fn connect(address: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(address).unwrap_or_else(|e| panic!("connect to {address}: {e}"));
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        RawClient { stream }
    }

    /// Reads the 18-byte greeting and returns the handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let greeting = self.read_exact_vec(18);
        assert_eq!(u64_at(&greeting, 0), NBDMAGIC, "greeting starts with NBDMAGIC");
        assert_eq!(u64_at(&greeting, 8), IHAVEOPT, "greeting has IHAVEOPT");
        u16::from_be_bytes([greeting[16], greeting[17]])
    }

    /// Greeting, then client flags.
    pub fn start(address: SocketAddr, client_flags: u32) -> RawClient {
        let mut client = RawClient::connect(address);
        assert_eq!(client.read_greeting(), 3, "the server offers FIXED_NEWSTYLE | NO_ZEROES");
        client.send(&client_flags.to_be_bytes());
        client
    }

    /// A connection in transmission on `export`, with or without structured replies (and with
    /// `base:allocation` when structured).
    pub fn attach(address: SocketAddr, export: &str, structured: bool) -> (RawClient, Attached) {
        let mut client = RawClient::start(address, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        if structured {
            client.send_option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(client.read_option_reply().reply_type, REP_ACK, "STRUCTURED_REPLY is acked");
            client.send_option(OPT_SET_META_CONTEXT, &meta_context_data(export, &["base:allocation"]));
            assert_eq!(client.read_option_reply().reply_type, REP_META_CONTEXT);
            assert_eq!(client.read_option_reply().reply_type, REP_ACK);
        }
        let attached = client.go(export);
        (client, attached)
    }

    /// GO on `export`; returns the size and flags from NBD_INFO_EXPORT.
    pub fn go(&mut self, export: &str) -> Attached {
        self.send_option(OPT_GO, &info_data(export, &[]));
        let mut attached = None;
        loop {
            let reply = self.read_option_reply();
            assert_eq!(reply.option, OPT_GO);
            match reply.reply_type {
                REP_INFO => {
                    if u16::from_be_bytes([reply.data[0], reply.data[1]]) == INFO_EXPORT {
                        assert_eq!(reply.data.len(), 12, "NBD_INFO_EXPORT is exactly 12 bytes");
                        attached = Some(Attached {
                            size: u64_at(&reply.data, 2),
                            flags: u16::from_be_bytes([reply.data[10], reply.data[11]]),
                        });
                    }
                }
                REP_ACK => break,
                other => panic!("GO {export:?} got reply type {other:#x}: {:?}", String::from_utf8_lossy(&reply.data)),
            }
        }
        attached.expect("GO sent NBD_INFO_EXPORT")
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("sending to the server");
    }

    /// Sends, tolerating a server that already closed the connection.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn send_option(&mut self, code: u32, data: &[u8]) {
        let mut bytes = Vec::with_capacity(16 + data.len());
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        self.send(&bytes);
    }

    pub fn read_option_reply(&mut self) -> OptionReply {
        let header = self.read_exact_vec(20);
        assert_eq!(u64_at(&header, 0), OPTION_REPLY_MAGIC, "option reply magic");
        let length = u32_at(&header, 16) as usize;
        OptionReply { option: u32_at(&header, 8), reply_type: u32_at(&header, 12), data: self.read_exact_vec(length) }
    }

    /// Sends, returning the error instead of failing the test (the server may have closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads exactly `length` bytes, returning the error (EOF, reset) instead of failing the test.
    pub fn try_read_exact(&mut self, length: usize) -> std::io::Result<Vec<u8>> {
        let mut bytes = vec![0u8; length];
        self.stream.read_exact(&mut bytes)?;
        Ok(bytes)
    }

    pub fn read_exact_vec(&mut self, length: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; length];
        self.stream.read_exact(&mut bytes).unwrap_or_else(|e| panic!("reading {length} bytes from the server: {e}"));
        bytes
    }

    /// A request header, with the payload of a WRITE after it.
    pub fn request(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(28);
        bytes.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&kind.to_be_bytes());
        bytes.extend_from_slice(&cookie.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes
    }

    pub fn send_request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        self.send(&RawClient::request(flags, kind, cookie, offset, length));
    }

    pub fn send_write(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut bytes = RawClient::request(flags, CMD_WRITE, cookie, offset, data.len() as u32);
        bytes.extend_from_slice(data);
        self.send(&bytes);
    }

    /// Reads a simple reply header: `(error, cookie)`.
    pub fn read_simple_reply(&mut self) -> (u32, u64) {
        let header = self.read_exact_vec(16);
        assert_eq!(u32_at(&header, 0), SIMPLE_REPLY_MAGIC, "simple reply magic in {header:02x?}");
        (u32_at(&header, 4), u64_at(&header, 8))
    }

    pub fn read_chunk(&mut self) -> Chunk {
        let header = self.read_exact_vec(20);
        assert_eq!(u32_at(&header, 0), STRUCTURED_REPLY_MAGIC, "structured reply magic in {header:02x?}");
        let length = u32_at(&header, 16) as usize;
        Chunk {
            flags: u16::from_be_bytes([header[4], header[5]]),
            chunk_type: u16::from_be_bytes([header[6], header[7]]),
            cookie: u64_at(&header, 8),
            payload: self.read_exact_vec(length),
        }
    }

    /// The chunks of one structured reply, up to and including the one flagged DONE. Fails the
    /// test if a chunk of another request comes in between.
    pub fn read_structured_reply(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut chunks = Vec::new();
        loop {
            let chunk = self.read_chunk();
            assert_eq!(chunk.cookie, cookie, "a chunk of another request in the middle of {cookie}'s reply");
            let done = chunk.flags & REPLY_FLAG_DONE != 0;
            chunks.push(chunk);
            if done {
                return chunks;
            }
        }
    }

    /// The error of a reply to a request without data: a simple reply, or (structured) chunks
    /// ending with DONE.
    pub fn read_reply_errno(&mut self, cookie: u64) -> u32 {
        let mut magic = [0u8; 4];
        self.stream.peek(&mut magic).unwrap();
        if u32::from_be_bytes(magic) == SIMPLE_REPLY_MAGIC {
            let (error, got) = self.read_simple_reply();
            assert_eq!(got, cookie);
            return error;
        }
        let mut error = 0;
        for chunk in self.read_structured_reply(cookie) {
            if chunk.chunk_type & 0x8000 != 0 {
                error = u32_at(&chunk.payload, 0);
            }
        }
        error
    }

    /// A write on a simple-reply connection that must succeed.
    pub fn write_ok(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.send_write(0, cookie, offset, data);
        assert_eq!(self.read_simple_reply(), (0, cookie), "WRITE at {offset} succeeds");
    }

    /// A read on a simple-reply connection that must succeed.
    pub fn read_ok(&mut self, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        self.send_request(0, CMD_READ, cookie, offset, length);
        assert_eq!(self.read_simple_reply(), (0, cookie), "READ at {offset} succeeds");
        self.read_exact_vec(length as usize)
    }

    /// Sends DISC; the server closes without a reply.
    pub fn disconnect(mut self) {
        self.send_request(0, CMD_DISC, 0, 0, 0);
        assert!(self.closed_by_server(), "the server closes the connection after DISC");
    }

    /// True when the server has closed the connection (EOF or reset) before `IO_TIMEOUT`, with
    /// no more bytes sent. Bytes that arrive instead fail the test.
    pub fn closed_by_server(&mut self) -> bool {
        let deadline = Instant::now() + IO_TIMEOUT;
        let mut buffer = [0u8; 4096];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return true,
                Ok(n) => panic!("expected the server to close the connection, got {n} bytes: {:02x?}", &buffer[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return true,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if Instant::now() > deadline {
                        return false;
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading from the server: {e}"),
            }
        }
    }

    /// Reads and throws away whatever arrives until the server closes the connection.
    pub fn read_until_closed(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            match self.stream.read(&mut buffer) {
                Ok(0) => return all,
                Ok(n) => all.extend_from_slice(&buffer[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => return all,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("reading from the server: {e}"),
            }
        }
    }
}

/// INFO/GO data: `u32 namelen, name, u16 n, u16 info[n]`.
pub fn info_data(export: &str, requests: &[u16]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for request in requests {
        data.extend_from_slice(&request.to_be_bytes());
    }
    data
}

/// LIST_META_CONTEXT / SET_META_CONTEXT data.
pub fn meta_context_data(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = Vec::new();
    data.extend_from_slice(&(export.len() as u32).to_be_bytes());
    data.extend_from_slice(export.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}

pub fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap())
}

pub fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
}

pub fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_be_bytes(bytes[at..at + 2].try_into().unwrap())
}
