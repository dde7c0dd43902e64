//! What the mesh routes between: workloads (meshed pods), services and their endpoints, and
//! the per-node configuration snapshot the controller compiles for an agent.
//!
//! These are domain types: valid by construction where it matters (identities, regexes), free
//! of Kubernetes and protobuf types, and `Serialize` so the admin endpoints can show them.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;
pub use crate::meta::{NamespacedName, TlsMode};
use crate::policy::InboundPolicy;
use crate::route::Route;

/// The application protocol of a service port, which decides L4 or L7 handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    /// Its name as the configuration and the debug pages write it (`tcp`, `http`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }

    /// The protocol of a Kubernetes service port: `appProtocol` first (`http`, `http2`,
    /// `grpc`, `h2c`, `kubernetes.io/h2c`, `tcp`), else the port name prefix (`http-`,
    /// `http2-`, `grpc-`, or the whole name), else TCP. Unknown values are TCP: a port the
    /// mesh does not understand is carried as bytes, never broken.
    pub fn from_service_port(app_protocol: Option<&str>, port_name: Option<&str>) -> Protocol {
        if let Some(p) = app_protocol {
            match p.to_ascii_lowercase().as_str() {
                "http" | "http1" | "http/1.1" => return Protocol::Http,
                "http2" | "h2c" | "kubernetes.io/h2c" => return Protocol::Http2,
                "grpc" => return Protocol::Grpc,
                "tcp" => return Protocol::Tcp,
                _ => {}
            }
        }
        let Some(name) = port_name else {
            return Protocol::Tcp;
        };
        let prefix = name.split('-').next().unwrap_or(name);
        match prefix {
            "http" => Protocol::Http,
            "http2" | "h2c" => Protocol::Http2,
            "grpc" => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    }
}

/// The port every meshed pod accepts HBONE (mTLS) on; never captured, never excluded.
pub const HBONE_PORT: u16 = 15008;

/// A meshed pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// The pod's namespace and name.
    pub name: NamespacedName,
    pub uid: String,
    pub service_account: String,
    pub identity: SpiffeId,
    /// The node the pod is scheduled on.
    pub node: String,
    pub ips: Vec<Ipv4Addr>,
    pub mode: TlsMode,
    pub labels: BTreeMap<String, String>,
    /// Where the agent finds the pod on its node. In cluster mode the agent resolves these
    /// from the pod UID; in local mode the description names them.
    pub cgroup: Option<String>,
    pub netns: Option<String>,
    /// The ports the pod's containers declare: the agent steers inbound TCP to them through
    /// the proxy. Empty when the pod declares none.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Ports the operator excluded from inbound capture (annotation
    /// `mesh.io/exclude-inbound-ports`): the application answers them directly, in STRICT
    /// mode too. Every other port of a STRICT pod goes through the proxy.
    #[serde(default)]
    pub excluded_inbound_ports: Vec<u16>,
}

/// A pod scheduled on the node, meshed or not: what the node's CNI plugin and the agent's
/// adoption of running pods go by. A meshed pod is enrolled before it has an address (the
/// runtime assigns it at sandbox creation, before the pod's status has one), so the facts
/// enrollment needs are here rather than only in its [`Workload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePod {
    pub name: NamespacedName,
    /// `metadata.uid`: how the agent finds the pod's cgroup in the kernel.
    pub uid: String,
    /// Whether the pod is in the mesh; the rest is meaningful only when it is.
    pub meshed: bool,
    pub mode: TlsMode,
    /// As [`Workload::ports`].
    #[serde(default)]
    pub ports: Vec<u16>,
    /// As [`Workload::excluded_inbound_ports`].
    #[serde(default)]
    pub excluded_inbound_ports: Vec<u16>,
    /// The TCP ports the kubelet probes (HTTP, TCP and gRPC liveness, readiness and startup
    /// probes of every container): the node itself may reach them in plaintext, STRICT or not.
    #[serde(default)]
    pub probe_ports: Vec<u16>,
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    /// The port on the endpoints (a named target port is resolved per endpoint by the
    /// compiler; this is the numeric value, or `port` when unset).
    pub target_port: u16,
    pub protocol: Protocol,
}

