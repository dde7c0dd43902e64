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
//! 15006) are admitted by the pod's TLS mode and policy, or closed at once. Meshed pods are
//! registered in the agent's [`LocalPods`] while their proxy runs: a connection between two
//! of them is admitted by the destination's policy and carried inside the agent, without a
//! tunnel, unless the configuration's `same_node` says `hbone`.
//!
//! Every connection is counted in the [`Telemetry`] and closed once it carried nothing either
//! way for the idle timeout. On shutdown [`drain`] stops the listeners and lets open
//! connections finish for a grace period; connection tasks are never aborted before that.
use std::{
    future::Future,
    net::{SocketAddr, SocketAddrV4, TcpListener as StdListener},
    os::fd::{AsFd as _, OwnedFd},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, info, warn};

use mesh_core::model::NamespacedName;

use crate::config::ProxyConfig;
use crate::copy::relay;
use crate::hbone::{Dialer, HBONE_PORT, HbonePool, HboneServer, PoolConfig, ServerConfig};
use crate::identity::CertManager;
use crate::inbound::{AppDialer, PlaintextInbound, PodInbound};
use crate::local::{LocalPod, LocalPods, Registration};
use crate::outbound::{Egress, OutboundConfig, PodOutbound};
pub use crate::serving::Serving;
use crate::state::StateStore;
use crate::telemetry::{
    ConnMeta, MeshPath, Metered, Peer, Reporter, ResponseFlag, Side, Telemetry,
};
use mesh_netns::PodSockets;
use mesh_netns::Worker;

/// After the grace period, how long cut connections get to record their end.
const CUT_SETTLE: Duration = Duration::from_secs(1);

/// What the proxy needs to mesh a pod: the configuration in force, the certificates, and the
/// agent's other meshed pods.
#[derive(Clone)]
pub struct Mesh {
    pub store: Arc<StateStore>,
    pub certs: Arc<CertManager>,
    pub egress: Egress,
    /// Every meshed pod of the agent, shared by their proxies.
    pub local: Arc<LocalPods>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("register listener with the runtime: {0}")]
    Listener(#[source] std::io::Error),
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

// === Reaching into the pod ===

/// Listens on an address in the pod's network namespace.
pub type Binder =
    Arc<dyn Fn(SocketAddr) -> BoxFuture<'static, std::io::Result<TcpListener>> + Send + Sync>;

/// How the proxy opens sockets for a pod.
#[derive(Clone)]
pub struct PodNet {
    /// Connects from a socket made in the pod's network namespace.
    pub connect: Dialer,
    /// Listens in the pod's network namespace.
    pub listen: Binder,
}

impl PodNet {
    /// Sockets made by a worker thread inside the pod's network namespace.
    pub fn in_netns(worker: Worker) -> PodNet {
        let worker = Arc::new(worker);
        let connect: Dialer = {
            let worker = worker.clone();
            Arc::new(move |addr| {
                let worker = worker.clone();
                Box::pin(async move { connect_in(&worker, addr).await })
            })
        };
        let listen: Binder = Arc::new(move |addr| {
            let worker = worker.clone();
            Box::pin(async move { listen_in(&worker, addr).await })
        });
        PodNet { connect, listen }
    }

    fn app_dialer(&self) -> AppDialer {
        let connect = self.connect.clone();
        Arc::new(move |addr| connect(SocketAddr::V4(addr)))
    }
}

/// Connects to `addr` from a socket made in the worker's network namespace, with Nagle's
/// algorithm off: the proxy writes what it read as soon as it read it, and a small request
/// or reply must not wait for the previous segment's ACK.
async fn connect_in(worker: &Worker, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let fd: OwnedFd = worker
        .run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(OwnedFd::from(s))
        })
        .await
        .map_err(std::io::Error::other)??;
    let stream = TcpSocket::from_std_stream(std::net::TcpStream::from(fd))
        .connect(addr)
        .await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn listen_in(worker: &Worker, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let listener = worker
        .run(move || -> std::io::Result<StdListener> {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&addr.into())?;
            s.listen(1024)?;
            s.set_nonblocking(true)?;
            Ok(s.into())
        })
        .await
        .map_err(std::io::Error::other)??;
    TcpListener::from_std(listener)
}

// === impl PodProxy ===

