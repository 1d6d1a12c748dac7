//! The control API end to end against the real binary: every endpoint and its refusals, policy
//! swaps under I/O, reset on each kind of storage, the bearer token, `nbdfault ctl` for each
//! subcommand, and policies given at start (`--policy`, `policy:` in the config file).

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::control::{Answer, Api, fault_probe, json_lines, ops, poll};
use common::{CURL, NBDFAULT, PYTHON_NBD, Server, random_bytes, require, run, run_ok};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

const FAIL_WRITES: &str = "rules: [{name: fail-writes, when: {op: write}, then: {error: EIO}}]";

fn disk() -> (Server, Api) {
    let server = Server::builder().export("disk", "memory:16MiB").with_control().start();
    let api = Api::new(&server);
    (server, api)
}

#[track_caller]
fn error_of(answer: &Answer) -> String {
    assert_eq!(answer.headers.get("content-type").map(String::as_str), Some("application/json"), "{answer:?}");
    let body = answer.json();
    body["error"].as_str().unwrap_or_else(|| panic!("an error answer has `error`: {body}")).to_string()
}

// ---- reading the server's state -----------------------------------------------------------------

#[test]
fn health_answers_ok_with_the_version_and_the_number_of_exports() {
    let server = Server::builder().export("a", "memory:1MiB").export("b", "memory:1MiB").with_control().start();
    let health = Api::new(&server).get("/v1/health").expect(200).json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(health["exports"], 2);
    assert!(health["uptime_ms"].is_u64(), "{health}");
}

#[test]
fn exports_lists_every_export_and_shows_one_with_size_flags_policy_and_counters() {
    require!(PYTHON_NBD);
    let server = Server::builder()
        .export("", "memory:1MiB")
        .export("disk", "memory:16MiB")
        .export("ro", "memory:2MiB")
        .args(["--read-only", "ro"])
        .export("vm disk/1", "memory:1MiB")
        .with_control()
        .start();
    let api = Api::new(&server);
    let all = api.get("/v1/exports").expect(200).json();
    let names: Vec<&str> = all.as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["", "disk", "ro", "vm disk/1"]);

    // "" is @default in paths; other names are percent-encoded.
    let default = api.export("");
    assert_eq!((default["name"].as_str(), default["size"].as_u64()), (Some(""), Some(MIB)));
    let odd = api.get("/v1/exports/vm%20disk%2F1").expect(200).json();
    assert_eq!(odd["name"], "vm disk/1");

    let ro = api.export("ro");
    assert_eq!((ro["read_only"].as_bool(), ro["size"].as_u64()), (Some(true), Some(2 * MIB)));
    let flags: Vec<&str> = ro["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    assert!(flags.contains(&"read_only") && !flags.contains(&"send_flush"), "{flags:?}");

    let disk = api.export("disk");
    assert_eq!(disk["transmission_flags"], 0x0d6d, "the flags the kernel gets: {disk}");
    assert_eq!((disk["storage"].as_str(), disk["policy"].clone()), (Some("memory:16MiB"), Value::Null));
    ops(&server.uri("disk"), &["write 0 4096 1", "write 4096 4096 1", "read 0 8192", "flush"]);
    let disk = api.export("disk");
    assert_eq!(
        disk["counters"],
        json!({"connections": 1, "requests": 4, "bytes_read": 8192, "bytes_written": 8192, "errors": 0})
    );
    assert_eq!(disk["requests_decided"], 4);
    api.set_policy("disk", FAIL_WRITES);
    ops(&server.uri("disk"), &["write 0 4096 1"]);
    let disk = api.export("disk");
    assert_eq!(disk["policy"]["rules"], json!([{"rule": "fail-writes", "occurrences": 1, "fired": 1}]));
    assert_eq!(disk["policy"]["source"], FAIL_WRITES);
    assert_eq!((disk["counters"]["errors"].as_u64(), disk["faults_logged"].as_u64()), (Some(1), Some(1)));
}

#[test]
fn an_unknown_export_or_endpoint_gets_404_with_a_json_error_on_every_route() {
    let (_server, api) = disk();
    for (method, path) in [
        ("GET", "/v1/exports/nope"),
        ("GET", "/v1/exports/nope/policy"),
        ("PUT", "/v1/exports/nope/policy"),
        ("DELETE", "/v1/exports/nope/policy"),
        ("POST", "/v1/exports/nope/triggers/go"),
        ("DELETE", "/v1/exports/nope/triggers/go"),
        ("GET", "/v1/exports/nope/faults"),
        ("GET", "/v1/exports/nope/data?offset=0&length=1"),
        ("PUT", "/v1/exports/nope/data?offset=0"),
        ("POST", "/v1/exports/nope/reset"),
        ("POST", "/v1/exports/nope/power-cut"),
        ("POST", "/v1/exports/nope/power-on"),
        // The server has no export "", so @default is unknown too.
        ("GET", "/v1/exports/@default"),
    ] {
        let answer = api.call(method, path, Some(FAIL_WRITES.as_bytes()));
        assert_eq!(answer.status, 404, "{method} {path}: {}", answer.text());
        let error = error_of(&answer);
        assert!(error.contains("\"disk\""), "{method} {path}: the error lists the exports there are: {error}");
    }
    // No export can be named with a leading @, so such a name is refused saying why.
    let error = error_of(&api.call("GET", "/v1/exports/@disk", None));
    assert!(error.contains("starts with @"), "{error}");
    // "/" is the live page (docs/control-api.md); a path beside it is not.
    for (method, path) in [("GET", "/v1/nope"), ("GET", "/page/nope.js"), ("POST", "/v1/exports/disk/nope")] {
        let answer = api.call(method, path, None);
        assert_eq!(answer.status, 404, "{method} {path}");
        error_of(&answer);
    }
    let answer = api.call("PATCH", "/v1/exports/disk/policy", None);
    assert_eq!(answer.status, 405);
    error_of(&answer);
}

// ---- policies ---------------------------------------------------------------------------------

#[test]
fn put_policy_applies_a_valid_policy_get_returns_its_source_and_delete_removes_it() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    let uri = server.uri("disk");
    api.get("/v1/exports/disk/policy").expect(404);
    let policy = "description: the tests' policy\nseed: 9\nrules:\n  - name: never\n    when: { op: read, probability: 0 }\n    then: { error: EIO }\n  - name: fail-writes\n    when: { op: write }\n    then: { error: ENOSPC }\n";
    let answer = api.set_policy("disk", policy);
    assert_eq!(answer["name"], "disk", "the answer is the export: {answer}");
    assert_eq!(answer["policy"]["seed"], 9);
    assert_eq!(answer["policy"]["description"], "the tests' policy");
    assert_eq!(answer["policy"]["origin"], "PUT /v1/exports/disk/policy");
    let warnings = answer["warnings"].as_array().unwrap();
    assert!(
        warnings.len() == 1 && warnings[0].as_str().unwrap().contains("never"),
        "probability 0 gets a warning: {warnings:?}"
    );
    let got = api.get("/v1/exports/disk/policy").expect(200);
    assert_eq!(got.headers.get("content-type").map(String::as_str), Some("application/yaml"));
    assert_eq!(got.text(), policy, "GET returns the policy as sent");
    ops(&uri, &["write 0 4096 1"])[0].expect_errno("ENOSPC");

    let removed = api.delete("/v1/exports/disk/policy").expect(200).json();
    assert_eq!(removed["policy"], Value::Null);
    api.get("/v1/exports/disk/policy").expect(404);
    ops(&uri, &["write 0 4096 1"])[0].expect_ok();
    // Deleting again is harmless.
    api.delete("/v1/exports/disk/policy").expect(200);
}

