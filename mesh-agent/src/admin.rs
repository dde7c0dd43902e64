//! The agent's HTTP endpoints: plain HTTP/1.1, JSON bodies.
//!
//! The admin endpoint (`--admin`, localhost by default):
//!
//! - `GET /healthz`: `ok`, or 503 `draining` once shutdown began, or 503 `uninstalled` once
//!   the mesh is removed from the node ([`crate::uninstall`]): readiness.
//! - `GET /livez`: `ok` while the agent serves at all: liveness (a draining or uninstalled
//!   agent is not one to restart).
//! - `GET /metrics`: Prometheus text format (certificates, connections, the datapath's
//!   counters: [`kernel_metrics`]).
//! - `GET /debug/conns`: the connections open now ([`mesh_proxy::telemetry::ConnInfo`]).
//! - `GET /debug/config`: the agent's configuration, the version of the mesh configuration in
//!   force with its size, and the configuration store's counters.
//! - `GET /debug/certs`: the workload certificates held and where their rotation stands.
//! - `GET /debug/pods`: the enrolled pods, each as enrolled, as the datapath's maps hold it and
//!   as the configuration names it ([`crate::admin::views::PodView`]).
//! - `GET /debug/policy/<ns>/<pod>`: a pod's compiled inbound policy.
//! - `GET /debug/policy/check?from=F&to=T[&method=M&path=P&header=NAME:VALUE]`: the verdict
//!   of the proxy's own `authorize` for a caller and a destination (`mesh-agent policy check`).
//! - `GET /debug/flows[?after=SEQ&pod=NS/POD&limit=N&probes=1]`: connections as the kernel
//!   and the proxy saw them, joined ([`crate::admin::flows`]); `status`'s probe connections
//!   only with `probes=1`.
//! - `GET /debug/status`: kernel, programs, maps, controller, certificates, and a verdict per
//!   pod from a probe connection ([`crate::admin::probe`]); takes a few seconds.
//!
//! `/debug/conns` takes `?pod=NS/POD` too, and gives each connection the application
//! `protocol` its destination port is declared with. Errors of the debug pages are JSON
//! (`{"error": ..., "kind": ...}`) with status 400 (bad request), 404 (unknown pod, service or
//! source) or 503 (no controller or configuration yet).
//!
//! The metrics endpoint (`--metrics`) serves `GET /metrics` only, for Prometheus scrapes.
//! Other paths answer 404, other methods 405.
//!
//! - [`views`]: what the admin endpoint answers on `/debug/pods`, `/debug/policy/...`,
//!   `/debug/status`; the commands ([`crate::debug`]) read the same types.
//! - [`probe`]: the per-pod capture check behind `status`.
//! - [`flows`]: the kernel's flow events and the proxy's connection records, joined.
//! - [`kernel_metrics`]: the datapath's counters on `/metrics`.

pub mod flows;
pub mod kernel_metrics;
pub mod probe;
pub mod views;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::config::{AdminConfig, Config, Listen};
use crate::control::ControlClient;
use flows::{FlowLog, FlowQuery};
use mesh_datapath::config::PodSpec;
use mesh_proxy::identity::CertManager;
use mesh_proxy::state::{StateStore, StoreStats, Version};
use mesh_proxy::telemetry::Telemetry;

/// Why a debug page could not answer: an HTTP status, a stable kind and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugError {
    /// The request names something the agent does not know (a pod, a service, a source).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The agent cannot answer yet (no controller, no configuration).
    #[error("{0}")]
    Unavailable(String),
}

