//! L7 through two proxies on loopback: web-0's outbound side on node-a, api-v1-0 and
//! api-v2-0 on node-b behind HBONE, with real HTTP/1.1 and gRPC (tonic) applications.

use std::sync::Mutex;

use ::http::{Method, Request as HttpRequest, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_core::model::{Endpoint, SplitBackend, TrafficSplit};
use mesh_core::policy::{AnchoredRegex, HeaderMatch, HttpMatch};
use mesh_core::route::{
    HeaderModifier, HeaderValueMatch, ParentRef, PathMatch, RequestMatch, Route, RouteBackend,
    RouteKind, RouteRule, ValueMatch,
};
use mesh_demo::grpc::proto::echo_client::EchoClient;
use mesh_demo::grpc::proto::{CountRequest, Number, SayRequest};
use mesh_demo::grpc::{GrpcServer, POD_TRAILER};

use super::*;

const V1_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const V2_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const HTTP_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 80);
const GRPC_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 20), 9090);

/// What the HTTP applications of both pods received: `pod METHOD path`.
type Hits = Arc<Mutex<Vec<String>>>;

/// An HTTP/1.1 + HTTP/2 application: `/api/status/<code>` answers `<code>`, `/api/delay/<ms>`
/// answers after a while, anything else 200 with `pod`, the caller header and `x-route`.
async fn http_app(listener: TcpListener, pod: &'static str, hits: Hits) {
    while let Ok((conn, _)) = listener.accept().await {
        let hits = hits.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: HttpRequest<Incoming>| {
                let hits = hits.clone();
                async move {
                    let path = req.uri().path().to_owned();
                    hits.lock()
                        .expect("hits")
                        .push(format!("{pod} {} {path}", req.method()));
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let mut status = StatusCode::OK;
                    if let Some(code) = path.strip_prefix("/api/status/") {
                        status = code
                            .parse()
                            .ok()
                            .and_then(|c| StatusCode::from_u16(c).ok())
                            .unwrap_or(StatusCode::BAD_REQUEST);
                    }
                    if let Some(ms) = path.strip_prefix("/api/delay/") {
                        let ms = ms.parse().unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    let body = format!(
                        "pod={pod} xfcc={} route={}",
                        header(crate::l7::IDENTITY_HEADER),
                        header("x-route")
                    );
                    let mut response = hyper::Response::new(Full::new(Bytes::from(body)));
                    *response.status_mut() = status;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = crate::l7::server()
                .serve_connection(TokioIo::new(conn), service)
                .await;
        });
    }
}

/// Binds `ip` at the port `other` is bound to, for the second pod of a service.
async fn bind_beside(ip: Ipv4Addr) -> (TcpListener, TcpListener) {
    for _ in 0..50 {
        let first = TcpListener::bind((V1_IP, 0)).await.expect("bind");
        let port = first.local_addr().expect("address").port();
        if let Ok(second) = TcpListener::bind((ip, port)).await {
            return (first, second);
        }
    }
    panic!("no port free on both {V1_IP} and {ip}");
}

fn service(name: &str, vip: [u8; 4], http: u16, grpc: u16, pods: &[&Workload]) -> Service {
    Service {
        name: NamespacedName::new("shop", name),
        vip: Some(Ipv4Addr::from(vip)),
        ports: vec![
            ServicePort {
                name: "http".into(),
                port: HTTP_VIP.port(),
                target_port: http,
                protocol: Protocol::Http,
            },
            ServicePort {
                name: "grpc".into(),
                port: GRPC_VIP.port(),
                target_port: grpc,
                protocol: Protocol::Grpc,
            },
        ],
        endpoints: pods
            .iter()
            .map(|w| Endpoint {
                ip: w.ips[0],
                workload: Some(w.name.clone()),
                identity: Some(w.identity.clone()),
                node: Some("node-b".into()),
                ready: true,
            })
            .collect(),
    }
}

fn regex(s: &str) -> AnchoredRegex {
    AnchoredRegex::new(s).expect("regex")
}

struct Mesh {
    /// web-0's captured connections to the HTTP port and to the gRPC port.
    http: SocketAddr,
    grpc: SocketAddr,
    hits: Hits,
    source_metrics: Registry,
    /// web-0's telemetry.
    source: Telemetry,
    destination_metrics: Registry,
    /// web-0's HBONE pool.
    pool: HbonePool,
    _registrations: Vec<crate::local::Registration>,
}

/// How requests travel between the two proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// As streams of the HBONE connection (both sides offer them: the default).
    Streams,
    /// In CONNECT tunnels: web-0's pool does not offer request streams.
    SourceTunnels,
    /// In CONNECT tunnels: node-b's proxy offers only `h2`, as before request streams.
    OldDestination,
}

