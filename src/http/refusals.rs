//! hyper answers requests it cannot parse (a malformed request line, a bad `Content-Length`,
//! headers over the limit) by itself, with an empty body. [`JsonRefusals`] turns exactly those
//! answers into the JSON error object every other refusal carries (DESIGN.md "Control API",
//! "Access control"), so a client always gets `{"error": {"code", "message"}}`. hyper closes
//! an HTTP/2 connection preface without any answer; that one gets a JSON 505 here too.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose writes of hyper's own error answers are replaced by JSON ones; everything
/// else passes through untouched.
pub struct JsonRefusals<S> {
    io: S,
    /// A replacement answer still being written, and the length of the write it stands for.
    pending: Option<(Vec<u8>, usize)>,
    /// Nothing has been read yet: the first read is looked at for an HTTP/2 preface.
    first_read: bool,
    /// The answer to an HTTP/2 preface: bytes still to write, then the connection ends.
    h2_answer: Option<Vec<u8>>,
    /// An HTTP/2 preface came: reads write [`JsonRefusals::h2_answer`], then drain to the end.
    answering_h2: bool,
}

/// How an HTTP/2 connection (prior knowledge, RFC 9113 section 3.4) starts.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

impl<S> JsonRefusals<S> {
    pub fn new(io: S) -> Self {
        JsonRefusals {
            io,
            pending: None,
            first_read: true,
            h2_answer: None,
            answering_h2: false,
        }
    }

    /// The stream, for the relay after an upgrade.
    pub fn into_inner(self) -> S {
        self.io
    }
}

