//! What the proxy reports about the connections it carries: Prometheus counters compatible
//! with Istio's TCP metrics, a table of the connections open right now, and one access-log
//! line per connection.
//!
//! A connection is a [`ConnGuard`], created once the proxy decided to carry it (or, for a
//! refusal, only for the moment of recording it). The application-side stream is wrapped in
//! [`Metered`], which adds the bytes to the guard's counters and to the Prometheus counters
//! as they flow, and notes the time of the last byte for the idle watchdog
//! ([`Activity::watchdog`]). Dropping the guard counts the connection closed, removes it
//! from the table and writes its access-log line.
//!
//! # Metrics
//!
//! - `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total`, labelled `reporter`
//!   (`source` on the caller's side, `destination` on the callee's), `source_workload`,
//!   `source_workload_namespace`, `source_principal`, `destination_service`,
//!   `destination_workload`, `destination_workload_namespace`, `destination_principal`,
//!   `response_flags`, `connection_security_policy` and `mesh_path` (see below).
//!   As in Istio, whichever side reports, `received` counts the request direction (source to
//!   destination) and `sent` the response direction (destination to source).
//! - `mesh_tcp_connections_denied_total{reporter, source_principal, destination_workload,
//!   destination_workload_namespace, reason}`: refusals by policy; `reason` is a stable kind.
//!   An open connection that a policy change no longer allows is closed and counted here with
//!   `reason="policy_revoked"` ([`POLICY_REVOKED`], see [`Telemetry::revoke_where`]).
//!
//! On HTTP ports each request is also recorded ([`Telemetry::request`]):
//! `istio_requests_total` and `istio_request_duration_milliseconds` (from the request's head
//! to the response's head), with the labels above plus `request_protocol` (`http`, `grpc`),
//! `response_code`, `grpc_response_status` (from a trailers-only answer, else empty) and
//! `route` (the HTTPRoute rule or TrafficSplit that routed it on the source's side, the
//! TrafficTarget match that allowed it on the destination's).
//!
//! `mesh_path` says how the bytes travelled and `connection_security_policy` what protected
//! them:
//!
//! | `mesh_path` | `connection_security_policy` | the connection                                 |
//! |-------------|------------------------------|------------------------------------------------|
//! | `hbone`     | `mutual_tls`                 | in an HBONE tunnel between two proxies         |
//! | `same_node` | `node_local`                 | between two pods of this agent, in its memory  |
//! | `plaintext` | `none`                       | from outside the mesh into a meshed pod        |
//! | `direct`    | `none`                       | to a destination outside the mesh              |
//!
//! `node_local` is not `mutual_tls`: a same-node connection is never encrypted. Both ends are
//! pods this agent serves, the caller is known by the identity configured for its pod (the one
//! its certificate would name) and admitted by the same policy as an HBONE tunnel, and the
//! bytes go from one pod's socket to the other's through the agent's buffers without ever
//! reaching a wire. Both reporters record such a connection, as for HBONE.
//!
//! Refused connections count as opened and closed at once, like Istio's. `opened` always
//! carries `response_flags="-"` (the outcome is not known yet), `closed` carries the outcome.
//!
//! Every label value comes from a bounded set: workload names are owner names (the pod name
//! without the suffixes a ReplicaSet, DaemonSet or Job adds, see [`owner_name`]), principals
//! are identities the mesh CA issued, services come from the configuration, and flags,
//! reasons and paths are fixed enumerations. Addresses and pod names never become labels.
//! What is not known is `unknown`.
//!
//! # Response flags
//!
//! | flag      | meaning                                                                     |
//! |-----------|-----------------------------------------------------------------------------|
//! | `-`       | the connection ended normally (both sides closed)                           |
//! | `DENY`    | refused by policy (here or, for the source, by the destination: HTTP 403), |
//! |           | or closed because a policy change no longer allows it (`policy_revoked`)    |
//! | `CONNECT` | the destination (tunnel or application) could not be reached               |
//! | `NR`      | no route: the destination did not resolve, or the pod is not configured     |
//! | `UO`      | overflow: the pod's cap on open connections was reached                     |
//! | `IDLE`    | closed after carrying no byte either way for the idle timeout               |
//! | `DRAIN`   | cut when the shutdown grace period ended                                    |
//! | `IO`      | a read or write failed while bytes were carried (for example a reset)      |
//! | `UT`      | a request got no response head within its route's timeout (L7)             |
//! | `DPE`     | a request refused as malformed: its path cannot be normalized safely (L7)  |
//!
//! # Access log
//!
//! One `INFO` event per connection with target [`ACCESS_LOG`] (`mesh::access`), written when
//! it ends: `conn.id`, `pod`, `direction`, `path` (the `mesh_path` value, so `same_node` for a
//! connection carried inside the agent), `src.addr`, `src.workload`, `src.namespace`,
//! `src.identity`, `dst.addr`, `dst.workload`, `dst.namespace`, `dst.identity`, `dst.service`,
//! `bytes.to_dst`, `bytes.to_src`, `duration_ms`, `verdict` (`allowed` or `denied`), `reason`
//! (the stable kind of a denial or failure, else `-`), `flags` (the response flag) and
//! `detail` (the human-readable cause, else `-`).
//!
//! Each request on an HTTP port writes one more `INFO` event with target [`ACCESS_LOG`]
//! (message `request`): `pod`, `direction`, `path`, the peers' identities, workloads and
//! service, `http.method`, `http.path`, `http.protocol`, `http.status`, `grpc.status`,
//! `route`, `attempts`, `duration_ms`, `flags`, `reason` and `detail`; one request in
//! [`Telemetry::log_requests_every`] when sampled.
//!
//! The same record is also kept in memory: the last [`RECENT_CONNECTIONS`] ended connections,
//! numbered in order ([`Telemetry::recent`]), for `/debug/flows`.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use mesh_core::SpiffeId;
use mesh_core::model::{NamespacedName, NodeSnapshot, Workload};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

