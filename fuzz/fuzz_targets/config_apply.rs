//! The agent's configuration apply: a sequence of `ConfigUpdate` messages (protobuf, each
//! length-delimited, as the controller's stream delivers them) applied to the agent's store.
//!
//! Invariants: nothing panics; a refused update leaves the configuration in force untouched
//! (version and snapshot); an applied snapshot converts back to the wire and, as a full
//! snapshot, converts into the same model again (model -> wire -> model is the identity).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_api::{convert, v1};
use mesh_proxy::state::StateStore;
use prost::Message;

/// The node the agent runs on; seeds use it so that their workloads are accepted.
const NODE: &str = "node-a";
/// Updates per input: enough for a full snapshot and deltas on top of it.
const MAX_UPDATES: usize = 8;

fuzz_target!(|data: &[u8]| {
    let store = StateStore::new(NODE);
    let mut rest = data;
    for _ in 0..MAX_UPDATES {
        if rest.is_empty() {
            break;
        }
        let Ok(update) = v1::ConfigUpdate::decode_length_delimited(&mut rest) else {
            break;
        };
        let before = store.current();
        match store.apply(&update) {
            Ok(version) => {
                let after = store.current();
                assert_eq!(after.version, Some(version));
                round_trip(&after.snapshot);
            }
            Err(e) => {
                assert!(!e.kind().is_empty() && !e.to_string().is_empty());
                let after = store.current();
                assert_eq!(
                    after.version, before.version,
                    "a refused update moved the version"
                );
                assert_eq!(
                    after.snapshot, before.snapshot,
                    "a refused update changed the snapshot"
                );
            }
        }
    }
});

fn round_trip(snapshot: &mesh_core::model::NodeSnapshot) {
    let (upserts, removals) = convert::diff(None, snapshot);
    assert!(removals.is_empty(), "a full snapshot removes nothing");
    let base = mesh_core::model::NodeSnapshot {
        node: snapshot.node.clone(),
        ..Default::default()
    };
    let again = convert::apply(&base, true, &upserts, &[])
        .unwrap_or_else(|e| panic!("an applied snapshot does not convert back: {e}"));
    assert_eq!(
        &again, snapshot,
        "model -> wire -> model changed the snapshot"
    );
}
