use super::limits::{FAIL_TABLE_MAX, FAIL_TABLE_SWEEP};
use super::*;
use hyper::header::HeaderValue;

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn policy(allowed: &str, proxies: &str) -> AccessPolicy {
    AccessPolicy {
        allowed_origins: parse_origins(allowed).expect("origins"),
        trusted_proxies: parse_cidrs(proxies).expect("cidrs"),
        failures: FailLimiter::new(3),
        origin_log: Throttle::default(),
    }
}

#[test]
fn origins_normalise() {
    let o = |s: &str| s.parse::<Origin>().ok();
    assert_eq!(o("http://Example.COM"), o("http://example.com:80"));
    assert_eq!(o("https://h"), o("https://h:443"));
    assert_eq!(o("https://h/"), o("https://h"));
    assert_ne!(o("http://h"), o("https://h"));
    assert_eq!(
        o("http://[::1]:8080"),
        o("http://[0:0::1]:8080").and(o("http://[::1]:8080"))
    );
    for bad in [
        "null",
        "",
        "h:80",
        "ftp://h",
        "http://",
        "http://h:0",
        "http://h:99999",
        "http://u@h",
        "http://h/path",
        "http://h:+80",
        "http://h h",
    ] {
        assert!(o(bad).is_none(), "{bad:?}");
    }
}

#[test]
fn the_origin_policy() {
    let p = policy("https://platform.example", "");
    let client = p.client(
        "127.0.0.1".parse().expect("ip"),
        false,
        &headers(&[("host", "127.0.0.1:6100")]),
    );
    let check = |origin: Option<&str>| {
        let h = match origin {
            Some(o) => headers(&[("origin", o)]),
            None => HeaderMap::new(),
        };
        p.check_origin(&client, &h).is_ok()
    };
    assert!(check(None), "no Origin: a non-browser client");
    assert!(check(Some("http://127.0.0.1:6100")), "own origin");
    assert!(check(Some("https://platform.example")), "allowed");
    assert!(
        check(Some("https://platform.example:443")),
        "allowed, port spelled out"
    );
    for refused in [
        "http://evil.example",
        "null",
        "http://127.0.0.1.evil.example:6100",
        "http://127.0.0.1:6101",
        "https://127.0.0.1:6100",
        "http://platform.example",
        "garbage",
    ] {
        assert!(!check(Some(refused)), "{refused}");
    }
}

#[test]
fn forwarded_headers_only_from_trusted_proxies() {
    let p = policy("", "10.0.0.0/8, 127.0.0.3");
    let h = headers(&[
        ("host", "internal:6100"),
        ("x-forwarded-for", "203.0.113.9, 10.1.1.1"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "vnc.example.com"),
    ]);
    let stranger = p.client("192.0.2.1".parse().expect("ip"), false, &h);
    assert_eq!(stranger.addr, "192.0.2.1".parse::<IpAddr>().expect("ip"));
    assert_eq!(stranger.scheme, "http");
    assert_eq!(stranger.host.as_deref(), Some("internal:6100"));
    let proxied = p.client("127.0.0.3".parse().expect("ip"), false, &h);
    assert_eq!(proxied.addr, "203.0.113.9".parse::<IpAddr>().expect("ip"));
    assert_eq!(proxied.scheme, "https");
    assert_eq!(proxied.host.as_deref(), Some("vnc.example.com"));
    // A client cannot claim an address by prepending it: the proxy appends the real one.
    let forged = headers(&[("x-forwarded-for", "10.9.9.9, 198.51.100.7")]);
    let c = p.client("127.0.0.3".parse().expect("ip"), false, &forged);
    assert_eq!(c.addr, "198.51.100.7".parse::<IpAddr>().expect("ip"));
    // Proxies that append the client's port.
    for (xff, want) in [
        ("198.51.100.7:51234", "198.51.100.7"),
        ("[2001:db8::7]:443", "2001:db8::7"),
        ("[2001:db8::8]", "2001:db8::8"),
    ] {
        let c = p.client(
            "127.0.0.3".parse().expect("ip"),
            false,
            &headers(&[("x-forwarded-for", xff)]),
        );
        assert_eq!(c.addr, want.parse::<IpAddr>().expect("ip"), "{xff}");
    }
    // An entry that is no address at all stops the walk at the last trusted hop.
    let c = p.client(
        "127.0.0.3".parse().expect("ip"),
        false,
        &headers(&[("x-forwarded-for", "unknown")]),
    );
    assert_eq!(c.addr, "127.0.0.3".parse::<IpAddr>().expect("ip"));
    // Mapped IPv4 peers are their IPv4 address.
    assert!(p.is_trusted_proxy("::ffff:127.0.0.3".parse().expect("ip")));
}

