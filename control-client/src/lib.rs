//! A blocking client for the nbdfault control API (docs/control-api.md), shared by `nbdfault ctl`,
//! the client tests' guest and the server's integration tests, so there is one spelling of the
//! default export, one URL encoding of names, and one reading of each answer.
//!
//! ```no_run
//! use nbdfault_control_client::Client;
//!
//! let client = Client::new("http://127.0.0.1:10810", None)?;
//! client.arm("disk", "go")?;
//! for record in client.faults("disk", 0)?.records {
//!     println!("{} {} at {}: {:?}", record.rule, record.op, record.offset, record.errno);
//! }
//! # Ok::<(), nbdfault_control_client::Error>(())
//! ```

mod events;
mod types;

use std::io::{Read, Write};
use std::time::Duration;

pub use events::{Event, Events};
pub use nbdfault_policies::{FaultRecord, LogEntry, PowerRecord};
pub use types::{
    BadSector, Counters, ExportView, FaultPage, Health, PolicyAnswer, PolicyView, PowerCutAnswer, PowerOff,
    PowerOnAnswer, PowerView, RuleCounter, TriggerState,
};
/// TLS settings for an `https://` API (the `tls` feature): ureq's, built by the caller with its
/// own roots, client certificate and crypto provider.
#[cfg(feature = "tls")]
pub use ureq::tls;

/// How the export named `""` (the default export) is written in paths.
pub const DEFAULT_EXPORT: &str = "@default";

/// How long one ordinary call may take, answer included.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a connection may sit idle and still carry the next call. The server closes a
/// kept-alive connection that has been idle for its header timeout (10 s); a call sent on it just
/// as that happens is lost with the connection ("Peer disconnected"). Well under that, a
/// connection is never reused near the moment the server drops it, however slow the machine.
pub const MAX_IDLE: Duration = Duration::from_secs(3);
/// The largest answer read into memory (a `data` read is at most 64 MiB; the fault log's memory
/// holds at most 262,144 records).
const MAX_ANSWER: u64 = 256 << 20;

