//! The running daemon: wires pool, registry, session servers and the control API together,
//! and shuts them all down within a grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::access::{self, AccessPolicy, ApiGuard, ConnectionLimits, FailLimiter, TokenFileError};
use crate::api::{self, ApiState};
use crate::cleanup::Cleanup;
use crate::config::Config;
use crate::http;
use crate::pool::{self, PortPool};
use crate::registry::SessionRegistry;
use crate::relay::RelaySettings;
use crate::server::ServerContext;
use crate::session::PublicBase;
use crate::state::{self, CommitError, StateError, StateLock};
use crate::tls::{ReloadableTls, TlsError, TlsFiles, TlsVersion};
use crate::web::WebRoot;

mod reload;

/// Shutdown must end within this, even with hundreds of live viewers.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(4);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{what}: {source}")]
    Tls {
        what: &'static str,
        source: TlsError,
    },
    #[error(transparent)]
    ApiToken(#[from] TokenFileError),
    #[error("--frame-ancestors: {0}")]
    FrameAncestors(String),
    #[error("--libvirt: {0}")]
    Libvirt(String),
    #[error("cannot write the restored session table: {0}")]
    FirstWrite(CommitError),
    #[error(
        "cannot listen for the control API on {addr}: {source} (is another vncgate running? choose another --api-listen)"
    )]
    ApiBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "cannot listen for the public port on {addr}: {source} (is another vncgate running? choose another --public-listen)"
    )]
    PublicBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve the public port {addr}: {source}")]
    PublicServe {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "--session-ports off needs --public-listen ADDR: without session ports, the public port is the only way to a console"
    )]
    NoPublicPort,
}

/// Cancels the daemon's root token when dropped armed: a start that fails half way stops
/// whatever it had spawned.
struct CancelOnDrop(Option<CancellationToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take() {
            token.cancel();
        }
    }
}

/// Raises the soft open-files limit to the hard limit: 800 sessions with viewers need
/// thousands of descriptors. Returns the new soft limit.
pub fn raise_nofile_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            info!(nofile = limit, "open-files limit");
            Some(limit)
        }
        Err(err) => {
            warn!(%err, "cannot raise the open-files limit");
            None
        }
    }
}

/// A started daemon. Dropping it cancels everything; [`Daemon::shutdown`] also waits.
pub struct Daemon {
    api_addr: SocketAddr,
    registry: Arc<SessionRegistry>,
    root: CancellationToken,
    tracker: TaskTracker,
    /// Session ports' and the API's TLS, reloaded by [`Daemon::reload`].
    tls: Vec<Arc<ReloadableTls>>,
    /// The API's bearer token (and Host/Origin checks), reloaded by [`Daemon::reload`].
    api_guard: Arc<ApiGuard>,
    limits: Arc<ConnectionLimits>,
    /// What the session servers share (viewer cap, failed-token limit), for config reloads.
    ctx: Arc<ServerContext>,
    /// The configuration the daemon started with: settings a reload cannot change are
    /// compared with it.
    started: Config,
    /// The soft open-files limit at start, for the default `--max-connections`.
    nofile: u64,
    _lock: StateLock,
}

/// Loads a listener's certificate and key, if it has them.
fn load_tls(
    (what, label): (&'static str, &'static str),
    files: &Option<TlsFiles>,
    min_version: TlsVersion,
) -> Result<Option<Arc<ReloadableTls>>, DaemonError> {
    files
        .clone()
        .map(|f| ReloadableTls::load(f, min_version).map(|t| Arc::new(t.labelled(label))))
        .transpose()
        .map_err(|source| DaemonError::Tls { what, source })
}

