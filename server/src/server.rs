//! The server: opens the exports, listens, accepts connections within the limits, and shuts down
//! gracefully on SIGINT or SIGTERM.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use nbdfault_policies::{Engine, Policy};

use crate::config::{Config, ExportConfig, Limits, StorageSpec};
use crate::control::{self, ControlState};
use crate::export::{Counters, Export, ExportParts, Exports};
use crate::fault::Clock;
use crate::fault::log::{self as fault_log, FaultLog};
use crate::handshake::{self, Outcome};
use crate::shutdown::{Shutdown, ShutdownController};
use crate::storage::{BlockDevice, FileDevice, IoContext, MemoryDevice, OverlayDevice, file::OpenError};
use crate::tls::{Tls, TlsError, TlsMode};
use crate::transmission::{self, ConnectionLimits};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("export {export:?}: {source}")]
    Storage { export: String, source: OpenError },
    #[error("cannot listen on {address}: {source}{hint}")]
    Listen { address: SocketAddr, source: std::io::Error, hint: &'static str },
    #[error("cannot start the control API on {address}: {source}{hint}")]
    Control { address: SocketAddr, source: std::io::Error, hint: &'static str },
    #[error("export {export:?}: cannot read policy {path}: {source}")]
    PolicyRead { export: String, path: String, source: std::io::Error },
    #[error("export {export:?}: the policy is not valid (check it with `nbdfault policy check FILE`):\n{message}")]
    Policy { export: String, message: String },
    #[error("cannot open the fault log {path}: {source}")]
    FaultLog { path: String, source: std::io::Error },
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// What to do about a socket that cannot be bound; `flag` is the option that sets its address.
fn listen_hint(error: &std::io::Error, flag: Flag) -> &'static str {
    match (error.kind(), flag) {
        (std::io::ErrorKind::AddrInUse, Flag::Listen) => {
            " (another process uses that port: stop it, or choose another port with --listen)"
        }
        (std::io::ErrorKind::AddrInUse, Flag::Control) => {
            " (another process uses that port: stop it, choose another port with --control, or turn the control API off with --no-control)"
        }
        (std::io::ErrorKind::AddrNotAvailable, _) => {
            " (no interface has that address: use 127.0.0.1 or an address of this machine)"
        }
        (std::io::ErrorKind::PermissionDenied, _) => " (ports below 1024 need privileges: choose a port above 1024)",
        _ => "",
    }
}

/// Which flag sets the address a bind error is about.
#[derive(Clone, Copy)]
enum Flag {
    Listen,
    Control,
}

/// Opens the storage of one export.
fn open_storage(export: &ExportConfig) -> Result<Arc<dyn BlockDevice>, StartError> {
    let wrap = |source| StartError::Storage { export: export.name.clone(), source };
    Ok(match &export.storage {
        StorageSpec::Memory { size } => Arc::new(MemoryDevice::new(*size)),
        StorageSpec::File { path } => Arc::new(FileDevice::open(path, export.read_only).map_err(wrap)?),
        StorageSpec::Overlay { base } => {
            let base = FileDevice::open(base, true).map_err(wrap)?;
            Arc::new(OverlayDevice::new(Arc::new(base)))
        }
    })
}

/// Reads and checks an export's policy file.
fn load_policy(export: &ExportConfig) -> Result<Option<Policy>, StartError> {
    let Some(path) = &export.policy else { return Ok(None) };
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| StartError::PolicyRead {
        export: export.name.clone(),
        path: shown.clone(),
        source,
    })?;
    Policy::from_yaml(&text, &shown)
        .map(Some)
        .map_err(|error| StartError::Policy { export: export.name.clone(), message: error.to_string() })
}

fn storage_spec_text(spec: &StorageSpec) -> String {
    match spec {
        StorageSpec::Memory { size } => format!("memory:{}", nbdfault_policies::units::format_size(*size)),
        StorageSpec::File { path } => format!("file:{}", path.display()),
        StorageSpec::Overlay { base } => format!("overlay:{}", base.display()),
    }
}

