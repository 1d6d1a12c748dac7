//! A blocking client for the nbdfault control API (`docs/architecture.md`, "The control API").
//!
//! The suite uses it to put policies on the export, arm and disarm triggers, read the fault log and
//! read or seed the bytes the server stores below its fault layer.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use ureq::Agent;

/// Why a control API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control API at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("control API {method} {url} answered {status}: {body}")]
    Status { method: &'static str, url: String, status: u16, body: String },
    #[error("control API {url} sent a body that is not what the API documents: {message}")]
    Body { url: String, message: String },
    #[error("control URL `{0}` must look like http://HOST:PORT")]
    BadUrl(String),
}

/// One line of the fault log. Only the fields the suite reads; the rest are kept in `raw`.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultRecord {
    pub seq: u64,
    pub op: String,
    pub offset: u64,
    pub length: u64,
    pub rule: String,
    /// True when the server answered this request with an error.
    pub failed: bool,
    pub raw: Value,
}

impl FaultRecord {
    /// Reads one JSON line of `GET .../faults`. The outcome is taken as a failure when the record
    /// carries a non-zero `errno` or an outcome naming an error.
    pub fn parse(line: &str) -> Result<Self, String> {
        #[derive(Deserialize)]
        struct Wire {
            seq: u64,
            #[serde(default)]
            op: Option<String>,
            #[serde(default)]
            offset: Option<u64>,
            #[serde(default)]
            length: Option<u64>,
            #[serde(default)]
            rule: Option<String>,
            #[serde(default)]
            outcome: Option<Value>,
            #[serde(default)]
            errno: Option<Value>,
            #[serde(default)]
            reply: Option<String>,
        }
        let raw: Value = serde_json::from_str(line).map_err(|e| format!("not JSON ({e}): {line}"))?;
        let wire: Wire = serde_json::from_value(raw.clone()).map_err(|e| format!("{e}: {line}"))?;
        let errno_set = match &wire.errno {
            None | Some(Value::Null) => false,
            Some(Value::Number(n)) => n.as_u64() != Some(0),
            Some(Value::String(s)) => !s.is_empty() && s != "0",
            Some(_) => true,
        };
        let outcome_error = match &wire.outcome {
            Some(Value::String(s)) => s.contains("error") || s.contains("fail"),
            Some(Value::Object(o)) => o.contains_key("error"),
            _ => false,
        };
        Ok(FaultRecord {
            seq: wire.seq,
            op: wire.op.unwrap_or_default().to_ascii_lowercase(),
            offset: wire.offset.unwrap_or(0),
            length: wire.length.unwrap_or(0),
            rule: wire.rule.unwrap_or_default(),
            failed: errno_set || outcome_error || wire.reply.as_deref() == Some("error"),
            raw,
        })
    }

    /// True when the request overlapped `start..end`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.offset < end && start < self.offset.saturating_add(self.length)
    }
}

/// A client bound to one export.
pub struct Control {
    base: String,
    export: String,
    token: Option<String>,
    agent: Agent,
}

