//! The single-machine mesh: brings up a simulated cluster (nodes and pods as network
//! namespaces, the real controller and one real agent per node) and runs the demo scenario, or
//! keeps a cluster up for exploring.
//!
//! ```text
//! mesh-sim demo [--keep] [--dir deploy/demo] [--prefix msim]
//! mesh-sim up   [--dir DIR] [--prefix P]      # keeps it running, prints how to reach it
//! mesh-sim down [--prefix P]                  # removes it (also what a killed run left)
//! mesh-sim exec [--prefix P] POD -- CMD...    # runs CMD as POD's application runs
//! ```
//!
//! `DIR` holds `cluster.yaml` (nodes and pods) and `resources/` (Kubernetes and SMI YAML).
use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use mesh_tests::cluster::{self, Binaries, Cluster, ClusterSpec};
use mesh_tests::sniff::Sniffer;

const USAGE: &str = "usage: mesh-sim demo [--keep] [--dir DIR] [--prefix P] | up [--dir DIR] [--prefix P] | down [--prefix P] | exec [--prefix P] POD -- COMMAND [ARG...]";

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

struct Args {
    command: String,
    keep: bool,
    dir: PathBuf,
    prefix: String,
    /// `exec`: the pod (`namespace/name` or `name`) and the command.
    pod: Option<String>,
    argv: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or(USAGE)?;
    if !["demo", "up", "down", "exec"].contains(&command.as_str()) {
        return Err(format!("unknown command {command:?}\n{USAGE}"));
    }
    let mut parsed = Args {
        command,
        keep: false,
        dir: PathBuf::from("deploy/demo"),
        prefix: "msim".into(),
        pod: None,
        argv: vec![],
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--" if parsed.command == "exec" => {
                parsed.argv = args.by_ref().collect();
            }
            "--keep" => parsed.keep = true,
            "--dir" => parsed.dir = args.next().ok_or("--dir needs a directory")?.into(),
            "--prefix" => parsed.prefix = args.next().ok_or("--prefix needs a name")?,
            pod if parsed.command == "exec" && parsed.pod.is_none() && !pod.starts_with('-') => {
                parsed.pod = Some(pod.to_string());
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if parsed.command == "exec" && (parsed.pod.is_none() || parsed.argv.is_empty()) {
        return Err(format!(
            "exec needs a pod and a command after `--`\n{USAGE}"
        ));
    }
    let p = &parsed.prefix;
    if p.is_empty()
        || p.len() > 12
        || !p
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!(
            "--prefix {p:?}: 1 to 12 lowercase letters or digits"
        ));
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mesh-sim: {e}");
            return ExitCode::from(64);
        }
    };
    if let Some(missing) = missing_privileges() {
        eprintln!("mesh-sim: {missing}");
        return ExitCode::from(77);
    }
    if args.command == "exec" {
        return exec(&args);
    }
    // Ctrl-C and SIGTERM end the run through the normal path, which tears the cluster down.
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let result = match args.command.as_str() {
        "down" => cluster::cleanup(&args.prefix).map(|n| {
            println!(
                "removed {n} objects of the simulated cluster {:?}",
                args.prefix
            );
        }),
        "up" => up(&args),
        _ => demo(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nmesh-sim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What running the simulated cluster needs that this process lacks, if anything.
fn missing_privileges() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some(
            "needs root: it creates network namespaces and cgroups and loads eBPF programs \
             (run it with sudo)"
                .into(),
        );
    }
    if mesh_datapath::cgroup::v2_mount().is_err() {
        return Some("needs a cgroup v2 hierarchy mounted (none found)".into());
    }
    if std::process::Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2 (`ip`): apt-get install iproute2".into());
    }
    None
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted; tearing down");
    }
    Ok(())
}

fn binaries() -> Result<Binaries> {
    let dir = std::env::current_exe()?
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    let bins = Binaries::in_dir(&dir);
    for b in [&bins.agent, &bins.controller, &dir.join("mesh-demo")] {
        ensure!(
            b.exists(),
            "{} is missing: build with `cargo build -p mesh-tests -p mesh-demo --bins`",
            b.display()
        );
    }
    Ok(bins)
}

