//! Routing on a session port: the console page, `GET /session`, and the WebSocket upgrade
//! with its checks; the accepted viewer goes to the relay. Connections come from [`crate::http`].
//!
//! Every request is handled against the [`Session`] the port serves; the checks (token,
//! subprotocol, viewer cap) take the session as an argument, so a single public port that
//! resolves the session from the token can reuse them unchanged.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn};

use crate::access::{AccessPolicy, ConnectionLimits, ConnectionSlot};
use crate::events::{self, ViewerEnd};
use crate::http::{self, ClientStream, Conn, Peer, UpgradedIo};
use crate::metrics::{ConnectOutcome, Metrics};
use crate::pool::PortLease;
use crate::relay::{self, ClientConn, CloseReason, RelaySettings};
use crate::session::{Session, TargetTicket, TokenCheck};
use crate::tls::ReloadableTls;
use crate::web::{self, Body, WebRoot, full};
use crate::ws::{FrameReader, FrameWriter, ReadSide};

/// What every session server shares.
#[derive(Debug)]
pub struct ServerContext {
    pub relay: RelaySettings,
    /// `--max-connections-per-session`; changed by a config reload (SIGHUP).
    pub max_viewers: std::sync::atomic::AtomicUsize,
    /// What plain GETs are served from.
    pub web: WebRoot,
    /// `--cert`/`--key`: session ports speak HTTPS/WSS only.
    pub tls: Option<Arc<ReloadableTls>>,
    pub tracker: TaskTracker,
    /// Cancelled at shutdown; every session's token is a child.
    pub root: CancellationToken,
    /// Origin policy, trusted proxies, failed-token limit.
    pub access: Arc<AccessPolicy>,
    /// `--max-connections`, `--max-pending-per-ip`.
    pub limits: Arc<ConnectionLimits>,
    /// `--token-ttl`: how long a new token admits new connections.
    pub token_ttl: Option<Duration>,
    /// The console page's `Content-Security-Policy` (with `--frame-ancestors`).
    pub csp: HeaderValue,
    /// Counters and histograms of `GET /metrics`.
    pub metrics: Arc<Metrics>,
}

/// Starts serving `session` on its pool port. The task owns the listener and the lease, so
/// the port returns to the pool exactly when the listener is closed.
pub fn spawn_session_server(
    listener: std::net::TcpListener,
    lease: PortLease,
    session: Arc<Session>,
    ctx: Arc<ServerContext>,
) -> std::io::Result<JoinHandle<()>> {
    let socket = TcpListener::from_std(listener)?;
    let listener = http::Listener {
        socket,
        tls: ctx.tls.clone(),
        stop: session.cancel_token(),
        tracker: ctx.tracker.clone(),
        span: info_span!("session", vm_id = %session.vm_id, port = session.port),
        admission: Some(http::Admission {
            limits: Arc::clone(&ctx.limits),
            policy: Arc::clone(&ctx.access),
            loopback_uncapped_per_address: false,
        }),
    };
    let tracker = ctx.tracker.clone();
    Ok(tracker.spawn(async move {
        let service_ctx = Arc::clone(&ctx);
        let service_session = Arc::clone(&session);
        http::serve(listener, move |conn: Conn| {
            let session = Arc::clone(&service_session);
            let ctx = Arc::clone(&service_ctx);
            hyper::service::service_fn(move |req| {
                let session = Arc::clone(&session);
                let ctx = Arc::clone(&ctx);
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(handle(req, conn, &session, &ctx).await) }
            })
        })
        .await;
        // The socket closed when `serve` returned; only now may the port be handed out again.
        drop(lease);
    }))
}

