use super::*;
use crate::resource::parse_yaml_stream;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("valid trust domain")
}

fn load(index: &mut Index, yaml: &str) {
    for r in parse_yaml_stream(yaml) {
        index.apply("test.yaml", r.expect("valid test resource"));
    }
}

fn nn(ns: &str, name: &str) -> NamespacedName {
    NamespacedName::new(ns, name)
}

fn pod(ns: &str, name: &str, extra_meta: &str, node: Option<&str>, ip: Option<&str>) -> String {
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    let ip = ip
        .map(|ip| format!("status:\n  podIP: {ip}\n"))
        .unwrap_or_default();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n{extra_meta}spec:\n  serviceAccountName: {name}-sa\n{node}  containers: [{{name: app, image: app}}]\n{ip}"
    )
}

const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: meshed
  labels: {mesh.io/enrolled: "true"}
---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: v1
kind: Namespace
metadata:
  name: lenient
  labels: {mesh.io/enrolled: "true"}
  annotations: {mesh.io/tls-mode: permissive}
"#;

#[test]
fn enrollment_by_namespace_label_and_pod_opt_out() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    let opted_out = "  labels: {mesh.io/enrolled: \"false\"}\n";
    let opted_in = "  labels: {mesh.io/enrolled: \"true\"}\n";
    load(
        &mut index,
        &[
            pod("meshed", "a", "", Some("n1"), Some("10.0.0.1")),
            pod("meshed", "out", opted_out, Some("n1"), Some("10.0.0.2")),
            pod("plain", "b", "", Some("n1"), Some("10.0.0.3")),
            pod("plain", "in", opted_in, Some("n2"), Some("10.0.0.4")),
            pod("nowhere", "c", "", Some("n1"), Some("10.0.0.5")),
        ]
        .concat(),
    );
    let meshed = |ns, name| index.workload(&nn(ns, name), &td()).is_some();
    assert!(meshed("meshed", "a"));
    assert!(!meshed("meshed", "out"), "the pod's own label opts out");
    assert!(!meshed("plain", "b"));
    assert!(meshed("plain", "in"), "the pod's own label opts in");
    assert!(
        !meshed("nowhere", "c"),
        "no Namespace object, no label: not meshed"
    );
    assert_eq!(
        index.nodes(),
        BTreeSet::from(["n1".to_string(), "n2".to_string()])
    );

    // Host-network pods are never meshed.
    let host = pod("meshed", "host", "", Some("n3"), Some("192.168.0.3"))
        .replace("spec:\n", "spec:\n  hostNetwork: true\n");
    load(&mut index, &host);
    assert!(index.workload(&nn("meshed", "host"), &td()).is_none());
    assert!(!index.nodes().contains("n3"));
}

#[test]
fn workload_fields() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    let meta = "  annotations:\n    mesh.io/cgroup: /sys/fs/cgroup/victim\n    mesh.io/netns: /run/netns/victim\n";
    load(
        &mut index,
        &pod("meshed", "loc", meta, Some("n1"), Some("10.0.0.12")),
    );
    let w = index
        .workload(&nn("meshed", "loc"), &td())
        .expect("a workload");
    assert_eq!(
        (w.cgroup, w.netns),
        (None, None),
        "pod annotations locate nothing unless the source is the operator's own"
    );
    index.set_locates_pods(true);
    let meta = "  uid: \"1234\"\n  labels: {app: web}\n  annotations:\n    mesh.io/cgroup: /sys/fs/cgroup/mesh/web\n    mesh.io/netns: /run/netns/web\n";
    let yaml = pod("meshed", "web", meta, Some("n1"), None)
        + "status:\n  podIP: 10.0.0.9\n  podIPs: [{ip: 'fd00::9'}, {ip: 10.0.0.9}, {ip: 10.0.1.9}]\n";
    load(&mut index, &yaml);
    let w = index
        .workload(&nn("meshed", "web"), &td())
        .expect("a workload");
    assert_eq!(w.uid, "1234");
    assert_eq!(w.service_account, "web-sa");
    assert_eq!(
        w.identity.to_string(),
        "spiffe://cluster.local/ns/meshed/sa/web-sa"
    );
    assert_eq!(w.node, "n1");
    assert_eq!(
        w.ips,
        [Ipv4Addr::new(10, 0, 0, 9), Ipv4Addr::new(10, 0, 1, 9)]
    );
    assert_eq!(w.mode, TlsMode::Strict);
    assert_eq!(w.labels.get("app").map(String::as_str), Some("web"));
    assert_eq!(w.cgroup.as_deref(), Some("/sys/fs/cgroup/mesh/web"));
    assert_eq!(w.netns.as_deref(), Some("/run/netns/web"));
    assert!(w.ports.is_empty(), "no declared ports");

    // Declared TCP ports of every container, sorted, once each; UDP ones left out.
    let yaml = pod("meshed", "ports", "", Some("n1"), Some("10.0.0.11")).replace(
        "  containers: [{name: app, image: app}]\n",
        "  containers:\n  - {name: app, image: app, ports: [{containerPort: 8080}, {containerPort: 53, protocol: UDP}]}\n  - {name: side, image: side, ports: [{containerPort: 9090, protocol: TCP}, {containerPort: 8080}]}\n",
    );
    load(&mut index, &yaml);
    let w = index
        .workload(&nn("meshed", "ports"), &td())
        .expect("a workload");
    assert_eq!(w.ports, [8080, 9090]);

    // serviceAccountName missing: "default".
    load(
        &mut index,
        &pod("meshed", "d", "", Some("n1"), Some("10.0.0.10"))
            .replace("  serviceAccountName: d-sa\n", ""),
    );
    let w = index
        .workload(&nn("meshed", "d"), &td())
        .expect("a workload");
    assert_eq!(w.service_account, "default");
}

