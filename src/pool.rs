//! The port pool: the range, bind-on-allocate, release and stats.
//!
//! Allocating a port *is* binding its listener: the daemon holds the socket from allocation until
//! release, so nothing can take the port between "checked" and "used". A port some other process
//! holds answers `EADDRINUSE`; it is skipped and remembered as foreign for [`FOREIGN_HOLD`].

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

/// How long a port that answered `EADDRINUSE` is left alone before it is tried again.
pub const FOREIGN_HOLD: Duration = Duration::from_secs(30);
/// Room for a burst of browsers connecting at once.
const LISTEN_BACKLOG: i32 = 1024;

/// Why no port could be handed out.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(
        "port pool exhausted: {allocated} sessions hold ports and the cap (--max-sessions) is {cap}; range {first}-{last}. Close sessions or raise --max-sessions/--port-range"
    )]
    AtCap {
        allocated: usize,
        cap: usize,
        first: u16,
        last: u16,
    },
    #[error(
        "port pool exhausted: no port of range {first}-{last} can be bound ({allocated} held by sessions, {foreign} by other processes, cap {cap}). Widen --port-range or free ports"
    )]
    NoBindablePort {
        first: u16,
        last: u16,
        allocated: usize,
        foreign: usize,
        cap: usize,
    },
    #[error(
        "session cap reached: {sessions} sessions are open and --max-sessions is {cap} (--session-ports off). Close sessions or raise --max-sessions"
    )]
    SessionCap { sessions: usize, cap: usize },
    #[error("binding port {port} failed: {source} (errno {errno})", errno = source.raw_os_error().unwrap_or(0))]
    Bind { port: u16, source: io::Error },
}

impl PoolError {
    /// True for the cases the API reports as `pool_exhausted` (503).
    pub fn is_exhausted(&self) -> bool {
        !matches!(self, PoolError::Bind { .. })
    }
}

/// Counts for `/v1/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub total_ports: usize,
    pub allocated_ports: usize,
    pub free_ports: usize,
    pub foreign_ports: usize,
    /// Sessions on ports a config reload moved the range away from (they keep them until
    /// they close); not part of the other counts, but held against the cap.
    pub outside_range_ports: usize,
}

/// A range of ports, each either free, allocated to a session, or (for a while) foreign. The
/// range and the cap can change while the daemon runs (SIGHUP): sessions on ports outside a new
/// range keep them until they close; new opens use the new range.
#[derive(Debug)]
pub struct PortPool {
    host: IpAddr,
    inner: Mutex<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    range: RangeInclusive<u16>,
    cap: usize,
    /// Indexed by port (64 KiB): a session keeps its port when the range moves away from it.
    allocated: Vec<bool>,
    allocated_count: usize,
    /// Port -> when it was found held by another process.
    foreign: HashMap<u16, Instant>,
}

/// A port held by a session. Dropping it returns the port to the pool, so every early return
/// of an open rolls the allocation back.
#[derive(Debug)]
pub struct PortLease {
    pool: Arc<PortPool>,
    port: u16,
}

impl PortLease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.pool.release(self.port);
    }
}

impl PortPool {
    /// A pool of `range` with at most `cap` sessions (clamped to the range's size).
    pub fn new(range: RangeInclusive<u16>, cap: usize, host: IpAddr) -> Arc<Self> {
        Arc::new(PortPool {
            host,
            inner: Mutex::new(PoolInner {
                cap: cap.min(range.len()),
                range,
                allocated: vec![false; usize::from(u16::MAX) + 1],
                allocated_count: 0,
                foreign: HashMap::new(),
            }),
        })
    }

    /// The range opens bind from now on (`--port-range`).
    pub fn range(&self) -> RangeInclusive<u16> {
        self.lock().range.clone()
    }

    /// The most sessions at once (`--max-sessions`, at most the range's size).
    pub fn cap(&self) -> usize {
        self.lock().cap
    }

