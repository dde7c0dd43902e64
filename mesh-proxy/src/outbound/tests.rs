//! Two proxies on loopback: node-a's outbound side of web-0, node-b's inbound side of api-0,
//! an HBONE tunnel between them with certificates of one test CA.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use mesh_core::model::{Endpoint, NodeSnapshot, Protocol, Service, ServicePort, TlsMode, Workload};
use mesh_core::policy::{InboundPolicy, RouteMatch, Rule, TrafficPolicyMode};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::hbone::{Dialer, HBONE_PORT, HboneError, HboneServer, PoolConfig, ServerConfig};
use crate::identity::testing::{TestCa, TestSigner, id, manager};
use crate::inbound::PodInbound;
use crate::telemetry::testing::{encode, sample};
use crate::tls;

mod compat;
mod l7_proxy;
mod same_node;

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const API_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const WAIT: Duration = Duration::from_secs(20);

fn workload(name: &str, sa: &str, ip: Ipv4Addr, node: &str) -> Workload {
    Workload {
        name: NamespacedName::new("shop", name),
        uid: name.into(),
        service_account: sa.into(),
        identity: id(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")),
        node: node.into(),
        ips: vec![ip],
        mode: TlsMode::Strict,
        labels: BTreeMap::new(),
        cgroup: None,
        netns: None,
        ports: vec![],
        excluded_inbound_ports: vec![],
    }
}

struct TwoNodes {
    outbound: Arc<PodOutbound>,
    /// The "15001" listener of web-0: what the datapath would steer its connections to.
    capture: SocketAddr,
    app_connections: Arc<std::sync::atomic::AtomicUsize>,
    results: tokio::sync::mpsc::UnboundedReceiver<Result<Carried, OutboundError>>,
    /// node-a's connection telemetry (web-0 is the source) and its registry.
    source: Telemetry,
    source_metrics: Registry,
    /// node-b's (api-0 is the destination).
    destination_metrics: Registry,
}

/// The labels every web-0 -> api service call carries, whichever side reports it.
const CALL: [(&str, &str); 6] = [
    ("source_workload_namespace", "shop"),
    ("source_principal", WEB),
    ("destination_workload", "api-0"),
    ("destination_principal", API),
    ("mesh_path", "hbone"),
    ("connection_security_policy", "mutual_tls"),
];

fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more).copied().collect()
}

/// Sets up web-0 on node-a and api-0 on node-b; `allowed` is the identity api-0's
/// TrafficTarget lets in.
async fn two_nodes(allowed: &str, egress: Egress) -> TwoNodes {
    two_nodes_with(
        allowed,
        OutboundConfig {
            egress,
            ..OutboundConfig::default()
        },
    )
    .await
}

