//! Flags, `VNCGATE_*` environment variables and the TOML file, resolved into a validated [`Config`].
//!
//! Precedence is flag > env > file > default. clap handles the first two; values it leaves unset
//! are taken from the file.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use tracing::warn;

use crate::tls::{TlsFiles, TlsVersion};

/// Default cap on sessions: enough for a large host, and what the pool can serve twice over.
pub const DEFAULT_MAX_SESSIONS: usize = 800;
/// Under the 60 s idle timeout of common reverse proxies, with room for two missed pongs.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_CONNECTIONS_PER_SESSION: usize = 8;

/// Everything the daemon needs, already validated. Tests build it directly.
#[derive(Debug, Clone)]
pub struct Config {
    /// Address of the control API.
    pub api_listen: SocketAddr,
    /// Address the session ports bind (`::` is dual-stack).
    pub listen_host: IpAddr,
    /// Host written into console URLs; `None` means "from the API request's Host header".
    pub public_host: Option<String>,
    /// The port pool.
    pub port_range: RangeInclusive<u16>,
    /// Cap on open sessions (at most the pool's size).
    pub max_sessions: usize,
    /// WebSocket ping period; two missed pongs drop the connection.
    pub ping_interval: Duration,
    /// Live viewers per session port.
    pub max_connections_per_session: usize,
    /// Close a WebSocket that carried no data frame for this long.
    pub idle_timeout: Option<Duration>,
    /// Directory to serve instead of the bundled console page.
    pub web: Option<PathBuf>,
    /// The durable session table; `<file>.lock` guards one daemon per file.
    pub state_file: PathBuf,
    /// Move an unusable state file aside and start with no sessions instead of refusing.
    pub start_empty: bool,
    /// `--cert`/`--key`: session ports speak HTTPS/WSS only.
    pub tls: Option<TlsFiles>,
    /// `--api-cert`/`--api-key`: the control API speaks HTTPS.
    pub api_tls: Option<TlsFiles>,
    /// `--tls-min-version`.
    pub tls_min_version: TlsVersion,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6080)),
            listen_host: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            public_host: None,
            port_range: 6100..=6999,
            max_sessions: DEFAULT_MAX_SESSIONS,
            ping_interval: DEFAULT_PING_INTERVAL,
            max_connections_per_session: DEFAULT_MAX_CONNECTIONS_PER_SESSION,
            idle_timeout: None,
            web: None,
            state_file: PathBuf::from("vncgate-state.json"),
            start_empty: false,
            tls: None,
            api_tls: None,
            tls_min_version: TlsVersion::V1_2,
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    ParseFile {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Missing(String),
    #[error(
        "refusing --api-listen {0}: the control API has no authentication yet, so it must listen on loopback (127.0.0.1 or ::1)"
    )]
    NonLoopbackApi(SocketAddr),
}

/// `vncgate serve` flags. Every flag has a `VNCGATE_<FLAG>` twin and a TOML key of the same name.
#[derive(Debug, Default, Clone, Args)]
pub struct ServeArgs {
    /// TOML file with any of the keys below (e.g. `port-range = "6100-6999"`)
    #[arg(long, env = "VNCGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Control API address [default: 127.0.0.1:6080]
    #[arg(long, env = "VNCGATE_API_LISTEN")]
    pub api_listen: Option<String>,
    /// Address the session ports bind [default: :: (dual-stack), 0.0.0.0 where IPv6 is off]
    #[arg(long, env = "VNCGATE_LISTEN_HOST")]
    pub listen_host: Option<String>,
    /// Host written into console URLs [default: the API request's Host header]
    #[arg(long, env = "VNCGATE_PUBLIC_HOST")]
    pub public_host: Option<String>,
    /// Port pool, FIRST-LAST [default: 6100-6999]
    #[arg(long, env = "VNCGATE_PORT_RANGE")]
    pub port_range: Option<String>,
    /// Cap on sessions [default: min(800, pool size)]
    #[arg(long, env = "VNCGATE_MAX_SESSIONS")]
    pub max_sessions: Option<String>,
    /// WebSocket ping period [default: 20s]
    #[arg(long, env = "VNCGATE_PING_INTERVAL")]
    pub ping_interval: Option<String>,
    /// Live viewers per session port [default: 8]
    #[arg(long, env = "VNCGATE_MAX_CONNECTIONS_PER_SESSION")]
    pub max_connections_per_session: Option<String>,
    /// Close a WebSocket with no data frames for this long, e.g. 30m [default: off]
    #[arg(long, env = "VNCGATE_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Directory to serve instead of the bundled console page, e.g. /usr/share/novnc
    #[arg(long, env = "VNCGATE_WEB")]
    pub web: Option<PathBuf>,
    /// Durable session table [default: vncgate-state.json in the working directory]
    #[arg(long, env = "VNCGATE_STATE_FILE")]
    pub state_file: Option<PathBuf>,
    /// When the state file is unusable: move it aside and start with no sessions
    #[arg(long, env = "VNCGATE_START_EMPTY")]
    pub start_empty: bool,
    /// PEM certificate chain for the session ports (with --key): they speak HTTPS/WSS only
    #[arg(long, env = "VNCGATE_CERT")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert (PKCS#8, SEC1 or RSA)
    #[arg(long, env = "VNCGATE_KEY")]
    pub key: Option<PathBuf>,
    /// PEM certificate chain for the control API (with --api-key): it speaks HTTPS
    #[arg(long, env = "VNCGATE_API_CERT")]
    pub api_cert: Option<PathBuf>,
    /// PEM private key of --api-cert
    #[arg(long, env = "VNCGATE_API_KEY")]
    pub api_key: Option<PathBuf>,
    /// Oldest TLS version accepted: 1.2 or 1.3 [default: 1.2]
    #[arg(long, env = "VNCGATE_TLS_MIN_VERSION")]
    pub tls_min_version: Option<String>,
}

