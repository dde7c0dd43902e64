//! Conversions between the wire messages and the mesh-core model.
//!
//! Model -> wire is infallible. Wire -> model validates everything the model guarantees
//! (identities, addresses, ports, regexes) and says which field was wrong: an agent NACKs a
//! configuration it cannot convert and keeps its last good one.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use mesh_core::SpiffeId;
use mesh_core::model::{
    Endpoint, HBONE_PORT, NamespacedName, NodePod, NodeSnapshot, Protocol, Service, ServicePort,
    SplitBackend, TlsMode, TrafficSplit, Workload,
};
use mesh_core::policy::{
    AnchoredRegex, HeaderMatch, HttpMatch, InboundPolicy, RouteMatch, Rule, TrafficPolicyMode,
};
use mesh_core::route::{
    HeaderModifier, HeaderValueMatch, ParentRef, PathMatch, RequestMatch, Route, RouteBackend,
    RouteKind, RouteRule, ValueMatch,
};

use crate::v1;

/// A wire message that does not convert into the model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ConvertError {
    pub field: String,
    pub reason: String,
}

fn err(field: &str, reason: impl std::fmt::Display) -> ConvertError {
    ConvertError {
        field: field.to_string(),
        reason: reason.to_string(),
    }
}

fn id(field: &str, s: &str) -> Result<SpiffeId, ConvertError> {
    s.parse().map_err(|e| err(field, e))
}

fn ip(field: &str, s: &str) -> Result<Ipv4Addr, ConvertError> {
    s.parse()
        .map_err(|_| err(field, format!("{s:?} is not an IPv4 address")))
}

fn port(field: &str, p: u32) -> Result<u16, ConvertError> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| err(field, format!("{p} is not a port")))
}

fn nn(field: &str, n: Option<&v1::NamespacedName>) -> Result<NamespacedName, ConvertError> {
    let n = n.ok_or_else(|| err(field, "missing"))?;
    if n.name.is_empty() {
        return Err(err(field, "empty name"));
    }
    Ok(NamespacedName::new(&n.namespace, &n.name))
}

fn regex(field: &str, s: &str) -> Result<AnchoredRegex, ConvertError> {
    AnchoredRegex::new(s).map_err(|e| err(field, e))
}

// === model -> wire ===

impl From<&NamespacedName> for v1::NamespacedName {
    fn from(n: &NamespacedName) -> Self {
        v1::NamespacedName {
            namespace: n.namespace.clone(),
            name: n.name.clone(),
        }
    }
}

fn tls_mode(m: TlsMode) -> v1::TlsMode {
    match m {
        TlsMode::Strict => v1::TlsMode::Strict,
        TlsMode::Permissive => v1::TlsMode::Permissive,
    }
}

fn protocol(p: Protocol) -> v1::Protocol {
    match p {
        Protocol::Tcp => v1::Protocol::Tcp,
        Protocol::Http => v1::Protocol::Http,
        Protocol::Http2 => v1::Protocol::Http2,
        Protocol::Grpc => v1::Protocol::Grpc,
    }
}

impl From<&Workload> for v1::Workload {
    fn from(w: &Workload) -> Self {
        v1::Workload {
            name: Some((&w.name).into()),
            uid: w.uid.clone(),
            service_account: w.service_account.clone(),
            identity: w.identity.uri(),
            node: w.node.clone(),
            ips: w.ips.iter().map(|i| i.to_string()).collect(),
            mode: tls_mode(w.mode) as i32,
            labels: w.labels.clone().into_iter().collect(),
            cgroup: w.cgroup.clone(),
            netns: w.netns.clone(),
            ports: w.ports.iter().map(|p| u32::from(*p)).collect(),
            excluded_inbound_ports: w
                .excluded_inbound_ports
                .iter()
                .map(|p| u32::from(*p))
                .collect(),
        }
    }
}

impl From<&NodePod> for v1::NodePod {
    fn from(p: &NodePod) -> Self {
        v1::NodePod {
            name: Some((&p.name).into()),
            uid: p.uid.clone(),
            meshed: p.meshed,
            mode: tls_mode(p.mode) as i32,
            ports: p.ports.iter().map(|p| u32::from(*p)).collect(),
            excluded_inbound_ports: p
                .excluded_inbound_ports
                .iter()
                .map(|p| u32::from(*p))
                .collect(),
            probe_ports: p.probe_ports.iter().map(|p| u32::from(*p)).collect(),
        }
    }
}

impl From<&Service> for v1::Service {
    fn from(s: &Service) -> Self {
        v1::Service {
            name: Some((&s.name).into()),
            vip: s.vip.map(|v| v.to_string()),
            ports: s
                .ports
                .iter()
                .map(|p| v1::ServicePort {
                    name: p.name.clone(),
                    port: p.port.into(),
                    target_port: p.target_port.into(),
                    protocol: protocol(p.protocol) as i32,
                })
                .collect(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| v1::Endpoint {
                    ip: e.ip.to_string(),
                    workload: e.workload.as_ref().map(Into::into),
                    identity: e.identity.as_ref().map(SpiffeId::uri),
                    node: e.node.clone(),
                    ready: e.ready,
                })
                .collect(),
        }
    }
}

