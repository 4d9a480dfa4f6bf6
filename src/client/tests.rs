use super::*;

#[test]
fn api_addresses() {
    let c = ApiClient::new("https://vncgate.example:6443/console/", None, None)
        .expect("https with a prefix");
    assert_eq!(
        (
            c.host.as_str(),
            c.port,
            c.authority.as_str(),
            c.prefix.as_str()
        ),
        ("vncgate.example", 6443, "vncgate.example:6443", "/console")
    );
    let c = ApiClient::new("http://[::1]:6080", None, None).expect("IPv6");
    assert_eq!(
        (c.host.as_str(), c.port, c.prefix.as_str()),
        ("::1", 6080, "")
    );
    let c = ApiClient::new("https://h", None, None).expect("default port");
    assert_eq!(c.port, 443);
    for bad in ["ftp://h:1", "h:6080", "http://", ""] {
        assert!(ApiClient::new(bad, None, None).is_err(), "{bad}");
    }
}

#[test]
fn tables_align() {
    let t = table(&["A", "BB"], &[vec!["xyz".into(), "1".into()]]);
    assert_eq!(t, "A    BB\nxyz  1\n");
}

#[test]
fn sizes() {
    assert_eq!(human_bytes(12), "12 B");
    assert_eq!(human_bytes(10 * 1024 * 1024), "10.0 MiB");
}

/// A server that accepts and never answers: the call ends at [`CALL_TIMEOUT`] with an error
/// that names the API (paused clock).
#[tokio::test(start_paused = true)]
async fn a_silent_api_times_out() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let client = ApiClient::new(&format!("http://{addr}"), None, None).expect("client");
    let started = tokio::time::Instant::now();
    let err = client
        .call(Method::GET, "/v1/sessions", None)
        .await
        .expect_err("no answer");
    assert!(matches!(err, ClientError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
    assert!(started.elapsed() >= CALL_TIMEOUT);
    holder.abort();
}

/// A server on loopback that answers each of `connections` connections with `answer`
/// (a whole HTTP response) after reading its request head.
async fn fake_api(
    answer: String,
    connections: usize,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        for _ in 0..connections {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut head = [0u8; 1024];
            let _ = s.read(&mut head).await;
            let _ = s.write_all(answer.as_bytes()).await;
        }
    });
    (addr, server)
}

/// An answer that is not the API's JSON is quoted, cut to a readable length.
#[tokio::test]
async fn a_huge_junk_answer_is_quoted_short() {
    let junk = "x".repeat(100_000);
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{junk}",
        junk.len()
    );
    let (addr, server) = fake_api(answer, 1).await;
    let client = ApiClient::new(&format!("http://{addr}"), None, None).expect("client");
    let err = client
        .call(Method::GET, "/v1/sessions", None)
        .await
        .expect_err("junk");
    let text = err.to_string();
    assert!(
        text.contains("(100000 bytes in all)"),
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(text.len() < 1024, "{} bytes of message", text.len());
    let _ = server.await;
}

/// A 200 answer that is JSON but not the shape the command reads (another service on the
/// API's port) is an error naming it, never an empty table.
#[tokio::test]
async fn a_wrong_shaped_answer_is_an_error_not_an_empty_table() {
    let body = r#"{"items": []}"#;
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (addr, server) = fake_api(answer, 6).await;
    let client = ApiClient::new(&format!("http://{addr}"), None, None).expect("client");
    let mut errors = Vec::new();
    // The tables and --json alike: a script reading --json must not take it as vncgate's.
    for json in [false, true] {
        errors.push(client.list(json).await.expect_err("list"));
        errors.push(client.status(json).await.expect_err("status"));
        errors.push(client.cleanup(json).await.expect_err("cleanup"));
    }
    for err in errors {
        assert!(
            matches!(err, ClientError::BadAnswer { status: 200, .. }),
            "{err}"
        );
        assert!(err.to_string().contains(r#"{"items":[]}"#), "{err}");
    }
    let _ = server.await;
}
