//! The protocol as raw bytes: what real clients never send (bad magic, bad flags, cut streams,
//! oversized payloads, unknown options and commands) and the limits (handshake timeout, maximum
//! connections, bytes in flight). Each misbehaving connection must be answered as the protocol
//! says, and must never disturb another client or its data.

mod common;

use std::time::{Duration, Instant};

use common::Server;
use common::raw::*;

const MIB: u64 = 1 << 20;

fn server() -> Server {
    Server::builder().export("disk", "memory:64MiB").export("other", "memory:1MiB").start()
}

// ---- handshake -------------------------------------------------------------------------------

#[test]
fn greeting_offers_fixed_newstyle_and_no_zeroes() {
    let server = server();
    let mut client = RawClient::connect(server.nbd);
    assert_eq!(client.read_greeting(), 0x0003);
}

#[test]
fn unknown_client_flags_close_the_connection() {
    let server = server();
    for flags in [0x4, 0x8000_0003, u32::MAX] {
        let mut client = RawClient::start(server.nbd, flags);
        assert!(client.closed_by_server(), "client flags {flags:#x} must drop the connection");
    }
    // The server goes on serving.
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    client.read_ok(1, 0, 512);
}

#[test]
fn bad_option_magic_closes_the_connection() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let mut option = Vec::new();
    option.extend_from_slice(&0x4948_4156_454f_5055u64.to_be_bytes()); // IHAVEOPT + 1
    option.extend_from_slice(&OPT_LIST.to_be_bytes());
    option.extend_from_slice(&0u32.to_be_bytes());
    client.send(&option);
    assert!(client.closed_by_server());
}

#[test]
fn unknown_option_with_data_gets_err_unsup_and_the_next_option_works() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    // What nbd-tester-client -h sends: an unknown option with four bytes of data.
    client.send_option(0x0765_4321, b"abcd");
    let reply = client.read_option_reply();
    assert_eq!((reply.option, reply.reply_type), (0x0765_4321, REP_ERR_UNSUP));
    // A bigger body must be drained just the same.
    client.send_option(0x0765_4322, &vec![0x5a; 256 << 10]);
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNSUP);
    // Options the server does not implement yet are unsupported too, not fatal.
    client.send_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNSUP, "EXTENDED_HEADERS is not offered");
    client.send_option(OPT_STARTTLS, &[]);
    let starttls = client.read_option_reply().reply_type;
    assert!(starttls == REP_ERR_UNSUP || starttls == 0x8000_0002, "STARTTLS without TLS: {starttls:#x}");
    // The stream is still in step: LIST and GO work.
    client.send_option(OPT_LIST, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_SERVER);
    assert_eq!(client.read_option_reply().reply_type, REP_SERVER);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    let attached = client.go("disk");
    assert_eq!(attached.size, 64 * MIB);
    client.read_ok(1, 0, 4096);
}

#[test]
fn oversized_option_data_closes_the_connection_without_reading_it() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let mut header = Vec::new();
    header.extend_from_slice(&IHAVEOPT.to_be_bytes());
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(512u32 << 20).to_be_bytes());
    client.send(&header);
    // Only the header was sent: a server that tried to read 512 MiB would wait, not close.
    assert!(client.closed_by_server(), "a 512 MiB option must drop the connection");
}

#[test]
fn endless_options_close_the_connection() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    for sent in 1..=10_000 {
        client.send_option(0x1234, &[]);
        let mut byte = [0u8; 1];
        match client.stream.peek(&mut byte) {
            Ok(0) | Err(_) => {
                assert!(sent > 16, "the server gave up after only {sent} options");
                return;
            }
            Ok(_) => assert_eq!(client.read_option_reply().reply_type, REP_ERR_UNSUP),
        }
    }
    panic!("the server answered 10000 options without closing the connection");
}