async fn two_nodes_with(allowed: &str, config: OutboundConfig) -> TwoNodes {
    let ca = TestCa::new("outbound-test-ca");
    let hour = Duration::from_secs(3600);
    let (a_mgr, _) = manager(&TestSigner::new(ca.clone(), hour));
    let (b_mgr, _) = manager(&TestSigner::new(ca, hour));
    a_mgr.fetch(&id(WEB)).await.expect("web certificate");
    b_mgr.fetch(&id(API)).await.expect("api certificate");

    // api-0's application: echoes everything back, then closes.
    let app = TcpListener::bind((API_IP, 0)).await.expect("bind app");
    let app_port = app.local_addr().expect("app address").port();
    let app_connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = app_connections.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });

    let web0 = workload("web-0", "web", Ipv4Addr::new(127, 0, 0, 2), "node-a");
    let api0 = workload("api-0", "api", API_IP, "node-b");
    let service = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(*VIP.ip()),
        ports: vec![ServicePort {
            name: "tcp".into(),
            port: VIP.port(),
            target_port: app_port,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![Endpoint {
            ip: API_IP,
            workload: Some(api0.name.clone()),
            identity: Some(api0.identity.clone()),
            node: Some("node-b".into()),
            ready: true,
        }],
    };
    let node_a = NodeSnapshot {
        node: "node-a".into(),
        workloads: [(web0.name.clone(), web0.clone())].into(),
        services: Arc::new([(service.name.clone(), Arc::new(service))].into()),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };
    let policy = InboundPolicy {
        workload: api0.name.clone(),
        identity: api0.identity.clone(),
        mode: TrafficPolicyMode::DefaultDeny,
        tls_mode: TlsMode::Strict,
        rules: vec![Rule {
            traffic_target: NamespacedName::new("shop", "to-api"),
            sources: vec![id(allowed)],
            ports: vec![app_port],
            route: RouteMatch::Tcp,
        }],
    };
    let node_b = NodeSnapshot {
        node: "node-b".into(),
        workloads: [(api0.name.clone(), api0.clone())].into(),
        policies: [(api0.name.clone(), policy)].into(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };

    // node-b's 15008.
    let mut destination_metrics = Registry::default();
    let inbound = PodInbound {
        pod: api0.name.clone(),
        store: crate::state::holding(&node_b),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        telemetry: Telemetry::new(&mut destination_metrics),
        http: crate::l7::HttpConfig::default(),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
    };
    let tls = tls::server_config(b_mgr, id(API)).expect("server TLS");
    let server = Arc::new(HboneServer::new(tls, inbound, ServerConfig::default()).expect("server"));
    let hbone_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
    let hbone_addr = hbone_listener.local_addr().expect("address");
    tokio::spawn(server.serve(hbone_listener));

    // node-a: api-0's 15008 is on loopback at a test port.
    let dialer: Dialer = Arc::new(move |addr: SocketAddr| {
        assert_eq!(
            addr,
            SocketAddr::from((API_IP, HBONE_PORT)),
            "HBONE goes to the pod's 15008"
        );
        Box::pin(TcpStream::connect(hbone_addr))
    });
    let pool = HbonePool::with_dialer(a_mgr, PoolConfig::default(), dialer).expect("pool");
    let mut source_metrics = Registry::default();
    let source = Telemetry::new(&mut source_metrics);
    let outbound = Arc::new(PodOutbound::new(
        web0.name.clone(),
        crate::state::holding(&node_a),
        pool,
        Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        config,
        source.clone(),
    ));

    let capture = TcpListener::bind("127.0.0.1:0").await.expect("bind 15001");
    let capture_addr = capture.local_addr().expect("address");
    let (tx, results) = tokio::sync::mpsc::unbounded_channel();
    let proxy = outbound.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = capture.accept().await {
            let (proxy, tx) = (proxy.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(proxy.handle(conn, VIP).await);
            });
        }
    });
    TwoNodes {
        outbound,
        capture: capture_addr,
        app_connections,
        results,
        source,
        source_metrics,
        destination_metrics,
    }
}

