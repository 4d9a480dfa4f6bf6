//! RFC 6455 on the server side, table-driven over raw sockets: the opening handshake's checks
//! (section 4.2.1) and the framing rules (sections 5-7) a server MUST enforce, each with the
//! status or close code DESIGN.md names.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{FakeVnc, GREETING, Mode, TestGate, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// A gate with one session on an echo server: (gate, fake, session port, token).
async fn setup() -> (TestGate, FakeVnc, SocketAddr, String) {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let session = gate.open_ok("vm-rfc", &fake.target).await;
    let port = session["ws_port"].as_u64().expect("ws_port") as u16;
    let token = session["token"].as_str().expect("token").to_owned();
    (gate, fake, SocketAddr::from(([127, 0, 0, 1], port)), token)
}

/// Sends `request` and returns the response head (status line and headers).
async fn handshake(addr: SocketAddr, request: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("send");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

fn request(version: &str, method: &str, token: &str, extra: &[&str], skip: &[&str]) -> String {
    let mut lines = vec![format!("{method} /websockify?token={token} {version}")];
    for (name, value) in [
        ("Host", "127.0.0.1"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", KEY),
        ("Sec-WebSocket-Version", "13"),
    ] {
        if !skip.contains(&name) {
            lines.push(format!("{name}: {value}"));
        }
    }
    lines.extend(extra.iter().map(|l| l.to_string()));
    format!("{}\r\n\r\n", lines.join("\r\n"))
}

#[tokio::test]
async fn opening_handshake_checks() {
    bounded(Duration::from_secs(30), async {
        let (_gate, fake, addr, token) = setup().await;
        let t = token.as_str();
        // (what, request, status, text the answer must contain)
        let cases: Vec<(&str, String, &str, &str)> = vec![
            (
                "HTTP/1.0",
                request("HTTP/1.0", "GET", t, &[], &[]),
                "400",
                "HTTP/1.0",
            ),
            (
                "POST",
                request("HTTP/1.1", "POST", t, &[], &[]),
                "400",
                "GET",
            ),
            (
                "version 8",
                request(
                    "HTTP/1.1",
                    "GET",
                    t,
                    &["Sec-WebSocket-Version: 8"],
                    &["Sec-WebSocket-Version"],
                ),
                "426",
                "sec-websocket-version: 13",
            ),
            (
                "no key",
                request("HTTP/1.1", "GET", t, &[], &["Sec-WebSocket-Key"]),
                "400",
                "sec-websocket-key",
            ),
            (
                "short key",
                request(
                    "HTTP/1.1",
                    "GET",
                    t,
                    &["Sec-WebSocket-Key: c2hvcnQ="],
                    &["Sec-WebSocket-Key"],
                ),
                "400",
                "Sec-WebSocket-Key",
            ),
            (
                "two keys",
                request(
                    "HTTP/1.1",
                    "GET",
                    t,
                    &["Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA=="],
                    &[],
                ),
                "400",
                "duplicated",
            ),
            (
                "two versions",
                request("HTTP/1.1", "GET", t, &["Sec-WebSocket-Version: 13"], &[]),
                "400",
                "duplicated",
            ),
            (
                "two hosts",
                request("HTTP/1.1", "GET", t, &["Host: other"], &[]),
                "400",
                "duplicated",
            ),
            (
                "no host",
                request("HTTP/1.1", "GET", t, &[], &["Host"]),
                "400",
                "host",
            ),
            (
                "no upgrade token in Connection",
                request(
                    "HTTP/1.1",
                    "GET",
                    t,
                    &["Connection: keep-alive"],
                    &["Connection"],
                ),
                "400",
                "Connection",
            ),
        ];
        for (what, req, status, says) in cases {
            let (_s, head) = handshake(addr, &req).await;
            let status_line = head.lines().next().unwrap_or("");
            assert!(status_line.contains(status), "{what}: {status_line}");
            let mut s = _s;
            let mut body = vec![0u8; 2048];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut body))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            let all = format!("{head}{}", String::from_utf8_lossy(&body[..n]));
            assert!(
                all.to_ascii_lowercase()
                    .contains(&says.to_ascii_lowercase()),
                "{what}: the answer should say {says:?}: {all}"
            );
        }
        assert_eq!(
            fake.accepted.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "no refused handshake reached the VNC server"
        );

        // Extensions offered are never accepted: 101 without Sec-WebSocket-Extensions.
        let req = request(
            "HTTP/1.1",
            "GET",
            t,
            &["Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"],
            &[],
        );
        let (_s, head) = handshake(addr, &req).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                || head
                    .to_ascii_lowercase()
                    .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "the accept key of RFC 6455's own example: {head}"
        );
        assert!(
            !head
                .to_ascii_lowercase()
                .contains("sec-websocket-extensions"),
            "{head}"
        );
    })
    .await;
}

