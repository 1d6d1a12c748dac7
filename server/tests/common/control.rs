//! The control API from the tests' side: a small HTTP client that shows every status, header and
//! body (so tests can check refusals too), and `python/fault_probe.py`, the libnbd client the
//! fault tests drive.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use nbdfault_control_client::Client;
use serde_json::Value;

use super::{PYTHON, Server, python_script, run_ok};

/// How long a test polls for something the server does promptly (a fault record, a file line).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls `check` until it returns something, for at most [`POLL_TIMEOUT`].
#[track_caller]
pub fn poll<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + POLL_TIMEOUT;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what}: not within {POLL_TIMEOUT:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Lower-case header names.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.text()))
    }

    /// Fails the test, showing the answer, unless the status is `status`.
    #[track_caller]
    pub fn expect(self, status: u16) -> Answer {
        assert_eq!(self.status, status, "HTTP {}: {}", self.status, self.text());
        self
    }
}

/// A client for one server's control API: the shared client (`nbdfault-control-client`), with
/// answers of any status handed back whole.
pub struct Api {
    client: Client,
}

impl Api {
    pub fn new(server: &Server) -> Api {
        let address = server.control.expect("the server was started with_control()");
        Api::at(&format!("http://{address}"))
    }

    pub fn at(base: &str) -> Api {
        Api { client: Client::new(base, None).unwrap_or_else(|error| panic!("{error}")) }
    }

    pub fn base(&self) -> &str {
        self.client.base()
    }

    /// The shared client itself, for its typed calls.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The same client, sending `Authorization: Bearer TOKEN`.
    pub fn with_token(self, token: &str) -> Api {
        Api {
            client: Client::new(self.client.base(), Some(token.to_string())).unwrap_or_else(|error| panic!("{error}")),
        }
    }

    /// Sends one request and returns whatever came back.
    pub fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Answer {
        let answer = self
            .client
            .call(method, path, body)
            .unwrap_or_else(|error| panic!("{method} {}{path}: no answer from the server: {error}", self.base()));
        Answer { status: answer.status, headers: answer.headers.into_iter().collect(), body: answer.body }
    }

    pub fn get(&self, path: &str) -> Answer {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &[u8]) -> Answer {
        self.call("PUT", path, Some(body))
    }

    pub fn post(&self, path: &str) -> Answer {
        self.call("POST", path, None)
    }

    pub fn delete(&self, path: &str) -> Answer {
        self.call("DELETE", path, None)
    }

    /// `GET /v1/exports/{export}`, which must succeed.
    pub fn export(&self, export: &str) -> Value {
        self.get(&export_path(export)).expect(200).json()
    }

    /// Installs a policy, which must be accepted; returns the answer (the export and warnings).
    #[track_caller]
    pub fn set_policy(&self, export: &str, yaml: &str) -> Value {
        self.put(&format!("{}/policy", export_path(export)), yaml.as_bytes()).expect(200).json()
    }

    #[track_caller]
    pub fn clear_policy(&self, export: &str) {
        self.delete(&format!("{}/policy", export_path(export))).expect(200);
    }

    #[track_caller]
    pub fn arm(&self, export: &str, trigger: &str) {
        self.post(&format!("{}/triggers/{trigger}", export_path(export))).expect(200);
    }

    #[track_caller]
    pub fn disarm(&self, export: &str, trigger: &str) {
        self.delete(&format!("{}/triggers/{trigger}", export_path(export))).expect(200);
    }

    /// The fault records of `export` with `seq > since`.
    #[track_caller]
    pub fn faults(&self, export: &str, since: u64) -> Vec<Value> {
        let answer = self.get(&format!("{}/faults?since={since}", export_path(export))).expect(200);
        json_lines(&answer.text())
    }

    /// The decision log of `export`, as text.
    #[track_caller]
    pub fn decisions(&self, export: &str) -> String {
        self.get(&format!("{}/faults?view=decisions", export_path(export))).expect(200).text()
    }

