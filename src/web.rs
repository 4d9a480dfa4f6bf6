//! Console page assets: lookup, MIME types and caching, for the bundled page (embedded at build
//! time, noVNC included) or a `--web` directory.
//!
//! Paths are checked before any lookup: percent-decoded, then refused if they hold `..`, `.`,
//! empty segments (`//host`), backslashes or NUL. The bundled assets are a fixed table, so no
//! path reaches the file system; a `--web` directory is served by tower-http's `ServeDir`, with
//! directory redirects and listings off.

use std::convert::Infallible;
use std::io;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use rust_embed::RustEmbed;
use tower::ServiceExt;
use tower_http::services::ServeDir;

pub type Body = UnsyncBoxBody<Bytes, io::Error>;

/// Our page: HTML, one JS module, CSS.
#[derive(RustEmbed)]
#[folder = "static/"]
#[include = "vnc.html"]
#[include = "console.js"]
#[include = "console.css"]
struct Page;

/// The noVNC client library, from the pinned npm package, served under `/novnc/`.
#[derive(RustEmbed)]
#[folder = "static/node_modules/@novnc/novnc/"]
#[include = "core/**/*.js"]
#[include = "vendor/**/*.js"]
#[include = "LICENSE.txt"]
struct NoVnc;

/// The page's policy: everything from this port, nothing from anywhere else, no inline
/// script. Inline styles stay allowed: noVNC positions its canvas through style attributes.
const CSP_BASE: &str = "default-src 'self'; script-src 'self'; connect-src 'self'; \
                        img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; \
                        object-src 'none'; base-uri 'none'; form-action 'none'";

/// The console page's `Content-Security-Policy` with `frame-ancestors` (DESIGN.md "Access
/// control", `--frame-ancestors`, default `'self'`): who may embed the page in a frame.
/// Errors name what is wrong with the value.
pub fn content_security_policy(frame_ancestors: &str) -> Result<HeaderValue, String> {
    let value = frame_ancestors.trim();
    let sources_ok = !value.is_empty()
        && value.split_whitespace().all(|source| {
            source
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"'*:/.-_[]".contains(&b))
        });
    if !sources_ok {
        return Err(format!(
            "{frame_ancestors:?} is not a CSP source list: give sources separated by spaces, e.g. \"'self' https://platform.example\" or \"'none'\""
        ));
    }
    HeaderValue::from_str(&format!("{CSP_BASE}; frame-ancestors {value}"))
        .map_err(|e| format!("{frame_ancestors:?}: {e}"))
}

/// `Cache-Control` etc. for HTML pages: the CSP, no referrer (a URL with `?token=` must not
/// leak to another site), no MIME sniffing.
fn page_headers(h: &mut hyper::HeaderMap, csp: &HeaderValue) {
    h.insert(header::CONTENT_SECURITY_POLICY, csp.clone());
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
}

/// What a session port serves for plain GETs.
#[derive(Debug, Clone)]
pub enum WebRoot {
    Bundled,
    /// `--web DIR`, e.g. Debian's noVNC app in `/usr/share/novnc`.
    Dir(PathBuf),
}

