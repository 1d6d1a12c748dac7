//! The fault log end to end: `--fault-log FILE` and the control API's `faults` endpoint carry the
//! same records with the documented fields; the same seed and the same request sequence give a
//! byte-identical decision log on a fresh server; and `nbdfault replay` turns a log into a policy
//! that makes the same decisions again.

mod common;

use std::path::Path;

use common::control::{Api, json_lines, ops, poll};
use common::{NBDFAULT, PYTHON_NBD, Server, require, run_ok};

/// The fields every record has, whatever its outcome (docs/policy-reference.md, "The fault log").
const ALWAYS: [&str; 18] = [
    "seq",
    "time_ns",
    "export",
    "connection",
    "cookie",
    "request_index",
    "op",
    "offset",
    "length",
    "flags",
    "rule",
    "outcome",
    "action",
    "reply",
    "delay_ns",
    "persisted",
    "waited_ns",
    // Present on this test's records: each of them fails or tears.
    "errno",
];

/// Polls until the file holds `count` lines; returns them.
fn file_lines(path: &Path, count: usize) -> Vec<String> {
    poll(&format!("{count} lines in {}", path.display()), || {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        (lines.len() >= count).then_some(lines)
    })
}

#[test]
fn the_fault_log_file_has_one_json_line_per_touched_request_with_the_documented_fields_and_the_api_the_same_records() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("faults.jsonl");
    let server = Server::builder().export("disk", "memory:16MiB").arg("--fault-log").arg(&log).with_control().start();
    let api = Api::new(&server);
    api.set_policy(
        "disk",
        "seed: 3\nrules:\n  \
         - { name: fail-fua, when: { op: write, fua: true }, then: { error: ENOSPC, delay: 2ms } }\n  \
         - { name: tear, when: { op: write, range: 1MiB..+64KiB }, then: { torn: 1KiB, error: EIO } }\n  \
         - { name: flush-fails, when: { op: flush }, then: { error: EIO, arm: flushed } }\n  \
         - { name: rot, when: { op: read, range: 2MiB..+4KiB, armed_by: flushed }, then: { corrupt: 2 } }\n",
    );
    let r = ops(
        &server.uri("disk"),
        &[
            "write 0 4096 1",
            "write 4096 4096 2 fua",
            "read 0 4096",
            "write 1048576 8192 3",
            "flush",
            "read 2097152 4096",
            "write 8192 512 4",
        ],
    );
    let failed: Vec<bool> = r.iter().map(|r| !r.ok()).collect();
    assert_eq!(failed, [false, true, false, true, true, false, false], "{r:?}");

    let api_records = api.faults("disk", 0);
    assert_eq!(api_records.len(), 4, "one record per request a rule touched: {api_records:#?}");
    let lines = file_lines(&log, 4);
    assert_eq!(lines.len(), 4, "{lines:#?}");
    let from_file = json_lines(&lines.join("\n"));
    assert_eq!(from_file, api_records, "the file and the API carry the same records");

    for (i, record) in from_file.iter().enumerate() {
        let object = record.as_object().unwrap();
        for field in ALWAYS.iter().filter(|f| **f != "errno" || record["reply"] == "error") {
            assert!(object.contains_key(*field), "record {i} has no `{field}`: {record}");
        }
        assert_eq!(record["seq"], i as u64 + 1, "records are numbered from 1 in order: {record}");
        assert_eq!((record["export"].as_str(), record["connection"].as_u64()), (Some("disk"), Some(1)));
    }
    let by_op = |op: &str| from_file.iter().find(|r| r["op"] == op).unwrap().clone();
    let fua = &from_file[0];
    assert_eq!(fua["flags"], serde_json::json!(["fua"]));
    assert_eq!(
        (fua["request_index"].as_u64(), fua["offset"].as_u64(), fua["length"].as_u64()),
        (Some(1), Some(4096), Some(4096))
    );
    assert_eq!(
        (fua["rule"].as_str(), fua["errno"].as_str(), fua["delay_ns"].as_u64()),
        (Some("fail-fua"), Some("ENOSPC"), Some(2_000_000))
    );
    assert!(fua["waited_ns"].as_u64().unwrap() >= 2_000_000, "{fua}");
    let torn = &from_file[1];
    assert_eq!(
        (torn["outcome"].as_str(), torn["torn_persist"].as_u64(), torn["persisted"].as_u64()),
        (Some("torn"), Some(1024), Some(1024))
    );
    let flush = by_op("flush");
    assert_eq!((flush["rule"].as_str(), flush["armed"].clone()), (Some("flush-fails"), serde_json::json!(["flushed"])));
    let read = by_op("read");
    assert_eq!(read["outcome"], "corrupt_read", "{read}");
    assert_eq!((read["corrupt"]["bytes"].as_u64(), read["reply"].as_str()), (Some(2), Some("ok")), "{read}");
    assert!(read["corrupt"]["seed"].is_u64(), "the corruption seed is logged, for replay: {read}");
}

