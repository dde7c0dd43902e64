//! Outbound connections of a meshed pod: resolve the original destination with the
//! configuration in force, then carry the bytes in an HBONE tunnel to a meshed destination or
//! directly to one outside the mesh.
//!
//! A meshed destination that is a pod of this same agent ([`LocalPods`]) is reached without a
//! tunnel unless the pod's setting says `hbone`: its configured identity must be the one the
//! destination resolved to, it admits the connection exactly as it would an HBONE tunnel
//! (the caller being this pod's configured identity, which its certificate would name), and
//! the bytes are copied between the two pods' sockets. A refusal closes the connection at
//! once, as a refused tunnel does.
//!
//! The copy loop is [`crate::copy::relay`]: each direction is shut down on its own when its
//! reader ends (half-close both ways), with two buffers per connection sized for bulk
//! transfers, and the connection is closed once it carried nothing either way for the idle
//! timeout. Every connection is counted in the telemetry as `reporter="source"`.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::SpiffeId;
use mesh_core::model::NamespacedName;
use mesh_core::resolve::{FastPicker, Resolver, Target};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

use crate::config::SameNode;
use crate::copy::{RelayError, relay, relay_watching};
use crate::hbone::{HBONE_PORT, HboneError, HbonePool};
use crate::inbound::{AppDialer, Caller, Rejection};
use crate::l7::{HttpConfig, is_l7, service_port_protocol};
use crate::local::{LocalPod, LocalPods};
use crate::state::{StateStore, Version};
use crate::telemetry::{
    ConnMeta, MeshPath, Metered, Peer, Reporter, ResponseFlag, Side, Telemetry, endpoint_pod,
    service_host,
};

/// Default cap on a pod's concurrent outbound connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// What to do with destinations outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    Allow,
    Deny,
}

/// Why an outbound connection was not carried.
#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("{pod} is not a meshed pod of this node's configuration")]
    UnknownPod { pod: NamespacedName },
    #[error("{0}")]
    Unresolved(#[from] mesh_core::resolve::Unresolved),
    #[error("{dst} is outside the mesh and egress is denied")]
    EgressDenied { dst: SocketAddrV4 },
    #[error("tunnel to {dst}: {source}")]
    Tunnel {
        dst: SocketAddrV4,
        source: HboneError,
    },
    #[error("connect to {dst}: {source}")]
    Direct {
        dst: SocketAddrV4,
        source: std::io::Error,
    },
    #[error("{0}")]
    Relay(#[from] RelayError),
    #[error("{pod} already has {limit} outbound connections open (the cap); connection refused")]
    ConnectionCap { pod: NamespacedName, limit: usize },
    #[error(
        "{dst} is {pod} of this node, whose identity is {}, not {expected} as resolved; connection refused",
        found.as_ref().map_or_else(|| "not configured yet".to_string(), ToString::to_string)
    )]
    IdentityMismatch {
        dst: SocketAddrV4,
        pod: NamespacedName,
        expected: SpiffeId,
        found: Option<SpiffeId>,
    },
    #[error("{pod} at {dst} (same node) refused the connection: {rejection}")]
    SameNode {
        dst: SocketAddrV4,
        pod: NamespacedName,
        rejection: Rejection,
    },
}

impl OutboundError {
    pub fn kind(&self) -> &'static str {
        match self {
            OutboundError::UnknownPod { .. } => "unknown_pod",
            OutboundError::Unresolved(u) => u.kind(),
            OutboundError::EgressDenied { .. } => "egress_denied",
            OutboundError::Tunnel { .. } if self.destination_denied() => "destination_denied",
            OutboundError::Tunnel { .. } => "tunnel",
            OutboundError::Direct { .. } => "direct",
            OutboundError::Relay(e) => e.kind(),
            OutboundError::ConnectionCap { .. } => "connection_cap",
            OutboundError::IdentityMismatch { .. } => "identity_mismatch",
            OutboundError::SameNode { .. } if self.destination_denied() => "destination_denied",
            OutboundError::SameNode { rejection, .. } => rejection.kind,
        }
    }

    /// How the connection ends in the metrics' `response_flags`.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            OutboundError::UnknownPod { .. } | OutboundError::Unresolved(_) => {
                ResponseFlag::NoRoute
            }
            OutboundError::EgressDenied { .. } => ResponseFlag::Denied,
            OutboundError::Tunnel { .. } | OutboundError::SameNode { .. }
                if self.destination_denied() =>
            {
                ResponseFlag::Denied
            }
            OutboundError::Tunnel { .. }
            | OutboundError::Direct { .. }
            | OutboundError::IdentityMismatch { .. }
            | OutboundError::SameNode { .. } => ResponseFlag::ConnectFailed,
            OutboundError::Relay(e) => e.flag(),
            OutboundError::ConnectionCap { .. } => ResponseFlag::Overflow,
        }
    }

    /// The destination refused the connection by policy (for a tunnel: answered 403).
    fn destination_denied(&self) -> bool {
        match self {
            OutboundError::Tunnel {
                source: HboneError::Refused { status, .. },
                ..
            } => *status == crate::inbound::DENIED,
            OutboundError::SameNode { rejection, .. } => rejection.status == crate::inbound::DENIED,
            _ => false,
        }
    }
}

