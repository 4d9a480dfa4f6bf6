//! Test helpers: a daemon on loopback with its own port block, a fake VNC server, an API client.
#![allow(dead_code)]

use std::fs::File;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use vncgate::{Config, Daemon};

pub const GREETING: &[u8] = b"RFB 003.008\n";

/// The (code, reason) a viewer is sent for `reason`: the daemon's own close table, whose values
/// `vncgate::relay`'s unit test holds against DESIGN.md.
pub fn close_of(reason: vncgate::relay::CloseReason) -> (u16, String) {
    (reason.code(), reason.reason().to_owned())
}

/// Runs a test body with a deadline, so no test can hang CI.
pub async fn bounded<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, f).await {
        Ok(v) => v,
        Err(_) => panic!("test exceeded its {limit:?} deadline"),
    }
}

/// Polls `cond` until it holds or `limit` passes; returns whether it held.
pub async fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the async `cond` until it holds or `limit` passes; returns whether it held.
#[allow(dead_code)]
pub async fn wait_until_async<F: Future<Output = bool>>(
    limit: Duration,
    mut cond: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A block of 1000 ports below the ephemeral range, held through a lock file so parallel tests
/// and test processes never share one.
pub struct PortBlock {
    pub first: u16,
    _lock: File,
}

impl PortBlock {
    pub fn take() -> PortBlock {
        let dir = std::env::temp_dir().join("vncgate-test-ports");
        std::fs::create_dir_all(&dir).expect("create the port-block lock directory");
        for i in 0..22u16 {
            let first = 10_000 + i * 1000;
            let file = File::create(dir.join(format!("block-{first}.lock"))).expect("lock file");
            if file.try_lock().is_ok() {
                return PortBlock { first, _lock: file };
            }
        }
        panic!("no free test port block (22 in use)");
    }

    pub fn range(&self, len: u16) -> RangeInclusive<u16> {
        assert!(len <= 998);
        self.first..=self.first + len - 1
    }

    /// The block's last port, kept out of every range: for an API port of a daemon process.
    pub fn spare(&self) -> u16 {
        self.first + 999
    }

    /// The block's next-to-last port, kept out of every range: a daemon process's public
    /// port (`PUBLIC` in its extra flags).
    pub fn public(&self) -> u16 {
        self.first + 998
    }
}

/// A daemon running in this process on 127.0.0.1, stopped on drop.
pub struct TestGate {
    pub daemon: Option<Daemon>,
    pub api: SocketAddr,
    pub block: PortBlock,
    pub http: Client<HttpConnector, Full<Bytes>>,
    pub state: StateDir,
}

impl TestGate {
    pub async fn start(ports: u16) -> TestGate {
        Self::start_with(ports, |_| {}).await
    }

    pub async fn start_with(ports: u16, tweak: impl FnOnce(&mut Config)) -> TestGate {
        vncgate::raise_nofile_limit();
        let block = PortBlock::take();
        let state = StateDir::new();
        let mut config = Config {
            state_file: state.file(),
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            listen_host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port_range: block.range(ports),
            max_sessions: usize::from(ports),
            ..Config::default()
        };
        tweak(&mut config);
        let daemon = Daemon::start(config).await.expect("start the daemon");
        let api = daemon.api_addr();
        TestGate {
            daemon: Some(daemon),
            api,
            block,
            http: Client::builder(TokioExecutor::new()).build_http(),
            state,
        }
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("daemon running")
    }

    /// One API request with a raw body; returns status and JSON (Null for an empty body).
    pub async fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        api_call(&self.http, self.api, method, path, body).await
    }

    pub async fn open(&self, vm_id: &str, target: &str) -> (u16, Value) {
        api_open(&self.http, self.api, vm_id, target).await
    }

    /// Opens and asserts success; returns the Session.
    pub async fn open_ok(&self, vm_id: &str, target: &str) -> Value {
        expect_opened(vm_id, self.open(vm_id, target).await)
    }

    pub async fn close(&self, vm_id: &str) -> u16 {
        self.call("DELETE", &format!("/v1/sessions/{vm_id}"), None)
            .await
            .0
    }

    pub async fn status(&self) -> Value {
        self.call("GET", "/v1/status", None).await.1
    }

    pub async fn session_count(&self) -> usize {
        let (_, v) = self.call("GET", "/v1/sessions", None).await;
        v["sessions"].as_array().map_or(0, Vec::len)
    }
}

