//! The control API: HTTP/JSON on its own listener. Swap policies, arm triggers, read the fault
//! log and the bytes as stored, reset exports, while clients keep doing I/O.
//!
//! The export named `""` is written `@default` in paths. docs/control-api.md is the reference.
//!
//! Handlers run on the runtime that also serves NBD, so anything that costs more than a few
//! microseconds per request (reading a policy, its warnings, swapping it in) goes to the
//! [`ControlWorker`].

mod events;
mod metrics;
mod origin;
mod page;
mod worker;

pub use origin::allowed_host_name;
pub use worker::{ControlWorker, Refused};

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use nbdfault_policies::{BadSector, Policy, PolicyLimits, PolicyWarning, RuleCounter, TriggerState};
use serde::{Deserialize, Serialize};

use crate::storage::file::FileDataPath;

use crate::export::{CounterValues, Export, Exports};
use crate::fault::Clock;
use crate::fault::log::FaultLog;
use crate::fault::power::{Off, PowerView};
use crate::shutdown::Shutdown;
use crate::storage::IoContext;
use crate::tls::Tls;
use crate::wire::{errno, transmission_flags};

/// The most bytes one `data` request reads or writes.
pub const MAX_DATA: u64 = 64 << 20;
/// Bytes per storage call when serving `data`, taken from the memory budget while in memory: a
/// transfer holds a piece or two, never the whole range.
const DATA_STEP: u64 = 1 << 20;
/// The largest policy body: the policy size limit.
const MAX_POLICY: usize = PolicyLimits::DEFAULT.max_bytes;
/// How long a control request waits for the control worker.
const WORKER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);
/// The spelling of the export named `""` in paths, shared with every client.
pub use nbdfault_control_client::DEFAULT_EXPORT;

#[derive(Clone)]
pub struct ControlState {
    exports: Arc<Exports>,
    log: Arc<FaultLog>,
    clock: Clock,
    token: Option<Arc<str>>,
    worker: ControlWorker,
    /// The server's memory budget: `data` transfers take their pieces from it.
    memory: Arc<tokio::sync::Semaphore>,
    /// Names besides IP addresses and localhost that requests may be addressed to.
    allowed_hosts: Arc<[String]>,
}

#[cfg(test)]
impl ControlState {
    /// The control state of a server with one export, `disk` (1 MiB in memory), and `log`.
    pub fn for_tests(log: Arc<FaultLog>) -> ControlState {
        let exports = Arc::new(Exports::new([Export::new(crate::export::ExportParts::memory("disk", 1 << 20, false))]));
        let memory = Arc::new(tokio::sync::Semaphore::new(64 << 20));
        ControlState::new(exports, log, Clock::start(), None, memory).unwrap()
    }

    /// Keeps the control worker busy and its queue full until dropped.
    pub fn occupy_worker(&self) -> worker::Occupied {
        self.worker.occupy()
    }
}

impl ControlState {
    /// Also starts the control worker thread, which fails only when no thread can be made.
    pub fn new(
        exports: Arc<Exports>,
        log: Arc<FaultLog>,
        clock: Clock,
        token: Option<String>,
        memory: Arc<tokio::sync::Semaphore>,
    ) -> std::io::Result<ControlState> {
        let worker = ControlWorker::start(WORKER_DEADLINE)?;
        Ok(ControlState {
            exports,
            log,
            clock,
            token: token.map(Arc::from),
            worker,
            memory,
            allowed_hosts: Arc::from([]),
        })
    }

    /// Host names, besides IP addresses and localhost, that requests may be addressed to
    /// (`--control-allow-host`, checked by [`allowed_host_name`]).
    pub fn allow_hosts(mut self, names: Vec<String>) -> ControlState {
        self.allowed_hosts = Arc::from(names);
        self
    }

    fn export(&self, name: &str) -> Result<&Arc<Export>, ApiError> {
        let name = if name == DEFAULT_EXPORT { "" } else { name };
        crate::export::check_export_name(name).map_err(|message| ApiError::new(StatusCode::NOT_FOUND, message))?;
        self.exports.get(name).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "no export named {name:?}; this server has {} (write \"\" as {DEFAULT_EXPORT})",
                    self.exports.names()
                ),
            )
        })
    }
}

/// An error answer: a status and `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    extra: Option<serde_json::Value>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), extra: None }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<Refused> for ApiError {
    fn from(refused: Refused) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, refused.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = serde_json::json!({ "error": self.message });
        if let (Some(extra), Some(object)) = (self.extra, body.as_object_mut()) {
            object.insert("details".into(), extra);
        }
        (self.status, axum::Json(body)).into_response()
    }
}