/// The TOML file: the same keys as the flags (kebab-case; snake_case accepted too).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    #[serde(alias = "api_listen")]
    api_listen: Option<String>,
    #[serde(alias = "listen_host")]
    listen_host: Option<String>,
    #[serde(alias = "public_host")]
    public_host: Option<String>,
    #[serde(alias = "port_range")]
    port_range: Option<String>,
    #[serde(alias = "max_sessions")]
    max_sessions: Option<toml::Value>,
    #[serde(alias = "ping_interval")]
    ping_interval: Option<String>,
    #[serde(alias = "max_connections_per_session")]
    max_connections_per_session: Option<toml::Value>,
    #[serde(alias = "idle_timeout")]
    idle_timeout: Option<String>,
    web: Option<PathBuf>,
    #[serde(alias = "state_file")]
    state_file: Option<PathBuf>,
    #[serde(alias = "start_empty")]
    start_empty: Option<bool>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    #[serde(alias = "api_cert")]
    api_cert: Option<PathBuf>,
    #[serde(alias = "api_key")]
    api_key: Option<PathBuf>,
    #[serde(alias = "tls_min_version")]
    tls_min_version: Option<String>,
}

fn value_text(v: toml::Value) -> String {
    match v {
        toml::Value::String(s) => s,
        other => other.to_string(),
    }
}

impl ServeArgs {
    /// Resolves flags, environment and file into a validated [`Config`]. Logs a warning for
    /// every value it had to adjust.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let pick = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);
        let mut config = Config::default();

        if let Some(v) = pick(&self.api_listen, file.api_listen) {
            config.api_listen = parse_socket_addr("--api-listen", &v)?;
        }
        if !config.api_listen.ip().is_loopback() {
            return Err(ConfigError::NonLoopbackApi(config.api_listen));
        }
        config.listen_host = match pick(&self.listen_host, file.listen_host) {
            Some(v) => parse_ip("--listen-host", &v)?,
            None => default_listen_host(),
        };
        config.public_host = pick(&self.public_host, file.public_host)
            .map(|v| parse_public_host(&v))
            .transpose()?;
        if let Some(v) = pick(&self.port_range, file.port_range) {
            config.port_range = parse_port_range(&v)?;
        }
        let pool_size = config.port_range.len();
        config.max_sessions = DEFAULT_MAX_SESSIONS.min(pool_size);
        if let Some(v) = pick(&self.max_sessions, file.max_sessions.map(value_text)) {
            let wanted = parse_count("--max-sessions", &v)?;
            if wanted > pool_size {
                warn!(
                    wanted,
                    pool_size, "--max-sessions exceeds the port pool; clamped to the pool size"
                );
            }
            config.max_sessions = wanted.min(pool_size);
        }
        if let Some(v) = pick(&self.ping_interval, file.ping_interval) {
            config.ping_interval =
                parse_duration("--ping-interval", &v)?.ok_or_else(|| ConfigError::Invalid {
                    key: "--ping-interval",
                    value: v.clone(),
                    reason: "must be a positive duration such as 20s".into(),
                })?;
        }
        if let Some(v) = pick(
            &self.max_connections_per_session,
            file.max_connections_per_session.map(value_text),
        ) {
            config.max_connections_per_session = parse_count("--max-connections-per-session", &v)?;
        }
        if let Some(v) = pick(&self.idle_timeout, file.idle_timeout) {
            config.idle_timeout = parse_duration("--idle-timeout", &v)?;
        }
        if let Some(dir) = self.web.clone().or(file.web) {
            if !dir.join("vnc.html").is_file() {
                return Err(invalid(
                    "--web",
                    &dir.display().to_string(),
                    "the directory must hold a vnc.html (e.g. /usr/share/novnc from Debian's novnc package)",
                ));
            }
            config.web = Some(dir);
        }
        if let Some(path) = self.state_file.clone().or(file.state_file) {
            if path.as_os_str().is_empty() {
                return Err(invalid("--state-file", "", "must name a file"));
            }
            config.state_file = path;
        }
        config.start_empty = self.start_empty || file.start_empty.unwrap_or(false);
        config.tls = tls_pair(
            ("--cert", self.cert.clone().or(file.cert)),
            ("--key", self.key.clone().or(file.key)),
        )?;
        config.api_tls = tls_pair(
            ("--api-cert", self.api_cert.clone().or(file.api_cert)),
            ("--api-key", self.api_key.clone().or(file.api_key)),
        )?;
        if let Some(v) = pick(&self.tls_min_version, file.tls_min_version) {
            config.tls_min_version = v
                .parse()
                .map_err(|reason: String| invalid("--tls-min-version", &v, reason))?;
        }
        warn_if_ephemeral_overlap(&config.port_range);
        Ok(config)
    }
}

