//! The daemon's counters and histograms, and the Prometheus text of `GET /metrics` (DESIGN.md
//! "Cleanup, metrics, events"), through `prometheus-client`.
//!
//! Labels are fixed small sets (a direction, an outcome, a close code): nothing is labelled by
//! vm_id, so the series count does not grow with sessions. Values that already live elsewhere
//! (sessions, viewers, pool ports, bytes of live viewers, the certificate's expiry) are read at
//! scrape time instead of being kept twice; nothing on the relay's per-frame path touches this
//! module.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// One label: `(name, value)`, both from a fixed set.
type Label = [(&'static str, &'static str); 1];

/// The `Content-Type` of [`Metrics::render`]'s output (what Prometheus asks for first).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` of [`prometheus_text`]'s output (for clients that do not ask for
/// OpenMetrics: curl, `promtool check metrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition: a counter's `# HELP` and
/// `# TYPE` name its samples (`x_total`), as that format wants, and there is no `# EOF`.
pub fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 256);
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let described = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match described {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// How a viewer's WebSocket upgrade ended (`vncgate_viewer_connects_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Relaying: the VNC target answered.
    Ok,
    /// 403 `forbidden` or `token_expired`.
    BadToken,
    /// 403 `origin_refused`.
    OriginRefused,
    /// 429 `rate_limited`.
    RateLimited,
    /// Closed with 1011: the VNC target could not be reached.
    TargetUnreachable,
    /// Closed with 1013: `--max-connections-per-session` viewers already.
    Cap,
}

impl ConnectOutcome {
    fn label(self) -> &'static str {
        match self {
            ConnectOutcome::Ok => "ok",
            ConnectOutcome::BadToken => "bad_token",
            ConnectOutcome::OriginRefused => "origin_refused",
            ConnectOutcome::RateLimited => "rate_limited",
            ConnectOutcome::TargetUnreachable => "target_unreachable",
            ConnectOutcome::Cap => "cap",
        }
    }
}

/// Why a session left the table (`vncgate_session_closes_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    /// `DELETE /v1/sessions/{vm_id}`.
    Deleted,
    /// The cleanup pass: its target failed every check for `--stale-after`.
    TargetGone,
    /// Its `max_lifetime` passed.
    MaxLifetime,
    /// Its libvirt domain stopped (`--libvirt`).
    DomainStopped,
}

impl CloseCause {
    /// The label value, also the `reason` of the session-close event.
    pub fn label(self) -> &'static str {
        match self {
            CloseCause::Deleted => "deleted",
            CloseCause::TargetGone => "target_gone",
            CloseCause::MaxLifetime => "max_lifetime",
            CloseCause::DomainStopped => "domain_stopped",
        }
    }
}

/// Values read at scrape time from where they live.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Sessions in the table.
    pub sessions: u64,
    /// Live viewers over all sessions.
    pub viewers: u64,
    /// Ports of the range held by sessions.
    pub pool_allocated: u64,
    /// Ports of the range free to bind.
    pub pool_free: u64,
    /// Ports of the range another process held at the last try.
    pub pool_foreign: u64,
    /// Sessions on ports a config reload left outside the range.
    pub pool_outside_range: u64,
    /// Bytes relayed since start, each way (closed sessions included).
    pub bytes_to_client: u64,
    pub bytes_to_server: u64,
    /// State file writes that failed since start (each rolled its calls back).
    pub state_write_failures: u64,
    /// `notAfter` of the certificate each TLS listener presents: `("session" | "api", time)`.
    pub cert_not_after: Vec<(&'static str, SystemTime)>,
}

/// Every metric family of the daemon, registered once at start.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    sessions: Gauge,
    viewers: Gauge,
    pool_ports: Family<Label, Gauge>,
    relayed_bytes: Family<Label, Counter>,
    session_opens: Family<Label, Counter>,
    session_closes: Family<Label, Counter>,
    viewer_connects: Family<Label, Counter>,
    viewer_closes: Family<Label, Counter>,
    target_connect: Histogram,
    state_commit: Histogram,
    api_request: Histogram,
    cert_expiry: Family<Label, Gauge<f64, AtomicU64>>,
    cleanup_closed: Counter,
    state_write_failures: Counter,
    /// Bytes of sessions that have closed, each way: a closed session's bytes stay counted.
    closed_to_client: AtomicU64,
    closed_to_server: AtomicU64,
    /// One scrape at a time: the byte counters catch up to the sum read at scrape.
    scrape: Mutex<()>,
}

