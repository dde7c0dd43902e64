use super::*;
use crate::identity::TrustDomain;

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("valid trust domain")
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(), ns, sa).expect("valid identity")
}

fn re(s: &str) -> AnchoredRegex {
    AnchoredRegex::new(s).expect("valid regex")
}

fn tt(name: &str) -> NamespacedName {
    NamespacedName::new("shop", name)
}

fn http(name: &str, path: Option<&str>, methods: &[&str], headers: &[(&str, &str)]) -> HttpMatch {
    HttpMatch {
        name: name.to_string(),
        path: path.map(re),
        methods: methods.iter().map(|m| m.to_string()).collect(),
        headers: headers
            .iter()
            .map(|(n, v)| HeaderMatch {
                name: n.to_string(),
                value: re(v),
            })
            .collect(),
    }
}

fn rule(target: &str, sources: &[SpiffeId], ports: &[u16], route: RouteMatch) -> Rule {
    Rule {
        traffic_target: tt(target),
        sources: sources.to_vec(),
        ports: ports.to_vec(),
        route,
    }
}

fn policy(mode: TrafficPolicyMode, tls_mode: TlsMode, rules: Vec<Rule>) -> InboundPolicy {
    InboundPolicy {
        workload: NamespacedName::new("shop", "api-0"),
        identity: id("shop", "api"),
        mode,
        tls_mode,
        rules,
    }
}

fn deny(rules: Vec<Rule>) -> InboundPolicy {
    policy(TrafficPolicyMode::DefaultDeny, TlsMode::Strict, rules)
}

fn conn<'a>(source: &'a SpiffeId, port: u16, request: Option<&'a Request<'a>>) -> Conn<'a> {
    Conn {
        source: Some(source),
        port,
        request,
    }
}

const NO_HEADERS: [(&str, &str); 0] = [];

fn get<'a>(path: &'a str) -> Request<'a> {
    Request {
        method: "GET",
        path,
        headers: &NO_HEADERS,
    }
}

#[test]
fn permissive_mode_allows_every_authenticated_caller() {
    let p = policy(TrafficPolicyMode::Permissive, TlsMode::Strict, vec![]);
    let web = id("shop", "web");
    let permit = authorize(&p, &conn(&web, 8080, None)).expect("permissive allows");
    assert_eq!(permit, Permit::Permissive);
    assert_eq!(permit.traffic_target(), None);
    assert!(!permit.requires_request_checks());
    assert!(permit.to_string().contains("permissive"), "{permit}");
    let req = get("/anything");
    assert_eq!(
        authorize(&p, &conn(&web, 1, Some(&req))),
        Ok(Permit::Permissive)
    );
}

#[test]
fn plaintext_callers() {
    let plain = Conn {
        source: None,
        port: 8080,
        request: None,
    };
    // STRICT refuses plaintext whatever the traffic policy.
    for mode in [
        TrafficPolicyMode::Permissive,
        TrafficPolicyMode::DefaultDeny,
    ] {
        let p = policy(mode, TlsMode::Strict, vec![]);
        let denied = authorize(&p, &plain).expect_err("strict refuses plaintext");
        assert_eq!(denied.kind(), "plaintext_strict");
        assert!(denied.to_string().contains("shop/api-0"), "{denied}");
    }
    // PERMISSIVE TLS: permissive traffic policy allows; default deny refuses the unknown caller
    // even when a rule would allow everyone it names.
    let p = policy(TrafficPolicyMode::Permissive, TlsMode::Permissive, vec![]);
    assert_eq!(authorize(&p, &plain), Ok(Permit::Permissive));
    let web = id("shop", "web");
    let p = policy(
        TrafficPolicyMode::DefaultDeny,
        TlsMode::Permissive,
        vec![rule("all", &[web], &[], RouteMatch::Tcp)],
    );
    let denied = authorize(&p, &plain).expect_err("unauthenticated under default deny");
    assert_eq!(denied.kind(), "unauthenticated");
    assert!(
        denied
            .to_string()
            .contains("spiffe://cluster.local/ns/shop/sa/api"),
        "{denied}"
    );
}

#[test]
fn default_deny_without_a_traffic_target() {
    let web = id("shop", "web");
    let other = id("shop", "batch");
    let p = deny(vec![rule("batch-to-api", &[other], &[], RouteMatch::Tcp)]);
    let denied = authorize(&p, &conn(&web, 8080, None)).expect_err("no rule for web");
    assert_eq!(
        denied,
        Denied::NoTrafficTarget {
            caller: &web,
            destination: &p.identity
        }
    );
    assert_eq!(
        denied.to_string(),
        "no TrafficTarget for source spiffe://cluster.local/ns/shop/sa/web to \
         spiffe://cluster.local/ns/shop/sa/api"
    );
}

