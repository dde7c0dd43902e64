//! Per-request routing: Gateway API routes, SMI splits with and without matches.

use std::time::Duration;

use super::*;
use crate::policy::{AnchoredRegex, HeaderMatch};
use crate::route::{
    HeaderValueMatch, ParentRef, PathMatch, RequestMatch, Route, RouteBackend, RouteKind,
    RouteRule, ValueMatch,
};

// === fixtures ===

/// `web-v3`: the same ports as `web`, one meshed endpoint on node n3.
fn web_v3() -> Service {
    service(
        "web-v3",
        Some("10.96.0.30"),
        vec![
            port("http", 80, 8083, Protocol::Http),
            port("grpc-api", 9000, 9093, Protocol::Grpc),
        ],
        vec![meshed("10.0.0.3", "web-v3", "n3")],
    )
}

fn backend(service: &str, weight: u32) -> RouteBackend {
    RouteBackend {
        service: nn(service),
        port: None,
        weight,
    }
}

fn rule(matches: Vec<RequestMatch>, backends: Vec<RouteBackend>) -> RouteRule {
    RouteRule {
        matches,
        backends,
        request_headers: HeaderModifier::default(),
        timeout: None,
    }
}

fn path(p: PathMatch) -> RequestMatch {
    RequestMatch {
        path: Some(p),
        ..RequestMatch::any()
    }
}

fn prefix(p: &str) -> RequestMatch {
    path(PathMatch::Prefix(p.to_string()))
}

fn header(name: &str, value: &str) -> RequestMatch {
    RequestMatch {
        headers: vec![HeaderValueMatch {
            name: name.to_string(),
            value: ValueMatch::Exact(value.to_string()),
        }],
        ..prefix("/")
    }
}

/// An HTTPRoute attached to `web` (every port).
fn http_route(name: &str, rules: Vec<RouteRule>) -> Route {
    Route {
        name: nn(name),
        kind: RouteKind::Http,
        parents: vec![ParentRef {
            service: nn("web"),
            port: None,
        }],
        rules,
    }
}

fn routed(routes: Vec<Route>, splits: Vec<TrafficSplit>) -> Resolver {
    let mut snap = snapshot(vec![web(), web_v2(), web_v3()], splits);
    let (grpc, http): (Vec<Route>, Vec<Route>) =
        routes.into_iter().partition(|r| r.kind == RouteKind::Grpc);
    snap.http_routes = Arc::new(http.into_iter().map(|r| (r.name.clone(), r)).collect());
    snap.grpc_routes = Arc::new(grpc.into_iter().map(|r| (r.name.clone(), r)).collect());
    Resolver::new(&snap)
}