#[test]
fn workloads_need_a_node_an_ipv4_address_and_to_be_alive() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    load(
        &mut index,
        &[
            pod("meshed", "unscheduled", "", None, Some("10.0.0.1")),
            pod("meshed", "no-ip", "", Some("n1"), None),
            pod("meshed", "v6", "", Some("n1"), Some("fd00::1")),
            pod("meshed", "done", "", Some("n1"), Some("10.0.0.2")) + "  phase: Succeeded\n",
        ]
        .concat(),
    );
    for name in ["unscheduled", "no-ip", "v6", "done"] {
        assert!(
            index.workload(&nn("meshed", name), &td()).is_none(),
            "{name}"
        );
    }
    // A pod without an address yet may still get its certificate.
    let id =
        |name: &str| SpiffeId::workload(&td(), "meshed", &format!("{name}-sa")).expect("valid");
    assert!(index.pod_on_node(&id("no-ip"), "n1"));
    assert!(!index.pod_on_node(&id("done"), "n1"), "terminated");
    assert!(!index.pod_on_node(&id("unscheduled"), "n1"));
}

#[test]
fn tls_mode_pod_wins_over_namespace() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    let strict = "  annotations: {mesh.io/tls-mode: strict}\n";
    let bogus = "  annotations: {mesh.io/tls-mode: sometimes}\n";
    load(
        &mut index,
        &[
            pod("lenient", "a", "", Some("n1"), Some("10.0.0.1")),
            pod("lenient", "b", strict, Some("n1"), Some("10.0.0.2")),
            pod("meshed", "c", "", Some("n1"), Some("10.0.0.3")),
            pod("meshed", "d", bogus, Some("n1"), Some("10.0.0.4")),
        ]
        .concat(),
    );
    let mode = |ns, name| index.workload(&nn(ns, name), &td()).expect("workload").mode;
    assert_eq!(mode("lenient", "a"), TlsMode::Permissive);
    assert_eq!(mode("lenient", "b"), TlsMode::Strict);
    assert_eq!(mode("meshed", "c"), TlsMode::Strict);
    assert_eq!(
        mode("meshed", "d"),
        TlsMode::Strict,
        "unknown values are ignored"
    );
    index.revalidate();
    let rejections = index.rejections();
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(
        rejections[0].key,
        Some(ResourceKey::new(Kind::Pod, "meshed", "d"))
    );
    assert!(
        rejections[0]
            .reason
            .contains("\"sometimes\" is not strict or permissive")
    );
}

