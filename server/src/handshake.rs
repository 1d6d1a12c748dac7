//! The fixed-newstyle handshake: greeting, client flags, and options until the client picks an
//! export (GO or EXPORT_NAME) or leaves.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{Export, Exports};
use crate::tls::TlsMode;
use crate::wire::option::{OPTION_HEADER_LEN, OptionHeader, OptionReply, OptionRequest};
use crate::wire::request::MAX_PAYLOAD;
use crate::wire::{
    BASE_ALLOCATION, BASE_ALLOCATION_ID, IHAVEOPT, NBDMAGIC, client_flags, handshake_flags, info, opt, reply_type,
};

/// Options one client may send before it is disconnected (a denial-of-service bound).
pub const MAX_OPTIONS: usize = 128;
/// The largest option data accepted; real options are a few hundred bytes at most.
pub const MAX_OPTION_DATA: u32 = 1 << 20;

/// What a client negotiated, carried into the transmission phase.
#[derive(Clone)]
pub struct Session {
    pub export: Arc<Export>,
    pub structured_replies: bool,
    /// `base:allocation` was selected for this export.
    pub meta_context: bool,
    pub flags: u16,
    /// The export's power cycle when the client attached: a power cut ends it, and the
    /// connection with it.
    pub power_cycle: u64,
}

/// How a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("client flags {0:#x} include bits the server did not offer")]
    BadClientFlags(u32),
    #[error("option magic {0:#x} is not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("option {code} carries {length} bytes, over the {MAX_OPTION_DATA} byte limit")]
    OptionTooLarge { code: u32, length: u32 },
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    #[error("option {0} needs fixed newstyle, which the client did not accept")]
    NotFixedNewstyle(u32),
    #[error("EXPORT_NAME asked for {0:?}, which is powered off after a power cut (this option cannot report errors)")]
    PoweredOff(String),
    #[error("EXPORT_NAME asked for {0:?}, which does not exist (this option cannot report errors)")]
    UnknownExport(String),
    #[error("TLS handshake after STARTTLS failed: {0}")]
    Tls(std::io::Error),
    #[error("EXPORT_NAME before STARTTLS, and this server requires TLS (this option cannot report errors)")]
    TlsRequired,
}

/// Ended: the client chose an export, left with ABORT, or asked for TLS.
pub enum Outcome {
    Transmission(Session),
    Aborted,
    /// STARTTLS was acknowledged in plain text: the caller runs the TLS handshake on the same
    /// socket, then continues with [`resume`] on the TLS stream.
    StartTls(Resume),
}

/// What survives STARTTLS: everything else negotiated before it is discarded, as the protocol
/// demands.
#[derive(Debug, Clone, Copy)]
pub struct Resume {
    no_zeroes: bool,
    /// Options the client has sent so far, counted against [`MAX_OPTIONS`].
    options: usize,
}

/// Runs the handshake on `stream` against `exports`, offering TLS as `tls` says.
pub async fn negotiate<S>(stream: &mut S, exports: &Exports, tls: TlsMode) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBDMAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
    stream.write_all(&greeting).await?;

    let client = stream.read_u32().await?;
    if client & !(client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES) != 0 {
        return Err(HandshakeError::BadClientFlags(client));
    }
    let state = Negotiation::new(
        exports,
        tls,
        client & client_flags::FIXED_NEWSTYLE != 0,
        client & client_flags::NO_ZEROES != 0,
        false,
    );
    options(stream, state, 0).await
}

/// Continues the handshake on the TLS stream after STARTTLS, with nothing negotiated yet but
/// the client flags.
pub async fn resume<S>(stream: &mut S, exports: &Exports, resume: Resume) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let state = Negotiation::new(exports, TlsMode::Require, true, resume.no_zeroes, true);
    options(stream, state, resume.options).await
}