impl DebugError {
    pub fn kind(&self) -> &'static str {
        match self {
            DebugError::NotFound(_) => "not_found",
            DebugError::BadRequest(_) => "bad_request",
            DebugError::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            DebugError::NotFound(_) => 404,
            DebugError::BadRequest(_) => 400,
            DebugError::Unavailable(_) => 503,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("listen on {addr} for the {what} endpoint: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl AdminError {
    pub fn kind(&self) -> &'static str {
        match self {
            AdminError::Bind { .. } => "bind",
        }
    }
}

/// What the endpoints read.
pub struct AdminState {
    pub config: Config,
    /// The mesh configuration in force; `None` without a controller.
    pub store: Option<Arc<StateStore>>,
    pub certs: Option<Arc<CertManager>>,
    pub telemetry: Telemetry,
    pub registry: Registry,
    /// The controller connection; `None` without a controller.
    pub control: Option<Arc<ControlClient>>,
    pub started: SystemTime,
    /// Joined kernel and proxy flow records for `/debug/flows`.
    pub flows: FlowLog,
    /// One `/debug/status` at a time: each starts a probe process per pod.
    status: std::sync::Mutex<()>,
    /// What `/healthz` answers: [`SERVING`], [`DRAINING`] or [`UNINSTALLED`].
    health: AtomicU8,
    /// Pods whose enrollment failed, with why.
    pub enroll_failures: Arc<crate::enroll::EnrollFailures>,
    /// The pods the agent found to enroll beyond the command line's.
    wanted: std::sync::Mutex<Vec<PodSpec>>,
}

/// `/healthz`: the agent serves.
const SERVING: u8 = 0;
/// `/healthz`: shutdown began.
const DRAINING: u8 = 1;
/// `/healthz`: the mesh is removed from the node.
const UNINSTALLED: u8 = 2;

impl AdminState {
    pub fn new(
        config: Config,
        store: Option<Arc<StateStore>>,
        certs: Option<Arc<CertManager>>,
        telemetry: Telemetry,
        mut registry: Registry,
    ) -> AdminState {
        let enroll_failures = Arc::new(crate::enroll::EnrollFailures::register(&mut registry));
        let flows = FlowLog::new(config.datapath.pin_dir(), telemetry.clone());
        AdminState {
            config,
            store,
            certs,
            telemetry,
            registry,
            control: None,
            enroll_failures,
            started: SystemTime::now(),
            flows,
            status: std::sync::Mutex::new(()),
            health: AtomicU8::new(SERVING),
            wanted: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Reports the state of this controller connection on `/debug/status`.
    pub fn with_control(mut self, control: Arc<ControlClient>) -> AdminState {
        self.control = Some(control);
        self
    }

    /// The pods this agent enrolls: those given on the command line, and those it found in
    /// the configuration or on the node (`--enroll-from-config`, `--discover-pods`) as of its
    /// last reconcile; one it failed to enroll is listed too, so its checks fail rather than
    /// hide it.
    pub fn pods(&self) -> Vec<PodSpec> {
        let mut pods = self.config.pods.clone();
        pods.extend(
            self.wanted
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        pods
    }

    /// Records the pods the agent wants enrolled beyond the command line's.
    pub fn set_wanted(&self, pods: Vec<PodSpec>) {
        *self
            .wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = pods;
    }

    /// From now on `/healthz` answers 503 `draining`.
    pub fn set_draining(&self) {
        let _ =
            self.health
                .compare_exchange(SERVING, DRAINING, Ordering::AcqRel, Ordering::Acquire);
    }

    /// From now on `/healthz` answers 503 `uninstalled`: the mesh is removed from the node.
    pub fn set_uninstalled(&self) {
        self.health.store(UNINSTALLED, Ordering::Release);
    }
}

/// Which pages a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pages {
    /// Everything: health, metrics and the debug pages.
    Admin,
    /// `/metrics` only.
    Metrics,
}

/// The admin and metrics endpoints being served.
pub struct Endpoints {
    tasks: Vec<JoinHandle<()>>,
    /// Second descriptors of their listeners, for a successor agent.
    listeners: Vec<std::os::fd::OwnedFd>,
}

impl Endpoints {
    /// Stops serving (a successor that holds the listeners too goes on serving them).
    pub fn stop(self) {
        for task in self.tasks {
            task.abort();
        }
    }

    /// New descriptors of the listeners.
    pub fn listeners(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        self.listeners.iter().map(|fd| fd.try_clone()).collect()
    }
}

/// Binds the admin and metrics listeners and serves them on their own tasks. A listener
/// handed over by an earlier agent on the same address is served instead of binding one. An
/// address given on the command line that cannot be bound is an error; a default one is
/// logged and skipped.
pub async fn start(
    config: &AdminConfig,
    state: &Arc<AdminState>,
    mut inherited: Vec<std::net::TcpListener>,
) -> Result<Endpoints, AdminError> {
    if !config.admin.addr.ip().is_loopback() {
        warn!(addr = %config.admin.addr, "the admin endpoint is reachable from other hosts");
    }
    let mut served = Endpoints {
        tasks: Vec::new(),
        listeners: Vec::new(),
    };
    let endpoints = [(Some(config.admin), Pages::Admin, "admin")]
        .into_iter()
        .chain([(config.metrics, Pages::Metrics, "metrics")]);
    for (listen, pages, what) in endpoints {
        let Some(listen) = listen else { continue };
        let handed = inherited
            .iter()
            .position(|l| l.local_addr().ok() == Some(listen.addr))
            .map(|i| inherited.swap_remove(i))
            .and_then(|l| {
                l.set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(l))
                    .ok()
            });
        let listener = match handed {
            Some(l) => Some(l),
            None => bind(&listen, what).await?,
        };
        if let Some(listener) = listener {
            info!(addr = %listener.local_addr().unwrap_or(listen.addr), what, "serving HTTP");
            use std::os::fd::AsFd as _;
            if let Ok(fd) = listener.as_fd().try_clone_to_owned() {
                served.listeners.push(fd);
            }
            served
                .tasks
                .push(tokio::spawn(serve(listener, state.clone(), pages)));
        }
    }
    Ok(served)
}

/// Binds `listen`; `None` when a default address is taken.
pub async fn bind(listen: &Listen, what: &'static str) -> Result<Option<TcpListener>, AdminError> {
    match TcpListener::bind(listen.addr).await {
        Ok(l) => Ok(Some(l)),
        Err(source) if listen.explicit => Err(AdminError::Bind {
            what,
            addr: listen.addr,
            source,
        }),
        Err(e) => {
            warn!(addr = %listen.addr, what, error = %e, "default address unavailable; endpoint not served (set it with --{what})");
            Ok(None)
        }
    }
}

/// Serves `pages` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, pages: Pages) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                debug!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(state, pages, req.method(), req.uri()).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

/// The answer to `method uri`; `/debug/status` is computed off the runtime.
pub async fn respond(
    state: Arc<AdminState>,
    pages: Pages,
    method: &Method,
    uri: &http::Uri,
) -> Response<Full<Bytes>> {
    if pages == Pages::Admin && method == Method::GET && uri.path() == "/debug/status" {
        let computed = tokio::task::spawn_blocking(move || {
            let _one = state
                .status
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            views::status(&state)
        });
        return match computed.await {
            Ok(status) => json(&status),
            Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("status: {e}\n")),
        };
    }
    answer(&state, pages, method, uri)
}

/// The answer to `method uri`.
pub fn answer(
    state: &AdminState,
    pages: Pages,
    method: &Method,
    uri: &http::Uri,
) -> Response<Full<Bytes>> {
    let path = uri.path();
    let known = match pages {
        Pages::Admin => {
            matches!(
                path,
                "/healthz"
                    | "/livez"
                    | "/metrics"
                    | "/debug/conns"
                    | "/debug/config"
                    | "/debug/certs"
                    | "/debug/pods"
                    | "/debug/flows"
                    | "/debug/status"
            ) || path.starts_with("/debug/policy/")
        }
        Pages::Metrics => path == "/metrics",
    };
    if !known {
        return text(StatusCode::NOT_FOUND, format!("no such page: {path}\n"));
    }
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let query = Query::parse(uri.query().unwrap_or(""));
    match path {
        "/livez" => text(StatusCode::OK, "ok\n".into()),
        "/healthz" => match state.health.load(Ordering::Acquire) {
            SERVING => text(StatusCode::OK, "ok\n".into()),
            DRAINING => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into()),
            _ => text(StatusCode::SERVICE_UNAVAILABLE, "uninstalled\n".into()),
        },
        "/metrics" => metrics(&state.registry),
        "/debug/conns" => json(&views::conns(state, query.get("pod"))),
        "/debug/config" => json(&config_view(state)),
        "/debug/certs" => json(&state.certs.as_ref().map(|c| c.certs()).unwrap_or_default()),
        "/debug/pods" => json(&views::pods(state)),
        "/debug/flows" => {
            let number = |key: &str, default: u64| match query.get(key) {
                None => Ok(default),
                Some(v) => v
                    .parse::<u64>()
                    .map_err(|_| DebugError::BadRequest(format!("{key}={v:?} is not a number"))),
            };
            match (number("after", 0), number("limit", 200)) {
                (Ok(after), Ok(limit)) => json(&state.flows.page(
                    &state.pods(),
                    &FlowQuery {
                        after,
                        pod: query.get("pod"),
                        limit: usize::try_from(limit).unwrap_or(usize::MAX),
                        probes: matches!(query.get("probes"), Some("1" | "true")),
                    },
                )),
                (Err(e), _) | (_, Err(e)) => error(&e),
            }
        }
        "/debug/policy/check" => {
            let q = views::CheckQuery {
                from: query.get("from").unwrap_or_default().to_string(),
                to: query.get("to").unwrap_or_default().to_string(),
                method: query.get("method").map(String::from),
                path: query.get("path").map(String::from),
                headers: query
                    .all("header")
                    .filter_map(|h| h.split_once(':'))
                    .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                    .collect(),
                paths: state.config.proxy.http.paths,
            };
            if q.from.is_empty() || q.to.is_empty() {
                return error(&DebugError::BadRequest(
                    "policy check needs from= and to=".into(),
                ));
            }
            result(views::policy_check(state, &q))
        }
        _ => match path.strip_prefix("/debug/policy/") {
            Some(pod) => result(views::policy(state, &percent_decode(pod))),
            None => text(StatusCode::NOT_FOUND, format!("no such page: {path}\n")),
        },
    }
}

