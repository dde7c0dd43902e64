//! Gateway API routes for the mesh (GAMMA) as the controller reads them, validated and
//! compiled into the [`crate::route`] model.
//!
//! Read: `gateway.networking.k8s.io/v1` HTTPRoute and GRPCRoute.
//!
//! - `spec.parentRefs`: a ref of kind `Service` (group `""` or `core`) attaches the route to
//!   that Service, in the route's namespace; its `port` restricts the route to that service
//!   port. Refs to Gateways are left to gateway controllers (the mesh ignores them); any other
//!   kind is refused, as are Services in another namespace (consumer routes) and
//!   `sectionName` on a Service.
//! - `spec.hostnames` are ignored: a route attached to a Service applies to traffic addressed
//!   to that Service.
//! - `spec.rules[]` (required): `matches` (none: every request; HTTPRoute `path` defaults to
//!   `PathPrefix /`), `filters` (RequestHeaderModifier only), `backendRefs` (required; kind
//!   Service in the route's namespace; `weight` 0..=1000000, default 1, not all 0; `port`
//!   optional: the addressed port number), and for HTTPRoute `timeouts.request`.
//! - HTTPRoute matches: `path` (`Exact`, `PathPrefix`, `RegularExpression`), `method`,
//!   `headers` (`Exact`, `RegularExpression`). GRPCRoute matches: `method` (`service` and/or
//!   `method`, `Exact` or `RegularExpression`), compiled to the HTTP/2 path
//!   `/<service>/<method>`, and `headers`. Regular expressions match the whole value.
//!
//! What the mesh cannot apply is refused with the field path rather than silently dropped:
//! other filters, per-backend filters, `queryParams`, `timeouts.backendRequest`, `retry`,
//! `sessionPersistence`, cross-namespace references. Errors are [`SmiError`]s, the field-path
//! errors of every document the mesh reads, e.g.
//! `spec.rules[0].filters[0].type: "RequestRedirect" is not RequestHeaderModifier (...)`.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::identity::dns_label;
use crate::meta::NamespacedName;
use crate::route::{
    HeaderModifier, HeaderValueMatch, ParentRef, PathMatch, RequestMatch, Route, RouteBackend,
    RouteKind, RouteRule, ValueMatch,
};
use crate::smi::read::{
    array, bad_name, child, field, invalid, is_token_byte, non_empty, object, optional_str,
    port_number, regex, required, required_str, str_at,
};
use crate::smi::{Metadata, SmiError, root_object, type_meta};

pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The versions read, for error messages.
pub const VERSIONS: &str = "gateway.networking.k8s.io/v1";

/// The largest backendRef weight Gateway API allows.
const MAX_WEIGHT: u64 = 1_000_000;

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// An HTTPRoute or GRPCRoute, read and compiled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GatewayRoute {
    pub metadata: Metadata,
    pub route: Route,
}

// === impl GatewayRoute ===

impl GatewayRoute {
    /// Reads an HTTPRoute (`kind: RouteKind::Http`) or GRPCRoute document.
    pub fn from_value(value: &Value, kind: RouteKind) -> Result<Self, SmiError> {
        let root = root_object(value)?;
        let version = type_meta(root, kind.as_str(), GATEWAY_GROUP, VERSIONS)?;
        if version != "v1" {
            return Err(SmiError::ApiVersion {
                kind: kind.as_str(),
                api_version: format!("{GATEWAY_GROUP}/{version}"),
                expected: VERSIONS,
            });
        }
        let metadata = Metadata::parse(root)?;
        let namespace = metadata.namespace().to_string();
        let spec = object(required(root, "", "spec")?, "spec")?;

        let mut parents = Vec::new();
        if let Some(refs) = field(spec, "parentRefs") {
            for (i, r) in array(refs, "spec.parentRefs")?.iter().enumerate() {
                let path = format!("spec.parentRefs[{i}]");
                if let Some(parent) = parent_ref(r, &path, &namespace)? {
                    parents.push(parent);
                }
            }
        }

        let list = array(required(spec, "spec", "rules")?, "spec.rules")?;
        let rules = non_empty(list, "spec.rules")?
            .iter()
            .enumerate()
            .map(|(i, r)| route_rule(r, &format!("spec.rules[{i}]"), kind, &namespace))
            .collect::<Result<_, _>>()?;

        Ok(GatewayRoute {
            route: Route {
                name: metadata.namespaced_name(),
                kind,
                parents,
                rules,
            },
            metadata,
        })
    }
}

