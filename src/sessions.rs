//! The session registry: open, retarget and close console sessions, with rollback.
//!
//! A session owns a pool port (through its listener task), a token, a target with a generation,
//! and the records of its live viewers. Opening is atomic: a failure after the bind drops the
//! lease and leaves no entry and no task behind.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use dashmap::DashMap;
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::pool::{PoolError, PortPool};
use crate::relay::{Target, TargetError, Traffic};
use crate::server::{self, ServerContext};
use crate::state::{self, CommitError, CommitStats, Committer, SessionRecord, TokenRecord};

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
    #[error("{0}; the change was rolled back")]
    Coordination(CommitError),
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
    /// This session's record in the state file, serialised once per target: a write of 800
    /// sessions then copies bytes instead of formatting and serialising 800 records.
    record: Arc<[u8]>,
    generation: u64,
    /// Cancelled when this generation is replaced; a child of the session's token.
    cancel: CancellationToken,
}

/// What undoes a retarget.
struct RetargetUndo {
    old_target: Target,
    old_cancel: CancellationToken,
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

    /// Points new connections at `target`. The old generation's token is handed back, not
    /// cancelled: the caller cancels it once the change is durable, or restores it.
    fn retarget(&self, target: Target) -> Option<RetargetUndo> {
        let mut slot = lock(&self.target);
        if slot.target == target {
            return None;
        }
        slot.record = render_record(
            self.vm_id.as_str(),
            &target,
            self.port,
            &self.token,
            self.created_at,
        );
        let old_target = std::mem::replace(&mut slot.target, target);
        let old_cancel = std::mem::replace(&mut slot.cancel, self.cancel.child_token());
        slot.generation += 1;
        Some(RetargetUndo {
            old_target,
            old_cancel,
        })
    }

    /// Undoes a retarget whose write failed: connections made to the new target end, the old
    /// ones never noticed.
    fn restore_target(&self, undo: RetargetUndo) {
        let mut slot = lock(&self.target);
        slot.cancel.cancel();
        slot.record = render_record(
            self.vm_id.as_str(),
            &undo.old_target,
            self.port,
            &self.token,
            self.created_at,
        );
        slot.target = undo.old_target;
        slot.cancel = undo.old_cancel;
        slot.generation += 1;
    }

