//! A minimal RFB 3.8 client for tests: handshake with security type None, ServerInit, and one
//! full framebuffer in raw encoding (32 bpp, BGRX). Runs over a unix socket, TCP or a WebSocket.

use std::path::Path;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Bytes both ways, whatever carries them.
pub enum Transport {
    Stream(Box<dyn Io>),
    Ws {
        ws: Box<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
        >,
        pending: Vec<u8>,
    },
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Transport {
    pub async fn unix(path: &Path) -> Transport {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect to the VNC unix socket");
        Transport::Stream(Box::new(s))
    }

    pub async fn websocket(url: &str) -> Transport {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Transport::Ws {
            ws: Box::new(ws),
            pending: Vec::new(),
        }
    }

    async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        match self {
            Transport::Stream(s) => {
                let mut buf = vec![0; n];
                s.read_exact(&mut buf).await.expect("RFB read");
                buf
            }
            Transport::Ws { ws, pending } => {
                while pending.len() < n {
                    match ws
                        .next()
                        .await
                        .expect("websocket open")
                        .expect("websocket frame")
                    {
                        Message::Binary(b) => pending.extend_from_slice(&b),
                        Message::Close(f) => panic!("websocket closed during RFB read: {f:?}"),
                        _ => {}
                    }
                }
                pending.drain(..n).collect()
            }
        }
    }

    async fn write_all(&mut self, data: &[u8]) {
        match self {
            Transport::Stream(s) => s.write_all(data).await.expect("RFB write"),
            Transport::Ws { ws, .. } => ws
                .send(Message::binary(data.to_vec()))
                .await
                .expect("websocket send"),
        }
    }
}

/// Everything a read of the screen saw, for byte-for-byte comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Screen {
    /// Server version, security types and security result, as sent.
    pub handshake: Vec<u8>,
    /// ServerInit, as sent.
    pub server_init: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub name: String,
    /// `width * height` pixels of B, G, R, X.
    pub pixels: Vec<u8>,
}

fn u16_at(b: &[u8], i: usize) -> usize {
    usize::from(u16::from_be_bytes([b[i], b[i + 1]]))
}

