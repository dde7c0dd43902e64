//! The compiled access policy of one destination workload, and the one decision function the
//! proxy (and `mesh-agent policy check`) calls: [`authorize`].
//!
//! The controller compiles SMI TrafficTargets with their TCPRoutes and HTTPRouteGroups into an
//! [`InboundPolicy`] per meshed pod. Rules are additive: a connection or request is allowed
//! when any rule allows it. With no rule, a meshed destination denies (SMI default deny),
//! unless the traffic policy mode is permissive.

use std::fmt;

use regex::Regex;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::SpiffeId;
use crate::meta::{NamespacedName, TlsMode};

/// SMI traffic policy mode: `DefaultDeny` needs a TrafficTarget for every caller;
/// `Permissive` allows every caller (OSM's permissive traffic policy mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficPolicyMode {
    #[default]
    DefaultDeny,
    Permissive,
}

/// A regular expression that must match the whole value (SMI `pathRegex` and header values
/// are anchored). Keeps the source text for display and the wire.
#[derive(Clone)]
pub struct AnchoredRegex {
    source: String,
    compiled: Regex,
}

/// Why a regular expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid regular expression {source_text:?}: {reason}")]
pub struct RegexError {
    pub source_text: String,
    pub reason: String,
}

// === impl AnchoredRegex ===

impl AnchoredRegex {
    /// Size limit of a compiled expression: a policy document must not be able to make the
    /// proxy allocate without bound.
    const SIZE_LIMIT: usize = 1 << 20;

    pub fn new(source: &str) -> Result<Self, RegexError> {
        let compiled = regex::RegexBuilder::new(&format!("^(?:{source})$"))
            .size_limit(Self::SIZE_LIMIT)
            .build()
            .map_err(|e| RegexError {
                source_text: source.to_string(),
                reason: e.to_string(),
            })?;
        Ok(AnchoredRegex {
            source: source.to_string(),
            compiled,
        })
    }

    pub fn is_match(&self, value: &str) -> bool {
        self.compiled.is_match(value)
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }
}

impl fmt::Debug for AnchoredRegex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.source)
    }
}

impl PartialEq for AnchoredRegex {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for AnchoredRegex {}

impl Serialize for AnchoredRegex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

impl<'de> Deserialize<'de> for AnchoredRegex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        AnchoredRegex::new(&s).map_err(serde::de::Error::custom)
    }
}

/// A header condition: the header (name lowercase) is present and its value matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    pub value: AnchoredRegex,
}

/// One HTTPRouteGroup match. All present conditions must hold (AND); a rule's matches are
/// alternatives (OR).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpMatch {
    /// The match's name in its HTTPRouteGroup.
    pub name: String,
    pub path: Option<AnchoredRegex>,
    /// Upper-case methods; empty means any method (SMI `*`).
    pub methods: Vec<String>,
    pub headers: Vec<HeaderMatch>,
}

/// What a rule allows beyond the source and port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "matches", rename_all = "lowercase")]
pub enum RouteMatch {
    /// A TCPRoute: the whole connection.
    Tcp,
    /// HTTPRouteGroup matches: only requests matching one of them (checked per request; at
    /// connection level the rule admits the connection so requests can be checked).
    Http(Vec<HttpMatch>),
}

/// One compiled TrafficTarget rule for a destination workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    /// The TrafficTarget it came from, named in verdicts.
    pub traffic_target: NamespacedName,
    /// Caller identities allowed by the rule.
    pub sources: Vec<SpiffeId>,
    /// Destination ports the rule covers (TrafficTarget `destination.port`, TCPRoute
    /// `matches.ports`); empty means every port.
    pub ports: Vec<u16>,
    pub route: RouteMatch,
}

/// The compiled inbound policy of one meshed pod.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundPolicy {
    pub workload: NamespacedName,
    pub identity: SpiffeId,
    pub mode: TrafficPolicyMode,
    pub tls_mode: TlsMode,
    pub rules: Vec<Rule>,
}

// === impl HttpMatch ===

impl HttpMatch {
    /// Whether a request satisfies every condition of the match: the path regex (the whole
    /// path), the method (exact, case-sensitive; an empty list is any method) and every header
    /// regex (the header must be present).
    pub fn matches(&self, request: &Request<'_>) -> bool {
        self.path.as_ref().is_none_or(|p| p.is_match(request.path))
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == request.method))
            && self.headers.iter().all(|h| {
                request
                    .headers
                    .header(&h.name)
                    .is_some_and(|v| h.value.is_match(v))
            })
    }
}

