//! `mesh-controller uninstall`: what the chart's pre-delete hook runs before `helm uninstall`
//! deletes the mesh, so that no pod is left captured by a mesh that is going away.
//!
//! It annotates every agent pod `mesh.io/uninstall="true"`. Each agent reads its pod's
//! annotations from a downward API file; seeing the annotation it lets every pod of its node
//! go, removes its kernel programs and pins, and its CNI watcher takes the plugin out of the
//! node's CNI configuration (see `mesh-agent`'s `uninstall` module). An agent done with that
//! fails its readiness probe (`/healthz` answers 503 `uninstalled`), which is what this command
//! waits for, up to a deadline. The kubelet refreshes downward API files within about a minute,
//! so expect that long.
//!
//! Past the deadline it names the agents that did not confirm and still exits 0: failing the
//! hook would stop the uninstall and leave the whole mesh in place. Those nodes need
//! `mesh-agent clean` and `mesh-cni uninstall` by hand (docs/nodes.md).

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams};
use tokio::time::Instant;
use tracing::{info, warn};

/// The annotation the agents wait for.
pub const ANNOTATION: &str = "mesh.io/uninstall";

/// How an uninstall went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Agent pods that confirmed (not ready any more, or gone).
    pub confirmed: BTreeSet<String>,
    /// Agent pods still ready at the deadline.
    pub unconfirmed: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("list the agent pods ({selector}): {source}")]
    List {
        selector: String,
        #[source]
        source: kube::Error,
    },
    #[error("annotate agent pod {pod}: {source}")]
    Annotate {
        pod: String,
        #[source]
        source: kube::Error,
    },
}

/// Annotates the agent pods `selector` picks in `api`'s namespace and waits until each has
/// confirmed, or `timeout` passed; looks again every `poll`.
pub async fn run(
    api: &Api<Pod>,
    selector: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<Report, UninstallError> {
    let deadline = Instant::now() + timeout;
    let list = || async {
        api.list(&ListParams::default().labels(selector))
            .await
            .map_err(|source| UninstallError::List {
                selector: selector.to_string(),
                source,
            })
    };
    let pods = list().await?;
    let mut waiting = BTreeSet::new();
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION: "true"}}});
    for pod in &pods.items {
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| UninstallError::Annotate {
                pod: name.clone(),
                source,
            })?;
        info!(pod = %name, node = ?pod.spec.as_ref().and_then(|s| s.node_name.as_deref()), "asked to remove the mesh");
        waiting.insert(name);
    }
    let mut report = Report::default();
    while !waiting.is_empty() {
        tokio::time::sleep(poll).await;
        let now = list().await?;
        let ready: BTreeSet<String> = now
            .items
            .iter()
            .filter(|p| is_ready(p))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        waiting.retain(|name| {
            let done = !ready.contains(name);
            if done {
                info!(pod = %name, "the mesh is removed from its node");
                report.confirmed.insert(name.clone());
            }
            !done
        });
        if Instant::now() >= deadline {
            break;
        }
    }
    for name in &waiting {
        warn!(pod = %name, "did not confirm the removal in time: run `mesh-agent clean` and `mesh-cni uninstall` on its node");
    }
    report.unconfirmed = waiting;
    Ok(report)
}

/// The pod's `Ready` condition is `True`.
fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use kube::Client;
    use kube::client::Body;
    use serde_json::{Value, json};

    use super::*;

    fn pod(name: &str, ready: bool) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "mesh-system", "labels": {"app": "mesh-agent"}},
            "spec": {"nodeName": format!("node-{name}"), "containers": []},
            "status": {"conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
    }

    fn list(pods: Vec<Value>) -> Value {
        json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": pods})
    }

    fn respond(send: tower_test::mock::SendResponse<Response<Body>>, body: &Value) {
        send.send_response(crate::testing::json_response(200, body));
    }

    #[tokio::test]
    async fn every_agent_is_annotated_and_waited_for_until_not_ready_or_gone() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Pod> = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("list");
            assert_eq!(req.method(), Method::GET);
            assert!(
                req.uri()
                    .query()
                    .is_some_and(|q| q.contains("labelSelector=app%3Dmesh-agent")),
                "{}",
                req.uri()
            );
            respond(send, &list(vec![pod("a", true), pod("b", true)]));
            for name in ["a", "b"] {
                let (req, send) = handle.next_request().await.expect("patch");
                assert_eq!(req.method(), Method::PATCH);
                assert_eq!(
                    req.uri().path(),
                    format!("/api/v1/namespaces/mesh-system/pods/{name}")
                );
                assert_eq!(
                    req.headers()["content-type"],
                    "application/merge-patch+json"
                );
                let body = req.into_body().collect().await.expect("body").to_bytes();
                let sent: Value = serde_json::from_slice(&body).expect("JSON");
                assert_eq!(sent["metadata"]["annotations"][ANNOTATION], "true");
                respond(send, &pod(name, true));
            }
            // a confirms first; b's pod is gone next.
            let (_, send) = handle.next_request().await.expect("list");
            respond(send, &list(vec![pod("a", false), pod("b", true)]));
            let (_, send) = handle.next_request().await.expect("list");
            respond(send, &list(vec![pod("a", false)]));
        });
        let report = run(
            &api,
            "app=mesh-agent",
            Duration::from_secs(10),
            Duration::from_millis(10),
        )
        .await
        .expect("uninstalled");
        server.await.expect("server");
        assert_eq!(
            report.confirmed,
            BTreeSet::from(["a".to_string(), "b".to_string()])
        );
        assert!(report.unconfirmed.is_empty());
    }

    #[tokio::test]
    async fn an_agent_that_never_confirms_is_named_at_the_deadline() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<Pod> = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
        let server = tokio::spawn(async move {
            let (_, send) = handle.next_request().await.expect("list");
            respond(send, &list(vec![pod("a", true)]));
            let (_, send) = handle.next_request().await.expect("patch");
            respond(send, &pod("a", true));
            while let Some((_, send)) = handle.next_request().await {
                respond(send, &list(vec![pod("a", true)]));
            }
        });
        let report = run(
            &api,
            "app=mesh-agent",
            Duration::from_millis(100),
            Duration::from_millis(20),
        )
        .await
        .expect("ran");
        assert!(report.confirmed.is_empty());
        assert_eq!(report.unconfirmed, BTreeSet::from(["a".to_string()]));
        server.abort();
    }
}
