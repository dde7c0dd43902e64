//! The client side: pooled, multiplexed HTTP/2 connections, one CONNECT stream per tunnel.
//!
//! Connections are keyed by (source identity, destination address, expected destination
//! identity). A stream is leased on the first usable connection of its key with room (our cap,
//! lowered to the server's SETTINGS_MAX_CONCURRENT_STREAMS once known); when all are full
//! another connection is opened, up to the per-key cap. A connection being established already
//! counts the streams waiting for it, so a burst opens only as many connections as it needs.
//!
//! Each connection is driven by its own task, which takes it out of the pool when it received
//! GOAWAY (its open streams go on), failed, stopped answering keepalive PINGs, or was idle for
//! too long.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{BoxFuture, poll_fn};
use h2::client::{Connection, SendRequest};
use h2::{Ping, Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use mesh_core::SpiffeId;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use serde::Serialize;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::{debug, warn};

use super::requests::{ALPN_REQUESTS, BoxError, RecvBody, send_body};
use super::{
    DEFAULT_CONNECTION_WINDOW, DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_HEADER_LIST_SIZE,
    DEFAULT_MAX_SEND_BUFFER, DEFAULT_STREAM_WINDOW, DialError, HboneError, HboneStream,
    REASON_HEADER, Stats, TLS_READ_BUFFER,
};
use crate::identity::CertManager;
use crate::tls::{self, ALPN_H2};

/// Opens the TCP connection to a destination's HBONE port (to choose the network namespace or
/// socket options); `TcpStream::connect` by default.
pub type Dialer =
    Arc<dyn Fn(SocketAddr) -> BoxFuture<'static, io::Result<TcpStream>> + Send + Sync>;

/// Settings of an [`HbonePool`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolConfig {
    /// Streams leased on one connection at most; the server's own limit applies too.
    pub max_streams_per_connection: usize,
    /// Connections per key at most; beyond, `connect` fails with `PoolExhausted`.
    pub max_connections_per_key: usize,
    /// HTTP/2 receive window of each stream.
    pub stream_window: u32,
    /// HTTP/2 receive window of each connection.
    pub connection_window: u32,
    pub max_header_list_size: u32,
    /// Bounds establishing a connection (TCP, TLS, HTTP/2), and a whole `connect`.
    pub connect_timeout: Duration,
    /// A PING is sent this often; a connection that does not answer within
    /// `keepalive_timeout` is dropped with its streams.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// Offer to send L7 requests as streams of the connection ([`super::requests`]); off,
    /// every request goes in a CONNECT tunnel.
    pub requests: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_connection: 100,
            // The proxy sizes this from the pod's outbound connection cap
            // ([`PoolConfig::for_connections`]); alone, 16,384 streams to one destination.
            max_connections_per_key: 164,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            requests: true,
        }
    }
}

/// The largest HTTP/2 window (2^31 - 1).
pub(super) const MAX_WINDOW: u32 = (1 << 31) - 1;

impl PoolConfig {
    /// Enough connections to one destination for `max_connections` streams (a pod's whole
    /// outbound connection cap) at `max_streams_per_connection` each.
    pub fn for_connections(self, max_connections: usize) -> PoolConfig {
        PoolConfig {
            max_connections_per_key: max_connections
                .div_ceil(self.max_streams_per_connection.max(1)),
            ..self
        }
    }

    pub fn validate(&self) -> Result<(), HboneError> {
        let check = |ok: bool, what: &'static str| {
            if ok {
                Ok(())
            } else {
                Err(HboneError::Config(what))
            }
        };
        check(
            self.max_streams_per_connection > 0,
            "max_streams_per_connection is 0",
        )?;
        check(
            self.max_connections_per_key > 0,
            "max_connections_per_key is 0",
        )?;
        check(
            self.stream_window <= MAX_WINDOW,
            "stream_window is above 2^31-1",
        )?;
        check(
            self.connection_window <= MAX_WINDOW,
            "connection_window is above 2^31-1",
        )?;
        check(!self.connect_timeout.is_zero(), "connect_timeout is 0")?;
        check(
            !self.keepalive_interval.is_zero(),
            "keepalive_interval is 0",
        )?;
        check(!self.keepalive_timeout.is_zero(), "keepalive_timeout is 0")?;
        check(!self.idle_timeout.is_zero(), "idle_timeout is 0")
    }
}

