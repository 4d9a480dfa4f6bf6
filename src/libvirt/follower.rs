//! The task that applies the poller's pictures to the session table: opens, closes,
//! retargets, and the memory of what it manages and what the API closed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{IdMode, LibvirtOptions, Memory, REAPPLY, RunKey, Running, STUCK_AFTER, Seen, WARNING};
use crate::metrics::CloseCause;
use crate::registry::{SessionRegistry, validate_vm_id};
use crate::session::SessionLimits;
use crate::target::Target;

/// The task that applies the thread's pictures to the session table.
pub(super) struct Follower {
    registry: Arc<SessionRegistry>,
    options: LibvirtOptions,
    memory: Memory,
    memory_path: PathBuf,
    /// Domains skipped (bad name, no VNC) already logged, so each is logged once per run.
    logged: HashSet<String>,
    /// libvirtd is away (or stuck): warned about.
    down: bool,
    /// The connection of the last picture applied; a new one makes the next a reconcile.
    connection: u64,
    /// The last picture of the running domains.
    domains: Vec<Running>,
    /// Milliseconds after `started` at which the thread last listed the domains.
    heartbeat: Arc<AtomicU64>,
    started: Instant,
}

impl Follower {
    pub(super) fn new(
        registry: Arc<SessionRegistry>,
        options: LibvirtOptions,
        memory: Memory,
        memory_path: PathBuf,
        heartbeat: Arc<AtomicU64>,
        started: Instant,
    ) -> Follower {
        Follower {
            registry,
            options,
            memory,
            memory_path,
            logged: HashSet::new(),
            down: false,
            connection: 0,
            domains: Vec::new(),
            heartbeat,
            started,
        }
    }

