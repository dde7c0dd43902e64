use http::{Method, Request, StatusCode};
use mesh_core::http_path::{EscapedSlashes, PathNormalization};

use super::*;

fn parts(method: Method, uri: &str) -> http::request::Parts {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request")
        .into_parts()
        .0
}

fn normalized(method: Method, uri: &str) -> Result<String, BadPath> {
    let mut p = parts(method, uri);
    normalize_path(&mut p, &PathNormalization::default())?;
    Ok(p.uri.to_string())
}

#[test]
fn the_request_leaves_with_the_normalized_path_and_its_query_untouched() {
    assert_eq!(
        normalized(Method::GET, "/public/%2e%2e/admin/?next=/../%2e&x").expect("normal"),
        "/admin/?next=/../%2e&x"
    );
    // Absolute-form (a forward proxy's request, and how HTTP/2 requests arrive): the scheme
    // and authority stay.
    assert_eq!(
        normalized(Method::GET, "http://web.demo:80/a/./b//c").expect("normal"),
        "http://web.demo:80/a/b/c"
    );
    // gRPC's `:path` is a path like any other.
    assert_eq!(
        normalized(Method::POST, "/mesh.demo.v1.Echo/Say").expect("normal"),
        "/mesh.demo.v1.Echo/Say"
    );
}

#[test]
fn asterisk_and_authority_forms_are_taken_where_they_belong_only() {
    assert_eq!(normalized(Method::OPTIONS, "*").expect("OPTIONS *"), "*");
    let e = normalized(Method::GET, "*").expect_err("GET *");
    assert_eq!(e.kind(), "path_asterisk");
    assert!(e.to_string().contains("GET"), "{e}");
    assert_eq!(
        normalized(Method::CONNECT, "10.0.0.1:443").expect("CONNECT"),
        "10.0.0.1:443"
    );
}

#[test]
fn a_path_that_cannot_be_normalized_safely_is_refused_and_left_as_it_was() {
    let mut p = parts(Method::GET, "/public/..%2fadmin/");
    let e = normalize_path(&mut p, &PathNormalization::default()).expect_err("escaped slash");
    assert_eq!(e.kind(), "path_escaped_slash");
    assert_eq!(
        p.uri, "/public/..%2fadmin/",
        "the record shows what was sent"
    );
    // Unescaped on request, it is a separator like any other.
    let unescape = PathNormalization {
        escaped_slashes: EscapedSlashes::Unescape,
        ..PathNormalization::default()
    };
    normalize_path(&mut p, &unescape).expect("unescaped");
    assert_eq!(p.uri, "/admin/");
}

#[test]
fn refusals_are_plain_unless_the_reason_is_exposed() {
    let detail = "no HTTP match for GET /admin from spiffe://cluster.local/ns/demo/sa/client";
    let plain = refusal(false, StatusCode::FORBIDDEN, 7, detail, false);
    assert_eq!(plain.status(), StatusCode::FORBIDDEN);
    assert_eq!(plain.headers()["x-mesh-proxy"], "refused");
    let grpc = refusal(true, StatusCode::FORBIDDEN, 7, detail, false);
    assert_eq!(grpc.headers()["grpc-status"], "7");
    assert_eq!(grpc.headers()["grpc-message"], "access denied");
    let exposed = refusal(true, StatusCode::FORBIDDEN, 7, detail, true);
    assert_eq!(exposed.headers()["grpc-message"], detail);
    for (status, words) in [
        (StatusCode::NOT_FOUND, "no route"),
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
        (StatusCode::BAD_REQUEST, "bad request"),
        (StatusCode::GATEWAY_TIMEOUT, "upstream timeout"),
    ] {
        assert_eq!(plain_refusal(status), words);
    }
}