// === authorize ===

/// Request headers as the policy reads them.
///
/// A lookup by name, so the proxy can expose hyper's `HeaderMap` without copying it: wrap
/// it in a borrowed newtype in the agent,
///
/// ```text
/// struct Headers<'a>(&'a http::HeaderMap);
/// impl mesh_core::policy::HeaderLookup for Headers<'_> {
///     fn header(&self, name: &str) -> Option<&str> {
///         self.0.get(name)?.to_str().ok()
///     }
/// }
/// ```
///
/// Slices of `(name, value)` pairs implement it too (tests, the debugging commands).
pub trait HeaderLookup {
    /// The value of header `name` (given in lower case); the first value when the header is
    /// repeated; `None` when it is absent or its value is not visible ASCII.
    fn header(&self, name: &str) -> Option<&str>;
}

impl HeaderLookup for [(&str, &str)] {
    fn header(&self, name: &str) -> Option<&str> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

impl<const N: usize> HeaderLookup for [(&str, &str); N] {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl HeaderLookup for Vec<(&str, &str)> {
    fn header(&self, name: &str) -> Option<&str> {
        self.as_slice().header(name)
    }
}

impl<T: HeaderLookup + ?Sized> HeaderLookup for &T {
    fn header(&self, name: &str) -> Option<&str> {
        (**self).header(name)
    }
}

/// One HTTP request, as [`authorize`] sees it.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request path, without the query string.
    pub path: &'a str,
    pub headers: &'a dyn HeaderLookup,
}

impl fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What is being authorized: a connection (with `request: None`) or one request on it.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The caller's verified identity; `None` for plaintext (unauthenticated) callers.
    pub source: Option<&'a SpiffeId>,
    /// The destination port on the workload (the port the application listens on).
    pub port: u16,
    pub request: Option<&'a Request<'a>>,
}

/// Why a connection or request is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Permit<'a> {
    /// The traffic policy mode is permissive: every caller is allowed.
    Permissive,
    /// A TCPRoute rule allows the whole connection, every request on it included.
    Tcp { traffic_target: &'a NamespacedName },
    /// Connection-level check: an HTTPRouteGroup rule admits the connection, and every
    /// request on it must be authorized on its own.
    HttpConnection { traffic_target: &'a NamespacedName },
    /// The request matched the named match of an HTTPRouteGroup rule.
    Http {
        traffic_target: &'a NamespacedName,
        route: &'a str,
    },
}

// === impl Permit ===

impl<'a> Permit<'a> {
    /// The TrafficTarget that allowed, when one did.
    pub fn traffic_target(&self) -> Option<&'a NamespacedName> {
        match self {
            Permit::Permissive => None,
            Permit::Tcp { traffic_target }
            | Permit::HttpConnection { traffic_target }
            | Permit::Http { traffic_target, .. } => Some(traffic_target),
        }
    }

    /// Whether each request on the admitted connection still needs [`authorize`].
    pub fn requires_request_checks(&self) -> bool {
        matches!(self, Permit::HttpConnection { .. })
    }

    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Permit::Permissive => "permissive",
            Permit::Tcp { .. } => "tcp",
            Permit::HttpConnection { .. } => "http_connection",
            Permit::Http { .. } => "http",
        }
    }
}

impl fmt::Display for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Permit::Permissive => f.write_str("allowed: the traffic policy mode is permissive"),
            Permit::Tcp { traffic_target } => {
                write!(f, "allowed by TrafficTarget {traffic_target} (TCP)")
            }
            Permit::HttpConnection { traffic_target } => write!(
                f,
                "connection admitted by TrafficTarget {traffic_target}; each HTTP request is checked"
            ),
            Permit::Http {
                traffic_target,
                route,
            } => write!(
                f,
                "allowed by TrafficTarget {traffic_target}, HTTP match {route:?}"
            ),
        }
    }
}

