//! A pod's network namespace seen from the agent: a thread that `setns`es and runs jobs there,
//! so the proxy's in-pod sockets are created in the pod's namespace while the agent stays in
//! its own; the sockets the proxy owns there; and the socket options that tell where an
//! accepted connection was going and which namespace a socket lives in.
//!
//! It is what the datapath (which opens the sockets at enrollment) and the proxy (which serves
//! them) share, without the proxy depending on the kernel programs.
use std::{
    fs::File,
    net::{Ipv4Addr, TcpListener},
    os::fd::AsRawFd,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use nix::sched::{CloneFlags, setns};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a network namespace")]
    NotNetns { path: PathBuf },
    #[error("enter network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("network namespace worker for {path} has stopped")]
    WorkerGone { path: PathBuf },
}

impl NetnsError {
    pub fn kind(&self) -> &'static str {
        match self {
            NetnsError::Open { .. } => "open",
            NetnsError::NotNetns { .. } => "not_netns",
            NetnsError::Enter { .. } => "enter",
            NetnsError::WorkerGone { .. } => "worker_gone",
        }
    }
}

const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Opens a network namespace file (/run/netns/X, /proc/PID/ns/net) and checks what it is.
pub fn open(path: &Path) -> Result<File, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.into(),
        source,
    })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|e| NetnsError::Open {
        path: path.into(),
        source: e.into(),
    })?;
    if fs.filesystem_type().0 != NSFS_MAGIC {
        return Err(NetnsError::NotNetns { path: path.into() });
    }
    // A namespace file that is not a *network* namespace fails setns with EINVAL; check now.
    thread::scope(|s| {
        s.spawn(|| setns(file.as_fd(), CloneFlags::CLONE_NEWNET))
            .join()
            .unwrap_or(Err(nix::Error::EINVAL))
    })
    .map_err(|_| NetnsError::NotNetns { path: path.into() })?;
    Ok(file)
}

/// Runs `f` on a short-lived thread inside the namespace, borrowing from the caller.
pub fn run_in<T: Send>(
    netns: &File,
    path: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, NetnsError> {
    thread::scope(|s| {
        s.spawn(|| {
            setns(netns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
                path: path.into(),
                source,
            })?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|_| Err(NetnsError::WorkerGone { path: path.into() }))
    })
}

type Job = Box<dyn FnOnce() + Send>;

/// A long-lived thread inside one network namespace that runs jobs on request.
pub struct Worker {
    path: PathBuf,
    tx: mpsc::Sender<Job>,
}

impl Worker {
    pub fn spawn(netns: &File, path: &Path) -> Result<Worker, NetnsError> {
        let fd: OwnedFd =
            netns
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| NetnsError::Open {
                    path: path.into(),
                    source,
                })?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let name = format!("netns-{}", path.display());
        let p = path.to_path_buf();
        thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                let entered = setns(fd.as_fd(), CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Enter { path: p, source });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    for job in rx {
                        job();
                    }
                }
            })
            .map_err(|source| NetnsError::Open {
                path: path.into(),
                source,
            })?;
        ready_rx
            .recv()
            .map_err(|_| NetnsError::WorkerGone { path: path.into() })??;
        Ok(Worker {
            path: path.into(),
            tx,
        })
    }

    /// Runs `f` in the namespace and returns its result.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetnsError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::WorkerGone {
                path: self.path.clone(),
            })?;
        rx.await.map_err(|_| NetnsError::WorkerGone {
            path: self.path.clone(),
        })
    }
}

/// The sockets the proxy owns inside one pod's network namespace.
pub struct PodSockets {
    /// 127.0.0.1:<outbound port>: where connect4 sends captured connections.
    pub outbound: TcpListener,
    /// 127.0.0.1:<inbound port>: where sk_lookup steers inbound plaintext.
    pub inbound: TcpListener,
    /// <pod IP>:15008, when one was handed over by the agent before (a new agent listens
    /// there itself once it knows the pod's identity).
    pub hbone: Option<TcpListener>,
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of the network namespace a socket lives in (Linux 5.14+).
pub fn netns_cookie(sock: &impl AsRawFd) -> std::io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer and length of matching size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` on an accepted socket.
pub fn original_dst(sock: &impl AsRawFd) -> std::io::Result<std::net::SocketAddrV4> {
    // SAFETY: sockaddr_in is plain data; zeroed is a valid value.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid fd, output buffer and length of matching size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_IP,
            mesh_common::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(std::net::SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}
