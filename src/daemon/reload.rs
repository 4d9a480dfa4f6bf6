//! What `SIGHUP` does to a running daemon: certificates and the API token read again, the
//! configuration re-applied where it can be live, and the flags that need a restart named.

use super::*;

impl Daemon {
    /// `SIGHUP`: reloads certificates and the API token ([`Daemon::reload`]), then applies
    /// `config` (the configuration read again) and its log level, or, if it did not validate,
    /// keeps the running one and says why.
    pub fn hangup(&self, config: Result<Config, String>, log: &crate::events::LogControl) {
        self.reload();
        match config {
            Ok(config) => match log.set_level(config.log_level.as_deref()) {
                Ok(()) => self.reconfigure(&config),
                Err(why) => self.reconfigure_failed(&why),
            },
            Err(why) => self.reconfigure_failed(&why),
        }
    }

    /// `SIGHUP` with a configuration read again: puts in place what can change while sessions
    /// live (`--port-range`, `--max-sessions`, `--max-connections`, `--max-pending-per-ip`,
    /// `--auth-fail-limit`, `--max-connections-per-session`; the log level is the caller's) and
    /// names, in a warning, changed settings that need a restart. No session is dropped:
    /// sessions outside a new range keep their ports until they close. Clears the warning of
    /// an earlier refused reload.
    pub fn reconfigure(&self, new: &Config) {
        self.registry
            .pool()
            .reconfigure(new.port_range.clone(), new.max_sessions);
        // Without session ports the cap is the registry's own; a file that now asks for
        // session ports (a change only a restart makes) would bring a pool-clamped value.
        if !self.started.session_ports && !new.session_ports {
            self.registry.set_max_sessions(new.max_sessions);
        }
        let pool_ports = if self.started.session_ports {
            new.port_range.len()
        } else {
            0
        };
        let fitting = access::default_max_connections(self.nofile, pool_ports);
        let max_connections = new.max_connections.unwrap_or(fitting);
        self.limits
            .set_caps(max_connections, new.max_pending_per_ip);
        self.ctx.access.failures.set_limit(new.auth_fail_limit);
        self.ctx.max_viewers.store(
            new.max_connections_per_session,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.registry.set_warning("config", None);
        let needs_restart = restart_only_changes(&self.started, new);
        if !needs_restart.is_empty() {
            warn!(
                settings = %needs_restart.join(", "),
                "SIGHUP: these settings change only at a restart; the daemon keeps the values it started with"
            );
        }
        // Also in /v1/status until a restart applies them, or a reload puts them back.
        self.registry.set_warning(
            "restart",
            (!needs_restart.is_empty()).then(|| {
                format!(
                    "the config file changes {}, which apply only at a restart; the daemon runs with the values it started with",
                    needs_restart.join(", ")
                )
            }),
        );
        info!(
            port_range = %format!("{}-{}", new.port_range.start(), new.port_range.end()),
            max_sessions = new.max_sessions,
            max_connections,
            max_pending_per_ip = new.max_pending_per_ip,
            auth_fail_limit = new.auth_fail_limit,
            max_connections_per_session = new.max_connections_per_session,
            sessions = self.registry.len(),
            "configuration reloaded"
        );
    }

    /// `SIGHUP` with a configuration that does not validate: the daemon keeps the one it has,
    /// and says why in the log and in `/v1/status` warnings until a reload succeeds.
    pub fn reconfigure_failed(&self, why: &str) {
        warn!(error = %why, "SIGHUP: the configuration does not validate; keeping the current one");
        self.registry.set_warning(
            "config",
            Some(format!(
                "config reload refused, still running the previous configuration: {why}"
            )),
        );
    }

    /// `SIGHUP`: re-reads every certificate and key, and `--api-token-file`. New handshakes
    /// (and API requests) use what loads; what fails keeps the old one, is logged, and shows
    /// in `/v1/status` warnings until a reload succeeds. Live connections are never touched.
    pub fn reload(&self) {
        match self.api_guard.reload() {
            Ok(true) => info!("API token reloaded"),
            Ok(false) => {}
            Err(err) => warn!(%err, "API token reload failed; still using the previous token"),
        }
        for tls in &self.tls {
            let files = tls.files();
            match tls.reload() {
                Ok(()) => {
                    info!(cert = %files.cert.display(), key = %files.key.display(), "tls certificate reloaded")
                }
                Err(err) => {
                    warn!(%err, "tls reload failed; still serving the previous certificate")
                }
            }
        }
    }
}

/// The settings of `new` that differ from `old` and only take effect at a restart (listeners,
/// files, access policy, timers), by flag name.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    // Debug renderings compare the parsed values (origins, CIDRs, paths) without requiring
    // every config type to implement PartialEq.
    fn differs<T: std::fmt::Debug>(a: &T, b: &T) -> bool {
        format!("{a:?}") != format!("{b:?}")
    }
    let checks: [(&'static str, bool); 27] = [
        ("--api-listen", differs(&old.api_listen, &new.api_listen)),
        ("--listen-host", differs(&old.listen_host, &new.listen_host)),
        ("--public-host", differs(&old.public_host, &new.public_host)),
        (
            "--ping-interval",
            differs(&old.ping_interval, &new.ping_interval),
        ),
        (
            "--idle-timeout",
            differs(&old.idle_timeout, &new.idle_timeout),
        ),
        ("--web", differs(&old.web, &new.web)),
        ("--state-file", differs(&old.state_file, &new.state_file)),
        ("--cert/--key", differs(&old.tls, &new.tls)),
        ("--api-cert/--api-key", differs(&old.api_tls, &new.api_tls)),
        (
            "--tls-min-version",
            differs(&old.tls_min_version, &new.tls_min_version),
        ),
        (
            "--api-token-file",
            differs(&old.api_token_file, &new.api_token_file),
        ),
        (
            "--allowed-origins",
            differs(&old.allowed_origins, &new.allowed_origins),
        ),
        (
            "--trusted-proxies",
            differs(&old.trusted_proxies, &new.trusted_proxies),
        ),
        ("--token-ttl", differs(&old.token_ttl, &new.token_ttl)),
        (
            "--api-allowed-origins",
            differs(&old.api_allowed_origins, &new.api_allowed_origins),
        ),
        ("--api-hosts", differs(&old.api_hosts, &new.api_hosts)),
        (
            "--frame-ancestors",
            differs(&old.frame_ancestors, &new.frame_ancestors),
        ),
        (
            "--cleanup-interval",
            differs(&old.cleanup_interval, &new.cleanup_interval),
        ),
        ("--stale-after", differs(&old.stale_after, &new.stale_after)),
        ("--log-format", differs(&old.log_format, &new.log_format)),
        ("--start-empty", differs(&old.start_empty, &new.start_empty)),
        ("--libvirt", differs(&old.libvirt, &new.libvirt)),
        (
            "--public-listen",
            differs(&old.public_listen, &new.public_listen),
        ),
        (
            "--public-base-url",
            differs(&old.public_base_url, &new.public_base_url),
        ),
        (
            "--session-ports",
            differs(&old.session_ports, &new.session_ports),
        ),
        (
            "--viewer-send-buffer",
            differs(&old.viewer_send_buffer, &new.viewer_send_buffer),
        ),
        (
            "--libvirt-id",
            differs(&old.libvirt_id_uuid, &new.libvirt_id_uuid),
        ),
    ];
    checks
        .into_iter()
        .filter_map(|(flag, changed)| changed.then_some(flag))
        .collect()
}
