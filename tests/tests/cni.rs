//! Pods joining the mesh as on a real node, on the single-machine mesh with `enrollment: cni`:
//! each pod's cgroup is laid out as the kubelet lays it out (named for the pod's UID), the Pod
//! objects the controller reads name no cgroup or network namespace and carry no address until
//! the pod's network is set up, and the real `mesh-cni` binary is run as a container runtime
//! runs it (ADD before the pod's command starts, DEL when it goes) against agents started with
//! `--discover-pods` and no `--capture` (the Node objects' pod CIDRs and the controller's
//! `--service-cidr` say what is captured). Privileged.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[allow(dead_code, reason = "each suite uses a subset")]
mod common;

use common::{ECHO_VIP, assert_hbone_only, call, echo_pod, up_spec, wait_until_ok};
use mesh_tests::cluster::{Cluster, ClusterSpec, Enrollment, PodSpec, demo_dir};
use mesh_tests::privileged;
use mesh_tests::sniff::Sniffer;

/// The demo cluster with pods enrolled through the CNI plugin, plus `extra` pods on node-1.
fn up_cni(extra: Vec<PodSpec>) -> Cluster {
    let text = std::fs::read_to_string(demo_dir().join("cluster.yaml")).expect("cluster.yaml");
    let mut spec = ClusterSpec::parse(&text).expect("the demo description parses");
    spec.enrollment = Enrollment::Cni;
    spec.nodes[0].pods.extend(extra);
    // The kubelet probes node-2's echo on its port.
    for p in spec.nodes[1].pods.iter_mut().filter(|p| p.name == "echo") {
        p.probe_port = Some(9000);
    }
    up_spec(&spec, &demo_dir().join("resources"), &[], &[])
}

/// The agent's view of its pods (`/debug/pods`), by name.
fn agent_pods(c: &Cluster, node: &str) -> serde_json::Map<String, serde_json::Value> {
    let text = c.agent_admin(node, "/debug/pods").expect("/debug/pods");
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).expect("pods JSON");
    list.into_iter()
        .filter_map(|p| Some((p["name"].as_str()?.to_string(), p)))
        .collect()
}

fn agent_log(c: &Cluster, node: &str) -> String {
    std::fs::read_to_string(c.state.join(format!("logs/agent-{node}.log"))).unwrap_or_default()
}

