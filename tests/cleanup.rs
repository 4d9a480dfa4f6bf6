//! The cleanup pass (DESIGN.md "Cleanup, metrics, events"): sessions without viewers whose VNC
//! server is gone are closed after `--stale-after`, a server that comes back keeps its session,
//! a live viewer keeps its session, and a pass over hanging targets is bounded by the probe
//! timeout, not the number of sessions. Timing on tokio's paused clock; one end-to-end test
//! with a real Xvnc that is stopped.

mod common;

use std::time::Duration;

use common::vnc::{Scratch, Xvnc, require};
use common::{DaemonProcess, FakeVnc, Mode, TestGate, bounded};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, UnixListener};
use tokio::time::Instant;

/// Serves the RFB greeting on `listener` until dropped (a VNC server that came back).
fn greet_on(listener: UnixListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut s, _)) = listener.accept().await {
            let _ = s.write_all(common::GREETING).await;
            held.push(s);
        }
    })
}

/// Passes are run by hand here (`POST /v1/cleanup`) with the paused clock advanced between
/// them: the periodic timer would fire whenever the runtime waits for the kernel.
#[tokio::test(start_paused = true)]
async fn stale_sessions_close_after_stale_after_and_live_ones_stay() {
    let mut gate = TestGate::start_with(5, |c| {
        c.cleanup_interval = None;
        c.stale_after = Duration::from_secs(300);
    })
    .await;
    // No kept-alive API connection: the clock jumps past the daemon's idle limit between calls.
    gate.http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let alive = FakeVnc::tcp(Mode::Echo).await;
    gate.open_ok("vm-alive", &alive.target).await;
    gate.open_ok("vm-dead", "127.0.0.1:1").await;
    let back_path = std::env::temp_dir().join(format!("vncgate-back-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&back_path);
    gate.open_ok("vm-back", &format!("unix:{}", back_path.display()))
        .await;
    // A viewer's VNC server stops listening, but the viewer's own connection stays up.
    let watched = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let watched_target = watched.local_addr().expect("addr").to_string();
    let viewed = gate.open_ok("vm-viewed", &watched_target).await;
    let (mut viewer, _) =
        tokio_tungstenite::connect_async(viewed["ws_url"].as_str().expect("ws_url"))
            .await
            .expect("viewer");
    let (mut relay_side, _) = watched.accept().await.expect("the relay connects");
    relay_side.write_all(common::GREETING).await.expect("greet");
    {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            match viewer.next().await.expect("greeting").expect("frame") {
                Message::Binary(b) => {
                    assert_eq!(b.as_ref(), common::GREETING);
                    break;
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    // The viewer answers pings from here on, as a browser would.
    let viewer = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(_)) = viewer.next().await {}
    });
    drop(watched);

    let pass = || async { gate.call("POST", "/v1/cleanup", None).await.1 };
    let names = |report: &serde_json::Value| -> Vec<String> {
        report["closed"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["vm_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = pass().await;
    let t1 = Instant::now();
    assert_eq!(
        first["checked"], 3,
        "the viewed session is not checked: {first}"
    );
    assert!(names(&first).is_empty());
    tokio::time::advance(Duration::from_secs(150)).await;
    let second = pass().await;
    assert!(
        names(&second).is_empty(),
        "nothing is stale yet ({:?} in): {second}",
        t1.elapsed()
    );
    // vm-back's server comes back: its failures are forgotten at the next good check.
    let back = UnixListener::bind(&back_path).expect("bind");
    let _back_server = greet_on(back);
    let third = pass().await;
    assert!(names(&third).is_empty(), "{third}");
    tokio::time::advance(Duration::from_secs(200)).await;
    let fourth = pass().await;
    assert!(t1.elapsed() >= Duration::from_secs(300));
    assert_eq!(names(&fourth), vec!["vm-dead".to_owned()], "{fourth}");
    assert_eq!(fourth["closed"][0]["reason"], "target gone");
    let registry = gate.daemon().registry();
    for vm in ["vm-alive", "vm-back", "vm-viewed"] {
        assert!(registry.get(vm).is_some(), "{vm} was closed");
    }
    let status = gate.status().await;
    assert_eq!(status["last_cleanup"]["closed"], 1, "{status}");
    assert!(status["last_cleanup"]["time"].is_string());
    // The close was written like a DELETE.
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(gate.state.file()).expect("state")).expect("json");
    let on_disk: Vec<&str> = file["sessions"]
        .as_array()
        .expect("sessions")
        .iter()
        .filter_map(|s| s["vm_id"].as_str())
        .collect();
    assert!(!on_disk.contains(&"vm-dead"), "{file}");
    assert_eq!(on_disk.len(), 3, "{file}");
    drop(relay_side);
    viewer.abort();
    let _ = std::fs::remove_file(&back_path);
}

/// A record of failures belongs to one session and one target, not to a vm_id: a console
/// closed and opened again (a VM rebooted) between two passes, or retargeted away and back,
/// gets its full --stale-after before it is closed. A token rotation changes neither and does
/// not postpone the close.
#[tokio::test(start_paused = true)]
async fn a_reopened_or_retargeted_session_does_not_inherit_old_failures() {
    let mut gate = TestGate::start_with(4, |c| {
        c.cleanup_interval = None;
        c.stale_after = Duration::from_secs(60);
    })
    .await;
    gate.http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    let dead = "127.0.0.1:1";
    let elsewhere = FakeVnc::tcp(Mode::Echo).await;
    gate.open_ok("vm-reboot", dead).await;
    gate.open_ok("vm-moved", dead).await;
    gate.open_ok("vm-rotated", dead).await;
    let (_, first) = gate.call("POST", "/v1/cleanup", None).await;
    assert_eq!(first["closed"], serde_json::json!([]), "{first}");
    tokio::time::advance(Duration::from_secs(90)).await;
    // Both have failed for 90 s, past --stale-after. Now vm-reboot is closed and opened again
    // with the same target, and vm-moved is retargeted away and back.
    let (code, _) = gate.call("DELETE", "/v1/sessions/vm-reboot", None).await;
    assert_eq!(code, 204);
    gate.open_ok("vm-reboot", dead).await;
    gate.open_ok("vm-moved", &elsewhere.target).await;
    gate.open_ok("vm-moved", dead).await;
    let (code, _) = gate
        .call(
            "POST",
            "/v1/sessions/vm-rotated/token",
            Some(br#"{"disconnect": true}"#),
        )
        .await;
    assert_eq!(code, 200);
    let (_, second) = gate.call("POST", "/v1/cleanup", None).await;
    let closed = second["closed"].as_array().expect("closed");
    let names: Vec<&str> = closed.iter().filter_map(|c| c["vm_id"].as_str()).collect();
    assert_eq!(
        names,
        ["vm-rotated"],
        "only the rotated one has failed for 60 s as it is: {second}"
    );
    tokio::time::advance(Duration::from_secs(61)).await;
    let (_, third) = gate.call("POST", "/v1/cleanup", None).await;
    let mut closed: Vec<&str> = third["closed"]
        .as_array()
        .expect("closed")
        .iter()
        .filter_map(|c| c["vm_id"].as_str())
        .collect();
    closed.sort_unstable();
    assert_eq!(closed, ["vm-moved", "vm-reboot"], "{third}");
}

/// The periodic pass runs by itself every --cleanup-interval.
#[tokio::test(start_paused = true)]
async fn the_periodic_pass_closes_a_dead_target_by_itself() {
    let gate = TestGate::start_with(2, |c| {
        c.cleanup_interval = Some(Duration::from_secs(30));
        c.stale_after = Duration::from_secs(60);
    })
    .await;
    let start = Instant::now();
    gate.open_ok("vm-dead", "127.0.0.1:1").await;
    while gate.daemon().registry().get("vm-dead").is_some() {
        assert!(start.elapsed() < Duration::from_secs(600), "never closed");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // First failing check at a tick, closed at the first tick 60 s later.
    assert!(
        start.elapsed() >= Duration::from_secs(60),
        "{:?}",
        start.elapsed()
    );
    assert!(gate.status().await["last_cleanup"].is_object());
}

#[tokio::test(start_paused = true)]
async fn a_pass_reports_what_it_closed() {
    let gate = TestGate::start_with(2, |c| {
        c.cleanup_interval = None;
        c.stale_after = Duration::from_secs(60);
    })
    .await;
    gate.open_ok("vm-gone", "127.0.0.1:1").await;
    let (_, first) = gate.call("POST", "/v1/cleanup", None).await;
    assert_eq!(
        (
            first["checked"].as_u64(),
            first["closed"].as_array().map(Vec::len)
        ),
        (Some(1), Some(0))
    );
    tokio::time::sleep(Duration::from_secs(61)).await;
    let (_, second) = gate.call("POST", "/v1/cleanup", None).await;
    let closed = &second["closed"][0];
    assert_eq!(closed["vm_id"], "vm-gone", "{second}");
    assert_eq!(closed["target"], "127.0.0.1:1");
    assert_eq!(closed["reason"], "target gone");
    assert!(
        closed["failing_since"]
            .as_str()
            .is_some_and(|t| humantime::parse_rfc3339(t).is_ok())
    );
    assert_eq!(gate.call("GET", "/v1/sessions/vm-gone", None).await.0, 404);
}

/// 800 sessions whose targets accept and never send: the probes run 256 at a time, so the
/// pass takes about ceil(800 / 256) x 2 s, not 800 x 2 s.
#[tokio::test(start_paused = true)]
async fn a_pass_over_800_hanging_targets_is_bounded_by_the_probe_timeout() {
    vncgate::raise_nofile_limit();
    let hanging = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let target = hanging.local_addr().expect("addr").to_string();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hanging.accept().await {
            held.push(s);
        }
    });
    let gate = TestGate::start_with(800, |c| {
        c.max_sessions = 800;
        c.cleanup_interval = None;
    })
    .await;
    let registry = std::sync::Arc::clone(gate.daemon().registry());
    for i in 0..800 {
        registry
            .open(&format!("vm-{i}"), &target, Default::default())
            .await
            .expect("open");
    }
    let start = Instant::now();
    // Two at once: the second waits for the running pass and gets its report.
    let ((status, report), (_, other)) = tokio::join!(
        gate.call("POST", "/v1/cleanup", None),
        gate.call("POST", "/v1/cleanup", None)
    );
    let took = start.elapsed();
    assert_eq!(status, 200);
    assert_eq!(report["checked"], 800);
    assert_eq!(
        report["finished_at"], other["finished_at"],
        "one pass, not two"
    );
    assert_eq!(report["duration_ms"], other["duration_ms"]);
    let waves = 800_u32.div_ceil(vncgate::cleanup::MAX_PROBES as u32);
    let bound = vncgate::cleanup::PROBE_TIMEOUT * waves + Duration::from_secs(2);
    assert!(
        took >= vncgate::cleanup::PROBE_TIMEOUT && took <= bound,
        "a pass over 800 hanging targets took {took:?} (bound {bound:?})"
    );
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_xvnc_loses_its_session_and_the_port_is_bound_again() {
    if !require(&["Xvnc"]) {
        return;
    }
    bounded(Duration::from_secs(120), async {
        let gone_dir = Scratch::new("cleanup-xvnc");
        let back_dir = Scratch::new("cleanup-xvnc-back");
        let xvnc = Xvnc::start(&gone_dir.0, "cleanup").await;
        let back = Xvnc::start(&back_dir.0, "cleanup-back").await;
        let daemon =
            DaemonProcess::spawn(3, &["--cleanup-interval", "500ms", "--stale-after", "10s"]).await;
        let session = daemon
            .open_ok("vm-xvnc", &format!("unix:{}", xvnc.socket.display()))
            .await;
        daemon
            .open_ok("vm-back", &format!("unix:{}", back.socket.display()))
            .await;
        // While they run, passes keep them.
        let (_, report) = daemon.call("POST", "/v1/cleanup", None).await;
        assert_eq!(report["checked"], 2, "{report}");
        assert_eq!(report["closed"], serde_json::json!([]), "{report}");
        let stopped = tokio::time::Instant::now();
        let back_socket = back.socket.clone();
        drop(xvnc);
        drop(back);
        // vm-back's VNC server comes back well within --stale-after (a VM that rebooted).
        let _ = std::fs::remove_file(&back_socket);
        let back = Xvnc::start(&back_dir.0, "cleanup-back").await;
        assert!(
            stopped.elapsed() < Duration::from_secs(8),
            "Xvnc took {:?} to come back: too close to --stale-after for this test",
            stopped.elapsed()
        );
        let deadline = stopped + Duration::from_secs(30);
        // The session leaves the table as its close starts and frees its port as the close
        // ends (a DELETE answers after both); wait for both.
        loop {
            let gone = daemon.call("GET", "/v1/sessions/vm-xvnc", None).await.0 == 404;
            let status = daemon.call("GET", "/v1/status", None).await.1;
            if gone && status["port_pool"]["allocated_ports"] == 1 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the session outlived its Xvnc by 30 s: {status}"
            );
            // Polling the daemon's periodic pass.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            stopped.elapsed() >= Duration::from_secs(10),
            "closed before --stale-after: {:?}",
            stopped.elapsed()
        );
        let (code, kept) = daemon.call("GET", "/v1/sessions/vm-back", None).await;
        assert_eq!(
            code, 200,
            "the Xvnc that came back keeps its session: {kept}"
        );
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let next = daemon.open_ok("vm-next", &fake.target).await;
        assert_eq!(
            next["ws_port"], session["ws_port"],
            "the port was free again"
        );
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert!(status["last_cleanup"].is_object(), "{status}");
        drop(back);
    })
    .await;
}
