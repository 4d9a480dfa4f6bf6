//! Parsers of single flag values (addresses, ranges, counts, durations, hosts); each error
//! names the flag and what a good value looks like.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use tracing::warn;

use super::ConfigError;

pub(super) fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

pub(super) fn parse_socket_addr(key: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        invalid(
            key,
            v,
            "expected IP:PORT, e.g. 127.0.0.1:6080 or [::1]:6080",
        )
    })
}

pub(super) fn parse_ip(key: &'static str, v: &str) -> Result<IpAddr, ConfigError> {
    v.trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| invalid(key, v, "expected an IP address, e.g. :: or 127.0.0.1"))
}

/// `::` when this host can bind an IPv6 socket, else `0.0.0.0`.
pub(super) fn default_listen_host() -> IpAddr {
    let v6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    match std::net::TcpListener::bind((v6, 0)) {
        Ok(_) => v6,
        Err(err) => {
            warn!(%err, "IPv6 is unavailable; session ports listen on 0.0.0.0");
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    }
}

/// A host name or IP literal; it ends up inside URLs, so nothing else is accepted.
pub fn parse_public_host(v: &str) -> Result<String, ConfigError> {
    let bare = v.trim_start_matches('[').trim_end_matches(']');
    if let Ok(IpAddr::V6(ip)) = bare.parse::<IpAddr>() {
        return Ok(format!("[{ip}]"));
    }
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    if ok {
        Ok(v.to_owned())
    } else {
        Err(invalid(
            "--public-host",
            v,
            "expected a host name or IP address without port or scheme",
        ))
    }
}

/// `FIRST-LAST`, both in 1-65535, FIRST <= LAST.
pub fn parse_port_range(v: &str) -> Result<RangeInclusive<u16>, ConfigError> {
    let key = "--port-range";
    let (a, b) = v
        .split_once('-')
        .ok_or_else(|| invalid(key, v, "expected FIRST-LAST, e.g. 6100-6999"))?;
    let port = |s: &str| match s.trim().parse::<u16>() {
        Ok(p) if p >= 1 => Ok(p),
        _ => Err(invalid(key, v, "ports must be numbers from 1 to 65535")),
    };
    let (first, last) = (port(a)?, port(b)?);
    if first > last {
        return Err(invalid(key, v, "FIRST must not exceed LAST"));
    }
    Ok(first..=last)
}

pub(super) fn parse_count(key: &'static str, v: &str) -> Result<usize, ConfigError> {
    match v.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(invalid(key, v, "expected a whole number of at least 1")),
    }
}

/// A duration such as `20s`, `5m` or `1h30m`; `off` or `0` mean none.
pub fn parse_duration(key: &'static str, v: &str) -> Result<Option<Duration>, ConfigError> {
    let t = v.trim();
    if t == "off" || t == "0" {
        return Ok(None);
    }
    match humantime::parse_duration(t) {
        Ok(d) if d.is_zero() => Ok(None),
        Ok(d) => Ok(Some(d)),
        Err(err) => Err(invalid(
            key,
            v,
            format!("{err}; expected e.g. 20s, 5m or off"),
        )),
    }
}

/// The kernel hands ports of its ephemeral range to outgoing sockets at random; a pool inside it
/// will find ports taken.
pub(super) fn warn_if_ephemeral_overlap(range: &RangeInclusive<u16>) {
    let Ok(text) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut it = text
        .split_whitespace()
        .filter_map(|s| s.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (it.next(), it.next())
        && *range.start() <= hi
        && lo <= *range.end()
    {
        warn!(
            port_range = ?range,
            ephemeral = %format!("{lo}-{hi}"),
            "--port-range overlaps the kernel's ephemeral port range; outgoing connections may take pool ports"
        );
    }
}

/// `--public-base-url`: `http(s)://host[:port][/prefix]`, returned without a trailing `/`.
/// No query, fragment or user info: the daemon appends `/s/{vm_id}/...` to it.
pub(super) fn parse_base_url(v: &str) -> Result<String, ConfigError> {
    let key = "--public-base-url";
    let t = v.trim().trim_end_matches('/');
    let Some((scheme, rest)) = t.split_once("://") else {
        return Err(invalid(key, v, "expected http(s)://host[:port][/prefix]"));
    };
    if scheme != "http" && scheme != "https" {
        return Err(invalid(key, v, "the scheme must be http or https"));
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() {
        return Err(invalid(key, v, "the URL names no host"));
    }
    if crate::access::split_authority(authority).is_none() {
        return Err(invalid(key, v, "the host and port are not valid"));
    }
    // The prefix goes unescaped into URLs and into noVNC's `path` parameter: plain path
    // characters only, no empty segment. The authority was checked above.
    let path_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~' | '/');
    let path = &rest[authority.len()..];
    if !path.chars().all(path_ok) || path.contains("//") {
        return Err(invalid(
            key,
            v,
            "the path prefix may hold only letters, digits, - . _ ~ and single slashes (no query, fragment, user info or escapes): the daemon appends /s/{vm_id}/vnc.html to it",
        ));
    }
    Ok(t.to_owned())
}
