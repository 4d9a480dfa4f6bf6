//! A viewer that stops reading must stall the VNC server, not grow the daemon.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::tls::{KeyKind, TestCa, connect, port_of};
use common::{DaemonProcess, FakeVnc, GREETING, Mode, StateDir, bounded, rss_kib};
use futures_util::StreamExt;
use tokio_tungstenite::connect_async;

const STREAM: u64 = 256 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_blocks_the_target_not_the_daemon() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Stream(STREAM)).await;
        let daemon = DaemonProcess::spawn(2, &[]).await;
        let session = daemon.open_ok("vm-flood", &fake.target).await;
        let rss_before = rss_kib(daemon.pid());
        let (mut ws, _) = connect_async(session["ws_url"].as_str().expect("ws_url"))
            .await
            .expect("connect");
        // Read just the first frame, then never again.
        read_greeting_frame(&mut ws).await;
        stalls_without_growing("backpressure", &fake, &daemon, rss_before).await;
        drop(ws);
    })
    .await;
}

/// Reads one frame and checks it starts the RFB greeting (or is a prefix of it).
async fn read_greeting_frame<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let first = ws.next().await.expect("frame").expect("ok").into_data();
    let n = first.len().min(GREETING.len());
    assert_eq!(&first[..n], &GREETING[..n]);
}

/// The viewer has stopped reading: the VNC server's writes must stall, and the daemon's RSS
/// must have grown by less than 8 MiB since `rss_before` (KiB).
async fn stalls_without_growing(
    label: &str,
    fake: &FakeVnc,
    daemon: &DaemonProcess,
    rss_before: u64,
) {
    let last = wait_until_stalled(fake).await;
    let rss_after = rss_kib(daemon.pid());
    let grown = rss_after.saturating_sub(rss_before);
    eprintln!(
        "{label}: target wrote {} KiB before blocking; daemon RSS {rss_before} -> {rss_after} KiB",
        last / 1024
    );
    assert!(grown < 8 * 1024, "daemon RSS grew by {grown} KiB");
}

/// Waits (40 s at most) until the VNC server's writes make no progress for a whole second:
/// the viewer's stall has reached it. Returns the bytes it wrote; panics if it never blocked.
async fn wait_until_stalled(fake: &FakeVnc) -> u64 {
    let mut last = u64::MAX;
    let mut still_since = tokio::time::Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let now_written = fake.written.load(Ordering::SeqCst);
        if now_written != last {
            last = now_written;
            still_since = tokio::time::Instant::now();
        } else if still_since.elapsed() >= Duration::from_secs(1) {
            return last;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the VNC server's writes never blocked"
        );
        assert!(
            now_written < STREAM,
            "all 256 MiB went out: nothing pushed back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The same over TLS: rustls queues at most one whole frame per viewer (the daemon raises its
/// 64 KiB default so a frame goes out in one write), and past that the VNC server stalls and
/// the daemon does not grow. This guards the queue's bound: with no limit rustls would take
/// every byte and the VNC server would never block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_never_reads_blocks_the_target_not_the_daemon() {
    bounded(Duration::from_secs(60), async {
        let ca = TestCa::new("backpressure");
        let dir = StateDir::new();
        let (cert, key) = ca.leaf_with(KeyKind::EcdsaPkcs8).write(&dir.0, &ca);
        let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
        let fake = FakeVnc::tcp(Mode::Stream(STREAM)).await;
        let daemon = DaemonProcess::spawn(2, &["--cert", &cert, "--key", &key]).await;
        let session = daemon.open_ok("vm-tls-flood", &fake.target).await;
        let ws_url = session["ws_url"].as_str().expect("ws_url");
        assert!(ws_url.starts_with("wss://"), "{ws_url}");
        let rss_before = rss_kib(daemon.pid());
        let port = port_of(ws_url);
        let mut client = (*ca.client_config()).clone();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        let tls = connect(SocketAddr::from(([127, 0, 0, 1], port)), Arc::new(client))
            .await
            .expect("TLS handshake");
        let (mut ws, _) = tokio_tungstenite::client_async(ws_url, tls)
            .await
            .expect("websocket over TLS");
        read_greeting_frame(&mut ws).await;
        stalls_without_growing("TLS backpressure", &fake, &daemon, rss_before).await;
        drop(ws);
    })
    .await;
}
