//! The server side: HBONE connections accepted on a pod's port 15008.
//!
//! Each connection's caller is the SPIFFE identity of its verified client certificate. Every
//! stream must be a CONNECT to a canonical IPv4 `ip:port`; the [`ConnectHandler`] then decides
//! (policy) and connects to the application, and the stream carries the bytes.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use mesh_core::SpiffeId;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{Instrument, debug, info, info_span, warn};

use super::pool::MAX_WINDOW;
use super::requests::{ALPN_REQUESTS, RecvBody, RequestHandler, TARGET_HEADER, send_body};
use super::stream::{RecvHalf, SendHalf, TunnelStream, splice};
use super::{
    AuthorityError, DEFAULT_CONNECTION_WINDOW, DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_MAX_HEADER_LIST_SIZE, DEFAULT_MAX_SEND_BUFFER, DEFAULT_STREAM_WINDOW, HboneError,
    REASON_HEADER, Stats, TLS_READ_BUFFER, parse_authority,
};
use crate::tls;
use futures::future::poll_fn;

/// Why the handler refused a tunnel: the response status (403 for policy, 502/503 when the
/// application is unreachable) and a short reason for the caller (empty: none is sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: String,
}

impl Refusal {
    pub fn new(status: u16, reason: impl Into<String>) -> Self {
        Refusal {
            status,
            reason: reason.into(),
        }
    }
}

/// What the server does with an accepted CONNECT: decide whether `peer` may reach
/// `authority`, and connect to it. The proxy authorizes with the pod's inbound policy and
/// connects in the pod's network namespace. The authority is only known to be a well-formed
/// IPv4 address: checking that it belongs to the pod is the handler's job.
///
/// Implemented for closures `Fn(SpiffeId, SocketAddr) -> impl Future<Output = Result<Io,
/// Refusal>>`.
pub trait ConnectHandler: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    fn connect(
        &self,
        peer: SpiffeId,
        authority: SocketAddr,
    ) -> impl Future<Output = Result<Self::Io, Refusal>> + Send;

    /// How an admitted stream is carried once answered 200: copied both ways to `io` (the
    /// default), or served by the handler itself (the L7 proxy reads requests straight off
    /// the stream).
    fn carry(io: Self::Io) -> Carry<Self::Io> {
        Carry::Splice(io)
    }

    /// What serves the request streams of a connection from `peer` that negotiated them
    /// ([`super::requests`]); `None` (the default): they are refused with 405.
    fn requests(&self, peer: &SpiffeId) -> Option<Arc<dyn RequestHandler>> {
        let _ = peer;
        None
    }
}

/// What the server does with an admitted stream (see [`ConnectHandler::carry`]).
pub enum Carry<Io> {
    /// Copy between the stream and `Io` until both sides ended.
    Splice(Io),
    /// [`Carry::Splice`], cut short (the stream reset) when the future resolves: the handler
    /// ends the connection (a drain, a policy change that no longer allows it).
    SpliceUntil(Io, futures::future::BoxFuture<'static, ()>),
    /// Hand the stream over: the future serves it to its end.
    Serve(Box<dyn FnOnce(TunnelStream) -> futures::future::BoxFuture<'static, ()> + Send>),
}

impl<F, Fut, Io> ConnectHandler for F
where
    F: Fn(SpiffeId, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Io, Refusal>> + Send,
    Io: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    type Io = Io;

    fn connect(
        &self,
        peer: SpiffeId,
        authority: SocketAddr,
    ) -> impl Future<Output = Result<Io, Refusal>> + Send {
        self(peer, authority)
    }
}

/// Why a stream's request is not a CONNECT the server serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("the request method is {0}, not CONNECT")]
    NotConnect(Method),
    #[error(transparent)]
    Authority(#[from] AuthorityError),
}

impl RequestError {
    /// A short stable label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            RequestError::NotConnect(_) => "not_connect",
            RequestError::Authority(_) => "authority",
        }
    }

    /// The response status: 405 for another method, 400 for a bad authority.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NotConnect(_) => StatusCode::METHOD_NOT_ALLOWED,
            RequestError::Authority(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// The short reason the caller is told.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::NotConnect(_) => "only CONNECT",
            RequestError::Authority(e) => e.reason(),
        }
    }
}

/// The destination a stream's request asks for: it must be a CONNECT whose `:authority` is a
/// canonical IPv4 `ip:port` ([`parse_authority`]). Headers other than the pseudo-headers are
/// not read. h2 has already refused malformed header blocks and header lists larger than
/// [`ServerConfig::max_header_list_size`].
pub fn connect_target<B>(request: &Request<B>) -> Result<SocketAddr, RequestError> {
    if request.method() != Method::CONNECT {
        return Err(RequestError::NotConnect(request.method().clone()));
    }
    let raw = request
        .uri()
        .authority()
        .map(|a| a.as_str())
        .unwrap_or_default();
    Ok(parse_authority(raw.as_bytes())?)
}

