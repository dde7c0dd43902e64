//! A run's results: the JSON document, the markdown tables and the comparison of two runs.
use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::client::Proto;
use super::env::Environment;
use super::ladder::Plan;

/// Everything a run produced; written as JSON and read back by `compare`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub environment: Environment,
    pub plan: Plan,
    pub steps: Vec<StepResult>,
    /// The restart scenario, when it ran.
    #[serde(default)]
    pub restarts: Vec<super::restart::RestartResult>,
    /// The stock tools, when they ran (`--stock`).
    #[serde(default)]
    pub stock: Option<super::stock::StockResult>,
}

/// One step of the ladder.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepResult {
    pub id: u8,
    pub key: String,
    pub title: String,
    pub datapath: Datapath,
    /// Each measurement's value per repetition (see [`COLUMNS`] for the keys).
    pub values: BTreeMap<String, Vec<f64>>,
    /// Resident memory of the agents involved, MiB: `idle` (before any load), `loaded` (after
    /// the repetitions) and `held` (with the plan's connections open).
    pub rss_mib: BTreeMap<String, f64>,
    /// What the agents counted during the step.
    pub proxy: ProxyCounters,
    /// How long the measurements took (cluster set-up and teardown not included).
    #[serde(default)]
    pub seconds: f64,
}

/// The datapath features a step ran with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Datapath {
    /// Whether the pods are meshed (enrolled) at all.
    pub mesh: bool,
    /// `none`, `iptables` (nat OUTPUT REDIRECT in the client pod) or `ebpf` (connect4).
    pub capture: String,
    pub skmsg: bool,
    /// How the agent carries same-node calls: `in-process` or `hbone`.
    pub same_node: String,
    pub protocol: Proto,
    pub cross_node: bool,
    /// How many agent processes the CPU and memory figures add up.
    pub agents: usize,
}

/// Deltas of the agents' counters over the step: proof that the bytes went through the proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProxyCounters {
    /// `istio_tcp_connections_opened_total`, every reporter.
    pub connections: u64,
    /// `istio_tcp_received_bytes_total` + `istio_tcp_sent_bytes_total`, every reporter.
    pub bytes: u64,
    /// `istio_requests_total`, every reporter (0 where no L7 proxy ran).
    pub requests: u64,
    /// The `mesh_path` labels of the connections opened and requests made.
    pub paths: Vec<String>,
    /// The `route` labels of the requests: the policy rules that admitted them (L7 only).
    #[serde(default)]
    pub routes: Vec<String>,
    /// Packets the iptables REDIRECT rule matched (the iptables step only).
    pub iptables_redirected: Option<u64>,
}

impl ProxyCounters {
    /// The paths, and the L7 routes that admitted requests.
    pub fn via(&self) -> String {
        let mut v = self.paths.join(", ");
        if !self.routes.is_empty() {
            let _ = write!(v, "; routes {}", self.routes.join(", "));
        }
        v
    }
}

/// Measurements in report order: key, heading, decimals.
pub const COLUMNS: [(&str, &str, usize); 10] = [
    ("bulk_mb_s", "throughput MB/s", 0),
    ("duplex_mb_s", "streams both ways MB/s", 0),
    ("1b_fixed_p50", "1 B p50 µs", 0),
    ("1b_fixed_p99", "1 B p99 µs", 0),
    ("1kb_fixed_p50", "1 KB p50 µs", 0),
    ("1kb_fixed_p99", "1 KB p99 µs", 0),
    ("1kb_fixed_p999", "1 KB p99.9 µs", 0),
    ("1kb_max_per_s", "1 KB max req/s", 0),
    ("cpu_s_per_gb", "agent CPU s/GB", 2),
    ("cpu_s_per_10k_req", "agent CPU s/10k req", 3),
];

/// The latency series of a step: key prefix and label.
pub const LATENCY: [(&str, &str); 4] = [
    ("1b_fixed", "1 B at the fixed rate"),
    ("1b_max", "1 B at max rate"),
    ("1kb_fixed", "1 KB at the fixed rate"),
    ("1kb_max", "1 KB at max rate"),
];

/// The percentiles of each latency series: key suffix and heading.
pub const PERCENTILES: [(&str, &str); 4] = [
    ("p50", "p50"),
    ("p90", "p90"),
    ("p99", "p99"),
    ("p999", "p99.9"),
];

pub fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

