//! The controller's index of cluster state: every resource the sources delivered, by key,
//! with the lookups the compiler and the CA need, and the list of rejected resources.
//!
//! Sources write through [`SharedIndex::update`], which re-validates cross-references (a
//! TrafficTarget naming a missing HTTPRouteGroup, a TrafficSplit naming a missing service)
//! and bumps the generation that config streams watch. Readers take [`SharedIndex::read`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use mesh_core::gateway::GatewayRoute;
use mesh_core::identity::{SpiffeId, TrustDomain, dns_label, dns_subdomain};
use mesh_core::model::{HBONE_PORT, NamespacedName, NodePod, TlsMode, Workload};
use mesh_core::smi;
use serde::Serialize;
use tokio::sync::watch;

use crate::resource::{Kind, Resource, ResourceKey};

/// Namespace or pod label: `true` enrolls (a namespace: all its pods); a pod's own `false`
/// opts it out.
pub const ENROLLED_LABEL: &str = "mesh.io/enrolled";
/// Namespace or pod annotation, `strict` or `permissive`; the pod's wins. Default strict.
pub const TLS_MODE_ANNOTATION: &str = "mesh.io/tls-mode";
/// Pod annotations naming the pod's cgroup and network namespace (local mode).
pub const CGROUP_ANNOTATION: &str = "mesh.io/cgroup";
pub const NETNS_ANNOTATION: &str = "mesh.io/netns";
/// Ports of a meshed pod the operator excludes from inbound capture: `"9100,9101"`.
pub const EXCLUDE_INBOUND_PORTS_ANNOTATION: &str = "mesh.io/exclude-inbound-ports";
/// The EndpointSlice label naming its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A resource the controller does not use as written, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Rejection {
    /// Where it came from: a file path, or the source's name.
    pub origin: String,
    /// The resource, when the document named one.
    pub key: Option<ResourceKey>,
    pub reason: String,
}

/// Counts for the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IndexSummary {
    pub revision: u64,
    pub resources: BTreeMap<Kind, usize>,
    pub nodes: BTreeSet<String>,
    pub rejections: usize,
}

/// Everything the sources delivered.
#[derive(Debug, Default)]
pub struct Index {
    namespaces: BTreeMap<String, Namespace>,
    /// Kubernetes Nodes, by name (for their pod CIDRs).
    k8s_nodes: BTreeMap<String, k8s_openapi::api::core::v1::Node>,
    service_cidrs: BTreeMap<String, k8s_openapi::api::networking::v1::ServiceCIDR>,
    service_accounts: BTreeMap<NamespacedName, ServiceAccount>,
    pods: BTreeMap<NamespacedName, Pod>,
    services: BTreeMap<NamespacedName, Service>,
    endpoint_slices: BTreeMap<NamespacedName, EndpointSlice>,
    traffic_targets: BTreeMap<NamespacedName, smi::TrafficTarget>,
    http_route_groups: BTreeMap<NamespacedName, smi::HttpRouteGroup>,
    tcp_routes: BTreeMap<NamespacedName, smi::TcpRoute>,
    traffic_splits: BTreeMap<NamespacedName, smi::TrafficSplit>,
    http_routes: BTreeMap<NamespacedName, GatewayRoute>,
    grpc_routes: BTreeMap<NamespacedName, GatewayRoute>,
    origins: BTreeMap<ResourceKey, String>,

    // Secondary indexes, kept in step by `insert` and `remove`.
    pods_by_node: BTreeMap<String, BTreeSet<NamespacedName>>,
    /// Pods by (namespace, label key, label value), for service selectors.
    pods_by_label: BTreeMap<(String, String, String), BTreeSet<NamespacedName>>,
    slices_by_service: BTreeMap<NamespacedName, BTreeSet<NamespacedName>>,
    /// TrafficTargets by destination service account (namespace/name).
    targets_by_destination: BTreeMap<NamespacedName, BTreeSet<NamespacedName>>,

    /// Rejections the sources recorded, by origin and key.
    source_rejections: BTreeMap<(String, Option<ResourceKey>), String>,
    /// Resources whose references do not resolve; recomputed by `revalidate`.
    invalid: BTreeMap<ResourceKey, String>,
    /// Namespaces whose cross-references `revalidate` must check again.
    dirty_namespaces: BTreeSet<String>,
    /// Problems that do not stop a resource from being used (a bad annotation value).
    warnings: BTreeMap<ResourceKey, String>,
    /// Bumped by every change.
    revision: u64,
    /// The compiler's per-revision cache of what every node shares.
    pub(crate) compile_cache: Mutex<Option<crate::compile::Cache>>,
    /// Whether pods' `mesh.io/cgroup` and `mesh.io/netns` annotations locate them (local
    /// mode, where the description is the operator's). Off for the Kubernetes source: any pod
    /// author could point them at another pod's cgroup.
    locates_pods: bool,
}

