//! Stock clients and servers through the L7 proxy: the application is spoken to in its port's
//! declared protocol whatever the client speaks, upgrades (WebSocket), `Expect: 100-continue`,
//! streamed bodies both ways, HTTP/1.0 clients, gRPC deadlines and cancellation, trailers, and
//! HTTP ports whose endpoints have no proxy. web-0 on node-a calls api-0 on node-b through
//! HBONE, or as a pod of the same agent.

use std::future::Future;
use std::sync::Mutex;

use ::http::{Request as HttpRequest, Response as HttpResponse, StatusCode, Version};
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_core::policy::{AnchoredRegex, HttpMatch};

use super::*;
use crate::l7::Body;

const API_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
const PLAIN_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
/// The address of the endpoint that has no proxy.
const PLAIN_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);

/// What an application received: `VERSION METHOD path host`, in order.
type Seen = Arc<Mutex<Vec<String>>>;

fn note(seen: &Seen, request: &HttpRequest<Incoming>) {
    let host = request
        .headers()
        .get("host")
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned)
        .or_else(|| request.uri().authority().map(ToString::to_string))
        .unwrap_or_else(|| "-".into());
    seen.lock().expect("seen").push(format!(
        "{:?} {} {} {host}",
        request.version(),
        request.method(),
        request.uri().path()
    ));
}

