//! Kernel feature check: what the datapath needs, each item checked, not assumed.
use std::path::Path;

use serde::Serialize;

/// One checked requirement.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    fn new(name: &str, result: Result<String, String>) -> Check {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Check {
            name: name.into(),
            ok,
            detail,
        }
    }
}

/// The kernel floor (5.15 with BTF).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Runs every check. `load` also loads the embedded programs (the verifier is the final word
/// on program types and helpers) without attaching anything.
pub fn check(load: bool) -> Vec<Check> {
    let mut checks = vec![
        Check::new("kernel version", kernel_version()),
        Check::new("BTF", btf()),
        Check::new("cgroup v2", cgroup_v2()),
        Check::new("bpffs", bpffs()),
        Check::new("root", root()),
    ];
    for (name, ty) in [
        (
            "program type cgroup_sock_addr",
            aya::programs::ProgramType::CgroupSockAddr,
        ),
        (
            "program type cgroup_sockopt",
            aya::programs::ProgramType::CgroupSockopt,
        ),
        ("program type sock_ops", aya::programs::ProgramType::SockOps),
        ("program type sk_msg", aya::programs::ProgramType::SkMsg),
        (
            "program type sk_lookup",
            aya::programs::ProgramType::SkLookup,
        ),
        (
            "program type sched_cls",
            aya::programs::ProgramType::SchedClassifier,
        ),
    ] {
        checks.push(Check::new(
            name,
            match aya::sys::is_program_supported(ty) {
                Ok(true) => Ok("supported".into()),
                Ok(false) => Err("not supported by this kernel".into()),
                Err(e) => Err(format!("probe failed: {e}")),
            },
        ));
    }
    if load {
        checks.extend(load_programs());
    }
    checks
}

/// True if the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(major, minor, 0))
}

fn kernel_version() -> Result<String, String> {
    let v = aya::util::KernelVersion::current().map_err(|e| format!("unknown: {e}"))?;
    let s = v.to_string();
    if kernel_at_least(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8) {
        Ok(s)
    } else {
        Err(format!(
            "{s}: need {}.{} or newer",
            MIN_KERNEL.0, MIN_KERNEL.1
        ))
    }
}

fn btf() -> Result<String, String> {
    let p = Path::new("/sys/kernel/btf/vmlinux");
    if p.exists() {
        Ok(p.display().to_string())
    } else {
        Err("missing /sys/kernel/btf/vmlinux (kernel built without CONFIG_DEBUG_INFO_BTF)".into())
    }
}

fn cgroup_v2() -> Result<String, String> {
    crate::cgroup::v2_mount()
        .map(|p| format!("mounted at {}", p.display()))
        .map_err(|e| e.to_string())
}

fn bpffs() -> Result<String, String> {
    let p = Path::new("/sys/fs/bpf");
    match nix::sys::statfs::statfs(p) {
        Ok(s) if s.filesystem_type().0 == 0xcafe_4a11 => Ok("mounted at /sys/fs/bpf".into()),
        Ok(_) => Ok("not mounted at /sys/fs/bpf; the agent mounts it at start".into()),
        Err(e) => Err(format!("/sys/fs/bpf: {e}")),
    }
}

fn root() -> Result<String, String> {
    if nix::unistd::geteuid().is_root() {
        Ok("running as root".into())
    } else {
        Err("not root: loading BPF programs needs CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN".into())
    }
}

fn load_programs() -> Vec<Check> {
    // Maps are declared pinned: load against a scratch pin directory, removed afterwards.
    let dir = Path::new(crate::config::BPFFS_ROOT).join(format!("doctor-{}", std::process::id()));
    let result = crate::ebpf::ensure_bpffs(&dir)
        .map_err(|e| e.to_string())
        .and_then(|()| {
            aya::EbpfLoader::new()
                .default_map_pin_directory(&dir)
                .load(crate::EBPF_OBJECT)
                .map_err(|e| e.to_string())
        })
        .and_then(|mut ebpf| crate::ebpf::load_programs(&mut ebpf).map_err(|e| e.to_string()));
    let _ = std::fs::remove_dir_all(&dir);
    vec![Check::new(
        "load and verify all programs",
        result.map(|()| "the verifier accepted every program".into()),
    )]
}
