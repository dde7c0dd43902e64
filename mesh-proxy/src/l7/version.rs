//! Requests and responses converted to the HTTP version of the connection they leave on.
//!
//! The proxy speaks to the application in the version its port declares ([`Wire::of_protocol`])
//! and to its caller in the version the caller chose, so a request may change version on its
//! way. What changes is only what the versions frame differently:
//!
//! - **To HTTP/1.1.** The request target becomes origin-form (`/path?query`) and the authority
//!   (HTTP/2 `:authority`, or the host of an absolute-form target) moves to `Host`; a request
//!   with neither (HTTP/1.0) gets the address it was sent to as `Host`, since HTTP/1.1 requires
//!   one. A request that came as HTTP/2 asks for trailers (`te: trailers`): HTTP/1.1 only
//!   carries trailers to a recipient that asked, and the proxy can always pass them on.
//! - **To HTTP/2.** The target becomes absolute (`:scheme`, `:authority` from `Host`, `:path`)
//!   and `Host` is dropped. Connection-specific headers are already gone
//!   ([`super::strip_hop_by_hop`]); an HTTP/1.1 `Upgrade` is not carried (HTTP/2 has none, so
//!   the application answers the request as it is, which the upgrade allows).
//!
//! Every request that leaves on HTTP/1.x leaves as HTTP/1.1 (RFC 9110 section 2.5: an
//! intermediary sends its own version), so an HTTP/1.0 client's request still uses a kept-alive
//! connection past the proxy; its own connection closes after the answer, as HTTP/1.0 expects.

use std::net::SocketAddrV4;

use http::header::{self, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, Uri, Version};
use mesh_core::model::Protocol;

/// The HTTP version of a connection the proxy opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// HTTP/1.1, one request at a time per connection.
    Http1,
    /// HTTP/2 with prior knowledge (h2c), requests as streams.
    Http2,
}

impl Wire {
    /// What an application on a port of `protocol` speaks: `http` HTTP/1.1; `http2`, `h2c`
    /// and `grpc` HTTP/2.
    pub fn of_protocol(protocol: Protocol) -> Wire {
        match protocol {
            Protocol::Http2 | Protocol::Grpc => Wire::Http2,
            Protocol::Http | Protocol::Tcp => Wire::Http1,
        }
    }

    /// The version a request of `version` keeps: HTTP/2 as HTTP/2, any other as HTTP/1.1.
    pub fn of_version(version: Version) -> Wire {
        if version == Version::HTTP_2 {
            Wire::Http2
        } else {
            Wire::Http1
        }
    }
}

/// The authority a request names: its target's (HTTP/2 `:authority`, absolute-form), else its
/// `Host`, else `fallback` (where it was sent).
fn authority<B>(request: &Request<B>, fallback: SocketAddrV4) -> Authority {
    if let Some(a) = request.uri().authority() {
        return a.clone();
    }
    request
        .headers()
        .get(header::HOST)
        .and_then(|h| Authority::try_from(h.as_bytes()).ok())
        .unwrap_or_else(|| {
            Authority::try_from(fallback.to_string().as_str())
                .unwrap_or_else(|_| Authority::from_static("localhost"))
        })
}

/// Converts `request` (its head; the body is streamed as it is) to the version of `wire`.
/// `fallback` names the destination when the request does not (see the module docs).
pub fn request_for<B>(request: &mut Request<B>, wire: Wire, fallback: SocketAddrV4) {
    let from_h2 = request.version() == Version::HTTP_2;
    let connect = request.method() == Method::CONNECT;
    let authority = authority(request, fallback);
    match wire {
        Wire::Http1 => {
            if !connect {
                let named = request.uri().authority().is_some();
                if (named || !request.headers().contains_key(header::HOST))
                    && let Ok(host) = HeaderValue::from_str(authority.as_str())
                {
                    request.headers_mut().insert(header::HOST, host);
                }
                if named {
                    let origin = request
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/"));
                    if let Ok(uri) = Uri::builder().path_and_query(origin).build() {
                        *request.uri_mut() = uri;
                    }
                }
            }
            if from_h2 && !request.headers().contains_key(header::TE) {
                request
                    .headers_mut()
                    .insert(header::TE, HeaderValue::from_static("trailers"));
            }
            *request.version_mut() = Version::HTTP_11;
        }
        Wire::Http2 => {
            if !connect {
                let scheme = request.uri().scheme().cloned().unwrap_or(Scheme::HTTP);
                let path = request
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/"));
                if let Ok(uri) = Uri::builder()
                    .scheme(scheme)
                    .authority(authority)
                    .path_and_query(path)
                    .build()
                {
                    *request.uri_mut() = uri;
                    request.headers_mut().remove(header::HOST);
                }
            }
            *request.version_mut() = Version::HTTP_2;
        }
    }
}

/// Marks `response` with the version of the caller's request, `client` (HTTP/1.x callers get
/// an HTTP/1.1 answer, the server's own version); the server framing it does the rest.
pub fn response_for<B>(response: &mut Response<B>, client: Version) {
    *response.version_mut() = if client == Version::HTTP_2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const FALLBACK: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 96, 0, 1), 80);

    fn request(version: Version, uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().version(version).uri(uri);
        if let Some(h) = host {
            b = b.header("host", h);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn an_http2_request_leaves_as_http11_with_its_authority_in_host() {
        let mut r = request(Version::HTTP_2, "http://api.shop:8080/a/b?x=1", None);
        request_for(&mut r, Wire::Http1, FALLBACK);
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.uri(), "/a/b?x=1");
        assert_eq!(r.headers()["host"], "api.shop:8080");
        assert_eq!(
            r.headers()["te"],
            "trailers",
            "HTTP/2 always carries trailers"
        );
    }

    #[test]
    fn an_http10_request_without_host_gets_the_destination_as_host() {
        let mut r = request(Version::HTTP_10, "/", None);
        request_for(&mut r, Wire::Http1, FALLBACK);
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.headers()["host"], "10.96.0.1:80");
        assert!(!r.headers().contains_key("te"));
        // A Host that is there stays as it is.
        let mut r = request(Version::HTTP_11, "/", Some("web.shop"));
        request_for(&mut r, Wire::Http1, FALLBACK);
        assert_eq!(r.headers()["host"], "web.shop");
    }

    #[test]
    fn an_http11_request_leaves_as_http2_with_an_absolute_target_and_no_host() {
        let mut r = request(Version::HTTP_11, "/svc.Echo/Say", Some("echo.shop:9090"));
        request_for(&mut r, Wire::Http2, FALLBACK);
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(r.uri(), "http://echo.shop:9090/svc.Echo/Say");
        assert!(!r.headers().contains_key("host"));
        let mut r = request(Version::HTTP_10, "/x", None);
        request_for(&mut r, Wire::Http2, FALLBACK);
        assert_eq!(r.uri(), "http://10.96.0.1:80/x");
    }

    #[test]
    fn the_wire_follows_the_declared_protocol() {
        assert_eq!(Wire::of_protocol(Protocol::Http), Wire::Http1);
        assert_eq!(Wire::of_protocol(Protocol::Http2), Wire::Http2);
        assert_eq!(Wire::of_protocol(Protocol::Grpc), Wire::Http2);
        assert_eq!(Wire::of_version(Version::HTTP_10), Wire::Http1);
        assert_eq!(Wire::of_version(Version::HTTP_2), Wire::Http2);
    }
}