/// The running listeners of one pod; dropping it stops them. Connections already accepted
/// run on their own tasks and are not stopped with it.
pub struct PodProxy {
    pod: NamespacedName,
    /// The outbound and HBONE listeners, closed when the proxy stops accepting.
    accepting: Vec<JoinHandle<()>>,
    /// The inbound listener. While draining it stays open and resets what it accepts: closed,
    /// the datapath would let plaintext through to the application directly.
    inbound: JoinHandle<()>,
    refusing: watch::Sender<bool>,
    hbone: Arc<OnceLock<Arc<HboneServer<PodInbound>>>>,
    /// Its listening sockets, for a successor agent to take over; dropped when the proxy
    /// stops accepting for good.
    fds: Mutex<Option<ListenerFds>>,
    /// The pod's entry in the agent's [`LocalPods`], removed with the proxy.
    _local: Option<Registration>,
}

/// Second descriptors of a pod's listening sockets: the same sockets the accept loops use.
struct ListenerFds {
    outbound: OwnedFd,
    inbound: OwnedFd,
    /// Set once the proxy listens on the pod's HBONE port.
    hbone: Arc<OnceLock<OwnedFd>>,
}

/// The listening sockets of one pod's proxy (new descriptors of them), as handed to a
/// successor agent.
#[derive(Debug)]
pub struct Listening {
    pub outbound: OwnedFd,
    pub inbound: OwnedFd,
    pub hbone: Option<OwnedFd>,
}

/// How a drain stops the listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Nobody will accept on them: outbound and HBONE listeners close, and the inbound one
    /// resets what it accepts (closed, the datapath would let plaintext through to the
    /// application directly).
    Refuse,
    /// A successor agent accepts on the same sockets: this process only stops accepting.
    Release,
}

impl PodProxy {
    /// Takes no new connection: closes the outbound and HBONE listeners, resets new inbound
    /// connections, and sends GOAWAY on the HBONE connections (their open tunnels go on).
    pub fn stop_accepting(&self) {
        for task in &self.accepting {
            task.abort();
        }
        self.refusing.send_replace(true);
        if let Some(server) = self.hbone.get() {
            server.drain_connections();
        }
        // Nobody else holds them: the outbound and HBONE sockets close with their loops.
        self.fds
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        debug!(pod = %self.pod, "stopped accepting");
    }

    /// Takes no new connection and leaves the listening sockets to the successor agent that
    /// holds them too: every accept loop ends (inbound included: the successor answers it),
    /// and the HBONE connections get GOAWAY (their open tunnels go on).
    pub fn release(&self) {
        for task in self.accepting.iter().chain([&self.inbound]) {
            task.abort();
        }
        if let Some(server) = self.hbone.get() {
            server.drain_connections();
        }
        debug!(pod = %self.pod, "released the listeners");
    }

    /// New descriptors of the pod's listening sockets; `None` once it stopped accepting.
    pub fn listening(&self) -> std::io::Result<Option<Listening>> {
        let fds = self.fds.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(fds) = fds.as_ref() else {
            return Ok(None);
        };
        Ok(Some(Listening {
            outbound: fds.outbound.try_clone()?,
            inbound: fds.inbound.try_clone()?,
            hbone: fds.hbone.get().map(OwnedFd::try_clone).transpose()?,
        }))
    }
}

impl Drop for PodProxy {
    fn drop(&mut self) {
        for task in &self.accepting {
            task.abort();
        }
        self.inbound.abort();
    }
}

