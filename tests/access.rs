//! Access control on session ports and the API (DESIGN.md "Access control"), tried as a new
//! user and as an attacker would: the Origin policy, token lifetimes and rotation, the API's
//! bearer token, and the API against a browser on the same host (CSRF, DNS rebinding).

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::raw::{self, RawResponse, upgrade_request, websocket_from};
use common::{DaemonProcess, FakeVnc, GREETING, Mode, TestGate, bounded, close_of};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use vncgate::access::parse_origins;
use vncgate::relay::CloseReason;

const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

type Ws = WebSocketStream<TcpStream>;

fn port_of(session: &Value) -> SocketAddr {
    let port = session["ws_port"].as_u64().expect("ws_port") as u16;
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn token_of(session: &Value) -> String {
    session["token"].as_str().expect("token").to_owned()
}

/// Reads the VNC greeting, then checks that bytes sent come back (the fake server echoes).
async fn relays(ws: &mut Ws) {
    let mut got = Vec::new();
    while got.len() < GREETING.len() {
        match ws.next().await.expect("open").expect("frame") {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected the greeting, got {other:?}"),
        }
    }
    assert_eq!(got, GREETING);
    echo(ws).await;
}

async fn echo(ws: &mut Ws) {
    ws.send(Message::binary(b"ping-bytes".to_vec()))
        .await
        .expect("send");
    let mut got = Vec::new();
    while got.len() < 10 {
        match ws.next().await.expect("open").expect("frame") {
            Message::Binary(b) => got.extend_from_slice(&b),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected the echo, got {other:?}"),
        }
    }
    assert_eq!(got, b"ping-bytes");
}

async fn next_close(ws: &mut Ws) -> (u16, String) {
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("ended without a close frame: {other:?}"),
        }
    }
}

async fn upgrade(to: SocketAddr, path: &str, extra: &[&str]) -> RawResponse {
    raw::request(ME, to, &upgrade_request(to, path, extra)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_origin_policy_refuses_other_sites_before_the_vnc_server_is_reached() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start_with(2, |c| {
            c.allowed_origins = parse_origins("https://platform.example").expect("origins");
            c.trusted_proxies = vncgate::access::parse_cidrs("127.0.0.3").expect("cidr");
        })
        .await;
        let session = gate.open_ok("vm-origin", &fake.target).await;
        let (addr, token) = (port_of(&session), token_of(&session));
        let path = format!("/websockify?token={token}");
        let port = addr.port();
        for origin in [
            "http://evil.example".to_owned(),
            "null".to_owned(),
            format!("http://127.0.0.1.evil.example:{port}"),
            format!("https://127.0.0.1:{port}"),
            format!("http://127.0.0.1:{}", port + 1),
        ] {
            let r = upgrade(addr, &path, &[&format!("Origin: {origin}")]).await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (403, "origin_refused"),
                "{origin}: {r:?}"
            );
        }
        // Forwarded headers from a peer that is not a trusted proxy are not believed.
        let r = upgrade(
            addr,
            &path,
            &[
                "Origin: https://vnc.example.com",
                "X-Forwarded-Proto: https",
                "X-Forwarded-Host: vnc.example.com",
            ],
        )
        .await;
        assert_eq!(r.status, 403, "{r:?}");
        assert_eq!(
            fake.accepted.load(Ordering::SeqCst),
            0,
            "nothing reached the VNC server"
        );

        let ws_url = format!("ws://{addr}{path}");
        let own = format!("http://127.0.0.1:{port}");
        for origin in [Some(own.as_str()), Some("https://platform.example"), None] {
            let headers: Vec<(&'static str, &str)> =
                origin.map(|o| ("origin", o)).into_iter().collect();
            let mut ws = websocket_from(ME, &ws_url, &headers)
                .await
                .unwrap_or_else(|s| panic!("{origin:?} refused with {s}"));
            relays(&mut ws).await;
        }
        // Through a trusted proxy that terminates TLS for vnc.example.com.
        let proxy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
        let mut ws = websocket_from(
            proxy,
            &ws_url,
            &[
                ("origin", "https://vnc.example.com"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-host", "vnc.example.com"),
                ("x-forwarded-for", "198.51.100.20"),
            ],
        )
        .await
        .expect("the proxied page's own origin");
        relays(&mut ws).await;
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 4);
    })
    .await;
}

