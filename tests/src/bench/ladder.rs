//! The ladder: each step a fresh simulated cluster ([`Cluster`]) with the datapath it measures,
//! the same client and server, the same measurements.
//!
//! Same-node steps run one node with the client and server pods; cross-node steps two nodes,
//! the client on the first and the server on the second. The no-mesh steps label both pods
//! `mesh.io/enrolled: "false"`, so the agents leave them alone and the bytes take the plain
//! veth/bridge path.
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::client::{Proto, Sample};
use super::report::{Datapath, ProxyCounters, StepResult};
use super::server::{ECHO_PORT, GRPC_PORT, PORTS, SINK_PORT};
use super::stock::output::{Iperf3Report, Iperf3Sum};
use crate::cluster::{Binaries, Cluster, ClusterSpec, NodeSpec, PodSpec};

/// How the client's outbound connections reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capture {
    None,
    Iptables,
    Ebpf,
}

/// What the client and server of a step are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// This binary's `serve` and `client`: throughput, latency, CPU and memory.
    Bench,
    /// Stock iperf3 (`-s`; `-c -P 4 --bidir` for the plan's `iperf_secs`): bulk throughput
    /// both ways at once, several streams, and the agents' CPU per GB.
    Iperf3,
}

/// One rung of the ladder.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    pub id: u8,
    pub key: &'static str,
    pub title: &'static str,
    pub cross_node: bool,
    pub capture: Capture,
    pub skmsg: bool,
    /// Same-node calls through two proxy hops and mTLS instead of inside the agent.
    pub same_node_hbone: bool,
    pub proto: Proto,
    /// Run in the full mode only (unless named with `--steps`).
    pub extra: bool,
    pub tool: Tool,
}

const fn step(id: u8, key: &'static str, title: &'static str) -> Step {
    Step {
        id,
        key,
        title,
        cross_node: false,
        capture: Capture::Ebpf,
        skmsg: true,
        same_node_hbone: false,
        proto: Proto::Tcp,
        extra: false,
        tool: Tool::Bench,
    }
}

pub const STEPS: [Step; 11] = [
    Step {
        capture: Capture::None,
        ..step(1, "same-node", "same node, no mesh")
    },
    Step {
        capture: Capture::None,
        cross_node: true,
        ..step(2, "cross-node", "two nodes, no mesh")
    },
    // sk_msg off: the iptables path is compared with eBPF capture alone (step 4).
    Step {
        capture: Capture::Iptables,
        skmsg: false,
        ..step(3, "iptables", "same node, proxy, iptables REDIRECT")
    },
    Step {
        skmsg: false,
        ..step(4, "ebpf", "same node, proxy, eBPF capture")
    },
    step(5, "ebpf-skmsg", "same node, proxy, eBPF + sk_msg"),
    Step {
        cross_node: true,
        ..step(6, "hbone", "two nodes, two proxies, mTLS HBONE")
    },
    Step {
        cross_node: true,
        proto: Proto::Http,
        ..step(7, "http1-l7", "two nodes, HTTP/1.1, L7 policy")
    },
    Step {
        cross_node: true,
        proto: Proto::Grpc,
        ..step(8, "grpc", "two nodes, gRPC unary")
    },
    Step {
        same_node_hbone: true,
        extra: true,
        ..step(
            9,
            "same-node-hbone",
            "same node, two proxy hops, mTLS HBONE",
        )
    },
    Step {
        cross_node: true,
        extra: true,
        tool: Tool::Iperf3,
        ..step(
            10,
            "iperf3-bidir",
            "two nodes, iperf3 4 streams each way, sk_msg",
        )
    },
    Step {
        cross_node: true,
        skmsg: false,
        extra: true,
        tool: Tool::Iperf3,
        ..step(
            11,
            "iperf3-bidir-no-skmsg",
            "two nodes, iperf3 4 streams each way, no sk_msg",
        )
    },
];

/// The iperf3 server's port (its default).
pub(super) const IPERF3_PORT: u16 = 5201;

