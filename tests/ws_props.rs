//! Properties of the frame codec (src/ws.rs), over in-memory streams: random frame sequences
//! split at random points come out as they went in; every invalid input is an error with the
//! close code RFC 6455 requires; garbage never panics.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use proptest::prelude::*;
use tokio::io::{AsyncRead, ReadBuf};
use vncgate::relay::MAX_CLIENT_FRAME;
use vncgate::ws::{
    Event, FrameReader, FrameWriter, HEADROOM, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING,
    OP_PONG, OP_TEXT, ReadSide, WsError, valid_close_code,
};

/// A stream that yields the given chunks one read at a time, answering `Pending` (and waking
/// itself at once) before every other chunk, so the reader also resumes after a not-ready
/// read, as on a socket. Then EOF.
struct Chunks {
    chunks: VecDeque<Vec<u8>>,
    stall: bool,
}

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.stall = !this.stall;
        if this.stall {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let Some(chunk) = this.chunks.front_mut() else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            this.chunks.pop_front();
        }
        Poll::Ready(Ok(()))
    }
}

/// What a reader saw, data merged across frames and reads.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Pong,
    Close(Option<u16>),
    /// The stream ended: at EOF (`None`), or with an error answered by this close code.
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

/// `wire` cut at `cuts` (offsets, any order, out of range ones ignored); the first `leftover`
/// bytes are handed to the reader as read past the upgrade request.
fn split(wire: &[u8], cuts: &[usize], leftover: usize) -> (Vec<u8>, VecDeque<Vec<u8>>) {
    let leftover = leftover.min(wire.len());
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|c| c % (wire.len() + 1))
        .filter(|&c| c > leftover)
        .collect();
    points.push(leftover);
    points.push(wire.len());
    points.sort_unstable();
    points.dedup();
    let chunks = points
        .windows(2)
        .map(|w| wire[w[0]..w[1]].to_vec())
        .collect();
    (wire[..leftover].to_vec(), chunks)
}

/// Reads everything a client sent, as the relay does (after data, what is already buffered is
/// gathered with `next_buffered` when `gather`), until a close, an error or EOF.
fn read_all(wire: &[u8], cuts: &[usize], leftover: usize, gather: bool, max: u64) -> Vec<Ev> {
    let (leftover, chunks) = split(wire, cuts, leftover);
    let stream = Chunks {
        chunks,
        stall: false,
    };
    let mut reader = FrameReader::new(
        ReadSide::Stream(Box::new(stream)),
        Bytes::from(leftover),
        max,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut events = Vec::new();
        loop {
            match reader.next().await {
                Ok(Event::Data(d)) => {
                    assert!(!d.is_empty(), "empty data event");
                    push(&mut events, Ev::Data(d.to_vec()));
                    if !gather {
                        continue;
                    }
                    loop {
                        match reader.next_buffered() {
                            Ok(Some(d)) => {
                                assert!(!d.is_empty(), "empty buffered data");
                                push(&mut events, Ev::Data(d.to_vec()));
                            }
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

/// A client frame as RFC 6455 5.2 lays it out; `len` overrides the length field (a header
/// that claims more than it carries).
fn raw_frame(b0: u8, masked: bool, payload: &[u8], mask: [u8; 4], len: Option<u64>) -> Vec<u8> {
    let n = len.unwrap_or(payload.len() as u64);
    let m = if masked { 0x80 } else { 0 };
    let mut f = vec![b0];
    if n < 126 {
        f.push(m | n as u8);
    } else if n <= 0xffff {
        f.push(m | 126);
        f.extend_from_slice(&(n as u16).to_be_bytes());
    } else {
        f.push(m | 127);
        f.extend_from_slice(&n.to_be_bytes());
    }
    if masked {
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        f.extend_from_slice(payload);
    }
    f
}

fn frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    raw_frame(
        (if fin { 0x80 } else { 0 }) | opcode,
        true,
        payload,
        mask,
        None,
    )
}

fn payload(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..=max),
        1 => Just(Vec::new()),
    ]
}

/// Payloads up to 300 bytes (7- and 16-bit lengths), now and then one past 64 KiB (64-bit
/// length), made from a pattern so it is cheap to generate.
fn data_payload() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        20 => payload(300),
        1 => (65_536usize..70_000, any::<u8>())
            .prop_map(|(n, k)| (0..n).map(|i| (i as u8).wrapping_mul(k | 1)).collect()),
    ]
}

/// A control frame a client may send between any two frames.
#[derive(Debug, Clone)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        payload(125).prop_map(Control::Ping),
        payload(125).prop_map(Control::Pong),
    ]
}

