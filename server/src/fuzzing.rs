//! Entry points for the fuzz targets in `fuzz/`, and for nothing else: they run the handshake
//! and the transmission phase over in-memory streams against small memory exports, so that a
//! coverage-guided fuzzer reaches the option parser, the request decoder and the request path
//! (with or without the fault layer deciding) without sockets. Each call is independent.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nbdfault_policies::{Engine, Policy};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::export::{Export, ExportParts, Exports};
use crate::fault::Clock;
use crate::fault::log::FaultLog;
use crate::handshake::{self, Outcome, Session};
use crate::shutdown::ShutdownController;
use crate::storage::MemoryDevice;
use crate::tls::TlsMode;
use crate::transmission::{self, ConnectionLimits};

/// Size of the fuzzed exports: small, so every offset is near an edge.
const EXPORT_SIZE: u64 = 1 << 20;

/// Faults the transmission target can run under: each fires often and never waits, so runs
/// stay fast. Disconnects end the connection early; power cuts make the server journal.
const POLICY: &str = "seed: 7
rules:
  - { name: errors, when: { op: [write, write_zeroes], probability: 0.2 }, then: { error: EIO } }
  - { name: torn, when: { op: [write, write_zeroes], probability: 0.2 }, then: { torn: { persist: 0..4KiB, align: 512 } } }
  - { name: persisted, when: { op: [write, trim, flush], probability: 0.2 }, then: { error: EIO, persist: true } }
  - { name: lost, when: { op: [write, trim, flush], probability: 0.1 }, then: { drop: true } }
  - { name: corrupt, when: { op: read, probability: 0.3 }, then: { corrupt: 3 } }
  - { name: sticky, when: { op: write, range: 0..64KiB, probability: 0.3 }, then: { error: EIO, sticky: true } }
  - { name: cut, when: { op: [flush, read], probability: 0.05 }, then: { power_cut: true } }
  - { name: gone, when: { op: block_status, probability: 0.05 }, then: { disconnect: true } }
bad_sectors:
  - 512KiB..+4KiB
";

fn exports(policy: bool) -> Exports {
    let engine = policy.then(|| Policy::from_yaml(POLICY, "fuzzing").expect("the fuzzing policy is valid"));
    let export = |name: &str, read_only: bool, engine: Option<Policy>| {
        Export::new(ExportParts {
            name: name.to_string(),
            description: format!("{name} export"),
            storage_spec: format!("memory:{EXPORT_SIZE}"),
            storage: Arc::new(MemoryDevice::new(EXPORT_SIZE)),
            read_only,
            engine: Arc::new(Engine::new(engine)),
            log: Arc::new(FaultLog::in_memory(64)),
            clock: Clock::start(),
        })
    };
    Exports::new([export("", false, None), export("disk", false, engine), export("ro", true, None)])
}

/// The most reply bytes kept for checking; past it the check is skipped.
const OUTPUT_LIMIT: usize = 4 << 20;

/// The client's bytes in, the server's bytes out; reads end at the input's end, writes never
/// block.
struct Memory {
    input: Vec<u8>,
    at: usize,
    output: Vec<u8>,
}