/// Pooled HBONE connections. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct HbonePool {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    src: SpiffeId,
    addr: SocketAddr,
    dst: SpiffeId,
    /// The proxy thread asking ([`crate::serving::current`]): each has connections of its
    /// own, driven on it, so a stream's tasks and its connection's wake each other on one
    /// thread.
    thread: Option<usize>,
}

struct Inner {
    mgr: Arc<CertManager>,
    config: PoolConfig,
    dialer: Dialer,
    stats: Arc<Stats>,
    epoch: Instant,
    next_id: AtomicU64,
    keys: Mutex<HashMap<Key, Entry>>,
}

#[derive(Default)]
struct Entry {
    tls: Option<Arc<ClientConfig>>,
    conns: Vec<Arc<Conn>>,
}

enum Phase {
    Connecting,
    /// The request handle, and whether the server takes requests as streams.
    Ready(SendRequest<Bytes>, bool),
    Failed(Arc<DialError>),
}

/// One pooled connection.
struct Conn {
    id: u64,
    /// Streams leased; taken under the pool lock.
    leased: AtomicUsize,
    /// The most streams to lease.
    limit: AtomicUsize,
    /// Cleared once the connection takes no new streams; it is then out of the pool.
    usable: AtomicBool,
    /// Milliseconds since the pool's epoch when `leased` last fell to zero.
    idle_since: AtomicU64,
    phase: watch::Receiver<Phase>,
}

/// A stream's place on a connection, given back on drop.
pub(crate) struct Lease {
    conn: Arc<Conn>,
    epoch: Instant,
}

/// How a connection stopped taking streams.
enum End {
    Closed(Result<(), h2::Error>),
    GoingAway(h2::Error),
    Dead,
    Idle,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn millis_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
}

// === impl HbonePool ===

impl std::fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HbonePool")
            .field("config", &self.inner.config)
            .field("connections", &self.connections())
            .finish()
    }
}

impl HbonePool {
    /// A pool presenting certificates of `mgr`, dialing with `TcpStream::connect`.
    pub fn new(mgr: Arc<CertManager>, config: PoolConfig) -> Result<Self, HboneError> {
        let dialer: Dialer = Arc::new(|addr| Box::pin(TcpStream::connect(addr)));
        Self::with_dialer(mgr, config, dialer)
    }