#[test]
fn malformed_option_data_gets_err_invalid_and_the_handshake_goes_on() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let cases: Vec<(u32, Vec<u8>)> = vec![
        (OPT_GO, vec![0, 0, 0, 9, b'd']),                         // name length past the end
        (OPT_INFO, vec![0, 0, 0, 0, 0]),                          // shorter than 6 bytes
        (OPT_GO, [info_data("disk", &[1, 2]), vec![0]].concat()), // trailing byte
        (OPT_LIST, b"x".to_vec()),                                // LIST takes no data
        (OPT_STRUCTURED_REPLY, b"x".to_vec()),                    // nor does STRUCTURED_REPLY
        (OPT_LIST_META_CONTEXT, vec![0, 0, 0, 4, b'd', b'i', b's', b'k', 0xff, 0xff, 0xff, 0xff]),
    ];
    for (code, data) in cases {
        client.send_option(code, &data);
        let reply = client.read_option_reply();
        assert_eq!((reply.option, reply.reply_type), (code, REP_ERR_INVALID), "option {code} with {data:02x?}");
    }
    client.go("disk");
    client.read_ok(1, 0, 512);
}

#[test]
fn go_to_an_unknown_export_gets_err_unknown_naming_the_exports_and_the_handshake_goes_on() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client.send_option(OPT_GO, &info_data("nope", &[]));
    let reply = client.read_option_reply();
    assert_eq!(reply.reply_type, REP_ERR_UNKNOWN);
    let message = String::from_utf8_lossy(&reply.data);
    assert!(message.contains("disk") && message.contains("other"), "the error names the exports: {message}");
    assert_eq!(client.go("other").size, MIB);
}

#[test]
fn info_always_includes_the_export_info_and_answers_what_was_asked() {
    let config = tempfile::tempdir().unwrap();
    let server = Server::builder().arg("--config").arg(config_with_description(config.path())).start();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    // Asked for nothing: NBD_INFO_EXPORT comes anyway (qemu relies on it).
    client.send_option(OPT_INFO, &info_data("described", &[]));
    let first = client.read_option_reply();
    assert_eq!((first.reply_type, u16_at(&first.data, 0), first.data.len()), (REP_INFO, INFO_EXPORT, 12));
    assert_eq!(u64_at(&first.data, 2), 2 * MIB);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);

    let asked = [INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE];
    client.send_option(OPT_INFO, &info_data("described", &asked));
    let mut infos = std::collections::BTreeMap::new();
    loop {
        let reply = client.read_option_reply();
        if reply.reply_type == REP_ACK {
            break;
        }
        assert_eq!(reply.reply_type, REP_INFO);
        infos.insert(u16_at(&reply.data, 0), reply.data[2..].to_vec());
    }
    assert_eq!(infos[&INFO_EXPORT].len(), 10);
    assert_eq!(infos[&INFO_NAME], b"described");
    assert_eq!(infos[&INFO_DESCRIPTION], b"a disk with a description");
    let block = &infos[&INFO_BLOCK_SIZE];
    assert_eq!(block.len(), 12, "NBD_INFO_BLOCK_SIZE is exactly 14 bytes with its type");
    let (min, preferred, max) = (u32_at(block, 0), u32_at(block, 4), u32_at(block, 8));
    // libnbd silently ignores sizes that break these rules.
    assert!(min.is_power_of_two() && min <= 65536, "minimum {min}");
    assert!(preferred.is_power_of_two() && preferred >= 512 && preferred >= min, "preferred {preferred}");
    assert!(max >= preferred && (max % min == 0 || max == u32::MAX), "maximum {max}");
    assert!(max >= 32 << 20, "32 MiB requests are accepted, so say so: maximum {max}");

    // GO after INFO with the same request gives the same information, then transmission.
    let attached = client.go("described");
    assert_eq!(attached.flags, u16_at(&infos[&INFO_EXPORT], 8));
    client.read_ok(1, 0, 512);
}

fn config_with_description(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        "control: 'off'\nexports:\n  - name: described\n    description: a disk with a description\n    storage: memory:2MiB\n",
    )
    .unwrap();
    path
}

#[test]
fn list_sends_one_server_reply_per_export_then_ack() {
    let server = Server::builder().export("", "memory:1MiB").export("disk", "memory:1MiB").start();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let reply = client.read_option_reply();
        assert_eq!(reply.option, OPT_LIST);
        match reply.reply_type {
            REP_SERVER => {
                let length = u32_at(&reply.data, 0) as usize;
                names.push(String::from_utf8(reply.data[4..4 + length].to_vec()).unwrap());
            }
            REP_ACK => break,
            other => panic!("LIST got reply type {other:#x}"),
        }
    }
    names.sort();
    assert_eq!(names, vec!["".to_string(), "disk".to_string()]);
}

