//! One agent serving web-0 and api-0: web-0's calls to api-0 are carried inside the agent,
//! admitted by api-0's policy with web-0's configured identity, unless the setting says
//! `hbone`. api-0 also serves HBONE, so a tunnel would be seen if one were opened.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::config::SameNode;
use crate::local::{LocalPod, LocalPods, Registration};

const WEB_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The labels every same-node web-0 -> api-0 call carries, whichever side reports it: the
/// destination knows the caller's workload too, from the configuration.
const LOCAL_CALL: [(&str, &str); 7] = [
    ("source_workload", "web-0"),
    ("source_workload_namespace", "shop"),
    ("source_principal", WEB),
    ("destination_workload", "api-0"),
    ("destination_principal", API),
    ("mesh_path", "same_node"),
    ("connection_security_policy", "node_local"),
];

struct OneNode {
    outbound: Arc<PodOutbound>,
    /// api-0's echo application (and the port behind the service).
    echo: SocketAddrV4,
    /// api-0's application that answers first, half-closes, then counts what it receives.
    first: SocketAddrV4,
    /// Bytes `first` received per connection.
    first_got: tokio::sync::mpsc::UnboundedReceiver<usize>,
    app_connections: Arc<AtomicUsize>,
    /// TCP connections api-0's 15008 accepted.
    hbone_accepted: Arc<AtomicUsize>,
    hbone: Arc<HboneServer<PodInbound>>,
    /// The agent's telemetry: both pods report into it.
    metrics: Registry,
    _pods: [Registration; 2],
}

/// What can differ between the tests.
struct Setup {
    /// The identity api-0's TrafficTarget lets in.
    allowed: &'static str,
    /// The identity the configuration gives api-0 (the service's endpoint always says `API`).
    api_identity: &'static str,
    same_node: SameNode,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            allowed: WEB,
            api_identity: API,
            same_node: SameNode::InProcess,
        }
    }
}

