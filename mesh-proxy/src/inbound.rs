//! Inbound admission for a meshed pod: who may open a connection to which of its ports.
//!
//! Both inbound paths end here: HBONE tunnels on 15008 (the caller's identity is the one its
//! verified certificate names) and plaintext connections steered to 15006 (no identity). The
//! decision itself is `mesh_core::policy::authorize` on the pod's compiled policy from the
//! configuration in force; this module adds what only the node knows: the CONNECT target must
//! be one of this pod's own addresses, and a pod the configuration does not (yet) know is
//! refused rather than let through.
//!
//! Connections from another pod of this agent carried inside it (see [`crate::local`]) are
//! admitted exactly as HBONE tunnels are, with the identity configured for the calling pod.
//!
//! All count their connections in [`Telemetry`] as `reporter="destination"`; refusals count
//! as denied with the [`Rejection`]'s kind. Each admitted connection records what it was
//! admitted on ([`Admission`]), so that when the configuration changes, [`recheck`] decides
//! again, the same way, whether it may stay open (see [`crate::revocation`]).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, NodeSnapshot, Protocol};
use mesh_core::policy::{Conn, Permit, authorize};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tokio::net::TcpStream;

use crate::copy::{RelayError, relay};
use crate::hbone::requests::RequestHandler;
use crate::hbone::{Carry, ConnectHandler, Refusal};
use crate::l7::{HttpConfig, is_l7};
use crate::state::{Applied, StateStore};
use crate::telemetry::{
    Admission, ConnGuard, ConnMeta, MeshPath, Metered, Peer, Reporter, ResponseFlag, Side,
    Telemetry,
};

pub mod probe;
mod requests;
mod streams;

pub use probe::NodeAddresses;

pub use requests::InboundHttp;

/// HTTP status for a policy refusal.
pub const DENIED: u16 = 403;
/// HTTP status when the pod or its application cannot take the connection.
pub const UNAVAILABLE: u16 = 503;
/// HTTP status for a CONNECT to an address that is not this pod's.
pub const MISDIRECTED: u16 = 421;

/// The [`Rejection`] kind of a connection allowed only request by request on a port whose
/// requests the proxy does not parse.
pub const HTTP_RULES_ON_L4_PORT: &str = "http_rules_on_l4_port";

/// The [`Rejection`] kind of a request sent as a stream ([`crate::hbone::requests`]) for a
/// port that is not L7.
pub const NOT_AN_HTTP_PORT: &str = "not_an_http_port";

/// How long an admitted connection waits for the application to accept. Shorter than the
/// HBONE server's bound on the whole CONNECT, so the refusal is recorded with its reason.
pub const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an inbound connection is refused: the HTTP status an HBONE caller gets, a stable
/// `kind` for metrics, and the reason in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Rejection {
    pub status: u16,
    /// `not_ipv4`, `unknown_pod`, `misdirected`, `no_policy`, or the policy's own kind
    /// (`plaintext_strict`, `unauthenticated`, `no_traffic_target`, `port_not_covered`,
    /// `no_http_match`).
    pub kind: &'static str,
    pub reason: String,
}

impl Rejection {
    fn new(status: u16, kind: &'static str, reason: impl Into<String>) -> Rejection {
        Rejection {
            status,
            kind,
            reason: reason.into(),
        }
    }
}

impl Rejection {
    /// The HBONE refusal the caller gets: the status, and the reason only when `expose` (see
    /// [`HttpConfig::expose_refusal_reasons`]); the destination records it either way.
    pub fn refusal(self, expose: bool) -> Refusal {
        Refusal::new(
            self.status,
            if expose { self.reason } else { String::new() },
        )
    }
}

