use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

use mesh_api::{convert, v1};
use mesh_core::model::{TlsMode, Workload};
use mesh_core::policy::{InboundPolicy, RouteMatch, Rule, TrafficPolicyMode};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::copy::{RelayError, relay_watching};
use crate::hbone::{HboneError, HbonePool, HboneServer, PoolConfig, ServerConfig};
use crate::identity::testing::{TestCa, TestSigner, id, manager};
use crate::inbound::{Caller, InboundStream, PlaintextInbound, PodInbound};
use crate::telemetry::testing::{encode, sample};
use crate::telemetry::{Admission, ConnEvent, ConnMeta, MeshPath, Metered, Peer, Reporter, Side};
use crate::tls;

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ADMIN: &str = "spiffe://cluster.local/ns/shop/sa/admin";
const POD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// How long a revoked connection may take to close.
const PROMPTLY: Duration = Duration::from_secs(5);

fn pod() -> NamespacedName {
    NamespacedName::new("shop", "api-0")
}

fn rule(name: &str, source: &str, port: u16) -> Rule {
    Rule {
        traffic_target: NamespacedName::new("shop", name),
        sources: vec![id(source)],
        ports: vec![port],
        route: RouteMatch::Tcp,
    }
}

/// node-b's configuration: api-0 (its application on `port`) in `tls_mode` under `traffic`,
/// with `rules`.
fn config(tls_mode: TlsMode, traffic: TrafficPolicyMode, rules: Vec<Rule>) -> NodeSnapshot {
    let workload = Workload {
        name: pod(),
        uid: "u".into(),
        service_account: "api".into(),
        identity: id(API),
        node: "node-b".into(),
        ips: vec![POD_IP],
        mode: tls_mode,
        labels: BTreeMap::new(),
        cgroup: None,
        netns: None,
        ports: vec![],
        excluded_inbound_ports: vec![],
    };
    let policy = InboundPolicy {
        workload: pod(),
        identity: id(API),
        mode: traffic,
        tls_mode,
        rules,
    };
    NodeSnapshot {
        node: "node-b".into(),
        workloads: [(pod(), workload)].into(),
        policies: [(pod(), policy)].into(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    }
}

/// Applies `new` to a store holding `old` as version (1, `seq - 1`), as the controller's
/// delta would.
fn swap(store: &StateStore, old: &NodeSnapshot, new: &NodeSnapshot, seq: u64) {
    let (upserts, removals) = convert::diff(Some(old), new);
    store
        .apply(&v1::ConfigUpdate {
            version: Some(v1::Version { epoch: 1, seq }),
            full: false,
            base: Some(v1::Version {
                epoch: 1,
                seq: seq - 1,
            }),
            upserts,
            removals,
        })
        .expect("the new policy applies");
}

/// An application that echoes every byte back, for as long as its caller keeps the
/// connection open.
async fn echo_app() -> SocketAddrV4 {
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let SocketAddr::V4(addr) = app.local_addr().expect("app address") else {
        unreachable!("bound to IPv4")
    };
    tokio::spawn(async move {
        while let Ok((s, _)) = app.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Writes `line` and reads it back: the connection is open and carried.
async fn round_trip<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, line: &[u8]) {
    s.write_all(line)
        .await
        .expect("write on an open connection");
    let mut got = vec![0; line.len()];
    tokio::time::timeout(PROMPTLY, s.read_exact(&mut got))
        .await
        .expect("the echo in time")
        .expect("read the echo");
    assert_eq!(got, line);
}

/// The connection is closed by the other end within [`PROMPTLY`] (EOF or reset), without
/// writing anything.
async fn closed_promptly<S: AsyncRead + Unpin>(s: &mut S, what: &str) {
    let mut buf = [0; 64];
    match tokio::time::timeout(PROMPTLY, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: read {n} unexpected bytes instead of the close"),
        Err(_) => panic!("{what}: still open {PROMPTLY:?} after the policy change"),
    }
}

/// The ended connection of `principal` (`None`: plaintext) reported by `reporter`, once
/// recorded.
async fn ended(telemetry: &Telemetry, reporter: &str, principal: Option<&str>) -> Arc<ConnEvent> {
    let direction = if reporter == "source" {
        "outbound"
    } else {
        "inbound"
    };
    let found = tokio::time::timeout(PROMPTLY, async {
        loop {
            let hit = telemetry.recent(0).into_iter().find(|e| {
                e.direction == direction
                    && e.src.identity.as_ref().map(|i| i.uri()).as_deref() == principal
            });
            if let Some(e) = hit {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("no ended {direction} connection of {principal:?}"))
}

fn assert_revoked(event: &ConnEvent, because: &str) {
    assert_eq!(event.reason, Some("policy_revoked"), "{event:?}");
    assert_eq!(
        (event.flags, event.verdict),
        ("DENY", "denied"),
        "{event:?}"
    );
    let detail = event.detail.as_deref().unwrap_or_default();
    assert!(detail.contains(because), "{detail}");
}

#[test]
fn only_pods_whose_workload_or_policy_changed_are_rechecked() {
    let strict = TrafficPolicyMode::DefaultDeny;
    let one = config(TlsMode::Strict, strict, vec![rule("web", WEB, 8080)]);
    assert!(changed_pods(&one, &one.clone()).is_empty());

    let mut other = one.clone();
    other.trust_bundle.push("another root".into());
    assert!(
        changed_pods(&one, &other).is_empty(),
        "nothing a connection was admitted on changed"
    );

    let fewer = config(TlsMode::Strict, strict, vec![]);
    assert_eq!(changed_pods(&one, &fewer), [pod()].into());
    let permissive = config(TlsMode::Permissive, strict, vec![rule("web", WEB, 8080)]);
    assert_eq!(changed_pods(&permissive, &one), [pod()].into());
    let gone = NodeSnapshot {
        node: "node-b".into(),
        ..NodeSnapshot::default()
    };
    assert_eq!(changed_pods(&one, &gone), [pod()].into());
}

/// api-0's HBONE side on a node holding `config`, with revocation running, and pools of
/// web and admin to call it.
struct Tunnels {
    store: Arc<StateStore>,
    registry: Registry,
    telemetry: Telemetry,
    hbone: SocketAddr,
    web: HbonePool,
    admin: HbonePool,
}

impl Tunnels {
    async fn start(config: &NodeSnapshot) -> Tunnels {
        let ca = TestCa::new("revocation-test-ca");
        let hour = Duration::from_secs(3600);
        let (api_mgr, _) = manager(&TestSigner::new(ca.clone(), hour));
        let (web_mgr, _) = manager(&TestSigner::new(ca.clone(), hour));
        let (admin_mgr, _) = manager(&TestSigner::new(ca, hour));
        api_mgr.fetch(&id(API)).await.expect("api certificate");
        web_mgr.fetch(&id(WEB)).await.expect("web certificate");
        admin_mgr
            .fetch(&id(ADMIN))
            .await
            .expect("admin certificate");
        let store = crate::state::holding(config);
        let mut registry = Registry::default();
        let telemetry = Telemetry::new(&mut registry);
        tokio::spawn(watch(store.clone(), telemetry.clone()));
        let handler = PodInbound {
            pod: pod(),
            store: store.clone(),
            dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
            telemetry: telemetry.clone(),
            http: crate::l7::HttpConfig::default(),
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        };
        let tls = tls::server_config(api_mgr, id(API)).expect("server TLS");
        let server =
            Arc::new(HboneServer::new(tls, handler, ServerConfig::default()).expect("server"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
        let hbone = listener.local_addr().expect("address");
        tokio::spawn(server.serve(listener));
        Tunnels {
            store,
            registry,
            telemetry,
            hbone,
            web: HbonePool::new(web_mgr, PoolConfig::default()).expect("pool"),
            admin: HbonePool::new(admin_mgr, PoolConfig::default()).expect("pool"),
        }
    }
}

#[test]
fn a_recheck_decides_as_the_admission_did_on_the_recorded_caller_and_port() {
    use mesh_core::policy::{AnchoredRegex, HttpMatch};
    let deny = TrafficPolicyMode::DefaultDeny;
    let c = config(TlsMode::Strict, deny, vec![rule("web", WEB, 8080)]);
    let at = |port| SocketAddr::from((POD_IP, port));
    let web = Admission {
        caller: Some(id(WEB)),
        requests_checked: false,
        node_probe: false,
    };
    let admin = Admission {
        caller: Some(id(ADMIN)),
        ..web.clone()
    };
    let plaintext = Admission {
        caller: None,
        requests_checked: false,
        node_probe: false,
    };
    let kind = |r: Result<(), crate::inbound::Rejection>| r.err().map(|r| r.kind);
    assert_eq!(kind(recheck(&applied(&c), &pod(), at(8080), &web)), None);
    assert_eq!(
        kind(recheck(&applied(&c), &pod(), at(9090), &web)),
        Some("port_not_covered")
    );
    assert_eq!(
        kind(recheck(&applied(&c), &pod(), at(8080), &admin)),
        Some("no_traffic_target")
    );
    assert_eq!(
        kind(recheck(&applied(&c), &pod(), at(8080), &plaintext)),
        Some("plaintext_strict")
    );
    let gone = NodeSnapshot {
        node: "node-b".into(),
        ..NodeSnapshot::default()
    };
    assert_eq!(
        kind(recheck(&applied(&gone), &pod(), at(8080), &web)),
        Some("unknown_pod")
    );

    // Allowed request by request on a port no service declares HTTP: refused to a connection
    // carried whole, kept for one whose requests are each checked.
    let mut by_request = c.clone();
    by_request.policies.get_mut(&pod()).expect("policy").rules[0].route =
        RouteMatch::Http(vec![HttpMatch {
            name: "read".into(),
            path: Some(AnchoredRegex::new("/.*").expect("regex")),
            methods: vec!["GET".into()],
            headers: vec![],
        }]);
    assert_eq!(
        kind(recheck(&applied(&by_request), &pod(), at(8080), &web)),
        Some("http_rules_on_l4_port")
    );
    let checked = Admission {
        requests_checked: true,
        ..web
    };
    assert_eq!(
        kind(recheck(&applied(&by_request), &pod(), at(8080), &checked)),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_whose_traffic_target_is_deleted_is_closed_and_the_others_stay_open() {
    let app = echo_app().await;
    let deny = TrafficPolicyMode::DefaultDeny;
    let both = config(
        TlsMode::Strict,
        deny,
        vec![
            rule("web-to-api", WEB, app.port()),
            rule("admin-to-api", ADMIN, app.port()),
        ],
    );
    let Tunnels {
        store,
        registry,
        telemetry,
        hbone,
        web,
        admin,
    } = Tunnels::start(&both).await;

    let authority = SocketAddr::V4(app);
    let mut web_conn = web
        .connect(&id(WEB), hbone, &id(API), authority)
        .await
        .expect("web admitted");
    let mut admin_conn = admin
        .connect(&id(ADMIN), hbone, &id(API), authority)
        .await
        .expect("admin admitted");
    round_trip(&mut web_conn, b"web, before").await;
    round_trip(&mut admin_conn, b"admin, before").await;

    // The web-to-api TrafficTarget is deleted.
    let admin_only = config(
        TlsMode::Strict,
        deny,
        vec![rule("admin-to-api", ADMIN, app.port())],
    );
    swap(&store, &both, &admin_only, 2);

    closed_promptly(&mut web_conn, "web's tunnel").await;
    round_trip(&mut admin_conn, b"admin, after: still allowed").await;
    let event = ended(&telemetry, "destination", Some(WEB)).await;
    assert_revoked(&event, "no_traffic_target");
    assert_eq!(event.path, MeshPath::Hbone);

    // A new tunnel is refused.
    match web.connect(&id(WEB), hbone, &id(API), authority).await {
        Err(HboneError::Refused { status, .. }) => assert_eq!(status, 403),
        Err(e) => panic!("expected a 403 refusal, got {e}"),
        Ok(_) => panic!("web must not reach api any more"),
    }

    let text = encode(&registry);
    let revoked = [
        ("reporter", "destination"),
        ("source_principal", WEB),
        ("destination_workload", "api-0"),
        ("reason", "policy_revoked"),
    ];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &revoked),
        1,
        "{text}"
    );
    let closed = [
        ("source_principal", WEB),
        ("response_flags", "DENY"),
        ("mesh_path", "hbone"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &closed),
        2,
        "the revoked tunnel and the refused one: {text}"
    );
    let admin_revoked = [("source_principal", ADMIN), ("reason", "policy_revoked")];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &admin_revoked),
        0,
        "{text}"
    );
    assert_eq!(telemetry.live(), 1, "admin's tunnel is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_connections_close_when_the_pod_turns_strict() {
    let app = echo_app().await;
    let open = TrafficPolicyMode::Permissive;
    let permissive = config(TlsMode::Permissive, open, vec![]);
    let store = crate::state::holding(&permissive);
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    tokio::spawn(watch(store.clone(), telemetry.clone()));
    let handler = Arc::new(PlaintextInbound {
        pod: pod(),
        ip: POD_IP,
        store: store.clone(),
        dial: Arc::new(move |_| Box::pin(TcpStream::connect(app))),
        telemetry: telemetry.clone(),
        idle_timeout: Duration::from_secs(3600),
        http: crate::l7::HttpConfig::default(),
        node: crate::inbound::NodeAddresses::Fixed(Default::default()),
    });
    // "15006": every connection it accepts is handled by the pod's plaintext side.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15006");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle(conn).await });
        }
    });

    let mut conn = TcpStream::connect(addr).await.expect("connect");
    round_trip(&mut conn, b"plaintext, while PERMISSIVE").await;

    swap(
        &store,
        &permissive,
        &config(TlsMode::Strict, open, vec![]),
        2,
    );
    closed_promptly(&mut conn, "the plaintext connection").await;
    let event = ended(&telemetry, "destination", None).await;
    assert_revoked(&event, "plaintext_strict");
    assert_eq!(event.path, MeshPath::Plaintext);
    let text = encode(&registry);
    let revoked = [
        ("source_principal", "unknown"),
        ("reason", "policy_revoked"),
    ];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &revoked),
        1,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_same_node_connection_closes_on_both_sides_when_the_destination_revokes_it() {
    let app = echo_app().await;
    let deny = TrafficPolicyMode::DefaultDeny;
    let allowed = config(TlsMode::Strict, deny, vec![rule("web", WEB, app.port())]);
    let store = crate::state::holding(&allowed);
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    tokio::spawn(watch(store.clone(), telemetry.clone()));
    let inbound = PodInbound {
        pod: pod(),
        store: store.clone(),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        telemetry: telemetry.clone(),
        http: crate::l7::HttpConfig::default(),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
    };

    // The calling application's socket, accepted by web's outbound side.
    let outbound = TcpListener::bind("127.0.0.1:0").await.expect("bind 15001");
    let mut client = TcpStream::connect(outbound.local_addr().expect("address"))
        .await
        .expect("connect");
    let (accepted, _) = outbound.accept().await.expect("accept");
    let mut meta = ConnMeta::new(
        NamespacedName::new("shop", "web-0"),
        Reporter::Source,
        MeshPath::SameNode,
        SocketAddr::V4(app),
    );
    meta.src = Peer::of_identity(&id(WEB));
    let mut source = Metered::new(accepted, telemetry.open(meta), Side::Source);
    let caller = Caller {
        identity: id(WEB),
        path: MeshPath::SameNode,
        peer: Peer::of_identity(&id(WEB)),
        addr: None,
    };
    let mut destination = match inbound.admit(caller, SocketAddr::V4(app)).await {
        Ok(d @ InboundStream::Tcp(_)) => d,
        Ok(InboundStream::Http(_)) => panic!("an L4 port"),
        Err(r) => panic!("web is allowed: {r}"),
    };
    let watched = destination.guard_mut().map(|g| g.activity());
    let carried = tokio::spawn(async move {
        relay_watching(
            &mut source,
            &mut destination,
            Duration::from_secs(3600),
            watched,
        )
        .await
    });
    round_trip(&mut client, b"same node, before").await;

    swap(&store, &allowed, &config(TlsMode::Strict, deny, vec![]), 2);
    closed_promptly(&mut client, "the same-node connection").await;
    match tokio::time::timeout(PROMPTLY, carried).await {
        Ok(Ok(Err(RelayError::Revoked(cause)))) => {
            assert!(cause.contains("no_traffic_target"), "{cause}")
        }
        other => panic!("the relay ends revoked, not {other:?}"),
    }
    let destination = ended(&telemetry, "destination", Some(WEB)).await;
    assert_revoked(&destination, "no_traffic_target");
    let source = ended(&telemetry, "source", Some(WEB)).await;
    assert_revoked(&source, "no_traffic_target");
}

/// An HTTP/1.1 application: answers every request of a connection with `200 ok`, keeping
/// the connection open.
async fn http_app() -> SocketAddrV4 {
    let (heard, _) = tokio::sync::mpsc::unbounded_channel();
    hearing_http_app(heard, true).await
}

/// An HTTP/1.1 application that tells `heard` of each request head it reads and, when
/// `answer`, answers it with `200 ok`; otherwise it never answers.
async fn hearing_http_app(
    heard: tokio::sync::mpsc::UnboundedSender<()>,
    answer: bool,
) -> SocketAddrV4 {
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let SocketAddr::V4(addr) = app.local_addr().expect("app address") else {
        unreachable!("bound to IPv4")
    };
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            let heard = heard.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    head.extend_from_slice(&buf[..n]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        let _ = heard.send(());
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if answer && s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// Sends one keep-alive request on `s` and expects `200 ok`.
async fn get<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(b"GET /x HTTP/1.1\r\nhost: api\r\n\r\n")
        .await
        .expect("write the request");
    let mut answer = Vec::new();
    let mut buf = [0; 1024];
    while !answer.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(PROMPTLY, s.read(&mut buf))
            .await
            .expect("the answer in time")
            .expect("read the answer");
        assert!(n > 0, "closed before the answer: {answer:?}");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_connection_is_closed_when_nothing_admits_the_connection_any_more() {
    use mesh_core::model::{Protocol, Service, ServicePort};
    let app = http_app().await;
    let deny = TrafficPolicyMode::DefaultDeny;
    // The port is HTTP: the connection is served request by request.
    let declared = |mut c: NodeSnapshot| {
        let service = Service {
            name: NamespacedName::new("shop", "api"),
            vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: app.port(),
                protocol: Protocol::Http,
            }],
            endpoints: vec![],
        };
        c.services = Arc::new([(service.name.clone(), Arc::new(service))].into());
        c
    };
    let allowed = declared(config(
        TlsMode::Strict,
        deny,
        vec![rule("web-to-api", WEB, app.port())],
    ));
    let t = Tunnels::start(&allowed).await;
    let mut conn = t
        .web
        .connect(&id(WEB), t.hbone, &id(API), SocketAddr::V4(app))
        .await
        .expect("web admitted");
    get(&mut conn).await;
    get(&mut conn).await;

    let revoked = declared(config(TlsMode::Strict, deny, vec![]));
    swap(&t.store, &allowed, &revoked, 2);
    closed_promptly(&mut conn, "web's HTTP connection").await;
    let event = ended(&t.telemetry, "destination", Some(WEB)).await;
    assert_revoked(&event, "no_traffic_target");
    let text = encode(&t.registry);
    let counted = [("source_principal", WEB), ("reason", "policy_revoked")];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &counted),
        1,
        "{text}"
    );
}

/// `config` as the configuration in force, with its indexes.
fn applied(config: &NodeSnapshot) -> Applied {
    Applied::new(None, config.clone())
}

/// `config` with a service whose ports `http` (the application on each) are declared HTTP
/// and whose one endpoint is api-0: the ports its requests are checked on one by one.
fn http_ports(mut config: NodeSnapshot, http: &[SocketAddrV4]) -> NodeSnapshot {
    use mesh_core::model::{Endpoint, Protocol, Service, ServicePort};
    let service = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
        ports: http
            .iter()
            .enumerate()
            .map(|(i, app)| ServicePort {
                name: format!("http-{i}"),
                port: app.port(),
                target_port: app.port(),
                protocol: Protocol::Http,
            })
            .collect(),
        endpoints: vec![Endpoint {
            ip: POD_IP,
            workload: Some(pod()),
            identity: Some(id(API)),
            node: None,
            ready: true,
        }],
    };
    config.services = Arc::new([(service.name.clone(), Arc::new(service))].into());
    config
}

/// A GET for `app` as a stream of web's HBONE connection.
async fn request_stream(
    t: &Tunnels,
    app: SocketAddrV4,
) -> http::Response<crate::hbone::requests::RecvBody> {
    let request = http::Request::get("http://api.shop/x")
        .version(http::Version::HTTP_2)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    t.web
        .request(&id(WEB), t.hbone, &id(API), app, request)
        .await
        .expect("sent")
        .expect("the destination takes requests as streams")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_as_streams_end_when_the_caller_is_no_longer_admitted() {
    let (heard_tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
    let silent = hearing_http_app(heard_tx, false).await;
    let answering = http_app().await;
    let deny = TrafficPolicyMode::DefaultDeny;
    let declared = |c: NodeSnapshot| http_ports(c, &[answering, silent]);
    let allowed = declared(config(
        TlsMode::Strict,
        deny,
        vec![
            rule("web-to-api", WEB, answering.port()),
            rule("web-to-slow", WEB, silent.port()),
        ],
    ));
    let t = Tunnels::start(&allowed).await;
    let answered = request_stream(&t, answering).await;
    assert_eq!(answered.status(), http::StatusCode::OK);
    let stats = t.web.stats().snapshot();
    assert_eq!(
        (stats.requests, stats.streams_opened),
        (1, 0),
        "the request went as a stream of its own, not in a tunnel"
    );

    // A request the application has not answered yet when the policy changes.
    let t = Arc::new(t);
    let in_flight = tokio::spawn({
        let t = t.clone();
        async move { request_stream(&t, silent).await.status() }
    });
    tokio::time::timeout(PROMPTLY, heard.recv())
        .await
        .expect("the application got the request")
        .expect("the application is up");
    let revoked = declared(config(
        TlsMode::Strict,
        deny,
        vec![rule("web-to-api", WEB, answering.port())],
    ));
    swap(&t.store, &allowed, &revoked, 2);
    let status = tokio::time::timeout(PROMPTLY, in_flight)
        .await
        .expect("the request in flight ended promptly")
        .expect("request task");
    assert_eq!(status, http::StatusCode::FORBIDDEN);
    let event = ended(&t.telemetry, "destination", Some(WEB)).await;
    assert_revoked(&event, "port_not_covered");

    // The next request on that port is decided afresh and refused; the other port still
    // answers.
    assert_eq!(
        request_stream(&t, silent).await.status(),
        http::StatusCode::FORBIDDEN
    );
    assert!(
        heard.try_recv().is_err(),
        "a refused request reached the application"
    );
    assert_eq!(
        request_stream(&t, answering).await.status(),
        http::StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_stream_for_another_address_or_an_l4_port_is_refused() {
    let http = http_app().await;
    let tcp = echo_app().await;
    let allowed = http_ports(
        config(
            TlsMode::Strict,
            TrafficPolicyMode::DefaultDeny,
            vec![
                rule("web-to-api", WEB, http.port()),
                rule("web-to-echo", WEB, tcp.port()),
            ],
        ),
        &[http],
    );
    let t = Tunnels::start(&allowed).await;
    assert_eq!(
        request_stream(&t, http).await.status(),
        http::StatusCode::OK
    );
    let elsewhere = SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), http.port());
    assert_eq!(
        request_stream(&t, elsewhere).await.status(),
        http::StatusCode::MISDIRECTED_REQUEST,
        "an address that is not the pod's"
    );
    assert_eq!(
        request_stream(&t, tcp).await.status(),
        http::StatusCode::MISDIRECTED_REQUEST,
        "a port whose requests nothing declares HTTP: no request is checked there"
    );
    let text = encode(&t.registry);
    for reason in ["misdirected", "not_an_http_port"] {
        assert_eq!(
            sample(
                &text,
                "mesh_tcp_connections_denied_total",
                &[("source_principal", WEB), ("reason", reason)]
            ),
            1,
            "{reason}: {text}"
        );
    }
}
