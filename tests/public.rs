//! The public port (DESIGN.md "Single public port"): every session under `/s/{vm_id}/` on one
//! port, beside the session ports or instead of them (`--session-ports off`). Real sockets on
//! loopback, a fake VNC server over TCP and unix sockets.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::raw::{self, upgrade_request};
use common::{DaemonProcess, FakeVnc, GREETING, Lcg, Mode, TestGate, bounded, close_of};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};
use vncgate::relay::CloseReason;

const ME: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A daemon in this process with a public port on 127.0.0.1 (a free one), session ports
/// `on` or not, and `tweak` applied last.
async fn gate(session_ports: bool, tweak: impl FnOnce(&mut vncgate::config::Config)) -> TestGate {
    TestGate::start_with(4, |c| {
        c.public_listen = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
        c.session_ports = session_ports;
        if !session_ports {
            c.max_sessions = vncgate::config::DEFAULT_MAX_SESSIONS_PORTLESS;
        }
        c.cleanup_interval = None;
        tweak(c);
    })
    .await
}

async fn public_addr(gate: &TestGate) -> SocketAddr {
    let status = gate.status().await;
    let port = status["public_port"].as_u64().expect("public_port") as u16;
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

fn text<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

/// Sends `total` random bytes in messages of up to 64 KiB while reading the echo; asserts
/// the greeting and then every byte, in order.
async fn echo_exact(ws: Ws, total: usize, seed: u64) {
    echo_exact_over(ws, total, seed).await;
}

/// [`echo_exact`] over a WebSocket on any stream (TLS included).
async fn echo_exact_over<S>(ws: WebSocketStream<S>, total: usize, seed: u64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut tx, mut rx) = ws.split();
    let mut rng = Lcg(seed);
    let payload = rng.bytes(total);
    let to_send = payload.clone();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        let mut rng = Lcg(seed ^ 1);
        while at < to_send.len() {
            let n = (1 + rng.next() as usize % 65_536).min(to_send.len() - at);
            tx.send(Message::binary(to_send[at..at + n].to_vec()))
                .await
                .expect("send");
            at += n;
        }
        tx
    });
    let mut received = Vec::with_capacity(total + GREETING.len());
    while received.len() < total + GREETING.len() {
        match rx.next().await {
            Some(Ok(Message::Binary(b))) => received.extend_from_slice(&b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?} after {} bytes", received.len()),
        }
    }
    let _tx = writer.await.expect("writer");
    assert_eq!(&received[..GREETING.len()], GREETING);
    assert!(received[GREETING.len()..] == payload[..], "byte-exact");
}

