//! X.509 certificates made at test time (never committed): a CA, a server certificate for
//! localhost and the loopback addresses, and client certificates, written in the layout nbdkit,
//! libnbd and qemu read (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

/// The names and addresses the server certificate is valid for. 10.0.2.2 is the host as a qemu
/// guest on the user network sees it.
pub const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "10.0.2.2"];

/// A certificate authority that signs server and client certificates.
pub struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Authority {
    pub fn new(name: &str) -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Authority { issuer: CertifiedIssuer::self_signed(params, key).expect("CA certificate") }
    }

    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate and its key (PEM), for a server (`names` as subject alternative names) or
    /// a client.
    pub fn issue(&self, common_name: &str, names: &[&str], client: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![if client { ExtendedKeyUsagePurpose::ClientAuth } else { ExtendedKeyUsagePurpose::ServerAuth }];
        let key = KeyPair::generate().expect("key");
        let certificate = params.signed_by(&key, &self.issuer).expect("signed certificate");
        (certificate.pem(), key.serialize_pem())
    }
}

/// A directory of certificates for the server and a client, both from one CA.
pub struct Pki {
    pub dir: PathBuf,
    pub authority: Authority,
    _temp: tempfile::TempDir,
}

impl Pki {
    /// Server and client certificates in one directory: the server reads `server-*`, libnbd,
    /// qemu and `nbdfault ctl` read `ca-cert.pem` and `client-*`.
    pub fn new() -> Pki {
        let temp = tempfile::tempdir().expect("temporary directory");
        let dir = temp.path().to_path_buf();
        let authority = Authority::new("nbdfault test CA");
        write(&dir, "ca-cert.pem", &authority.cert_pem());
        let (cert, key) = authority.issue("nbdfault test server", SERVER_NAMES, false);
        write(&dir, "server-cert.pem", &cert);
        write(&dir, "server-key.pem", &key);
        let (cert, key) = authority.issue("nbdfault test client", &[], true);
        write(&dir, "client-cert.pem", &cert);
        write(&dir, "client-key.pem", &key);
        Pki { dir, authority, _temp: temp }
    }

    /// A directory for a client with only `ca-cert.pem`: it checks the server, presents nothing.
    pub fn anonymous_client(&self) -> PathBuf {
        let dir = self.dir.join("anonymous");
        std::fs::create_dir_all(&dir).expect("directory");
        std::fs::copy(self.dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).expect("copy CA");
        dir
    }

    /// A directory for a client whose certificate another CA signed (the server CA is trusted).
    pub fn stranger_client(&self) -> PathBuf {
        let dir = self.dir.join("stranger");
        std::fs::create_dir_all(&dir).expect("directory");
        std::fs::copy(self.dir.join("ca-cert.pem"), dir.join("ca-cert.pem")).expect("copy CA");
        let (cert, key) = Authority::new("someone else's CA").issue("stranger", &[], true);
        write(&dir, "client-cert.pem", &cert);
        write(&dir, "client-key.pem", &key);
        dir
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

pub fn write(dir: &Path, file: &str, text: &str) {
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    if file.ends_with("key.pem") {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("key permissions");
    }
}
