//! SPIFFE identities.
//!
//! Three kinds of identity exist in the mesh, each with a fixed path shape under one trust
//! domain:
//!
//! - a workload: `spiffe://<td>/ns/<namespace>/sa/<serviceaccount>`
//! - a node agent: `spiffe://<td>/mesh/node/<node-name>`
//! - the controller: `spiffe://<td>/mesh/controller`
//!
//! Parsing is strict: the SPIFFE ID rules (lowercase trust domain, no empty, `.` or `..`
//! segments, no query, fragment, port or user info, at most 2048 bytes) and the Kubernetes
//! naming rules of each segment (a namespace is a DNS-1123 label, a service account and a node
//! name are DNS-1123 subdomains). Anything else is refused with the rule it broke.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const SCHEME: &str = "spiffe://";
/// The SPIFFE specification's limit on the whole URI.
const MAX_URI_LEN: usize = 2048;
/// The SPIFFE specification's limit on the trust domain.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a mesh SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{0:?} does not start with spiffe://")]
    Scheme(String),
    #[error("SPIFFE ID is {0} bytes long, the limit is 2048")]
    TooLong(usize),
    #[error("trust domain {0:?} is invalid: {1}")]
    TrustDomain(String, &'static str),
    #[error("SPIFFE ID path {0:?} is invalid: {1}")]
    Path(String, &'static str),
    #[error(
        "SPIFFE ID path {0:?} is not /ns/<namespace>/sa/<serviceaccount>, /mesh/node/<node> or /mesh/controller"
    )]
    Shape(String),
    #[error("namespace {0:?} is not a DNS-1123 label: {1}")]
    Namespace(String, &'static str),
    #[error("service account {0:?} is not a DNS-1123 subdomain: {1}")]
    ServiceAccount(String, &'static str),
    #[error("node name {0:?} is not a DNS-1123 subdomain: {1}")]
    Node(String, &'static str),
}

impl IdError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            IdError::Scheme(_) => "scheme",
            IdError::TooLong(_) => "too_long",
            IdError::TrustDomain(..) => "trust_domain",
            IdError::Path(..) => "path",
            IdError::Shape(_) => "shape",
            IdError::Namespace(..) => "namespace",
            IdError::ServiceAccount(..) => "service_account",
            IdError::Node(..) => "node",
        }
    }
}

/// A validated trust domain (`cluster.local`, `example.org`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, IdError> {
        let bad = |why| Err(IdError::TrustDomain(s.to_string(), why));
        if s.is_empty() {
            return bad("it is empty");
        }
        if s.len() > MAX_TRUST_DOMAIN_LEN {
            return bad("it is longer than 255 bytes");
        }
        if s.contains(':') {
            return bad("a port is not allowed");
        }
        if s.contains('@') {
            return bad("user info is not allowed");
        }
        if !s.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        }) {
            return bad("only lowercase letters, digits, '.', '-' and '_' are allowed");
        }
        Ok(TrustDomain(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for TrustDomain {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        TrustDomain::new(s)
    }
}

/// What a SPIFFE ID names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Workload {
        namespace: String,
        service_account: String,
    },
    Node(String),
    Controller,
}

/// A mesh SPIFFE ID. Construct it with [`SpiffeId::workload`], [`SpiffeId::node`],
/// [`SpiffeId::controller`] or by parsing; every value is valid by construction.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    subject: Subject,
}

// === impl SpiffeId ===

