//! Where an outbound connection goes: the node proxy hands [`Resolver::resolve`] the original
//! destination `ip:port` an application connected to, and gets back a [`Target`] — a meshed
//! endpoint to reach over HBONE, a plain (unmeshed) endpoint, or a passthrough to somewhere
//! outside the mesh — or an [`Unresolved`] saying why there is nowhere to go.
//!
//! The steps, for a destination that is a service VIP:
//!
//! 1. the service and the service port addressed (`dst.port()` must be one of its ports);
//! 2. the TrafficSplit rooted at the service, chosen per connection by weight;
//! 3. the backend service's port: the one with the same name as the addressed port, else the
//!    same number, mapped to its `target_port`;
//! 4. one of the backend's ready endpoints, by the [`LoadBalancer`] (power of two choices).
//!
//! A destination that is the IP of a meshed pod goes to that pod, same port. Anything else is
//! outside the mesh and passes through; the caller's egress policy decides whether it may.
//!
//! On HTTP ports the L7 proxy calls [`Resolver::route_request`] for every request instead: the
//! same steps, with Gateway API routes (HTTPRoute, GRPCRoute) attached to the service and SMI
//! TrafficSplits with `matches` deciding the backend per request (see its docs for the order).
//!
//! The [`Resolver`] is built once per [`NodeSnapshot`] and holds only precomputed indexes, so
//! [`Resolver::resolve`] does a few hash lookups and short scans. The [`LoadBalancer`] outlives
//! snapshots: hand the previous one to [`Resolver::with_load_balancer`] so outstanding counts
//! carry over. Randomness comes through a [`Picker`], so tests are deterministic.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use serde::Serialize;

use crate::identity::SpiffeId;
use crate::model::{NamespacedName, NodeSnapshot, Protocol, Service, ServicePort};
use crate::policy::{HttpMatch, Request};
use crate::route::{Precedence, RequestMatch, Route};

pub use crate::route::HeaderModifier;

#[cfg(test)]
mod tests;

// === Target ===

/// Where a connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A meshed pod: open an HBONE stream to `addr` and verify the peer is `identity`.
    Mesh {
        /// The endpoint's IP and the target port on it.
        addr: SocketAddrV4,
        identity: SpiffeId,
        /// The destination pod's node, when known: HBONE connections are pooled per node.
        node: Option<String>,
        /// The service the application addressed; `None` when it addressed the pod directly.
        service: Option<NamespacedName>,
        /// The service whose endpoint was chosen: the split's backend, or `service` itself
        /// when no split applies; `None` when the pod was addressed directly.
        backend: Option<NamespacedName>,
        /// The protocol of the addressed port, which decides L4 or L7 handling.
        protocol: Protocol,
    },
    /// An endpoint of a service that is not meshed (no identity): connect in plaintext.
    Plain {
        addr: SocketAddrV4,
        /// The service the application addressed.
        service: Option<NamespacedName>,
    },
    /// Outside the mesh: connect to the original destination, if egress policy allows.
    Passthrough { addr: SocketAddrV4 },
}

// === impl Target ===

impl Target {
    /// The address to connect to.
    pub fn addr(&self) -> SocketAddrV4 {
        match self {
            Target::Mesh { addr, .. }
            | Target::Plain { addr, .. }
            | Target::Passthrough { addr } => *addr,
        }
    }

    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Mesh { .. } => "mesh",
            Target::Plain { .. } => "plain",
            Target::Passthrough { .. } => "passthrough",
        }
    }
}

/// A resolved connection: where it goes, and the lease that counts it as outstanding on the
/// chosen endpoint until dropped. Keep the lease alive as long as the connection is open.
#[derive(Debug)]
pub struct Resolution {
    pub target: Target,
    /// `None` for [`Target::Passthrough`], which no load balancer tracks.
    pub lease: Option<Lease>,
}

/// The routing decision for one HTTP request.
#[derive(Debug)]
pub struct RequestRoute {
    /// The endpoint chosen (Target::Mesh / Plain / Passthrough) with its load-balancer lease
    /// (hold it for the request's life).
    pub resolution: Resolution,
    /// What chose the backend, a stable label for metrics and logs: e.g.
    /// "HTTPRoute demo/web#0" (rule index), "GRPCRoute demo/echo#1",
    /// "TrafficSplit demo/web-split"; None when the service's own endpoints were used with no
    /// route.
    pub route: Option<String>,
    /// Request timeout from the matched HTTPRoute rule (`timeouts.request`), if any.
    pub timeout: Option<Duration>,
    pub request_headers: HeaderModifier,
}