// ---- determinism and replay ---------------------------------------------------------------------

/// A policy where every kind of random choice matters: probabilities, delay ranges, torn sizes,
/// corruption seeds, a stall that times out, and a trigger armed and disarmed by rules again and
/// again, so `after-flush-failure` draws per arming.
fn seeded_policy(seed: u64) -> String {
    format!(
        "seed: {seed}
rules:
  - name: after-flush-failure
    when: {{ op: write, armed_by: flush-failed, probability: 0.3 }}
    then: {{ error: EPERM }}
  - name: flaky-writes
    when: {{ op: write, probability: 0.25 }}
    then: {{ error: EIO, delay: 1ms..4ms }}
  - name: tear
    when: {{ op: write, probability: 25% }}
    then: {{ torn: {{ persist: 0..3584, align: 512 }} }}
  - name: rot
    when: {{ op: read, probability: 0.3 }}
    then: {{ corrupt: 4, delay: 0ms..2ms }}
  - name: hiccup
    when: {{ op: read, nth: {{ every: 7 }} }}
    then: {{ stall: {{ until: never, timeout: 1ms }} }}
  - name: flaky-flush
    when: {{ op: flush, probability: 0.5 }}
    then: {{ error: EIO, delay: 0ms..1ms, arm: flush-failed }}
  - name: zeroes-fail
    when: {{ op: [write_zeroes, trim], nth: {{ every: 2 }} }}
    then: {{ error: ENOSPC, disarm: flush-failed }}
"
    )
}

/// The same sequential workload every time: writes, reads, flushes, zeroes and trims at
/// pseudo-random 4 KiB blocks of the first 4 MiB, from a fixed linear congruential generator.
fn workload() -> Vec<String> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        state >> 33
    };
    (0..160)
        .map(|i| {
            let block = next() % 1024 * 4096;
            match next() % 10 {
                0..=3 => format!("write {block} 4096 {}", i % 256),
                4..=6 => format!("read {block} 4096"),
                7 => "flush".to_string(),
                8 => format!("zero {block} 8192"),
                _ => format!("trim {block} 4096"),
            }
        })
        .collect()
}

/// Runs the workload on a fresh server with `policy`; returns the decision log and the records.
fn run_workload(policy_file: &Path) -> (String, String) {
    let server = Server::builder()
        .export("disk", "memory:8MiB")
        .arg("--policy")
        .arg(format!("disk={}", policy_file.display()))
        .with_control()
        .start();
    let api = Api::new(&server);
    ops(&server.uri("disk"), &workload());
    let records = api.get("/v1/exports/disk/faults").expect(200).text();
    (api.decisions("disk"), records)
}

#[test]
fn the_same_seed_and_requests_give_a_byte_identical_decision_log_and_replay_reproduces_it() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let write_policy = |name: &str, seed: u64| {
        let path = dir.path().join(name);
        std::fs::write(&path, seeded_policy(seed)).unwrap();
        path
    };
    let policy = write_policy("seed-7.yaml", 7);
    let (first, records) = run_workload(&policy);
    let (second, _) = run_workload(&policy);
    let decisions = json_lines(&first);
    assert!(decisions.len() > 40, "the policy decided many of 160 requests: {}", decisions.len());
    for rule in ["after-flush-failure", "flaky-writes", "tear", "rot", "hiccup", "flaky-flush", "zeroes-fail"] {
        assert!(decisions.iter().any(|d| d["rule"] == rule), "rule {rule} decided some requests:\n{first}");
    }
    for field in ["seq", "time_ns", "cookie", "waited_ns"] {
        assert!(decisions.iter().all(|d| d.get(field).is_none()), "the decision log has no `{field}`");
    }
    let indices: Vec<u64> = decisions.iter().map(|d| d["request_index"].as_u64().unwrap()).collect();
    assert!(indices.windows(2).all(|w| w[0] < w[1]), "the decision log is sorted by request: {indices:?}");
    assert!(first == second, "two runs with seed 7 differ:\n{first}\n----\n{second}");

    let (other, _) = run_workload(&write_policy("seed-8.yaml", 8));
    assert_ne!(first, other, "seed 8 makes other decisions than seed 7");

    // nbdfault replay LOG -> a policy that makes the same decisions without the seed.
    let log = dir.path().join("faults.jsonl");
    std::fs::write(&log, &records).unwrap();
    let replayed = dir.path().join("replay.yaml");
    run_ok(std::process::Command::new(NBDFAULT).arg("replay").arg(&log).arg("-o").arg(&replayed));
    let text = std::fs::read_to_string(&replayed).unwrap();
    assert!(text.contains("schedule:") && !text.contains("probability"), "{text}");
    let (third, _) = run_workload(&replayed);
    assert!(first == third, "the replayed policy decides differently:\n{first}\n----\n{third}");
}