/// Why a connection or request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Denied<'a> {
    /// A plaintext caller reached a workload in STRICT mode (whatever the traffic policy).
    #[error("plaintext connection to {destination}, which accepts mTLS only (STRICT)")]
    PlaintextInStrictMode { destination: &'a NamespacedName },
    /// A plaintext caller under default-deny: TrafficTargets name identities.
    #[error("unauthenticated (plaintext) caller to {destination}: no TrafficTarget can allow it")]
    Unauthenticated { destination: &'a SpiffeId },
    #[error("no TrafficTarget for source {caller} to {destination}")]
    NoTrafficTarget {
        caller: &'a SpiffeId,
        destination: &'a SpiffeId,
    },
    #[error("port {port} is not covered by any TrafficTarget for source {caller} to {destination}")]
    PortNotCovered {
        caller: &'a SpiffeId,
        destination: &'a SpiffeId,
        port: u16,
    },
    #[error("no HTTP match for {method} {path} from {caller} to {destination} port {port}")]
    NoHttpMatch {
        caller: &'a SpiffeId,
        destination: &'a SpiffeId,
        port: u16,
        method: &'a str,
        path: &'a str,
    },
}

impl Denied<'_> {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Denied::PlaintextInStrictMode { .. } => "plaintext_strict",
            Denied::Unauthenticated { .. } => "unauthenticated",
            Denied::NoTrafficTarget { .. } => "no_traffic_target",
            Denied::PortNotCovered { .. } => "port_not_covered",
            Denied::NoHttpMatch { .. } => "no_http_match",
        }
    }
}

/// The access decision for one connection or request to the workload of `policy`.
///
/// - A plaintext caller (`source: None`) of a STRICT workload is always denied.
/// - `Permissive` traffic policy allows every other caller.
/// - `DefaultDeny` allows an authenticated caller when some rule lists its identity, covers
///   the port (no ports = every port) and matches the traffic: a TCP rule matches the whole
///   connection; an HTTP rule admits a connection-level check (`request: None`) with
///   [`Permit::HttpConnection`], and a request when one of its matches matches. Rules are
///   additive (any rule may allow; a TCP rule wins over an HTTP one). Plaintext callers are
///   denied.
///
/// No allocation: the verdict borrows from the policy and the connection.
pub fn authorize<'a>(policy: &'a InboundPolicy, conn: &Conn<'a>) -> Result<Permit<'a>, Denied<'a>> {
    let Some(caller) = conn.source else {
        if policy.tls_mode == TlsMode::Strict {
            return Err(Denied::PlaintextInStrictMode {
                destination: &policy.workload,
            });
        }
        return match policy.mode {
            TrafficPolicyMode::Permissive => Ok(Permit::Permissive),
            TrafficPolicyMode::DefaultDeny => Err(Denied::Unauthenticated {
                destination: &policy.identity,
            }),
        };
    };
    if policy.mode == TrafficPolicyMode::Permissive {
        return Ok(Permit::Permissive);
    }

    let mut source_listed = false;
    let mut connection_admitted = None;
    for rule in &policy.rules {
        if !rule.sources.contains(caller) {
            continue;
        }
        source_listed = true;
        if !rule.ports.is_empty() && !rule.ports.contains(&conn.port) {
            continue;
        }
        let traffic_target = &rule.traffic_target;
        match (&rule.route, conn.request) {
            (RouteMatch::Tcp, _) => return Ok(Permit::Tcp { traffic_target }),
            (RouteMatch::Http(_), None) => {
                connection_admitted.get_or_insert(Permit::HttpConnection { traffic_target });
            }
            (RouteMatch::Http(matches), Some(request)) => {
                if let Some(m) = matches.iter().find(|m| m.matches(request)) {
                    return Ok(Permit::Http {
                        traffic_target,
                        route: &m.name,
                    });
                }
                // Remember that the port was covered: the denial names the request.
                connection_admitted.get_or_insert(Permit::HttpConnection { traffic_target });
            }
        }
    }

    let destination = &policy.identity;
    match (connection_admitted, conn.request) {
        (Some(permit), None) => Ok(permit),
        (Some(_), Some(request)) => Err(Denied::NoHttpMatch {
            caller,
            destination,
            port: conn.port,
            method: request.method,
            path: request.path,
        }),
        (None, _) if source_listed => Err(Denied::PortNotCovered {
            caller,
            destination,
            port: conn.port,
        }),
        (None, _) => Err(Denied::NoTrafficTarget {
            caller,
            destination,
        }),
    }
}

#[cfg(test)]
mod tests;
