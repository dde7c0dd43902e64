//! Outbound connections of a meshed pod: resolve the original destination with the
//! configuration in force, then carry the bytes in an HBONE tunnel to a meshed destination or
//! directly to one outside the mesh.
//!
//! The copy loop is `tokio::io::copy_bidirectional_with_sizes`: each direction is shut down
//! on its own when its reader ends (half-close both ways), with two buffers per connection
//! sized for bulk transfers and reused for its whole life.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use mesh_core::SpiffeId;
use mesh_core::model::NamespacedName;
use mesh_core::resolve::{FastPicker, Resolver, Target};
use serde::Serialize;
use tokio::io::copy_bidirectional_with_sizes;
use tokio::net::TcpStream;
use tracing::debug;

use crate::hbone::{HBONE_PORT, HboneError, HbonePool};
use crate::inbound::AppDialer;
use crate::state::{StateStore, Version};

/// Per-direction copy buffer.
const COPY_BUF: usize = 256 * 1024;
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
    #[error("copy: {0}")]
    Copy(std::io::Error),
    #[error("{pod} already has {limit} outbound connections open (the cap); connection refused")]
    ConnectionCap { pod: NamespacedName, limit: usize },
}

impl OutboundError {
    pub fn kind(&self) -> &'static str {
        match self {
            OutboundError::UnknownPod { .. } => "unknown_pod",
            OutboundError::Unresolved(u) => u.kind(),
            OutboundError::EgressDenied { .. } => "egress_denied",
            OutboundError::Tunnel { .. } => "tunnel",
            OutboundError::Direct { .. } => "direct",
            OutboundError::Copy(_) => "copy",
            OutboundError::ConnectionCap { .. } => "connection_cap",
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
#[serde(rename_all = "lowercase")]
pub enum Path {
    Hbone,
    Direct,
}

/// The outbound side of one pod.
pub struct PodOutbound {
    pub pod: NamespacedName,
    pub store: Arc<StateStore>,
    pub pool: HbonePool,
    /// Opens sockets to destinations outside the mesh (in production: from the pod's netns).
    pub dial: AppDialer,
    pub egress: Egress,
    resolver: Mutex<Option<(Option<Version>, Arc<Resolver>)>>,
    slots: Arc<tokio::sync::Semaphore>,
    limit: usize,
}

impl PodOutbound {
    pub fn new(
        pod: NamespacedName,
        store: Arc<StateStore>,
        pool: HbonePool,
        dial: AppDialer,
        egress: Egress,
        max_connections: usize,
    ) -> PodOutbound {
        PodOutbound {
            pod,
            store,
            pool,
            dial,
            egress,
            resolver: Mutex::new(None),
            slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            limit: max_connections,
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

    /// Carries one accepted application connection addressed to `dst`.
    pub async fn handle(
        &self,
        mut conn: TcpStream,
        dst: SocketAddrV4,
    ) -> Result<Carried, OutboundError> {
        let _slot =
            self.slots
                .clone()
                .try_acquire_owned()
                .map_err(|_| OutboundError::ConnectionCap {
                    pod: self.pod.clone(),
                    limit: self.limit,
                })?;
        let (resolver, applied) = self.resolver();
        let src: SpiffeId = applied
            .snapshot
            .workloads
            .get(&self.pod)
            .map(|w| w.identity.clone())
            .ok_or_else(|| OutboundError::UnknownPod {
                pod: self.pod.clone(),
            })?;
        let resolution = resolver.resolve(&src, dst, &mut FastPicker::new())?;
        let _lease = resolution.lease;
        let _ = conn.set_nodelay(true);
        match resolution.target {
            Target::Mesh { addr, identity, .. } => {
                let hbone = SocketAddr::from((*addr.ip(), HBONE_PORT));
                let mut tunnel = self
                    .pool
                    .connect(&src, hbone, &identity, SocketAddr::V4(addr))
                    .await
                    .map_err(|source| OutboundError::Tunnel { dst: addr, source })?;
                debug!(pod = %self.pod, %dst, endpoint = %addr, dst.id = %identity, "tunnel open");
                let (sent, received) =
                    copy_bidirectional_with_sizes(&mut conn, &mut tunnel, COPY_BUF, COPY_BUF)
                        .await
                        .map_err(OutboundError::Copy)?;
                Ok(Carried {
                    path: Path::Hbone,
                    sent,
                    received,
                })
            }
            Target::Plain { addr, .. } => self.direct(conn, addr).await,
            Target::Passthrough { addr } => match self.egress {
                Egress::Allow => self.direct(conn, addr).await,
                Egress::Deny => Err(OutboundError::EgressDenied { dst: addr }),
            },
        }
    }

    async fn direct(
        &self,
        mut conn: TcpStream,
        addr: SocketAddrV4,
    ) -> Result<Carried, OutboundError> {
        let mut upstream = (self.dial)(addr)
            .await
            .map_err(|source| OutboundError::Direct { dst: addr, source })?;
        let _ = upstream.set_nodelay(true);
        let (sent, received) =
            copy_bidirectional_with_sizes(&mut conn, &mut upstream, COPY_BUF, COPY_BUF)
                .await
                .map_err(OutboundError::Copy)?;
        Ok(Carried {
            path: Path::Direct,
            sent,
            received,
        })
    }
}

#[cfg(test)]
mod tests;
