//! `cargo xtask image`: the mesh's container images, `mesh-agent` and `mesh-controller`, as
//! OCI image archives (`<target>/images/<image>-<version>.oci.tar`), built on this machine
//! with no registry and no container engine (`mesh_oci::mesh` says what is in them).
//!
//! By default it builds the binaries first (release): the agent and the controller as usual,
//! and `mesh-cni` statically linked for the explicit target, so the copy the agent installs
//! onto a node runs there whatever C library the node has. `--binaries DIR` packages
//! binaries built before (`mesh-cni` in it must be static).
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mesh_oci::mesh::{self, Binaries};

use crate::{cargo, root, run, step, target_dir};

pub fn build(release: bool, binaries: Option<PathBuf>, out: Option<PathBuf>) -> Result<()> {
    let profile = if release { "release" } else { "debug" };
    let bins = match binaries {
        Some(dir) => Binaries::in_dir(&dir),
        None => {
            step(&format!("build mesh-agent and mesh-controller ({profile})"));
            let mut cmd = cargo();
            cmd.args([
                "build",
                "--package",
                "mesh-agent",
                "--package",
                "mesh-controller",
                "--bins",
            ]);
            if release {
                cmd.arg("--release");
            }
            run(&mut cmd, "cargo build")?;
            step(&format!("build mesh-cni statically linked ({profile})"));
            let cargo_bin = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let (mut cmd, cni) =
                mesh::static_cni_build(Path::new(&cargo_bin), release, &target_dir());
            cmd.current_dir(root());
            run(&mut cmd, "cargo build (static mesh-cni)")?;
            let dir = target_dir().join(profile);
            Binaries {
                agent: dir.join(mesh::AGENT),
                controller: dir.join(mesh::CONTROLLER),
                cni,
            }
        }
    };
    let out = out.unwrap_or_else(|| target_dir().join("images"));
    step(&format!("write the images to {}", out.display()));
    let built = mesh::build(&bins, &out).context("build the images")?;
    for b in built {
        let archive = std::fs::metadata(&b.archive)
            .with_context(|| format!("stat {}", b.archive.display()))?
            .len();
        println!(
            "{}\n  {} ({}, layer {}; manifest {})",
            b.name,
            b.archive.display(),
            mib(archive),
            mib(b.layer_size),
            b.manifest.digest
        );
    }
    println!(
        "\nload into a node's containerd: ctr -n k8s.io images import <archive>; \
         into kind: kind load image-archive <archive>; see docs/images.md"
    );
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}
