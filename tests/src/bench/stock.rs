//! The stock tools (`mesh-bench run --stock`): iperf3, wrk and hey in the client pod against
//! nginx and iperf3 in the server pod, the same runs without and with the mesh, so the mesh
//! can be set beside other meshes and published figures measured the same way.
//!
//! Two cross-node clusters stay up side by side: the no-mesh one of step 2 (both pods opted
//! out) and the mesh one of step 6 (default agents). The client pod on node-1 addresses the
//! server pod on node-2 by its IP in both. A round runs every measurement on the no-mesh
//! cluster, then on the mesh one; the plan's `reps` rounds interleave them so drift hits both
//! alike.
//!
//! The server pod runs `iperf3 -s` and nginx (one worker, generated configuration, no access
//! log) answering a 3-byte body on two ports: [`NGINX_TCP_PORT`], which the bench's Service
//! names `tcp-nginx` (the mesh carries it as bytes), and [`NGINX_HTTP_PORT`], named
//! `http-nginx` (the mesh parses each request and checks it against the HTTPRouteGroup's
//! `nginx` match). The agents' counters show which runs crossed the proxies, and how.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};

use super::ladder::{self, IPERF3_PORT, Options, Plan, STEPS};
use super::report::{ProxyCounters, median, spread};
use crate::cluster::{Cluster, command_in};

pub mod output;

use output::HttpRun;

/// nginx's port the bench's Service declares as TCP (`tcp-nginx`).
pub const NGINX_TCP_PORT: u16 = 8081;
/// nginx's port the bench's Service declares as HTTP (`http-nginx`): L7 policy.
pub const NGINX_HTTP_PORT: u16 = 8082;
/// The HTTPRouteGroup match that admits the requests to [`NGINX_HTTP_PORT`] (`GET /`).
pub const NGINX_MATCH: &str = "nginx";

/// The steps whose clusters the stock tools run on: no mesh and mesh, across nodes.
const NO_MESH_STEP: u8 = 2;
const MESH_STEP: u8 = 6;

/// The programs (a harmless invocation, the Debian package that has it).
const PROGRAMS: [(&str, &str, &str); 4] = [
    ("iperf3", "--version", "iperf3"),
    ("wrk", "-v", "wrk"),
    ("hey", "-h", "hey"),
    ("nginx", "-v", "nginx"),
];

/// What one measurement runs in the client pod.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// `iperf3 -c -J` for the plan's seconds, one stream.
    Iperf3,
    /// `wrk -t<threads> -c<connections> -d<secs>s --latency` on kept-alive connections.
    Wrk { threads: u32, connections: u32 },
    /// `hey -z <secs>s -c <connections> -disable-keepalive`: a new connection per request.
    Hey { connections: u32 },
}

/// One measurement of the stock tools.
#[derive(Debug, Clone, Copy)]
pub struct Measure {
    pub key: &'static str,
    pub title: &'static str,
    load: Load,
    /// Against [`NGINX_HTTP_PORT`] (L7 policy) rather than [`NGINX_TCP_PORT`].
    http: bool,
}

/// In run order: the L4 port's, then the HTTP port's.
pub const MEASURES: [Measure; 6] = [
    Measure {
        key: "iperf3_1_stream",
        title: "iperf3, 1 stream",
        load: Load::Iperf3,
        http: false,
    },
    Measure {
        key: "wrk_c1_l4",
        title: "wrk, 1 connection, L4 port",
        load: Load::Wrk {
            threads: 1,
            connections: 1,
        },
        http: false,
    },
    Measure {
        key: "wrk_c64_l4",
        title: "wrk, 64 connections, L4 port",
        load: Load::Wrk {
            threads: 2,
            connections: 64,
        },
        http: false,
    },
    Measure {
        key: "hey_c32_new_conn",
        title: "hey, 32 connections, a new connection per request, L4 port",
        load: Load::Hey { connections: 32 },
        http: false,
    },
    Measure {
        key: "wrk_c1_http",
        title: "wrk, 1 connection, HTTP port (L7 policy)",
        load: Load::Wrk {
            threads: 1,
            connections: 1,
        },
        http: true,
    },
    Measure {
        key: "wrk_c64_http",
        title: "wrk, 64 connections, HTTP port (L7 policy)",
        load: Load::Wrk {
            threads: 2,
            connections: 64,
        },
        http: true,
    },
];