/// A data frame's payload and mask, then perhaps a control frame and its mask.
type Fragment = (Vec<u8>, [u8; 4], Option<Control>, [u8; 4]);

/// One message: binary or text, in fragments, with control frames after some fragments.
#[derive(Debug, Clone)]
struct Message {
    binary: bool,
    fragments: Vec<Fragment>,
}

fn message() -> impl Strategy<Value = Message> {
    let fragment = (
        data_payload(),
        any::<[u8; 4]>(),
        proptest::option::weighted(0.3, control()),
        any::<[u8; 4]>(),
    );
    (
        any::<bool>(),
        proptest::collection::vec(fragment, 1..4),
        "\\PC{0,40}",
    )
        .prop_map(|(binary, mut fragments, text)| {
            if !binary {
                // Text must be UTF-8 over the whole message (RFC 6455 8.1); the cuts between
                // its fragments may fall inside a character.
                let bytes = text.into_bytes();
                let last = fragments.len() - 1;
                let mut start = 0;
                for (i, f) in fragments.iter_mut().enumerate() {
                    let end = if i == last {
                        bytes.len()
                    } else {
                        (start + f.0.len() % 8).min(bytes.len())
                    };
                    f.0 = bytes[start..end].to_vec();
                    start = end;
                }
            }
            Message { binary, fragments }
        })
}

/// The wire bytes of `messages` and the events a reader must produce for them.
fn encode(messages: &[Message]) -> (Vec<u8>, Vec<Ev>) {
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for m in messages {
        let last = m.fragments.len() - 1;
        for (i, (data, mask, ctl, ctl_mask)) in m.fragments.iter().enumerate() {
            let opcode = match (i, m.binary) {
                (0, true) => OP_BINARY,
                (0, false) => OP_TEXT,
                _ => OP_CONTINUATION,
            };
            wire.extend(frame(opcode, i == last, data, *mask));
            if m.binary {
                push(&mut want, Ev::Data(data.clone()));
            }
            // Control frames may come between the fragments of a message (RFC 6455 5.4).
            match ctl {
                Some(Control::Ping(p)) => {
                    wire.extend(frame(OP_PING, true, p, *ctl_mask));
                    push(&mut want, Ev::Ping(p.clone()));
                }
                Some(Control::Pong(p)) => {
                    wire.extend(frame(OP_PONG, true, p, *ctl_mask));
                    push(&mut want, Ev::Pong);
                }
                None => {}
            }
        }
    }
    (wire, want)
}

/// How a valid stream ends: EOF, or a close frame (no code, or a valid code and a reason).
fn ending() -> impl Strategy<Value = Option<Option<(u16, String)>>> {
    let code = prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999];
    proptest::option::of(proptest::option::of((code, "\\PC{0,40}")))
}

fn cuts() -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(any::<usize>(), 0..24)
}

/// An invalid frame and the close code RFC 6455 requires for it.
#[derive(Debug, Clone)]
enum Bad {
    Unmasked,
    ReservedBits(u8),
    ReservedDataOpcode(u8),
    ReservedControlOpcode(u8),
    LongControl(u8, u64),
    FragmentedControl(u8),
    CloseOneByte(u8),
    InvalidCloseCode(u16),
    CloseReasonNotUtf8(u16),
    LengthMsb(u64),
    TooBig(u64),
    ContinuationOutsideMessage,
    NewMessageInsideFragmented,
    /// A text message with these bytes, where a 0xFF (never in UTF-8) replaces byte `at`.
    TextNotUtf8(String, usize),
    /// A text message in two fragments whose last ends inside a character: these bytes, then
    /// all but the last byte of a multi-byte character.
    TextEndsInsideChar(String, char),
}

fn bad() -> impl Strategy<Value = Bad> {
    let control_op = prop_oneof![Just(OP_CLOSE), Just(OP_PING), Just(OP_PONG)];
    let invalid_code = any::<u16>().prop_filter("invalid close code", |c| !valid_close_code(*c));
    prop_oneof![
        Just(Bad::Unmasked),
        (1u8..8).prop_map(|r| Bad::ReservedBits(r << 4)),
        (3u8..=7).prop_map(Bad::ReservedDataOpcode),
        (0xBu8..=0xF).prop_map(Bad::ReservedControlOpcode),
        (control_op.clone(), 126u64..1 << 20).prop_map(|(o, n)| Bad::LongControl(o, n)),
        control_op.prop_map(Bad::FragmentedControl),
        any::<u8>().prop_map(Bad::CloseOneByte),
        invalid_code.prop_map(Bad::InvalidCloseCode),
        prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999]
            .prop_map(Bad::CloseReasonNotUtf8),
        ((1u64 << 63)..=u64::MAX).prop_map(Bad::LengthMsb),
        ((MAX_CLIENT_FRAME + 1)..(1 << 40)).prop_map(Bad::TooBig),
        Just(Bad::ContinuationOutsideMessage),
        Just(Bad::NewMessageInsideFragmented),
        ("\\PC{0,20}", any::<usize>()).prop_map(|(t, at)| Bad::TextNotUtf8(t, at)),
        (
            "\\PC{0,20}",
            any::<char>().prop_filter("multi-byte", |c| c.len_utf8() > 1)
        )
            .prop_map(|(t, c)| Bad::TextEndsInsideChar(t, c)),
    ]
}

