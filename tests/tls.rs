//! TLS end to end: wss relays byte-exact, plain HTTP on a TLS port, hostile handshakes, start-up
//! errors for bad certificate files, SIGHUP reload with a live viewer, and the API over https
//! with the CLI. Certificates are made by the tests (rcgen, openssl), never committed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::tls::{KeyKind, Leaf, TestCa, connect, port_of, presented};
use common::{DaemonProcess, FakeVnc, GREETING, Lcg, Mode, StateDir, TestGate, bounded};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use vncgate::tls::{TlsFiles, TlsVersion};

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A CA, a leaf, and their files in a scratch directory.
struct Certs {
    ca: TestCa,
    leaf: Leaf,
    dir: StateDir,
    cert: PathBuf,
    key: PathBuf,
}

impl Certs {
    fn new(kind: KeyKind) -> Certs {
        let ca = TestCa::new("tls");
        let leaf = ca.leaf_with(kind);
        let dir = StateDir::new();
        let (cert, key) = leaf.write(&dir.0, &ca);
        Certs {
            ca,
            leaf,
            dir,
            cert,
            key,
        }
    }

    fn files(&self) -> TlsFiles {
        TlsFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }

    /// A client that trusts the CA and offers ALPN `http/1.1`.
    fn client(&self) -> Arc<rustls::ClientConfig> {
        let mut config = (*self.ca.client_config()).clone();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }
}

/// A WebSocket over TLS to `ws_url` (a `wss://127.0.0.1:PORT/...` URL).
async fn connect_wss(ws_url: &str, certs: &Certs) -> Wss {
    let addr = SocketAddr::from(([127, 0, 0, 1], port_of(ws_url)));
    let tls = connect(addr, certs.client()).await.expect("TLS handshake");
    assert_eq!(
        tls.get_ref().1.alpn_protocol(),
        Some(&b"http/1.1"[..]),
        "ALPN http/1.1"
    );
    tokio_tungstenite::client_async(ws_url, tls)
        .await
        .expect("websocket over TLS")
        .0
}

/// Sends `total` random bytes in messages of 1..=`max_message` bytes and reads the echo;
/// asserts the greeting and then every byte.
async fn echo_exact(ws: &mut Wss, total: usize, max_message: usize, seed: u64, greeting: bool) {
    let mut rng = Lcg(seed);
    let payload = rng.bytes(total);
    let mut sent = 0;
    let mut received = Vec::with_capacity(total + GREETING.len());
    let want = total + if greeting { GREETING.len() } else { 0 };
    while received.len() < want {
        if sent < total {
            let n = (1 + rng.next() as usize % max_message).min(total - sent);
            ws.send(Message::binary(payload[sent..sent + n].to_vec()))
                .await
                .expect("send");
            sent += n;
        }
        // Read what is there without stalling the sender for long.
        let next = if sent < total {
            match tokio::time::timeout(Duration::from_millis(1), ws.next()).await {
                Ok(m) => m,
                Err(_) => continue,
            }
        } else {
            ws.next().await
        };
        match next {
            Some(Ok(Message::Binary(b))) => received.extend_from_slice(&b),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("unexpected {other:?} after {} bytes", received.len()),
        }
    }
    let body = if greeting {
        assert_eq!(&received[..GREETING.len()], GREETING, "greeting");
        &received[GREETING.len()..]
    } else {
        &received[..]
    };
    assert!(body == payload, "the echo differs from what was sent");
}

