//! vncgate's public port behind Debian's nginx, configured by `docs/nginx-vncgate.conf` (the
//! documented file itself, with this test's ports, certificate and a 3 s read timeout): TLS
//! at nginx, `X-Forwarded-*` believed through `--trusted-proxies`, the console in headless
//! Chromium, tokens kept out of nginx's access log, and WebSockets kept open past nginx's
//! `proxy_read_timeout` by the daemon's pings (and closed by nginx without them).

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::browser::{assert_matches, drive, out_dir, tools_present};
use common::tls::TestCa;
use common::vnc::{Proc, Scratch, Xvnc};
use common::{DaemonProcess, FakeVnc, GREETING, Mode, PortBlock, bounded};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const NGINX: &str = "/usr/sbin/nginx";
/// nginx's read timeout in this test (60 s in the documented file): pings every second keep a
/// console past it; a daemon pinging every 60 s loses its idle console to it.
const READ_TIMEOUT_S: u64 = 3;

/// Starts nginx (one process, `master_process off`, so it is stopped by its PID) with the
/// documented server block and a plain-HTTP control server in front of `control_upstream`.
fn start_nginx(
    dir: &Path,
    (tls_port, cert, key): (u16, &Path, &Path),
    upstream: SocketAddr,
    (control_port, control_upstream): (u16, SocketAddr),
) -> Proc {
    let documented = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/nginx-vncgate.conf"),
    )
    .expect("docs/nginx-vncgate.conf");
    let mut site = documented;
    for (from, to) in [
        (
            "listen 443 ssl;",
            format!("listen 127.0.0.1:{tls_port} ssl;"),
        ),
        ("server 127.0.0.1:6443;", format!("server {upstream};")),
        (
            "/etc/ssl/vnc.example.com/fullchain.pem",
            cert.display().to_string(),
        ),
        (
            "/etc/ssl/vnc.example.com/privkey.pem",
            key.display().to_string(),
        ),
        (
            "/var/log/nginx/vncgate.access.log",
            dir.join("access.log").display().to_string(),
        ),
        (
            "proxy_read_timeout 60s;",
            format!("proxy_read_timeout {READ_TIMEOUT_S}s;"),
        ),
    ] {
        assert!(site.contains(from), "the documented file has {from:?}");
        site = site.replace(from, &to);
    }
    std::fs::write(dir.join("vncgate.conf"), site).expect("write the site");
    let d = dir.display();
    let main = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections 256; }}\n\
         http {{\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  include {d}/vncgate.conf;\n\
         \x20 server {{\n    listen 127.0.0.1:{control_port};\n    access_log {d}/control.log vncgate;\n\
         \x20   location /s/ {{\n      proxy_pass http://{control_upstream};\n      proxy_http_version 1.1;\n\
         \x20     proxy_set_header Upgrade $http_upgrade;\n      proxy_set_header Connection $vncgate_connection;\n\
         \x20     proxy_set_header Host $http_host;\n      proxy_read_timeout {READ_TIMEOUT_S}s;\n    }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).expect("write nginx.conf");
    let child = Command::new(NGINX)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("error.log"))
        .stdin(Stdio::null())
        .spawn()
        .expect("start nginx");
    Proc(child)
}

/// Waits until `port` on 127.0.0.1 accepts connections.
async fn wait_listening(port: u16, nginx: &mut Proc, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .is_ok()
        {
            return;
        }
        if let Ok(Some(status)) = nginx.0.try_wait() {
            let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            panic!("nginx exited: {status}: {log}");
        }
        assert!(Instant::now() < deadline, "nginx did not listen on {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads frames until the VNC greeting has come.
async fn read_greeting<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut got = Vec::new();
    while got.len() < GREETING.len() {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected the greeting, got {other:?}"),
        }
    }
    assert_eq!(got, GREETING);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_through_nginx_with_tls_and_pings_past_its_read_timeout() {
    if !tools_present(&[NGINX, "Xvnc", "xterm", "xsetroot"]) {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let scratch = Scratch::new("nginx");
        let ports = PortBlock::take();
        let (tls_port, control_port) = (ports.spare(), ports.public());
        let ca = TestCa::new("nginx");
        let leaf = ca.leaf();
        let (cert, key) = leaf.write(&scratch.0, &ca);
        let base = format!("https://127.0.0.1:{tls_port}");
        let daemon = DaemonProcess::spawn(
            1,
            &[
                "--public-listen",
                "PUBLIC",
                "--session-ports",
                "off",
                "--trusted-proxies",
                "127.0.0.1/32",
                "--public-base-url",
                &base,
                "--ping-interval",
                "1s",
            ],
        )
        .await;
        let quiet = DaemonProcess::spawn(
            1,
            &[
                "--public-listen",
                "PUBLIC",
                "--session-ports",
                "off",
                "--ping-interval",
                "60s",
            ],
        )
        .await;
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, daemon.block.public()));
        let quiet_upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, quiet.block.public()));
        let mut nginx = start_nginx(
            &scratch.0,
            (tls_port, &cert, &key),
            upstream,
            (control_port, quiet_upstream),
        );
        wait_listening(tls_port, &mut nginx, &scratch.0).await;
        wait_listening(control_port, &mut nginx, &scratch.0).await;

        // The console in Chromium, trusting the test CA's leaf by its SPKI hash: the page's
        // origin is https://127.0.0.1:PORT, which the daemon (plain HTTP behind nginx) knows
        // only from X-Forwarded-Proto/Host.
        let mut xvnc = Xvnc::start(&scratch.0, "behind nginx").await;
        let screen = xvnc.draw_desktop().await;
        let session = daemon
            .open_ok("vm-nginx", &format!("unix:{}", xvnc.socket.display()))
            .await;
        let url = session["url"].as_str().expect("url");
        assert!(
            url.starts_with(&format!("{base}/s/vm-nginx/vnc.html#token=")),
            "{url}"
        );
        let result = drive(json!({
            "url": url, "outDir": out_dir(), "name": "nginx", "spki": [leaf.spki_sha256_b64],
            "width": screen.width, "height": screen.height, "app": "bundled", "action": null,
        }))
        .await;
        assert_eq!(result["state"], "connected", "{result}");
        assert_matches("nginx", "before", &screen);

        // A wss viewer through nginx stays open three read timeouts long: pings every second.
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let echo = daemon.open_ok("vm-echo", &fake.target).await;
        let ws_url = echo["public_ws_url"].as_str().expect("public_ws_url");
        assert!(ws_url.starts_with("wss://127.0.0.1:"), "{ws_url}");
        let tls = common::tls::connect(
            SocketAddr::from((Ipv4Addr::LOCALHOST, tls_port)),
            ca.client_config(),
        )
        .await
        .expect("TLS to nginx");
        let (mut ws, _) = tokio_tungstenite::client_async(ws_url, tls)
            .await
            .expect("wss upgrade through nginx");
        read_greeting(&mut ws).await;
        let held = Duration::from_secs(3 * READ_TIMEOUT_S);
        let until = tokio::time::Instant::now() + held;
        let mut pings = 0;
        // Reading answers the pings (tungstenite queues the pong and sends it on the next
        // read or write).
        while let Ok(frame) = tokio::time::timeout_at(until, ws.next()).await {
            match frame {
                Some(Ok(Message::Ping(_))) => pings += 1,
                other => panic!("the idle console ended through nginx: {other:?}"),
            }
        }
        assert!(pings >= 3, "{pings} pings in {held:?}");
        ws.send(Message::binary(b"still here".to_vec()))
            .await
            .expect("send after the idle time");
        let mut got = Vec::new();
        while got.len() < 10 {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => got.extend_from_slice(&b),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected the echo, got {other:?}"),
            }
        }
        assert_eq!(got, b"still here");
        // Closed by us: nginx logs a proxied WebSocket when it ends.
        ws.close(None).await.expect("close");
        while let Some(Ok(_)) = ws.next().await {}

        // Without pings in that time, nginx closes the idle console at its read timeout.
        let quiet_session = quiet.open_ok("vm-quiet", &fake.target).await;
        let token = quiet_session["token"].as_str().expect("token");
        let (mut idle, _) = tokio_tungstenite::connect_async(format!(
            "ws://127.0.0.1:{control_port}/s/vm-quiet/websockify?token={token}"
        ))
        .await
        .expect("ws upgrade through nginx");
        read_greeting(&mut idle).await;
        let since = Instant::now();
        let ended = tokio::time::timeout(Duration::from_secs(4 * READ_TIMEOUT_S), async {
            loop {
                match idle.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    _ => return,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "nginx kept an idle console without pings");
        assert!(
            since.elapsed() >= Duration::from_secs(READ_TIMEOUT_S) - Duration::from_millis(500),
            "ended after {:?}, before nginx's read timeout",
            since.elapsed()
        );

        // The access log has the requests, by path, and no token.
        let access = scratch.0.join("access.log");
        let logged = common::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&access).is_ok_and(|l| l.contains("/s/vm-echo/websockify"))
        })
        .await;
        let log = std::fs::read_to_string(&access).expect("access log");
        assert!(logged, "the closed WebSocket is in the access log: {log}");
        assert!(log.contains("GET /s/vm-nginx/vnc.html"), "{log}");
        for s in [&session, &echo] {
            let token = s["token"].as_str().expect("token");
            assert!(
                !log.contains(token),
                "a token reached the access log: {log}"
            );
        }
        let control_log = scratch.0.join("control.log");
        let logged = common::wait_until(Duration::from_secs(10), || {
            std::fs::read_to_string(&control_log).is_ok_and(|l| l.contains("/s/vm-quiet/"))
        })
        .await;
        let control_log = std::fs::read_to_string(&control_log).expect("control log");
        assert!(logged, "{control_log}");
        assert!(!control_log.contains(token), "{control_log}");
        let listed: Value = daemon.call("GET", "/v1/sessions/vm-nginx", None).await.1;
        assert!(
            listed["bytes_to_client"].as_u64().unwrap_or(0) > 0,
            "{listed}"
        );
        drop(nginx);
    })
    .await;
}