impl AsyncRead for Memory {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let take = buf.remaining().min(self.input.len() - self.at);
        let at = self.at;
        buf.put_slice(&self.input[at..at + take]);
        self.at += take;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Memory {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        // The server's output is not kept beyond a bound: a long run of replies must not grow.
        if self.output.len() <= OUTPUT_LIMIT {
            self.output.extend_from_slice(buf);
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime")
}

/// The handshake: `input[0]` picks the TLS mode (off, on, require), the rest is what the client
/// sends. After STARTTLS the handshake goes on over the same bytes (the fuzzer cannot speak TLS;
/// what follows the upgrade is the same state machine). A handshake that reaches transmission
/// serves the rest of the input as requests.
pub fn handshake(input: &[u8]) {
    let Some((&mode, client)) = input.split_first() else { return };
    let tls = [TlsMode::Off, TlsMode::On, TlsMode::Require][mode as usize % 3];
    let exports = exports(false);
    let mut stream = Memory { input: client.to_vec(), at: 0, output: Vec::new() };
    runtime().block_on(async {
        let mut outcome = handshake::negotiate(&mut stream, &exports, tls).await;
        if let Ok(Outcome::StartTls(resume)) = outcome {
            outcome = handshake::resume(&mut stream, &exports, resume).await;
        }
        if let Ok(Outcome::Transmission(session)) = outcome {
            let rest = stream.input[stream.at..].to_vec();
            serve(session, rest).await;
        }
    });
}

/// The transmission phase: `input[0]` picks the export (plain, under a fault policy, read-only),
/// structured replies and `base:allocation`; the rest is the request stream.
pub fn transmission(input: &[u8]) {
    let Some((&choice, requests)) = input.split_first() else { return };
    let exports = exports(true);
    let name = ["", "disk", "ro"][(choice & 3) as usize % 3];
    let export = Arc::clone(exports.get(name).expect("the export exists"));
    let structured_replies = choice & 4 != 0;
    let session = Session {
        flags: export.transmission_flags(structured_replies),
        export,
        structured_replies,
        meta_context: structured_replies && choice & 8 != 0,
        power_cycle: 0,
    };
    runtime().block_on(serve(session, requests.to_vec()));
}

/// The reply side, shared so the output can be checked after `serve` has consumed it.
struct Sink(Arc<std::sync::Mutex<Memory>>);

impl AsyncWrite for Sink {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let mut memory = self.0.lock().expect("the sink is not poisoned");
        Pin::new(&mut *memory).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves `requests` as one connection, then checks that the replies are framed as the protocol
/// says: a panic (which the fuzzer reports) when they are not.
async fn serve(session: Session, requests: Vec<u8>) {
    let structured = session.structured_replies;
    let controller = ShutdownController::new();
    let sent = Requests::parse(&requests);
    let reader = Memory { input: requests, at: 0, output: Vec::new() };
    let output = Arc::new(std::sync::Mutex::new(Memory { input: Vec::new(), at: 0, output: Vec::new() }));
    let memory = Arc::new(tokio::sync::Semaphore::new(crate::config::DEFAULT_MEMORY_BUDGET as usize));
    let limits = ConnectionLimits { max_in_flight: 64 << 20, memory };
    let _ = transmission::serve(reader, Sink(Arc::clone(&output)), session, 1, limits, controller.handle()).await;
    let replies = std::mem::take(&mut output.lock().expect("the sink is not poisoned").output);
    if let Some(sent) = sent
        && replies.len() <= OUTPUT_LIMIT
        && let Err(problem) = check_replies(&sent, structured, &replies)
    {
        panic!("the server's replies are out of frame: {problem}");
    }
}

/// The requests of a stream as the server reads them: cookie to (command, length). `None` when
/// two requests share a cookie (the replies cannot be told apart then).
struct Requests(std::collections::HashMap<u64, (u16, u32)>);

impl Requests {
    fn parse(mut bytes: &[u8]) -> Option<Requests> {
        use crate::transmission::reader::MAX_DRAIN;
        use crate::wire::command;
        let mut requests = std::collections::HashMap::new();
        while bytes.len() >= crate::wire::request::REQUEST_HEADER_LEN {
            let header = crate::wire::request::RequestHeader::decode(
                bytes[..crate::wire::request::REQUEST_HEADER_LEN].try_into().expect("length checked"),
            );
            bytes = &bytes[crate::wire::request::REQUEST_HEADER_LEN..];
            if header.magic != crate::wire::REQUEST_MAGIC
                || (header.kind == command::WRITE && header.length > MAX_DRAIN)
            {
                break;
            }
            let payload = if header.kind == command::WRITE { header.length as usize } else { 0 };
            if payload > bytes.len() {
                break;
            }
            bytes = &bytes[payload..];
            if requests.insert(header.cookie, (header.kind, header.length)).is_some() {
                return None;
            }
            if header.kind == command::DISC {
                break;
            }
        }
        Some(Requests(requests))
    }
}

/// Walks the reply stream: every reply starts with a reply magic, names a cookie that was sent,
/// carries a READ's data only on success, uses chunks for READ when structured replies are on,
/// and ends where the stream does; no reply follows a cookie's last one.
fn check_replies(sent: &Requests, structured: bool, out: &[u8]) -> Result<(), String> {
    use crate::wire::{SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, command};
    let be32 = |at: usize| u32::from_be_bytes(out[at..at + 4].try_into().expect("4 bytes"));
    let be64 = |at: usize| u64::from_be_bytes(out[at..at + 8].try_into().expect("8 bytes"));
    let mut finished = std::collections::HashSet::new();
    let mut at = 0;
    while at < out.len() {
        if out.len() - at < 16 {
            return Err(format!("{} bytes at {at} are not a whole reply header", out.len() - at));
        }
        let magic = be32(at);
        let cookie = be64(at + 8);
        let Some(&(kind, length)) = sent.0.get(&cookie) else {
            return Err(format!("a reply at {at} for cookie {cookie:#x}, which no request had"));
        };
        if finished.contains(&cookie) {
            return Err(format!("a reply for cookie {cookie:#x} at {at}, after its last one"));
        }
        match magic {
            SIMPLE_REPLY_MAGIC => {
                if structured && kind == command::READ {
                    return Err(format!("a simple reply to READ {cookie:#x} with structured replies on"));
                }
                let error = be32(at + 4);
                finished.insert(cookie);
                at += 16;
                if kind == command::READ && error == 0 {
                    at += length as usize;
                }
            }
            STRUCTURED_REPLY_MAGIC if structured => {
                if out.len() - at < 20 {
                    return Err(format!("a chunk header at {at} is cut short"));
                }
                let flags = u16::from_be_bytes([out[at + 4], out[at + 5]]);
                at += 20 + be32(at + 16) as usize;
                // Chunks of one reply share the cookie; DONE ends it.
                if flags & 1 != 0 {
                    finished.insert(cookie);
                }
            }
            other => return Err(format!("reply magic {other:#x} at {at}")),
        }
    }
    if at > out.len() {
        Err(format!("the last reply runs {} bytes past the end of the stream", at - out.len()))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::option::info_request_data;

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut bytes = crate::wire::IHAVEOPT.to_be_bytes().to_vec();
        bytes.extend_from_slice(&code.to_be_bytes());
        bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    }

    #[test]
    fn a_handshake_into_transmission_serves_the_rest_of_the_input() {
        let mut input = vec![1, 0, 0, 0, 3];
        input.extend(option(crate::wire::opt::STARTTLS, &[]));
        input.extend(option(crate::wire::opt::GO, &info_request_data("disk", &[])));
        // A WRITE of 4 bytes, then DISC.
        input.extend(crate::wire::REQUEST_MAGIC.to_be_bytes());
        input.extend([0, 0, 0, 1]);
        input.extend([0; 8]);
        input.extend(4096u64.to_be_bytes());
        input.extend(4u32.to_be_bytes());
        input.extend(b"data");
        handshake(&input);
        handshake(&[]);
        handshake(&[2]);
    }

    #[test]
    fn the_reply_check_finds_frames_that_are_off() {
        let mut sent = std::collections::HashMap::new();
        sent.insert(1, (crate::wire::command::READ, 4));
        sent.insert(2, (crate::wire::command::WRITE, 4));
        let sent = Requests(sent);
        let simple = |error: u32, cookie: u64| {
            let mut bytes = crate::wire::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            bytes.extend(error.to_be_bytes());
            bytes.extend(cookie.to_be_bytes());
            bytes
        };
        let good = [simple(0, 2), simple(0, 1), b"data".to_vec()].concat();
        assert_eq!(check_replies(&sent, false, &good), Ok(()));
        assert!(check_replies(&sent, false, &good[..good.len() - 1]).is_err(), "READ data cut short");
        assert!(check_replies(&sent, false, &[simple(0, 2), simple(0, 2)].concat()).is_err(), "twice");
        assert!(check_replies(&sent, false, &simple(0, 3)).is_err(), "unknown cookie");
        assert!(check_replies(&sent, true, &simple(5, 1)).is_err(), "simple READ reply when structured");
        assert_eq!(check_replies(&sent, false, &simple(5, 1)), Ok(()), "an error READ has no data");
    }

    /// The committed seeds, and every input a fuzzer once crashed on (kept beside them), replayed.
    #[test]
    fn every_committed_fuzz_input_runs_clean() {
        let seeds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds");
        for (target, run) in [("handshake", handshake as fn(&[u8])), ("transmission", transmission)] {
            let mut count = 0;
            for entry in std::fs::read_dir(seeds.join(target)).expect("the seeds are committed") {
                let path = entry.expect("a directory entry").path();
                run(&std::fs::read(&path).expect("a seed"));
                count += 1;
            }
            assert!(count > 0, "no seeds for {target}");
        }
    }

    #[test]
    fn the_transmission_target_takes_any_bytes() {
        for choice in 0..16u8 {
            transmission(&[choice]);
            transmission(&[choice, 0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0]);
        }
    }
}
