use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use mesh_core::model::{TlsMode, Workload};
use mesh_core::policy::{InboundPolicy, RouteMatch, Rule, TrafficPolicyMode};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::hbone::{HboneError, HbonePool, HboneServer, PoolConfig, ServerConfig};
use crate::identity::testing::{TestCa, TestSigner, id, manager};
use crate::telemetry::testing::{encode, sample};
use crate::tls;

const API: &str = "spiffe://cluster.local/ns/shop/sa/api";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const ADMIN: &str = "spiffe://cluster.local/ns/shop/sa/admin";
const POD_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);

fn pod() -> NamespacedName {
    NamespacedName::new("shop", "api-0")
}

/// node-b's configuration: api-0 allows web on 8080 only.
fn config(tls_mode: TlsMode, traffic: TrafficPolicyMode) -> NodeSnapshot {
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
        rules: vec![Rule {
            traffic_target: NamespacedName::new("shop", "web-to-api"),
            sources: vec![id(WEB)],
            ports: vec![8080],
            route: RouteMatch::Tcp,
        }],
    };
    NodeSnapshot {
        node: "node-b".into(),
        workloads: [(pod(), workload)].into(),
        policies: [(pod(), policy)].into(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    }
}

fn at(port: u16) -> SocketAddr {
    SocketAddr::from((POD_IP, port))
}

#[test]
fn hbone_admission_follows_the_traffic_target() {
    let c = config(TlsMode::Strict, TrafficPolicyMode::DefaultDeny);
    assert_eq!(
        admit_hbone(&applied(&c), &pod(), &id(WEB), at(8080)).expect("web may call api on 8080"),
        SocketAddrV4::new(POD_IP, 8080)
    );
    let r =
        admit_hbone(&applied(&c), &pod(), &id(ADMIN), at(8080)).expect_err("admin has no target");
    assert_eq!(r.status, DENIED);
    assert_eq!(r.kind, "no_traffic_target");
    assert!(r.reason.contains("no TrafficTarget"), "{}", r.reason);
    let r = admit_hbone(&applied(&c), &pod(), &id(WEB), at(9090)).expect_err("port not covered");
    assert_eq!(r.status, DENIED);
    assert_eq!(r.kind, "port_not_covered");
    assert!(r.reason.contains("9090"), "{}", r.reason);
    let r = admit_hbone(
        &applied(&c),
        &pod(),
        &id(WEB),
        "10.9.9.9:8080".parse().expect("addr"),
    )
    .expect_err("another pod's address");
    assert_eq!((r.status, r.kind), (MISDIRECTED, "misdirected"));
    let r = admit_hbone(
        &applied(&c),
        &NamespacedName::new("shop", "gone"),
        &id(WEB),
        at(8080),
    )
    .expect_err("unknown pod");
    assert_eq!((r.status, r.kind), (UNAVAILABLE, "unknown_pod"));

    let open = config(TlsMode::Strict, TrafficPolicyMode::Permissive);
    admit_hbone(&applied(&open), &pod(), &id(ADMIN), at(9090)).expect("permissive traffic policy");
}

#[test]
fn http_rules_admit_a_connection_only_where_its_requests_are_checked() {
    use mesh_core::model::{Endpoint, Protocol, Service, ServicePort};
    use mesh_core::policy::{AnchoredRegex, HttpMatch};
    let mut c = config(TlsMode::Strict, TrafficPolicyMode::DefaultDeny);
    let rules = &mut c.policies.get_mut(&pod()).expect("policy").rules;
    rules[0].route = RouteMatch::Http(vec![HttpMatch {
        name: "read".into(),
        path: Some(AnchoredRegex::new("/.*").expect("regex")),
        methods: vec!["GET".into()],
        headers: vec![],
    }]);
    // No service declares 8080: it is L4, where nothing could check the requests.
    let refused = admit_hbone(&applied(&c), &pod(), &id(WEB), at(8080)).expect_err("L4 port");
    assert_eq!(refused.kind, "http_rules_on_l4_port");
    assert_eq!(refused.status, DENIED);
    // Declared HTTP by a service port targeting it: admitted, each request checked after.
    let service = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
        ports: vec![ServicePort {
            name: "web".into(),
            port: 80,
            target_port: 8080,
            protocol: Protocol::Http,
        }],
        endpoints: vec![Endpoint {
            ip: POD_IP,
            workload: Some(pod()),
            identity: Some(id(API)),
            node: Some("node-b".into()),
            ready: true,
        }],
    };
    c.services = Arc::new([(service.name.clone(), Arc::new(service))].into());
    assert_eq!(
        admit_hbone(&applied(&c), &pod(), &id(WEB), at(8080)),
        Ok(at_v4(8080))
    );
}

