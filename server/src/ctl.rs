//! `nbdfault ctl`: the control API from the command line.

use std::io::{Read, Write};
use std::path::Path;

pub use nbdfault_control_client::{DEFAULT_EXPORT, path_segment, query_value};
use nbdfault_control_client::{Error as ApiError, tls};

/// What went wrong talking to the control API, said so a user knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the control API at {url}: {source}{hint}")]
    Unreachable { url: String, source: Box<ureq::Error>, hint: &'static str },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Refused { method: String, path: String, status: u16, message: String },
    /// `set-policy` with a policy the server refused: its errors, each with the file name, line,
    /// column and a fix, as `nbdfault policy check` prints them.
    #[error("{errors}\nthe policy was refused; export {export:?} keeps the policy it had")]
    PolicyRefused { export: String, errors: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

impl From<ApiError> for CtlError {
    fn from(error: ApiError) -> CtlError {
        match error {
            ApiError::Unreachable { url, source, hint } => CtlError::Unreachable { url, source, hint },
            ApiError::Refused { method, path, status, message, .. } => {
                CtlError::Refused { method, path, status, message }
            }
            ApiError::Io(error) => CtlError::Io(error),
            error @ (ApiError::Invalid { .. } | ApiError::BadUrl { .. }) => CtlError::Usage(error.to_string()),
        }
    }
}

/// A client for one server's control API: the shared typed client, and the raw calls `ctl`
/// prints as they come.
pub struct Client {
    api: nbdfault_control_client::Client,
}

/// The TLS settings of `ctl` for an HTTPS control API, from a directory laid out as libnbd's
/// `tls-certificates=`: `ca-cert.pem` (the authority the server's certificate chains to) and,
/// for a server started with --tls-verify-peer, `client-cert.pem` and `client-key.pem`.
pub fn client_tls(dir: &Path) -> Result<tls::TlsConfig, CtlError> {
    let usage = |error: crate::tls::TlsError| CtlError::Usage(error.to_string());
    let ca = dir.join(crate::tls::CA_CERT);
    if !ca.exists() {
        return Err(CtlError::Usage(format!(
            "{} is missing: the directory given with --tls-certificates holds ca-cert.pem, the CA that signed \
             the server's certificate",
            ca.display()
        )));
    }
    let roots: Vec<_> = crate::tls::read_certificates(&ca)
        .map_err(usage)?
        .iter()
        .map(|der| tls::Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let identity = if cert.exists() && key.exists() {
        let chain: Vec<_> = crate::tls::read_certificates(&cert)
            .map_err(usage)?
            .iter()
            .map(|der| tls::Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        let key_pem =
            std::fs::read(&key).map_err(|error| CtlError::Usage(format!("cannot read {}: {error}", key.display())))?;
        let key = tls::PrivateKey::from_pem(&key_pem)
            .map_err(|error| CtlError::Usage(format!("{}: {error}", key.display())))?;
        Some(tls::ClientCert::new_with_certs(&chain, key))
    } else {
        None
    };
    Ok(tls::TlsConfig::builder()
        .root_certs(tls::RootCerts::new_with_certs(&roots))
        .client_cert(identity)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .build())
}

impl Client {
    /// A client for the API at `base`; `tls` (from [`client_tls`]) is needed for `https://`.
    pub fn new(base: &str, token: Option<String>, tls: Option<tls::TlsConfig>) -> Result<Client, CtlError> {
        // Without a CA, trust nothing: the control API's certificate comes from the user's own CA.
        let tls = tls.unwrap_or_else(|| {
            tls::TlsConfig::builder()
                .root_certs(tls::RootCerts::new_with_certs(&[]))
                .unversioned_rustls_crypto_provider(crate::tls::provider())
                .build()
        });
        Ok(Client { api: nbdfault_control_client::Client::with_tls(base, token, tls)? })
    }

    /// The typed client underneath.
    pub fn api(&self) -> &nbdfault_control_client::Client {
        &self.api
    }

    /// Calls the API and returns the body as text.
    pub fn text(&self, method: &'static str, path: &str, body: Option<Vec<u8>>) -> Result<String, CtlError> {
        Ok(self.api.request(method, path, body.as_deref())?.text())
    }

    /// Calls the API and copies the raw body to `out`.
    pub fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64, CtlError> {
        Ok(self.api.copy(path, out)?)
    }
}

/// `ctl faults`: prints the export's fault log after record `since`, one JSON object per line
/// (the decision log with `decisions`). With `follow`, asks again at that interval for newer
/// records, until the server cannot be reached; a follower told the control worker is busy
/// (`503`) asks again at the next turn, where a single read reports it.
pub fn faults(
    client: &Client,
    name: &str,
    mut since: u64,
    decisions: bool,
    follow: Option<std::time::Duration>,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    let view = if decisions { "decisions" } else { "records" };
    loop {
        let path = format!("/v1/exports/{}/faults?since={since}&view={view}", path_segment(name));
        let text = match client.text("GET", &path, None) {
            Err(CtlError::Refused { status: 503, .. }) if follow.is_some() => String::new(),
            answer => answer?,
        };
        for line in text.lines() {
            writeln!(out, "{line}")?;
            if let Some(seq) = serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["seq"].as_u64()) {
                since = since.max(seq);
            }
        }
        out.flush()?;
        match follow {
            Some(every) => std::thread::sleep(every),
            None => return Ok(()),
        }
    }
}

/// `ctl watch`: prints the export's event stream as it comes, as text or JSON lines, until the
/// server ends it. A stream the server dropped (the reader was too slow) is an error.
pub fn watch(
    api: &nbdfault_control_client::Client,
    name: &str,
    rate: Option<u32>,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), CtlError> {
    for event in api.events(name, rate)? {
        let event = event?;
        let line = if json {
            serde_json::json!({ "event": event.kind, "id": event.id, "data": event.data }).to_string()
        } else {
            describe_event(&event)
        };
        writeln!(out, "{line}")?;
        out.flush()?;
        if event.kind == "dropped" {
            let reason = event.data["reason"].as_str().unwrap_or("the server ended the stream");
            return Err(CtlError::Usage(format!("the event stream ended: {reason}")));
        }
    }
    Ok(())
}

/// One event as a line of text: the time since server start, then what happened.
pub fn describe_event(event: &nbdfault_control_client::Event) -> String {
    let data = &event.data;
    let number = |key: &str| data[key].as_u64().unwrap_or(0);
    let text = |key: &str| data[key].as_str().unwrap_or("").to_string();
    let seconds = |ns: u64| format!("{:>12.6}", ns as f64 / 1e9);
    let request = |data: &serde_json::Value| {
        let flags: Vec<&str> = data["flags"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).collect();
        format!(
            "{:<12} offset {:>12} length {:>8} conn {}{}",
            data["op"].as_str().unwrap_or("?"),
            data["offset"].as_u64().unwrap_or(0),
            data["length"].as_u64().unwrap_or(0),
            data["connection"].as_u64().unwrap_or(0),
            if flags.is_empty() { String::new() } else { format!(" [{}]", flags.join(",")) }
        )
    };
    match event.kind.as_str() {
        "hello" => format!(
            "watching export {:?} ({} bytes) from {} s; {} request events per second one by one",
            text("export"),
            number("size"),
            seconds(number("time_ns")).trim(),
            match number("rate") {
                0 => "all".to_string(),
                rate => rate.to_string(),
            }
        ),
        "request" => {
            let took = number("end_ns").saturating_sub(number("start_ns")) as f64 / 1e6;
            let reply = match data["errno"].as_str() {
                Some(errno) => errno.to_string(),
                None => text("reply"),
            };
            let rule = match data["rule"].as_str() {
                Some(rule) => format!("  rule {rule} ({})", text("outcome")),
                None => String::new(),
            };
            format!("{} {}  {:<10} {took:>9.3} ms{rule}", seconds(number("end_ns")), request(data), reply)
        }
        "pending" => {
            let why = match data["until"].as_str() {
                Some(trigger) => format!("stalled until {trigger} is armed"),
                None => format!("delayed {:.3} ms", number("delay_ns") as f64 / 1e6),
            };
            format!("{} {}  PENDING    {why} by rule {}", seconds(number("start_ns")), request(data), text("rule"))
        }
        "fault" if data["event"] == "power_cut" => {
            let cut = &data["cut"];
            format!(
                "{} fault #{}: POWER CUT by the {}: {} connections dropped, {} unflushed writes ({} bytes) undone{}",
                seconds(number("time_ns")),
                number("seq"),
                text("origin").replace('_', " "),
                cut["connections"].as_u64().unwrap_or(0),
                cut["undone_writes"].as_u64().unwrap_or(0),
                cut["undone_bytes"].as_u64().unwrap_or(0),
                if data["power_off"].is_object() { ", stays off" } else { "" }
            )
        }
        "fault" if data["event"] == "power_on" => format!(
            "{} fault #{}: power on by the {}{}",
            seconds(number("time_ns")),
            number("seq"),
            text("origin").replace('_', " "),
            data["trigger"].as_str().map(|trigger| format!(" {trigger}")).unwrap_or_default()
        ),
        "fault" => format!(
            "{} fault #{}: rule {} {} {} at {} length {}{}",
            seconds(number("time_ns")),
            number("seq"),
            text("rule"),
            text("outcome"),
            text("op"),
            number("offset"),
            number("length"),
            data["errno"].as_str().map(|errno| format!(" -> {errno}")).unwrap_or_default()
        ),
        "trigger" => format!(
            "{} trigger {} {} (by {})",
            seconds(number("time_ns")),
            text("trigger"),
            if data["armed"].as_bool() == Some(true) { "armed" } else { "disarmed" },
            text("by").replace('_', " ")
        ),
        "policy" if data["installed"].as_bool() == Some(true) => {
            let rules: Vec<&str> = data["rules"].as_array().into_iter().flatten().filter_map(|r| r.as_str()).collect();
            format!(
                "{} policy installed from {}: rules {}",
                seconds(number("time_ns")),
                text("origin"),
                rules.join(", ")
            )
        }
        "policy" => format!("{} policy removed: every request passes", seconds(number("time_ns"))),
        "reset" => format!("{} export reset to its pristine contents", seconds(number("time_ns"))),
        "power" if data["on"].as_bool() == Some(true) => format!("{} power on", seconds(number("time_ns"))),
        "power" => format!("{} POWER CUT", seconds(number("time_ns"))),
        "aggregate" => {
            let ops = data["ops"].as_object().into_iter().flatten().map(|(op, counts)| {
                let requests = counts["requests"].as_u64().unwrap_or(0).max(1);
                format!(
                    "{op} {} requests {} bytes {} errors {:.3} ms mean",
                    counts["requests"].as_u64().unwrap_or(0),
                    counts["bytes"].as_u64().unwrap_or(0),
                    counts["errors"].as_u64().unwrap_or(0),
                    counts["latency_sum_ns"].as_u64().unwrap_or(0) as f64 / requests as f64 / 1e6
                )
            });
            format!("{} ... and {}", seconds(number("to_ns")), ops.collect::<Vec<_>>().join("; "))
        }
        "dropped" => format!("{} stream ended: {}", seconds(number("time_ns")), text("reason")),
        other => format!("{other}: {data}"),
    }
}

/// Reads a file, or stdin for `-`.
pub fn read_input(path: &str) -> Result<Vec<u8>, CtlError> {
    if path == "-" {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data)?;
        Ok(data)
    } else {
        std::fs::read(path).map_err(|error| CtlError::Usage(format!("cannot read {path}: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_for_paths_and_the_default_export_has_a_spelling() {
        assert_eq!(path_segment(""), "@default");
        assert_eq!(path_segment("disk"), "disk");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(query_value("dir/p q&r.yaml"), "dir/p%20q%26r.yaml");
    }

    /// What `faults` writes, and how many times it flushed: once per turn, answered or not.
    #[derive(Clone, Default)]
    struct Output(std::sync::Arc<std::sync::Mutex<(Vec<u8>, usize)>>);

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.lock().unwrap().1 += 1;
            Ok(())
        }
    }

    impl Output {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap().0).into_owned()
        }
        fn turns(&self) -> usize {
            self.0.lock().unwrap().1
        }
    }

    fn within_10_s(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    #[test]
    fn following_the_fault_log_asks_again_while_the_control_worker_is_busy() {
        use std::sync::Arc;

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let log = Arc::new(crate::fault::log::FaultLog::in_memory(16));
        log.record_power(crate::fault::log::power_on_record("disk"));
        let state = crate::control::ControlState::for_tests(log);
        let occupied = state.occupy_worker();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let address = listener.local_addr().unwrap();
        let controller = crate::shutdown::ShutdownController::new();
        runtime.spawn(crate::control::serve(listener, state, None, controller.handle()));

        let client = Client::new(&format!("http://{address}"), None, None).unwrap();
        let output = Output::default();
        let mut out = output.clone();
        let every = Some(std::time::Duration::from_millis(10));
        let follower = std::thread::spawn(move || faults(&client, "disk", 0, false, every, &mut out));
        // Turns answered 503, one after the other, and the follower goes on.
        within_10_s("three turns while the worker is busy", || output.turns() >= 3 || follower.is_finished());
        assert!(!follower.is_finished(), "the follower stopped at a 503");
        assert_eq!(output.text(), "", "nothing to print while the worker is busy");
        drop(occupied);
        within_10_s("the record, once the worker is free", || output.text().contains(r#""event":"power_on""#));
        // It ends when the server is gone, saying so.
        drop(runtime);
        within_10_s("the follower to end", || follower.is_finished());
        let ended = follower.join().unwrap();
        assert!(matches!(ended, Err(CtlError::Unreachable { .. })), "{ended:?}");
        assert_eq!(output.text().lines().count(), 1, "the record is printed once: {}", output.text());
    }

    #[test]
    fn watch_tells_power_records_apart_from_request_faults() {
        let event =
            |data: serde_json::Value| nbdfault_control_client::Event { kind: "fault".into(), id: Some(1), data };
        let cut = event(serde_json::json!({
            "seq": 4, "time_ns": 2_500_000_000u64, "export": "disk", "event": "power_cut", "origin": "control_api",
            "next_request_index": 9, "cut": {"connections": 2, "journaled": true, "undone_writes": 3, "undone_bytes": 12288},
            "power_off": {}
        }));
        let text = describe_event(&cut);
        assert!(text.contains("fault #4: POWER CUT by the control api: 2 connections dropped, 3 unflushed writes (12288 bytes) undone, stays off"), "{text}");
        let on = event(serde_json::json!({
            "seq": 5, "time_ns": 3_000_000_000u64, "export": "disk", "event": "power_on", "origin": "trigger",
            "next_request_index": 9, "trigger": "power-on"
        }));
        let text = describe_event(&on);
        assert!(text.contains("fault #5: power on by the trigger power-on"), "{text}");
    }

    #[test]
    fn an_unreachable_server_is_reported_with_what_to_check() {
        // Port 9 on loopback (discard) is closed on test machines; nothing listens there.
        let client = Client::new("http://127.0.0.1:9", None, None).unwrap();
        let error = client.text("GET", "/v1/health", None).unwrap_err().to_string();
        assert!(error.contains("cannot reach the control API"), "{error}");
    }
}