mod metered;
mod metrics;
mod requests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

pub use metered::{Activity, Ended, Metered, Side};
use metrics::{DeniedLabels, Metrics, TcpLabels};
use requests::RequestMetrics;
pub use requests::RequestRecord;

/// The tracing target of the access log.
pub const ACCESS_LOG: &str = "mesh::access";

/// The label value of what is not known.
pub const UNKNOWN: &str = "unknown";

/// The DNS suffix of service names in `destination_service`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// How many ended connections [`Telemetry::recent`] remembers.
pub const RECENT_CONNECTIONS: usize = 4096;

/// The `reason` of a connection closed because the configuration in force no longer admits
/// it (flag `DENY`, verdict `denied`).
pub const POLICY_REVOKED: &str = "policy_revoked";

// === Label values ===

/// Which side of the connection reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reporter {
    /// The caller's proxy (outbound).
    Source,
    /// The callee's proxy (inbound).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    pub fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

/// How the connection's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeshPath {
    /// In an HBONE tunnel (mutual TLS) between two nodes' proxies.
    Hbone,
    /// Plaintext from outside the mesh into a meshed pod.
    Plaintext,
    /// Straight to a destination outside the mesh (or to an unmeshed endpoint).
    Direct,
    /// Between two pods this agent serves, carried inside the agent (no tunnel, no TLS).
    SameNode,
}

impl MeshPath {
    pub fn as_str(self) -> &'static str {
        match self {
            MeshPath::Hbone => "hbone",
            MeshPath::Plaintext => "plaintext",
            MeshPath::Direct => "direct",
            MeshPath::SameNode => "same_node",
        }
    }

    pub fn security(self) -> SecurityPolicy {
        match self {
            MeshPath::Hbone => SecurityPolicy::MutualTls,
            MeshPath::SameNode => SecurityPolicy::NodeLocal,
            MeshPath::Plaintext | MeshPath::Direct => SecurityPolicy::None,
        }
    }
}

