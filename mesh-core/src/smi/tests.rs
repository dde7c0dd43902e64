use super::*;
use crate::policy::AnchoredRegex;

fn doc(yaml: &str) -> Value {
    serde_yaml_ng::from_str(yaml).expect("test YAML parses")
}

fn tt_err(yaml: &str) -> SmiError {
    TrafficTarget::from_value(&doc(yaml)).expect_err("TrafficTarget is refused")
}

const TT_V1ALPHA3: &str = r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata:
  name: api-service-metrics
  namespace: default
spec:
  destination:
    kind: ServiceAccount
    name: api-service
    namespace: default
  rules:
  - kind: TCPRoute
    name: api-service-port
  - kind: HTTPRouteGroup
    name: api-service-routes
    matches:
    - metrics
  sources:
  - kind: ServiceAccount
    name: prometheus
    namespace: monitoring
  - kind: ServiceAccount
    name: website-service
"#;

#[test]
fn traffic_target_v1alpha3() {
    let tt = TrafficTarget::from_value(&doc(TT_V1ALPHA3)).expect("valid TrafficTarget");
    assert_eq!(tt.api_version, AccessVersion::V1alpha3);
    assert_eq!(
        tt.metadata.namespaced_name(),
        NamespacedName::new("default", "api-service-metrics")
    );
    assert_eq!(tt.destination(), ("default", "api-service"));
    assert_eq!(tt.spec.destination.port, None);
    assert_eq!(tt.spec.rules.len(), 2);
    assert_eq!(tt.spec.rules[0].kind, RuleKind::TcpRoute);
    assert_eq!(tt.spec.rules[0].matches, None);
    assert_eq!(tt.spec.rules[1].kind, RuleKind::HttpRouteGroup);
    assert_eq!(tt.spec.rules[1].matches, Some(vec!["metrics".to_string()]));
    let sources: Vec<_> = tt
        .spec
        .sources
        .iter()
        .map(|s| tt.subject_parts(s))
        .collect();
    // A source without a namespace is in the TrafficTarget's namespace.
    assert_eq!(
        sources,
        [("monitoring", "prometheus"), ("default", "website-service")]
    );
}

#[test]
fn a_traffic_target_cannot_name_a_destination_in_another_namespace() {
    // An `evil` tenant's TrafficTarget naming `demo`'s service account is refused whole.
    let evil = TT_V1ALPHA3.replace("  namespace: default\nspec:", "  namespace: evil\nspec:");
    let e = tt_err(&evil);
    assert_eq!(e.kind(), "invalid");
    assert_eq!(
        e.to_string(),
        r#"spec.destination.namespace: "default" is not the TrafficTarget's own namespace "evil" (a TrafficTarget grants access to destinations in its namespace only)"#
    );
    // The same without `metadata.namespace`: the TrafficTarget is in `default`.
    let unnamed = TT_V1ALPHA3.replace("  namespace: default\nspec:", "spec:");
    let tt = TrafficTarget::from_value(&doc(&unnamed)).expect("same namespace");
    assert_eq!(tt.destination(), ("default", "api-service"));
    let e = tt_err(&unnamed.replace(
        "    name: api-service\n    namespace: default\n",
        "    name: api-service\n    namespace: demo\n",
    ));
    assert!(
        e.to_string()
            .starts_with("spec.destination.namespace: \"demo\""),
        "{e}"
    );
    // Without a destination namespace the TrafficTarget's own applies; sources may still
    // name other namespaces (`monitoring/prometheus`).
    let implicit = evil.replace(
        "    name: api-service\n    namespace: default\n",
        "    name: api-service\n",
    );
    let tt = TrafficTarget::from_value(&doc(&implicit)).expect("valid in evil");
    assert_eq!(tt.destination(), ("evil", "api-service"));
    assert_eq!(
        tt.subject_parts(&tt.spec.sources[0]),
        ("monitoring", "prometheus")
    );
}

