//! The node proxy's per-pod listeners.
//!
//! Every socket the proxy opens for a pod (upstream connections, HBONE tunnels, the pod's
//! 15008 listener) is created inside the pod's network namespace from the agent's cgroup, so
//! the datapath never captures the proxy's own traffic and the bytes leave through the pod's
//! own interface.
//!
//! Without a controller the proxy is a transparent forwarder: outbound connections go to
//! their original destination (SO_ORIGINAL_DST), inbound ones to the port they were addressed
//! to. With a controller ([`Mesh`]) outbound connections are resolved and carried in HBONE
//! tunnels ([`crate::outbound`]), the pod serves HBONE on its IP's port 15008 once its
//! identity is known ([`crate::inbound`]), and plaintext inbound connections (steered to
//! 15006) are admitted by the pod's TLS mode and policy, or closed at once.
use std::{
    net::{SocketAddr, SocketAddrV4, TcpListener as StdListener},
    os::fd::OwnedFd,
    sync::Arc,
};

use tokio::{
    io::copy_bidirectional_with_sizes,
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};

use mesh_core::model::NamespacedName;

use crate::hbone::{HBONE_PORT, HbonePool, HboneServer, PoolConfig, ServerConfig};
use crate::identity::CertManager;
use crate::inbound::{AppDialer, PodInbound, admit_plaintext};
use crate::outbound::{Egress, PodOutbound};
use crate::state::StateStore;
use crate::{ebpf, netns::Worker};

/// What the proxy needs to mesh a pod: the configuration in force and the certificates.
#[derive(Clone)]
pub struct Mesh {
    pub store: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub egress: Egress,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("register listener with the runtime: {0}")]
    Listener(std::io::Error),
    #[error("pod name {0:?} is not namespace/name")]
    PodName(String),
    #[error("HBONE: {0}")]
    Hbone(#[from] crate::hbone::HboneError),
}

impl ProxyError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Listener(_) => "listener",
            ProxyError::PodName(_) => "pod_name",
            ProxyError::Hbone(_) => "hbone",
        }
    }
}

/// The running listeners of one pod; dropping it stops them.
pub struct PodProxy {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts the pod's outbound and inbound listeners; with `mesh`, also its HBONE side.
pub fn start(
    pod: String,
    ip: std::net::Ipv4Addr,
    worker: Worker,
    outbound: StdListener,
    inbound: StdListener,
    mesh: Option<Mesh>,
) -> Result<PodProxy, ProxyError> {
    let worker = Arc::new(worker);
    let outbound = TcpListener::from_std(outbound).map_err(ProxyError::Listener)?;
    let inbound = TcpListener::from_std(inbound).map_err(ProxyError::Listener)?;
    let Some(mesh) = mesh else {
        let out_task = tokio::spawn(accept_loop(
            pod.clone(),
            worker.clone(),
            outbound,
            Direction::Outbound,
        ));
        let in_task = tokio::spawn(accept_loop(pod, worker, inbound, Direction::Inbound));
        return Ok(PodProxy {
            tasks: vec![out_task, in_task],
        });
    };
    let name = match pod.split_once('/') {
        Some((ns, n)) if !ns.is_empty() && !n.is_empty() => NamespacedName::new(ns, n),
        _ => return Err(ProxyError::PodName(pod)),
    };
    let pool = HbonePool::with_dialer(mesh.certs.clone(), PoolConfig::default(), {
        let worker = worker.clone();
        Arc::new(move |addr| {
            let worker = worker.clone();
            Box::pin(async move { connect_in(&worker, addr).await })
        })
    })?;
    let dial = app_dialer(&worker);
    let out = Arc::new(PodOutbound::new(
        name.clone(),
        mesh.store.clone(),
        pool,
        dial.clone(),
        mesh.egress,
        crate::outbound::DEFAULT_MAX_CONNECTIONS,
    ));
    let tasks = vec![
        tokio::spawn(mesh_outbound(out, outbound)),
        tokio::spawn(mesh_plaintext(
            name.clone(),
            mesh.store.clone(),
            dial.clone(),
            inbound,
        )),
        tokio::spawn(serve_hbone(name, ip, worker, mesh, dial)),
    ];
    Ok(PodProxy { tasks })
}

/// Connects to `addr` from a socket made in the worker's network namespace.
async fn connect_in(worker: &Worker, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let fd: OwnedFd = worker
        .run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(OwnedFd::from(s))
        })
        .await
        .map_err(std::io::Error::other)??;
    TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
        .connect(addr)
        .await
}

fn app_dialer(worker: &Arc<Worker>) -> AppDialer {
    let worker = worker.clone();
    Arc::new(move |addr| {
        let worker = worker.clone();
        Box::pin(async move { connect_in(&worker, SocketAddr::V4(addr)).await })
    })
}

