//! The CA persisted in a Kubernetes Secret (cluster mode).
//!
//! The Secret holds `ca.crt` and `ca.key`. On first start the controller generates a root and
//! creates the Secret; if another replica created it first (409 AlreadyExists), the controller
//! loads that one, so every replica signs under the same root.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use mesh_core::identity::TrustDomain;

use super::{Ca, CaError};

const CERT_KEY: &str = "ca.crt";
const KEY_KEY: &str = "ca.key";

fn secret_err(name: &str, reason: impl std::fmt::Display) -> CaError {
    CaError::Secret {
        name: name.to_string(),
        reason: reason.to_string(),
    }
}

fn from_secret(secret: &Secret, name: &str, td: &TrustDomain) -> Result<Ca, CaError> {
    let data = secret
        .data
        .as_ref()
        .ok_or_else(|| secret_err(name, "has no data"))?;
    let field = |k: &str| {
        let v = data
            .get(k)
            .ok_or_else(|| secret_err(name, format!("has no {k}")))?;
        String::from_utf8(v.0.clone()).map_err(|_| secret_err(name, format!("{k} is not PEM text")))
    };
    Ca::from_pem(td, &field(CERT_KEY)?, &field(KEY_KEY)?, None)
}

/// Loads the CA from the Secret `name`, or generates one and stores it there.
pub async fn load_or_create(
    api: &Api<Secret>,
    name: &str,
    td: &TrustDomain,
) -> Result<Ca, CaError> {
    if let Some(existing) = api.get_opt(name).await.map_err(|e| secret_err(name, e))? {
        return from_secret(&existing, name, td);
    }
    let ca = Ca::generate(td)?;
    let (cert, key) = ca.to_pem();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(crate::app::part_of_mesh()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(BTreeMap::from([
            (CERT_KEY.to_string(), ByteString(cert.as_bytes().to_vec())),
            (KEY_KEY.to_string(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(ca),
        Err(kube::Error::Api(status)) if status.is_already_exists() => {
            let existing = api.get(name).await.map_err(|e| secret_err(name, e))?;
            from_secret(&existing, name, td)
        }
        Err(e) => Err(secret_err(name, e)),
    }
}
