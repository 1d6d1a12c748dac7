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
        if self.output.len() < 1 << 20 {
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
    };
    runtime().block_on(serve(session, requests.to_vec()));
}

async fn serve(session: Session, requests: Vec<u8>) {
    let controller = ShutdownController::new();
    let reader = Memory { input: requests, at: 0, output: Vec::new() };
    let writer = Memory { input: Vec::new(), at: 0, output: Vec::new() };
    let memory = Arc::new(tokio::sync::Semaphore::new(crate::config::DEFAULT_MEMORY_BUDGET as usize));
    let limits = ConnectionLimits { max_in_flight: 64 << 20, memory };
    let _ = transmission::serve(reader, writer, session, 1, limits, controller.handle()).await;
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
    fn the_transmission_target_takes_any_bytes() {
        for choice in 0..16u8 {
            transmission(&[choice]);
            transmission(&[choice, 0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0]);
        }
    }
}
