//! SMI documents as the controller reads them, validated.
//!
//! Supported versions and their differences:
//!
//! - `access.smi-spec.io/v1alpha3` TrafficTarget: `spec.destination`, `spec.rules` and
//!   `spec.sources` are required; rule kinds are `HTTPRouteGroup`, `TCPRoute` and `UDPRoute`
//!   (accepted, allows nothing: the mesh carries TCP only); ports come from TCPRoutes.
//! - `access.smi-spec.io/v1alpha2` TrafficTarget: same shape, plus `spec.destination.port`
//!   (one port for every rule); rule kinds are `HTTPRouteGroup` and `TCPRoute`. Its schema lets
//!   `rules` and `sources` be omitted, but a TrafficTarget without them would allow nothing,
//!   so both versions require at least one of each (as v1alpha3 does).
//! - `specs.smi-spec.io/v1alpha4` (and v1alpha3) HTTPRouteGroup: `spec.matches[]` with a
//!   required `name`, optional `pathRegex`, `methods` (`*` or RFC 7231 methods) and `headers`
//!   (a map of header name to value regex; the list-of-maps form of the published CRD schema
//!   is accepted too). TCPRoute: v1alpha4 requires `spec.matches.ports` (empty = every port);
//!   v1alpha3 TCPRoutes have no matches and cover every port.
//! - `split.smi-spec.io/v1alpha2` TrafficSplit: `spec.service` and `spec.backends[{service,
//!   weight}]` (whole, non-negative weights); v1alpha3 and v1alpha4 add `spec.matches`, a list
//!   of HTTPRouteGroup references.
//!
//! A TrafficTarget applies to a destination in its own namespace: a `spec.destination.namespace`
//! naming another namespace is refused (sources may name any namespace). Rules name
//! HTTPRouteGroups and TCPRoutes of the TrafficTarget's namespace.
//!
//! Fields of another version are refused with a hint rather than silently dropped: a v1alpha3
//! TrafficTarget with `destination.port` would otherwise allow every port. Unknown fields are
//! ignored, as the Kubernetes API server prunes them. Every error names the field path, e.g.
//! `spec.rules[1].kind: "Foo" is not HTTPRouteGroup or TCPRoute`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::identity::{dns_label, dns_subdomain};
use crate::meta::NamespacedName;
use crate::policy::RegexError;

pub(crate) mod read;
mod specs;
mod split;

pub use specs::{
    HttpRouteGroup, HttpRouteGroupSpec, HttpRouteMatch, SpecsVersion, TcpRoute, TcpRouteMatches,
    TcpRouteSpec,
};
pub use split::{
    SplitVersion, TrafficSplit, TrafficSplitBackend, TrafficSplitMatch, TrafficSplitSpec,
};

use read::{
    array, bad_name, child, field, invalid, non_empty, object, optional_str, port_number, required,
    required_str, str_at, string_map,
};

pub const ACCESS_GROUP: &str = "access.smi-spec.io";
pub const SPECS_GROUP: &str = "specs.smi-spec.io";
pub const SPLIT_GROUP: &str = "split.smi-spec.io";

