//! The mesh end to end with the real datapath: a controller (in process, on a directory of
//! YAML), the agent binary with two enrolled pods joined by a veth "wire", and unmodified
//! clients and servers in the pods.
//!
//! Topology: pod `default/client` (netns + cgroup, 10.78.0.2) and pod `default/server`
//! (10.78.0.1, application on :8080), one veth between them, one agent for both. The agent
//! carries calls between its own pods inside itself unless told `--same-node=hbone`; the test
//! that checks the wire for mutual TLS says so.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use mesh_tests::inprocess::{ClusterDir, TOKEN, free_port, namespace, pod};
use mesh_tests::sniff::Sniffer;
use mesh_tests::{Agent, Cgroup, Netns, Sink, command_in, instance, link, privileged};

const AGENT: &str = env!("CARGO_BIN_EXE_mesh-agent");
const PROBE: &str = env!("CARGO_BIN_EXE_mesh-probe");
const CLIENT_IP: &str = "10.78.0.2";
const SERVER_IP: &str = "10.78.0.1";

const TARGET: &str = "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata:
  name: client-to-server
  namespace: default
spec:
  destination:
    kind: ServiceAccount
    name: server
    namespace: default
  rules:
  - kind: TCPRoute
    name: app
  sources:
  - kind: ServiceAccount
    name: client
    namespace: default
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata:
  name: app
  namespace: default
spec:
  matches:
    ports:
    - 8080
";

struct World {
    client: Netns,
    server: Netns,
    client_cg: Cgroup,
    server_cg: Cgroup,
    dir: ClusterDir,
    files: tempfile::TempDir,
}

fn world() -> World {
    let client = Netns::new("c");
    let server = Netns::new("s");
    link(&client, "eth0", CLIENT_IP, &server, "eth0", SERVER_IP);
    let dir = ClusterDir::new();
    dir.write("ns.yaml", &namespace("default"));
    dir.write(
        "pods.yaml",
        &format!(
            "{}---\n{}",
            pod(
                "default", "client", "node-1", CLIENT_IP, "client", "client", ""
            ),
            pod(
                "default", "server", "node-1", SERVER_IP, "server", "server", ""
            )
        ),
    );
    World {
        client,
        server,
        client_cg: Cgroup::new("cli"),
        server_cg: Cgroup::new("srv"),
        dir,
        files: tempfile::tempdir().expect("tempdir"),
    }
}

/// The agent's arguments; its admin endpoint on `admin`, no metrics listener (tests run
/// agents side by side), and how it carries calls between its two pods (`in-process` or
/// `hbone`).
fn agent_args(
    w: &World,
    controller: &mesh_controller::app::Controller,
    admin: SocketAddr,
    same_node: &str,
) -> Vec<String> {
    let token = w.files.path().join("token");
    let ca = w.files.path().join("ca.crt");
    std::fs::write(&token, TOKEN).expect("token file");
    std::fs::write(&ca, &controller.roots_pem).expect("ca file");
    vec![
        "--capture=10.78.0.0/24".into(),
        format!(
            "--pod=name=default/client,cgroup={},netns={},ip={CLIENT_IP}",
            w.client_cg.path.display(),
            w.client.path.display()
        ),
        format!(
            "--pod=name=default/server,cgroup={},netns={},ip={SERVER_IP},inbound=8080",
            w.server_cg.path.display(),
            w.server.path.display()
        ),
        format!("--controller=https://{}", controller.grpc_addr),
        format!("--controller-ca={}", ca.display()),
        "--node=node-1".into(),
        format!("--bootstrap-token-file={}", token.display()),
        format!("--admin={admin}"),
        "--metrics=off".into(),
        format!("--same-node={same_node}"),
    ]
}

/// The agent's metrics, from its admin endpoint.
fn scrape(admin: SocketAddr) -> String {
    let answer = mesh_tests::admin_get(admin, "/metrics").expect("the agent's metrics");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    answer
}