/// Settings of an [`HboneServer`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerConfig {
    /// Streams per connection, advertised in SETTINGS_MAX_CONCURRENT_STREAMS.
    pub max_concurrent_streams: u32,
    /// Advertised in SETTINGS_MAX_HEADER_LIST_SIZE; larger header blocks are refused.
    pub max_header_list_size: u32,
    pub stream_window: u32,
    pub connection_window: u32,
    /// Bounds the TLS handshake and the HTTP/2 preface together: a client that connects and
    /// sends nothing is dropped after it.
    pub handshake_timeout: Duration,
    /// Bounds the handler; a CONNECT it has not answered by then gets 504.
    pub connect_timeout: Duration,
    /// A tunnel that carried no byte either way for this long is reset; a connection without
    /// streams for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_streams: 1000,
            max_header_list_size: DEFAULT_MAX_HEADER_LIST_SIZE,
            stream_window: DEFAULT_STREAM_WINDOW,
            connection_window: DEFAULT_CONNECTION_WINDOW,
            handshake_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(3600),
        }
    }
}

impl ServerConfig {
    /// The HTTP/2 server settings of every HBONE connection.
    pub fn h2_builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(self.stream_window)
            .initial_connection_window_size(self.connection_window)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_header_list_size(self.max_header_list_size)
            .max_frame_size(DEFAULT_MAX_FRAME_SIZE)
            .max_send_buffer_size(DEFAULT_MAX_SEND_BUFFER);
        builder
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
            self.max_concurrent_streams > 0,
            "max_concurrent_streams is 0",
        )?;
        check(
            self.stream_window <= MAX_WINDOW,
            "stream_window is above 2^31-1",
        )?;
        check(
            self.connection_window <= MAX_WINDOW,
            "connection_window is above 2^31-1",
        )?;
        check(!self.handshake_timeout.is_zero(), "handshake_timeout is 0")?;
        check(!self.connect_timeout.is_zero(), "connect_timeout is 0")?;
        check(!self.idle_timeout.is_zero(), "idle_timeout is 0")
    }
}

/// Serves HBONE connections with one handler.
pub struct HboneServer<H> {
    acceptor: TlsAcceptor,
    handler: Arc<H>,
    config: ServerConfig,
    stats: Arc<Stats>,
    /// Bumped by [`HboneServer::drain_connections`]; connections older than the current value
    /// shut down gracefully.
    generation: watch::Sender<u64>,
}

impl<H> std::fmt::Debug for HboneServer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneServer")
            .field("config", &self.config)
            .finish()
    }
}

