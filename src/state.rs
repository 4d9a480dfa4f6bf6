//! The durable session table: schema-1 state file, atomic writes with group commit, load,
//! corruption handling, and the lock that keeps one daemon per file.
//!
//! One writer task owns the file. A change is made in memory first, then its API call asks for a
//! commit and waits: the writer takes every request that is waiting, snapshots the table once,
//! writes it (temp file in the same directory, fsync, rename, fsync the directory) and answers
//! them all with that one write.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// The schema this build writes; it reads this one and every older one.
pub const SCHEMA_VERSION: u32 = 1;
/// Commit requests waiting for the writer; API calls beyond this wait for room.
const COMMIT_QUEUE: usize = 4096;

/// The file: `{"version": 1, "sessions": [...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateDoc {
    pub version: u32,
    pub sessions: Vec<SessionRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionRecord {
    pub vm_id: String,
    pub target: String,
    pub ws_port: u16,
    /// A list with expiries from the start, so token lifetimes and rotation need no migration.
    pub tokens: Vec<TokenRecord>,
    pub created_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub value: String,
    pub expires_at: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("another vncgate (pid {pid}) is serving {path}", pid = pid.map_or("unknown".into(), |p| p.to_string()))]
    Locked { pid: Option<u32>, path: PathBuf },
    #[error("cannot lock {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
    #[error(
        "state file {path} cannot be used: {reason}. vncgate will not start empty over it{kept}; inspect it, or start with --start-empty to move it aside and begin with no sessions",
        kept = kept.as_ref().map_or(String::new(), |k| format!(" (a copy is kept at {})", k.display()))
    )]
    Corrupt {
        path: PathBuf,
        reason: String,
        kept: Option<PathBuf>,
    },
    #[error("cannot move the bad state file {path} aside: {source}")]
    MoveAside { path: PathBuf, source: io::Error },
}

/// Why a commit failed; every call it covered is rolled back.
#[derive(Debug, Clone, thiserror::Error)]
#[error("writing the state file failed: {0}")]
pub struct CommitError(pub String);

/// The advisory lock on `<state-file>.lock`, held for the daemon's life. The kernel drops it
/// when the process dies, so nobody ever deletes a lock file by hand.
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

pub fn lock_path(state: &Path) -> PathBuf {
    let mut name = state.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

pub fn acquire_lock(state: &Path) -> Result<StateLock, StateError> {
    let path = lock_path(state);
    let lock_err = |source| StateError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(StateError::Locked {
                pid: text.trim().parse().ok(),
                path: state.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
    }
    // Whoever is refused reads our pid from here.
    file.set_len(0).map_err(lock_err)?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(lock_err)?;
    Ok(StateLock { _file: file })
}

/// `<file>.corrupt-<UTC timestamp, microseconds>`: sorts by time, never collides in practice.
fn aside_path(path: &Path) -> PathBuf {
    let stamp = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{}", stamp.replace(':', "")));
    PathBuf::from(name)
}

/// Reads the state file. A missing file is an empty table; anything unusable is refused (a copy
/// kept aside when it can be read) unless `start_empty`, which moves it aside and starts empty.
pub fn load(path: &Path, start_empty: bool) -> Result<Vec<SessionRecord>, StateError> {
    let problem = match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => format!("cannot read it: {e}"),
        Ok(meta) if meta.is_dir() => "it is a directory, not a file".to_owned(),
        Ok(_) => match std::fs::read(path) {
            Err(e) => format!("cannot read it: {e}"),
            Ok(bytes) => match parse(&bytes) {
                Ok(records) => return Ok(records),
                Err(reason) => reason,
            },
        },
    };
    if start_empty {
        let aside = aside_path(path);
        std::fs::rename(path, &aside).map_err(|source| StateError::MoveAside {
            path: path.to_owned(),
            source,
        })?;
        warn!(path = %path.display(), aside = %aside.display(), reason = %problem, "--start-empty: bad state file moved aside; starting with no sessions");
        return Ok(Vec::new());
    }
    let aside = aside_path(path);
    let kept = std::fs::copy(path, &aside).ok().map(|_| aside);
    Err(StateError::Corrupt {
        path: path.to_owned(),
        reason: problem,
        kept,
    })
}

/// Parses any schema this build knows.
pub fn parse(bytes: &[u8]) -> Result<Vec<SessionRecord>, String> {
    #[derive(Deserialize)]
    struct Version {
        version: Option<serde_json::Value>,
    }
    let v: Version = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON ({e})"))?;
    match v.version.as_ref().and_then(serde_json::Value::as_u64) {
        Some(1) => {
            let doc: StateDoc = serde_json::from_slice(bytes)
                .map_err(|e| format!("not a schema-1 state file ({e})"))?;
            Ok(doc.sessions)
        }
        Some(n) => Err(format!(
            "schema version {n} is unknown to this vncgate (it reads version {SCHEMA_VERSION}); was it written by a newer release?"
        )),
        None => Err("no \"version\" field: not a vncgate state file".into()),
    }
}

/// Temp file in the same directory, fsync, rename over the file, fsync the directory.
pub fn write_atomic(path: &Path, doc: &StateDoc) -> io::Result<()> {
    // Compact: 800 sessions serialise and write in a fraction of a pretty file's time.
    let mut bytes = serde_json::to_vec(doc).map_err(io::Error::other)?;
    bytes.push(b'\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "the state file needs a file name",
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        // fdatasync: the data and the size needed to read it back; mtime can wait.
        file.sync_data()?;
        std::fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

type Waiter = oneshot::Sender<Result<(), CommitError>>;

/// Asks the writer for a write covering the table as it is now.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: mpsc::Sender<Waiter>,
}

impl Committer {
    /// Returns once a write that started after this call has reached the disk.
    pub async fn commit(&self) -> Result<(), CommitError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(tx)
            .await
            .map_err(|_| CommitError("vncgate is shutting down".into()))?;
        rx.await
            .map_err(|_| CommitError("vncgate is shutting down".into()))?
    }
}

/// Latency of the writes, for status and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub writes: std::sync::atomic::AtomicU64,
    pub failures: std::sync::atomic::AtomicU64,
    pub last_write_us: std::sync::atomic::AtomicU64,
    /// Sum over all writes, for the mean.
    pub total_write_us: std::sync::atomic::AtomicU64,
}

