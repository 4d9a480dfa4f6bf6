//! Group commit: the one writer thread that owns the state file, and the [`Committer`] through
//! which API calls ask for their change to be written and wait for it.

use super::*;

/// Takes a change back out of the in-memory table when the write that carried it failed. Runs on
/// the writer before its next snapshot, so no later write carries the change.
pub type Undo = Box<dyn FnOnce() + Send>;

struct Waiter {
    reply: Option<oneshot::Sender<Result<(), CommitError>>>,
    undo: Option<Undo>,
}

impl Waiter {
    /// Undoes the call first if the write failed, then tells the caller.
    fn answer(mut self, result: &Result<(), CommitError>) {
        let undo = self.undo.take();
        if result.is_err()
            && let Some(undo) = undo
        {
            undo();
        }
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(result.clone());
        }
    }
}

impl Drop for Waiter {
    /// A call never written (the writer stopped first) is not durable: take it back.
    fn drop(&mut self) {
        if let Some(undo) = self.undo.take() {
            undo();
        }
    }
}

enum Msg {
    Commit(Waiter),
    Stop,
}

/// Asks the writer for a write covering the table as it is now.
#[derive(Debug, Clone)]
pub struct Committer {
    tx: std::sync::mpsc::Sender<Msg>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Msg::Commit(_) => "Commit",
            Msg::Stop => "Stop",
        })
    }
}

impl Committer {
    /// Returns once a write that started after this call has reached the disk. When it fails,
    /// `undo` has already run (even if the caller stopped waiting): the change is out of the
    /// table and out of every later snapshot. (A write for other calls may have caught the
    /// change before; the next good write drops it. What a caller was told succeeded is never
    /// missing from the file.)
    pub async fn commit(&self, undo: Undo) -> Result<(), CommitError> {
        let (reply, rx) = oneshot::channel();
        let waiter = Waiter {
            reply: Some(reply),
            undo: Some(undo),
        };
        let stopped =
            || CommitError("the state writer has stopped (vncgate is shutting down)".into());
        if self.tx.send(Msg::Commit(waiter)).is_err() {
            // The refused waiter was dropped, and with it the change undone.
            return Err(stopped());
        }
        rx.await.map_err(|_| stopped())?
    }
}

/// Latency of the writes, for status and benchmarks.
#[derive(Debug, Default)]
pub struct CommitStats {
    pub writes: AtomicU64,
    pub failures: AtomicU64,
    pub last_write_us: AtomicU64,
    /// Sum over all writes, for the mean.
    pub total_write_us: AtomicU64,
}

/// Starts the one writer of `path`: an OS thread (its file calls block; a thread of its own
/// saves the hop to tokio's blocking pool on every write) watched by a tracked task. `snapshot` is
/// called once per write, after the requests it covers were queued. On `stop` the writer
/// serves what is queued and ends.
pub fn spawn_writer(
    path: PathBuf,
    snapshot: impl Fn() -> Option<Vec<u8>> + Send + 'static,
    on_result: impl Fn(Result<(), &CommitError>) + Send + 'static,
    stats: Arc<CommitStats>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Committer {
    let (tx, rx) = std::sync::mpsc::channel::<Msg>();
    let (ended_tx, ended) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("vncgate-state".into())
        .spawn(move || {
            write_loop(&path, &rx, &snapshot, &on_result, &stats);
            let _ = ended_tx.send(());
        });
    if let Err(err) = thread {
        // Every commit then fails (and is rolled back) with the error below; say why once.
        tracing::error!(%err, "cannot start the state writer thread");
    }
    let stopper = tx.clone();
    tracker.spawn(async move {
        stop.cancelled().await;
        let _ = stopper.send(Msg::Stop);
        let _ = ended.await;
        info!("state writer stopped");
    });
    Committer { tx }
}

fn write_loop(
    path: &Path,
    rx: &std::sync::mpsc::Receiver<Msg>,
    snapshot: &dyn Fn() -> Option<Vec<u8>>,
    on_result: &dyn Fn(Result<(), &CommitError>),
    stats: &CommitStats,
) {
    let mut stopping = false;
    loop {
        let mut batch = Vec::new();
        match rx.recv() {
            Ok(Msg::Commit(w)) => batch.push(w),
            Ok(Msg::Stop) => stopping = true,
            Err(_) => return,
        }
        loop {
            match rx.try_recv() {
                Ok(Msg::Commit(w)) => batch.push(w),
                Ok(Msg::Stop) => stopping = true,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            write_batch(path, batch, snapshot, on_result, stats);
        }
        if stopping {
            // Calls that raced the stop are answered by one last write.
            let late: Vec<Waiter> = rx
                .try_iter()
                .filter_map(|m| match m {
                    Msg::Commit(w) => Some(w),
                    Msg::Stop => None,
                })
                .collect();
            if !late.is_empty() {
                write_batch(path, late, snapshot, on_result, stats);
            }
            return;
        }
    }
}

/// One snapshot, one atomic write, every caller answered; on failure each call is undone first.
fn write_batch(
    path: &Path,
    batch: Vec<Waiter>,
    snapshot: &dyn Fn() -> Option<Vec<u8>>,
    on_result: &dyn Fn(Result<(), &CommitError>),
    stats: &CommitStats,
) {
    // Timed from the snapshot to the directory's fsync: the whole cost of a commit.
    let started = Instant::now();
    let result = match snapshot() {
        None => Err(CommitError("the session table is gone".into())),
        Some(bytes) => write_bytes_atomic(path, bytes)
            .map_err(|e| CommitError(format!("{}: {e}", path.display()))),
    };
    let us = started.elapsed().as_micros() as u64;
    stats.last_write_us.store(us, Ordering::Relaxed);
    stats.total_write_us.fetch_add(us, Ordering::Relaxed);
    let calls = batch.len();
    tracing::debug!(us, calls, "state commit");
    match &result {
        Ok(()) => {
            stats.writes.fetch_add(1, Ordering::Relaxed);
        }
        Err(err) => {
            stats.failures.fetch_add(1, Ordering::Relaxed);
            warn!(%err, calls, "state write failed; rolling the calls back");
        }
    }
    on_result(result.as_ref().map(|_| ()));
    for waiter in batch {
        waiter.answer(&result);
    }
}

/// How long a final write at shutdown may take.
pub const FINAL_WRITE: Duration = Duration::from_secs(2);
