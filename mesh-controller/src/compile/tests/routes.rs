//! Gateway API routes: YAML in, snapshot routes out, and what a bad route does (nothing to
//! the rest).

use std::net::SocketAddrV4;
use std::time::Duration;

use mesh_core::resolve::{FastPicker, Resolver, Target};
use mesh_core::route::{PathMatch, RouteKind};

use super::*;
use crate::resource::parse;

const GAMMA: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-canary, namespace: shop}
spec:
  parentRefs:
  - {group: "", kind: Service, name: api, port: 80}
  rules:
  - matches:
    - headers: [{name: x-canary, value: "true"}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-routed, value: canary}]}
    backendRefs: [{name: web, port: 80}]
    timeouts: {request: 250ms}
  - backendRefs: [{name: api}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: api-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - matches: [{method: {service: demo.Echo, method: Say}}]
    backendRefs: [{name: api}]
"#;

fn route_doc(name: &str, parent: &str, backend: &str) -> String {
    format!(
        "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, {parent}}}]\n  rules:\n  - backendRefs: [{{{backend}}}]\n"
    )
}

#[test]
fn gateway_routes_compile_into_every_node_s_snapshot() {
    let shared = index(&[&cluster(), GAMMA]);
    let ix = shared.read();
    assert_eq!(ix.rejections(), []);
    let n1 = compile_node(&ix, &deny(), "n1");
    let n2 = compile_node(&ix, &deny(), "n2");
    assert_eq!(n1.http_routes, n2.http_routes);

    let http = &n1.http_routes[&nn("shop", "api-canary")];
    assert_eq!(http.kind, RouteKind::Http);
    assert_eq!(http.parents[0].service, nn("shop", "api"));
    assert_eq!(http.parents[0].port, Some(80));
    assert_eq!(http.rules.len(), 2);
    assert_eq!(http.rules[0].timeout, Some(Duration::from_millis(250)));
    let grpc = &n1.grpc_routes[&nn("shop", "api-canary")];
    assert_eq!(grpc.kind, RouteKind::Grpc);
    assert_eq!(
        grpc.rules[0].matches[0].path,
        Some(PathMatch::Exact("/demo.Echo/Say".into()))
    );

    // What the agent does with them: the canary header goes to web, the rest stays on api.
    let resolver = Resolver::new(&n1);
    let route = |headers: &[(&str, &str)]| {
        let request = Request {
            method: "GET",
            path: "/items",
            headers: &headers,
        };
        let dst: SocketAddrV4 = "10.96.0.2:80".parse().expect("address");
        resolver
            .route_request(
                &id("shop", "web"),
                dst,
                &request,
                &mut FastPicker::with_seed(3),
            )
            .expect("the request routes")
    };
    let canary = route(&[("x-canary", "true")]);
    assert!(matches!(
        canary.resolution.target,
        Target::Mesh { backend: Some(ref b), .. } if *b == nn("shop", "web")
    ));
    assert_eq!(canary.route.as_deref(), Some("HTTPRoute shop/api-canary#0"));
    assert_eq!(
        canary.request_headers.set,
        [("x-routed".to_string(), "canary".to_string())]
    );
    let rest = route(&[]);
    assert_eq!(rest.route.as_deref(), Some("HTTPRoute shop/api-canary#1"));
    assert!(matches!(
        rest.resolution.target,
        Target::Mesh { backend: Some(ref b), .. } if *b == nn("shop", "api")
    ));
}

#[test]
fn a_route_with_missing_references_is_rejected_and_the_others_still_route() {
    let docs = [
        cluster(),
        route_doc("good", "name: api", "name: web, port: 80"),
        route_doc("no-parent", "name: nope", "name: web"),
        route_doc("no-parent-port", "name: api, port: 81", "name: web"),
        route_doc("no-backend", "name: web", "name: gone"),
        route_doc("no-backend-port", "name: web", "name: api, port: 8080"),
        route_doc(
            "later",
            "name: db",
            "name: canary-db, weight: 0}, {name: db",
        ),
    ];
    let shared = index(&docs.iter().map(String::as_str).collect::<Vec<_>>());
    let ix = shared.read();
    let rejections: Vec<_> = ix
        .rejections()
        .into_iter()
        .map(|r| (r.key.expect("keyed").to_string(), r.reason))
        .collect();
    let expected = [
        (
            "HTTPRoute shop/no-backend",
            "spec.rules[0].backendRefs[0]: Service shop/gone does not exist",
        ),
        (
            "HTTPRoute shop/no-backend-port",
            "spec.rules[0].backendRefs[0].port: Service shop/api has no port 8080",
        ),
        (
            "HTTPRoute shop/no-parent",
            "spec.parentRefs: Service shop/nope does not exist",
        ),
        (
            "HTTPRoute shop/no-parent-port",
            "spec.parentRefs: Service shop/api has no port 81",
        ),
    ];
    assert_eq!(
        rejections,
        expected.map(|(k, r)| (k.to_string(), r.to_string()))
    );
    let n1 = compile_node(&ix, &deny(), "n1");
    let names: Vec<_> = n1.http_routes.keys().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["good", "later"]);
    // A weight-0 backend that does not exist yet (a canary about to be deployed) is left out.
    assert_eq!(
        n1.http_routes[&nn("shop", "later")].rules[0].backends.len(),
        1
    );
}

#[test]
fn an_invalid_route_document_is_refused_naming_the_resource_and_field() {
    let yaml = GAMMA.replace(
        "    - type: RequestHeaderModifier\n      requestHeaderModifier: {set: [{name: x-routed, value: canary}]}",
        "    - type: URLRewrite\n      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /}}",
    );
    let results = parse_yaml_stream(&yaml);
    let err = results[0].as_ref().expect_err("the HTTPRoute is refused");
    assert_eq!(err.kind(), "gateway");
    assert_eq!(
        err.key(),
        Some(&ResourceKey::new(Kind::HttpRoute, "shop", "api-canary"))
    );
    assert_eq!(
        err.to_string(),
        "document 1: HTTPRoute shop/api-canary: spec.rules[0].filters[0].type: \"URLRewrite\" is \
         not RequestHeaderModifier (the only filter the mesh applies)"
    );
    assert!(results[1].is_ok(), "the GRPCRoute beside it is read");

    let v1beta1 = serde_json::json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1",
        "kind": "HTTPRoute",
        "metadata": {"name": "old"},
        "spec": {},
    });
    assert_eq!(
        parse(v1beta1).expect_err("old version").to_string(),
        "HTTPRoute: apiVersion \"gateway.networking.k8s.io/v1beta1\" is not supported; expected \
         gateway.networking.k8s.io/v1"
    );
}

#[test]
fn the_deploy_example_is_a_valid_route() {
    let example = include_str!("../../../../deploy/examples/gamma-httproute.yaml");
    let results = parse_yaml_stream(example);
    let [Ok(crate::resource::Resource::HttpRoute(route))] = results.as_slice() else {
        panic!("one valid HTTPRoute: {results:?}");
    };
    assert_eq!(route.route.rules[1].backends.len(), 2);
    assert_eq!(route.route.rules[1].timeout, Some(Duration::from_secs(2)));
}
