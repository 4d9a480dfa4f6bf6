//! The one accept loop and HTTP/1.1 serving function shared by the control API and every
//! session port: TLS (with the plain-HTTP answer on a TLS port), header limits, the deadline
//! of every phase of a connection, and the drain on close and shutdown live here once
//! (DESIGN.md "TLS", "Access control").

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, Span, debug, warn};

use crate::access::{AccessPolicy, ConnectionLimits, ConnectionSlot, Throttle};
use crate::tls::ReloadableTls;

mod deadlines;
mod refusals;
pub use deadlines::{BodyTimedOut, DeadlineBody, Timed};
pub use refusals::JsonRefusals;

/// Request headers must arrive within this (slowloris). hyper's header timer also runs while a
/// kept-alive connection waits for its next request, so it is the keep-alive idle limit too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake must finish within this.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive within this (the API reads bodies under it).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A response must be written within this (a client that stops reading a page asset, or
/// reads it a byte at a time, is dropped).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Request line and headers together, at most (else 431).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Header lines of one request, at most (else 431).
pub const MAX_HEADERS: usize = 100;
/// After an accept error (EMFILE, ...) the loop waits this long instead of spinning.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long a connection may take to finish the response in hand when its listener stops.
pub const HTTP_DRAIN: Duration = Duration::from_secs(1);

/// Accept failures (EMFILE, ...) of every listener, logged together.
static ACCEPT_ERRORS: Throttle = Throttle::new();

/// The first byte of a TLS record carrying a handshake (RFC 8446 section 5.1, content type 22).
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// The answer to plain HTTP on a TLS port: readable in a browser or curl, unlike an alert.
const PLAIN_ON_TLS: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 64\r\n\
Connection: close\r\n\
\r\n\
This port speaks HTTPS: use https:// (or wss://), not http://.\r\n";

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The connection came over TLS (the listener's scheme is https/wss).
    pub tls: bool,
}

/// A client's connection: plain TCP, or TLS over TCP.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(s) => s.is_write_vectored(),
            ClientStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
        }
    }
}

/// What hyper hands a handler after an upgrade: downcast the upgraded connection to this.
pub type UpgradedIo = TokioIo<JsonRefusals<Timed<ClientStream>>>;

/// One listener: its socket, its TLS (if any), and when it stops.
pub struct Listener {
    pub socket: TcpListener,
    pub tls: Option<Arc<ReloadableTls>>,
    /// Cancelled when this listener closes (session closed, daemon shutting down).
    pub stop: CancellationToken,
    /// Every connection task goes on this tracker.
    pub tracker: TaskTracker,
    /// The span (vm_id, port) every log line of this listener carries.
    pub span: Span,
    /// The caps applied at accept: a client port's (`--max-connections`,
    /// `--max-pending-per-ip`), or the API's own (`API_MAX_CONNECTIONS`, outside
    /// `--max-connections`); `None` for none.
    pub admission: Option<Admission>,
}

/// What decides, at accept, whether a client connection may be served at all.
#[derive(Clone)]
pub struct Admission {
    pub limits: Arc<ConnectionLimits>,
    /// Trusted proxies are exempt from the per-address pending cap.
    pub policy: Arc<AccessPolicy>,
    /// Loopback peers are not held to the per-address cap (the API: every local client is
    /// some 127.0.0.x, and an operator on the host must get in); they count in the total.
    pub loopback_uncapped_per_address: bool,
}

/// A served connection: who it is, and its place under the caps (session ports; the viewer
/// keeps a clone after the upgrade).
#[derive(Clone)]
pub struct Conn {
    pub peer: Peer,
    pub slot: Option<Arc<ConnectionSlot>>,
}

