use http::{Method, Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};

use super::*;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/mesh-system/leases/mesh-controller";

/// One scripted answer of the API server, and the request it expects.
struct Answer {
    method: Method,
    status: u16,
    body: Value,
}

fn answer(method: Method, status: u16, body: Value) -> Answer {
    Answer {
        method,
        status,
        body,
    }
}

fn lease(holder: &str, version: &str, seconds: i32) -> Value {
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "mesh-controller", "namespace": "mesh-system",
            "resourceVersion": version},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": seconds,
            "leaseTransitions": 3}})
}

use crate::testing::{json_response, status};

/// An API server that answers `script` in order and returns the bodies it was sent.
fn server(script: Vec<Answer>) -> (Api<Lease>, tokio::task::JoinHandle<Vec<Value>>) {
    let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
    let task = tokio::spawn(async move {
        let mut sent = Vec::new();
        for a in script {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.method(), a.method);
            let path = req.uri().path().to_string();
            let expected = if a.method == Method::POST {
                PATH.trim_end_matches("/mesh-controller")
            } else {
                PATH
            };
            assert_eq!(path, expected);
            let body = req.into_body().collect().await.expect("body").to_bytes();
            if !body.is_empty() {
                sent.push(serde_json::from_slice(&body).expect("JSON body"));
            }
            send.send_response(json_response(a.status, &a.body));
        }
        sent
    });
    (api, task)
}

fn election(api: Api<Lease>, duration: Duration) -> Election {
    Election::new(api, "mesh-controller", "controller-a", duration)
}

#[tokio::test]
async fn the_first_replica_creates_the_lease_and_leads() {
    let (api, server) = server(vec![
        answer(Method::GET, 404, status(404, "NotFound")),
        answer(Method::POST, 201, lease("controller-a", "1", 15)),
    ]);
    let mut e = election(api, LEASE_DURATION);
    assert!(e.step().await);
    let sent = server.await.expect("server");
    assert_eq!(sent[0]["spec"]["holderIdentity"], "controller-a");
    assert_eq!(sent[0]["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(sent[0]["spec"]["leaseTransitions"], 0);
}

#[tokio::test]
async fn a_held_lease_is_taken_only_once_it_stopped_changing_for_its_duration() {
    let (api, server) = server(vec![
        // Held by another replica: watched, not taken.
        answer(Method::GET, 200, lease("controller-b", "7", 1)),
        // Renewed by its holder meanwhile: watched anew.
        answer(Method::GET, 200, lease("controller-b", "8", 1)),
        // Unchanged for its whole duration: taken, with the version read.
        answer(Method::GET, 200, lease("controller-b", "8", 1)),
        answer(Method::PUT, 200, lease("controller-a", "9", 15)),
    ]);
    let mut e = election(api, LEASE_DURATION);
    assert!(!e.step().await);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!e.step().await, "renewed by its holder");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(e.step().await, "its holder stopped renewing it");
    let sent = server.await.expect("server");
    let taken = &sent[0];
    assert_eq!(taken["metadata"]["resourceVersion"], "8");
    assert_eq!(taken["spec"]["holderIdentity"], "controller-a");
    assert_eq!(taken["spec"]["leaseTransitions"], 4);
}

#[tokio::test]
async fn of_two_replicas_taking_the_lease_the_one_answered_409_does_not_lead() {
    let (api, server) = server(vec![
        answer(Method::GET, 200, lease("", "3", 15)),
        answer(Method::PUT, 409, status(409, "Conflict")),
        answer(Method::GET, 404, status(404, "NotFound")),
        answer(Method::POST, 409, status(409, "AlreadyExists")),
    ]);
    let mut e = election(api, LEASE_DURATION);
    assert!(!e.step().await, "lost the race for a released lease");
    assert!(!e.step().await, "lost the race to create it");
    server.await.expect("server");
}

#[tokio::test]
async fn the_leader_renews_and_stops_leading_once_the_api_was_unreachable_for_the_duration() {
    let (api, server) = server(vec![
        answer(Method::GET, 200, lease("controller-a", "5", 1)),
        answer(Method::PUT, 200, lease("controller-a", "6", 1)),
        answer(Method::GET, 500, status(500, "InternalError")),
        answer(Method::GET, 500, status(500, "InternalError")),
    ]);
    let mut e = election(api, Duration::from_secs(1));
    assert!(e.step().await, "renewed");
    assert!(e.step().await, "the last renewal still holds");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(!e.step().await, "not renewed for the whole duration");
    let sent = server.await.expect("server");
    assert_eq!(sent[0]["metadata"]["resourceVersion"], "5");
    assert!(sent[0]["spec"]["renewTime"].is_string());
}

#[tokio::test]
async fn leadership_without_an_election_always_leads() {
    let mut alone = Leadership::always();
    assert!(alone.leads());
    alone.until_leading().await;
    let not = tokio::time::timeout(Duration::from_millis(50), alone.until_not_leading()).await;
    assert!(not.is_err(), "never stops leading");
}
