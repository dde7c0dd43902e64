//! One request against a demo server, and what went wrong when it failed.
//!
//! Four ways to ask: `tcp` writes `hello\n` to a line echo and expects `<pod> hello\n`;
//! `http1` sends a GET on a fresh HTTP/1.1 connection; `http2` sends it on an h2c (prior
//! knowledge) connection that many requests can share. Either HTTP mode expects the demo
//! server's JSON and reads its `pod`. `grpc` makes a unary `Say` call on a gRPC channel that
//! many calls can share, and reads the reply's `pod`.
//!
//! Every failure maps to a short, stable kind with [`classify`]; the load report groups by it.

use std::{error::Error as _, fmt, io, str::FromStr, time::Duration};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::{body::Incoming, client::conn::http2::SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::TcpStream,
};
use tracing::debug;

pub use self::grpc::GrpcClient;
use crate::grpc::proto::SayRequest;

mod grpc;

/// The largest reply read: a line for tcp, a body for http.
pub const MAX_REPLY: usize = 1 << 20;

/// What a tcp call writes, and the message a grpc call says.
pub const PROBE: &str = "hello";

/// The protocol a call speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A line to a `tcp-echo` server, one connection per request.
    Tcp,
    /// HTTP/1.1, one connection per request.
    Http1,
    /// HTTP/2 with prior knowledge (h2c) on one shared connection.
    Http2,
    /// Unary gRPC `Say` calls to a `grpc` server, on one shared h2c channel.
    Grpc,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Tcp => "tcp",
            Mode::Http1 => "http1",
            Mode::Http2 => "http2",
            Mode::Grpc => "grpc",
        })
    }
}

// === impl Target ===

/// Where calls go: `HOST:PORT`, with IPv6 literals in brackets (`[::1]:8080`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    host: String,
    port: u16,
}

/// Why a target did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not HOST:PORT")]
pub struct TargetError(String);

