//! The mesh's container images (`cargo xtask image`, `mesh_oci::mesh`) import into a real
//! containerd and run: built from this test build's binaries, with `mesh-cni` statically
//! linked as `cargo xtask image` links it (built here for the explicit target: a few seconds,
//! once), imported with `ctr images import` into a containerd of the test's own, and a
//! container of each run from the image's configuration. Privileged (containerd and runc need
//! root); needs the runtime's packages and the static C library (`cargo xtask prereqs`).
use std::path::{Path, PathBuf};

use mesh_oci::image::Unpacked;
use mesh_oci::mesh::{self, Binaries};
use mesh_tests::runtime::containerd::{Containerd, Ran};
use mesh_tests::{installed, privileged};

/// What the test runs besides the mesh: (program, a harmless invocation, Debian package).
const PROGRAMS: &[(&str, &[&str], &str)] = &[
    ("containerd", &["--version"], "containerd"),
    ("ctr", &["--version"], "containerd"),
    ("containerd-shim-runc-v2", &["-v"], "containerd"),
    ("runc", &["--version"], "runc"),
    ("ldd", &["--version"], "libc-bin"),
    (
        "test",
        &["-e", "/usr/lib/x86_64-linux-gnu/libc.a"],
        "libc6-dev",
    ),
];

/// The target directory this test binary was built in (`<target>/debug/deps/images-...`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    exe.ancestors()
        .nth(3)
        .expect("<target>/<profile>/deps/<test>")
        .to_path_buf()
}

/// `mesh-cni` statically linked, built as `cargo xtask image --profile debug` builds it.
fn static_cni() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let (mut cmd, path) = mesh::static_cni_build(Path::new(&cargo), false, &target_dir());
    let out = cmd
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .output()
        .expect("run cargo");
    assert!(
        out.status.success(),
        "cargo build of a static mesh-cni failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    path
}

fn assert_ran(what: &str, ran: &Ran, output_has: &str) {
    assert_eq!(
        ran.code, 0,
        "{what} exited with {}:\n{}\nctr: {}",
        ran.code, ran.output, ran.ctr
    );
    assert!(
        ran.output.contains(output_has),
        "{what} did not print {output_has:?}:\n{}\nctr: {}",
        ran.output,
        ran.ctr
    );
}

/// The user a container's process runs as, from its runtime spec: (uid, gid).
fn user(ran: &Ran) -> (u64, u64) {
    let u = &ran.spec["process"]["user"];
    (
        u["uid"].as_u64().unwrap_or(0),
        u["gid"].as_u64().unwrap_or(0),
    )
}

#[test]
fn the_mesh_images_import_into_containerd_and_run() {
    let test = "the_mesh_images_import_into_containerd_and_run";
    if !privileged(test) || !installed(test, PROGRAMS) {
        return;
    }
    let bins = Binaries {
        agent: env!("CARGO_BIN_EXE_mesh-agent").into(),
        controller: env!("CARGO_BIN_EXE_mesh-controller").into(),
        cni: static_cni(),
    };
    let out = tempfile::tempdir().expect("temp dir");
    let built = mesh::build(&bins, out.path()).unwrap_or_else(|e| panic!("build: {e:#}"));
    let (agent, controller) = (&built[0], &built[1]);

    // The plugin as the image holds it (what `mesh-cni install` copies onto the host) names
    // no dynamic loader: it runs on any node, whatever its C library.
    let unpacked = Unpacked::read(&agent.archive).expect("read the agent's archive");
    let index = unpacked.index().expect("index");
    let manifest = unpacked.manifest(&index.manifests[0]).expect("manifest");
    let layer = unpacked.layer(&manifest.layers[0]).expect("layer");
    let cni = layer
        .iter()
        .find(|e| e.path == "usr/local/bin/mesh-cni")
        .expect("mesh-cni in the agent's image");
    let copy = out.path().join("mesh-cni-from-image");
    std::fs::write(&copy, &cni.data).expect("write");
    assert_eq!(
        mesh_oci::elf::interpreter(&copy).expect("an ELF file"),
        None,
        "mesh-cni in the agent's image is dynamically linked"
    );

    let mut rt = Containerd::start("img").unwrap_or_else(|e| panic!("containerd: {e:#}"));
    for b in &built {
        let names = rt
            .import(&b.archive)
            .unwrap_or_else(|e| panic!("import {}: {e:#}", b.image));
        assert!(names.contains(&b.name), "{} not in {names:?}", b.name);
    }

    // The controller runs as the image's unprivileged user, found on the image's PATH.
    let ran = rt
        .run(&controller.name, &["mesh-controller", "--help"], &[])
        .expect("run the controller");
    assert_ran("mesh-controller --help", &ran, "Usage");
    assert_eq!(user(&ran), (65532, 65532), "{}", ran.spec["process"]);
    // With no argv, a container runs the image's entrypoint.
    let spec = rt.create(&controller.name).expect("create a controller");
    assert_eq!(
        spec["process"]["args"],
        serde_json::json!(["/usr/local/bin/mesh-controller"])
    );

    // The agent's image runs the agent and the plugin, as root.
    let ran = rt
        .run(&agent.name, &["mesh-agent", "--help"], &[])
        .expect("run the agent");
    assert_ran("mesh-agent --help", &ran, "Usage");
    assert_eq!(user(&ran), (0, 0));
    assert_eq!(
        ran.spec["process"]["env"]
            .as_array()
            .map(|e| e.iter().any(|v| v == mesh::PATH_ENV)),
        Some(true),
        "{}",
        ran.spec["process"]
    );
    // The plugin's VERSION command, as a container runtime calls it (it has no --help).
    let ran = rt
        .run(&agent.name, &["mesh-cni"], &["CNI_COMMAND=VERSION"])
        .expect("run the plugin");
    assert_ran("mesh-cni VERSION", &ran, "supportedVersions");
}