/// The router, with bearer-token checking when a token is set.
pub fn router(state: ControlState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/exports", get(list_exports))
        .route("/v1/exports/{name}", get(show_export))
        .route(
            "/v1/exports/{name}/policy",
            put(set_policy).delete(clear_policy).get(get_policy).layer(DefaultBodyLimit::max(MAX_POLICY)),
        )
        .route("/v1/exports/{name}/triggers/{trigger}", post(arm_trigger).delete(disarm_trigger))
        .route("/v1/exports/{name}/faults", get(faults))
        .route(
            "/v1/exports/{name}/data",
            get(read_data).put(write_data).layer(DefaultBodyLimit::max(MAX_DATA as usize)),
        )
        .route("/v1/exports/{name}/reset", post(reset))
        .route("/v1/exports/{name}/power-cut", post(power_cut))
        .route("/v1/exports/{name}/power-on", post(power_on))
        .route("/v1/exports/{name}/events", get(events::events))
        .route("/metrics", get(metrics::metrics))
        // Refusals read the body first, as every refusal does (see `drain`).
        .fallback(|body: axum::body::Body| async {
            drain(body).await;
            ApiError::new(StatusCode::NOT_FOUND, "no such endpoint; see docs/control-api.md")
        })
        .method_not_allowed_fallback(|body: axum::body::Body| async {
            drain(body).await;
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "this endpoint has no such method; see docs/control-api.md")
        })
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        // The live page's files: the same for everyone and free of data, so served without the
        // token; the page then calls the API above with it.
        .route("/", get(page::index))
        .route("/page/app.js", get(page::script))
        .route("/page/style.css", get(page::style))
        .with_state(state)
}

async fn authorize(State(state): State<ControlState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes).unwrap_or_default();
        let expected = format!("Bearer {token}");
        // In constant time: how much of a guess was right must not show in the time to refuse it.
        if !bool::from(subtle::ConstantTimeEq::ct_eq(given, expected.as_bytes())) {
            // As for any refusal: the body is read first, so the client reads the answer.
            drain(request.into_body()).await;
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "this server needs `Authorization: Bearer TOKEN` (--control-token)",
            )
            .into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    next.run(request).await
}

/// Serves the API on `listener` until shutdown begins: over HTTPS when `tls` is given.
pub async fn serve(listener: tokio::net::TcpListener, state: ControlState, tls: Option<Arc<Tls>>, shutdown: Shutdown) {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    events::end_streams_at_shutdown(Arc::clone(&state.exports), shutdown.clone());
    // Before everything else, the page's files too: what a web page may not make a browser send.
    let guard = origin::Guard { allowed_hosts: Arc::clone(&state.allowed_hosts) };
    let app = router(state).layer(middleware::from_fn_with_state(guard, origin::guard));
    match tls {
        Some(tls) => {
            tracing::info!(verify_peer = tls.verify_peer, "control API on https://{address}/v1/");
            let listener = TlsListener::new(listener, tls, shutdown.clone());
            serve_connections(listener, app, shutdown).await;
        }
        None => {
            tracing::info!("control API on http://{address}/v1/");
            serve_connections(listener, app, shutdown).await;
        }
    }
}

