//! Inbound admission for a meshed pod: who may open a connection to which of its ports.
//!
//! Both inbound paths end here: HBONE tunnels on 15008 (the caller's identity is the one its
//! verified certificate names) and plaintext connections steered to 15006 (no identity). The
//! decision itself is `mesh_core::policy::authorize` on the pod's compiled policy from the
//! configuration in force; this module adds what only the node knows: the CONNECT target must
//! be one of this pod's own addresses, and a pod the configuration does not (yet) know is
//! refused rather than let through.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, NodeSnapshot};
use mesh_core::policy::{Conn, authorize};
use tokio::net::TcpStream;
use tracing::info;

use crate::hbone::{ConnectHandler, Refusal};
use crate::state::StateStore;

/// HTTP status for a policy refusal.
pub const DENIED: u16 = 403;
/// HTTP status when the pod or its application cannot take the connection.
pub const UNAVAILABLE: u16 = 503;
/// HTTP status for a CONNECT to an address that is not this pod's.
pub const MISDIRECTED: u16 = 421;

/// Decides an HBONE CONNECT from `peer` to `authority` for `pod`. On success, the address of
/// the application to connect to.
pub fn admit_hbone(
    config: &NodeSnapshot,
    pod: &NamespacedName,
    peer: &SpiffeId,
    authority: SocketAddr,
) -> Result<SocketAddrV4, Refusal> {
    let SocketAddr::V4(target) = authority else {
        return Err(Refusal::new(MISDIRECTED, "IPv4 destinations only"));
    };
    let workload = config.workloads.get(pod).ok_or_else(|| {
        Refusal::new(
            UNAVAILABLE,
            format!("{pod} is not a meshed pod on this node"),
        )
    })?;
    if !workload.ips.contains(target.ip()) {
        return Err(Refusal::new(
            MISDIRECTED,
            format!("{} is not an address of {pod}", target.ip()),
        ));
    }
    let policy = config
        .policies
        .get(pod)
        .ok_or_else(|| Refusal::new(UNAVAILABLE, format!("no policy for {pod} yet")))?;
    let conn = Conn {
        source: Some(peer),
        port: target.port(),
        request: None,
    };
    authorize(policy, &conn)
        .map(|_| target)
        .map_err(|denied| Refusal::new(DENIED, denied.to_string()))
}

/// Decides a plaintext connection (steered to 15006) to `dst` of `pod`: STRICT pods refuse
/// it, PERMISSIVE pods let policy decide with an unauthenticated caller.
pub fn admit_plaintext(
    config: &NodeSnapshot,
    pod: &NamespacedName,
    dst: SocketAddrV4,
) -> Result<(), Refusal> {
    let policy = config
        .policies
        .get(pod)
        .ok_or_else(|| Refusal::new(UNAVAILABLE, format!("no policy for {pod} yet")))?;
    let conn = Conn {
        source: None,
        port: dst.port(),
        request: None,
    };
    authorize(policy, &conn)
        .map(|_| ())
        .map_err(|denied| Refusal::new(DENIED, denied.to_string()))
}

/// How the inbound handler reaches the application (in production: a socket made in the
/// pod's network namespace).
pub type AppDialer = Arc<
    dyn Fn(SocketAddrV4) -> futures::future::BoxFuture<'static, std::io::Result<TcpStream>>
        + Send
        + Sync,
>;

/// The HBONE handler of one pod's 15008 listener.
pub struct PodInbound {
    pub pod: NamespacedName,
    pub store: Arc<StateStore>,
    pub dial: AppDialer,
}

impl ConnectHandler for PodInbound {
    type Io = TcpStream;

    async fn connect(&self, peer: SpiffeId, authority: SocketAddr) -> Result<TcpStream, Refusal> {
        let config = self.store.current();
        let target = match admit_hbone(&config.snapshot, &self.pod, &peer, authority) {
            Ok(t) => t,
            Err(refusal) => {
                info!(pod = %self.pod, src.id = %peer, dst = %authority, reason = %refusal.reason, "connection refused");
                return Err(refusal);
            }
        };
        (self.dial)(target).await.map_err(|e| {
            Refusal::new(
                UNAVAILABLE,
                format!("the application at {target} is not reachable: {e}"),
            )
        })
    }
}

#[cfg(test)]
mod tests;
