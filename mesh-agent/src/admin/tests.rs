use std::net::SocketAddr;

use mesh_core::model::{NamespacedName, NodeSnapshot};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use mesh_datapath::config::DatapathConfig;
use mesh_proxy::config::ProxyConfig;
use mesh_proxy::telemetry::{ConnMeta, MeshPath, Metered, Peer, Reporter, Side};

fn config() -> Config {
    Config {
        datapath: DatapathConfig::new("admin-test").expect("instance"),
        controller: None,
        cgroup: None,
        pods: Vec::new(),
        unenroll_on_exit: false,
        uninstall_signal: None,
        handover_socket: None,
        worker_threads: None,
        enroll_from_config: false,
        discover_pods: None,
        proxy: ProxyConfig::default(),
        admin: AdminConfig::default(),
    }
}

/// One HTTP/1.1 request over a fresh TCP connection: (status, body).
async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!("{method} {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut raw = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.read_to_string(&mut raw),
    )
    .await
    .expect("an answer in time")
    .expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_string())
}

async fn serving(state: &Arc<AdminState>, pages: Pages) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, state.clone(), pages));
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_endpoint_serves_metrics_the_connection_table_and_the_config() {
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    let snapshot = NodeSnapshot {
        node: "node-a".into(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };
    let state = Arc::new(AdminState::new(
        config(),
        Some(mesh_proxy::state::holding(&snapshot)),
        None,
        telemetry.clone(),
        registry,
    ));
    let admin = serving(&state, Pages::Admin).await;

    // An open connection that carried 3 bytes.
    let mut meta = ConnMeta::new(
        NamespacedName::new("shop", "web-0"),
        Reporter::Source,
        MeshPath::Direct,
        "10.0.0.9:443".parse().expect("addr"),
    );
    meta.src = Peer::of_pod(&meta.pod);
    let (proxy_end, mut app) = tokio::io::duplex(1024);
    let mut conn = Metered::new(proxy_end, telemetry.open(meta), Side::Source);
    app.write_all(b"abc").await.expect("write");
    let mut buf = [0u8; 3];
    conn.read_exact(&mut buf).await.expect("read");

    assert_eq!(
        request(admin, "GET", "/healthz").await,
        (200, "ok\n".into())
    );

    let (status, body) = request(admin, "GET", "/metrics").await;
    assert_eq!(status, 200);
    let received = body
        .lines()
        .find(|l| l.starts_with("istio_tcp_received_bytes_total{"))
        .expect("the received bytes");
    assert!(received.contains("source_workload=\"web-0\""), "{received}");
    assert!(received.ends_with(" 3"), "{received}");

    let (status, body) = request(admin, "GET", "/debug/conns").await;
    assert_eq!(status, 200);
    let conns: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(conns.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(conns[0]["pod"], "shop/web-0");
    assert_eq!(conns[0]["path"], "direct");
    assert_eq!(conns[0]["dst_addr"], "10.0.0.9:443");
    assert_eq!(conns[0]["bytes_to_dst"], 3);
    assert_eq!(conns[0]["protocol"], "tcp");
    // The commands read the page as its type: every field parses back.
    let typed: Vec<views::OpenConn> = serde_json::from_str(&body).expect("typed connections");
    assert_eq!(typed[0].conn.pod, "shop/web-0");
    assert_eq!(typed[0].conn.direction, "outbound");
    assert_eq!(typed[0].conn.bytes_to_dst, 3);
    assert_eq!(typed[0].protocol, mesh_core::model::Protocol::default());
    // A field the page no longer writes fails to parse instead of reading as a default.
    let renamed = body.replace("\"bytes_to_dst\"", "\"bytes_sent\"");
    assert!(serde_json::from_str::<Vec<views::OpenConn>>(&renamed).is_err());
    let (_, body) = request(admin, "GET", "/debug/conns?pod=shop/other").await;
    assert_eq!(body.trim(), "[]");

    let (status, body) = request(admin, "GET", "/debug/config").await;
    assert_eq!(status, 200);
    let view: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(view["agent"]["proxy"]["idle_timeout"], "1h", "{body}");
    assert_eq!(view["agent"]["datapath"]["instance"], "admin-test");
    assert!(!view["mesh"]["version"].is_null(), "{body}");
    assert_eq!(view["mesh"]["store"]["applied"], 1, "{body}");

    let (status, body) = request(admin, "GET", "/debug/certs").await;
    assert_eq!((status, body.trim()), (200, "[]"));

    assert_eq!(request(admin, "GET", "/debug/nope").await.0, 404);
    assert_eq!(request(admin, "POST", "/metrics").await.0, 405);

    // The metrics listener serves the metrics only.
    let metrics = serving(&state, Pages::Metrics).await;
    let (status, body) = request(metrics, "GET", "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("istio_tcp_connections_opened_total{"),
        "{body}"
    );
    assert_eq!(request(metrics, "GET", "/debug/conns").await.0, 404);

    state.set_draining();
    assert_eq!(
        request(admin, "GET", "/healthz").await,
        (503, "draining\n".into())
    );
    // Not ready, still alive: liveness does not restart a draining or uninstalled agent.
    assert_eq!(request(admin, "GET", "/livez").await, (200, "ok\n".into()));
    state.set_uninstalled();
    assert_eq!(
        request(admin, "GET", "/healthz").await,
        (503, "uninstalled\n".into())
    );
    state.set_draining();
    assert_eq!(
        request(admin, "GET", "/healthz").await,
        (503, "uninstalled\n".into()),
        "draining again does not hide the removal"
    );
    assert_eq!(request(admin, "GET", "/livez").await, (200, "ok\n".into()));
    drop(conn);
}

#[tokio::test]
async fn a_taken_default_address_is_skipped_and_a_taken_given_one_is_an_error() {
    let taken = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = taken.local_addr().expect("addr");
    let default = Listen {
        addr,
        explicit: false,
    };
    assert!(bind(&default, "admin").await.expect("not fatal").is_none());
    let given = Listen {
        addr,
        explicit: true,
    };
    let e = bind(&given, "admin").await.expect_err("fatal");
    assert_eq!(e.kind(), "bind");
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

/// `GET path`: the status and the JSON body.
async fn get_json(addr: SocketAddr, path: String) -> (u16, serde_json::Value) {
    let (status, body) = request(addr, "GET", &path).await;
    let v = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"));
    (status, v)
}

/// A node with `shop/web-0` (identity `shop/sa/web`) whose policy lets `shop/sa/client` in on
/// port 8080, behind the service `shop/web` (10.96.0.10:80 -> 8080).
fn shop() -> NodeSnapshot {
    use mesh_core::SpiffeId;
    use mesh_core::model::{Endpoint, Service, ServicePort, TlsMode, Workload};
    use mesh_core::policy::{InboundPolicy, RouteMatch, Rule, TrafficPolicyMode};
    let id = |sa: &str| {
        format!("spiffe://cluster.local/ns/shop/sa/{sa}")
            .parse::<SpiffeId>()
            .expect("id")
    };
    let web = NamespacedName::new("shop", "web-0");
    let workload = Workload {
        name: web.clone(),
        uid: "uid-web-0".into(),
        service_account: "web".into(),
        identity: id("web"),
        node: "node-a".into(),
        ips: vec![[10, 0, 0, 5].into()],
        mode: TlsMode::Strict,
        labels: Default::default(),
        cgroup: None,
        netns: None,
        ports: vec![8080],
        excluded_inbound_ports: vec![],
    };
    let policy = InboundPolicy {
        workload: web.clone(),
        identity: id("web"),
        mode: TrafficPolicyMode::DefaultDeny,
        tls_mode: TlsMode::Strict,
        rules: vec![Rule {
            traffic_target: NamespacedName::new("shop", "client-to-web"),
            sources: vec![id("client")],
            ports: vec![8080],
            route: RouteMatch::Tcp,
        }],
    };
    let service = Service {
        name: NamespacedName::new("shop", "web"),
        vip: Some([10, 96, 0, 10].into()),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
            protocol: Default::default(),
        }],
        endpoints: vec![Endpoint {
            ip: [10, 0, 0, 5].into(),
            workload: Some(web.clone()),
            identity: Some(id("web")),
            node: Some("node-a".into()),
            ready: true,
        }],
    };
    NodeSnapshot {
        node: "node-a".into(),
        workloads: [(web.clone(), workload)].into_iter().collect(),
        services: Arc::new(
            [(service.name.clone(), Arc::new(service))]
                .into_iter()
                .collect(),
        ),
        policies: [(web, policy)].into_iter().collect(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_pages_answer_policy_questions_with_the_proxys_decision() {
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    let state = Arc::new(AdminState::new(
        config(),
        Some(mesh_proxy::state::holding(&shop())),
        None,
        telemetry.clone(),
        registry,
    ));
    let admin = serving(&state, Pages::Admin).await;
    let get = |path: &str| get_json(admin, path.to_string());

    let (status, v) = get("/debug/policy/shop/web-0").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["policy"]["rules"][0]["traffic_target"]["name"],
        "client-to-web"
    );

    let (status, v) = get("/debug/policy/shop/nope").await;
    assert_eq!(status, 404);
    assert_eq!(v["kind"], "not_found");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("shop/web-0")),
        "{v}"
    );

    // Allowed through the service (port 80 is 8080 on the pod), by its TrafficTarget.
    let (status, v) = get(
        "/debug/policy/check?from=spiffe%3A%2F%2Fcluster.local%2Fns%2Fshop%2Fsa%2Fclient&to=shop/web:80",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["verdict"], "allowed");
    assert_eq!(v["decisions"][0]["port"], 8080);
    assert_eq!(v["decisions"][0]["traffic_target"], "shop/client-to-web");

    // Denied with the kind the proxy records as the reason.
    let (_, v) =
        get("/debug/policy/check?from=spiffe://cluster.local/ns/shop/sa/other&to=10.0.0.5:8080")
            .await;
    assert_eq!(v["verdict"], "denied");
    assert_eq!(v["decisions"][0]["kind"], "no_traffic_target");
    let (_, v) = get("/debug/policy/check?from=plaintext&to=shop/web-0:8080").await;
    assert_eq!(v["decisions"][0]["kind"], "plaintext_strict");
    let (_, v) =
        get("/debug/policy/check?from=spiffe://cluster.local/ns/shop/sa/client&to=shop/web-0:9090")
            .await;
    assert_eq!(v["decisions"][0]["kind"], "port_not_covered");

    // Questions that name nothing, or are incomplete.
    let (status, v) = get("/debug/policy/check?from=shop/ghost&to=shop/web:80").await;
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("spiffe://")),
        "{v}"
    );
    let (status, _) = get("/debug/policy/check?from=plaintext&to=shop/web-0").await;
    assert_eq!(status, 400, "a pod needs a port");
    let (status, _) = get("/debug/policy/check?to=shop/web-0:8080").await;
    assert_eq!(status, 400);

    // Flows: the proxy's records (no kernel here, and it says so).
    telemetry.denied(
        ConnMeta::new(
            NamespacedName::new("shop", "web-0"),
            Reporter::Destination,
            MeshPath::Hbone,
            "10.0.0.5:8080".parse().expect("addr"),
        ),
        "no_traffic_target",
        "no TrafficTarget",
    );
    let (status, v) = get("/debug/flows?pod=shop/web-0").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["records"][0]["proxy"]["reason"], "no_traffic_target",
        "{v}"
    );
    assert!(v["kernel_error"].is_string(), "{v}");
    let next = v["next"].as_u64().expect("next");
    let (_, v) = get(&format!("/debug/flows?after={next}")).await;
    assert_eq!(v["records"].as_array().map(Vec::len), Some(0), "{v}");
    let (status, _) = get("/debug/flows?after=soon").await;
    assert_eq!(status, 400);
}