/// The sum of the samples named `name` that carry every `key="value"` of `labels`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Runs the probe from the client pod until it succeeds (the agent needs its configuration
/// and certificates first) or the deadline passes. Returns the probe's last output line.
fn probe_until_ok(w: &World, addr: &str, bytes: u64) -> Result<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = command_in(Path::new(PROBE), &w.client_cg, &w.client)
            .args([addr, &bytes.to_string()])
            .output()
            .expect("run mesh-probe");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && stdout.contains("len=") {
            return Ok(stdout.lines().last().unwrap_or_default().to_string());
        }
        if Instant::now() > deadline {
            return Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)));
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_pod_to_pod_connection_crosses_the_wire_in_mutual_tls() {
    if !privileged("a_pod_to_pod_connection_crosses_the_wire_in_mutual_tls") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let w = world();
    w.dir.write("policy.yaml", TARGET);
    let controller = rt.block_on(w.dir.start("127.0.0.1:0".parse().expect("addr"), &[]));
    let app = Sink::start(&w.server, &format!("{SERVER_IP}:8080"));
    let admin = free_port();
    // Both pods are this agent's: only with `hbone` does the call take a tunnel.
    let mut agent = Agent::start(
        Path::new(AGENT),
        &instance("mesh"),
        &agent_args(&w, &controller, admin, "hbone"),
    );

    let wire = Sniffer::start(&w.server, "eth0");
    const BYTES: u64 = 4 * 1024 * 1024;
    let line = probe_until_ok(&w, &app.addr.to_string(), BYTES).expect("the call goes through");
    let segments = wire.stop();

    // The server application got every byte, from the proxy's socket in its own pod.
    let len = format!("len={BYTES}");
    assert!(line.contains(&len), "{line}");
    assert!(
        line.contains(&format!("peer={SERVER_IP}:")),
        "the app sees the inbound proxy's connection: {line}"
    );

    // On the wire: only HBONE (15008), TLS records, and none of the payload in clear.
    let app_port: Vec<_> = segments
        .iter()
        .filter(|s| !s.payload.is_empty() && (s.dst_port == 8080 || s.src_port == 8080))
        .collect();
    assert!(
        app_port.is_empty(),
        "{} segments to :8080 on the wire",
        app_port.len()
    );
    let hbone: Vec<u8> = segments
        .iter()
        .filter(|s| s.dst_port == 15008)
        .flat_map(|s| s.payload.iter().copied())
        .collect();
    // A capture may drop frames under load; most of the transfer must be seen on 15008.
    assert!(
        hbone.len() as u64 >= BYTES / 2,
        "only {} bytes to 15008 for a {BYTES}-byte transfer",
        hbone.len()
    );
    assert_eq!(
        hbone.first(),
        Some(&0x16),
        "the tunnel starts with a TLS handshake"
    );
    let mut marker = [0u8; 64];
    mesh_tests::fill(&mut marker, 1_000_000);
    assert!(
        !hbone.windows(marker.len()).any(|w| w == marker),
        "payload bytes crossed the wire in clear"
    );

    // The agent's metrics count the call on both sides, as Istio names them: the request
    // direction (client to server) is `received`, whichever side reports.
    let text = scrape(admin);
    let call = [
        ("source_workload", "client"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("destination_workload", "server"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/server",
        ),
        ("connection_security_policy", "mutual_tls"),
        ("mesh_path", "hbone"),
    ];
    let source: Vec<_> = call
        .iter()
        .copied()
        .chain([("reporter", "source")])
        .collect();
    let received = metric(&text, "istio_tcp_received_bytes_total", &source);
    assert!(
        received >= BYTES,
        "{received} request bytes reported by the source:\n{text}"
    );
    assert!(
        metric(&text, "istio_tcp_sent_bytes_total", &source) > 0,
        "the server's reply line is counted:\n{text}"
    );
    let destination = [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("destination_workload", "server"),
    ];
    assert!(
        metric(&text, "istio_tcp_connections_opened_total", &destination) >= 1,
        "{text}"
    );

    // SIGTERM with nothing open: the agent drains at once and exits cleanly, well within its
    // 30 s grace period.
    let child = agent.child.as_mut().expect("the agent runs");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the agent") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the agent exited with {status}");
    drop(controller);
}

