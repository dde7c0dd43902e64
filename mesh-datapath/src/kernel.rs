//! What the kernel says, not what the agent remembers: the programs attached to a cgroup, a
//! network namespace or an interface (`BPF_PROG_QUERY`), the program a pinned link holds, and
//! the names of loaded programs.
use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use aya::programs::links::{FdLink, PinnedLink};

/// True if the running kernel is at least `major.minor`.
pub fn kernel_at_least(major: u8, minor: u8) -> bool {
    aya::util::KernelVersion::current()
        .is_ok_and(|v| v >= aya::util::KernelVersion::new(major, minor, 0))
}

/// A hook the datapath attaches to, with the kernel's attach type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// cgroup/connect4 on a pod's cgroup.
    Connect4,
    /// cgroup/connect6 on a pod's cgroup.
    Connect6,
    /// sock_ops on a pod's or the agent's cgroup.
    SockOps,
    /// cgroup/getsockopt on the agent's cgroup.
    GetSockopt,
    /// sk_lookup on a pod's network namespace.
    SkLookup,
    /// tc ingress through TCX (Linux 6.6+) on a pod's interface.
    TcxIngress,
}

impl Hook {
    /// `enum bpf_attach_type` in the kernel's UAPI.
    fn attach_type(self) -> u32 {
        match self {
            Hook::SockOps => 3,
            Hook::Connect4 => 10,
            Hook::Connect6 => 11,
            Hook::GetSockopt => 21,
            Hook::SkLookup => 36,
            Hook::TcxIngress => 46,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Hook::Connect4 => "cgroup/connect4",
            Hook::Connect6 => "cgroup/connect6",
            Hook::SockOps => "sockops",
            Hook::GetSockopt => "cgroup/getsockopt",
            Hook::SkLookup => "sk_lookup",
            Hook::TcxIngress => "tc ingress",
        }
    }
}

const BPF_PROG_QUERY: libc::c_long = 16;

/// The `query` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct QueryAttr {
    target: u32,
    attach_type: u32,
    query_flags: u32,
    attach_flags: u32,
    prog_ids: u64,
    prog_cnt: u32,
    _pad: u32,
    prog_attach_flags: u64,
    link_ids: u64,
    link_attach_flags: u64,
    revision: u64,
}

/// Where to ask: a cgroup or network namespace (by descriptor) or an interface of the calling
/// thread's network namespace (by index).
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Fd(BorrowedFd<'a>),
    IfIndex(u32),
}

/// The ids of the programs attached directly to `target` at `hook` (inherited ones excluded).
pub fn attached(target: Target<'_>, hook: Hook) -> io::Result<Vec<u32>> {
    let mut capacity = 64;
    loop {
        let mut ids = vec![0u32; capacity];
        let mut attr = QueryAttr {
            target: match target {
                Target::Fd(fd) => fd.as_raw_fd() as u32,
                Target::IfIndex(i) => i,
            },
            attach_type: hook.attach_type(),
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: capacity as u32,
            ..QueryAttr::default()
        };
        // SAFETY: BPF_PROG_QUERY reads `attr` and writes at most `prog_cnt` ids into `ids`,
        // which outlives the call; the size passed is the size of `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_QUERY,
                &mut attr as *mut QueryAttr,
                std::mem::size_of::<QueryAttr>() as libc::c_uint,
            )
        };
        if rc == 0 {
            ids.truncate(attr.prog_cnt as usize);
            return Ok(ids);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) && capacity < 4096 {
            capacity = attr.prog_cnt.max(capacity as u32 * 2) as usize;
            continue;
        }
        return Err(e);
    }
}

/// The ids of the programs attached at `hook` to the cgroup or namespace file at `path`.
pub fn attached_at(path: &Path, hook: Hook) -> io::Result<Vec<u32>> {
    let f = File::open(path)?;
    attached(Target::Fd(f.as_fd()), hook)
}

/// The program held by the link pinned at `path`.
pub fn pinned_link_program(path: &Path) -> Result<u32, String> {
    let link = PinnedLink::from_pin(path).map_err(|e| e.to_string())?;
    let fd = FdLink::from(link);
    fd.info().map(|i| i.program_id()).map_err(|e| e.to_string())
}

/// Names of the loaded programs with these ids (ids that vanished meanwhile are left out).
pub fn program_names(ids: &[u32]) -> HashMap<u32, String> {
    if ids.is_empty() {
        return HashMap::new();
    }
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| (p.id(), p.name_as_str().unwrap_or("?").to_string()))
        .collect()
}

/// The kernel release (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// Whether this process may read BPF objects (root, or the capabilities root has).
pub fn privileged() -> bool {
    nix::unistd::geteuid().is_root()
}