#[test]
fn list_meta_context_offers_base_allocation() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    for queries in [&[][..], &["base:"][..], &["base:allocation"][..]] {
        client.send_option(OPT_LIST_META_CONTEXT, &meta_context_data("disk", queries));
        let reply = client.read_option_reply();
        assert_eq!(reply.reply_type, REP_META_CONTEXT, "queries {queries:?}");
        assert_eq!(&reply.data[4..], b"base:allocation");
        assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    }
    client.send_option(OPT_LIST_META_CONTEXT, &meta_context_data("disk", &["qemu:dirty-bitmap:x"]));
    assert_eq!(client.read_option_reply().reply_type, REP_ACK, "unknown namespaces match nothing");
}

#[test]
fn abort_gets_an_ack_and_the_server_closes() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client.send_option(OPT_ABORT, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    assert!(client.closed_by_server());
}

#[test]
fn export_name_without_no_zeroes_is_padded_with_124_zero_bytes_and_transmission_works() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE);
    client.send(
        &[IHAVEOPT.to_be_bytes().as_slice(), &OPT_EXPORT_NAME.to_be_bytes(), &4u32.to_be_bytes(), b"disk"].concat(),
    );
    let reply = client.read_exact_vec(8 + 2 + 124);
    assert_eq!(u64_at(&reply, 0), 64 * MIB);
    let flags = u16_at(&reply, 8);
    assert_ne!(flags & HAS_FLAGS, 0);
    assert_eq!(flags & SEND_DF, 0, "DF is never offered without structured replies");
    assert!(reply[10..].iter().all(|&b| b == 0), "the padding is zeros");
    client.write_ok(1, 4096, b"old client");
    assert_eq!(client.read_ok(2, 4096, 10), b"old client");
}

#[test]
fn export_name_with_no_zeroes_is_not_padded() {
    let server = server();
    let mut client = RawClient::start(server.nbd, 0);
    // Without fixed newstyle only EXPORT_NAME is allowed; NO_ZEROES was not set either.
    client.send(
        &[IHAVEOPT.to_be_bytes().as_slice(), &OPT_EXPORT_NAME.to_be_bytes(), &4u32.to_be_bytes(), b"disk"].concat(),
    );
    let padded = client.read_exact_vec(134);
    assert!(padded[10..].iter().all(|&b| b == 0));
    assert_eq!(client.read_ok(6, 0, 16), vec![0; 16]);
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client.send(
        &[IHAVEOPT.to_be_bytes().as_slice(), &OPT_EXPORT_NAME.to_be_bytes(), &5u32.to_be_bytes(), b"other"].concat(),
    );
    let reply = client.read_exact_vec(10);
    assert_eq!(u64_at(&reply, 0), MIB);
    // The next bytes are the reply to this READ, not padding.
    assert_eq!(client.read_ok(7, 0, 16), vec![0; 16]);
}

#[test]
fn export_name_for_an_unknown_export_closes_the_connection() {
    let server = server();
    let mut client = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    client.send(
        &[IHAVEOPT.to_be_bytes().as_slice(), &OPT_EXPORT_NAME.to_be_bytes(), &4u32.to_be_bytes(), b"nope"].concat(),
    );
    assert!(client.closed_by_server());
}

#[test]
fn options_other_than_export_name_without_fixed_newstyle_close_the_connection() {
    let server = server();
    let mut client = RawClient::start(server.nbd, 0);
    client.send_option(OPT_LIST, &[]);
    assert!(client.closed_by_server());
}

// ---- transmission: bad input on one connection ------------------------------------------------