#[test]
fn identity_must_match_exactly() {
    // Same namespace/name under another trust domain is another identity.
    let foreign = SpiffeId::workload(&TrustDomain::new("other.org").expect("td"), "shop", "web")
        .expect("valid");
    let p = deny(vec![rule(
        "web",
        &[id("shop", "web")],
        &[],
        RouteMatch::Tcp,
    )]);
    assert_eq!(
        authorize(&p, &conn(&foreign, 80, None)).map_err(|d| d.kind()),
        Err("no_traffic_target")
    );
    let other_ns = id("dev", "web");
    assert!(authorize(&p, &conn(&other_ns, 80, None)).is_err());
}

#[test]
fn tcp_rule_allows_the_connection_and_its_requests() {
    let web = id("shop", "web");
    let p = deny(vec![rule(
        "web-to-api",
        std::slice::from_ref(&web),
        &[],
        RouteMatch::Tcp,
    )]);
    let permit = authorize(&p, &conn(&web, 5432, None)).expect("tcp allows");
    assert_eq!(
        permit,
        Permit::Tcp {
            traffic_target: &tt("web-to-api")
        }
    );
    assert_eq!(permit.traffic_target(), Some(&tt("web-to-api")));
    assert!(!permit.requires_request_checks());
    assert!(permit.to_string().contains("shop/web-to-api"), "{permit}");
    let req = get("/admin");
    assert_eq!(permit.kind(), "tcp");
    assert!(authorize(&p, &conn(&web, 5432, Some(&req))).is_ok());
}

#[test]
fn ports_restrict_rules() {
    let web = id("shop", "web");
    let p = deny(vec![rule(
        "db",
        std::slice::from_ref(&web),
        &[5432, 6432],
        RouteMatch::Tcp,
    )]);
    assert!(authorize(&p, &conn(&web, 6432, None)).is_ok());
    let denied = authorize(&p, &conn(&web, 8080, None)).expect_err("port 8080 not covered");
    assert_eq!(denied.kind(), "port_not_covered");
    assert_eq!(
        denied.to_string(),
        "port 8080 is not covered by any TrafficTarget for source \
         spiffe://cluster.local/ns/shop/sa/web to spiffe://cluster.local/ns/shop/sa/api"
    );
}

#[test]
fn rules_are_additive() {
    let web = id("shop", "web");
    let prom = id("monitoring", "prometheus");
    let p = deny(vec![
        rule(
            "web-api",
            std::slice::from_ref(&web),
            &[8080],
            RouteMatch::Tcp,
        ),
        rule(
            "metrics",
            std::slice::from_ref(&prom),
            &[9090],
            RouteMatch::Http(vec![http("metrics", Some("/metrics"), &["GET"], &[])]),
        ),
        rule(
            "web-admin",
            std::slice::from_ref(&web),
            &[9000],
            RouteMatch::Tcp,
        ),
    ]);
    assert_eq!(
        authorize(&p, &conn(&web, 9000, None)),
        Ok(Permit::Tcp {
            traffic_target: &tt("web-admin")
        })
    );
    assert_eq!(
        authorize(&p, &conn(&web, 8080, None)),
        Ok(Permit::Tcp {
            traffic_target: &tt("web-api")
        })
    );
    assert!(authorize(&p, &conn(&web, 9090, None)).is_err());
    let req = get("/metrics");
    assert_eq!(
        authorize(&p, &conn(&prom, 9090, Some(&req))),
        Ok(Permit::Http {
            traffic_target: &tt("metrics"),
            route: "metrics"
        })
    );
    assert_eq!(
        authorize(&p, &conn(&prom, 8080, Some(&req))).map_err(|d| d.kind()),
        Err("port_not_covered")
    );
}