    /// Tells the listener and viewers to end, without waiting.
    fn begin_stop(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Ends the session: viewers get 1001 `session closed`, and the listener is closed (its
    /// port back in the pool) when this returns.
    async fn stop(&self) {
        self.begin_stop();
        let task = lock(&self.listener_task).take();
        if let Some(task) = task
            && let Err(err) = task.await
        {
            warn!(vm_id = %self.vm_id, port = self.port, %err, "session listener task failed");
        }
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

/// One session's record, as the state file holds it.
fn render_record(
    vm_id: &str,
    target: &Target,
    port: u16,
    token: &str,
    created_at: SystemTime,
) -> Arc<[u8]> {
    let record = SessionRecord {
        vm_id: vm_id.to_owned(),
        target: target.to_string(),
        ws_port: port,
        tokens: vec![TokenRecord {
            value: token.to_owned(),
            expires_at: None,
        }],
        created_at: rfc3339(created_at),
    };
    // A struct of strings and a number: serialising it cannot fail.
    serde_json::to_vec(&record).unwrap_or_default().into()
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

/// All sessions of the daemon, by vm_id, and their durable copy.
pub struct SessionRegistry {
    pool: Arc<PortPool>,
    /// Shared with the undo closures a failed write runs.
    by_vm: Arc<DashMap<String, Arc<Session>>>,
    /// Serialises open/retarget/close of one vm_id across the commit's await; different VMs
    /// proceed together and share writes.
    vm_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    ctx: Arc<ServerContext>,
    committer: Committer,
    commit_stats: Arc<CommitStats>,
    state_path: PathBuf,
    /// Lasting reasons for `system_health: warning` (sessions moved at restart, ...).
    degraded: Mutex<Vec<String>>,
    /// The last failed state write, cleared by the next good one.
    write_failure: Mutex<Option<String>>,
}

/// Holds one vm_id's lock; forgets the lock entry when nobody else waits for it.
struct VmGuard<'a> {
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
    locks: &'a DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    vm_id: &'a str,
}

impl Drop for VmGuard<'_> {
    fn drop(&mut self) {
        self.guard.take();
        self.locks
            .remove_if(self.vm_id, |_, m| Arc::strong_count(m) == 1);
    }
}

/// How a session being started gets its port.
enum PortChoice {
    /// Any free port of the pool, within the cap.
    Any,
    /// The port it had before a restart (the cap does not apply: a restart never drops a
    /// session it can still serve).
    Restore(u16),
}

impl SessionRegistry {
    /// Starts the registry and its state writer (which stops with `ctx.root`).
    pub fn new(pool: Arc<PortPool>, ctx: Arc<ServerContext>, state_path: PathBuf) -> Arc<Self> {
        Arc::new_cyclic(|weak: &Weak<SessionRegistry>| {
            let snap = weak.clone();
            let failed = weak.clone();
            let commit_stats = Arc::new(CommitStats::default());
            let committer = state::spawn_writer(
                state_path.clone(),
                move || snap.upgrade().map(|r| r.snapshot()),
                move |result| {
                    if let Some(r) = failed.upgrade() {
                        *lock(&r.write_failure) = result.err().map(|err| {
                            format!(
                                "state write failed at {}: {err}",
                                rfc3339(SystemTime::now())
                            )
                        });
                    }
                },
                Arc::clone(&commit_stats),
                &ctx.tracker,
                ctx.root.clone(),
            );
            SessionRegistry {
                pool,
                by_vm: Arc::new(DashMap::new()),
                vm_locks: DashMap::new(),
                ctx,
                committer,
                commit_stats,
                state_path,
                degraded: Mutex::new(Vec::new()),
                write_failure: Mutex::new(None),
            }
        })
    }

    /// True when session ports serve the bundled console page (it takes the token from `#`).
    pub fn bundled_page(&self) -> bool {
        self.ctx.web.is_bundled()
    }

    pub fn pool(&self) -> &Arc<PortPool> {
        &self.pool
    }

    pub fn state_path(&self) -> &std::path::Path {
        &self.state_path
    }

    pub fn commit_stats(&self) -> &CommitStats {
        &self.commit_stats
    }

    async fn lock_vm<'a>(&'a self, vm_id: &'a str) -> VmGuard<'a> {
        let mutex = Arc::clone(self.vm_locks.entry(vm_id.to_owned()).or_default().value());
        VmGuard {
            guard: Some(mutex.lock_owned().await),
            locks: &self.vm_locks,
            vm_id,
        }
    }

    /// Binds a port, starts the session's server and enters it in the table (not yet durable).
    fn start_session(
        &self,
        vm_id: &str,
        target: Target,
        token: String,
        created_at: SystemTime,
        port: PortChoice,
    ) -> Result<Arc<Session>, SessionError> {
        let (lease, listener) = match port {
            PortChoice::Any => self.pool.allocate()?,
            PortChoice::Restore(p) => self.pool.allocate_port(p)?,
        };
        let port = lease.port();
        let cancel = self.ctx.root.child_token();
        let record = render_record(vm_id, &target, port, &token, created_at);
        let session = Arc::new(Session {
            vm_id: vm_id.to_owned(),
            port,
            token,
            created_at,
            target: Mutex::new(TargetSlot {
                target,
                record,
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
        self.by_vm.insert(vm_id.to_owned(), Arc::clone(&session));
        Ok(session)
    }

    /// Opens a session for `vm_id`, or returns the existing one (retargeted if `target`
    /// differs). Returns once the change is on disk; a failed write rolls it back.
    pub async fn open(
        &self,
        vm_id: &str,
        target: &str,
    ) -> Result<(Arc<Session>, Opened), SessionError> {
        validate_vm_id(vm_id)?;
        let target: Target = target.parse()?;
        let _guard = self.lock_vm(vm_id).await;
        if let Some(session) = self.get(vm_id) {
            // Any earlier change of this VM finished (and was written) before we got the lock.
            let Some(undo) = session.retarget(target.clone()) else {
                return Ok((session, Opened::Unchanged));
            };
            // Whoever comes first takes it: the writer to undo, or we to finish.
            let undo = Arc::new(Mutex::new(Some(undo)));
            let (back, on_fail) = (Arc::clone(&session), Arc::clone(&undo));
            let rollback = Box::new(move || {
                if let Some(u) = lock(&on_fail).take() {
                    back.restore_target(u);
                }
            });
            if let Err(err) = self.committer.commit(rollback).await {
                return Err(SessionError::Coordination(err));
            }
            // Only now, with the new target on disk, do old viewers go.
            if let Some(u) = lock(&undo).take() {
                u.old_cancel.cancel();
            }
            info!(vm_id, port = session.port, %target, "session retargeted");
            return Ok((session, Opened::Retargeted));
        }
        let session = self.start_session(
            vm_id,
            target.clone(),
            new_token(),
            SystemTime::now(),
            PortChoice::Any,
        )?;
        let (table, gone) = (Arc::clone(&self.by_vm), Arc::clone(&session));
        let rollback = Box::new(move || {
            table.remove_if(&gone.vm_id, |_, s| Arc::ptr_eq(s, &gone));
            gone.begin_stop();
        });
        if let Err(err) = self.committer.commit(rollback).await {
            // Out of the table already; wait for the port to be free.
            session.stop().await;
            return Err(SessionError::Coordination(err));
        }
        info!(vm_id, port = session.port, %target, "session opened");
        Ok((session, Opened::Created))
    }

    /// Runs a change on its own tracked task: it finishes (written, or rolled back) even when
    /// the HTTP client that asked for it hangs up half way.
    pub async fn run_to_end<T, F>(
        self: &Arc<Self>,
        change: impl FnOnce(Arc<Self>) -> F,
    ) -> Result<T, SessionError>
    where
        F: std::future::Future<Output = Result<T, SessionError>> + Send + 'static,
        T: Send + 'static,
    {
        self.ctx
            .tracker
            .spawn(change(Arc::clone(self)))
            .await
            .map_err(|e| {
                SessionError::Coordination(CommitError(format!("the change did not finish: {e}")))
            })?
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

    /// Closes the session once its removal is on disk: live viewers get 1001 `session
    /// closed`, and the port is back in the pool (bindable again) when this returns.
    pub async fn close(&self, vm_id: &str) -> Result<(), SessionError> {
        let _guard = self.lock_vm(vm_id).await;
        let (_, session) = self
            .by_vm
            .remove(vm_id)
            .ok_or_else(|| SessionError::NotFound(vm_id.to_owned()))?;
        let (table, kept) = (Arc::clone(&self.by_vm), Arc::clone(&session));
        let rollback = Box::new(move || {
            table.entry(kept.vm_id.clone()).or_insert(kept);
        });
        if let Err(err) = self.committer.commit(rollback).await {
            return Err(SessionError::Coordination(err));
        }
        session.stop().await;
        info!(vm_id, port = session.port, "session closed");
        Ok(())
    }

    /// The state file's bytes for the table as it is, sessions ordered by port (unique, and
    /// cheaper to sort than names: this runs once per write).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut records: Vec<(u16, Arc<[u8]>)> = self
            .by_vm
            .iter()
            .map(|e| (e.port, Arc::clone(&lock(&e.target).record)))
            .collect();
        records.sort_unstable_by_key(|r| r.0);
        state::render(records.iter().map(|(_, r)| &r[..]))
    }

    /// Writes the table as it is (the last write at shutdown, after the writer stopped).
    pub async fn write_now(&self) -> Result<(), CommitError> {
        let doc = self.snapshot();
        let path = self.state_path.clone();
        tokio::task::spawn_blocking(move || state::write_bytes_atomic(&path, doc))
            .await
            .map_err(|e| CommitError(e.to_string()))?
            .map_err(|e| CommitError(format!("{}: {e}", self.state_path.display())))
    }

    /// Puts the sessions of a state file back, each on its old port with its old token. A
    /// session whose port is taken (or outside the range) moves to another port; one that
    /// cannot be served is dropped. Both are logged and reported in status, never silent.
    pub fn restore(&self, records: Vec<SessionRecord>) {
        let mut degraded = Vec::new();
        let mut homeless = Vec::new();
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
            let Some(token) = r
                .tokens
                .iter()
                .find(|t| t.expires_at.is_none())
                .map(|t| t.value.clone())
            else {
                degraded.push(format!("session {} dropped: it has no token", r.vm_id));
                continue;
            };
            let created_at =
                humantime::parse_rfc3339(&r.created_at).unwrap_or_else(|_| SystemTime::now());
            match self.start_session(
                &r.vm_id,
                target.clone(),
                token.clone(),
                created_at,
                PortChoice::Restore(r.ws_port),
            ) {
                Ok(s) => info!(vm_id = %r.vm_id, port = s.port, "session restored"),
                Err(err) => homeless.push((r, target, token, created_at, err)),
            }
        }
        for (r, target, token, created_at, first) in homeless {
            match self.start_session(&r.vm_id, target, token, created_at, PortChoice::Any) {
                Ok(s) => {
                    let why = format!(
                        "session {} moved from port {} to {} after restart ({first}); URLs with the old port no longer work",
                        r.vm_id, r.ws_port, s.port
                    );
                    warn!(vm_id = %r.vm_id, port = s.port, old_port = r.ws_port, "{why}");
                    degraded.push(why);
                }
                Err(second) => {
                    let why = format!(
                        "session {} (port {}) dropped at restart ({first}); no other port: {second}",
                        r.vm_id, r.ws_port
                    );
                    warn!(vm_id = %r.vm_id, old_port = r.ws_port, "{why}");
                    degraded.push(why);
                }
            }
        }
        if self.len() > self.pool.cap() {
            let why = format!(
                "{} sessions were restored but --max-sessions is {}: all are kept, new opens fail until enough close",
                self.len(),
                self.pool.cap()
            );
            warn!("{why}");
            degraded.push(why);
        }
        lock(&self.degraded).extend(degraded);
    }

    /// Reasons for `system_health: warning` beyond the session count.
    pub fn warnings(&self) -> Vec<String> {
        let mut all = lock(&self.degraded).clone();
        if let Some(f) = lock(&self.write_failure).clone() {
            all.push(f);
        }
        all
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
