//! SIGHUP re-reads the configuration file (DESIGN.md "Packaging", issue 13 item 6): a widened or
//! narrowed `port-range` (sessions outside it keep their ports, new opens use the new range),
//! `max-sessions`, the limits and the log level change without dropping a session or a viewer;
//! a file that does not validate keeps the running configuration and says why in `/v1/status`.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use common::vnc::Scratch;
use common::{DaemonProcess, FakeVnc, Mode, PortBlock, StateDir, bounded};
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

fn write_config(
    path: &Path,
    first: u16,
    last: u16,
    max_sessions: usize,
    viewers: usize,
    level: &str,
) {
    std::fs::write(
        path,
        format!(
            "port-range = \"{first}-{last}\"\nmax-sessions = {max_sessions}\n\
             max-connections-per-session = {viewers}\nlog-level = \"{level}\"\n\
             cleanup-interval = \"off\"\n"
        ),
    )
    .expect("write the config file");
}

fn hangup(daemon: &DaemonProcess) {
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &daemon.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
}

/// Polls `/v1/status` (10 s at most) until `cond` holds for it.
async fn status_until(daemon: &DaemonProcess, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = daemon.call("GET", "/v1/status", None).await.1;
        if cond(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what} did not happen after SIGHUP: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Sends `n` bytes through the viewer and reads them back from the echoing VNC server.
async fn echoes(ws: &mut Ws, n: usize) {
    ws.send(Message::Binary(vec![1u8; n].into()))
        .await
        .expect("send");
    let mut got = 0;
    while got < n {
        match ws.next().await.expect("frame").expect("frame") {
            Message::Binary(b) => got += b.len(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("the viewer was closed: {other:?}"),
        }
    }
}

async fn viewer(ws_url: &str) -> Ws {
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url)
        .await
        .expect("viewer");
    // The greeting.
    loop {
        if let Message::Binary(b) = ws.next().await.expect("frame").expect("frame") {
            assert_eq!(b.as_ref(), common::GREETING);
            return ws;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_range_caps_and_level_and_refuses_a_bad_file() {
    bounded(Duration::from_secs(90), async {
        let block = PortBlock::take();
        let first = block.first;
        let dir = Scratch::new("reload");
        let config = dir.0.join("vncgate.toml");
        let log = dir.0.join("daemon.log");
        write_config(&config, first, first + 1, 2, 1, "warn");
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, block.spare()));
        let state = StateDir::new();
        // The range and caps come from the file only: flags would win over it.
        let args: Vec<String> = [
            "--config",
            &config.display().to_string(),
            "--api-listen",
            &api.to_string(),
            "--listen-host",
            "127.0.0.1",
            "--state-file",
            &state.file().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut command = DaemonProcess::command(&args);
        command.stderr(std::fs::File::create(&log).expect("log file"));
        let mut daemon = DaemonProcess {
            child: command.spawn().expect("start vncgate"),
            api,
            block,
            http: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http::<Full<Bytes>>(),
            state,
            args,
            log: None,
        };
        daemon.wait_healthy().await;

        let fake = FakeVnc::tcp(Mode::Echo).await;
        let a = daemon.open_ok("vm-a", &fake.target).await;
        let b = daemon.open_ok("vm-b", &fake.target).await;
        assert_eq!(
            (a["ws_port"].as_u64(), b["ws_port"].as_u64()),
            (Some(u64::from(first)), Some(u64::from(first) + 1))
        );
        let (status, body) = daemon.open("vm-c", &fake.target).await;
        assert_eq!(status, 503, "{body}");
        let mut live = viewer(a["ws_url"].as_str().expect("ws_url")).await;
        echoes(&mut live, 1000).await;
        // One viewer per session for now.
        let (mut second, _) =
            tokio_tungstenite::connect_async(a["ws_url"].as_str().expect("ws_url"))
                .await
                .expect("upgrade");
        let closed = loop {
            match second.next().await.expect("frame").expect("frame") {
                Message::Close(Some(frame)) => break u16::from(frame.code),
                _ => continue,
            }
        };
        assert_eq!(closed, 1013, "too many viewers");

        // Widened and moved: new opens go to the new range, vm-a and vm-b stay where they are.
        write_config(&config, first + 10, first + 12, 5, 2, "info");
        hangup(&daemon);
        // max-sessions 5 is clamped to the 3 ports of the new range, as at start.
        let status = status_until(&daemon, "the new range", |s| {
            s["port_pool"]["total_ports"] == 3
        })
        .await;
        assert_eq!(status["max_sessions"], 3, "{status}");
        let c = daemon.open_ok("vm-c", &fake.target).await;
        assert_eq!(c["ws_port"].as_u64(), Some(u64::from(first) + 10));
        for (vm, port) in [("vm-a", first), ("vm-b", first + 1)] {
            let (code, s) = daemon
                .call("GET", &format!("/v1/sessions/{vm}"), None)
                .await;
            assert_eq!((code, s["ws_port"].as_u64()), (200, Some(u64::from(port))));
        }
        echoes(&mut live, 5000).await;
        let mut another = viewer(a["ws_url"].as_str().expect("ws_url")).await;
        echoes(&mut another, 10).await;

        // A file that does not validate: refused, said in status, nothing changes.
        std::fs::write(&config, "port-range = \"nonsense\"\n").expect("write");
        hangup(&daemon);
        let status = status_until(&daemon, "a refusal warning", |s| {
            s["warnings"].as_array().is_some_and(|w| {
                w.iter().any(|m| {
                    m.as_str().is_some_and(|m| {
                        m.contains("config reload refused") && m.contains("--port-range")
                    })
                })
            })
        })
        .await;
        assert_eq!(status["max_sessions"], 3);
        assert_eq!(status["active_sessions"], 3);
        echoes(&mut live, 100).await;

        // Narrowed to the one port vm-c holds (the cap with it): the warning clears, a new open is
        // refused (503) while vm-a and vm-b keep their ports outside the range.
        write_config(&config, first + 10, first + 10, 3, 2, "info");
        hangup(&daemon);
        let status = status_until(&daemon, "the narrowed range", |s| {
            s["port_pool"]["total_ports"] == 1
                && !s["warnings"].to_string().contains("config reload refused")
        })
        .await;
        assert_eq!(status["active_sessions"], 3, "{status}");
        assert_eq!(status["port_pool"]["allocated_ports"], 1, "{status}");
        assert_eq!(status["port_pool"]["outside_range_ports"], 2, "{status}");
        assert_eq!(daemon.open("vm-d", &fake.target).await.0, 503);
        assert_eq!(
            daemon.call("DELETE", "/v1/sessions/vm-b", None).await.0,
            204
        );
        echoes(&mut live, 100).await;

        // A setting that applies only at a restart: said in status until the file puts it back.
        write_config(&config, first + 10, first + 10, 3, 2, "info");
        let mut text = std::fs::read_to_string(&config).expect("config");
        text.push_str("ping-interval = \"7s\"\n");
        std::fs::write(&config, text).expect("write");
        hangup(&daemon);
        status_until(&daemon, "a restart-only warning", |s| {
            s["warnings"].as_array().is_some_and(|w| {
                w.iter().any(|m| {
                    m.as_str().is_some_and(|m| {
                        m.contains("--ping-interval") && m.contains("only at a restart")
                    })
                })
            })
        })
        .await;
        write_config(&config, first + 10, first + 10, 3, 2, "info");
        hangup(&daemon);
        status_until(&daemon, "the restart-only warning gone", |s| {
            !s["warnings"].to_string().contains("only at a restart")
        })
        .await;
        echoes(&mut live, 100).await;

        // The log level: vm-a's open (at warn) left no event line, vm-c's (at info) did.
        let text = std::fs::read_to_string(&log).expect("log");
        assert!(text.contains("configuration reloaded"), "{text}");
        let opened = |vm: &str| {
            text.lines().any(|l| {
                l.contains("session opened") && l.contains(&format!("vm_id=\"{vm}\""))
                    || l.contains("session opened") && l.contains(&format!("vm_id={vm}"))
            })
        };
        assert!(!opened("vm-a"), "{text}");
        assert!(opened("vm-c"), "{text}");
        drop(another);
        drop(live);
    })
    .await;
}
