//! Pods on a real node (`mesh-agent run --discover-pods`): the controller says which pods are
//! scheduled here and which of them are meshed ([`NodeSnapshot::node_pods`]); where each one
//! lives is found on the node, never taken from anything the pod can write:
//!
//! - **At sandbox creation**, the CNI plugin hands the agent the pod's namespace, name and UID,
//!   its network namespace (`CNI_NETNS`) and the addresses the primary plugin assigned
//!   ([`NodePods::add`]). The pod's cgroup is the one the kubelet created for that UID
//!   ([`mesh_datapath::discovery::find_pod_cgroup`]). The plugin's answer waits for the enrollment,
//!   so no container of a meshed pod starts before its traffic is captured.
//! - **Already running** (the agent started after the pod, or the pod joined the mesh after
//!   it started): the cgroup by UID again, the network namespace from the processes in it,
//!   named by the runtime's pin when it has one ([`NodePods::desired`]), and the address from
//!   the pod's status.
//!
//! The UID ties the two together: a CNI call whose UID is not the one the controller has for
//! that name (a pod recreated under the same name) waits until the controller catches up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use mesh_cni::{Op, Request, Response};
use mesh_core::model::{NamespacedName, NodePod, NodeSnapshot};

use mesh_datapath::config::PodSpec;
use mesh_datapath::discovery;

use super::Refusal;

/// Where a pod was found on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The pod's UID when it was found: a pod recreated under the same name is found anew.
    pub uid: String,
    pub cgroup: PathBuf,
    pub netns: PathBuf,
    pub ip: Ipv4Addr,
    pub iface: String,
}

/// What to do with a CNI call now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Answer at once.
    Answer(Response),
    /// The controller has not announced the pod (or not this UID of it) yet: ask again at the
    /// next configuration change.
    Wait,
    /// The pod is located: answer once the enrollment of `name` was tried.
    Enroll { name: String },
    /// The pod is forgotten: answer once `name` is unenrolled.
    Unenroll { name: String },
}

/// The meshed pods of this node and where they live.
#[derive(Debug)]
pub struct NodePods {
    /// The cgroup v2 mount: pods' cgroups are found below it.
    cgroup_root: PathBuf,
    /// Where the runtime pins network namespaces.
    netns_dirs: Vec<PathBuf>,
    /// By `namespace/name`.
    located: BTreeMap<String, Located>,
    /// UIDs the runtime tore down (CNI DEL): not adopted again while the controller still
    /// lists the pod.
    deleted: BTreeSet<String>,
}

impl NodePods {
    pub fn new(cgroup_root: PathBuf, netns_dirs: Vec<PathBuf>) -> NodePods {
        NodePods {
            cgroup_root,
            netns_dirs,
            located: BTreeMap::new(),
            deleted: BTreeSet::new(),
        }
    }

    pub fn located(&self, name: &str) -> Option<&Located> {
        self.located.get(name)
    }

    /// The pods to enroll: the meshed pods of the snapshot that are located, adopting those
    /// that run without the agent having been told. A meshed pod that runs (it has an
    /// address) but cannot be found is returned with the reason.
    pub fn desired(
        &mut self,
        snapshot: &NodeSnapshot,
        fixed: &[String],
    ) -> (BTreeMap<String, PodSpec>, Vec<(String, Refusal)>) {
        self.forget_gone(snapshot);
        let mut pods = BTreeMap::new();
        let mut rejected = Vec::new();
        for (nn, pod) in snapshot.node_pods.iter().filter(|(_, p)| p.meshed) {
            let name = key(nn);
            if fixed.contains(&name) || self.deleted.contains(&pod.uid) {
                continue;
            }
            if !self.located.contains_key(&name) {
                // Only a pod with an address has a sandbox to find.
                let Some(ip) = snapshot
                    .workloads
                    .get(nn)
                    .filter(|w| w.uid == pod.uid)
                    .and_then(|w| w.ips.first().copied())
                else {
                    continue;
                };
                match self.adopt(pod, ip) {
                    Ok(found) => {
                        tracing::info!(pod = %name, cgroup = %found.cgroup.display(),
                            netns = %found.netns.display(), "found a running pod");
                        self.located.insert(name.clone(), found);
                    }
                    Err(e) => {
                        rejected.push((name, e.into()));
                        continue;
                    }
                }
            }
            let found = &self.located[&name];
            match spec(&name, pod, found) {
                Ok(spec) => {
                    pods.insert(name, spec);
                }
                Err(reason) => rejected.push((name, reason)),
            }
        }
        (pods, rejected)
    }

