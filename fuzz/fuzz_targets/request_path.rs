//! `clean_path` turns a request path into an asset path: it must never panic, and whatever it
//! lets through must stay inside the asset root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vncgate::web::clean_path;

fuzz_target!(|data: &[u8]| {
    // Request paths reach it as &str (hyper's URI); non-UTF-8 bytes never get this far.
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Some(p) = clean_path(raw) else {
        return;
    };
    assert!(!p.is_empty(), "{raw:?} -> empty path");
    assert!(!p.starts_with('/'), "{raw:?} -> absolute {p:?}");
    assert!(
        !p.contains(['\\', '\0', ':']) && !p.chars().any(char::is_control),
        "{raw:?} -> {p:?}"
    );
    for seg in p.split('/') {
        assert!(
            !seg.is_empty() && !seg.starts_with('.'),
            "{raw:?} -> {p:?}: segment {seg:?}"
        );
    }
    // Cleaning is idempotent on plain paths: the result, requested again, is itself (when it
    // holds no '%' that would be decoded a second time).
    if !p.contains('%') {
        assert_eq!(clean_path(&format!("/{p}")).as_deref(), Some(p.as_str()));
    }
});
