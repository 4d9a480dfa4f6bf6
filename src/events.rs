//! The audit trail (DESIGN.md "Cleanup, metrics, events"): one structured line per viewer
//! connect and disconnect and per change made through the API (open, retarget, rotate, kick,
//! close, cleanup), and the log sink they go to (`--log-format text|json`, `--log-level`).
//!
//! Every event is logged at info under the tracing target `vncgate::events` with an `event`
//! field naming it, so a pipeline picks them out of the JSON log with
//! `jq 'select(.target == "vncgate::events")'`, and `--log-level info,vncgate::events=off`
//! silences them. The VNC side is the field `vnc_target` (`target` is the tracing target in
//! JSON lines).

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use tracing::info;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::LogFormat;
use crate::target::Target;

/// The tracing target of every event line.
pub const TARGET: &str = "vncgate::events";

/// A viewer's WebSocket was accepted and its relay starts (`event = "viewer_connect"`).
pub fn viewer_connected(
    vm_id: &str,
    port: Option<u16>,
    viewer: u64,
    peer: SocketAddr,
    target: &Target,
    tls: bool,
) {
    info!(target: TARGET, event = "viewer_connect", vm_id, port, viewer, peer = %peer, vnc_target = %target, tls, "viewer connected");
}

/// How a viewer's relay ended, for [`viewer_disconnected`].
#[derive(Debug)]
pub struct ViewerEnd<'a> {
    pub vm_id: &'a str,
    pub port: Option<u16>,
    pub viewer: u64,
    pub peer: SocketAddr,
    pub duration: Duration,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    /// The close code sent; `None` when the connection was gone (nothing could be sent).
    pub code: Option<u16>,
    /// The close reason sent, or why the connection was gone.
    pub reason: &'a str,
}

/// A viewer's relay ended (`event = "viewer_disconnect"`); a fault of the VNC side (1011) is
/// logged at warn.
pub fn viewer_disconnected(end: &ViewerEnd<'_>) {
    let duration_ms = u64::try_from(end.duration.as_millis()).unwrap_or(u64::MAX);
    let code = end.code.map_or(-1, i64::from);
    if end.code == Some(1011) {
        tracing::warn!(target: TARGET, event = "viewer_disconnect", vm_id = end.vm_id, port = end.port, viewer = end.viewer, peer = %end.peer, duration_ms, bytes_to_client = end.bytes_to_client, bytes_to_server = end.bytes_to_server, code, reason = end.reason, "viewer disconnected");
    } else {
        info!(target: TARGET, event = "viewer_disconnect", vm_id = end.vm_id, port = end.port, viewer = end.viewer, peer = %end.peer, duration_ms, bytes_to_client = end.bytes_to_client, bytes_to_server = end.bytes_to_server, code, reason = end.reason, "viewer disconnected");
    }
}

/// A session was opened (`event = "session_open"`).
pub fn session_opened(vm_id: &str, port: Option<u16>, target: &Target) {
    info!(target: TARGET, event = "session_open", vm_id, port, vnc_target = %target, "session opened");
}

/// A session's target changed (`event = "session_retarget"`).
pub fn session_retargeted(vm_id: &str, port: Option<u16>, target: &Target) {
    info!(target: TARGET, event = "session_retarget", vm_id, port, vnc_target = %target, "session retargeted");
}

/// A session got a new token (`event = "session_rotate"`).
pub fn token_rotated(vm_id: &str, port: Option<u16>, disconnect: bool, renewed_by_open: bool) {
    info!(target: TARGET, event = "session_rotate", vm_id, port, disconnect, renewed_by_open, "session token rotated");
}

/// An operator disconnected one viewer (`event = "viewer_kick"`).
pub fn viewer_kicked(vm_id: &str, port: Option<u16>, viewer: u64) {
    info!(target: TARGET, event = "viewer_kick", vm_id, port, viewer, "viewer disconnected by operator");
}

/// A session was closed (`event = "session_close"`): `reason` is `deleted`, `target_gone` or
/// `max_lifetime`.
pub fn session_closed(vm_id: &str, port: Option<u16>, target: &Target, reason: &str) {
    info!(target: TARGET, event = "session_close", vm_id, port, vnc_target = %target, reason, "session closed");
}

/// A cleanup pass ended (`event = "cleanup"`). A periodic pass that closed nothing is logged
/// at debug only: every 30 s would be noise.
pub fn cleanup_finished(checked: usize, closed: usize, duration: Duration, requested: bool) {
    let duration_ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
    if closed > 0 || requested {
        info!(target: TARGET, event = "cleanup", checked, closed, duration_ms, requested, "cleanup pass");
    } else {
        tracing::debug!(target: TARGET, event = "cleanup", checked, closed, duration_ms, requested, "cleanup pass");
    }
}

/// Changes the filter of the installed log sink (SIGHUP re-reads `--log-level`).
#[derive(Debug, Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// Puts `level` (a tracing filter, `None`: `RUST_LOG`, else `info`) in place.
    pub fn set_level(&self, level: Option<&str>) -> Result<(), String> {
        let filter = filter_for(level)?;
        self.handle
            .reload(filter)
            .map_err(|err| format!("cannot change the log level: {err}"))
    }
}

fn filter_for(level: Option<&str>) -> Result<EnvFilter, String> {
    match level {
        Some(l) => EnvFilter::try_new(l).map_err(|err| format!("bad log level {l:?}: {err}")),
        None => Ok(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))),
    }
}

/// Installs the process's log sink on stderr: text (colour only on a terminal) or one JSON
/// object a line with the event's fields at the top level. Errors if `level` is not a filter
/// or a sink is installed already.
pub fn install(format: LogFormat, level: Option<&str>) -> Result<LogControl, String> {
    let (filter, handle) = reload::Layer::new(filter_for(level)?);
    let sink = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(sink)
        .try_init()
        .map_err(|err| format!("cannot install the log sink: {err}"))?;
    Ok(LogControl { handle })
}
