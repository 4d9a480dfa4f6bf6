//! Who may connect (DESIGN.md "Access control"): the Origin policy of WebSocket upgrades, the
//! client address behind trusted proxies, the failed-token limit, and the per-address and
//! daemon-wide connection caps (those two in `limits`). The control API's own checks (bearer
//! token, Origin, Host) are in [`ApiGuard`] (`api_guard`). Session ports, the API and the public
//! port all call into this one module.

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

mod api_guard;
mod limits;

pub use api_guard::{ApiGuard, ApiRefusal, TokenFileError, read_token_file};
pub use limits::{
    API_MAX_CONNECTIONS, API_MAX_PER_ADDRESS, AcceptRefusal, ConnectionLimits, ConnectionSlot,
    FAIL_WINDOW, FailLimiter, default_max_connections,
};

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

#[cfg(test)]
mod tests;
