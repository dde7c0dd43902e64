//! The node proxy: it owns the listeners in every enrolled pod's network namespace and carries
//! each captured connection to its destination, in mutual TLS between nodes.
//!
//! - [`proxy`]: the per-pod listeners and their accept loops; the entry point.
//! - [`outbound`]: a captured connection resolved to a destination and carried there (L4),
//!   with [`l7`] for requests on HTTP ports.
//! - [`inbound`]: HBONE tunnels and plaintext arriving at a pod, authorized, handed to the
//!   application; [`revocation`] closes what a policy change no longer allows.
//! - [`hbone`]: HTTP/2 CONNECT over mutual TLS (client pool and server); [`local`]: two pods of
//!   the same node without TLS; [`copy`]: the byte copy with idle timeout.
//! - [`identity`] and [`tls`]: workload keys and certificates, and the TLS that checks them.
//! - [`state`]: the configuration in force, as the controller sent it.
//! - [`telemetry`]: metrics, access logs, the live connection table.
//! - [`config`]: the proxy's own settings.
//!
//! What it needs of the node (sockets opened in a pod's namespace, where an accepted connection
//! was going) comes from `mesh-netns`; it has no eBPF and needs no root to test.
pub mod app_socket;
pub mod config;
pub mod copy;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod local;
pub mod outbound;
pub mod proxy;
pub mod revocation;
pub mod serving;
pub mod state;
pub mod telemetry;
pub mod tls;
