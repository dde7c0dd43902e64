//! HTTP/1.1, HTTP/2 and gRPC on ports declared as such: what both sides of the proxy share.
//!
//! A port is L7 when a service port targeting it says so (`appProtocol` `http`, `http2`,
//! `h2c`, `kubernetes.io/h2c`, `grpc`, else a port name prefixed `http-`, `http2-`, `grpc-`;
//! see `mesh_core::model::Protocol`). Every other port is L4: the proxy never sniffs, so a
//! server-first protocol never waits for a client that will not speak first.
//!
//! On an L7 port both sides parse requests with hyper, one connection of the application
//! at a time, whichever version it speaks (HTTP/1.0 or 1.1, or HTTP/2 with prior knowledge,
//! which gRPC uses). Bodies and trailers are streamed frame by frame, never buffered whole.
//!
//! # Versions
//!
//! The application is spoken to in its port's declared protocol, whatever the client spoke
//! ([`Wire::of_protocol`]): `http` as HTTP/1.1 on kept-alive connections, `http2`, `h2c` and
//! `grpc` as streams of an HTTP/2 connection (prior knowledge). A request that changes version
//! on the way is converted ([`version`]: request target, `Host`/`:authority`,
//! connection-specific headers); the caller gets the answer in its own version. Between two
//! proxies (HBONE, or two pods of this node) a request keeps the version its client spoke,
//! HTTP/1.0 leaving as HTTP/1.1.
//!
//! An HTTP/1.1 `Upgrade` (WebSocket) is routed and authorized like any request; once the
//! application answered `101 Switching Protocols` the connection carries raw bytes both ways
//! through both proxies ([`upgrade`]). A refused upgrade is answered like any refused request
//! and never switches.
//!
//! # What clients rely on
//!
//! - **Bodies stream.** Request and response bodies pass frame by frame as they come (a
//!   server-sent event reaches the client when the application sends it); how much is in
//!   flight is bounded by the connections' flow control (TCP, and the HTTP/2 windows), never
//!   by the size of the body, so an upload of any size takes bounded memory.
//! - **`Expect: 100-continue`** is answered `100 Continue` by the proxy the client speaks to
//!   as soon as it starts passing the body on, once the request is routed; a request that
//!   proxy refuses (a bad path, no route) gets its final answer instead, its body unread. The
//!   destination's policy decides later, so a request it refuses may have sent its body.
//! - **HTTP/1.0 clients** get an answer they can read (no chunked framing: the end of the body
//!   is the end of the connection, closed after the answer); their requests go on as HTTP/1.1
//!   with the address the client dialled as `Host` when they name none.
//! - **Trailers** pass both ways. `Trailer` is kept; HTTP/1.1 only carries trailers declared
//!   in it to a recipient that asked for them (`te: trailers`), which the proxy does for a
//!   request that came as HTTP/2. Request trailers of an HTTP/2 client do not reach an
//!   HTTP/1.1 application: HTTP/1.1 needs them declared before the body, which HTTP/2 does not.
//! - **gRPC deadlines and cancellation** ([`deadline`]): `grpc-timeout` reaches the
//!   application, and each proxy answers `DEADLINE_EXCEEDED` when it passes first; a call
//!   its client cancels (a reset stream, a closed connection) is cancelled at the application.
//! - WebSocket over HTTP/2 (extended CONNECT, RFC 8441) is not carried.
//!
//! # Endpoints without a proxy
//!
//! A service port declared HTTP whose chosen endpoint has no proxy of its own (a pod that is
//! not enrolled, an endpoint outside the mesh) is still handled at L7 by the source's proxy:
//! each request is routed, retried and timed as for a meshed endpoint, and sent in plaintext to
//! the endpoint in the port's declared protocol (an HTTP/2 client reaches an HTTP/1.1 server
//! on an `http` port). Nothing checks the caller's identity there: there is no destination
//! proxy, and the identity header is never set. A destination outside every service (no
//! declared protocol) is carried as bytes (L4), as the egress setting allows.
//!
//! # The caller's identity
//!
//! The destination proxy sets [`IDENTITY_HEADER`] (`x-forwarded-client-cert`, the format
//! Envoy uses) on every request it passes to the application:
//! `By=<the pod's SPIFFE ID>;URI=<the caller's SPIFFE ID>`. The caller's identity is the one
//! its certificate proved (HBONE) or, between two pods of this node, the one configured for the
//! calling pod. The header is removed from every request that arrives from an application or
//! from a plaintext caller, so an application can trust it when present.
//!
//! # Limits
//!
//! Request heads are bounded ([`MAX_HEADER_BYTES`], answered 431 on HTTP/1.1; HTTP/2 refuses
//! the stream), a connection must send a complete request head within
//! [`HEADER_READ_TIMEOUT`] (slow clients are cut), an HTTP/2 connection may open at most
//! [`MAX_CONCURRENT_STREAMS`] streams at once. HTTP/1.1 framing follows RFC 9112: a request
//! with two different `Content-Length`s, or a `Transfer-Encoding` other than chunked, is
//! refused with 400; with both `Content-Length` and `Transfer-Encoding` the chunked framing
//! wins, `Content-Length` is dropped and the connection is closed after the answer, so bytes
//! after the body are never read as another request (the ambiguity request smuggling relies
//! on). Requests always leave the proxy framed anew by it.
//!
//! # Paths
//!
//! Before any policy or route looks at a request, its path is normalized with
//! `mesh_core::http_path::normalize` ([`HttpConfig::paths`]: decoded unreserved characters,
//! merged slashes, no dot segments) and the request goes on with the normalized path, so the
//! destination's policy and its application see the same request. A path that cannot be
//! normalized safely (an encoded `/`, `\` or NUL, an invalid encoding) is answered 400
//! (gRPC: `INVALID_ARGUMENT`) and goes nowhere.
//!
//! # Refusals
//!
//! The proxy's own answers (403, 404, 400, 503, 504) tell the caller only what happened
//! (`access denied`, `no route`, ...); why (the policy that denied, a service or pod name, an
//! address) goes to the access log and metrics of the proxy that refused, unless
//! [`HttpConfig::expose_refusal_reasons`] is set.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use mesh_core::http_path::{self, PathError, PathNormalization};
use mesh_core::model::{NamespacedName, NodeSnapshot, Protocol};
use mesh_core::policy::HeaderLookup;
use serde::Serialize;
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::copy::RelayError;
use crate::telemetry::{Activity, Metered, Telemetry, service_host};