impl SpiffeId {
    pub fn workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        dns_label(namespace).map_err(|why| IdError::Namespace(namespace.to_string(), why))?;
        dns_subdomain(service_account)
            .map_err(|why| IdError::ServiceAccount(service_account.to_string(), why))?;
        Ok(SpiffeId {
            trust_domain: td.clone(),
            subject: Subject::Workload {
                namespace: namespace.to_string(),
                service_account: service_account.to_string(),
            },
        })
    }

    pub fn node(td: &TrustDomain, node: &str) -> Result<Self, IdError> {
        dns_subdomain(node).map_err(|why| IdError::Node(node.to_string(), why))?;
        Ok(SpiffeId {
            trust_domain: td.clone(),
            subject: Subject::Node(node.to_string()),
        })
    }

    pub fn controller(td: &TrustDomain) -> Self {
        SpiffeId {
            trust_domain: td.clone(),
            subject: Subject::Controller,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn subject(&self) -> &Subject {
        &self.subject
    }

    /// `(namespace, service account)` of a workload identity.
    pub fn workload_parts(&self) -> Option<(&str, &str)> {
        match &self.subject {
            Subject::Workload {
                namespace,
                service_account,
            } => Some((namespace, service_account)),
            _ => None,
        }
    }

    /// The node name of a node agent identity.
    pub fn node_name(&self) -> Option<&str> {
        match &self.subject {
            Subject::Node(n) => Some(n),
            _ => None,
        }
    }

    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}", self.trust_domain)?;
        match &self.subject {
            Subject::Workload {
                namespace,
                service_account,
            } => write!(f, "/ns/{namespace}/sa/{service_account}"),
            Subject::Node(n) => write!(f, "/mesh/node/{n}"),
            Subject::Controller => f.write_str("/mesh/controller"),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        if s.len() > MAX_URI_LEN {
            return Err(IdError::TooLong(s.len()));
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdError::Scheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let td = TrustDomain::new(td)?;
        let bad_path = |why| IdError::Path(path.to_string(), why);
        if path.is_empty() {
            return Err(bad_path("a mesh identity needs a path"));
        }
        if path.contains('?') || path.contains('#') {
            return Err(bad_path("query and fragment are not allowed"));
        }
        if path.ends_with('/') {
            return Err(bad_path("a trailing '/' is not allowed"));
        }
        let segments: Vec<&str> = path[1..].split('/').collect();
        for seg in &segments {
            if seg.is_empty() {
                return Err(bad_path("empty segments are not allowed"));
            }
            if *seg == "." || *seg == ".." {
                return Err(bad_path("'.' and '..' segments are not allowed"));
            }
            if !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(bad_path(
                    "only letters, digits, '.', '-' and '_' are allowed in a segment",
                ));
            }
        }
        match segments.as_slice() {
            ["ns", namespace, "sa", sa] => SpiffeId::workload(&td, namespace, sa),
            ["mesh", "node", node] => SpiffeId::node(&td, node),
            ["mesh", "controller"] => Ok(SpiffeId::controller(&td)),
            _ => Err(IdError::Shape(path.to_string())),
        }
    }
}

impl Serialize for SpiffeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SpiffeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

// === Certificates ===

/// Why a certificate does not name exactly one mesh identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertIdError {
    #[error("the certificate does not parse: {0}")]
    Parse(String),
    #[error("the certificate must carry exactly one URI SAN, it has {0}")]
    UriSanCount(usize),
    #[error(transparent)]
    Id(#[from] IdError),
}

/// The SPIFFE ID a certificate (DER) names: its single URI SAN. Other SAN types are ignored,
/// as the X.509-SVID specification allows. The chain is not verified here: call it on a
/// certificate a handshake (or the CA) has verified.
pub fn from_certificate(der: &[u8]) -> Result<SpiffeId, CertIdError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| CertIdError::Parse(e.to_string()))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|e| CertIdError::Parse(format!("SAN extension: {e}")))?
        .map(|ext| ext.value.general_names.as_slice())
        .unwrap_or_default();
    let uris: Vec<&str> = names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => Ok(uri.parse()?),
        _ => Err(CertIdError::UriSanCount(uris.len())),
    }
}

// === Kubernetes naming rules ===

/// RFC 1123 label as Kubernetes uses it: at most 63 lowercase alphanumerics or '-', starting
/// and ending with an alphanumeric.
pub fn dns_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 63 {
        return Err("it is longer than 63 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err("it must start and end with a letter or digit");
    }
    Ok(())
}

