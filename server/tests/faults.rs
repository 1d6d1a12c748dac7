//! Fault injection end to end: a policy installed through the control API, a real client
//! (qemu-io, nbdcopy, python3-libnbd) doing I/O against the real server binary, and the control
//! API's `data` endpoint and fault log saying what reached storage and what was injected.
//!
//! No assertion depends on how fast anything runs: the tests check results, orders and counts;
//! the only times they read are the server's own, as lower bounds.

mod common;

use std::path::{Path, PathBuf};

use common::control::{Api, OpResult, fault_probe, ops, poll};
use common::{NBDCOPY, PYTHON_NBD, QEMU_IO, Server, json, qemu_io, random_image, require, run, run_ok};
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// A server with one 16 MiB memory export named `disk` and its control API.
fn disk() -> (Server, Api) {
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    (server, api)
}

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/scenarios").join(name)
}

fn scenario_text(name: &str) -> String {
    std::fs::read_to_string(scenario(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// True when every byte is `byte`.
fn all(data: &[u8], byte: u8) -> bool {
    !data.is_empty() && data.iter().all(|&b| b == byte)
}

#[track_caller]
fn assert_all(data: &[u8], byte: u8, what: &str) {
    if let Some(at) = data.iter().position(|&b| b != byte) {
        panic!("{what}: byte {at} of {} is {:#04x}, expected every byte to be {byte:#04x}", data.len(), data[at]);
    }
}

/// The one fault record of `records` for `op` at `offset`.
#[track_caller]
fn record_at<'a>(records: &'a [Value], op: &str, offset: u64) -> &'a Value {
    let found: Vec<&Value> = records.iter().filter(|r| r["op"] == op && r["offset"] == offset).collect();
    assert_eq!(found.len(), 1, "expected one {op} record at {offset}: {records:#?}");
    found[0]
}

// ---- real clients ------------------------------------------------------------------------------

#[test]
fn qemu_io_pattern_writes_into_failing_ranges_get_their_errors_while_writes_elsewhere_succeed_and_read_back() {
    require!(QEMU_IO);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - name: bad-range\n    when: { op: write, range: 1MiB..2MiB }\n    then: { error: EIO }\n  \
         - name: full\n    when: { op: write, range: 3MiB..4MiB }\n    then: { error: ENOSPC }\n",
    );
    let uri = server.uri("disk");
    for (write, message) in [
        ("write -P 0xab 1M 4k", "write failed: Input/output error"),
        // Overlapping the start of the range is enough.
        ("write -P 0xab 1048064 1024", "write failed: Input/output error"),
        ("write -P 0xab 2093056 4096", "write failed: Input/output error"),
        ("write -P 0xab 3M 64k", "write failed: No space left on device"),
    ] {
        let output = qemu_io(&uri, &[], &[write]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "`{write}` into a failing range succeeded:\n{stdout}");
        assert!(stdout.contains(message), "`{write}`: expected `{message}`:\n{stdout}");
    }
    // Elsewhere (and right after the half-open end) writes succeed and read back.
    let output = qemu_io(
        &uri,
        &[],
        &[
            "write -P 0xcd 0 64k",
            "write -P 0xef 2M 4k",
            "write -P 0x12 1044480 4096",
            "read -P 0xcd 0 64k",
            "read -P 0xef 2M 4k",
            "read -P 0x12 1044480 4096",
            "read -P 0 1M 1M",
            "read -P 0 3M 64k",
        ],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !stdout.contains("failed"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The failed writes never reached storage.
    assert_all(&api.data("disk", MIB, MIB), 0, "the failing range in storage");
    assert_all(&api.data("disk", 3 * MIB, 64 * KIB), 0, "the full range in storage");
    assert_all(&api.data("disk", 2 * MIB, 4 * KIB), 0xef, "the write after the range in storage");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 4, "one record per failed write: {records:#?}");
    assert_eq!(record_at(&records, "write", 3 * MIB)["errno"], "ENOSPC");
}

#[test]
fn a_length_condition_fails_only_writes_of_those_lengths_from_qemu_io() {
    require!(QEMU_IO);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - name: large-writes\n    when: { op: write, length: \">=64KiB\" }\n    then: { error: EIO }\n  \
         - name: exactly-8k-reads\n    when: { op: read, length: 8KiB }\n    then: { error: ENOSPC }\n",
    );
    let uri = server.uri("disk");
    for (command, fails) in [
        ("write -P 0x11 0 4k", false),
        ("write -P 0x22 1M 60k", false),
        ("write -P 0x33 2M 64k", true),
        ("write -P 0x44 4M 1M", true),
        ("read 0 4k", false),
        ("read 0 8k", true),
        ("read 0 12k", false),
    ] {
        let output = qemu_io(&uri, &[], &[command]);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(stdout.contains("failed"), fails, "`{command}`:\n{stdout}");
    }
    assert_all(&api.data("disk", MIB, 60 * KIB), 0x22, "the 60 KiB write");
    assert_all(&api.data("disk", 2 * MIB, 64 * KIB), 0, "the failed 64 KiB write");
    assert_all(&api.data("disk", 4 * MIB, MIB), 0, "the failed 1 MiB write");
    let records = api.faults("disk", 0);
    let lengths: Vec<(u64, &str)> =
        records.iter().map(|r| (r["length"].as_u64().unwrap(), r["rule"].as_str().unwrap())).collect();
    assert_eq!(lengths, [(64 * KIB, "large-writes"), (MIB, "large-writes"), (8 * KIB, "exactly-8k-reads")]);
}

#[test]
fn nth_with_armed_by_fails_the_first_flush_after_each_arming_and_lifetime_counts_across_armings() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - name: first-flush-per-arming\n    when: { op: flush, armed_by: go, nth: 1 }\n    then: { error: EIO }\n  \
         - name: second-write-ever\n    when: { op: write, armed_by: go, nth: 2, count: lifetime }\n    then: { error: ENOSPC }\n",
    );
    let uri = server.uri("disk");
    let mut flushes = Vec::new();
    let mut writes = Vec::new();
    for _ in 0..3 {
        api.arm("disk", "go");
        let r = ops(&uri, &["flush", "flush", "write 0 512 1"]);
        flushes.push([r[0].errno.clone(), r[1].errno.clone()]);
        writes.push(r[2].errno.clone());
        api.disarm("disk", "go");
    }
    let eio = Some("EIO".to_string());
    assert_eq!(flushes, [[eio.clone(), None], [eio.clone(), None], [eio, None]], "once per arming");
    assert_eq!(writes, [None, Some("ENOSPC".to_string()), None], "count: lifetime counts across armings");
    let counters = &api.export("disk")["policy"]["rules"];
    assert_eq!(counters[0], serde_json::json!({"rule": "first-flush-per-arming", "occurrences": 6, "fired": 3}));
}

