//! The trust bundle (`--trust-bundle`, cluster mode): the roots agents verify the controller
//! with, published as a ConfigMap (key `ca.crt`, the public half only) that the agents' pods
//! mount. The controller writes it at start and again every [`RESYNC`], so a deleted or
//! edited bundle is put back, and a rotated CA (new roots in the Secret or `--ca-roots`)
//! reaches the agents once the controller runs with it. Only the leader writes.
//!
//! Written by server-side apply under the controller's field manager, forcing: the bundle is
//! the controller's, whoever wrote it last.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use tracing::{info, warn};

use crate::leader::Leadership;

/// The key of the roots' PEM in the ConfigMap.
pub const KEY: &str = "ca.crt";
/// How often the bundle is written again.
pub const RESYNC: Duration = Duration::from_secs(60);
/// The field manager of the bundle.
const FIELD_MANAGER: &str = "mesh-controller";

/// The ConfigMap holding `roots_pem`.
pub fn bundle(name: &str, roots_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(crate::app::part_of_mesh()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(KEY.to_string(), roots_pem.to_string())])),
        ..ConfigMap::default()
    }
}

/// Writes the bundle `name` with `roots_pem`, creating it if needed.
pub async fn publish(api: &Api<ConfigMap>, name: &str, roots_pem: &str) -> Result<(), kube::Error> {
    // Server-side apply needs the kind in the body.
    let mut value =
        serde_json::to_value(bundle(name, roots_pem)).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "ConfigMap".into();
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await?;
    Ok(())
}

/// Keeps the bundle written while this replica leads, until the task is aborted.
pub async fn keep(
    api: Api<ConfigMap>,
    name: String,
    roots_pem: String,
    mut leadership: Leadership,
) {
    let mut said = false;
    loop {
        leadership.until_leading().await;
        match publish(&api, &name, &roots_pem).await {
            Ok(()) if !said => {
                info!(configmap = %name, "trust bundle published");
                said = true;
            }
            Ok(()) => {}
            Err(e) => {
                warn!(configmap = %name, error = %e, "cannot publish the trust bundle; retrying")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RESYNC) => {}
            // Leading again after a pause: written at once.
            () = leadership.until_not_leading() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use http::{Method, Request, Response};
    use http_body_util::BodyExt;
    use kube::Client;
    use kube::client::Body;

    use super::*;

    #[tokio::test]
    async fn the_bundle_is_applied_with_the_roots_under_the_controller_s_name() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<ConfigMap> = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("apply");
            assert_eq!(req.method(), Method::PATCH);
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/mesh-system/configmaps/mesh-ca-root"
            );
            let query = req.uri().query().unwrap_or_default().to_string();
            assert!(query.contains("fieldManager=mesh-controller"), "{query}");
            assert!(query.contains("force=true"), "{query}");
            assert_eq!(
                req.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let body = req.into_body().collect().await.expect("body").to_bytes();
            let sent: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
            send.send_response(crate::testing::json_response(200, &sent));
            sent
        });
        publish(&api, "mesh-ca-root", "-----BEGIN CERTIFICATE-----\n")
            .await
            .expect("published");
        let sent = server.await.expect("server");
        assert_eq!(sent["kind"], "ConfigMap");
        assert_eq!(sent["apiVersion"], "v1");
        assert_eq!(sent["metadata"]["name"], "mesh-ca-root");
        assert_eq!(sent["data"]["ca.crt"], "-----BEGIN CERTIFICATE-----\n");
    }

    #[tokio::test]
    async fn a_replica_that_does_not_lead_writes_nothing() {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api: Api<ConfigMap> = Api::namespaced(Client::new(svc, "mesh-system"), "mesh-system");
        let (tx, rx) = tokio::sync::watch::channel(false);
        let keeper = tokio::spawn(keep(
            api,
            "mesh-ca-root".into(),
            "pem".into(),
            crate::leader::testing(rx),
        ));
        let nothing = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
        assert!(nothing.is_err(), "a follower wrote the bundle");
        tx.send(true).expect("leading");
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), handle.next_request())
            .await
            .expect("the new leader writes at once")
            .expect("a request");
        assert_eq!(req.method(), Method::PATCH);
        let written = serde_json::to_value(bundle("mesh-ca-root", "pem")).expect("JSON");
        send.send_response(crate::testing::json_response(200, &written));
        keeper.abort();
    }
}
