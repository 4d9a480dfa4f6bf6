//! `GET /openapi.json` (DESIGN.md "Cleanup, metrics, events", OpenAPI): the document is
//! OpenAPI 3.1, names every route the API has, validates with `openapi-spec-validator`, and
//! `schemathesis` run against the live daemon with it finds no answer that breaks the schema,
//! no status the document does not list, and no server error. Both tools come from PyPI into
//! `.venv` (scripts/deps.sh --test); generated session targets are confined to loopback by
//! `tests/openapi/hooks.py`, and the cleanup pass is off, so nothing is dialled.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::vnc::{Scratch, require};
use common::{DaemonProcess, bounded};
use serde_json::Value;

const TOKEN: &str = "openapi-test-token-0123456789abcdef";

fn venv_tool(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name)
}

async fn daemon(scratch: &Scratch) -> DaemonProcess {
    let token_file = scratch.0.join("api-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
    let token_arg = token_file.display().to_string();
    DaemonProcess::spawn(
        400,
        &["--cleanup-interval", "off", "--api-token-file", &token_arg],
    )
    .await
}

async fn document(daemon: &DaemonProcess) -> Value {
    let request = hyper::Request::get(format!("http://{}/openapi.json", daemon.api))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("request");
    let response = daemon
        .http
        .request(request)
        .await
        .expect("GET /openapi.json");
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .expect("body")
        .to_bytes();
    serde_json::from_slice(&body).expect("the document is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_lists_every_route_and_validates() {
    let validator = venv_tool("openapi-spec-validator");
    let validator_path = validator.display().to_string();
    if !require(&[validator_path.as_str()]) {
        return;
    }
    bounded(Duration::from_secs(60), async {
        let scratch = Scratch::new("openapi-doc");
        let daemon = daemon(&scratch).await;
        let doc = document(&daemon).await;
        assert_eq!(doc["openapi"], "3.1.0");
        for (path, method, statuses) in [
            (
                "/v1/sessions",
                "post",
                &["200", "201", "400", "401", "500", "503"][..],
            ),
            ("/v1/sessions", "get", &["200", "401"]),
            ("/v1/sessions/{vm_id}", "get", &["200", "404"]),
            ("/v1/sessions/{vm_id}", "delete", &["204", "404", "500"]),
            ("/v1/sessions/{vm_id}/token", "post", &["200", "404", "500"]),
            (
                "/v1/sessions/{vm_id}/viewers/{viewer_id}",
                "delete",
                &["204", "404"],
            ),
            ("/v1/status", "get", &["200"]),
            ("/v1/cleanup", "post", &["200"]),
            ("/healthz", "get", &["200"]),
            ("/metrics", "get", &["200"]),
            ("/openapi.json", "get", &["200"]),
        ] {
            let op = &doc["paths"][path][method];
            assert!(op.is_object(), "{method} {path} missing");
            for status in statuses {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} lacks {status}"
                );
            }
            // Every route answers a wrong method and a refused Origin/Host the same way.
            for status in ["400", "403", "405"] {
                assert!(
                    op["responses"][status].is_object(),
                    "{method} {path} lacks {status}"
                );
            }
        }
        assert!(
            doc["paths"]["/healthz"]["get"]["responses"]["401"].is_null(),
            "no token needed"
        );
        let session = &doc["components"]["schemas"]["SessionInfo"]["properties"];
        for field in [
            "vm_id",
            "target",
            "ws_port",
            "url",
            "ws_url",
            "token",
            "token_expires_at",
            "created_at",
            "idle_timeout",
            "max_lifetime",
            "closes_at",
            "connections",
            "bytes_to_client",
            "bytes_to_server",
            "viewers",
        ] {
            assert!(session[field].is_object(), "Session lacks {field}");
        }

        let file = scratch.0.join("openapi.json");
        std::fs::write(&file, serde_json::to_vec_pretty(&doc).expect("json")).expect("write");
        let out = Command::new(&validator)
            .arg(&file)
            .output()
            .expect("run openapi-spec-validator");
        assert!(
            out.status.success(),
            "openapi-spec-validator: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_answer_outside_the_document() {
    let st = venv_tool("st");
    let st_path = st.display().to_string();
    if !require(&[st_path.as_str()]) {
        return;
    }
    bounded(Duration::from_secs(300), async {
        let scratch = Scratch::new("openapi-st");
        let daemon = daemon(&scratch).await;
        let url = format!("http://{}/openapi.json", daemon.api);
        let root = env!("CARGO_MANIFEST_DIR");
        let out = tokio::task::spawn_blocking(move || {
            Command::new(&st)
                .args(["run", &url])
                .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
                // Every check but positive_data_acceptance: the schema says a duration is a
                // string, and only the daemon can tell "15m" from "soon" (it answers 400
                // naming the field, which the document lists).
                .args([
                    "--checks",
                    "all",
                    "--exclude-checks",
                    "positive_data_acceptance",
                ])
                .args(["--max-examples", "25", "--seed", "1", "--no-color"])
                .args(["--request-timeout", "10"])
                .env("SCHEMATHESIS_HOOKS", "tests.openapi.hooks")
                .env("PYTHONPATH", root)
                .env("PYTHONDONTWRITEBYTECODE", "1")
                .current_dir(root)
                .output()
        })
        .await
        .expect("join")
        .expect("run schemathesis");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis found failures:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Every operation of the document but the document itself (schemathesis leaves out the
        // URL it loaded the schema from).
        assert!(
            stdout.contains("Selected: 10/10") && stdout.contains("Tested: 10"),
            "every operation tested:\n{stdout}"
        );
        // The daemon is still there and healthy after the run.
        let (status, health) = daemon.call("GET", "/healthz", None).await;
        assert_eq!((status, &health["status"]), (200, &Value::from("ok")));
    })
    .await;
}
