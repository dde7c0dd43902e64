//! Requests that arrive as streams of an HBONE connection ([`crate::hbone::requests`]), not
//! nested in a CONNECT tunnel.
//!
//! For each HBONE connection and application address, the destination keeps what an admitted
//! tunnel would have had: the admission of the caller on that port (decided as for a tunnel,
//! [`PodInbound::admit_requests`]), one connection in the telemetry (`reporter="destination"`,
//! its bytes those of the requests' and responses' bodies), and the pod's [`InboundHttp`]
//! with its own connections to the application. Each request is then authorized on its own,
//! exactly as on a tunnel. When a configuration change no longer allows the caller on the
//! port ([`crate::revocation`]), or the drain's grace ends, that connection is cut: requests
//! in flight end (one not yet answered gets 403, or 503 for the drain; a body still streaming
//! is reset), and the next request is decided afresh.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use mesh_core::SpiffeId;

use super::{Caller, InboundHttp, PodInbound, Rejection};
use crate::hbone::requests::{RecvBody, RequestHandler, ResponseBody};
use crate::l7::{BoxError, grpc_status, is_grpc, refusal};
use crate::telemetry::{Activity, ConnGuard, Ended};

/// The request streams of one HBONE connection to a pod.
pub(super) struct PodRequests {
    inbound: PodInbound,
    peer: SpiffeId,
    admitted: Mutex<HashMap<SocketAddr, Arc<Session>>>,
}

/// The caller admitted on one application address.
struct Session {
    http: InboundHttp,
    activity: Activity,
    /// Recorded closed when the HBONE connection ends, or when the session was cut and its
    /// last request ended.
    _guard: ConnGuard,
    /// Ends the task that takes the session out of the table when it is cut.
    _gone: tokio::sync::oneshot::Sender<()>,
}

impl PodRequests {
    pub(super) fn new(inbound: PodInbound, peer: SpiffeId) -> PodRequests {
        PodRequests {
            inbound,
            peer,
            admitted: Mutex::default(),
        }
    }

    /// The caller's session on `target`: the one in force, or a new admission when there is
    /// none or it was cut. A cut session leaves the table at once, and its connection is
    /// recorded closed once its last request ended.
    fn session(self: &Arc<Self>, target: SocketAddr) -> Result<Arc<Session>, Rejection> {
        let mut admitted = self.admitted.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(session) = admitted.get(&target)
            && !session.activity.is_cut()
        {
            return Ok(session.clone());
        }
        admitted.remove(&target);
        let (http, guard) = self
            .inbound
            .admit_requests(Caller::hbone(self.peer.clone()), target)?;
        let (gone_tx, gone) = tokio::sync::oneshot::channel::<()>();
        let session = Arc::new(Session {
            http,
            activity: guard.activity(),
            _guard: guard,
            _gone: gone_tx,
        });
        admitted.insert(target, session.clone());
        let requests = Arc::downgrade(self);
        let watched = Arc::downgrade(&session);
        let activity = session.activity.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = activity.cut() => {}
                _ = gone => return,
            }
            if let Some(requests) = requests.upgrade() {
                let mut admitted = requests
                    .admitted
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if admitted
                    .get(&target)
                    .is_some_and(|s| std::ptr::eq(Arc::as_ptr(s), watched.as_ptr()))
                {
                    admitted.remove(&target);
                }
            }
        });
        Ok(session)
    }
}

impl RequestHandler for PodRequests {
    fn handle(
        self: Arc<Self>,
        target: SocketAddr,
        request: Request<RecvBody>,
    ) -> BoxFuture<'static, Response<ResponseBody>> {
        Box::pin(async move {
            let grpc = is_grpc(request.headers());
            let expose = self.inbound.http.expose_refusal_reasons;
            let session = match self.session(target) {
                Ok(session) => session,
                Err(rejection) => {
                    let status = StatusCode::from_u16(rejection.status)
                        .unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    let code = if status == StatusCode::FORBIDDEN {
                        grpc_status::PERMISSION_DENIED
                    } else {
                        grpc_status::UNAVAILABLE
                    };
                    return refusal(grpc, status, code, &rejection.reason, expose);
                }
            };
            let activity = session.activity.clone();
            let request = request.map(|body| Watched::new(body, activity.clone(), true));
            let response = tokio::select! {
                response = session.http.handle(request) => response,
                ended = activity.cut() => {
                    let (status, code, detail) = match ended {
                        Ended::Revoked => (
                            StatusCode::FORBIDDEN,
                            grpc_status::PERMISSION_DENIED,
                            activity.revoked().unwrap_or("no longer allowed").to_string(),
                        ),
                        _ => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            grpc_status::UNAVAILABLE,
                            "the destination's proxy is shutting down".to_string(),
                        ),
                    };
                    return refusal(grpc, status, code, &detail, expose);
                }
            };
            response.map(|body| Watched::new(body, activity, false).boxed())
        })
    }
}

/// A body whose bytes count on its session's connection, and which fails once the session
/// is cut.
struct Watched<B> {
    inner: B,
    activity: Activity,
    /// The body goes from the caller to the application (else the other way).
    to_dst: bool,
    cut: Pin<Box<dyn Future<Output = Ended> + Send + Sync>>,
}

impl<B> Watched<B> {
    fn new(inner: B, activity: Activity, to_dst: bool) -> Watched<B> {
        let watch = activity.clone();
        Watched {
            inner,
            activity,
            to_dst,
            cut: Box::pin(async move { watch.cut().await }),
        }
    }
}

impl<B> Body for Watched<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.cut.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err("the connection was cut".into())));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.activity.count(this.to_dst, data.len());
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
