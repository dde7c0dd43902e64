//! The mesh's own images, as a Kubernetes installation runs them:
//!
//! - `mesh-agent`: the node agent (`/usr/local/bin/mesh-agent`, the entrypoint) and the CNI
//!   plugin (`/usr/local/bin/mesh-cni`), which the DaemonSet's containers run as `mesh-cni
//!   install` to copy it into the host's CNI binary directory. The host's container runtime
//!   runs that copy on the host, whatever C library the host has, so it must be statically
//!   linked ([`static_cni_build`] builds it so); the agent runs as root.
//! - `mesh-controller`: the controller, as the unprivileged user and group 65532 (`mesh`),
//!   with `/etc/passwd` and `/etc/group` naming them. It reaches the API server with the
//!   service account's CA (`/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`, mounted
//!   into every pod); kube's client consults the system's trust store only for a kubeconfig
//!   without a CA, so the image holds no CA bundle.
//!
//! Each holds its executables with the shared libraries and the dynamic loader they name
//! (`ldd`) and a world-writable `/tmp`; no shell, no package manager.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::elf;
use crate::image::{self, Archive, Descriptor, RunConfig};
use crate::layer::{self, Layer};

/// The images' tag: the workspace's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const AGENT: &str = "mesh-agent";
pub const CONTROLLER: &str = "mesh-controller";
/// What Kubernetes and containerd expand a bare image name to (`mesh-agent:0.1.0`).
pub const REPOSITORY: &str = "docker.io/library";
/// Where the executables are, on the images' `PATH`.
pub const BIN_DIR: &str = "/usr/local/bin";
pub const PATH_ENV: &str = "PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The controller's user and group (the value distroless images use for "nonroot").
pub const NONROOT: u32 = 65532;
/// The target a statically linked `mesh-cni` is built for: this machine's, named explicitly
/// so that cargo applies the static flag to it and not to build scripts and proc macros.
pub const STATIC_TARGET: &str = "x86_64-unknown-linux-gnu";

/// Why the mesh's images could not be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{path} is dynamically linked (it names the loader {interpreter}); the host's container runtime runs mesh-cni, so it must be static: build it with `-C target-feature=+crt-static` (cargo xtask image does)"
    )]
    DynamicCni { path: PathBuf, interpreter: String },
    #[error("check {path} is static")]
    Elf {
        path: PathBuf,
        #[source]
        source: elf::Error,
    },
    #[error("the {image} image's layer")]
    Layer {
        image: &'static str,
        #[source]
        source: layer::Error,
    },
    #[error("the {image} image's archive")]
    Archive {
        image: &'static str,
        #[source]
        source: image::Error,
    },
    #[error("create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn kind(&self) -> &'static str {
        match self {
            Error::DynamicCni { .. } => "dynamic_cni",
            Error::Elf { .. } => "elf",
            Error::Layer { .. } => "layer",
            Error::Archive { .. } => "archive",
            Error::Create { .. } => "create",
        }
    }
}

/// The executables the images are made of.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    pub controller: PathBuf,
    /// Statically linked.
    pub cni: PathBuf,
}

impl Binaries {
    /// `mesh-agent`, `mesh-controller` and `mesh-cni` in `dir`.
    pub fn in_dir(dir: &Path) -> Binaries {
        Binaries {
            agent: dir.join(AGENT),
            controller: dir.join(CONTROLLER),
            cni: dir.join("mesh-cni"),
        }
    }
}

/// The full name of the image `image` (`docker.io/library/mesh-agent:0.1.0`).
pub fn full_name(image: &str) -> String {
    format!("{REPOSITORY}/{image}:{VERSION}")
}

/// The file name of the image's archive (`mesh-agent-0.1.0.oci.tar`).
pub fn archive_name(image: &str) -> String {
    format!("{image}-{VERSION}.oci.tar")
}

