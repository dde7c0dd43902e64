//! The restart scenario: steady load across two nodes while the client's node agent is
//! restarted, replaced or killed, each way on a fresh cluster.
//!
//! The client pod (node-1) runs `client tcp churn` ([`Churn`]): new TCP connections to the
//! server pod on node-2 one after another (two at a time), one connection held open with a
//! round trip every 10 ms, and HTTP requests through the L7 proxy on a kept-alive connection.
//! After a steady period node-1's agent goes through one of [`MODES`]; after a settling period
//! the client stops and reports every outcome with its time. The window is from the moment the
//! agent is touched until one second after it serves again.
use std::io::{BufRead, BufReader, Write as _};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::client::{Churn, Proto};
use super::ladder::{self, Options, STEPS};
use super::server::ECHO_PORT;
use crate::cluster::Cluster;

/// How the agent goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// SIGTERM, then a new agent once the old one exited: what a restart without a successor
    /// does.
    InPlace,
    /// A new agent of the same build beside the old one, which hands its sockets over.
    Handover,
    /// The same with other datapath parameters: the programs are replaced as a new build's.
    HandoverNewPrograms,
    /// SIGKILL, then a new agent.
    Crash,
}

pub const MODES: [(Mode, &str, &str); 4] = [
    (
        Mode::InPlace,
        "in-place",
        "restart in place (SIGTERM, then start)",
    ),
    (
        Mode::Handover,
        "handover",
        "upgrade, same build (hand-over)",
    ),
    (
        Mode::HandoverNewPrograms,
        "handover-new-programs",
        "upgrade, other programs (hand-over)",
    ),
    (Mode::Crash, "crash", "crash (SIGKILL, then start)"),
];

/// One mode's outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestartResult {
    pub key: String,
    pub title: String,
    /// Seconds from touching the agent until the new one served (said READY).
    pub agent_seconds: f64,
    pub new_connections: u64,
    pub failed_connections: u64,
    /// Failed new connections by kind (refused, reset, eof, timeout, other).
    pub failures: std::collections::BTreeMap<String, u64>,
    /// Round trips on the held connection, and the times it broke.
    #[serde(default)]
    pub held_trips: u64,
    pub held_broken: u64,
    pub requests: u64,
    pub failed_requests: u64,
    /// Failed requests by kind.
    #[serde(default)]
    pub request_failures: std::collections::BTreeMap<String, u64>,
    /// New-connection latency, ms: p99 before the agent was touched, p99 and max within the
    /// window.
    pub p99_before_ms: f64,
    pub p99_window_ms: f64,
    pub max_window_ms: f64,
    /// From touching the agent to the last failed new connection, ms (0: none failed).
    pub failing_ms: f64,
}

/// The agents' `--drain-grace` in the scenario.
pub const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// How long the load runs before and after the agent is touched.
pub fn periods(fast: bool) -> (Duration, Duration) {
    if fast {
        (Duration::from_secs(2), Duration::from_secs(2))
    } else {
        (Duration::from_secs(5), Duration::from_secs(5))
    }
}

