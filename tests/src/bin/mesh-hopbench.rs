//! The app <-> proxy hop, measured: 1-byte request/response latency and bulk throughput from a
//! client pod to a server across a veth, for
//!
//! - `direct`: no mesh (the limit of this topology);
//! - `iptables`: the agent's proxy behind an iptables REDIRECT rule in the pod's netns;
//! - `ebpf`: the same proxy with connect4 capture, sk_msg off;
//! - `ebpf+skmsg`: connect4 capture with the sockmap shortcut on the app <-> proxy hop;
//! - `mesh`: both namespaces are meshed pods of one agent with a controller, run with
//!   `--same-node=hbone`: the client's connection crosses the veth in an HBONE tunnel (HTTP/2
//!   CONNECT over mTLS) and the server pod's proxy admits it by policy (two proxy hops plus
//!   TLS);
//! - `mesh-local`: the same pods and policy with the agent's default, `--same-node=in-process`:
//!   the server pod's policy admits the call inside the agent, which copies it straight to the
//!   server's application (no TLS, no HTTP/2, nothing on the veth).
//!
//! Each mode runs `--reps` times in the same process; the report gives the median and the
//! spread (min..max) of the repetitions, and ratios to `direct`.
//!
//! `mesh-hopbench [--quick] [--modes direct,mesh,...] [--json FILE]` (root), run by `cargo xtask bench`.
use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    thread,
    time::Instant,
};

use hdrhistogram::Histogram;
use mesh_tests::{Agent, Cgroup, Netns, command_in, instance, link, sh};

