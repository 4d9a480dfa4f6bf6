//! Who may connect (DESIGN.md "Access control"): the Origin policy of WebSocket upgrades, the
//! client address behind trusted proxies, the failed-token limit, and the per-address and
//! daemon-wide connection caps. The control API's own checks (bearer token, Origin, Host) are
//! in [`ApiGuard`]. Session ports, the API and the public port all call into this one module.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use hyper::HeaderMap;
use hyper::header::{self, HeaderName};
use ipnet::IpNet;
use subtle::ConstantTimeEq;
use tokio::time::Instant;
use tracing::warn;

use crate::session::lock;

/// Failed token checks are counted over this window; an address past the limit is refused
/// (429) for the same length of time.
pub const FAIL_WINDOW: Duration = Duration::from_secs(60);
/// Addresses with failures remembered at once before expired ones are swept out.
const FAIL_TABLE_SWEEP: usize = 4096;
/// Addresses with failures remembered at most: past it (a distributed attacker with this many
/// addresses, or IPv6 /64s) the entries that matter least make room (see
/// [`FailLimiter::make_room`]); blocked addresses are always kept.
const FAIL_TABLE_MAX: usize = 65_536;
/// Sweeps of the failure table at most this often (each walks the whole table).
const FAIL_SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// Refusals at accept are logged at most once per this period.
const ACCEPT_WARN_PERIOD: Duration = Duration::from_secs(60);

/// A browser origin (RFC 6454): scheme, host and port, normalised (lower case, default port
/// filled in) so that `http://Host` equals `http://host:80`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

/// Why an origin (or a `Host`) could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not an origin: expected scheme://host[:port], e.g. https://vnc.example.com")]
pub struct BadOrigin(pub String);

fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" | "ws" => Some(80),
        "https" | "wss" => Some(443),
        _ => None,
    }
}

/// `host[:port]` or `[v6][:port]` -> (lower-case host, port). Hosts are names or IP literals;
/// anything else (userinfo, paths, spaces) is refused.
pub fn split_authority(authority: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?),
        };
        (format!("[{}]", v6.to_ascii_lowercase()), port)
    } else {
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        let ok = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
        if !ok {
            return None;
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && !p.starts_with('+') => Some(n),
            _ => return None,
        },
    };
    Some((host, port))
}

impl Origin {
    /// The origin of a listener: `scheme` (`http`/`https`) and a `Host` header value.
    pub fn from_host(scheme: &str, host: &str) -> Option<Origin> {
        let (host, port) = split_authority(host)?;
        let port = port.or(default_port(scheme))?;
        Some(Origin {
            scheme: scheme.to_owned(),
            host,
            port,
        })
    }
}

impl FromStr for Origin {
    type Err = BadOrigin;

    fn from_str(s: &str) -> Result<Origin, BadOrigin> {
        let bad = || BadOrigin(s.to_owned());
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        let scheme = scheme.to_ascii_lowercase();
        if !matches!(scheme.as_str(), "http" | "https") {
            return Err(bad());
        }
        // An origin has no path; a lone trailing slash is forgiven in configuration.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        Origin::from_host(&scheme, rest).ok_or_else(bad)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// A comma-separated list of origins (`--allowed-origins`, `--api-allowed-origins`).
pub fn parse_origins(list: &str) -> Result<Vec<Origin>, BadOrigin> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect()
}

/// A comma-separated list of CIDRs or single addresses (`--trusted-proxies`).
pub fn parse_cidrs(list: &str) -> Result<Vec<IpNet>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("{s:?} is not a CIDR such as 10.0.0.0/8 or ::1/128"))
        })
        .collect()
}

/// The unit limits are kept per: an IPv4 address, or an IPv6 /64 (one host usually holds a
/// whole /64, so per-address limits on IPv6 would be no limit at all). IPv4-mapped IPv6
/// addresses count as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    pub fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(_) => ClientKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    ClientKey(IpAddr::V6(Ipv6Addr::new(
                        s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                    )))
                }
            },
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => v4.fmt(f),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// Who a request comes from, after believing (or not) a proxy's `X-Forwarded-*` headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address: the TCP peer, or the one a trusted proxy forwards.
    pub addr: IpAddr,
    /// `http` or `https`, as the client reached us.
    pub scheme: &'static str,
    /// The authority the client asked for (`Host`, or a trusted proxy's `X-Forwarded-Host`).
    pub host: Option<String>,
}

