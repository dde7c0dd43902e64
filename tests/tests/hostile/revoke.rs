//! Policy changes reach open connections: a connection a TrafficTarget admitted does not
//! outlive that TrafficTarget.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mesh_tests::cluster::{Cluster, command_in, demo_dir};
use mesh_tests::privileged;

use crate::common::{ECHO_VIP, call, up_with, wait_until_ok};

const ECHO_LOCAL_VIP: &str = "10.96.0.21:9000";
const LEGACY_VIP: &str = "10.96.0.30:9000";

/// How long the mesh may take to close a connection after its TrafficTarget is deleted: the
/// controller notices the file, compiles and pushes, the agent re-checks.
const REVOKED_WITHIN: Duration = Duration::from_secs(10);

/// A TCP connection opened and held from a pod by plain bash (`/dev/tcp`): each line sent goes
/// to the server, each line the server answers comes back, and `closed` is reported once the
/// other end closes the connection (EOF or reset).
struct Held {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    what: String,
}

/// The script of a held connection, for `bash -c SCRIPT held HOST PORT`.
const HOLD: &str = r#"exec 3<>"/dev/tcp/$1/$2" || exit 2
echo connected
(cat <&3; echo closed) &
exec cat >&3"#;

impl Held {
    /// A connection from `pod` (its cgroup and network namespace: the mesh captures it).
    fn open(c: &Cluster, pod: &str, target: &str) -> Held {
        let p = c.pod(pod).expect("pod");
        let cmd =
            command_in(Path::new("/bin/bash"), &p.cgroup, &p.netns_path()).expect("bash in pod");
        Held::start(cmd, target, format!("{pod} -> {target}"))
    }

    /// A connection from `node`'s network namespace, outside the mesh: plaintext.
    fn from_node(c: &Cluster, node: &str, target: &str) -> Held {
        let n = &c.nodes[c.node_index(node).expect("node")];
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &n.netns, "bash"]);
        Held::start(cmd, target, format!("{node} -> {target}"))
    }

    fn start(mut cmd: Command, target: &str, what: String) -> Held {
        let (host, port) = target.split_once(':').expect("HOST:PORT");
        cmd.args(["-c", HOLD, "held", host, port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn bash");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut held = Held {
            child,
            stdin,
            lines,
            what,
        };
        held.expect_line("connected", Duration::from_secs(10));
        held
    }

    /// Sends `line` and expects the echo server `name`'s answer.
    fn echo(&mut self, name: &str, line: &str) {
        writeln!(self.stdin, "{line}").expect("write to the held connection");
        self.stdin.flush().expect("flush");
        self.expect_line(&format!("{name} {line}"), Duration::from_secs(10));
    }

    fn expect_line(&mut self, want: &str, within: Duration) {
        match self.lines.recv_timeout(within) {
            Ok(line) => assert_eq!(line, want, "{}", self.what),
            Err(e) => panic!("{}: no {want:?} within {within:?} ({e})", self.what),
        }
    }

    /// How long until the other end closed the connection, if within `limit`.
    fn closed_within(&mut self, start: Instant, limit: Duration) -> Option<Duration> {
        let left = limit.saturating_sub(start.elapsed());
        match self.lines.recv_timeout(left) {
            Ok(line) if line == "closed" => Some(start.elapsed()),
            Ok(line) => panic!("{}: unexpected {line:?} instead of the close", self.what),
            Err(_) => None,
        }
    }
}

