//! L7 requests as streams of an HBONE connection itself.
//!
//! Between two proxies that both speak it, a request on an L7 port travels as one stream of
//! the pooled mutual-TLS HTTP/2 connection: its own method, target, headers, body and
//! trailers, with the application's `ip:port` in [`TARGET_HEADER`], instead of HTTP nested
//! in a CONNECT tunnel. The destination's proxy decides on it and passes it on (the
//! connection's [`RequestHandler`]); the application's answer comes back as the stream's
//! response. Per request that saves an HTTP client codec on the source's side and a server
//! codec on the destination's, with their tasks and wake-ups.
//!
//! Both ends agree on it in the TLS handshake: the client offers ALPN [`ALPN_REQUESTS`] ahead
//! of `h2`, and a server that serves request streams picks it. A proxy that does not (an
//! agent not yet upgraded) picks `h2`, and its callers keep sending the CONNECT form; a
//! server refuses a request stream (405) on a connection that did not negotiate them.
//! [`PoolConfig::requests`](super::PoolConfig::requests) turns the offer off.
//!
//! Flow control is HTTP/2's both ways: a body is sent only as fast as the peer's window
//! opens ([`send_body`]), and a received body gives its window back as it is read
//! ([`RecvBody`]), so a slow reader slows its sender down.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::future::{BoxFuture, poll_fn};
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame};

use super::pool::Lease;

pub use crate::tls::ALPN_REQUESTS;

/// The request header naming the application's `ip:port` a request stream is for. The
/// destination's proxy removes it before the request goes on.
pub const TARGET_HEADER: &str = "x-mesh-target";

/// Any error a body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A response body as a [`RequestHandler`] returns it.
pub type ResponseBody = BoxBody<Bytes, BoxError>;

/// What the server does with the request streams of one connection, whose caller is known
/// (the handler is made per connection by
/// [`ConnectHandler::requests`](super::ConnectHandler::requests)).
pub trait RequestHandler: Send + Sync + 'static {
    /// Answers `request`, sent for the application at `target` (known to be a well-formed
    /// IPv4 `ip:port`; that it is the pod's is the handler's to check). The request has
    /// HTTP/2's form and no longer carries [`TARGET_HEADER`]. The future is dropped if the
    /// caller resets the stream first.
    fn handle(
        self: Arc<Self>,
        target: SocketAddr,
        request: Request<RecvBody>,
    ) -> BoxFuture<'static, Response<ResponseBody>>;
}

// === impl RecvBody ===

/// The DATA and trailers a stream receives, as an HTTP body. A frame's window is given back
/// to the sender as soon as the frame is taken.
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// On the client: the stream's place on its pooled connection, given back with the body.
    _lease: Option<Lease>,
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody")
            .field("data_done", &self.data_done)
            .finish_non_exhaustive()
    }
}

impl RecvBody {
    pub(super) fn new(stream: RecvStream, lease: Option<Lease>) -> RecvBody {
        RecvBody {
            stream,
            data_done: false,
            _lease: lease,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Fails only once the stream is gone, when its window no longer matters.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

// === Sending a body ===

/// Why a body was not sent whole.
#[derive(Debug, thiserror::Error)]
pub enum SendBodyError {
    #[error("the body failed: {0}")]
    Body(#[source] BoxError),
    #[error("HTTP/2: {0}")]
    Stream(#[from] h2::Error),
    #[error("the peer reset the stream ({0:?})")]
    Reset(Reason),
}

/// Sends `body` on `stream`, whose head went out without END_STREAM: DATA as the peer's
/// window allows, then its trailers or END_STREAM. Stops early when the peer resets the
/// stream.
pub(crate) async fn send_body<B>(
    body: B,
    stream: &mut SendStream<Bytes>,
) -> Result<(), SendBodyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = std::pin::pin!(body);
    loop {
        let frame = poll_fn(|cx| {
            if let Poll::Ready(reset) = stream.poll_reset(cx) {
                return Poll::Ready(Err(match reset {
                    Ok(reason) => SendBodyError::Reset(reason),
                    Err(e) => SendBodyError::Stream(e),
                }));
            }
            body.as_mut().poll_frame(cx).map(Ok)
        })
        .await?;
        let frame = match frame {
            None => {
                stream.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => return Err(SendBodyError::Body(e.into())),
            Some(Ok(frame)) => frame,
        };
        match frame.into_data() {
            Ok(data) => {
                let end = body.is_end_stream();
                send_data(stream, data, end).await?;
                if end {
                    return Ok(());
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.send_trailers(trailers)?;
                    return Ok(());
                }
            }
        }
    }
}

/// Sends `data` in as many DATA frames as the window asks for, the last with END_STREAM when
/// `end`.
async fn send_data(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), SendBodyError> {
    if data.is_empty() {
        if end {
            stream.send_data(data, true)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let capacity = poll_fn(|cx| {
            loop {
                let capacity = stream.capacity();
                if capacity > 0 {
                    return Poll::Ready(Ok(capacity));
                }
                match ready!(stream.poll_capacity(cx)) {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Poll::Ready(Err(SendBodyError::Stream(e))),
                    None => return Poll::Ready(Err(SendBodyError::Reset(Reason::CANCEL))),
                }
            }
        })
        .await?;
        let frame = data.split_to(capacity.min(data.len()));
        stream.send_data(frame, end && data.is_empty())?;
    }
    Ok(())
}
