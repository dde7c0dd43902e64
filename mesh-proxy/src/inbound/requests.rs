//! Requests on an L7 port of a meshed pod: each one authorized on its own with the pod's
//! policy (the TrafficTarget rules whose HTTPRouteGroup matches), then passed to the
//! application with the caller's identity in [`IDENTITY_HEADER`], in the port's declared
//! protocol whatever version the caller spoke (see [`crate::l7`]).
//!
//! The request's path is normalized first ([`crate::l7::normalize_path`]): the policy matches
//! the normalized path and the application receives it; a path that cannot be normalized
//! safely gets 400 (gRPC: `INVALID_ARGUMENT`). A denied request gets 403 `access denied`
//! (gRPC: `PERMISSION_DENIED`, 7; the policy's reason only with
//! [`HttpConfig::expose_refusal_reasons`], always in the access log) and never reaches the
//! application; the connection stays open for the caller's next request. Each
//! caller connection has its own connection to the application, opened at its first request,
//! so HTTP/1.1 keep-alive and HTTP/2 multiplexing carry through as the caller uses them.

use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::service::service_fn;
use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, Protocol};
use mesh_core::policy::{self, Conn, Permit, authorize};
use tokio::time::Instant;
use tracing::debug;

use super::AppDialer;
use crate::l7::deadline;
use crate::l7::upstream::{UpstreamError, Upstreams};
use crate::l7::version::response_for;
use crate::l7::{
    Body, BoxIo, Headers, HttpConfig, IDENTITY_HEADER, Io, Wire, grpc_status, is_grpc,
    normalize_path, refusal, strip_hop_by_hop, upgrade,
};
use crate::state::StateStore;
use crate::telemetry::{ConnMeta, Metered, RequestRecord, ResponseFlag, Telemetry};

/// The L7 side of one admitted connection to a pod's port.
pub struct InboundHttp {
    pub pod: NamespacedName,
    pub store: Arc<StateStore>,
    pub dial: AppDialer,
    pub telemetry: Telemetry,
    /// The caller's identity; `None` for a plaintext caller.
    pub caller: Option<SpiffeId>,
    /// The application's address in the pod.
    pub target: SocketAddrV4,
    /// The port's declared protocol: the version the application is spoken to in.
    pub protocol: Protocol,
    /// The connection as the telemetry describes it (`reporter="destination"`).
    pub meta: ConnMeta,
    /// Path normalization and what refused callers are told.
    pub http: HttpConfig,
    app: Upstreams,
}