#[test]
fn an_invalid_policy_gets_400_with_line_column_and_fix_and_changes_nothing() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    let uri = server.uri("disk");
    api.set_policy("disk", "rules: [{name: every-other, when: {op: write, nth: {every: 2}}, then: {error: EIO}}]");
    api.arm("disk", "kept");
    ops(&uri, &["write 0 4096 1", "write 0 4096 1", "write 0 4096 1"]);
    let before = api.export("disk");
    for (policy, line, column, fix) in [
        ("rules:\n  - name: x\n    when: { op: wrte }\n    then: {}\n", 3, 17, "`write`"),
        ("rules:\n  - when: { op: write, range: 2MiB..1MiB }\n    then: { error: EIO }\n", 2, 31, "START..END"),
        ("rules:\n  - when: { op: write }\n    then: { error: EIO, dealy: 5ms }\n", 3, 25, "`delay`"),
        ("rules:\n  - when: { op: write }\n    then: { delay: 50 }\n", 3, 20, "50ms"),
        ("rules: []\n", 1, 1, "rules:"),
        ("rules: [ {when: {op: write}\n", 2, 1, "syntax"),
    ] {
        let answer = api.put("/v1/exports/disk/policy", policy.as_bytes());
        assert_eq!(answer.status, 400, "{policy}: {}", answer.text());
        let body = answer.json();
        let details = &body["details"];
        assert_eq!(
            (details["line"].as_u64(), details["column"].as_u64()),
            (Some(line), Some(column)),
            "{policy}: {body}"
        );
        let error = body["error"].as_str().unwrap();
        assert!(error.starts_with(&format!("PUT /v1/exports/disk/policy:{line}:{column}: ")), "{error}");
        assert!(details["fix"].as_str().unwrap_or_default().contains(fix), "{policy}: the fix says {fix}: {body}");
    }
    assert_eq!(api.put("/v1/exports/disk/policy", b"\xff\xfe").status, 400, "a policy that is not UTF-8");
    let after = api.export("disk");
    for field in ["policy", "triggers", "requests_decided", "bad_sectors"] {
        assert_eq!(after[field], before[field], "a refused policy changed `{field}`");
    }
    // The old policy still decides: its 4th occurrence fails.
    ops(&uri, &["write 0 4096 1"])[0].expect_errno("EIO");
}

/// The results `fault_probe.py busy` has written so far.
fn results(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

/// Waits until the busy client has reported `count` more results with `value` after `from`.
fn wait_for(path: &Path, from: usize, value: &str, count: usize) -> usize {
    poll(&format!("{count} `{value}` results"), || {
        let lines = results(path);
        (lines.iter().skip(from).filter(|r| *r == value).count() >= count).then_some(lines.len())
    })
}

#[test]
fn policy_swaps_take_effect_atomically_while_a_client_keeps_writing() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", "rules: [{name: old, when: {op: write}, then: {error: EIO}}]");
    let dir = tempfile::tempdir().unwrap();
    let (stop, out) = (dir.path().join("stop"), dir.path().join("results"));
    let mut client = fault_probe("busy");
    client.arg(server.uri("disk")).arg("0").arg(&stop).arg(&out);
    let busy = std::thread::spawn(move || run_ok(&mut client));

    let seen = wait_for(&out, 0, "EIO", 3);
    api.set_policy("disk", "rules: [{name: new, when: {op: write}, then: {error: ENOSPC}}]");
    let seen = wait_for(&out, seen, "ENOSPC", 3);
    // A refused policy in the middle of the I/O changes nothing.
    api.put("/v1/exports/disk/policy", b"rules: [{when: {op: write}, then: {eror: EIO}}]").expect(400);
    let seen = wait_for(&out, seen, "ENOSPC", 3);
    api.clear_policy("disk");
    wait_for(&out, seen, "ok", 3);
    std::fs::write(&stop, "").unwrap();
    busy.join().unwrap();

    let results = results(&out);
    let runs: Vec<(&str, usize)> = results.iter().fold(Vec::new(), |mut runs, r| {
        match runs.last_mut() {
            Some((value, count)) if *value == r.as_str() => *count += 1,
            _ => runs.push((r.as_str(), 1)),
        }
        runs
    });
    let order: Vec<&str> = runs.iter().map(|(value, _)| *value).collect();
    assert_eq!(order, ["EIO", "ENOSPC", "ok"], "each request saw the old policy or the new one, never a mix: {runs:?}");
    let export = api.export("disk");
    assert_eq!(export["requests_decided"], results.len(), "the request index runs on across swaps");
    assert_eq!(export["counters"]["connections"], 1, "the client kept its connection");
    let records = api.faults("disk", 0);
    assert_eq!(records.len(), results.iter().filter(|r| *r != "ok").count());
    let indices: Vec<u64> = records.iter().map(|r| r["request_index"].as_u64().unwrap()).collect();
    assert_eq!(indices, (0..indices.len() as u64).collect::<Vec<_>>(), "every failed request is logged in order");
}

#[test]
fn a_policy_swap_keeps_triggers_and_sticky_bad_sectors_and_resets_counters_and_declared_bad_sectors() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    let uri = server.uri("disk");
    api.set_policy(
        "disk",
        "bad_sectors: [{range: 4MiB..+4KiB, name: declared}]\nrules:\n  \
         - {name: sticky, when: {op: write, range: 1MiB..+4KiB}, then: {error: EIO, sticky: true}}\n",
    );
    api.arm("disk", "go");
    ops(&uri, &["write 1048576 4096 1"])[0].expect_errno("EIO");
    assert_eq!(api.export("disk")["bad_sectors"].as_array().unwrap().len(), 2);
    api.set_policy(
        "disk",
        "rules: [{name: gated, when: {op: write, range: 8MiB..+4KiB, armed_by: go}, then: {error: EPERM}}]",
    );
    let export = api.export("disk");
    assert_eq!(
        export["bad_sectors"],
        json!([{"start": MIB, "end": MIB + 4096, "errno": "EIO", "write_failures": 0, "origin": "sticky", "declared": false}]),
        "the sticky range stays, the declared one goes"
    );
    assert_eq!(export["policy"]["rules"], json!([{"rule": "gated", "occurrences": 0, "fired": 0}]));
    let r = ops(&uri, &["read 1048576 512", "read 4194304 512", "write 8388608 512 1"]);
    r[0].expect_errno("EIO");
    r[1].expect_ok();
    r[2].expect_errno("EPERM");
    // Without a policy the sticky range is dormant; it is back with the next policy.
    api.clear_policy("disk");
    ops(&uri, &["read 1048576 512"])[0].expect_ok();
    api.set_policy("disk", "rules: [{when: {op: trim}, then: {}}]");
    ops(&uri, &["read 1048576 512"])[0].expect_errno("EIO");
}

