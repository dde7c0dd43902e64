//! The images the runtime's pods run, built here with no registry: one OCI image archive
//! (an OCI image layout in a tar file, as `ctr images import` takes it) holding two images
//! that share one layer, the `mesh-demo` binary with the shared libraries and the dynamic
//! loader `ldd` names for it (written by `mesh_oci`, as the mesh's own images are):
//!
//! - [`APP_IMAGE`]: no entrypoint; every container names its command (`mesh-demo ...`,
//!   found on the image's `PATH`).
//! - [`SANDBOX_IMAGE`]: `mesh-demo pause`, the placeholder process that holds a pod's
//!   namespaces (the runtime's `sandbox_image`).
//!
//! Built once per cluster into its state directory and imported into every node's runtime.
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use mesh_oci::image::{Archive, RunConfig};
use mesh_oci::layer::Layer;

/// The applications' image.
pub const APP_IMAGE: &str = "mesh.test/mesh-demo:local";
/// The pod sandbox image (what `registry.k8s.io/pause` is to a real node).
pub const SANDBOX_IMAGE: &str = "mesh.test/pause:local";
/// Where the binary is inside the images.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/mesh-demo";

/// Builds the archive of [`APP_IMAGE`] and [`SANDBOX_IMAGE`] from the `mesh-demo` binary at
/// `demo`, in `dir` (created); returns the archive's path.
pub fn build(demo: &Path, dir: &Path) -> Result<PathBuf> {
    ensure!(
        std::env::consts::ARCH == "x86_64",
        "the test images are built for amd64 only (this is {})",
        std::env::consts::ARCH
    );
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut layer = Layer::new();
    layer.executable(BINARY_IN_IMAGE, demo)?;
    layer.dir("/tmp", 0o1777, 0, 0)?;
    let mut archive = Archive::new();
    let layer = archive.add_layer(&layer)?;
    let config = |entrypoint: &[&str]| RunConfig {
        env: vec!["PATH=/usr/local/bin:/usr/bin:/bin".into()],
        entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
        working_dir: "/".into(),
        ..RunConfig::default()
    };
    let layers = std::slice::from_ref(&layer);
    archive.add_image(APP_IMAGE, config(&[]), layers)?;
    archive.add_image(SANDBOX_IMAGE, config(&[BINARY_IN_IMAGE, "pause"]), layers)?;
    let path = dir.join("images.tar");
    archive.write(&path)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use mesh_oci::image::{NAME_ANNOTATION, Unpacked};

    use super::*;

    #[test]
    fn an_archive_holds_both_images_with_valid_digests() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Any dynamically linked program will do for the layout's shape.
        let archive = build(Path::new("/bin/true"), dir.path()).expect("build the archive");
        // Every blob is checked against its digest as it is read.
        let unpacked = Unpacked::read(&archive).expect("read the archive back");
        let index = unpacked.index().expect("index.json");
        let names: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|m| m.annotations.get(NAME_ANNOTATION).map(String::as_str))
            .collect();
        assert_eq!(names, [APP_IMAGE, SANDBOX_IMAGE]);
        // The sandbox image runs `mesh-demo pause`; the layer has the loader and libc.
        let manifest = unpacked.manifest(&index.manifests[1]).expect("manifest");
        let config = unpacked.config(&manifest).expect("config");
        assert_eq!(config.config.entrypoint, [BINARY_IN_IMAGE, "pause"]);
        let app = unpacked.manifest(&index.manifests[0]).expect("manifest");
        assert!(
            unpacked
                .config(&app)
                .expect("config")
                .config
                .entrypoint
                .is_empty()
        );
        let list: Vec<String> = unpacked
            .layer(&manifest.layers[0])
            .expect("layer")
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert!(list.contains(&"usr/local/bin/mesh-demo".into()), "{list:?}");
        assert!(list.iter().any(|p| p.ends_with("libc.so.6")), "{list:?}");
        assert!(list.iter().any(|p| p.contains("ld-linux")), "{list:?}");
    }
}
