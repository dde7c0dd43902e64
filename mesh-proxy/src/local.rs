//! The pods this agent serves, by IP: what the outbound side needs to carry a connection to
//! one of them without a tunnel.
//!
//! A connection between two pods of the same agent never leaves the node, so it needs no TLS
//! and no HTTP/2, but it still needs the identity and policy check a tunnel would get. The
//! outbound side of the calling pod finds the destination here, checks that its configured
//! identity is the one the destination resolved to, and asks the destination's
//! [`PodInbound`] to admit the connection ([`PodInbound::admit`], the same decision as for an
//! HBONE tunnel) with the calling pod's configured identity, the one its certificate would
//! have named. The destination's application is dialled from its own network namespace.
//!
//! Every meshed pod's proxy registers its pod when it starts; the registration is removed
//! when the proxy is dropped.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError, RwLock};

use mesh_core::SpiffeId;
use mesh_core::model::NamespacedName;

use crate::inbound::PodInbound;

/// The meshed pods of this agent by IP; shared by every pod's proxy.
#[derive(Default)]
pub struct LocalPods {
    pods: RwLock<HashMap<Ipv4Addr, Arc<LocalPod>>>,
}

/// One pod of this agent, as a destination.
pub struct LocalPod {
    pub ip: Ipv4Addr,
    /// Its admission and the way to its application (its name is `inbound.pod`).
    pub inbound: PodInbound,
}

impl LocalPod {
    pub fn name(&self) -> &NamespacedName {
        &self.inbound.pod
    }

    /// The identity the configuration in force gives the pod, if it knows the pod yet.
    pub fn identity(&self) -> Option<SpiffeId> {
        self.inbound
            .store
            .current()
            .snapshot
            .workloads
            .get(&self.inbound.pod)
            .map(|w| w.identity.clone())
    }
}

impl std::fmt::Debug for LocalPods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pods = self.pods.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_map()
            .entries(pods.iter().map(|(ip, p)| (ip, p.name())))
            .finish()
    }
}

impl LocalPods {
    /// Registers `pod` under its IP, replacing what was registered there, until the returned
    /// registration is dropped.
    pub fn register(self: &Arc<Self>, pod: LocalPod) -> Registration {
        let pod = Arc::new(pod);
        self.pods
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pod.ip, pod.clone());
        Registration {
            pods: self.clone(),
            pod,
        }
    }

    /// The pod of this agent at `ip`.
    pub fn get(&self, ip: Ipv4Addr) -> Option<Arc<LocalPod>> {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ip)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.pods
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A pod's entry in [`LocalPods`]; dropping it removes the entry (unless another pod has
/// registered the IP since).
pub struct Registration {
    pods: Arc<LocalPods>,
    pod: Arc<LocalPod>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut pods = self
            .pods
            .pods
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if pods
            .get(&self.pod.ip)
            .is_some_and(|p| Arc::ptr_eq(p, &self.pod))
        {
            pods.remove(&self.pod.ip);
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::model::NodeSnapshot;
    use prometheus_client::registry::Registry;
    use tokio::net::TcpStream;

    use super::*;
    use crate::telemetry::Telemetry;

    fn pod(name: &str, ip: Ipv4Addr) -> LocalPod {
        LocalPod {
            ip,
            inbound: PodInbound {
                pod: NamespacedName::new("shop", name),
                store: crate::state::holding(&NodeSnapshot {
                    node: "node-a".into(),
                    trust_bundle: vec!["root".into()],
                    ..NodeSnapshot::default()
                }),
                dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
                telemetry: Telemetry::new(&mut Registry::default()),
                http: crate::l7::HttpConfig::default(),
                idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
            },
        }
    }

    #[test]
    fn a_pod_is_found_by_ip_until_its_registration_is_dropped() {
        let pods = Arc::new(LocalPods::default());
        let ip = Ipv4Addr::new(10, 0, 0, 5);
        let first = pods.register(pod("api-0", ip));
        let other = pods.register(pod("web-0", Ipv4Addr::new(10, 0, 0, 6)));
        assert_eq!(
            pods.get(ip).map(|p| p.name().clone()),
            Some(NamespacedName::new("shop", "api-0"))
        );
        assert_eq!(pods.len(), 2);

        // A proxy started again for the IP takes it over; the old one's end leaves it be.
        let second = pods.register(pod("api-1", ip));
        drop(first);
        assert_eq!(
            pods.get(ip).map(|p| p.name().clone()),
            Some(NamespacedName::new("shop", "api-1"))
        );
        drop(second);
        assert!(pods.get(ip).is_none());
        drop(other);
        assert!(pods.is_empty());
    }
}
