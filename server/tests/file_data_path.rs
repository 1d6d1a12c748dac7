//! The file data path and its fallback, each against real clients: the default path (requests
//! that cannot wait served on the async thread, whole-page writes copied into the page cache
//! there where `RWF_NOWAIT` writes are refused, the rest on the I/O threads) and the one
//! `NBDFAULT_FILE_IO=threads` forces (every request on the I/O threads), on an image in memory
//! (tmpfs) and on the disk. Each serves reads, writes, flush, trim and zeroes byte for byte
//! (nbdcopy and qemu-io) and still injects faults.

mod common;

use std::path::{Path, PathBuf};

use common::control::Api;
use common::{FIO, NBDCOPY, QEMU_IO, Server, assert_same_bytes, qemu_io, require, run_ok};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 64 * MIB;

/// A policy that fails writes to one MiB of the image, and nothing else.
const POLICY: &str = "rules: [{name: bad-spot, when: {op: write, range: 60MiB..61MiB}, then: {error: EIO}}]\n";

/// Where the image lives: a directory on tmpfs, or one on the disk the tests run from.
fn image_dir(in_memory: bool) -> tempfile::TempDir {
    if in_memory && Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm")
    } else {
        tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("a directory on the disk")
    }
}

fn serve(image: &Path, path: &str, dir: &Path) -> Server {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let mut export = std::ffi::OsString::from("file:");
    export.push(image);
    let mut policy_arg = std::ffi::OsString::from("img=");
    policy_arg.push(&policy);
    Server::builder()
        .export("img", export)
        .arg("--policy")
        .arg(policy_arg)
        .with_control()
        .env("NBDFAULT_FILE_IO", path)
        .start()
}

fn qemu_io_ok(uri: &str, commands: &[&str]) {
    let output = qemu_io(uri, &[], commands);
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "qemu-io {commands:?}:\n{text}");
    for bad in ["verification failed", "failed", "error", "Error"] {
        assert!(!text.contains(bad), "qemu-io {commands:?} reported `{bad}`:\n{text}");
    }
}

/// Everything one path must do right on one image.
fn serves_every_request_and_injects_faults(path: &str, in_memory: bool) {
    let dir = image_dir(in_memory);
    let image: PathBuf = dir.path().join("disk.img");
    common::empty_image(&image, SIZE);
    let server = serve(&image, path, dir.path());
    let uri = server.uri("img");
    let api = Api::new(&server);

    // 32 MiB of random data in and out with nbdcopy, many requests in flight on 4 connections.
    let data = common::random_bytes((32 * MIB) as usize);
    let source = dir.path().join("in.raw");
    std::fs::write(&source, &data).unwrap();
    let nbdcopy = || NBDCOPY.command();
    run_ok(nbdcopy().args(["--connections=4", "--requests=32", "--flush"]).arg(&source).arg(&uri));
    let back = dir.path().join("out.raw");
    run_ok(nbdcopy().args(["--connections=4", "--requests=32"]).arg(&uri).arg(&back));
    let back_data = std::fs::read(&back).unwrap();
    assert_same_bytes(&back_data[..data.len()], &data, &format!("{path}: nbdcopy in and out"));
    assert!(back_data[data.len()..].iter().all(|&b| b == 0), "{path}: the rest of the image reads as zeros");
    assert_same_bytes(&std::fs::read(&image).unwrap()[..data.len()], &data, &format!("{path}: the image file"));

    // Writes (plain, FUA, large, unaligned), zeroes, trim and flush, each read back by pattern.
    qemu_io_ok(
        &uri,
        &[
            "write -P 0xa5 40M 4k",
            "write -P 0x5a -f 41947136 4k",
            "write -P 0x3c 41M 1M",
            "write -P 0x11 44040199 1000",
            "write -z 43057152 64k",
            "discard 43M 1M",
            "flush",
            "read -P 0xa5 40M 4k",
            "read -P 0x5a 41947136 4k",
            "read -P 0x3c 41M 64k",
            "read -P 0 43057152 64k",
            "read -P 0x3c 43122688 896k",
            "read -P 0x11 44040199 1000",
            "read -P 0 43M 1M",
        ],
    );
    let file = std::fs::read(&image).unwrap();
    assert!(file[(40 * MIB) as usize..(40 * MIB + 4096) as usize].iter().all(|&b| b == 0xa5), "{path}: in the file");

    // The policy still decides: a write to the bad spot fails and is logged; its neighbour works.
    let failed = qemu_io(&uri, &[], &["write -P 0xee 60M 4k"]);
    let text = format!("{}{}", String::from_utf8_lossy(&failed.stdout), String::from_utf8_lossy(&failed.stderr));
    assert!(text.contains("Input/output error"), "{path}: the injected EIO reaches the client:\n{text}");
    qemu_io_ok(&uri, &["write -P 0xee 61M 4k", "read -P 0xee 61M 4k"]);
    let faults = api.wait_for_faults("img", 1);
    assert_eq!(faults[0]["rule"], "bad-spot", "{faults:?}");
    assert!(std::fs::read(&image).unwrap()[(60 * MIB) as usize..(60 * MIB + 4096) as usize].iter().all(|&b| b == 0));

    // The control API says which path serves the export.
    let data_path = &api.export("img")["data_path"];
    let expected_engine = if path == "threads" { "threads" } else { "inline+threads" };
    assert_eq!(data_path["engine"], expected_engine, "{data_path}");
    assert_eq!(data_path["io_threads"], 2, "{data_path}");
    if path == "threads" {
        assert_eq!((data_path["reads"].as_str(), data_path["writes"].as_str()), (Some("threads"), Some("threads")));
    } else if in_memory && dir.path().starts_with("/dev/shm") {
        assert_eq!((data_path["reads"].as_str(), data_path["writes"].as_str()), (Some("inline"), Some("inline")));
    } else if !in_memory {
        // Cached reads with RWF_NOWAIT; writes with RWF_NOWAIT where the file system takes it
        // (XFS, btrfs), else copied into the page cache on the async thread (ext4).
        assert_eq!(data_path["reads"], "nowait", "{data_path}");
        assert!(matches!(data_path["writes"].as_str(), Some("nowait" | "buffered")), "{data_path}");
    }
    assert!(server.stderr().contains(expected_engine), "the path is logged at start:\n{}", server.stderr());
}