/// 1 ms to about 16 s: a loopback connect, a fsync'd write, an API call.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The families, registered under DESIGN.md's names.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("vncgate");
        let m = Metrics {
            sessions: Gauge::default(),
            viewers: Gauge::default(),
            pool_ports: Family::default(),
            relayed_bytes: Family::default(),
            session_opens: Family::default(),
            session_closes: Family::default(),
            viewer_connects: Family::default(),
            viewer_closes: Family::default(),
            target_connect: Histogram::new(latency_buckets()),
            state_commit: Histogram::new(latency_buckets()),
            api_request: Histogram::new(latency_buckets()),
            cert_expiry: Family::default(),
            cleanup_closed: Counter::default(),
            state_write_failures: Counter::default(),
            closed_to_client: AtomicU64::new(0),
            closed_to_server: AtomicU64::new(0),
            scrape: Mutex::new(()),
            registry: Registry::default(),
        };
        registry.register("sessions", "Open console sessions", m.sessions.clone());
        registry.register(
            "viewers",
            "Live viewers (relayed WebSockets)",
            m.viewers.clone(),
        );
        registry.register(
            "pool_ports",
            "Ports of the pool by state (allocated, free, foreign; outside_range: sessions a reload left outside --port-range)",
            m.pool_ports.clone(),
        );
        registry.register(
            "relayed_bytes",
            "Bytes relayed, by direction (to_client: VNC server to viewer)",
            m.relayed_bytes.clone(),
        );
        registry.register(
            "session_opens",
            "POST /v1/sessions calls by result (created, unchanged, retargeted, or the error code)",
            m.session_opens.clone(),
        );
        registry.register(
            "session_closes",
            "Sessions closed, by reason (deleted, target_gone, max_lifetime, domain_stopped)",
            m.session_closes.clone(),
        );
        registry.register(
            "viewer_connects",
            "WebSocket upgrades by outcome (ok, bad_token, origin_refused, rate_limited, target_unreachable, cap)",
            m.viewer_connects.clone(),
        );
        registry.register(
            "viewer_closes",
            "Viewers closed, by the close code sent (none: the connection was gone)",
            m.viewer_closes.clone(),
        );
        registry.register(
            "target_connect_seconds",
            "Time to connect to a VNC target",
            m.target_connect.clone(),
        );
        registry.register(
            "state_commit_seconds",
            "Time of one state file write (write, fsync, rename)",
            m.state_commit.clone(),
        );
        registry.register(
            "api_request_seconds",
            "Time to answer a control API request",
            m.api_request.clone(),
        );
        registry.register(
            "tls_cert_expiry_seconds",
            "Seconds until the presented TLS certificate expires, by listener (session, api)",
            m.cert_expiry.clone(),
        );
        registry.register(
            "cleanup_closed",
            "Sessions the cleanup pass closed",
            m.cleanup_closed.clone(),
        );
        registry.register(
            "state_write_failures",
            "State file writes that failed (the calls they carried were rolled back)",
            m.state_write_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One `POST /v1/sessions` answered: `created`, `unchanged`, `retargeted`, or the error code.
    pub fn session_opened(&self, result: &'static str) {
        self.session_opens
            .get_or_create(&[("result", result)])
            .inc();
    }

    /// A session left the table with `to_client`/`to_server` bytes relayed over its life.
    pub fn session_closed(&self, cause: CloseCause, to_client: u64, to_server: u64) {
        self.closed_to_client
            .fetch_add(to_client, Ordering::Relaxed);
        self.closed_to_server
            .fetch_add(to_server, Ordering::Relaxed);
        self.session_closes
            .get_or_create(&[("reason", cause.label())])
            .inc();
        if cause == CloseCause::TargetGone {
            self.cleanup_closed.inc();
        }
    }

    /// One WebSocket upgrade decided (refused, capped, or relaying).
    pub fn viewer_connect(&self, outcome: ConnectOutcome) {
        self.viewer_connects
            .get_or_create(&[("outcome", outcome.label())])
            .inc();
    }

    /// A viewer ended with close `code` (`None`: its connection was gone).
    pub fn viewer_closed(&self, code: Option<u16>) {
        let code = match code {
            None => "none",
            Some(1000) => "1000",
            Some(1001) => "1001",
            Some(1002) => "1002",
            Some(1007) => "1007",
            Some(1008) => "1008",
            Some(1009) => "1009",
            Some(1011) => "1011",
            Some(1012) => "1012",
            Some(1013) => "1013",
            // A viewer's own close code echoed back: bounded to one series.
            Some(_) => "other",
        };
        self.viewer_closes.get_or_create(&[("code", code)]).inc();
    }

    /// A VNC target connect that succeeded, and how long it took.
    pub fn target_connected(&self, took: Duration) {
        self.target_connect.observe(took.as_secs_f64());
    }

    /// One state file write (snapshot to directory fsync), ok or not.
    pub fn state_written(&self, took: Duration) {
        self.state_commit.observe(took.as_secs_f64());
    }

    /// One control API request answered (guard refusals included).
    pub fn api_answered(&self, took: Duration) {
        self.api_request.observe(took.as_secs_f64());
    }

    /// Bytes of sessions closed so far, `(to_client, to_server)`.
    pub fn closed_bytes(&self) -> (u64, u64) {
        (
            self.closed_to_client.load(Ordering::Relaxed),
            self.closed_to_server.load(Ordering::Relaxed),
        )
    }

    /// The OpenMetrics text (`Content-Type` [`CONTENT_TYPE`]) with `now` read into the gauges.
    pub fn render(&self, now: &Snapshot) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.sessions.set(clamp(now.sessions));
        self.viewers.set(clamp(now.viewers));
        for (state, n) in [
            ("allocated", now.pool_allocated),
            ("free", now.pool_free),
            ("foreign", now.pool_foreign),
            ("outside_range", now.pool_outside_range),
        ] {
            self.pool_ports
                .get_or_create(&[("state", state)])
                .set(clamp(n));
        }
        for (direction, total) in [
            ("to_client", now.bytes_to_client),
            ("to_server", now.bytes_to_server),
        ] {
            // A counter only goes up: it catches up to the total read now. A session closing
            // during the read can make the total dip for one scrape; the next one catches up.
            let counter = self
                .relayed_bytes
                .get_or_create(&[("direction", direction)]);
            let seen = counter.get();
            if total > seen {
                counter.inc_by(total - seen);
            }
        }
        let seen = self.state_write_failures.get();
        if now.state_write_failures > seen {
            self.state_write_failures
                .inc_by(now.state_write_failures - seen);
        }
        let wall = SystemTime::now();
        for (listener, not_after) in &now.cert_not_after {
            let left = match not_after.duration_since(wall) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            self.cert_expiry
                .get_or_create(&[("listener", listener)])
                .set(left);
        }
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_has_every_family_and_no_vm_id() {
        let m = Metrics::new();
        m.session_opened("created");
        m.session_closed(CloseCause::TargetGone, 10, 5);
        m.viewer_connect(ConnectOutcome::BadToken);
        m.viewer_closed(Some(4000));
        m.target_connected(Duration::from_millis(3));
        let text = m.render(&Snapshot {
            sessions: 2,
            viewers: 1,
            pool_allocated: 2,
            pool_free: 7,
            pool_foreign: 1,
            pool_outside_range: 0,
            bytes_to_client: 100,
            bytes_to_server: 40,
            state_write_failures: 2,
            cert_not_after: vec![("session", SystemTime::now() + Duration::from_secs(3600))],
        });
        for line in [
            "vncgate_sessions 2",
            "vncgate_viewers 1",
            "vncgate_pool_ports{state=\"free\"} 7",
            "vncgate_relayed_bytes_total{direction=\"to_client\"} 100",
            "vncgate_session_opens_total{result=\"created\"} 1",
            "vncgate_session_closes_total{reason=\"target_gone\"} 1",
            "vncgate_viewer_connects_total{outcome=\"bad_token\"} 1",
            "vncgate_viewer_closes_total{code=\"other\"} 1",
            "vncgate_target_connect_seconds_count 1",
            "vncgate_cleanup_closed_total 1",
            "vncgate_state_write_failures_total 2",
            "# TYPE vncgate_state_commit_seconds histogram",
            "# TYPE vncgate_api_request_seconds histogram",
            "vncgate_tls_cert_expiry_seconds{listener=\"session\"} 3599.",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        // A dip (a session closing during the read) never takes a counter down.
        let text = m.render(&Snapshot {
            bytes_to_client: 90,
            ..Snapshot::default()
        });
        assert!(text.contains("vncgate_relayed_bytes_total{direction=\"to_client\"} 100"));
        let plain = prometheus_text(&text);
        assert!(plain.contains("# TYPE vncgate_relayed_bytes_total counter\n"));
        assert!(plain.contains("# HELP vncgate_cleanup_closed_total Sessions"));
        assert!(plain.contains("# TYPE vncgate_sessions gauge\n"));
        assert!(!plain.contains("# EOF"));
    }
}
