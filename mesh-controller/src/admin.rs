//! The controller's admin endpoint (bind it to localhost): plain HTTP/1.1, JSON bodies.
//!
//! - `GET /healthz`: `ok` once the controller serves.
//! - `GET /config`: the configuration it started with.
//! - `GET /debug/index`: the resources it holds, by kind.
//! - `GET /debug/nodes`: per-node configuration versions and ACK/NACK state.
//! - `GET /debug/snapshot/<node>`: the configuration compiled for a node right now.
//! - `GET /debug/rejected`: resources refused, with the reason.
//! - `GET /metrics`: Prometheus text format.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::debug;

use crate::config::Config;
use crate::index::SharedIndex;
use crate::server::Server;

/// What the admin endpoint reads.
pub struct AdminState {
    pub config: Config,
    pub index: SharedIndex,
    pub server: Arc<Server>,
    pub registry: Registry,
}

/// Serves the admin endpoint on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, &req)) }
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

fn json(value: &impl serde::Serialize) -> Response<Full<Bytes>> {
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

fn handle(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let path = req.uri().path();
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/config" => json(&state.config),
        "/debug/index" => json(&state.index.read().summary()),
        "/debug/nodes" => json(&state.server.node_status()),
        "/debug/rejected" => json(&state.index.read().rejections()),
        "/metrics" => {
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &state.registry) {
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
        _ => match path.strip_prefix("/debug/snapshot/") {
            Some(node) if !node.is_empty() => json(&state.server.current_snapshot(node)),
            _ => text(StatusCode::NOT_FOUND, format!("no such page: {path}\n")),
        },
    }
}