/// Decides an HBONE CONNECT from `peer` to `authority` for `pod`. On success, the address of
/// the application to connect to.
pub fn admit_hbone(
    config: &Applied,
    pod: &NamespacedName,
    peer: &SpiffeId,
    authority: SocketAddr,
) -> Result<SocketAddrV4, Rejection> {
    let SocketAddr::V4(target) = authority else {
        return Err(Rejection::new(
            MISDIRECTED,
            "not_ipv4",
            "IPv4 destinations only",
        ));
    };
    let workload = config.snapshot.workloads.get(pod).ok_or_else(|| {
        Rejection::new(
            UNAVAILABLE,
            "unknown_pod",
            format!("{pod} is not a meshed pod on this node"),
        )
    })?;
    if !workload.ips.contains(target.ip()) {
        return Err(Rejection::new(
            MISDIRECTED,
            "misdirected",
            format!("{} is not an address of {pod}", target.ip()),
        ));
    }
    let policy = config.snapshot.policies.get(pod).ok_or_else(|| {
        Rejection::new(UNAVAILABLE, "no_policy", format!("no policy for {pod} yet"))
    })?;
    let conn = Conn {
        source: Some(peer),
        port: target.port(),
        request: None,
    };
    let permit = authorize(policy, &conn)
        .map_err(|denied| Rejection::new(DENIED, denied.kind(), denied.to_string()))?;
    check_requests_checkable(config, pod, target.port(), &permit)?;
    Ok(target)
}

/// A connection admitted only so its HTTP requests can be checked one by one
/// ([`Permit::HttpConnection`]) needs a port whose requests the proxy parses: on an L4 port
/// nothing could check them, so the connection is refused rather than let through whole.
fn check_requests_checkable(
    config: &Applied,
    pod: &NamespacedName,
    port: u16,
    permit: &Permit<'_>,
) -> Result<(), Rejection> {
    if !permit.requires_request_checks() || is_l7(config.ports.pod_port(pod, port)) {
        return Ok(());
    }
    Err(Rejection::new(
        DENIED,
        HTTP_RULES_ON_L4_PORT,
        format!(
            "{permit}, but port {port} of {pod} is not declared HTTP, HTTP/2 or gRPC (service \
             appProtocol or port name), so its requests cannot be checked"
        ),
    ))
}

/// Decides a plaintext connection (steered to 15006) to `dst` of `pod`: STRICT pods refuse
/// it, PERMISSIVE pods let policy decide with an unauthenticated caller.
pub fn admit_plaintext(
    config: &Applied,
    pod: &NamespacedName,
    dst: SocketAddrV4,
) -> Result<(), Rejection> {
    let policy = config.snapshot.policies.get(pod).ok_or_else(|| {
        Rejection::new(UNAVAILABLE, "no_policy", format!("no policy for {pod} yet"))
    })?;
    let conn = Conn {
        source: None,
        port: dst.port(),
        request: None,
    };
    let permit = authorize(policy, &conn)
        .map_err(|denied| Rejection::new(DENIED, denied.kind(), denied.to_string()))?;
    check_requests_checkable(config, pod, dst.port(), &permit)
}

/// Decides again, on the configuration `config`, whether a connection to `pod` admitted on
/// `admission` (by [`admit_hbone`] or [`admit_plaintext`]) with the destination `authority`
/// may stay open: the same decision, with the caller's recorded identity (none for
/// plaintext) and port. A connection whose requests are checked one by one keeps being
/// carried that way, so a port's declared protocol is not asked again.
pub fn recheck(
    config: &Applied,
    pod: &NamespacedName,
    authority: SocketAddr,
    admission: &Admission,
) -> Result<(), Rejection> {
    let decided = match (&admission.caller, authority) {
        (None, _) if admission.node_probe => {
            if probe::is_probe_port(&config.snapshot, pod, authority.port()) {
                Ok(())
            } else {
                Err(Rejection::new(
                    DENIED,
                    "not_a_probe_port",
                    format!(
                        "port {} of {pod} is no longer one the kubelet probes",
                        authority.port()
                    ),
                ))
            }
        }
        (Some(caller), _) => admit_hbone(config, pod, caller, authority).map(drop),
        (None, SocketAddr::V4(dst)) => admit_plaintext(config, pod, dst),
        (None, SocketAddr::V6(_)) => Err(Rejection::new(
            MISDIRECTED,
            "not_ipv4",
            "IPv4 destinations only",
        )),
    };
    match decided {
        Err(r) if r.kind == HTTP_RULES_ON_L4_PORT && admission.requests_checked => Ok(()),
        other => other,
    }
}

