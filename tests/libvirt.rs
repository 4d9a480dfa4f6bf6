//! `serve --libvirt` against a real libvirtd with QEMU (TCG, tiny diskless domains), started
//! here with its own socket directory and stopped by PID (DESIGN.md "Platform integration").
//! The machine-wide parts libvirtd in a container needs (the libvirt-qemu user, qemu.conf
//! without cgroups, security driver or virtlogd) are set up by scripts/deps.sh --test.
#![cfg(feature = "libvirt")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::vnc::{Scratch, require, settled_screen};
use common::{DaemonProcess, bounded};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// libvirtd under `tini -s` (so QEMU processes it loses are reaped), on a socket of its own.
struct Libvirtd {
    child: Option<Child>,
    dir: PathBuf,
    uri: String,
}

impl Libvirtd {
    /// Its configuration, not started yet.
    fn new(dir: &Path) -> Libvirtd {
        let sock = dir.join("sock");
        std::fs::create_dir_all(&sock).expect("socket dir");
        let conf = dir.join("libvirtd.conf");
        std::fs::write(
            &conf,
            format!(
                "unix_sock_dir = \"{}\"\nauth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n",
                sock.display()
            ),
        )
        .expect("libvirtd.conf");
        Libvirtd {
            child: None,
            dir: dir.to_owned(),
            uri: format!("qemu:///system?socket={}/libvirt-sock", sock.display()),
        }
    }

    async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("libvirtd.log"))
            .expect("log");
        let child = Command::new("tini")
            .args(["-s", "--", "libvirtd", "--timeout", "0", "--config"])
            .arg(self.dir.join("libvirtd.conf"))
            .arg("--pid-file")
            .arg(self.dir.join("libvirtd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tini libvirtd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.virsh(&["version"]).0 {
            assert!(Instant::now() < deadline, "libvirtd did not answer in 30 s");
            // Polling libvirtd's socket until it answers.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM to tini (it passes it on), then wait for the exit.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn virsh(&self, args: &[&str]) -> (bool, String) {
        virsh(&self.uri, args)
    }

    fn must(&self, args: &[&str]) -> String {
        must(&self.uri, args)
    }
}

