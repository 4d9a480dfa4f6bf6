//! (cargo feature `libvirt`) Sessions that follow libvirt domains by themselves (DESIGN.md
//! "Platform integration"): a domain that runs with VNC graphics has a session whose target is
//! its live XML's VNC endpoint; a domain that stops has its session closed.
//!
//! A thread of its own owns the libvirt connection (every libvirt call blocks) and lists the
//! running domains every [`POLL`]; it hands each changed picture to a tracked task that applies
//! it to the session table. The first picture after a (re)connect is a reconcile: sessions of
//! domains that stopped meanwhile close, endpoints that moved are retargeted (port and token
//! kept). libvirtd going away never closes a console: the task keeps the sessions, shows a
//! warning in `/v1/status`, and the thread reconnects with backoff.
//!
//! What the follower decided is kept beside the state file (`<state-file>.libvirt.json`): which
//! sessions it manages (each with the domain run, UUID and libvirt domain id, it belongs to)
//! and which were closed through the API during a run, so those stay closed until the domain
//! starts again, across daemon restarts too.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::CloseCause;
use crate::registry::{SessionRegistry, validate_vm_id};
use crate::session::SessionLimits;
use crate::target::Target;

/// How often the running domains are listed (one libvirt call): a lifecycle change reaches
/// the session table within this and the XML read of a new run.
pub const POLL: Duration = Duration::from_millis(250);
/// The longest wait between two connection attempts while libvirtd is away.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The key of the follower's warning in `/v1/status`.
const WARNING: &str = "libvirt";

/// How a domain's vm_id is chosen (`--libvirt-id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdMode {
    /// The domain's name (refused when it is not a valid vm_id).
    #[default]
    Name,
    /// The domain's UUID.
    Uuid,
}

/// `--libvirt URI` and `--libvirt-id`.
#[derive(Debug, Clone)]
pub struct LibvirtOptions {
    pub uri: String,
    pub id: IdMode,
}

/// One run of a domain: its UUID and the id libvirt gave this start (a new start, a new id).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct RunKey {
    uuid: String,
    id: u32,
}

/// A running domain as one poll saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Running {
    name: String,
    run: RunKey,
    /// The VNC endpoint of its live XML, or why it has none.
    target: Result<Target, String>,
}

/// What the poller thread saw last.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Connecting,
    /// libvirtd cannot be reached (the error); sessions stay as they are.
    Down(String),
    /// The running domains; `fresh` for the first picture of a connection (a reconcile).
    Up {
        domains: Vec<Running>,
        fresh: bool,
    },
}

/// What the follower keeps across restarts.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Memory {
    /// vm_id -> the run whose session this is.
    managed: BTreeMap<String, RunKey>,
    /// vm_id -> the run during which its session was closed by someone else (the API).
    suppressed: BTreeMap<String, RunKey>,
}

/// Why the follower could not start.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot start the libvirt thread: {0}")]
    Thread(std::io::Error),
}

/// The VNC endpoint of a domain's live XML: `<graphics type='vnc' port='5901'
/// listen='127.0.0.1'>` or `<graphics type='vnc' socket='/path'>`. A listen address of "any"
/// is reached on loopback: vncgate runs beside libvirt.
pub fn vnc_target(xml: &str) -> Result<Target, String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("unreadable XML: {e}"))?;
    let graphics = doc
        .descendants()
        .find(|n| n.has_tag_name("graphics") && n.attribute("type") == Some("vnc"))
        .ok_or("no VNC graphics")?;
    let socket = graphics.attribute("socket").or_else(|| {
        graphics
            .children()
            .find(|n| n.has_tag_name("listen") && n.attribute("type") == Some("socket"))
            .and_then(|n| n.attribute("socket"))
    });
    if let Some(path) = socket {
        return format!("unix:{path}")
            .parse()
            .map_err(|e| format!("VNC socket {path}: {e}"));
    }
    let port: i64 = graphics
        .attribute("port")
        .and_then(|p| p.parse().ok())
        .ok_or("VNC graphics without a port")?;
    if !(1..=65535).contains(&port) {
        return Err(format!("VNC port {port} not assigned yet"));
    }
    let listen = graphics
        .children()
        .find(|n| n.has_tag_name("listen") && n.attribute("type") == Some("address"))
        .and_then(|n| n.attribute("address"))
        .or_else(|| graphics.attribute("listen"))
        .unwrap_or("127.0.0.1");
    let host = match listen {
        "0.0.0.0" | "" => "127.0.0.1".to_owned(),
        "::" => "[::1]".to_owned(),
        other if other.contains(':') && !other.starts_with('[') => format!("[{other}]"),
        other => other.to_owned(),
    };
    format!("{host}:{port}")
        .parse()
        .map_err(|e| format!("VNC endpoint {host}:{port}: {e}"))
}

