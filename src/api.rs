//! The control API: handlers for `/v1/...`, `/healthz`, and the mapping of every failure to
//! `{"error": {"code", "message"}}` with its status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::access::{ApiGuard, ConnectionLimits};
use crate::http;
use crate::pool::PoolStats;
use crate::registry::{Opened, SessionError, SessionRegistry};
use crate::session::{SessionLimits, parse_limit};

/// Requests are a vm_id and a target; anything near this size is not a real client.
pub const MAX_BODY: usize = 64 * 1024;

/// An API failure, as the client sees it.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

impl From<SessionError> for ApiError {
    fn from(err: SessionError) -> Self {
        let message = err.to_string();
        match err {
            SessionError::InvalidVmId(_) | SessionError::InvalidTarget(_) => {
                ApiError::invalid(message)
            }
            SessionError::Pool(p) if p.is_exhausted() => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted", message)
            }
            SessionError::Pool(_) | SessionError::Listener { .. } => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "allocation_failed",
                message,
            ),
            SessionError::NotFound(_) | SessionError::ViewerNotFound { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
            }
            SessionError::Coordination(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "coordination_failed",
                message,
            ),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub registry: Arc<SessionRegistry>,
    /// `--public-host`; `None` means "the Host header of the request".
    pub public_host: Option<String>,
    pub started: Instant,
    /// The API's own TLS (`--api-cert`), whose failed reloads show in status warnings.
    pub api_tls: Option<Arc<crate::tls::ReloadableTls>>,
    /// Bearer token, Origin and Host checks.
    pub guard: Arc<ApiGuard>,
    /// The session ports' connection caps, for status.
    pub limits: Arc<ConnectionLimits>,
    /// The cleanup pass (`POST /v1/cleanup`, `last_cleanup` in status).
    pub cleanup: Arc<crate::cleanup::Cleanup>,
}

/// Serves the API on `listener` until its `stop`: the one accept loop of [`crate::http`], each
/// connection a task on the listener's tracker, request bodies read within
/// [`http::BODY_READ_TIMEOUT`]. Every request passes `guard` first (Host, Origin, bearer
/// token), so unknown routes are refused like known ones: no route enumeration.
pub async fn serve(
    listener: http::Listener,
    app: Router,
    guard: Arc<ApiGuard>,
    metrics: Arc<crate::metrics::Metrics>,
) {
    http::serve(listener, move |_conn| {
        let app = app.clone();
        let guard = Arc::clone(&guard);
        let metrics = Arc::clone(&metrics);
        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let app = app.clone();
            let guard = Arc::clone(&guard);
            let metrics = Arc::clone(&metrics);
            async move {
                let started = Instant::now();
                let answer = answer(app, &guard, req).await;
                metrics.api_answered(started.elapsed());
                answer
            }
        })
    })
    .await
}

/// One API request: the guard, CORS, then the routes.
async fn answer(
    app: Router,
    guard: &ApiGuard,
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<Response, Infallible> {
    {
        let origin = req.headers().get(header::ORIGIN).cloned();
        let preflight = req.method() == axum::http::Method::OPTIONS
            && req
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        if let Err(refusal) = guard.check(req.uri().path(), preflight, req.headers()) {
            // An allowed browser app may read why (e.g. its token was wrong).
            let allowed = origin
                .as_ref()
                .and_then(|o| o.to_str().ok())
                .is_some_and(|o| guard.origin_allowed(o));
            let response = refused(refusal);
            return Ok(if allowed {
                with_cors(response, origin)
            } else {
                response
            });
        }
        // Past the guard, an Origin is one of --api-allowed-origins: answer CORS.
        if preflight {
            return Ok(with_cors(preflight_response(), origin));
        }
        let req = req.map(|body| axum::body::Body::new(http::DeadlineBody::new(body)));
        tower::ServiceExt::oneshot(app, req)
            .await
            .map(|r| with_cors(r, origin))
    }
}

fn refused(refusal: crate::access::ApiRefusal) -> Response {
    let status = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
    let mut response = ApiError::new(status, refusal.code, refusal.message).into_response();
    if let Some(v) = refusal.authenticate {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(v),
        );
    }
    response
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight_response() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        header::HeaderValue::from_static("GET, POST, DELETE"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        header::HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        header::HeaderValue::from_static("600"),
    );
    r
}

