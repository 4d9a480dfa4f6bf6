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

use crate::access::{self, Origin};
use crate::tls::{TlsFiles, TlsVersion};

mod resolve;
mod values;
use values::{
    default_listen_host, invalid, parse_base_url, parse_count, parse_ip, parse_socket_addr,
    warn_if_ephemeral_overlap,
};
pub use values::{parse_duration, parse_port_range, parse_public_host};

/// Default cap on sessions: enough for a large host, and what the pool can serve twice over.
pub const DEFAULT_MAX_SESSIONS: usize = 800;
/// Under the 60 s idle timeout of common reverse proxies, with room for two missed pongs.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(20);
pub const DEFAULT_MAX_CONNECTIONS_PER_SESSION: usize = 8;
/// `--cleanup-interval` default.
pub const DEFAULT_CLEANUP_INTERVAL: Duration = Duration::from_secs(30);
/// `--stale-after` default.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);
/// The longest `--token-ttl`: ten years (expiry times stay writable as RFC 3339).
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
/// Failed token checks per client address per minute before 429 (`--auth-fail-limit`).
pub const DEFAULT_AUTH_FAIL_LIMIT: u32 = 20;
/// Connections not yet upgraded per client address (`--max-pending-per-ip`): a browser
/// opens about six per host; 64 leaves room for a whole office behind one NAT.
pub const DEFAULT_MAX_PENDING_PER_IP: usize = 64;
/// Default cap on sessions with `--session-ports off` (no pool to bound it).
pub const DEFAULT_MAX_SESSIONS_PORTLESS: usize = 10_000;

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
    /// Cap on open sessions (at most the pool's size while sessions have ports).
    pub max_sessions: usize,
    /// `--public-listen`: one port serving every session under `/s/{vm_id}/`.
    pub public_listen: Option<SocketAddr>,
    /// `--public-base-url`: `scheme://host[:port][/prefix]` (no trailing `/`) written into
    /// `public_url`s, for a reverse proxy in front of the public port.
    pub public_base_url: Option<String>,
    /// `--session-ports`: `false` (`off`) binds no pool ports; sessions live on the public
    /// port only (requires `public_listen`).
    pub session_ports: bool,
    /// `--viewer-send-buffer`: `true` (`auto`) fixes a viewer socket's send buffer at Linux's
    /// autotuning ceiling where the host allows it; `false` (`off`) leaves it to autotuning.
    pub viewer_send_buffer: bool,
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
    /// `--api-token-file`: the API's bearer token (its first line).
    pub api_token_file: Option<PathBuf>,
    /// `--allowed-origins`: browser origins besides a port's own that may open consoles.
    pub allowed_origins: Vec<Origin>,
    /// `--trusted-proxies`: peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `--token-ttl`: tokens admit new connections this long after issue.
    pub token_ttl: Option<Duration>,
    /// `--auth-fail-limit`: failed token checks per client per minute before 429; 0 is off.
    pub auth_fail_limit: u32,
    /// `--max-pending-per-ip`.
    pub max_pending_per_ip: usize,
    /// `--max-connections`; `None`: from the open-files limit at start.
    pub max_connections: Option<usize>,
    /// `--api-allowed-origins`: browser origins that may call the API.
    pub api_allowed_origins: Vec<Origin>,
    /// `--api-hosts`: `Host` names the API answers to besides IP literals, `localhost` and
    /// `--public-host`.
    pub api_hosts: Vec<String>,
    /// `--frame-ancestors`: CSP source list of who may frame the console page.
    pub frame_ancestors: String,
    /// `--cleanup-interval`: how often the cleanup pass runs; `None` is off.
    pub cleanup_interval: Option<Duration>,
    /// `--stale-after`: a target failing every check this long has its session closed.
    pub stale_after: Duration,
    /// `--log-format`: `text` (colour only on a terminal) or `json` (one object a line).
    pub log_format: LogFormat,
    /// `--log-level`: a tracing filter such as `info` or `info,vncgate::events=warn`; `None`:
    /// `RUST_LOG`, else `info`.
    pub log_level: Option<String>,
    /// `--libvirt`: the libvirt URI whose domains sessions follow (feature `libvirt`).
    pub libvirt: Option<String>,
    /// `--libvirt-id`: `name` (the domain's name is the vm_id) or `uuid`.
    pub libvirt_id_uuid: bool,
}

