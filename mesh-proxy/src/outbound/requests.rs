//! Outbound requests of a meshed pod on an L7 port: routed one by one.
//!
//! Each request is routed on its own by `Resolver::route_request` (Gateway API routes, then
//! TrafficSplits, then the service itself; see mesh-core), its endpoint chosen by the load
//! balancer's power of two choices on outstanding requests (least requests), and sent on a
//! kept connection to that endpoint: an HBONE stream for a meshed pod on another node, the
//! destination's own request handler for a pod of this node, a plain socket otherwise.
//!
//! - A route's `timeouts.request` bounds the wait for the response head: past it the caller
//!   gets 504 (gRPC: `DEADLINE_EXCEEDED`). A gRPC call's `grpc-timeout` bounds the whole call
//!   when it is shorter (see [`crate::l7::deadline`]).
//! - The request leaves in its client's version for a meshed pod (whose proxy speaks the
//!   port's declared protocol to the application) and in the port's declared protocol for an
//!   endpoint without a proxy ([`crate::l7::version`]); an upgrade (WebSocket) is carried as
//!   bytes once answered 101 ([`crate::l7::upgrade`]).
//! - Idempotent requests without a body are retried (see [`crate::l7::retry`]).
//! - The path is normalized before routing ([`crate::l7::normalize_path`]) and the request
//!   leaves with the normalized path; one that cannot be normalized safely gets 400 (gRPC:
//!   `INVALID_ARGUMENT`).
//! - A request no route matches gets 404 (gRPC: `UNIMPLEMENTED`); a destination that cannot
//!   be reached, 503 (gRPC: `UNAVAILABLE`); a refusal by the destination's policy, 403 (gRPC:
//!   `PERMISSION_DENIED`). The body (gRPC message) says only that (`no route`, `access
//!   denied`, ...) unless [`HttpConfig::expose_refusal_reasons`]; the reason is in this
//!   side's access log and metrics.
//! - [`IDENTITY_HEADER`] is removed from every request: only the destination's proxy sets it.

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body as _, Incoming};
use hyper::service::service_fn;
use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, Protocol};
use mesh_core::policy;
use mesh_core::resolve::{FastPicker, HeaderModifier, Resolver, Target, Unresolved};
use tokio::time::Instant;
use tracing::debug;

use super::PodOutbound;
use super::connect::{ConnectError, Connector, Upstream, describe};
use crate::l7::deadline;
use crate::l7::retry::{MAX_RETRIES, RetryBudget, idempotent, retriable_status};
use crate::l7::upstream::{UpstreamError, Upstreams};
use crate::l7::version::{request_for, response_for};
use crate::l7::{
    Body, BoxIo, Headers, HttpConfig, IDENTITY_HEADER, Wire, empty, grpc_status, is_grpc,
    normalize_path, refusal, strip_hop_by_hop, upgrade,
};
use crate::state::Applied;
use crate::telemetry::{ConnMeta, Metered, RequestRecord, ResponseFlag, Telemetry};

/// What a pod's L7 requests share across its connections.
#[derive(Debug)]
pub(super) struct HttpShared {
    upstreams: Upstreams,
    budget: RetryBudget,
    config: HttpConfig,
}

impl HttpShared {
    pub(super) fn new(config: HttpConfig) -> HttpShared {
        HttpShared {
            upstreams: Upstreams::default(),
            budget: RetryBudget::default(),
            config,
        }
    }
}

/// One application connection on an L7 port, and what its requests need.
pub(super) struct HttpConn {
    pub pod: NamespacedName,
    pub src: SpiffeId,
    /// The connection's original destination.
    pub dst: SocketAddrV4,
    /// The declared protocol of the destination port: the version a destination without a
    /// proxy of its own is spoken to in.
    pub protocol: Protocol,
    pub resolver: Arc<Resolver>,
    pub applied: Arc<Applied>,
    pub connector: Connector,
    pub telemetry: Telemetry,
    pub shared: Arc<HttpShared>,
    /// The connection as the telemetry describes it (`reporter="source"`).
    pub meta: ConnMeta,
}

