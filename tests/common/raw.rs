//! Raw HTTP and WebSocket clients that pick their source address on loopback (127.0.0.2 is
//! another client than 127.0.0.1) and send exactly the headers a test gives.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{WebSocketStream, client_async};

/// A TCP connection to `to` from the loopback address `from`.
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// One answer read off a raw connection.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// Status line and headers, lower-cased names kept as sent.
    pub head: String,
    pub body: String,
}

impl RawResponse {
    /// The value of header `name` (case-insensitive), if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }

    /// The `error.code` of a JSON error body.
    pub fn code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// Reads one response (head, then `Content-Length` bytes; nothing more after a 101).
pub async fn read_response(s: &mut TcpStream) -> RawResponse {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "closed before a full answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status code");
    let mut response = RawResponse {
        status,
        head,
        body: String::new(),
    };
    if status == 101 {
        return response;
    }
    let len: usize = response
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("the body within 10 s")
            .expect("read");
        assert!(n > 0, "closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    response.body = String::from_utf8_lossy(&body[..len]).into_owned();
    response
}

/// Sends `request` (a whole HTTP request, `\r\n` line ends) from `from` and reads the answer.
pub async fn request(from: IpAddr, to: SocketAddr, request: &str) -> RawResponse {
    let mut s = connect_from(from, to).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("send");
    read_response(&mut s).await
}

/// A WebSocket upgrade request for `path_and_query` on `to` with `extra` header lines.
pub fn upgrade_request(to: SocketAddr, path_and_query: &str, extra: &[&str]) -> String {
    let mut r = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {to}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for line in extra {
        r.push_str(line);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r
}

/// A real WebSocket client from `from` to `url` with extra headers; the status on refusal.
pub async fn websocket_from(
    from: IpAddr,
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<WebSocketStream<TcpStream>, u16> {
    let mut request = url.into_client_request().expect("url");
    for (k, v) in headers {
        request
            .headers_mut()
            .insert(*k, HeaderValue::from_str(v).expect("header value"));
    }
    let host = request.uri().host().expect("host").to_owned();
    let port = request.uri().port_u16().expect("port");
    let to = SocketAddr::new(host.parse().expect("an IP host"), port);
    let stream = connect_from(from, to).await.expect("connect");
    match client_async(request, stream).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("websocket to {url}: {e}"),
    }
}
