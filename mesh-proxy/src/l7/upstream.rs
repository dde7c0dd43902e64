//! Connections to where requests go: kept and reused per destination address.
//!
//! The caller says which version the connection speaks ([`Wire`]) and the request is
//! converted to it ([`super::version::request_for`]). HTTP/1.1 requests take an idle connection to the address, or open one; a connection goes
//! back to the idle list as soon as the response head arrived and is taken again once its
//! response body ended (hyper reports it ready). HTTP/2 requests share one connection per
//! address as streams; it is replaced when it closes. An HTTP/1.1 connection whose request
//! switched protocols (101) is never reused: it belongs to the upgraded exchange. How a
//! connection is opened (an HBONE stream, a pod of this node, a plain socket) is the caller's
//! `connect`.
//!
//! Up to [`MAX_IDLE_PER_ADDR`] HTTP/1.1 connections are kept per address, as many as a
//! busy client keeps requests in flight to it (fewer would open and close a connection per
//! request past the limit); one left idle for [`IDLE_KEEP`] is closed.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddrV4;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::debug;

use super::version::{Wire, request_for};
use super::{Body, BoxIo, CONNECTION_WINDOW, STREAM_WINDOW};

/// HTTP/1.1 connections kept per address.
pub const MAX_IDLE_PER_ADDR: usize = 256;

