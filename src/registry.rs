//! The session table: open, retarget and close console sessions, with rollback, and the
//! coordination with the durable state file (DESIGN.md "Data flow").
//!
//! A session owns a pool port (through its server task), a token, a target with a generation,
//! and the records of its live viewers. Opening is atomic: a failure after the bind drops the
//! lease and leaves no entry and no task behind.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

use dashmap::DashMap;

use crate::events;
use crate::metrics::{CloseCause, Metrics};
use crate::pool::{PoolError, PortPool};
use crate::server::{self, ServerContext};
pub use crate::session::SessionTable;
use crate::session::{Session, SessionLimits, SessionToken, UrlStyle, lock, rfc3339, wall_now};
use crate::state::{self, CommitError, CommitStats, Committer};
use crate::target::{Target, TargetError};

mod lifetime;
mod open;
mod restore;

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
    #[error(
        "{field}: session {vm_id:?} was opened with {have}; an open of an existing session cannot change its limits (close it and open it again)"
    )]
    LimitChange {
        vm_id: String,
        field: &'static str,
        have: String,
    },
    #[error("session {vm_id:?} has no live viewer {viewer} (see its \"viewers\")")]
    ViewerNotFound { vm_id: String, viewer: String },
    #[error("{0}; the change was rolled back")]
    Coordination(CommitError),
}

/// `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`
pub fn validate_vm_id(vm_id: &str) -> Result<(), SessionError> {
    if crate::session::is_vm_id(vm_id) {
        Ok(())
    } else {
        Err(SessionError::InvalidVmId(vm_id.to_owned()))
    }
}

/// What an open did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    Created,
    Unchanged,
    Retargeted,
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
    /// Warnings other parts set and clear by key (a refused config reload, libvirt away).
    extra_warnings: Mutex<std::collections::BTreeMap<&'static str, String>>,
    /// Told of every close (the libvirt follower: a session closed through the API stays
    /// closed).
    close_watchers: Mutex<Vec<tokio::sync::mpsc::UnboundedSender<(String, CloseCause)>>>,
    /// Itself, for the tasks that close a session at its `max_lifetime`.
    me: Weak<SessionRegistry>,
    /// `--max-sessions` with `--session-ports off` (the pool's cap otherwise); a reload
    /// changes it.
    portless_cap: std::sync::atomic::AtomicUsize,
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
    /// Any free port of the pool, the cap not checked: a restart gives a session written with
    /// `--session-ports off` a port, and never drops it for the cap.
    AnyUncapped,
    /// No port (`--session-ports off`): served on the public port only. `capped`: an open,
    /// held to `--max-sessions`; a restore is not.
    None { capped: bool },
}

