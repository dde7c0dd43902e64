//! The gRPC demo server: `mesh.demo.v1.Echo` (see `proto/demo.proto`) over HTTP/2 without
//! TLS, with prior knowledge, as gRPC clients speak it inside a mesh.
//!
//! - `Say`: one reply naming the pod, echoing the message and the caller; a non-zero
//!   `fail_code` is answered with that status instead.
//! - `Count`: `n` replies, indexed from 0, `delay_ms` apart.
//! - `Sum`: the total and count of the numbers the client streams.
//! - `Chat`: one `Say` answer per message, in order, as each arrives.
//!
//! Every response ends with the trailer [`POD_TRAILER`] naming the server, whether it
//! succeeded or not, so a test can tell whether trailers made it through a proxy.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use http::{HeaderMap, HeaderValue};
use hyper::body::{Body, Frame, SizeHint};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, Streaming, metadata::MetadataMap};
use tracing::{info, warn};

use self::proto::{
    CountReply, CountRequest, Number, SayReply, SayRequest, Total,
    echo_server::{Echo, EchoServer},
};
use crate::http::{CALLER_HEADER, MAX_DELAY};

pub mod proto {
    //! The messages and the generated client and server of `mesh.demo.v1`.
    tonic::include_proto!("mesh.demo.v1");
}

/// The trailer every response carries, naming the server.
pub const POD_TRAILER: &str = "x-demo-pod";

/// The most replies one `Count` sends.
pub const MAX_COUNT: u32 = 100_000;

/// How long calls in flight get to finish once shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("read the bound address: {0}")]
    LocalAddr(#[source] std::io::Error),
    #[error(transparent)]
    Name(#[from] NameError),
}

/// A server name that cannot be sent as a trailer value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("name {0:?} must be non-empty visible ASCII, to be sent in the {POD_TRAILER} trailer")]
pub struct NameError(String);

/// Checks that `name` can name the server: it goes out in a trailer, so it must be a
/// non-empty header value of visible ASCII.
pub fn parse_name(name: &str) -> Result<HeaderValue, NameError> {
    let visible = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if !visible || name.starts_with(' ') || name.ends_with(' ') {
        return Err(NameError(name.to_owned()));
    }
    HeaderValue::from_str(name).map_err(|_| NameError(name.to_owned()))
}

// === impl GrpcServer ===

/// A bound, not yet serving, gRPC demo server.
pub struct GrpcServer {
    listener: TcpListener,
    name: Arc<str>,
    trailer: HeaderValue,
}

impl GrpcServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, name: &str) -> Result<GrpcServer, ServeError> {
        let trailer = parse_name(name)?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(GrpcServer {
            listener,
            name: name.into(),
            trailer,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(ServeError::LocalAddr)
    }

    /// Serves until `shutdown` completes, then stops accepting and lets calls in flight
    /// finish for up to [`DRAIN`].
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let trailer = self.trailer;
        let incoming = tonic::transport::server::TcpIncoming::from(self.listener)
            .with_nodelay(Some(true))
            .then(|accepted| async move {
                if let Err(e) = &accepted {
                    // Out of descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                accepted
            });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(
                move |response: http::Response<tonic::body::Body>| {
                    with_pod_trailer(response, &trailer)
                },
            ))
            .add_service(EchoServer::new(EchoService { name: self.name }))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stopped.await;
            });
        let mut serving = std::pin::pin!(serving);
        let mut shutdown = std::pin::pin!(shutdown);
        let ended = tokio::select! {
            ended = &mut serving => ended,
            () = &mut shutdown => {
                info!("shutting down");
                let _ = stop.send(());
                match tokio::time::timeout(DRAIN, &mut serving).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        warn!("calls still running after {DRAIN:?}; leaving them");
                        Ok(())
                    }
                }
            }
        };
        if let Err(e) = ended {
            warn!(error = %e, "grpc server stopped");
        }
    }
}

// === impl EchoService ===

/// The `Echo` methods, answering as `name`.
struct EchoService {
    name: Arc<str>,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, request: Request<SayRequest>) -> Result<Response<SayReply>, Status> {
        let caller = caller(request.metadata());
        answer(&self.name, &caller, request.into_inner())
            .await
            .map(Response::new)
    }

    type CountStream = BoxStream<'static, Result<CountReply, Status>>;

    async fn count(
        &self,
        request: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let CountRequest { n, delay_ms } = request.into_inner();
        if n > MAX_COUNT {
            return Err(Status::invalid_argument(format!(
                "n is {n}; at most {MAX_COUNT} replies are sent"
            )));
        }
        let pod = self.name.to_string();
        let delay = delay(delay_ms);
        let replies = futures::stream::iter(0..n).then(move |index| {
            let pod = pod.clone();
            async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(CountReply { pod, index })
            }
        });
        Ok(Response::new(replies.boxed()))
    }

    async fn sum(&self, request: Request<Streaming<Number>>) -> Result<Response<Total>, Status> {
        let mut numbers = request.into_inner();
        let (mut total, mut count) = (0i64, 0u64);
        while let Some(number) = numbers.message().await? {
            total = total
                .checked_add(number.value)
                .ok_or_else(|| Status::out_of_range("the sum overflows a 64-bit integer"))?;
            count += 1;
        }
        Ok(Response::new(Total {
            pod: self.name.to_string(),
            total,
            count,
        }))
    }

    type ChatStream = BoxStream<'static, Result<SayReply, Status>>;

    async fn chat(
        &self,
        request: Request<Streaming<SayRequest>>,
    ) -> Result<Response<Self::ChatStream>, Status> {
        let caller: Arc<str> = caller(request.metadata()).into();
        let pod = self.name.clone();
        let replies = request
            .into_inner()
            .then(move |asked| {
                let (pod, caller) = (pod.clone(), caller.clone());
                async move { answer(&pod, &caller, asked?).await }
            })
            // The first failure is the call's status; nothing follows it.
            .scan(false, |failed, reply| {
                let next = (!*failed).then(|| {
                    *failed = reply.is_err();
                    reply
                });
                futures::future::ready(next)
            });
        Ok(Response::new(replies.boxed()))
    }
}

