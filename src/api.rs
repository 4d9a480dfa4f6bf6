//! The control API: handlers for `/v1/...`, `/healthz`, and the mapping of every failure to
//! `{"error": {"code", "message"}}` with its status.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::access::{ApiGuard, ConnectionLimits};
use crate::http;
use crate::registry::{SessionError, SessionRegistry};

mod openapi;
mod sessions;
mod status;

pub use openapi::{ErrorBody, ErrorDetail};
pub use status::{ConnectionStatus, LastCleanup, PoolStatus, StateStatus, Status};

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
            SessionError::InvalidVmId(_)
            | SessionError::InvalidTarget(_)
            | SessionError::LimitChange { .. } => ApiError::invalid(message),
            SessionError::Pool(p) if p.is_exhausted() => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "pool_exhausted", message)
            }
            SessionError::Pool(_) => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "allocation_failed",
                message,
            ),
            // The port was bound but its server could not be started (DESIGN.md).
            SessionError::Listener { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "proxy_failed", message)
            }
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
    /// The public port's number (`--public-listen`), for status.
    pub public_port: Option<u16>,
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
        .route(
            "/v1/sessions",
            get(sessions::list_sessions).post(sessions::open_session),
        )
        .route(
            "/v1/sessions/{vm_id}",
            get(sessions::get_session).delete(sessions::close_session),
        )
        .route(
            "/v1/sessions/{vm_id}/token",
            axum::routing::post(sessions::rotate_token),
        )
        .route(
            "/v1/sessions/{vm_id}/viewers/{viewer_id}",
            axum::routing::delete(sessions::kick_viewer),
        )
        .route("/v1/status", get(status::status))
        .route("/v1/cleanup", axum::routing::post(cleanup))
        .route("/healthz", get(healthz))
        .route("/metrics", get(status::metrics))
        .route("/openapi.json", get(openapi::document))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_oversize))
        .with_state(state)
}

/// Bodies declared up to this size are read (and dropped) before one over [`MAX_BODY`] is
/// refused: hyper closes a connection with unread bytes by a reset, which can destroy the
/// answer before the client reads it.
const DRAIN_BEFORE_REFUSING: usize = 1 << 20;

/// A body declared larger than [`MAX_BODY`] is refused as one that arrives too large would be,
/// without handing it to the routes. One declared past [`DRAIN_BEFORE_REFUSING`] is refused at
/// once, rather than after waiting (up to the body deadline) for bytes nobody will take. A
/// chunked POST body goes to [`refuse_oversize_chunked`].
async fn refuse_oversize(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_none()
        && request.method() == axum::http::Method::POST
        && request.headers().contains_key(header::TRANSFER_ENCODING)
    {
        return refuse_oversize_chunked(request, next).await;
    }
    let Some(declared) = declared.filter(|&n| n > MAX_BODY as u64) else {
        return next.run(request).await;
    };
    // A client waiting for `100 Continue` has sent nothing yet: refuse before inviting it.
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if declared <= DRAIN_BEFORE_REFUSING as u64 && !expects_continue {
        // Each piece dropped as it comes, nothing kept; bounded by the declared size and the
        // connection's body deadline.
        use http_body_util::BodyExt;
        let mut body = request.into_body();
        while let Some(Ok(_)) = body.frame().await {}
    }
    ApiError::invalid(format!("request body exceeds {} KiB", MAX_BODY / 1024)).into_response()
}

/// A POST body of undeclared length (chunked) is read here, up to [`MAX_BODY`], and handed on
/// whole with its length; past that it is read on and dropped up to [`DRAIN_BEFORE_REFUSING`]
/// before the 400, so a client still sending gets the answer rather than a reset. (Other
/// methods take no body; theirs is left to hyper.)
async fn refuse_oversize_chunked(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use http_body_util::BodyExt;
    let (mut parts, mut body) = request.into_parts();
    let mut kept = bytes::BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(frame) => frame,
            // Already too large: that is the answer, however the rest went.
            Err(_) if seen > MAX_BODY => break,
            // Cut short, malformed, or past the body deadline: nothing is acted on.
            Err(err) => {
                return ApiError::invalid(format!("cannot read the request body: {err}"))
                    .into_response();
            }
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        seen = seen.saturating_add(data.len());
        if seen <= MAX_BODY {
            kept.extend_from_slice(&data);
        } else if seen > DRAIN_BEFORE_REFUSING {
            break;
        } else {
            kept = bytes::BytesMut::new();
        }
    }
    if seen > MAX_BODY {
        return ApiError::invalid(format!("request body exceeds {} KiB", MAX_BODY / 1024))
            .into_response();
    }
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.insert(
        header::CONTENT_LENGTH,
        axum::http::HeaderValue::from(kept.len()),
    );
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(kept.freeze()),
    ))
    .await
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

/// Liveness: the daemon answers (no token needed).
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "daemon",
    responses((status = 200, description = "The daemon is up", body = openapi::Health))
)]
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `POST /v1/cleanup`: runs a pass now (or waits for the running one) and reports it.
#[utoipa::path(
    post,
    path = "/v1/cleanup",
    tag = "daemon",
    responses(
        (status = 200, description = "What the pass checked and closed", body = crate::cleanup::CleanupReport),
        (status = 500, description = "coordination_failed: the pass could not finish", body = ErrorBody),
    )
)]
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