pub async fn api_call(
    http: &Client<HttpConnector, Full<Bytes>>,
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> (u16, Value) {
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{api}{path}"))
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
        .expect("request");
    let response = http.request(req).await.expect("API reachable");
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("API body")
        .to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("non-JSON answer: {}", String::from_utf8_lossy(&bytes)))
    };
    (status, value)
}

/// `POST /v1/sessions` for `vm_id` and `target`.
pub async fn api_open(
    http: &Client<HttpConnector, Full<Bytes>>,
    api: SocketAddr,
    vm_id: &str,
    target: &str,
) -> (u16, Value) {
    let body = serde_json::json!({ "vm_id": vm_id, "target": target }).to_string();
    api_call(http, api, "POST", "/v1/sessions", Some(body.as_bytes())).await
}

/// The Session of a successful open (201 or 200); fails the test otherwise.
pub fn expect_opened(vm_id: &str, (status, session): (u16, Value)) -> Value {
    assert!(
        status == 201 || status == 200,
        "open {vm_id}: {status} {session}"
    );
    session
}

/// What a fake VNC server does after its greeting.
#[derive(Clone, Copy, Debug)]
pub enum Mode {
    /// Echo everything back.
    Echo,
    /// Stream this many bytes of a counting pattern, then hold the connection open.
    Stream(u64),
}

/// What happened on a fake VNC server's connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Connected,
    /// The proxy closed its side; the bytes it had sent.
    Eof(u64),
}

/// A fake VNC server: sends the RFB greeting, then echoes or streams.
pub struct FakeVnc {
    pub target: String,
    pub events: mpsc::UnboundedReceiver<Event>,
    pub accepted: Arc<AtomicUsize>,
    pub written: Arc<AtomicU64>,
    /// Cancel to make the server drop every connection (the "VNC server closed" case).
    pub drop_all: CancellationToken,
    stop: CancellationToken,
    socket_path: Option<PathBuf>,
}

impl Drop for FakeVnc {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(p) = &self.socket_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

enum AnyListener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl FakeVnc {
    pub async fn tcp(mode: Mode) -> FakeVnc {
        let l = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake VNC");
        let target = l.local_addr().expect("addr").to_string();
        Self::run(AnyListener::Tcp(l), target, mode, None)
    }

    pub async fn tcp6(mode: Mode) -> FakeVnc {
        let l = TcpListener::bind("[::1]:0")
            .await
            .expect("bind fake VNC on [::1] (IPv6 loopback is needed for this test)");
        let target = format!("[::1]:{}", l.local_addr().expect("addr").port());
        Self::run(AnyListener::Tcp(l), target, mode, None)
    }

    pub async fn unix(mode: Mode) -> FakeVnc {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "vncgate-fake-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).expect("bind fake VNC unix socket");
        let target = format!("unix:{}", path.display());
        Self::run(AnyListener::Unix(l), target, mode, Some(path))
    }