/// Starts the pod's outbound and inbound listeners; with `mesh`, also its HBONE side. Their
/// connections are served where `serving` says.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site in the agent; each argument a different part of the pod or the agent"
)]
pub fn start(
    pod: &str,
    ip: std::net::Ipv4Addr,
    net: PodNet,
    sockets: PodSockets,
    mesh: Option<Mesh>,
    telemetry: Telemetry,
    config: &ProxyConfig,
    serving: &Serving,
) -> Result<PodProxy, ProxyError> {
    let name = match pod.split_once('/') {
        Some((ns, n)) if !ns.is_empty() && !n.is_empty() => NamespacedName::new(ns, n),
        _ => return Err(ProxyError::PodName(pod.into())),
    };
    let dup = |l: &StdListener| l.try_clone().map(OwnedFd::from);
    let hbone_fd = Arc::new(OnceLock::new());
    let fds = Mutex::new(Some(ListenerFds {
        outbound: dup(&sockets.outbound).map_err(ProxyError::Listener)?,
        inbound: dup(&sockets.inbound).map_err(ProxyError::Listener)?,
        hbone: hbone_fd.clone(),
    }));
    let outbound = TcpListener::from_std(sockets.outbound).map_err(ProxyError::Listener)?;
    let inbound = TcpListener::from_std(sockets.inbound).map_err(ProxyError::Listener)?;
    let (refusing, refusing_rx) = watch::channel(false);
    let idle = config.idle_timeout;
    let hbone = Arc::new(OnceLock::new());
    let Some(mesh) = mesh else {
        let forward = Forward {
            pod: name.clone(),
            ip,
            net,
            telemetry: telemetry.clone(),
            idle,
        };
        let out = forward.clone();
        let out_task = tokio::spawn(accept_loop(
            name.clone(),
            outbound,
            telemetry.clone(),
            serving.clone(),
            None,
            move |conn| {
                let out = out.clone();
                async move { out.outbound(conn).await }
            },
        ));
        let in_task = tokio::spawn(accept_loop(
            name.clone(),
            inbound,
            telemetry,
            serving.clone(),
            Some(refusing_rx),
            move |conn| {
                let forward = forward.clone();
                async move { forward.inbound(conn).await }
            },
        ));
        return Ok(PodProxy {
            pod: name,
            accepting: vec![out_task],
            inbound: in_task,
            refusing,
            hbone,
            fds,
            _local: None,
        });
    };
    let outbound_config = OutboundConfig {
        egress: mesh.egress,
        idle_timeout: idle,
        same_node: config.same_node,
        http: config.http,
        ..OutboundConfig::default()
    };
    let pool = HbonePool::with_dialer(
        mesh.certs.clone(),
        PoolConfig {
            requests: config.request_streams,
            ..PoolConfig::default()
        }
        .for_connections(outbound_config.max_connections),
        net.connect.clone(),
    )?;
    let dial = net.app_dialer();
    let out = Arc::new(
        PodOutbound::new(
            name.clone(),
            mesh.store.clone(),
            pool,
            dial.clone(),
            outbound_config,
            telemetry.clone(),
        )
        .with_local_pods(mesh.local.clone()),
    );
    let handler = PodInbound {
        pod: name.clone(),
        store: mesh.store.clone(),
        dial: dial.clone(),
        telemetry: telemetry.clone(),
        http: config.http,
        idle_timeout: idle,
    };
    let local = mesh.local.register(LocalPod {
        ip,
        inbound: handler.clone(),
    });
    let plaintext = Arc::new(PlaintextInbound {
        pod: name.clone(),
        ip,
        store: mesh.store.clone(),
        dial: dial.clone(),
        telemetry: telemetry.clone(),
        idle_timeout: idle,
        http: config.http,
        node: crate::inbound::NodeAddresses::Local,
    });
    let hbone_side = HboneSide {
        pod: name.clone(),
        ip,
        net,
        mesh,
        handler,
        idle,
        serving: serving.clone(),
        server: hbone.clone(),
        inherited: sockets.hbone,
        fd: hbone_fd,
    };
    let accepting = vec![
        tokio::spawn(accept_loop(
            name.clone(),
            outbound,
            telemetry.clone(),
            serving.clone(),
            None,
            move |conn| {
                let out = out.clone();
                async move { mesh_outbound(&out, conn).await }
            },
        )),
        tokio::spawn(hbone_side.run()),
    ];
    let inbound = tokio::spawn(accept_loop(
        name.clone(),
        inbound,
        telemetry,
        serving.clone(),
        Some(refusing_rx),
        move |conn| {
            let plaintext = plaintext.clone();
            async move {
                if let Err(e) = plaintext.handle(conn).await {
                    debug!(pod = %plaintext.pod, reason = e.kind(), error = %e, "plaintext connection ended early");
                }
            }
        },
    ));
    Ok(PodProxy {
        pod: name,
        accepting,
        inbound,
        refusing,
        hbone,
        fds,
        _local: Some(local),
    })
}

/// Accepts connections and serves each on its own task, which runs to its end even if this
/// loop is stopped. With `refusing`, once it turns true, connections are reset at once.
async fn accept_loop<F, Fut>(
    pod: NamespacedName,
    listener: TcpListener,
    telemetry: Telemetry,
    serving: Serving,
    refusing: Option<watch::Receiver<bool>>,
    serve: F,
) where
    F: Fn(TcpStream) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                warn!(%pod, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if refusing.as_ref().is_some_and(|r| *r.borrow()) {
            // RST rather than FIN: the caller sees a refusal, not an empty answer.
            let _ = socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO));
            debug!(%pod, peer = ?conn.peer_addr().ok(), "draining: connection reset");
            continue;
        }
        let pending = telemetry.pending();
        let serve = serve.clone();
        serving.spawn(conn, move |conn| async move {
            serve(conn).await;
            drop(pending);
        });
    }
}

