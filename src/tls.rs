//! Certificate loading and reload for the TLS listeners (DESIGN.md "TLS"): PEM chain and key
//! files, rustls with the `ring` provider, ALPN `http/1.1`, a minimum protocol version, and a
//! certificate that `SIGHUP` replaces without touching live connections.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, RwLock};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Why a certificate or key could not be used. Each names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "certificate file {0} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----, the server's certificate first, then its chain)"
    )]
    NoCertificate(PathBuf),
    #[error("certificate file {path} is not valid PEM: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error(
        "key file {path} holds no usable private key ({reason}); expected PEM: BEGIN PRIVATE KEY (PKCS#8), BEGIN EC PRIVATE KEY (SEC1) or BEGIN RSA PRIVATE KEY"
    )]
    BadKey { path: PathBuf, reason: String },
    #[error("key file {key} does not belong to certificate file {cert}: {reason}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(String),
}

/// `--tls-min-version`: the oldest TLS version a handshake may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3): the default.
    #[default]
    V1_2,
    /// TLS 1.3 only.
    V1_3,
}

impl FromStr for TlsVersion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "1.2" => Ok(TlsVersion::V1_2),
            "1.3" => Ok(TlsVersion::V1_3),
            _ => Err("expected 1.2 or 1.3".into()),
        }
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_2 => "1.2",
            TlsVersion::V1_3 => "1.3",
        })
    }
}

/// A certificate chain file and its key file (`--cert`/`--key`, `--api-cert`/`--api-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A PEM parse error as a person reads it (the crate's own text shows raw bytes).
fn describe_pem_error(err: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match err {
        Error::MissingSectionEnd { end_marker } => format!(
            "a PEM section has no \"-----END {}-----\" line",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { .. } => "a -----BEGIN ...----- line is malformed".into(),
        Error::Base64Decode(why) => format!("bad base64 inside a PEM section ({why})"),
        Error::NoItemsFound => "no PEM section of the expected kind".into(),
        other => other.to_string(),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks a PEM chain and key: both parse, the key is one ring can sign with, and it
/// belongs to the first certificate.
pub fn load_certified_key(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })
    };
    let cert_pem = read("certificate", &files.cert)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| TlsError::BadCertificate {
            path: files.cert.clone(),
            reason: describe_pem_error(&err),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(files.cert.clone()));
    }
    let key_pem = read("key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|err| TlsError::BadKey {
        path: files.key.clone(),
        reason: describe_pem_error(&err),
    })?;
    let signing_key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|err| TlsError::BadKey {
            path: files.key.clone(),
            reason: err.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(err) => Err(TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
            reason: err.to_string(),
        }),
    }
}

/// Hands every handshake the current certificate; a reload swaps it.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(|p| p.into_inner()),
        ))
    }
}

/// One listener's TLS: the acceptor for new handshakes and the files it reloads from.
pub struct ReloadableTls {
    files: TlsFiles,
    /// Which listener this is ("session ports", "control API"), for warnings.
    label: &'static str,
    current: Arc<CurrentCert>,
    acceptor: TlsAcceptor,
    /// The last failed reload, shown in `/v1/status` warnings until a reload succeeds.
    failure: Mutex<Option<String>>,
}

impl fmt::Debug for ReloadableTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReloadableTls")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl ReloadableTls {
    /// Loads `files` and builds the server configuration: TLS 1.2 and 1.3 (or 1.3 only), ALPN
    /// `http/1.1`, no client certificates.
    pub fn load(files: TlsFiles, min_version: TlsVersion) -> Result<ReloadableTls, TlsError> {
        let key = load_certified_key(&files)?;
        let current = Arc::new(CurrentCert(RwLock::new(Arc::new(key))));
        let versions: &[&'static rustls::SupportedProtocolVersion] = match min_version {
            TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::V1_3 => &[&rustls::version::TLS13],
        };
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions)
            .map_err(|err| TlsError::Config(err.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&current) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ReloadableTls {
            files,
            label: "listener",
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            failure: Mutex::new(None),
        })
    }

    /// Names the listener in warnings ("session ports", "control API").
    pub fn labelled(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    /// Reads the files again. On success new handshakes present the new certificate (live
    /// connections keep theirs); on failure the old one stays and the error is kept for
    /// [`ReloadableTls::warning`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let result = load_certified_key(&self.files);
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(key) => {
                *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                *failure = None;
                Ok(())
            }
            Err(err) => {
                *failure = Some(format!(
                    "TLS reload for the {} failed, still serving the previous certificate: {err}",
                    self.label
                ));
                Err(err)
            }
        }
    }

    /// What new handshakes go through.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// The files this listener reloads from.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// `notAfter` of the leaf certificate new handshakes present (RFC 5280 section 4.1.2.5);
    /// `None` if it cannot be parsed (rustls accepted it, so that is not expected).
    pub fn not_after(&self) -> Option<std::time::SystemTime> {
        let current = Arc::clone(&self.current.0.read().unwrap_or_else(|p| p.into_inner()));
        let leaf = current.cert.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        let secs = cert.validity().not_after.timestamp();
        let epoch = std::time::SystemTime::UNIX_EPOCH;
        match u64::try_from(secs) {
            Ok(s) => epoch.checked_add(std::time::Duration::from_secs(s)),
            Err(_) => epoch.checked_sub(std::time::Duration::from_secs(secs.unsigned_abs())),
        }
    }

    /// Why the last reload failed, until one succeeds.
    pub fn warning(&self) -> Option<String> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!("1.2".parse::<TlsVersion>(), Ok(TlsVersion::V1_2));
        assert_eq!("1.3".parse::<TlsVersion>(), Ok(TlsVersion::V1_3));
        assert!("1.1".parse::<TlsVersion>().is_err());
    }

    #[test]
    fn missing_files_are_named() {
        let files = TlsFiles {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
        };
        let err = load_certified_key(&files)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
    }
}
