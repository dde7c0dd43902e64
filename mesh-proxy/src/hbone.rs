//! HBONE: TCP connections tunnelled as HTTP/2 CONNECT streams over mutual TLS, between the
//! source pod's proxy and the destination pod's port 15008 (DESIGN.md sections 4 and 9).
//!
//! - The client side is [`HbonePool`]: HTTP/2 connections pooled and multiplexed per
//!   (source identity, destination address, expected destination identity). Each
//!   [`HbonePool::connect`] opens one CONNECT stream whose `:authority` is the original
//!   destination `ip:port` of the application connection, and returns an [`HboneStream`]
//!   (tokio `AsyncRead + AsyncWrite`).
//! - The server side is [`HboneServer`]: it takes accepted 15008 connections, reads the
//!   caller's SPIFFE identity from its verified certificate, and hands each CONNECT to a
//!   [`ConnectHandler`] (authorize, then connect to the application), answering 200 and
//!   copying bytes both ways, or refusing with the handler's status.
//!
//! Refusals may carry a reason in the [`REASON_HEADER`] response header (the proxy's
//! policy refusals do not, unless the operator exposes them). Status codes:
//! 400 bad request (authority), 405 not CONNECT, 403 denied by policy, 502/503 the
//! application is unreachable, 504 the handler did not answer in time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::identity::CertError;
use crate::tls::TlsError;

mod authority;
mod pool;
pub mod requests;
mod server;
mod stream;

#[cfg(test)]
mod tests;

pub use authority::{AuthorityError, parse_authority};
pub use pool::{Dialer, HbonePool, PoolConfig};
pub use server::{
    Carry, ConnectHandler, HboneServer, Refusal, RequestError, ServerConfig, connect_target,
};
pub use stream::{HboneStream, TunnelStream};

/// The port destination pods accept HBONE on.
pub const HBONE_PORT: u16 = 15008;

/// The response header carrying a short reason for a refused CONNECT.
pub const REASON_HEADER: &str = "x-mesh-reason";

/// Default HTTP/2 receive window of one stream.
pub const DEFAULT_STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Default HTTP/2 receive window of a whole connection.
pub const DEFAULT_CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Default largest DATA frame a peer may send (SETTINGS_MAX_FRAME_SIZE). HTTP/2's 16 KiB
/// default costs a TLS write per 16 KiB; a bulk stream moves in frames as large as one copy
/// chunk instead (the TLS layer still cuts 16 KiB records, written out together).
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 256 * 1024;

/// Bytes h2 may hold queued for one stream before the writer waits.
pub const DEFAULT_MAX_SEND_BUFFER: usize = 1024 * 1024;

/// Read buffer under TLS: rustls reads at most 4 KiB per call, so without it a bulk stream
/// costs a read syscall per 4 KiB.
pub(crate) const TLS_READ_BUFFER: usize = 64 * 1024;

