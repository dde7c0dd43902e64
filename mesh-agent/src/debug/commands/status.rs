//! `mesh-agent status`: the agent's own verdict, or what the kernel holds without it.
use std::fmt::Write as _;
use std::path::Path;

use crate::admin::probe::PodHealth;
use crate::admin::views::StatusView;
use mesh_datapath::features::Check;
use mesh_datapath::maps::{self, MapSummary};
use serde::Serialize;

use super::*;

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
            let mut offline = offline_status(pin_dir);
            eprintln!("mesh-agent: {e}");
            if json {
                offline.agent_error = Some(e.to_string());
                println!("{}", serde_json::to_string_pretty(&offline)?);
            } else {
                println!("agent     NOT RUNNING at {admin}");
                print!("{}", offline_text(&offline));
            }
            Ok(EXIT_UNAVAILABLE)
        }
        Err(e) => Err(e.into()),
    }
}

/// `status --json` when no agent answers: what the kernel holds without it.
#[derive(Debug, Clone, Serialize)]
struct OfflineStatus {
    /// Always false: no agent answered.
    healthy: bool,
    /// Why no agent answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_error: Option<String>,
    /// Why the kernel was not read (not root).
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kernel: Option<OfflineKernel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pin_dir: Option<String>,
    maps: Vec<MapSummary>,
}

#[derive(Debug, Clone, Serialize)]
struct OfflineKernel {
    release: String,
    checks: Vec<Check>,
}

fn offline_status(pin_dir: &Path) -> OfflineStatus {
    let mut status = OfflineStatus {
        healthy: false,
        agent_error: None,
        kernel_error: None,
        kernel: None,
        pin_dir: None,
        maps: Vec::new(),
    };
    if !mesh_datapath::kernel::privileged() {
        status.kernel_error = Some("not root: the kernel and the pinned maps were not read".into());
        return status;
    }
    status.kernel = Some(OfflineKernel {
        release: mesh_datapath::kernel::release(),
        checks: mesh_datapath::features::check(false),
    });
    status.pin_dir = Some(pin_dir.display().to_string());
    status.maps = maps::summaries(pin_dir);
    status
}

fn offline_text(v: &OfflineStatus) -> String {
    let mut out = String::new();
    if let Some(e) = &v.kernel_error {
        let _ = writeln!(out, "kernel    {e}");
        return out;
    }
    if let Some(k) = &v.kernel {
        let _ = writeln!(
            out,
            "kernel    {} ({})",
            k.release,
            checks_summary(&k.checks)
        );
    }
    out.push_str(&render::wrap(
        "pins      ",
        &format!(
            "{} (its links keep the programs attached: without the agent, captured \
             connections are refused)",
            or_dash(v.pin_dir.as_ref())
        ),
    ));
    out.push('\n');
    out.push_str(&maps_table(&v.maps).render());
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

pub(super) fn maps_table(maps: &[MapSummary]) -> Table {
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