pub mod deadline;
pub(crate) mod retry;
pub mod upgrade;
pub(crate) mod upstream;
pub mod version;

pub use version::Wire;

/// Any error a body may end with: hyper's (an application's connection), h2's (a request
/// stream of an HBONE connection).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request or response body as the proxy passes it on.
pub type Body = BoxBody<Bytes, BoxError>;

/// `body` as a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// Any byte stream a proxied HTTP connection can run on.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The header that carries the caller's identity to the application.
pub const IDENTITY_HEADER: &str = "x-forwarded-client-cert";

/// The largest request head (request line and headers) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How long a connection may take to send a complete HTTP/1.1 request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The most streams an HTTP/2 client may have open at once on one connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The flow-control windows of HTTP/2 connections to and from applications.
const STREAM_WINDOW: u32 = 1 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;

/// How the proxy treats requests on L7 ports, on both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct HttpConfig {
    /// How request paths are normalized before any match and forwarded.
    pub paths: PathNormalization,
    /// Tell a refused caller why (the policy's words, which name TrafficTargets, service
    /// accounts, pods, addresses) in the response body, the gRPC message and the HBONE
    /// refusal header. Off: a plain refusal; the reason is only in the access log and metrics.
    pub expose_refusal_reasons: bool,
}

/// Why a request's path was refused.
#[derive(Debug, thiserror::Error)]
pub enum BadPath {
    #[error("{method} with the asterisk-form request target: only OPTIONS may use '*'")]
    Asterisk { method: Method },
    #[error("{0}")]
    Path(#[from] PathError),
    #[error("the normalized path {path:?} is not a valid request target: {source}")]
    Target {
        path: String,
        #[source]
        source: http::Error,
    },
}

impl BadPath {
    pub fn kind(&self) -> &'static str {
        match self {
            BadPath::Asterisk { .. } => "path_asterisk",
            BadPath::Path(e) => e.kind(),
            BadPath::Target { .. } => "path_invalid_target",
        }
    }
}

