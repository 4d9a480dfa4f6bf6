//! The Session object the API shows (DESIGN.md "Control API", Session): URLs, token, limits,
//! live viewers and bytes relayed.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{Session, duration_text, lock, rfc3339};
use crate::target::Target;

impl Session {
    /// A snapshot for the API. `host` is what console URLs name.
    pub fn info(&self, host: &str, style: UrlStyle) -> SessionInfo {
        let viewers: Vec<ViewerInfo> = {
            let live = lock(&self.viewers);
            let mut v: Vec<ViewerInfo> = live
                .values()
                .map(|v| ViewerInfo {
                    id: v.id,
                    peer: v.peer.to_string(),
                    started_at: rfc3339(v.started_at),
                    bytes_to_client: v.traffic.to_client.load(Ordering::Relaxed),
                    bytes_to_server: v.traffic.to_server.load(Ordering::Relaxed),
                })
                .collect();
            v.sort_by_key(|v| v.id);
            v
        };
        let (bytes_to_client, bytes_to_server) = self.traffic_totals();
        let token = self.token();
        let authority = format!("{host}:{}", self.port);
        let (http, ws) = if style.tls {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        SessionInfo {
            vm_id: self.vm_id.clone(),
            target: self.target(),
            ws_port: self.port,
            url: if style.bundled_page {
                // The fragment never reaches a server or proxy log.
                format!("{http}://{authority}/vnc.html#token={}", token.value)
            } else {
                // Another app (Debian's noVNC) reads the WebSocket path from the query.
                format!(
                    "{http}://{authority}/vnc.html?autoconnect=1&path=websockify%3Ftoken%3D{}",
                    token.value
                )
            },
            ws_url: format!("{ws}://{authority}/websockify?token={}", token.value),
            token_expires_at: token.expires_at.map(rfc3339),
            token: token.value,
            created_at: rfc3339(self.created_at),
            idle_timeout: self.limits.idle_timeout.map(duration_text),
            max_lifetime: self.limits.max_lifetime.map(duration_text),
            closes_at: self.limits.closes_at(self.created_at).map(rfc3339),
            connections: viewers.len(),
            bytes_to_client,
            bytes_to_server,
            viewers,
        }
    }
}

/// How console URLs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlStyle {
    /// The bundled page reads the token from `#token=`; another app (`--web`) from `path`.
    pub bundled_page: bool,
    /// Session ports speak TLS: `https`/`wss`.
    pub tls: bool,
}

/// The Session object of the API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub vm_id: String,
    /// `host:port`, `[v6]:port` or `unix:/path`.
    #[schema(value_type = String, example = "127.0.0.1:5901")]
    pub target: Target,
    pub ws_port: u16,
    pub url: String,
    pub ws_url: String,
    pub token: String,
    /// When the token stops admitting new connections (RFC 3339); null without `--token-ttl`.
    pub token_expires_at: Option<String>,
    pub created_at: String,
    /// This session's idle limit for viewers (humantime, `15m`); null: `--idle-timeout`.
    pub idle_timeout: Option<String>,
    /// How long after `created_at` the session closes (humantime); null: never.
    pub max_lifetime: Option<String>,
    /// When `max_lifetime` closes it (RFC 3339); null: never.
    pub closes_at: Option<String>,
    /// Live viewers.
    pub connections: usize,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    /// One record per live viewer.
    pub viewers: Vec<ViewerInfo>,
}

/// One live viewer of a session.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ViewerInfo {
    pub id: u64,
    pub peer: String,
    pub started_at: String,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
}