#[test]
fn triggers_are_armed_and_disarmed_through_the_api_and_bad_names_get_400() {
    let (_server, api) = disk();
    api.set_policy("disk", "rules: [{when: {armed_by: go}, then: {error: EIO}}]");
    let armed = api.post("/v1/exports/disk/triggers/go").expect(200).json();
    assert_eq!(armed, json!({"trigger": "go", "armed": true, "changed": true, "warnings": []}));
    let since = api.export("disk")["triggers"][0]["since_ns"].clone();
    // Arming an armed trigger changes nothing, not even its arming time.
    let again = api.post("/v1/exports/disk/triggers/go").expect(200).json();
    assert_eq!(again["changed"], false);
    assert_eq!(api.export("disk")["triggers"], json!([{"name": "go", "armed": true, "since_ns": since}]));
    let disarmed = api.delete("/v1/exports/disk/triggers/go").expect(200).json();
    assert_eq!(disarmed, json!({"trigger": "go", "armed": false, "changed": true, "warnings": []}));
    assert_eq!(api.export("disk")["triggers"][0]["armed"], false);
    api.arm("disk", "ns:with.dots_and-dashes");
    for bad in ["a%20b", "a%2Fb", &"x".repeat(129)] {
        let answer = api.post(&format!("/v1/exports/disk/triggers/{bad}"));
        assert_eq!(answer.status, 400, "trigger {bad}");
        assert!(error_of(&answer).contains("letters, digits"));
    }
}

#[test]
fn arming_or_disarming_a_trigger_no_rule_names_answers_with_a_warning() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    let warning_of = |answer: &Value| {
        answer["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect::<Vec<_>>()
    };
    // Without a policy no rule names anything.
    let early = api.post("/v1/exports/disk/triggers/file-bad").expect(200).json();
    assert_eq!(early["armed"], true);
    assert!(warning_of(&early)[0].starts_with("warning: the export has no policy"), "{early}");
    api.disarm("disk", "file-bad");

    api.put(
        "/v1/exports/disk/policy?origin=fail-file.yaml",
        b"rules: [{name: fail-file, when: {op: write, armed_by: file-bad}, then: {error: EIO}}]",
    )
    .expect(200);
    let typo = api.post("/v1/exports/disk/triggers/fil-bad").expect(200).json();
    assert_eq!((typo["armed"].as_bool(), typo["changed"].as_bool()), (Some(true), Some(true)), "{typo}");
    assert_eq!(
        warning_of(&typo),
        [
            "fail-file.yaml: warning: no rule of this policy names the trigger `fil-bad`, so arming it changes nothing\n  \
          fix: write `file-bad` instead of `fil-bad` (the policy's triggers: file-bad)"
        ]
    );
    // The typo indeed changes nothing: the write passes.
    ops(&server.uri("disk"), &["write 0 512 1"])[0].expect_ok();
    let released = api.delete("/v1/exports/disk/triggers/fil-bad").expect(200).json();
    assert!(warning_of(&released)[0].contains("so disarming it changes nothing"), "{released}");
    let named = api.post("/v1/exports/disk/triggers/file-bad").expect(200).json();
    assert_eq!(named["warnings"], json!([]));
    ops(&server.uri("disk"), &["write 0 512 1"])[0].expect_errno("EIO");
}

#[test]
fn faults_since_returns_only_later_records_and_the_decisions_view_leaves_out_what_differs_between_runs() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("a", "memory:4MiB").export("b", "memory:4MiB").with_control().start();
    let api = Api::new(&server);
    for export in ["a", "b"] {
        api.set_policy(export, FAIL_WRITES);
    }
    let empty = api.get("/v1/exports/a/faults").expect(200);
    assert_eq!((empty.text().as_str(), empty.headers.get("x-last-seq")), ("", None));
    ops(&server.uri("a"), &["write 0 512 1", "write 512 512 1"]);
    ops(&server.uri("b"), &["write 0 512 1"]);
    ops(&server.uri("a"), &["write 1024 512 1"]);
    let answer = api.get("/v1/exports/a/faults").expect(200);
    assert_eq!(answer.headers.get("content-type").map(String::as_str), Some("application/x-ndjson"));
    assert_eq!(answer.headers.get("x-dropped").map(String::as_str), Some("0"));
    let records = json_lines(&answer.text());
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [1, 2, 4], "numbered across the server, filtered by export");
    assert_eq!(answer.headers.get("x-last-seq").map(String::as_str), Some("4"));
    let later = api.faults("a", 2);
    assert_eq!(later.len(), 1);
    assert_eq!(later[0], records[2]);
    assert!(api.faults("a", 4).is_empty());

    let decisions = json_lines(&api.decisions("a"));
    assert_eq!(decisions.len(), 3);
    for (decision, record) in decisions.iter().zip(&records) {
        let mut expected = record.clone();
        for field in ["seq", "time_ns", "cookie", "waited_ns"] {
            expected.as_object_mut().unwrap().remove(field);
        }
        assert_eq!(decision, &expected);
    }
    for query in ["view=everything", "since=x", "sinse=1"] {
        let answer = api.get(&format!("/v1/exports/a/faults?{query}"));
        assert_eq!(answer.status, 400, "?{query}: {}", answer.text());
        error_of(&answer);
    }
}

// ---- data and reset ---------------------------------------------------------------------------

#[test]
fn data_reads_and_writes_storage_below_the_fault_layer_within_its_bounds() {
    require!(PYTHON_NBD);
    let server = Server::builder()
        .export("disk", "memory:80MiB")
        .export("ro", "memory:1MiB")
        .args(["--read-only", "ro"])
        .with_control()
        .start();
    let api = Api::new(&server);
    // A policy that fails every request does not see the data endpoint.
    api.set_policy("disk", "rules: [{name: everything, then: {error: EIO}}]");
    let pattern = random_bytes(3 * MIB as usize + 5);
    let written = api.put("/v1/exports/disk/data?offset=1000", &pattern).expect(200).json();
    assert_eq!(written, json!({"offset": 1000, "written": pattern.len()}));
    common::assert_same_bytes(&api.data("disk", 1000, pattern.len() as u64), &pattern, "data read back");
    assert!(api.faults("disk", 0).is_empty(), "the data endpoint is below the fault layer");
    ops(&server.uri("disk"), &["read 1000 512"])[0].expect_errno("EIO");
    api.clear_policy("disk");
    assert_eq!(ops(&server.uri("disk"), &["read 1000 512"])[0].expect_ok().data, &pattern[..512], "clients see it");

    // Exactly 64 MiB, up to the end, and nothing at all are fine.
    let whole = api.get(&format!("/v1/exports/disk/data?offset={}&length={}", 16 * MIB, 64 * MIB)).expect(200);
    assert_eq!(whole.body.len() as u64, 64 * MIB);
    api.get(&format!("/v1/exports/disk/data?offset={}&length=0", 80 * MIB)).expect(200);
    api.put(&format!("/v1/exports/disk/data?offset={}", 80 * MIB - 3), b"end").expect(200);

    let over = api.get(&format!("/v1/exports/disk/data?offset=0&length={}", 64 * MIB + 1));
    assert_eq!(over.status, 413, "{}", over.text());
    assert!(error_of(&over).contains("split"));
    let over = api.put("/v1/exports/disk/data?offset=0", &vec![0; 64 * MIB as usize + 1]);
    assert_eq!(over.status, 413, "{}", over.text());
    assert!(error_of(&over).contains("split"));
    for (method, path) in [
        ("GET", format!("/v1/exports/disk/data?offset={}&length=2", 80 * MIB - 1)),
        ("GET", format!("/v1/exports/disk/data?offset={}&length=1", u64::MAX)),
        ("PUT", format!("/v1/exports/disk/data?offset={}", 80 * MIB - 2)),
    ] {
        let answer = api.call(method, &path, Some(b"abc"));
        assert_eq!(answer.status, 416, "{method} {path}: {}", answer.text());
        assert!(error_of(&answer).contains("past the end"));
    }
    let answer = api.put("/v1/exports/ro/data?offset=0", b"abc");
    assert_eq!(answer.status, 409);
    assert!(error_of(&answer).contains("read-only"));
    for (method, path) in [
        ("GET", "/v1/exports/disk/data?offset=0"),
        ("GET", "/v1/exports/disk/data?length=1"),
        ("GET", "/v1/exports/disk/data?offset=1MiB&length=1"),
        ("PUT", "/v1/exports/disk/data"),
        ("PUT", "/v1/exports/disk/data?offset=0&length=2"),
    ] {
        let answer = api.call(method, path, Some(b"abc"));
        assert_eq!(answer.status, 400, "{method} {path}: {}", answer.text());
        error_of(&answer);
    }
    assert!(all_zero(&api.data("ro", 0, 3)), "the refused write changed nothing");
}

