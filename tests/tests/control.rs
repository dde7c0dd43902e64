//! The control plane in process: a controller on a local directory of YAML and two agents'
//! configuration stores, over gRPC with mTLS on 127.0.0.1.

use std::time::Duration;

use mesh_core::model::{NamespacedName, TlsMode};
use mesh_tests::inprocess::{ClusterDir, TestAgent, eventually, free_port, namespace, pod};

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
spec:
  clusterIP: 10.96.0.10
  selector:
    app: api
  ports:
  - name: http
    port: 80
    targetPort: 8080
";

const TARGET: &str = "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata:
  name: web-to-api
  namespace: shop
spec:
  destination:
    kind: ServiceAccount
    name: api
    namespace: shop
  rules:
  - kind: TCPRoute
    name: api-tcp
  sources:
  - kind: ServiceAccount
    name: web
    namespace: shop
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata:
  name: api-tcp
  namespace: shop
spec:
  matches:
    ports:
    - 8080
";

fn cluster() -> ClusterDir {
    let c = ClusterDir::new();
    c.write("ns.yaml", &namespace("shop"));
    c.write(
        "web.yaml",
        &pod("shop", "web-0", "node-a", "10.1.0.5", "web", "web", ""),
    );
    c.write(
        "api.yaml",
        &pod("shop", "api-0", "node-b", "10.2.0.7", "api", "api", ""),
    );
    c.write("svc.yaml", SERVICE);
    c.write("policy.yaml", TARGET);
    c
}