impl Measure {
    /// The figures it records: key, heading, decimals.
    pub fn figures(&self) -> Vec<(String, &'static str, usize)> {
        let k = self.key;
        match self.load {
            Load::Iperf3 => vec![(format!("{k}_gbit_s"), "Gbit/s", 2)],
            Load::Wrk { .. } | Load::Hey { .. } => vec![
                (format!("{k}_per_s"), "req/s", 0),
                (format!("{k}_p50_us"), "p50 µs", 0),
                (format!("{k}_p99_us"), "p99 µs", 0),
            ],
        }
    }
}

// === Results ===

/// The stock tools' figures, without and with the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StockResult {
    /// Seconds of each run.
    pub secs: u64,
    /// Rounds: each runs every measurement without, then with the mesh.
    pub rounds: usize,
    pub no_mesh: StockSide,
    pub mesh: StockSide,
    /// How long the rounds took (the clusters' set-up and warm-up not included).
    pub seconds: f64,
}

/// One cluster's figures and what its agents counted.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StockSide {
    /// Each figure's value per round (keys from [`Measure::figures`]).
    pub values: BTreeMap<String, Vec<f64>>,
    /// The agents' counters over the runs to the L4 ports (iperf3's, nginx's TCP port).
    pub l4: ProxyCounters,
    /// The agents' counters over the runs to nginx's HTTP port.
    pub http: ProxyCounters,
    /// Requests wrk saw answered on the HTTP port: each must be in `http.requests`.
    pub http_requests: u64,
}

impl StockResult {
    /// Whether each side took the path it stands for: no agent carried the no-mesh runs;
    /// the mesh's runs crossed both proxies over HBONE, as bytes on the L4 ports and as
    /// requests checked against the `nginx` match on the HTTP port.
    pub fn verify(&self) -> Result<()> {
        let n = &self.no_mesh;
        for (what, c) in [("L4", &n.l4), ("HTTP", &n.http)] {
            ensure!(
                c.connections + c.bytes + c.requests == 0,
                "stock tools: the no-mesh runs to the {what} port went through an agent: {c:?}"
            );
        }
        let m = &self.mesh;
        for (what, c) in [("L4", &m.l4), ("HTTP", &m.http)] {
            ensure!(
                c.connections > 0 && c.bytes > 0 && c.paths.iter().any(|p| p == "hbone"),
                "stock tools: the mesh runs to the {what} ports did not cross the proxies over \
                 HBONE: {c:?}"
            );
        }
        ensure!(
            m.l4.requests == 0,
            "stock tools: the agents parsed requests on the L4 ports: {:?}",
            m.l4
        );
        ensure!(
            m.http_requests > 0 && m.http.requests >= m.http_requests,
            "stock tools: wrk saw {} requests answered on the HTTP port, the agents counted {}",
            m.http_requests,
            m.http.requests
        );
        let admitted = format!("#{NGINX_MATCH}");
        ensure!(
            m.http.routes.iter().any(|r| r.ends_with(&admitted)),
            "stock tools: no request on the HTTP port was admitted by the {NGINX_MATCH:?} match: \
             {:?}",
            m.http
        );
        Ok(())
    }

    /// The table: each figure's median without and with the mesh, min..max over the
    /// rounds, and the ratio of the medians.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "\n## Stock tools (client pod on node-1, server pod on node-2; median of {} \
             interleaved rounds of {} s runs, min..max)\n",
            self.rounds, self.secs
        );
        let _ = writeln!(o, "| measure | figure | no mesh | mesh | mesh/no mesh |");
        let _ = writeln!(o, "|---|---|---|---|---|");
        for m in &MEASURES {
            for (i, (key, heading, d)) in m.figures().into_iter().enumerate() {
                let (a, b) = (self.no_mesh.values.get(&key), self.mesh.values.get(&key));
                let _ = writeln!(
                    o,
                    "| {} | {heading} | {} | {} | {} |",
                    if i == 0 { m.title } else { "" },
                    figure(a, d),
                    figure(b, d),
                    ratio(b.and_then(|v| median(v)), a.and_then(|v| median(v)))
                );
            }
        }
        let (l4, http) = (&self.mesh.l4, &self.mesh.http);
        let _ = writeln!(
            o,
            "\nThe mesh's agents counted {} connections and {:.0} MB on the L4 ports (paths: \
             {}), {} requests on the HTTP port (wrk saw {} answered; {}); the no-mesh runs, {} \
             connections.",
            l4.connections,
            l4.bytes as f64 / 1e6,
            l4.paths.join(", "),
            http.requests,
            self.mesh.http_requests,
            http.routes.join(", "),
            self.no_mesh.l4.connections + self.no_mesh.http.connections
        );
        o
    }

    /// Rows of `mesh-bench compare`'s table: each figure of each side, before and after.
    pub fn compare_rows(old: &StockResult, new: &StockResult) -> String {
        let mut o = String::new();
        for m in &MEASURES {
            for (key, heading, d) in m.figures() {
                for (side, a, b) in [
                    ("no mesh", &old.no_mesh, &new.no_mesh),
                    ("mesh", &old.mesh, &new.mesh),
                ] {
                    let before = a.values.get(&key).and_then(|v| median(v));
                    let after = b.values.get(&key).and_then(|v| median(v));
                    if before.is_none() && after.is_none() {
                        continue;
                    }
                    let _ = writeln!(
                        o,
                        "| stock | {}, {side} | {heading} | {} | {} | {} |",
                        m.title,
                        cell(before, d),
                        cell(after, d),
                        ratio(after, before)
                    );
                }
            }
        }
        o
    }
}

