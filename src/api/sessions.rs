//! The session routes of the control API (DESIGN.md "Control API"): open, list, get, close,
//! rotate a token, disconnect a viewer; request parsing and the host console URLs name.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use super::{ApiError, ApiState, ErrorBody, MAX_BODY, openapi};
use crate::registry::{Opened, SessionError};
use crate::session::{SessionInfo, SessionLimits, parse_limit};

#[derive(Deserialize)]
struct OpenRequest {
    vm_id: String,
    target: String,
    /// Read by [`OpenRequest::limits`], which names the field in its error.
    #[serde(default)]
    idle_timeout: Option<serde_json::Value>,
    #[serde(default)]
    max_lifetime: Option<serde_json::Value>,
}

impl OpenRequest {
    /// The session limits of the request; a bad value is 400 naming its field. `null` is the
    /// same as leaving the field out.
    fn limits(&self) -> Result<SessionLimits, ApiError> {
        let read = |field: &str, value: &Option<serde_json::Value>| {
            match value {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => parse_limit(v).map(Some).map_err(|why| {
                ApiError::invalid(format!(
                    "{field}: {why}; expected a duration such as \"90s\", \"15m\" or \"8h\", or a number of seconds"
                ))
            }),
        }
        };
        Ok(SessionLimits {
            idle_timeout: read("idle_timeout", &self.idle_timeout)?,
            max_lifetime: read("max_lifetime", &self.max_lifetime)?,
        })
    }
}

/// Bodies are JSON whatever the Content-Type; the message says what is wrong with one.
fn parse_open(body: Result<Bytes, BytesRejection>) -> Result<OpenRequest, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::invalid(format!("request body exceeds {} KiB", MAX_BODY / 1024))
        } else {
            ApiError::invalid(format!("cannot read the request body: {rejection}"))
        }
    })?;
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        // serde would fill the struct from an array: the contract is an object.
        return Err(ApiError::invalid(
            "request body is a JSON array; expected an object: {\"vm_id\": \"...\", \"target\": \"host:port\"}",
        ));
    }
    serde_json::from_slice(&body).map_err(|err| {
        use serde_json::error::Category;
        match err.classify() {
            Category::Data => ApiError::invalid(format!(
                "{err}; expected {{\"vm_id\": \"...\", \"target\": \"host:port\"}}"
            )),
            _ => ApiError::invalid(format!(
                "request body is not JSON ({err}); send {{\"vm_id\": \"...\", \"target\": \"host:port\"}}"
            )),
        }
    })
}

/// The host console URLs name: `--public-host`, else the request's Host (port dropped), else
/// this machine's name.
fn url_host(state: &ApiState, headers: &HeaderMap) -> String {
    if let Some(h) = &state.public_host {
        return h.clone();
    }
    let from_header = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .and_then(host_without_port);
    from_header.unwrap_or_else(machine_hostname)
}

fn host_without_port(authority: &str) -> Option<String> {
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (v6, _) = rest.split_once(']')?;
        v6.parse::<std::net::Ipv6Addr>().ok()?;
        return Some(format!("[{v6}]"));
    } else {
        authority.split(':').next()?
    };
    let ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    ok.then(|| host.to_owned())
}

fn machine_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

async fn open_request(
    state: &ApiState,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Arc<crate::session::Session>, Opened), ApiError> {
    let request = parse_open(body)?;
    let limits = request.limits()?;
    Ok(state
        .registry
        .run_to_end(|r| async move { r.open(&request.vm_id, &request.target, limits).await })
        .await?)
}

/// Opens the console session of a VM, or returns (retargeting) the one it has.
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    request_body(content = openapi::OpenRequestDoc, content_type = "application/json"),
    responses(
        (status = 201, description = "A new session", body = SessionInfo),
        (status = 200, description = "The VM's session: unchanged, or retargeted (port and token kept)", body = SessionInfo),
        (status = 400, description = "invalid_request: bad JSON, vm_id, target or limit (the message names it)", body = ErrorBody),
        (status = 500, description = "allocation_failed (a bind error other than no free port), proxy_failed, or coordination_failed (the state write failed; rolled back)", body = ErrorBody),
        (status = 503, description = "pool_exhausted: --max-sessions reached or no port of the range can be bound", body = ErrorBody),
    )
)]
pub(super) async fn open_session(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let metrics = Arc::clone(state.registry.metrics());
    let opened = open_request(&state, body).await;
    metrics.session_opened(match &opened {
        Ok((_, Opened::Created)) => "created",
        Ok((_, Opened::Unchanged)) => "unchanged",
        Ok((_, Opened::Retargeted)) => "retargeted",
        Err(err) => err.code,
    });
    let (session, opened) = opened?;
    let status = match opened {
        Opened::Created => StatusCode::CREATED,
        Opened::Unchanged | Opened::Retargeted => StatusCode::OK,
    };
    let info = session.info(&url_host(&state, &headers), &state.registry.url_style());
    Ok((status, Json(info)).into_response())
}

