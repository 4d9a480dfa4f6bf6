//! The public port (`--public-listen`, DESIGN.md "Single public port"): every session on one
//! port, the page at `/s/{vm_id}/vnc.html`, the WebSocket at `/s/{vm_id}/websockify`.
//!
//! Routing reads the vm_id from the path and looks the session up in the sharded table (a
//! shard's read lock for the lookup, nothing held after it); the rest of the path goes to the
//! session port's own handler, so the token, Origin, limits and TLS checks are the same code.
//! A request for a vm_id the table does not have is 404 and counts as a failed token check
//! (no enumeration of VM names); its token is never compared with another session's.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info_span};

use super::{ServerContext, handle, json_error};
use crate::http::{self, Conn};
use crate::metrics::ConnectOutcome;
use crate::session::SessionTable;
use crate::web::{Body, full};

/// Starts serving the public port on `listener` until the daemon's root token is cancelled.
pub fn spawn_public_server(
    listener: std::net::TcpListener,
    table: SessionTable,
    ctx: Arc<ServerContext>,
) -> std::io::Result<JoinHandle<()>> {
    let socket = TcpListener::from_std(listener)?;
    let port = socket.local_addr()?.port();
    let listener = http::Listener {
        socket,
        tls: ctx.tls.clone(),
        stop: ctx.root.clone(),
        tracker: ctx.tracker.clone(),
        span: info_span!("public", port),
        admission: Some(http::Admission {
            limits: Arc::clone(&ctx.limits),
            policy: Arc::clone(&ctx.access),
            loopback_uncapped_per_address: false,
        }),
    };
    let tracker = ctx.tracker.clone();
    Ok(tracker.spawn(async move {
        http::serve(listener, move |conn: Conn| {
            let table = Arc::clone(&table);
            let ctx = Arc::clone(&ctx);
            hyper::service::service_fn(move |req| {
                let table = Arc::clone(&table);
                let ctx = Arc::clone(&ctx);
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(route(req, conn, &table, &ctx).await) }
            })
        })
        .await;
    }))
}

/// `/s/{vm_id}{rest}` -> `(vm_id, rest)`; `rest` is empty or starts with `/`.
pub fn split_session_path(path: &str) -> Option<(&str, &str)> {
    let after = path.strip_prefix("/s/")?;
    Some(match after.find('/') {
        Some(i) => after.split_at(i),
        None => (after, ""),
    })
}

async fn route(
    req: Request<Incoming>,
    conn: Conn,
    table: &SessionTable,
    ctx: &Arc<ServerContext>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let Some((vm_id, rest)) = split_session_path(&path) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this port serves consoles under /s/{vm_id}/: open the console url vncgate gave",
        );
    };
    // Any string may be looked up: one that is not a vm_id is simply not found.
    let session = table.get(vm_id).map(|s| Arc::clone(s.value()));
    let Some(session) = session else {
        return unknown_session(&req, &conn, ctx);
    };
    if rest.is_empty() {
        // `/s/vm` -> `/s/vm/`: relative, so it stays right under a reverse proxy's prefix;
        // built from a vm_id that matched a session (its grammar needs no escaping).
        let mut response = Response::new(full(""));
        *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
        if let Ok(location) = HeaderValue::from_str(&format!("{vm_id}/")) {
            response.headers_mut().insert(header::LOCATION, location);
        }
        return response;
    }
    handle(req, conn, &session, ctx, rest).await
}

/// A request under `/s/{vm_id}/` for no session: counted as a failed token check of the
/// client (429 once it is over the limit), then 404. Nothing is compared with any token.
fn unknown_session(req: &Request<Incoming>, conn: &Conn, ctx: &ServerContext) -> Response<Body> {
    let client = ctx
        .access
        .client(conn.peer.addr.ip(), conn.peer.tls, req.headers());
    let upgrade = super::handshake::wants_websocket(req.headers());
    if let Some(retry_after) = ctx.access.failures.blocked(client.addr) {
        if upgrade {
            ctx.metrics.viewer_connect(ConnectOutcome::RateLimited);
        }
        return super::handshake::Refusal {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "rate_limited",
            message: format!(
                "too many wrong console tokens or unknown consoles from {}: try again in {retry_after} s",
                client.addr
            ),
            retry_after: Some(retry_after),
        }
        .into_response();
    }
    ctx.access.failures.record_failure(client.addr);
    if upgrade {
        ctx.metrics.viewer_connect(ConnectOutcome::BadToken);
    }
    debug!(peer = %conn.peer.addr, path = req.uri().path(), "request for an unknown console session");
    json_error(
        StatusCode::NOT_FOUND,
        "not_found",
        "no console session here: it was closed or the link is wrong (ask the platform for a new one)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_paths() {
        assert_eq!(
            split_session_path("/s/vm-1/vnc.html"),
            Some(("vm-1", "/vnc.html"))
        );
        assert_eq!(split_session_path("/s/vm-1/"), Some(("vm-1", "/")));
        assert_eq!(split_session_path("/s/vm-1"), Some(("vm-1", "")));
        assert_eq!(
            split_session_path("/s/vm/novnc/core/rfb.js"),
            Some(("vm", "/novnc/core/rfb.js"))
        );
        assert_eq!(split_session_path("/vnc.html"), None);
        assert_eq!(split_session_path("/s"), None);
        assert_eq!(split_session_path("/s/"), Some(("", "")));
    }
}
