//! Policy files from the command line: `nbdfault policy check` on the scenario library and on
//! broken copies of it, `nbdfault policy schema` checked with python3-jsonschema against the
//! scenarios, and `nbdfault replay` output that both accept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::control::json_lines;
use common::{NBDFAULT, PYTHON, PYTHON_JSONSCHEMA, PYTHON_YAML, python_script, require, run, run_ok};

fn scenarios() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 9, "the scenario library has the issue's nine scenarios at least: {files:?}");
    files
}

fn nbdfault(args: &[&str]) -> Command {
    let mut command = Command::new(NBDFAULT);
    command.args(args);
    command
}

#[test]
fn policy_check_passes_on_every_scenario() {
    let files = scenarios();
    let stdout = run_ok(nbdfault(&["policy", "check"]).args(&files));
    for file in &files {
        assert!(
            stdout.contains(&format!("{}: ok (", file.display())),
            "{} is not reported ok:\n{stdout}",
            file.display()
        );
    }
}

/// Breaks `text` by replacing `from` (which must occur once) with `to`; returns the broken text
/// and the 1-based line and column where `to` starts, plus `shift` columns.
fn break_at(text: &str, from: &str, to: &str, shift: usize) -> (String, usize, usize) {
    assert_eq!(text.matches(from).count(), 1, "`{from}` occurs once");
    let at = text.find(from).unwrap();
    let line = text[..at].matches('\n').count() + 1;
    let column = at - text[..at].rfind('\n').map_or(0, |newline| newline + 1) + 1 + shift;
    (text.replacen(from, to, 1), line, column)
}

#[test]
fn policy_check_fails_on_broken_copies_of_scenarios_naming_file_line_and_column_with_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let issue =
        std::fs::read_to_string(scenarios().into_iter().find(|f| f.ends_with("issue-example.yaml")).unwrap()).unwrap();
    let cases = [
        ("inverted-range", "range: 1MiB..2MiB", "range: 2MiB..1MiB", 7, "START..END"),
        ("unknown-field", "armed_by: go", "armd_by: go", 0, "armed_by"),
        ("bare-duration", "delay: 50ms", "delay: 50", 7, "50ms"),
        ("ambiguous-unit", "range: 1MiB..2MiB", "range: 1MB..2MB", 7, "MiB"),
        ("unknown-op", "op: flush", "op: flsh", 4, "flush"),
        ("unknown-errno", "then: { error: EIO }", "then: { error: EIOO }", 15, "EIO"),
        ("bad-probability", "probability: 0.25", "probability: 1.25", 13, "25%"),
        ("zero-nth", "nth: { every: 3 }", "nth: { every: 0 }", 14, "1 or more"),
    ];
    for (name, from, to, shift, fix) in cases {
        let (broken, line, column) = break_at(&issue, from, to, shift);
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, broken).unwrap();
        let output = run(nbdfault(&["policy", "check"]).arg(&path));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{name}: {stderr}");
        let location = format!("{}:{line}:{column}: ", path.display());
        assert!(stderr.starts_with(&location), "{name}: expected `{location}`:\n{stderr}");
        let fix_line = stderr.lines().find(|l| l.trim_start().starts_with("fix: ")).unwrap_or_default();
        assert!(!fix_line.is_empty() && fix_line.contains(fix), "{name}: a fix mentioning `{fix}`:\n{stderr}");
    }
    // With several files, each is reported and any failure fails the run.
    let good = scenarios().remove(0);
    let output = run(nbdfault(&["policy", "check"]).arg(&good).arg(dir.path().join("unknown-op.yaml")));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stdout).contains(&format!("{}: ok", good.display())));
    let output = run(nbdfault(&["policy", "check"]).arg(dir.path().join("missing.yaml")));
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("missing.yaml: cannot read"));
}

#[test]
fn policy_check_reports_every_error_of_a_file_at_once_each_with_line_column_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("three-in-one-rule.yaml");
    std::fs::write(
        &path,
        "rules:\n  - name: fail-file\n    when: { op: wirte, range: 2MiB..1MiB, armed_by: go }\n    then: { error: EIOO }\n  \
         - name: torn-read\n    when: { op: read }\n    then: { torn: 4KiB }\n  - name: ok\n    then: { delay: 5 }\n",
    )
    .unwrap();
    let output = run(nbdfault(&["policy", "check"]).arg(&path));
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let shown = path.display();
    let locations: Vec<&str> = stderr.lines().filter(|line| !line.starts_with("  fix: ")).collect();
    let fixes = stderr.lines().filter(|line| line.starts_with("  fix: ")).count();
    assert_eq!(locations.len(), 5, "one line per error:\n{stderr}");
    assert_eq!(fixes, 5, "each error has its fix:\n{stderr}");
    for (line, column, what) in
        [(3, 17, "wirte"), (3, 31, "inverted"), (4, 20, "EIOO"), (5, 5, "`torn` tears a write"), (9, 20, "no unit")]
    {
        let prefix = format!("{shown}:{line}:{column}: ");
        assert!(
            locations.iter().any(|l| l.starts_with(&prefix) && l.contains(what)),
            "expected an error at {line}:{column} about {what}:\n{stderr}"
        );
    }
}