    pub fn with_dialer(
        mgr: Arc<CertManager>,
        config: PoolConfig,
        dialer: Dialer,
    ) -> Result<Self, HboneError> {
        config.validate()?;
        Ok(HbonePool {
            inner: Arc::new(Inner {
                mgr,
                config,
                dialer,
                stats: Arc::default(),
                epoch: Instant::now(),
                next_id: AtomicU64::new(1),
                keys: Mutex::default(),
            }),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// Connections in the pool (established or being established) that take new streams.
    pub fn connections(&self) -> usize {
        lock(&self.inner.keys)
            .values()
            .flat_map(|e| &e.conns)
            .filter(|c| c.usable.load(Ordering::Acquire))
            .count()
    }

    /// Opens a tunnel from `src` to `authority` (the application's original destination)
    /// through the HBONE port `dst_addr` of a pod that must present `dst_id`. A CONNECT
    /// refused because the connection was going away (GOAWAY, REFUSED_STREAM) is retried once
    /// on a fresh connection.
    pub async fn connect(
        &self,
        src: &SpiffeId,
        dst_addr: SocketAddr,
        dst_id: &SpiffeId,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let key = Key {
            src: src.clone(),
            addr: dst_addr,
            dst: dst_id.clone(),
            thread: crate::serving::current(),
        };
        let after = self.inner.config.connect_timeout;
        tokio::time::timeout(after, self.connect_key(&key, authority))
            .await
            .unwrap_or(Err(HboneError::Timeout {
                what: "HBONE connect",
                after,
            }))
    }

    /// Sends `request` (in HTTP/2's form) for the application at `target` as a stream of the
    /// pooled connection from `src` to the HBONE port `dst_addr` of a pod that must present
    /// `dst_id` ([`super::requests`]). `Ok(Err(request))`, untouched, when that connection
    /// does not take requests as streams (the peer offered only `h2`, or the pool does not
    /// offer them): the caller sends it in a CONNECT tunnel instead. A request without a body
    /// refused because the connection was going away is retried once on a fresh connection.
    pub async fn request<B>(
        &self,
        src: &SpiffeId,
        dst_addr: SocketAddr,
        dst_id: &SpiffeId,
        target: SocketAddrV4,
        request: Request<B>,
    ) -> Result<Result<Response<RecvBody>, Request<B>>, HboneError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError> + Send,
    {
        if !self.inner.config.requests {
            return Ok(Err(request));
        }
        let key = Key {
            src: src.clone(),
            addr: dst_addr,
            dst: dst_id.clone(),
            thread: crate::serving::current(),
        };
        let tls = self.tls_config(&key)?;
        let target = http::HeaderValue::from_str(&target.to_string())
            .map_err(|_| HboneError::Config("the target does not form a header value"))?;
        let after = self.inner.config.connect_timeout;
        let (parts, body) = request.into_parts();
        let end = body.is_end_stream();
        let mut body = Some(body);
        let mut retried = false;
        loop {
            let lease = self.lease(&key, &tls)?;
            let (send, requests) = tokio::time::timeout(after, lease.ready())
                .await
                .map_err(|_| HboneError::Timeout {
                    what: "HBONE connect",
                    after,
                })?
                .map_err(|source| HboneError::Dial {
                    addr: key.addr,
                    source,
                })?;
            if !requests {
                let body = body
                    .take()
                    .expect("the body is sent only on a request stream");
                return Ok(Err(Request::from_parts(parts, body)));
            }
            let mut head = Request::new(());
            *head.method_mut() = parts.method.clone();
            *head.uri_mut() = parts.uri.clone();
            *head.version_mut() = Version::HTTP_2;
            *head.headers_mut() = parts.headers.clone();
            head.headers_mut()
                .insert(super::requests::TARGET_HEADER, target.clone());
            let sent = match send.ready().await {
                Ok(mut send) => send.send_request(head, end),
                Err(e) => Err(e),
            };
            let (response, mut stream) = match sent {
                Ok(sent) => sent,
                Err(e) if !retried => {
                    debug!(dst = %key.addr, error = %e, "HBONE connection going away, retrying");
                    self.inner.retire(&key, &lease.conn);
                    Stats::inc(&self.inner.stats.streams_retried);
                    retried = true;
                    continue;
                }
                Err(source) => {
                    return Err(HboneError::Http2 {
                        addr: key.addr,
                        source,
                    });
                }
            };
            Stats::inc(&self.inner.stats.requests);
            // This task sends the body while it waits for the answer; what is left of the body
            // when the answer's head arrives (a call whose answer streams while its request
            // still does) is sent by a task of its own.
            let mut pump = (!end).then(|| body.take()).flatten().map(|body| {
                Box::pin(async move {
                    if let Err(e) = send_body(body, &mut stream).await {
                        debug!(error = %e, "request body not sent whole");
                        stream.send_reset(Reason::CANCEL);
                    }
                })
            });
            let mut response = response;
            let answered = loop {
                match pump.as_mut() {
                    None => break response.await,
                    Some(sending) => tokio::select! {
                        answered = &mut response => break answered,
                        () = sending => pump = None,
                    },
                }
            };
            if let Some(rest) = pump {
                tokio::spawn(rest);
            }
            match answered {
                Ok(response) => {
                    return Ok(Ok(response.map(|b| RecvBody::new(b, Some(lease)))));
                }
                Err(e)
                    if end
                        && !retried
                        && (is_remote_goaway(&e) || e.reason() == Some(Reason::REFUSED_STREAM)) =>
                {
                    debug!(dst = %key.addr, error = %e, "request stream refused, retrying");
                    self.inner.retire(&key, &lease.conn);
                    Stats::inc(&self.inner.stats.streams_retried);
                    retried = true;
                }
                Err(source) => {
                    return Err(HboneError::Http2 {
                        addr: key.addr,
                        source,
                    });
                }
            }
        }
    }

    async fn connect_key(
        &self,
        key: &Key,
        authority: SocketAddr,
    ) -> Result<HboneStream, HboneError> {
        let uri = Uri::try_from(authority.to_string())
            .map_err(|_| HboneError::Config("the authority does not form a URI"))?;
        let tls = self.tls_config(key)?;
        let mut retried = false;
        loop {
            let lease = self.lease(key, &tls)?;
            let (send, _) = lease.ready().await.map_err(|source| HboneError::Dial {
                addr: key.addr,
                source,
            })?;
            match open(send, uri.clone()).await {
                Ok((response, stream)) => return self.answered(response, stream, lease),
                Err((e, true)) if !retried => {
                    debug!(dst = %key.addr, error = %e, "HBONE connection going away, retrying");
                    self.inner.retire(key, &lease.conn);
                    Stats::inc(&self.inner.stats.streams_retried);
                    retried = true;
                }
                Err((source, _)) => {
                    return Err(HboneError::Http2 {
                        addr: key.addr,
                        source,
                    });
                }
            }
        }
    }

    fn answered(
        &self,
        response: Response<RecvStream>,
        stream: SendStream<Bytes>,
        lease: Lease,
    ) -> Result<HboneStream, HboneError> {
        let stats = &self.inner.stats;
        let status = response.status();
        if status != StatusCode::OK {
            Stats::inc(&stats.streams_refused);
            let reason = match response.headers().get(REASON_HEADER) {
                Some(v) => String::from_utf8_lossy(v.as_bytes())
                    .chars()
                    .take(256)
                    .collect(),
                None => status.canonical_reason().unwrap_or_default().to_string(),
            };
            return Err(HboneError::Refused {
                status: status.as_u16(),
                reason,
            });
        }
        Stats::inc(&stats.streams_opened);
        Ok(HboneStream::new(
            stream,
            response.into_body(),
            stats.clone(),
            lease,
        ))
    }

    /// The key's client TLS configuration, built once per key.
    fn tls_config(&self, key: &Key) -> Result<Arc<ClientConfig>, HboneError> {
        if let Some(tls) = lock(&self.inner.keys).get(key).and_then(|e| e.tls.clone()) {
            return Ok(tls);
        }
        let mut tls = tls::client_config(self.inner.mgr.clone(), key.src.clone(), key.dst.clone())?;
        if !self.inner.config.requests {
            let mut config = (*tls).clone();
            config.alpn_protocols = vec![ALPN_H2.to_vec()];
            tls = Arc::new(config);
        }
        let mut keys = lock(&self.inner.keys);
        Ok(keys
            .entry(key.clone())
            .or_default()
            .tls
            .get_or_insert(tls)
            .clone())
    }

    /// A place on a usable connection with room, or on a new one.
    fn lease(&self, key: &Key, tls: &Arc<ClientConfig>) -> Result<Lease, HboneError> {
        let inner = &self.inner;
        let mut keys = lock(&inner.keys);
        let entry = keys.entry(key.clone()).or_default();
        entry.conns.retain(|c| c.usable.load(Ordering::Acquire));
        let epoch = inner.epoch;
        if let Some(conn) = entry
            .conns
            .iter()
            .find(|c| c.leased.load(Ordering::Acquire) < c.limit.load(Ordering::Acquire))
        {
            conn.leased.fetch_add(1, Ordering::AcqRel);
            return Ok(Lease {
                conn: conn.clone(),
                epoch,
            });
        }
        if entry.conns.len() >= inner.config.max_connections_per_key {
            return Err(HboneError::PoolExhausted {
                addr: key.addr,
                connections: entry.conns.len(),
            });
        }
        let (phase_tx, phase) = watch::channel(Phase::Connecting);
        let conn = Arc::new(Conn {
            id: inner.next_id.fetch_add(1, Ordering::Relaxed),
            leased: AtomicUsize::new(1),
            limit: AtomicUsize::new(inner.config.max_streams_per_connection),
            usable: AtomicBool::new(true),
            idle_since: AtomicU64::new(millis_since(epoch)),
            phase,
        });
        entry.conns.push(conn.clone());
        tokio::spawn(establish(
            inner.clone(),
            key.clone(),
            conn.clone(),
            phase_tx,
            tls.clone(),
        ));
        Ok(Lease { conn, epoch })
    }
}

// === impl Inner ===

impl Inner {
    /// Takes `conn` out of the pool: it takes no new streams.
    fn retire(&self, key: &Key, conn: &Conn) {
        conn.usable.store(false, Ordering::Release);
        let mut keys = lock(&self.keys);
        if let Some(entry) = keys.get_mut(key) {
            entry.conns.retain(|c| c.id != conn.id);
            if entry.conns.is_empty() {
                keys.remove(key);
            }
        }
    }

    /// Retires `conn` if no stream is leased on it: checked under the lock leases are taken
    /// under, so no stream can be leased on it afterwards.
    fn retire_if_unused(&self, key: &Key, conn: &Conn) -> bool {
        let mut keys = lock(&self.keys);
        if conn.leased.load(Ordering::Acquire) > 0 {
            return false;
        }
        conn.usable.store(false, Ordering::Release);
        if let Some(entry) = keys.get_mut(key) {
            entry.conns.retain(|c| c.id != conn.id);
            if entry.conns.is_empty() {
                keys.remove(key);
            }
        }
        true
    }
}

/// Establishes `conn`, publishes the outcome to the streams waiting for it, and drives it.
async fn establish(
    inner: Arc<Inner>,
    key: Key,
    conn: Arc<Conn>,
    phase: watch::Sender<Phase>,
    tls: Arc<ClientConfig>,
) {
    let after = inner.config.connect_timeout;
    let dialed = tokio::time::timeout(after, dial(&inner, &key, tls))
        .await
        .unwrap_or(Err(DialError::Timeout(after)));
    match dialed {
        Ok((send, h2, requests)) => {
            Stats::inc(&inner.stats.connections_opened);
            debug!(conn = conn.id, dst = %key.addr, dst.id = %key.dst, requests, "HBONE connection open");
            phase.send_replace(Phase::Ready(send.clone(), requests));
            let driver = Driver {
                pool: Arc::downgrade(&inner),
                config: inner.config.clone(),
                stats: inner.stats.clone(),
                epoch: inner.epoch,
                key,
                conn,
            };
            drop(inner);
            driver.run(h2, send).await;
        }
        Err(e) => {
            Stats::inc(&inner.stats.connections_failed);
            warn!(dst = %key.addr, dst.id = %key.dst, error = %e, "HBONE connection failed");
            inner.retire(&key, &conn);
            phase.send_replace(Phase::Failed(Arc::new(e)));
        }
    }
}

type H2Connection = Connection<TlsStream<BufReader<TcpStream>>, Bytes>;

async fn dial(
    inner: &Inner,
    key: &Key,
    tls: Arc<ClientConfig>,
) -> Result<(SendRequest<Bytes>, H2Connection, bool), DialError> {
    // The client presents the source's current certificate; make sure there is one.
    inner
        .mgr
        .fetch(&key.src)
        .await
        .map_err(DialError::Certificate)?;
    let tcp = (inner.dialer)(key.addr).await.map_err(DialError::Tcp)?;
    tcp.set_nodelay(true).map_err(DialError::Tcp)?;
    // SPIFFE certificates carry no DNS name and SNI is off: the name is not used.
    let name = ServerName::from(key.addr.ip());
    let tls = TlsConnector::from(tls)
        .connect(name, BufReader::with_capacity(TLS_READ_BUFFER, tcp))
        .await
        .map_err(DialError::Tls)?;
    let requests = match tls.get_ref().1.alpn_protocol() {
        Some(ALPN_REQUESTS) => true,
        Some(ALPN_H2) => false,
        _ => return Err(DialError::Alpn),
    };
    let config = &inner.config;
    h2::client::Builder::new()
        .initial_window_size(config.stream_window)
        .initial_connection_window_size(config.connection_window)
        .max_header_list_size(config.max_header_list_size)
        .max_frame_size(DEFAULT_MAX_FRAME_SIZE)
        .max_send_buffer_size(DEFAULT_MAX_SEND_BUFFER)
        // h2 counts the resets it sends on its own (for frames that arrive on a stream the
        // caller already let go of: an aborted download whose end of stream was on the wire)
        // over the connection's whole life, and closes the connection at 1,024 by default:
        // a pooled connection would die, with every tunnel on it, after a thousand ordinary
        // hang-ups. The peer is a proxy that proved its workload identity in mutual TLS, the
        // threat that limit guards against (a hostile server flooding resets) is not one here.
        .max_local_error_reset_streams(None)
        .enable_push(false)
        .handshake(tls)
        .await
        .map(|(send, h2)| (send, h2, requests))
        .map_err(DialError::Http2)
}

/// What drives an established connection; holds the pool weakly.
struct Driver {
    pool: Weak<Inner>,
    config: PoolConfig,
    stats: Arc<Stats>,
    epoch: Instant,
    key: Key,
    conn: Arc<Conn>,
}

impl Driver {
    /// Drives the connection until it ends, taking it out of the pool as soon as it takes no new
    /// streams.
    async fn run(self, mut h2: H2Connection, mut probe: SendRequest<Bytes>) {
        let Driver {
            pool,
            config,
            stats,
            epoch,
            key,
            conn,
        } = &self;
        let conn: &Conn = conn;
        let pings = h2.ping_pong();
        let keepalive = async {
            let Some(mut pings) = pings else {
                return futures::future::pending().await;
            };
            loop {
                tokio::time::sleep(config.keepalive_interval).await;
                let pong =
                    tokio::time::timeout(config.keepalive_timeout, pings.ping(Ping::opaque()));
                if !matches!(pong.await, Ok(Ok(_))) {
                    return;
                }
            }
        };
        let idle = async {
            let check = (config.idle_timeout / 4).max(Duration::from_millis(10));
            loop {
                tokio::time::sleep(check).await;
                let since = conn.idle_since.load(Ordering::Acquire);
                let idle_for = Duration::from_millis(millis_since(*epoch).saturating_sub(since));
                // Retired connections close once their last stream is given back, as do
                // connections of a pool that was dropped.
                let retired = !conn.usable.load(Ordering::Acquire);
                if !retired && idle_for < config.idle_timeout {
                    continue;
                }
                let unused = match pool.upgrade() {
                    Some(pool) => pool.retire_if_unused(key, conn),
                    None => conn.leased.load(Ordering::Acquire) == 0,
                };
                if unused {
                    return;
                }
            }
        };
        tokio::pin!(keepalive, idle);

        let cap = config.max_streams_per_connection;
        let open = poll_fn(|cx: &mut Context<'_>| {
            if let Poll::Ready(r) = Pin::new(&mut h2).poll(cx) {
                // A GOAWAY may have closed an idle connection in this very poll.
                if let Poll::Ready(Err(e)) = probe.poll_ready(cx)
                    && is_remote_goaway(&e)
                {
                    Stats::inc(&stats.goaways);
                }
                return Poll::Ready(End::Closed(r));
            }
            // A fresh handle is not ready once GOAWAY arrived or the connection failed.
            if let Poll::Ready(Err(e)) = probe.poll_ready(cx) {
                return Poll::Ready(End::GoingAway(e));
            }
            let limit = cap.min(probe.current_max_send_streams()).max(1);
            conn.limit.store(limit, Ordering::Release);
            Poll::Pending
        });
        let mut end = tokio::select! {
            end = open => end,
            () = &mut keepalive => End::Dead,
            () = &mut idle => End::Idle,
        };
        if let Some(pool) = pool.upgrade() {
            pool.retire(key, conn);
        }
        if let End::GoingAway(e) = &end {
            if is_remote_goaway(e) {
                Stats::inc(&stats.goaways);
            }
            debug!(conn = conn.id, dst = %key.addr, reason = %e, "HBONE connection going away");
            // Streams already open go on until they end.
            end = tokio::select! {
                r = &mut h2 => End::Closed(r),
                () = &mut keepalive => End::Dead,
            };
        }
        Stats::inc(&stats.connections_closed);
        match end {
            End::Closed(Ok(())) | End::Idle => {
                debug!(conn = conn.id, dst = %key.addr, "HBONE connection closed")
            }
            End::Closed(Err(e)) | End::GoingAway(e) => {
                debug!(conn = conn.id, dst = %key.addr, error = %e, "HBONE connection ended")
            }
            End::Dead => {
                warn!(conn = conn.id, dst = %key.addr, "HBONE connection unresponsive, dropped")
            }
        }
    }
}

fn is_remote_goaway(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote()
}

/// Sends the CONNECT and waits for the response head. On error, whether the request is known
/// not to have been processed, so that it may be retried on another connection.
async fn open(
    send: SendRequest<Bytes>,
    uri: Uri,
) -> Result<(Response<RecvStream>, SendStream<Bytes>), (h2::Error, bool)> {
    let mut send = send.ready().await.map_err(|e| (e, true))?;
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_2;
    let (response, stream) = send.send_request(request, false).map_err(|e| (e, true))?;
    let response = response.await.map_err(|e| {
        let unprocessed = is_remote_goaway(&e) || e.reason() == Some(Reason::REFUSED_STREAM);
        (e, unprocessed)
    })?;
    Ok((response, stream))
}

// === impl Lease ===

impl Lease {
    /// The connection's request handle once established, and whether it takes requests as
    /// streams.
    async fn ready(&self) -> Result<(SendRequest<Bytes>, bool), Arc<DialError>> {
        let mut phase = self.conn.phase.clone();
        let phase = phase
            .wait_for(|p| !matches!(p, Phase::Connecting))
            .await
            .map_err(|_| Arc::new(DialError::Abandoned))?;
        match &*phase {
            Phase::Ready(send, requests) => Ok((send.clone(), *requests)),
            Phase::Failed(e) => Err(e.clone()),
            Phase::Connecting => Err(Arc::new(DialError::Abandoned)),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.leased.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since
                .store(millis_since(self.epoch), Ordering::Release);
        }
    }
}
