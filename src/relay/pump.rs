//! The relay's pump: both directions of one viewer's connection, its keepalive and idle
//! timers, until one side ends.

use super::*;

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
pub(super) async fn pump<C, W>(
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
        // The last read was a stream's (not a key press's echo): read the next one straight
        // into a buffer of its own instead of through the 4 KiB scratch first. At 5000
        // streaming sessions each read drains the socket, and the split cost a second
        // recvfrom per chunk (32 against the TCP relay's 17 per MB).
        let mut streaming = false;
        let mut ping =
            tokio::time::interval_at(start + settings.ping_interval, settings.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                read = server_rx.read_lazy(&mut buf, want, ws::HEADROOM, SETTLE_READ, !streaming) => match read {
                    Ok(0) => return PumpEnd::ServerClosed,
                    Ok(n) => {
                        last_data.store(elapsed_ms(), Ordering::Relaxed);
                        streaming = n >= SETTLE_READ;
                        if let Err(err) = writer.send_in_place(ws::OP_BINARY, &mut buf).await {
                            return PumpEnd::ClientGone(err.to_string());
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