/// What went wrong, said so a user knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the control API at {url}: {source}{hint}")]
    Unreachable { url: String, source: Box<ureq::Error>, hint: &'static str },
    /// The API answered with an error status; `message` is its `error`, `details` the rest.
    #[error("{method} {path}: HTTP {status}: {message}")]
    Refused { method: String, path: String, status: u16, message: String, details: Option<serde_json::Value> },
    /// The answer is not what docs/control-api.md documents.
    #[error("{path}: the answer is not what the control API documents: {message}")]
    Invalid { path: String, message: String },
    #[error("control API URL {url:?}: {message}")]
    BadUrl { url: String, message: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Percent-encodes an export or trigger name as one URL path segment; `""` becomes
/// [`DEFAULT_EXPORT`].
pub fn path_segment(name: &str) -> String {
    if name.is_empty() {
        return DEFAULT_EXPORT.to_string();
    }
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// `/v1/exports/NAME`, with NAME as [`path_segment`] writes it.
pub fn export_path(name: &str) -> String {
    format!("/v1/exports/{}", path_segment(name))
}

/// Percent-encodes a value for a URL query.
pub fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// One answer as it came: any status, the headers (names in lower case), the body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A client for one server's control API. Calls are blocking; one client may be used from
/// several threads.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// For the event stream: no overall time limit.
    streaming: ureq::Agent,
}

impl Client {
    /// A client for `base` (`http://HOST:PORT`), sending `Authorization: Bearer TOKEN` when a
    /// token is given. `https://` needs the `tls` feature and [`Client::with_tls`].
    pub fn new(base: &str, token: Option<String>) -> Result<Client, Error> {
        Client::build(base, token, |config| config)
    }

    /// A client for an `https://` API, with `tls` saying which roots to trust and which client
    /// certificate to present.
    #[cfg(feature = "tls")]
    pub fn with_tls(base: &str, token: Option<String>, tls: ureq::tls::TlsConfig) -> Result<Client, Error> {
        Client::build(base, token, move |config| config.tls_config(tls.clone()))
    }

    fn build(
        base: &str,
        token: Option<String>,
        configure: impl Fn(
            ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
        ) -> ureq::config::ConfigBuilder<ureq::typestate::AgentScope>,
    ) -> Result<Client, Error> {
        let trimmed = base.trim_end_matches('/');
        let host = trimmed.strip_prefix("http://").or_else(|| trimmed.strip_prefix("https://"));
        if host.is_none_or(|host| host.is_empty() || host.contains('/')) {
            return Err(Error::BadUrl {
                url: base.to_string(),
                message: "give the API's base, like http://127.0.0.1:10810 (https:// for a server with TLS)".into(),
            });
        }
        let agent = |timeout: Option<Duration>| -> ureq::Agent {
            configure(
                ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(timeout)
                    .max_idle_age(MAX_IDLE),
            )
            .build()
            .into()
        };
        Ok(Client {
            base: trimmed.to_string(),
            token: token.filter(|token| !token.is_empty()),
            agent: agent(Some(CALL_TIMEOUT)),
            streaming: agent(None),
        })
    }

    /// The API's base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn send(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<ureq::http::Response<ureq::Body>, Error> {
        self.send_with(agent, method, path, body, &[])
    }

    fn send_with(
        &self,
        agent: &ureq::Agent,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<ureq::http::Response<ureq::Body>, Error> {
        let url = format!("{}{path}", self.base);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        if let Some(token) = &self.token {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        let request = builder
            .body(body.unwrap_or_default().to_vec())
            .map_err(|error| Error::BadUrl { url: url.clone(), message: error.to_string() })?;
        agent.run(request).map_err(|source| {
            let tls = source.to_string().to_ascii_lowercase().contains("tls")
                || source.to_string().to_ascii_lowercase().contains("certificate");
            let hint = if tls {
                " (with TLS on, give the CA that signed the server's certificate: --tls-certificates DIR with \
                 ca-cert.pem, plus client-cert.pem and client-key.pem if the server verifies clients)"
            } else {
                " (is `nbdfault serve` running with --control there? with --tls on, use https://)"
            };
            Error::Unreachable { url: self.base.clone(), source: Box::new(source), hint }
        })
    }

    /// Sends one request and returns the answer whatever its status: for tests of refusals.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Answer, Error> {
        self.call_with_headers(method, path, body, &[])
    }

    /// [`Client::call`] with more request headers (`Accept`, say).
    pub fn call_with_headers(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        headers: &[(&str, &str)],
    ) -> Result<Answer, Error> {
        let mut response = self.send_with(&self.agent, method, path, body, headers)?;
        let headers = response
            .headers()
            .iter()
            .map(|(name, value)| (name.as_str().to_ascii_lowercase(), String::from_utf8_lossy(value.as_bytes()).into()))
            .collect();
        let mut body = Vec::new();
        response.body_mut().as_reader().take(MAX_ANSWER).read_to_end(&mut body)?;
        Ok(Answer { status: response.status().as_u16(), headers, body })
    }

    /// Sends one request; an error status becomes [`Error::Refused`] with the server's message.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Answer, Error> {
        let answer = self.call(method, path, body)?;
        if (200..300).contains(&answer.status) {
            return Ok(answer);
        }
        Err(refusal(method, path, answer.status, &answer.body))
    }

    /// Sends a `GET` and copies the answer's body to `out` as it arrives.
    pub fn copy(&self, path: &str, out: &mut dyn Write) -> Result<u64, Error> {
        let mut response = self.send(&self.agent, "GET", path, None)?;
        let status = response.status().as_u16();
        let mut reader = response.body_mut().as_reader();
        if !(200..300).contains(&status) {
            let mut body = Vec::new();
            reader.take(MAX_ANSWER).read_to_end(&mut body)?;
            return Err(refusal("GET", path, status, &body));
        }
        Ok(std::io::copy(&mut reader, out)?)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<T, Error> {
        let answer = self.request(method, path, body)?;
        serde_json::from_slice(&answer.body)
            .map_err(|error| Error::Invalid { path: path.to_string(), message: error.to_string() })
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Result<Health, Error> {
        self.json("GET", "/v1/health", None)
    }

    /// `GET /v1/exports`.
    pub fn exports(&self) -> Result<Vec<ExportView>, Error> {
        self.json("GET", "/v1/exports", None)
    }

    /// `GET /v1/exports/{name}`.
    pub fn export(&self, name: &str) -> Result<ExportView, Error> {
        self.json("GET", &export_path(name), None)
    }

    /// `PUT /v1/exports/{name}/policy`: the export afterwards and the policy's warnings. A policy
    /// the server refuses is [`Error::Refused`] with `details` (`line`, `column`, `fix`).
    pub fn set_policy(&self, name: &str, yaml: &[u8]) -> Result<PolicyAnswer, Error> {
        self.json("PUT", &format!("{}/policy", export_path(name)), Some(yaml))
    }

    /// `GET /v1/exports/{name}/policy`: the installed policy's YAML.
    pub fn policy(&self, name: &str) -> Result<String, Error> {
        Ok(self.request("GET", &format!("{}/policy", export_path(name)), None)?.text())
    }

    /// `DELETE /v1/exports/{name}/policy`: every request passes through again.
    pub fn clear_policy(&self, name: &str) -> Result<ExportView, Error> {
        self.json("DELETE", &format!("{}/policy", export_path(name)), None)
    }

    /// `POST /v1/exports/{name}/triggers/{trigger}`.
    pub fn arm(&self, name: &str, trigger: &str) -> Result<serde_json::Value, Error> {
        self.json("POST", &format!("{}/triggers/{}", export_path(name), path_segment(trigger)), None)
    }

    /// `DELETE /v1/exports/{name}/triggers/{trigger}`.
    pub fn disarm(&self, name: &str, trigger: &str) -> Result<serde_json::Value, Error> {
        self.json("DELETE", &format!("{}/triggers/{}", export_path(name), path_segment(trigger)), None)
    }

    /// `GET /v1/exports/{name}/faults?since=SEQ`: the fault records with `seq > since`.
    pub fn faults(&self, name: &str, since: u64) -> Result<FaultPage, Error> {
        let path = format!("{}/faults?since={since}", export_path(name));
        let answer = self.request("GET", &path, None)?;
        let entries = nbdfault_policies::parse_fault_log(&answer.text())
            .map_err(|error| Error::Invalid { path: path.clone(), message: error.to_string() })?;
        let number = |header: &str| answer.header(header).and_then(|value| value.parse().ok());
        let last_seq = number("x-last-seq").or_else(|| entries.iter().map(LogEntry::seq).max());
        let (mut records, mut power) = (Vec::new(), Vec::new());
        for entry in entries {
            match entry {
                LogEntry::Request(record) => records.push(record),
                LogEntry::Power(record) => power.push(record),
            }
        }
        Ok(FaultPage { last_seq, dropped: number("x-dropped").unwrap_or(0), records, power })
    }

    /// The highest `seq` of the export's fault log so far (0 when it is empty).
    pub fn last_fault_seq(&self, name: &str) -> Result<u64, Error> {
        Ok(self.faults(name, 0)?.last_seq.unwrap_or(0))
    }

    /// `GET /v1/exports/{name}/faults?view=decisions`: the decision log, as text.
    pub fn decisions(&self, name: &str) -> Result<String, Error> {
        Ok(self.request("GET", &format!("{}/faults?view=decisions", export_path(name)), None)?.text())
    }

    /// `GET /v1/exports/{name}/data`: the bytes stored now, below the fault layer.
    pub fn read_data(&self, name: &str, offset: u64, length: u64) -> Result<Vec<u8>, Error> {
        let path = format!("{}/data?offset={offset}&length={length}", export_path(name));
        let data = self.request("GET", &path, None)?.body;
        if data.len() as u64 != length {
            return Err(Error::Invalid { path, message: format!("asked for {length} bytes, got {}", data.len()) });
        }
        Ok(data)
    }

    /// `PUT /v1/exports/{name}/data?offset=O`: writes below the fault layer.
    pub fn write_data(&self, name: &str, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.request("PUT", &format!("{}/data?offset={offset}", export_path(name)), Some(data)).map(drop)
    }

    /// `POST /v1/exports/{name}/reset`: back to the pristine contents.
    pub fn reset(&self, name: &str) -> Result<ExportView, Error> {
        self.json("POST", &format!("{}/reset", export_path(name)), None)
    }

    /// `POST /v1/exports/{name}/power-cut`: the power goes now; every connection of the export
    /// drops and every unflushed write is undone; `off` says how long it stays off.
    pub fn power_cut(&self, name: &str, off: &PowerOff) -> Result<PowerCutAnswer, Error> {
        let mut query = Vec::new();
        if off.off {
            query.push("off=true".to_string());
        }
        if let Some(trigger) = &off.until {
            query.push(format!("until={}", query_value(trigger)));
        }
        if let Some(timeout) = off.timeout {
            query.push(format!("timeout={}ns", timeout.as_nanos()));
        }
        let query = if query.is_empty() { String::new() } else { format!("?{}", query.join("&")) };
        self.json("POST", &format!("{}/power-cut{query}", export_path(name)), None)
    }

    /// `POST /v1/exports/{name}/power-on`: ends an "off" after a power cut.
    pub fn power_on(&self, name: &str) -> Result<PowerOnAnswer, Error> {
        self.json("POST", &format!("{}/power-on", export_path(name)), None)
    }

    /// `GET /metrics`: the Prometheus text exposition.
    pub fn metrics(&self) -> Result<String, Error> {
        Ok(self.request("GET", "/metrics", None)?.text())
    }

    /// `GET /v1/exports/{name}/events[?rate=N]`: the live event stream, read as it comes. `rate`
    /// is how many request events per second to send one by one (the rest are aggregated); `None`
    /// takes the server's default, `Some(0)` asks for every request.
    pub fn events(&self, name: &str, rate: Option<u32>) -> Result<Events, Error> {
        let mut path = format!("{}/events", export_path(name));
        if let Some(rate) = rate {
            path.push_str(&format!("?rate={rate}"));
        }
        let mut response = self.send(&self.streaming, "GET", &path, None)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let mut body = Vec::new();
            response.body_mut().as_reader().take(MAX_ANSWER).read_to_end(&mut body)?;
            return Err(refusal("GET", &path, status, &body));
        }
        Ok(Events::new(response.into_body().into_reader()))
    }
}

/// An error answer as [`Error::Refused`]: the `error` of its JSON body, else the body itself.
fn refusal(method: &str, path: &str, status: u16, body: &[u8]) -> Error {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let message = json
        .as_ref()
        .and_then(|value| value["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_string());
    let details = json.and_then(|mut value| value.get_mut("details").map(serde_json::Value::take));
    Error::Refused { method: method.to_string(), path: path.to_string(), status, message, details }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_path_segment_and_the_default_export_has_its_spelling() {
        assert_eq!(path_segment(""), "@default");
        assert_eq!(path_segment("disk-1.img"), "disk-1.img");
        assert_eq!(path_segment("a b/c%"), "a%20b%2Fc%25");
        assert_eq!(export_path(""), "/v1/exports/@default");
        assert_eq!(export_path("x?y"), "/v1/exports/x%3Fy");
        assert_eq!(query_value("dir/p q&r.yaml"), "dir/p%20q%26r.yaml");
    }

    #[test]
    fn a_base_that_is_not_a_url_is_refused_with_an_example() {
        for bad in ["127.0.0.1:10810", "http://", "ftp://x", "http://h:1/v1"] {
            let error = Client::new(bad, None).err().unwrap_or_else(|| panic!("{bad} accepted")).to_string();
            assert!(error.contains("http://127.0.0.1:10810"), "{error}");
        }
        assert_eq!(Client::new("http://10.0.2.2:10810/", None).unwrap().base(), "http://10.0.2.2:10810");
    }

    #[test]
    fn an_unreachable_server_is_reported_with_what_to_check() {
        // Port 9 on loopback (discard) is closed on test machines; nothing listens there.
        let client = Client::new("http://127.0.0.1:9", None).unwrap();
        let error = client.health().unwrap_err().to_string();
        assert!(error.contains("cannot reach the control API") && error.contains("--control"), "{error}");
    }
}
