//! The session registry: open, retarget and close console sessions, with rollback.
//!
//! A session owns a pool port (through its listener task), a token, a target with a generation,
//! and the records of its live viewers. Opening is atomic: a failure after the bind drops the
//! lease and leaves no entry and no task behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pool::{PoolError, PortPool};
use crate::relay::{Target, TargetError, Traffic};
use crate::server::{self, ServerContext};

/// Why a registry call failed; the API maps each to a status and code.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(
        "invalid vm_id {0:?}: expected 1-128 characters of A-Z a-z 0-9 . _ : -, starting with a letter or digit"
    )]
    InvalidVmId(String),
    #[error(transparent)]
    InvalidTarget(#[from] TargetError),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("cannot serve port {port}: {source}")]
    Listener { port: u16, source: std::io::Error },
    #[error("no session for vm_id {0:?}")]
    NotFound(String),
}

/// `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`
pub fn validate_vm_id(vm_id: &str) -> Result<(), SessionError> {
    let bytes = vm_id.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SessionError::InvalidVmId(vm_id.to_owned()))
    }
}

/// 192 random bits, hex: unguessable and safe in a URL without escaping.
fn new_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What an open did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    Unchanged,
    Retargeted,
}

/// One live viewer of a session.
#[derive(Debug)]
pub struct Viewer {
    pub id: u64,
    pub peer: SocketAddr,
    pub started_at: SystemTime,
    pub traffic: Traffic,
}

/// Removes its viewer from the session when the connection ends, keeping its byte counts.
pub struct ViewerGuard {
    session: Arc<Session>,
    viewer: Arc<Viewer>,
}

impl ViewerGuard {
    pub fn viewer(&self) -> &Viewer {
        &self.viewer
    }
}

impl Drop for ViewerGuard {
    fn drop(&mut self) {
        let t = &self.viewer.traffic;
        let s = &self.session.ended_traffic;
        s.to_client
            .fetch_add(t.to_client.load(Ordering::Relaxed), Ordering::Relaxed);
        s.to_server
            .fetch_add(t.to_server.load(Ordering::Relaxed), Ordering::Relaxed);
        lock(&self.session.viewers).remove(&self.viewer.id);
    }
}

#[derive(Debug)]
struct TargetSlot {
    target: Target,
    generation: u64,
    /// Cancelled when this generation is replaced; a child of the session's token.
    cancel: CancellationToken,
}

/// The target a connection should use, and the token that ends it when the target changes.
pub struct TargetTicket {
    pub target: Target,
    pub generation: u64,
    pub cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few assignments; a panic cannot leave them torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One console session.
#[derive(Debug)]
pub struct Session {
    pub vm_id: String,
    pub port: u16,
    pub token: String,
    pub created_at: SystemTime,
    target: Mutex<TargetSlot>,
    cancel: CancellationToken,
    root: CancellationToken,
    closed: AtomicBool,
    viewers: Mutex<HashMap<u64, Arc<Viewer>>>,
    next_viewer: AtomicU64,
    ended_traffic: Traffic,
    listener_task: Mutex<Option<JoinHandle<()>>>,
}

impl Session {
    pub fn target(&self) -> Target {
        lock(&self.target).target.clone()
    }

    /// The current target for a new connection.
    pub fn ticket(&self) -> TargetTicket {
        let slot = lock(&self.target);
        TargetTicket {
            target: slot.target.clone(),
            generation: slot.generation,
            cancel: slot.cancel.clone(),
        }
    }

    /// Fires when the session closes or the daemon shuts down.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// Constant-time: the time taken says nothing about how much of a guess was right.
    pub fn token_matches(&self, candidate: &str) -> bool {
        bool::from(candidate.as_bytes().ct_eq(self.token.as_bytes()))
    }

