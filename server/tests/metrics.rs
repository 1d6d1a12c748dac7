//! `GET /metrics` against the real binary, read by the Prometheus project's own parser (Debian's
//! python3-prometheus-client, in both the Prometheus text and the OpenMetrics format): every
//! family parses, and the values are those of the requests libnbd sent.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::control::{Api, ops};
use common::{PYTHON, PYTHON_NBD, PYTHON_PROMETHEUS, Server, python_script, require};
use serde_json::Value;

/// Parses an exposition with `metrics_parse.py` and returns its families.
fn parse(text: &str, format: &str) -> Vec<Value> {
    let mut child = Command::new(PYTHON)
        .arg(python_script("metrics_parse.py"))
        .arg(format)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("{PYTHON}: {error}"));
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the {format} parser refused the exposition: {stderr}\n{text}");
    serde_json::from_slice::<Value>(&output.stdout).unwrap().as_array().unwrap().clone()
}

/// The value of the sample `name` whose labels include every pair of `labels`.
#[track_caller]
fn sample(families: &[Value], name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = families
        .iter()
        .flat_map(|family| family["samples"].as_array().unwrap().iter())
        .filter(|sample| sample["name"] == name)
        .filter(|sample| labels.iter().all(|(key, value)| sample["labels"][key] == *value))
        .map(|sample| sample["value"].as_f64().unwrap())
        .collect();
    assert_eq!(found.len(), 1, "one sample {name}{labels:?}, found {found:?}");
    found[0]
}

fn family_type(families: &[Value], name: &str) -> String {
    let family = families.iter().find(|family| family["name"] == name).unwrap_or_else(|| panic!("no family {name}"));
    family["type"].as_str().unwrap().to_string()
}