/// How one attempt ended.
enum Attempt {
    Response(Response<Body>),
    Failed(UpstreamError<ConnectError>),
    TimedOut(Duration),
    /// The gRPC call's deadline passed first.
    DeadlineExceeded,
}

impl PodOutbound {
    /// Serves the requests of an application connection to `dst`, an L7 port declared
    /// `protocol`.
    #[expect(
        clippy::too_many_arguments,
        reason = "one call site, each argument a different part of the connection"
    )]
    pub(super) async fn http(
        &self,
        conn: Metered<crate::app_socket::AppSocket>,
        dst: SocketAddrV4,
        protocol: Protocol,
        src: SpiffeId,
        resolver: Arc<Resolver>,
        applied: Arc<Applied>,
        meta: ConnMeta,
    ) {
        let http = Arc::new(HttpConn {
            pod: self.pod.clone(),
            src,
            dst,
            protocol,
            resolver,
            applied,
            connector: self.connector.clone(),
            telemetry: self.telemetry.clone(),
            shared: self.http.clone(),
            meta,
        });
        let handler = http.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request).await) }
        });
        if let Err(e) = crate::l7::serve(conn, service, self.idle_timeout, &self.telemetry).await {
            debug!(pod = %http.pod, dst = %dst, error = %e, "outbound HTTP connection ended");
        }
    }
}