/// The namespace of an object whose metadata names none (kubectl's default).
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why an SMI document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmiError {
    #[error("{path}: required field is missing")]
    Missing { path: String },
    #[error("{path}: expected {expected}, found {found}")]
    Type {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
    /// `value` is shown as written (strings quoted).
    #[error("{path}: {value} is not {expected}")]
    Invalid {
        path: String,
        value: String,
        expected: String,
    },
    /// A Kubernetes name that breaks the DNS-1123 rules.
    #[error("{path}: {value:?} is not a valid name: {reason}")]
    Name {
        path: String,
        value: String,
        reason: &'static str,
    },
    #[error("{path}: must not be empty")]
    Empty { path: String },
    #[error("{path}: {value:?} appears more than once")]
    Duplicate { path: String, value: String },
    #[error("{path}: {source}")]
    Regex {
        path: String,
        #[source]
        source: RegexError,
    },
    #[error("{path}: weight {value} is negative")]
    NegativeWeight { path: String, value: String },
    #[error("{path}: weight {value} is not a whole number")]
    Weight { path: String, value: String },
    #[error("apiVersion {api_version:?} is not supported for {kind}; expected {expected}")]
    ApiVersion {
        kind: &'static str,
        api_version: String,
        expected: &'static str,
    },
    #[error("kind: {found:?} is not {expected}")]
    Kind {
        found: String,
        expected: &'static str,
    },
    #[error("{path}: not part of {api_version}; {hint}")]
    NotInVersion {
        path: String,
        api_version: &'static str,
        hint: &'static str,
    },
    #[error("{path}: {reason}")]
    Constraint { path: String, reason: &'static str },
}

impl SmiError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SmiError::Missing { .. } => "missing",
            SmiError::Type { .. } => "type",
            SmiError::Invalid { .. } => "invalid",
            SmiError::Name { .. } => "name",
            SmiError::Empty { .. } => "empty",
            SmiError::Duplicate { .. } => "duplicate",
            SmiError::Regex { .. } => "regex",
            SmiError::NegativeWeight { .. } => "negative_weight",
            SmiError::Weight { .. } => "weight",
            SmiError::ApiVersion { .. } => "api_version",
            SmiError::Kind { .. } => "kind",
            SmiError::NotInVersion { .. } => "not_in_version",
            SmiError::Constraint { .. } => "constraint",
        }
    }
}

// === Shared ===

/// The part of Kubernetes `metadata` the mesh reads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metadata {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    /// The object's namespace, `default` when the document names none.
    pub fn namespace(&self) -> &str {
        self.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)
    }

    pub fn namespaced_name(&self) -> NamespacedName {
        NamespacedName::new(self.namespace(), &self.name)
    }

    pub(crate) fn parse(root: &Map<String, Value>) -> Result<Self, SmiError> {
        let meta = object(required(root, "", "metadata")?, "metadata")?;
        let name = required_str(meta, "metadata", "name")?;
        dns_subdomain(&name).map_err(|why| bad_name("metadata.name", &name, why))?;
        let namespace = optional_str(meta, "metadata", "namespace")?;
        if let Some(ns) = &namespace {
            dns_label(ns).map_err(|why| bad_name("metadata.namespace", ns, why))?;
        }
        Ok(Metadata {
            name,
            namespace,
            labels: string_map(meta, "metadata", "labels")?,
            annotations: string_map(meta, "metadata", "annotations")?,
        })
    }
}

/// Checks `kind` and `apiVersion`, returning the version part of `apiVersion`.
pub(crate) fn type_meta<'v>(
    root: &'v Map<String, Value>,
    kind: &'static str,
    group: &str,
    expected: &'static str,
) -> Result<&'v str, SmiError> {
    let found = str_at(required(root, "", "kind")?, "kind")?;
    if found != kind {
        return Err(SmiError::Kind {
            found: found.to_string(),
            expected: kind,
        });
    }
    let api_version = str_at(required(root, "", "apiVersion")?, "apiVersion")?;
    let bad = || SmiError::ApiVersion {
        kind,
        api_version: api_version.to_string(),
        expected,
    };
    let (g, version) = api_version.split_once('/').ok_or_else(bad)?;
    if g != group {
        return Err(bad());
    }
    Ok(version)
}

pub(crate) fn root_object(value: &Value) -> Result<&Map<String, Value>, SmiError> {
    object(value, "(document)")
}

// === TrafficTarget ===

/// The TrafficTarget versions read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum AccessVersion {
    #[serde(rename = "access.smi-spec.io/v1alpha2")]
    V1alpha2,
    #[serde(rename = "access.smi-spec.io/v1alpha3")]
    V1alpha3,
}

