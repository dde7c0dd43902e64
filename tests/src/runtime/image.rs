//! The images the runtime's pods run, built here with no registry: one OCI image archive
//! (an OCI image layout in a tar file, as `ctr images import` takes it) holding two images
//! that share one layer, the `mesh-demo` binary with the shared libraries and the dynamic
//! loader `ldd` names for it:
//!
//! - [`APP_IMAGE`]: no entrypoint; every container names its command (`mesh-demo ...`,
//!   found on the image's `PATH`).
//! - [`SANDBOX_IMAGE`]: `mesh-demo pause`, the placeholder process that holds a pod's
//!   namespaces (the runtime's `sandbox_image`).
//!
//! Built once per cluster into its state directory and imported into every node's runtime.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

/// The applications' image.
pub const APP_IMAGE: &str = "mesh.test/mesh-demo:local";
/// The pod sandbox image (what `registry.k8s.io/pause` is to a real node).
pub const SANDBOX_IMAGE: &str = "mesh.test/pause:local";
/// Where the binary is inside the images.
const BINARY_IN_IMAGE: &str = "/usr/local/bin/mesh-demo";

const LAYER_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";
const CONFIG_TYPE: &str = "application/vnd.oci.image.config.v1+json";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// A blob of the image layout: its digest and size, once written.
struct Blob {
    digest: String,
    size: u64,
}

/// Writes `bytes` into the layout's blob store under its SHA-256 digest.
fn put_blob(layout: &Path, bytes: &[u8]) -> Result<Blob> {
    let sum = ring::digest::digest(&ring::digest::SHA256, bytes);
    let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    let path = layout.join("blobs/sha256").join(&hex);
    fs::write(&path, bytes).with_context(|| format!("write {}", path.display()))?;
    Ok(Blob {
        digest: format!("sha256:{hex}"),
        size: bytes.len() as u64,
    })
}

/// The files a dynamically linked `binary` loads at start: its libraries and the dynamic
/// loader, as `ldd` lists them (absolute paths only; the vDSO has none).
fn shared_objects(binary: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary needs nothing more ("not a dynamic executable").
        let err = String::from_utf8_lossy(&out.stderr);
        ensure!(
            err.contains("not a dynamic executable") || text.contains("statically linked"),
            "ldd {}: {}",
            binary.display(),
            err.trim()
        );
        return Ok(vec![]);
    }
    let mut files = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        match path {
            Some(p) if p.starts_with('/') => files.push(PathBuf::from(p)),
            _ if line.contains("not found") => {
                bail!("ldd {}: a library is missing: {line}", binary.display())
            }
            _ => {}
        }
    }
    Ok(files)
}

/// Copies `src` (symbolic links followed) to `path` inside `rootfs`, creating directories.
fn copy_in(rootfs: &Path, src: &Path, path: &Path) -> Result<()> {
    let dst = rootfs.join(path.strip_prefix("/").unwrap_or(path));
    if let Some(dir) = dst.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    fs::copy(src, &dst).with_context(|| format!("copy {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// A tar archive of the directory `dir`'s contents (owned by root, times zeroed, names in
/// order, so the same files give the same digest).
fn tar(dir: &Path, out: &Path) -> Result<()> {
    let status = Command::new("tar")
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--sort=name",
            "-C",
        ])
        .arg(dir)
        .arg("-cf")
        .arg(out)
        .arg(".")
        .status()
        .context("run tar")?;
    ensure!(
        status.success(),
        "tar of {} failed ({status})",
        dir.display()
    );
    Ok(())
}

/// The image configuration and manifest of one image on `layer`; its index entry.
fn image(
    layout: &Path,
    name: &str,
    layer: &Blob,
    layer_diff: &str,
    entry: &[&str],
) -> Result<Value> {
    let mut config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_diff]},
    });
    if !entry.is_empty() {
        config["config"]["Entrypoint"] = json!(entry);
    }
    let config = put_blob(layout, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {"mediaType": CONFIG_TYPE, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}],
    });
    let manifest = put_blob(layout, &serde_json::to_vec(&manifest)?)?;
    let tag = name.rsplit_once(':').map_or("latest", |(_, t)| t);
    Ok(json!({
        "mediaType": MANIFEST_TYPE,
        "digest": manifest.digest,
        "size": manifest.size,
        "platform": {"architecture": "amd64", "os": "linux"},
        "annotations": {
            // The full name `ctr images import` gives the image.
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": tag,
        },
    }))
}

