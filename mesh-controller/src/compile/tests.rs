use mesh_core::model::TlsMode;
use mesh_core::policy::{Conn, Denied, Permit, Request, authorize};

use super::*;
use crate::index::SharedIndex;
use crate::resource::{Kind, Resource, ResourceKey, parse_yaml_stream};

const NO_HEADERS: [(&str, &str); 0] = [];

fn td() -> TrustDomain {
    TrustDomain::new("cluster.local").expect("valid trust domain")
}

fn opts(traffic_policy: TrafficPolicyMode) -> CompileOptions {
    CompileOptions {
        service_cidrs: vec!["10.96.0.0/12".into()],
        trust_domain: td(),
        traffic_policy,
    }
}

fn deny() -> CompileOptions {
    opts(TrafficPolicyMode::DefaultDeny)
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::workload(&td(), ns, sa).expect("valid identity")
}

fn nn(ns: &str, name: &str) -> NamespacedName {
    NamespacedName::new(ns, name)
}

/// A shared index holding `docs` (every document must be valid).
fn index(docs: &[&str]) -> SharedIndex {
    let shared = SharedIndex::new();
    shared.update(|ix| {
        for doc in docs {
            for r in parse_yaml_stream(doc) {
                ix.apply("test.yaml", r.expect("valid test document"));
            }
        }
    });
    shared
}

fn pod(name: &str, sa: &str, node: &str, ip: &str, labels: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\nspec:\n  serviceAccountName: {sa}\n  nodeName: {node}\n  containers:\n  - name: app\n    image: app\n    ports: [{{name: http, containerPort: 8080}}]\nstatus:\n  podIP: {ip}\n"
    )
}

/// Namespace `shop` (enrolled) and `monitoring` (enrolled): web-0 and api-1 on n1, api-0 and
/// db-0 on n2, prometheus on n1, batch-0 opted out on n1; services api, db, web.
fn cluster() -> String {
    let mut s = String::from(
        r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh.io/enrolled: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: monitoring, labels: {mesh.io/enrolled: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: prometheus-0, namespace: monitoring}
spec: {serviceAccountName: prometheus, nodeName: n1, containers: [{name: p, image: p}]}
status: {podIP: 10.0.9.1}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.2
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  clusterIP: 10.96.0.4
  selector: {app: db}
  ports: [{name: tcp-pg, port: 5432}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#,
    );
    s += &pod("web-0", "web", "n1", "10.0.0.1", "app: web");
    s += &pod("api-0", "api", "n2", "10.0.0.2", "app: api");
    s += &pod("api-1", "api", "n1", "10.0.0.3", "app: api");
    s += &pod("db-0", "db", "n2", "10.0.0.4", "app: db");
    s += &pod(
        "batch-0",
        "batch",
        "n1",
        "10.0.0.5",
        "app: api, mesh.io/enrolled: \"false\"",
    );
    s
}

const ROUTES: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: api-routes, namespace: shop}
spec:
  matches:
  - name: metrics
    pathRegex: /metrics
    methods: [GET]
  - name: read
    pathRegex: /api/.*
    methods: [GET, HEAD]
    headers: {x-tenant: "[a-z]+"}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: api-port, namespace: shop}
spec: {matches: {ports: [8080]}}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: any-port, namespace: shop}
spec: {matches: {ports: []}}
"#;

fn target(name: &str, dest: &str, sources: &[(&str, &str)], rules: &str) -> String {
    let sources: String = sources
        .iter()
        .map(|(ns, sa)| format!("  - {{kind: ServiceAccount, name: {sa}, namespace: {ns}}}\n"))
        .collect();
    format!(
        "---\napiVersion: access.smi-spec.io/v1alpha3\nkind: TrafficTarget\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  destination: {{kind: ServiceAccount, name: {dest}, namespace: shop}}\n  rules:\n{rules}  sources:\n{sources}"
    )
}