/// How log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 6080)),
            listen_host: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            public_host: None,
            port_range: 6100..=6999,
            max_sessions: DEFAULT_MAX_SESSIONS,
            public_listen: None,
            public_base_url: None,
            session_ports: true,
            viewer_send_buffer: true,
            ping_interval: DEFAULT_PING_INTERVAL,
            max_connections_per_session: DEFAULT_MAX_CONNECTIONS_PER_SESSION,
            idle_timeout: None,
            web: None,
            state_file: PathBuf::from("vncgate-state.json"),
            start_empty: false,
            tls: None,
            api_tls: None,
            tls_min_version: TlsVersion::V1_2,
            api_token_file: None,
            allowed_origins: Vec::new(),
            trusted_proxies: Vec::new(),
            token_ttl: None,
            auth_fail_limit: DEFAULT_AUTH_FAIL_LIMIT,
            max_pending_per_ip: DEFAULT_MAX_PENDING_PER_IP,
            max_connections: None,
            api_allowed_origins: Vec::new(),
            api_hosts: Vec::new(),
            frame_ancestors: "'self'".into(),
            cleanup_interval: Some(DEFAULT_CLEANUP_INTERVAL),
            stale_after: DEFAULT_STALE_AFTER,
            log_format: LogFormat::Text,
            log_level: None,
            libvirt: None,
            libvirt_id_uuid: false,
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
        "refusing --api-listen {0} without --api-token-file: a control API reachable from other hosts needs a bearer token (put a long random token in a file readable only by vncgate and pass --api-token-file FILE), or listen on loopback (127.0.0.1 or ::1)"
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
    /// The API's bearer token file (`--api-token-file`, a global flag shared with the client
    /// commands); filled in by the CLI.
    #[arg(skip)]
    pub api_token_file: Option<PathBuf>,
    /// Browser origins besides a port's own that may open consoles, comma-separated, e.g. https://platform.example
    #[arg(long, env = "VNCGATE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Proxies whose X-Forwarded-* headers are believed, comma-separated CIDRs [default: none]
    #[arg(long, env = "VNCGATE_TRUSTED_PROXIES")]
    pub trusted_proxies: Option<String>,
    /// Session tokens admit new connections this long after issue, e.g. 8h [default: off]
    #[arg(long, env = "VNCGATE_TOKEN_TTL")]
    pub token_ttl: Option<String>,
    /// Failed token checks per client address per minute before 429; 0 is off [default: 20]
    #[arg(long, env = "VNCGATE_AUTH_FAIL_LIMIT")]
    pub auth_fail_limit: Option<String>,
    /// Connections not yet upgraded per client address, across all ports [default: 64]
    #[arg(long, env = "VNCGATE_MAX_PENDING_PER_IP")]
    pub max_pending_per_ip: Option<String>,
    /// Client connections of the daemon; past it new ones are closed at accept [default: (open-files limit - pool size - 256) / 2]
    #[arg(long, env = "VNCGATE_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    /// Browser origins allowed to call the API, comma-separated [default: none]
    #[arg(long, env = "VNCGATE_API_ALLOWED_ORIGINS")]
    pub api_allowed_origins: Option<String>,
    /// Extra Host names the API answers to (DNS-rebinding guard), comma-separated
    #[arg(long, env = "VNCGATE_API_HOSTS")]
    pub api_hosts: Option<String>,
    /// CSP frame-ancestors of the console page, e.g. "'self' https://platform.example" [default: 'self']
    #[arg(long, env = "VNCGATE_FRAME_ANCESTORS")]
    pub frame_ancestors: Option<String>,
    /// How often the cleanup pass checks idle sessions' targets, or off [default: 30s]
    #[arg(long, env = "VNCGATE_CLEANUP_INTERVAL")]
    pub cleanup_interval: Option<String>,
    /// Close a session without viewers whose target failed every check this long [default: 300s]
    #[arg(long, env = "VNCGATE_STALE_AFTER")]
    pub stale_after: Option<String>,
    /// Log lines as text or json (one JSON object a line) [default: text]
    #[arg(long, env = "VNCGATE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Tracing filter, e.g. info or debug,hyper=info; reloaded on SIGHUP [default: RUST_LOG, else info]
    #[arg(long, env = "VNCGATE_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Follow this libvirt URI's domains, e.g. qemu:///system (built with the `libvirt` feature)
    #[arg(long, env = "VNCGATE_LIBVIRT")]
    pub libvirt: Option<String>,
    /// With --libvirt: name (the domain name is the vm_id) or uuid [default: name]
    #[arg(long, env = "VNCGATE_LIBVIRT_ID")]
    pub libvirt_id: Option<String>,
    /// One port serving every session under /s/{vm_id}/, e.g. [::]:6443 [default: off]
    #[arg(long, env = "VNCGATE_PUBLIC_LISTEN")]
    pub public_listen: Option<String>,
    /// scheme://host[:port][/prefix] written into public_url (a reverse proxy in front)
    #[arg(long, env = "VNCGATE_PUBLIC_BASE_URL")]
    pub public_base_url: Option<String>,
    /// on, or off: no pool ports, sessions only on the public port (needs --public-listen) [default: on]
    #[arg(long, env = "VNCGATE_SESSION_PORTS")]
    pub session_ports: Option<String>,
    /// auto: a viewer socket's send buffer at Linux's autotuning ceiling (capped at 4 MiB) where
    /// net.core.wmem_max allows it; off: left to autotuning [default: auto]
    #[arg(long, env = "VNCGATE_VIEWER_SEND_BUFFER")]
    pub viewer_send_buffer: Option<String>,
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
    #[serde(alias = "api_token_file")]
    api_token_file: Option<PathBuf>,
    #[serde(alias = "allowed_origins")]
    allowed_origins: Option<String>,
    #[serde(alias = "trusted_proxies")]
    trusted_proxies: Option<String>,
    #[serde(alias = "token_ttl")]
    token_ttl: Option<String>,
    #[serde(alias = "auth_fail_limit")]
    auth_fail_limit: Option<toml::Value>,
    #[serde(alias = "max_pending_per_ip")]
    max_pending_per_ip: Option<toml::Value>,
    #[serde(alias = "max_connections")]
    max_connections: Option<toml::Value>,
    #[serde(alias = "api_allowed_origins")]
    api_allowed_origins: Option<String>,
    #[serde(alias = "api_hosts")]
    api_hosts: Option<String>,
    #[serde(alias = "frame_ancestors")]
    frame_ancestors: Option<String>,
    #[serde(alias = "cleanup_interval")]
    cleanup_interval: Option<String>,
    #[serde(alias = "stale_after")]
    stale_after: Option<String>,
    #[serde(alias = "log_format")]
    log_format: Option<String>,
    #[serde(alias = "log_level")]
    log_level: Option<String>,
    libvirt: Option<String>,
    #[serde(alias = "libvirt_id")]
    libvirt_id: Option<String>,
    #[serde(alias = "public_listen")]
    public_listen: Option<String>,
    #[serde(alias = "public_base_url")]
    public_base_url: Option<String>,
    #[serde(alias = "session_ports")]
    session_ports: Option<String>,
    #[serde(alias = "viewer_send_buffer")]
    viewer_send_buffer: Option<String>,
}

fn value_text(v: toml::Value) -> String {
    match v {
        toml::Value::String(s) => s,
        other => other.to_string(),
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

#[cfg(test)]
mod tests;
