//! The read side of a connection ([`ReadSide`]): read only when readable, into a buffer
//! allocated once data is there, so an idle connection holds none.

use super::*;

/// Bytes one read of a generic stream takes at most, through a buffer on the stack.
const STREAM_READ: usize = 16 * 1024;

/// The read side of a connection, read only when readable so an idle one holds no buffer.
pub enum ReadSide {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
    /// Any other stream (a TLS stream's read half). It is read into the thread's scratch
    /// buffer during a poll, then appended, so waiting holds no heap buffer here either.
    Stream(Box<dyn AsyncRead + Send + Unpin>),
}

/// The first read after a quiet spell takes at most this much through the worker thread's
/// scratch buffer, copied into a buffer of its own size: a key press or an echo then costs no
/// 32 KiB allocation (nor its page faults). When it fills, the rest is read straight into a
/// heap buffer, so a stream pays one 4 KiB copy per burst, not a copy of everything.
pub(super) const FIRST_READ: usize = 4 * 1024;

thread_local! {
    /// One per worker thread, made once ([`STREAM_READ`] bytes, which covers [`FIRST_READ`]);
    /// borrowed only inside a synchronous read or a single poll.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; STREAM_READ].into_boxed_slice());
}

/// A socket whose readiness tokio tracks: TCP and unix streams.
trait ReadySocket {
    fn try_read_slice(&self, dst: &mut [u8]) -> io::Result<usize>;
    fn try_read_into(&self, dst: &mut BytesMut) -> io::Result<usize>;
    /// Runs `f`; a `WouldBlock` from it clears the socket's read readiness.
    fn with_readiness<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R>;
}

macro_rules! ready_socket {
    ($t:ty) => {
        impl ReadySocket for $t {
            fn try_read_slice(&self, dst: &mut [u8]) -> io::Result<usize> {
                self.try_read(dst)
            }
            fn try_read_into(&self, dst: &mut BytesMut) -> io::Result<usize> {
                self.try_read_buf(dst)
            }
            fn with_readiness<R>(&self, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
                self.try_io(tokio::io::Interest::READABLE, f)
            }
        }
    };
}
ready_socket!(tokio::net::TcpStream);
ready_socket!(tokio::net::UnixStream);

/// Appends `data` to `buf` after its first `prefix` bytes (zeroed room for a frame header).
fn append(buf: &mut BytesMut, prefix: usize, data: &[u8]) {
    if buf.len() < prefix {
        buf.reserve(prefix - buf.len() + data.len());
        buf.resize(prefix, 0);
    }
    buf.extend_from_slice(data);
}

/// One read from a socket that was just reported readable; `WouldBlock` when it was not.
///
/// A read of fewer than `settle` bytes is taken as having drained the socket, and its
/// readiness is cleared, so the next read waits for epoll instead of making a read that can
/// only answer `WouldBlock` (one wasted syscall per key press or echo). A larger read keeps the
/// socket marked readable: while a VNC server streams, the next read at once mostly finds new
/// data, which measured 10-15% faster at 800 sessions than waiting for epoll.
fn read_ready<S: ReadySocket>(
    socket: &S,
    buf: &mut BytesMut,
    want: usize,
    prefix: usize,
    settle: usize,
    scratch_first: bool,
) -> io::Result<usize> {
    // A full read must never count as draining the socket: with edge-triggered readiness the
    // rest would wait for the peer's next send.
    debug_assert!(settle <= want, "settle {settle} > want {want}");
    let mut drained = None;
    let fresh = scratch_first && buf.capacity() == 0;
    let result = socket.with_readiness(|| {
        let n = if fresh {
            let first = want.min(FIRST_READ);
            let n = SCRATCH.with_borrow_mut(|scratch| {
                let n = socket.try_read_slice(&mut scratch[..first])?;
                if n == first && want > first {
                    // More is likely waiting: room for all of it, so the read below does
                    // not reallocate (and copy) what is here.
                    buf.reserve(prefix + want);
                }
                append(buf, prefix, &scratch[..n]);
                Ok::<_, io::Error>(n)
            })?;
            if n < first || want <= first {
                n
            } else {
                match socket.try_read_into(buf) {
                    Ok(more) => n + more,
                    // Drained: tokio cleared the readiness; hand on what was read.
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => n,
                    // A reset: the kernel drops unread data then too, so the bytes above go
                    // with it and the caller sees the failure now, not a clean end later.
                    Err(e) => return Err(e),
                }
            }
        } else {
            if buf.len() < prefix {
                buf.reserve(prefix - buf.len() + want);
                buf.resize(prefix, 0);
            } else {
                buf.reserve(want);
            }
            socket.try_read_into(buf)?
        };
        if n > 0 && n < settle {
            drained = Some(n);
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (result, drained) {
        (Err(_), Some(n)) => Ok(n),
        (other, _) => other,
    }
}

impl ReadSide {
    /// Waits for data, then reads up to `want` bytes into `buf` (which may start empty and
    /// unallocated) after its first `prefix` bytes (zeroed room kept for a frame header).
    /// Returns 0 at EOF. Cancel-safe. A read of fewer than `settle` bytes clears the socket's
    /// readiness (see [`read_ready`]). With `scratch_first`, an unallocated `buf` is first read
    /// through the thread's scratch buffer ([`FIRST_READ`] bytes, for small messages); without,
    /// it is allocated for `want` bytes once the socket is readable (a stream's next chunk: one
    /// read, no copy). A read that finds nothing leaves `buf` unallocated again when it held
    /// no data, so waiting holds no buffer either way.
    pub async fn read_lazy(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
        prefix: usize,
        settle: usize,
        scratch_first: bool,
    ) -> io::Result<usize> {
        loop {
            let read = match self {
                ReadSide::Tcp(r) => {
                    r.readable().await?;
                    read_ready(r.as_ref(), buf, want, prefix, settle, scratch_first)
                }
                ReadSide::Unix(r) => {
                    r.readable().await?;
                    read_ready(r.as_ref(), buf, want, prefix, settle, scratch_first)
                }
                ReadSide::Stream(r) => return read_stream(r.as_mut(), buf, want, prefix).await,
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if buf.len() <= prefix {
                        // Nothing came: no buffer is held while waiting.
                        *buf = BytesMut::new();
                    }
                }
                other => return other,
            }
        }
    }
}

/// One read of at most `want` (and [`STREAM_READ`]) bytes from `r`, appended to `buf` after its
/// first `prefix` bytes. The bytes land in the thread's scratch buffer first: the heap buffer
/// is touched only once data is there.
async fn read_stream(
    r: &mut (dyn AsyncRead + Send + Unpin),
    buf: &mut BytesMut,
    want: usize,
    prefix: usize,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut chunk = ReadBuf::new(&mut scratch[..want.clamp(1, STREAM_READ)]);
            std::task::ready!(Pin::new(&mut *r).poll_read(cx, &mut chunk))?;
            let got = chunk.filled();
            append(buf, prefix, got);
            std::task::Poll::Ready(Ok(got.len()))
        })
    })
    .await
}