fn all_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

#[test]
fn reset_returns_memory_and_overlay_exports_to_pristine_contents_and_refuses_file_exports() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let base_data = common::random_image(&base, 4 << 20, false);
    let file = dir.path().join("file.img");
    let file_data = common::random_image(&file, 1 << 20, false);
    let server = Server::builder()
        .export("mem", "memory:4MiB")
        .export("over", format!("overlay:{}", base.display()))
        .export("file", &file)
        .with_control()
        .start();
    let api = Api::new(&server);
    let sticky = "rules: [{name: sticky, when: {op: write, range: 3MiB..+4KiB}, then: {error: EIO, sticky: true}}]";
    for export in ["mem", "over"] {
        api.set_policy(export, sticky);
        api.arm(export, "kept");
        let r = ops(
            &server.uri(export),
            &["write 0 65536 0x5a", "zero 1048576 65536", "trim 2097152 65536", "flush", "write 3145728 4096 1"],
        );
        assert!(r[..4].iter().all(|r| r.ok()), "{r:?}");
        assert_eq!(api.export(export)["bad_sectors"].as_array().unwrap().len(), 1);
        let answer = api.post(&format!("/v1/exports/{export}/reset")).expect(200).json();
        assert_eq!(answer["name"], export, "the answer is the export");
        assert_eq!(answer["bad_sectors"], json!([]), "reset clears bad sectors: {answer}");
        assert_eq!(answer["policy"]["source"], sticky, "the policy stays");
        assert_eq!(answer["triggers"][0]["armed"], true, "the triggers stay");
        ops(&server.uri(export), &["read 3145728 4096"])[0].expect_ok();
    }
    assert!(all_zero(&api.data("mem", 0, 4 * MIB)), "a reset memory export is all zeros");
    common::assert_same_bytes(&api.data("over", 0, 4 * MIB), &base_data, "a reset overlay shows its base again");
    common::assert_same_bytes(&std::fs::read(&base).unwrap(), &base_data, "the base image never changes");

    ops(&server.uri("file"), &["write 0 4096 0x11"]);
    let answer = api.post("/v1/exports/file/reset");
    assert_eq!(answer.status, 409);
    assert!(error_of(&answer).contains("overlay:"), "the refusal says how to make it resettable");
    let mut expected = file_data;
    expected[..4096].fill(0x11);
    common::assert_same_bytes(&std::fs::read(&file).unwrap(), &expected, "a refused reset leaves the file as written");
}

// ---- the token --------------------------------------------------------------------------------

#[test]
fn with_a_control_token_every_endpoint_needs_the_bearer_token() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("", "memory:1MiB").args(["--control-token", "s3cret"]).with_control().start();
    let anonymous = Api::new(&server);
    let wrong = Api::new(&server).with_token("guess");
    let api = Api::new(&server).with_token("s3cret");
    for (method, path) in [
        ("GET", "/v1/health"),
        ("GET", "/v1/exports"),
        ("GET", "/v1/exports/@default"),
        ("PUT", "/v1/exports/@default/policy"),
        ("POST", "/v1/exports/@default/triggers/go"),
        ("GET", "/v1/exports/@default/faults"),
        ("GET", "/v1/exports/@default/data?offset=0&length=1"),
        ("PUT", "/v1/exports/@default/data?offset=0"),
        ("POST", "/v1/exports/@default/reset"),
        ("GET", "/v1/no-such-endpoint"),
    ] {
        for client in [&anonymous, &wrong] {
            let answer = client.call(method, path, Some(FAIL_WRITES.as_bytes()));
            assert_eq!(answer.status, 401, "{method} {path}");
            assert_eq!(answer.headers.get("www-authenticate").map(String::as_str), Some("Bearer"));
            assert!(error_of(&answer).contains("Bearer"));
        }
    }
    assert!(api.export("")["triggers"].as_array().unwrap().is_empty(), "refused requests changed nothing");
    api.get("/v1/health").expect(200);
    api.set_policy("", FAIL_WRITES);
    api.arm("", "go");
    ops(&server.uri(""), &["write 0 512 1"])[0].expect_errno("EIO");
    assert_eq!(api.faults("", 0).len(), 1);

    let output = run(ctl(&anonymous).arg("health"));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("401"), "{output:?}");
    run_ok(ctl(&anonymous).args(["--token", "s3cret", "health"]));
    run_ok(ctl(&anonymous).env("NBDFAULT_CONTROL_TOKEN", "s3cret").args(["exports", ""]));
}

// ---- what a web page may make a browser send: CSRF, DNS rebinding ---------------------------------

#[test]
fn a_write_from_another_origin_is_refused_with_403_naming_csrf_and_changes_nothing() {
    let (server, api) = disk();
    api.set_policy("disk", FAIL_WRITES);
    let own = format!("http://{}", server.control.unwrap());
    for (method, path) in [
        ("POST", "/v1/exports/disk/triggers/go"),
        ("DELETE", "/v1/exports/disk/policy"),
        ("PUT", "/v1/exports/disk/policy"),
        ("POST", "/v1/exports/disk/reset"),
        ("POST", "/v1/exports/disk/power-cut"),
    ] {
        for headers in [
            vec![("Origin", "http://evil.example")],
            vec![("Origin", "http://127.0.0.1:1")],
            vec![("Origin", "null")],
            vec![("Sec-Fetch-Site", "cross-site")],
            vec![("Sec-Fetch-Site", "same-site"), ("Origin", own.as_str())],
        ] {
            let answer = api
                .client()
                .call_with_headers(method, path, Some(b"rules: []"), &headers)
                .unwrap_or_else(|error| panic!("{method} {path}: {error}"));
            assert_eq!(answer.status, 403, "{method} {path} {headers:?}: {}", answer.text());
            let error = answer.text();
            assert!(error.contains("cross-site request forgery") && error.contains(method), "{error}");
        }
    }
    let export = api.export("disk");
    assert!(export["triggers"].as_array().unwrap().is_empty(), "a refused request armed a trigger: {export}");
    assert_eq!(export["policy"]["rules"][0]["rule"], "fail-writes", "a refused request changed the policy");
    assert_eq!(export["power"]["cuts"], 0, "{export}");

    // The page's own origin, and clients that send no Origin (this one, curl, ctl), pass.
    let answer =
        api.client().call_with_headers("POST", "/v1/exports/disk/triggers/go", None, &[("Origin", &own)]).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let answer = api
        .client()
        .call_with_headers(
            "DELETE",
            "/v1/exports/disk/triggers/go",
            None,
            &[("Sec-Fetch-Site", "same-origin"), ("Origin", &own)],
        )
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    api.arm("disk", "go");
    run_ok(ctl(&api).args(["disarm", "disk", "go"]));
    // Reading needs no origin check: another origin cannot read the answer.
    let answer =
        api.client().call_with_headers("GET", "/v1/exports/disk", None, &[("Origin", "http://evil.example")]).unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
}

