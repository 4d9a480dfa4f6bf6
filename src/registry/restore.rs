//! Putting a state file's sessions back at start (DESIGN.md "State file"): each on its old
//! port with its token, expiry and limits, or moved and reported when it cannot be.

use std::time::SystemTime;

use tracing::{info, warn};

use super::{PortChoice, SessionRegistry, validate_vm_id};
use crate::session::{SessionLimits, SessionToken, lock, parse_limit};
use crate::state::SessionRecord;
use crate::target::Target;

impl SessionRegistry {
    /// Puts the sessions of a state file back, each on its old port with its old token. A
    /// session whose port is taken (or outside the range) moves to another port; one that
    /// cannot be served is dropped. Both are logged and reported in status, never silent.
    /// Returns whether the table is what the file says: every record back as it was written.
    pub fn restore(&self, records: Vec<SessionRecord>) -> bool {
        let stored = records.len();
        let mut restored = 0usize;
        let mut degraded = Vec::new();
        let mut homeless = Vec::new();
        // Sessions that had a port and lost it to --session-ports off (their old URLs fail).
        let mut unported = Vec::new();
        // Sessions written with --session-ports off that get a pool port now.
        let mut ported = Vec::new();
        // First every session that can have its old port, so no moved session takes a port
        // another one is about to claim back.
        for r in records {
            let target = match (validate_vm_id(&r.vm_id), r.target.parse::<Target>()) {
                (Ok(()), Ok(t)) => t,
                (Err(e), _) => {
                    degraded.push(format!("state file session dropped: {e}"));
                    continue;
                }
                (_, Err(e)) => {
                    degraded.push(format!("session {} dropped: {e}", r.vm_id));
                    continue;
                }
            };
            // The file keeps the current token first; validation refused a file without one.
            let Some(token) = r.tokens.first().map(|t| SessionToken {
                value: t.value.clone(),
                expires_at: t
                    .expires_at
                    .as_deref()
                    .and_then(|at| humantime::parse_rfc3339(at).ok()),
            }) else {
                degraded.push(format!("session {} dropped: it has no token", r.vm_id));
                continue;
            };
            let created_at =
                humantime::parse_rfc3339(&r.created_at).unwrap_or_else(|_| SystemTime::now());
            // Validation refused a file with a bad limit; a missing one is no limit.
            let limit = |text: &Option<String>| {
                text.as_ref()
                    .and_then(|t| parse_limit(&serde_json::Value::String(t.clone())).ok())
            };
            let limits = SessionLimits {
                idle_timeout: limit(&r.idle_timeout),
                max_lifetime: limit(&r.max_lifetime),
            };
            let choice = match (self.ctx.session_ports, r.ws_port) {
                (false, old) => {
                    if let Some(port) = old {
                        unported.push(format!("{} (port {port})", r.vm_id));
                    }
                    PortChoice::None { capped: false }
                }
                (true, Some(port)) => PortChoice::Restore(port),
                (true, None) => PortChoice::AnyUncapped,
            };
            let had_port = r.ws_port.is_some();
            match self.start_session(
                &r.vm_id,
                target.clone(),
                token.clone(),
                created_at,
                limits,
                choice,
            ) {
                Ok(s) => {
                    restored += 1;
                    self.watch_lifetime(&s);
                    if self.ctx.session_ports && !had_port {
                        ported.push(format!("{} (port {})", r.vm_id, port_text(s.port)));
                    }
                    info!(vm_id = %r.vm_id, port = s.port, "session restored");
                }
                Err(err) if had_port => homeless.push((r, target, token, created_at, limits, err)),
                Err(err) => {
                    let why = format!(
                        "session {} (written with --session-ports off) dropped at restart: no pool port: {err}",
                        r.vm_id
                    );
                    warn!(vm_id = %r.vm_id, "{why}");
                    degraded.push(why);
                }
            }
        }
        for (r, target, token, created_at, limits, first) in homeless {
            match self.start_session(&r.vm_id, target, token, created_at, limits, PortChoice::Any) {
                Ok(s) => {
                    self.watch_lifetime(&s);
                    let why = format!(
                        "session {} moved from port {} to {} after restart ({first}); URLs with the old port no longer work",
                        r.vm_id,
                        port_text(r.ws_port),
                        port_text(s.port)
                    );
                    warn!(vm_id = %r.vm_id, port = s.port, old_port = r.ws_port, "{why}");
                    degraded.push(why);
                }
                Err(second) => {
                    let why = format!(
                        "session {} (port {}) dropped at restart ({first}); no other port: {second}",
                        r.vm_id,
                        port_text(r.ws_port)
                    );
                    warn!(vm_id = %r.vm_id, old_port = r.ws_port, "{why}");
                    degraded.push(why);
                }
            }
        }
        if !unported.is_empty() {
            let why = format!(
                "{} sessions had session ports and are now served on the public port only (--session-ports off); URLs with their old ports no longer work: {}",
                unported.len(),
                a_few(&unported)
            );
            warn!("{why}");
            degraded.push(why);
        }
        if !ported.is_empty() {
            let why = format!(
                "{} sessions written with --session-ports off got session ports at restart; their url and ws_url changed: {}",
                ported.len(),
                a_few(&ported)
            );
            warn!("{why}");
            degraded.push(why);
        }
        if self.len() > self.max_sessions() {
            let why = format!(
                "{} sessions were restored but --max-sessions is {}: all are kept, new opens fail until enough close",
                self.len(),
                self.max_sessions()
            );
            warn!("{why}");
            degraded.push(why);
        }
        let unchanged = degraded.is_empty() && restored == stored;
        lock(&self.degraded).extend(degraded);
        unchanged
    }
}

/// A record's port for messages: `none` for a session without one.
fn port_text(port: Option<u16>) -> String {
    port.map_or_else(|| "none".to_owned(), |p| p.to_string())
}

/// The first few of `names`, and how many more: a log line and a status warning stay short
/// when ten thousand sessions are concerned.
fn a_few(names: &[String]) -> String {
    let named = names.len().min(5);
    let mut text = names[..named].join(", ");
    if names.len() > named {
        text.push_str(&format!(" and {} more", names.len() - named));
    }
    text
}