#[test]
fn nbdcopy_over_a_failing_range_fails_and_succeeds_once_the_policy_is_removed() {
    require!(NBDCOPY);
    let (server, api) = disk();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("source.img");
    let data = random_image(&image, 16 << 20, false);
    api.set_policy("disk", "rules: [{name: bad-block, when: {op: write, range: 10MiB..+4KiB}, then: {error: EIO}}]");
    let output = run(NBDCOPY.command().arg(&image).arg(server.uri("disk")));
    assert!(!output.status.success(), "nbdcopy over a failing range succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Input/output error"), "nbdcopy names the error: {stderr}");
    assert!(api.faults("disk", 0).iter().all(|r| r["rule"] == "bad-block" && r["errno"] == "EIO"));
    assert_all(&api.data("disk", 10 * MIB, 4 * KIB), 0, "the failing block in storage");

    api.clear_policy("disk");
    run_ok(NBDCOPY.command().arg(&image).arg(server.uri("disk")));
    common::assert_same_bytes(&api.data("disk", 0, 16 << 20), &data, "storage after a copy without policy");
}

#[test]
fn libnbd_sees_each_configured_errno_unchanged_on_writes_and_reads() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    let errnos = ["EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN"];
    let mut policy = String::from("rules:\n");
    for (i, errno) in errnos.iter().enumerate() {
        let start = MIB + i as u64 * 64 * KIB;
        policy += &format!(
            "  - {{ name: {errno}-range, when: {{ op: [write, read], range: {start}..+64KiB }}, then: {{ error: {errno} }} }}\n"
        );
    }
    api.set_policy("disk", &policy);
    let mut list = Vec::new();
    for i in 0..errnos.len() as u64 {
        let start = MIB + i * 64 * KIB;
        list.push(format!("write {start} 4096 7"));
        list.push(format!("read {} 4096", start + 60 * KIB));
    }
    list.push("write 0 4096 7".to_string());
    list.push("read 0 4096".to_string());
    let results = ops(&server.uri("disk"), &list);
    for (i, errno) in errnos.iter().enumerate() {
        results[2 * i].expect_errno(errno);
        results[2 * i + 1].expect_errno(errno);
    }
    assert_all(&results[2 * errnos.len() + 1].expect_ok().data, 7, "a read outside the failing ranges");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 2 * errnos.len());
    for (i, errno) in errnos.iter().enumerate() {
        assert_eq!(record_at(&records, "write", MIB + i as u64 * 64 * KIB)["errno"], *errno);
    }
}

// ---- asynchronous replies ----------------------------------------------------------------------

#[test]
fn a_delayed_error_reply_is_overtaken_by_later_requests_on_the_same_handle() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules: [{name: late-error, when: {op: write, range: 0..4KiB}, then: {error: EIO, delay: 1s}}]",
    );
    let report = json(&run_ok(fault_probe("overtaken").arg(server.uri("disk")).args(["0", "8"])));
    let order: Vec<&str> = report["order"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(order.len(), 9, "{report}");
    assert_eq!(order.last(), Some(&"delayed"), "the delayed write completes last, after 8 later requests: {report}");
    assert_eq!(report["errors"], serde_json::json!({"delayed": "EIO"}), "only the delayed write fails, with EIO");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 1, "{records:#?}");
    let record = &records[0];
    assert_eq!((record["request_index"].as_u64(), record["outcome"].as_str()), (Some(0), Some("error")));
    assert_eq!(record["delay_ns"], 1_000_000_000u64);
    assert!(record["waited_ns"].as_u64().unwrap() >= 1_000_000_000, "the server held it its full delay: {record}");
    assert_all(&api.data("disk", 0, 4 * KIB), 0, "the failed write in storage");
    assert_all(&api.data("disk", 64 * KIB, 4 * KIB), 1, "a later write in storage");
}

