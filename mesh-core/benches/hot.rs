//! Micro-benchmarks of the decisions the proxy takes on every connection and request:
//! [`authorize`] against a pod's compiled inbound policy, [`Resolver::resolve`] of an
//! original destination, and [`Resolver::route_request`] of an HTTP request.
//!
//! The inputs look like a small shop: a destination with several TrafficTargets (TCP and
//! HTTPRouteGroup rules, some port-restricted), a node snapshot with a few dozen services of
//! several endpoints each, a TrafficSplit, and an HTTPRoute with exact, prefix and header
//! matches. Run with `cargo bench -p mesh-core --bench hot`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_core::SpiffeId;
use mesh_core::model::{
    Endpoint, NamespacedName, NodeSnapshot, Protocol, Service, ServicePort, SplitBackend, TlsMode,
    TrafficSplit,
};
use mesh_core::policy::{
    AnchoredRegex, Conn, HeaderMatch, HttpMatch, InboundPolicy, Request, RouteMatch, Rule,
    TrafficPolicyMode, authorize,
};
use mesh_core::resolve::{FastPicker, HeaderModifier, Resolver};
use mesh_core::route::{
    HeaderValueMatch, ParentRef, PathMatch, RequestMatch, Route, RouteBackend, RouteKind,
    RouteRule, ValueMatch,
};

// === fixtures ===

fn id(ns: &str, sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
        .parse()
        .expect("valid SPIFFE ID")
}

fn nn(name: &str) -> NamespacedName {
    NamespacedName::new("shop", name)
}

fn re(source: &str) -> AnchoredRegex {
    AnchoredRegex::new(source).expect("valid regex")
}

fn http_match(name: &str, path: &str, methods: &[&str], headers: &[(&str, &str)]) -> HttpMatch {
    HttpMatch {
        name: name.to_string(),
        path: Some(re(path)),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        headers: headers
            .iter()
            .map(|(name, value)| HeaderMatch {
                name: name.to_string(),
                value: re(value),
            })
            .collect(),
    }
}

fn rule(target: &str, sources: &[SpiffeId], ports: &[u16], route: RouteMatch) -> Rule {
    Rule {
        traffic_target: nn(target),
        sources: sources.to_vec(),
        ports: ports.to_vec(),
        route,
    }
}

/// The inbound policy of `shop/api-0`: five TrafficTargets, in the order the controller
/// compiles them (by name), the TCP one that admits `orders` after two HTTP ones.
fn api_policy() -> InboundPolicy {
    let storefront = RouteMatch::Http(vec![
        http_match("health", "/healthz", &["GET"], &[]),
        http_match("list-products", "/products", &["GET"], &[]),
        http_match("get-product", "/products/[0-9]+", &["GET", "HEAD"], &[]),
        http_match(
            "cart",
            "/cart(/.*)?",
            &["GET", "POST", "PUT", "DELETE"],
            &[],
        ),
        http_match(
            "search",
            "/search",
            &["GET"],
            &[("accept", "application/json.*")],
        ),
    ]);
    let admin = RouteMatch::Http(vec![http_match(
        "admin",
        "/admin/.*",
        &[],
        &[("x-role", "admin|ops")],
    )]);
    let export = RouteMatch::Http(vec![http_match("export", "/export/[a-z-]+", &["GET"], &[])]);
    InboundPolicy {
        workload: nn("api-0"),
        identity: id("shop", "api"),
        mode: TrafficPolicyMode::DefaultDeny,
        tls_mode: TlsMode::Strict,
        rules: vec![
            rule("api-admin", &[id("ops", "console")], &[8080], admin),
            rule(
                "api-batch",
                &[
                    id("batch", "nightly"),
                    id("batch", "hourly"),
                    id("batch", "adhoc"),
                ],
                &[],
                export,
            ),
            rule(
                "api-orders",
                &[id("shop", "orders")],
                &[9090],
                RouteMatch::Tcp,
            ),
            rule(
                "api-scrape",
                &[id("monitoring", "prometheus")],
                &[9102],
                RouteMatch::Tcp,
            ),
            rule(
                "api-storefront",
                &[id("shop", "frontend"), id("shop", "mobile-bff")],
                &[8080],
                storefront,
            ),
        ],
    }
}

