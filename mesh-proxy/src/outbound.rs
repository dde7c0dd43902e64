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
//! Connections on an L4 port and each request on an L7 port ([`requests`]) reach their
//! target the same way ([`connect`]) and fail with the same [`ConnectError`].
//!
//! The copy loop is [`crate::copy::relay`]: each direction is shut down on its own when its
//! reader ends (half-close both ways), with two buffers per connection sized for bulk
//! transfers, and the connection is closed once it carried nothing either way for the idle
//! timeout. Every connection is counted in the telemetry as `reporter="source"`.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_core::model::NamespacedName;
use mesh_core::resolve::{FastPicker, Resolver, Target};
use serde::Serialize;
use tokio::net::TcpStream;
use tracing::debug;

use crate::app_socket::AppSocket;
use crate::config::SameNode;
use crate::copy::{RelayError, relay, relay_watching};
use crate::hbone::HbonePool;
use crate::inbound::AppDialer;
use crate::l7::{HttpConfig, is_l7};
use crate::local::LocalPods;
use crate::state::{StateStore, Version};
use crate::telemetry::{
    ConnMeta, MeshPath, Metered, Peer, Reporter, ResponseFlag, Side, Telemetry,
};

pub use connect::{ConnectError, Upstream};
use connect::{Connector, describe};

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
    #[error("{pod} already has {limit} outbound connections open (the cap); connection refused")]
    ConnectionCap { pod: NamespacedName, limit: usize },
    #[error("{0}")]
    Connect(#[from] ConnectError),
    #[error("{0}")]
    Relay(#[from] RelayError),
}

impl OutboundError {
    pub fn kind(&self) -> &'static str {
        match self {
            OutboundError::UnknownPod { .. } => "unknown_pod",
            OutboundError::Unresolved(u) => u.kind(),
            OutboundError::ConnectionCap { .. } => "connection_cap",
            OutboundError::Connect(e) => e.kind(),
            OutboundError::Relay(e) => e.kind(),
        }
    }

    /// How the connection ends in the metrics' `response_flags`.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            OutboundError::UnknownPod { .. } | OutboundError::Unresolved(_) => {
                ResponseFlag::NoRoute
            }
            OutboundError::ConnectionCap { .. } => ResponseFlag::Overflow,
            OutboundError::Connect(e) => e.flag(),
            OutboundError::Relay(e) => e.flag(),
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
    /// How destinations are reached.
    connector: Connector,
    idle_timeout: Duration,
    same_node: SameNode,
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
            connector: Connector {
                pool,
                dial,
                egress: config.egress,
                local: None,
            },
            idle_timeout: config.idle_timeout,
            same_node: config.same_node,
            telemetry,
            resolver: Mutex::new(None),
            slots: Arc::new(tokio::sync::Semaphore::new(config.max_connections)),
            limit: config.max_connections,
            http: Arc::new(requests::HttpShared::new(config.http)),
        }
    }

    /// Reaches the pods of `local` in process, if the configuration's `same_node` says so.
    pub fn with_local_pods(mut self, local: Arc<LocalPods>) -> PodOutbound {
        if self.same_node == SameNode::InProcess {
            self.connector.local = Some(local);
        }
        self
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
        let conn = AppSocket::new(conn);
        // An HTTP port: each request is routed and balanced on its own, also when the port's
        // endpoints have no proxy (they get the requests in the port's declared protocol). A
        // meshed service's connection is labelled by the way its first endpoint is reached.
        let l7 = match &resolution.target {
            Target::Mesh { protocol, .. } if is_l7(*protocol) => Some(*protocol),
            Target::Plain { .. } if is_l7(applied.ports.service_port(dst)) => {
                Some(applied.ports.service_port(dst))
            }
            _ => None,
        };
        if let Some(protocol) = l7 {
            drop(lease.take());
            meta.path = self.connector.path_to(&resolution.target);
            meta.service = applied.ports.service_name(*dst.ip()).map(str::to_owned);
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
        let target = resolution.target;
        describe(
            &mut meta,
            snapshot,
            &target,
            self.connector.path_to(&target),
        );
        let upstream = match self.connector.connect(&src, &meta, &target).await {
            Ok(u) => u,
            Err(e) => {
                if e.denied() {
                    self.telemetry.denied(meta, e.kind(), &e);
                } else {
                    self.telemetry.failed(meta, e.flag(), e.kind(), &e);
                }
                return Err(e.into());
            }
        };
        debug!(pod = %self.pod, endpoint = %target.addr(), path = ?upstream.path(), "connected");
        let conn = Metered::new(conn, self.telemetry.open(meta), Side::Source);
        self.carry(conn, upstream).await
    }

    /// Copies between the application's connection and the upstream until both ends are
    /// done, or the connection sat idle for the idle timeout.
    async fn carry(
        &self,
        mut conn: Metered<AppSocket>,
        upstream: Upstream,
    ) -> Result<Carried, OutboundError> {
        let path = upstream.path();
        let copied = match upstream {
            Upstream::Hbone(mut tunnel) => relay(&mut conn, &mut tunnel, self.idle_timeout).await,
            Upstream::Direct(mut socket) => relay(&mut conn, &mut socket, self.idle_timeout).await,
            Upstream::SameNode(mut app) => {
                // A revocation at the destination closes the caller's side too.
                let destination = app.guard_mut().map(|g| g.activity());
                let copied =
                    relay_watching(&mut conn, &mut app, self.idle_timeout, destination).await;
                if let (Err(e), Some(guard)) = (&copied, app.guard_mut()) {
                    // The destination's report ends the way the source's does.
                    guard.fail(e.flag(), e.kind(), e);
                }
                copied
            }
        };
        let (sent, received) = copied?;
        Ok(Carried {
            path,
            sent,
            received,
        })
    }
}

mod connect;
mod requests;
#[cfg(test)]
mod tests;