    /// Decides what a CNI call needs. `Del` forgets the pod: the next [`NodePods::desired`]
    /// leaves it out, so the caller unenrolls it.
    pub fn call(&mut self, request: &Request, snapshot: &NodeSnapshot) -> Decision {
        let nn = NamespacedName::new(&request.pod.namespace, &request.pod.name);
        let name = key(&nn);
        let pod = snapshot.node_pods.get(&nn);
        // The controller's view of this very pod (same UID when the runtime gave one).
        let current = pod.filter(|p| request.pod.uid.as_deref().is_none_or(|u| u == p.uid));
        match request.op {
            Op::Del => {
                if let Some(uid) = request.pod.uid.clone().or(pod.map(|p| p.uid.clone())) {
                    self.deleted.insert(uid);
                }
                self.located.remove(&name);
                Decision::Unenroll { name }
            }
            Op::Check => match current {
                Some(p) if !p.meshed => Decision::Answer(Response::NotMeshed),
                Some(_) if self.located.contains_key(&name) => Decision::Enroll { name },
                Some(_) => Decision::Answer(Response::Failed {
                    message: "the pod is meshed and not enrolled".into(),
                }),
                None => Decision::Wait,
            },
            Op::Add => {
                let Some(pod) = current else {
                    return Decision::Wait;
                };
                if !pod.meshed {
                    return Decision::Answer(Response::NotMeshed);
                }
                match self.locate(pod, request) {
                    Ok(found) => {
                        self.deleted.remove(&pod.uid);
                        self.located.insert(name.clone(), found);
                        Decision::Enroll { name }
                    }
                    Err(refusal) => Decision::Answer(Response::Failed {
                        message: refusal.to_string(),
                    }),
                }
            }
        }
    }

    /// Drops what is known of pods the controller no longer lists (or lists with another UID).
    fn forget_gone(&mut self, snapshot: &NodeSnapshot) {
        let uids: BTreeSet<&str> = snapshot
            .node_pods
            .values()
            .map(|p| p.uid.as_str())
            .collect();
        self.deleted.retain(|uid| uids.contains(uid.as_str()));
        self.located.retain(|name, found| {
            name.split_once('/')
                .and_then(|(ns, n)| snapshot.node_pods.get(&NamespacedName::new(ns, n)))
                .is_some_and(|p| p.uid == found.uid && p.meshed)
        });
    }

    /// A pod handed over by the CNI plugin.
    fn locate(&self, pod: &NodePod, request: &Request) -> Result<Located, Refusal> {
        let netns = PathBuf::from(&request.netns);
        if !netns.is_absolute() {
            return Err(Refusal::RelativeNetns {
                netns: request.netns.clone(),
            });
        }
        let ip = request
            .ips
            .iter()
            .find_map(|a| a.split('/').next()?.parse::<Ipv4Addr>().ok())
            .ok_or_else(|| Refusal::NoIpv4 {
                ips: request.ips.clone(),
            })?;
        let cgroup = discovery::find_pod_cgroup(&self.cgroup_root, &pod.uid)?;
        Ok(Located {
            uid: pod.uid.clone(),
            cgroup,
            netns,
            ip,
            iface: request.ifname.clone(),
        })
    }

    /// A pod already running: everything from the kernel, the address from its status.
    fn adopt(&self, pod: &NodePod, ip: Ipv4Addr) -> Result<Located, discovery::DiscoveryError> {
        let cgroup = discovery::find_pod_cgroup(&self.cgroup_root, &pod.uid)?;
        let by_process = discovery::netns_of_pod(&cgroup)?;
        let netns = pinned_netns(&self.netns_dirs, &by_process).unwrap_or(by_process);
        Ok(Located {
            uid: pod.uid.clone(),
            cgroup,
            netns,
            ip,
            iface: super::POD_IFACE.into(),
        })
    }
}

/// The runtime's pin of the network namespace at `netns` (a `/proc/<pid>/ns/net`), if one of
/// `dirs` has it: a name that stays valid after that process exits.
fn pinned_netns(dirs: &[PathBuf], netns: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let want = id(netns)?;
    dirs.iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .map(|e| e.path())
        .find(|p| id(p) == Some(want))
}

fn key(nn: &NamespacedName) -> String {
    format!("{}/{}", nn.namespace, nn.name)
}

fn spec(name: &str, pod: &NodePod, found: &Located) -> Result<PodSpec, Refusal> {
    super::checked(PodSpec {
        name: name.to_string(),
        cgroup: found.cgroup.clone(),
        netns: found.netns.clone(),
        ip: found.ip,
        iface: found.iface.clone(),
        inbound_ports: pod.ports.clone(),
        excluded_inbound_ports: pod.excluded_inbound_ports.clone(),
        mode: super::datapath_mode(pod.mode),
    })
}

#[cfg(test)]
mod tests;