fn virsh(uri: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("virsh")
        .args(["-c", uri])
        .args(args)
        .output()
        .expect("run virsh");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn must(uri: &str, args: &[&str]) -> String {
    let (ok, out) = virsh(uri, args);
    assert!(ok, "virsh {args:?}: {out}");
    out
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // libvirtd itself first (tini would leave it running when killed), then tini.
            if let Ok(pid) = std::fs::read_to_string(self.dir.join("libvirtd.pid")) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Defined domains, destroyed and undefined when the test ends.
struct Domains {
    uri: String,
    dir: PathBuf,
    names: Vec<String>,
}

impl Domains {
    fn define(&mut self, name: &str, graphics: &str) {
        let xml = format!(
            "<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='pc'>hvm</type></os><on_poweroff>destroy</on_poweroff>\
             <devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{graphics}\
             <video><model type='vga'/></video></devices></domain>"
        );
        let file = self.dir.join(format!("{name}.xml"));
        std::fs::write(&file, xml).expect("domain xml");
        must(&self.uri, &["define", &file.display().to_string()]);
        self.names.push(name.to_owned());
    }
}

impl Drop for Domains {
    fn drop(&mut self) {
        for name in &self.names {
            let destroyed = virsh(&self.uri, &["destroy", name]).0;
            let undefined = virsh(&self.uri, &["undefine", name]).0;
            if !(destroyed && undefined) {
                // libvirtd is down (a test that failed half way): its QEMU and its definition
                // go by hand, so no domain outlives the test.
                let _ = Command::new("pkill")
                    .args(["-9", "-f", &format!("guest={name},")])
                    .status();
                let _ = std::fs::remove_file(format!("/etc/libvirt/qemu/{name}.xml"));
                let _ = std::fs::remove_file(format!("/run/libvirt/qemu/{name}.xml"));
            }
        }
    }
}

/// Starts the domains at once (each start spends seconds in libvirt) and waits for all.
fn start_all(lv: &Libvirtd, names: &[&str]) {
    std::thread::scope(|s| {
        for name in names {
            s.spawn(move || lv.must(&["start", name]));
        }
    });
}

/// The VNC target the domain's live XML names, as vncgate should write it.
fn live_target(lv: &Libvirtd, name: &str) -> String {
    let xml = lv.must(&["dumpxml", name]);
    vncgate::libvirt::vnc_target(&xml)
        .expect("a VNC endpoint")
        .to_string()
}

async fn session(daemon: &DaemonProcess, vm_id: &str) -> Option<Value> {
    let (status, body) = daemon
        .call("GET", &format!("/v1/sessions/{vm_id}"), None)
        .await;
    (status == 200).then_some(body)
}

/// Polls (deadline `limit`) until `vm_id`'s session satisfies `want` (`None`: no session).
async fn until_session(
    daemon: &DaemonProcess,
    vm_id: &str,
    limit: Duration,
    want: impl Fn(Option<&Value>) -> bool,
) -> Option<Value> {
    let deadline = Instant::now() + limit;
    loop {
        let s = session(daemon, vm_id).await;
        if want(s.as_ref()) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{vm_id}: not as wanted within {limit:?}: {s:?}"
        );
        // Polling the daemon while its libvirt follower works.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A viewer that got the VNC server's RFB greeting through the session.
async fn viewer(session: &Value) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(session["ws_url"].as_str().expect("ws_url"))
        .await
        .expect("viewer");
    loop {
        match ws.next().await.expect("frame").expect("frame") {
            Message::Binary(b) => {
                assert!(b.starts_with(b"RFB 003.008"), "greeting {b:?}");
                return ws;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The close frame a viewer gets next.
async fn close_of(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close within 10 s")
        {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

fn log_count(log: &Path, needle: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(needle)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_libvirt_domains() {
    if !require(&["libvirtd", "virsh", "tini", "qemu-system-x86_64"]) {
        return;
    }
    bounded(Duration::from_secs(420), async {
        let scratch = Scratch::new("libvirt");
        let mut lv = Libvirtd::new(&scratch.0);
        // vncgate first, libvirtd not running yet: it starts anyway and says so in status.
        let log = scratch.0.join("vncgate.log");
        let mut daemon = DaemonProcess::spawn_logging_to(
            8,
            &[
                "--libvirt",
                &lv.uri,
                "--cleanup-interval",
                "off",
                "--log-level",
                "info",
            ],
            Some(&log),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = daemon.call("GET", "/v1/status", None).await.1;
            if status["warnings"].to_string().contains("libvirt at") {
                break;
            }
            assert!(Instant::now() < deadline, "no libvirt warning: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lv.launch().await;
        let pid = std::process::id();
        let (a, b, bad, nog) = (
            format!("vgt-{pid}-a"),
            format!("vgt-{pid}-b"),
            format!("vgt+{pid}+c"),
            format!("vgt-{pid}-nog"),
        );
        // QEMU runs as libvirt-qemu: its VNC socket goes in a directory of that user's.
        let vnc_dir = scratch.0.join("vnc");
        std::fs::create_dir_all(&vnc_dir).expect("vnc dir");
        assert!(
            Command::new("chown")
                .args(["libvirt-qemu:libvirt-qemu", &vnc_dir.display().to_string()])
                .status()
                .expect("chown")
                .success()
        );
        let socket = vnc_dir.join("b.vnc");
        let mut domains = Domains {
            uri: lv.uri.clone(),
            dir: scratch.0.clone(),
            names: Vec::new(),
        };
        domains.define(
            &a,
            "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>",
        );
        domains.define(
            &b,
            &format!("<graphics type='vnc' socket='{}'/>", socket.display()),
        );
        domains.define(
            &bad,
            "<graphics type='vnc' autoport='yes' listen='127.0.0.1'/>",
        );
        domains.define(&nog, "");
        start_all(&lv, &[&a, &b, &bad, &nog]);

        // Reconnected (backoff at most 5 s): a session per running domain with VNC, at its
        // live endpoint.
        let sa = until_session(&daemon, &a, Duration::from_secs(10), |s| s.is_some()).await;
        let sa = sa.expect("session");
        assert_eq!(sa["target"], live_target(&lv, &a));
        let sb = until_session(&daemon, &b, Duration::from_secs(10), |s| s.is_some())
            .await
            .expect("session");
        assert_eq!(sb["target"], format!("unix:{}", socket.display()));
        // A session opened through the API for a name libvirt does not know is left alone.
        let fake = common::FakeVnc::tcp(common::Mode::Echo).await;
        daemon.open_ok("not-a-domain", &fake.target).await;
        // A few polls later: the invalid name and the domain without VNC are skipped, logged once.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(session(&daemon, &bad).await.is_none());
        assert!(session(&daemon, &nog).await.is_none());
        assert!(session(&daemon, "not-a-domain").await.is_some());

        // A viewer of each; b's stays for the rest of the test.
        let mut view_a = viewer(&sa).await;
        let mut view_b = viewer(&sb).await;

        // Destroyed: the session closes within a second, its viewer gets 1001.
        lv.must(&["destroy", &a]);
        let gone = Instant::now();
        until_session(&daemon, &a, Duration::from_secs(1), |s| s.is_none()).await;
        eprintln!(
            "session closed {:?} after virsh destroy returned",
            gone.elapsed()
        );
        let closed_event = format!("event=\"session_close\" vm_id=\"{a}\"");
        let deadline = Instant::now() + Duration::from_secs(5);
        while log_count(&log, &closed_event) == 0 {
            assert!(Instant::now() < deadline, "no session_close event for {a}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains(&closed_event) && l.contains("domain_stopped")),
            "closed by the follower with reason domain_stopped"
        );
        // QEMU's exit usually reaches the viewer first (1000, the VNC server closed the
        // connection); if the session's close is first, it is 1001 session closed.
        let close = close_of(&mut view_a).await;
        assert!(
            close == (1001, "session closed".into())
                || close == (1000, "VNC server closed the connection".into()),
            "{close:?}"
        );
        // Started again: a fresh session (a new token).
        lv.must(&["start", &a]);
        let started = Instant::now();
        let fresh = until_session(&daemon, &a, Duration::from_secs(1), |s| s.is_some())
            .await
            .expect("session");
        eprintln!(
            "session opened {:?} after virsh start returned",
            started.elapsed()
        );
        assert_ne!(fresh["token"], sa["token"]);

        // Closed through the API: not reopened while the domain runs, not after a restart.
        assert_eq!(
            daemon
                .call("DELETE", &format!("/v1/sessions/{a}"), None)
                .await
                .0,
            204
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            session(&daemon, &a).await.is_none(),
            "reopened while the domain runs"
        );
        // Skipped domains were logged once each by this daemon, through every picture since
        // (a's stop and start, and a re-apply every second).
        assert_eq!(log_count(&log, "--libvirt-id uuid"), 1, "logged once");
        assert_eq!(log_count(&log, "no usable VNC endpoint"), 1, "logged once");
        let (exit, _) = daemon.terminate().await;
        assert!(exit.success());
        let reconciles = log_count(&log, "reconciling");
        daemon.restart().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        while log_count(&log, "reconciling") == reconciles {
            assert!(
                Instant::now() < deadline,
                "the restarted daemon did not reconcile"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A reconcile and a few re-applies later.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(
            session(&daemon, &a).await.is_none(),
            "reopened after a daemon restart"
        );
        // ... until the domain starts again.
        lv.must(&["destroy", &a]);
        lv.must(&["start", &a]);
        let before = until_session(&daemon, &a, Duration::from_secs(3), |s| s.is_some())
            .await
            .expect("session");

        // The domain restarts on another VNC port while vncgate is down (its old port held):
        // at reconcile the session is retargeted, port and token kept.
        let (exit, _) = daemon.terminate().await;
        assert!(exit.success());
        lv.must(&["destroy", &a]);
        let old = before["target"].as_str().expect("target").to_owned();
        let held = std::net::TcpListener::bind(old.as_str()).expect("hold the old VNC port");
        lv.must(&["start", &a]);
        let moved = live_target(&lv, &a);
        assert_ne!(moved, old, "libvirt moved the VNC port");
        daemon.restart().await;
        let after = until_session(&daemon, &a, Duration::from_secs(5), |s| {
            s.is_some_and(|s| s["target"] == moved.as_str())
        })
        .await
        .expect("session");
        assert_eq!(
            (&after["ws_port"], &after["token"]),
            (&before["ws_port"], &before["token"]),
            "retargeted, not reopened"
        );
        drop(held);
        // The restart closed b's viewer (1001 vncgate restarting); a new one.
        drop(view_b);
        let sb = session(&daemon, &b)
            .await
            .expect("b's session survived the restart");
        view_b = viewer(&sb).await;

        // libvirtd goes away: consoles stay, status warns. a's QEMU dies meanwhile.
        lv.stop().await;
        let warned = Instant::now() + Duration::from_secs(10);
        loop {
            let status = daemon.call("GET", "/v1/status", None).await.1;
            if status["warnings"].to_string().contains("libvirt at") {
                break;
            }
            assert!(Instant::now() < warned, "no libvirt warning: {status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            Command::new("pkill")
                .args(["-9", "-f", &format!("guest={a},")])
                .status()
                .expect("pkill")
                .success(),
            "kill a's QEMU"
        );
        assert!(
            session(&daemon, &a).await.is_some(),
            "kept while libvirtd is away"
        );
        lv.launch().await;
        // Back: the warning clears, a (stopped meanwhile) is closed, b is untouched.
        until_session(&daemon, &a, Duration::from_secs(15), |s| s.is_none()).await;
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert!(
            !status["warnings"].to_string().contains("libvirt at"),
            "{status}"
        );
        let kept = session(&daemon, &b).await.expect("b kept");
        assert_eq!(kept["token"], sb["token"]);
        // b's viewer relayed through all of it: the RFB handshake goes on.
        view_b
            .send(Message::Binary(b"RFB 003.008\n".to_vec().into()))
            .await
            .expect("send the client version");
        let security = loop {
            match view_b.next().await.expect("frame").expect("frame") {
                Message::Binary(bytes) => break bytes,
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        assert!(
            !security.is_empty() && security[0] > 0,
            "security types {security:?}"
        );
        drop(view_b);

        // --libvirt-id uuid: the domain whose name is no vm_id gets a session by its UUID.
        let uuid = lv.must(&["domuuid", &bad]).trim().to_owned();
        let by_uuid = DaemonProcess::spawn(
            4,
            &[
                "--libvirt",
                &lv.uri,
                "--libvirt-id",
                "uuid",
                "--cleanup-interval",
                "off",
            ],
        )
        .await;
        let by_id = until_session(&by_uuid, &uuid, Duration::from_secs(10), |s| s.is_some())
            .await
            .expect("session");
        assert_eq!(by_id["target"], live_target(&lv, &bad));

        // The console of b through its session in Chromium shows QEMU's screen.
        console_in_chromium(&sb, &socket, &b).await;
        drop(domains);
        lv.stop().await;
    })
    .await;
}

async fn console_in_chromium(session: &Value, socket: &Path, name: &str) {
    let e2e = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e");
    let playwright = e2e.join("node_modules/playwright-core/package.json");
    if !require(&[
        "/usr/bin/chromium",
        "node",
        &playwright.display().to_string(),
    ]) {
        return;
    }
    let screen = settled_screen(socket, Duration::from_secs(60), |s| {
        s.pixels
            .chunks_exact(4)
            .filter(|p| p[..3] != [0, 0, 0])
            .count()
            > 1000
    })
    .await;
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    std::fs::create_dir_all(&out).expect("out dir");
    let spec = json!({
        "url": session["url"], "outDir": out, "name": "libvirt",
        "width": screen.width, "height": screen.height, "app": "bundled", "action": null,
    });
    let output = tokio::process::Command::new("node")
        .arg(e2e.join("console.mjs"))
        .arg(spec.to_string())
        .current_dir(&e2e)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(120), output)
        .await
        .expect("the browser driver finished in 120 s")
        .expect("run node");
    let text = String::from_utf8_lossy(&output.stdout);
    let result: Value = serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("driver said: {text}"));
    assert_eq!(result["state"], "connected", "{result}");
    assert_eq!(result["desktopName"], format!("QEMU ({name})"), "{result}");
    let canvas = std::fs::read(out.join("libvirt-before.rgba")).expect("canvas dump");
    let ratio = common::rfb::match_ratio(&canvas, &screen);
    assert!(
        ratio >= 0.99,
        "only {:.2}% of the canvas matches the screen",
        ratio * 100.0
    );
}
