//! vm_id validation and target parsing: never a panic; a valid vm_id matches its documented
//! pattern; a parsed target prints as a string that parses back to the same target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vncgate::Target;
use vncgate::registry::validate_vm_id;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // `[A-Za-z0-9][A-Za-z0-9._:-]{0,127}`, checked independently.
    let pattern = s.len() <= 128
        && s.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b));
    assert_eq!(validate_vm_id(s).is_ok(), pattern, "vm_id {s:?}");

    if let Ok(target) = s.parse::<Target>() {
        let shown = target.to_string();
        let again: Target = shown
            .parse()
            .unwrap_or_else(|e| panic!("{s:?} -> {target:?} -> {shown:?} does not parse: {e}"));
        assert_eq!(again, target, "{s:?} -> {shown:?}");
    }
});
