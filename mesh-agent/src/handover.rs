//! Handing the node from a running agent to its successor (an upgrade, or a restart where the
//! new agent starts before the old one stops) without a moment in which a pod has no
//! listener.
//!
//! The running agent listens on a unix socket (`--handover-socket`, a `SOCK_SEQPACKET` socket
//! in a directory only root may enter; the peer must run as the same user). A starting agent
//! that finds it asks for the listening sockets, and gets, one message per pod, the pod's
//! outbound, inbound and HBONE listeners (`SCM_RIGHTS`), then one message per admin endpoint.
//! Both agents then accept on the same sockets: the kernel's accept queues never close. Once
//! the successor serves every pod it wants (its first reconcile with the controller's
//! configuration), it says `taken`; the old agent stops accepting without closing anything,
//! lets its open connections finish for `--drain-grace` ([`mesh_proxy::proxy::Stop`]), never
//! unenrolls a pod, and idles until it is stopped. A successor that goes away before `taken`
//! leaves the old agent serving as before.
//!
//! The datapath needs no hand-over: its maps and links are pinned, and the successor adopts
//! them (or, built with other programs, attaches its own before removing the old ones).
use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag,
    SockType, UnixAddr, sockopt,
};
use serde::{Deserialize, Serialize};
use tokio::io::{Interest, unix::AsyncFd};
use tokio::sync::{mpsc, oneshot};

use mesh_netns::PodSockets;
use mesh_proxy::proxy::Listening;

/// The version of the exchange below; both sides must speak the same.
const PROTOCOL: u32 = 1;
/// Largest message (JSON, without its descriptors).
const MAX_MESSAGE: usize = 64 * 1024;
/// How long either side waits for the other's next message.
const PATIENCE: Duration = Duration::from_secs(10);

/// Why handing over failed. The old agent goes on serving whatever happens.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("{what} {}: {source}", path.display())]
    Socket {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the other agent broke the exchange: {0}")]
    Protocol(String),
    #[error("the peer runs as uid {uid}, not as this agent's uid {own}: refused")]
    Stranger { uid: u32, own: u32 },
    #[error("the other agent speaks hand-over protocol {theirs}, this one {PROTOCOL}")]
    Version { theirs: u32 },
}

fn io(what: &'static str) -> impl FnOnce(nix::Error) -> HandoverError {
    move |e| HandoverError::Io {
        what,
        source: e.into(),
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Message {
    /// Successor -> running agent, first.
    Hello { protocol: u32, version: String },
    /// A pod's listeners: outbound, inbound, and with `hbone`, the HBONE one.
    Pod { name: String, hbone: bool },
    /// An admin or metrics listener.
    Endpoint,
    /// Nothing more to hand over.
    End { version: String },
    /// Successor -> running agent: it serves every pod; stop accepting.
    Taken,
}

impl Message {
    fn descriptors(&self) -> usize {
        match self {
            Message::Pod { hbone, .. } => 2 + usize::from(*hbone),
            Message::Endpoint => 1,
            _ => 0,
        }
    }
}

fn send(sock: &OwnedFd, msg: &Message, fds: &[RawFd]) -> Result<(), HandoverError> {
    let bytes = serde_json::to_vec(msg).map_err(|e| HandoverError::Protocol(e.to_string()))?;
    let cmsgs = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsgs };
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&bytes)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io("send a hand-over message"))?;
    Ok(())
}

/// The next message and its descriptors; `None` once the other side closed.
fn recv(sock: &OwnedFd) -> Result<Option<(Message, Vec<OwnedFd>)>, HandoverError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 3]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io("receive a hand-over message"))?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io("read the descriptors"))? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: the kernel just installed these descriptors in this process for this
            // message; nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let (len, truncated) = (
        msg.bytes,
        msg.flags
            .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
    );
    if truncated {
        return Err(HandoverError::Protocol("a message was truncated".into()));
    }
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let message: Message = serde_json::from_slice(&buf[..len])
        .map_err(|e| HandoverError::Protocol(format!("unreadable message: {e}")))?;
    if fds.len() != message.descriptors() {
        return Err(HandoverError::Protocol(format!(
            "{message:?} came with {} descriptors",
            fds.len()
        )));
    }
    Ok(Some((message, fds)))
}

fn seqpacket() -> Result<OwnedFd, HandoverError> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(io("create a unix socket"))
}

fn patient(sock: &OwnedFd) -> Result<(), HandoverError> {
    let t = nix::sys::time::TimeVal::new(PATIENCE.as_secs() as _, 0);
    socket::setsockopt(sock, sockopt::ReceiveTimeout, &t).map_err(io("set a timeout"))?;
    socket::setsockopt(sock, sockopt::SendTimeout, &t).map_err(io("set a timeout"))
}