/// Headers of a typical browser-originated API request.
const HEADERS: [(&str, &str); 6] = [
    ("host", "api.shop.svc.cluster.local"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
    ("accept", "application/json"),
    ("accept-encoding", "gzip, br"),
    ("x-request-id", "5f0c2a9e-8d1b-4c7a-9e3f-2b6d4a1c0e77"),
    (
        "traceparent",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
];

/// The same request marked for the canary.
const CANARY_HEADERS: [(&str, &str); 7] = [
    HEADERS[0],
    HEADERS[1],
    HEADERS[2],
    HEADERS[3],
    HEADERS[4],
    HEADERS[5],
    ("x-canary", "true"),
];

fn port(name: &str, port: u16, target_port: u16, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.to_string(),
        port,
        target_port,
        protocol,
    }
}

/// A service of `n` ready meshed endpoints `10.<subnet>.0.1..=n` spread over three nodes.
fn service(name: &str, vip: Ipv4Addr, subnet: u8, n: u8, ports: Vec<ServicePort>) -> Service {
    let endpoints = (1..=n)
        .map(|i| Endpoint {
            ip: Ipv4Addr::new(10, subnet, 0, i),
            workload: Some(nn(&format!("{name}-{i}"))),
            identity: Some(id("shop", name)),
            node: Some(format!("node-{}", i % 3)),
            ready: true,
        })
        .collect();
    Service {
        name: nn(name),
        vip: Some(vip),
        ports,
        endpoints,
    }
}

fn web_ports() -> Vec<ServicePort> {
    vec![
        port("http", 80, 8080, Protocol::Http),
        port("grpc-api", 9000, 9090, Protocol::Grpc),
    ]
}

const WEB: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
const CHECKOUT: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), 80);
const POD: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 3), 8080);

fn route_match(path: PathMatch, headers: &[(&str, &str)]) -> RequestMatch {
    RequestMatch {
        path: Some(path),
        method: None,
        headers: headers
            .iter()
            .map(|(name, value)| HeaderValueMatch {
                name: name.to_string(),
                value: ValueMatch::Exact(value.to_string()),
            })
            .collect(),
    }
}

fn route_rule(matches: Vec<RequestMatch>, backends: &[(&str, u32)]) -> RouteRule {
    RouteRule {
        matches,
        backends: backends
            .iter()
            .map(|(service, weight)| RouteBackend {
                service: nn(service),
                port: None,
                weight: *weight,
            })
            .collect(),
        request_headers: HeaderModifier::default(),
        timeout: None,
    }
}

/// The HTTPRoute attached to port 80 of `web`: five rules, an exact path, prefixes, a header
/// match and a weighted catch-all.
fn web_route() -> Route {
    let prefix = |p: &str| PathMatch::Prefix(p.to_string());
    Route {
        name: nn("web"),
        kind: RouteKind::Http,
        parents: vec![ParentRef {
            service: nn("web"),
            port: Some(80),
        }],
        rules: vec![
            route_rule(
                vec![route_match(PathMatch::Exact("/healthz".into()), &[])],
                &[("web", 1)],
            ),
            route_rule(vec![route_match(prefix("/api/v2"), &[])], &[("web-v2", 1)]),
            route_rule(
                vec![route_match(prefix("/api"), &[("x-canary", "true")])],
                &[("web-v2", 1)],
            ),
            route_rule(
                vec![
                    route_match(prefix("/static"), &[]),
                    route_match(prefix("/assets"), &[]),
                ],
                &[("web", 1)],
            ),
            route_rule(
                vec![route_match(prefix("/"), &[])],
                &[("web", 90), ("web-v2", 10)],
            ),
        ],
    }
}

/// A node's view of the mesh: `web` (8 endpoints) with its HTTPRoute and `web-v2` (4),
/// `checkout` split 90/10 between `checkout-v1` (6) and `checkout-v2` (2), and 30 other
/// services of 4 endpoints each.
fn snapshot() -> NodeSnapshot {
    let vip = |i: u8| Ipv4Addr::new(10, 96, 0, i);
    let mut services = vec![
        service("web", vip(10), 1, 8, web_ports()),
        service("web-v2", vip(20), 2, 4, web_ports()),
        service("checkout", vip(40), 3, 2, web_ports()),
        service("checkout-v1", vip(41), 4, 6, web_ports()),
        service("checkout-v2", vip(42), 5, 2, web_ports()),
    ];
    for i in 0..30u8 {
        services.push(service(
            &format!("svc-{i}"),
            vip(100 + i),
            100 + i,
            4,
            vec![port("tcp", 5432, 5432, Protocol::Tcp)],
        ));
    }
    let split = TrafficSplit {
        name: nn("checkout-canary"),
        root: nn("checkout"),
        backends: vec![
            SplitBackend {
                service: nn("checkout-v1"),
                weight: 90,
            },
            SplitBackend {
                service: nn("checkout-v2"),
                weight: 10,
            },
        ],
        matches: Vec::new(),
    };
    let route = web_route();
    NodeSnapshot {
        node: "node-0".to_string(),
        services: Arc::new(
            services
                .into_iter()
                .map(|s| (s.name.clone(), Arc::new(s)))
                .collect(),
        ),
        splits: Arc::new(BTreeMap::from([(split.name.clone(), split)])),
        http_routes: Arc::new(BTreeMap::from([(route.name.clone(), route)])),
        ..NodeSnapshot::default()
    }
}