impl Daemon {
    /// Locks and loads the state file, binds every stored session again, writes the table, and
    /// only then binds the control API: when `/healthz` answers, the sessions are back. Call
    /// inside a tokio runtime.
    pub async fn start(config: Config) -> Result<Daemon, DaemonError> {
        if !config.session_ports && config.public_listen.is_none() {
            return Err(DaemonError::NoPublicPort);
        }
        // Certificates first: a bad pair must stop the start before anything is bound.
        let session_tls = load_tls(
            (
                "cannot use --cert/--key for the session ports",
                "session ports",
            ),
            &config.tls,
            config.tls_min_version,
        )?;
        let api_tls = load_tls(
            (
                "cannot use --api-cert/--api-key for the control API",
                "control API",
            ),
            &config.api_tls,
            config.tls_min_version,
        )?;
        let api_guard = Arc::new(ApiGuard::new(
            config.api_token_file.clone(),
            config.api_allowed_origins.clone(),
            config.api_hosts.iter().cloned().chain(
                config
                    .public_host
                    .iter()
                    .map(|h| h.trim_matches(|c| c == '[' || c == ']').to_owned()),
            ),
        )?);
        let csp = crate::web::content_security_policy(&config.frame_ancestors)
            .map_err(DaemonError::FrameAncestors)?;
        let state_file = state::resolve_path(&config.state_file)?;
        if state_file != config.state_file {
            info!(link = %config.state_file.display(), state_file = %state_file.display(), "the state file is a symbolic link: its target is used");
        }
        let lock = state::acquire_lock(&state_file)?;
        state::remove_stale_temps(&state_file);
        let records = state::load(&state_file, config.start_empty)?;
        let root = CancellationToken::new();
        // A failed start must not leave the tasks started so far running.
        let mut cancel_on_error = CancelOnDrop(Some(root.clone()));
        let tracker = TaskTracker::new();
        let pool = PortPool::new(
            config.port_range.clone(),
            config.max_sessions,
            config.listen_host,
        );
        // Bound before the sessions come back (their URLs name its port), like them before
        // the API.
        let public_listener = config
            .public_listen
            .map(|addr| {
                pool::bind_listener(addr).map_err(|source| DaemonError::PublicBind { addr, source })
            })
            .transpose()?;
        let public_port = match (&public_listener, config.public_listen) {
            (Some(l), Some(addr)) => Some(
                l.local_addr()
                    .map_err(|source| DaemonError::PublicBind { addr, source })?
                    .port(),
            ),
            _ => None,
        };
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
        let pool_ports = if config.session_ports {
            config.port_range.len()
        } else {
            0
        };
        let fitting = access::default_max_connections(nofile, pool_ports);
        // The pool's listeners, the API's reserve, and the 64 viewers the cap never goes below
        // (each holds two descriptors: its socket and its VNC server's).
        if nofile < (pool_ports + 256 + 2 * 64) as u64 {
            warn!(
                nofile,
                pool_ports,
                "the open-files limit barely covers the pool's listeners and the API: viewers will fail with EMFILE; raise it (systemd LimitNOFILE=, ulimit -n) or shrink --port-range"
            );
        }
        let max_connections = config.max_connections.unwrap_or(fitting);
        if max_connections > fitting {
            warn!(
                max_connections,
                nofile,
                fits = fitting,
                "--max-connections exceeds what the open-files limit leaves (each viewer also holds a socket to its VNC server): accept may fail with EMFILE before the cap is reached"
            );
        }
        let limits = ConnectionLimits::new(max_connections, config.max_pending_per_ip);
        let ctx_access = Arc::new(AccessPolicy {
            allowed_origins: config.allowed_origins.clone(),
            trusted_proxies: config.trusted_proxies.clone(),
            failures: FailLimiter::new(config.auth_fail_limit),
            origin_log: access::Throttle::default(),
        });
        let ctx = Arc::new(ServerContext {
            relay: RelaySettings {
                ping_interval: config.ping_interval,
                idle_timeout: config.idle_timeout,
            },
            max_viewers: std::sync::atomic::AtomicUsize::new(config.max_connections_per_session),
            web: match &config.web {
                Some(dir) => WebRoot::Dir(dir.clone()),
                None => WebRoot::Bundled,
            },
            tls: session_tls.clone(),
            tracker: tracker.clone(),
            root: root.clone(),
            access: Arc::clone(&ctx_access),
            limits: Arc::clone(&limits),
            token_ttl: config.token_ttl,
            csp,
            metrics: Arc::new(crate::metrics::Metrics::new()),
            public: public_port.map(|port| match &config.public_base_url {
                Some(url) => PublicBase::Url(url.as_str().into()),
                None => PublicBase::Port(port),
            }),
            session_ports: config.session_ports,
            viewer_send_buffer: config
                .viewer_send_buffer
                .then(crate::server::viewer_send_buffer)
                .flatten(),
        });
        let registry = SessionRegistry::new(
            pool,
            Arc::clone(&ctx),
            state_file.clone(),
            config.max_sessions,
        );
        let stored = records.len();
        let restored_as_stored = registry.restore(records);
        if stored > 0 {
            info!(stored, restored = registry.len(), state_file = %state_file.display(), "sessions restored");
        }
        // The first write puts the restored table on disk. When nothing moved or was dropped the
        // file already says the same, so a full disk then must not keep every console down:
        // serving goes on, changes fail (rolled back) until there is room, and status and the
        // write-failure metric say so. When the table differs from the file, it is written
        // first or the start fails.
        match registry.first_write().await {
            Ok(()) => {}
            Err((err, true)) if restored_as_stored => {
                warn!(%err, "the disk is full: cannot rewrite the state file at start; it already holds this table, so vncgate serves on, and changes fail until there is room");
                registry.note_write_failure(&err);
            }
            // Anything else (a missing or read-only directory) is a setup error to see now.
            Err((err, _)) => return Err(DaemonError::FirstWrite(err)),
        }
        // Served only now, with every session back: a viewer reconnecting after a restart
        // finds its session, not a 404 that counts against its address.
        if let (Some(listener), Some(addr)) = (public_listener, config.public_listen) {
            crate::server::public::spawn_public_server(
                listener,
                registry.table(),
                Arc::clone(&ctx),
            )
            .map_err(|source| DaemonError::PublicServe { addr, source })?;
        }
        let listener = pool::bind_listener(config.api_listen)
            .and_then(tokio::net::TcpListener::from_std)
            .map_err(|source| DaemonError::ApiBind {
                addr: config.api_listen,
                source,
            })?;
        let api_addr = listener.local_addr().unwrap_or(config.api_listen);
        let cleanup = Cleanup::new(Arc::clone(&registry), config.stale_after, root.clone());
        if let Some(interval) = config.cleanup_interval {
            tracker.spawn(Arc::clone(&cleanup).run_every(interval));
        }
        #[cfg(feature = "libvirt")]
        if let Some(uri) = &config.libvirt {
            let options = crate::libvirt::LibvirtOptions {
                uri: uri.clone(),
                id: if config.libvirt_id_uuid {
                    crate::libvirt::IdMode::Uuid
                } else {
                    crate::libvirt::IdMode::Name
                },
            };
            crate::libvirt::spawn(Arc::clone(&registry), options, &tracker, root.clone())
                .map_err(|e| DaemonError::Libvirt(e.to_string()))?;
            info!(uri, "following libvirt domains");
        }
        let app = api::router(ApiState {
            registry: Arc::clone(&registry),
            public_host: config.public_host.clone(),
            started: Instant::now(),
            api_tls: api_tls.clone(),
            guard: Arc::clone(&api_guard),
            limits: Arc::clone(&limits),
            cleanup: Arc::clone(&cleanup),
            public_port,
        });
        tracker.spawn(api::serve(
            http::Listener {
                socket: listener,
                tls: api_tls.clone(),
                stop: root.clone(),
                tracker: tracker.clone(),
                span: tracing::info_span!("api"),
                // Outside --max-connections, with caps of its own (what that cap's default
                // leaves aside), so no address can exhaust the daemon's descriptors through it.
                admission: Some(http::Admission {
                    limits: ConnectionLimits::new(
                        access::API_MAX_CONNECTIONS,
                        access::API_MAX_PER_ADDRESS,
                    ),
                    policy: Arc::clone(&ctx_access),
                    loopback_uncapped_per_address: true,
                }),
            },
            app,
            Arc::clone(&api_guard),
            Arc::clone(registry.metrics()),
        ));
        if config.public_host.is_none() && api_addr.ip().is_loopback() {
            warn!(
                "--public-host is unset and the API is on loopback: console URLs name the host clients use to reach the API (e.g. 127.0.0.1)"
            );
        }
        info!(
            api = %api_addr,
            listen_host = %config.listen_host,
            port_range = %format!("{}-{}", config.port_range.start(), config.port_range.end()),
            max_sessions = config.max_sessions,
            max_connections,
            public_port,
            session_ports = config.session_ports,
            api_auth = api_guard.requires_token(),
            "vncgate serving"
        );
        cancel_on_error.0 = None;
        Ok(Daemon {
            api_addr,
            registry,
            root,
            tracker,
            tls: session_tls.into_iter().chain(api_tls).collect(),
            api_guard,
            limits,
            ctx,
            started: config,
            nofile,
            _lock: lock,
        })
    }

    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The client connection caps (open connections, refusals at accept).
    pub fn limits(&self) -> &Arc<ConnectionLimits> {
        &self.limits
    }

    pub fn registry(&self) -> &Arc<SessionRegistry> {
        &self.registry
    }

    /// Tasks still running (listeners, connections, the API).
    pub fn task_count(&self) -> usize {
        self.tracker.len()
    }

    /// Stops accepting, closes viewers with 1001 `vncgate restarting`, waits for every task (at
    /// most [`SHUTDOWN_GRACE`]) and writes the table a last time. Sessions stay in the table: a
    /// restart brings them back. Returns false if some task did not finish or the write failed.
    pub async fn shutdown(self) -> bool {
        self.root.cancel();
        self.tracker.close();
        let mut done = tokio::time::timeout(SHUTDOWN_GRACE, self.tracker.wait())
            .await
            .is_ok();
        match tokio::time::timeout(state::FINAL_WRITE, self.registry.write_now()).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                warn!(%err, "last state write failed");
                done = false;
            }
            Err(_) => {
                warn!("last state write timed out");
                done = false;
            }
        }
        if done {
            info!("vncgate stopped");
        } else {
            warn!(
                tasks = self.tracker.len(),
                "tasks still running after the shutdown grace period"
            );
        }
        done
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.root.cancel();
    }
}