fn cell(v: Option<f64>, decimals: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.decimals$}"))
}

/// `median (min..max)`.
fn figure(values: Option<&Vec<f64>>, d: usize) -> String {
    let Some(v) = values else {
        return "-".into();
    };
    match (median(v), spread(v)) {
        (Some(m), Some((lo, hi))) => format!("{m:.d$} ({lo:.d$}..{hi:.d$})"),
        _ => "-".into(),
    }
}

fn ratio(new: Option<f64>, old: Option<f64>) -> String {
    match (new, old) {
        (Some(n), Some(o)) if o > 0.0 => format!("{:.2}x", n / o),
        _ => "-".into(),
    }
}

/// Adds the counters of one block of runs to a side's total.
fn add(total: &mut ProxyCounters, d: ProxyCounters) {
    total.connections += d.connections;
    total.bytes += d.bytes;
    total.requests += d.requests;
    for (all, new) in [(&mut total.paths, d.paths), (&mut total.routes, d.routes)] {
        for x in new {
            if !all.contains(&x) {
                all.push(x);
            }
        }
    }
}

// === The programs ===

/// Where the stock programs are.
#[derive(Debug, Clone)]
pub struct Tools {
    iperf3: PathBuf,
    wrk: PathBuf,
    hey: PathBuf,
    nginx: PathBuf,
}

impl Tools {
    /// Finds each program on PATH, else in /usr/sbin or /usr/bin (a PATH kept by `sudo -E`
    /// may lack /usr/sbin, where Debian installs nginx). A missing one is an error naming its
    /// Debian package.
    pub fn find() -> Result<Tools> {
        let mut found = BTreeMap::new();
        let (mut missing, mut packages) = (Vec::new(), Vec::new());
        for (program, arg, package) in PROGRAMS {
            let at = [
                PathBuf::from(program),
                Path::new("/usr/sbin").join(program),
                Path::new("/usr/bin").join(program),
            ]
            .into_iter()
            .find(|p| {
                // Runs at all: wrk and hey have no invocation that exits 0 without a target.
                Command::new(p)
                    .arg(arg)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            });
            match at {
                Some(p) => {
                    found.insert(program, p);
                }
                None => {
                    missing.push(format!("{program} (Debian package {package})"));
                    packages.push(package);
                }
            }
        }
        if !missing.is_empty() {
            bail!(
                "the stock tools need {}: `cargo xtask prereqs` installs them (or: apt-get \
                 install {})",
                missing.join(", "),
                packages.join(" ")
            );
        }
        let mut take = |p: &str| found.remove(p).unwrap_or_else(|| PathBuf::from(p));
        Ok(Tools {
            iperf3: take("iperf3"),
            wrk: take("wrk"),
            hey: take("hey"),
            nginx: take("nginx"),
        })
    }
}

// === The clusters ===

/// nginx's configuration; the server pod's command puts its IP in for `@POD_IP@`.
fn nginx_conf(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"user root;
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen @POD_IP@:{NGINX_TCP_PORT} backlog=4096;
        listen @POD_IP@:{NGINX_HTTP_PORT} backlog=4096;
        location / {{
            default_type text/plain;
            return 200 "ok\n";
        }}
    }}
}}
"#
    )
}

/// The server pod's command: nginx's configuration for the pod's IP, `iperf3 -s` in the
/// background, nginx in the foreground. Arguments: IP, directory, iperf3, its port, nginx.
const SERVER_SCRIPT: &str = r#"sed "s/@POD_IP@/$1/g" "$2/nginx.conf.in" > "$2/nginx.conf" || exit 1
"$3" -s -B "$1" -p "$4" &
exec "$5" -p "$2" -e "$2/error.log" -c "$2/nginx.conf""#;