/// A Service parentRef; `None` for a Gateway (not the mesh's to serve).
fn parent_ref(v: &Value, path: &str, namespace: &str) -> Result<Option<ParentRef>, SmiError> {
    let obj = object(v, path)?;
    let group = optional_str(obj, path, "group")?.unwrap_or_else(|| GATEWAY_GROUP.to_string());
    let kind = optional_str(obj, path, "kind")?.unwrap_or_else(|| "Gateway".to_string());
    match (group.as_str(), kind.as_str()) {
        ("" | "core", "Service") => {}
        (GATEWAY_GROUP, "Gateway") => return Ok(None),
        _ => {
            let shown = match group.is_empty() {
                true => kind,
                false => format!("{group}/{kind}"),
            };
            return Err(invalid(
                &child(path, "kind"),
                &shown,
                "a Service (group \"\") or a Gateway",
            ));
        }
    }
    let name = required_str(obj, path, "name")?;
    dns_label(&name).map_err(|why| bad_name(&child(path, "name"), &name, why))?;
    same_namespace(
        obj,
        path,
        namespace,
        "routes attached to a Service in another namespace (consumer routes) are not supported",
    )?;
    if field(obj, "sectionName").is_some() {
        return Err(SmiError::Constraint {
            path: child(path, "sectionName"),
            reason: "not supported for a Service; use port",
        });
    }
    let port = match field(obj, "port") {
        Some(p) => Some(port_number(p, &child(path, "port"))?),
        None => None,
    };
    Ok(Some(ParentRef {
        service: NamespacedName::new(namespace, name),
        port,
    }))
}

/// Refuses a `namespace` other than the route's own.
fn same_namespace(
    obj: &Map<String, Value>,
    path: &str,
    namespace: &str,
    reason: &'static str,
) -> Result<(), SmiError> {
    match optional_str(obj, path, "namespace")? {
        Some(ns) if ns != namespace => Err(SmiError::Constraint {
            path: child(path, "namespace"),
            reason,
        }),
        _ => Ok(()),
    }
}

/// Refuses a field the mesh cannot apply.
fn unsupported(
    obj: &Map<String, Value>,
    path: &str,
    name: &str,
    reason: &'static str,
) -> Result<(), SmiError> {
    match field(obj, name) {
        Some(Value::Array(a)) if a.is_empty() => Ok(()),
        Some(_) => Err(SmiError::Constraint {
            path: child(path, name),
            reason,
        }),
        None => Ok(()),
    }
}

