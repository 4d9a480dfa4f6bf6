//! The browser side of end-to-end tests: Debian's headless Chromium driven by
//! `tests/e2e/console.mjs` (playwright-core), and the checks of what its canvas showed.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use super::rfb::{Screen, match_ratio};
use super::vnc::require;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

pub fn e2e_dir() -> PathBuf {
    PathBuf::from(MANIFEST).join("tests/e2e")
}

/// Screenshots and canvas dumps stay here after the run (target/tmp/e2e).
pub fn out_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("e2e");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

pub fn tools_present(extra: &[&str]) -> bool {
    let playwright = e2e_dir().join("node_modules/playwright-core/package.json");
    let novnc = PathBuf::from(MANIFEST).join("static/node_modules/@novnc/novnc/core/rfb.js");
    let mut tools = vec![
        "/usr/bin/chromium",
        "node",
        playwright.to_str().unwrap_or(""),
        novnc.to_str().unwrap_or(""),
    ];
    tools.extend_from_slice(extra);
    require(&tools)
}

/// Runs the Chromium driver (bounded, killed on drop) and returns its JSON result.
pub async fn drive(spec: Value) -> Value {
    let mut child = tokio::process::Command::new("node")
        .arg(e2e_dir().join("console.mjs"))
        .arg(spec.to_string())
        .current_dir(e2e_dir())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut out = String::new();
    let read = async {
        use tokio::io::AsyncReadExt;
        stdout
            .read_to_string(&mut out)
            .await
            .expect("driver output");
        child.wait().await.expect("driver exit")
    };
    let status = tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("the browser driver finished in 120 s");
    assert!(status.success(), "driver failed: {status}: {out}");
    let line = out.lines().last().unwrap_or_default();
    let result: Value = serde_json::from_str(line).unwrap_or_else(|_| panic!("driver said: {out}"));
    assert_eq!(result["errors"], json!([]), "page errors: {result}");
    assert_eq!(
        result["external"],
        json!([]),
        "requests outside the daemon: {result}"
    );
    result
}

pub fn canvas(name: &str, when: &str) -> Vec<u8> {
    let path = out_dir().join(format!("{name}-{when}.rgba"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn assert_matches(name: &str, when: &str, screen: &Screen) {
    let ratio = match_ratio(&canvas(name, when), screen);
    eprintln!(
        "{name} {when}: {:.3}% of canvas pixels equal the direct RFB read",
        ratio * 100.0
    );
    assert!(
        ratio >= 0.99,
        "{name} {when}: only {:.2}% of pixels match",
        ratio * 100.0
    );
}
