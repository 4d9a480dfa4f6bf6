//! The control API: the pool under load, foreign ports, bad input, error shapes.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{FakeVnc, Mode, TestGate, bounded};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_hundred_sessions_from_32_clients_get_distinct_ports() {
    bounded(Duration::from_secs(120), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = Arc::new(TestGate::start_with(900, |c| c.max_sessions = 900).await);
        let mut clients = Vec::new();
        for client in 0..32 {
            let gate = Arc::clone(&gate);
            let target = fake.target.clone();
            clients.push(tokio::spawn(async move {
                let mut got = Vec::new();
                for i in (client..900).step_by(32) {
                    let (status, session) = gate.open(&format!("vm-{i}"), &target).await;
                    got.push((status, session["ws_port"].as_u64()));
                }
                got
            }));
        }
        let mut ports = HashSet::new();
        for c in clients {
            for (status, port) in c.await.expect("client task") {
                assert_eq!(status, 201);
                let port = port.expect("ws_port");
                assert!(
                    gate.block.range(900).contains(&(port as u16)),
                    "{port} outside the range"
                );
                assert!(ports.insert(port), "port {port} handed out twice");
            }
        }
        assert_eq!(ports.len(), 900);
        let (status, err) = gate.open("vm-901", &fake.target).await;
        assert_eq!(status, 503, "{err}");
        assert_eq!(err["error"]["code"], "pool_exhausted");
        let message = err["error"]["message"].as_str().expect("message");
        let range = gate.block.range(900);
        assert!(
            message.contains(&format!("{}-{}", range.start(), range.end())),
            "{message}"
        );
        assert!(message.contains("900"), "names the cap: {message}");
        let status = gate.status().await;
        assert_eq!(status["port_pool"]["allocated_ports"], 900);
        assert_eq!(status["port_pool"]["free_ports"], 0);
        assert_eq!(status["active_sessions"], 900);
        assert_eq!(status["system_health"], "warning");
    })
    .await;
}

#[tokio::test]
async fn ports_held_elsewhere_are_skipped_and_counted() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(10).await;
        let first = gate.block.first;
        let _held: Vec<std::net::TcpListener> = [first, first + 3]
            .iter()
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).expect("hold a pool port"))
            .collect();
        let mut ports = Vec::new();
        for i in 0..3 {
            let s = gate.open_ok(&format!("vm-{i}"), &fake.target).await;
            ports.push(s["ws_port"].as_u64().expect("port") as u16);
        }
        assert_eq!(ports, vec![first + 1, first + 2, first + 4]);
        let pool = gate.status().await["port_pool"].clone();
        assert_eq!(pool["total_ports"], 10);
        assert_eq!(pool["allocated_ports"], 3);
        assert_eq!(pool["foreign_ports"], 2);
        assert_eq!(pool["free_ports"], 5);
        assert_eq!(pool["utilization_percent"], 30.0);
    })
    .await;
}

#[tokio::test]
async fn bad_input_gets_400_and_changes_nothing() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(4).await;
        let before = gate.open_ok("vm-keep", &fake.target).await;
        let t = fake.target.as_str();
        let json =
            |vm: &str, target: &str| serde_json::json!({"vm_id": vm, "target": target}).to_string();
        let long_id = "a".repeat(129);
        let huge = format!(
            "{{\"vm_id\": \"vm-x\", \"target\": \"{t}\", \"pad\": \"{}\"}}",
            "x".repeat(70 * 1024)
        );
        let cases: Vec<(String, &str)> = vec![
            ("{not json".into(), "not JSON"),
            (format!("vm_id=vm-x&target={t}"), "not JSON"),
            ("".into(), "not JSON"),
            ("[]".into(), "expected"),
            ("{\"vm_id\": \"vm-x\"}".into(), "missing field `target`"),
            (format!("{{\"target\": \"{t}\"}}"), "missing field `vm_id`"),
            (
                "{\"vm_id\": 5, \"target\": \"127.0.0.1:5900\"}".into(),
                "invalid type",
            ),
            (json("", t), "invalid vm_id"),
            (json(&long_id, t), "invalid vm_id"),
            (json("vm/1", t), "invalid vm_id"),
            (json("vm 1", t), "invalid vm_id"),
            (json(".vm", t), "invalid vm_id"),
            (json("vm-x", "127.0.0.1"), "missing port"),
            (json("vm-x", "127.0.0.1:0"), "port must be"),
            (json("vm-x", "127.0.0.1:70000"), "port must be"),
            (json("vm-x", "::1:5900"), "brackets"),
            (json("vm-x", "unix:relative"), "absolute path"),
            (json("vm-keep", "nonsense"), "missing port"),
            (json("vm-x", "127.0.0.1:+5900"), "port must be"),
            (json("vm-x", "vnc://host:5900"), "not a URL"),
            (huge, "exceeds 64 KiB"),
        ];
        for (body, want) in &cases {
            let (status, err) = gate
                .call("POST", "/v1/sessions", Some(body.as_bytes()))
                .await;
            let shown: String = body.chars().take(60).collect();
            assert_eq!(status, 400, "{shown}: {err}");
            assert_eq!(err["error"]["code"], "invalid_request", "{shown}");
            let message = err["error"]["message"].as_str().expect("message");
            assert!(
                message.contains(want),
                "{shown}: {message:?} should mention {want:?}"
            );
        }
        let (_, list) = gate.call("GET", "/v1/sessions", None).await;
        let sessions = list["sessions"].as_array().expect("sessions");
        assert_eq!(sessions.len(), 1);
        assert_eq!(sessions[0]["target"], before["target"]);
        assert_eq!(sessions[0]["token"], before["token"]);
        let pool = gate.status().await["port_pool"].clone();
        assert_eq!(pool["allocated_ports"], 1);
    })
    .await;
}