/// Builds the archive of [`APP_IMAGE`] and [`SANDBOX_IMAGE`] from the `mesh-demo` binary at
/// `demo`, in `dir` (created); returns the archive's path.
pub fn build(demo: &Path, dir: &Path) -> Result<PathBuf> {
    ensure!(
        std::env::consts::ARCH == "x86_64",
        "the test images are built for amd64 only (this is {})",
        std::env::consts::ARCH
    );
    let rootfs = dir.join("rootfs");
    let layout = dir.join("layout");
    fs::create_dir_all(layout.join("blobs/sha256"))
        .with_context(|| format!("create {}", layout.display()))?;
    copy_in(&rootfs, demo, Path::new(BINARY_IN_IMAGE))?;
    for lib in shared_objects(demo)? {
        copy_in(&rootfs, &lib, &lib)?;
    }
    fs::create_dir_all(rootfs.join("tmp"))?;

    let layer_tar = dir.join("layer.tar");
    tar(&rootfs, &layer_tar)?;
    let bytes = fs::read(&layer_tar).with_context(|| format!("read {}", layer_tar.display()))?;
    let layer = put_blob(&layout, &bytes)?;
    // Uncompressed: the layer's digest is its diff ID too.
    let diff = layer.digest.clone();
    drop(bytes);
    fs::remove_file(&layer_tar)?;

    let manifests = vec![
        image(&layout, APP_IMAGE, &layer, &diff, &[])?,
        image(
            &layout,
            SANDBOX_IMAGE,
            &layer,
            &diff,
            &[BINARY_IN_IMAGE, "pause"],
        )?,
    ];
    fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": manifests}))?,
    )?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let archive = dir.join("images.tar");
    tar(&layout, &archive)?;
    fs::remove_dir_all(&layout)?;
    fs::remove_dir_all(&rootfs)?;
    Ok(archive)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_holds_both_images_with_valid_digests() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Any dynamically linked program will do for the layout's shape.
        let archive = build(Path::new("/bin/true"), dir.path()).expect("build the archive");
        let unpacked = dir.path().join("unpacked");
        fs::create_dir(&unpacked).expect("mkdir");
        let st = Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(&unpacked)
            .status()
            .expect("tar");
        assert!(st.success());
        let index: Value =
            serde_json::from_slice(&fs::read(unpacked.join("index.json")).expect("index.json"))
                .expect("JSON");
        let names: Vec<&str> = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .filter_map(|m| m["annotations"]["io.containerd.image.name"].as_str())
            .collect();
        assert_eq!(names, [APP_IMAGE, SANDBOX_IMAGE]);
        // Every blob is stored under its own digest.
        for e in fs::read_dir(unpacked.join("blobs/sha256")).expect("blobs") {
            let e = e.expect("entry");
            let bytes = fs::read(e.path()).expect("blob");
            let sum = ring::digest::digest(&ring::digest::SHA256, &bytes);
            let hex: String = sum.as_ref().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(e.file_name().to_string_lossy(), hex);
        }
        // The sandbox image runs `mesh-demo pause`; the layer has the loader and libc.
        let pause = &index["manifests"][1];
        let manifest: Value = serde_json::from_slice(
            &fs::read(
                unpacked.join("blobs/sha256").join(
                    pause["digest"]
                        .as_str()
                        .expect("digest")
                        .trim_start_matches("sha256:"),
                ),
            )
            .expect("manifest"),
        )
        .expect("JSON");
        let config: Value = serde_json::from_slice(
            &fs::read(
                unpacked.join("blobs/sha256").join(
                    manifest["config"]["digest"]
                        .as_str()
                        .expect("digest")
                        .trim_start_matches("sha256:"),
                ),
            )
            .expect("config"),
        )
        .expect("JSON");
        assert_eq!(
            config["config"]["Entrypoint"],
            json!([BINARY_IN_IMAGE, "pause"])
        );
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .expect("digest")
            .trim_start_matches("sha256:")
            .to_string();
        let list = Command::new("tar")
            .arg("-tf")
            .arg(unpacked.join("blobs/sha256").join(layer))
            .output()
            .expect("tar -t");
        let list = String::from_utf8_lossy(&list.stdout);
        assert!(list.contains("./usr/local/bin/mesh-demo"), "{list}");
        assert!(list.contains("libc.so.6"), "{list}");
        assert!(list.contains("ld-linux"), "{list}");
    }
}
