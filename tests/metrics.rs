//! `GET /metrics` scraped by a real Prometheus (Debian's package, started here with its own
//! configuration and data directory on a loopback port, stopped by PID), checked by `promtool
//! check metrics`; and the audit events of `--log-format json`, parsed line by line.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::vnc::{Scratch, require};
use common::{DaemonProcess, FakeVnc, Mode, PortBlock, bounded};
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects a viewer, sends `out` bytes to the VNC server (an echo) and reads until it got the
/// greeting and the echo; returns the open WebSocket.
async fn viewer_relays(ws_url: &str, out: usize) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("viewer");
    ws.send(Message::Binary(vec![7u8; out].into()))
        .await
        .expect("send");
    let want = common::GREETING.len() + out;
    let mut got = 0;
    while got < want {
        match ws.next().await.expect("frame").expect("frame") {
            Message::Binary(b) => got += b.len(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, want);
    ws
}

/// A Prometheus server on `port` scraping `target` every second; killed by PID on drop.
struct Prometheus {
    child: Child,
    port: u16,
    _dir: Scratch,
}

impl Prometheus {
    fn start(port: u16, target: &str) -> Prometheus {
        let dir = Scratch::new("prometheus");
        let config = dir.0.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: vncgate\n    metrics_path: /metrics\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let log = std::fs::File::create(dir.0.join("prometheus.log")).expect("log file");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.0.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    /// The value of an instant query's single sample, if Prometheus has one.
    async fn query(&self, promql: &str) -> Option<f64> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        let q: String =
            percent_encoding::utf8_percent_encode(promql, percent_encoding::NON_ALPHANUMERIC)
                .to_string();
        let uri = format!("http://127.0.0.1:{}/api/v1/query?query={q}", self.port);
        let response = client.get(uri.parse().ok()?).await.ok()?;
        let body = response.into_body().collect().await.ok()?.to_bytes();
        let doc: Value = serde_json::from_slice(&body).ok()?;
        let result = doc["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (30 s at most) until `promql` gives `want`; the last value seen otherwise.
    async fn until(&self, promql: &str, want: f64) -> Result<(), Option<f64>> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let seen = self.query(promql).await;
            if seen == Some(want) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(seen);
            }
            // Polling Prometheus's API: it scrapes once a second.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn get_text(addr: std::net::SocketAddr, path: &str) -> String {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let response = client
        .get(format!("http://{addr}{path}").parse().expect("uri"))
        .await
        .expect("GET");
    assert_eq!(response.status(), 200);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    String::from_utf8(body.to_vec()).expect("utf-8")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_sessions_and_relayed_bytes() {
    if !require(&["prometheus", "promtool"]) {
        return;
    }
    bounded(Duration::from_secs(180), async {
        let daemon = DaemonProcess::spawn(8, &["--cleanup-interval", "off"]).await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let mut sessions = Vec::new();
        for i in 0..3 {
            sessions.push(daemon.open_ok(&format!("vm-{i}"), &fake.target).await);
        }
        let ws = viewer_relays(sessions[0]["ws_url"].as_str().expect("ws_url"), 5000).await;
        let second = viewer_relays(sessions[1]["ws_url"].as_str().expect("ws_url"), 300).await;
        drop(second);
        // A closed session's bytes stay counted.
        assert_eq!(
            daemon.call("DELETE", "/v1/sessions/vm-1", None).await.0,
            204
        );
        let (to_client, to_server) = (2 * common::GREETING.len() + 5300, 5300);

        let text = get_text(daemon.api, "/metrics").await;
        let mut promtool = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool");
        {
            use std::io::Write;
            let mut stdin = promtool.stdin.take().expect("stdin");
            stdin.write_all(text.as_bytes()).expect("feed promtool");
        }
        let checked = promtool.wait_with_output().expect("promtool");
        assert!(
            checked.status.success(),
            "promtool check metrics: {}{}\n{text}",
            String::from_utf8_lossy(&checked.stdout),
            String::from_utf8_lossy(&checked.stderr)
        );
        assert!(!text.contains("vm-0"), "no per-vm_id label: {text}");

        let block = PortBlock::take();
        let prometheus = Prometheus::start(block.spare(), &daemon.api.to_string());
        for (promql, want) in [
            ("vncgate_sessions", 2.0),
            ("vncgate_viewers", 1.0),
            ("vncgate_pool_ports{state=\"allocated\"}", 2.0),
            (
                "vncgate_relayed_bytes_total{direction=\"to_client\"}",
                to_client as f64,
            ),
            (
                "vncgate_relayed_bytes_total{direction=\"to_server\"}",
                to_server as f64,
            ),
            ("vncgate_session_opens_total{result=\"created\"}", 3.0),
            ("vncgate_session_closes_total{reason=\"deleted\"}", 1.0),
            ("vncgate_viewer_connects_total{outcome=\"ok\"}", 2.0),
            ("up{job=\"vncgate\"}", 1.0),
        ] {
            if let Err(seen) = prometheus.until(promql, want).await {
                panic!("Prometheus has {promql} = {seen:?}, want {want}");
            }
        }
        drop(ws);
    })
    .await;
}

fn events(log: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(log).expect("read the daemon's log");
    text.lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("not one JSON object a line ({e}): {line}"))
        })
        .filter(|v| v["target"] == "vncgate::events")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_viewer_and_api_events() {
    bounded(Duration::from_secs(60), async {
        let dir = Scratch::new("events");
        let log = dir.0.join("daemon.log");
        let mut daemon = DaemonProcess::spawn_logging_to(
            4,
            &[
                "--cleanup-interval",
                "off",
                "--log-format",
                "json",
                "--log-level",
                "info",
            ],
            Some(&log),
        )
        .await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let session = daemon.open_ok("vm-audit", &fake.target).await;
        let ws = viewer_relays(session["ws_url"].as_str().expect("ws_url"), 1000).await;
        let other = FakeVnc::unix(Mode::Echo).await;
        daemon.open_ok("vm-audit", &other.target).await;
        let (_, cleanup) = daemon.call("POST", "/v1/cleanup", None).await;
        assert!(cleanup["checked"].is_number());
        let (status, _) = daemon
            .call("POST", "/v1/sessions/vm-audit/token", Some(b"{}"))
            .await;
        assert_eq!(status, 200);
        assert_eq!(
            daemon.call("DELETE", "/v1/sessions/vm-audit", None).await.0,
            204
        );
        drop(ws);
        // The viewer's disconnect line is written as its relay ends: wait for it.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !events(&log)
            .iter()
            .any(|e| e["event"] == "viewer_disconnect")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no disconnect event"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (status, _) = daemon.terminate().await;
        assert!(status.success());

        let all = events(&log);
        let find = |name: &str| -> &Value {
            all.iter()
                .find(|e| e["event"] == name)
                .unwrap_or_else(|| panic!("no {name} event in {all:#?}"))
        };
        let open = find("session_open");
        assert_eq!(open["vm_id"], "vm-audit");
        assert_eq!(open["vnc_target"], fake.target.as_str());
        assert_eq!(open["port"], session["ws_port"]);
        let connect = find("viewer_connect");
        assert_eq!(connect["vm_id"], "vm-audit");
        assert!(
            connect["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("127.0.0.1:"))
        );
        assert!(connect["viewer"].is_u64());
        assert_eq!(
            find("session_retarget")["vnc_target"],
            other.target.as_str()
        );
        let disconnect = find("viewer_disconnect");
        assert_eq!(disconnect["viewer"], connect["viewer"]);
        assert_eq!(disconnect["bytes_to_server"], 1000);
        assert_eq!(disconnect["bytes_to_client"], 1000 + common::GREETING.len());
        assert_eq!(disconnect["code"], 1012, "{disconnect}");
        assert_eq!(disconnect["reason"], "VNC target changed");
        assert!(disconnect["duration_ms"].is_u64());
        assert_eq!(find("session_rotate")["disconnect"], false);
        assert_eq!(find("cleanup")["requested"], true);
        let close = find("session_close");
        assert_eq!(close["reason"], "deleted");
        assert_eq!(close["vm_id"], "vm-audit");
        for e in &all {
            assert!(e["timestamp"].is_string() && e["level"].is_string(), "{e}");
        }
    })
    .await;
}