impl Control {
    /// `url` is the API's base (`http://10.0.2.2:10810`); `export` the export name (`""` for the
    /// default export).
    pub fn new(url: &str, export: &str, token: Option<String>) -> Result<Self, ControlError> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") || base.len() <= "http://".len() {
            return Err(ControlError::BadUrl(url.to_string()));
        }
        // The server closes a kept-alive connection after 10 s idle: never reuse one that old.
        let config = Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(60)))
            .http_status_as_error(false)
            .max_idle_age(Duration::from_secs(5))
            .build();
        Ok(Control { base, export: export.to_string(), token, agent: config.into() })
    }

    /// The API's base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    fn export_url(&self, rest: &str) -> String {
        format!("{}/v1/exports/{}{rest}", self.base, export_path_segment(&self.export))
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn finish(
        &self,
        method: &'static str,
        url: &str,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<Vec<u8>, ControlError> {
        let mut response = result.map_err(|e| ControlError::Transport { url: url.to_string(), source: Box::new(e) })?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_vec()
            .map_err(|e| ControlError::Transport { url: url.to_string(), source: Box::new(e) })?;
        if !(200..300).contains(&status) {
            let body = String::from_utf8_lossy(&body).trim().to_string();
            return Err(ControlError::Status { method, url: url.to_string(), status, body });
        }
        Ok(body)
    }

    fn get(&self, url: &str) -> Result<Vec<u8>, ControlError> {
        let mut request = self.agent.get(url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish("GET", url, request.call())
    }

    fn delete(&self, url: &str) -> Result<Vec<u8>, ControlError> {
        let mut request = self.agent.delete(url);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish("DELETE", url, request.call())
    }

    fn send(&self, method: &'static str, url: &str, body: &[u8], content_type: &str) -> Result<Vec<u8>, ControlError> {
        let mut request = match method {
            "PUT" => self.agent.put(url),
            _ => self.agent.post(url),
        };
        request = request.header("Content-Type", content_type);
        if let Some(auth) = self.auth() {
            request = request.header("Authorization", auth);
        }
        self.finish(method, url, request.send(body))
    }

    fn json(&self, url: &str) -> Result<Value, ControlError> {
        let body = self.get(url)?;
        serde_json::from_slice(&body).map_err(|e| ControlError::Body { url: url.to_string(), message: e.to_string() })
    }

    /// `GET /v1/health`.
    pub fn health(&self) -> Result<Value, ControlError> {
        self.json(&format!("{}/v1/health", self.base))
    }

    /// `GET /v1/exports/{name}`.
    pub fn export_info(&self) -> Result<Value, ControlError> {
        self.json(&self.export_url(""))
    }

    /// `PUT /v1/exports/{name}/policy`.
    pub fn put_policy(&self, yaml: &str) -> Result<(), ControlError> {
        self.send("PUT", &self.export_url("/policy"), yaml.as_bytes(), "application/yaml").map(drop)
    }

    /// `DELETE /v1/exports/{name}/policy`: every request passes through again.
    pub fn delete_policy(&self) -> Result<(), ControlError> {
        self.delete(&self.export_url("/policy")).map(drop)
    }

    /// `POST /v1/exports/{name}/triggers/{trigger}`.
    pub fn arm(&self, trigger: &str) -> Result<(), ControlError> {
        self.send("POST", &self.export_url(&format!("/triggers/{trigger}")), b"", "application/json").map(drop)
    }

    /// `DELETE /v1/exports/{name}/triggers/{trigger}`.
    pub fn disarm(&self, trigger: &str) -> Result<(), ControlError> {
        self.delete(&self.export_url(&format!("/triggers/{trigger}"))).map(drop)
    }

    /// `GET /v1/exports/{name}/faults?since=SEQ`: the records with `seq > since`.
    pub fn faults_since(&self, since: u64) -> Result<Vec<FaultRecord>, ControlError> {
        let url = self.export_url(&format!("/faults?since={since}"));
        let body = self.get(&url)?;
        let text = String::from_utf8_lossy(&body);
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| FaultRecord::parse(l).map_err(|message| ControlError::Body { url: url.clone(), message }))
            .collect()
    }

    /// The highest sequence number in the fault log so far (0 when empty).
    pub fn last_fault_seq(&self) -> Result<u64, ControlError> {
        Ok(self.faults_since(0)?.iter().map(|r| r.seq).max().unwrap_or(0))
    }

    /// `GET /v1/exports/{name}/data?offset=O&length=L`: the bytes stored now, below the fault layer.
    pub fn read_data(&self, offset: u64, length: u64) -> Result<Vec<u8>, ControlError> {
        let url = self.export_url(&format!("/data?offset={offset}&length={length}"));
        let body = self.get(&url)?;
        if body.len() as u64 != length {
            return Err(ControlError::Body { url, message: format!("asked for {length} bytes, got {}", body.len()) });
        }
        Ok(body)
    }

    /// `PUT /v1/exports/{name}/data?offset=O`: writes below the fault layer.
    pub fn write_data(&self, offset: u64, data: &[u8]) -> Result<(), ControlError> {
        self.send("PUT", &self.export_url(&format!("/data?offset={offset}")), data, "application/octet-stream")
            .map(drop)
    }

    /// `POST /v1/exports/{name}/reset`: back to the pristine contents.
    pub fn reset(&self) -> Result<(), ControlError> {
        self.send("POST", &self.export_url("/reset"), b"", "application/json").map(drop)
    }
}

