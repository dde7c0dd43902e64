//! The Gateway API the cluster has installed, checked once at start (cluster mode): the mesh
//! reads HTTPRoute and GRPCRoute `gateway.networking.k8s.io/v1` with Service parents (GAMMA),
//! which the CRDs accept from Gateway API v1.2.0 on (v1.0 and v1.1 schemas refuse such routes,
//! or do not serve GRPCRoute v1). The bundle's version is the CRDs' annotation
//! `gateway.networking.k8s.io/bundle-version`.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::Api;
use tracing::{error, info, warn};

/// The oldest Gateway API release the mesh's routes need.
pub const MINIMUM: (u64, u64, u64) = (1, 2, 0);
/// The CRD annotation naming the release it comes from.
pub const BUNDLE_VERSION: &str = "gateway.networking.k8s.io/bundle-version";
/// The CRDs checked.
const CRDS: [&str; 2] = [
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
];

/// What the check found for one CRD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Not installed: routes of its kind are not read.
    Missing,
    /// Installed without a readable bundle version.
    Unknown,
    /// Installed, at this version; `supported` says whether it is new enough.
    Version { version: String, supported: bool },
}

/// `v1.2.0`, `1.2`, `v1.3.0-rc.1` as (major, minor, patch).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim().trim_start_matches('v');
    let core = core.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// What the CRD says of its release.
pub fn judge(crd: Option<&CustomResourceDefinition>) -> Found {
    let Some(crd) = crd else {
        return Found::Missing;
    };
    let Some(version) = crd
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(BUNDLE_VERSION))
    else {
        return Found::Unknown;
    };
    match parse_version(version) {
        Some(v) => Found::Version {
            version: version.clone(),
            supported: v >= MINIMUM,
        },
        None => Found::Unknown,
    }
}

/// Checks the installed route CRDs and says what it found in the log: an error for a release
/// older than [`MINIMUM`]. Never fails the controller: SMI works without the Gateway API.
pub async fn check(client: kube::Client) -> Vec<(&'static str, Found)> {
    let api: Api<CustomResourceDefinition> = Api::all(client);
    let mut found = Vec::new();
    for name in CRDS {
        let judged = match api.get_opt(name).await {
            Ok(crd) => judge(crd.as_ref()),
            Err(e) => {
                warn!(crd = name, error = %e, "cannot read the Gateway API CRD to check its version");
                continue;
            }
        };
        match &judged {
            Found::Missing => info!(
                crd = name,
                "Gateway API CRD not installed: its routes are not read"
            ),
            Found::Unknown => warn!(
                crd = name,
                "Gateway API CRD without a bundle version; the mesh needs v{}.{}.{} or newer",
                MINIMUM.0,
                MINIMUM.1,
                MINIMUM.2
            ),
            Found::Version {
                version,
                supported: true,
            } => info!(crd = name, %version, "Gateway API"),
            Found::Version {
                version,
                supported: false,
            } => error!(crd = name, %version,
                "Gateway API {version} is older than the v{}.{}.{} the mesh needs: routes with a Service parent (GAMMA) are refused by its schema; upgrade the Gateway API CRDs",
                MINIMUM.0, MINIMUM.1, MINIMUM.2),
        }
        found.push((name, judged));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn crd(version: Option<&str>) -> CustomResourceDefinition {
        CustomResourceDefinition {
            metadata: ObjectMeta {
                name: Some(CRDS[0].to_string()),
                annotations: version.map(|v| [(BUNDLE_VERSION.to_string(), v.to_string())].into()),
                ..ObjectMeta::default()
            },
            ..CustomResourceDefinition::default()
        }
    }

    #[test]
    fn versions_from_v1_2_0_on_are_supported() {
        assert_eq!(parse_version("v1.2.0"), Some((1, 2, 0)));
        assert_eq!(parse_version("1.3"), Some((1, 3, 0)));
        assert_eq!(parse_version("v1.3.0-rc.1"), Some((1, 3, 0)));
        assert_eq!(parse_version("latest"), None);
        let judged = |v| judge(Some(&crd(Some(v))));
        for (v, supported) in [
            ("v1.0.0", false),
            ("v1.1.1", false),
            ("v1.2.0", true),
            ("v1.2.1", true),
            ("v1.4.0", true),
            ("v2.0.0", true),
        ] {
            assert_eq!(
                judged(v),
                Found::Version {
                    version: v.to_string(),
                    supported
                },
                "{v}"
            );
        }
        assert_eq!(judged("main"), Found::Unknown);
        assert_eq!(judge(Some(&crd(None))), Found::Unknown);
        assert_eq!(judge(None), Found::Missing);
    }

    #[tokio::test]
    async fn the_installed_crds_are_read_by_name() {
        use http::{Request, Response};
        use kube::client::Body;
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("httproutes");
            assert_eq!(
                req.uri().path(),
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/httproutes.gateway.networking.k8s.io"
            );
            let mut old = serde_json::to_value(crd(Some("v1.1.0"))).expect("json");
            old["apiVersion"] = "apiextensions.k8s.io/v1".into();
            old["kind"] = "CustomResourceDefinition".into();
            old["spec"] = serde_json::json!({"group": "gateway.networking.k8s.io",
                "names": {"kind": "HTTPRoute", "plural": "httproutes"}, "scope": "Namespaced",
                "versions": []});
            send.send_response(crate::testing::json_response(200, &old));
            let (req, send) = handle.next_request().await.expect("grpcroutes");
            assert!(
                req.uri()
                    .path()
                    .ends_with("/grpcroutes.gateway.networking.k8s.io")
            );
            let missing = crate::testing::status(404, "NotFound");
            send.send_response(crate::testing::json_response(404, &missing));
        });
        let found = check(client).await;
        server.await.expect("server");
        assert_eq!(
            found,
            vec![
                (
                    CRDS[0],
                    Found::Version {
                        version: "v1.1.0".into(),
                        supported: false
                    }
                ),
                (CRDS[1], Found::Missing),
            ]
        );
    }
}