/// Accepts connections until `listener.stop` and serves each on its own tracked task with
/// the service `make_service(conn)` builds. A connection over the listener's caps is closed
/// at once. Accept errors (EMFILE, ...) are logged and backed off, never end the loop.
/// Returns when stopped; the socket closes on return.
pub async fn serve<F, S, B>(listener: Listener, make_service: F)
where
    F: Fn(Conn) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let make_service = Arc::new(make_service);
    let span = listener.span.clone();
    async move {
        loop {
            tokio::select! {
                _ = listener.stop.cancelled() => break,
                accepted = listener.socket.accept() => match accepted {
                    Ok((stream, addr)) => {
                        let slot = match &listener.admission {
                            None => None,
                            Some(a) => {
                                let exempt = a.policy.is_trusted_proxy(addr.ip())
                                    || (a.loopback_uncapped_per_address && addr.ip().is_loopback());
                                match a.limits.admit(addr.ip(), exempt) {
                                    Ok(slot) => Some(Arc::new(slot)),
                                    // Closed at accept: no task, no buffer, counted and
                                    // logged by the limits.
                                    Err(_) => continue,
                                }
                            }
                        };
                        let conn = serve_connection(
                            stream,
                            addr,
                            slot,
                            listener.tls.clone(),
                            listener.stop.clone(),
                            Arc::clone(&make_service),
                        );
                        listener.tracker.spawn(conn.instrument(Span::current()));
                    }
                    Err(err) => {
                        // Once a minute across all listeners: at the descriptor limit every
                        // port fails at once, ten times a second.
                        if let Some(held_back) = ACCEPT_ERRORS.ready(Duration::from_secs(60)) {
                            warn!(%err, held_back, "accept failed; backing off (logged once a minute)");
                        }
                        tokio::select! {
                            _ = listener.stop.cancelled() => break,
                            _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        }
                    }
                },
            }
        }
    }
    .instrument(span)
    .await
}

async fn serve_connection<F, S, B>(
    stream: TcpStream,
    addr: SocketAddr,
    slot: Option<Arc<ConnectionSlot>>,
    tls: Option<Arc<ReloadableTls>>,
    stop: CancellationToken,
    make_service: Arc<F>,
) where
    F: Fn(Conn) -> S + Send + Sync + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Keystrokes and pointer events are tiny; they must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let io = match tls {
        None => ClientStream::Plain(stream),
        Some(tls) => {
            let handshake = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, accept_tls(stream, &tls));
            let done = tokio::select! {
                done = handshake => done,
                _ = stop.cancelled() => return,
            };
            match done {
                Ok(Ok(stream)) => ClientStream::Tls(Box::new(stream)),
                Ok(Err(err)) => {
                    debug!(peer = %addr, %err, "tls handshake failed");
                    return;
                }
                Err(_elapsed) => {
                    debug!(peer = %addr, "tls handshake timed out");
                    return;
                }
            }
        }
    };
    let peer = Peer {
        addr,
        tls: matches!(io, ClientStream::Tls(_)),
    };
    let service = make_service(Conn { peer, slot });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .max_headers(MAX_HEADERS)
        .serve_connection(TokioIo::new(JsonRefusals::new(Timed::new(io))), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(err) = result {
                debug!(peer = %addr, %err, "http connection ended");
            }
        }
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(HTTP_DRAIN, conn).await;
        }
    }
}

/// Why a TLS port's connection did not become a TLS stream.
#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("plain HTTP on a TLS port (answered 400)")]
    PlainHttp,
    #[error("closed before the handshake")]
    Eof,
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Looks at the first byte: a TLS handshake goes to rustls, anything else (plain HTTP) gets a
/// 400 that says to use https.
async fn accept_tls(
    stream: TcpStream,
    tls: &ReloadableTls,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, HandshakeError> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(HandshakeError::Eof);
    }
    if first[0] != TLS_HANDSHAKE_RECORD {
        answer_plain_http(stream).await;
        return Err(HandshakeError::PlainHttp);
    }
    Ok(tls.acceptor().accept(stream).await?)
}

/// Sends [`PLAIN_ON_TLS`] and closes. What the client sent is read first, so the close is a
/// FIN the client can read the answer before, not a reset.
async fn answer_plain_http(mut stream: TcpStream) {
    let mut sink = [0u8; 4096];
    let _ = stream.try_read(&mut sink);
    if stream.write_all(PLAIN_ON_TLS).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    // Drain briefly so unread request bytes do not turn the close into a reset.
    let _ = tokio::time::timeout(HTTP_DRAIN, async {
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_answer_has_the_right_length() {
        let text = std::str::from_utf8(PLAIN_ON_TLS).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
    }

    #[tokio::test(start_paused = true)]
    async fn a_response_that_takes_too_long_to_write_times_out() {
        // A duplex pipe with a tiny buffer that nobody reads stands for a client that stopped.
        let (a, _b) = tokio::io::duplex(16);
        let mut timed = Timed::new(a);
        let err = timed
            .write_all(&[0u8; 1024])
            .await
            .expect_err("the write must fail");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