async fn handle(
    mut req: Request<Incoming>,
    conn: Conn,
    session: &Arc<Session>,
    ctx: &Arc<ServerContext>,
) -> Response<Body> {
    let peer = conn.peer;
    if wants_websocket(req.headers()) {
        return match accept_websocket(&mut req, peer, session, ctx) {
            Ok(response) => {
                // The target generation is fixed when the token was good: a revocation
                // between this answer and the relay's start still reaches this viewer.
                let ticket = session.ticket();
                let upgrade = hyper::upgrade::on(req);
                ctx.tracker.spawn(serve_viewer(
                    upgrade,
                    peer,
                    conn.slot,
                    ticket,
                    Arc::clone(session),
                    Arc::clone(ctx),
                ));
                response
            }
            Err(refusal) => {
                let outcome = match refusal.code {
                    "forbidden" | "token_expired" => Some(ConnectOutcome::BadToken),
                    "origin_refused" => Some(ConnectOutcome::OriginRefused),
                    "rate_limited" => Some(ConnectOutcome::RateLimited),
                    // A malformed handshake is not a viewer's connect.
                    _ => None,
                };
                if let Some(outcome) = outcome {
                    ctx.metrics.viewer_connect(outcome);
                }
                if refusal.code == "origin_refused"
                    && let Some(held_back) = ctx.access.origin_log.ready(ORIGIN_LOG_PERIOD)
                {
                    warn!(vm_id = %session.vm_id, port = session.port, peer = %peer.addr, held_back, reason = refusal.message, "websocket refused for its Origin (logged once a minute)");
                }
                // Debug, not info: a client hammering wrong tokens must not flood the log
                // (the failed-token limit logs once per block at warn).
                debug!(vm_id = %session.vm_id, port = session.port, peer = %peer.addr, code = refusal.code, reason = refusal.message, "websocket refused");
                refusal.into_response()
            }
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "session ports answer GET only",
        );
    }
    match req.uri().path() {
        "/session" => {
            let client = ctx.access.client(peer.addr.ip(), peer.tls, req.headers());
            // Another site can make a browser fetch this (an <img>): it must not be able to
            // spend the browser's failed-token budget and lock its user out.
            let cross_site = req
                .headers()
                .get("sec-fetch-site")
                .is_some_and(|v| v == "cross-site" || v == "same-site");
            let origin = ctx
                .access
                .check_origin(&client, req.headers())
                .and_then(|()| match query_param(req.uri().query(), "origin") {
                    Some(o) => ctx.access.check_origin_value(&client, &decode_origin(o)),
                    None => Ok(()),
                });
            if cross_site || origin.is_err() {
                return Refusal {
                    status: StatusCode::FORBIDDEN,
                    code: "origin_refused",
                    message: origin.err().unwrap_or_else(|| {
                        "a page of another site may not query this console".into()
                    }),
                    retry_after: None,
                }
                .into_response();
            }
            match check_token(req.uri().query(), &client.addr, session, ctx) {
                Ok(()) => json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "vm_id": session.vm_id }),
                ),
                Err(refusal) => refusal.into_response(),
            }
        }
        _ => web::serve(&ctx.web, &ctx.csp, req).await,
    }
}

/// Origin refusals are logged at warn at most this often.
const ORIGIN_LOG_PERIOD: Duration = Duration::from_secs(60);

/// The page's `origin` parameter, percent-decoded (`https%3A%2F%2Fhost`).
fn decode_origin(raw: &str) -> String {
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

/// The token check of `/session` and of an upgrade: 429 while the client is over the
/// failed-token limit, 403 `forbidden` for a missing or wrong token (counted), 403
/// `token_expired` for the session's own token past its expiry.
fn check_token(
    query: Option<&str>,
    client: &std::net::IpAddr,
    session: &Session,
    ctx: &ServerContext,
) -> Result<(), Refusal> {
    if let Some(retry_after) = ctx.access.failures.blocked(*client) {
        return Err(Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!(
                "too many wrong console tokens from {client}: try again in {retry_after} s"
            ),
            retry_after: Some(retry_after),
        });
    }
    let Some(token) = query_param(query, "token") else {
        ctx.access.failures.record_failure(*client);
        return Err(forbidden(
            "token missing: open the console url vncgate gave (it carries ?token= or #token=)",
        ));
    };
    match session.check_token(token) {
        TokenCheck::Valid => Ok(()),
        TokenCheck::Expired => Err(Refusal {
            status: StatusCode::FORBIDDEN,
            code: "token_expired",
            message: "this console link has expired: ask the platform for a new one".into(),
            retry_after: None,
        }),
        TokenCheck::Wrong => {
            ctx.access.failures.record_failure(*client);
            Err(forbidden(
                "wrong token for this console session (it may have been rotated: ask the platform for a new link)",
            ))
        }
    }
}

/// A request that asks for a WebSocket, on any path (noVNC's default is `websockify`).
fn wants_websocket(headers: &HeaderMap) -> bool {
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
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// For 429: seconds until the client may try again.
    retry_after: Option<u64>,
}

