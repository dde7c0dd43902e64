//! Developer and CI tasks that cargo alone cannot do.
//!
//! - `cargo xtask prereqs`: install what the build needs, only what is missing.
//! - `cargo xtask test`: the project's test command (format, lints, every test tier, then
//!   every fuzz target for a bounded time).
//! - `cargo xtask demo`: the single-machine mesh: a simulated cluster and the demo scenario.
//! - `cargo xtask clean`: remove what an interrupted test run left behind.
//! - `cargo xtask manifests`: write deploy/*.yaml from the Helm chart ([`xtask::manifests`]).
//! - `cargo xtask image`: the container images `mesh-agent` and `mesh-controller` as OCI
//!   archives under `target/images/`, with no registry.
use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, ExitCode, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod fuzz;
mod image;
mod prereqs;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install missing prerequisites (apt packages, nightly rust-src, bpf-linker, cargo-fuzz,
    /// helm, kubernetes-validate).
    Prereqs,
    /// Run formatting and lint checks and all tests; prints "N passed, N failed, N skipped".
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Seconds each fuzz target runs (default: MESH_FUZZ_SECONDS, else 30). 0 skips
        /// fuzzing, except in CI (CI=true), where that is an error.
        #[arg(long, value_name = "N")]
        fuzz_seconds: Option<u64>,
        /// Extra arguments for `cargo test` (after `--`: a test name filter, ...).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// The mesh on this machine (root): a simulated two-node cluster runs a scenario that shows
    /// mTLS between pods, policy, a traffic split and the kernel counters, then tears down.
    Demo {
        /// Keep the cluster up afterwards and print how to reach it.
        #[arg(long)]
        keep: bool,
        /// Remove a cluster kept with --keep (or left by a killed run) and stop.
        #[arg(long, conflicts_with = "keep")]
        down: bool,
    },
    /// Remove leftovers of interrupted test runs (namespaces, cgroups, pinned objects).
    Clean,
    /// Write deploy/*.yaml (the plain manifests) from the Helm chart deploy/helm/mesh with
    /// its default values; the chart tests fail while they differ.
    Manifests,
    /// Build the container images mesh-agent and mesh-controller as OCI image archives
    /// (target/images/<image>-<version>.oci.tar), with no registry and no container engine.
    Image {
        /// The cargo profile to build and package.
        #[arg(long, default_value = "release", value_parser = ["release", "debug"])]
        profile: String,
        /// Package mesh-agent, mesh-controller and a statically linked mesh-cni from this
        /// directory instead of building them.
        #[arg(long, value_name = "DIR")]
        binaries: Option<PathBuf>,
        /// Where to write the archives (default: target/images).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// The performance ladder (root): no mesh, iptables and eBPF capture, sk_msg, HBONE, HTTP/1.1
    /// with L7 policy, gRPC; each step on a fresh simulated cluster, release build. See
    /// benches/README.md.
    Bench {
        /// The fast mode (under 2 minutes) instead of the full one.
        #[arg(long, alias = "quick")]
        fast: bool,
        /// Only these steps (comma-separated numbers).
        #[arg(long)]
        steps: Option<String>,
        /// Also write the results as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Also write the markdown report here.
        #[arg(long)]
        markdown: Option<PathBuf>,
        /// Print ratios against an earlier run's JSON.
        #[arg(long)]
        compare: Option<PathBuf>,
        /// Also run the stock tools (iperf3, wrk, hey against nginx and iperf3) without and
        /// with the mesh.
        #[arg(long)]
        stock: bool,
        /// More `mesh-bench run` flags, after `--` (e.g. `-- --charts DIR
        /// --agent-arg=--proxy-threads=0`).
        #[arg(last = true)]
        more: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Prereqs => prereqs::ensure(),
        Task::Test {
            no_lint,
            fuzz_seconds,
            rest,
        } => test(no_lint, fuzz_seconds, &rest),
        Task::Demo { keep, down } => demo(keep, down),
        Task::Clean => clean().map(|n| println!("removed {n} leftover objects")),
        Task::Manifests => manifests(),
        Task::Image {
            profile,
            binaries,
            out,
        } => image::build(profile == "release", binaries, out),
        Task::Bench {
            fast,
            steps,
            json,
            markdown,
            compare,
            stock,
            more,
        } => bench(fast, steps, json, markdown, compare, stock, &more),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask manifests`.
fn manifests() -> Result<()> {
    let rendered = xtask::manifests::render(Path::new(xtask::tools::HELM), &root())?;
    for m in xtask::manifests::split(&rendered)? {
        fs::write(root().join(m.path), &m.text).with_context(|| format!("write {}", m.path))?;
        println!("wrote {}", m.path);
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set (relative to the workspace),
/// else the workspace's `target/`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => root().join(dir),
        _ => root().join("target"),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn step(name: &str) {
    println!("\n==> {name}");
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("start {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// What a build from nothing needs on the target directory's filesystem (the test binaries,
/// the release eBPF build, the fuzz build, the runtime test's images), with some margin.
const DISK_NEEDED_GIB: u64 = 8;

/// Fails before building when the disk cannot hold a build from nothing: running out halfway
/// shows up as a linker's bus error or an LLVM I/O failure, far from its cause.
fn check_disk(target: &Path) -> Result<()> {
    // The target directory may not exist yet: measure the nearest existing ancestor.
    let existing = target
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let free = free_bytes(existing)?;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    // `cargo xtask` itself builds into the same directory: only the agent's library says the
    // workspace was built here before.
    let built = fs::read_dir(target.join("debug/deps")).is_ok_and(|entries| {
        entries.flatten().any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("libmesh_datapath-")
        })
    });
    println!(
        "disk: {:.1} GiB free on {} ({})",
        gib(free),
        existing.display(),
        if built {
            "incremental build"
        } else {
            "build from nothing"
        }
    );
    if !built && free < DISK_NEEDED_GIB << 30 {
        bail!(
            "only {:.1} GiB free under {}; a build from nothing needs about {DISK_NEEDED_GIB} GiB \
             (free some space or point CARGO_TARGET_DIR at a larger filesystem)",
            gib(free),
            existing.display()
        );
    }
    Ok(())
}

fn free_bytes(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).context("path with a NUL")?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statvfs {}", path.display()));
    }
    // SAFETY: statvfs succeeded and filled the struct.
    let st = unsafe { st.assume_init() };
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Totals of `cargo test` result lines.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Totals {
    /// Adds a line like `test result: ok. 7 passed; 0 failed; 0 ignored; ...`.
    fn add_line(&mut self, line: &str) -> bool {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return false;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let n = words.iter().find_map(|w| w.parse::<u64>().ok());
            match (n, words.last()) {
                (Some(n), Some(&"passed")) => self.passed += n,
                (Some(n), Some(&"failed")) => self.failed += n,
                (Some(n), Some(&"ignored")) => self.ignored += n,
                _ => {}
            }
        }
        true
    }
}

fn test(no_lint: bool, fuzz_seconds: Option<u64>, rest: &[String]) -> Result<()> {
    let started = Instant::now();
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let fuzz_seconds = fuzz::seconds(
        fuzz_seconds,
        std::env::var("MESH_FUZZ_SECONDS").ok().as_deref(),
        ci,
    )?;
    prereqs::ensure()?;
    check_disk(&target_dir())?;
    if !no_lint {
        step("cargo fmt --check");
        run(
            cargo().args(["fmt", "--all", "--", "--check"]),
            "cargo fmt --check",
        )?;
        // fuzz/ is its own workspace: `cargo fmt --all` does not reach it.
        run(
            cargo().args([
                "fmt",
                "--manifest-path",
                "fuzz/Cargo.toml",
                "--all",
                "--",
                "--check",
            ]),
            "cargo fmt --check (fuzz)",
        )?;
        step("cargo clippy --all-targets -- -D warnings");
        run(
            cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]),
            "cargo clippy",
        )?;
    }

    step("cargo test (unit, in-process and privileged tiers)");
    let target = root().join("target");
    fs::create_dir_all(&target).context("create target/")?;
    let skip_log = target.join("mesh-test-skips.log");
    let _ = fs::remove_file(&skip_log);
    let mut child = cargo()
        .arg("test")
        .args(rest)
        .env("MESH_TEST_SKIP_LOG", &skip_log)
        .stdout(Stdio::piped())
        .spawn()
        .context("start cargo test")?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("read cargo test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait().context("wait for cargo test")?;

    // Each fuzz target counts as one test: passed when it ran its time without a finding.
    if fuzz_seconds == 0 {
        println!("\n==> fuzzing skipped (--fuzz-seconds 0)");
    } else {
        step(&format!("fuzzing: every target for {fuzz_seconds}s"));
        let fuzz_started = Instant::now();
        for (_, outcome) in fuzz::run_all(&root(), fuzz_seconds)? {
            match outcome {
                fuzz::Outcome::Clean { .. } => totals.passed += 1,
                fuzz::Outcome::Found { .. } => totals.failed += 1,
            }
        }
        println!("fuzzing took {:.0}s", fuzz_started.elapsed().as_secs_f64());
    }

    let skipped: Vec<String> = fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect();
    if !skipped.is_empty() {
        println!("\nSkipped (they passed without checking anything):");
        for s in &skipped {
            println!("  {s}");
        }
    }
    let leftovers = leftovers();
    if !leftovers.is_empty() {
        println!("\nLeft behind by the tests (a cleanup bug):");
        for l in &leftovers {
            println!("  {}", l.display());
        }
    }
    let skipped_n = skipped.len() as u64;
    let failed = totals.failed
        + u64::from(!leftovers.is_empty() || (!status.success() && totals.failed == 0));
    println!(
        "\ntest command finished in {:.0}s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed.saturating_sub(skipped_n),
        failed,
        skipped_n + totals.ignored
    );
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    Ok(())
}

fn bench(
    fast: bool,
    steps: Option<String>,
    json: Option<PathBuf>,
    markdown: Option<PathBuf>,
    compare: Option<PathBuf>,
    stock: bool,
    more: &[String],
) -> Result<()> {
    if !is_root() {
        bail!(
            "the benchmark needs root: each step builds a simulated cluster (network namespaces, \
             cgroups, eBPF programs). Run: sudo -E cargo xtask bench"
        );
    }
    prereqs::ensure()?;
    step("build the ladder, the agent and the controller (release)");
    run(
        cargo().args(["build", "--release", "--package", "mesh-tests", "--bins"]),
        "cargo build --release",
    )?;
    step("mesh-bench");
    let mut cmd = Command::new(target_dir().join("release/mesh-bench"));
    cmd.arg("run");
    if fast {
        cmd.arg("--fast");
    }
    if let Some(s) = steps {
        cmd.arg("--steps").arg(s);
    }
    if stock {
        cmd.arg("--stock");
    }
    for (flag, path) in [
        ("--json", json),
        ("--markdown", markdown),
        ("--compare", compare),
    ] {
        if let Some(p) = path {
            cmd.arg(flag).arg(p);
        }
    }
    cmd.args(more);
    run(&mut cmd, "mesh-bench")
}

fn demo(keep: bool, down: bool) -> Result<()> {
    if !is_root() {
        bail!(
            "the demo needs root: it creates network namespaces and cgroups and loads eBPF \
             programs. Run: sudo -E cargo xtask demo"
        );
    }
    let sim = target_dir().join("debug/mesh-sim");
    if down {
        return run(Command::new(&sim).arg("down"), "mesh-sim down");
    }
    prereqs::ensure()?;
    step("build the agent, the controller and the demo applications");
    run(
        cargo().args([
            "build",
            "--package",
            "mesh-tests",
            "--package",
            "mesh-demo",
            "--bins",
        ]),
        "cargo build",
    )?;
    step("mesh-agent doctor: this kernel against what the datapath needs");
    run(
        Command::new(target_dir().join("debug/mesh-agent")).arg("doctor"),
        "mesh-agent doctor",
    )?;
    step("the mesh on this machine");
    let mut cmd = Command::new(&sim);
    cmd.current_dir(root()).arg("demo");
    if keep {
        cmd.arg("--keep");
    }
    run(&mut cmd, "mesh-sim demo")
}

fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// What test runs create: `mt<pid>*` namespaces, `mesh-test-*` and `mesh-sim-mt<pid>*`
/// cgroups (in the v1 hierarchies too), `mt<pid>-*` pins.
fn leftovers() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let is_test_name = |n: &str| {
        n.strip_prefix("mt")
            .is_some_and(|r| r.chars().next().is_some_and(|c| c.is_ascii_digit()))
    };
    for dir in ["/run/netns", "/sys/fs/bpf/mesh"] {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if is_test_name(&e.file_name().to_string_lossy()) {
                    found.push(e.path());
                }
            }
        }
    }
    // The cgroup v2 mount (either place), and on a hybrid host the v1 hierarchies, where
    // runc's cgroupfs driver creates the runtime test's pod cgroups too.
    let mut mounts = vec![
        PathBuf::from("/sys/fs/cgroup/unified"),
        "/sys/fs/cgroup".into(),
    ];
    if let Ok(entries) = fs::read_dir("/sys/fs/cgroup") {
        mounts.extend(
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists() && !p.ends_with("unified")),
        );
    }
    for mount in mounts {
        if let Ok(entries) = fs::read_dir(&mount) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let sim_test = name.strip_prefix("mesh-sim-").is_some_and(&is_test_name);
                if name.starts_with("mesh-test-") || sim_test {
                    found.push(e.path());
                }
            }
        }
    }
    // A simulated cluster's state directory (with what a container runtime mounted in it).
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.strip_prefix("mesh-sim-").is_some_and(&is_test_name) {
                found.push(e.path());
            }
        }
    }
    found
}

/// The mount points below `dir`, deepest first.
fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points
}

fn clean() -> Result<usize> {
    let found = leftovers();
    for path in &found {
        let s = path.to_string_lossy();
        if s.starts_with("/run/netns/") {
            let name = path.file_name().map(|n| n.to_string_lossy().to_string());
            if let Some(name) = name {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        } else if s.starts_with("/sys/fs/bpf/") {
            fs::remove_dir_all(path).with_context(|| format!("remove {s}"))?;
        } else if path.starts_with(std::env::temp_dir()) {
            for point in mounts_below(path) {
                let _ = Command::new("umount").arg("-l").arg(&point).status();
            }
            fs::remove_dir_all(path).with_context(|| format!("remove {s}"))?;
        } else {
            remove_cgroup_tree(path).with_context(|| format!("remove cgroup {s}"))?;
        }
    }
    Ok(found.len())
}

/// Kills the processes of a cgroup and its children, then removes them, deepest first.
fn remove_cgroup_tree(path: &Path) -> Result<()> {
    for child in fs::read_dir(path)?.flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&child.path())?;
        }
    }
    if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    fs::remove_dir(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cargo_test_result_lines() {
        let mut t = Totals::default();
        assert!(t.add_line(
            "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.5s"
        ));
        assert!(t.add_line("test result: FAILED. 2 passed; 3 failed; 0 ignored; 0 measured"));
        assert!(!t.add_line("running 7 tests"));
        assert_eq!(
            t,
            Totals {
                passed: 9,
                failed: 3,
                ignored: 1
            }
        );
    }
}
