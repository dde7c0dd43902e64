//! The agent's HTTP endpoints: plain HTTP/1.1, JSON bodies.
//!
//! The admin endpoint (`--admin`, localhost by default):
//!
//! - `GET /healthz`: `ok`, or 503 `draining` once shutdown began.
//! - `GET /metrics`: Prometheus text format (certificates, connections).
//! - `GET /debug/conns`: the connections open now ([`crate::telemetry::ConnInfo`]).
//! - `GET /debug/config`: the agent's configuration, the version of the mesh configuration in
//!   force with its size, and the configuration store's counters.
//! - `GET /debug/certs`: the workload certificates held and where their rotation stands.
//!
//! The metrics endpoint (`--metrics`) serves `GET /metrics` only, for Prometheus scrapes.
//! Other paths answer 404, other methods 405.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
use crate::identity::CertManager;
use crate::state::{StateStore, StoreStats, Version};
use crate::telemetry::Telemetry;

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
    draining: AtomicBool,
}

impl AdminState {
    pub fn new(
        config: Config,
        store: Option<Arc<StateStore>>,
        certs: Option<Arc<CertManager>>,
        telemetry: Telemetry,
        registry: Registry,
    ) -> AdminState {
        AdminState {
            config,
            store,
            certs,
            telemetry,
            registry,
            draining: AtomicBool::new(false),
        }
    }

    /// From now on `/healthz` answers 503.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
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

/// Binds the admin and metrics listeners and serves them on their own tasks (abort them to
/// stop). An address given on the command line that cannot be bound is an error; a default
/// one is logged and skipped.
pub async fn start(
    config: &AdminConfig,
    state: &Arc<AdminState>,
) -> Result<Vec<JoinHandle<()>>, AdminError> {
    if !config.admin.addr.ip().is_loopback() {
        warn!(addr = %config.admin.addr, "the admin endpoint is reachable from other hosts");
    }
    let mut tasks = Vec::new();
    let endpoints = [(Some(config.admin), Pages::Admin, "admin")]
        .into_iter()
        .chain([(config.metrics, Pages::Metrics, "metrics")]);
    for (listen, pages, what) in endpoints {
        let Some(listen) = listen else { continue };
        if let Some(listener) = bind(&listen, what).await? {
            info!(addr = %listener.local_addr().unwrap_or(listen.addr), what, "serving HTTP");
            tasks.push(tokio::spawn(serve(listener, state.clone(), pages)));
        }
    }
    Ok(tasks)
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
                async move { Ok::<_, Infallible>(answer(&state, pages, req.method(), req.uri().path())) }
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

/// The answer to `method path`.
pub fn answer(
    state: &AdminState,
    pages: Pages,
    method: &Method,
    path: &str,
) -> Response<Full<Bytes>> {
    let known = match pages {
        Pages::Admin => matches!(
            path,
            "/healthz" | "/metrics" | "/debug/conns" | "/debug/config" | "/debug/certs"
        ),
        Pages::Metrics => path == "/metrics",
    };
    if !known {
        return text(StatusCode::NOT_FOUND, format!("no such page: {path}\n"));
    }
    if method != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match path {
        "/healthz" if state.draining.load(Ordering::Acquire) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/metrics" => metrics(&state.registry),
        "/debug/conns" => json(&state.telemetry.connections()),
        "/debug/config" => json(&config_view(state)),
        _ => json(&state.certs.as_ref().map(|c| c.certs()).unwrap_or_default()),
    }
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
