//! The debugging commands: ask the agent (or the kernel), then print a table for people or
//! the JSON for machines.
//!
//! Exit status: 0 when the answer is good news, [`EXIT_FINDING`] when it is not (an unhealthy
//! status, a denied call, a failed preflight, a missing map entry), [`EXIT_USAGE`] for
//! arguments that are wrong or name nothing the agent knows, [`EXIT_UNAVAILABLE`] when no
//! agent answers at `--admin` (or it cannot answer yet), [`EXIT_NOPERM`] when a command that
//! reads the kernel runs without root.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::debug::client::{AdminClient, ClientError, encode};
use crate::debug::flows::{FlowPage, FlowRecord};
use crate::debug::maps::{self, MapSummary};
use crate::debug::probe::PodHealth;
use crate::debug::render::{self, Table, or_dash, short_id};
use crate::debug::views::{PodView, PolicyCheck, PolicyView, StatusView};
use crate::features::Check;

/// The answer is bad news (unhealthy, denied, failed, not found).
pub const EXIT_FINDING: u8 = 1;
/// Wrong arguments, or arguments naming nothing the agent knows (EX_USAGE).
pub const EXIT_USAGE: u8 = 64;
/// No agent at the address, or it cannot answer yet (EX_UNAVAILABLE).
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Reading the kernel needs root (EX_NOPERM).
pub const EXIT_NOPERM: u8 = 77;

/// Why a command stopped: the exit status and what to print.
#[derive(Debug)]
pub struct CommandError {
    pub code: u8,
    pub message: String,
}

impl CommandError {
    pub fn new(code: u8, message: impl Into<String>) -> CommandError {
        CommandError {
            code,
            message: message.into(),
        }
    }
}

impl From<ClientError> for CommandError {
    fn from(e: ClientError) -> CommandError {
        let code = match &e {
            ClientError::Unreachable { .. } => EXIT_UNAVAILABLE,
            ClientError::Refused { status: 503, .. } => EXIT_UNAVAILABLE,
            e if e.is_bad_request() => EXIT_USAGE,
            _ => EXIT_FINDING,
        };
        CommandError::new(code, e.to_string())
    }
}

impl From<serde_json::Error> for CommandError {
    fn from(e: serde_json::Error) -> CommandError {
        CommandError::new(EXIT_FINDING, format!("encode JSON: {e}"))
    }
}

type Result<T> = std::result::Result<T, CommandError>;

/// Exit status 0 or [`EXIT_FINDING`].
pub fn verdict(good: bool) -> u8 {
    if good { 0 } else { EXIT_FINDING }
}

/// Fails with [`EXIT_NOPERM`] unless running as root.
pub fn require_root(command: &str) -> Result<()> {
    if crate::debug::kernel::privileged() {
        Ok(())
    } else {
        Err(CommandError::new(
            EXIT_NOPERM,
            format!(
                "`mesh-agent {command}` reads the kernel's BPF objects and needs root \
                 (CAP_BPF and CAP_SYS_ADMIN); run it with sudo, or in the agent's pod with \
                 `kubectl exec`"
            ),
        ))
    }
}

fn pretty(body: &str) -> Result<String> {
    let v: Value = serde_json::from_str(body)?;
    Ok(serde_json::to_string_pretty(&v)?)
}

/// The enrolled pod `pod` names (`ns/name`, or a name unique across namespaces).
fn pick_pod<'a>(pods: &'a [PodView], pod: &str) -> Result<&'a PodView> {
    let exact = pods.iter().find(|p| p.name == pod);
    let by_name: Vec<&PodView> = pods
        .iter()
        .filter(|p| p.name.rsplit_once('/').is_some_and(|(_, n)| n == pod))
        .collect();
    match (exact, by_name.as_slice()) {
        (Some(p), _) => Ok(p),
        (None, [p]) => Ok(*p),
        _ => {
            let known: Vec<&str> = pods.iter().map(|p| p.name.as_str()).collect();
            Err(CommandError::new(
                EXIT_USAGE,
                format!(
                    "unknown pod {pod}: this agent's pods are {}",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ))
        }
    }
}

/// `pod` as `ns/name`, checked against the agent's enrolled pods.
fn resolve_pod(client: &AdminClient, pod: &str) -> Result<String> {
    let pods: Vec<PodView> = client.get_json("/debug/pods")?;
    Ok(pick_pod(&pods, pod)?.name.clone())
}

// === status ===