impl<H: ConnectHandler> HboneServer<H> {
    /// `tls` is [`tls::server_config`] of the pod's identity.
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        handler: H,
        config: ServerConfig,
    ) -> Result<Self, HboneError> {
        config.validate()?;
        Ok(HboneServer {
            acceptor: TlsAcceptor::from(tls),
            handler: Arc::new(handler),
            config,
            stats: Arc::default(),
            generation: watch::Sender::new(0),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Sends GOAWAY on every open connection: they take no new streams and close once their
    /// streams ended. Connections accepted afterwards are served as usual.
    pub fn drain_connections(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Accepts connections, serving each on its own task. Never returns; dropping the future
    /// drops every connection.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let tcp = match accepted {
                        Ok((tcp, _)) => tcp,
                        Err(e) => {
                            // Out of file descriptors, most likely: let some close.
                            warn!(error = %e, "accept an HBONE connection");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let server = self.clone();
                    connections.spawn(async move {
                        // The outcome is logged by serve_tcp.
                        let _ = server.serve_tcp(tcp).await;
                    });
                }
                Some(_) = connections.join_next() => {}
            }
        }
    }

    /// Serves one accepted TCP connection: TLS, then HTTP/2, until the client goes away.
    pub async fn serve_tcp(&self, tcp: TcpStream) -> Result<(), HboneError> {
        let remote = tcp.peer_addr().ok();
        let span = info_span!("hbone", client = ?remote);
        async {
            let _ = tcp.set_nodelay(true);
            let deadline = Instant::now() + self.config.handshake_timeout;
            let tls = tokio::time::timeout_at(
                deadline,
                self.acceptor
                    .accept(BufReader::with_capacity(TLS_READ_BUFFER, tcp)),
            )
            .await
            .map_err(|_| self.timed_out("TLS handshake"))
            .and_then(|r| r.map_err(HboneError::Accept));
            let result = match tls {
                Ok(tls) => self.serve_until(tls, deadline).await,
                Err(e) => {
                    Stats::inc(&self.stats.connections_failed);
                    Err(e)
                }
            };
            if let Err(e) = &result {
                info!(error = %e, kind = e.kind(), "HBONE connection failed");
            }
            result
        }
        .instrument(span)
        .await
    }

    /// Serves one connection whose TLS handshake is done.
    pub async fn serve_connection<IO>(&self, tls: TlsStream<IO>) -> Result<(), HboneError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin,
    {
        self.serve_until(tls, Instant::now() + self.config.handshake_timeout)
            .await
    }

    fn timed_out(&self, what: &'static str) -> HboneError {
        HboneError::Timeout {
            what,
            after: self.config.handshake_timeout,
        }
    }

    async fn serve_until<IO>(&self, tls: TlsStream<IO>, deadline: Instant) -> Result<(), HboneError>
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin,
    {
        let requests_negotiated = tls.get_ref().1.alpn_protocol() == Some(ALPN_REQUESTS);
        let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
        let peer = match tls::peer_identity(certs) {
            Ok(peer) => peer,
            Err(e) => {
                Stats::inc(&self.stats.connections_failed);
                return Err(HboneError::PeerIdentity(e));
            }
        };
        let config = &self.config;
        let handshake = config.h2_builder().handshake::<_, Bytes>(tls);
        let mut h2 = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                Stats::inc(&self.stats.connections_failed);
                return Err(HboneError::Serve(e));
            }
            Err(_) => {
                Stats::inc(&self.stats.connections_failed);
                return Err(self.timed_out("HTTP/2 preface"));
            }
        };
        Stats::inc(&self.stats.connections_opened);
        debug!(peer = %peer, requests = requests_negotiated, "HBONE connection open");
        let requests = if requests_negotiated {
            self.handler.requests(&peer)
        } else {
            None
        };

        let mut generation = self.generation.subscribe();
        let born = *generation.borrow_and_update();
        let mut draining = false;
        let active = Arc::new(AtomicUsize::new(0));
        let mut started = 0u64;
        let mut started_at_last_check = 0u64;
        let mut idle_check =
            tokio::time::interval_at(Instant::now() + config.idle_timeout, config.idle_timeout);
        let mut streams = JoinSet::new();
        let result = loop {
            tokio::select! {
                next = h2.accept() => match next {
                    Some(Ok((request, respond))) => {
                        started += 1;
                        active.fetch_add(1, Ordering::AcqRel);
                        let task = Tunnel {
                            handler: self.handler.clone(),
                            peer: peer.clone(),
                            config: config.clone(),
                            stats: self.stats.clone(),
                            active: active.clone(),
                            requests: requests.clone(),
                        };
                        streams.spawn(task.run(request, respond).in_current_span());
                    }
                    Some(Err(e)) => break Err(HboneError::Serve(e)),
                    None => break Ok(()),
                },
                changed = generation.changed(), if !draining => {
                    if changed.is_err() || *generation.borrow_and_update() > born {
                        draining = true;
                        Stats::inc(&self.stats.goaways);
                        debug!(peer = %peer, "HBONE connection draining");
                        h2.graceful_shutdown();
                    }
                }
                _ = idle_check.tick(), if !draining => {
                    if active.load(Ordering::Acquire) == 0 && started == started_at_last_check {
                        draining = true;
                        debug!(peer = %peer, "HBONE connection idle, closing");
                        h2.graceful_shutdown();
                    }
                    started_at_last_check = started;
                }
                Some(_) = streams.join_next() => {}
            }
        };
        Stats::inc(&self.stats.connections_closed);
        debug!(peer = %peer, "HBONE connection closed");
        // Streams still running lost their connection; dropping the set ends them.
        drop(streams);
        result
    }
}

/// One CONNECT stream on the server.
struct Tunnel<H> {
    handler: Arc<H>,
    peer: SpiffeId,
    config: ServerConfig,
    stats: Arc<Stats>,
    active: Arc<AtomicUsize>,
    /// The connection's request streams' handler, when it negotiated them.
    requests: Option<Arc<dyn RequestHandler>>,
}

