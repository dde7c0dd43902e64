//! The words every other module speaks in: the name of a namespaced object and a pod's TLS
//! mode. Kept apart so that the policy and route modules need nothing of the model.

use serde::{Deserialize, Serialize};

/// `namespace/name`, the key of every namespaced object in the model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        NamespacedName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Whether a meshed pod also accepts plaintext from outside the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TlsMode {
    /// Only mTLS (HBONE on 15008) is accepted; plaintext to captured ports is refused.
    #[default]
    Strict,
    /// Plaintext is also accepted, and policy sees the caller as unauthenticated.
    Permissive,
}
