//! gRPC deadlines: the `grpc-timeout` a client sets bounds the call at each proxy too.
//!
//! The header passes on unchanged (the application sees the client's deadline). A proxy
//! that has no response head from the application when the deadline passes answers
//! `DEADLINE_EXCEEDED` itself (trailers-only, as a gRPC intermediary does) and drops the
//! request, which cancels the application's stream (`RST_STREAM`). A response still streaming
//! when it passes ([`bounded`]) is ended with `grpc-status: 4` trailers, and the application's
//! stream is cancelled the same way. A call cancelled by its client (a reset stream, a closed
//! connection) is cancelled at the application at once: dropping the request or the
//! response's body resets the stream the proxy opened for it.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::HeaderValue;
use http_body_util::BodyExt;
use hyper::body::Frame;
use tokio::time::{Instant, Sleep};

use super::{Body, grpc_status, is_grpc};

/// The longest `grpc-timeout` value: eight digits (the gRPC over HTTP/2 specification).
const MAX_DIGITS: usize = 8;

/// The timeout a gRPC request's `grpc-timeout` sets, if it is a gRPC request with a valid one.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    if !is_grpc(headers) {
        return None;
    }
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// When a request's deadline passes, counted from `started`; `None` without one.
pub fn of_request(headers: &HeaderMap, started: Instant) -> Option<Instant> {
    grpc_timeout(headers).map(|t| started + t)
}

/// `body`, ended with `DEADLINE_EXCEEDED` trailers if it is still streaming at `deadline`.
pub fn bounded(body: Body, deadline: Instant) -> Body {
    Bounded {
        inner: Some(body),
        sleep: Box::pin(tokio::time::sleep_until(deadline)),
        ended: false,
    }
    .boxed()
}

struct Bounded {
    /// `None` once the deadline ended the body (dropping it cancels the upstream stream).
    inner: Option<Body>,
    sleep: Pin<Box<Sleep>>,
    /// The body ended on its own (trailers or end of stream): the deadline no longer applies.
    ended: bool,
}

impl hyper::body::Body for Bounded {
    type Data = Bytes;
    type Error = super::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, super::BoxError>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        if let Poll::Ready(frame) = Pin::new(inner).poll_frame(cx) {
            match &frame {
                None => this.ended = true,
                Some(Ok(f)) if f.is_trailers() => this.ended = true,
                _ => {}
            }
            return Poll::Ready(frame);
        }
        if this.ended || this.sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        this.inner = None;
        let mut trailers = HeaderMap::new();
        trailers.insert(
            "grpc-status",
            HeaderValue::from(grpc_status::DEADLINE_EXCEEDED),
        );
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("deadline exceeded"),
        );
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc(timeout: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/grpc"));
        h.insert(
            "grpc-timeout",
            HeaderValue::from_str(timeout).expect("value"),
        );
        h
    }

    #[test]
    fn grpc_timeouts_are_read_in_every_unit_and_invalid_ones_ignored() {
        assert_eq!(grpc_timeout(&grpc("2H")), Some(Duration::from_secs(7200)));
        assert_eq!(grpc_timeout(&grpc("3M")), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(&grpc("1S")), Some(Duration::from_secs(1)));
        assert_eq!(
            grpc_timeout(&grpc("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            grpc_timeout(&grpc("99999999u")),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(grpc_timeout(&grpc("5n")), Some(Duration::from_nanos(5)));
        for bad in ["", "S", "100", "123456789S", "1s", "-1S", "1.5S", "1 S"] {
            assert_eq!(grpc_timeout(&grpc(bad)), None, "{bad:?}");
        }
        let mut plain = grpc("1S");
        plain.remove("content-type");
        assert_eq!(
            grpc_timeout(&plain),
            None,
            "only gRPC requests have deadlines"
        );
    }
}
