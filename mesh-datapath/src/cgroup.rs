//! cgroup v2: find the mount (hybrid or unified layouts), read and change the agent's cgroup.
use std::{
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)")]
    NoV2Mount,
    #[error("read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("create cgroup {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("move process {pid} into cgroup {path}: {source}")]
    Move {
        pid: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is the root of the cgroup v2 hierarchy; the mesh never attaches there")]
    IsRoot { path: PathBuf },
    #[error("{path} is not a directory in the cgroup v2 hierarchy mounted at {mount}")]
    NotInV2 { path: PathBuf, mount: PathBuf },
}

impl CgroupError {
    pub fn kind(&self) -> &'static str {
        match self {
            CgroupError::NoV2Mount => "no_v2_mount",
            CgroupError::Read { .. } => "read",
            CgroupError::Create { .. } => "create",
            CgroupError::Move { .. } => "move",
            CgroupError::IsRoot { .. } => "is_root",
            CgroupError::NotInV2 { .. } => "not_in_v2",
        }
    }
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup on unified hosts, /sys/fs/cgroup/unified on
/// hybrid ones. Parsed from mountinfo, never assumed.
pub fn v2_mount() -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    parse_v2_mount(&text).ok_or(CgroupError::NoV2Mount)
}

fn parse_v2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <opts>"
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// The cgroup v2 path of this process, absolute under the v2 mount.
pub fn current(mount: &Path) -> Result<PathBuf, CgroupError> {
    let path = Path::new("/proc/self/cgroup");
    let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or(CgroupError::NoV2Mount)?;
    Ok(mount.join(rel.trim_start_matches('/')))
}

/// Checks that `path` is a non-root directory of the v2 hierarchy.
pub fn check_attachable(mount: &Path, path: &Path) -> Result<(), CgroupError> {
    let canon = path.canonicalize().map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let mount_canon = mount.canonicalize().map_err(|source| CgroupError::Read {
        path: mount.into(),
        source,
    })?;
    if canon == mount_canon {
        return Err(CgroupError::IsRoot { path: path.into() });
    }
    if !canon.starts_with(&mount_canon) || !canon.join("cgroup.procs").exists() {
        return Err(CgroupError::NotInV2 {
            path: path.into(),
            mount: mount.into(),
        });
    }
    Ok(())
}

/// Moves this whole process into `path`, creating the cgroup if needed.
pub fn move_self(mount: &Path, path: &Path) -> Result<(), CgroupError> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Create {
        path: path.into(),
        source,
    })?;
    check_attachable(mount, path)?;
    let pid = std::process::id();
    fs::write(path.join("cgroup.procs"), pid.to_string()).map_err(|source| CgroupError::Move {
        pid,
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_v2_mount() {
        let mi = "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                  26 25 0:23 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
                  27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(
            parse_v2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_unified_v2_mount_with_optional_fields() {
        let mi = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_v2_mount(mi), Some(PathBuf::from("/sys/fs/cgroup")));
    }

    #[test]
    fn no_v2_mount_is_none() {
        let mi = "27 25 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n";
        assert_eq!(parse_v2_mount(mi), None);
    }
}
