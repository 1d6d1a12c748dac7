//! The nbdfault server process on the host: started with a memory export and a control API on
//! free loopback ports, read from its ready line, stopped with SIGTERM.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Why the server did not come up.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot start {path}: {source}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the server exited before it was ready ({status}); its log: {log}")]
    Exited { status: String, log: String },
    #[error("the server printed no ready line within {0:?}; its log: {1}")]
    Timeout(Duration, String),
    #[error("the ready line is not what docs/architecture.md describes: {0}")]
    BadReady(String),
}

/// The server's ready line: `{"event":"ready","nbd":["127.0.0.1:10809"],"control":"127.0.0.1:10810"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub nbd: SocketAddr,
    pub control: SocketAddr,
}

/// Parses a ready line; `None` for other lines.
pub fn parse_ready(line: &str) -> Option<Result<Ready, ServerError>> {
    #[derive(Deserialize)]
    struct Wire {
        event: String,
        #[serde(default)]
        nbd: Vec<String>,
        #[serde(default)]
        control: Option<String>,
    }
    let wire: Wire = serde_json::from_str(line.trim()).ok()?;
    if wire.event != "ready" {
        return None;
    }
    let bad = || ServerError::BadReady(line.trim().to_string());
    let nbd = wire.nbd.first().and_then(|a| a.parse().ok());
    let control = wire.control.as_deref().and_then(|a| a.parse().ok());
    Some(match (nbd, control) {
        (Some(nbd), Some(control)) => Ok(Ready { nbd, control }),
        _ => Err(bad()),
    })
}

/// A running server; killed on drop if not stopped.
pub struct Server {
    child: Option<Child>,
    pub ready: Ready,
    pub log: PathBuf,
}

impl Server {
    /// Starts `binary serve` with `exports` (name and spec, such as `memory:1GiB` or
    /// `overlay:/path/base.img`), listening and serving the control API on free loopback ports.
    /// Its stderr goes to `log`.
    pub fn start(binary: &Path, exports: &[(String, String)], log: &Path) -> Result<Server, ServerError> {
        Server::start_with(binary, exports, &[], log)
    }

    /// [`Server::start`] with more `serve` arguments (such as TLS settings).
    pub fn start_with(
        binary: &Path,
        exports: &[(String, String)],
        extra: &[&str],
        log: &Path,
    ) -> Result<Server, ServerError> {
        let stderr =
            std::fs::File::create(log).map_err(|source| ServerError::Spawn { path: log.to_path_buf(), source })?;
        let mut command = Command::new(binary);
        command.args(["serve", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0"]);
        for (name, spec) in exports {
            command.arg("--export").arg(format!("{name}={spec}"));
        }
        command.args(extra);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .map_err(|source| ServerError::Spawn { path: binary.to_path_buf(), source })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(ready) = parse_ready(&line) {
                    let _ = tx.send(ready);
                    // Keep draining so the server never blocks on a full pipe.
                }
            }
        });
        let read_log = || {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .chars()
                .rev()
                .take(2000)
                .collect::<String>()
                .chars()
                .rev()
                .collect::<String>()
        };
        let limit = Duration::from_secs(30);
        let start = Instant::now();
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(ready)) => return Ok(Server { child: Some(child), ready, log: log.to_path_buf() }),
                Ok(Err(e)) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(e);
                }
                Err(_) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(ServerError::Exited { status: status.to_string(), log: read_log() });
                    }
                    if start.elapsed() > limit {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(ServerError::Timeout(limit, read_log()));
                    }
                }
            }
        }
    }

    /// SIGTERM, then SIGKILL after 10 s. Returns how it exited.
    pub fn stop(mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: signals our own child by its pid; it has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        child.wait().ok()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_gives_the_nbd_and_control_addresses() {
        let r =
            parse_ready(r#"{"event":"ready","nbd":["127.0.0.1:10809"],"control":"127.0.0.1:10810"}"#).unwrap().unwrap();
        assert_eq!(r.nbd, "127.0.0.1:10809".parse().unwrap());
        assert_eq!(r.control, "127.0.0.1:10810".parse().unwrap());
    }

    #[test]
    fn other_lines_are_not_ready_lines_and_a_ready_line_without_control_is_an_error() {
        assert!(parse_ready("starting").is_none());
        assert!(parse_ready(r#"{"event":"listening"}"#).is_none());
        assert!(matches!(
            parse_ready(r#"{"event":"ready","nbd":["127.0.0.1:1"]}"#),
            Some(Err(ServerError::BadReady(_)))
        ));
    }

    #[test]
    fn a_server_that_exits_at_once_is_reported_with_its_log() {
        let log = std::env::temp_dir().join(format!("nbdfault-server-log-{}", std::process::id()));
        let exports = [("x".to_string(), "memory:1GiB".to_string())];
        let err = Server::start(Path::new("/bin/false"), &exports, &log).err().expect("false never gets ready");
        assert!(matches!(err, ServerError::Exited { .. }), "{err}");
        let _ = std::fs::remove_file(log);
    }
}