/// `mesh-agent status`.
pub fn status(admin: SocketAddr, pin_dir: &Path, json: bool) -> Result<u8> {
    let client = AdminClient::new(admin);
    match client.get("/debug/status") {
        Ok(body) => {
            let view: StatusView = serde_json::from_str(&body)
                .map_err(|e| CommandError::new(EXIT_FINDING, format!("the agent's status: {e}")))?;
            if json {
                println!("{}", pretty(&body)?);
            } else {
                print!("{}", render::fit_lines(&status_text(&view)));
            }
            Ok(verdict(view.healthy))
        }
        Err(e @ ClientError::Unreachable { .. }) => {
            // No agent: what the kernel holds is still worth seeing.
            let offline = offline_status(pin_dir);
            eprintln!("mesh-agent: {e}");
            if json {
                let mut v = offline.clone();
                v["healthy"] = false.into();
                v["agent_error"] = e.to_string().into();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("agent     NOT RUNNING at {admin}");
                print!("{}", offline_text(&offline));
            }
            Ok(EXIT_UNAVAILABLE)
        }
        Err(e) => Err(e.into()),
    }
}

fn offline_status(pin_dir: &Path) -> Value {
    if !crate::debug::kernel::privileged() {
        return serde_json::json!({
            "kernel_error": "not root: the kernel and the pinned maps were not read",
        });
    }
    serde_json::json!({
        "kernel": {
            "release": crate::debug::kernel::release(),
            "checks": crate::features::check(false),
        },
        "pin_dir": pin_dir.display().to_string(),
        "maps": maps::summaries(pin_dir),
    })
}

fn offline_text(v: &Value) -> String {
    let mut out = String::new();
    if let Some(e) = v["kernel_error"].as_str() {
        let _ = writeln!(out, "kernel    {e}");
        return out;
    }
    let checks: Vec<Check> =
        serde_json::from_value(v["kernel"]["checks"].clone()).unwrap_or_default();
    let _ = writeln!(
        out,
        "kernel    {} ({})",
        v["kernel"]["release"].as_str().unwrap_or("?"),
        checks_summary(&checks)
    );
    out.push_str(&render::wrap(
        "pins      ",
        &format!(
            "{} (its links keep the programs attached: without the agent, captured \
             connections are refused)",
            v["pin_dir"].as_str().unwrap_or("?")
        ),
    ));
    let maps: Vec<MapSummary> = serde_json::from_value(v["maps"].clone()).unwrap_or_default();
    out.push('\n');
    out.push_str(&maps_table(&maps).render());
    out
}

fn checks_summary(checks: &[Check]) -> String {
    let failed: Vec<&str> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect();
    if failed.is_empty() {
        format!("{} checks ok", checks.len())
    } else {
        format!("FAILED: {}", failed.join(", "))
    }
}

fn maps_table(maps: &[MapSummary]) -> Table {
    let mut t = Table::new(&["MAP", "KIND", "ENTRIES", "CAPACITY", "~PURPOSE"]);
    for m in maps {
        let entries = match (&m.error, m.entries) {
            (Some(_), _) => "ERROR".to_string(),
            (None, Some(n)) => n.to_string(),
            (None, None) => "-".to_string(),
        };
        let capacity = if m.kind == "ringbuf" {
            render::bytes(m.capacity)
        } else {
            m.capacity.to_string()
        };
        t.row(vec![
            m.name.clone(),
            m.kind.clone(),
            entries,
            capacity,
            m.error.clone().unwrap_or_else(|| m.purpose.clone()),
        ]);
    }
    t
}

