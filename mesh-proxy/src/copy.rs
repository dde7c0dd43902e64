//! The bidirectional copy under every proxied connection, with buffers that grow with the
//! traffic.
//!
//! Each direction starts with a [`MIN_BUF`] buffer and doubles it, up to [`MAX_BUF`], each time
//! one read fills it: a bulk transfer reaches large reads (one syscall pair per 256 KiB)
//! after a few reads, while the many connections that only exchange small messages, or sit
//! idle, keep 16 KiB per direction. A buffer is allocated on the connection's first byte and
//! reused for its whole life; there is no allocation per chunk.
//!
//! Each direction is shut down on its own when its reader reaches EOF (half-close both ways),
//! and the copy ends when both have.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::telemetry::{Activity, Ended, Metered, ResponseFlag};

/// First buffer of a direction.
pub const MIN_BUF: usize = 16 * 1024;
/// Largest buffer of a direction.
pub const MAX_BUF: usize = 256 * 1024;

/// One direction's state.
#[derive(Debug, Default)]
struct Pipe {
    buf: Vec<u8>,
    /// Bytes `buf[start..end]` are read and not yet written.
    start: usize,
    end: usize,
    /// The reader reached EOF.
    eof: bool,
    /// Written since the last flush.
    unflushed: bool,
    /// The writer was shut down: this direction is done.
    done: bool,
    /// The last read filled the buffer: double it once it is written out.
    grow: bool,
    total: u64,
}