async fn tls_gate(certs: &Certs, tweak: impl FnOnce(&mut vncgate::Config)) -> TestGate {
    let files = certs.files();
    TestGate::start_with(4, move |c| {
        c.tls = Some(files);
        tweak(c);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_relays_byte_exact_over_tcp_and_unix_targets() {
    bounded(Duration::from_secs(60), async {
        let certs = Certs::new(KeyKind::EcdsaPkcs8);
        let gate = tls_gate(&certs, |_| {}).await;
        let tcp = FakeVnc::tcp(Mode::Echo).await;
        let unix = FakeVnc::unix(Mode::Echo).await;
        for (vm, fake) in [("vm-tls-tcp", &tcp), ("vm-tls-unix", &unix)] {
            let session = gate.open_ok(vm, &fake.target).await;
            let url = session["url"].as_str().expect("url");
            let ws_url = session["ws_url"].as_str().expect("ws_url");
            assert!(
                url.starts_with("https://") && url.contains("/vnc.html#token="),
                "{url}"
            );
            assert!(ws_url.starts_with("wss://"), "{ws_url}");
            let mut ws = connect_wss(ws_url, &certs).await;
            echo_exact(&mut ws, 4 << 20, 40_000, 7, true).await;
            // Small interactive messages too (keys, pointer).
            echo_exact(&mut ws, 20_000, 10, 8, false).await;
            ws.close(None).await.expect("close");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_and_ecdsa_keys_in_pkcs8_sec1_and_pkcs1_all_serve() {
    bounded(Duration::from_secs(60), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        for kind in [
            KeyKind::EcdsaPkcs8,
            KeyKind::EcdsaSec1,
            KeyKind::RsaPkcs8,
            KeyKind::RsaPkcs1,
        ] {
            let certs = Certs::new(kind);
            let gate = tls_gate(&certs, |_| {}).await;
            let session = gate.open_ok("vm-key", &fake.target).await;
            let mut ws = connect_wss(session["ws_url"].as_str().expect("ws_url"), &certs).await;
            echo_exact(&mut ws, 1000, 100, 1, true).await;
        }
    })
    .await;
}

/// Sends a plain HTTP request and reads the whole answer.
async fn plain_request(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /vnc.html HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("send");
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.expect("read answer");
    answer
}

#[tokio::test]
async fn plain_http_on_a_tls_port_gets_a_400_saying_https() {
    bounded(Duration::from_secs(30), async {
        let certs = Certs::new(KeyKind::EcdsaPkcs8);
        let api_files = certs.files();
        let gate = tls_gate(&certs, |c| c.api_tls = Some(api_files)).await;
        // The API itself speaks TLS now: open through an https client.
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let (status, session) = https_call(
            gate.api,
            &certs,
            "POST",
            "/v1/sessions",
            &serde_json::json!({"vm_id": "vm-plain", "target": fake.target}).to_string(),
        )
        .await;
        assert_eq!(status, 201, "{session}");
        let port = session["ws_port"].as_u64().expect("ws_port") as u16;
        for addr in [SocketAddr::from(([127, 0, 0, 1], port)), gate.api] {
            let answer = plain_request(addr).await;
            assert!(answer.starts_with("HTTP/1.1 400 "), "{addr}: {answer}");
            assert!(answer.contains("speaks HTTPS"), "{addr}: {answer}");
        }
        assert_eq!(fake.accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    })
    .await;
}

/// One request to an https API trusting the test CA: status and JSON body.
async fn https_call(
    api: SocketAddr,
    certs: &Certs,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, Value) {
    let tls = connect(api, certs.client()).await.expect("TLS to the API");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .expect("http handshake");
    let driver = tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", api.to_string())
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .expect("request");
    let response = sender.send_request(req).await.expect("answer");
    let status = response.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    driver.abort();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("JSON answer")
    };
    (status, value)
}

/// A rustls client limited to `versions` and `suites`, trusting the test CA.
fn narrow_client(
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
    suites: Option<Vec<rustls::SupportedCipherSuite>>,
) -> Arc<rustls::ClientConfig> {
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(s) = suites {
        provider.cipher_suites = s;
    }
    let mut roots = rustls::RootCertStore::empty();
    roots.add(certs.ca.cert_der.clone()).expect("root");
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(versions)
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_handshakes_disturb_nothing() {
    bounded(Duration::from_secs(60), async {
        let certs = Certs::new(KeyKind::EcdsaPkcs8);
        let gate = tls_gate(&certs, |c| c.tls_min_version = TlsVersion::V1_3).await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let session = gate.open_ok("vm-hostile", &fake.target).await;
        let ws_url = session["ws_url"].as_str().expect("ws_url").to_owned();
        let addr = SocketAddr::from(([127, 0, 0, 1], port_of(&ws_url)));
        let mut live = connect_wss(&ws_url, &certs).await;
        echo_exact(&mut live, 10_000, 100, 2, true).await;

        // Garbage after a handshake record's first byte: the daemon hangs up.
        let mut junk = TcpStream::connect(addr).await.expect("connect");
        let mut bytes = vec![0x16, 0x03, 0x01, 0x00, 0x40];
        bytes.extend(Lcg(3).bytes(64));
        junk.write_all(&bytes).await.expect("send junk");
        let mut sink = Vec::new();
        let _ = junk.read_to_end(&mut sink).await;

        // TLS 1.2 only against --tls-min-version 1.3: refused.
        let old = narrow_client(&certs, &[&rustls::version::TLS12], None);
        assert!(connect(addr, old).await.is_err(), "TLS 1.2 must be refused");

        // No cipher suite in common (RSA key exchange suites against an ECDSA certificate,
        // TLS 1.3 suites withheld): refused.
        let gate12 = tls_gate(&certs, |_| {}).await;
        let session12 = gate12.open_ok("vm-hostile", &fake.target).await;
        let addr12 = SocketAddr::from((
            [127, 0, 0, 1],
            port_of(session12["ws_url"].as_str().expect("ws_url")),
        ));
        let rsa_only = narrow_client(
            &certs,
            &[&rustls::version::TLS12],
            Some(vec![
                rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            ]),
        );
        assert!(
            connect(addr12, rsa_only).await.is_err(),
            "no common cipher suite must be refused"
        );

        // The live viewer kept relaying, and new handshakes work.
        echo_exact(&mut live, 10_000, 100, 4, false).await;
        let mut again = connect_wss(&ws_url, &certs).await;
        echo_exact(&mut again, 1000, 100, 5, true).await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_handshake_that_never_completes_is_dropped_at_the_header_timeout() {
    let certs = Certs::new(KeyKind::EcdsaPkcs8);
    let gate = tls_gate(&certs, |_| {}).await;
    let fake = FakeVnc::tcp(Mode::Echo).await;
    let session = gate.open_ok("vm-stall", &fake.target).await;
    let addr = SocketAddr::from((
        [127, 0, 0, 1],
        port_of(session["ws_url"].as_str().expect("ws_url")),
    ));
    let mut stalled = TcpStream::connect(addr).await.expect("connect");
    // The first bytes of a ClientHello record, and then nothing.
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
        .await
        .expect("send");
    let start = tokio::time::Instant::now();
    let mut sink = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(60), stalled.read(&mut sink))
        .await
        .expect("dropped within 60 s")
        .unwrap_or(0);
    assert_eq!(n, 0, "the daemon closed the connection");
    let waited = start.elapsed();
    assert!(
        waited >= vncgate::http::TLS_HANDSHAKE_TIMEOUT
            && waited < vncgate::http::TLS_HANDSHAKE_TIMEOUT + Duration::from_secs(2),
        "dropped after {waited:?}"
    );
}

/// Runs `vncgate serve ARGS` expecting it to fail at start; returns its stderr.
fn failed_start(args: &[&str]) -> String {
    let state = StateDir::new();
    let out = Command::new(env!("CARGO_BIN_EXE_vncgate"))
        .arg("serve")
        .args(["--api-listen", "127.0.0.1:0", "--state-file"])
        .arg(state.file())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run vncgate");
    assert_eq!(out.status.code(), Some(1), "{args:?} must exit 1");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn missing_unreadable_or_mismatched_cert_or_key_stop_the_start_naming_the_file() {
    let certs = Certs::new(KeyKind::EcdsaPkcs8);
    let other = certs.ca.leaf();
    let dir = &certs.dir.0;
    let other_key = dir.join("other-key.pem");
    std::fs::write(&other_key, &other.key_pem).expect("write");
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "not a certificate\n").expect("write");
    let cert = certs.cert.to_str().expect("path");
    let key = certs.key.to_str().expect("path");
    let missing = dir.join("missing.pem");
    let missing = missing.to_str().expect("path");
    // A directory cannot be read as a file, even by root.
    let unreadable = dir.to_str().expect("path");
    let garbage = garbage.to_str().expect("path");
    let other_key = other_key.to_str().expect("path");
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["--cert", missing, "--key", key],
            missing,
            "cannot read certificate",
        ),
        (
            vec!["--cert", cert, "--key", unreadable],
            unreadable,
            "cannot read key",
        ),
        (
            vec!["--cert", garbage, "--key", key],
            garbage,
            "no PEM certificate",
        ),
        (
            vec!["--cert", cert, "--key", garbage],
            garbage,
            "no usable private key",
        ),
        (
            vec!["--cert", cert, "--key", other_key],
            other_key,
            "does not belong",
        ),
        (
            vec!["--api-cert", cert, "--api-key", other_key],
            other_key,
            "--api-cert",
        ),
        (vec!["--cert", cert], "--key", "needs its private key"),
        (
            vec!["--cert", cert, "--key", key, "--tls-min-version", "1.1"],
            "--tls-min-version",
            "1.2 or 1.3",
        ),
    ];
    for (args, names, says) in cases {
        let stderr = failed_start(&args);
        assert!(
            stderr.contains(names) && stderr.contains(says),
            "{args:?}: stderr should name {names:?} and say {says:?}: {stderr}"
        );
    }
}

/// Sends SIGHUP to `pid`.
fn hangup(pid: u32) {
    let sent = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(sent.success());
}

/// The certificate a new handshake with the session port at `addr` gets.
async fn served_cert(addr: SocketAddr, certs: &Certs) -> Vec<u8> {
    let tls = connect(addr, certs.client()).await.expect("handshake");
    presented(&tls).as_ref().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_live_viewers_keep_relaying() {
    bounded(Duration::from_secs(90), async {
        let certs = Certs::new(KeyKind::EcdsaPkcs8);
        let (cert, key) = (
            certs.cert.display().to_string(),
            certs.key.display().to_string(),
        );
        let daemon = DaemonProcess::spawn(4, &["--cert", &cert, "--key", &key]).await;
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let session = daemon.open_ok("vm-reload", &fake.target).await;
        let ws_url = session["ws_url"].as_str().expect("ws_url").to_owned();
        let addr = SocketAddr::from(([127, 0, 0, 1], port_of(&ws_url)));
        let mut live = connect_wss(&ws_url, &certs).await;
        echo_exact(&mut live, 100_000, 1000, 10, true).await;
        assert_eq!(
            served_cert(addr, &certs).await,
            certs.leaf.cert_der.as_ref()
        );

        // A new pair: new handshakes present it once SIGHUP is handled.
        let renewed = certs.ca.leaf();
        renewed.write(&certs.dir.0, &certs.ca);
        hangup(daemon.pid());
        let mut seen = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen != renewed.cert_der.as_ref() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the new certificate was never served"
            );
            seen = served_cert(addr, &certs).await;
        }
        echo_exact(&mut live, 100_000, 1000, 11, false).await;

        // A broken pair: the old one stays, and status says why until a reload succeeds.
        std::fs::write(&certs.key, "-----BEGIN PRIVATE KEY-----\nbroken\n").expect("break key");
        hangup(daemon.pid());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = daemon.call("GET", "/v1/status", None).await.1;
            let warnings = status["warnings"].to_string();
            if warnings.contains("TLS reload for the session ports failed") {
                assert!(warnings.contains(&key), "{warnings}");
                assert_eq!(status["system_health"], "warning");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no warning: {status}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(served_cert(addr, &certs).await, renewed.cert_der.as_ref());
        echo_exact(&mut live, 100_000, 1000, 12, false).await;

        let fixed = certs.ca.leaf();
        fixed.write(&certs.dir.0, &certs.ca);
        hangup(daemon.pid());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while served_cert(addr, &certs).await != fixed.cert_der.as_ref() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the fixed pair was never served"
            );
        }
        let status = daemon.call("GET", "/v1/status", None).await.1;
        assert_eq!(status["warnings"], serde_json::json!([]), "{status}");
        echo_exact(&mut live, 100_000, 1000, 13, false).await;
    })
    .await;
}

/// A daemon process whose API speaks TLS; killed on drop.
struct TlsApiDaemon {
    child: Child,
    api: SocketAddr,
    _state: StateDir,
    _block: common::PortBlock,
}

impl Drop for TlsApiDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn tls_api_daemon(certs: &Certs) -> TlsApiDaemon {
    let block = common::PortBlock::take();
    let api = SocketAddr::from(([127, 0, 0, 1], block.spare()));
    let range = block.range(4);
    let state = StateDir::new();
    let (cert, key) = (
        certs.cert.display().to_string(),
        certs.key.display().to_string(),
    );
    let args = DaemonProcess::args(
        api,
        &range,
        &state,
        &["--api-cert", &cert, "--api-key", &key],
    );
    let mut daemon = TlsApiDaemon {
        child: DaemonProcess::launch(&args),
        api,
        _state: state,
        _block: block,
    };
    let healthy = async {
        loop {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                panic!("vncgate exited early: {status}");
            }
            if let Ok(tls) = connect(api, certs.client()).await {
                drop(tls);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(15), healthy)
        .await
        .expect("the TLS API answered within 15 s");
    daemon
}

/// Runs the CLI with `args` and `env`; returns (exit code, stdout, stderr).
fn cli(args: &[&str], env: &[(&str, &Path)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vncgate"));
    cmd.args(args)
        .stdin(Stdio::null())
        .env_remove("VNCGATE_API_CA");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_reaches_a_tls_api_trusting_a_private_ca() {
    bounded(Duration::from_secs(60), async {
        let certs = Certs::new(KeyKind::EcdsaPkcs8);
        let daemon = tls_api_daemon(&certs).await;
        let ca = certs.ca.write_ca(&certs.dir.0);
        let api = format!("https://127.0.0.1:{}", daemon.api.port());
        let with_ca = [("VNCGATE_API_CA", ca.as_path())];

        let (code, out, err) = cli(
            &["--api", &api, "open", "vm-cli", "127.0.0.1:5999"],
            &with_ca,
        );
        assert_eq!(code, 0, "open: {err}");
        assert!(
            out.trim().starts_with("http://127.0.0.1:") && out.contains("#token="),
            "{out}"
        );
        let (code, out, err) = cli(&["--api", &api, "list"], &with_ca);
        assert_eq!(code, 0, "list: {err}");
        assert!(out.contains("vm-cli"), "{out}");
        let (code, _, err) = cli(&["--api", &api, "close", "vm-cli"], &with_ca);
        assert_eq!(code, 0, "close: {err}");

        // Without the CA the certificate is not trusted; over http the port says to use https.
        let (code, _, err) = cli(&["--api", &api, "status"], &[]);
        assert_eq!(code, 1);
        assert!(
            err.contains("TLS handshake failed") && err.contains("VNCGATE_API_CA"),
            "{err}"
        );
        let plain = format!("http://127.0.0.1:{}", daemon.api.port());
        let (code, _, err) = cli(&["--api", &plain, "status"], &with_ca);
        assert_eq!(code, 1);
        assert!(err.contains("speaks HTTPS"), "{err}");
    })
    .await;
}