/// RFC 1123 subdomain as Kubernetes uses it: at most 253 characters, dot-separated labels.
pub fn dns_subdomain(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("it is empty");
    }
    if s.len() > 253 {
        return Err("it is longer than 253 characters");
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Err("it has an empty dot-separated part");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("each part must start and end with a letter or digit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").expect("valid trust domain")
    }

    #[test]
    fn round_trips_every_kind() {
        for s in [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/a-b/sa/build.bot-1",
            "spiffe://example_org/mesh/node/node-1.zone-a",
            "spiffe://td/mesh/controller",
        ] {
            let id: SpiffeId = s.parse().expect(s);
            assert_eq!(id.to_string(), s);
        }
        let w = SpiffeId::workload(&td(), "prod", "api").expect("valid workload");
        assert_eq!(w.workload_parts(), Some(("prod", "api")));
        assert_eq!(w.node_name(), None);
        let n = SpiffeId::node(&td(), "n1").expect("valid node");
        assert_eq!(n.node_name(), Some("n1"));
        assert_eq!(n.uri(), "spiffe://cluster.local/mesh/node/n1");
    }

    #[test]
    fn refuses_malformed_ids() {
        let cases: &[(&str, &str)] = &[
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("spiffe://Cluster.local/ns/a/sa/b", "trust_domain"),
            ("spiffe:///ns/a/sa/b", "trust_domain"),
            ("spiffe://td:8080/ns/a/sa/b", "trust_domain"),
            ("spiffe://u@td/ns/a/sa/b", "trust_domain"),
            ("spiffe://td", "path"),
            ("spiffe://td/", "path"),
            ("spiffe://td/ns/a/sa/b/", "path"),
            ("spiffe://td/ns//sa/b", "path"),
            ("spiffe://td/ns/./sa/b", "path"),
            ("spiffe://td/ns/../sa/b", "path"),
            ("spiffe://td/ns/a/sa/b?x=1", "path"),
            ("spiffe://td/ns/a/sa/b#f", "path"),
            ("spiffe://td/ns/a/sa/b%20", "path"),
            ("spiffe://td/ns/a/sa", "shape"),
            ("spiffe://td/ns/a/sa/b/extra", "shape"),
            ("spiffe://td/namespace/a/sa/b", "shape"),
            ("spiffe://td/mesh/node", "shape"),
            ("spiffe://td/ns/A/sa/b", "namespace"),
            ("spiffe://td/ns/-a/sa/b", "namespace"),
            ("spiffe://td/ns/a.b/sa/b", "namespace"),
            ("spiffe://td/ns/a/sa/B", "service_account"),
            ("spiffe://td/ns/a/sa/b_c", "service_account"),
            ("spiffe://td/ns/a/sa/b..c", "service_account"),
            ("spiffe://td/ns/a/sa/.b", "service_account"),
            ("spiffe://td/mesh/node/Node1", "node"),
        ];
        for (s, kind) in cases {
            let err = s.parse::<SpiffeId>().expect_err(s);
            assert_eq!(err.kind(), *kind, "{s}: {err}");
        }
        let long_ns = "a".repeat(64);
        let err = SpiffeId::workload(&td(), &long_ns, "sa").expect_err("64-char namespace");
        assert_eq!(err.kind(), "namespace");
        let long = format!("spiffe://td/ns/a/sa/{}", "b".repeat(2048));
        assert_eq!(
            long.parse::<SpiffeId>().expect_err("long").kind(),
            "too_long"
        );
        assert_eq!(
            TrustDomain::new(&"a".repeat(256))
                .expect_err("long td")
                .kind(),
            "trust_domain"
        );
    }

    #[test]
    fn serde_uses_the_uri_and_validates() {
        let id = SpiffeId::workload(&td(), "ns1", "sa1").expect("valid");
        let json = serde_json::to_string(&id).expect("serialize");
        assert_eq!(json, "\"spiffe://cluster.local/ns/ns1/sa/sa1\"");
        let back: SpiffeId = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, id);
        assert!(serde_json::from_str::<SpiffeId>("\"spiffe://td/ns/a\"").is_err());
    }
}