/// On tokio's paused clock: the hour passes at once. (No viewer is held across the jump:
/// keepalive would rightly drop one that answered no ping for an hour; the next test keeps
/// a viewer across a real expiry.)
#[tokio::test(start_paused = true)]
async fn tokens_expire_for_new_connections_and_an_open_renews_them() {
    let fake = FakeVnc::tcp(Mode::Echo).await;
    // No cleanup pass: its 30 s timer is what the paused clock jumps to whenever the runtime
    // waits on a thread (the state file's write), and enough jumps expire the token early.
    let gate = TestGate::start_with(2, |c| {
        c.token_ttl = Some(Duration::from_secs(3600));
        c.cleanup_interval = None;
    })
    .await;
    let session = gate.open_ok("vm-ttl", &fake.target).await;
    let (addr, token) = (port_of(&session), token_of(&session));
    let created = humantime::parse_rfc3339(session["created_at"].as_str().expect("created_at"))
        .expect("rfc3339");
    let expires = humantime::parse_rfc3339(session["token_expires_at"].as_str().expect("expiry"))
        .expect("rfc3339");
    let ttl = expires.duration_since(created).expect("after creation");
    assert!((3599..=3601).contains(&ttl.as_secs()), "{ttl:?}");
    let r = upgrade(addr, &format!("/websockify?token={token}"), &[]).await;
    assert_eq!(r.status, 101, "a fresh token connects");

    tokio::time::advance(Duration::from_secs(3601)).await;
    let page = raw::request(
        ME,
        addr,
        &format!("GET /session?token={token} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
    )
    .await;
    assert_eq!(
        (page.status, page.code().as_str()),
        (403, "token_expired"),
        "{page:?}"
    );
    let r = upgrade(addr, &format!("/websockify?token={token}"), &[]).await;
    assert_eq!((r.status, r.code().as_str()), (403, "token_expired"));
    let r = upgrade(
        addr,
        "/websockify?token=0123456789abcdef0123456789abcdef",
        &[],
    )
    .await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (403, "forbidden"),
        "wrong is not told expired"
    );

    // An open of the session with an expired token issues a fresh one, same port.
    let (status, renewed) = gate.open("vm-ttl", &fake.target).await;
    assert_eq!(status, 200);
    assert_eq!(renewed["ws_port"], session["ws_port"]);
    assert_ne!(renewed["token"], session["token"]);
    assert_ne!(renewed["token_expires_at"], session["token_expires_at"]);
    let r = upgrade(
        addr,
        &format!("/websockify?token={}", token_of(&renewed)),
        &[],
    )
    .await;
    assert_eq!(r.status, 101, "the renewed token connects: {r:?}");
    let (status, same) = gate.open("vm-ttl", &fake.target).await;
    assert_eq!(
        (status, &same["token"]),
        (200, &renewed["token"]),
        "a live token is kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_viewer_outlives_its_token() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        // Expiry is kept in whole seconds (floor(now) + ttl): a ttl of 3 s leaves the viewer
        // at least 2 s to connect, even on a loaded machine.
        let gate = TestGate::start_with(2, |c| c.token_ttl = Some(Duration::from_secs(3))).await;
        let session = gate.open_ok("vm-outlive", &fake.target).await;
        let (addr, token) = (port_of(&session), token_of(&session));
        let mut live = websocket_from(ME, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("connects");
        relays(&mut live).await;
        let probe = format!("GET /session?token={token} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = raw::request(ME, addr, &probe).await;
            if r.code() == "token_expired" {
                break;
            }
            assert_eq!(r.status, 200, "{r:?}");
            assert!(
                tokio::time::Instant::now() < deadline,
                "the token never expired"
            );
            // Waiting for the daemon's clock to pass the expiry, polled.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let r = upgrade(addr, &format!("/websockify?token={token}"), &[]).await;
        assert_eq!((r.status, r.code().as_str()), (403, "token_expired"));
        echo(&mut live).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_stops_the_old_token_at_once_and_disconnect_revokes_live_viewers() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-rotate", &fake.target).await;
        let addr = port_of(&session);
        let mut first = websocket_from(ME, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("connects");
        relays(&mut first).await;

        assert_eq!(
            session["token_expires_at"],
            Value::Null,
            "no --token-ttl: no expiry"
        );
        let (status, rotated) = gate
            .call("POST", "/v1/sessions/vm-rotate/token", None)
            .await;
        assert_eq!(status, 200, "{rotated}");
        assert_ne!(rotated["token"], session["token"]);
        assert_eq!(rotated["ws_port"], session["ws_port"]);
        assert!(
            rotated["url"]
                .as_str()
                .expect("url")
                .ends_with(&token_of(&rotated))
        );
        let old = upgrade(
            addr,
            &format!("/websockify?token={}", token_of(&session)),
            &[],
        )
        .await;
        assert_eq!((old.status, old.code().as_str()), (403, "forbidden"));
        echo(&mut first).await;
        let mut second = websocket_from(ME, rotated["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("the new token connects");
        relays(&mut second).await;

        let (status, revoked) = gate
            .call(
                "POST",
                "/v1/sessions/vm-rotate/token",
                Some(br#"{"disconnect": true}"#),
            )
            .await;
        assert_eq!(status, 200, "{revoked}");
        let want = close_of(CloseReason::TokenRevoked);
        assert_eq!(want, (1008, "token revoked".to_owned()));
        for ws in [&mut first, &mut second] {
            let got = tokio::time::timeout(Duration::from_secs(1), next_close(ws))
                .await
                .expect("closed within a second");
            assert_eq!(got, want);
        }
        let mut third = websocket_from(ME, revoked["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("the newest token connects");
        relays(&mut third).await;

        let (status, body) = gate
            .call("POST", "/v1/sessions/no-such-vm/token", None)
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (404, Some("not_found"))
        );
        let (status, body) = gate
            .call(
                "POST",
                "/v1/sessions/vm-rotate/token",
                Some(b"{\"disconnect\": 1}"),
            )
            .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request"))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_rotated_tokens_and_their_expiry() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(2, &["--token-ttl", "1h"]).await;
        let opened = daemon.open_ok("vm-keep", &fake.target).await;
        let (status, rotated) = daemon
            .call("POST", "/v1/sessions/vm-keep/token", None)
            .await;
        assert_eq!(status, 200);
        assert!(rotated["token_expires_at"].is_string());
        daemon.terminate().await;
        let file: Value =
            serde_json::from_slice(&std::fs::read(daemon.state.file()).expect("state file"))
                .expect("json");
        assert_eq!(file["sessions"][0]["tokens"][0]["value"], rotated["token"]);
        assert_eq!(
            file["sessions"][0]["tokens"][0]["expires_at"],
            rotated["token_expires_at"]
        );
        daemon.restart().await;
        let (_, back) = daemon.call("GET", "/v1/sessions/vm-keep", None).await;
        assert_eq!(back["token"], rotated["token"]);
        assert_eq!(back["token_expires_at"], rotated["token_expires_at"]);
        let addr = port_of(&back);
        let old = upgrade(
            addr,
            &format!("/websockify?token={}", token_of(&opened)),
            &[],
        )
        .await;
        assert_eq!(
            old.status, 403,
            "the rotated-away token stays dead after a restart"
        );
        let mut ws = websocket_from(ME, back["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("connects");
        relays(&mut ws).await;
    })
    .await;
}

/// Runs a client command of the binary; returns (success, stdout, stderr).
fn cli(api: SocketAddr, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .arg("--api")
        .arg(format!("http://{api}"))
        .args(args)
        .env_remove("VNCGATE_API_TOKEN")
        .envs(env.iter().copied())
        .output()
        .expect("run vncgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn api_request(api: SocketAddr, method: &str, path: &str, extra: &[&str], body: &str) -> String {
    let mut r = format!(
        "{method} {path} HTTP/1.1\r\nHost: {api}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for line in extra {
        r.push_str(line);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.push_str(body);
    r
}

/// `GET path` on the API with `extra` header lines.
async fn api_get(api: SocketAddr, path: &str, extra: &[&str]) -> RawResponse {
    raw::request(ME, api, &api_request(api, "GET", path, extra, "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_its_bearer_token_everywhere_but_healthz() {
    bounded(Duration::from_secs(60), async {
        let dir = common::StateDir::new();
        let token_file = dir.0.join("api-token");
        std::fs::write(&token_file, "first-token-0123456789\n").expect("token file");
        let file_arg = token_file.display().to_string();
        let mut daemon = DaemonProcess::spawn(2, &["--api-token-file", &file_arg]).await;
        let api = daemon.api;
        let open = r#"{"vm_id": "vm-auth", "target": "127.0.0.1:5999"}"#;
        for (method, path, body) in [
            ("GET", "/v1/sessions", ""),
            ("POST", "/v1/sessions", open),
            ("GET", "/v1/sessions/vm-auth", ""),
            ("DELETE", "/v1/sessions/vm-auth", ""),
            ("POST", "/v1/sessions/vm-auth/token", ""),
            ("GET", "/v1/status", ""),
            ("GET", "/no/such/route", ""),
            ("PUT", "/healthz/x", ""),
        ] {
            let r = raw::request(ME, api, &api_request(api, method, path, &[], body)).await;
            assert_eq!(
                (r.status, r.code().as_str()),
                (401, "unauthorized"),
                "{method} {path}"
            );
            assert_eq!(r.header("www-authenticate").as_deref(), Some("Bearer"));
            let wrong = api_request(
                api,
                method,
                path,
                &["Authorization: Bearer first-token-0123456788"],
                body,
            );
            let r = raw::request(ME, api, &wrong).await;
            assert_eq!(r.status, 401, "{method} {path} with a wrong token");
            assert!(
                r.header("www-authenticate")
                    .is_some_and(|v| v.contains("invalid_token"))
            );
        }
        let healthz = api_get(api, "/healthz", &[]).await;
        assert_eq!(healthz.status, 200);
        let auth = "Authorization: Bearer first-token-0123456789";
        let r = raw::request(
            ME,
            api,
            &api_request(api, "POST", "/v1/sessions", &[auth], open),
        )
        .await;
        assert_eq!(r.status, 201, "{r:?}");
        let r = api_get(api, "/no/such/route", &[auth]).await;
        assert_eq!((r.status, r.code().as_str()), (404, "not_found"));

        // The CLI: VNCGATE_API_TOKEN or --api-token-file.
        let (ok, _, err) = cli(api, &["status"], &[]);
        assert!(!ok && err.contains("unauthorized"), "{err}");
        let (ok, out, err) = cli(
            api,
            &["list"],
            &[("VNCGATE_API_TOKEN", "first-token-0123456789")],
        );
        assert!(ok && out.contains("vm-auth"), "{out} {err}");
        let (ok, out, err) = cli(
            api,
            &["--api-token-file", &file_arg, "rotate", "vm-auth"],
            &[],
        );
        assert!(ok && out.starts_with("http://"), "{out} {err}");
        let (ok, newer, err) = cli(
            api,
            &["rotate", "vm-auth", "--disconnect"],
            &[("VNCGATE_API_TOKEN_FILE", &file_arg)],
        );
        assert!(
            ok && newer.starts_with("http://") && newer != out,
            "{newer} {err}"
        );

        // SIGHUP re-reads the file: the new token works, the old one stops.
        std::fs::write(&token_file, "second-token-0123456789\n").expect("rewrite");
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &daemon.pid().to_string()])
            .status()
            .expect("kill -HUP");
        assert!(hup.success());
        let mut switched = false;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let r = api_get(
                api,
                "/v1/status",
                &["Authorization: Bearer second-token-0123456789"],
            )
            .await;
            if r.status == 200 {
                switched = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(switched, "the reloaded token was not taken within 10 s");
        let r = api_get(api, "/v1/status", &[auth]).await;
        assert_eq!(r.status, 401, "the old token stops at the reload");
        // A file that cannot be used keeps the token in use, and says so in status.
        std::fs::write(&token_file, "\n").expect("empty");
        std::process::Command::new("kill")
            .args(["-HUP", &daemon.pid().to_string()])
            .status()
            .expect("kill -HUP");
        let second = "Authorization: Bearer second-token-0123456789";
        let mut warned = Value::Null;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            let r = api_get(api, "/v1/status", &[second]).await;
            assert_eq!(r.status, 200, "the previous token still works");
            let status: Value = serde_json::from_str(&r.body).expect("json");
            if status["warnings"]
                .to_string()
                .contains("API token reload failed")
            {
                warned = status;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(warned["system_health"], "warning", "{warned}");
        daemon.kill9();
    })
    .await;
}

#[test]
fn a_non_loopback_api_without_a_token_file_refuses_to_start() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args([
            "serve",
            "--api-listen",
            "0.0.0.0:6080",
            "--state-file",
            "/nonexistent/never-written.json",
        ])
        .env_remove("VNCGATE_API_TOKEN_FILE")
        .output()
        .expect("run vncgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--api-token-file") && err.contains("0.0.0.0:6080"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_refuses_cross_site_requests_and_rebound_host_names() {
    bounded(Duration::from_secs(30), async {
        let gate = TestGate::start_with(2, |c| {
            c.api_allowed_origins = parse_origins("http://ops.example:8080").expect("origins");
            c.api_hosts = vec!["vncgate.internal".into()];
        })
        .await;
        let api = gate.api;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let other = FakeVnc::tcp(Mode::Echo).await;
        // CSRF: a form or fetch(no-cors) from another site, text/plain so no preflight.
        let csrf = |vm: &str, target: &str| {
            api_request(
                api,
                "POST",
                "/v1/sessions",
                &["Origin: http://evil.example", "Content-Type: text/plain"],
                &format!(r#"{{"vm_id": "{vm}", "target": "{target}"}}"#),
            )
        };
        let r = raw::request(ME, api, &csrf("vm-csrf", &fake.target)).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "origin_refused"),
            "{r:?}"
        );
        assert_eq!(gate.session_count().await, 0, "no session was opened");
        let legit = gate.open_ok("vm-real", &fake.target).await;
        let r = raw::request(ME, api, &csrf("vm-real", &other.target)).await;
        assert_eq!(r.status, 403);
        let (_, now) = gate.call("GET", "/v1/sessions/vm-real", None).await;
        assert_eq!(now["target"], legit["target"], "not retargeted");
        let r = raw::request(
            ME,
            api,
            &api_request(api, "DELETE", "/v1/sessions/vm-real", &["Origin: null"], ""),
        )
        .await;
        assert_eq!(r.status, 403);

        // DNS rebinding: the page's name now points at 127.0.0.1; the Host header keeps it.
        let rebound = api_request(api, "GET", "/v1/sessions", &[], "").replace(
            &format!("Host: {api}"),
            &format!("Host: rebind.evil.example:{}", api.port()),
        );
        let r = raw::request(ME, api, &rebound).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "host_refused"),
            "{r:?}"
        );
        assert!(!r.body.contains(&token_of(&legit)), "no token leaks");

        // What keeps working: no Origin (curl, platform code), localhost, --api-hosts names,
        // and an allowed origin, which gets CORS headers.
        for host in [
            format!("localhost:{}", api.port()),
            "vncgate.internal".to_owned(),
            format!("[::1]:{}", api.port()),
        ] {
            let req = api_request(api, "GET", "/v1/sessions", &[], "")
                .replace(&format!("Host: {api}"), &format!("Host: {host}"));
            assert_eq!(raw::request(ME, api, &req).await.status, 200, "{host}");
        }
        let r = api_get(api, "/v1/sessions", &["Origin: http://ops.example:8080"]).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("access-control-allow-origin").as_deref(),
            Some("http://ops.example:8080")
        );
        let preflight = api_request(
            api,
            "OPTIONS",
            "/v1/sessions",
            &[
                "Origin: http://ops.example:8080",
                "Access-Control-Request-Method: POST",
                "Access-Control-Request-Headers: content-type",
            ],
            "",
        );
        let r = raw::request(ME, api, &preflight).await;
        assert_eq!(r.status, 204, "{r:?}");
        assert!(
            r.header("access-control-allow-methods")
                .is_some_and(|m| m.contains("POST"))
        );
        let refused_preflight = preflight.replace("http://ops.example:8080", "http://evil.example");
        let r = raw::request(ME, api, &refused_preflight).await;
        assert_eq!((r.status, r.code().as_str()), (403, "origin_refused"));
        assert!(r.header("access-control-allow-origin").is_none());
        // A cross-site read of the table (what CORS would hand the page) is refused too.
        let r = api_get(api, "/v1/sessions", &["Origin: http://evil.example"]).await;
        assert_eq!(r.status, 403);
        assert!(!r.body.contains(&token_of(&legit)));
        assert_eq!(fake.accepted.load(Ordering::SeqCst), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_page_carries_its_security_headers() {
    bounded(Duration::from_secs(30), async {
        let gate = TestGate::start_with(2, |c| {
            c.frame_ancestors = "'self' https://platform.example".into();
        })
        .await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let session = gate.open_ok("vm-page", &fake.target).await;
        let addr = port_of(&session);
        for path in ["/", "/vnc.html"] {
            let r = raw::request(
                ME,
                addr,
                &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
            )
            .await;
            assert_eq!(r.status, 200);
            let csp = r.header("content-security-policy").expect("CSP");
            assert!(csp.contains("default-src 'self'"), "{csp}");
            assert!(
                csp.contains("script-src 'self'")
                    && !csp.contains("script-src 'self' 'unsafe-inline'"),
                "{csp}"
            );
            assert!(
                csp.ends_with("frame-ancestors 'self' https://platform.example"),
                "{csp}"
            );
            assert_eq!(
                r.header("x-content-type-options").as_deref(),
                Some("nosniff")
            );
            assert_eq!(r.header("referrer-policy").as_deref(), Some("no-referrer"));
            assert!(
                !r.body.contains("<script>") && !r.body.contains("onload="),
                "no inline script"
            );
        }
        let r = raw::request(
            ME,
            addr,
            &format!("GET /novnc/core/rfb.js HTTP/1.1\r\nHost: {addr}\r\n\r\n"),
        )
        .await;
        assert_eq!(
            r.header("x-content-type-options").as_deref(),
            Some("nosniff")
        );
        assert!(
            r.header("content-type")
                .is_some_and(|t| t.starts_with("text/javascript"))
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_tokens_get_one_address_429_while_another_connects() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start_with(2, |c| {
            c.trusted_proxies = vncgate::access::parse_cidrs("127.0.0.3").expect("cidr")
        })
        .await;
        let session = gate.open_ok("vm-brute", &fake.target).await;
        let addr = port_of(&session);
        let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9));
        let mut codes = Vec::new();
        for i in 0..100 {
            let path = format!("/websockify?token=guess{i:040}");
            let r = raw::request(attacker, addr, &upgrade_request(addr, &path, &[])).await;
            codes.push((r.status, r.code()));
        }
        assert!(
            codes[..20]
                .iter()
                .all(|(s, c)| *s == 403 && c == "forbidden"),
            "{codes:?}"
        );
        assert!(
            codes[20..]
                .iter()
                .all(|(s, c)| *s == 429 && c == "rate_limited"),
            "{codes:?}"
        );
        // Blocked for everything that checks a token, the right one included.
        let r = raw::request(
            attacker,
            addr,
            &upgrade_request(
                addr,
                &format!("/websockify?token={}", token_of(&session)),
                &[],
            ),
        )
        .await;
        assert_eq!(r.status, 429);
        assert!(
            r.header("retry-after")
                .is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s)))
        );
        let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
        let mut ws = websocket_from(other, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("another address is not locked out");
        relays(&mut ws).await;

        // Behind a trusted proxy, failures count per forwarded client, not per proxy.
        let proxy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
        for i in 0..25 {
            let path = format!("/websockify?token=guess{i:040}");
            let r = raw::request(
                proxy,
                addr,
                &upgrade_request(addr, &path, &["X-Forwarded-For: 203.0.113.66"]),
            )
            .await;
            assert!(r.status == 403 || r.status == 429);
        }
        let r = raw::request(
            proxy,
            addr,
            &upgrade_request(
                addr,
                "/websockify?token=x",
                &["X-Forwarded-For: 203.0.113.66"],
            ),
        )
        .await;
        assert_eq!(r.status, 429, "the forwarded attacker is limited");
        let mut ws = websocket_from(
            proxy,
            session["ws_url"].as_str().expect("ws_url"),
            &[("x-forwarded-for", "203.0.113.67")],
        )
        .await
        .expect("another client behind the same proxy connects");
        relays(&mut ws).await;
        let status = gate.status().await;
        assert!(
            status["connections"]["rate_limited"]
                .as_u64()
                .is_some_and(|n| n >= 81),
            "{status}"
        );
    })
    .await;
}

/// Connections that have not upgraded never take a viewer slot: with a cap of one viewer,
/// ten idle connections to the port do not keep the one viewer out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_connections_never_take_a_viewer_slot() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start_with(2, |c| c.max_connections_per_session = 1).await;
        let session = gate.open_ok("vm-slots", &fake.target).await;
        let addr = port_of(&session);
        let mut idle = Vec::new();
        for _ in 0..10 {
            idle.push(raw::connect_from(ME, addr).await.expect("connect"));
        }
        let mut ws = websocket_from(ME, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("the one viewer gets in");
        relays(&mut ws).await;
        let mut second = websocket_from(ME, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("upgrades, then is closed for the cap");
        assert_eq!(
            next_close(&mut second).await,
            close_of(CloseReason::TooManyViewers)
        );
        drop(idle);
    })
    .await;
}

/// Another site can make the user's browser fetch `/session` (an `<img>`): that must not spend
/// the user's failed-token budget, and the page learns when its own origin would be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_session_probes_cannot_lock_a_user_out() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-probe", &fake.target).await;
        let (addr, token) = (port_of(&session), token_of(&session));
        for i in 0..40 {
            let probe = format!(
                "GET /session?token=x{i} HTTP/1.1\r\nHost: {addr}\r\nSec-Fetch-Site: cross-site\r\n\r\n"
            );
            let r = raw::request(ME, addr, &probe).await;
            assert_eq!((r.status, r.code().as_str()), (403, "origin_refused"));
        }
        let page = format!(
            "GET /session?token={token}&origin=http%3A%2F%2F127.0.0.1%3A{} HTTP/1.1\r\nHost: {addr}\r\nSec-Fetch-Site: same-origin\r\n\r\n",
            addr.port()
        );
        let r = raw::request(ME, addr, &page).await;
        assert_eq!(r.status, 200, "the user is not locked out: {r:?}");
        let mut ws = websocket_from(ME, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("connects");
        relays(&mut ws).await;
        let foreign = format!(
            "GET /session?token={token}&origin=https%3A%2F%2Fvnc.example.com HTTP/1.1\r\nHost: {addr}\r\n\r\n"
        );
        let r = raw::request(ME, addr, &foreign).await;
        assert_eq!((r.status, r.code().as_str()), (403, "origin_refused"), "{r:?}");
        assert!(r.body.contains("--trusted-proxies"), "the page can say why: {}", r.body);
    })
    .await;
}