/// Bytes carried by one connection, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Carried {
    pub path: Path,
    pub sent: u64,
    pub received: u64,
}

/// Which way a connection went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Path {
    Hbone,
    /// To a pod of this agent, inside it.
    SameNode,
    Direct,
    /// Requests on an L7 port, each routed on its own (the connection-level counts are in
    /// the telemetry).
    Http,
}

/// Settings of a pod's outbound side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutboundConfig {
    pub egress: Egress,
    /// Cap on the pod's concurrent outbound connections.
    pub max_connections: usize,
    /// A connection that carries no byte either way for this long is closed.
    pub idle_timeout: Duration,
    /// How a destination that is a pod of this agent is reached (in process only with the
    /// agent's [`LocalPods`], see [`PodOutbound::with_local_pods`]).
    pub same_node: SameNode,
    /// Path normalization of L7 requests and what the pod is told of the proxy's refusals.
    pub http: HttpConfig,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        OutboundConfig {
            egress: Egress::Allow,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
            same_node: SameNode::InProcess,
            http: HttpConfig::default(),
        }
    }
}

/// The outbound side of one pod.
pub struct PodOutbound {
    pub pod: NamespacedName,
    pub store: Arc<StateStore>,
    pub pool: HbonePool,
    /// Opens sockets to destinations outside the mesh (in production: from the pod's netns).
    pub dial: AppDialer,
    pub egress: Egress,
    idle_timeout: Duration,
    same_node: SameNode,
    /// The pods of this agent, reached in process when `same_node` says so.
    local: Option<Arc<LocalPods>>,
    telemetry: Telemetry,
    resolver: Mutex<Option<(Option<Version>, Arc<Resolver>)>>,
    slots: Arc<tokio::sync::Semaphore>,
    limit: usize,
    /// Kept connections and the retry budget of the pod's L7 requests.
    http: Arc<requests::HttpShared>,
}

impl PodOutbound {
    pub fn new(
        pod: NamespacedName,
        store: Arc<StateStore>,
        pool: HbonePool,
        dial: AppDialer,
        config: OutboundConfig,
        telemetry: Telemetry,
    ) -> PodOutbound {
        PodOutbound {
            pod,
            store,
            pool,
            dial,
            egress: config.egress,
            idle_timeout: config.idle_timeout,
            same_node: config.same_node,
            local: None,
            telemetry,
            resolver: Mutex::new(None),
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            limit: config.max_connections,
            http: Arc::new(requests::HttpShared::new(config.http)),
        }
    }

    /// Reaches the pods of `local` in process, if the configuration's `same_node` says so.
    pub fn with_local_pods(mut self, local: Arc<LocalPods>) -> PodOutbound {
        self.local = Some(local);
        self
    }

    /// The pod of this agent at `ip`, when connections to it stay in process.
    fn local_pod(&self, ip: std::net::Ipv4Addr) -> Option<Arc<LocalPod>> {
        match self.same_node {
            SameNode::InProcess => self.local.as_ref()?.get(ip),
            SameNode::Hbone => None,
        }
    }

    /// The resolver of the configuration in force, rebuilt when the version changes (keeping
    /// the load balancer's outstanding counts).
    fn resolver(&self) -> (Arc<Resolver>, Arc<crate::state::Applied>) {
        let applied = self.store.current();
        let mut slot = match self.resolver.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((version, r)) = slot.as_ref()
            && *version == applied.version
        {
            return (r.clone(), applied);
        }
        let resolver = Arc::new(match slot.as_ref() {
            Some((_, previous)) => {
                Resolver::with_load_balancer(&applied.snapshot, previous.load_balancer().clone())
            }
            None => Resolver::new(&applied.snapshot),
        });
        *slot = Some((applied.version, resolver.clone()));
        (resolver, applied)
    }