/// Reads one HTTP/1.1 answer with a Content-Length from a kept-alive connection: status, body.
fn read_answer(stream: &mut std::io::BufReader<std::net::TcpStream>) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut status = 0;
    let mut length = 0;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some(code) = line.strip_prefix("HTTP/1.1 ") {
            status = code[..3].parse().unwrap();
        } else if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; length];
    stream.read_exact(&mut body)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

#[test]
fn a_refused_request_reads_its_body_first_so_the_client_gets_the_answer_and_keeps_its_connection() {
    use std::io::Write;
    let server =
        Server::builder().export("disk", "memory:1MiB").args(["--control-token", "s3cret"]).with_control().start();
    let address = server.control.unwrap();
    let host = address.to_string();
    let body = FAIL_WRITES;
    let bearer = "Authorization: Bearer s3cret\r\n";
    // Each refusal: a request whose body comes a moment after its headers, as a client writing
    // a large body would send it; then a good request on the same connection.
    for (refusal, status, extra, path) in [
        ("another origin", 403, format!("{bearer}Origin: http://evil.example\r\n"), "/v1/exports/disk/policy"),
        ("a foreign Host", 403, bearer.to_string(), "/v1/exports/disk/policy"),
        ("no token", 401, String::new(), "/v1/exports/disk/policy"),
        ("no such endpoint", 404, bearer.to_string(), "/v1/exports/disk/no-such-endpoint"),
        ("no such method", 405, bearer.to_string(), "/v1/exports"),
    ] {
        let connection = std::net::TcpStream::connect(address).unwrap();
        connection.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut writer = connection.try_clone().unwrap();
        let mut reader = std::io::BufReader::new(connection);
        let asked = if refusal == "a foreign Host" { "evil.example" } else { host.as_str() };
        write!(writer, "PUT {path} HTTP/1.1\r\nHost: {asked}\r\n{extra}Content-Length: {}\r\n\r\n", body.len())
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(200));
        writer.write_all(body.as_bytes()).unwrap();
        let (got, text) = read_answer(&mut reader).unwrap_or_else(|error| panic!("{refusal}: no answer: {error}"));
        assert_eq!(got, status, "{refusal}: {text}");
        write!(writer, "GET /v1/health HTTP/1.1\r\nHost: {host}\r\n{bearer}\r\n").unwrap();
        let (got, text) = read_answer(&mut reader)
            .unwrap_or_else(|error| panic!("after {refusal}, the connection was closed under the client: {error}"));
        assert_eq!(got, 200, "after {refusal}: {text}");
    }
    let api = Api::new(&server).with_token("s3cret");
    assert!(api.export("disk")["policy"].is_null(), "a refused PUT installed its policy");
}

/// One HTTP/1.1 request with the given `Host`, sent by hand (HTTP clients set `Host` themselves).
fn request_with_host(address: std::net::SocketAddr, path: &str, host: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or_else(|| panic!("{answer}"));
    (status, answer)
}

#[test]
fn a_request_addressed_to_a_foreign_host_name_is_refused_against_dns_rebinding_and_ip_or_localhost_pass() {
    let (server, _api) = disk();
    let address = server.control.unwrap();
    let port = address.port();
    for path in ["/v1/exports", "/", "/metrics", "/page/app.js", "/v1/exports/disk/events"] {
        let (status, answer) = request_with_host(address, path, &format!("evil.example:{port}"));
        assert_eq!(status, 403, "{path}: {answer}");
        assert!(answer.contains("DNS rebinding") && answer.contains("evil.example"), "{answer}");
        assert!(answer.contains("--control-allow-host"), "the refusal says how to allow a name: {answer}");
    }
    // The listener's own address, loopback names and addresses, and any IP address (which no
    // rebinding page can be served from): a qemu guest reaches the host as 10.0.2.2.
    for host in [
        address.to_string(),
        format!("localhost:{port}"),
        format!("LOCALHOST.:{port}"),
        format!("[::1]:{port}"),
        "10.0.2.2:1".into(),
        "127.0.0.1".into(),
    ] {
        let (status, answer) = request_with_host(address, "/v1/exports", &host);
        assert_eq!(status, 200, "{host}: {answer}");
    }
}

#[test]
fn a_name_given_with_control_allow_host_or_its_environment_variable_is_answered_and_is_its_own_origin() {
    for server in [
        Server::builder().export("disk", "memory:1MiB").args(["--control-allow-host", "nbdfault,Test-Box.example"]),
        Server::builder().export("disk", "memory:1MiB").env("NBDFAULT_CONTROL_ALLOW_HOST", "nbdfault,test-box.example"),
    ] {
        let server = server.with_control().start();
        let address = server.control.unwrap();
        let port = address.port();
        for host in [format!("nbdfault:{port}"), format!("TEST-BOX.example:{port}"), "nbdfault".into()] {
            let (status, answer) = request_with_host(address, "/v1/exports", &host);
            assert_eq!(status, 200, "{host}: {answer}");
        }
        for host in [format!("evil.example:{port}"), format!("nbdfault.evil.example:{port}")] {
            let (status, answer) = request_with_host(address, "/v1/exports", &host);
            assert_eq!(status, 403, "{host}: {answer}");
        }
        // A page served under the allowed name calls the API with that origin.
        let api = Api::new(&server);
        api.set_policy("disk", FAIL_WRITES);
        let origin = format!("http://nbdfault:{port}");
        let answer = api
            .client()
            .call_with_headers(
                "POST",
                "/v1/exports/disk/triggers/go",
                None,
                &[("Host", &format!("nbdfault:{port}")), ("Origin", &origin)],
            )
            .unwrap();
        assert_eq!(answer.status, 200, "{}", answer.text());
    }
    let output = run(Command::new(NBDFAULT).args(["serve", "--control-allow-host", "nbdfault:10810"]));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("`nbdfault:10810` is not a host name") && stderr.contains("without scheme or port"),
        "{stderr}"
    );
}