/// Builds every export with its fault layer and policy, so that a bad path or policy fails
/// before anything listens.
fn build_exports(config: &Config, log: &Arc<FaultLog>, clock: Clock) -> Result<Exports, StartError> {
    let mut exports = Vec::new();
    for export in &config.exports {
        let storage = open_storage(export)?;
        let policy = load_policy(export)?;
        exports.push(Export::new(ExportParts {
            name: export.name.clone(),
            description: export.description.clone(),
            storage_spec: storage_spec_text(&export.storage),
            storage,
            read_only: export.read_only,
            engine: Arc::new(Engine::new(policy)),
            log: Arc::clone(log),
            clock,
        }));
    }
    Ok(Exports::new(exports))
}

/// Opens the fault log: in memory, and appended to the file when one is configured.
fn open_fault_log(config: &Config) -> Result<Arc<FaultLog>, StartError> {
    let log = match &config.fault_log {
        Some(path) => FaultLog::with_file(path, fault_log::DEFAULT_CAPACITY)
            .map_err(|source| StartError::FaultLog { path: path.display().to_string(), source })?,
        None => FaultLog::in_memory(fault_log::DEFAULT_CAPACITY),
    };
    Ok(Arc::new(log))
}

/// A server whose exports are open and whose sockets are bound, ready to run.
pub struct Server {
    /// The memory budget shared by every connection and the control API.
    memory: Arc<Semaphore>,
    exports: Arc<Exports>,
    listeners: Vec<TcpListener>,
    control: Option<(TcpListener, ControlState)>,
    log: Arc<FaultLog>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    controller: ShutdownController,
}