#[test]
fn bad_request_magic_closes_only_that_connection_and_other_clients_keep_their_data() {
    let server = server();
    let (mut good, _) = RawClient::attach(server.nbd, "disk", false);
    let (mut bad, _) = RawClient::attach(server.nbd, "disk", true);
    let mine = common::random_bytes(1 << 20);
    good.write_ok(1, 0, &mine);
    let theirs = common::random_bytes(4096);
    bad.send_write(0, 2, MIB, &theirs);
    assert_eq!(bad.read_reply_errno(2), 0, "the bad client's write before the bad magic");
    let mut request = RawClient::request(0, CMD_READ, 3, 0, 512);
    request[0] ^= 0x01;
    bad.send(&request);
    assert!(bad.closed_by_server(), "bad request magic must drop the connection");

    assert_eq!(good.read_ok(4, 0, 1 << 20), mine, "the good client's data is intact");
    assert_eq!(good.read_ok(5, MIB, 4096), theirs, "what the bad client wrote before is kept");
    good.write_ok(6, 2 * MIB, b"still here");
    let (mut third, _) = RawClient::attach(server.nbd, "disk", false);
    assert_eq!(third.read_ok(7, 2 * MIB, 10), b"still here");
}

#[test]
fn a_stream_cut_mid_request_closes_only_that_connection_and_applies_nothing() {
    let server = server();
    let (mut good, _) = RawClient::attach(server.nbd, "disk", false);
    good.write_ok(1, 0, &[0x11; 8192]);

    // Half a request header, then the client is gone.
    let (mut cut, _) = RawClient::attach(server.nbd, "disk", false);
    cut.send(&RawClient::request(0, CMD_WRITE, 2, 0, 4096)[..13]);
    cut.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(cut.closed_by_server());

    // A whole header and half the payload.
    let (mut cut, _) = RawClient::attach(server.nbd, "disk", false);
    let mut request = RawClient::request(0, CMD_WRITE, 3, 0, 8192);
    request.extend_from_slice(&[0x99; 4096]);
    cut.send(&request);
    cut.stream.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(cut.closed_by_server());

    // A client that vanishes with a reset, mid-payload.
    {
        let (mut cut, _) = RawClient::attach(server.nbd, "disk", false);
        cut.send(&request);
        linger_zero(&cut.stream);
        drop(cut);
    }

    assert_eq!(good.read_ok(4, 0, 8192), vec![0x11; 8192], "no part of a cut WRITE reaches the disk");
    good.write_ok(5, 8192, b"after");
    assert_eq!(good.read_ok(6, 8192, 5), b"after");
}

/// Sets SO_LINGER to 0 so that closing the socket sends a reset instead of a FIN.
fn linger_zero(stream: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt reads `linger` for the duration of the call; the fd is open.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(result, 0);
}

#[test]
fn a_write_over_32_mib_is_drained_and_refused_and_the_connection_goes_on() {
    let server = server();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    client.write_ok(1, 0, &[0x22; 4096]);
    let before = server.peak_memory();
    let big = vec![0xaa; 40 << 20];
    client.send_write(0, 2, 0, &big);
    let (error, cookie) = client.read_simple_reply();
    assert_eq!(cookie, 2);
    assert_ne!(error, 0, "a 40 MiB WRITE is over the 32 MiB limit and must be refused");
    assert_eq!(client.read_ok(3, 0, 4096), vec![0x22; 4096], "the refused WRITE changed nothing");
    // An oversized READ is refused with no payload, and the connection goes on.
    client.send_request(0, CMD_READ, 4, 0, 40 << 20);
    let (error, cookie) = client.read_simple_reply();
    assert_eq!((cookie, error != 0), (4, true), "a 40 MiB READ is refused");
    assert_eq!(client.read_ok(5, 0, 4), vec![0x22; 4]);
    let grown = server.peak_memory().saturating_sub(before);
    assert!(grown < 24 << 20, "refusing 40 MiB requests made the server allocate {} MiB", grown >> 20);
}

#[test]
fn a_write_over_64_mib_closes_the_connection_and_no_other() {
    let server = server();
    let (mut other, _) = RawClient::attach(server.nbd, "disk", false);
    other.write_ok(1, 0, b"other client");
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    client.send_request(0, CMD_WRITE, 2, 0, (64 << 20) + 1);
    // Some of the payload follows; the server need not read it.
    client.send_lossy(&[0u8; 65536]);
    assert!(client.closed_by_server(), "a WRITE too large to drain must drop the connection");
    assert_eq!(other.read_ok(3, 0, 12), b"other client");
}

