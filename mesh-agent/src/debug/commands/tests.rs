use super::flows::flow_header;
use super::*;
use crate::admin::flows::{FlowRecord, KernelSide, ProxySide};

fn proxy(direction: &str, verdict: &str, reason: Option<&str>) -> ProxySide {
    ProxySide {
        conn_id: 1,
        direction: direction.into(),
        path: "hbone".into(),
        src_addr: None,
        dst_addr: "10.244.2.12:9000".into(),
        src_workload: None,
        src_namespace: Some("demo".into()),
        src_identity: Some("spiffe://cluster.local/ns/demo/sa/intruder".into()),
        dst_workload: Some("echo".into()),
        dst_namespace: Some("demo".into()),
        dst_identity: Some("spiffe://cluster.local/ns/demo/sa/echo".into()),
        service: None,
        opened_unix_ms: 0,
        duration_ms: 3,
        bytes_to_dst: 0,
        bytes_to_src: 0,
        verdict: verdict.into(),
        reason: reason.map(Into::into),
        flags: if verdict == "denied" { "DENY" } else { "-" }.into(),
        detail: None,
    }
}

#[test]
fn a_flow_is_one_line_that_says_who_and_why() {
    let r = FlowRecord {
        seq: 1,
        unix_ms: 3_723_004,
        pod: Some("demo/echo".into()),
        kernel: None,
        proxy: Some(proxy("inbound", "denied", Some("no_traffic_target"))),
        probe: false,
    };
    let line = flow_line(&r);
    assert!(line.starts_with("01:02:03.004  demo/echo"), "{line}");
    assert!(line.contains("  <- ns/demo/sa/intruder "), "{line}");
    assert!(line.ends_with("DENIED no_traffic_target"), "{line}");

    let r = FlowRecord {
        proxy: None,
        kernel: Some(KernelSide {
            unix_ms: 0,
            src: "10.90.0.10:40000".into(),
            dst: "10.244.2.12:9000".into(),
            verdict: "passthrough".into(),
        }),
        ..r
    };
    let line = flow_line(&r);
    assert!(
        line.ends_with("kernel     passthrough to port 9000"),
        "{line}"
    );
    for l in [flow_line(&r), flow_header()] {
        assert!(l.chars().count() <= render::WIDTH, "{l}");
    }
}

#[test]
fn pods_are_picked_by_full_or_unique_short_name() {
    let pod = |name: &str| PodView {
        name: name.into(),
        ip: [10, 0, 0, 1].into(),
        mode: "STRICT".into(),
        inbound_ports: vec![],
        excluded_inbound_ports: vec![],
        enroll_error: None,
        iface: "eth0".into(),
        cgroup: String::new(),
        netns: String::new(),
        kernel: None,
        kernel_error: None,
        identity: None,
        service_account: None,
        open_outbound: 0,
        open_inbound: 0,
    };
    let all = vec![pod("demo/web"), pod("demo/echo"), pod("other/echo")];
    assert_eq!(pick_pod(&all, "web").expect("unique").name, "demo/web");
    assert_eq!(
        pick_pod(&all, "other/echo").expect("full").name,
        "other/echo"
    );
    let e = pick_pod(&all, "echo").expect_err("ambiguous");
    assert_eq!(e.code, EXIT_USAGE);
    let e = pick_pod(&all, "nope").expect_err("unknown");
    assert!(
        e.message.contains("demo/web, demo/echo, other/echo"),
        "{}",
        e.message
    );
}