/// Control connections served at once. More wait in the listen backlog, where they hold no file
/// descriptor of this process: idle control sockets cannot starve NBD of descriptors.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send the headers of a request, also the next one on a kept-alive
/// connection: idle or half-sent requests are closed after it.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
// The shared client stops reusing an idle connection long before the server closes it.
const _: () = assert!(nbdfault_control_client::MAX_IDLE.as_secs() * 3 <= HEADER_TIMEOUT.as_secs());
/// Time one request may take to be read and answered, body included (not the streaming of a
/// `data` answer, which is bounded by its size and the client's pace).
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves HTTP/1.1 on every connection `listener` yields, at most [`MAX_CONNECTIONS`] at once,
/// until shutdown begins; then lets the requests in progress finish.
async fn serve_connections<L: axum::serve::Listener>(mut listener: L, app: Router, mut shutdown: Shutdown) {
    let app =
        app.layer(tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, REQUEST_TIMEOUT));
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(64 << 10);
    loop {
        let permit = tokio::select! {
            _ = shutdown.stopping() => break,
            permit = Arc::clone(&connections).acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (io, _) = tokio::select! {
            _ = shutdown.stopping() => break,
            accepted = listener.accept() => accepted,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = http.serve_connection(hyper_util::rt::TokioIo::new(io), service);
        let mut stopping = shutdown.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopping.stopping() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
    // Connections still open finish their request (see the shutdown branch above); the caller
    // waits for the control task a short while only.
    let _ = Arc::clone(&connections).acquire_many_owned(MAX_CONNECTIONS as u32).await;
}

/// TLS handshakes in progress, or done and waiting for a connection slot, at once; more wait in
/// the backlog, holding no descriptor of this process.
const MAX_TLS_HANDSHAKES: usize = 16;
/// Time a control client has to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts TCP connections and yields them once their TLS handshake is done. Handshakes run in
/// their own tasks, bounded in number and time, so a slow client delays nobody else.
struct TlsListener {
    accepted: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, SocketAddr)>,
    address: SocketAddr,
}

impl TlsListener {
    fn new(listener: tokio::net::TcpListener, tls: Arc<Tls>, mut shutdown: Shutdown) -> TlsListener {
        let address = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        // A handshake's permit is held until its stream is taken: with the one buffered slot,
        // this listener holds at most MAX_TLS_HANDSHAKES + 1 sockets.
        let (sender, accepted) = tokio::sync::mpsc::channel(1);
        let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_TLS_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { return };
                let (stream, peer) = tokio::select! {
                    _ = shutdown.stopping() => return,
                    _ = sender.closed() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(error) => {
                            tracing::warn!(%error, "accepting a control connection failed");
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                let acceptor = tls.http().clone();
                let sender = sender.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let _ = sender.send((stream, peer)).await;
                        }
                        Ok(Err(error)) => tracing::info!(%peer, %error, "control API: TLS handshake failed"),
                        Err(_) => tracing::info!(%peer, "control API: TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        });
        TlsListener { accepted, address }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accepting task ended (shutdown): wait for the graceful shutdown to end serve.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.address)
    }
}

/// Binds the control listener, so a taken port is reported before the server starts.
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address).await
}

async fn health(State(state): State<ControlState>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_ms": state.clock.now().as_millis() as u64,
        "exports": state.exports.iter().count(),
    }))
}

#[derive(Serialize)]
struct PolicyView {
    origin: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    seed: u64,
    rules: Vec<RuleCounter>,
    source: String,
}

#[derive(Serialize)]
struct ExportView {
    name: String,
    description: String,
    storage: String,
    size: u64,
    read_only: bool,
    /// The transmission flags a client without structured replies (the kernel) gets.
    transmission_flags: u16,
    flags: Vec<&'static str>,
    policy: Option<PolicyView>,
    triggers: Vec<TriggerState>,
    bad_sectors: Vec<BadSector>,
    counters: CounterValues,
    requests_decided: u64,
    faults_logged: usize,
    unflushed_bytes: u64,
    /// On, or off after a power cut (and until when); how many cuts; connections attached.
    power: PowerView,
    /// How a file (or an overlay's base file) is read and written; absent for memory storage.
    #[serde(skip_serializing_if = "Option::is_none")]
    data_path: Option<FileDataPath>,
}

fn export_view(state: &ControlState, export: &Export) -> ExportView {
    let engine = export.engine();
    let flags = export.transmission_flags(false);
    ExportView {
        name: export.name.clone(),
        description: export.description.clone(),
        storage: export.storage_spec.clone(),
        size: export.size(),
        read_only: export.read_only,
        transmission_flags: flags,
        flags: transmission_flags::names(flags),
        policy: engine.policy().map(|policy| PolicyView {
            origin: policy.origin().to_string(),
            description: policy.description().map(str::to_string),
            seed: policy.seed(),
            rules: engine.rule_counters(),
            source: policy.source().to_string(),
        }),
        triggers: engine.triggers(),
        bad_sectors: engine.bad_sectors(),
        counters: export.counters.values(),
        requests_decided: engine.requests_decided(),
        faults_logged: state.log.count(&export.name),
        unflushed_bytes: export.faults.unflushed_bytes(),
        power: export.power().view(),
        data_path: export.storage.data_path(),
    }
}

/// Renders `view` to JSON on the control worker and answers with it. With a large policy an
/// export view is megabytes (the policy's source, a counter per rule): too much work for a
/// thread that serves NBD requests, and the live page asks for one every second.
async fn json_from_worker<T: Serialize>(
    state: &ControlState,
    view: impl FnOnce() -> T + Send + 'static,
) -> Result<Response, ApiError> {
    let body = state.worker.run(move |_| serde_json::to_vec(&view()).expect("a view always serializes")).await?;
    Ok(json_response(body))
}

