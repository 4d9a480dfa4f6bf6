//! The relay end to end: a real WebSocket client, the daemon, and a fake VNC server, all on loopback.

mod common;

use common::close_of;
use vncgate::relay::CloseReason;

use std::time::{Duration, Instant};

use common::{Event, FakeVnc, GREETING, Lcg, Mode, TestGate, bounded};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

const TEN_MIB: usize = 10 << 20;

async fn connect(ws_url: &str) -> Ws {
    connect_async(ws_url).await.expect("websocket connects").0
}

/// Sends 10 MiB in random-sized messages while reading the echo; asserts it is byte-exact.
async fn echo_ten_mib(target_kind: &str, fake: FakeVnc) {
    echo(target_kind, fake, TEN_MIB, 65_536, 1).await;
}

/// Sends `total` bytes in messages of 1..=`max_message` bytes, flushing every `batch` messages
/// (so that many arrive in one segment), while reading the echo; asserts it is byte-exact and
/// that the session's counters agree.
async fn echo(target_kind: &str, fake: FakeVnc, total: usize, max_message: usize, batch: usize) {
    let gate = TestGate::start(4).await;
    let session = gate.open_ok("vm-echo", &fake.target).await;
    let ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
    let (mut tx, mut rx) = ws.split();
    let mut rng = Lcg(0x5eed ^ target_kind.len() as u64);
    let payload = rng.bytes(total);
    let sizes: Vec<usize> = {
        let mut v = Vec::new();
        let mut left = total;
        while left > 0 {
            let n = (1 + rng.next() as usize % max_message).min(left);
            v.push(n);
            left -= n;
        }
        v
    };
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        for (i, n) in sizes.into_iter().enumerate() {
            tx.feed(Message::binary(to_send[at..at + n].to_vec()))
                .await
                .expect("send");
            if (i + 1) % batch == 0 {
                tx.flush().await.expect("flush");
            }
            at += n;
        }
        tx.flush().await.expect("flush");
        tx
    });
    let mut received = Vec::with_capacity(total + GREETING.len());
    while received.len() < total + GREETING.len() {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => received.extend_from_slice(&b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!(
                "{target_kind}: unexpected {other:?} after {} bytes",
                received.len()
            ),
        }
    }
    let _tx = writer.await.expect("writer");
    assert_eq!(
        &received[..GREETING.len()],
        GREETING,
        "{target_kind}: greeting"
    );
    assert!(
        received[GREETING.len()..] == payload[..],
        "{target_kind}: echo differs"
    );
    // The relay counts a write once it returns; the client may read the bytes a moment
    // before that, so the counters are read once they have caught up (or the deadline passed).
    let want = (total + GREETING.len()) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let session = loop {
        let (_, session) = gate.call("GET", "/v1/sessions/vm-echo", None).await;
        if session["bytes_to_client"] == want && session["bytes_to_server"] == total as u64
            || tokio::time::Instant::now() >= deadline
        {
            break session;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(session["bytes_to_server"], total as u64, "{session}");
    assert_eq!(session["bytes_to_client"], (total + GREETING.len()) as u64);
    assert_eq!(session["connections"], 1);
    assert_eq!(session["viewers"][0]["bytes_to_server"], total as u64);
}

/// Bursts of small messages (pointer events, typing) that the relay gathers into one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_small_messages_arrive_byte_exact() {
    bounded(
        Duration::from_secs(120),
        echo("burst", FakeVnc::tcp(Mode::Echo).await, 2 << 20, 100, 300),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_each_way_over_tcp() {
    bounded(
        Duration::from_secs(120),
        echo_ten_mib("tcp", FakeVnc::tcp(Mode::Echo).await),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_each_way_over_unix_socket() {
    let fake = FakeVnc::unix(Mode::Echo).await;
    assert!(fake.target.starts_with("unix:/"));
    bounded(Duration::from_secs(120), echo_ten_mib("unix", fake)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_mib_each_way_over_ipv6_target() {
    let fake = FakeVnc::tcp6(Mode::Echo).await;
    assert!(fake.target.starts_with("[::1]:"));
    bounded(Duration::from_secs(120), echo_ten_mib("ipv6", fake)).await;
}

/// The HTTP status of a refused upgrade.
fn refused_status(err: WsError) -> u16 {
    match err {
        WsError::Http(response) => response.status().as_u16(),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn token_is_required_before_any_upgrade() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-token", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("port");
        let token = session["token"].as_str().expect("token");
        let cases = [
            format!("ws://127.0.0.1:{port}/websockify"),
            format!("ws://127.0.0.1:{port}/websockify?token="),
            format!("ws://127.0.0.1:{port}/websockify?token=wrong"),
            format!("ws://127.0.0.1:{port}/websockify?token={}x", token),
            format!(
                "ws://127.0.0.1:{port}/websockify?token={}",
                &token[..token.len() - 1]
            ),
        ];
        for url in cases {
            let err = connect_async(url.as_str())
                .await
                .expect_err("must be refused");
            assert_eq!(refused_status(err), 403, "{url}");
        }
        assert_eq!(
            fake.accepted.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no connection to the target"
        );
        // The page's explanation endpoint agrees.
        let http = &gate.http;
        let base = format!("127.0.0.1:{port}").parse().expect("addr");
        let (status, body) =
            common::api_call(http, base, "GET", "/session?token=wrong", None).await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (403, Some("forbidden"))
        );
        let (status, body) =
            common::api_call(http, base, "GET", &format!("/session?token={token}"), None).await;
        assert_eq!((status, body["vm_id"].as_str()), (200, Some("vm-token")));
        // The right token connects.
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        let first = ws.next().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().as_ref(), GREETING);
    })
    .await;
}

#[tokio::test]
async fn subprotocol_negotiation() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-proto", &fake.target).await;
        let url = session["ws_url"].as_str().expect("ws_url");
        let offer = |p: Option<&'static str>| {
            let mut req = url.into_client_request().expect("request");
            if let Some(p) = p {
                req.headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
            }
            req
        };
        let (_, response) = connect_async(offer(None)).await.expect("no protocol");
        assert!(response.headers().get("sec-websocket-protocol").is_none());
        let (_, response) = connect_async(offer(Some("binary"))).await.expect("binary");
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.as_bytes()),
            Some(&b"binary"[..])
        );
        let (_, response) = connect_async(offer(Some("base64, binary")))
            .await
            .expect("base64, binary");
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.as_bytes()),
            Some(&b"binary"[..])
        );
        let err = connect_async(offer(Some("base64")))
            .await
            .expect_err("base64 only");
        match err {
            WsError::Http(response) => {
                assert_eq!(response.status().as_u16(), 400);
                let body = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default())
                    .into_owned();
                assert!(body.contains("base64"), "{body}");
            }
            other => panic!("expected 400, got {other:?}"),
        }
    })
    .await;
}

