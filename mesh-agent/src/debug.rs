//! The node debugging commands (`mesh-agent status|pods|conns|certs|policy|flows|bpf|doctor`):
//! the client half. The server half, the pages they read, is [`crate::admin`].
//!
//! Commands about the running agent ask its admin endpoint (`--admin`, 127.0.0.1:15000 by
//! default), so `curl` sees the same JSON: the agent computes every view
//! ([`crate::admin::views`]) from what it holds (the configuration in force, the certificates,
//! the connection telemetry) and from the kernel, which it may read as root. Commands about the
//! kernel alone (`bpf`, `doctor`) read it directly and need root.
//!
//! - [`client`]: the commands' HTTP client of the admin endpoint.
//! - [`commands`]: the commands themselves: fetch, then print a table or JSON.
//! - [`render`]: tables and short forms for people.
//! - attached programs, pinned maps and decoded entries: [`mesh_datapath::kernel`] and
//!   [`mesh_datapath::maps`].

pub mod client;
pub mod commands;
pub mod render;