    /// Carries one accepted application connection addressed to `dst`. Every outcome is
    /// recorded in the telemetry (`reporter="source"`).
    pub async fn handle(
        &self,
        conn: TcpStream,
        dst: SocketAddrV4,
    ) -> Result<Carried, OutboundError> {
        let (resolver, applied) = self.resolver();
        let snapshot = &applied.snapshot;
        let source = snapshot.workloads.get(&self.pod);
        let mut meta = ConnMeta::new(
            self.pod.clone(),
            Reporter::Source,
            MeshPath::Direct,
            SocketAddr::V4(dst),
        );
        meta.src = source.map_or_else(|| Peer::of_pod(&self.pod), Peer::of_workload);
        meta.src_addr = conn.peer_addr().ok();
        let refuse = |meta: ConnMeta, e: OutboundError| {
            self.telemetry.failed(meta, e.flag(), e.kind(), &e);
            e
        };
        let Ok(_slot) = self.slots.clone().try_acquire_owned() else {
            let e = OutboundError::ConnectionCap {
                pod: self.pod.clone(),
                limit: self.limit,
            };
            return Err(refuse(meta, e));
        };
        let Some(src) = source.map(|w| w.identity.clone()) else {
            let e = OutboundError::UnknownPod {
                pod: self.pod.clone(),
            };
            return Err(refuse(meta, e));
        };
        let resolution = match resolver.resolve(&src, dst, &mut FastPicker::new()) {
            Ok(r) => r,
            Err(e) => return Err(refuse(meta, e.into())),
        };
        let mut lease = resolution.lease;
        let _ = conn.set_nodelay(true);
        // An HTTP port: each request is routed and balanced on its own, also when the port's
        // endpoints have no proxy (they get the requests in the port's declared protocol). A
        // meshed service's connection is labelled by the way its first endpoint is reached.
        let l7 = match &resolution.target {
            Target::Mesh { protocol, addr, .. } if is_l7(*protocol) => {
                let path = match self.local_pod(*addr.ip()) {
                    Some(_) => MeshPath::SameNode,
                    None => MeshPath::Hbone,
                };
                Some((*protocol, Some(path)))
            }
            Target::Plain { .. } if is_l7(service_port_protocol(snapshot, dst)) => {
                Some((service_port_protocol(snapshot, dst), None))
            }
            _ => None,
        };
        if let Some((protocol, path)) = l7 {
            drop(lease.take());
            if let Some(path) = path {
                meta.path = path;
            }
            meta.service = resolver_service(snapshot, dst);
            let conn = Metered::new(conn, self.telemetry.open(meta.clone()), Side::Source);
            self.http(
                conn,
                dst,
                protocol,
                src,
                resolver.clone(),
                applied.clone(),
                meta,
            )
            .await;
            return Ok(Carried {
                path: Path::Http,
                sent: 0,
                received: 0,
            });
        }
        match resolution.target {
            Target::Mesh {
                addr,
                identity,
                service,
                backend,
                ..
            } => {
                let local = self.local_pod(*addr.ip());
                meta.path = match local {
                    Some(_) => MeshPath::SameNode,
                    None => MeshPath::Hbone,
                };
                meta.dst_addr = SocketAddr::V4(addr);
                meta.dst = Peer::of_identity(&identity);
                if let Some(pod) = endpoint_pod(snapshot, backend.as_ref(), *addr.ip()) {
                    meta.dst = Peer {
                        identity: Some(identity.clone()),
                        ..Peer::of_pod(&pod)
                    };
                }
                meta.service = service.as_ref().map(service_host);
                let caller = Caller {
                    identity: src.clone(),
                    path: MeshPath::SameNode,
                    peer: meta.src.clone(),
                    addr: meta.src_addr,
                };
                let conn = Metered::new(conn, self.telemetry.open(meta), Side::Source);
                match local {
                    Some(pod) => self.same_node(conn, caller, addr, &identity, &pod).await,
                    None => self.tunnel(conn, &src, addr, &identity).await,
                }
            }
            Target::Plain { addr, service } => {
                meta.dst_addr = SocketAddr::V4(addr);
                if let Some(pod) = endpoint_pod(snapshot, service.as_ref(), *addr.ip()) {
                    meta.dst = Peer::of_pod(&pod);
                }
                meta.service = service.as_ref().map(service_host);
                self.direct(conn, meta, addr).await
            }
            Target::Passthrough { addr } => match self.egress {
                Egress::Allow => self.direct(conn, meta, addr).await,
                Egress::Deny => {
                    let e = OutboundError::EgressDenied { dst: addr };
                    self.telemetry.denied(meta, e.kind(), &e);
                    Err(e)
                }
            },
        }
    }

