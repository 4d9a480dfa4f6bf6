use super::read_side::FIRST_READ;
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
        .read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096, true)
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
        side.read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096, true),
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
            .read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096, true)
            .await
            .expect("read");
        assert_eq!(n, buf.len() - HEADROOM);
        got.extend_from_slice(&buf[HEADROOM..]);
    }
    assert!(got == data, "bytes differ");
    assert_eq!(calls, 1, "the full first read took the rest in place");
}

/// A stream's next read (`scratch_first` false) goes straight into a buffer of its own, and
/// when the socket turns out to be empty that buffer is given back before waiting: a viewer
/// whose stream stopped holds no buffer.
#[tokio::test]
async fn a_streams_read_holds_no_buffer_while_waiting() {
    let (a, mut b) = tokio::net::UnixStream::pair().expect("pair");
    let (r, _w) = a.into_split();
    let mut side = ReadSide::Unix(r);
    let data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
    b.write_all(&data).await.expect("write");
    let mut buf = BytesMut::new();
    let n = side
        .read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096, false)
        .await
        .expect("read");
    assert_eq!(n, data.len());
    assert!(buf[HEADROOM..] == data[..], "bytes differ");
    // A read of 8 KiB (at least `settle`) keeps the socket marked readable, so the next
    // call reads at once, finds nothing, and must wait without a buffer.
    let mut buf = BytesMut::new();
    {
        let read = side.read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096, false);
        tokio::pin!(read);
        assert!(
            futures_util::poll!(read.as_mut()).is_pending(),
            "nothing was sent"
        );
    }
    assert_eq!(buf.capacity(), 0, "a buffer was held while waiting");
    // Data sent later still arrives, whole, in one read.
    b.write_all(b"more").await.expect("write");
    let n = side
        .read_lazy(&mut buf, 32 * 1024, HEADROOM, 4096, false)
        .await
        .expect("read");
    assert_eq!((n, &buf[HEADROOM..]), (4, &b"more"[..]));
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

/// A relay cancelled while a large frame is half written (a slow viewer, then the session
/// closes): the close frame must come after the whole data frame, not inside its payload.
#[tokio::test]
async fn a_close_after_a_frame_cut_short_finishes_that_frame_first() {
    use futures_util::FutureExt;
    // 4 KiB of pipe: the 64 KiB frame cannot go out at once while nobody reads.
    let (a, mut b) = tokio::io::duplex(4096);
    let mut w = FrameWriter::new(a);
    let payload: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let mut buf = BytesMut::zeroed(HEADROOM);
    buf.extend_from_slice(&payload);
    // One poll writes what fits, then the future is dropped, as a cancelled relay's is.
    assert!(
        w.send_in_place(OP_BINARY, &mut buf)
            .now_or_never()
            .is_none(),
        "the frame should not fit into the pipe at once"
    );
    let reader = tokio::spawn(async move {
        let mut out = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut b, &mut out)
            .await
            .expect("read");
        out
    });
    w.close(1001, "session closed").await.expect("close");
    drop(w);
    let out = reader.await.expect("reader");
    // 0x82, 127-form length (65536 > 65535), then the payload, whole.
    assert_eq!(out[0], 0x82);
    assert_eq!(out[1], 127);
    assert_eq!(
        u64::from_be_bytes(out[2..10].try_into().expect("len")),
        65_536
    );
    assert!(
        out[10..10 + 65_536] == payload[..],
        "the data frame's payload changed"
    );
    let close = &out[10 + 65_536..];
    assert_eq!(close[0], 0x88, "a close frame follows the data frame");
    assert_eq!(u16::from_be_bytes([close[2], close[3]]), 1001);
    assert_eq!(&close[4..], b"session closed");
}
