//! The resources the controller reads, from the Kubernetes API or a directory of YAML: one
//! [`Resource`] type for both sources, its identity ([`ResourceKey`]) and parsing.
//!
//! [`parse`] dispatches on `apiVersion` and `kind`. Kubernetes objects are decoded with
//! k8s-openapi; SMI objects are validated by [`mesh_core::smi`], Gateway API routes by
//! [`mesh_core::gateway`]. A namespaced object without
//! `metadata.namespace` is in `default`, as kubectl does.

use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::ServiceCIDR;
use mesh_core::gateway::{self, GatewayRoute};
use mesh_core::model::NamespacedName;
use mesh_core::route::RouteKind;
use mesh_core::smi::{self, DEFAULT_NAMESPACE, SmiError};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The kinds the controller reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Kind {
    Namespace,
    ServiceAccount,
    Pod,
    Service,
    EndpointSlice,
    TrafficTarget,
    #[serde(rename = "HTTPRouteGroup")]
    HttpRouteGroup,
    #[serde(rename = "TCPRoute")]
    TcpRoute,
    TrafficSplit,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    /// Read for its pod CIDRs (what the mesh captures).
    Node,
    /// Read for the service CIDRs (what the mesh captures).
    #[serde(rename = "ServiceCIDR")]
    ServiceCidr,
}

/// The identity of a resource: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

/// One object of a kind the controller reads.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "values are moved into the index's typed maps at once; boxing would only add an allocation"
)]
pub enum Resource {
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    TrafficTarget(smi::TrafficTarget),
    HttpRouteGroup(smi::HttpRouteGroup),
    TcpRoute(smi::TcpRoute),
    TrafficSplit(smi::TrafficSplit),
    HttpRoute(GatewayRoute),
    GrpcRoute(GatewayRoute),
    Node(Node),
    ServiceCidr(ServiceCIDR),
}

/// Why a document is not a resource the controller can use.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    /// Documents are numbered from 1 in the order of the stream.
    #[error("document {index}: invalid YAML: {reason}")]
    Yaml { index: usize, reason: String },
    #[error("document {index}: {source}")]
    Document {
        index: usize,
        #[source]
        source: Box<ResourceError>,
    },
    #[error("expected a map with apiVersion, kind and metadata, found {found}")]
    NotAnObject { found: &'static str },
    #[error("{field} is missing or not a string")]
    TypeMeta { field: &'static str },
    #[error(
        "unknown kind {kind:?} (apiVersion {api_version:?}); the mesh reads Namespace, \
         ServiceAccount, Pod, Service, EndpointSlice, TrafficTarget, HTTPRouteGroup, TCPRoute, \
         TrafficSplit, HTTPRoute, GRPCRoute, Node and ServiceCIDR"
    )]
    UnknownKind { api_version: String, kind: String },
    #[error("{kind}: apiVersion {api_version:?} is not supported; expected {expected}")]
    ApiVersion {
        kind: Kind,
        api_version: String,
        expected: &'static str,
    },
    #[error("{kind}: metadata.name is missing or not a string")]
    MissingName { kind: Kind },
    #[error("{key}: {reason}")]
    Invalid { key: ResourceKey, reason: String },
    #[error("{key}: {source}")]
    Smi {
        key: ResourceKey,
        #[source]
        source: Box<SmiError>,
    },
    /// A Gateway API route (read with the same field-path errors as SMI documents).
    #[error("{key}: {source}")]
    Gateway {
        key: ResourceKey,
        #[source]
        source: Box<SmiError>,
    },
}

// === impl Kind ===

impl Kind {
    pub const ALL: [Kind; 13] = [
        Kind::Namespace,
        Kind::ServiceAccount,
        Kind::Pod,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::TrafficTarget,
        Kind::HttpRouteGroup,
        Kind::TcpRoute,
        Kind::TrafficSplit,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::Node,
        Kind::ServiceCidr,
    ];

