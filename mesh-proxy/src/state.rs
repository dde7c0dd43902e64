//! The agent's configuration store: the last good snapshot from the controller.
//!
//! Updates are applied atomically: an update converts completely into a new snapshot, which
//! then replaces the old one in one step; anything wrong (a delta for another base version, a
//! field that does not convert, a workload of another node) leaves the last good snapshot in
//! force and the update is NACKed with the reason. Readers get an `Arc` of a whole snapshot,
//! never a half-applied one.

use std::sync::Arc;

use mesh_api::{convert, v1};
use mesh_core::model::NodeSnapshot;
use serde::Serialize;
use tokio::sync::watch;

use crate::l7::PortIndex;

pub use mesh_api::Version;

/// The configuration in force.
#[derive(Debug, Serialize)]
pub struct Applied {
    /// `None` until the first snapshot arrives.
    pub version: Option<Version>,
    pub snapshot: NodeSnapshot,
    /// The declared protocols of its ports, indexed once for every connection to ask.
    #[serde(skip)]
    pub ports: PortIndex,
}

impl Applied {
    /// `snapshot` as version `version`, with its indexes.
    pub fn new(version: Option<Version>, snapshot: NodeSnapshot) -> Applied {
        Applied {
            version,
            ports: PortIndex::new(&snapshot),
            snapshot,
        }
    }
}

/// Why an update was refused; the text goes back to the controller in the NACK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("the update has no version")]
    NoVersion,
    #[error("delta for base {base:?}, but {held:?} is applied")]
    BaseMismatch {
        base: Option<Version>,
        held: Option<Version>,
    },
    #[error("{0}")]
    Convert(#[from] convert::ConvertError),
    #[error("workload {workload} is scheduled on node {other}, not on this node {node}")]
    ForeignWorkload {
        workload: String,
        other: String,
        node: String,
    },
}

impl ApplyError {
    pub fn kind(&self) -> &'static str {
        match self {
            ApplyError::NoVersion => "no_version",
            ApplyError::BaseMismatch { .. } => "base_mismatch",
            ApplyError::Convert(_) => "convert",
            ApplyError::ForeignWorkload { .. } => "foreign_workload",
        }
    }
}

/// Counters and the last refusal, for the debugging commands.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StoreStats {
    pub applied: u64,
    /// Of the applied updates, how many were full snapshots (the rest were deltas).
    pub full_snapshots: u64,
    pub refused: u64,
    pub last_refusal: Option<String>,
}

/// The store. Cheap to share (`Arc`); readers subscribe to changes.
pub struct StateStore {
    node: String,
    current: watch::Sender<Arc<Applied>>,
    stats: std::sync::Mutex<StoreStats>,
}

// === impl StateStore ===