#[test]
fn excluded_inbound_ports_come_from_the_annotation_and_a_bad_value_excludes_nothing() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    let good = "  annotations: {mesh.io/exclude-inbound-ports: \"9101, 9100,9101\"}\n";
    let bad = [
        "  annotations: {mesh.io/exclude-inbound-ports: \"9100,metrics\"}\n",
        "  annotations: {mesh.io/exclude-inbound-ports: \"70000\"}\n",
        "  annotations: {mesh.io/exclude-inbound-ports: \"0\"}\n",
        "  annotations: {mesh.io/exclude-inbound-ports: \"9100,15008\"}\n",
    ];
    load(
        &mut index,
        &pod("meshed", "good", good, Some("n1"), Some("10.0.0.1")),
    );
    load(
        &mut index,
        &pod("meshed", "none", "", Some("n1"), Some("10.0.0.2")),
    );
    for (i, meta) in bad.iter().enumerate() {
        let name = format!("bad{i}");
        let ip = format!("10.0.0.{}", 10 + i);
        load(
            &mut index,
            &pod("meshed", &name, meta, Some("n1"), Some(&ip)),
        );
    }
    let excluded = |name: &str| {
        index
            .workload(&nn("meshed", name), &td())
            .expect("still a workload")
            .excluded_inbound_ports
    };
    assert_eq!(excluded("good"), [9100, 9101]);
    assert!(excluded("none").is_empty());
    for i in 0..bad.len() {
        assert!(
            excluded(&format!("bad{i}")).is_empty(),
            "a bad annotation excludes nothing: every port stays covered"
        );
    }
    index.revalidate();
    let reasons: Vec<String> = index.rejections().into_iter().map(|r| r.reason).collect();
    assert_eq!(reasons.len(), bad.len(), "{reasons:?}");
    for r in &reasons {
        assert!(r.contains("mesh.io/exclude-inbound-ports"), "{r}");
        assert!(r.contains("no port is excluded"), "{r}");
    }
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("\"metrics\" is not a port"))
    );
    assert!(reasons.iter().any(|r| r.contains("15008")));
}

#[test]
fn pod_on_node_checks_namespace_service_account_and_node() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    load(
        &mut index,
        &[
            pod("meshed", "web", "", Some("n1"), Some("10.0.0.1")),
            pod("plain", "web", "", Some("n1"), Some("10.0.0.2")),
        ]
        .concat(),
    );
    let web = SpiffeId::workload(&td(), "meshed", "web-sa").expect("valid");
    assert!(index.pod_on_node(&web, "n1"));
    assert!(!index.pod_on_node(&web, "n2"), "another node");
    let plain = SpiffeId::workload(&td(), "plain", "web-sa").expect("valid");
    assert!(!index.pod_on_node(&plain, "n1"), "not enrolled");
    let other = SpiffeId::workload(&td(), "meshed", "api-sa").expect("valid");
    assert!(!index.pod_on_node(&other, "n1"), "another service account");
    assert!(!index.pod_on_node(&SpiffeId::node(&td(), "n1").expect("valid"), "n1"));

    // The pod moves: the node index follows.
    load(
        &mut index,
        &pod("meshed", "web", "", Some("n2"), Some("10.0.0.1")),
    );
    assert!(!index.pod_on_node(&web, "n1"));
    assert!(index.pod_on_node(&web, "n2"));
    assert!(index.remove(&ResourceKey::new(Kind::Pod, "meshed", "web")));
    assert!(!index.pod_on_node(&web, "n2"));
    assert!(index.nodes().is_empty());
}

#[test]
fn apply_remove_and_revisions() {
    let mut index = Index::new();
    load(&mut index, NAMESPACES);
    let r0 = index.revision();
    load(&mut index, NAMESPACES);
    assert_eq!(
        index.revision(),
        r0,
        "re-applying equal resources changes nothing"
    );
    assert_eq!(index.len(), 3);
    let key = ResourceKey::new(Kind::Namespace, "", "plain");
    assert_eq!(index.origin(&key), Some("test.yaml"));
    assert!(index.get(&key).is_some());

    // The same resource from another origin takes it over.
    let ns = index.get(&key).expect("present");
    assert!(index.apply("other.yaml", ns));
    assert_eq!(index.origin(&key), Some("other.yaml"));
    assert!(index.remove(&key));
    assert!(!index.remove(&key));
    assert!(!index.contains(&key));
    assert_eq!(index.summary().resources[&Kind::Namespace], 2);
}

#[test]
fn rejections_are_recorded_and_cleared() {
    let mut index = Index::new();
    let key = ResourceKey::new(Kind::Namespace, "", "plain");
    index.record_rejection("a.yaml", None, "document 2: invalid YAML");
    index.record_rejection("a.yaml", Some(key.clone()), "bad");
    index.record_rejection("b.yaml", None, "unknown kind");
    assert_eq!(index.rejections().len(), 3);
    let r = index.revision();
    index.record_rejection("b.yaml", None, "unknown kind");
    assert_eq!(
        index.revision(),
        r,
        "recording the same rejection is no change"
    );

    // Applying the resource from the same origin clears its rejection.
    load_as(&mut index, "a.yaml", NAMESPACES);
    let left: Vec<_> = index.rejections().into_iter().map(|r| r.reason).collect();
    assert_eq!(left, ["document 2: invalid YAML", "unknown kind"]);
    assert!(index.clear_rejection("b.yaml", None));
    index.clear_rejections_from("a.yaml");
    assert!(index.rejections().is_empty());
    let json = serde_json::to_value(Rejection {
        origin: "a.yaml".into(),
        key: Some(key),
        reason: "r".into(),
    })
    .expect("serialize");
    assert_eq!(json["key"]["kind"], "Namespace");
}

