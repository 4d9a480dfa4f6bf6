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
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub total_ports: usize,
    pub allocated_ports: usize,
    pub free_ports: usize,
    pub foreign_ports: usize,
}

/// A range of ports, each either free, allocated to a session, or (for a while) foreign.
#[derive(Debug)]
pub struct PortPool {
    range: RangeInclusive<u16>,
    cap: usize,
    host: IpAddr,
    inner: Mutex<PoolInner>,
}

#[derive(Debug)]
struct PoolInner {
    /// Indexed by `port - first`.
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
    pub fn new(range: RangeInclusive<u16>, cap: usize, host: IpAddr) -> Arc<Self> {
        let len = range.len();
        Arc::new(PortPool {
            range,
            cap: cap.min(len),
            host,
            inner: Mutex::new(PoolInner {
                allocated: vec![false; len],
                allocated_count: 0,
                foreign: HashMap::new(),
            }),
        })
    }

    pub fn range(&self) -> &RangeInclusive<u16> {
        &self.range
    }

    pub fn cap(&self) -> usize {
        self.cap
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
        let mut inner = self.lock();
        if inner.allocated_count >= self.cap {
            return Err(self.at_cap(&inner));
        }
        let now = Instant::now();
        inner
            .foreign
            .retain(|_, since| now.duration_since(*since) < FOREIGN_HOLD);
        let first = *self.range.start();
        for idx in 0..inner.allocated.len() {
            let port = first + idx as u16;
            if inner.allocated[idx] || inner.foreign.contains_key(&port) {
                continue;
            }
            match bind_listener(SocketAddr::new(self.host, port)) {
                Ok(listener) => {
                    inner.allocated[idx] = true;
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
            first,
            last: *self.range.end(),
            allocated: inner.allocated_count,
            foreign: inner.foreign.len(),
            cap: self.cap,
        })
    }

    /// Binds one given port: a restarted daemon puts a session back where it was. The cap is
    /// not checked (a lowered `--max-sessions` must not drop live consoles at restart).
    pub fn allocate_port(
        self: &Arc<Self>,
        port: u16,
    ) -> Result<(PortLease, std::net::TcpListener), PoolError> {
        let mut inner = self.lock();
        let Some(idx) = self.index(port).filter(|&i| !inner.allocated[i]) else {
            return Err(PoolError::Bind {
                port,
                source: io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    "the port is outside --port-range or already allocated",
                ),
            });
        };
        match bind_listener(SocketAddr::new(self.host, port)) {
            Ok(listener) => {
                inner.allocated[idx] = true;
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

    fn at_cap(&self, inner: &PoolInner) -> PoolError {
        PoolError::AtCap {
            allocated: inner.allocated_count,
            cap: self.cap,
            first: *self.range.start(),
            last: *self.range.end(),
        }
    }

    fn index(&self, port: u16) -> Option<usize> {
        self.range
            .contains(&port)
            .then(|| usize::from(port - self.range.start()))
    }

    fn release(&self, port: u16) {
        let mut inner = self.lock();
        if let Some(idx) = self.index(port)
            && inner.allocated[idx]
        {
            inner.allocated[idx] = false;
            inner.allocated_count -= 1;
        }
    }

    pub fn stats(&self) -> PoolStats {
        let inner = self.lock();
        let now = Instant::now();
        let foreign = inner
            .foreign
            .iter()
            .filter(|(port, since)| {
                now.duration_since(**since) < FOREIGN_HOLD
                    && self.index(**port).is_some_and(|i| !inner.allocated[i])
            })
            .count();
        let total = inner.allocated.len();
        PoolStats {
            total_ports: total,
            allocated_ports: inner.allocated_count,
            foreign_ports: foreign,
            free_ports: total.saturating_sub(inner.allocated_count + foreign),
        }
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
}