    /// Puts a new range and cap (clamped to the range's size) in place: later opens use them;
    /// sessions keep the ports they have, inside the range or not.
    pub fn reconfigure(&self, range: RangeInclusive<u16>, cap: usize) {
        let mut inner = self.lock();
        inner.cap = cap.min(range.len());
        inner.range = range;
    }

    fn lock(&self) -> MutexGuard<'_, PoolInner> {
        // A panic while holding the lock cannot leave the bookkeeping half-updated (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds the lowest free port of the range and hands out its listener with a lease.
    ///
    /// Cost is one pass over the range at most; foreign ports are not retried until their hold
    /// expires, so a crowded range does not turn into a bind storm.
    pub fn allocate(self: &Arc<Self>) -> Result<(PortLease, std::net::TcpListener), PoolError> {
        self.allocate_within(true)
    }

    /// [`PortPool::allocate`] without the cap: a restart gives a port to a session that had
    /// none (`--session-ports off` before), rather than drop it.
    pub fn allocate_uncapped(
        self: &Arc<Self>,
    ) -> Result<(PortLease, std::net::TcpListener), PoolError> {
        self.allocate_within(false)
    }

    fn allocate_within(
        self: &Arc<Self>,
        capped: bool,
    ) -> Result<(PortLease, std::net::TcpListener), PoolError> {
        let mut inner = self.lock();
        if capped && inner.allocated_count >= inner.cap {
            return Err(at_cap(&inner));
        }
        let now = Instant::now();
        inner
            .foreign
            .retain(|_, since| now.duration_since(*since) < FOREIGN_HOLD);
        for port in inner.range.clone() {
            if inner.allocated[usize::from(port)] || inner.foreign.contains_key(&port) {
                continue;
            }
            match bind_listener(SocketAddr::new(self.host, port)) {
                Ok(listener) => {
                    inner.allocated[usize::from(port)] = true;
                    inner.allocated_count += 1;
                    return Ok((
                        PortLease {
                            pool: Arc::clone(self),
                            port,
                        },
                        listener,
                    ));
                }
                Err(err) if err.kind() == io::ErrorKind::AddrInUse => {
                    tracing::debug!(port, "port held by another process; skipped");
                    inner.foreign.insert(port, now);
                }
                Err(source) => return Err(PoolError::Bind { port, source }),
            }
        }
        Err(PoolError::NoBindablePort {
            first: *inner.range.start(),
            last: *inner.range.end(),
            allocated: inner.allocated_count,
            foreign: inner.foreign.len(),
            cap: inner.cap,
        })
    }

    /// Binds one given port of the range: a restarted daemon puts a session back where it was.
    /// The cap is not checked (a lowered `--max-sessions` must not drop live consoles at
    /// restart).
    pub fn allocate_port(
        self: &Arc<Self>,
        port: u16,
    ) -> Result<(PortLease, std::net::TcpListener), PoolError> {
        let mut inner = self.lock();
        if !inner.range.contains(&port) || inner.allocated[usize::from(port)] {
            return Err(PoolError::Bind {
                port,
                source: io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    "the port is outside --port-range or already allocated",
                ),
            });
        }
        match bind_listener(SocketAddr::new(self.host, port)) {
            Ok(listener) => {
                inner.allocated[usize::from(port)] = true;
                inner.allocated_count += 1;
                inner.foreign.remove(&port);
                Ok((
                    PortLease {
                        pool: Arc::clone(self),
                        port,
                    },
                    listener,
                ))
            }
            Err(source) => {
                if source.kind() == io::ErrorKind::AddrInUse {
                    inner.foreign.insert(port, Instant::now());
                }
                Err(PoolError::Bind { port, source })
            }
        }
    }

    fn release(&self, port: u16) {
        let mut inner = self.lock();
        if inner.allocated[usize::from(port)] {
            inner.allocated[usize::from(port)] = false;
            inner.allocated_count -= 1;
        }
    }

    /// Counts of the current range (`free = total - allocated - foreign`), and the sessions
    /// left outside it by a reload.
    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        let now = Instant::now();
        let foreign = inner
            .foreign
            .iter()
            .filter(|(port, since)| {
                now.duration_since(**since) < FOREIGN_HOLD
                    && inner.range.contains(port)
                    && !inner.allocated[usize::from(**port)]
            })
            .count();
        let in_range = inner
            .range
            .clone()
            .filter(|p| inner.allocated[usize::from(*p)])
            .count();
        let total = inner.range.len();
        PoolStats {
            total_ports: total,
            allocated_ports: in_range,
            foreign_ports: foreign,
            free_ports: total.saturating_sub(in_range + foreign),
            outside_range_ports: inner.allocated_count - in_range,
        }
    }
}