impl Target {
    pub fn new(host: impl Into<String>, port: u16) -> Target {
        Target {
            host: host.into(),
            port,
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    async fn connect(&self) -> Result<TcpStream, CallError> {
        let stream = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(CallError::Connect)?;
        // Latency matters more than segment count for these small exchanges.
        if let Err(e) = stream.set_nodelay(true) {
            debug!(error = %e, "set TCP_NODELAY");
        }
        Ok(stream)
    }
}

impl From<std::net::SocketAddr> for Target {
    fn from(addr: std::net::SocketAddr) -> Target {
        Target::new(addr.ip().to_string(), addr.port())
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Target, TargetError> {
        let bad = || TargetError(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let host = match host.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']').ok_or_else(bad)?,
            // An unbracketed IPv6 literal would be ambiguous.
            None if host.contains(':') => return Err(bad()),
            None => host,
        };
        if host.is_empty() || port == 0 || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(Target::new(host, port))
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

impl Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// === impl CallError ===

/// A failed call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("{0}")]
    Io(#[source] io::Error),
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    #[error("no reply within {}", crate::duration::format(*.0))]
    Timeout(Duration),
    #[error("server answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("unexpected reply: {0}")]
    BadReply(String),
    /// The gRPC channel could not be set up.
    #[error("connect: {}", chain(.0))]
    GrpcConnect(#[source] tonic::transport::Error),
    /// A gRPC call ended with a status other than OK, sent by the server (or a proxy) or
    /// made up by the client from a transport failure.
    #[error("{}", status_text(.0))]
    Grpc(Box<tonic::Status>),
}

impl From<tonic::Status> for CallError {
    fn from(status: tonic::Status) -> CallError {
        CallError::Grpc(Box::new(status))
    }
}

impl CallError {
    /// The short kind this error is counted under.
    pub fn kind(&self) -> ErrorKind {
        classify(self)
    }

    /// The line `call` prints on failure: `<kind>: <what happened>`. A gRPC status names its
    /// code beside the number, as in `grpc_7 (PermissionDenied): <message>`.
    pub fn summary(&self) -> String {
        let kind = self.kind();
        match (self, kind) {
            (CallError::Grpc(status), ErrorKind::Grpc(_)) => {
                format!("{kind} ({:?}): {}", status.code(), status.message())
            }
            _ => format!("{kind}: {self}"),
        }
    }
}

/// `<Code>: <message>`, and the cause when the client made the status up from one.
fn status_text(status: &tonic::Status) -> String {
    let text = format!("{:?}: {}", status.code(), status.message());
    match status.source() {
        Some(cause) => format!("{text} ({})", chain(cause)),
        None => text,
    }
}

/// An error and its sources, `outer: inner: innermost`.
fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        // Wrappers often repeat their source's message; say it once.
        if !text.ends_with(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// The short, stable name a failure is grouped under.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    /// Nothing listened, or something refused the connection (`ECONNREFUSED`).
    ConnectRefused,
    /// The connection could not be made for another reason (unreachable, denied, no such host).
    ConnectFailed,
    /// The connection or stream was reset (`ECONNRESET`, `EPIPE`, an HTTP/2 reset or GOAWAY).
    Reset,
    /// No complete reply within the timeout.
    Timeout,
    /// The peer closed before a complete reply.
    Eof,
    /// The server answered with a status other than 2xx.
    Http(u16),
    /// A gRPC call ended with this status code (not OK), as the server or a proxy sent it.
    Grpc(i32),
    /// A reply arrived but is not what a demo server says.
    BadReply,
    /// Anything else.
    Other,
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ErrorKind::ConnectRefused => f.write_str("connect_refused"),
            ErrorKind::ConnectFailed => f.write_str("connect_failed"),
            ErrorKind::Reset => f.write_str("reset"),
            ErrorKind::Timeout => f.write_str("timeout"),
            ErrorKind::Eof => f.write_str("eof"),
            ErrorKind::Http(status) => write!(f, "http_{status}"),
            ErrorKind::Grpc(code) => write!(f, "grpc_{code}"),
            ErrorKind::BadReply => f.write_str("bad_reply"),
            ErrorKind::Other => f.write_str("other"),
        }
    }
}

/// Names the kind of a failed call. All classification lives here.
pub fn classify(err: &CallError) -> ErrorKind {
    fn io_kind(e: &io::Error, connecting: bool) -> ErrorKind {
        use io::ErrorKind as K;
        match e.kind() {
            K::ConnectionRefused => ErrorKind::ConnectRefused,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe => ErrorKind::Reset,
            K::TimedOut => ErrorKind::Timeout,
            K::UnexpectedEof => ErrorKind::Eof,
            _ if connecting => ErrorKind::ConnectFailed,
            _ => ErrorKind::Other,
        }
    }

    /// What the transport says about a failure, if `err` or one of its sources is the
    /// transport's: the first socket or HTTP/2 error in the chain decides, hyper's own
    /// account of the failure comes after.
    fn transport_kind(
        err: &(dyn std::error::Error + 'static),
        connecting: bool,
    ) -> Option<ErrorKind> {
        let mut hyper_error = None;
        let mut next = Some(err);
        while let Some(e) = next {
            if let Some(io) = e.downcast_ref::<io::Error>() {
                return Some(io_kind(io, connecting));
            }
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                if let Some(io) = h2.get_io() {
                    return Some(io_kind(io, connecting));
                }
                if h2.is_reset() || h2.is_go_away() {
                    return Some(ErrorKind::Reset);
                }
            }
            if let Some(hyper) = e.downcast_ref::<hyper::Error>() {
                if hyper.is_timeout() {
                    return Some(ErrorKind::Timeout);
                }
                hyper_error.get_or_insert(hyper);
            }
            next = e.source();
        }
        let hyper = hyper_error?;
        Some(
            if hyper.is_incomplete_message() || hyper.is_canceled() || hyper.is_closed() {
                ErrorKind::Eof
            } else if hyper.is_parse() {
                ErrorKind::BadReply
            } else {
                ErrorKind::Other
            },
        )
    }

    match err {
        CallError::Connect(e) => io_kind(e, true),
        CallError::Io(e) => io_kind(e, false),
        CallError::Timeout(_) => ErrorKind::Timeout,
        CallError::Status { status, .. } => ErrorKind::Http(status.as_u16()),
        CallError::BadReply(_) => ErrorKind::BadReply,
        CallError::Http(e) => transport_kind(e, false).unwrap_or(ErrorKind::Other),
        CallError::GrpcConnect(e) => transport_kind(e, true).unwrap_or(ErrorKind::ConnectFailed),
        // A status the client made up from a transport failure keeps that failure as its
        // source; one that came over the wire has none and counts by its code.
        CallError::Grpc(status) => status
            .source()
            .and_then(|e| transport_kind(e, false))
            .unwrap_or(ErrorKind::Grpc(i32::from(status.code()))),
    }
}

// === calls ===

/// A successful call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The name the answering server was started with.
    pub pod: String,
    /// The reply as received: the line (without its newline) or the JSON body.
    pub text: String,
}

/// One call in `mode`, bounded by `timeout`. Http2 and grpc open a connection for this call
/// alone. `path` is for the http modes; `fail_code` is the status a grpc call asks for.
pub async fn call(
    mode: Mode,
    target: &Target,
    path: &str,
    fail_code: i32,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let once = async {
        match mode {
            Mode::Tcp => call_tcp(target).await,
            Mode::Http1 => call_http1(target, path).await,
            Mode::Http2 => Http2Client::connect(target).await?.get(path).await,
            Mode::Grpc => {
                let client = GrpcClient::connect(target).await?;
                client.say(say_probe(fail_code)).await
            }
        }
    };
    tokio::time::timeout(timeout, once)
        .await
        .map_err(|_| CallError::Timeout(timeout))?
}

/// The `Say` a grpc call makes: [`PROBE`], answered with `fail_code`'s status.
pub fn say_probe(fail_code: i32) -> SayRequest {
    SayRequest {
        message: PROBE.to_owned(),
        fail_code,
        delay_ms: 0,
    }
}

/// Writes `hello\n` on a new connection and reads one line back.
pub async fn call_tcp(target: &Target) -> Result<Reply, CallError> {
    let mut stream = target.connect().await?;
    stream
        .write_all(format!("{PROBE}\n").as_bytes())
        .await
        .map_err(CallError::Io)?;
    let mut line = Vec::new();
    let read = BufReader::new(&mut stream)
        .take(MAX_REPLY as u64)
        .read_until(b'\n', &mut line)
        .await
        .map_err(CallError::Io)?;
    if line.last() != Some(&b'\n') {
        return Err(if read >= MAX_REPLY {
            CallError::BadReply(format!("no newline in the first {MAX_REPLY} bytes"))
        } else {
            CallError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed after {read} bytes, before a full line"),
            ))
        });
    }
    let text = String::from_utf8(line)
        .map_err(|_| CallError::BadReply("reply is not UTF-8".into()))?
        .trim_end_matches(['\n', '\r'])
        .to_owned();
    let pod = text
        .strip_suffix(&format!(" {PROBE}"))
        .filter(|pod| !pod.is_empty())
        .ok_or_else(|| CallError::BadReply(format!("expected `<pod> {PROBE}`, got {text:?}")))?
        .to_owned();
    // Done: say so, rather than leave the server to notice the close.
    if let Err(e) = stream.shutdown().await {
        debug!(error = %e, "shutdown after reply");
    }
    Ok(Reply { pod, text })
}

