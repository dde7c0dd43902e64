//! The node proxy's per-pod listeners. For now a transparent forwarder: outbound connections go
//! to their original destination (recovered with SO_ORIGINAL_DST), inbound ones to the
//! application port they were addressed to. Upstream sockets are created inside the pod's
//! network namespace, from the agent's cgroup, so the datapath never captures them.
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

use crate::{ebpf, netns::Worker};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("register listener with the runtime: {0}")]
    Listener(std::io::Error),
}

impl ProxyError {
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Listener(_) => "listener",
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

/// Starts the pod's outbound and inbound listeners.
pub fn start(
    pod: String,
    worker: Worker,
    outbound: StdListener,
    inbound: StdListener,
) -> Result<PodProxy, ProxyError> {
    let worker = Arc::new(worker);
    let outbound = TcpListener::from_std(outbound).map_err(ProxyError::Listener)?;
    let inbound = TcpListener::from_std(inbound).map_err(ProxyError::Listener)?;
    let out_task = tokio::spawn(accept_loop(
        pod.clone(),
        worker.clone(),
        outbound,
        Direction::Outbound,
    ));
    let in_task = tokio::spawn(accept_loop(pod, worker, inbound, Direction::Inbound));
    Ok(PodProxy {
        tasks: vec![out_task, in_task],
    })
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
    let fd: OwnedFd = worker
        .run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(OwnedFd::from(s))
        })
        .await
        .map_err(std::io::Error::other)??;
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(fd));
    let mut upstream = socket.connect(SocketAddr::V4(dst)).await?;
    let _ = conn.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    // Large buffers: with the default 8 KiB a bulk stream costs a syscall pair per 8 KiB.
    copy_bidirectional_with_sizes(&mut conn, &mut upstream, COPY_BUF, COPY_BUF).await?;
    Ok(())
}