/// Connects, authenticates with None and reads one full framebuffer.
pub async fn read_screen(mut t: Transport) -> Screen {
    let mut handshake = t.read_exact(12).await;
    assert!(
        handshake.starts_with(b"RFB "),
        "not an RFB server: {handshake:?}"
    );
    t.write_all(b"RFB 003.008\n").await;
    let count = t.read_exact(1).await;
    handshake.extend_from_slice(&count);
    let types = t.read_exact(usize::from(count[0])).await;
    handshake.extend_from_slice(&types);
    assert!(
        types.contains(&1),
        "the VNC server does not offer security type None: {types:?}"
    );
    t.write_all(&[1]).await;
    let result = t.read_exact(4).await;
    handshake.extend_from_slice(&result);
    assert_eq!(result, [0, 0, 0, 0], "security handshake failed");
    t.write_all(&[1]).await; // ClientInit: shared
    let mut server_init = t.read_exact(24).await;
    let mut width = u16_at(&server_init, 0);
    let mut height = u16_at(&server_init, 2);
    let name_len = u32::from_be_bytes([
        server_init[20],
        server_init[21],
        server_init[22],
        server_init[23],
    ]) as usize;
    let name_bytes = t.read_exact(name_len).await;
    server_init.extend_from_slice(&name_bytes);
    let name = String::from_utf8_lossy(&name_bytes).into_owned();

    // SetPixelFormat: 32 bpp, depth 24, little-endian, true colour, BGRX in memory.
    t.write_all(&[
        0, 0, 0, 0, 32, 24, 0, 1, 0, 255, 0, 255, 0, 255, 16, 8, 0, 0, 0, 0,
    ])
    .await;
    // SetEncodings: raw; the cursor pseudo-encoding, so the cursor is not drawn into pixels;
    // DesktopSize, so a guest that switches video mode (QEMU at boot) is followed.
    let mut enc = vec![2, 0, 0, 3];
    enc.extend_from_slice(&0i32.to_be_bytes());
    enc.extend_from_slice(&(-239i32).to_be_bytes());
    enc.extend_from_slice(&(-223i32).to_be_bytes());
    t.write_all(&enc).await;

    let mut pixels = vec![0u8; width * height * 4];
    let mut covered = vec![false; width * height];
    let mut missing = width * height;
    while missing > 0 {
        let (w, h) = (width as u16, height as u16);
        let mut req = vec![3, 0, 0, 0, 0, 0];
        req.extend_from_slice(&w.to_be_bytes());
        req.extend_from_slice(&h.to_be_bytes());
        t.write_all(&req).await;
        // Read messages until one framebuffer update has been handled.
        loop {
            let kind = t.read_exact(1).await[0];
            match kind {
                0 => {
                    let head = t.read_exact(3).await;
                    let rects = u16_at(&head, 1);
                    for _ in 0..rects {
                        let r = t.read_exact(12).await;
                        let (x, y, rw, rh) =
                            (u16_at(&r, 0), u16_at(&r, 2), u16_at(&r, 4), u16_at(&r, 6));
                        let encoding = i32::from_be_bytes([r[8], r[9], r[10], r[11]]);
                        match encoding {
                            0 => {
                                let data = t.read_exact(rw * rh * 4).await;
                                for row in 0..rh {
                                    let dst = ((y + row) * width + x) * 4;
                                    pixels[dst..dst + rw * 4]
                                        .copy_from_slice(&data[row * rw * 4..(row + 1) * rw * 4]);
                                    for col in 0..rw {
                                        let i = (y + row) * width + x + col;
                                        if !covered[i] {
                                            covered[i] = true;
                                            missing -= 1;
                                        }
                                    }
                                }
                            }
                            -223 => {
                                width = rw;
                                height = rh;
                                pixels = vec![0u8; width * height * 4];
                                covered = vec![false; width * height];
                                missing = width * height;
                            }
                            -239 => {
                                t.read_exact(rw * rh * 4 + rw.div_ceil(8) * rh).await;
                            }
                            other => panic!("unexpected encoding {other}"),
                        }
                    }
                    break;
                }
                1 => {
                    let head = t.read_exact(5).await;
                    let n = u16_at(&head, 3);
                    t.read_exact(n * 6).await;
                }
                2 => {}
                3 => {
                    let head = t.read_exact(7).await;
                    let len = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
                    t.read_exact(len).await;
                }
                other => panic!("unexpected RFB server message {other}"),
            }
        }
    }
    Screen {
        handshake,
        server_init,
        width,
        height,
        name,
        pixels,
    }
}

/// Share of pixels equal between an RGBA canvas dump and a BGRX screen, from 0 to 1.
pub fn match_ratio(canvas_rgba: &[u8], screen: &Screen) -> f64 {
    assert_eq!(
        canvas_rgba.len(),
        screen.pixels.len(),
        "canvas and screen differ in size"
    );
    let same = canvas_rgba
        .chunks_exact(4)
        .zip(screen.pixels.chunks_exact(4))
        .filter(|(c, s)| c[0] == s[2] && c[1] == s[1] && c[2] == s[0])
        .count();
    same as f64 / (screen.width * screen.height) as f64
}

/// Pixels that differ between two screens, with their bounding box (x0, y0, x1, y1).
pub fn diff(a: &Screen, b: &Screen) -> (usize, Option<(usize, usize, usize, usize)>) {
    let mut n = 0;
    let mut bbox: Option<(usize, usize, usize, usize)> = None;
    for (i, (pa, pb)) in a
        .pixels
        .chunks_exact(4)
        .zip(b.pixels.chunks_exact(4))
        .enumerate()
    {
        if pa[..3] != pb[..3] {
            n += 1;
            let (x, y) = (i % a.width, i / a.width);
            bbox = Some(match bbox {
                None => (x, y, x, y),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
            });
        }
    }
    (n, bbox)
}

/// Distinct colours on a screen (for "the pattern is there").
pub fn colour_count(s: &Screen) -> usize {
    let mut set = std::collections::HashSet::new();
    for p in s.pixels.chunks_exact(4) {
        set.insert([p[0], p[1], p[2]]);
    }
    set.len()
}