/// Runs `fault_probe.py stalled` with 8 other requests per batch; returns its report.
fn stalled(server: &Server, api: &Api, release: &str, between: &[&str]) -> Value {
    let mut command = fault_probe("stalled");
    command.arg(server.uri("disk")).args(["0", "8", api.base(), release]).args(between);
    json(&run_ok(&mut command))
}

fn completion_order(report: &Value) -> Vec<&str> {
    report["order"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect()
}

#[test]
fn a_stalled_write_stays_in_flight_while_later_requests_complete_until_its_trigger_is_armed_through_the_api() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules: [{name: hold, when: {op: write, range: 0..4KiB}, then: {stall: release, error: EIO}}]",
    );
    let report = stalled(&server, &api, "POST /v1/exports/disk/triggers/release", &[]);
    assert_eq!(
        report["in_flight_before_release"], 1,
        "8 later requests completed while the stalled one waited: {report}"
    );
    let order = completion_order(&report);
    assert_eq!((order.len(), order.last()), (9, Some(&"stalled")), "{report}");
    assert_eq!(report["errors"], serde_json::json!({"stalled": "EIO"}), "released, it fails as the rule says");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["stall"]["trigger"], "release", "{}", records[0]);
    assert_eq!(api.export("disk")["triggers"][0]["armed"], true);
    assert_all(&api.data("disk", 0, 4 * KIB), 0, "the failed write in storage");
}

#[test]
fn a_stall_is_released_by_a_rule_that_arms_its_trigger_and_then_does_its_write() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: hold, when: { op: write, range: 0..4KiB }, then: { stall: release } }\n  \
         - { name: release-on-flush, when: { op: flush }, then: { arm: release } }\n",
    );
    let report = stalled(&server, &api, "flush", &[]);
    assert_eq!(report["in_flight_before_release"], 1, "{report}");
    let order = completion_order(&report);
    assert_eq!(order.len(), 10, "{report}");
    assert_eq!(report["errors"], serde_json::json!({}), "{report}");
    // Held until the flush came: after the 8 other requests. Whether its reply or the flush's
    // goes first is up to the scheduler (the flush arms the trigger before its own reply is
    // sent, and the released write may finish on the other worker first).
    assert!(order.iter().position(|t| *t == "stalled") >= Some(8), "{report}");
    assert_all(&api.data("disk", 0, 4 * KIB), 0x55, "the released write in storage");
    let records = api.faults("disk", 0);
    assert_eq!(record_at(&records, "write", 0)["outcome"], "stall");
    assert_eq!(record_at(&records, "flush", 0)["armed"], serde_json::json!(["release"]));
}

#[test]
fn a_stalled_write_keeps_its_decision_when_the_policy_is_removed_while_it_waits() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: hold, when: { op: write, range: 0..4KiB }, then: { stall: release, error: ENOSPC } }\n  \
         - { name: fail-others, when: { op: write }, then: { error: EIO } }\n",
    );
    let report = stalled(&server, &api, "POST /v1/exports/disk/triggers/release", &["DELETE /v1/exports/disk/policy"]);
    assert_eq!(report["in_flight_before_release"], 1, "{report}");
    let errors = report["errors"].as_object().unwrap();
    assert_eq!(errors.get("stalled").and_then(Value::as_str), Some("ENOSPC"), "decided before the swap: {report}");
    let failed: Vec<&String> = errors.keys().filter(|tag| *tag != "stalled").collect();
    assert!(failed.iter().all(|tag| tag.starts_with("write-0-")), "writes after DELETE pass: {report}");
    assert_eq!(failed.len(), 4, "the writes before DELETE failed: {report}");
}

#[test]
fn a_write_still_stalled_when_the_shutdown_grace_period_ends_is_answered_eshutdown() {
    require!(PYTHON_NBD);
    let mut server =
        Server::builder().export("disk", "memory:16MiB").args(["--shutdown-grace", "100ms"]).with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", "rules: [{name: hold, when: {op: write}, then: {stall: release}}]");
    let mut client = fault_probe("one-write");
    client.arg(server.uri("disk")).arg("0");
    let waiting = std::thread::spawn(move || run_ok(&mut client));
    poll("the write reaches the server", || (api.export("disk")["requests_decided"] == 1).then_some(()));
    let (status, _) = server.stop_with(libc::SIGTERM);
    assert!(status.success(), "{status}");
    let report = json(&waiting.join().unwrap());
    assert_eq!(report["errno"], "ESHUTDOWN", "the stalled write gets an answer, not a closed connection");
}

// ---- each outcome, through a client and the data endpoint --------------------------------------

#[test]
fn an_injected_error_is_reported_and_the_write_does_not_reach_storage() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", "rules: [{name: fail, when: {op: write, range: 1MiB..+64KiB}, then: {error: EIO}}]");
    let r = ops(&server.uri("disk"), &["write 1048576 4096 0x11", "write 2097152 4096 0x22", "read 1048576 4096"]);
    r[0].expect_errno("EIO");
    r[1].expect_ok();
    assert_all(&r[2].expect_ok().data, 0, "a read of the failed write");
    assert_all(&api.data("disk", MIB, 4 * KIB), 0, "the failed write in storage");
    assert_all(&api.data("disk", 2 * MIB, 4 * KIB), 0x22, "the good write in storage");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 1, "reads and writes no rule touched are not logged: {records:#?}");
    let record = &records[0];
    for (field, value) in
        [("rule", "fail"), ("outcome", "error"), ("action", "skip"), ("reply", "error"), ("errno", "EIO")]
    {
        assert_eq!(record[field], value, "{field} in {record}");
    }
    assert_eq!((record["length"].as_u64(), record["persisted"].as_u64()), (Some(4096), Some(0)));
}

