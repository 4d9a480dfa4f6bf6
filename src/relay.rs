//! The WebSocket <-> VNC byte relay with backpressure, and [`CloseReason`], the close table.
//!
//! Each direction reads, then awaits the write of what it read before reading again, so a
//! side that stops reading stalls the other side's socket instead of growing a buffer here.
//! The viewer's side is any stream (plain TCP, TLS); the VNC side is what [`Target`] connects.

use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::target::{CONNECT_TIMEOUT, Target, TargetStream, describe_connect_error};
use crate::ws::{self, Event, FrameReader, FrameWriter, ReadSide, WsError};

/// First read from the VNC server after a quiet spell; doubles while reads fill the buffer.
const MIN_READ: usize = 32 * 1024;
/// A read from the VNC server shorter than this drained it (an interactive reply, not a
/// stream): the next read waits for epoll rather than trying at once.
const SETTLE_READ: usize = 4 * 1024;
/// Largest read, so largest frame: a full-screen update goes out in few frames and syscalls,
/// and a viewer that stopped reading holds at most this much here.
const MAX_READ: usize = 256 * 1024;
/// VNC client messages are small; clipboard text is the largest. A bigger frame is junk.
pub const MAX_CLIENT_FRAME: u64 = 4 << 20;
/// How long a close frame may take to go out before the connection is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Why a viewer's WebSocket was closed: the close code and reason it is sent (DESIGN.md
/// "Session port", close codes). noVNC and the console page show the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// 1011 `VNC server HOST:PORT unreachable: connection refused` (or `timed out`, ...).
    TargetUnreachable(String),
    /// 1011: the VNC server connection broke after it was made; the text says how.
    TargetFailed(String),
    /// 1000 `VNC server closed the connection`.
    ServerClosed,
    /// The answer to the viewer's own close frame: its code echoed (1000 when it sent none),
    /// no reason (RFC 6455 section 5.5.1).
    ClientClosed(Option<u16>),
    /// 1001 `session closed`: deleted, cleaned up, lifetime over, or its VM stopped.
    SessionClosed,
    /// 1001 `vncgate restarting`: the daemon is shutting down.
    Restarting,
    /// 1012 `VNC target changed`: the session was retargeted.
    Retargeted,
    /// 1013 `too many viewers`.
    TooManyViewers,
    /// 1008 `token revoked`: a rotation with `disconnect`.
    TokenRevoked,
    /// 1008 `disconnected by operator`.
    DisconnectedByOperator,
    /// 1001 `idle timeout`.
    IdleTimeout,
    /// 1001 `keepalive timeout`: two ping intervals without a pong.
    KeepaliveTimeout,
    /// 1009 `message too big`: a client frame over [`MAX_CLIENT_FRAME`].
    MessageTooBig(String),
    /// 1002: the client broke RFC 6455 framing; the text says how.
    ProtocolError(String),
    /// 1007: text that must be UTF-8 (a close reason) is not.
    InvalidData(String),
}

impl CloseReason {
    /// The close code (RFC 6455 section 7.4).
    pub fn code(&self) -> u16 {
        match self {
            CloseReason::TargetUnreachable(_) | CloseReason::TargetFailed(_) => 1011,
            CloseReason::ServerClosed => 1000,
            CloseReason::ClientClosed(code) => code.unwrap_or(1000),
            CloseReason::SessionClosed
            | CloseReason::Restarting
            | CloseReason::IdleTimeout
            | CloseReason::KeepaliveTimeout => 1001,
            CloseReason::Retargeted => 1012,
            CloseReason::TooManyViewers => 1013,
            CloseReason::TokenRevoked | CloseReason::DisconnectedByOperator => 1008,
            CloseReason::MessageTooBig(_) => 1009,
            CloseReason::ProtocolError(_) => 1002,
            CloseReason::InvalidData(_) => 1007,
        }
    }

