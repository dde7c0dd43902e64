//! The TCP demo server: answers each line `<line>` with `<name> <line>\n`.
//!
//! A client that half-closes still gets every reply; the server half-closes its own side
//! once it has answered the last line. A final line without a newline is answered too.
//! Lines longer than [`MAX_LINE`] are answered in pieces of that size.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, TcpStream},
    task::JoinSet,
};
use tracing::{Instrument, debug, info, info_span, warn};

/// The longest line answered in one piece.
pub const MAX_LINE: usize = 64 * 1024;

/// How long open connections get to finish once shutdown starts.
pub const DRAIN: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("read the bound address: {0}")]
    LocalAddr(#[source] io::Error),
}

/// A bound, not yet serving, line echo server.
pub struct EchoServer {
    listener: TcpListener,
    name: Arc<str>,
}

impl EchoServer {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr, name: &str) -> Result<EchoServer, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        Ok(EchoServer {
            listener,
            name: name.into(),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, ServeError> {
        self.listener.local_addr().map_err(ServeError::LocalAddr)
    }

    /// Serves until `shutdown` completes, then stops accepting and gives open connections up
    /// to [`DRAIN`] before closing them.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let mut conns = JoinSet::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let name = self.name.clone();
                        conns.spawn(
                            async move {
                                match echo(stream, &name).await {
                                    Ok(lines) => debug!(lines, "connection done"),
                                    Err(e) => debug!(error = %e, "connection ended"),
                                }
                            }
                            .instrument(info_span!("conn", %peer)),
                        );
                    }
                    Err(e) => {
                        warn!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                // Reap finished connections as they go.
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                () = &mut shutdown => break,
            }
        }
        info!(open = conns.len(), "shutting down");
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(DRAIN, drain).await.is_err() {
            warn!(
                open = conns.len(),
                "closing connections still open after {DRAIN:?}"
            );
            conns.shutdown().await;
        }
    }
}

/// Answers lines until the peer's EOF, then half-closes. Returns the lines answered.
async fn echo(stream: TcpStream, name: &str) -> io::Result<u64> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let mut line = Vec::with_capacity(256);
    let mut reply = Vec::with_capacity(256);
    let mut answered = 0u64;
    loop {
        line.clear();
        let n = (&mut read)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            break;
        }
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        reply.clear();
        reply.extend_from_slice(name.as_bytes());
        reply.push(b' ');
        reply.extend_from_slice(content);
        reply.push(b'\n');
        write.write_all(&reply).await?;
        answered += 1;
    }
    write.shutdown().await?;
    Ok(answered)
}
