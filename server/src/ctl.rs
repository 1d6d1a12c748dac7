//! `nbdfault ctl`: the control API from the command line.

use std::io::{Read, Write};
use std::path::Path;

pub use nbdfault_control_client::{DEFAULT_EXPORT, path_segment, query_value};
use nbdfault_control_client::{Error as ApiError, tls};

/// What went wrong talking to the control API, said so a user knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the control API at {url}: {source}{hint}")]
    Unreachable { url: String, source: Box<ureq::Error>, hint: &'static str },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Refused { method: String, path: String, status: u16, message: String },
    /// `set-policy` with a policy the server refused: its errors, each with the file name, line,
    /// column and a fix, as `nbdfault policy check` prints them.
    #[error("{errors}\nthe policy was refused; export {export:?} keeps the policy it had")]
    PolicyRefused { export: String, errors: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

impl From<ApiError> for CtlError {
    fn from(error: ApiError) -> CtlError {
        match error {
            ApiError::Unreachable { url, source, hint } => CtlError::Unreachable { url, source, hint },
            ApiError::Refused { method, path, status, message, .. } => {
                CtlError::Refused { method, path, status, message }
            }
            ApiError::Io(error) => CtlError::Io(error),
            error @ (ApiError::Invalid { .. } | ApiError::BadUrl { .. }) => CtlError::Usage(error.to_string()),
        }
    }
}

/// A client for one server's control API: the shared typed client, and the raw calls `ctl`
/// prints as they come.
pub struct Client {
    api: nbdfault_control_client::Client,
}

/// The TLS settings of `ctl` for an HTTPS control API, from a directory laid out as libnbd's
/// `tls-certificates=`: `ca-cert.pem` (the authority the server's certificate chains to) and,
/// for a server started with --tls-verify-peer, `client-cert.pem` and `client-key.pem`.
pub fn client_tls(dir: &Path) -> Result<tls::TlsConfig, CtlError> {
    let usage = |error: crate::tls::TlsError| CtlError::Usage(error.to_string());
    let ca = dir.join(crate::tls::CA_CERT);
    if !ca.exists() {
        return Err(CtlError::Usage(format!(
            "{} is missing: the directory given with --tls-certificates holds ca-cert.pem, the CA that signed \
             the server's certificate",
            ca.display()
        )));
    }
    let roots: Vec<_> = crate::tls::read_certificates(&ca)
        .map_err(usage)?
        .iter()
        .map(|der| tls::Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let identity = if cert.exists() && key.exists() {
        let chain: Vec<_> = crate::tls::read_certificates(&cert)
            .map_err(usage)?
            .iter()
            .map(|der| tls::Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        let key_pem =
            std::fs::read(&key).map_err(|error| CtlError::Usage(format!("cannot read {}: {error}", key.display())))?;
        let key = tls::PrivateKey::from_pem(&key_pem)
            .map_err(|error| CtlError::Usage(format!("{}: {error}", key.display())))?;
        Some(tls::ClientCert::new_with_certs(&chain, key))
    } else {
        None
    };
    Ok(tls::TlsConfig::builder()
        .root_certs(tls::RootCerts::new_with_certs(&roots))
        .client_cert(identity)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .build())
}

impl Client {
    /// A client for the API at `base`; `tls` (from [`client_tls`]) is needed for `https://`.
    pub fn new(base: &str, token: Option<String>, tls: Option<tls::TlsConfig>) -> Result<Client, CtlError> {
        // Without a CA, trust nothing: the control API's certificate comes from the user's own CA.
        let tls = tls.unwrap_or_else(|| {
            tls::TlsConfig::builder()
                .root_certs(tls::RootCerts::new_with_certs(&[]))
                .unversioned_rustls_crypto_provider(crate::tls::provider())
                .build()
        });
        Ok(Client { api: nbdfault_control_client::Client::with_tls(base, token, tls)? })
    }

    /// The typed client underneath.
    pub fn api(&self) -> &nbdfault_control_client::Client {
        &self.api
    }

    /// Calls the API and returns the body as text.
    pub fn text(&self, method: &'static str, path: &str, body: Option<Vec<u8>>) -> Result<String, CtlError> {
        Ok(self.api.request(method, path, body.as_deref())?.text())
    }

    /// Calls the API and copies the raw body to `out`.
    pub fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64, CtlError> {
        Ok(self.api.copy(path, out)?)
    }
}

/// Reads a file, or stdin for `-`.
pub fn read_input(path: &str) -> Result<Vec<u8>, CtlError> {
    if path == "-" {
        let mut data = Vec::new();
        std::io::stdin().read_to_end(&mut data)?;
        Ok(data)
    } else {
        std::fs::read(path).map_err(|error| CtlError::Usage(format!("cannot read {path}: {error}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_encoded_for_paths_and_the_default_export_has_a_spelling() {
        assert_eq!(path_segment(""), "@default");
        assert_eq!(path_segment("disk"), "disk");
        assert_eq!(path_segment("a b/c"), "a%20b%2Fc");
        assert_eq!(query_value("dir/p q&r.yaml"), "dir/p%20q%26r.yaml");
    }

    #[test]
    fn an_unreachable_server_is_reported_with_what_to_check() {
        // Port 9 on loopback (discard) is closed on test machines; nothing listens there.
        let client = Client::new("http://127.0.0.1:9", None, None).unwrap();
        let error = client.text("GET", "/v1/health", None).unwrap_err().to_string();
        assert!(error.contains("cannot reach the control API"), "{error}");
    }
}
