//! Every phase of a connection has a deadline (DESIGN.md "Access control"), on session ports and
//! the API alike: request headers, an idle keep-alive, a request body, a stalled response write.
//! Timed on a paused tokio clock: the runtime skips ahead whenever everything waits.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{FakeVnc, Mode, TestGate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use vncgate::http::{BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT, WRITE_STALL_TIMEOUT};

/// Reads until EOF; returns the bytes and when EOF came.
async fn read_to_eof(s: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(300), s.read_to_end(&mut all))
        .await
        .expect("the daemon closed the connection");
    (all, Instant::now())
}

async fn session_port(gate: &TestGate, fake: &FakeVnc) -> SocketAddr {
    let session = gate.open_ok("vm-deadline", &fake.target).await;
    let port = session["ws_port"].as_u64().expect("ws_port") as u16;
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn assert_near(what: &str, took: Duration, limit: Duration) {
    assert!(
        took >= limit && took < limit + Duration::from_secs(2),
        "{what}: closed after {took:?}, the deadline is {limit:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    for addr in [session_port(&gate, &fake).await, gate.api] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .await
            .expect("send");
        let start = Instant::now();
        let (answer, at) = read_to_eof(&mut s).await;
        assert!(answer.starts_with(b"HTTP/1.1 "), "{addr}: an answer first");
        assert_near(
            &format!("{addr} keep-alive idle"),
            at - start,
            HEADER_READ_TIMEOUT,
        );
    }
}

#[tokio::test(start_paused = true)]
async fn headers_that_trickle_are_cut_off_at_the_header_timeout() {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    for addr in [session_port(&gate, &fake).await, gate.api] {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\n").await.expect("send");
        let start = Instant::now();
        let trickle = async {
            // One header byte a second, forever: slowloris.
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if s.write_all(b"X").await.is_err() {
                    break;
                }
                let mut probe = [0u8; 1];
                if let Ok(Ok(0)) =
                    tokio::time::timeout(Duration::from_millis(1), s.read(&mut probe)).await
                {
                    break;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), trickle)
            .await
            .expect("the trickling client was cut off");
        assert_near(
            &format!("{addr} trickle"),
            start.elapsed(),
            HEADER_READ_TIMEOUT,
        );
    }
}

#[tokio::test(start_paused = true)]
async fn an_api_body_that_never_arrives_is_refused_after_the_body_timeout() {
    let gate = TestGate::start(2).await;
    let mut s = TcpStream::connect(gate.api).await.expect("connect");
    s.write_all(
        b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n{\"vm_id\"",
    )
    .await
    .expect("send");
    let start = Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(60), s.read(&mut answer))
        .await
        .expect("an answer or a close")
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("invalid_request"), "{text}");
    assert_near("body", start.elapsed(), BODY_READ_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_page_asset_is_dropped() {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let addr = session_port(&gate, &fake).await;
    // The size of one answer, read normally.
    let request = b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut one = TcpStream::connect(addr).await.expect("connect");
    one.write_all(&request[..request.len() - 2])
        .await
        .expect("send");
    one.write_all(b"Connection: close\r\n\r\n")
        .await
        .expect("send");
    let (single, _) = read_to_eof(&mut one).await;
    assert!(single.starts_with(b"HTTP/1.1 200"), "rfb.js is served");

    // 300 pipelined requests, and nothing read: far more than the socket buffers hold.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let pipelined = request.repeat(300);
    let writer = s.write_all(&pipelined);
    // The daemon stops reading requests once its answers back up; that is fine.
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    let start = Instant::now();
    tokio::time::sleep(WRITE_STALL_TIMEOUT + Duration::from_secs(5)).await;
    let (got, _) = read_to_eof(&mut s).await;
    eprintln!(
        "stalled client got {} of {} bytes",
        got.len(),
        single.len() * 300
    );
    assert!(start.elapsed() >= WRITE_STALL_TIMEOUT);
    assert!(
        got.len() < single.len() * 300,
        "the daemon kept the stalled connection: {} bytes of {}",
        got.len(),
        single.len() * 300
    );
}