/// The next close frame, skipping data; with how long it took.
async fn next_close(ws: &mut Ws, limit: Duration) -> (Option<CloseFrame>, Duration) {
    let start = Instant::now();
    let frame = bounded(limit, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("connection ended without a close frame: {other:?}"),
            }
        }
    })
    .await;
    (frame, start.elapsed())
}

fn code_and_reason(frame: &Option<CloseFrame>) -> (u16, String) {
    let f = frame.as_ref().expect("close frame with a code");
    (u16::from(f.code), f.reason.to_string())
}

#[tokio::test]
async fn unreachable_target_closes_with_1011_and_the_reason() {
    bounded(Duration::from_secs(30), async {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let target = format!("127.0.0.1:{port}");
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-gone", &target).await;
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        let (frame, _) = next_close(&mut ws, Duration::from_secs(6)).await;
        assert_eq!(
            code_and_reason(&frame),
            (
                1011,
                format!("VNC server {target} unreachable: connection refused")
            )
        );
        let session = gate
            .open_ok("vm-gone-unix", "unix:/nonexistent/vnc.sock")
            .await;
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        let (frame, _) = next_close(&mut ws, Duration::from_secs(6)).await;
        let (code, reason) = code_and_reason(&frame);
        assert_eq!(code, 1011);
        assert!(
            reason.starts_with("VNC server unix:/nonexistent/vnc.sock unreachable"),
            "{reason}"
        );
    })
    .await;
}