impl Pipe {
    /// Moves bytes from `r` to `w` until `r` is pending, or EOF was passed on with a shutdown.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(self.total));
            }
            // Write out what was read.
            while self.start < self.end {
                let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.total += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                ready!(w.as_mut().poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if std::mem::take(&mut self.grow) {
                // Empty now: the larger buffer replaces it without moving bytes.
                self.buf = vec![0; (self.buf.len() * 2).min(MAX_BUF)];
            }
            // Read more.
            if self.buf.is_empty() {
                self.buf = vec![0; MIN_BUF];
            }
            let mut rb = ReadBuf::new(&mut self.buf);
            match r.as_mut().poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        self.eof = true;
                    } else {
                        self.start = 0;
                        self.end = n;
                        // The reader had at least a buffer's worth: a bulk stream.
                        self.grow = n == self.buf.len() && n < MAX_BUF;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    // Nothing to read for now: make sure what was written is on its way.
                    if self.unflushed {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.unflushed = false;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Copies `a` to `b` and `b` to `a` until both directions reached EOF, shutting each writer
/// down after its reader's EOF. Returns the bytes copied from `a` to `b` and from `b` to `a`.
pub async fn copy_both<A, B>(a: &mut A, b: &mut B) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a_to_b = Pipe::default();
    let mut b_to_a = Pipe::default();
    poll_fn(|cx| {
        let forward = a_to_b.poll_copy(cx, Pin::new(&mut *a), Pin::new(&mut *b))?;
        let back = b_to_a.poll_copy(cx, Pin::new(&mut *b), Pin::new(&mut *a))?;
        match (forward, back) {
            (Poll::Ready(sent), Poll::Ready(received)) => Poll::Ready(Ok((sent, received))),
            _ => Poll::Pending,
        }
    })
    .await
}

// === The relay: the copy with its idle timeout, drain and revocation ===

/// Why [`relay`] ended before both directions did.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("copy: {0}")]
    Io(#[source] std::io::Error),
    #[error("no byte either way for {0:?}: closed")]
    Idle(Duration),
    #[error("cut at the end of the shutdown grace period")]
    Drained,
    /// The destination's policy no longer allows the connection; the cause.
    #[error("closed: {0}")]
    Revoked(String),
}

impl RelayError {
    /// How a connection's watchdog ended it; `revoked` is the policy's cause, if it gave one.
    pub fn ended(ended: Ended, revoked: Option<&str>) -> RelayError {
        match ended {
            Ended::Idle(after) => RelayError::Idle(after),
            Ended::Cut => RelayError::Drained,
            Ended::Revoked => RelayError::Revoked(
                revoked
                    .unwrap_or("the policy no longer allows it")
                    .to_owned(),
            ),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            RelayError::Io(_) => "copy",
            RelayError::Idle(_) => "idle_timeout",
            RelayError::Drained => "drained",
            RelayError::Revoked(_) => crate::telemetry::POLICY_REVOKED,
        }
    }

    pub fn flag(&self) -> ResponseFlag {
        match self {
            RelayError::Io(_) => ResponseFlag::Io,
            RelayError::Idle(_) => ResponseFlag::IdleTimeout,
            RelayError::Drained => ResponseFlag::Drained,
            RelayError::Revoked(_) => ResponseFlag::Denied,
        }
    }
}

/// Copies both ways between `app` and `upstream` ([`copy_both`]: buffers grow
/// with the traffic) until both directions ended (each is shut down on its own when its reader
/// ends), the connection carried nothing for `idle`, or it was cut (by the drain, or by a
/// policy change that no longer allows it). Returns the bytes copied from `app` and to it; an
/// early end is recorded on the connection's guard.
pub async fn relay<S, U>(
    app: &mut Metered<S>,
    upstream: &mut U,
    idle: Duration,
) -> Result<(u64, u64), RelayError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    relay_watching(app, upstream, idle, None).await
}

/// [`relay`], also ended when `peer` (the accounting of the same connection at its other
/// end, when this agent carries both) is cut: a same-node connection the destination's
/// policy no longer allows closes on the caller's side too, denied with the same cause.
pub async fn relay_watching<S, U>(
    app: &mut Metered<S>,
    upstream: &mut U,
    idle: Duration,
    peer: Option<Activity>,
) -> Result<(u64, u64), RelayError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let activity = app.guard().activity();
    let peer_cut = async {
        match &peer {
            Some(p) => (p.cut().await, p.revoked().map(str::to_owned)),
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        copied = copy_both(app, upstream) => {
            copied.map_err(RelayError::Io)
        }
        ended = activity.watchdog(idle) => Err(RelayError::ended(ended, activity.revoked())),
        (ended, cause) = peer_cut => Err(match ended {
            Ended::Revoked => RelayError::Revoked(cause.unwrap_or_default()),
            Ended::Cut | Ended::Idle(_) => RelayError::Drained,
        }),
    };
    let guard = app.guard_mut();
    match &result {
        // This connection's own revocation is recorded from its cut.
        Err(RelayError::Revoked(_)) if activity.revoked().is_some() => guard.record_cut(),
        Err(e @ RelayError::Revoked(cause)) => guard.deny(e.kind(), cause),
        Err(e) => guard.fail(e.flag(), e.kind(), e),
        Ok(_) => {}
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn bytes_cross_both_ways_exactly_and_each_side_half_closes_on_its_own() {
        let (mut client, mut a) = duplex(64 * 1024);
        let (mut b, mut server) = duplex(64 * 1024);
        let copy = tokio::spawn(async move { copy_both(&mut a, &mut b).await });
        let up = pattern(3 * 1024 * 1024 + 7, 1);
        let down = pattern(1024 * 1024 + 3, 9);

        let (up2, down2) = (up.clone(), down.clone());
        let server_task = tokio::spawn(async move {
            // Read the whole request first: the client's EOF must arrive while the server
            // can still answer.
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("read request");
            assert_eq!(got, up2, "request bytes");
            server.write_all(&down2).await.expect("write reply");
            server.shutdown().await.expect("shutdown");
        });
        client.write_all(&up).await.expect("write request");
        client.shutdown().await.expect("half-close");
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.expect("read reply");
        assert_eq!(got, down, "reply bytes");
        server_task.await.expect("server");
        let (sent, received) = copy.await.expect("join").expect("copy");
        assert_eq!((sent, received), (up.len() as u64, down.len() as u64));
    }

    #[tokio::test]
    async fn the_server_may_finish_first_while_the_client_keeps_sending() {
        let (mut client, mut a) = duplex(8 * 1024);
        let (mut b, mut server) = duplex(8 * 1024);
        let copy = tokio::spawn(async move { copy_both(&mut a, &mut b).await });
        server.write_all(b"banner").await.expect("banner");
        server.shutdown().await.expect("server half-close");
        let mut banner = Vec::new();
        client
            .read_to_end(&mut banner)
            .await
            .expect("client reads to EOF");
        assert_eq!(banner, b"banner");
        // The other direction is still open.
        let payload = pattern(200_000, 4);
        let p2 = payload.clone();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("server reads");
            assert_eq!(got, p2);
        });
        client
            .write_all(&payload)
            .await
            .expect("client writes after EOF");
        client.shutdown().await.expect("client half-close");
        reader.await.expect("reader");
        assert_eq!(
            copy.await.expect("join").expect("copy"),
            (payload.len() as u64, 6)
        );
    }

    /// A reader that returns exactly what it is asked for until `len` bytes, counting.
    struct Source {
        left: usize,
    }

    impl AsyncRead for Source {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = buf.remaining().min(self.left);
            buf.put_slice(&vec![7u8; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    /// A reader with one small message, then nothing yet.
    struct Trickle {
        sent: bool,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.sent {
                return Poll::Pending;
            }
            self.sent = true;
            buf.put_slice(b"ping");
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_bulk_stream_grows_its_buffer_to_the_cap_and_a_small_one_stays_small() {
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);

        let mut bulk = Pipe::default();
        let mut source = Source { left: 8 * MAX_BUF };
        let mut sink = tokio::io::sink();
        let done = bulk.poll_copy(&mut cx, Pin::new(&mut source), Pin::new(&mut sink));
        assert!(matches!(done, Poll::Ready(Ok(n)) if n == 8 * MAX_BUF as u64));
        assert_eq!(bulk.buf.len(), MAX_BUF);

        let mut small = Pipe::default();
        let mut trickle = Trickle { sent: false };
        let pending = small.poll_copy(&mut cx, Pin::new(&mut trickle), Pin::new(&mut sink));
        assert!(pending.is_pending());
        assert_eq!((small.buf.len(), small.total), (MIN_BUF, 4));

        let idle = Pipe::default();
        assert_eq!(idle.buf.len(), 0, "no buffer before the first read");
    }
}
