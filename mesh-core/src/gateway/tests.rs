use super::*;
use crate::policy::Request;

fn doc(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).expect("test YAML parses")
}

fn http(yaml: &str) -> Result<GatewayRoute, SmiError> {
    GatewayRoute::from_value(&doc(yaml), RouteKind::Http)
}

fn refused(yaml: &str) -> String {
    http(yaml).expect_err("HTTPRoute is refused").to_string()
}

const HTTP_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: web
  namespace: demo
spec:
  parentRefs:
  - group: ""
    kind: Service
    name: web
    port: 80
  - name: ingress
  hostnames: [web.demo.svc.cluster.local]
  rules:
  - matches:
    - path:
        type: Exact
        value: /health
      method: GET
      headers:
      - name: X-Canary
        value: "true"
      - name: x-user
        type: RegularExpression
        value: "beta-.*"
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: X-Env, value: canary}]
        add: [{name: x-via, value: mesh}]
        remove: [X-Debug]
    backendRefs:
    - name: web-v2
      port: 8080
      weight: 90
    - name: web
      weight: 10
    timeouts:
      request: 1m30s
  - backendRefs:
    - name: web
"#;

#[test]
fn an_http_route_compiles_into_the_route_model() {
    let r = http(HTTP_ROUTE).expect("valid HTTPRoute").route;
    assert_eq!(r.name, NamespacedName::new("demo", "web"));
    assert_eq!(r.kind, RouteKind::Http);
    // The Gateway parent is not the mesh's.
    assert_eq!(
        r.parents,
        [ParentRef {
            service: NamespacedName::new("demo", "web"),
            port: Some(80),
        }]
    );
    let rule = &r.rules[0];
    assert_eq!(rule.matches.len(), 1);
    let m = &rule.matches[0];
    assert_eq!(m.path, Some(PathMatch::Exact("/health".into())));
    assert_eq!(m.method.as_deref(), Some("GET"));
    assert_eq!(m.headers[0].name, "x-canary");
    assert_eq!(m.headers[0].value, ValueMatch::Exact("true".into()));
    let headers = [("x-canary", "true"), ("x-user", "beta-7")];
    let request = |method, path| Request {
        method,
        path,
        headers: &headers,
    };
    assert!(m.matches(&request("GET", "/health")));
    assert!(!m.matches(&request("GET", "/health/x")));
    assert_eq!(
        rule.request_headers,
        HeaderModifier {
            set: vec![("x-env".into(), "canary".into())],
            add: vec![("x-via".into(), "mesh".into())],
            remove: vec!["x-debug".into()],
        }
    );
    assert_eq!(rule.timeout, Some(Duration::from_secs(90)));
    assert_eq!(
        rule.backends,
        [
            RouteBackend {
                service: NamespacedName::new("demo", "web-v2"),
                port: Some(8080),
                weight: 90,
            },
            RouteBackend {
                service: NamespacedName::new("demo", "web"),
                port: None,
                weight: 10,
            },
        ]
    );
    // No matches: `PathPrefix /`, every request; weight 1 by default.
    let all = &r.rules[1];
    assert_eq!(all.matches[0].path, Some(PathMatch::Prefix("/".into())));
    assert_eq!(all.backends[0].weight, 1);
    assert_eq!(all.timeout, None);
    assert!(all.request_headers.is_empty());
}

