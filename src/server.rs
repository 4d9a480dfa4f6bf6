//! Routing on a session port: the console page, `GET /session`, and the WebSocket upgrade
//! with its checks; the accepted viewer goes to the relay. Connections come from [`crate::http`].
//!
//! Every request is handled against the [`Session`] it is for, with the path inside that
//! session: a session port serves one session at its root; the public port
//! ([`public`], DESIGN.md "Single public port") finds the session from `/s/{vm_id}/` and
//! hands the rest of the path to the same function, so token, Origin, limits and TLS are
//! checked by one piece of code for both.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::io::AsyncWrite;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn};

use crate::access::{AccessPolicy, ConnectionLimits, ConnectionSlot};
use crate::events::{self, ViewerEnd};
use crate::http::{self, ClientStream, Conn, Peer, UpgradedIo};
use crate::metrics::{ConnectOutcome, Metrics};
use crate::pool::PortLease;
use crate::relay::{self, ClientConn, CloseReason, RelaySettings};
use crate::session::{PublicBase, Session, TargetTicket, TokenCheck};
use crate::tls::ReloadableTls;
use crate::web::{self, Body, WebRoot, full};
use crate::ws::{FrameReader, FrameWriter, ReadSide};

mod handshake;
pub mod public;
mod send_buffer;
pub use send_buffer::viewer_send_buffer;

use handshake::{Refusal, accept_websocket, forbidden, wants_websocket};

/// The most encrypted output rustls queues for one viewer (its default is 64 KiB): one whole
/// relay frame ([`relay::MAX_READ`] plus header and record overhead). A frame is then sealed in
/// one go and leaves in one `writev` rather than one per 64 KiB, so the viewer is woken once
/// for it: at N = 800, system calls per MB 26-33 -> 15-20, and throughput 0.96-1.10x the
/// 64 KiB build's in four A/B runs (docs/benchmarks.md, "The TLS send queue"). The cost: a TLS
/// viewer that stops reading holds up to this much here besides the relay's own frame (a plain
/// viewer's backlog sits in the kernel's send buffer instead), and a close must wait for it to
/// drain.
const TLS_SEND_QUEUE: usize = relay::MAX_READ + 16 * 1024;

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
    /// Where the public port's URLs point (`--public-listen`, `--public-base-url`).
    pub public: Option<PublicBase>,
    /// `--session-ports`: `false` binds no pool ports.
    pub session_ports: bool,
    /// `--viewer-send-buffer`: the `SO_SNDBUF` request for viewer sockets, `None` to leave
    /// them to autotuning ([`viewer_send_buffer`]).
    pub viewer_send_buffer: Option<usize>,
}

impl ServerContext {
    /// A console port's listener (a session port or the public port): its TLS, the daemon's
    /// task tracker and the connection limits every console port shares; it stops with `stop`.
    fn console_listener(
        &self,
        socket: TcpListener,
        stop: CancellationToken,
        span: tracing::Span,
    ) -> http::Listener {
        http::Listener {
            socket,
            tls: self.tls.clone(),
            stop,
            tracker: self.tracker.clone(),
            span,
            admission: Some(http::Admission {
                limits: Arc::clone(&self.limits),
                policy: Arc::clone(&self.access),
                loopback_uncapped_per_address: false,
            }),
        }
    }
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
    let listener = ctx.console_listener(
        socket,
        session.cancel_token(),
        info_span!("session", vm_id = %session.vm_id, port = session.port),
    );
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
                async move {
                    let path = req.uri().path().to_owned();
                    Ok::<_, Infallible>(handle(req, conn, Some(&session), &ctx, &path).await)
                }
            })
        })
        .await;
        // The socket closed when `serve` returned; only now may the port be handed out again.
        drop(lease);
    }))
}

/// Answers one request for `session`; `path` is the path inside the session (`/vnc.html`,
/// `/session`, `/websockify`): the request's own on a session port, what follows
/// `/s/{vm_id}` on the public port. `None`: the public port's vm_id has no session; its
/// `/session` and WebSocket get every check a session's do, in the same order, and then 404
/// (counted as a failed token check) where a token would be compared.
async fn handle(
    mut req: Request<Incoming>,
    conn: Conn,
    session: Option<&Arc<Session>>,
    ctx: &Arc<ServerContext>,
    path: &str,
) -> Response<Body> {
    let peer = conn.peer;
    let (vm_id, port) = (
        session.map(|s| s.vm_id.as_str()),
        session.and_then(|s| s.port),
    );
    if wants_websocket(req.headers()) {
        return match accept_websocket(&mut req, peer, session, ctx) {
            Ok((response, session)) => {
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
                    "forbidden" | "token_expired" | "not_found" => Some(ConnectOutcome::BadToken),
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
                    warn!(vm_id, port, peer = %peer.addr, held_back, reason = refusal.message, "websocket refused for its Origin (logged once a minute)");
                }
                // Debug, not info: a client hammering wrong tokens must not flood the log
                // (the failed-token limit logs once per block at warn).
                debug!(vm_id, port, peer = %peer.addr, code = refusal.code, reason = refusal.message, "websocket refused");
                refusal.into_response()
            }
        };
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "console ports answer GET only",
        );
    }
    match path {
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
                Ok(session) => json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "vm_id": session.vm_id }),
                ),
                Err(refusal) => refusal.into_response(),
            }
        }
        _ => web::serve_path(&ctx.web, &ctx.csp, path, req).await,
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
/// failed-token limit, 404 `not_found` for no session (the public port; counted), 403
/// `forbidden` for a missing or wrong token (counted), 403 `token_expired` for the session's
/// own token past its expiry. Returns the session the token opens.
fn check_token<'a>(
    query: Option<&str>,
    client: &std::net::IpAddr,
    session: Option<&'a Arc<Session>>,
    ctx: &ServerContext,
) -> Result<&'a Arc<Session>, Refusal> {
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
    let Some(session) = session else {
        ctx.access.failures.record_failure(*client);
        return Err(Refusal {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no console session here: it was closed or the link is wrong (ask the platform for a new one)".into(),
            retry_after: None,
        });
    };
    let Some(token) = query_param(query, "token") else {
        ctx.access.failures.record_failure(*client);
        return Err(forbidden(
            "token missing: open the console url vncgate gave (it carries ?token= or #token=)",
        ));
    };
    match session.check_token(token) {
        TokenCheck::Valid => Ok(session),
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
            send_buffer::tune(&tcp, ctx.viewer_send_buffer, &peer);
            // The fast path: the socket's halves, read in place when readable.
            let (r, w) = tcp.into_split();
            let reader = FrameReader::new(ReadSide::Tcp(r), leftover, relay::MAX_CLIENT_FRAME);
            relay_viewer(reader, FrameWriter::new(w), peer, ticket, &session, &ctx).await;
        }
        ClientStream::Tls(mut tls) => {
            send_buffer::tune(tls.get_ref().0, ctx.viewer_send_buffer, &peer);
            tls.get_mut().1.set_buffer_limit(Some(TLS_SEND_QUEUE));
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
}
