//! The CLI's client of the control API: one request per command, answers rendered for a person
//! (tables) or a machine (`--json`).

use std::fmt::Write as _;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

mod render;
use render::{encode_path_segment, human_bytes, pretty, table, text};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "invalid API address {0:?}: expected e.g. http://127.0.0.1:6080 or https://vncgate.example:6080"
    )]
    BadApi(String),
    #[error("cannot use the CA file {path} (VNCGATE_API_CA): {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot set up TLS for the API connection: {0}")]
    Tls(String),
    #[error(
        "cannot reach the vncgate API at {api}: {reason} (is `vncgate serve` running? set --api or VNCGATE_API)"
    )]
    Unreachable { api: String, reason: String },
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from the API (HTTP {status}): {body}")]
    BadAnswer { status: u16, body: String },
    #[error(
        "the vncgate API at {api} did not answer within {secs} s (is it overloaded, or is something else listening there?)"
    )]
    Timeout { api: String, secs: u64 },
}

/// How long one CLI request may take, connection and answer included.
pub const CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// `vncgate cleanup` waits for a whole pass: ceil(n / 256) x 2 s, 80 s for 10,000 sessions.
pub const CLEANUP_CALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);
/// The largest answer the CLI reads: a list of 10,000 sessions is about 7 MB.
const MAX_ANSWER: usize = 64 << 20;
/// How much of an answer that is not the API's JSON an error message quotes.
const QUOTED_ANSWER: usize = 512;

/// The optional per-session limits of `vncgate open` (durations such as `15m`, as text).
#[derive(Debug, Clone, Default)]
pub struct OpenLimits {
    pub idle_timeout: Option<String>,
    pub max_lifetime: Option<String>,
}

/// A client of one daemon's API, over http or https.
pub struct ApiClient {
    base: String,
    host: String,
    port: u16,
    /// `host:port` as given, for the `Host` header.
    authority: String,
    /// A path the API sits under (behind a reverse proxy), without a trailing `/`.
    prefix: String,
    token: Option<String>,
    /// Set for an `https://` API: the roots its certificate must chain to.
    tls: Option<tokio_rustls::TlsConnector>,
}

/// Both plain and TLS connections to the API.
trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// The roots an `https://` API's certificate is checked against: the PEM file `ca` (a private
/// CA, `VNCGATE_API_CA`) when given, else the system's.
fn trust_roots(ca: Option<PathBuf>) -> Result<rustls::RootCertStore, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let bad = |reason: String| ClientError::BadCa {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
            let certs = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?;
            if certs.is_empty() {
                return Err(bad("no PEM certificate in it".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| bad(e.to_string()))?;
            }
        }
        None => {
            // Unreadable system certificates only narrow what is trusted.
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
        }
    }
    Ok(roots)
}