// === benchmarks ===

fn bench_authorize(c: &mut Criterion) {
    let policy = api_policy();
    let orders = id("shop", "orders");
    let frontend = id("shop", "frontend");
    let stranger = id("shop", "intruder");
    let get_product = Request {
        method: "GET",
        path: "/products/1234",
        headers: &HEADERS,
    };
    let delete_product = Request {
        method: "DELETE",
        path: "/products/1234",
        headers: &HEADERS,
    };
    let conn = |source, port, request| Conn {
        source: Some(source),
        port,
        request,
    };
    // The expected verdicts, so a change of fixtures cannot silently measure another path.
    let check = |c: Conn<'_>, kind: &str| {
        let verdict = match authorize(&policy, &c) {
            Ok(permit) => permit.kind(),
            Err(denied) => denied.kind(),
        };
        assert_eq!(verdict, kind, "{c:?}");
    };
    check(conn(&orders, 9090, None), "tcp");
    check(conn(&stranger, 9090, None), "no_traffic_target");
    check(conn(&frontend, 8080, Some(&get_product)), "http");
    check(
        conn(&frontend, 8080, Some(&delete_product)),
        "no_http_match",
    );

    let mut group = c.benchmark_group("authorize");
    group.bench_function("connection_allowed_tcp", |b| {
        let c = conn(&orders, 9090, None);
        b.iter(|| authorize(black_box(&policy), black_box(&c)).is_ok())
    });
    group.bench_function("connection_denied_unknown_caller", |b| {
        let c = conn(&stranger, 9090, None);
        b.iter(|| authorize(black_box(&policy), black_box(&c)).is_ok())
    });
    group.bench_function("request_allowed_http", |b| {
        let c = conn(&frontend, 8080, Some(&get_product));
        b.iter(|| authorize(black_box(&policy), black_box(&c)).is_ok())
    });
    group.bench_function("request_denied_no_match", |b| {
        let c = conn(&frontend, 8080, Some(&delete_product));
        b.iter(|| authorize(black_box(&policy), black_box(&c)).is_ok())
    });
    group.finish();
}

fn bench_resolve(c: &mut Criterion) {
    let resolver = Resolver::new(&snapshot());
    let src = id("shop", "frontend");
    let mut pick = FastPicker::with_seed(1);
    for (dst, kind) in [(WEB, "mesh"), (CHECKOUT, "mesh"), (POD, "mesh")] {
        let resolution = resolver.resolve(&src, dst, &mut pick).expect("resolves");
        assert_eq!(resolution.target.kind(), kind, "{dst}");
    }

    let mut group = c.benchmark_group("resolve");
    for (name, dst) in [
        ("service_vip", WEB),
        ("traffic_split", CHECKOUT),
        ("pod_ip", POD),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| resolver.resolve(&src, black_box(dst), &mut pick).ok())
        });
    }
    group.finish();
}

fn bench_route_request(c: &mut Criterion) {
    let resolver = Resolver::new(&snapshot());
    let src = id("shop", "frontend");
    let mut pick = FastPicker::with_seed(1);
    // (benchmark, path, headers, the route rule expected to match).
    let cases = [
        ("exact", "/healthz", &HEADERS[..], "HTTPRoute shop/web#0"),
        (
            "prefix",
            "/api/v2/items/17",
            &HEADERS,
            "HTTPRoute shop/web#1",
        ),
        (
            "header",
            "/api/items/17",
            &CANARY_HEADERS,
            "HTTPRoute shop/web#2",
        ),
        ("catch_all", "/about/team", &HEADERS, "HTTPRoute shop/web#4"),
    ];
    for (_, path, headers, label) in cases {
        let request = Request {
            method: "GET",
            path,
            headers: &headers,
        };
        let routed = resolver
            .route_request(&src, WEB, &request, &mut pick)
            .expect("request routes");
        assert_eq!(routed.route.as_deref(), Some(label), "{path}");
    }

    let mut group = c.benchmark_group("route_request");
    for (name, path, headers, _) in cases {
        let request = Request {
            method: "GET",
            path,
            headers: &headers,
        };
        group.bench_function(name, |b| {
            b.iter(|| {
                resolver
                    .route_request(&src, WEB, black_box(&request), &mut pick)
                    .ok()
            })
        });
    }
    group.finish();
}

/// Short runs: these are regression checks to run before and after a change, not a
/// publication.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_authorize, bench_resolve, bench_route_request
}
criterion_main!(benches);
