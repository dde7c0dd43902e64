//! The policy compiler: from the [`Index`] to one [`NodeSnapshot`] per node.
//!
//! A node's snapshot holds its workloads (meshed pods), every service of the cluster with a
//! cluster IP or endpoints (what its pods may call), the inbound policy of each of its
//! workloads, and every TrafficSplit, HTTPRoute and GRPCRoute whose references resolve. The output is deterministic:
//! two compiles of the same index compare equal.
//!
//! TrafficTarget semantics (SMI access v1alpha2/v1alpha3):
//!
//! - A TrafficTarget applies to the pods running as its destination service account.
//! - With HTTPRouteGroup rules, each becomes an HTTP rule (its named matches, or all of them
//!   when `matches` is omitted); TCPRoutes in the same TrafficTarget then only select the
//!   ports those HTTP routes apply to, as in the SMI example where a TCPRoute on 8080 and an
//!   HTTPRouteGroup `metrics` match allow `GET /metrics` on 8080 and nothing else.
//! - With only TCPRoute rules, each allows whole connections to its `matches.ports` (none
//!   listed: every port).
//! - v1alpha2 `destination.port` restricts every rule to that port.
//! - UDPRoute rules allow nothing (the mesh carries TCP only).
//! - Ports are the destination pod's ports, as the inbound proxy sees them.
//!
//! Unresolvable references (a missing HTTPRouteGroup, TCPRoute or match name; a split's
//! missing service; a route's missing parent or backend Service, or a port it lacks) make that
//! whole resource ineffective: the services it would have routed keep their previous routing; [`crate::index::Index::revalidate`]
//! records the reason as a rejection, and everything else still compiles.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, PoisonError};

use k8s_openapi::api::core::v1::{Pod, Service as KubeService};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_core::gateway::GatewayRoute;
use mesh_core::identity::{SpiffeId, TrustDomain};
use mesh_core::model::{
    Endpoint, NamespacedName, NodeSnapshot, Protocol, Service, ServicePort, SplitBackend,
    TrafficSplit,
};
use mesh_core::policy::{HttpMatch, InboundPolicy, RouteMatch, Rule, TrafficPolicyMode};
use mesh_core::route::Route;
use mesh_core::smi::{self, RuleKind};

use crate::index::{Index, pod_ipv4s, pod_is_ready, pod_is_terminated, pod_node};

/// What the compiler needs beyond the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    pub trust_domain: TrustDomain,
    pub traffic_policy: TrafficPolicyMode,
    /// Service CIDRs the agents capture besides those of ServiceCIDR objects.
    pub service_cidrs: Vec<String>,
}

/// The snapshot of one node. `trust_bundle` is left empty: the caller fills it.
pub fn compile_node(index: &Index, opts: &CompileOptions, node: &str) -> NodeSnapshot {
    let shared = shared(index, &opts.trust_domain);
    node_snapshot(index, opts, node, &shared, &mut BTreeMap::new())
}

/// The snapshots of every node with meshed pods.
pub fn compile_all(index: &Index, opts: &CompileOptions) -> BTreeMap<String, NodeSnapshot> {
    let shared = shared(index, &opts.trust_domain);
    let mut rules = BTreeMap::new();
    index
        .nodes()
        .into_iter()
        .map(|node| {
            let snapshot = node_snapshot(index, opts, &node, &shared, &mut rules);
            (node, snapshot)
        })
        .collect()
}

// === Shared by every node ===

/// What every node's snapshot shares, computed once per index revision.
#[derive(Debug)]
pub(crate) struct Cache {
    revision: u64,
    trust_domain: TrustDomain,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    services: Arc<BTreeMap<NamespacedName, Arc<Service>>>,
    splits: Arc<BTreeMap<NamespacedName, TrafficSplit>>,
    http_routes: Arc<BTreeMap<NamespacedName, Route>>,
    grpc_routes: Arc<BTreeMap<NamespacedName, Route>>,
}

