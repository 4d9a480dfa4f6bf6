//! Hostile clients against a real `vncgate` process (DESIGN.md "Access control", abuse
//! limits): connections that trickle header bytes, send nothing, or ask for a page asset and
//! never read the answer, from one address, must not stop a viewer from another address
//! (127.0.0.2) nor the API; the daemon's descriptors and memory must come back down.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::raw::{self, connect_from, upgrade_request, websocket_from};
use common::{
    DaemonProcess, FakeVnc, GREETING, Mode, bounded, fd_count, fd_list, peak_rss_kib, rss_kib,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;

const ATTACKER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const VIEWER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const GUESSER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4));
/// Of each kind of hostile connection, per round.
const EACH: usize = 500;

/// 500 silent, 500 trickling and 500 asset-never-read connections from `from`; they stay
/// until the returned set is dropped (or the daemon closes them).
async fn attack(from: IpAddr, to: SocketAddr) -> (Vec<TcpStream>, JoinSet<()>) {
    let mut held = Vec::new();
    let mut trickling = JoinSet::new();
    let connect = || async move {
        tokio::time::timeout(Duration::from_secs(3), connect_from(from, to))
            .await
            .ok()
            .and_then(Result::ok)
    };
    for _ in 0..EACH {
        if let Some(s) = connect().await {
            held.push(s);
        }
    }
    for _ in 0..EACH {
        if let Some(mut s) = connect().await {
            trickling.spawn(async move {
                // Slowloris: a byte of headers every half second, never the end.
                for b in b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
                    .iter()
                    .chain(std::iter::repeat(&b'a'))
                {
                    if s.write_all(&[*b]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        }
    }
    let asset = "GET /novnc/core/rfb.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(3);
    for _ in 0..EACH {
        if let Some(mut s) = connect().await {
            // The daemon may already have closed it: writes may fail, that is its defence.
            let _ = s.write_all(asset.as_bytes()).await;
            held.push(s);
        }
    }
    (held, trickling)
}

/// A viewer from 127.0.0.2 connects and relays within a second; the API answers within one.
async fn a_real_viewer_and_the_api_still_work(daemon: &DaemonProcess, session: &Value) {
    let start = Instant::now();
    let mut ws = tokio::time::timeout(
        Duration::from_secs(1),
        websocket_from(VIEWER, session["ws_url"].as_str().expect("ws_url"), &[]),
    )
    .await
    .expect("the viewer connects within 1 s under attack")
    .expect("the viewer is let in");
    let first = ws.next().await.expect("greeting").expect("frame");
    assert_eq!(first.into_data().as_ref(), GREETING);
    ws.send(Message::binary(b"under-attack".to_vec()))
        .await
        .expect("send");
    let echo = ws.next().await.expect("echo").expect("frame");
    assert_eq!(echo.into_data().as_ref(), b"under-attack");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "viewer took {took:?}");
    let start = Instant::now();
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(1),
        daemon.call("GET", "/v1/status", None),
    )
    .await
    .expect("the API answers within 1 s under attack");
    assert_eq!(status, 200);
    eprintln!(
        "abuse: viewer relayed in {took:?}, API answered in {:?}",
        start.elapsed()
    );
}

/// 100 wrong tokens from one address: that address gets 429; the right token from another
/// address still connects.
async fn wrong_tokens_get_429(session: &Value) {
    let port = session["ws_port"].as_u64().expect("port") as u16;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut last = 0;
    for i in 0..100 {
        let path = format!("/websockify?token=wrong{i:040}");
        last = raw::request(GUESSER, addr, &upgrade_request(addr, &path, &[]))
            .await
            .status;
    }
    assert_eq!(last, 429);
    let mut ws = websocket_from(VIEWER, session["ws_url"].as_str().expect("ws_url"), &[])
        .await
        .expect("the right token from another address");
    let first = ws.next().await.expect("greeting").expect("frame");
    assert_eq!(first.into_data().as_ref(), GREETING);
}

async fn descriptors_return(pid: u32, base: usize, limit: Duration) {
    let back = common::wait_until(limit, || fd_count(pid) <= base).await;
    assert!(
        back,
        "descriptors: {base} before, {} now: {}",
        fd_count(pid),
        fd_list(pid)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_connections_from_one_address_lock_nobody_out() {
    vncgate::raise_nofile_limit();
    bounded(Duration::from_secs(240), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let daemon = DaemonProcess::spawn(2, &[]).await;
        let session = daemon.open_ok("vm-abuse", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("port") as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let pid = daemon.pid();
        // Warm up (first viewer, first asset), then take the baseline.
        a_real_viewer_and_the_api_still_work(&daemon, &session).await;
        let base_fds = fd_count(pid);
        descriptors_return(pid, base_fds, Duration::from_secs(5)).await;
        let base_rss = rss_kib(pid);
        let mut after_round = Vec::new();
        for round in 0..3 {
            let (held, trickling) = attack(ATTACKER, addr).await;
            a_real_viewer_and_the_api_still_work(&daemon, &session).await;
            if round == 0 {
                wrong_tokens_get_429(&session).await;
            }
            let status = daemon.call("GET", "/v1/status", None).await.1;
            assert!(
                status["connections"]["refused_max_pending"].as_u64().unwrap_or(0) > 0,
                "the per-address cap closed connections at accept: {status}"
            );
            drop(held);
            drop(trickling);
            descriptors_return(pid, base_fds, Duration::from_secs(15)).await;
            after_round.push(rss_kib(pid));
        }
        let peak = peak_rss_kib(pid);
        eprintln!(
            "abuse: descriptors back to {base_fds}; RSS {base_rss} KiB before, {after_round:?} KiB after each round, peak {peak} KiB"
        );
        assert!(peak < base_rss + 64 * 1024, "peak RSS {peak} KiB from {base_rss} KiB");
        assert!(
            after_round[2] <= after_round[0] + 4 * 1024,
            "RSS grows with each attack: {after_round:?}"
        );
    })
    .await;
}

/// With the per-address cap lifted, the deadlines alone end every hostile connection while
/// the attacker keeps them open, and embedded assets are not copied per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_connections_the_attacker_never_closes() {
    vncgate::raise_nofile_limit();
    bounded(Duration::from_secs(240), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let daemon = DaemonProcess::spawn(2, &["--max-pending-per-ip", "100000"]).await;
        let session = daemon.open_ok("vm-deadlines", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("port") as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let pid = daemon.pid();
        a_real_viewer_and_the_api_still_work(&daemon, &session).await;
        let base_fds = fd_count(pid);
        let base_rss = rss_kib(pid);
        let (held, trickling) = attack(ATTACKER, addr).await;
        let during = fd_count(pid);
        assert!(during > base_fds + EACH, "the attack got in: {during} descriptors");
        a_real_viewer_and_the_api_still_work(&daemon, &session).await;
        let peak = peak_rss_kib(pid);
        // Headers 10 s (trickle, silent), a response 30 s (never read), keep-alive 10 s.
        descriptors_return(pid, base_fds, Duration::from_secs(45)).await;
        eprintln!(
            "abuse: {during} descriptors under attack, back to {base_fds} with the attacker still connected; RSS {base_rss} KiB before, peak {peak} KiB"
        );
        assert!(peak < base_rss + 96 * 1024, "peak RSS {peak} KiB from {base_rss} KiB");
        drop((held, trickling));
    })
    .await;
}

/// A flood of idle connections from many addresses: past --max-connections new ones are
/// closed at accept, so the daemon never reaches its descriptor limit (no EMFILE) and the
/// API, outside the cap, keeps answering; when the flood ends, viewers connect again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_never_exhausts_descriptors() {
    vncgate::raise_nofile_limit();
    bounded(Duration::from_secs(120), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let block = common::PortBlock::take();
        let api = SocketAddr::from(([127, 0, 0, 1], block.spare()));
        let state = common::StateDir::new();
        let args = DaemonProcess::args(api, &block.range(2), &state, &[]);
        // 1024 open files: --max-connections defaults to (1024 - 2 - 256) / 2 = 383.
        let child = std::process::Command::new("prlimit")
            .arg("--nofile=1024:1024")
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_vncgate"))
            .arg("serve")
            .args(&args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("prlimit vncgate serve (util-linux prlimit)");
        let mut daemon = DaemonProcess {
            child,
            api,
            block,
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(0)
                .build_http(),
            state,
            args,
            log: None,
        };
        daemon.wait_healthy().await;
        let session = daemon.open_ok("vm-flood", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("port") as u16;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let pid = daemon.pid();
        let base_fds = fd_count(pid);
        let mut flood = Vec::new();
        let mut most = 0;
        for host in 1..=40u8 {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 1, host));
            for _ in 0..50 {
                if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_secs(3), connect_from(from, addr)).await {
                    flood.push(s);
                }
            }
            most = most.max(fd_count(pid));
        }
        assert!(most < 1000, "the daemon came near its descriptor limit: {most}");
        let start = Instant::now();
        let (status, body) = tokio::time::timeout(Duration::from_secs(1), daemon.call("GET", "/v1/status", None))
            .await
            .expect("the API answers during the flood");
        assert_eq!(status, 200);
        assert!(body["connections"]["refused_max_connections"].as_u64().unwrap_or(0) > 0, "{body}");
        eprintln!(
            "abuse: flood of {} connections, daemon peaked at {most} descriptors, API answered in {:?}, {body}",
            flood.len(),
            start.elapsed()
        );
        drop(flood);
        descriptors_return(pid, base_fds, Duration::from_secs(15)).await;
        let mut ws = websocket_from(VIEWER, session["ws_url"].as_str().expect("ws_url"), &[])
            .await
            .expect("a viewer connects once the flood is gone");
        let first = ws.next().await.expect("greeting").expect("frame");
        assert_eq!(first.into_data().as_ref(), GREETING);
        daemon.kill9();
    })
    .await;
}