#[test]
fn unknown_commands_and_flags_get_einval_and_the_connection_goes_on() {
    let server = server();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    let mut cookie = 100;
    let mut expect_error = |client: &mut RawClient, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]| {
        cookie += 1;
        client.send(&[RawClient::request(flags, kind, cookie, offset, length), payload.to_vec()].concat());
        assert_eq!(
            client.read_simple_reply(),
            (EINVAL, cookie),
            "flags {flags:#x} command {kind} offset {offset} length {length}"
        );
        client.read_ok(cookie + 1000, 0, 512);
    };
    expect_error(&mut client, 0, 9, 0, 0, &[]); // RESIZE and beyond: unknown
    expect_error(&mut client, 0, 0x100, 0, 512, &[]);
    expect_error(&mut client, 0, u16::MAX, 0, 0, &[]);
    expect_error(&mut client, 1 << 9, CMD_READ, 0, 512, &[]);
    expect_error(&mut client, 0x8000, CMD_FLUSH, 0, 0, &[]);
    // Flags that belong to other commands; the WRITE's payload must be drained first.
    expect_error(&mut client, CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 512, &[0xee; 512]);
    expect_error(&mut client, CMD_FLAG_REQ_ONE, CMD_READ, 0, 512, &[]);
    expect_error(&mut client, CMD_FLAG_DF, CMD_READ, 0, 512, &[]); // DF without structured replies
    expect_error(&mut client, 0, CMD_FLUSH, 512, 0, &[]); // FLUSH takes no range
    expect_error(&mut client, 0, CMD_FLUSH, 0, 512, &[]);
    expect_error(&mut client, 0, CMD_BLOCK_STATUS, 0, 512, &[]); // no meta context
    assert_eq!(client.read_ok(1, 0, 512), vec![0; 512], "the refused WRITE changed nothing");
}

#[test]
fn out_of_range_requests_get_enospc_or_einval_with_overflow_safe_checks() {
    let server = server();
    let (mut client, attached) = RawClient::attach(server.nbd, "disk", false);
    let size = attached.size;
    let cases: &[(u16, u64, u32, u32)] = &[
        (CMD_WRITE, size - 1, 2, ENOSPC),
        (CMD_WRITE, size, 1, ENOSPC),
        (CMD_WRITE, u64::MAX, 1, ENOSPC),
        (CMD_WRITE_ZEROES, size - 1, 2, ENOSPC),
        (CMD_WRITE_ZEROES, u64::MAX - 1, 4096, ENOSPC),
        (CMD_READ, size - 1, 2, EINVAL),
        (CMD_READ, u64::MAX, 2, EINVAL),
        (CMD_TRIM, size, 1, EINVAL),
        (CMD_TRIM, u64::MAX - 4095, 8192, EINVAL),
        (CMD_CACHE, size - 511, 512, EINVAL),
        (CMD_CACHE, 1 << 63, 1, EINVAL),
    ];
    for (cookie, &(kind, offset, length, errno)) in cases.iter().enumerate() {
        let cookie = cookie as u64;
        let mut request = RawClient::request(0, kind, cookie, offset, length);
        if kind == CMD_WRITE {
            request.extend(std::iter::repeat_n(0xcc, length as usize));
        }
        client.send(&request);
        assert_eq!(client.read_simple_reply(), (errno, cookie), "command {kind} at {offset} length {length}");
    }
    // Right up to the end is in range.
    client.write_ok(50, size - 3, b"end");
    assert_eq!(client.read_ok(51, size - 3, 3), b"end");
}