/// Confirms a connection just registered in the telemetry table (`guard`) on the configuration
/// in force now, when that is not `decided_on`, the one its admission was decided on: the
/// re-check of a change applied in between could not see the connection yet
/// ([`crate::revocation`]). Refused, it is recorded as denied.
fn confirm(
    store: &StateStore,
    decided_on: &Arc<Applied>,
    guard: &mut ConnGuard,
    pod: &NamespacedName,
    authority: SocketAddr,
    admission: &Admission,
) -> Result<(), Rejection> {
    let now = store.current();
    if Arc::ptr_eq(&now, decided_on) {
        return Ok(());
    }
    recheck(&now, pod, authority, admission).inspect_err(|r| guard.deny(r.kind, &r.reason))
}

/// How the inbound handler reaches the application (in production: a socket made in the
/// pod's network namespace).
pub type AppDialer = Arc<
    dyn Fn(SocketAddrV4) -> futures::future::BoxFuture<'static, std::io::Result<TcpStream>>
        + Send
        + Sync,
>;

/// The pod itself as the destination of an inbound connection.
fn local_peer(config: &NodeSnapshot, pod: &NamespacedName) -> Peer {
    config
        .workloads
        .get(pod)
        .map_or_else(|| Peer::of_pod(pod), Peer::of_workload)
}

// === Identified callers ===

/// The admission of one meshed pod for callers with an identity: HBONE tunnels on its 15008
/// (the handler of that listener) and connections from other pods of this agent carried
/// inside it ([`crate::local`]).
#[derive(Clone)]
pub struct PodInbound {
    pub pod: NamespacedName,
    pub store: Arc<StateStore>,
    pub dial: AppDialer,
    pub telemetry: Telemetry,
    pub http: HttpConfig,
    /// How long an admitted connection may stay without a byte either way (the operator's
    /// `--idle-timeout`; HTTP connections included).
    pub idle_timeout: Duration,
}

/// Who is calling, as the destination reports it.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The identity admission decides on: the one the caller's certificate proves (HBONE) or
    /// the one configured for the calling pod (same node).
    pub identity: SpiffeId,
    /// How the connection reaches this pod.
    pub path: MeshPath,
    /// What else is known of the caller (same node: its workload).
    pub peer: Peer,
    pub addr: Option<SocketAddr>,
}

impl Caller {
    /// A caller known by the identity its certificate proves.
    pub fn hbone(identity: SpiffeId) -> Caller {
        Caller {
            peer: Peer::of_identity(&identity),
            identity,
            path: MeshPath::Hbone,
            addr: None,
        }
    }
}

impl PodInbound {
    /// Admits a connection from `caller` to `authority` with [`admit_hbone`], then connects
    /// to the application. Either way the connection is recorded as `reporter="destination"`
    /// (a refusal as denied with the rejection's kind); on success the returned stream
    /// carries the connection's accounting.
    ///
    /// On an L7 port the returned stream leads to the pod's [`InboundHttp`], which checks and
    /// passes on each request; on any other port, to the application itself.
    pub async fn admit(
        &self,
        caller: Caller,
        authority: SocketAddr,
    ) -> Result<InboundStream, Rejection> {
        match self.admit_carried(caller, authority).await? {
            Admitted::App(app) => Ok(InboundStream::Tcp(app)),
            Admitted::Http(http) => {
                let (near, far) = tokio::io::duplex(HTTP_PIPE_BUFFER);
                let (http, guard, idle) = *http;
                tokio::spawn(http.serve(Metered::new(far, guard, Side::Source), idle));
                Ok(InboundStream::Http(near))
            }
        }
    }