/// Lets an allowed browser origin read the answer (the guard refused every other origin).
fn with_cors(mut response: Response, origin: Option<header::HeaderValue>) -> Response {
    if let Some(origin) = origin {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::VARY, header::HeaderValue::from_static("Origin"));
    }
    response
}

/// The API's routes; a plain function so tests can drive it without a socket.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/sessions", get(list_sessions).post(open_session))
        .route(
            "/v1/sessions/{vm_id}",
            get(get_session).delete(close_session),
        )
        .route(
            "/v1/sessions/{vm_id}/token",
            axum::routing::post(rotate_token),
        )
        .route(
            "/v1/sessions/{vm_id}/viewers/{viewer_id}",
            axum::routing::delete(kick_viewer),
        )
        .route("/v1/status", get(status))
        .route("/v1/cleanup", axum::routing::post(cleanup))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such API route; see GET /v1/status, /v1/sessions",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not take that method",
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

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

/// `GET /metrics`: the OpenMetrics text, with the values that live elsewhere read now.
async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let registry = &state.registry;
    let pool = registry.pool().stats();
    let (mut to_client, mut to_server) = registry.metrics().closed_bytes();
    for s in registry.list() {
        let (c, v) = s.traffic_totals();
        to_client += c;
        to_server += v;
    }
    let mut cert_not_after = Vec::new();
    if let Some(t) = registry.cert_not_after() {
        cert_not_after.push(("session", t));
    }
    if let Some(t) = state.api_tls.as_ref().and_then(|t| t.not_after()) {
        cert_not_after.push(("api", t));
    }
    let text = registry.metrics().render(&crate::metrics::Snapshot {
        sessions: registry.len() as u64,
        viewers: registry.connection_count() as u64,
        pool_allocated: pool.allocated_ports as u64,
        pool_free: pool.free_ports as u64,
        pool_foreign: pool.foreign_ports as u64,
        bytes_to_client: to_client,
        bytes_to_server: to_server,
        state_write_failures: registry
            .commit_stats()
            .failures
            .load(std::sync::atomic::Ordering::Relaxed),
        cert_not_after,
    });
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    if openmetrics {
        ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
    } else {
        (
            [(header::CONTENT_TYPE, crate::metrics::TEXT_CONTENT_TYPE)],
            crate::metrics::prometheus_text(&text),
        )
            .into_response()
    }
}

async fn open_session(
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
    let info = session.info(&url_host(&state, &headers), state.registry.url_style());
    Ok((status, Json(info)).into_response())
}

async fn list_sessions(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let host = url_host(&state, &headers);
    let sessions: Vec<_> = state
        .registry
        .list()
        .iter()
        .map(|s| s.info(&host, state.registry.url_style()))
        .collect();
    Json(serde_json::json!({ "sessions": sessions })).into_response()
}

fn vm_id_from(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|err| ApiError::invalid(format!("bad vm_id in the path: {err}")))
}

async fn get_session(
    State(state): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let vm_id = vm_id_from(path)?;
    let session = state
        .registry
        .get(&vm_id)
        .ok_or(SessionError::NotFound(vm_id))?;
    let info = session.info(&url_host(&state, &headers), state.registry.url_style());
    Ok(Json(info).into_response())
}

async fn close_session(
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

async fn rotate_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let vm_id = vm_id_from(path)?;
    let body = body.map_err(|e| ApiError::invalid(format!("cannot read the request body: {e}")))?;
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
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
    let info = session.info(&url_host(&state, &headers), state.registry.url_style());
    Ok(Json(info).into_response())
}

async fn kick_viewer(
    State(state): State<ApiState>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let (vm_id, viewer) = path
        .map(|Path(p)| p)
        .map_err(|err| ApiError::invalid(format!("bad path: {err}")))?;
    state.registry.kick(&vm_id, &viewer)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub port_pool: PoolStatus,
    pub max_sessions: usize,
    pub active_sessions: usize,
    pub active_connections: usize,
    pub system_health: String,
    pub warnings: Vec<String>,
    pub uptime_s: u64,
    pub version: String,
    /// The durable state file and the cost of its writes.
    pub state: StateStatus,
    /// Client connections of the session ports and what the abuse limits refused.
    pub connections: ConnectionStatus,
    /// The last cleanup pass (null before the first).
    pub last_cleanup: Option<LastCleanup>,
}

