//! Attacks on the controller: a tenant's resources reaching into another namespace, and node
//! credentials that outlive their proof.

use std::time::{Duration, Instant};

use mesh_tests::cluster::{PodSpec, demo_dir, http_get_in};
use mesh_tests::privileged;

use super::common::{ECHO_VIP, call, up_with, wait_until_ok};

/// The `evil` tenant's own service, reachable by its own pods: the control that shows
/// `mallory` is meshed and that `evil`'s TrafficTargets work inside `evil`.
const EVIL_ECHO_VIP: &str = "10.96.66.1:9000";

/// What the tenant of namespace `evil` writes: a TCPRoute and a TrafficTarget in its own
/// namespace naming `demo/echo` as the destination and its own `mallory` as the source, plus
/// a legitimate TrafficTarget for its own service.
const EVIL_YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: evil-echo, namespace: evil}
spec:
  clusterIP: 10.96.66.1
  selector: {app: evil-echo}
  ports:
  - {name: tcp-echo, port: 9000, targetPort: 9000}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: every-port, namespace: evil}
spec:
  matches: {ports: []}
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: mallory-to-evil-echo, namespace: evil}
spec:
  destination: {kind: ServiceAccount, name: evil-echo, namespace: evil}
  rules: [{kind: TCPRoute, name: every-port}]
  sources: [{kind: ServiceAccount, name: mallory, namespace: evil}]
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: mallory-to-demo-echo, namespace: evil}
spec:
  destination: {kind: ServiceAccount, name: echo, namespace: demo}
  rules: [{kind: TCPRoute, name: every-port}]
  sources: [{kind: ServiceAccount, name: mallory, namespace: evil}]
"#;

fn evil_pod(name: &str, service_account: &str, run: &[&str]) -> PodSpec {
    PodSpec {
        namespace: "evil".into(),
        name: name.into(),
        service_account: Some(service_account.into()),
        labels: [("app".to_string(), name.to_string())].into(),
        tls_mode: None,
        ports: if run.is_empty() { vec![] } else { vec![9000] },
        run: run.iter().map(|s| s.to_string()).collect(),
    }
}

/// A TrafficTarget in `evil` naming `demo/echo` as its destination opens nothing: `mallory`
/// reaches `evil`'s own service but never `demo/echo`, and the controller lists the
/// TrafficTarget in `/debug/rejected` with the field and the reason.
#[test]
fn a_traffic_target_in_another_namespace_does_not_open_a_workload() {
    if !privileged("a_traffic_target_in_another_namespace_does_not_open_a_workload") {
        return;
    }
    let resources = tempfile::tempdir().expect("resources dir");
    for entry in std::fs::read_dir(demo_dir().join("resources")).expect("demo resources") {
        let entry = entry.expect("demo resource");
        std::fs::copy(entry.path(), resources.path().join(entry.file_name()))
            .expect("copy a demo resource");
    }
    std::fs::write(resources.path().join("evil.yaml"), EVIL_YAML).expect("write evil.yaml");

    let mut c = up_with(resources.path(), &[]);
    c.add_pod("node-1", evil_pod("mallory", "mallory", &[]))
        .expect("add mallory");
    c.add_pod(
        "node-2",
        evil_pod(
            "evil-echo",
            "evil-echo",
            &[
                "mesh-demo",
                "tcp-echo",
                "--listen",
                "0.0.0.0:9000",
                "--name",
                "{pod}",
            ],
        ),
    )
    .expect("add evil-echo");

    // The control: mallory is meshed and its tenant's own TrafficTarget lets it through.
    wait_until_ok(&c, "evil/mallory", EVIL_ECHO_VIP);

    // The attack: demo/echo, which demo/client reaches, stays closed to mallory.
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let out = call(&c, "evil/mallory", ECHO_VIP);
        assert!(
            !out.status.success(),
            "evil/mallory reached demo/echo through evil's TrafficTarget: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    wait_until_ok(&c, "demo/client", ECHO_VIP);

    let rejected = http_get_in(&c.names.fabric(), "127.0.0.1:15014", "/debug/rejected")
        .expect("the controller's /debug/rejected");
    let rejected: serde_json::Value = serde_json::from_str(&rejected).expect("JSON");
    let entry = rejected
        .as_array()
        .expect("a list of rejections")
        .iter()
        .find(|r| r["key"]["name"] == "mallory-to-demo-echo")
        .unwrap_or_else(|| panic!("the TrafficTarget is not listed: {rejected}"));
    assert_eq!(entry["key"]["kind"], "TrafficTarget", "{entry}");
    assert_eq!(entry["key"]["namespace"], "evil", "{entry}");
    let reason = entry["reason"].as_str().expect("a reason");
    assert!(
        reason.contains(
            "spec.destination.namespace: \"demo\" is not the TrafficTarget's own namespace \"evil\""
        ),
        "{reason}"
    );
    assert!(
        !rejected.to_string().contains("mallory-to-evil-echo"),
        "the tenant's own TrafficTarget is valid: {rejected}"
    );
    c.down().expect("cluster down");
}
