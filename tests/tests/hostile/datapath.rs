//! Attacks on the datapath of the single-machine mesh: ports a STRICT pod did not declare,
//! a crashed agent, IPv6 and dual-stack sockets, and the proxy's own ports used against it.
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use mesh_tests::cluster::{Cluster, PodSpec, demo_dir};
use mesh_tests::privileged;
use mesh_tests::sniff::Sniffer;

use crate::common::{ECHO_VIP, call, up, up_with, up_with_args, wait_until_ok};

/// `srv`'s Service (which makes its address known to the other node's proxy), and what `srv`
/// may be called on by `client`: its declared 8080 and its undeclared debug port.
const SRV_POLICY: &str = "\
apiVersion: v1
kind: Service
metadata: {name: srv, namespace: demo}
spec:
  clusterIP: 10.96.0.50
  selector: {app: srv}
  ports:
  - {name: tcp, port: 8080, targetPort: 8080}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: srv-ports, namespace: demo}
spec:
  matches: {ports: [8080, 9999]}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: client-to-srv, namespace: demo}
spec:
  destination: {kind: ServiceAccount, name: srv, namespace: demo}
  rules: [{kind: TCPRoute, name: srv-ports}]
  sources: [{kind: ServiceAccount, name: client, namespace: demo}]
";

/// The demo's resources plus [`SRV_POLICY`], in a directory of the test's own.
fn resources(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}-{tag}", mesh_tests::unique("hostile")));
    std::fs::create_dir_all(&dir).expect("resources dir");
    for entry in std::fs::read_dir(demo_dir().join("resources")).expect("demo resources") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, dir.join(path.file_name().expect("name"))).expect("copy");
    }
    std::fs::write(dir.join("srv.yaml"), SRV_POLICY).expect("write policy");
    dir
}

/// `demo/srv` on node-2: declares 8080, also listens on 9999 (a debug port, on every address,
/// IPv6 included) and on 9100 (metrics, excluded by annotation).
fn add_srv(c: &mut Cluster) {
    let demo = c.bins.apps.join("mesh-demo");
    let demo = demo.display();
    let spec = PodSpec {
        namespace: "demo".into(),
        name: "srv".into(),
        service_account: Some("srv".into()),
        labels: [("app".to_string(), "srv".to_string())].into(),
        tls_mode: None,
        ports: vec![8080],
        annotations: [(
            "mesh.io/exclude-inbound-ports".to_string(),
            "9100".to_string(),
        )]
        .into(),
        probe_port: None,
        run: vec![
            "sh".into(),
            "-c".into(),
            format!(
                "{demo} tcp-echo --listen [::]:9999 --name srv-debug & \
                 {demo} tcp-echo --listen 0.0.0.0:9100 --name srv-metrics & \
                 exec {demo} tcp-echo --listen 0.0.0.0:8080 --name srv"
            ),
        ],
    };
    c.add_pod("node-2", spec).expect("add srv");
}

/// A plaintext call from a node's own namespace: outside the mesh.
fn from_node(c: &Cluster, node: &str, target: &str) -> Output {
    let demo = c.bins.apps.join("mesh-demo");
    c.exec_on_node(
        node,
        &[
            demo.to_str().expect("path"),
            "call",
            "--target",
            target,
            "--mode",
            "tcp",
        ],
    )
    .expect("run on the node")
}