/// Why a connection or request has nowhere to go.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unresolved {
    #[error("service {service} ({vip}) has no port {port}; its ports are {}", PortList(.ports))]
    NoSuchPort {
        service: NamespacedName,
        vip: Ipv4Addr,
        port: u16,
        ports: Vec<u16>,
    },
    #[error("TrafficSplit {split} sends traffic to service {backend}, which does not exist")]
    NoSuchBackend {
        split: NamespacedName,
        backend: NamespacedName,
    },
    #[error(
        "TrafficSplit {split} sends traffic for its root's port {port} ({port_name:?}) to \
         service {backend}, which has no port of that name or number"
    )]
    NoBackendPort {
        split: NamespacedName,
        backend: NamespacedName,
        port: u16,
        port_name: String,
    },
    #[error("service {service} has no ready endpoint for port {port}")]
    NoEndpoints { service: NamespacedName, port: u16 },
    /// Routes are attached to the service port, and none of their rules matches the request
    /// (Gateway API: answer 404).
    #[error("no route attached to service {service} port {port} matches {method} {path}")]
    NoRouteMatch {
        service: NamespacedName,
        port: u16,
        method: String,
        path: String,
    },
    /// The matched route rule has no backend with a weight above 0 (the controller refuses
    /// such rules; answer 500).
    #[error("{route} has no backend with a weight above 0")]
    NoBackend { route: String },
    #[error("{route} sends traffic to service {backend}, which does not exist")]
    NoSuchRouteBackend {
        route: String,
        backend: NamespacedName,
    },
    #[error("{route} sends traffic to port {port} of service {backend}, which has no such port")]
    NoRouteBackendPort {
        route: String,
        backend: NamespacedName,
        port: u16,
    },
}

impl Unresolved {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Unresolved::NoSuchPort { .. } => "no_such_port",
            Unresolved::NoSuchBackend { .. } => "no_such_backend",
            Unresolved::NoBackendPort { .. } => "no_backend_port",
            Unresolved::NoEndpoints { .. } => "no_endpoints",
            Unresolved::NoRouteMatch { .. } => "no_route_match",
            Unresolved::NoBackend { .. } => "no_backend",
            Unresolved::NoSuchRouteBackend { .. } => "no_such_backend",
            Unresolved::NoRouteBackendPort { .. } => "no_backend_port",
        }
    }
}

/// Formats ports as `80, 443` (or `none`) in error messages.
struct PortList<'a>(&'a [u16]);

impl fmt::Display for PortList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

// === Picker ===

/// The source of randomness for splits and load balancing.
pub trait Picker {
    /// A value in `0..n`, uniformly distributed. Callers never pass `n == 0`; an
    /// implementation returns 0 for it rather than panic.
    fn below(&mut self, n: u32) -> u32;
}

/// A fast, non-cryptographic generator (xorshift64*), good enough to spread connections.
///
/// [`FastPicker::new`] seeds it from the standard library's per-process random hashing keys,
/// so two pickers (and two processes) draw different sequences without a `rand` dependency;
/// [`FastPicker::with_seed`] gives a reproducible sequence.
#[derive(Debug, Clone)]
pub struct FastPicker {
    state: u64,
}

// === impl FastPicker ===

impl FastPicker {
    /// A picker with an unpredictable seed. Cheap enough to make one per connection.
    pub fn new() -> Self {
        // Each `RandomState` has fresh keys (random per thread, then incremented), so hashing
        // a constant with it yields a new well-mixed value every time.
        Self::with_seed(RandomState::new().hash_one(0x6d65_7368_u64))
    }

    /// A picker whose sequence is fixed by `seed`.
    pub fn with_seed(seed: u64) -> Self {
        // splitmix64 spreads similar seeds apart; xorshift needs a non-zero state.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        FastPicker {
            state: if z == 0 { 0x2545_f491_4f6c_dd1d } else { z },
        }
    }

    fn next_u32(&mut self) -> u32 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        // The high half of the product is the better-mixed one.
        (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 32) as u32
    }
}

