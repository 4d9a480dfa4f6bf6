//! WebSocket framing for the relay (RFC 6455, server side, no extensions).
//!
//! The reader unmasks client data in place and hands binary payload on in pieces as it arrives,
//! so a large client message never has to fit in memory and fragmented messages need no
//! reassembly (VNC is a byte stream). The writer puts a frame header in room kept in front of the
//! payload and sends both with one write, without copying the payload. Both keep no buffer while
//! the socket is idle. Frames go over any stream: TCP and unix sockets are read when readable,
//! any other `AsyncRead` (a TLS stream) through the thread's scratch buffer, so idle costs
//! nothing.

use std::io;

use std::pin::Pin;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{tcp, unix};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Bytes read from a client at a time: its messages are small (keys, pointer, clipboard).
const CLIENT_READ: usize = 16 * 1024;

/// Why a client's WebSocket stream cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    #[error("connection error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message too big: a frame of {0} bytes exceeds the limit")]
    TooBig(u64),
    /// Text that must be UTF-8 is not (RFC 6455 section 8.1): close code 1007.
    #[error("invalid data: {0}")]
    InvalidUtf8(&'static str),
    #[error("connection ended")]
    Eof,
}

/// What a client sent.
#[derive(Debug)]
pub enum Event {
    /// Unmasked payload of a binary message (a piece of a frame, in order).
    Data(BytesMut),
    Ping(Bytes),
    Pong,
    /// A close frame: its code, if any.
    Close(Option<u16>),
}

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
const FIRST_READ: usize = 4 * 1024;

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
) -> io::Result<usize> {
    // A full read must never count as draining the socket: with edge-triggered readiness the
    // rest would wait for the peer's next send.
    debug_assert!(settle <= want, "settle {settle} > want {want}");
    let mut drained = None;
    let fresh = buf.capacity() == 0;
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
    /// readiness (see [`read_ready`]).
    pub async fn read_lazy(
        &mut self,
        buf: &mut BytesMut,
        want: usize,
        prefix: usize,
        settle: usize,
    ) -> io::Result<usize> {
        loop {
            let read = match self {
                ReadSide::Tcp(r) => {
                    r.readable().await?;
                    read_ready(r.as_ref(), buf, want, prefix, settle)
                }
                ReadSide::Unix(r) => {
                    r.readable().await?;
                    read_ready(r.as_ref(), buf, want, prefix, settle)
                }
                ReadSide::Stream(r) => return read_stream(r.as_mut(), buf, want, prefix).await,
            };
            match read {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
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

/// Room a read buffer keeps in front of its payload for the largest frame header, so header and
/// payload go out in one plain `write`: no copy of the payload, and no iovec (measured a little
/// cheaper than `writev` of header and payload at 800 sessions).
pub const HEADROOM: usize = 10;

/// Sends frames; owned by one task, so no lock is taken per frame.
pub struct FrameWriter<W> {
    io: W,
}

/// The header of an unmasked server frame; returns its length.
pub(crate) fn encode_header(head: &mut [u8; 10], opcode: u8, len: usize) -> usize {
    head[0] = 0x80 | opcode;
    if len < 126 {
        head[1] = len as u8;
        2
    } else if len <= 0xffff {
        head[1] = 126;
        head[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        head[1] = 127;
        head[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(io: W) -> Self {
        FrameWriter { io }
    }

    /// One frame whose payload is `buf[HEADROOM..]`; the header is written into the headroom
    /// and the frame goes out in one write, the payload never copied.
    pub async fn send_in_place(&mut self, opcode: u8, buf: &mut [u8]) -> io::Result<()> {
        let Some(len) = buf.len().checked_sub(HEADROOM) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame buffer lacks its header room",
            ));
        };
        let mut head = [0u8; 10];
        let n = encode_header(&mut head, opcode, len);
        let start = HEADROOM - n;
        buf[start..HEADROOM].copy_from_slice(&head[..n]);
        self.io.write_all(&buf[start..]).await
    }

    /// One complete frame with a small payload (control frames), copied into one write.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = vec![0u8; HEADROOM + payload.len()];
        frame[HEADROOM..].copy_from_slice(payload);
        self.send_in_place(opcode, &mut frame).await
    }

    /// A close frame with a code and a reason (cut to the protocol's 123 bytes).
    pub async fn close(&mut self, code: u16, reason: &str) -> io::Result<()> {
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        let mut payload = Vec::with_capacity(2 + end);
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        self.send(OP_CLOSE, &payload).await?;
        self.io.shutdown().await
    }
}

/// Where the reader is in the frame stream.
#[derive(Debug, Clone, Copy)]
enum ReadState {
    Header,
    /// Inside a data frame's payload.
    Payload {
        left: u64,
        mask: [u8; 4],
        /// Position in the mask cycle.
        offset: usize,
        /// Binary payload is handed on; text payload is skipped.
        binary: bool,
    },
}

/// Reads a client's frames.
pub struct FrameReader {
    io: ReadSide,
    buf: BytesMut,
    state: ReadState,
    /// Opcode of a fragmented message in progress.
    message: Option<u8>,
    /// Whether the frame being read ends its message.
    fin: bool,
    max_frame: u64,
}

/// XORs `data`, which starts `offset` bytes into its frame's payload, with the frame's mask,
/// eight bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let m: [u8; 4] = std::array::from_fn(|i| mask[(offset + i) & 3]);
    let word = u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[0], m[1], m[2], m[3]]);
    let mut words = data.chunks_exact_mut(8);
    for chunk in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(w) ^ word).to_ne_bytes());
    }
    // The tail starts a multiple of 8 (so of 4) bytes after `offset`.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= m[i & 3];
    }
}