#[test]
fn a_listener_beyond_loopback_checks_host_and_origin_too_and_the_token_still_holds() {
    // 0.0.0.0, with a token as such a listener should have: the checks come first (403), the
    // token after (401), and a token does not make a forged request pass.
    let server = Server::builder()
        .default_addresses()
        .export("disk", "memory:1MiB")
        .args(["--listen", "127.0.0.1:0", "--control", "0.0.0.0:0", "--control-token", "s3cret"])
        .start();
    let port = server.control.expect("control address").port();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let api = Api::at(&format!("http://{address}")).with_token("s3cret");
    api.set_policy("disk", FAIL_WRITES);
    let anonymous = Api::at(&format!("http://{address}"));
    let (status, answer) = request_with_host(address, "/v1/exports", &format!("evil.example:{port}"));
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("DNS rebinding"), "{answer}");
    let (status, answer) = request_with_host(address, "/v1/exports", &format!("127.0.0.1:{port}"));
    assert_eq!(status, 401, "past the Host check, the token is wanted: {answer}");

    let own = format!("http://{address}");
    let bearer = "Bearer s3cret";
    let forged = [("Origin", "http://evil.example"), ("Authorization", bearer)];
    let answer = anonymous.client().call_with_headers("POST", "/v1/exports/disk/triggers/go", None, &forged).unwrap();
    assert_eq!(answer.status, 403, "a forged request with the token: {}", answer.text());
    assert!(answer.text().contains("cross-site request forgery"), "{}", answer.text());
    let answer = anonymous
        .client()
        .call_with_headers("POST", "/v1/exports/disk/triggers/go", None, &[("Origin", &own)])
        .unwrap();
    assert_eq!(answer.status, 401, "the page's own origin without the token: {}", answer.text());
    assert!(api.export("disk")["triggers"].as_array().unwrap().is_empty(), "a refused request armed the trigger");
    let answer = anonymous
        .client()
        .call_with_headers("POST", "/v1/exports/disk/triggers/go", None, &[("Origin", &own), ("Authorization", bearer)])
        .unwrap();
    assert_eq!(answer.status, 200, "the page's own origin with the token: {}", answer.text());
    run_ok(ctl(&anonymous).args(["--token", "s3cret", "disarm", "disk", "go"]));
}

#[test]
fn over_https_foreign_hosts_and_origins_are_refused_and_curl_ctl_and_the_pages_origin_pass() {
    require!(CURL);
    let pki = common::pki::Pki::new();
    let server = Server::builder()
        .export("disk", "memory:1MiB")
        .args(["--tls", "require", "--tls-certificates"])
        .arg(&pki.dir)
        .with_control()
        .start();
    let address = server.control.unwrap();
    let own = format!("https://{address}");
    // curl checks the certificate against 127.0.0.1 and sends the headers given.
    let curl = |method: &str, path: &str, headers: &[String]| {
        let mut command = CURL.command();
        command.args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}", "-X", method, "--cacert"]);
        command.arg(pki.path("ca-cert.pem"));
        for header in headers {
            command.args(["-H", header]);
        }
        let out = run_ok(command.arg(format!("{own}{path}")));
        let (body, status) = out.trim_end().rsplit_once('\n').unwrap();
        (status.parse::<u16>().unwrap(), body.to_string())
    };
    let port = address.port();
    let (status, body) = curl("GET", "/v1/exports", &[format!("Host: evil.example:{port}")]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("DNS rebinding"), "{body}");
    let (status, _) = curl(
        "PUT",
        "/v1/exports/disk/policy",
        &["Origin: https://evil.example".into(), "Content-Type: application/yaml".into()],
    );
    assert_eq!(status, 403);
    let (status, body) = curl("POST", "/v1/exports/disk/triggers/go", &["Sec-Fetch-Site: cross-site".into()]);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cross-site request forgery"), "{body}");
    let (status, body) = curl("POST", "/v1/exports/disk/triggers/go", &[format!("Origin: {own}")]);
    assert_eq!(status, 200, "the page's own https origin: {body}");
    let (status, body) = curl("DELETE", "/v1/exports/disk/triggers/go", &[]);
    assert_eq!(status, 200, "curl without Origin: {body}");
    let exports = run_ok(
        Command::new(NBDFAULT)
            .args(["ctl", "--url", &own, "--tls-certificates"])
            .arg(&pki.dir)
            .args(["arm", "disk", "go"]),
    );
    assert!(exports.contains("go"), "{exports}");
}

// ---- nbdfault ctl -----------------------------------------------------------------------------

/// `nbdfault ctl --url URL` for this API, without the environment's settings.
fn ctl(api: &Api) -> Command {
    let mut command = Command::new(NBDFAULT);
    command.env_remove("NBDFAULT_CONTROL_URL").env_remove("NBDFAULT_CONTROL_TOKEN");
    command.args(["ctl", "--url", api.base()]);
    command
}

fn stderr_of(command: &mut Command) -> String {
    outputs_of(command).1
}