/// One of the two clusters, up, with the server pod's address.
struct Side {
    mesh: bool,
    label: String,
    cluster: Cluster,
    server_ip: Ipv4Addr,
    /// nginx's directory (configuration, pid, error log).
    nginx_dir: tempfile::TempDir,
    _resources: tempfile::TempDir,
}

impl Side {
    fn up(mesh: bool, opts: &Options, tools: &Tools) -> Result<Side> {
        let id = if mesh { MESH_STEP } else { NO_MESH_STEP };
        let step = STEPS
            .iter()
            .find(|s| s.id == id)
            .with_context(|| format!("the ladder has no step {id}"))?;
        let label = format!("stock, {}", if mesh { "mesh" } else { "no mesh" });
        let resources = tempfile::tempdir().context("resources directory")?;
        std::fs::write(resources.path().join("bench.yaml"), ladder::RESOURCES)?;
        let nginx_dir = tempfile::tempdir().context("nginx's directory")?;
        std::fs::write(
            nginx_dir.path().join("nginx.conf.in"),
            nginx_conf(nginx_dir.path()),
        )?;
        let mut spec = ladder::spec(step, &opts.exe);
        let server = spec
            .nodes
            .iter_mut()
            .flat_map(|n| n.pods.iter_mut())
            .find(|p| p.name == "server")
            .context("the ladder's cluster has no server pod")?;
        server.ports = vec![IPERF3_PORT, NGINX_TCP_PORT, NGINX_HTTP_PORT];
        server.run = vec![
            "sh".into(),
            "-c".into(),
            SERVER_SCRIPT.into(),
            "stock-server".into(),
            "{ip}".into(),
            nginx_dir.path().display().to_string(),
            tools.iperf3.display().to_string(),
            IPERF3_PORT.to_string(),
            tools.nginx.display().to_string(),
        ];
        let prefix = format!("{}s{}", opts.prefix, if mesh { "m" } else { "n" });
        let cluster = Cluster::up(
            &prefix,
            &spec,
            resources.path(),
            opts.bins.clone(),
            &ladder::agent_args(step, &opts.plan),
            &[],
            &mut |s| eprintln!("[{label}] {s}"),
        )
        .with_context(|| format!("{label}: bring the cluster up"))?;
        let server_ip = cluster.pod("bench/server")?.ip;
        Ok(Side {
            mesh,
            label,
            cluster,
            server_ip,
            nginx_dir,
            _resources: resources,
        })
    }

    /// Runs `program` in the client pod; its standard output, or an error with all it said.
    fn run_in_client(&self, program: &Path, args: &[String]) -> Result<String> {
        let pod = self.cluster.pod("bench/client")?;
        let out = command_in(program, &pod.cgroup, &pod.netns_path())?
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", program.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "`{} {}` ({}): {}\n{}",
                program.display(),
                args.join(" "),
                out.status,
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(stdout)
    }

    fn url(&self, http: bool) -> String {
        let port = if http {
            NGINX_HTTP_PORT
        } else {
            NGINX_TCP_PORT
        };
        format!("http://{}:{port}/", self.server_ip)
    }

    fn iperf3(&self, tools: &Tools, secs: u64) -> Result<f64> {
        let pod = self.cluster.pod("bench/client")?;
        let args = [
            "-c",
            &self.server_ip.to_string(),
            "-p",
            &IPERF3_PORT.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ]
        .map(String::from);
        let out = command_in(&tools.iperf3, &pod.cgroup, &pod.netns_path())?
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("run iperf3")?;
        // On failure iperf3 -J still prints its report, with the reason in `error`.
        let gbit = output::iperf3(&out.stdout)?;
        ensure!(
            out.status.success(),
            "`iperf3 {}`: {}",
            args.join(" "),
            out.status
        );
        Ok(gbit)
    }

    fn wrk(
        &self,
        tools: &Tools,
        threads: u32,
        conns: u32,
        secs: u64,
        http: bool,
    ) -> Result<HttpRun> {
        let args = [
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{secs}s"),
            "--latency".into(),
            self.url(http),
        ];
        let text = self.run_in_client(&tools.wrk, &args)?;
        output::wrk(&text).with_context(|| format!("`wrk {}`", args.join(" ")))
    }