/// Normalizes the path of the request `parts` with `settings` and puts the normalized path
/// (with the query unchanged) in its URI, so what matches the policy is what is forwarded.
/// A CONNECT in authority-form has no path and is left alone.
pub fn normalize_path(
    parts: &mut http::request::Parts,
    settings: &PathNormalization,
) -> Result<(), BadPath> {
    if parts.method == Method::CONNECT && parts.uri.path_and_query().is_none() {
        return Ok(());
    }
    let path = parts.uri.path();
    if path == "*" && parts.method != Method::OPTIONS {
        return Err(BadPath::Asterisk {
            method: parts.method.clone(),
        });
    }
    let normal = match http_path::normalize(path, settings)? {
        std::borrow::Cow::Borrowed(_) => return Ok(()),
        std::borrow::Cow::Owned(normal) => normal,
    };
    let target = match parts.uri.query() {
        Some(query) => format!("{normal}?{query}"),
        None => normal.clone(),
    };
    let invalid = |source: http::Error| BadPath::Target {
        path: normal.clone(),
        source,
    };
    let mut uri = parts.uri.clone().into_parts();
    uri.path_and_query =
        Some(http::uri::PathAndQuery::from_maybe_shared(target).map_err(|e| invalid(e.into()))?);
    parts.uri = http::Uri::from_parts(uri).map_err(|e| invalid(e.into()))?;
    Ok(())
}

/// Whether the proxy parses requests on a port of this protocol.
pub fn is_l7(protocol: Protocol) -> bool {
    !matches!(protocol, Protocol::Tcp)
}

/// The declared protocols of a configuration's ports and the services behind its VIPs,
/// indexed once per configuration version ([`crate::state::Applied::ports`]): every
/// connection asks, and a scan of every service on each would cost in proportion to the
/// cluster's size.
#[derive(Debug, Default)]
pub struct PortIndex {
    /// A pod of this node and a port -> the protocol the services targeting it declare.
    pods: HashMap<NamespacedName, HashMap<u16, Protocol>>,
    /// A service VIP and port -> the declared protocol.
    service_ports: HashMap<SocketAddrV4, Protocol>,
    /// A service VIP -> the service's DNS name, for telemetry.
    service_names: HashMap<Ipv4Addr, String>,
}

impl PortIndex {
    /// Indexes `snapshot`. Where several services declare a port, the first by service name
    /// (namespace/name order) wins, and within a service its first port.
    pub fn new(snapshot: &NodeSnapshot) -> PortIndex {
        let local: HashMap<Ipv4Addr, &NamespacedName> = snapshot
            .workloads
            .values()
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, &w.name)))
            .collect();
        let mut index = PortIndex::default();
        for svc in snapshot.services.values() {
            for pod in svc.endpoints.iter().filter_map(|e| local.get(&e.ip)) {
                for p in &svc.ports {
                    index
                        .pods
                        .entry((*pod).clone())
                        .or_default()
                        .entry(p.target_port)
                        .or_insert(p.protocol);
                }
            }
            if let Some(vip) = svc.vip {
                for p in &svc.ports {
                    index
                        .service_ports
                        .entry(SocketAddrV4::new(vip, p.port))
                        .or_insert(p.protocol);
                }
                index
                    .service_names
                    .entry(vip)
                    .or_insert_with(|| service_host(&svc.name));
            }
        }
        index
    }

    /// The protocol of port `port` of `pod` (a pod of this node) as the services that target
    /// it declare it; TCP when none does.
    pub fn pod_port(&self, pod: &NamespacedName, port: u16) -> Protocol {
        self.pods
            .get(pod)
            .and_then(|ports| ports.get(&port))
            .copied()
            .unwrap_or(Protocol::Tcp)
    }

    /// The declared protocol of the service port at `dst` (a service VIP and port), as the
    /// application addressed it; TCP for any other address.
    pub fn service_port(&self, dst: SocketAddrV4) -> Protocol {
        self.service_ports
            .get(&dst)
            .copied()
            .unwrap_or(Protocol::Tcp)
    }

    /// The DNS name of the service whose VIP is `ip`, for a connection's telemetry.
    pub fn service_name(&self, ip: Ipv4Addr) -> Option<&str> {
        self.service_names.get(&ip).map(String::as_str)
    }
}

/// The accounting and idle timeout of the connection a request came on, in the request's
/// extensions: what an upgraded connection keeps watching once it carries raw bytes. While
/// a copy of it lives, [`serve`] does not return, so the connection is held (and counted
/// against its pod's cap) for as long as its upgraded bytes flow.
#[derive(Clone)]
pub struct ConnWatch {
    pub activity: Activity,
    pub idle: Duration,
    _held: tokio::sync::mpsc::Sender<Infallible>,
}

impl std::fmt::Debug for ConnWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnWatch")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

/// The server side of a proxied connection (either version, with the limits above).
pub(crate) fn server() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    builder
}