/// How long a kept HTTP/1.1 connection may wait for its next request.
pub const IDLE_KEEP: Duration = Duration::from_secs(90);

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError<E: std::error::Error + 'static> {
    /// No connection could be opened.
    #[error("{0}")]
    Connect(#[source] E),
    /// The connection was opened, but its HTTP handshake failed.
    #[error("HTTP handshake: {0}")]
    Handshake(#[source] hyper::Error),
    /// The request was sent (perhaps partly) and no response came back.
    #[error("{0}")]
    Send(#[source] hyper::Error),
}

/// A kept HTTP/1.1 connection, with when it was last given back.
type Kept = (http1::SendRequest<Body>, Instant);

/// Kept connections, by address.
#[derive(Default)]
pub struct Upstreams {
    h1: Mutex<HashMap<SocketAddrV4, Vec<Kept>>>,
    h2: Mutex<HashMap<SocketAddrV4, http2::SendRequest<Body>>>,
}

impl std::fmt::Debug for Upstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstreams")
            .field("h1", &lock(&self.h1).len())
            .field("h2", &lock(&self.h2).len())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Upstreams {
    pub fn new() -> Upstreams {
        Upstreams::default()
    }

    /// Sends `request` to `addr` on a kept connection speaking `wire`, or on a new one from
    /// `connect`, converted to that version first; `authority` names the destination for a
    /// request that does not (see [`super::version`]).
    pub async fn send<E, F, Fut>(
        &self,
        addr: SocketAddrV4,
        wire: Wire,
        authority: SocketAddrV4,
        mut request: Request<Body>,
        connect: F,
    ) -> Result<Response<Incoming>, UpstreamError<E>>
    where
        E: std::error::Error + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<BoxIo, E>>,
    {
        request_for(&mut request, wire, authority);
        match wire {
            Wire::Http2 => self.send_h2(addr, request, connect).await,
            Wire::Http1 => self.send_h1(addr, request, connect).await,
        }
    }

    async fn send_h2<E, F, Fut>(
        &self,
        addr: SocketAddrV4,
        request: Request<Body>,
        connect: F,
    ) -> Result<Response<Incoming>, UpstreamError<E>>
    where
        E: std::error::Error + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<BoxIo, E>>,
    {
        let kept = lock(&self.h2)
            .get(&addr)
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match kept {
            Some(s) => s,
            None => {
                let io = connect().await.map_err(UpstreamError::Connect)?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(STREAM_WINDOW)
                    .initial_connection_window_size(CONNECTION_WINDOW)
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(UpstreamError::Handshake)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(%addr, error = %e, "HTTP/2 upstream connection ended");
                    }
                });
                lock(&self.h2).insert(addr, sender.clone());
                sender
            }
        };
        sender.ready().await.map_err(UpstreamError::Send)?;
        sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Send)
    }

    async fn send_h1<E, F, Fut>(
        &self,
        addr: SocketAddrV4,
        request: Request<Body>,
        connect: F,
    ) -> Result<Response<Incoming>, UpstreamError<E>>
    where
        E: std::error::Error + 'static,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<BoxIo, E>>,
    {
        let idle = self.take_h1(addr);
        let mut sender = match idle {
            Some(s) => s,
            None => {
                let io = connect().await.map_err(UpstreamError::Connect)?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(UpstreamError::Handshake)?;
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(%addr, error = %e, "HTTP/1.1 upstream connection ended");
                    }
                });
                sender
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(UpstreamError::Send)?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(response);
        }
        let mut idle = lock(&self.h1);
        let list = idle.entry(addr).or_default();
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((sender, Instant::now()));
        }
        Ok(response)
    }

    /// An HTTP/1.1 connection to `addr` ready for a request, if one is kept. Closed ones are
    /// dropped; busy ones (a response body still streaming) stay for later.
    fn take_h1(&self, addr: SocketAddrV4) -> Option<http1::SendRequest<Body>> {
        let mut idle = lock(&self.h1);
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        // A connection still streaming a response body was given back before it ended: its
        // wait starts when it is ready again, so only ready ones expire.
        list.retain(|(s, since)| {
            let expired = s.is_ready() && now.duration_since(*since) > IDLE_KEEP;
            !s.is_closed() && !expired
        });
        let ready = list.iter().position(|(s, _)| s.is_ready());
        let taken = ready.map(|i| list.swap_remove(i).0);
        if list.is_empty() {
            idle.remove(&addr);
        }
        taken
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Empty};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::Barrier;

    use super::*;

    /// An HTTP/1.1 server that answers once `in_flight` requests have arrived together.
    async fn server(in_flight: usize) -> SocketAddrV4 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let std::net::SocketAddr::V4(addr) = listener.local_addr().expect("addr") else {
            unreachable!("bound to IPv4");
        };
        let together = Arc::new(Barrier::new(in_flight));
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let together = together.clone();
                let service = hyper::service::service_fn(move |_req| {
                    let together = together.clone();
                    async move {
                        together.wait().await;
                        Ok::<_, std::convert::Infallible>(Response::new(
                            Empty::<bytes::Bytes>::new(),
                        ))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn), service),
                );
            }
        });
        addr
    }

    /// Sends `n` requests at once to `addr` through `upstreams`; `connects` counts the
    /// connections opened.
    async fn burst(
        upstreams: &Arc<Upstreams>,
        addr: SocketAddrV4,
        n: usize,
        connects: &Arc<AtomicUsize>,
    ) {
        let mut sent = Vec::new();
        for _ in 0..n {
            let (upstreams, connects) = (upstreams.clone(), connects.clone());
            sent.push(tokio::spawn(async move {
                let request = Request::get("/")
                    .body(Empty::new().map_err(|never| match never {}).boxed())
                    .expect("request");
                let response = upstreams
                    .send(addr, Wire::Http1, addr, request, || async move {
                        connects.fetch_add(1, Ordering::Relaxed);
                        let io: BoxIo = Box::new(TcpStream::connect(addr).await?);
                        Ok::<_, std::io::Error>(io)
                    })
                    .await
                    .expect("response");
                response.into_body().collect().await.expect("body");
            }));
        }
        for s in sent {
            s.await.expect("request task");
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_client_with_many_requests_in_flight_keeps_its_connections() {
        // More at once than a small pool would keep: each must have its own connection.
        const IN_FLIGHT: usize = 64;
        let addr = server(IN_FLIGHT).await;
        let upstreams = Arc::new(Upstreams::new());
        let connects = Arc::new(AtomicUsize::new(0));
        burst(&upstreams, addr, IN_FLIGHT, &connects).await;
        assert_eq!(connects.load(Ordering::Relaxed), IN_FLIGHT);
        // Once the bodies ended the connections are ready again.
        tokio::time::sleep(Duration::from_millis(50)).await;
        burst(&upstreams, addr, IN_FLIGHT, &connects).await;
        assert_eq!(
            connects.load(Ordering::Relaxed),
            IN_FLIGHT,
            "the second burst opened connections again"
        );
    }
}
