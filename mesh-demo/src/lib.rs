//! Demo workloads for the mesh: small, honest servers to run inside pods and the clients that
//! exercise them from the command line or from tests.
//!
//! - [`http`]: HTTP/1.1 and h2c on one port, answering with JSON about each request.
//! - [`grpc`]: a gRPC echo service with unary and streaming methods, naming itself in a trailer.
//! - [`tcp`]: a line echo that names itself in each reply.
//! - [`client`]: one call in tcp, http1, http2 or grpc mode, and the kinds a failure falls into.
//! - [`load`]: many calls and a report by pod and failure kind.
#![forbid(unsafe_code)]

pub mod cli;
pub mod client;
pub mod duration;
pub mod grpc;
pub mod http;
pub mod load;
pub mod tcp;
