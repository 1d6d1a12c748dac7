//! libnbd (python3-libnbd) with strict mode off: out-of-range, unknown, oversized and
//! zero-length requests, each answered with the right error while the connection goes on; the
//! option phase; old clients; and many connections with many requests in flight.
//!
//! The scenarios live in `python/nbd_probe.py`; each test runs one against a fresh server.

mod common;

use common::{PYTHON_NBD, Server, require, run_probe};

fn writable() -> Server {
    Server::builder().export("disk", "memory:64MiB").start()
}

#[test]
fn out_of_range_requests_get_enospc_for_writes_and_einval_otherwise_and_the_connection_goes_on() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("out-of-range", &[&server.uri("disk")]);
}

#[test]
fn unknown_and_misplaced_flags_get_einval_and_the_connection_goes_on() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("unknown-flags", &[&server.uri("disk")]);
}

#[test]
fn oversized_reads_and_writes_are_refused_without_allocating_their_size() {
    require!(PYTHON_NBD);
    let server = writable();
    // Data under the oversized READs: a server that served them would copy it, touching memory.
    run_probe("fill", &[&server.uri("disk"), "40"]);
    let before = server.peak_memory();
    run_probe("oversized", &[&server.uri("disk")]);
    let grown = server.peak_memory().saturating_sub(before);
    assert!(grown < 24 << 20, "refusing 32-64 MiB requests made the server allocate {} MiB", grown >> 20);
}

#[test]
fn the_largest_reads_and_writes_and_larger_zeroes_trims_and_caches_succeed() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("largest", &[&server.uri("disk")]);
}

#[test]
fn zero_length_requests_succeed_and_the_connection_goes_on() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("zero-length", &[&server.uri("disk")]);
}

#[test]
fn writes_to_a_read_only_export_get_eperm_and_the_connection_goes_on() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("ro", "memory:8MiB").args(["--read-only", "ro"]).start();
    run_probe("read-only", &[&server.uri("ro")]);
}

#[test]
fn block_status_reports_data_and_holes_with_and_without_req_one() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("block-status", &[&server.uri("disk")]);
}

#[test]
fn df_reads_arrive_in_one_chunk_and_need_structured_replies() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("df", &[&server.uri("disk")]);
}

#[test]
fn fast_zero_zeroes_or_fails_with_enotsup_changing_nothing() {
    require!(PYTHON_NBD);
    let server = writable();
    run_probe("fast-zero", &[&server.uri("disk")]);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 8 << 20);
    let server = Server::builder().export("file", &image).start();
    run_probe("fast-zero", &[&server.uri("file")]);
}

#[test]
fn option_phase_lists_informs_aborts_and_goes() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("nbdfault.yaml");
    std::fs::write(
        &config,
        "exports:\n  - {name: '', storage: 'memory:1MiB'}\n  - {name: disk, description: the disk, storage: 'memory:8MiB'}\n  - {name: ro, storage: 'memory:1MiB', read_only: true}\n",
    )
    .unwrap();
    let server = Server::builder().arg("--config").arg(&config).start();
    run_probe("options", &["127.0.0.1", &server.port().to_string()]);
}

#[test]
fn old_clients_without_structured_replies_or_fixed_newstyle_work() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("disk", "memory:8MiB").start();
    run_probe("old-clients", &[&server.uri("disk")]);
}

#[test]
fn four_connections_with_128_requests_in_flight_each_read_back_every_byte() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 64 << 20);
    let base = dir.path().join("base.img");
    std::fs::write(&base, common::random_bytes(64 << 20)).unwrap();
    let mut overlay = std::ffi::OsString::from("overlay:");
    overlay.push(&base);
    let server = Server::builder().export("mem", "memory:64MiB").export("file", &image).export("cow", overlay).start();
    for export in ["mem", "file", "cow"] {
        let output = run_probe("multi-conn", &[&server.uri(export), "4", "64"]);
        assert!(output.contains("blocks checked"), "{export}: {output}");
    }
}

#[test]
fn zeroes_and_trims_of_nearly_4_gib_succeed_and_leave_a_file_export_sparse() {
    require!(PYTHON_NBD);
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("huge.img");
    common::empty_image(&image, 8 << 30);
    let server = Server::builder().export("mem", "memory:8GiB").export("file", &image).start();
    run_probe("huge-zero", &[&server.uri("mem")]);
    run_probe("huge-zero", &[&server.uri("file")]);
    // Zeroing without NO_HOLE punches holes; writing 4 GiB of zeros would have filled the disk.
    let allocated = std::fs::metadata(&image).unwrap().blocks() * 512;
    assert!(allocated < 64 << 20, "the 8 GiB image has {} MiB allocated after zeroing", allocated >> 20);
    assert!(server.peak_memory() < 256 << 20, "zeroing 4 GiB must not need memory of its size");
}

#[test]
fn connections_writing_neighbouring_blocks_of_the_same_chunks_at_once_lose_nothing() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    common::empty_image(&image, 8 << 20);
    let base = dir.path().join("base.img");
    std::fs::write(&base, common::random_bytes(8 << 20)).unwrap();
    let mut overlay = std::ffi::OsString::from("overlay:");
    overlay.push(&base);
    let server = Server::builder().export("mem", "memory:8MiB").export("file", &image).export("cow", overlay).start();
    for export in ["mem", "file", "cow"] {
        let output = run_probe("interleaved", &[&server.uri(export), "4", "128"]);
        assert!(output.contains("blocks checked"), "{export}: {output}");
    }
}