fn json_response(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

async fn list_exports(State(state): State<ControlState>) -> Result<Response, ApiError> {
    let view_state = state.clone();
    json_from_worker(&state, move || {
        view_state.exports.iter().map(|export| export_view(&view_state, export)).collect::<Vec<_>>()
    })
    .await
}

async fn show_export(State(state): State<ControlState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let export = Arc::clone(state.export(&name)?);
    let view_state = state.clone();
    json_from_worker(&state, move || export_view(&view_state, &export)).await
}

async fn get_policy(State(state): State<ControlState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let export = state.export(&name)?;
    match export.engine().policy() {
        Some(policy) => Ok(([(header::CONTENT_TYPE, "application/yaml")], policy.source().to_string()).into_response()),
        None => Err(ApiError::new(StatusCode::NOT_FOUND, format!("export {:?} has no policy", export.name))),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyQuery {
    /// What errors and warnings name the policy by (`nbdfault ctl set-policy` sends the file
    /// name); the export view shows it as the policy's `origin`.
    origin: Option<String>,
}

/// The longest `origin=` label.
const MAX_ORIGIN: usize = 1024;

async fn set_policy(
    State(state): State<ControlState>,
    Path(name): Path<String>,
    query: Result<Query<PolicyQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let export = Arc::clone(state.export(&name)?);
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a policy may have at most {MAX_POLICY} bytes (the policy limit max_bytes)"),
        )
    };
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_POLICY as u64) {
        return Err(too_large());
    }
    let body = axum::body::to_bytes(body, MAX_POLICY).await.map_err(|error| {
        if std::error::Error::source(&error).is_some_and(|source| source.is::<http_body_util::LengthLimitError>()) {
            too_large()
        } else {
            ApiError::bad_request(format!("cannot read the body: {error}"))
        }
    })?;
    let origin = match query.map_err(|e| ApiError::bad_request(format!("{e}; use ?origin=NAME")))?.0.origin {
        Some(origin) if origin.is_empty() || origin.len() > MAX_ORIGIN || origin.chars().any(char::is_control) => {
            return Err(ApiError::bad_request(format!(
                "origin={origin:?}: give 1 to {MAX_ORIGIN} printable characters, such as the policy's file name"
            )));
        }
        Some(origin) => origin,
        None => format!("PUT /v1/exports/{name}/policy"),
    };
    let view_state = state.clone();
    // Reading, checking, the warnings, the swap (and dropping the old policy) and the view all
    // cost time in proportion to the policy: none of it runs on the runtime.
    let answer = state
        .worker
        .run(move |caller| {
            let text = std::str::from_utf8(&body).map_err(|_| ApiError::bad_request("the policy is not UTF-8 text"))?;
            let policy = Policy::from_yaml_within(text, &origin, &PolicyLimits::DEFAULT).map_err(|errors| {
                let first = errors.first();
                let every: Vec<serde_json::Value> = errors
                    .iter()
                    .map(|error| {
                        serde_json::json!({
                            "line": error.line, "column": error.column, "message": error.message, "fix": error.fix
                        })
                    })
                    .collect();
                ApiError {
                    status: StatusCode::BAD_REQUEST,
                    message: errors.to_string(),
                    extra: Some(serde_json::json!({
                        "line": first.line, "column": first.column, "fix": first.fix,
                        "errors": every, "truncated": errors.truncated,
                    })),
                }
            })?;
            let mut warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
            if caller.gone() {
                // Answered 503 already: the policy must not change unannounced.
                return Err(Refused::TimedOut(WORKER_DEADLINE).into());
            }
            let forgotten = export.faults.set_policy(Some(policy));
            if forgotten.writes > 0 {
                warnings.push(journal_dropped(&forgotten));
            }
            // The old journal is freed here, off the runtime.
            drop(forgotten);
            export.activity().policy_set(export.engine().policy().as_deref(), view_state.clock.now());
            tracing::info!(export = %export.name, warnings = warnings.len(), "policy replaced through the control API");
            let mut view =
                serde_json::to_value(export_view(&view_state, &export)).expect("an export view always serializes");
            view["warnings"] = serde_json::json!(warnings);
            Ok::<_, ApiError>(serde_json::to_vec(&view).expect("a JSON value always serializes"))
        })
        .await??;
    Ok(json_response(answer))
}