/// Whether a new plaintext connection from `node`'s namespace to `target` gets the echo
/// server's answer.
fn plaintext_answered(c: &Cluster, node: &str, target: &str) -> bool {
    let n = &c.nodes[c.node_index(node).expect("node")];
    let (host, port) = target.split_once(':').expect("HOST:PORT");
    let out = Command::new("ip")
        .args(["netns", "exec", &n.netns, "timeout", "3", "bash", "-c"])
        .arg(r#"exec 3<>"/dev/tcp/$1/$2" || exit 2; echo probe >&3; head -n1 <&3"#)
        .args(["probe", host, port])
        .stderr(Stdio::null())
        .output()
        .expect("run bash");
    String::from_utf8_lossy(&out.stdout).contains("probe")
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes the YAML document that defines `kind` `name` from `file`, atomically (the
/// controller never reads half a file).
fn delete_resource(file: &Path, kind: &str, name: &str) {
    let text = std::fs::read_to_string(file).expect("read the resources");
    let docs: Vec<&str> = text.split("\n---\n").collect();
    let kept: Vec<&str> = docs
        .iter()
        .copied()
        .filter(|doc| {
            !(doc.contains(&format!("kind: {kind}\n"))
                && doc.contains(&format!("metadata: {{name: {name},")))
        })
        .collect();
    assert_eq!(kept.len() + 1, docs.len(), "{kind} {name} in {text}");
    let tmp = file.with_file_name(".revoke.tmp");
    std::fs::write(&tmp, kept.join("\n---\n")).expect("write the resources");
    std::fs::rename(&tmp, file).expect("replace the resources");
}

#[test]
fn deleting_a_traffic_target_closes_the_connections_it_admitted() {
    if !privileged("deleting_a_traffic_target_closes_the_connections_it_admitted") {
        return;
    }
    let c = up_with(&demo_dir().join("resources"), &[]);
    for target in [ECHO_LOCAL_VIP, LEGACY_VIP] {
        wait_until_ok(&c, "demo/client", target);
    }

    // Three long-lived connections of the client, each admitted by a TrafficTarget: to echo
    // on the other node (HBONE) and to echo-local on its own node (same node), both by
    // client-to-echo, and to legacy by client-to-legacy.
    let mut echo = Held::open(&c, "demo/client", ECHO_VIP);
    let mut local = Held::open(&c, "demo/client", ECHO_LOCAL_VIP);
    let mut legacy = Held::open(&c, "demo/client", LEGACY_VIP);
    echo.echo("echo", "before");
    local.echo("echo-local", "before");
    legacy.echo("legacy", "before");

    delete_resource(
        &c.state.join("resources/policy.yaml"),
        "TrafficTarget",
        "client-to-echo",
    );
    let deleted = Instant::now();

    // The mesh closes both of client-to-echo's connections, without a byte sent on them.
    let echo_closed = echo.closed_within(deleted, REVOKED_WITHIN);
    let local_closed = local.closed_within(deleted, REVOKED_WITHIN);
    eprintln!("closed after the deletion: echo {echo_closed:?}, echo-local {local_closed:?}");
    assert!(
        echo_closed.is_some(),
        "client -> echo (other node) still open {REVOKED_WITHIN:?} after client-to-echo was deleted"
    );
    assert!(
        local_closed.is_some(),
        "client -> echo-local (same node) still open {REVOKED_WITHIN:?} after client-to-echo was \
         deleted"
    );

    // The connection another TrafficTarget admitted stays open and carried.
    legacy.echo("legacy", "after");

    // New connections are refused.
    for target in [ECHO_VIP, ECHO_LOCAL_VIP] {
        let out = call(&c, "demo/client", target);
        assert!(
            !out.status.success(),
            "client -> {target} answered after client-to-echo was deleted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Each destination's agent says why it closed the connection: its metrics, its flows
    // and its access log.
    for (node, workload) in [("node-2", "echo"), ("node-1", "echo-local")] {
        let metrics = c.agent_admin(node, "/metrics").expect("metrics");
        let revoked = metrics.lines().any(|l| {
            l.starts_with("mesh_tcp_connections_denied_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\"")
                && l.contains(&format!("destination_workload=\"{workload}\""))
                && l.contains("reason=\"policy_revoked\"")
                && !l.ends_with(" 0")
        });
        assert!(
            revoked,
            "{node} does not count the revoked connection:\n{metrics}"
        );
        let flows = c.agent_admin(node, "/debug/flows").expect("flows");
        assert!(
            flows.contains("\"policy_revoked\""),
            "{node} flows do not show the revocation:\n{flows}"
        );
        let log = std::fs::read_to_string(c.state.join(format!("logs/agent-{node}.log")))
            .expect("agent log");
        assert!(
            log.lines()
                .any(|l| l.contains("mesh::access") && l.contains("policy_revoked")),
            "{node}'s access log does not give the reason"
        );
    }
}

#[test]
fn turning_a_pod_strict_closes_its_plaintext_connections() {
    if !privileged("turning_a_pod_strict_closes_its_plaintext_connections") {
        return;
    }
    // The permissive traffic policy lets plaintext callers through where TLS mode allows:
    // legacy (PERMISSIVE) takes plaintext from outside the mesh.
    let mut c = up_with(
        &demo_dir().join("resources"),
        &["--traffic-policy", "permissive"],
    );
    wait_until_ok(&c, "demo/client", LEGACY_VIP);
    let legacy_ip = c.pod("demo/legacy").expect("legacy").ip;
    let legacy_addr = format!("{legacy_ip}:9000");
    let mut plaintext = Held::from_node(&c, "node-1", &legacy_addr);
    let mut meshed = Held::open(&c, "demo/client", LEGACY_VIP);
    plaintext.echo("legacy", "before");
    meshed.echo("legacy", "before");

    // legacy becomes STRICT: its pod object says so now.
    let j = c
        .pods
        .iter()
        .position(|p| p.key() == "demo/legacy")
        .expect("legacy");
    c.pods[j].spec.tls_mode = Some("strict".into());
    let dir = c.state.join("resources");
    let tmp = dir.join(".revoke-pods.tmp");
    std::fs::write(&tmp, c.pods_yaml()).expect("write the pods");
    std::fs::rename(&tmp, dir.join("zz-cluster-pods.yaml")).expect("replace the pods");
    let changed = Instant::now();

    let closed = plaintext.closed_within(changed, REVOKED_WITHIN);
    eprintln!("plaintext closed after the change: {closed:?}");
    assert!(
        closed.is_some(),
        "plaintext into legacy still open {REVOKED_WITHIN:?} after legacy turned STRICT"
    );
    // The meshed caller's connection is mutual TLS: STRICT allows it.
    meshed.echo("legacy", "after");
    // New plaintext is refused too: the pod is enrolled again in its new mode (its datapath
    // re-attached), not left outside the mesh.
    let deadline = Instant::now() + Duration::from_secs(10);
    while plaintext_answered(&c, "node-1", &legacy_addr) {
        assert!(
            Instant::now() < deadline,
            "new plaintext from node-1 still reaches legacy 10 s after it turned STRICT"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for _ in 0..3 {
        assert!(
            !plaintext_answered(&c, "node-1", &legacy_addr),
            "plaintext reached legacy again after it was refused"
        );
    }

    let metrics = c.agent_admin("node-2", "/metrics").expect("metrics");
    let revoked = metrics.lines().any(|l| {
        l.starts_with("mesh_tcp_connections_denied_total{")
            && l.contains("source_principal=\"unknown\"")
            && l.contains("destination_workload=\"legacy\"")
            && l.contains("reason=\"policy_revoked\"")
            && !l.ends_with(" 0")
    });
    assert!(
        revoked,
        "node-2 does not count the revoked plaintext connection:\n{metrics}"
    );
}