fn at_v4(port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(POD_IP, port)
}

#[test]
fn plaintext_follows_the_tls_mode() {
    let strict = config(TlsMode::Strict, TrafficPolicyMode::Permissive);
    let r = admit_plaintext(&applied(&strict), &pod(), SocketAddrV4::new(POD_IP, 8080))
        .expect_err("STRICT refuses plaintext");
    assert_eq!(r.kind, "plaintext_strict");
    assert!(r.reason.contains("STRICT"), "{}", r.reason);

    let permissive = config(TlsMode::Permissive, TrafficPolicyMode::Permissive);
    admit_plaintext(
        &applied(&permissive),
        &pod(),
        SocketAddrV4::new(POD_IP, 8080),
    )
    .expect("PERMISSIVE pod, permissive traffic policy");

    let deny = config(TlsMode::Permissive, TrafficPolicyMode::DefaultDeny);
    let r = admit_plaintext(&applied(&deny), &pod(), SocketAddrV4::new(POD_IP, 8080))
        .expect_err("default deny names identities; plaintext has none");
    assert!(r.reason.contains("unauthenticated"), "{}", r.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_are_admitted_by_the_identity_the_certificate_proves() {
    let ca = TestCa::new("inbound-test-ca");
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

    // The application: answers with what it got, upper-cased.
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app_addr = match app.local_addr().expect("app address") {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => unreachable!("bound to IPv4"),
    };
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf.to_ascii_uppercase()).await;
                }
            });
        }
    });

    let mut cfg = config(TlsMode::Strict, TrafficPolicyMode::DefaultDeny);
    cfg.policies.get_mut(&pod()).expect("policy").rules[0].ports = vec![app_addr.port()];
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    let handler = PodInbound {
        pod: pod(),
        store: crate::state::holding(&cfg),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        telemetry: telemetry.clone(),
        http: crate::l7::HttpConfig::default(),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
    };
    let tls = tls::server_config(api_mgr, id(API)).expect("server TLS");
    let server = Arc::new(HboneServer::new(tls, handler, ServerConfig::default()).expect("server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
    let hbone_addr = listener.local_addr().expect("address");
    tokio::spawn(server.clone().serve(listener));

    // web is allowed: bytes flow both ways, with half-close.
    let web = HbonePool::new(web_mgr, PoolConfig::default()).expect("pool");
    let mut t = web
        .connect(&id(WEB), hbone_addr, &id(API), SocketAddr::V4(app_addr))
        .await
        .expect("web -> api admitted");
    t.write_all(b"hello api").await.expect("write");
    t.shutdown().await.expect("half-close");
    let mut answer = Vec::new();
    t.read_to_end(&mut answer).await.expect("read");
    assert_eq!(answer, b"HELLO API");

    // admin holds a valid certificate of the same CA, but no TrafficTarget allows it: it
    // cannot pass as web, and it is refused promptly.
    let admin = HbonePool::new(admin_mgr, PoolConfig::default()).expect("pool");
    let refused = tokio::time::timeout(
        Duration::from_secs(10),
        admin.connect(&id(ADMIN), hbone_addr, &id(API), SocketAddr::V4(app_addr)),
    )
    .await
    .expect("a prompt answer");
    match refused {
        Err(HboneError::Refused { status, reason }) => {
            assert_eq!(status, DENIED);
            // A plain refusal: the caller learns nothing of the policy (no reason header).
            assert_eq!(reason, "Forbidden");
        }
        Err(e) => panic!("expected a 403 refusal, got {e}"),
        Ok(_) => panic!("admin must not reach api"),
    }

    // The destination's metrics: web's tunnel as mutual TLS with the bytes each way (the
    // request is "hello api", the response its upper case), admin's refusal as denied.
    let web = [
        ("reporter", "destination"),
        ("source_principal", WEB),
        ("source_workload_namespace", "shop"),
        ("destination_workload", "api-0"),
        ("destination_principal", API),
        ("mesh_path", "hbone"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let text = eventually_closed(&registry, &telemetry).await;
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &web),
        1,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &web),
        9,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &web),
        9,
        "{text}"
    );
    let denied = [
        ("reporter", "destination"),
        ("source_principal", ADMIN),
        ("destination_workload", "api-0"),
        ("reason", "no_traffic_target"),
    ];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &denied),
        1,
        "{text}"
    );
    let closed = [("source_principal", ADMIN), ("response_flags", "DENY")];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &closed),
        1,
        "{text}"
    );
    // The reason in words stays with the destination (`mesh-agent flows`, the access log).
    let events = telemetry.recent(0);
    let refusal = events
        .iter()
        .find(|e| e.verdict == "denied")
        .expect("the refusal among the ended connections");
    assert_eq!(refusal.reason, Some("no_traffic_target"));
    let detail = refusal.detail.as_deref().unwrap_or_default();
    assert!(detail.contains(ADMIN), "{detail}");
}

