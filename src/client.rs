//! The CLI's client of the control API: one request per command, answers rendered for a person
//! (tables) or a machine (`--json`).

use std::fmt::Write as _;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid API address {0:?}: expected e.g. http://127.0.0.1:6080")]
    BadApi(String),
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
}

/// A connection to one daemon's API.
pub struct ApiClient {
    base: String,
    token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        match base.parse::<Uri>() {
            Ok(uri) if uri.scheme_str() == Some("http") && uri.host().is_some() => {}
            _ => return Err(ClientError::BadApi(base)),
        }
        let http = Client::builder(TokioExecutor::new()).build_http();
        Ok(ApiClient { base, token, http })
    }

    /// One request; a non-2xx answer becomes [`ClientError::Api`] with the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), ClientError> {
        let uri = format!("{}{}", self.base, path);
        let mut req = Request::builder().method(method).uri(&uri);
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
        let response = self.http.request(req).await.map_err(|e| {
            let mut reason = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                reason = s.to_string();
                source = s.source();
            }
            unreachable(reason)
        })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unreachable(e.to_string()))?
            .to_bytes();
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|_| ClientError::BadAnswer {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).into_owned(),
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
    pub async fn open(&self, vm_id: &str, target: &str, json: bool) -> Result<String, ClientError> {
        let body = serde_json::json!({ "vm_id": vm_id, "target": target });
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

    /// `vncgate close`.
    pub async fn close(&self, vm_id: &str) -> Result<String, ClientError> {
        let path = format!("/v1/sessions/{}", encode_path_segment(vm_id));
        self.call(Method::DELETE, &path, None).await?;
        Ok(format!("closed the session of {vm_id}"))
    }

    /// `vncgate list`.
    pub async fn list(&self, json: bool) -> Result<String, ClientError> {
        let (_, value) = self.call(Method::GET, "/v1/sessions", None).await?;
        if json {
            return Ok(pretty(&value));
        }
        let empty = Vec::new();
        let sessions = value["sessions"].as_array().unwrap_or(&empty);
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
        let (_, s) = self.call(Method::GET, "/v1/status", None).await?;
        if json {
            return Ok(pretty(&s));
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
        let _ = write!(out, "version:       {}", text(&s["version"]));
        if let Some(warnings) = s["warnings"].as_array() {
            for w in warnings {
                let _ = write!(out, "\nwarning:       {}", text(w));
            }
        }
        Ok(out)
    }
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", parts.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// vm_ids are `[A-Za-z0-9._:-]`; anything else is percent-encoded so the API can refuse it.
fn encode_path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    BB\nxyz  1\n");
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(10 * 1024 * 1024), "10.0 MiB");
    }
}