    fn hey(&self, tools: &Tools, conns: u32, secs: u64) -> Result<HttpRun> {
        let args = [
            "-z".into(),
            format!("{secs}s"),
            "-c".into(),
            conns.to_string(),
            "-disable-keepalive".into(),
            self.url(false),
        ];
        let text = self.run_in_client(&tools.hey, &args)?;
        output::hey(&text).with_context(|| format!("`hey {}`", args.join(" ")))
    }

    /// Waits until the agents serve both pods (mesh), then until a one-second run of iperf3
    /// and of wrk on each nginx port goes through: configuration, certificates, servers up.
    /// The runs warm both paths up.
    fn wait_ready(&self, tools: &Tools) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        if self.mesh {
            ladder::wait_enrolled(&self.cluster, &self.label, deadline)?;
        }
        loop {
            let attempt = self.iperf3(tools, 1).and_then(|_| {
                self.wrk(tools, 1, 1, 1, false)?;
                self.wrk(tools, 1, 1, 1, true)
            });
            match attempt {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("{}: never ready", self.label)));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }

    /// Every measurement once, in order; the counters of the L4 and the HTTP runs apart.
    fn round(&self, tools: &Tools, secs: u64, r: &mut StockSide) -> Result<()> {
        let mut before = ladder::counters(&self.cluster)?;
        let mut l4_done = false;
        for m in &MEASURES {
            if m.http && !l4_done {
                let now = ladder::counters(&self.cluster)?;
                add(&mut r.l4, now.since(&before));
                (before, l4_done) = (now, true);
            }
            eprintln!("[{}] {}", self.label, m.title);
            let mut push = |k: String, v: f64| r.values.entry(k).or_default().push(v);
            match m.load {
                Load::Iperf3 => push(format!("{}_gbit_s", m.key), self.iperf3(tools, secs)?),
                Load::Wrk {
                    threads,
                    connections,
                } => {
                    let run = self.wrk(tools, threads, connections, secs, m.http)?;
                    record(&mut push, m.key, &run);
                    if m.http {
                        r.http_requests += run.requests;
                    }
                }
                Load::Hey { connections } => {
                    let run = self.hey(tools, connections, secs)?;
                    record(&mut push, m.key, &run);
                }
            }
        }
        add(&mut r.http, ladder::counters(&self.cluster)?.since(&before));
        Ok(())
    }

    /// The agents' and nginx's last lines, after a failure.
    fn tails(&self) {
        for n in &self.cluster.nodes {
            if let Some(a) = &n.agent {
                eprintln!(
                    "[{}] last lines of the agent of {}:\n{}",
                    self.label,
                    n.name,
                    a.tail(30)
                );
            }
        }
        let log =
            std::fs::read_to_string(self.nginx_dir.path().join("error.log")).unwrap_or_default();
        let last: Vec<&str> = log.lines().rev().take(10).collect();
        if !last.is_empty() {
            eprintln!(
                "[{}] last lines of nginx's error log:\n{}",
                self.label,
                last.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }
}

fn record(push: &mut impl FnMut(String, f64), key: &str, run: &HttpRun) {
    push(format!("{key}_per_s"), run.per_s);
    push(format!("{key}_p50_us"), run.p50_us);
    push(format!("{key}_p99_us"), run.p99_us);
}

/// Brings both clusters up, runs the plan's rounds, checks the counters, tears down.
pub fn run(opts: &Options, tools: &Tools) -> Result<StockResult> {
    let plan: &Plan = &opts.plan;
    let secs = plan.stock_secs.max(1);
    let sides = [Side::up(false, opts, tools)?, Side::up(true, opts, tools)?];
    let result = (|| {
        for side in &sides {
            side.wait_ready(tools)?;
        }
        let mut r = StockResult {
            secs,
            rounds: plan.reps,
            no_mesh: StockSide::default(),
            mesh: StockSide::default(),
            seconds: 0.0,
        };
        let started = Instant::now();
        for round in 0..plan.reps {
            for side in &sides {
                eprintln!("[{}] round {}/{}", side.label, round + 1, plan.reps);
                let into = if side.mesh {
                    &mut r.mesh
                } else {
                    &mut r.no_mesh
                };
                side.round(tools, secs, into)?;
            }
        }
        r.seconds = started.elapsed().as_secs_f64();
        r.verify()?;
        Ok(r)
    })();
    if result.is_err() {
        for side in &sides {
            side.tails();
        }
    }
    for side in sides {
        side.cluster.down().context("tear the cluster down")?;
    }
    result
}

#[cfg(test)]
mod tests;