/// Runs `schema_check.py` with Debian's Python; returns each file's schema errors.
fn schema_errors(schema: &Path, files: &[PathBuf]) -> Vec<(String, Vec<String>)> {
    assert!(
        PYTHON_JSONSCHEMA.is_available() && PYTHON_YAML.is_available(),
        "the test must start with require!(PYTHON_JSONSCHEMA, PYTHON_YAML)"
    );
    let mut command = Command::new(PYTHON);
    command.arg(python_script("schema_check.py")).arg(schema).args(files);
    json_lines(&run_ok(&mut command))
        .into_iter()
        .map(|line| {
            assert_eq!(line["draft"], "Draft202012Validator", "the schema says which draft it is");
            let errors = line["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_string()).collect();
            (line["file"].as_str().unwrap().to_string(), errors)
        })
        .collect()
}

#[test]
fn the_policy_schema_accepts_every_scenario_and_refuses_broken_ones() {
    require!(PYTHON_JSONSCHEMA, PYTHON_YAML);
    let dir = tempfile::tempdir().unwrap();
    let schema = dir.path().join("policy.schema.json");
    std::fs::write(&schema, run_ok(&mut nbdfault(&["policy", "schema"]))).unwrap();
    let files = scenarios();
    let results = schema_errors(&schema, &files);
    assert_eq!(results.len(), files.len());
    for (file, errors) in &results {
        assert!(errors.is_empty(), "the schema refuses {file}: {errors:#?}");
    }

    let issue = std::fs::read_to_string(files.iter().find(|f| f.ends_with("issue-example.yaml")).unwrap()).unwrap();
    let mut broken = Vec::new();
    for (name, from, to) in [
        ("unknown-field", "armed_by: go", "armd_by: go"),
        ("unknown-op", "op: flush", "op: flsh"),
        ("bare-duration", "delay: 50ms", "delay: 50"),
        ("unknown-errno", "then: { error: EIO }", "then: { error: EIOO }"),
        ("probability", "probability: 0.25", "probability: 1.25"),
    ] {
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, issue.replacen(from, to, 1)).unwrap();
        broken.push(path);
    }
    for (file, errors) in schema_errors(&schema, &broken) {
        assert!(!errors.is_empty(), "the schema accepts the broken {file}");
    }
}

#[test]
fn a_replayed_fault_log_is_a_policy_that_check_and_the_schema_accept() {
    require!(PYTHON_JSONSCHEMA, PYTHON_YAML);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("faults.jsonl");
    let common = r#""time_ns":1000,"export":"disk","connection":1,"cookie":7,"flags":[]"#;
    let records = [
        r#""seq":1,"request_index":3,"op":"write","offset":1052672,"length":4096,"rule":"fail-file-data","outcome":"error","action":"skip","reply":"error","errno":"EIO","delay_ns":50000000,"persisted":0,"waited_ns":50089000"#,
        r#""seq":2,"request_index":5,"op":"write","offset":0,"length":4096,"rule":"tear","outcome":"torn","action":"torn","reply":"ok","delay_ns":0,"torn_persist":1536,"persisted":1536"#,
        r#""seq":3,"request_index":8,"op":"read","offset":0,"length":4096,"rule":"rot","outcome":"corrupt_read","action":"corrupt_read","reply":"ok","delay_ns":2000000,"corrupt":{"seed":77,"bytes":8},"persisted":0"#,
        r#""seq":4,"request_index":9,"op":"write","offset":0,"length":512,"rule":"hold","outcome":"error","action":"skip","reply":"error","errno":"ENOSPC","delay_ns":0,"stall":{"trigger":"release","timeout_ns":30000000000},"armed":["after"],"disarmed":["before"],"persisted":0"#,
        r#""seq":5,"request_index":12,"op":"read","offset":16777216,"length":512,"rule":"weak","outcome":"bad_sector","action":"skip","reply":"error","errno":"EIO","delay_ns":0,"bad_sector":true,"persisted":0"#,
        r#""seq":6,"request_index":13,"op":"flush","offset":0,"length":0,"rule":"cut","outcome":"power_cut","action":"perform","reply":"disconnect","delay_ns":0,"power_cut":true,"persisted":0"#,
        r#""seq":7,"request_index":14,"op":"write","offset":0,"length":4096,"rule":"lose","outcome":"silent_loss","action":"skip","reply":"ok","delay_ns":0,"persisted":0"#,
    ];
    let text: String = records.iter().map(|r| format!("{{{common},{r}}}\n")).collect();
    std::fs::write(&log, text).unwrap();
    let policy = dir.path().join("replay.yaml");
    run_ok(nbdfault(&["replay"]).arg(&log).arg("-o").arg(&policy));
    let yaml = std::fs::read_to_string(&policy).unwrap();
    assert_eq!(yaml.matches("request:").count(), records.len(), "one schedule entry per record:\n{yaml}");
    run_ok(nbdfault(&["policy", "check"]).arg(&policy));
    let schema = dir.path().join("policy.schema.json");
    std::fs::write(&schema, run_ok(&mut nbdfault(&["policy", "schema"]))).unwrap();
    let results = schema_errors(&schema, std::slice::from_ref(&policy));
    assert!(results[0].1.is_empty(), "the schema refuses replay's output: {:#?}\n{yaml}", results[0].1);

    // A log of another program is refused, saying so.
    std::fs::write(&log, "{\"hello\": 1}\n").unwrap();
    let output = run(nbdfault(&["replay"]).arg(&log));
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("fault log"), "{output:?}");
}
