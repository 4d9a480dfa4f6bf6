//! A viewer that stops reading must stall the VNC server, not grow the daemon.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{DaemonProcess, FakeVnc, GREETING, Mode, bounded, rss_kib};
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
        let first = ws.next().await.expect("frame").expect("ok").into_data();
        assert_eq!(&first[..GREETING.len().min(first.len())], &GREETING[..first.len().min(GREETING.len())]);

        // Stalled = no progress of the VNC server's writes for a whole second.
        let mut last = u64::MAX;
        let mut still_since = tokio::time::Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
        loop {
            let now_written = fake.written.load(Ordering::SeqCst);
            if now_written != last {
                last = now_written;
                still_since = tokio::time::Instant::now();
            } else if still_since.elapsed() >= Duration::from_secs(1) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "the VNC server's writes never blocked");
            assert!(now_written < STREAM, "all 256 MiB went out: nothing pushed back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rss_after = rss_kib(daemon.pid());
        let grown = rss_after.saturating_sub(rss_before);
        eprintln!(
            "backpressure: target wrote {} KiB before blocking; daemon RSS {rss_before} -> {rss_after} KiB",
            last / 1024
        );
        assert!(last < STREAM);
        assert!(grown < 8 * 1024, "daemon RSS grew by {grown} KiB");
        drop(ws);
    })
    .await;
}