impl From<&HttpMatch> for v1::HttpMatch {
    fn from(m: &HttpMatch) -> Self {
        v1::HttpMatch {
            name: m.name.clone(),
            path_regex: m.path.as_ref().map(|p| p.as_str().to_string()),
            methods: m.methods.clone(),
            headers: m
                .headers
                .iter()
                .map(|h| v1::HeaderMatch {
                    name: h.name.clone(),
                    value_regex: h.value.as_str().to_string(),
                })
                .collect(),
        }
    }
}

impl From<&TrafficSplit> for v1::TrafficSplit {
    fn from(s: &TrafficSplit) -> Self {
        v1::TrafficSplit {
            name: Some((&s.name).into()),
            root: Some((&s.root).into()),
            backends: s
                .backends
                .iter()
                .map(|b| v1::SplitBackend {
                    service: Some((&b.service).into()),
                    weight: b.weight,
                })
                .collect(),
            matches: s.matches.iter().map(Into::into).collect(),
        }
    }
}

impl From<&InboundPolicy> for v1::InboundPolicy {
    fn from(p: &InboundPolicy) -> Self {
        v1::InboundPolicy {
            workload: Some((&p.workload).into()),
            identity: p.identity.uri(),
            mode: match p.mode {
                TrafficPolicyMode::DefaultDeny => v1::TrafficPolicyMode::DefaultDeny,
                TrafficPolicyMode::Permissive => v1::TrafficPolicyMode::Permissive,
            } as i32,
            tls_mode: tls_mode(p.tls_mode) as i32,
            rules: p
                .rules
                .iter()
                .map(|r| v1::Rule {
                    traffic_target: Some((&r.traffic_target).into()),
                    sources: r.sources.iter().map(SpiffeId::uri).collect(),
                    ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
                    route: Some(match &r.route {
                        RouteMatch::Tcp => v1::rule::Route::Tcp(true),
                        RouteMatch::Http(ms) => v1::rule::Route::Http(v1::HttpMatches {
                            matches: ms.iter().map(Into::into).collect(),
                        }),
                    }),
                })
                .collect(),
        }
    }
}

impl From<&Route> for v1::Route {
    fn from(r: &Route) -> Self {
        let headers = |hs: &[(String, String)]| {
            hs.iter()
                .map(|(name, value)| v1::Header {
                    name: name.clone(),
                    value: value.clone(),
                })
                .collect()
        };
        v1::Route {
            name: Some((&r.name).into()),
            parents: r
                .parents
                .iter()
                .map(|p| v1::ParentRef {
                    service: Some((&p.service).into()),
                    port: p.port.map(u32::from),
                })
                .collect(),
            rules: r
                .rules
                .iter()
                .map(|rule| v1::RouteRule {
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| v1::RequestMatch {
                            path: m.path.as_ref().map(|p| match p {
                                PathMatch::Exact(s) => v1::request_match::Path::Exact(s.clone()),
                                PathMatch::Prefix(s) => v1::request_match::Path::Prefix(s.clone()),
                                PathMatch::Regex(r) => {
                                    v1::request_match::Path::Regex(r.as_str().to_string())
                                }
                            }),
                            method: m.method.clone(),
                            headers: m
                                .headers
                                .iter()
                                .map(|h| v1::HeaderValueMatch {
                                    name: h.name.clone(),
                                    value: Some(match &h.value {
                                        ValueMatch::Exact(s) => {
                                            v1::header_value_match::Value::Exact(s.clone())
                                        }
                                        ValueMatch::Regex(r) => {
                                            v1::header_value_match::Value::Regex(
                                                r.as_str().to_string(),
                                            )
                                        }
                                    }),
                                })
                                .collect(),
                        })
                        .collect(),
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| v1::RouteBackend {
                            service: Some((&b.service).into()),
                            port: b.port.map(u32::from),
                            weight: b.weight,
                        })
                        .collect(),
                    request_headers: Some(v1::HeaderModifier {
                        set: headers(&rule.request_headers.set),
                        add: headers(&rule.request_headers.add),
                        remove: rule.request_headers.remove.clone(),
                    }),
                    timeout_ms: rule
                        .timeout
                        .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
                })
                .collect(),
        }
    }
}

// === wire -> model ===

impl TryFrom<&v1::Workload> for Workload {
    type Error = ConvertError;
    fn try_from(w: &v1::Workload) -> Result<Self, ConvertError> {
        Ok(Workload {
            name: nn("workload.name", w.name.as_ref())?,
            uid: w.uid.clone(),
            service_account: w.service_account.clone(),
            identity: id("workload.identity", &w.identity)?,
            node: w.node.clone(),
            ips: w
                .ips
                .iter()
                .map(|i| ip("workload.ips", i))
                .collect::<Result<_, _>>()?,
            mode: mode("workload.mode", w.mode)?,
            labels: w.labels.clone().into_iter().collect::<BTreeMap<_, _>>(),
            cgroup: w.cgroup.clone(),
            netns: w.netns.clone(),
            ports: ports("workload.ports", &w.ports)?,
            excluded_inbound_ports: excluded_ports(
                "workload.excluded_inbound_ports",
                &w.excluded_inbound_ports,
            )?,
        })
    }
}

