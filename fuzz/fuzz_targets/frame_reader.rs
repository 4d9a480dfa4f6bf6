//! Both directions of a relay over in-memory streams.
//!
//! Viewer -> VNC: the input is a client's byte stream, delivered in pieces to a
//! `FrameReader` (driven as the relay drives it: `next`, then `next_buffered` after data).
//! Its events must equal those of the small reference decoder below, which reads RFC 6455
//! over the whole input at once; it must never panic.
//!
//! VNC -> viewer: the same input, read as a list of chunks, pings and a close, goes through
//! `FrameWriter`. The bytes must be well-formed unmasked server frames carrying exactly those
//! payloads; masked again as a client would, they must come back out of `FrameReader` equal.
#![no_main]

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::arbitrary::{Result as ArbResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use vncgate::relay::MAX_CLIENT_FRAME;
use vncgate::ws::{
    Event, FrameReader, FrameWriter, HEADROOM, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING,
    OP_PONG, OP_TEXT, ReadSide, WsError, valid_close_code,
};

/// One runtime for all runs: building one per input would dominate the run time.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    })
}

/// An in-memory stream that hands out its bytes in pieces of 1..=`step` bytes, sizes varying
/// read by read (all at once when `step` is 0), then EOF.
struct Pieces {
    data: Vec<u8>,
    pos: usize,
    step: usize,
    reads: usize,
}

impl AsyncRead for Pieces {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let left = this.data.len() - this.pos;
        let piece = if this.step == 0 {
            left
        } else {
            1 + this.reads.wrapping_mul(7919) % this.step
        };
        let n = piece.min(left).min(buf.remaining());
        buf.put_slice(&this.data[this.pos..this.pos + n]);
        this.pos += n;
        this.reads += 1;
        Poll::Ready(Ok(()))
    }
}

/// What a reader saw, data merged across frames and pieces.
#[derive(Debug, PartialEq, Eq)]
enum Ev {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
    /// The stream ended: `None` at EOF, else the close code the relay answers the error with.
    End(Option<u16>),
}

fn push(events: &mut Vec<Ev>, ev: Ev) {
    if let (Ev::Data(new), Some(Ev::Data(last))) = (&ev, events.last_mut()) {
        last.extend_from_slice(new);
        return;
    }
    if !matches!(&ev, Ev::Data(d) if d.is_empty()) {
        events.push(ev);
    }
}

/// The close code the relay answers a reader error with (`CloseReason::for_client_error`,
/// the relay's own mapping); none at a clean end of stream.
fn close_code(err: &WsError) -> Option<u16> {
    match err {
        WsError::Eof => None,
        WsError::Io(e) => panic!("an in-memory stream cannot fail: {e}"),
        other => Some(vncgate::relay::CloseReason::for_client_error(other).code()),
    }
}

/// Runs a `FrameReader` over `wire` (the first `leftover` bytes already read by the HTTP
/// layer) until a close, an error or EOF.
fn read_with_frame_reader(wire: &[u8], leftover: usize, step: usize, max: u64) -> Vec<Ev> {
    let leftover = leftover.min(wire.len());
    let stream = Pieces {
        data: wire[leftover..].to_vec(),
        pos: 0,
        step,
        reads: 0,
    };
    let mut reader = FrameReader::new(
        ReadSide::Stream(Box::new(stream)),
        Bytes::copy_from_slice(&wire[..leftover]),
        max,
    );
    runtime().block_on(async {
        let mut events = Vec::new();
        loop {
            match reader.next().await {
                Ok(Event::Data(d)) => {
                    push(&mut events, Ev::Data(d.to_vec()));
                    // As the relay does: gather what is buffered behind it.
                    loop {
                        match reader.next_buffered() {
                            Ok(Some(d)) => push(&mut events, Ev::Data(d.to_vec())),
                            Ok(None) => break,
                            Err(e) => {
                                push(&mut events, Ev::End(close_code(&e)));
                                return events;
                            }
                        }
                    }
                }
                Ok(Event::Ping(p)) => push(&mut events, Ev::Ping(p.to_vec())),
                Ok(Event::Pong) => push(&mut events, Ev::Pong),
                Ok(Event::Close(c)) => {
                    push(&mut events, Ev::Close(c));
                    return events;
                }
                Err(e) => {
                    push(&mut events, Ev::End(close_code(&e)));
                    return events;
                }
            }
        }
    })
}

