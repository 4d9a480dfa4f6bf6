//! (cargo feature `libvirt`) Sessions that follow libvirt domains by themselves (DESIGN.md
//! "Platform integration"): a domain that runs with VNC graphics has a session whose target is
//! its live XML's VNC endpoint; a domain that stops has its session closed.
//!
//! A thread of its own owns the libvirt connection (every libvirt call blocks) and lists the
//! running domains every [`POLL`]; it hands each changed picture to a tracked task that applies
//! it to the session table. The first picture of a connection is a reconcile: sessions of
//! domains that stopped meanwhile close, endpoints that moved are retargeted (port and token
//! kept). libvirtd going away (or hanging) never closes a console: the task keeps the sessions,
//! shows a warning in `/v1/status`, and the thread reconnects with backoff.
//!
//! What the follower decided is kept beside the state file (`<state-file>.libvirt.json`): which
//! sessions it manages (each with the domain run it belongs to) and which were closed through
//! the API during a run, so those stay closed until the domain starts again, across restarts.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::registry::SessionRegistry;
use crate::target::Target;

mod follower;
mod xml;
use follower::Follower;
pub use xml::vnc_target;

/// How often the running domains are listed (one libvirt call): a lifecycle change reaches
/// the session table within this and the XML read of a new run.
pub const POLL: Duration = Duration::from_millis(250);
/// The longest wait between two connection attempts while libvirtd is away.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long shutdown waits for the libvirt thread.
const THREAD_EXIT_WAIT: Duration = Duration::from_secs(2);
/// A thread that has not finished a poll this long is stuck in libvirt (a hung libvirtd).
const STUCK_AFTER: Duration = Duration::from_secs(10);
/// How often the follower applies the last picture again (failed opens and closes are tried
/// again) and looks at the thread's heartbeat.
const REAPPLY: Duration = Duration::from_secs(1);
/// The key of the follower's warning in `/v1/status`.
const WARNING: &str = "libvirt";

/// How a domain's vm_id is chosen (`--libvirt-id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdMode {
    /// The domain's name (skipped when it is not a valid vm_id).
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

/// One run of a domain: the host's boot, its UUID and the id libvirt gave this start (a new
/// start, a new id; ids start again at 1 after a reboot, hence the boot).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct RunKey {
    #[serde(default)]
    boot: String,
    uuid: String,
    id: u32,
}

/// A running domain as one poll saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Running {
    name: String,
    run: RunKey,
    /// The VNC endpoint of its live XML (`None`: not assigned yet), or why it has none.
    target: Result<Option<Target>, String>,
}

/// What the poller thread saw last.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Connecting,
    /// libvirtd cannot be reached (the error); sessions stay as they are.
    Down(String),
    /// The running domains, seen on connection number `connection` (the first picture of a
    /// new connection is a reconcile).
    Up {
        domains: Vec<Running>,
        connection: u64,
    },
}

/// What the follower keeps across restarts.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Memory {
    /// vm_id -> the run whose session this is.
    managed: BTreeMap<String, RunKey>,
    /// vm_id -> the run during which its session was closed through the API.
    suppressed: BTreeMap<String, RunKey>,
}

/// Why the follower could not start.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot start the libvirt thread: {0}")]
    Thread(std::io::Error),
}