/// hyper's answer to a request it could not parse: a 4xx/5xx status line, then only
/// `connection: close`, `content-length: 0` and `date`. Returns the JSON answer to send
/// instead, or `None` for any other write.
pub fn json_answer(head: &[u8]) -> Option<Vec<u8>> {
    if !(head.starts_with(b"HTTP/1.1 4") || head.starts_with(b"HTTP/1.1 5")) {
        return None;
    }
    let text = std::str::from_utf8(head).ok()?;
    let (lines, rest) = text.split_once("\r\n\r\n")?;
    if !rest.is_empty() {
        return None;
    }
    let mut lines = lines.split("\r\n");
    let status_line = lines.next()?;
    let mut names = Vec::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let name = name.trim().to_ascii_lowercase();
        if name == "content-length" && value.trim() != "0" {
            return None;
        }
        names.push(name);
    }
    names.sort();
    if names != ["connection", "content-length", "date"] {
        return None;
    }
    let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
    let message = match status {
        431 => "request headers too large: at most 16 KiB and 100 header lines",
        414 => "request URI too long",
        505 => "HTTP version not supported: send HTTP/1.1",
        _ => "malformed HTTP request: check the request line, the headers and Content-Length",
    };
    let body = serde_json::json!({ "error": { "code": "invalid_request", "message": message } })
        .to_string();
    Some(
        format!(
            "{status_line}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

impl<S: AsyncWrite + Unpin> JsonRefusals<S> {
    /// Writes out a pending replacement; ready with the length of the write it replaced.
    fn flush_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<usize>>> {
        while let Some((bytes, stands_for)) = &mut self.pending {
            if bytes.is_empty() {
                let n = *stands_for;
                self.pending = None;
                return Poll::Ready(Ok(Some(n)));
            }
            match Pin::new(&mut self.io).poll_write(cx, bytes) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    bytes.drain(..n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(None))
    }
}

/// The 505 an HTTP/2 preface gets, in hyper's error-answer shape.
fn h2_answer() -> Vec<u8> {
    json_answer(
        b"HTTP/1.1 505 HTTP Version Not Supported\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
    )
    .unwrap_or_default()
}

impl<S: AsyncRead + AsyncWrite + Unpin> JsonRefusals<S> {
    /// Writes the 505 for an HTTP/2 preface, sends FIN, then discards what the client still
    /// sends until it closes (so the close is not a reset that could destroy the answer).
    /// Reports end of stream to hyper, which then drops the connection; hyper's header timeout
    /// bounds the wait.
    fn poll_answer_h2(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(bytes) = &mut self.h2_answer {
            if bytes.is_empty() {
                std::task::ready!(Pin::new(&mut self.io).poll_shutdown(cx))?;
                self.h2_answer = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.io).poll_write(cx, bytes))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            bytes.drain(..n);
        }
        let mut sink = [0u8; 1024];
        loop {
            let mut discard = ReadBuf::new(&mut sink);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut discard))?;
            if discard.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for JsonRefusals<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.answering_h2 {
            return this.poll_answer_h2(cx);
        }
        if !this.first_read {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        let got = &buf.filled()[before..];
        if got.is_empty() {
            return Poll::Ready(Ok(()));
        }
        this.first_read = false;
        if got.starts_with(H2_PREFACE) {
            // hyper never sees these bytes: to it the client sent nothing and closed.
            buf.set_filled(before);
            this.h2_answer = Some(h2_answer());
            this.answering_h2 = true;
            return this.poll_answer_h2(cx);
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for JsonRefusals<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.pending.is_none()
            && let Some(answer) = json_answer(buf)
        {
            this.pending = Some((answer, buf.len()));
        }
        match this.flush_pending(cx) {
            Poll::Ready(Ok(Some(n))) => Poll::Ready(Ok(n)),
            Poll::Ready(Ok(None)) => Pin::new(&mut this.io).poll_write(cx, buf),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // hyper's error answer is a head alone: one non-empty slice.
        let mut non_empty = bufs.iter().filter(|b| !b.is_empty());
        if let (Some(only), None) = (non_empty.next(), non_empty.next())
            && this.pending.is_none()
            && json_answer(only).is_some()
        {
            return Pin::new(this).poll_write(cx, only);
        }
        match this.flush_pending(cx) {
            Poll::Ready(Ok(Some(n))) => Poll::Ready(Ok(n)),
            Poll::Ready(Ok(None)) => Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.flush_pending(cx) {
            Poll::Ready(Ok(_)) => Pin::new(&mut this.io).poll_flush(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.flush_pending(cx) {
            Poll::Ready(Ok(_)) => Pin::new(&mut this.io).poll_shutdown(cx),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_http2_preface_gets_a_json_505_and_an_end() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(4096);
        let mut wrapped = JsonRefusals::new(server);
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .expect("write");
        let reader = tokio::spawn(async move {
            let mut seen = Vec::new();
            let n = wrapped.read_to_end(&mut seen).await.expect("read");
            (n, seen)
        });
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        // The answer ends with FIN from the wrapper's side; then this side closes.
        loop {
            let n = client.read(&mut chunk).await.expect("read answer");
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&chunk[..n]);
        }
        drop(client);
        let (n, seen) = reader.await.expect("join");
        assert_eq!(
            (n, seen.len()),
            (0, 0),
            "hyper is shown nothing but the end"
        );
        let text = String::from_utf8(answer).expect("utf-8");
        assert!(text.starts_with("HTTP/1.1 505 "), "{text}");
        let body = text.split_once("\r\n\r\n").expect("head and body").1;
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "invalid_request");
    }

    #[tokio::test]
    async fn http1_requests_pass_through_untouched() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(4096);
        let mut wrapped = JsonRefusals::new(server);
        client
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        drop(client);
        let mut seen = Vec::new();
        wrapped.read_to_end(&mut seen).await.expect("read");
        assert_eq!(seen, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn only_hypers_own_error_answers_are_replaced() {
        let hyper_400 =
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 08:28:50 GMT\r\n\r\n";
        let json = json_answer(hyper_400).expect("replaced");
        let text = String::from_utf8(json).expect("utf-8");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["error"]["code"], "invalid_request");
        let hyper_431 = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        assert!(json_answer(hyper_431).is_some());
        for untouched in [
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: 9\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 416 Range Not Satisfiable\r\ncontent-range: bytes */10\r\ncontent-length: 0\r\ndate: x\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: x\r\n\r\n{}",
            b"HTTP/1.1 4",
            b"some body bytes",
        ] {
            assert!(json_answer(untouched).is_none(), "{}", String::from_utf8_lossy(untouched));
        }
    }
}
