//! HTTP/1.1 Upgrade (WebSocket and the like) through the proxy.
//!
//! An upgrade request is a request like any other: routed, authorized, and sent on its way,
//! with `Connection: upgrade` and its `Upgrade` kept (they are otherwise removed as
//! connection-specific). When the answer is `101 Switching Protocols`, the caller's
//! connection and the one the request went on stop carrying HTTP: [`Switch::splice`] copies their bytes
//! both ways until both ends closed, or nothing moved for the idle timeout of the caller's
//! connection, or it was cut (drain, revocation); until then the caller's connection stays
//! open and counted (telemetry, its pod's connection cap). Any other answer ends the upgrade: the
//! caller gets that answer and its connection stays HTTP. Only HTTP/1.1 requests on a
//! connection that leaves as HTTP/1.1 are upgraded; a request that leaves as HTTP/2 goes
//! without its `Upgrade`, so the application answers it as a plain request. An upgrade to
//! `h2c` is never carried: the HTTP/2 requests that would follow on the switched connection
//! would pass unseen, unchecked by policy; the request goes on as plain HTTP/1.1.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version, request};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;

use super::ConnWatch;
use crate::copy::RelayError;

/// A caller's request to switch protocols, taken from its head.
#[derive(Debug)]
pub struct Requested {
    /// The `Upgrade` header: the protocols the caller asked for.
    protocols: HeaderValue,
    /// The caller's connection, once the answer was 101.
    client: OnUpgrade,
    /// The caller's connection's idle timeout and accounting.
    watch: Option<ConnWatch>,
}

/// Whether `headers` ask to upgrade (`Connection` names `upgrade`).
fn connection_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The protocols of an `Upgrade` header the proxy carries: every one but `h2c`. An upgrade to
/// HTTP/2 would carry requests the proxy never sees, each unchecked by policy; without it, the
/// request is answered as HTTP/1.1 (which the upgrade mechanism allows).
fn carried(upgrade: &HeaderValue) -> Option<HeaderValue> {
    let protocols: Vec<&str> = upgrade
        .to_str()
        .ok()?
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .filter(|p| {
            let name = p.split('/').next().unwrap_or(p);
            !name.eq_ignore_ascii_case("h2c")
        })
        .collect();
    if protocols.is_empty() {
        return None;
    }
    HeaderValue::from_str(&protocols.join(", ")).ok()
}

/// The protocols an HTTP/1.1 request asks to switch to that the proxy carries.
fn asked(parts: &request::Parts) -> Option<HeaderValue> {
    if parts.version != Version::HTTP_11 || !connection_upgrade(&parts.headers) {
        return None;
    }
    carried(parts.headers.get(header::UPGRADE)?)
}

/// Takes an HTTP/1.1 upgrade request's `Upgrade` and the caller's connection from its head;
/// `None` for any other request, or one asking only for `h2c`. Call before
/// [`super::strip_hop_by_hop`].
pub fn take(parts: &mut request::Parts) -> Option<Requested> {
    let protocols = asked(parts)?;
    let client = parts.extensions.remove::<OnUpgrade>()?;
    Some(Requested {
        protocols,
        client,
        watch: parts.extensions.get::<ConnWatch>().cloned(),
    })
}

impl Requested {
    /// Puts the upgrade back on the request headers that leave (after hop-by-hop headers
    /// were removed).
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocols.clone());
    }

    /// Takes the answer's side of the upgrade when `response` (still with its own headers)
    /// switched protocols, and keeps its upgrade headers; [`Switch::splice`] carries the bytes.
    /// Only a response of an HTTP/1.1 connection switches (hyper leaves the upgraded
    /// connection in its extensions); an HTTP/2 stream never answers 101.
    pub fn accepted<B>(self, response: &mut Response<B>) -> Option<Switch> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            return None;
        }
        let protocols = response.headers().get(header::UPGRADE).cloned();
        let upstream = response.extensions_mut().remove::<OnUpgrade>()?;
        Some(Switch {
            requested: self,
            upstream,
            protocols,
        })
    }
}

/// An accepted upgrade, before its bytes are carried.
#[derive(Debug)]
pub struct Switch {
    requested: Requested,
    upstream: OnUpgrade,
    protocols: Option<HeaderValue>,
}

impl Switch {
    /// Puts the upgrade headers back on the 101 the caller gets.
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let protocols = self
            .protocols
            .clone()
            .unwrap_or_else(|| self.requested.protocols.clone());
        headers.insert(header::UPGRADE, protocols);
    }

    /// Carries the bytes of both connections, in a task of its own, once both switched.
    pub fn splice(self) {
        tokio::spawn(splice(
            self.requested.client,
            self.upstream,
            self.requested.watch,
        ));
    }
}

/// Copies both ways between the caller's upgraded connection and the application's (see the
/// module docs for when it ends).
async fn splice(client: OnUpgrade, upstream: OnUpgrade, watch: Option<ConnWatch>) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => {
            debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    let copy = crate::copy::copy_both(&mut client, &mut upstream);
    let ended = match watch {
        Some(watch) => tokio::select! {
            copied = copy => copied.map(drop).map_err(RelayError::Io),
            ended = watch.activity.watchdog(watch.idle) => {
                Err(RelayError::ended(ended, watch.activity.revoked()))
            }
        },
        None => copy.await.map(drop).map_err(RelayError::Io),
    };
    if let Err(e) = ended {
        debug!(error = %e, "upgraded connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(connection: &str, upgrade: &str) -> request::Parts {
        http::Request::get("/ws")
            .header("connection", connection)
            .header("upgrade", upgrade)
            .body(())
            .expect("request")
            .into_parts()
            .0
    }

    #[test]
    fn only_upgrades_the_proxy_can_carry_are_taken() {
        let asked_for = |c: &str, u: &str| asked(&request(c, u));
        assert_eq!(
            asked_for("keep-alive, Upgrade", "websocket").expect("websocket"),
            "websocket"
        );
        assert!(asked_for("keep-alive", "websocket").is_none(), "not asked");
        assert!(
            asked_for("upgrade", "h2c").is_none(),
            "h2c would carry requests past the policy"
        );
        assert_eq!(
            asked_for("upgrade", "H2C, websocket").expect("websocket stays"),
            "websocket"
        );
        let mut http10 = request("upgrade", "websocket");
        http10.version = Version::HTTP_10;
        assert!(asked(&http10).is_none(), "HTTP/1.1 only");
    }
}