/// Reference decoder of a client stream (RFC 6455 5.2-5.5, 7.4, 8.1), over all of it at once.
/// Binary payload is handed on as far as it arrived; text is skipped, but must be UTF-8: a
/// byte that cannot be is 1007 as soon as it arrived, a message that ends inside a character
/// is 1007 at its end.
fn read_with_reference(wire: &[u8], max: u64) -> Vec<Ev> {
    let mut events = Vec::new();
    let mut message: Option<u8> = None;
    let mut text: Vec<u8> = Vec::new();
    let mut at = 0usize;
    let end = |events: &mut Vec<Ev>, code| {
        push(events, Ev::End(code));
    };
    loop {
        let rest = &wire[at..];
        if rest.len() < 2 {
            end(&mut events, None);
            return events;
        }
        let (b0, b1) = (rest[0], rest[1]);
        if b0 & 0x70 != 0 || b1 & 0x80 == 0 {
            end(&mut events, Some(1002));
            return events;
        }
        let (len, head) = match b1 & 0x7f {
            126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                if rest[2] & 0x80 != 0 {
                    end(&mut events, Some(1002));
                    return events;
                }
                (u64::from_be_bytes(rest[2..10].try_into().unwrap()), 10)
            }
            126 | 127 => {
                end(&mut events, None);
                return events;
            }
            n => (u64::from(n), 2),
        };
        if rest.len() < head + 4 {
            end(&mut events, None);
            return events;
        }
        let mask: [u8; 4] = rest[head..head + 4].try_into().unwrap();
        let body = &rest[head + 4..];
        let unmask =
            |p: &[u8]| -> Vec<u8> { p.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]).collect() };
        let fin = b0 & 0x80 != 0;
        let opcode = b0 & 0x0f;
        if opcode >= 0x8 {
            if !fin || len > 125 {
                end(&mut events, Some(1002));
                return events;
            }
            let len = len as usize;
            if body.len() < len {
                end(&mut events, None);
                return events;
            }
            let payload = unmask(&body[..len]);
            match opcode {
                OP_PING => push(&mut events, Ev::Ping(payload)),
                OP_PONG => push(&mut events, Ev::Pong),
                OP_CLOSE => {
                    let ev = match payload.as_slice() {
                        [] => Ev::Close(None),
                        [_] => Ev::End(Some(1002)),
                        [a, b, reason @ ..] => {
                            let code = u16::from_be_bytes([*a, *b]);
                            if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                                Ev::End(Some(1002))
                            } else if std::str::from_utf8(reason).is_err() {
                                Ev::End(Some(1007))
                            } else {
                                Ev::Close(Some(code))
                            }
                        }
                    };
                    push(&mut events, ev);
                    return events;
                }
                _ => {
                    end(&mut events, Some(1002));
                    return events;
                }
            }
            at += head + 4 + len;
            continue;
        }
        let kind = match (opcode, message) {
            (OP_CONTINUATION, Some(kind)) => kind,
            (OP_TEXT | OP_BINARY, None) => opcode,
            _ => {
                end(&mut events, Some(1002));
                return events;
            }
        };
        if len > max {
            end(&mut events, Some(1009));
            return events;
        }
        let have = (len as usize).min(body.len());
        if kind == OP_BINARY {
            push(&mut events, Ev::Data(unmask(&body[..have])));
        } else {
            text.extend(unmask(&body[..have]));
            if std::str::from_utf8(&text).is_err_and(|e| e.error_len().is_some()) {
                end(&mut events, Some(1007));
                return events;
            }
        }
        if (have as u64) < len {
            end(&mut events, None);
            return events;
        }
        if fin && kind == OP_TEXT {
            if std::str::from_utf8(&text).is_err() {
                end(&mut events, Some(1007));
                return events;
            }
            text.clear();
        }
        message = if fin { None } else { Some(kind) };
        at += head + 4 + have;
    }
}

/// What the VNC side sends to the viewer in one run.
enum Out {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Close(u16, String),
}

fn outgoing(u: &mut Unstructured<'_>) -> ArbResult<Vec<Out>> {
    let mut out = Vec::new();
    // One large frame at most: each costs thousands of small reads on the way back.
    let mut large = false;
    while !u.is_empty() && out.len() < 32 {
        match u.int_in_range(0u8..=15)? {
            0 => {
                let n = u.int_in_range(0..=125)?;
                out.push(Out::Ping(u.bytes(n.min(u.len()))?.to_vec()));
            }
            // Lengths past the 7- and 16-bit encodings, filled with a pattern: fuzz inputs
            // are too short to carry them.
            1 if !large => {
                large = true;
                let n = u.int_in_range(126usize..=70_000)?;
                let seed: u8 = u.arbitrary()?;
                out.push(Out::Data(
                    (0..n).map(|i| (i as u8).wrapping_mul(seed)).collect(),
                ));
            }
            2 => {
                out.push(Out::Close(u.arbitrary()?, u.arbitrary()?));
                break;
            }
            _ => {
                let n = u.arbitrary_len::<u8>()?;
                out.push(Out::Data(u.bytes(n)?.to_vec()));
            }
        }
    }
    Ok(out)
}