/// `a.b.c.d/n` with no bits set past the prefix.
pub fn ipv4_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let bad = || format!("{s:?} is not an IPv4 prefix a.b.c.d/n");
    let (addr, len) = s.split_once('/').ok_or_else(bad)?;
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().ok().filter(|l| *l <= 32).ok_or_else(bad)?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    if u32::from(addr) & !mask != 0 {
        return Err(format!("{s:?} has bits set past its /{len} prefix"));
    }
    Ok((addr, len))
}

fn mode(field: &str, m: i32) -> Result<TlsMode, ConvertError> {
    match v1::TlsMode::try_from(m) {
        Ok(v1::TlsMode::Strict) => Ok(TlsMode::Strict),
        Ok(v1::TlsMode::Permissive) => Ok(TlsMode::Permissive),
        Err(_) => Err(err(field, format!("unknown value {m}"))),
    }
}

/// A pod's declared TCP ports.
fn ports(field: &str, ports: &[u32]) -> Result<Vec<u16>, ConvertError> {
    ports
        .iter()
        .map(|p| match u16::try_from(*p) {
            Ok(port) if port != 0 => Ok(port),
            _ => Err(err(field, format!("{p} is not a TCP port"))),
        })
        .collect()
}

/// Ports excluded from inbound capture: never 15008.
fn excluded_ports(field: &str, ports: &[u32]) -> Result<Vec<u16>, ConvertError> {
    ports
        .iter()
        .map(|p| match u16::try_from(*p) {
            Ok(port) if port != 0 && port != HBONE_PORT => Ok(port),
            _ => Err(err(
                field,
                format!("{p} is not a TCP port other than 15008"),
            )),
        })
        .collect()
}

impl TryFrom<&v1::NodePod> for NodePod {
    type Error = ConvertError;
    fn try_from(p: &v1::NodePod) -> Result<Self, ConvertError> {
        if p.uid.is_empty() {
            return Err(err("node_pod.uid", "missing"));
        }
        Ok(NodePod {
            name: nn("node_pod.name", p.name.as_ref())?,
            uid: p.uid.clone(),
            meshed: p.meshed,
            mode: mode("node_pod.mode", p.mode)?,
            ports: ports("node_pod.ports", &p.ports)?,
            excluded_inbound_ports: excluded_ports(
                "node_pod.excluded_inbound_ports",
                &p.excluded_inbound_ports,
            )?,
            probe_ports: excluded_ports("node_pod.probe_ports", &p.probe_ports)?,
        })
    }
}