/// Reads and answers options until one ends the handshake.
async fn options<S>(stream: &mut S, mut state: Negotiation<'_>, sent: usize) -> Result<Outcome, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for count in sent..MAX_OPTIONS {
        let mut header = [0u8; OPTION_HEADER_LEN];
        stream.read_exact(&mut header).await?;
        let header = OptionHeader::decode(&header);
        if header.magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(header.magic));
        }
        if header.length > MAX_OPTION_DATA {
            return Err(HandshakeError::OptionTooLarge { code: header.code, length: header.length });
        }
        let mut data = vec![0u8; header.length as usize];
        stream.read_exact(&mut data).await?;
        if !state.fixed && header.code != opt::EXPORT_NAME {
            return Err(HandshakeError::NotFixedNewstyle(header.code));
        }
        tracing::debug!(option = opt::name(header.code), length = header.length, tls = state.tls_active, "option");
        let mut out = BytesMut::new();
        let step = state.handle(header.code, Bytes::from(data), &mut out)?;
        if !out.is_empty() {
            match stream.write_all(&out).await {
                Ok(()) => {}
                // nbd-client -l sends ABORT and closes without reading the ACK.
                Err(_) if matches!(step, Step::Abort) => return Ok(Outcome::Aborted),
                Err(error) => return Err(error.into()),
            }
        }
        match step {
            Step::Continue => {}
            Step::Abort => return Ok(Outcome::Aborted),
            Step::Transmission(session) => return Ok(Outcome::Transmission(session)),
            Step::StartTls => {
                stream.flush().await?;
                return Ok(Outcome::StartTls(Resume { no_zeroes: state.no_zeroes, options: count + 1 }));
            }
        }
    }
    Err(HandshakeError::TooManyOptions)
}

enum Step {
    Continue,
    Abort,
    Transmission(Session),
    StartTls,
}

struct Negotiation<'a> {
    exports: &'a Exports,
    tls: TlsMode,
    /// STARTTLS has happened: this is the TLS stream.
    tls_active: bool,
    fixed: bool,
    no_zeroes: bool,
    structured_replies: bool,
    /// The export `base:allocation` was selected for, if it was.
    meta_context_export: Option<String>,
    listed: bool,
}

impl<'a> Negotiation<'a> {
    fn new(exports: &'a Exports, tls: TlsMode, fixed: bool, no_zeroes: bool, tls_active: bool) -> Self {
        Negotiation {
            exports,
            tls,
            tls_active,
            fixed,
            no_zeroes,
            structured_replies: false,
            meta_context_export: None,
            listed: false,
        }
    }

