//! The counting half of access control: the failed-token limit ([`FailLimiter`]) and the
//! connection caps of session, public and API ports ([`ConnectionLimits`]).

use super::*;

/// Failed token checks are counted over this window; an address past the limit is refused
/// (429) for the same length of time.
pub const FAIL_WINDOW: Duration = Duration::from_secs(60);
/// Addresses with failures remembered at once before expired ones are swept out.
pub(super) const FAIL_TABLE_SWEEP: usize = 4096;
/// Addresses with failures remembered at most: past it (a distributed attacker with this many
/// addresses, or IPv6 /64s) the entries that matter least make room (see
/// [`FailLimiter::make_room`]); blocked addresses are always kept.
pub(super) const FAIL_TABLE_MAX: usize = 65_536;
/// Sweeps of the failure table at most this often (each walks the whole table).
pub(super) const FAIL_SWEEP_PERIOD: Duration = Duration::from_secs(1);
/// Refusals at accept are logged at most once per this period.
pub(super) const ACCEPT_WARN_PERIOD: Duration = Duration::from_secs(60);

/// One client's failures in the current window.
#[derive(Debug)]
pub(super) struct FailWindow {
    started: Instant,
    failures: u32,
    blocked_until: Option<Instant>,
}

/// Counts failed token checks per client ([`ClientKey`]); past `limit` in [`FAIL_WINDOW`],
/// the client is refused for [`FAIL_WINDOW`]. Uses tokio's clock, so tests can pause it.
#[derive(Debug)]
pub struct FailLimiter {
    /// Changed by a config reload (SIGHUP).
    limit: std::sync::atomic::AtomicU32,
    /// Sharded: every token check on every port reads it.
    pub(super) table: DashMap<ClientKey, FailWindow>,
    /// When the table was last swept of expired windows.
    last_sweep: Mutex<Option<Instant>>,
    /// Blocks are logged once a minute, with the count in between.
    block_log: Throttle,
    /// Requests refused with 429 since start (for status and tests).
    refused: AtomicU64,
}

impl FailLimiter {
    /// `limit` failures a minute; 0 turns the limit off.
    pub fn new(limit: u32) -> FailLimiter {
        FailLimiter {
            limit: std::sync::atomic::AtomicU32::new(limit),
            table: DashMap::new(),
            last_sweep: Mutex::new(None),
            block_log: Throttle::new(),
            refused: AtomicU64::new(0),
        }
    }

    /// A new limit (config reload); counts so far are kept.
    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Seconds until `addr` may try again, if it is blocked now.
    pub fn blocked(&self, addr: IpAddr) -> Option<u64> {
        if self.limit.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let now = Instant::now();
        let until = self.table.get(&ClientKey::of(addr))?.blocked_until?;
        if until <= now {
            return None;
        }
        self.refused.fetch_add(1, Ordering::Relaxed);
        Some((until - now).as_secs().max(1))
    }

    /// Counts one failed token check of `addr`; the one that reaches the limit blocks the
    /// client and is logged (once per block, not once per refusal).
    pub fn record_failure(&self, addr: IpAddr) {
        if self.limit.load(Ordering::Relaxed) == 0 {
            return;
        }
        let now = Instant::now();
        let key = ClientKey::of(addr);
        if !self.table.contains_key(&key) && self.table.len() >= FAIL_TABLE_SWEEP {
            self.sweep(now);
            if self.table.len() >= FAIL_TABLE_MAX {
                self.make_room();
            }
        }
        let mut window = self.table.entry(key).or_insert(FailWindow {
            started: now,
            failures: 0,
            blocked_until: None,
        });
        if now.duration_since(window.started) >= FAIL_WINDOW
            && window.blocked_until.is_none_or(|u| u <= now)
        {
            *window = FailWindow {
                started: now,
                failures: 0,
                blocked_until: None,
            };
        }
        window.failures += 1;
        if window.failures >= self.limit.load(Ordering::Relaxed) && window.blocked_until.is_none() {
            window.blocked_until = Some(now + FAIL_WINDOW);
            // Once a minute for all clients together: many addresses must not mean many lines.
            if let Some(held_back) = self.block_log.ready(FAIL_WINDOW) {
                warn!(
                    client = %key,
                    failures = window.failures,
                    blocked_s = FAIL_WINDOW.as_secs(),
                    other_clients_blocked = held_back,
                    "too many wrong console tokens: client refused with 429 for a while (--auth-fail-limit; logged once a minute)"
                );
            }
        }
    }

    /// A full table (a spray from more addresses than it holds) drops the entries with the
    /// fewest failures first, never a blocked one: a spray of one failure per address cannot
    /// push out an address that is guessing in earnest, and no new address goes uncounted.
    /// One pass over the table per [`FAIL_TABLE_MAX`] new addresses at most.
    fn make_room(&self) {
        let limit = self.limit.load(Ordering::Relaxed);
        for keep_from in [2, (limit / 2).max(2), u32::MAX] {
            self.table
                .retain(|_, w| w.blocked_until.is_some() || w.failures >= keep_from);
            if self.table.len() < FAIL_TABLE_MAX * 3 / 4 {
                return;
            }
        }
    }

    /// Drops windows that are over and not blocking, at most once per [`FAIL_SWEEP_PERIOD`].
    fn sweep(&self, now: Instant) {
        {
            let mut last = lock(&self.last_sweep);
            if last.is_some_and(|t| now.duration_since(t) < FAIL_SWEEP_PERIOD) {
                return;
            }
            *last = Some(now);
        }
        self.table.retain(|_, w| {
            now.duration_since(w.started) < FAIL_WINDOW || w.blocked_until.is_some_and(|u| u > now)
        });
    }