fn first_value<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    let v = headers.get(name)?.to_str().ok()?;
    let first = v.split(',').next()?.trim();
    (!first.is_empty()).then_some(first)
}

/// Who may connect to session ports, and how often they may get it wrong.
#[derive(Debug)]
pub struct AccessPolicy {
    /// `--allowed-origins`: origins besides the port's own.
    pub allowed_origins: Vec<Origin>,
    /// `--trusted-proxies`: peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// The failed-token limit.
    pub failures: FailLimiter,
    /// Origin refusals are logged at warn once a minute, with the count in between.
    pub origin_log: Throttle,
}

/// Lets a log line through at most once per period, counting what it held back: a client that
/// repeats a refused request must not write a line per request.
#[derive(Debug, Default)]
pub struct Throttle {
    last: Mutex<Option<Instant>>,
    held_back: AtomicU64,
}

impl Throttle {
    pub const fn new() -> Throttle {
        Throttle {
            last: Mutex::new(None),
            held_back: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be written now (`n` lines were held back since the last);
    /// `None` (and one more held back) otherwise.
    pub fn ready(&self, period: Duration) -> Option<u64> {
        let now = Instant::now();
        let mut last = lock(&self.last);
        if last.is_some_and(|t| now.duration_since(t) < period) {
            self.held_back.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        *last = Some(now);
        Some(self.held_back.swap(0, Ordering::Relaxed))
    }
}

impl AccessPolicy {
    /// Whether `peer` is in `--trusted-proxies` (an IPv4-mapped IPv6 peer as its IPv4).
    pub fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        let peer = peer_unmapped(peer);
        self.trusted_proxies.iter().any(|net| net.contains(&peer))
    }

    /// The client of a request that arrived from `peer` (over TLS when `tls`).
    /// `X-Forwarded-For` is read right to left, skipping trusted proxies: the first address
    /// no trusted proxy vouches for is the client (a client cannot forge its way past the
    /// proxy that appended its real address).
    pub fn client(&self, peer: IpAddr, tls: bool, headers: &HeaderMap) -> Client {
        let own_host = || {
            headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let scheme = if tls { "https" } else { "http" };
        if !self.is_trusted_proxy(peer) {
            return Client {
                addr: peer,
                scheme,
                host: own_host(),
            };
        }
        let mut addr = peer;
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .collect::<Vec<_>>();
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                break;
            };
            addr = ip;
            if !self.is_trusted_proxy(ip) {
                break;
            }
        }
        let forwarded_scheme =
            match first_value(headers, &HeaderName::from_static("x-forwarded-proto")) {
                Some(p) if p.eq_ignore_ascii_case("https") || p.eq_ignore_ascii_case("wss") => {
                    "https"
                }
                Some(p) if p.eq_ignore_ascii_case("http") || p.eq_ignore_ascii_case("ws") => "http",
                _ => scheme,
            };
        Client {
            addr,
            scheme: forwarded_scheme,
            host: first_value(headers, &HeaderName::from_static("x-forwarded-host"))
                .map(str::to_owned)
                .or_else(own_host),
        }
    }

    /// The Origin policy of a WebSocket upgrade: no `Origin` (a non-browser client) passes;
    /// otherwise it must be the port's own origin (`client.scheme` + `client.host`) or one of
    /// `--allowed-origins`. `Origin: null` and anything unparsable are refused.
    pub fn check_origin(&self, client: &Client, headers: &HeaderMap) -> Result<(), String> {
        let mut all = headers.get_all(header::ORIGIN).iter();
        match (all.next(), all.next()) {
            (None, _) => Ok(()),
            (Some(raw), None) => self.check_origin_value(client, raw.to_str().unwrap_or("")),
            // A browser sends one; two can only be an attempt to have a proxy and us disagree.
            (Some(_), Some(_)) => Err("more than one Origin header".into()),
        }
    }

    /// [`AccessPolicy::check_origin`] for an origin given as text (the console page passes
    /// its own to `GET /session`, where the browser sends none, to learn why it is refused).
    pub fn check_origin_value(&self, client: &Client, text: &str) -> Result<(), String> {
        let Ok(origin) = text.parse::<Origin>() else {
            return Err(format!(
                "Origin {text:?} is not allowed to open this console (a page of another site, or a sandboxed one)"
            ));
        };
        let own = client
            .host
            .as_deref()
            .and_then(|h| Origin::from_host(client.scheme, h));
        if own.as_ref() == Some(&origin) || self.allowed_origins.contains(&origin) {
            return Ok(());
        }
        Err(format!(
            "Origin {text} is not this console's own origin{} nor in --allowed-origins (behind a TLS-terminating proxy? list it in --trusted-proxies)",
            own.map(|o| format!(" ({o})")).unwrap_or_default()
        ))
    }
}

/// One `X-Forwarded-For` entry: an address, also as `ip:port` or `[v6]:port` (some proxies
/// append the port).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

fn peer_unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One client's failures in the current window.
#[derive(Debug)]
struct FailWindow {
    started: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// Counts failed token checks per client ([`ClientKey`]); past `limit` in [`FAIL_WINDOW`],
/// the client is refused for [`FAIL_WINDOW`]. Uses tokio's clock, so tests can pause it.
#[derive(Debug)]
pub struct FailLimiter {
    /// Changed by a config reload (SIGHUP).
    limit: std::sync::atomic::AtomicU32,
    /// Sharded: every token check on every port reads it.
    table: DashMap<ClientKey, FailWindow>,
    /// When the table was last swept of expired windows.
    last_sweep: Mutex<Option<Instant>>,
    /// Blocks are logged once a minute, with the count in between.
    block_log: Throttle,
    /// Requests refused with 429 since start (for status and tests).
    refused: AtomicU64,
}

impl FailLimiter {
    /// `limit` failures a minute; 0 turns the limit off.
    pub fn new(limit: u32) -> FailLimiter {
        FailLimiter {
            limit: std::sync::atomic::AtomicU32::new(limit),
            table: DashMap::new(),
            last_sweep: Mutex::new(None),
            block_log: Throttle::new(),
            refused: AtomicU64::new(0),
        }
    }