impl FrameReader {
    /// `leftover` is what the HTTP layer read past the upgrade request.
    pub fn new(io: ReadSide, leftover: Bytes, max_frame: u64) -> Self {
        FrameReader {
            io,
            buf: BytesMut::from(&leftover[..]),
            state: ReadState::Header,
            message: None,
            fin: true,
            max_frame,
        }
    }

    async fn fill(&mut self) -> Result<(), WsError> {
        if self.buf.is_empty() {
            // Drop the old allocation while waiting: an idle viewer costs no buffer.
            self.buf = BytesMut::new();
        }
        // Client messages are small: any short read drained the socket.
        match self
            .io
            .read_lazy(&mut self.buf, CLIENT_READ, 0, CLIENT_READ)
            .await?
        {
            0 => Err(WsError::Eof),
            _ => Ok(()),
        }
    }

    /// The next thing the client sent. Text messages are skipped (VNC is binary).
    pub async fn next(&mut self) -> Result<Event, WsError> {
        loop {
            match self.state {
                ReadState::Header => {
                    let Some(head) = parse_header(&self.buf)? else {
                        self.fill().await?;
                        continue;
                    };
                    if let Some(event) = self.start_frame(head).await? {
                        return Ok(event);
                    }
                }
                ReadState::Payload { left, .. } => {
                    if left == 0 {
                        self.end_frame();
                        continue;
                    }
                    if self.buf.is_empty() {
                        self.fill().await?;
                    }
                    if let Some(chunk) = self.take_payload() {
                        return Ok(Event::Data(chunk));
                    }
                }
            }
        }
    }

    /// Binary payload that is already buffered and continues the data stream, without reading
    /// the socket: `None` when nothing is, or when a control frame or text comes first (left for
    /// `next`). Lets the relay hand several small messages to the VNC server in one write.
    pub fn next_buffered(&mut self) -> Result<Option<BytesMut>, WsError> {
        loop {
            match self.state {
                ReadState::Header => {
                    let Some(head) = parse_header(&self.buf)? else {
                        return Ok(None);
                    };
                    if head.opcode >= 0x8 {
                        return Ok(None);
                    }
                    self.start_data_frame(head)?;
                }
                ReadState::Payload { left: 0, .. } => self.end_frame(),
                ReadState::Payload { binary: false, .. } => return Ok(None),
                ReadState::Payload { .. } if self.buf.is_empty() => return Ok(None),
                ReadState::Payload { .. } => return Ok(self.take_payload()),
            }
        }
    }