fn status_text(s: &StatusView) -> String {
    let mut out = String::new();
    let a = &s.agent;
    let _ = writeln!(
        out,
        "agent       mesh-agent {}, instance {}, node {}, pid {}, up {}",
        a.version,
        a.instance,
        a.node.as_deref().unwrap_or("-"),
        a.pid,
        render::millis(a.uptime_ms)
    );
    let _ = writeln!(
        out,
        "kernel      {} ({})",
        s.kernel.release,
        checks_summary(&s.kernel.checks)
    );
    match &s.controller {
        None => {
            let _ = writeln!(out, "controller  none (transparent forwarding only)");
        }
        Some(c) => {
            let state = if c.connected {
                "connected".to_string()
            } else {
                format!(
                    "NOT CONNECTED ({} reconnects){}",
                    c.reconnects,
                    c.last_error
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                )
            };
            let _ = writeln!(out, "controller  {} {}", c.address, render::fit(&state, 60));
            let _ = writeln!(
                out,
                "config      version {} ({} updates applied, {} refused)",
                c.config_version.as_deref().unwrap_or("none yet"),
                c.updates_applied,
                c.updates_refused
            );
            let _ = writeln!(
                out,
                "            {} workloads, {} services, {} policies",
                c.workloads, c.services, c.policies
            );
            if let Some(refusal) = &c.last_refusal {
                out.push_str(&render::wrap("            last refused: ", refusal));
            }
        }
    }
    let certs = &s.certs;
    let states: Vec<String> = certs
        .states
        .iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect();
    let _ = writeln!(
        out,
        "certs       {} identities{}{}",
        certs.count,
        if states.is_empty() {
            String::new()
        } else {
            format!(" ({})", states.join(", "))
        },
        match (&certs.nearest_expiry, &certs.nearest_expiry_identity) {
            (Some(at), Some(id)) => format!(
                "; nearest expiry {} ({})",
                render::relative(at),
                short_id(id)
            ),
            _ => String::new(),
        }
    );

    out.push_str("\nPODS (checked now: kernel attachments and a probe connection per pod)\n");
    let mut pods = Table::new(&["POD", "IP", "VERDICT", "~CHECKS"]);
    for p in &s.pods {
        pods.row(vec![
            p.pod.clone(),
            p.ip.to_string(),
            if p.healthy { "ok" } else { "FAILING" }.into(),
            pod_checks(p),
        ]);
    }
    if pods.is_empty() {
        out.push_str("no pods enrolled\n");
    } else {
        out.push_str(&pods.render());
    }

    out.push_str("\nPROGRAMS\n");
    let mut programs = Table::new(&["OWNER", "PROGRAM", "HOOK", "ATTACHED", "~<TARGET"]);
    for a in &s.programs {
        programs.row(vec![
            a.owner.clone(),
            a.program.clone(),
            a.hook.clone(),
            if a.attached { "yes" } else { "NO" }.into(),
            a.target.clone(),
        ]);
    }
    out.push_str(&programs.render());

    out.push_str("\nMAPS\n");
    out.push_str(&maps_table(&s.maps).render());

    out.push('\n');
    if s.healthy {
        out.push_str("verdict: healthy\n");
    } else {
        let _ = writeln!(out, "verdict: UNHEALTHY ({} problems)", s.problems.len());
        for p in &s.problems {
            out.push_str(&render::wrap("  - ", p));
        }
        let hints: Vec<&String> = s
            .pods
            .iter()
            .flat_map(|p| p.checks.iter())
            .chain(s.kernel.checks.iter())
            .filter_map(|c| c.hint.as_ref())
            .collect();
        let mut seen = Vec::new();
        for h in hints {
            if !seen.contains(&h) {
                out.push_str(&render::wrap("  hint: ", h));
                seen.push(h);
            }
        }
    }
    out
}

fn pod_checks(p: &PodHealth) -> String {
    if p.healthy {
        return p
            .checks
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(" ");
    }
    p.checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
        + " failed (see below)"
}

// === pods ===

/// `mesh-agent pods [POD]`.
pub fn pods(admin: SocketAddr, pod: Option<&str>, json: bool) -> Result<u8> {
    let client = AdminClient::new(admin);
    let body = client.get("/debug/pods")?;
    let all: Vec<PodView> = serde_json::from_str(&body)?;
    if let Some(pod) = pod {
        let p = pick_pod(&all, pod)?;
        if json {
            println!("{}", serde_json::to_string_pretty(p)?);
        } else {
            print!("{}", pod_text(p));
        }
        return Ok(0);
    }
    if json {
        println!("{}", pretty(&body)?);
        return Ok(0);
    }
    let mut t = Table::new(&[
        "POD",
        "IP",
        "MODE",
        "~IDENTITY",
        "PORTS",
        "CONNS",
        "RX",
        "KERNEL",
    ]);
    for p in &all {
        t.row(vec![
            p.name.clone(),
            p.ip.to_string(),
            p.mode.clone(),
            p.identity.as_deref().map_or_else(|| "-".into(), short_id),
            ports(&p.inbound_ports),
            format!("{}/{}", p.open_outbound, p.open_inbound),
            p.kernel
                .as_ref()
                .map_or_else(|| "-".into(), |k| render::bytes(k.rx_bytes)),
            if p.kernel.is_some() { "yes" } else { "MISSING" }.into(),
        ]);
    }
    if t.is_empty() {
        println!("no pods enrolled");
    } else {
        print!("{}", t.render());
        println!("(CONNS: open outbound/inbound; RX: bytes into the pod; `pods POD` for more)");
    }
    Ok(0)
}

