//! The certificate manager's metrics.

use mesh_core::SpiffeId;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabels {
    identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RotationLabels {
    identity: String,
    /// `success` or `failure`.
    result: &'static str,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Metrics {
    /// `mesh_cert_expiry_timestamp_seconds{identity}`: when the served certificate expires.
    expiry: Family<IdentityLabels, Gauge>,
    /// `mesh_cert_rotations_total{identity, result}`: every attempt to obtain a certificate
    /// (the first issuance and each renewal or retry).
    rotations: Family<RotationLabels, Counter>,
}

impl Metrics {
    pub(super) fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "mesh_cert_expiry_timestamp_seconds",
            "Unix time at which the workload certificate of an identity expires",
            m.expiry.clone(),
        );
        // The client appends `_total` to counters.
        registry.register(
            "mesh_cert_rotations",
            "Attempts to issue or renew the workload certificate of an identity, by result",
            m.rotations.clone(),
        );
        m
    }

    pub(super) fn issued(&self, id: &SpiffeId, not_after_unix: i64) {
        self.expiry
            .get_or_create(&IdentityLabels { identity: id.uri() })
            .set(not_after_unix);
        self.count(id, "success");
    }

    pub(super) fn failed(&self, id: &SpiffeId) {
        self.count(id, "failure");
    }

    /// Drops the expiry of an identity no longer held; its counters stay.
    pub(super) fn forget(&self, id: &SpiffeId) {
        self.expiry.remove(&IdentityLabels { identity: id.uri() });
    }

    fn count(&self, id: &SpiffeId, result: &'static str) {
        self.rotations
            .get_or_create(&RotationLabels {
                identity: id.uri(),
                result,
            })
            .inc();
    }
}