    fn run(
        listener: AnyListener,
        target: String,
        mode: Mode,
        socket_path: Option<PathBuf>,
    ) -> FakeVnc {
        let (tx, events) = mpsc::unbounded_channel();
        let accepted = Arc::new(AtomicUsize::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let drop_all = CancellationToken::new();
        let (a, w, s, d) = (
            accepted.clone(),
            written.clone(),
            stop.clone(),
            drop_all.clone(),
        );
        tokio::spawn(async move {
            loop {
                let conn: Box<dyn Conn> = tokio::select! {
                    _ = s.cancelled() => return,
                    c = accept(&listener) => match c { Some(c) => c, None => return },
                };
                a.fetch_add(1, Ordering::SeqCst);
                let _ = tx.send(Event::Connected);
                let (tx, w, s, d) = (tx.clone(), w.clone(), s.clone(), d.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        received = serve(conn, mode, w) => { let _ = tx.send(Event::Eof(received)); }
                        _ = s.cancelled() => {}
                        _ = d.cancelled() => {}
                    }
                });
            }
        });
        FakeVnc {
            target,
            events,
            accepted,
            written,
            drop_all,
            stop,
            socket_path,
        }
    }

    /// The next event within `limit`.
    pub async fn next_event(&mut self, limit: Duration) -> Option<Event> {
        tokio::time::timeout(limit, self.events.recv())
            .await
            .ok()
            .flatten()
    }
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

async fn accept(l: &AnyListener) -> Option<Box<dyn Conn>> {
    match l {
        AnyListener::Tcp(l) => l
            .accept()
            .await
            .ok()
            .map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        AnyListener::Unix(l) => l
            .accept()
            .await
            .ok()
            .map(|(s, _)| Box::new(s) as Box<dyn Conn>),
    }
}

/// Returns the bytes received before EOF.
async fn serve(mut conn: Box<dyn Conn>, mode: Mode, written: Arc<AtomicU64>) -> u64 {
    if conn.write_all(GREETING).await.is_err() {
        return 0;
    }
    let mut received = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    match mode {
        Mode::Echo => loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return received,
                Ok(n) => {
                    received += n as u64;
                    if conn.write_all(&buf[..n]).await.is_err() {
                        return received;
                    }
                }
            }
        },
        Mode::Stream(total) => {
            let (mut rx, mut tx) = tokio::io::split(conn);
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
            let writer = async {
                let mut sent = 0u64;
                while sent < total {
                    let n = chunk.len().min((total - sent) as usize);
                    if tx.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n as u64;
                    written.fetch_add(n as u64, Ordering::SeqCst);
                }
                std::future::pending::<()>().await
            };
            let reader = async {
                loop {
                    match rx.read(&mut buf).await {
                        Ok(0) | Err(_) => return received,
                        Ok(n) => received += n as u64,
                    }
                }
            };
            tokio::select! {
                r = reader => r,
                _ = writer => received,
            }
        }
    }
}

/// A small deterministic generator for chunk sizes and payloads (no extra dependency).
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// Descriptors open in process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Resident set of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// Peak resident set of process `pid` (VmHWM), in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A `/proc/PID/status` figure in kB (0 when it cannot be read).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A fresh state file path in its own directory, removed on drop.
pub struct StateDir(pub PathBuf);