    /// The buffered part of the current frame's payload, unmasked; `None` for text (skipped).
    fn take_payload(&mut self) -> Option<BytesMut> {
        let ReadState::Payload {
            left,
            mask,
            offset,
            binary,
        } = self.state
        else {
            return None;
        };
        let n = (left as usize).min(self.buf.len());
        let mut chunk = self.buf.split_to(n);
        let left = left - n as u64;
        self.state = ReadState::Payload {
            left,
            mask,
            offset: offset + n,
            binary,
        };
        if left == 0 {
            self.end_frame();
        }
        binary.then(|| {
            unmask(&mut chunk, mask, offset);
            chunk
        })
    }

    fn end_frame(&mut self) {
        if self.fin {
            self.message = None;
        }
        self.state = ReadState::Header;
    }

    /// Checks a parsed header; a control frame is read whole and returned, a data frame
    /// switches to its payload.
    async fn start_frame(&mut self, head: Header) -> Result<Option<Event>, WsError> {
        if head.opcode >= 0x8 {
            if !head.fin || head.len > 125 {
                return Err(WsError::Protocol("fragmented or oversized control frame"));
            }
            let total = head.header_len + head.len as usize;
            while self.buf.len() < total {
                self.fill().await?;
            }
            self.buf.advance(head.header_len);
            let mut payload = self.buf.split_to(head.len as usize);
            unmask(&mut payload, head.mask, 0);
            return match head.opcode {
                OP_PING => Ok(Some(Event::Ping(payload.freeze()))),
                OP_PONG => Ok(Some(Event::Pong)),
                OP_CLOSE => parse_close(&payload).map(|code| Some(Event::Close(code))),
                _ => Err(WsError::Protocol("unknown control opcode")),
            };
        }
        self.start_data_frame(head)?;
        Ok(None)
    }

    /// Checks a data frame's header against the message in progress and switches to its payload.
    fn start_data_frame(&mut self, head: Header) -> Result<(), WsError> {
        let kind = match (head.opcode, self.message) {
            (OP_CONTINUATION, Some(kind)) => kind,
            (OP_CONTINUATION, None) => {
                return Err(WsError::Protocol("continuation frame outside a message"));
            }
            (OP_TEXT | OP_BINARY, None) => head.opcode,
            (OP_TEXT | OP_BINARY, Some(_)) => {
                return Err(WsError::Protocol("new message inside a fragmented one"));
            }
            _ => return Err(WsError::Protocol("unknown data opcode")),
        };
        if head.len > self.max_frame {
            return Err(WsError::TooBig(head.len));
        }
        self.buf.advance(head.header_len);
        self.message = Some(kind);
        self.fin = head.fin;
        self.state = ReadState::Payload {
            left: head.len,
            mask: head.mask,
            offset: 0,
            binary: kind == OP_BINARY,
        };
        Ok(())
    }
}

/// Whether a close code may be sent on the wire (RFC 6455 section 7.4): the defined codes
/// 1000-1003 and 1007-1014 (1012-1014 registered with IANA since), and 3000-4999 for
/// libraries and applications. 1004-1006 and 1015 are reserved and never sent.
pub fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The code of a close frame's payload: none for an empty one; a 1-byte payload or an invalid
/// code is a protocol error (1002), a reason that is not UTF-8 is 1007 (RFC 6455 5.5.1, 7.4).
fn parse_close(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::Protocol("close frame with a 1-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !valid_close_code(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(reason).is_err() {
                return Err(WsError::InvalidUtf8("close reason is not UTF-8"));
            }
            Ok(Some(code))
        }
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    len: u64,
    mask: [u8; 4],
    header_len: usize,
}

