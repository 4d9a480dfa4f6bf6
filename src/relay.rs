//! The WebSocket <-> VNC byte relay with backpressure, and the VNC target it connects to.
//!
//! Each direction reads, then awaits the write of what it read before reading again, so a
//! side that stops reading stalls the other side's socket instead of growing a buffer here.

use std::fmt;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream, tcp};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::ws::{self, Event, FrameReader, FrameWriter, ReadSide, WsError};

/// How long connecting to a VNC server may take before the viewer is told it is unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First read from the VNC server after a quiet spell; doubles while reads fill the buffer.
const MIN_READ: usize = 32 * 1024;
/// Largest read, so largest frame: a full-screen update goes out in few frames and syscalls,
/// and a viewer that stopped reading holds at most this much here.
const MAX_READ: usize = 256 * 1024;
/// VNC client messages are small; clipboard text is the largest. A bigger frame is junk.
pub const MAX_CLIENT_FRAME: u64 = 4 << 20;
/// How long a close frame may take to go out before the connection is simply dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Where a session's WebSocket goes: a VNC server over TCP or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host` is kept without brackets; IPv6 literals get them back in [`fmt::Display`].
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// Why a target string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid target {input:?}: {reason}")]
pub struct TargetError {
    pub input: String,
    pub reason: &'static str,
}

impl std::str::FromStr for Target {
    type Err = TargetError;

