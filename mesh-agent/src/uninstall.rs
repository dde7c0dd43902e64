//! Removing the mesh from a node (`mesh-agent run --uninstall-signal FILE`).
//!
//! An agent stopped for an upgrade or a restart leaves its pods captured: their traffic waits
//! for the next agent (STRICT pods stay closed meanwhile). Removing the mesh is the one case
//! where pods must be let go, and the agent cannot tell it from a restart by itself. So it is
//! told: the chart's pre-delete hook (`mesh-controller uninstall`) annotates every agent pod
//! [`ANNOTATION`]`="true"`, which reaches the agent through a downward API file of its pod's
//! annotations (`FILE`). The agent then:
//!
//! 1. drains its proxies and unenrolls every pod (the datapath lets their connections go
//!    directly again),
//! 2. removes everything it pinned, which detaches its programs from the node,
//! 3. answers `/healthz` with 503 `uninstalled` (the hook waits for that), and idles until it
//!    is stopped. Started again while the annotation is set, it only removes what might be
//!    left and idles.
//!
//! The CNI watcher reads the same file (`mesh-cni install --watch --uninstall-signal`) and
//! takes the plugin out of the node's CNI configuration, so new pods start without the mesh.

use std::path::Path;
use std::time::Duration;

/// The pod annotation that asks the agent to remove the mesh from its node.
pub const ANNOTATION: &str = mesh_cni::UNINSTALL_ANNOTATION;

/// How often the annotations file is read.
pub const POLL: Duration = Duration::from_secs(2);

/// Whether the downward API annotations file at `path` asks for the mesh's removal. A file
/// that is missing or unreadable asks nothing.
pub fn requested(path: &Path) -> bool {
    mesh_cni::uninstall_requested(path)
}

/// Resolves once `path` asks for the mesh's removal.
pub async fn until_requested(path: &Path) {
    loop {
        if requested(path) {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}