/// A masked client frame.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![first];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= 0xffff => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// Frames the server sent, after the upgrade, until it closes: (opcode, payload) each.
async fn server_frames(s: &mut TcpStream, limit: Duration) -> Vec<(u8, Vec<u8>)> {
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => raw.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let mut frames = Vec::new();
    let mut at = 0;
    while raw.len() >= at + 2 {
        let opcode = raw[at] & 0x0f;
        let (len, head) = match raw[at + 1] & 0x7f {
            126 => (u16::from_be_bytes([raw[at + 2], raw[at + 3]]) as usize, 4),
            127 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&raw[at + 2..at + 10]);
                (u64::from_be_bytes(b) as usize, 10)
            }
            n => (n as usize, 2),
        };
        if raw.len() < at + head + len {
            break;
        }
        frames.push((opcode, raw[at + head..at + head + len].to_vec()));
        at += head + len;
    }
    frames
}

/// Upgrades, waits for the greeting, sends `wire`, and returns the close code the server sent
/// (None if it sent no close frame) and every frame it sent.
async fn after_upgrade(
    addr: SocketAddr,
    token: &str,
    wire: &[u8],
) -> (Option<u16>, Vec<(u8, Vec<u8>)>) {
    let (mut s, head) = handshake(addr, &request("HTTP/1.1", "GET", token, &[], &[])).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(wire).await.expect("send");
    let frames = server_frames(&mut s, Duration::from_secs(3)).await;
    let close = frames.iter().find(|(op, _)| *op == 0x8).map(|(_, p)| {
        if p.len() >= 2 {
            u16::from_be_bytes([p[0], p[1]])
        } else {
            1005
        }
    });
    (close, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_rules_and_close_codes() {
    bounded(Duration::from_secs(90), async {
        let (_gate, _fake, addr, token) = setup().await;
        let mut huge = vec![0x82, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        huge.extend_from_slice(&[0, 0, 0, 0]);
        let mut unmasked = vec![0x82, 0x03];
        unmasked.extend_from_slice(b"abc");
        let cases: Vec<(&str, Vec<u8>, u16)> = vec![
            ("unmasked client frame (5.1)", unmasked, 1002),
            ("RSV1 without an extension (5.2)", frame(0xC2, b"x"), 1002),
            ("RSV3 (5.2)", frame(0x92, b"x"), 1002),
            ("reserved data opcode 3 (5.2)", frame(0x83, b"x"), 1002),
            ("reserved control opcode 0xB (5.2)", frame(0x8B, b"x"), 1002),
            (
                "control frame of 126 bytes (5.5)",
                frame(0x89, &[0; 126]),
                1002,
            ),
            ("fragmented ping (5.5)", frame(0x09, b"x"), 1002),
            (
                "continuation without a message (5.4)",
                frame(0x80, b"x"),
                1002,
            ),
            (
                "new message inside a fragmented one (5.4)",
                [frame(0x02, b"a"), frame(0x82, b"b")].concat(),
                1002,
            ),
            ("length with the top bit set (5.2)", huge, 1002),
            (
                "close with a 1-byte payload (5.5.1)",
                frame(0x88, &[3]),
                1002,
            ),
            (
                "close code 999 (7.4)",
                frame(0x88, &close_payload(999, b"")),
                1002,
            ),
            (
                "close code 1004 (7.4.1)",
                frame(0x88, &close_payload(1004, b"")),
                1002,
            ),
            (
                "close code 1005 (7.4.1)",
                frame(0x88, &close_payload(1005, b"")),
                1002,
            ),
            (
                "close code 1006 (7.4.1)",
                frame(0x88, &close_payload(1006, b"")),
                1002,
            ),
            (
                "close code 1015 (7.4.1)",
                frame(0x88, &close_payload(1015, b"")),
                1002,
            ),
            (
                "close code 2999 (7.4.2)",
                frame(0x88, &close_payload(2999, b"")),
                1002,
            ),
            (
                "close code 5000 (7.4.2)",
                frame(0x88, &close_payload(5000, b"")),
                1002,
            ),
            (
                "close reason not UTF-8 (8.1)",
                frame(0x88, &close_payload(1000, &[0xff, 0xfe])),
                1007,
            ),
            (
                "text message not UTF-8 (8.1)",
                frame(0x81, &[0xff, 0xfe]),
                1007,
            ),
            (
                "fragmented text ending inside a UTF-8 sequence (8.1)",
                [frame(0x01, b"caf"), frame(0x80, &[0xc3])].concat(),
                1007,
            ),
            (
                "close 1000 echoed (5.5.1)",
                frame(0x88, &close_payload(1000, b"bye")),
                1000,
            ),
            (
                "close 1001 echoed (5.5.1)",
                frame(0x88, &close_payload(1001, b"")),
                1001,
            ),
            (
                "close 3000 echoed (7.4.2)",
                frame(0x88, &close_payload(3000, b"app")),
                3000,
            ),
            (
                "close 4999 echoed (7.4.2)",
                frame(0x88, &close_payload(4999, "é".as_bytes())),
                4999,
            ),
            (
                "empty close answered with 1000 (5.5.1)",
                frame(0x88, b""),
                1000,
            ),
        ];
        for (what, wire, want) in cases {
            let (code, _) = after_upgrade(addr, &token, &wire).await;
            assert_eq!(code, Some(want), "{what}");
        }
    })
    .await;
}

/// Reads one server frame: (opcode, payload).
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.expect("frame header");
    let len = match head[1] & 0x7f {
        126 => {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).await.expect("length");
            u16::from_be_bytes(b) as usize
        }
        127 => {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).await.expect("length");
            u64::from_be_bytes(b) as usize
        }
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.expect("payload");
    (head[0] & 0x0f, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_pongs_text_and_fragments() {
    bounded(Duration::from_secs(30), async {
        let (_gate, _fake, addr, token) = setup().await;
        let (mut s, head) = handshake(addr, &request("HTTP/1.1", "GET", &token, &[], &[])).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // Ten pings in one burst: a pong for the most recent one (5.5.3), with its payload.
        let burst: Vec<u8> = (0..10u8).flat_map(|i| frame(0x89, &[b'p', i])).collect();
        s.write_all(&burst).await.expect("pings");
        let mut data = Vec::new();
        loop {
            match read_frame(&mut s).await {
                (0xA, p) if p.as_slice() == [b'p', 9] => break,
                (0xA, _) | (0x9, _) => {}
                (0x2, p) => data.extend(p),
                other => panic!("unexpected frame {other:?} before the last ping's pong"),
            }
        }
        // A fragmented binary message with a ping between its fragments (5.4), and text
        // messages, which are ignored (VNC is binary), then data that must still arrive.
        let mut wire = frame(0x02, b"frag");
        wire.extend(frame(0x89, b"mid"));
        wire.extend(frame(0x80, b"ment"));
        wire.extend(frame(0x81, b"text is ignored"));
        // Text split inside a UTF-8 sequence across its fragments is still UTF-8 (8.1).
        wire.extend(frame(0x01, b"caf\xc3"));
        wire.extend(frame(0x80, b"\xa9 too"));
        wire.extend(frame(0x82, b"!"));
        s.write_all(&wire).await.expect("frames");
        let mut want = GREETING.to_vec();
        want.extend_from_slice(b"fragment!");
        let mut mid_pong = false;
        while data.len() < want.len() || !mid_pong {
            match read_frame(&mut s).await {
                (0x2, p) => data.extend(p),
                (0xA, p) => mid_pong |= p.as_slice() == b"mid",
                (0x9, _) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
        assert_eq!(
            String::from_utf8_lossy(&data),
            String::from_utf8_lossy(&want)
        );
        s.write_all(&frame(0x88, &close_payload(1000, b"")))
            .await
            .expect("close");
        loop {
            match read_frame(&mut s).await {
                (0x8, p) => {
                    assert_eq!(u16::from_be_bytes([p[0], p[1]]), 1000);
                    break;
                }
                (0x9 | 0xA, _) => {}
                other => panic!("unexpected frame {other:?} before the close"),
            }
        }
    })
    .await;
}
