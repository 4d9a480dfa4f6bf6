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

mod read_side;

pub use read_side::ReadSide;

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

/// Room a read buffer keeps in front of its payload for the largest frame header, so header and
/// payload go out in one plain `write`: no copy of the payload, and no iovec (measured a little
/// cheaper than `writev` of header and payload at 800 sessions).
pub const HEADROOM: usize = 10;

/// Sends frames; owned by one task, so no lock is taken per frame.
///
/// A frame being written is held here, not by the caller's future, so that a relay cancelled
/// mid-frame (session closed while a slow viewer takes a large update) still has its bytes: the
/// next send or [`FrameWriter::close`] finishes that frame first. A close frame written into
/// the middle of a data frame would become part of its payload, and the viewer would never see
/// the close code.
pub struct FrameWriter<W> {
    io: W,
    /// The frame in flight (header and payload), and how many of its bytes went out.
    in_flight: BytesMut,
    written: usize,
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
        FrameWriter {
            io,
            in_flight: BytesMut::new(),
            written: 0,
        }
    }

    /// One frame whose payload is `buf[HEADROOM..]`; the header is written into the headroom
    /// and the frame goes out in one write, the payload never copied. `buf` is handed back
    /// (for reuse) when the write ends; if this future is dropped first, the writer keeps the
    /// rest of the frame and sends it before anything else.
    ///
    /// Errors: the stream's write error; `InvalidInput` if `buf` is shorter than [`HEADROOM`].
    pub async fn send_in_place(&mut self, opcode: u8, buf: &mut BytesMut) -> io::Result<()> {
        self.finish_frame().await?;
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
        self.in_flight = std::mem::take(buf);
        self.written = start;
        let result = self.finish_frame().await;
        *buf = std::mem::take(&mut self.in_flight);
        result
    }

    /// Writes what is left of the frame in flight, if any.
    async fn finish_frame(&mut self) -> io::Result<()> {
        while self.written < self.in_flight.len() {
            let n = self.io.write(&self.in_flight[self.written..]).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.written += n;
        }
        Ok(())
    }

    /// One complete frame with a small payload (control frames), copied into one write.
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        let mut frame = BytesMut::zeroed(HEADROOM + payload.len());
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
    /// The unfinished UTF-8 sequence at the end of the text read so far (at most 3 bytes,
    /// their count): text is not relayed, but must be UTF-8 across its frames (RFC 6455
    /// section 8.1). Inline, so an idle viewer still holds no heap buffer.
    text_carry: ([u8; 3], usize),
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
            text_carry: ([0; 3], 0),
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
            .read_lazy(&mut self.buf, CLIENT_READ, 0, CLIENT_READ, true)
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
                        self.end_frame()?;
                        continue;
                    }
                    if self.buf.is_empty() {
                        self.fill().await?;
                    }
                    if let Some(chunk) = self.take_payload()? {
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
                ReadState::Payload { left: 0, .. } => self.end_frame()?,
                ReadState::Payload { binary: false, .. } => return Ok(None),
                ReadState::Payload { .. } if self.buf.is_empty() => return Ok(None),
                ReadState::Payload { .. } => return self.take_payload(),
            }
        }
    }

    /// The buffered part of the current frame's payload, unmasked; `None` for text, which is
    /// only checked to be UTF-8, then dropped.
    fn take_payload(&mut self) -> Result<Option<BytesMut>, WsError> {
        let ReadState::Payload {
            left,
            mask,
            offset,
            binary,
        } = self.state
        else {
            return Ok(None);
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
        unmask(&mut chunk, mask, offset);
        if !binary {
            self.check_text(&chunk)?;
        }
        if left == 0 {
            self.end_frame()?;
        }
        Ok(binary.then_some(chunk))
    }

    /// Checks the next piece of a text message; an unfinished sequence at its end waits for
    /// the next piece.
    fn check_text(&mut self, mut piece: &[u8]) -> Result<(), WsError> {
        const INVALID: WsError = WsError::InvalidUtf8("text message is not UTF-8");
        let (mut carry, mut held) = self.text_carry;
        // First finish the character the last piece ended inside, a byte at a time.
        while held > 0 {
            let Some((&b, rest)) = piece.split_first() else {
                self.text_carry = (carry, held);
                return Ok(());
            };
            let mut char_bytes = [0u8; 4];
            char_bytes[..held].copy_from_slice(&carry[..held]);
            char_bytes[held] = b;
            piece = rest;
            match std::str::from_utf8(&char_bytes[..=held]) {
                Ok(_) => held = 0,
                Err(e) if e.error_len().is_none() && held < 3 => {
                    carry[held] = b;
                    held += 1;
                }
                Err(_) => return Err(INVALID),
            }
        }
        match std::str::from_utf8(piece) {
            Ok(_) => self.text_carry = (carry, 0),
            Err(e) if e.error_len().is_none() => {
                let tail = &piece[e.valid_up_to()..];
                carry[..tail.len()].copy_from_slice(tail);
                self.text_carry = (carry, tail.len());
            }
            Err(_) => return Err(INVALID),
        }
        Ok(())
    }

    fn end_frame(&mut self) -> Result<(), WsError> {
        if self.fin {
            self.message = None;
            if self.text_carry.1 > 0 {
                return Err(WsError::InvalidUtf8(
                    "text message ends inside a UTF-8 sequence",
                ));
            }
        }
        self.state = ReadState::Header;
        Ok(())
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
mod tests;