#[test]
fn client_keys_group_ipv6_by_64() {
    let a = ClientKey::of("2001:db8:1:2::1".parse().expect("ip"));
    let b = ClientKey::of("2001:db8:1:2:ffff::9".parse().expect("ip"));
    let c = ClientKey::of("2001:db8:1:3::1".parse().expect("ip"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        ClientKey::of("::ffff:192.0.2.1".parse().expect("ip")),
        ClientKey::of("192.0.2.1".parse().expect("ip"))
    );
}

#[tokio::test(start_paused = true)]
async fn failed_tokens_block_a_client_for_a_window() {
    let limiter = FailLimiter::new(3);
    let bad: IpAddr = "127.0.0.9".parse().expect("ip");
    let other: IpAddr = "127.0.0.2".parse().expect("ip");
    for _ in 0..2 {
        limiter.record_failure(bad);
    }
    assert_eq!(limiter.blocked(bad), None);
    limiter.record_failure(bad);
    assert_eq!(limiter.blocked(bad), Some(60));
    assert_eq!(limiter.blocked(other), None, "another client is untouched");
    tokio::time::advance(Duration::from_secs(59)).await;
    assert_eq!(limiter.blocked(bad), Some(1));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(limiter.blocked(bad), None, "the block ends");
    limiter.record_failure(bad);
    assert_eq!(limiter.blocked(bad), None, "a new window starts from zero");
    // Failures spread over more than a window never add up.
    let slow: IpAddr = "127.0.0.10".parse().expect("ip");
    for _ in 0..10 {
        limiter.record_failure(slow);
        tokio::time::advance(Duration::from_secs(31)).await;
    }
    assert_eq!(limiter.blocked(slow), None);
    assert!(FailLimiter::new(0).blocked(bad).is_none(), "0 is off");
}

#[tokio::test(start_paused = true)]
async fn the_failure_table_is_swept_and_bounded() {
    let limiter = FailLimiter::new(3);
    for i in 0..(FAIL_TABLE_SWEEP as u32 + 10) {
        limiter.record_failure(IpAddr::from(i.to_be_bytes()));
    }
    assert!(limiter.table.len() <= FAIL_TABLE_SWEEP + 10);
    tokio::time::advance(FAIL_WINDOW + Duration::from_secs(1)).await;
    limiter.record_failure("10.9.9.9".parse().expect("ip"));
    assert_eq!(limiter.table.len(), 1, "expired windows are swept out");
}

/// A spray from more addresses than the table holds neither stops the counting of a new
/// address nor frees one that is guessing in earnest.
#[tokio::test(start_paused = true)]
async fn a_full_failure_table_still_counts_and_keeps_the_guessers() {
    let limiter = FailLimiter::new(5);
    let guesser: IpAddr = "10.200.0.1".parse().expect("ip");
    for _ in 0..3 {
        limiter.record_failure(guesser);
    }
    let blocked: IpAddr = "10.200.0.2".parse().expect("ip");
    for _ in 0..5 {
        limiter.record_failure(blocked);
    }
    for i in 0..(FAIL_TABLE_MAX as u32 + 100) {
        limiter.record_failure(IpAddr::from((0x0b00_0000 + i).to_be_bytes()));
    }
    assert!(limiter.table.len() <= FAIL_TABLE_MAX);
    assert!(
        limiter.blocked(blocked).is_some(),
        "a blocked address stays blocked"
    );
    let fresh: IpAddr = "10.200.0.3".parse().expect("ip");
    for _ in 0..5 {
        limiter.record_failure(fresh);
    }
    assert!(
        limiter.blocked(fresh).is_some(),
        "a new address is still counted"
    );
    limiter.record_failure(guesser);
    limiter.record_failure(guesser);
    assert!(
        limiter.blocked(guesser).is_some(),
        "the guesser's three earlier failures were kept"
    );
}

#[tokio::test(start_paused = true)]
async fn throttled_lines_count_what_they_held_back() {
    let t = Throttle::default();
    assert_eq!(t.ready(Duration::from_secs(60)), Some(0));
    assert_eq!(t.ready(Duration::from_secs(60)), None);
    assert_eq!(t.ready(Duration::from_secs(60)), None);
    tokio::time::advance(Duration::from_secs(60)).await;
    assert_eq!(t.ready(Duration::from_secs(60)), Some(2));
}

#[test]
fn pending_connections_are_capped_per_client_and_released_on_upgrade() {
    let limits = ConnectionLimits::new(5, 2);
    let a: IpAddr = "127.0.0.5".parse().expect("ip");
    let b: IpAddr = "127.0.0.6".parse().expect("ip");
    let a1 = limits.admit(a, false).expect("a1");
    let a2 = Arc::new(limits.admit(a, false).expect("a2"));
    assert_eq!(limits.admit(a, false).err(), Some(AcceptRefusal::Pending));
    assert_eq!(limits.open(), 2, "a refused connection holds no place");
    let viewer = Arc::clone(&a2);
    a2.upgraded();
    drop(a2);
    let a3 = limits
        .admit(a, false)
        .expect("an upgraded connection is no longer pending");
    let proxy: Vec<_> = (0..2)
        .map(|_| limits.admit(b, true).expect("exempt"))
        .collect();
    assert_eq!(limits.open(), 5);
    assert_eq!(limits.admit(b, true).err(), Some(AcceptRefusal::Daemon));
    drop((a1, a3, proxy));
    assert_eq!(limits.open(), 1, "the viewer still holds its place");
    drop(viewer);
    assert_eq!(limits.open(), 0);
    assert_eq!(limits.refused(), (1, 1));
}

#[test]
fn default_connection_cap() {
    assert_eq!(
        default_max_connections(1_048_576, 900),
        (1_048_576 - 900 - 256) / 2
    );
    assert_eq!(default_max_connections(1024, 900), 64);
}

fn guard(token: Option<&str>) -> ApiGuard {
    let file = token.map(|t| {
        let path = std::env::temp_dir().join(format!(
            "vncgate-apitoken-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::write(&path, format!("{t}\nsecond line ignored\n")).expect("write");
        path
    });
    let g = ApiGuard::new(
        file.clone(),
        parse_origins("https://ops.example").expect("origins"),
        ["vnc.example.com".to_owned()],
    )
    .expect("guard");
    if let Some(f) = file {
        std::fs::remove_file(f).ok();
    }
    g
}

#[test]
fn api_host_and_origin_checks() {
    let g = guard(None);
    let code = |pairs: &[(&str, &str)]| {
        g.check("/v1/sessions", false, &headers(pairs))
            .err()
            .map(|r| r.code)
    };
    assert_eq!(code(&[]), None, "curl without Host (HTTP/1.0)");
    for ok in [
        "127.0.0.1:6080",
        "[::1]:6080",
        "localhost:6080",
        "LOCALHOST",
        "vnc.example.com:1",
        "10.0.0.1",
    ] {
        assert_eq!(code(&[("host", ok)]), None, "{ok}");
    }
    for refused in [
        "rebind.evil.example:6080",
        "127.0.0.1.evil.example",
        "",
        "a b",
    ] {
        assert_eq!(
            code(&[("host", refused)]),
            Some("host_refused"),
            "{refused:?}"
        );
    }
    assert_eq!(code(&[("origin", "https://ops.example")]), None);
    assert_eq!(
        code(&[("host", "127.0.0.1"), ("host", "evil.example")]),
        Some("host_refused")
    );
    assert_eq!(
        code(&[
            ("origin", "https://ops.example"),
            ("origin", "http://evil.example")
        ]),
        Some("origin_refused")
    );
    for refused in ["http://evil.example", "null", "https://ops.example:8443"] {
        assert_eq!(
            code(&[("origin", refused)]),
            Some("origin_refused"),
            "{refused}"
        );
    }
}

#[test]
fn api_bearer_tokens() {
    let g = guard(Some("s3cret-token"));
    let check = |path: &str, auth: Option<&str>| {
        let h = match auth {
            Some(a) => headers(&[("authorization", a)]),
            None => HeaderMap::new(),
        };
        g.check(path, false, &h)
            .err()
            .map(|r| (r.status, r.code, r.authenticate))
    };
    assert_eq!(check("/healthz", None), None);
    assert_eq!(check("/v1/sessions", Some("Bearer s3cret-token")), None);
    assert_eq!(check("/v1/sessions", Some("bearer  s3cret-token ")), None);
    assert_eq!(
        check("/v1/sessions", None),
        Some((401, "unauthorized", Some("Bearer")))
    );
    assert_eq!(
        check("/no/such/route", None),
        Some((401, "unauthorized", Some("Bearer")))
    );
    let wrong = Some((401, "unauthorized", Some("Bearer error=\"invalid_token\"")));
    assert_eq!(check("/v1/status", Some("Bearer s3cret-tokeN")), wrong);
    assert_eq!(
        check("/v1/status", Some("Basic s3cret-token")),
        Some((401, "unauthorized", Some("Bearer")))
    );
    assert!(
        guard(None)
            .check("/v1/status", false, &HeaderMap::new())
            .is_ok(),
        "no file: no auth"
    );
}

#[test]
fn token_files() {
    let dir = std::env::temp_dir().join(format!("vncgate-tokfile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok();
    let empty = dir.join("empty");
    std::fs::write(&empty, "\n").ok();
    assert!(matches!(
        read_token_file(&empty),
        Err(TokenFileError::Empty { .. })
    ));
    assert!(matches!(
        read_token_file(&dir.join("missing")),
        Err(TokenFileError::Read { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}