    pub(super) async fn run(
        &mut self,
        mut rx: watch::Receiver<Seen>,
        mut closes: mpsc::UnboundedReceiver<(String, CloseCause)>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(REAPPLY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let seen = rx.borrow_and_update().clone();
                    self.on_seen(seen).await;
                }
                Some((vm_id, cause)) = closes.recv() => self.on_close(vm_id, cause).await,
                _ = tick.tick() => self.on_tick().await,
            }
        }
    }

    async fn on_seen(&mut self, seen: Seen) {
        match seen {
            Seen::Connecting => {}
            Seen::Down(why) => self.set_down(Some(&why)),
            Seen::Up {
                domains,
                connection,
            } => {
                let fresh = connection != self.connection;
                if fresh {
                    info!(uri = %self.options.uri, domains = domains.len(), "libvirt connected; reconciling");
                }
                self.set_down(None);
                self.connection = connection;
                self.domains = domains;
                self.apply(fresh).await;
            }
        }
    }

    fn set_down(&mut self, why: Option<&str>) {
        match why {
            Some(why) => {
                if !self.down {
                    warn!(uri = %self.options.uri, error = %why, "libvirt unreachable; sessions stay open, reconnecting");
                }
                self.down = true;
                self.registry.set_warning(
                    WARNING,
                    Some(format!(
                        "libvirt at {} unreachable ({why}); consoles stay open, reconnecting",
                        self.options.uri
                    )),
                );
            }
            None => {
                self.down = false;
                self.registry.set_warning(WARNING, None);
            }
        }
    }

    /// Every [`REAPPLY`]: a stuck thread is reported; otherwise the last picture is applied
    /// again, so an open or close that failed is tried again.
    async fn on_tick(&mut self) {
        let beat = Duration::from_millis(self.heartbeat.load(Ordering::SeqCst));
        if !self.down && self.connection > 0 && self.started.elapsed() > beat + STUCK_AFTER {
            self.set_down(Some("libvirtd does not answer"));
            return;
        }
        if !self.down && self.connection > 0 {
            self.apply(false).await;
        }
    }

    /// A close through the API (or by cleanup or a max_lifetime) of a session this follower
    /// manages: it stays closed until its domain starts again.
    async fn on_close(&mut self, vm_id: String, cause: CloseCause) {
        if cause == CloseCause::DomainStopped {
            return;
        }
        if let Some(run) = self.memory.managed.remove(&vm_id) {
            info!(
                vm_id,
                reason = cause.label(),
                "session of a libvirt domain closed; not reopened until the domain starts again"
            );
            self.memory.suppressed.insert(vm_id, run);
            self.save().await;
        }
    }

    fn vm_id_of(&mut self, d: &Running) -> Option<String> {
        let vm_id = match self.options.id {
            IdMode::Name => d.name.clone(),
            IdMode::Uuid => d.run.uuid.clone(),
        };
        if let Err(err) = validate_vm_id(&vm_id) {
            if self
                .logged
                .insert(format!("id:{}:{}", d.run.uuid, d.run.id))
            {
                warn!(domain = %d.name, %err, "libvirt domain skipped: its name is not a valid vm_id; start with --libvirt-id uuid to use domain UUIDs as vm_ids");
            }
            return None;
        }
        Some(vm_id)
    }

    /// Brings the session table in line with the last picture: closes first (they free
    /// ports), all at once, then opens and retargets.
    async fn apply(&mut self, fresh: bool) {
        let before = self.memory.clone();
        let domains = self.domains.clone();
        let mut running: HashMap<String, (RunKey, Option<Target>)> = HashMap::new();
        for d in &domains {
            let Some(vm_id) = self.vm_id_of(d) else {
                continue;
            };
            let target = match &d.target {
                Ok(t) => t.clone(),
                Err(why) => {
                    if self
                        .logged
                        .insert(format!("vnc:{}:{}", d.run.uuid, d.run.id))
                    {
                        info!(domain = %d.name, vm_id, reason = %why, "libvirt domain skipped: no usable VNC endpoint");
                    }
                    None
                }
            };
            running.insert(vm_id, (d.run.clone(), target));
        }
        // Managed sessions whose domain stopped, or whose run changed between two looks (a
        // fresh session follows); at a reconcile a new run keeps its session (retargeted).
        let ending: Vec<String> = self
            .memory
            .managed
            .iter()
            .filter(|(vm, run)| match running.get(*vm) {
                None => true,
                Some((now, _)) => now != *run && !fresh,
            })
            .map(|(vm, _)| vm.clone())
            .collect();
        let registry = Arc::clone(&self.registry);
        let closes = ending.iter().map(|vm_id| {
            let registry = Arc::clone(&registry);
            async move {
                let r = registry
                    .close_if(vm_id, CloseCause::DomainStopped, |_| true)
                    .await;
                (vm_id.clone(), r)
            }
        });
        for (vm_id, result) in futures_util::future::join_all(closes).await {
            match result {
                Ok(_) => {
                    self.memory.managed.remove(&vm_id);
                }
                Err(err) => {
                    warn!(vm_id, %err, "the session of a stopped domain could not be closed; trying again")
                }
            }
        }
        // A suppression ends with the run it was for.
        self.memory
            .suppressed
            .retain(|vm_id, run| running.get(vm_id).is_some_and(|(now, _)| now == run));
        for (vm_id, (run, target)) in &running {
            if let Some(target) = target {
                self.follow(vm_id, run, target, fresh).await;
            }
        }
        if self.logged.len() > 10_000 {
            self.logged.clear();
        }
        if self.memory != before {
            self.save().await;
        }
    }

    /// One running domain with a VNC endpoint.
    async fn follow(&mut self, vm_id: &str, run: &RunKey, target: &Target, fresh: bool) {
        if self.memory.suppressed.get(vm_id) == Some(run) {
            return;
        }
        match self.registry.get(vm_id) {
            Some(session) => {
                if session.target() != *target {
                    // Adopted, or the endpoint moved: retargeted, port and token kept. Only
                    // an existing session: one closed meanwhile is not opened again here.
                    if let Err(err) = self.registry.retarget(vm_id, &target.to_string()).await {
                        self.log_failure(vm_id, run, target, &err);
                        return;
                    }
                }
                self.memory.managed.insert(vm_id.to_owned(), run.clone());
            }
            None if !fresh && self.memory.managed.get(vm_id) == Some(run) => {
                // Gone while its domain runs and we did not close it: closed through the API
                // (its close event may still be on the way). At a reconcile, by contrast, a
                // missing session (a state file started empty) is opened again.
                self.memory.managed.remove(vm_id);
                self.memory.suppressed.insert(vm_id.to_owned(), run.clone());
            }
            None => match self
                .registry
                .open(vm_id, &target.to_string(), SessionLimits::default())
                .await
            {
                Ok(_) => {
                    self.memory.managed.insert(vm_id.to_owned(), run.clone());
                }
                Err(err) => self.log_failure(vm_id, run, target, &err),
            },
        }
    }

    fn log_failure(
        &mut self,
        vm_id: &str,
        run: &RunKey,
        target: &Target,
        err: &dyn std::fmt::Display,
    ) {
        if self.logged.insert(format!("open:{vm_id}:{}:{err}", run.id)) {
            warn!(vm_id, %target, %err, "session for a libvirt domain could not be opened; trying again every second");
        }
    }

    async fn save(&self) {
        let Ok(bytes) = serde_json::to_vec_pretty(&self.memory) else {
            return;
        };
        let path = self.memory_path.clone();
        let result =
            tokio::task::spawn_blocking(move || crate::state::write_bytes_atomic(&path, bytes))
                .await;
        if !matches!(result, Ok(Ok(()))) {
            warn!(path = %self.memory_path.display(), "cannot write the libvirt follower's memory; sessions closed through the API may reopen after a restart");
        }
    }
}
