//! The proxy's end of an application's connection on the outbound listener.
//!
//! With sk_msg on, the kernel hands the application's first bytes straight to this socket's
//! receive side and the rest, past the budget, by TCP (see the datapath's `mesh_skmsg`). For
//! a while both may hold bytes, and one read returns only the handed-over ones, short of the
//! buffer. Tokio takes a short read on a socket to mean it is drained and waits for the next
//! readiness event; the bytes already waiting in the TCP queue bring none, so the connection
//! would stall until the application sent more (a request/response client never does).
//! [`AppSocket`] reads until the socket says it would block before it waits.

use std::io;
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// An accepted application connection, read until it would block (see the module).
#[derive(Debug)]
pub struct AppSocket(TcpStream);

impl AppSocket {
    pub fn new(conn: TcpStream) -> AppSocket {
        AppSocket(conn)
    }
}

impl Deref for AppSocket {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for AppSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let conn = &self.get_mut().0;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(conn.poll_read_ready(cx))?;
            // Unlike `poll_read`, `try_io` keeps the readiness after a short read: only "would
            // block" clears it.
            let read = conn.try_io(Interest::READABLE, || {
                // SAFETY: `recv` writes into the slice and reports how many bytes it wrote;
                // only those are marked initialized below.
                socket2::SockRef::from(conn).recv(unsafe { buf.unfilled_mut() })
            });
            match read {
                Ok(n) => {
                    // SAFETY: the kernel initialized the first `n` bytes of the unfilled part.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for AppSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn reads_what_arrives_in_pieces_and_sees_the_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            for piece in [&b"abc"[..], b"defgh", b"i"] {
                c.write_all(piece).await.expect("write");
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        });
        let (conn, _) = listener.accept().await.expect("accept");
        let mut conn = AppSocket::new(conn);
        let mut got = Vec::new();
        conn.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"abcdefghi");
        client.await.expect("client");
    }
}
