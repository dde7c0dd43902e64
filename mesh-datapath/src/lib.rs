//! The kernel side of the node agent: builds and embeds the eBPF programs, loads them and pins
//! their maps, enrolls pods into the maps and links, decodes what the maps hold, queries the
//! kernel for what is attached, and checks a node can run it all (`mesh-agent doctor`).
//!
//! - [`config`]: the datapath's parameters and the pods it enrolls.
//! - [`ebpf`]: loading, pinning, enrollment, typed map access, the flow ring.
//! - [`features`]: the preflight (kernel version, BTF, program types, helpers).
//! - [`cgroup`] and [`discovery`]: the cgroup v2 hierarchy, and a pod's cgroup and network
//!   namespace found on a real node.
//! - [`kernel`] and [`maps`]: attached programs and pinned maps, decoded for people.
//!
//! This is the only crate with aya and the eBPF build (nightly and bpf-linker).
pub mod cgroup;
pub mod config;
pub mod discovery;
pub mod ebpf;
pub mod features;
pub mod kernel;
pub mod maps;

/// The kernel programs, built by build.rs from `mesh-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));