/// Starts following `options.uri`: a thread polls libvirt, a task on `registry`'s tracker
/// applies what it sees. Both end when `stop` fires (a thread stuck in a libvirt call is left
/// behind after [`THREAD_EXIT_WAIT`] rather than holding up the shutdown).
pub fn spawn(
    registry: Arc<SessionRegistry>,
    options: LibvirtOptions,
    tracker: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
) -> Result<(), LibvirtError> {
    let (tx, rx) = watch::channel(Seen::Connecting);
    let halt = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let heartbeat = Arc::new(AtomicU64::new(0));
    let (exited_tx, exited) = tokio::sync::oneshot::channel::<()>();
    {
        let uri = options.uri.clone();
        let (halt, beat) = (Arc::clone(&halt), Arc::clone(&heartbeat));
        std::thread::Builder::new()
            .name("vncgate-libvirt".into())
            .spawn(move || {
                let beat = || {
                    let ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                    beat.store(ms, Ordering::SeqCst);
                };
                poll_loop(&uri, &tx, &halt, &beat);
                let _ = exited_tx.send(());
            })
            .map_err(LibvirtError::Thread)?;
    }
    let (closes_tx, closes) = mpsc::unbounded_channel();
    registry.watch_closes(closes_tx);
    let memory_path = memory_path(registry.state_path());
    tracker.spawn(async move {
        let memory = match tokio::fs::read(&memory_path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|err| {
                warn!(path = %memory_path.display(), %err, "libvirt follower memory unreadable; starting afresh");
                Memory::default()
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Memory::default(),
            Err(err) => {
                warn!(path = %memory_path.display(), %err, "libvirt follower memory unreadable; starting afresh");
                Memory::default()
            }
        };
        let mut follower =
            Follower::new(registry, options, memory, memory_path, heartbeat, started);
        follower.run(rx, closes, stop).await;
        halt.store(true, Ordering::SeqCst);
        // The thread looks at `halt` every 50 ms, or when a libvirt call returns.
        if tokio::time::timeout(THREAD_EXIT_WAIT, exited).await.is_err() {
            warn!("the libvirt thread is stuck in a libvirt call; leaving it behind");
        }
    });
    Ok(())
}

fn memory_path(state: &Path) -> PathBuf {
    let mut name = state.file_name().unwrap_or_default().to_os_string();
    name.push(".libvirt.json");
    state.with_file_name(name)
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
/// publishing each changed picture and beating `beat` after every good list. A panic inside
/// the libvirt bindings (their `Drop` panics when libvirt refuses a close) ends that
/// connection, not the thread.
fn poll_loop(uri: &str, tx: &watch::Sender<Seen>, halt: &AtomicBool, beat: &dyn Fn()) {
    // libvirt prints every error to stderr by default; ours go through tracing instead.
    virt::error::clear_error_callback();
    let boot = boot_id();
    let mut backoff = POLL;
    let mut connection = 0u64;
    while !halt.load(Ordering::SeqCst) {
        connection += 1;
        let listed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            match virt::connect::Connect::open(Some(uri)) {
                Ok(conn) => poll_connection(&conn, &boot, connection, tx, halt, beat),
                Err(err) => {
                    tx.send_if_modified(|seen| replace(seen, Seen::Down(err.to_string())));
                    false
                }
            }
        }));
        match listed {
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

/// This boot of the host (`/proc/sys/kernel/random/boot_id`); empty where there is none.
fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Lists the running domains of one connection until it fails or `halt` is set. True if at
/// least one list succeeded.
fn poll_connection(
    conn: &virt::connect::Connect,
    boot: &str,
    connection: u64,
    tx: &watch::Sender<Seen>,
    halt: &AtomicBool,
    beat: &dyn Fn(),
) -> bool {
    let mut xml_cache: HashMap<RunKey, Result<Option<Target>, String>> = HashMap::new();
    let mut listed = false;
    loop {
        match list_running(conn, boot, &mut xml_cache) {
            Ok(domains) => {
                beat();
                listed = true;
                tx.send_if_modified(|seen| {
                    replace(
                        seen,
                        Seen::Up {
                            domains,
                            connection,
                        },
                    )
                });
            }
            Err(err) => {
                tx.send_replace(Seen::Down(err));
                return listed;
            }
        }
        if !nap(POLL, halt) {
            return listed;
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

/// The running domains, their VNC endpoints read once per run (again while not assigned).
fn list_running(
    conn: &virt::connect::Connect,
    boot: &str,
    xml_cache: &mut HashMap<RunKey, Result<Option<Target>, String>>,
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
        let run = RunKey {
            boot: boot.to_owned(),
            uuid,
            id,
        };
        live.insert(run.clone());
        let target = match xml_cache.get(&run) {
            Some(t @ Ok(Some(_))) => t.clone(),
            _ => {
                let t = d
                    .xml_desc(0)
                    .map_err(|e| format!("reading its XML: {e}"))
                    .and_then(|xml| xml::vnc_endpoint(&xml));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_lives_beside_the_state_file() {
        assert_eq!(
            memory_path(Path::new("/var/lib/vncgate/vncgate-state.json")),
            PathBuf::from("/var/lib/vncgate/vncgate-state.json.libvirt.json")
        );
    }

    #[test]
    fn memory_of_an_older_release_reads() {
        let old = br#"{"managed": {"vm": {"uuid": "u", "id": 3}}, "suppressed": {}}"#;
        let m: Memory = serde_json::from_slice(old).expect("reads");
        assert_eq!(m.managed["vm"].boot, "");
    }
}