/// How much each step measures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub reps: usize,
    /// Round trips of each closed-loop (max rate) run.
    pub rr: u64,
    /// Requests per second, and milliseconds, of each fixed-rate run.
    pub fixed_rate: u64,
    pub fixed_ms: u64,
    /// Bytes of each throughput run.
    pub bulk: u64,
    /// Connections held open while the agents' memory is read.
    pub held: usize,
    /// TCP steps: streams and seconds of each both-ways bulk run.
    #[serde(default = "default_duplex_streams")]
    pub duplex_streams: usize,
    #[serde(default = "default_duplex_secs")]
    pub duplex_secs: u64,
    /// Seconds of each iperf3 run.
    #[serde(default = "default_iperf_secs")]
    pub iperf_secs: u64,
    /// More flags for every agent of every step (`mesh-bench run --agent-arg`), after the
    /// step's own: a setting under test, recorded with the figures it produced.
    #[serde(default)]
    pub agent_args: Vec<String>,
    /// Seconds of each run of the stock tools (`mesh-bench run --stock`).
    #[serde(default = "default_stock_secs")]
    pub stock_secs: u64,
}

fn default_duplex_streams() -> usize {
    4
}

fn default_duplex_secs() -> u64 {
    60
}

fn default_iperf_secs() -> u64 {
    60
}

fn default_stock_secs() -> u64 {
    10
}

impl Plan {
    pub fn fast() -> Plan {
        Plan {
            name: "fast".into(),
            reps: 3,
            rr: 1_000,
            fixed_rate: 1_000,
            fixed_ms: 500,
            bulk: 32 << 20,
            held: 100,
            duplex_streams: 4,
            duplex_secs: 5,
            iperf_secs: 5,
            agent_args: Vec::new(),
            stock_secs: 3,
        }
    }

    pub fn full() -> Plan {
        Plan {
            name: "full".into(),
            reps: 5,
            rr: 10_000,
            fixed_rate: 1_000,
            fixed_ms: 5_000,
            bulk: 512 << 20,
            held: 1_000,
            duplex_streams: 4,
            duplex_secs: 60,
            iperf_secs: 60,
            agent_args: Vec::new(),
            stock_secs: 10,
        }
    }

    pub fn describe(&self) -> String {
        let agents = if self.agent_args.is_empty() {
            String::new()
        } else {
            format!("; agents also run with `{}`", self.agent_args.join(" "))
        };
        format!(
            "{} repetitions after a warm-up; {} closed-loop round trips per max-rate run; \
             {}/s for {} ms per fixed-rate run (latency from the intended send time); \
             {} MiB per throughput run; TCP steps: {} streams both ways for {} s per \
             both-ways run; memory with {} connections held; {} s per iperf3 run; {} s per \
             stock tool run{agents}",
            self.reps,
            self.rr,
            self.fixed_rate,
            self.fixed_ms,
            self.bulk >> 20,
            self.duplex_streams,
            self.duplex_secs,
            self.held,
            self.iperf_secs,
            self.stock_secs
        )
    }
}

/// Where the binaries are and what to call the clusters.
pub struct Options {
    pub plan: Plan,
    pub bins: Binaries,
    /// This binary: the pods run its `serve` and `client` commands.
    pub exe: PathBuf,
    /// Cluster prefix; each step appends its number.
    pub prefix: String,
}

/// The service in front of the server pod (only the mesh resolves it).
pub(super) const SERVICE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 40);
pub(super) const HTTP_SERVICE_PORT: u16 = 80;

pub(super) const RESOURCES: &str = "\
apiVersion: v1
kind: Service
metadata: {name: server, namespace: bench}
spec:
  clusterIP: 10.96.0.40
  selector: {app: server}
  ports:
  - {name: tcp-echo, port: 9000, targetPort: 9000}
  - {name: tcp-sink, port: 9001, targetPort: 9001}
  - {name: http, port: 80, targetPort: 8080}
  - {name: grpc, port: 9090, targetPort: 9090}
  - {name: tcp-nginx, port: 8081, targetPort: 8081}
  - {name: http-nginx, port: 8082, targetPort: 8082}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: tcp-ports, namespace: bench}
spec: {matches: {ports: [9000, 9001, 9090, 5201, 8081]}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: echo-routes, namespace: bench}
spec:
  matches:
  - {name: echo, pathRegex: '/(echo|sink)', methods: [POST]}
  - {name: nginx, pathRegex: '/', methods: [GET]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-server-tcp, namespace: bench}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: bench}
  rules: [{kind: TCPRoute, name: tcp-ports}]
  sources: [{kind: ServiceAccount, name: client, namespace: bench}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-server-http, namespace: bench}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: bench}
  rules: [{kind: HTTPRouteGroup, name: echo-routes, matches: [echo, nginx]}]
  sources: [{kind: ServiceAccount, name: client, namespace: bench}]
