//! `/debug/flows`: one record per connection, joining what the kernel saw with what the proxy
//! did.
//!
//! Two sources feed it:
//!
//! - the kernel's flow events (`FLOWS_V1`, a ring buffer sk_lookup writes for every inbound
//!   connection attempt to an enrolled pod: steered to the proxy, HBONE, passthrough, no
//!   listener). The agent drains it when flows are read; the kernel keeps about 8,000 events
//!   between reads and counts what it had to drop (`flow_event_dropped`);
//! - the proxy's record of every connection it ended ([`Telemetry::recent`]): who called whom,
//!   the path, bytes, the verdict and the reason of a refusal.
//!
//! A kernel event that steered a connection into the proxy and the proxy's record of that
//! connection (same source and destination address) make one record. The kernel event waits
//! for its partner while the connection is open; one whose connection the proxy never
//! recorded is shown alone after [`UNMATCHED_AFTER`], which is how a capture that lands
//! nowhere shows up. Other kernel events (HBONE tunnels, passthrough ports) are records of
//! their own, as are the proxy's records of connections the kernel does not report
//! (outbound ones, HBONE streams).
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_common::FlowVerdict;
use serde::{Deserialize, Serialize};

use mesh_datapath::config::PodSpec;
use mesh_datapath::ebpf::{FlowReader, ip_from_key};
use mesh_proxy::telemetry::{ConnEvent, Telemetry};

/// How many joined records the agent keeps.
pub const RECORDS: usize = 4096;

/// How long a steered kernel event waits for the proxy's record once no open connection
/// matches it.
pub const UNMATCHED_AFTER: Duration = Duration::from_secs(5);

/// Kernel events waiting for a partner, at most.
const PENDING: usize = 4096;

/// Source addresses of status probes remembered, to mark their records.
const PROBES: usize = 256;

/// What the kernel saw of a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelSide {
    pub unix_ms: u64,
    pub src: String,
    pub dst: String,
    /// `steered`, `mesh`, `passthrough`, `no_listener`.
    pub verdict: String,
}

/// What the proxy did with a connection (see [`ConnEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxySide {
    pub conn_id: u64,
    pub direction: String,
    pub path: String,
    pub src_addr: Option<String>,
    pub dst_addr: String,
    pub src_workload: Option<String>,
    pub src_namespace: Option<String>,
    pub src_identity: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_namespace: Option<String>,
    pub dst_identity: Option<String>,
    pub service: Option<String>,
    pub opened_unix_ms: u64,
    pub duration_ms: u64,
    pub bytes_to_dst: u64,
    pub bytes_to_src: u64,
    /// `allowed` or `denied`.
    pub verdict: String,
    pub reason: Option<String>,
    pub flags: String,
    pub detail: Option<String>,
}

impl From<&ConnEvent> for ProxySide {
    fn from(e: &ConnEvent) -> ProxySide {
        ProxySide {
            conn_id: e.id,
            direction: e.direction.into(),
            path: e.path.as_str().into(),
            src_addr: e.src_addr.clone(),
            dst_addr: e.dst_addr.clone(),
            src_workload: e.src.workload.clone(),
            src_namespace: e.src.namespace.clone(),
            src_identity: e.src.identity.as_ref().map(|i| i.to_string()),
            dst_workload: e.dst.workload.clone(),
            dst_namespace: e.dst.namespace.clone(),
            dst_identity: e.dst.identity.as_ref().map(|i| i.to_string()),
            service: e.service.clone(),
            opened_unix_ms: e.opened_unix_ms,
            duration_ms: e.duration_ms,
            bytes_to_dst: e.bytes_to_dst,
            bytes_to_src: e.bytes_to_src,
            verdict: e.verdict.into(),
            reason: e.reason.map(Into::into),
            flags: e.flags.into(),
            detail: e.detail.clone(),
        }
    }
}

/// One connection: the kernel's view, the proxy's, or both.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Increases by one per record.
    pub seq: u64,
    /// When the record's connection ended (proxy) or was seen (kernel only).
    pub unix_ms: u64,
    /// The enrolled pod it belongs to, when known.
    pub pod: Option<String>,
    pub kernel: Option<KernelSide>,
    pub proxy: Option<ProxySide>,
    /// A connection of `status`'s capture probe.
    pub probe: bool,
}

/// The answer of `/debug/flows`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowPage {
    /// Ask for `after=next` to get what comes next.
    pub next: u64,
    /// Records between `after` and the first one returned were forgotten (the agent keeps
    /// the last [`RECORDS`]).
    pub missed: bool,
    /// Why kernel events are missing, if they are.
    pub kernel_error: Option<String>,
    pub records: Vec<FlowRecord>,
}