pub fn spread(v: &[f64]) -> Option<(f64, f64)> {
    let min = v.iter().copied().reduce(f64::min)?;
    let max = v.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

impl StepResult {
    pub fn median(&self, key: &str) -> Option<f64> {
        self.values.get(key).and_then(|v| median(v))
    }

    /// The step whose figures this one is judged against: no mesh on the same topology.
    pub fn baseline(&self) -> u8 {
        if self.datapath.cross_node { 2 } else { 1 }
    }

    fn features(&self) -> String {
        let d = &self.datapath;
        if !d.mesh {
            return format!("no mesh, {}", d.protocol.name());
        }
        format!(
            "{} capture, sk_msg {}, {}{}",
            d.capture,
            if d.skmsg { "on" } else { "off" },
            d.protocol.name(),
            if d.cross_node || d.same_node == "in-process" {
                String::new()
            } else {
                format!(", same node via {}", d.same_node)
            }
        )
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// `new / old`, where both are known and `old` is positive.
pub fn ratio_of(new: Option<f64>, old: Option<f64>) -> Option<f64> {
    match (new, old) {
        (Some(n), Some(o)) if o > 0.0 => Some(n / o),
        _ => None,
    }
}

fn ratio(new: Option<f64>, old: Option<f64>) -> String {
    ratio_of(new, old).map_or_else(|| "-".into(), |r| format!("{r:.2}x"))
}

impl Report {
    pub fn step(&self, id: u8) -> Option<&StepResult> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The whole report: environment header, summary, spread, latency detail, ratios.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let e = &self.environment;
        let p = &self.plan;
        let _ = writeln!(o, "# Mesh performance ladder ({} mode)\n", p.name);
        let _ = writeln!(o, "| environment | |\n|---|---|");
        for (k, v) in [
            ("kernel", format!("{} ({})", e.kernel, e.kernel_build)),
            ("CPU", format!("{} x {}", e.cpu_model, e.cpus)),
            ("cgroup", e.cgroup.clone()),
            ("BTF", if e.btf { "yes" } else { "no" }.into()),
            ("build", e.build_profile.clone()),
            ("git", e.git_revision.clone()),
            ("started", e.started.clone()),
            ("load average", format!("{} / {}", e.load_start, e.load_end)),
            ("plan", p.describe()),
        ] {
            let _ = writeln!(o, "| {k} | {v} |");
        }
        let _ = writeln!(
            o,
            "\n## Summary (median of {} repetitions; latency at {}/s)\n",
            p.reps, p.fixed_rate
        );
        let head: Vec<&str> = COLUMNS.iter().map(|c| c.1).collect();
        let _ = writeln!(
            o,
            "| # | step | datapath | {} | agent RSS MiB idle/held | proxy conns/reqs | paths |",
            head.join(" | ")
        );
        let _ = writeln!(o, "|{}", "---|".repeat(COLUMNS.len() + 6));
        for s in &self.steps {
            let cells: Vec<String> = COLUMNS
                .iter()
                .map(|(k, _, d)| cell(s.median(k), *d))
                .collect();
            let rss = if s.datapath.mesh {
                format!(
                    "{}/{}",
                    cell(s.rss_mib.get("idle").copied(), 1),
                    cell(s.rss_mib.get("held").copied(), 1)
                )
            } else {
                "-".into()
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {rss} | {}/{} | {} |",
                s.id,
                s.title,
                s.features(),
                cells.join(" | "),
                s.proxy.connections,
                s.proxy.requests,
                s.proxy.via()
            );
        }
        let _ = writeln!(o, "\n## Spread (min..max over the repetitions)\n");
        let _ = writeln!(o, "| # | {} |", head.join(" | "));
        let _ = writeln!(o, "|{}", "---|".repeat(COLUMNS.len() + 1));
        for s in &self.steps {
            let cells: Vec<String> = COLUMNS
                .iter()
                .map(|(k, _, d)| match s.values.get(*k).and_then(|v| spread(v)) {
                    Some((lo, hi)) => format!("{lo:.d$}..{hi:.d$}", d = *d),
                    None => "-".into(),
                })
                .collect();
            let _ = writeln!(o, "| {} | {} |", s.id, cells.join(" | "));
        }
        let _ = writeln!(o, "\n## Latency, µs (median of the repetitions)\n");
        let _ = writeln!(o, "| # | load | p50 | p90 | p99 | p99.9 | req/s |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|");
        for s in &self.steps {
            for (series, label) in LATENCY {
                let cells: Vec<String> = PERCENTILES
                    .iter()
                    .map(|(pk, _)| cell(s.median(&format!("{series}_{pk}")), 0))
                    .collect();
                let rate = cell(s.median(&format!("{series}_per_s")), 0);
                let _ = writeln!(o, "| {} | {label} | {} | {rate} |", s.id, cells.join(" | "));
            }
        }
        o.push_str(&self.ratios());
        if !self.restarts.is_empty() {
            o.push_str(&super::restart::markdown(&self.restarts));
        }
        if let Some(stock) = &self.stock {
            o.push_str(&stock.markdown());
        }
        o
    }

    /// Each mesh step against the no-mesh step of its topology, and the headline pairs.
    pub fn ratios(&self) -> String {
        let mut o = String::new();
        let keys = RATIOS;
        let heads: Vec<&str> = keys.iter().map(|k| k.1).collect();
        let _ = writeln!(o, "\n## Ratios (medians, same run)\n");
        let _ = writeln!(o, "| comparison | {} |", heads.join(" | "));
        let _ = writeln!(o, "|---|{}", "---|".repeat(keys.len()));
        let mut pairs: Vec<(u8, u8, String)> = HEADLINES
            .iter()
            .map(|(a, b, what)| (*a, *b, (*what).to_string()))
            .collect();
        for s in self.steps.iter().filter(|s| s.datapath.mesh) {
            let base = s.baseline();
            if !HEADLINES.iter().any(|(a, b, _)| *a == s.id && *b == base) {
                pairs.push((s.id, base, format!("{} vs step {base}", s.title)));
            }
        }
        for (a, b, what) in pairs {
            let (Some(sa), Some(sb)) = (self.step(a), self.step(b)) else {
                continue;
            };
            let cells: Vec<String> = keys
                .iter()
                .map(|(k, _)| ratio(sa.median(k), sb.median(k)))
                .collect();
            let _ = writeln!(o, "| {what} ({a}/{b}) | {} |", cells.join(" | "));
        }
        o
    }
}

/// The measurements of the ratios table: key and heading.
pub const RATIOS: [(&str, &str); 7] = [
    ("bulk_mb_s", "throughput"),
    ("duplex_mb_s", "both ways"),
    ("1kb_fixed_p50", "1 KB p50"),
    ("1kb_fixed_p99", "1 KB p99"),
    ("1kb_max_per_s", "1 KB max req/s"),
    ("cpu_s_per_gb", "CPU/GB"),
    ("cpu_s_per_10k_req", "CPU/10k req"),
];

/// The pairs the README quotes: (step, against step, what).
pub const HEADLINES: [(u8, u8, &str); 4] = [
    (5, 1, "mesh vs no mesh, same node"),
    (6, 2, "mesh vs no mesh, across nodes"),
    (4, 3, "eBPF vs iptables capture"),
    (5, 4, "sk_msg on vs off"),
];

/// Each step and summary measurement of `new` against `old`, as ratios of the medians.
pub fn compare(old: &Report, new: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# Comparison\n\nbefore: {} ({}, {}, load {})\nafter:  {} ({}, {}, load {})\n",
        old.environment.git_revision,
        old.environment.started,
        old.plan.name,
        old.environment.load_start,
        new.environment.git_revision,
        new.environment.started,
        new.plan.name,
        new.environment.load_start
    );
    if old.environment.kernel != new.environment.kernel
        || old.environment.cpu_model != new.environment.cpu_model
    {
        let _ = writeln!(
            o,
            "**Different machines or kernels** ({} on {} vs {} on {}): ratios mix both changes.\n",
            old.environment.kernel,
            old.environment.cpu_model,
            new.environment.kernel,
            new.environment.cpu_model
        );
    }
    let _ = writeln!(
        o,
        "| # | step | measurement | before | after | after/before |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    for s in &new.steps {
        let Some(before) = old.steps.iter().find(|b| b.key == s.key) else {
            let _ = writeln!(
                o,
                "| {} | {} | (not in the earlier run) | | | |",
                s.id, s.title
            );
            continue;
        };
        for (k, heading, d) in COLUMNS {
            let (b, a) = (before.median(k), s.median(k));
            if a.is_none() && b.is_none() {
                continue;
            }
            let _ = writeln!(
                o,
                "| {} | {} | {heading} | {} | {} | {} |",
                s.id,
                s.title,
                cell(b, d),
                cell(a, d),
                ratio(a, b)
            );
        }
    }
    if let (Some(before), Some(after)) = (&old.stock, &new.stock) {
        o.push_str(&super::stock::StockResult::compare_rows(before, after));
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread_of_repetitions() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(spread(&[3.0, 1.0, 2.0]), Some((1.0, 3.0)));
        assert_eq!(median(&[]), None);
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50x");
        assert_eq!(ratio(Some(3.0), Some(0.0)), "-");
    }
}