#[test]
fn a_persisted_error_reports_failure_but_the_write_reaches_storage() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", "rules: [{name: ambiguous, when: {op: write}, then: {error: EIO, persist: true}}]");
    let r = ops(&server.uri("disk"), &["write 1048576 8192 0x33", "read 1048576 8192"]);
    r[0].expect_errno("EIO");
    assert_all(&r[1].expect_ok().data, 0x33, "a read after the failed write");
    assert_all(&api.data("disk", MIB, 8 * KIB), 0x33, "the failed write in storage");
    let record = &api.faults("disk", 0)[0];
    assert_eq!((record["outcome"].as_str(), record["persisted"].as_u64()), (Some("persisted_error"), Some(8192)));
}

#[test]
fn a_dropped_write_reports_success_but_never_reaches_storage() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", "rules: [{name: lose, when: {op: write, range: 1MiB..2MiB}, then: {drop: true}}]");
    let r = ops(&server.uri("disk"), &["write 1048576 4096 0x44", "flush", "read 1048576 4096", "write 0 4096 0x45"]);
    r[0].expect_ok();
    r[1].expect_ok();
    assert_all(&r[2].expect_ok().data, 0, "a read of the lost write");
    assert_all(&api.data("disk", MIB, 4 * KIB), 0, "the lost write in storage");
    assert_all(&api.data("disk", 0, 4 * KIB), 0x45, "a write outside the range");
    let record = &api.faults("disk", 0)[0];
    assert_eq!((record["outcome"].as_str(), record["reply"].as_str()), (Some("silent_loss"), Some("ok")));
    assert_eq!(record["persisted"], 0);
}

#[test]
fn a_torn_write_persists_only_its_prefix_with_or_without_an_error() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: tear, when: { op: write, range: 1MiB..+1MiB }, then: { torn: 4KiB } }\n  \
         - { name: tear-and-fail, when: { op: write, range: 4MiB..+1MiB }, then: { torn: 3s, error: EIO } }\n",
    );
    let r = ops(&server.uri("disk"), &["write 1048576 16384 0x55", "write 4194304 16384 0x56"]);
    r[0].expect_ok();
    r[1].expect_errno("EIO");
    let stored = api.data("disk", MIB, 16 * KIB);
    assert_all(&stored[..4096], 0x55, "the kept prefix");
    assert_all(&stored[4096..], 0, "the torn-off rest");
    let stored = api.data("disk", 4 * MIB, 16 * KIB);
    assert_all(&stored[..1536], 0x56, "the kept 3 sectors");
    assert_all(&stored[1536..], 0, "the torn-off rest of the failed write");
    let records = api.faults("disk", 0);
    let (first, second) = (record_at(&records, "write", MIB), record_at(&records, "write", 4 * MIB));
    assert_eq!(
        (first["outcome"].as_str(), first["torn_persist"].as_u64(), first["persisted"].as_u64()),
        (Some("torn"), Some(4096), Some(4096))
    );
    assert_eq!((second["reply"].as_str(), second["persisted"].as_u64()), (Some("error"), Some(1536)));
}

#[test]
fn a_corrupted_read_shows_the_client_damaged_data_while_storage_stays_intact() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.write_data("disk", MIB, &[0x66; 8192]);
    api.set_policy(
        "disk",
        "seed: 5\nrules:\n  - { name: rot, when: { op: read, range: 1MiB..+4KiB }, then: { corrupt: 8 } }\n  \
         - { name: fixed-rot, when: { op: read, range: 1052672..+4KiB }, then: { corrupt: { bytes: 8, seed: 7 } } }\n",
    );
    let r = ops(&server.uri("disk"), &["read 1048576 4096", "read 1052672 4096", "read 1052672 4096"]);
    let damaged = r[0].expect_ok().data.iter().filter(|&&b| b != 0x66).count();
    assert!((1..=8).contains(&damaged), "{damaged} bytes of the read were damaged, expected 1 to 8");
    let fixed = &r[1].expect_ok().data;
    assert!(!all(fixed, 0x66), "a read with a fixed corruption seed is damaged");
    assert_eq!(fixed, &r[2].expect_ok().data, "a fixed corruption seed damages every read the same way");
    assert_all(&api.data("disk", MIB, 8192), 0x66, "storage under corrupted reads");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 3);
    assert!(records.iter().all(|r| r["outcome"] == "corrupt_read" && r["corrupt"]["bytes"] == 8), "{records:#?}");
    assert_eq!(records[1]["corrupt"]["seed"], 7);
}