async fn connect(url: &str) -> Ws {
    connect_async(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
        .0
}

/// The close frame a viewer gets next (pings skipped), within 5 s.
async fn close_frame(ws: &mut Ws) -> (u16, String) {
    bounded(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(f)))) => {
                    return (u16::from(f.code), f.reason.to_string());
                }
                Some(Ok(Message::Binary(_) | Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_byte_exact_through_the_public_port_over_tcp_and_unix_targets() {
    bounded(Duration::from_secs(60), async {
        let gate = gate(false, |_| {}).await;
        let public = public_addr(&gate).await;
        for (name, fake) in [
            ("vm-tcp", FakeVnc::tcp(Mode::Echo).await),
            ("vm-unix", FakeVnc::unix(Mode::Echo).await),
        ] {
            let session = gate.open_ok(name, &fake.target).await;
            assert_eq!(
                session["ws_port"],
                Value::Null,
                "no session port: {session}"
            );
            let token = text(&session, "token");
            let ws_url = format!("ws://{public}/s/{name}/websockify?token={token}");
            assert_eq!(text(&session, "public_ws_url"), ws_url);
            assert_eq!(
                text(&session, "ws_url"),
                ws_url,
                "url and ws_url are the public ones"
            );
            assert_eq!(
                text(&session, "url"),
                format!("http://{public}/s/{name}/vnc.html#token={token}")
            );
            assert_eq!(session["url"], session["public_url"]);
            echo_exact(connect(&ws_url).await, 4 << 20, name.len() as u64).await;
        }
        let status = gate.status().await;
        assert_eq!(status["session_ports"], "off", "{status}");
        assert_eq!(status["port_pool"]["total_ports"], 0, "{status}");
        assert_eq!(status["max_sessions"], 10_000, "{status}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_mode_serves_a_session_on_both_ports_and_a_close_ends_both_viewers() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = gate(true, |_| {}).await;
        let public = public_addr(&gate).await;
        let session = gate.open_ok("vm-mixed", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("a session port") as u16;
        let token = text(&session, "token");
        assert_eq!(
            text(&session, "ws_url"),
            format!("ws://127.0.0.1:{port}/websockify?token={token}")
        );
        assert_eq!(
            text(&session, "public_ws_url"),
            format!("ws://{public}/s/vm-mixed/websockify?token={token}")
        );
        let mut own = connect(text(&session, "ws_url")).await;
        let mut shared = connect(text(&session, "public_ws_url")).await;
        for ws in [&mut own, &mut shared] {
            let mut got = Vec::new();
            while got.len() < GREETING.len() {
                if let Some(Ok(Message::Binary(b))) = ws.next().await {
                    got.extend_from_slice(&b);
                }
            }
            assert_eq!(got, GREETING);
        }
        let listed = gate.call("GET", "/v1/sessions/vm-mixed", None).await.1;
        assert_eq!(listed["connections"], 2, "{listed}");
        assert_eq!(gate.close("vm-mixed").await, 204);
        assert_eq!(
            close_frame(&mut own).await,
            close_of(CloseReason::SessionClosed)
        );
        assert_eq!(
            close_frame(&mut shared).await,
            close_of(CloseReason::SessionClosed)
        );
        // Closed: the public port no longer knows it.
        let r = raw::request(
            ME,
            public,
            &upgrade_request(
                public,
                &format!("/s/vm-mixed/websockify?token={token}"),
                &[],
            ),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"), "{r:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sessions_are_404_counted_as_failures_and_tokens_stay_with_their_session() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = gate(false, |c| c.auth_fail_limit = 4).await;
        let public = public_addr(&gate).await;
        let a = gate.open_ok("vm-a", &fake.target).await;
        let b = gate.open_ok("vm-b", &fake.target).await;
        let (ta, tb) = (text(&a, "token"), text(&b, "token"));
        let ask = |path: String| async move {
            raw::request(ME, public, &upgrade_request(public, &path, &[])).await
        };
        // A vm_id with a session and one without answer alike until a token would be
        // compared: the method, then the Origin (none of these is counted).
        for vm in ["vm-a", "vm-nope"] {
            let r = raw::request(
                ME,
                public,
                &format!(
                    "POST /s/{vm}/session HTTP/1.1\r\nHost: {public}\r\nContent-Length: 0\r\n\r\n"
                ),
            )
            .await;
            assert_eq!((r.status, r.code().as_str()), (405, "method_not_allowed"), "{vm}: {r:?}");
            let r = raw::request(
                ME,
                public,
                &format!(
                    "GET /s/{vm}/session?token=x&origin=http%3A%2F%2Fevil.example HTTP/1.1\r\nHost: {public}\r\n\r\n"
                ),
            )
            .await;
            assert_eq!((r.status, r.code().as_str()), (403, "origin_refused"), "{vm}: {r:?}");
            let r = raw::request(
                ME,
                public,
                &upgrade_request(
                    public,
                    &format!("/s/{vm}/websockify?token=x"),
                    &["Origin: http://evil.example"],
                ),
            )
            .await;
            assert_eq!((r.status, r.code().as_str()), (403, "origin_refused"), "{vm}: {r:?}");
        }
        // A's token is no key to B, and B's page answers for B only.
        let r = ask(format!("/s/vm-b/websockify?token={ta}")).await;
        assert_eq!((r.status, r.code().as_str()), (403, "forbidden"), "{r:?}");
        let r = raw::request(
            ME,
            public,
            &format!("GET /s/vm-a/session?token={tb} HTTP/1.1\r\nHost: {public}\r\n\r\n"),
        )
        .await;
        assert_eq!((r.status, r.code().as_str()), (403, "forbidden"), "{r:?}");
        // An unknown vm_id, with a real token, is 404 and a failure of this address.
        let r = ask(format!("/s/vm-nope/websockify?token={ta}")).await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"), "{r:?}");
        let get = |path: String, extra: &'static str| async move {
            raw::request(
                ME,
                public,
                &format!("GET {path} HTTP/1.1\r\nHost: {public}\r\n{extra}\r\n"),
            )
            .await
        };
        // Not counted: the page is the same for every vm_id, so it is served for any (and
        // tells nothing about which exist); another site's fetch of /session is refused
        // before it can spend this browser's budget.
        for i in 0..30 {
            let page = get(format!("/s/vm-guess-{i}/vnc.html"), "").await;
            assert_eq!(page.status, 200, "{page:?}");
        }
        let r = get(
            "/s/vm-nope/session?token=x".into(),
            "Sec-Fetch-Site: cross-site\r\n",
        )
        .await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "origin_refused"),
            "{r:?}"
        );
        let r = get(format!("/s/vm-gone/session?token={ta}"), "").await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"), "{r:?}");
        // Four failures so far (two wrong tokens, two unknown sessions): the next request is
        // refused, even with the right token.
        let r = ask(format!("/s/vm-a/websockify?token={ta}")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (429, "rate_limited"),
            "{r:?}"
        );
        assert_eq!(
            fake.accepted.load(Ordering::SeqCst),
            0,
            "nothing reached the VNC server"
        );
        // Another address is not locked out.
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let r = raw::request(
            other,
            public,
            &upgrade_request(public, &format!("/s/vm-a/websockify?token={ta}"), &[]),
        )
        .await;
        assert_eq!(r.status, 101, "{r:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bundled_page_lives_under_the_session_prefix() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = gate(false, |_| {}).await;
        let public = public_addr(&gate).await;
        let s = gate.open_ok("vm-page", &fake.target).await;
        let get = |path: &str| {
            let req = format!("GET {path} HTTP/1.1\r\nHost: {public}\r\n\r\n");
            async move { raw::request(ME, public, &req).await }
        };
        let page = get("/s/vm-page/vnc.html").await;
        assert_eq!(page.status, 200, "{page:?}");
        assert!(
            page.header("content-type")
                .unwrap_or_default()
                .starts_with("text/html")
        );
        assert!(page.header("content-security-policy").is_some());
        let root = get("/s/vm-page/").await;
        assert_eq!(root.status, 200, "the prefix's root is the page");
        let js = get("/s/vm-page/novnc/core/rfb.js").await;
        assert_eq!(js.status, 200);
        let js_type = js.header("content-type").unwrap_or_default();
        assert!(js_type.starts_with("text/javascript"), "{js_type}");
        let bare = get("/s/vm-page").await;
        assert_eq!(bare.status, 308);
        assert_eq!(bare.header("location").as_deref(), Some("./vm-page/"));
        let escape = get("/s/vm-page/../../etc/passwd").await;
        assert_eq!(escape.status, 404, "{escape:?}");
        let other = get("/vnc.html").await;
        assert_eq!((other.status, other.code().as_str()), (404, "not_found"));
        let token = text(&s, "token");
        let who = get(&format!("/s/vm-page/session?token={token}")).await;
        assert_eq!(who.status, 200, "{who:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&who.body).expect("json")["vm_id"],
            "vm-page"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debians_novnc_app_and_a_base_url_under_the_prefix() {
    if !common::vnc::require(&["/usr/share/novnc/vnc.html"]) {
        return;
    }
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = gate(false, |c| {
            c.web = Some("/usr/share/novnc".into());
            c.public_base_url = Some("https://consoles.example:8443/vnc".into());
        })
        .await;
        let public = public_addr(&gate).await;
        let s = gate.open_ok("vm-app", &fake.target).await;
        let token = text(&s, "token");
        assert_eq!(
            text(&s, "public_url"),
            format!(
                "https://consoles.example:8443/vnc/s/vm-app/vnc.html?autoconnect=1&path=vnc/s/vm-app/websockify%3Ftoken%3D{token}"
            )
        );
        assert_eq!(
            text(&s, "public_ws_url"),
            format!("wss://consoles.example:8443/vnc/s/vm-app/websockify?token={token}")
        );
        for path in ["/s/vm-app/vnc.html", "/s/vm-app/app/ui.js"] {
            let r = raw::request(
                ME,
                public,
                &format!("GET {path} HTTP/1.1\r\nHost: {public}\r\n\r\n"),
            )
            .await;
            assert_eq!(r.status, 200, "{path}: {r:?}");
        }
        let r = raw::request(
            ME,
            public,
            &upgrade_request(public, &format!("/s/vm-app/websockify?token={token}"), &[]),
        )
        .await;
        assert_eq!(r.status, 101, "{r:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanup_closes_a_portless_session_whose_target_is_gone() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let target = fake.target.clone();
        let gate = gate(false, |c| c.stale_after = Duration::from_millis(1)).await;
        gate.open_ok("vm-gone", &target).await;
        drop(fake);
        let closed = common::wait_until_async(Duration::from_secs(10), || async {
            let (status, report) = gate.call("POST", "/v1/cleanup", None).await;
            assert_eq!(status, 200, "{report}");
            report["closed"].as_array().is_some_and(|c| !c.is_empty())
        })
        .await;
        assert!(closed, "cleanup closed the session");
        assert_eq!(gate.call("GET", "/v1/sessions/vm-gone", None).await.0, 404);
        let doc: Value =
            serde_json::from_slice(&std::fs::read(gate.state.file()).expect("state file"))
                .expect("json");
        assert_eq!(
            doc["sessions"],
            serde_json::json!([]),
            "the close is on disk"
        );
    })
    .await;
}

/// 2,000 sessions without ports: opened 16 at once, listed, kept across a restart (state file
/// with null ports), each still reachable, then closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_portless_sessions_open_list_restart_and_close() {
    bounded(Duration::from_secs(240), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(
            1,
            &[
                "--public-listen",
                "PUBLIC",
                "--session-ports",
                "off",
                "--cleanup-interval",
                "off",
            ],
        )
        .await;
        let public = SocketAddr::from((Ipv4Addr::LOCALHOST, daemon.block.public()));
        const N: usize = 2000;
        let ids: Vec<String> = (0..N).map(|i| format!("vm-{i:04}")).collect();
        let opened = futures_util::stream::iter(ids.iter().cloned())
            .map(|id| {
                let d = &daemon;
                let target = fake.target.clone();
                async move { d.open_ok(&id, &target).await }
            })
            .buffer_unordered(16)
            .collect::<Vec<Value>>()
            .await;
        let tokens: std::collections::HashMap<String, String> = opened
            .iter()
            .map(|s| (text(s, "vm_id").to_owned(), text(s, "token").to_owned()))
            .collect();
        assert_eq!(tokens.len(), N);
        let list = daemon.call("GET", "/v1/sessions", None).await.1;
        let sessions = list["sessions"].as_array().expect("sessions");
        assert_eq!(sessions.len(), N);
        assert!(sessions.iter().all(|s| s["ws_port"].is_null()));
        let doc: Value =
            serde_json::from_slice(&std::fs::read(daemon.state.file()).expect("state file"))
                .expect("json");
        assert_eq!(doc["version"], 1);
        assert_eq!(doc["sessions"].as_array().map(Vec::len), Some(N));
        assert!(
            doc["sessions"][0]["ws_port"].is_null(),
            "null ports on disk"
        );

        let (exit, _) = daemon.terminate().await;
        assert!(exit.success(), "{exit}");
        daemon.restart().await;
        let list = daemon.call("GET", "/v1/sessions", None).await.1;
        let sessions = list["sessions"].as_array().expect("sessions");
        assert_eq!(sessions.len(), N, "every session is back");
        for s in sessions {
            assert_eq!(
                Some(text(s, "token")),
                tokens.get(text(s, "vm_id")).map(String::as_str)
            );
        }
        // A session from after the restart relays.
        let last = &ids[N - 1];
        let url = format!("ws://{public}/s/{last}/websockify?token={}", tokens[last]);
        echo_exact(connect(&url).await, 64 << 10, 7).await;

        let closed = futures_util::stream::iter(ids.iter().cloned())
            .map(|id| {
                let d = &daemon;
                async move {
                    d.call("DELETE", &format!("/v1/sessions/{id}"), None)
                        .await
                        .0
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<u16>>()
            .await;
        assert!(closed.iter().all(|s| *s == 204));
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert_eq!(status["active_sessions"], 0, "{status}");
        let doc: Value =
            serde_json::from_slice(&std::fs::read(daemon.state.file()).expect("state file"))
                .expect("json");
        assert_eq!(doc["sessions"], serde_json::json!([]));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cap_without_session_ports_is_503_and_rolls_back() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = gate(false, |c| c.max_sessions = 2).await;
        gate.open_ok("vm-1", &fake.target).await;
        gate.open_ok("vm-2", &fake.target).await;
        let (status, body) = gate.open("vm-3", &fake.target).await;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["error"]["code"], "pool_exhausted");
        let message = body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains("--max-sessions"), "{message}");
        assert_eq!(
            gate.session_count().await,
            2,
            "the refused open left nothing behind"
        );
        assert_eq!(gate.call("GET", "/v1/sessions/vm-3", None).await.0, 404);
        assert_eq!(gate.close("vm-1").await, 204);
        gate.open_ok("vm-3", &fake.target).await;
        let status = gate.status().await;
        assert_eq!(status["max_sessions"], 2, "{status}");
    })
    .await;
}

/// A state file crosses modes: sessions with ports are served on the public port alone after
/// a restart with `--session-ports off` (same tokens), and get ports back when the daemon
/// runs with session ports again; both moves are named in status warnings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_cross_between_modes_across_restarts() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(4, &["--public-listen", "PUBLIC"]).await;
        let public = SocketAddr::from((Ipv4Addr::LOCALHOST, daemon.block.public()));
        let first = daemon.open_ok("vm-x", &fake.target).await;
        assert!(first["ws_port"].is_u64(), "{first}");
        let token = text(&first, "token").to_owned();

        let (exit, _) = daemon.terminate().await;
        assert!(exit.success());
        daemon.args.extend(["--session-ports".into(), "off".into()]);
        daemon.restart().await;
        let s = daemon.call("GET", "/v1/sessions/vm-x", None).await.1;
        assert!(s["ws_port"].is_null(), "{s}");
        assert_eq!(text(&s, "token"), token);
        assert_eq!(
            text(&s, "url"),
            format!(
                "http://127.0.0.1:{}/s/vm-x/vnc.html#token={token}",
                public.port()
            )
        );
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert!(
            status["warnings"].to_string().contains("public port only"),
            "{status}"
        );
        echo_exact(connect(text(&s, "ws_url")).await, 4096, 3).await;

        let (exit, _) = daemon.terminate().await;
        assert!(exit.success());
        daemon.args.truncate(daemon.args.len() - 2);
        daemon.restart().await;
        let s = daemon.call("GET", "/v1/sessions/vm-x", None).await.1;
        assert!(s["ws_port"].is_u64(), "a port again: {s}");
        assert_eq!(text(&s, "token"), token);
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert!(
            status["warnings"].to_string().contains("got session ports"),
            "{status}"
        );
        echo_exact(connect(text(&s, "ws_url")).await, 4096, 4).await;
    })
    .await;
}

/// With `--cert/--key` the public port speaks HTTPS/WSS only, as session ports do: wss relays
/// byte-exact, a plain HTTP request is told to use https.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_port_speaks_tls_with_a_certificate() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::unix(Mode::Echo).await;
        let ca = common::tls::TestCa::new("public");
        let dir = common::StateDir::new();
        let (cert, key) = ca.leaf().write(&dir.0, &ca);
        let gate = gate(false, |c| {
            c.tls = Some(vncgate::tls::TlsFiles { cert, key });
        })
        .await;
        let public = public_addr(&gate).await;
        let s = gate.open_ok("vm-tls", &fake.target).await;
        let token = text(&s, "token");
        assert_eq!(
            text(&s, "url"),
            format!("https://{public}/s/vm-tls/vnc.html#token={token}")
        );
        let ws_url = text(&s, "ws_url");
        assert_eq!(
            ws_url,
            format!("wss://{public}/s/vm-tls/websockify?token={token}")
        );
        let tls = common::tls::connect(public, ca.client_config())
            .await
            .expect("TLS to the public port");
        let (ws, _) = tokio_tungstenite::client_async(ws_url, tls)
            .await
            .expect("wss upgrade");
        echo_exact_over(ws, 1 << 20, 9).await;
        let plain = raw::request(
            ME,
            public,
            &format!("GET /s/vm-tls/vnc.html HTTP/1.1\r\nHost: {public}\r\n\r\n"),
        )
        .await;
        assert_eq!(plain.status, 400, "{plain:?}");
        assert!(plain.body.contains("https://"), "{plain:?}");
    })
    .await;
}