fn route_rule(
    v: &Value,
    path: &str,
    kind: RouteKind,
    namespace: &str,
) -> Result<RouteRule, SmiError> {
    let obj = object(v, path)?;
    for name in ["retry", "sessionPersistence"] {
        unsupported(obj, path, name, "not supported by the mesh")?;
    }

    let mut matches = Vec::new();
    if let Some(m) = field(obj, "matches") {
        let mpath = child(path, "matches");
        for (i, m) in array(m, &mpath)?.iter().enumerate() {
            let ipath = format!("{mpath}[{i}]");
            matches.push(match kind {
                RouteKind::Http => http_match(m, &ipath)?,
                RouteKind::Grpc => grpc_match(m, &ipath)?,
            });
        }
    }
    if matches.is_empty() {
        matches.push(match kind {
            RouteKind::Http => RequestMatch {
                path: Some(PathMatch::Prefix("/".to_string())),
                ..RequestMatch::any()
            },
            RouteKind::Grpc => RequestMatch::any(),
        });
    }

    let mut request_headers = None;
    if let Some(f) = field(obj, "filters") {
        let fpath = child(path, "filters");
        for (i, f) in array(f, &fpath)?.iter().enumerate() {
            let ipath = format!("{fpath}[{i}]");
            let modifier = filter(f, &ipath)?;
            if request_headers.replace(modifier).is_some() {
                return Err(SmiError::Constraint {
                    path: ipath,
                    reason: "a rule has at most one RequestHeaderModifier filter",
                });
            }
        }
    }

    let bpath = child(path, "backendRefs");
    let Some(list) = field(obj, "backendRefs") else {
        return Err(SmiError::Missing { path: bpath });
    };
    let list = non_empty(array(list, &bpath)?, &bpath)?;
    let backends = list
        .iter()
        .enumerate()
        .map(|(i, b)| backend_ref(b, &format!("{bpath}[{i}]"), namespace))
        .collect::<Result<Vec<_>, _>>()?;
    if backends.iter().all(|b| b.weight == 0) {
        return Err(SmiError::Constraint {
            path: bpath,
            reason: "every weight is 0, so no backend would receive traffic",
        });
    }

    let mut timeout = None;
    if kind == RouteKind::Http
        && let Some(t) = field(obj, "timeouts")
    {
        let tpath = child(path, "timeouts");
        let t = object(t, &tpath)?;
        unsupported(
            t,
            &tpath,
            "backendRequest",
            "not supported by the mesh; use request",
        )?;
        if let Some(request) = field(t, "request") {
            let rpath = child(&tpath, "request");
            timeout = duration(str_at(request, &rpath)?, &rpath)?;
        }
    }

    Ok(RouteRule {
        matches,
        backends,
        request_headers: request_headers.unwrap_or_default(),
        timeout,
    })
}

fn http_match(v: &Value, path: &str) -> Result<RequestMatch, SmiError> {
    let obj = object(v, path)?;
    unsupported(
        obj,
        path,
        "queryParams",
        "query parameter matches are not supported by the mesh",
    )?;
    let mut path_match = PathMatch::Prefix("/".to_string());
    if let Some(p) = field(obj, "path") {
        let ppath = child(path, "path");
        let p = object(p, &ppath)?;
        let kind = optional_str(p, &ppath, "type")?.unwrap_or_else(|| "PathPrefix".into());
        let value = optional_str(p, &ppath, "value")?.unwrap_or_else(|| "/".into());
        let vpath = child(&ppath, "value");
        path_match = match kind.as_str() {
            "Exact" | "PathPrefix" if !value.starts_with('/') => {
                return Err(invalid(&vpath, &value, "a path starting with /"));
            }
            "Exact" => PathMatch::Exact(value),
            "PathPrefix" => PathMatch::Prefix(value),
            "RegularExpression" => PathMatch::Regex(regex(&value, &vpath)?),
            _ => {
                return Err(invalid(
                    &child(&ppath, "type"),
                    &kind,
                    "Exact, PathPrefix or RegularExpression",
                ));
            }
        };
    }
    let method = match optional_str(obj, path, "method")? {
        Some(m) if !METHODS.contains(&m.as_str()) => {
            return Err(invalid(
                &child(path, "method"),
                &m,
                "an RFC 7231 method in upper case",
            ));
        }
        m => m,
    };
    Ok(RequestMatch {
        path: Some(path_match),
        method,
        headers: header_matches(obj, path)?,
    })
}