/// `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityPolicy {
    /// Mutual TLS between two proxies.
    MutualTls,
    /// Not encrypted, never on a wire: both ends are pods of this agent (see the module
    /// documentation).
    NodeLocal,
    /// Not encrypted.
    None,
}

impl SecurityPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SecurityPolicy::MutualTls => "mutual_tls",
            SecurityPolicy::NodeLocal => "node_local",
            SecurityPolicy::None => "none",
        }
    }
}

/// How a connection ended (`response_flags`); see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum ResponseFlag {
    None,
    Denied,
    ConnectFailed,
    NoRoute,
    Overflow,
    IdleTimeout,
    Drained,
    Io,
    /// A request got no response within its route's timeout (L7).
    UpstreamTimeout,
    /// A request the proxy refused as malformed (L7: a path that cannot be normalized).
    BadRequest,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Denied => "DENY",
            ResponseFlag::ConnectFailed => "CONNECT",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::Overflow => "UO",
            ResponseFlag::IdleTimeout => "IDLE",
            ResponseFlag::Drained => "DRAIN",
            ResponseFlag::Io => "IO",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::BadRequest => "DPE",
        }
    }
}

// === Who and where ===

/// One end of a connection, as far as the proxy knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// The owner of the pod (see [`owner_name`]).
    pub workload: Option<String>,
    pub namespace: Option<String>,
    pub identity: Option<SpiffeId>,
}

impl Peer {
    /// A workload of the configuration.
    pub fn of_workload(w: &Workload) -> Peer {
        Peer {
            workload: Some(owner_name(&w.name.name).to_string()),
            namespace: Some(w.name.namespace.clone()),
            identity: Some(w.identity.clone()),
        }
    }

    /// A pod known by name only.
    pub fn of_pod(pod: &NamespacedName) -> Peer {
        Peer {
            workload: Some(owner_name(&pod.name).to_string()),
            namespace: Some(pod.namespace.clone()),
            identity: None,
        }
    }

    /// A caller known by its verified identity only: the namespace is the identity's.
    pub fn of_identity(id: &SpiffeId) -> Peer {
        Peer {
            workload: None,
            namespace: id.workload_parts().map(|(ns, _)| ns.to_string()),
            identity: Some(id.clone()),
        }
    }
}

/// The name of the workload that owns the pod `pod`: the pod name without the random suffix
/// a ReplicaSet (`-<hash>-<5>`), DaemonSet or Job (`-<5>`) adds. Other names (StatefulSet
/// ordinals, pods created by hand) are kept whole. Generated suffixes use Kubernetes' own
/// alphabet (no vowels, no 0, 1 or 3), which ordinary words rarely match.
pub fn owner_name(pod: &str) -> &str {
    fn generated(s: &str, lengths: std::ops::RangeInclusive<usize>) -> bool {
        lengths.contains(&s.len())
            && s.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
    }
    let Some((rest, suffix)) = pod.rsplit_once('-') else {
        return pod;
    };
    if rest.is_empty() || !generated(suffix, 5..=5) {
        return pod;
    }
    match rest.rsplit_once('-') {
        Some((owner, hash)) if !owner.is_empty() && generated(hash, 6..=10) => owner,
        _ => rest,
    }
}

/// `destination_service` of a service: its DNS name.
pub fn service_host(service: &NamespacedName) -> String {
    format!(
        "{}.{}.svc.{CLUSTER_DOMAIN}",
        service.name, service.namespace
    )
}

/// The pod behind `ip`: an endpoint of `service`, or else a workload of this node.
pub fn endpoint_pod(
    snapshot: &NodeSnapshot,
    service: Option<&NamespacedName>,
    ip: std::net::Ipv4Addr,
) -> Option<NamespacedName> {
    if let Some(svc) = service.and_then(|s| snapshot.services.get(s)) {
        return svc
            .endpoints
            .iter()
            .find(|e| e.ip == ip)
            .and_then(|e| e.workload.clone());
    }
    snapshot
        .workloads
        .values()
        .find(|w| w.ips.contains(&ip))
        .map(|w| w.name.clone())
}