const POD_IP: &str = "10.77.0.2";
const REMOTE_IP: &str = "10.77.0.1";
const MODES: [&str; 6] = [
    "direct",
    "iptables",
    "ebpf",
    "ebpf+skmsg",
    "mesh",
    "mesh-local",
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("client") {
        return client(&args[2..]);
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("mesh-hopbench: needs root (network namespaces, cgroups, BPF)");
        return ExitCode::from(77);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let plan = if quick {
        Plan {
            reps: 3,
            rr: 5_000,
            bulk: 256 << 20,
            fixed_secs: 3,
            fixed_rate: 1_000,
            held: 1_000,
        }
    } else {
        Plan {
            reps: 7,
            rr: 20_000,
            bulk: 1 << 30,
            fixed_secs: 10,
            fixed_rate: 1_000,
            held: 1_000,
        }
    };
    let modes: Vec<&str> = match args.iter().position(|a| a == "--modes") {
        Some(i) => match args.get(i + 1) {
            Some(list) => list.split(',').collect(),
            None => {
                eprintln!("mesh-hopbench: --modes needs a comma-separated list");
                return ExitCode::from(64);
            }
        },
        None => MODES.to_vec(),
    };
    if let Some(bad) = modes.iter().find(|m| !MODES.contains(m)) {
        eprintln!(
            "mesh-hopbench: unknown mode {bad:?} (modes: {})",
            MODES.join(", ")
        );
        return ExitCode::from(64);
    }
    let results: Vec<ModeResult> = modes.iter().map(|m| run_mode(m, &plan)).collect();
    print_report(&results, &plan);
    if let Some(path) = json {
        let v: Vec<serde_json::Value> = results.iter().map(ModeResult::json).collect();
        let doc = serde_json::json!({
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "reps": plan.reps, "rr_round_trips": plan.rr, "bulk_bytes": plan.bulk,
            "fixed_rate_per_s": plan.fixed_rate, "fixed_secs": plan.fixed_secs,
            "connections_held": plan.held,
            "modes": v,
        });
        if let Err(e) = std::fs::write(
            &path,
            serde_json::to_string_pretty(&doc).unwrap_or_default(),
        ) {
            eprintln!("mesh-hopbench: write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

struct Plan {
    reps: usize,
    /// Round trips per closed-loop run.
    rr: usize,
    bulk: u64,
    /// Seconds of the fixed-rate run.
    fixed_secs: u64,
    /// Requests per second of the fixed-rate run.
    fixed_rate: u64,
    /// Connections held open while the agent's memory is read.
    held: usize,
}

/// One mode's figures: every measurement's value per repetition (once for memory).
struct ModeResult {
    mode: String,
    values: BTreeMap<&'static str, Vec<f64>>,
}

/// Measurements, in report order: key, heading, decimals.
const COLUMNS: [(&str, &str, usize); 10] = [
    ("rr1_p50_us", "1 B RR p50 µs", 1),
    ("rr1_p99_us", "1 B RR p99 µs", 1),
    ("rr1k_per_s", "1 KB RR max req/s", 0),
    ("rr1k_mean_us", "1 KB RR mean µs", 1),
    ("fixed_p50_us", "1 KB @rate p50 µs", 1),
    ("fixed_p99_us", "1 KB @rate p99 µs", 1),
    ("fixed_p999_us", "1 KB @rate p99.9 µs", 1),
    ("bulk_mb_per_s", "bulk MB/s", 0),
    ("rss_idle_mib", "agent RSS idle MiB", 1),
    ("rss_held_mib", "agent RSS held MiB", 1),
];

impl ModeResult {
    fn push(&mut self, key: &'static str, v: f64) {
        self.values.entry(key).or_default().push(v);
    }

    fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("mode".into(), self.mode.clone().into());
        for (k, v) in &self.values {
            m.insert((*k).into(), v.clone().into());
        }
        m.into()
    }
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn spread(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// One table per measurement: each mode's median (min..max) and its ratio to the first mode.
fn print_report(results: &[ModeResult], plan: &Plan) {
    for (key, heading, decimals) in COLUMNS {
        let base = results[0].values.get(key).map(|v| median(v));
        println!("\n| mode | {heading} (min..max) | vs {} |", results[0].mode);
        println!("|---|---|---|");
        for r in results {
            let Some(v) = r.values.get(key) else {
                println!("| {} | - | - |", r.mode);
                continue;
            };
            let (m, (lo, hi)) = (median(v), spread(v));
            let ratio = match base {
                Some(b) if b > 0.0 => format!("{:.2}x", m / b),
                _ => "-".into(),
            };
            println!(
                "| {} | {m:.decimals$} ({lo:.decimals$}..{hi:.decimals$}) | {ratio} |",
                r.mode
            );
        }
    }
    println!(
        "\n{} repetitions; {} round trips per closed-loop run; 1 KB at {}/s for {} s \
         (latency from the intended send time); {} MiB bulk; memory with {} connections held.",
        plan.reps,
        plan.rr,
        plan.fixed_rate,
        plan.fixed_secs,
        plan.bulk >> 20,
        plan.held
    );
}

/// Resident memory of a process, MiB.
fn rss_mib(pid: u32) -> Option<f64> {
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

fn self_exe() -> PathBuf {
    std::env::current_exe().expect("current exe")
}

fn agent_bin() -> PathBuf {
    self_exe().with_file_name("mesh-agent")
}

fn run_mode(mode: &str, plan: &Plan) -> ModeResult {
    eprintln!("mesh-hopbench: {mode}");
    let pod = Netns::new("p");
    let remote = Netns::new("r");
    link(&pod, "eth0", POD_IP, &remote, "eth0", REMOTE_IP);
    let pod_cg = Cgroup::new("pod");
    let echo = serve(&remote, &format!("{REMOTE_IP}:9000"), true);
    let sink = serve(&remote, &format!("{REMOTE_IP}:9001"), false);
    let pod_arg = format!(
        "--pod=name=bench/client,cgroup={},netns={},ip={POD_IP}",
        pod_cg.path.display(),
        pod.path.display()
    );
    let tag = mode.replace('+', "-");
    // The mesh mode's controller and its files live until the mode is measured.
    let mut mesh_parts = None;
    let _agent = match mode {
        "direct" => None,
        "mesh" | "mesh-local" => {
            let remote_cg = Cgroup::new("srv");
            let same_node = if mode == "mesh" {
                "hbone"
            } else {
                "in-process"
            };
            let (agent, parts) = start_mesh(&pod_arg, &remote, &remote_cg, same_node);
            mesh_parts = Some((parts, remote_cg));
            // Wait until calls go through (configuration and certificates).
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            while command_in(&self_exe(), &pod_cg, &pod)
                .args(["client", "rr", &echo, "1", "10"])
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
            {
                assert!(Instant::now() < deadline, "the mesh did not come up");
                thread::sleep(std::time::Duration::from_millis(200));
            }
            Some(agent)
        }
        "iptables" => {
            let agent = Agent::start(&agent_bin(), &instance(&format!("hb{tag}")), &[pod_arg]);
            let mount = mesh_agent::cgroup::v2_mount().expect("cgroup v2");
            let rel = agent.cgroup.path.strip_prefix(&mount).expect("under mount");
            let ns = pod.name.as_str();
            let cg = format!("{}", rel.display());
            // The proxy's own upstream connections (agent cgroup) must not be redirected.
            nat_output(ns, &["-m", "cgroup", "--path", &cg, "-j", "RETURN"]);
            nat_output(ns, &["-j", "REDIRECT", "--to-ports", "15001"]);
            Some(agent)
        }
        _ => {
            let mut args = vec!["--capture=10.77.0.0/24".to_string(), pod_arg];
            if mode == "ebpf" {
                args.push("--no-skmsg".into());
            }
            Some(Agent::start(
                &agent_bin(),
                &instance(&format!("hb{tag}")),
                &args,
            ))
        }
    };
    let mut r = ModeResult {
        mode: mode.into(),
        values: BTreeMap::new(),
    };
    let agent_pid = _agent
        .as_ref()
        .and_then(|a| a.child.as_ref())
        .map(|c| c.id());
    if let Some(mib) = agent_pid.and_then(rss_mib) {
        r.push("rss_idle_mib", mib);
    }
    let (rr, bulk) = (plan.rr.to_string(), plan.bulk.to_string());
    let (rate, secs) = (plan.fixed_rate.to_string(), plan.fixed_secs.to_string());
    for _ in 0..plan.reps {
        let out = client_run(&pod_cg, &pod, &["rr", &echo, "1", &rr]);
        let v = numbers(&out);
        r.push("rr1_p50_us", v[0]);
        r.push("rr1_p99_us", v[1]);
        let out = client_run(&pod_cg, &pod, &["rr", &echo, "1024", &rr]);
        let v = numbers(&out);
        r.push("rr1k_per_s", v[3]);
        r.push("rr1k_mean_us", v[2]);
        let out = client_run(&pod_cg, &pod, &["fixed", &echo, "1024", &rate, &secs]);
        let v = numbers(&out);
        r.push("fixed_p50_us", v[0]);
        r.push("fixed_p99_us", v[1]);
        r.push("fixed_p999_us", v[2]);
        let out = client_run(&pod_cg, &pod, &["bulk", &sink, &bulk]);
        r.push("bulk_mb_per_s", numbers(&out)[0]);
    }
    if let Some(pid) = agent_pid {
        let mib = while_held(&pod_cg, &pod, &echo, plan.held, || rss_mib(pid));
        if let Some(mib) = mib {
            r.push("rss_held_mib", mib);
        }
    }
    drop(mesh_parts);
    r
}

/// What the mesh mode keeps alive: the controller (and its runtime) and its directory.
struct MeshParts {
    _controller: mesh_controller::app::Controller,
    _dir: mesh_tests::inprocess::ClusterDir,
    _files: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
}

/// A controller on a directory describing both pods (client -> server allowed on the echo and
/// sink ports) and the agent meshing both, carrying calls between them as `same_node` says
/// (`hbone` or `in-process`).
fn start_mesh(
    client_arg: &str,
    remote: &Netns,
    remote_cg: &Cgroup,
    same_node: &str,
) -> (Agent, MeshParts) {
    use mesh_tests::inprocess::{ClusterDir, TOKEN, namespace, pod};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = ClusterDir::new();
    dir.write("ns.yaml", &namespace("bench"));
    dir.write(
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod("bench", "client", "node-1", POD_IP, "client", "client", ""),
            pod(
                "bench", "server", "node-1", REMOTE_IP, "server", "server", ""
            )
        ),
    );
    dir.write(
        "policy.yaml",
        "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-server, namespace: bench}
spec:
  destination: {kind: ServiceAccount, name: server, namespace: bench}
  rules: [{kind: TCPRoute, name: bench}]
  sources: [{kind: ServiceAccount, name: client, namespace: bench}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: bench, namespace: bench}
spec: {matches: {ports: [9000, 9001]}}
",
    );
    let controller = rt.block_on(dir.start("127.0.0.1:0".parse().expect("address"), &[]));
    let files = tempfile::tempdir().expect("tempdir");
    let (token, ca) = (files.path().join("token"), files.path().join("ca.crt"));
    std::fs::write(&token, TOKEN).expect("token file");
    std::fs::write(&ca, &controller.roots_pem).expect("ca file");
    let args = vec![
        "--capture=10.77.0.0/24".to_string(),
        client_arg.to_string(),
        format!(
            "--pod=name=bench/server,cgroup={},netns={},ip={REMOTE_IP}",
            remote_cg.path.display(),
            remote.path.display()
        ),
        format!("--controller=https://{}", controller.grpc_addr),
        format!("--controller-ca={}", ca.display()),
        "--node=node-1".into(),
        format!("--bootstrap-token-file={}", token.display()),
        format!("--same-node={same_node}"),
    ];
    let tag = format!("hbmesh-{same_node}");
    let agent = Agent::start(&agent_bin(), &instance(&tag), &args);
    (
        agent,
        MeshParts {
            _controller: controller,
            _dir: dir,
            _files: files,
            _rt: rt,
        },
    )
}

/// Appends a rule for TCP to the mesh subnet to the nat OUTPUT chain of a namespace.
fn nat_output(ns: &str, rule: &[&str]) {
    let mut args = vec![
        "ip",
        "netns",
        "exec",
        ns,
        "iptables",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.77.0.0/24",
    ];
    args.extend_from_slice(rule);
    sh(&args);
}

fn client_run(cg: &Cgroup, ns: &Netns, args: &[&str]) -> String {
    let out = command_in(&self_exe(), cg, ns)
        .arg("client")
        .args(args)
        .output()
        .expect("run bench client");
    assert!(
        out.status.success(),
        "client {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Echo (1-byte round trips) or sink (read to EOF, then reply one byte) server threads.
fn serve(ns: &Netns, addr: &str, echo: bool) -> String {
    let l = ns.run(|| TcpListener::bind(addr).expect("bind"));
    let a = l.local_addr().expect("addr").to_string();
    thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { break };
            let _ = c.set_nodelay(true);
            thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) if echo => {
                            if c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        Ok(_) => {}
                    }
                }
                if !echo {
                    let _ = c.write_all(b"k");
                }
            });
        }
    });
    a
}

fn numbers(out: &str) -> Vec<f64> {
    out.split_whitespace()
        .map(|x| x.parse::<f64>().expect("number"))
        .collect()
}

/// Runs `measure` while a client in the pod holds `n` connections to `addr` open (each has
/// carried one round trip).
fn while_held<T>(cg: &Cgroup, ns: &Netns, addr: &str, n: usize, measure: impl FnOnce() -> T) -> T {
    let mut child = command_in(&self_exe(), cg, ns)
        .args(["client", "hold", addr, &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run bench client");
    let mut line = String::new();
    // Kept open until the client exits: it prints a last line.
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    std::io::BufRead::read_line(&mut out, &mut line).expect("read the client");
    assert_eq!(
        line.trim(),
        "held",
        "the client could not hold {n} connections"
    );
    let v = measure();
    drop(child.stdin.take());
    let status = child.wait().expect("wait for the client");
    assert!(status.success(), "hold client failed");
    v
}

/// The client side, inside the pod. `rr ADDR SIZE N`: closed-loop round trips of SIZE bytes,
/// prints "p50_us p99_us mean_us per_s"; `fixed ADDR SIZE RATE SECS`: round trips started at
/// a fixed rate, latency from the intended send time (so a stall counts for every request it
/// delayed), prints "p50_us p99_us p999_us"; `bulk ADDR BYTES`: prints MB/s; `hold ADDR N`:
/// opens N connections, prints "held", keeps them until stdin closes.
fn client(args: &[String]) -> ExitCode {
    let arg = |i: usize| args.get(i).and_then(|n| n.parse::<u64>().ok());
    let (Some(kind), Some(addr)) = (args.first().map(String::as_str), args.get(1)) else {
        eprintln!("usage: mesh-hopbench client rr|fixed|bulk|hold ADDR ...");
        return ExitCode::from(64);
    };
    let result = match (kind, arg(2), arg(3), arg(4)) {
        ("rr", Some(size), Some(n), _) => rr(addr, size as usize, n as usize),
        ("fixed", Some(size), Some(rate), Some(secs)) => fixed(addr, size as usize, rate, secs),
        ("bulk", Some(n), _, _) => bulk(addr, n),
        ("hold", Some(n), _, _) => hold(addr, n as usize),
        _ => Err(std::io::Error::other("bad client arguments")),
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-hopbench client: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_exact_retry(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            // A socket in a sockmap can report EAGAIN on an empty queue.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn histogram() -> std::io::Result<Histogram<u64>> {
    // 1 µs to 60 s, 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).map_err(std::io::Error::other)
}

fn round_trip(s: &mut TcpStream, req: &[u8], resp: &mut [u8]) -> std::io::Result<()> {
    s.write_all(req)?;
    read_exact_retry(s, resp)
}

fn rr(addr: &str, size: usize, n: usize) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let (req, mut resp) = (vec![1u8; size], vec![0u8; size]);
    for _ in 0..n / 10 {
        round_trip(&mut s, &req, &mut resp)?;
    }
    let mut h = histogram()?;
    let start = Instant::now();
    for _ in 0..n {
        let t = Instant::now();
        round_trip(&mut s, &req, &mut resp)?;
        h.saturating_record(t.elapsed().as_micros() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(format!(
        "{} {} {:.2} {:.1}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        secs * 1e6 / n as f64,
        n as f64 / secs
    ))
}

fn fixed(addr: &str, size: usize, rate: u64, secs: u64) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let (req, mut resp) = (vec![1u8; size], vec![0u8; size]);
    for _ in 0..rate.min(1000) {
        round_trip(&mut s, &req, &mut resp)?;
    }
    let mut h = histogram()?;
    let interval = std::time::Duration::from_nanos(1_000_000_000 / rate.max(1));
    let start = Instant::now();
    for i in 0..rate * secs {
        let intended = start + interval * i as u32;
        if let Some(wait) = intended.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        round_trip(&mut s, &req, &mut resp)?;
        h.saturating_record(intended.elapsed().as_micros() as u64);
    }
    Ok(format!(
        "{} {} {}",
        h.value_at_quantile(0.5),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999)
    ))
}

fn bulk(addr: &str, n: u64) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    let buf = vec![0x5au8; 256 * 1024];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        let len = ((n - sent) as usize).min(buf.len());
        s.write_all(&buf[..len])?;
        sent += len as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut k = [0u8; 1];
    read_exact_retry(&mut s, &mut k)?;
    let secs = t.elapsed().as_secs_f64();
    Ok(format!("{:.1}", n as f64 / secs / 1e6))
}

fn hold(addr: &str, n: usize) -> std::io::Result<String> {
    let mut held = Vec::with_capacity(n);
    let mut b = [1u8; 1];
    for _ in 0..n {
        let mut s = TcpStream::connect(addr)?;
        s.write_all(&b)?;
        read_exact_retry(&mut s, &mut b)?;
        held.push(s);
    }
    println!("held");
    std::io::stdout().flush()?;
    // Until the parent closes stdin.
    let _ = std::io::stdin().read(&mut [0u8; 1])?;
    drop(held);
    Ok(String::new())
}
