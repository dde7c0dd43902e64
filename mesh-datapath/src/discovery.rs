//! Where a pod lives on this node, found from the kernel, never from anything the pod can
//! write: its pod-level cgroup (the one the kubelet creates for it, above every container of
//! the pod) and its network namespace.
//!
//! The kubelet names a pod's cgroup after the pod's UID, below its QoS class's cgroup:
//!
//! | driver   | guaranteed                              | burstable / besteffort                                                    |
//! |----------|-----------------------------------------|---------------------------------------------------------------------------|
//! | cgroupfs | `kubepods/pod<uid>`                     | `kubepods/burstable/pod<uid>`                                             |
//! | systemd  | `kubepods.slice/kubepods-pod<u_i_d>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<u_i_d>.slice` |
//!
//! (systemd writes the UID's dashes as underscores; the kubelet's `--cgroup-root` may put all
//! of it deeper.) The containers' cgroups sit below the pod's (`cri-containerd-<id>.scope`,
//! `<id>`), so the mesh attaches to the pod's cgroup and every container of the pod, started
//! before or after, is covered. On cgroup v2 hosts and hybrid ones alike the v2 hierarchy is
//! where the programs attach; it is found from mountinfo ([`crate::cgroup::v2_mount`]).
//!
//! Three ways in, each checked against the others where both are known:
//! - [`find_pod_cgroup`]: by UID (from the CNI call's `K8S_POD_UID` or the controller's Pod):
//!   the kubelet creates the pod's cgroup before the sandbox, so it exists even when no
//!   process of the pod runs yet.
//! - [`pod_cgroup_of`]: by process: the pod-level ancestor of the process's own cgroup.
//! - [`netns_of_pod`]: a pod's network namespace, from the processes in its cgroup (the
//!   sandbox holds it), refusing a pod whose processes disagree.
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("{uid:?} is not a pod UID (expected 8-4-4-4-12 hexadecimal digits)")]
    BadUid { uid: String },
    #[error("no cgroup of pod {uid} under {root} (the kubelet creates it before the sandbox)")]
    NoPodCgroup { uid: String, root: PathBuf },
    #[error("pod {uid} has more than one cgroup under {root}: {found:?}")]
    AmbiguousPodCgroup {
        uid: String,
        root: PathBuf,
        found: Vec<PathBuf>,
    },
    #[error("process {pid} is in cgroup {cgroup:?}, which belongs to no pod")]
    NotInPod { pid: u32, cgroup: String },
    #[error("process {pid} has no cgroup v2 path (is it still running?)")]
    NoV2Path { pid: u32 },
    #[error("no process runs in the cgroup of the pod at {cgroup} yet")]
    NoProcess { cgroup: PathBuf },
    #[error(
        "the processes of the pod at {cgroup} are in {count} network namespaces; a pod has one"
    )]
    SplitNetns { cgroup: PathBuf, count: usize },
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl DiscoveryError {
    pub fn kind(&self) -> &'static str {
        match self {
            DiscoveryError::BadUid { .. } => "bad_uid",
            DiscoveryError::NoPodCgroup { .. } => "no_pod_cgroup",
            DiscoveryError::AmbiguousPodCgroup { .. } => "ambiguous_pod_cgroup",
            DiscoveryError::NotInPod { .. } => "not_in_pod",
            DiscoveryError::NoV2Path { .. } => "no_v2_path",
            DiscoveryError::NoProcess { .. } => "no_process",
            DiscoveryError::SplitNetns { .. } => "split_netns",
            DiscoveryError::Read { .. } => "read",
        }
    }
}

/// How deep below the search root a pod's cgroup may be (`kubepods.slice/<qos>.slice/<pod>`
/// is 3; a custom `--cgroup-root` adds a few).
const MAX_DEPTH: usize = 6;

/// A pod UID in its canonical form (lowercase, with dashes), checked.
pub fn canonical_uid(uid: &str) -> Result<String, DiscoveryError> {
    let lower = uid.to_ascii_lowercase();
    let groups: Vec<&str> = lower.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let valid = groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if valid {
        Ok(lower)
    } else {
        Err(DiscoveryError::BadUid { uid: uid.into() })
    }
}

/// The pod UID a cgroup directory's name carries, if it is a pod-level cgroup: `pod<uid>`
/// (cgroupfs) or `<prefix>-pod<u_i_d>.slice` (systemd).
pub fn pod_uid_of_dir(name: &str) -> Option<String> {
    let uid = if let Some(slice) = name.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid.replace('_', "-")
    } else {
        name.strip_prefix("pod")?.to_string()
    };
    canonical_uid(&uid).ok()
}