/// The metrics once no connection is open any more.
async fn eventually_closed(registry: &Registry, telemetry: &Telemetry) -> String {
    tokio::time::timeout(Duration::from_secs(10), telemetry.idle())
        .await
        .expect("every connection closes");
    encode(registry)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_carried_and_counted_or_refused_by_the_tls_mode() {
    // The application: answers with what it got, upper-cased.
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app_addr = app.local_addr().expect("app address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if s.read_to_end(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf.to_ascii_uppercase()).await;
                }
            });
        }
    });
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    // "15006": every connection it accepts is handled by the pod's plaintext side.
    let serve = |mode: TlsMode| {
        let handler = Arc::new(PlaintextInbound {
            pod: pod(),
            ip: POD_IP,
            store: crate::state::holding(&config(mode, TrafficPolicyMode::Permissive)),
            dial: Arc::new(move |_| Box::pin(TcpStream::connect(app_addr))),
            telemetry: telemetry.clone(),
            idle_timeout: Duration::from_secs(60),
            http: crate::l7::HttpConfig::default(),
            node: crate::inbound::NodeAddresses::Fixed(Default::default()),
        });
        async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15006");
            let addr = listener.local_addr().expect("address");
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    let handler = handler.clone();
                    tokio::spawn(async move { handler.handle(conn).await });
                }
            });
            addr
        }
    };
    let call = |addr: SocketAddr| async move {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(b"hello").await;
        let _ = s.shutdown().await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
            .await
            .expect("an answer or a close in time");
        answer
    };

    let permissive = serve(TlsMode::Permissive).await;
    assert_eq!(call(permissive).await, b"HELLO");
    let strict = serve(TlsMode::Strict).await;
    assert_eq!(call(strict).await, b"", "STRICT closes plaintext at once");

    let text = eventually_closed(&registry, &telemetry).await;
    let carried = [
        ("reporter", "destination"),
        ("source_principal", "unknown"),
        ("destination_workload", "api-0"),
        ("mesh_path", "plaintext"),
        ("connection_security_policy", "none"),
        ("response_flags", "-"),
    ];
    assert_eq!(
        sample(&text, "istio_tcp_connections_closed_total", &carried),
        1,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_received_bytes_total", &carried),
        5,
        "{text}"
    );
    assert_eq!(
        sample(&text, "istio_tcp_sent_bytes_total", &carried),
        5,
        "{text}"
    );
    let denied = [("reporter", "destination"), ("reason", "plaintext_strict")];
    assert_eq!(
        sample(&text, "mesh_tcp_connections_denied_total", &denied),
        1,
        "{text}"
    );
}

