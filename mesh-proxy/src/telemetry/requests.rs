//! The proxy's request metrics on L7 ports, named and labelled like Istio's HTTP family, and
//! the access-log line of each request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::metrics::TcpLabels;
use super::{ACCESS_LOG, ConnMeta, MeshPath, Reporter, ResponseFlag, SecurityPolicy, UNKNOWN};

/// The buckets of `istio_request_duration_milliseconds`, Istio's defaults.
const DURATION_BUCKETS_MS: [f64; 14] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];

/// One request the proxy answered or passed on, as it is recorded.
#[derive(Debug, Clone)]
pub struct RequestRecord<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    pub status: u16,
    /// The `grpc-status` of the response head (trailers-only answers), when present.
    pub grpc_status: Option<u16>,
    pub flag: ResponseFlag,
    /// What routed the request (an HTTPRoute rule, a TrafficSplit), or the policy rule that
    /// allowed it on the destination's side.
    pub route: Option<&'a str>,
    /// Until the response head arrived.
    pub duration: Duration,
    /// Attempts made (retries + 1); 0 when the proxy answered itself before any.
    pub attempts: u32,
    /// The stable kind of a refusal or failure.
    pub reason: Option<&'static str>,
    pub detail: Option<&'a str>,
}

/// The labels of `istio_requests_total` and `istio_request_duration_milliseconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct RequestLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub grpc_response_status: String,
    pub response_flags: ResponseFlag,
    pub connection_security_policy: SecurityPolicy,
    pub mesh_path: MeshPath,
    pub route: String,
}

type Durations = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn durations() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

#[derive(Debug)]
pub(super) struct RequestMetrics {
    total: Family<RequestLabels, Counter>,
    duration: Durations,
    /// Log one request in this many (1: every request).
    log_every: AtomicU64,
    seen: AtomicU64,
}

impl RequestMetrics {
    pub(super) fn register(registry: &mut Registry) -> RequestMetrics {
        let m = RequestMetrics {
            total: Family::default(),
            duration: Family::new_with_constructor(durations),
            log_every: AtomicU64::new(1),
            seen: AtomicU64::new(0),
        };
        registry.register(
            "istio_requests",
            "HTTP and gRPC requests the proxy answered or passed on",
            m.total.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from a request's head to its response's head, in milliseconds",
            m.duration.clone(),
        );
        m
    }

    pub(super) fn set_log_every(&self, n: u64) {
        self.log_every.store(n.max(1), Ordering::Relaxed);
    }

    pub(super) fn record(&self, meta: &ConnMeta, r: &RequestRecord<'_>) {
        let tcp = TcpLabels::new(meta);
        let labels = RequestLabels {
            reporter: tcp.reporter,
            source_workload: tcp.source_workload,
            source_workload_namespace: tcp.source_workload_namespace,
            source_principal: tcp.source_principal,
            destination_service: tcp.destination_service,
            destination_workload: tcp.destination_workload,
            destination_workload_namespace: tcp.destination_workload_namespace,
            destination_principal: tcp.destination_principal,
            request_protocol: r.protocol,
            response_code: r.status,
            grpc_response_status: r.grpc_status.map_or_else(String::new, |s| s.to_string()),
            response_flags: r.flag,
            connection_security_policy: tcp.connection_security_policy,
            mesh_path: tcp.mesh_path,
            route: r.route.unwrap_or(UNKNOWN).to_string(),
        };
        self.total.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(r.duration.as_secs_f64() * 1000.0);
        let n = self.seen.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(self.log_every.load(Ordering::Relaxed)) {
            access_log(meta, r);
        }
    }
}

fn access_log(m: &ConnMeta, r: &RequestRecord<'_>) {
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".to_string());
    tracing::info!(
        target: ACCESS_LOG,
        pod = %m.pod,
        direction = m.reporter.direction(),
        path = m.path.as_str(),
        src.identity = %or_dash(m.src.identity.as_ref().map(ToString::to_string)),
        src.workload = %or_dash(m.src.workload.clone()),
        dst.addr = %m.dst_addr,
        dst.identity = %or_dash(m.dst.identity.as_ref().map(ToString::to_string)),
        dst.workload = %or_dash(m.dst.workload.clone()),
        dst.service = %or_dash(m.service.clone()),
        http.method = r.method,
        http.path = r.path,
        http.protocol = r.protocol,
        http.status = r.status,
        grpc.status = %or_dash(r.grpc_status.map(|s| s.to_string())),
        route = r.route.unwrap_or("-"),
        attempts = r.attempts,
        duration_ms = r.duration.as_secs_f64() * 1000.0,
        flags = r.flag.as_str(),
        reason = r.reason.unwrap_or("-"),
        detail = r.detail.unwrap_or("-"),
        "request"
    );
}