#[test]
fn records_from_the_fault_log_file_replay_like_those_from_the_api() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, seeded_policy(21)).unwrap();
    let log = dir.path().join("faults.jsonl");
    let mut server = Server::builder()
        .export("disk", "memory:8MiB")
        .arg("--policy")
        .arg(format!("disk={}", policy.display()))
        .arg("--fault-log")
        .arg(&log)
        .with_control()
        .start();
    let api = Api::new(&server);
    ops(&server.uri("disk"), &workload());
    let original = api.decisions("disk");
    let count = json_lines(&original).len();
    let (status, _) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    assert_eq!(std::fs::read_to_string(&log).unwrap().lines().count(), count, "the file holds every record after exit");

    let replayed = run_ok(std::process::Command::new(NBDFAULT).arg("replay").arg(&log).args(["--export", "disk"]));
    let path = dir.path().join("replay.yaml");
    std::fs::write(&path, replayed).unwrap();
    let (again, _) = run_workload(&path);
    assert!(original == again, "the replay of the file decides differently:\n{original}\n----\n{again}");
}

#[test]
fn request_indices_follow_the_order_requests_arrive_in_even_when_a_client_pipelines_them() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("disk", "memory:8MiB").with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", "rules: [{name: every-request, then: {}}]");
    let count = 1000;
    let mut client = common::control::fault_probe("pipelined");
    run_ok(client.arg(server.uri("disk")).arg(count.to_string()));
    let records = api.wait_for_faults("disk", count);
    let mut by_index: Vec<(u64, String, u64)> = records
        .iter()
        .map(|r| {
            (r["request_index"].as_u64().unwrap(), r["op"].as_str().unwrap().to_string(), r["offset"].as_u64().unwrap())
        })
        .collect();
    by_index.sort();
    let expected: Vec<(u64, String, u64)> = (0..count as u64)
        .map(|i| match i % 8 {
            7 => (i, "flush".to_string(), 0),
            _ if i % 2 == 0 => (i, "write".to_string(), i * 4096),
            _ => (i, "read".to_string(), i * 4096),
        })
        .collect();
    let wrong: Vec<_> = by_index.iter().zip(&expected).filter(|(got, want)| got != want).take(5).collect();
    assert!(wrong.is_empty(), "request i on the wire must get request_index i; (got, expected): {wrong:?}");
}

#[test]
fn a_pipelined_workload_gives_the_same_decision_log_on_every_run() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, seeded_policy(5)).unwrap();
    let run = || {
        let server = Server::builder()
            .export("disk", "memory:8MiB")
            .arg("--policy")
            .arg(format!("disk={}", policy.display()))
            .with_control()
            .start();
        run_ok(common::control::fault_probe("pipelined").arg(server.uri("disk")).arg("200"));
        Api::new(&server).decisions("disk")
    };
    let first = run();
    assert!(json_lines(&first).len() > 40, "{first}");
    let second = run();
    assert!(first == second, "two runs of the same pipelined requests differ:\n{first}\n----\n{second}");
}

