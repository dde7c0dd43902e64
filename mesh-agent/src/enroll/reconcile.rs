//! Enrollment as a reconcile: the pods the configuration (and the CNI plugin) want enrolled
//! on this node against the pods that are, brought together in one [`Reconciler::round`] at
//! every configuration change, CNI call and retry.
//!
//! A round, in order:
//! 1. **Capture**: the cluster's pod and service CIDRs replace what the datapath captured
//!    before (once the first configuration has arrived; until then what it held stays).
//! 2. **CNI calls**: each waiting call is decided ([`NodePods::call`]); one whose pod is
//!    located now is answered at the end of this same round, after its enrollment was tried.
//! 3. **Desired**: the pods wanted ([`NodePods::desired`] on a real node,
//!    [`super::desired`] from the configuration), and those refused with a reason.
//! 4. **Plan** ([`plan`]): a pod gone or changed is unenrolled (its proxy stopped first), a
//!    wanted pod not enrolled is enrolled. A failed enrollment is recorded
//!    ([`EnrollFailures`]) and tried again at the next round.
//! 5. **Answers** ([`cni_answer`]): each CNI call decided in step 2 gets what became of its
//!    pod.
//!
//! What enrolling does to the node is behind [`Node`]: the datapath and a proxy per pod in
//! the agent, a recording fake in the tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mesh_core::model::NodeSnapshot;
use mesh_datapath::config::{Cidr, PodSpec};
use mesh_datapath::ebpf::DatapathError;

use super::EnrollFailures;
use super::node::{Decision, NodePods};
use crate::cni::CniCall;

/// What enrolling a pod does to the node.
pub trait Node {
    /// What keeps an enrolled pod served (its proxy); dropping it stops serving the pod.
    type Served;

    /// Enrolls `pod` into the datapath and starts serving it.
    fn enroll(&mut self, pod: &PodSpec) -> Result<Self::Served, EnrollError>;
    /// Takes `pod` out of the datapath (its `Served` is dropped already).
    fn unenroll(&mut self, pod: &PodSpec) -> Result<(), DatapathError>;
    /// Captures `cluster`'s ranges besides the ones the agent was started with.
    fn set_capture(&mut self, cluster: &[Cidr]) -> Result<(), DatapathError>;
}

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("enroll {pod}: {source}")]
    Datapath {
        pod: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("enter the network namespace of {pod}: {source}")]
    Netns {
        pod: String,
        #[source]
        source: mesh_netns::NetnsError,
    },
    #[error("start the proxy of {pod}: {source}")]
    Proxy {
        pod: String,
        #[source]
        source: mesh_proxy::proxy::ProxyError,
    },
}

impl EnrollError {
    /// The `reason` label of `mesh_agent_enroll_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            EnrollError::Datapath { source, .. } => source.kind(),
            EnrollError::Netns { .. } => "netns",
            EnrollError::Proxy { .. } => "proxy",
        }
    }
}

/// Where the wanted pods come from.
pub enum Wanted {
    /// Only the pods given on the command line.
    Fixed,
    /// The configuration's workloads of `node` that name their cgroup and netns
    /// (`--enroll-from-config`).
    Config { node: String },
    /// The meshed pods of this node, found on it (`--discover-pods`).
    Discovered(NodePods),
}

/// What changes to bring the enrolled pods to the wanted ones.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Enrolled and no longer wanted, or wanted with another spec: unenrolled first.
    pub unenroll: Vec<String>,
    /// Wanted and not enrolled (including the changed ones, once unenrolled).
    pub enroll: Vec<String>,
}

/// Compares the `wanted` pods with the `enrolled` ones.
pub fn plan(wanted: &BTreeMap<String, PodSpec>, enrolled: &BTreeMap<String, PodSpec>) -> Plan {
    let unenroll: Vec<String> = enrolled
        .iter()
        .filter(|(name, spec)| wanted.get(*name) != Some(*spec))
        .map(|(name, _)| name.clone())
        .collect();
    let enroll = wanted
        .iter()
        .filter(|(name, spec)| enrolled.get(*name) != Some(*spec))
        .map(|(name, _)| name.clone())
        .collect();
    Plan { unenroll, enroll }
}