fn route_req(
    r: &Resolver,
    dst: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<RequestRoute, Unresolved> {
    let request = Request {
        method,
        path,
        headers: &headers,
    };
    r.route_request(
        &client(),
        addr(dst),
        &request,
        &mut FastPicker::with_seed(7),
    )
}

/// The backend service and the route label a request to web:80 gets.
fn decide(r: &Resolver, method: &str, path: &str, headers: &[(&str, &str)]) -> (String, String) {
    let routed = route_req(r, "10.96.0.10:80", method, path, headers).expect("request routes");
    let Target::Mesh {
        backend: Some(b), ..
    } = routed.resolution.target
    else {
        panic!("unexpected target {:?}", routed.resolution.target);
    };
    (b.name, routed.route.unwrap_or_default())
}

// === Gateway API routes ===

#[test]
fn a_header_match_sends_the_request_to_its_backend() {
    let r = routed(
        vec![http_route(
            "web",
            vec![
                rule(vec![prefix("/")], vec![backend("web", 1)]),
                rule(vec![header("x-canary", "true")], vec![backend("web-v3", 1)]),
            ],
        )],
        vec![],
    );
    let canary = route_req(&r, "10.96.0.10:80", "GET", "/", &[("X-Canary", "true")])
        .expect("request routes");
    // The addressed port number (80) on the backend, mapped to its target port.
    assert_eq!(canary.resolution.target.addr(), addr("10.0.0.3:8083"));
    assert_eq!(canary.route.as_deref(), Some("HTTPRoute shop/web#1"));
    assert!(canary.resolution.lease.is_some(), "the endpoint is leased");

    assert_eq!(
        decide(&r, "GET", "/", &[("x-canary", "false")]),
        ("web".into(), "HTTPRoute shop/web#0".into())
    );
    assert_eq!(
        decide(&r, "GET", "/", &[]),
        ("web".into(), "HTTPRoute shop/web#0".into())
    );
}

#[test]
fn exact_path_beats_the_longest_prefix_which_beats_a_regex() {
    let regex = path(PathMatch::Regex(
        AnchoredRegex::new("/api/v[0-9]+/.*").expect("regex"),
    ));
    let r = routed(
        vec![
            // Declared from the lowest precedence up, and split over two routes: the order
            // comes from the matches, not from where they are written.
            http_route(
                "a-regex",
                vec![rule(vec![regex], vec![backend("web-v3", 1)])],
            ),
            http_route(
                "b-paths",
                vec![
                    rule(vec![prefix("/")], vec![backend("web", 1)]),
                    rule(vec![prefix("/api")], vec![backend("web", 1)]),
                    rule(vec![prefix("/api/v1")], vec![backend("web-v3", 1)]),
                    rule(
                        vec![path(PathMatch::Exact("/api/v1/health".into()))],
                        vec![backend("web", 1)],
                    ),
                ],
            ),
        ],
        vec![],
    );
    let label = |p: &str| decide(&r, "GET", p, &[]).1;
    assert_eq!(label("/api/v1/health"), "HTTPRoute shop/b-paths#3");
    assert_eq!(label("/api/v1/users"), "HTTPRoute shop/b-paths#2");
    assert_eq!(label("/api/v1"), "HTTPRoute shop/b-paths#2");
    // `/api/v2/x` matches the regex and the `/api` prefix: the prefix wins.
    assert_eq!(label("/api/v2/x"), "HTTPRoute shop/b-paths#1");
    assert_eq!(label("/apis"), "HTTPRoute shop/b-paths#0");
    assert_eq!(label("/"), "HTTPRoute shop/b-paths#0");
}

#[test]
fn a_regex_path_applies_when_no_prefix_matches() {
    let regex = path(PathMatch::Regex(
        AnchoredRegex::new("/v[0-9]+/.*").expect("regex"),
    ));
    let r = routed(
        vec![http_route(
            "web",
            vec![
                rule(vec![regex], vec![backend("web-v3", 1)]),
                rule(vec![prefix("/static")], vec![backend("web", 1)]),
            ],
        )],
        vec![],
    );
    assert_eq!(
        decide(&r, "GET", "/v2/x", &[]),
        ("web-v3".into(), "HTTPRoute shop/web#0".into())
    );
    assert_eq!(
        decide(&r, "GET", "/static/a", &[]).1,
        "HTTPRoute shop/web#1"
    );
    let miss = route_req(&r, "10.96.0.10:80", "GET", "/v2", &[]).expect_err("no match");
    assert_eq!(miss.kind(), "no_route_match");
}

#[test]
fn a_method_match_wins_over_the_same_path_without_one() {
    let post = RequestMatch {
        method: Some("POST".into()),
        ..prefix("/orders")
    };
    let r = routed(
        vec![http_route(
            "web",
            vec![
                rule(vec![prefix("/orders")], vec![backend("web", 1)]),
                rule(vec![post], vec![backend("web-v3", 1)]),
            ],
        )],
        vec![],
    );
    assert_eq!(decide(&r, "POST", "/orders/1", &[]).0, "web-v3");
    assert_eq!(decide(&r, "GET", "/orders/1", &[]).0, "web");
    // Methods are exact: `post` is not `POST`.
    assert_eq!(decide(&r, "post", "/orders/1", &[]).0, "web");
}

#[test]
fn more_header_matches_win_and_ties_go_to_the_first_route_by_name() {
    let two_headers = RequestMatch {
        headers: vec![
            HeaderValueMatch {
                name: "x-a".into(),
                value: ValueMatch::Exact("1".into()),
            },
            HeaderValueMatch {
                name: "x-b".into(),
                value: ValueMatch::Regex(AnchoredRegex::new("[0-9]+").expect("regex")),
            },
        ],
        ..prefix("/")
    };
    let r = routed(
        vec![
            http_route(
                "b",
                vec![rule(vec![header("x-a", "1")], vec![backend("web", 1)])],
            ),
            http_route(
                "a",
                vec![rule(vec![header("x-a", "1")], vec![backend("web", 1)])],
            ),
            http_route(
                "c",
                vec![rule(vec![two_headers], vec![backend("web-v3", 1)])],
            ),
        ],
        vec![],
    );
    assert_eq!(
        decide(&r, "GET", "/", &[("x-a", "1"), ("x-b", "42")]).1,
        "HTTPRoute shop/c#0"
    );
    assert_eq!(
        decide(&r, "GET", "/", &[("x-a", "1"), ("x-b", "x")]).1,
        "HTTPRoute shop/a#0"
    );
}

#[test]
fn weighted_backends_90_10_over_2000_requests() {
    let r = routed(
        vec![http_route(
            "web",
            vec![rule(
                vec![prefix("/")],
                vec![
                    backend("web", 90),
                    backend("web-v3", 10),
                    backend("web-v2", 0),
                ],
            )],
        )],
        vec![],
    );
    let mut pick = FastPicker::with_seed(0x90_10);
    let request = Request {
        method: "GET",
        path: "/",
        headers: &[("accept", "*/*")],
    };
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..2_000 {
        let routed = r
            .route_request(&client(), addr("10.96.0.10:80"), &request, &mut pick)
            .expect("request routes");
        let Target::Mesh {
            backend: Some(b), ..
        } = routed.resolution.target
        else {
            panic!("unexpected target {:?}", routed.resolution.target);
        };
        *counts.entry(b.name).or_default() += 1;
    }
    // web-v2 has weight 0 (and no port 80): it is never drawn.
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["web", "web-v3"]);
    let v3 = counts["web-v3"];
    // 10% of 2,000 is 200; 3 points either side is 140..=260.
    assert!((140..=260).contains(&v3), "web-v3 got {v3} of 2000");
}