    /// The close reason text (cut to 123 bytes when sent).
    pub fn reason(&self) -> &str {
        match self {
            CloseReason::TargetUnreachable(why)
            | CloseReason::TargetFailed(why)
            | CloseReason::MessageTooBig(why)
            | CloseReason::ProtocolError(why)
            | CloseReason::InvalidData(why) => why,
            CloseReason::ServerClosed => "VNC server closed the connection",
            CloseReason::ClientClosed(_) => "",
            CloseReason::SessionClosed => "session closed",
            CloseReason::Restarting => "vncgate restarting",
            CloseReason::Retargeted => "VNC target changed",
            CloseReason::TooManyViewers => "too many viewers",
            CloseReason::TokenRevoked => "token revoked",
            CloseReason::DisconnectedByOperator => "disconnected by operator",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::KeepaliveTimeout => "keepalive timeout",
        }
    }

    /// A fault of the VNC side (logged at warn), rather than a normal end.
    pub fn is_target_fault(&self) -> bool {
        matches!(
            self,
            CloseReason::TargetUnreachable(_) | CloseReason::TargetFailed(_)
        )
    }
}

/// Bytes relayed each way, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct Traffic {
    pub to_client: AtomicU64,
    pub to_server: AtomicU64,
}

/// Timers of one relayed connection.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    pub ping_interval: Duration,
    pub idle_timeout: Option<Duration>,
}

/// How a relay ended: the close sent to the viewer, or `None` when its connection was gone
/// (nothing could be sent).
#[derive(Debug)]
pub struct Outcome {
    pub close: Option<CloseReason>,
    /// Why the viewer's connection was gone, when `close` is `None`.
    pub gone: Option<String>,
}

/// How the pump ended, before the close frame is chosen.
enum PumpEnd {
    ServerClosed,
    ClientClosed(Option<u16>),
    ClientGone(String),
    ClientMisbehaved(WsError),
    Cancelled,
    PingTimeout,
    IdleTimeout,
    TargetFailed(String),
}

/// A viewer's WebSocket, after the upgrade: frames in through `reader`, out through `writer`
/// (any stream: a TCP write half, a TLS stream's write half).
pub struct ClientConn<W> {
    pub reader: FrameReader,
    pub writer: FrameWriter<W>,
}

impl CloseReason {
    /// The close a viewer gets for a frame-reader error (RFC 6455 section 7.4.1): 1009 for a
    /// frame over the limit, 1007 for a non-UTF-8 close reason, 1002 for any other breach of
    /// the protocol (an I/O error also ends as 1002, though nobody is left to read it).
    pub fn for_client_error(err: &WsError) -> CloseReason {
        match err {
            WsError::TooBig(n) => CloseReason::MessageTooBig(format!(
                "message too big: a frame of {n} bytes exceeds the limit"
            )),
            WsError::InvalidUtf8(_) => CloseReason::InvalidData(err.to_string()),
            _ => CloseReason::ProtocolError(err.to_string()),
        }
    }
}

impl<W: AsyncWrite + Unpin> ClientConn<W> {
    /// Sends a close frame (if the connection still takes one) within [`CLOSE_GRACE`].
    pub async fn close(&mut self, reason: &CloseReason) {
        let _ = tokio::time::timeout(
            CLOSE_GRACE,
            self.writer.close(reason.code(), reason.reason()),
        )
        .await;
    }

