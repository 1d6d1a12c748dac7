//! The scenario library: every file validates, carries its header, matches the JSON Schema, and
//! a few behave as their headers say. Also: the schema refuses the mistakes people make.

use std::path::PathBuf;
use std::time::Duration;

use nbdfault_policies::{Action, Engine, Errno, Op, Policy, Reply, Request, RequestFlags, Wait, json_schema};

fn scenarios() -> Vec<(String, String)> {
    let directory = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<(String, String)> = std::fs::read_dir(&directory)
        .expect("the scenarios directory exists")
        .map(|entry| entry.expect("a readable directory entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "yaml"))
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a readable scenario");
            (path.file_name().unwrap().to_string_lossy().into_owned(), text)
        })
        .collect();
    files.sort();
    files
}

fn scenario(name: &str) -> Engine {
    let (_, text) = scenarios().into_iter().find(|(file, _)| file == name).expect("the scenario exists");
    Engine::new(Some(Policy::from_yaml(&text, name).unwrap_or_else(|error| panic!("{error}"))))
}

fn as_json(yaml: &str) -> serde_json::Value {
    let value: serde_yaml::Value = serde_yaml::from_str(yaml).expect("valid YAML");
    serde_json::to_value(value).expect("YAML without non-string keys converts to JSON")
}

fn request(op: Op, offset: u64, length: u64) -> Request {
    Request { op, offset, length, flags: RequestFlags::default(), connection: 0, cookie: 0 }
}

#[test]
fn every_scenario_validates_without_warnings_and_says_what_it_reproduces_and_replaces() {
    let files = scenarios();
    assert!(files.len() >= 10, "only {} scenarios", files.len());
    for (name, text) in &files {
        match Policy::from_yaml(text, name) {
            Ok(policy) => assert!(policy.warnings().is_empty(), "{name}: {:?}", policy.warnings()),
            Err(error) => panic!("{error}"),
        }
        assert!(text.starts_with('#'), "{name} must start with a comment saying what it reproduces");
        assert!(text.contains("Replaces:"), "{name} must say which tool it replaces");
    }
}

#[test]
fn the_json_schema_accepts_every_scenario() {
    let schema = json_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema");
    for (name, text) in scenarios() {
        let errors: Vec<String> = validator.iter_errors(&as_json(&text)).map(|error| error.to_string()).collect();
        assert!(errors.is_empty(), "{name}: {errors:?}");
    }
}

#[test]
fn the_json_schema_refuses_typical_mistakes_that_the_parser_also_refuses() {
    let schema = json_schema();
    let validator = jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema");
    for mistake in [
        "rules: [{ when: { op: wirte }, then: { error: EIO } }]",
        "rules: [{ when: { op: write }, then: { error: eio } }]",
        "rules: [{ when: { rnage: 0..4KiB }, then: { error: EIO } }]",
        "rules: [{ when: { op: write } }]",
        "rules: [{ when: { range: 1MB..2MB }, then: { error: EIO } }]",
        "rules: [{ when: { range: 4096 }, then: { error: EIO } }]",
        "rules: [{ then: { delay: 50 } }]",
        "rules: [{ then: { delay: 50 ms later } }]",
        "rules: [{ when: { probability: 1.5 }, then: { error: EIO } }]",
        "rules: [{ when: { nth: 0 }, then: { error: EIO } }]",
        "rules: [{ when: { limit: 0 }, then: { error: EIO } }]",
        "rules: [{ when: { op: [] }, then: { error: EIO } }]",
        "rules: [{ name: 'has spaces', then: { error: EIO } }]",
        "rules: [{ then: { error: EIO, colour: red } }]",
        "rules: [{ then: { corrupt: 0 } }]",
        "rule: [{ then: { error: EIO } }]",
        "seed: -1\nrules: [{ then: { error: EIO } }]",
        "seed: 3\n",
    ] {
        let json = as_json(mistake);
        assert!(!validator.is_valid(&json), "the schema accepted: {mistake}");
        assert!(Policy::from_yaml(mistake, "mistake.yaml").is_err(), "the parser accepted: {mistake}");
    }
}

