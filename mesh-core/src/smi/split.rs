//! split.smi-spec.io: TrafficSplit.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::read::{
    array, bad_name, child, field, invalid, non_empty, object, required, required_str,
};
use super::{Metadata, RuleKind, SPLIT_GROUP, SmiError, root_object, type_meta};
use crate::identity::{dns_label, dns_subdomain};
use crate::model::NamespacedName;

// === TrafficSplit ===

/// The TrafficSplit versions read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum SplitVersion {
    #[serde(rename = "split.smi-spec.io/v1alpha2")]
    V1alpha2,
    #[serde(rename = "split.smi-spec.io/v1alpha3")]
    V1alpha3,
    #[serde(rename = "split.smi-spec.io/v1alpha4")]
    V1alpha4,
}

/// An SMI TrafficSplit: traffic to the root `service` goes to `backends` by weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename = "TrafficSplit", rename_all = "camelCase")]
pub struct TrafficSplit {
    pub api_version: SplitVersion,
    pub metadata: Metadata,
    pub spec: TrafficSplitSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficSplitSpec {
    /// The root service's name (a `name.namespace[.svc...]` form is reduced to the name).
    pub service: String,
    pub backends: Vec<TrafficSplitBackend>,
    /// HTTPRouteGroups (v1alpha3+) whose matches restrict the split; empty means all traffic.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TrafficSplitMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficSplitBackend {
    pub service: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficSplitMatch {
    /// Always `HTTPRouteGroup`.
    pub kind: RuleKind,
    pub name: String,
}

// === impl TrafficSplit ===

impl TrafficSplit {
    pub const KIND: &'static str = "TrafficSplit";
    pub const VERSIONS: &'static str =
        "split.smi-spec.io/v1alpha4, split.smi-spec.io/v1alpha3 or split.smi-spec.io/v1alpha2";

    pub fn from_value(value: &Value) -> Result<Self, SmiError> {
        let root = root_object(value)?;
        let api_version = match type_meta(root, Self::KIND, SPLIT_GROUP, Self::VERSIONS)? {
            "v1alpha4" => SplitVersion::V1alpha4,
            "v1alpha3" => SplitVersion::V1alpha3,
            "v1alpha2" => SplitVersion::V1alpha2,
            other => {
                return Err(SmiError::ApiVersion {
                    kind: Self::KIND,
                    api_version: format!("{SPLIT_GROUP}/{other}"),
                    expected: Self::VERSIONS,
                });
            }
        };
        let metadata = Metadata::parse(root)?;
        let namespace = metadata.namespace();
        let spec = object(required(root, "", "spec")?, "spec")?;
        let service = service_ref(
            &required_str(spec, "spec", "service")?,
            namespace,
            "spec.service",
        )?;

        let list = array(required(spec, "spec", "backends")?, "spec.backends")?;
        let mut backends: Vec<TrafficSplitBackend> = Vec::with_capacity(list.len());
        for (i, b) in non_empty(list, "spec.backends")?.iter().enumerate() {
            let path = format!("spec.backends[{i}]");
            let obj = object(b, &path)?;
            let spath = child(&path, "service");
            let svc = service_ref(&required_str(obj, &path, "service")?, namespace, &spath)?;
            let weight = weight(required(obj, &path, "weight")?, &child(&path, "weight"))?;
            if backends.iter().any(|b| b.service == svc) {
                return Err(SmiError::Duplicate {
                    path: spath,
                    value: svc,
                });
            }
            backends.push(TrafficSplitBackend {
                service: svc,
                weight,
            });
        }
        if backends.iter().all(|b| b.weight == 0) {
            return Err(SmiError::Constraint {
                path: "spec.backends".to_string(),
                reason: "every weight is 0, so no backend would receive traffic",
            });
        }

        let mut matches = Vec::new();
        if let Some(m) = field(spec, "matches") {
            if api_version == SplitVersion::V1alpha2 {
                return Err(SmiError::NotInVersion {
                    path: "spec.matches".to_string(),
                    api_version: "split.smi-spec.io/v1alpha2",
                    hint: "use split.smi-spec.io/v1alpha4 to match HTTPRouteGroups",
                });
            }
            for (i, m) in array(m, "spec.matches")?.iter().enumerate() {
                let path = format!("spec.matches[{i}]");
                let obj = object(m, &path)?;
                let kind = required_str(obj, &path, "kind")?;
                if kind != "HTTPRouteGroup" {
                    return Err(invalid(&child(&path, "kind"), &kind, "HTTPRouteGroup"));
                }
                let name = required_str(obj, &path, "name")?;
                dns_subdomain(&name).map_err(|why| bad_name(&child(&path, "name"), &name, why))?;
                matches.push(TrafficSplitMatch {
                    kind: RuleKind::HttpRouteGroup,
                    name,
                });
            }
        }

        Ok(TrafficSplit {
            api_version,
            metadata,
            spec: TrafficSplitSpec {
                service,
                backends,
                matches,
            },
        })
    }

    pub fn root(&self) -> NamespacedName {
        NamespacedName::new(self.metadata.namespace(), &self.spec.service)
    }
}

impl<'de> Deserialize<'de> for TrafficSplit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TrafficSplit::from_value(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A service named by a split: `name`, or `name.namespace[.svc[.<cluster domain>]]` in the
/// split's own namespace (splits do not cross namespaces). Returns the name.
fn service_ref(s: &str, namespace: &str, path: &str) -> Result<String, SmiError> {
    let mut parts = s.split('.');
    let name = parts.next().unwrap_or_default();
    dns_label(name).map_err(|why| bad_name(path, s, why))?;
    if let Some(ns) = parts.next() {
        if ns != namespace {
            return Err(invalid(
                path,
                s,
                "a service in the TrafficSplit's namespace",
            ));
        }
        if let Some(svc) = parts.next()
            && svc != "svc"
        {
            return Err(invalid(
                path,
                s,
                "<name>, <name>.<namespace> or <name>.<namespace>.svc[.<domain>]",
            ));
        }
    }
    Ok(name.to_string())
}

fn weight(v: &Value, path: &str) -> Result<u32, SmiError> {
    let bad = || SmiError::Weight {
        path: path.to_string(),
        value: v.to_string(),
    };
    let negative = || SmiError::NegativeWeight {
        path: path.to_string(),
        value: v.to_string(),
    };
    let Value::Number(n) = v else {
        return Err(bad());
    };
    if let Some(u) = n.as_u64() {
        return u32::try_from(u).map_err(|_| bad());
    }
    if n.as_i64().is_some() {
        return Err(negative());
    }
    let f = n.as_f64().ok_or_else(bad)?;
    if f < 0.0 {
        return Err(negative());
    }
    if f.fract() != 0.0 || f > f64::from(u32::MAX) {
        return Err(bad());
    }
    // A whole number in u32 range, checked above.
    Ok(f as u32)
}
