//! The recipes of docs/policy-reference.md, each a file of policies/scenarios/, run as written
//! against the real server with real clients (python3-libnbd, qemu-io, nbdcopy), checking that
//! each does what its comment and the reference say.

mod common;

use std::path::{Path, PathBuf};

use common::control::{Api, Connections, ops, poll};
use common::{DEBUGFS, MKFS_EXT4, NBDCOPY, NBDINFO, PYTHON_NBD, QEMU_IO, Server, require, run, run_ok};
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn recipe(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/scenarios").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn disk() -> (Server, Api) {
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    (server, api)
}

#[track_caller]
fn assert_all(data: &[u8], byte: u8, what: &str) {
    if let Some(at) = data.iter().position(|&b| b != byte) {
        panic!("{what}: byte {at} of {} is {:#04x}, expected {byte:#04x}", data.len(), data[at]);
    }
}

fn errno(result: &Value) -> Option<&str> {
    result["errno"].as_str()
}

fn read_data(result: &Value) -> Vec<u8> {
    assert_eq!(errno(result), None, "{result}");
    let hex = result["data"].as_str().unwrap();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// qemu-io with a write-back cache: its writes are plain writes, made durable by its flushes (by
/// default qemu-io writes through, with FUA). It also flushes when it closes the device.
fn qemu_io_writeback(uri: &str, commands: &[&str]) -> (bool, String) {
    let output = common::qemu_io(uri, &["-t", "writeback"], commands);
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success() && !text.contains("failed"), text)
}

#[test]
fn recipe_fsync_retry_after_a_failed_flush_only_the_retry_makes_the_data_durable() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", &recipe("fsync-retry-after-failed-flush.yaml"));
    let mut probe = Connections::start(
        &server.uri("disk"),
        1,
        &[
            "1:write 0 4096 0x41",
            "pause", // arm flush-fails
            "1:flush",
            "pause", // power cut
            "1:reconnect",
            "1:read 0 4096",
            "1:write 0 4096 0x41",
            "pause", // arm flush-fails again
            "1:flush",
            "1:flush",
            "1:write 4096 4096 0x42",
            "pause", // power cut
            "1:reconnect",
            "1:read 0 8192",
        ],
    );
    probe.until_pause();
    api.arm("disk", "flush-fails");
    probe.go_on();
    let failed = probe.until_pause();
    assert_eq!(errno(&failed[0]), Some("EIO"), "the first flush after arming fails: {failed:?}");
    api.post("/v1/exports/disk/power-cut").expect(200);
    probe.go_on();
    let after_failed = probe.until_pause();
    assert_all(&read_data(&after_failed[1]), 0, "a write whose only flush failed is lost in a power cut");
    api.disarm("disk", "flush-fails");
    api.arm("disk", "flush-fails");
    probe.go_on();
    let retried = probe.until_pause();
    assert_eq!(errno(&retried[0]), Some("EIO"), "a new arming fails the first flush again: {retried:?}");
    assert_eq!(errno(&retried[1]), None, "the retry succeeds: {retried:?}");
    let cut = api.post("/v1/exports/disk/power-cut").expect(200).json();
    assert_eq!(cut["undone_writes"], 1, "only the write after the retry was unflushed: {cut}");
    probe.go_on();
    let after_retry = probe.finish();
    let data = read_data(&after_retry[1]);
    assert_all(&data[..4096], 0x41, "the write a retried flush covered survives the power cut");
    assert_all(&data[4096..], 0, "the write after it, never flushed, does not");
}

