//! Per-session limits set at open (DESIGN.md "Cleanup, metrics, events"): `idle_timeout`
//! closes a silent viewer of that session only, `max_lifetime` closes the session as a DELETE
//! would, both are kept in the state file and survive a restart, and a bad value is 400
//! naming the field. Timing on tokio's paused clock.

mod common;

use std::time::Duration;

use common::{FakeVnc, Mode, TestGate, close_of};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use vncgate::daemon::Daemon;
use vncgate::relay::CloseReason;

/// A client whose connections are never kept alive: the paused clock jumps past the API's
/// keep-alive idle limit between calls.
fn fresh_client(gate: &mut TestGate) {
    gate.http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
}

async fn open_with(gate: &TestGate, body: Value) -> (u16, Value) {
    let bytes = serde_json::to_vec(&body).expect("json");
    gate.call("POST", "/v1/sessions", Some(&bytes)).await
}

/// Waits (the paused clock moves while the runtime waits) until `vm_id` is out of the table
/// and every port is back in the pool.
async fn until_closed(daemon: &Daemon, vm_id: &str) {
    for _ in 0..10_000 {
        if daemon.registry().get(vm_id).is_none()
            && daemon.registry().pool().stats().allocated_ports == 0
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{vm_id} was not closed");
}

fn state_records(gate: &TestGate) -> Vec<Value> {
    let text = std::fs::read_to_string(gate.state.file()).expect("state file");
    let doc: Value = serde_json::from_str(&text).expect("state JSON");
    doc["sessions"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(start_paused = true)]
async fn max_lifetime_closes_the_session_as_a_delete_would() {
    let mut gate = TestGate::start_with(2, |c| c.cleanup_interval = None).await;
    fresh_client(&mut gate);
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let (status, session) = open_with(
        &gate,
        json!({"vm_id": "vm-life", "target": fake.target, "max_lifetime": "10m", "idle_timeout": 90}),
    )
    .await;
    assert_eq!(status, 201, "{session}");
    assert_eq!(session["max_lifetime"], "10m");
    assert_eq!(session["idle_timeout"], "1m 30s");
    let created = humantime::parse_rfc3339(session["created_at"].as_str().expect("created_at"))
        .expect("rfc3339");
    let closes = humantime::parse_rfc3339(session["closes_at"].as_str().expect("closes_at"))
        .expect("rfc3339");
    assert_eq!(
        closes.duration_since(created).expect("after"),
        Duration::from_secs(600)
    );
    let records = state_records(&gate);
    assert_eq!(records[0]["max_lifetime"], "10m", "{records:?}");
    assert_eq!(records[0]["idle_timeout"], "1m 30s", "{records:?}");
    // A later open may repeat the session's limits or leave them out; changing one is refused
    // naming it, not silently ignored.
    for (body, want) in [
        (
            json!({"vm_id": "vm-life", "target": fake.target, "max_lifetime": "10m"}),
            200,
        ),
        (json!({"vm_id": "vm-life", "target": fake.target}), 200),
        (
            json!({"vm_id": "vm-life", "target": fake.target, "max_lifetime": "1h"}),
            400,
        ),
        (
            json!({"vm_id": "vm-life", "target": fake.target, "idle_timeout": "5m"}),
            400,
        ),
    ] {
        let (status, answer) = open_with(&gate, body.clone()).await;
        assert_eq!(status, want, "{body}: {answer}");
        if want == 400 {
            let message = answer["error"]["message"].as_str().expect("message");
            let field = if body["max_lifetime"].is_null() {
                "idle_timeout"
            } else {
                "max_lifetime"
            };
            assert!(message.starts_with(field), "{message}");
        }
    }

    tokio::time::advance(Duration::from_secs(590)).await;
    tokio::task::yield_now().await;
    assert!(
        gate.daemon().registry().get("vm-life").is_some(),
        "closed before its max_lifetime"
    );
    tokio::time::advance(Duration::from_secs(11)).await;
    until_closed(gate.daemon(), "vm-life").await;
    assert!(state_records(&gate).is_empty(), "the close is on disk");
    assert_eq!(gate.call("GET", "/v1/sessions/vm-life", None).await.0, 404);
}

/// Real time and the real binary: a restart keeps the wall-clock deadline (not a new
/// max_lifetime from the restart), and the session closes at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_max_lifetime_deadline() {
    common::bounded(Duration::from_secs(60), async {
        let mut daemon = common::DaemonProcess::spawn(2, &["--cleanup-interval", "off"]).await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let body = serde_json::to_vec(
            &json!({"vm_id": "vm-life", "target": fake.target, "max_lifetime": "4s"}),
        )
        .expect("json");
        let (status, session) = daemon.call("POST", "/v1/sessions", Some(&body)).await;
        assert_eq!(status, 201, "{session}");
        let opened = tokio::time::Instant::now();
        let (exit, _) = daemon.terminate().await;
        assert!(exit.success());
        daemon.restart().await;
        let (status, restored) = daemon.call("GET", "/v1/sessions/vm-life", None).await;
        assert_eq!(status, 200, "restored: {restored}");
        assert_eq!(restored["closes_at"], session["closes_at"]);
        assert_eq!(restored["max_lifetime"], "4s");
        // The deadline counts from the open (whole seconds in the state file), not the restart.
        let deadline = opened + Duration::from_secs(20);
        while daemon.call("GET", "/v1/sessions/vm-life", None).await.0 != 404 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not closed at its max_lifetime"
            );
            // Polling the daemon for the close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(8),
            "closed {took:?} after the open (max_lifetime 4s)"
        );
        // A close by the timer leaves the table first and reaches the file with the next
        // commit (a crash in between restores the session with its deadline passed, and it
        // is closed at once): wait for that commit.
        loop {
            let text = std::fs::read_to_string(daemon.state.file()).expect("state file");
            if !text.contains("vm-life") {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the close never reached the disk: {text}"
            );
            // Polling the file for the commit.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url)
        .await
        .expect("viewer")
        .0
}

/// The next frame other than a ping or pong.
async fn next_frame(ws: &mut Ws) -> Message {
    loop {
        match ws.next().await.expect("a frame").expect("frame") {
            Message::Ping(_) | Message::Pong(_) => {}
            other => return other,
        }
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_of_a_session_closes_only_its_silent_viewers() {
    let mut gate = TestGate::start_with(3, |c| c.cleanup_interval = None).await;
    fresh_client(&mut gate);
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let (_, strict) = open_with(
        &gate,
        json!({"vm_id": "vm-strict", "target": fake.target, "idle_timeout": "30s"}),
    )
    .await;
    let (_, lax) = open_with(&gate, json!({"vm_id": "vm-lax", "target": fake.target})).await;
    assert_eq!(lax["idle_timeout"], Value::Null);
    let mut quiet = ws_connect(strict["ws_url"].as_str().expect("ws_url")).await;
    let mut other = ws_connect(lax["ws_url"].as_str().expect("ws_url")).await;
    for ws in [&mut quiet, &mut other] {
        assert_eq!(
            next_frame(ws).await,
            Message::Binary(common::GREETING.to_vec().into())
        );
    }
    let start = tokio::time::Instant::now();
    // Both answer pings (tungstenite does while reading); only data counts as activity.
    let quiet_end = tokio::spawn(async move { next_frame(&mut quiet).await });
    let other_end = tokio::spawn(async move { next_frame(&mut other).await });
    let ended = tokio::time::timeout(Duration::from_secs(120), quiet_end).await;
    let Ok(Ok(Message::Close(Some(frame)))) = ended else {
        panic!("the silent viewer of vm-strict was not closed");
    };
    assert_eq!(
        (u16::from(frame.code), frame.reason.to_string()),
        close_of(CloseReason::IdleTimeout)
    );
    assert!(
        start.elapsed() >= Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );
    // The session with no limit of its own (and no --idle-timeout) keeps its viewer.
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(!other_end.is_finished(), "vm-lax's viewer was closed");
    assert_eq!(gate.daemon().registry().connection_count(), 1);
    other_end.abort();
}

#[tokio::test]
async fn a_bad_limit_is_400_naming_the_field_and_unknown_fields_are_ignored() {
    let gate = TestGate::start(2).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    for (field, value) in [
        ("idle_timeout", json!("soon")),
        ("idle_timeout", json!(0)),
        ("idle_timeout", json!(-5)),
        ("idle_timeout", json!(true)),
        ("max_lifetime", json!({"h": 1})),
        ("max_lifetime", json!("0s")),
        ("max_lifetime", json!("20000 years")),
        ("max_lifetime", json!(1e300)),
    ] {
        let (status, body) = open_with(
            &gate,
            json!({"vm_id": "vm-bad", "target": fake.target, field: value}),
        )
        .await;
        assert_eq!(status, 400, "{field}={value}: {body}");
        assert_eq!(body["error"]["code"], "invalid_request");
        let message = body["error"]["message"].as_str().expect("message");
        assert!(message.contains(field), "{field}={value}: {message}");
    }
    assert_eq!(gate.session_count().await, 0, "no bad open left a session");
    let (status, body) = open_with(
        &gate,
        json!({"vm_id": "vm-ok", "target": fake.target, "idle_timeout": null, "flavour": "x"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["idle_timeout"], Value::Null);
    assert_eq!(body["closes_at"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_opens_with_limits_and_reports_a_bad_one() {
    common::bounded(Duration::from_secs(60), async {
        let daemon = common::DaemonProcess::spawn(2, &["--cleanup-interval", "off"]).await;
        let api = format!("http://{}", daemon.api);
        let cli = |args: &[&str]| {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
                .args(["--api", &api])
                .args(args)
                .output()
                .expect("run the CLI");
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        };
        let (code, out, err) = cli(&[
            "open",
            "vm-cli",
            "127.0.0.1:5999",
            "--max-lifetime",
            "8h",
            "--idle-timeout",
            "15m",
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        let session: Value = serde_json::from_str(&out).expect("JSON");
        assert_eq!(session["max_lifetime"], "8h");
        assert_eq!(session["idle_timeout"], "15m");
        let (code, _, err) = cli(&["open", "vm-bad", "127.0.0.1:5999", "--idle-timeout", "soon"]);
        assert_eq!(code, 1);
        assert!(err.contains("idle_timeout"), "{err}");
    })
    .await;
}
