//! One console session (a leaf): identity, port, token, target with its generation, the live
//! viewers' records, and the Session object the API shows (DESIGN.md "Control API", Session).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::relay::{CloseReason, Traffic};

mod info;
mod limits;
use crate::state::{SessionRecord, TokenRecord};
use crate::target::Target;
pub use info::{PublicBase, SessionInfo, UrlStyle, ViewerInfo};
pub use limits::{MAX_LIMIT, MIN_LIMIT_SECS, SessionLimits, duration_text, parse_limit};

/// The session table by vm_id, as the registry keeps it and the public port reads it:
/// sharded, so no lock is shared by every connection.
pub type SessionTable = Arc<dashmap::DashMap<String, Arc<Session>>>;

/// Whether `vm_id` matches `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}` (DESIGN.md "Control API"):
/// the registry's check on open, and the public port's on a path.
pub fn is_vm_id(vm_id: &str) -> bool {
    let bytes = vm_id.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// 192 random bits, hex: unguessable and safe in a URL without escaping.
pub(crate) fn new_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The wall clock as token lifetimes see it: the system time, shifted by however far tokio's
/// clock is from the real one. In the daemon the two are the same clock, so this is the
/// system time; tests pause tokio's clock (time stands still) and advance it (tokens expire
/// without waiting).
pub fn wall_now() -> SystemTime {
    let tokio_now = tokio::time::Instant::now().into_std();
    let real_now = std::time::Instant::now();
    let system = SystemTime::now();
    match tokio_now.checked_duration_since(real_now) {
        Some(ahead) => system.checked_add(ahead).unwrap_or(system),
        None => system
            .checked_sub(real_now.duration_since(tokio_now))
            .unwrap_or(system),
    }
}

/// `t` without its fraction of a second.
fn whole_seconds(t: SystemTime) -> SystemTime {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => SystemTime::UNIX_EPOCH + Duration::from_secs(d.as_secs()),
        Err(_) => t,
    }
}

/// A session's token and when it stops admitting new connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionToken {
    pub value: String,
    /// `None`: never (no `--token-ttl`).
    pub expires_at: Option<SystemTime>,
}

impl SessionToken {
    /// A new random token that lives `ttl` from now (or forever).
    pub fn issue(ttl: Option<Duration>) -> SessionToken {
        SessionToken {
            value: new_token(),
            // Whole seconds, as the state file keeps it: a restart changes nothing. Config caps
            // the TTL at ten years; an overflow would be a never-expiring token.
            expires_at: ttl.and_then(|ttl| whole_seconds(wall_now()).checked_add(ttl)),
        }
    }

    pub fn is_expired(&self) -> bool {
        self.expires_at.is_some_and(|at| at <= wall_now())
    }
}

/// The verdict on a token a client presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenCheck {
    Valid,
    /// The session's current token, past its `expires_at` (403 `token_expired`).
    Expired,
    /// Missing or not this session's token (403 `forbidden`).
    Wrong,
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
    /// Ends this viewer's relay alone; a child of its target generation's token.
    pub cancel: CancellationToken,
    /// Set when an operator disconnected it (1008 `disconnected by operator`).
    kicked: AtomicBool,
}

impl Viewer {
    /// Whether [`Session::kick`] ended this viewer.
    pub fn was_kicked(&self) -> bool {
        self.kicked.load(Ordering::SeqCst)
    }
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
        // Under the viewers' lock: a reader of the totals sees these bytes either as the live
        // viewer's or as ended, never both.
        let mut viewers = lock(&self.session.viewers);
        let t = &self.viewer.traffic;
        let s = &self.session.ended_traffic;
        s.to_client
            .fetch_add(t.to_client.load(Ordering::Relaxed), Ordering::Relaxed);
        s.to_server
            .fetch_add(t.to_server.load(Ordering::Relaxed), Ordering::Relaxed);
        viewers.remove(&self.viewer.id);
    }
}

#[derive(Debug)]
struct TargetSlot {
    target: Target,
    token: SessionToken,
    /// This session's record in the state file, serialised once per target: a write of 800
    /// sessions then copies bytes instead of formatting and serialising 800 records.
    record: Arc<[u8]>,
    generation: u64,
    /// Bumped only when the target changes (a retarget or its undo), unlike `generation`,
    /// which a token revocation bumps too: the cleanup pass's failure clock follows this.
    target_epoch: u64,
    /// Cancelled when this generation is replaced; a child of the session's token.
    cancel: CancellationToken,
}

/// What undoes a retarget.
pub(crate) struct RetargetUndo {
    old_target: Target,
    pub(crate) old_cancel: CancellationToken,
}

