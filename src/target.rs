//! The VNC target of a session: parsing (`host:port`, `[v6]:port`, `unix:/path`), display, and
//! connecting to it (DESIGN.md "Control API": target).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

/// How long connecting to a VNC server may take before the viewer is told it is unreachable
/// (DESIGN.md "Session port").
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a session's WebSocket goes: a VNC server over TCP or a unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `host` is kept without brackets; IPv6 literals get them back in [`fmt::Display`].
    Tcp {
        host: String,
        port: u16,
    },
    Unix(PathBuf),
}

/// Why a target string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid target {input:?}: {reason}")]
pub struct TargetError {
    pub input: String,
    pub reason: &'static str,
}

impl std::str::FromStr for Target {
    type Err = TargetError;

    /// `host:port`, `[v6]:port` (port 1-65535) or `unix:/absolute/path`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| TargetError {
            input: s.to_owned(),
            reason,
        };
        if let Some(path) = s.strip_prefix("unix:") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(err(
                    "a unix target needs an absolute path: unix:/path/to/socket",
                ));
            }
            if path.contains('\0') {
                return Err(err("the socket path contains a NUL byte"));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        if s.contains("://") {
            return Err(err(
                "a target is host:port, [IPv6]:port or unix:/path, not a URL",
            ));
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (v6, port) = rest
                .split_once("]:")
                .ok_or_else(|| err("expected [IPv6]:port"))?;
            if v6.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(err("the part in brackets is not an IPv6 address"));
            }
            (v6, port)
        } else {
            let (host, port) = s
                .rsplit_once(':')
                .ok_or_else(|| err("missing port: expected host:port"))?;
            if host.contains(':') {
                return Err(err("an IPv6 address needs brackets: [::1]:5900"));
            }
            let valid = !host.is_empty()
                && host.len() <= 253
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_');
            if !valid {
                return Err(err("the host must be a host name or IP address"));
            }
            (host, port)
        };
        // Digits only: `parse` would also take a sign (`host:+5900`).
        let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
        let port = match port.parse::<u16>() {
            Ok(p) if p >= 1 && digits => p,
            _ => return Err(err("the port must be a number from 1 to 65535")),
        };
        Ok(Target::Tcp {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Target::Tcp { host, port } => write!(f, "{host}:{port}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

impl serde::Serialize for Target {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A connected VNC server.
pub enum TargetStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Target {
    /// Connects (TCP with `TCP_NODELAY`, or the unix socket). No timeout here: the caller
    /// bounds it with [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> io::Result<TargetStream> {
        match self {
            Target::Tcp { host, port } => {
                let stream = TcpStream::connect((host.as_str(), *port)).await?;
                // VNC is interactive: a key press must not wait for Nagle.
                stream.set_nodelay(true)?;
                Ok(TargetStream::Tcp(stream))
            }
            Target::Unix(path) => Ok(TargetStream::Unix(UnixStream::connect(path).await?)),
        }
    }
}

/// Whether `err` is this process (EMFILE) or the whole system (ENFILE) running out of file
/// descriptors: a failure of vncgate, not of the VNC server it was connecting to.
pub fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(23 | 24))
}

/// Text of a connect error as a person reads it in a close reason.
pub fn describe_connect_error(err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::NotFound => "no such socket".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::TimedOut => "timed out".into(),
        _ => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_out_of_descriptors_is_told_apart() {
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(24)));
        assert!(out_of_descriptors(&io::Error::from_raw_os_error(23)));
        assert!(!out_of_descriptors(
            &io::ErrorKind::ConnectionRefused.into()
        ));
        assert!(!out_of_descriptors(&io::Error::from_raw_os_error(111)));
    }

    #[test]
    fn targets_parse_and_display() {
        let ok = [
            ("127.0.0.1:5901", "127.0.0.1:5901"),
            ("vm-host.example:5900", "vm-host.example:5900"),
            ("[::1]:5900", "[::1]:5900"),
            ("unix:/run/vnc/a.sock", "unix:/run/vnc/a.sock"),
            ("localhost:65535", "localhost:65535"),
        ];
        for (input, shown) in ok {
            let t: Target = input.parse().unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(t.to_string(), shown);
        }
        let bad = [
            "127.0.0.1",
            "127.0.0.1:0",
            "127.0.0.1:70000",
            ":5900",
            "::1:5900",
            "[::1]",
            "[nothost]:5900",
            "unix:",
            "unix:relative.sock",
            "a b:5900",
            "host:port",
            "127.0.0.1:+5900",
            "127.0.0.1: 5900",
            "http://host:5900",
            "",
        ];
        for input in bad {
            assert!(
                input.parse::<Target>().is_err(),
                "{input} should be refused"
            );
        }
        let url = "vnc://host:5900".parse::<Target>().err().map(|e| e.reason);
        assert_eq!(
            url,
            Some("a target is host:port, [IPv6]:port or unix:/path, not a URL")
        );
    }
}