impl ApiClient {
    /// `base` is `http://HOST:PORT` or `https://HOST:PORT`; `ca` a PEM file of the CA an https
    /// API's certificate chains to (else the system's roots). `token` is the API bearer token.
    pub fn new(
        base: &str,
        token: Option<String>,
        ca: Option<PathBuf>,
    ) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        let uri = base
            .parse::<Uri>()
            .map_err(|_| ClientError::BadApi(base.clone()))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| ClientError::Tls(e.to_string()))?
                .with_root_certificates(trust_roots(ca)?)
                .with_no_client_auth();
                Some(tokio_rustls::TlsConnector::from(Arc::new(config)))
            }
            _ => return Err(ClientError::BadApi(base)),
        };
        let (Some(host), Some(authority)) = (uri.host(), uri.authority()) else {
            return Err(ClientError::BadApi(base));
        };
        let authority = authority.as_str().to_owned();
        let prefix = uri.path().trim_end_matches('/').to_owned();
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(ApiClient {
            base,
            host,
            port,
            authority,
            prefix,
            token,
            tls,
        })
    }

    /// One connection for one request (each CLI command makes one).
    async fn connect(&self) -> Result<Box<dyn Io>, String> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| e.to_string())?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let name = ServerName::try_from(self.host.clone()).map_err(|e| e.to_string())?;
        let stream = tls.connect(name, tcp).await.map_err(|e| {
            format!("TLS handshake failed: {e} (for a private CA set VNCGATE_API_CA=/path/ca.pem)")
        })?;
        Ok(Box::new(stream))
    }

    /// One request; a non-2xx answer becomes [`ClientError::Api`] with the server's message,
    /// and one that takes longer than [`CALL_TIMEOUT`] becomes [`ClientError::Timeout`].
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        self.call_within(CALL_TIMEOUT, method, path, body).await
    }

    /// [`ApiClient::call`] with its own time limit.
    pub async fn call_within(
        &self,
        limit: std::time::Duration,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        tokio::time::timeout(limit, self.call_once(method, path, body))
            .await
            .map_err(|_| ClientError::Timeout {
                api: self.base.clone(),
                secs: limit.as_secs(),
            })?
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let uri = format!("{}{}", self.base, path);
        // Origin-form on the wire (under the API's path prefix), the authority in Host.
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &self.authority);
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let req = req
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .map_err(|_| ClientError::BadApi(uri.clone()))?;
        let unreachable = |reason: String| ClientError::Unreachable {
            api: self.base.clone(),
            reason,
        };
        let io = self.connect().await.map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        // Drives the connection while the request is in flight; ends with it.
        let driver = tokio::spawn(conn);
        let response = sender.send_request(req).await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = s.to_string();
                source = s.source();
            }
            unreachable(reason)
        });
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                driver.abort();
                return Err(e);
            }
        };
        let status = response.status();
        let bytes = http_body_util::Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await;
        driver.abort();
        let bytes = bytes
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ClientError::BadAnswer {
                        status: status.as_u16(),
                        body: format!("an answer larger than {} MiB", MAX_ANSWER >> 20),
                    }
                } else {
                    unreachable(e.to_string())
                }
            })?
            .to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| ClientError::BadAnswer {
                status: status.as_u16(),
                body: quoted(&String::from_utf8_lossy(&bytes)),
            })?
        };
        if status.is_success() {
            return Ok((status, value));
        }
        let err = &value["error"];
        Err(ClientError::Api {
            status: status.as_u16(),
            code: err["code"].as_str().unwrap_or("unknown").to_owned(),
            message: err["message"].as_str().unwrap_or("no message").to_owned(),
        })
    }

    /// `vncgate open`: the console url, or the whole Session with `json`.
    pub async fn open(
        &self,
        vm_id: &str,
        target: &str,
        limits: &OpenLimits,
        json: bool,
    ) -> Result<String, ClientError> {
        let mut body = serde_json::json!({ "vm_id": vm_id, "target": target });
        // Sent as given: the daemon checks them and names a bad one.
        for (field, value) in [
            ("idle_timeout", &limits.idle_timeout),
            ("max_lifetime", &limits.max_lifetime),
        ] {
            if let Some(v) = value {
                body[field] = serde_json::Value::String(v.clone());
            }
        }
        let (_, session) = self.call(Method::POST, "/v1/sessions", Some(body)).await?;
        if json {
            return Ok(pretty(&session));
        }
        session["url"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::BadAnswer {
                status: 200,
                body: session.to_string(),
            })
    }

    /// `vncgate rotate`: a new token (the old one stops admitting new connections); with
    /// `disconnect`, live viewers are closed with 1008 `token revoked`. Prints the new url.
    pub async fn rotate(&self, vm_id: &str, disconnect: bool) -> Result<String, ClientError> {
        let path = format!("/v1/sessions/{}/token", encode_path_segment(vm_id));
        let body = serde_json::json!({ "disconnect": disconnect });
        let (status, session) = self.call(Method::POST, &path, Some(body)).await?;
        session["url"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ClientError::BadAnswer {
                status: status.as_u16(),
                body: session.to_string(),
            })
    }

    /// `vncgate cleanup`: runs a cleanup pass now and says what it closed.
    pub async fn cleanup(&self, json: bool) -> Result<String, ClientError> {
        let answer = self
            .call_within(CLEANUP_CALL_TIMEOUT, Method::POST, "/v1/cleanup", None)
            .await?;
        let closed = required(&answer, "closed", Value::as_array)?;
        let report = &answer.1;
        if json {
            return Ok(pretty(report));
        }
        let mut out = format!(
            "checked {} session(s) without viewers in {} ms; closed {}",
            report["checked"],
            report["duration_ms"],
            closed.len()
        );
        for c in closed {
            out.push_str(&format!(
                "\n  {} ({}): {}, failing since {}",
                text(&c["vm_id"]),
                text(&c["target"]),
                text(&c["reason"]),
                text(&c["failing_since"])
            ));
        }
        Ok(out)
    }

    /// `vncgate kick`: disconnects one viewer (1008 `disconnected by operator`).
    pub async fn kick(&self, vm_id: &str, viewer_id: &str) -> Result<String, ClientError> {
        let path = format!(
            "/v1/sessions/{}/viewers/{}",
            encode_path_segment(vm_id),
            encode_path_segment(viewer_id)
        );
        self.call(Method::DELETE, &path, None).await?;
        Ok(format!("disconnected viewer {viewer_id} of {vm_id}"))
    }

    /// `vncgate close`.
    pub async fn close(&self, vm_id: &str) -> Result<String, ClientError> {
        let path = format!("/v1/sessions/{}", encode_path_segment(vm_id));
        self.call(Method::DELETE, &path, None).await?;
        Ok(format!("closed the session of {vm_id}"))
    }

    /// `vncgate list`.
    pub async fn list(&self, json: bool) -> Result<String, ClientError> {
        let answer = self.call(Method::GET, "/v1/sessions", None).await?;
        let sessions = required(&answer, "sessions", Value::as_array)?;
        if json {
            return Ok(pretty(&answer.1));
        }
        let rows: Vec<Vec<String>> = sessions
            .iter()
            .map(|s| {
                vec![
                    text(&s["vm_id"]),
                    text(&s["ws_port"]),
                    text(&s["target"]),
                    text(&s["connections"]),
                    human_bytes(s["bytes_to_client"].as_u64().unwrap_or(0)),
                    human_bytes(s["bytes_to_server"].as_u64().unwrap_or(0)),
                    text(&s["created_at"]),
                    text(&s["url"]),
                ]
            })
            .collect();
        let mut out = table(
            &[
                "VM_ID",
                "PORT",
                "TARGET",
                "VIEWERS",
                "TO_CLIENT",
                "TO_SERVER",
                "CREATED",
                "URL",
            ],
            &rows,
        );
        let _ = write!(out, "{} session(s)", rows.len());
        Ok(out)
    }

    /// `vncgate status`.
    pub async fn status(&self, json: bool) -> Result<String, ClientError> {
        let answer = self.call(Method::GET, "/v1/status", None).await?;
        required(&answer, "active_sessions", Value::as_u64)?;
        let s = &answer.1;
        if json {
            return Ok(pretty(s));
        }
        let p = &s["port_pool"];
        let mut out = String::new();
        let _ = writeln!(out, "health:        {}", text(&s["system_health"]));
        let _ = writeln!(
            out,
            "sessions:      {} of {} max",
            text(&s["active_sessions"]),
            text(&s["max_sessions"])
        );
        let _ = writeln!(out, "connections:   {}", text(&s["active_connections"]));
        let _ = writeln!(
            out,
            "ports:         {} total, {} allocated, {} free, {} foreign ({}% used)",
            text(&p["total_ports"]),
            text(&p["allocated_ports"]),
            text(&p["free_ports"]),
            text(&p["foreign_ports"]),
            text(&p["utilization_percent"])
        );
        let _ = writeln!(out, "uptime:        {}s", text(&s["uptime_s"]));
        let c = &s["last_cleanup"];
        if c.is_object() {
            let _ = writeln!(
                out,
                "last cleanup:  {} (checked {}, closed {})",
                text(&c["time"]),
                text(&c["checked"]),
                text(&c["closed"])
            );
        }
        let k = &s["connections"];
        if k.is_object() {
            let _ = writeln!(
                out,
                "refused:       {} at --max-connections, {} at --max-pending-per-ip, {} rate-limited",
                text(&k["refused_max_connections"]),
                text(&k["refused_max_pending"]),
                text(&k["rate_limited"])
            );
        }
        let _ = write!(out, "version:       {}", text(&s["version"]));
        if let Some(warnings) = s["warnings"].as_array() {
            for w in warnings {
                let _ = write!(out, "\nwarning:       {}", text(w));
            }
        }
        Ok(out)
    }
}

/// The field `key` of a 200 answer, of the shape `get` reads. An answer without it did not
/// come from vncgate's API (something else listens there): [`ClientError::BadAnswer`], not an
/// empty table.
fn required<'a, T>(
    (status, answer): &'a (StatusCode, Value),
    key: &str,
    get: impl FnOnce(&'a Value) -> Option<T>,
) -> Result<T, ClientError> {
    get(&answer[key]).ok_or_else(|| ClientError::BadAnswer {
        status: status.as_u16(),
        body: quoted(&answer.to_string()),
    })
}

/// `body` cut to [`QUOTED_ANSWER`] bytes (at a character boundary), with its size if cut.
fn quoted(body: &str) -> String {
    if body.len() <= QUOTED_ANSWER {
        return body.to_owned();
    }
    let mut end = QUOTED_ANSWER;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &body[..end], body.len())
}

#[cfg(test)]
mod tests;
