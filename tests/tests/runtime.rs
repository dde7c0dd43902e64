//! Pods started by a real container runtime join the mesh: on each of two simulated nodes a
//! containerd (Debian's, with runc and the reference CNI plugins) runs inside the node's
//! network namespace, `mesh-cni` is installed into the conflist it reads, and the test drives
//! it through the CRI API as the kubelet does (`mesh_tests::runtime`). Privileged; needs the
//! runtime's packages (`cargo xtask prereqs` installs them).
use std::path::Path;
use std::time::{Duration, Instant};

#[allow(dead_code, reason = "each suite uses a subset")]
mod common;

use common::{ECHO_VIP, assert_hbone_only, bins, cluster_prefix};
use mesh_tests::cluster::{ClusterSpec, PodSpec, demo_dir};
use mesh_tests::runtime::{CONFLIST, Finished, RuntimeCluster};
use mesh_tests::sniff::Sniffer;
use mesh_tests::{installed, privileged};
use serde_json::Value;

/// What the test runs besides the mesh: (program, a harmless invocation, Debian package).
const RUNTIME_PROGRAMS: &[(&str, &[&str], &str)] = &[
    ("containerd", &["--version"], "containerd"),
    ("ctr", &["--version"], "containerd"),
    ("containerd-shim-runc-v2", &["-v"], "containerd"),
    ("runc", &["--version"], "runc"),
    ("/usr/lib/cni/bridge", &[], "containernetworking-plugins"),
    (
        "/usr/lib/cni/host-local",
        &[],
        "containernetworking-plugins",
    ),
    ("/usr/lib/cni/loopback", &[], "containernetworking-plugins"),
    ("tar", &["--version"], "tar"),
    ("ldd", &["--version"], "libc-bin"),
];

/// How long a one-shot client container may run.
const CALL_LIMIT: Duration = Duration::from_secs(30);

/// A pod of the demo description (`deploy/demo/cluster.yaml`).
fn demo_pod(name: &str) -> PodSpec {
    let text = std::fs::read_to_string(demo_dir().join("cluster.yaml")).expect("cluster.yaml");
    let spec = ClusterSpec::parse(&text).expect("the demo description parses");
    spec.nodes
        .into_iter()
        .flat_map(|n| n.pods)
        .find(|p| p.name == name)
        .unwrap_or_else(|| panic!("no pod {name} in the demo description"))
}

/// A demo pod whose container makes one call to the echo service and exits.
fn caller(name: &str, like: &str) -> PodSpec {
    let mut spec = demo_pod(like);
    spec.name = name.into();
    spec.run = ["mesh-demo", "call", "--target", ECHO_VIP, "--mode", "tcp"]
        .map(String::from)
        .to_vec();
    spec
}

/// The agent's view of its pods (`/debug/pods`), by name.
fn agent_pods(rc: &RuntimeCluster, node: &str) -> serde_json::Map<String, Value> {
    let text = rc
        .cluster
        .agent_admin(node, "/debug/pods")
        .expect("/debug/pods");
    let list: Vec<Value> = serde_json::from_str(&text).expect("pods JSON");
    list.into_iter()
        .filter_map(|p| Some((p["name"].as_str()?.to_string(), p)))
        .collect()
}

fn agent_log(rc: &RuntimeCluster, node: &str) -> String {
    std::fs::read_to_string(rc.cluster.state.join(format!("logs/agent-{node}.log")))
        .unwrap_or_default()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Starts pod `spec` on `node`, failing with the runtime's log.
fn run_pod(rc: &mut RuntimeCluster, node: &str, spec: PodSpec) {
    let key = format!("{}/{}", spec.namespace, spec.name);
    if let Err(e) = rc.run_pod(node, spec) {
        panic!(
            "start {key} on {node}: {e:#}\ncontainerd's log on {node}:\n{}\nagent's log:\n{}",
            rc.runtime_log(node),
            agent_log(rc, node)
        );
    }
}

/// How the pod's one-shot container `app` ended.
fn finished(rc: &RuntimeCluster, key: &str) -> Finished {
    rc.wait_finished(key, "app", CALL_LIMIT)
        .unwrap_or_else(|e| panic!("{key}: {e:#}"))
}

/// The processes in the cgroup v2 subtree at `dir`.
fn processes_below(dir: &Path) -> Vec<String> {
    let mut pids: Vec<String> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(processes_below(&e.path()));
        }
    }
    pids
}

