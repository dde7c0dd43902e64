//! The node agent: loads and attaches the datapath, enrolls pods, runs the node proxy, and
//! carries the node debugging commands.
pub mod admin;
pub mod app;
pub mod cgroup;
pub mod cli;
pub mod cni;
pub mod config;
pub mod control;
pub mod copy;
pub mod debug;
pub mod discovery;
pub mod ebpf;
pub mod enroll;
pub mod features;
pub mod hbone;
pub mod identity;
pub mod inbound;
pub mod l7;
pub mod local;
pub mod netns;
pub mod outbound;
pub mod proxy;
pub mod revocation;
pub mod state;
pub mod telemetry;
pub mod tls;

/// The kernel programs, built by build.rs from `mesh-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));
