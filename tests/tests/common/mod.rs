//! What the end-to-end suites on the single-machine mesh share: the binaries, the demo
//! cluster under a prefix unique to each test, and the demo client.

use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mesh_tests::cluster::{Binaries, Cluster, ClusterSpec, demo_dir};

pub const ECHO_VIP: &str = "10.96.0.20:9000";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A prefix for one simulated cluster, unique in this run.
pub fn cluster_prefix() -> String {
    format!(
        "{}c{}",
        mesh_tests::prefix(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn bins() -> Binaries {
    Binaries::with_apps_beside(
        env!("CARGO_BIN_EXE_mesh-agent").into(),
        env!("CARGO_BIN_EXE_mesh-controller").into(),
    )
    .expect("the binaries")
}

/// The demo cluster under a prefix unique to this test.
pub fn up(controller_args: &[&str]) -> Cluster {
    up_with(&demo_dir().join("resources"), controller_args)
}

/// The demo cluster with the Kubernetes and SMI objects of `resources`.
pub fn up_with(resources: &std::path::Path, controller_args: &[&str]) -> Cluster {
    up_with_args(resources, &[], controller_args)
}

/// The demo cluster with the objects of `resources`, every agent started with `agent_args`
/// too.
pub fn up_with_args(
    resources: &std::path::Path,
    agent_args: &[&str],
    controller_args: &[&str],
) -> Cluster {
    let text = std::fs::read_to_string(demo_dir().join("cluster.yaml")).expect("cluster.yaml");
    let spec = ClusterSpec::parse(&text).expect("the demo description parses");
    let cluster = up_spec(&spec, resources, agent_args, controller_args);
    wait_until_ok(&cluster, "demo/client", ECHO_VIP);
    cluster
}

/// A cluster of `spec` under a prefix unique to this test, with the objects of `resources`,
/// every agent started with `agent_args`. Returns once every pod's application listens on its
/// ports; the mesh may still be receiving its configuration and certificates.
pub fn up_spec(
    spec: &ClusterSpec,
    resources: &std::path::Path,
    agent_args: &[&str],
    controller_args: &[&str],
) -> Cluster {
    let prefix = cluster_prefix();
    let owned = |args: &[&str]| -> Vec<String> { args.iter().map(|s| s.to_string()).collect() };
    let (agent, controller) = (owned(agent_args), owned(controller_args));
    Cluster::up(
        &prefix,
        spec,
        resources,
        bins(),
        &agent,
        &controller,
        &mut |step| eprintln!("[{prefix}] {step}"),
    )
    .unwrap_or_else(|e| panic!("cluster up: {e:#}"))
}

pub fn call(c: &Cluster, pod: &str, target: &str) -> Output {
    c.exec(
        pod,
        &["mesh-demo", "call", "--target", target, "--mode", "tcp"],
    )
    .expect("run the demo client")
}

pub fn wait_until_ok(c: &Cluster, pod: &str, target: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = call(c, pod, target);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "{pod} -> {target} never worked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Asserts that what crossed between the nodes during `what` (`segments`, captured on a
/// node's link) was the mesh's own: TLS records to the HBONE port (15008), nothing outside
/// HBONE and the control plane (15012), and the demo's `hello` never in the clear.
pub fn assert_hbone_only(segments: &[mesh_tests::sniff::Segment], what: &str) {
    let data: Vec<_> = segments.iter().filter(|s| !s.payload.is_empty()).collect();
    assert!(
        data.iter()
            .any(|s| s.dst_port == 15008 && s.payload.starts_with(&[0x17, 0x03, 0x03])),
        "{what} did not cross in HBONE (no TLS record to 15008)"
    );
    assert!(
        data.iter().all(|s| [s.src_port, s.dst_port]
            .iter()
            .any(|p| *p == 15008 || *p == 15012)),
        "{what}: traffic between the nodes outside HBONE: {:?}",
        data.iter()
            .map(|s| (s.src_port, s.dst_port))
            .collect::<Vec<_>>()
    );
    assert!(
        !data
            .iter()
            .any(|s| s.payload.windows(5).any(|w| w == b"hello")),
        "{what}: the request crossed in the clear"
    );
}

/// A pod of the demo namespace running the demo TCP echo on 9000 as service account `echo`.
pub fn echo_pod(name: &str, labels: &[(&str, &str)]) -> mesh_tests::cluster::PodSpec {
    mesh_tests::cluster::PodSpec {
        namespace: "demo".into(),
        name: name.into(),
        service_account: Some("echo".into()),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        tls_mode: None,
        ports: vec![9000],
        annotations: Default::default(),
        probe_port: None,
        run: [
            "mesh-demo",
            "tcp-echo",
            "--listen",
            "0.0.0.0:9000",
            "--name",
            "{pod}",
        ]
        .map(String::from)
        .to_vec(),
    }
}