async fn clear_policy(State(state): State<ControlState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let export = Arc::clone(state.export(&name)?);
    let view_state = state.clone();
    // As a swap: on the control worker, where the old policy and journal are freed and the view
    // rendered. A `503` means the policy is still there.
    json_from_worker(&state, move || {
        drop(export.faults.set_policy(None));
        export.activity().policy_set(None, view_state.clock.now());
        tracing::info!(export = %export.name, "policy removed through the control API");
        export_view(&view_state, &export)
    })
    .await
}

/// The warning of a policy swap that dropped the journal of unflushed writes.
fn journal_dropped(forgotten: &crate::fault::journal::Forgotten) -> String {
    format!(
        "warning: the new policy keeps no journal of unflushed writes (no `volatile_cache: true`, no rule with \
         `power_cut`), so the {} writes ({} bytes) not yet flushed will not be undone by a power cut\n  \
         fix: keep `volatile_cache: true` in the new policy to keep unflushed writes undoable across the swap",
        forgotten.writes, forgotten.bytes
    )
}

fn check_trigger_name(trigger: &str) -> Result<(), ApiError> {
    let valid = !trigger.is_empty()
        && trigger.len() <= 128
        && trigger.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "trigger name {trigger:?}: use 1 to 128 letters, digits, '-', '_', '.' or ':'"
        )))
    }
}

async fn arm_trigger(
    state: State<ControlState>,
    path: Path<(String, String)>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    set_trigger(state, path, true)
}

async fn disarm_trigger(
    state: State<ControlState>,
    path: Path<(String, String)>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    set_trigger(state, path, false)
}