    /// `host:port`, `[v6]:port` (port 1-65535) or `unix:/absolute/path`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| TargetError {
            input: s.to_owned(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(err(
                    "a unix target needs an absolute path: unix:/path/to/socket",
                ));
            }
            if path.contains('\0') {
                return Err(err("the socket path contains a NUL byte"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or_else(|| err("expected [IPv6]:port"))?;
            if v6.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(err("the part in brackets is not an IPv6 address"));
            }
            (v6, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| err("missing port: expected host:port"))?;
            if host.contains(':') {
                return Err(err("an IPv6 address needs brackets: [::1]:5900"));
            }
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_');
            if !valid {
                return Err(err("the host must be a host name or IP address"));
            }
            (host, port)
        };
        let port = match port.parse::<u16>() {
            Ok(p) if p >= 1 => p,
            _ => return Err(err("the port must be a number from 1 to 65535")),
        };
        Ok(Target::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A connected VNC server.
enum TargetStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Target {
    async fn connect(&self) -> io::Result<TargetStream> {
        match self {
            Target::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                // VNC is interactive: a key press must not wait for Nagle.
                stream.set_nodelay(true)?;
                Ok(TargetStream::Tcp(stream))
            }
            Target::Unix(path) => Ok(TargetStream::Unix(UnixStream::connect(path).await?)),
        }
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

/// How a relay ended, for the log.
#[derive(Debug)]
pub enum Outcome {
    /// The VNC server closed its side.
    ServerClosed,
    /// The viewer sent a close frame.
    ClientClosed,
    /// The viewer's connection broke or it sent something that is not WebSocket.
    ClientGone(String),
    /// The viewer sent a message over [`MAX_CLIENT_MESSAGE`] or broke the protocol.
    ClientMisbehaved(String),
    /// Session closed, retargeted or daemon shutting down.
    Cancelled,
    PingTimeout,
    IdleTimeout,
    Unreachable(String),
    TargetFailed(String),
}

/// Text of a connect error as a person reads it in a close reason.
fn describe_connect_error(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::NotFound => "no such socket".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => err.to_string(),
    }
}

/// A viewer's WebSocket, after the upgrade.
pub struct ClientConn {
    pub reader: FrameReader,
    pub writer: FrameWriter<tcp::OwnedWriteHalf>,
}

impl ClientConn {
    /// Sends a close frame (if the connection still takes one) within [`CLOSE_GRACE`].
    pub async fn close(&mut self, code: u16, reason: &str) {
        let _ = tokio::time::timeout(CLOSE_GRACE, self.writer.close(code, reason)).await;
    }
}

/// Connects to `target` and relays until either side closes or `cancel` fires; on cancel the
/// viewer gets the close frame `cancel_frame` returns (it knows why the session cancelled).
pub async fn run_relay(
    mut client: ClientConn,
    target: &Target,
    cancel: &CancellationToken,
    cancel_frame: impl FnOnce() -> (u16, &'static str),
    traffic: &Traffic,
    settings: RelaySettings,
) -> Outcome {
    let connected = tokio::select! {
        r = tokio::time::timeout(CONNECT_TIMEOUT, target.connect()) => r,
        _ = cancel.cancelled() => {
            let (code, reason) = cancel_frame();
            client.close(code, reason).await;
            return Outcome::Cancelled;
        }
    };
    let stream = match connected {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => {
            let why = format!(
                "VNC server {target} unreachable: {}",
                describe_connect_error(&err)
            );
            client.close(1011, &why).await;
            return Outcome::Unreachable(why);
        }
        Err(_elapsed) => {
            let why = format!("VNC server {target} unreachable: timed out");
            client.close(1011, &why).await;
            return Outcome::Unreachable(why);
        }
    };
    let outcome = match stream {
        TargetStream::Tcp(s) => {
            let (r, w) = s.into_split();
            pump(&mut client, ReadSide::Tcp(r), w, cancel, traffic, settings).await
        }
        TargetStream::Unix(s) => {
            let (r, w) = s.into_split();
            pump(&mut client, ReadSide::Unix(r), w, cancel, traffic, settings).await
        }
    };
    // The VNC socket is closed by now (pump owned it), so the server has its EOF already.
    match &outcome {
        Outcome::ServerClosed => client.close(1000, "VNC server closed the connection").await,
        Outcome::Cancelled => {
            let (code, reason) = cancel_frame();
            client.close(code, reason).await;
        }
        // The reply to the viewer's own close frame.
        Outcome::ClientClosed => client.close(1000, "").await,
        Outcome::IdleTimeout => client.close(1001, "idle timeout").await,
        Outcome::PingTimeout => client.close(1001, "keepalive timeout").await,
        Outcome::ClientMisbehaved(why) => {
            let code = if why.starts_with("message too big") {
                1009
            } else {
                1002
            };
            client.close(code, why).await;
        }
        Outcome::TargetFailed(why) => client.close(1011, why).await,
        Outcome::ClientGone(_) | Outcome::Unreachable(_) => {}
    }
    outcome
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

/// Control frames the reading side asks the writing side to send.
enum Control {
    Pong(Bytes),
}

/// Relays until one side ends. Owns the VNC socket halves, so returning closes them. Each
/// direction is its own loop over its own socket half: no lock is taken per frame.
async fn pump<W>(
    client: &mut ClientConn,
    mut server_rx: ReadSide,
    mut server_tx: W,
    cancel: &CancellationToken,
    traffic: &Traffic,
    settings: RelaySettings,
) -> Outcome
where
    W: AsyncWrite + Unpin,
{
    let start = Instant::now();
    let elapsed_ms = || start.elapsed().as_millis() as u64;
    let last_pong = AtomicU64::new(0);
    let last_data = AtomicU64::new(0);
    // Pongs are advisory: if the writer is stuck, extra ones are dropped rather than queued.
    let (control_tx, mut control_rx) = mpsc::channel::<Control>(4);
    let ClientConn { reader, writer } = client;

    let to_client = async {
        let mut buf = BytesMut::new();
        let mut want = MIN_READ;
        let mut ping =
            tokio::time::interval_at(start + settings.ping_interval, settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                read = server_rx.read_lazy(&mut buf, want, ws::HEADROOM) => match read {
                    Ok(0) => return Outcome::ServerClosed,
                    Ok(n) => {
                        last_data.store(elapsed_ms(), Ordering::Relaxed);
                        if let Err(err) = writer.send_in_place(ws::OP_BINARY, &mut buf).await {
                            return Outcome::ClientGone(err.to_string());
                        }
                        traffic.to_client.fetch_add(n as u64, Ordering::Relaxed);
                        if n >= want {
                            // The server has more: read more at once next time.
                            let grown = (want * 2).min(MAX_READ);
                            if grown > want {
                                // A new buffer rather than a realloc, which would copy the
                                // old one's bytes (measured: 5% of the daemon's CPU).
                                buf = BytesMut::new();
                                want = grown;
                            } else {
                                buf.truncate(ws::HEADROOM);
                            }
                        } else {
                            // Drained: give the buffer back. malloc hands the same warm block
                            // to the next reader, which beats hundreds of viewers each keeping
                            // a large one (measured at N=800), and idle viewers hold none.
                            buf = BytesMut::new();
                            want = MIN_READ;
                        }
                    }
                    Err(err) => return Outcome::TargetFailed(format!("VNC server connection failed: {err}")),
                },
                Some(Control::Pong(payload)) = control_rx.recv() => {
                    if let Err(err) = writer.send(ws::OP_PONG, &payload).await {
                        return Outcome::ClientGone(err.to_string());
                    }
                }
                _ = ping.tick() => {
                    if let Err(err) = writer.send(ws::OP_PING, &[]).await {
                        return Outcome::ClientGone(err.to_string());
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
                            return Outcome::TargetFailed(format!(
                                "VNC server connection failed: {err}"
                            ));
                        }
                    };
                    traffic.to_server.fetch_add(sent, Ordering::Relaxed);
                    if let Some(err) = junk {
                        return Outcome::ClientMisbehaved(err.to_string());
                    }
                }
                Ok(Event::Ping(payload)) => {
                    let _ = control_tx.try_send(Control::Pong(payload));
                }
                Ok(Event::Pong) => last_pong.store(elapsed_ms(), Ordering::Relaxed),
                Ok(Event::Close(_)) => return Outcome::ClientClosed,
                Err(err @ (WsError::TooBig(_) | WsError::Protocol(_))) => {
                    return Outcome::ClientMisbehaved(err.to_string());
                }
                Err(err) => return Outcome::ClientGone(err.to_string()),
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
                return Outcome::PingTimeout;
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
                return Outcome::IdleTimeout;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };

    let outcome = tokio::select! {
        o = to_client => o,
        o = to_server => o,
        o = keepalive => o,
        o = idle => o,
        _ = cancel.cancelled() => Outcome::Cancelled,
    };
    // Hand EOF to the VNC server now rather than when the halves drop at return.
    let _ = server_tx.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_display() {
        let ok = [
            ("127.0.0.1:5901", "127.0.0.1:5901"),
            ("vm-host.example:5900", "vm-host.example:5900"),
            ("[::1]:5900", "[::1]:5900"),
            ("unix:/run/vnc/a.sock", "unix:/run/vnc/a.sock"),
            ("localhost:65535", "localhost:65535"),
        ];
        for (input, shown) in ok {
            let t: Target = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(t.to_string(), shown);
        }
        let bad = [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            ":5900",
            "::1:5900",
            "[::1]",
            "[nothost]:5900",
            "unix:",
            "unix:relative.sock",
            "a b:5900",
            "host:port",
            "",
        ];
        for input in bad {
            assert!(
                input.parse::<Target>().is_err(),
                "{input} should be refused"
            );
        }
    }
}
