//! Two proxies on loopback: node-a's outbound side of web-0, node-b's inbound side of api-0,
//! an HBONE tunnel between them with certificates of one test CA.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use mesh_core::model::{Endpoint, NodeSnapshot, Protocol, Service, ServicePort, TlsMode, Workload};
use mesh_core::policy::{InboundPolicy, RouteMatch, Rule, TrafficPolicyMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::hbone::{Dialer, HboneServer, PoolConfig, ServerConfig};
use crate::identity::testing::{TestCa, TestSigner, id, manager};
use crate::inbound::PodInbound;
use crate::tls;

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
    }
}

struct TwoNodes {
    outbound: Arc<PodOutbound>,
    /// The "15001" listener of web-0: what the datapath would steer its connections to.
    capture: SocketAddr,
    app_connections: Arc<std::sync::atomic::AtomicUsize>,
    results: tokio::sync::mpsc::UnboundedReceiver<Result<Carried, OutboundError>>,
}

/// Sets up web-0 on node-a and api-0 on node-b; `allowed` is the identity api-0's
/// TrafficTarget lets in.
async fn two_nodes(allowed: &str, egress: Egress) -> TwoNodes {
    two_nodes_capped(allowed, egress, DEFAULT_MAX_CONNECTIONS).await
}

async fn two_nodes_capped(allowed: &str, egress: Egress, cap: usize) -> TwoNodes {
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
    let inbound = PodInbound {
        pod: api0.name.clone(),
        store: crate::state::holding(&node_b),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
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
    let outbound = Arc::new(PodOutbound::new(
        web0.name.clone(),
        crate::state::holding(&node_a),
        pool,
        Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        egress,
        cap,
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
    }
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
    assert_eq!(nodes.outbound.pool.stats().snapshot().streams_opened, 1);
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
        OutboundError::Tunnel {
            source: HboneError::Refused { status, reason },
            ..
        } => {
            assert_eq!(status, crate::inbound::DENIED);
            assert!(reason.contains(WEB), "{reason}");
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
}

async fn loopback_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    (c.expect("connect"), s.expect("accept").0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_refuses_with_a_clear_error() {
    let mut nodes = two_nodes_capped(WEB, Egress::Deny, 1).await;
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
    drop(first);
}