fn shared(index: &Index, td: &TrustDomain) -> Arc<Shared> {
    let mut cache = index
        .compile_cache
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(c) = cache.as_ref()
        && c.revision == index.revision()
        && c.trust_domain == *td
    {
        return c.shared.clone();
    }
    // Unchanged services keep the previous revision's `Arc`, so that the per-node diffs the
    // server computes after a change compare pointers, not services.
    let previous = cache
        .as_ref()
        .filter(|c| c.trust_domain == *td)
        .map(|c| c.shared.services.clone());
    let shared = Arc::new(Shared {
        services: Arc::new(
            index
                .services()
                .filter_map(|(name, svc)| {
                    let compiled = compile_service(index, td, name, svc)?;
                    let kept = previous
                        .as_ref()
                        .and_then(|p| p.get(name))
                        .filter(|old| ***old == compiled)
                        .cloned();
                    Some((name.clone(), kept.unwrap_or_else(|| Arc::new(compiled))))
                })
                .collect(),
        ),
        splits: Arc::new(
            index
                .traffic_splits()
                .filter_map(|(name, split)| {
                    resolve_traffic_split(index, split)
                        .ok()
                        .map(|s| (name.clone(), s))
                })
                .collect(),
        ),
        http_routes: Arc::new(routes(index, index.http_routes())),
        grpc_routes: Arc::new(routes(index, index.grpc_routes())),
    });
    *cache = Some(Cache {
        revision: index.revision(),
        trust_domain: td.clone(),
        shared: shared.clone(),
    });
    shared
}

// === Nodes and policies ===

fn node_snapshot(
    index: &Index,
    opts: &CompileOptions,
    node: &str,
    shared: &Shared,
    rules: &mut BTreeMap<NamespacedName, Vec<Rule>>,
) -> NodeSnapshot {
    let td = &opts.trust_domain;
    let mut snapshot = NodeSnapshot {
        node: node.to_string(),
        services: shared.services.clone(),
        splits: shared.splits.clone(),
        http_routes: shared.http_routes.clone(),
        grpc_routes: shared.grpc_routes.clone(),
        capture: index.capture_cidrs(&opts.service_cidrs),
        ..NodeSnapshot::default()
    };
    for (name, _) in index.pods_on_node(node) {
        if let Some(pod) = index.node_pod(name, td) {
            snapshot.node_pods.insert(name.clone(), pod);
        }
        let Some(workload) = index.workload(name, td) else {
            continue;
        };
        let destination = NamespacedName::new(&name.namespace, &workload.service_account);
        let rules = rules
            .entry(destination)
            .or_insert_with_key(|destination| rules_for(index, td, destination))
            .clone();
        let policy = InboundPolicy {
            workload: name.clone(),
            identity: workload.identity.clone(),
            mode: opts.traffic_policy,
            tls_mode: workload.mode,
            rules,
        };
        snapshot.policies.insert(name.clone(), policy);
        snapshot.workloads.insert(name.clone(), workload);
    }
    snapshot
}

/// The rules of every TrafficTarget whose destination is the service account `destination`.
fn rules_for(index: &Index, td: &TrustDomain, destination: &NamespacedName) -> Vec<Rule> {
    let mut rules = Vec::new();
    for (name, tt) in index.traffic_targets_for(destination) {
        let Ok(resolved) = resolve_traffic_target(index, tt) else {
            continue;
        };
        let sources: BTreeSet<SpiffeId> = tt
            .spec
            .sources
            .iter()
            .filter_map(|s| {
                let (namespace, service_account) = tt.subject_parts(s);
                SpiffeId::workload(td, namespace, service_account).ok()
            })
            .collect();
        let sources: Vec<SpiffeId> = sources.into_iter().collect();
        rules.extend(resolved.into_iter().map(|r| Rule {
            traffic_target: name.clone(),
            sources: sources.clone(),
            ports: r.ports,
            route: r.route,
        }));
    }
    rules
}

/// A TrafficTarget rule with its references resolved, before identities are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ResolvedRule {
    /// Empty means every port.
    pub ports: Vec<u16>,
    pub route: RouteMatch,
}

/// A port set: `None` is every port.
type Ports = Option<BTreeSet<u16>>;

fn intersect(a: &Ports, b: &Ports) -> Ports {
    match (a, b) {
        (None, p) | (p, None) => p.clone(),
        (Some(a), Some(b)) => Some(a.intersection(b).copied().collect()),
    }
}