/// Waits until `f` holds on node-b's metrics (its side ends a moment after node-a's).
async fn destination_eventually(nodes: &TwoNodes, what: &str, f: impl Fn(&str) -> bool) {
    let text = tokio::time::timeout(WAIT, async {
        loop {
            let text = encode(&nodes.destination_metrics);
            if f(&text) {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "node-b's metrics never showed {what}:\n{}",
            encode(&nodes.destination_metrics)
        )
    });
    assert!(f(&text));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_call_crosses_nodes_in_an_hbone_tunnel() {
    let mut nodes = two_nodes(WEB, Egress::Deny).await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut app = TcpStream::connect(nodes.capture).await.expect("connect");
    let (mut r, mut w) = app.split();
    let send = async {
        w.write_all(&payload).await.expect("send");
        w.shutdown().await.expect("half-close");
    };
    let mut echoed = Vec::new();
    let recv = r.read_to_end(&mut echoed);
    let ((), got) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) })
        .await
        .expect("the call completes");
    got.expect("read the echo");
    assert!(echoed == payload, "the echo is the payload, byte for byte");
    let carried = nodes
        .results
        .recv()
        .await
        .expect("result")
        .expect("carried");
    assert_eq!(carried.path, Path::Hbone);
    assert_eq!((carried.sent, carried.received), (1_000_000, 1_000_000));
    assert_eq!(
        nodes
            .outbound
            .connector
            .pool
            .stats()
            .snapshot()
            .streams_opened,
        1
    );

    // node-a reports the call as its source, node-b as its destination, with the same
    // Istio labels; requests count as received, responses as sent, whoever reports.
    let text = encode(&nodes.source_metrics);
    let source = with(
        &CALL,
        &[
            ("reporter", "source"),
            ("source_workload", "web-0"),
            ("destination_service", "api.shop.svc.cluster.local"),
            ("destination_workload_namespace", "shop"),
        ],
    );
    let m = |name: &str, extra: &[(&str, &str)]| sample(&text, name, &with(&source, extra));
    assert_eq!(
        m(
            "istio_tcp_connections_opened_total",
            &[("response_flags", "-")]
        ),
        1,
        "{text}"
    );
    assert_eq!(
        m(
            "istio_tcp_connections_closed_total",
            &[("response_flags", "-")]
        ),
        1,
        "{text}"
    );
    assert_eq!(
        m("istio_tcp_received_bytes_total", &[]),
        1_000_000,
        "{text}"
    );
    assert_eq!(m("istio_tcp_sent_bytes_total", &[]), 1_000_000, "{text}");
    assert!(
        nodes.source.connections().is_empty(),
        "the table is empty again"
    );

    // The destination knows the caller by its certificate only.
    let destination = with(
        &CALL,
        &[("reporter", "destination"), ("source_workload", "unknown")],
    );
    destination_eventually(&nodes, "the closed tunnel", |text| {
        let m = |name: &str| sample(text, name, &destination);
        m("istio_tcp_connections_closed_total") == 1
            && m("istio_tcp_received_bytes_total") == 1_000_000
            && m("istio_tcp_sent_bytes_total") == 1_000_000
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_count_while_the_connection_is_open() {
    let nodes = two_nodes(WEB, Egress::Deny).await;
    let mut app = TcpStream::connect(nodes.capture).await.expect("connect");
    app.write_all(&[7u8; 1000]).await.expect("write");
    let mut echo = [0u8; 1000];
    tokio::time::timeout(WAIT, app.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");

    // Still open: the table and the byte counters show both directions (the proxy counts a
    // write once it completed, which may be just after the application read it).
    let deadline = std::time::Instant::now() + WAIT;
    let conns = loop {
        let conns = nodes.source.connections();
        let counted = conns
            .first()
            .is_some_and(|c| (c.bytes_to_dst, c.bytes_to_src) == (1000, 1000));
        if counted || std::time::Instant::now() > deadline {
            break conns;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(conns.len(), 1, "{conns:?}");
    let c = &conns[0];
    assert_eq!((c.bytes_to_dst, c.bytes_to_src), (1000, 1000));
    assert_eq!(c.direction, "outbound");
    assert_eq!(c.dst.identity, Some(id(API)));
    let text = encode(&nodes.source_metrics);
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &CALL),
        1000,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &CALL),
        1000,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &CALL),
        0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_idle_for_the_timeout_is_closed_and_a_busy_one_is_not() {
    // Long enough that a loaded machine's scheduling delays stay far below it.
    let idle = Duration::from_millis(1000);
    let mut nodes = two_nodes_with(
        WEB,
        OutboundConfig {
            egress: Egress::Deny,
            idle_timeout: idle,
            ..OutboundConfig::default()
        },
    )
    .await;
    let ping = |mut s: TcpStream| async move {
        s.write_all(b"ping").await.expect("write");
        let mut buf = [0u8; 4];
        tokio::time::timeout(WAIT, s.read_exact(&mut buf))
            .await
            .expect("echo in time")
            .expect("echo");
        s
    };
    let quiet = ping(TcpStream::connect(nodes.capture).await.expect("connect")).await;
    let last_byte = std::time::Instant::now();
    let mut busy = ping(TcpStream::connect(nodes.capture).await.expect("connect")).await;

    // The busy connection carries a byte every 50 ms, well within the timeout, for three
    // timeouts' worth (at least); the quiet one carries nothing.
    let quiet = tokio::spawn(async move {
        let mut quiet = quiet;
        let mut rest = Vec::new();
        let read = tokio::time::timeout(WAIT, quiet.read_to_end(&mut rest)).await;
        (read, rest, last_byte.elapsed())
    });
    let busy_until = std::time::Instant::now() + 3 * idle;
    while std::time::Instant::now() < busy_until {
        busy = ping(busy).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (read, rest, after) = quiet.await.expect("task");
    assert!(read.is_ok(), "the quiet connection was closed");
    assert!(rest.is_empty(), "{rest:?}");
    assert!(after >= idle, "closed after {after:?}, before the timeout");
    let e = nodes
        .results
        .recv()
        .await
        .expect("result")
        .expect_err("idle");
    assert_eq!(e.kind(), "idle_timeout");
    let text = encode(&nodes.source_metrics);
    let idle_closed = with(&CALL, &[("response_flags", "IDLE")]);
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &idle_closed),
        1,
        "{text}"
    );
    let busy = ping(busy).await;
    drop(busy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_call_is_closed_promptly_and_never_reaches_the_app() {
    let mut nodes = two_nodes("spiffe://cluster.local/ns/shop/sa/admin", Egress::Deny).await;
    let mut app = TcpStream::connect(nodes.capture).await.expect("connect");
    let _ = app.write_all(b"let me in").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, app.read_to_end(&mut buf))
        .await
        .expect("closed promptly, not hanging");
    assert!(
        read.is_err() || buf.is_empty(),
        "nothing comes back: {buf:?}"
    );
    let e = nodes
        .results
        .recv()
        .await
        .expect("result")
        .expect_err("refused");
    match e {
        OutboundError::Connect(ConnectError::Tunnel {
            source: HboneError::Refused { status, reason },
            ..
        }) => {
            assert_eq!(status, crate::inbound::DENIED);
            assert!(!reason.contains(WEB), "a plain refusal: {reason}");
        }
        other => panic!("expected a 403, got {other}"),
    }
    assert_eq!(
        nodes
            .app_connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the application never saw a connection"
    );

    // Both sides count the denial: node-b with its policy's reason, node-a with the answer.
    let denied = [
        ("source_principal", WEB),
        ("destination_workload", "api-0"),
        ("destination_workload_namespace", "shop"),
    ];
    let text = encode(&nodes.source_metrics);
    let source = with(
        &denied,
        &[("reporter", "source"), ("reason", "destination_denied")],
    );
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &source),
        1,
        "{text}"
    );
    let closed = with(&CALL, &[("reporter", "source"), ("response_flags", "DENY")]);
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &closed),
        1,
        "{text}"
    );
    let text = encode(&nodes.destination_metrics);
    let destination = with(
        &denied,
        &[("reporter", "destination"), ("reason", "no_traffic_target")],
    );
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &destination),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_outside_the_mesh_follow_the_egress_setting() {
    let nodes = two_nodes(WEB, Egress::Deny).await;
    // 127.0.0.3 is no pod's address: outside the mesh.
    let outside = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 3), 9);
    let (client, server) = loopback_pair().await;
    let e = nodes
        .outbound
        .handle(server, outside)
        .await
        .expect_err("egress denied");
    assert_eq!(e.kind(), "egress_denied");
    drop(client);
    let text = encode(&nodes.source_metrics);
    let denied = [("reporter", "source"), ("reason", "egress_denied")];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &denied),
        1,
        "{text}"
    );

    let nodes = two_nodes(WEB, Egress::Allow).await;
    let sink = TcpListener::bind("127.0.0.3:0").await.expect("bind");
    let SocketAddr::V4(sink_addr) = sink.local_addr().expect("addr") else {
        unreachable!("bound to IPv4")
    };
    tokio::spawn(async move {
        if let Ok((mut s, _)) = sink.accept().await {
            let _ = s.write_all(b"outside").await;
        }
    });
    let (mut client, server) = loopback_pair().await;
    let handled = tokio::spawn({
        let o = nodes.outbound.clone();
        async move { o.handle(server, sink_addr).await }
    });
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.expect("read");
    assert_eq!(got, b"outside");
    drop(client);
    let carried = handled.await.expect("task").expect("carried");
    assert_eq!(carried.path, Path::Direct);
    let text = encode(&nodes.source_metrics);
    let direct = [
        ("reporter", "source"),
        ("mesh_path", "direct"),
        ("connection_security_policy", "none"),
        ("destination_principal", "unknown"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &direct),
        1,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &direct[..4]),
        7,
        "{text}"
    );
}

async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.expect("connect"), s.expect("accept").0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_refuses_with_a_clear_error() {
    let mut nodes = two_nodes_with(
        WEB,
        OutboundConfig {
            egress: Egress::Deny,
            max_connections: 1,
            ..OutboundConfig::default()
        },
    )
    .await;
    // The first connection stays open (the app echoes until we half-close).
    let mut first = TcpStream::connect(nodes.capture).await.expect("connect");
    first.write_all(b"ping").await.expect("write");
    let mut buf = [0u8; 4];
    tokio::time::timeout(WAIT, first.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    // The second is refused while the first is open.
    let _second = TcpStream::connect(nodes.capture).await.expect("connect");
    let e = tokio::time::timeout(WAIT, nodes.results.recv())
        .await
        .expect("a result in time")
        .expect("result")
        .expect_err("over the cap");
    assert_eq!(e.kind(), "connection_cap");
    assert!(e.to_string().contains("(the cap)"), "{e}");
    let text = encode(&nodes.source_metrics);
    let overflow = [("reporter", "source"), ("response_flags", "UO")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &overflow),
        1,
        "{text}"
    );
    drop(first);
}