#[test]
fn traffic_target_v1alpha2_has_a_destination_port() {
    let tt = TrafficTarget::from_value(&doc(r#"
apiVersion: access.smi-spec.io/v1alpha2
kind: TrafficTarget
metadata:
  name: path-specific
spec:
  destination:
    kind: ServiceAccount
    name: service-a
    port: 8080
  rules:
  - kind: HTTPRouteGroup
    name: the-routes
  sources:
  - kind: ServiceAccount
    name: prometheus
"#))
    .expect("valid v1alpha2 TrafficTarget");
    assert_eq!(tt.api_version, AccessVersion::V1alpha2);
    assert_eq!(tt.namespace(), "default");
    assert_eq!(tt.metadata.namespace, None);
    assert_eq!(tt.spec.destination.port, Some(8080));
    assert_eq!(tt.destination(), ("default", "service-a"));
}

#[test]
fn fields_of_another_version_are_refused() {
    let err = tt_err(&TT_V1ALPHA3.replace(
        "    namespace: default\n  rules:",
        "    namespace: default\n    port: 8080\n  rules:",
    ));
    assert_eq!(err.kind(), "not_in_version");
    assert!(
        err.to_string()
            .starts_with("spec.destination.port: not part of access.smi-spec.io/v1alpha3"),
        "{err}"
    );

    // UDPRoute is a v1alpha3 rule kind only.
    let v2 = TT_V1ALPHA3
        .replace("v1alpha3", "v1alpha2")
        .replace("kind: TCPRoute", "kind: UDPRoute");
    assert_eq!(
        tt_err(&v2).to_string(),
        r#"spec.rules[0].kind: "UDPRoute" is not HTTPRouteGroup or TCPRoute"#
    );
    let tt = TrafficTarget::from_value(&doc(
        &TT_V1ALPHA3.replace("kind: TCPRoute", "kind: UDPRoute")
    ))
    .expect("UDPRoute is a v1alpha3 kind");
    assert_eq!(tt.spec.rules[0].kind, RuleKind::UdpRoute);
}

#[test]
fn traffic_target_errors_name_the_field() {
    let cases: &[(String, &str, &str)] = &[
        (
            TT_V1ALPHA3.replace("kind: HTTPRouteGroup", "kind: Foo"),
            "invalid",
            r#"spec.rules[1].kind: "Foo" is not HTTPRouteGroup, TCPRoute or UDPRoute"#,
        ),
        (
            TT_V1ALPHA3.replace("  sources:\n  - kind: ServiceAccount\n    name: prometheus\n    namespace: monitoring\n  - kind: ServiceAccount\n    name: website-service\n", "  sources: []\n"),
            "empty",
            "spec.sources: must not be empty",
        ),
        (
            TT_V1ALPHA3.replace("  sources:\n  - kind: ServiceAccount\n    name: prometheus\n    namespace: monitoring\n  - kind: ServiceAccount\n    name: website-service\n", ""),
            "missing",
            "spec.sources: required field is missing",
        ),
        (
            TT_V1ALPHA3.replace("  - kind: ServiceAccount\n    name: prometheus\n", "  - kind: Group\n    name: prometheus\n"),
            "invalid",
            r#"spec.sources[0].kind: "Group" is not ServiceAccount"#,
        ),
        (
            TT_V1ALPHA3.replace("    name: website-service\n", "    namespace: x\n"),
            "missing",
            "spec.sources[1].name: required field is missing",
        ),
        (
            TT_V1ALPHA3.replace("    name: prometheus\n", "    name: Prometheus\n"),
            "name",
            r#"spec.sources[0].name: "Prometheus" is not a valid name: only lowercase letters, digits, '-' and '.' are allowed"#,
        ),
        (
            TT_V1ALPHA3.replace("  rules:\n  - kind: TCPRoute\n    name: api-service-port\n  - kind: HTTPRouteGroup\n    name: api-service-routes\n    matches:\n    - metrics\n", "  rules: []\n"),
            "empty",
            "spec.rules: must not be empty",
        ),
        (
            TT_V1ALPHA3.replace("    matches:\n    - metrics\n", "    matches: metrics\n"),
            "type",
            "spec.rules[1].matches: expected a list, found a string",
        ),
        (
            TT_V1ALPHA3.replace("  - kind: TCPRoute\n    name: api-service-port\n", "  - kind: TCPRoute\n    name: api-service-port\n    matches: [x]\n"),
            "constraint",
            "spec.rules[0].matches: match names apply to HTTPRouteGroup rules only",
        ),
        (
            TT_V1ALPHA3.replace("v1alpha3", "v1alpha1"),
            "api_version",
            r#"apiVersion "access.smi-spec.io/v1alpha1" is not supported for TrafficTarget; expected access.smi-spec.io/v1alpha3 or access.smi-spec.io/v1alpha2"#,
        ),
        (
            TT_V1ALPHA3.replace("  name: api-service-metrics\n", ""),
            "missing",
            "metadata.name: required field is missing",
        ),
        (
            TT_V1ALPHA3.replace("kind: TrafficTarget", "kind: TrafficSplit"),
            "kind",
            r#"kind: "TrafficSplit" is not TrafficTarget"#,
        ),
    ];
    for (yaml, kind, message) in cases {
        let err = tt_err(yaml);
        assert_eq!(err.to_string(), *message);
        assert_eq!(err.kind(), *kind, "{err}");
    }
    assert_eq!(
        TrafficTarget::from_value(&Value::String("x".into()))
            .expect_err("not a map")
            .to_string(),
        "(document): expected a map, found a string"
    );
}

#[test]
fn deserialize_and_serialize_round_trip() {
    let tt: TrafficTarget = serde_yaml_ng::from_str(TT_V1ALPHA3).expect("Deserialize validates");
    let json = serde_json::to_value(&tt).expect("serialize");
    assert_eq!(json["kind"], "TrafficTarget");
    assert_eq!(json["apiVersion"], "access.smi-spec.io/v1alpha3");
    assert_eq!(json["spec"]["rules"][1]["kind"], "HTTPRouteGroup");
    assert_eq!(TrafficTarget::from_value(&json).expect("round trip"), tt);

    let bad = serde_yaml_ng::from_str::<TrafficTarget>(
        &TT_V1ALPHA3.replace("kind: HTTPRouteGroup", "kind: Foo"),
    );
    assert!(
        bad.expect_err("refused")
            .to_string()
            .contains("spec.rules[1].kind")
    );
}

const ROUTES: &str = r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata:
  name: the-routes
  namespace: shop
spec:
  matches:
  - name: metrics
    pathRegex: "/metrics"
    methods:
    - GET
  - name: everything
    pathRegex: ".*"
    methods: ["*"]
  - name: iphone-users
    pathRegex: "/api/.*"
    methods: [GET, HEAD]
    headers:
      User-Agent: ".*iPhone.*"
"#;

#[test]
fn http_route_group_v1alpha4() {
    let g = HttpRouteGroup::from_value(&doc(ROUTES)).expect("valid HTTPRouteGroup");
    assert_eq!(g.api_version, SpecsVersion::V1alpha4);
    assert_eq!(g.spec.matches.len(), 3);
    let metrics = g.find("metrics").expect("metrics match").to_http_match();
    assert_eq!(metrics.methods, ["GET"]);
    assert_eq!(
        metrics.path.as_ref().map(AnchoredRegex::as_str),
        Some("/metrics")
    );
    let everything = g.find("everything").expect("everything").to_http_match();
    assert!(everything.methods.is_empty(), "* is any method");
    let iphone = g.find("iphone-users").expect("iphone").to_http_match();
    assert_eq!(iphone.headers.len(), 1);
    assert_eq!(
        iphone.headers[0].name, "user-agent",
        "header names are lower-cased"
    );
    assert!(iphone.headers[0].value.is_match("Mozilla (iPhone)"));
    assert!(g.find("nope").is_none());

    let json = serde_json::to_value(&g).expect("serialize");
    assert_eq!(json["spec"]["matches"][0]["pathRegex"], "/metrics");
    assert_eq!(HttpRouteGroup::from_value(&json).expect("round trip"), g);
}

#[test]
fn http_route_group_headers_as_a_list_of_maps() {
    let g = HttpRouteGroup::from_value(&doc(r#"
apiVersion: specs.smi-spec.io/v1alpha3
kind: HTTPRouteGroup
metadata:
  name: ab-test
spec:
  matches:
  - name: firefox-users
    headers:
    - user-agent: ".*Firefox.*"
    - cookie: "^(.*?;)?(type=insider)(;.*)?$"
"#))
    .expect("valid list-of-maps headers");
    let m = g.spec.matches[0].to_http_match();
    assert_eq!(m.path, None);
    let names: Vec<_> = m.headers.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["cookie", "user-agent"]);
}

#[test]
fn http_route_group_errors() {
    let cases: &[(String, &str, &str)] = &[
        (
            ROUTES.replace(r#"pathRegex: "/metrics""#, r#"pathRegex: "/metrics(""#),
            "regex",
            "spec.matches[0].pathRegex: invalid regular expression \"/metrics(\"",
        ),
        (
            ROUTES.replace(r#"User-Agent: ".*iPhone.*""#, r#"User-Agent: "[iPhone""#),
            "regex",
            "spec.matches[2].headers.User-Agent: invalid regular expression",
        ),
        (
            ROUTES.replace("    - GET\n", "    - FETCH\n"),
            "invalid",
            r#"spec.matches[0].methods[0]: "FETCH" is not * or an RFC 7231 method in upper case"#,
        ),
        (
            ROUTES.replace("name: everything", "name: metrics"),
            "duplicate",
            r#"spec.matches[1].name: "metrics" appears more than once"#,
        ),
        (
            ROUTES.replace("  - name: everything\n", "  - pathRegex: x\n"),
            "missing",
            "spec.matches[1].name: required field is missing",
        ),
        (
            ROUTES.replace("User-Agent:", "\"User Agent\":"),
            "invalid",
            r#"spec.matches[2].headers.User Agent: "User Agent" is not an HTTP header name"#,
        ),
        (
            ROUTES.replace("v1alpha4", "v1alpha1"),
            "api_version",
            "apiVersion \"specs.smi-spec.io/v1alpha1\" is not supported for HTTPRouteGroup",
        ),
        (
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: x}\nspec: {}\n".to_string(),
            "missing",
            "spec.matches: required field is missing",
        ),
    ];
    for (yaml, kind, message) in cases {
        let err = HttpRouteGroup::from_value(&doc(yaml)).expect_err(message);
        assert!(
            err.to_string().starts_with(message),
            "{err} (wanted {message})"
        );
        assert_eq!(err.kind(), *kind, "{err}");
    }
}

#[test]
fn tcp_route_ports() {
    let r = TcpRoute::from_value(&doc(r#"
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata:
  name: db
  namespace: shop
spec:
  matches:
    ports:
    - 3306
    - 6446
    - 3306
"#))
    .expect("valid TCPRoute");
    assert_eq!(r.spec.matches.ports, [3306, 6446], "duplicates dropped");

    let all = TcpRoute::from_value(&doc(
        "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: all}\nspec:\n  matches:\n    ports: []\n",
    ))
    .expect("empty ports");
    assert!(all.spec.matches.ports.is_empty());
    let v3 = TcpRoute::from_value(&doc(
        "apiVersion: specs.smi-spec.io/v1alpha3\nkind: TCPRoute\nmetadata: {name: all}\n",
    ))
    .expect("v1alpha3 TCPRoute without spec");
    assert!(v3.spec.matches.ports.is_empty());

    for (yaml, message) in [
        (
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: x}\nspec: {matches: {}}\n",
            "spec.matches.ports: required field is missing",
        ),
        (
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: x}\nspec: {}\n",
            "spec.matches: required field is missing",
        ),
        (
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: x}\nspec: {matches: {ports: [80, 70000]}}\n",
            "spec.matches.ports[1]: 70000 is not a port number from 1 to 65535",
        ),
        (
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: TCPRoute\nmetadata: {name: x}\nspec: {matches: {ports: [\"80\"]}}\n",
            "spec.matches.ports[0]: \"80\" is not a port number from 1 to 65535",
        ),
    ] {
        let err = TcpRoute::from_value(&doc(yaml)).expect_err(message);
        assert_eq!(err.to_string(), message);
    }
}

const SPLIT: &str = r#"
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata:
  name: canary
  namespace: shop
spec:
  service: website
  backends:
  - service: website-v1
    weight: 90
  - service: website-v2
    weight: 10
"#;

#[test]
fn traffic_split_v1alpha2() {
    let s = TrafficSplit::from_value(&doc(SPLIT)).expect("valid TrafficSplit");
    assert_eq!(s.api_version, SplitVersion::V1alpha2);
    assert_eq!(s.root(), NamespacedName::new("shop", "website"));
    let backends: Vec<_> = s
        .spec
        .backends
        .iter()
        .map(|b| (b.service.as_str(), b.weight))
        .collect();
    assert_eq!(backends, [("website-v1", 90), ("website-v2", 10)]);
    assert!(s.spec.matches.is_empty());

    // The FQDN form of a service in the split's namespace is reduced to its name; whole
    // floats are whole numbers.
    let fqdn = SPLIT
        .replace(
            "service: website\n",
            "service: website.shop.svc.cluster.local\n",
        )
        .replace("weight: 90", "weight: 90.0");
    let s = TrafficSplit::from_value(&doc(&fqdn)).expect("FQDN root");
    assert_eq!(s.spec.service, "website");
    assert_eq!(s.spec.backends[0].weight, 90);
}

#[test]
fn traffic_split_v1alpha4_matches() {
    let s = TrafficSplit::from_value(&doc(r#"
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata:
  name: ab-test
spec:
  service: website
  matches:
  - kind: HTTPRouteGroup
    name: ab-test
  backends:
  - service: website-v1
    weight: 0
  - service: website-v2
    weight: 100
"#))
    .expect("valid v1alpha4 TrafficSplit");
    assert_eq!(s.spec.matches.len(), 1);
    assert_eq!(s.spec.matches[0].name, "ab-test");
    assert_eq!(s.root(), NamespacedName::new("default", "website"));
}

#[test]
fn traffic_split_errors() {
    let cases: &[(String, &str, &str)] = &[
        (SPLIT.replace("weight: 10", "weight: -10"), "negative_weight", "spec.backends[1].weight: weight -10 is negative"),
        (SPLIT.replace("weight: 10", "weight: 1.5"), "weight", "spec.backends[1].weight: weight 1.5 is not a whole number"),
        (SPLIT.replace("weight: 10", "weight: \"10%\""), "weight", "spec.backends[1].weight: weight \"10%\" is not a whole number"),
        (SPLIT.replace("weight: 10", "weight: 5000000000"), "weight", "spec.backends[1].weight: weight 5000000000 is not a whole number"),
        (SPLIT.replace("    weight: 10\n", ""), "missing", "spec.backends[1].weight: required field is missing"),
        (SPLIT.replace("  service: website\n", ""), "missing", "spec.service: required field is missing"),
        (
            SPLIT.replace("  backends:\n  - service: website-v1\n    weight: 90\n  - service: website-v2\n    weight: 10\n", "  backends: []\n"),
            "empty",
            "spec.backends: must not be empty",
        ),
        (SPLIT.replace("website-v2", "website-v1"), "duplicate", r#"spec.backends[1].service: "website-v1" appears more than once"#),
        (
            SPLIT.replace("weight: 90", "weight: 0").replace("weight: 10", "weight: 0"),
            "constraint",
            "spec.backends: every weight is 0, so no backend would receive traffic",
        ),
        (
            SPLIT.replace("  backends:", "  matches:\n  - kind: HTTPRouteGroup\n    name: x\n  backends:"),
            "not_in_version",
            "spec.matches: not part of split.smi-spec.io/v1alpha2; use split.smi-spec.io/v1alpha4 to match HTTPRouteGroups",
        ),
        (
            SPLIT.replace("v1alpha2", "v1alpha4").replace("  backends:", "  matches:\n  - kind: TCPRoute\n    name: x\n  backends:"),
            "invalid",
            r#"spec.matches[0].kind: "TCPRoute" is not HTTPRouteGroup"#,
        ),
        (
            SPLIT.replace("service: website-v1", "service: website-v1.prod"),
            "invalid",
            r#"spec.backends[0].service: "website-v1.prod" is not a service in the TrafficSplit's namespace"#,
        ),
    ];
    for (yaml, kind, message) in cases {
        let err = TrafficSplit::from_value(&doc(yaml)).expect_err(message);
        assert_eq!(err.to_string(), *message);
        assert_eq!(err.kind(), *kind, "{err}");
    }
}
