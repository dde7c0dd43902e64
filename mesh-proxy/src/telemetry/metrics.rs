//! The proxy's connection metrics, named and labelled like Istio's TCP family.

use std::fmt::Write as _;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use super::{ConnMeta, MeshPath, Reporter, ResponseFlag, SecurityPolicy, UNKNOWN};

macro_rules! label_value {
    ($($t:ty),*) => {$(
        impl EncodeLabelValue for $t {
            fn encode(&self, encoder: &mut LabelValueEncoder) -> std::fmt::Result {
                encoder.write_str(self.as_str())
            }
        }
    )*};
}

label_value!(Reporter, MeshPath, SecurityPolicy, ResponseFlag);

/// The labels of the four `istio_tcp_*` counters, in Istio's order, then the mesh's own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct TcpLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub response_flags: ResponseFlag,
    pub connection_security_policy: SecurityPolicy,
    pub mesh_path: MeshPath,
}

impl TcpLabels {
    pub(super) fn new(meta: &ConnMeta) -> TcpLabels {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| UNKNOWN.to_string());
        let principal = |id: &Option<mesh_core::SpiffeId>| {
            id.as_ref()
                .map_or_else(|| UNKNOWN.to_string(), |id| id.uri())
        };
        TcpLabels {
            reporter: meta.reporter,
            source_workload: or_unknown(&meta.src.workload),
            source_workload_namespace: or_unknown(&meta.src.namespace),
            source_principal: principal(&meta.src.identity),
            destination_service: or_unknown(&meta.service),
            destination_workload: or_unknown(&meta.dst.workload),
            destination_workload_namespace: or_unknown(&meta.dst.namespace),
            destination_principal: principal(&meta.dst.identity),
            response_flags: ResponseFlag::None,
            connection_security_policy: meta.path.security(),
            mesh_path: meta.path,
        }
    }
}

/// The labels of `mesh_tcp_connections_denied_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DeniedLabels {
    pub reporter: Reporter,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    /// A stable kind (`no_traffic_target`, `plaintext_strict`, `egress_denied`, ...).
    pub reason: &'static str,
}

impl DeniedLabels {
    pub(super) fn new(tcp: &TcpLabels, reason: &'static str) -> DeniedLabels {
        DeniedLabels {
            reporter: tcp.reporter,
            source_principal: tcp.source_principal.clone(),
            destination_workload: tcp.destination_workload.clone(),
            destination_workload_namespace: tcp.destination_workload_namespace.clone(),
            reason,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub(super) struct Metrics {
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    /// Bytes of the response direction (destination to source).
    pub sent: Family<TcpLabels, Counter>,
    /// Bytes of the request direction (source to destination).
    pub received: Family<TcpLabels, Counter>,
    pub denied: Family<DeniedLabels, Counter>,
}

impl Metrics {
    pub(super) fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        // The client appends `_total` to counter names.
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections the proxy opened or refused (refusals close at once)",
            m.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections that ended, with how in response_flags",
            m.closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes of the response direction (destination to source), counted as they flow",
            m.sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes of the request direction (source to destination), counted as they flow",
            m.received.clone(),
        );
        registry.register(
            "mesh_tcp_connections_denied",
            "TCP connections refused by policy, by reason",
            m.denied.clone(),
        );
        m
    }
}