/// Only a process of this agent's own user may take or give the node's sockets.
fn same_user(sock: &impl AsFd) -> Result<(), HandoverError> {
    let cred =
        socket::getsockopt(sock, sockopt::PeerCredentials).map_err(io("read the peer's user"))?;
    let own = nix::unistd::geteuid().as_raw();
    if cred.uid() != own {
        return Err(HandoverError::Stranger {
            uid: cred.uid(),
            own,
        });
    }
    Ok(())
}

// === The successor ===

/// What a running agent handed over.
pub struct Inherited {
    /// By `namespace/name`.
    pub pods: BTreeMap<String, PodSockets>,
    /// Its admin and metrics listeners.
    pub endpoints: Vec<TcpListener>,
    /// The version of the agent that handed them over.
    pub from: String,
    predecessor: OwnedFd,
}

impl Inherited {
    /// Tells the old agent this one serves every pod it wants: it stops accepting and
    /// drains. The sockets not claimed by then are closed here.
    pub fn taken(self) -> Result<(), HandoverError> {
        send(&self.predecessor, &Message::Taken, &[])
    }
}

/// Takes the listening sockets of the agent serving at `path`; `None` when no agent serves
/// there (the first start, or the last agent crashed).
pub fn take_over(path: &Path) -> Result<Option<Inherited>, HandoverError> {
    let sock = seqpacket()?;
    let addr = UnixAddr::new(path).map_err(io("name the hand-over socket"))?;
    match socket::connect(sock.as_raw_fd(), &addr) {
        Ok(()) => {}
        Err(nix::Error::ENOENT | nix::Error::ECONNREFUSED) => return Ok(None),
        Err(e) => {
            return Err(HandoverError::Socket {
                what: "connect to",
                path: path.into(),
                source: e.into(),
            });
        }
    }
    patient(&sock)?;
    same_user(&sock)?;
    send(
        &sock,
        &Message::Hello {
            protocol: PROTOCOL,
            version: env!("CARGO_PKG_VERSION").into(),
        },
        &[],
    )?;
    let mut pods = BTreeMap::new();
    let mut endpoints = Vec::new();
    let from = loop {
        let Some((message, fds)) = recv(&sock)? else {
            return Err(HandoverError::Protocol("it closed before the end".into()));
        };
        let mut fds = fds.into_iter().map(TcpListener::from);
        let mut next = || fds.next().expect("descriptors counted by recv");
        match message {
            Message::Pod { name, hbone } => {
                if name
                    .split_once('/')
                    .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
                {
                    return Err(HandoverError::Protocol(format!(
                        "pod name {name:?} is not namespace/name"
                    )));
                }
                let (outbound, inbound) = (next(), next());
                let hbone = hbone.then(next);
                pods.insert(
                    name,
                    PodSockets {
                        outbound,
                        inbound,
                        hbone,
                    },
                );
            }
            Message::Endpoint => endpoints.push(next()),
            Message::End { version } => break version,
            Message::Hello { protocol, .. } if protocol != PROTOCOL => {
                return Err(HandoverError::Version { theirs: protocol });
            }
            other => return Err(HandoverError::Protocol(format!("unexpected {other:?}"))),
        }
    };
    Ok(Some(Inherited {
        pods,
        endpoints,
        from,
        predecessor: sock,
    }))
}

// === The running agent ===

/// What the running agent hands over when asked.
#[derive(Debug, Default)]
pub struct Offer {
    pub pods: Vec<(String, Listening)>,
    pub endpoints: Vec<OwnedFd>,
}

/// What happened on the hand-over socket, for the agent's main loop.
#[derive(Debug)]
pub enum Event {
    /// A successor asks for the sockets: answer with them.
    Asked(oneshot::Sender<Offer>),
    /// The successor serves every pod: stop accepting, drain, never unenroll.
    Taken,
    /// The successor went away before taking over: go on as before.
    GaveUp(HandoverError),
}

/// Successors being served at a hand-over socket; dropping it stops serving and removes the
/// socket, unless a successor has put its own in its place.
pub struct Handovers {
    events: mpsc::Receiver<Event>,
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
    /// Device and inode of the socket this agent bound.
    bound: Option<(u64, u64)>,
}

impl Handovers {
    /// The next step of a successor.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }
}