fn policy<'a>(snapshot: &'a NodeSnapshot, pod: &str) -> &'a InboundPolicy {
    snapshot
        .policies
        .get(&nn("shop", pod))
        .expect("a policy for the pod")
}

fn conn<'a>(source: &'a SpiffeId, port: u16, request: Option<&'a Request<'a>>) -> Conn<'a> {
    Conn {
        source: Some(source),
        port,
        request,
    }
}

#[test]
fn allow_with_a_tcp_route() {
    let tt = target(
        "web-to-api",
        "api",
        &[("shop", "web")],
        "  - {kind: TCPRoute, name: api-port}\n",
    );
    let shared = index(&[&cluster(), ROUTES, &tt]);
    let ix = shared.read();
    let n1 = compile_node(&ix, &deny(), "n1");
    let n2 = compile_node(&ix, &deny(), "n2");
    for (snapshot, pod) in [(&n1, "api-1"), (&n2, "api-0")] {
        let p = policy(snapshot, pod);
        assert_eq!(p.identity, id("shop", "api"));
        assert_eq!(p.mode, TrafficPolicyMode::DefaultDeny);
        assert_eq!(
            p.rules,
            [Rule {
                traffic_target: nn("shop", "web-to-api"),
                sources: vec![id("shop", "web")],
                ports: vec![8080],
                route: RouteMatch::Tcp,
            }]
        );
        let web = id("shop", "web");
        assert!(matches!(
            authorize(p, &conn(&web, 8080, None)),
            Ok(Permit::Tcp { .. })
        ));
        assert!(matches!(
            authorize(p, &conn(&web, 9090, None)),
            Err(Denied::PortNotCovered { .. })
        ));
    }
    assert!(ix.rejections().is_empty(), "{:?}", ix.rejections());
}

#[test]
fn deny_without_a_traffic_target() {
    let shared = index(&[&cluster(), ROUTES]);
    let n2 = compile_node(&shared.read(), &deny(), "n2");
    let db = policy(&n2, "db-0");
    assert!(db.rules.is_empty());
    let web = id("shop", "web");
    let denied = authorize(db, &conn(&web, 5432, None)).expect_err("no TrafficTarget");
    assert_eq!(
        denied.to_string(),
        "no TrafficTarget for source spiffe://cluster.local/ns/shop/sa/web to spiffe://cluster.local/ns/shop/sa/db"
    );
}

#[test]
fn rules_are_additive_across_traffic_targets() {
    let docs = [
        cluster(),
        ROUTES.to_string(),
        target(
            "b-web",
            "api",
            &[("shop", "web")],
            "  - {kind: TCPRoute, name: api-port}\n",
        ),
        target(
            "a-metrics",
            "api",
            &[("monitoring", "prometheus"), ("shop", "web")],
            "  - {kind: HTTPRouteGroup, name: api-routes, matches: [metrics]}\n",
        ),
    ];
    let shared = index(&docs.iter().map(String::as_str).collect::<Vec<_>>());
    let n2 = compile_node(&shared.read(), &deny(), "n2");
    let p = policy(&n2, "api-0");
    let names: Vec<_> = p
        .rules
        .iter()
        .map(|r| r.traffic_target.name.as_str())
        .collect();
    assert_eq!(names, ["a-metrics", "b-web"], "sorted by TrafficTarget");
    assert_eq!(
        p.rules[0].sources,
        [id("monitoring", "prometheus"), id("shop", "web")]
    );

    let prom = id("monitoring", "prometheus");
    let get_metrics = Request {
        method: "GET",
        path: "/metrics",
        headers: &NO_HEADERS,
    };
    assert!(authorize(p, &conn(&prom, 8080, Some(&get_metrics))).is_ok());
    assert!(authorize(p, &conn(&prom, 8080, None)).is_ok_and(|p| p.requires_request_checks()));
    let web = id("shop", "web");
    assert!(matches!(
        authorize(p, &conn(&web, 8080, None)),
        Ok(Permit::Tcp { .. })
    ));
}