impl<H: ConnectHandler> Tunnel<H> {
    async fn run(self, request: Request<RecvStream>, mut respond: SendResponse<Bytes>) {
        if request.method() != Method::CONNECT
            && let Some(handler) = self.requests.clone()
        {
            return self.serve_request(handler, request, respond).await;
        }
        let peer = &self.peer;
        let authority = match connect_target(&request) {
            Ok(a) => a,
            Err(e) => {
                let raw = request.uri().authority().map(|a| a.as_str());
                warn!(src.id = %peer, method = %request.method(), authority = ?raw, reason = e.reason(), "HBONE request refused");
                self.refuse(&mut respond, e.status(), e.reason());
                return;
            }
        };
        let connected = tokio::time::timeout(
            self.config.connect_timeout,
            self.handler.connect(peer.clone(), authority),
        )
        .await;
        let app = match connected {
            Ok(Ok(app)) => app,
            Ok(Err(refusal)) => {
                info!(src.id = %peer, dst = %authority, status = refusal.status, reason = %refusal.reason, "HBONE CONNECT refused");
                let status = StatusCode::from_u16(refusal.status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::BAD_GATEWAY);
                self.refuse(&mut respond, status, &refusal.reason);
                return;
            }
            Err(_) => {
                info!(src.id = %peer, dst = %authority, "HBONE CONNECT handler timed out");
                self.refuse(
                    &mut respond,
                    StatusCode::GATEWAY_TIMEOUT,
                    "connect timed out",
                );
                return;
            }
        };
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                debug!(src.id = %peer, dst = %authority, error = %e, "HBONE stream gone before 200");
                return;
            }
        };
        Stats::inc(&self.stats.streams_opened);
        debug!(src.id = %peer, dst = %authority, "HBONE tunnel open");
        let (send, recv) = (SendHalf::new(send), RecvHalf::new(request.into_body()));
        let copied = match H::carry(app) {
            Carry::Splice(app) => {
                let never = std::future::pending();
                splice(
                    send,
                    recv,
                    app,
                    self.config.idle_timeout,
                    never,
                    &self.stats,
                )
                .await
            }
            Carry::SpliceUntil(app, stop) => {
                splice(send, recv, app, self.config.idle_timeout, stop, &self.stats).await
            }
            Carry::Serve(serve) => {
                serve(TunnelStream::new(send, recv, self.stats.clone())).await;
                Ok(())
            }
        };
        Stats::inc(&self.stats.streams_closed);
        match copied {
            Ok(()) => debug!(src.id = %peer, dst = %authority, "HBONE tunnel closed"),
            Err(e) => debug!(src.id = %peer, dst = %authority, error = %e, "HBONE tunnel ended"),
        }
    }

    /// Serves one request stream: the handler's answer is the stream's response.
    async fn serve_request(
        &self,
        handler: Arc<dyn RequestHandler>,
        request: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let peer = &self.peer;
        let target = match request.headers().get(TARGET_HEADER) {
            Some(v) => parse_authority(v.as_bytes()).map_err(|e| e.reason()),
            None => Err("no x-mesh-target"),
        };
        let target = match target {
            Ok(t) => t,
            Err(reason) => {
                warn!(src.id = %peer, method = %request.method(), reason, "HBONE request stream refused");
                self.refuse(&mut respond, StatusCode::BAD_REQUEST, reason);
                return;
            }
        };
        Stats::inc(&self.stats.requests);
        let (mut parts, body) = request.into_parts();
        parts.headers.remove(TARGET_HEADER);
        let request = Request::from_parts(parts, RecvBody::new(body, None));
        let answered = handler.handle(target, request);
        let response = tokio::select! {
            response = answered => response,
            _ = poll_fn(|cx| respond.poll_reset(cx)) => {
                debug!(src.id = %peer, dst = %target, "request stream reset by the caller");
                return;
            }
        };
        let (head, body) = response.into_parts();
        let end = hyper::body::Body::is_end_stream(&body);
        let mut send = match respond.send_response(Response::from_parts(head, ()), end) {
            Ok(send) => send,
            Err(e) => {
                debug!(src.id = %peer, dst = %target, error = %e, "response head not sent");
                respond.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        };
        if !end && let Err(e) = send_body(body, &mut send).await {
            debug!(src.id = %peer, dst = %target, error = %e, "response body not sent whole");
            send.send_reset(h2::Reason::CANCEL);
        }
    }

    /// Answers with `status`, the reason (if any) in [`REASON_HEADER`], and END_STREAM.
    fn refuse(&self, respond: &mut SendResponse<Bytes>, status: StatusCode, reason: &str) {
        Stats::inc(&self.stats.streams_refused);
        let mut response = Response::new(());
        *response.status_mut() = status;
        let reason: String = reason
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(256)
            .collect();
        if let Ok(value) = HeaderValue::from_str(reason.trim())
            && !value.is_empty()
        {
            response.headers_mut().insert(REASON_HEADER, value);
        }
        if let Err(e) = respond.send_response(response, true) {
            debug!(error = %e, "HBONE stream gone before the refusal");
        }
    }
}

impl<H> Drop for Tunnel<H> {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}
