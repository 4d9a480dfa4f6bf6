//! Every phase of a connection has a deadline (DESIGN.md "Access control"), on session ports and
//! the API alike: request headers, an idle keep-alive, a request body, a response write.
//! Timed on a paused tokio clock: the runtime skips ahead whenever everything waits.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{FakeVnc, Mode, TestGate};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use vncgate::http::{BODY_READ_TIMEOUT, HEADER_READ_TIMEOUT, WRITE_TIMEOUT};

/// Reads until EOF on the paused clock; returns the bytes and when EOF came. For an end the
/// daemon's own timer brings: while this waits, the runtime jumps to the next timer.
async fn read_to_eof(s: &mut TcpStream) -> (Vec<u8>, Instant) {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(300), s.read_to_end(&mut all))
        .await
        .expect("the daemon closed the connection");
    (all, Instant::now())
}

/// Reads until EOF on a blocking thread, bounded in real time, with the paused clock held
/// still meanwhile: for bytes the kernel is still moving after the daemon closed (a tokio
/// timeout would jump ahead while they are in flight) or a close that needs no timer.
async fn drain(s: &TcpStream) -> Vec<u8> {
    use std::os::fd::AsFd;
    // A duplicate of the socket; `s` stays open and owned by the caller.
    let std_stream = std::net::TcpStream::from(
        s.as_fd()
            .try_clone_to_owned()
            .expect("duplicate the socket"),
    );
    std_stream.set_nonblocking(false).expect("blocking");
    std_stream
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .expect("read timeout");
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut all = Vec::new();
        let mut reader = &std_stream;
        // A reset ends it too: the daemon closed with requests of ours still unread.
        if let Err(e) = reader.read_to_end(&mut all)
            && e.kind() != std::io::ErrorKind::ConnectionReset
        {
            panic!(
                "the connection did not end within 20 s ({} bytes read): {e}",
                all.len()
            );
        }
        all
    })
    .await
    .expect("reader thread")
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
async fn an_api_body_that_trickles_is_refused_after_the_body_timeout() {
    let gate = TestGate::start(2).await;
    let mut s = TcpStream::connect(gate.api).await.expect("connect");
    s.write_all(b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n")
        .await
        .expect("send");
    let start = Instant::now();
    let mut answer = vec![0u8; 4096];
    // One body byte every 4 s: each arrives well within any per-chunk timeout.
    let n = loop {
        tokio::select! {
            n = s.read(&mut answer) => break n.unwrap_or(0),
            _ = tokio::time::sleep(Duration::from_secs(4)) => {
                s.write_all(b" ").await.expect("trickle");
            }
        }
    };
    let text = String::from_utf8_lossy(&answer[..n]);
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_near("trickled body", start.elapsed(), BODY_READ_TIMEOUT);
}

/// One `GET /novnc/core/rfb.js` read whole: its size.
async fn asset_size(addr: SocketAddr) -> usize {
    let mut one = TcpStream::connect(addr).await.expect("connect");
    one.write_all(
        b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await
    .expect("send");
    let single = drain(&one).await;
    assert!(single.starts_with(b"HTTP/1.1 200"), "rfb.js is served");
    single.len()
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_a_page_asset_is_dropped() {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let addr = session_port(&gate, &fake).await;
    let single = asset_size(addr).await;

    // 300 pipelined requests, and nothing read for a while: far more than the socket buffers
    // hold, so the daemon's writes block.
    let request = b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut s = TcpStream::connect(addr).await.expect("connect");
    tokio::time::timeout(Duration::from_secs(1), s.write_all(&request.repeat(300)))
        .await
        .expect("the requests fit in the socket buffers")
        .expect("send");
    tokio::time::sleep(WRITE_TIMEOUT + Duration::from_secs(5)).await;
    let got = drain(&s).await;
    let answers = got.windows(15).filter(|w| w == b"HTTP/1.1 200 OK").count();
    eprintln!(
        "stalled client got {} bytes, {answers} answers begun",
        got.len()
    );
    assert!(answers >= 1, "the first answer began");
    assert!(
        got.len() < single * 300,
        "the daemon kept the stalled connection: {} bytes of {}",
        got.len(),
        single * 300
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_reads_a_page_asset_too_slowly_is_dropped() {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let addr = session_port(&gate, &fake).await;
    let single = asset_size(addr).await;
    // A small receive buffer, so the kernel cannot take the whole answer off the daemon.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut s = socket.connect(addr).await.expect("connect");
    // 100 answers in a row (12 MB): more than the kernel's buffers can take off the daemon.
    let request = b"GET /novnc/core/rfb.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    s.write_all(&request.repeat(100)).await.expect("send");
    let start = Instant::now();
    // 100 bytes a second: progress all the time, yet far too slow for a 120 KiB asset.
    let mut got = 0usize;
    let mut piece = [0u8; 100];
    while start.elapsed() < WRITE_TIMEOUT + Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match s.read(&mut piece).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    // Whatever the kernel still holds, then the end: the daemon gave up on this answer.
    got += drain(&s).await.len();
    eprintln!("slow reader got {got} of {} bytes", single * 100);
    assert!(
        got < single * 100,
        "every answer ({} bytes) arrived: the daemon kept writing past its deadline",
        single * 100
    );
}