    async fn tunnel(
        &self,
        mut conn: Metered<TcpStream>,
        src: &SpiffeId,
        addr: SocketAddrV4,
        identity: &SpiffeId,
    ) -> Result<Carried, OutboundError> {
        let hbone = SocketAddr::from((*addr.ip(), HBONE_PORT));
        let mut tunnel = match self
            .pool
            .connect(src, hbone, identity, SocketAddr::V4(addr))
            .await
        {
            Ok(t) => t,
            Err(source) => {
                let e = OutboundError::Tunnel { dst: addr, source };
                let guard = conn.guard_mut();
                if e.destination_denied() {
                    guard.deny(e.kind(), &e);
                } else {
                    guard.fail(e.flag(), e.kind(), &e);
                }
                return Err(e);
            }
        };
        debug!(pod = %self.pod, endpoint = %addr, dst.id = %identity, "tunnel open");
        self.carry(&mut conn, &mut tunnel, Path::Hbone).await
    }

    /// Carries a connection to `dst`, a pod of this agent, inside the agent: `dst` must be the
    /// `identity` the destination resolved to, and admits `caller` as it would a tunnel.
    async fn same_node(
        &self,
        mut conn: Metered<TcpStream>,
        caller: Caller,
        addr: SocketAddrV4,
        identity: &SpiffeId,
        dst: &LocalPod,
    ) -> Result<Carried, OutboundError> {
        let found = dst.identity();
        if found.as_ref() != Some(identity) {
            let e = OutboundError::IdentityMismatch {
                dst: addr,
                pod: dst.name().clone(),
                expected: identity.clone(),
                found,
            };
            conn.guard_mut().fail(e.flag(), e.kind(), &e);
            return Err(e);
        }
        let mut app = match dst.inbound.admit(caller, SocketAddr::V4(addr)).await {
            Ok(app) => app,
            Err(rejection) => {
                let e = OutboundError::SameNode {
                    dst: addr,
                    pod: dst.name().clone(),
                    rejection,
                };
                let guard = conn.guard_mut();
                if e.destination_denied() {
                    guard.deny(e.kind(), &e);
                } else {
                    guard.fail(e.flag(), e.kind(), &e);
                }
                return Err(e);
            }
        };
        debug!(pod = %self.pod, endpoint = %addr, dst.id = %identity, "same-node connection admitted");
        // A revocation at the destination closes the caller's side too.
        let destination = app.guard_mut().map(|g| g.activity());
        match relay_watching(&mut conn, &mut app, self.idle_timeout, destination).await {
            Ok((sent, received)) => Ok(Carried {
                path: Path::SameNode,
                sent,
                received,
            }),
            Err(e) => {
                // The destination's report ends the way the source's does.
                if let Some(guard) = app.guard_mut() {
                    guard.fail(e.flag(), e.kind(), &e);
                }
                Err(e.into())
            }
        }
    }

    async fn direct(
        &self,
        conn: TcpStream,
        meta: ConnMeta,
        addr: SocketAddrV4,
    ) -> Result<Carried, OutboundError> {
        let mut conn = Metered::new(conn, self.telemetry.open(meta), Side::Source);
        let mut upstream = match (self.dial)(addr).await {
            Ok(u) => u,
            Err(source) => {
                let e = OutboundError::Direct { dst: addr, source };
                conn.guard_mut().fail(e.flag(), e.kind(), &e);
                return Err(e);
            }
        };
        let _ = upstream.set_nodelay(true);
        self.carry(&mut conn, &mut upstream, Path::Direct).await
    }

    async fn carry<U>(
        &self,
        conn: &mut Metered<TcpStream>,
        upstream: &mut U,
        path: Path,
    ) -> Result<Carried, OutboundError>
    where
        U: AsyncRead + AsyncWrite + Unpin,
    {
        let (sent, received) = relay(conn, upstream, self.idle_timeout).await?;
        Ok(Carried {
            path,
            sent,
            received,
        })
    }
}

/// The DNS name of the service whose VIP is `dst`, for the connection's telemetry.
fn resolver_service(
    snapshot: &mesh_core::model::NodeSnapshot,
    dst: SocketAddrV4,
) -> Option<String> {
    snapshot
        .services
        .values()
        .find(|s| s.vip == Some(*dst.ip()))
        .map(|s| service_host(&s.name))
}

mod requests;
#[cfg(test)]
mod tests;