/// What a reader of the log asks for.
#[derive(Debug, Clone, Copy)]
pub struct FlowQuery<'a> {
    /// Records numbered after this one (0: from the oldest kept).
    pub after: u64,
    /// Only this pod's.
    pub pod: Option<&'a str>,
    /// The last this many of them.
    pub limit: usize,
    /// Also the connections of `status`'s probes.
    pub probes: bool,
}

/// A kernel event waiting for the proxy's record of its connection.
struct Pending {
    event: KernelSide,
    pod: Option<String>,
    /// When the agent first saw no open connection for it.
    alone_since: Option<Instant>,
}

struct State {
    ring: Option<FlowReader>,
    kernel_error: Option<String>,
    /// The last proxy record taken from the telemetry.
    proxy_seq: u64,
    pending: VecDeque<Pending>,
    records: VecDeque<FlowRecord>,
    next_seq: u64,
    probes: VecDeque<String>,
}

/// The joined flow log of an agent.
pub struct FlowLog {
    pin_dir: PathBuf,
    telemetry: Telemetry,
    state: Mutex<State>,
}

impl FlowLog {
    /// A log of the instance pinned at `pin_dir` and the proxy's `telemetry`.
    pub fn new(pin_dir: PathBuf, telemetry: Telemetry) -> FlowLog {
        FlowLog {
            pin_dir,
            telemetry,
            state: Mutex::new(State {
                ring: None,
                kernel_error: None,
                proxy_seq: 0,
                pending: VecDeque::new(),
                records: VecDeque::new(),
                next_seq: 1,
                probes: VecDeque::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Marks connections from `src` (a probe's source address) as probes.
    pub fn note_probe(&self, src: &str) {
        let mut st = self.state();
        if st.probes.len() == PROBES {
            st.probes.pop_front();
        }
        st.probes.push_back(src.to_string());
    }

    /// The records `q` asks for. `pods` are the enrolled pods, to name the pod of a kernel
    /// event.
    pub fn page(&self, pods: &[PodSpec], q: &FlowQuery<'_>) -> FlowPage {
        self.refresh(pods);
        let st = self.state();
        let first = st.records.front().map_or(st.next_seq, |r| r.seq);
        let missed = q.after > 0 && q.after + 1 < first;
        let matching: Vec<&FlowRecord> = st
            .records
            .iter()
            .filter(|r| r.seq > q.after)
            .filter(|r| q.pod.is_none_or(|p| r.pod.as_deref() == Some(p)))
            .filter(|r| q.probes || !r.probe)
            .collect();
        let skip = matching.len().saturating_sub(q.limit);
        FlowPage {
            next: st.next_seq - 1,
            missed,
            kernel_error: st.kernel_error.clone(),
            records: matching.into_iter().skip(skip).cloned().collect(),
        }
    }

    /// Drains the kernel's events and takes the proxy's new records, joining what belongs
    /// together.
    pub fn refresh(&self, pods: &[PodSpec]) {
        let by_ip: HashMap<String, String> = pods
            .iter()
            .map(|p| (p.ip.to_string(), p.name.clone()))
            .collect();
        let mut st = self.state();
        let kernel = self.drain_kernel(&mut st);
        let proxy = self.telemetry.recent(st.proxy_seq);
        if let Some(last) = proxy.last() {
            st.proxy_seq = last.seq;
        }
        let mut batch: Vec<FlowRecord> = Vec::new();
        for event in kernel {
            let pod = by_ip.get(ip_of(&event.dst)).cloned();
            if event.verdict == FlowVerdict::Steered.name() {
                if st.pending.len() == PENDING
                    && let Some(old) = st.pending.pop_front()
                {
                    batch.push(record(old.event.unix_ms, old.pod, Some(old.event), None));
                }
                st.pending.push_back(Pending {
                    event,
                    pod,
                    alone_since: None,
                });
            } else {
                batch.push(record(event.unix_ms, pod, Some(event), None));
            }
        }
        for e in &proxy {
            let side = ProxySide::from(e.as_ref());
            let partner = side.src_addr.as_ref().and_then(|src| {
                st.pending
                    .iter()
                    .position(|p| p.event.src == *src && p.event.dst == side.dst_addr)
            });
            let kernel = partner.and_then(|i| st.pending.remove(i)).map(|p| p.event);
            let probe = side
                .src_addr
                .as_ref()
                .is_some_and(|src| st.probes.contains(src));
            let mut r = record(e.closed_unix_ms, Some(e.pod.clone()), kernel, Some(side));
            r.probe = probe;
            batch.push(r);
        }
        // Steered events whose connection is neither open nor recorded, for a while.
        if !st.pending.is_empty() {
            let open: Vec<(Option<String>, String)> = self
                .telemetry
                .connections()
                .into_iter()
                .map(|c| (c.src_addr, c.dst_addr))
                .collect();
            let now = Instant::now();
            let mut keep = VecDeque::new();
            while let Some(mut p) = st.pending.pop_front() {
                let is_open = open
                    .iter()
                    .any(|(s, d)| s.as_deref() == Some(p.event.src.as_str()) && *d == p.event.dst);
                if is_open {
                    p.alone_since = None;
                    keep.push_back(p);
                    continue;
                }
                let since = *p.alone_since.get_or_insert(now);
                if now.duration_since(since) >= UNMATCHED_AFTER {
                    batch.push(record(p.event.unix_ms, p.pod, Some(p.event), None));
                } else {
                    keep.push_back(p);
                }
            }
            st.pending = keep;
        }
        batch.sort_by_key(|r| r.unix_ms);
        for mut r in batch {
            r.seq = st.next_seq;
            st.next_seq += 1;
            if st.records.len() == RECORDS {
                st.records.pop_front();
            }
            st.records.push_back(r);
        }
    }

    fn drain_kernel(&self, st: &mut State) -> Vec<KernelSide> {
        if st.ring.is_none() {
            match FlowReader::open(&self.pin_dir) {
                Ok(r) => {
                    st.ring = Some(r);
                    st.kernel_error = None;
                }
                Err(e) => {
                    st.kernel_error = Some(e.to_string());
                    return Vec::new();
                }
            }
        }
        let Some(ring) = st.ring.as_mut() else {
            return Vec::new();
        };
        let clock = Clock::now();
        let mut out = Vec::new();
        for e in ring.drain() {
            let src = SocketAddrV4::new(ip_from_key(e.src_ip), e.src_port);
            let dst = SocketAddrV4::new(ip_from_key(e.dst_ip), e.dst_port);
            out.push(KernelSide {
                unix_ms: clock.unix_ms(e.ktime_ns),
                src: src.to_string(),
                dst: dst.to_string(),
                verdict: FlowVerdict::from_u32(e.verdict)
                    .map_or("unknown", |v| v.name())
                    .to_string(),
            });
        }
        out
    }
}

fn record(
    unix_ms: u64,
    pod: Option<String>,
    kernel: Option<KernelSide>,
    proxy: Option<ProxySide>,
) -> FlowRecord {
    FlowRecord {
        seq: 0,
        unix_ms,
        pod,
        kernel,
        proxy,
        probe: false,
    }
}

fn ip_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(ip, _)| ip)
}

/// Converts `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) to wall-clock time.
struct Clock {
    mono_ns: u64,
    unix_ms: u64,
}

impl Clock {
    fn now() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into `ts`, which is valid for writes.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let mono_ns = if rc == 0 {
            (ts.tv_sec as u64)
                .saturating_mul(1_000_000_000)
                .saturating_add(ts.tv_nsec as u64)
        } else {
            0
        };
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        Clock { mono_ns, unix_ms }
    }

    fn unix_ms(&self, ktime_ns: u64) -> u64 {
        self.unix_ms
            .saturating_sub(self.mono_ns.saturating_sub(ktime_ns) / 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::NamespacedName;
    use mesh_proxy::telemetry::{ConnMeta, MeshPath, Peer, Reporter};
    use prometheus_client::registry::Registry;

    fn log() -> (FlowLog, Telemetry) {
        let telemetry = Telemetry::new(&mut Registry::default());
        let log = FlowLog::new("/nonexistent".into(), telemetry.clone());
        (log, telemetry)
    }

    fn q(after: u64, pod: Option<&str>, limit: usize) -> FlowQuery<'_> {
        FlowQuery {
            after,
            pod,
            limit,
            probes: false,
        }
    }

    fn pods() -> Vec<PodSpec> {
        vec![
            "name=demo/echo,cgroup=/sys/fs/cgroup/x,netns=/run/netns/x,ip=10.244.2.12"
                .parse()
                .expect("pod"),
        ]
    }

    fn kernel(src: &str, dst: &str, verdict: FlowVerdict) -> KernelSide {
        KernelSide {
            unix_ms: 1,
            src: src.into(),
            dst: dst.into(),
            verdict: verdict.name().into(),
        }
    }

    fn denied_plaintext(telemetry: &Telemetry, src: &str, dst: &str) {
        let mut meta = ConnMeta::new(
            NamespacedName::new("demo", "echo"),
            Reporter::Destination,
            MeshPath::Plaintext,
            dst.parse().expect("dst"),
        );
        meta.src_addr = Some(src.parse().expect("src"));
        meta.dst = Peer::of_pod(&meta.pod);
        telemetry.denied(meta, "plaintext_strict", "STRICT");
    }

    /// Feeds kernel events as if drained from the ring.
    fn feed(log: &FlowLog, events: Vec<KernelSide>) {
        let mut st = log.state();
        for event in events {
            let pod = (ip_of(&event.dst) == "10.244.2.12").then(|| "demo/echo".to_string());
            if event.verdict == FlowVerdict::Steered.name() {
                st.pending.push_back(Pending {
                    event,
                    pod,
                    alone_since: None,
                });
            } else {
                let r = record(event.unix_ms, pod, Some(event), None);
                let seq = st.next_seq;
                st.next_seq += 1;
                st.records.push_back(FlowRecord { seq, ..r });
            }
        }
    }

    #[test]
    fn a_steered_connection_and_the_proxys_refusal_are_one_record() {
        let (log, telemetry) = log();
        feed(
            &log,
            vec![
                kernel("10.90.0.10:40000", "10.244.2.12:9000", FlowVerdict::Steered),
                kernel("10.244.1.10:41000", "10.244.2.12:15008", FlowVerdict::Mesh),
            ],
        );
        denied_plaintext(&telemetry, "10.90.0.10:40000", "10.244.2.12:9000");
        let page = log.page(&pods(), &q(0, None, 100));
        assert_eq!(page.records.len(), 2, "{page:?}");
        assert!(page.kernel_error.is_some(), "no pins here");
        let mesh = &page.records[0];
        assert_eq!(
            mesh.kernel.as_ref().map(|k| k.verdict.as_str()),
            Some("mesh")
        );
        assert!(mesh.proxy.is_none());
        let joined = &page.records[1];
        assert_eq!(joined.pod.as_deref(), Some("demo/echo"));
        assert_eq!(
            joined.kernel.as_ref().map(|k| k.verdict.as_str()),
            Some("steered")
        );
        let proxy = joined.proxy.as_ref().expect("the proxy's side");
        assert_eq!(proxy.verdict, "denied");
        assert_eq!(proxy.reason.as_deref(), Some("plaintext_strict"));
        assert_eq!(page.next, joined.seq);

        // Nothing new after `next`; a pod filter.
        assert!(
            log.page(&pods(), &q(page.next, None, 100))
                .records
                .is_empty()
        );
        assert_eq!(
            log.page(&pods(), &q(0, Some("demo/other"), 100))
                .records
                .len(),
            0
        );
        assert_eq!(
            log.page(&pods(), &q(0, Some("demo/echo"), 1)).records,
            vec![joined.clone()]
        );
    }

    #[test]
    fn a_steered_connection_the_proxy_never_recorded_shows_alone_later() {
        let (log, _telemetry) = log();
        feed(
            &log,
            vec![kernel(
                "10.90.0.10:40001",
                "10.244.2.12:9000",
                FlowVerdict::Steered,
            )],
        );
        assert!(
            log.page(&pods(), &q(0, None, 100)).records.is_empty(),
            "still waiting"
        );
        for p in log.state().pending.iter_mut() {
            p.alone_since = Some(Instant::now() - UNMATCHED_AFTER);
        }
        let page = log.page(&pods(), &q(0, None, 100));
        assert_eq!(page.records.len(), 1, "{page:?}");
        assert!(page.records[0].proxy.is_none());
    }

    #[test]
    fn probe_connections_are_marked() {
        let (log, telemetry) = log();
        log.note_probe("127.0.0.1:45000");
        let mut meta = ConnMeta::new(
            NamespacedName::new("demo", "echo"),
            Reporter::Source,
            MeshPath::Direct,
            "10.96.0.10:15001".parse().expect("dst"),
        );
        meta.src_addr = Some("127.0.0.1:45000".parse().expect("src"));
        telemetry.failed(
            meta,
            mesh_proxy::telemetry::ResponseFlag::NoRoute,
            "no_such_port",
            "no port",
        );
        assert!(
            log.page(&pods(), &q(0, None, 100)).records.is_empty(),
            "hidden"
        );
        let page = log.page(
            &pods(),
            &FlowQuery {
                probes: true,
                ..q(0, None, 100)
            },
        );
        assert!(page.records[0].probe, "{page:?}");
    }
}
