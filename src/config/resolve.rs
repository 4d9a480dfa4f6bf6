//! [`ServeArgs::resolve`]: flags, environment and file into one validated [`Config`], value by
//! value, with the cross-checks between values.

use super::*;

impl ServeArgs {
    /// Resolves flags, environment and file into a validated [`Config`]. Logs a warning for
    /// every value it had to adjust.
    pub fn resolve(&self) -> Result<Config, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let pick = |flag: &Option<String>, file: Option<String>| flag.clone().or(file);
        let mut config = Config::default();

        if let Some(v) = pick(&self.api_listen, file.api_listen) {
            config.api_listen = parse_socket_addr("--api-listen", &v)?;
        }
        config.api_token_file = self.api_token_file.clone().or(file.api_token_file);
        if !config.api_listen.ip().is_loopback() && config.api_token_file.is_none() {
            return Err(ConfigError::NonLoopbackApi(config.api_listen));
        }
        config.listen_host = match pick(&self.listen_host, file.listen_host) {
            Some(v) => parse_ip("--listen-host", &v)?,
            None => default_listen_host(),
        };
        config.public_host = pick(&self.public_host, file.public_host)
            .map(|v| parse_public_host(&v))
            .transpose()?;
        if let Some(v) = pick(&self.port_range, file.port_range) {
            config.port_range = parse_port_range(&v)?;
        }
        if let Some(v) = pick(&self.public_listen, file.public_listen) {
            config.public_listen = Some(parse_socket_addr("--public-listen", &v)?);
        }
        if let Some(v) = pick(&self.public_base_url, file.public_base_url) {
            if config.public_listen.is_none() {
                return Err(invalid(
                    "--public-base-url",
                    &v,
                    "only means something with --public-listen ADDR",
                ));
            }
            config.public_base_url = Some(parse_base_url(&v)?);
        }
        if let Some(v) = pick(&self.viewer_send_buffer, file.viewer_send_buffer) {
            config.viewer_send_buffer = match v.trim() {
                "auto" => true,
                "off" => false,
                _ => return Err(invalid("--viewer-send-buffer", &v, "expected auto or off")),
            };
        }
        if let Some(v) = pick(&self.session_ports, file.session_ports) {
            config.session_ports = match v.trim() {
                "on" => true,
                "off" => false,
                _ => return Err(invalid("--session-ports", &v, "expected on or off")),
            };
            if !config.session_ports && config.public_listen.is_none() {
                return Err(invalid(
                    "--session-ports",
                    &v,
                    "off needs --public-listen ADDR: without session ports, the public port is the only way to a console",
                ));
            }
        }
        let pool_size = config.port_range.len();
        config.max_sessions = if config.session_ports {
            DEFAULT_MAX_SESSIONS.min(pool_size)
        } else {
            DEFAULT_MAX_SESSIONS_PORTLESS
        };
        if let Some(v) = pick(&self.max_sessions, file.max_sessions.map(value_text)) {
            let wanted = parse_count("--max-sessions", &v)?;
            config.max_sessions = if !config.session_ports {
                wanted
            } else {
                if wanted > pool_size {
                    warn!(
                        wanted,
                        pool_size, "--max-sessions exceeds the port pool; clamped to the pool size"
                    );
                }
                wanted.min(pool_size)
            };
        }
        if let Some(v) = pick(&self.ping_interval, file.ping_interval) {
            config.ping_interval =
                parse_duration("--ping-interval", &v)?.ok_or_else(|| ConfigError::Invalid {
                    key: "--ping-interval",
                    value: v.clone(),
                    reason: "must be a positive duration such as 20s".into(),
                })?;
        }
        if let Some(v) = pick(
            &self.max_connections_per_session,
            file.max_connections_per_session.map(value_text),
        ) {
            config.max_connections_per_session = parse_count("--max-connections-per-session", &v)?;
        }
        if let Some(v) = pick(&self.idle_timeout, file.idle_timeout) {
            config.idle_timeout = parse_duration("--idle-timeout", &v)?;
        }
        if let Some(dir) = self.web.clone().or(file.web) {
            if !dir.join("vnc.html").is_file() {
                return Err(invalid(
                    "--web",
                    &dir.display().to_string(),
                    "the directory must hold a vnc.html (e.g. /usr/share/novnc from Debian's novnc package)",
                ));
            }
            config.web = Some(dir);
        }
        if let Some(path) = self.state_file.clone().or(file.state_file) {
            if path.as_os_str().is_empty() {
                return Err(invalid("--state-file", "", "must name a file"));
            }
            config.state_file = path;
        }
        config.start_empty = self.start_empty || file.start_empty.unwrap_or(false);
        config.tls = tls_pair(
            ("--cert", self.cert.clone().or(file.cert)),
            ("--key", self.key.clone().or(file.key)),
        )?;
        config.api_tls = tls_pair(
            ("--api-cert", self.api_cert.clone().or(file.api_cert)),
            ("--api-key", self.api_key.clone().or(file.api_key)),
        )?;
        if let Some(v) = pick(&self.tls_min_version, file.tls_min_version) {
            config.tls_min_version = v
                .parse()
                .map_err(|reason: String| invalid("--tls-min-version", &v, reason))?;
        }
        if let Some(v) = pick(&self.allowed_origins, file.allowed_origins) {
            config.allowed_origins = access::parse_origins(&v)
                .map_err(|e| invalid("--allowed-origins", &v, e.to_string()))?;
        }
        if let Some(v) = pick(&self.trusted_proxies, file.trusted_proxies) {
            config.trusted_proxies =
                access::parse_cidrs(&v).map_err(|e| invalid("--trusted-proxies", &v, e))?;
        }
        if let Some(v) = pick(&self.token_ttl, file.token_ttl) {
            config.token_ttl = parse_duration("--token-ttl", &v)?;
            if config.token_ttl.is_some_and(|t| t > MAX_TOKEN_TTL) {
                return Err(invalid(
                    "--token-ttl",
                    &v,
                    "at most ten years (use off for tokens that never expire)",
                ));
            }
        }
        if let Some(v) = pick(&self.auth_fail_limit, file.auth_fail_limit.map(value_text)) {
            config.auth_fail_limit = v.trim().parse().map_err(|_| {
                invalid(
                    "--auth-fail-limit",
                    &v,
                    "expected a whole number (0 turns the limit off)",
                )
            })?;
        }
        if let Some(v) = pick(
            &self.max_pending_per_ip,
            file.max_pending_per_ip.map(value_text),
        ) {
            config.max_pending_per_ip = parse_count("--max-pending-per-ip", &v)?;
        }
        if let Some(v) = pick(&self.max_connections, file.max_connections.map(value_text)) {
            config.max_connections = Some(parse_count("--max-connections", &v)?);
        }
        if let Some(v) = pick(&self.api_allowed_origins, file.api_allowed_origins) {
            config.api_allowed_origins = access::parse_origins(&v)
                .map_err(|e| invalid("--api-allowed-origins", &v, e.to_string()))?;
        }
        if let Some(v) = pick(&self.api_hosts, file.api_hosts) {
            config.api_hosts = v
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| {
                    parse_public_host(h)
                        .map(|h| h.to_ascii_lowercase())
                        .map_err(|_| {
                            invalid("--api-hosts", h, "expected host names, comma-separated")
                        })
                })
                .collect::<Result<_, _>>()?;
        }
        if let Some(v) = pick(&self.frame_ancestors, file.frame_ancestors) {
            crate::web::content_security_policy(&v)
                .map_err(|e| invalid("--frame-ancestors", &v, e))?;
            config.frame_ancestors = v.trim().to_owned();
        }
        if let Some(v) = pick(&self.cleanup_interval, file.cleanup_interval) {
            config.cleanup_interval = parse_duration("--cleanup-interval", &v)?;
        }
        if let Some(v) = pick(&self.stale_after, file.stale_after) {
            config.stale_after = parse_duration("--stale-after", &v)?.ok_or_else(|| {
                invalid(
                    "--stale-after",
                    &v,
                    "must be a positive duration such as 300s",
                )
            })?;
        }
        if let Some(v) = pick(&self.log_format, file.log_format) {
            config.log_format = match v.trim() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(invalid("--log-format", &v, "expected text or json")),
            };
        }
        if let Some(v) = pick(&self.log_level, file.log_level) {
            if let Err(err) = tracing_subscriber::EnvFilter::try_new(v.trim()) {
                return Err(invalid(
                    "--log-level",
                    &v,
                    format!("{err}; expected a tracing filter such as info or debug,hyper=info"),
                ));
            }
            config.log_level = Some(v.trim().to_owned());
        }
        if let Some(v) = pick(&self.libvirt, file.libvirt) {
            if !cfg!(feature = "libvirt") {
                return Err(invalid(
                    "--libvirt",
                    &v,
                    "this vncgate was built without libvirt support: build it with `cargo install --path . --features libvirt` (needs libvirt-dev)",
                ));
            }
            if v.trim().is_empty() {
                return Err(invalid(
                    "--libvirt",
                    &v,
                    "expected a libvirt URI such as qemu:///system",
                ));
            }
            config.libvirt = Some(v.trim().to_owned());
        }
        if let Some(v) = pick(&self.libvirt_id, file.libvirt_id) {
            config.libvirt_id_uuid = match v.trim() {
                "name" => false,
                "uuid" => true,
                _ => return Err(invalid("--libvirt-id", &v, "expected name or uuid")),
            };
            if config.libvirt.is_none() {
                return Err(invalid(
                    "--libvirt-id",
                    &v,
                    "only means something with --libvirt URI",
                ));
            }
        }
        if config.session_ports {
            warn_if_ephemeral_overlap(&config.port_range);
        }
        Ok(config)
    }
}

/// A certificate and key given together, or neither.
fn tls_pair(
    (cert_key, cert): (&'static str, Option<PathBuf>),
    (key_key, key): (&'static str, Option<PathBuf>),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles { cert, key })),
        (None, None) => Ok(None),
        (Some(cert), None) => Err(invalid(
            key_key,
            "",
            format!(
                "{cert_key} {} needs its private key: add {key_key} FILE",
                cert.display()
            ),
        )),
        (None, Some(key)) => Err(invalid(
            cert_key,
            "",
            format!(
                "{key_key} {} needs its certificate: add {cert_key} FILE",
                key.display()
            ),
        )),
    }
}