#[test]
fn recipe_power_loss_cuts_at_the_commit_drops_qemu_io_and_keeps_the_export_off_until_power_on() {
    require!(QEMU_IO, NBDINFO);
    let (server, api) = disk();
    api.set_policy("disk", &recipe("power-loss.yaml"));
    let uri = server.uri("disk");
    let (ok, said) = qemu_io_writeback(&uri, &["write -P 0x11 0 64k", "flush"]);
    assert!(ok, "{said}");
    api.arm("disk", "crash");
    let (ok, said) = qemu_io_writeback(&uri, &["write -P 0x22 64k 64k", "flush"]);
    assert!(!ok, "the commit meets the power cut: {said}");
    let refused = run(NBDINFO.command().arg(&uri));
    assert!(!refused.status.success(), "off until power-on is armed");
    assert_eq!(api.export("disk")["power"]["until"], "power-on");
    api.disarm("disk", "crash");
    api.arm("disk", "power-on");
    poll("the export comes back once power-on is armed", || {
        run(NBDINFO.command().arg(&uri)).status.success().then_some(())
    });
    let (ok, said) = qemu_io_writeback(&uri, &["read -P 0x11 0 64k", "read -P 0 64k 64k"]);
    assert!(ok, "the flushed write survives, the unflushed one is gone:\n{said}");
    // The fault log: the flush that met the cut (with what the cut undid), then the power-on.
    let records = api.faults("disk", 0);
    assert_eq!((records.len(), records[0]["op"].as_str()), (2, Some("flush")), "{records:#?}");
    assert_eq!(records[0]["power_off"]["until"], "power-on");
    assert_eq!(records[0]["cut"]["undone"], serde_json::json!([[65536, 65536]]), "{records:#?}");
    assert_eq!((records[1]["event"].as_str(), records[1]["origin"].as_str()), (Some("power_on"), Some("trigger")));
    assert_eq!(records[1]["trigger"], "power-on");
}

/// Runs the torn-large-writes recipe on a fresh server; returns the bytes of the 1 MiB write that
/// reached storage.
fn tear_once() -> u64 {
    let (server, api) = disk();
    api.set_policy("disk", &recipe("torn-large-writes.yaml"));
    let uri = server.uri("disk");
    api.arm("disk", "crash");
    // One qemu-io: it flushes when it closes the device, which would make earlier writes durable.
    let (ok, said) = qemu_io_writeback(&uri, &["write -P 0x44 4M 4k", "write -P 0x55 8M 60k", "write -P 0x33 0 1M"]);
    assert!(!ok, "the large write meets the power cut:\n{said}");
    assert!(said.contains("wrote 61440/61440 bytes"), "writes under 64 KiB never tear:\n{said}");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 1, "{records:#?}");
    let persist = records[0]["torn_persist"].as_u64().expect("a torn record says how much persisted");
    assert!((4 * KIB..=60 * KIB).contains(&persist) && persist % (4 * KIB) == 0, "{persist}");
    assert_eq!(records[0]["persisted"], persist);
    let stored = api.data("disk", 0, MIB);
    assert_all(&stored[..persist as usize], 0x33, "the part of the torn write that reached the medium");
    assert_all(&stored[persist as usize..], 0, "the rest of the torn write");
    assert_all(&api.data("disk", 4 * MIB, 4 * KIB), 0, "an earlier unflushed write is undone");
    assert_all(&api.data("disk", 8 * MIB, 60 * KIB), 0, "so is the small write");
    // The power is back at once: the torn page reads back as it is.
    let (ok, said) = qemu_io_writeback(&uri, &[&format!("read -P 0x33 0 {persist}")]);
    assert!(ok, "{said}");
    persist
}

#[test]
fn recipe_torn_large_writes_tears_only_large_writes_at_the_power_cut_the_same_way_each_run() {
    require!(QEMU_IO);
    let first = tear_once();
    assert_eq!(tear_once(), first, "the same seed tears the same way");
}

#[test]
fn recipe_latency_spike_delays_the_same_requests_by_the_same_amounts_at_every_arming() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", &recipe("latency-spike.yaml"));
    let reads: Vec<String> = (0..100).map(|i| format!("read {} 4096", i * 4096)).collect();
    let mut spikes = Vec::new();
    let mut seen = 0;
    for _ in 0..2 {
        api.arm("disk", "spike");
        let first = api.export("disk")["requests_decided"].as_u64().unwrap();
        assert!(ops(&server.uri("disk"), &reads).iter().all(|r| r.ok()));
        api.disarm("disk", "spike");
        let records = api.wait_for_faults("disk", seen + 20);
        let spike: Vec<(u64, u64)> = records[seen..]
            .iter()
            .map(|r| (r["request_index"].as_u64().unwrap() - first, r["delay_ns"].as_u64().unwrap()))
            .collect();
        seen = records.len();
        spikes.push(spike);
    }
    let first = &spikes[0];
    assert_eq!(first.len(), 20, "the spike ends after 20 delayed requests: {first:?}");
    assert!(first.iter().all(|&(_, delay)| (20_000_000..=100_000_000).contains(&delay)), "{first:?}");
    assert!(first.last().unwrap().0 < 99, "the last requests of the run were fast again: {first:?}");
    let mut second = spikes[1].clone();
    second.sort();
    let mut sorted = first.clone();
    sorted.sort();
    assert_eq!(sorted, second, "every arming, the same requests (counted from it) wait the same");
}

