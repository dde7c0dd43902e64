//! The typed API of the admin endpoint: what it answers on the debug pages the commands read:
//! `/debug/pods`, `/debug/conns` ([`OpenConn`]), `/debug/certs`
//! ([`mesh_proxy::identity::CertInfo`]), `/debug/policy/<ns>/<pod>`, `/debug/policy/check`
//! ([`check`]) and `/debug/status` ([`status`]). Every view is `Serialize` for the agent and
//! `Deserialize` for the commands, which never index untyped JSON: a renamed field fails to
//! parse instead of printing a default.
use std::net::{Ipv4Addr, SocketAddrV4};

use mesh_core::model::{NamespacedName, Protocol, Workload};
use mesh_core::policy::InboundPolicy;
use mesh_proxy::telemetry::ConnInfo;
use serde::{Deserialize, Serialize};

use crate::admin::AdminState;
use crate::admin::DebugError;
use mesh_datapath::config::{Mode, PodSpec};

mod check;
mod status;

pub use check::{CheckQuery, Decision, PolicyCheck, policy_check};
pub use status::{
    AgentView, Attachment, CertSummary, ControllerView, KernelView, StatusView, status,
};

// === /debug/pods ===

/// An enrolled pod: what the agent was told, what the kernel holds, what the controller says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodView {
    pub name: String,
    pub ip: Ipv4Addr,
    /// STRICT or PERMISSIVE, as enrolled.
    pub mode: String,
    /// Declared application ports (a STRICT pod's every port is steered but the excluded).
    pub inbound_ports: Vec<u16>,
    /// Ports excluded from inbound capture.
    #[serde(default)]
    pub excluded_inbound_ports: Vec<u16>,
    /// Why the agent could not enroll the pod (it retries); `None` when it did.
    #[serde(default)]
    pub enroll_error: Option<String>,
    pub iface: String,
    pub cgroup: String,
    pub netns: String,
    /// From the datapath's pod table; `None` when the pod is not in it.
    pub kernel: Option<KernelPod>,
    /// Why the kernel's view is missing.
    pub kernel_error: Option<String>,
    /// From the configuration in force; `None` when the controller does not (yet) know it.
    pub identity: Option<String>,
    pub service_account: Option<String>,
    /// Connections the proxy carries for the pod now.
    pub open_outbound: usize,
    pub open_inbound: usize,
}

/// The pod as the datapath's maps hold it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelPod {
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub permissive: bool,
    /// Packets and bytes tc counted into the pod.
    pub rx_packets: u64,
    pub rx_bytes: u64,
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Strict => "STRICT",
        Mode::Permissive => "PERMISSIVE",
    }
}

pub fn pods(state: &AdminState) -> Vec<PodView> {
    let snapshot = state.store.as_ref().map(|s| s.current());
    let maps = mesh_datapath::ebpf::Maps::open(&state.config.datapath.pin_dir());
    let conns = state.telemetry.connections();
    state
        .pods()
        .iter()
        .map(|p| {
            let workload = snapshot.as_ref().and_then(|a| {
                a.snapshot
                    .workloads
                    .values()
                    .find(|w| w.name.to_string() == p.name)
                    .cloned()
            });
            let (kernel, kernel_error) = match &maps {
                Ok(m) => kernel_pod(m, p),
                Err(e) => (None, Some(e.to_string())),
            };
            let open = |dir: &str| {
                conns
                    .iter()
                    .filter(|c| c.pod == p.name && c.direction == dir)
                    .count()
            };
            PodView {
                name: p.name.clone(),
                ip: p.ip,
                mode: mode_name(p.mode).into(),
                inbound_ports: p.inbound_ports.clone(),
                excluded_inbound_ports: p.excluded_inbound_ports.clone(),
                enroll_error: state.enroll_failures.get(&p.name),
                iface: p.iface.clone(),
                cgroup: p.cgroup.display().to_string(),
                netns: p.netns.display().to_string(),
                kernel,
                kernel_error,
                identity: workload.as_ref().map(|w| w.identity.to_string()),
                service_account: workload.map(|w| w.service_account),
                open_outbound: open("outbound"),
                open_inbound: open("inbound"),
            }
        })
        .collect()
}