#[test]
fn structured_replies_carry_reads_as_data_chunks_and_errors_as_error_chunks() {
    let server = server();
    let (mut client, attached) = RawClient::attach(server.nbd, "disk", true);
    assert_ne!(attached.flags & SEND_DF, 0, "DF is offered with structured replies");
    client.send_write(0, 1, 12345, b"structured");
    assert_eq!(client.read_reply_errno(1), 0);

    client.send_request(0, CMD_READ, 2, 12345, 10);
    let chunk = client.read_chunk();
    assert_eq!((chunk.cookie, chunk.chunk_type, chunk.flags & REPLY_FLAG_DONE), (2, CHUNK_OFFSET_DATA, 1));
    assert_eq!(u64_at(&chunk.payload, 0), 12345, "OFFSET_DATA starts at the request's offset");
    assert_eq!(&chunk.payload[8..], b"structured");

    // READ errors, even early ones, are chunks once structured replies are on.
    client.send_request(0, CMD_READ, 3, attached.size, 1);
    let chunk = client.read_chunk();
    assert_eq!((chunk.cookie, chunk.chunk_type, chunk.flags & REPLY_FLAG_DONE), (3, CHUNK_ERROR, 1));
    assert_eq!(u32_at(&chunk.payload, 0), EINVAL);
    let message_length = u16_at(&chunk.payload, 4) as usize;
    assert_eq!(chunk.payload.len(), 6 + message_length, "ERROR chunk length is 6 + message");
    assert!(std::str::from_utf8(&chunk.payload[6..]).is_ok(), "the message is UTF-8");

    // DF: one data chunk, even over a hole.
    client.send_request(CMD_FLAG_DF, CMD_READ, 4, 0, 65536);
    let chunk = client.read_chunk();
    assert_eq!((chunk.cookie, chunk.flags & REPLY_FLAG_DONE), (4, 1), "a DF read is one chunk");
    match chunk.chunk_type {
        CHUNK_OFFSET_DATA => assert_eq!(chunk.payload.len(), 8 + 65536),
        other => panic!("a DF read must be a single data chunk, got type {other:#x}"),
    }

    // BLOCK_STATUS with REQ_ONE: exactly one extent, no longer than asked.
    client.send_request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 0, 1 << 20);
    let chunk = client.read_chunk();
    assert_eq!((chunk.cookie, chunk.chunk_type, chunk.flags & REPLY_FLAG_DONE), (5, CHUNK_BLOCK_STATUS, 1));
    assert_eq!(chunk.payload.len(), 4 + 8, "REQ_ONE gives exactly one extent");
    let length = u32_at(&chunk.payload, 4);
    assert!(length > 0 && length <= 1 << 20, "extent length {length}");

    // Without REQ_ONE the extents cover the request; all but the last lie inside it.
    client.send_request(0, CMD_BLOCK_STATUS, 6, 0, 1 << 20);
    let chunk = client.read_chunk();
    assert_eq!((chunk.cookie, chunk.chunk_type), (6, CHUNK_BLOCK_STATUS));
    let extents: Vec<(u32, u32)> = chunk.payload[4..].chunks(8).map(|e| (u32_at(e, 0), u32_at(e, 4))).collect();
    assert!(extents.len() >= 2, "written data and a hole: {extents:?}");
    assert_eq!(extents[0].1, 0, "the start holds data: {extents:?}");
    let before_last: u64 = extents[..extents.len() - 1].iter().map(|e| u64::from(e.0)).sum();
    assert!(before_last < 1 << 20, "{extents:?}");
    assert!(extents.iter().all(|e| e.0 > 0), "no empty extents: {extents:?}");

    // A zero-length READ is answered, not dropped.
    client.send_request(0, CMD_READ, 7, 0, 0);
    let chunk = client.read_chunk();
    assert_eq!((chunk.cookie, chunk.flags & REPLY_FLAG_DONE), (7, 1));
    // And the connection goes on.
    client.send_request(0, CMD_READ, 8, 12345, 10);
    assert_eq!(&client.read_chunk().payload[8..], b"structured");
}

#[test]
fn cookies_are_echoed_verbatim() {
    let server = server();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    for cookie in [0, 1, 0x0102_0304_0506_0708, 0x8000_0000_0000_0000, u64::MAX] {
        client.send_request(0, CMD_FLUSH, cookie, 0, 0);
        assert_eq!(client.read_simple_reply(), (0, cookie));
        client.send_request(0, CMD_READ, cookie, 0, 8);
        assert_eq!(client.read_simple_reply(), (0, cookie));
        client.read_exact_vec(8);
    }
}