impl StateStore {
    pub fn new(node: &str) -> StateStore {
        let empty = Applied::new(
            None,
            NodeSnapshot {
                node: node.to_string(),
                ..NodeSnapshot::default()
            },
        );
        StateStore {
            node: node.to_string(),
            current: watch::Sender::new(Arc::new(empty)),
            stats: std::sync::Mutex::new(StoreStats::default()),
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The configuration in force.
    pub fn current(&self) -> Arc<Applied> {
        self.current.borrow().clone()
    }

    /// Notified on every applied version.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.current.subscribe()
    }

    pub fn stats(&self) -> StoreStats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Applies a full snapshot or a delta; on error nothing changes.
    pub fn apply(&self, update: &v1::ConfigUpdate) -> Result<Version, ApplyError> {
        let result = self.try_apply(update);
        if let Ok(mut stats) = self.stats.lock() {
            match &result {
                Ok(_) => {
                    stats.applied += 1;
                    stats.full_snapshots += u64::from(update.full);
                }
                Err(e) => {
                    stats.refused += 1;
                    stats.last_refusal = Some(e.to_string());
                }
            }
        }
        result
    }

    fn try_apply(&self, update: &v1::ConfigUpdate) -> Result<Version, ApplyError> {
        let version: Version = update.version.ok_or(ApplyError::NoVersion)?.into();
        let held = self.current();
        if !update.full {
            let base = update.base.map(Version::from);
            if base.is_none() || base != held.version {
                return Err(ApplyError::BaseMismatch {
                    base,
                    held: held.version,
                });
            }
        }
        let next = convert::apply(
            &held.snapshot,
            update.full,
            &update.upserts,
            &update.removals,
        )?;
        if let Some(w) = next.workloads.values().find(|w| w.node != self.node) {
            return Err(ApplyError::ForeignWorkload {
                workload: w.name.to_string(),
                other: w.node.clone(),
                node: self.node.clone(),
            });
        }
        self.current
            .send_replace(Arc::new(Applied::new(Some(version), next)));
        Ok(version)
    }
}

/// A store that already holds `snapshot` as version (1, 1), for tests of its readers (here
/// and, with the `testing` feature, in the crates that use the proxy).
#[cfg(any(test, feature = "testing"))]
pub fn holding(snapshot: &NodeSnapshot) -> Arc<StateStore> {
    let store = Arc::new(StateStore::new(&snapshot.node));
    let (upserts, removals) = convert::diff(None, snapshot);
    let applied = store.apply(&v1::ConfigUpdate {
        version: Some(v1::Version { epoch: 1, seq: 1 }),
        full: true,
        base: None,
        upserts,
        removals,
    });
    assert!(applied.is_ok(), "test snapshot refused: {applied:?}");
    store
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::SpiffeId;
    use mesh_core::identity::TrustDomain;
    use mesh_core::model::{NamespacedName, TlsMode, Workload};

    fn workload(name: &str, node: &str) -> Workload {
        let td = TrustDomain::new("cluster.local").expect("td");
        Workload {
            name: NamespacedName::new("default", name),
            uid: name.into(),
            service_account: "default".into(),
            identity: SpiffeId::workload(&td, "default", "default").expect("id"),
            node: node.into(),
            ips: vec![[10, 0, 0, 1].into()],
            mode: TlsMode::Strict,
            labels: Default::default(),
            cgroup: None,
            netns: None,
            ports: vec![],
            excluded_inbound_ports: vec![],
        }
    }

    fn snapshot(workloads: &[Workload]) -> NodeSnapshot {
        NodeSnapshot {
            node: "n1".into(),
            workloads: workloads
                .iter()
                .map(|w| (w.name.clone(), w.clone()))
                .collect(),
            trust_bundle: vec!["root".into()],
            ..NodeSnapshot::default()
        }
    }

    fn update(
        seq: u64,
        base: Option<(&NodeSnapshot, u64)>,
        new: &NodeSnapshot,
    ) -> v1::ConfigUpdate {
        let (upserts, removals) = convert::diff(base.map(|(b, _)| b), new);
        v1::ConfigUpdate {
            version: Some(v1::Version { epoch: 7, seq }),
            full: base.is_none(),
            base: base.map(|(_, s)| v1::Version { epoch: 7, seq: s }),
            upserts,
            removals,
        }
    }

    #[test]
    fn applies_full_then_delta() {
        let store = StateStore::new("n1");
        let rx = store.subscribe();
        let one = snapshot(&[workload("a", "n1")]);
        store.apply(&update(1, None, &one)).expect("full");
        assert!(rx.has_changed().expect("open"));
        let two = snapshot(&[workload("a", "n1"), workload("b", "n1")]);
        store
            .apply(&update(2, Some((&one, 1)), &two))
            .expect("delta");
        let now = store.current();
        assert_eq!(now.version, Some(Version { epoch: 7, seq: 2 }));
        assert_eq!(now.snapshot, two);
    }

    #[test]
    fn refuses_and_keeps_the_last_good_version() {
        let store = StateStore::new("n1");
        let one = snapshot(&[workload("a", "n1")]);
        store.apply(&update(1, None, &one)).expect("full");

        // A delta against a version the store does not hold.
        let two = snapshot(&[workload("b", "n1")]);
        let e = store
            .apply(&update(2, Some((&two, 9)), &two))
            .expect_err("wrong base");
        assert_eq!(e.kind(), "base_mismatch");

        // A workload that belongs to another node.
        let foreign = snapshot(&[workload("a", "n1"), workload("x", "n2")]);
        let e = store
            .apply(&update(3, Some((&one, 1)), &foreign))
            .expect_err("foreign");
        assert_eq!(e.kind(), "foreign_workload");

        // A field that does not convert.
        let mut bad = update(4, Some((&one, 1)), &two);
        for u in &mut bad.upserts {
            if let Some(v1::resource::Kind::Workload(w)) = &mut u.kind {
                w.identity = "spiffe://cluster.local/ns/Bad/sa/x".into();
            }
        }
        let e = store.apply(&bad).expect_err("bad identity");
        assert_eq!(e.kind(), "convert");
        assert!(e.to_string().contains("workload.identity"), "{e}");

        let now = store.current();
        assert_eq!(now.version, Some(Version { epoch: 7, seq: 1 }));
        assert_eq!(now.snapshot, one, "the last good snapshot stays in force");
        let stats = store.stats();
        assert_eq!((stats.applied, stats.refused), (1, 3));
    }
}