/// The cgroup of pod `uid`: the one directory below `root` (the v2 mount, or where the
/// kubelet's pods live) named for it.
pub fn find_pod_cgroup(root: &Path, uid: &str) -> Result<PathBuf, DiscoveryError> {
    let uid = canonical_uid(uid)?;
    let mut found = Vec::new();
    let mut level = vec![root.to_path_buf()];
    for _ in 0..MAX_DEPTH {
        let mut next = Vec::new();
        for dir in level {
            // A cgroup removed while we look is simply not there.
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                match pod_uid_of_dir(&name.to_string_lossy()) {
                    Some(u) if u == uid => found.push(entry.path()),
                    // Another pod's cgroup: its containers are no place for this one.
                    Some(_) => {}
                    None => next.push(entry.path()),
                }
            }
        }
        level = next;
    }
    match found.len() {
        0 => Err(DiscoveryError::NoPodCgroup {
            uid,
            root: root.into(),
        }),
        1 => Ok(found.remove(0)),
        _ => Err(DiscoveryError::AmbiguousPodCgroup {
            uid,
            root: root.into(),
            found,
        }),
    }
}

/// The pod-level cgroup (absolute, under `mount`) of process `pid` and the pod's UID: the
/// nearest ancestor of the process's own cgroup named for a pod.
pub fn pod_cgroup_of(mount: &Path, pid: u32) -> Result<(PathBuf, String), DiscoveryError> {
    let path = PathBuf::from(format!("/proc/{pid}/cgroup"));
    let text = fs::read_to_string(&path).map_err(|source| DiscoveryError::Read { path, source })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(DiscoveryError::NoV2Path { pid })?;
    let (prefix, uid) = pod_prefix(rel).ok_or_else(|| DiscoveryError::NotInPod {
        pid,
        cgroup: rel.into(),
    })?;
    Ok((mount.join(prefix.trim_start_matches('/')), uid))
}

/// The pod-level part of a cgroup path (relative to the v2 root) and the pod's UID.
fn pod_prefix(rel: &str) -> Option<(String, String)> {
    let mut prefix = String::new();
    for part in rel.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        if let Some(uid) = pod_uid_of_dir(part) {
            return Some((prefix, uid));
        }
    }
    None
}

/// Every process in `cgroup` and the cgroups below it.
pub fn processes(cgroup: &Path) -> Result<Vec<u32>, DiscoveryError> {
    let mut pids = Vec::new();
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = dir.join("cgroup.procs");
        let text = fs::read_to_string(&procs).map_err(|source| DiscoveryError::Read {
            path: procs.clone(),
            source,
        })?;
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    Ok(pids)
}

/// A network namespace's identity: device and inode of its nsfs file.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The network namespace of the pod whose cgroup is `cgroup`, as `/proc/<pid>/ns/net` of one
/// of its processes (open it before that process may exit). Every process of the pod must be
/// in the same one.
pub fn netns_of_pod(cgroup: &Path) -> Result<PathBuf, DiscoveryError> {
    let mut seen = BTreeSet::new();
    let mut first = None;
    for pid in processes(cgroup)? {
        let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
        // A process that exited meanwhile has no namespace left to disagree about.
        let Some(id) = ns_id(&path) else { continue };
        seen.insert(id);
        first.get_or_insert(path);
    }
    match (first, seen.len()) {
        (None, _) => Err(DiscoveryError::NoProcess {
            cgroup: cgroup.into(),
        }),
        (Some(path), 1) => Ok(path),
        (Some(_), count) => Err(DiscoveryError::SplitNetns {
            cgroup: cgroup.into(),
            count,
        }),
    }
}

/// The processes whose network namespace is the one at `netns` (a pinned namespace such as
/// the CNI call's `CNI_NETNS`, or a `/proc/<pid>/ns/net`).
pub fn processes_in_netns(netns: &Path) -> Result<Vec<u32>, DiscoveryError> {
    let want = ns_id(netns).ok_or_else(|| DiscoveryError::Read {
        path: netns.into(),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    })?;
    let proc = Path::new("/proc");
    let entries = fs::read_dir(proc).map_err(|source| DiscoveryError::Read {
        path: proc.into(),
        source,
    })?;
    Ok(entries
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter(|pid| ns_id(&proc.join(format!("{pid}/ns/net"))) == Some(want))
        .collect())
}

#[cfg(test)]
mod tests;
