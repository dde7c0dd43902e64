//! Pods enrolled from the configuration (`mesh-agent run --enroll-from-config`): the meshed
//! pods the controller places on this node whose cgroup and network namespace it names (the
//! single-machine mesh writes them as the pod annotations `mesh.io/cgroup` and
//! `mesh.io/netns`). The agent enrolls each such pod when it appears, re-enrolls it when its
//! address, ports or mode change, and unenrolls it when it goes.
//!
//! Only use it where the controller's source is trusted to name those paths: whoever can set
//! the annotations decides which cgroup's traffic is carried under the pod's identity.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use mesh_core::model::{NodeSnapshot, TlsMode, Workload};

use mesh_datapath::config::{Mode, PodSpec};

pub mod node;
pub mod reconcile;

/// The interface a pod reaches its node through.
pub const POD_IFACE: &str = "eth0";

/// Ports a pod may not ask to have steered: the proxy's own.
const RESERVED: [u16; 3] = [15001, 15006, mesh_common::HBONE_PORT];

/// Why a pod the configuration places here cannot be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("no {what} path")]
    NoPath { what: &'static str },
    #[error("{what} path {} is not absolute", path.display())]
    RelativePath { what: &'static str, path: PathBuf },
    #[error("no IPv4 address yet")]
    NoAddress,
    #[error("port {port} cannot be steered (0 or the proxy's own)")]
    ReservedPort { port: u16 },
    #[error("CNI_NETNS {netns:?} is not an absolute path")]
    RelativeNetns { netns: String },
    #[error("the primary plugin assigned no IPv4 address (got {ips:?}); the mesh needs one")]
    NoIpv4 { ips: Vec<String> },
    #[error("cannot find it on this node: {0}")]
    NotFound(#[from] mesh_datapath::discovery::DiscoveryError),
}

/// The pods the configuration wants enrolled on `node`, by `namespace/name`, leaving out
/// `fixed` names (pods given on the command line win). Workloads that cannot be enrolled are
/// returned with the reason, to be logged.
pub fn desired(
    snapshot: &NodeSnapshot,
    node: &str,
    fixed: &[String],
) -> (BTreeMap<String, PodSpec>, Vec<(String, Refusal)>) {
    let mut pods = BTreeMap::new();
    let mut rejected = Vec::new();
    for w in snapshot.workloads.values().filter(|w| w.node == node) {
        let name = format!("{}/{}", w.name.namespace, w.name.name);
        if fixed.contains(&name) || (w.cgroup.is_none() && w.netns.is_none()) {
            continue;
        }
        match spec(&name, w) {
            Ok(spec) => {
                pods.insert(name, spec);
            }
            Err(reason) => rejected.push((name, reason)),
        }
    }
    (pods, rejected)
}

fn spec(name: &str, w: &Workload) -> Result<PodSpec, Refusal> {
    let path = |what: &'static str, p: &Option<String>| {
        let path = PathBuf::from(p.as_deref().ok_or(Refusal::NoPath { what })?);
        if path.is_absolute() {
            Ok(path)
        } else {
            Err(Refusal::RelativePath { what, path })
        }
    };
    let cgroup = path("cgroup", &w.cgroup)?;
    let netns = path("network namespace", &w.netns)?;
    let ip = *w.ips.first().ok_or(Refusal::NoAddress)?;
    checked(PodSpec {
        name: name.to_string(),
        cgroup,
        netns,
        ip,
        iface: POD_IFACE.into(),
        inbound_ports: w.ports.clone(),
        excluded_inbound_ports: w.excluded_inbound_ports.clone(),
        mode: datapath_mode(w.mode),
    })
}

/// `spec` unless it asks to steer a port the agent cannot give it.
fn checked(spec: PodSpec) -> Result<PodSpec, Refusal> {
    if let Some(p) = spec
        .inbound_ports
        .iter()
        .find(|p| **p == 0 || RESERVED.contains(p))
    {
        return Err(Refusal::ReservedPort { port: *p });
    }
    Ok(spec)
}

/// The datapath's inbound mode for a pod's TLS mode.
pub fn datapath_mode(m: TlsMode) -> Mode {
    match m {
        TlsMode::Strict => Mode::Strict,
        TlsMode::Permissive => Mode::Permissive,
    }
}

/// How long a pod whose enrollment failed waits before the next try (a configuration change
/// retries at once).
pub const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Pods the agent wants enrolled and could not enroll, with why: shown by `mesh-agent pods`
/// and counted in `mesh_agent_enroll_failures_total{reason}`, never left silently unmeshed.
pub struct EnrollFailures {
    failed: Mutex<BTreeMap<String, String>>,
    total: Family<Vec<(String, String)>, Counter>,
}

impl EnrollFailures {
    pub fn register(registry: &mut Registry) -> EnrollFailures {
        let total = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "mesh_agent_enroll_failures",
            "Pod enrollments that failed (each try), by reason",
            total.clone(),
        );
        EnrollFailures {
            failed: Mutex::new(BTreeMap::new()),
            total,
        }
    }

    /// Records a failed try for `pod`.
    pub fn failed(&self, pod: &str, reason: &'static str, error: String) {
        self.total
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .inc();
        self.lock().insert(pod.to_string(), error);
    }

    /// `pod` is enrolled (or no longer wanted).
    pub fn clear(&self, pod: &str) {
        self.lock().remove(pod);
    }

    /// Why `pod`'s last enrollment failed, if it did.
    pub fn get(&self, pod: &str) -> Option<String> {
        self.lock().get(pod).cloned()
    }

    /// Forgets the pods `keep` says no to.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|name, _| keep(name));
    }

    pub fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.failed.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::SpiffeId;
    use mesh_core::model::NamespacedName;
    use std::net::Ipv4Addr;

    fn workload(name: &str, node: &str, cgroup: Option<&str>, ports: &[u16]) -> Workload {
        let nn = NamespacedName::new("demo", name);
        Workload {
            name: nn,
            uid: format!("uid-{name}"),
            service_account: name.into(),
            identity: format!("spiffe://cluster.local/ns/demo/sa/{name}")
                .parse::<SpiffeId>()
                .expect("id"),
            node: node.into(),
            ips: vec![Ipv4Addr::new(10, 244, 1, 10)],
            mode: TlsMode::Permissive,
            labels: Default::default(),
            cgroup: cgroup.map(String::from),
            netns: cgroup.map(|_| format!("/run/netns/{name}")),
            ports: ports.to_vec(),
            excluded_inbound_ports: vec![],
        }
    }

    fn snapshot(ws: Vec<Workload>) -> NodeSnapshot {
        let mut s = NodeSnapshot::default();
        for w in ws {
            s.workloads.insert(w.name.clone(), w);
        }
        s
    }

    #[test]
    fn the_node_s_located_pods_are_wanted_and_the_rest_left_out_or_refused_with_a_reason() {
        let s = snapshot(vec![
            workload("web", "node-1", Some("/sys/fs/cgroup/web"), &[8080, 9090]),
            workload("elsewhere", "node-2", Some("/sys/fs/cgroup/x"), &[]),
            workload("unlocated", "node-1", None, &[]),
            workload("relative", "node-1", Some("cg/rel"), &[]),
            workload("greedy", "node-1", Some("/sys/fs/cgroup/g"), &[15008]),
            workload("fixed", "node-1", Some("/sys/fs/cgroup/f"), &[]),
        ]);
        let (pods, rejected) = desired(&s, "node-1", &["demo/fixed".to_string()]);
        assert_eq!(pods.keys().collect::<Vec<_>>(), ["demo/web"]);
        let web = &pods["demo/web"];
        assert_eq!(web.cgroup, PathBuf::from("/sys/fs/cgroup/web"));
        assert_eq!(web.netns, PathBuf::from("/run/netns/web"));
        assert_eq!(web.ip, Ipv4Addr::new(10, 244, 1, 10));
        assert_eq!(web.inbound_ports, [8080, 9090]);
        assert_eq!(web.mode, Mode::Permissive);
        assert_eq!(web.iface, "eth0");
        let reasons: BTreeMap<_, _> = rejected
            .into_iter()
            .map(|(pod, r)| (pod, r.to_string()))
            .collect();
        assert_eq!(reasons.len(), 2, "{reasons:?}");
        assert!(reasons["demo/relative"].contains("not absolute"));
        assert!(reasons["demo/greedy"].contains("15008"));
    }
}