/// Starts following `options.uri`: a thread polls libvirt, a task on `registry`'s tracker
/// applies what it sees. Both end when `stop` fires.
pub fn spawn(
    registry: Arc<SessionRegistry>,
    options: LibvirtOptions,
    tracker: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
) -> Result<(), LibvirtError> {
    let (tx, rx) = watch::channel(Seen::Connecting);
    let halt = Arc::new(AtomicBool::new(false));
    let thread = {
        let (uri, halt) = (options.uri.clone(), Arc::clone(&halt));
        std::thread::Builder::new()
            .name("vncgate-libvirt".into())
            .spawn(move || poll_loop(&uri, &tx, &halt))
            .map_err(LibvirtError::Thread)?
    };
    let memory_path = memory_path(registry.state_path());
    tracker.spawn(async move {
        let mut follower = Follower {
            memory: load_memory(&memory_path),
            memory_path,
            registry,
            options,
            logged: HashSet::new(),
            down_since: None,
        };
        follower.run(rx, stop).await;
        halt.store(true, Ordering::SeqCst);
        // The thread looks at `halt` at least every 50 ms (or when a libvirt call returns).
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    });
    Ok(())
}

fn memory_path(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".libvirt.json");
    state.with_file_name(name)
}

fn load_memory(path: &Path) -> Memory {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
            warn!(path = %path.display(), %err, "libvirt follower memory unreadable; starting afresh (sessions closed through the API may reopen)");
            Memory::default()
        }),
        Err(_) => Memory::default(),
    }
}

/// Sleeps `d` in steps, returning early (false) when `halt` is set.
fn nap(d: Duration, halt: &AtomicBool) -> bool {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() {
        if halt.load(Ordering::SeqCst) {
            return false;
        }
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
    !halt.load(Ordering::SeqCst)
}

/// The poller thread: connect (with backoff), then list the running domains every [`POLL`],
/// publishing each changed picture. A panic inside the libvirt bindings (their `Drop` panics
/// when libvirt refuses a close) ends that connection, not the thread.
fn poll_loop(uri: &str, tx: &watch::Sender<Seen>, halt: &AtomicBool) {
    // libvirt prints every error to stderr by default; ours go through tracing instead.
    virt::error::clear_error_callback();
    let mut backoff = POLL;
    while !halt.load(Ordering::SeqCst) {
        let connected = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match virt::connect::Connect::open(Some(uri)) {
                Ok(conn) => {
                    poll_connection(&conn, tx, halt);
                    drop(conn);
                    true
                }
                Err(err) => {
                    tx.send_if_modified(|seen| replace(seen, Seen::Down(err.to_string())));
                    false
                }
            }
        }));
        match connected {
            Ok(true) => backoff = POLL,
            Ok(false) => backoff = (backoff * 2).min(MAX_BACKOFF),
            Err(_) => {
                tx.send_replace(Seen::Down(
                    "the libvirt bindings failed; reconnecting".into(),
                ));
                backoff = MAX_BACKOFF;
            }
        }
        if !nap(backoff, halt) {
            return;
        }
    }
}

/// Lists the running domains of one connection until it fails or `halt` is set.
fn poll_connection(conn: &virt::connect::Connect, tx: &watch::Sender<Seen>, halt: &AtomicBool) {
    let mut xml_cache: HashMap<RunKey, Result<Target, String>> = HashMap::new();
    let mut fresh = true;
    loop {
        match list_running(conn, &mut xml_cache) {
            Ok(domains) => {
                let picture = Seen::Up { domains, fresh };
                // A fresh picture is always sent, even if equal to the last one: the follower
                // reconciles on it.
                if fresh {
                    tx.send_replace(picture);
                } else {
                    tx.send_if_modified(|seen| replace_up(seen, picture));
                }
                fresh = false;
            }
            Err(err) => {
                tx.send_replace(Seen::Down(err));
                return;
            }
        }
        if !nap(POLL, halt) {
            return;
        }
    }
}

fn replace(seen: &mut Seen, new: Seen) -> bool {
    if *seen == new {
        return false;
    }
    *seen = new;
    true
}