/// GETs `path` on a new HTTP/1.1 connection.
pub async fn call_http1(target: &Target, path: &str) -> Result<Reply, CallError> {
    let stream = target.connect().await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(CallError::Http)?;
    let request = Request::get(path)
        .header(header::HOST, target.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| CallError::BadReply(format!("request for {path:?}: {e}")))?;
    let mut exchange = std::pin::pin!(async {
        let response = sender
            .send_request(request)
            .await
            .map_err(CallError::Http)?;
        read_reply(response).await
    });
    // The connection is driven here rather than spawned, so a timeout drops it too.
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        reply = &mut exchange => reply,
        ended = &mut conn => {
            // The exchange finishes now that its connection has; the connection's own
            // error names the cause better than the "canceled" the exchange sees.
            match (exchange.await, ended) {
                (Ok(reply), _) => Ok(reply),
                (Err(_), Err(e)) => Err(CallError::Http(e)),
                (Err(e), Ok(())) => Err(e),
            }
        }
    }
}

/// An h2c connection that requests share.
#[derive(Clone, Debug)]
pub struct Http2Client {
    sender: SendRequest<Empty<Bytes>>,
    authority: String,
}

impl Http2Client {
    /// Opens the connection and starts driving it in the background; it closes once every
    /// clone of the client is dropped.
    pub async fn connect(target: &Target) -> Result<Http2Client, CallError> {
        let stream = target.connect().await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .map_err(CallError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "h2c connection ended");
            }
        });
        Ok(Http2Client {
            sender,
            authority: target.to_string(),
        })
    }

    /// GETs `path` on a new stream of the shared connection.
    pub async fn get(&self, path: &str) -> Result<Reply, CallError> {
        let uri = format!("http://{}{path}", self.authority);
        let request = Request::get(uri.as_str())
            .body(Empty::<Bytes>::new())
            .map_err(|e| CallError::BadReply(format!("request for {uri:?}: {e}")))?;
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(CallError::Http)?;
        let response = sender
            .send_request(request)
            .await
            .map_err(CallError::Http)?;
        read_reply(response).await
    }
}

/// Reads a demo server's JSON reply and its `pod`; a non-2xx status is a failure.
async fn read_reply(response: Response<Incoming>) -> Result<Reply, CallError> {
    let status = response.status();
    let body = Limited::new(response.into_body(), MAX_REPLY)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => CallError::Http(*e),
            Err(e) => CallError::BadReply(e.to_string()),
        })?
        .to_bytes();
    let text = String::from_utf8_lossy(&body).into_owned();
    if !status.is_success() {
        let mut body = text.trim().to_owned();
        if body.len() > 200 {
            let cut = (0..=200)
                .rev()
                .find(|&i| body.is_char_boundary(i))
                .unwrap_or(0);
            body.truncate(cut);
            body.push_str("...");
        }
        return Err(CallError::Status { status, body });
    }
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| CallError::BadReply(format!("body is not JSON ({e})")))?;
    let pod = json
        .get("pod")
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| CallError::BadReply("JSON body has no string `pod`".into()))?
        .to_owned();
    Ok(Reply {
        pod,
        text: text.trim_end().to_owned(),
    })
}

#[cfg(test)]
mod tests;
