//! Demo workloads for the mesh: small, honest servers to run inside pods and the clients that
//! exercise them from the command line or from tests.
//!
//! - [`http`]: HTTP/1.1 and h2c on one port, answering with JSON about each request.
//! - [`tcp`]: a line echo that names itself in each reply.
//! - [`client`]: one call in tcp, http1 or http2 mode, and the kinds a failure falls into.
//! - [`load`]: many calls and a report by pod and failure kind.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod duration;
pub mod http;
pub mod load;
pub mod tcp;