fn ports(p: &[u16]) -> String {
    if p.is_empty() {
        "-".into()
    } else {
        p.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
    }
}

fn pod_text(p: &PodView) -> String {
    let mut pairs = vec![
        ("ip", p.ip.to_string()),
        ("mode", p.mode.clone()),
        ("identity", or_dash(p.identity.as_ref())),
        ("service account", or_dash(p.service_account.as_ref())),
        ("inbound ports", ports(&p.inbound_ports)),
        ("cgroup", p.cgroup.clone()),
        ("netns", p.netns.clone()),
        ("interface", p.iface.clone()),
        (
            "connections",
            format!(
                "{} outbound, {} inbound open",
                p.open_outbound, p.open_inbound
            ),
        ),
    ];
    match (&p.kernel, &p.kernel_error) {
        (Some(k), _) => {
            pairs.push(("cgroup id", k.cgroup_id.to_string()));
            pairs.push(("netns cookie", k.netns_cookie.to_string()));
            pairs.push((
                "kernel mode",
                if k.permissive { "PERMISSIVE" } else { "STRICT" }.into(),
            ));
            pairs.push((
                "received",
                format!("{} packets, {}", k.rx_packets, render::bytes(k.rx_bytes)),
            ));
        }
        (None, e) => pairs.push(("kernel", format!("NOT ENROLLED: {}", or_dash(e.as_ref())))),
    }
    format!("{}\n{}", p.name, render::fields(&pairs))
}

// === conns ===

fn peer(v: &Value) -> String {
    let workload = v["workload"].as_str();
    let namespace = v["namespace"].as_str();
    match (namespace, workload, v["identity"].as_str()) {
        (Some(ns), Some(w), _) => format!("{ns}/{w}"),
        (_, _, Some(id)) => short_id(id),
        _ => String::new(),
    }
}

fn endpoint(who: &Value, addr: Option<&str>) -> String {
    let p = peer(who);
    match (p.is_empty(), addr) {
        (false, _) => p,
        (true, Some(a)) => a.to_string(),
        (true, None) => "-".into(),
    }
}

/// `mesh-agent conns [--pod P]`.
pub fn conns(admin: SocketAddr, pod: Option<&str>, json: bool) -> Result<u8> {
    let client = AdminClient::new(admin);
    let path = match pod {
        Some(p) => format!("/debug/conns?pod={}", encode(&resolve_pod(&client, p)?)),
        None => "/debug/conns".into(),
    };
    let body = client.get(&path)?;
    if json {
        println!("{}", pretty(&body)?);
        return Ok(0);
    }
    let conns: Vec<Value> = serde_json::from_str(&body)?;
    let mut t = Table::new(&[
        "POD",
        "DIR",
        "PATH",
        "PROTO",
        "~PEER",
        "~<ADDRESS",
        "REQUEST",
        "RESPONSE",
        "AGE",
    ]);
    for c in &conns {
        let outbound = c["direction"] == "outbound";
        let (who, addr) = if outbound {
            (&c["dst"], c["dst_addr"].as_str())
        } else {
            (&c["src"], c["src_addr"].as_str())
        };
        let mut peer = endpoint(who, None);
        if let (true, Some(svc)) = (outbound, c["service"].as_str()) {
            let short: Vec<&str> = svc.split('.').take(2).collect();
            peer = format!("{peer} (svc {})", short.join("."));
        }
        t.row(vec![
            c["pod"].as_str().unwrap_or("?").into(),
            if outbound { "out" } else { "in" }.into(),
            c["path"].as_str().unwrap_or("?").into(),
            c["protocol"].as_str().unwrap_or("tcp").into(),
            peer,
            addr.unwrap_or("-").into(),
            render::bytes(c["bytes_to_dst"].as_u64().unwrap_or(0)),
            render::bytes(c["bytes_to_src"].as_u64().unwrap_or(0)),
            render::millis(c["age_ms"].as_u64().unwrap_or(0)),
        ]);
    }
    if t.is_empty() {
        println!("no open connections");
    } else {
        print!("{}", t.render());
        println!(
            "(PEER: the other end; PROTO: as its port is declared; REQUEST, RESPONSE: bytes \
             each way so far)"
        );
    }
    Ok(0)
}

// === certs ===

