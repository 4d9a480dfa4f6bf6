//! `GET /v1/status` and `GET /metrics`: what the daemon reports about itself (DESIGN.md
//! "Control API", Status; "Cleanup, metrics, events", metrics).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::ApiState;
use crate::pool::PoolStats;

/// `GET /v1/status`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Status {
    /// The session ports' pool; all zero with `--session-ports off`.
    pub port_pool: PoolStatus,
    pub max_sessions: usize,
    /// `on`, or `off`: no pool ports, sessions only on the public port.
    pub session_ports: String,
    /// The public port (`--public-listen`); null without one.
    pub public_port: Option<u16>,
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
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LastCleanup {
    /// When the pass ended (RFC 3339).
    pub time: String,
    pub checked: usize,
    pub closed: usize,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
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

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StateStatus {
    pub file: String,
    pub writes: u64,
    pub failed_writes: u64,
    pub last_write_ms: f64,
    pub mean_write_ms: f64,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct PoolStatus {
    pub total_ports: usize,
    pub allocated_ports: usize,
    pub free_ports: usize,
    pub foreign_ports: usize,
    /// Sessions still on ports outside `--port-range` after a config reload narrowed or moved
    /// it (they keep them until they close).
    pub outside_range_ports: usize,
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
            outside_range_ports: s.outside_range_ports,
            utilization_percent: utilization,
        }
    }
}

/// The pool, the sessions and their viewers, health and its reasons.
#[utoipa::path(
    get,
    path = "/v1/status",
    tag = "daemon",
    responses((status = 200, description = "The daemon's status", body = Status))
)]
pub(super) async fn status(State(state): State<ApiState>) -> Json<Status> {
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
    let max_sessions = state.registry.max_sessions();
    if active_sessions.saturating_mul(5) >= max_sessions.saturating_mul(4) {
        warnings.push(format!(
            "{active_sessions} of {} sessions in use (80% or more of --max-sessions)",
            max_sessions
        ));
    }
    Json(Status {
        port_pool: state.registry.pool_stats().into(),
        max_sessions,
        session_ports: if state.registry.session_ports() {
            "on"
        } else {
            "off"
        }
        .into(),
        public_port: state.public_port,
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

/// `GET /metrics`: the OpenMetrics text, with the values that live elsewhere read now.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "daemon",
    responses((
        status = 200,
        description = "Prometheus text format 0.0.4, or OpenMetrics 1.0 when the Accept header asks for it",
        content(
            (String = "text/plain"),
            (String = "application/openmetrics-text")
        )
    ))
)]
pub(super) async fn metrics(State(state): State<ApiState>, headers: HeaderMap) -> Response {
    let registry = &state.registry;
    let pool = registry.pool_stats();
    let (closed_to_client, closed_to_server) = registry.metrics().closed_bytes();
    let (live_to_client, live_to_server) = registry.traffic_totals();
    let (to_client, to_server) = (
        closed_to_client + live_to_client,
        closed_to_server + live_to_server,
    );
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
        pool_outside_range: pool.outside_range_ports as u64,
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