    /// [`PodInbound::admit`] up to how the connection is carried: to the application it is
    /// connected to, or by the pod's [`InboundHttp`] with the connection's accounting.
    async fn admit_carried(
        &self,
        caller: Caller,
        authority: SocketAddr,
    ) -> Result<Admitted, Rejection> {
        let decided = self.decide(caller, authority, false)?;
        if is_l7(decided.protocol) {
            return Ok(Admitted::Http(Box::new((
                self.http_handler(&decided),
                decided.guard,
                self.idle_timeout,
            ))));
        }
        let Decided {
            target, mut guard, ..
        } = decided;
        let dialed = tokio::time::timeout(APP_CONNECT_TIMEOUT, (self.dial)(target))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {APP_CONNECT_TIMEOUT:?}"),
                ))
            });
        match dialed {
            Ok(app) => Ok(Admitted::App(Metered::new(app, guard, Side::Destination))),
            Err(e) => {
                let rejection = Rejection::new(
                    UNAVAILABLE,
                    "app_unreachable",
                    format!("the application at {target} is not reachable: {e}"),
                );
                guard.fail(
                    ResponseFlag::ConnectFailed,
                    rejection.kind,
                    &rejection.reason,
                );
                Err(rejection)
            }
        }
    }

    /// Admits `caller` on `authority` for requests it sends as streams of its HBONE
    /// connection ([`crate::hbone::requests`]): decided as a tunnel is, and recorded as one
    /// connection whose requests the returned handler checks one by one. Only on an L7 port:
    /// on another there are no requests to check.
    pub(crate) fn admit_requests(
        &self,
        caller: Caller,
        authority: SocketAddr,
    ) -> Result<(InboundHttp, ConnGuard), Rejection> {
        let decided = self.decide(caller, authority, true)?;
        Ok((self.http_handler(&decided), decided.guard))
    }

    fn http_handler(&self, decided: &Decided) -> InboundHttp {
        InboundHttp::new(
            self.pod.clone(),
            self.store.clone(),
            self.dial.clone(),
            self.telemetry.clone(),
            Some(decided.caller.clone()),
            decided.target,
            decided.meta.clone(),
        )
        .with_protocol(decided.protocol)
        .with_http(self.http)
    }

    /// The admission decision for `caller` on `authority`, recorded in the telemetry either
    /// way; with `requests_only`, a port that is not L7 is refused.
    fn decide(
        &self,
        caller: Caller,
        authority: SocketAddr,
        requests_only: bool,
    ) -> Result<Decided, Rejection> {
        let config = self.store.current();
        let mut meta = ConnMeta::new(
            self.pod.clone(),
            Reporter::Destination,
            caller.path,
            authority,
        );
        meta.src = caller.peer;
        meta.src_addr = caller.addr;
        meta.dst = local_peer(&config.snapshot, &self.pod);
        let target = match admit_hbone(&config, &self.pod, &caller.identity, authority) {
            Ok(t) => t,
            Err(rejection) => {
                self.telemetry
                    .denied(meta, rejection.kind, &rejection.reason);
                return Err(rejection);
            }
        };
        let protocol = config.ports.pod_port(&self.pod, target.port());
        let l7 = is_l7(protocol);
        if requests_only && !l7 {
            let rejection = Rejection::new(
                MISDIRECTED,
                NOT_AN_HTTP_PORT,
                format!(
                    "a request sent as a stream for port {} of {}, which is not declared HTTP, \
                     HTTP/2 or gRPC",
                    target.port(),
                    self.pod
                ),
            );
            self.telemetry
                .denied(meta, rejection.kind, &rejection.reason);
            return Err(rejection);
        }
        let admission = Admission {
            caller: Some(caller.identity.clone()),
            requests_checked: l7,
            node_probe: false,
        };
        meta.admission = Some(admission.clone());
        let mut guard = self.telemetry.open(meta.clone());
        confirm(
            &self.store,
            &config,
            &mut guard,
            &self.pod,
            authority,
            &admission,
        )?;
        Ok(Decided {
            caller: caller.identity,
            target,
            protocol,
            meta,
            guard,
        })
    }
}

/// An admitted connection, recorded, before it is connected or served.
struct Decided {
    caller: SpiffeId,
    target: SocketAddrV4,
    protocol: Protocol,
    meta: ConnMeta,
    guard: ConnGuard,
}

/// An admitted connection, before it is carried.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One per connection, moved once.
pub enum Admitted {
    /// Connected to the application (L4).
    App(Metered<TcpStream>),
    /// For the pod's request handler (L7), with the connection's accounting and idle timeout.
    Http(Box<(InboundHttp, ConnGuard, Duration)>),
}

