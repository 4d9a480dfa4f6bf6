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
use vncgate::config::Config;
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
async fn max_lifetime_closes_the_session_and_survives_a_restart() {
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
    // A later open of the same vm_id keeps the limits the session has.
    let (status, again) = open_with(
        &gate,
        json!({"vm_id": "vm-life", "target": fake.target, "max_lifetime": "1h"}),
    )
    .await;
    assert_eq!((status, &again["max_lifetime"]), (200, &json!("10m")));

    // A restart half way: the deadline is the same wall-clock time, not ten minutes more.
    let daemon = gate.daemon.take().expect("daemon");
    // Not asserted: on the paused clock the grace timeout fires whenever the runtime waits
    // for the state writer's thread. The file already holds the session (opens are durable).
    let _ = daemon.shutdown().await;
    tokio::time::advance(Duration::from_secs(300)).await;
    let config = Config {
        state_file: gate.state.file(),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        listen_host: "127.0.0.1".parse().expect("addr"),
        port_range: gate.block.range(2),
        max_sessions: 2,
        cleanup_interval: None,
        ..Config::default()
    };
    gate.daemon = Some(Daemon::start(config).await.expect("restart"));
    gate.api = gate.daemon().api_addr();
    let (status, restored) = gate.call("GET", "/v1/sessions/vm-life", None).await;
    assert_eq!(status, 200);
    assert_eq!(restored["closes_at"], session["closes_at"]);
    assert_eq!(restored["idle_timeout"], "1m 30s");

    tokio::time::advance(Duration::from_secs(290)).await;
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