/// The two-node mesh; `routes` are node-a's Gateway API routes (none: the 90/10 split applies).
async fn mesh(routes: Vec<Route>) -> Mesh {
    mesh_with(routes, false).await
}

/// `same_node`: the api pods are pods of web-0's agent, reached in process.
async fn mesh_with(routes: Vec<Route>, same_node: bool) -> Mesh {
    let http = crate::l7::HttpConfig::default();
    mesh_configured(routes, same_node, http, http, Form::Streams).await
}

/// With the L7 settings of the source (web-0) and of the destination (the api pods).
async fn mesh_configured(
    routes: Vec<Route>,
    same_node: bool,
    source_http: crate::l7::HttpConfig,
    destination_http: crate::l7::HttpConfig,
    form: Form,
) -> Mesh {
    let ca = TestCa::new("l7-test-ca");
    let hour = Duration::from_secs(3600);
    let (a_mgr, _) = manager(&TestSigner::new(ca.clone(), hour));
    let (b_mgr, _) = manager(&TestSigner::new(ca, hour));
    a_mgr.fetch(&id(WEB)).await.expect("web certificate");
    b_mgr.fetch(&id(API)).await.expect("api certificate");

    let hits: Hits = Arc::default();
    let (h1, h2) = bind_beside(V2_IP).await;
    let http_port = h1.local_addr().expect("address").port();
    tokio::spawn(http_app(h1, "api-v1", hits.clone()));
    tokio::spawn(http_app(h2, "api-v2", hits.clone()));
    let (g1, g2) = bind_beside(V2_IP).await;
    let grpc_port = g1.local_addr().expect("address").port();
    for (listener, name) in [(g1, "api-v1"), (g2, "api-v2")] {
        let addr = listener.local_addr().expect("address");
        drop(listener);
        let server = GrpcServer::bind(addr, name).await.expect("gRPC server");
        tokio::spawn(server.serve(futures::future::pending()));
    }

    let web0 = workload("web-0", "web", Ipv4Addr::new(127, 0, 0, 2), "node-a");
    let v1 = workload("api-v1-0", "api", V1_IP, "node-b");
    let v2 = workload("api-v2-0", "api", V2_IP, "node-b");
    let services: BTreeMap<_, _> = [
        service("api", [10, 96, 0, 20], http_port, grpc_port, &[&v1, &v2]),
        service("api-v1", [10, 96, 0, 21], http_port, grpc_port, &[&v1]),
        service("api-v2", [10, 96, 0, 22], http_port, grpc_port, &[&v2]),
    ]
    .into_iter()
    .map(|s| (s.name.clone(), Arc::new(s)))
    .collect();
    let services = Arc::new(services);
    let split = TrafficSplit {
        name: NamespacedName::new("shop", "api-split"),
        root: NamespacedName::new("shop", "api"),
        backends: vec![
            SplitBackend {
                service: NamespacedName::new("shop", "api-v1"),
                weight: 90,
            },
            SplitBackend {
                service: NamespacedName::new("shop", "api-v2"),
                weight: 10,
            },
        ],
        matches: vec![],
    };
    let node_a = NodeSnapshot {
        node: "node-a".into(),
        workloads: [(web0.name.clone(), web0.clone())].into(),
        services: services.clone(),
        splits: Arc::new([(split.name.clone(), split)].into()),
        http_routes: Arc::new(routes.into_iter().map(|r| (r.name.clone(), r)).collect()),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };
    let rules = vec![
        Rule {
            traffic_target: NamespacedName::new("shop", "web-to-api"),
            sources: vec![id(WEB)],
            ports: vec![http_port],
            route: RouteMatch::Http(vec![HttpMatch {
                name: "api".into(),
                path: Some(regex("/api/.*")),
                methods: vec![],
                headers: vec![],
            }]),
        },
        Rule {
            traffic_target: NamespacedName::new("shop", "web-to-echo"),
            sources: vec![id(WEB)],
            ports: vec![grpc_port],
            route: RouteMatch::Http(vec![HttpMatch {
                name: "blue-tenant".into(),
                path: Some(regex("/mesh\\.demo\\.v1\\.Echo/.*")),
                methods: vec!["POST".into()],
                headers: vec![HeaderMatch {
                    name: "x-tenant".into(),
                    value: regex("blue"),
                }],
            }]),
        },
    ];
    let policy = |w: &Workload| InboundPolicy {
        workload: w.name.clone(),
        identity: w.identity.clone(),
        mode: TrafficPolicyMode::DefaultDeny,
        tls_mode: TlsMode::Strict,
        rules: rules.clone(),
    };
    let node_b = NodeSnapshot {
        node: "node-b".into(),
        workloads: [(v1.name.clone(), v1.clone()), (v2.name.clone(), v2.clone())].into(),
        policies: [
            (v1.name.clone(), policy(&v1)),
            (v2.name.clone(), policy(&v2)),
        ]
        .into(),
        services,
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };

    // node-b: one HBONE server per pod.
    let mut destination_metrics = Registry::default();
    let destination = Telemetry::new(&mut destination_metrics);
    let store = crate::state::holding(&node_b);
    let mut hbone = std::collections::HashMap::new();
    let local = Arc::new(crate::local::LocalPods::default());
    let mut registrations = vec![];
    for pod in [&v1, &v2] {
        let inbound = PodInbound {
            pod: pod.name.clone(),
            store: store.clone(),
            dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
            telemetry: destination.clone(),
            http: destination_http,
            idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
        };
        if same_node {
            registrations.push(local.register(crate::local::LocalPod {
                ip: pod.ips[0],
                inbound: inbound.clone(),
            }));
        }
        let mut tls = tls::server_config(b_mgr.clone(), id(API)).expect("server TLS");
        if form == Form::OldDestination {
            let mut old = (*tls).clone();
            old.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
            tls = Arc::new(old);
        }
        let server =
            Arc::new(HboneServer::new(tls, inbound, ServerConfig::default()).expect("server"));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
        hbone.insert(pod.ips[0], listener.local_addr().expect("address"));
        tokio::spawn(server.serve(listener));
    }

    let dialer: Dialer = Arc::new(move |addr: SocketAddr| {
        let SocketAddr::V4(v4) = addr else {
            panic!("IPv4 only")
        };
        assert_eq!(v4.port(), HBONE_PORT, "HBONE goes to the pod's 15008");
        let to = hbone[v4.ip()];
        Box::pin(TcpStream::connect(to))
    });
    let config = PoolConfig {
        requests: form != Form::SourceTunnels,
        ..PoolConfig::default()
    };
    let pool = HbonePool::with_dialer(a_mgr, config, dialer).expect("pool");
    let mut source_metrics = Registry::default();
    let source = Telemetry::new(&mut source_metrics);
    let outbound = Arc::new(
        PodOutbound::new(
            web0.name.clone(),
            crate::state::holding(&node_a),
            pool.clone(),
            Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
            OutboundConfig {
                http: source_http,
                ..OutboundConfig::default()
            },
            source.clone(),
        )
        .with_local_pods(local),
    );
    let mut captures = vec![];
    for dst in [HTTP_VIP, GRPC_VIP] {
        let capture = TcpListener::bind("127.0.0.1:0").await.expect("bind 15001");
        captures.push(capture.local_addr().expect("address"));
        let proxy = outbound.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = capture.accept().await {
                let proxy = proxy.clone();
                tokio::spawn(async move { proxy.handle(conn, dst).await });
            }
        });
    }
    Mesh {
        http: captures[0],
        grpc: captures[1],
        hits,
        source_metrics,
        source,
        destination_metrics,
        pool,
        _registrations: registrations,
    }
}