    /// A new limit (config reload); counts so far are kept.
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Seconds until `addr` may try again, if it is blocked now.
    pub fn blocked(&self, addr: IpAddr) -> Option<u64> {
        if self.limit.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = Instant::now();
        let until = self.table.get(&ClientKey::of(addr))?.blocked_until?;
        if until <= now {
            return None;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Some((until - now).as_secs().max(1))
    }

    /// Counts one failed token check of `addr`; the one that reaches the limit blocks the
    /// client and is logged (once per block, not once per refusal).
    pub fn record_failure(&self, addr: IpAddr) {
        if self.limit.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = Instant::now();
        let key = ClientKey::of(addr);
        if !self.table.contains_key(&key) && self.table.len() >= FAIL_TABLE_SWEEP {
            self.sweep(now);
            if self.table.len() >= FAIL_TABLE_MAX {
                self.make_room();
            }
        }
        let mut window = self.table.entry(key).or_insert(FailWindow {
            started: now,
            failures: 0,
            blocked_until: None,
        });
        if now.duration_since(window.started) >= FAIL_WINDOW
            && window.blocked_until.is_none_or(|u| u <= now)
        {
            *window = FailWindow {
                started: now,
                failures: 0,
                blocked_until: None,
            };
        }
        window.failures += 1;
        if window.failures >= self.limit.load(Ordering::Relaxed) && window.blocked_until.is_none() {
            window.blocked_until = Some(now + FAIL_WINDOW);
            // Once a minute for all clients together: many addresses must not mean many lines.
            if let Some(held_back) = self.block_log.ready(FAIL_WINDOW) {
                warn!(
                    client = %key,
                    failures = window.failures,
                    blocked_s = FAIL_WINDOW.as_secs(),
                    other_clients_blocked = held_back,
                    "too many wrong console tokens: client refused with 429 for a while (--auth-fail-limit; logged once a minute)"
                );
            }
        }
    }

    /// A full table (a spray from more addresses than it holds) drops the entries with the
    /// fewest failures first, never a blocked one: a spray of one failure per address cannot
    /// push out an address that is guessing in earnest, and no new address goes uncounted.
    /// One pass over the table per [`FAIL_TABLE_MAX`] new addresses at most.
    fn make_room(&self) {
        let limit = self.limit.load(Ordering::Relaxed);
        for keep_from in [2, (limit / 2).max(2), u32::MAX] {
            self.table
                .retain(|_, w| w.blocked_until.is_some() || w.failures >= keep_from);
            if self.table.len() < FAIL_TABLE_MAX * 3 / 4 {
                return;
            }
        }
    }

    /// Drops windows that are over and not blocking, at most once per [`FAIL_SWEEP_PERIOD`].
    fn sweep(&self, now: Instant) {
        {
            let mut last = lock(&self.last_sweep);
            if last.is_some_and(|t| now.duration_since(t) < FAIL_SWEEP_PERIOD) {
                return;
            }
            *last = Some(now);
        }
        self.table.retain(|_, w| {
            now.duration_since(w.started) < FAIL_WINDOW || w.blocked_until.is_some_and(|u| u > now)
        });
    }

    /// Requests refused with 429 since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The connection caps of session (and public) ports: pending connections per client address
/// (`--max-pending-per-ip`) and client connections of the whole daemon (`--max-connections`).
#[derive(Debug)]
pub struct ConnectionLimits {
    /// Both changed by a config reload (SIGHUP).
    max_total: AtomicUsize,
    max_pending_per_ip: AtomicUsize,
    total: AtomicUsize,
    pending: Mutex<HashMap<ClientKey, usize>>,
    refused_total: AtomicU64,
    refused_pending: AtomicU64,
    /// When a refusal at accept was last logged.
    last_warned: Mutex<Option<Instant>>,
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptRefusal {
    /// `--max-connections` reached.
    Daemon,
    /// `--max-pending-per-ip` reached for this client.
    Pending,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_pending_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_pending_per_ip: AtomicUsize::new(max_pending_per_ip),
            total: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            refused_total: AtomicU64::new(0),
            refused_pending: AtomicU64::new(0),
            last_warned: Mutex::new(None),
        })
    }