fn grpc_match(v: &Value, path: &str) -> Result<RequestMatch, SmiError> {
    let obj = object(v, path)?;
    let mut path_match = None;
    if let Some(m) = field(obj, "method") {
        let mpath = child(path, "method");
        let m = object(m, &mpath)?;
        let kind = optional_str(m, &mpath, "type")?.unwrap_or_else(|| "Exact".into());
        let service = optional_str(m, &mpath, "service")?.filter(|s| !s.is_empty());
        let method = optional_str(m, &mpath, "method")?.filter(|s| !s.is_empty());
        if service.is_none() && method.is_none() {
            return Err(SmiError::Constraint {
                path: mpath,
                reason: "at least one of service and method must be set",
            });
        }
        path_match = Some(match kind.as_str() {
            "Exact" => {
                for (name, value) in [("service", &service), ("method", &method)] {
                    if let Some(v) = value
                        && v.contains('/')
                    {
                        return Err(invalid(&child(&mpath, name), v, "a name without /"));
                    }
                }
                match (service, method) {
                    (Some(s), Some(m)) => PathMatch::Exact(format!("/{s}/{m}")),
                    (Some(s), None) => PathMatch::Prefix(format!("/{s}/")),
                    (None, m) => {
                        let m = m.unwrap_or_default();
                        let re = format!("/[^/]+/{}", regex_escape(&m));
                        PathMatch::Regex(regex(&re, &child(&mpath, "method"))?)
                    }
                }
            }
            "RegularExpression" => {
                // Each part is checked on its own, so an error names the field that has it.
                for (name, value) in [("service", &service), ("method", &method)] {
                    if let Some(v) = value {
                        regex(v, &child(&mpath, name))?;
                    }
                }
                let part = |p: &Option<String>| p.clone().unwrap_or_else(|| "[^/]+".into());
                let re = format!("/(?:{})/(?:{})", part(&service), part(&method));
                PathMatch::Regex(regex(&re, &mpath)?)
            }
            _ => {
                return Err(invalid(
                    &child(&mpath, "type"),
                    &kind,
                    "Exact or RegularExpression",
                ));
            }
        });
    }
    Ok(RequestMatch {
        path: path_match,
        method: None,
        headers: header_matches(obj, path)?,
    })
}

fn regex_escape(s: &str) -> String {
    ::regex::escape(s)
}

fn header_matches(obj: &Map<String, Value>, path: &str) -> Result<Vec<HeaderValueMatch>, SmiError> {
    let Some(h) = field(obj, "headers") else {
        return Ok(Vec::new());
    };
    let hpath = child(path, "headers");
    let mut out: Vec<HeaderValueMatch> = Vec::new();
    for (i, h) in array(h, &hpath)?.iter().enumerate() {
        let ipath = format!("{hpath}[{i}]");
        let h = object(h, &ipath)?;
        let name = header_name(h, &ipath)?;
        let value = required_str(h, &ipath, "value")?;
        let kind = optional_str(h, &ipath, "type")?.unwrap_or_else(|| "Exact".into());
        let value = match kind.as_str() {
            "Exact" => ValueMatch::Exact(value),
            "RegularExpression" => ValueMatch::Regex(regex(&value, &child(&ipath, "value"))?),
            _ => {
                return Err(invalid(
                    &child(&ipath, "type"),
                    &kind,
                    "Exact or RegularExpression",
                ));
            }
        };
        if out.iter().any(|m| m.name == name) {
            return Err(SmiError::Duplicate {
                path: child(&ipath, "name"),
                value: name,
            });
        }
        out.push(HeaderValueMatch { name, value });
    }
    Ok(out)
}

/// A header name, lower case.
fn header_name(obj: &Map<String, Value>, path: &str) -> Result<String, SmiError> {
    let name = required_str(obj, path, "name")?;
    if !name.bytes().all(is_token_byte) {
        return Err(invalid(&child(path, "name"), &name, "an HTTP header name"));
    }
    Ok(name.to_ascii_lowercase())
}