/// Default limit of the header list a peer may send.
pub const DEFAULT_MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// Why a tunnel could not be opened or served.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("invalid HBONE configuration: {0}")]
    Config(&'static str),
    #[error("build the TLS configuration for HBONE: {0}")]
    Tls(#[from] TlsError),
    #[error("open an HBONE connection to {addr}: {source}")]
    Dial {
        addr: SocketAddr,
        #[source]
        source: Arc<DialError>,
    },
    #[error("every HBONE connection to {addr} is full ({connections} connections)")]
    PoolExhausted {
        addr: SocketAddr,
        connections: usize,
    },
    #[error("HBONE CONNECT refused with status {status}: {reason}")]
    Refused { status: u16, reason: String },
    #[error("HTTP/2 on the HBONE connection to {addr}: {source}")]
    Http2 {
        addr: SocketAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    #[error("TLS handshake with an HBONE client: {0}")]
    Accept(#[source] std::io::Error),
    #[error("HTTP/2 with an HBONE client: {0}")]
    Serve(#[source] h2::Error),
    #[error("the HBONE client has no usable identity: {0}")]
    PeerIdentity(#[source] TlsError),
}

impl HboneError {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            HboneError::Config(_) => "config",
            HboneError::Tls(_) => "tls_config",
            HboneError::Dial { source, .. } => source.kind(),
            HboneError::PoolExhausted { .. } => "pool_exhausted",
            HboneError::Refused { .. } => "refused",
            HboneError::Http2 { .. } => "http2",
            HboneError::Timeout { .. } => "timeout",
            HboneError::Accept(_) => "accept",
            HboneError::Serve(_) => "serve",
            HboneError::PeerIdentity(_) => "peer_identity",
        }
    }
}

/// Why a pooled connection could not be established. Shared by every caller that waited for
/// the same connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("build the TLS client configuration: {0}")]
    Config(#[source] TlsError),
    #[error("get the source's certificate: {0}")]
    Certificate(#[source] CertError),
    #[error("TCP connect: {0}")]
    Tcp(#[source] std::io::Error),
    #[error("TLS handshake: {0}")]
    Tls(#[source] std::io::Error),
    #[error("the server did not negotiate ALPN h2")]
    Alpn,
    #[error("HTTP/2 handshake: {0}")]
    Http2(#[source] h2::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("the connection task ended before the connection was ready")]
    Abandoned,
}

impl DialError {
    pub fn kind(&self) -> &'static str {
        match self {
            DialError::Config(_) => "dial_config",
            DialError::Certificate(_) => "dial_certificate",
            DialError::Tcp(_) => "dial_tcp",
            DialError::Tls(_) => "dial_tls",
            DialError::Alpn => "dial_alpn",
            DialError::Http2(_) => "dial_http2",
            DialError::Timeout(_) => "dial_timeout",
            DialError::Abandoned => "dial_abandoned",
        }
    }
}

// === impl Stats ===

/// Counters of a pool or a server. Bytes are application payload as carried in DATA frames:
/// `bytes_sent` into the tunnel, `bytes_received` out of it.
#[derive(Debug, Default)]
pub struct Stats {
    connections_opened: AtomicU64,
    connections_failed: AtomicU64,
    connections_closed: AtomicU64,
    goaways: AtomicU64,
    streams_opened: AtomicU64,
    streams_closed: AtomicU64,
    streams_refused: AtomicU64,
    streams_retried: AtomicU64,
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

/// A copy of [`Stats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// HTTP/2 connections established (TLS and HTTP/2 handshakes done).
    pub connections_opened: u64,
    /// Connections whose TCP, TLS or HTTP/2 handshake failed or timed out.
    pub connections_failed: u64,
    /// Established connections that ended.
    pub connections_closed: u64,
    /// GOAWAY frames received (pool) or started (server).
    pub goaways: u64,
    /// CONNECT streams answered 200.
    pub streams_opened: u64,
    /// Streams answered 200 that have since ended.
    pub streams_closed: u64,
    /// CONNECT streams answered with another status.
    pub streams_refused: u64,
    /// CONNECTs retried on a fresh connection after GOAWAY or REFUSED_STREAM (pool).
    pub streams_retried: u64,
    /// Requests sent (pool) or served (server) as streams of their own
    /// ([`requests`]).
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

impl Stats {
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections_opened: get(&self.connections_opened),
            connections_failed: get(&self.connections_failed),
            connections_closed: get(&self.connections_closed),
            goaways: get(&self.goaways),
            streams_opened: get(&self.streams_opened),
            streams_closed: get(&self.streams_closed),
            streams_refused: get(&self.streams_refused),
            streams_retried: get(&self.streams_retried),
            requests: get(&self.requests),
            bytes_sent: get(&self.bytes_sent),
            bytes_received: get(&self.bytes_received),
        }
    }

    fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

impl StatsSnapshot {
    /// Streams answered 200 and not yet ended.
    pub fn streams_active(&self) -> u64 {
        self.streams_opened.saturating_sub(self.streams_closed)
    }

    /// Established connections not yet ended.
    pub fn connections_active(&self) -> u64 {
        self.connections_opened
            .saturating_sub(self.connections_closed)
    }
}