fn set_trigger(
    State(state): State<ControlState>,
    Path((name, trigger)): Path<(String, String)>,
    armed: bool,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let export = state.export(&name)?;
    check_trigger_name(&trigger)?;
    let engine = export.engine();
    let changed =
        if armed { engine.arm(&trigger, state.clock.now()) } else { engine.disarm(&trigger, state.clock.now()) };
    export.activity().trigger_set(&trigger, armed, state.clock.now());
    // A trigger no rule names cannot change any decision: most often a typo, which would make a
    // test pass for the wrong reason. Said in the answer, like the warnings of `PUT policy`.
    let warnings: Vec<String> = PolicyWarning::for_trigger(engine.policy().as_deref(), &trigger, armed)
        .iter()
        .map(ToString::to_string)
        .collect();
    tracing::info!(export = %export.name, %trigger, armed, changed, warnings = warnings.len(), "trigger set");
    Ok(axum::Json(serde_json::json!({ "trigger": trigger, "armed": armed, "changed": changed, "warnings": warnings })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PowerCutQuery {
    /// Stay off until `POST .../power-on` (or `until`, or `timeout`).
    #[serde(default)]
    off: bool,
    /// Stay off until this trigger is armed.
    until: Option<String>,
    /// Stay off this long, such as `5s`.
    timeout: Option<String>,
}

/// `POST /v1/exports/{name}/power-cut`: the power goes now. Every connection of the export drops
/// at once, without replies; every write not yet flushed is undone (when the policy keeps the
/// journal: `volatile_cache:`, or a rule with `power_cut`); with `off`, `until` or `timeout`
/// new connections are refused at the handshake until then.
async fn power_cut(
    State(state): State<ControlState>,
    Path(name): Path<String>,
    query: Result<Query<PowerCutQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let usage = "use ?off=true (until POST .../power-on), ?until=TRIGGER and/or ?timeout=DURATION";
    let Query(query) = query.map_err(|e| ApiError::bad_request(format!("{e}; {usage}")))?;
    let export = state.export(&name)?;
    if let Some(trigger) = &query.until {
        check_trigger_name(trigger)?;
    }
    let timeout = query
        .timeout
        .as_deref()
        .map(nbdfault_policies::units::parse_duration)
        .transpose()
        .map_err(|error| ApiError::bad_request(format!("timeout: {error}; {usage}")))?;
    if timeout.is_some_and(|timeout| timeout.is_zero()) {
        return Err(ApiError::bad_request(format!("timeout=0 keeps the export off for no time; {usage}")));
    }
    let off = (query.off || query.until.is_some() || timeout.is_some()).then(|| Off {
        until: query.until.as_deref().map(Arc::from),
        on_at: timeout.map(|timeout| state.clock.now() + timeout),
    });
    let engine = export.engine();
    let mut warnings = Vec::new();
    if let Some(trigger) = &query.until {
        if engine.is_armed(trigger) && timeout.is_none() {
            warnings.push(format!(
                "warning: the trigger `{trigger}` is armed already, so the power is back at once\n  \
                 fix: disarm `{trigger}` first, or power on with another trigger"
            ));
        }
        warnings.extend(
            PolicyWarning::for_trigger(engine.policy().as_deref(), trigger, true)
                .filter(|_| engine.policy().is_some())
                .map(|warning| warning.to_string()),
        );
    }
    // The cut runs to its end even if the caller hangs up: a power cut is not undone halfway.
    let faults = Arc::clone(&export.faults);
    let report = tokio::spawn(async move { faults.cut_power(off).await })
        .await
        .map_err(|error| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("the power cut failed: {error}")))?
        .map_err(storage_error)?;
    if !report.journaled {
        warnings.push(format!(
            "warning: export {:?} keeps no journal of unflushed writes, so the power cut undid none of them\n  \
             fix: install a policy with `volatile_cache: true` (or a rule with `power_cut`) before the writes the cut should lose",
            export.name
        ));
    }
    if report.unjournaled_writes > 0 {
        warnings.push(format!(
            "warning: {} writes since the last flush did not fit in the journal and survived the power cut\n  \
             fix: flush more often, or cut before that many unflushed writes",
            report.unjournaled_writes
        ));
    }
    Ok(axum::Json(serde_json::json!({
        "export": export.name,
        "power": export.power().view(),
        "dropped_connections": report.connections,
        "undone_writes": report.undone_writes,
        "undone_bytes": report.undone_bytes,
        "warnings": warnings,
    })))
}

/// `POST /v1/exports/{name}/power-on`: ends an "off" after a power cut at once.
async fn power_on(
    State(state): State<ControlState>,
    Path(name): Path<String>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let export = state.export(&name)?;
    let changed = export.faults.power_on();
    Ok(axum::Json(serde_json::json!({
        "export": export.name,
        "power": export.power().view(),
        "changed": changed,
        "warnings": Vec::<String>::new(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultsQuery {
    #[serde(default)]
    since: u64,
    /// `records` (default) or `decisions`: the decision log, which two runs with the same seed
    /// and the same requests reproduce byte for byte.
    #[serde(default)]
    view: Option<String>,
}

async fn faults(
    State(state): State<ControlState>,
    Path(name): Path<String>,
    query: Result<Query<FaultsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) =
        query.map_err(|e| ApiError::bad_request(format!("{e}; use ?since=SEQ&view=records|decisions")))?;
    let export = Arc::clone(state.export(&name)?);
    let decisions = match query.view.as_deref() {
        None | Some("records") => false,
        Some("decisions") => true,
        Some(other) => return Err(ApiError::bad_request(format!("view={other}: use records or decisions"))),
    };
    // Up to the whole log in memory (262,144 records, tens of megabytes of JSON): copied out and
    // rendered on the control worker, not on a thread that serves NBD requests.
    let log = Arc::clone(&state.log);
    let (body, last) = state
        .worker
        .run(move |_| {
            let records = log.since(Some(&export.name), query.since);
            let body = if decisions {
                // Power records are no decisions: outside input, as triggers armed through the API.
                nbdfault_policies::decision_log(records.iter().filter_map(|record| record.request()))
            } else {
                records.iter().map(|record| record.to_json_line() + "\n").collect::<String>()
            };
            (body, records.last().map(|record| record.seq()))
        })
        .await?;
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    if let Some(last) = last {
        headers.insert("x-last-seq", HeaderValue::from(last));
    }
    headers.insert("x-dropped", HeaderValue::from(state.log.dropped()));
    Ok((headers, body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataQuery {
    offset: Option<u64>,
    length: Option<u64>,
}

/// Checks `[offset, offset + length)` against the export and the per-request limit.
fn data_range(export: &Export, offset: u64, length: u64) -> Result<(), ApiError> {
    if length > MAX_DATA {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("{length} bytes is over the {MAX_DATA} byte limit of one request; split it"),
        ));
    }
    match offset.checked_add(length) {
        Some(end) if end <= export.size() => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            format!(
                "offset {offset} length {length} runs past the end of export {:?} ({} bytes)",
                export.name,
                export.size()
            ),
        )),
    }
}

fn storage_error(error: crate::storage::IoError) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("storage: {error}"))
}

async fn read_data(
    State(state): State<ControlState>,
    Path(name): Path<String>,
    query: Result<Query<DataQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(format!("{e}; use ?offset=BYTES&length=BYTES")))?;
    let export = Arc::clone(state.export(&name)?);
    let (Some(offset), Some(length)) = (query.offset, query.length) else {
        return Err(ApiError::bad_request("give both ?offset=BYTES and &length=BYTES"));
    };
    data_range(&export, offset, length)?;
    // Streamed piece by piece; each piece holds its share of the memory budget until the next
    // one is asked for, which is once hyper has taken it. A storage error after the first piece
    // can only cut the answer short.
    struct Piece {
        export: Arc<Export>,
        memory: Arc<tokio::sync::Semaphore>,
        at: u64,
        end: u64,
        held: Option<tokio::sync::OwnedSemaphorePermit>,
    }
    let first = Piece { export, memory: Arc::clone(&state.memory), at: offset, end: offset + length, held: None };
    let pieces = futures_util::stream::unfold(first, |mut piece| async move {
        piece.held = None;
        if piece.at >= piece.end {
            return None;
        }
        let take = DATA_STEP.min(piece.end - piece.at) as u32;
        let permit = Arc::clone(&piece.memory).acquire_many_owned(take).await.expect("the budget is never closed");
        match piece.export.storage.read(IoContext::default(), piece.at, take).await {
            Ok(data) => {
                piece.at += u64::from(take);
                piece.held = Some(permit);
                Some((Ok::<_, std::io::Error>(data), piece))
            }
            Err(error) => {
                tracing::warn!(export = %piece.export.name, %error, "control API: reading data failed; the answer is cut short");
                piece.at = piece.end;
                Some((Err(std::io::Error::other(error.to_string())), piece))
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream".to_string()), (header::CONTENT_LENGTH, length.to_string())],
        axum::body::Body::from_stream(pieces),
    )
        .into_response())
}

async fn write_data(
    State(state): State<ControlState>,
    Path(name): Path<String>,
    query: Result<Query<DataQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    let checked = (|| {
        let Query(query) = query.map_err(|e| ApiError::bad_request(format!("{e}; use ?offset=BYTES")))?;
        let export = state.export(&name)?;
        let Some(offset) = query.offset else {
            return Err(ApiError::bad_request("give ?offset=BYTES; the body is written there"));
        };
        let length = headers.get(header::CONTENT_LENGTH).and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
        let Some(length) = length else {
            return Err(ApiError::new(
                StatusCode::LENGTH_REQUIRED,
                "give the body's Content-Length: the range is checked before anything is written",
            ));
        };
        if length > MAX_DATA {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over the {MAX_DATA} byte limit of one request; split it"),
            ));
        }
        if query.length.is_some_and(|given| given != length) {
            return Err(ApiError::bad_request("length does not match the body; leave it out"));
        }
        if export.read_only {
            return Err(ApiError::new(StatusCode::CONFLICT, format!("export {:?} is read-only", export.name)));
        }
        data_range(export, offset, length)?;
        Ok((Arc::clone(export), offset, length))
    })();
    let (export, offset, length) = match checked {
        Ok(checked) => checked,
        Err(error) => {
            drain(body).await;
            return Err(error);
        }
    };
    // Read and written piece by piece, each piece holding its share of the memory budget.
    let mut body = body;
    let (mut received, mut written) = (0u64, 0u64);
    let mut piece = bytes::BytesMut::new();
    let mut permit: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let cut_short = |written: u64, why: &str| {
        ApiError::bad_request(format!(
            "the body ended after {written} of {length} bytes were written ({why}); those bytes stay written"
        ))
    };
    loop {
        let mut data = match http_body_util::BodyExt::frame(&mut body).await {
            None => break,
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(error)) => return Err(cut_short(written, &error.to_string())),
        };
        received += data.len() as u64;
        if received > length {
            return Err(cut_short(written, "more bytes than its Content-Length"));
        }
        while !data.is_empty() {
            if permit.is_none() {
                let want = DATA_STEP.min(length - written) as u32;
                permit =
                    Some(Arc::clone(&state.memory).acquire_many_owned(want).await.expect("the budget is never closed"));
            }
            let room = (DATA_STEP as usize - piece.len()).min(data.len());
            piece.extend_from_slice(&data.split_to(room));
            if piece.len() as u64 == DATA_STEP || written + piece.len() as u64 == length {
                let full = piece.split().freeze();
                let size = full.len() as u64;
                export
                    .storage
                    .write(IoContext::default(), offset + written, full, false)
                    .await
                    .map_err(storage_error)?;
                written += size;
                permit = None;
            }
        }
    }
    if written != length {
        return Err(cut_short(written, "shorter than its Content-Length"));
    }
    Ok(axum::Json(serde_json::json!({ "offset": offset, "written": written })))
}

/// The most of a refused `data` body read and thrown away, and for how long.
const DRAIN_BYTES: u64 = 2 * MAX_DATA;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads what is left of a refused request's body and throws it away (within bounds), so that a
/// client still sending it reads the answer instead of a connection reset under its feet.
pub(super) async fn drain(mut body: axum::body::Body) {
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
            seen += frame.data_ref().map_or(0, |data| data.len() as u64);
            if seen > DRAIN_BYTES {
                return;
            }
        }
    })
    .await;
}