";

fn pod(name: &str, mesh: bool, server: Option<&PathBuf>) -> PodSpec {
    let mut labels = BTreeMap::from([("app".to_string(), name.to_string())]);
    if !mesh {
        labels.insert("mesh.io/enrolled".into(), "false".into());
    }
    PodSpec {
        namespace: "bench".into(),
        name: name.into(),
        service_account: Some(name.into()),
        labels,
        tls_mode: None,
        ports: if server.is_some() {
            PORTS.to_vec()
        } else {
            vec![]
        },
        annotations: BTreeMap::new(),
        probe_port: None,
        run: server.map_or_else(Vec::new, |exe| {
            vec![
                exe.display().to_string(),
                "serve".into(),
                "--ip".into(),
                "{ip}".into(),
                "--name".into(),
                "{pod}".into(),
            ]
        }),
    }
}

pub(super) fn spec(step: &Step, exe: &PathBuf) -> ClusterSpec {
    let mesh = step.capture != Capture::None;
    let (client, mut server) = (pod("client", mesh, None), pod("server", mesh, Some(exe)));
    if step.tool == Tool::Iperf3 {
        server.ports = vec![IPERF3_PORT];
        server.run = ["iperf3", "-s", "-p", &IPERF3_PORT.to_string()]
            .map(String::from)
            .to_vec();
    }
    let nodes = if step.cross_node {
        vec![
            NodeSpec {
                name: "node-1".into(),
                pods: vec![client],
            },
            NodeSpec {
                name: "node-2".into(),
                pods: vec![server],
            },
        ]
    } else {
        vec![NodeSpec {
            name: "node-1".into(),
            pods: vec![client, server],
        }]
    };
    ClusterSpec {
        nodes,
        enrollment: Default::default(),
    }
}