#[test]
fn a_sticky_write_error_fails_reads_of_its_range_until_writes_succeed_over_it() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules: [{name: sticky-fail, when: {op: write, range: 1MiB..+64KiB, nth: 1}, then: {error: EIO, sticky: true}}]",
    );
    let uri = server.uri("disk");
    ops(&uri, &["write 1048576 8192 0x77"])[0].expect_errno("EIO");
    let bad = api.export("disk")["bad_sectors"].clone();
    assert_eq!(bad.as_array().map(Vec::len), Some(1), "the failed write left one bad range: {bad}");
    let r = ops(
        &uri,
        &[
            "read 1048576 4096",
            "read 1052672 512",
            "read 1056768 4096",
            "write 1048576 4096 0x78",
            "read 1048576 4096",
            "read 1052672 4096",
            "write 1052672 4096 0x79",
            "read 1048576 8192",
        ],
    );
    r[0].expect_errno("EIO");
    r[1].expect_errno("EIO");
    assert_all(&r[2].expect_ok().data, 0, "a read just past the bad range");
    r[3].expect_ok();
    assert_all(&r[4].expect_ok().data, 0x78, "the rewritten half");
    r[5].expect_errno("EIO");
    r[6].expect_ok();
    let healed = &r[7].expect_ok().data;
    assert!(all(&healed[..4096], 0x78) && all(&healed[4096..], 0x79), "both halves rewritten read back");
    assert_eq!(api.export("disk")["bad_sectors"], serde_json::json!([]), "the rewrites remapped the whole range");
    let records = api.faults("disk", 0);
    let failed_reads: Vec<&Value> = records.iter().filter(|r| r["op"] == "read").collect();
    assert_eq!(failed_reads.len(), 3, "{records:#?}");
    assert!(failed_reads.iter().all(|r| r["outcome"] == "bad_sector" && r["rule"] == "sticky-fail"), "{records:#?}");
}

#[test]
fn declared_bad_sectors_fail_reads_and_their_first_writes_until_a_write_remaps_them() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.write_data("disk", 2 * MIB, &[0x21; 8192]);
    api.set_policy(
        "disk",
        "bad_sectors:\n  - { range: 2MiB..+4KiB, write_failures: 1, name: weak-block }\n  \
         - { range: 3MiB..+512, error: ENOSPC }\n",
    );
    let r = ops(
        &server.uri("disk"),
        &[
            "read 2097152 512",
            "read 2096640 1024",
            "read 2101248 4096",
            "write 2097152 4096 0x22",
            "read 2097152 4096",
            "write 2097152 4096 0x23",
            "read 2097152 4096",
            "read 3145728 4096",
        ],
    );
    r[0].expect_errno("EIO");
    r[1].expect_errno("EIO");
    assert_all(&r[2].expect_ok().data, 0x21, "the block after the bad range");
    r[3].expect_errno("EIO");
    r[4].expect_errno("EIO");
    r[5].expect_ok();
    assert_all(&r[6].expect_ok().data, 0x23, "the remapped block");
    r[7].expect_errno("ENOSPC");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 5, "{records:#?}");
    assert!(records[..4].iter().all(|r| r["rule"] == "weak-block" && r["outcome"] == "bad_sector"), "{records:#?}");
    assert_eq!(records[4]["rule"], "bad-sectors", "the default name of a bad range: {}", records[4]);
    // The failed write used up the write failure and changed nothing.
    assert_eq!(record_at(&records, "write", 2 * MIB)["persisted"], 0);
}

#[test]
fn an_injected_disconnect_closes_the_connection_and_a_new_connection_works() {
    require!(PYTHON_NBD);
    let (mut server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: cut, when: { op: write, range: 1MiB..+4KiB }, then: { disconnect: true } }\n  \
         - { name: cut-after-writing, when: { op: write, range: 2MiB..+4KiB }, then: { disconnect: true, persist: true } }\n",
    );
    let r = ops(
        &server.uri("disk"),
        &[
            "write 0 4096 0x01",
            "write 1048576 4096 0x02",
            "read 0 4096",
            "reconnect",
            "read 0 4096",
            "write 2097152 4096 0x03",
            "reconnect",
            "read 2097152 4096",
        ],
    );
    r[0].expect_ok();
    assert!(!r[1].ok() && !r[2].ok(), "the write and the request after it fail: {:?}", &r[1..3]);
    assert_all(&r[4].expect_ok().data, 0x01, "a new connection reads what the old one wrote");
    assert!(!r[5].ok(), "the second cut write is not answered: {:?}", r[5]);
    assert_all(&r[7].expect_ok().data, 0x03, "the write persisted before the cut");
    assert!(server.is_running(), "the server keeps running");
    assert_all(&api.data("disk", MIB, 4 * KIB), 0, "the cut write in storage");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 2);
    assert!(records.iter().all(|r| r["outcome"] == "disconnect" && r["reply"] == "disconnect"), "{records:#?}");
    assert_eq!(record_at(&records, "write", 2 * MIB)["persisted"], 4096);
    assert_eq!(api.export("disk")["counters"]["connections"], 3);
}

#[test]
fn a_power_cut_undoes_unflushed_writes_and_keeps_flushed_and_fua_ones() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", &scenario_text("power-cut.yaml"));
    let uri = server.uri("disk");
    let r = ops(
        &uri,
        &[
            "write 0 4096 0x01",
            "flush",
            "write 0 4096 0x02",
            "write 65536 4096 0x03",
            "write 131072 4096 0x04 fua",
            "zero 196608 4096",
            "write 262144 4096 0x05",
            "zero 262144 4096 fua",
        ],
    );
    assert!(r.iter().all(OpResult::ok), "{r:?}");
    assert_eq!(api.export("disk")["unflushed_bytes"], 3 * 4096, "the unflushed write, zeroes and overwrite");
    api.arm("disk", "power-cut");
    let r = ops(&uri, &["write 1048576 4096 0x06", "reconnect", "read 0 4096", "read 65536 4096", "read 131072 4096"]);
    assert!(!r[0].ok(), "the power cut drops the connection: {:?}", r[0]);
    assert_all(&r[2].expect_ok().data, 0x01, "the flushed write survives, its unflushed overwrite does not");
    assert_all(&r[3].expect_ok().data, 0, "an unflushed write is gone");
    assert_all(&r[4].expect_ok().data, 0x04, "a FUA write survives");
    assert_all(&api.data("disk", MIB, 4 * KIB), 0, "the write that met the power cut");
    assert_all(&api.data("disk", 262144, 4 * KIB), 0, "FUA zeroes over an unflushed write");
    assert_eq!(api.export("disk")["unflushed_bytes"], 0);
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!((records[0]["outcome"].as_str(), records[0]["power_cut"].as_bool()), (Some("power_cut"), Some(true)));
}