/// The target a connection should use, and the token that ends it when the target changes.
pub struct TargetTicket {
    pub target: Target,
    pub generation: u64,
    pub cancel: CancellationToken,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here is a few assignments; a panic cannot leave them torn.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One console session.
#[derive(Debug)]
pub struct Session {
    pub vm_id: String,
    /// The pool port; `None` with `--session-ports off` (served on the public port only).
    pub port: Option<u16>,
    pub created_at: SystemTime,
    pub limits: SessionLimits,
    /// Target, token and the record they make; one lock, so the record always matches.
    target: Mutex<TargetSlot>,
    /// Connections of generations below this were ended by a token revocation (1008).
    revoked_below: AtomicU64,
    cancel: CancellationToken,
    root: CancellationToken,
    closed: AtomicBool,
    viewers: Mutex<HashMap<u64, Arc<Viewer>>>,
    next_viewer: AtomicU64,
    ended_traffic: Traffic,
    listener_task: Mutex<Option<JoinHandle<()>>>,
}

impl Session {
    /// A session on `port` whose cancellation is a child of `root` (the daemon's). Not yet
    /// served: the registry starts its server and hands the task to [`Session::set_server_task`].
    pub fn new(
        vm_id: &str,
        port: Option<u16>,
        token: SessionToken,
        created_at: SystemTime,
        target: Target,
        limits: SessionLimits,
        root: &CancellationToken,
    ) -> Arc<Session> {
        let cancel = root.child_token();
        let record = render_record(vm_id, &target, port, &token, created_at, limits);
        Arc::new(Session {
            vm_id: vm_id.to_owned(),
            port,
            created_at,
            limits,
            revoked_below: AtomicU64::new(0),
            target: Mutex::new(TargetSlot {
                target,
                token,
                record,
                generation: 0,
                target_epoch: 0,
                cancel: cancel.child_token(),
            }),
            cancel,
            root: root.clone(),
            closed: AtomicBool::new(false),
            viewers: Mutex::new(HashMap::new()),
            next_viewer: AtomicU64::new(1),
            ended_traffic: Traffic::default(),
            listener_task: Mutex::new(None),
        })
    }

    /// The task serving this session's port; [`Session::stop`] waits for it.
    pub fn set_server_task(&self, task: JoinHandle<()>) {
        *lock(&self.listener_task) = Some(task);
    }

    /// This session's record in the state file, serialised once per target.
    pub fn record(&self) -> Arc<[u8]> {
        Arc::clone(&lock(&self.target).record)
    }

    pub fn target(&self) -> Target {
        lock(&self.target).target.clone()
    }