/// `mesh-agent certs`.
pub fn certs(admin: SocketAddr, json: bool) -> Result<u8> {
    let body = AdminClient::new(admin).get("/debug/certs")?;
    if json {
        println!("{}", pretty(&body)?);
        return Ok(0);
    }
    let certs: Vec<Value> = serde_json::from_str(&body)?;
    if certs.is_empty() {
        println!("no workload certificates held (no controller, or no meshed pod yet)");
        return Ok(0);
    }
    let mut healthy = true;
    for (i, c) in certs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        let state = c["state"].as_str().unwrap_or("?");
        healthy &= matches!(state, "valid" | "renewing");
        let time = |key: &str| match c[key].as_str() {
            Some(t) => format!("{t} ({})", render::relative(t)),
            None => "-".into(),
        };
        let mut pairs = vec![
            ("state", state.to_string()),
            ("serial", c["serial"].as_str().unwrap_or("-").into()),
            ("issuer", c["issuer"].as_str().unwrap_or("-").into()),
            ("not before", time("not_before")),
            ("not after", time("not_after")),
            ("next rotation", time("next_rotation")),
        ];
        let failures = c["consecutive_failures"].as_u64().unwrap_or(0);
        if failures > 0 || !c["last_error"].is_null() {
            pairs.push((
                "last error",
                format!(
                    "{} ({failures} failures in a row)",
                    c["last_error"].as_str().unwrap_or("-")
                ),
            ));
        }
        print!(
            "{}\n{}",
            c["identity"].as_str().unwrap_or("?"),
            render::fields(&pairs)
        );
    }
    Ok(verdict(healthy))
}

// === policy ===