/// The original destination of a connection accepted on the outbound listener. One made to
/// the listener directly (`127.0.0.1:15001`) has none from the mesh; where the kernel's
/// conntrack is loaded it answers with the connection's own destination, the listener
/// itself, and carrying the connection there would make the proxy dial itself in a loop until
/// the agent runs out of descriptors. Both are refused.
fn captured_destination(conn: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let dst = mesh_netns::original_dst(conn)?;
    if conn.local_addr().ok() == Some(SocketAddr::V4(dst)) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the original destination {dst} is the outbound listener itself"),
        ));
    }
    Ok(dst)
}

async fn mesh_outbound(out: &PodOutbound, conn: TcpStream) {
    let dst = match captured_destination(&conn) {
        Ok(d) => d,
        Err(e) => {
            // Made to the outbound listener directly, not captured: nowhere to go.
            crate::inbound::refuse_now(&conn);
            debug!(pod = %out.pod, peer = ?conn.peer_addr().ok(), error = %e, "no original destination: refused");
            return;
        }
    };
    match out.handle(conn, dst).await {
        Ok(c) => {
            debug!(pod = %out.pod, %dst, path = ?c.path, sent = c.sent, received = c.received, "connection done")
        }
        Err(e) => {
            debug!(pod = %out.pod, %dst, reason = e.kind(), error = %e, "connection refused or failed")
        }
    }
}

/// The HBONE side of a meshed pod.
struct HboneSide {
    pod: NamespacedName,
    ip: std::net::Ipv4Addr,
    net: PodNet,
    mesh: Mesh,
    handler: PodInbound,
    idle: Duration,
    serving: Serving,
    /// Set once serving, for [`PodProxy::stop_accepting`].
    server: Arc<OnceLock<Arc<HboneServer<PodInbound>>>>,
    /// The listener an earlier agent handed over, used when it is bound to the pod's
    /// HBONE address.
    inherited: Option<StdListener>,
    /// Set to the listener's second descriptor once listening, for [`PodProxy::listening`].
    fd: Arc<OnceLock<OwnedFd>>,
}

