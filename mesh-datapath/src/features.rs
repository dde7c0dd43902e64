//! Kernel feature check: what the datapath needs, each item checked, not assumed.
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One checked requirement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
    /// What to do about a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// A failure stops the datapath (`true`), or only deserves a look (`false`: a warning).
    #[serde(default = "required")]
    pub required: bool,
}

fn required() -> bool {
    true
}

impl Check {
    pub fn new(name: &str, result: Result<String, String>) -> Check {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        Check {
            name: name.into(),
            ok,
            detail,
            hint: None,
            required: true,
        }
    }

    /// Marks the check as a warning: its failure does not stop the datapath.
    pub fn advisory(mut self) -> Check {
        self.required = false;
        self
    }

    /// Adds `hint` when the check failed.
    pub fn hint(mut self, hint: impl Into<String>) -> Check {
        if !self.ok {
            self.hint = Some(hint.into());
        }
        self
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

fn kernel_version() -> Result<String, String> {
    let v = aya::util::KernelVersion::current().map_err(|e| format!("unknown: {e}"))?;
    let s = v.to_string();
    if crate::kernel::kernel_at_least(MIN_KERNEL.0 as u8, MIN_KERNEL.1 as u8) {
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

// === Doctor ===

/// The preflight of `mesh-agent doctor`: the check the agent runs at start (`load` also has
/// the verifier accept every program), then what around the datapath can stand in its way
/// (cgroup layout, locked-memory limit, helpers, and as warnings iptables or nftables rules
/// of another mesh and other programs on the same hooks). Every failure carries a fix hint.
pub fn doctor(load: bool) -> Vec<Check> {
    let mut checks: Vec<Check> = check(load)
        .into_iter()
        .map(|c| {
            let hint = start_hint(&c.name);
            c.hint(hint)
        })
        .collect();
    checks.push(cgroup_layout());
    checks.push(memlock());
    checks.extend(helpers());
    checks.push(redirect_rules());
    checks.extend(other_programs());
    checks
}

fn start_hint(name: &str) -> String {
    match name {
        "kernel version" => "run nodes on Linux 5.15 or newer (Ubuntu 22.04, Debian 12 and RHEL 9 \
                             ship one)"
            .into(),
        "BTF" => "use a kernel built with CONFIG_DEBUG_INFO_BTF=y, the default of current \
                  distributions"
            .into(),
        "cgroup v2" => "boot with systemd.unified_cgroup_hierarchy=1, or mount the v2 hierarchy: \
                        mount -t cgroup2 none /sys/fs/cgroup/unified"
            .into(),
        "bpffs" => "mount -t bpf bpf /sys/fs/bpf (in Kubernetes, give the agent /sys/fs/bpf as a \
                    hostPath volume so pins outlive its pod)"
            .into(),
        "root" => "run as root, or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (in Kubernetes: \
                   the DaemonSet's securityContext)"
            .into(),
        "load and verify all programs" => "the verifier refused a program: report it with \
                                           `uname -r` and this message"
            .into(),
        n if n.starts_with("program type") => format!(
            "this kernel was built without the {} program type; Linux 5.15 or newer with \
             CONFIG_BPF_SYSCALL and CONFIG_CGROUP_BPF has it",
            n.trim_start_matches("program type ")
        ),
        _ => "see the detail".into(),
    }
}

fn cgroup_layout() -> Check {
    let result = crate::cgroup::v2_mount()
        .map_err(|e| e.to_string())
        .and_then(|mount| {
            let own = crate::cgroup::current(&mount).map_err(|e| e.to_string())?;
            let layout = if mount == Path::new("/sys/fs/cgroup") {
                "unified (v2 only)"
            } else {
                "hybrid (v1 controllers, v2 for BPF)"
            };
            let at_root = own == mount;
            Ok(format!(
                "{layout} at {}; this process is in {}{}",
                mount.display(),
                own.display(),
                if at_root {
                    " (the v2 root: the agent moves itself into its own cgroup, and never \
                     attaches to the root)"
                } else {
                    ""
                }
            ))
        });
    Check::new("cgroup layout", result)
        .hint("mount the cgroup v2 hierarchy (see the cgroup v2 check)")
}

fn memlock() -> Check {
    use nix::sys::resource::{Resource, getrlimit};
    let result = if crate::kernel::kernel_at_least(5, 11) {
        Ok("not limiting: since Linux 5.11 BPF memory is charged to the cgroup".to_string())
    } else {
        match getrlimit(Resource::RLIMIT_MEMLOCK) {
            Ok((soft, _)) if soft == nix::sys::resource::RLIM_INFINITY => {
                Ok("unlimited".to_string())
            }
            Ok((soft, _)) if soft >= 64 << 20 => Ok(format!("{} MiB", soft >> 20)),
            Ok((soft, _)) => Err(format!(
                "{} KiB: too little for the maps on this kernel (before 5.11 it counts)",
                soft >> 10
            )),
            Err(e) => Err(format!("cannot read RLIMIT_MEMLOCK: {e}")),
        }
    };
    Check::new("memlock", result)
        .hint("raise the limit: `ulimit -l unlimited`, or LimitMEMLOCK=infinity in the unit")
}

fn helpers() -> Vec<Check> {
    use aya::programs::ProgramType;
    use aya::sys::BpfHelper;
    [
        (
            ProgramType::CgroupSockAddr,
            BpfHelper::BPF_FUNC_get_socket_cookie,
            "get_socket_cookie",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_get_netns_cookie,
            "get_netns_cookie",
        ),
        (
            ProgramType::SockOps,
            BpfHelper::BPF_FUNC_sock_hash_update,
            "sock_hash_update",
        ),
        (
            ProgramType::SkMsg,
            BpfHelper::BPF_FUNC_msg_redirect_hash,
            "msg_redirect_hash",
        ),
        (
            ProgramType::SkLookup,
            BpfHelper::BPF_FUNC_sk_assign,
            "sk_assign",
        ),
        (
            ProgramType::SkLookup,
            BpfHelper::BPF_FUNC_ringbuf_output,
            "ringbuf_output",
        ),
    ]
    .into_iter()
    .map(|(ty, helper, name)| {
        let result = match aya::sys::is_helper_supported(ty, helper) {
            Ok(true) => Ok(format!("available to {ty:?} programs")),
            Ok(false) => Err(format!("not available to {ty:?} programs")),
            Err(e) => Err(format!("probe failed: {e}")),
        };
        Check::new(&format!("helper {name}"), result)
            .hint("needs Linux 5.15 or newer (the kernel floor of the datapath)")
    })
    .collect()
}

/// Ports another mesh's iptables or nftables rules redirect to (Istio's and Linkerd's
/// conventions overlap with this mesh's).
const MESH_PORTS: [&str; 4] = ["15001", "15006", "15008", "4143"];

fn redirect_rules() -> Check {
    let mut found = Vec::new();
    let mut looked = Vec::new();
    for (tool, args) in [
        ("iptables-save", &["-t", "nat"][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let Ok(out) = std::process::Command::new(tool).args(args).output() else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        looked.push(tool);
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let redirecting = ["REDIRECT", "TPROXY", "redirect", "tproxy"]
                .iter()
                .any(|w| line.contains(w));
            if redirecting && MESH_PORTS.iter().any(|p| line.contains(p)) {
                found.push(line.trim().to_string());
            }
        }
    }
    let result = if !found.is_empty() {
        Err(format!(
            "redirect rules to mesh ports in this network namespace: {}",
            found.join(" | ")
        ))
    } else if looked.is_empty() {
        Ok("neither iptables-save nor nft is installed: no rules to conflict".into())
    } else {
        Ok(format!(
            "no redirect to mesh ports ({}; this network namespace only)",
            looked.join(", ")
        ))
    };
    Check::new("redirect rules", result).advisory().hint(
        "another mesh (a sidecar's init container or an iptables-based node proxy) redirects \
         the same traffic: remove it from the pods this mesh enrolls",
    )
}

/// Programs on the hooks the datapath uses that apply to every process: the cgroup v2 root
/// (its programs run for every cgroup below, pods included) and this network namespace.
fn other_programs() -> Vec<Check> {
    use crate::kernel::{self, Hook};
    let Ok(mount) = crate::cgroup::v2_mount() else {
        return Vec::new();
    };
    let mut checks = Vec::new();
    for hook in [Hook::Connect4, Hook::SockOps, Hook::GetSockopt] {
        let result = kernel::attached_at(&mount, hook)
            .map_err(|e| format!("cannot ask the kernel ({e})"))
            .and_then(|ids| {
                if ids.is_empty() {
                    return Ok(format!("nothing at the cgroup v2 root {}", mount.display()));
                }
                let names = kernel::program_names(&ids);
                let list: Vec<String> = ids
                    .iter()
                    .map(|id| format!("{} ({id})", names.get(id).map_or("?", String::as_str)))
                    .collect();
                Err(format!(
                    "attached at the cgroup v2 root {}: {}; they run for every pod too",
                    mount.display(),
                    list.join(", ")
                ))
            });
        checks.push(
            Check::new(&format!("others on {}", hook.name()), result)
                .advisory()
                .hint(
                    "another BPF-based datapath (a CNI's socket load balancer, another mesh) \
                 rewrites the same connections: check that the two agree, or turn its \
                 feature off",
                ),
        );
    }
    let netns = Path::new("/proc/self/ns/net");
    let result = kernel::attached_at(netns, Hook::SkLookup)
        .map_err(|e| format!("cannot ask the kernel ({e})"))
        .and_then(|ids| {
            if ids.is_empty() {
                Ok("nothing on this network namespace".into())
            } else {
                Err(format!(
                    "{} program(s) on this network namespace: {ids:?}",
                    ids.len()
                ))
            }
        });
    checks.push(Check::new("others on sk_lookup", result).advisory().hint(
        "another program steers this namespace's connections; pods' namespaces are checked \
         by `mesh-agent status`",
    ));
    checks
}