/// Runs a command that must succeed; returns its stdout and stderr.
#[track_caller]
fn outputs_of(command: &mut Command) -> (String, String) {
    let output = run(command);
    assert!(output.status.success(), "{output:?}");
    (String::from_utf8_lossy(&output.stdout).into_owned(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn ctl_prints_results_on_stdout_and_warnings_on_stderr_and_strict_fails_on_warnings() {
    let (_server, api) = disk();
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("file-bad.yaml");
    std::fs::write(
        &policy,
        "rules:\n  - name: fail-file\n    when: { op: write, armed_by: file-bad }\n    then: { error: EIO }\n",
    )
    .unwrap();
    let (answer, said) = outputs_of(ctl(&api).args(["set-policy", "disk"]).arg(&policy));
    assert_eq!(common::json(&answer)["name"], "disk");
    assert!(said.is_empty(), "{said}");

    let (answer, said) = outputs_of(ctl(&api).args(["arm", "disk", "fil-bad"]));
    assert_eq!(common::json(&answer)["trigger"], "fil-bad");
    assert!(said.contains("warning: no rule of this policy names the trigger `fil-bad`"), "{said}");
    assert!(said.contains("fix: write `file-bad` instead of `fil-bad`"), "{said}");

    for args in [["arm", "disk", "fil-bad"], ["disarm", "disk", "fil-bad"]] {
        let strict = run(ctl(&api).arg("--strict").args(args));
        assert_eq!(strict.status.code(), Some(1), "--strict {args:?} fails on the warning: {strict:?}");
        assert!(String::from_utf8_lossy(&strict.stderr).contains("`fil-bad`"), "{strict:?}");
        assert!(String::from_utf8_lossy(&strict.stdout).contains("\"trigger\": \"fil-bad\""), "{strict:?}");
    }
    let (answer, said) = outputs_of(ctl(&api).args(["--strict", "arm", "disk", "file-bad"]));
    assert_eq!(common::json(&answer)["warnings"], json!([]));
    assert!(said.is_empty(), "{said}");

    // A policy with a rule that can never decide: set, but --strict fails.
    let never = dir.path().join("never.yaml");
    std::fs::write(&never, "rules:\n  - name: never\n    when: { probability: 0 }\n    then: { error: EIO }\n")
        .unwrap();
    let strict = run(ctl(&api).args(["--strict", "set-policy", "disk"]).arg(&never));
    assert_eq!(strict.status.code(), Some(1), "{strict:?}");
    assert_eq!(api.export("disk")["policy"]["origin"], never.display().to_string());
}

#[test]
fn ctl_set_policy_names_the_file_in_every_error() {
    let (_server, api) = disk();
    api.set_policy("disk", FAIL_WRITES);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("broken.yaml");
    let text = "rules:\n  - name: a\n    when: { op: wirte }\n    then: { error: EIOO }\n";
    std::fs::write(&policy, text).unwrap();
    let output = run(ctl(&api).args(["set-policy", "disk"]).arg(&policy));
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.starts_with(&format!("{}:3:17: ", policy.display())), "{stderr}");
    assert!(stderr.contains("fix: write `write` instead of `wirte`"), "{stderr}");
    assert!(stderr.contains(&format!("\n{}:4:20: ", policy.display())), "every error, not the first: {stderr}");
    assert!(stderr.contains("fix: write `EIO` instead of `EIOO`"), "{stderr}");
    // The API lists them all in `details.errors`.
    let answer = api.put("/v1/exports/disk/policy", text.as_bytes());
    assert_eq!(answer.status, 400);
    let details = &answer.json()["details"];
    assert_eq!((details["line"].as_u64(), details["column"].as_u64()), (Some(3), Some(17)), "{details}");
    let every: Vec<(u64, u64)> = details["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| (error["line"].as_u64().unwrap(), error["column"].as_u64().unwrap()))
        .collect();
    assert_eq!(every, [(3, 17), (4, 20)], "{details}");
    assert!(!stderr.contains("PUT /v1"), "the file, not the URL: {stderr}");
    assert!(stderr.contains("the policy was refused; export \"disk\" keeps the policy it had"), "{stderr}");
    assert_eq!(api.export("disk")["policy"]["rules"][0]["rule"], "fail-writes");
    // From stdin, the label is `stdin`.
    let mut command = ctl(&api);
    command.args(["set-policy", "disk", "-"]);
    let shown = common::show(&command);
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"rules: [{then: {error: EIOO}}]").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("stdin:1:"), "{output:?}");
}

#[test]
fn ctl_drives_every_endpoint_of_a_running_server() {
    require!(PYTHON_NBD);
    let server = Server::builder()
        .export("", "memory:1MiB")
        .export("vm disk/1", "memory:4MiB")
        .export("file", "memory:1MiB")
        .with_control()
        .start();
    let api = Api::new(&server);
    let dir = tempfile::tempdir().unwrap();
    let name = "vm disk/1";

    let health = common::json(&run_ok(ctl(&api).arg("health")));
    assert_eq!(health["status"], "ok");
    let mut from_env = Command::new(NBDFAULT);
    from_env.env("NBDFAULT_CONTROL_URL", api.base()).env_remove("NBDFAULT_CONTROL_TOKEN").args(["ctl", "health"]);
    assert_eq!(common::json(&run_ok(&mut from_env))["status"], "ok", "NBDFAULT_CONTROL_URL gives the address");
    let all = common::json(&run_ok(ctl(&api).arg("exports")));
    assert_eq!(all.as_array().unwrap().len(), 3);
    assert_eq!(common::json(&run_ok(ctl(&api).args(["exports", name])))["name"], name);
    assert_eq!(common::json(&run_ok(ctl(&api).args(["exports", ""])))["name"], "");

    let policy = dir.path().join("policy.yaml");
    let text = "rules:\n  - name: gated\n    when: { op: write, armed_by: go }\n    then: { error: EIO }\n  \
                - name: never\n    when: { op: read, probability: 0 }\n    then: {}\n";
    std::fs::write(&policy, text).unwrap();
    let (answer, said) = outputs_of(ctl(&api).args(["set-policy", name]).arg(&policy));
    assert!(said.contains("warning") && said.contains("never"), "{said}");
    assert!(said.starts_with(&format!("{}:5:", policy.display())), "warnings name the file: {said}");
    let answer = common::json(&answer);
    assert_eq!(answer["policy"]["origin"], policy.display().to_string(), "{answer}");
    assert_eq!(run_ok(ctl(&api).args(["show-policy", name])).trim_end(), text.trim_end());
    let (armed, said) = outputs_of(ctl(&api).args(["arm", name, "go"]));
    assert_eq!(common::json(&armed)["armed"], true, "the result is on stdout");
    assert!(said.is_empty(), "nothing to say on stderr: {said}");
    assert_eq!(
        api.export(name)["triggers"],
        json!([{"name": "go", "armed": true, "since_ns": api.export(name)["triggers"][0]["since_ns"]}])
    );
    let uri = format!("nbd://{}/vm%20disk%2F1", server.nbd);
    ops(&uri, &["write 0 512 1"])[0].expect_errno("EIO");
    stderr_of(ctl(&api).args(["disarm", name, "go"]));
    assert_eq!(api.export(name)["triggers"][0]["armed"], false);
    ops(&uri, &["write 512 512 2"])[0].expect_ok();

    let records = json_lines(&run_ok(ctl(&api).args(["faults", name])));
    assert_eq!(records, api.faults(name, 0));
    assert_eq!(records.len(), 1);
    assert!(json_lines(&run_ok(ctl(&api).args(["faults", name, "--since", "1"]))).is_empty());
    let decisions = run_ok(ctl(&api).args(["faults", name, "--decisions"]));
    assert_eq!(decisions, api.decisions(name));

    stderr_of(ctl(&api).args(["clear-policy", name]));
    let output = run(ctl(&api).args(["show-policy", name]));
    assert_eq!(output.status.code(), Some(2), "show-policy without a policy fails");
    assert!(String::from_utf8_lossy(&output.stderr).contains("404"), "{output:?}");

    // Printable, so the copy on stdout can be compared too.
    let data: Vec<u8> = random_bytes(5000).iter().map(|b| b'a' + b % 26).collect();
    let source = dir.path().join("data.bin");
    std::fs::write(&source, &data).unwrap();
    stderr_of(ctl(&api).args(["write", name, "--offset", "1MiB"]).arg(&source));
    assert_eq!(api.data(name, MIB, 5000), data);
    let copy = dir.path().join("copy.bin");
    run_ok(ctl(&api).args(["data", name, "--offset", "1MiB", "--length", "5000", "-o"]).arg(&copy));
    assert_eq!(std::fs::read(&copy).unwrap(), data);
    let out = run_ok(ctl(&api).args(["data", name, "--offset", "1048576", "--length", "4KiB"]));
    assert_eq!(out.as_bytes(), &data[..4096]);

    stderr_of(ctl(&api).args(["reset", name]));
    assert!(all_zero(&api.data(name, MIB, 5000)));

    for (args, status) in [
        (vec!["exports", "nope"], "404"),
        (vec!["data", name, "--offset", "4MiB", "--length", "1"], "416"),
        (vec!["arm", name, "bad name"], "400"),
    ] {
        let output = run(ctl(&api).args(&args));
        assert_eq!(output.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains(status), "{args:?}: {output:?}");
    }
    let output = run(Command::new(NBDFAULT).args(["ctl", "--url", "http://127.0.0.1:9", "health"]));
    assert_eq!(output.status.code(), Some(2), "health fails when nothing answers");
    assert!(String::from_utf8_lossy(&output.stderr).contains("cannot reach the control API"));
}

#[test]
fn ctl_faults_follow_prints_new_records_as_they_come() {
    require!(PYTHON_NBD);
    let (server, api) = disk();
    api.set_policy("disk", FAIL_WRITES);
    ops(&server.uri("disk"), &["write 0 512 1"]);
    let mut follow = ctl(&api)
        .args(["faults", "disk", "--follow"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || {
        let line = lines.recv_timeout(common::control::POLL_TIMEOUT).expect("ctl faults --follow printed a record");
        serde_json::from_str::<Value>(&line).unwrap()
    };
    assert_eq!(next()["seq"], 1);
    ops(&server.uri("disk"), &["write 512 512 1", "write 1024 512 1"]);
    assert_eq!((next()["seq"].as_u64(), next()["seq"].as_u64()), (Some(2), Some(3)), "each record once, in order");
    follow.kill().unwrap();
    follow.wait().unwrap();
    assert!(lines.try_recv().is_err(), "no record printed twice");
}

// ---- policies given at start ------------------------------------------------------------------

#[test]
fn a_policy_given_with_the_policy_flag_or_in_the_config_file_is_in_force_from_the_start() {
    require!(PYTHON_NBD);
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("fail.yaml");
    std::fs::write(&policy, FAIL_WRITES).unwrap();
    let server = Server::builder()
        .export("disk", "memory:1MiB")
        .export("other", "memory:1MiB")
        .arg("--policy")
        .arg(format!("disk={}", policy.display()))
        .with_control()
        .start();
    let api = Api::new(&server);
    ops(&server.uri("disk"), &["write 0 512 1"])[0].expect_errno("EIO");
    ops(&server.uri("other"), &["write 0 512 1"])[0].expect_ok();
    let export = api.export("disk");
    assert_eq!(export["policy"]["origin"], policy.display().to_string());
    assert_eq!(api.get("/v1/exports/disk/policy").expect(200).text(), FAIL_WRITES);
    assert_eq!(api.export("other")["policy"], Value::Null);
    drop(server);

    // In a config file, relative to it.
    std::fs::create_dir(dir.path().join("policies")).unwrap();
    std::fs::write(dir.path().join("policies/enospc.yaml"), "rules: [{when: {op: write}, then: {error: ENOSPC}}]")
        .unwrap();
    let config = dir.path().join("nbdfault.yaml");
    std::fs::write(&config, "exports:\n  - name: disk\n    storage: memory:1MiB\n    policy: policies/enospc.yaml\n")
        .unwrap();
    let server = Server::builder().arg("--config").arg(&config).with_control().start();
    ops(&server.uri("disk"), &["write 0 512 1"])[0].expect_errno("ENOSPC");
    let origin = Api::new(&server).export("disk")["policy"]["origin"].as_str().unwrap().to_string();
    assert!(origin.ends_with("policies/enospc.yaml"), "{origin}");
}

#[test]
fn a_bad_policy_file_stops_the_server_from_starting_with_its_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "rules:\n  - name: x\n    when: { op: write, range: 2MiB..1MiB }\n    then: { error: EIO }\n")
        .unwrap();
    let config = dir.path().join("nbdfault.yaml");
    std::fs::write(&config, "exports:\n  - name: disk\n    storage: memory:1MiB\n    policy: bad.yaml\n").unwrap();
    for builder in [
        Server::builder().export("disk", "memory:1MiB").arg("--policy").arg(format!("disk={}", bad.display())),
        Server::builder().arg("--config").arg(&config),
    ] {
        let output = run(&mut builder.command());
        assert_eq!(output.status.code(), Some(2), "{output:?}");
        assert!(output.stdout.is_empty(), "no ready line: {}", String::from_utf8_lossy(&output.stdout));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(&format!("{}:3:31: ", bad.display())), "file:line:column: {stderr}");
        assert!(stderr.contains("inverted") && stderr.contains("fix:"), "{stderr}");
    }
    let output = run(&mut Server::builder()
        .export("disk", "memory:1MiB")
        .args(["--policy", "disk=/nonexistent.yaml"])
        .command());
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent.yaml"));
}

