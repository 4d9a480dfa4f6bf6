//! The console end to end: real VNC servers (Xvnc, QEMU), the vncgate binary, and the page in
//! Debian's headless Chromium. The canvas bitmap must equal a direct RFB read of the same server.

mod common;

use std::time::Duration;

use common::browser::{assert_matches, drive, out_dir, tools_present};
use common::rfb::{Screen, Transport, diff, read_screen};
use common::tls::TestCa;
use common::vnc::{Qemu, Scratch, TERM_BG_RGB, Xvnc, require, settled_screen};
use common::{DaemonProcess, bounded};
use serde_json::json;

/// Bounding box of the typing xterm, found by its unique background colour.
fn term_box(s: &Screen) -> (usize, usize, usize, usize) {
    let [r, g, b] = TERM_BG_RGB;
    let mut bb = (usize::MAX, usize::MAX, 0, 0);
    for (i, p) in s.pixels.chunks_exact(4).enumerate() {
        if p[..3] == [b, g, r] {
            let (x, y) = (i % s.width, i / s.width);
            bb = (bb.0.min(x), bb.1.min(y), bb.2.max(x), bb.3.max(y));
        }
    }
    bb
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xvnc_console_in_chromium_shows_the_screen_and_takes_keys() {
    xvnc_console("xvnc", None, &[]).await;
}

/// The same console through the public port alone (`--session-ports off`): the page and its
/// WebSocket under `/s/{vm_id}/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xvnc_console_through_the_public_port_in_chromium() {
    xvnc_console(
        "xvnc-public",
        None,
        &["--public-listen", "PUBLIC", "--session-ports", "off"],
    )
    .await;
}

/// The same console over https/wss: Chromium trusts the test CA's leaf by its SPKI hash only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xvnc_console_over_https_and_wss_in_chromium() {
    let ca = TestCa::new("e2e");
    let leaf = ca.leaf();
    let dir = common::StateDir::new();
    let (cert, key) = leaf.write(&dir.0, &ca);
    let args = vec![
        "--cert".to_string(),
        cert.display().to_string(),
        "--key".to_string(),
        key.display().to_string(),
    ];
    xvnc_console("xvnc-tls", Some((args, leaf.spki_sha256_b64.clone())), &[]).await;
}

