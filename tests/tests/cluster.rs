//! End to end on the single-machine mesh (`mesh_tests::cluster`): two nodes and their pods as
//! network namespaces, the real controller binary on a YAML directory, one real agent per node
//! inside the node's namespace, the demo applications in the pods. Privileged.
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[allow(dead_code, reason = "each suite uses a subset")]
mod common;

use common::{ECHO_VIP, call, up, up_with, wait_until_ok};
use mesh_tests::cluster::{Cluster, demo_dir};
use mesh_tests::sniff::Sniffer;
use mesh_tests::{installed, privileged};

const ECHO_LOCAL_VIP: &str = "10.96.0.21:9000";
/// Debian's interpreter, for a client the demo has not.
const PYTHON: &str = "/usr/bin/python3";
const WEB_VIP: &str = "10.96.0.10:80";

fn sniff_fabric(c: &Cluster, iface: &str) -> Sniffer {
    let ns = std::fs::File::open(PathBuf::from("/run/netns").join(c.names.fabric()))
        .expect("fabric netns");
    Sniffer::start_in(ns, iface)
}

/// HBONE (15008) or the agent's own connection to the controller (15012), the only TCP that
/// may cross between the nodes.
fn hbone_or_control(src: u16, dst: u16) -> bool {
    [src, dst].iter().any(|p| *p == 15008 || *p == 15012)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A load run in the background from a pod: its JSON report once done.
fn load_in_background(c: &Cluster, pod: &str, target: &str, requests: u32) -> std::process::Child {
    let p = c.pod(pod).expect("pod");
    let mut cmd =
        mesh_tests::cluster::command_in(&c.bins.apps.join("mesh-demo"), &p.cgroup, &p.netns_path())
            .expect("command in pod");
    cmd.args([
        "load",
        "--target",
        target,
        "--mode",
        "tcp",
        "--requests",
        &requests.to_string(),
        "--concurrency",
        "1",
        "--json",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd.spawn().expect("spawn the load client")
}

fn load_report(child: std::process::Child) -> serde_json::Value {
    let out = child.wait_with_output().expect("load client");
    assert!(
        out.status.success(),
        "load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("load JSON")
}

fn failures(report: &serde_json::Value) -> u64 {
    report["failures"]
        .as_object()
        .map_or(0, |f| f.values().filter_map(|v| v.as_u64()).sum())
}

#[test]
fn pods_on_two_nodes_talk_in_mutual_tls_by_policy_and_split() {
    if !privileged("pods_on_two_nodes_talk_in_mutual_tls_by_policy_and_split") {
        return;
    }
    let c = up(&[]);

    // Cross-node: the bytes between the nodes are TLS to 15008, the request never in clear.
    let capture = sniff_fabric(&c, "n0");
    let reply = wait_until_ok(&c, "demo/client", ECHO_VIP);
    let segments = capture.stop();
    assert_eq!(reply.trim(), "echo hello");
    let data: Vec<_> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    assert!(!data.is_empty(), "nothing crossed node-1's link");
    assert!(
        data.iter()
            .all(|s| hbone_or_control(s.src_port, s.dst_port)),
        "traffic between the nodes outside HBONE: {:?}",
        data.iter()
            .map(|s| (s.src_port, s.dst_port))
            .collect::<Vec<_>>()
    );
    // TLS records: application data on the pooled connection (0x17 0x03 0x03).
    assert!(
        data.iter()
            .any(|s| s.dst_port == 15008 && s.payload.starts_with(&[0x17, 0x03, 0x03])),
        "no TLS record to 15008"
    );
    let bytes: Vec<u8> = data.iter().flat_map(|s| s.payload.clone()).collect();
    assert!(!contains(&bytes, b"hello"), "the request crossed in clear");

    // The destination agent saw the caller's identity from its certificate.
    let metrics = c.agent_admin("node-2", "/metrics").expect("node-2 metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")),
        "node-2 does not report the client's mTLS connection:\n{metrics}"
    );

    // Same node: identity and policy still apply.
    let reply = wait_until_ok(&c, "demo/client", ECHO_LOCAL_VIP);
    assert_eq!(reply.trim(), "echo-local hello");
    assert!(!call(&c, "demo/intruder", ECHO_LOCAL_VIP).status.success());
    let metrics = c.agent_admin("node-1", "/metrics").expect("node-1 metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"echo-local\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains("mesh_path=\"same_node\"")),
        "node-1 does not report the same-node connection:\n{metrics}"
    );

    // Policy: no TrafficTarget for the intruder; refused promptly, and the destination says why.
    let started = Instant::now();
    let denied = call(&c, "demo/intruder", ECHO_VIP);
    assert!(!denied.status.success(), "the intruder got through");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the refusal took {:?}",
        started.elapsed()
    );
    let metrics = c.agent_admin("node-2", "/metrics").expect("node-2 metrics");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("mesh_tcp_connections_denied_total{")
                && l.contains("/sa/intruder")),
        "node-2 does not count the denial:\n{metrics}"
    );

    // TrafficSplit 90/10, per connection.
    let out = c
        .exec(
            "demo/client",
            &[
                "mesh-demo",
                "load",
                "--target",
                WEB_VIP,
                "--mode",
                "http1",
                "--requests",
                "600",
                "--concurrency",
                "4",
                "--json",
            ],
        )
        .expect("load");
    assert!(out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let v1 = report["pods"]["web-v1"].as_u64().unwrap_or(0) as f64;
    let v2 = report["pods"]["web-v2"].as_u64().unwrap_or(0) as f64;
    assert_eq!(failures(&report), 0, "{report}");
    let share = v1 / (v1 + v2);
    assert!(
        (0.85..=0.95).contains(&share),
        "web-v1 share {share:.3} ({v1} vs {v2})"
    );
    c.down().expect("teardown");
}

