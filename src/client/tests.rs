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
