//! `/debug/status`: kernel, programs, maps, controller, certificates, and every pod's
//! checked verdict.
use std::collections::BTreeMap;
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::admin::AdminState;
use crate::admin::probe::{self, PodHealth, PodProbe};
use mesh_datapath::config::PodSpec;
use mesh_datapath::features::Check;
use mesh_datapath::kernel::{self, Hook};
use mesh_datapath::maps::{self, MapSummary};

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
    let mount = mesh_datapath::cgroup::v2_mount().ok();
    let own_cgroup = mount
        .as_ref()
        .and_then(|m| mesh_datapath::cgroup::current(m).ok());
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
        checks: mesh_datapath::features::check(false),
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
            Hook::Connect6,
            mesh_common::PROG_CONNECT6,
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
        if p.mode == mesh_datapath::config::Mode::Strict {
            programs.push(attachment(
                &p.name,
                Hook::SkLookup,
                mesh_common::PROG_SK_LOOKUP6,
                &p.netns,
            ));
        }
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
    if !mesh_datapath::kernel::kernel_at_least(6, 6) {
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
    let queried = mesh_netns::open(&p.netns)
        .map_err(|e| e.to_string())
        .and_then(|ns| {
            mesh_netns::run_in(&ns, &p.netns, move || {
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