/// What the proxy knows about a connection when it starts accounting for it.
#[derive(Debug, Clone)]
pub struct ConnMeta {
    /// The meshed pod this proxy serves the connection for.
    pub pod: NamespacedName,
    pub reporter: Reporter,
    pub path: MeshPath,
    pub src: Peer,
    pub dst: Peer,
    /// The caller's address, when this side sees it.
    pub src_addr: Option<SocketAddr>,
    /// Where the connection goes (the chosen endpoint, or the CONNECT target).
    pub dst_addr: SocketAddr,
    /// The DNS name of the service the caller addressed.
    pub service: Option<String>,
    /// What an inbound connection was admitted on (`reporter="destination"` only), so that a
    /// policy change can be checked against it ([`Telemetry::revoke_where`]).
    pub admission: Option<Admission>,
}

/// What the destination admitted a connection on: with the pod (`ConnMeta::pod`) and the
/// address the caller asked for (`ConnMeta::dst_addr`, its port), all that the policy decides
/// on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The identity admission decided on: the one the caller's certificate proves (HBONE),
    /// the one configured for the calling pod (same node), or none (plaintext).
    pub caller: Option<SpiffeId>,
    /// The connection's requests are checked one by one (an L7 port).
    pub requests_checked: bool,
    /// A plaintext connection from the node to a port the kubelet probes, admitted without
    /// policy ([`crate::inbound::probe`]): it stays admitted while the port is a probe port.
    pub node_probe: bool,
}

/// Why the proxy ends a connection from outside the loop that carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cut {
    /// The shutdown grace period ended ([`Telemetry::cut_all`]).
    Drain,
    /// The configuration in force no longer admits it ([`Telemetry::revoke_where`]); the
    /// cause in words.
    Revoked(String),
}

impl ConnMeta {
    /// A connection of `pod` to `dst_addr`; the peers are filled in by the caller.
    pub fn new(
        pod: NamespacedName,
        reporter: Reporter,
        path: MeshPath,
        dst_addr: SocketAddr,
    ) -> ConnMeta {
        ConnMeta {
            pod,
            reporter,
            path,
            src: Peer::default(),
            dst: Peer::default(),
            src_addr: None,
            dst_addr,
            service: None,
            admission: None,
        }
    }
}

// === impl Telemetry ===

/// The connection telemetry of the agent: shared by every pod's proxy; cheap to clone.
#[derive(Clone)]
pub struct Telemetry {
    inner: Arc<Inner>,
}

struct Inner {
    metrics: Metrics,
    requests: RequestMetrics,
    table: Mutex<BTreeMap<u64, Arc<Live>>>,
    next_id: AtomicU64,
    /// Connections in the table plus accepted connections not yet in it ([`Pending`]).
    busy: watch::Sender<usize>,
    /// Set when the drain starts: request-level connections finish their requests and close.
    draining: watch::Sender<bool>,
    /// The last ended connections, oldest first.
    recent: Mutex<VecDeque<Arc<ConnEvent>>>,
    next_seq: AtomicU64,
}

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("live", &self.live())
            .finish()
    }
}

impl Telemetry {
    /// Registers the connection metrics in `registry`.
    pub fn new(registry: &mut Registry) -> Telemetry {
        Telemetry {
            inner: Arc::new(Inner {
                metrics: Metrics::register(registry),
                requests: RequestMetrics::register(registry),
                table: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                busy: watch::Sender::new(0),
                draining: watch::Sender::new(false),
                recent: Mutex::new(VecDeque::with_capacity(RECENT_CONNECTIONS)),
                next_seq: AtomicU64::new(1),
            }),
        }
    }

    /// Starts accounting for a connection the proxy carries: counts it opened and lists it.
    pub fn open(&self, meta: ConnMeta) -> ConnGuard {
        self.start(meta, true)
    }