// === impl Index ===

impl Index {
    pub fn new() -> Self {
        Index::default()
    }

    /// Lets pod annotations name each pod's cgroup and network namespace (local mode only).
    pub fn set_locates_pods(&mut self, on: bool) {
        self.locates_pods = on;
    }

    /// Adds or replaces a resource. Returns whether the index changed (re-applying an equal
    /// resource from the same origin is a no-op). Clears the origin's rejection of this key.
    pub fn apply(&mut self, origin: &str, resource: Resource) -> bool {
        let key = resource.key();
        let cleared = self.clear_rejection(origin, Some(&key));
        if self.origins.get(&key).is_some_and(|o| o == origin) && self.holds(&key, &resource) {
            return cleared;
        }
        self.remove_object(&key);
        self.insert_object(&key, resource);
        self.origins.insert(key, origin.to_string());
        self.revision += 1;
        true
    }

    /// Removes a resource and the rejections recorded for it. Returns whether it was there.
    pub fn remove(&mut self, key: &ResourceKey) -> bool {
        let before = self.source_rejections.len();
        self.source_rejections
            .retain(|(_, k), _| k.as_ref() != Some(key));
        let cleared = before != self.source_rejections.len();
        let removed = self.remove_object(key);
        self.origins.remove(key);
        if removed || cleared {
            self.revision += 1;
        }
        removed
    }

    /// Records that a document from `origin` was refused; `key` when it named a resource.
    pub fn record_rejection(
        &mut self,
        origin: &str,
        key: Option<ResourceKey>,
        reason: impl Into<String>,
    ) {
        let reason = reason.into();
        let entry = (origin.to_string(), key);
        if self.source_rejections.get(&entry) != Some(&reason) {
            self.source_rejections.insert(entry, reason);
            self.revision += 1;
        }
    }

    /// Forgets one rejection. Returns whether there was one.
    pub fn clear_rejection(&mut self, origin: &str, key: Option<&ResourceKey>) -> bool {
        let removed = self
            .source_rejections
            .remove(&(origin.to_string(), key.cloned()))
            .is_some();
        if removed {
            self.revision += 1;
        }
        removed
    }

    /// Forgets every rejection recorded for `origin`.
    pub fn clear_rejections_from(&mut self, origin: &str) {
        let before = self.source_rejections.len();
        self.source_rejections.retain(|(o, _), _| o != origin);
        if before != self.source_rejections.len() {
            self.revision += 1;
        }
    }

    /// Every rejection: those the sources recorded, resources whose references do not resolve
    /// (as of the last [`Index::revalidate`]) and resource warnings. Sorted.
    pub fn rejections(&self) -> Vec<Rejection> {
        let origin = |key: &ResourceKey| self.origins.get(key).cloned().unwrap_or_default();
        let mut out: Vec<Rejection> = self
            .source_rejections
            .iter()
            .map(|((origin, key), reason)| Rejection {
                origin: origin.clone(),
                key: key.clone(),
                reason: reason.clone(),
            })
            .chain(
                self.invalid
                    .iter()
                    .chain(&self.warnings)
                    .map(|(key, reason)| Rejection {
                        origin: origin(key),
                        key: Some(key.clone()),
                        reason: reason.clone(),
                    }),
            )
            .collect();
        out.sort();
        out
    }

    /// Whether the last [`Index::revalidate`] found unresolved references in the resource.
    pub fn is_rejected(&self, key: &ResourceKey) -> bool {
        self.invalid.contains_key(key)
    }

