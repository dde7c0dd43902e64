//! OCI image archives built on this machine, with no registry and no container engine.
//!
//! - [`layer`]: one reproducible filesystem layer (fixed owners, modes and times, entries in
//!   path order), an executable with the shared libraries and loader it needs ([`ldd`]);
//! - [`image`]: the image configuration, manifest and index, and the image layout archive
//!   that `ctr images import`, `podman load` and `skopeo copy oci-archive:` take, and read
//!   back ([`image::Unpacked`]) as a runtime would;
//! - [`elf`]: whether an executable is statically linked;
//! - [`mesh`]: the mesh's own images, `mesh-agent` and `mesh-controller`
//!   (`cargo xtask image`).
#![forbid(unsafe_code)]

pub mod elf;
pub mod image;
pub mod layer;
pub mod ldd;
pub mod mesh;
pub mod tar;
