//! One CONNECT stream as bytes: the two HTTP/2 halves, the client's [`HboneStream`], and the
//! server's copy between a stream and the application connection.
//!
//! Half-close maps to END_STREAM both ways: shutting down the write side sends an empty DATA
//! frame with END_STREAM, and a received END_STREAM reads as EOF. Receive capacity is released
//! as the reader consumes bytes, so a slow reader slows the sender down to the window.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::poll_fn;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::Stats;
use super::pool::Lease;

/// Most bytes written into the tunnel by one `poll_write`, or read from the application in
/// one go by the server's copy.
const CHUNK: usize = 256 * 1024;

/// An HTTP/2 error as an I/O error: resets read as a reset connection.
pub(super) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    match e.reason() {
        Some(Reason::NO_ERROR | Reason::CANCEL) if e.is_reset() => {
            io::Error::new(io::ErrorKind::ConnectionReset, e)
        }
        Some(_) => io::Error::new(io::ErrorKind::ConnectionAborted, e),
        None => io::Error::other(e),
    }
}

// === impl SendHalf ===

/// The sending half of a stream: DATA frames out, END_STREAM on shutdown.
pub(super) struct SendHalf {
    inner: SendStream<Bytes>,
    /// Staging for written bytes: each frame is split off it, and its memory is reclaimed
    /// once h2 has written the frames out and dropped them.
    buf: BytesMut,
    closed: bool,
}

impl SendHalf {
    pub(super) fn new(inner: SendStream<Bytes>) -> Self {
        SendHalf {
            inner,
            buf: BytesMut::new(),
            closed: false,
        }
    }

    /// Waits until the stream may send at least one byte, asking for `want`.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        loop {
            let capacity = self.inner.capacity();
            if capacity > 0 {
                return Poll::Ready(Ok(capacity));
            }
            self.inner.reserve_capacity(want);
            match ready!(self.inner.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    /// Sends `data` as DATA frames, waiting for flow-control capacity.
    async fn send_all(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let capacity = poll_fn(|cx| self.poll_capacity(cx, data.len())).await?;
            let frame = data.split_to(capacity.min(data.len()));
            self.inner.send_data(frame, false).map_err(h2_to_io)?;
        }
        Ok(())
    }

    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = buf.len().min(CHUNK);
        let capacity = ready!(self.poll_capacity(cx, want))?;
        let n = want.min(capacity);
        // Only what this write needs: a tunnel carrying small messages keeps a small buffer.
        self.buf.reserve(n);
        self.buf.extend_from_slice(&buf[..n]);
        let frame = self.buf.split().freeze();
        self.inner.send_data(frame, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    /// Sends END_STREAM, once.
    fn shutdown(&mut self) -> io::Result<()> {
        if std::mem::replace(&mut self.closed, true) {
            return Ok(());
        }
        self.inner.send_data(Bytes::new(), true).map_err(h2_to_io)
    }

    /// Abandons the stream: the peer sees RST_STREAM(CANCEL).
    pub(super) fn reset(&mut self) {
        self.closed = true;
        self.inner.send_reset(Reason::CANCEL);
    }
}

// === impl RecvHalf ===

/// The receiving half of a stream: DATA frames in, EOF at END_STREAM.
pub(super) struct RecvHalf {
    inner: RecvStream,
    /// The rest of the last frame, not yet read.
    chunk: Bytes,
    eof: bool,
}

impl RecvHalf {
    pub(super) fn new(inner: RecvStream) -> Self {
        RecvHalf {
            inner,
            chunk: Bytes::new(),
            eof: false,
        }
    }

    /// The next frame's bytes, `None` at END_STREAM. The caller releases their capacity with
    /// [`RecvHalf::release`] once it consumed them.
    async fn next_frame(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            match self.inner.data().await {
                Some(Ok(data)) if data.is_empty() => continue,
                Some(Ok(data)) => return Ok(Some(data)),
                Some(Err(e)) => return Err(h2_to_io(e)),
                None => return Ok(None),
            }
        }
    }

    fn release(&mut self, n: usize) {
        // Fails only once the stream is gone, when its window no longer matters.
        let _ = self.inner.flow_control().release_capacity(n);
    }

    fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<usize>> {
        loop {
            if !self.chunk.is_empty() {
                let n = self.chunk.len().min(buf.remaining());
                buf.put_slice(&self.chunk[..n]);
                self.chunk.advance(n);
                self.release(n);
                return Poll::Ready(Ok(n));
            }
            if self.eof {
                return Poll::Ready(Ok(0));
            }
            match ready!(self.inner.poll_data(cx)) {
                Some(Ok(data)) => self.chunk = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.eof = true,
            }
        }
    }
}