impl Server {
    /// Opens everything the configuration names and binds every socket. Any failure here is
    /// reported before the server says it is ready.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let clock = Clock::start();
        let tls = config.tls.as_ref().map(Tls::load).transpose()?.map(Arc::new);
        let log = open_fault_log(config)?;
        let exports = Arc::new(build_exports(config, &log, clock)?);
        let mut listeners = Vec::new();
        for &address in &config.listen {
            let listener = TcpListener::bind(address).await.map_err(|source| StartError::Listen {
                address,
                hint: listen_hint(&source, Flag::Listen),
                source,
            })?;
            listeners.push(listener);
        }
        // usize is 64 bits here, and the budget is at most 2^48 (checked with the configuration).
        let memory = Arc::new(Semaphore::new(config.limits.memory_budget as usize));
        let control = match config.control {
            Some(address) => {
                let listener = control::bind(address).await.map_err(|source| StartError::Control {
                    address,
                    hint: listen_hint(&source, Flag::Control),
                    source,
                })?;
                let state = ControlState::new(
                    Arc::clone(&exports),
                    Arc::clone(&log),
                    clock,
                    config.control_token.clone(),
                    Arc::clone(&memory),
                )
                .map_err(|source| StartError::Control { address, hint: "", source })?
                .allow_hosts(config.control_allow_hosts.clone());
                Some((listener, state))
            }
            None => None,
        };
        Ok(Server {
            exports,
            listeners,
            control,
            log,
            limits: config.limits,
            memory,
            tls,
            controller: ShutdownController::new(),
        })
    }

    pub fn local_addresses(&self) -> Vec<SocketAddr> {
        self.listeners.iter().filter_map(|listener| listener.local_addr().ok()).collect()
    }

    pub fn control_address(&self) -> Option<SocketAddr> {
        self.control.as_ref().and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Logs each export at each address, as `serving nbd://ADDRESS/EXPORT`.
    pub fn log_exports(&self) {
        for address in self.local_addresses() {
            for export in self.exports.iter() {
                tracing::info!(export = %export.name, size = export.size(), "serving nbd://{address}/{}", export.name);
            }
        }
    }

    /// Serves until `stop` resolves, then shuts down: stop accepting, let in-flight requests
    /// finish within the grace period, answer the rest with ESHUTDOWN, flush every export.
    pub async fn run(self, stop: impl std::future::Future<Output = ()>) {
        let Server { exports, listeners, control, log, limits, memory, tls, controller } = self;
        let control_task = control
            .map(|(listener, state)| tokio::spawn(control::serve(listener, state, tls.clone(), controller.handle())));
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        let handshakes = Arc::new(Handshakes::new(limits.max_handshakes));
        let next_id = Arc::new(AtomicU64::new(1));
        // Every connection holds a sender; when all are dropped, every connection has ended.
        let (alive, mut all_ended) = mpsc::channel::<()>(1);
        for listener in listeners {
            let acceptor = Acceptor {
                listener,
                exports: Arc::clone(&exports),
                limits,
                tls: tls.clone(),
                slots: Arc::clone(&slots),
                handshakes: Arc::clone(&handshakes),
                next_id: Arc::clone(&next_id),
                shutdown: controller.handle(),
                alive: alive.clone(),
                memory: Arc::clone(&memory),
            };
            tokio::spawn(acceptor.run());
        }
        drop(alive);

        stop.await;
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        controller.stop();
        if tokio::time::timeout(limits.shutdown_grace, all_ended.recv()).await.is_err() {
            tracing::warn!(grace = ?limits.shutdown_grace, "requests still in flight after the grace period: answering them with ESHUTDOWN");
            controller.abandon();
            if tokio::time::timeout(Duration::from_secs(2), all_ended.recv()).await.is_err() {
                tracing::warn!("some connections did not end; leaving them");
            }
        }
        for export in exports.iter() {
            match export.storage.flush(IoContext::default()).await {
                Ok(()) => tracing::debug!(export = %export.name, "flushed"),
                Err(error) => tracing::error!(export = %export.name, %error, "flushing at shutdown failed"),
            }
        }
        if let Some(task) = control_task {
            // Control requests are short; one still running after this is not worth waiting for.
            let _ = tokio::time::timeout(Duration::from_secs(1), task).await;
        }
        log.close();
        tracing::info!("stopped");
    }
}

/// The first wait after a failed accept, and the longest.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections on one listener until shutdown.
struct Acceptor {
    listener: TcpListener,
    exports: Arc<Exports>,
    limits: Limits,
    tls: Option<Arc<Tls>>,
    slots: Arc<Semaphore>,
    handshakes: Arc<Handshakes>,
    next_id: Arc<AtomicU64>,
    shutdown: Shutdown,
    alive: mpsc::Sender<()>,
    memory: Arc<Semaphore>,
}

/// Connections still in the handshake, by arrival. When the table is full a new connection
/// closes the oldest: sockets that never finish their handshake cannot lock clients out, since a
/// real client finishes its handshake in milliseconds.
struct Handshakes {
    cap: usize,
    /// The next ticket number, and the eviction signal of every connection in the handshake.
    table: std::sync::Mutex<(u64, BTreeMap<u64, oneshot::Sender<()>>)>,
}

impl Handshakes {
    fn new(cap: usize) -> Handshakes {
        Handshakes { cap, table: std::sync::Mutex::new((0, BTreeMap::new())) }
    }

    /// Registers a connection that starts its handshake, evicting the oldest when full.
    fn enter(self: &Arc<Self>) -> HandshakeTicket {
        let (signal, evicted) = oneshot::channel();
        let mut table = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let id = table.0;
        table.0 += 1;
        if table.1.len() >= self.cap
            && let Some((_, oldest)) = table.1.pop_first()
        {
            let _ = oldest.send(());
        }
        table.1.insert(id, signal);
        HandshakeTicket { handshakes: Arc::clone(self), id, evicted }
    }
}