#[test]
fn a_connection_made_to_the_inbound_listener_itself_has_no_destination() {
    let pod_ip = Ipv4Addr::new(10, 244, 1, 10);
    let steered: SocketAddr = "10.244.1.10:9999".parse().expect("addr");
    assert_eq!(
        steered_destination(Some(steered), pod_ip)
            .expect("steered")
            .to_string(),
        "10.244.1.10:9999"
    );
    for local in ["127.0.0.1:15006", "127.0.0.53:15006", "10.244.1.11:9999"] {
        let e = steered_destination(Some(local.parse().expect("addr")), pod_ip).expect_err(local);
        assert_eq!(e.kind(), "not_steered", "{local}");
        assert!(e.to_string().contains(local), "{e}");
    }
    let v6: SocketAddr = "[::1]:15006".parse().expect("addr");
    assert_eq!(
        steered_destination(Some(v6), pod_ip)
            .expect_err("v6")
            .kind(),
        "not_ipv4"
    );
    assert_eq!(
        steered_destination(None, pod_ip).expect_err("none").kind(),
        "not_ipv4"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_caller_reaches_the_application_in_its_ports_declared_protocol() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use mesh_core::model::{Endpoint, Protocol, Service, ServicePort};

    // The application speaks HTTP/1.1 only: it answers the version and Host it got, and
    // switches to a byte echo on an upgrade.
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app_addr = app.local_addr().expect("app address");
    tokio::spawn(async move {
        while let Ok((conn, _)) = app.accept().await {
            let service = hyper::service::service_fn(|mut request: http::Request<_>| async move {
                let mut response = http::Response::new(crate::l7::full(format!(
                    "{:?} {}",
                    request.version(),
                    request.headers()["host"].to_str().unwrap_or("-")
                )));
                if request.headers().contains_key("upgrade") {
                    let on = hyper::upgrade::on(&mut request);
                    tokio::spawn(async move {
                        let mut io = TokioIo::new(on.await.expect("switched"));
                        let mut buf = [0u8; 64];
                        while let Ok(n @ 1..) = io.read(&mut buf).await {
                            let _ = io.write_all(&buf[..n].to_ascii_uppercase()).await;
                        }
                    });
                    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    response
                        .headers_mut()
                        .insert("connection", http::HeaderValue::from_static("upgrade"));
                    response
                        .headers_mut()
                        .insert("upgrade", http::HeaderValue::from_static("websocket"));
                }
                Ok::<_, std::convert::Infallible>(response)
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), service)
                    .with_upgrades(),
            );
        }
    });

    // "15006", at the pod's address; the port it is bound to is the one declared `http`.
    let listener = TcpListener::bind((POD_IP, 0)).await.expect("bind 15006");
    let addr = listener.local_addr().expect("address");
    let mut cfg = config(TlsMode::Permissive, TrafficPolicyMode::Permissive);
    let service = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
        ports: vec![ServicePort {
            name: "web".into(),
            port: 80,
            target_port: addr.port(),
            protocol: Protocol::Http,
        }],
        endpoints: vec![Endpoint {
            ip: POD_IP,
            workload: Some(pod()),
            identity: Some(id(API)),
            node: Some("node-b".into()),
            ready: true,
        }],
    };
    cfg.services = Arc::new([(service.name.clone(), Arc::new(service))].into());
    let mut registry = Registry::default();
    let handler = Arc::new(PlaintextInbound {
        pod: pod(),
        ip: POD_IP,
        store: crate::state::holding(&cfg),
        dial: Arc::new(move |_| Box::pin(TcpStream::connect(app_addr))),
        telemetry: Telemetry::new(&mut registry),
        idle_timeout: Duration::from_secs(60),
        http: crate::l7::HttpConfig::default(),
        node: crate::inbound::NodeAddresses::Fixed(Default::default()),
    });
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move { handler.handle(conn).await });
        }
    });

    // HTTP/2 with prior knowledge, to an application that only speaks HTTP/1.1.
    let conn = TcpStream::connect(addr).await.expect("connect");
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
            .await
            .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let request = http::Request::get("http://api.shop/x")
        .body(crate::l7::empty())
        .expect("request");
    let response = h2.send_request(request).await.expect("response");
    assert_eq!(response.status(), http::StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    assert_eq!(body, "HTTP/1.1 api.shop");

    // A WebSocket upgrade from a plaintext caller switches too.
    let conn = TcpStream::connect(addr).await.expect("connect");
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection.with_upgrades());
    let request = http::Request::get("/ws")
        .header("host", "api.shop")
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .body(crate::l7::empty())
        .expect("request");
    let response = h1.send_request(request).await.expect("response");
    assert_eq!(response.status(), http::StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(response).await.expect("switched"));
    io.write_all(b"ping").await.expect("write");
    let mut pong = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), io.read_exact(&mut pong))
        .await
        .expect("in time")
        .expect("read");
    assert_eq!(&pong, b"PING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http_tunnel_is_closed_after_the_configured_idle_timeout() {
    use mesh_core::model::{Endpoint, Protocol, Service, ServicePort};

    let ca = TestCa::new("inbound-idle-ca");
    let hour = Duration::from_secs(3600);
    let (api_mgr, _) = manager(&TestSigner::new(ca.clone(), hour));
    let (web_mgr, _) = manager(&TestSigner::new(ca, hour));
    api_mgr.fetch(&id(API)).await.expect("api certificate");
    web_mgr.fetch(&id(WEB)).await.expect("web certificate");

    // An HTTP/2 port (the application is never reached: the caller sends no request).
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let SocketAddr::V4(app_addr) = app.local_addr().expect("app address") else {
        unreachable!("bound to IPv4")
    };
    let mut cfg = config(TlsMode::Strict, TrafficPolicyMode::DefaultDeny);
    cfg.policies.get_mut(&pod()).expect("policy").rules[0].ports = vec![app_addr.port()];
    let service = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(Ipv4Addr::new(10, 96, 0, 1)),
        ports: vec![ServicePort {
            name: "grpc".into(),
            port: 9090,
            target_port: app_addr.port(),
            protocol: Protocol::Grpc,
        }],
        endpoints: vec![Endpoint {
            ip: POD_IP,
            workload: Some(pod()),
            identity: Some(id(API)),
            node: Some("node-b".into()),
            ready: true,
        }],
    };
    cfg.services = Arc::new([(service.name.clone(), Arc::new(service))].into());
    let idle = Duration::from_millis(300);
    let handler = PodInbound {
        pod: pod(),
        store: crate::state::holding(&cfg),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        telemetry: Telemetry::new(&mut Registry::default()),
        http: crate::l7::HttpConfig::default(),
        idle_timeout: idle,
    };
    let tls = tls::server_config(api_mgr, id(API)).expect("server TLS");
    let server = Arc::new(HboneServer::new(tls, handler, ServerConfig::default()).expect("server"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
    let hbone_addr = listener.local_addr().expect("address");
    tokio::spawn(server.clone().serve(listener));

    // An HTTP/2 connection that opens and then says nothing.
    let web = HbonePool::new(web_mgr, PoolConfig::default()).expect("pool");
    let mut t = web
        .connect(&id(WEB), hbone_addr, &id(API), SocketAddr::V4(app_addr))
        .await
        .expect("admitted");
    t.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .expect("preface");
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the idle connection was still open after 10 s (its idle timeout is {idle:?})"
    );
    assert!(started.elapsed() >= idle, "closed before the idle timeout");
}