    /// After [`ClientConn::close`]: reads (and drops) what the viewer still sends, up to its
    /// close frame or EOF, within [`CLOSE_GRACE`]. A socket closed with unread input is
    /// answered with a reset, and a browser that gets the reset before reading our close frame
    /// loses it (it reports 1006 instead of our code).
    pub async fn finish(&mut self) {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            loop {
                match self.reader.next().await {
                    Ok(crate::ws::Event::Close(_)) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    }
}

/// Connects to `target` (`on_connected` gets how long that took) and relays until either side closes or `cancel` fires; on cancel the
/// viewer gets the close `cancel_reason` returns (it knows why the session cancelled).
pub async fn run_relay<W: AsyncWrite + Unpin>(
    client: &mut ClientConn<W>,
    target: &Target,
    on_connected: impl FnOnce(Duration),
    cancel: &CancellationToken,
    cancel_reason: impl FnOnce() -> CloseReason,
    traffic: &Traffic,
    settings: RelaySettings,
) -> Outcome {
    let dialled = tokio::time::Instant::now();
    let connected = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, target.connect()) => r,
        _ = cancel.cancelled() => {
            let reason = cancel_reason();
            client.close(&reason).await;
            return Outcome { close: Some(reason), gone: None };
        }
    };
    let stream = match connected {
        Ok(Ok(stream)) => {
            on_connected(dialled.elapsed());
            stream
        }
        Ok(Err(err)) => {
            let reason = CloseReason::TargetUnreachable(format!(
                "VNC server {target} unreachable: {}",
                describe_connect_error(&err)
            ));
            client.close(&reason).await;
            return Outcome {
                close: Some(reason),
                gone: None,
            };
        }
        Err(_elapsed) => {
            let reason = CloseReason::TargetUnreachable(format!(
                "VNC server {target} unreachable: timed out"
            ));
            client.close(&reason).await;
            return Outcome {
                close: Some(reason),
                gone: None,
            };
        }
    };
    let end = match stream {
        TargetStream::Tcp(s) => {
            let (r, w) = s.into_split();
            pump(client, ReadSide::Tcp(r), w, cancel, traffic, settings).await
        }
        TargetStream::Unix(s) => {
            let (r, w) = s.into_split();
            pump(client, ReadSide::Unix(r), w, cancel, traffic, settings).await
        }
    };
    // The VNC socket is closed by now (pump owned it), so the server has its EOF already.
    let reason = match end {
        PumpEnd::ServerClosed => CloseReason::ServerClosed,
        PumpEnd::Cancelled => cancel_reason(),
        PumpEnd::ClientClosed(code) => CloseReason::ClientClosed(code),
        PumpEnd::IdleTimeout => CloseReason::IdleTimeout,
        PumpEnd::PingTimeout => CloseReason::KeepaliveTimeout,
        PumpEnd::ClientMisbehaved(err) => CloseReason::for_client_error(&err),
        PumpEnd::TargetFailed(why) => CloseReason::TargetFailed(why),
        PumpEnd::ClientGone(why) => {
            return Outcome {
                close: None,
                gone: Some(why),
            };
        }
    };
    client.close(&reason).await;
    Outcome {
        close: Some(reason),
        gone: None,
    }
}

/// Most client messages gathered into one write to the VNC server.
const GATHER_CHUNKS: usize = 64;

/// Writes `first` and then `more`, in one `writev` when the socket takes it all; returns the
/// bytes written. A lone message (the usual case) is a plain write, nothing allocated.
async fn write_all_chunks<W: AsyncWrite + Unpin>(
    w: &mut W,
    first: &[u8],
    more: &[BytesMut],
) -> io::Result<u64> {
    if more.is_empty() {
        w.write_all(first).await?;
        return Ok(first.len() as u64);
    }
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(first)
        .chain(more.iter().map(|c| &c[..]))
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    let mut total = 0u64;
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        total += n as u64;
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(total)
}

/// The latest ping payload for the writing side to answer (RFC 6455 5.5.3): a newer ping
/// replaces an older one not answered yet, and nothing queues while the writer is stuck. The
/// writer polls it on every wake-up, so that costs one atomic swap and a waker check, no lock;
/// the lock is taken only when a ping has come.
#[derive(Default)]
struct PongSlot {
    latest: std::sync::Mutex<Option<Bytes>>,
    ready: std::sync::atomic::AtomicBool,
    waker: AtomicWaker,
}

