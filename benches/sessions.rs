//! Concurrent proxied sessions: vncgate against the machine's ceiling (direct TCP), an ideal
//! TCP relay, and websockify; vncgate with TLS against a TLS relay (tokio-rustls, ring). `cargo bench --bench sessions` prints one table and writes
//! `target/bench/sessions.json` (and `.md`).
//!
//! Every party runs in its own process: this binary re-executes itself as the fake VNC server
//! (`VNCGATE_BENCH_ROLE=fake`), the TCP relay (`relay`) and the load generator (`load`); the
//! daemon is the built `vncgate` binary with its state file on the checkout's file system.
//!
//! Development knobs (the committed run uses none): `VNCGATE_BENCH_N=100,800` (sizes),
//! `VNCGATE_BENCH_ROUNDS=5`, `VNCGATE_BENCH_OPENS_ONLY=1` (open figures only, with CPU per
//! open), `VNCGATE_BENCH_NO_WEBSOCKIFY=1`, `VNCGATE_BENCH_EXE=path` (another vncgate build),
//! `VNCGATE_BENCH_DAEMON_LOG=warn,vncgate::state=debug` (the daemon's `RUST_LOG`; that one logs
//! each state commit's duration and batch size), `VNCGATE_BENCH_RTT_ONLY=1` (round trips only,
//! relay against vncgate, and the TLS relay against vncgate with TLS),
//! `VNCGATE_BENCH_NO_TLS=1` (skip the TLS rows),
//! `VNCGATE_BENCH_BASELINE_EXE=path` (another vncgate build measured beside this one in the same
//! run, rows `vncgate-baseline`: the A/B of a change), `VNCGATE_BENCH_SYSCALLS=recvfrom,...`
//! (those system calls counted one by one, per MB), `VNCGATE_BENCH_PROFILE=DIR` (a `perf
//! record -g` of each proxy's streaming phase), `VNCGATE_BENCH_NO_PUBLIC=1` (skip the
//! public-port rows), `VNCGATE_BENCH_BASELINE_PUBLIC=1` (the baseline build serves through its
//! public port with `--session-ports off`, at every N, and the A/B compares it with
//! `vncgate-public`).
//!
//! Rows `vncgate-public`: a third daemon with `--public-listen --session-ports off`, every
//! viewer through its one public port (`/s/{vm_id}/websockify`), at every N including 5000
//! (past the pool's 800, where the session-port rows stop). The load generator spreads its
//! connections over the source addresses 127.0.0.1-127.0.0.16, so repeated rounds of 5000
//! connections do not run out of ephemeral ports on one address pair.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GREETING: &[u8] = b"RFB 003.008\n";
const CHUNK: usize = 64 * 1024;
const ROUNDS: usize = 3;
const WARMUP: Duration = Duration::from_millis(500);

/// Warm-up before a throughput window with `n` sessions: when it starts, every socket on the
/// way is full (the VNC side streamed since its viewer connected), and draining that backlog
/// (hundreds of MB at N = 5000) is not the steady state the window measures. 0.2 ms a session
/// on top of [`WARMUP`]: 0.66 s at N = 800, 1.5 s at N = 5000.
fn warmup(n: usize) -> Duration {
    WARMUP + Duration::from_micros(200 * n as u64)
}
const WINDOW: Duration = Duration::from_secs(2);
/// Round trips are timed for this long: 4 s, as the independent measurement of issue 11 did.
const RTT_WINDOW: Duration = Duration::from_secs(4);
/// A pause before each round-trip phase, so it starts on a quiet machine.
const SETTLE: Duration = Duration::from_secs(2);
/// Ports for the daemon and websockify, below the ephemeral range.
const POOL_FIRST: u16 = 21_000;
const API_PORT: u16 = 21_990;
const WSF_FIRST: u16 = 22_000;
/// The TLS daemon's pool and API, and the baseline build's (A/B runs).
const TLS_POOL_FIRST: u16 = 24_000;
const TLS_API_PORT: u16 = 24_990;
const BASELINE_POOL_FIRST: u16 = 25_000;
const BASELINE_API_PORT: u16 = 25_990;
/// The baseline build's public port, with `VNCGATE_BENCH_BASELINE_PUBLIC`.
const BASELINE_PUBLIC_PORT: u16 = 25_980;
/// The public-port daemon's API and public port (its pool range is never bound).
const PUBLIC_POOL_FIRST: u16 = 26_000;
const PUBLIC_API_PORT: u16 = 26_990;
const PUBLIC_PORT: u16 = 26_980;
/// The session-port daemon's cap: sizes above it are measured on the public port only.
const POOL_SESSIONS: usize = 800;
/// Loopback source addresses the load generator's connections are spread over.
const SOURCE_ADDRESSES: u32 = 16;

fn main() {
    let role = std::env::var("VNCGATE_BENCH_ROLE").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match role.as_str() {
        "fake" => rt.block_on(run_fake()),
        "relay" => rt.block_on(run_relay()),
        "load" => rt.block_on(run_load()),
        _ => {
            drop(rt);
            orchestrate();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the roles

/// Ends this helper process when its parent goes away (stdin closes).
fn exit_with_parent() {
    std::thread::spawn(|| {
        let mut sink = String::new();
        while std::io::stdin()
            .read_line(&mut sink)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            sink.clear();
        }
        std::process::exit(0);
    });
}

// ---------------------------------------------------------------------------------------------
// Fake VNC server: one port streams framebuffer-like chunks, one echoes.

async fn run_fake() {
    let stream = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let echo = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!(
        "{} {}",
        stream.local_addr().expect("addr").port(),
        echo.local_addr().expect("addr").port()
    );
    exit_with_parent();
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let streamer = async move {
        loop {
            let Ok((s, _)) = stream.accept().await else {
                continue;
            };
            let chunk = chunk.clone();
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut rx, mut tx) = s.into_split();
                let writer = async {
                    if tx.write_all(GREETING).await.is_err() {
                        return;
                    }
                    while tx.write_all(&chunk).await.is_ok() {}
                };
                // The proxy's EOF ends the stream at once instead of at the next failed write.
                let eof = async {
                    let mut b = [0u8; 512];
                    while matches!(rx.read(&mut b).await, Ok(n) if n > 0) {}
                };
                tokio::select! { _ = writer => {}, _ = eof => {} }
            });
        }
    };
    let echoer = async move {
        loop {
            let Ok((mut s, _)) = echo.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                if s.write_all(GREETING).await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    };
    tokio::join!(streamer, echoer);
}

// ---------------------------------------------------------------------------------------------
// The ideal TCP relay: copy_bidirectional_with_sizes, 64 KiB both ways, TCP_NODELAY.

async fn run_relay() {
    // With a certificate the relay terminates TLS from the clients (the TLS relay of the
    // TLS rows): the same rustls configuration vncgate builds, 64 KiB copies both ways.
    let tls = std::env::var("VNCGATE_BENCH_TLS_CERT").ok().map(|cert| {
        let key = std::env::var("VNCGATE_BENCH_TLS_KEY").expect("VNCGATE_BENCH_TLS_KEY");
        let files = vncgate::tls::TlsFiles {
            cert: cert.into(),
            key: key.into(),
        };
        let tls = vncgate::tls::ReloadableTls::load(files, vncgate::tls::TlsVersion::V1_2)
            .expect("relay certificate");
        tls.acceptor().clone()
    });
    let args: Vec<String> = std::env::args().collect();
    let targets: Vec<SocketAddr> = args[args.len() - 2..]
        .iter()
        .map(|a| a.parse().expect("target"))
        .collect();
    let mut ports = Vec::new();
    let mut listeners = Vec::new();
    for _ in &targets {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        ports.push(l.local_addr().expect("addr").port().to_string());
        listeners.push(l);
    }
    println!("{}", ports.join(" "));
    exit_with_parent();
    let mut tasks = Vec::new();
    for (l, target) in listeners.into_iter().zip(targets) {
        let tls = tls.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((client, _)) = l.accept().await else {
                    continue;
                };
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _ = client.set_nodelay(true);
                    let mut client: Box<dyn Io> = match tls {
                        Some(acceptor) => match acceptor.accept(client).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(client),
                    };
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional_with_sizes(
                        &mut client,
                        &mut server,
                        CHUNK,
                        CHUNK,
                    )
                    .await;
                });
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

// ---------------------------------------------------------------------------------------------
// Load generator: N clients, raw TCP or WebSocket (masked frames, as browsers send them).

/// A client's connection: plain TCP or TLS.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// The load generator's TLS client: trusts the bench's CA (`VNCGATE_BENCH_CA`).
fn tls_connector() -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    let path = std::env::var("VNCGATE_BENCH_CA").expect("VNCGATE_BENCH_CA");
    let ca = rustls::pki_types::CertificateDer::from_pem_file(path).expect("bench CA");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A connected client: the socket and what is left of a partly read frame header.
struct Client {
    stream: Box<dyn Io>,
    /// TCP connect and TLS handshake, ms (TLS only).
    handshake_ms: Option<f64>,
    ws: bool,
    pending: BytesMut,
    /// Where this connection's frame stream is: kept across phases, since the read that brought
    /// the greeting may have brought the start of the next frame too.
    counter: FrameCounter,
}