    /// Re-checks the cross-references (TrafficTargets, TrafficSplits, routes) of the namespaces
    /// changed since the last call (references never leave a namespace), replacing the
    /// previous findings there. [`SharedIndex::update`] calls it.
    pub fn revalidate(&mut self) {
        for namespace in std::mem::take(&mut self.dirty_namespaces) {
            let scope = NamespacedName::new(&namespace, "")..;
            self.invalid.retain(|key, _| key.namespace != namespace);
            for (name, tt) in self.traffic_targets.range(scope.clone()) {
                if name.namespace != namespace {
                    break;
                }
                if let Err(reason) = crate::compile::check_traffic_target(self, tt) {
                    let key = ResourceKey::new(Kind::TrafficTarget, &name.namespace, &name.name);
                    self.invalid.insert(key, reason);
                }
            }
            for (name, split) in self.traffic_splits.range(scope.clone()) {
                if name.namespace != namespace {
                    break;
                }
                if let Err(reason) = crate::compile::resolve_traffic_split(self, split) {
                    let key = ResourceKey::new(Kind::TrafficSplit, &name.namespace, &name.name);
                    self.invalid.insert(key, reason);
                }
            }
            for (kind, routes) in [
                (Kind::HttpRoute, &self.http_routes),
                (Kind::GrpcRoute, &self.grpc_routes),
            ] {
                for (name, route) in routes.range(scope.clone()) {
                    if name.namespace != namespace {
                        break;
                    }
                    if let Err(reason) = crate::compile::resolve_route(self, route) {
                        let key = ResourceKey::new(kind, &name.namespace, &name.name);
                        self.invalid.insert(key, reason);
                    }
                }
            }
        }
    }