/// The export's name as a URL path segment: `""` is `@default`, other bytes are percent-encoded
/// unless unreserved.
pub fn export_path_segment(name: &str) -> String {
    if name.is_empty() {
        return "@default".to_string();
    }
    let mut out = String::new();
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_export_is_written_at_default_and_others_are_escaped() {
        assert_eq!(export_path_segment(""), "@default");
        assert_eq!(export_path_segment("disk-1"), "disk-1");
        assert_eq!(export_path_segment("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn fault_record_with_errno_is_a_failure_and_one_without_is_not() {
        let failed = FaultRecord::parse(
            r#"{"seq":7,"op":"WRITE","offset":4096,"length":8192,"rule":"fail-data-0","outcome":"error","errno":"EIO","delay_ms":50}"#,
        )
        .unwrap();
        assert!(failed.failed);
        assert_eq!((failed.seq, failed.op.as_str(), failed.offset, failed.length), (7, "write", 4096, 8192));
        let delayed =
            FaultRecord::parse(r#"{"seq":8,"op":"read","offset":0,"length":4096,"outcome":"delay","errno":null}"#)
                .unwrap();
        assert!(!delayed.failed);
        let numeric = FaultRecord::parse(r#"{"seq":9,"errno":5}"#).unwrap();
        assert!(numeric.failed);
        let by_reply = FaultRecord::parse(r#"{"seq":10,"outcome":"bad_sector","reply":"error"}"#).unwrap();
        assert!(by_reply.failed);
        let passed = FaultRecord::parse(r#"{"seq":11,"outcome":"pass","reply":"ok"}"#).unwrap();
        assert!(!passed.failed);
    }

    #[test]
    fn fault_record_without_seq_is_rejected_with_the_line() {
        let err = FaultRecord::parse(r#"{"op":"write"}"#).unwrap_err();
        assert!(err.contains("seq"), "{err}");
    }

    #[test]
    fn overlap_is_half_open() {
        let r = FaultRecord::parse(r#"{"seq":1,"offset":4096,"length":4096,"errno":5}"#).unwrap();
        assert!(r.overlaps(0, 4097));
        assert!(!r.overlaps(0, 4096));
        assert!(!r.overlaps(8192, 9000));
    }

    /// Answers `responses.len()` HTTP requests on loopback with the given status lines and bodies,
    /// and hands back each request's head (request line and headers).
    fn responder(responses: Vec<(&'static str, &'static str)>) -> (String, std::thread::JoinHandle<Vec<String>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for (status, body) in responses {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream);
                let mut head = String::new();
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    head.push_str(&line);
                }
                let mut payload = vec![0u8; length];
                reader.read_exact(&mut payload).unwrap();
                heads.push(format!("{head}\n{}", String::from_utf8_lossy(&payload)));
                let mut stream = reader.into_inner();
                write!(
                    stream,
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
            }
            heads
        });
        (url, handle)
    }

    #[test]
    fn requests_carry_the_token_and_errors_carry_the_servers_message() {
        let (url, server) = responder(vec![
            ("200 OK", ""),
            ("400 Bad Request", "line 3, column 7: unknown field `when2`"),
            (
                "200 OK",
                "{\"seq\":4,\"op\":\"write\",\"offset\":0,\"length\":4096,\"errno\":\"EIO\"}\n{\"seq\":5,\"op\":\"read\",\"outcome\":\"delay\"}\n",
            ),
            ("200 OK", "abcd"),
        ]);
        let control = Control::new(&url, "", Some("s3cret".into())).unwrap();
        control.arm("go-1").unwrap();
        let err = control.put_policy("rules: []").unwrap_err().to_string();
        assert!(err.contains("400") && err.contains("unknown field `when2`"), "{err}");
        let faults = control.faults_since(3).unwrap();
        assert_eq!(faults.iter().map(|f| (f.seq, f.failed)).collect::<Vec<_>>(), vec![(4, true), (5, false)]);
        assert_eq!(control.read_data(0, 4).unwrap(), b"abcd");
        let heads = server.join().unwrap();
        assert!(heads[0].starts_with("POST /v1/exports/@default/triggers/go-1 HTTP/1.1"), "{}", heads[0]);
        assert!(heads[0].to_ascii_lowercase().contains("authorization: bearer s3cret"), "{}", heads[0]);
        assert!(
            heads[1].starts_with("PUT /v1/exports/@default/policy") && heads[1].ends_with("rules: []"),
            "{}",
            heads[1]
        );
        assert!(heads[2].starts_with("GET /v1/exports/@default/faults?since=3 "), "{}", heads[2]);
        assert!(heads[3].starts_with("GET /v1/exports/@default/data?offset=0&length=4 "), "{}", heads[3]);
    }

    #[test]
    fn a_short_data_answer_is_an_error() {
        let (url, server) = responder(vec![("200 OK", "ab")]);
        let control = Control::new(&url, "disk", None).unwrap();
        let err = control.read_data(0, 4).unwrap_err().to_string();
        assert!(err.contains("asked for 4 bytes, got 2"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn control_url_must_be_plain_http() {
        assert!(matches!(Control::new("https://x:1", "", None), Err(ControlError::BadUrl(_))));
        assert!(Control::new("http://10.0.2.2:10810/", "disk", None).unwrap().url() == "http://10.0.2.2:10810");
    }
}