/// Whether a TrafficTarget's references resolve (the lookups of [`resolve_traffic_target`],
/// without building anything). `Err` names the first that does not.
pub(crate) fn check_traffic_target(index: &Index, tt: &smi::TrafficTarget) -> Result<(), String> {
    let namespace = tt.namespace();
    for (i, rule) in tt.spec.rules.iter().enumerate() {
        let name = NamespacedName::new(namespace, &rule.name);
        let missing = || {
            format!(
                "spec.rules[{i}]: {} {name} does not exist",
                rule.kind.as_str()
            )
        };
        match rule.kind {
            RuleKind::HttpRouteGroup => {
                let group = index.http_route_group(&name).ok_or_else(missing)?;
                for (j, m) in rule.matches.iter().flatten().enumerate() {
                    if group.find(m).is_none() {
                        return Err(no_such_match(i, j, &name, m));
                    }
                }
            }
            RuleKind::TcpRoute => {
                index.tcp_route(&name).ok_or_else(missing)?;
            }
            RuleKind::UdpRoute => {}
        }
    }
    Ok(())
}

fn no_such_match(rule: usize, index: usize, group: &NamespacedName, name: &str) -> String {
    format!(
        "spec.rules[{rule}].matches[{index}]: HTTPRouteGroup {group} has no match named {name:?}"
    )
}

/// Resolves a TrafficTarget's rules against the index (see the module docs for the
/// semantics). `Err` names the first reference that does not resolve.
pub(crate) fn resolve_traffic_target(
    index: &Index,
    tt: &smi::TrafficTarget,
) -> Result<Vec<ResolvedRule>, String> {
    let namespace = tt.namespace();
    let mut http: Vec<Vec<HttpMatch>> = Vec::new();
    let mut tcp: Vec<Ports> = Vec::new();
    for (i, rule) in tt.spec.rules.iter().enumerate() {
        let name = NamespacedName::new(namespace, &rule.name);
        let missing = || {
            format!(
                "spec.rules[{i}]: {} {name} does not exist",
                rule.kind.as_str()
            )
        };
        match rule.kind {
            RuleKind::HttpRouteGroup => {
                let group = index.http_route_group(&name).ok_or_else(missing)?;
                let matches = match &rule.matches {
                    None => group
                        .spec
                        .matches
                        .iter()
                        .map(|m| m.to_http_match())
                        .collect(),
                    Some(names) => names
                        .iter()
                        .enumerate()
                        .map(|(j, m)| {
                            group
                                .find(m)
                                .map(|m| m.to_http_match())
                                .ok_or_else(|| no_such_match(i, j, &name, m))
                        })
                        .collect::<Result<_, _>>()?,
                };
                http.push(matches);
            }
            RuleKind::TcpRoute => {
                let route = index.tcp_route(&name).ok_or_else(missing)?;
                let ports = &route.spec.matches.ports;
                tcp.push((!ports.is_empty()).then(|| ports.iter().copied().collect()));
            }
            RuleKind::UdpRoute => {}
        }
    }
    let destination: Ports = tt.spec.destination.port.map(|p| BTreeSet::from([p]));
    let to_vec = |p: Ports| p.map(|p| p.into_iter().collect()).unwrap_or_default();

    let mut rules = Vec::new();
    if http.is_empty() {
        for ports in &tcp {
            let ports = intersect(&destination, ports);
            if ports.as_ref().is_some_and(BTreeSet::is_empty) {
                continue;
            }
            rules.push(ResolvedRule {
                ports: to_vec(ports),
                route: RouteMatch::Tcp,
            });
        }
    } else {
        // TCPRoutes select the ports of the HTTP rules; any TCPRoute covering every port
        // (or none at all) leaves them on every port.
        let selected: Ports = match tcp.iter().any(Option::is_none) || tcp.is_empty() {
            true => None,
            false => Some(tcp.iter().flatten().flatten().copied().collect()),
        };
        let ports = intersect(&destination, &selected);
        if !ports.as_ref().is_some_and(BTreeSet::is_empty) {
            for matches in http {
                rules.push(ResolvedRule {
                    ports: to_vec(ports.clone()),
                    route: RouteMatch::Http(matches),
                });
            }
        }
    }
    Ok(rules)
}

