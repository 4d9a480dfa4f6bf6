//! Test certificates made at run time with rcgen (never committed keys): a private CA, leaf
//! certificates for 127.0.0.1/localhost signed by it, PEM files in a scratch directory, and TLS
//! clients (raw, WebSocket) that trust only that CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A private CA whose certificate clients trust.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
}

/// A leaf certificate and its key.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    /// base64(SHA-256(SubjectPublicKeyInfo)): what Chromium's
    /// `--ignore-certificate-errors-spki-list` takes.
    pub spki_sha256_b64: String,
}

/// Which key a leaf uses, and the PEM form its key file has.
#[derive(Clone, Copy, Debug)]
pub enum KeyKind {
    /// ECDSA P-256, `BEGIN PRIVATE KEY` (PKCS#8).
    EcdsaPkcs8,
    /// ECDSA P-256, `BEGIN EC PRIVATE KEY` (SEC1).
    EcdsaSec1,
    /// RSA 2048, `BEGIN PRIVATE KEY` (PKCS#8).
    RsaPkcs8,
    /// RSA 2048, `BEGIN RSA PRIVATE KEY` (PKCS#1).
    RsaPkcs1,
}

/// Runs openssl with `args`, feeding `input`; returns its stdout.
fn openssl(args: &[&str], input: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new("openssl")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run openssl (Debian's openssl package)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("feed openssl");
    let out = child.wait_with_output().expect("openssl output");
    assert!(out.status.success(), "openssl {args:?} failed");
    String::from_utf8(out.stdout).expect("PEM is text")
}

/// A new key as PKCS#8 PEM (for rcgen to sign with) and in the PEM form `kind` names.
fn new_key(kind: KeyKind) -> (String, String) {
    let pkcs8 = match kind {
        KeyKind::EcdsaPkcs8 => {
            return {
                let pem = KeyPair::generate().expect("key").serialize_pem();
                (pem.clone(), pem)
            };
        }
        KeyKind::EcdsaSec1 => openssl(
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ],
            "",
        ),
        KeyKind::RsaPkcs8 | KeyKind::RsaPkcs1 => openssl(
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ],
            "",
        ),
    };
    let file = match kind {
        KeyKind::EcdsaSec1 | KeyKind::RsaPkcs1 => openssl(&["pkey", "-traditional"], &pkcs8),
        _ => pkcs8.clone(),
    };
    (pkcs8, file)
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("vncgate test CA {name}"));
        let cert = params.self_signed(&key).expect("CA certificate");
        let cert_pem = cert.pem();
        let cert_der = cert.der().clone();
        TestCa {
            issuer: Issuer::new(params, key),
            cert_pem,
            cert_der,
        }
    }

    /// A leaf for `127.0.0.1`, `::1` and `localhost` with an ECDSA P-256 key (PKCS#8).
    pub fn leaf(&self) -> Leaf {
        self.leaf_with(KeyKind::EcdsaPkcs8)
    }

    pub fn leaf_with(&self, kind: KeyKind) -> Leaf {
        let (pkcs8, key_pem) = new_key(kind);
        let key = KeyPair::from_pem(&pkcs8).expect("rcgen reads the key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string()]).expect("leaf params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()));
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            &rcgen::PublicKeyData::subject_public_key_info(&key),
        );
        Leaf {
            cert_pem: cert.pem(),
            key_pem,
            cert_der: cert.der().clone(),
            spki_sha256_b64: base64(digest.as_ref()),
        }
    }

    /// A rustls client configuration that trusts this CA only.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).expect("CA into roots");
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    /// The CA certificate as a PEM file in `dir` (for `VNCGATE_API_CA`).
    pub fn write_ca(&self, dir: &Path) -> PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, &self.cert_pem).expect("write CA");
        path
    }
}

impl Leaf {
    /// Writes `cert.pem` (leaf, then the CA) and `key.pem` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path, ca: &TestCa) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, format!("{}{}", self.cert_pem, ca.cert_pem)).expect("write cert");
        std::fs::write(&key, &self.key_pem).expect("write key");
        (cert, key)
    }
}

/// A TLS connection to `addr` checked against `config` for `127.0.0.1`.
pub async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
}

/// The certificate the server presented on `stream`.
pub fn presented(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("server certificate")
        .clone()
        .into_owned()
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The port of a `ws://`/`wss://`/`https://` URL with an explicit port (what the daemon's
/// `url` and `ws_url` carry); panics naming the URL otherwise.
pub fn port_of(url: &str) -> u16 {
    let authority = url.split("://").nth(1).and_then(|r| r.split('/').next());
    authority
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}
