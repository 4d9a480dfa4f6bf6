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

mod pump;
use pump::pump;

/// Connects that failed for want of descriptors, logged once a minute.
static DESCRIPTOR_ERRORS: crate::access::Throttle = crate::access::Throttle::new();

/// First read from the VNC server after a quiet spell; doubles while reads fill the buffer.
const MIN_READ: usize = 32 * 1024;
/// A read from the VNC server shorter than this drained it (an interactive reply, not a
/// stream): the next read waits for epoll rather than trying at once.
const SETTLE_READ: usize = 4 * 1024;
/// Largest read, so largest frame: a full-screen update goes out in few frames and syscalls,
/// and a viewer that stopped reading holds at most this much here.
pub(crate) const MAX_READ: usize = 256 * 1024;
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
    /// 1007: text that must be UTF-8 (a text message, a close reason) is not.
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
    /// frame over the limit, 1007 for non-UTF-8 text or close reason, 1002 for any other breach of
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
        Ok(Err(err)) if crate::target::out_of_descriptors(&err) => {
            // Not the VNC server's fault: say whose it is, so nobody chases a healthy VM. The
            // reason leads with that (close reasons are cut at 123 bytes); the advice is logged,
            // once a minute at most, since every viewer fails at once then.
            let reason = CloseReason::TargetUnreachable(format!(
                "vncgate is out of file descriptors; VNC server {target} was not tried"
            ));
            if let Some(held_back) = DESCRIPTOR_ERRORS.ready(Duration::from_secs(60)) {
                tracing::error!(%target, %err, held_back, "out of file descriptors connecting to a VNC server: raise the open-files limit (LimitNOFILE=) or lower --max-connections");
            }
            client.close(&reason).await;
            return Outcome {
                close: Some(reason),
                gone: None,
            };
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

#[cfg(test)]
mod tests;