#[test]
fn disc_with_requests_in_flight_answers_them_all_before_closing() {
    let server = server();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    let written = common::random_bytes(1 << 20);
    let earlier = common::random_bytes(1 << 20);
    for i in 8..16u64 {
        client.write_ok(i, i * MIB, &earlier);
    }
    let mut burst = Vec::new();
    for i in 0..8u64 {
        burst.extend(RawClient::request(CMD_FLAG_FUA, CMD_WRITE, i, i * MIB, 1 << 20));
        burst.extend_from_slice(&written);
    }
    for i in 0..8u64 {
        burst.extend(RawClient::request(0, CMD_READ, 100 + i, (8 + i) * MIB, 1 << 20));
    }
    burst.extend(RawClient::request(0, CMD_FLUSH, 200, 0, 0));
    burst.extend(RawClient::request(0, CMD_DISC, 300, 0, 0));
    // Send everything at once, DISC last, and only then read.
    let mut writer = client.stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || std::io::Write::write_all(&mut writer, &burst).unwrap());
    let received = client.read_until_closed();
    sender.join().unwrap();

    let mut rest = &received[..];
    let mut answered = Vec::new();
    while !rest.is_empty() {
        assert!(rest.len() >= 16, "a truncated reply at the end: {} bytes", rest.len());
        assert_eq!(u32_at(rest, 0), SIMPLE_REPLY_MAGIC);
        assert_eq!(u32_at(rest, 4), 0, "every request succeeds");
        let cookie = u64_at(rest, 8);
        rest = &rest[16..];
        if (100..108).contains(&cookie) {
            assert!(rest.len() >= 1 << 20, "READ {cookie} lost its data");
            assert!(rest[..1 << 20] == earlier[..], "READ {cookie} returned other bytes than were written");
            rest = &rest[1 << 20..];
        }
        answered.push(cookie);
    }
    answered.sort();
    let expected: Vec<u64> = (0..8).chain(100..108).chain([200]).collect();
    assert_eq!(answered, expected, "every request before DISC is answered, and DISC is not");
    let (mut check, _) = RawClient::attach(server.nbd, "disk", false);
    for i in 0..8u64 {
        assert!(check.read_ok(i, i * MIB, 1 << 20) == written, "the WRITE at {i} MiB before DISC is kept");
    }
}

#[test]
fn replies_come_in_completion_order_so_a_long_trim_does_not_hold_up_reads() {
    let server = Server::memory("big", "8GiB");
    let (mut client, _) = RawClient::attach(server.nbd, "big", false);
    client.write_ok(1, 0, b"quick");
    // A TRIM of nearly 4 GiB walks 65536 chunks; the small READs behind it take microseconds.
    let mut burst = RawClient::request(0, CMD_TRIM, 100, 4 << 30, 0xFFFF_FE00);
    for i in 0..16 {
        burst.extend(RawClient::request(0, CMD_READ, 200 + i, 0, 5));
    }
    client.send(&burst);
    let mut order = Vec::new();
    for _ in 0..17 {
        let (error, cookie) = client.read_simple_reply();
        assert_eq!(error, 0);
        if cookie != 100 {
            assert_eq!(client.read_exact_vec(5), b"quick");
        }
        order.push(cookie);
    }
    let trim_at = order.iter().position(|&cookie| cookie == 100).unwrap();
    assert!(trim_at > 0, "every READ waited for the TRIM sent before it: {order:?}");
}

#[test]
fn a_client_that_half_closes_after_its_requests_still_gets_every_reply() {
    let server = server();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    let data = common::random_bytes(1 << 20);
    let mut burst = Vec::new();
    for i in 0..16u64 {
        burst.extend(RawClient::request(0, CMD_WRITE, i, i * MIB, 1 << 20));
        burst.extend_from_slice(&data);
    }
    burst.extend(RawClient::request(0, CMD_FLUSH, 16, 0, 0));
    client.send(&burst);
    // Done sending, still reading: the TCP connection is half open, as after `shutdown(SHUT_WR)`.
    client.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let received = client.read_until_closed();
    assert_eq!(received.len() % 16, 0, "replies arrive whole");
    let mut answered: Vec<u64> = received
        .chunks(16)
        .map(|reply| {
            assert_eq!((u32_at(reply, 0), u32_at(reply, 4)), (SIMPLE_REPLY_MAGIC, 0));
            u64_at(reply, 8)
        })
        .collect();
    answered.sort();
    assert_eq!(answered, (0..=16).collect::<Vec<_>>(), "every request sent before the half-close is answered");
}