/// The pinned links of pod `key` in node `node`'s datapath.
fn pinned_links(c: &Cluster, node: &str, key: &str) -> PathBuf {
    Path::new("/sys/fs/bpf/mesh")
        .join(c.names.instance(node))
        .join("links")
        .join(mesh_datapath::config::pin_name(key))
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn pods_set_up_through_the_cni_plugin_are_meshed_before_they_start_and_removed_with_nothing_left() {
    let test = "pods_set_up_through_the_cni_plugin_are_meshed_before_they_start_and_removed_with_nothing_left";
    if !privileged(test) {
        return;
    }
    // `plain` opts out of the mesh: the plugin lets it through at once.
    let mut c = up_cni(vec![echo_pod(
        "plain",
        &[("app", "plain"), ("mesh.io/enrolled", "false")],
    )]);
    let pods_yaml = std::fs::read_to_string(c.state.join("resources/zz-cluster-pods.yaml"))
        .expect("the Pod objects");
    assert!(
        !pods_yaml.contains("mesh.io/cgroup") && !pods_yaml.contains("mesh.io/netns"),
        "the Pod objects name where pods live:\n{pods_yaml}"
    );

    // Every meshed pod was enrolled by its CNI ADD, at its kubelet cgroup and the runtime's
    // namespace; the unmeshed one is not enrolled.
    for (node, names) in [
        ("node-1", &["client", "intruder", "echo-local"][..]),
        ("node-2", &["web-v1", "web-v2", "echo", "legacy"][..]),
    ] {
        let pods = agent_pods(&c, node);
        for name in names {
            let key = format!("demo/{name}");
            let view = pods
                .get(&key)
                .unwrap_or_else(|| panic!("{node} did not enroll {key}: {pods:?}"));
            let pod = c.pod(&key).expect("pod");
            assert_eq!(view["cgroup"], pod.cgroup.display().to_string(), "{key}");
            assert!(
                view["cgroup"].as_str().unwrap_or("").contains(&format!(
                    "kubepods-besteffort-pod{}.slice",
                    pod.uid.replace('-', "_")
                )),
                "{view}"
            );
            assert_eq!(view["netns"], pod.netns_path().display().to_string());
            assert!(view["enroll_error"].is_null(), "{view}");
        }
        let log = agent_log(&c, node);
        assert!(
            !log.contains("found a running pod"),
            "{node} adopted a pod the plugin should have handed over:\n{log}"
        );
    }
    assert!(!agent_pods(&c, "node-1").contains_key("demo/plain"));

    // The client's first connection is already in the mesh: HBONE in TLS between the nodes,
    // policy enforced.
    let ns = std::fs::File::open(PathBuf::from("/run/netns").join(c.names.fabric()))
        .expect("fabric netns");
    let capture = Sniffer::start_in(ns, "n0");
    let first = call(&c, "demo/client", ECHO_VIP);
    let segments = capture.stop();
    assert!(
        first.status.success(),
        "the client's first call failed: {}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&first.stdout).trim(), "echo hello");
    assert_hbone_only(&segments, "the client's first call");
    assert!(
        !call(&c, "demo/intruder", ECHO_VIP).status.success(),
        "the intruder got through"
    );
    // The unmeshed pod is not captured: the service address means nothing without the mesh.
    assert!(
        !call(&c, "demo/plain", ECHO_VIP).status.success(),
        "an unmeshed pod reached a service address"
    );

    // The kubelet's probe: plaintext from node-2 itself reaches its STRICT echo on the probe
    // port; plaintext from node-2 to a STRICT pod it does not probe, or from node-1 to the
    // probed port, does not.
    let from_node = |node: &str, pod: &str, port: u16| {
        let target = format!("{}:{port}", c.pod(pod).expect("pod").ip);
        let demo = c.bins.apps.join("mesh-demo").display().to_string();
        c.exec_on_node(node, &[&demo, "call", "--target", &target, "--mode", "tcp"])
            .expect("run the demo client on the node")
    };
    let probe = from_node("node-2", "demo/echo", 9000);
    assert!(
        probe.status.success(),
        "the node's probe of a STRICT pod was refused: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(
        !from_node("node-2", "demo/web-v1", 8080).status.success(),
        "plaintext from the node reached a STRICT pod's port no probe names"
    );
    assert!(
        !from_node("node-1", "demo/echo", 9000).status.success(),
        "plaintext from another node reached a STRICT pod's probe port"
    );

    // A pod added and deleted while the mesh runs: DEL unenrolls it, nothing pinned is left.
    c.add_pod("node-1", echo_pod("echo-2", &[("app", "echo")]))
        .expect("add a pod");
    assert!(agent_pods(&c, "node-1").contains_key("demo/echo-2"));
    let links = pinned_links(&c, "node-1", "demo/echo-2");
    assert!(links.exists(), "{} is missing", links.display());
    c.remove_pod("demo/echo-2").expect("remove the pod");
    assert!(!agent_pods(&c, "node-1").contains_key("demo/echo-2"));
    assert!(!links.exists(), "{} is left", links.display());
    wait_until_ok(&c, "demo/client", ECHO_VIP);
    c.down().expect("teardown");
}

#[test]
fn a_meshed_pod_waits_for_its_agent_and_an_agent_started_after_its_pods_adopts_them() {
    let test = "a_meshed_pod_waits_for_its_agent_and_an_agent_started_after_its_pods_adopts_them";
    if !privileged(test) {
        return;
    }
    let mut c = up_cni(vec![]);
    wait_until_ok(&c, "demo/client", ECHO_VIP);
    let node2 = c.node_index("node-2").expect("node-2");

    // No agent: a meshed pod cannot start, and the runtime is told to try again.
    c.kill_agent(node2);
    let mut spec = echo_pod("echo-2", &[("app", "echo")]);
    let e = c
        .add_pod("node-2", spec.clone())
        .expect_err("a meshed pod started without its agent");
    let e = format!("{e:#}");
    assert!(
        e.contains("\"code\":11") && e.contains("unreachable"),
        "not a try-again-later error: {e}"
    );
    assert!(c.pod("demo/echo-2").is_err());

    // The agent comes back: it finds the pods already running from their cgroups, and the
    // pod starts now.
    c.start_agent(node2).expect("restart node-2's agent");
    wait_until_ok(&c, "demo/client", ECHO_VIP);
    let pods = agent_pods(&c, "node-2");
    for name in ["web-v1", "web-v2", "echo", "legacy"] {
        let key = format!("demo/{name}");
        let view = pods
            .get(&key)
            .unwrap_or_else(|| panic!("node-2 did not adopt {key}: {pods:?}"));
        assert!(view["enroll_error"].is_null(), "{view}");
        assert_eq!(
            view["cgroup"],
            c.pod(&key).expect("pod").cgroup.display().to_string()
        );
    }
    let log = agent_log(&c, "node-2");
    assert_eq!(
        log.matches("found a running pod").count(),
        4,
        "node-2 should have adopted its four pods:\n{log}"
    );
    spec.name = "echo-3".into();
    c.add_pod("node-2", spec)
        .expect("a pod starts once its agent is back");
    wait_for("echo-3 is enrolled", || {
        agent_pods(&c, "node-2").contains_key("demo/echo-3")
    });
    c.down().expect("teardown");
}
