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

use serde::Serialize;

use crate::identity::SpiffeId;
use crate::model::{NamespacedName, NodeSnapshot, Protocol, Service, ServicePort};

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

/// Why a connection has nowhere to go.
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
}

impl Unresolved {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Unresolved::NoSuchPort { .. } => "no_such_port",
            Unresolved::NoSuchBackend { .. } => "no_such_backend",
            Unresolved::NoBackendPort { .. } => "no_backend_port",
            Unresolved::NoEndpoints { .. } => "no_endpoints",
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
    lb: Arc<LoadBalancer>,
}

#[derive(Debug)]
struct ServiceEntry {
    name: NamespacedName,
    ports: Vec<ServicePort>,
    ready: Vec<ReadyEndpoint>,
    /// The split applied to connections addressed to this service, if any.
    split: Option<Split>,
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

/// A TrafficSplit compiled for L4: backends with running weight totals.
#[derive(Debug)]
struct Split {
    name: NamespacedName,
    backends: Vec<WeightedBackend>,
    /// The sum of all weights; never 0.
    total: u64,
}

#[derive(Debug)]
struct WeightedBackend {
    service: NamespacedName,
    /// Index into `Resolver::services`; `None` when the service does not exist.
    index: Option<usize>,
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
            if !split.matches.is_empty() {
                continue;
            }
            let Some(&root) = by_name.get(&split.root) else {
                continue;
            };
            if services[root].split.is_some() {
                continue;
            }
            let mut total = 0u64;
            let backends = split
                .backends
                .iter()
                .map(|b| {
                    total += u64::from(b.weight);
                    WeightedBackend {
                        service: b.service.clone(),
                        index: by_name.get(&b.service).copied(),
                        cumulative: total,
                    }
                })
                .collect();
            // The controller refuses splits whose weights are all 0; were one to arrive, it
            // would send nothing anywhere, so the root keeps its own endpoints.
            if total > 0 {
                services[root].split = Some(Split {
                    name: split.name.clone(),
                    backends,
                    total,
                });
            }
        }

        Resolver {
            services,
            by_vip,
            pods,
            pod_ports,
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
        let Some(port) = root.ports.iter().find(|p| p.port == dst.port()) else {
            return Err(Unresolved::NoSuchPort {
                service: root.name.clone(),
                vip: *dst.ip(),
                port: dst.port(),
                ports: root.ports.iter().map(|p| p.port).collect(),
            });
        };

        let split = root.split.as_ref().and_then(|s| Some((s, s.pick(pick)?)));
        let (backend, target_port) = match split {
            None => (root, port.target_port),
            Some((split, chosen)) => {
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
                (backend, target_port)
            }
        };

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
        let draw = match u32::try_from(self.total) {
            Ok(total) => u64::from(pick.below(total)),
            // Weights summing past u32::MAX: combine two draws (a negligible modulo bias).
            Err(_) => {
                let hi = u64::from(pick.below(u32::MAX));
                let lo = u64::from(pick.below(u32::MAX));
                ((hi << 32) | lo) % self.total
            }
        };
        self.backends.iter().find(|b| draw < b.cumulative)
    }
}