/// Waits until each agent lists every pod of its node in `/debug/pods` (enrolled, listeners
/// open); an error naming `label` once `deadline` passed.
pub(super) fn wait_enrolled(cluster: &Cluster, label: &str, deadline: Instant) -> Result<()> {
    while !all_enrolled(cluster) {
        ensure!(
            Instant::now() < deadline,
            "{label}: the agents never served every pod"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Whether each agent lists every pod of its node in `/debug/pods`.
fn all_enrolled(cluster: &Cluster) -> bool {
    cluster.nodes.iter().all(|n| {
        let Ok(pods) = cluster.agent_admin(&n.name, "/debug/pods") else {
            return false;
        };
        cluster
            .pods
            .iter()
            .filter(|p| p.node == n.name)
            .all(|p| pods.contains(&format!("\"{}\"", p.key())))
    })
}

/// The agents' flags for `step`, then the plan's own.
pub(super) fn agent_args(step: &Step, plan: &Plan) -> Vec<String> {
    let mut args = Vec::new();
    if !step.skmsg {
        args.push("--no-skmsg".to_string());
    }
    if step.capture == Capture::Iptables {
        // connect4 leaves the server's ports alone; iptables sends them to the proxy.
        args.extend(PORTS.iter().map(|p| format!("--exclude-port={p}")));
    }
    if step.same_node_hbone {
        args.push("--same-node=hbone".into());
    }
    args.extend(plan.agent_args.iter().cloned());
    args
}

/// A running step: its cluster and the addresses the client calls.
struct Bench<'a> {
    cluster: Cluster,
    opts: &'a Options,
    proto: Proto,
    echo: String,
    sink: String,
    label: String,
}

/// Brings up the step's cluster, measures, tears it down.
pub fn run_step(step: &Step, opts: &Options) -> Result<StepResult> {
    let label = format!("step {} {}", step.id, step.key);
    let resources = tempfile::tempdir().context("resources directory")?;
    std::fs::write(resources.path().join("bench.yaml"), RESOURCES)?;
    let prefix = format!("{}{}", opts.prefix, step.id);
    let cluster = Cluster::up(
        &prefix,
        &spec(step, &opts.exe),
        resources.path(),
        opts.bins.clone(),
        &agent_args(step, &opts.plan),
        &[],
        &mut |s| eprintln!("[{label}] {s}"),
    )
    .with_context(|| format!("{label}: bring the cluster up"))?;
    let server_ip = cluster.pod("bench/server")?.ip;
    let (echo, sink) = match step.proto {
        Proto::Tcp if step.tool == Tool::Iperf3 => {
            let a = format!("{server_ip}:{IPERF3_PORT}");
            (a.clone(), a)
        }
        Proto::Tcp => (
            format!("{server_ip}:{ECHO_PORT}"),
            format!("{server_ip}:{SINK_PORT}"),
        ),
        Proto::Http => {
            let a = format!("{SERVICE_VIP}:{HTTP_SERVICE_PORT}");
            (a.clone(), a)
        }
        Proto::Grpc => {
            let a = format!("{SERVICE_VIP}:{GRPC_PORT}");
            (a.clone(), a)
        }
    };
    let b = Bench {
        cluster,
        opts,
        proto: step.proto,
        echo,
        sink,
        label,
    };
    if step.capture == Capture::Iptables {
        b.iptables_redirect()?;
    }
    let started = Instant::now();
    let result = b.measure(step).map(|mut r| {
        r.seconds = started.elapsed().as_secs_f64();
        r
    });
    if result.is_err() {
        for n in &b.cluster.nodes {
            if let Some(a) = &n.agent {
                eprintln!(
                    "[{}] last lines of the agent of {}:\n{}",
                    b.label,
                    n.name,
                    a.tail(30)
                );
            }
        }
    }
    b.cluster.down().context("tear the cluster down")?;
    result
}

impl Bench<'_> {
    /// Runs the client in the client pod; returns what it printed.
    fn client(&self, args: &[String]) -> Result<Sample> {
        let pod = self.cluster.pod("bench/client")?;
        let out = crate::cluster::command_in(&self.opts.exe, &pod.cgroup, &pod.netns_path())?
            .arg("client")
            .arg(self.proto.name())
            .args(args)
            .output()
            .context("run the bench client")?;
        ensure!(
            out.status.success(),
            "client {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        serde_json::from_slice(&out.stdout).context("the client's JSON")
    }

    fn rr(&self, size: usize, n: u64) -> Result<Sample> {
        self.client(&strings(&[
            "rr",
            &self.echo,
            &size.to_string(),
            &n.to_string(),
        ]))
    }

    fn fixed(&self, size: usize) -> Result<Sample> {
        let p = &self.opts.plan;
        let rate = p.fixed_rate.to_string();
        let ms = p.fixed_ms.to_string();
        self.client(&strings(&[
            "fixed",
            &self.echo,
            &size.to_string(),
            &rate,
            &ms,
        ]))
    }

    fn bulk(&self, bytes: u64) -> Result<Sample> {
        self.client(&strings(&["bulk", &self.sink, &bytes.to_string()]))
    }

    fn duplex(&self) -> Result<Sample> {
        let p = &self.opts.plan;
        self.client(&strings(&[
            "duplex",
            &self.echo,
            &p.duplex_streams.to_string(),
            &p.duplex_secs.to_string(),
        ]))
    }

    /// Waits until every agent serves its node's pods (enrolled, listeners open), then until
    /// round trips go through (configuration, certificates, server up).
    fn wait_ready(&self, mesh: bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        if mesh {
            wait_enrolled(&self.cluster, &self.label, deadline)?;
        }
        loop {
            match self.rr(1, 1) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("{}: never ready", self.label)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn agent_pids(&self) -> Vec<u32> {
        self.cluster
            .nodes
            .iter()
            .filter_map(|n| n.agent.as_ref().map(|a| a.pid()))
            .collect()
    }

    fn cpu_secs(&self) -> f64 {
        self.agent_pids().into_iter().filter_map(cpu_secs).sum()
    }

    fn rss_mib(&self) -> f64 {
        self.agent_pids().into_iter().filter_map(rss_mib).sum()
    }

    /// The summed counters of every agent.
    fn counters(&self) -> Result<Counters> {
        counters(&self.cluster)
    }

    fn measure(&self, step: &Step) -> Result<StepResult> {
        let plan = &self.opts.plan;
        if step.tool == Tool::Iperf3 {
            self.wait_iperf3_ready()?;
        } else {
            self.wait_ready(step.capture != Capture::None)?;
        }
        let mut r = StepResult {
            id: step.id,
            key: step.key.into(),
            title: step.title.into(),
            datapath: Datapath {
                mesh: step.capture != Capture::None,
                capture: format!("{:?}", step.capture).to_lowercase(),
                skmsg: step.skmsg,
                same_node: if step.same_node_hbone {
                    "hbone"
                } else {
                    "in-process"
                }
                .into(),
                protocol: step.proto,
                cross_node: step.cross_node,
                agents: self.agent_pids().len(),
            },
            values: BTreeMap::new(),
            rss_mib: BTreeMap::new(),
            proxy: ProxyCounters::default(),
            seconds: 0.0,
        };
        let before = self.counters()?;
        r.rss_mib.insert("idle".into(), self.rss_mib());
        if step.tool == Tool::Iperf3 {
            return self.measure_iperf3(r, &before);
        }
        eprintln!("[{}] warm-up", self.label);
        self.bulk(plan.bulk / 4)?;
        self.rr(1024, plan.rr)?;
        let mut push = |k: &str, v: f64| r.values.entry(k.to_string()).or_default().push(v);
        for rep in 0..plan.reps {
            eprintln!("[{}] repetition {}/{}", self.label, rep + 1, plan.reps);
            let cpu = self.cpu_secs();
            let bulk = self.bulk(plan.bulk)?;
            let cpu_bulk = self.cpu_secs() - cpu;
            push("bulk_mb_s", bulk.mb_per_s);
            push("cpu_s_per_gb", cpu_bulk / (bulk.bytes as f64 / 1e9));
            if self.proto == Proto::Tcp {
                // Several streams both ways at once: a sender outrunning its reader anywhere
                // on the path must be held back, never fail (the run fails otherwise).
                push("duplex_mb_s", self.duplex()?.mb_per_s);
            }
            let cpu = self.cpu_secs();
            let mut requests = 0;
            for (size, name) in [(1, "1b"), (1024, "1kb")] {
                let max = self.rr(size, plan.rr)?;
                let fixed = self.fixed(size)?;
                for (s, mode) in [(&max, "max"), (&fixed, "fixed")] {
                    push(&format!("{name}_{mode}_p50"), s.p50);
                    push(&format!("{name}_{mode}_p90"), s.p90);
                    push(&format!("{name}_{mode}_p99"), s.p99);
                    push(&format!("{name}_{mode}_p999"), s.p999);
                    push(&format!("{name}_{mode}_per_s"), s.per_s);
                    requests += s.requests;
                }
            }
            push(
                "cpu_s_per_10k_req",
                (self.cpu_secs() - cpu) / requests as f64 * 10_000.0,
            );
        }
        if !r.datapath.mesh {
            // No agent carried anything: its CPU figures would only be noise.
            r.values.retain(|k, _| !k.starts_with("cpu_"));
        }
        r.rss_mib.insert("loaded".into(), self.rss_mib());
        let held = self.while_held(plan.held, || self.rss_mib())?;
        r.rss_mib.insert("held".into(), held);
        let after = self.counters()?;
        r.proxy = after.since(&before);
        if step.capture == Capture::Iptables {
            r.proxy.iptables_redirected = Some(self.iptables_redirected()?);
        }
        Ok(r)
    }

    /// Runs iperf3 in the client pod against the server; its JSON report.
    fn iperf3(&self, args: &[&str]) -> Result<Iperf3Report> {
        let pod = self.cluster.pod("bench/client")?;
        let (ip, port) = self.sink.rsplit_once(':').context("the server's address")?;
        let out = crate::cluster::command_in(Path::new("iperf3"), &pod.cgroup, &pod.netns_path())?
            .args(["-c", ip, "-p", port, "-J"])
            .args(args)
            .output()
            .context("run iperf3 (Debian package iperf3)")?;
        let report: Iperf3Report = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "iperf3's JSON report: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        if let Some(error) = &report.error {
            bail!("iperf3 {args:?}: {error}");
        }
        ensure!(out.status.success(), "iperf3 {args:?}: {}", out.status);
        Ok(report)
    }

    /// Waits until a one-second iperf3 run goes through (configuration, certificates).
    fn wait_iperf3_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.iperf3(&["-t", "1"]) {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("{}: never ready", self.label)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// `iperf3 -P 4 --bidir` for the plan's `iperf_secs`, each repetition: MB/s each way and
    /// both together (`bulk_mb_s`), agent CPU per GB.
    fn measure_iperf3(&self, mut r: StepResult, before: &Counters) -> Result<StepResult> {
        let plan = &self.opts.plan;
        let secs = plan.iperf_secs.to_string();
        for rep in 0..plan.reps {
            eprintln!("[{}] repetition {}/{}", self.label, rep + 1, plan.reps);
            let cpu = self.cpu_secs();
            let report = self.iperf3(&["-t", &secs, "-P", "4", "--bidir"])?;
            let cpu = self.cpu_secs() - cpu;
            let end = report.end.context("iperf3's report has no totals")?;
            let up = end
                .sum_received
                .context("iperf3's report has no totals (end.sum_received)")?;
            let down = end
                .sum_received_bidir_reverse
                .context("iperf3's report has no reverse totals (--bidir)")?;
            let mb_s = |s: &Iperf3Sum| s.bytes as f64 / s.seconds.max(1e-9) / 1e6;
            let mut push = |k: &str, v: f64| r.values.entry(k.to_string()).or_default().push(v);
            push("bulk_mb_s", mb_s(&up) + mb_s(&down));
            push("bulk_up_mb_s", mb_s(&up));
            push("bulk_down_mb_s", mb_s(&down));
            push("cpu_s_per_gb", cpu / ((up.bytes + down.bytes) as f64 / 1e9));
        }
        r.rss_mib.insert("loaded".into(), self.rss_mib());
        r.proxy = self.counters()?.since(before);
        Ok(r)
    }

    /// Runs `measure` while the client pod holds `n` connections open.
    fn while_held<T>(&self, n: usize, measure: impl FnOnce() -> T) -> Result<T> {
        let pod = self.cluster.pod("bench/client")?;
        let mut child = crate::cluster::command_in(&self.opts.exe, &pod.cgroup, &pod.netns_path())?
            .args([
                "client",
                self.proto.name(),
                "hold",
                &self.echo,
                &n.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("run the hold client")?;
        let mut line = String::new();
        let mut out = BufReader::new(child.stdout.take().context("stdout")?);
        out.read_line(&mut line)?;
        ensure!(line.trim() == "held", "could not hold {n} connections");
        let v = measure();
        drop(child.stdin.take());
        ensure!(child.wait()?.success(), "the hold client failed");
        Ok(v)
    }

    /// In the client pod: the proxy's own connections pass, TCP to the pod network is
    /// redirected to the proxy's outbound listener.
    fn iptables_redirect(&self) -> Result<()> {
        let pod = self.cluster.pod("bench/client")?;
        let mount = mesh_datapath::cgroup::v2_mount().context("cgroup v2")?;
        let agent_cg = &self.cluster.nodes[0].agent_cgroup;
        let rel = agent_cg.strip_prefix(&mount).context("agent cgroup")?;
        let ports: Vec<String> = PORTS.iter().map(u16::to_string).collect();
        let (rel, ports) = (rel.display().to_string(), ports.join(","));
        for rule in [
            &["-m", "cgroup", "--path", &rel, "-j", "RETURN"][..],
            &[
                "-m",
                "multiport",
                "--dports",
                &ports,
                "-j",
                "REDIRECT",
                "--to-ports",
                "15001",
            ],
        ] {
            let mut argv = vec!["ip", "netns", "exec", &pod.netns, "iptables", "-t", "nat"];
            argv.extend(["-A", "OUTPUT", "-p", "tcp", "-d", "10.244.0.0/16"]);
            argv.extend_from_slice(rule);
            sh(&argv)?;
        }
        Ok(())
    }

    fn iptables_redirected(&self) -> Result<u64> {
        let pod = self.cluster.pod("bench/client")?;
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &pod.netns, "iptables", "-t", "nat"])
            .args(["-L", "OUTPUT", "-n", "-v", "-x"])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .find(|l| l.contains("REDIRECT"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .context("no REDIRECT rule in the client pod")
    }
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn sh(argv: &[&str]) -> Result<()> {
    let out = std::process::Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .with_context(|| format!("run {}", argv[0]))?;
    if !out.status.success() {
        bail!(
            "`{}`: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// User plus system CPU seconds of a process, all its threads (`/proc/<pid>/stat`).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf(3) has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks / if hz > 0 { hz as f64 } else { 100.0 })
}

/// Resident memory of a process, MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// The summed counters of every agent of `cluster`.
pub(super) fn counters(cluster: &Cluster) -> Result<Counters> {
    let mut c = Counters::default();
    for n in &cluster.nodes {
        let text = cluster.agent_admin(&n.name, "/metrics")?;
        c.add(&text);
    }
    Ok(c)
}

/// Sums of the agents' Prometheus counters that show traffic through the proxy.
#[derive(Debug, Default)]
pub(super) struct Counters {
    connections: f64,
    bytes: f64,
    requests: f64,
    /// Connections opened and requests by `mesh_path` label.
    paths: BTreeMap<String, f64>,
    /// Requests by `route` label (the policy rule that admitted them).
    routes: BTreeMap<String, f64>,
}

impl Counters {
    pub(super) fn add(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(v) = value.parse::<f64>() else {
                continue;
            };
            let name = series.split('{').next().unwrap_or_default();
            match name {
                "istio_tcp_connections_opened_total" => {
                    self.connections += v;
                    let path = label(series, "mesh_path").unwrap_or("unknown");
                    *self.paths.entry(path.to_string()).or_default() += v;
                }
                "istio_tcp_received_bytes_total" | "istio_tcp_sent_bytes_total" => {
                    self.bytes += v;
                }
                "istio_requests_total" => {
                    self.requests += v;
                    let path = label(series, "mesh_path").unwrap_or("unknown");
                    *self.paths.entry(path.to_string()).or_default() += v;
                    let route = label(series, "route").unwrap_or("unknown");
                    *self.routes.entry(route.to_string()).or_default() += v;
                }
                _ => {}
            }
        }
    }

    pub(super) fn since(&self, before: &Counters) -> ProxyCounters {
        let grew = |now: &BTreeMap<String, f64>, then: &BTreeMap<String, f64>| {
            now.iter()
                .filter(|(k, v)| **v > then.get(*k).copied().unwrap_or(0.0))
                .map(|(k, _)| k.clone())
                .collect::<BTreeSet<String>>()
                .into_iter()
                .filter(|k| k != "unknown")
                .collect()
        };
        ProxyCounters {
            connections: (self.connections - before.connections) as u64,
            bytes: (self.bytes - before.bytes) as u64,
            requests: (self.requests - before.requests) as u64,
            paths: grew(&self.paths, &before.paths),
            routes: grew(&self.routes, &before.routes),
            iptables_redirected: None,
        }
    }
}

fn label<'a>(series: &'a str, name: &str) -> Option<&'a str> {
    let start = series.find(&format!("{name}=\""))? + name.len() + 2;
    let len = series[start..].find('"')?;
    Some(&series[start..start + len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_every_series_and_name_the_paths() {
        let mut before = Counters::default();
        before
            .add("istio_tcp_connections_opened_total{reporter=\"source\",mesh_path=\"hbone\"} 2\n");
        let mut after = Counters::default();
        after.add(
            "# TYPE istio_tcp_connections_opened_total counter\n\
             istio_tcp_connections_opened_total{reporter=\"source\",mesh_path=\"hbone\"} 5\n\
             istio_tcp_connections_opened_total{reporter=\"destination\",mesh_path=\"same_node\"} 0\n\
             istio_tcp_received_bytes_total{reporter=\"source\"} 100\n\
             istio_tcp_sent_bytes_total{reporter=\"source\"} 20\n",
        );
        let d = after.since(&before);
        assert_eq!((d.connections, d.bytes, d.requests), (3, 120, 0));
        assert_eq!(d.paths, ["hbone"]);
    }

    #[test]
    fn every_step_has_its_own_number_and_key() {
        let ids: BTreeSet<u8> = STEPS.iter().map(|s| s.id).collect();
        let keys: BTreeSet<&str> = STEPS.iter().map(|s| s.key).collect();
        assert_eq!((ids.len(), keys.len()), (STEPS.len(), STEPS.len()));
        assert!(STEPS.iter().filter(|s| !s.extra).count() == 8);
    }
}
