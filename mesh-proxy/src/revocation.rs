//! Policy changes reach open connections.
//!
//! A connection is admitted once, when it opens ([`crate::inbound`]). When a configuration
//! change takes away what admitted it (the TrafficTarget is deleted or no longer lists the
//! caller or the port, the pod goes from PERMISSIVE to STRICT under a plaintext connection,
//! the pod leaves the configuration), the connection must not stay open until it idles out:
//! [`watch`] follows the configuration store, and for each applied version, for each pod whose
//! workload or policy changed ([`changed_pods`]), decides every open inbound connection of
//! that pod again with [`crate::inbound::recheck`] (the same pure `authorize`, on the new
//! policy, with the caller identity and port recorded at admission) and closes those no
//! longer allowed ([`Telemetry::revoke_where`]).
//!
//! A revoked connection closes within moments wherever it is carried (a copy loop, an HBONE
//! splice, which resets the stream, or a request handler), and is recorded with flag `DENY`,
//! reason `policy_revoked` and the new decision as its detail: in its access-log line, in
//! `mesh_tcp_connections_denied_total{reason="policy_revoked"}`, and in `mesh-agent flows`.
//! Requests on L7 connections are each authorized already; the re-check covers the
//! connection-level permit.
//!
//! Nothing of this runs per byte: the cost is one pass over the open connections per applied
//! version that changes a pod's policy.

use std::collections::BTreeSet;
use std::sync::Arc;

use mesh_core::model::{NamespacedName, NodeSnapshot};
use tracing::info;

use crate::inbound::recheck;
use crate::state::{Applied, StateStore};
use crate::telemetry::Telemetry;

/// The pods whose workload or policy differ between `old` and `new` (added, removed or
/// changed): only their connections can be decided differently.
pub fn changed_pods(old: &NodeSnapshot, new: &NodeSnapshot) -> BTreeSet<NamespacedName> {
    let pods = old
        .workloads
        .keys()
        .chain(new.workloads.keys())
        .chain(old.policies.keys())
        .chain(new.policies.keys());
    pods.filter(|pod| {
        old.workloads.get(*pod) != new.workloads.get(*pod)
            || old.policies.get(*pod) != new.policies.get(*pod)
    })
    .cloned()
    .collect()
}

/// Decides the open inbound connections of `pods` again on `config` and closes the ones it
/// no longer admits. Returns how many were closed.
pub fn revoke(telemetry: &Telemetry, config: &Applied, pods: &BTreeSet<NamespacedName>) -> usize {
    if pods.is_empty() {
        return 0;
    }
    telemetry.revoke_where(|meta, admission| {
        if !pods.contains(&meta.pod) {
            return None;
        }
        let rejection = recheck(config, &meta.pod, meta.dst_addr, admission).err()?;
        info!(
            pod = %meta.pod,
            src.addr = %meta.src_addr.map_or_else(|| "-".to_string(), |a| a.to_string()),
            src.identity = %admission.caller.as_ref().map_or_else(|| "-".to_string(), |id| id.uri()),
            dst = %meta.dst_addr,
            reason = rejection.kind,
            "policy change: closing an open connection it no longer allows"
        );
        Some(format!(
            "the policy in force no longer allows the connection ({}): {}",
            rejection.kind, rejection.reason
        ))
    })
}

/// Follows `store`: on each applied version, closes the open connections it no longer
/// admits (see the module documentation). Runs until the store is dropped.
pub async fn watch(store: Arc<StateStore>, telemetry: Telemetry) {
    let mut changes = store.subscribe();
    let mut seen = changes.borrow_and_update().clone();
    drop(store);
    while changes.changed().await.is_ok() {
        let now = changes.borrow_and_update().clone();
        let pods = changed_pods(&seen.snapshot, &now.snapshot);
        let closed = revoke(&telemetry, &now, &pods);
        if closed > 0 {
            info!(
                version = ?now.version,
                pods = pods.len(),
                closed,
                "policy change applied to open connections"
            );
        }
        seen = now;
    }
}

#[cfg(test)]
mod tests;
