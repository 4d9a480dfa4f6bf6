//! Deadlines hyper does not enforce itself: a response's write ([`Timed`]) and a request
//! body's read ([`DeadlineBody`]), DESIGN.md's access-control list of connection deadlines.

use super::*;

/// A stream whose writes fail with `TimedOut` once [`WRITE_TIMEOUT`] has passed since the
/// response being written began: its first write after the request was read. Bytes read from
/// the client (the next request) end that response's clock. Reads are bounded by hyper's
/// header timer and the API's body deadline. After an upgrade the relay takes the inner stream
/// back; the relay has its own keepalive.
pub struct Timed<S> {
    io: S,
    /// When the response being written must be out; allocated on the first write only.
    deadline: Option<Pin<Box<Sleep>>>,
    writing: bool,
}

impl<S> Timed<S> {
    pub fn new(io: S) -> Self {
        Timed {
            io,
            deadline: None,
            writing: false,
        }
    }

    /// The stream, for the relay after an upgrade.
    pub fn into_inner(self) -> S {
        self.io
    }

    /// Before a write-side operation: starts the response's clock at its first bytes
    /// (`start`; hyper also flushes while a handler is still working, which must not count),
    /// and fails once the clock has run out. Registers for a wake-up at the deadline, so an
    /// operation that stays pending fails then too.
    fn check_deadline(&mut self, cx: &mut Context<'_>, start: bool) -> io::Result<()> {
        if !self.writing {
            if !start {
                return Ok(());
            }
            self.writing = true;
            let at = tokio::time::Instant::now() + WRITE_TIMEOUT;
            match &mut self.deadline {
                Some(sleep) => sleep.as_mut().reset(at),
                None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        let passed = match &mut self.deadline {
            Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
            None => false,
        };
        if passed {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took over {} s to read a response",
                    WRITE_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Runs one write-side operation under the response's deadline.
    fn timed<T>(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        start: bool,
        op: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        let this = self.get_mut();
        if let Err(err) = this.check_deadline(cx, start) {
            return Poll::Ready(Err(err));
        }
        op(Pin::new(&mut this.io), cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Timed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // The client sent more: the next write belongs to the next response.
            this.writing = false;
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Timed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.timed(cx, !buf.is_empty(), |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let start = bufs.iter().any(|b| !b.is_empty());
        self.timed(cx, start, |io, cx| io.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.timed(cx, false, |io, cx| io.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A TLS close_notify can block on a full socket too.
        self.timed(cx, false, |io, cx| io.poll_shutdown(cx))
    }
}

/// A request body that fails with `TimedOut` once [`BODY_READ_TIMEOUT`] has passed since the
/// request's headers arrived, however the bytes trickle in.
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Pin<Box<Sleep>>,
}

impl<B> DeadlineBody<B> {
    /// Starts the clock now (call when the headers are in).
    pub fn new(inner: B) -> Self {
        DeadlineBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(BODY_READ_TIMEOUT)),
        }
    }
}

/// Why a request body was cut off.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {} s", BODY_READ_TIMEOUT.as_secs())]
pub struct BodyTimedOut;

impl<B> Body for DeadlineBody<B>
where
    B: Body + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = B::Data;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match this.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