/// An SMI TrafficTarget: `sources` may call `destination` with the traffic `rules` describe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename = "TrafficTarget", rename_all = "camelCase")]
pub struct TrafficTarget {
    pub api_version: AccessVersion,
    pub metadata: Metadata,
    pub spec: TrafficTargetSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficTargetSpec {
    pub destination: IdentityBindingSubject,
    pub rules: Vec<TrafficTargetRule>,
    pub sources: Vec<IdentityBindingSubject>,
}

/// A service identity: `kind: ServiceAccount` is the only kind SMI defines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IdentityBindingSubject {
    pub kind: SubjectKind,
    pub name: String,
    /// Defaults to the TrafficTarget's namespace; a destination's is always that one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// v1alpha2 `destination.port` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum SubjectKind {
    ServiceAccount,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrafficTargetRule {
    pub kind: RuleKind,
    pub name: String,
    /// Names of matches in the referenced HTTPRouteGroup; `None` means all of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matches: Option<Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum RuleKind {
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    /// v1alpha3 only. Accepted, but grants nothing: the mesh carries TCP only.
    #[serde(rename = "UDPRoute")]
    UdpRoute,
}

impl RuleKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuleKind::HttpRouteGroup => "HTTPRouteGroup",
            RuleKind::TcpRoute => "TCPRoute",
            RuleKind::UdpRoute => "UDPRoute",
        }
    }
}

// === impl TrafficTarget ===

impl TrafficTarget {
    pub const KIND: &'static str = "TrafficTarget";
    pub const VERSIONS: &'static str = "access.smi-spec.io/v1alpha3 or access.smi-spec.io/v1alpha2";