async fn reset(State(state): State<ControlState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    let export = Arc::clone(state.export(&name)?);
    let (target, runtime, view_state) = (Arc::clone(&export), tokio::runtime::Handle::current(), state.clone());
    // On the control worker, reset and view alike (the reset runs there, its I/O and timers
    // driven by the runtime through the handle), so a `503` means the export was not reset.
    let reset = state
        .worker
        .run(move |_| {
            runtime.block_on(target.device.reset())?;
            target.activity().reset(view_state.clock.now());
            tracing::info!(export = %target.name, "reset to pristine contents");
            Ok::<_, crate::storage::IoError>(
                serde_json::to_vec(&export_view(&view_state, &target)).expect("a view always serializes"),
            )
        })
        .await?;
    match reset {
        Ok(view) => Ok(json_response(view)),
        Err(error) if error.errno() == errno::ENOTSUP => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "export {:?} ({}) has no pristine state: {error}; serve it as overlay:PATH to reset it",
                export.name, export.storage_spec
            ),
        )),
        Err(error) => Err(storage_error(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: IoContext = IoContext { connection: 1, cookie: 1, flags: 0, power_cycle: 0 };

    fn status(answer: Result<Response, ApiError>) -> StatusCode {
        answer.map_or_else(|error| error.status, |response| response.status())
    }

    #[tokio::test]
    async fn views_that_grow_with_the_policy_are_rendered_on_the_control_worker_not_on_the_runtime() {
        let state = ControlState::for_tests(Arc::new(FaultLog::in_memory(16)));
        let disk = || Path("disk".to_string());
        let export = Arc::clone(state.export("disk").unwrap());
        let policy = Policy::from_yaml("rules: [{ name: writes, when: { op: write }, then: { error: EIO } }]", "test");
        drop(export.faults.set_policy(Some(policy.unwrap())));
        export.storage.write(CTX, 0, bytes::Bytes::from_static(b"kept"), false).await.unwrap();
        let occupied = state.worker.occupy();
        // Refused at once while the worker is busy: each of them waits for the worker, so none
        // renders on the runtime's threads.
        let busy = StatusCode::SERVICE_UNAVAILABLE;
        assert_eq!(status(list_exports(State(state.clone())).await), busy, "GET /v1/exports");
        assert_eq!(status(show_export(State(state.clone()), disk()).await), busy, "GET /v1/exports/disk");
        assert_eq!(status(clear_policy(State(state.clone()), disk()).await), busy, "DELETE .../policy");
        assert_eq!(status(reset(State(state.clone()), disk()).await), busy, "POST .../reset");
        assert_eq!(status(metrics::metrics(State(state.clone()), HeaderMap::new()).await), busy, "GET /metrics");
        let faults = faults(State(state.clone()), disk(), Ok(Query(FaultsQuery { since: 0, view: None })));
        assert_eq!(status(faults.await), busy, "GET .../faults");
        // A refused removal or reset changed nothing.
        assert!(export.engine().policy().is_some(), "the policy is still there");
        assert_eq!(&export.storage.read(CTX, 0, 4).await.unwrap()[..], b"kept");
        drop(occupied);

        let answer = list_exports(State(state.clone())).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(answer.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap();
        let views: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(views[0]["name"], "disk");
        assert_eq!(views[0]["storage"], "memory:1048576");
        // Taken once the worker is free: the reset runs there, and its answer is the view.
        let answer = reset(State(state.clone()), disk()).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(&export.storage.read(CTX, 0, 4).await.unwrap()[..], [0; 4]);
        let answer = clear_policy(State(state.clone()), disk()).await.unwrap();
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX).await.unwrap();
        let view: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(view["policy"], serde_json::Value::Null, "{view}");
        assert!(export.engine().policy().is_none());
    }
}