impl HboneSide {
    /// Serves HBONE on the pod's `ip:15008` once the configuration names the pod's identity.
    /// Each connection runs on its own task: stopping this loop closes the listener only.
    async fn run(mut self) {
        let pod = &self.pod;
        let mut changes = self.mesh.store.subscribe();
        let identity = loop {
            let known = changes
                .borrow_and_update()
                .snapshot
                .workloads
                .get(pod)
                .map(|w| w.identity.clone());
            if let Some(id) = known {
                break id;
            }
            if changes.changed().await.is_err() {
                return;
            }
        };
        let addr = SocketAddr::from((self.ip, HBONE_PORT));
        let inherited = self
            .inherited
            .take()
            .filter(|l| l.local_addr().ok() == Some(addr))
            .map(|l| {
                l.set_nonblocking(true)
                    .and_then(|()| TcpListener::from_std(l))
            });
        let listener = match inherited {
            Some(Ok(l)) => l,
            _ => match (self.net.listen)(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(%pod, %addr, error = %e, "cannot listen on the pod's HBONE port");
                    return;
                }
            },
        };
        match listener.as_fd().try_clone_to_owned() {
            Ok(fd) => {
                let _ = self.fd.set(fd);
            }
            Err(e) => warn!(%pod, error = %e, "HBONE listener cannot be handed over"),
        }
        // Accept only with a certificate to present: until then the kernel queues the
        // connections (and an agent that handed this listener over still serves them).
        let mut pause = Duration::from_millis(100);
        while let Err(e) = self.mesh.certs.fetch(&identity).await {
            warn!(%pod, %identity, error = %e, retry_in = ?pause, "no certificate to serve HBONE with yet");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
        let tls = match crate::tls::server_config(self.mesh.certs.clone(), identity.clone()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(%pod, error = %e, "HBONE TLS configuration");
                return;
            }
        };
        let config = ServerConfig {
            idle_timeout: self.idle,
            ..ServerConfig::default()
        };
        let server = match HboneServer::new(tls, self.handler.clone(), config) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(%pod, error = %e, "HBONE server");
                return;
            }
        };
        let _ = self.server.set(server.clone());
        info!(%pod, %identity, %addr, "serving HBONE");
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    let server = server.clone();
                    // The outcome is logged by serve_tcp.
                    self.serving.spawn(tcp, move |tcp| async move {
                        let _ = server.serve_tcp(tcp).await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    warn!(%pod, error = %e, "accept an HBONE connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

// === Transparent forwarding ===

/// The proxy of a pod without a controller: every connection goes where it was addressed.
#[derive(Clone)]
struct Forward {
    pod: NamespacedName,
    /// The pod's address: where every steered inbound connection was going.
    ip: std::net::Ipv4Addr,
    net: PodNet,
    telemetry: Telemetry,
    idle: Duration,
}

impl Forward {
    async fn outbound(&self, conn: TcpStream) {
        match captured_destination(&conn) {
            Ok(dst) => {
                let mut meta = self.meta(Reporter::Source, MeshPath::Direct, dst);
                meta.src = Peer::of_pod(&self.pod);
                meta.src_addr = conn.peer_addr().ok();
                self.forward(conn, meta, dst).await;
            }
            Err(e) => {
                crate::inbound::refuse_now(&conn);
                debug!(pod = %self.pod, peer = ?conn.peer_addr().ok(), error = %e, "no original destination: refused")
            }
        }
    }

    async fn inbound(&self, conn: TcpStream) {
        match crate::inbound::steered_destination(conn.local_addr().ok(), self.ip) {
            Ok(dst) => {
                let mut meta = self.meta(Reporter::Destination, MeshPath::Plaintext, dst);
                meta.dst = Peer::of_pod(&self.pod);
                meta.src_addr = conn.peer_addr().ok();
                self.forward(conn, meta, dst).await;
            }
            Err(e) => {
                crate::inbound::refuse_now(&conn);
                debug!(pod = %self.pod, reason = e.kind(), error = %e, "inbound connection refused")
            }
        }
    }

    fn meta(&self, reporter: Reporter, path: MeshPath, dst: SocketAddrV4) -> ConnMeta {
        ConnMeta::new(self.pod.clone(), reporter, path, SocketAddr::V4(dst))
    }

    async fn forward(&self, conn: TcpStream, meta: ConnMeta, dst: SocketAddrV4) {
        // Either way it may be an application's socket that sk_msg feeds.
        let conn = crate::app_socket::AppSocket::new(conn);
        let mut conn = Metered::new(conn, self.telemetry.open(meta), Side::Source);
        let mut upstream = match (self.net.connect)(SocketAddr::V4(dst)).await {
            Ok(u) => u,
            Err(e) => {
                conn.guard_mut()
                    .fail(ResponseFlag::ConnectFailed, "connect", &e);
                return;
            }
        };
        let _ = conn.get_ref().set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        if let Err(e) = relay(&mut conn, &mut upstream, self.idle).await {
            debug!(pod = %self.pod, %dst, reason = e.kind(), error = %e, "connection ended early");
        }
    }
}

// === Drain ===

/// How a drain went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// Connections open when the drain started.
    pub open: usize,
    /// Connections still open when the grace period ended, and cut.
    pub cut: usize,
    pub elapsed: Duration,
}

/// Stops every proxy from accepting as `stop` says, then waits until no connection is open
/// or `grace` passed, and cuts what is left.
pub async fn drain<'a>(
    proxies: impl IntoIterator<Item = &'a PodProxy>,
    stop: Stop,
    telemetry: &Telemetry,
    grace: Duration,
) -> Drained {
    let started = Instant::now();
    for proxy in proxies {
        match stop {
            Stop::Refuse => proxy.stop_accepting(),
            Stop::Release => proxy.release(),
        }
    }
    telemetry.start_drain();
    let open = telemetry.live();
    info!(open, grace = ?grace, "draining: no new connections, waiting for the open ones");
    if tokio::time::timeout(grace, telemetry.idle()).await.is_ok() {
        return Drained {
            open,
            cut: 0,
            elapsed: started.elapsed(),
        };
    }
    let cut = telemetry.cut_all();
    warn!(cut, grace = ?grace, "drain grace period over: cutting the connections still open");
    let _ = tokio::time::timeout(CUT_SETTLE, telemetry.idle()).await;
    Drained {
        open,
        cut,
        elapsed: started.elapsed(),
    }
}

#[cfg(test)]
mod tests;
