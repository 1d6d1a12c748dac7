//! The protocol end to end with nothing installed: the server started from the library inside
//! the test process on a free port, driven by the raw Rust NBD client of `common::raw` (whose
//! constants come from the protocol document, not from the server). Handshake, every data
//! command, structured replies, block status, and an injected fault whose delayed error reply is
//! overtaken by later requests. These run wherever `cargo test` runs, on a machine with only Rust.

mod common;

use std::time::{Duration, Instant};

use common::assert_same_bytes;
use common::in_process::InProcessServer;
use common::raw::*;
use nbdfault::config::Overrides;

const MIB: u64 = 1 << 20;

#[test]
fn the_handshake_negotiates_structured_replies_and_base_allocation_and_goes_to_the_export() {
    let server = InProcessServer::memory(&[("disk", "64MiB"), ("other", "1MiB")]);
    let mut client = RawClient::connect(server.nbd);
    assert_eq!(client.read_greeting(), 3, "FIXED_NEWSTYLE | NO_ZEROES");
    client.send(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());

    client.send_option(OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let reply = client.read_option_reply();
        match reply.reply_type {
            REP_SERVER => names.push(String::from_utf8(reply.data[4..].to_vec()).unwrap()),
            REP_ACK => break,
            other => panic!("LIST got reply type {other:#x}"),
        }
    }
    names.sort();
    assert_eq!(names, ["disk", "other"]);

    client.send_option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);
    client.send_option(OPT_SET_META_CONTEXT, &meta_context_data("disk", &["base:allocation"]));
    let context = client.read_option_reply();
    assert_eq!(context.reply_type, REP_META_CONTEXT);
    assert_eq!(&context.data[4..], b"base:allocation");
    assert_eq!(client.read_option_reply().reply_type, REP_ACK);

    let attached = client.go("disk");
    assert_eq!(attached.size, 64 * MIB);
    for (flag, name) in [
        (HAS_FLAGS, "HAS_FLAGS"),
        (SEND_FLUSH, "SEND_FLUSH"),
        (SEND_FUA, "SEND_FUA"),
        (SEND_TRIM, "SEND_TRIM"),
        (SEND_WRITE_ZEROES, "SEND_WRITE_ZEROES"),
        (SEND_DF, "SEND_DF"),
    ] {
        assert_ne!(attached.flags & flag, 0, "{name} in {:#x}", attached.flags);
    }
    assert_eq!(attached.flags & READ_ONLY, 0);
    client.disconnect();
}