    /// The Kubernetes `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::ServiceAccount => "ServiceAccount",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::TrafficTarget => "TrafficTarget",
            Kind::HttpRouteGroup => "HTTPRouteGroup",
            Kind::TcpRoute => "TCPRoute",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::Node => "Node",
            Kind::ServiceCidr => "ServiceCIDR",
        }
    }

    pub fn from_kind(kind: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == kind)
    }

    pub fn is_namespaced(self) -> bool {
        !matches!(self, Kind::Namespace | Kind::Node | Kind::ServiceCidr)
    }

    /// Whether the kind references others in its namespace or is referenced (a change to one
    /// makes [`crate::index::Index::revalidate`] check the namespace again).
    pub fn has_references(self) -> bool {
        matches!(
            self,
            Kind::TrafficTarget
                | Kind::HttpRouteGroup
                | Kind::TcpRoute
                | Kind::TrafficSplit
                | Kind::Service
                | Kind::HttpRoute
                | Kind::GrpcRoute
        )
    }

    /// Whether `api_version` is one this kind is read in.
    fn supports(self, api_version: &str) -> bool {
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        match self {
            Kind::Namespace | Kind::ServiceAccount | Kind::Pod | Kind::Service | Kind::Node => {
                api_version == "v1"
            }
            Kind::ServiceCidr => api_version == "networking.k8s.io/v1",
            Kind::EndpointSlice => api_version == "discovery.k8s.io/v1",
            Kind::TrafficTarget => {
                group == smi::ACCESS_GROUP && matches!(version, "v1alpha2" | "v1alpha3")
            }
            Kind::HttpRouteGroup | Kind::TcpRoute => {
                group == smi::SPECS_GROUP && matches!(version, "v1alpha3" | "v1alpha4")
            }
            Kind::TrafficSplit => {
                group == smi::SPLIT_GROUP && matches!(version, "v1alpha2" | "v1alpha3" | "v1alpha4")
            }
            Kind::HttpRoute | Kind::GrpcRoute => group == gateway::GATEWAY_GROUP && version == "v1",
        }
    }

    fn expected_api_versions(self) -> &'static str {
        match self {
            Kind::Namespace | Kind::ServiceAccount | Kind::Pod | Kind::Service | Kind::Node => "v1",
            Kind::ServiceCidr => "networking.k8s.io/v1",
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::TrafficTarget => smi::TrafficTarget::VERSIONS,
            Kind::HttpRouteGroup | Kind::TcpRoute => {
                "specs.smi-spec.io/v1alpha4 or specs.smi-spec.io/v1alpha3"
            }
            Kind::TrafficSplit => smi::TrafficSplit::VERSIONS,
            Kind::HttpRoute | Kind::GrpcRoute => gateway::VERSIONS,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl ResourceKey ===

impl ResourceKey {
    pub fn new(kind: Kind, namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ResourceKey {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    pub fn namespaced_name(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.is_namespaced() {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        } else {
            write!(f, "{} {}", self.kind, self.name)
        }
    }
}

// === impl Resource ===

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Namespace(_) => Kind::Namespace,
            Resource::ServiceAccount(_) => Kind::ServiceAccount,
            Resource::Pod(_) => Kind::Pod,
            Resource::Service(_) => Kind::Service,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::TrafficTarget(_) => Kind::TrafficTarget,
            Resource::HttpRouteGroup(_) => Kind::HttpRouteGroup,
            Resource::TcpRoute(_) => Kind::TcpRoute,
            Resource::TrafficSplit(_) => Kind::TrafficSplit,
            Resource::HttpRoute(_) => Kind::HttpRoute,
            Resource::GrpcRoute(_) => Kind::GrpcRoute,
            Resource::Node(_) => Kind::Node,
            Resource::ServiceCidr(_) => Kind::ServiceCidr,
        }
    }

    /// The resource's key; a namespaced object without a namespace is in `default`.
    pub fn key(&self) -> ResourceKey {
        let kind = self.kind();
        let (namespace, name) = match self {
            Resource::Namespace(o) => (None, o.metadata.name.as_deref()),
            Resource::Node(o) => (None, o.metadata.name.as_deref()),
            Resource::ServiceCidr(o) => (None, o.metadata.name.as_deref()),
            Resource::ServiceAccount(o) => {
                (o.metadata.namespace.as_deref(), o.metadata.name.as_deref())
            }
            Resource::Pod(o) => (o.metadata.namespace.as_deref(), o.metadata.name.as_deref()),
            Resource::Service(o) => (o.metadata.namespace.as_deref(), o.metadata.name.as_deref()),
            Resource::EndpointSlice(o) => {
                (o.metadata.namespace.as_deref(), o.metadata.name.as_deref())
            }
            Resource::TrafficTarget(o) => {
                (Some(o.metadata.namespace()), Some(o.metadata.name.as_str()))
            }
            Resource::HttpRouteGroup(o) => {
                (Some(o.metadata.namespace()), Some(o.metadata.name.as_str()))
            }
            Resource::TcpRoute(o) => (Some(o.metadata.namespace()), Some(o.metadata.name.as_str())),
            Resource::TrafficSplit(o) => {
                (Some(o.metadata.namespace()), Some(o.metadata.name.as_str()))
            }
            Resource::HttpRoute(o) | Resource::GrpcRoute(o) => {
                (Some(o.metadata.namespace()), Some(o.metadata.name.as_str()))
            }
        };
        let namespace = match kind.is_namespaced() {
            true => namespace.unwrap_or(DEFAULT_NAMESPACE),
            false => "",
        };
        ResourceKey::new(kind, namespace, name.unwrap_or_default())
    }
}