impl Default for FastPicker {
    fn default() -> Self {
        Self::new()
    }
}

impl Picker for FastPicker {
    /// Lemire's multiply-shift reduction: no division, and a bias of at most `n / 2^32`,
    /// which is nothing for the handful of endpoints or split weights it chooses among.
    fn below(&mut self, n: u32) -> u32 {
        ((u64::from(self.next_u32()) * u64::from(n)) >> 32) as u32
    }
}

/// A picker that replays a script: the i-th call returns `values[i % len] % n`. For tests
/// that need to say exactly which backend or endpoints are drawn. An empty script always
/// returns 0.
#[derive(Debug, Clone, Default)]
pub struct ScriptedPicker {
    values: Vec<u32>,
    next: usize,
}

// === impl ScriptedPicker ===

impl ScriptedPicker {
    pub fn new(values: impl Into<Vec<u32>>) -> Self {
        ScriptedPicker {
            values: values.into(),
            next: 0,
        }
    }

    /// How many values have been drawn.
    pub fn draws(&self) -> usize {
        self.next
    }
}

impl Picker for ScriptedPicker {
    fn below(&mut self, n: u32) -> u32 {
        if n == 0 || self.values.is_empty() {
            self.next += 1;
            return 0;
        }
        let v = self.values[self.next % self.values.len()];
        self.next += 1;
        v % n
    }
}

impl<P: Picker + ?Sized> Picker for &mut P {
    fn below(&mut self, n: u32) -> u32 {
        (**self).below(n)
    }
}

// === LoadBalancer ===

/// Outstanding connections per endpoint address, shared by every connection on the node.
///
/// The choice is *power of two choices*: draw two distinct ready endpoints at random and take
/// the one with fewer outstanding connections (the first drawn on a tie); with a single ready
/// endpoint, take it. That avoids both the herd behaviour of "least loaded overall" (every
/// proxy piling onto the same idle endpoint) and the blindness of plain random choice.
///
/// Counters are atomics behind a read-mostly lock: the write lock is taken only the first
/// time an address is seen and when [`LoadBalancer::prune`] drops unused counters. A counter
/// goes up when a [`Lease`] is handed out and down when it is dropped.
#[derive(Debug, Default)]
pub struct LoadBalancer {
    outstanding: RwLock<HashMap<SocketAddrV4, Arc<AtomicU32>>>,
}

/// One outstanding connection to `addr`; dropping it ends the count.
#[derive(Debug)]
pub struct Lease {
    addr: SocketAddrV4,
    counter: Arc<AtomicU32>,
}

// === impl LoadBalancer ===

impl LoadBalancer {
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of outstanding connections to `addr`.
    pub fn outstanding(&self, addr: SocketAddrV4) -> u32 {
        self.read()
            .get(&addr)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts one more outstanding connection to `addr` until the lease is dropped.
    pub fn acquire(&self, addr: SocketAddrV4) -> Lease {
        if let Some(counter) = self.read().get(&addr) {
            // Incremented under the read lock, so `prune` (which takes the write lock and
            // only drops counters nobody else holds) can never drop it in between.
            counter.fetch_add(1, Ordering::Relaxed);
            return Lease {
                addr,
                counter: Arc::clone(counter),
            };
        }
        let mut map = self
            .outstanding
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let counter = map.entry(addr).or_default();
        counter.fetch_add(1, Ordering::Relaxed);
        Lease {
            addr,
            counter: Arc::clone(counter),
        }
    }

    /// Drops the counters of addresses with no outstanding connection, so endpoints that
    /// went away do not accumulate. [`Resolver::with_load_balancer`] calls it.
    pub fn prune(&self) {
        self.outstanding
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, c| Arc::strong_count(c) > 1);
    }

