//! Compiled Gateway API routes for the mesh (GAMMA): HTTPRoutes and GRPCRoutes attached to
//! Services, as the controller compiles them into a [`NodeSnapshot`] and
//! [`Resolver::route_request`] applies them per request.
//!
//! A GRPCRoute is compiled into the same model as an HTTPRoute: its method matches become
//! matches on the HTTP/2 path `/<service>/<method>`. What the documents may say, and what the
//! mesh refuses, is in [`crate::gateway`].
//!
//! [`NodeSnapshot`]: crate::model::NodeSnapshot
//! [`Resolver::route_request`]: crate::resolve::Resolver::route_request

use std::cmp::Reverse;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::meta::NamespacedName;
use crate::policy::{AnchoredRegex, Request};

/// Which Gateway API kind a route was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RouteKind {
    #[serde(rename = "HTTPRoute")]
    Http,
    #[serde(rename = "GRPCRoute")]
    Grpc,
}

impl RouteKind {
    /// The Kubernetes `kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

impl fmt::Display for RouteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A compiled HTTPRoute or GRPCRoute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub name: NamespacedName,
    pub kind: RouteKind,
    /// The Services the route is attached to (its `parentRefs` of kind Service).
    pub parents: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
}

/// A Service a route is attached to; `port` restricts it to that service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub service: NamespacedName,
    pub port: Option<u16>,
}

/// One rule: requests matching any of `matches` go to one of `backends`, by weight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteRule {
    /// Alternatives (OR). Never empty once compiled: a rule without matches has one match
    /// that matches every request.
    pub matches: Vec<RequestMatch>,
    pub backends: Vec<RouteBackend>,
    /// The RequestHeaderModifier filter, empty when the rule has none.
    #[serde(default)]
    pub request_headers: HeaderModifier,
    /// `timeouts.request`; `None` when unset or `0s` (no timeout).
    #[serde(default)]
    pub timeout: Option<Duration>,
}

/// One match; all its conditions hold (AND).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestMatch {
    /// `None` matches every path (a GRPCRoute match without a method).
    pub path: Option<PathMatch>,
    /// The exact method, e.g. `GET`; `None` is any method.
    pub method: Option<String>,
    pub headers: Vec<HeaderValueMatch>,
}

/// A path condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole path segments: `/foo` matches `/foo`, `/foo/` and `/foo/bar`, not `/foobar`. A
    /// trailing `/` in the prefix is ignored; `/` matches every path.
    Prefix(String),
    /// A regular expression matching the whole path.
    Regex(AnchoredRegex),
}

/// A header condition: the header (name lower case) is present and its value matches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderValueMatch {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum ValueMatch {
    Exact(String),
    /// A regular expression matching the whole value.
    Regex(AnchoredRegex),
}

/// A weighted backend Service. `port` is the backend service port; `None` means the port
/// number the request was addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteBackend {
    pub service: NamespacedName,
    pub port: Option<u16>,
    pub weight: u32,
}

/// Request headers changes from an HTTPRoute RequestHeaderModifier filter.
///
/// Header names are lower case. The proxy applies them in order: `set` (replace every value),
/// `add` (append a value), `remove`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeaderModifier {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

// === impl HeaderModifier ===

impl HeaderModifier {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }
}

// === impl RequestMatch ===

impl RequestMatch {
    /// A match with no condition: every request.
    pub fn any() -> Self {
        RequestMatch {
            path: None,
            method: None,
            headers: Vec::new(),
        }
    }

    /// Whether the request meets every condition: the path, the method (exact) and every
    /// header (present, value matching).
    pub fn matches(&self, request: &Request<'_>) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(request.path))
            && self.method.as_deref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|h| {
                request
                    .headers
                    .header(&h.name)
                    .is_some_and(|v| h.value.matches(v))
            })
    }

    /// The Gateway API precedence of the match among all the matches attached to a service:
    /// smaller sorts first. Exact path, then the longest prefix, then a regex, then no path;
    /// then a method match; then more header matches. Ties are the caller's (route order,
    /// rule index, match index).
    pub fn precedence(&self) -> Precedence {
        let (rank, len) = match &self.path {
            Some(PathMatch::Exact(p)) => (0u8, p.len()),
            Some(PathMatch::Prefix(p)) => (1, p.trim_end_matches('/').len()),
            Some(PathMatch::Regex(_)) => (2, 0),
            None => (3, 0),
        };
        Precedence(
            rank,
            Reverse(len),
            self.method.is_none(),
            Reverse(self.headers.len()),
        )
    }
}

/// The order of [`RequestMatch::precedence`]: smaller wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Precedence(u8, Reverse<usize>, bool, Reverse<usize>);

// === impl PathMatch ===

impl PathMatch {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => path == p,
            PathMatch::Prefix(p) => {
                let p = p.trim_end_matches('/');
                match path.strip_prefix(p) {
                    Some(rest) => rest.is_empty() || rest.starts_with('/'),
                    None => false,
                }
            }
            PathMatch::Regex(r) => r.is_match(path),
        }
    }
}

// === impl ValueMatch ===

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => value == v,
            ValueMatch::Regex(r) => r.is_match(value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::HeaderLookup;

    fn req<'a>(method: &'a str, path: &'a str, headers: &'a dyn HeaderLookup) -> Request<'a> {
        Request {
            method,
            path,
            headers,
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let p = PathMatch::Prefix("/api/".into());
        assert!(p.matches("/api"));
        assert!(p.matches("/api/"));
        assert!(p.matches("/api/v1"));
        assert!(!p.matches("/apis"));
        assert!(!p.matches("/"));
        let root = PathMatch::Prefix("/".into());
        assert!(root.matches("/"));
        assert!(root.matches("/anything/at/all"));
    }

    #[test]
    fn every_condition_must_hold() {
        let m = RequestMatch {
            path: Some(PathMatch::Exact("/a".into())),
            method: Some("GET".into()),
            headers: vec![HeaderValueMatch {
                name: "x-v".into(),
                value: ValueMatch::Regex(AnchoredRegex::new("[0-9]+").expect("regex")),
            }],
        };
        assert!(m.matches(&req("GET", "/a", &[("X-V", "12")])));
        assert!(!m.matches(&req("GET", "/a", &[("x-v", "12a")])));
        assert!(!m.matches(&req("GET", "/a", &[] as &[(&str, &str); 0])));
        assert!(!m.matches(&req("POST", "/a", &[("x-v", "1")])));
        assert!(!m.matches(&req("GET", "/a/", &[("x-v", "1")])));
        assert!(RequestMatch::any().matches(&req("DELETE", "/x", &[] as &[(&str, &str); 0])));
    }
}
