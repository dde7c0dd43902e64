//! What the tests against the Kubernetes API mock (`tower_test`) share.

use http::Response;
use kube::client::Body;
use serde_json::Value;

/// An API server's JSON answer.
pub fn json_response(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(body).expect("JSON")))
        .expect("a response")
}

/// The API server's `Status` answer for a failure.
pub fn status(code: u16, reason: &str) -> Value {
    serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
        "reason": reason, "code": code, "message": reason})
}