#[test]
fn http_rule_admits_connections_then_checks_requests() {
    let web = id("shop", "web");
    let p = deny(vec![rule(
        "web-api",
        std::slice::from_ref(&web),
        &[],
        RouteMatch::Http(vec![
            http("read", Some("/api/.*"), &["GET", "HEAD"], &[]),
            http("health", Some("/healthz"), &[], &[]),
        ]),
    )]);
    let permit = authorize(&p, &conn(&web, 8080, None)).expect("connection admitted");
    assert_eq!(
        permit,
        Permit::HttpConnection {
            traffic_target: &tt("web-api")
        }
    );
    assert!(permit.requires_request_checks());

    let ok = get("/api/items/1");
    assert_eq!(
        authorize(&p, &conn(&web, 8080, Some(&ok))),
        Ok(Permit::Http {
            traffic_target: &tt("web-api"),
            route: "read"
        })
    );
    let head = Request {
        method: "HEAD",
        ..get("/api/x")
    };
    assert!(authorize(&p, &conn(&web, 8080, Some(&head))).is_ok());
    let any_method = Request {
        method: "DELETE",
        ..get("/healthz")
    };
    assert!(authorize(&p, &conn(&web, 8080, Some(&any_method))).is_ok());

    let post = Request {
        method: "POST",
        ..get("/api/items")
    };
    let denied = authorize(&p, &conn(&web, 8080, Some(&post))).expect_err("POST not allowed");
    assert_eq!(
        denied.to_string(),
        "no HTTP match for POST /api/items from spiffe://cluster.local/ns/shop/sa/web to \
         spiffe://cluster.local/ns/shop/sa/api port 8080"
    );
    // Methods are case-sensitive.
    let lower = Request {
        method: "get",
        ..get("/api/items")
    };
    assert!(authorize(&p, &conn(&web, 8080, Some(&lower))).is_err());
}

#[test]
fn path_regex_is_anchored_at_both_ends() {
    let web = id("shop", "web");
    let p = deny(vec![rule(
        "t",
        std::slice::from_ref(&web),
        &[],
        RouteMatch::Http(vec![http("api", Some("/api"), &[], &[])]),
    )]);
    for (path, allowed) in [
        ("/api", true),
        ("/api/x", false),
        ("/v1/api", false),
        ("/ap", false),
    ] {
        let req = get(path);
        assert_eq!(
            authorize(&p, &conn(&web, 80, Some(&req))).is_ok(),
            allowed,
            "{path}"
        );
    }
}

#[test]
fn header_matches_all_must_hold() {
    let web = id("shop", "web");
    let p = deny(vec![rule(
        "t",
        std::slice::from_ref(&web),
        &[],
        RouteMatch::Http(vec![http(
            "insiders",
            None,
            &[],
            &[
                ("user-agent", ".*Android.*"),
                ("cookie", "(.*?;)?(type=insider)(;.*)?"),
            ],
        )]),
    )]);
    let check = |headers: &[(&str, &str)]| {
        let req = Request {
            method: "GET",
            path: "/",
            headers: &headers,
        };
        authorize(&p, &conn(&web, 80, Some(&req))).is_ok()
    };
    assert!(check(&[
        ("User-Agent", "Mozilla (Android 14)"),
        ("cookie", "a=b;type=insider")
    ]));
    assert!(
        !check(&[("user-agent", "Mozilla (Android 14)")]),
        "cookie missing"
    );
    assert!(!check(&[
        ("user-agent", "iPhone"),
        ("cookie", "type=insider")
    ]));
    assert!(!check(&[]));
}

#[test]
fn tcp_rule_wins_over_a_pending_http_rule() {
    let web = id("shop", "web");
    let p = deny(vec![
        rule(
            "a-http",
            std::slice::from_ref(&web),
            &[],
            RouteMatch::Http(vec![http("x", Some("/x"), &[], &[])]),
        ),
        rule("b-tcp", std::slice::from_ref(&web), &[80], RouteMatch::Tcp),
    ]);
    assert_eq!(
        authorize(&p, &conn(&web, 80, None)),
        Ok(Permit::Tcp {
            traffic_target: &tt("b-tcp")
        })
    );
    assert_eq!(
        authorize(&p, &conn(&web, 81, None)),
        Ok(Permit::HttpConnection {
            traffic_target: &tt("a-http")
        })
    );
}

#[test]
fn an_http_rule_with_no_matches_admits_no_request() {
    let web = id("shop", "web");
    let p = deny(vec![rule(
        "t",
        std::slice::from_ref(&web),
        &[],
        RouteMatch::Http(vec![]),
    )]);
    let req = get("/");
    assert_eq!(
        authorize(&p, &conn(&web, 80, Some(&req))).map_err(|d| d.kind()),
        Err("no_http_match")
    );
}

#[test]
fn verdicts_serialize_for_the_debugging_commands() {
    let web = id("shop", "web");
    let p = deny(vec![]);
    let denied = authorize(&p, &conn(&web, 80, None)).expect_err("no rule");
    let json = serde_json::to_value(denied).expect("serialize");
    assert_eq!(json["kind"], "no_traffic_target");
    assert_eq!(json["caller"], "spiffe://cluster.local/ns/shop/sa/web");
    let permit = Permit::Http {
        traffic_target: &p.workload,
        route: "r",
    };
    let json = serde_json::to_value(permit).expect("serialize");
    assert_eq!(json["traffic_target"]["name"], "api-0");
}