/// A certificate and key given together, or neither.
fn tls_pair(
    (cert_key, cert): (&'static str, Option<PathBuf>),
    (key_key, key): (&'static str, Option<PathBuf>),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(cert), None) => Err(invalid(
            key_key,
            "",
            format!(
                "{cert_key} {} needs its private key: add {key_key} FILE",
                cert.display()
            ),
        )),
        (None, Some(key)) => Err(invalid(
            cert_key,
            "",
            format!(
                "{key_key} {} needs its certificate: add {cert_key} FILE",
                key.display()
            ),
        )),
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::ParseFile {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

fn parse_socket_addr(key: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        invalid(
            key,
            v,
            "expected IP:PORT, e.g. 127.0.0.1:6080 or [::1]:6080",
        )
    })
}

fn parse_ip(key: &'static str, v: &str) -> Result<IpAddr, ConfigError> {
    v.trim_matches(|c| c == '[' || c == ']')
        .parse()
        .map_err(|_| invalid(key, v, "expected an IP address, e.g. :: or 127.0.0.1"))
}

/// `::` when this host can bind an IPv6 socket, else `0.0.0.0`.
fn default_listen_host() -> IpAddr {
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

fn parse_count(key: &'static str, v: &str) -> Result<usize, ConfigError> {
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
fn warn_if_ephemeral_overlap(range: &RangeInclusive<u16>) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        let cases: &[(&str, Option<(u16, u16)>)] = &[
            ("6100-6999", Some((6100, 6999))),
            ("1-1", Some((1, 1))),
            ("7000-6000", None),
            ("0-10", None),
            ("10-70000", None),
            ("6100", None),
            ("a-b", None),
        ];
        for (input, want) in cases {
            let got = parse_port_range(input).ok().map(|r| (*r.start(), *r.end()));
            assert_eq!(got, *want, "{input}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("k", "20s").ok(),
            Some(Some(Duration::from_secs(20)))
        );
        assert_eq!(parse_duration("k", "off").ok(), Some(None));
        assert!(parse_duration("k", "soon").is_err());
    }

    #[test]
    fn max_sessions_defaults_and_clamps() {
        let args = ServeArgs {
            port_range: Some("7000-7009".into()),
            ..Default::default()
        };
        assert_eq!(args.resolve().map(|c| c.max_sessions).ok(), Some(10));
        let args = ServeArgs {
            port_range: Some("7000-7009".into()),
            max_sessions: Some("50".into()),
            ..Default::default()
        };
        assert_eq!(args.resolve().map(|c| c.max_sessions).ok(), Some(10));
        assert_eq!(
            ServeArgs::default().resolve().map(|c| c.max_sessions).ok(),
            Some(800)
        );
    }

    #[test]
    fn non_loopback_api_is_refused() {
        let args = ServeArgs {
            api_listen: Some("0.0.0.0:6080".into()),
            ..Default::default()
        };
        assert!(matches!(
            args.resolve(),
            Err(ConfigError::NonLoopbackApi(_))
        ));
    }

    #[test]
    fn public_hosts() {
        assert_eq!(parse_public_host("::1").ok().as_deref(), Some("[::1]"));
        assert_eq!(
            parse_public_host("vnc.example.com").ok().as_deref(),
            Some("vnc.example.com")
        );
        assert!(parse_public_host("evil.com/x").is_err());
        assert!(parse_public_host("a:80").is_err());
    }

    #[test]
    fn file_values_fill_in_below_flags() {
        let dir = std::env::temp_dir().join(format!("vncgate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let path = dir.join("c.toml");
        std::fs::write(&path, "port-range = \"7000-7099\"\nmax_sessions = 20\n").ok();
        let args = ServeArgs {
            config: Some(path.clone()),
            max_sessions: Some("30".into()),
            ..Default::default()
        };
        let c = args.resolve().ok();
        assert_eq!(c.as_ref().map(|c| c.port_range.clone()), Some(7000..=7099));
        assert_eq!(c.map(|c| c.max_sessions), Some(30));
        std::fs::write(&path, "bogus = 1\n").ok();
        assert!(matches!(
            ServeArgs {
                config: Some(path),
                ..Default::default()
            }
            .resolve(),
            Err(ConfigError::ParseFile { .. })
        ));
        std::fs::remove_dir_all(&dir).ok();
    }
}