    /// Requests refused with 429 since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The connection caps of session (and public) ports: pending connections per client address
/// (`--max-pending-per-ip`) and client connections of the whole daemon (`--max-connections`).
#[derive(Debug)]
pub struct ConnectionLimits {
    /// Both changed by a config reload (SIGHUP).
    max_total: AtomicUsize,
    max_pending_per_ip: AtomicUsize,
    total: AtomicUsize,
    pending: Mutex<HashMap<ClientKey, usize>>,
    refused_total: AtomicU64,
    refused_pending: AtomicU64,
    /// When a refusal at accept was last logged.
    last_warned: Mutex<Option<Instant>>,
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptRefusal {
    /// `--max-connections` reached.
    Daemon,
    /// `--max-pending-per-ip` reached for this client.
    Pending,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_pending_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_pending_per_ip: AtomicUsize::new(max_pending_per_ip),
            total: AtomicUsize::new(0),
            pending: Mutex::new(HashMap::new()),
            refused_total: AtomicU64::new(0),
            refused_pending: AtomicU64::new(0),
            last_warned: Mutex::new(None),
        })
    }

    /// New caps (config reload): connections already open stay, new ones meet the new caps.
    pub fn set_caps(&self, max_total: usize, max_pending_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_pending_per_ip
            .store(max_pending_per_ip, Ordering::Relaxed);
    }

    /// Takes a slot for a new connection from `peer`, pending until
    /// [`ConnectionSlot::upgraded`]. `pending_exempt` (a trusted proxy) skips the per-address
    /// cap, since the proxy carries many clients. Refusals are counted and logged at most once
    /// a minute.
    pub fn admit(
        self: &Arc<Self>,
        peer: IpAddr,
        pending_exempt: bool,
    ) -> Result<ConnectionSlot, AcceptRefusal> {
        let taken = self
            .total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_total.load(Ordering::Relaxed)).then_some(n + 1)
            });
        if taken.is_err() {
            self.refused_total.fetch_add(1, Ordering::Relaxed);
            self.warn_refusal(peer, AcceptRefusal::Daemon);
            return Err(AcceptRefusal::Daemon);
        }
        let mut slot = ConnectionSlot {
            limits: Arc::clone(self),
            pending: None,
            released: AtomicBool::new(false),
        };
        if !pending_exempt {
            let key = ClientKey::of(peer);
            let mut pending = lock(&self.pending);
            let n = pending.entry(key).or_insert(0);
            if *n >= self.max_pending_per_ip.load(Ordering::Relaxed) {
                drop(pending);
                // Dropping the slot gives the daemon-wide place back.
                drop(slot);
                self.refused_pending.fetch_add(1, Ordering::Relaxed);
                self.warn_refusal(peer, AcceptRefusal::Pending);
                return Err(AcceptRefusal::Pending);
            }
            *n += 1;
            slot.pending = Some(key);
        }
        Ok(slot)
    }

    fn warn_refusal(&self, peer: IpAddr, why: AcceptRefusal) {
        let now = Instant::now();
        let mut last = lock(&self.last_warned);
        if last.is_some_and(|t| now.duration_since(t) < ACCEPT_WARN_PERIOD) {
            return;
        }
        *last = Some(now);
        match why {
            AcceptRefusal::Daemon => warn!(
                peer = %peer,
                max_connections = self.max_total.load(Ordering::Relaxed),
                refused = self.refused_total.load(Ordering::Relaxed),
                "connections closed at accept: --max-connections reached (logged once a minute)"
            ),
            AcceptRefusal::Pending => warn!(
                client = %ClientKey::of(peer),
                max_pending_per_ip = self.max_pending_per_ip.load(Ordering::Relaxed),
                refused = self.refused_pending.load(Ordering::Relaxed),
                "connections closed at accept: a client holds --max-pending-per-ip connections that have not upgraded (logged once a minute)"
            ),
        }
    }

    /// Client connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Connections closed at accept since start: (over `--max-connections`, over
    /// `--max-pending-per-ip`).
    pub fn refused(&self) -> (u64, u64) {
        (
            self.refused_total.load(Ordering::Relaxed),
            self.refused_pending.load(Ordering::Relaxed),
        )
    }

    fn release_pending(&self, key: ClientKey) {
        let mut pending = lock(&self.pending);
        if let Some(n) = pending.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                pending.remove(&key);
            }
        }
    }
}

/// One admitted connection's place under [`ConnectionLimits`]. Shared (in an `Arc`) by the
/// connection's task and, after an upgrade, the viewer's: the daemon-wide place is given back
/// when the last holder drops it.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    pending: Option<ClientKey>,
    released: AtomicBool,
}

impl ConnectionSlot {
    /// The connection became a viewer: it no longer counts as pending for its address.
    pub fn upgraded(&self) {
        if let Some(key) = self.pending
            && !self.released.swap(true, Ordering::AcqRel)
        {
            self.limits.release_pending(key);
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.upgraded();
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections to the control API, at most (what `--max-connections`' default leaves aside):
/// the API must not be a way to exhaust the daemon's descriptors, from any address.
pub const API_MAX_CONNECTIONS: usize = 256;
/// Connections to the control API per client address, at most; loopback is not held to it
/// (every local client is some 127.0.0.x, and operators on the host must get in).
pub const API_MAX_PER_ADDRESS: usize = 64;

/// `--max-connections` when unset: half of what the open-files limit leaves after the pool's
/// listeners and 256 for the API, the state file and logs (each viewer also holds a socket to
/// its VNC server). At least 64.
pub fn default_max_connections(nofile: u64, pool_size: usize) -> usize {
    let spare = nofile.saturating_sub(pool_size as u64 + 256) / 2;
    usize::try_from(spare).unwrap_or(usize::MAX).max(64)
}