    /// How many addresses have a counter.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Power of two choices among `n` candidates whose addresses `addr_of` gives: the index
    /// of the chosen one. `n` must be at least 1.
    fn choose(
        &self,
        n: usize,
        addr_of: impl Fn(usize) -> SocketAddrV4,
        pick: &mut impl Picker,
    ) -> usize {
        if n <= 1 {
            return 0;
        }
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        let first = pick.below(n32) as usize;
        let mut second = pick.below(n32 - 1) as usize;
        if second >= first {
            second += 1;
        }
        let map = self.read();
        let load = |i: usize| {
            map.get(&addr_of(i))
                .map_or(0, |c| c.load(Ordering::Relaxed))
        };
        if load(second) < load(first) {
            second
        } else {
            first
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<SocketAddrV4, Arc<AtomicU32>>> {
        // The map only holds counters; a panic elsewhere cannot leave it inconsistent.
        self.outstanding
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Lease ===

impl Lease {
    /// The endpoint address the lease counts against.
    pub fn addr(&self) -> SocketAddrV4 {
        self.addr
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

// === Resolver ===

/// The outbound routing decision for one [`NodeSnapshot`], with its indexes precomputed.
#[derive(Debug)]
pub struct Resolver {
    services: Vec<ServiceEntry>,
    /// Service VIP -> index into `services`.
    by_vip: HashMap<Ipv4Addr, usize>,
    /// Meshed pod IP -> the pod.
    pods: HashMap<Ipv4Addr, Pod>,
    /// Pod IP and target port -> the protocol of a service port targeting it, so a pod
    /// addressed directly (headless services) still gets L7 handling.
    pod_ports: HashMap<SocketAddrV4, Protocol>,
    /// Every rule of every route, in route order; `RouteEntry::rule` indexes it.
    rules: Vec<RouteRuleEntry>,
    lb: Arc<LoadBalancer>,
}

#[derive(Debug)]
struct ServiceEntry {
    name: NamespacedName,
    ports: Vec<ServicePort>,
    ready: Vec<ReadyEndpoint>,
    /// The split applied to connections addressed to this service, if any.
    split: Option<Split>,
    /// Splits with `matches` rooted at this service, by namespace/name: applied per request.
    request_splits: Vec<Split>,
    /// The matches of the routes attached to this service, in Gateway API precedence order.
    routes: Vec<RouteEntry>,
}

/// One match of a route rule attached to a service.
#[derive(Debug)]
struct RouteEntry {
    /// The service port the parentRef restricts the route to; `None` is every port.
    port: Option<u16>,
    matcher: RequestMatch,
    /// Index into `Resolver::rules`.
    rule: usize,
}

/// A route rule compiled for per-request routing.
#[derive(Debug)]
struct RouteRuleEntry {
    /// `HTTPRoute ns/name#<rule index>`.
    label: String,
    backends: Vec<WeightedBackend>,
    /// The sum of all weights; 0 when no backend may be chosen.
    total: u64,
    request_headers: HeaderModifier,
    timeout: Option<Duration>,
}

#[derive(Debug)]
struct ReadyEndpoint {
    ip: Ipv4Addr,
    identity: Option<SpiffeId>,
    node: Option<String>,
}

#[derive(Debug)]
struct Pod {
    identity: SpiffeId,
    node: Option<String>,
}

/// A compiled TrafficSplit: backends with running weight totals.
#[derive(Debug)]
struct Split {
    name: NamespacedName,
    /// `TrafficSplit ns/name`, the label of the requests it routes.
    label: String,
    /// Empty for a split that applies to all traffic.
    matches: Vec<HttpMatch>,
    backends: Vec<WeightedBackend>,
    /// The sum of all weights; never 0.
    total: u64,
}

#[derive(Debug)]
struct WeightedBackend {
    service: NamespacedName,
    /// Index into `Resolver::services`; `None` when the service does not exist.
    index: Option<usize>,
    /// The backend service port (route backends only); `None` is the addressed port number.
    port: Option<u16>,
    /// The sum of the weights up to and including this backend: it gets the draws in
    /// `previous cumulative..cumulative`.
    cumulative: u64,
}

// === impl Resolver ===

impl Resolver {
    /// Builds the indexes of `snapshot` with a new, empty load balancer.
    pub fn new(snapshot: &NodeSnapshot) -> Self {
        Self::with_load_balancer(snapshot, Arc::new(LoadBalancer::new()))
    }

    /// Builds the indexes of `snapshot`, keeping the outstanding counts of `lb` (the previous
    /// resolver's [`Resolver::load_balancer`]). Unused counters are pruned.
    ///
    /// TrafficSplits are compiled for L4: a split applies to connections addressed to its
    /// root service when it has no `matches`. A split with `matches` restricts HTTP requests
    /// and is applied per request by the L7 proxy, not here. When several splits without
    /// matches share a root (SMI leaves that undefined), the first by namespace/name wins.
    /// A backend that is itself the root of a split is not split again: its own endpoints
    /// are used, and a backend equal to the root means the root's own endpoints.
    ///
    /// Routes are indexed per parent service, their matches sorted by Gateway API precedence
    /// (see [`Resolver::route_request`]); a parent service that is not in the snapshot is
    /// skipped.
    pub fn with_load_balancer(snapshot: &NodeSnapshot, lb: Arc<LoadBalancer>) -> Self {
        lb.prune();
        let mut services: Vec<ServiceEntry> = Vec::with_capacity(snapshot.services.len());
        let mut by_name: HashMap<&NamespacedName, usize> = HashMap::new();
        let mut by_vip = HashMap::new();
        let mut pods = HashMap::new();
        let mut pod_ports = HashMap::new();

        for (name, svc) in snapshot.services.iter() {
            by_name.insert(name, services.len());
            if let Some(vip) = svc.vip {
                by_vip.entry(vip).or_insert(services.len());
            }
            index_endpoints(svc, &mut pods, &mut pod_ports);
            services.push(ServiceEntry {
                name: name.clone(),
                ports: svc.ports.clone(),
                ready: svc
                    .endpoints
                    .iter()
                    .filter(|e| e.ready)
                    .map(|e| ReadyEndpoint {
                        ip: e.ip,
                        identity: e.identity.clone(),
                        node: e.node.clone(),
                    })
                    .collect(),
                split: None,
                request_splits: Vec::new(),
                routes: Vec::new(),
            });
        }

        // The node's own workloads are authoritative for their IPs.
        for w in snapshot.workloads.values() {
            for ip in &w.ips {
                pods.insert(
                    *ip,
                    Pod {
                        identity: w.identity.clone(),
                        node: Some(w.node.clone()),
                    },
                );
            }
        }

        for split in snapshot.splits.values() {
            let Some(&root) = by_name.get(&split.root) else {
                continue;
            };
            let root = &mut services[root];
            if split.matches.is_empty() && root.split.is_some() {
                continue;
            }
            let (backends, total) = weighted(
                split.backends.iter().map(|b| (&b.service, None, b.weight)),
                &by_name,
            );
            // The controller refuses splits whose weights are all 0; were one to arrive, it
            // would send nothing anywhere, so the root keeps its own endpoints.
            if total == 0 {
                continue;
            }
            let compiled = Split {
                name: split.name.clone(),
                label: format!("TrafficSplit {}", split.name),
                matches: split.matches.clone(),
                backends,
                total,
            };
            match split.matches.is_empty() {
                true => root.split = Some(compiled),
                false => root.request_splits.push(compiled),
            }
        }

        let rules = index_routes(snapshot, &by_name, &mut services);

        Resolver {
            services,
            by_vip,
            pods,
            pod_ports,
            rules,
            lb,
        }
    }

    /// The load balancer, to hand to the resolver of the next snapshot.
    pub fn load_balancer(&self) -> &Arc<LoadBalancer> {
        &self.lb
    }

    /// Where a connection from the workload `src` to the original destination `dst` goes.
    ///
    /// `src` does not change L4 routing today (SMI splits are not per source); it is part of
    /// the decision's inputs so source-aware routing does not change every caller.
    ///
    /// Errors only for a service VIP: a port the service does not have, a split backend that
    /// does not exist or lacks the port, or no ready endpoint on the chosen backend. A split
    /// that chose an empty backend does not fall back to another: the weights are the
    /// operator's intent, and the error names the backend.
    pub fn resolve(
        &self,
        src: &SpiffeId,
        dst: SocketAddrV4,
        pick: &mut impl Picker,
    ) -> Result<Resolution, Unresolved> {
        let _ = src;
        if let Some(&svc) = self.by_vip.get(dst.ip()) {
            return self.resolve_service(svc, dst, pick);
        }
        if let Some(pod) = self.pods.get(dst.ip()) {
            let target = Target::Mesh {
                addr: dst,
                identity: pod.identity.clone(),
                node: pod.node.clone(),
                service: None,
                backend: None,
                protocol: self.pod_ports.get(&dst).copied().unwrap_or_default(),
            };
            return Ok(Resolution {
                target,
                lease: Some(self.lb.acquire(dst)),
            });
        }
        Ok(Resolution {
            target: Target::Passthrough { addr: dst },
            lease: None,
        })
    }

    fn resolve_service(
        &self,
        svc: usize,
        dst: SocketAddrV4,
        pick: &mut impl Picker,
    ) -> Result<Resolution, Unresolved> {
        let root = &self.services[svc];
        let port = root.port(dst)?;
        let (backend, target_port) = self.split_backend(svc, port, root.split.as_ref(), pick)?;
        self.endpoint(root, port, backend, target_port, pick)
    }

    /// Per-request routing of a request on a connection from `src` to original destination
    /// `dst`.
    ///
    /// For a service VIP and one of its ports, the first of these that applies decides the
    /// backend service:
    ///
    /// 1. Gateway API routes (HTTPRoute, GRPCRoute) attached to the service (a parentRef of
    ///    kind Service; a parentRef `port` restricts it to that service port). They take
    ///    precedence over SMI TrafficSplits. Among all their rules' matches, the first by
    ///    Gateway API precedence that matches the request wins: an exact path, then the
    ///    longest prefix, then a regex, then no path; then a method match; then more header
    ///    matches; ties by route (namespace/name, HTTPRoutes before GRPCRoutes), then rule
    ///    and match order. The rule's backends are drawn by weight (0 is never drawn), on the
    ///    backendRef port (default: the addressed port number); its RequestHeaderModifier and
    ///    `timeouts.request` come with the decision. When routes are attached but none
    ///    matches: [`Unresolved::NoRouteMatch`].
    /// 2. Else the first SMI TrafficSplit (by namespace/name) rooted at the service whose
    ///    `matches` match the request, by weight.
    /// 3. Else the TrafficSplit without matches rooted at the service (the one
    ///    [`Resolver::resolve`] applies), by weight, drawn again for every request.
    /// 4. Else the service's own endpoints.
    ///
    /// The endpoint of the backend is chosen as in [`Resolver::resolve`]: power of two choices
    /// on outstanding leases, which per request is least-requests P2C. Hold the lease until the
    /// response is done. A destination that is not a service VIP (a pod, or outside the mesh)
    /// resolves as in [`Resolver::resolve`], with no route.
    pub fn route_request(
        &self,
        src: &SpiffeId,
        dst: SocketAddrV4,
        request: &Request<'_>,
        pick: &mut impl Picker,
    ) -> Result<RequestRoute, Unresolved> {
        let Some(&svc) = self.by_vip.get(dst.ip()) else {
            return Ok(RequestRoute {
                resolution: self.resolve(src, dst, pick)?,
                route: None,
                timeout: None,
                request_headers: HeaderModifier::default(),
            });
        };
        let root = &self.services[svc];
        let port = root.port(dst)?;

        let mut attached = root
            .routes
            .iter()
            .filter(|r| r.port.is_none_or(|p| p == port.port))
            .peekable();
        if attached.peek().is_some() {
            let Some(entry) = attached.find(|r| r.matcher.matches(request)) else {
                return Err(Unresolved::NoRouteMatch {
                    service: root.name.clone(),
                    port: port.port,
                    method: request.method.to_string(),
                    path: request.path.to_string(),
                });
            };
            let rule = &self.rules[entry.rule];
            let (backend, target_port) = self.route_backend(rule, port, pick)?;
            return Ok(RequestRoute {
                resolution: self.endpoint(root, port, backend, target_port, pick)?,
                route: Some(rule.label.clone()),
                timeout: rule.timeout,
                request_headers: rule.request_headers.clone(),
            });
        }

        let split = root
            .request_splits
            .iter()
            .find(|s| s.matches.iter().any(|m| m.matches(request)))
            .or(root.split.as_ref());
        let (backend, target_port) = self.split_backend(svc, port, split, pick)?;
        Ok(RequestRoute {
            resolution: self.endpoint(root, port, backend, target_port, pick)?,
            route: split.map(|s| s.label.clone()),
            timeout: None,
            request_headers: HeaderModifier::default(),
        })
    }

    /// The backend service (index) and its target port for a connection or request to `port`
    /// of the service `svc`: drawn from `split` when there is one, else the service itself.
    fn split_backend(
        &self,
        svc: usize,
        port: &ServicePort,
        split: Option<&Split>,
        pick: &mut impl Picker,
    ) -> Result<(usize, u16), Unresolved> {
        let Some((split, chosen)) = split.and_then(|s| Some((s, s.pick(pick)?))) else {
            return Ok((svc, port.target_port));
        };
        let Some(index) = chosen.index else {
            return Err(Unresolved::NoSuchBackend {
                split: split.name.clone(),
                backend: chosen.service.clone(),
            });
        };
        let backend = &self.services[index];
        let Some(target_port) = backend_port(port, &backend.ports) else {
            return Err(Unresolved::NoBackendPort {
                split: split.name.clone(),
                backend: backend.name.clone(),
                port: port.port,
                port_name: port.name.clone(),
            });
        };
        Ok((index, target_port))
    }

    /// The backend service (index) and its target port drawn from a route rule's backends.
    fn route_backend(
        &self,
        rule: &RouteRuleEntry,
        port: &ServicePort,
        pick: &mut impl Picker,
    ) -> Result<(usize, u16), Unresolved> {
        let chosen = pick_weighted(&rule.backends, rule.total, pick).ok_or_else(|| {
            Unresolved::NoBackend {
                route: rule.label.clone(),
            }
        })?;
        let Some(index) = chosen.index else {
            return Err(Unresolved::NoSuchRouteBackend {
                route: rule.label.clone(),
                backend: chosen.service.clone(),
            });
        };
        let backend = &self.services[index];
        let number = chosen.port.unwrap_or(port.port);
        match backend.ports.iter().find(|p| p.port == number) {
            Some(p) => Ok((index, p.target_port)),
            None => Err(Unresolved::NoRouteBackendPort {
                route: rule.label.clone(),
                backend: backend.name.clone(),
                port: number,
            }),
        }
    }

    /// One ready endpoint of the backend service, by the load balancer, with its lease.
    /// `root` and `port` are what the application addressed.
    fn endpoint(
        &self,
        root: &ServiceEntry,
        port: &ServicePort,
        backend: usize,
        target_port: u16,
        pick: &mut impl Picker,
    ) -> Result<Resolution, Unresolved> {
        let backend = &self.services[backend];
        if backend.ready.is_empty() {
            return Err(Unresolved::NoEndpoints {
                service: backend.name.clone(),
                port: target_port,
            });
        }
        let addr_of = |i: usize| SocketAddrV4::new(backend.ready[i].ip, target_port);
        let chosen = self.lb.choose(backend.ready.len(), addr_of, pick);
        let ep = &backend.ready[chosen];
        let addr = addr_of(chosen);
        let target = match &ep.identity {
            Some(identity) => Target::Mesh {
                addr,
                identity: identity.clone(),
                node: ep.node.clone(),
                service: Some(root.name.clone()),
                backend: Some(backend.name.clone()),
                protocol: port.protocol,
            },
            None => Target::Plain {
                addr,
                service: Some(root.name.clone()),
            },
        };
        Ok(Resolution {
            target,
            lease: Some(self.lb.acquire(addr)),
        })
    }
}

// === impl ServiceEntry ===

impl ServiceEntry {
    /// The service port addressed by `dst`.
    fn port(&self, dst: SocketAddrV4) -> Result<&ServicePort, Unresolved> {
        self.ports
            .iter()
            .find(|p| p.port == dst.port())
            .ok_or_else(|| Unresolved::NoSuchPort {
                service: self.name.clone(),
                vip: *dst.ip(),
                port: dst.port(),
                ports: self.ports.iter().map(|p| p.port).collect(),
            })
    }
}

/// Backends with running weight totals, and the total.
fn weighted<'a>(
    backends: impl Iterator<Item = (&'a NamespacedName, Option<u16>, u32)>,
    by_name: &HashMap<&NamespacedName, usize>,
) -> (Vec<WeightedBackend>, u64) {
    let mut total = 0u64;
    let backends = backends
        .map(|(service, port, weight)| {
            total += u64::from(weight);
            WeightedBackend {
                service: service.clone(),
                index: by_name.get(service).copied(),
                port,
                cumulative: total,
            }
        })
        .collect();
    (backends, total)
}

/// A route match's place among a service's: precedence, route order, rule and match index.
type Ranking = (Precedence, usize, usize, usize);

/// Compiles the rules of every route and attaches their matches to the parent services,
/// sorted by precedence. Returns the rules, which the entries index.
fn index_routes(
    snapshot: &NodeSnapshot,
    by_name: &HashMap<&NamespacedName, usize>,
    services: &mut [ServiceEntry],
) -> Vec<RouteRuleEntry> {
    let mut routes: Vec<&Route> = snapshot
        .http_routes
        .values()
        .chain(snapshot.grpc_routes.values())
        .collect();
    routes.sort_by(|a, b| (&a.name, a.kind).cmp(&(&b.name, b.kind)));

    let mut rules = Vec::new();
    // Per service: (precedence, route order, rule index, match index) and the entry.
    let mut attached: HashMap<usize, Vec<(Ranking, RouteEntry)>> = HashMap::new();
    for (order, route) in routes.into_iter().enumerate() {
        for (i, rule) in route.rules.iter().enumerate() {
            let (backends, total) = weighted(
                rule.backends.iter().map(|b| (&b.service, b.port, b.weight)),
                by_name,
            );
            let index = rules.len();
            rules.push(RouteRuleEntry {
                label: format!("{} {}#{i}", route.kind, route.name),
                backends,
                total,
                request_headers: rule.request_headers.clone(),
                timeout: rule.timeout,
            });
            for parent in &route.parents {
                let Some(&svc) = by_name.get(&parent.service) else {
                    continue;
                };
                for (j, m) in rule.matches.iter().enumerate() {
                    let entry = RouteEntry {
                        port: parent.port,
                        matcher: m.clone(),
                        rule: index,
                    };
                    let list = attached.entry(svc).or_default();
                    list.push(((m.precedence(), order, i, j), entry));
                }
            }
        }
    }
    for (svc, mut list) in attached {
        list.sort_by_key(|(ranking, _)| *ranking);
        services[svc].routes = list.into_iter().map(|(_, e)| e).collect();
    }
    rules
}

/// Records the meshed endpoints of `svc` as pods (the first identity seen for an IP wins) and
/// the protocol of each of their target ports.
fn index_endpoints(
    svc: &Service,
    pods: &mut HashMap<Ipv4Addr, Pod>,
    pod_ports: &mut HashMap<SocketAddrV4, Protocol>,
) {
    for ep in &svc.endpoints {
        let Some(identity) = &ep.identity else {
            continue;
        };
        pods.entry(ep.ip).or_insert_with(|| Pod {
            identity: identity.clone(),
            node: ep.node.clone(),
        });
        for p in &svc.ports {
            pod_ports
                .entry(SocketAddrV4::new(ep.ip, p.target_port))
                .or_insert(p.protocol);
        }
    }
}

/// The target port on a split backend for the addressed root `port`: the backend port with
/// the same (non-empty) name, else the one with the same number.
fn backend_port(port: &ServicePort, backend: &[ServicePort]) -> Option<u16> {
    let by_name = || {
        backend
            .iter()
            .find(|b| !port.name.is_empty() && b.name == port.name)
    };
    by_name()
        .or_else(|| backend.iter().find(|b| b.port == port.port))
        .map(|b| b.target_port)
}

// === impl Split ===

impl Split {
    /// A backend drawn by weight. Zero-weight backends are never drawn. `None` only if the
    /// split had no weight, which building it rules out.
    fn pick(&self, pick: &mut impl Picker) -> Option<&WeightedBackend> {
        pick_weighted(&self.backends, self.total, pick)
    }
}

/// A backend drawn by weight from backends whose weights sum to `total`. Zero-weight
/// backends are never drawn; `None` when `total` is 0.
fn pick_weighted<'a>(
    backends: &'a [WeightedBackend],
    total: u64,
    pick: &mut impl Picker,
) -> Option<&'a WeightedBackend> {
    if total == 0 {
        return None;
    }
    let draw = match u32::try_from(total) {
        Ok(total) => u64::from(pick.below(total)),
        // Weights summing past u32::MAX: combine two draws (a negligible modulo bias).
        Err(_) => {
            let hi = u64::from(pick.below(u32::MAX));
            let lo = u64::from(pick.below(u32::MAX));
            ((hi << 32) | lo) % total
        }
    };
    backends.iter().find(|b| draw < b.cumulative)
}
