//! A session's own limits (`idle_timeout`, `max_lifetime`): their reading from the API and
//! the state file, and their text form.

use std::time::{Duration, SystemTime};

/// A session's own limits, set when it is opened (`"idle_timeout"`, `"max_lifetime"` of `POST
/// /v1/sessions`, DESIGN.md "Cleanup, metrics, events") and kept in its state file record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    /// Closes a viewer that sent and got no data frame this long (1001 `idle timeout`);
    /// replaces `--idle-timeout` for this session.
    pub idle_timeout: Option<Duration>,
    /// Closes the session this long after `created_at`, as a DELETE would.
    pub max_lifetime: Option<Duration>,
}

impl SessionLimits {
    /// When `max_lifetime` closes a session created at `created_at`.
    pub fn closes_at(&self, created_at: SystemTime) -> Option<SystemTime> {
        self.max_lifetime.and_then(|d| created_at.checked_add(d))
    }
}

/// The longest per-session limit: ten years (a longer one would overflow time arithmetic on
/// some platforms and means "never" anyway; leave the field out for that).
pub const MAX_LIMIT: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Reads a per-session limit: a humantime duration (`90s`, `15m`, `1h 30m`) or a number of
/// seconds, from 1 ms ([`MIN_LIMIT_SECS`]) to [`MAX_LIMIT`]. The error says what was wrong,
/// for a 400 that names the field.
pub fn parse_limit(value: &serde_json::Value) -> Result<Duration, String> {
    let d = match value {
        serde_json::Value::String(text) => humantime::parse_duration(text.trim())
            .map_err(|err| format!("{text:?} is not a duration ({err})"))?,
        serde_json::Value::Number(n) => match n.as_u64() {
            Some(secs) => Duration::from_secs(secs),
            None => match n.as_f64() {
                Some(f) if f.is_finite() && f >= MIN_LIMIT_SECS && f <= MAX_LIMIT.as_secs_f64() => {
                    Duration::from_secs_f64(f)
                }
                _ => {
                    return Err(format!(
                        "{n} is not a number of seconds from {MIN_LIMIT_SECS} to 10 years"
                    ));
                }
            },
        },
        other => return Err(format!("{other} is not a duration")),
    };
    if d < Duration::from_secs_f64(MIN_LIMIT_SECS) {
        return Err("must be at least 1ms (leave the field out for no limit)".into());
    }
    if d > MAX_LIMIT {
        return Err("must be at most 10 years (leave the field out for no limit)".into());
    }
    Ok(d)
}

/// The smallest number of seconds a limit may be given as (1 ms): smaller fractions would
/// round to nothing.
pub const MIN_LIMIT_SECS: f64 = 0.001;

/// A duration as the API and the state file write it: humantime's `1h 30m`.
pub fn duration_text(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
