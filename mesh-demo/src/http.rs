//! The HTTP demo server: HTTP/1.1 and h2c (prior knowledge) on one port, every request
//! answered with what the server saw, as JSON.
//!
//! - `/healthz`: `ok`.
//! - `/status/<code>`: the usual JSON with status `<code>` (200..=599).
//! - `/delay/<ms>`: the usual JSON after `<ms>` milliseconds (at most [`MAX_DELAY`]).
//! - anything else: the usual JSON with 200.
//!
//! The request body is read frame by frame and only counted, so uploads of any size cost
//! no memory.

use std::{
    collections::BTreeMap, convert::Infallible, future::Future, net::SocketAddr, sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
};
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{Instrument, debug, info, info_span, warn};

/// The header a mesh proxy uses to pass the caller's identity on.
pub const CALLER_HEADER: &str = "x-forwarded-client-cert";

/// The longest `/delay/<ms>` honoured; longer asks are cut to it.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// How long in-flight requests get to finish once shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("read the bound address: {0}")]
    LocalAddr(#[source] std::io::Error),
}

/// What every answer says about the request.
#[derive(Debug, Serialize)]
pub struct Echo<'a> {
    pub pod: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub version: &'static str,
    pub peer: String,
    pub caller: Option<String>,
    pub headers: BTreeMap<String, String>,
    pub body_bytes: u64,
}

/// A bound, not yet serving, HTTP demo server.
pub struct HttpServer {
    listener: TcpListener,
    name: Arc<str>,
}

impl HttpServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, name: &str) -> Result<HttpServer, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(HttpServer {
            listener,
            name: name.into(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(ServeError::LocalAddr)
    }

    /// Serves until `shutdown` completes, then stops accepting and lets in-flight requests
    /// finish for up to [`DRAIN`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let builder = auto::Builder::new(TokioExecutor::new());
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            if let Err(e) = stream.set_nodelay(true) {
                debug!(error = %e, "set TCP_NODELAY");
            }
            let name = self.name.clone();
            let service = service_fn(move |req| handle(name.clone(), peer, req));
            let conn = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(
                async move {
                    if let Err(e) = conn.await {
                        debug!(error = %e, "connection ended");
                    }
                }
                .instrument(info_span!("conn", %peer)),
            );
        }
        info!("shutting down");
        if tokio::time::timeout(DRAIN, graceful.shutdown())
            .await
            .is_err()
        {
            warn!("requests still running after {DRAIN:?}; leaving them");
        }
    }
}

async fn handle(
    name: Arc<str>,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return Ok(text(StatusCode::OK, "ok"));
    }
    let status = match path.strip_prefix("/status/") {
        Some(code) => match parse_status(code) {
            Some(status) => status,
            None => return Ok(text(StatusCode::BAD_REQUEST, "status must be 200..=599\n")),
        },
        None => StatusCode::OK,
    };
    let delay = match path.strip_prefix("/delay/") {
        Some(ms) => match ms.parse::<u64>() {
            Ok(ms) => Duration::from_millis(ms).min(MAX_DELAY),
            Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "delay is in milliseconds\n")),
        },
        None => Duration::ZERO,
    };

    let mut body_bytes = 0u64;
    while let Some(frame) = req.body_mut().frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                debug!(error = %e, "request body");
                return Ok(text(StatusCode::BAD_REQUEST, "request body broke off\n"));
            }
        }
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }

    let echo = Echo {
        pod: &name,
        method: req.method().as_str(),
        path: &path,
        version: version_name(req.version()),
        peer: peer.to_string(),
        caller: req
            .headers()
            .get(CALLER_HEADER)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        headers: header_map(req.headers()),
        body_bytes,
    };
    Ok(json(status, &echo))
}

fn parse_status(code: &str) -> Option<StatusCode> {
    let code: u16 = code.parse().ok()?;
    if !(200..=599).contains(&code) {
        return None;
    }
    StatusCode::from_u16(code).ok()
}

fn version_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// Headers by name; repeated headers joined with `, `.
fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut map = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert_with(|| value.into_owned());
    }
    map
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            Response::builder()
                .status(status)
                .header(header::CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap_or_default()
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("encode: {e}\n")),
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_paths_accept_final_codes_only() {
        assert_eq!(parse_status("503"), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(parse_status("200"), Some(StatusCode::OK));
        assert_eq!(parse_status("101"), None);
        assert_eq!(parse_status("600"), None);
        assert_eq!(parse_status("abc"), None);
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append("x-a", "1".parse().expect("header value"));
        headers.append("x-a", "2".parse().expect("header value"));
        headers.append("x-b", "3".parse().expect("header value"));
        let map = header_map(&headers);
        assert_eq!(map["x-a"], "1, 2");
        assert_eq!(map["x-b"], "3");
    }
}