/// The answer to a CNI call for a pod, once the round has tried to bring it where the call
/// wants it: `why_not` says why a pod that is not enrolled is not.
pub fn cni_answer(op: mesh_cni::Op, enrolled: bool, why_not: Option<String>) -> mesh_cni::Response {
    use mesh_cni::{Op, Response};
    match (op, enrolled) {
        (Op::Del, true) => Response::Failed {
            message: "still enrolled".into(),
        },
        (Op::Del, false) => Response::Removed,
        (Op::Add | Op::Check, true) => Response::Enrolled,
        (Op::Add | Op::Check, false) => Response::Failed {
            message: why_not.unwrap_or_else(|| "not enrolled".into()),
        },
    }
}

/// The pods of this node: what is wanted, what is enrolled and served, and the CNI calls that
/// wait for them.
pub struct Reconciler<N: Node> {
    node: N,
    wanted: Wanted,
    failures: Arc<EnrollFailures>,
    /// Pods given on the command line: enrolled once, at start, and never reconciled.
    fixed: Vec<PodSpec>,
    /// Pods enrolled by the reconcile, with the spec they were enrolled with.
    enrolled: BTreeMap<String, PodSpec>,
    /// Every pod served, the fixed ones too.
    served: HashMap<String, N::Served>,
    /// CNI calls waiting for the controller to announce their pod.
    waiting: Vec<CniCall>,
    /// The reasons logged for pods refused, said once per reason.
    refused: BTreeMap<String, String>,
    /// What the cluster asked to capture, once set.
    capture: Option<Vec<Cidr>>,
    /// Whether the agent was started with ranges of its own (`--capture`).
    own_capture: bool,
}

impl<N: Node> Reconciler<N> {
    pub fn new(
        node: N,
        wanted: Wanted,
        failures: Arc<EnrollFailures>,
        own_capture: bool,
    ) -> Reconciler<N> {
        Reconciler {
            node,
            wanted,
            failures,
            fixed: Vec::new(),
            enrolled: BTreeMap::new(),
            served: HashMap::new(),
            waiting: Vec::new(),
            refused: BTreeMap::new(),
            capture: None,
            own_capture,
        }
    }

    /// Enrolls the pods given on the command line; any failure is the agent's.
    pub fn enroll_fixed(&mut self, pods: &[PodSpec]) -> Result<(), EnrollError> {
        for pod in pods {
            let served = self.node.enroll(pod)?;
            self.served.insert(pod.name.clone(), served);
            self.fixed.push(pod.clone());
        }
        Ok(())
    }

    /// Holds a CNI call until the next round decides it.
    pub fn hold(&mut self, call: CniCall) {
        self.waiting.push(call);
    }

    /// CNI calls wait: the caller should run a round soon, to notice a plugin that gave up.
    pub fn waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// A pod's enrollment failed: the caller should run a round after
    /// [`super::RETRY_AFTER`].
    pub fn retrying(&self) -> bool {
        self.failures.any()
    }

    pub fn served(&self) -> impl Iterator<Item = &N::Served> {
        self.served.values()
    }

    /// Every pod served, by `namespace/name`.
    pub fn served_by_name(&self) -> impl Iterator<Item = (&str, &N::Served)> {
        self.served.iter().map(|(name, s)| (name.as_str(), s))
    }

    pub fn node_mut(&mut self) -> &mut N {
        &mut self.node
    }

    /// The pods enrolled by the reconcile (not the fixed ones).
    pub fn enrolled(&self) -> &BTreeMap<String, PodSpec> {
        &self.enrolled
    }