fn kernel_pod(
    maps: &mesh_datapath::ebpf::Maps,
    p: &PodSpec,
) -> (Option<KernelPod>, Option<String>) {
    let entry = match maps.pods.get(&mesh_datapath::ebpf::ip_key(p.ip), 0) {
        Ok(e) => e,
        Err(_) => {
            return (
                None,
                Some(format!(
                    "{} has no entry for {}",
                    mesh_common::PODS_MAP,
                    p.ip
                )),
            );
        }
    };
    let counters = maps.pod_counters(p.ip).ok().flatten().unwrap_or_default();
    (
        Some(KernelPod {
            cgroup_id: entry.cgroup,
            netns_cookie: entry.netns,
            permissive: entry.flags & mesh_common::POD_FLAG_PERMISSIVE != 0,
            rx_packets: counters.rx_packets,
            rx_bytes: counters.rx_bytes,
        }),
        None,
    )
}

// === /debug/conns ===

/// One open connection as `/debug/conns` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenConn {
    /// The proxy's record of it.
    #[serde(flatten)]
    pub conn: ConnInfo,
    /// The application protocol the configuration declares for its destination port (the
    /// service port's `appProtocol` or name), `tcp` when none does.
    pub protocol: Protocol,
}

/// The open connections, `pod`'s only if given.
pub fn conns(state: &AdminState, pod: Option<&str>) -> Vec<OpenConn> {
    let mut protocols: std::collections::HashMap<SocketAddrV4, Protocol> =
        std::collections::HashMap::new();
    if let Some(store) = &state.store {
        for svc in store.current().snapshot.services.values() {
            for sp in &svc.ports {
                for e in &svc.endpoints {
                    protocols.insert(SocketAddrV4::new(e.ip, sp.target_port), sp.protocol);
                }
            }
        }
    }
    state
        .telemetry
        .connections()
        .into_iter()
        .filter(|c| pod.is_none_or(|p| c.pod == p))
        .map(|c| {
            let protocol = c
                .dst_addr
                .parse::<SocketAddrV4>()
                .ok()
                .and_then(|a| protocols.get(&a).copied())
                .unwrap_or_default();
            OpenConn { conn: c, protocol }
        })
        .collect()
}

// === /debug/policy/<ns>/<pod> ===

/// A pod's compiled inbound policy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    pub pod: String,
    pub workload: Workload,
    /// `None` until the controller compiled one (the proxy then refuses every caller).
    pub policy: Option<InboundPolicy>,
}

fn snapshot(state: &AdminState) -> Result<std::sync::Arc<mesh_proxy::state::Applied>, DebugError> {
    let store = state.store.as_ref().ok_or_else(|| {
        DebugError::Unavailable(
            "this agent runs without a controller: no identities and no policy (every \
             connection is forwarded as addressed)"
                .into(),
        )
    })?;
    let applied = store.current();
    if applied.version.is_none() {
        return Err(DebugError::Unavailable(
            "no configuration from the controller yet".into(),
        ));
    }
    Ok(applied)
}

pub fn policy(state: &AdminState, pod: &str) -> Result<PolicyView, DebugError> {
    let applied = snapshot(state)?;
    let s = &applied.snapshot;
    let name = parse_name(pod)?;
    let workload = s.workloads.get(&name).cloned().ok_or_else(|| {
        DebugError::NotFound(format!(
            "unknown pod {pod}: not a meshed pod of node {} (its pods: {})",
            s.node,
            names(s.workloads.keys())
        ))
    })?;
    Ok(PolicyView {
        pod: name.to_string(),
        policy: s.policies.get(&name).cloned(),
        workload,
    })
}

fn parse_name(s: &str) -> Result<NamespacedName, DebugError> {
    match s.split_once('/') {
        Some((ns, n)) if !ns.is_empty() && !n.is_empty() && !n.contains('/') => {
            Ok(NamespacedName::new(ns, n))
        }
        _ => Err(DebugError::BadRequest(format!(
            "{s:?} is not NAMESPACE/NAME"
        ))),
    }
}

fn names<'a>(it: impl Iterator<Item = &'a NamespacedName>) -> String {
    let all: Vec<String> = it.map(ToString::to_string).collect();
    if all.is_empty() {
        "none".into()
    } else {
        all.join(", ")
    }
}