#[test]
fn metrics_parse_with_the_prometheus_parser_and_count_the_requests_sent() {
    require!(PYTHON_NBD, PYTHON_PROMETHEUS);
    let server = Server::builder().export("disk", "memory:16MiB").export("idle", "memory:1MiB").with_control().start();
    let api = Api::new(&server);
    api.set_policy(
        "disk",
        "rules: [{name: fail-armed, when: {op: write, range: 1MiB..2MiB, armed_by: go}, then: {error: EIO}}]",
    );
    api.arm("disk", "go");
    let results = ops(
        &server.uri("disk"),
        &[
            "write 0 4096 1",
            "write 8192 8192 2",
            "write 1048576 4096 3",
            "read 0 4096",
            "read 0 65536",
            "read 4096 512",
            "trim 65536 4096",
            "flush",
        ],
    );
    results[2].expect_errno("EIO");

    for (format, accept) in [("prometheus", "text/plain"), ("openmetrics", "application/openmetrics-text")] {
        let answer = api.client().call_with_headers("GET", "/metrics", None, &[("Accept", accept)]).unwrap();
        assert_eq!(answer.status, 200);
        let content_type = answer.header("content-type").unwrap_or_default().to_string();
        assert!(
            content_type.starts_with(if format == "prometheus" {
                "text/plain; version=0.0.4"
            } else {
                "application/openmetrics-text"
            }),
            "{content_type}"
        );
        let families = parse(&answer.text(), format);
        fn disk(op: &str) -> [(&str, &str); 2] {
            [("export", "disk"), ("op", op)]
        }
        let total = |name: &str| format!("{name}_total");

        assert_eq!(sample(&families, &total("nbdfault_requests"), &disk("write")), 3.0, "{format}");
        assert_eq!(sample(&families, &total("nbdfault_requests"), &disk("read")), 3.0);
        assert_eq!(sample(&families, &total("nbdfault_requests"), &disk("trim")), 1.0);
        assert_eq!(sample(&families, &total("nbdfault_requests"), &disk("flush")), 1.0);
        assert_eq!(sample(&families, &total("nbdfault_request_errors"), &disk("write")), 1.0);
        assert_eq!(sample(&families, &total("nbdfault_request_errors"), &disk("read")), 0.0);
        assert_eq!(
            sample(&families, &total("nbdfault_request_bytes"), &disk("write")),
            12288.0,
            "the failed write moved nothing"
        );
        assert_eq!(sample(&families, &total("nbdfault_request_bytes"), &disk("read")), 4096.0 + 65536.0 + 512.0);
        assert_eq!(sample(&families, &total("nbdfault_request_bytes"), &disk("trim")), 4096.0);
        assert_eq!(sample(&families, &total("nbdfault_requests"), &[("export", "idle"), ("op", "read")]), 0.0);

        assert_eq!(family_type(&families, "nbdfault_request_duration_seconds"), "histogram");
        assert_eq!(sample(&families, "nbdfault_request_duration_seconds_count", &disk("write")), 3.0);
        let inf = [("export", "disk"), ("op", "write"), ("le", "+Inf")];
        assert_eq!(sample(&families, "nbdfault_request_duration_seconds_bucket", &inf), 3.0);
        let sum = sample(&families, "nbdfault_request_duration_seconds_sum", &disk("write"));
        assert!(sum > 0.0 && sum < 10.0, "{sum}");

        let fault = [("export", "disk"), ("rule", "fail-armed"), ("outcome", "error")];
        assert_eq!(sample(&families, &total("nbdfault_faults"), &fault), 1.0);
        let rule = [("export", "disk"), ("rule", "fail-armed")];
        assert_eq!(sample(&families, &total("nbdfault_rule_occurrences"), &rule), 1.0);
        assert_eq!(sample(&families, &total("nbdfault_rule_fired"), &rule), 1.0);
        assert_eq!(sample(&families, "nbdfault_trigger_armed", &[("export", "disk"), ("trigger", "go")]), 1.0);
        assert_eq!(sample(&families, &total("nbdfault_connections"), &[("export", "disk")]), 1.0);
        assert_eq!(sample(&families, "nbdfault_connections_open", &[("export", "disk")]), 0.0);
        assert_eq!(sample(&families, "nbdfault_requests_in_flight", &[("export", "disk")]), 0.0);
        assert_eq!(sample(&families, "nbdfault_in_flight_bytes", &[("export", "disk")]), 0.0);
        assert_eq!(sample(&families, "nbdfault_export_size_bytes", &[("export", "disk")]), 16.0 * 1048576.0);
        assert_eq!(sample(&families, "nbdfault_event_subscribers", &[("export", "disk")]), 0.0);
        assert_eq!(sample(&families, &total("nbdfault_fault_log_dropped"), &[]), 0.0);
        assert_eq!(sample(&families, "nbdfault_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    }

    api.disarm("disk", "go");
    let text = api.get("/metrics").expect(200).text();
    let families = parse(&text, "prometheus");
    assert_eq!(sample(&families, "nbdfault_trigger_armed", &[("export", "disk"), ("trigger", "go")]), 0.0);
    assert_eq!(sample(&families, "nbdfault_power_cuts_total", &[("export", "disk")]), 0.0);
    assert_eq!(sample(&families, "nbdfault_power_off", &[("export", "disk")]), 0.0);

    // A power cut that keeps the export off, then the power back.
    api.post("/v1/exports/disk/power-cut?off=true").expect(200);
    let families = parse(&api.get("/metrics").expect(200).text(), "prometheus");
    assert_eq!(sample(&families, "nbdfault_power_cuts_total", &[("export", "disk")]), 1.0);
    assert_eq!(sample(&families, "nbdfault_power_off", &[("export", "disk")]), 1.0);
    assert_eq!(sample(&families, "nbdfault_power_off", &[("export", "idle")]), 0.0, "only the export cut");
    api.post("/v1/exports/disk/power-on").expect(200);
    let families = parse(&api.get("/metrics").expect(200).text(), "prometheus");
    assert_eq!(sample(&families, "nbdfault_power_cuts_total", &[("export", "disk")]), 1.0);
    assert_eq!(sample(&families, "nbdfault_power_off", &[("export", "disk")]), 0.0);
    assert_eq!(sample(&families, "nbdfault_power_cuts_total", &[("export", "idle")]), 0.0);
}

#[test]
fn metrics_need_the_control_token_like_every_endpoint() {
    let server =
        Server::builder().export("disk", "memory:1MiB").arg("--control-token").arg("s3cret").with_control().start();
    let api = Api::new(&server);
    assert_eq!(api.get("/metrics").status, 401);
    let text = api.with_token("s3cret").get("/metrics").expect(200).text();
    assert!(text.contains("nbdfault_requests_total{export=\"disk\",op=\"write\"} 0"), "{text}");
}