// === impl HboneStream ===

/// An open HBONE tunnel: the bytes of the application connection, both ways.
///
/// `shutdown` sends END_STREAM (the far application reads EOF) and reading goes on until the
/// far side ends too. Dropping the stream before both sides ended resets it.
pub struct HboneStream {
    io: TunnelStream,
    /// Gives the stream's place back to the pool on drop.
    _lease: Lease,
}

impl HboneStream {
    pub(super) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        stats: Arc<Stats>,
        lease: Lease,
    ) -> Self {
        HboneStream {
            io: TunnelStream::new(SendHalf::new(send), RecvHalf::new(recv), stats),
            _lease: lease,
        }
    }
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.io.send.inner.stream_id().as_u32())
            .field("write_closed", &self.io.send.closed)
            .field("read_eof", &self.io.recv.eof)
            .finish()
    }
}

impl Drop for HboneStream {
    fn drop(&mut self) {
        Stats::inc(&self.io.stats.streams_closed);
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// === TunnelStream ===

/// One CONNECT stream as bytes, at either end: the client's [`HboneStream`] is one, and a
/// handler that serves an accepted stream itself gets one (see
/// [`super::server::Carry::Serve`]). `shutdown` sends END_STREAM; dropping it before both
/// sides ended resets the stream.
pub struct TunnelStream {
    send: SendHalf,
    recv: RecvHalf,
    stats: Arc<Stats>,
}

impl TunnelStream {
    pub(super) fn new(send: SendHalf, recv: RecvHalf, stats: Arc<Stats>) -> Self {
        TunnelStream { send, recv, stats }
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("stream_id", &self.send.inner.stream_id().as_u32())
            .finish()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = ready!(this.recv.poll_read(cx, buf))?;
        Stats::add(&this.stats.bytes_received, n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(this.send.poll_write(cx, buf))?;
        Stats::add(&this.stats.bytes_sent, n);
        Poll::Ready(Ok(n))
    }

    /// h2 writes buffered frames out as the connection task runs; there is nothing to wait
    /// for here.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().send.shutdown())
    }
}

// === splice ===

/// Copies between a server-side stream and the application connection until both directions
/// ended, each direction half-closing on its own. Ends with `TimedOut` when no byte moved
/// either way for `idle`, and with `ConnectionAborted` when `stop` resolves (the handler cut
/// the connection). On error, the stream is reset.
pub(super) async fn splice<A>(
    mut send: SendHalf,
    mut recv: RecvHalf,
    app: A,
    idle: Duration,
    stop: impl Future<Output = ()>,
    stats: &Stats,
) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Send + Unpin,
{
    let activity = AtomicU64::new(0);
    let (mut app_read, mut app_write) = tokio::io::split(app);

    let inbound = async {
        // Frames go to the application as they came, without a copy.
        while let Some(data) = recv.next_frame().await? {
            app_write.write_all(&data).await?;
            recv.release(data.len());
            Stats::add(&stats.bytes_received, data.len());
            activity.fetch_add(1, Ordering::Relaxed);
        }
        app_write.shutdown().await
    };
    let outbound = async {
        // Grows like the proxy's copy buffers: small for small messages, up to CHUNK for
        // a bulk stream.
        let mut buf = BytesMut::new();
        let mut want = crate::copy::MIN_BUF;
        loop {
            buf.reserve(want);
            let n = app_read.read_buf(&mut buf).await?;
            if n == 0 {
                return send.shutdown();
            }
            if n >= want {
                want = (want * 2).min(CHUNK);
            }
            send.send_all(buf.split().freeze()).await?;
            Stats::add(&stats.bytes_sent, n);
            activity.fetch_add(1, Ordering::Relaxed);
        }
    };
    let watchdog = async {
        loop {
            let before = activity.load(Ordering::Relaxed);
            tokio::time::sleep(idle).await;
            if activity.load(Ordering::Relaxed) == before {
                return;
            }
        }
    };

    let copied = tokio::select! {
        r = futures::future::try_join(inbound, outbound) => r.map(|_| ()),
        () = watchdog => Err(io::Error::new(io::ErrorKind::TimedOut, "idle")),
        () = stop => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "cut")),
    };
    if copied.is_err() {
        send.reset();
    }
    copied
}
