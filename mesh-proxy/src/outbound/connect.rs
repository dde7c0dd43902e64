//! From a resolved target to a connection: the one way a pod's outbound side reaches a
//! destination, for its L4 connections and for each of its L7 requests alike.
//!
//! - A meshed pod of this agent (when the configuration keeps same-node connections in
//!   process): its configured identity must be the one the target resolved to, and it admits
//!   the caller exactly as it would an HBONE tunnel.
//! - Any other meshed pod: an HBONE tunnel to its proxy on 15008 (a stream of the pooled
//!   mutual-TLS connection), the peer's certificate checked against the resolved identity.
//! - A destination without a proxy: a plain connection from the pod's network namespace;
//!   one outside the mesh only when egress is allowed.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, NodeSnapshot};
use mesh_core::resolve::Target;
use tokio::net::TcpStream;

use super::{Egress, Path};
use crate::hbone::{HBONE_PORT, HboneError, HbonePool, HboneStream};
use crate::inbound::{AppDialer, Caller, DENIED, InboundStream, Rejection};
use crate::l7::BoxIo;
use crate::local::{LocalPod, LocalPods};
use crate::telemetry::{ConnMeta, MeshPath, Peer, ResponseFlag, endpoint_pod, service_host};

/// Why no connection to a target could be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
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

impl ConnectError {
    /// Refused by policy: egress denied here, or the destination's answer (a tunnel's 403,
    /// a same-node pod's denial).
    pub fn denied(&self) -> bool {
        match self {
            ConnectError::EgressDenied { .. } => true,
            ConnectError::Tunnel {
                source: HboneError::Refused { status, .. },
                ..
            } => *status == DENIED,
            ConnectError::SameNode { rejection, .. } => rejection.status == DENIED,
            _ => false,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::EgressDenied { .. } => "egress_denied",
            _ if self.denied() => "destination_denied",
            ConnectError::Tunnel { .. } => "tunnel",
            ConnectError::Direct { .. } => "direct",
            ConnectError::IdentityMismatch { .. } => "identity_mismatch",
            ConnectError::SameNode { rejection, .. } => rejection.kind,
        }
    }

    /// How the connection ends in the metrics' `response_flags`.
    pub fn flag(&self) -> ResponseFlag {
        if self.denied() {
            ResponseFlag::Denied
        } else {
            ResponseFlag::ConnectFailed
        }
    }
}

/// A connection to a target, by the way it was reached.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // One per connection, never moved around in bulk.
pub enum Upstream {
    Hbone(HboneStream),
    /// Admitted by a pod of this agent.
    SameNode(InboundStream),
    Direct(TcpStream),
}

impl Upstream {
    pub fn path(&self) -> Path {
        match self {
            Upstream::Hbone(_) => Path::Hbone,
            Upstream::SameNode(_) => Path::SameNode,
            Upstream::Direct(_) => Path::Direct,
        }
    }

    pub fn boxed(self) -> BoxIo {
        match self {
            Upstream::Hbone(s) => Box::new(s),
            Upstream::SameNode(s) => Box::new(s),
            Upstream::Direct(s) => Box::new(s),
        }
    }
}

/// What a pod's outbound side opens connections with.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) pool: HbonePool,
    /// Opens sockets to destinations without a proxy (in production: from the pod's netns).
    pub(super) dial: AppDialer,
    pub(super) egress: Egress,
    /// The pods of this agent reached in process; `None` when same-node connections take
    /// HBONE too.
    pub(super) local: Option<Arc<LocalPods>>,
}

impl Connector {
    /// The pod of this agent at `ip`, when connections to it stay in process.
    pub(super) fn local_pod(&self, ip: Ipv4Addr) -> Option<Arc<LocalPod>> {
        self.local.as_ref()?.get(ip)
    }