impl PongSlot {
    fn offer(&self, payload: Bytes) {
        *self.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(payload);
        self.ready.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn take(&self) -> Option<Bytes> {
        if !self.ready.swap(false, Ordering::Acquire) {
            return None;
        }
        self.latest.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn poll_take(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Bytes> {
        if let Some(p) = self.take() {
            return std::task::Poll::Ready(p);
        }
        self.waker.register(cx.waker());
        // A ping that came between the first look and the registration.
        match self.take() {
            Some(p) => std::task::Poll::Ready(p),
            None => std::task::Poll::Pending,
        }
    }
}

/// Relays until one side ends. Owns the VNC socket halves, so returning closes them. Each
/// direction is its own loop over its own socket half: no lock is taken per frame.
async fn pump<C, W>(
    client: &mut ClientConn<C>,
    mut server_rx: ReadSide,
    mut server_tx: W,
    cancel: &CancellationToken,
    traffic: &Traffic,
    settings: RelaySettings,
) -> PumpEnd
where
    C: AsyncWrite + Unpin,
    W: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let elapsed_ms = || start.elapsed().as_millis() as u64;
    let last_pong = AtomicU64::new(0);
    let last_data = AtomicU64::new(0);
    // The reading side hands the writing side the latest ping's payload to answer: a burst of
    // pings gets a pong for the most recent one (RFC 6455 5.5.3), older ones are replaced, and
    // nothing queues while the writer is stuck.
    let pong = PongSlot::default();
    let ClientConn { reader, writer } = client;

    let to_client = async {
        let mut buf = BytesMut::new();
        let mut want = MIN_READ;
        let mut ping =
            tokio::time::interval_at(start + settings.ping_interval, settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                read = server_rx.read_spare(&mut buf, want, ws::HEADROOM, SETTLE_READ) => match read {
                    Ok(0) => return PumpEnd::ServerClosed,
                    Ok(n) => {
                        last_data.store(elapsed_ms(), Ordering::Relaxed);
                        if let Err(err) = writer.send_in_place(ws::OP_BINARY, &mut buf).await {
                            return PumpEnd::ClientGone(err.to_string());
                        }
                        traffic.to_client.fetch_add(n as u64, Ordering::Relaxed);
                        if n >= want {
                            // The server has more: read more at once next time.
                            let grown = (want * 2).min(MAX_READ);
                            if grown > want {
                                // Another buffer rather than a realloc, which would copy the
                                // old one's bytes (measured: 5% of the daemon's CPU).
                                ws::spare::give(std::mem::take(&mut buf));
                                want = grown;
                            } else {
                                buf.truncate(ws::HEADROOM);
                            }
                        } else {
                            // Drained: hand the buffer to the thread's spares, whose warm
                            // memory the next reader takes. That beats hundreds of viewers
                            // each keeping a large one (measured at N=800) and a malloc and
                            // free per frame (measured at N=5000), and idle viewers hold none.
                            ws::spare::give(std::mem::take(&mut buf));
                            want = MIN_READ;
                        }
                    }
                    Err(err) => return PumpEnd::TargetFailed(format!("VNC server connection failed: {err}")),
                },
                payload = std::future::poll_fn(|cx| pong.poll_take(cx)) => {
                    if let Err(err) = writer.send(ws::OP_PONG, &payload).await {
                        return PumpEnd::ClientGone(err.to_string());
                    }
                }
                _ = ping.tick() => {
                    if let Err(err) = writer.send(ws::OP_PING, &[]).await {
                        return PumpEnd::ClientGone(err.to_string());
                    }
                }
            }
        }
    };

    let to_server = async {
        loop {
            match reader.next().await {
                Ok(Event::Data(data)) => {
                    last_data.store(elapsed_ms(), Ordering::Relaxed);
                    // Messages the client sent together (a burst of pointer events) go on in
                    // one write; all of it is in the reader's buffer already, so this is bounded.
                    let mut more = Vec::new();
                    let mut junk = None;
                    while more.len() < GATHER_CHUNKS {
                        match reader.next_buffered() {
                            Ok(Some(chunk)) => more.push(chunk),
                            Ok(None) => break,
                            Err(err) => {
                                junk = Some(err);
                                break;
                            }
                        }
                    }
                    let sent = match write_all_chunks(&mut server_tx, &data, &more).await {
                        Ok(sent) => sent,
                        Err(err) => {
                            return PumpEnd::TargetFailed(format!(
                                "VNC server connection failed: {err}"
                            ));
                        }
                    };
                    traffic.to_server.fetch_add(sent, Ordering::Relaxed);
                    if let Some(err) = junk {
                        return PumpEnd::ClientMisbehaved(err);
                    }
                }
                Ok(Event::Ping(payload)) => {
                    pong.offer(payload);
                }
                Ok(Event::Pong) => last_pong.store(elapsed_ms(), Ordering::Relaxed),
                Ok(Event::Close(code)) => return PumpEnd::ClientClosed(code),
                Err(
                    err @ (WsError::TooBig(_) | WsError::Protocol(_) | WsError::InvalidUtf8(_)),
                ) => {
                    return PumpEnd::ClientMisbehaved(err);
                }
                Err(err) => return PumpEnd::ClientGone(err.to_string()),
            }
        }
    };

    // Apart from the ping sender: a viewer that stopped reading blocks the sender in `send`, and
    // must still be dropped once it has not answered for two intervals.
    let keepalive = async {
        let limit = 2 * settings.ping_interval;
        loop {
            let since = Duration::from_millis(last_pong.load(Ordering::Relaxed));
            let deadline = start + since + limit;
            if Instant::now() >= deadline {
                return PumpEnd::PingTimeout;
            }
            tokio::time::sleep_until(deadline + Duration::from_millis(1)).await;
        }
    };

    let idle = async {
        let Some(limit) = settings.idle_timeout else {
            return std::future::pending().await;
        };
        loop {
            let since = Duration::from_millis(last_data.load(Ordering::Relaxed));
            let deadline = start + since + limit;
            if Instant::now() >= deadline {
                return PumpEnd::IdleTimeout;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };

    let outcome = tokio::select! {
        o = to_client => o,
        o = to_server => o,
        o = keepalive => o,
        o = idle => o,
        _ = cancel.cancelled() => PumpEnd::Cancelled,
    };
    // Hand EOF to the VNC server now rather than when the halves drop at return.
    let _ = server_tx.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_table_matches_the_design() {
        let table = [
            (
                CloseReason::ServerClosed,
                1000,
                "VNC server closed the connection",
            ),
            (CloseReason::SessionClosed, 1001, "session closed"),
            (CloseReason::Restarting, 1001, "vncgate restarting"),
            (CloseReason::Retargeted, 1012, "VNC target changed"),
            (CloseReason::TooManyViewers, 1013, "too many viewers"),
            (CloseReason::TokenRevoked, 1008, "token revoked"),
            (
                CloseReason::DisconnectedByOperator,
                1008,
                "disconnected by operator",
            ),
            (CloseReason::IdleTimeout, 1001, "idle timeout"),
            (CloseReason::ClientClosed(None), 1000, ""),
            (CloseReason::ClientClosed(Some(1001)), 1001, ""),
            (
                CloseReason::InvalidData("close reason is not UTF-8".into()),
                1007,
                "close reason is not UTF-8",
            ),
            (CloseReason::KeepaliveTimeout, 1001, "keepalive timeout"),
            (
                CloseReason::TargetUnreachable(
                    "VNC server 127.0.0.1:5901 unreachable: connection refused".into(),
                ),
                1011,
                "VNC server 127.0.0.1:5901 unreachable: connection refused",
            ),
            (
                CloseReason::MessageTooBig("message too big".into()),
                1009,
                "message too big",
            ),
        ];
        for (reason, code, text) in table {
            assert_eq!((reason.code(), reason.reason()), (code, text), "{reason:?}");
        }
    }
}