/// One unmasked server frame off the front of `wire`: (fin, opcode, payload, frame length).
/// Asserts the layout a server must write: FIN, no RSV bits, no mask, shortest length form.
fn server_frame(wire: &[u8]) -> (u8, &[u8], usize) {
    assert!(wire.len() >= 2, "truncated frame header");
    assert_eq!(wire[0] & 0xf0, 0x80, "FIN set, RSV bits clear");
    assert_eq!(wire[1] & 0x80, 0, "server frames are never masked");
    let (len, head) = match wire[1] & 0x7f {
        126 => {
            let n = u16::from_be_bytes([wire[2], wire[3]]) as usize;
            assert!(n >= 126, "16-bit length {n} where 7 bits do");
            (n, 4)
        }
        127 => {
            let n = u64::from_be_bytes(wire[2..10].try_into().unwrap());
            assert!(n > 0xffff && n >> 63 == 0, "64-bit length {n}");
            (n as usize, 10)
        }
        n => (n as usize, 2),
    };
    assert!(wire.len() >= head + len, "truncated frame payload");
    (wire[0] & 0x0f, &wire[head..head + len], head + len)
}

fn server_to_client(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(out) = outgoing(&mut u) else {
        return;
    };
    let mut wire = Vec::new();
    runtime().block_on(async {
        let mut w = FrameWriter::new(&mut wire);
        for o in &out {
            match o {
                Out::Data(d) => {
                    // As the relay sends VNC data: payload behind the header room.
                    let mut buf = BytesMut::zeroed(HEADROOM);
                    buf.extend_from_slice(d);
                    w.send_in_place(OP_BINARY, &mut buf).await.unwrap();
                }
                Out::Ping(p) => w.send(OP_PING, p).await.unwrap(),
                Out::Close(code, reason) => w.close(*code, reason).await.unwrap(),
            }
        }
    });

    // The frames on the wire, checked against what went in; masked again on the way.
    let mut at = 0;
    let mut masked = Vec::new();
    let mut want = Vec::new();
    for (i, o) in out.iter().enumerate() {
        let (opcode, payload, n) = server_frame(&wire[at..]);
        match o {
            Out::Data(d) => {
                assert_eq!((opcode, payload), (OP_BINARY, d.as_slice()));
                push(&mut want, Ev::Data(d.clone()));
            }
            Out::Ping(p) => {
                assert_eq!((opcode, payload), (OP_PING, p.as_slice()));
                push(&mut want, Ev::Ping(p.clone()));
            }
            Out::Close(code, reason) => {
                assert_eq!(opcode, OP_CLOSE);
                assert!(payload.len() <= 125, "close payload of {}", payload.len());
                assert_eq!(payload[..2], code.to_be_bytes());
                let sent = std::str::from_utf8(&payload[2..]).expect("reason cut mid-char");
                assert!(reason.starts_with(sent), "reason is a prefix");
                // Cut to 123 bytes, backing off at most 3 to a char boundary.
                assert!(sent.len() <= 123 && sent.len() + 3 >= reason.len().min(123));
                push(
                    &mut want,
                    if valid_close_code(*code) {
                        Ev::Close(Some(*code))
                    } else {
                        Ev::End(Some(1002))
                    },
                );
            }
        }
        let mask = [i as u8, 0x5a, (i as u8).wrapping_mul(7), 0xc3];
        masked.push(wire[at] & 0x8f);
        let head_len = n - payload.len();
        masked.push(wire[at + 1] | 0x80);
        masked.extend_from_slice(&wire[at + 2..at + head_len]);
        masked.extend_from_slice(&mask);
        masked.extend(payload.iter().enumerate().map(|(j, b)| b ^ mask[j % 4]));
        at += n;
    }
    assert_eq!(at, wire.len(), "bytes after the last frame");
    if !matches!(want.last(), Some(Ev::Close(_) | Ev::End(_))) {
        push(&mut want, Ev::End(None));
    }
    // Pieces of up to 8 KiB here (the reader's own small-piece handling is what the other
    // direction exercises): a large frame in byte-sized reads would dominate the run time.
    let step = data.first().map_or(0, |b| usize::from(b % 32) * 257);
    let got = read_with_frame_reader(&masked, 0, step, MAX_CLIENT_FRAME);
    assert!(got == want, "round trip differs");
}

fn client_to_server(data: &[u8]) {
    let [step, leftover, wire @ ..] = data else {
        return;
    };
    // A small limit sometimes, so frames over it are reachable with short inputs.
    let max = if step & 0x80 != 0 {
        64
    } else {
        MAX_CLIENT_FRAME
    };
    let step = usize::from(step & 0x3f);
    let got = read_with_frame_reader(wire, usize::from(*leftover), step, max);
    let want = read_with_reference(wire, max);
    assert_eq!(got, want);
}

fuzz_target!(|data: &[u8]| {
    client_to_server(data);
    server_to_client(data);
});
