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
//! - [`sessions`]: the session registry: open, retarget and close, with rollback.
//! - [`state`]: the durable state file: atomic writes, group commit, load, lock.
//! - [`server`]: one session port: accept loop, HTTP routing, WebSocket upgrade, token check.
//! - [`relay`]: WebSocket <-> VNC byte relay with backpressure, and VNC target parsing.
//! - [`web`]: console page assets: lookup, MIME types, caching.
//! - [`ws`]: WebSocket framing for the relay: lazy, zero-copy frame reader and writer.
//! - [`api`]: control API handlers and the JSON error mapping.
//! - [`daemon`]: wires the pieces into a running daemon and shuts it down.
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