fn filter(v: &Value, path: &str) -> Result<HeaderModifier, SmiError> {
    let obj = object(v, path)?;
    let kind = required_str(obj, path, "type")?;
    if kind != "RequestHeaderModifier" {
        return Err(invalid(
            &child(path, "type"),
            &kind,
            "RequestHeaderModifier (the only filter the mesh applies)",
        ));
    }
    let mpath = child(path, "requestHeaderModifier");
    let m = object(required(obj, path, "requestHeaderModifier")?, &mpath)?;
    let pairs = |name: &str| -> Result<Vec<(String, String)>, SmiError> {
        let Some(list) = field(m, name) else {
            return Ok(Vec::new());
        };
        let lpath = child(&mpath, name);
        let mut out: Vec<(String, String)> = Vec::new();
        for (i, h) in array(list, &lpath)?.iter().enumerate() {
            let ipath = format!("{lpath}[{i}]");
            let h = object(h, &ipath)?;
            let name = header_name(h, &ipath)?;
            let vpath = child(&ipath, "value");
            let value = str_at(required(h, &ipath, "value")?, &vpath)?;
            if !value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
            {
                return Err(invalid(&vpath, value, "visible ASCII, spaces and tabs"));
            }
            out.push((name, value.to_string()));
        }
        Ok(out)
    };
    let set = pairs("set")?;
    let add = pairs("add")?;
    let mut remove = Vec::new();
    if let Some(list) = field(m, "remove") {
        let rpath = child(&mpath, "remove");
        for (i, n) in array(list, &rpath)?.iter().enumerate() {
            let ipath = format!("{rpath}[{i}]");
            let n = str_at(n, &ipath)?;
            if n.is_empty() || !n.bytes().all(is_token_byte) {
                return Err(invalid(&ipath, n, "an HTTP header name"));
            }
            remove.push(n.to_ascii_lowercase());
        }
    }
    Ok(HeaderModifier { set, add, remove })
}

fn backend_ref(v: &Value, path: &str, namespace: &str) -> Result<RouteBackend, SmiError> {
    let obj = object(v, path)?;
    let group = optional_str(obj, path, "group")?.unwrap_or_default();
    let kind = optional_str(obj, path, "kind")?.unwrap_or_else(|| "Service".into());
    if !matches!(group.as_str(), "" | "core") || kind != "Service" {
        let shown = match group.is_empty() {
            true => kind,
            false => format!("{group}/{kind}"),
        };
        return Err(invalid(&child(path, "kind"), &shown, "Service"));
    }
    let name = required_str(obj, path, "name")?;
    dns_label(&name).map_err(|why| bad_name(&child(path, "name"), &name, why))?;
    same_namespace(
        obj,
        path,
        namespace,
        "a backend in another namespace needs a ReferenceGrant, which the mesh does not read",
    )?;
    unsupported(
        obj,
        path,
        "filters",
        "per-backend filters are not supported by the mesh",
    )?;
    let port = match field(obj, "port") {
        Some(p) => Some(port_number(p, &child(path, "port"))?),
        None => None,
    };
    let weight = match field(obj, "weight") {
        None => 1,
        Some(w) => match w.as_u64().filter(|w| *w <= MAX_WEIGHT) {
            // In range, checked above.
            Some(w) => w as u32,
            None => {
                return Err(SmiError::Invalid {
                    path: child(path, "weight"),
                    value: w.to_string(),
                    expected: format!("a whole number from 0 to {MAX_WEIGHT}"),
                });
            }
        },
    };
    Ok(RouteBackend {
        service: NamespacedName::new(namespace, name),
        port,
        weight,
    })
}

/// A Gateway API duration (GEP-2257): one to four `<1-5 digits><h|m|s|ms>` parts, e.g.
/// `500ms`, `10s`, `1m30s`. `0s` is no timeout (`None`).
pub fn duration(s: &str, path: &str) -> Result<Option<Duration>, SmiError> {
    let bad = || {
        invalid(
            path,
            s,
            "a Gateway API duration such as 500ms, 10s or 1m30s",
        )
    };
    let mut rest = s;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if !(1..=5).contains(&digits) {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        // At most 99999 h: no overflow.
        total += unit * u32::try_from(n).map_err(|_| bad())?;
        parts += 1;
    }
    if parts == 0 || parts > 4 {
        return Err(bad());
    }
    Ok((!total.is_zero()).then_some(total))
}

#[cfg(test)]
mod tests;
