//! The durable session table: restarts and crashes lose nothing, one daemon per state file,
//! unusable state files are refused, shutdown is prompt.

mod common;

use common::close_of;
use vncgate::relay::CloseReason;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{DaemonProcess, FakeVnc, GREETING, Lcg, Mode, StateDir, TestGate, bounded};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects, reads the greeting and checks one echo round trip.
async fn relay_works(ws_url: &str) -> Ws {
    let (mut ws, _) = connect_async(ws_url).await.expect("connect");
    let first = ws.next().await.expect("greeting").expect("ok");
    assert_eq!(first.into_data().as_ref(), GREETING);
    ws.send(Message::binary(b"ping".to_vec()))
        .await
        .expect("send");
    loop {
        match ws.next().await.expect("echo").expect("ok") {
            Message::Binary(b) => {
                assert_eq!(b.as_ref(), b"ping");
                return ws;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn close_frame(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(Some(f)))) => return (u16::from(f.code), f.reason.to_string()),
            Some(Ok(_)) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

/// vm_id -> (port, token, target) of a session list.
fn table(list: &Value) -> HashMap<String, (u64, String, String)> {
    list["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .map(|s| {
            (
                s["vm_id"].as_str().expect("vm_id").to_owned(),
                (
                    s["ws_port"].as_u64().expect("port"),
                    s["token"].as_str().expect("token").to_owned(),
                    s["target"].as_str().expect("target").to_owned(),
                ),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_restart_keep_every_session_and_its_url() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(8, &[]).await;
        for i in 0..3 {
            daemon.open_ok(&format!("vm-{i}"), &fake.target).await;
        }
        let (_, before) = daemon.call("GET", "/v1/sessions", None).await;
        let url = before["sessions"][1]["ws_url"]
            .as_str()
            .expect("ws_url")
            .to_owned();
        let mut ws = relay_works(&url).await;

        let (status, took) = daemon.terminate().await;
        assert!(status.success(), "exit status {status}");
        assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
        assert_eq!(
            close_frame(&mut ws).await,
            close_of(CloseReason::Restarting)
        );

        daemon.restart().await;
        // /healthz answered, so the table is back already.
        let (_, after) = daemon.call("GET", "/v1/sessions", None).await;
        assert_eq!(table(&after), table(&before));
        relay_works(&url).await;
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert_eq!(status["system_health"], "healthy", "{status}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_keep_the_ws_url_working() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(4, &[]).await;
        let s = daemon.open_ok("vm-crash", &fake.target).await;
        let url = s["ws_url"].as_str().expect("ws_url").to_owned();
        let _ws = relay_works(&url).await;
        daemon.kill9();
        // The kernel released the lock with the process: no manual clean-up before restarting.
        daemon.restart().await;
        relay_works(&url).await;
        let (_, again) = daemon.call("GET", "/v1/sessions/vm-crash", None).await;
        assert_eq!(
            (again["ws_port"].clone(), again["token"].clone()),
            (s["ws_port"].clone(), s["token"].clone())
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_200_concurrent_calls_loses_no_acknowledged_change() {
    bounded(Duration::from_secs(180), async {
        let seed: u64 = std::env::var("VNCGATE_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(7, |d| d.as_nanos() as u64));
        eprintln!("crash test seed: {seed} (rerun with VNCGATE_CRASH_SEED={seed})");
        let mut rng = Lcg(seed);
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(400, &[]).await;
        for round in 0..3 {
            // Baseline: 100 sessions, acknowledged before the crash window.
            for i in 0..100 {
                daemon.open_ok(&format!("r{round}-base-{i}"), &fake.target).await;
            }
            let (_, base) = daemon.call("GET", "/v1/sessions", None).await;
            let base = table(&base);
            // 200 concurrent calls: close 100 baseline sessions, open 100 new ones.
            let api = daemon.api;
            let http = daemon.http.clone();
            let mut calls = Vec::new();
            for i in 0..100 {
                let http_close = http.clone();
                calls.push(tokio::spawn(async move {
                    let http = http_close;
                    let vm = format!("r{round}-base-{i}");
                    let req = hyper::Request::delete(format!("http://{api}/v1/sessions/{vm}"))
                        .body(http_body_util::Full::new(bytes::Bytes::new()))
                        .expect("request");
                    let acked = matches!(http.request(req).await, Ok(r) if r.status() == 204);
                    (vm, false, acked, None)
                }));
                let http = http.clone();
                let target = fake.target.clone();
                calls.push(tokio::spawn(async move {
                    let vm = format!("r{round}-new-{i}");
                    let body = serde_json::json!({"vm_id": vm, "target": target}).to_string();
                    let req = hyper::Request::post(format!("http://{api}/v1/sessions"))
                        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        .expect("request");
                    let mut acked = None;
                    if let Ok(r) = http.request(req).await
                        && r.status() == 201
                        && let Ok(body) = http_body_util::BodyExt::collect(r.into_body()).await
                        && let Ok(v) = serde_json::from_slice::<Value>(&body.to_bytes())
                    {
                        acked = Some((v["ws_port"].as_u64().unwrap_or(0), v["token"].as_str().unwrap_or("").to_owned()));
                    }
                    (vm, true, acked.is_some(), acked)
                }));
            }
            let delay = Duration::from_micros(1_000 + rng.next() % 50_000);
            tokio::time::sleep(delay).await;
            daemon.kill9();
            let mut acked_opens = 0;
            let mut acked_closes = 0;
            let mut outcomes = Vec::new();
            for c in calls {
                outcomes.push(c.await.expect("call task"));
            }
            daemon.restart().await;
            let (_, after) = daemon.call("GET", "/v1/sessions", None).await;
            let after = table(&after);
            for (vm, is_open, acked, session) in outcomes {
                if !acked {
                    continue;
                }
                if is_open {
                    acked_opens += 1;
                    let (port, token) = session.expect("acked open has a session");
                    let got = after.get(&vm).unwrap_or_else(|| panic!("seed {seed} round {round}: acknowledged open of {vm} lost"));
                    assert_eq!((got.0, &got.1), (port, &token), "seed {seed}: {vm} came back changed");
                } else {
                    acked_closes += 1;
                    assert!(!after.contains_key(&vm), "seed {seed} round {round}: acknowledged close of {vm} came back");
                }
            }
            for (vm, (port, token, _)) in &base {
                if let Some(got) = after.get(vm) {
                    assert_eq!((&got.0, &got.1), (port, token), "seed {seed}: {vm} changed");
                }
            }
            eprintln!("round {round}: killed after {delay:?}; {acked_opens} opens and {acked_closes} closes acknowledged, all as expected after restart");
            // Clean slate for the next round.
            for vm in after.keys() {
                assert_eq!(daemon.call("DELETE", &format!("/v1/sessions/{vm}"), None).await.0, 204);
            }
        }
    })
    .await;
}

/// Runs `vncgate serve` with `args` beside `daemon`, on another API port (so a refusal can only
/// come from the state lock); returns (exit success, stderr) once it exits, within 10 s.
async fn second_daemon(daemon: &DaemonProcess, mut args: Vec<String>) -> (bool, String) {
    common::set_flag(
        &mut args,
        "--api-listen",
        format!("127.0.0.1:{}", daemon.block.spare() - 1),
    );
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
            .arg("serve")
            .args(&args)
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second daemon exits at once")
    .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_daemon_on_the_same_state_file_is_refused() {
    bounded(Duration::from_secs(30), async {
        let daemon = DaemonProcess::spawn(2, &[]).await;
        let args = daemon.args.clone();
        let (ok, stderr) = second_daemon(&daemon, args).await;
        assert!(!ok);
        let want = format!(
            "another vncgate (pid {}) is serving {}",
            daemon.pid(),
            daemon.state.file().display()
        );
        assert!(stderr.contains(&want), "{stderr}");
    })
    .await;
}

/// A `--state-file` that is a symbolic link: the daemon writes and locks the file it points
/// to, so the link stays a link, the real file gets every change, and a daemon given the real
/// path is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlinked_state_file_is_written_and_locked_through() {
    bounded(Duration::from_secs(60), async {
        let mut daemon = DaemonProcess::spawn(3, &[]).await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        daemon.open_ok("vm-before", &fake.target).await;
        daemon.terminate().await;
        let real = daemon.state.file();
        let link = daemon.state.0.join("link.json");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        daemon.set_arg("--state-file", link.display().to_string());
        daemon.restart().await;
        daemon.open_ok("vm-after", &fake.target).await;
        let meta = std::fs::symlink_metadata(&link).expect("link");
        assert!(
            meta.file_type().is_symlink(),
            "the link was replaced by a file"
        );
        let on_disk = std::fs::read_to_string(&real).expect("real file");
        assert!(
            on_disk.contains("vm-before") && on_disk.contains("vm-after"),
            "{on_disk}"
        );
        // A second daemon given the real path finds the lock the first took through the link.
        let mut args = daemon.args.clone();
        common::set_flag(&mut args, "--state-file", real.display().to_string());
        let (ok, stderr) = second_daemon(&daemon, args).await;
        assert!(!ok);
        assert!(
            stderr.contains(&format!(
                "another vncgate (pid {}) is serving",
                daemon.pid()
            )),
            "{stderr}"
        );
        // A relative link resolves to the same file, so its lock is held too.
        let relative = daemon.state.0.join("relative.json");
        std::os::unix::fs::symlink("state.json", &relative).expect("symlink");
        let (ok, err) = serve_once(&relative, &[], false)
            .await
            .expect("refused at start");
        assert!(!ok && err.contains("another vncgate"), "{err}");
        // A link made before the first start, to a file not written yet, is fine.
        let fresh_dir = daemon.state.0.join("fresh");
        std::fs::create_dir_all(&fresh_dir).expect("dir");
        let first_start = daemon.state.0.join("first.json");
        std::os::unix::fs::symlink(fresh_dir.join("state.json"), &first_start).expect("symlink");
        assert!(
            serve_once(&first_start, &[], false).await.is_none(),
            "a link to a file not written yet starts"
        );
        assert!(
            fresh_dir.join("state.json").is_file(),
            "written at its target"
        );
        // A link to a directory is refused.
        let to_dir = daemon.state.0.join("to-dir.json");
        std::os::unix::fs::symlink(&fresh_dir, &to_dir).expect("symlink");
        let (ok, err) = serve_once(&to_dir, &[], false)
            .await
            .expect("refused at start");
        assert!(!ok && err.contains("not a regular file"), "{err}");
        // A link into a directory that does not exist is refused at start, naming it.
        let dangling = daemon.state.0.join("dangling.json");
        std::os::unix::fs::symlink(daemon.state.0.join("missing/state.json"), &dangling)
            .expect("symlink");
        let (ok, err) = serve_once(&dangling, &[], false)
            .await
            .expect("refused at start");
        assert!(!ok);
        assert!(
            err.contains("is a symbolic link whose target cannot be resolved"),
            "{err}"
        );
    })
    .await;
}

/// A tmpfs of 64 KiB, unmounted on drop.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    /// `None` where mounting is not allowed (no CAP_SYS_ADMIN).
    fn mount(at: std::path::PathBuf) -> Option<SmallDisk> {
        std::fs::create_dir_all(&at).expect("mount point");
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(at))
    }

    /// Writes a file that takes every free byte.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = [0u8; 4096];
        while f.write_all(&chunk).is_ok() {}
        // Then the last bytes, so not even a small state file fits.
        while f.write_all(&[0]).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // Lazily: a daemon still holding its lock file there must not keep it mounted.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// A full disk at start: a restored table the file already holds is served (the rewrite fails,
/// status says so, changes fail and are rolled back), and writing works again once there is
/// room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_start_keeps_the_restored_consoles_up() {
    bounded(Duration::from_secs(60), async {
        let mut daemon = DaemonProcess::spawn(4, &[]).await;
        daemon.terminate().await;
        let Some(disk) = SmallDisk::mount(daemon.state.0.join("small")) else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (needs CAP_SYS_ADMIN)");
            return;
        };
        daemon.set_arg(
            "--state-file",
            disk.0.join("state.json").display().to_string(),
        );
        daemon.restart().await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        for vm in ["vm-a", "vm-b"] {
            daemon.open_ok(vm, &fake.target).await;
        }
        daemon.terminate().await;
        // The writer keeps a spare file whose blocks the next write reuses (so a full disk
        // alone does not stop it); without it, the start-up write needs new blocks.
        let _ = std::fs::remove_file(disk.0.join(".state.json.tmp"));
        let filler = disk.fill();
        daemon.restart().await;
        let (_, list) = daemon.call("GET", "/v1/sessions", None).await;
        assert_eq!(list["sessions"].as_array().map(Vec::len), Some(2), "{list}");
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert!(
            status["warnings"]
                .to_string()
                .contains("state write failed"),
            "{status}"
        );
        let (code, err) = daemon
            .call(
                "POST",
                "/v1/sessions",
                Some(
                    serde_json::json!({"vm_id": "vm-c", "target": fake.target})
                        .to_string()
                        .as_bytes(),
                ),
            )
            .await;
        assert_eq!(
            (code, err["error"]["code"].as_str()),
            (500, Some("coordination_failed")),
            "{err}"
        );
        std::fs::remove_file(&filler).expect("make room");
        daemon.open_ok("vm-c", &fake.target).await;
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert_eq!(status["system_health"], "healthy", "{status}");
        daemon.terminate().await;
        drop(disk);
    })
    .await;
}

/// Runs `vncgate serve` on `state` and returns (exit success, stderr) when it exits, or None
/// when it is still running after the API answered (it started).
async fn serve_once(
    state: &std::path::Path,
    extra: &[&str],
    as_nobody: bool,
) -> Option<(bool, String)> {
    let block = common::PortBlock::take();
    let mut cmd = if as_nobody {
        let mut c = tokio::process::Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_vncgate"),
        ]);
        c
    } else {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
    };
    cmd.arg("serve")
        .args(["--api-listen", &format!("127.0.0.1:{}", block.spare())])
        .args([
            "--listen-host",
            "127.0.0.1",
            "--port-range",
            &format!("{}-{}", block.first, block.first + 9),
        ])
        .arg("--state-file")
        .arg(state)
        .args(extra)
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().expect("start vncgate");
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use tokio::io::AsyncReadExt;
                let _ = e.read_to_string(&mut err).await;
            }
            return Some((status.success(), err));
        }
        if let Ok(r) = http
            .get(
                format!("http://127.0.0.1:{}/healthz", block.spare())
                    .parse()
                    .expect("uri"),
            )
            .await
            && r.status() == 200
        {
            let _ = child.kill().await;
            return None;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "vncgate neither started nor exited"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn corrupt_copies(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_state_files_are_refused_kept_and_only_replaced_on_request() {
    bounded(Duration::from_secs(60), async {
        let cases: [(&str, &[u8], &str); 3] = [
            (
                "truncated",
                br#"{"version": 1, "sessions": [{"vm_id": "vm-1", "tar"#,
                "not valid JSON",
            ),
            ("garbage", b"\x7fELF\x02\x01\x01 garbage", "not valid JSON"),
            (
                "future schema",
                br#"{"version": 2, "sessions": []}"#,
                "schema version 2 is unknown",
            ),
        ];
        for (name, bytes, reason) in cases {
            let dir = StateDir::new();
            std::fs::write(dir.file(), bytes).expect("write");
            let (ok, stderr) = serve_once(&dir.file(), &[], false)
                .await
                .expect("must refuse to start");
            assert!(!ok, "{name}: exit status");
            assert!(
                stderr.contains(reason) && stderr.contains("--start-empty"),
                "{name}: {stderr}"
            );
            assert_eq!(
                std::fs::read(dir.file()).expect("still there"),
                bytes,
                "{name}: the file is untouched"
            );
            assert_eq!(corrupt_copies(&dir.0), 1, "{name}: a copy is kept aside");
            assert!(
                serve_once(&dir.file(), &["--start-empty"], false)
                    .await
                    .is_none(),
                "{name}: --start-empty starts"
            );
            assert_eq!(
                corrupt_copies(&dir.0),
                2,
                "{name}: the bad file was moved aside"
            );
        }
        // A directory where the file should be.
        let dir = StateDir::new();
        std::fs::create_dir(dir.file()).expect("mkdir");
        let (ok, stderr) = serve_once(&dir.file(), &[], false)
            .await
            .expect("must refuse");
        assert!(!ok && stderr.contains("it is a directory"), "{stderr}");
        assert!(
            serve_once(&dir.file(), &["--start-empty"], false)
                .await
                .is_none()
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_state_file_is_refused_for_an_unprivileged_daemon() {
    use std::os::unix::fs::PermissionsExt;
    if !common::vnc::require(&["setpriv"]) {
        return;
    }
    bounded(Duration::from_secs(30), async {
        let dir = StateDir::new();
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o777))
            .expect("chmod dir");
        std::fs::write(dir.file(), br#"{"version": 1, "sessions": []}"#).expect("write");
        std::fs::set_permissions(dir.file(), std::fs::Permissions::from_mode(0o000))
            .expect("chmod file");
        let (ok, stderr) = serve_once(&dir.file(), &[], true)
            .await
            .expect("must refuse");
        assert!(!ok);
        assert!(
            stderr.contains("cannot read it") && stderr.contains("ermission denied"),
            "{stderr}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_800_live_connections_exits_0_within_5_s() {
    bounded(Duration::from_secs(120), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(800, &["--max-sessions", "800"]).await;
        let daemon_ref = &daemon;
        let urls: Vec<String> = futures_util::stream::iter(0..800)
            .map(|i| {
                let target = fake.target.clone();
                async move {
                    daemon_ref.open_ok(&format!("vm-{i}"), &target).await["ws_url"]
                        .as_str()
                        .expect("ws_url")
                        .to_owned()
                }
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let viewers: Vec<Ws> = futures_util::stream::iter(urls)
            .map(|u| async move {
                let (mut ws, _) = connect_async(u.as_str()).await.expect("connect");
                ws.next().await.expect("greeting").expect("ok");
                ws
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let live = daemon.call("GET", "/v1/status", None).await.1["active_connections"].clone();
        assert_eq!(live, 800);
        let closes = viewers
            .into_iter()
            .map(|mut ws| tokio::spawn(async move { close_frame(&mut ws).await }));
        let closes: Vec<_> = closes.collect();
        let (status, took) = daemon.terminate().await;
        eprintln!("SIGTERM with 800 live connections: exit {status} after {took:?}");
        assert!(status.success(), "{status}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        for c in closes {
            assert_eq!(c.await.expect("viewer"), close_of(CloseReason::Restarting));
        }
        let _ = &mut daemon;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_state_write_fails_the_call_rolls_it_back_and_shows_in_status() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(4).await;
        let kept = gate.open_ok("vm-kept", &fake.target).await;
        let mut viewer = relay_works(kept["ws_url"].as_str().expect("ws_url")).await;
        // Take the state file's directory away: every write now fails.
        std::fs::remove_dir_all(&gate.state.0).expect("remove state dir");
        let (status, err) = gate.open("vm-new", &fake.target).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (500, Some("coordination_failed")),
            "{err}"
        );
        assert_eq!(gate.session_count().await, 1, "the open was rolled back");
        let (status, err) = gate.call("DELETE", "/v1/sessions/vm-kept", None).await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (500, Some("coordination_failed"))
        );
        let (status, err) = gate.open("vm-kept", "127.0.0.1:1").await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (500, Some("coordination_failed"))
        );
        let (status, err) = gate
            .call(
                "POST",
                "/v1/sessions/vm-kept/token",
                Some(br#"{"disconnect": true}"#),
            )
            .await;
        assert_eq!(
            (status, err["error"]["code"].as_str()),
            (500, Some("coordination_failed")),
            "a rotation that cannot be written is rolled back"
        );
        // Nothing changed for the session or its viewer.
        let (_, s) = gate.call("GET", "/v1/sessions/vm-kept", None).await;
        assert_eq!(s["token"], kept["token"], "the old token still stands");
        assert_eq!(
            (s["target"].clone(), s["ws_port"].clone()),
            (kept["target"].clone(), kept["ws_port"].clone())
        );
        viewer
            .send(Message::binary(b"still".to_vec()))
            .await
            .expect("send");
        let echo = viewer.next().await.expect("echo").expect("ok");
        assert_eq!(echo.into_data().as_ref(), b"still");
        let status = gate.status().await;
        assert_eq!(status["port_pool"]["allocated_ports"], 1);
        assert_eq!(status["system_health"], "warning");
        assert!(
            status["warnings"]
                .to_string()
                .contains("state write failed"),
            "{status}"
        );
        // The directory is back: writes work and the warning clears.
        std::fs::create_dir_all(&gate.state.0).expect("recreate");
        assert_eq!(gate.open("vm-new", &fake.target).await.0, 201);
        let status = gate.status().await;
        assert_eq!(status["system_health"], "healthy", "{status}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hundred_concurrent_opens_share_state_writes() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = Arc::new(TestGate::start_with(800, |c| c.max_sessions = 800).await);
        let writes_before = gate
            .daemon()
            .registry()
            .commit_stats()
            .writes
            .load(std::sync::atomic::Ordering::SeqCst);
        let mut clients = Vec::new();
        for c in 0..64 {
            let gate = Arc::clone(&gate);
            let target = fake.target.clone();
            clients.push(tokio::spawn(async move {
                for i in (c..800).step_by(64) {
                    assert_eq!(gate.open(&format!("vm-{i}"), &target).await.0, 201);
                }
            }));
        }
        for c in clients {
            c.await.expect("client");
        }
        let writes = gate
            .daemon()
            .registry()
            .commit_stats()
            .writes
            .load(std::sync::atomic::Ordering::SeqCst)
            - writes_before;
        eprintln!("800 acknowledged opens took {writes} state writes");
        assert!(
            writes < 400,
            "{writes} writes for 800 opens: no group commit"
        );
        let on_disk: Value =
            serde_json::from_slice(&std::fs::read(gate.state.file()).expect("state file"))
                .expect("json");
        assert_eq!(on_disk["sessions"].as_array().map(Vec::len), Some(800));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_taken_while_down_moves_its_session_with_a_warning() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut daemon = DaemonProcess::spawn(4, &[]).await;
        let a = daemon.open_ok("vm-a", &fake.target).await;
        let b = daemon.open_ok("vm-b", &fake.target).await;
        daemon.terminate().await;
        let taken = a["ws_port"].as_u64().expect("port") as u16;
        let _squatter = std::net::TcpListener::bind(("127.0.0.1", taken)).expect("take the port");
        daemon.restart().await;
        let (_, moved) = daemon.call("GET", "/v1/sessions/vm-a", None).await;
        assert_ne!(moved["ws_port"].as_u64(), Some(u64::from(taken)));
        assert_eq!(moved["token"], a["token"], "same token on the new port");
        relay_works(moved["ws_url"].as_str().expect("ws_url")).await;
        let (_, same) = daemon.call("GET", "/v1/sessions/vm-b", None).await;
        assert_eq!(same["ws_port"], b["ws_port"]);
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert_eq!(status["system_health"], "warning");
        assert!(
            status["warnings"]
                .to_string()
                .contains("vm-a moved from port"),
            "{status}"
        );
        // The move itself was written: another restart keeps the new port.
        daemon.terminate().await;
        daemon.restart().await;
        let (_, again) = daemon.call("GET", "/v1/sessions/vm-a", None).await;
        assert_eq!(again["ws_port"], moved["ws_port"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_whose_clients_hang_up_or_never_read_leave_the_file_equal_to_the_table() {
    use tokio::io::AsyncWriteExt;
    bounded(Duration::from_secs(30), async {
        let gate = TestGate::start(40).await;
        let mut never_read = Vec::new();
        for i in 0..30 {
            let mut s = tokio::net::TcpStream::connect(gate.api)
                .await
                .expect("api");
            let body = format!(r#"{{"vm_id": "vm-gone-{i}", "target": "127.0.0.1:5999"}}"#);
            let request = format!(
                "POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(request.as_bytes()).await.expect("send");
            if i % 2 == 0 {
                // Hang up without waiting for the answer.
                s.shutdown().await.expect("hang up");
            } else {
                // Stay connected but never read the answer.
                never_read.push(s);
            }
        }
        // hyper drops a request whose client half-closed (some of these never start); the
        // ones that started must finish whole. Shutdown waits for every task, then writes.
        let registry = std::sync::Arc::clone(gate.daemon().registry());
        // The 15 still connected are answered whatever happens to the others.
        let connected_ones_open = common::wait_until(Duration::from_secs(10), || {
            (1..30)
                .step_by(2)
                .all(|i| registry.get(&format!("vm-gone-{i}")).is_some())
        })
        .await;
        assert!(connected_ones_open, "the clients that stayed connected got their sessions");
        let mut gate = gate;
        let daemon = gate.daemon.take().expect("daemon");
        assert!(daemon.shutdown().await, "every task ended");
        let doc: Value = serde_json::from_slice(&std::fs::read(gate.state.file()).expect("file"))
            .expect("json");
        let mut on_disk: Vec<String> = doc["sessions"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s["vm_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        on_disk.sort();
        let table: Vec<String> = registry.list().iter().map(|s| s.vm_id.clone()).collect();
        eprintln!("{} of 30 opens (15 hung up) finished", table.len());
        assert_eq!(on_disk, table, "the file holds exactly the table");
        drop(never_read);
    })
    .await;
}

/// A hand-edited state file no daemon could have written (two records for one vm_id, an empty
/// token) stops the start with a message naming the record, and is kept aside untouched.
#[test]
fn a_state_file_with_duplicate_vm_ids_or_bad_tokens_is_refused_naming_the_record() {
    let good = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978";
    let record = |vm: &str, port: u16, token: &str| {
        serde_json::json!({"vm_id": vm, "target": "127.0.0.1:5900", "ws_port": port,
            "tokens": [{"value": token, "expires_at": null}], "created_at": "2026-11-01T10:00:00Z"})
    };
    let cases = [
        (
            vec![record("vm-a", 10, good), record("vm-a", 11, good)],
            "vm-a",
        ),
        (vec![record("vm-b", 10, "")], "vm-b"),
    ];
    for (sessions, names) in cases {
        let state = common::StateDir::new();
        let doc = serde_json::json!({"version": 1, "sessions": sessions});
        std::fs::write(state.file(), doc.to_string()).expect("write state file");
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
            .args(["serve", "--api-listen", "127.0.0.1:0", "--state-file"])
            .arg(state.file())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run vncgate");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(names),
            "the message names {names}: {stderr}"
        );
        assert_eq!(
            std::fs::read_to_string(state.file()).expect("still there"),
            doc.to_string(),
            "the file is left as it was"
        );
    }
}
