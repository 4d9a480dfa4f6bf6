//! The state file loader: any bytes give records or an error, never a panic; what it accepts
//! passes validation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vncgate::state::{parse, validate};

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = parse(data) {
        assert!(
            validate(&records).is_ok(),
            "parse accepted what validate refuses"
        );
        // Records hold what a daemon could have written: each target is also looked at
        // the way a restore would parse it (errors are fine, panics are not).
        for r in &records {
            let _ = r.target.parse::<vncgate::Target>();
            let _ = vncgate::registry::validate_vm_id(&r.vm_id);
        }
    }
});