impl SessionRegistry {
    /// Starts the registry and its state writer (which stops with `ctx.root`).
    pub fn new(
        pool: Arc<PortPool>,
        ctx: Arc<ServerContext>,
        state_path: PathBuf,
        max_sessions: usize,
    ) -> Arc<Self> {
        Arc::new_cyclic(|weak: &Weak<SessionRegistry>| {
            let snap = weak.clone();
            let failed = weak.clone();
            let metrics = Arc::clone(&ctx.metrics);
            let commit_stats = Arc::new(CommitStats::default());
            let committer = state::spawn_writer(
                state_path.clone(),
                move || snap.upgrade().map(|r| r.snapshot()),
                move |result| {
                    if let Some(r) = failed.upgrade() {
                        let us = r
                            .commit_stats
                            .last_write_us
                            .load(std::sync::atomic::Ordering::Relaxed);
                        metrics.state_written(std::time::Duration::from_micros(us));
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
                extra_warnings: Mutex::new(std::collections::BTreeMap::new()),
                close_watchers: Mutex::new(Vec::new()),
                me: weak.clone(),
                portless_cap: std::sync::atomic::AtomicUsize::new(max_sessions),
            }
        })
    }

    /// How console URLs are written: the page served and the scheme of the session ports.
    pub fn url_style(&self) -> UrlStyle {
        UrlStyle {
            bundled_page: self.ctx.web.is_bundled(),
            tls: self.ctx.tls.is_some(),
            public: self.ctx.public.clone(),
        }
    }

    /// Whether sessions get pool ports (`--session-ports on`).
    pub fn session_ports(&self) -> bool {
        self.ctx.session_ports
    }

    /// The most sessions at once: the pool's cap, or `--max-sessions` with
    /// `--session-ports off`.
    pub fn max_sessions(&self) -> usize {
        if self.ctx.session_ports {
            self.pool.cap()
        } else {
            self.portless_cap.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    /// A reload's `--max-sessions` with `--session-ports off` (the pool takes its own).
    pub fn set_max_sessions(&self, max_sessions: usize) {
        self.portless_cap
            .store(max_sessions, std::sync::atomic::Ordering::Relaxed);
    }

    /// The table by vm_id, for the public port's routing.
    pub fn table(&self) -> SessionTable {
        Arc::clone(&self.by_vm)
    }

    /// The daemon's counters and histograms.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.ctx.metrics
    }

    pub fn pool(&self) -> &Arc<PortPool> {
        &self.pool
    }

    /// The pool's counts, all zero with `--session-ports off` (no port is ever bound).
    pub fn pool_stats(&self) -> crate::pool::PoolStats {
        if self.ctx.session_ports {
            self.pool.stats()
        } else {
            crate::pool::PoolStats::default()
        }
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

    /// Tells `watcher` of every close from now on: `(vm_id, cause)` once the close is on disk.
    pub fn watch_closes(&self, watcher: tokio::sync::mpsc::UnboundedSender<(String, CloseCause)>) {
        lock(&self.close_watchers).push(watcher);
    }

    /// Disconnects one viewer of `vm_id` (`DELETE /v1/sessions/{vm_id}/viewers/{viewer_id}`):
    /// it gets 1008 `disconnected by operator`; the session and its other viewers stay.
    pub fn kick(&self, vm_id: &str, viewer: &str) -> Result<(), SessionError> {
        let session = self
            .get(vm_id)
            .ok_or_else(|| SessionError::NotFound(vm_id.to_owned()))?;
        let not_found = || SessionError::ViewerNotFound {
            vm_id: vm_id.to_owned(),
            viewer: viewer.to_owned(),
        };
        let id: u64 = viewer.parse().map_err(|_| not_found())?;
        if !session.kick(id) {
            return Err(not_found());
        }
        events::viewer_kicked(vm_id, session.port, id);
        Ok(())
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

    /// Bytes relayed by the sessions in the table, `(to_client, to_server)`, summed in place
    /// (no sorted copy of the table, as [`SessionRegistry::list`] makes).
    pub fn traffic_totals(&self) -> (u64, u64) {
        self.by_vm.iter().fold((0, 0), |(c, s), e| {
            let (tc, ts) = e.value().traffic_totals();
            (c + tc, s + ts)
        })
    }

    pub fn connection_count(&self) -> usize {
        self.by_vm.iter().map(|e| e.value().viewer_count()).sum()
    }

    /// Closes the session once its removal is on disk: live viewers get 1001 `session
    /// closed`, and the port is back in the pool (bindable again) when this returns.
    pub async fn close(&self, vm_id: &str) -> Result<(), SessionError> {
        if self.close_if(vm_id, CloseCause::Deleted, |_| true).await? {
            Ok(())
        } else {
            Err(SessionError::NotFound(vm_id.to_owned()))
        }
    }

    /// [`SessionRegistry::close`] when `still` holds for the session once its vm_id is locked
    /// (cleanup: no viewer connected meanwhile). `Ok(false)`: no session, or `still` said no.
    pub async fn close_if(
        &self,
        vm_id: &str,
        cause: CloseCause,
        still: impl FnOnce(&Session) -> bool,
    ) -> Result<bool, SessionError> {
        let _guard = self.lock_vm(vm_id).await;
        let Some(session) = self.get(vm_id) else {
            return Ok(false);
        };
        if !still(&session) {
            return Ok(false);
        }
        let Some((_, session)) = self.by_vm.remove(vm_id) else {
            return Ok(false);
        };
        let (table, kept) = (Arc::clone(&self.by_vm), Arc::clone(&session));
        let rollback = Box::new(move || {
            table.entry(kept.vm_id.clone()).or_insert(kept);
        });
        if let Err(err) = self.committer.commit(rollback).await {
            return Err(SessionError::Coordination(err));
        }
        session.stop().await;
        let (to_client, to_server) = session.traffic_totals();
        self.ctx.metrics.session_closed(cause, to_client, to_server);
        events::session_closed(vm_id, session.port, &session.target(), cause.label());
        lock(&self.close_watchers).retain(|w| w.send((vm_id.to_owned(), cause)).is_ok());
        Ok(true)
    }

    /// The state file's bytes for the table as it is, sessions ordered by port (unique, and
    /// cheaper to sort than names: this runs once per write), port-less ones by vm_id.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut records: Vec<(Option<u16>, Arc<Session>)> = self
            .by_vm
            .iter()
            .map(|e| (e.port, Arc::clone(e.value())))
            .collect();
        records.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.vm_id.cmp(&b.1.vm_id)));
        let records: Vec<Arc<[u8]>> = records.iter().map(|(_, s)| s.record()).collect();
        state::render(records.iter().map(|r| &r[..]))
    }

    /// Shows a failed write in status and in the write-failure metric; the next write that
    /// succeeds clears the warning (the writer does).
    pub fn note_write_failure(&self, err: &CommitError) {
        self.commit_stats
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *lock(&self.write_failure) = Some(format!(
            "state write failed at {}: {err}",
            rfc3339(SystemTime::now())
        ));
    }

    /// [`SessionRegistry::write_now`] at start, telling a full disk (ENOSPC, EDQUOT: `true`)
    /// from other failures (a missing or read-only directory: `false`).
    pub async fn first_write(&self) -> Result<(), (CommitError, bool)> {
        let doc = self.snapshot();
        let path = self.state_path.clone();
        match tokio::task::spawn_blocking(move || state::write_bytes_atomic(&path, doc)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                let full = matches!(e.raw_os_error(), Some(28 | 122));
                Err((
                    CommitError(format!("{}: {e}", self.state_path.display())),
                    full,
                ))
            }
            Err(e) => Err((CommitError(e.to_string()), false)),
        }
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

    /// `notAfter` of the session ports' certificate (with `--cert`).
    pub fn cert_not_after(&self) -> Option<SystemTime> {
        self.ctx.tls.as_ref().and_then(|t| t.not_after())
    }

    /// Sets (or clears, with `None`) the status warning under `key`: a refused config
    /// reload ("config"), libvirt unreachable ("libvirt").
    pub fn set_warning(&self, key: &'static str, warning: Option<String>) {
        let mut all = lock(&self.extra_warnings);
        match warning {
            Some(w) => {
                all.insert(key, w);
            }
            None => {
                all.remove(key);
            }
        }
    }

    /// Requests answered 429 by the failed-token limit since start.
    pub fn rate_limited(&self) -> u64 {
        self.ctx.access.failures.refused()
    }

    /// Reasons for `system_health: warning` beyond the session count.
    pub fn warnings(&self) -> Vec<String> {
        let mut all = lock(&self.degraded).clone();
        if let Some(tls) = self.ctx.tls.as_ref().and_then(|t| t.warning()) {
            all.push(tls);
        }
        if let Some(f) = lock(&self.write_failure).clone() {
            all.push(f);
        }
        all.extend(lock(&self.extra_warnings).values().cloned());
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
}