/// Why an HTTP connection of the proxy ended before its peer closed it.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The HTTP codec failed (a malformed message, a reset, an I/O error).
    #[error("HTTP: {0}")]
    Http(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Idle, drained or revoked, as any carried connection ends.
    #[error(transparent)]
    Ended(#[from] RelayError),
}

/// Serves `service` on the application connection `io` until it ends. It also ends when it
/// carried no byte either way for `idle`, or when the drain cuts it; when the drain starts,
/// it is asked to finish (HTTP/1.1: closes after the response in flight; HTTP/2: GOAWAY, the
/// streams in flight complete).
pub(crate) async fn serve<I, S>(
    io: Metered<I>,
    service: S,
    idle: Duration,
    telemetry: &Telemetry,
) -> Result<(), ServeError>
where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let activity = io.guard().activity();
    let (held, mut released) = tokio::sync::mpsc::channel::<Infallible>(1);
    let watch = ConnWatch {
        activity: activity.clone(),
        idle,
        _held: held,
    };
    let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
        request.extensions_mut().insert(watch.clone());
        service.call(request)
    });
    let builder = server();
    let served = {
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(conn);
        let mut draining = std::pin::pin!(telemetry.draining());
        let mut asked = false;
        loop {
            tokio::select! {
                served = conn.as_mut() => break served.map_err(ServeError::Http),
                () = &mut draining, if !asked => {
                    asked = true;
                    conn.as_mut().graceful_shutdown();
                }
                ended = activity.watchdog(idle) => {
                    return Err(RelayError::ended(ended, activity.revoked()).into());
                }
            }
        }
    };
    // The connection and its service (with the service's watch) are gone; an upgraded
    // exchange may still carry bytes: the connection ends when it does.
    while released.recv().await.is_some() {}
    served
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Whether the request (or response) is gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// gRPC status codes the proxy answers with.
pub mod grpc_status {
    pub const INVALID_ARGUMENT: u16 = 3;
    pub const NOT_FOUND: u16 = 5;
    pub const PERMISSION_DENIED: u16 = 7;
    pub const DEADLINE_EXCEEDED: u16 = 4;
    pub const UNIMPLEMENTED: u16 = 12;
    pub const INTERNAL: u16 = 13;
    pub const UNAVAILABLE: u16 = 14;
}

/// The proxy's own answer to a request it does not pass on: `status` with `message` as a
/// short text body, or for gRPC a trailers-only response (HTTP 200, `grpc-status` and
/// `grpc-message`), which is how gRPC clients expect a status from an intermediary.
pub fn local_reply(
    grpc: bool,
    status: StatusCode,
    grpc_code: u16,
    message: &str,
) -> Response<Body> {
    let message: String = message
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(512)
        .collect();
    let mut response = if grpc {
        let mut r = Response::new(empty());
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from(grpc_code));
        if let Ok(v) = HeaderValue::from_str(&message) {
            r.headers_mut().insert("grpc-message", v);
        }
        r
    } else {
        let mut r = Response::new(full(format!("{message}\n")));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        r
    };
    response
        .headers_mut()
        .insert("x-mesh-proxy", HeaderValue::from_static("refused"));
    response
}

/// What a refused caller is told when the reason is not exposed: what happened, nothing of
/// why.
pub fn plain_refusal(status: StatusCode) -> &'static str {
    match status {
        StatusCode::FORBIDDEN => "access denied",
        StatusCode::BAD_REQUEST => "bad request",
        StatusCode::NOT_FOUND => "no route",
        StatusCode::GATEWAY_TIMEOUT => "upstream timeout",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        other => other.canonical_reason().unwrap_or("refused"),
    }
}

/// The proxy's refusal of a request ([`local_reply`]): with `expose`, `detail` is the message;
/// otherwise [`plain_refusal`].
pub fn refusal(
    grpc: bool,
    status: StatusCode,
    grpc_code: u16,
    detail: &str,
    expose: bool,
) -> Response<Body> {
    let message = if expose {
        detail
    } else {
        plain_refusal(status)
    };
    local_reply(grpc, status, grpc_code, message)
}

/// Removes the headers that describe one connection, not the message (RFC 9110 section
/// 7.6.1), including those the `Connection` header names. `te: trailers` stays: gRPC needs it.
/// `Trailer` stays too: it describes the message (which trailer fields follow), and HTTP/1.1
/// carries only the trailers it names. An upgrade puts its own headers back
/// ([`upgrade::Requested::restore`]).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if name != header::TE {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Request headers as the policy and the router read them.
pub struct Headers<'a>(pub &'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.0.get(name)?.to_str().ok()
    }
}

/// The address `authority` names, if it is an IPv4 `ip:port`.
pub fn authority_addr(authority: &str) -> Option<SocketAddrV4> {
    authority.parse().ok()
}

#[cfg(test)]
mod tests;
