//! TLS for NBD (STARTTLS) and for the control API (HTTPS): X.509 certificates read from one
//! directory laid out as nbdkit's, with rustls and the ring provider.
//!
//! The directory holds `server-cert.pem` (the server's certificate, then any intermediates),
//! `server-key.pem` (its private key) and `ca-cert.pem` (the certificate authority clients'
//! certificates must chain to; needed with `verify_peer`). `ca-crl.pem`, when present, lists
//! revoked client certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde::Deserialize;
use tokio_rustls::TlsAcceptor;

pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_CRL: &str = "ca-crl.pem";
pub const SERVER_CERT: &str = "server-cert.pem";
pub const SERVER_KEY: &str = "server-key.pem";

/// How NBD clients are offered TLS (the protocol's NOTLS, SELECTIVETLS and FORCEDTLS modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused with ERR_POLICY.
    #[default]
    Off,
    /// Clients may upgrade with STARTTLS or stay in plain text.
    On,
    /// Every option before STARTTLS (but ABORT) is refused with ERR_TLS_REQD; plain clients
    /// cannot attach.
    Require,
}

impl TlsMode {
    pub fn name(self) -> &'static str {
        match self {
            TlsMode::Off => "off",
            TlsMode::On => "on",
            TlsMode::Require => "require",
        }
    }
}

/// The checked TLS settings (mode on or require).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub mode: TlsMode,
    /// The directory with `server-cert.pem`, `server-key.pem` and `ca-cert.pem`.
    pub certificates: PathBuf,
    /// Clients must present a certificate signed by `ca-cert.pem`.
    pub verify_peer: bool,
}

/// Why the certificates could not be used. Each message names the file and what to do.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "TLS certificate directory {dir}: {file} is missing ({what}); the directory holds server-cert.pem, \
         server-key.pem and ca-cert.pem as for nbdkit (docs/security.md shows how to make them)"
    )]
    Missing { dir: String, file: &'static str, what: &'static str },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} holds no {what} in PEM form (-----BEGIN ...-----){detail}")]
    Empty { path: String, what: &'static str, detail: String },
    #[error("{path} is not valid PEM: {message}")]
    Pem { path: String, message: String },
    #[error("{path}: {message}")]
    Rejected { path: String, message: String },
}

/// Acceptors built from one certificate directory: one for NBD, one for HTTPS (with ALPN).
#[derive(Clone)]
pub struct Tls {
    pub mode: TlsMode,
    pub verify_peer: bool,
    nbd: TlsAcceptor,
    http: TlsAcceptor,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).field("verify_peer", &self.verify_peer).finish()
    }
}

impl Tls {
    /// Reads and checks the certificates, so that a bad file stops the server at start.
    pub fn load(settings: &TlsSettings) -> Result<Tls, TlsError> {
        let config = server_config(&settings.certificates, settings.verify_peer)?;
        let mut http = (*config).clone();
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Tls {
            mode: settings.mode,
            verify_peer: settings.verify_peer,
            nbd: TlsAcceptor::from(config),
            http: TlsAcceptor::from(Arc::new(http)),
        })
    }

    /// The acceptor for NBD connections after STARTTLS.
    pub fn nbd(&self) -> &TlsAcceptor {
        &self.nbd
    }

    /// The acceptor for control API connections.
    pub fn http(&self) -> &TlsAcceptor {
        &self.http
    }
}

/// The crypto provider every TLS configuration here uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn file_in(dir: &Path, file: &'static str, what: &'static str) -> Result<PathBuf, TlsError> {
    let path = dir.join(file);
    if path.exists() { Ok(path) } else { Err(TlsError::Missing { dir: shown(dir), file, what }) }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: shown(path), source })
}

fn pem_error(path: &Path, error: pem::Error) -> TlsError {
    TlsError::Pem { path: shown(path), message: error.to_string() }
}

/// Every certificate in a PEM file, in order.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(path)?;
    let certificates =
        CertificateDer::pem_slice_iter(&text).collect::<Result<Vec<_>, _>>().map_err(|error| pem_error(path, error))?;
    if certificates.is_empty() {
        return Err(TlsError::Empty { path: shown(path), what: "certificate", detail: pem_hint(&text) });
    }
    Ok(certificates)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let text = read(path)?;
    PrivateKeyDer::from_pem_slice(&text).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::Empty { path: shown(path), what: "private key", detail: pem_hint(&text) },
        error => pem_error(path, error),
    })
}

/// What a file that has no wanted PEM section seems to hold instead.
fn pem_hint(text: &[u8]) -> String {
    let text = String::from_utf8_lossy(text);
    if text.contains("ENCRYPTED PRIVATE KEY") || text.contains("Proc-Type: 4,ENCRYPTED") {
        "; it holds an encrypted key: decrypt it first (openssl pkey -in KEY -out server-key.pem)".into()
    } else if let Some(label) = text.lines().find_map(|line| line.strip_prefix("-----BEGIN ")) {
        format!("; it holds -----BEGIN {label} instead")
    } else {
        String::new()
    }
}

fn server_config(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, TlsError> {
    if !dir.is_dir() {
        return Err(TlsError::Read {
            path: shown(dir),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "not a directory"),
        });
    }
    let cert_path = file_in(dir, SERVER_CERT, "the server's certificate")?;
    let key_path = file_in(dir, SERVER_KEY, "the server's private key")?;
    let chain = read_certificates(&cert_path)?;
    let key = read_private_key(&key_path)?;
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Rejected { path: shown(dir), message: error.to_string() })?;
    let builder = if verify_peer {
        let ca_path = file_in(dir, CA_CERT, "the authority client certificates must chain to (--tls-verify-peer)")?;
        let mut roots = rustls::RootCertStore::empty();
        for certificate in read_certificates(&ca_path)? {
            roots.add(certificate).map_err(|error| TlsError::Rejected {
                path: shown(&ca_path),
                message: format!("not a usable CA certificate: {error}"),
            })?;
        }
        let mut verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider));
        let crl_path = dir.join(CA_CRL);
        if crl_path.exists() {
            let text = read(&crl_path)?;
            let crls = CertificateRevocationListDer::pem_slice_iter(&text)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| pem_error(&crl_path, error))?;
            verifier = verifier.with_crls(crls);
        }
        let verifier = verifier
            .build()
            .map_err(|error| TlsError::Rejected { path: shown(&ca_path), message: error.to_string() })?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let config = builder.with_single_cert(chain, key).map_err(|error| TlsError::Rejected {
        path: shown(&key_path),
        message: format!(
            "cannot be used with {}: {error} (is it the key of that certificate?)",
            cert_path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
        ),
    })?;
    Ok(Arc::new(config))
}