#[test]
fn the_mesh_rides_out_controller_and_agent_restarts() {
    if !privileged("the_mesh_rides_out_controller_and_agent_restarts") {
        return;
    }
    let mut c = up(&[]);

    // Controller down for a while: connections keep being made and carried.
    let load = load_in_background(&c, "demo/client", ECHO_VIP, 300);
    std::thread::sleep(Duration::from_millis(300));
    c.stop_controller();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        call(&c, "demo/client", ECHO_VIP).status.success(),
        "a new connection failed while the controller was down"
    );
    c.start_controller().expect("restart the controller");
    let report = load_report(load);
    assert_eq!(failures(&report), 0, "{report}");
    assert_eq!(report["pods"]["echo"].as_u64(), Some(300), "{report}");

    // Agent of node-1 down: new connections fail fast and nothing leaves in clear.
    let node1 = c.node_index("node-1").expect("node-1");
    c.kill_agent(node1);
    let capture = sniff_fabric(&c, "n0");
    let started = Instant::now();
    let out = call(&c, "demo/client", ECHO_VIP);
    let took = started.elapsed();
    let segments = capture.stop();
    assert!(!out.status.success(), "a call succeeded without the agent");
    assert!(took < Duration::from_secs(2), "the failure took {took:?}");
    assert!(
        segments
            .iter()
            .all(|s| s.dst_port != 9000 && s.src_port != 9000),
        "the connection bypassed the mesh"
    );

    // Back: capture and mTLS resume for the node's pods without any other step.
    c.start_agent(node1).expect("restart the agent");
    let capture = sniff_fabric(&c, "n0");
    assert_eq!(
        wait_until_ok(&c, "demo/client", ECHO_VIP).trim(),
        "echo hello"
    );
    let segments = capture.stop();
    assert!(
        segments
            .iter()
            .filter(|s| !s.payload.is_empty())
            .all(|s| hbone_or_control(s.src_port, s.dst_port)),
        "traffic between the nodes outside HBONE after the restart"
    );
    assert!(segments.iter().any(|s| s.dst_port == 15008));
    assert_eq!(
        wait_until_ok(&c, "demo/client", ECHO_LOCAL_VIP).trim(),
        "echo-local hello"
    );
    c.down().expect("teardown");
}

