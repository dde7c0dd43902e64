//! What the admin endpoint answers on the debug pages the commands read: `/debug/pods`,
//! `/debug/policy/<ns>/<pod>`, `/debug/policy/check` and `/debug/status`. Every view is
//! `Serialize` for the agent and `Deserialize` for the commands.
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::SystemTime;

use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, NodeSnapshot, Protocol, Service, TlsMode, Workload};
use mesh_core::policy::{
    Conn, HeaderLookup, InboundPolicy, Permit, Request, Rule, TrafficPolicyMode, authorize,
};
use serde::{Deserialize, Serialize};

use crate::admin::AdminState;
use crate::config::{Mode, PodSpec};
use crate::debug::DebugError;
use crate::debug::kernel::{self, Hook};
use crate::debug::maps::{self, MapSummary};
use crate::debug::probe::{self, PodHealth, PodProbe};
use crate::features::Check;

// === /debug/pods ===

/// An enrolled pod: what the agent was told, what the kernel holds, what the controller says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodView {
    pub name: String,
    pub ip: Ipv4Addr,
    /// STRICT or PERMISSIVE, as enrolled.
    pub mode: String,
    /// Application ports whose inbound TCP is steered to the proxy.
    pub inbound_ports: Vec<u16>,
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
    let maps = crate::ebpf::Maps::open(&state.config.datapath.pin_dir());
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

