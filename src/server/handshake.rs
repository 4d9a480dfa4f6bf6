//! The WebSocket opening handshake of a session (or public) port (RFC 6455 section 4.2.1)
//! and the HTTP answers a refused upgrade gets.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use super::{ServerContext, check_token, json_error};
use crate::http::Peer;
use crate::session::Session;
use crate::web::{Body, full};

/// A request that asks for a WebSocket, on any path (noVNC's default is `websockify`).
pub(super) fn wants_websocket(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
        })
}

/// A refused upgrade: the HTTP answer given instead of 101.
#[derive(Debug)]
pub(super) struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// For 429: seconds until the client may try again.
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn into_response(self) -> Response<Body> {
        let mut response = json_error(self.status, self.code, &self.message);
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.status == StatusCode::UPGRADE_REQUIRED {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
        }
        response
    }
}

pub(super) fn forbidden(message: &str) -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        code: "forbidden",
        message: message.to_owned(),
        retry_after: None,
    }
}

pub(super) fn bad_request(message: String) -> Refusal {
    Refusal {
        status: StatusCode::BAD_REQUEST,
        code: "invalid_request",
        message,
        retry_after: None,
    }
}

/// Checks a WebSocket request and builds the 101 answer. Nothing reaches the VNC server
/// unless every check passes: the failed-token limit, the Origin policy, the token, then
/// the handshake itself (RFC 6455 section 4.2.1).
pub(super) fn accept_websocket<'a>(
    req: &mut Request<Incoming>,
    peer: Peer,
    session: Option<&'a Arc<Session>>,
    ctx: &ServerContext,
) -> Result<(Response<Body>, &'a Arc<Session>), Refusal> {
    let client = ctx.access.client(peer.addr.ip(), peer.tls, req.headers());
    if let Some(retry_after) = ctx.access.failures.blocked(client.addr) {
        return Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!(
                "too many wrong console tokens from {}: try again in {retry_after} s",
                client.addr
            ),
            retry_after: Some(retry_after),
        });
    }
    if let Err(message) = ctx.access.check_origin(&client, req.headers()) {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            code: "origin_refused",
            message,
            retry_after: None,
        });
    }
    let session = check_token(req.uri().query(), &client.addr, session, ctx)?;
    let headers = req.headers();
    if req.version() < hyper::Version::HTTP_11 {
        return Err(bad_request(format!(
            "a WebSocket upgrade needs HTTP/1.1 or later, this request is {:?} (RFC 6455 4.1)",
            req.version()
        )));
    }
    if req.method() != Method::GET {
        return Err(bad_request("a WebSocket upgrade must be a GET".into()));
    }
    for name in [
        header::HOST,
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
    ] {
        match headers.get_all(&name).iter().count() {
            1 => {}
            0 => return Err(bad_request(format!("missing {name} header"))),
            _ => return Err(bad_request(format!("duplicated {name} header"))),
        }
    }
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    if !connection_upgrade {
        return Err(bad_request("missing Connection: Upgrade".into()));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(Refusal {
            status: StatusCode::UPGRADE_REQUIRED,
            code: "invalid_request",
            message: "only WebSocket version 13 is supported".into(),
            retry_after: None,
        });
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|k| is_websocket_key(k.as_bytes()))
    else {
        return Err(bad_request(
            "malformed Sec-WebSocket-Key: expected 16 random bytes in base64 (RFC 6455 4.1)".into(),
        ));
    };
    let protocol = choose_subprotocol(headers)?;
    let mut response = Response::new(full(""));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    let accept = derive_accept_key(key.as_bytes());
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).map_err(|_| bad_request("bad Sec-WebSocket-Key".into()))?,
    );
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    Ok((response, session))
}

/// A `Sec-WebSocket-Key`: base64 of exactly 16 bytes, so 22 characters, the last of which
/// carries 2 zero bits, then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    let b64 = |c: &u8| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/';
    key.len() == 24
        && key[..22].iter().all(b64)
        && matches!(key[21], b'A' | b'Q' | b'g' | b'w')
        && &key[22..] == b"=="
}

/// `binary` when offered; no header when nothing is offered (noVNC >= 1.2, and Chrome aborts
/// on a protocol it did not ask for); only other protocols (e.g. the dropped `base64`) is 400.
fn choose_subprotocol(headers: &HeaderMap) -> Result<Option<&'static str>, Refusal> {
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        Ok(None)
    } else if offered.iter().any(|p| p == "binary") {
        Ok(Some("binary"))
    } else {
        Err(bad_request(format!(
            "unsupported WebSocket subprotocol(s) {}: vncgate speaks only \"binary\" (or none)",
            offered.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys() {
        for ok in ["dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA=="] {
            assert!(is_websocket_key(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZR==",
            "dGhlIHNhbXBsZSBub25j*Q==",
            "dGhlIHNhbXBsZSBub25jZQ==x",
            "dGhlIHNhbXBsZSBub25jZQ=A",
        ] {
            assert!(!is_websocket_key(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn subprotocols() {
        let offer = |v: Option<&str>| {
            let mut h = HeaderMap::new();
            if let Some(v) = v {
                h.insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    HeaderValue::from_str(v).expect("header"),
                );
            }
            choose_subprotocol(&h).map_err(|r| r.status)
        };
        assert_eq!(offer(None), Ok(None));
        assert_eq!(offer(Some("binary")), Ok(Some("binary")));
        assert_eq!(offer(Some("base64, binary")), Ok(Some("binary")));
        assert_eq!(offer(Some("base64")), Err(StatusCode::BAD_REQUEST));
    }
}