/// A process killed when the test lets go of it, however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn pods_started_by_containerd_are_meshed_before_their_first_connection_and_leave_nothing() {
    let test =
        "pods_started_by_containerd_are_meshed_before_their_first_connection_and_leave_nothing";
    if !privileged(test) || !installed(test, RUNTIME_PROGRAMS) {
        return;
    }
    let started = Instant::now();
    let prefix = cluster_prefix();
    let mut rc = RuntimeCluster::up(
        &prefix,
        &["node-1", "node-2"],
        &demo_dir().join("resources"),
        bins(),
        &mut |step| eprintln!("[{prefix}] {step}"),
    )
    .unwrap_or_else(|e| panic!("runtime cluster up: {e:#}"));

    // The plugin joins a conflist the network add-on wrote: appended after bridge.
    let mut originals = Vec::new();
    for node in ["node-1", "node-2"] {
        let conflist = rc.runtime(node).expect("runtime").conf_dir.join(CONFLIST);
        let before: Value =
            serde_json::from_slice(&std::fs::read(&conflist).expect("conflist")).expect("JSON");
        let file = rc
            .install_plugin(node)
            .unwrap_or_else(|e| panic!("install mesh-cni on {node}: {e:#}"));
        assert_eq!(file, conflist);
        let after: Value =
            serde_json::from_slice(&std::fs::read(&conflist).expect("conflist")).expect("JSON");
        let types: Vec<&str> = after["plugins"]
            .as_array()
            .expect("plugins")
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(types, ["bridge", "mesh-cni"], "{after}");
        originals.push((conflist, before));
    }

    // The echo server on node-2, then the client and the intruder on node-1, each making one
    // call as its container's command: the first connection of each pod.
    // The kubelet probes echo on its port (a tcpSocket readiness probe in its Pod object).
    let mut echo = demo_pod("echo");
    echo.probe_port = Some(9000);
    run_pod(&mut rc, "node-2", echo);
    let fabric = std::fs::File::open(Path::new("/run/netns").join(rc.cluster.names.fabric()))
        .expect("fabric netns");
    let capture = Sniffer::start_in(fabric, "n0");
    run_pod(&mut rc, "node-1", caller("client", "client"));
    let first = finished(&rc, "demo/client");
    let segments = capture.stop();
    assert_eq!(
        (first.exit_code, first.stdout.trim()),
        (0, "echo hello"),
        "the client's first call failed: {}",
        first.stderr
    );
    assert_hbone_only(&segments, "the client's first call");
    run_pod(&mut rc, "node-1", caller("intruder", "intruder"));
    let intruder = finished(&rc, "demo/intruder");
    assert_ne!(
        intruder.exit_code, 0,
        "the intruder got through: {}",
        intruder.stdout
    );

    // The kubelet's probe: plaintext from node-2 itself reaches its STRICT echo on the probe
    // port; the same from node-1 does not.
    let echo_ip = rc
        .pod("demo/echo")
        .expect("echo")
        .sandbox()
        .expect("sandbox")
        .ip;
    let from_node = |node: &str| {
        let demo = rc.cluster.bins.apps.join("mesh-demo").display().to_string();
        let target = format!("{echo_ip}:9000");
        rc.cluster
            .exec_on_node(node, &[&demo, "call", "--target", &target, "--mode", "tcp"])
            .expect("run the demo client on the node")
    };
    let probe = from_node("node-2");
    assert!(
        probe.status.success(),
        "the node's probe of its STRICT pod was refused: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    assert!(
        !from_node("node-1").status.success(),
        "plaintext from another node reached a STRICT pod's probe port"
    );

    // Each pod was handed over by the plugin (not found later), at the cgroup named for its
    // UID, which its processes are in, and the network namespace the runtime made.
    for (node, names) in [
        ("node-1", &["client", "intruder"][..]),
        ("node-2", &["echo"][..]),
    ] {
        let pods = agent_pods(&rc, node);
        for name in names {
            let key = format!("demo/{name}");
            let pod = rc.pod(&key).expect("pod");
            let view = pods
                .get(&key)
                .unwrap_or_else(|| panic!("{node} did not enroll {key}: {pods:?}"));
            assert!(view["enroll_error"].is_null(), "{view}");
            assert_eq!(view["cgroup"], pod.cgroup.display().to_string(), "{key}");
            assert!(
                pod.cgroup
                    .ends_with(format!("kubepods/besteffort/pod{}", pod.uid)),
                "{}",
                pod.cgroup.display()
            );
            assert!(
                !processes_below(&pod.cgroup).is_empty(),
                "no process of {key} is in its cgroup v2 directory {}",
                pod.cgroup.display()
            );
            let sandbox = pod.sandbox().expect("sandbox");
            assert_eq!(view["netns"], sandbox.netns.display().to_string(), "{key}");
            let pins = &rc.runtime(node).expect("runtime").netns_dir;
            assert!(
                sandbox.netns.starts_with(pins),
                "{}",
                sandbox.netns.display()
            );
        }
        let log = agent_log(&rc, node);
        assert!(
            !log.contains("found a running pod"),
            "{node} adopted a pod the plugin should have handed over:\n{log}"
        );
    }

    // A deleted pod is unenrolled with nothing left: CNI DEL through the runtime.
    let links = Path::new("/sys/fs/bpf/mesh")
        .join(rc.cluster.names.instance("node-1"))
        .join("links")
        .join(mesh_datapath::config::pin_name("demo/intruder"));
    assert!(links.exists(), "{} is missing", links.display());
    let intruder = rc.pod("demo/intruder").expect("intruder").clone();
    rc.delete_pod("demo/intruder").expect("delete the intruder");
    wait_for("node-1 forgets demo/intruder", || {
        !agent_pods(&rc, "node-1").contains_key("demo/intruder")
    });
    assert!(!links.exists(), "{} is left", links.display());
    let netns = &intruder.sandbox.as_ref().expect("sandbox").netns;
    assert!(!netns.exists(), "{} is left", netns.display());
    assert!(
        !intruder.cgroup.exists(),
        "{} is left",
        intruder.cgroup.display()
    );

    // No agent: a meshed pod cannot start, and the runtime says why; it starts once the
    // agent is back (which finds the client's running sandbox by itself).
    let node1 = rc.cluster.node_index("node-1").expect("node-1");
    rc.cluster.kill_agent(node1);
    rc.add_pod("node-1", caller("client-2", "client"))
        .expect("the Pod object");
    let e = format!(
        "{:#}",
        rc.start_pod("demo/client-2")
            .expect_err("a meshed pod started without its agent")
    );
    assert!(
        e.contains("mesh-cni") && e.contains("unreachable") && e.contains("demo/client-2"),
        "RunPodSandbox did not fail with the plugin's message: {e}"
    );
    assert!(rc.pod("demo/client-2").expect("pod").sandbox.is_none());
    rc.cluster
        .start_agent(node1)
        .unwrap_or_else(|e| panic!("restart node-1's agent: {e:#}"));
    wait_for("node-1 adopts the running client", || {
        agent_pods(&rc, "node-1").contains_key("demo/client")
    });
    if let Err(e) = rc.start_pod("demo/client-2") {
        panic!(
            "client-2 did not start once its agent was back: {e:#}\n{}",
            rc.runtime_log("node-1")
        );
    }
    let second = finished(&rc, "demo/client-2");
    assert_eq!(
        (second.exit_code, second.stdout.trim()),
        (0, "echo hello"),
        "client-2's call failed: {}",
        second.stderr
    );
    assert!(agent_pods(&rc, "node-1").contains_key("demo/client-2"));

    // The network add-on rewrites its conflist on node-2 (an upgrade would) while the
    // DaemonSet's watcher runs: the plugin is chained again, and the next meshed pod is
    // handed over by it, not found later.
    let rt2 = rc.runtime("node-2").expect("runtime");
    let watcher = KillOnDrop(
        std::process::Command::new(&rc.cluster.bins.cni)
            .args([
                "install",
                "--watch",
                "--watch-interval=1",
                "--timeout-seconds=20",
            ])
            .arg(format!("--conf-dir={}", rt2.conf_dir.display()))
            .arg(format!("--bin-dir={}", rt2.bin_dir.display()))
            .arg(format!(
                "--agent-socket={}",
                rc.cluster.cni_socket("node-2").display()
            ))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("run mesh-cni install --watch"),
    );
    let (conflist2, before2) = &originals[1];
    std::fs::write(conflist2, serde_json::to_vec(before2).expect("JSON")).expect("rewrite");
    wait_for("node-2's plugin chained again", || {
        serde_json::from_slice::<Value>(&std::fs::read(conflist2).unwrap_or_default())
            .ok()
            .and_then(|v| v["plugins"].as_array().cloned())
            .is_some_and(|l| l.last().is_some_and(|p| p["type"] == "mesh-cni"))
    });
    rt2.wait_cni_config(true)
        .unwrap_or_else(|e| panic!("node-2's runtime did not load the plugin again: {e:#}"));
    // Stopped before the uninstall below, which it would undo.
    drop(watcher);
    run_pod(&mut rc, "node-2", caller("client-3", "client"));
    let third = finished(&rc, "demo/client-3");
    assert_eq!(
        (third.exit_code, third.stdout.trim()),
        (0, "echo hello"),
        "client-3's call failed: {}",
        third.stderr
    );
    assert!(agent_pods(&rc, "node-2").contains_key("demo/client-3"));
    let log = agent_log(&rc, "node-2");
    assert!(
        !log.contains("found a running pod"),
        "node-2 adopted a pod the plugin should have handed over:\n{log}"
    );

    // Uninstalled, the plugin leaves the conflist as the network add-on wrote it.
    for (node, (conflist, before)) in ["node-1", "node-2"].iter().zip(&originals) {
        let changed = rc
            .uninstall_plugin(node)
            .unwrap_or_else(|e| panic!("uninstall mesh-cni on {node}: {e:#}"));
        assert_eq!(&changed, std::slice::from_ref(conflist));
        let after: Value =
            serde_json::from_slice(&std::fs::read(conflist).expect("conflist")).expect("JSON");
        assert_eq!(
            &after, before,
            "{node}: the conflist differs after uninstall"
        );
    }
    rc.down().expect("teardown");
    eprintln!(
        "[{prefix}] done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