fn start(args: &Args) -> Result<Cluster> {
    let path = args.dir.join("cluster.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let spec = ClusterSpec::parse(&text).with_context(|| path.display().to_string())?;
    let started = Instant::now();
    let cluster = Cluster::up(
        &args.prefix,
        &spec,
        &args.dir.join("resources"),
        binaries()?,
        &[],
        &[],
        &mut |step| println!("  - {step}"),
    )?;
    println!(
        "  cluster up in {:.1} s: {} nodes, {} pods",
        started.elapsed().as_secs_f64(),
        cluster.nodes.len(),
        cluster.pods.len()
    );
    Ok(cluster)
}

fn up(args: &Args) -> Result<()> {
    let cluster = start(args)?;
    print_access(&cluster);
    cluster.detach();
    Ok(())
}

/// Runs a command as the pod's application runs (its cgroup and network namespace, so the
/// mesh captures it), with this terminal's stdin, stdout and stderr; exits with its status
/// (128 + the signal that killed it, 127 when there is no such command, 125 when it could not
/// be started otherwise).
fn exec(args: &Args) -> ExitCode {
    let (Some(pod), Some((program, rest))) = (&args.pod, args.argv.split_first()) else {
        return ExitCode::from(64);
    };
    let run = || -> Result<std::process::ExitStatus> {
        let p = cluster::running_pod(&args.prefix, pod)?;
        // The demo applications beside this binary come first, as in the pods' own commands.
        let local = std::env::current_exe()?
            .parent()
            .map(|dir| dir.join(program))
            .filter(|path| path.exists());
        let program = local.unwrap_or_else(|| PathBuf::from(program));
        let mut cmd = cluster::command_in(&program, &p.cgroup, &p.netns)?;
        match cmd.args(rest).status() {
            Ok(status) => Ok(status),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                eprintln!("mesh-sim: {}: command not found", program.display());
                Ok(std::os::unix::process::ExitStatusExt::from_raw(127 << 8))
            }
            Err(e) => Err(anyhow::Error::new(e))
                .with_context(|| format!("run {} in pod {}", program.display(), p.key())),
        }
    };
    match run() {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt as _;
            let code = status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(1);
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("mesh-sim: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn print_access(c: &Cluster) {
    println!("\nThe cluster stays up. To reach it:");
    let sim = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "mesh-sim".into());
    let prefix = if c.names.prefix == "msim" {
        String::new()
    } else {
        format!("--prefix {} ", c.names.prefix)
    };
    for p in &c.pods {
        println!(
            "  {:<22} {:<8} {:<12} {sim} exec {prefix}{} -- <command>",
            p.key(),
            p.node,
            p.ip,
            p.key()
        );
    }
    for n in &c.nodes {
        println!(
            "  agent of {:<10} ip netns exec {} curl -s {}/metrics   (also /debug/conns, /debug/certs)",
            n.name,
            n.netns,
            cluster::AGENT_ADMIN
        );
        println!(
            "  {:<19} {} counters --instance {}",
            "",
            c.bins.agent.display(),
            c.names.instance(&n.name)
        );
    }
    println!(
        "  controller           logs in {}/logs; its directory {}/resources (edit it live)",
        c.state.display(),
        c.state.display()
    );
    println!(
        "  remove it            {sim} down --prefix {}",
        c.names.prefix
    );
}

// === The demo scenario ===

fn step(n: usize, total: usize, title: &str) {
    println!("\n[{n}/{total}] {title}");
}

fn line(text: impl AsRef<str>) {
    println!("      {}", text.as_ref());
}

fn demo(args: &Args) -> Result<()> {
    println!("mesh demo: a simulated cluster on this machine");
    let mut cluster = start(args)?;
    let outcome = scenario(&mut cluster);
    if let Err(e) = &outcome {
        eprintln!("\nthe scenario failed: {e:#}");
        for n in &cluster.nodes {
            if let Some(a) = &n.agent {
                eprintln!("--- agent of {} (last lines):\n{}", n.name, a.tail(4));
            }
        }
    }
    if args.keep && outcome.is_ok() {
        print_access(&cluster);
        cluster.detach();
        return Ok(());
    }
    println!("\ntearing down");
    cluster.down()?;
    let left = cluster::cleanup(&args.prefix)?;
    ensure!(left == 0, "{left} objects were left behind");
    println!("  nothing left behind");
    outcome
}

fn scenario(c: &mut Cluster) -> Result<()> {
    const TOTAL: usize = 6;
    wait_for_mesh(c)?;

    step(1, TOTAL, "mutual TLS between pods on different nodes");
    let (client, echo) = (c.pod("demo/client")?, c.pod("demo/echo")?);
    line(format!(
        "client ({}, {}) calls the echo service (VIP 10.96.0.20:9000); echo runs on {} ({})",
        client.node, client.ip, echo.node, echo.ip
    ));
    let fabric = std::fs::File::open(PathBuf::from("/run/netns").join(c.names.fabric()))?;
    let sniffer = Sniffer::start_in(fabric, "n0");
    let reply = call(c, "demo/client", "10.96.0.20:9000", "tcp")?;
    let segments = sniffer.stop();
    line(format!("reply: {}", reply.trim()));
    let payload: Vec<u8> = segments.iter().flat_map(|s| s.payload.clone()).collect();
    let ports: std::collections::BTreeSet<u16> = segments
        .iter()
        .filter(|s| !s.payload.is_empty())
        .map(|s| s.src_port.min(s.dst_port))
        .collect();
    // A TLS record starts each small segment: a handshake (0x16) on a new connection, or
    // application data (0x17) on one the pool already holds.
    let tls_records = segments
        .iter()
        .filter(|s| s.src_port == 15008 || s.dst_port == 15008)
        .filter(|s| {
            s.payload.starts_with(&[0x16, 0x03]) || s.payload.starts_with(&[0x17, 0x03, 0x03])
        })
        .count();
    let clear = contains(&payload, b"hello");
    line(format!(
        "on the wire between node-1 and node-2: {} TCP segments with payload, server ports {:?}, \
         starting with a TLS record: {}, the request in clear: {}",
        segments.iter().filter(|s| !s.payload.is_empty()).count(),
        ports,
        tls_records,
        yes(clear)
    ));
    ensure!(
        tls_records > 0 && !clear && ports.iter().all(|p| *p == 15008),
        "the call did not cross in TLS on port 15008"
    );
    for (node, reporter) in [("node-1", "source"), ("node-2", "destination")] {
        let seen = tcp_metric(c, node, "istio_tcp_connections_opened_total", reporter)?;
        let m = seen
            .iter()
            .find(|m| m.get("destination_workload").map(String::as_str) == Some("echo"))
            .context("no connection to echo in the agent's metrics")?;
        line(format!(
            "{node} agent ({reporter}): {} -> {}, {}",
            m.get("source_principal").map_or("?", String::as_str),
            m.get("destination_principal").map_or("?", String::as_str),
            m.get("connection_security_policy")
                .map_or("?", String::as_str)
        ));
    }
    interrupted()?;

    step(2, TOTAL, "allowed and denied by SMI access policy");
    line(format!(
        "client -> echo: allowed (TrafficTarget client-to-echo), reply {:?}",
        reply.trim()
    ));
    let denied = c.exec(
        "demo/intruder",
        &[
            "mesh-demo",
            "call",
            "--target",
            "10.96.0.20:9000",
            "--mode",
            "tcp",
        ],
    )?;
    ensure!(
        !denied.status.success(),
        "the intruder's call went through: {}",
        String::from_utf8_lossy(&denied.stdout)
    );
    line(format!(
        "intruder -> echo: refused; the intruder saw: {}",
        String::from_utf8_lossy(&denied.stderr).trim()
    ));
    let denials = tcp_metric(
        c,
        "node-2",
        "mesh_tcp_connections_denied_total",
        "destination",
    )?;
    let d = denials
        .iter()
        .find(|m| {
            m.get("source_principal")
                .is_some_and(|p| p.ends_with("/sa/intruder"))
        })
        .context("the denial is not in node-2's metrics")?;
    line(format!(
        "node-2 agent: denied {} with reason {}",
        d.get("source_principal").map_or("?", String::as_str),
        d.get("reason").map_or("?", String::as_str)
    ));
    interrupted()?;

    step(
        3,
        TOTAL,
        "same-node traffic still goes through identity and policy",
    );
    let reply = call(c, "demo/client", "10.96.0.21:9000", "tcp")?;
    line(format!(
        "client -> echo-local (both on node-1): reply {:?}",
        reply.trim()
    ));
    let denied = c.exec(
        "demo/intruder",
        &[
            "mesh-demo",
            "call",
            "--target",
            "10.96.0.21:9000",
            "--mode",
            "tcp",
        ],
    )?;
    ensure!(!denied.status.success(), "the intruder reached echo-local");
    line("intruder -> echo-local (same node): refused");
    let local = tcp_metric(
        c,
        "node-1",
        "istio_tcp_connections_opened_total",
        "destination",
    )?;
    let m = local
        .iter()
        .find(|m| m.get("destination_workload").map(String::as_str) == Some("echo-local"))
        .context("no connection to echo-local in node-1's metrics")?;
    line(format!(
        "node-1 agent (destination): {} -> {}, path {}, {} (the bytes never left the agent)",
        m.get("source_principal").map_or("?", String::as_str),
        m.get("destination_principal").map_or("?", String::as_str),
        m.get("mesh_path").map_or("?", String::as_str),
        m.get("connection_security_policy")
            .map_or("?", String::as_str)
    ));
    interrupted()?;

    step(4, TOTAL, "traffic split: web -> 90% web-v1, 10% web-v2");
    let started = Instant::now();
    let out = c.exec(
        "demo/client",
        &[
            "mesh-demo",
            "load",
            "--target",
            "10.96.0.10:80",
            "--mode",
            "http1",
            "--requests",
            "1000",
            "--concurrency",
            "8",
            "--json",
        ],
    )?;
    ensure!(
        out.status.success(),
        "load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("the load client's JSON")?;
    let by_pod = report["pods"].as_object().cloned().unwrap_or_default();
    let total: u64 = by_pod.values().filter_map(|v| v.as_u64()).sum();
    for (pod, n) in &by_pod {
        let n = n.as_u64().unwrap_or(0);
        line(format!(
            "{pod}: {n} connections ({:.1}%)",
            100.0 * n as f64 / total.max(1) as f64
        ));
    }
    line(format!(
        "{total} answered, {} failed, in {:.1} s; latency p50 {} µs, p99 {} µs",
        report["failures"]
            .as_object()
            .map_or(0, |f| f.values().filter_map(|v| v.as_u64()).sum::<u64>()),
        started.elapsed().as_secs_f64(),
        report["latency_us"]["p50"],
        report["latency_us"]["p99"]
    ));
    let v1 = by_pod.get("web-v1").and_then(|v| v.as_u64()).unwrap_or(0);
    ensure!(total >= 990, "only {total} of 1000 requests were answered");
    let share = v1 as f64 / total as f64;
    ensure!(
        (0.85..=0.95).contains(&share),
        "web-v1 got {:.1}%, not about 90%",
        share * 100.0
    );
    interrupted()?;

    step(5, TOTAL, "plaintext to STRICT and PERMISSIVE pods");
    let from_node = |target: &str| {
        c.exec_on_node(
            "node-1",
            &[
                c.bins
                    .apps
                    .join("mesh-demo")
                    .to_str()
                    .unwrap_or("mesh-demo"),
                "call",
                "--target",
                target,
                "--mode",
                "tcp",
            ],
        )
    };
    let strict = from_node(&format!("{}:9000", c.pod("demo/echo")?.ip))?;
    ensure!(!strict.status.success(), "plaintext reached the STRICT pod");
    line("a process on node-1 outside the mesh -> echo (STRICT): refused");
    let permissive = from_node(&format!("{}:9000", c.pod("demo/legacy")?.ip))?;
    let verdict = if permissive.status.success() {
        "answered".to_string()
    } else {
        let denials = tcp_metric(
            c,
            "node-2",
            "mesh_tcp_connections_denied_total",
            "destination",
        )?;
        let reason = denials
            .iter()
            .find(|m| m.get("destination_workload").map(String::as_str) == Some("legacy"))
            .and_then(|m| m.get("reason").cloned())
            .unwrap_or_else(|| "?".into());
        format!(
            "admitted as plaintext, then refused by policy (reason {reason}: TrafficTargets name service accounts, a plaintext caller has none)"
        )
    };
    line(format!(
        "the same process -> legacy (PERMISSIVE): {verdict}"
    ));
    interrupted()?;

    step(6, TOTAL, "kernel redirect counters");
    for n in &c.nodes {
        let out = std::process::Command::new(&c.bins.agent)
            .args([
                "counters",
                "--instance",
                &c.names.instance(&n.name),
                "-o",
                "json",
            ])
            .output()?;
        ensure!(
            out.status.success(),
            "counters of {}: {}",
            n.name,
            String::from_utf8_lossy(&out.stderr)
        );
        let v: BTreeMap<String, u64> = serde_json::from_slice(&out.stdout)?;
        let get = |k: &str| v.get(k).copied().unwrap_or(0);
        line(format!(
            "{}: connect4 redirected {}, original destinations answered {}, sk_msg redirected {} \
             ({} bytes), inbound steered {}",
            n.name,
            get("connect4_redirected"),
            get("getsockopt_answered"),
            get("skmsg_redirected"),
            get("skmsg_redirected_bytes"),
            get("sk_lookup_steered")
        ));
    }
    Ok(())
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// One request with the demo client from inside a pod; its reply.
fn call(c: &Cluster, pod: &str, target: &str, mode: &str) -> Result<String> {
    let out = c.exec(
        pod,
        &["mesh-demo", "call", "--target", target, "--mode", mode],
    )?;
    ensure!(
        out.status.success(),
        "{pod} -> {target}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Waits until the client's first call through the mesh succeeds (configuration pushed,
/// certificates issued).
fn wait_for_mesh(c: &Cluster) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        interrupted()?;
        match call(c, "demo/client", "10.96.0.20:9000", "tcp") {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the mesh did not come up in 30 s"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The label sets of a metric on a node agent's `/metrics` with `reporter`.
fn tcp_metric(
    c: &Cluster,
    node: &str,
    name: &str,
    reporter: &str,
) -> Result<Vec<BTreeMap<String, String>>> {
    let text = c.agent_admin(node, "/metrics")?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .filter_map(|l| Some(parse_labels(l.split_once('}')?.0)))
        .filter(|m| m.get("reporter").map(String::as_str) == Some(reporter))
        .collect())
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((k, v)) = rest.split_once("=\"") {
        let Some(end) = v.find('"') else { break };
        out.insert(k.trim_start_matches(',').to_string(), v[..end].to_string());
        rest = &v[end + 1..];
    }
    out
}