async fn mesh_outbound(out: Arc<PodOutbound>, listener: TcpListener) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(pod = %out.pod, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let out = out.clone();
        tokio::spawn(async move {
            let dst = match ebpf::original_dst(&conn) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(pod = %out.pod, %peer, error = %e, "no original destination");
                    return;
                }
            };
            match out.handle(conn, dst).await {
                Ok(c) => {
                    tracing::debug!(pod = %out.pod, %dst, path = ?c.path, sent = c.sent, received = c.received, "connection done")
                }
                Err(e) => {
                    tracing::info!(pod = %out.pod, %dst, reason = e.kind(), error = %e, "connection refused or failed")
                }
            }
        });
    }
}

async fn mesh_plaintext(
    pod: NamespacedName,
    store: Arc<StateStore>,
    dial: AppDialer,
    listener: TcpListener,
) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%pod, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (pod, store, dial) = (pod.clone(), store.clone(), dial.clone());
        tokio::spawn(async move {
            let dst = match conn.local_addr() {
                Ok(SocketAddr::V4(a)) => a,
                _ => return,
            };
            if let Err(refusal) = admit_plaintext(&store.current().snapshot, &pod, dst) {
                tracing::info!(%pod, %peer, %dst, reason = %refusal.reason, "plaintext connection refused");
                return;
            }
            let Ok(mut upstream) = dial(dst).await else {
                return;
            };
            let _ =
                copy_bidirectional_with_sizes(&mut conn, &mut upstream, COPY_BUF, COPY_BUF).await;
        });
    }
}

/// Serves HBONE on the pod's `ip:15008` once the configuration names the pod's identity.
async fn serve_hbone(
    pod: NamespacedName,
    ip: std::net::Ipv4Addr,
    worker: Arc<Worker>,
    mesh: Mesh,
    dial: AppDialer,
) {
    let mut changes = mesh.store.subscribe();
    let identity = loop {
        let known = changes
            .borrow_and_update()
            .snapshot
            .workloads
            .get(&pod)
            .map(|w| w.identity.clone());
        if let Some(id) = known {
            break id;
        }
        if changes.changed().await.is_err() {
            return;
        }
    };
    let listener = worker
        .run(move || -> std::io::Result<StdListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&SocketAddr::from((ip, HBONE_PORT)).into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .and_then(TcpListener::from_std);
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%pod, %ip, error = %e, "cannot listen on the pod's HBONE port");
            return;
        }
    };
    let tls = match crate::tls::server_config(mesh.certs.clone(), identity.clone()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(%pod, error = %e, "HBONE TLS configuration");
            return;
        }
    };
    let handler = PodInbound {
        pod: pod.clone(),
        store: mesh.store.clone(),
        dial,
    };
    match HboneServer::new(tls, handler, ServerConfig::default()) {
        Ok(server) => {
            tracing::info!(%pod, %identity, addr = %SocketAddr::from((ip, HBONE_PORT)), "serving HBONE");
            Arc::new(server).serve(listener).await;
        }
        Err(e) => tracing::error!(%pod, error = %e, "HBONE server"),
    }
}

#[derive(Clone, Copy, Debug)]
enum Direction {
    Outbound,
    Inbound,
}

async fn accept_loop(pod: String, worker: Arc<Worker>, listener: TcpListener, dir: Direction) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(pod = %pod, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let worker = worker.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let dst = match dir {
                Direction::Outbound => ebpf::original_dst(&conn),
                Direction::Inbound => match conn.local_addr() {
                    Ok(SocketAddr::V4(a)) => Ok(a),
                    Ok(a) => Err(std::io::Error::other(format!("not IPv4: {a}"))),
                    Err(e) => Err(e),
                },
            };
            let dst = match dst {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(pod = %pod, peer = %peer, error = %e, ?dir, "no original destination");
                    return;
                }
            };
            if let Err(e) = forward(&worker, conn, dst).await {
                tracing::debug!(pod = %pod, dst = %dst, error = %e, ?dir, "connection ended with error");
            }
        });
    }
}

const COPY_BUF: usize = 256 * 1024;

async fn forward(worker: &Worker, mut conn: TcpStream, dst: SocketAddrV4) -> std::io::Result<()> {
    let mut upstream = connect_in(worker, SocketAddr::V4(dst)).await?;
    let _ = conn.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Large buffers: with the default 8 KiB a bulk stream costs a syscall pair per 8 KiB.
    copy_bidirectional_with_sizes(&mut conn, &mut upstream, COPY_BUF, COPY_BUF).await?;
    Ok(())
}