/// Every session, ordered by vm_id.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    responses((status = 200, description = "All sessions", body = openapi::SessionList))
)]
pub(super) async fn list_sessions(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let host = url_host(&state, &headers);
    let sessions: Vec<_> = state
        .registry
        .list()
        .iter()
        .map(|s| s.info(&host, &state.registry.url_style()))
        .collect();
    Json(serde_json::json!({ "sessions": sessions })).into_response()
}

fn vm_id_from(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|err| ApiError::invalid(format!("bad vm_id in the path: {err}")))
}

/// One session.
#[utoipa::path(
    get,
    path = "/v1/sessions/{vm_id}",
    tag = "sessions",
    params(("vm_id" = String, Path, description = "The VM's id", example = "vm-42")),
    responses(
        (status = 200, description = "The session", body = SessionInfo),
        (status = 404, description = "not_found: no session for this vm_id", body = ErrorBody),
    )
)]
pub(super) async fn get_session(
    State(state): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let vm_id = vm_id_from(path)?;
    let session = state
        .registry
        .get(&vm_id)
        .ok_or(SessionError::NotFound(vm_id))?;
    let info = session.info(&url_host(&state, &headers), &state.registry.url_style());
    Ok(Json(info).into_response())
}

/// Closes a session: its viewers get 1001 `session closed`, its port is free when this answers.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{vm_id}",
    tag = "sessions",
    params(("vm_id" = String, Path, description = "The VM's id", example = "vm-42")),
    responses(
        (status = 204, description = "Closed"),
        (status = 404, description = "not_found: no session for this vm_id", body = ErrorBody),
        (status = 500, description = "coordination_failed: the state write failed; the session stays", body = ErrorBody),
    )
)]
pub(super) async fn close_session(
    State(state): State<ApiState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let vm_id = vm_id_from(path)?;
    state
        .registry
        .run_to_end(|r| async move { r.close(&vm_id).await })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `POST /v1/sessions/{vm_id}/token`; an empty body is `{"disconnect": false}`.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    #[serde(default)]
    disconnect: bool,
}

/// Issues the session a new token; the old one stops admitting new connections at once.
#[utoipa::path(
    post,
    path = "/v1/sessions/{vm_id}/token",
    tag = "sessions",
    params(("vm_id" = String, Path, description = "The VM's id", example = "vm-42")),
    request_body(content = Option<openapi::RotateRequestDoc>, content_type = "application/json", description = "Optional; no body is disconnect: false"),
    responses(
        (status = 200, description = "The session with its new token", body = SessionInfo),
        (status = 404, description = "not_found: no session for this vm_id", body = ErrorBody),
        (status = 500, description = "coordination_failed: the state write failed; the old token stays", body = ErrorBody),
    )
)]
pub(super) async fn rotate_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let vm_id = vm_id_from(path)?;
    let body = body.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?;
    let text = body.trim_ascii();
    // No body, or JSON null, is `{"disconnect": false}`.
    let request: RotateRequest = if text.is_empty() || text == b"null" {
        RotateRequest::default()
    } else if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::invalid(
            "request body is a JSON array; send an object such as {\"disconnect\": true}, or nothing",
        ));
    } else {
        serde_json::from_slice(&body).map_err(|err| {
            ApiError::invalid(format!(
                "{err}; expected {{\"disconnect\": true}} or {{\"disconnect\": false}} (or no body)"
            ))
        })?
    };
    let session = state
        .registry
        .run_to_end(|r| async move { r.rotate_token(&vm_id, request.disconnect).await })
        .await?;
    let info = session.info(&url_host(&state, &headers), &state.registry.url_style());
    Ok(Json(info).into_response())
}

/// Disconnects one viewer (1008 `disconnected by operator`); the session and its other
/// viewers stay.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{vm_id}/viewers/{viewer_id}",
    tag = "sessions",
    params(
        ("vm_id" = String, Path, description = "The VM's id", example = "vm-42"),
        ("viewer_id" = String, Path, description = "A viewer's id from the session's `viewers`", example = "1"),
    ),
    responses(
        (status = 204, description = "Disconnected"),
        (status = 404, description = "not_found: no such session or viewer", body = ErrorBody),
    )
)]
pub(super) async fn kick_viewer(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let (vm_id, viewer) = path
        .map(|Path(p)| p)
        .map_err(|err| ApiError::invalid(format!("bad path: {err}")))?;
    state.registry.kick(&vm_id, &viewer)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_the_host_header() {
        assert_eq!(
            host_without_port("127.0.0.1:6080").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(host_without_port("[::1]:6080").as_deref(), Some("[::1]"));
        assert_eq!(
            host_without_port("vnc.example.com").as_deref(),
            Some("vnc.example.com")
        );
        assert_eq!(host_without_port("evil/x"), None);
        assert_eq!(host_without_port("[zz]:1"), None);
    }
}
