//! The application-side stream that counts bytes as they flow, and the idle watchdog that
//! reads the time of the last byte it noted.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{ConnGuard, Cut, Flow, Live};

// === Idle watchdog ===

/// Watches one connection's last activity; see [`Activity::watchdog`].
#[derive(Clone)]
pub struct Activity(pub(super) Arc<Live>);

/// Why [`Activity::watchdog`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// No byte either way for this long.
    Idle(Duration),
    /// The drain grace ended ([`Telemetry::cut_all`]).
    ///
    /// [`Telemetry::cut_all`]: super::Telemetry::cut_all
    Cut,
    /// A policy change no longer allows the connection ([`Telemetry::revoke_where`]; the
    /// cause is [`Activity::revoked`]).
    ///
    /// [`Telemetry::revoke_where`]: super::Telemetry::revoke_where
    Revoked,
}

impl Activity {
    /// Resolves when the connection carried no byte either way for `idle`, or when it is cut.
    /// It sleeps until the earliest moment the connection could be idle, then looks at the
    /// time of the last byte again: one timer per idle period, none per read.
    pub async fn watchdog(&self, idle: Duration) -> Ended {
        let live = &self.0;
        loop {
            let cut = live.cut_notify.notified();
            tokio::pin!(cut);
            cut.as_mut().enable();
            if let Some(ended) = self.ended() {
                return ended;
            }
            let quiet = live.quiet_for();
            if quiet >= idle {
                return Ended::Idle(idle);
            }
            tokio::select! {
                _ = &mut cut => {}
                _ = tokio::time::sleep(idle - quiet) => {}
            }
        }
    }

    /// Resolves when the connection is cut (by the drain or a revocation), whatever its
    /// activity: for loops that keep their own idle timer.
    pub async fn cut(&self) -> Ended {
        let live = &self.0;
        loop {
            let cut = live.cut_notify.notified();
            tokio::pin!(cut);
            cut.as_mut().enable();
            if let Some(ended) = self.ended() {
                return ended;
            }
            cut.await;
        }
    }

    /// Whether the connection was cut (by the drain or a revocation).
    pub fn is_cut(&self) -> bool {
        self.0.cut.get().is_some()
    }

    /// Counts `n` bytes carried by something other than a [`Metered`] stream (a request
    /// stream's body), from the source to the destination when `to_dst`.
    pub fn count(&self, to_dst: bool, n: usize) {
        if n > 0 {
            self.0
                .add(if to_dst { Flow::ToDst } else { Flow::ToSrc }, n);
        }
    }

    /// Why a revoked connection was revoked.
    pub fn revoked(&self) -> Option<&str> {
        match self.0.cut.get() {
            Some(Cut::Revoked(detail)) => Some(detail),
            _ => None,
        }
    }

    fn ended(&self) -> Option<Ended> {
        self.0.cut.get().map(|cut| match cut {
            Cut::Drain => Ended::Cut,
            Cut::Revoked(_) => Ended::Revoked,
        })
    }
}

// === impl Metered ===

/// Which end of the connection a [`Metered`] stream faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The caller (outbound: the application's socket; plaintext inbound: the client's): what
    /// is read goes to the destination.
    Source,
    /// The callee (HBONE inbound: the application's socket): what is read goes to the source.
    Destination,
}

/// A stream whose bytes count on its connection's guard as they flow. Owns the guard: the
/// connection is recorded closed when the stream is dropped.
#[derive(Debug)]
pub struct Metered<S> {
    io: S,
    guard: ConnGuard,
    reads: Flow,
    writes: Flow,
}

impl<S> Metered<S> {
    pub fn new(io: S, guard: ConnGuard, side: Side) -> Metered<S> {
        let (reads, writes) = match side {
            Side::Source => (Flow::ToDst, Flow::ToSrc),
            Side::Destination => (Flow::ToSrc, Flow::ToDst),
        };
        Metered {
            io,
            guard,
            reads,
            writes,
        }
    }

    pub fn guard(&self) -> &ConnGuard {
        &self.guard
    }

    pub fn guard_mut(&mut self) -> &mut ConnGuard {
        &mut self.guard
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let n = buf.filled().len() - before;
        if n > 0 {
            this.guard.live.add(this.reads, n);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        if n > 0 {
            this.guard.live.add(this.writes, n);
        }
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        if n > 0 {
            this.guard.live.add(this.writes, n);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