#[test]
fn armed_by_rules_fail_requests_only_while_their_trigger_is_armed_through_the_api() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", &scenario_text("fail-writes-in-armed-range.yaml"));
    let uri = server.uri("disk");
    ops(&uri, &["write 1048576 4096 0x01"])[0].expect_ok();
    api.arm("disk", "bad-range");
    let r =
        ops(&uri, &["write 1048576 4096 0x02", "zero 8388608 4096", "write 0 4096 0x03", "write 9437184 4096 0x04"]);
    r[0].expect_errno("EIO");
    r[1].expect_errno("EIO");
    r[2].expect_ok();
    r[3].expect_ok();
    api.disarm("disk", "bad-range");
    ops(&uri, &["write 1048576 4096 0x05"])[0].expect_ok();
    assert_all(&api.data("disk", MIB, 4 * KIB), 0x05, "writes before arming and after disarming");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), 2, "{records:#?}");
    assert_eq!(api.export("disk")["triggers"][0]["armed"], false);
}

#[test]
fn a_failed_flush_arms_a_trigger_that_makes_later_writes_fail_until_disarmed() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", &scenario_text("fail-writes-after-failed-flush.yaml"));
    let uri = server.uri("disk");
    api.arm("disk", "start");
    let r = ops(
        &uri,
        &[
            "write 0 4096 0x01",
            "flush",
            "write 0 4096 0x02",
            "write 15728640 4096 0x03",
            "flush",
            "write 4096 512 0x04",
        ],
    );
    r[0].expect_ok();
    r[1].expect_errno("EIO");
    r[2].expect_errno("EIO");
    r[3].expect_errno("EIO");
    r[4].expect_ok();
    r[5].expect_errno("EIO");
    let triggers = api.export("disk")["triggers"].clone();
    let armed = |name: &str| triggers.as_array().unwrap().iter().any(|t| t["name"] == name && t["armed"] == true);
    assert!(armed("flush-failed"), "the failed flush armed flush-failed: {triggers}");
    let records = api.faults("disk", 0);
    assert_eq!(record_at(&records, "flush", 0)["armed"], serde_json::json!(["flush-failed"]));
    api.disarm("disk", "flush-failed");
    ops(&uri, &["write 0 4096 0x05"])[0].expect_ok();
    assert_all(&api.data("disk", 0, 4 * KIB), 0x05, "the write after disarming");
}

#[test]
fn nth_and_limit_fail_exactly_the_configured_occurrences() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: every-third, when: { op: write, range: 0..1MiB, nth: { every: 3 }, limit: 2 }, then: { error: EIO } }\n  \
         - { name: third-and-fourth, when: { op: write, range: 1MiB..2MiB, nth: { after: 2, first: 2 } }, then: { error: EIO } }\n  \
         - { name: fifth, when: { op: write, range: 2MiB..3MiB, nth: 5 }, then: { error: EIO } }\n",
    );
    let mut list = Vec::new();
    for i in 0..10 {
        for area in 0..3 {
            list.push(format!("write {} 4096 1", area * MIB + i * 4096));
        }
    }
    let r = ops(&server.uri("disk"), &list);
    let failed = |area: usize| (0..10).filter(|i| !r[i * 3 + area].ok()).collect::<Vec<_>>();
    assert_eq!(failed(0), vec![2, 5], "every third write, at most twice");
    assert_eq!(failed(1), vec![2, 3], "the two writes after the first two");
    assert_eq!(failed(2), vec![4], "exactly the fifth write");
    let counters = api.export("disk")["policy"]["rules"].clone();
    let fired: Vec<(u64, u64)> = counters
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["occurrences"].as_u64().unwrap(), c["fired"].as_u64().unwrap()))
        .collect();
    assert_eq!(fired, vec![(10, 2), (10, 2), (10, 1)], "{counters}");
}

#[test]
fn connection_and_request_conditions_pick_the_configured_connection_and_request_index() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: sixth-request, when: { request: 5 }, then: { error: ENOSPC } }\n  \
         - { name: second-connection, when: { op: write, connection: 2 }, then: { error: EIO } }\n",
    );
    let uri = server.uri("disk");
    let writes = |n: u64| (0..n).map(|i| format!("write {} 512 1", i * 512)).collect::<Vec<_>>();
    // Each run of fault_probe.py is a new connection: 1, 2, 3. Request indices run 0 to 7.
    let first = ops(&uri, &writes(3));
    let second = ops(&uri, &writes(3));
    let third = ops(&uri, &writes(2));
    assert!(first.iter().chain(&third).all(OpResult::ok), "{first:?} {third:?}");
    second[0].expect_errno("EIO");
    second[1].expect_errno("EIO");
    second[2].expect_errno("ENOSPC");
    let records = api.faults("disk", 0);
    let seen: Vec<(u64, u64)> =
        records.iter().map(|r| (r["connection"].as_u64().unwrap(), r["request_index"].as_u64().unwrap())).collect();
    assert_eq!(seen, [(2, 3), (2, 4), (2, 5)]);
}