#[test]
fn a_grpc_route_matches_methods_as_http2_paths() {
    let g = GatewayRoute::from_value(
        &doc(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: echo
spec:
  parentRefs:
  - {kind: Service, group: "", name: echo}
  rules:
  - matches:
    - method: {service: mesh.demo.v1.Echo, method: Say}
    - method: {service: mesh.demo.v1.Admin}
    - method: {method: Count}
      headers: [{name: x-tenant, value: a}]
    - method: {type: RegularExpression, service: "mesh\\.demo\\..*", method: "S.*"}
    backendRefs: [{name: echo-v2, port: 9000}]
  - backendRefs: [{name: echo}]
"#),
        RouteKind::Grpc,
    )
    .expect("valid GRPCRoute");
    assert_eq!(g.route.name, NamespacedName::new("default", "echo"));
    let m = &g.route.rules[0].matches;
    let post = |path| Request {
        method: "POST",
        path,
        headers: &[("x-tenant", "a")],
    };
    assert_eq!(
        m[0].path,
        Some(PathMatch::Exact("/mesh.demo.v1.Echo/Say".into()))
    );
    assert!(m[1].matches(&post("/mesh.demo.v1.Admin/Drain")));
    assert!(!m[1].matches(&post("/mesh.demo.v1.Echo/Say")));
    assert!(m[2].matches(&post("/any.Service/Count")));
    assert!(!m[2].matches(&post("/any.Service/CountMore")));
    assert!(m[3].matches(&post("/mesh.demo.v1.Echo/Sum")));
    assert!(!m[3].matches(&post("/mesh.demo.v1.Echo/Chat")));
    // No matches: every request.
    assert_eq!(g.route.rules[1].matches, [RequestMatch::any()]);
}

#[test]
fn durations_follow_gep_2257() {
    let d = |s| duration(s, "t");
    assert_eq!(d("500ms"), Ok(Some(Duration::from_millis(500))));
    assert_eq!(d("10s"), Ok(Some(Duration::from_secs(10))));
    assert_eq!(d("1m"), Ok(Some(Duration::from_secs(60))));
    assert_eq!(d("1h2m3s4ms"), Ok(Some(Duration::from_millis(3_723_004))));
    assert_eq!(d("0s"), Ok(None), "0s is no timeout");
    for bad in [
        "",
        "10",
        "1.5s",
        "-1s",
        "100000s",
        "1d",
        "1s2s3s4s5s",
        "s",
        "10 s",
    ] {
        assert_eq!(
            d(bad).expect_err(bad).to_string(),
            format!("t: {bad:?} is not a Gateway API duration such as 500ms, 10s or 1m30s")
        );
    }
}

#[test]
fn what_the_mesh_cannot_apply_is_refused_with_the_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "    - type: RequestHeaderModifier\n      requestHeaderModifier:",
            "    - type: RequestRedirect\n      requestRedirect: {scheme: https}\n      x:",
            r#"spec.rules[0].filters[0].type: "RequestRedirect" is not RequestHeaderModifier (the only filter the mesh applies)"#,
        ),
        (
            "        type: RegularExpression\n        value: \"beta-.*\"",
            "        type: RegularExpression\n        value: \"beta-(\"",
            "spec.rules[0].matches[0].headers[1].value: invalid regular expression \"beta-(\"",
        ),
        (
            "    - name: web-v2\n      port: 8080",
            "    - name: web-v2\n      kind: Deployment\n      port: 8080",
            r#"spec.rules[0].backendRefs[0].kind: "Deployment" is not Service"#,
        ),
        (
            "    - name: web-v2\n      port: 8080",
            "    - name: web-v2\n      group: apps\n      kind: Service\n      port: 8080",
            r#"spec.rules[0].backendRefs[0].kind: "apps/Service" is not Service"#,
        ),
        (
            "      request: 1m30s",
            "      request: 90 seconds",
            r#"spec.rules[0].timeouts.request: "90 seconds" is not a Gateway API duration such as 500ms, 10s or 1m30s"#,
        ),
        (
            "      request: 1m30s",
            "      backendRequest: 1s",
            "spec.rules[0].timeouts.backendRequest: not supported by the mesh; use request",
        ),
        (
            "      weight: 90",
            "      weight: 0",
            "", // checked with the other weight below
        ),
        (
            "      method: GET",
            "      method: GET\n      queryParams: [{name: a, value: b}]",
            "spec.rules[0].matches[0].queryParams: query parameter matches are not supported by the mesh",
        ),
        (
            "      method: GET",
            "      method: get",
            r#"spec.rules[0].matches[0].method: "get" is not an RFC 7231 method in upper case"#,
        ),
        (
            "        type: Exact\n        value: /health",
            "        type: Glob\n        value: /health",
            r#"spec.rules[0].matches[0].path.type: "Glob" is not Exact, PathPrefix or RegularExpression"#,
        ),
        (
            "        type: Exact\n        value: /health",
            "        type: PathPrefix\n        value: health",
            r#"spec.rules[0].matches[0].path.value: "health" is not a path starting with /"#,
        ),
        (
            "    name: web\n    port: 80",
            "    name: web\n    namespace: other\n    port: 80",
            "spec.parentRefs[0].namespace: routes attached to a Service in another namespace (consumer routes) are not supported",
        ),
        (
            "  - group: \"\"\n    kind: Service",
            "  - group: \"\"\n    kind: Pod",
            r#"spec.parentRefs[0].kind: "Pod" is not a Service (group "") or a Gateway"#,
        ),
        (
            "    - name: web-v2\n      port: 8080",
            "    - name: web-v2\n      namespace: other\n      port: 8080",
            "spec.rules[0].backendRefs[0].namespace: a backend in another namespace needs a ReferenceGrant, which the mesh does not read",
        ),
        (
            "    - name: web-v2\n      port: 8080",
            "    - name: web-v2\n      filters: [{type: RequestHeaderModifier}]\n      port: 8080",
            "spec.rules[0].backendRefs[0].filters: per-backend filters are not supported by the mesh",
        ),
        (
            "      weight: 90",
            "      weight: 1000001",
            "spec.rules[0].backendRefs[0].weight: 1000001 is not a whole number from 0 to 1000000",
        ),
        (
            "  - backendRefs:\n    - name: web\n",
            "  - backendRefs: []\n",
            "spec.rules[1].backendRefs: must not be empty",
        ),
        (
            "  - backendRefs:\n    - name: web\n",
            "  - retry: {attempts: 2}\n    backendRefs:\n    - name: web\n",
            "spec.rules[1].retry: not supported by the mesh",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\n",
            "apiVersion: gateway.networking.k8s.io/v1beta1\n",
            r#"apiVersion "gateway.networking.k8s.io/v1beta1" is not supported for HTTPRoute; expected gateway.networking.k8s.io/v1"#,
        ),
    ];
    for (from, to, message) in cases {
        assert!(HTTP_ROUTE.contains(from), "fixture has {from:?}");
        let yaml = HTTP_ROUTE.replace(from, to);
        if message.is_empty() {
            http(&yaml).expect("one weight of 0 is fine");
            continue;
        }
        let err = refused(&yaml);
        assert!(err.starts_with(message), "{err}\n  expected {message}");
    }

    let all_zero = HTTP_ROUTE
        .replace("      weight: 90", "      weight: 0")
        .replace("      weight: 10", "      weight: 0");
    assert_eq!(
        refused(&all_zero),
        "spec.rules[0].backendRefs: every weight is 0, so no backend would receive traffic"
    );
    let no_rules = HTTP_ROUTE[..HTTP_ROUTE.find("  rules:").expect("rules")].to_string();
    assert_eq!(refused(&no_rules), "spec.rules: required field is missing");
}

#[test]
fn grpc_route_refusals_name_the_field() {
    let grpc = |method: &str| {
        GatewayRoute::from_value(
            &doc(&format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: echo}}\n\
                 spec:\n  rules:\n  - matches:\n    - method: {method}\n    backendRefs: [{{name: echo}}]\n"
            )),
            RouteKind::Grpc,
        )
        .expect_err("GRPCRoute is refused")
        .to_string()
    };
    assert_eq!(
        grpc("{type: Exact}"),
        "spec.rules[0].matches[0].method: at least one of service and method must be set"
    );
    assert!(
        grpc("{type: RegularExpression, method: \"(\"}")
            .starts_with("spec.rules[0].matches[0].method.method: invalid regular expression")
    );
    assert_eq!(
        grpc("{type: Prefix, service: a}"),
        r#"spec.rules[0].matches[0].method.type: "Prefix" is not Exact or RegularExpression"#
    );
}