#[test]
fn a_backend_port_is_used_and_a_missing_one_is_refused() {
    let mut on_8000 = backend("web-v2", 1);
    on_8000.port = Some(8000);
    let r = routed(
        vec![http_route(
            "web",
            vec![
                rule(vec![prefix("/v2")], vec![on_8000]),
                rule(vec![prefix("/")], vec![backend("web-v2", 1)]),
                rule(vec![prefix("/gone")], vec![backend("nope", 1)]),
            ],
        )],
        vec![],
    );
    let v2 = route_req(&r, "10.96.0.10:80", "GET", "/v2/a", &[]).expect("request routes");
    assert_eq!(v2.resolution.target.addr(), addr("10.0.0.2:7070"));
    let e = route_req(&r, "10.96.0.10:80", "GET", "/other", &[]).expect_err("no port 80");
    assert_eq!(e.kind(), "no_backend_port");
    assert_eq!(
        e.to_string(),
        "HTTPRoute shop/web#1 sends traffic to port 80 of service shop/web-v2, which has no \
         such port"
    );
    let e = route_req(&r, "10.96.0.10:80", "GET", "/gone", &[]).expect_err("no service");
    assert_eq!(e.kind(), "no_such_backend");
}

#[test]
fn a_rule_without_weight_is_refused_per_request() {
    let r = routed(
        vec![http_route(
            "web",
            vec![rule(vec![prefix("/")], vec![backend("web-v3", 0)])],
        )],
        vec![],
    );
    let e = route_req(&r, "10.96.0.10:80", "GET", "/", &[]).expect_err("nothing to draw");
    assert_eq!(
        e,
        Unresolved::NoBackend {
            route: "HTTPRoute shop/web#0".into()
        }
    );
    assert_eq!(e.kind(), "no_backend");
}

#[test]
fn a_parent_port_restricts_the_route_to_that_service_port() {
    let mut route = http_route(
        "web-grpc",
        vec![rule(vec![prefix("/")], vec![backend("web-v3", 1)])],
    );
    route.parents[0].port = Some(9000);
    let r = routed(vec![route], vec![]);
    let grpc = route_req(&r, "10.96.0.10:9000", "POST", "/x.Y/Z", &[]).expect("routes");
    assert_eq!(grpc.resolution.target.addr(), addr("10.0.0.3:9093"));
    assert_eq!(grpc.route.as_deref(), Some("HTTPRoute shop/web-grpc#0"));
    // Port 80 has no route attached: the service's own endpoints, no label.
    let http = route_req(&r, "10.96.0.10:80", "GET", "/", &[]).expect("routes");
    assert_eq!(http.resolution.target.addr(), addr("10.0.0.1:8080"));
    assert_eq!(http.route, None);
}

