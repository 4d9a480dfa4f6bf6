//! The Session object the API shows (DESIGN.md "Control API", Session): URLs, token, limits,
//! live viewers and bytes relayed.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::{Session, duration_text, lock, rfc3339};
use crate::target::Target;

impl Session {
    /// A snapshot for the API. `host` is what console URLs name.
    pub fn info(&self, host: &str, style: &UrlStyle) -> SessionInfo {
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
        let (http, ws) = if style.tls {
            ("https", "wss")
        } else {
            ("http", "ws")
        };
        let public = style.public.as_ref().map(|base| {
            let page_base = match base {
                PublicBase::Port(port) => format!("{http}://{host}:{port}"),
                PublicBase::Url(url) => url.to_string(),
            };
            let prefix = format!("s/{}/", self.vm_id);
            // noVNC's `path` is taken from the host's root, so it carries the base's own path.
            let path_prefix = match base {
                PublicBase::Port(_) => prefix.clone(),
                PublicBase::Url(url) => format!("{}{prefix}", url_path_prefix(url)),
            };
            (
                page_url(
                    &format!("{page_base}/{prefix}"),
                    &path_prefix,
                    &token.value,
                    style,
                ),
                format!(
                    "{}/{prefix}websockify?token={}",
                    ws_base(&page_base),
                    token.value
                ),
            )
        });
        let own = self.port.map(|port| {
            let authority = format!("{host}:{port}");
            (
                page_url(&format!("{http}://{authority}/"), "", &token.value, style),
                format!("{ws}://{authority}/websockify?token={}", token.value),
            )
        });
        // Without a port of its own (--session-ports off) a session's URLs are the public ones.
        let (url, ws_url) = own.or_else(|| public.clone()).unwrap_or_default();
        let (public_url, public_ws_url) = public.unzip();
        SessionInfo {
            vm_id: self.vm_id.clone(),
            target: self.target(),
            ws_port: self.port,
            url,
            ws_url,
            public_url,
            public_ws_url,
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

/// The console page's URL under `base` (ending in `/`): the token in the fragment for the
/// bundled page (a fragment never reaches a server or proxy log); for another app (`--web`,
/// Debian's noVNC) the WebSocket path in the query, `path_prefix` (from the host's root)
/// before `websockify`.
fn page_url(base: &str, path_prefix: &str, token: &str, style: &UrlStyle) -> String {
    if style.bundled_page {
        format!("{base}vnc.html#token={token}")
    } else {
        format!("{base}vnc.html?autoconnect=1&path={path_prefix}websockify%3Ftoken%3D{token}")
    }
}

/// `http(s)://...` as `ws(s)://...`.
fn ws_base(page_base: &str) -> String {
    if let Some(rest) = page_base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = page_base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        page_base.to_owned()
    }
}

/// The path of a base URL without its leading `/`, ending in `/` when not empty:
/// `https://h/consoles` -> `consoles/`.
fn url_path_prefix(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    match after_scheme.split_once('/') {
        Some((_, path)) if !path.is_empty() => format!("{}/", path.trim_end_matches('/')),
        _ => String::new(),
    }
}

/// How console URLs are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UrlStyle {
    /// The bundled page reads the token from `#token=`; another app (`--web`) from `path`.
    pub bundled_page: bool,
    /// Session ports (and the public port) speak TLS: `https`/`wss`.
    pub tls: bool,
    /// Where `public_url`/`public_ws_url` point (`--public-listen`); `None`: no public port.
    pub public: Option<PublicBase>,
}

/// The root of the public port's URLs (DESIGN.md "Single public port").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicBase {
    /// The public port itself, on the host console URLs name.
    Port(u16),
    /// `--public-base-url` (a reverse proxy in front), without a trailing `/`.
    Url(std::sync::Arc<str>),
}

/// The Session object of the API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    pub vm_id: String,
    /// `host:port`, `[v6]:port` or `unix:/path`.
    #[schema(value_type = String, example = "127.0.0.1:5901")]
    pub target: Target,
    /// The session's pool port; null with `--session-ports off`.
    pub ws_port: Option<u16>,
    /// The console page with the token (the public one with `--session-ports off`).
    pub url: String,
    /// The WebSocket URL for non-browser clients.
    pub ws_url: String,
    /// The console page on the public port (`--public-listen`), `/s/{vm_id}/vnc.html#token=T`;
    /// null without one.
    pub public_url: Option<String>,
    /// The WebSocket URL on the public port, `/s/{vm_id}/websockify?token=T`; null without one.
    pub public_ws_url: Option<String>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_url_paths() {
        assert_eq!(url_path_prefix("https://h.example"), "");
        assert_eq!(url_path_prefix("https://h.example/"), "");
        assert_eq!(
            url_path_prefix("https://h.example:8443/consoles"),
            "consoles/"
        );
        assert_eq!(url_path_prefix("http://h/a/b/"), "a/b/");
        assert_eq!(ws_base("https://h/x"), "wss://h/x");
        assert_eq!(ws_base("http://h:1"), "ws://h:1");
    }
}