impl HttpConn {
    async fn handle(&self, request: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let grpc = is_grpc(request.headers());
        let (mut parts, body) = request.into_parts();
        let client_version = parts.version;
        let call_deadline = deadline::of_request(&parts.headers, started);
        let mut requested_upgrade = upgrade::take(&mut parts);
        let method = parts.method.clone();
        let normalized = normalize_path(&mut parts, &self.shared.config.paths);
        let path = parts.uri.path().to_owned();
        let mut meta = self.meta.clone();
        let record = |meta: &ConnMeta,
                      status: u16,
                      grpc_code: Option<u16>,
                      flag: ResponseFlag,
                      route: Option<&str>,
                      attempts: u32,
                      reason: Option<&'static str>,
                      detail: Option<&str>| {
            self.telemetry.request(
                meta,
                &RequestRecord {
                    method: method.as_str(),
                    path: &path,
                    protocol: if grpc { "grpc" } else { "http" },
                    status,
                    grpc_status: grpc_code,
                    flag,
                    route,
                    duration: started.elapsed(),
                    attempts,
                    reason,
                    detail,
                },
            );
        };
        let refuse = |meta: &ConnMeta,
                      status: StatusCode,
                      grpc_code: u16,
                      flag: ResponseFlag,
                      route: Option<&str>,
                      attempts: u32,
                      reason: &'static str,
                      detail: &str| {
            let response = refusal(
                grpc,
                status,
                grpc_code,
                detail,
                self.shared.config.expose_refusal_reasons,
            );
            record(
                meta,
                response.status().as_u16(),
                grpc.then_some(grpc_code),
                flag,
                route,
                attempts,
                Some(reason),
                Some(detail),
            );
            response
        };

        if let Err(bad) = normalized {
            return refuse(
                &meta,
                StatusCode::BAD_REQUEST,
                grpc_status::INVALID_ARGUMENT,
                ResponseFlag::BadRequest,
                None,
                0,
                bad.kind(),
                &format!("bad path: {bad}"),
            );
        }
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(IDENTITY_HEADER);

        let retriable = idempotent(&method) && body.is_end_stream();
        self.shared.budget.request();
        let mut body = Some(crate::l7::boxed(body));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let routed = {
                let headers = Headers(&parts.headers);
                let view = policy::Request {
                    method: method.as_str(),
                    path: &path,
                    headers: &headers,
                };
                self.resolver
                    .route_request(&self.src, self.dst, &view, &mut FastPicker::new())
            };
            let route = match routed {
                Ok(r) => r,
                Err(e) => {
                    let (status, code, reason) = match &e {
                        Unresolved::NoRouteMatch { .. } => {
                            (StatusCode::NOT_FOUND, grpc_status::UNIMPLEMENTED, e.kind())
                        }
                        _ => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            grpc_status::UNAVAILABLE,
                            e.kind(),
                        ),
                    };
                    return refuse(
                        &meta,
                        status,
                        code,
                        ResponseFlag::NoRoute,
                        None,
                        attempts - 1,
                        reason,
                        &e.to_string(),
                    );
                }
            };
            let _lease = route.resolution.lease;
            let target = route.resolution.target;
            describe(
                &mut meta,
                &self.applied.snapshot,
                &target,
                self.connector.path_to(&target),
            );
            let mut request = rebuild(
                &method,
                &parts.uri,
                parts.version,
                &parts.headers,
                &route.request_headers,
                body.take().unwrap_or_else(empty),
            );
            let wire = self.wire(&target, client_version);
            if wire == Wire::Http1
                && let Some(u) = &requested_upgrade
            {
                u.restore(request.headers_mut());
            }
            // The route's timeout, or the gRPC call's deadline when it comes first.
            let left = call_deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let by_deadline = left.is_some_and(|l| route.timeout.is_none_or(|t| l <= t));
            let limit = if by_deadline { left } else { route.timeout };
            // An upgrade needs a connection of its own: it goes in a tunnel.
            let as_stream = requested_upgrade.is_none();
            let sent = self.send(&target, wire, &meta, request, as_stream);
            let attempt = match limit {
                Some(limit) => match tokio::time::timeout(limit, sent).await {
                    Ok(r) => r,
                    Err(_) if by_deadline => Attempt::DeadlineExceeded,
                    Err(_) => Attempt::TimedOut(limit),
                },
                None => sent.await,
            };
            let again = retriable
                && attempts <= MAX_RETRIES
                && match &attempt {
                    Attempt::Response(r) => retriable_status(r.status()),
                    Attempt::Failed(UpstreamError::Connect(e)) => !e.denied(),
                    Attempt::Failed(_) => true,
                    Attempt::TimedOut(_) | Attempt::DeadlineExceeded => false,
                }
                && self.shared.budget.try_retry();
            if again {
                debug!(pod = %self.pod, %method, path, attempts, "retrying");
                continue;
            }
            let route_name = route.route.as_deref();
            return match attempt {
                Attempt::Response(mut response) => {
                    let switch = match (wire, requested_upgrade.take()) {
                        (Wire::Http1, Some(u)) => u.accepted(&mut response),
                        _ => None,
                    };
                    response_for(&mut response, client_version);
                    let (mut head, body) = response.into_parts();
                    strip_hop_by_hop(&mut head.headers);
                    if let Some(switch) = switch {
                        switch.restore(&mut head.headers);
                        switch.splice();
                    }
                    let code = head
                        .headers
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse().ok());
                    let flag = if head.status == StatusCode::FORBIDDEN
                        && head.headers.contains_key("x-mesh-proxy")
                    {
                        ResponseFlag::Denied
                    } else {
                        ResponseFlag::None
                    };
                    record(
                        &meta,
                        head.status.as_u16(),
                        code,
                        flag,
                        route_name,
                        attempts,
                        None,
                        None,
                    );
                    let body = match call_deadline {
                        Some(at) => deadline::bounded(body, at),
                        None => body,
                    };
                    Response::from_parts(head, body)
                }
                Attempt::DeadlineExceeded => refuse(
                    &meta,
                    StatusCode::GATEWAY_TIMEOUT,
                    grpc_status::DEADLINE_EXCEEDED,
                    ResponseFlag::UpstreamTimeout,
                    route_name,
                    attempts,
                    "deadline_exceeded",
                    "no response within the call's deadline (grpc-timeout)",
                ),
                Attempt::TimedOut(limit) => refuse(
                    &meta,
                    StatusCode::GATEWAY_TIMEOUT,
                    grpc_status::DEADLINE_EXCEEDED,
                    ResponseFlag::UpstreamTimeout,
                    route_name,
                    attempts,
                    "timeout",
                    &format!("no response within the route's timeout of {limit:?}"),
                ),
                Attempt::Failed(UpstreamError::Connect(e)) if e.denied() => refuse(
                    &meta,
                    StatusCode::FORBIDDEN,
                    grpc_status::PERMISSION_DENIED,
                    ResponseFlag::Denied,
                    route_name,
                    attempts,
                    e.kind(),
                    &format!("denied: {e}"),
                ),
                Attempt::Failed(e) => {
                    let (flag, reason) = match &e {
                        UpstreamError::Connect(c) => (ResponseFlag::ConnectFailed, c.kind()),
                        UpstreamError::Handshake(_) => (ResponseFlag::ConnectFailed, "handshake"),
                        UpstreamError::Send(_) => (ResponseFlag::Io, "upstream_reset"),
                    };
                    refuse(
                        &meta,
                        StatusCode::SERVICE_UNAVAILABLE,
                        grpc_status::UNAVAILABLE,
                        flag,
                        route_name,
                        attempts,
                        reason,
                        &format!("no response: {e}"),
                    )
                }
            };
        }
    }

    /// The version a request of `client` version leaves in for `target`: a meshed pod's proxy
    /// takes the caller's version (and speaks the declared one to its application); an
    /// endpoint without a proxy is spoken to in the port's declared protocol; a destination
    /// outside the mesh, whose protocol nothing declares, in the caller's.
    fn wire(&self, target: &Target, client: Version) -> Wire {
        match target {
            Target::Plain { .. } if crate::l7::is_l7(self.protocol) => {
                Wire::of_protocol(self.protocol)
            }
            Target::Mesh { .. } | Target::Plain { .. } | Target::Passthrough { .. } => {
                Wire::of_version(client)
            }
        }
    }

    /// One attempt: the request as a stream of the pooled HBONE connection to a meshed pod
    /// of another node when `as_stream` and that pod's proxy takes requests so
    /// ([`crate::hbone::requests`]), else on a kept or new connection to the target.
    async fn send(
        &self,
        target: &Target,
        wire: Wire,
        meta: &ConnMeta,
        mut request: Request<Body>,
        as_stream: bool,
    ) -> Attempt {
        let addr = target.addr();
        if as_stream && let Some((hbone, identity)) = self.connector.remote_mesh(target) {
            let version = request.version();
            request_for(&mut request, Wire::Http2, self.dst);
            let sent = self
                .connector
                .pool
                .request(&self.src, hbone, identity, addr, request)
                .await;
            match sent {
                Ok(Ok(response)) => return Attempt::Response(response.map(crate::l7::boxed)),
                // The pod's proxy takes only tunnels: the request goes in one, in its own
                // version again.
                Ok(Err(back)) => {
                    request = back;
                    *request.version_mut() = version;
                }
                Err(source) => {
                    return Attempt::Failed(UpstreamError::Connect(ConnectError::Tunnel {
                        dst: addr,
                        source,
                    }));
                }
            }
        }
        let result = self
            .shared
            .upstreams
            .send(addr, wire, self.dst, request, || self.connect(target, meta))
            .await;
        match result {
            Ok(r) => Attempt::Response(r.map(crate::l7::boxed)),
            Err(e) => Attempt::Failed(e),
        }
    }

    /// A new connection to the target.
    async fn connect(&self, target: &Target, meta: &ConnMeta) -> Result<BoxIo, ConnectError> {
        self.connector
            .connect(&self.src, meta, target)
            .await
            .map(Upstream::boxed)
    }
}

/// The request of one attempt: the caller's head with the route's header changes.
fn rebuild(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    modifier: &HeaderModifier,
    body: Body,
) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.version_mut() = version;
    let mut headers = headers.clone();
    let parse = |name: &str, value: &str| {
        Some((
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(value).ok()?,
        ))
    };
    // In the order mesh-core documents: set, add, remove.
    for (n, v) in modifier.set.iter().filter_map(|(n, v)| parse(n, v)) {
        headers.insert(n, v);
    }
    for (n, v) in modifier.add.iter().filter_map(|(n, v)| parse(n, v)) {
        headers.append(n, v);
    }
    for name in &modifier.remove {
        headers.remove(name.as_str());
    }
    *request.headers_mut() = headers;
    request
}