impl TryFrom<&v1::Service> for Service {
    type Error = ConvertError;
    fn try_from(s: &v1::Service) -> Result<Self, ConvertError> {
        Ok(Service {
            name: nn("service.name", s.name.as_ref())?,
            vip: s.vip.as_deref().map(|v| ip("service.vip", v)).transpose()?,
            ports: s
                .ports
                .iter()
                .map(|p| {
                    Ok(ServicePort {
                        name: p.name.clone(),
                        port: port("service.ports.port", p.port)?,
                        target_port: port("service.ports.target_port", p.target_port)?,
                        protocol: match v1::Protocol::try_from(p.protocol) {
                            Ok(v1::Protocol::Tcp) => Protocol::Tcp,
                            Ok(v1::Protocol::Http) => Protocol::Http,
                            Ok(v1::Protocol::Http2) => Protocol::Http2,
                            Ok(v1::Protocol::Grpc) => Protocol::Grpc,
                            Err(_) => {
                                return Err(err(
                                    "service.ports.protocol",
                                    format!("unknown value {}", p.protocol),
                                ));
                            }
                        },
                    })
                })
                .collect::<Result<_, _>>()?,
            endpoints: s
                .endpoints
                .iter()
                .map(|e| {
                    Ok(Endpoint {
                        ip: ip("service.endpoints.ip", &e.ip)?,
                        workload: e
                            .workload
                            .as_ref()
                            .map(|w| nn("service.endpoints.workload", Some(w)))
                            .transpose()?,
                        identity: e
                            .identity
                            .as_deref()
                            .map(|i| id("service.endpoints.identity", i))
                            .transpose()?,
                        node: e.node.clone(),
                        ready: e.ready,
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<&v1::HttpMatch> for HttpMatch {
    type Error = ConvertError;
    fn try_from(m: &v1::HttpMatch) -> Result<Self, ConvertError> {
        Ok(HttpMatch {
            name: m.name.clone(),
            path: m
                .path_regex
                .as_deref()
                .map(|p| regex("http_match.path_regex", p))
                .transpose()?,
            methods: m.methods.clone(),
            headers: m
                .headers
                .iter()
                .map(|h| {
                    Ok(HeaderMatch {
                        name: h.name.to_ascii_lowercase(),
                        value: regex("http_match.headers.value_regex", &h.value_regex)?,
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<&v1::TrafficSplit> for TrafficSplit {
    type Error = ConvertError;
    fn try_from(s: &v1::TrafficSplit) -> Result<Self, ConvertError> {
        Ok(TrafficSplit {
            name: nn("split.name", s.name.as_ref())?,
            root: nn("split.root", s.root.as_ref())?,
            backends: s
                .backends
                .iter()
                .map(|b| {
                    Ok(SplitBackend {
                        service: nn("split.backends.service", b.service.as_ref())?,
                        weight: b.weight,
                    })
                })
                .collect::<Result<_, _>>()?,
            matches: s
                .matches
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A route from the wire; `kind` is given by the resource field that carried it.
fn route(r: &v1::Route, kind: RouteKind) -> Result<Route, ConvertError> {
    let header = |h: &v1::Header| -> Result<(String, String), ConvertError> {
        if h.name.is_empty()
            || !h
                .value
                .bytes()
                .all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
        {
            return Err(err(
                "route.rules.request_headers",
                format!(
                    "{:?}: {:?} is not a header the proxy can send",
                    h.name, h.value
                ),
            ));
        }
        Ok((h.name.to_ascii_lowercase(), h.value.clone()))
    };
    Ok(Route {
        name: nn("route.name", r.name.as_ref())?,
        kind,
        parents: r
            .parents
            .iter()
            .map(|p| {
                Ok(ParentRef {
                    service: nn("route.parents.service", p.service.as_ref())?,
                    port: p.port.map(|n| port("route.parents.port", n)).transpose()?,
                })
            })
            .collect::<Result<_, _>>()?,
        rules: r
            .rules
            .iter()
            .map(|rule| {
                let modifier = rule.request_headers.clone().unwrap_or_default();
                Ok(RouteRule {
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| {
                            use v1::request_match::Path;
                            Ok(RequestMatch {
                                path: match &m.path {
                                    None => None,
                                    Some(Path::Exact(s)) => Some(PathMatch::Exact(s.clone())),
                                    Some(Path::Prefix(s)) => Some(PathMatch::Prefix(s.clone())),
                                    Some(Path::Regex(s)) => Some(PathMatch::Regex(regex(
                                        "route.rules.matches.path.regex",
                                        s,
                                    )?)),
                                },
                                method: m.method.clone(),
                                headers: m
                                    .headers
                                    .iter()
                                    .map(|h| {
                                        use v1::header_value_match::Value;
                                        Ok(HeaderValueMatch {
                                            name: h.name.to_ascii_lowercase(),
                                            value: match &h.value {
                                                Some(Value::Exact(s)) => {
                                                    ValueMatch::Exact(s.clone())
                                                }
                                                Some(Value::Regex(s)) => ValueMatch::Regex(regex(
                                                    "route.rules.matches.headers.regex",
                                                    s,
                                                )?),
                                                None => {
                                                    return Err(err(
                                                        "route.rules.matches.headers.value",
                                                        "missing",
                                                    ));
                                                }
                                            },
                                        })
                                    })
                                    .collect::<Result<_, _>>()?,
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| {
                            Ok(RouteBackend {
                                service: nn("route.rules.backends.service", b.service.as_ref())?,
                                port: b
                                    .port
                                    .map(|n| port("route.rules.backends.port", n))
                                    .transpose()?,
                                weight: b.weight,
                            })
                        })
                        .collect::<Result<_, _>>()?,
                    request_headers: HeaderModifier {
                        set: modifier.set.iter().map(header).collect::<Result<_, _>>()?,
                        add: modifier.add.iter().map(header).collect::<Result<_, _>>()?,
                        remove: modifier
                            .remove
                            .iter()
                            .map(|n| n.to_ascii_lowercase())
                            .collect(),
                    },
                    timeout: rule
                        .timeout_ms
                        .filter(|ms| *ms > 0)
                        .map(std::time::Duration::from_millis),
                })
            })
            .collect::<Result<_, _>>()?,
    })
}

impl TryFrom<&v1::InboundPolicy> for InboundPolicy {
    type Error = ConvertError;
    fn try_from(p: &v1::InboundPolicy) -> Result<Self, ConvertError> {
        Ok(InboundPolicy {
            workload: nn("policy.workload", p.workload.as_ref())?,
            identity: id("policy.identity", &p.identity)?,
            mode: match v1::TrafficPolicyMode::try_from(p.mode) {
                Ok(v1::TrafficPolicyMode::DefaultDeny) => TrafficPolicyMode::DefaultDeny,
                Ok(v1::TrafficPolicyMode::Permissive) => TrafficPolicyMode::Permissive,
                Err(_) => return Err(err("policy.mode", format!("unknown value {}", p.mode))),
            },
            tls_mode: match v1::TlsMode::try_from(p.tls_mode) {
                Ok(v1::TlsMode::Strict) => TlsMode::Strict,
                Ok(v1::TlsMode::Permissive) => TlsMode::Permissive,
                Err(_) => {
                    return Err(err(
                        "policy.tls_mode",
                        format!("unknown value {}", p.tls_mode),
                    ));
                }
            },
            rules: p
                .rules
                .iter()
                .map(|r| {
                    Ok(Rule {
                        traffic_target: nn(
                            "policy.rules.traffic_target",
                            r.traffic_target.as_ref(),
                        )?,
                        sources: r
                            .sources
                            .iter()
                            .map(|s| id("policy.rules.sources", s))
                            .collect::<Result<_, _>>()?,
                        ports: r
                            .ports
                            .iter()
                            .map(|p| port("policy.rules.ports", *p))
                            .collect::<Result<_, _>>()?,
                        route: match &r.route {
                            Some(v1::rule::Route::Tcp(_)) => RouteMatch::Tcp,
                            Some(v1::rule::Route::Http(h)) => RouteMatch::Http(
                                h.matches
                                    .iter()
                                    .map(TryInto::try_into)
                                    .collect::<Result<_, _>>()?,
                            ),
                            None => return Err(err("policy.rules.route", "missing")),
                        },
                    })
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

// === snapshots as resources ===

/// The wire key of each kind of resource in a snapshot.
fn key(kind: v1::Kind, n: &NamespacedName) -> v1::ResourceKey {
    v1::ResourceKey {
        kind: kind as i32,
        namespace: n.namespace.clone(),
        name: n.name.clone(),
    }
}

/// The delta that turns `old` into `new`: changed or added resources, and removed keys. With
/// `old = None` it is the full snapshot.
pub fn diff(
    old: Option<&NodeSnapshot>,
    new: &NodeSnapshot,
) -> (Vec<v1::Resource>, Vec<v1::ResourceKey>) {
    use v1::resource::Kind as R;
    let empty = NodeSnapshot::default();
    let old = old.unwrap_or(&empty);
    let mut upserts = Vec::new();
    let mut removals = Vec::new();

    fn section<T: PartialEq>(
        old: &BTreeMap<NamespacedName, T>,
        new: &BTreeMap<NamespacedName, T>,
        kind: v1::Kind,
        wrap: impl Fn(&T) -> v1::resource::Kind,
        upserts: &mut Vec<v1::Resource>,
        removals: &mut Vec<v1::ResourceKey>,
    ) {
        if std::ptr::eq(old, new) {
            return;
        }
        for (k, v) in new {
            if old.get(k) != Some(v) {
                upserts.push(v1::Resource {
                    kind: Some(wrap(v)),
                });
            }
        }
        for k in old.keys().filter(|k| !new.contains_key(k)) {
            removals.push(key(kind, k));
        }
    }

    section(
        &old.workloads,
        &new.workloads,
        v1::Kind::Workload,
        |w| R::Workload(w.into()),
        &mut upserts,
        &mut removals,
    );
    section(
        &old.services,
        &new.services,
        v1::Kind::Service,
        |s| R::Service(s.as_ref().into()),
        &mut upserts,
        &mut removals,
    );
    section(
        &old.policies,
        &new.policies,
        v1::Kind::Policy,
        |p| R::Policy(p.into()),
        &mut upserts,
        &mut removals,
    );
    section(
        &old.splits,
        &new.splits,
        v1::Kind::Split,
        |s| R::Split(s.into()),
        &mut upserts,
        &mut removals,
    );
    section(
        &old.http_routes,
        &new.http_routes,
        v1::Kind::HttpRoute,
        |r| R::HttpRoute(r.into()),
        &mut upserts,
        &mut removals,
    );
    section(
        &old.grpc_routes,
        &new.grpc_routes,
        v1::Kind::GrpcRoute,
        |r| R::GrpcRoute(r.into()),
        &mut upserts,
        &mut removals,
    );
    section(
        &old.node_pods,
        &new.node_pods,
        v1::Kind::NodePod,
        |p| R::NodePod(p.into()),
        &mut upserts,
        &mut removals,
    );
    if old.capture != new.capture {
        upserts.push(v1::Resource {
            kind: Some(R::Capture(v1::Capture {
                cidrs: new.capture.clone(),
            })),
        });
    }
    if old.trust_bundle != new.trust_bundle {
        upserts.push(v1::Resource {
            kind: Some(R::TrustBundle(v1::TrustBundle {
                roots_pem: new.trust_bundle.clone(),
            })),
        });
    }
    (upserts, removals)
}

/// Applies a full snapshot or a delta to `base` (ignored for a full snapshot), giving the new
/// snapshot. Nothing is changed on error: the caller keeps its last good configuration.
pub fn apply(
    base: &NodeSnapshot,
    full: bool,
    upserts: &[v1::Resource],
    removals: &[v1::ResourceKey],
) -> Result<NodeSnapshot, ConvertError> {
    use v1::resource::Kind as R;
    let mut next = if full {
        NodeSnapshot {
            node: base.node.clone(),
            ..NodeSnapshot::default()
        }
    } else {
        base.clone()
    };
    for k in removals {
        let name = NamespacedName::new(&k.namespace, &k.name);
        let removed = match v1::Kind::try_from(k.kind) {
            Ok(v1::Kind::Workload) => next.workloads.remove(&name).is_some(),
            Ok(v1::Kind::Service) => Arc::make_mut(&mut next.services).remove(&name).is_some(),
            Ok(v1::Kind::Policy) => next.policies.remove(&name).is_some(),
            Ok(v1::Kind::Split) => Arc::make_mut(&mut next.splits).remove(&name).is_some(),
            Ok(v1::Kind::HttpRoute) => Arc::make_mut(&mut next.http_routes).remove(&name).is_some(),
            Ok(v1::Kind::GrpcRoute) => Arc::make_mut(&mut next.grpc_routes).remove(&name).is_some(),
            Ok(v1::Kind::NodePod) => next.node_pods.remove(&name).is_some(),
            Ok(v1::Kind::Capture) => {
                return Err(err("removals", "the capture list is replaced, not removed"));
            }
            Ok(v1::Kind::TrustBundle) => {
                return Err(err("removals", "the trust bundle cannot be removed"));
            }
            Ok(v1::Kind::Unspecified) | Err(_) => {
                return Err(err("removals.kind", format!("unknown kind {}", k.kind)));
            }
        };
        if !removed {
            return Err(err(
                "removals",
                format!("{name} is not in the base version"),
            ));
        }
    }
    for r in upserts {
        match &r.kind {
            Some(R::Workload(w)) => {
                let w = Workload::try_from(w)?;
                next.workloads.insert(w.name.clone(), w);
            }
            Some(R::Service(s)) => {
                let s = Service::try_from(s)?;
                Arc::make_mut(&mut next.services).insert(s.name.clone(), Arc::new(s));
            }
            Some(R::Policy(p)) => {
                let p = InboundPolicy::try_from(p)?;
                next.policies.insert(p.workload.clone(), p);
            }
            Some(R::Split(s)) => {
                let s = TrafficSplit::try_from(s)?;
                Arc::make_mut(&mut next.splits).insert(s.name.clone(), s);
            }
            Some(R::HttpRoute(r)) => {
                let r = route(r, RouteKind::Http)?;
                Arc::make_mut(&mut next.http_routes).insert(r.name.clone(), r);
            }
            Some(R::GrpcRoute(r)) => {
                let r = route(r, RouteKind::Grpc)?;
                Arc::make_mut(&mut next.grpc_routes).insert(r.name.clone(), r);
            }
            Some(R::NodePod(p)) => {
                let p = NodePod::try_from(p)?;
                next.node_pods.insert(p.name.clone(), p);
            }
            Some(R::Capture(c)) => {
                for cidr in &c.cidrs {
                    ipv4_cidr(cidr).map_err(|reason| err("capture.cidrs", reason))?;
                }
                next.capture = c.cidrs.clone();
            }
            Some(R::TrustBundle(b)) => {
                if b.roots_pem.is_empty() {
                    return Err(err(
                        "trust_bundle",
                        "an empty trust bundle would refuse every peer",
                    ));
                }
                next.trust_bundle = b.roots_pem.clone();
            }
            None => return Err(err("upserts", "resource without a kind")),
        }
    }
    if full && next.trust_bundle.is_empty() {
        return Err(err(
            "trust_bundle",
            "a full snapshot must carry the trust bundle",
        ));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::identity::TrustDomain;

    fn snapshot() -> NodeSnapshot {
        let td = TrustDomain::new("cluster.local").expect("td");
        let web = SpiffeId::workload(&td, "shop", "web").expect("id");
        let api = SpiffeId::workload(&td, "shop", "api").expect("id");
        let wl = Workload {
            name: NamespacedName::new("shop", "api-0"),
            uid: "u1".into(),
            service_account: "api".into(),
            identity: api.clone(),
            node: "n1".into(),
            ips: vec![Ipv4Addr::new(10, 1, 0, 5)],
            mode: TlsMode::Permissive,
            labels: [("app".to_string(), "api".to_string())].into(),
            cgroup: Some("/mesh/api-0".into()),
            netns: None,
            ports: vec![8080],
            excluded_inbound_ports: vec![9100],
        };
        let svc = Service {
            name: NamespacedName::new("shop", "api"),
            vip: Some(Ipv4Addr::new(10, 96, 0, 10)),
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: Protocol::Http,
            }],
            endpoints: vec![Endpoint {
                ip: Ipv4Addr::new(10, 1, 0, 5),
                workload: Some(wl.name.clone()),
                identity: Some(api.clone()),
                node: Some("n1".into()),
                ready: true,
            }],
        };
        let m = HttpMatch {
            name: "read".into(),
            path: Some(AnchoredRegex::new("/items/.*").expect("regex")),
            methods: vec!["GET".into()],
            headers: vec![HeaderMatch {
                name: "x-user".into(),
                value: AnchoredRegex::new("[a-z]+").expect("regex"),
            }],
        };
        let policy = InboundPolicy {
            workload: wl.name.clone(),
            identity: api,
            mode: TrafficPolicyMode::DefaultDeny,
            tls_mode: TlsMode::Strict,
            rules: vec![
                Rule {
                    traffic_target: NamespacedName::new("shop", "web-to-api"),
                    sources: vec![web.clone()],
                    ports: vec![8080],
                    route: RouteMatch::Http(vec![m.clone()]),
                },
                Rule {
                    traffic_target: NamespacedName::new("shop", "web-tcp"),
                    sources: vec![web],
                    ports: vec![],
                    route: RouteMatch::Tcp,
                },
            ],
        };
        let split = TrafficSplit {
            name: NamespacedName::new("shop", "api-split"),
            root: svc.name.clone(),
            backends: vec![SplitBackend {
                service: NamespacedName::new("shop", "api-v2"),
                weight: 10,
            }],
            matches: vec![m],
        };
        NodeSnapshot {
            node: "n1".into(),
            workloads: [(wl.name.clone(), wl.clone())].into(),
            services: Arc::new([(svc.name.clone(), Arc::new(svc))].into()),
            policies: [(wl.name.clone(), policy)].into(),
            splits: Arc::new([(split.name.clone(), split)].into()),
            http_routes: Arc::new(
                [(route(RouteKind::Http).name.clone(), route(RouteKind::Http))].into(),
            ),
            grpc_routes: Arc::new(
                [(route(RouteKind::Grpc).name.clone(), route(RouteKind::Grpc))].into(),
            ),
            trust_bundle: vec!["-----BEGIN CERTIFICATE-----\n...".into()],
            node_pods: [
                NodePod {
                    name: wl.name.clone(),
                    uid: wl.uid.clone(),
                    meshed: true,
                    mode: TlsMode::Permissive,
                    ports: vec![8080],
                    excluded_inbound_ports: vec![9100],
                    probe_ports: vec![8080, 8081],
                },
                NodePod {
                    name: NamespacedName::new("shop", "batch-0"),
                    uid: "u2".into(),
                    meshed: false,
                    mode: TlsMode::Strict,
                    ports: vec![],
                    excluded_inbound_ports: vec![],
                    probe_ports: vec![],
                },
            ]
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect(),
            capture: vec!["10.244.0.0/16".into(), "10.96.0.0/12".into()],
        }
    }

    /// A route with every field set; the same name for both kinds (they are apart on the wire).
    fn route(kind: RouteKind) -> Route {
        let regex = |s| AnchoredRegex::new(s).expect("regex");
        Route {
            name: NamespacedName::new("shop", "api"),
            kind,
            parents: vec![
                ParentRef {
                    service: NamespacedName::new("shop", "api"),
                    port: Some(80),
                },
                ParentRef {
                    service: NamespacedName::new("shop", "api-admin"),
                    port: None,
                },
            ],
            rules: vec![
                RouteRule {
                    matches: vec![
                        RequestMatch {
                            path: Some(PathMatch::Exact("/health".into())),
                            method: Some("GET".into()),
                            headers: vec![
                                HeaderValueMatch {
                                    name: "x-canary".into(),
                                    value: ValueMatch::Exact("true".into()),
                                },
                                HeaderValueMatch {
                                    name: "x-user".into(),
                                    value: ValueMatch::Regex(regex("beta-.*")),
                                },
                            ],
                        },
                        RequestMatch {
                            path: Some(PathMatch::Prefix("/api".into())),
                            ..RequestMatch::any()
                        },
                        RequestMatch {
                            path: Some(PathMatch::Regex(regex("/v[0-9]+/.*"))),
                            ..RequestMatch::any()
                        },
                    ],
                    backends: vec![
                        RouteBackend {
                            service: NamespacedName::new("shop", "api-v2"),
                            port: Some(8080),
                            weight: 90,
                        },
                        RouteBackend {
                            service: NamespacedName::new("shop", "api"),
                            port: None,
                            weight: 10,
                        },
                    ],
                    request_headers: HeaderModifier {
                        set: vec![("x-env".into(), "canary".into())],
                        add: vec![("x-via".into(), "mesh".into())],
                        remove: vec!["x-debug".into()],
                    },
                    timeout: Some(std::time::Duration::from_millis(1500)),
                },
                RouteRule {
                    matches: vec![RequestMatch::any()],
                    backends: vec![RouteBackend {
                        service: NamespacedName::new("shop", "api"),
                        port: None,
                        weight: 1,
                    }],
                    request_headers: HeaderModifier::default(),
                    timeout: None,
                },
            ],
        }
    }

    #[test]
    fn full_snapshot_round_trips() {
        let snap = snapshot();
        let (upserts, removals) = diff(None, &snap);
        assert!(removals.is_empty());
        assert_eq!(
            upserts.len(),
            10,
            "one resource per object plus the capture list and the bundle"
        );
        let base = NodeSnapshot {
            node: "n1".into(),
            ..NodeSnapshot::default()
        };
        let back = apply(&base, true, &upserts, &removals).expect("applies");
        assert_eq!(back, snap);
    }

    #[test]
    fn delta_carries_only_changes() {
        let old = snapshot();
        let mut new = old.clone();
        let name = NamespacedName::new("shop", "api-0");
        new.workloads.get_mut(&name).expect("workload").ips = vec![Ipv4Addr::new(10, 1, 0, 6)];
        Arc::make_mut(&mut new.splits).clear();
        let (upserts, removals) = diff(Some(&old), &new);
        assert_eq!(upserts.len(), 1);
        assert_eq!(removals.len(), 1);
        assert_eq!(
            apply(&old, false, &upserts, &removals).expect("applies"),
            new
        );
        let (u, r) = diff(Some(&new), &new);
        assert!(u.is_empty() && r.is_empty(), "no change, no delta");

        let mut fewer = new.clone();
        fewer.capture.pop();
        let (upserts, removals) = diff(Some(&new), &fewer);
        assert_eq!(upserts.len(), 1);
        assert!(removals.is_empty());
        assert_eq!(
            apply(&new, false, &upserts, &removals).expect("applies"),
            fewer
        );
    }

    #[test]
    fn routes_travel_apart_by_kind_and_their_deltas_apply() {
        let old = snapshot();
        let mut new = old.clone();
        let name = NamespacedName::new("shop", "api");
        Arc::make_mut(&mut new.grpc_routes).clear();
        Arc::make_mut(&mut new.http_routes)
            .get_mut(&name)
            .expect("route")
            .rules[0]
            .backends[0]
            .weight = 50;
        let (upserts, removals) = diff(Some(&old), &new);
        assert!(matches!(
            upserts.as_slice(),
            [v1::Resource {
                kind: Some(v1::resource::Kind::HttpRoute(_))
            }]
        ));
        assert_eq!(removals.len(), 1);
        assert_eq!(removals[0].kind, v1::Kind::GrpcRoute as i32);
        let back = apply(&old, false, &upserts, &removals).expect("applies");
        assert_eq!(back, new);
        assert_eq!(back.http_routes[&name].kind, RouteKind::Http);

        let (mut upserts, _) = diff(None, &old);
        for u in &mut upserts {
            if let Some(v1::resource::Kind::GrpcRoute(r)) = &mut u.kind {
                r.rules[0].matches[2].path = Some(v1::request_match::Path::Regex("(".into()));
            }
        }
        let e = apply(&old, true, &upserts, &[]).expect_err("bad regex");
        assert_eq!(e.field, "route.rules.matches.path.regex");
    }

    #[test]
    fn bad_messages_are_refused_with_the_field() {
        let snap = snapshot();
        let (mut upserts, removals) = diff(None, &snap);
        for u in &mut upserts {
            if let Some(v1::resource::Kind::Policy(p)) = &mut u.kind
                && let Some(v1::rule::Route::Http(h)) = &mut p.rules[0].route
            {
                h.matches[0].path_regex = Some("(".into());
            }
        }
        let e = apply(&snap, true, &upserts, &removals).expect_err("bad regex");
        assert_eq!(e.field, "http_match.path_regex");

        let bad_ip = v1::Resource {
            kind: Some(v1::resource::Kind::Workload(v1::Workload {
                ips: vec!["10.0.0.300".into()],
                ..(&snap.workloads[&NamespacedName::new("shop", "api-0")]).into()
            })),
        };
        let e = apply(&snap, false, &[bad_ip], &[]).expect_err("bad ip");
        assert_eq!(e.field, "workload.ips");

        let pod = &snap.node_pods[&NamespacedName::new("shop", "api-0")];
        for (bad, field) in [
            (
                v1::NodePod {
                    uid: String::new(),
                    ..pod.into()
                },
                "node_pod.uid",
            ),
            (
                v1::NodePod {
                    excluded_inbound_ports: vec![15008],
                    ..pod.into()
                },
                "node_pod.excluded_inbound_ports",
            ),
            (
                v1::NodePod {
                    ports: vec![70000],
                    ..pod.into()
                },
                "node_pod.ports",
            ),
            (
                v1::NodePod {
                    probe_ports: vec![0],
                    ..pod.into()
                },
                "node_pod.probe_ports",
            ),
        ] {
            let bad = v1::Resource {
                kind: Some(v1::resource::Kind::NodePod(bad)),
            };
            let e = apply(&snap, false, &[bad], &[]).expect_err(field);
            assert_eq!(e.field, field);
        }

        let missing = v1::ResourceKey {
            kind: v1::Kind::Service as i32,
            namespace: "shop".into(),
            name: "nope".into(),
        };
        apply(&snap, false, &[], &[missing]).expect_err("removing what is not there");
        let (upserts, _) = diff(None, &NodeSnapshot::default());
        apply(&NodeSnapshot::default(), true, &upserts, &[]).expect_err("no bundle");

        for bad in [
            "10.96.0.0",
            "10.96.0.1/12",
            "10.96.0.0/33",
            "fd00::/8",
            "x/8",
        ] {
            let capture = v1::Resource {
                kind: Some(v1::resource::Kind::Capture(v1::Capture {
                    cidrs: vec!["10.244.0.0/16".into(), bad.into()],
                })),
            };
            let e = apply(&snap, false, &[capture], &[]).expect_err(bad);
            assert_eq!(e.field, "capture.cidrs", "{bad}");
        }
    }
}