    /// Handles one option, appending its replies to `out`.
    fn handle(&mut self, code: u32, data: Bytes, out: &mut BytesMut) -> Result<Step, HandshakeError> {
        let reply = |out: &mut BytesMut, reply: OptionReply| reply.encode(out);
        // FORCEDTLS: before STARTTLS, only STARTTLS and ABORT are answered; the rest, whatever
        // their data, get ERR_TLS_REQD, and EXPORT_NAME (which cannot fail) ends the connection.
        if self.tls == TlsMode::Require && !self.tls_active && code != opt::STARTTLS && code != opt::ABORT {
            if code == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            let message = "this server requires TLS: send STARTTLS first (nbds:// URIs for libnbd, \
                           tls-creds for qemu, -enable-tls for nbd-client)";
            reply(out, OptionReply::error(code, reply_type::ERR_TLS_REQD, message));
            return Ok(Step::Continue);
        }
        let request = match OptionRequest::parse(code, data) {
            Ok(request) => request,
            Err(invalid) => {
                reply(out, OptionReply::error(code, reply_type::ERR_INVALID, &invalid.0));
                return Ok(Step::Continue);
            }
        };
        match request {
            OptionRequest::ExportName { name } => {
                let Some(export) = self.exports.get(&name) else {
                    return Err(HandshakeError::UnknownExport(name));
                };
                let Some(session) = self.session(export, &name) else {
                    return Err(HandshakeError::PoweredOff(name));
                };
                out.put_u64(export.size());
                out.put_u16(session.flags);
                if !self.no_zeroes {
                    out.put_bytes(0, 124);
                }
                return Ok(Step::Transmission(session));
            }
            OptionRequest::Abort => {
                reply(out, OptionReply::ack(code));
                return Ok(Step::Abort);
            }
            OptionRequest::StartTls => {
                if self.tls_active {
                    reply(out, OptionReply::error(code, reply_type::ERR_INVALID, "TLS is already on"));
                } else if self.tls == TlsMode::Off {
                    let message = "TLS is off on this server (it is started with --tls on or --tls require)";
                    reply(out, OptionReply::error(code, reply_type::ERR_POLICY, message));
                } else {
                    reply(out, OptionReply::ack(code));
                    return Ok(Step::StartTls);
                }
            }
            OptionRequest::List => {
                if self.listed {
                    reply(out, OptionReply::error(code, reply_type::ERR_INVALID, "LIST was already sent"));
                } else {
                    self.listed = true;
                    for export in self.exports.iter() {
                        reply(out, OptionReply::server(&export.name, &export.description));
                    }
                    reply(out, OptionReply::ack(code));
                }
            }
            OptionRequest::Info { name, requests } | OptionRequest::Go { name, requests } => {
                let Some(export) = self.exports.get(&name) else {
                    let message = format!("no export named {name:?}; this server has {}", self.exports.names());
                    reply(out, OptionReply::error(code, reply_type::ERR_UNKNOWN, &message));
                    return Ok(Step::Continue);
                };
                // A device without power is gone from the bus: not available, as an unknown one.
                let Some(session) = self.session(export, &name) else {
                    let message = export.power().refusal(&export.name).unwrap_or_default();
                    reply(out, OptionReply::error(code, reply_type::ERR_UNKNOWN, &message));
                    return Ok(Step::Continue);
                };
                // NBD_INFO_EXPORT goes out whether asked for or not: qemu never asks but needs it.
                reply(out, OptionReply::info_export(code, export.size(), session.flags));
                let mut sent = Vec::new();
                for &requested in &requests {
                    if sent.contains(&requested) {
                        continue;
                    }
                    sent.push(requested);
                    match requested {
                        info::NAME => reply(out, OptionReply::info_text(code, info::NAME, &export.name)),
                        info::DESCRIPTION if !export.description.is_empty() => {
                            reply(out, OptionReply::info_text(code, info::DESCRIPTION, &export.description))
                        }
                        // Byte-granular I/O is accepted; 4 KiB is what the storage likes best.
                        info::BLOCK_SIZE => reply(out, OptionReply::info_block_size(code, 1, 4096, MAX_PAYLOAD)),
                        _ => {}
                    }
                }
                reply(out, OptionReply::ack(code));
                if code == opt::GO {
                    return Ok(Step::Transmission(session));
                }
            }
            OptionRequest::StructuredReply => {
                if self.structured_replies {
                    reply(out, OptionReply::error(code, reply_type::ERR_INVALID, "structured replies are already on"));
                } else {
                    self.structured_replies = true;
                    reply(out, OptionReply::ack(code));
                }
            }
            OptionRequest::ListMetaContext { export, queries } => {
                if self.exports.get(&export).is_none() {
                    let message = format!("no export named {export:?}; this server has {}", self.exports.names());
                    reply(out, OptionReply::error(code, reply_type::ERR_UNKNOWN, &message));
                    return Ok(Step::Continue);
                }
                // No queries lists everything; `base:` matches every context in the namespace.
                if queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:") {
                    reply(out, OptionReply::meta_context(code, 0, BASE_ALLOCATION));
                }
                reply(out, OptionReply::ack(code));
            }
            OptionRequest::SetMetaContext { export, queries } => {
                // SET replaces any earlier selection, even when it fails.
                self.meta_context_export = None;
                if !self.structured_replies {
                    let message = "SET_META_CONTEXT needs STRUCTURED_REPLY first";
                    reply(out, OptionReply::error(code, reply_type::ERR_INVALID, message));
                    return Ok(Step::Continue);
                }
                if self.exports.get(&export).is_none() {
                    let message = format!("no export named {export:?}; this server has {}", self.exports.names());
                    reply(out, OptionReply::error(code, reply_type::ERR_UNKNOWN, &message));
                    return Ok(Step::Continue);
                }
                if queries.iter().any(|q| q == BASE_ALLOCATION) {
                    reply(out, OptionReply::meta_context(code, BASE_ALLOCATION_ID, BASE_ALLOCATION));
                    self.meta_context_export = Some(export);
                }
                reply(out, OptionReply::ack(code));
            }
            OptionRequest::Unsupported { code } => {
                let message = format!("option {} ({code}) is not supported by this server", opt::name(code));
                reply(out, OptionReply::error(code, reply_type::ERR_UNSUP, &message));
            }
        }
        Ok(Step::Continue)
    }

    /// The session a client attaching to `export` now gets; `None` while the export is powered
    /// off.
    fn session(&self, export: &Arc<Export>, name: &str) -> Option<Session> {
        Some(Session {
            export: Arc::clone(export),
            structured_replies: self.structured_replies,
            // Meta contexts are only valid for the export they were selected on.
            meta_context: self.meta_context_export.as_deref() == Some(name),
            flags: export.transmission_flags(self.structured_replies),
            power_cycle: export.power().admits()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::ExportParts;
    use crate::wire::consts::transmission_flags;
    use crate::wire::option::{info_request_data, meta_context_request_data};
    use tokio::io::duplex;

    fn exports() -> Exports {
        let mut default = ExportParts::memory("", 1 << 20, false);
        default.description = "default".into();
        let mut disk = ExportParts::memory("disk", 1 << 20, false);
        disk.description = "the disk".into();
        Exports::new([Export::new(default), Export::new(disk)])
    }

    fn option_bytes(code: u32, data: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        OptionHeader { magic: IHAVEOPT, code, length: data.len() as u32 }.encode(&mut out);
        out.put_slice(data);
        out.to_vec()
    }

    fn go_data(name: &str, requests: &[u16]) -> Vec<u8> {
        info_request_data(name, requests).to_vec()
    }

    /// Runs a handshake with the given client bytes; returns the outcome and what the server sent.
    async fn run(client_flags: u32, options: &[Vec<u8>]) -> (Result<Outcome, HandshakeError>, Vec<u8>) {
        run_with(TlsMode::Off, client_flags, options).await
    }

    async fn run_with(
        tls: TlsMode,
        client_flags: u32,
        options: &[Vec<u8>],
    ) -> (Result<Outcome, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = duplex(1 << 20);
        let mut input = client_flags.to_be_bytes().to_vec();
        for option in options {
            input.extend_from_slice(option);
        }
        client.write_all(&input).await.unwrap();
        let exports = exports();
        let outcome = negotiate(&mut server, &exports, tls).await;
        drop(server);
        let mut sent = Vec::new();
        client.read_to_end(&mut sent).await.unwrap();
        (outcome, sent)
    }

    /// The option replies after the 18-byte greeting.
    fn replies(sent: &[u8]) -> Vec<OptionReply> {
        replies_after_tls(&sent[18..])
    }

    #[tokio::test]
    async fn greeting_offers_fixed_newstyle_and_no_zeroes() {
        let (_, sent) = run(3, &[option_bytes(opt::ABORT, &[])]).await;
        assert_eq!(&sent[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&sent[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(&sent[16..18], &[0, 3]);
    }

    #[tokio::test]
    async fn unknown_client_flags_drop_the_connection() {
        let (outcome, _) = run(4, &[]).await;
        assert!(matches!(outcome, Err(HandshakeError::BadClientFlags(4))));
    }

    #[tokio::test]
    async fn go_sends_export_info_then_ack_and_enters_transmission() {
        let (outcome, sent) = run(3, &[option_bytes(opt::GO, &go_data("disk", &[]))]).await;
        let Ok(Outcome::Transmission(session)) = outcome else { panic!("no transmission") };
        assert_eq!(session.export.name, "disk");
        let replies = replies(&sent);
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[0].reply_type, reply_type::INFO);
        assert_eq!(replies[0].data.len(), 12);
        assert_eq!(replies[1].reply_type, reply_type::ACK);
        assert_ne!(session.flags & transmission_flags::HAS_FLAGS, 0);
    }

    #[tokio::test]
    async fn info_answers_requested_name_description_and_block_size() {
        let requests = [info::BLOCK_SIZE, info::NAME, info::DESCRIPTION];
        let (outcome, sent) =
            run(3, &[option_bytes(opt::INFO, &go_data("disk", &requests)), option_bytes(opt::ABORT, &[])]).await;
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
        let types: Vec<u16> = replies(&sent)
            .iter()
            .filter(|r| r.reply_type == reply_type::INFO)
            .map(|r| u16::from_be_bytes([r.data[0], r.data[1]]))
            .collect();
        assert_eq!(types, vec![info::EXPORT, info::BLOCK_SIZE, info::NAME, info::DESCRIPTION]);
    }

    #[tokio::test]
    async fn unknown_export_in_go_gets_err_unknown_and_the_handshake_goes_on() {
        let (outcome, sent) =
            run(3, &[option_bytes(opt::GO, &go_data("nope", &[])), option_bytes(opt::GO, &go_data("", &[]))]).await;
        let Ok(Outcome::Transmission(session)) = outcome else { panic!("no transmission") };
        assert_eq!(session.export.name, "");
        let replies = replies(&sent);
        assert_eq!(replies[0].reply_type, reply_type::ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&replies[0].data).contains("\"disk\""));
    }

    #[tokio::test]
    async fn export_name_pads_with_zeroes_only_without_no_zeroes() {
        let (outcome, sent) = run(1, &[option_bytes(opt::EXPORT_NAME, b"disk")]).await;
        assert!(matches!(outcome, Ok(Outcome::Transmission(_))));
        assert_eq!(sent.len(), 18 + 10 + 124);
        let (_, sent) = run(3, &[option_bytes(opt::EXPORT_NAME, b"disk")]).await;
        assert_eq!(sent.len(), 18 + 10);
        assert_eq!(&sent[18..26], &(1u64 << 20).to_be_bytes());
    }

    #[tokio::test]
    async fn export_name_for_a_missing_export_disconnects() {
        let (outcome, _) = run(3, &[option_bytes(opt::EXPORT_NAME, b"nope")]).await;
        assert!(matches!(outcome, Err(HandshakeError::UnknownExport(_))));
    }

    #[tokio::test]
    async fn unknown_options_get_err_unsup_and_their_data_is_drained() {
        let (outcome, sent) = run(
            3,
            &[option_bytes(0x0765_4321, b"four"), option_bytes(opt::STARTTLS, &[]), option_bytes(opt::ABORT, &[])],
        )
        .await;
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
        let replies = replies(&sent);
        assert_eq!(replies[0].reply_type, reply_type::ERR_UNSUP);
        assert_eq!(replies[0].option, 0x0765_4321);
        // NOTLS: STARTTLS is refused by policy, never with ERR_TLS_REQD.
        assert_eq!(replies[1].reply_type, reply_type::ERR_POLICY);
        assert_eq!(replies[2].reply_type, reply_type::ACK);
    }

    #[tokio::test]
    async fn require_refuses_every_option_but_starttls_and_abort_with_err_tls_reqd() {
        let options = [
            option_bytes(opt::LIST, &[]),
            option_bytes(opt::INFO, &go_data("disk", &[info::NAME])),
            option_bytes(opt::GO, &go_data("disk", &[])),
            option_bytes(opt::GO, &[0, 0, 0, 9, 1]),
            option_bytes(opt::STRUCTURED_REPLY, &[]),
            option_bytes(opt::SET_META_CONTEXT, &meta_context_request_data("disk", &[BASE_ALLOCATION])),
            option_bytes(0x0765_4321, b"four"),
            option_bytes(opt::ABORT, &[]),
        ];
        let (outcome, sent) = run_with(TlsMode::Require, 3, &options).await;
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
        let replies = replies(&sent);
        assert_eq!(replies.len(), options.len());
        for reply in &replies[..options.len() - 1] {
            assert_eq!(reply.reply_type, reply_type::ERR_TLS_REQD, "option {}", reply.option);
        }
        assert_eq!(replies.last().unwrap().reply_type, reply_type::ACK);
    }

    #[tokio::test]
    async fn require_disconnects_export_name_before_starttls() {
        let (outcome, _) = run_with(TlsMode::Require, 3, &[option_bytes(opt::EXPORT_NAME, b"disk")]).await;
        assert!(matches!(outcome, Err(HandshakeError::TlsRequired)));
        let (outcome, _) = run_with(TlsMode::Require, 0, &[option_bytes(opt::EXPORT_NAME, b"disk")]).await;
        assert!(matches!(outcome, Err(HandshakeError::TlsRequired)));
    }

    #[tokio::test]
    async fn on_serves_plain_clients_and_acks_starttls() {
        let (outcome, _) = run_with(TlsMode::On, 3, &[option_bytes(opt::GO, &go_data("disk", &[]))]).await;
        assert!(matches!(outcome, Ok(Outcome::Transmission(_))));
        let (outcome, sent) = run_with(
            TlsMode::On,
            3,
            &[option_bytes(opt::STRUCTURED_REPLY, &[]), option_bytes(opt::STARTTLS, &[]), option_bytes(opt::LIST, &[])],
        )
        .await;
        let Ok(Outcome::StartTls(resume)) = outcome else { panic!("no STARTTLS") };
        assert_eq!(resume.options, 2);
        let replies = replies(&sent);
        // Nothing after the ACK was read or answered: the rest of the stream belongs to TLS.
        assert_eq!(replies.len(), 2);
        assert_eq!(replies[1].reply_type, reply_type::ACK);
        assert_eq!(replies[1].option, opt::STARTTLS);
        let (_, sent) =
            run_with(TlsMode::On, 3, &[option_bytes(opt::STARTTLS, b"x"), option_bytes(opt::ABORT, &[])]).await;
        assert_eq!(self::replies(&sent)[0].reply_type, reply_type::ERR_INVALID);
    }

    /// Runs [`resume`] on a plain stream: the state after STARTTLS does not depend on the cipher.
    async fn run_resumed(resume_from: Resume, options: &[Vec<u8>]) -> (Result<Outcome, HandshakeError>, Vec<u8>) {
        let (mut client, mut server) = duplex(1 << 20);
        client.write_all(&options.concat()).await.unwrap();
        let exports = exports();
        let outcome = resume(&mut server, &exports, resume_from).await;
        drop(server);
        let mut sent = Vec::new();
        client.read_to_end(&mut sent).await.unwrap();
        (outcome, sent)
    }

    fn replies_after_tls(sent: &[u8]) -> Vec<OptionReply> {
        let mut rest = sent;
        let mut replies = Vec::new();
        while let Some((reply, used)) = OptionReply::decode(rest) {
            replies.push(reply);
            rest = &rest[used..];
        }
        replies
    }

    #[tokio::test]
    async fn after_starttls_state_starts_over_and_a_second_starttls_is_invalid() {
        let (outcome, _) = run_with(
            TlsMode::Require,
            3,
            &[option_bytes(opt::STRUCTURED_REPLY, &[]), option_bytes(opt::STARTTLS, &[])],
        )
        .await;
        let Ok(Outcome::StartTls(resumed)) = outcome else { panic!("no STARTTLS") };
        let (outcome, sent) = run_resumed(
            resumed,
            &[
                option_bytes(opt::STARTTLS, &[]),
                option_bytes(opt::LIST, &[]),
                option_bytes(opt::GO, &go_data("disk", &[])),
            ],
        )
        .await;
        let Ok(Outcome::Transmission(session)) = outcome else { panic!("no transmission") };
        // STRUCTURED_REPLY was negotiated in plain text: it does not survive STARTTLS.
        assert!(!session.structured_replies);
        let replies = replies_after_tls(&sent);
        assert_eq!(replies[0].reply_type, reply_type::ERR_INVALID);
        assert!(replies.iter().all(|r| r.reply_type != reply_type::ERR_TLS_REQD));
        assert_eq!(replies.iter().filter(|r| r.reply_type == reply_type::SERVER).count(), 2);
        let (outcome, _) = run_resumed(resumed, &[option_bytes(opt::EXPORT_NAME, b"disk")]).await;
        assert!(matches!(outcome, Ok(Outcome::Transmission(_))));
    }

    #[tokio::test]
    async fn options_before_starttls_count_against_the_limit() {
        let resumed = Resume { no_zeroes: true, options: MAX_OPTIONS - 1 };
        let options = [option_bytes(0x1234, &[]), option_bytes(0x1234, &[])];
        let (outcome, _) = run_resumed(resumed, &options).await;
        assert!(matches!(outcome, Err(HandshakeError::TooManyOptions)));
    }

    #[tokio::test]
    async fn malformed_option_data_gets_err_invalid_and_the_handshake_goes_on() {
        let (outcome, sent) = run(
            3,
            &[option_bytes(opt::GO, &[0, 0, 0, 9, 1]), option_bytes(opt::LIST, b"x"), option_bytes(opt::ABORT, &[])],
        )
        .await;
        assert!(matches!(outcome, Ok(Outcome::Aborted)));
        let replies = replies(&sent);
        assert_eq!(replies[0].reply_type, reply_type::ERR_INVALID);
        assert_eq!(replies[1].reply_type, reply_type::ERR_INVALID);
    }

    #[tokio::test]
    async fn list_names_every_export_then_acks() {
        let (_, sent) = run(3, &[option_bytes(opt::LIST, &[]), option_bytes(opt::ABORT, &[])]).await;
        let replies = replies(&sent);
        assert_eq!(replies.iter().filter(|r| r.reply_type == reply_type::SERVER).count(), 2);
        assert_eq!(replies[2].reply_type, reply_type::ACK);
    }

    #[tokio::test]
    async fn meta_context_needs_structured_replies_and_binds_to_its_export() {
        let query = meta_context_request_data("disk", &[BASE_ALLOCATION]).to_vec();
        let (_, sent) = run(3, &[option_bytes(opt::SET_META_CONTEXT, &query), option_bytes(opt::ABORT, &[])]).await;
        assert_eq!(replies(&sent)[0].reply_type, reply_type::ERR_INVALID);

        let (outcome, sent) = run(
            3,
            &[
                option_bytes(opt::STRUCTURED_REPLY, &[]),
                option_bytes(opt::SET_META_CONTEXT, &query),
                option_bytes(opt::GO, &go_data("disk", &[])),
            ],
        )
        .await;
        let Ok(Outcome::Transmission(session)) = outcome else { panic!() };
        assert!(session.meta_context && session.structured_replies);
        assert_ne!(session.flags & transmission_flags::SEND_DF, 0);
        let replies = replies(&sent);
        assert_eq!(replies[1].reply_type, reply_type::META_CONTEXT);
        assert_eq!(&replies[1].data[..4], &BASE_ALLOCATION_ID.to_be_bytes());

        // Selected for "disk", then GO to "": the context does not carry over.
        let (outcome, _) = run(
            3,
            &[
                option_bytes(opt::STRUCTURED_REPLY, &[]),
                option_bytes(opt::SET_META_CONTEXT, &query),
                option_bytes(opt::GO, &go_data("", &[])),
            ],
        )
        .await;
        let Ok(Outcome::Transmission(session)) = outcome else { panic!() };
        assert!(!session.meta_context);
    }

    #[tokio::test]
    async fn bad_option_magic_and_oversized_options_disconnect() {
        let mut bad = option_bytes(opt::LIST, &[]);
        bad[0] ^= 0xff;
        let (outcome, _) = run(3, &[bad]).await;
        assert!(matches!(outcome, Err(HandshakeError::BadOptionMagic(_))));
        let mut header = BytesMut::new();
        OptionHeader { magic: IHAVEOPT, code: opt::GO, length: MAX_OPTION_DATA + 1 }.encode(&mut header);
        let (outcome, _) = run(3, &[header.to_vec()]).await;
        assert!(matches!(outcome, Err(HandshakeError::OptionTooLarge { .. })));
    }

    #[tokio::test]
    async fn too_many_options_disconnect() {
        let options: Vec<Vec<u8>> = (0..=MAX_OPTIONS).map(|_| option_bytes(0x1234, &[])).collect();
        let (outcome, _) = run(3, &options).await;
        assert!(matches!(outcome, Err(HandshakeError::TooManyOptions)));
    }

    #[tokio::test]
    async fn options_other_than_export_name_need_fixed_newstyle() {
        let (outcome, _) = run(0, &[option_bytes(opt::LIST, &[])]).await;
        assert!(matches!(outcome, Err(HandshakeError::NotFixedNewstyle(_))));
    }
}
