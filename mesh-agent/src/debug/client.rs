//! The debugging commands' side of the admin API: one plain HTTP/1.1 GET per question, on a
//! fresh connection to the agent's admin address.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::Deserialize;

/// How long the agent gets to answer. `/debug/status` probes every pod, which takes a few
/// seconds on a busy node.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent answers at {addr}: {source} (is `mesh-agent run` running on this node with \
         --admin {addr}? pass the address it serves with --admin)"
    )]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the agent at {addr} did not answer GET {path}: {reason}")]
    Broken {
        addr: SocketAddr,
        path: String,
        reason: String,
    },
    /// The agent answered with an error: `message` is its explanation.
    #[error("{message}")]
    Refused {
        status: u16,
        kind: String,
        message: String,
    },
}

impl ClientError {
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Unreachable { .. } => "unreachable",
            ClientError::Broken { .. } => "broken",
            ClientError::Refused { .. } => "refused",
        }
    }

    /// The agent said the request names something it does not know, or is malformed.
    pub fn is_bad_request(&self) -> bool {
        matches!(self, ClientError::Refused { status, .. } if (400..500).contains(status))
    }
}

/// The JSON body of an error answer.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    kind: String,
}

/// The admin endpoint of one agent.
#[derive(Debug, Clone, Copy)]
pub struct AdminClient {
    pub addr: SocketAddr,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> AdminClient {
        AdminClient { addr }
    }

    /// `GET path`: the body of a 200 answer.
    pub fn get(&self, path: &str) -> Result<String, ClientError> {
        let broken = |reason: String| ClientError::Broken {
            addr: self.addr,
            path: path.to_string(),
            reason,
        };
        let mut conn =
            TcpStream::connect_timeout(&self.addr, CONNECT_TIMEOUT).map_err(|source| {
                ClientError::Unreachable {
                    addr: self.addr,
                    source,
                }
            })?;
        conn.set_read_timeout(Some(ANSWER_TIMEOUT))
            .and_then(|()| conn.set_write_timeout(Some(ANSWER_TIMEOUT)))
            .map_err(|e| broken(e.to_string()))?;
        write!(
            conn,
            "GET {path} HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n",
            self.addr
        )
        .map_err(|e| broken(e.to_string()))?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw)
            .map_err(|e| broken(e.to_string()))?;
        let (status, body) = parse_response(&raw).map_err(broken)?;
        if status == 200 {
            return Ok(body);
        }
        let (kind, message) = match serde_json::from_str::<ErrorBody>(&body) {
            Ok(e) => (e.kind, e.error),
            Err(_) => (String::new(), body.trim().to_string()),
        };
        Err(ClientError::Refused {
            status,
            kind,
            message: if message.is_empty() {
                format!("GET {path}: HTTP {status}")
            } else {
                message
            },
        })
    }

    /// `GET path`, its JSON body decoded.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let body = self.get(path)?;
        serde_json::from_str(&body).map_err(|e| ClientError::Broken {
            addr: self.addr,
            path: path.to_string(),
            reason: format!("the answer is not the JSON expected: {e}"),
        })
    }
}

/// Status and body of a whole HTTP/1.1 response (`content-length` or read to close; chunked
/// bodies are decoded).
fn parse_response(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "the answer has no complete HTTP head".to_string())?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP status line: {:?}", head.lines().next()))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("transfer-encoding:")
            .is_some_and(|v| v.contains("chunked"))
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> Result<String, String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| "truncated chunked body".to_string())?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| "truncated chunk".to_string())?;
        out.push_str(chunk);
        body = rest.get(size + 2..).unwrap_or("");
    }
}

/// Percent-encodes a query parameter value.
pub fn encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_chunked_answers() {
        let plain = b"HTTP/1.1 404 Not Found\r\ncontent-length: 5\r\n\r\nnope\n";
        assert_eq!(parse_response(plain), Ok((404, "nope\n".into())));
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Ok((200, "abcde".into())));
        assert!(parse_response(b"garbage").is_err());
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(encode("demo/web:80"), "demo/web:80");
        assert_eq!(encode("a b&c=d"), "a%20b%26c%3Dd");
    }

    #[test]
    fn no_agent_is_a_clear_error() {
        // A port nothing listens on: bind one, note it, close it.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let e = AdminClient::new(addr).get("/healthz").expect_err("refused");
        assert_eq!(e.kind(), "unreachable");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
        assert!(e.to_string().contains("mesh-agent run"), "{e}");
    }
}