async fn connect_client(url: &str, tls: &tokio_rustls::TlsConnector) -> Result<Client, String> {
    let (ws, secure, rest) = if let Some(r) = url.strip_prefix("ws://") {
        (true, false, r)
    } else if let Some(r) = url.strip_prefix("wss://") {
        (true, true, r)
    } else if let Some(r) = url.strip_prefix("tcp://") {
        (false, false, r)
    } else if let Some(r) = url.strip_prefix("tls://") {
        (false, true, r)
    } else {
        return Err(format!("bad url {url}"));
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let started = Instant::now();
    let to: SocketAddr = authority.parse().map_err(|e| format!("{authority}: {e}"))?;
    // 127.0.0.1..=127.0.0.16 in turn: each (source, destination) pair has its own ephemeral
    // ports, so thousands of connections a round, round after round, never run short.
    static NEXT_SOURCE: AtomicU64 = AtomicU64::new(0);
    let k = (NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % u64::from(SOURCE_ADDRESSES)) as u32;
    let source = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::LOCALHOST) + k);
    let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
    socket
        .bind(SocketAddr::from((source, 0)))
        .map_err(|e| format!("bind {source}: {e}"))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(to))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    let (mut stream, handshake_ms): (Box<dyn Io>, _) = if secure {
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
        let s = tokio::time::timeout(Duration::from_secs(10), tls.connect(name, tcp))
            .await
            .map_err(|_| "TLS handshake timed out".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        (Box::new(s), Some(started.elapsed().as_secs_f64() * 1e3))
    } else {
        (Box::new(tcp), None)
    };
    let mut pending = BytesMut::new();
    if ws {
        let req = format!(
            "GET /{path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).into_owned();
                if !head.starts_with("HTTP/1.1 101") {
                    return Err(head.lines().next().unwrap_or("").to_owned());
                }
                pending.advance(end + 4);
                break;
            }
            if Instant::now() > deadline {
                return Err("handshake timed out".into());
            }
            let n = tokio::time::timeout(Duration::from_secs(10), stream.read_buf(&mut pending))
                .await
                .map_err(|_| "handshake timed out".to_string())?
                .map_err(|e| e.to_string())?;
            if n == 0 {
                return Err("closed during handshake".into());
            }
        }
    }
    Ok(Client {
        stream,
        handshake_ms,
        ws,
        pending,
        counter: FrameCounter::default(),
    })
}

/// Payload bytes in `data` for a stream of server frames; `state` carries a partial frame
/// (bytes of payload still to come, or header bytes waiting in `head`).
#[derive(Default)]
struct FrameCounter {
    payload_left: u64,
    head: Vec<u8>,
    /// Data frames started.
    frames: u64,
    /// Headers no server may send (reserved bits, a mask, an unknown opcode): the count has
    /// lost the frame boundaries, so the payload it reports is wrong.
    bad: u64,
}

impl FrameCounter {
    /// Feeds bytes; returns payload bytes and appends complete small payloads to `out`.
    fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) -> u64 {
        let mut payload = 0u64;
        while !data.is_empty() {
            if self.payload_left > 0 {
                let n = (self.payload_left as usize).min(data.len());
                out.extend_from_slice(&data[..n.min(64)]);
                payload += n as u64;
                self.payload_left -= n as u64;
                data = &data[n..];
                continue;
            }
            self.head.push(data[0]);
            data = &data[1..];
            if self.head.len() < 2 {
                continue;
            }
            let len7 = (self.head[1] & 0x7f) as usize;
            let need = 2 + match len7 {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            if self.head.len() < need {
                continue;
            }
            let len = match len7 {
                126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                127 => u64::from_be_bytes(self.head[2..10].try_into().unwrap_or([0; 8])),
                n => n as u64,
            };
            let opcode = self.head[0] & 0x0f;
            if self.head[0] & 0x70 != 0
                || self.head[1] & 0x80 != 0
                || !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10)
            {
                self.bad += 1;
            }
            self.head.clear();
            if opcode >= 8 {
                // Control frame (ping): skip its payload, not counted.
                let skip = (len as usize).min(data.len());
                data = &data[skip..];
                continue;
            }
            self.payload_left = len;
            self.frames += 1;
        }
        payload
    }
}

/// Sends `payload` as one masked binary frame.
fn masked_frame(payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0x82, 0x80 | payload.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

struct LoadState {
    clients: Vec<Client>,
    tls: tokio_rustls::TlsConnector,
}

/// Commands arrive as JSON lines on stdin; when the parent goes, stdin ends and so does this.
async fn run_load() {
    let stdin = tokio::io::stdin();
    let mut lines = tokio::io::BufReader::new(stdin);
    let mut state = LoadState {
        clients: Vec::new(),
        tls: tls_connector(),
    };
    let mut line = String::new();
    loop {
        line.clear();
        use tokio::io::AsyncBufReadExt;
        if lines
            .read_line(&mut line)
            .await
            .map(|n| n == 0)
            .unwrap_or(true)
        {
            return;
        }
        let cmd: Value = serde_json::from_str(&line).expect("command");
        let reply = match cmd["cmd"].as_str().unwrap_or("") {
            "connect" => load_connect(&mut state, &cmd).await,
            "throughput" => load_throughput(&mut state, &cmd).await,
            "rtt" => load_rtt(&mut state).await,
            "disconnect" => {
                state.clients.clear();
                json!({"ok": true})
            }
            other => json!({"error": format!("unknown command {other}")}),
        };
        println!("{reply}");
    }
}

async fn load_connect(state: &mut LoadState, cmd: &Value) -> Value {
    let urls: Vec<String> = cmd["urls"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let started = Instant::now();
    // 32 connects at a time, as a burst of browsers would; each must show the VNC greeting
    // within 15 s or counts as failed.
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|u| {
            let sem = sem.clone();
            let tls = state.tls.clone();
            tokio::spawn(async move {
                let _permit = sem.acquire().await;
                tokio::time::timeout(Duration::from_secs(15), async {
                    let mut c = connect_client(&u, &tls).await?;
                    let mut got = Vec::new();
                    let mut buf = std::mem::take(&mut c.pending);
                    loop {
                        if c.ws {
                            c.counter.feed(&buf, &mut got);
                        } else {
                            got.extend_from_slice(&buf);
                        }
                        buf.clear();
                        if got.len() >= GREETING.len() {
                            return Ok(c);
                        }
                        match c.stream.read_buf(&mut buf).await {
                            Ok(n) if n > 0 => {}
                            _ => return Err("closed before the greeting".to_string()),
                        }
                    }
                })
                .await
                .unwrap_or_else(|_| Err("no greeting within 15 s".into()))
            })
        })
        .collect();
    let mut failed = 0;
    let mut first_error = None;
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => state.clients.push(c),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let mut handshakes: Vec<f64> = state
        .clients
        .iter()
        .filter_map(|c| c.handshake_ms)
        .collect();
    handshakes.sort_by(|a, b| a.total_cmp(b));
    json!({"connected": state.clients.len(), "failed": failed, "error": first_error, "ms": started.elapsed().as_secs_f64() * 1e3,
        "handshake_p50_ms": percentile(&handshakes, 0.5), "handshake_p99_ms": percentile(&handshakes, 0.99)})
}

/// The proxy's (and the fake server's, and this process's) counters at one instant.
struct Counters {
    proxy_cpu: f64,
    fake_cpu: f64,
    load_cpu: f64,
    switches: (u64, u64),
    faults: u64,
}

impl Counters {
    fn read(proxy: &[u32], fake: &[u32]) -> Counters {
        Counters {
            proxy_cpu: cpu_seconds_of(proxy),
            fake_cpu: cpu_seconds_of(fake),
            load_cpu: cpu_seconds_of(&[std::process::id()]),
            switches: context_switches_of(proxy),
            faults: minor_faults_of(proxy),
        }
    }
}

/// Streams for `warmup_ms`, then counts payload for [`WINDOW`]; the CPU seconds, context
/// switches and page faults of `pids` (the proxy), `fake_pid` and this process are read at
/// the window's two ends, so they cover exactly the bytes counted.
async fn load_throughput(state: &mut LoadState, cmd: &Value) -> Value {
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    };
    // Threads and children are found once, before the window, not at its edges.
    let proxy = with_descendants(&ids(&cmd["pids"]));
    let fake = ids(&cmd["fake_pids"]);
    let warmup = cmd["warmup_ms"]
        .as_u64()
        .map_or(WARMUP, Duration::from_millis);
    let total = Arc::new(AtomicU64::new(0));
    let (reads, frames) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for mut c in std::mem::take(&mut state.clients) {
        let (total, counting, stop) = (total.clone(), counting.clone(), stop.clone());
        let (reads, frames) = (reads.clone(), frames.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(256 * 1024);
            let mut sink = Vec::new();
            // This session's payload in the window, for the fairness index.
            let mut mine = 0u64;
            loop {
                buf.clear();
                tokio::select! {
                    r = c.stream.read_buf(&mut buf) => match r {
                        Ok(n) if n > 0 => {
                            let frames_before = c.counter.frames;
                            let payload = if c.ws { sink.clear(); c.counter.feed(&buf, &mut sink) } else { n as u64 };
                            if counting.load(Ordering::Relaxed) {
                                mine += payload;
                                total.fetch_add(payload, Ordering::Relaxed);
                                reads.fetch_add(1, Ordering::Relaxed);
                                frames.fetch_add(c.counter.frames - frames_before, Ordering::Relaxed);
                            }
                        }
                        _ => return (c, mine),
                    },
                    _ = stop.cancelled() => return (c, mine),
                }
            }
        }));
    }
    tokio::time::sleep(warmup).await;
    let before = Counters::read(&proxy, &fake);
    counting.store(true, Ordering::SeqCst);
    let start = Instant::now();
    tokio::time::sleep(WINDOW).await;
    counting.store(false, Ordering::SeqCst);
    let secs = start.elapsed().as_secs_f64();
    let after = Counters::read(&proxy, &fake);
    let bytes = total.load(Ordering::SeqCst);
    stop.cancel();
    let mut per_session = Vec::new();
    for t in tasks {
        if let Ok((c, mine)) = t.await {
            state.clients.push(c);
            per_session.push(mine as f64);
        }
    }
    // Jain's fairness index over the sessions: 1 when all got the same, 1/n when one got all.
    let sum: f64 = per_session.iter().sum();
    let squares: f64 = per_session.iter().map(|x| x * x).sum();
    let fairness = if squares > 0.0 {
        sum * sum / (per_session.len() as f64 * squares)
    } else {
        f64::NAN
    };
    let framing_errors: u64 = state.clients.iter().map(|c| c.counter.bad).sum();
    json!({"bytes": bytes, "framing_errors": framing_errors, "secs": secs, "mb_s": bytes as f64 / secs / 1e6,
        "reads": reads.load(Ordering::SeqCst), "frames": frames.load(Ordering::SeqCst), "fairness": fairness,
        "proxy_cpu_s": after.proxy_cpu - before.proxy_cpu, "fake_cpu_s": after.fake_cpu - before.fake_cpu,
        "load_cpu_s": after.load_cpu - before.load_cpu,
        "voluntary_switches": after.switches.0 - before.switches.0,
        "involuntary_switches": after.switches.1 - before.switches.1,
        "faults": after.faults - before.faults})
}