/// A connection's place in [`Handshakes`], given back when dropped.
struct HandshakeTicket {
    handshakes: Arc<Handshakes>,
    id: u64,
    /// Fires when a newer connection took this one's place.
    evicted: oneshot::Receiver<()>,
}

impl Drop for HandshakeTicket {
    fn drop(&mut self) {
        self.handshakes.table.lock().unwrap_or_else(PoisonError::into_inner).1.remove(&self.id);
    }
}

impl Acceptor {
    async fn run(mut self) {
        let mut backoff = ACCEPT_BACKOFF_START;
        loop {
            let accepted = tokio::select! {
                _ = self.shutdown.stopping() => return,
                accepted = self.listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff = ACCEPT_BACKOFF_START;
                    accepted
                }
                Err(error) => {
                    // Out of file descriptors (EMFILE, ENFILE) and similar: the connection waits
                    // in the backlog. Back off, doubling up to a second, instead of spinning.
                    tracing::warn!(%error, retry_in = ?backoff, "accepting a connection failed");
                    tokio::select! {
                        _ = self.shutdown.stopping() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            };
            // Transmission is full: refuse at once, with no greeting. (Idle connections in the
            // handshake hold no slot; the slot is taken when the handshake ends.)
            if self.slots.available_permits() == 0 {
                tracing::warn!(%peer, limit = self.limits.max_connections, "refusing a connection: the connection limit is reached");
                continue;
            }
            let ticket = self.handshakes.enter();
            let slots = Arc::clone(&self.slots);
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let exports = Arc::clone(&self.exports);
            let limits = self.limits;
            let tls = self.tls.clone();
            let shutdown = self.shutdown.clone();
            let alive = self.alive.clone();
            let memory = Arc::clone(&self.memory);
            let span = tracing::info_span!("connection", id, %peer);
            tokio::spawn(
                async move {
                    let place = Place { ticket, slots, memory };
                    handle_connection(stream, id, &exports, limits, tls.as_deref(), place, shutdown).await;
                    drop(alive);
                }
                .instrument(span),
            );
        }
    }
}

/// A connection at the end of its handshake: still plain, or upgraded by STARTTLS.
enum Negotiated {
    Plain(TcpStream, Outcome),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>, Outcome),
}

/// The handshake, with the TLS upgrade when the client asks for it.
async fn negotiate(
    mut stream: TcpStream,
    exports: &Exports,
    tls: Option<&Tls>,
) -> Result<Negotiated, handshake::HandshakeError> {
    let mode = tls.map_or(TlsMode::Off, |tls| tls.mode);
    match handshake::negotiate(&mut stream, exports, mode).await? {
        Outcome::StartTls(resume) => {
            let tls = tls.expect("STARTTLS is only acknowledged when TLS is configured");
            let mut stream = tls.nbd().accept(stream).await.map_err(handshake::HandshakeError::Tls)?;
            tracing::debug!(
                version = ?stream.get_ref().1.protocol_version(),
                cipher = ?stream.get_ref().1.negotiated_cipher_suite().map(|suite| suite.suite()),
                "TLS is on"
            );
            let outcome = handshake::resume(&mut stream, exports, resume).await?;
            Ok(Negotiated::Tls(Box::new(stream), outcome))
        }
        outcome => Ok(Negotiated::Plain(stream, outcome)),
    }
}

/// What a connection holds against the limits: its place among the handshakes, then one of the
/// transmission slots.
struct Place {
    ticket: HandshakeTicket,
    slots: Arc<Semaphore>,
    memory: Arc<Semaphore>,
}