#[test]
fn writes_read_back_and_flush_fua_trim_and_write_zeroes_do_what_they_say() {
    let server = InProcessServer::memory(&[("disk", "16MiB")]);
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    let data: Vec<u8> = (0..3 * 65536u32).map(|i| (i * 7 + i / 4096) as u8).collect();
    client.write_ok(1, MIB + 100, &data);
    assert_eq!(client.read_ok(2, MIB + 100, data.len() as u32), data);

    client.send_write(CMD_FLAG_FUA, 3, 0, b"forced unit access");
    assert_eq!(client.read_simple_reply(), (0, 3));
    client.send_request(0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(client.read_simple_reply(), (0, 4));
    assert_eq!(client.read_ok(5, 0, 18), b"forced unit access");

    // Trimmed and zeroed ranges read back as zeroes; the bytes around them stay.
    client.send_request(0, CMD_TRIM, 6, MIB + 100 + 65536, 65536);
    assert_eq!(client.read_simple_reply(), (0, 6));
    client.send_request(0, CMD_WRITE_ZEROES, 7, MIB + 100, 1000);
    assert_eq!(client.read_simple_reply(), (0, 7));
    let mut expected = data.clone();
    expected[65536..2 * 65536].fill(0);
    expected[..1000].fill(0);
    assert_same_bytes(&client.read_ok(8, MIB + 100, data.len() as u32), &expected, "after TRIM and WRITE_ZEROES");

    // Past the end: ENOSPC for a write, EINVAL for a read, and the connection goes on.
    client.send_write(0, 9, 16 * MIB - 1, b"xy");
    assert_eq!(client.read_simple_reply(), (ENOSPC, 9));
    client.send_request(0, CMD_READ, 10, 16 * MIB, 1);
    assert_eq!(client.read_simple_reply(), (EINVAL, 10));
    assert_eq!(client.read_ok(11, 0, 6), b"forced");
    client.disconnect();
}

#[test]
fn structured_reads_come_as_data_and_hole_chunks_and_block_status_shows_data_and_holes() {
    let server = InProcessServer::memory(&[("disk", "8MiB")]);
    let (mut client, _) = RawClient::attach(server.nbd, "disk", true);
    let data = vec![0xa5u8; MIB as usize];
    client.send_write(0, 1, 2 * MIB, &data);
    assert_eq!(client.read_reply_errno(1), 0);

    // A read over data and a hole: the chunks tile the request exactly, hole chunks read as zero.
    client.send_request(0, CMD_READ, 2, MIB, 3 * MIB as u32);
    let mut assembled = vec![0xffu8; 3 * MIB as usize];
    let mut covered = 0u64;
    for chunk in client.read_structured_reply(2) {
        let offset = u64_at(&chunk.payload, 0);
        assert!(offset >= MIB, "chunk at {offset}");
        let at = (offset - MIB) as usize;
        match chunk.chunk_type {
            CHUNK_OFFSET_DATA => {
                let bytes = &chunk.payload[8..];
                assembled[at..at + bytes.len()].copy_from_slice(bytes);
                covered += bytes.len() as u64;
            }
            CHUNK_OFFSET_HOLE => {
                let length = u32_at(&chunk.payload, 8) as usize;
                assembled[at..at + length].fill(0);
                covered += length as u64;
            }
            other => panic!("a read reply chunk of type {other:#x}"),
        }
    }
    assert_eq!(covered, 3 * MIB, "the chunks cover the read exactly once");
    let mut expected = vec![0u8; 3 * MIB as usize];
    expected[MIB as usize..2 * MIB as usize].fill(0xa5);
    assert_same_bytes(&assembled, &expected, "the structured read");

    // base:allocation: the written megabyte is data, the rest holes that read as zeroes.
    client.send_request(0, CMD_BLOCK_STATUS, 3, 0, 8 * MIB as u32);
    let chunks = client.read_structured_reply(3);
    assert_eq!(chunks.len(), 1);
    assert_eq!(chunks[0].chunk_type, CHUNK_BLOCK_STATUS);
    let extents: Vec<(u64, u32)> =
        chunks[0].payload[4..].chunks(8).map(|e| (u64::from(u32_at(e, 0)), u32_at(e, 4))).collect();
    let state_at = |offset: u64| {
        let mut start = 0;
        for &(length, flags) in &extents {
            if offset < start + length {
                return flags;
            }
            start += length;
        }
        panic!("no extent covers {offset}: {extents:?}");
    };
    assert_eq!(state_at(2 * MIB), 0, "written data: {extents:?}");
    assert_eq!(state_at(3 * MIB - 1), 0, "written data: {extents:?}");
    assert_eq!(state_at(0), STATE_HOLE | STATE_ZERO, "{extents:?}");
    assert_eq!(state_at(3 * MIB), STATE_HOLE | STATE_ZERO, "{extents:?}");
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), 8 * MIB, "{extents:?}");

    // A request out of range is an error chunk with the errno.
    client.send_request(0, CMD_READ, 4, 8 * MIB, 1);
    let chunks = client.read_structured_reply(4);
    assert_eq!((chunks[0].chunk_type, u32_at(&chunks[0].payload, 0)), (CHUNK_ERROR, EINVAL));
    client.disconnect();
}

#[test]
fn a_delayed_injected_error_is_overtaken_by_later_requests_and_keeps_the_write_off_storage() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("fail.yaml");
    std::fs::write(
        &policy,
        "seed: 1\n\
         rules:\n\
         \x20 - name: fail-first-block\n\
         \x20   when: { op: write, range: 0..4KiB }\n\
         \x20   then: { error: EIO, delay: 300ms }\n",
    )
    .unwrap();
    let server = InProcessServer::start(Overrides {
        exports: vec!["disk=memory:4MiB".into()],
        policies: vec![format!("disk={}", policy.display())],
        ..Overrides::default()
    });
    let (mut client, _) = RawClient::attach(server.nbd, "disk", false);
    let sent = Instant::now();
    client.send_write(0, 1, 0, &[0x11; 4096]);
    client.send_write(0, 2, MIB, &[0x22; 4096]);
    client.send_request(0, CMD_READ, 3, MIB, 4096);

    // The later write and read are answered first, while the failing write waits out its delay.
    assert_eq!(client.read_simple_reply(), (0, 2));
    assert_eq!(client.read_simple_reply(), (0, 3));
    assert_eq!(client.read_exact_vec(4096), [0x22; 4096]);
    assert_eq!(client.read_simple_reply(), (EIO, 1), "the failed write's reply comes last");
    let waited = sent.elapsed();
    assert!(waited >= Duration::from_millis(300), "the error came after its delay, not {waited:?}");

    // The failed write never reached storage; a write elsewhere in the block range is untouched.
    assert_eq!(client.read_ok(4, 0, 4096), [0; 4096]);
    client.write_ok(5, 4096, &[0x33; 512]);
    assert_eq!(client.read_ok(6, 4096, 512), [0x33; 512]);
    client.disconnect();
}