    /// Records a connection refused by policy before it was carried: opened and closed with
    /// `DENY`, the denial counted with `reason`, and its access-log line.
    pub fn denied(&self, meta: ConnMeta, reason: &'static str, detail: impl fmt::Display) {
        self.start(meta, false).deny(reason, detail);
    }

    /// Records a connection the proxy could not carry (no route, over the cap): opened and
    /// closed with `flag`, and its access-log line.
    pub fn failed(
        &self,
        meta: ConnMeta,
        flag: ResponseFlag,
        reason: &'static str,
        detail: impl fmt::Display,
    ) {
        self.start(meta, false).fail(flag, reason, detail);
    }

    /// `carried`: the connection will carry bytes, so its byte series are fetched (created).
    /// A refusal carries none and leaves no empty byte series behind.
    fn start(&self, meta: ConnMeta, carried: bool) -> ConnGuard {
        let m = &self.inner.metrics;
        let labels = TcpLabels::new(&meta);
        m.opened.get_or_create(&labels).inc();
        let (to_dst_total, to_src_total) = if carried {
            (
                m.received.get_or_create_owned(&labels),
                m.sent.get_or_create_owned(&labels),
            )
        } else {
            (Counter::default(), Counter::default())
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(Live {
            id,
            opened: SystemTime::now(),
            started: Instant::now(),
            to_dst: AtomicU64::new(0),
            to_src: AtomicU64::new(0),
            last_nanos: AtomicU64::new(0),
            to_dst_total,
            to_src_total,
            cut: OnceLock::new(),
            cut_notify: Notify::new(),
            meta,
        });
        self.table().insert(id, live.clone());
        self.inner.busy.send_modify(|n| *n += 1);
        ConnGuard {
            telemetry: self.clone(),
            live,
            labels,
            flag: ResponseFlag::None,
            denied: false,
            reason: None,
            detail: None,
        }
    }

    /// Records one HTTP or gRPC request of a connection described by `meta`: counts it in
    /// `istio_requests_total` and `istio_request_duration_milliseconds`, and writes its
    /// access-log line (one in [`Telemetry::log_requests_every`]).
    pub fn request(&self, meta: &ConnMeta, record: &RequestRecord<'_>) {
        self.inner.requests.record(meta, record);
    }

    /// Writes the access-log line of one request in `n` (metrics count every request).
    pub fn log_requests_every(&self, n: u64) {
        self.inner.requests.set_log_every(n);
    }

    /// Marks an accepted connection that is not accounted for yet, so a drain waits for it.
    pub fn pending(&self) -> Pending {
        self.inner.busy.send_modify(|n| *n += 1);
        Pending {
            telemetry: self.clone(),
        }
    }

    /// Connections open now.
    pub fn live(&self) -> usize {
        self.table().len()
    }

    /// Resolves once no connection is open or pending.
    pub async fn idle(&self) {
        let mut busy = self.inner.busy.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = busy.wait_for(|n| *n == 0).await;
    }

    /// Marks the start of a drain: connections served request by request are asked to finish
    /// ([`Telemetry::draining`]); the others run on until they end or are cut.
    pub fn start_drain(&self) {
        self.inner.draining.send_replace(true);
    }

    /// Resolves once the drain started.
    pub async fn draining(&self) {
        let mut rx = self.inner.draining.subscribe();
        // The sender lives in `self`: waiting cannot fail.
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Ends every open connection (at the end of a drain). Connections carried by the proxy's
    /// own copy loops close at once with `DRAIN`; the others when their task is dropped.
    /// Returns how many were open.
    pub fn cut_all(&self) -> usize {
        let live: Vec<Arc<Live>> = self.table().values().cloned().collect();
        for l in &live {
            l.cut(Cut::Drain);
        }
        live.len()
    }

    /// Closes the open connections that the configuration in force no longer admits: for
    /// each one with an [`Admission`], `decide` returns the cause in words when it must go.
    /// Each closes within moments, wherever it is carried (a copy loop, an HBONE splice, a
    /// request handler), with flag `DENY`, reason [`POLICY_REVOKED`] and the cause as its
    /// detail, and counts in `mesh_tcp_connections_denied_total{reason="policy_revoked"}`.
    /// Returns how many were revoked.
    ///
    /// `decide` runs without the table's lock held.
    pub fn revoke_where(
        &self,
        mut decide: impl FnMut(&ConnMeta, &Admission) -> Option<String>,
    ) -> usize {
        let admitted: Vec<Arc<Live>> = self
            .table()
            .values()
            .filter(|l| l.meta.admission.is_some() && l.cut.get().is_none())
            .cloned()
            .collect();
        let mut revoked = 0;
        for l in admitted {
            let Some(admission) = &l.meta.admission else {
                continue;
            };
            if let Some(detail) = decide(&l.meta, admission) {
                revoked += usize::from(l.cut(Cut::Revoked(detail)));
            }
        }
        revoked
    }

    /// The open connections, oldest first.
    pub fn connections(&self) -> Vec<ConnInfo> {
        let live: Vec<Arc<Live>> = self.table().values().cloned().collect();
        live.iter().map(|l| l.info()).collect()
    }

    /// The ended connections numbered after `after` (0 for every one still remembered),
    /// oldest first. Numbers start at 1 and have no gaps: a reader that finds the first one
    /// above `after + 1` knows it missed some.
    pub fn recent(&self, after: u64) -> Vec<Arc<ConnEvent>> {
        let recent = lock(&self.inner.recent);
        let skip = recent.partition_point(|e| e.seq <= after);
        recent.range(skip..).cloned().collect()
    }

    fn remember(&self, guard: &ConnGuard) {
        let mut recent = lock(&self.inner.recent);
        // Numbered under the lock, so the queue stays in order.
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        if recent.len() == RECENT_CONNECTIONS {
            recent.pop_front();
        }
        recent.push_back(Arc::new(ConnEvent::new(seq, guard)));
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Live>>> {
        match self.inner.table.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn closed(&self, guard: &mut ConnGuard) {
        guard.record_cut();
        let live = &guard.live;
        guard.labels.response_flags = guard.flag;
        self.inner.metrics.closed.get_or_create(&guard.labels).inc();
        self.table().remove(&live.id);
        self.inner.busy.send_modify(|n| *n = n.saturating_sub(1));
        access_log(guard);
        self.remember(guard);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(t) => t,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// An accepted connection not yet accounted for; see [`Telemetry::pending`].
pub struct Pending {
    telemetry: Telemetry,
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.telemetry
            .inner
            .busy
            .send_modify(|n| *n = n.saturating_sub(1));
    }
}

// === Live connections ===

/// What the table, the guard, the metered stream and the watchdog share.
struct Live {
    id: u64,
    meta: ConnMeta,
    opened: SystemTime,
    started: Instant,
    to_dst: AtomicU64,
    to_src: AtomicU64,
    /// Nanoseconds from `started` to the last byte either way.
    last_nanos: AtomicU64,
    /// `istio_tcp_received_bytes_total` of this connection's labels.
    to_dst_total: Counter,
    /// `istio_tcp_sent_bytes_total` of this connection's labels.
    to_src_total: Counter,
    /// Set once, by the first cut.
    cut: OnceLock<Cut>,
    cut_notify: Notify,
}

impl Live {
    /// Cuts the connection unless it was cut already; true if this call did.
    fn cut(&self, cut: Cut) -> bool {
        let set = self.cut.set(cut).is_ok();
        if set {
            self.cut_notify.notify_waiters();
        }
        set
    }

    fn add(&self, dir: Flow, n: usize) {
        let n = n as u64;
        match dir {
            Flow::ToDst => {
                self.to_dst.fetch_add(n, Ordering::Relaxed);
                self.to_dst_total.inc_by(n);
            }
            Flow::ToSrc => {
                self.to_src.fetch_add(n, Ordering::Relaxed);
                self.to_src_total.inc_by(n);
            }
        }
        let since = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_nanos.store(since, Ordering::Relaxed);
    }

    /// How long since the last byte (or since the start, before any).
    fn quiet_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_nanos.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }

    fn bytes(&self) -> (u64, u64) {
        (
            self.to_dst.load(Ordering::Relaxed),
            self.to_src.load(Ordering::Relaxed),
        )
    }

    fn info(&self) -> ConnInfo {
        let m = &self.meta;
        let (to_dst, to_src) = self.bytes();
        let since_epoch = self
            .opened
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        ConnInfo {
            id: self.id,
            pod: m.pod.to_string(),
            direction: m.reporter.direction().into(),
            reporter: m.reporter,
            path: m.path,
            security: m.path.security(),
            src: m.src.clone(),
            dst: m.dst.clone(),
            src_addr: m.src_addr.map(|a| a.to_string()),
            dst_addr: m.dst_addr.to_string(),
            service: m.service.clone(),
            opened_unix_ms: millis(since_epoch),
            age_ms: millis(self.started.elapsed()),
            idle_ms: millis(self.quiet_for()),
            bytes_to_dst: to_dst,
            bytes_to_src: to_src,
        }
    }
}

/// Which way bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    ToDst,
    ToSrc,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One open connection, for `/debug/conns`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnInfo {
    pub id: u64,
    /// The meshed pod the proxy carries it for.
    pub pod: String,
    /// `outbound` or `inbound`.
    pub direction: std::borrow::Cow<'static, str>,
    pub reporter: Reporter,
    pub path: MeshPath,
    pub security: SecurityPolicy,
    pub src: Peer,
    pub dst: Peer,
    pub src_addr: Option<String>,
    pub dst_addr: String,
    pub service: Option<String>,
    pub opened_unix_ms: u64,
    pub age_ms: u64,
    /// Time since the last byte either way.
    pub idle_ms: u64,
    /// Request direction (source to destination), so far.
    pub bytes_to_dst: u64,
    /// Response direction (destination to source), so far.
    pub bytes_to_src: u64,
}

/// One ended connection, with what its access-log line says; see [`Telemetry::recent`].
#[derive(Debug, Clone, Serialize)]
pub struct ConnEvent {
    /// The event's number: 1 for the first connection the agent ended, then one more each.
    pub seq: u64,
    /// The connection's id, as in `/debug/conns` while it was open.
    pub id: u64,
    pub pod: String,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    pub path: MeshPath,
    pub src: Peer,
    pub dst: Peer,
    pub src_addr: Option<String>,
    pub dst_addr: String,
    pub service: Option<String>,
    pub opened_unix_ms: u64,
    pub closed_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_to_dst: u64,
    pub bytes_to_src: u64,
    /// `allowed` or `denied` (by policy, here or at the destination).
    pub verdict: &'static str,
    /// The stable kind of a denial or failure.
    pub reason: Option<&'static str>,
    /// The response flag (`-`, `DENY`, `NR`, ...).
    pub flags: &'static str,
    /// The cause in words.
    pub detail: Option<String>,
}

impl ConnEvent {
    fn new(seq: u64, guard: &ConnGuard) -> ConnEvent {
        let live = &guard.live;
        let m = &live.meta;
        let (to_dst, to_src) = live.bytes();
        let opened = live
            .opened
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let duration = live.started.elapsed();
        ConnEvent {
            seq,
            id: live.id,
            pod: m.pod.to_string(),
            direction: m.reporter.direction(),
            path: m.path,
            src: m.src.clone(),
            dst: m.dst.clone(),
            src_addr: m.src_addr.map(|a| a.to_string()),
            dst_addr: m.dst_addr.to_string(),
            service: m.service.clone(),
            opened_unix_ms: millis(opened),
            closed_unix_ms: millis(opened + duration),
            duration_ms: millis(duration),
            bytes_to_dst: to_dst,
            bytes_to_src: to_src,
            verdict: if guard.denied { "denied" } else { "allowed" },
            reason: guard.reason,
            flags: guard.flag.as_str(),
            detail: guard.detail.clone(),
        }
    }
}

// === impl ConnGuard ===

/// One accounted connection; dropping it records the end. See the module documentation.
pub struct ConnGuard {
    telemetry: Telemetry,
    live: Arc<Live>,
    labels: TcpLabels,
    flag: ResponseFlag,
    denied: bool,
    reason: Option<&'static str>,
    detail: Option<String>,
}

impl fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnGuard")
            .field("id", &self.live.id)
            .field("meta", &self.live.meta)
            .field("flag", &self.flag)
            .finish()
    }
}

impl ConnGuard {
    pub fn id(&self) -> u64 {
        self.live.id
    }

    /// Bytes so far: (source to destination, destination to source).
    pub fn bytes(&self) -> (u64, u64) {
        self.live.bytes()
    }

    /// The handle the idle watchdog waits on.
    pub fn activity(&self) -> Activity {
        Activity(self.live.clone())
    }

    /// The connection was refused by policy: it closes with `DENY` and counts in
    /// `mesh_tcp_connections_denied_total` with `reason`.
    pub fn deny(&mut self, reason: &'static str, detail: impl fmt::Display) {
        self.telemetry
            .inner
            .metrics
            .denied
            .get_or_create(&DeniedLabels::new(&self.labels, reason))
            .inc();
        self.denied = true;
        self.fail(ResponseFlag::Denied, reason, detail);
    }

    /// Records why the connection was cut, if it was: a revocation (see
    /// [`Telemetry::revoke_where`]) replaces whatever its end was recorded as before (a copy
    /// error the cut itself caused) unless a denial is recorded already (it counts once), a
    /// drain ends it with `DRAIN` unless an outcome is recorded already. Done anyway when the
    /// guard is dropped.
    pub fn record_cut(&mut self) {
        match self.live.cut.get() {
            Some(Cut::Revoked(detail)) if !self.denied => {
                let detail = detail.clone();
                self.flag = ResponseFlag::None;
                self.deny(POLICY_REVOKED, detail);
            }
            Some(Cut::Drain) if self.flag == ResponseFlag::None => {
                self.flag = ResponseFlag::Drained;
            }
            _ => {}
        }
    }

    /// The connection failed or was ended by the proxy: it closes with `flag`. The first
    /// outcome recorded wins.
    pub fn fail(&mut self, flag: ResponseFlag, reason: &'static str, detail: impl fmt::Display) {
        if self.flag != ResponseFlag::None {
            return;
        }
        self.flag = flag;
        self.reason = Some(reason);
        self.detail = Some(detail.to_string());
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let telemetry = self.telemetry.clone();
        telemetry.closed(self);
    }
}

fn access_log(guard: &ConnGuard) {
    struct Or<'a, T>(&'a Option<T>);
    impl<T: fmt::Display> fmt::Display for Or<'_, T> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self.0 {
                Some(v) => v.fmt(f),
                None => f.write_str("-"),
            }
        }
    }
    let live = &guard.live;
    let m = &live.meta;
    let (to_dst, to_src) = live.bytes();
    let unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.to_string());
    tracing::info!(
        target: ACCESS_LOG,
        pod = %m.pod,
        conn.id = live.id,
        direction = m.reporter.direction(),
        path = m.path.as_str(),
        src.addr = %Or(&m.src_addr),
        src.workload = %unknown(&m.src.workload),
        src.namespace = %unknown(&m.src.namespace),
        src.identity = %Or(&m.src.identity),
        dst.addr = %m.dst_addr,
        dst.workload = %unknown(&m.dst.workload),
        dst.namespace = %unknown(&m.dst.namespace),
        dst.identity = %Or(&m.dst.identity),
        dst.service = %unknown(&m.service),
        bytes.to_dst = to_dst,
        bytes.to_src = to_src,
        duration_ms = millis(live.started.elapsed()),
        verdict = if guard.denied { "denied" } else { "allowed" },
        reason = guard.reason.unwrap_or("-"),
        flags = guard.flag.as_str(),
        detail = %Or(&guard.detail),
        "connection"
    );
}