/// A STRICT pod whose probes name `probe_ports`.
fn probed(probe_ports: Vec<u16>) -> NodeSnapshot {
    let mut c = config(TlsMode::Strict, TrafficPolicyMode::DefaultDeny);
    c.node_pods.insert(
        pod(),
        mesh_core::model::NodePod {
            name: pod(),
            uid: "u".into(),
            meshed: true,
            mode: TlsMode::Strict,
            ports: vec![],
            excluded_inbound_ports: vec![],
            probe_ports,
        },
    );
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_probes_a_strict_pod_s_probe_ports_in_plaintext_and_nothing_else_gets_in() {
    let app = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
    let app_addr = app.local_addr().expect("app address");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() {
                    let _ = s.write_all(&buf.to_ascii_uppercase()).await;
                }
            });
        }
    });
    let mut registry = Registry::default();
    let telemetry = Telemetry::new(&mut registry);
    // "15006" of a pod whose probes name `probe` (None: the listener's own port), with
    // `node` as the node's addresses; the answer to a call from 127.0.0.1.
    let call = |probe: Option<u16>, node: Vec<std::net::IpAddr>| {
        let telemetry = telemetry.clone();
        async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15006");
            let addr = listener.local_addr().expect("address");
            let handler = Arc::new(PlaintextInbound {
                pod: pod(),
                ip: POD_IP,
                store: crate::state::holding(&probed(vec![probe.unwrap_or(addr.port())])),
                dial: Arc::new(move |_| Box::pin(TcpStream::connect(app_addr))),
                telemetry,
                idle_timeout: Duration::from_secs(60),
                http: crate::l7::HttpConfig::default(),
                node: NodeAddresses::Fixed(Arc::new(node)),
            });
            tokio::spawn(async move {
                while let Ok((conn, _)) = listener.accept().await {
                    let handler = handler.clone();
                    tokio::spawn(async move { handler.handle(conn).await });
                }
            });
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(b"hello").await;
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
                .await
                .expect("an answer or a close in time");
            answer
        }
    };
    let localhost = vec![std::net::IpAddr::from(POD_IP)];
    // From the node, to a probe port: carried, although the pod is STRICT and no
    // TrafficTarget admits anyone unauthenticated. As IPv4-mapped too.
    assert_eq!(call(None, localhost.clone()).await, b"HELLO");
    let mapped = vec![std::net::IpAddr::from(POD_IP.to_ipv6_mapped())];
    assert_eq!(call(None, mapped).await, b"HELLO");
    // From the node, to another port; from elsewhere, to the probe port: refused.
    assert_eq!(call(Some(1), localhost).await, b"");
    let elsewhere = vec![std::net::IpAddr::from(Ipv4Addr::new(10, 0, 0, 1))];
    assert_eq!(call(None, elsewhere).await, b"");

    // Admitted as a probe, a connection stays admitted while the port is a probe port.
    let probe = Admission {
        caller: None,
        requests_checked: false,
        node_probe: true,
    };
    assert!(
        recheck(
            &Applied::new(None, probed(vec![8080])),
            &pod(),
            at(8080),
            &probe
        )
        .is_ok()
    );
    let r = recheck(
        &Applied::new(None, probed(vec![9090])),
        &pod(),
        at(8080),
        &probe,
    )
    .expect_err("not a probe port");
    assert_eq!(r.kind, "not_a_probe_port");
}

#[test]
fn the_node_s_own_addresses_are_read_from_its_network_namespace() {
    let local = NodeAddresses::Local;
    assert!(local.contains(std::net::IpAddr::from(Ipv4Addr::LOCALHOST)));
    assert!(!local.contains(std::net::IpAddr::from(Ipv4Addr::new(192, 0, 2, 77))));
}

/// `config` as the configuration in force, with its indexes.
fn applied(config: &NodeSnapshot) -> Applied {
    Applied::new(None, config.clone())
}
