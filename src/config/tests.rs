use super::*;

#[test]
fn port_ranges() {
    let cases: &[(&str, Option<(u16, u16)>)] = &[
        ("6100-6999", Some((6100, 6999))),
        ("1-1", Some((1, 1))),
        ("7000-6000", None),
        ("0-10", None),
        ("10-70000", None),
        ("6100", None),
        ("a-b", None),
    ];
    for (input, want) in cases {
        let got = parse_port_range(input).ok().map(|r| (*r.start(), *r.end()));
        assert_eq!(got, *want, "{input}");
    }
}

#[test]
fn durations() {
    assert_eq!(
        parse_duration("k", "20s").ok(),
        Some(Some(Duration::from_secs(20)))
    );
    assert_eq!(parse_duration("k", "off").ok(), Some(None));
    assert!(parse_duration("k", "soon").is_err());
}

#[test]
fn max_sessions_defaults_and_clamps() {
    let args = ServeArgs {
        port_range: Some("7000-7009".into()),
        ..Default::default()
    };
    assert_eq!(args.resolve().map(|c| c.max_sessions).ok(), Some(10));
    let args = ServeArgs {
        port_range: Some("7000-7009".into()),
        max_sessions: Some("50".into()),
        ..Default::default()
    };
    assert_eq!(args.resolve().map(|c| c.max_sessions).ok(), Some(10));
    assert_eq!(
        ServeArgs::default().resolve().map(|c| c.max_sessions).ok(),
        Some(800)
    );
}

#[test]
fn a_non_loopback_api_with_a_token_file_starts() {
    let args = ServeArgs {
        api_listen: Some("0.0.0.0:6080".into()),
        api_token_file: Some("/etc/vncgate/api-token".into()),
        ..Default::default()
    };
    assert!(args.resolve().is_ok());
    let refused = ServeArgs {
        api_listen: Some("0.0.0.0:6080".into()),
        ..Default::default()
    }
    .resolve()
    .map(|_| ())
    .map_err(|e| e.to_string());
    assert!(refused.is_err_and(|e| e.contains("--api-token-file")));
}

#[test]
fn access_flags() {
    let args = ServeArgs {
        allowed_origins: Some("https://platform.example, http://10.0.0.5:8080".into()),
        trusted_proxies: Some("10.0.0.0/8,::1".into()),
        token_ttl: Some("8h".into()),
        auth_fail_limit: Some("0".into()),
        api_hosts: Some("VNC.example.com".into()),
        frame_ancestors: Some("'self' https://platform.example".into()),
        ..Default::default()
    };
    let c = args.resolve().expect("valid");
    assert_eq!(c.allowed_origins.len(), 2);
    assert_eq!(c.trusted_proxies.len(), 2);
    assert_eq!(c.token_ttl, Some(Duration::from_secs(8 * 3600)));
    assert_eq!(c.auth_fail_limit, 0);
    assert_eq!(c.api_hosts, vec!["vnc.example.com".to_owned()]);
    for bad in [
        ServeArgs {
            allowed_origins: Some("evil.example".into()),
            ..Default::default()
        },
        ServeArgs {
            trusted_proxies: Some("10.0.0.0/33".into()),
            ..Default::default()
        },
        ServeArgs {
            frame_ancestors: Some("'self'; script-src *".into()),
            ..Default::default()
        },
        ServeArgs {
            max_pending_per_ip: Some("0".into()),
            ..Default::default()
        },
        ServeArgs {
            token_ttl: Some("8000y".into()),
            ..Default::default()
        },
    ] {
        assert!(bad.resolve().is_err(), "{bad:?}");
    }
}

#[test]
fn public_hosts() {
    assert_eq!(parse_public_host("::1").ok().as_deref(), Some("[::1]"));
    assert_eq!(
        parse_public_host("vnc.example.com").ok().as_deref(),
        Some("vnc.example.com")
    );
    assert!(parse_public_host("evil.com/x").is_err());
    assert!(parse_public_host("a:80").is_err());
}

#[test]
fn file_values_fill_in_below_flags() {
    let dir = std::env::temp_dir().join(format!("vncgate-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok();
    let path = dir.join("c.toml");
    std::fs::write(&path, "port-range = \"7000-7099\"\nmax_sessions = 20\n").ok();
    let args = ServeArgs {
        config: Some(path.clone()),
        max_sessions: Some("30".into()),
        ..Default::default()
    };
    let c = args.resolve().ok();
    assert_eq!(c.as_ref().map(|c| c.port_range.clone()), Some(7000..=7099));
    assert_eq!(c.map(|c| c.max_sessions), Some(30));
    std::fs::write(&path, "bogus = 1\n").ok();
    assert!(matches!(
        ServeArgs {
            config: Some(path),
            ..Default::default()
        }
        .resolve(),
        Err(ConfigError::ParseFile { .. })
    ));
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn public_port_flags() {
    let off_alone = ServeArgs {
        session_ports: Some("off".into()),
        ..Default::default()
    };
    let err = off_alone.resolve().err().map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("--public-listen")),
        "{err:?}"
    );
    let base_alone = ServeArgs {
        public_base_url: Some("https://vnc.example".into()),
        ..Default::default()
    };
    assert!(base_alone.resolve().is_err());
    let off = ServeArgs {
        public_listen: Some("127.0.0.1:6443".into()),
        session_ports: Some("off".into()),
        port_range: Some("7000-7009".into()),
        ..Default::default()
    };
    let config = off.resolve().expect("valid");
    assert!(!config.session_ports);
    assert_eq!(
        config.max_sessions, DEFAULT_MAX_SESSIONS_PORTLESS,
        "not clamped to the pool"
    );
    let more = ServeArgs {
        max_sessions: Some("20000".into()),
        ..off.clone()
    };
    assert_eq!(more.resolve().map(|c| c.max_sessions).ok(), Some(20_000));
    assert!(
        ServeArgs {
            session_ports: Some("maybe".into()),
            ..off.clone()
        }
        .resolve()
        .is_err()
    );
    for (url, ok) in [
        ("https://vnc.example", true),
        ("https://vnc.example/", true),
        ("https://vnc.example:8443/consoles/", true),
        ("http://[::1]:8080/a/b", true),
        ("ftp://vnc.example", false),
        ("https://", false),
        ("https://vnc.example/a?x=1", false),
        ("https://vnc.example/a#x", false),
        ("https://user@vnc.example", false),
        ("https://vnc.example//a", false),
        ("https://vnc.example/a%2F", false),
        ("https://vnc.example/a&b", false),
        ("vnc.example", false),
    ] {
        assert_eq!(parse_base_url(url).is_ok(), ok, "{url}");
    }
    assert_eq!(
        parse_base_url("https://vnc.example/consoles/")
            .ok()
            .as_deref(),
        Some("https://vnc.example/consoles")
    );
}

#[test]
fn viewer_send_buffer_flag() {
    assert!(
        ServeArgs::default()
            .resolve()
            .expect("valid")
            .viewer_send_buffer
    );
    let off = ServeArgs {
        viewer_send_buffer: Some("off".into()),
        ..Default::default()
    };
    assert!(!off.resolve().expect("valid").viewer_send_buffer);
    let auto = ServeArgs {
        viewer_send_buffer: Some("auto".into()),
        ..Default::default()
    };
    assert!(auto.resolve().expect("valid").viewer_send_buffer);
    let err = ServeArgs {
        viewer_send_buffer: Some("4096".into()),
        ..Default::default()
    }
    .resolve()
    .err()
    .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("--viewer-send-buffer") && e.contains("auto or off")),
        "{err:?}"
    );
}