impl std::fmt::Debug for InboundHttp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundHttp")
            .field("pod", &self.pod)
            .field("caller", &self.caller)
            .field("target", &self.target)
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl InboundHttp {
    pub fn new(
        pod: NamespacedName,
        store: Arc<StateStore>,
        dial: AppDialer,
        telemetry: Telemetry,
        caller: Option<SpiffeId>,
        target: SocketAddrV4,
        meta: ConnMeta,
    ) -> InboundHttp {
        InboundHttp {
            pod,
            store,
            dial,
            telemetry,
            caller,
            target,
            protocol: Protocol::Http,
            meta,
            http: HttpConfig::default(),
            app: Upstreams::new(),
        }
    }

    /// Speaking `protocol`, the port's declared protocol, to the application (default:
    /// `http`, HTTP/1.1).
    pub fn with_protocol(mut self, protocol: Protocol) -> InboundHttp {
        self.protocol = protocol;
        self
    }

    /// With these path normalization and refusal settings (default: [`HttpConfig::default`]).
    pub fn with_http(mut self, http: HttpConfig) -> InboundHttp {
        self.http = http;
        self
    }

    /// Serves the caller's requests on `io` until the caller closes it, it stays idle for
    /// `idle`, or the drain ends it (see [`crate::l7::serve`]).
    pub async fn serve<I: Io>(self, io: Metered<I>, idle: Duration) {
        let this = Arc::new(self);
        let handler = this.clone();
        let service = service_fn(move |request| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler.handle(request).await) }
        });
        if let Err(e) = crate::l7::serve(io, service, idle, &this.telemetry).await {
            debug!(pod = %this.pod, dst = %this.target, error = %e, "inbound HTTP connection ended");
        }
    }

    /// Checks `request` and passes it on to the application: the answer, or the refusal.
    pub(crate) async fn handle<B>(&self, request: Request<B>) -> Response<Body>
    where
        B: hyper::body::Body<Data = bytes::Bytes> + Send + Sync + 'static,
        B::Error: Into<crate::l7::BoxError>,
    {
        let started = Instant::now();
        let grpc = is_grpc(request.headers());
        let (mut parts, body) = request.into_parts();
        let client_version = parts.version;
        let call_deadline = deadline::of_request(&parts.headers, started);
        let requested_upgrade = upgrade::take(&mut parts);
        let method = parts.method.as_str().to_owned();
        let normalized = normalize_path(&mut parts, &self.http.paths);
        let path = parts.uri.path().to_owned();
        let record = |status: u16,
                      grpc_code: Option<u16>,
                      flag: ResponseFlag,
                      route: Option<&str>,
                      reason: Option<&'static str>,
                      detail: Option<&str>| {
            self.telemetry.request(
                &self.meta,
                &RequestRecord {
                    method: &method,
                    path: &path,
                    protocol: if grpc { "grpc" } else { "http" },
                    status,
                    grpc_status: grpc_code,
                    flag,
                    route,
                    duration: started.elapsed(),
                    attempts: u32::from(reason.is_none()),
                    reason,
                    detail,
                },
            );
        };
        let refuse = |status: StatusCode,
                      grpc_code: u16,
                      flag: ResponseFlag,
                      reason: &'static str,
                      detail: &str| {
            let response = refusal(
                grpc,
                status,
                grpc_code,
                detail,
                self.http.expose_refusal_reasons,
            );
            let code = grpc.then_some(grpc_code);
            record(
                response.status().as_u16(),
                code,
                flag,
                None,
                Some(reason),
                Some(detail),
            );
            response
        };

        if let Err(bad) = normalized {
            return refuse(
                StatusCode::BAD_REQUEST,
                grpc_status::INVALID_ARGUMENT,
                ResponseFlag::BadRequest,
                bad.kind(),
                &format!("bad path: {bad}"),
            );
        }

        let config = self.store.current();
        let snapshot = &config.snapshot;
        let (Some(policy), Some(workload)) = (
            snapshot.policies.get(&self.pod),
            snapshot.workloads.get(&self.pod),
        ) else {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                grpc_status::UNAVAILABLE,
                ResponseFlag::NoRoute,
                "no_policy",
                &format!("no policy for {} yet", self.pod),
            );
        };
        let decision = {
            let headers = Headers(&parts.headers);
            let view = policy::Request {
                method: &method,
                path: &path,
                headers: &headers,
            };
            let conn = Conn {
                source: self.caller.as_ref(),
                port: self.target.port(),
                request: Some(&view),
            };
            authorize(policy, &conn)
                .map(|permit| route_label(&permit))
                .map_err(|denied| (denied.kind(), format!("denied: {denied}")))
        };
        let route = match decision {
            Ok(route) => route,
            Err((kind, detail)) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    grpc_status::PERMISSION_DENIED,
                    ResponseFlag::Denied,
                    kind,
                    &detail,
                );
            }
        };
        let identity = workload.identity.uri();
        drop(config);

        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(IDENTITY_HEADER);
        if let Some(caller) = &self.caller {
            let value = format!("By={identity};URI={}", caller.uri());
            if let Ok(v) = HeaderValue::from_str(&value) {
                parts.headers.insert(IDENTITY_HEADER, v);
            }
        }
        let wire = Wire::of_protocol(self.protocol);
        let requested_upgrade = requested_upgrade.filter(|_| wire == Wire::Http1);
        if let Some(u) = &requested_upgrade {
            u.restore(&mut parts.headers);
        }
        // The caller's connection stays here: it is held while a copy of its watch lives.
        parts.extensions.remove::<crate::l7::ConnWatch>();
        let upstream = Request::from_parts(parts, crate::l7::boxed(body));
        let dial = self.dial.clone();
        let target = self.target;
        let sent = self
            .app
            .send(target, wire, target, upstream, || async move {
                let stream = dial(target).await?;
                let _ = stream.set_nodelay(true);
                Ok::<BoxIo, std::io::Error>(Box::new(stream))
            });
        let sent = match call_deadline {
            Some(at) => match tokio::time::timeout_at(at, sent).await {
                Ok(sent) => sent,
                Err(_) => {
                    return refuse(
                        StatusCode::GATEWAY_TIMEOUT,
                        grpc_status::DEADLINE_EXCEEDED,
                        ResponseFlag::UpstreamTimeout,
                        "deadline_exceeded",
                        "no response within the call's deadline (grpc-timeout)",
                    );
                }
            },
            None => sent.await,
        };
        match sent {
            Ok(mut response) => {
                let switch = requested_upgrade.and_then(|u| u.accepted(&mut response));
                response_for(&mut response, client_version);
                let (mut parts, body) = response.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                if let Some(switch) = switch {
                    switch.restore(&mut parts.headers);
                    switch.splice();
                }
                let code = parts
                    .headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse().ok());
                record(
                    parts.status.as_u16(),
                    code,
                    ResponseFlag::None,
                    route.as_deref(),
                    None,
                    None,
                );
                let body = match call_deadline {
                    Some(at) => deadline::bounded(crate::l7::boxed(body), at),
                    None => crate::l7::boxed(body),
                };
                Response::from_parts(parts, body)
            }
            Err(e) => {
                let (flag, reason) = match &e {
                    UpstreamError::Connect(_) | UpstreamError::Handshake(_) => {
                        (ResponseFlag::ConnectFailed, "app_unreachable")
                    }
                    UpstreamError::Send(_) => (ResponseFlag::Io, "app_reset"),
                };
                refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    grpc_status::UNAVAILABLE,
                    flag,
                    reason,
                    &format!("the application at {target} did not answer: {e}"),
                )
            }
        }
    }
}

/// The `route` label of an allowed request on the destination's side: the rule that allowed it.
fn route_label(permit: &Permit<'_>) -> Option<String> {
    match permit {
        Permit::Permissive => None,
        Permit::Tcp { traffic_target } | Permit::HttpConnection { traffic_target } => {
            Some(format!("TrafficTarget {traffic_target}"))
        }
        Permit::Http {
            traffic_target,
            route,
        } => Some(format!("TrafficTarget {traffic_target}#{route}")),
    }
}