/// The header at the start of `buf`, or `None` if it is not all there yet.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WsError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err(WsError::Protocol("reserved bits set without an extension"));
    }
    if b1 & 0x80 == 0 {
        return Err(WsError::Protocol("client frames must be masked"));
    }
    let (len, at) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            if buf[2] & 0x80 != 0 {
                return Err(WsError::Protocol(
                    "frame length with its most significant bit set",
                ));
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&buf[at..at + 4]);
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        len,
        mask,
        header_len: at + 4,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    /// A reader over a socket pair fed with `wire`, in pieces of `piece` bytes.
    async fn read_all(wire: Vec<u8>, piece: usize) -> (Vec<u8>, Vec<String>) {
        let (a, b) = tokio::net::UnixStream::pair().expect("pair");
        let (r, _w) = a.into_split();
        read_events(ReadSide::Unix(r), b, wire, piece).await
    }

    /// Feeds `wire` into `peer` in pieces of `piece` bytes while a reader over `side` reads;
    /// returns the payload and the other events, an error ending them.
    async fn read_events<P>(
        side: ReadSide,
        mut peer: P,
        wire: Vec<u8>,
        piece: usize,
    ) -> (Vec<u8>, Vec<String>)
    where
        P: AsyncWrite + Unpin + Send + 'static,
    {
        let writer = tokio::spawn(async move {
            for c in wire.chunks(piece) {
                if peer.write_all(c).await.is_err() {
                    break;
                }
            }
            peer
        });
        let mut reader = FrameReader::new(side, Bytes::new(), 1 << 20);
        let mut data = Vec::new();
        let mut events = Vec::new();
        loop {
            match reader.next().await {
                Ok(Event::Data(d)) => data.extend_from_slice(&d),
                Ok(Event::Close(code)) => {
                    events.push(format!("close {code:?}"));
                    break;
                }
                Ok(other) => events.push(format!("{other:?}")),
                Err(e) => {
                    events.push(format!("error {e}"));
                    break;
                }
            }
        }
        // The writer may still be blocked on what the reader refused to read.
        drop(reader);
        writer.abort();
        (data, events)
    }

    #[tokio::test]
    async fn fragmented_masked_binary_with_interleaved_control_frames() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 253) as u8).collect();
        let mut wire = masked(OP_BINARY, false, b"hel", [1, 2, 3, 4]);
        wire.extend(masked(OP_PING, true, b"p", [9, 9, 9, 9]));
        wire.extend(masked(OP_CONTINUATION, true, b"lo", [5, 6, 7, 8]));
        wire.extend(masked(OP_TEXT, true, b"ignored", [1, 1, 1, 1]));
        wire.extend(masked(OP_BINARY, true, &big, [0xde, 0xad, 0xbe, 0xef]));
        wire.extend(masked(OP_CLOSE, true, &1000u16.to_be_bytes(), [3, 3, 3, 3]));
        for piece in [1, 3, 7, 1000, 1 << 20] {
            let (data, events) = read_all(wire.clone(), piece).await;
            let mut want = b"hello".to_vec();
            want.extend_from_slice(&big);
            assert!(data == want, "piece {piece}: payload differs");
            assert_eq!(
                events,
                vec!["Ping(b\"p\")".to_string(), "close Some(1000)".into()],
                "piece {piece}"
            );
        }
    }

    /// `read_lazy` on a unix socket: a short read clears readiness, yet data sent later is
    /// still seen; a read that fills `FIRST_READ` with more pending takes the rest at once.
    #[tokio::test]
    async fn short_reads_settle_and_later_data_still_arrives() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let (r, _w) = a.into_split();
        let mut side = ReadSide::Unix(r);
        b.write_all(b"key").await.expect("write");
        let mut buf = BytesMut::new();
        let n = side
            .read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096)
            .await
            .expect("read");
        assert_eq!((n, &buf[HEADROOM..]), (3, &b"key"[..]));
        // Readiness was cleared; the next bytes come later and must wake the reader.
        let later = tokio::spawn(async move {
            tokio::task::yield_now().await;
            b.write_all(b"later").await.expect("write");
            b
        });
        let mut buf = BytesMut::new();
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            side.read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096),
        )
        .await
        .expect("the later bytes woke the reader")
        .expect("read");
        assert_eq!((n, &buf[HEADROOM..]), (5, &b"later"[..]));
        let mut b = later.await.expect("writer");

        // Exactly FIRST_READ bytes and 10 KiB more already queued: one call takes all.
        let data: Vec<u8> = (0..FIRST_READ + 10_240).map(|i| (i % 253) as u8).collect();
        b.write_all(&data).await.expect("write");
        let mut got = Vec::new();
        let mut calls = 0;
        while got.len() < data.len() {
            // Fresh and empty, as the relay hands it after a drained read.
            let mut buf = BytesMut::new();
            calls += 1;
            let n = side
                .read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096)
                .await
                .expect("read");
            assert_eq!(n, buf.len() - HEADROOM);
            got.extend_from_slice(&buf[HEADROOM..]);
        }
        assert!(got == data, "bytes differ");
        assert_eq!(calls, 1, "the full first read took the rest in place");
    }

    /// The same frames through an in-memory stream (`ReadSide::Stream`, as a TLS stream is
    /// read), fed in pieces.
    #[tokio::test]
    async fn frames_over_any_async_read_stream() {
        let big: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
        let mut wire = masked(OP_BINARY, false, b"ab", [1, 2, 3, 4]);
        wire.extend(masked(OP_PING, true, b"p", [9, 9, 9, 9]));
        wire.extend(masked(OP_CONTINUATION, true, &big, [5, 6, 7, 8]));
        wire.extend(masked(OP_CLOSE, true, &1000u16.to_be_bytes(), [3, 3, 3, 3]));
        for piece in [1, 5, 4096, 1 << 20] {
            let (client, server) = tokio::io::duplex(8192);
            let (data, events) = read_events(
                ReadSide::Stream(Box::new(client)),
                server,
                wire.clone(),
                piece,
            )
            .await;
            let mut want = b"ab".to_vec();
            want.extend_from_slice(&big);
            assert!(data == want, "piece {piece}: payload differs");
            assert_eq!(
                events,
                vec!["Ping(b\"p\")".to_string(), "close Some(1000)".into()],
                "piece {piece}"
            );
        }
    }

    #[test]
    fn unmask_matches_the_byte_rule_at_every_offset_and_length() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for offset in 0..8 {
            for len in 0..40 {
                let plain: Vec<u8> = (0..len as u8).collect();
                let mut data = plain.clone();
                unmask(&mut data, mask, offset);
                let want: Vec<u8> = plain
                    .iter()
                    .enumerate()
                    .map(|(i, b)| b ^ mask[(offset + i) % 4])
                    .collect();
                assert_eq!(data, want, "offset {offset} len {len}");
            }
        }
    }

    /// A reader whose `wire` bytes are already buffered; keep the peer to keep the socket open.
    fn reader_over(wire: Vec<u8>) -> (FrameReader, tokio::net::UnixStream) {
        let (a, peer) = tokio::net::UnixStream::pair().expect("pair");
        let (r, _w) = a.into_split();
        let reader = FrameReader::new(ReadSide::Unix(r), Bytes::from(wire), 1 << 20);
        (reader, peer)
    }

    #[tokio::test]
    async fn buffered_messages_are_handed_on_until_a_control_frame() {
        let mut wire = masked(OP_BINARY, true, b"ab", [1, 2, 3, 4]);
        wire.extend(masked(OP_BINARY, false, b"cd", [5, 6, 7, 8]));
        wire.extend(masked(OP_CONTINUATION, true, b"", [0; 4]));
        wire.extend(masked(OP_BINARY, true, b"efghijklm", [9, 8, 7, 6]));
        wire.extend(masked(OP_PING, true, b"p", [1, 1, 1, 1]));
        wire.extend(masked(OP_BINARY, true, b"no", [2, 2, 2, 2]));
        wire.extend(masked(OP_TEXT, true, b"t", [3, 3, 3, 3]));
        wire.extend(masked(OP_BINARY, true, b"after text", [4, 4, 4, 4]));
        // A header cut short: nothing more is buffered, and no read is attempted.
        wire.extend(&masked(OP_BINARY, true, b"cut", [5, 5, 5, 5])[..3]);
        let (mut reader, _peer) = reader_over(wire);
        let Ok(Event::Data(first)) = reader.next().await else {
            panic!("first message");
        };
        assert_eq!(&first[..], b"ab");
        let mut gathered = Vec::new();
        while let Some(chunk) = reader.next_buffered().expect("buffered") {
            gathered.extend_from_slice(&chunk);
        }
        assert_eq!(gathered, b"cdefghijklm");
        assert!(matches!(reader.next().await, Ok(Event::Ping(_))));
        let Ok(Event::Data(next)) = reader.next().await else {
            panic!("message after the ping");
        };
        assert_eq!(&next[..], b"no");
        assert!(reader.next_buffered().expect("text").is_none());
        let Ok(Event::Data(last)) = reader.next().await else {
            panic!("message after the text");
        };
        assert_eq!(&last[..], b"after text");
        assert!(reader.next_buffered().expect("cut header").is_none());
    }

    #[tokio::test]
    async fn junk_behind_buffered_messages_is_an_error_after_them() {
        let mut wire = masked(OP_BINARY, true, b"ok", [1, 2, 3, 4]);
        wire.extend(masked(OP_BINARY, true, b"too", [4, 3, 2, 1]));
        wire.extend([0x82, 0x01, b'x']); // unmasked: no client may send it
        let (mut reader, _peer) = reader_over(wire);
        let Ok(Event::Data(first)) = reader.next().await else {
            panic!("first message");
        };
        assert_eq!(&first[..], b"ok");
        let more = reader.next_buffered().expect("second message");
        assert_eq!(more.as_deref(), Some(&b"too"[..]));
        match reader.next_buffered() {
            Err(WsError::Protocol(why)) => assert!(why.contains("masked"), "{why}"),
            other => panic!("expected a protocol error, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn protocol_violations_are_errors() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x82, 0x01, b'x'], "masked"),
            (vec![0xC2, 0x80, 0, 0, 0, 0], "reserved"),
            (masked(OP_CONTINUATION, true, b"x", [0; 4]), "continuation"),
            (masked(OP_PING, false, b"x", [0; 4]), "control"),
            (
                masked(OP_BINARY, true, &vec![0; 2 << 20], [0; 4]),
                "too big",
            ),
        ];
        for (wire, want) in cases {
            let (_, events) = read_all(wire, 4096).await;
            assert!(
                events.last().is_some_and(|e| e.contains(want)),
                "{want}: {events:?}"
            );
        }
    }

    #[tokio::test]
    async fn close_reasons_are_cut_on_a_char_boundary() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let mut w = FrameWriter::new(a);
        w.close(1011, &"é".repeat(100)).await.expect("close");
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut out)
            .await
            .expect("read");
        assert_eq!(out[0], 0x88);
        let len = out[1] as usize;
        assert!(len <= 125);
        assert!(std::str::from_utf8(&out[4..2 + len]).is_ok());
    }

    #[tokio::test]
    async fn frames_are_written_with_the_right_headers() {
        let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
        let mut w = FrameWriter::new(a);
        for len in [0usize, 125, 126, 65_535, 65_536] {
            w.send(OP_BINARY, &vec![7u8; len]).await.expect("send");
            let mut head = [0u8; 2];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut head)
                .await
                .expect("head");
            assert_eq!(head[0], 0x82);
            let got = match head[1] {
                126 => {
                    let mut l = [0u8; 2];
                    tokio::io::AsyncReadExt::read_exact(&mut b, &mut l)
                        .await
                        .expect("len");
                    u16::from_be_bytes(l) as usize
                }
                127 => {
                    let mut l = [0u8; 8];
                    tokio::io::AsyncReadExt::read_exact(&mut b, &mut l)
                        .await
                        .expect("len");
                    u64::from_be_bytes(l) as usize
                }
                n => n as usize,
            };
            assert_eq!(got, len);
            let mut payload = vec![0u8; len];
            tokio::io::AsyncReadExt::read_exact(&mut b, &mut payload)
                .await
                .expect("payload");
            assert!(payload.iter().all(|&x| x == 7));
        }
    }
}