/// Only [`Admitted::App`] carries bytes itself; an HBONE stream for [`Admitted::Http`] is
/// handed to the request handler by [`ConnectHandler::carry`] and never read through this.
impl AsyncRead for Admitted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Admitted::App(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Admitted::Http(_) => std::task::Poll::Ready(Err(not_a_stream())),
        }
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Admitted::App(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Admitted::Http(_) => std::task::Poll::Ready(Err(not_a_stream())),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Admitted::App(s) => std::pin::Pin::new(s).poll_flush(cx),
            Admitted::Http(_) => std::task::Poll::Ready(Err(not_a_stream())),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Admitted::App(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Admitted::Http(_) => std::task::Poll::Ready(Err(not_a_stream())),
        }
    }
}

fn not_a_stream() -> std::io::Error {
    std::io::Error::other("an L7 connection is served by its request handler, not copied")
}

/// Buffer of the in-memory pipe between an admitted connection and its [`InboundHttp`].
const HTTP_PIPE_BUFFER: usize = 256 * 1024;

/// Where an admitted connection leads: the application (L4), or the pod's request handler.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One per connection, never moved around in bulk.
pub enum InboundStream {
    Tcp(Metered<TcpStream>),
    Http(DuplexStream),
}

impl InboundStream {
    /// The connection's accounting on this side, when it is kept here (L4).
    pub fn guard_mut(&mut self) -> Option<&mut ConnGuard> {
        match self {
            InboundStream::Tcp(s) => Some(s.guard_mut()),
            InboundStream::Http(_) => None,
        }
    }
}