#[test]
fn http_route_matches() {
    let docs = [
        cluster(),
        ROUTES.to_string(),
        target(
            "named",
            "api",
            &[("shop", "web")],
            "  - {kind: HTTPRouteGroup, name: api-routes, matches: [read]}\n",
        ),
        target(
            "all",
            "db",
            &[("shop", "web")],
            "  - {kind: HTTPRouteGroup, name: api-routes}\n",
        ),
    ];
    let shared = index(&docs.iter().map(String::as_str).collect::<Vec<_>>());
    let n2 = compile_node(&shared.read(), &deny(), "n2");
    let web = id("shop", "web");
    let check = |pod: &str, method: &str, path: &str, headers: &[(&str, &str)]| {
        let request = Request {
            method,
            path,
            headers: &headers,
        };
        authorize(policy(&n2, pod), &conn(&web, 8080, Some(&request)))
            .map(|p| p.to_string())
            .map_err(|d| d.kind())
    };
    // Named matches only.
    assert_eq!(
        check("api-0", "GET", "/api/items", &[("x-tenant", "acme")]),
        Ok("allowed by TrafficTarget shop/named, HTTP match \"read\"".to_string())
    );
    assert_eq!(
        check("api-0", "GET", "/api/items", &[]),
        Err("no_http_match"),
        "header required"
    );
    assert_eq!(
        check("api-0", "GET", "/api/items", &[("x-tenant", "ACME")]),
        Err("no_http_match")
    );
    assert_eq!(
        check("api-0", "POST", "/api/items", &[("x-tenant", "a")]),
        Err("no_http_match")
    );
    assert_eq!(
        check("api-0", "GET", "/metrics", &[]),
        Err("no_http_match"),
        "not named"
    );
    // `matches` omitted: every match of the group; the path regex is anchored.
    assert!(check("db-0", "GET", "/metrics", &[]).is_ok());
    assert_eq!(
        check("db-0", "GET", "/metrics/x", &[]),
        Err("no_http_match")
    );
    assert!(check("db-0", "HEAD", "/api/x", &[("x-tenant", "a")]).is_ok());
}