/// Loads of 100 new connections from `pod` to `target`, one after another until `stop` is
/// set: the requests answered and the failures by kind, summed over the loads.
fn load_until_stopped(
    c: &Cluster,
    pod: &str,
    target: &str,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<(u64, serde_json::Map<String, serde_json::Value>)> {
    let p = c.pod(pod).expect("pod");
    let (demo, cgroup, netns) = (
        c.bins.apps.join("mesh-demo"),
        p.cgroup.clone(),
        p.netns_path(),
    );
    let (target, stop) = (target.to_string(), stop.clone());
    std::thread::spawn(move || {
        let (mut answered, mut failed) = (0, serde_json::Map::new());
        while !stop.load(Ordering::Relaxed) {
            let mut cmd =
                mesh_tests::cluster::command_in(&demo, &cgroup, &netns).expect("command in pod");
            cmd.args(["load", "--target", &target, "--mode", "tcp"])
                .args(["--requests", "100", "--concurrency", "2", "--json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            let report = load_report(cmd.spawn().expect("spawn the load client"));
            answered += report["pods"]
                .as_object()
                .map_or(0, |p| p.values().filter_map(|v| v.as_u64()).sum::<u64>());
            for (kind, n) in report["failures"].as_object().into_iter().flatten() {
                let sum = failed.get(kind).and_then(|v| v.as_u64()).unwrap_or(0);
                failed.insert(kind.clone(), (sum + n.as_u64().unwrap_or(0)).into());
                let example = &report["failure_examples"][kind];
                failed.insert(format!("{kind} example"), example.clone());
            }
        }
        (answered, failed)
    })
}

/// One TCP connection from `pod` to `target` that sends a line and reads its echo every 20 ms
/// until the file `stop` exists. Prints the round trips made; exits 1 on the first failure.
const HOLD_ONE_CONNECTION: &str = r#"
import os, socket, sys, time
host, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
conn = socket.create_connection((host, port), timeout=5)
lines = conn.makefile("rb")
n = 0
while not os.path.exists(stop):
    conn.sendall(b"hello\n")
    reply = lines.readline()
    if not reply.endswith(b"hello\n"):
        print(f"round trip {n}: got {reply!r}", file=sys.stderr)
        sys.exit(1)
    n += 1
    time.sleep(0.02)
conn.close()
print(n)
"#;

#[test]
fn agents_replaced_under_load_lose_no_connection_and_no_request() {
    let test = "agents_replaced_under_load_lose_no_connection_and_no_request";
    let python = std::path::Path::new(PYTHON);
    if !privileged(test) || !installed(test, &[(PYTHON, &["-c", "import socket"], "python3")]) {
        return;
    }
    let mut c = up(&[]);
    for vip in [ECHO_VIP, ECHO_LOCAL_VIP] {
        wait_until_ok(&c, "demo/client", vip);
    }
    // New connections all along, across the nodes and within node-1, and one connection
    // opened before the replacements and used all through them.
    let stop = Arc::new(AtomicBool::new(false));
    let loads =
        [ECHO_VIP, ECHO_LOCAL_VIP].map(|vip| load_until_stopped(&c, "demo/client", vip, &stop));
    let stop_file = c.state.join("hold-stop");
    let client = c.pod("demo/client").expect("client");
    let (host, port) = ECHO_VIP.split_once(':').expect("vip");
    let held = mesh_tests::cluster::command_in(python, &client.cgroup, &client.netns_path())
        .expect("command in pod")
        .args(["-c", HOLD_ONE_CONNECTION, host, port])
        .arg(&stop_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the held connection");
    std::thread::sleep(Duration::from_millis(500));

    // node-1 carries the client's side (outbound, same node), node-2 echo's (HBONE inbound).
    // node-1's new agent runs other datapath parameters, which is the path of a new build:
    // its programs are attached beside the old ones, then the old ones removed. node-2's is
    // the same build, which adopts the pinned programs.
    for (node, extra) in [("node-1", &["--skmsg-budget=2M"][..]), ("node-2", &[])] {
        let i = c.node_index(node).expect("node");
        c.replace_agent_with(i, extra).expect("replace the agent");
        std::thread::sleep(Duration::from_millis(500));
    }
    std::fs::write(&stop_file, "").expect("stop the held connection");
    stop.store(true, Ordering::Relaxed);
    for (load, vip) in loads.into_iter().zip([ECHO_VIP, ECHO_LOCAL_VIP]) {
        let (answered, failed) = load.join().expect("load thread");
        assert!(
            failed.is_empty(),
            "{vip}: failures across the replacements: {failed:?}"
        );
        assert!(answered >= 200, "{vip}: only {answered} requests made");
    }
    let out = held.wait_with_output().expect("held connection");
    assert!(
        out.status.success(),
        "the connection open across the replacements broke: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let trips: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("round trips");
    assert!(
        trips > 20,
        "only {trips} round trips on the held connection"
    );

    // The old agents drained (the held connection ended) and left; the new ones serve alone.
    for (status, log) in c
        .wait_retired(Duration::from_secs(30))
        .expect("the old agents exit")
    {
        assert!(status.success(), "{status}: {}", log.display());
    }
    let log = |node: &str| {
        std::fs::read_to_string(c.state.join(format!("logs/agent-{node}.log"))).unwrap_or_default()
    };
    assert!(
        !log("node-1").contains("adopted pinned links"),
        "node-1 kept the old programs"
    );
    assert!(
        log("node-2").contains("adopted pinned links"),
        "node-2 did not adopt its programs"
    );
    assert_eq!(
        wait_until_ok(&c, "demo/client", ECHO_VIP).trim(),
        "echo hello"
    );
    assert_eq!(
        wait_until_ok(&c, "demo/client", ECHO_LOCAL_VIP).trim(),
        "echo-local hello"
    );
    c.down().expect("teardown");
}

#[test]
fn plaintext_reaches_a_permissive_pod_and_never_a_strict_one() {
    if !privileged("plaintext_reaches_a_permissive_pod_and_never_a_strict_one") {
        return;
    }
    // The permissive traffic policy lets unauthenticated callers through where TLS mode allows.
    let c = up(&["--traffic-policy", "permissive"]);
    let demo = c.bins.apps.join("mesh-demo");
    let from_node = |pod: &str| {
        let ip = c.pod(pod).expect("pod").ip;
        c.exec_on_node(
            "node-1",
            &[
                demo.to_str().expect("path"),
                "call",
                "--target",
                &format!("{ip}:9000"),
                "--mode",
                "tcp",
            ],
        )
        .expect("run on node-1")
    };
    let legacy = from_node("demo/legacy");
    assert!(
        legacy.status.success(),
        "plaintext to the PERMISSIVE pod was refused: {}",
        String::from_utf8_lossy(&legacy.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&legacy.stdout).trim(),
        "legacy hello"
    );
    let strict = from_node("demo/echo");
    assert!(
        !strict.status.success(),
        "plaintext reached the STRICT pod: {}",
        String::from_utf8_lossy(&strict.stdout)
    );
    // A meshed caller reaches both.
    assert_eq!(
        wait_until_ok(&c, "demo/client", "10.96.0.30:9000").trim(),
        "legacy hello"
    );
    c.down().expect("teardown");
}

/// Runs loads of `n` connections to `target` from `pod` until `done` accepts a report.
fn load_until(
    c: &Cluster,
    pod: &str,
    target: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let report = load_report(load_in_background(c, pod, target, 40));
        if done(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "{what}: last report {report}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn a_pod_added_while_the_mesh_runs_joins_its_service_and_leaves_it_when_removed() {
    if !privileged("a_pod_added_while_the_mesh_runs_joins_its_service_and_leaves_it_when_removed") {
        return;
    }
    let mut c = up(&[]);
    let spec = common::echo_pod("echo-2", &[("app", "echo")]);
    c.add_pod("node-1", spec).expect("add a pod");
    // The new endpoint answers through the mesh, and nothing fails meanwhile.
    load_until(&c, "demo/client", ECHO_VIP, "echo-2 joins", |r| {
        r["pods"]["echo-2"].as_u64().unwrap_or(0) > 0 && failures(r) == 0
    });
    // Its own traffic is captured and meshed: a call from it to a pod it may not reach is
    // refused by policy (no TrafficTarget from echo to web).
    let web = |pod: &str| {
        c.exec(
            pod,
            &["mesh-demo", "call", "--target", WEB_VIP, "--mode", "http1"],
        )
        .expect("run the demo client")
    };
    let out = web("demo/client");
    assert!(
        out.status.success(),
        "the client reaches web: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = web("demo/echo-2");
    assert!(
        !out.status.success(),
        "echo-2 reached web without a TrafficTarget: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    c.remove_pod("demo/echo-2").expect("remove the pod");
    load_until(&c, "demo/client", ECHO_VIP, "echo-2 leaves", |r| {
        r["pods"]
            .as_object()
            .is_some_and(|p| p.keys().all(|k| k == "echo"))
            && failures(r) == 0
    });
    c.down().expect("teardown");
}

#[test]
fn the_demo_runs_to_its_report_twice_in_a_row_and_tells_a_non_root_user_what_it_needs() {
    if !privileged(
        "the_demo_runs_to_its_report_twice_in_a_row_and_tells_a_non_root_user_what_it_needs",
    ) {
        return;
    }
    let prefix = common::cluster_prefix();
    let sim = env!("CARGO_BIN_EXE_mesh-sim");
    let dir = demo_dir();
    for run in 1..=2 {
        let out = std::process::Command::new(sim)
            .args(["demo", "--prefix", &prefix, "--dir"])
            .arg(&dir)
            .output()
            .expect("run mesh-sim");
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run}: {report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for expect in [
            "[1/6] mutual TLS between pods on different nodes",
            "the request in clear: no",
            "with reason no_traffic_target",
            "path same_node",
            "web-v1: ",
            "[6/6] kernel redirect counters",
            "nothing left behind",
        ] {
            assert!(
                report.contains(expect),
                "run {run}: no {expect:?} in\n{report}"
            );
        }
    }
    assert_eq!(mesh_tests::cluster::cleanup(&prefix).expect("cleanup"), 0);

    // As another user: exit 77 and what it needs, before touching anything.
    let out = std::process::Command::new(sim)
        .args(["demo", "--prefix", &prefix])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run mesh-sim as nobody");
    assert_eq!(out.status.code(), Some(77));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs root"));
}

/// The demo's policy with web reachable by HTTP request rules only: `GET /api/...` and
/// `GET /healthz` allowed, everything else refused.
const WEB_BY_REQUEST: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: web-api, namespace: demo}
spec:
  matches:
  - {name: api, pathRegex: "/api/.*", methods: [GET]}
  - {name: health, pathRegex: "/healthz", methods: [GET]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-web, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: web, namespace: demo}
  rules: [{kind: HTTPRouteGroup, name: web-api, matches: [api, health]}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
"#;

#[test]
fn an_unmodified_http_client_is_split_per_request_and_refused_per_route() {
    if !privileged("an_unmodified_http_client_is_split_per_request_and_refused_per_route") {
        return;
    }
    let dir = tempfile::tempdir().expect("temporary directory");
    for file in ["services.yaml", "split.yaml"] {
        std::fs::copy(
            demo_dir().join("resources").join(file),
            dir.path().join(file),
        )
        .expect("copy the demo resources");
    }
    let policy =
        std::fs::read_to_string(demo_dir().join("resources/policy.yaml")).expect("policy.yaml");
    // Keep every demo rule but the one for web, which becomes per request.
    let kept: Vec<&str> = policy
        .split("\n---\n")
        .filter(|doc| !doc.contains("name: client-to-web"))
        .collect();
    std::fs::write(
        dir.path().join("policy.yaml"),
        format!("{}\n---{WEB_BY_REQUEST}", kept.join("\n---\n")),
    )
    .expect("write the policy");
    let c = up_with(dir.path(), &[]);

    // curl, one connection, 200 requests: each is routed on its own.
    let web = format!("http://{WEB_VIP}");
    let mut argv = vec!["curl", "-sS", "--fail-with-body", "-w", "\\n"];
    let urls: Vec<String> = (0..200).map(|i| format!("{web}/api/{i}")).collect();
    argv.extend(urls.iter().map(String::as_str));
    let deadline = Instant::now() + Duration::from_secs(30);
    let out = loop {
        let out = c.exec("demo/client", &argv).expect("run curl");
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let replies: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert_eq!(replies.len(), 200);
    let v2 = replies.iter().filter(|r| r["pod"] == "web-v2").count();
    let v1 = replies.iter().filter(|r| r["pod"] == "web-v1").count();
    assert_eq!(v1 + v2, 200, "{replies:?}");
    assert!(
        (4..=40).contains(&v2),
        "web-v2 got {v2} of 200 requests of one connection; the split is 90/10"
    );
    let caller = replies[0]["caller"].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        caller,
        "By=spiffe://cluster.local/ns/demo/sa/web;URI=spiffe://cluster.local/ns/demo/sa/client",
        "{:#}",
        replies[0]
    );

    // A route no rule allows: a plain 403 from web's node, the reason in its access log.
    let out = c
        .exec(
            "demo/client",
            &[
                "curl",
                "-sS",
                "-o",
                "-",
                "-w",
                "\\n%{http_code}",
                &format!("{web}/admin"),
            ],
        )
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(text, "access denied\n\n403", "{text}");
    let node2 = &c.nodes[c.node_index("node-2").expect("node-2")];
    let log = node2.agent.as_ref().expect("node-2's agent").log.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("no HTTP match for GET /admin")
    {
        assert!(
            Instant::now() < deadline,
            "no reason in node-2's access log"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // POST to an allowed path is refused too: the rule allows GET only.
    let out = c
        .exec(
            "demo/client",
            &[
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                &format!("{web}/api/x"),
            ],
        )
        .expect("run curl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    c.down().expect("teardown");
}

/// A pod's command is any program: the pod is started once its ports listen (or, without
/// ports, once it runs); one that exits first is refused with the pod, its ports and its log.
#[test]
fn a_pod_runs_any_program_and_one_that_never_listens_is_named_with_its_log() {
    if !privileged("a_pod_runs_any_program_and_one_that_never_listens_is_named_with_its_log") {
        return;
    }
    let mut c = up(&[]);
    let spec = |name: &str, ports: Vec<u16>, run: &[&str]| mesh_tests::cluster::PodSpec {
        namespace: "demo".into(),
        name: name.into(),
        service_account: Some("echo".into()),
        labels: [("app".to_string(), name.to_string())].into(),
        tls_mode: None,
        ports,
        annotations: Default::default(),
        probe_port: None,
        run: run.iter().map(|s| s.to_string()).collect(),
    };
    // A server that prints nothing, listening after a while, in a child of its shell.
    let quiet = format!(
        "sleep 1; {} tcp-echo --listen 0.0.0.0:9000 --name quiet >/dev/null",
        c.bins.apps.join("mesh-demo").display()
    );
    c.add_pod("node-2", spec("quiet", vec![9000], &["sh", "-c", &quiet]))
        .expect("a pod whose command listens without saying so");
    let listening =
        mesh_tests::cluster::listening_ports(&c.pod("demo/quiet").expect("quiet").netns_path())
            .expect("the pod's sockets");
    assert!(listening.contains(&9000), "{listening:?}");
    // No ports: started once it runs.
    c.add_pod("node-2", spec("idle", vec![], &["sleep", "600"]))
        .expect("a pod without ports");
    // Exits before listening: the pod, its ports and its log in the error.
    let err = c
        .add_pod(
            "node-2",
            spec(
                "broken",
                vec![9000],
                &["sh", "-c", "echo no config >&2; exit 3"],
            ),
        )
        .expect_err("a pod whose command exits");
    let err = format!("{err:#}");
    for expect in ["demo/broken", "[9000]", "pod-demo-broken.log", "no config"] {
        assert!(err.contains(expect), "no {expect:?} in: {err}");
    }
    c.down().expect("teardown");
}

#[test]
fn an_uninstalled_mesh_lets_every_pod_go_and_leaves_nothing_in_the_kernel() {
    if !privileged("an_uninstalled_mesh_lets_every_pod_go_and_leaves_nothing_in_the_kernel") {
        return;
    }
    // The agents read their pod's annotations as the DaemonSet's downward API file gives them.
    let files = tempfile::tempdir().expect("temporary directory");
    let annotations = files.path().join("annotations");
    std::fs::write(&annotations, "app=\"mesh-agent\"\n").expect("annotations");
    let signal = annotations.to_str().expect("a UTF-8 path");
    let c = common::up_with_args(
        &demo_dir().join("resources"),
        &["--uninstall-signal", signal],
        &[],
    );
    let demo = c.bins.apps.join("mesh-demo");
    let echo = format!("{}:9000", c.pod("demo/echo").expect("pod").ip);
    let from_node = || {
        c.exec_on_node(
            "node-1",
            &[
                demo.to_str().expect("path"),
                "call",
                "--target",
                &echo,
                "--mode",
                "tcp",
            ],
        )
        .expect("run on node-1")
    };
    let pins = |node: &str| {
        std::path::Path::new(mesh_datapath::config::BPFFS_ROOT).join(c.names.instance(node))
    };
    assert!(
        !from_node().status.success(),
        "the STRICT pod is closed to plaintext"
    );
    assert!(pins("node-1").exists() && pins("node-2").exists());

    // The chart's pre-delete hook annotates the agents' pods.
    std::fs::write(
        &annotations,
        "app=\"mesh-agent\"\nmesh.io/uninstall=\"true\"\n",
    )
    .expect("annotate");
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in ["node-1", "node-2"] {
        // 503 once draining began; the pins removed, then it says `uninstalled`.
        let done = || {
            let unready = c
                .agent_admin(node, "/healthz")
                .is_err_and(|e| e.to_string().contains(" 503 "));
            unready && !pins(node).exists()
        };
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{node}'s agent never said uninstalled: {:?}\n{}",
                c.agent_admin(node, "/healthz"),
                std::fs::read_to_string(c.state.join(format!("logs/agent-{node}.log")))
                    .unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert!(
            !pins(node).exists(),
            "{node}: pins left in {}",
            pins(node).display()
        );
    }

    // Every pod works without the mesh: the STRICT pod answers plaintext, pods reach each
    // other directly.
    let out = from_node();
    assert!(
        out.status.success(),
        "the STRICT pod unreachable after the removal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = call(&c, "demo/client", &echo);
    assert!(
        out.status.success(),
        "client -> echo after the removal: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.down().expect("teardown");
}