#[test]
fn the_default_path_serves_a_tmpfs_image_byte_for_byte_and_injects_faults() {
    require!(NBDCOPY, QEMU_IO);
    serves_every_request_and_injects_faults("auto", true);
}

#[test]
fn the_default_path_serves_a_disk_image_byte_for_byte_and_injects_faults() {
    require!(NBDCOPY, QEMU_IO);
    serves_every_request_and_injects_faults("auto", false);
}

#[test]
fn the_io_threads_fallback_serves_a_tmpfs_image_byte_for_byte_and_injects_faults() {
    require!(NBDCOPY, QEMU_IO);
    serves_every_request_and_injects_faults("threads", true);
}

#[test]
fn the_io_threads_fallback_serves_a_disk_image_byte_for_byte_and_injects_faults() {
    require!(NBDCOPY, QEMU_IO);
    serves_every_request_and_injects_faults("threads", false);
}

#[test]
fn the_server_never_runs_more_threads_than_cores_plus_four_under_load() {
    require!(FIO);
    let dir = image_dir(false);
    let image = dir.path().join("disk.img");
    common::empty_image(&image, SIZE);
    let server = serve(&image, "auto", dir.path());
    let uri = server.uri("img");
    let cores = std::thread::available_parallelism().map_or(2, usize::from);
    // Random 4k writes at depth 64 on 4 connections, clear of the failing spot: under the
    // blocking pool this grew past 100.
    let mut fio = FIO.command();
    fio.args(["--name=load", "--ioengine=nbd", "--rw=randrw", "--bs=4k", "--iodepth=64", "--numjobs=4"])
        .args(["--size=32M", "--time_based", "--runtime=3", "--group_reporting"])
        .arg(format!("--uri={uri}"));
    let child = std::thread::spawn(move || run_ok(&mut fio));
    let mut most = 0;
    while !child.is_finished() {
        let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
        let threads: usize = status
            .lines()
            .find_map(|line| line.strip_prefix("Threads:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("Threads: in /proc/PID/status");
        most = most.max(threads);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.join().unwrap();
    assert!(most <= cores + 4, "the server ran {most} threads on {cores} cores");
}