async fn one_node(setup: Setup) -> OneNode {
    let ca = TestCa::new("same-node-test-ca");
    let (certs, _) = manager(&TestSigner::new(ca, Duration::from_secs(3600)));
    certs.fetch(&id(WEB)).await.expect("web certificate");
    certs.fetch(&id(API)).await.expect("api certificate");

    // api-0's two applications; both count the connections they accept.
    let app_connections = Arc::new(AtomicUsize::new(0));
    let echo = TcpListener::bind((API_IP, 0)).await.expect("bind app");
    let counter = app_connections.clone();
    let echo_port = echo.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let first = TcpListener::bind((API_IP, 0)).await.expect("bind app");
    let counter = app_connections.clone();
    let first_port = first.local_addr().expect("address").port();
    let (got, first_got) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = first.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let got = got.clone();
            tokio::spawn(async move {
                let _ = s.write_all(b"ready").await;
                let _ = s.shutdown().await;
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest).await;
                let _ = got.send(rest.len());
            });
        }
    });

    let web0 = workload("web-0", "web", WEB_IP, "node-a");
    let mut api0 = workload("api-0", "api", API_IP, "node-a");
    api0.identity = id(setup.api_identity);
    let service = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(*VIP.ip()),
        ports: vec![ServicePort {
            name: "tcp".into(),
            port: VIP.port(),
            target_port: echo_port,
            protocol: Protocol::Tcp,
        }],
        endpoints: vec![Endpoint {
            ip: API_IP,
            workload: Some(api0.name.clone()),
            identity: Some(id(API)),
            node: Some("node-a".into()),
            ready: true,
        }],
    };
    let policy = InboundPolicy {
        workload: api0.name.clone(),
        identity: api0.identity.clone(),
        mode: TrafficPolicyMode::DefaultDeny,
        tls_mode: TlsMode::Strict,
        rules: vec![Rule {
            traffic_target: NamespacedName::new("shop", "to-api"),
            sources: vec![id(setup.allowed)],
            ports: vec![echo_port, first_port],
            route: RouteMatch::Tcp,
        }],
    };
    let node = NodeSnapshot {
        node: "node-a".into(),
        workloads: [
            (web0.name.clone(), web0.clone()),
            (api0.name.clone(), api0.clone()),
        ]
        .into(),
        services: Arc::new([(service.name.clone(), Arc::new(service))].into()),
        policies: [(api0.name.clone(), policy)].into(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };
    let store = crate::state::holding(&node);
    let mut metrics = Registry::default();
    let telemetry = Telemetry::new(&mut metrics);
    let inbound = |pod: &Workload| PodInbound {
        pod: pod.name.clone(),
        store: store.clone(),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        telemetry: telemetry.clone(),
        http: crate::l7::HttpConfig::default(),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
    };

    // The node registry, as the agent's proxies fill it.
    let local = Arc::new(LocalPods::default());
    let pods = [
        local.register(LocalPod {
            ip: WEB_IP,
            inbound: inbound(&web0),
        }),
        local.register(LocalPod {
            ip: API_IP,
            inbound: inbound(&api0),
        }),
    ];

    // api-0's 15008, on loopback at a test port.
    let tls = tls::server_config(certs.clone(), id(API)).expect("server TLS");
    let hbone =
        Arc::new(HboneServer::new(tls, inbound(&api0), ServerConfig::default()).expect("server"));
    let hbone_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
    let hbone_addr = hbone_listener.local_addr().expect("address");
    let hbone_accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let (server, accepted) = (hbone.clone(), hbone_accepted.clone());
        async move {
            while let Ok((tcp, _)) = hbone_listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::spawn(async move {
                    let _ = server.serve_tcp(tcp).await;
                });
            }
        }
    });
    let dialer: Dialer = Arc::new(move |addr: SocketAddr| {
        assert_eq!(addr, SocketAddr::from((API_IP, HBONE_PORT)));
        Box::pin(TcpStream::connect(hbone_addr))
    });
    let pool = HbonePool::with_dialer(certs, PoolConfig::default(), dialer).expect("pool");
    let outbound = PodOutbound::new(
        web0.name.clone(),
        store.clone(),
        pool,
        Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        OutboundConfig {
            egress: Egress::Deny,
            same_node: setup.same_node,
            ..OutboundConfig::default()
        },
        telemetry,
    )
    .with_local_pods(local);
    OneNode {
        outbound: Arc::new(outbound),
        echo: SocketAddrV4::new(API_IP, echo_port),
        first: SocketAddrV4::new(API_IP, first_port),
        first_got,
        app_connections,
        hbone_accepted,
        hbone,
        metrics,
        _pods: pods,
    }
}

impl OneNode {
    /// A connection of web-0's application to `dst`, as the datapath hands it to the proxy.
    async fn call(
        &self,
        dst: SocketAddrV4,
    ) -> (
        TcpStream,
        tokio::task::JoinHandle<Result<Carried, OutboundError>>,
    ) {
        let (client, server) = loopback_pair().await;
        let outbound = self.outbound.clone();
        let handled = tokio::spawn(async move { outbound.handle(server, dst).await });
        (client, handled)
    }

    fn app_connections(&self) -> usize {
        self.app_connections.load(Ordering::SeqCst)
    }

    /// No HBONE connection was opened, by the pool or to api-0's 15008.
    fn assert_no_tunnel(&self) {
        let pool = self.outbound.connector.pool.stats().snapshot();
        assert_eq!(
            (
                pool.connections_opened,
                pool.connections_failed,
                pool.streams_opened
            ),
            (0, 0, 0),
            "{pool:?}"
        );
        assert_eq!(self.outbound.connector.pool.connections(), 0);
        assert_eq!(self.hbone_accepted.load(Ordering::SeqCst), 0);
        assert_eq!(self.hbone.stats().snapshot().streams_opened, 0);
    }
}