/// Xvnc with an xterm behind the daemon (with `tls`: its flags and the leaf's SPKI hash; then
/// `extra` flags); the page of the session's `url` shows the screen and typing reaches the
/// xterm.
async fn xvnc_console(name: &str, tls: Option<(Vec<String>, String)>, extra: &[&str]) {
    if !tools_present(&["Xvnc", "xterm", "xsetroot"]) {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let scratch = Scratch::new(&format!("e2e-{name}"));
        let desktop_name = "e2e <b>desk</b> & co";
        let mut xvnc = Xvnc::start(&scratch.0, desktop_name).await;
        let before = xvnc.draw_desktop().await;
        let mut flags: Vec<&str> = tls
            .as_ref()
            .map(|(a, _)| a.iter().map(String::as_str).collect())
            .unwrap_or_default();
        flags.extend_from_slice(extra);
        let daemon = DaemonProcess::spawn(4, &flags).await;
        let session = daemon
            .open_ok("vm-xvnc", &format!("unix:{}", xvnc.socket.display()))
            .await;
        let url = session["url"].as_str().expect("url");
        assert!(url.contains("/vnc.html#token="), "{url}");
        if extra.contains(&"--public-listen") {
            assert!(url.contains("/s/vm-xvnc/vnc.html#token="), "{url}");
        }
        let scheme = if tls.is_some() { "https://" } else { "http://" };
        assert!(url.starts_with(scheme), "{url}");
        let spki: Vec<String> = tls.iter().map(|(_, h)| h.clone()).collect();
        let term = term_box(&before);
        assert!(term.0 < term.2, "the xterm is on the screen");
        let at = [
            (term.0 + term.2) as f64 / 2.0 / before.width as f64,
            (term.1 + term.3) as f64 / 2.0 / before.height as f64,
        ];
        let result = drive(json!({
            "url": url, "outDir": out_dir(), "name": name, "spki": spki,
            "width": before.width, "height": before.height, "app": "bundled",
            "action": { "kind": "type", "text": "echo vncgate-e2e-ok", "at": at },
        }))
        .await;
        assert_eq!(result["state"], "connected", "{result}");
        assert_eq!(result["vm"], "vm-xvnc");
        assert_eq!(
            result["desktopName"], desktop_name,
            "the desktop name is shown as text"
        );
        assert_eq!(
            result["desktopNameElements"], 0,
            "no markup from the VNC server is rendered"
        );
        assert_matches(name, "before", &before);

        let after = settled_screen(&xvnc.socket, Duration::from_secs(10), |_| true).await;
        assert_matches(name, "after", &after);
        let (changed, bbox) = diff(&before, &after);
        let bbox = bbox.expect("typing changed the screen");
        eprintln!("typing changed {changed} pixels in {bbox:?}; the xterm spans {term:?}");
        assert!(changed > 200, "only {changed} pixels changed");
        assert!(
            bbox.0 >= term.0 && bbox.1 >= term.1 && bbox.2 <= term.2 && bbox.3 <= term.3,
            "the change {bbox:?} lies outside the xterm {term:?}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_seabios_console_in_chromium_shows_the_screen_and_takes_esc() {
    if !tools_present(&["qemu-system-x86_64"]) {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let scratch = Scratch::new("e2e-qemu");
        let qemu = Qemu::start(&scratch.0).await;
        // SeaBIOS's banner and "Press ESC for boot menu." in light grey on black.
        let before = settled_screen(&qemu.socket, Duration::from_secs(60), |s| {
            s.pixels
                .chunks_exact(4)
                .filter(|p| p[..3] != [0, 0, 0])
                .count()
                > 1000
        })
        .await;
        let daemon = DaemonProcess::spawn(4, &[]).await;
        let session = daemon
            .open_ok("vm-qemu", &format!("unix:{}", qemu.socket.display()))
            .await;
        let result = drive(json!({
            "url": session["url"], "outDir": out_dir(), "name": "qemu",
            "width": before.width, "height": before.height, "app": "bundled",
            "action": { "kind": "key", "key": "Escape" },
        }))
        .await;
        assert_eq!(result["state"], "connected", "{result}");
        assert_eq!(result["desktopName"], "QEMU");
        assert_matches("qemu", "before", &before);
        let after = settled_screen(&qemu.socket, Duration::from_secs(10), |_| true).await;
        assert_matches("qemu", "after", &after);
        let (changed, _) = diff(&before, &after);
        eprintln!("Esc changed {changed} pixels (the boot menu)");
        assert!(
            changed > 500,
            "the boot menu did not appear: {changed} pixels changed"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debians_novnc_app_connects_through_web_dir() {
    novnc_app("novnc-app", "url", "path=websockify%3Ftoken%3D").await;
}

/// Debian's noVNC app under the public port's `/s/{vm_id}/` prefix (beside a session port):
/// its `path` parameter carries the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debians_novnc_app_connects_through_the_public_port() {
    novnc_app(
        "novnc-app-public",
        "public_url",
        "path=s/vm-web/websockify%3Ftoken%3D",
    )
    .await;
}

/// Debian's noVNC app (`--web /usr/share/novnc`) opened at the session's `field` URL, which
/// must contain `path`, shows the screen.
async fn novnc_app(name: &str, field: &str, path: &str) {
    if !tools_present(&["Xvnc", "xterm", "xsetroot", "/usr/share/novnc/vnc.html"]) {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let scratch = Scratch::new(&format!("e2e-{name}"));
        let mut xvnc = Xvnc::start(&scratch.0, "e2e web").await;
        let screen = xvnc.draw_desktop().await;
        let daemon = DaemonProcess::spawn(
            2,
            &["--web", "/usr/share/novnc", "--public-listen", "PUBLIC"],
        )
        .await;
        let session = daemon
            .open_ok("vm-web", &format!("unix:{}", xvnc.socket.display()))
            .await;
        let url = session[field].as_str().expect("url");
        assert!(
            url.contains(&format!("/vnc.html?autoconnect=1&{path}")),
            "{url}"
        );
        drive(json!({
            "url": url, "outDir": out_dir(), "name": name,
            "width": screen.width, "height": screen.height, "app": "novnc", "action": null,
        }))
        .await;
        assert_matches(name, "before", &screen);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rfb_client_through_the_proxy_reads_what_a_direct_client_reads() {
    if !require(&["Xvnc", "xterm", "xsetroot"]) {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let scratch = Scratch::new("e2e-rfb");
        let mut xvnc = Xvnc::start(&scratch.0, "rfb byte for byte").await;
        xvnc.draw_desktop().await;
        let daemon = DaemonProcess::spawn(2, &[]).await;
        let session = daemon
            .open_ok("vm-rfb", &format!("unix:{}", xvnc.socket.display()))
            .await;
        let direct = read_screen(Transport::unix(&xvnc.socket).await).await;
        let proxied =
            read_screen(Transport::websocket(session["ws_url"].as_str().expect("ws_url")).await)
                .await;
        assert_eq!(
            direct.handshake, proxied.handshake,
            "version and security bytes"
        );
        assert_eq!(direct.server_init, proxied.server_init, "ServerInit bytes");
        assert_eq!(direct.name, "rfb byte for byte");
        assert_eq!((direct.width, direct.height), (800, 600));
        assert!(direct.pixels == proxied.pixels, "framebuffer bytes differ");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_the_vnc_password_and_shares_the_clipboard() {
    if !tools_present(&["Xvnc", "xterm", "xsetroot", "vncpasswd", "xclip"]) {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let scratch = Scratch::new("e2e-password");
        let xvnc = Xvnc::start_with_password(&scratch.0, "locked", "s3cret-pw").await;
        let daemon = DaemonProcess::spawn(2, &[]).await;
        let session = daemon.open_ok("vm-locked", &format!("unix:{}", xvnc.socket.display())).await;
        let result = drive(json!({
            "url": session["url"], "outDir": out_dir(), "name": "password", "app": "bundled",
            "capture": false, "width": 800, "height": 600, "display": xvnc.display,
            "steps": [
                { "op": "waitVisible", "selector": "#credentials" },
                { "op": "fill", "selector": "#password", "value": "wrong-pw" },
                { "op": "click", "selector": "#credentials button[type=submit]" },
                { "op": "waitStatus", "contains": "refused the connection" },
                { "op": "record", "selector": "#status", "as": "refusal" },
                { "op": "click", "selector": "#btn-reconnect" },
                { "op": "waitVisible", "selector": "#credentials" },
                { "op": "fill", "selector": "#password", "value": "s3cret-pw" },
                { "op": "click", "selector": "#credentials button[type=submit]" },
                { "op": "waitState", "state": "connected" },
                // VM -> browser: something in the VM owns the clipboard.
                { "op": "spawn", "cmd": "xclip", "args": ["-quiet", "-selection", "clipboard", "-i"], "stdin": "copied in the VM" },
                { "op": "click", "selector": "#btn-clipboard" },
                { "op": "waitValue", "selector": "#clipboard-text", "equals": "copied in the VM" },
                // Browser -> VM.
                { "op": "fill", "selector": "#clipboard-text", "value": "pasted from the browser" },
                { "op": "click", "selector": "#clipboard-send" },
                // The page must stay open: the VM asks it for the text when an app pastes.
                { "op": "waitExec", "cmd": "xclip", "args": ["-o", "-selection", "clipboard"], "expect": "pasted from the browser" },
            ],
        }))
        .await;
        eprintln!("wrong password: {}", result["refusal"]);
        assert!(result["refusal"].as_str().is_some_and(|s| s.contains("refused")), "{result}");
        assert_eq!(result["stepsDone"], 16, "{result}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_explains_closes_and_reconnects_by_itself() {
    if !tools_present(&["Xvnc", "xterm", "xsetroot"]) {
        return;
    }
    bounded(Duration::from_secs(240), async {
        let scratch = Scratch::new("e2e-reconnect");
        let mut xvnc = Xvnc::start(&scratch.0, "reconnects").await;
        xvnc.draw_desktop().await;
        let mut daemon = DaemonProcess::spawn(2, &[]).await;
        let target = format!("unix:{}", xvnc.socket.display());
        let session = daemon.open_ok("vm-heal", &target).await;
        let url = session["url"].as_str().expect("url");
        let port = session["ws_port"].as_u64().expect("port");
        let open = |t: &str| json!({ "op": "api", "method": "POST", "path": "/v1/sessions", "status": 200, "body": { "vm_id": "vm-heal", "target": t } });
        let marker = scratch.0.join("restart-now");
        let driver = tokio::spawn(drive(json!({
            "url": url, "outDir": out_dir(), "name": "reconnect", "app": "bundled",
            "capture": false, "width": 800, "height": 600, "api": format!("http://{}", daemon.api),
            "steps": [
                { "op": "waitState", "state": "connected" },
                // The daemon restarts under the page: it says so and heals by itself.
                { "op": "touch", "path": marker },
                { "op": "waitStatus", "contains": "vncgate is restarting" },
                { "op": "waitState", "state": "connected" },
                // Retarget to a dead socket: 1012, then reconnects that fail with the reason.
                open("unix:/nonexistent/vnc.sock"),
                { "op": "waitStatus", "contains": "unreachable: no such socket" },
                { "op": "waitStatus", "contains": "Reconnecting in" },
                { "op": "record", "selector": "#status", "as": "unreachable" },
                // Back to the real server: the page heals without a click.
                open(&target),
                { "op": "waitState", "state": "connected" },
                // A wrong token is named as such (the browser itself only sees 1006).
                { "op": "goto", "url": format!("http://127.0.0.1:{port}/vnc.html#token=wrong") },
                { "op": "waitStatus", "contains": "Wrong token" },
                { "op": "waitState", "state": "closed" },
                { "op": "record", "selector": "#status", "as": "wrongToken" },
                // A rotation with disconnect revokes the open page: it says so and stops.
                { "op": "goto", "url": url },
                { "op": "waitState", "state": "connected" },
                { "op": "api", "method": "POST", "path": "/v1/sessions/vm-heal/token", "status": 200, "body": { "disconnect": true } },
                { "op": "waitStatus", "contains": "revoked" },
                { "op": "waitState", "state": "closed" },
                { "op": "record", "selector": "#status", "as": "revoked" },
                { "op": "api", "method": "POST", "path": "/v1/sessions", "status": 200, "body": { "vm_id": "vm-heal", "target": target } },
                // Closing the session ends it for good (the url of the newest token).
                { "op": "gotoSession", "vm_id": "vm-heal" },
                { "op": "waitState", "state": "connected" },
                { "op": "api", "method": "DELETE", "path": "/v1/sessions/vm-heal", "status": 204 },
                { "op": "waitState", "state": "closed" },
                { "op": "record", "selector": "#status", "as": "closed" },
            ],
        })));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !marker.exists() {
            assert!(tokio::time::Instant::now() < deadline, "the page never connected");
            assert!(!driver.is_finished(), "the driver ended early: {:?}", driver.await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, _) = daemon.terminate().await;
        assert!(status.success());
        daemon.restart().await;
        let result = driver.await.expect("driver task");
        eprintln!("statuses: {} | {} | {} | {}", result["unreachable"], result["closed"], result["wrongToken"], result["revoked"]);
        assert!(result["closed"].as_str().is_some_and(|s| s.starts_with("Session closed")), "{result}");
        assert!(result["revoked"].as_str().is_some_and(|s| s.contains("revoked")), "{result}");
        assert_eq!(result["stepsDone"], 26, "{result}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_says_when_its_link_has_expired_and_stops() {
    if !tools_present(&[]) {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let daemon = DaemonProcess::spawn(2, &["--token-ttl", "1s"]).await;
        let session = daemon.open_ok("vm-expired", "127.0.0.1:5999").await;
        let url = session["url"].as_str().expect("url");
        let port = session["ws_port"].as_u64().expect("port") as u16;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let probe = format!(
            "GET /session?token={} HTTP/1.1\r\nHost: {addr}\r\n\r\n",
            session["token"].as_str().expect("token")
        );
        let me = std::net::IpAddr::from([127, 0, 0, 1]);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while common::raw::request(me, addr, &probe).await.code() != "token_expired" {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the token never expired"
            );
            // Polling the daemon until its clock passes the expiry.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let result = drive(json!({
            "url": url, "outDir": out_dir(), "name": "expired", "app": "bundled",
            "capture": false, "width": 800, "height": 600, "api": format!("http://{}", daemon.api),
            "steps": [
                { "op": "waitStatus", "contains": "expired" },
                { "op": "waitState", "state": "closed" },
                { "op": "record", "selector": "#status", "as": "expired" },
            ],
        }))
        .await;
        assert_eq!(result["stepsDone"], 3, "{result}");
        assert!(
            result["expired"]
                .as_str()
                .is_some_and(|s| s.contains("ask the platform for a new one")),
            "{result}"
        );
    })
    .await;
}