async fn handle_connection(
    stream: TcpStream,
    id: u64,
    exports: &Exports,
    limits: Limits,
    tls: Option<&Tls>,
    place: Place,
    mut shutdown: Shutdown,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "cannot set TCP_NODELAY");
    }
    let Place { mut ticket, slots, memory } = place;
    let negotiated = tokio::select! {
        _ = shutdown.stopping() => return,
        _ = &mut ticket.evicted => {
            tracing::info!(limit = limits.max_handshakes, "closing the oldest connection still in the handshake: too many are (--max-handshakes)");
            return;
        }
        result = tokio::time::timeout(limits.handshake_timeout, negotiate(stream, exports, tls)) => result,
    };
    drop(ticket);
    let negotiated = match negotiated {
        Err(_) => {
            tracing::info!(timeout = ?limits.handshake_timeout, "handshake timed out; closing");
            return;
        }
        Ok(Err(error)) => {
            tracing::info!(%error, "handshake failed; closing");
            return;
        }
        Ok(Ok(negotiated)) => negotiated,
    };
    let (outcome, encrypted) = match &negotiated {
        Negotiated::Plain(_, outcome) => (outcome, false),
        Negotiated::Tls(_, outcome) => (outcome, true),
    };
    let session = match outcome {
        Outcome::Aborted => {
            tracing::debug!("client ended the handshake");
            return;
        }
        Outcome::StartTls(_) => unreachable!("STARTTLS is handled by negotiate"),
        Outcome::Transmission(session) => session.clone(),
    };
    let Ok(_slot) = slots.try_acquire_owned() else {
        tracing::warn!(
            limit = limits.max_connections,
            "closing a connection at the end of its handshake: the connection limit is reached (--max-connections)"
        );
        return;
    };
    let export = Arc::clone(&session.export);
    Counters::add(&export.counters.connections, 1);
    let _open = export.activity().metrics.connection_opened();
    tracing::info!(export = %export.name, structured_replies = session.structured_replies, tls = encrypted, flags = format!("{:#x}", session.flags), "client attached");
    let limits = ConnectionLimits { max_in_flight: limits.max_in_flight, memory };
    let served = match negotiated {
        Negotiated::Plain(stream, _) => {
            let (reader, writer) = stream.into_split();
            transmission::serve(reader, writer, session, id, limits, shutdown).await
        }
        Negotiated::Tls(stream, _) => {
            let (reader, writer) = tokio::io::split(*stream);
            transmission::serve(reader, writer, session, id, limits, shutdown).await
        }
    };
    match served {
        Ok(end) => tracing::info!(export = %export.name, ?end, "client detached"),
        Err(error) => tracing::warn!(export = %export.name, %error, "connection closed"),
    }
}

/// Prints the ready line the contract promises: one JSON object on stdout.
pub fn announce_ready(nbd: &[SocketAddr], control: Option<SocketAddr>) {
    let line = serde_json::json!({
        "event": "ready",
        "nbd": nbd.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "control": control.map(|address| address.to_string()),
    });
    let mut stdout = std::io::stdout().lock();
    // stdout may be closed by a supervisor that does not care; the server runs on regardless.
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();
}

/// A future that resolves on SIGINT or SIGTERM. The signals are caught from the moment this is
/// called (inside the runtime), not from the future's first poll: call it before the server says
/// it is ready, so a supervisor's SIGTERM right after "ready" ends it cleanly and not by the
/// signal's default action.
pub fn termination_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let interrupt = signal(SignalKind::interrupt());
    let terminate = signal(SignalKind::terminate());
    async move {
        match (interrupt, terminate) {
            (Ok(mut interrupt), Ok(mut terminate)) => tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            },
            (Ok(mut interrupt), Err(error)) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT will stop the server");
                interrupt.recv().await;
                tracing::info!("SIGINT received");
            }
            (Err(error), Ok(mut terminate)) => {
                tracing::warn!(%error, "cannot watch SIGINT; only SIGTERM will stop the server");
                terminate.recv().await;
                tracing::info!("SIGTERM received");
            }
            (Err(error), Err(_)) => {
                tracing::warn!(%error, "cannot watch SIGINT or SIGTERM: stop the server with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}
