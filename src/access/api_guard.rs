//! The control API's own checks: the bearer token of `--api-token-file`, `Host` and `Origin`
//! ([`ApiGuard`]).

use super::*;

/// Why the API token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read --api-token-file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "--api-token-file {path}: the first line is empty; put a long random token there (e.g. `openssl rand -hex 32`)"
    )]
    Empty { path: PathBuf },
}

/// The token of an API token file: its first line, trimmed. Warns when the file is readable
/// by group or others.
pub fn read_token_file(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let token = text.lines().next().unwrap_or("").trim().to_owned();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_owned(),
        });
    }
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path)
            && meta.permissions().mode() & 0o044 != 0
        {
            warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "--api-token-file is readable by group or others; chmod 600 it"
            );
        }
    }
    Ok(token)
}

/// A refused API request: status, code and message of the JSON error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRefusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    /// For 401: the `WWW-Authenticate` value (RFC 6750 section 3).
    pub authenticate: Option<&'static str>,
}

/// The control API's checks against browsers and strangers: `Host` (DNS rebinding), `Origin`
/// (CSRF), and the bearer token of `--api-token-file` (reloaded on SIGHUP).
#[derive(Debug)]
pub struct ApiGuard {
    token_file: Option<PathBuf>,
    token: RwLock<Option<String>>,
    /// The last failed reload, shown in status warnings until one succeeds.
    reload_error: Mutex<Option<String>>,
    /// `--api-allowed-origins`.
    pub allowed_origins: Vec<Origin>,
    /// Host names (lower case) besides IP literals: `localhost`, `--public-host`, `--api-hosts`.
    hosts: Vec<String>,
}

impl ApiGuard {
    /// Reads the token file now (a start with an unusable file fails).
    pub fn new(
        token_file: Option<PathBuf>,
        allowed_origins: Vec<Origin>,
        hosts: impl IntoIterator<Item = String>,
    ) -> Result<ApiGuard, TokenFileError> {
        let token = token_file.as_deref().map(read_token_file).transpose()?;
        let mut names: Vec<String> = hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect();
        names.push("localhost".into());
        Ok(ApiGuard {
            token_file,
            token: RwLock::new(token),
            reload_error: Mutex::new(None),
            allowed_origins,
            hosts: names,
        })
    }

    /// `SIGHUP`: reads the token file again. A file that fails keeps the old token.
    pub fn reload(&self) -> Result<bool, TokenFileError> {
        let Some(path) = &self.token_file else {
            return Ok(false);
        };
        match read_token_file(path) {
            Ok(token) => {
                *self.token.write().unwrap_or_else(|p| p.into_inner()) = Some(token);
                *lock(&self.reload_error) = None;
                Ok(true)
            }
            Err(err) => {
                *lock(&self.reload_error) = Some(format!(
                    "API token reload failed ({err}); the previous token is still in use"
                ));
                Err(err)
            }
        }
    }

    /// A status warning while the last reload failed.
    pub fn warning(&self) -> Option<String> {
        lock(&self.reload_error).clone()
    }

    /// Whether the API needs a bearer token.
    pub fn requires_token(&self) -> bool {
        self.token_file.is_some()
    }

    /// Whether `origin` may call the API from a browser (`--api-allowed-origins`).
    pub fn origin_allowed(&self, origin: &str) -> bool {
        origin
            .parse::<Origin>()
            .is_ok_and(|o| self.allowed_origins.contains(&o))
    }

    /// Checks one request. `path` is the request path; `/healthz` needs no token. `preflight`
    /// (a CORS `OPTIONS`) needs none either: browsers never send credentials with it.
    pub fn check(
        &self,
        path: &str,
        preflight: bool,
        headers: &HeaderMap,
    ) -> Result<(), ApiRefusal> {
        if headers.get_all(header::HOST).iter().count() > 1 {
            return Err(ApiRefusal {
                status: 403,
                code: "host_refused",
                message: "more than one Host header".into(),
                authenticate: None,
            });
        }
        if let Some(host) = headers.get(header::HOST) {
            let text = host.to_str().unwrap_or("");
            let name = split_authority(text).map(|(h, _)| h);
            let ok = name.as_deref().is_some_and(|h| {
                h.starts_with('[')
                    || h.parse::<IpAddr>().is_ok()
                    || self.hosts.iter().any(|n| n == h)
            });
            if !ok {
                return Err(ApiRefusal {
                    status: 403,
                    code: "host_refused",
                    message: format!(
                        "Host {text:?} is not an address of this API: use an IP address, localhost, --public-host, or add the name to --api-hosts"
                    ),
                    authenticate: None,
                });
            }
        }
        let origins = headers.get_all(header::ORIGIN).iter().count();
        if let Some(origin) = headers.get(header::ORIGIN) {
            let text = origin.to_str().unwrap_or("");
            if origins > 1 || !self.origin_allowed(text) {
                return Err(ApiRefusal {
                    status: 403,
                    code: "origin_refused",
                    message: format!(
                        "browser Origin {text:?} may not call this API; add it to --api-allowed-origins if it should"
                    ),
                    authenticate: None,
                });
            }
        }
        if path == "/healthz" || preflight {
            return Ok(());
        }
        let expected = self.token.read().unwrap_or_else(|p| p.into_inner());
        let Some(expected) = expected.as_deref() else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match given {
            Some(t) if bool::from(t.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(ApiRefusal {
                status: 401,
                code: "unauthorized",
                message: "wrong API token: send Authorization: Bearer <the token of --api-token-file>"
                    .into(),
                authenticate: Some("Bearer error=\"invalid_token\""),
            }),
            None => Err(ApiRefusal {
                status: 401,
                code: "unauthorized",
                message: "this API needs a token: send Authorization: Bearer <token> (the CLI reads VNCGATE_API_TOKEN or --api-token-file)"
                    .into(),
                authenticate: Some("Bearer"),
            }),
        }
    }
}