/// Reads one HTTP answer from `s`: its head and its `content-length` body. Panics if the
/// connection ends first (a reset where an answer was due).
async fn read_answer(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&answer);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse::<usize>().ok())
                        .flatten()
                })
                .unwrap_or(0);
            if answer.len() >= end + 4 + length {
                return text.into_owned();
            }
        }
        let n = s.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed without an answer: {text}");
        answer.extend_from_slice(&chunk[..n]);
    }
}

/// A body declared over the limit is refused at once, not after the body deadline.
#[tokio::test]
async fn a_declared_oversize_body_is_refused_at_once() {
    use tokio::io::AsyncWriteExt;
    bounded(Duration::from_secs(5), async {
        let gate = TestGate::start(1).await;
        let mut s = tokio::net::TcpStream::connect(gate.api)
            .await
            .expect("connect");
        s.write_all(
            b"POST /v1/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\ncontent-length: 99999999999\r\n\r\n{\"vm_id\"",
        )
        .await
        .expect("write");
        let text = read_answer(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(text.contains("request body exceeds 64 KiB"), "{text}");
        // A body of 300 KB that is all sent is read first, so the answer is not lost to a
        // reset while the client is still writing.
        let mut s = tokio::net::TcpStream::connect(gate.api)
            .await
            .expect("connect");
        let body = vec![b' '; 300 * 1024];
        let head = format!(
            "POST /v1/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.expect("head");
        s.write_all(&body).await.expect("the whole body is taken");
        assert!(read_answer(&mut s).await.starts_with("HTTP/1.1 400 "));
        assert_eq!(gate.session_count().await, 0);
        // The same for a chunked body (no declared length): 300 KB in 4 KiB chunks, all sent
        // before the answer is read.
        let mut s = tokio::net::TcpStream::connect(gate.api)
            .await
            .expect("connect");
        s.write_all(b"POST /v1/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n")
            .await
            .expect("head");
        for _ in 0..75 {
            s.write_all(b"1000\r\n").await.expect("chunk size");
            s.write_all(&[b' '; 4096]).await.expect("the whole body is taken");
            s.write_all(b"\r\n").await.expect("chunk end");
        }
        s.write_all(b"0\r\n\r\n").await.expect("last chunk");
        let text = read_answer(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(text.contains("request body exceeds 64 KiB"), "{text}");
        assert_eq!(gate.session_count().await, 0);
        // A chunked body that turns malformed is refused, and nothing is opened.
        let mut s = tokio::net::TcpStream::connect(gate.api)
            .await
            .expect("connect");
        s.write_all(b"POST /v1/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\n{\"vm_\r\nzz\r\n")
            .await
            .expect("request");
        let text = read_answer(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
        assert!(text.contains("cannot read the request body"), "{text}");
        assert_eq!(gate.session_count().await, 0);
        // A chunked body within the limit is read whole and acted on.
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let json = format!("{{\"vm_id\": \"vm-chunked\", \"target\": \"{}\"}}", fake.target);
        let (first, rest) = json.split_at(10);
        let mut s = tokio::net::TcpStream::connect(gate.api)
            .await
            .expect("connect");
        let request = format!(
            "POST /v1/sessions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{first}\r\n{:x}\r\n{rest}\r\n0\r\n\r\n",
            first.len(),
            rest.len()
        );
        s.write_all(request.as_bytes()).await.expect("request");
        let text = read_answer(&mut s).await;
        assert!(text.starts_with("HTTP/1.1 201 "), "{text}");
        assert_eq!(gate.session_count().await, 1);
    })
    .await;
}

#[tokio::test]
async fn every_error_is_the_json_error_object() {
    bounded(Duration::from_secs(30), async {
        let gate = TestGate::start(2).await;
        let cases = [
            ("GET", "/nope", 404, "not_found"),
            ("GET", "/v1/sessions/vm-none", 404, "not_found"),
            ("DELETE", "/v1/sessions/vm-none", 404, "not_found"),
            ("PUT", "/v1/sessions", 405, "method_not_allowed"),
            ("POST", "/v1/status", 405, "method_not_allowed"),
            ("PATCH", "/v1/sessions/vm-1", 405, "method_not_allowed"),
        ];
        for (method, path, want_status, want_code) in cases {
            let (status, body) = gate.call(method, path, None).await;
            assert_eq!(status, want_status, "{method} {path}");
            assert_eq!(body["error"]["code"], want_code, "{method} {path}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
            );
        }
        let (status, _) = gate.call("GET", "/healthz", None).await;
        assert_eq!(status, 200);
    })
    .await;
}

#[tokio::test]
async fn sessions_carry_urls_for_the_host_the_client_used() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let s = gate.open_ok("vm-url", &fake.target).await;
        let port = s["ws_port"].as_u64().expect("port");
        let token = s["token"].as_str().expect("token");
        assert_eq!(
            s["url"],
            format!("http://127.0.0.1:{port}/vnc.html#token={token}")
        );
        assert_eq!(
            s["ws_url"],
            format!("ws://127.0.0.1:{port}/websockify?token={token}")
        );
        assert!(humantime::parse_rfc3339(s["created_at"].as_str().expect("created_at")).is_ok());
        for key in ["connections", "bytes_to_client", "bytes_to_server"] {
            assert_eq!(s[key], 0, "{key}");
        }
        let gate =
            TestGate::start_with(2, |c| c.public_host = Some("vnc.example.net".into())).await;
        let s = gate.open_ok("vm-url", &fake.target).await;
        assert!(
            s["url"]
                .as_str()
                .expect("url")
                .starts_with("http://vnc.example.net:")
        );
        // The session port answers plain HTTP with a page naming the VM.
        let base = format!("127.0.0.1:{}", s["ws_port"]).parse().expect("addr");
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let response = http
            .get(format!("http://{base}/vnc.html").parse().expect("uri"))
            .await
            .expect("page");
        assert_eq!(response.status(), 200);
        let (status, _) = common::api_call(&gate.http, base, "GET", "/nope", None).await;
        assert_eq!(status, 404);
    })
    .await;
}

/// Requests hyper refuses before any handler (a malformed request line, a bad
/// Content-Length, headers over 16 KiB) still get the JSON error object, on the API and on
/// session ports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unparsable_requests_get_the_json_error_object() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let session = gate.open_ok("vm-garbage", &fake.target).await;
        let port = session["ws_port"].as_u64().expect("port") as u16;
        let me = std::net::IpAddr::from([127, 0, 0, 1]);
        let big = format!("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: {}\r\n\r\n", "a".repeat(20_000));
        for to in [gate.api, std::net::SocketAddr::from(([127, 0, 0, 1], port))] {
            for (request, status) in [
                ("GARBAGE\r\n\r\n", 400),
                ("POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n", 400),
                ("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
                (big.as_str(), 431),
            ] {
                let r = common::raw::request(me, to, request).await;
                assert_eq!(r.status, status, "{to}: {:.60}", request);
                assert_eq!(r.code(), "invalid_request", "{to}: {r:?}");
                assert_eq!(r.header("content-type").as_deref(), Some("application/json"));
            }
        }
        // serde would fill the struct from an array; the contract is an object.
        let (status, body) = gate
            .call("POST", "/v1/sessions", Some(br#"["vm-array", "127.0.0.1:5999"]"#))
            .await;
        assert_eq!((status, body["error"]["code"].as_str()), (400, Some("invalid_request")));
        let (status, _) = gate
            .call("POST", "/v1/sessions/vm-garbage/token", Some(b"[true]"))
            .await;
        assert_eq!(status, 400);
        assert_eq!(gate.status().await["active_sessions"], 1, "nothing else disturbed");
    })
    .await;
}

/// Runs the CLI with its stdout on `stdout` (`spawn`, not `output`, which would capture stdout
/// itself); returns its output and stderr.
async fn cli_to(args: &[&str], stdout: std::process::Stdio) -> (std::process::Output, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .args(args)
        .stdout(stdout)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the CLI")
        .wait_with_output()
        .await
        .expect("wait for the CLI");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// `vncgate list | head` and the like: the CLI's reader went away before it wrote. It ends
/// quietly with status 0, not with a panic (status 101); a full disk is an error (status 1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_ends_quietly_when_its_reader_goes_away() {
    bounded(Duration::from_secs(30), async {
        let gate = TestGate::start(1).await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        gate.open_ok("vm-piped", &fake.target).await;
        let api = format!("http://{}", gate.api);
        for args in [
            vec!["--api", api.as_str(), "list", "--json"],
            vec!["completions", "bash"],
        ] {
            // The read end is closed before the CLI starts, so its write always fails (EPIPE).
            let (reader, writer) = std::io::pipe().expect("pipe");
            drop(reader);
            let (out, stderr) = cli_to(&args, writer.into()).await;
            assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
            assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        }
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        let (out, stderr) = cli_to(&["--api", api.as_str(), "list"], full.into()).await;
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("cannot write the output"), "{stderr}");
    })
    .await;
}