    /// New caps (config reload): connections already open stay, new ones meet the new caps.
    pub fn set_caps(&self, max_total: usize, max_pending_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_pending_per_ip
            .store(max_pending_per_ip, Ordering::Relaxed);
    }

    /// Takes a slot for a new connection from `peer`, pending until
    /// [`ConnectionSlot::upgraded`]. `pending_exempt` (a trusted proxy) skips the per-address
    /// cap, since the proxy carries many clients. Refusals are counted and logged at most once
    /// a minute.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        pending_exempt: bool,
    ) -> Result<ConnectionSlot, AcceptRefusal> {
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total.load(Ordering::Relaxed)).then_some(n + 1)
            });
        if taken.is_err() {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            self.warn_refusal(peer, AcceptRefusal::Daemon);
            return Err(AcceptRefusal::Daemon);
        }
        let mut slot = ConnectionSlot {
            limits: Arc::clone(self),
            pending: None,
            released: AtomicBool::new(false),
        };
        if !pending_exempt {
            let key = ClientKey::of(peer);
            let mut pending = lock(&self.pending);
            let n = pending.entry(key).or_insert(0);
            if *n >= self.max_pending_per_ip.load(Ordering::Relaxed) {
                drop(pending);
                // Dropping the slot gives the daemon-wide place back.
                drop(slot);
                self.refused_pending.fetch_add(1, Ordering::Relaxed);
                self.warn_refusal(peer, AcceptRefusal::Pending);
                return Err(AcceptRefusal::Pending);
            }
            *n += 1;
            slot.pending = Some(key);
        }
        Ok(slot)
    }

    fn warn_refusal(&self, peer: IpAddr, why: AcceptRefusal) {
        let now = Instant::now();
        let mut last = lock(&self.last_warned);
        if last.is_some_and(|t| now.duration_since(t) < ACCEPT_WARN_PERIOD) {
            return;
        }
        *last = Some(now);
        match why {
            AcceptRefusal::Daemon => warn!(
                peer = %peer,
                max_connections = self.max_total.load(Ordering::Relaxed),
                refused = self.refused_total.load(Ordering::Relaxed),
                "connections closed at accept: --max-connections reached (logged once a minute)"
            ),
            AcceptRefusal::Pending => warn!(
                client = %ClientKey::of(peer),
                max_pending_per_ip = self.max_pending_per_ip.load(Ordering::Relaxed),
                refused = self.refused_pending.load(Ordering::Relaxed),
                "connections closed at accept: a client holds --max-pending-per-ip connections that have not upgraded (logged once a minute)"
            ),
        }
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Connections closed at accept since start: (over `--max-connections`, over
    /// `--max-pending-per-ip`).
    pub fn refused(&self) -> (u64, u64) {
        (
            self.refused_total.load(Ordering::Relaxed),
            self.refused_pending.load(Ordering::Relaxed),
        )
    }

    fn release_pending(&self, key: ClientKey) {
        let mut pending = lock(&self.pending);
        if let Some(n) = pending.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&key);
            }
        }
    }
}

