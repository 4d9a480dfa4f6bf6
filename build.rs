//! Fails early, with the fix, when the console page's npm dependency is not installed: the
//! page and noVNC are embedded into the binary at build time.

fn main() {
    let rfb = "static/node_modules/@novnc/novnc/core/rfb.js";
    println!("cargo:rerun-if-changed={rfb}");
    println!("cargo:rerun-if-changed=static/package-lock.json");
    if !std::path::Path::new(rfb).exists() {
        panic!(
            "\n\nthe console page needs noVNC, which is not installed.\n\
             Run `npm ci --prefix static` (or `bash scripts/serve.sh`, which does it) and build again.\n\n"
        );
    }
}