/// Every mode, each on its own cluster.
pub fn run_all(opts: &Options) -> Result<Vec<RestartResult>> {
    MODES
        .iter()
        .enumerate()
        .map(|(i, (mode, key, title))| run(i, *mode, key, title, opts))
        .collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(i: usize, mode: Mode, key: &str, title: &str, opts: &Options) -> Result<RestartResult> {
    let label = format!("restart {key}");
    // The cross-node HTTP step's cluster: TCP and L7 HTTP between two meshed pods.
    let step = STEPS
        .iter()
        .find(|s| s.cross_node && s.proto == Proto::Http)
        .context("the ladder has no cross-node HTTP step")?;
    // A restart in place waits for the open connections this long before the agent exits.
    let mut agent_args = ladder::agent_args(step, &opts.plan);
    agent_args.push(format!("--drain-grace={}s", DRAIN_GRACE.as_secs()));
    let resources = tempfile::tempdir().context("resources directory")?;
    std::fs::write(resources.path().join("bench.yaml"), ladder::RESOURCES)?;
    let mut cluster = Cluster::up(
        &format!("{}r{i}", opts.prefix),
        &ladder::spec(step, &opts.exe),
        resources.path(),
        opts.bins.clone(),
        &agent_args,
        &[],
        &mut |s| eprintln!("[{label}] {s}"),
    )
    .with_context(|| format!("{label}: bring the cluster up"))?;
    let result = measure(&mut cluster, mode, &label, opts);
    if result.is_err() {
        for n in &cluster.nodes {
            if let Some(a) = &n.agent {
                eprintln!(
                    "[{label}] last lines of the agent of {}:\n{}",
                    n.name,
                    a.tail(30)
                );
            }
        }
    }
    cluster.down().context("tear the cluster down")?;
    let (churn, touched, served, agent_seconds) = result?;
    Ok(summarize(
        key,
        title,
        &churn,
        touched,
        served,
        agent_seconds,
    ))
}

/// Runs the churn client around the agent's restart: what it saw, when the agent was
/// touched and when the new one served (ms since the epoch), and how long that took.
fn measure(
    cluster: &mut Cluster,
    mode: Mode,
    label: &str,
    opts: &Options,
) -> Result<(Churn, u64, u64, f64)> {
    let server = cluster.pod("bench/server")?.ip;
    let echo = format!("{server}:{ECHO_PORT}");
    let http = format!("{}:{}", ladder::SERVICE_VIP, ladder::HTTP_SERVICE_PORT);
    wait_served(cluster, &echo, label, opts)?;
    let pod = cluster.pod("bench/client")?;
    let mut child = crate::cluster::command_in(&opts.exe, &pod.cgroup, &pod.netns_path())?
        .args(["client", "tcp", "churn", &echo, &http])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("start the churn client")?;
    let mut stdout = BufReader::new(child.stdout.take().context("client stdout")?);
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    if line.trim() != "churning" {
        bail!("{label}: the churn client said {line:?}");
    }
    let (steady, settle) = periods(opts.plan.name == "fast");
    std::thread::sleep(steady);
    let node = cluster.node_index("node-1")?;
    let (touched, started) = (now_ms(), Instant::now());
    let done = match mode {
        Mode::InPlace => {
            cluster.stop_agent(node, Duration::from_secs(30));
            cluster.start_agent(node)
        }
        Mode::Handover => cluster.replace_agent(node),
        Mode::HandoverNewPrograms => cluster.replace_agent_with(node, &["--skmsg-budget=2M"]),
        Mode::Crash => {
            cluster.kill_agent(node);
            cluster.start_agent(node)
        }
    };
    let agent_seconds = started.elapsed().as_secs_f64();
    let served = now_ms();
    let waited = done.with_context(|| format!("{label}: the new agent"));
    std::thread::sleep(settle);
    // Closing stdin ends the load; the report follows.
    drop(child.stdin.take());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest)?;
    let status = child.wait()?;
    waited?;
    if !status.success() {
        bail!("{label}: the churn client failed ({status})");
    }
    let churn: Churn = serde_json::from_str(rest.trim())
        .with_context(|| format!("{label}: the churn report {rest:?}"))?;
    // The agents replaced drain (the client's connections are closed now) and exit.
    cluster.wait_retired(Duration::from_secs(60))?;
    let _ = std::io::stdout().flush();
    Ok((churn, touched, served, agent_seconds))
}