#[tokio::test]
async fn server_close_reaches_the_client_within_a_second() {
    bounded(Duration::from_secs(30), async {
        let mut fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-srv-close", &fake.target).await;
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        assert_eq!(
            fake.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        let first = ws.next().await.expect("frame").expect("ok");
        assert_eq!(first.into_data().as_ref(), GREETING);
        fake.drop_all.cancel();
        let (frame, took) = next_close(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(code_and_reason(&frame), close_of(CloseReason::ServerClosed));
        assert!(took < Duration::from_secs(1), "close took {took:?}");
    })
    .await;
}

#[tokio::test]
async fn client_close_and_drop_reach_the_server_within_a_second() {
    bounded(Duration::from_secs(30), async {
        let mut fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-cli-close", &fake.target).await;
        let url = session["ws_url"].as_str().expect("ws_url").to_owned();

        // A clean close frame.
        let mut ws = connect(&url).await;
        assert_eq!(
            fake.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        ws.next().await.expect("greeting").expect("ok");
        ws.send(Message::binary(b"hello".to_vec()))
            .await
            .expect("send");
        ws.next().await.expect("echo").expect("ok");
        let start = Instant::now();
        ws.close(None).await.expect("close");
        assert_eq!(
            fake.next_event(Duration::from_secs(1)).await,
            Some(Event::Eof(5))
        );
        assert!(start.elapsed() < Duration::from_secs(1));

        // A dropped TCP connection, no close frame.
        let ws = connect(&url).await;
        assert_eq!(
            fake.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        let start = Instant::now();
        drop(ws);
        assert_eq!(
            fake.next_event(Duration::from_secs(1)).await,
            Some(Event::Eof(0))
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        // The viewer records are gone as well.
        let gone = common::wait_until(Duration::from_secs(1), || {
            gate.daemon().registry().connection_count() == 0
        })
        .await;
        assert!(gone, "viewer records left behind");
    })
    .await;
}

#[tokio::test]
async fn retarget_closes_old_viewers_with_1012_and_keeps_port_and_token() {
    bounded(Duration::from_secs(30), async {
        let mut a = FakeVnc::tcp(Mode::Echo).await;
        let mut b = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let (status, first) = gate.open("vm-move", &a.target).await;
        assert_eq!(status, 201);
        let mut ws = connect(first["ws_url"].as_str().expect("ws_url")).await;
        assert_eq!(
            a.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        ws.next().await.expect("greeting").expect("ok");

        let (status, same) = gate.open("vm-move", &a.target).await;
        assert_eq!(status, 200, "same target is idempotent");
        assert_eq!(same["token"], first["token"]);

        let (status, moved) = gate.open("vm-move", &b.target).await;
        assert_eq!(status, 200);
        assert_eq!(moved["ws_port"], first["ws_port"]);
        assert_eq!(moved["token"], first["token"]);
        assert_eq!(moved["target"].as_str(), Some(b.target.as_str()));
        let (frame, took) = next_close(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(code_and_reason(&frame), close_of(CloseReason::Retargeted));
        assert!(took < Duration::from_secs(1));
        assert!(matches!(
            a.next_event(Duration::from_secs(1)).await,
            Some(Event::Eof(_))
        ));

        let mut ws = connect(first["ws_url"].as_str().expect("ws_url")).await;
        assert_eq!(
            b.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        ws.next().await.expect("greeting").expect("ok");
    })
    .await;
}

#[tokio::test]
async fn delete_closes_viewers_with_1001_and_frees_the_port_at_once() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        // One port: the next open must bind the very port the delete released.
        let gate = TestGate::start(1).await;
        for round in 0..3 {
            let (status, session) = gate.open("vm-del", &fake.target).await;
            assert_eq!(status, 201, "round {round}: {session}");
            assert_eq!(
                session["ws_port"].as_u64(),
                Some(u64::from(gate.block.first))
            );
            let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
            ws.next().await.expect("greeting").expect("ok");
            ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
            ws.next().await.expect("echo").expect("ok");
            assert_eq!(gate.close("vm-del").await, 204);
            let (frame, took) = next_close(&mut ws, Duration::from_secs(5)).await;
            assert_eq!(
                code_and_reason(&frame),
                close_of(CloseReason::SessionClosed)
            );
            assert!(took < Duration::from_secs(1));
            assert_eq!(gate.close("vm-del").await, 404);
        }
    })
    .await;
}

#[tokio::test]
async fn viewer_cap_closes_extra_viewers_with_1013() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start_with(2, |c| c.max_connections_per_session = 2).await;
        let session = gate.open_ok("vm-cap", &fake.target).await;
        let url = session["ws_url"].as_str().expect("ws_url");
        let mut first = connect(url).await;
        let mut second = connect(url).await;
        first.next().await.expect("greeting").expect("ok");
        second.next().await.expect("greeting").expect("ok");
        let mut third = connect(url).await;
        let (frame, _) = next_close(&mut third, Duration::from_secs(5)).await;
        assert_eq!(
            code_and_reason(&frame),
            close_of(CloseReason::TooManyViewers)
        );
        let (_, info) = gate.call("GET", "/v1/sessions/vm-cap", None).await;
        assert_eq!(info["connections"], 2);
        assert_eq!(info["viewers"].as_array().map(Vec::len), Some(2));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_disconnects_one_viewer_and_the_others_stay() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-kick", &fake.target).await;
        let url = session["ws_url"].as_str().expect("ws_url");
        let mut first = connect(url).await;
        let mut second = connect(url).await;
        first.next().await.expect("greeting").expect("ok");
        second.next().await.expect("greeting").expect("ok");
        let (_, info) = gate.call("GET", "/v1/sessions/vm-kick", None).await;
        // The two viewers register in whichever order their upgrades finish: find each one's
        // id by its address.
        let id_of = |ws: &Ws| {
            let addr = match ws.get_ref() {
                MaybeTlsStream::Plain(s) => s.local_addr().expect("addr"),
                _ => panic!("plain connection expected"),
            };
            info["viewers"]
                .as_array()
                .expect("viewers")
                .iter()
                .find(|v| v["peer"] == addr.to_string())
                .and_then(|v| v["id"].as_u64())
                .unwrap_or_else(|| panic!("no viewer from {addr}: {info}"))
        };
        let ids = [id_of(&first), id_of(&second)];
        assert_ne!(ids[0], ids[1], "{info}");
        let (status, _) = gate
            .call(
                "DELETE",
                &format!("/v1/sessions/vm-kick/viewers/{}", ids[0]),
                None,
            )
            .await;
        assert_eq!(status, 204);
        let (frame, took) = next_close(&mut first, Duration::from_secs(5)).await;
        assert_eq!(
            code_and_reason(&frame),
            close_of(CloseReason::DisconnectedByOperator)
        );
        assert!(took < Duration::from_secs(1), "{took:?}");
        second
            .send(Message::binary(b"still here".to_vec()))
            .await
            .expect("send");
        loop {
            match second.next().await.expect("frame").expect("ok") {
                Message::Binary(b) => {
                    assert_eq!(b.as_ref(), b"still here");
                    break;
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        for path in [
            format!("/v1/sessions/vm-kick/viewers/{}", ids[0]),
            "/v1/sessions/vm-kick/viewers/999".to_owned(),
            "/v1/sessions/vm-kick/viewers/not-a-number".to_owned(),
            format!("/v1/sessions/no-such-vm/viewers/{}", ids[1]),
        ] {
            let (status, body) = gate.call("DELETE", &path, None).await;
            assert_eq!(
                (status, body["error"]["code"].as_str()),
                (404, Some("not_found")),
                "{path}"
            );
        }
        let (_, info) = gate.call("GET", "/v1/sessions/vm-kick", None).await;
        assert_eq!(info["connections"], 1);
        assert_eq!(info["viewers"][0]["id"].as_u64(), Some(ids[1]));
        // The same from the CLI.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
            .args(["--api", &format!("http://{}", gate.api), "kick", "vm-kick"])
            .arg(ids[1].to_string())
            .env_remove("VNCGATE_API_TOKEN")
            .output()
            .expect("vncgate kick");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (frame, _) = next_close(&mut second, Duration::from_secs(5)).await;
        assert_eq!(
            code_and_reason(&frame),
            close_of(CloseReason::DisconnectedByOperator)
        );
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_viewers_with_1001_restarting() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-stop", &fake.target).await;
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        ws.next().await.expect("greeting").expect("ok");
        // API connections are daemon tasks too: an idle keep-alive one and one that stalls
        // half way through its headers must not hold the shutdown up.
        use tokio::io::AsyncWriteExt;
        let idle_api = tokio::net::TcpStream::connect(gate.api).await.expect("api");
        let mut stalled_api = tokio::net::TcpStream::connect(gate.api).await.expect("api");
        stalled_api
            .write_all(b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            .await
            .expect("half a request");
        let daemon = gate.daemon.take().expect("daemon");
        let started = std::time::Instant::now();
        let stopping = tokio::spawn(daemon.shutdown());
        let (frame, _) = next_close(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(code_and_reason(&frame), close_of(CloseReason::Restarting));
        assert!(
            stopping.await.expect("join"),
            "every task ended within the grace period"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "shutdown took {:?}",
            started.elapsed()
        );
        drop((idle_api, stalled_api));
    })
    .await;
}

#[tokio::test]
async fn garbage_on_a_session_port_or_the_api_disturbs_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-junk", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("port") as u16;
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        ws.next().await.expect("greeting").expect("ok");
        for addr in [format!("127.0.0.1:{port}"), gate.api.to_string()] {
            for junk in [
                &b"\x16\x03\x01\x02\x00garbage\r\n\r\n"[..],
                b"GET / HTTP/9.9\r\n\r\n",
                b"\0\0\0\0",
                b"GET /websockify?token=x HTTP/1.1\r\nUpgrade: websocket\r\n\r\n",
            ] {
                let mut s = tokio::net::TcpStream::connect(&addr)
                    .await
                    .expect("connect");
                s.write_all(junk).await.expect("write");
                let mut sink = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut sink)).await;
            }
        }
        // An HTTP/2 client (prior knowledge) is told, in JSON, to use HTTP/1.1.
        for addr in [format!("127.0.0.1:{port}"), gate.api.to_string()] {
            let mut s = tokio::net::TcpStream::connect(&addr)
                .await
                .expect("connect");
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                .await
                .expect("write");
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), async {
                let mut chunk = [0u8; 1024];
                // Up to the daemon's FIN; then this side closes.
                while let Ok(n) = s.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    answer.extend_from_slice(&chunk[..n]);
                }
            })
            .await
            .expect("the answer ends within 5 s");
            let text = String::from_utf8_lossy(&answer);
            assert!(text.starts_with("HTTP/1.1 505 "), "{addr}: {text}");
            assert!(text.contains("send HTTP/1.1"), "{addr}: {text}");
        }
        // Junk inside the WebSocket: a text frame is ignored, the relay goes on.
        ws.send(Message::text("not vnc")).await.expect("send text");
        ws.send(Message::binary(b"still here".to_vec()))
            .await
            .expect("send");
        let echoed = ws.next().await.expect("echo").expect("ok");
        assert_eq!(echoed.into_data().as_ref(), b"still here");
        assert_eq!(gate.session_count().await, 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_stops_answering_pings_is_dropped() {
    bounded(Duration::from_secs(30), async {
        let mut fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start_with(2, |c| c.ping_interval = Duration::from_millis(200)).await;
        let session = gate.open_ok("vm-ping", &fake.target).await;
        let url = session["ws_url"].as_str().expect("ws_url").to_owned();

        // A live viewer keeps reading, so tungstenite answers every ping.
        let mut live = connect(&url).await;
        assert_eq!(
            fake.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
        let reader = tokio::spawn(async move {
            let mut pings = 0;
            loop {
                tokio::select! {
                    m = live.next() => match m {
                        Some(Ok(Message::Ping(_))) => pings += 1,
                        Some(Ok(Message::Close(f))) => panic!("live viewer closed: {f:?}"),
                        Some(Ok(_)) => {}
                        other => panic!("live viewer ended: {other:?}"),
                    },
                    _ = &mut done_rx => return (live, pings),
                }
            }
        });

        // A frozen viewer never reads again after connecting. The clock starts before it
        // connects, so a slow test thread can only lengthen what it measures.
        let start = Instant::now();
        let frozen = connect(&url).await;
        assert_eq!(
            fake.next_event(Duration::from_secs(5)).await,
            Some(Event::Connected)
        );
        let event = fake.next_event(Duration::from_secs(3)).await;
        assert_eq!(
            event,
            Some(Event::Eof(0)),
            "the frozen viewer's VNC connection is closed"
        );
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(300),
            "dropped too early: {took:?}"
        );

        let _ = done_tx.send(());
        let (mut live, pings) = reader.await.expect("reader");
        // At least one ping was answered and the live viewer outlived the frozen one (how many
        // pings fit in that time depends on the timers' phases and the machine's load).
        assert!(pings >= 1, "pings seen by the live viewer: {pings}");
        live.send(Message::binary(b"alive".to_vec()))
            .await
            .expect("send");
        loop {
            match live.next().await.expect("frame").expect("ok") {
                Message::Binary(b) => {
                    assert_eq!(b.as_ref(), b"alive");
                    break;
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        drop(frozen);
    })
    .await;
}

#[tokio::test]
async fn idle_timeout_closes_a_silent_connection() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate =
            TestGate::start_with(2, |c| c.idle_timeout = Some(Duration::from_millis(300))).await;
        let session = gate.open_ok("vm-idle", &fake.target).await;
        let mut ws = connect(session["ws_url"].as_str().expect("ws_url")).await;
        let (frame, took) = next_close(&mut ws, Duration::from_secs(5)).await;
        assert_eq!(code_and_reason(&frame), close_of(CloseReason::IdleTimeout));
        assert!(took >= Duration::from_millis(250), "{took:?}");
    })
    .await;
}