#[test]
fn a_stall_that_times_out_then_acts_as_its_rule_says() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules: [{name: hiccup, when: {op: write}, then: {stall: {until: never, timeout: 50ms}, error: EIO}}]",
    );
    ops(&server.uri("disk"), &["write 0 4096 1"])[0].expect_errno("EIO");
    let record = &api.faults("disk", 0)[0];
    assert_eq!(record["stall"], serde_json::json!({"trigger": "never", "timeout_ns": 50_000_000}));
    assert!(record["waited_ns"].as_u64().unwrap() >= 50_000_000, "it waited its timeout: {record}");
    assert_eq!(api.export("disk")["triggers"][0]["armed"], false, "a timeout arms nothing");
}

#[test]
fn rules_fail_flush_trim_write_zeroes_cache_and_block_status_with_their_errnos() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { when: { op: flush }, then: { error: EIO } }\n  \
         - { when: { op: trim }, then: { error: ENOTSUP } }\n  \
         - { when: { op: write_zeroes, range: 1MiB..2MiB }, then: { error: ENOSPC } }\n  \
         - { when: { op: cache }, then: { error: EINVAL } }\n  \
         - { when: { op: block_status }, then: { error: ENOMEM } }\n",
    );
    api.write_data("disk", MIB, &[9; 4096]);
    let r = ops(
        &server.uri("disk"),
        &[
            "flush",
            "trim 0 4096",
            "zero 1048576 4096",
            "zero 0 4096",
            "cache 0 4096",
            "status 0 4096",
            "read 1048576 4096",
        ],
    );
    let errnos: Vec<Option<&str>> = r.iter().map(|r| r.errno.as_deref()).collect();
    assert_eq!(
        errnos,
        [Some("EIO"), Some("ENOTSUP"), Some("ENOSPC"), None, Some("EINVAL"), Some("ENOMEM"), None],
        "{r:?}"
    );
    assert_all(&r[6].data, 9, "the failed zeroes left the data");
    let records = api.faults("disk", 0);
    let ops: Vec<&str> = records.iter().map(|r| r["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["flush", "trim", "write_zeroes", "cache", "block_status"]);
    assert_eq!(records[0]["rule"], "rule-1", "rules without a name are named by position");
}

#[test]
fn a_lying_flush_leaves_its_writes_for_a_power_cut_to_undo() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: lying-flush, when: { op: flush, armed_by: lie }, then: { drop: true } }\n  \
         - { name: cut, when: { armed_by: cut, nth: 1 }, then: { power_cut: true } }\n",
    );
    let uri = server.uri("disk");
    let r = ops(&uri, &["write 0 4096 1", "flush"]);
    assert!(r.iter().all(OpResult::ok));
    api.arm("disk", "lie");
    let r = ops(&uri, &["write 0 4096 2", "write 8192 4096 3", "flush"]);
    assert!(r.iter().all(OpResult::ok), "the lying flush says it worked: {r:?}");
    assert_eq!(api.export("disk")["unflushed_bytes"], 8192, "nothing was flushed");
    api.arm("disk", "cut");
    // The read that meets the power cut loses its connection; a new one reads what survived.
    let r = ops(&uri, &["read 0 4096", "reconnect", "read 0 4096", "read 8192 4096"]);
    assert!(r[0].errno.is_some(), "the power cut drops the connection: {:?}", r[0]);
    assert_all(&r[2].expect_ok().data, 1, "the last real flush is what survives");
    assert_all(&r[3].expect_ok().data, 0, "the write the lying flush covered is gone");
}

#[test]
fn a_bad_sector_under_a_delay_rule_fails_after_the_delay_and_is_logged_under_its_own_name() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "bad_sectors: [{range: 1MiB..+512, name: weak-sector, error: EPERM}]\n\
         rules: [{name: slow-reads, when: {op: read}, then: {delay: 20ms}}]\n",
    );
    let r = ops(&server.uri("disk"), &["read 1048576 4096", "read 0 4096"]);
    r[0].expect_errno("EPERM");
    r[1].expect_ok();
    let records = api.faults("disk", 0);
    let bad = record_at(&records, "read", MIB);
    assert_eq!(
        (bad["rule"].as_str(), bad["outcome"].as_str(), bad["bad_sector"].as_bool()),
        (Some("weak-sector"), Some("bad_sector"), Some(true))
    );
    assert_eq!(bad["delay_ns"], 20_000_000, "the rule's wait still applies: {bad}");
    assert!(bad["waited_ns"].as_u64().unwrap() >= 20_000_000, "{bad}");
    assert_eq!(record_at(&records, "read", 0)["outcome"], "delay");
}