#[test]
fn a_grpc_route_matches_the_method_path() {
    // What the GRPCRoute reader compiles `method: {service: demo.Echo, method: Say}` and
    // `{service: demo.Echo}` into.
    let route = Route {
        name: nn("echo"),
        kind: RouteKind::Grpc,
        parents: vec![ParentRef {
            service: nn("web"),
            port: Some(9000),
        }],
        rules: vec![
            rule(
                vec![path(PathMatch::Prefix("/demo.Echo/".into()))],
                vec![backend("web", 1)],
            ),
            rule(
                vec![path(PathMatch::Exact("/demo.Echo/Say".into()))],
                vec![backend("web-v3", 1)],
            ),
        ],
    };
    let r = routed(vec![route], vec![]);
    let say = route_req(&r, "10.96.0.10:9000", "POST", "/demo.Echo/Say", &[]).expect("routes");
    assert_eq!(say.resolution.target.addr(), addr("10.0.0.3:9093"));
    assert_eq!(say.route.as_deref(), Some("GRPCRoute shop/echo#1"));
    let count = route_req(&r, "10.96.0.10:9000", "POST", "/demo.Echo/Count", &[]).expect("routes");
    assert_eq!(count.resolution.target.addr(), addr("10.0.0.1:9090"));
    assert_eq!(count.route.as_deref(), Some("GRPCRoute shop/echo#0"));
    let other = route_req(&r, "10.96.0.10:9000", "POST", "/demo.Other/Say", &[])
        .expect_err("no method matches");
    assert_eq!(
        other,
        Unresolved::NoRouteMatch {
            service: nn("web"),
            port: 9000,
            method: "POST".into(),
            path: "/demo.Other/Say".into(),
        }
    );
}

#[test]
fn routes_attached_but_no_rule_matching_is_no_route_match() {
    let r = routed(
        vec![http_route(
            "web",
            vec![rule(vec![prefix("/api")], vec![backend("web", 1)])],
        )],
        vec![split("canary", "web", &[("web-v3", 1)])],
    );
    let e = route_req(&r, "10.96.0.10:80", "DELETE", "/admin", &[]).expect_err("no match");
    assert_eq!(e.kind(), "no_route_match");
    assert_eq!(
        e.to_string(),
        "no route attached to service shop/web port 80 matches DELETE /admin"
    );
    // The L4 decision is unchanged by routes.
    assert_eq!(
        target(&r, "10.96.0.10:80", &mut FastPicker::with_seed(1)).addr(),
        addr("10.0.0.3:8083")
    );
}

#[test]
fn an_http_route_takes_precedence_over_smi_splits_on_the_same_service() {
    let mut matching = split("a-matching", "web", &[("web-v3", 1)]);
    matching.matches = vec![HttpMatch {
        name: "all".into(),
        path: None,
        methods: Vec::new(),
        headers: Vec::new(),
    }];
    let r = routed(
        vec![http_route(
            "web",
            vec![rule(vec![prefix("/")], vec![backend("web", 1)])],
        )],
        vec![matching, split("b-canary", "web", &[("web-v3", 1)])],
    );
    for _ in 0..20 {
        assert_eq!(
            decide(&r, "GET", "/x", &[]),
            ("web".into(), "HTTPRoute shop/web#0".into())
        );
    }
}

#[test]
fn the_rule_s_header_modifier_and_timeout_come_with_the_decision() {
    let mut with_filters = rule(vec![prefix("/")], vec![backend("web", 1)]);
    with_filters.request_headers = HeaderModifier {
        set: vec![("x-env".into(), "canary".into())],
        add: vec![("x-via".into(), "mesh".into())],
        remove: vec!["x-debug".into()],
    };
    with_filters.timeout = Some(Duration::from_millis(500));
    let r = routed(vec![http_route("web", vec![with_filters.clone()])], vec![]);
    let routed = route_req(&r, "10.96.0.10:80", "GET", "/", &[]).expect("routes");
    assert_eq!(routed.request_headers, with_filters.request_headers);
    assert_eq!(routed.timeout, Some(Duration::from_millis(500)));
}

// === SMI splits per request ===