#[test]
fn ports_from_destination_port_and_tcp_routes() {
    let v1alpha2 = |name: &str, port: u16, rules: &str| {
        target(name, "api", &[("shop", "web")], rules)
            .replace("v1alpha3", "v1alpha2")
            .replace(
                "namespace: shop}\n  rules",
                &format!("namespace: shop, port: {port}}}\n  rules"),
            )
    };
    let docs = [
        cluster(),
        ROUTES.to_string(),
        // v1alpha2: the destination port restricts the TCPRoute (every port) to 9090.
        v1alpha2("a-v1alpha2", 9090, "  - {kind: TCPRoute, name: any-port}\n"),
        // Disjoint: 7070 and the TCPRoute's 8080 leave nothing.
        v1alpha2("b-disjoint", 7070, "  - {kind: TCPRoute, name: api-port}\n"),
        // TCPRoute + HTTPRouteGroup: the HTTP routes on the TCPRoute's ports.
        target(
            "c-http-on-8080",
            "api",
            &[("shop", "web")],
            "  - {kind: TCPRoute, name: api-port}\n  - {kind: HTTPRouteGroup, name: api-routes, matches: [metrics]}\n",
        ),
    ];
    let shared = index(&docs.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        shared.read().rejections().is_empty(),
        "{:?}",
        shared.read().rejections()
    );
    let n2 = compile_node(&shared.read(), &deny(), "n2");
    let p = policy(&n2, "api-0");
    let summary: Vec<_> = p
        .rules
        .iter()
        .map(|r| {
            (
                r.traffic_target.name.as_str(),
                r.ports.clone(),
                matches!(r.route, RouteMatch::Tcp),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a-v1alpha2", vec![9090], true),
            ("c-http-on-8080", vec![8080], false)
        ]
    );
    let web = id("shop", "web");
    let get = |path| Request {
        method: "GET",
        path,
        headers: &NO_HEADERS,
    };
    // 8080 allows only GET /metrics; 9090 allows everything; 7070 nothing.
    assert!(authorize(p, &conn(&web, 8080, Some(&get("/metrics")))).is_ok());
    assert!(authorize(p, &conn(&web, 8080, Some(&get("/admin")))).is_err());
    assert!(authorize(p, &conn(&web, 9090, Some(&get("/admin")))).is_ok());
    assert!(authorize(p, &conn(&web, 7070, None)).is_err());
}

#[test]
fn missing_references_reject_only_that_resource() {
    let docs = [
        cluster(),
        ROUTES.to_string(),
        target(
            "good",
            "api",
            &[("shop", "web")],
            "  - {kind: TCPRoute, name: api-port}\n",
        ),
        target(
            "no-group",
            "api",
            &[("shop", "db")],
            "  - {kind: HTTPRouteGroup, name: missing}\n",
        ),
        target(
            "no-match",
            "api",
            &[("shop", "db")],
            "  - {kind: TCPRoute, name: api-port}\n  - {kind: HTTPRouteGroup, name: api-routes, matches: [metrics, nope]}\n",
        ),
    ];
    let shared = index(&docs.iter().map(String::as_str).collect::<Vec<_>>());
    let ix = shared.read();
    let n2 = compile_node(&ix, &deny(), "n2");
    let p = policy(&n2, "api-0");
    let names: Vec<_> = p
        .rules
        .iter()
        .map(|r| r.traffic_target.name.as_str())
        .collect();
    assert_eq!(names, ["good"]);
    let rejections: Vec<_> = ix
        .rejections()
        .into_iter()
        .map(|r| (r.key.expect("keyed").to_string(), r.reason))
        .collect();
    assert_eq!(
        rejections,
        [
            (
                "TrafficTarget shop/no-group".to_string(),
                "spec.rules[0]: HTTPRouteGroup shop/missing does not exist".to_string()
            ),
            (
                "TrafficTarget shop/no-match".to_string(),
                "spec.rules[1].matches[1]: HTTPRouteGroup shop/api-routes has no match named \"nope\"".to_string()
            ),
        ]
    );
    assert!(ix.is_rejected(&ResourceKey::new(Kind::TrafficTarget, "shop", "no-group")));
    assert!(!ix.is_rejected(&ResourceKey::new(Kind::TrafficTarget, "shop", "good")));
}

/// The `evil` tenant's TrafficTarget for `shop/api`, its TCPRoute and an EndpointSlice
/// borrowing `shop/api-0`'s identity.
const EVIL: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: evil, labels: {mesh.io/enrolled: "true"}}
---
apiVersion: v1
kind: Pod
metadata: {name: mallory-0, namespace: evil}
spec: {serviceAccountName: mallory, nodeName: n1, containers: [{name: m, image: m}]}
status: {podIP: 10.0.6.6}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: all-ports, namespace: evil}
spec: {matches: {ports: []}}
---
apiVersion: v1
kind: Service
metadata: {name: decoy, namespace: evil}
spec: {clusterIP: 10.96.6.6, ports: [{name: http, port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: decoy-1
  namespace: evil
  labels: {kubernetes.io/service-name: decoy}
addressType: IPv4
endpoints:
- addresses: [10.0.6.6]
  targetRef: {kind: Pod, name: api-0, namespace: shop}
"#;

const EVIL_TARGET: &str = r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: mallory-to-api, namespace: evil}
spec:
  destination: {kind: ServiceAccount, name: api, namespace: shop}
  rules: [{kind: TCPRoute, name: all-ports}]
  sources: [{kind: ServiceAccount, name: mallory, namespace: evil}]
"#;

#[test]
fn another_namespace_cannot_open_a_workload() {
    // The reader refuses the TrafficTarget, naming the field: it never reaches the index.
    let refused = parse_yaml_stream(EVIL_TARGET)
        .pop()
        .expect("one document")
        .expect_err("cross-namespace destination");
    assert_eq!(
        refused.to_string(),
        "document 1: TrafficTarget evil/mallory-to-api: spec.destination.namespace: \"shop\" is \
         not the TrafficTarget's own namespace \"evil\" (a TrafficTarget grants access to \
         destinations in its namespace only)"
    );

    // Built by hand past the reader, it still binds only `evil/api`.
    let mut tt =
        match parse_yaml_stream(&EVIL_TARGET.replace("name: api, namespace: shop", "name: api"))
            .pop()
            .expect("one document")
            .expect("valid in its own namespace")
        {
            Resource::TrafficTarget(tt) => tt,
            other => panic!("not a TrafficTarget: {other:?}"),
        };
    tt.spec.destination.namespace = Some("shop".to_string());
    // A rule naming shop's TCPRoute looks it up in evil, where it does not exist.
    let mut borrowed = tt.clone();
    borrowed.metadata.name = "borrowed-route".to_string();
    borrowed.spec.rules[0].name = "api-port".to_string();

    let shared = index(&[&cluster(), ROUTES, EVIL]);
    shared.update(|ix| {
        ix.apply("evil.yaml", Resource::TrafficTarget(tt));
        ix.apply("evil.yaml", Resource::TrafficTarget(borrowed));
        ix.revalidate();
    });
    let ix = shared.read();
    let mallory = id("evil", "mallory");
    for (node, pod) in [("n1", "api-1"), ("n2", "api-0")] {
        let snapshot = compile_node(&ix, &deny(), node);
        let p = policy(&snapshot, pod);
        assert!(p.rules.is_empty(), "{pod}: {:?}", p.rules);
        assert!(matches!(
            authorize(p, &conn(&mallory, 8080, None)),
            Err(Denied::NoTrafficTarget { .. })
        ));
    }
    let rejections: Vec<_> = ix
        .rejections()
        .into_iter()
        .map(|r| (r.key.expect("keyed").to_string(), r.reason))
        .collect();
    assert_eq!(
        rejections,
        [(
            "TrafficTarget evil/borrowed-route".to_string(),
            "spec.rules[0]: TCPRoute evil/api-port does not exist".to_string()
        )]
    );

    // The decoy's endpoint names shop's pod but gets no identity from it.
    let n1 = compile_node(&ix, &deny(), "n1");
    let decoy = &n1.services[&nn("evil", "decoy")];
    assert_eq!(decoy.endpoints.len(), 1);
    assert_eq!(decoy.endpoints[0].identity, None);
    assert_eq!(decoy.endpoints[0].workload, None);
}

#[test]
fn traffic_splits() {
    let split = |name: &str, backends: &str| {
        format!(
            "---\napiVersion: split.smi-spec.io/v1alpha2\nkind: TrafficSplit\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  service: api\n  backends:\n{backends}"
        )
    };
    let services = r#"
apiVersion: v1
kind: Service
metadata: {name: api-v1, namespace: shop}
spec: {clusterIP: 10.96.1.1, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api-v2, namespace: shop}
spec: {clusterIP: 10.96.1.2, selector: {app: api-v2}, ports: [{name: http, port: 80}]}
"#;
    let docs = [
        cluster(),
        services.to_string(),
        split(
            "canary",
            "  - {service: api-v1, weight: 90}\n  - {service: api-v2, weight: 10}\n",
        ),
        // The SMI workflow: a weight-0 backend may not exist yet.
        split(
            "rollout",
            "  - {service: api-v1, weight: 100}\n  - {service: api-v3, weight: 0}\n",
        ),
        split(
            "broken",
            "  - {service: api-v1, weight: 50}\n  - {service: api-v9, weight: 50}\n",
        ),
    ];
    let shared = index(&docs.iter().map(String::as_str).collect::<Vec<_>>());
    let ix = shared.read();
    let all = compile_all(&ix, &deny());
    assert_eq!(all.keys().collect::<Vec<_>>(), ["n1", "n2"]);
    for snapshot in all.values() {
        let names: Vec<_> = snapshot.splits.keys().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["canary", "rollout"]);
        let canary = &snapshot.splits[&nn("shop", "canary")];
        assert_eq!(canary.root, nn("shop", "api"));
        assert_eq!(
            canary.backends,
            [
                SplitBackend {
                    service: nn("shop", "api-v1"),
                    weight: 90
                },
                SplitBackend {
                    service: nn("shop", "api-v2"),
                    weight: 10
                },
            ]
        );
        assert_eq!(snapshot.splits[&nn("shop", "rollout")].backends.len(), 1);
    }
    let rejections = ix.rejections();
    assert_eq!(rejections.len(), 1);
    assert_eq!(
        rejections[0].reason,
        "spec.backends[1].service: Service shop/api-v9 does not exist"
    );
}

#[test]
fn enrollment_and_opt_out() {
    let shared = index(&[&cluster()]);
    let ix = shared.read();
    let n1 = compile_node(&ix, &deny(), "n1");
    let names: Vec<_> = n1.workloads.keys().map(|n| n.to_string()).collect();
    assert_eq!(
        names,
        ["monitoring/prometheus-0", "shop/api-1", "shop/web-0"]
    );
    assert_eq!(n1.policies.len(), 3);
    assert!(n1.policies.values().all(|p| p.tls_mode == TlsMode::Strict));
    // The opted-out pod is still an endpoint of its service, without an identity.
    let api = &n1.services[&nn("shop", "api")];
    let batch = api
        .endpoints
        .iter()
        .find(|e| e.ip == Ipv4Addr::new(10, 0, 0, 5))
        .expect("batch-0 is an endpoint");
    assert_eq!(batch.identity, None);
    assert_eq!(batch.workload, None);
    assert_eq!(batch.node.as_deref(), Some("n1"));
    assert!(ix.nodes().contains("n2"));
    // A node without meshed pods gets the services but no workloads.
    let empty = compile_node(&ix, &deny(), "n9");
    assert!(empty.workloads.is_empty() && empty.policies.is_empty());
    assert_eq!(empty.services.len(), 3);
}

#[test]
fn permissive_traffic_policy() {
    let shared = index(&[&cluster()]);
    let n2 = compile_node(&shared.read(), &opts(TrafficPolicyMode::Permissive), "n2");
    let db = policy(&n2, "db-0");
    assert_eq!(db.mode, TrafficPolicyMode::Permissive);
    let web = id("shop", "web");
    assert_eq!(
        authorize(db, &conn(&web, 5432, None)),
        Ok(Permit::Permissive)
    );
}

#[test]
fn services_from_selectors() {
    let shared = index(&[&cluster()]);
    let n1 = compile_node(&shared.read(), &deny(), "n1");
    let api = &n1.services[&nn("shop", "api")];
    assert_eq!(api.vip, Some(Ipv4Addr::new(10, 96, 0, 2)));
    // The UDP port is left out; the named target port resolves from the pods.
    assert_eq!(
        api.ports,
        [ServicePort {
            name: "http".into(),
            port: 80,
            target_port: 8080,
            protocol: Protocol::Http,
        }]
    );
    let endpoints: Vec<_> = api
        .endpoints
        .iter()
        .map(|e| {
            (
                e.ip.to_string(),
                e.identity.as_ref().map(ToString::to_string),
                e.node.clone(),
                e.ready,
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            (
                "10.0.0.2".to_string(),
                Some("spiffe://cluster.local/ns/shop/sa/api".to_string()),
                Some("n2".to_string()),
                true
            ),
            (
                "10.0.0.3".to_string(),
                Some("spiffe://cluster.local/ns/shop/sa/api".to_string()),
                Some("n1".to_string()),
                true
            ),
            ("10.0.0.5".to_string(), None, Some("n1".to_string()), true),
        ]
    );
    assert_eq!(
        n1.services[&nn("shop", "db")].ports[0].protocol,
        Protocol::Tcp
    );
}

#[test]
fn services_from_endpoint_slices() {
    let docs = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  clusterIP: 10.96.0.2
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: web}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-x1
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv4
ports: [{name: http, port: 9000}]
endpoints:
- addresses: [10.0.0.2]
  conditions: {ready: true}
  targetRef: {kind: Pod, name: api-0, namespace: shop}
- addresses: [10.0.0.7]
  conditions: {ready: false}
  nodeName: n3
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: api-x2
  namespace: shop
  labels: {kubernetes.io/service-name: api}
addressType: IPv6
endpoints: [{addresses: ["fd00::2"]}]
---
apiVersion: v1
kind: Service
metadata: {name: nothing, namespace: shop}
spec: {clusterIP: None, selector: {app: none}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: external, namespace: shop}
spec: {type: ExternalName, externalName: example.com}
"#;
    let shared = index(&[&cluster(), docs]);
    let n1 = compile_node(&shared.read(), &deny(), "n1");
    let api = &n1.services[&nn("shop", "api")];
    assert_eq!(api.ports[0].target_port, 9000, "the slice's port wins");
    assert_eq!(
        api.endpoints.len(),
        2,
        "IPv6 slices are skipped, selector ignored"
    );
    assert_eq!(api.endpoints[0].workload, Some(nn("shop", "api-0")));
    assert_eq!(api.endpoints[0].identity, Some(id("shop", "api")));
    assert_eq!(api.endpoints[0].node.as_deref(), Some("n2"), "from the pod");
    assert_eq!(api.endpoints[1].ip, Ipv4Addr::new(10, 0, 0, 7));
    assert!(!api.endpoints[1].ready);
    assert_eq!(api.endpoints[1].identity, None);
    assert_eq!(api.endpoints[1].node.as_deref(), Some("n3"));
    assert!(
        !n1.services.contains_key(&nn("shop", "nothing")),
        "no VIP, no endpoints"
    );
    assert!(!n1.services.contains_key(&nn("shop", "external")));
    let headless = &n1.services[&nn("shop", "headless")];
    assert_eq!(headless.vip, None);
    assert_eq!(headless.endpoints.len(), 1);
}

#[test]
fn output_is_deterministic_and_follows_changes() {
    let tt = target(
        "web-to-api",
        "api",
        &[("shop", "web")],
        "  - {kind: TCPRoute, name: api-port}\n",
    );
    let shared = index(&[&cluster(), ROUTES, &tt]);
    let first = compile_all(&shared.read(), &deny());
    // A fresh index with the same content compiles to the same snapshots.
    let again = compile_all(&index(&[&tt, ROUTES, &cluster()]).read(), &deny());
    assert_eq!(first, again);
    for (node, snapshot) in &first {
        assert_eq!(*snapshot, compile_node(&shared.read(), &deny(), node));
        assert!(snapshot.trust_bundle.is_empty());
    }

    // A pod moves from n1 to n2: the cached shared part is recomputed.
    shared.update(|ix| {
        for r in parse_yaml_stream(&pod("api-1", "api", "n2", "10.0.0.3", "app: api")) {
            ix.apply("test.yaml", r.expect("valid"));
        }
    });
    let ix = shared.read();
    let n1 = compile_node(&ix, &deny(), "n1");
    let n2 = compile_node(&ix, &deny(), "n2");
    assert!(!n1.workloads.contains_key(&nn("shop", "api-1")));
    assert!(n2.workloads.contains_key(&nn("shop", "api-1")));
    let endpoint = n2.services[&nn("shop", "api")]
        .endpoints
        .iter()
        .find(|e| e.ip == Ipv4Addr::new(10, 0, 0, 3))
        .expect("api-1 endpoint");
    assert_eq!(endpoint.node.as_deref(), Some("n2"));
}

mod routes;

#[test]
fn the_node_s_pods_are_listed_meshed_or_not_before_they_have_an_address() {
    let docs = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {mesh.io/enrolled: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  namespace: shop
  uid: 6f1c2b7e-3d4a-4b8c-9e0f-1a2b3c4d5e6f
  annotations: {mesh.io/exclude-inbound-ports: "9100"}
spec:
  serviceAccountName: web
  nodeName: n1
  initContainers:
  - name: sidecar
    image: sidecar
    restartPolicy: Always
    startupProbe: {grpc: {port: 9090}}
  containers:
  - name: app
    image: app
    ports: [{containerPort: 8080}, {name: health, containerPort: 8081}]
    livenessProbe: {httpGet: {path: /healthz, port: health}}
    readinessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {httpGet: {path: /, port: no-such-port}}
  - name: other
    image: other
    ports: [{name: health, containerPort: 7000}]
    readinessProbe: {exec: {command: ["true"]}}
---
apiVersion: v1
kind: Pod
metadata: {name: batch-0, namespace: plain, uid: 0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d}
spec: {nodeName: n1, containers: [{name: b, image: b, ports: [{containerPort: 80}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: 1a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d}
spec: {serviceAccountName: web, nodeName: n2, containers: [{name: app, image: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: no-uid, namespace: shop}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: app, image: app}]}
---
apiVersion: v1
kind: Pod
metadata: {name: done, namespace: shop, uid: 2a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d}
spec: {serviceAccountName: web, nodeName: n1, containers: [{name: app, image: app}]}
status: {phase: Succeeded}
"#;
    let shared = index(&[docs]);
    let n1 = compile_node(&shared.read(), &deny(), "n1");
    let names: Vec<String> = n1.node_pods.keys().map(|n| n.to_string()).collect();
    assert_eq!(names, ["plain/batch-0", "shop/web-0"]);
    let web = &n1.node_pods[&nn("shop", "web-0")];
    assert!(web.meshed);
    assert_eq!(web.uid, "6f1c2b7e-3d4a-4b8c-9e0f-1a2b3c4d5e6f");
    assert_eq!(web.mode, TlsMode::Strict);
    assert_eq!(web.ports, [7000, 8080, 8081]);
    // Named ports resolve within their own container; exec probes use no port.
    assert_eq!(web.probe_ports, [8080, 8081, 9090]);
    assert_eq!(web.excluded_inbound_ports, [9100]);
    // No address yet, so no workload: the CNI plugin asks before the pod has one.
    assert!(n1.workloads.is_empty());
    let batch = &n1.node_pods[&nn("plain", "batch-0")];
    assert!(!batch.meshed);
    assert!(
        batch.ports.is_empty(),
        "nothing of an unmeshed pod is needed"
    );
}

#[test]
fn the_capture_list_is_every_node_s_pod_cidrs_and_the_service_cidrs() {
    let docs = r#"
apiVersion: v1
kind: Node
metadata: {name: n1}
spec: {podCIDR: 10.244.1.0/24, podCIDRs: [10.244.1.0/24, "fd00:1::/64"]}
---
apiVersion: v1
kind: Node
metadata: {name: n2}
spec: {podCIDR: 10.244.2.0/24}
---
apiVersion: v1
kind: Node
metadata: {name: n3}
spec: {}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: kubernetes}
spec: {cidrs: [10.96.0.0/12, "fd00:96::/108"]}
---
apiVersion: networking.k8s.io/v1
kind: ServiceCIDR
metadata: {name: extra}
spec: {cidrs: [10.100.0.0/16]}
"#;
    let shared = index(&[docs]);
    let n1 = compile_node(&shared.read(), &deny(), "n1");
    // IPv4 only, each once (the configured 10.96.0.0/12 is also a ServiceCIDR's), sorted.
    assert_eq!(
        n1.capture,
        [
            "10.100.0.0/16",
            "10.244.1.0/24",
            "10.244.2.0/24",
            "10.96.0.0/12"
        ]
    );
    // Without Nodes or ServiceCIDRs, the configured service CIDR alone.
    let empty = index(&[]);
    assert_eq!(
        compile_node(&empty.read(), &deny(), "n1").capture,
        ["10.96.0.0/12"]
    );
}
