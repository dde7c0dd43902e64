//! The node debugging commands (`mesh-agent status|pods|conns|certs|policy|flows|bpf|doctor`)
//! and the admin pages they read.
//!
//! Commands about the running agent ask its admin endpoint (`--admin`, 127.0.0.1:15000 by
//! default), so `curl` sees the same JSON: the agent computes every view ([`views`]) from what
//! it holds (the configuration in force, the certificates, the connection telemetry) and from
//! the kernel, which it may read as root. Commands about the kernel alone (`bpf`, `doctor`)
//! read it directly and need root.
//!
//! - [`client`]: the commands' HTTP client of the admin endpoint.
//! - [`views`]: what the admin endpoint answers on `/debug/pods`, `/debug/policy/...`,
//!   `/debug/status`.
//! - [`probe`]: the per-pod capture check behind `status`.
//! - [`flows`]: the kernel's flow events and the proxy's connection records, joined.
//! - attached programs, pinned maps and decoded entries: [`mesh_datapath::kernel`] and
//!   [`mesh_datapath::maps`].
//! - [`commands`]: the commands themselves: fetch, then print a table or JSON.
//! - [`render`]: tables and short forms for people.

pub mod client;
pub mod commands;
pub mod flows;
pub mod probe;
pub mod render;
pub mod views;

/// Why a debug page could not answer: an HTTP status, a stable kind and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DebugError {
    /// The request names something the agent does not know (a pod, a service, a source).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The agent cannot answer yet (no controller, no configuration).
    #[error("{0}")]
    Unavailable(String),
}

impl DebugError {
    pub fn kind(&self) -> &'static str {
        match self {
            DebugError::NotFound(_) => "not_found",
            DebugError::BadRequest(_) => "bad_request",
            DebugError::Unavailable(_) => "unavailable",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            DebugError::NotFound(_) => 404,
            DebugError::BadRequest(_) => 400,
            DebugError::Unavailable(_) => 503,
        }
    }
}