// ---- the shared typed client ------------------------------------------------------------------

#[test]
fn the_typed_client_reads_every_answer_of_a_real_server() {
    require!(PYTHON_NBD);
    let server = Server::builder().export("", "memory:1MiB").export("disk-1", "memory:16MiB").with_control().start();
    let client = Api::new(&server).client().clone();
    let health = client.health().unwrap();
    assert_eq!((health.status.as_str(), health.exports), ("ok", 2));
    let names: Vec<String> = client.exports().unwrap().into_iter().map(|export| export.name).collect();
    assert_eq!(names, ["", "disk-1"]);
    assert_eq!(client.export("").unwrap().size, MIB, "\"\" is the default export");

    let name = "disk-1";
    let policy = "rules: [{name: fail-armed, when: {op: write, range: 0..1MiB, armed_by: go}, then: {error: ENOSPC}}]";
    let answer = client.set_policy(name, policy.as_bytes()).unwrap();
    assert_eq!(answer.export.rule("fail-armed").map(|rule| rule.fired), Some(0));
    assert!(answer.warnings.is_empty(), "{:?}", answer.warnings);
    client.arm(name, "go").unwrap();
    assert!(client.export(name).unwrap().is_armed("go"));
    let results = ops(&server.uri(name), &["write 4096 4096 7", "write 2097152 4096 7"]);
    results[0].expect_errno("ENOSPC");
    results[1].expect_ok();

    let page = client.faults(name, 0).unwrap();
    assert_eq!(page.records.len(), 1);
    let record = &page.records[0];
    assert!(record.failed() && record.overlaps(4096, 4097), "{record:?}");
    assert_eq!((record.rule.as_str(), record.errno), ("fail-armed", Some(nbdfault_policies::Errno::ENOSPC)));
    assert_eq!((page.last_seq, page.dropped), (Some(record.seq), 0));
    assert_eq!(client.last_fault_seq(name).unwrap(), record.seq);
    assert!(client.faults(name, record.seq).unwrap().records.is_empty());
    assert_eq!(
        client.export(name).unwrap().rule("fail-armed").map(|rule| (rule.occurrences, rule.fired)),
        Some((1, 1))
    );

    assert_eq!(client.read_data(name, 2097152, 2).unwrap(), [7, 7]);
    client.write_data(name, 0, &[9; 16]).unwrap();
    assert_eq!(client.read_data(name, 0, 16).unwrap(), [9; 16]);
    client.disarm(name, "go").unwrap();
    assert!(!client.export(name).unwrap().is_armed("go"));
    assert!(client.policy(name).unwrap().contains("fail-armed"));
    assert!(client.clear_policy(name).unwrap().policy.is_none());
    assert_eq!(client.reset(name).unwrap().name, name);

    // Refusals carry the status, the server's message and the details of a policy error.
    let refused = client.set_policy(name, b"rules: [{name: x, when: {op: wrte}}]").unwrap_err();
    match &refused {
        nbdfault_control_client::Error::Refused { status: 400, message, details: Some(details), .. } => {
            assert!(message.contains("wrte"), "{message}");
            assert_eq!(details["line"], 1, "{details}");
        }
        other => panic!("expected a 400 with details, got {other:?}"),
    }
    assert_eq!(client.export("nope").unwrap_err().status(), Some(404));
}