/// The bytes of `bad` and its close code. Frames that claim more payload than they carry
/// need only their header: the reader must refuse them before reading on.
fn encode_bad(bad: &Bad, mask: [u8; 4]) -> (Vec<u8>, u16) {
    let fin = 0x80;
    match *bad {
        Bad::Unmasked => (raw_frame(fin | OP_BINARY, false, b"x", mask, None), 1002),
        Bad::ReservedBits(r) => (raw_frame(fin | r | OP_BINARY, true, b"x", mask, None), 1002),
        Bad::ReservedDataOpcode(op) => (frame(op, true, b"x", mask), 1002),
        Bad::ReservedControlOpcode(op) => (frame(op, true, b"x", mask), 1002),
        Bad::LongControl(op, n) => (raw_frame(fin | op, true, &[], mask, Some(n)), 1002),
        Bad::FragmentedControl(op) => (frame(op, false, b"", mask), 1002),
        Bad::CloseOneByte(b) => (frame(OP_CLOSE, true, &[b], mask), 1002),
        Bad::InvalidCloseCode(code) => (frame(OP_CLOSE, true, &code.to_be_bytes(), mask), 1002),
        Bad::CloseReasonNotUtf8(code) => {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(b"ok\xff\xfe");
            (frame(OP_CLOSE, true, &p, mask), 1007)
        }
        Bad::LengthMsb(n) => {
            let mut f = vec![fin | OP_BINARY, 0x80 | 127];
            f.extend_from_slice(&n.to_be_bytes());
            f.extend_from_slice(&mask);
            (f, 1002)
        }
        Bad::TooBig(n) => (raw_frame(fin | OP_BINARY, true, &[], mask, Some(n)), 1009),
        Bad::ContinuationOutsideMessage => (frame(OP_CONTINUATION, true, b"x", mask), 1002),
        Bad::NewMessageInsideFragmented => {
            let mut f = frame(OP_BINARY, false, b"a", mask);
            f.extend(frame(OP_BINARY, true, b"b", mask));
            (f, 1002)
        }
        Bad::TextNotUtf8(ref text, at) => {
            let mut bytes = text.clone().into_bytes();
            if bytes.is_empty() {
                bytes.push(0xff);
            } else {
                let at = at % bytes.len();
                bytes[at] = 0xff;
            }
            (frame(OP_TEXT, true, &bytes, mask), 1007)
        }
        Bad::TextEndsInsideChar(ref text, c) => {
            let mut utf8 = [0u8; 4];
            let c = c.encode_utf8(&mut utf8).as_bytes();
            let mut f = frame(OP_TEXT, false, text.as_bytes(), mask);
            f.extend(frame(OP_CONTINUATION, true, &c[..c.len() - 1], mask));
            (f, 1007)
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// What goes in comes out: payloads of binary messages in order (text skipped), pings with
    /// their payloads, pongs, and the close code, wherever the stream is cut.
    #[test]
    fn frames_split_anywhere_come_out_as_they_went_in(
        messages in proptest::collection::vec(message(), 0..6),
        end in ending(),
        close_mask in any::<[u8; 4]>(),
        cuts in cuts(),
        leftover in 0usize..64,
        gather in any::<bool>(),
    ) {
        let (mut wire, mut want) = encode(&messages);
        match end {
            None => push(&mut want, Ev::End(None)),
            Some(None) => {
                wire.extend(frame(OP_CLOSE, true, b"", close_mask));
                push(&mut want, Ev::Close(None));
            }
            Some(Some((code, reason))) => {
                let mut p = code.to_be_bytes().to_vec();
                p.extend_from_slice(reason.as_bytes());
                p.truncate(125);
                // Truncation may cut the reason mid-character: keep it valid UTF-8.
                while std::str::from_utf8(&p[2..]).is_err() {
                    p.pop();
                }
                wire.extend(frame(OP_CLOSE, true, &p, close_mask));
                push(&mut want, Ev::Close(Some(code)));
            }
        }
        let got = read_all(&wire, &cuts, leftover, gather, MAX_CLIENT_FRAME);
        prop_assert_eq!(got, want);
    }

    /// Every invalid frame, after valid traffic and wherever the stream is cut, ends the
    /// stream with the close code RFC 6455 requires: 1002 protocol error, 1007 invalid data,
    /// 1009 too big.
    #[test]
    fn invalid_frames_are_errors_with_the_required_close_code(
        messages in proptest::collection::vec(message(), 0..3),
        bad in bad(),
        mask in any::<[u8; 4]>(),
        trailer in proptest::collection::vec(any::<u8>(), 0..16),
        cuts in cuts(),
        leftover in 0usize..64,
        gather in any::<bool>(),
    ) {
        let (mut wire, mut want) = encode(&messages);
        let (frame, code) = encode_bad(&bad, mask);
        if let Bad::NewMessageInsideFragmented = bad {
            push(&mut want, Ev::Data(b"a".to_vec()));
        }
        wire.extend(frame);
        // Whatever follows the bad frame is never looked at.
        wire.extend(trailer);
        push(&mut want, Ev::End(Some(code)));
        let got = read_all(&wire, &cuts, leftover, gather, MAX_CLIENT_FRAME);
        prop_assert_eq!(got, want);
    }

    /// Garbage never panics, and ends in a close, EOF, or an error with one of the codes.
    #[test]
    fn garbage_never_panics(
        wire in proptest::collection::vec(any::<u8>(), 0..512),
        cuts in cuts(),
        leftover in 0usize..64,
        gather in any::<bool>(),
        max in prop_oneof![Just(16u64), Just(MAX_CLIENT_FRAME)],
    ) {
        let got = read_all(&wire, &cuts, leftover, gather, max);
        let last = got.last().cloned();
        prop_assert!(
            matches!(last, Some(Ev::Close(_) | Ev::End(None | Some(1002 | 1007 | 1009)))),
            "{:?}", last
        );
    }

    /// Valid traffic with bytes flipped (so past the first header): no panic, and the stream
    /// ends as above.
    #[test]
    fn corrupted_frames_never_panic(
        messages in proptest::collection::vec(message(), 1..4),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cuts in cuts(),
        gather in any::<bool>(),
    ) {
        let (mut wire, _) = encode(&messages);
        for (at, x) in flips {
            let n = wire.len();
            wire[at % n] ^= x;
        }
        let got = read_all(&wire, &cuts, 0, gather, MAX_CLIENT_FRAME);
        let last = got.last().cloned();
        prop_assert!(
            matches!(last, Some(Ev::Close(_) | Ev::End(None | Some(1002 | 1007 | 1009)))),
            "{:?}", last
        );
    }

    /// The other direction: what the writer sends, masked as a browser would, reads back
    /// equal; the unmasked frames use the shortest length form.
    #[test]
    fn written_frames_read_back(
        chunks in proptest::collection::vec(data_payload(), 0..5),
        cuts in cuts(),
    ) {
        let mut wire = Vec::new();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let mut w = FrameWriter::new(&mut wire);
            for c in &chunks {
                let mut buf = bytes::BytesMut::zeroed(HEADROOM);
                buf.extend_from_slice(c);
                w.send_in_place(OP_BINARY, &mut buf).await.unwrap();
            }
        });
        let mut masked = Vec::new();
        let mut at = 0;
        for c in &chunks {
            prop_assert_eq!(wire[at], 0x80 | OP_BINARY);
            let (len, head) = match wire[at + 1] {
                126 => (u16::from_be_bytes([wire[at + 2], wire[at + 3]]) as usize, 4),
                127 => {
                    let n = u64::from_be_bytes(wire[at + 2..at + 10].try_into().unwrap());
                    (n as usize, 10)
                }
                n => (usize::from(n), 2),
            };
            prop_assert_eq!(len, c.len());
            let shortest = match len { 0..=125 => 2, 126..=0xffff => 4, _ => 10 };
            prop_assert_eq!(head, shortest);
            prop_assert_eq!(&wire[at + head..at + head + len], c.as_slice());
            masked.extend(frame(OP_BINARY, true, c, [0x37, 0xfa, 0x21, 0x3d]));
            at += head + len;
        }
        prop_assert_eq!(at, wire.len());
        let mut want = Vec::new();
        for c in &chunks {
            push(&mut want, Ev::Data(c.clone()));
        }
        push(&mut want, Ev::End(None));
        prop_assert_eq!(read_all(&masked, &cuts, 0, true, MAX_CLIENT_FRAME), want);
    }
}
