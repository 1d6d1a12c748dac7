//! What every integration test needs: the real `nbdfault` binary started on free ports, the real
//! clients from Debian's packages, run with a time limit, and a raw NBD client for what no real
//! client sends.
//!
//! A test that runs a tool from a Debian package starts with `require!(TOOL, ...)` (from the
//! nbdfault-testing crate, re-exported here): without the tool it is skipped with one line
//! naming the package, or fails under `NBDFAULT_REQUIRE_TOOLS=1`, as in scripts/test.sh and CI.

#![allow(dead_code)] // Each test binary uses its own part of this module.

pub mod control;
pub mod in_process;
pub mod pki;
pub mod raw;

pub use nbdfault_testing::*;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for this test run.
pub const NBDFAULT: &str = env!("CARGO_BIN_EXE_nbdfault");

/// How long the server may take to print its ready line. Generous: tests share two cores.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one client command may run before the test fails instead of hanging.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// A running `nbdfault serve`, stopped with SIGTERM (then SIGKILL) when dropped.
pub struct Server {
    child: Child,
    pub nbd: SocketAddr,
    pub control: Option<SocketAddr>,
    /// The whole ready line.
    pub ready: serde_json::Value,
    stderr: Arc<Mutex<String>>,
    stopped: bool,
}

/// The arguments of `nbdfault serve` beyond the free ports, and how to start it.
#[derive(Default)]
pub struct ServerBuilder {
    args: Vec<OsString>,
    control: bool,
    /// Runs the server under this command (e.g. `unshare -n ...`), which must `exec` it.
    wrapper: Vec<OsString>,
    /// Leave `--listen` and `--control` out: the test checks the defaults.
    default_addresses: bool,
    /// Environment variables set for the server, after the harness cleared the usual ones.
    env: Vec<(OsString, OsString)>,
}

impl ServerBuilder {
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(|arg| arg.as_ref().to_owned()));
        self
    }

    /// `--export NAME=SPEC`.
    pub fn export(self, name: &str, spec: impl AsRef<OsStr>) -> Self {
        let mut value = OsString::from(format!("{name}="));
        value.push(spec.as_ref());
        self.arg("--export").arg(value)
    }

    /// Starts the control API on a free port too (by default it is off).
    pub fn with_control(mut self) -> Self {
        self.control = true;
        self
    }

    pub fn wrapped_in<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, wrapper: I) -> Self {
        self.wrapper = wrapper.into_iter().map(|arg| arg.as_ref().to_owned()).collect();
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env.push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    pub fn default_addresses(mut self) -> Self {
        self.default_addresses = true;
        self
    }

    /// The full command line, for tests that expect the server to refuse it.
    pub fn command(&self) -> Command {
        let mut command = match self.wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(NBDFAULT);
                command
            }
            None => Command::new(NBDFAULT),
        };
        command.arg("serve");
        if !self.default_addresses {
            command.args(["--listen", "127.0.0.1:0"]);
            if self.control {
                command.args(["--control", "127.0.0.1:0"]);
            } else {
                command.arg("--no-control");
            }
        }
        command.args(&self.args);
        // Logs at info level, whatever the environment says: they are shown when a test fails.
        command.env_remove("RUST_LOG").env_remove("NBDFAULT_CONFIG").env_remove("NBDFAULT_LISTEN");
        command.env_remove("NBDFAULT_CONTROL");
        command.envs(self.env.iter().map(|(key, value)| (key, value)));
        command
    }

    /// Starts the server and waits for its ready line.
    pub fn start(self) -> Server {
        let mut command = self.command();
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap_or_else(|error| panic!("cannot start {NBDFAULT}: {error}"));
        let stderr = collect(child.stderr.take().expect("stderr is piped"));
        let (lines_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout is piped");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let ready = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) => {
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
                        panic!("the server printed a line on stdout that is not JSON: {line:?}");
                    };
                    if value["event"] == "ready" {
                        break value;
                    }
                }
                Err(error) => {
                    let _ = child.kill();
                    let status = child.wait().ok();
                    std::thread::sleep(Duration::from_millis(50));
                    panic!(
                        "the server printed no ready line ({error}); exit status {status:?}; stderr:\n{}",
                        stderr.lock().unwrap()
                    );
                }
            }
        };
        let nbd = ready["nbd"][0].as_str().and_then(|a| a.parse().ok());
        let nbd = nbd.unwrap_or_else(|| panic!("the ready line has no NBD address: {ready}"));
        let control = ready["control"].as_str().map(|a| a.parse().expect("control address"));
        assert!(ready.get("control").is_some(), "the ready line must say where the control API is, or null: {ready}");
        Server { child, nbd, control, ready, stderr, stopped: false }
    }
}