    /// The close frame for a connection whose ticket was cancelled: why did it end?
    pub fn cancel_frame(&self) -> (u16, &'static str) {
        if self.root.is_cancelled() {
            (1001, "vncgate restarting")
        } else if self.closed.load(Ordering::SeqCst) {
            (1001, "session closed")
        } else {
            (1012, "VNC target changed")
        }
    }

    /// Registers a viewer unless `cap` viewers are live already.
    pub fn add_viewer(self: &Arc<Self>, peer: SocketAddr, cap: usize) -> Option<ViewerGuard> {
        let mut viewers = lock(&self.viewers);
        if viewers.len() >= cap {
            return None;
        }
        let viewer = Arc::new(Viewer {
            id: self.next_viewer.fetch_add(1, Ordering::Relaxed),
            peer,
            started_at: SystemTime::now(),
            traffic: Traffic::default(),
        });
        viewers.insert(viewer.id, Arc::clone(&viewer));
        Some(ViewerGuard {
            session: Arc::clone(self),
            viewer,
        })
    }

    pub fn viewer_count(&self) -> usize {
        lock(&self.viewers).len()
    }

    /// Replaces the target; connections of older generations (connects in flight included)
    /// end with 1012. Returns false when the target was already this one.
    fn retarget(&self, target: Target) -> bool {
        let mut slot = lock(&self.target);
        if slot.target == target {
            return false;
        }
        slot.cancel.cancel();
        slot.target = target;
        slot.generation += 1;
        slot.cancel = self.cancel.child_token();
        true
    }