impl StateDir {
    pub fn new() -> StateDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vncgate-state-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("state dir");
        StateDir(dir)
    }

    pub fn file(&self) -> PathBuf {
        self.0.join("state.json")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `vncgate` binary running as its own process (for RSS, descriptors, signals and
/// restarts), killed by PID on drop.
/// Replaces the value that follows `flag` in `args` (a daemon's command line).
pub fn set_flag(args: &mut [String], flag: &str, value: String) {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} is not among the daemon's flags"))
        + 1;
    args[at] = value;
}

pub struct DaemonProcess {
    pub child: std::process::Child,
    pub api: SocketAddr,
    pub block: PortBlock,
    pub http: Client<HttpConnector, Full<Bytes>>,
    pub state: StateDir,
    pub args: Vec<String>,
    /// Where its stderr goes (appended to across restarts), if not inherited.
    pub log: Option<PathBuf>,
}

impl DaemonProcess {
    pub async fn spawn(ports: u16, extra: &[&str]) -> DaemonProcess {
        Self::spawn_logging_to(ports, extra, None).await
    }

    /// [`DaemonProcess::spawn`] with the daemon's stderr (its log) written to `log`.
    pub async fn spawn_logging_to(
        ports: u16,
        extra: &[&str],
        log: Option<&std::path::Path>,
    ) -> DaemonProcess {
        let block = PortBlock::take();
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, block.spare()));
        let range = block.range(ports);
        let state = StateDir::new();
        let public = format!("127.0.0.1:{}", block.public());
        let extra: Vec<&str> = extra
            .iter()
            .map(|a| if *a == "PUBLIC" { public.as_str() } else { a })
            .collect();
        let args = Self::args(api, &range, &state, &extra);
        let child = Self::spawn_child(&args, log);
        let http = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build_http();
        let mut process = DaemonProcess {
            child,
            api,
            block,
            http,
            state,
            args,
            log: log.map(Into::into),
        };
        process.wait_healthy().await;
        process
    }

    /// `serve` flags for a daemon on loopback: API at `api`, pool `range`, state in `state`,
    /// then `extra`.
    pub fn args(
        api: SocketAddr,
        range: &RangeInclusive<u16>,
        state: &StateDir,
        extra: &[&str],
    ) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--api-listen".into(),
            api.to_string(),
            "--listen-host".into(),
            "127.0.0.1".into(),
            "--port-range".into(),
            format!("{}-{}", range.start(), range.end()),
            "--state-file".into(),
            state.file().display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Starts `vncgate serve ARGS`, its stderr appended to `log` if given.
    fn spawn_child(args: &[String], log: Option<&std::path::Path>) -> std::process::Child {
        let mut command = Self::command(args);
        if let Some(path) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the daemon's log file");
            command.stderr(file);
        }
        command.spawn().expect("start the vncgate binary")
    }

    /// Starts `vncgate serve ARGS` (not waiting for it).
    pub fn launch(args: &[String]) -> std::process::Child {
        Self::command(args)
            .spawn()
            .expect("start the vncgate binary")
    }

    /// The command that runs `vncgate serve ARGS`, logging warnings and errors only.
    pub fn command(args: &[String]) -> std::process::Command {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_vncgate"));
        command
            .arg("serve")
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null());
        command
    }

    /// Waits until `/healthz` answers (the daemon binds the API last).
    pub async fn wait_healthy(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let req = hyper::Request::get(format!("http://{}/healthz", self.api))
                .body(Full::new(Bytes::new()))
                .expect("request");
            if let Ok(r) = self.http.request(req).await
                && r.status() == 200
            {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("vncgate exited early: {status}");
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "vncgate did not answer /healthz within 15 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit status and how long the daemon took to exit (at most 10 s).
    pub async fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let start = std::time::Instant::now();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(sent.success());
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (status, start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(10) {
                self.kill9();
                panic!("vncgate did not exit within 10 s of SIGTERM");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Replaces the value of `flag` among the flags the next [`DaemonProcess::restart`] uses.
    pub fn set_arg(&mut self, flag: &str, value: String) {
        set_flag(&mut self.args, flag, value);
    }

    /// Starts the daemon again with the same flags and state file.
    pub async fn restart(&mut self) {
        self.child = Self::spawn_child(&self.args, self.log.as_deref());
        self.wait_healthy().await;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        api_call(&self.http, self.api, method, path, body).await
    }

    pub async fn open(&self, vm_id: &str, target: &str) -> (u16, Value) {
        api_open(&self.http, self.api, vm_id, target).await
    }

    /// Opens and asserts success; returns the Session.
    pub async fn open_ok(&self, vm_id: &str, target: &str) -> Value {
        expect_opened(vm_id, self.open(vm_id, target).await)
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The descriptors of process `pid` and what they point at, for a failure message.
pub fn fd_list(pid: u32) -> String {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return String::new();
    };
    dir.filter_map(|e| e.ok())
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            format!("{}->{}", e.file_name().to_string_lossy(), target)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

pub mod browser;
pub mod raw;
pub mod rfb;
pub mod tls;
pub mod vnc;