/// An HTTP/1.1 connection of web-0's application, as the datapath would capture it.
async fn client(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let conn = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = http1::handshake(TokioIo::new(conn))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    sender
}

async fn call(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String) {
    let mut request = HttpRequest::builder()
        .method(method)
        .uri(path)
        .header("host", "api.shop");
    for (n, v) in headers {
        request = request.header(*n, *v);
    }
    let request = request.body(Full::new(Bytes::new())).expect("request");
    sender.ready().await.expect("ready");
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("in time")
        .expect("response");
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn hits_of(mesh: &Mesh, what: &str) -> usize {
    mesh.hits
        .lock()
        .expect("hits")
        .iter()
        .filter(|h| h.ends_with(what))
        .count()
}

#[tokio::test]
async fn each_request_is_authorized_on_its_own_and_the_app_sees_the_verified_caller() {
    let mesh = mesh(vec![]).await;
    let mut c = client(mesh.http).await;
    let spoof = [(
        crate::l7::IDENTITY_HEADER,
        "URI=spiffe://cluster.local/ns/shop/sa/admin",
    )];
    let (status, body) = call(&mut c, Method::GET, "/api/items", &spoof).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains(&format!("xfcc=By={API};URI={WEB}")),
        "the destination sets the verified caller, whatever the client sent: {body}"
    );
    // Same connection, a path no rule allows: refused by the destination, never passed on.
    let (status, body) = call(&mut c, Method::GET, "/admin", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body, "access denied\n", "a plain refusal, no policy names");
    assert_eq!(hits_of(&mesh, "GET /admin"), 0);
    // And the connection still carries the next request (keep-alive end to end).
    let (status, _) = call(&mut c, Method::GET, "/api/again", &[]).await;
    assert_eq!(status, StatusCode::OK);

    let destination = encode(&mesh.destination_metrics);
    let denied = sample(
        &destination,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "403"),
            ("response_flags", "DENY"),
        ],
    );
    assert_eq!(denied, 1, "{destination}");
    let allowed = sample(
        &destination,
        "istio_requests_total",
        &[
            ("reporter", "destination"),
            ("response_code", "200"),
            ("source_principal", WEB),
            ("route", "TrafficTarget shop/web-to-api#api"),
        ],
    );
    assert_eq!(allowed, 2, "{destination}");
    let source = encode(&mesh.source_metrics);
    assert_eq!(
        sample(
            &source,
            "istio_requests_total",
            &[("reporter", "source"), ("response_code", "403")]
        ),
        1,
        "{source}"
    );
    // The application's connection is labelled by how its requests travel.
    assert_eq!(
        sample(
            &source,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("mesh_path", "hbone"),
                ("connection_security_policy", "mutual_tls")
            ]
        ),
        1,
        "{source}"
    );
    let pool = mesh.pool.stats().snapshot();
    assert_eq!(
        (pool.requests, pool.streams_opened),
        (3, 0),
        "each request went as a stream of the HBONE connection, none in a tunnel"
    );
}