/// Starts the one writer of `path`. `snapshot` is called once per write, after the requests it
/// covers were queued. On `stop` the writer serves what is queued and ends.
pub fn spawn_writer(
    path: PathBuf,
    snapshot: impl Fn() -> Option<StateDoc> + Send + Sync + 'static,
    on_result: impl Fn(Result<(), &CommitError>) + Send + Sync + 'static,
    stats: Arc<CommitStats>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Committer {
    use std::sync::atomic::Ordering::Relaxed;
    let (tx, mut rx) = mpsc::channel::<Waiter>(COMMIT_QUEUE);
    tracker.spawn(async move {
        loop {
            let first = tokio::select! {
                w = rx.recv() => w,
                _ = stop.cancelled() => { rx.close(); rx.recv().await }
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while let Ok(w) = rx.try_recv() {
                batch.push(w);
            }
            // Timed from the snapshot to the directory's fsync: the whole cost of a commit.
            let started = std::time::Instant::now();
            let result = match snapshot() {
                None => Err(CommitError("the session table is gone".into())),
                Some(doc) => {
                    let file = path.clone();
                    let written = tokio::task::spawn_blocking(move || write_atomic(&file, &doc))
                        .await
                        .map_err(|e| io::Error::other(e.to_string()))
                        .and_then(|r| r);
                    written.map_err(|e| CommitError(format!("{}: {e}", path.display())))
                }
            };
            let us = started.elapsed().as_micros() as u64;
            stats.last_write_us.store(us, Relaxed);
            stats.total_write_us.fetch_add(us, Relaxed);
            tracing::debug!(us, calls = batch.len(), "state commit");
            match &result {
                Ok(()) => {
                    stats.writes.fetch_add(1, Relaxed);
                }
                Err(err) => {
                    stats.failures.fetch_add(1, Relaxed);
                    warn!(%err, calls = batch.len(), "state write failed; rolling the calls back");
                }
            }
            on_result(result.as_ref().map(|_| ()));
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
        info!("state writer stopped");
    });
    Committer { tx }
}

/// How long a final write at shutdown may take.
pub const FINAL_WRITE: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vncgate-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        dir
    }

    #[test]
    fn the_schema_1_fixture_loads() {
        let bytes = include_bytes!("../tests/fixtures/state-v1.json");
        let records = parse(bytes).expect("fixture parses");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].vm_id, "vm-100");
        assert_eq!(records[0].target, "127.0.0.1:5901");
        assert_eq!(records[0].ws_port, 6100);
        assert_eq!(records[0].tokens[0].expires_at, None);
        assert_eq!(records[1].target, "unix:/run/vnc/vm-101.sock");
    }

    #[test]
    fn unknown_versions_and_garbage_are_refused() {
        for (bytes, want) in [
            (
                &br#"{"version": 2, "sessions": []}"#[..],
                "schema version 2",
            ),
            (b"{\"version\": 1, \"sess", "not valid JSON"),
            (b"\x00\x01garbage", "not valid JSON"),
            (b"{\"sessions\": []}", "no \"version\""),
            (
                br#"{"version": 1, "sessions": [{"vm_id": 5}]}"#,
                "not a schema-1",
            ),
        ] {
            let err = parse(bytes).expect_err("refused");
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn writes_are_atomic_and_round_trip() {
        let dir = scratch("rt");
        let path = dir.join("state.json");
        let doc = StateDoc {
            version: 1,
            sessions: vec![SessionRecord {
                vm_id: "vm-1".into(),
                target: "[::1]:5900".into(),
                ws_port: 6101,
                tokens: vec![TokenRecord {
                    value: "t".into(),
                    expires_at: None,
                }],
                created_at: "2026-11-26T00:00:00Z".into(),
            }],
        };
        write_atomic(&path, &doc).expect("write");
        assert_eq!(load(&path, false).expect("load"), doc.sessions);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("dir")
            .filter_map(|e| e.ok())
            .collect();
        assert_eq!(leftovers.len(), 1, "no temp files left");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn corrupt_files_are_kept_and_refused_unless_start_empty() {
        let dir = scratch("corrupt");
        let path = dir.join("state.json");
        std::fs::write(&path, "{\"version\": 1, \"sessions\": [").expect("write");
        match load(&path, false) {
            Err(StateError::Corrupt { kept: Some(k), .. }) => assert!(k.exists()),
            other => panic!("expected refusal, got {other:?}"),
        }
        assert!(path.exists(), "the bad file stays where it was");
        assert_eq!(load(&path, true).expect("start empty"), vec![]);
        assert!(!path.exists(), "moved aside");
        assert_eq!(load(&path, false).expect("now missing = empty"), vec![]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid() {
        let dir = scratch("lock");
        let path = dir.join("state.json");
        let _held = acquire_lock(&path).expect("first lock");
        match acquire_lock(&path) {
            Err(e @ StateError::Locked { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("pid {}", std::process::id())),
                    "{msg}"
                );
                assert!(msg.contains("is serving"), "{msg}");
            }
            other => panic!("expected Locked, got {other:?}"),
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
