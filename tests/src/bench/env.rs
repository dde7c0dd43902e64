//! The environment a run was measured in, recorded beside every figure: a number means little
//! without the kernel, CPU, cgroup layout, BTF, build and revision that produced it.
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Environment {
    /// `uname -r` and the kernel's build string.
    pub kernel: String,
    pub kernel_build: String,
    pub cpu_model: String,
    /// CPUs this process may run on.
    pub cpus: usize,
    /// Where cgroup v2 is mounted and whether the hierarchy is unified or hybrid.
    pub cgroup: String,
    /// Whether the kernel exposes BTF (`/sys/kernel/btf/vmlinux`).
    pub btf: bool,
    /// `release` or `debug` (of this binary and the agent beside it).
    pub build_profile: String,
    /// `git rev-parse HEAD` of the source tree, `+dirty` with uncommitted changes.
    pub git_revision: String,
    /// UTC, RFC 3339.
    pub started: String,
    /// `/proc/loadavg` when the run started and ended: other work on the machine skews figures.
    pub load_start: String,
    pub load_end: String,
}

impl Environment {
    pub fn record() -> Environment {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let cpu_model = read("/proc/cpuinfo")
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let cgroup = match mesh_datapath::cgroup::v2_mount() {
            Ok(m) if m == Path::new("/sys/fs/cgroup") => "v2 unified at /sys/fs/cgroup".into(),
            Ok(m) => format!("hybrid: v1 controllers, v2 at {}", m.display()),
            Err(e) => format!("no cgroup v2: {e}"),
        };
        Environment {
            kernel: read("/proc/sys/kernel/osrelease"),
            kernel_build: read("/proc/sys/kernel/version"),
            cpu_model,
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cgroup,
            btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
            git_revision: git_revision(),
            started: output(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"]),
            load_start: read("/proc/loadavg"),
            load_end: String::new(),
        }
    }

    pub fn finish(&mut self) {
        self.load_end = std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string();
    }
}

fn output(argv: &[&str]) -> String {
    Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn git_revision() -> String {
    let rev = output(&["git", "rev-parse", "--short=12", "HEAD"]);
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .is_ok_and(|o| !o.stdout.is_empty());
    if dirty { format!("{rev}+dirty") } else { rev }
}