fn answered(out: &Output) -> String {
    assert!(
        out.status.success(),
        "the call failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn refused(out: &Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what}: answered {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn sniff_fabric(c: &Cluster, iface: &str) -> Sniffer {
    let ns =
        std::fs::File::open(Path::new("/run/netns").join(c.names.fabric())).expect("fabric netns");
    Sniffer::start_in(ns, iface)
}

fn agent_fds(c: &Cluster, node: usize) -> usize {
    let pid = c.nodes[node].agent.as_ref().expect("agent running").pid();
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("agent fds")
        .count()
}

#[test]
fn strict_covers_undeclared_ports_and_ipv6_and_stays_closed_while_the_agent_is_down() {
    if !privileged(
        "strict_covers_undeclared_ports_and_ipv6_and_stays_closed_while_the_agent_is_down",
    ) {
        return;
    }
    let dir = resources("strict");
    let mut c = up_with(&dir, &[]);
    add_srv(&mut c);
    let srv = c.pod("demo/srv").expect("srv").ip;
    let (declared, debug, metrics) = (
        format!("{srv}:8080"),
        format!("{srv}:9999"),
        format!("{srv}:9100"),
    );

    // A mesh caller with a TrafficTarget reaches the declared and the undeclared port.
    assert_eq!(
        wait_until_ok(&c, "demo/client", &declared).trim(),
        "srv hello"
    );
    assert_eq!(
        wait_until_ok(&c, "demo/client", &debug).trim(),
        "srv-debug hello"
    );
    // One without (the intruder) reaches neither.
    refused(&call(&c, "demo/intruder", &debug), "intruder -> srv:9999");

    // Plaintext from outside the mesh: the undeclared port is refused like the declared one;
    // only the port the operator excluded answers.
    refused(&from_node(&c, "node-1", &declared), "plaintext to srv:8080");
    refused(&from_node(&c, "node-1", &debug), "plaintext to srv:9999");
    assert_eq!(
        answered(&from_node(&c, "node-1", &metrics)),
        "srv-metrics hello"
    );

    // IPv6 plaintext to the STRICT pod, on an address added to its interface, from its node.
    let node2 = c.node_index("node-2").expect("node-2");
    let pod_ns = c.pod("demo/srv").expect("srv").netns.clone();
    mesh_tests::sh(&[
        "ip",
        "-n",
        &pod_ns,
        "-6",
        "addr",
        "add",
        "fd78::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let node_ns = c.nodes[node2].netns.clone();
    mesh_tests::sh(&[
        "ip",
        "-n",
        &node_ns,
        "-6",
        "addr",
        "add",
        "fd78::1/64",
        "dev",
        "cni0",
        "nodad",
    ]);
    refused(
        &from_node(&c, "node-2", "[fd78::2]:9999"),
        "IPv6 plaintext to srv:9999",
    );

    // A dual-stack socket to the IPv4-mapped VIP: carried by the mesh (policy allows the
    // client), never in plaintext between the nodes; refused for the intruder.
    let capture = sniff_fabric(&c, "n0");
    let mapped_vip = format!("[::ffff:{ECHO_VIP_IP}]:9000");
    assert_eq!(
        answered(&call(&c, "demo/client", &mapped_vip)),
        "echo hello"
    );
    refused(
        &call(&c, "demo/intruder", &mapped_vip),
        "intruder -> ::ffff:VIP",
    );
    let mapped_pod = format!("[::ffff:{srv}]:9999");
    refused(
        &call(&c, "demo/intruder", &mapped_pod),
        "intruder -> ::ffff:srv",
    );
    let segments = capture.stop();
    assert!(
        segments
            .iter()
            .filter(|s| !s.payload.is_empty())
            .all(|s| [s.src_port, s.dst_port]
                .iter()
                .any(|p| *p == 15008 || *p == 15012)),
        "traffic between the nodes outside HBONE"
    );

    // The agent of srv's node killed: STRICT stays closed, PERMISSIVE (legacy) stays open.
    c.kill_agent(node2);
    refused(
        &from_node(&c, "node-1", &declared),
        "plaintext to srv:8080 without the agent",
    );
    refused(
        &from_node(&c, "node-1", &debug),
        "plaintext to srv:9999 without the agent",
    );
    assert_eq!(
        answered(&from_node(&c, "node-1", &metrics)),
        "srv-metrics hello"
    );
    let legacy = c.pod("demo/legacy").expect("legacy").ip;
    assert_eq!(
        answered(&from_node(&c, "node-1", &format!("{legacy}:9000"))),
        "legacy hello",
        "PERMISSIVE fails open"
    );

    // The window: from the restarted agent's start until srv is served again.
    let started = Instant::now();
    c.start_agent(node2).expect("restart the agent");
    let ready = started.elapsed();
    let served = loop {
        if call(&c, "demo/client", &declared).status.success() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "srv never served again"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!(
        "fail-closed window on the simulated cluster: restarted agent READY after {ready:?}, \
         a mesh call to the STRICT pod succeeded again after {served:?}"
    );
    refused(
        &from_node(&c, "node-1", &debug),
        "plaintext after the restart",
    );
    c.down().expect("teardown");
    let _ = std::fs::remove_dir_all(dir);
}

const ECHO_VIP_IP: &str = "10.96.0.20";

/// A PERMISSIVE pod under the permissive traffic policy, where plaintext is admitted: the
/// proxy used to carry a connection made to its own 127.0.0.1:15006 "to its destination",
/// itself, again and again until the agent ran out of descriptors.
#[test]
fn a_pod_calling_the_proxy_s_own_ports_is_refused_and_the_agent_survives() {
    if !privileged("a_pod_calling_the_proxy_s_own_ports_is_refused_and_the_agent_survives") {
        return;
    }
    let c = up(&["--traffic-policy", "permissive"]);
    let node2 = c.node_index("node-2").expect("node-2");
    let before = agent_fds(&c, node2);
    for _ in 0..10 {
        for port in [15006, 15001] {
            let started = Instant::now();
            let out = call(&c, "demo/legacy", &format!("127.0.0.1:{port}"));
            refused(&out, &format!("127.0.0.1:{port}"));
            assert!(
                started.elapsed() < Duration::from_secs(3),
                "127.0.0.1:{port} was not refused at once"
            );
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let after = agent_fds(&c, node2);
    assert!(
        after <= before + 10,
        "the agent's descriptors grew from {before} to {after}"
    );
    assert_eq!(
        wait_until_ok(&c, "demo/client", ECHO_VIP).trim(),
        "echo hello",
        "the agent still serves"
    );
    c.down().expect("teardown");
}

/// With `--egress deny`, a dual-stack application cannot leave the mesh over native IPv6: the
/// kernel refuses its connect (EPERM) where the same connect outside the pod's cgroup reaches
/// the address (nothing listens there: connection refused).
#[test]
fn native_ipv6_does_not_leave_the_mesh_under_egress_deny() {
    if !privileged("native_ipv6_does_not_leave_the_mesh_under_egress_deny") {
        return;
    }
    let c = up_with_args(&demo_dir().join("resources"), &["--egress", "deny"], &[]);
    let node1 = c.node_index("node-1").expect("node-1");
    let pod_ns = c.pod("demo/client").expect("client").netns.clone();
    mesh_tests::sh(&[
        "ip",
        "-n",
        &pod_ns,
        "-6",
        "addr",
        "add",
        "fd79::2/64",
        "dev",
        "eth0",
        "nodad",
    ]);
    let node_ns = c.nodes[node1].netns.clone();
    mesh_tests::sh(&[
        "ip",
        "-n",
        &node_ns,
        "-6",
        "addr",
        "add",
        "fd79::1/64",
        "dev",
        "cni0",
        "nodad",
    ]);
    let target = "[fd79::1]:7";
    let demo = c.bins.apps.join("mesh-demo");
    let outside = std::process::Command::new("ip")
        .args(["netns", "exec", &pod_ns])
        .arg(&demo)
        .args(["call", "--target", target, "--mode", "tcp"])
        .output()
        .expect("run the demo client in the pod's namespace only");
    let outside_err = String::from_utf8_lossy(&outside.stderr).to_lowercase();
    assert!(
        !outside.status.success() && outside_err.contains("refused"),
        "outside the pod's cgroup the address should be reachable (connection refused): \
         {outside_err}"
    );
    let inside = call(&c, "demo/client", target);
    let inside_err = String::from_utf8_lossy(&inside.stderr).to_lowercase();
    assert!(
        !inside.status.success() && inside_err.contains("not permitted"),
        "the pod's native IPv6 connect was not refused by the kernel: {inside_err}"
    );
    // The mesh itself still works for the pod.
    wait_until_ok(&c, "demo/client", ECHO_VIP);
}
