//! vncgate: one async daemon that puts the VNC consoles of many VMs into the browser.
//!
//! A control API opens a console session for a VM: the daemon binds a free port of its pool,
//! holds that listener for the life of the session, and relays WebSocket frames arriving on it,
//! byte for byte, to the VM's VNC server. No child processes, no probe-then-bind.
//!
//! # Layout
//!
//! - [`config`]: flags, environment and TOML file resolved into a validated [`Config`].
//! - [`pool`]: the port range, bind-on-allocate, release and stats.
//! - [`session`]: one session (a leaf): identity, target generation, tokens, limits, viewers.
//! - [`registry`]: the session table: open, retarget and close with rollback; restore.
//! - [`target`]: VNC target parsing and connecting (tcp, `[v6]`, `unix:`).
//! - [`state`]: the durable state file: atomic writes, group commit, load, lock.
//! - [`http`]: the one accept loop and HTTP/1.1 serving of every port (TLS, limits, drain).
//! - [`tls`]: certificate loading and reload.
//! - [`access`]: token check, Origin policy, rate limits, API bearer auth.
//! - [`server`]: routing on a session port: page, `/session`, WebSocket upgrade.
//! - [`relay`]: WebSocket <-> VNC byte relay with backpressure; the close table.
//! - [`ws`]: RFC 6455 framing over any stream: lazy, zero-copy frame reader and writer.
//! - [`web`]: console page assets: lookup, MIME types, caching, security headers.
//! - [`api`]: control API handlers, error mapping, status, metrics, the OpenAPI document.
//! - [`cleanup`]: the periodic cleanup pass and its report.
//! - [`metrics`]: counters, histograms and the Prometheus text.
//! - [`events`]: the structured viewer/session events and the log sink.
//! - `libvirt` (feature `libvirt`): sessions that follow libvirt domains.
//! - [`daemon`]: wires the pieces into a running daemon, reloads and shuts it down.
//! - [`client`]: the CLI's client of the control API.
#![forbid(unsafe_code)]

pub mod access;
pub mod api;
pub mod cleanup;
pub mod client;
pub mod config;
pub mod daemon;
pub mod events;
pub mod http;
#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod metrics;
pub mod pool;
pub mod registry;
pub mod relay;
pub mod server;
pub mod session;
pub mod state;
pub mod target;
pub mod tls;
pub mod web;
pub mod ws;

pub use config::Config;
pub use daemon::{Daemon, DaemonError, raise_nofile_limit};
pub use registry::{SessionError, SessionRegistry};
pub use target::Target;