/// Serves HTTP/1.1 only (with upgrades) on `listener` with `handler`.
fn serve_h1<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(HttpRequest<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |r| {
                    let f = handler(r);
                    async move { Ok::<_, std::convert::Infallible>(f.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(conn), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
}

/// Serves HTTP/2 with prior knowledge only on `listener` with `handler`.
fn serve_h2<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(HttpRequest<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse<Body>> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let service = service_fn(move |r| {
                    let f = handler(r);
                    async move { Ok::<_, std::convert::Infallible>(f.await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
}

/// A body of `frames`, then its end.
fn frames(frames: Vec<Frame<Bytes>>) -> Body {
    let stream = futures::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>));
    StreamBody::new(stream)
        .map_err(|never| match never {})
        .boxed()
}

/// An application answering 200 `ok <path>` (and the request body, when there is one);
/// under `/stream` it answers two chunks with no length.
fn echo(seen: Seen) -> impl Fn(HttpRequest<Incoming>) -> BoxedResponse + Clone + Send + Sync {
    move |request| {
        note(&seen, &request);
        Box::pin(async move {
            let path = request.uri().path().to_owned();
            if path.starts_with("/stream") {
                return HttpResponse::new(frames(vec![
                    Frame::data(Bytes::from_static(b"one ")),
                    Frame::data(Bytes::from_static(b"two")),
                ]));
            }
            let body = request
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let mut answer = format!("ok {path}").into_bytes();
            if !body.is_empty() {
                answer.push(b' ');
                answer.extend_from_slice(&body);
            }
            HttpResponse::new(crate::l7::full(answer))
        })
    }
}

type BoxedResponse = futures::future::BoxFuture<'static, HttpResponse<Body>>;

/// One port of a service: its number, its declared protocol, and the port of the
/// application behind it.
#[derive(Clone, Copy)]
struct Port {
    port: u16,
    protocol: Protocol,
    target: u16,
}

/// Serves HTTP/1.1 only with `handler` on a new port of `ip`.
async fn h1_app<F, Fut>(ip: Ipv4Addr, handler: F) -> u16
where
    F: Fn(HttpRequest<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse<Body>> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
    let port = listener.local_addr().expect("address").port();
    serve_h1(listener, handler);
    port
}

/// Serves HTTP/2 only with `handler` on a new port of `ip`.
async fn h2_app<F, Fut>(ip: Ipv4Addr, handler: F) -> u16
where
    F: Fn(HttpRequest<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = HttpResponse<Body>> + Send + 'static,
{
    let listener = TcpListener::bind((ip, 0)).await.expect("bind app");
    let port = listener.local_addr().expect("address").port();
    serve_h2(listener, handler);
    port
}

struct Compat {
    /// web-0's captured connections, by the service address the application dialled.
    captures: std::collections::HashMap<SocketAddrV4, SocketAddr>,
    _registrations: Vec<crate::local::Registration>,
}

impl Compat {
    fn capture(&self, vip: Ipv4Addr, port: u16) -> SocketAddr {
        self.captures[&SocketAddrV4::new(vip, port)]
    }
}

/// web-0 (node-a) -> api-0 (node-b, or this agent with `same_node`) with `ports` on the
/// service `api`, and `plain` on the service `plain` whose endpoint has no proxy. api-0's
/// policy lets web-0 call any path but those under `/denied`.
async fn compat(ports: Vec<Port>, plain: Vec<Port>, same_node: bool) -> Compat {
    compat_with(ports, plain, same_node, OutboundConfig::default()).await
}

/// [`compat`] with web-0's outbound settings.
async fn compat_with(
    ports: Vec<Port>,
    plain: Vec<Port>,
    same_node: bool,
    config: OutboundConfig,
) -> Compat {
    let ca = TestCa::new("compat-test-ca");
    let hour = Duration::from_secs(3600);
    let (a_mgr, _) = manager(&TestSigner::new(ca.clone(), hour));
    let (b_mgr, _) = manager(&TestSigner::new(ca, hour));
    a_mgr.fetch(&id(WEB)).await.expect("web certificate");
    b_mgr.fetch(&id(API)).await.expect("api certificate");

    let web0 = workload("web-0", "web", Ipv4Addr::new(127, 0, 0, 2), "node-a");
    let api0 = workload("api-0", "api", API_IP, "node-b");
    let service_ports = |ports: &[Port]| -> Vec<ServicePort> {
        ports
            .iter()
            .map(|p| ServicePort {
                name: format!("p{}", p.port),
                port: p.port,
                target_port: p.target,
                protocol: p.protocol,
            })
            .collect()
    };
    let api = Service {
        name: NamespacedName::new("shop", "api"),
        vip: Some(API_VIP),
        ports: service_ports(&ports),
        endpoints: vec![Endpoint {
            ip: API_IP,
            workload: Some(api0.name.clone()),
            identity: Some(api0.identity.clone()),
            node: Some("node-b".into()),
            ready: true,
        }],
    };
    let unmeshed = Service {
        name: NamespacedName::new("shop", "plain"),
        vip: Some(PLAIN_VIP),
        ports: service_ports(&plain),
        endpoints: vec![Endpoint {
            ip: PLAIN_IP,
            workload: None,
            identity: None,
            node: None,
            ready: true,
        }],
    };
    let target_ports: Vec<u16> = api.ports.iter().map(|p| p.target_port).collect();
    let services = Arc::new(
        [api, unmeshed]
            .into_iter()
            .map(|s| (s.name.clone(), Arc::new(s)))
            .collect::<BTreeMap<_, _>>(),
    );
    let node_a = NodeSnapshot {
        node: "node-a".into(),
        workloads: [(web0.name.clone(), web0.clone())].into(),
        services: services.clone(),
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };
    let policy = InboundPolicy {
        workload: api0.name.clone(),
        identity: api0.identity.clone(),
        mode: TrafficPolicyMode::DefaultDeny,
        tls_mode: TlsMode::Strict,
        rules: vec![Rule {
            traffic_target: NamespacedName::new("shop", "web-to-api"),
            sources: vec![id(WEB)],
            ports: target_ports,
            route: RouteMatch::Http(vec![HttpMatch {
                name: "all-but-denied".into(),
                path: Some(AnchoredRegex::new("/([^d].*)?").expect("regex")),
                methods: vec![],
                headers: vec![],
            }]),
        }],
    };
    let node_b = NodeSnapshot {
        node: "node-b".into(),
        workloads: [(api0.name.clone(), api0.clone())].into(),
        policies: [(api0.name.clone(), policy)].into(),
        services,
        trust_bundle: vec!["root".into()],
        ..NodeSnapshot::default()
    };

    let mut destination_metrics = Registry::default();
    let inbound = PodInbound {
        pod: api0.name.clone(),
        store: crate::state::holding(&node_b),
        dial: Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
        telemetry: Telemetry::new(&mut destination_metrics),
        http: crate::l7::HttpConfig::default(),
        idle_timeout: crate::config::DEFAULT_IDLE_TIMEOUT,
    };
    let local = Arc::new(crate::local::LocalPods::default());
    let mut registrations = vec![];
    if same_node {
        registrations.push(local.register(crate::local::LocalPod {
            ip: API_IP,
            inbound: inbound.clone(),
        }));
    }
    let tls = tls::server_config(b_mgr, id(API)).expect("server TLS");
    let server = Arc::new(HboneServer::new(tls, inbound, ServerConfig::default()).expect("server"));
    let hbone_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 15008");
    let hbone_addr = hbone_listener.local_addr().expect("address");
    tokio::spawn(server.serve(hbone_listener));
    let dialer: Dialer = Arc::new(move |addr: SocketAddr| {
        assert!(!same_node, "a pod of this agent is reached in process");
        assert_eq!(addr, SocketAddr::from((API_IP, HBONE_PORT)));
        Box::pin(TcpStream::connect(hbone_addr))
    });
    let pool = HbonePool::with_dialer(a_mgr, PoolConfig::default(), dialer).expect("pool");
    let mut source_metrics = Registry::default();
    let outbound = Arc::new(
        PodOutbound::new(
            web0.name.clone(),
            crate::state::holding(&node_a),
            pool,
            Arc::new(|addr| Box::pin(TcpStream::connect(addr))),
            config,
            Telemetry::new(&mut source_metrics),
        )
        .with_local_pods(local),
    );
    let mut captures = std::collections::HashMap::new();
    let dsts = ports
        .iter()
        .map(|p| SocketAddrV4::new(API_VIP, p.port))
        .chain(plain.iter().map(|p| SocketAddrV4::new(PLAIN_VIP, p.port)));
    for dst in dsts {
        let capture = TcpListener::bind("127.0.0.1:0").await.expect("bind 15001");
        captures.insert(dst, capture.local_addr().expect("address"));
        let proxy = outbound.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = capture.accept().await {
                let proxy = proxy.clone();
                tokio::spawn(async move { proxy.handle(conn, dst).await });
            }
        });
    }
    Compat {
        captures,
        _registrations: registrations,
    }
}

/// An HTTP/1.1 client connection (upgrades allowed).
async fn h1_client(addr: SocketAddr) -> http1::SendRequest<Body> {
    let conn = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = http1::handshake(TokioIo::new(conn))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(connection.with_upgrades());
    sender
}

/// An HTTP/2 client connection with prior knowledge (as `curl --http2-prior-knowledge`).
async fn h2_client(addr: SocketAddr) -> http2::SendRequest<Body> {
    let conn = TcpStream::connect(addr).await.expect("connect");
    let (sender, connection) = http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
        .await
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

fn get(version: Version, uri: &str) -> HttpRequest<Body> {
    let mut b = HttpRequest::get(uri).version(version);
    if version != Version::HTTP_2 {
        b = b.header("host", "api.shop");
    }
    b.body(crate::l7::empty()).expect("request")
}

/// The status and body of a response.
async fn read(response: HttpResponse<Incoming>) -> (StatusCode, String) {
    let status = response.status();
    let body = tokio::time::timeout(WAIT, response.into_body().collect())
        .await
        .expect("body in time")
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_is_spoken_to_in_its_ports_declared_protocol() {
    for same_node in [false, true] {
        let seen: Seen = Arc::default();
        let ports = vec![
            Port {
                port: 80,
                protocol: Protocol::Http,
                target: h1_app(API_IP, echo(seen.clone())).await,
            },
            Port {
                port: 81,
                protocol: Protocol::Http2,
                target: h2_app(API_IP, echo(seen.clone())).await,
            },
            Port {
                port: 82,
                protocol: Protocol::Grpc,
                target: h2_app(API_IP, echo(seen.clone())).await,
            },
        ];
        let mesh = compat(ports, vec![], same_node).await;
        // HTTP/2 with prior knowledge to a port declared `http`, served HTTP/1.1 only.
        let mut c = h2_client(mesh.capture(API_VIP, 80)).await;
        let request = get(Version::HTTP_2, "http://api.shop/h2-to-h1?x=1");
        let (status, body) = read(c.send_request(request).await.expect("response")).await;
        assert_eq!(status, StatusCode::OK, "same node: {same_node}: {body}");
        assert_eq!(body, "ok /h2-to-h1");
        // HTTP/1.1 to ports declared `http2` and `grpc`, served HTTP/2 only.
        for port in [81, 82] {
            let mut c = h1_client(mesh.capture(API_VIP, port)).await;
            let (status, body) = read(
                c.send_request(get(Version::HTTP_11, "/h1-to-h2"))
                    .await
                    .expect("response"),
            )
            .await;
            assert_eq!(
                status,
                StatusCode::OK,
                "port {port}, same node: {same_node}: {body}"
            );
            assert_eq!(body, "ok /h1-to-h2");
        }
        // Each application got its own version, with the authority the client named.
        assert_eq!(
            *seen.lock().expect("seen"),
            vec![
                "HTTP/1.1 GET /h2-to-h1 api.shop".to_string(),
                "HTTP/2.0 GET /h1-to-h2 api.shop".to_string(),
                "HTTP/2.0 GET /h1-to-h2 api.shop".to_string(),
            ],
            "same node: {same_node}"
        );
    }
}

/// An application that switches to a byte echo on an upgrade: it greets first (`hello`), then
/// answers every read upper-cased.
fn upgrading(seen: Seen) -> impl Fn(HttpRequest<Incoming>) -> BoxedResponse + Clone + Send + Sync {
    move |mut request| {
        note(&seen, &request);
        Box::pin(async move {
            if request.headers().get("upgrade").is_none() {
                let mut r = HttpResponse::new(crate::l7::full("upgrade required"));
                *r.status_mut() = StatusCode::UPGRADE_REQUIRED;
                return r;
            }
            let on = hyper::upgrade::on(&mut request);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.expect("the application's side switched"));
                io.write_all(b"hello").await.expect("greet");
                let mut buf = [0u8; 256];
                loop {
                    match io.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if io.write_all(&buf[..n].to_ascii_uppercase()).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
            let mut r = HttpResponse::new(crate::l7::empty());
            *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            r.headers_mut()
                .insert("connection", "upgrade".parse().expect("value"));
            r.headers_mut()
                .insert("upgrade", "websocket".parse().expect("value"));
            r
        })
    }
}

fn upgrade_request(path: &str) -> HttpRequest<Body> {
    HttpRequest::get(path)
        .header("host", "api.shop")
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(crate::l7::empty())
        .expect("request")
}

async fn read_exactly(io: &mut (impl AsyncReadExt + Unpin), n: usize) -> String {
    let mut buf = vec![0u8; n];
    tokio::time::timeout(WAIT, io.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("bytes");
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_upgrade_carries_bytes_both_ways_and_a_denied_one_is_refused() {
    for same_node in [false, true] {
        let seen: Seen = Arc::default();
        let ports = vec![Port {
            port: 80,
            protocol: Protocol::Http,
            target: h1_app(API_IP, upgrading(seen.clone())).await,
        }];
        let mesh = compat(ports, vec![], same_node).await;
        let mut c = h1_client(mesh.capture(API_VIP, 80)).await;
        let response = tokio::time::timeout(WAIT, c.send_request(upgrade_request("/ws")))
            .await
            .expect("in time")
            .expect("response");
        assert_eq!(
            response.status(),
            StatusCode::SWITCHING_PROTOCOLS,
            "same node: {same_node}"
        );
        assert_eq!(response.headers()["upgrade"], "websocket");
        let upgraded = tokio::time::timeout(WAIT, hyper::upgrade::on(response))
            .await
            .expect("in time")
            .expect("the client's side switched");
        let mut io = TokioIo::new(upgraded);
        assert_eq!(
            read_exactly(&mut io, 5).await,
            "hello",
            "the server speaks first"
        );
        for word in ["ping", "more bytes"] {
            io.write_all(word.as_bytes()).await.expect("write");
            assert_eq!(
                read_exactly(&mut io, word.len()).await,
                word.to_ascii_uppercase()
            );
        }
        drop(io);

        // The policy applies to the upgrade request: refused, and never switched.
        let mut c = h1_client(mesh.capture(API_VIP, 80)).await;
        let response = c
            .send_request(upgrade_request("/denied/ws"))
            .await
            .expect("response");
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
        // An upgrade to h2c would carry requests no policy sees: it goes on as HTTP/1.1.
        let mut h2c = upgrade_request("/h2c");
        h2c.headers_mut()
            .insert("upgrade", "h2c".parse().expect("value"));
        c.ready()
            .await
            .expect("the connection goes on after a refusal");
        let response = c.send_request(h2c).await.expect("response");
        let (status, body) = read(response).await;
        assert_eq!(status, StatusCode::UPGRADE_REQUIRED, "{body}");
        assert_eq!(
            *seen.lock().expect("seen"),
            vec![
                "HTTP/1.1 GET /ws api.shop".to_string(),
                "HTTP/1.1 GET /h2c api.shop".to_string(),
            ],
            "same node: {same_node}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_connection_counts_against_the_pods_cap_until_it_closes() {
    let seen: Seen = Arc::default();
    let ports = vec![Port {
        port: 80,
        protocol: Protocol::Http,
        target: h1_app(API_IP, upgrading(seen.clone())).await,
    }];
    let capped = OutboundConfig {
        max_connections: 1,
        ..OutboundConfig::default()
    };
    let mesh = compat_with(ports, vec![], false, capped).await;
    let addr = mesh.capture(API_VIP, 80);
    let mut c = h1_client(addr).await;
    let response = c
        .send_request(upgrade_request("/ws"))
        .await
        .expect("response");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(response).await.expect("switched"));
    assert_eq!(read_exactly(&mut io, 5).await, "hello");
    // The pod's one connection is the upgraded one: another is refused.
    let mut other = TcpStream::connect(addr).await.expect("connect");
    let mut answer = Vec::new();
    let _ = other.write_all(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    let _ = tokio::time::timeout(WAIT, other.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    io.write_all(b"still").await.expect("write");
    assert_eq!(
        read_exactly(&mut io, 5).await,
        "STILL",
        "the upgraded one goes on"
    );
    // Closed, it frees its place.
    drop(io);
    drop(c);
    for attempt in 0.. {
        let mut c = h1_client(addr).await;
        let sent = c.send_request(get(Version::HTTP_11, "/after")).await;
        if let Ok(response) = sent {
            assert_eq!(read(response).await.0, StatusCode::UPGRADE_REQUIRED);
            break;
        }
        assert!(attempt < 50, "the cap was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_port_whose_endpoint_has_no_proxy_is_spoken_to_in_its_declared_protocol() {
    let seen: Seen = Arc::default();
    let plain = vec![
        Port {
            port: 90,
            protocol: Protocol::Http,
            target: h1_app(PLAIN_IP, echo(seen.clone())).await,
        },
        Port {
            port: 91,
            protocol: Protocol::Grpc,
            target: h2_app(PLAIN_IP, echo(seen.clone())).await,
        },
    ];
    let mesh = compat(vec![], plain, false).await;
    let mut c = h2_client(mesh.capture(PLAIN_VIP, 90)).await;
    let (status, body) = read(
        c.send_request(get(Version::HTTP_2, "http://plain.shop/h2"))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /h2"));
    let mut c = h1_client(mesh.capture(PLAIN_VIP, 90)).await;
    let (status, body) = read(
        c.send_request(get(Version::HTTP_11, "/h1"))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /h1"));
    let mut c = h1_client(mesh.capture(PLAIN_VIP, 91)).await;
    let (status, body) = read(
        c.send_request(get(Version::HTTP_11, "/h1-to-h2"))
            .await
            .expect("response"),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok /h1-to-h2"));
    assert_eq!(
        *seen.lock().expect("seen"),
        vec![
            "HTTP/1.1 GET /h2 plain.shop".to_string(),
            "HTTP/1.1 GET /h1 api.shop".to_string(),
            "HTTP/2.0 GET /h1-to-h2 api.shop".to_string(),
        ]
    );
}

mod details;