#[test]
fn a_split_with_matches_applies_to_the_requests_it_matches() {
    let mut api = split("api-canary", "web", &[("web-v3", 1)]);
    api.matches = vec![HttpMatch {
        name: "api".into(),
        path: Some(AnchoredRegex::new("/api/.*").expect("regex")),
        methods: vec!["GET".into()],
        headers: vec![HeaderMatch {
            name: "x-user".into(),
            value: AnchoredRegex::new("beta-.*").expect("regex"),
        }],
    }];
    let r = routed(vec![], vec![api]);
    assert_eq!(
        decide(&r, "GET", "/api/items", &[("x-user", "beta-1")]),
        ("web-v3".into(), "TrafficSplit shop/api-canary".into())
    );
    // Not matching: the service's own endpoints, no label.
    for (method, path, user) in [
        ("POST", "/api/items", "beta-1"),
        ("GET", "/web", "beta-1"),
        ("GET", "/api/items", "prod-1"),
    ] {
        let routed =
            route_req(&r, "10.96.0.10:80", method, path, &[("x-user", user)]).expect("routes");
        assert_eq!(routed.resolution.target.addr(), addr("10.0.0.1:8080"));
        assert_eq!(routed.route, None, "{method} {path} {user}");
    }
}

#[test]
fn a_matching_split_comes_before_the_split_without_matches() {
    let mut api = split("z-api", "web", &[("web-v3", 1)]);
    api.matches = vec![HttpMatch {
        name: "api".into(),
        path: Some(AnchoredRegex::new("/api/.*").expect("regex")),
        methods: Vec::new(),
        headers: Vec::new(),
    }];
    let all = split("a-all", "web", &[("web-v2", 1)]);
    let mut snap = snapshot(vec![web(), web_v2(), web_v3()], vec![api, all]);
    // web-v2 serves port 80 too here, so the split without matches can reach it.
    let mut v2 = web_v2();
    v2.ports.push(port("web", 80, 7080, Protocol::Http));
    Arc::make_mut(&mut snap.services).insert(v2.name.clone(), Arc::new(v2));
    let r = Resolver::new(&snap);
    assert_eq!(
        decide(&r, "GET", "/api/x", &[]),
        ("web-v3".into(), "TrafficSplit shop/z-api".into())
    );
    assert_eq!(
        decide(&r, "GET", "/x", &[]),
        ("web-v2".into(), "TrafficSplit shop/a-all".into())
    );
}

#[test]
fn a_split_without_matches_is_drawn_per_request() {
    let r = routed(
        vec![],
        vec![split("canary", "web", &[("web", 50), ("web-v3", 50)])],
    );
    let request = Request {
        method: "GET",
        path: "/",
        headers: &[("accept", "*/*")],
    };
    // Same picker, one draw per request (one endpoint per backend): 49 -> web, 50 -> web-v3.
    let mut pick = ScriptedPicker::new([49, 50]);
    let dst = addr("10.96.0.10:80");
    let first = r
        .route_request(&client(), dst, &request, &mut pick)
        .expect("routes");
    let second = r
        .route_request(&client(), dst, &request, &mut pick)
        .expect("routes");
    assert_eq!(first.resolution.target.addr(), addr("10.0.0.1:8080"));
    assert_eq!(second.resolution.target.addr(), addr("10.0.0.3:8083"));
    assert_eq!(second.route.as_deref(), Some("TrafficSplit shop/canary"));
    assert_eq!(pick.draws(), 2);
}

#[test]
fn requests_to_pods_and_outside_resolve_as_connections() {
    let r = routed(
        vec![http_route(
            "web",
            vec![rule(vec![prefix("/api")], vec![backend("web", 1)])],
        )],
        vec![],
    );
    let pod = route_req(&r, "10.0.0.1:8080", "GET", "/", &[]).expect("routes");
    assert_eq!(pod.resolution.target.addr(), addr("10.0.0.1:8080"));
    assert_eq!(pod.route, None);
    let out = route_req(&r, "93.184.216.34:80", "GET", "/", &[]).expect("routes");
    assert_eq!(out.resolution.target.kind(), "passthrough");
    let e = route_req(&r, "10.96.0.10:81", "GET", "/api", &[]).expect_err("no port 81");
    assert_eq!(e.kind(), "no_such_port");
}