    /// A snapshot for the API. `host` is what console URLs name.
    pub fn info(&self, host: &str, bundled_page: bool) -> SessionInfo {
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
        let live_to_client: u64 = viewers.iter().map(|v| v.bytes_to_client).sum();
        let live_to_server: u64 = viewers.iter().map(|v| v.bytes_to_server).sum();
        let authority = format!("{host}:{}", self.port);
        SessionInfo {
            vm_id: self.vm_id.clone(),
            target: self.target(),
            ws_port: self.port,
            url: if bundled_page {
                // The fragment never reaches a server or proxy log.
                format!("http://{authority}/vnc.html#token={}", self.token)
            } else {
                // Another app (Debian's noVNC) reads the WebSocket path from the query.
                format!(
                    "http://{authority}/vnc.html?autoconnect=1&path=websockify%3Ftoken%3D{}",
                    self.token
                )
            },
            ws_url: format!("ws://{authority}/websockify?token={}", self.token),
            token: self.token.clone(),
            created_at: rfc3339(self.created_at),
            connections: viewers.len(),
            bytes_to_client: self.ended_traffic.to_client.load(Ordering::Relaxed) + live_to_client,
            bytes_to_server: self.ended_traffic.to_server.load(Ordering::Relaxed) + live_to_server,
            viewers,
        }
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The Session object of the API.
#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub vm_id: String,
    pub target: Target,
    pub ws_port: u16,
    pub url: String,
    pub ws_url: String,
    pub token: String,
    pub created_at: String,
    /// Live viewers.
    pub connections: usize,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    /// One record per live viewer.
    pub viewers: Vec<ViewerInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ViewerInfo {
    pub id: u64,
    pub peer: String,
    pub started_at: String,
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
}

/// All sessions of the daemon, by vm_id.
pub struct SessionRegistry {
    pool: Arc<PortPool>,
    by_vm: DashMap<String, Arc<Session>>,
    ctx: Arc<ServerContext>,
}

impl SessionRegistry {
    pub fn new(pool: Arc<PortPool>, ctx: Arc<ServerContext>) -> Arc<Self> {
        Arc::new(SessionRegistry {
            pool,
            by_vm: DashMap::new(),
            ctx,
        })
    }

    /// True when session ports serve the bundled console page (it takes the token from `#`).
    pub fn bundled_page(&self) -> bool {
        self.ctx.web.is_bundled()
    }

    pub fn pool(&self) -> &Arc<PortPool> {
        &self.pool
    }

    /// Opens a session for `vm_id`, or returns the existing one (retargeted if `target` differs).
    pub fn open(&self, vm_id: &str, target: &str) -> Result<(Arc<Session>, Opened), SessionError> {
        validate_vm_id(vm_id)?;
        let target: Target = target.parse()?;
        // The entry's shard lock makes concurrent opens of one vm_id agree; nothing awaits
        // while it is held.
        match self.by_vm.entry(vm_id.to_owned()) {
            Entry::Occupied(e) => {
                let session = Arc::clone(e.get());
                drop(e);
                if session.retarget(target.clone()) {
                    info!(vm_id, port = session.port, %target, "session retargeted");
                    Ok((session, Opened::Retargeted))
                } else {
                    Ok((session, Opened::Unchanged))
                }
            }
            Entry::Vacant(e) => {
                let (lease, listener) = self.pool.allocate()?;
                let port = lease.port();
                let cancel = self.ctx.root.child_token();
                let session = Arc::new(Session {
                    vm_id: vm_id.to_owned(),
                    port,
                    token: new_token(),
                    created_at: SystemTime::now(),
                    target: Mutex::new(TargetSlot {
                        target: target.clone(),
                        generation: 0,
                        cancel: cancel.child_token(),
                    }),
                    cancel,
                    root: self.ctx.root.clone(),
                    closed: AtomicBool::new(false),
                    viewers: Mutex::new(HashMap::new()),
                    next_viewer: AtomicU64::new(1),
                    ended_traffic: Traffic::default(),
                    listener_task: Mutex::new(None),
                });
                // On error the lease and listener drop here: the port goes back to the pool.
                let task = server::spawn_session_server(
                    listener,
                    lease,
                    Arc::clone(&session),
                    Arc::clone(&self.ctx),
                )
                .map_err(|source| SessionError::Listener { port, source })?;
                *lock(&session.listener_task) = Some(task);
                e.insert(Arc::clone(&session));
                info!(vm_id, port, %target, "session opened");
                Ok((session, Opened::Created))
            }
        }
    }

    pub fn get(&self, vm_id: &str) -> Option<Arc<Session>> {
        self.by_vm.get(vm_id).map(|s| Arc::clone(s.value()))
    }

    /// Every session, ordered by vm_id.
    pub fn list(&self) -> Vec<Arc<Session>> {
        let mut all: Vec<Arc<Session>> = self.by_vm.iter().map(|e| Arc::clone(e.value())).collect();
        all.sort_by(|a, b| a.vm_id.cmp(&b.vm_id));
        all
    }

    pub fn len(&self) -> usize {
        self.by_vm.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_vm.is_empty()
    }

    pub fn connection_count(&self) -> usize {
        self.by_vm.iter().map(|e| e.value().viewer_count()).sum()
    }

    /// Closes the session: live viewers get 1001 `session closed`, and the port is back in the
    /// pool (bindable again) when this returns.
    pub async fn close(&self, vm_id: &str) -> Result<(), SessionError> {
        let (_, session) = self
            .by_vm
            .remove(vm_id)
            .ok_or_else(|| SessionError::NotFound(vm_id.to_owned()))?;
        session.closed.store(true, Ordering::SeqCst);
        session.cancel.cancel();
        let task = lock(&session.listener_task).take();
        if let Some(task) = task
            && let Err(err) = task.await
        {
            warn!(vm_id, port = session.port, %err, "session listener task failed");
        }
        info!(vm_id, port = session.port, "session closed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids() {
        let long = "a".repeat(128);
        for ok in ["a", "vm-1", "VM_2.x:y", "0abc", long.as_str()] {
            assert!(validate_vm_id(ok).is_ok(), "{ok}");
        }
        let too_long = "a".repeat(129);
        for bad in [
            "",
            ".vm",
            "-vm",
            "vm/1",
            "vm 1",
            "vm\n",
            "é",
            too_long.as_str(),
        ] {
            assert!(validate_vm_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 48);
        assert_ne!(a, b);
    }
}