/// One admitted connection's place under [`ConnectionLimits`]. Shared (in an `Arc`) by the
/// connection's task and, after an upgrade, the viewer's: the daemon-wide place is given back
/// when the last holder drops it.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    pending: Option<ClientKey>,
    released: AtomicBool,
}

impl ConnectionSlot {
    /// The connection became a viewer: it no longer counts as pending for its address.
    pub fn upgraded(&self) {
        if let Some(key) = self.pending
            && !self.released.swap(true, Ordering::AcqRel)
        {
            self.limits.release_pending(key);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.upgraded();
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections to the control API, at most (what `--max-connections`' default leaves aside):
/// the API must not be a way to exhaust the daemon's descriptors, from any address.
pub const API_MAX_CONNECTIONS: usize = 256;
/// Connections to the control API per client address, at most; loopback is not held to it
/// (every local client is some 127.0.0.x, and operators on the host must get in).
pub const API_MAX_PER_ADDRESS: usize = 64;

/// `--max-connections` when unset: half of what the open-files limit leaves after the pool's
/// listeners and 256 for the API, the state file and logs (each viewer also holds a socket to
/// its VNC server). At least 64.
pub fn default_max_connections(nofile: u64, pool_size: usize) -> usize {
    let spare = nofile.saturating_sub(pool_size as u64 + 256) / 2;
    usize::try_from(spare).unwrap_or(usize::MAX).max(64)
}

/// Why the API token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read --api-token-file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--api-token-file {path}: the first line is empty; put a long random token there (e.g. `openssl rand -hex 32`)"
    )]
    Empty { path: PathBuf },
}

/// The token of an API token file: its first line, trimmed. Warns when the file is readable
/// by group or others.
pub fn read_token_file(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o044 != 0
        {
            warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "--api-token-file is readable by group or others; chmod 600 it"
            );
        }
    }
    Ok(token)
}

/// A refused API request: status, code and message of the JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRefusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// For 401: the `WWW-Authenticate` value (RFC 6750 section 3).
    pub authenticate: Option<&'static str>,
}

/// The control API's checks against browsers and strangers: `Host` (DNS rebinding), `Origin`
/// (CSRF), and the bearer token of `--api-token-file` (reloaded on SIGHUP).
#[derive(Debug)]
pub struct ApiGuard {
    token_file: Option<PathBuf>,
    token: RwLock<Option<String>>,
    /// The last failed reload, shown in status warnings until one succeeds.
    reload_error: Mutex<Option<String>>,
    /// `--api-allowed-origins`.
    pub allowed_origins: Vec<Origin>,
    /// Host names (lower case) besides IP literals: `localhost`, `--public-host`, `--api-hosts`.
    hosts: Vec<String>,
}

