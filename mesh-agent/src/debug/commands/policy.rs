//! `mesh-agent policy` and `policy check`.
use std::fmt::Write as _;

use crate::admin::views::{PolicyCheck, PolicyView};

use super::*;

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