/// Waits until every pod is enrolled and a new connection to `echo` from the client pod
/// carries a round trip. Before the enrollment a connection would go around the mesh and
/// stay so: the load would not measure the agent at all.
fn wait_served(cluster: &Cluster, echo: &str, label: &str, opts: &Options) -> Result<()> {
    let pod = cluster.pod("bench/client")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    ladder::wait_enrolled(cluster, label, deadline)?;
    loop {
        let out = crate::cluster::command_in(&opts.exe, &pod.cgroup, &pod.netns_path())?
            .args(["client", "tcp", "rr", echo, "1", "1"])
            .stderr(Stdio::null())
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{label}: the server never answered through the mesh");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn percentile(mut v: Vec<u64>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i] as f64 / 1000.0
}

fn summarize(
    key: &str,
    title: &str,
    churn: &Churn,
    touched: u64,
    served: u64,
    agent_seconds: f64,
) -> RestartResult {
    let window = touched..=served + 1000;
    let before: Vec<u64> = churn
        .connected
        .iter()
        .filter(|(at, _)| *at < touched)
        .map(|(_, us)| *us)
        .collect();
    let during: Vec<u64> = churn
        .connected
        .iter()
        .filter(|(at, _)| window.contains(at))
        .map(|(_, us)| *us)
        .collect();
    let kinds = |v: &[(u64, String)]| {
        let mut by = std::collections::BTreeMap::new();
        for (_, kind) in v {
            *by.entry(kind.clone()).or_insert(0) += 1;
        }
        by
    };
    let failures = kinds(&churn.failed);
    let last_failure = churn
        .failed
        .iter()
        .map(|(at, _)| *at)
        .filter(|at| *at >= touched)
        .max();
    RestartResult {
        key: key.into(),
        title: title.into(),
        agent_seconds,
        new_connections: (churn.connected.len() + churn.failed.len()) as u64,
        failed_connections: churn.failed.len() as u64,
        failures,
        held_trips: churn.held_trips,
        held_broken: churn.held_broken.len() as u64,
        requests: (churn.requests.len() + churn.failed_requests.len()) as u64,
        failed_requests: churn.failed_requests.len() as u64,
        request_failures: kinds(&churn.failed_requests),
        p99_before_ms: percentile(before, 0.99),
        p99_window_ms: percentile(during.clone(), 0.99),
        max_window_ms: percentile(during, 1.0),
        failing_ms: last_failure.map_or(0.0, |at| at.saturating_sub(touched) as f64),
    }
}

/// The markdown table of the scenario.
pub fn markdown(results: &[RestartResult]) -> String {
    use std::fmt::Write as _;
    let mut md = String::from(
        "\n## Agent restart under load\n\nnode-1's agent (the client's) while the client opens \
         new connections to node-2 (two at a time), holds one open (a round trip every 10 ms) \
         and sends HTTP requests through the L7 proxy on a kept-alive connection. Window: from \
         touching the agent until 1 s after the new one serves. The agents drain for 5 s \
         (`--drain-grace`).\n\n\
         | how | agent back (s) | new conns | failed | held conn trips/broken | requests | failed \
         requests | p99 before (ms) | p99 in window (ms) | max in window (ms) | failing for (ms) |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let kinds: Vec<String> = r.failures.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let described = |n: u64, by: &std::collections::BTreeMap<String, u64>| {
            if n == 0 {
                return "0".to_string();
            }
            let kinds: Vec<String> = by.iter().map(|(k, n)| format!("{n} {k}")).collect();
            format!("{n} ({})", kinds.join(", "))
        };
        let failed_requests = described(r.failed_requests, &r.request_failures);
        let failed = if kinds.is_empty() {
            "0".to_string()
        } else {
            format!("{} ({})", r.failed_connections, kinds.join(", "))
        };
        let _ = writeln!(
            md,
            "| {} | {:.2} | {} | {} | {}/{} | {} | {} | {:.2} | {:.2} | {:.2} | {:.0} |",
            r.title,
            r.agent_seconds,
            r.new_connections,
            failed,
            r.held_trips,
            r.held_broken,
            r.requests,
            failed_requests,
            r.p99_before_ms,
            r.p99_window_ms,
            r.max_window_ms,
            r.failing_ms
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_counts_what_happened_while_the_agent_was_away() {
        let churn = Churn {
            connected: vec![
                (900, 1_000),
                (1_500, 40_000),
                (5_000, 2_000),
                (9_000, 3_000),
            ],
            failed: vec![(1_100, "refused".into()), (1_300, "refused".into())],
            held_trips: 10,
            held_broken: vec![(1_200, "reset".into())],
            requests: vec![(800, 500)],
            failed_requests: vec![(1_400, "eof".into())],
        };
        let r = summarize("crash", "crash", &churn, 1_000, 2_000, 1.0);
        assert_eq!((r.new_connections, r.failed_connections), (6, 2));
        assert_eq!(r.failures["refused"], 2);
        assert_eq!((r.held_broken, r.requests, r.failed_requests), (1, 2, 1));
        assert_eq!(r.p99_before_ms, 1.0);
        // 1 500 and 5 000 ms? Only what started by 1 s after the agent served (3 000).
        assert_eq!(r.max_window_ms, 40.0);
        assert_eq!(r.failing_ms, 300.0);
        let md = markdown(&[r]);
        assert!(
            md.contains("| crash | 1.00 | 6 | 2 (2 refused) | 10/1 | 2 | 1 (1 eof) |"),
            "{md}"
        );
    }
}
