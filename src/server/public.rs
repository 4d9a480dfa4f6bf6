//! The public port (`--public-listen`, DESIGN.md "Single public port"): every session on one
//! port, the page at `/s/{vm_id}/vnc.html`, the WebSocket at `/s/{vm_id}/websockify`.
//!
//! Routing reads the vm_id from the path. The page and its assets are the same for every
//! session, so they are served for any well-formed vm_id without looking it up: a static
//! request tells nothing about which VMs exist. `GET /s/{vm_id}/session` and the WebSocket look
//! the session up in the sharded table (a shard's read lock for the lookup, nothing held after
//! it) and go to the session port's own handler, so the token, Origin, limits and TLS checks
//! are the same code. For a vm_id the table does not have, that handler makes the same checks
//! in the same order (method, failed-token limit, Origin, cross-site) and answers 404 where it
//! would compare the token, counted as a failed token check: names can be guessed only at
//! `--auth-fail-limit`'s pace, and the token is never compared with another session's.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::info_span;

use super::handshake::wants_websocket;
use super::{ServerContext, handle, json_error};
use crate::http::{self, Conn};
use crate::session::{SessionTable, is_vm_id};
use crate::web::{self, Body, full};

/// Starts serving the public port on `listener` until the daemon's root token is cancelled.
pub fn spawn_public_server(
    listener: std::net::TcpListener,
    table: SessionTable,
    ctx: Arc<ServerContext>,
) -> std::io::Result<JoinHandle<()>> {
    let socket = TcpListener::from_std(listener)?;
    let port = socket.local_addr()?.port();
    let listener = ctx.console_listener(socket, ctx.root.clone(), info_span!("public", port));
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
    let Some((vm_id, rest)) = split_session_path(&path).filter(|(id, _)| is_vm_id(id)) else {
        return json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "this port serves consoles under /s/{vm_id}/: open the console url vncgate gave",
        );
    };
    let for_session = rest == "/session" || wants_websocket(req.headers());
    if !for_session {
        if rest.is_empty() {
            // `/s/vm` -> `/s/vm/`: relative (`./`, so a vm_id with a `:` is no scheme), so
            // it stays right under a reverse proxy's prefix.
            let mut response = Response::new(full(""));
            *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
            if let Ok(location) = HeaderValue::from_str(&format!("./{vm_id}/")) {
                response.headers_mut().insert(header::LOCATION, location);
            }
            return response;
        }
        if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
            return json_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "the console page answers GET only",
            );
        }
        return web::serve_path(&ctx.web, &ctx.csp, rest, req).await;
    }
    let session = table.get(vm_id).map(|s| Arc::clone(s.value()));
    handle(req, conn, session.as_ref(), ctx, rest).await
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