#[test]
fn pipelined_requests_beyond_the_in_flight_bound_are_not_buffered() {
    let server = server();
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    // Data to read: zero pages that nobody touches would not show in the server's memory.
    let data = common::random_bytes(32 << 20);
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        client.write_ok(i as u64, i as u64 * MIB, piece);
    }
    let baseline = server.resident_memory();
    // 24 reads of 32 MiB: 768 MiB of replies if the server read every request at once.
    let count = 24u64;
    let mut burst = Vec::new();
    for i in 0..count {
        burst.extend(RawClient::request(0, CMD_READ, 10 + i, 0, 32 << 20));
    }
    client.send(&burst);
    // Let the server do all it will do while nobody reads the replies.
    std::thread::sleep(Duration::from_millis(500));
    let held = server.resident_memory().saturating_sub(baseline);
    assert!(held < 256 << 20, "the server holds {} MiB for requests it cannot answer yet", held >> 20);
    let mut answered = Vec::new();
    for _ in 0..count {
        let (error, cookie) = client.read_simple_reply();
        assert_eq!(error, 0);
        assert!(client.read_exact_vec(32 << 20) == data, "READ {cookie} returned other bytes");
        answered.push(cookie);
    }
    answered.sort();
    assert_eq!(answered, (10..10 + count).collect::<Vec<_>>());
}

#[test]
fn several_exports_keep_their_data_apart() {
    let server = server();
    let (mut disk, _) = RawClient::attach(server.nbd, "disk", false);
    let (mut other, attached) = RawClient::attach(server.nbd, "other", false);
    assert_eq!(attached.size, MIB);
    disk.write_ok(1, 0, b"disk data");
    other.write_ok(2, 0, b"other data");
    assert_eq!(disk.read_ok(3, 0, 9), b"disk data");
    assert_eq!(other.read_ok(4, 0, 10), b"other data");
}

// ---- limits -----------------------------------------------------------------------------------

#[test]
fn handshake_timeout_closes_an_idle_client_but_not_an_attached_one() {
    let server = Server::builder().export("disk", "memory:1MiB").args(["--handshake-timeout", "1s"]).start();
    let (mut attached, _) = RawClient::attach(server.nbd, "disk", false);
    let started = Instant::now();
    let mut idle = RawClient::connect(server.nbd);
    idle.read_greeting();
    assert!(idle.closed_by_server(), "a client that never finishes the handshake is closed");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(900), "closed after {waited:?}, before the 1 s timeout");
    assert!(waited < Duration::from_secs(5), "closed only after {waited:?}");
    // A client half-way through the options is closed as well.
    let mut slow = RawClient::start(server.nbd, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    slow.send_option(OPT_LIST, &[]);
    for _ in 0..2 {
        slow.read_option_reply();
    }
    assert!(slow.closed_by_server());
    // The handshake timeout does not apply to transmission.
    attached.write_ok(1, 0, b"alive");
    assert_eq!(attached.read_ok(2, 0, 5), b"alive");
}

#[test]
fn max_connections_refuses_the_third_and_keeps_the_first_two_working() {
    let server = Server::builder().export("disk", "memory:1MiB").args(["--max-connections", "2"]).start();
    let (mut first, _) = RawClient::attach(server.nbd, "disk", false);
    let (mut second, _) = RawClient::attach(server.nbd, "disk", false);
    // The second takes its slot when its handshake ends, a moment after its GO reply: from then
    // on a third connection is refused, with no greeting.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut third = RawClient::connect(server.nbd);
        let mut byte = [0u8; 1];
        third.stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if matches!(third.stream.peek(&mut byte), Ok(0) | Err(_)) {
            assert!(third.closed_by_server(), "the third connection is refused, with no greeting");
            break;
        }
        assert!(Instant::now() < deadline, "a third connection was still let in");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.write_ok(1, 0, b"first");
    second.write_ok(2, 8, b"second");
    assert_eq!(first.read_ok(3, 8, 6), b"second");
    assert_eq!(second.read_ok(4, 0, 5), b"first");
    // A slot freed by a client that left is given to the next one.
    first.disconnect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut next = RawClient::connect(server.nbd);
        let mut byte = [0u8; 1];
        if next.stream.peek(&mut byte).map(|n| n > 0).unwrap_or(false) {
            next.read_greeting();
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot was never given to a new client");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(second.read_ok(5, 0, 5), b"first");
}