fn api0() -> NamespacedName {
    NamespacedName::new("shop", "api-0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_node_config_follows_the_directory_and_survives_controller_restart() {
    let dir = cluster();
    let addr = free_port();
    let controller = dir.start(addr, &[]).await;
    let a = TestAgent::start(&controller, "node-a").await;
    let b = TestAgent::start(&controller, "node-b").await;

    // Each node gets its own workloads, the services, and its workloads' policy.
    let snap_b = eventually(Duration::from_secs(10), "node-b's first snapshot", || {
        let c = b.store.current();
        c.version.map(|_| c)
    })
    .await;
    assert_eq!(
        snap_b.snapshot.workloads.keys().collect::<Vec<_>>(),
        vec![&api0()]
    );
    let policy = &snap_b.snapshot.policies[&api0()];
    assert_eq!(policy.rules.len(), 1);
    assert_eq!(
        policy.rules[0].sources[0].to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(policy.rules[0].ports, vec![8080]);
    let svc = &snap_b.snapshot.services[&NamespacedName::new("shop", "api")];
    assert_eq!(svc.vip, Some([10, 96, 0, 10].into()));
    assert_eq!(svc.endpoints[0].ip, std::net::Ipv4Addr::new(10, 2, 0, 7));
    assert_eq!(
        snap_b.snapshot.trust_bundle,
        vec![controller.roots_pem.clone()]
    );
    let snap_a = eventually(Duration::from_secs(10), "node-a's first snapshot", || {
        let c = a.store.current();
        c.version.map(|_| c)
    })
    .await;
    assert_eq!(
        snap_a.snapshot.workloads.keys().collect::<Vec<_>>(),
        vec![&NamespacedName::new("shop", "web-0")]
    );
    // Both ACKed: the controller shows it.
    eventually(Duration::from_secs(5), "both ACKs", || {
        let nodes = controller.server.node_status();
        (nodes.len() == 2
            && nodes
                .values()
                .all(|n| n.acked.is_some() && n.pending.is_none()))
        .then_some(())
    })
    .await;

    // Editing api-0 changes node-b's configuration within a second; node-a gets nothing.
    let a_version = a.store.current().version;
    let b_version = b.store.current().version;
    let edited = std::time::Instant::now();
    dir.write(
        "api.yaml",
        &pod(
            "shop",
            "api-0",
            "node-b",
            "10.2.0.7",
            "api",
            "api",
            "mesh.io/tls-mode: permissive",
        ),
    );
    eventually(Duration::from_secs(1), "node-b's update", || {
        let c = b.store.current();
        (c.version != b_version && c.snapshot.workloads[&api0()].mode == TlsMode::Permissive)
            .then_some(())
    })
    .await;
    let latency = edited.elapsed();
    assert!(latency < Duration::from_secs(1), "update took {latency:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.store.current().version,
        a_version,
        "node-a received no update"
    );
    assert_eq!(
        a.store.stats().applied,
        1,
        "node-a applied only its first snapshot"
    );
    assert_eq!(a.store.current().version, a_version);

    // node-a's stream breaks and comes back: it resumes from the version it holds, so a
    // change made meanwhile arrives as a delta, not a full snapshot.
    let mut a = a;
    a.reconnect();
    dir.write(
        "web.yaml",
        &pod("shop", "web-0", "node-a", "10.1.0.5", "web", "web-v2", ""),
    );
    eventually(
        Duration::from_secs(5),
        "node-a's delta after reconnect",
        || {
            let c = a.store.current();
            let w = &c.snapshot.workloads[&NamespacedName::new("shop", "web-0")];
            (w.labels.get("app").map(String::as_str) == Some("web-v2")).then_some(())
        },
    )
    .await;
    let stats = a.store.stats();
    assert_eq!(
        stats.full_snapshots, 1,
        "only the first update was a full snapshot: {stats:?}"
    );

    // The controller goes away: both agents keep their last configuration.
    let before_a = a.store.current();
    let before_b = b.store.current();
    controller.shutdown().await;
    eventually(Duration::from_secs(5), "agents notice", || {
        (!a.client.status().connected && !b.client.status().connected).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.store.current().snapshot, before_a.snapshot);
    assert_eq!(b.store.current().snapshot, before_b.snapshot);

    // A change while the controller is down, then a restart on the same address: the agents
    // reconnect and resync (a new epoch means a full snapshot).
    dir.write(
        "web.yaml",
        &pod("shop", "web-0", "node-a", "10.1.0.6", "web", "web", ""),
    );
    let controller = dir.start(addr, &[]).await;
    let resynced = eventually(Duration::from_secs(10), "node-a resyncs", || {
        let c = a.store.current();
        let w = &c.snapshot.workloads[&NamespacedName::new("shop", "web-0")];
        (w.ips == vec![std::net::Ipv4Addr::new(10, 1, 0, 6)]).then_some(c)
    })
    .await;
    assert_ne!(
        resynced.version.map(|v| v.epoch),
        before_a.version.map(|v| v.epoch),
        "a new controller epoch"
    );
    eventually(Duration::from_secs(10), "node-b resyncs", || {
        let c = b.store.current();
        (c.version.map(|v| v.epoch) == resynced.version.map(|v| v.epoch)).then_some(())
    })
    .await;
    assert_eq!(
        b.store.current().snapshot,
        before_b.snapshot,
        "node-b's content unchanged"
    );
    assert_eq!(
        b.store.current().snapshot.trust_bundle,
        vec![controller.roots_pem.clone()],
        "same trust root after restart"
    );
    controller.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_resources_are_rejected_and_the_rest_stays_in_force() {
    let dir = cluster();
    let controller = dir.start("127.0.0.1:0".parse().expect("addr"), &[]).await;
    let b = TestAgent::start(&controller, "node-b").await;
    eventually(Duration::from_secs(10), "first snapshot", || {
        b.store.current().version.map(|_| ())
    })
    .await;

    // A second TrafficTarget that names a route group that does not exist, plus garbage.
    dir.write(
        "bad.yaml",
        "apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata:
  name: broken
  namespace: shop
spec:
  destination:
    kind: ServiceAccount
    name: api
    namespace: shop
  rules:
  - kind: HTTPRouteGroup
    name: does-not-exist
  sources:
  - kind: ServiceAccount
    name: admin
    namespace: shop
---
apiVersion: example.com/v1
kind: Widget
metadata:
  name: w
",
    );
    dir.write("garbage.yaml", ": : not yaml [\n");
    let rejected = eventually(Duration::from_secs(5), "rejections", || {
        let r = controller.index.read().rejections();
        (r.len() >= 3).then_some(r)
    })
    .await;
    let text = serde_json::to_string(&rejected).expect("json");
    assert!(text.contains("does-not-exist"), "{text}");
    assert!(text.contains("Widget"), "{text}");
    assert!(text.contains("bad.yaml"), "{text}");
    assert!(text.contains("garbage.yaml"), "{text}");

    // The admin endpoint shows the same.
    let body = http_get(controller.admin_addr, "/debug/rejected").await;
    assert!(body.contains("does-not-exist"), "{body}");

    // The valid TrafficTarget is still in force for api-0.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = b.store.current();
    let rules = &c.snapshot.policies[&api0()].rules;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        rules[0].traffic_target,
        NamespacedName::new("shop", "web-to-api")
    );
    controller.shutdown().await;
}

/// A tiny HTTP/1.0 GET, enough for the admin endpoint.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect admin");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: admin\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    assert!(
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200"),
        "{out}"
    );
    out
}
