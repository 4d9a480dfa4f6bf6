//! Serving the console page: MIME types, caching, 404s, and no way out of the web root.

mod common;

use std::time::Duration;

use common::{FakeVnc, Mode, TestGate, bounded};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One raw HTTP/1.1 request (paths exactly as given, no client-side normalising); returns the
/// status, the header block and the body.
async fn raw_get(port: u16, target: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let req = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n{extra}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, _) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body_at = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(out.len(), |p| p + 4);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_ascii_lowercase(), out[body_at..].to_vec())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
}

const ESCAPES: &[&str] = &[
    "/../secret.txt",
    "/a/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/..%2fsecret.txt",
    "/%2e%2e%2fsecret.txt",
    "/sub%2f..%2f..%2fsecret.txt",
    "//secret.txt",
    "//evil.example/secret.txt",
    "/..\\secret.txt",
    "/%5c..%5csecret.txt",
    "/vnc.html%00",
    "/%00/../secret.txt",
    "/etc/passwd",
    "/proc/self/environ",
    "http://127.0.0.1/../secret.txt",
    "/sub",
    "/sub/",
];

async fn assert_no_escape(port: u16) {
    for target in ESCAPES {
        let (status, head, body) = raw_get(port, target, "").await;
        assert!(!(300..400).contains(&status), "{target}: redirect {head}");
        assert!(
            header(&head, "location").is_none(),
            "{target}: Location header"
        );
        assert!(status == 400 || status == 404, "{target}: status {status}");
        let body = String::from_utf8_lossy(&body);
        assert!(
            !body.contains("TOPSECRET") && !body.contains("root:"),
            "{target}: leaked {body}"
        );
        assert!(!body.contains("Index of"), "{target}: directory listing");
    }
}

#[tokio::test]
async fn the_bundled_page_is_served_with_types_and_validators() {
    bounded(Duration::from_secs(30), async {
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let gate = TestGate::start(2).await;
        let s = gate.open_ok("vm-web", &fake.target).await;
        let port = s["ws_port"].as_u64().expect("port") as u16;
        for (path, mime) in [
            ("/", "text/html"),
            ("/vnc.html", "text/html"),
            ("/vnc.html?token=abc", "text/html"),
            ("/console.js", "text/javascript"),
            ("/console.css", "text/css"),
            ("/novnc/core/rfb.js", "text/javascript"),
            ("/novnc/core/util/logging.js", "text/javascript"),
        ] {
            let (status, head, body) = raw_get(port, path, "").await;
            assert_eq!(status, 200, "{path}");
            assert!(
                header(&head, "content-type").is_some_and(|v| v.starts_with(mime)),
                "{path}: {head}"
            );
            assert_eq!(header(&head, "cache-control"), Some("no-cache"), "{path}");
            assert!(!body.is_empty());
            let etag = header(&head, "etag").expect("etag").to_owned();
            let (status, _, body) =
                raw_get(port, path, &format!("If-None-Match: {etag}\r\n")).await;
            assert_eq!((status, body.len()), (304, 0), "{path} revalidates");
        }
        let (_, head, _) = raw_get(port, "/vnc.html", "").await;
        assert!(
            header(&head, "content-security-policy")
                .is_some_and(|v| v.contains("default-src 'self'"))
        );
        for missing in [
            "/nope.html",
            "/novnc/package.json",
            "/novnc/core/",
            "/novnc",
            "/console.js/x",
        ] {
            assert_eq!(raw_get(port, missing, "").await.0, 404, "{missing}");
        }
        assert_no_escape(port).await;
        // The page itself names no outside host.
        let (_, _, html) = raw_get(port, "/vnc.html", "").await;
        let html = String::from_utf8_lossy(&html);
        assert!(
            !html.contains("http://") && !html.contains("https://"),
            "{html}"
        );
    })
    .await;
}

#[tokio::test]
async fn a_web_dir_is_served_without_escapes_listings_or_redirects() {
    bounded(Duration::from_secs(30), async {
        let base = std::env::temp_dir().join(format!("vncgate-webdir-{}", std::process::id()));
        let root = base.join("root");
        std::fs::create_dir_all(root.join("sub")).expect("dirs");
        std::fs::write(base.join("secret.txt"), "TOPSECRET").expect("secret");
        std::fs::write(
            root.join("vnc.html"),
            "<!doctype html><title>other app</title>",
        )
        .expect("page");
        std::fs::write(root.join("sub/app.js"), "export const x = 1;").expect("js");
        std::fs::write(root.join("sub/style.css"), "body{}").expect("css");
        let fake = FakeVnc::tcp(Mode::Echo).await;
        let web = root.clone();
        let gate = TestGate::start_with(2, move |c| c.web = Some(web)).await;
        let s = gate.open_ok("vm-webdir", &fake.target).await;
        let token = s["token"].as_str().expect("token");
        let port = s["ws_port"].as_u64().expect("port") as u16;
        assert_eq!(
            s["url"],
            format!(
                "http://127.0.0.1:{port}/vnc.html?autoconnect=1&path=websockify%3Ftoken%3D{token}"
            )
        );
        for (path, mime) in [
            ("/", "text/html"),
            ("/vnc.html", "text/html"),
            ("/sub/app.js", "text/javascript"),
            ("/sub/style.css", "text/css"),
        ] {
            let (status, head, _) = raw_get(port, path, "").await;
            assert_eq!(status, 200, "{path}");
            assert!(
                header(&head, "content-type").is_some_and(|v| v.starts_with(mime)),
                "{path}: {head}"
            );
        }
        assert_eq!(raw_get(port, "/nope.js", "").await.0, 404);
        assert_no_escape(port).await;
        std::fs::remove_dir_all(&base).ok();
    })
    .await;
}