/// The parameters of a query string, percent-decoded.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Query {
        Query(
            q.split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn result(r: Result<impl Serialize, DebugError>) -> Response<Full<Bytes>> {
    match r {
        Ok(v) => json(&v),
        Err(e) => error(&e),
    }
}

fn error(e: &DebugError) -> Response<Full<Bytes>> {
    let body = serde_json::json!({ "error": e.to_string(), "kind": e.kind() });
    Response::builder()
        .status(e.status())
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap_or_default()
}

#[derive(Serialize)]
struct ConfigView<'a> {
    agent: &'a Config,
    /// `None` without a controller.
    mesh: Option<MeshView>,
}

#[derive(Serialize)]
struct MeshView {
    /// `None` until the first configuration arrives.
    version: Option<Version>,
    node: String,
    workloads: usize,
    services: usize,
    policies: usize,
    store: StoreStats,
}

fn config_view(state: &AdminState) -> ConfigView<'_> {
    let mesh = state.store.as_ref().map(|store| {
        let applied = store.current();
        let s = &applied.snapshot;
        MeshView {
            version: applied.version,
            node: s.node.clone(),
            workloads: s.workloads.len(),
            services: s.services.len(),
            policies: s.policies.len(),
            store: store.stats(),
        }
    });
    ConfigView {
        agent: &state.config,
        mesh,
    }
}

fn metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let mut out = String::new();
    match prometheus_client::encoding::text::encode(&mut out, registry) {
        Ok(()) => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(out)))
            .unwrap_or_default(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}\n")),
    }
}

fn json(value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(value) {
        Ok(body) => Response::builder()
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default(),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}\n")),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