impl Refusal {
    fn into_response(self) -> Response<Body> {
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

fn forbidden(message: &str) -> Refusal {
    Refusal {
        status: StatusCode::FORBIDDEN,
        code: "forbidden",
        message: message.to_owned(),
        retry_after: None,
    }
}

fn bad_request(message: String) -> Refusal {
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
fn accept_websocket(
    req: &mut Request<Incoming>,
    peer: Peer,
    session: &Session,
    ctx: &ServerContext,
) -> Result<Response<Body>, Refusal> {
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
    check_token(req.uri().query(), &client.addr, session, ctx)?;
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
    Ok(response)
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

/// One viewer: completes the upgrade, enforces the viewer cap and relays.
async fn serve_viewer(
    upgrade: hyper::upgrade::OnUpgrade,
    peer: Peer,
    slot: Option<Arc<ConnectionSlot>>,
    ticket: TargetTicket,
    session: Arc<Session>,
    ctx: Arc<ServerContext>,
) {
    // Held to the end of the relay: a viewer keeps its place under --max-connections, but is
    // no longer pending for its address once upgraded.
    let _slot = slot.inspect(|s| s.upgraded());
    let upgraded = tokio::select! {
        u = upgrade => match u {
            Ok(u) => u,
            Err(err) => {
                debug!(vm_id = %session.vm_id, port = session.port, peer = %peer.addr, %err, "upgrade failed");
                return;
            }
        },
        _ = session.cancelled() => return,
    };
    // Our own connections under hyper; take the stream back for the relay.
    let parts = match upgraded.downcast::<UpgradedIo>() {
        Ok(parts) => parts,
        Err(_) => {
            warn!(vm_id = %session.vm_id, port = session.port, peer = %peer.addr, "upgraded connection is not one of ours; dropped");
            return;
        }
    };
    let leftover = parts.read_buf;
    match parts.io.into_inner().into_inner().into_inner() {
        ClientStream::Plain(tcp) => {
            // The fast path: the socket's halves, read in place when readable.
            let (r, w) = tcp.into_split();
            let reader = FrameReader::new(ReadSide::Tcp(r), leftover, relay::MAX_CLIENT_FRAME);
            relay_viewer(reader, FrameWriter::new(w), peer, ticket, &session, &ctx).await;
        }
        ClientStream::Tls(tls) => {
            let (r, w) = tokio::io::split(*tls);
            let reader = FrameReader::new(
                ReadSide::Stream(Box::new(r)),
                leftover,
                relay::MAX_CLIENT_FRAME,
            );
            relay_viewer(reader, FrameWriter::new(w), peer, ticket, &session, &ctx).await;
        }
    }
}

async fn relay_viewer<W: AsyncWrite + Unpin>(
    reader: FrameReader,
    writer: FrameWriter<W>,
    peer: Peer,
    ticket: TargetTicket,
    session: &Arc<Session>,
    ctx: &ServerContext,
) {
    let mut client = ClientConn { reader, writer };
    let Some(guard) = session.add_viewer(
        peer.addr,
        ctx.max_viewers.load(std::sync::atomic::Ordering::Relaxed),
        &ticket,
    ) else {
        info!(vm_id = %session.vm_id, port = session.port, peer = %peer.addr, "viewer refused: too many viewers");
        ctx.metrics.viewer_connect(ConnectOutcome::Cap);
        client.close(&CloseReason::TooManyViewers).await;
        ctx.metrics
            .viewer_closed(Some(CloseReason::TooManyViewers.code()));
        client.finish().await;
        return;
    };
    let viewer = guard.viewer().id;
    let started = tokio::time::Instant::now();
    events::viewer_connected(
        &session.vm_id,
        session.port,
        viewer,
        peer.addr,
        &ticket.target,
        peer.tls,
    );
    let outcome = relay::run_relay(
        &mut client,
        &ticket.target,
        |took| {
            ctx.metrics.target_connected(took);
            ctx.metrics.viewer_connect(ConnectOutcome::Ok);
        },
        &guard.viewer().cancel,
        || {
            if guard.viewer().was_kicked() {
                CloseReason::DisconnectedByOperator
            } else {
                session.cancel_reason(ticket.generation)
            }
        },
        &guard.viewer().traffic,
        RelaySettings {
            // The session's own idle limit, set at open, wins over --idle-timeout.
            idle_timeout: session.limits.idle_timeout.or(ctx.relay.idle_timeout),
            ..ctx.relay
        },
    )
    .await;
    if let Some(CloseReason::TargetUnreachable(_)) = &outcome.close {
        ctx.metrics
            .viewer_connect(ConnectOutcome::TargetUnreachable);
    }
    let code = outcome.close.as_ref().map(CloseReason::code);
    ctx.metrics.viewer_closed(code);
    let traffic = &guard.viewer().traffic;
    events::viewer_disconnected(&ViewerEnd {
        vm_id: &session.vm_id,
        port: session.port,
        viewer,
        peer: peer.addr,
        duration: started.elapsed(),
        bytes_to_client: traffic.to_client.load(std::sync::atomic::Ordering::Relaxed),
        bytes_to_server: traffic.to_server.load(std::sync::atomic::Ordering::Relaxed),
        code,
        reason: match (&outcome.close, &outcome.gone) {
            (Some(reason), _) => reason.reason(),
            (None, gone) => gone.as_deref().unwrap_or("connection gone"),
        },
    });
    // The viewer is over (gone from the session's list); its socket is closed cleanly.
    drop(guard);
    if outcome.close.is_some() {
        client.finish().await;
    }
}

/// The first value of `name` in a query string. Tokens are hex, so no percent-decoding is needed;
/// an encoded token simply does not match.
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn json_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params() {
        assert_eq!(query_param(Some("token=abc"), "token"), Some("abc"));
        assert_eq!(query_param(Some("a=1&token=x&token=y"), "token"), Some("x"));
        assert_eq!(query_param(Some("tokenx=1"), "token"), None);
        assert_eq!(query_param(Some("token"), "token"), Some(""));
        assert_eq!(query_param(None, "token"), None);
    }

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