/// A power cut through the control API and a power-on are faults no request decided: each has a
/// record in the fault log (the API's, the file, the event stream), between the request records
/// in the order it happened, saying what it did. The decision log leaves them out, and replay
/// lists them in a comment without reproducing them.
#[test]
fn a_power_cut_and_a_power_on_through_the_api_are_in_the_fault_log_the_file_and_the_events_and_replay_skips_them() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("faults.jsonl");
    let mut server =
        Server::builder().export("disk", "memory:8MiB").arg("--fault-log").arg(&log).with_control().start();
    let api = Api::new(&server);
    api.set_policy("disk", "volatile_cache: true\nrules: [{ name: fail-reads, when: { op: read, range: 1MiB..+4KiB }, then: { error: EIO } }]");
    let events = api.client().events("disk", Some(0)).unwrap();
    let (sender, faults) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for event in events.flatten().filter(|event| event.kind == "fault") {
            if sender.send(event).is_err() {
                return;
            }
        }
    });
    let uri = server.uri("disk");
    let r = ops(
        &uri,
        &["write 0 4096 0x41", "flush", "write 4096 8192 0x42", "write 65536 4096 0x43", "read 1048576 4096"],
    );
    r[4].expect_errno("EIO");
    let cut = api.post("/v1/exports/disk/power-cut?off=true").expect(200).json();
    assert_eq!(cut["undone_writes"], 2, "{cut}");
    api.post("/v1/exports/disk/power-on").expect(200);
    assert_eq!(api.post("/v1/exports/disk/power-on").expect(200).json()["changed"], false);
    ops(&uri, &["read 1048576 4096"])[0].expect_errno("EIO");

    let records = api.faults("disk", 0);
    let kinds: Vec<String> =
        records.iter().map(|r| r["event"].as_str().or(r["op"].as_str()).unwrap_or("?").to_string()).collect();
    assert_eq!(kinds, ["read", "power_cut", "power_on", "read"], "one power-on: the second changed nothing");
    let (power_cut, power_on) = (&records[1], &records[2]);
    assert_eq!((power_cut["origin"].as_str(), power_on["origin"].as_str()), (Some("control_api"), Some("control_api")));
    assert_eq!(power_cut["export"], "disk");
    assert_eq!(power_cut["power_off"], serde_json::json!({}), "off until power-on: {power_cut}");
    let done = &power_cut["cut"];
    assert_eq!((done["undone_writes"].as_u64(), done["undone_bytes"].as_u64()), (Some(2), Some(12288)), "{power_cut}");
    assert_eq!(done["undone"], serde_json::json!([[4096, 8192], [65536, 4096]]), "{power_cut}");
    assert_eq!((done["connections"].as_u64(), done["journaled"].as_bool()), (Some(0), Some(true)), "{power_cut}");
    let next = power_cut["next_request_index"].as_u64().unwrap();
    assert!(next > records[0]["request_index"].as_u64().unwrap(), "after the first read: {power_cut}");
    assert!(next <= records[3]["request_index"].as_u64().unwrap(), "before the second read: {power_cut}");
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|pair| pair[0] < pair[1]), "{seqs:?}");
    // The decision log has decisions only.
    assert_eq!(json_lines(&api.decisions("disk")).len(), 2);
    // The event stream carries the same records as `fault` events.
    let streamed: Vec<serde_json::Value> =
        (0..4).map(|_| faults.recv_timeout(std::time::Duration::from_secs(30)).expect("a fault event").data).collect();
    assert_eq!(streamed, records);
    // The file too, line for line.
    let (status, _) = server.stop_with(libc::SIGTERM);
    assert!(status.success());
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines, records);

    // Replay: the reads' decisions; the power records in a comment, with a note on stderr.
    let output = common::run(std::process::Command::new(NBDFAULT).arg("replay").arg(&log));
    assert!(output.status.success(), "{output:?}");
    let (policy, said) = (String::from_utf8(output.stdout).unwrap(), String::from_utf8(output.stderr).unwrap());
    assert!(said.contains("2 power records") && said.contains("not replayed"), "{said}");
    assert!(
        policy.contains(&format!("#   before request {next} (fault log seq {}): a power cut", seqs[1])),
        "{policy}"
    );
    assert!(policy.contains("power on through the control API"), "{policy}");
    assert_eq!(policy.matches("rule: fail-reads").count(), 2, "{policy}");
    let path = dir.path().join("replay.yaml");
    std::fs::write(&path, &policy).unwrap();
    run_ok(std::process::Command::new(NBDFAULT).args(["policy", "check"]).arg(&path));
    // A log of power records alone has nothing to replay, and says so.
    let only_power = dir.path().join("power.jsonl");
    std::fs::write(&only_power, format!("{}\n{}\n", power_cut, power_on)).unwrap();
    let refused = common::run(std::process::Command::new(NBDFAULT).arg("replay").arg(&only_power));
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no request records, only 2 power records"),
        "{refused:?}"
    );
}