fn load_as(index: &mut Index, origin: &str, yaml: &str) {
    for r in parse_yaml_stream(yaml) {
        index.apply(origin, r.expect("valid"));
    }
}

#[tokio::test]
async fn shared_index_bumps_the_generation_and_revalidates() {
    let shared = SharedIndex::new();
    let mut changes = shared.subscribe();
    assert_eq!(shared.generation(), 0);
    let tt = r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules: [{kind: HTTPRouteGroup, name: routes}]
  sources: [{kind: ServiceAccount, name: web}]
"#;
    shared.update(|ix| load(ix, tt));
    assert_eq!(shared.generation(), 1);
    changes.changed().await.expect("notified");
    assert_eq!(*changes.borrow_and_update(), 1);
    let key = ResourceKey::new(Kind::TrafficTarget, "shop", "t");
    {
        let ix = shared.read();
        assert!(ix.is_rejected(&key));
        let rejections = ix.rejections();
        assert_eq!(rejections.len(), 1);
        assert_eq!(rejections[0].origin, "test.yaml");
        assert_eq!(
            rejections[0].reason,
            "spec.rules[0]: HTTPRouteGroup shop/routes does not exist"
        );
    }
    // No change: no new generation.
    shared.update(|ix| load(ix, tt));
    assert_eq!(shared.generation(), 1);
    assert!(!changes.has_changed().expect("sender alive"));

    let routes = "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: routes, namespace: shop}\nspec: {matches: [{name: all}]}\n";
    shared.update(|ix| load(ix, routes));
    assert_eq!(shared.generation(), 2);
    assert!(!shared.read().is_rejected(&key));
    assert!(shared.read().rejections().is_empty());
    assert_eq!(
        shared
            .read()
            .traffic_targets_for(&nn("shop", "api"))
            .count(),
        1
    );
    // The group goes away again: the TrafficTarget is rejected again.
    let group = ResourceKey::new(Kind::HttpRouteGroup, "shop", "routes");
    assert!(shared.update(|ix| ix.remove(&group)));
    assert!(shared.read().is_rejected(&key));
    assert_eq!(shared.generation(), 3);
}

#[test]
fn selectors_follow_label_changes() {
    let mut index = Index::new();
    let selector = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let selected = |index: &Index, pairs: &[(&str, &str)]| -> Vec<String> {
        index
            .pods_selected("shop", &selector(pairs))
            .into_iter()
            .map(|(n, _)| n.name.clone())
            .collect()
    };
    let labelled = |labels: &str| format!("  labels: {{{labels}}}\n");
    load(
        &mut index,
        &[
            pod(
                "shop",
                "a",
                &labelled("app: web, tier: front"),
                Some("n1"),
                Some("10.0.0.1"),
            ),
            pod(
                "shop",
                "b",
                &labelled("app: web"),
                Some("n1"),
                Some("10.0.0.2"),
            ),
            pod(
                "other",
                "c",
                &labelled("app: web"),
                Some("n1"),
                Some("10.0.0.3"),
            ),
        ]
        .concat(),
    );
    assert_eq!(selected(&index, &[("app", "web")]), ["a", "b"]);
    assert_eq!(
        selected(&index, &[("app", "web"), ("tier", "front")]),
        ["a"]
    );
    assert!(selected(&index, &[("app", "db")]).is_empty());
    assert!(
        selected(&index, &[]).is_empty(),
        "an empty selector selects nothing"
    );

    load(
        &mut index,
        &pod(
            "shop",
            "a",
            &labelled("app: db"),
            Some("n1"),
            Some("10.0.0.1"),
        ),
    );
    assert_eq!(selected(&index, &[("app", "web")]), ["b"]);
    assert_eq!(selected(&index, &[("app", "db")]), ["a"]);
    assert!(index.remove(&ResourceKey::new(Kind::Pod, "shop", "a")));
    assert!(selected(&index, &[("app", "db")]).is_empty());
    assert_eq!(index.pods_in_namespace("shop").count(), 1);
}