impl ApiGuard {
    /// Reads the token file now (a start with an unusable file fails).
    pub fn new(
        token_file: Option<PathBuf>,
        allowed_origins: Vec<Origin>,
        hosts: impl IntoIterator<Item = String>,
    ) -> Result<ApiGuard, TokenFileError> {
        let token = token_file.as_deref().map(read_token_file).transpose()?;
        let mut names: Vec<String> = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        names.push("localhost".into());
        Ok(ApiGuard {
            token_file,
            token: RwLock::new(token),
            reload_error: Mutex::new(None),
            allowed_origins,
            hosts: names,
        })
    }

    /// `SIGHUP`: reads the token file again. A file that fails keeps the old token.
    pub fn reload(&self) -> Result<bool, TokenFileError> {
        let Some(path) = &self.token_file else {
            return Ok(false);
        };
        match read_token_file(path) {
            Ok(token) => {
                *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
                *lock(&self.reload_error) = None;
                Ok(true)
            }
            Err(err) => {
                *lock(&self.reload_error) = Some(format!(
                    "API token reload failed ({err}); the previous token is still in use"
                ));
                Err(err)
            }
        }
    }

    /// A status warning while the last reload failed.
    pub fn warning(&self) -> Option<String> {
        lock(&self.reload_error).clone()
    }

    /// Whether the API needs a bearer token.
    pub fn requires_token(&self) -> bool {
        self.token_file.is_some()
    }

    /// Whether `origin` may call the API from a browser (`--api-allowed-origins`).
    pub fn origin_allowed(&self, origin: &str) -> bool {
        origin
            .parse::<Origin>()
            .is_ok_and(|o| self.allowed_origins.contains(&o))
    }

    /// Checks one request. `path` is the request path; `/healthz` needs no token. `preflight`
    /// (a CORS `OPTIONS`) needs none either: browsers never send credentials with it.
    pub fn check(
        &self,
        path: &str,
        preflight: bool,
        headers: &HeaderMap,
    ) -> Result<(), ApiRefusal> {
        if headers.get_all(header::HOST).iter().count() > 1 {
            return Err(ApiRefusal {
                status: 403,
                code: "host_refused",
                message: "more than one Host header".into(),
                authenticate: None,
            });
        }
        if let Some(host) = headers.get(header::HOST) {
            let text = host.to_str().unwrap_or("");
            let name = split_authority(text).map(|(h, _)| h);
            let ok = name.as_deref().is_some_and(|h| {
                h.starts_with('[')
                    || h.parse::<IpAddr>().is_ok()
                    || self.hosts.iter().any(|n| n == h)
            });
            if !ok {
                return Err(ApiRefusal {
                    status: 403,
                    code: "host_refused",
                    message: format!(
                        "Host {text:?} is not an address of this API: use an IP address, localhost, --public-host, or add the name to --api-hosts"
                    ),
                    authenticate: None,
                });
            }
        }
        let origins = headers.get_all(header::ORIGIN).iter().count();
        if let Some(origin) = headers.get(header::ORIGIN) {
            let text = origin.to_str().unwrap_or("");
            if origins > 1 || !self.origin_allowed(text) {
                return Err(ApiRefusal {
                    status: 403,
                    code: "origin_refused",
                    message: format!(
                        "browser Origin {text:?} may not call this API; add it to --api-allowed-origins if it should"
                    ),
                    authenticate: None,
                });
            }
        }
        if path == "/healthz" || preflight {
            return Ok(());
        }
        let expected = self.token.read().unwrap_or_else(|p| p.into_inner());
        let Some(expected) = expected.as_deref() else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match given {
            Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(ApiRefusal {
                status: 401,
                code: "unauthorized",
                message: "wrong API token: send Authorization: Bearer <the token of --api-token-file>"
                    .into(),
                authenticate: Some("Bearer error=\"invalid_token\""),
            }),
            None => Err(ApiRefusal {
                status: 401,
                code: "unauthorized",
                message: "this API needs a token: send Authorization: Bearer <token> (the CLI reads VNCGATE_API_TOKEN or --api-token-file)"
                    .into(),
                authenticate: Some("Bearer"),
            }),
        }
    }
}

#[cfg(test)]
mod tests;
