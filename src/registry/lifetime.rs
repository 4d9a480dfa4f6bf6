//! The `max_lifetime` of a session: a tracked task per limited session that closes it at
//! `created_at + max_lifetime` (wall clock), as a DELETE would.

use std::sync::Arc;

use tracing::warn;

use super::SessionRegistry;
use crate::metrics::CloseCause;
use crate::session::{Session, wall_now};

/// The longest a `max_lifetime` timer sleeps before it looks at the wall clock again.
const LIFETIME_STEP: std::time::Duration = std::time::Duration::from_secs(60);
/// How soon a `max_lifetime` close whose state write failed is tried again.
const LIFETIME_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

impl SessionRegistry {
    /// Closes `session` at its `max_lifetime`, as a DELETE would (viewers get 1001 `session
    /// closed`). The task is tracked and ends with the session or the daemon. A close whose
    /// state write fails is tried again (every [`LIFETIME_RETRY`]) until it is on disk.
    pub(super) fn watch_lifetime(&self, session: &Arc<Session>) {
        let Some(closes_at) = session.limits.closes_at(session.created_at) else {
            return;
        };
        let (me, session) = (self.me.clone(), Arc::clone(session));
        self.ctx.tracker.spawn(async move {
            // Wall-clock deadline (a restart resumes it, a passed one fires at once), slept in
            // steps so a clock step or a suspended host moves the close with closes_at.
            while let Ok(left) = closes_at.duration_since(wall_now()) {
                if left.is_zero() {
                    break;
                }
                tokio::select! {
                    _ = session.cancelled() => return,
                    _ = tokio::time::sleep(left.min(LIFETIME_STEP)) => {}
                }
            }
            loop {
                let Some(registry) = me.upgrade() else {
                    return;
                };
                let vm_id = session.vm_id.clone();
                let result = registry
                    .close_if(&vm_id, CloseCause::MaxLifetime, |s| {
                        std::ptr::eq(s, Arc::as_ptr(&session))
                    })
                    .await;
                drop(registry);
                let Err(err) = result else {
                    return;
                };
                warn!(
                    vm_id,
                    port = session.port,
                    %err,
                    "session past its max_lifetime could not be closed; trying again"
                );
                tokio::select! {
                    _ = session.cancelled() => return,
                    _ = tokio::time::sleep(LIFETIME_RETRY) => {}
                }
            }
        });
    }
}
