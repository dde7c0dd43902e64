//! `mesh-agent flows`: one line per connection, once or following.
use std::fmt::Write as _;
use std::time::Duration;

use crate::admin::flows::{FlowPage, FlowRecord};

use super::*;

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

pub(super) fn flow_header() -> String {
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