    /// The HBONE port and identity of `target` when it is a meshed pod reached through the
    /// pool (one of another node, or of this one when same-node connections take HBONE).
    pub(super) fn remote_mesh<'t>(&self, target: &'t Target) -> Option<(SocketAddr, &'t SpiffeId)> {
        match target {
            Target::Mesh { addr, identity, .. } if self.local_pod(*addr.ip()).is_none() => {
                Some((SocketAddr::from((*addr.ip(), HBONE_PORT)), identity))
            }
            _ => None,
        }
    }

    /// The way a connection to `target` goes, for the telemetry.
    pub(super) fn path_to(&self, target: &Target) -> MeshPath {
        match target {
            Target::Mesh { addr, .. } if self.local_pod(*addr.ip()).is_some() => MeshPath::SameNode,
            Target::Mesh { .. } => MeshPath::Hbone,
            Target::Plain { .. } | Target::Passthrough { .. } => MeshPath::Direct,
        }
    }

    /// Opens a connection to `target` for the pod whose identity is `src`; `meta` describes
    /// the caller to a same-node destination.
    pub(super) async fn connect(
        &self,
        src: &SpiffeId,
        meta: &ConnMeta,
        target: &Target,
    ) -> Result<Upstream, ConnectError> {
        match target {
            Target::Mesh { addr, identity, .. } => {
                let addr = *addr;
                match self.local_pod(*addr.ip()) {
                    Some(pod) => self.same_node(src, meta, addr, identity, &pod).await,
                    None => {
                        let hbone = SocketAddr::from((*addr.ip(), HBONE_PORT));
                        self.pool
                            .connect(src, hbone, identity, SocketAddr::V4(addr))
                            .await
                            .map(Upstream::Hbone)
                            .map_err(|source| ConnectError::Tunnel { dst: addr, source })
                    }
                }
            }
            Target::Plain { addr, .. } => self.direct(*addr).await,
            Target::Passthrough { addr } => match self.egress {
                Egress::Allow => self.direct(*addr).await,
                Egress::Deny => Err(ConnectError::EgressDenied { dst: *addr }),
            },
        }
    }

    /// `dst` must be the `identity` the target resolved to, and admits the caller as it
    /// would a tunnel (the caller being the source pod's configured identity, which its
    /// certificate would name).
    async fn same_node(
        &self,
        src: &SpiffeId,
        meta: &ConnMeta,
        addr: SocketAddrV4,
        identity: &SpiffeId,
        dst: &LocalPod,
    ) -> Result<Upstream, ConnectError> {
        let found = dst.identity();
        if found.as_ref() != Some(identity) {
            return Err(ConnectError::IdentityMismatch {
                dst: addr,
                pod: dst.name().clone(),
                expected: identity.clone(),
                found,
            });
        }
        let caller = Caller {
            identity: src.clone(),
            path: MeshPath::SameNode,
            peer: meta.src.clone(),
            addr: meta.src_addr,
        };
        dst.inbound
            .admit(caller, SocketAddr::V4(addr))
            .await
            .map(Upstream::SameNode)
            .map_err(|rejection| ConnectError::SameNode {
                dst: addr,
                pod: dst.name().clone(),
                rejection,
            })
    }

    async fn direct(&self, addr: SocketAddrV4) -> Result<Upstream, ConnectError> {
        let stream = (self.dial)(addr)
            .await
            .map_err(|source| ConnectError::Direct { dst: addr, source })?;
        let _ = stream.set_nodelay(true);
        Ok(Upstream::Direct(stream))
    }
}

/// Fills in the telemetry's destination for a connection (or a request) to `target`, going
/// `path`.
pub(super) fn describe(
    meta: &mut ConnMeta,
    snapshot: &NodeSnapshot,
    target: &Target,
    path: MeshPath,
) {
    meta.path = path;
    meta.dst_addr = SocketAddr::V4(target.addr());
    match target {
        Target::Mesh {
            addr,
            identity,
            service,
            backend,
            ..
        } => {
            meta.dst = match endpoint_pod(snapshot, backend.as_ref(), *addr.ip()) {
                Some(pod) => Peer {
                    identity: Some(identity.clone()),
                    ..Peer::of_pod(&pod)
                },
                None => Peer::of_identity(identity),
            };
            meta.service = service.as_ref().map(service_host);
        }
        Target::Plain { addr, service } => {
            meta.dst = endpoint_pod(snapshot, service.as_ref(), *addr.ip())
                .map_or_else(Peer::default, |p| Peer::of_pod(&p));
            meta.service = service.as_ref().map(service_host);
        }
        Target::Passthrough { .. } => {
            meta.dst = Peer::default();
            meta.service = None;
        }
    }
}