    /// Bumped by every change to resources or rejections.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.origins.len()
    }

    pub fn is_empty(&self) -> bool {
        self.origins.is_empty()
    }

    pub fn contains(&self, key: &ResourceKey) -> bool {
        self.origins.contains_key(key)
    }

    /// Where a resource came from.
    pub fn origin(&self, key: &ResourceKey) -> Option<&str> {
        self.origins.get(key).map(String::as_str)
    }

    pub fn keys(&self) -> impl Iterator<Item = &ResourceKey> {
        self.origins.keys()
    }

    /// A copy of the resource under `key`.
    pub fn get(&self, key: &ResourceKey) -> Option<Resource> {
        let nn = || key.namespaced_name();
        Some(match key.kind {
            Kind::Namespace => self.namespaces.get(&key.name)?.clone().into(),
            Kind::ServiceAccount => self.service_accounts.get(&nn())?.clone().into(),
            Kind::Pod => self.pods.get(&nn())?.clone().into(),
            Kind::Service => self.services.get(&nn())?.clone().into(),
            Kind::EndpointSlice => self.endpoint_slices.get(&nn())?.clone().into(),
            Kind::TrafficTarget => self.traffic_targets.get(&nn())?.clone().into(),
            Kind::HttpRouteGroup => self.http_route_groups.get(&nn())?.clone().into(),
            Kind::TcpRoute => self.tcp_routes.get(&nn())?.clone().into(),
            Kind::TrafficSplit => self.traffic_splits.get(&nn())?.clone().into(),
            Kind::HttpRoute => Resource::HttpRoute(self.http_routes.get(&nn())?.clone()),
            Kind::GrpcRoute => Resource::GrpcRoute(self.grpc_routes.get(&nn())?.clone()),
            Kind::Node => Resource::Node(self.k8s_nodes.get(&key.name)?.clone()),
            Kind::ServiceCidr => Resource::ServiceCidr(self.service_cidrs.get(&key.name)?.clone()),
        })
    }

    pub fn summary(&self) -> IndexSummary {
        let mut resources: BTreeMap<Kind, usize> = Kind::ALL.into_iter().map(|k| (k, 0)).collect();
        for key in self.origins.keys() {
            *resources.entry(key.kind).or_default() += 1;
        }
        IndexSummary {
            revision: self.revision,
            resources,
            nodes: self.nodes(),
            rejections: self.rejections().len(),
        }
    }

    // --- typed lookups ---

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name)
    }

    pub fn service_account(&self, name: &NamespacedName) -> Option<&ServiceAccount> {
        self.service_accounts.get(name)
    }

    pub fn pod(&self, name: &NamespacedName) -> Option<&Pod> {
        self.pods.get(name)
    }

    pub fn pods(&self) -> impl Iterator<Item = (&NamespacedName, &Pod)> {
        self.pods.iter()
    }

    /// The pods of one namespace, in name order.
    pub fn pods_in_namespace<'a, 'n>(
        &'a self,
        namespace: &'n str,
    ) -> impl Iterator<Item = (&'a NamespacedName, &'a Pod)> + use<'a, 'n> {
        self.pods
            .range(NamespacedName::new(namespace, "")..)
            .take_while(move |(name, _)| name.namespace == namespace)
    }

    /// The pods of `namespace` whose labels include every pair of `selector`, in name order.
    /// An empty selector selects nothing (as for a Service).
    pub fn pods_selected<'a>(
        &'a self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<(&'a NamespacedName, &'a Pod)> {
        // Candidates from the rarest pair, then the other pairs checked.
        let mut smallest: Option<&BTreeSet<NamespacedName>> = None;
        for (k, v) in selector {
            let entry = (namespace.to_string(), k.clone(), v.clone());
            let Some(set) = self.pods_by_label.get(&entry) else {
                return Vec::new();
            };
            if smallest.is_none_or(|s| set.len() < s.len()) {
                smallest = Some(set);
            }
        }
        smallest
            .into_iter()
            .flatten()
            .filter_map(|name| self.pods.get_key_value(name))
            .filter(|(_, pod)| {
                let labels = pod.metadata.labels.as_ref();
                selector
                    .iter()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
            })
            .collect()
    }

    /// The pods scheduled on `node`, in name order.
    pub fn pods_on_node<'a>(
        &'a self,
        node: &str,
    ) -> impl Iterator<Item = (&'a NamespacedName, &'a Pod)> {
        self.pods_by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|name| self.pods.get_key_value(name))
    }

    pub fn service(&self, name: &NamespacedName) -> Option<&Service> {
        self.services.get(name)
    }

    pub fn services(&self) -> impl Iterator<Item = (&NamespacedName, &Service)> {
        self.services.iter()
    }

    /// The EndpointSlices labelled with the service's name, in name order.
    pub fn endpoint_slices_for<'a>(
        &'a self,
        service: &NamespacedName,
    ) -> impl Iterator<Item = &'a EndpointSlice> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| self.endpoint_slices.get(name))
    }

    pub fn traffic_targets(&self) -> impl Iterator<Item = (&NamespacedName, &smi::TrafficTarget)> {
        self.traffic_targets.iter()
    }

    /// The TrafficTargets whose destination is the service account `namespace/name`.
    pub fn traffic_targets_for<'a>(
        &'a self,
        service_account: &NamespacedName,
    ) -> impl Iterator<Item = (&'a NamespacedName, &'a smi::TrafficTarget)> {
        self.targets_by_destination
            .get(service_account)
            .into_iter()
            .flatten()
            .filter_map(|name| self.traffic_targets.get_key_value(name))
    }

    pub fn http_route_group(&self, name: &NamespacedName) -> Option<&smi::HttpRouteGroup> {
        self.http_route_groups.get(name)
    }

    pub fn tcp_route(&self, name: &NamespacedName) -> Option<&smi::TcpRoute> {
        self.tcp_routes.get(name)
    }

    pub fn traffic_splits(&self) -> impl Iterator<Item = (&NamespacedName, &smi::TrafficSplit)> {
        self.traffic_splits.iter()
    }

    pub fn http_routes(&self) -> impl Iterator<Item = (&NamespacedName, &GatewayRoute)> {
        self.http_routes.iter()
    }

    pub fn grpc_routes(&self) -> impl Iterator<Item = (&NamespacedName, &GatewayRoute)> {
        self.grpc_routes.iter()
    }

    // --- enrollment and workloads ---

    /// Whether the pod is meshed: its namespace or itself carries `mesh.io/enrolled=true`,
    /// and it does not carry `mesh.io/enrolled=false`. Host-network pods are never meshed.
    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return false;
        }
        match label(&pod.metadata.labels, ENROLLED_LABEL) {
            Some("false") => false,
            Some("true") => true,
            _ => pod
                .metadata
                .namespace
                .as_deref()
                .and_then(|ns| self.namespaces.get(ns))
                .is_some_and(|ns| label(&ns.metadata.labels, ENROLLED_LABEL) == Some("true")),
        }
    }

    /// The pod's TLS mode: its own annotation, else its namespace's, else strict.
    pub fn tls_mode(&self, pod: &Pod) -> TlsMode {
        let namespace = pod
            .metadata
            .namespace
            .as_deref()
            .and_then(|ns| self.namespaces.get(ns));
        tls_mode_annotation(&pod.metadata.annotations)
            .or_else(|| namespace.and_then(|ns| tls_mode_annotation(&ns.metadata.annotations)))
            .unwrap_or_default()
    }

    /// The pod as a mesh workload: enrolled, not terminated, scheduled (`spec.nodeName`) with
    /// an IPv4 address, and a valid identity.
    pub fn workload(&self, name: &NamespacedName, td: &TrustDomain) -> Option<Workload> {
        let pod = self.pods.get(name)?;
        if !self.is_enrolled(pod) || pod_is_terminated(pod) {
            return None;
        }
        let node = pod_node(pod)?;
        let ips = pod_ipv4s(pod);
        if ips.is_empty() {
            return None;
        }
        let service_account = pod_service_account(pod);
        let identity = SpiffeId::workload(td, &name.namespace, service_account).ok()?;
        let annotation = |key: &str| pod.metadata.annotations.as_ref()?.get(key).cloned();
        Some(Workload {
            name: name.clone(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: service_account.to_string(),
            identity,
            node: node.to_string(),
            ips,
            mode: self.tls_mode(pod),
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            cgroup: annotation(CGROUP_ANNOTATION).filter(|_| self.locates_pods),
            netns: annotation(NETNS_ANNOTATION).filter(|_| self.locates_pods),
            ports: container_ports(pod),
            // A value that does not parse is a warning on the pod and excludes nothing: the
            // pod stays fully covered rather than opened by a typo.
            excluded_inbound_ports: excluded_inbound_ports(&pod.metadata.annotations)
                .unwrap_or_default(),
        })
    }

    /// What the node agent needs to know of a pod scheduled on its node, meshed or not:
    /// `None` for a pod that is not scheduled, has no UID or has terminated. A meshed pod is
    /// one [`Index::workload_identity`] names, whether or not it has an address yet.
    pub fn node_pod(&self, name: &NamespacedName, td: &TrustDomain) -> Option<NodePod> {
        let pod = self.pods.get(name)?;
        let uid = pod.metadata.uid.clone().filter(|u| !u.is_empty())?;
        if pod_is_terminated(pod) || pod_node(pod).is_none() {
            return None;
        }
        let meshed = self.workload_identity(name, td).is_some();
        Some(NodePod {
            name: name.clone(),
            uid,
            meshed,
            mode: self.tls_mode(pod),
            ports: if meshed { container_ports(pod) } else { vec![] },
            excluded_inbound_ports: if meshed {
                excluded_inbound_ports(&pod.metadata.annotations).unwrap_or_default()
            } else {
                vec![]
            },
            probe_ports: if meshed { probe_ports(pod) } else { vec![] },
        })
    }

    /// The identity of a meshed pod (enrolled, not terminated, scheduled, valid names),
    /// whatever its addresses: what a client must verify at an endpoint.
    pub fn workload_identity(&self, name: &NamespacedName, td: &TrustDomain) -> Option<SpiffeId> {
        let pod = self.pods.get(name)?;
        if !self.is_enrolled(pod) || pod_is_terminated(pod) || pod_node(pod).is_none() {
            return None;
        }
        SpiffeId::workload(td, &name.namespace, pod_service_account(pod)).ok()
    }

    /// Node authorization for certificate signing: whether an enrolled, not terminated pod
    /// running as the identity's namespace and service account is scheduled on `node`. The
    /// trust domain is the caller's to check.
    pub fn pod_on_node(&self, id: &SpiffeId, node: &str) -> bool {
        let Some((namespace, service_account)) = id.workload_parts() else {
            return false;
        };
        self.pods_on_node(node).any(|(name, pod)| {
            name.namespace == namespace
                && pod_service_account(pod) == service_account
                && self.is_enrolled(pod)
                && !pod_is_terminated(pod)
        })
    }

    /// What the agents capture: every Node's pod CIDRs (`spec.podCIDRs`, else `spec.podCIDR`),
    /// the ServiceCIDR objects' CIDRs and `configured` (the controller's `--service-cidr`);
    /// IPv4 only, sorted, each once. A value that is not an IPv4 prefix is left out (the
    /// API server validates them; IPv6 ones are not carried by the mesh yet).
    pub fn capture_cidrs(&self, configured: &[String]) -> Vec<String> {
        let pods = self
            .k8s_nodes
            .values()
            .filter_map(|n| n.spec.as_ref())
            .flat_map(|s| {
                s.pod_cidrs
                    .clone()
                    .filter(|c| !c.is_empty())
                    .or_else(|| s.pod_cidr.clone().map(|c| vec![c]))
                    .unwrap_or_default()
            });
        let services = self
            .service_cidrs
            .values()
            .filter_map(|c| c.spec.as_ref())
            .flat_map(|s| s.cidrs.clone().unwrap_or_default());
        let mut all: Vec<String> = pods
            .chain(services)
            .chain(configured.iter().cloned())
            .filter(|c| mesh_api::convert::ipv4_cidr(c).is_ok())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// The nodes with at least one enrolled, not terminated pod.
    pub fn nodes(&self) -> BTreeSet<String> {
        self.pods_by_node
            .iter()
            .filter(|(node, _)| {
                self.pods_on_node(node)
                    .any(|(_, pod)| self.is_enrolled(pod) && !pod_is_terminated(pod))
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    // --- storage ---

    /// Whether the index holds exactly `resource` under `key`.
    fn holds(&self, key: &ResourceKey, resource: &Resource) -> bool {
        let nn = key.namespaced_name();
        match resource {
            Resource::Namespace(o) => self.namespaces.get(&key.name) == Some(o),
            Resource::ServiceAccount(o) => self.service_accounts.get(&nn) == Some(o),
            Resource::Pod(o) => self.pods.get(&nn) == Some(o),
            Resource::Service(o) => self.services.get(&nn) == Some(o),
            Resource::EndpointSlice(o) => self.endpoint_slices.get(&nn) == Some(o),
            Resource::TrafficTarget(o) => self.traffic_targets.get(&nn) == Some(o),
            Resource::HttpRouteGroup(o) => self.http_route_groups.get(&nn) == Some(o),
            Resource::TcpRoute(o) => self.tcp_routes.get(&nn) == Some(o),
            Resource::TrafficSplit(o) => self.traffic_splits.get(&nn) == Some(o),
            Resource::HttpRoute(o) => self.http_routes.get(&nn) == Some(o),
            Resource::GrpcRoute(o) => self.grpc_routes.get(&nn) == Some(o),
            Resource::Node(o) => self.k8s_nodes.get(&key.name) == Some(o),
            Resource::ServiceCidr(o) => self.service_cidrs.get(&key.name) == Some(o),
        }
    }

    fn insert_object(&mut self, key: &ResourceKey, resource: Resource) {
        let nn = key.namespaced_name();
        if let Some(warning) = warning(key, &resource) {
            self.warnings.insert(key.clone(), warning);
        }
        if key.kind.has_references() {
            self.dirty_namespaces.insert(key.namespace.clone());
        }
        match resource {
            Resource::Namespace(o) => {
                self.namespaces.insert(key.name.clone(), o);
            }
            Resource::ServiceAccount(o) => {
                self.service_accounts.insert(nn, o);
            }
            Resource::Pod(o) => {
                if let Some(node) = pod_node(&o) {
                    self.pods_by_node
                        .entry(node.to_string())
                        .or_default()
                        .insert(nn.clone());
                }
                for (k, v) in o.metadata.labels.iter().flatten() {
                    let entry = (nn.namespace.clone(), k.clone(), v.clone());
                    self.pods_by_label
                        .entry(entry)
                        .or_default()
                        .insert(nn.clone());
                }
                self.pods.insert(nn, o);
            }
            Resource::Service(o) => {
                self.services.insert(nn, o);
            }
            Resource::EndpointSlice(o) => {
                if let Some(service) = label(&o.metadata.labels, SERVICE_NAME_LABEL) {
                    let service = NamespacedName::new(&nn.namespace, service);
                    self.slices_by_service
                        .entry(service)
                        .or_default()
                        .insert(nn.clone());
                }
                self.endpoint_slices.insert(nn, o);
            }
            Resource::TrafficTarget(o) => {
                let (ns, sa) = o.destination();
                let destination = NamespacedName::new(ns, sa);
                self.targets_by_destination
                    .entry(destination)
                    .or_default()
                    .insert(nn.clone());
                self.traffic_targets.insert(nn, o);
            }
            Resource::HttpRouteGroup(o) => {
                self.http_route_groups.insert(nn, o);
            }
            Resource::TcpRoute(o) => {
                self.tcp_routes.insert(nn, o);
            }
            Resource::TrafficSplit(o) => {
                self.traffic_splits.insert(nn, o);
            }
            Resource::HttpRoute(o) => {
                self.http_routes.insert(nn, o);
            }
            Resource::GrpcRoute(o) => {
                self.grpc_routes.insert(nn, o);
            }
            Resource::Node(o) => {
                self.k8s_nodes.insert(key.name.clone(), o);
            }
            Resource::ServiceCidr(o) => {
                self.service_cidrs.insert(key.name.clone(), o);
            }
        }
    }

    fn remove_object(&mut self, key: &ResourceKey) -> bool {
        let nn = key.namespaced_name();
        self.warnings.remove(key);
        if key.kind.has_references() {
            self.dirty_namespaces.insert(key.namespace.clone());
        }
        match key.kind {
            Kind::Namespace => self.namespaces.remove(&key.name).is_some(),
            Kind::ServiceAccount => self.service_accounts.remove(&nn).is_some(),
            Kind::Pod => {
                let Some(pod) = self.pods.remove(&nn) else {
                    return false;
                };
                if let Some(node) = pod_node(&pod) {
                    remove_from(&mut self.pods_by_node, node, &nn);
                }
                for (k, v) in pod.metadata.labels.iter().flatten() {
                    let entry = (nn.namespace.clone(), k.clone(), v.clone());
                    remove_from(&mut self.pods_by_label, &entry, &nn);
                }
                true
            }
            Kind::Service => self.services.remove(&nn).is_some(),
            Kind::EndpointSlice => {
                let Some(slice) = self.endpoint_slices.remove(&nn) else {
                    return false;
                };
                if let Some(service) = label(&slice.metadata.labels, SERVICE_NAME_LABEL) {
                    let service = NamespacedName::new(&nn.namespace, service);
                    remove_from(&mut self.slices_by_service, &service, &nn);
                }
                true
            }
            Kind::TrafficTarget => {
                let Some(tt) = self.traffic_targets.remove(&nn) else {
                    return false;
                };
                let (ns, sa) = tt.destination();
                remove_from(
                    &mut self.targets_by_destination,
                    &NamespacedName::new(ns, sa),
                    &nn,
                );
                true
            }
            Kind::HttpRouteGroup => self.http_route_groups.remove(&nn).is_some(),
            Kind::TcpRoute => self.tcp_routes.remove(&nn).is_some(),
            Kind::TrafficSplit => self.traffic_splits.remove(&nn).is_some(),
            Kind::HttpRoute => self.http_routes.remove(&nn).is_some(),
            Kind::GrpcRoute => self.grpc_routes.remove(&nn).is_some(),
            Kind::Node => self.k8s_nodes.remove(&key.name).is_some(),
            Kind::ServiceCidr => self.service_cidrs.remove(&key.name).is_some(),
        }
    }
}

fn remove_from<K, Q>(
    map: &mut BTreeMap<K, BTreeSet<NamespacedName>>,
    key: &Q,
    value: &NamespacedName,
) where
    K: Ord + std::borrow::Borrow<Q>,
    Q: Ord + ?Sized,
{
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

// === Pod helpers ===

fn label<'a>(labels: &'a Option<BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    labels.as_ref()?.get(key).map(String::as_str)
}

fn tls_mode_annotation(annotations: &Option<BTreeMap<String, String>>) -> Option<TlsMode> {
    match label(annotations, TLS_MODE_ANNOTATION)? {
        "strict" => Some(TlsMode::Strict),
        "permissive" => Some(TlsMode::Permissive),
        _ => None,
    }
}

/// A problem with a resource that does not stop it from being used.
fn warning(key: &ResourceKey, resource: &Resource) -> Option<String> {
    match resource {
        Resource::Namespace(ns) => bad_tls_mode(&ns.metadata.annotations),
        Resource::Pod(pod) => bad_tls_mode(&pod.metadata.annotations)
            .or_else(|| {
                excluded_inbound_ports(&pod.metadata.annotations)
                    .err()
                    .map(|why| {
                        format!(
                            "annotation {EXCLUDE_INBOUND_PORTS_ANNOTATION}: {why}; ignored, \
                             no port is excluded"
                        )
                    })
            })
            .or_else(|| {
            let sa = pod_service_account(pod);
            if let Err(why) = dns_subdomain(sa) {
                return Some(format!(
                    "service account {sa:?} is not a valid name ({why}): the pod cannot be meshed"
                ));
            }
            dns_label(&key.namespace).err().map(|why| {
                format!(
                    "namespace {:?} is not a valid name ({why}): the pod cannot be meshed",
                    key.namespace
                )
            })
        }),
        _ => None,
    }
}

fn bad_tls_mode(annotations: &Option<BTreeMap<String, String>>) -> Option<String> {
    let value = label(annotations, TLS_MODE_ANNOTATION)?;
    tls_mode_annotation(annotations).is_none().then(|| {
        format!("annotation {TLS_MODE_ANNOTATION}: {value:?} is not strict or permissive; ignored")
    })
}

/// The ports of annotation [`EXCLUDE_INBOUND_PORTS_ANNOTATION`] (`"9100,9101"`, spaces
/// allowed), sorted, without duplicates; none when the annotation is absent. A value that is
/// not a port 1-65535, or is 15008 (the mesh's own), rejects the whole annotation.
pub fn excluded_inbound_ports(
    annotations: &Option<BTreeMap<String, String>>,
) -> Result<Vec<u16>, String> {
    let Some(value) = label(annotations, EXCLUDE_INBOUND_PORTS_ANNOTATION) else {
        return Ok(Vec::new());
    };
    let mut ports = Vec::new();
    for item in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.parse::<u16>() {
            Ok(HBONE_PORT) => {
                return Err(format!(
                    "{value:?}: port {HBONE_PORT} carries the mesh's mTLS and cannot be excluded"
                ));
            }
            Ok(port) if port != 0 => ports.push(port),
            _ => return Err(format!("{value:?}: {item:?} is not a port 1-65535")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

/// `spec.serviceAccountName`, else the deprecated `spec.serviceAccount`, else `default`.
pub fn pod_service_account(pod: &Pod) -> &str {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.service_account_name.as_deref())
        .or_else(|| spec.and_then(|s| s.service_account.as_deref()))
        .filter(|sa| !sa.is_empty())
        .unwrap_or("default")
}

/// The TCP ports the pod's containers declare (`containers[].ports[].containerPort`), sorted,
/// without duplicates; out-of-range values are left out.
pub fn container_ports(pod: &Pod) -> Vec<u16> {
    let mut ports: Vec<u16> = pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| u16::try_from(p.container_port).ok().filter(|p| *p != 0))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The TCP ports the kubelet probes: the `httpGet`, `tcpSocket` and `grpc` liveness,
/// readiness and startup probes of every container (init containers too: a sidecar has
/// probes), a named port resolved against its own container's ports. A name that resolves to
/// nothing names no port (the kubelet fails that probe too).
pub fn probe_ports(pod: &Pod) -> Vec<u16> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let Some(spec) = pod.spec.as_ref() else {
        return vec![];
    };
    let mut ports = Vec::new();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let resolve = |port: &IntOrString| match port {
            IntOrString::Int(n) => u16::try_from(*n).ok(),
            IntOrString::String(name) => c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok()),
        };
        for probe in [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
            .into_iter()
            .flatten()
        {
            ports.extend(probe.http_get.as_ref().and_then(|h| resolve(&h.port)));
            ports.extend(probe.tcp_socket.as_ref().and_then(|t| resolve(&t.port)));
            ports.extend(probe.grpc.as_ref().and_then(|g| u16::try_from(g.port).ok()));
        }
    }
    ports.retain(|p| *p != 0 && *p != HBONE_PORT);
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// `spec.nodeName`, when scheduled.
pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// Succeeded and Failed pods are done: no identity, no endpoints.
pub fn pod_is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod's IPv4 addresses (`status.podIPs`, else `status.podIP`), deduplicated in order.
pub fn pod_ipv4s(pod: &Pod) -> Vec<Ipv4Addr> {
    let Some(status) = pod.status.as_ref() else {
        return Vec::new();
    };
    let mut ips: Vec<Ipv4Addr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|p| p.ip.as_str());
    for ip in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = ip.parse::<Ipv4Addr>()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

/// Whether the pod is ready: its `Ready` condition, else (no conditions, as in local mode)
/// not being deleted. A pod being deleted is not ready.
pub fn pod_is_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let conditions = pod.status.as_ref().and_then(|s| s.conditions.as_ref());
    match conditions.and_then(|c| c.iter().find(|c| c.type_ == "Ready")) {
        Some(ready) => ready.status == "True",
        None => true,
    }
}

// === SharedIndex ===

/// The index shared by the sources (writers) and the compiler and server (readers).
#[derive(Clone)]
pub struct SharedIndex {
    index: Arc<RwLock<Index>>,
    generation: Arc<watch::Sender<u64>>,
}

// === impl SharedIndex ===

impl SharedIndex {
    pub fn new() -> Self {
        SharedIndex {
            index: Arc::new(RwLock::new(Index::new())),
            generation: Arc::new(watch::Sender::new(0)),
        }
    }

    /// A read view. Hold it briefly: writers wait.
    pub fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the index. When it changed anything, cross-references are re-validated and
    /// the generation is bumped (after the lock is released).
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let mut index = self.index.write().unwrap_or_else(PoisonError::into_inner);
        let before = index.revision();
        let out = f(&mut index);
        let changed = index.revision() != before;
        if changed {
            index.revalidate();
        }
        drop(index);
        if changed {
            self.generation.send_modify(|g| *g += 1);
        }
        out
    }

    /// The number of changes so far.
    pub fn generation(&self) -> u64 {
        *self.generation.borrow()
    }

    /// Notified after every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}

impl Default for SharedIndex {
    fn default() -> Self {
        SharedIndex::new()
    }
}

impl std::fmt::Debug for SharedIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedIndex")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