/// Sends `payload` and half-closes, reading the echo to its end.
async fn echo_through(client: &mut TcpStream, payload: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = client.split();
    let send = async {
        w.write_all(payload).await.expect("send");
        w.shutdown().await.expect("half-close");
    };
    let mut echoed = Vec::new();
    let recv = r.read_to_end(&mut echoed);
    let ((), got) = tokio::time::timeout(WAIT, async { tokio::join!(send, recv) })
        .await
        .expect("the call completes");
    got.expect("read the echo");
    echoed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_node_calls_stay_in_the_agent_and_pass_its_policy() {
    let node = one_node(Setup::default()).await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();

    // By the service's VIP, then by the pod's own address.
    for dst in [VIP, node.echo] {
        let (mut client, handled) = node.call(dst).await;
        let echoed = echo_through(&mut client, &payload).await;
        assert!(
            echoed == payload,
            "{dst}: the echo is the payload, byte for byte"
        );
        let carried = handled.await.expect("task").expect("carried");
        assert_eq!(carried.path, Path::SameNode, "{dst}");
        assert_eq!((carried.sent, carried.received), (1_000_000, 1_000_000));
    }
    assert_eq!(node.app_connections(), 2);
    node.assert_no_tunnel();

    // Both sides report each call, unencrypted but never on a wire.
    let text = encode(&node.metrics);
    let by_vip = with(
        &LOCAL_CALL,
        &[
            ("reporter", "source"),
            ("destination_service", "api.shop.svc.cluster.local"),
        ],
    );
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &by_vip),
        1,
        "{text}"
    );
    for reporter in ["source", "destination"] {
        let labels = with(&LOCAL_CALL, &[("reporter", reporter)]);
        let m = |name: &str, extra: &[(&str, &str)]| sample(&text, name, &with(&labels, extra));
        let done = [("response_flags", "-")];
        assert_eq!(m("istio_tcp_connections_opened_total", &done), 2, "{text}");
        assert_eq!(m("istio_tcp_connections_closed_total", &done), 2, "{text}");
        assert_eq!(
            m("istio_tcp_received_bytes_total", &[]),
            2_000_000,
            "{text}"
        );
        assert_eq!(m("istio_tcp_sent_bytes_total", &[]), 2_000_000, "{text}");
    }
    assert_eq!(
        sample(&text, "istio_tcp_connections_opened_total", &[]),
        4,
        "two calls, two reports each, nothing else:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_node_connection_half_closes_each_way_on_its_own() {
    let mut node = one_node(Setup::default()).await;

    // The caller half-closes first: the echo still comes back in full.
    let (mut client, handled) = node.call(node.echo).await;
    let echoed = echo_through(&mut client, b"request, then FIN").await;
    assert_eq!(echoed, b"request, then FIN");
    handled.await.expect("task").expect("carried");

    // The application half-closes first: the caller reads its end, then still sends.
    let (mut client, handled) = node.call(node.first).await;
    let mut hello = Vec::new();
    tokio::time::timeout(WAIT, client.read_to_end(&mut hello))
        .await
        .expect("the application's FIN arrives")
        .expect("read");
    assert_eq!(hello, b"ready");
    client
        .write_all(&[9u8; 70_000])
        .await
        .expect("the caller still sends after the application's FIN");
    client.shutdown().await.expect("half-close");
    let got = tokio::time::timeout(WAIT, node.first_got.recv())
        .await
        .expect("the application reads to the end")
        .expect("count");
    assert_eq!(got, 70_000);
    let carried = handled.await.expect("task").expect("carried");
    assert_eq!((carried.sent, carried.received), (70_000, 5));
    node.assert_no_tunnel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_node_caller_without_a_traffic_target_is_refused_promptly() {
    let node = one_node(Setup {
        allowed: "spiffe://cluster.local/ns/shop/sa/admin",
        ..Setup::default()
    })
    .await;
    let started = std::time::Instant::now();
    let (mut client, handled) = node.call(VIP).await;
    let _ = client.write_all(b"let me in").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, client.read_to_end(&mut buf))
        .await
        .expect("closed promptly, not hanging");
    assert!(
        read.is_err() || buf.is_empty(),
        "nothing comes back: {buf:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let e = handled.await.expect("task").expect_err("refused");
    assert_eq!(e.kind(), "destination_denied");
    match &e {
        OutboundError::Connect(ConnectError::SameNode { rejection, .. }) => {
            assert_eq!(rejection.status, crate::inbound::DENIED);
            assert_eq!(rejection.kind, "no_traffic_target");
            assert!(rejection.reason.contains(WEB), "{}", rejection.reason);
        }
        other => panic!("expected a same-node refusal, got {other}"),
    }
    assert_eq!(node.app_connections(), 0, "the application never saw it");
    node.assert_no_tunnel();

    // Counted as an HBONE refusal is: the destination with its policy's reason, the source
    // with the destination's answer.
    let text = encode(&node.metrics);
    let denied = |reporter, reason| {
        let labels = [
            ("reporter", reporter),
            ("source_principal", WEB),
            ("destination_workload", "api-0"),
            ("reason", reason),
        ];
        sample(&text, "mesh_tcp_connections_denied_total", &labels)
    };
    assert_eq!(denied("source", "destination_denied"), 1, "{text}");
    assert_eq!(denied("destination", "no_traffic_target"), 1, "{text}");
    for reporter in ["source", "destination"] {
        let closed = with(
            &LOCAL_CALL,
            &[("reporter", reporter), ("response_flags", "DENY")],
        );
        assert_eq!(
            sample(&text, "istio_tcp_connections_closed_total", &closed),
            1,
            "{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_pod_with_another_identity_than_resolved_is_refused() {
    // The service's endpoint says api, the configuration gives the pod at that IP another.
    let node = one_node(Setup {
        api_identity: "spiffe://cluster.local/ns/shop/sa/impostor",
        ..Setup::default()
    })
    .await;
    let (mut client, handled) = node.call(VIP).await;
    let _ = client.write_all(b"hello").await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, client.read_to_end(&mut buf))
        .await
        .expect("closed promptly, not hanging");
    assert!(
        read.is_err() || buf.is_empty(),
        "nothing comes back: {buf:?}"
    );
    let e = handled.await.expect("task").expect_err("refused");
    assert_eq!(e.kind(), "identity_mismatch");
    assert!(e.to_string().contains("sa/impostor"), "{e}");
    assert!(e.to_string().contains(API), "{e}");
    assert_eq!(node.app_connections(), 0, "the application never saw it");
    node.assert_no_tunnel();
    let text = encode(&node.metrics);
    let closed = [
        ("reporter", "source"),
        ("mesh_path", "same_node"),
        ("response_flags", "CONNECT"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &closed),
        1,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")]
        ),
        0,
        "the destination was never asked:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_hbone_setting_same_node_calls_take_a_tunnel() {
    let node = one_node(Setup {
        same_node: SameNode::Hbone,
        ..Setup::default()
    })
    .await;
    let (mut client, handled) = node.call(VIP).await;
    let echoed = echo_through(&mut client, b"through TLS").await;
    assert_eq!(echoed, b"through TLS");
    let carried = handled.await.expect("task").expect("carried");
    assert_eq!(carried.path, Path::Hbone);
    let pool = node.outbound.connector.pool.stats().snapshot();
    assert_eq!(
        (pool.connections_opened, pool.streams_opened),
        (1, 1),
        "{pool:?}"
    );
    assert_eq!(node.hbone_accepted.load(Ordering::SeqCst), 1);

    let text = encode(&node.metrics);
    let source = [
        ("reporter", "source"),
        ("mesh_path", "hbone"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &source),
        1,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "istio_tcp_connections_opened_total",
            &[("mesh_path", "same_node")]
        ),
        0,
        "{text}"
    );
}
