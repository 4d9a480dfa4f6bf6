//! The cleanup pass (DESIGN.md "Cleanup, metrics, events"): sessions without a live viewer
//! whose VNC target has failed every check for `--stale-after` are closed as if deleted, with
//! reason `target gone`. A check connects to the target and reads the RFB greeting within
//! [`PROBE_TIMEOUT`], at most [`MAX_PROBES`] at once. Runs every `--cleanup-interval` and on
//! `POST /v1/cleanup`; one pass at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::CloseCause;
use crate::registry::SessionRegistry;
use crate::session::{Session, lock, rfc3339, wall_now};
use crate::target::{Target, TargetStream};

/// A check must connect and read the greeting within this.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Checks in flight at once: a pass over n sessions takes at most ceil(n / 256) x 2 s.
pub const MAX_PROBES: usize = 256;
/// The close reason a cleanup gives.
pub const TARGET_GONE: &str = "target gone";

/// One session a pass closed.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ClosedSession {
    pub vm_id: String,
    pub target: String,
    pub reason: String,
    /// When its target first failed a check (RFC 3339).
    pub failing_since: String,
}

/// What a pass did (`POST /v1/cleanup`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CleanupReport {
    /// Sessions whose target was checked (those without a live viewer).
    pub checked: usize,
    pub closed: Vec<ClosedSession>,
    pub duration_ms: u64,
    /// When the pass ended (RFC 3339).
    pub finished_at: String,
}

/// A target failing since: tokio's clock for the span, the wall clock for the report.
///
/// It belongs to one session (not to its vm_id) and one target epoch: a session closed and
/// opened again under the same vm_id between two passes, or retargeted away and back, starts
/// over rather than inheriting the old failure time and being closed at its first check. A
/// token rotation changes neither, so it does not postpone the close.
#[derive(Debug, Clone)]
struct Failing {
    /// The session the record is about; a `Weak` keeps its allocation, so no later session
    /// can have the same address while the record exists.
    session: Weak<Session>,
    target: Target,
    epoch: u64,
    since: Instant,
    since_wall: SystemTime,
}

impl Failing {
    /// Whether this record is about `session` at target epoch `epoch`.
    fn is_for(&self, session: &Session, epoch: u64) -> bool {
        std::ptr::eq(self.session.as_ptr(), session) && self.epoch == epoch
    }
}

/// The cleanup of one daemon: what has been failing, and the last report.
pub struct Cleanup {
    registry: Arc<SessionRegistry>,
    /// The daemon's shutdown: a pass in progress (periodic or from the API) stops probing.
    stop: CancellationToken,
    stale_after: Duration,
    /// By vm_id; an entry for another session or target epoch starts over.
    failing: Mutex<HashMap<String, Failing>>,
    /// One pass at a time; a caller that waited for a running pass takes its report.
    running: tokio::sync::Mutex<()>,
    passes: AtomicU64,
    last: Mutex<Option<CleanupReport>>,
}

/// Whether `target` answers like a VNC server: it accepts and sends `RFB ` within the timeout.
pub async fn probe(target: &Target) -> bool {
    check(target).await == Some(true)
}

/// [`probe`], with `None` when the check could not be made because vncgate itself is out of
/// file descriptors: that says nothing about the target, and must not close its session.
async fn check(target: &Target) -> Option<bool> {
    let greeted = async {
        let mut greeting = [0u8; 4];
        let read = match target.connect().await? {
            TargetStream::Tcp(mut s) => s.read_exact(&mut greeting).await,
            TargetStream::Unix(mut s) => s.read_exact(&mut greeting).await,
        };
        read.map(|_| greeting == *b"RFB ")
    };
    match tokio::time::timeout(PROBE_TIMEOUT, greeted).await {
        Ok(Ok(ok)) => Some(ok),
        Ok(Err(err)) if crate::target::out_of_descriptors(&err) => None,
        Ok(Err(_)) | Err(_) => Some(false),
    }
}

impl Cleanup {
    pub fn new(
        registry: Arc<SessionRegistry>,
        stale_after: Duration,
        stop: CancellationToken,
    ) -> Arc<Cleanup> {
        Arc::new(Cleanup {
            registry,
            stop,
            stale_after,
            failing: Mutex::new(HashMap::new()),
            running: tokio::sync::Mutex::new(()),
            passes: AtomicU64::new(0),
            last: Mutex::new(None),
        })
    }

    /// The last pass's report, if any pass ran.
    pub fn last_report(&self) -> Option<CleanupReport> {
        lock(&self.last).clone()
    }

