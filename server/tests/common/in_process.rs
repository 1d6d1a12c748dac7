//! The server started from the library inside the test process, on a free port: no binary, no
//! outside tool, so what it covers runs wherever `cargo test` does.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use nbdfault::config::{Config, Overrides};

/// A library server on 127.0.0.1, port 0, without the control API; stopped (as by SIGTERM) when
/// dropped.
pub struct InProcessServer {
    pub nbd: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl InProcessServer {
    /// Serves the exports (`NAME=SPEC`) of `overrides`, with its policies and limits.
    pub fn start(mut overrides: Overrides) -> InProcessServer {
        overrides.listen = vec!["127.0.0.1:0".to_string()];
        overrides.no_control = true;
        let config = Config::load(&overrides).unwrap_or_else(|error| panic!("the configuration is refused: {error}"));
        let (ready, started) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
            let runtime = runtime.expect("a tokio runtime");
            runtime.block_on(async move {
                let server = match nbdfault::server::Server::start(&config).await {
                    Ok(server) => server,
                    Err(error) => {
                        let _ = ready.send(Err(error.to_string()));
                        return;
                    }
                };
                let _ = ready.send(Ok(server.local_addresses()[0]));
                server
                    .run(async {
                        let _ = stopped.await;
                    })
                    .await;
            });
        });
        let nbd = match started.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(address)) => address,
            Ok(Err(error)) => panic!("the in-process server did not start: {error}"),
            Err(error) => panic!("the in-process server did not start within 30 s: {error}"),
        };
        InProcessServer { nbd, stop: Some(stop), thread: Some(thread) }
    }

    /// One memory export per `(name, size)`, e.g. `("disk", "64MiB")`.
    pub fn memory(exports: &[(&str, &str)]) -> InProcessServer {
        let exports = exports.iter().map(|(name, size)| format!("{name}=memory:{size}")).collect();
        InProcessServer::start(Overrides { exports, ..Overrides::default() })
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // The shutdown grace period bounds this; a panic in the server fails the test.
            if thread.join().is_err() && !std::thread::panicking() {
                panic!("the in-process server panicked");
            }
        }
    }
}
