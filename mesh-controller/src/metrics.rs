//! The controller's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    call: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PushLabels {
    full: &'static str,
}

/// Counters of certificates and configuration pushes.
#[derive(Default)]
pub struct Metrics {
    issued: Family<KindLabel, Counter>,
    refused: Family<RefusedLabels, Counter>,
    pushes: Family<PushLabels, Counter>,
    nacks: Counter,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "mesh_controller_certificates_issued",
            "Certificates signed, by kind (node or workload)",
            m.issued.clone(),
        );
        registry.register(
            "mesh_controller_requests_refused",
            "Bootstrap and signing requests refused, by call and reason",
            m.refused.clone(),
        );
        registry.register(
            "mesh_controller_config_updates",
            "Configuration updates sent to agents (full snapshot or delta)",
            m.pushes.clone(),
        );
        registry.register(
            "mesh_controller_config_nacks",
            "Configuration versions refused by agents",
            m.nacks.clone(),
        );
        m
    }

    pub fn issued(&self, kind: &'static str) {
        self.issued.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn refused(&self, call: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&RefusedLabels { call, reason })
            .inc();
    }

    pub fn pushed(&self, full: bool) {
        let full = if full { "true" } else { "false" };
        self.pushes.get_or_create(&PushLabels { full }).inc();
    }

    pub fn nacked(&self) {
        self.nacks.inc();
    }
}