    /// Runs a pass now. If one is running, waits for it and returns its report instead of
    /// running a second.
    /// `requested`: asked for through the API (logged at info even when nothing closed).
    pub async fn run(&self, requested: bool) -> CleanupReport {
        let seen = self.passes.load(Ordering::SeqCst);
        let _pass = self.running.lock().await;
        if self.passes.load(Ordering::SeqCst) != seen
            && let Some(report) = self.last_report()
        {
            return report;
        }
        let report = self.pass().await;
        crate::events::cleanup_finished(
            report.checked,
            report.closed.len(),
            Duration::from_millis(report.duration_ms),
            requested,
        );
        *lock(&self.last) = Some(report.clone());
        self.passes.fetch_add(1, Ordering::SeqCst);
        report
    }

    async fn pass(&self) -> CleanupReport {
        let started = Instant::now();
        let idle: Vec<_> = self
            .registry
            .list()
            .into_iter()
            .filter(|s| s.viewer_count() == 0)
            .collect();
        let checked = idle.len();
        let results: Vec<(Arc<Session>, Target, u64, Option<bool>)> =
            futures_util::stream::iter(idle)
                .map(|s| async move {
                    let (target, epoch) = s.target_with_epoch();
                    let ok = check(&target).await;
                    (s, target, epoch, ok)
                })
                .buffer_unordered(MAX_PROBES)
                .take_until(self.stop.cancelled())
                .collect()
                .await;
        if self.stop.is_cancelled() {
            // Shutting down: half a pass closes nothing.
            return CleanupReport {
                checked,
                closed: Vec::new(),
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                finished_at: rfc3339(wall_now()),
            };
        }
        let now = Instant::now();
        let mut stale = Vec::new();
        {
            let mut failing = lock(&self.failing);
            // Sessions that are gone (or were replaced), or have a viewer now, start over.
            failing.retain(|vm_id, entry| {
                self.registry.get(vm_id).is_some_and(|s| {
                    std::ptr::eq(entry.session.as_ptr(), Arc::as_ptr(&s)) && s.viewer_count() == 0
                })
            });
            for (session, target, epoch, ok) in results {
                let vm_id = session.vm_id.clone();
                match ok {
                    Some(true) => {
                        failing.remove(&vm_id);
                        continue;
                    }
                    // Not checked (vncgate out of descriptors): neither good nor bad.
                    None => continue,
                    Some(false) => {}
                }
                let fresh = || Failing {
                    session: Arc::downgrade(&session),
                    target: target.clone(),
                    epoch,
                    since: now,
                    since_wall: wall_now(),
                };
                let entry = failing.entry(vm_id.clone()).or_insert_with(fresh);
                if !entry.is_for(&session, epoch) {
                    *entry = fresh();
                }
                if now.duration_since(entry.since) >= self.stale_after {
                    stale.push((vm_id, entry.clone()));
                }
            }
        }
        let mut closed = Vec::new();
        for (vm_id, failing) in stale {
            // A viewer that connected during the pass keeps the session, and a session that was
            // replaced or retargeted meanwhile is not the one that failed.
            let Some(session) = self.registry.get(&vm_id) else {
                continue;
            };
            let unchanged = |s: &Session| failing.is_for(s, s.target_with_epoch().1);
            if session.viewer_count() > 0 || !unchanged(&session) {
                continue;
            }
            match self
                .registry
                .close_if(&vm_id, CloseCause::TargetGone, |s| {
                    s.viewer_count() == 0 && unchanged(s)
                })
                .await
            {
                Ok(true) => {
                    lock(&self.failing).remove(&vm_id);
                    info!(
                        vm_id,
                        port = session.port,
                        target = %failing.target,
                        failing_since = %rfc3339(failing.since_wall),
                        "its VNC target failed every check for --stale-after"
                    );
                    closed.push(ClosedSession {
                        vm_id,
                        target: failing.target.to_string(),
                        reason: TARGET_GONE.into(),
                        failing_since: rfc3339(failing.since_wall),
                    });
                }
                Ok(false) => {}
                Err(err) => {
                    warn!(vm_id, %err, "cleanup could not close a stale session; next pass tries again")
                }
            }
        }
        CleanupReport {
            checked,
            closed,
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            finished_at: rfc3339(wall_now()),
        }
    }

    /// Runs a pass every `interval` until the daemon shuts down.
    pub async fn run_every(self: Arc<Self>, interval: Duration) {
        let stop = self.stop.clone();
        let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
        // A pass that overran its interval is not followed by a burst of catch-up passes.
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.run(false) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_probe_wants_an_rfb_greeting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let target: Target = listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("target");
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for greeting in [&b"RFB 003.008\n"[..], b"HTTP/1.1 200"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                s.write_all(greeting).await.expect("write");
            }
        });
        assert!(probe(&target).await, "a VNC server");
        assert!(!probe(&target).await, "something else");
        server.await.expect("server");
        let closed: Target = "127.0.0.1:1".parse().expect("target");
        assert!(!probe(&closed).await, "nothing listening");
        let missing: Target = "unix:/nonexistent/vnc.sock".parse().expect("target");
        assert!(!probe(&missing).await);
    }
}