fn kernel_pod(maps: &crate::ebpf::Maps, p: &PodSpec) -> (Option<KernelPod>, Option<String>) {
    let entry = match maps.pods.get(&crate::ebpf::ip_key(p.ip), 0) {
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

/// The open connections ([`crate::telemetry::ConnInfo`]), `pod`'s only if given, each with
/// `protocol`: the application protocol the configuration declares for its destination port
/// (the service port's `appProtocol` or name), `tcp` when none does.
pub fn conns(state: &AdminState, pod: Option<&str>) -> Vec<serde_json::Value> {
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
        .filter_map(|c| {
            let protocol = c
                .dst_addr
                .parse::<SocketAddrV4>()
                .ok()
                .and_then(|a| protocols.get(&a).copied())
                .unwrap_or_default();
            let mut v = serde_json::to_value(&c).ok()?;
            v["protocol"] = serde_json::to_value(protocol).ok()?;
            Some(v)
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

fn snapshot(state: &AdminState) -> Result<std::sync::Arc<crate::state::Applied>, DebugError> {
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

// === /debug/policy/check ===

/// The question of `policy check`.
#[derive(Debug, Clone, Default)]
pub struct CheckQuery {
    /// A SPIFFE ID, a pod (`ns/name` or IP) or `plaintext`.
    pub from: String,
    /// A pod or service (`ns/name` or IP), with `:port`.
    pub to: String,
    pub method: Option<String>,
    pub path: Option<String>,
    /// `name: value` headers of the request.
    pub headers: Vec<(String, String)>,
}

/// The answer of `policy check`: one decision per destination pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyCheck {
    /// The caller's identity, or `plaintext`.
    pub from: String,
    /// The pod given as the caller, when one was.
    pub from_pod: Option<String>,
    pub to: String,
    /// `GET /path` when a request was checked.
    pub request: Option<String>,
    /// `allowed` when every pod decided here allows, `denied` when one denies, `elsewhere`
    /// when every destination pod is on another node (whose agent decides).
    pub verdict: String,
    pub decisions: Vec<Decision>,
}

/// The decision for one destination pod.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Decision {
    pub pod: String,
    pub ip: Option<Ipv4Addr>,
    /// The port on the pod (a service port is mapped to its target port).
    pub port: u16,
    /// The service (and split) the pod was reached through.
    pub via: Option<String>,
    pub node: Option<String>,
    /// The pod is on this node: its policy is here and this is its proxy's decision.
    pub decided_here: bool,
    /// `allowed`, `denied`, `elsewhere` (another node's agent decides) or `unmeshed`.
    pub verdict: String,
    /// The permit's or the denial's stable kind (the denial's is the `reason` the proxy's
    /// access log and flows carry).
    pub kind: Option<String>,
    pub reason: String,
    /// The TrafficTarget that allowed.
    pub traffic_target: Option<String>,
    /// The HTTP match that allowed a request.
    pub route: Option<String>,
    pub tls_mode: Option<TlsMode>,
    pub policy_mode: Option<TrafficPolicyMode>,
    /// The pod's rules that list the caller (all rules for a plaintext caller).
    pub rules_for_caller: Vec<Rule>,
}

enum Source {
    Identity(SpiffeId),
    Plaintext,
}

struct Target {
    pod: Option<NamespacedName>,
    ip: Option<Ipv4Addr>,
    port: u16,
    via: Option<String>,
    node: Option<String>,
}

struct Headers(Vec<(String, String)>);

impl HeaderLookup for Headers {
    fn header(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub fn policy_check(state: &AdminState, q: &CheckQuery) -> Result<PolicyCheck, DebugError> {
    let applied = snapshot(state)?;
    let s = &applied.snapshot;
    let (source, from_pod) = resolve_source(s, &q.from)?;
    let targets = resolve_destination(s, &q.to)?;
    let headers = Headers(q.headers.clone());
    let method = q
        .method
        .clone()
        .unwrap_or_else(|| "GET".into())
        .to_ascii_uppercase();
    let request = q.path.as_ref().map(|path| Request {
        method: &method,
        path,
        headers: &headers,
    });
    let caller = match &source {
        Source::Identity(id) => Some(id),
        Source::Plaintext => None,
    };
    let decisions: Vec<Decision> = targets
        .iter()
        .map(|t| decide(s, caller, t, request.as_ref()))
        .collect();
    let here: Vec<&Decision> = decisions.iter().filter(|d| d.decided_here).collect();
    let verdict = if here.is_empty() {
        if decisions.iter().all(|d| d.verdict == "unmeshed") {
            "unmeshed"
        } else {
            "elsewhere"
        }
    } else if here.iter().all(|d| d.verdict == "allowed") {
        "allowed"
    } else {
        "denied"
    };
    Ok(PolicyCheck {
        from: caller.map_or_else(|| "plaintext".into(), |id| id.to_string()),
        from_pod,
        to: q.to.clone(),
        request: q.path.as_ref().map(|p| format!("{method} {p}")),
        verdict: verdict.into(),
        decisions,
    })
}

fn decide(
    s: &NodeSnapshot,
    caller: Option<&SpiffeId>,
    t: &Target,
    request: Option<&Request<'_>>,
) -> Decision {
    let mut d = Decision {
        pod: t
            .pod
            .as_ref()
            .map_or_else(|| "-".into(), ToString::to_string),
        ip: t.ip,
        port: t.port,
        via: t.via.clone(),
        node: t.node.clone(),
        decided_here: false,
        verdict: String::new(),
        kind: None,
        reason: String::new(),
        traffic_target: None,
        route: None,
        tls_mode: None,
        policy_mode: None,
        rules_for_caller: Vec::new(),
    };
    let Some(pod) = &t.pod else {
        d.verdict = "unmeshed".into();
        d.reason = "the endpoint is not a meshed pod: no policy applies, the connection goes \
                    to it directly"
            .into();
        return d;
    };
    if !s.workloads.contains_key(pod) {
        d.verdict = "elsewhere".into();
        d.reason = format!(
            "{pod} is on node {}: its agent decides (run `policy check` there)",
            t.node.as_deref().unwrap_or("unknown")
        );
        return d;
    }
    d.node = Some(s.node.clone());
    d.decided_here = true;
    let Some(policy) = s.policies.get(pod) else {
        d.verdict = "denied".into();
        d.kind = Some("no_policy".into());
        d.reason = format!("no policy for {pod} yet: its proxy refuses every caller");
        return d;
    };
    d.tls_mode = Some(policy.tls_mode);
    d.policy_mode = Some(policy.mode);
    d.rules_for_caller = policy
        .rules
        .iter()
        .filter(|r| caller.is_none_or(|c| r.sources.contains(c)))
        .cloned()
        .collect();
    let conn = Conn {
        source: caller,
        port: t.port,
        request,
    };
    match authorize(policy, &conn) {
        Ok(permit) => {
            d.verdict = "allowed".into();
            d.kind = Some(permit.kind().into());
            d.reason = permit.to_string();
            d.traffic_target = permit.traffic_target().map(ToString::to_string);
            if let Permit::Http { route, .. } = permit {
                d.route = Some(route.to_string());
            }
        }
        Err(denied) => {
            d.verdict = "denied".into();
            d.kind = Some(denied.kind().into());
            d.reason = denied.to_string();
        }
    }
    d
}

fn resolve_source(s: &NodeSnapshot, from: &str) -> Result<(Source, Option<String>), DebugError> {
    if from.eq_ignore_ascii_case("plaintext") {
        return Ok((Source::Plaintext, None));
    }
    if from.starts_with("spiffe://") {
        let id = from
            .parse::<SpiffeId>()
            .map_err(|e| DebugError::BadRequest(format!("--from {from}: {e}")))?;
        return Ok((Source::Identity(id), None));
    }
    let ip = from.parse::<Ipv4Addr>().ok();
    let name = if ip.is_none() {
        Some(parse_name(from)?)
    } else {
        None
    };
    let matches_workload =
        |w: &Workload| ip.is_some_and(|ip| w.ips.contains(&ip)) || Some(&w.name) == name.as_ref();
    if let Some(w) = s.workloads.values().find(|w| matches_workload(w)) {
        return Ok((
            Source::Identity(w.identity.clone()),
            Some(w.name.to_string()),
        ));
    }
    for svc in s.services.values() {
        for e in &svc.endpoints {
            let hit = ip.is_some_and(|ip| e.ip == ip)
                || (name.is_some() && e.workload.as_ref() == name.as_ref());
            if hit && let Some(id) = &e.identity {
                let pod = e.workload.as_ref().map(ToString::to_string);
                return Ok((Source::Identity(id.clone()), pod));
            }
        }
    }
    Err(DebugError::NotFound(format!(
        "unknown source {from}: not a meshed pod this node's configuration knows (its own \
         pods and the endpoints of services); give the caller's identity instead, like \
         spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>, or `plaintext`"
    )))
}

fn split_port(to: &str) -> Result<(&str, Option<u16>), DebugError> {
    match to.rsplit_once(':') {
        Some((name, port)) => {
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    DebugError::BadRequest(format!("--to {to}: {port:?} is not a port"))
                })?;
            Ok((name, Some(port)))
        }
        None => Ok((to, None)),
    }
}

fn resolve_destination(s: &NodeSnapshot, to: &str) -> Result<Vec<Target>, DebugError> {
    let (what, port) = split_port(to)?;
    let need_port =
        || DebugError::BadRequest(format!("--to {to}: give the port, like {what}:8080"));
    let ip = what.parse::<Ipv4Addr>().ok();
    let name = if ip.is_none() {
        Some(parse_name(what)?)
    } else {
        None
    };
    // A pod of this node.
    if let Some(w) = s
        .workloads
        .values()
        .find(|w| ip.is_some_and(|ip| w.ips.contains(&ip)) || Some(&w.name) == name.as_ref())
    {
        return Ok(vec![Target {
            pod: Some(w.name.clone()),
            ip: w.ips.first().copied(),
            port: port.ok_or_else(need_port)?,
            via: None,
            node: Some(w.node.clone()),
        }]);
    }
    // A service.
    if let Some(svc) = s
        .services
        .values()
        .find(|svc| (ip.is_some() && svc.vip == ip) || Some(&svc.name) == name.as_ref())
    {
        return service_targets(s, svc, port, to);
    }
    // A pod of another node, known as an endpoint.
    for svc in s.services.values() {
        if let Some(e) = svc.endpoints.iter().find(|e| {
            ip.is_some_and(|ip| e.ip == ip)
                || (name.is_some() && e.workload.as_ref() == name.as_ref())
        }) {
            return Ok(vec![Target {
                pod: e.workload.clone(),
                ip: Some(e.ip),
                port: port.ok_or_else(need_port)?,
                via: None,
                node: e.node.clone(),
            }]);
        }
    }
    Err(DebugError::NotFound(format!(
        "unknown destination {what}: not a pod or service of node {}'s configuration (pods: \
         {}; services: {})",
        s.node,
        names(s.workloads.keys()),
        names(s.services.keys())
    )))
}

fn service_targets(
    s: &NodeSnapshot,
    svc: &Service,
    port: Option<u16>,
    to: &str,
) -> Result<Vec<Target>, DebugError> {
    let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
    let sp = match port {
        Some(p) => svc.ports.iter().find(|sp| sp.port == p),
        None if svc.ports.len() == 1 => svc.ports.first(),
        None => None,
    }
    .ok_or_else(|| {
        DebugError::BadRequest(format!(
            "--to {to}: service {} has no such port; its ports are {}",
            svc.name,
            if ports.is_empty() {
                "none".into()
            } else {
                ports.join(", ")
            }
        ))
    })?;
    let split = s.splits.values().find(|sp| sp.root == svc.name);
    let backends: Vec<(&Service, u16, String)> = match split {
        None => vec![(
            svc,
            sp.target_port,
            format!("service {}:{}", svc.name, sp.port),
        )],
        Some(split) => split
            .backends
            .iter()
            .filter_map(|b| s.services.get(&b.service))
            .filter_map(|b| {
                let bp = b
                    .ports
                    .iter()
                    .find(|p| p.name == sp.name)
                    .or_else(|| b.ports.iter().find(|p| p.port == sp.port))?;
                Some((
                    b.as_ref(),
                    bp.target_port,
                    format!(
                        "service {}:{} (TrafficSplit {} -> {})",
                        svc.name, sp.port, split.name, b.name
                    ),
                ))
            })
            .collect(),
    };
    let mut out = Vec::new();
    for (b, target_port, via) in backends {
        for e in &b.endpoints {
            out.push(Target {
                pod: e.workload.clone(),
                ip: Some(e.ip),
                port: target_port,
                via: Some(via.clone()),
                node: e.node.clone(),
            });
        }
    }
    if out.is_empty() {
        return Err(DebugError::NotFound(format!(
            "--to {to}: service {} has no endpoints",
            svc.name
        )));
    }
    Ok(out)
}

// === /debug/status ===

/// Everything `status` reports, with a verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusView {
    /// Every check passed.
    pub healthy: bool,
    /// What failed, one line each.
    pub problems: Vec<String>,
    pub agent: AgentView,
    pub kernel: KernelView,
    pub programs: Vec<Attachment>,
    pub maps: Vec<MapSummary>,
    /// `None` without a controller.
    pub controller: Option<ControllerView>,
    pub certs: CertSummary,
    pub pods: Vec<PodHealth>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentView {
    pub version: String,
    pub instance: String,
    pub node: Option<String>,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub uptime_ms: u64,
    pub pin_dir: String,
    pub cgroup: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KernelView {
    pub release: String,
    /// The check the agent runs at start (`mesh-agent doctor` runs more).
    pub checks: Vec<Check>,
}

/// A program the datapath needs attached somewhere, and whether it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attachment {
    pub program: String,
    pub hook: String,
    /// `agent` or the pod.
    pub owner: String,
    /// The cgroup, namespace or interface.
    pub target: String,
    pub attached: bool,
    /// The programs the kernel lists there.
    pub ids: Vec<u32>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerView {
    pub address: String,
    pub connected: bool,
    pub reconnects: u64,
    pub last_error: Option<String>,
    /// `epoch.seq` of the configuration in force; `None` before the first.
    pub config_version: Option<String>,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    pub updates_applied: u64,
    pub updates_refused: u64,
    pub last_refusal: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertSummary {
    pub count: usize,
    /// By state (`valid`, `renewing`, `issuing`, `failed`, `expired`).
    pub states: BTreeMap<String, usize>,
    pub nearest_expiry: Option<String>,
    pub nearest_expiry_identity: Option<String>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Computes the status: kernel, programs, maps, controller, certificates, and every pod's
/// probe (see [`probe`]). Blocking: run it off the runtime.
pub fn status(state: &AdminState) -> StatusView {
    let cfg = &state.config;
    let mount = crate::cgroup::v2_mount().ok();
    let own_cgroup = mount.as_ref().and_then(|m| crate::cgroup::current(m).ok());
    let agent = AgentView {
        version: env!("CARGO_PKG_VERSION").into(),
        instance: cfg.datapath.instance.clone(),
        node: cfg.controller.as_ref().map(|c| c.node.clone()),
        pid: std::process::id(),
        started_unix_ms: unix_ms(state.started),
        uptime_ms: unix_ms(SystemTime::now()).saturating_sub(unix_ms(state.started)),
        pin_dir: cfg.datapath.pin_dir().display().to_string(),
        cgroup: own_cgroup.as_ref().map(|p| p.display().to_string()),
    };
    let kernel = KernelView {
        release: kernel::release(),
        checks: crate::features::check(false),
    };
    let mut programs = Vec::new();
    if let Some(cg) = &own_cgroup {
        for (hook, program) in [
            (Hook::GetSockopt, mesh_common::PROG_GETSOCKOPT),
            (Hook::SockOps, mesh_common::PROG_SOCKOPS),
        ] {
            programs.push(attachment("agent", hook, program, cg));
        }
    }
    let enrolled = state.pods();
    for p in &enrolled {
        programs.push(attachment(
            &p.name,
            Hook::Connect4,
            mesh_common::PROG_CONNECT4,
            &p.cgroup,
        ));
        programs.push(attachment(
            &p.name,
            Hook::SockOps,
            mesh_common::PROG_SOCKOPS,
            &p.cgroup,
        ));
        programs.push(attachment(
            &p.name,
            Hook::SkLookup,
            mesh_common::PROG_SK_LOOKUP,
            &p.netns,
        ));
        if let Some(tc) = tc_attachment(p) {
            programs.push(tc);
        }
    }
    let maps = maps::summaries(&cfg.datapath.pin_dir());
    let applied = state.store.as_ref().map(|s| (s.current(), s.stats()));
    let controller = cfg.controller.as_ref().map(|settings| {
        let st = state
            .control
            .as_ref()
            .map(|c| c.status())
            .unwrap_or_default();
        let (version, counts, stats) = match &applied {
            Some((a, stats)) => (
                a.version.map(|v| format!("{}.{}", v.epoch, v.seq)),
                (
                    a.snapshot.workloads.len(),
                    a.snapshot.services.len(),
                    a.snapshot.policies.len(),
                ),
                stats.clone(),
            ),
            None => (None, (0, 0, 0), Default::default()),
        };
        ControllerView {
            address: settings.address.clone(),
            connected: st.connected,
            reconnects: st.reconnects,
            last_error: st.last_error,
            config_version: version,
            workloads: counts.0,
            services: counts.1,
            policies: counts.2,
            updates_applied: stats.applied,
            updates_refused: stats.refused,
            last_refusal: stats.last_refusal,
        }
    });
    let certs = cert_summary(state);
    let snapshot = applied.as_ref().map(|(a, _)| &a.snapshot);
    let pods: Vec<PodHealth> = std::thread::scope(|scope| {
        let running: Vec<_> = enrolled
            .iter()
            .map(|spec| {
                let probe = PodProbe {
                    spec,
                    datapath: &cfg.datapath,
                    target: probe::target(&cfg.datapath, snapshot, spec.ip),
                    telemetry: &state.telemetry,
                };
                scope.spawn(move || probe.run(&|src| state.flows.note_probe(src)))
            })
            .collect();
        running
            .into_iter()
            .zip(&enrolled)
            .map(|(handle, spec)| {
                handle.join().unwrap_or_else(|_| PodHealth {
                    pod: spec.name.clone(),
                    ip: spec.ip,
                    healthy: false,
                    checks: vec![Check::new("probe", Err("the check itself failed".into()))],
                })
            })
            .collect()
    });

    let mut problems = Vec::new();
    for c in kernel.checks.iter().filter(|c| !c.ok) {
        problems.push(format!("kernel: {}: {}", c.name, c.detail));
    }
    // The pods' cgroup and namespace programs are in their own checks below.
    let pod_checked = [
        Hook::Connect4.name(),
        Hook::SockOps.name(),
        Hook::SkLookup.name(),
    ];
    for a in programs
        .iter()
        .filter(|a| !a.attached)
        .filter(|a| a.owner == "agent" || !pod_checked.contains(&a.hook.as_str()))
    {
        problems.push(format!(
            "{}: {} is not attached at {} of {}",
            a.owner, a.program, a.hook, a.target
        ));
    }
    for m in &maps {
        if let Some(e) = &m.error {
            problems.push(format!("map {}: {e}", m.name));
        }
    }
    if let Some(c) = &controller
        && !c.connected
    {
        problems.push(format!(
            "controller {} not connected{}",
            c.address,
            c.last_error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    for p in &pods {
        for c in p.checks.iter().filter(|c| !c.ok) {
            problems.push(format!("{}: {}: {}", p.pod, c.name, c.detail));
        }
    }
    StatusView {
        healthy: problems.is_empty(),
        problems,
        agent,
        kernel,
        programs,
        maps,
        controller,
        certs,
        pods,
    }
}

fn attachment(owner: &str, hook: Hook, program: &str, target: &Path) -> Attachment {
    let mut a = Attachment {
        program: program.into(),
        hook: hook.name().into(),
        owner: owner.into(),
        target: target.display().to_string(),
        attached: false,
        ids: Vec::new(),
        detail: None,
    };
    match kernel::attached_at(target, hook) {
        Ok(ids) => {
            let names = kernel::program_names(&ids);
            a.attached = ids
                .iter()
                .any(|id| names.get(id).is_some_and(|n| n == program));
            a.ids = ids;
        }
        Err(e) => a.detail = Some(format!("query {}: {e}", target.display())),
    }
    a
}

/// tc ingress on the pod's interface: listed through TCX (Linux 6.6+) from inside the pod's
/// namespace. Older kernels attach a netlink filter, which this does not list.
fn tc_attachment(p: &PodSpec) -> Option<Attachment> {
    if !crate::features::kernel_at_least(6, 6) {
        return None;
    }
    let program = mesh_common::PROG_TC_INGRESS;
    let target = format!("{} in {}", p.iface, p.netns.display());
    let mut a = Attachment {
        program: program.into(),
        hook: Hook::TcxIngress.name().into(),
        owner: p.name.clone(),
        target,
        attached: false,
        ids: Vec::new(),
        detail: None,
    };
    let iface = p.iface.clone();
    let queried = crate::netns::open(&p.netns)
        .map_err(|e| e.to_string())
        .and_then(|ns| {
            crate::netns::run_in(&ns, &p.netns, move || {
                let index = nix::net::if_::if_nametoindex(iface.as_str())
                    .map_err(|e| format!("no interface {iface}: {e}"))?;
                kernel::attached(kernel::Target::IfIndex(index), Hook::TcxIngress)
                    .map_err(|e| e.to_string())
            })
            .map_err(|e| e.to_string())?
        });
    match queried {
        Ok(ids) => {
            let names = kernel::program_names(&ids);
            a.attached = ids
                .iter()
                .any(|id| names.get(id).is_some_and(|n| n == program));
            a.ids = ids;
        }
        Err(e) => a.detail = Some(e),
    }
    Some(a)
}

fn cert_summary(state: &AdminState) -> CertSummary {
    let Some(certs) = &state.certs else {
        return CertSummary::default();
    };
    let all = certs.certs();
    let mut summary = CertSummary {
        count: all.len(),
        ..CertSummary::default()
    };
    for c in &all {
        let state = serde_json::to_value(c.state)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        *summary.states.entry(state).or_default() += 1;
    }
    // RFC 3339 UTC strings of one format sort in time order.
    if let Some(nearest) = all
        .iter()
        .filter(|c| c.not_after.is_some())
        .min_by(|a, b| a.not_after.cmp(&b.not_after))
    {
        summary.nearest_expiry = nearest.not_after.clone();
        summary.nearest_expiry_identity = Some(nearest.identity.to_string());
    }
    summary
}