impl AsyncRead for InboundStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            InboundStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            InboundStream::Http(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for InboundStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            InboundStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            InboundStream::Http(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            InboundStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            InboundStream::Http(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            InboundStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            InboundStream::Http(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl ConnectHandler for PodInbound {
    type Io = Admitted;

    async fn connect(&self, peer: SpiffeId, authority: SocketAddr) -> Result<Self::Io, Refusal> {
        let expose = self.http.expose_refusal_reasons;
        self.admit_carried(Caller::hbone(peer), authority)
            .await
            .map_err(|r| r.refusal(expose))
    }

    /// Requests sent as streams of the connection are checked and passed on one by one
    /// ([`streams`]).
    fn requests(&self, peer: &SpiffeId) -> Option<Arc<dyn RequestHandler>> {
        Some(Arc::new(streams::PodRequests::new(
            self.clone(),
            peer.clone(),
        )))
    }

    /// Requests on an L7 port are read straight off the HBONE stream. Other connections are
    /// spliced to the application until they end or are cut (the drain, a policy change).
    fn carry(io: Admitted) -> Carry<Admitted> {
        match io {
            Admitted::Http(http) => Carry::Serve(Box::new(move |stream| {
                let (http, guard, idle) = *http;
                Box::pin(http.serve(Metered::new(stream, guard, Side::Source), idle))
            })),
            Admitted::App(app) => {
                let activity = app.guard().activity();
                let cut = Box::pin(async move {
                    activity.cut().await;
                });
                Carry::SpliceUntil(Admitted::App(app), cut)
            }
        }
    }
}

// === Plaintext ===

/// Where a connection accepted on the inbound listener was going: its local address, which
/// sk_lookup leaves as the pod's `ip:port`. A connection opened to the listener directly
/// (`127.0.0.1:15006` from inside the pod) has no destination of its own: carrying it "to its
/// local address" would dial the listener again, in a loop that ends when the agent runs out
/// of descriptors. It is refused.
pub fn steered_destination(
    local: Option<SocketAddr>,
    pod_ip: Ipv4Addr,
) -> Result<SocketAddrV4, PlaintextError> {
    match local {
        Some(SocketAddr::V4(dst)) if *dst.ip() == pod_ip => Ok(dst),
        Some(SocketAddr::V4(local)) => Err(PlaintextError::NotSteered { local }),
        _ => Err(PlaintextError::NotIpv4),
    }
}

/// Closes with a reset: the caller sees a refusal at once, not an empty answer.
pub fn refuse_now(conn: &TcpStream) {
    let _ = socket2::SockRef::from(conn).set_linger(Some(Duration::ZERO));
}

/// Why a plaintext inbound connection was not carried to its end.
#[derive(Debug, thiserror::Error)]
pub enum PlaintextError {
    #[error("the connection has no IPv4 local address")]
    NotIpv4,
    #[error(
        "connection made to the inbound listener itself ({local}), not steered to the pod: \
         refused (forwarding it would make the proxy dial itself)"
    )]
    NotSteered { local: SocketAddrV4 },
    #[error("refused: {0}")]
    Refused(Rejection),
    #[error("connect to the application at {dst}: {source}")]
    Unreachable {
        dst: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("{0}")]
    Relay(#[from] RelayError),
}

impl PlaintextError {
    pub fn kind(&self) -> &'static str {
        match self {
            PlaintextError::NotIpv4 => "not_ipv4",
            PlaintextError::NotSteered { .. } => "not_steered",
            PlaintextError::Refused(r) => r.kind,
            PlaintextError::Unreachable { .. } => "app_unreachable",
            PlaintextError::Relay(e) => e.kind(),
        }
    }
}

/// Plaintext connections to one pod (steered to its 15006): admitted by the pod's TLS mode
/// and policy, then carried to the application, or closed at once.
pub struct PlaintextInbound {
    pub pod: NamespacedName,
    /// The pod's address: where every steered connection was going.
    pub ip: Ipv4Addr,
    pub store: Arc<StateStore>,
    pub dial: AppDialer,
    pub telemetry: Telemetry,
    pub idle_timeout: Duration,
    pub http: HttpConfig,
    /// The node's own addresses: where the kubelet's probes come from.
    pub node: NodeAddresses,
}

impl PlaintextInbound {
    /// Carries one accepted connection. Returns the bytes carried (to the application, back
    /// from it).
    pub async fn handle(&self, conn: TcpStream) -> Result<(u64, u64), PlaintextError> {
        let dst = match steered_destination(conn.local_addr().ok(), self.ip) {
            Ok(dst) => dst,
            Err(e) => {
                refuse_now(&conn);
                return Err(e);
            }
        };
        let config = self.store.current();
        let mut meta = ConnMeta::new(
            self.pod.clone(),
            Reporter::Destination,
            MeshPath::Plaintext,
            SocketAddr::V4(dst),
        );
        meta.src_addr = conn.peer_addr().ok();
        meta.dst = local_peer(&config.snapshot, &self.pod);
        let node_probe =
            probe::is_node_probe(&config.snapshot, &self.pod, meta.src_addr, dst, &self.node);
        if !node_probe && let Err(rejection) = admit_plaintext(&config, &self.pod, dst) {
            self.telemetry
                .denied(meta, rejection.kind, &rejection.reason);
            return Err(PlaintextError::Refused(rejection));
        }
        let protocol = config.ports.pod_port(&self.pod, dst.port());
        // A probe is carried as it comes: no request of it is checked against policy.
        let l7 = is_l7(protocol) && !node_probe;
        let admission = Admission {
            caller: None,
            requests_checked: l7,
            node_probe,
        };
        meta.admission = Some(admission.clone());
        let authority = SocketAddr::V4(dst);
        let mut conn = Metered::new(conn, self.telemetry.open(meta.clone()), Side::Source);
        confirm(
            &self.store,
            &config,
            conn.guard_mut(),
            &self.pod,
            authority,
            &admission,
        )
        .map_err(PlaintextError::Refused)?;
        if l7 {
            let http = InboundHttp::new(
                self.pod.clone(),
                self.store.clone(),
                self.dial.clone(),
                self.telemetry.clone(),
                None,
                dst,
                meta,
            )
            .with_protocol(protocol)
            .with_http(self.http);
            http.serve(conn, self.idle_timeout).await;
            return Ok((0, 0));
        }
        let mut app = match (self.dial)(dst).await {
            Ok(app) => app,
            Err(source) => {
                let e = PlaintextError::Unreachable { dst, source };
                conn.guard_mut()
                    .fail(ResponseFlag::ConnectFailed, e.kind(), &e);
                return Err(e);
            }
        };
        relay(&mut conn, &mut app, self.idle_timeout)
            .await
            .map_err(PlaintextError::from)
    }
}

#[cfg(test)]
mod tests;