    /// One round against `snapshot` (`arrived`: a configuration has come from the
    /// controller). Returns the pods wanted, for the admin pages.
    pub fn round(&mut self, snapshot: &NodeSnapshot, arrived: bool) -> Vec<PodSpec> {
        if arrived {
            self.capture(snapshot);
        }
        let decided = self.decide_calls(snapshot);
        let fixed: Vec<String> = self.fixed.iter().map(|p| p.name.clone()).collect();
        let (wanted, refused) = match &mut self.wanted {
            Wanted::Discovered(pods) => pods.desired(snapshot, &fixed),
            Wanted::Config { node } => super::desired(snapshot, node, &fixed),
            Wanted::Fixed => Default::default(),
        };
        let refused: BTreeMap<String, String> = refused
            .into_iter()
            .map(|(pod, refusal)| (pod, refusal.to_string()))
            .collect();
        for (pod, reason) in &refused {
            if self.refused.get(pod) != Some(reason) {
                tracing::warn!(%pod, %reason, "cannot enroll a pod of the configuration");
            }
        }
        let plan = plan(&wanted, &self.enrolled);
        for name in &plan.unenroll {
            self.served.remove(name);
            if let Some(spec) = self.enrolled.remove(name)
                && let Err(e) = self.node.unenroll(&spec)
            {
                tracing::warn!(pod = %name, error = %e, "unenroll failed");
            }
            tracing::info!(pod = %name, "unenrolled: no longer in the configuration as it was");
        }
        // Pods no longer wanted have nothing left to retry.
        self.failures.retain(|name| wanted.contains_key(name));
        for name in plan.enroll {
            let spec = &wanted[&name];
            match self.node.enroll(spec) {
                Ok(served) => {
                    self.failures.clear(&name);
                    self.served.insert(name.clone(), served);
                    self.enrolled.insert(name, spec.clone());
                }
                // Retried after RETRY_AFTER or at the next round.
                Err(e) => {
                    // Each error's message carries its source's.
                    let error = e.to_string();
                    tracing::warn!(pod = %name, reason = e.kind(), %error,
                        "enroll failed: the pod is not meshed; retrying");
                    self.failures.failed(&name, e.kind(), error);
                }
            }
        }
        for (call, name) in decided {
            let why_not = self
                .failures
                .get(&name)
                .or_else(|| refused.get(&name).cloned());
            let answer = cni_answer(call.request.op, self.enrolled.contains_key(&name), why_not);
            let _ = call.reply.send(answer);
        }
        self.refused = refused;
        wanted.into_values().collect()
    }

    /// Brings the cluster's capture ranges into the datapath when they changed.
    fn capture(&mut self, snapshot: &NodeSnapshot) {
        let cluster: Vec<Cidr> = snapshot
            .capture
            .iter()
            .filter_map(|c| c.parse().ok())
            .collect();
        if self.capture.as_ref() == Some(&cluster) {
            return;
        }
        match self.node.set_capture(&cluster) {
            Ok(()) => {
                tracing::info!(cluster = ?snapshot.capture, "capture");
                if cluster.is_empty() && !self.own_capture {
                    tracing::warn!(
                        "nothing is captured: the cluster names no pod or service CIDR (Node.spec.podCIDRs, ServiceCIDR, the controller's --service-cidr) and no --capture is given"
                    );
                }
                self.capture = Some(cluster);
            }
            Err(e) => tracing::warn!(error = %e, "cannot update what is captured"),
        }
    }

    /// Decides the waiting CNI calls: answers those it can now, keeps those that wait, and
    /// returns those to answer once this round's enrollments were tried.
    fn decide_calls(&mut self, snapshot: &NodeSnapshot) -> Vec<(CniCall, String)> {
        let Wanted::Discovered(pods) = &mut self.wanted else {
            return Vec::new();
        };
        let mut decided = Vec::new();
        for call in std::mem::take(&mut self.waiting) {
            // The plugin gave up (its runtime timed out): nothing to answer.
            if call.reply.is_closed() {
                continue;
            }
            match pods.call(&call.request, snapshot) {
                Decision::Answer(a) => {
                    let _ = call.reply.send(a);
                }
                Decision::Wait => self.waiting.push(call),
                Decision::Enroll { name } | Decision::Unenroll { name } => {
                    decided.push((call, name));
                }
            }
        }
        decided
    }

    /// Stops serving every pod, then, with `unenroll`, takes them out of the datapath.
    pub fn finish(mut self, unenroll: bool) {
        self.served.clear();
        if unenroll {
            for pod in self.fixed.iter().chain(self.enrolled.values()) {
                if let Err(e) = self.node.unenroll(pod) {
                    tracing::warn!(pod = %pod.name, error = %e, "unenroll failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