/// `mesh-agent policy POD`.
pub fn policy(admin: SocketAddr, pod: &str, json: bool) -> Result<u8> {
    let client = AdminClient::new(admin);
    let name = if pod.contains('/') {
        pod.to_string()
    } else {
        resolve_pod(&client, pod)?
    };
    let body = client.get(&format!("/debug/policy/{}", encode(&name)))?;
    if json {
        println!("{}", pretty(&body)?);
        return Ok(0);
    }
    let v: PolicyView = serde_json::from_str(&body)?;
    println!("{}  {}", v.pod, v.workload.identity);
    let Some(p) = &v.policy else {
        println!("  no compiled policy yet: the proxy refuses every caller (reason no_policy)");
        return Ok(0);
    };
    let mode = serde_json::to_value(p.mode)?;
    let tls = serde_json::to_value(p.tls_mode)?;
    print!(
        "{}",
        render::fields(&[
            ("traffic policy", mode.as_str().unwrap_or("?").into()),
            ("tls mode", tls.as_str().unwrap_or("?").into()),
            ("rules", p.rules.len().to_string()),
        ])
    );
    if p.rules.is_empty() {
        println!(
            "  no TrafficTarget names this pod: {}",
            if mode == "PERMISSIVE" {
                "every caller is allowed (permissive traffic policy)"
            } else {
                "every caller is denied (default deny)"
            }
        );
        return Ok(0);
    }
    println!();
    let mut t = Table::new(&["TRAFFIC TARGET", "~SOURCES", "PORTS", "~ROUTE"]);
    for r in &p.rules {
        let route = match &r.route {
            mesh_core::policy::RouteMatch::Tcp => "tcp".to_string(),
            mesh_core::policy::RouteMatch::Http(matches) => matches
                .iter()
                .map(|m| {
                    let methods = if m.methods.is_empty() {
                        "*".to_string()
                    } else {
                        m.methods.join(",")
                    };
                    format!(
                        "{}: {methods} {}",
                        m.name,
                        m.path.as_ref().map_or(".*", |p| p.as_str())
                    )
                })
                .collect::<Vec<_>>()
                .join("; "),
        };
        t.row(vec![
            r.traffic_target.to_string(),
            r.sources
                .iter()
                .map(|s| short_id(&s.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            if r.ports.is_empty() {
                "any".into()
            } else {
                ports(&r.ports)
            },
            route,
        ]);
    }
    print!("{}", t.render());
    Ok(0)
}

/// What `policy check` asks.
#[derive(Debug, Clone, Default)]
pub struct CheckArgs {
    pub from: String,
    pub to: String,
    pub method: Option<String>,
    pub path: Option<String>,
    pub headers: Vec<String>,
}

/// `mesh-agent policy check`.
pub fn policy_check(admin: SocketAddr, args: &CheckArgs, json: bool) -> Result<u8> {
    let mut q = format!(
        "/debug/policy/check?from={}&to={}",
        encode(&args.from),
        encode(&args.to)
    );
    if let Some(m) = &args.method {
        let _ = write!(q, "&method={}", encode(m));
    }
    if let Some(p) = &args.path {
        let _ = write!(q, "&path={}", encode(p));
    }
    for h in &args.headers {
        if !h.contains(':') {
            return Err(CommandError::new(
                EXIT_USAGE,
                format!("--header {h:?}: write it NAME:VALUE"),
            ));
        }
        let _ = write!(q, "&header={}", encode(h));
    }
    if args.method.is_some() && args.path.is_none() {
        return Err(CommandError::new(
            EXIT_USAGE,
            "--method needs --path: a request is checked by its method and path",
        ));
    }
    let body = AdminClient::new(admin).get(&q)?;
    let v: PolicyCheck = serde_json::from_str(&body)?;
    if json {
        println!("{}", pretty(&body)?);
    } else {
        print!("{}", check_text(&v));
    }
    Ok(verdict(v.verdict != "denied"))
}

fn check_text(v: &PolicyCheck) -> String {
    let mut out = String::new();
    let from = match &v.from_pod {
        Some(pod) => format!("{pod} ({})", v.from),
        None => v.from.clone(),
    };
    let _ = writeln!(out, "from     {from}");
    let _ = writeln!(
        out,
        "to       {}{}",
        v.to,
        v.request
            .as_ref()
            .map(|r| format!(", request {r}"))
            .unwrap_or_default()
    );
    let _ = writeln!(out, "verdict  {}", v.verdict.to_ascii_uppercase());
    for d in &v.decisions {
        let head = format!(
            "{}:{}{}{}",
            d.pod,
            d.port,
            d.node
                .as_ref()
                .map(|n| format!(" on {n}"))
                .unwrap_or_default(),
            d.via
                .as_ref()
                .map(|via| format!(", via {via}"))
                .unwrap_or_default()
        );
        out.push('\n');
        out.push_str(&render::wrap(
            &format!("{} ", d.verdict.to_ascii_uppercase()),
            &head,
        ));
        let mut pairs = vec![("why", d.reason.clone())];
        if let Some(k) = &d.kind {
            pairs.push(("kind", k.clone()));
        }
        if let Some(tt) = &d.traffic_target {
            pairs.push(("rule", format!("TrafficTarget {tt}")));
        }
        if let Some(route) = &d.route {
            pairs.push(("route", route.clone()));
        }
        if d.decided_here {
            let rules: Vec<String> = d
                .rules_for_caller
                .iter()
                .map(|r| {
                    format!(
                        "{} (ports {})",
                        r.traffic_target,
                        if r.ports.is_empty() {
                            "any".into()
                        } else {
                            ports(&r.ports)
                        }
                    )
                })
                .collect();
            pairs.push((
                "rules for caller",
                if rules.is_empty() {
                    "none".into()
                } else {
                    rules.join(", ")
                },
            ));
        }
        out.push_str(&render::fields(&pairs));
    }
    out
}

// === flows ===

/// What `flows` asks.
#[derive(Debug, Clone, Default)]
pub struct FlowArgs {
    pub pod: Option<String>,
    pub follow: bool,
    pub limit: usize,
    /// Also the connections of `status`'s probes.
    pub probes: bool,
}

/// `mesh-agent flows`.
pub fn flows(admin: SocketAddr, args: &FlowArgs, json: bool) -> Result<u8> {
    let client = AdminClient::new(admin);
    let pod = args
        .pod
        .as_deref()
        .map(|p| resolve_pod(&client, p))
        .transpose()?;
    // The first page is the latest `limit` records; following, every new one.
    let query = |after: u64| {
        let limit = if after == 0 { args.limit } else { usize::MAX };
        let mut q = format!("/debug/flows?after={after}&limit={limit}");
        if let Some(p) = &pod {
            let _ = write!(q, "&pod={}", encode(p));
        }
        if args.probes {
            q.push_str("&probes=1");
        }
        q
    };
    let follow = args.follow;
    let body = client.get(&query(0))?;
    let page: FlowPage = serde_json::from_str(&body)?;
    if !follow {
        if json {
            println!("{}", pretty(&body)?);
        } else {
            if let Some(e) = &page.kernel_error {
                println!("(kernel events unavailable: {e})");
            }
            println!("{}", flow_header());
            for r in &page.records {
                println!("{}", flow_line(r));
            }
        }
        return Ok(0);
    }
    if !json {
        if let Some(e) = &page.kernel_error {
            eprintln!("(kernel events unavailable: {e})");
        }
        println!("{}", flow_header());
    }
    let mut next = page.next;
    let show = |records: &[FlowRecord]| -> Result<()> {
        for r in records {
            if json {
                println!("{}", serde_json::to_string(r)?);
            } else {
                println!("{}", flow_line(r));
            }
        }
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        Ok(())
    };
    show(&page.records)?;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let page: FlowPage = client.get_json(&query(next))?;
        if page.missed && !json {
            println!("(some records were missed: the agent keeps the last few thousand)");
        }
        next = page.next;
        show(&page.records)?;
    }
}

fn flow_header() -> String {
    format!(
        "{:<12}  {:<15}  {:<24}  {:<9}  {}",
        "TIME", "POD", "PEER (-> out, <- in)", "PATH", "RESULT"
    )
}

/// One record on one line of at most [`render::WIDTH`] columns.
pub fn flow_line(r: &FlowRecord) -> String {
    let time = render::clock(r.unix_ms);
    let pod = render::fit(r.pod.as_deref().unwrap_or("-"), 15);
    let line = match (&r.proxy, &r.kernel) {
        (Some(p), kernel) => {
            let outbound = p.direction == "outbound";
            let (ns, w, id, addr) = if outbound {
                (
                    &p.dst_namespace,
                    &p.dst_workload,
                    &p.dst_identity,
                    Some(&p.dst_addr),
                )
            } else {
                (
                    &p.src_namespace,
                    &p.src_workload,
                    &p.src_identity,
                    p.src_addr.as_ref(),
                )
            };
            let peer = match (ns, w, id, addr) {
                (Some(ns), Some(w), _, _) => format!("{ns}/{w}"),
                (_, _, Some(id), _) => short_id(id),
                (_, _, _, Some(a)) => a.clone(),
                _ => "-".into(),
            };
            let arrow = if outbound { "->" } else { "<-" };
            let mut result = if p.verdict == "denied" {
                format!("DENIED {}", p.reason.as_deref().unwrap_or("-"))
            } else if p.flags != "-" {
                format!("{} {}", p.flags, p.reason.as_deref().unwrap_or("-"))
            } else {
                format!(
                    "ok {}/{} {}",
                    render::bytes(p.bytes_to_dst),
                    render::bytes(p.bytes_to_src),
                    render::millis(p.duration_ms)
                )
            };
            if let Some(k) = kernel {
                result.push_str(&format!(", {}", k.verdict));
            }
            if r.probe {
                result.push_str(" (probe)");
            }
            format!(
                "{time}  {pod:<15}  {arrow} {:<21}  {:<9}  {result}",
                render::fit(&peer, 21),
                p.path
            )
        }
        (None, Some(k)) => format!(
            "{time}  {pod:<15}  <- {:<21}  {:<9}  {} to port {}",
            render::fit(&k.src, 21),
            "kernel",
            k.verdict,
            k.dst.rsplit_once(':').map_or("?", |(_, port)| port)
        ),
        (None, None) => format!("{time}  {pod:<15}  -"),
    };
    render::fit(&line, render::WIDTH)
}

// === bpf ===

/// `mesh-agent bpf [MAP [list|get KEY]]`.
pub fn bpf(pin_dir: &Path, map: Option<&str>, key: Option<&str>, json: bool) -> Result<u8> {
    require_root("bpf")?;
    let Some(map) = map else {
        let all = maps::summaries(pin_dir);
        if all.iter().all(|m| m.error.is_some()) {
            return Err(CommandError::new(
                EXIT_FINDING,
                format!(
                    "no pinned maps under {}: is an agent of this instance running, or did \
                     it run here? (--instance names it)",
                    pin_dir.display()
                ),
            ));
        }
        if json {
            println!("{}", serde_json::to_string_pretty(&all)?);
        } else {
            print!("{}", maps_table(&all).render());
        }
        return Ok(0);
    };
    let def = maps::find(map).ok_or_else(|| {
        CommandError::new(
            EXIT_USAGE,
            format!("unknown map {map:?}: the maps are {}", maps::known()),
        )
    })?;
    let usage = |e: maps::MapError| {
        let code = match e {
            maps::MapError::BadKey { .. } | maps::MapError::NotListable { .. } => EXIT_USAGE,
            _ => EXIT_FINDING,
        };
        CommandError::new(code, e.to_string())
    };
    let wanted = key
        .map(|k| maps::canonical_key(def, k))
        .transpose()
        .map_err(usage)?;
    let mut entries = maps::entries(pin_dir, def).map_err(usage)?;
    if let Some(k) = &wanted {
        entries.retain(|e| e.key == *k);
        if entries.is_empty() {
            return Err(CommandError::new(
                EXIT_FINDING,
                format!("{} has no entry {k}", def.name),
            ));
        }
    }
    if json {
        let v = serde_json::json!({ "map": def.name, "entries": entries });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    if entries.is_empty() {
        println!("{} is empty ({})", def.name, def.purpose);
        return Ok(0);
    }
    let mut t = Table::new(&["~KEY", "~VALUE"]);
    for e in &entries {
        t.row(vec![e.key.clone(), e.value.clone()]);
    }
    print!("{}", t.render());
    Ok(0)
}

// === doctor ===

/// `mesh-agent doctor`.
pub fn doctor(load: bool, json: bool) -> Result<u8> {
    require_root("doctor")?;
    let checks = crate::features::doctor(load);
    if json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            let mark = if c.ok { "ok" } else { "FAIL" };
            print!(
                "{}",
                render::wrap(&format!("{mark:<4}  {:<width$}  ", c.name), &c.detail)
            );
            if let Some(h) = &c.hint {
                print!(
                    "{}",
                    render::wrap(&format!("{:<w$}fix: ", "", w = width + 8), h)
                );
            }
        }
        let failed = checks.iter().filter(|c| !c.ok).count();
        if failed > 0 {
            println!("\n{failed} of {} checks failed", checks.len());
        }
    }
    Ok(verdict(checks.iter().all(|c| c.ok)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::debug::flows::{KernelSide, ProxySide};

    fn proxy(direction: &str, verdict: &str, reason: Option<&str>) -> ProxySide {
        ProxySide {
            conn_id: 1,
            direction: direction.into(),
            path: "hbone".into(),
            src_addr: None,
            dst_addr: "10.244.2.12:9000".into(),
            src_workload: None,
            src_namespace: Some("demo".into()),
            src_identity: Some("spiffe://cluster.local/ns/demo/sa/intruder".into()),
            dst_workload: Some("echo".into()),
            dst_namespace: Some("demo".into()),
            dst_identity: Some("spiffe://cluster.local/ns/demo/sa/echo".into()),
            service: None,
            opened_unix_ms: 0,
            duration_ms: 3,
            bytes_to_dst: 0,
            bytes_to_src: 0,
            verdict: verdict.into(),
            reason: reason.map(Into::into),
            flags: if verdict == "denied" { "DENY" } else { "-" }.into(),
            detail: None,
        }
    }

    #[test]
    fn a_flow_is_one_line_that_says_who_and_why() {
        let r = FlowRecord {
            seq: 1,
            unix_ms: 3_723_004,
            pod: Some("demo/echo".into()),
            kernel: None,
            proxy: Some(proxy("inbound", "denied", Some("no_traffic_target"))),
            probe: false,
        };
        let line = flow_line(&r);
        assert!(line.starts_with("01:02:03.004  demo/echo"), "{line}");
        assert!(line.contains("  <- ns/demo/sa/intruder "), "{line}");
        assert!(line.ends_with("DENIED no_traffic_target"), "{line}");

        let r = FlowRecord {
            proxy: None,
            kernel: Some(KernelSide {
                unix_ms: 0,
                src: "10.90.0.10:40000".into(),
                dst: "10.244.2.12:9000".into(),
                verdict: "passthrough".into(),
            }),
            ..r
        };
        let line = flow_line(&r);
        assert!(
            line.ends_with("kernel     passthrough to port 9000"),
            "{line}"
        );
        for l in [flow_line(&r), flow_header()] {
            assert!(l.chars().count() <= render::WIDTH, "{l}");
        }
    }

    #[test]
    fn pods_are_picked_by_full_or_unique_short_name() {
        let pod = |name: &str| PodView {
            name: name.into(),
            ip: [10, 0, 0, 1].into(),
            mode: "STRICT".into(),
            inbound_ports: vec![],
            iface: "eth0".into(),
            cgroup: String::new(),
            netns: String::new(),
            kernel: None,
            kernel_error: None,
            identity: None,
            service_account: None,
            open_outbound: 0,
            open_inbound: 0,
        };
        let all = vec![pod("demo/web"), pod("demo/echo"), pod("other/echo")];
        assert_eq!(pick_pod(&all, "web").expect("unique").name, "demo/web");
        assert_eq!(
            pick_pod(&all, "other/echo").expect("full").name,
            "other/echo"
        );
        let e = pick_pod(&all, "echo").expect_err("ambiguous");
        assert_eq!(e.code, EXIT_USAGE);
        let e = pick_pod(&all, "nope").expect_err("unknown");
        assert!(
            e.message.contains("demo/web, demo/echo, other/echo"),
            "{}",
            e.message
        );
    }
}