impl Drop for Handovers {
    fn drop(&mut self) {
        self.task.abort();
        if self.bound.is_some() && file_id(&self.path) == self.bound {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Listens at `path` (replacing whatever socket is there: a crashed agent's, or the one this
/// agent just took over from) and reports each successor's steps. Must be called within the
/// runtime.
pub fn serve(path: &Path) -> Result<Handovers, HandoverError> {
    let err = |what, source| HandoverError::Socket {
        what,
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| err("create the directory of", e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| err("restrict the directory of", e))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| err("remove the old", e))?
        }
        Ok(_) => {
            return Err(err(
                "refusing to replace",
                std::io::Error::other("not a socket"),
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("inspect", e)),
    }
    let listener = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )
    .map_err(io("create a unix socket"))?;
    let addr = UnixAddr::new(path).map_err(io("name the hand-over socket"))?;
    socket::bind(listener.as_raw_fd(), &addr).map_err(|e| err("bind", e.into()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err("restrict", e))?;
    socket::listen(&listener, Backlog::new(4).expect("a small backlog"))
        .map_err(|e| err("listen on", e.into()))?;
    // SAFETY: an OwnedFd is a valid open descriptor, owned by the AsyncFd from here on and
    // never replaced.
    let listener = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }
        .map_err(|e| err("register", e.into()))?;
    let (events, rx) = mpsc::channel(4);
    let shown = path.display().to_string();
    let task = tokio::spawn(async move {
        loop {
            let conn = match accept(&listener).await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(socket = %shown, error = %e, "hand-over: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let asking = events.clone();
            let outcome = tokio::task::spawn_blocking(move || hand_over(&conn, &asking)).await;
            let event = match outcome {
                Ok(Ok(())) => Event::Taken,
                Ok(Err(e)) => Event::GaveUp(e),
                Err(e) => {
                    Event::GaveUp(HandoverError::Protocol(format!("the exchange failed: {e}")))
                }
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(Handovers {
        events: rx,
        task,
        path: path.into(),
        bound: file_id(path),
    })
}

/// The next successor's connection, blocking (the exchange runs on a blocking thread).
async fn accept(listener: &AsyncFd<OwnedFd>) -> std::io::Result<OwnedFd> {
    loop {
        let mut ready = listener.readable().await?;
        match socket::accept4(listener.get_ref().as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            Ok(fd) => return Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
            Err(nix::Error::EAGAIN) => ready.clear_ready(),
            Err(e) => return Err(e.into()),
        }
    }
}

/// One successor, from its hello to its `taken`.
fn hand_over(conn: &OwnedFd, events: &mpsc::Sender<Event>) -> Result<(), HandoverError> {
    patient(conn)?;
    same_user(conn)?;
    match recv(conn)? {
        Some((Message::Hello { protocol, version }, _)) => {
            if protocol != PROTOCOL {
                let _ = send(
                    conn,
                    &Message::Hello {
                        protocol: PROTOCOL,
                        version: env!("CARGO_PKG_VERSION").into(),
                    },
                    &[],
                );
                return Err(HandoverError::Version { theirs: protocol });
            }
            tracing::info!(successor = %version, "a successor asks for the node's sockets");
        }
        other => {
            return Err(HandoverError::Protocol(format!(
                "expected hello, got {other:?}"
            )));
        }
    }
    let (tx, rx) = oneshot::channel();
    events
        .blocking_send(Event::Asked(tx))
        .map_err(|_| HandoverError::Protocol("the agent is stopping".into()))?;
    let offer = rx
        .blocking_recv()
        .map_err(|_| HandoverError::Protocol("the agent is stopping".into()))?;
    for (name, l) in &offer.pods {
        let mut fds = vec![l.outbound.as_raw_fd(), l.inbound.as_raw_fd()];
        fds.extend(l.hbone.as_ref().map(|f| f.as_raw_fd()));
        let message = Message::Pod {
            name: name.clone(),
            hbone: l.hbone.is_some(),
        };
        send(conn, &message, &fds)?;
    }
    for fd in &offer.endpoints {
        send(conn, &Message::Endpoint, &[fd.as_raw_fd()])?;
    }
    send(
        conn,
        &Message::End {
            version: env!("CARGO_PKG_VERSION").into(),
        },
        &[],
    )?;
    tracing::info!(
        pods = offer.pods.len(),
        endpoints = offer.endpoints.len(),
        "handed the listening sockets over; both agents accept until the successor takes over"
    );
    // The successor reconciles first: give it the time a first configuration takes.
    let wait = nix::sys::time::TimeVal::new(300, 0);
    socket::setsockopt(conn, sockopt::ReceiveTimeout, &wait).map_err(io("set a timeout"))?;
    match recv(conn)? {
        Some((Message::Taken, _)) => Ok(()),
        Some((other, _)) => Err(HandoverError::Protocol(format!(
            "expected taken, got {other:?}"
        ))),
        None => Err(HandoverError::Protocol(
            "the successor went away before taking over".into(),
        )),
    }
}

/// The default hand-over socket of an agent instance.
pub fn default_socket(instance: &str) -> PathBuf {
    Path::new(DEFAULT_DIR).join(format!("{instance}.sock"))
}

/// Where hand-over sockets live by default (a host directory shared by the old and the new
/// agent's pods).
pub const DEFAULT_DIR: &str = "/var/run/mesh/handover";

#[cfg(test)]
mod tests;