async fn load_rtt(state: &mut LoadState) -> Value {
    let n = state.clients.len().max(1);
    let period = Duration::from_millis(50); // 20 messages/s per session
    let mut tasks = Vec::new();
    for (i, mut c) in std::mem::take(&mut state.clients).into_iter().enumerate() {
        // Stagger the clients across the period.
        let offset = period.mul_f64(i as f64 / n as f64);
        tasks.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut got = Vec::new();
            let mut buf = BytesMut::with_capacity(4096);
            tokio::time::sleep(offset).await;
            let start = Instant::now();
            let mut seq: u64 = 0;
            let mut next = tokio::time::Instant::now();
            while start.elapsed() < RTT_WINDOW {
                tokio::time::sleep_until(next).await;
                next += period;
                seq += 1;
                let msg = seq.to_be_bytes();
                let frame = if c.ws {
                    masked_frame(&msg, [1, 2, 3, 4])
                } else {
                    msg.to_vec()
                };
                let sent = Instant::now();
                if c.stream.write_all(&frame).await.is_err() {
                    break;
                }
                got.clear();
                loop {
                    if got.len() >= 8 {
                        break;
                    }
                    buf.clear();
                    match tokio::time::timeout(Duration::from_secs(5), c.stream.read_buf(&mut buf))
                        .await
                    {
                        Ok(Ok(n)) if n > 0 => {
                            if c.ws {
                                c.counter.feed(&buf, &mut got);
                            } else {
                                got.extend_from_slice(&buf);
                            }
                        }
                        _ => return (c, samples, true),
                    }
                }
                samples.push(sent.elapsed().as_secs_f64() * 1e3);
            }
            (c, samples, false)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((c, s, err)) = t.await {
            all.extend(s);
            errors += usize::from(err);
            state.clients.push(c);
        }
    }
    all.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| {
        all.get(((all.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    json!({"samples": all.len(), "errors": errors, "p50_ms": pct(0.5), "p90_ms": pct(0.9), "p99_ms": pct(0.99), "p999_ms": pct(0.999), "max_ms": all.last().copied().unwrap_or(f64::NAN)})
}

// ---------------------------------------------------------------------------------------------
// Orchestrator

/// A helper process of this binary, talking JSON lines.
struct Role {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Role {
    fn spawn(role: &str, args: &[String]) -> Role {
        Self::spawn_with(role, args, &[])
    }

    fn spawn_with(role: &str, args: &[String], env: &[(&str, String)]) -> Role {
        let mut child = Command::new(std::env::current_exe().expect("exe"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("VNCGATE_BENCH_ROLE", role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn role");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Role {
            child,
            stdin,
            stdout,
        }
    }

    fn line(&mut self) -> String {
        let mut l = String::new();
        self.stdout.read_line(&mut l).expect("role output");
        l.trim().to_owned()
    }

    fn call(&mut self, cmd: Value) -> Value {
        writeln!(self.stdin, "{cmd}").expect("role stdin");
        serde_json::from_str(&self.line()).expect("role reply")
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pids` and all their descendants (websockify forks a child per connection).
fn with_descendants(pids: &[u32]) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.filter_map(|e| e.ok()) {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // Field 4, after the parenthesised command name.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut all: Vec<u32> = pids.to_vec();
    let mut i = 0;
    while i < all.len() {
        let p = all[i];
        all.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    all
}

/// CPU seconds used so far by `pids`, their threads and their children, from schedstat.
fn cpu_seconds(pids: &[u32]) -> f64 {
    cpu_seconds_of(&with_descendants(pids))
}

/// CPU seconds used so far by exactly `pids` (all their threads).
fn cpu_seconds_of(pids: &[u32]) -> f64 {
    let mut ns: u64 = 0;
    for &pid in pids {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.filter_map(|t| t.ok()) {
                if let Ok(s) = std::fs::read_to_string(t.path().join("schedstat")) {
                    ns += s
                        .split_whitespace()
                        .next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    ns as f64 / 1e9
}

/// CPU seconds of this process's own threads, exited ones included (not its children); 10 ms
/// resolution.
fn own_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // utime and stime are fields 14 and 15, the 12th and 13th after the command name.
    let ticks: u64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum())
        .unwrap_or(0);
    ticks as f64 / 100.0
}

/// Minor page faults so far of exactly `pids` (all their threads).
fn minor_faults_of(pids: &[u32]) -> u64 {
    pids.iter()
        .map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // minflt is field 10, the 8th after the command name.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(7))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Context switches (voluntary, involuntary) so far of exactly `pids` (all their threads).
fn context_switches_of(pids: &[u32]) -> (u64, u64) {
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut switches = (0, 0);
    for &pid in pids {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.filter_map(|t| t.ok()) {
                let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                switches.0 += field(&status, "voluntary_ctxt_switches:");
                switches.1 += field(&status, "nonvoluntary_ctxt_switches:");
            }
        }
    }
    switches
}

/// Counts the system calls of `pids` (and their threads) with `perf stat` while it runs; `None`
/// where perf or its tracepoints are not available. /proc/PID/io's `syscr`/`syscw` would miss
/// `recv` and `send`, which is what tokio's sockets use.
struct SyscallCount(Option<std::process::Child>);

impl SyscallCount {
    fn start(pids: &[u32]) -> SyscallCount {
        let list: Vec<String> = with_descendants(pids).iter().map(u32::to_string).collect();
        if list.is_empty() {
            return SyscallCount(None);
        }
        // VNCGATE_BENCH_SYSCALLS=recvfrom,sendto,... also counts those calls one by one and
        // prints them per MB (a diagnosis, not a figure).
        let mut events = "raw_syscalls:sys_enter".to_string();
        for name in breakdown_syscalls() {
            events.push_str(&format!(",syscalls:sys_enter_{name}"));
        }
        let child = Command::new("perf")
            .args(["stat", "-x,", "-e", &events, "-p", &list.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok();
        SyscallCount(child)
    }

    /// The total, and each call of [`breakdown_syscalls`] by name.
    fn stop(self) -> (Option<u64>, Vec<(String, u64)>) {
        let Some(child) = self.0 else {
            return (None, Vec::new());
        };
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let Ok(out) = child.wait_with_output() else {
            return (None, Vec::new());
        };
        let text = String::from_utf8_lossy(&out.stderr);
        let count = |l: &str| {
            l.split(',')
                .next()
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let total = text
            .lines()
            .find(|l| l.contains("raw_syscalls:sys_enter"))
            .and_then(count);
        let each = text
            .lines()
            .filter_map(|l| {
                let name = l.split("syscalls:sys_enter_").nth(1)?;
                let name = name.split(',').next()?.to_string();
                Some((name, count(l)?))
            })
            .collect();
        (total, each)
    }
}

/// VNCGATE_BENCH_PROFILE=DIR: `perf record -g` of the proxy over its streaming phase, one
/// file per proxy and round in DIR (a diagnosis, not a figure).
fn profile_start(pids: &[u32], name: &str, n: usize) -> Option<std::process::Child> {
    let dir = std::env::var("VNCGATE_BENCH_PROFILE").ok()?;
    let list: Vec<String> = with_descendants(pids).iter().map(u32::to_string).collect();
    if list.is_empty() {
        return None;
    }
    static ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = format!("{dir}/{name}-{n}-{k}.data");
    Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            "999",
            "-g",
            "-o",
            &out,
            "-p",
            &list.join(","),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

fn profile_stop(child: Option<std::process::Child>) {
    if let Some(child) = child {
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let _ = child.wait_with_output();
    }
}

fn breakdown_syscalls() -> Vec<String> {
    std::env::var("VNCGATE_BENCH_SYSCALLS")
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .map(String::from)
        .collect()
}

fn rss_kib(pids: &[u32]) -> u64 {
    with_descendants(pids)
        .iter()
        .map(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Marks `pid` (and the children it forks later) as the first the OOM killer takes: websockify
/// forks a ~150 MB process per connection, and at N = 800 the machine runs out of memory; the
/// OOM killer then took the largest process, a vncgate daemon, and the run with it.
fn oom_first(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000");
}

fn wait_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Blocking HTTP/1.1 call to the daemon's API; returns status and JSON.
fn api(method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    api_on(API_PORT, method, path, body)
}

/// [`api`] to the daemon whose API is on `port` (the TLS daemon, the baseline build).
fn api_on(port: u16, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("api");
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    // One write, as HTTP clients send a small request: `write!` on the bare stream would send
    // each formatted piece as its own segment (TCP_NODELAY), waking the daemon several times.
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).expect("read");
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Makes `call(i)` for `i` in `0..n` from `parallel` threads at once; returns (total s, each
/// call's ms, sorted).
fn timed_calls(n: usize, parallel: usize, call: impl Fn(usize) + Sync) -> (f64, Vec<f64>) {
    let started = Instant::now();
    let next = AtomicU64::new(0);
    let lat = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n {
                        return;
                    }
                    let t = Instant::now();
                    call(i);
                    lat.lock()
                        .map(|mut l| l.push(t.elapsed().as_secs_f64() * 1e3))
                        .ok();
                }
            });
        }
    });
    let mut l = lat.into_inner().unwrap_or_default();
    l.sort_by(|a, b| a.total_cmp(b));
    (started.elapsed().as_secs_f64(), l)
}

/// Opens sessions `vm-0..n` to `target`, `parallel` at once; returns (total s, sorted ms).
fn open_sessions(n: usize, target: &str, parallel: usize) -> (f64, Vec<f64>) {
    timed_calls(n, parallel, |i| {
        let (status, v) = api(
            "POST",
            "/v1/sessions",
            Some(&json!({"vm_id": format!("vm-{i}"), "target": target})),
        );
        assert!(status == 201 || status == 200, "open vm-{i}: {status} {v}");
    })
}

/// The measured opens, 16 at once. With the daemon's log on (`VNCGATE_BENCH_DAEMON_LOG`), marks
/// the phase in the shared stderr, for `scripts/commit-bound.py`.
fn opens_16(n: usize, target: &str) -> (f64, Vec<f64>) {
    let mark = std::env::var_os("VNCGATE_BENCH_DAEMON_LOG").is_some();
    if mark {
        eprintln!("bench: opens16 begin");
    }
    let result = open_sessions(n, target, 16);
    if mark {
        eprintln!("bench: opens16 end");
    }
    result
}

/// `GET /v1/sessions/vm-i` for `i` in `0..n`, `parallel` at once, each on a new connection: the
/// latency of an API call that writes nothing, the floor under an open's.
fn get_sessions(n: usize, parallel: usize) -> Vec<f64> {
    timed_calls(n, parallel, |i| {
        let (status, v) = api("GET", &format!("/v1/sessions/vm-{i}"), None);
        assert!(status == 200, "get vm-{i}: {status} {v}");
    })
    .1
}

/// Retargets sessions `vm-0..n` (parallel 16).
fn retarget_all(n: usize, target: &str) {
    open_sessions(n, target, 16);
}

/// Opens (or retargets) sessions `vm-0..n` on the daemon whose API is on `port`, 16 at once.
fn open_on(port: u16, n: usize, target: &str) {
    timed_calls(n, 16, |i| {
        let (status, v) = api_on(
            port,
            "POST",
            "/v1/sessions",
            Some(&json!({"vm_id": format!("vm-{i}"), "target": target})),
        );
        assert!(status == 201 || status == 200, "open vm-{i}: {status} {v}");
    });
}

/// The `ws_url` of every session of the daemon whose API is on `port`.
fn ws_urls_on(port: u16) -> Vec<String> {
    let (_, list) = api_on(port, "GET", "/v1/sessions", None);
    list["sessions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["ws_url"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn close_all(n: usize) {
    close_on(API_PORT, n);
}

fn close_on(port: u16, n: usize) {
    timed_calls(n, 16, |i| {
        api_on(port, "DELETE", &format!("/v1/sessions/vm-{i}"), None);
    });
}

/// Starts `vncgate serve` from `exe` with its API on `api_port`, its pool at `pool_first` (900
/// ports), at most `max_sessions` sessions, its state in `state_dir`, and `extra` flags; waits
/// for its API.
fn spawn_daemon(
    exe: &str,
    (api_port, pool_first, max_sessions): (u16, u16, usize),
    state_dir: &std::path::Path,
    extra: &[String],
) -> Child {
    let _ = std::fs::create_dir_all(state_dir);
    let child = Command::new(exe)
        .args(["serve", "--api-listen", &format!("127.0.0.1:{api_port}")])
        .args(["--listen-host", "127.0.0.1", "--max-sessions"])
        .arg(max_sessions.to_string())
        .args([
            "--port-range",
            &format!("{pool_first}-{}", pool_first + 899),
        ])
        .arg("--state-file")
        .arg(state_dir.join("state.json"))
        .args(extra)
        .env(
            "RUST_LOG",
            std::env::var("VNCGATE_BENCH_DAEMON_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .spawn()
        .expect("start vncgate");
    assert!(
        wait_port(api_port, Duration::from_secs(10)),
        "vncgate ({exe}) did not start on {api_port}"
    );
    child
}

/// A CA and a certificate for 127.0.0.1 made for this run, as PEM files in `dir`: (cert, key,
/// CA).
fn bench_certificates(dir: &std::path::Path) -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let mut leaf = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("leaf");
    leaf.subject_alt_names.push(rcgen::SanType::IpAddress(
        std::net::Ipv4Addr::LOCALHOST.into(),
    ));
    let cert = leaf.signed_by(&key, &issuer).expect("leaf cert");
    let _ = std::fs::create_dir_all(dir);
    let paths = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&paths.0, format!("{}{}", cert.pem(), ca_cert.pem())).expect("cert");
    std::fs::write(&paths.1, key.serialize_pem()).expect("key");
    std::fs::write(&paths.2, ca_cert.pem()).expect("ca");
    let show = |p: std::path::PathBuf| p.display().to_string();
    (show(paths.0), show(paths.1), show(paths.2))
}

/// The same atomic write the daemon does (temp, fsync, rename, fsync dir), of `bytes` bytes, in
/// `dir`: the state-commit latency of this disk, in ms (median of 20).
fn commit_latency_ms(dir: &std::path::Path, bytes: usize) -> f64 {
    let data = vec![b'x'; bytes.max(64)];
    let mut l = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let tmp = dir.join(".probe.tmp");
        let mut f = std::fs::File::create(&tmp).expect("probe");
        f.write_all(&data).expect("write");
        f.sync_all().expect("fsync");
        std::fs::rename(&tmp, dir.join("probe.json")).expect("rename");
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("fsync dir");
        l.push(t.elapsed().as_secs_f64() * 1e3);
    }
    l.sort_by(|a, b| a.total_cmp(b));
    let _ = std::fs::remove_file(dir.join("probe.json"));
    percentile(&l, 0.5)
}

fn python_with_websockify() -> Option<String> {
    for py in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(py)
            .args(["-c", "import websockify"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            return Some(py.to_owned());
        }
    }
    None
}

/// One proxy's figures in one round.
#[derive(Default, Clone, serde::Serialize)]
struct Sample {
    mb_s: f64,
    cpu_s_per_gb: Option<f64>,
    rtt_p50_ms: f64,
    rtt_p99_ms: f64,
    rtt_max_ms: f64,
    idle_rss_kib_per_session: Option<f64>,
    connect_failed: u64,
    rtt_errors: u64,
    /// The fake VNC server's and the load generator's CPU per GB in the same window: the rest
    /// of the machine's work, which a proxy makes cheaper or dearer for its peers.
    fake_cpu_s_per_gb: Option<f64>,
    load_cpu_s_per_gb: Option<f64>,
    /// Payload per read of the load generator, and per WebSocket frame, in KiB.
    read_kib: f64,
    frame_kib: Option<f64>,
    /// The proxy's system calls (counted by `perf stat` where it works) and context switches
    /// (voluntary + involuntary) per MB of payload: what a proxy spends per byte besides
    /// copying it, counted rather than timed, so steadier than CPU seconds.
    syscalls_per_mb: Option<f64>,
    switches_per_mb: Option<f64>,
    /// Of those, the involuntary ones (preempted, not parked).
    involuntary_switches_per_mb: Option<f64>,
    /// Minor page faults per MB: fresh memory touched (a buffer malloc took from the kernel).
    page_faults_per_mb: Option<f64>,
    /// Jain's fairness index of the sessions' throughput in the window (1 = all equal).
    fairness: f64,
    /// TCP connect + TLS handshake of the echo phase's connections, ms (TLS rows).
    handshake_p50_ms: Option<f64>,
    handshake_p99_ms: Option<f64>,
}

struct Proxy {
    name: &'static str,
    stream_urls: Vec<String>,
    echo_urls: Vec<String>,
    pids: Vec<u32>,
    /// vncgate's sessions are retargeted between phases: (streaming target, echo target).
    retarget: Option<(String, String)>,
    /// The API of the daemon to retarget through.
    api_port: u16,
    children: Vec<Child>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The echo phase: idle memory per connected viewer, then round trips. Each round runs every
/// proxy's echo phase before any streaming, so round trips are timed on a quiet machine (a
/// streaming phase leaves the kernel's TCP memory under pressure for a while, which moved the
/// next proxy's tail) and idle memory before a throughput phase has grown any heap.
fn measure_echo(load: &mut Role, p: &Proxy, n: usize) -> Sample {
    let mut s = Sample::default();
    if let Some((_, echo)) = &p.retarget {
        open_on(p.api_port, n, echo);
    }
    let base = rss_kib(&p.pids);
    let c = load.call(json!({"cmd": "connect", "urls": p.echo_urls}));
    s.connect_failed += c["failed"].as_u64().unwrap_or(0);
    report_failures(p.name, "echo connects", &c);
    s.handshake_p50_ms = c["handshake_p50_ms"].as_f64();
    s.handshake_p99_ms = c["handshake_p99_ms"].as_f64();
    let connected = c["connected"].as_u64().unwrap_or(0);
    if !p.pids.is_empty() && connected > 0 {
        let rss = rss_kib(&p.pids);
        s.idle_rss_kib_per_session = Some(rss.saturating_sub(base) as f64 / connected as f64);
    }
    let r = load.call(json!({"cmd": "rtt"}));
    load.call(json!({"cmd": "disconnect"}));
    s.rtt_p50_ms = r["p50_ms"].as_f64().unwrap_or(f64::NAN);
    s.rtt_p99_ms = r["p99_ms"].as_f64().unwrap_or(f64::NAN);
    s.rtt_max_ms = r["max_ms"].as_f64().unwrap_or(f64::NAN);
    s.rtt_errors = r["errors"].as_u64().unwrap_or(0);
    s
}

/// Says on stderr how many of a phase's connects failed and the first error, so a failure
/// counted in a row can be told from another.
fn report_failures(name: &str, phase: &str, answer: &Value) {
    let failed = answer["failed"].as_u64().unwrap_or(0);
    if failed > 0 {
        eprintln!(
            "    {name}: {failed} {phase} failed, the first: {}",
            answer["error"]
        );
    }
}

/// The streaming phase: throughput, CPU per GB, fairness; added to the echo phase's `s`.
fn measure_stream(load: &mut Role, fake_pid: u32, p: &Proxy, n: usize, mut s: Sample) -> Sample {
    if let Some((stream, _)) = &p.retarget {
        open_on(p.api_port, n, stream);
    }
    let c = load.call(json!({"cmd": "connect", "urls": p.stream_urls}));
    s.connect_failed += c["failed"].as_u64().unwrap_or(0);
    report_failures(p.name, "stream connects", &c);
    let calls = SyscallCount::start(&p.pids);
    let profile = profile_start(&p.pids, p.name, n);
    let t = load.call(
        json!({"cmd": "throughput", "pids": p.pids, "fake_pids": [fake_pid],
        "warmup_ms": warmup(n).as_millis() as u64}),
    );
    let (calls, each_call) = calls.stop();
    profile_stop(profile);
    let num = |k: &str| t[k].as_f64().unwrap_or(0.0);
    load.call(json!({"cmd": "disconnect"}));
    s.mb_s = t["mb_s"].as_f64().unwrap_or(0.0);
    s.fairness = t["fairness"].as_f64().unwrap_or(f64::NAN);
    // A load generator that lost the frame boundaries miscounts: a failure, not a figure.
    s.connect_failed += t["framing_errors"].as_u64().unwrap_or(0);
    if t["framing_errors"].as_u64().unwrap_or(0) > 0 {
        eprintln!("    {}: {} framing errors", p.name, t["framing_errors"]);
    }
    let payload_kib = t["bytes"].as_f64().unwrap_or(0.0) / 1024.0;
    s.read_kib = payload_kib / t["reads"].as_f64().unwrap_or(0.0).max(1.0);
    let frames = t["frames"].as_f64().unwrap_or(0.0);
    s.frame_kib = (frames > 0.0).then(|| payload_kib / frames);
    let gb = t["bytes"].as_f64().unwrap_or(0.0) / 1e9;
    // perf counted over warm-up and window, bytes over the window: scaled to the window. The
    // rest was read at the window's edges.
    let window_share = WINDOW.as_secs_f64() / (WINDOW + warmup(n)).as_secs_f64();
    if !p.pids.is_empty() && gb > 0.0 {
        s.cpu_s_per_gb = Some(num("proxy_cpu_s") / gb);
        let mb = gb * 1000.0;
        s.syscalls_per_mb = calls.map(|c| c as f64 * window_share / mb);
        if !each_call.is_empty() {
            let list: Vec<String> = each_call
                .iter()
                .map(|(name, c)| format!("{name} {:.1}", *c as f64 * window_share / mb))
                .collect();
            eprintln!("    {}: system calls per MB: {}", p.name, list.join(", "));
        }
        let (voluntary, involuntary) = (num("voluntary_switches"), num("involuntary_switches"));
        s.switches_per_mb = Some((voluntary + involuntary) / mb);
        s.involuntary_switches_per_mb = Some(involuntary / mb);
        s.page_faults_per_mb = Some(num("faults") / mb);
    }
    if gb > 0.0 {
        s.fake_cpu_s_per_gb = Some(num("fake_cpu_s") / gb);
        s.load_cpu_s_per_gb = Some(num("load_cpu_s") / gb);
    }
    s
}

/// websockify routing by token on `port` (`s{i}` streams, `e{i}` echoes), one process `child`.
fn token_routed_websockify(
    name: &'static str,
    scheme: &str,
    port: u16,
    n: usize,
    child: Child,
) -> Proxy {
    let urls = |kind: char| -> Vec<String> {
        (0..n)
            .map(|i| format!("{scheme}://127.0.0.1:{port}/?token={kind}{i}"))
            .collect()
    };
    Proxy {
        name,
        stream_urls: urls('s'),
        echo_urls: urls('e'),
        pids: vec![child.id()],
        retarget: None,
        api_port: API_PORT,
        children: vec![child],
    }
}

fn median_spread(v: &[f64]) -> (f64, f64, f64) {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return (f64::NAN, f64::NAN, f64::NAN);
    }
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

fn orchestrate() {
    let wall = Instant::now();
    let exe = std::env::var("VNCGATE_BENCH_EXE").unwrap_or(env!("CARGO_BIN_EXE_vncgate").into());
    let exe = exe.as_str();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out_dir = root.join("target/bench");
    let state_dir = out_dir.join("state");
    let _ = std::fs::remove_dir_all(&state_dir);
    std::fs::create_dir_all(&state_dir).expect("bench dir");
    let sizes: Vec<usize> = std::env::var("VNCGATE_BENCH_N")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 100, 800, 5000]);
    let opens_only = std::env::var_os("VNCGATE_BENCH_OPENS_ONLY").is_some();
    let rounds: usize = std::env::var("VNCGATE_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);

    let mut fake = Role::spawn("fake", &[]);
    let fake_pid = fake.child.id();
    let ports: Vec<u16> = fake
        .line()
        .split(' ')
        .filter_map(|p| p.parse().ok())
        .collect();
    let (stream_port, echo_port) = (ports[0], ports[1]);
    let mut relay = Role::spawn(
        "relay",
        &[
            format!("127.0.0.1:{stream_port}"),
            format!("127.0.0.1:{echo_port}"),
        ],
    );
    let rports: Vec<u16> = relay
        .line()
        .split(' ')
        .filter_map(|p| p.parse().ok())
        .collect();
    let relay_pid = relay.child.id();
    let no_tls = std::env::var_os("VNCGATE_BENCH_NO_TLS").is_some();
    let (cert, key, ca) = bench_certificates(&out_dir.join("tls"));
    let mut load = Role::spawn_with("load", &[], &[("VNCGATE_BENCH_CA", ca.clone())]);
    // The TLS relay: the same relay, terminating TLS from the clients.
    let mut tls_relay = Role::spawn_with(
        "relay",
        &[
            format!("127.0.0.1:{stream_port}"),
            format!("127.0.0.1:{echo_port}"),
        ],
        &[
            ("VNCGATE_BENCH_TLS_CERT", cert.clone()),
            ("VNCGATE_BENCH_TLS_KEY", key.clone()),
        ],
    );
    let tls_rports: Vec<u16> = tls_relay
        .line()
        .split(' ')
        .filter_map(|p| p.parse().ok())
        .collect();
    let tls_relay_pid = tls_relay.child.id();

    let mut daemon = spawn_daemon(exe, (API_PORT, POOL_FIRST, POOL_SESSIONS), &state_dir, &[]);
    let mut public_daemon = std::env::var_os("VNCGATE_BENCH_NO_PUBLIC")
        .is_none()
        .then(|| {
            let extra = [
                "--public-listen".to_string(),
                format!("127.0.0.1:{PUBLIC_PORT}"),
                "--session-ports".into(),
                "off".into(),
            ];
            spawn_daemon(
                exe,
                (PUBLIC_API_PORT, PUBLIC_POOL_FIRST, 10_000),
                &state_dir.join("public"),
                &extra,
            )
        });
    // vncgate with TLS on its session ports, and (for an A/B) another build, each its own
    // daemon with its own pool; idle while the others are measured.
    let mut tls_daemon = (!no_tls).then(|| {
        let extra = [
            "--cert".to_string(),
            cert.clone(),
            "--key".into(),
            key.clone(),
        ];
        spawn_daemon(
            exe,
            (TLS_API_PORT, TLS_POOL_FIRST, POOL_SESSIONS),
            &state_dir.join("tls"),
            &extra,
        )
    });
    let baseline_exe = std::env::var("VNCGATE_BENCH_BASELINE_EXE").ok();
    // With VNCGATE_BENCH_BASELINE_PUBLIC the other build serves through its public port with
    // --session-ports off, so the A/B reaches past the pool (N = 5000).
    // With VNCGATE_BENCH_BASELINE_TLS it serves TLS on its session ports: an A/B of the TLS row
    // (it needs the TLS rows, and takes the place of VNCGATE_BENCH_BASELINE_PUBLIC).
    let baseline_tls = std::env::var_os("VNCGATE_BENCH_BASELINE_TLS").is_some();
    if baseline_tls && no_tls {
        eprintln!("VNCGATE_BENCH_BASELINE_TLS is ignored with VNCGATE_BENCH_NO_TLS");
    }
    let baseline_tls = baseline_tls && !no_tls;
    let baseline_public =
        !baseline_tls && std::env::var_os("VNCGATE_BENCH_BASELINE_PUBLIC").is_some();
    let baseline_name = if baseline_tls {
        "vncgate-baseline-tls"
    } else {
        "vncgate-baseline"
    };
    let mut baseline_daemon = baseline_exe.as_deref().map(|b| {
        let (max, extra) = if baseline_tls {
            let extra = [
                "--cert".to_string(),
                cert.clone(),
                "--key".into(),
                key.clone(),
            ];
            (POOL_SESSIONS, extra.to_vec())
        } else if baseline_public {
            let extra = [
                "--public-listen".to_string(),
                format!("127.0.0.1:{BASELINE_PUBLIC_PORT}"),
                "--session-ports".into(),
                "off".into(),
            ];
            (10_000, extra.to_vec())
        } else {
            (POOL_SESSIONS, Vec::new())
        };
        spawn_daemon(
            b,
            (BASELINE_API_PORT, BASELINE_POOL_FIRST, max),
            &state_dir.join("baseline"),
            &extra,
        )
    });
    let daemon_pid = daemon.id();
    std::thread::sleep(Duration::from_millis(200));
    let rss0 = rss_kib(&[daemon_pid]);
    let python = if std::env::var_os("VNCGATE_BENCH_NO_WEBSOCKIFY").is_some() {
        None
    } else {
        python_with_websockify()
    };
    eprintln!(
        "vncgate RSS with 0 sessions: {rss0} KiB; websockify: {}",
        python
            .as_deref()
            .unwrap_or("not importable (pip install websockify)")
    );

    let mut results: BTreeMap<String, Value> = BTreeMap::new();
    for &n in &sizes {
        eprintln!("== N = {n}");
        let mut row = serde_json::Map::new();
        // Past the pool's cap, only the public port serves (and the direct and relay rows).
        let pooled = n <= POOL_SESSIONS;
        if pooled {
            // Opening: sequential, then 16 at once (the sessions of the second run stay).
            let (seq_s, seq_lat) = open_sessions(n, &format!("127.0.0.1:{stream_port}"), 1);
            close_all(n);
            let before = api("GET", "/v1/status", None).1;
            let (par_s, par_lat) = opens_16(n, &format!("127.0.0.1:{stream_port}"));
            let after = api("GET", "/v1/status", None).1;
            let get_lat = get_sessions(n, 16);
            // The daemon's own commits during those opens: their mean is the commit latency.
            let total_ms = |v: &Value| {
                v["state"]["mean_write_ms"].as_f64().unwrap_or(0.0)
                    * v["state"]["writes"].as_f64().unwrap_or(0.0)
            };
            let writes = after["state"]["writes"].as_f64().unwrap_or(0.0)
                - before["state"]["writes"].as_f64().unwrap_or(0.0);
            let commit_ms = if writes > 0.0 {
                (total_ms(&after) - total_ms(&before)) / writes
            } else {
                f64::NAN
            };
            let state_bytes = std::fs::metadata(state_dir.join("state.json"))
                .map(|m| m.len() as usize)
                .unwrap_or(0)
                .max(64);
            // The same atomic write made by the bench itself, for comparison.
            let disk_commit_ms = commit_latency_ms(&state_dir, state_bytes);
            row.insert("open".into(), json!({
                "sequential_s": seq_s, "parallel16_s": par_s,
                "p50_ms": percentile(&par_lat, 0.5), "p99_ms": percentile(&par_lat, 0.99),
                "sequential_p50_ms": percentile(&seq_lat, 0.5), "sequential_p99_ms": percentile(&seq_lat, 0.99),
                "commit_ms": commit_ms, "state_writes": writes, "disk_commit_probe_ms": disk_commit_ms,
                "get16_p50_ms": percentile(&get_lat, 0.5), "get16_p99_ms": percentile(&get_lat, 0.99),
            }));
            if opens_only {
                // Development aid: just the open figures, a few rounds, nothing written.
                eprintln!("  opens: {}", row["open"]);
                close_all(n);
                for round in 1..3 {
                    let before = api("GET", "/v1/status", None).1;
                    let (cpu0, mine0) = (cpu_seconds(&[daemon_pid]), own_cpu_seconds());
                    let (par_s, par_lat) = opens_16(n, &format!("127.0.0.1:{stream_port}"));
                    let cpu = cpu_seconds(&[daemon_pid]) - cpu0;
                    let mine = own_cpu_seconds() - mine0;
                    let after = api("GET", "/v1/status", None).1;
                    let writes = after["state"]["writes"].as_f64().unwrap_or(0.0)
                        - before["state"]["writes"].as_f64().unwrap_or(0.0);
                    let commit_ms = (total_ms(&after) - total_ms(&before)) / writes;
                    eprintln!(
                        "  round {round}: {par_s:.3} s, p50 {:.2} p99 {:.2} ms, commit {commit_ms:.2} ms, {writes} writes, CPU per open: daemon {:.0} us, the 16 client threads {:.0} us",
                        percentile(&par_lat, 0.5),
                        percentile(&par_lat, 0.99),
                        cpu * 1e6 / n as f64,
                        mine * 1e6 / n as f64
                    );
                    close_all(n);
                }
                continue;
            }
            if std::env::var_os("VNCGATE_BENCH_RTT_ONLY").is_some() {
                // Development aid: round trips only (echo target, no streaming phase), relay and
                // vncgate alternating, each round on fresh connections.
                retarget_all(n, &format!("127.0.0.1:{echo_port}"));
                let (_, list) = api("GET", "/v1/sessions", None);
                let urls: Vec<String> = list["sessions"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s["ws_url"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let relay_urls = vec![format!("tcp://127.0.0.1:{}", rports[1]); n];
                // With TLS, the TLS relay and the TLS daemon too (their own pair, alternating).
                let tls_pair = tls_daemon.as_ref().map(|d| {
                    open_on(TLS_API_PORT, n, &format!("127.0.0.1:{echo_port}"));
                    let tls_relay_urls = vec![format!("tls://127.0.0.1:{}", tls_rports[1]); n];
                    (tls_relay_urls, ws_urls_on(TLS_API_PORT), d.id())
                });
                for round in 0..rounds {
                    let mut order = vec![
                        ("tcp-relay", &relay_urls, relay_pid),
                        ("vncgate", &urls, daemon_pid),
                    ];
                    if let Some((relay, daemon, pid)) = &tls_pair {
                        order.push(("tls-relay", relay, tls_relay_pid));
                        order.push(("vncgate-tls", daemon, *pid));
                    }
                    if round % 2 == 1 {
                        order.reverse();
                    }
                    for (name, urls, pid) in order {
                        let c = load.call(json!({"cmd": "connect", "urls": urls}));
                        let cpu0 = cpu_seconds(&[pid]);
                        let r = load.call(json!({"cmd": "rtt"}));
                        let cpu = cpu_seconds(&[pid]) - cpu0;
                        load.call(json!({"cmd": "disconnect"}));
                        eprintln!(
                            "  round {round} {name:<12} connected {} rtt p50 {:.3} p90 {:.3} p99 {:.3} p999 {:.3} max {:.3} ms, {} samples, {} errors, proxy cpu {:.3} s",
                            c["connected"],
                            r["p50_ms"].as_f64().unwrap_or(f64::NAN),
                            r["p90_ms"].as_f64().unwrap_or(f64::NAN),
                            r["p99_ms"].as_f64().unwrap_or(f64::NAN),
                            r["p999_ms"].as_f64().unwrap_or(f64::NAN),
                            r["max_ms"].as_f64().unwrap_or(f64::NAN),
                            r["samples"],
                            r["errors"],
                            cpu
                        );
                    }
                }
                close_all(n);
                if tls_pair.is_some() {
                    close_on(TLS_API_PORT, n);
                }
                continue;
            }
        }
        let ws_urls: Vec<String> = if pooled {
            ws_urls_on(API_PORT)
        } else {
            Vec::new()
        };

        let mut proxies = vec![
            Proxy {
                name: "direct",
                stream_urls: vec![format!("tcp://127.0.0.1:{stream_port}"); n],
                echo_urls: vec![format!("tcp://127.0.0.1:{echo_port}"); n],
                pids: vec![],
                retarget: None,
                api_port: API_PORT,
                children: vec![],
            },
            Proxy {
                name: "tcp-relay",
                stream_urls: vec![format!("tcp://127.0.0.1:{}", rports[0]); n],
                echo_urls: vec![format!("tcp://127.0.0.1:{}", rports[1]); n],
                pids: vec![relay_pid],
                retarget: None,
                api_port: API_PORT,
                children: vec![],
            },
        ];
        if pooled {
            proxies.push(Proxy {
                name: "vncgate",
                stream_urls: ws_urls.clone(),
                echo_urls: ws_urls.clone(),
                pids: vec![daemon_pid],
                retarget: Some((
                    format!("127.0.0.1:{stream_port}"),
                    format!("127.0.0.1:{echo_port}"),
                )),
                api_port: API_PORT,
                children: vec![],
            });
        }
        let targets = (
            format!("127.0.0.1:{stream_port}"),
            format!("127.0.0.1:{echo_port}"),
        );
        if let Some(public) = &public_daemon {
            // The opens of --session-ports off, 16 at once: no bind, one state commit each
            // (group-committed).
            let (open_s, open_lat) = timed_calls(n, 16, |i| {
                let (status, v) = api_on(
                    PUBLIC_API_PORT,
                    "POST",
                    "/v1/sessions",
                    Some(&json!({"vm_id": format!("vm-{i}"), "target": targets.0})),
                );
                assert!(status == 201 || status == 200, "open vm-{i}: {status} {v}");
            });
            eprintln!(
                "  public port: {n} opens, 16 at once, in {open_s:.3} s (p50 {:.2} ms, p99 {:.2} ms)",
                percentile(&open_lat, 0.5),
                percentile(&open_lat, 0.99)
            );
            row.insert(
                "open_public".into(),
                json!({"parallel16_s": open_s, "p50_ms": percentile(&open_lat, 0.5), "p99_ms": percentile(&open_lat, 0.99)}),
            );
            let urls = ws_urls_on(PUBLIC_API_PORT);
            assert_eq!(urls.len(), n, "every public session listed");
            proxies.push(Proxy {
                name: "vncgate-public",
                stream_urls: urls.clone(),
                echo_urls: urls,
                pids: vec![public.id()],
                retarget: Some(targets.clone()),
                api_port: PUBLIC_API_PORT,
                children: vec![],
            });
        }
        if let Some(tls_daemon) = tls_daemon.as_ref().filter(|_| pooled) {
            open_on(TLS_API_PORT, n, &targets.0);
            let urls = ws_urls_on(TLS_API_PORT);
            proxies.push(Proxy {
                name: "tls-relay",
                stream_urls: vec![format!("tls://127.0.0.1:{}", tls_rports[0]); n],
                echo_urls: vec![format!("tls://127.0.0.1:{}", tls_rports[1]); n],
                pids: vec![tls_relay_pid],
                retarget: None,
                api_port: TLS_API_PORT,
                children: vec![],
            });
            proxies.push(Proxy {
                name: "vncgate-tls",
                stream_urls: urls.clone(),
                echo_urls: urls,
                pids: vec![tls_daemon.id()],
                retarget: Some(targets.clone()),
                api_port: TLS_API_PORT,
                children: vec![],
            });
        }
        if let Some(baseline) = baseline_daemon
            .as_ref()
            .filter(|_| pooled || baseline_public)
        {
            open_on(BASELINE_API_PORT, n, &targets.0);
            let urls = ws_urls_on(BASELINE_API_PORT);
            proxies.push(Proxy {
                name: baseline_name,
                stream_urls: urls.clone(),
                echo_urls: urls,
                pids: vec![baseline.id()],
                retarget: Some(targets.clone()),
                api_port: BASELINE_API_PORT,
                children: vec![],
            });
        }
        let mut wsf_setup = serde_json::Map::new();
        if let Some(py) = python.as_ref().filter(|_| pooled) {
            if n <= 100 {
                let started = Instant::now();
                let mut children = Vec::new();
                let mut pids = Vec::new();
                let (mut s_urls, mut e_urls) = (Vec::new(), Vec::new());
                for i in 0..n {
                    for (k, target) in [(0u16, stream_port), (1, echo_port)] {
                        let port = WSF_FIRST + (i as u16) * 2 + k;
                        let c = Command::new(py)
                            .args([
                                "-m",
                                "websockify",
                                &format!("127.0.0.1:{port}"),
                                &format!("127.0.0.1:{target}"),
                            ])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .stdin(Stdio::null())
                            .spawn()
                            .expect("websockify");
                        oom_first(c.id());
                        pids.push(c.id());
                        children.push(c);
                        let url = format!("ws://127.0.0.1:{port}/");
                        if k == 0 {
                            s_urls.push(url)
                        } else {
                            e_urls.push(url)
                        }
                        assert!(
                            wait_port(port, Duration::from_secs(20)),
                            "websockify on {port} did not start"
                        );
                    }
                }
                let per = started.elapsed().as_secs_f64() * 1e3 / (2 * n) as f64;
                wsf_setup.insert(
                    "websockify-per-process".into(),
                    json!({"setup_ms_per_session": per}),
                );
                proxies.push(Proxy {
                    name: "websockify-per-process",
                    stream_urls: s_urls,
                    echo_urls: e_urls,
                    pids,
                    retarget: None,
                    api_port: API_PORT,
                    children,
                });
            }
            let tokens = state_dir.join("tokens.cfg");
            let mut cfg = String::new();
            for i in 0..n {
                cfg.push_str(&format!(
                    "s{i}: 127.0.0.1:{stream_port}\ne{i}: 127.0.0.1:{echo_port}\n"
                ));
            }
            std::fs::write(&tokens, cfg).expect("token file");
            let port = WSF_FIRST + 1990;
            let started = Instant::now();
            let c = Command::new(py)
                .args([
                    "-m",
                    "websockify",
                    "--token-plugin",
                    "TokenFile",
                    "--token-source",
                ])
                .arg(&tokens)
                .arg(format!("127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .stdin(Stdio::null())
                .spawn()
                .expect("websockify");
            oom_first(c.id());
            assert!(
                wait_port(port, Duration::from_secs(20)),
                "websockify did not start"
            );
            wsf_setup.insert(
                "websockify-one-process".into(),
                json!({"start_ms": started.elapsed().as_secs_f64() * 1e3}),
            );
            proxies.push(token_routed_websockify(
                "websockify-one-process",
                "ws",
                port,
                n,
                c,
            ));
            if !no_tls && n <= 100 {
                // websockify's --cert mode (one process, the same certificate): its handshakes
                // beside vncgate's and the TLS relay's. Not at N=800: in this mode websockify
                // forks a ~140 MB process per connection, and 800 of them exhaust 24 GiB (the
                // OOM killer took the other TLS parties down with them in a trial run).
                let port = WSF_FIRST + 1991;
                let c = Command::new(py)
                    .args(["-m", "websockify", "--ssl-only"])
                    .arg(format!("--cert={cert}"))
                    .arg(format!("--key={key}"))
                    .args(["--token-plugin", "TokenFile", "--token-source"])
                    .arg(&tokens)
                    .arg(format!("127.0.0.1:{port}"))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("websockify --cert");
                oom_first(c.id());
                assert!(
                    wait_port(port, Duration::from_secs(20)),
                    "websockify --cert did not start"
                );
                proxies.push(token_routed_websockify("websockify-tls", "wss", port, n, c));
            }
        }
        // VNCGATE_BENCH_ONLY=tls: only the rows whose name holds that text, and the relays the
        // ratios need (a development aid).
        if let Ok(only) = std::env::var("VNCGATE_BENCH_ONLY") {
            proxies.retain(|p| p.name.contains(only.as_str()) || p.name.ends_with("-relay"));
        }
        let mut per_proxy: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
        // websockify's rounds come after the others': at N=800 its processes fork, fail and
        // exit for seconds after their phase, which showed in whatever was measured next.
        let (wsf, main): (Vec<usize>, Vec<usize>) =
            (0..proxies.len()).partition(|&i| proxies[i].name.starts_with("websockify"));
        for group in [main, wsf].into_iter().filter(|g| !g.is_empty()) {
            for round in 0..rounds {
                // Alternate the order so no proxy always runs on a warmer or cooler machine.
                let mut order = group.clone();
                order.rotate_left(round % group.len());
                if round % 2 == 1 {
                    order.reverse();
                }
                let mut echoed: Vec<Sample> = Vec::new();
                for &i in &order {
                    // Round trips on a quiet machine: the previous phase's connections and the
                    // kernel's TCP memory settle first.
                    std::thread::sleep(SETTLE);
                    echoed.push(measure_echo(&mut load, &proxies[i], n));
                }
                for (&i, echo) in order.iter().zip(echoed) {
                    let p = &proxies[i];
                    let phase = Instant::now();
                    let s = measure_stream(&mut load, fake_pid, p, n, echo);
                    eprintln!(
                        "  round {round} {:<24} {:>8.1} MB/s  fair {:.3}  cpu {:>6} s/GB (fake {:.3}, load {:.3}; {:.0} KiB/read, {} KiB/frame; {} syscalls/MB, {} switches/MB, {} involuntary, {} faults/MB)  rtt p50 {:>6.2} p99 {:>7.2} max {:>7.2} ms  idle {:>8} KiB/session  failed {}  ({:.1}s)",
                        p.name,
                        s.mb_s,
                        s.fairness,
                        s.cpu_s_per_gb.map_or("-".into(), |c| format!("{c:.3}")),
                        s.fake_cpu_s_per_gb.unwrap_or(f64::NAN),
                        s.load_cpu_s_per_gb.unwrap_or(f64::NAN),
                        s.read_kib,
                        s.frame_kib.map_or("-".into(), |k| format!("{k:.0}")),
                        s.syscalls_per_mb.map_or("-".into(), |k| format!("{k:.1}")),
                        s.switches_per_mb.map_or("-".into(), |k| format!("{k:.2}")),
                        s.involuntary_switches_per_mb
                            .map_or("-".into(), |k| format!("{k:.2}")),
                        s.page_faults_per_mb
                            .map_or("-".into(), |k| format!("{k:.1}")),
                        s.rtt_p50_ms,
                        s.rtt_p99_ms,
                        s.rtt_max_ms,
                        s.idle_rss_kib_per_session
                            .map_or("-".into(), |r| format!("{r:.1}")),
                        s.connect_failed + s.rtt_errors,
                        phase.elapsed().as_secs_f64()
                    );
                    per_proxy.entry(p.name).or_default().push(s);
                }
            }
        }
        let relay_rounds = per_proxy.get("tcp-relay").cloned().unwrap_or_default();
        let tls_relay_rounds = per_proxy.get("tls-relay").cloned().unwrap_or_default();
        let mut proxies_json = serde_json::Map::new();
        for (name, samples) in &per_proxy {
            // TLS rows are measured against the TLS relay, the rest against the TCP relay.
            let relay_rounds = if *name == "tls-relay" || name.ends_with("-tls") {
                &tls_relay_rounds
            } else {
                &relay_rounds
            };
            let pick = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> { samples.iter().map(f).collect() };
            let ratio = |f: &dyn Fn(&Sample) -> f64| -> Vec<f64> {
                samples
                    .iter()
                    .zip(relay_rounds)
                    .map(|(s, r)| f(s) / f(r))
                    .collect()
            };
            let mb = median_spread(&pick(&|s| s.mb_s));
            let mb_ratio = median_spread(&ratio(&|s| s.mb_s));
            let cpu = median_spread(&pick(&|s| s.cpu_s_per_gb.unwrap_or(f64::NAN)));
            let cpu_ratio = median_spread(&ratio(&|s| s.cpu_s_per_gb.unwrap_or(f64::NAN)));
            let p99 = median_spread(&pick(&|s| s.rtt_p99_ms));
            let p99_ratio = median_spread(&ratio(&|s| s.rtt_p99_ms));
            let p50 = median_spread(&pick(&|s| s.rtt_p50_ms));
            let fair = median_spread(&pick(&|s| s.fairness));
            let max = median_spread(&pick(&|s| s.rtt_max_ms));
            // The worst round: later rounds reuse heap the allocator kept, which hides the cost.
            let idle = median_spread(&pick(&|s| s.idle_rss_kib_per_session.unwrap_or(f64::NAN)));
            let idle = (idle.2, idle.1, idle.2);
            let failed: u64 = samples
                .iter()
                .map(|s| s.connect_failed + s.rtt_errors)
                .sum();
            proxies_json.insert((*name).into(), json!({
                "mb_s": mb.0, "mb_s_min": mb.1, "mb_s_max": mb.2, "mb_s_ratio": mb_ratio.0, "mb_s_ratio_min": mb_ratio.1, "mb_s_ratio_max": mb_ratio.2,
                "cpu_s_per_gb": cpu.0, "cpu_ratio": cpu_ratio.0, "cpu_ratio_min": cpu_ratio.1, "cpu_ratio_max": cpu_ratio.2,
                "rtt_p50_ms": p50.0, "rtt_p99_ms": p99.0, "rtt_p99_min": p99.1, "rtt_p99_max": p99.2, "rtt_max_ms": max.0,
                "rtt_p99_ratio": p99_ratio.0, "rtt_p99_ratio_min": p99_ratio.1, "rtt_p99_ratio_max": p99_ratio.2,
                "idle_kib_per_session": idle.0, "failures": failed, "fairness": fair.0,
                "handshake_p50_ms": median_spread(&pick(&|s| s.handshake_p50_ms.unwrap_or(f64::NAN))).0,
                "handshake_p99_ms": median_spread(&pick(&|s| s.handshake_p99_ms.unwrap_or(f64::NAN))).0,
                "rounds": samples,
            }));
        }
        // A/B of this build against the baseline build, round by round (plain rows).
        let ab_name = if baseline_tls {
            "vncgate-tls"
        } else if baseline_public {
            "vncgate-public"
        } else {
            "vncgate"
        };
        if let (Some(new), Some(old)) = (per_proxy.get(ab_name), per_proxy.get(baseline_name)) {
            let ratio = |f: &dyn Fn(&Sample) -> f64| {
                median_spread(
                    &new.iter()
                        .zip(old)
                        .map(|(a, b)| f(a) / f(b))
                        .collect::<Vec<_>>(),
                )
            };
            let mb = ratio(&|s| s.mb_s);
            let cpu = ratio(&|s| s.cpu_s_per_gb.unwrap_or(f64::NAN));
            let p99 = ratio(&|s| s.rtt_p99_ms);
            row.insert(
                "ab".into(),
                json!({
                    "mb_s_ratio": mb.0, "mb_s_ratio_min": mb.1, "mb_s_ratio_max": mb.2,
                    "cpu_ratio": cpu.0, "rtt_p99_ratio": p99.0,
                }),
            );
            eprintln!(
                "  A/B {ab_name} / {baseline_name}: throughput {:.3}x ({:.3}-{:.3}), CPU per GB {:.3}x, RTT p99 {:.3}x",
                mb.0, mb.1, mb.2, cpu.0, p99.0
            );
        }
        row.insert("proxies".into(), Value::Object(proxies_json));
        row.insert("setup".into(), Value::Object(wsf_setup));
        results.insert(format!("{n}"), Value::Object(row));
        if pooled {
            close_all(n);
            if tls_daemon.is_some() {
                close_on(TLS_API_PORT, n);
            }
            if baseline_daemon.is_some() && !baseline_public {
                close_on(BASELINE_API_PORT, n);
            }
        }
        if baseline_daemon.is_some() && baseline_public {
            close_on(BASELINE_API_PORT, n);
        }
        if public_daemon.is_some() {
            close_on(PUBLIC_API_PORT, n);
        }
        drop(proxies);
    }
    for d in [
        Some(&mut daemon),
        tls_daemon.as_mut(),
        baseline_daemon.as_mut(),
        public_daemon.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        let _ = d.kill();
        let _ = d.wait();
    }
    if opens_only || std::env::var_os("VNCGATE_BENCH_RTT_ONLY").is_some() {
        return;
    }
    drop(fake);
    drop(relay);
    drop(tls_relay);
    drop(load);

    let machine = json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().lines().find_map(|l| l.strip_prefix("model name")).map(|s| s.trim_start_matches([' ', '\t', ':']).to_owned()),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "mem_total": std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().unwrap_or("").to_owned(),
    });
    let doc = json!({"machine": machine, "rss_idle_daemon_kib": rss0, "rounds": rounds, "window_s": WINDOW.as_secs_f64(), "rtt_window_s": RTT_WINDOW.as_secs_f64(), "results": results, "wall_s": wall.elapsed().as_secs_f64()});
    let table = render_table(&doc);
    println!("{table}");
    std::fs::write(
        out_dir.join("sessions.json"),
        serde_json::to_string_pretty(&doc).expect("json"),
    )
    .expect("write json");
    std::fs::write(out_dir.join("sessions.md"), &table).expect("write md");
    eprintln!(
        "wrote {} and sessions.md in {:.0} s",
        out_dir.join("sessions.json").display(),
        wall.elapsed().as_secs_f64()
    );
}

fn render_table(doc: &Value) -> String {
    let mut out = String::new();
    let f = |v: &Value| {
        v.as_f64().map_or("-".to_string(), |x| {
            if x.is_finite() {
                format!("{x:.2}")
            } else {
                "-".into()
            }
        })
    };
    out.push_str(&format!(
        "vncgate RSS with 0 sessions: {} KiB\n\n",
        doc["rss_idle_daemon_kib"]
    ));
    if let Some(results) = doc["results"].as_object() {
        for (n, r) in results {
            let ab = &r["ab"];
            if !ab.is_null() {
                out.push_str(&format!(
                    "A/B at N={n}: this build / baseline build: throughput {}x ({}-{}), CPU per GB {}x, RTT p99 {}x\n",
                    f(&ab["mb_s_ratio"]), f(&ab["mb_s_ratio_min"]), f(&ab["mb_s_ratio_max"]),
                    f(&ab["cpu_ratio"]), f(&ab["rtt_p99_ratio"])
                ));
            }
        }
        out.push('\n');
    }
    out.push_str("| N | proxy | MB/s (x relay, spread) | CPU s/GB (x relay) | RTT p50 / p99 / max ms (p99 x relay) | idle KiB/session | fairness | TLS handshake p50 / p99 ms | failures |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    if let Some(results) = doc["results"].as_object() {
        let mut keys: Vec<&String> = results.keys().collect();
        keys.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
        for n in keys {
            let r = &results[n];
            for name in [
                "direct",
                "tcp-relay",
                "vncgate",
                "vncgate-public",
                "vncgate-baseline",
                "websockify-per-process",
                "websockify-one-process",
                "tls-relay",
                "vncgate-tls",
                "vncgate-baseline-tls",
                "websockify-tls",
            ] {
                let p = &r["proxies"][name];
                if p.is_null() {
                    continue;
                }
                out.push_str(&format!(
                    "| {n} | {name} | {} ({}x, {}-{}) | {} ({}x) | {} / {} / {} ({}x) | {} | {} | {} / {} | {} |\n",
                    f(&p["mb_s"]), f(&p["mb_s_ratio"]), f(&p["mb_s_ratio_min"]), f(&p["mb_s_ratio_max"]),
                    f(&p["cpu_s_per_gb"]), f(&p["cpu_ratio"]),
                    f(&p["rtt_p50_ms"]), f(&p["rtt_p99_ms"]), f(&p["rtt_max_ms"]), f(&p["rtt_p99_ratio"]),
                    f(&p["idle_kib_per_session"]), f(&p["fairness"]),
                    f(&p["handshake_p50_ms"]), f(&p["handshake_p99_ms"]), p["failures"]
                ));
            }
        }
        out.push_str("\n| N | open N sequential s | open N, 16 at once s | one open p50 / p99 ms | state commit ms (daemon's writes; same write from the bench) | state writes for N opens | GET of one session, 16 at once, p50 / p99 ms |\n|---|---|---|---|---|---|---|\n");
        let mut keys: Vec<&String> = results.keys().collect();
        keys.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
        for n in keys {
            let o = &results[n]["open"];
            if o.is_null() {
                continue;
            }
            out.push_str(&format!(
                "| {n} | {} | {} | {} / {} | {} ({}) | {} | {} / {} |\n",
                f(&o["sequential_s"]),
                f(&o["parallel16_s"]),
                f(&o["p50_ms"]),
                f(&o["p99_ms"]),
                f(&o["commit_ms"]),
                f(&o["disk_commit_probe_ms"]),
                o["state_writes"],
                f(&o["get16_p50_ms"]),
                f(&o["get16_p99_ms"])
            ));
        }
        out.push_str("\n| N | public port, --session-ports off: open N, 16 at once s | one open p50 / p99 ms |\n|---|---|---|\n");
        let mut keys: Vec<&String> = results.keys().collect();
        keys.sort_by_key(|k| k.parse::<usize>().unwrap_or(0));
        for n in keys {
            let o = &results[n]["open_public"];
            if o.is_null() {
                continue;
            }
            out.push_str(&format!(
                "| {n} | {} | {} / {} |\n",
                f(&o["parallel16_s"]),
                f(&o["p50_ms"]),
                f(&o["p99_ms"])
            ));
        }
    }
    out
}