/// The extents of `/data.bin` in an ext4 image with 4 KiB blocks, as byte ranges `START..+LENGTH`.
fn file_extents(image: &Path) -> Vec<(u64, u64)> {
    let output = run_ok(DEBUGFS.command().args(["-R", "blocks /data.bin"]).arg(image));
    let blocks: Vec<u64> = output.split_whitespace().map(|block| block.parse().expect("a block number")).collect();
    assert!(!blocks.is_empty(), "debugfs found no blocks:\n{output}");
    let mut extents: Vec<(u64, u64)> = Vec::new();
    for block in blocks {
        match extents.last_mut() {
            Some((start, length)) if *start + *length == block => *length += 1,
            _ => extents.push((block, 1)),
        }
    }
    extents.into_iter().map(|(start, length)| (start * 4 * KIB, length * 4 * KIB)).collect()
}

#[test]
fn recipe_failing_one_files_extents_fails_that_file_and_nothing_else_of_the_filesystem() {
    require!(MKFS_EXT4, DEBUGFS, NBDCOPY, PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let content = dir.path().join("content");
    std::fs::create_dir(&content).unwrap();
    std::fs::write(content.join("data.bin"), vec![0xd5u8; 256 * KIB as usize]).unwrap();
    std::fs::write(content.join("other.bin"), vec![0x0fu8; 64 * KIB as usize]).unwrap();
    let image: PathBuf = dir.path().join("fs.img");
    run_ok(MKFS_EXT4.command().args(["-q", "-b", "4096", "-d"]).arg(&content).arg(&image).arg("32M"));
    let extents = file_extents(&image);
    let ranges: Vec<String> = extents.iter().map(|(start, length)| format!("{start}..+{length}")).collect();
    let text = recipe("fail-one-files-extents.yaml");
    assert_eq!(text.matches("range: [1MiB..+64KiB, 3MiB..+12KiB]").count(), 1, "the recipe's example ranges");
    let policy = text.replace("range: [1MiB..+64KiB, 3MiB..+12KiB]", &format!("range: [{}]", ranges.join(", ")));

    let server = Server::builder().export("fs", format!("overlay:{}", image.display())).with_control().start();
    let api = Api::new(&server);
    api.set_policy("fs", &policy);
    let uri = server.uri("fs");
    let copy = dir.path().join("copy.img");
    run_ok(NBDCOPY.command().arg(&uri).arg(&copy));
    api.arm("fs", "file-bad");
    let failed = run(NBDCOPY.command().arg(&uri).arg(&copy));
    assert!(!failed.status.success(), "copying the device reads the file's extents, which fail");
    let (start, length) = extents[0];
    let r = ops(
        &uri,
        &[
            format!("read {start} 4096"),
            format!("read {} 4096", start + length - 4096),
            "read 1024 1024".to_string(),
            format!("write {start} 4096 1"),
        ],
    );
    r[0].expect_errno("EIO");
    r[1].expect_errno("EIO");
    assert_eq!(&r[2].expect_ok().data[56..58], &[0x53, 0xef], "the superblock (its magic) still reads");
    r[3].expect_errno("EIO");
    // The other file's blocks read.
    let other = run_ok(DEBUGFS.command().args(["-R", "blocks /other.bin"]).arg(&image));
    let block: u64 = other.split_whitespace().next().unwrap().parse().unwrap();
    let r = ops(&uri, &[format!("read {} 4096", block * 4 * KIB)]);
    assert!(r[0].expect_ok().data.iter().all(|&b| b == 0x0f), "another file is untouched");
    api.disarm("fs", "file-bad");
    run_ok(NBDCOPY.command().arg(&uri).arg(&copy));
    assert!(api.faults("fs", 0).iter().all(|r| r["rule"] == "file-extents-fail"));
}