#[test]
fn a_call_between_two_pods_of_one_agent_stays_in_the_agent() {
    if !privileged("a_call_between_two_pods_of_one_agent_stays_in_the_agent") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let w = world();
    w.dir.write("policy.yaml", TARGET);
    let controller = rt.block_on(w.dir.start("127.0.0.1:0".parse().expect("addr"), &[]));
    let app = Sink::start(&w.server, &format!("{SERVER_IP}:8080"));
    let admin = free_port();
    let _agent = Agent::start(
        Path::new(AGENT),
        &instance("local"),
        &agent_args(&w, &controller, admin, "in-process"),
    );

    let wire = Sniffer::start(&w.server, "eth0");
    const BYTES: u64 = 4 * 1024 * 1024;
    let line = probe_until_ok(&w, &app.addr.to_string(), BYTES).expect("the call goes through");
    let segments = wire.stop();

    // The server application got every byte, from the agent's socket in its own pod.
    assert!(line.contains(&format!("len={BYTES}")), "{line}");
    assert!(
        line.contains(&format!("peer={SERVER_IP}:")),
        "the app sees the proxy's connection from its own pod: {line}"
    );
    // Nothing of the call crossed the veth: neither the application's port nor a tunnel.
    let on_wire: Vec<_> = segments
        .iter()
        .filter(|s| !s.payload.is_empty())
        .filter(|s| [8080, 15008].contains(&s.dst_port) || [8080, 15008].contains(&s.src_port))
        .collect();
    assert!(
        on_wire.is_empty(),
        "{} segments of the call on the wire",
        on_wire.len()
    );

    // Both sides report it, as carried inside the node, not as mutual TLS.
    let text = scrape(admin);
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("destination_workload", "server"),
            ("mesh_path", "same_node"),
            ("connection_security_policy", "node_local"),
        ];
        let received = metric(&text, "istio_tcp_received_bytes_total", &labels);
        assert!(
            received >= BYTES,
            "{received} request bytes reported by the {reporter}:\n{text}"
        );
    }
    assert_eq!(
        metric(
            &text,
            "istio_tcp_connections_opened_total",
            &[("mesh_path", "hbone")]
        ),
        0,
        "no tunnel:\n{text}"
    );
    drop(controller);
}

#[test]
fn a_pod_without_a_traffic_target_is_refused_and_plaintext_to_a_strict_pod_too() {
    if !privileged("a_pod_without_a_traffic_target_is_refused_and_plaintext_to_a_strict_pod_too") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let w = world();
    // No TrafficTarget: default deny.
    let controller = rt.block_on(w.dir.start("127.0.0.1:0".parse().expect("addr"), &[]));
    let app = Sink::start(&w.server, &format!("{SERVER_IP}:8080"));
    let admin = free_port();
    // Carried in process, a refused call looks the same to the caller as a refused tunnel.
    let _agent = Agent::start(
        Path::new(AGENT),
        &instance("deny"),
        &agent_args(&w, &controller, admin, "in-process"),
    );

    // Give the agent time to get its configuration and certificates, then call: the
    // connection must be closed promptly and the app must see nothing.
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let out = command_in(Path::new(PROBE), &w.client_cg, &w.client)
        .args([&app.addr.to_string(), "1000"])
        .output()
        .expect("run mesh-probe");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("len="),
        "denied call got an answer: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "a denied call must not hang"
    );
    assert!(
        app.peers.lock().expect("peers").is_empty(),
        "the app saw a connection"
    );

    // Plaintext from outside the mesh (the client netns, but not the client pod's cgroup,
    // so not captured) to the STRICT server pod: steered to the proxy and refused.
    let reply =
        std::panic::catch_unwind(|| mesh_tests::send_from(&w.client, &app.addr.to_string(), 10));
    assert!(
        reply.as_ref().map(|r| !r.contains("len=")).unwrap_or(true),
        "plaintext reached a STRICT pod: {reply:?}"
    );
    assert!(
        app.peers.lock().expect("peers").is_empty(),
        "the app saw a connection"
    );

    // Both refusals are counted with their reason, and the tunnel's on the caller's side too.
    let text = scrape(admin);
    let denied = |reporter, reason| {
        let labels = [
            ("reporter", reporter),
            ("destination_workload", "server"),
            ("reason", reason),
        ];
        metric(&text, "mesh_tcp_connections_denied_total", &labels)
    };
    assert!(denied("destination", "no_traffic_target") >= 1, "{text}");
    assert!(denied("source", "destination_denied") >= 1, "{text}");
    assert!(denied("destination", "plaintext_strict") >= 1, "{text}");
    drop(controller);
}