/// Reads a pipe to the end in the background.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    std::thread::spawn(move || {
        let mut buffer = [0u8; 8192];
        loop {
            match pipe.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n])),
            }
        }
    });
    text
}

impl Server {
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// A server with one memory export of `size` named `name`.
    pub fn memory(name: &str, size: &str) -> Server {
        Server::builder().export(name, format!("memory:{size}")).start()
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    pub fn port(&self) -> u16 {
        self.nbd.port()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Everything the server logged so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The CPU time the server process has used so far (user and system, every thread): work
    /// done, which a loaded machine does not inflate the way it does time on the clock.
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).expect("/proc/PID/stat");
        // The fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("(comm)") + 2..].split(' ').collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
        // SAFETY: sysconf only reads its argument.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_nanos(ticks * 1_000_000_000 / per_second)
    }

    /// The most memory the server process has held (VmHWM), in bytes.
    pub fn peak_memory(&self) -> u64 {
        self.memory_status("VmHWM:")
    }

    /// The memory the server process holds now (VmRSS), in bytes.
    pub fn resident_memory(&self) -> u64 {
        self.memory_status("VmRSS:")
    }

    fn memory_status(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("/proc/PID/status");
        let line = status.lines().find(|line| line.starts_with(field)).expect("the field is in /proc/PID/status");
        let kib: u64 = line[field.len()..].trim().trim_end_matches("kB").trim().parse().expect("a number of kB");
        kib * 1024
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends `signal` and waits (at most 10 s) for the process to exit; returns its status and
    /// how long it took.
    pub fn stop_with(&mut self, signal: i32) -> (ExitStatus, Duration) {
        let started = Instant::now();
        send_signal(self.pid(), signal);
        let deadline = started + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                self.stopped = true;
                // Let the stderr reader catch the last lines.
                std::thread::sleep(Duration::from_millis(20));
                return (status, started.elapsed());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                self.stopped = true;
                panic!("the server did not exit within 10 s of signal {signal}; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("waiting for the server") {
                self.stopped = true;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if !self.stopped {
            send_signal(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- nbdfault stderr ----\n{}---- end of nbdfault stderr ----", self.stderr());
        }
    }
}

pub fn send_signal(pid: i32, signal: i32) {
    // SAFETY: kill(2) takes integers only; `pid` is a child of this process that has not been
    // reaped yet, so the pid cannot have been reused.
    let result = unsafe { libc::kill(pid, signal) };
    assert_eq!(result, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
}

/// `/usr/bin/python3 server/tests/python/nbd_probe.py SCENARIO ARGS...`. The test says
/// `require!(PYTHON_NBD)` first.
#[track_caller]
pub fn probe(scenario: &str) -> Command {
    assert!(PYTHON_NBD.is_available(), "{PYTHON} cannot import nbd: the test must start with require!(PYTHON_NBD)");
    let mut command = Command::new(PYTHON);
    command.arg(python_script("nbd_probe.py")).arg(scenario);
    command
}

pub fn python_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python").join(name)
}

/// Runs a command to completion within [`COMMAND_TIMEOUT`], capturing its output.
pub fn run(command: &mut Command) -> Output {
    run_within(command, COMMAND_TIMEOUT)
}

pub fn run_within(command: &mut Command, timeout: Duration) -> Output {
    run_counting_cpu(command, timeout).0
}

/// Runs a command as [`run_within`] does; also returns the CPU time it used (user and system,
/// of the command itself and its waited-for children). A bound on work done, unlike the time on
/// the clock, holds on a loaded machine.
#[expect(
    clippy::zombie_processes,
    reason = "the child is reaped by wait4 in wait_counting_cpu, which clippy cannot see"
)]
pub fn run_counting_cpu(command: &mut Command, timeout: Duration) -> (Output, Duration) {
    let shown = show(command);
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().unwrap_or_else(|error| panic!("cannot run {shown}: {error}"));
    let stdout = collect(child.stdout.take().expect("piped"));
    let stderr = collect(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let (status, cpu) = loop {
        if let Some(reaped) = wait_counting_cpu(child.id() as libc::pid_t) {
            break reaped;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{shown} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.lock().unwrap(),
                stderr.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    // The readers end at EOF, which follows the exit unless a grandchild holds the pipes.
    let settle = Instant::now() + Duration::from_secs(5);
    while (Arc::strong_count(&stdout) > 1 || Arc::strong_count(&stderr) > 1) && Instant::now() < settle {
        std::thread::sleep(Duration::from_millis(1));
    }
    let take = |text: &Arc<Mutex<String>>| text.lock().unwrap().clone().into_bytes();
    (Output { status, stdout: take(&stdout), stderr: take(&stderr) }, cpu)
}

/// Reaps `pid` if it has exited: its status and the CPU time it used.
fn wait_counting_cpu(pid: libc::pid_t) -> Option<(ExitStatus, Duration)> {
    use std::os::unix::process::ExitStatusExt;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals, written by the kernel for the call's duration.
    match unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut usage) } {
        0 => None,
        reaped if reaped == pid => {
            let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
            Some((ExitStatus::from_raw(status), time(usage.ru_utime) + time(usage.ru_stime)))
        }
        _ => {
            let error = std::io::Error::last_os_error();
            assert_eq!(error.kind(), std::io::ErrorKind::Interrupted, "waiting for a command: {error}");
            None
        }
    }
}

/// `qemu-io -f raw OPTIONS -c COMMAND... URI`, run to its end: one `-c` per command.
pub fn qemu_io(uri: &str, options: &[&str], commands: &[&str]) -> Output {
    let mut command = QEMU_IO.command();
    command.args(["-f", "raw"]).args(options);
    for c in commands {
        command.args(["-c", c]);
    }
    run(command.arg(uri))
}

/// Runs a command and fails the test, showing its output, unless it succeeds. Returns stdout.
pub fn run_ok(command: &mut Command) -> String {
    let shown = show(command);
    let output = run(command);
    assert!(
        output.status.success(),
        "{shown} failed with {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs one scenario of `nbd_probe.py` and fails the test with its output unless it passes.
pub fn run_probe(scenario: &str, args: &[&str]) -> String {
    run_ok(probe(scenario).args(args))
}

pub fn show(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// `length` random bytes.
pub fn random_bytes(length: usize) -> Vec<u8> {
    let mut data = vec![0u8; length];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut data)).expect("/dev/urandom");
    data
}

/// A file of `length` random bytes with an all-zero stretch in it (a hole when `sparse`), so
/// copies exercise both data and zeroes.
pub fn random_image(path: &Path, length: usize, sparse: bool) -> Vec<u8> {
    let mut data = random_bytes(length);
    let (hole_start, hole_end) = (length / 4, length / 2);
    data[hole_start..hole_end].fill(0);
    if sparse {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::create(path).expect("create image");
        file.set_len(length as u64).expect("size image");
        file.write_all_at(&data[..hole_start], 0).expect("write image");
        file.write_all_at(&data[hole_end..], hole_end as u64).expect("write image");
    } else {
        std::fs::write(path, &data).expect("write image");
    }
    data
}

/// A zero-filled (sparse) file of `length` bytes.
pub fn empty_image(path: &Path, length: u64) {
    std::fs::File::create(path).and_then(|f| f.set_len(length)).expect("create image");
}

/// Where two byte strings first differ, for assertion messages that do not print megabytes.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    // Slice equality is a memcmp even in debug builds; the byte loop only runs on a mismatch.
    if a == b {
        return None;
    }
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[track_caller]
pub fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    if let Some(at) = first_difference(actual, expected) {
        panic!(
            "{what}: the bytes differ from offset {at} (lengths {} and {}): {:02x?} vs {:02x?}",
            actual.len(),
            expected.len(),
            &actual[at..actual.len().min(at + 16)],
            &expected[at..expected.len().min(at + 16)]
        );
    }
}

/// Parses a tool's JSON output, failing with the text when it is not JSON.
pub fn json(text: &str) -> serde_json::Value {
    // Some tools (fio's nbd engine) print a line before the JSON document.
    let start = text.find(['{', '[']).unwrap_or(0);
    serde_json::from_str(&text[start..]).unwrap_or_else(|error| panic!("not JSON ({error}):\n{text}"))
}
