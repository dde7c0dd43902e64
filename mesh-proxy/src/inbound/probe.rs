//! The kubelet's probes: the kubelet checks a pod's health from the node itself, in plaintext,
//! to the ports its liveness, readiness and startup probes name. A STRICT pod would refuse
//! them and never become Ready, so a plaintext connection is admitted without policy when it
//! comes from one of the node's own addresses to one of those ports
//! ([`mesh_core::model::NodePod::probe_ports`]), and only then. What that admits: any process
//! in the node's network namespace (the kubelet, the node's own daemons, host-network pods)
//! may reach a meshed pod's probe ports in plaintext, and nothing else of the pod.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use mesh_core::model::{NamespacedName, NodeSnapshot};

/// Which source addresses are the node's own.
#[derive(Debug, Clone, Default)]
pub enum NodeAddresses {
    /// The addresses of the agent's network namespace (on a node, the node's: the agent runs
    /// in the host's), read when a connection to a probe port asks: a bridge the primary CNI
    /// plugin creates after the agent started counts too.
    #[default]
    Local,
    /// A fixed list.
    Fixed(Arc<Vec<IpAddr>>),
}

impl NodeAddresses {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match self {
            NodeAddresses::Fixed(list) => list.iter().any(|a| canonical(*a) == ip),
            NodeAddresses::Local => nix::ifaddrs::getifaddrs().is_ok_and(|mut addrs| {
                addrs.any(|a| {
                    a.address.is_some_and(|s| {
                        let own = s
                            .as_sockaddr_in()
                            .map(|v4| IpAddr::V4(v4.ip()))
                            .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())));
                        own.map(canonical) == Some(ip)
                    })
                })
            }),
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `dst`'s port is one the kubelet probes on `pod`.
pub fn is_probe_port(config: &NodeSnapshot, pod: &NamespacedName, port: u16) -> bool {
    config
        .node_pods
        .get(pod)
        .is_some_and(|p| p.meshed && p.probe_ports.contains(&port))
}

/// Whether a plaintext connection from `src` to `dst` of `pod` is the node probing it.
pub fn is_node_probe(
    config: &NodeSnapshot,
    pod: &NamespacedName,
    src: Option<SocketAddr>,
    dst: SocketAddrV4,
    node: &NodeAddresses,
) -> bool {
    // The port first: reading the node's addresses is only worth it for a probe port.
    is_probe_port(config, pod, dst.port()) && src.is_some_and(|s| node.contains(s.ip()))
}
