//! The whole agent in this process (`mesh_agent::app::start`), as `mesh-agent run` composes it:
//! datapath, pod enrollment, proxy and admin endpoint, then `shutdown()`. Privileged.
//!
//! The agent moves its process into its own cgroup, so this file holds one test: the test
//! process is that agent, and moves back when it is done.
use std::{net::SocketAddr, path::Path, time::Duration};

use mesh_tests::{Cgroup, Netns, Sink, admin_get, instance, link, privileged, probe};

const PROBE: &str = env!("CARGO_BIN_EXE_mesh-probe");
const POD_IP: &str = "10.78.0.2";
const REMOTE_IP: &str = "10.78.0.1";

/// `GET /healthz` on the admin endpoint: its answer, or the connection error.
fn healthz(admin: SocketAddr) -> std::io::Result<String> {
    admin_get(admin, "/healthz")
}

/// Puts the test process back where it started and removes the instance's pins when the
/// test ends, however it ends.
struct Cleanup {
    cgroup: std::path::PathBuf,
    pins: std::path::PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            self.cgroup.join("cgroup.procs"),
            std::process::id().to_string(),
        );
        let _ = mesh_datapath::ebpf::remove_instance(&self.pins);
    }
}

#[test]
fn the_whole_agent_runs_in_process_and_shuts_down_cleanly() {
    if !privileged("the_whole_agent_runs_in_process_and_shuts_down_cleanly") {
        return;
    }
    let pod = Netns::new("ip-pod");
    let remote = Netns::new("ip-remote");
    link(&pod, "eth0", POD_IP, &remote, "eth0", REMOTE_IP);
    let pod_cg = Cgroup::new("ip-pod");
    let agent_cg = Cgroup::new("ip-agent");
    let sink = Sink::start(&remote, &format!("{REMOTE_IP}:9000"));
    let admin = mesh_tests::inprocess::free_port();

    let mount = mesh_datapath::cgroup::v2_mount().expect("cgroup v2");
    let name = instance("inproc");
    let cleanup = Cleanup {
        cgroup: mesh_datapath::cgroup::current(&mount).expect("own cgroup"),
        pins: Path::new(mesh_datapath::config::BPFFS_ROOT).join(&name),
    };
    let cfg = mesh_agent::cli::run_config(&[
        "--instance".to_string(),
        name,
        format!("--cgroup={}", agent_cg.path.display()),
        "--capture=10.78.0.0/24".to_string(),
        format!(
            "--pod=name=default/client,cgroup={},netns={},ip={POD_IP}",
            pod_cg.path.display(),
            pod.path.display()
        ),
        "--unenroll-on-exit".to_string(),
        format!("--admin={admin}"),
        "--metrics=off".to_string(),
    ])
    .expect("the flags of `mesh-agent run`");

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut agent = rt
        .block_on(mesh_agent::app::start(cfg))
        .expect("the agent starts");

    // Served: the admin endpoint answers and the pod's connection goes through the proxy.
    let health = healthz(admin).expect("the admin endpoint answers");
    assert!(
        health.contains("200 OK") && health.trim_end().ends_with("ok"),
        "{health}"
    );
    let through = probe(
        Path::new(PROBE),
        &pod_cg,
        &pod,
        &sink.addr.to_string(),
        1024 * 1024,
    );
    assert!(through.intact(), "{through:?}");
    assert_ne!(
        through.server_saw().port(),
        through.local.port(),
        "the pod's connection was not proxied: {through:?}"
    );

    // The kernel's counters are on /metrics beside the proxy's.
    let metrics = admin_get(admin, "/metrics").expect("metrics");
    for line in [
        "mesh_datapath_events_total{event=\"connect4_redirected\"} 1",
        "mesh_datapath_events_total{event=\"getsockopt_answered\"} 1",
        "mesh_datapath_fail_open_total 0",
        "mesh_datapath_counters_readable 1",
    ] {
        assert!(
            metrics.contains(line),
            "{line} missing in /metrics:\n{metrics}"
        );
    }

    // Waiting for the agent to end and giving up on it, as `mesh-agent run` does when a
    // signal comes, leaves it running and ready to shut down.
    rt.block_on(async {
        tokio::select! {
            ended = agent.ended() => panic!("the agent ended on its own: {ended:?}"),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    });
    assert!(healthz(admin).is_ok(), "the agent stopped serving");

    // Nothing is open: the drain ends at once, well within its grace period.
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(20), agent.shutdown()).await })
        .expect("the agent shuts down within 20 s")
        .expect("the agent shuts down cleanly");

    // Stopped: nothing listens on the admin port, and --unenroll-on-exit took the pod out of
    // the datapath, so its connection now goes straight to the server.
    assert!(
        healthz(admin).is_err(),
        "the admin endpoint still answers after shutdown"
    );
    let direct = probe(
        Path::new(PROBE),
        &pod_cg,
        &pod,
        &sink.addr.to_string(),
        1024,
    );
    assert!(direct.intact(), "{direct:?}");
    assert_eq!(
        direct.server_saw().port(),
        direct.local.port(),
        "the pod is still captured after shutdown: {direct:?}"
    );

    // Started while its pod asks for the mesh's removal (an agent restarted during
    // `helm uninstall`): it removes what the last one pinned, loads nothing, says so.
    assert!(cleanup.pins.exists(), "the first agent pinned nothing");
    let files = tempfile::tempdir().expect("temporary directory");
    let annotations = files.path().join("annotations");
    std::fs::write(&annotations, "mesh.io/uninstall=\"true\"\n").expect("annotations");
    let cfg = mesh_agent::cli::run_config(&[
        "--instance".to_string(),
        cleanup
            .pins
            .file_name()
            .and_then(|n| n.to_str())
            .expect("instance")
            .to_string(),
        format!("--cgroup={}", agent_cg.path.display()),
        format!("--uninstall-signal={}", annotations.display()),
        format!("--admin={admin}"),
        "--metrics=off".to_string(),
    ])
    .expect("the flags of `mesh-agent run`");
    let agent = rt
        .block_on(mesh_agent::app::start(cfg))
        .expect("the agent starts");
    let health = healthz(admin).expect("the admin endpoint answers");
    assert!(
        health.contains(" 503 ") && health.trim_end().ends_with("uninstalled"),
        "{health}"
    );
    assert!(!cleanup.pins.exists(), "pins left behind");
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), agent.shutdown()).await })
        .expect("the idle agent stops at once")
        .expect("cleanly");
    drop(rt);
    drop(cleanup);
}