    /// Polls until `export` has at least `count` fault records; returns them all.
    #[track_caller]
    pub fn wait_for_faults(&self, export: &str, count: usize) -> Vec<Value> {
        let deadline = Instant::now() + POLL_TIMEOUT;
        loop {
            let records = self.faults(export, 0);
            if records.len() >= count {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "export {export:?} has {} fault records after {POLL_TIMEOUT:?}, expected {count}: {records:#?}",
                records.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The bytes as stored, below the fault layer.
    #[track_caller]
    pub fn data(&self, export: &str, offset: u64, length: u64) -> Vec<u8> {
        let answer = self.get(&format!("{}/data?offset={offset}&length={length}", export_path(export))).expect(200);
        assert_eq!(answer.body.len() as u64, length, "the data endpoint returned another length");
        answer.body
    }

    #[track_caller]
    pub fn write_data(&self, export: &str, offset: u64, data: &[u8]) {
        self.put(&format!("{}/data?offset={offset}", export_path(export)), data).expect(200);
    }

    #[track_caller]
    pub fn reset(&self, export: &str) {
        self.post(&format!("{}/reset", export_path(export))).expect(200);
    }
}

/// `/v1/exports/NAME`, percent-encoded, with `@default` for the export named "".
pub fn export_path(export: &str) -> String {
    nbdfault_control_client::export_path(export)
}

/// One JSON value per non-empty line.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap_or_else(|error| panic!("not a JSON line ({error}): {line}")))
        .collect()
}

/// `/usr/bin/python3 server/tests/python/fault_probe.py SCENARIO`. The test says
/// `require!(PYTHON_NBD)` first.
#[track_caller]
pub fn fault_probe(scenario: &str) -> Command {
    drop(super::probe("ops"));
    let mut command = Command::new(PYTHON);
    command.arg(python_script("fault_probe.py")).arg(scenario);
    command
}

/// The result of one operation of `fault_probe.py ops`.
#[derive(Debug, Clone)]
pub struct OpResult {
    pub op: String,
    /// `None` for success, else the errno's name (`EIO`, `ENOSPC`...).
    pub errno: Option<String>,
    /// What a read returned.
    pub data: Vec<u8>,
}

impl OpResult {
    pub fn ok(&self) -> bool {
        self.errno.is_none()
    }

    #[track_caller]
    pub fn expect_ok(&self) -> &OpResult {
        assert!(self.ok(), "`{}` failed with {:?}", self.op, self.errno);
        self
    }

    #[track_caller]
    pub fn expect_errno(&self, errno: &str) -> &OpResult {
        assert_eq!(self.errno.as_deref(), Some(errno), "`{}`: expected {errno}", self.op);
        self
    }
}

/// Runs operations in order on one libnbd connection (`reconnect` opens a new one) and returns
/// what each did. Operations: `write OFFSET LENGTH BYTE [fua]`, `read OFFSET LENGTH`, `flush`,
/// `zero OFFSET LENGTH [fua]`, `trim OFFSET LENGTH`, `cache OFFSET LENGTH`, `status OFFSET LENGTH`
/// (block status), `reconnect`.
#[track_caller]
pub fn ops<S: AsRef<str>>(uri: &str, ops: &[S]) -> Vec<OpResult> {
    let mut command = fault_probe("ops");
    command.arg(uri);
    for op in ops {
        command.arg(op.as_ref());
    }
    let output = run_ok(&mut command);
    let results: Vec<OpResult> = json_lines(&output)
        .into_iter()
        .map(|line| OpResult {
            op: line["op"].as_str().expect("op").to_string(),
            errno: line["errno"].as_str().map(str::to_string),
            data: line["data"].as_str().map(decode_hex).unwrap_or_default(),
        })
        .collect();
    assert_eq!(results.len(), ops.len(), "fault_probe.py ops reported {} results for {} ops", results.len(), ops.len());
    results
}

fn decode_hex(hex: &str) -> Vec<u8> {
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect()
}

/// `fault_probe.py connections`: a script over several libnbd connections that stops at each
/// `pause` until the test says go on.
pub struct Connections {
    child: Child,
    stdin: ChildStdin,
    lines: BufReader<ChildStdout>,
}

impl Connections {
    pub fn start(uri: &str, count: usize, operations: &[&str]) -> Connections {
        let mut command = fault_probe("connections");
        command.arg(uri).arg(count.to_string()).args(operations);
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
        let mut child = command.spawn().expect("fault_probe.py starts");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap());
        Connections { child, stdin, lines }
    }

    /// The results up to the next `pause` (or the end).
    pub fn until_pause(&mut self) -> Vec<Value> {
        let mut results = Vec::new();
        loop {
            let mut line = String::new();
            let read = self.lines.read_line(&mut line).expect("reading fault_probe.py's output");
            if read == 0 {
                return results;
            }
            let result: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
            if result["op"] == "pause" {
                return results;
            }
            results.push(result);
        }
    }

    /// Lets the script go on after a pause.
    pub fn go_on(&mut self) {
        self.stdin.write_all(b"go\n").and_then(|()| self.stdin.flush()).expect("fault_probe.py reads its stdin");
    }

    pub fn finish(mut self) -> Vec<Value> {
        let results = self.until_pause();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "fault_probe.py connections failed: {status}");
        results
    }
}