macro_rules! impl_from {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        $(impl From<$ty> for Resource {
            fn from(o: $ty) -> Self {
                Resource::$variant(o)
            }
        })*
    };
}

impl_from!(
    Namespace(Namespace),
    ServiceAccount(ServiceAccount),
    Pod(Pod),
    Service(Service),
    EndpointSlice(EndpointSlice),
    TrafficTarget(smi::TrafficTarget),
    HttpRouteGroup(smi::HttpRouteGroup),
    TcpRoute(smi::TcpRoute),
    TrafficSplit(smi::TrafficSplit),
);

// === impl ResourceError ===

impl ResourceError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ResourceError::Yaml { .. } => "yaml",
            ResourceError::Document { source, .. } => source.kind(),
            ResourceError::NotAnObject { .. } => "not_an_object",
            ResourceError::TypeMeta { .. } => "type_meta",
            ResourceError::UnknownKind { .. } => "unknown_kind",
            ResourceError::ApiVersion { .. } => "api_version",
            ResourceError::MissingName { .. } => "missing_name",
            ResourceError::Invalid { .. } => "invalid",
            ResourceError::Smi { .. } => "smi",
            ResourceError::Gateway { .. } => "gateway",
        }
    }

    /// The resource the error is about, when the document named one.
    pub fn key(&self) -> Option<&ResourceKey> {
        match self {
            ResourceError::Document { source, .. } => source.key(),
            ResourceError::Invalid { key, .. }
            | ResourceError::Smi { key, .. }
            | ResourceError::Gateway { key, .. } => Some(key),
            _ => None,
        }
    }

    /// The document's number in a YAML stream (from 1), for errors of [`parse_yaml_stream`].
    pub fn document(&self) -> Option<usize> {
        match self {
            ResourceError::Yaml { index, .. } | ResourceError::Document { index, .. } => {
                Some(*index)
            }
            _ => None,
        }
    }
}

// === Parsing ===

/// Parses one object, dispatching on `apiVersion` and `kind`.
pub fn parse(mut value: Value) -> Result<Resource, ResourceError> {
    let Value::Object(root) = &mut value else {
        return Err(ResourceError::NotAnObject {
            found: json_type(&value),
        });
    };
    let text = |field: &'static str| match root.get(field) {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(ResourceError::TypeMeta { field }),
    };
    let api_version = text("apiVersion")?;
    let kind_s = text("kind")?;
    let Some(kind) = Kind::from_kind(&kind_s) else {
        return Err(ResourceError::UnknownKind {
            api_version,
            kind: kind_s,
        });
    };
    if !kind.supports(&api_version) {
        return Err(ResourceError::ApiVersion {
            kind,
            api_version,
            expected: kind.expected_api_versions(),
        });
    }
    let meta = root
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .ok_or(ResourceError::MissingName { kind })?;
    let name = match meta.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(ResourceError::MissingName { kind }),
    };
    let namespace = if kind.is_namespaced() {
        match meta.get("namespace") {
            Some(Value::String(ns)) if !ns.is_empty() => ns.clone(),
            _ => {
                meta.insert("namespace".into(), DEFAULT_NAMESPACE.into());
                DEFAULT_NAMESPACE.to_string()
            }
        }
    } else {
        String::new()
    };
    let key = ResourceKey::new(kind, namespace, name);

    fn k8s<T: for<'de> Deserialize<'de>>(
        value: Value,
        key: &ResourceKey,
    ) -> Result<T, ResourceError> {
        serde_json::from_value(value).map_err(|e| ResourceError::Invalid {
            key: key.clone(),
            reason: e.to_string(),
        })
    }
    let smi_err = |source| ResourceError::Smi {
        key: key.clone(),
        source: Box::new(source),
    };
    let gateway_err = |source| ResourceError::Gateway {
        key: key.clone(),
        source: Box::new(source),
    };
    let resource = match kind {
        Kind::Namespace => Resource::Namespace(k8s(value, &key)?),
        Kind::Node => Resource::Node(k8s(value, &key)?),
        Kind::ServiceCidr => Resource::ServiceCidr(k8s(value, &key)?),
        Kind::ServiceAccount => Resource::ServiceAccount(k8s(value, &key)?),
        Kind::Pod => Resource::Pod(k8s(value, &key)?),
        Kind::Service => Resource::Service(k8s(value, &key)?),
        Kind::EndpointSlice => Resource::EndpointSlice(k8s(value, &key)?),
        Kind::TrafficTarget => {
            Resource::TrafficTarget(smi::TrafficTarget::from_value(&value).map_err(smi_err)?)
        }
        Kind::HttpRouteGroup => {
            Resource::HttpRouteGroup(smi::HttpRouteGroup::from_value(&value).map_err(smi_err)?)
        }
        Kind::TcpRoute => Resource::TcpRoute(smi::TcpRoute::from_value(&value).map_err(smi_err)?),
        Kind::TrafficSplit => {
            Resource::TrafficSplit(smi::TrafficSplit::from_value(&value).map_err(smi_err)?)
        }
        Kind::HttpRoute => Resource::HttpRoute(
            GatewayRoute::from_value(&value, RouteKind::Http).map_err(gateway_err)?,
        ),
        Kind::GrpcRoute => Resource::GrpcRoute(
            GatewayRoute::from_value(&value, RouteKind::Grpc).map_err(gateway_err)?,
        ),
    };
    Ok(resource)
}