/// A steady-state picture replaces the last only when the domains differ (not on `fresh`).
fn replace_up(seen: &mut Seen, new: Seen) -> bool {
    if let (Seen::Up { domains: a, .. }, Seen::Up { domains: b, .. }) = (&*seen, &new)
        && a == b
    {
        return false;
    }
    *seen = new;
    true
}

/// The running domains, their VNC endpoints read once per run.
fn list_running(
    conn: &virt::connect::Connect,
    xml_cache: &mut HashMap<RunKey, Result<Target, String>>,
) -> Result<Vec<Running>, String> {
    let flags = virt::sys::VIR_CONNECT_LIST_DOMAINS_ACTIVE;
    let domains = conn
        .list_all_domains(flags)
        .map_err(|e| format!("listing domains: {e}"))?;
    let mut out = Vec::with_capacity(domains.len());
    let mut live = HashSet::new();
    for d in &domains {
        let (Ok(name), Ok(uuid), Some(id)) = (d.name(), d.uuid_string(), d.id()) else {
            continue; // it stopped while we looked
        };
        let run = RunKey { uuid, id };
        live.insert(run.clone());
        let target = match xml_cache.get(&run) {
            Some(t) if t.is_ok() => t.clone(),
            // An endpoint not assigned yet (or a failed read) is read again next time.
            _ => {
                let t = d
                    .xml_desc(0)
                    .map_err(|e| format!("reading its XML: {e}"))
                    .and_then(|xml| vnc_target(&xml));
                xml_cache.insert(run.clone(), t.clone());
                t
            }
        };
        out.push(Running { name, run, target });
    }
    xml_cache.retain(|k, _| live.contains(k));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The task that applies the thread's pictures to the session table.
struct Follower {
    registry: Arc<SessionRegistry>,
    options: LibvirtOptions,
    memory: Memory,
    memory_path: PathBuf,
    /// Domains skipped (bad name, no VNC) already logged, so each is logged once.
    logged: HashSet<String>,
    down_since: Option<String>,
}

impl Follower {
    async fn run(&mut self, mut rx: watch::Receiver<Seen>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
            let seen = rx.borrow_and_update().clone();
            match seen {
                Seen::Connecting => {}
                Seen::Down(why) => {
                    if self.down_since.is_none() {
                        warn!(uri = %self.options.uri, error = %why, "libvirt unreachable; sessions stay open, reconnecting");
                    }
                    self.registry.set_warning(
                        WARNING,
                        Some(format!(
                            "libvirt at {} unreachable ({why}); consoles stay open, reconnecting",
                            self.options.uri
                        )),
                    );
                    self.down_since = Some(why);
                }
                Seen::Up { domains, fresh } => {
                    if self.down_since.take().is_some() || fresh {
                        info!(uri = %self.options.uri, domains = domains.len(), "libvirt connected; reconciling");
                    }
                    self.registry.set_warning(WARNING, None);
                    let before = self.memory.clone();
                    self.apply(&domains, fresh).await;
                    if self.memory != before {
                        self.save().await;
                    }
                }
            }
        }
    }

    fn vm_id_of(&mut self, d: &Running) -> Option<String> {
        let vm_id = match self.options.id {
            IdMode::Name => d.name.clone(),
            IdMode::Uuid => d.run.uuid.clone(),
        };
        if let Err(err) = validate_vm_id(&vm_id) {
            if self.logged.insert(format!("id:{}", d.name)) {
                warn!(domain = %d.name, %err, "libvirt domain skipped: its name is not a valid vm_id; start with --libvirt-id uuid to use domain UUIDs as vm_ids");
            }
            return None;
        }
        Some(vm_id)
    }

    async fn apply(&mut self, domains: &[Running], fresh: bool) {
        let mut running: HashSet<String> = HashSet::new();
        for d in domains {
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
                    // A session it has stays until the domain stops.
                    running.insert(vm_id);
                    continue;
                }
            };
            running.insert(vm_id.clone());
            self.follow(&vm_id, &d.run, target, fresh).await;
        }
        // Managed sessions whose domain is not running any more.
        let stopped: Vec<String> = self
            .memory
            .managed
            .keys()
            .filter(|vm| !running.contains(*vm))
            .cloned()
            .collect();
        for vm_id in stopped {
            match self
                .registry
                .close_if(&vm_id, CloseCause::DomainStopped, |_| true)
                .await
            {
                Ok(_) => {
                    self.memory.managed.remove(&vm_id);
                    self.memory.suppressed.remove(&vm_id);
                }
                Err(err) => {
                    warn!(vm_id, %err, "the session of a stopped domain could not be closed; trying again")
                }
            }
        }
        // A suppression ends with the run it was for.
        self.memory
            .suppressed
            .retain(|vm_id, _| running.contains(vm_id));
    }

    /// One running domain with a VNC endpoint.
    async fn follow(&mut self, vm_id: &str, run: &RunKey, target: Target, fresh: bool) {
        let managed = self.memory.managed.get(vm_id).cloned();
        if self.registry.get(vm_id).is_some() {
            if managed.as_ref().is_some_and(|m| m != run) && !fresh {
                // Stopped and started again between two polls: a fresh session, as if seen.
                if let Err(err) = self
                    .registry
                    .close_if(vm_id, CloseCause::DomainStopped, |_| true)
                    .await
                {
                    warn!(vm_id, %err, "the session of a restarted domain could not be closed");
                    return;
                }
            }
            // Adopted, unchanged, or retargeted to where the domain's VNC server is now.
            self.open(vm_id, run, &target).await;
            return;
        }
        if self.memory.suppressed.get(vm_id) == Some(run) {
            return;
        }
        if managed.as_ref() == Some(run) {
            // Its session is gone while the domain runs: closed through the API (or by
            // cleanup or its max_lifetime). It stays closed until the domain starts again.
            info!(
                vm_id,
                "session of a running libvirt domain was closed; not reopened until the domain starts again"
            );
            self.memory.managed.remove(vm_id);
            self.memory.suppressed.insert(vm_id.to_owned(), run.clone());
            return;
        }
        self.memory.suppressed.remove(vm_id);
        self.open(vm_id, run, &target).await;
    }

    async fn open(&mut self, vm_id: &str, run: &RunKey, target: &Target) {
        match self
            .registry
            .open(vm_id, &target.to_string(), SessionLimits::default())
            .await
        {
            Ok(_) => {
                self.memory.managed.insert(vm_id.to_owned(), run.clone());
            }
            Err(err) => {
                if self.logged.insert(format!("open:{vm_id}:{}:{err}", run.id)) {
                    warn!(vm_id, %target, %err, "session for a libvirt domain could not be opened; trying again");
                }
            }
        }
    }

    async fn save(&self) {
        let bytes = match serde_json::to_vec_pretty(&self.memory) {
            Ok(b) => b,
            Err(_) => return,
        };
        let path = self.memory_path.clone();
        let result =
            tokio::task::spawn_blocking(move || crate::state::write_bytes_atomic(&path, bytes))
                .await;
        if !matches!(result, Ok(Ok(()))) {
            warn!(path = %self.memory_path.display(), "cannot write the libvirt follower's memory; closed-through-the-API sessions may reopen after a restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vnc_endpoints_from_live_xml() {
        let tcp = "<domain><devices><graphics type='vnc' port='5901' autoport='yes' listen='127.0.0.1'><listen type='address' address='127.0.0.1'/></graphics></devices></domain>";
        assert_eq!(
            vnc_target(tcp).map(|t| t.to_string()),
            Ok("127.0.0.1:5901".into())
        );
        let any = "<domain><devices><graphics type='vnc' port='5902' listen='0.0.0.0'/></devices></domain>";
        assert_eq!(
            vnc_target(any).map(|t| t.to_string()),
            Ok("127.0.0.1:5902".into())
        );
        let v6 = "<domain><devices><graphics type='vnc' port='5903'><listen type='address' address='::1'/></graphics></devices></domain>";
        assert_eq!(
            vnc_target(v6).map(|t| t.to_string()),
            Ok("[::1]:5903".into())
        );
        let unix = "<domain><devices><graphics type='vnc' socket='/run/vm.vnc'><listen type='socket' socket='/run/vm.vnc'/></graphics></devices></domain>";
        assert_eq!(
            vnc_target(unix).map(|t| t.to_string()),
            Ok("unix:/run/vm.vnc".into())
        );
        let spice = "<domain><devices><graphics type='spice' port='5904'/></devices></domain>";
        assert!(vnc_target(spice).is_err());
        let unassigned =
            "<domain><devices><graphics type='vnc' port='-1' autoport='yes'/></devices></domain>";
        assert!(vnc_target(unassigned).is_err());
        assert!(vnc_target("<not xml").is_err());
    }

    #[test]
    fn memory_lives_beside_the_state_file() {
        assert_eq!(
            memory_path(Path::new("/var/lib/vncgate/vncgate-state.json")),
            PathBuf::from("/var/lib/vncgate/vncgate-state.json.libvirt.json")
        );
    }
}