    pub fn from_value(value: &Value) -> Result<Self, SmiError> {
        let root = root_object(value)?;
        let api_version = match type_meta(root, Self::KIND, ACCESS_GROUP, Self::VERSIONS)? {
            "v1alpha3" => AccessVersion::V1alpha3,
            "v1alpha2" => AccessVersion::V1alpha2,
            other => {
                return Err(SmiError::ApiVersion {
                    kind: Self::KIND,
                    api_version: format!("{ACCESS_GROUP}/{other}"),
                    expected: Self::VERSIONS,
                });
            }
        };
        let metadata = Metadata::parse(root)?;
        let spec = object(required(root, "", "spec")?, "spec")?;

        let destination = subject(required(spec, "spec", "destination")?, "spec.destination")?;
        // SMI binds a TrafficTarget to the destination in its own namespace: whoever may
        // write TrafficTargets in one namespace must not open another namespace's workloads.
        if let Some(ns) = destination
            .namespace
            .as_deref()
            .filter(|ns| *ns != metadata.namespace())
        {
            return Err(invalid(
                "spec.destination.namespace",
                ns,
                format!(
                    "the TrafficTarget's own namespace {:?} (a TrafficTarget grants access to \
                     destinations in its namespace only)",
                    metadata.namespace()
                ),
            ));
        }
        if destination.port.is_some() && api_version == AccessVersion::V1alpha3 {
            return Err(SmiError::NotInVersion {
                path: "spec.destination.port".to_string(),
                api_version: "access.smi-spec.io/v1alpha3",
                hint: "restrict ports with a TCPRoute rule (spec.matches.ports) instead",
            });
        }

        let rules_v = required(spec, "spec", "rules")?;
        let rules = non_empty(array(rules_v, "spec.rules")?, "spec.rules")?
            .iter()
            .enumerate()
            .map(|(i, r)| rule(r, &format!("spec.rules[{i}]"), api_version))
            .collect::<Result<Vec<_>, _>>()?;

        let sources_v = required(spec, "spec", "sources")?;
        let sources = non_empty(array(sources_v, "spec.sources")?, "spec.sources")?
            .iter()
            .enumerate()
            .map(|(i, s)| subject(s, &format!("spec.sources[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        for (i, s) in sources.iter().enumerate() {
            if s.port.is_some() {
                return Err(SmiError::Constraint {
                    path: format!("spec.sources[{i}].port"),
                    reason: "a port applies to the destination only",
                });
            }
        }

        Ok(TrafficTarget {
            api_version,
            metadata,
            spec: TrafficTargetSpec {
                destination,
                rules,
                sources,
            },
        })
    }

    /// The TrafficTarget's namespace (`default` when unnamed).
    pub fn namespace(&self) -> &str {
        self.metadata.namespace()
    }

    /// The destination service account as `(namespace, name)`: always in the TrafficTarget's
    /// own namespace (the reader refuses any other `destination.namespace`, and a value built
    /// by hand with another one still binds nothing outside it).
    pub fn destination(&self) -> (&str, &str) {
        (self.namespace(), &self.spec.destination.name)
    }

    /// The namespace and name of a subject; the namespace defaults to the TrafficTarget's.
    pub fn subject_parts<'a>(&'a self, s: &'a IdentityBindingSubject) -> (&'a str, &'a str) {
        (s.namespace.as_deref().unwrap_or(self.namespace()), &s.name)
    }
}

impl<'de> Deserialize<'de> for TrafficTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TrafficTarget::from_value(&Value::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

fn subject(v: &Value, path: &str) -> Result<IdentityBindingSubject, SmiError> {
    let obj = object(v, path)?;
    let kind = required_str(obj, path, "kind")?;
    if kind != "ServiceAccount" {
        return Err(invalid(&child(path, "kind"), &kind, "ServiceAccount"));
    }
    let name = required_str(obj, path, "name")?;
    dns_subdomain(&name).map_err(|why| bad_name(&child(path, "name"), &name, why))?;
    let namespace = optional_str(obj, path, "namespace")?;
    if let Some(ns) = &namespace {
        dns_label(ns).map_err(|why| bad_name(&child(path, "namespace"), ns, why))?;
    }
    let port = match field(obj, "port") {
        Some(p) => Some(port_number(p, &child(path, "port"))?),
        None => None,
    };
    Ok(IdentityBindingSubject {
        kind: SubjectKind::ServiceAccount,
        name,
        namespace,
        port,
    })
}

fn rule(v: &Value, path: &str, version: AccessVersion) -> Result<TrafficTargetRule, SmiError> {
    let obj = object(v, path)?;
    let kind_s = required_str(obj, path, "kind")?;
    let kind = match (kind_s.as_str(), version) {
        ("HTTPRouteGroup", _) => RuleKind::HttpRouteGroup,
        ("TCPRoute", _) => RuleKind::TcpRoute,
        ("UDPRoute", AccessVersion::V1alpha3) => RuleKind::UdpRoute,
        (_, AccessVersion::V1alpha3) => {
            return Err(invalid(
                &child(path, "kind"),
                &kind_s,
                "HTTPRouteGroup, TCPRoute or UDPRoute",
            ));
        }
        (_, AccessVersion::V1alpha2) => {
            return Err(invalid(
                &child(path, "kind"),
                &kind_s,
                "HTTPRouteGroup or TCPRoute",
            ));
        }
    };
    let name = required_str(obj, path, "name")?;
    dns_subdomain(&name).map_err(|why| bad_name(&child(path, "name"), &name, why))?;
    let matches = match field(obj, "matches") {
        None => None,
        Some(m) => {
            let mpath = child(path, "matches");
            let list = array(m, &mpath)?;
            let mut names = Vec::with_capacity(list.len());
            for (i, n) in list.iter().enumerate() {
                names.push(str_at(n, &format!("{mpath}[{i}]"))?.to_string());
            }
            if kind != RuleKind::HttpRouteGroup && !names.is_empty() {
                return Err(SmiError::Constraint {
                    path: mpath,
                    reason: "match names apply to HTTPRouteGroup rules only",
                });
            }
            Some(names)
        }
    };
    Ok(TrafficTargetRule {
        kind,
        name,
        matches,
    })
}

#[cfg(test)]
mod tests;