#[tokio::test]
async fn requests_go_in_tunnels_to_a_proxy_without_request_streams_or_from_one() {
    for form in [Form::OldDestination, Form::SourceTunnels] {
        let http = crate::l7::HttpConfig::default();
        let mesh = mesh_configured(vec![], false, http, http, form).await;
        let mut c = client(mesh.http).await;
        let (status, body) = call(&mut c, Method::GET, "/api/items", &[]).await;
        assert_eq!(status, StatusCode::OK, "{form:?}: {body}");
        assert!(
            body.contains(&format!("xfcc=By={API};URI={WEB}")),
            "{form:?}: {body}"
        );
        let (status, body) = call(&mut c, Method::GET, "/admin", &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form:?}: {body}");
        assert_eq!(hits_of(&mesh, "GET /admin"), 0, "{form:?}");
        let (status, _) = call(&mut c, Method::GET, "/api/again", &[]).await;
        assert_eq!(status, StatusCode::OK, "{form:?}");
        let pool = mesh.pool.stats().snapshot();
        assert_eq!(pool.requests, 0, "{form:?}: no request went as a stream");
        assert!(pool.streams_opened >= 1, "{form:?}: {pool:?}");
    }
}

#[tokio::test]
async fn a_90_10_split_applies_per_request() {
    let mesh = mesh(vec![]).await;
    let mut c = client(mesh.http).await;
    let mut v2: u32 = 0;
    let total: u32 = 2000;
    for i in 0..total {
        let (status, body) = call(&mut c, Method::GET, &format!("/api/{i}"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if body.contains("pod=api-v2") {
            v2 += 1;
        }
    }
    let share = f64::from(v2) * 100.0 / f64::from(total);
    assert!(
        (7.0..=13.0).contains(&share),
        "api-v2 got {share:.1}% of {total} requests on one connection, not 10 +- 3"
    );
    let source = encode(&mesh.source_metrics);
    assert_eq!(
        sample(
            &source,
            "istio_requests_total",
            &[("reporter", "source"), ("destination_workload", "api-v2-0")]
        ),
        u64::from(v2),
        "{source}"
    );
}

#[tokio::test]
async fn idempotent_requests_are_retried_and_posts_never() {
    let mesh = mesh(vec![]).await;
    let mut c = client(mesh.http).await;
    let (status, _) = call(&mut c, Method::GET, "/api/status/503", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        hits_of(&mesh, "GET /api/status/503"),
        1 + crate::l7::retry::MAX_RETRIES as usize,
        "a failing GET is tried again"
    );
    let (status, _) = call(&mut c, Method::POST, "/api/status/503", &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        hits_of(&mesh, "POST /api/status/503"),
        1,
        "a POST is never retried"
    );
    // A failure the retry cannot cure is not retried either.
    let (status, _) = call(&mut c, Method::GET, "/api/status/500", &[]).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(hits_of(&mesh, "GET /api/status/500"), 1);
}

#[tokio::test]
async fn an_httproute_routes_by_header_sets_headers_and_times_out() {
    let api = NamespacedName::new("shop", "api");
    let backend = |name: &str| RouteBackend {
        service: NamespacedName::new("shop", name),
        port: None,
        weight: 1,
    };
    let route = Route {
        name: NamespacedName::new("shop", "api-route"),
        kind: RouteKind::Http,
        parents: vec![ParentRef {
            service: api,
            port: Some(HTTP_VIP.port()),
        }],
        rules: vec![
            RouteRule {
                matches: vec![RequestMatch {
                    path: Some(PathMatch::Prefix("/api".into())),
                    method: None,
                    headers: vec![HeaderValueMatch {
                        name: "x-version".into(),
                        value: ValueMatch::Exact("v2".into()),
                    }],
                }],
                backends: vec![backend("api-v2")],
                request_headers: HeaderModifier {
                    set: vec![("x-route".into(), "by-header".into())],
                    ..HeaderModifier::default()
                },
                timeout: None,
            },
            RouteRule {
                matches: vec![RequestMatch {
                    path: Some(PathMatch::Prefix("/api/delay".into())),
                    method: None,
                    headers: vec![],
                }],
                backends: vec![backend("api-v1")],
                request_headers: HeaderModifier::default(),
                timeout: Some(Duration::from_millis(300)),
            },
            RouteRule {
                matches: vec![RequestMatch {
                    path: Some(PathMatch::Prefix("/api".into())),
                    method: None,
                    headers: vec![],
                }],
                backends: vec![backend("api-v1")],
                request_headers: HeaderModifier::default(),
                timeout: None,
            },
        ],
    };
    let mesh = mesh(vec![route]).await;
    let mut c = client(mesh.http).await;
    for i in 0..20 {
        let (_, body) = call(
            &mut c,
            Method::GET,
            &format!("/api/{i}"),
            &[("x-version", "v2")],
        )
        .await;
        assert!(
            body.contains("pod=api-v2 ") && body.contains("route=by-header"),
            "{body}"
        );
        let (_, body) = call(&mut c, Method::GET, &format!("/api/{i}"), &[]).await;
        assert!(
            body.contains("pod=api-v1 ") && body.contains("route=-"),
            "the route wins over the split: {body}"
        );
    }
    // Nothing matches outside /api: 404 from the source's proxy.
    let (status, body) = call(&mut c, Method::GET, "/elsewhere", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "no route\n", "the route and service are not named");
    let started = std::time::Instant::now();
    let (status, body) = call(&mut c, Method::GET, "/api/delay/5000", &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(body, "upstream timeout\n");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let source = encode(&mesh.source_metrics);
    assert_eq!(
        sample(
            &source,
            "istio_requests_total",
            &[("response_code", "504"), ("response_flags", "UT")]
        ),
        1,
        "{source}"
    );
}

#[tokio::test]
async fn grpc_calls_of_every_kind_pass_with_trailers_and_a_denied_call_is_permission_denied() {
    let mesh = mesh(vec![]).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.grpc))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut echo = EchoClient::new(channel);
    fn blue<T>(mut r: tonic::Request<T>) -> tonic::Request<T> {
        r.metadata_mut()
            .insert("x-tenant", "blue".parse().expect("value"));
        r
    }

    let reply = echo
        .say(blue(tonic::Request::new(SayRequest {
            message: "hi".into(),
            ..SayRequest::default()
        })))
        .await
        .expect("unary");
    assert!(reply.metadata().get(POD_TRAILER).is_some(), "trailer kept");
    assert_eq!(reply.get_ref().caller, format!("By={API};URI={WEB}"));

    let mut stream = echo
        .count(blue(tonic::Request::new(CountRequest {
            n: 5,
            delay_ms: 0,
        })))
        .await
        .expect("server streaming")
        .into_inner();
    let mut indexes = vec![];
    while let Some(r) = stream.message().await.expect("message") {
        indexes.push(r.index);
    }
    assert_eq!(indexes, vec![0, 1, 2, 3, 4]);
    let trailers = stream.trailers().await.expect("trailers").expect("some");
    assert!(trailers.get(POD_TRAILER).is_some());

    let numbers = futures::stream::iter((1..=10).map(|value| Number { value }));
    let total = echo
        .sum(blue(tonic::Request::new(numbers)))
        .await
        .expect("client streaming")
        .into_inner();
    assert_eq!((total.total, total.count), (55, 10));

    let messages = futures::stream::iter((0..3).map(|i| SayRequest {
        message: format!("m{i}"),
        ..SayRequest::default()
    }));
    let mut chat = echo
        .chat(blue(tonic::Request::new(messages)))
        .await
        .expect("bidi")
        .into_inner();
    let mut said = vec![];
    while let Some(r) = chat.message().await.expect("message") {
        said.push(r.message);
    }
    assert_eq!(said, vec!["m0", "m1", "m2"]);

    // An application status passes through as it is.
    let status = echo
        .say(blue(tonic::Request::new(SayRequest {
            message: "x".into(),
            fail_code: 5,
            ..SayRequest::default()
        })))
        .await
        .expect_err("NOT_FOUND");
    assert_eq!(status.code(), tonic::Code::NotFound);

    // Another tenant: the destination's policy refuses the call.
    let mut request = tonic::Request::new(SayRequest::default());
    request
        .metadata_mut()
        .insert("x-tenant", "red".parse().expect("value"));
    let status = echo.say(request).await.expect_err("denied");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert_eq!(status.message(), "access denied", "a plain refusal");
    let destination = encode(&mesh.destination_metrics);
    assert_eq!(
        sample(
            &destination,
            "istio_requests_total",
            &[("request_protocol", "grpc"), ("grpc_response_status", "7")]
        ),
        1,
        "{destination}"
    );
}

#[tokio::test]
async fn malformed_requests_are_refused_and_never_reach_the_app() {
    let mesh = mesh(vec![]).await;
    let exchange = |raw: Vec<u8>| async move {
        let mut conn = TcpStream::connect(mesh.http).await.expect("connect");
        conn.write_all(&raw).await.expect("write");
        let mut answer = vec![];
        let _ = tokio::time::timeout(WAIT, conn.read_to_end(&mut answer)).await;
        String::from_utf8_lossy(&answer).into_owned()
    };
    // Content-Length and Transfer-Encoding both: the chunked framing wins (RFC 9112 section
    // 6.3), the connection closes after the answer, and what follows the chunked body is never
    // read as a request.
    let smuggle = b"POST /api/a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
    let answer = exchange(smuggle).await;
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    assert_eq!(hits_of(&mesh, "/api/smuggled"), 0, "{:?}", mesh.hits);
    mesh.hits.lock().expect("hits").clear();
    // Transfer-Encoding other than chunked cannot be framed: refused.
    let answer =
        exchange(b"POST /api/te HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n".to_vec())
            .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Two different lengths: refused.
    let answer = exchange(
        b"POST /api/cl HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
            .to_vec(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = exchange(b"NOT A REQUEST\r\n\r\n".to_vec()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let mut big = b"GET /api/big HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 100 * 1024));
    big.extend(b"\r\n\r\n");
    let answer = exchange(big).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // Not HTTP/2 either: a preface followed by garbage frames.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend([0, 0, 4, 0xff, 0, 0, 0, 0, 1, 1, 2, 3, 4]);
    let _ = exchange(h2).await;
    assert!(
        mesh.hits.lock().expect("hits").is_empty(),
        "{:?}",
        mesh.hits
    );
    // The proxy is still serving.
    let mut c = client(mesh.http).await;
    assert_eq!(
        call(&mut c, Method::GET, "/api/ok", &[]).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn requests_to_a_pod_of_the_same_agent_are_checked_the_same_way() {
    let mesh = mesh_with(vec![], true).await;
    let mut c = client(mesh.http).await;
    let (status, body) = call(&mut c, Method::GET, "/api/local", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains(&format!("xfcc=By={API};URI={WEB}")), "{body}");
    let (status, body) = call(&mut c, Method::GET, "/admin", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(hits_of(&mesh, "GET /admin"), 0);
    let source = encode(&mesh.source_metrics);
    assert_eq!(
        sample(
            &source,
            "istio_requests_total",
            &[
                ("mesh_path", "same_node"),
                ("connection_security_policy", "node_local")
            ]
        ),
        2,
        "{source}"
    );
}

#[tokio::test]
async fn the_drain_closes_kept_alive_http_connections_at_once() {
    let mesh = mesh(vec![]).await;
    let mut c = client(mesh.http).await;
    assert_eq!(
        call(&mut c, Method::GET, "/api/a", &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        mesh.source.live(),
        1,
        "the application's connection is kept"
    );
    mesh.source.start_drain();
    tokio::time::timeout(Duration::from_secs(5), mesh.source.idle())
        .await
        .expect("an idle kept-alive connection closes when the drain starts, not at its end");
    let request = HttpRequest::get("/api/b")
        .header("host", "api.shop")
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert!(
        c.send_request(request).await.is_err(),
        "the application finds the connection closed"
    );
}

#[tokio::test]
async fn dot_segments_and_encodings_cannot_take_a_request_out_of_an_allowed_prefix() {
    let mesh = mesh(vec![]).await;
    let mut c = client(mesh.http).await;
    // The policy allows `/api/.*` only.
    for path in [
        "/api/../admin",
        "/api/%2e%2e/admin",
        "/api/%2E%2E/admin",
        "/api//../admin",
        "/api/./../admin",
    ] {
        let (status, body) = call(&mut c, Method::GET, path, &[]).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {body}");
    }
    for path in ["/api/..%2fadmin", "/api/..%5Cadmin", "/api/%00", "/api/%zz"] {
        let (status, body) = call(&mut c, Method::GET, path, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body, "bad request\n");
    }
    assert!(
        !mesh
            .hits
            .lock()
            .expect("hits")
            .iter()
            .any(|h| h.contains("admin")),
        "nothing reached the application: {:?}",
        mesh.hits.lock().expect("hits")
    );
    // What is allowed reaches the application normalized, as the policy saw it.
    for (path, seen) in [
        ("/api/./x", "GET /api/x"),
        ("/api/%78//y/", "GET /api/x/y/"),
        ("/api/a/../b?q=/../%2e", "GET /api/b"),
    ] {
        let (status, body) = call(&mut c, Method::GET, path, &[]).await;
        assert_eq!(status, StatusCode::OK, "{path}: {body}");
        assert_eq!(hits_of(&mesh, seen), 1, "{path}");
    }
    let source = encode(&mesh.source_metrics);
    assert_eq!(
        sample(
            &source,
            "istio_requests_total",
            &[("response_code", "400"), ("response_flags", "DPE")]
        ),
        4,
        "{source}"
    );
}

#[tokio::test]
async fn the_destination_normalizes_whatever_the_source_sends() {
    // A source that passes paths as they are (another mesh, an old agent, a hand-made
    // client on 15008): the destination's check does not depend on it.
    let loose = crate::l7::HttpConfig {
        paths: mesh_core::http_path::PathNormalization {
            normalize_path: false,
            merge_slashes: false,
            escaped_slashes: mesh_core::http_path::EscapedSlashes::Keep,
        },
        expose_refusal_reasons: false,
    };
    let mesh = mesh_configured(
        vec![],
        false,
        loose,
        crate::l7::HttpConfig::default(),
        Form::Streams,
    )
    .await;
    let mut c = client(mesh.http).await;
    let (status, body) = call(&mut c, Method::GET, "/api/%2e%2e/admin", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body) = call(&mut c, Method::GET, "/api/..%2Fadmin", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = call(&mut c, Method::GET, "/api/%2e/x", &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(hits_of(&mesh, "GET /api/x"), 1);
    assert!(
        !mesh
            .hits
            .lock()
            .expect("hits")
            .iter()
            .any(|h| h.contains("admin")),
        "{:?}",
        mesh.hits.lock().expect("hits")
    );
    let destination = encode(&mesh.destination_metrics);
    assert_eq!(
        sample(
            &destination,
            "istio_requests_total",
            &[("reporter", "destination"), ("response_code", "400")]
        ),
        1,
        "{destination}"
    );
}

#[tokio::test]
async fn refusal_reasons_reach_the_caller_only_when_exposed() {
    let exposed = crate::l7::HttpConfig {
        expose_refusal_reasons: true,
        ..crate::l7::HttpConfig::default()
    };
    let mesh = mesh_configured(vec![], false, exposed, exposed, Form::Streams).await;
    let mut c = client(mesh.http).await;
    let (status, body) = call(&mut c, Method::GET, "/admin", &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.contains("no HTTP match for GET /admin"), "{body}");
    assert!(body.contains(WEB), "{body}");
    let (status, body) = call(&mut c, Method::GET, "/api/..%2fadmin", &[]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body.contains("%2F"), "{body}");
}
