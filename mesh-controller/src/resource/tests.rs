use super::*;

const STREAM: &str = r#"
# a comment-only document is skipped
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels:
    mesh.io/enrolled: "true"
---
apiVersion: v1
kind: Pod
metadata:
  name: web-0
  labels: {app: web}
spec:
  serviceAccountName: web
  nodeName: node-a
  containers: [{name: web, image: web}]
status:
  podIP: 10.0.0.5
---
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: web-to-api, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules: [{kind: TCPRoute, name: api-port}]
  sources: [{kind: ServiceAccount, name: web}]
---
---
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
"#;

#[test]
fn parses_a_stream_and_numbers_documents() {
    let out = parse_yaml_stream(STREAM);
    assert_eq!(out.len(), 4, "{out:?}");
    let keys: Vec<String> = out[..3]
        .iter()
        .map(|r| r.as_ref().expect("valid resource").key().to_string())
        .collect();
    assert_eq!(
        keys,
        [
            "Namespace shop",
            "Pod default/web-0",
            "TrafficTarget shop/web-to-api"
        ]
    );
    // The namespace defaults to `default` and is written into the object.
    let Ok(Resource::Pod(pod)) = &out[1] else {
        panic!("expected a pod: {:?}", out[1]);
    };
    assert_eq!(pod.metadata.namespace.as_deref(), Some("default"));
    let err = out[3].as_ref().expect_err("ConfigMap is not read");
    assert_eq!(err.kind(), "unknown_kind");
    assert_eq!(
        err.document(),
        Some(5),
        "a comment before the first --- is no document"
    );
    assert!(
        err.to_string()
            .starts_with(r#"document 5: unknown kind "ConfigMap""#),
        "{err}"
    );
    assert_eq!(err.key(), None);
}

#[test]
fn invalid_yaml_names_the_document_and_ends_the_stream() {
    let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
    let out = parse_yaml_stream(text);
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(out[0].is_ok());
    let err = out[1].as_ref().expect_err("bad YAML");
    assert_eq!(err.kind(), "yaml");
    assert_eq!(err.document(), Some(2));
    assert!(
        err.to_string().starts_with("document 2: invalid YAML: "),
        "{err}"
    );
}

/// Found by the resource_yaml fuzz target: deeply nested flow collections made libyaml's
/// reading time grow with the square of the depth (16,000 brackets, 16 KB: about a minute
/// in a debug build). They are refused before the parser sees them, and the documents
/// before them still count.
#[test]
fn deeply_nested_flow_collections_are_refused_quickly() {
    let text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: deep}}\nspec: {}\n",
        "[".repeat(16_000)
    );
    let started = std::time::Instant::now();
    let out = parse_yaml_stream(&text);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(
        matches!(&out[0], Ok(Resource::Namespace(_))),
        "{:?}",
        out[0]
    );
    let err = out[1].as_ref().expect_err("too deep");
    assert_eq!(err.document(), Some(2));
    assert!(err.to_string().contains("nested more than 512"), "{err}");

    // Nesting a real document could have is still read.
    let shallow = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop}}\nx: {}{}\n",
        "[".repeat(100),
        "]".repeat(100)
    );
    let out = parse_yaml_stream(&shallow);
    assert!(matches!(&out[..], [Ok(Resource::Namespace(_))]), "{out:?}");
}

#[test]
fn smi_errors_keep_the_key_and_the_field_path() {
    let text = r#"
apiVersion: access.smi-spec.io/v1alpha3
kind: TrafficTarget
metadata: {name: t, namespace: shop}
spec:
  destination: {kind: ServiceAccount, name: api}
  rules: [{kind: TCPRoute, name: a}, {kind: Foo, name: b}]
  sources: [{kind: ServiceAccount, name: web}]
"#;
    let out = parse_yaml_stream(text);
    let err = out[0].as_ref().expect_err("unknown rule kind");
    assert_eq!(err.kind(), "smi");
    assert_eq!(
        err.key(),
        Some(&ResourceKey::new(Kind::TrafficTarget, "shop", "t"))
    );
    assert_eq!(
        err.to_string(),
        r#"document 1: TrafficTarget shop/t: spec.rules[1].kind: "Foo" is not HTTPRouteGroup, TCPRoute or UDPRoute"#
    );
}

#[test]
fn type_meta_errors() {
    let cases = [
        (serde_json::json!("text"), "not_an_object"),
        (serde_json::json!({"kind": "Pod"}), "type_meta"),
        (serde_json::json!({"apiVersion": "v1"}), "type_meta"),
        (
            serde_json::json!({"apiVersion": "apps/v1", "kind": "Pod", "metadata": {"name": "p"}}),
            "api_version",
        ),
        (
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {}}),
            "missing_name",
        ),
        (
            serde_json::json!({"apiVersion": "v1", "kind": "Pod"}),
            "missing_name",
        ),
        (
            serde_json::json!({"apiVersion": "split.smi-spec.io/v1alpha1", "kind": "TrafficSplit", "metadata": {"name": "s"}}),
            "api_version",
        ),
        (
            serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"v": 1}}}),
            "invalid",
        ),
    ];
    for (value, kind) in cases {
        let err = parse(value.clone()).expect_err("refused");
        assert_eq!(err.kind(), kind, "{value}: {err}");
    }
    let err = parse(
        serde_json::json!({"apiVersion": "apps/v1", "kind": "Pod", "metadata": {"name": "p"}}),
    )
    .expect_err("wrong group");
    assert_eq!(
        err.to_string(),
        r#"Pod: apiVersion "apps/v1" is not supported; expected v1"#
    );
    let err = parse(serde_json::json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"v": 1}}}))
        .expect_err("bad label");
    assert!(
        err.to_string()
            .starts_with("Pod default/p: invalid type: integer `1`"),
        "{err}"
    );
}

#[test]
fn every_kind_parses_and_keys() {
    let docs = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints: [{addresses: [10.0.0.5], conditions: {ready: true}}]
ports: [{name: http, port: 8080}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: routes, namespace: shop}
spec:
  matches: [{name: all, pathRegex: ".*"}]
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: TCPRoute
metadata: {name: port, namespace: shop}
spec: {matches: {ports: [8080]}}
---
apiVersion: split.smi-spec.io/v1alpha2
kind: TrafficSplit
metadata: {name: canary, namespace: shop}
spec:
  service: web
  backends: [{service: web-v1, weight: 1}]
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: listed}
"#;
    let kinds: Vec<Kind> = parse_yaml_stream(docs)
        .into_iter()
        .map(|r| r.expect("valid").kind())
        .collect();
    assert_eq!(
        kinds,
        [
            Kind::ServiceAccount,
            Kind::Service,
            Kind::EndpointSlice,
            Kind::HttpRouteGroup,
            Kind::TcpRoute,
            Kind::TrafficSplit,
            Kind::Namespace,
        ]
    );
    for kind in Kind::ALL {
        assert_eq!(Kind::from_kind(kind.as_str()), Some(kind));
    }
    let key = ResourceKey::new(Kind::HttpRouteGroup, "shop", "routes");
    assert_eq!(
        serde_json::to_value(&key).expect("serialize")["kind"],
        "HTTPRouteGroup"
    );
}
