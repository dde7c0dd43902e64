//! The debugging commands: ask the agent (or the kernel), then print a table for people or
//! the JSON for machines.
//!
//! Exit status: 0 when the answer is good news, [`EXIT_FINDING`] when it is not (an unhealthy
//! status, a denied call, a failed preflight, a missing map entry), [`EXIT_USAGE`] for
//! arguments that are wrong or name nothing the agent knows, [`EXIT_UNAVAILABLE`] when no
//! agent answers at `--admin` (or it cannot answer yet), [`EXIT_NOPERM`] when a command that
//! reads the kernel runs without root.
use std::net::SocketAddr;

use mesh_proxy::identity::CertInfo;
use mesh_proxy::telemetry::Peer;

use crate::admin::views::{OpenConn, PodView};
use crate::debug::client::{AdminClient, ClientError, encode};
use crate::debug::render::{self, Table, or_dash, short_id};

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
    if mesh_datapath::kernel::privileged() {
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
    let v: serde_json::Value = serde_json::from_str(body)?;
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

mod flows;
mod kernel;
mod policy;
mod status;
#[cfg(test)]
mod tests;

pub use flows::{FlowArgs, flow_line, flows};
pub use kernel::{bpf, doctor};
pub use policy::{CheckArgs, policy, policy_check};
pub use status::status;

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
            if p.enroll_error.is_some() {
                "FAILED"
            } else if p.kernel.is_some() {
                "yes"
            } else {
                "MISSING"
            }
            .into(),
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
        ("excluded ports", ports(&p.excluded_inbound_ports)),
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
    if let Some(e) = &p.enroll_error {
        pairs.push(("enrollment", format!("FAILED (retrying): {e}")));
    }
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

fn peer(p: &Peer) -> String {
    match (&p.namespace, &p.workload, &p.identity) {
        (Some(ns), Some(w), _) => format!("{ns}/{w}"),
        (_, _, Some(id)) => short_id(&id.to_string()),
        _ => String::new(),
    }
}

fn endpoint(who: &Peer, addr: Option<&str>) -> String {
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
    let conns: Vec<OpenConn> = serde_json::from_str(&body)
        .map_err(|e| CommandError::new(EXIT_FINDING, format!("the agent's connections: {e}")))?;
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
    for OpenConn { conn: c, protocol } in &conns {
        let outbound = c.direction == "outbound";
        let (who, addr) = if outbound {
            (&c.dst, Some(c.dst_addr.as_str()))
        } else {
            (&c.src, c.src_addr.as_deref())
        };
        let mut peer = endpoint(who, None);
        if let (true, Some(svc)) = (outbound, c.service.as_deref()) {
            let short: Vec<&str> = svc.split('.').take(2).collect();
            peer = format!("{peer} (svc {})", short.join("."));
        }
        t.row(vec![
            c.pod.clone(),
            if outbound { "out" } else { "in" }.into(),
            c.path.as_str().into(),
            protocol.as_str().into(),
            peer,
            addr.unwrap_or("-").into(),
            render::bytes(c.bytes_to_dst),
            render::bytes(c.bytes_to_src),
            render::millis(c.age_ms),
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
    let certs: Vec<CertInfo> = serde_json::from_str(&body)
        .map_err(|e| CommandError::new(EXIT_FINDING, format!("the agent's certificates: {e}")))?;
    if certs.is_empty() {
        println!("no workload certificates held (no controller, or no meshed pod yet)");
        return Ok(0);
    }
    let mut healthy = true;
    for (i, c) in certs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        healthy &= c.state.serving();
        let time = |t: &Option<String>| match t {
            Some(t) => format!("{t} ({})", render::relative(t)),
            None => "-".into(),
        };
        let mut pairs = vec![
            ("state", c.state.as_str().to_string()),
            ("serial", or_dash(c.serial.as_ref())),
            ("issuer", or_dash(c.issuer.as_ref())),
            ("not before", time(&c.not_before)),
            ("not after", time(&c.not_after)),
            ("next rotation", time(&c.next_rotation)),
        ];
        let failures = c.consecutive_failures;
        if failures > 0 || c.last_error.is_some() {
            pairs.push((
                "last error",
                format!(
                    "{} ({failures} failures in a row)",
                    or_dash(c.last_error.as_ref())
                ),
            ));
        }
        print!("{}\n{}", c.identity, render::fields(&pairs));
    }
    Ok(verdict(healthy))
}
