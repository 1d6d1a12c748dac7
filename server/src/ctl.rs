//! `nbdfault ctl`: the control API from the command line.

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use crate::control::DEFAULT_EXPORT;

/// What went wrong talking to the control API, said so a user knows what to do.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    #[error("cannot reach the control API at {url}: {source}{hint}")]
    Unreachable { url: String, source: Box<ureq::Error>, hint: &'static str },
    #[error("{method} {path}: HTTP {status}: {message}")]
    Refused { method: &'static str, path: String, status: u16, message: String },
    /// `set-policy` with a policy the server refused: its errors, each with the file name, line,
    /// column and a fix, as `nbdfault policy check` prints them.
    #[error("{errors}\nthe policy was refused; export {export:?} keeps the policy it had")]
    PolicyRefused { export: String, errors: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

/// A client for one server's control API.
pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

/// Percent-encodes an export or trigger name for a URL path; `""` becomes `@default`.
pub fn path_segment(name: &str) -> String {
    if name.is_empty() {
        return DEFAULT_EXPORT.to_string();
    }
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b':' | b'@') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Percent-encodes a value for a URL query (`?origin=...`).
pub fn query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The TLS settings of `ctl` for an HTTPS control API, from a directory laid out as libnbd's
/// `tls-certificates=`: `ca-cert.pem` (the authority the server's certificate chains to) and,
/// for a server started with --tls-verify-peer, `client-cert.pem` and `client-key.pem`.
pub fn client_tls(dir: &Path) -> Result<ureq::tls::TlsConfig, CtlError> {
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
        .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    let (cert, key) = (dir.join("client-cert.pem"), dir.join("client-key.pem"));
    let identity = if cert.exists() && key.exists() {
        let chain: Vec<_> = crate::tls::read_certificates(&cert)
            .map_err(usage)?
            .iter()
            .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
            .collect();
        let key_pem =
            std::fs::read(&key).map_err(|error| CtlError::Usage(format!("cannot read {}: {error}", key.display())))?;
        let key = ureq::tls::PrivateKey::from_pem(&key_pem)
            .map_err(|error| CtlError::Usage(format!("{}: {error}", key.display())))?;
        Some(ureq::tls::ClientCert::new_with_certs(&chain, key))
    } else {
        None
    };
    Ok(ureq::tls::TlsConfig::builder()
        .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
        .client_cert(identity)
        .unversioned_rustls_crypto_provider(crate::tls::provider())
        .build())
}

impl Client {
    /// A client for the API at `base`; `tls` (from [`client_tls`]) is needed for `https://`.
    pub fn new(base: &str, token: Option<String>, tls: Option<ureq::tls::TlsConfig>) -> Client {
        // Without a CA, trust nothing: the control API's certificate comes from the user's own CA.
        let tls = tls.unwrap_or_else(|| {
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&[]))
                .unversioned_rustls_crypto_provider(crate::tls::provider())
                .build()
        });
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .tls_config(tls)
            .build()
            .into();
        Client { base: base.trim_end_matches('/').to_string(), token, agent }
    }

    fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<ureq::http::Response<ureq::Body>, CtlError> {
        let url = format!("{}{path}", self.base);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(token) = &self.token {
            builder = builder.header("Authorization", format!("Bearer {token}"));
        }
        let request = builder
            .body(body.unwrap_or_default())
            .map_err(|error| CtlError::Usage(format!("{url} is not a valid URL: {error}")))?;
        let mut response = self.agent.run(request).map_err(|source| {
            let hint = match &source {
                ureq::Error::Tls(_) | ureq::Error::Rustls(_) => {
                    " (with TLS on, give the CA that signed the server's certificate: --tls-certificates DIR \
                         with ca-cert.pem, plus client-cert.pem and client-key.pem if the server verifies clients)"
                }
                _ => " (is `nbdfault serve` running with --control there? with --tls on, use https://)",
            };
            CtlError::Unreachable { url: self.base.clone(), source: Box::new(source), hint }
        })?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            let message = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|value| value.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(text);
            return Err(CtlError::Refused { method, path: path.to_string(), status, message });
        }
        Ok(response)
    }

    /// Calls the API and returns the body as text.
    pub fn text(&self, method: &'static str, path: &str, body: Option<Vec<u8>>) -> Result<String, CtlError> {
        let mut response = self.call(method, path, body)?;
        let mut text = String::new();
        response.body_mut().as_reader().read_to_string(&mut text)?;
        Ok(text)
    }

    /// Calls the API and copies the raw body to `out`.
    pub fn copy_to(&self, path: &str, out: &mut dyn Write) -> Result<u64, CtlError> {
        let mut response = self.call("GET", path, None)?;
        Ok(std::io::copy(&mut response.body_mut().as_reader(), out)?)
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
        let client = Client::new("http://127.0.0.1:9", None, None);
        let error = client.text("GET", "/v1/health", None).unwrap_err().to_string();
        assert!(error.contains("cannot reach the control API"), "{error}");
    }
}