/// The deepest nesting of flow collections (`[` and `{`) a YAML stream may have. libyaml,
/// under serde_yaml_ng, looks at every open flow level on each token, so reading time grows
/// with the square of the depth: 4,000 opening brackets (4 KB) took seconds. Kubernetes
/// objects nest a few levels, and serde_yaml_ng refuses documents nested deeper than 128
/// levels anyway. Every bracket counts, also inside strings and comments, so the count is an
/// upper bound of the real depth.
pub const MAX_FLOW_DEPTH: usize = 512;

/// Parses a multi-document YAML stream (`---` separated). Empty documents are skipped; a
/// `kind: List` document (as `kubectl get -o yaml` writes) yields its items. Errors carry the
/// document's number (from 1). After invalid YAML the rest of the stream cannot be read, so
/// the YAML error is the last element; so is a document nested deeper than
/// [`MAX_FLOW_DEPTH`], which is refused before it is parsed.
pub fn parse_yaml_stream(text: &str) -> Vec<Result<Resource, ResourceError>> {
    let (readable, too_deep) = match flow_depth_exceeded(text) {
        Some(offset) => (&text[..document_start(text, offset)], true),
        None => (text, false),
    };
    let mut out = Vec::new();
    let mut documents = 0;
    for (i, document) in serde_yaml_ng::Deserializer::from_str(readable).enumerate() {
        let index = i + 1;
        documents = index;
        let value = match Value::deserialize(document) {
            Ok(Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                out.push(Err(ResourceError::Yaml {
                    index,
                    reason: e.to_string(),
                }));
                return out;
            }
        };
        let in_document = |e| ResourceError::Document {
            index,
            source: Box::new(e),
        };
        match value {
            Value::Object(mut map) if map.get("kind").and_then(Value::as_str) == Some("List") => {
                match map.remove("items") {
                    Some(Value::Array(items)) => out.extend(
                        items
                            .into_iter()
                            .map(|item| parse(item).map_err(in_document)),
                    ),
                    Some(Value::Null) | None => {}
                    Some(other) => out.push(Err(in_document(ResourceError::NotAnObject {
                        found: json_type(&other),
                    }))),
                }
            }
            value => out.push(parse(value).map_err(in_document)),
        }
    }
    if too_deep {
        out.push(Err(ResourceError::Yaml {
            index: documents + 1,
            reason: format!(
                "flow collections ('[' and '{{') nested more than {MAX_FLOW_DEPTH} levels deep"
            ),
        }));
    }
    out
}

/// The offset of the bracket that takes the nesting of `[` and `{` past [`MAX_FLOW_DEPTH`].
fn flow_depth_exceeded(text: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (offset, b) in text.bytes().enumerate() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(offset);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The start of the document holding `offset`: its `---` line, or the start of the stream.
fn document_start(text: &str, offset: usize) -> usize {
    text[..offset]
        .match_indices("---")
        .map(|(i, _)| i)
        .filter(|&i| {
            let at_line_start = i == 0 || text.as_bytes()[i - 1] == b'\n';
            let ends_marker = text[i + 3..]
                .bytes()
                .next()
                .is_none_or(|b| b.is_ascii_whitespace());
            at_line_start && ends_marker
        })
        .last()
        .unwrap_or(0)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a map",
    }
}

#[cfg(test)]
mod tests;