fn at_cap(inner: &PoolInner) -> PoolError {
    PoolError::AtCap {
        allocated: inner.allocated_count,
        cap: inner.cap,
        first: *inner.range.start(),
        last: *inner.range.end(),
    }
}

/// A non-blocking listener with SO_REUSEADDR (rebindable right after a close, despite TIME_WAIT)
/// and never SO_REUSEPORT (which would hide a conflict). `::` is bound dual-stack.
pub fn bind_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if let IpAddr::V6(ip) = addr.ip()
        && ip.is_unspecified()
    {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// A block of ports below the ephemeral range that no other unit test uses.
    fn pool(first: u16, len: u16, cap: usize) -> Arc<PortPool> {
        PortPool::new(
            first..=first + len - 1,
            cap,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
        )
    }

    #[test]
    fn lowest_free_port_first_and_reuse_after_release() {
        let p = pool(31100, 4, 4);
        let (a, _la) = p.allocate().expect("first");
        let (b, _lb) = p.allocate().expect("second");
        assert_eq!((a.port(), b.port()), (31100, 31101));
        drop(a);
        drop(_la);
        let (c, _lc) = p.allocate().expect("third");
        assert_eq!(c.port(), 31100);
        assert_eq!(p.stats().allocated_ports, 2);
    }

    #[test]
    fn cap_is_enforced() {
        let p = pool(31110, 4, 1);
        let _held = p.allocate().expect("first");
        let err = p.allocate().expect_err("cap");
        assert!(err.is_exhausted());
        assert!(err.to_string().contains("31110-31113"), "{err}");
    }

    #[test]
    fn foreign_ports_are_skipped_and_counted() {
        let p = pool(31120, 3, 3);
        let _foreign = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 31120)).expect("bind");
        let (lease, _l) = p.allocate().expect("allocate");
        assert_eq!(lease.port(), 31121);
        let s = p.stats();
        assert_eq!(
            (s.allocated_ports, s.foreign_ports, s.free_ports),
            (1, 1, 1)
        );
        let _second = p.allocate().expect("second");
        let err = p.allocate().expect_err("nothing bindable");
        assert!(matches!(err, PoolError::NoBindablePort { foreign: 1, .. }));
    }

    #[test]
    fn a_new_range_leaves_held_ports_and_serves_new_opens() {
        let p = pool(31130, 2, 2);
        let (old, _l) = p.allocate().expect("first");
        assert_eq!(old.port(), 31130);
        p.reconfigure(31140..=31142, 5);
        assert_eq!(p.cap(), 3, "clamped to the range");
        let (new, _l2) = p.allocate().expect("in the new range");
        assert_eq!(new.port(), 31140);
        let s = p.stats();
        assert_eq!(
            (
                s.total_ports,
                s.allocated_ports,
                s.free_ports,
                s.outside_range_ports
            ),
            (3, 1, 2, 1)
        );
        drop(old);
        assert_eq!(
            p.stats().outside_range_ports,
            0,
            "released outside the range"
        );
        p.reconfigure(31140..=31142, 1);
        assert!(p.allocate().expect_err("at the new cap").is_exhausted());
    }
}