    /// The target and how many times it changed (retargets and their undos; not token
    /// revocations), read together: the cleanup pass ties a target's failures to both.
    pub fn target_with_epoch(&self) -> (Target, u64) {
        let slot = lock(&self.target);
        (slot.target.clone(), slot.target_epoch)
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

    /// A clone of the token that fires when the session closes or the daemon shuts down.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Fires when the session closes or the daemon shuts down.
    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// The current token.
    pub fn token(&self) -> SessionToken {
        lock(&self.target).token.clone()
    }

    /// Checks a presented token in constant time (the time taken says nothing about how much
    /// of a guess was right). Only the current token is valid: a rotated one is `Wrong`.
    pub fn check_token(&self, candidate: &str) -> TokenCheck {
        let token = self.token();
        if !bool::from(candidate.as_bytes().ct_eq(token.value.as_bytes())) {
            TokenCheck::Wrong
        } else if token.is_expired() {
            TokenCheck::Expired
        } else {
            TokenCheck::Valid
        }
    }

    /// Puts `token` in place (new connections need it at once) and returns the old one.
    pub(crate) fn replace_token(&self, token: SessionToken) -> SessionToken {
        let mut slot = lock(&self.target);
        slot.record = self.render(&slot.target, &token);
        std::mem::replace(&mut slot.token, token)
    }

    /// Ends every live viewer with 1008 `token revoked`; new connections are untouched.
    pub(crate) fn revoke_viewers(&self) {
        let mut slot = lock(&self.target);
        let old = std::mem::replace(&mut slot.cancel, self.cancel.child_token());
        slot.generation += 1;
        self.revoked_below.store(slot.generation, Ordering::SeqCst);
        old.cancel();
    }

    /// The close for a connection of target `generation` whose ticket was cancelled: why did
    /// it end?
    pub fn cancel_reason(&self, generation: u64) -> CloseReason {
        if self.root.is_cancelled() {
            CloseReason::Restarting
        } else if self.closed.load(Ordering::SeqCst) {
            CloseReason::SessionClosed
        } else if generation < self.revoked_below.load(Ordering::SeqCst) {
            CloseReason::TokenRevoked
        } else {
            CloseReason::Retargeted
        }
    }

    /// Registers a viewer of target generation `ticket` unless `cap` viewers are live already.
    pub fn add_viewer(
        self: &Arc<Self>,
        peer: SocketAddr,
        cap: usize,
        ticket: &TargetTicket,
    ) -> Option<ViewerGuard> {
        let mut viewers = lock(&self.viewers);
        if viewers.len() >= cap {
            return None;
        }
        let viewer = Arc::new(Viewer {
            id: self.next_viewer.fetch_add(1, Ordering::Relaxed),
            peer,
            started_at: SystemTime::now(),
            traffic: Traffic::default(),
            cancel: ticket.cancel.child_token(),
            kicked: AtomicBool::new(false),
        });
        viewers.insert(viewer.id, Arc::clone(&viewer));
        Some(ViewerGuard {
            session: Arc::clone(self),
            viewer,
        })
    }

    /// Disconnects one live viewer (1008 `disconnected by operator`); false when no viewer has
    /// that id. The session and its other viewers are untouched.
    pub fn kick(&self, viewer_id: u64) -> bool {
        let Some(viewer) = lock(&self.viewers).get(&viewer_id).cloned() else {
            return false;
        };
        viewer.kicked.store(true, Ordering::SeqCst);
        viewer.cancel.cancel();
        true
    }

    /// Bytes relayed over the session's life, `(to_client, to_server)`: ended viewers and the
    /// live ones so far.
    pub fn traffic_totals(&self) -> (u64, u64) {
        let live = lock(&self.viewers);
        let (mut to_client, mut to_server) = (
            self.ended_traffic.to_client.load(Ordering::Relaxed),
            self.ended_traffic.to_server.load(Ordering::Relaxed),
        );
        for v in live.values() {
            to_client += v.traffic.to_client.load(Ordering::Relaxed);
            to_server += v.traffic.to_server.load(Ordering::Relaxed);
        }
        (to_client, to_server)
    }

    pub fn viewer_count(&self) -> usize {
        lock(&self.viewers).len()
    }

    /// Points new connections at `target`. The old generation's token is handed back, not
    /// cancelled: the caller cancels it once the change is durable, or restores it.
    pub(crate) fn retarget(&self, target: Target) -> Option<RetargetUndo> {
        let mut slot = lock(&self.target);
        if slot.target == target {
            return None;
        }
        slot.record = self.render(&target, &slot.token);
        let old_target = std::mem::replace(&mut slot.target, target);
        let old_cancel = std::mem::replace(&mut slot.cancel, self.cancel.child_token());
        slot.generation += 1;
        slot.target_epoch += 1;
        Some(RetargetUndo {
            old_target,
            old_cancel,
        })
    }

    /// Undoes a retarget whose write failed: connections made to the new target end, the old
    /// ones never noticed.
    pub(crate) fn restore_target(&self, undo: RetargetUndo) {
        let mut slot = lock(&self.target);
        slot.cancel.cancel();
        slot.record = self.render(&undo.old_target, &slot.token);
        slot.target = undo.old_target;
        slot.cancel = undo.old_cancel;
        slot.generation += 1;
        slot.target_epoch += 1;
    }

    /// Tells the listener and viewers to end, without waiting.
    pub(crate) fn begin_stop(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.cancel.cancel();
    }

    /// Ends the session: viewers get 1001 `session closed` (on their own tasks: a slow viewer
    /// does not hold up the close), and the listener is closed (its port back in the pool)
    /// when this returns. The relays stop counting bytes as they are cancelled, so the
    /// session's totals are final from here on.
    pub(crate) async fn stop(&self) {
        self.begin_stop();
        let task = lock(&self.listener_task).take();
        if let Some(task) = task
            && let Err(err) = task.await
        {
            warn!(vm_id = %self.vm_id, port = self.port, %err, "session listener task failed");
        }
    }

    /// This session's state file record with `target` and `token`.
    fn render(&self, target: &Target, token: &SessionToken) -> Arc<[u8]> {
        render_record(
            &self.vm_id,
            target,
            self.port,
            token,
            self.created_at,
            self.limits,
        )
    }
}

/// One session's record, as the state file holds it.
fn render_record(
    vm_id: &str,
    target: &Target,
    port: Option<u16>,
    token: &SessionToken,
    created_at: SystemTime,
    limits: SessionLimits,
) -> Arc<[u8]> {
    let record = SessionRecord {
        vm_id: vm_id.to_owned(),
        target: target.to_string(),
        ws_port: port,
        tokens: vec![TokenRecord {
            value: token.value.clone(),
            expires_at: token.expires_at.map(rfc3339),
        }],
        created_at: rfc3339(created_at),
        idle_timeout: limits.idle_timeout.map(duration_text),
        max_lifetime: limits.max_lifetime.map(duration_text),
    };
    // A struct of strings and a number: serialising it cannot fail.
    serde_json::to_vec(&record).unwrap_or_default().into()
}

/// RFC 3339 in UTC, whole seconds. humantime cannot write years past 9999; such a time (only
/// from a hand-edited state file) is written as the latest it can.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if write!(out, "{}", humantime::format_rfc3339_seconds(t)).is_err() {
        out = "9999-12-31T23:59:59Z".into();
    }
    out
}

#[cfg(test)]
mod tests;