/// Answers one `Say`: waits as asked, then replies or fails with the asked status.
async fn answer(pod: &str, caller: &str, asked: SayRequest) -> Result<SayReply, Status> {
    let code = asked_code(asked.fail_code)?;
    let delay = delay(asked.delay_ms);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if code != Code::Ok {
        return Err(Status::new(
            code,
            format!("{pod} answers {code:?} as asked"),
        ));
    }
    Ok(SayReply {
        pod: pod.to_owned(),
        message: asked.message,
        caller: caller.to_owned(),
    })
}

/// The status a `fail_code` asks for: 0 (OK) through 16 (UNAUTHENTICATED).
fn asked_code(fail_code: i32) -> Result<Code, Status> {
    match fail_code {
        0..=16 => Ok(Code::from(fail_code)),
        _ => Err(Status::invalid_argument(format!(
            "fail_code is {fail_code}; gRPC status codes are 0..=16"
        ))),
    }
}

fn delay(ms: u32) -> Duration {
    Duration::from_millis(u64::from(ms)).min(MAX_DELAY)
}

/// The caller's identity as a mesh proxy passes it on, or empty.
fn caller(metadata: &MetadataMap) -> String {
    metadata
        .get(CALLER_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default()
}

// === impl PodTrailer ===

/// Adds [`POD_TRAILER`] to a response: to its trailers, or to its headers when the response
/// is trailers-only (a status with no messages, where the headers are the trailers).
fn with_pod_trailer(
    mut response: http::Response<tonic::body::Body>,
    pod: &HeaderValue,
) -> http::Response<PodTrailer<tonic::body::Body>> {
    let trailers_only = response.headers().contains_key("grpc-status");
    if trailers_only {
        response.headers_mut().insert(POD_TRAILER, pod.clone());
    }
    response.map(|inner| PodTrailer {
        inner,
        pod: (!trailers_only).then(|| pod.clone()),
        ended: false,
    })
}

/// A response body whose trailers get [`POD_TRAILER`]; one is sent if the body ends
/// without trailers.
struct PodTrailer<B> {
    inner: B,
    /// Still to be added; `None` once sent (or when the headers carry it).
    pod: Option<HeaderValue>,
    ended: bool,
}

impl<B> Body for PodTrailer<B>
where
    B: Body + Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => match frame.into_trailers() {
                Ok(mut trailers) => {
                    if let Some(pod) = this.pod.take() {
                        trailers.insert(POD_TRAILER, pod);
                    }
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            None => {
                this.ended = true;
                Poll::Ready(this.pod.take().map(|pod| {
                    let mut trailers = HeaderMap::new();
                    trailers.insert(POD_TRAILER, pod);
                    Ok(Frame::trailers(trailers))
                }))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || (self.pod.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_fit_in_a_trailer() {
        assert!(parse_name("web-1").is_ok());
        assert!(parse_name("web 1").is_ok());
        for bad in ["", " web", "web\n", "wéb", "a\tb"] {
            assert!(parse_name(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn fail_codes_are_grpc_status_codes() {
        assert_eq!(asked_code(0).expect("ok"), Code::Ok);
        assert_eq!(asked_code(7).expect("7"), Code::PermissionDenied);
        assert_eq!(asked_code(16).expect("16"), Code::Unauthenticated);
        for bad in [-1, 17, 200] {
            let err = asked_code(bad).expect_err("out of range");
            assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn delays_are_capped() {
        assert_eq!(delay(0), Duration::ZERO);
        assert_eq!(delay(250), Duration::from_millis(250));
        assert_eq!(delay(u32::MAX), MAX_DELAY);
    }

    #[tokio::test]
    async fn the_pod_goes_into_the_trailers_or_the_headers() {
        use http_body_util::BodyExt;

        let pod = HeaderValue::from_static("web-1");
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let body = http_body_util::Full::new(bytes::Bytes::from_static(b"data"))
            .with_trailers(std::future::ready(Some(Ok(trailers))))
            .map_err(|never: std::convert::Infallible| Status::internal(never.to_string()));
        let response = with_pod_trailer(http::Response::new(tonic::body::Body::new(body)), &pod);
        assert!(!response.headers().contains_key(POD_TRAILER));
        let collected = response.into_body().collect().await.expect("body");
        let trailers = collected.trailers().expect("trailers").clone();
        assert_eq!(trailers[POD_TRAILER], "web-1");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(&collected.to_bytes()[..], b"data");

        // Trailers-only: the headers carry the status, and the pod with it.
        let mut response = http::Response::new(tonic::body::Body::empty());
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("7"));
        let response = with_pod_trailer(response, &pod);
        assert_eq!(response.headers()[POD_TRAILER], "web-1");
        let collected = response.into_body().collect().await.expect("body");
        assert!(collected.trailers().is_none());

        // A body that ends without trailers gets them.
        let response = with_pod_trailer(http::Response::new(tonic::body::Body::empty()), &pod);
        let collected = response.into_body().collect().await.expect("body");
        assert_eq!(
            collected.trailers().expect("trailers")[POD_TRAILER],
            "web-1"
        );
    }
}