// === Splits ===

/// Resolves a TrafficSplit: its root service, backends and HTTPRouteGroups must exist. A
/// backend of weight 0 whose service does not exist yet is left out (the SMI canary workflow
/// creates the split before the new service).
pub(crate) fn resolve_traffic_split(
    index: &Index,
    split: &smi::TrafficSplit,
) -> Result<TrafficSplit, String> {
    let namespace = split.metadata.namespace();
    let root = split.root();
    if index.service(&root).is_none() {
        return Err(format!("spec.service: Service {root} does not exist"));
    }
    let mut backends = Vec::new();
    for (i, b) in split.spec.backends.iter().enumerate() {
        let service = NamespacedName::new(namespace, &b.service);
        if index.service(&service).is_none() {
            if b.weight == 0 {
                continue;
            }
            return Err(format!(
                "spec.backends[{i}].service: Service {service} does not exist"
            ));
        }
        backends.push(SplitBackend {
            service,
            weight: b.weight,
        });
    }
    let mut matches = Vec::new();
    for (i, m) in split.spec.matches.iter().enumerate() {
        let name = NamespacedName::new(namespace, &m.name);
        let group = index
            .http_route_group(&name)
            .ok_or_else(|| format!("spec.matches[{i}]: HTTPRouteGroup {name} does not exist"))?;
        matches.extend(group.spec.matches.iter().map(|m| m.to_http_match()));
    }
    Ok(TrafficSplit {
        name: split.metadata.namespaced_name(),
        root,
        backends,
        matches,
    })
}

// === Routes ===

/// The routes whose references resolve.
fn routes<'a>(
    index: &Index,
    routes: impl Iterator<Item = (&'a NamespacedName, &'a GatewayRoute)>,
) -> BTreeMap<NamespacedName, Route> {
    routes
        .filter_map(|(name, r)| Some((name.clone(), resolve_route(index, r).ok()?)))
        .collect()
}

/// Resolves an HTTPRoute or GRPCRoute: its parent Services must exist (with the parentRef's
/// port, when it names one), and so must its backends and their ports. A backend of weight 0
/// whose Service does not exist yet is left out, as for TrafficSplits.
pub(crate) fn resolve_route(index: &Index, route: &GatewayRoute) -> Result<Route, String> {
    let ports = |name: &NamespacedName| -> Option<Vec<u16>> {
        let svc = index.service(name)?;
        Some(
            svc.spec
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .filter_map(|p| u16::try_from(p.port).ok())
                .collect(),
        )
    };
    let mut compiled = route.route.clone();
    for parent in &compiled.parents {
        let Some(have) = ports(&parent.service) else {
            return Err(format!(
                "spec.parentRefs: Service {} does not exist",
                parent.service
            ));
        };
        if let Some(port) = parent.port.filter(|p| !have.contains(p)) {
            return Err(format!(
                "spec.parentRefs: Service {} has no port {port}",
                parent.service
            ));
        }
    }
    for (i, rule) in compiled.rules.iter_mut().enumerate() {
        let mut kept = Vec::with_capacity(rule.backends.len());
        for (j, b) in rule.backends.drain(..).enumerate() {
            let path = format!("spec.rules[{i}].backendRefs[{j}]");
            match ports(&b.service) {
                None if b.weight == 0 => continue,
                None => return Err(format!("{path}: Service {} does not exist", b.service)),
                Some(have) => {
                    if let Some(port) = b.port.filter(|p| !have.contains(p)) {
                        return Err(format!(
                            "{path}.port: Service {} has no port {port}",
                            b.service
                        ));
                    }
                }
            }
            kept.push(b);
        }
        rule.backends = kept;
    }
    Ok(compiled)
}

// === Services ===