/// One backend address of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    /// The pod behind the address, when it is meshed.
    pub workload: Option<NamespacedName>,
    /// Its identity, when meshed: what the client must verify.
    pub identity: Option<SpiffeId>,
    /// Its node, when known: HBONE connections are pooled per destination node.
    pub node: Option<String>,
    pub ready: bool,
}

/// A Kubernetes service as the mesh sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: NamespacedName,
    /// The cluster IP; `None` for headless services.
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// A weighted backend of a traffic split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitBackend {
    pub service: NamespacedName,
    pub weight: u32,
}

/// A compiled TrafficSplit: traffic addressed to `root` goes to the backends by weight.
/// `matches` (v1alpha4) restricts the split to HTTP requests matching any of them; an empty
/// list applies to all traffic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficSplit {
    pub name: NamespacedName,
    pub root: NamespacedName,
    pub backends: Vec<SplitBackend>,
    pub matches: Vec<crate::policy::HttpMatch>,
}

/// Everything one node's agent needs: its workloads, the services they may call, the compiled
/// inbound policy of each of its workloads, the splits and routes, and the trust bundle.
///
/// Services, splits and routes are the same for every node, so the controller shares one copy
/// among all snapshots (`Arc`): cloning a snapshot or comparing two that share it costs nothing.
/// Each service is an `Arc` too, kept across recompiles while it is unchanged, so comparing
/// two versions of the service table costs a pointer comparison per unchanged service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct NodeSnapshot {
    pub node: String,
    /// Keyed by pod namespace/name.
    pub workloads: BTreeMap<NamespacedName, Workload>,
    /// Keyed by service namespace/name.
    pub services: Arc<BTreeMap<NamespacedName, Arc<Service>>>,
    /// Keyed by the destination pod's namespace/name; one per workload on the node.
    pub policies: BTreeMap<NamespacedName, InboundPolicy>,
    /// Keyed by TrafficSplit namespace/name.
    pub splits: Arc<BTreeMap<NamespacedName, TrafficSplit>>,
    /// Gateway API HTTPRoutes attached to services, keyed by route namespace/name.
    #[serde(default)]
    pub http_routes: Arc<BTreeMap<NamespacedName, Route>>,
    /// Gateway API GRPCRoutes attached to services, keyed by route namespace/name.
    #[serde(default)]
    pub grpc_routes: Arc<BTreeMap<NamespacedName, Route>>,
    /// PEM certificates of the trust roots.
    pub trust_bundle: Vec<String>,
    /// Every pod scheduled on the node, meshed or not, keyed by namespace/name.
    #[serde(default)]
    pub node_pods: BTreeMap<NamespacedName, NodePod>,
    /// The destinations the mesh captures, from the cluster: every node's pod CIDRs and the
    /// service CIDRs (IPv4, `a.b.c.d/n`). Empty when the cluster says nothing.
    #[serde(default)]
    pub capture: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_names_are_its_serialized_names() {
        for p in [
            Protocol::Tcp,
            Protocol::Http,
            Protocol::Http2,
            Protocol::Grpc,
        ] {
            assert_eq!(
                serde_json::to_value(p).expect("json"),
                serde_json::Value::String(p.as_str().into())
            );
        }
    }

    #[test]
    fn protocol_from_app_protocol_then_port_name() {
        let p = Protocol::from_service_port;
        assert_eq!(p(Some("grpc"), Some("http-x")), Protocol::Grpc);
        assert_eq!(p(Some("kubernetes.io/h2c"), None), Protocol::Http2);
        assert_eq!(p(Some("HTTP"), None), Protocol::Http);
        assert_eq!(p(Some("tcp"), Some("http")), Protocol::Tcp);
        assert_eq!(p(Some("mysql"), Some("http-web")), Protocol::Http);
        assert_eq!(p(None, Some("http2-api")), Protocol::Http2);
        assert_eq!(p(None, Some("grpc")), Protocol::Grpc);
        assert_eq!(p(None, Some("https")), Protocol::Tcp);
        assert_eq!(p(None, Some("redis")), Protocol::Tcp);
        assert_eq!(p(None, None), Protocol::Tcp);
    }
}