impl WebRoot {
    pub fn is_bundled(&self) -> bool {
        matches!(self, WebRoot::Bundled)
    }
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// The MIME type for a file name; ES modules must be `text/javascript` or browsers refuse them.
pub fn mime_for(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    match ext.to_ascii_lowercase().as_str() {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        "txt" | "md" => "text/plain; charset=utf-8",
        "woff2" => "font/woff2",
        "ogg" | "oga" => "audio/ogg",
        "mp3" => "audio/mpeg",
        _ => "application/octet-stream",
    }
}

/// The request path as a relative asset path, or `None` when it tries to leave the root or
/// is not a clean path.
pub fn clean_path(raw: &str) -> Option<String> {
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?;
    let rest = decoded.strip_prefix('/')?;
    if rest.is_empty() {
        return Some("vnc.html".into());
    }
    if rest.contains(['\\', '\0']) || rest.chars().any(char::is_control) {
        return None;
    }
    // No segment starts with a dot: besides `.` and `..`, that keeps a `--web` directory's
    // hidden files (`.git`, `.htpasswd`) unserved.
    let ok = rest
        .split('/')
        .all(|seg| !seg.is_empty() && !seg.starts_with('.') && !seg.contains(':'));
    ok.then(|| rest.to_owned())
}

fn not_found() -> Response<Body> {
    let body = r#"{"error":{"code":"not_found","message":"no such page on this console port"}}"#;
    let mut r = Response::new(full(body));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// Serves a GET or HEAD for a static asset; HTML pages carry `csp`
/// ([`content_security_policy`]).
pub async fn serve<B>(root: &WebRoot, csp: &HeaderValue, req: Request<B>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    serve_path(root, csp, &path, req).await
}

/// [`serve`] for the asset at `raw_path` (the path inside a session: the public port
/// strips its `/s/{vm_id}` prefix) rather than the request's own path.
pub async fn serve_path<B>(
    root: &WebRoot,
    csp: &HeaderValue,
    raw_path: &str,
    req: Request<B>,
) -> Response<Body> {
    let Some(path) = clean_path(raw_path) else {
        return not_found();
    };
    let mut response = match root {
        WebRoot::Bundled => serve_bundled(&path, &req),
        WebRoot::Dir(dir) => serve_dir(dir, &path, req).await,
    };
    if path.ends_with(".html") {
        page_headers(response.headers_mut(), csp);
    }
    response
}

fn serve_bundled<B>(path: &str, req: &Request<B>) -> Response<Body> {
    let file = match path.strip_prefix("novnc/") {
        Some(lib) => NoVnc::get(lib),
        None => Page::get(path),
    };
    let Some(file) = file else {
        return not_found();
    };
    let hash = file.metadata.sha256_hash();
    let etag = format!(
        "\"{}\"",
        hash[..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let fresh = req
        .headers()
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut response = if fresh {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else if req.method() == Method::HEAD {
        Response::new(empty())
    } else {
        // Release builds embed the files in the binary: hand out the static bytes, never a
        // copy per request (a thousand clients fetching rfb.js would hold a copy each).
        let bytes = match file.data {
            std::borrow::Cow::Borrowed(b) => Bytes::from_static(b),
            std::borrow::Cow::Owned(v) => Bytes::from(v),
        };
        Response::new(full(bytes))
    };
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(mime_for(path)),
    );
    // Revalidated on every load (cheap with the ETag): a daemon upgrade shows at once.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

async fn serve_dir<B>(dir: &PathBuf, path: &str, req: Request<B>) -> Response<Body> {
    // ServeDir gets the cleaned path only, and neither lists nor redirects directories.
    let mut builder = Request::builder()
        .method(req.method().clone())
        .uri(format!("/{path}"));
    for name in [
        header::IF_MODIFIED_SINCE,
        header::IF_UNMODIFIED_SINCE,
        header::RANGE,
        header::IF_RANGE,
        header::ACCEPT_ENCODING,
    ] {
        if let Some(v) = req.headers().get(&name) {
            builder = builder.header(name, v);
        }
    }
    let Ok(inner) = builder.body(Empty::<Bytes>::new()) else {
        return not_found();
    };
    let service = ServeDir::new(dir).append_index_html_on_directories(false);
    let Ok(response) = service.oneshot(inner).await;
    if response.status() == StatusCode::NOT_FOUND {
        return not_found();
    }
    let mut response = response.map(|b| b.map_err(io::Error::other).boxed_unsync());
    let h = response.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(mime_for(path)),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let cases: &[(&str, Option<&str>)] = &[
            ("/", Some("vnc.html")),
            ("/vnc.html", Some("vnc.html")),
            ("/novnc/core/rfb.js", Some("novnc/core/rfb.js")),
            ("/app/ui.js", Some("app/ui.js")),
            ("/../etc/passwd", None),
            ("/a/../../etc/passwd", None),
            ("/%2e%2e/etc/passwd", None),
            ("/%2E%2E%2fetc%2fpasswd", None),
            ("/..%2fetc/passwd", None),
            ("//etc/passwd", None),
            ("//evil.example/x", None),
            ("/a\\..\\b", None),
            ("/a%5c..%5cb", None),
            ("/a%00.html", None),
            ("/./vnc.html", None),
            ("/.git/config", None),
            ("/app/.hidden", None),
            ("/%2ehtpasswd", None),
            (
                "/app/images/icons/novnc-16x16.png",
                Some("app/images/icons/novnc-16x16.png"),
            ),
            ("/C:/windows", None),
            ("relative", None),
            ("/%ff", None),
        ];
        for (raw, want) in cases {
            assert_eq!(clean_path(raw).as_deref(), *want, "{raw}");
        }
    }

    #[test]
    fn frame_ancestors() {
        let csp = |v: &str| content_security_policy(v).map(|h| h.to_str().unwrap_or("").to_owned());
        let default = csp("'self'").unwrap_or_default();
        assert!(default.ends_with("; frame-ancestors 'self'"), "{default}");
        assert!(default.contains("script-src 'self'") && !default.contains("unsafe-eval"));
        assert!(csp("'self' https://platform.example:8443").is_ok());
        assert!(csp("'none'").is_ok());
        for bad in [
            "",
            "'self'; script-src *",
            "https://a.example, https://b.example",
            "a\nb",
        ] {
            assert!(csp(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn mime_types() {
        assert_eq!(mime_for("core/rfb.js"), "text/javascript; charset=utf-8");
        assert_eq!(mime_for("vnc.html"), "text/html; charset=utf-8");
        assert_eq!(mime_for("x.CSS"), "text/css; charset=utf-8");
        assert_eq!(mime_for("noext"), "application/octet-stream");
    }

    #[tokio::test]
    async fn embedded_assets_are_served_without_a_copy_per_request() {
        let csp = content_security_policy("'self'").expect("csp");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let req = Request::get("/novnc/core/rfb.js")
                .body(())
                .expect("request");
            let response = serve(&WebRoot::Bundled, &csp, req).await;
            assert_eq!(response.status(), StatusCode::OK);
            let frame = response
                .into_body()
                .frame()
                .await
                .expect("a frame")
                .expect("no error");
            let data = frame.into_data().expect("data");
            assert!(data.len() > 50_000, "rfb.js is served whole");
            seen.push(data.as_ptr());
        }
        assert_eq!(
            seen[0], seen[1],
            "both answers point at the binary's own bytes"
        );
    }

    #[test]
    fn the_bundled_page_and_novnc_are_embedded() {
        assert!(Page::get("vnc.html").is_some());
        assert!(Page::get("console.js").is_some());
        assert!(NoVnc::get("core/rfb.js").is_some());
        assert!(
            NoVnc::get("package.json").is_none(),
            "only what the page needs"
        );
    }
}