/// A Service as the mesh sees it: its cluster IP, TCP ports and endpoints (from its
/// EndpointSlices, or from the pods its selector matches when it has none). `None` for
/// ExternalName services and services with neither a cluster IP nor endpoints.
fn compile_service(
    index: &Index,
    td: &TrustDomain,
    name: &NamespacedName,
    svc: &KubeService,
) -> Option<Service> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let vip = spec
        .cluster_ip
        .as_deref()
        .and_then(|ip| ip.parse::<Ipv4Addr>().ok());

    let slices: Vec<_> = index.endpoint_slices_for(name).collect();
    let mut endpoints: BTreeMap<Ipv4Addr, Endpoint> = BTreeMap::new();
    let mut add = |e: Endpoint| {
        // The same address in two slices (during a move): keep a ready one.
        match endpoints.get(&e.ip) {
            Some(existing) if existing.ready || !e.ready => {}
            _ => {
                endpoints.insert(e.ip, e);
            }
        }
    };
    let selected: Vec<&Pod>;
    if slices.is_empty() {
        selected = selected_pods(index, name, spec.selector.as_ref());
        for pod in &selected {
            let Some(ip) = pod_ipv4s(pod).first().copied() else {
                continue;
            };
            let pod_name = NamespacedName::new(
                &name.namespace,
                pod.metadata.name.as_deref().unwrap_or_default(),
            );
            let identity = index.workload_identity(&pod_name, td);
            add(Endpoint {
                ip,
                workload: identity.is_some().then_some(pod_name),
                identity,
                node: pod_node(pod).map(str::to_string),
                ready: pod_is_ready(pod),
            });
        }
    } else {
        selected = Vec::new();
        for slice in slices.iter().filter(|s| s.address_type == "IPv4") {
            for ep in &slice.endpoints {
                let pod_name = ep
                    .target_ref
                    .as_ref()
                    // A slice speaks for pods of its own namespace only: a targetRef into
                    // another namespace lends the endpoint no identity.
                    .filter(|r| {
                        r.kind.as_deref() == Some("Pod")
                            && r.namespace.as_deref().is_none_or(|ns| ns == name.namespace)
                    })
                    .and_then(|r| Some(NamespacedName::new(&name.namespace, r.name.as_deref()?)));
                let identity = pod_name
                    .as_ref()
                    .and_then(|p| index.workload_identity(p, td));
                let node = ep.node_name.clone().or_else(|| {
                    pod_name
                        .as_ref()
                        .and_then(|p| index.pod(p))
                        .and_then(pod_node)
                        .map(str::to_string)
                });
                let workload = identity.as_ref().and(pod_name);
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                for ip in ep
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<Ipv4Addr>().ok())
                {
                    add(Endpoint {
                        ip,
                        workload: workload.clone(),
                        identity: identity.clone(),
                        node: node.clone(),
                        ready,
                    });
                }
            }
        }
    }

    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok().filter(|p| *p > 0)?;
            let port_name = p.name.clone().unwrap_or_default();
            // EndpointSlice ports carry the resolved target port under the service port's name.
            let from_slices = slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .find(|sp| sp.name.as_deref().unwrap_or_default() == port_name)
                .and_then(|sp| sp.port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|p| *p > 0);
            let target_port = from_slices
                .or_else(|| match &p.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n > 0),
                    Some(IntOrString::String(named)) => container_port(&selected, named),
                    None => None,
                })
                .unwrap_or(port);
            Some(ServicePort {
                protocol: Protocol::from_service_port(p.app_protocol.as_deref(), p.name.as_deref()),
                name: port_name,
                port,
                target_port,
            })
        })
        .collect();

    if vip.is_none() && endpoints.is_empty() {
        return None;
    }
    Some(Service {
        name: name.clone(),
        vip,
        ports,
        endpoints: endpoints.into_values().collect(),
    })
}

/// The live pods of the service's namespace that its (non-empty) selector matches.
fn selected_pods<'a>(
    index: &'a Index,
    service: &NamespacedName,
    selector: Option<&BTreeMap<String, String>>,
) -> Vec<&'a Pod> {
    let Some(selector) = selector.filter(|s| !s.is_empty()) else {
        return Vec::new();
    };
    index
        .pods_selected(&service.namespace, selector)
        .into_iter()
        .map(|(_, pod)| pod)
        .filter(|pod| !pod_is_terminated(pod))
        .collect()
}

/// A named target port, resolved from the first selected pod declaring it.
fn container_port(pods: &[&Pod], name: &str) -> Option<u16> {
    pods.iter()
        .filter_map(|pod| pod.spec.as_ref())
        .flat_map(|spec| spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
}

#[cfg(test)]
mod tests;
