//! The app <-> proxy hop, measured: 1-byte request/response latency and bulk throughput from a
//! client pod to a server across a veth, for
//!
//! - `direct`: no mesh (the limit of this topology);
//! - `iptables`: the agent's proxy behind an iptables REDIRECT rule in the pod's netns;
//! - `ebpf`: the same proxy with connect4 capture, sk_msg off;
//! - `ebpf+skmsg`: connect4 capture with the sockmap shortcut on the app <-> proxy hop;
//! - `mesh`: both namespaces are meshed pods of one agent with a controller: the client's
//!   connection crosses the veth in an HBONE tunnel (HTTP/2 CONNECT over mTLS) and the
//!   server pod's proxy admits it by policy (two proxy hops plus TLS).
//!
//! Each mode runs `--reps` times in the same process; the report gives the median and the
//! spread (min..max) of the repetitions, and ratios to `direct`.
//!
//! `mesh-hopbench [--quick] [--modes direct,mesh,...] [--json FILE]` (root), run by `cargo xtask bench`.
use std::{
    io::{Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    thread,
    time::Instant,
};

use mesh_tests::{Agent, Cgroup, Netns, command_in, instance, link, sh};

const POD_IP: &str = "10.77.0.2";
const REMOTE_IP: &str = "10.77.0.1";
const MODES: [&str; 5] = ["direct", "iptables", "ebpf", "ebpf+skmsg", "mesh"];

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
        }
    } else {
        Plan {
            reps: 7,
            rr: 20_000,
            bulk: 1 << 30,
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
    rr: usize,
    bulk: u64,
}

struct ModeResult {
    mode: String,
    /// Per repetition: median and p99 round trip (µs), throughput (MB/s).
    p50_us: Vec<f64>,
    p99_us: Vec<f64>,
    mbps: Vec<f64>,
}

impl ModeResult {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "mode": self.mode, "rr_p50_us": self.p50_us, "rr_p99_us": self.p99_us,
            "bulk_mb_per_s": self.mbps,
        })
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

fn print_report(results: &[ModeResult], plan: &Plan) {
    let base_p50 = median(&results[0].p50_us);
    let base_mbps = median(&results[0].mbps);
    println!(
        "\n| mode | RR p50 µs (min..max) | RR p99 µs | p50 vs direct | bulk MB/s (min..max) | bulk vs direct |"
    );
    println!("|---|---|---|---|---|---|");
    for r in results {
        let (p50, (p50lo, p50hi)) = (median(&r.p50_us), spread(&r.p50_us));
        let (mbps, (mlo, mhi)) = (median(&r.mbps), spread(&r.mbps));
        println!(
            "| {} | {p50:.1} ({p50lo:.1}..{p50hi:.1}) | {:.1} | {:.2}x | {mbps:.0} ({mlo:.0}..{mhi:.0}) | {:.2}x |",
            r.mode,
            median(&r.p99_us),
            p50 / base_p50,
            mbps / base_mbps
        );
    }
    println!(
        "\n{} repetitions; {} 1-byte round trips each; {} MiB bulk each; median (min..max).",
        plan.reps,
        plan.rr,
        plan.bulk >> 20
    );
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
        "mesh" => {
            let remote_cg = Cgroup::new("srv");
            let (agent, parts) = start_mesh(&pod_arg, &remote, &remote_cg);
            mesh_parts = Some((parts, remote_cg));
            // Wait until the tunnel works (configuration and certificates).
            let deadline = Instant::now() + std::time::Duration::from_secs(30);
            while command_in(&self_exe(), &pod_cg, &pod)
                .args(["client", "rr", &echo, "10"])
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
        p50_us: vec![],
        p99_us: vec![],
        mbps: vec![],
    };
    for _ in 0..plan.reps {
        let out = client_run(&pod_cg, &pod, &["rr", &echo, &plan.rr.to_string()]);
        let mut it = out
            .split_whitespace()
            .map(|x| x.parse::<f64>().expect("number"));
        r.p50_us.push(it.next().expect("p50"));
        r.p99_us.push(it.next().expect("p99"));
        let out = client_run(&pod_cg, &pod, &["bulk", &sink, &plan.bulk.to_string()]);
        r.mbps.push(out.trim().parse().expect("MB/s"));
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
/// sink ports) and the agent meshing both.
fn start_mesh(client_arg: &str, remote: &Netns, remote_cg: &Cgroup) -> (Agent, MeshParts) {
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
    ];
    let agent = Agent::start(&agent_bin(), &instance("hbmesh"), &args);
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

/// The client side, inside the pod: prints "p50_us p99_us" or "MB/s".
fn client(args: &[String]) -> ExitCode {
    let (Some(kind), Some(addr), Some(n)) = (
        args.first().map(String::as_str),
        args.get(1),
        args.get(2).and_then(|n| n.parse::<u64>().ok()),
    ) else {
        eprintln!("usage: mesh-hopbench client rr|bulk ADDR N");
        return ExitCode::from(64);
    };
    let result = match kind {
        "rr" => rr(addr, n as usize),
        "bulk" => bulk(addr, n),
        _ => Err(std::io::Error::other("unknown client mode")),
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

fn rr(addr: &str, n: usize) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut b = [1u8; 1];
    for _ in 0..n / 10 {
        s.write_all(&b)?;
        read_exact_retry(&mut s, &mut b)?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&b)?;
        read_exact_retry(&mut s, &mut b)?;
        lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    let p = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    Ok(format!("{:.2} {:.2}", p(0.5), p(0.99)))
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