/// `last_cleanup` of status.
#[derive(Debug, Serialize, Deserialize)]
pub struct LastCleanup {
    /// When the pass ended (RFC 3339).
    pub time: String,
    pub checked: usize,
    pub closed: usize,
}

/// `POST /v1/cleanup`: runs a pass now (or waits for the running one) and reports it.
async fn cleanup(
    State(state): State<ApiState>,
) -> Result<Json<crate::cleanup::CleanupReport>, ApiError> {
    let cleanup = Arc::clone(&state.cleanup);
    // On its own task: the pass finishes even if the client hangs up.
    let report = state
        .registry
        .run_to_end(|_| async move { Ok(cleanup.run(true).await) })
        .await?;
    Ok(Json(report))
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ConnectionStatus {
    /// Client connections open now (pending and upgraded).
    pub open: usize,
    /// Closed at accept since start: `--max-connections` reached.
    pub refused_max_connections: u64,
    /// Closed at accept since start: `--max-pending-per-ip` reached.
    pub refused_max_pending: u64,
    /// Requests answered 429 since start (`--auth-fail-limit`).
    pub rate_limited: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StateStatus {
    pub file: String,
    pub writes: u64,
    pub failed_writes: u64,
    pub last_write_ms: f64,
    pub mean_write_ms: f64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct PoolStatus {
    pub total_ports: usize,
    pub allocated_ports: usize,
    pub free_ports: usize,
    pub foreign_ports: usize,
    pub utilization_percent: f64,
}

impl From<PoolStats> for PoolStatus {
    fn from(s: PoolStats) -> Self {
        let utilization = if s.total_ports == 0 {
            0.0
        } else {
            (s.allocated_ports as f64 * 1000.0 / s.total_ports as f64).round() / 10.0
        };
        PoolStatus {
            total_ports: s.total_ports,
            allocated_ports: s.allocated_ports,
            free_ports: s.free_ports,
            foreign_ports: s.foreign_ports,
            utilization_percent: utilization,
        }
    }
}

async fn status(State(state): State<ApiState>) -> Json<Status> {
    let active_sessions = state.registry.len();
    let mut warnings = state.registry.warnings();
    if let Some(w) = state.api_tls.as_ref().and_then(|t| t.warning()) {
        warnings.push(w);
    }
    if let Some(w) = state.guard.warning() {
        warnings.push(w);
    }
    let (refused_max_connections, refused_max_pending) = state.limits.refused();
    // 80% of the cap: time to act before opens start failing.
    // The cap a config reload may have changed.
    let max_sessions = state.registry.pool().cap();
    if active_sessions * 5 >= max_sessions * 4 {
        warnings.push(format!(
            "{active_sessions} of {} sessions in use (80% or more of --max-sessions)",
            max_sessions
        ));
    }
    Json(Status {
        port_pool: state.registry.pool().stats().into(),
        max_sessions,
        active_sessions,
        active_connections: state.registry.connection_count(),
        system_health: if warnings.is_empty() {
            "healthy"
        } else {
            "warning"
        }
        .into(),
        warnings,
        uptime_s: state.started.elapsed().as_secs(),
        version: env!("CARGO_PKG_VERSION").into(),
        last_cleanup: state.cleanup.last_report().map(|r| LastCleanup {
            time: r.finished_at,
            checked: r.checked,
            closed: r.closed.len(),
        }),
        connections: ConnectionStatus {
            open: state.limits.open(),
            refused_max_connections,
            refused_max_pending,
            rate_limited: state.registry.rate_limited(),
        },
        state: {
            use std::sync::atomic::Ordering::Relaxed;
            let c = state.registry.commit_stats();
            let writes = c.writes.load(Relaxed);
            let total = c.total_write_us.load(Relaxed);
            StateStatus {
                file: state.registry.state_path().display().to_string(),
                writes,
                failed_writes: c.failures.load(Relaxed),
                last_write_ms: c.last_write_us.load(Relaxed) as f64 / 1000.0,
                mean_write_ms: if writes == 0 {
                    0.0
                } else {
                    total as f64 / writes as f64 / 1000.0
                },
            }
        },
    })
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