#[test]
fn fail_flush_fails_only_flushes_once_armed() {
    let engine = scenario("fail-flush.yaml");
    assert!(engine.decide(&request(Op::Flush, 0, 0), Duration::ZERO).rule.is_none());
    engine.arm("flush-fails", Duration::ZERO);
    let flush = engine.decide(&request(Op::Flush, 0, 0), Duration::ZERO);
    assert_eq!((flush.action, flush.reply), (Action::Skip, Reply::Error(Errno::EIO)));
    assert!(engine.decide(&request(Op::Write, 0, 4096), Duration::ZERO).rule.is_none());
}

#[test]
fn flaky_device_fails_everything_in_the_down_second_of_each_ten() {
    let engine = scenario("flaky-device.yaml");
    engine.arm("flaky", Duration::from_secs(100));
    let fails_at =
        |millis: u64| engine.decide(&request(Op::Read, 0, 512), Duration::from_millis(millis)).rule.is_some();
    assert_eq!(
        [
            fails_at(100_000),
            fails_at(108_999),
            fails_at(109_000),
            fails_at(109_999),
            fails_at(110_000),
            fails_at(119_500)
        ],
        [false, false, true, true, false, true]
    );
}

#[test]
fn power_cut_asks_the_server_to_journal_and_cuts_once() {
    let engine = scenario("power-cut.yaml");
    assert!(engine.tracks_unflushed_writes());
    engine.arm("power-cut", Duration::ZERO);
    let cut = engine.decide(&request(Op::Read, 0, 512), Duration::ZERO);
    assert!(cut.power_cut.is_some());
    assert_eq!(cut.reply, Reply::Disconnect);
    assert!(engine.decide(&request(Op::Read, 0, 512), Duration::ZERO).rule.is_none());
    assert!(!scenario("fail-flush.yaml").tracks_unflushed_writes());
}

#[test]
fn bad_sectors_fail_reads_and_the_first_two_writes_then_remap() {
    let engine = scenario("bad-sectors.yaml");
    let at = Duration::ZERO;
    let weak = 4 << 20;
    assert_eq!(engine.decide(&request(Op::Read, weak, 4096), at).reply, Reply::Error(Errno::EIO));
    assert_eq!(engine.decide(&request(Op::Write, weak, 4096), at).reply, Reply::Error(Errno::EIO));
    assert_eq!(engine.decide(&request(Op::Write, weak, 4096), at).reply, Reply::Error(Errno::EIO));
    assert_eq!(engine.decide(&request(Op::Write, weak, 4096), at).reply, Reply::Ok);
    assert_eq!(engine.decide(&request(Op::Read, weak, 4096), at).reply, Reply::Ok);
    assert_eq!(engine.decide(&request(Op::Read, 16 << 20, 4096), at).reply, Reply::Error(Errno::EIO));
}

#[test]
fn stall_then_fail_holds_the_fifth_write_until_release() {
    let engine = scenario("stall-then-fail.yaml");
    engine.arm("hold", Duration::ZERO);
    let decisions: Vec<_> = (0..6).map(|_| engine.decide(&request(Op::Write, 0, 4096), Duration::ZERO)).collect();
    assert!(decisions.iter().enumerate().all(|(i, decision)| decision.rule.is_some() == (i == 4)));
    assert_eq!(decisions[4].wait, Wait::Until { trigger: "release".into(), timeout: Some(Duration::from_secs(30)) });
    assert_eq!(decisions[4].reply, Reply::Error(Errno::EIO));
}

#[test]
fn torn_writes_keep_whole_sectors_of_the_first_eight() {
    let engine = scenario("torn-writes.yaml");
    engine.arm("tear", Duration::ZERO);
    let mut kept = std::collections::BTreeSet::new();
    for _ in 0..400 {
        if let Action::Torn { persist } = engine.decide(&request(Op::Write, 0, 64 << 10), Duration::ZERO).action {
            assert_eq!(persist % 512, 0);
            kept.insert(persist);
        }
    }
    assert_eq!(kept.into_iter().collect::<Vec<_>>(), (0..8).map(|sectors| sectors * 512).collect::<Vec<u64>>());
}