#[test]
fn time_windows_count_from_arming_and_disarmed_by_turns_a_rule_off() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - { name: first-hour, when: { op: write, range: 0..1MiB, armed_by: go, since: armed, until: 1h }, then: { error: EIO } }\n  \
         - { name: after-an-hour, when: { op: write, range: 1MiB..2MiB, armed_by: go, since: armed, from: 1h }, then: { error: EIO } }\n  \
         - { name: until-stopped, when: { op: write, range: 2MiB..3MiB, disarmed_by: stop }, then: { error: EIO } }\n",
    );
    let uri = server.uri("disk");
    let writes = ["write 0 512 1", "write 1048576 512 1", "write 2097152 512 1"];
    let failed = || ops(&uri, &writes).iter().map(|r| !r.ok()).collect::<Vec<_>>();
    assert_eq!(failed(), [false, false, true], "before arming only until-stopped is active");
    api.arm("disk", "go");
    assert_eq!(failed(), [true, false, true], "armed: in the first hour, not yet after it");
    api.arm("disk", "stop");
    assert_eq!(failed(), [true, false, false], "stop turns until-stopped off");
    api.disarm("disk", "go");
    api.disarm("disk", "stop");
    assert_eq!(failed(), [false, false, true]);
}

#[test]
fn a_torn_write_to_a_file_export_leaves_only_its_prefix_in_the_file() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let original = random_image(&image, 4 << 20, false);
    let server = Server::builder().export("disk", &image).with_control().start();
    let api = Api::new(&server);
    api.set_policy(
        "disk",
        "seed: 4\nrules: [{name: tear, when: {op: write}, then: {torn: {persist: 512..3584}, error: EIO}}]",
    );
    ops(&server.uri("disk"), &["write 1048576 4096 0xee"])[0].expect_errno("EIO");
    let kept = api.faults("disk", 0)[0]["torn_persist"].as_u64().unwrap() as usize;
    assert!((512..=3584).contains(&kept) && kept % 512 == 0, "a seeded size in 512-byte steps: {kept}");
    let mut expected = original;
    expected[MIB as usize..MIB as usize + kept].fill(0xee);
    common::assert_same_bytes(&std::fs::read(&image).unwrap(), &expected, "the image file after a torn write");
}

/// The indices of the writes a seeded `probability: 0.5` rule fails, on a fresh server.
fn failing_writes(seed: u64) -> Vec<usize> {
    let (server, api) = disk();
    api.set_policy(
        "disk",
        &format!("seed: {seed}\nrules: [{{name: coin, when: {{op: write, probability: 0.5}}, then: {{error: EIO}}}}]"),
    );
    let list: Vec<String> = (0..40).map(|i| format!("write {} 4096 1", i * 4096)).collect();
    let r = ops(&server.uri("disk"), &list);
    (0..40).filter(|&i| !r[i].ok()).collect()
}

#[test]
fn a_seeded_probability_fails_the_same_requests_on_a_fresh_server_and_others_with_another_seed() {
    require!(PYTHON_NBD);
    let first = failing_writes(11);
    assert!(first.len() > 5 && first.len() < 35, "about half of 40 writes fail: {first:?}");
    assert_eq!(failing_writes(11), first, "the same seed fails the same writes");
    assert_ne!(failing_writes(12), first, "another seed fails other writes");
}

#[test]
fn a_cycle_passes_requests_in_its_up_part_and_fails_every_one_in_its_down_part() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy(
        "disk",
        "rules:\n  - name: down\n    when: { op: write, armed_by: flaky, since: armed, cycle: { up: 2s, down: 1h } }\n    \
         then: { error: EIO }\n  - name: up\n    when: { op: write, armed_by: flaky }\n    then: {}\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let (stop, results) = (dir.path().join("stop"), dir.path().join("results"));
    let mut client = fault_probe("busy");
    client.arg(server.uri("disk")).arg("0").arg(&stop).arg(&results);
    let busy = std::thread::spawn(move || run_ok(&mut client));
    let lines = |wanted: &dyn Fn(&[String]) -> bool| {
        common::control::poll("the busy client's results", || {
            let text = std::fs::read_to_string(&results).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_string).collect();
            wanted(&lines).then_some(lines)
        })
    };
    lines(&|l| l.len() >= 3);
    api.arm("disk", "flaky");
    lines(&|l| l.iter().filter(|r| *r == "EIO").count() >= 5);
    std::fs::write(&stop, "").unwrap();
    busy.join().unwrap();
    let all_results = lines(&|_| true);
    let first_failure = all_results.iter().position(|r| r == "EIO").unwrap();
    assert!(all_results[..first_failure].iter().all(|r| r == "ok"), "{all_results:?}");
    assert!(all_results[first_failure..].iter().all(|r| r == "EIO"), "once down, every write fails: {all_results:?}");

    let armed_at = api.export("disk")["triggers"][0]["since_ns"].as_u64().unwrap();
    let records = api.faults("disk", 0);
    let passes = records.iter().filter(|r| r["rule"] == "up").count();
    assert!(passes > 0, "writes passed in the 2 s up part after arming: {records:#?}");
    let first_error = records.iter().find(|r| r["rule"] == "down").expect("a failure");
    let after = first_error["time_ns"].as_u64().unwrap() - armed_at;
    assert!(after >= 2_000_000_000, "the first failure came {after} ns after arming, inside the up part");
    let mut by_index: Vec<&Value> = records.iter().collect();
    by_index.sort_by_key(|r| r["request_index"].as_u64());
    let rules: Vec<&str> = by_index.iter().map(|r| r["rule"].as_str().unwrap()).collect();
    let first_down = rules.iter().position(|r| *r == "down").unwrap();
    assert!(rules[first_down..].iter().all(|r| *r == "down"), "up, then down for good: {rules:?}");
}