/// The configuration both images share: `PATH`, the labels, `/` as the working directory.
fn run_config(image: &str, description: &str, entrypoint: &str, user: &str) -> RunConfig {
    RunConfig {
        user: Some(user.into()),
        env: vec![PATH_ENV.into()],
        entrypoint: vec![format!("{BIN_DIR}/{entrypoint}")],
        cmd: vec![],
        working_dir: "/".into(),
        labels: [
            ("org.opencontainers.image.title", image),
            ("org.opencontainers.image.description", description),
            ("org.opencontainers.image.version", VERSION),
            (
                "org.opencontainers.image.licenses",
                env!("CARGO_PKG_LICENSE"),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect(),
    }
}

/// The agent's image: its layer and configuration.
pub fn agent(bins: &Binaries) -> Result<(Layer, RunConfig), Error> {
    if let Some(interpreter) = elf::interpreter(&bins.cni).map_err(|source| Error::Elf {
        path: bins.cni.clone(),
        source,
    })? {
        return Err(Error::DynamicCni {
            path: bins.cni.clone(),
            interpreter,
        });
    }
    let layer_err = |source| Error::Layer {
        image: AGENT,
        source,
    };
    let mut layer = Layer::new();
    layer
        .executable(&format!("{BIN_DIR}/{AGENT}"), &bins.agent)
        .map_err(layer_err)?;
    layer
        .file(&format!("{BIN_DIR}/mesh-cni"), &bins.cni, 0o755)
        .map_err(layer_err)?;
    layer.dir("/tmp", 0o1777, 0, 0).map_err(layer_err)?;
    let config = run_config(
        AGENT,
        "The mesh's node agent (eBPF datapath, pod enrollment, proxy) and its CNI plugin.",
        AGENT,
        "0:0",
    );
    Ok((layer, config))
}

/// The controller's image: its layer and configuration.
pub fn controller(bins: &Binaries) -> Result<(Layer, RunConfig), Error> {
    let layer_err = |source| Error::Layer {
        image: CONTROLLER,
        source,
    };
    let mut layer = Layer::new();
    layer
        .executable(&format!("{BIN_DIR}/{CONTROLLER}"), &bins.controller)
        .map_err(layer_err)?;
    let passwd = format!(
        "root:x:0:0:root:/root:/sbin/nologin\nmesh:x:{NONROOT}:{NONROOT}:mesh:/nonexistent:/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nmesh:x:{NONROOT}:\n");
    layer
        .bytes("/etc/passwd", passwd, 0o644)
        .map_err(layer_err)?;
    layer.bytes("/etc/group", group, 0o644).map_err(layer_err)?;
    layer.dir("/tmp", 0o1777, 0, 0).map_err(layer_err)?;
    let config = run_config(
        CONTROLLER,
        "The mesh's cluster controller: certificate authority, policy compiler, configuration server.",
        CONTROLLER,
        // Numeric, so that Kubernetes can check `runAsNonRoot` against it.
        &format!("{NONROOT}:{NONROOT}"),
    );
    Ok((layer, config))
}

/// One image written by [`build`].
#[derive(Debug, Clone)]
pub struct Built {
    pub image: &'static str,
    /// Its full name in the archive.
    pub name: String,
    pub archive: PathBuf,
    /// Its manifest, as the archive's index lists it.
    pub manifest: Descriptor,
    /// The size of its (one, uncompressed) layer: what it takes on a node.
    pub layer_size: u64,
}

/// Writes the archives of both images into `out_dir` (created).
pub fn build(bins: &Binaries, out_dir: &Path) -> Result<Vec<Built>, Error> {
    fs::create_dir_all(out_dir).map_err(|source| Error::Create {
        path: out_dir.into(),
        source,
    })?;
    let mut built = Vec::new();
    for (image, (layer, config)) in [(AGENT, agent(bins)?), (CONTROLLER, controller(bins)?)] {
        let archive_err = |source| Error::Archive { image, source };
        let mut archive = Archive::new();
        let layer = archive.add_layer(&layer).map_err(archive_err)?;
        let name = full_name(image);
        let manifest = archive
            .add_image(&name, config, std::slice::from_ref(&layer))
            .map_err(archive_err)?;
        let path = out_dir.join(archive_name(image));
        archive.write(&path).map_err(archive_err)?;
        built.push(Built {
            image,
            name,
            archive: path,
            manifest,
            layer_size: layer.size,
        });
    }
    Ok(built)
}

/// The cargo command that builds a statically linked `mesh-cni` (`release` or the debug
/// profile) into `target_dir`, and where it puts it. Only the plugin and its few dependencies
/// are built for the explicit target (`target_dir/x86_64-unknown-linux-gnu/`); the flag, in
/// `CARGO_ENCODED_RUSTFLAGS`, applies to them and not to build scripts or proc macros, and
/// leaves the ordinary build's artifacts alone.
pub fn static_cni_build(cargo: &Path, release: bool, target_dir: &Path) -> (Command, PathBuf) {
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--package", "mesh-cni", "--bin", "mesh-cni"])
        .args(["--target", STATIC_TARGET])
        .arg("--target-dir")
        .arg(target_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", "-Ctarget-feature=+crt-static")
        .env_remove("RUSTFLAGS");
    if release {
        cmd.arg("--release");
    }
    let profile = if release { "release" } else { "debug" };
    let path = target_dir
        .join(STATIC_TARGET)
        .join(profile)
        .join("mesh-cni");
    (cmd, path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::image::Unpacked;
    use crate::ldd;

    /// A statically linked executable as far as its headers go: an ELF64 header with one
    /// `PT_LOAD` program header.
    fn static_elf(path: &Path) {
        let mut b = vec![0u8; 64 + 56];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&1u32.to_le_bytes());
        fs::write(path, b).expect("write");
    }

    /// Stand-ins: any dynamically linked program for the agent and the controller.
    fn bins(dir: &Path) -> Binaries {
        let cni = dir.join("mesh-cni");
        static_elf(&cni);
        Binaries {
            agent: "/bin/true".into(),
            controller: "/bin/true".into(),
            cni,
        }
    }

    /// What `ldd` lists for the stand-ins, with their parent directories, without `/`.
    fn libraries() -> BTreeSet<String> {
        let mut paths = BTreeSet::new();
        for lib in ldd::shared_objects(Path::new("/bin/true")).expect("ldd") {
            for p in lib.ancestors().filter(|p| p != &Path::new("/")) {
                paths.insert(p.to_string_lossy().trim_start_matches('/').to_string());
            }
        }
        paths
    }

    /// The one image in `archive`: its name, configuration and layer entries.
    fn read(archive: &Path) -> (String, crate::image::ConfigFile, Vec<crate::tar::Entry>) {
        let unpacked = Unpacked::read(archive).expect("read back");
        let index = unpacked.index().expect("index");
        assert_eq!(index.manifests.len(), 1);
        let d = &index.manifests[0];
        let manifest = unpacked.manifest(d).expect("manifest");
        let config = unpacked.config(&manifest).expect("config");
        assert_eq!(manifest.layers.len(), 1);
        let entries = unpacked.layer(&manifest.layers[0]).expect("layer");
        assert!(entries.iter().all(|e| e.mtime == 0), "{entries:?}");
        (
            d.annotations[crate::image::NAME_ANNOTATION].clone(),
            config,
            entries,
        )
    }

    #[test]
    fn the_agent_image_holds_the_agent_with_its_libraries_and_the_static_plugin() {
        let dir = tempfile::tempdir().expect("temp dir");
        let built = build(&bins(dir.path()), &dir.path().join("out")).expect("build");
        assert_eq!(built[0].image, AGENT);
        assert!(built[0].archive.ends_with("out/mesh-agent-0.1.0.oci.tar"));
        let (name, config, entries) = read(&built[0].archive);
        assert_eq!(name, "docker.io/library/mesh-agent:0.1.0");
        let mut expected = libraries();
        expected.extend(
            [
                "tmp",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/mesh-agent",
                "usr/local/bin/mesh-cni",
            ]
            .map(String::from),
        );
        let paths: BTreeSet<String> = entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, expected);
        assert_eq!(entries.len(), expected.len());
        assert!(entries.iter().all(|e| (e.uid, e.gid) == (0, 0)));
        let cni = entries
            .iter()
            .find(|e| e.path == "usr/local/bin/mesh-cni")
            .expect("mesh-cni");
        assert_eq!(cni.mode, 0o755);
        assert_eq!(
            cni.data,
            fs::read(dir.path().join("mesh-cni")).expect("read")
        );
        let c = &config.config;
        assert_eq!(c.entrypoint, ["/usr/local/bin/mesh-agent"]);
        assert_eq!(c.user.as_deref(), Some("0:0"));
        assert_eq!(c.env, [PATH_ENV]);
        assert_eq!(c.labels["org.opencontainers.image.version"], "0.1.0");
        assert_eq!(
            (config.architecture.as_str(), config.os.as_str()),
            ("amd64", "linux")
        );
    }

    #[test]
    fn the_controller_image_runs_as_a_named_unprivileged_user() {
        let dir = tempfile::tempdir().expect("temp dir");
        let built = build(&bins(dir.path()), dir.path()).expect("build");
        assert_eq!(built[1].image, CONTROLLER);
        let (name, config, entries) = read(&built[1].archive);
        assert_eq!(name, "docker.io/library/mesh-controller:0.1.0");
        let mut expected = libraries();
        expected.extend(
            [
                "etc",
                "etc/group",
                "etc/passwd",
                "tmp",
                "usr",
                "usr/local",
                "usr/local/bin",
                "usr/local/bin/mesh-controller",
            ]
            .map(String::from),
        );
        let paths: BTreeSet<String> = entries.iter().map(|e| e.path.clone()).collect();
        assert_eq!(paths, expected);
        let file = |path: &str| {
            let e = entries.iter().find(|e| e.path == path).expect(path);
            String::from_utf8(e.data.clone()).expect("text")
        };
        assert!(
            file("etc/passwd")
                .lines()
                .any(|l| l.starts_with("mesh:x:65532:65532:")),
            "{}",
            file("etc/passwd")
        );
        assert!(file("etc/group").lines().any(|l| l == "mesh:x:65532:"));
        let tmp = entries.iter().find(|e| e.path == "tmp").expect("tmp");
        assert_eq!(tmp.mode, 0o1777);
        assert_eq!(config.config.user.as_deref(), Some("65532:65532"));
        assert_eq!(config.config.entrypoint, ["/usr/local/bin/mesh-controller"]);
    }

    #[test]
    fn a_dynamically_linked_plugin_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut bins = bins(dir.path());
        bins.cni = "/bin/true".into();
        let err = build(&bins, dir.path()).expect_err("a dynamic mesh-cni");
        assert_eq!(err.kind(), "dynamic_cni");
        assert!(err.to_string().contains("crt-static"), "{err}");
    }

    #[test]
    fn the_same_binaries_give_the_same_digests() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bins = bins(dir.path());
        let first = build(&bins, &dir.path().join("1")).expect("build");
        let second = build(&bins, &dir.path().join("2")).expect("build");
        for (a, b) in first.iter().zip(&second) {
            assert_eq!(a.manifest.digest, b.manifest.digest, "{}", a.image);
            assert_eq!(
                fs::read(&a.archive).expect("a"),
                fs::read(&b.archive).expect("b")
            );
        }
        assert_ne!(first[0].manifest.digest, first[1].manifest.digest);
    }

    #[test]
    fn the_static_build_names_its_own_target() {
        let (cmd, path) = static_cni_build(Path::new("cargo"), true, Path::new("/t"));
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert!(
            args.windows(2).any(|w| w == ["--target", STATIC_TARGET]),
            "{args:?}"
        );
        assert!(args.contains(&"--release".to_string()));
        let flags = cmd
            .get_envs()
            .find(|(k, _)| *k == "CARGO_ENCODED_RUSTFLAGS")
            .and_then(|(_, v)| v);
        assert_eq!(
            flags,
            Some(std::ffi::OsStr::new("-Ctarget-feature=+crt-static"))
        );
        assert_eq!(
            path,
            Path::new("/t/x86_64-unknown-linux-gnu/release/mesh-cni")
        );
    }
}
