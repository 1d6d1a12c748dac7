//! Server configuration: a YAML file and command-line flags, merged and checked before the server
//! starts. Every error says what to change.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nbdfault_policies::units::{ByteSize, HumanDuration, parse_size};
use serde::Deserialize;

use crate::tls::{TlsMode, TlsSettings};
use crate::wire::request::MAX_PAYLOAD;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_CONTROL: &str = "127.0.0.1:10810";
pub const DEFAULT_MEMORY_SIZE: u64 = 1 << 30;
/// In-flight bytes across the whole server: fits a VM of 1 GiB with room for memory exports.
pub const DEFAULT_MEMORY_BUDGET: u64 = 256 << 20;

/// The configuration file, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    /// Addresses to serve NBD on.
    #[serde(default)]
    pub listen: Option<Vec<String>>,
    /// The control API address, or `off`.
    #[serde(default)]
    pub control: Option<String>,
    #[serde(default)]
    pub control_token: Option<String>,
    /// Host names the control API may be addressed as, besides IP addresses and localhost.
    #[serde(default)]
    pub control_allow_hosts: Option<Vec<String>>,
    #[serde(default)]
    pub fault_log: Option<PathBuf>,
    #[serde(default)]
    pub limits: LimitsFile,
    #[serde(default)]
    pub tls: TlsFile,
    #[serde(default)]
    pub exports: Vec<ExportFile>,
}

/// `tls:` in the configuration file; a relative `certificates` is relative to the file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    pub mode: Option<TlsMode>,
    pub certificates: Option<PathBuf>,
    pub verify_peer: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    pub handshake_timeout: Option<HumanDuration>,
    pub max_handshakes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<ByteSize>,
    pub memory_budget: Option<ByteSize>,
    pub shutdown_grace: Option<HumanDuration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportFile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `memory:SIZE`, `file:PATH` (or a bare path), or `overlay:PATH`.
    pub storage: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub policy: Option<PathBuf>,
}

/// Settings from the command line; each one given replaces the file's.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Vec<String>,
    pub exports: Vec<String>,
    pub read_only: Vec<String>,
    pub policies: Vec<String>,
    pub control: Option<String>,
    pub no_control: bool,
    pub control_token: Option<String>,
    pub control_token_file: Option<PathBuf>,
    pub control_allow_hosts: Vec<String>,
    pub fault_log: Option<PathBuf>,
    pub handshake_timeout: Option<Duration>,
    pub max_handshakes: Option<usize>,
    pub max_connections: Option<usize>,
    pub max_in_flight: Option<u64>,
    pub memory_budget: Option<u64>,
    pub shutdown_grace: Option<Duration>,
    pub tls: Option<TlsMode>,
    pub tls_certificates: Option<PathBuf>,
    pub tls_verify_peer: bool,
}

/// Where an export's bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageSpec {
    Memory { size: u64 },
    File { path: PathBuf },
    Overlay { base: PathBuf },
}

impl StorageSpec {
    pub fn parse(spec: &str, relative_to: Option<&Path>) -> Result<StorageSpec, String> {
        let resolve = |path: &str| match relative_to {
            Some(dir) if Path::new(path).is_relative() => dir.join(path),
            _ => PathBuf::from(path),
        };
        if let Some(size) = spec.strip_prefix("memory:") {
            let size = parse_size(size).map_err(|e| format!("memory size: {e}"))?;
            if size == 0 {
                return Err("a memory export needs a size above 0, such as memory:1GiB".into());
            }
            if size > i64::MAX as u64 {
                return Err(format!("memory size {size} is over the protocol's 2^63-1 byte limit"));
            }
            return Ok(StorageSpec::Memory { size });
        }
        if let Some(path) = spec.strip_prefix("overlay:") {
            if path.is_empty() {
                return Err("overlay: needs the base image, such as overlay:/images/base.img".into());
            }
            return Ok(StorageSpec::Overlay { base: resolve(path) });
        }
        let path = spec.strip_prefix("file:").unwrap_or(spec);
        if path.is_empty() {
            return Err("name a disk image, such as file:/images/disk.img, or use memory:SIZE".into());
        }
        if path == "memory" {
            return Err("memory needs a size: write memory:1GiB".into());
        }
        Ok(StorageSpec::File { path: resolve(path) })
    }
}

#[derive(Debug, Clone)]
pub struct ExportConfig {
    pub name: String,
    pub description: String,
    pub storage: StorageSpec,
    pub read_only: bool,
    pub policy: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub handshake_timeout: Duration,
    /// Connections still in the handshake; when full, the oldest of them is closed.
    pub max_handshakes: usize,
    /// Connections in transmission (past the handshake).
    pub max_connections: usize,
    pub max_in_flight: u32,
    /// Bytes of request payloads, read buffers and control `data` transfers in flight across the
    /// whole server.
    pub memory_budget: u64,
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(30),
            max_handshakes: 64,
            max_connections: 256,
            max_in_flight: 64 << 20,
            memory_budget: DEFAULT_MEMORY_BUDGET,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// The checked configuration the server runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub control: Option<SocketAddr>,
    pub control_token: Option<String>,
    /// Host names the control API may be addressed as besides IP addresses and localhost:
    /// checked, lower case.
    pub control_allow_hosts: Vec<String>,
    pub fault_log: Option<PathBuf>,
    pub limits: Limits,
    /// TLS for NBD and the control API; `None` when TLS is off.
    pub tls: Option<TlsSettings>,
    pub exports: Vec<ExportConfig>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid(message.into())
}

fn parse_address(text: &str, what: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        invalid(format!("{what} `{text}` is not an address: write IP:PORT, such as 127.0.0.1:10809 or [::1]:10809"))
    })
}

/// Names for the control API: the flags' (or env's) when given, else the file's; each checked.
fn control_allow_hosts(overrides: &Overrides, from_file: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let names = if overrides.control_allow_hosts.is_empty() {
        from_file.unwrap_or_default()
    } else {
        overrides.control_allow_hosts.clone()
    };
    // An empty item (an empty NBDFAULT_CONTROL_ALLOW_HOST, a trailing comma) allows nothing.
    names
        .iter()
        .filter(|name| !name.trim().is_empty())
        .map(|name| crate::control::allowed_host_name(name).map_err(invalid))
        .collect()
}

/// The control token: from the flag or env, a file, or the configuration file. An empty token
/// is refused: it would let a bare `Authorization: Bearer ` through.
fn control_token(overrides: &Overrides, from_file: Option<String>) -> Result<Option<String>, ConfigError> {
    let token = match &overrides.control_token_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| invalid(format!("cannot read the control token file {}: {error}", path.display())))?;
            Some(text.lines().next().unwrap_or_default().trim().to_string())
        }
        None => overrides.control_token.clone().or(from_file),
    };
    match token {
        Some(token) if token.trim().is_empty() => Err(invalid(
            "the control token is empty: set a token, or leave it out (and NBDFAULT_CONTROL_TOKEN unset) for no token",
        )),
        Some(token) if token.chars().any(|c| c.is_control() || c == ' ') => {
            Err(invalid("the control token has spaces or control characters; use letters, digits and punctuation"))
        }
        other => Ok(other),
    }
}

/// The TLS settings: flags over the file. Certificates without a mode are refused rather than
/// silently unused, and a mode that needs certificates says where they go.
fn tls_settings(
    overrides: &Overrides,
    file: TlsFile,
    base_dir: Option<&Path>,
) -> Result<Option<TlsSettings>, ConfigError> {
    let explicit_mode = overrides.tls.or(file.mode);
    let certificates = match (&overrides.tls_certificates, file.certificates) {
        (Some(dir), _) if !dir.as_os_str().is_empty() => Some(dir.clone()),
        (_, Some(dir)) => Some(match base_dir {
            Some(base) if dir.is_relative() => base.join(dir),
            _ => dir,
        }),
        _ => None,
    };
    let verify_peer = overrides.tls_verify_peer || file.verify_peer.unwrap_or(false);
    match explicit_mode {
        None if certificates.is_some() || verify_peer => Err(invalid(
            "TLS certificates or --tls-verify-peer are given but TLS is not turned on: add --tls on \
             (clients choose) or --tls require (plain clients are refused)",
        )),
        None | Some(TlsMode::Off) => Ok(None),
        Some(mode) => match certificates {
            Some(certificates) => Ok(Some(TlsSettings { mode, certificates, verify_peer })),
            None => Err(invalid(format!(
                "--tls {} needs --tls-certificates DIR: a directory with server-cert.pem, server-key.pem \
                 and ca-cert.pem (see docs/security.md)",
                mode.name()
            ))),
        },
    }
}

/// `NAME=VALUE` from a flag.
fn split_assignment<'a>(text: &'a str, flag: &str, example: &str) -> Result<(&'a str, &'a str), ConfigError> {
    text.split_once('=').ok_or_else(|| invalid(format!("{flag} `{text}` needs NAME=VALUE, such as {flag} {example}")))
}

impl Config {
    /// Reads the configuration file (if any), applies the flags, and checks the result.
    pub fn load(overrides: &Overrides) -> Result<Config, ConfigError> {
        let (file, base_dir) = match &overrides.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
                let file: ConfigFile = serde_yaml::from_str(&text).map_err(|error| ConfigError::Syntax {
                    path: path.display().to_string(),
                    message: match error.location() {
                        Some(at) => format!("line {}, column {}: {error}", at.line(), at.column()),
                        None => error.to_string(),
                    },
                })?;
                (file, path.parent().map(Path::to_path_buf))
            }
            None => (ConfigFile::default(), None),
        };
        Config::merge(file, base_dir.as_deref(), overrides)
    }

    fn merge(file: ConfigFile, base_dir: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        // An empty value (`NBDFAULT_LISTEN=` in an env file) means "not set", as for most tools.
        let given: Vec<String> = overrides.listen.iter().filter(|text| !text.trim().is_empty()).cloned().collect();
        let listen_text: Vec<String> = if !given.is_empty() {
            given
        } else {
            file.listen.clone().unwrap_or_else(|| vec![DEFAULT_LISTEN.to_string()])
        };
        if listen_text.is_empty() {
            return Err(invalid("listen is empty: give at least one address, such as 127.0.0.1:10809"));
        }
        let mut listen = Vec::new();
        for text in &listen_text {
            let address = parse_address(text, "listen address")?;
            if listen.contains(&address) {
                return Err(invalid(format!("listen address {address} is given twice")));
            }
            listen.push(address);
        }

        let control_text = if overrides.no_control {
            None
        } else {
            match overrides.control.clone().filter(|text| !text.trim().is_empty()).or(file.control.clone()) {
                Some(text) if text == "off" => None,
                Some(text) => Some(text),
                None => Some(DEFAULT_CONTROL.to_string()),
            }
        };
        let control = control_text.map(|text| parse_address(&text, "control address")).transpose()?;
        if let Some(control) = control
            && control.port() != 0
            && listen.contains(&control)
        {
            return Err(invalid(format!("the control API and NBD both use {control}: give --control another port")));
        }

        let mut limits = Limits::default();
        if let Some(value) = overrides.handshake_timeout.or(file.limits.handshake_timeout.map(|d| d.0)) {
            limits.handshake_timeout = value;
        }
        if let Some(value) = overrides.max_connections.or(file.limits.max_connections) {
            limits.max_connections = value;
        }
        if let Some(value) = overrides.max_handshakes.or(file.limits.max_handshakes) {
            limits.max_handshakes = value;
        }
        if let Some(value) = overrides.shutdown_grace.or(file.limits.shutdown_grace.map(|d| d.0)) {
            limits.shutdown_grace = value;
        }
        if let Some(value) = overrides.max_in_flight.or(file.limits.max_in_flight.map(|s| s.0)) {
            // One request of the largest size, plus room for small ones, must always fit.
            let floor = u64::from(MAX_PAYLOAD) + (1 << 20);
            if value < floor || value > u64::from(u32::MAX) {
                return Err(invalid(format!(
                    "max in flight {value} is outside {floor}..{}: a 32 MiB request must fit, and the bound is a 32-bit count",
                    u32::MAX
                )));
            }
            limits.max_in_flight = value as u32;
        }
        if let Some(value) = overrides.memory_budget.or(file.limits.memory_budget.map(|s| s.0)) {
            let floor = u64::from(MAX_PAYLOAD) + (1 << 20);
            if value < floor || value > 1 << 48 {
                return Err(invalid(format!(
                    "memory budget {value} is outside {floor}..{}: a 32 MiB request must fit",
                    1u64 << 48
                )));
            }
            limits.memory_budget = value;
        }
        if limits.handshake_timeout.is_zero() {
            return Err(invalid("the handshake timeout must be above 0, such as 30s"));
        }
        if limits.max_connections == 0 {
            return Err(invalid("max connections must be at least 1"));
        }
        if limits.max_handshakes == 0 {
            return Err(invalid("max handshakes must be at least 1"));
        }

        let mut exports: Vec<ExportConfig> = Vec::new();
        for export in file.exports {
            let storage = StorageSpec::parse(&export.storage, base_dir)
                .map_err(|message| invalid(format!("export {:?}: storage: {message}", export.name)))?;
            let policy = export.policy.map(|path| match base_dir {
                Some(dir) if path.is_relative() => dir.join(path),
                _ => path,
            });
            exports.push(ExportConfig {
                name: export.name,
                description: export.description,
                storage,
                read_only: export.read_only,
                policy,
            });
        }
        let mut flag_names: Vec<&str> = Vec::new();
        for text in &overrides.exports {
            let (name, spec) = split_assignment(text, "--export", "disk=memory:1GiB")?;
            if flag_names.contains(&name) {
                return Err(invalid(format!("--export {name:?} is given twice; give each export its own name")));
            }
            flag_names.push(name);
            let storage =
                StorageSpec::parse(spec, None).map_err(|message| invalid(format!("--export {text}: {message}")))?;
            if let Some(existing) = exports.iter().position(|e| e.name == name) {
                // A flag replaces the file's export of the same name.
                exports.remove(existing);
            }
            exports.push(ExportConfig {
                name: name.to_string(),
                description: String::new(),
                storage,
                read_only: false,
                policy: None,
            });
        }
        if exports.is_empty() {
            exports.push(ExportConfig {
                name: String::new(),
                description: "1 GiB in memory (the default export)".into(),
                storage: StorageSpec::Memory { size: DEFAULT_MEMORY_SIZE },
                read_only: false,
                policy: None,
            });
        }
        for (i, export) in exports.iter().enumerate() {
            crate::export::check_export_name(&export.name).map_err(invalid)?;
            if exports[..i].iter().any(|other| other.name == export.name) {
                return Err(invalid(format!(
                    "export {:?} is defined twice; give each export its own name",
                    export.name
                )));
            }
        }
        let names = exports.iter().map(|e| format!("{:?}", e.name)).collect::<Vec<_>>().join(", ");
        for name in &overrides.read_only {
            let Some(export) = exports.iter_mut().find(|e| &e.name == name) else {
                return Err(invalid(format!("--read-only {name:?}: there is no such export (exports: {names})")));
            };
            export.read_only = true;
        }
        for text in &overrides.policies {
            let (name, path) = split_assignment(text, "--policy", "disk=policies/scenarios/fail-flush.yaml")?;
            let Some(export) = exports.iter_mut().find(|e| e.name == name) else {
                return Err(invalid(format!("--policy {text}: there is no export {name:?} (exports: {names})")));
            };
            export.policy = Some(PathBuf::from(path));
        }

        Ok(Config {
            listen,
            control,
            control_token: control_token(overrides, file.control_token)?,
            control_allow_hosts: control_allow_hosts(overrides, file.control_allow_hosts)?,
            tls: tls_settings(overrides, file.tls, base_dir)?,
            fault_log: overrides.fault_log.clone().or(file.fault_log),
            limits,
            exports,
        })
    }
}

impl Config {
    /// What anyone who can reach the server could do because a listener is beyond loopback and
    /// nothing authenticates its clients: one loud line each, logged at start.
    pub fn exposure_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        let authenticated_by_tls = self.tls.as_ref().is_some_and(|tls| tls.mode == TlsMode::Require && tls.verify_peer);
        for address in self.listen.iter().filter(|address| !address.ip().is_loopback()) {
            if !authenticated_by_tls {
                warnings.push(format!(
                    "NBD listens on {address}, beyond loopback, and any client that reaches it can read and overwrite \
                     every export: use --tls require --tls-verify-peer (client certificates), or listen on 127.0.0.1"
                ));
            }
        }
        if let Some(address) = self.control.filter(|address| !address.ip().is_loopback())
            && self.control_token.is_none()
            && !self.tls.as_ref().is_some_and(|tls| tls.verify_peer)
        {
            warnings.push(format!(
                "the control API listens on {address}, beyond loopback, with no token: anyone who reaches it can \
                 change policies and read and write every export; set --control-token (or --control-token-file), \
                 or --control 127.0.0.1:PORT"
            ));
        }
        warnings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_yaml(yaml: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file: ConfigFile = serde_yaml::from_str(yaml)
            .map_err(|e| ConfigError::Syntax { path: "test".into(), message: e.to_string() })?;
        Config::merge(file, Some(Path::new("/etc/nbdfault")), overrides)
    }

    #[test]
    fn listeners_beyond_loopback_without_authentication_are_warned_about() {
        assert!(Config::load(&Overrides::default()).unwrap().exposure_warnings().is_empty());
        let open = Overrides {
            listen: vec!["0.0.0.0:10809".into()],
            control: Some("0.0.0.0:10810".into()),
            ..Default::default()
        };
        let warnings = Config::load(&open).unwrap().exposure_warnings();
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("NBD listens on 0.0.0.0:10809") && warnings[0].contains("--tls require"));
        assert!(
            warnings[1].contains("control API listens on 0.0.0.0:10810") && warnings[1].contains("--control-token")
        );
        let tokened = Overrides { control_token: Some("s3cret".into()), listen: vec!["127.0.0.1:0".into()], ..open };
        assert!(Config::load(&tokened).unwrap().exposure_warnings().is_empty());
    }

    #[test]
    fn no_flags_gives_a_1gib_memory_default_export_on_loopback() {
        let config = Config::load(&Overrides::default()).unwrap();
        assert_eq!(config.listen, vec!["127.0.0.1:10809".parse().unwrap()]);
        assert_eq!(config.control, Some("127.0.0.1:10810".parse().unwrap()));
        assert_eq!(config.exports.len(), 1);
        assert_eq!(config.exports[0].name, "");
        assert_eq!(config.exports[0].storage, StorageSpec::Memory { size: 1 << 30 });
    }

    #[test]
    fn export_flags_take_memory_file_and_overlay_specs() {
        let overrides = Overrides {
            exports: vec![
                "a=memory:64MiB".into(),
                "b=/images/disk.img".into(),
                "c=file:x.img".into(),
                "d=overlay:/base.img".into(),
            ],
            read_only: vec!["b".into()],
            ..Default::default()
        };
        let config = Config::load(&overrides).unwrap();
        let specs: Vec<_> = config.exports.iter().map(|e| e.storage.clone()).collect();
        assert_eq!(
            specs,
            vec![
                StorageSpec::Memory { size: 64 << 20 },
                StorageSpec::File { path: "/images/disk.img".into() },
                StorageSpec::File { path: "x.img".into() },
                StorageSpec::Overlay { base: "/base.img".into() },
            ]
        );
        assert!(config.exports[1].read_only && !config.exports[0].read_only);
    }

    #[test]
    fn config_file_paths_are_relative_to_the_file() {
        let config = load_yaml(
            "listen: ['127.0.0.1:20809']\ncontrol: 'off'\nexports:\n  - name: disk\n    storage: disk.img\n    policy: p.yaml\n",
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.control, None);
        assert_eq!(config.exports[0].storage, StorageSpec::File { path: "/etc/nbdfault/disk.img".into() });
        assert_eq!(config.exports[0].policy, Some(PathBuf::from("/etc/nbdfault/p.yaml")));
    }

    #[test]
    fn flags_override_the_file() {
        let overrides = Overrides { listen: vec!["127.0.0.2:1".into()], no_control: true, ..Default::default() };
        let config = load_yaml("listen: ['127.0.0.1:20809']\ncontrol: 127.0.0.1:1234\n", &overrides).unwrap();
        assert_eq!(config.listen, vec!["127.0.0.2:1".parse().unwrap()]);
        assert_eq!(config.control, None);
    }

    #[test]
    fn mistakes_are_reported_with_what_to_change() {
        let error = |overrides: Overrides| Config::load(&overrides).unwrap_err().to_string();
        assert!(error(Overrides { listen: vec!["localhost".into()], ..Default::default() }).contains("IP:PORT"));
        assert!(error(Overrides { exports: vec!["disk".into()], ..Default::default() }).contains("NAME=VALUE"));
        assert!(error(Overrides { exports: vec!["d=memory:1MB".into()], ..Default::default() }).contains("MiB"));
        assert!(error(Overrides { exports: vec!["d=memory".into()], ..Default::default() }).contains("memory:1GiB"));
        assert!(error(Overrides { exports: vec!["d=memory:0".into()], ..Default::default() }).contains("above 0"));
        assert!(error(Overrides { read_only: vec!["nope".into()], ..Default::default() }).contains("no such export"));
        assert!(error(Overrides { max_in_flight: Some(1 << 20), ..Default::default() }).contains("32 MiB"));
        assert!(error(Overrides { memory_budget: Some(1 << 20), ..Default::default() }).contains("memory budget"));
        assert!(error(Overrides { max_handshakes: Some(0), ..Default::default() }).contains("at least 1"));
        assert!(
            error(Overrides { control: Some("127.0.0.1:10809".into()), ..Default::default() }).contains("another port")
        );
        let twice = Overrides { exports: vec!["a=memory:1MiB".into(), "a=memory:2MiB".into()], ..Default::default() };
        assert!(error(twice).contains("given twice"));
        let duplicate = load_yaml(
            "exports:\n  - {name: a, storage: 'memory:1MiB'}\n  - {name: a, storage: 'memory:1MiB'}\n",
            &Overrides::default(),
        );
        assert!(duplicate.unwrap_err().to_string().contains("defined twice"));
    }

    #[test]
    fn empty_values_mean_unset_but_an_empty_token_is_refused() {
        let overrides = Overrides { listen: vec![String::new()], control: Some(String::new()), ..Default::default() };
        let config = Config::load(&overrides).unwrap();
        assert_eq!(config.listen, vec![DEFAULT_LISTEN.parse().unwrap()]);
        assert_eq!(config.control, Some(DEFAULT_CONTROL.parse().unwrap()));
        let empty_token = Overrides { control_token: Some(String::new()), ..Default::default() };
        assert!(Config::load(&empty_token).unwrap_err().to_string().contains("token is empty"));
    }

    #[test]
    fn the_token_can_come_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret\n").unwrap();
        let overrides = Overrides { control_token_file: Some(path), ..Default::default() };
        assert_eq!(Config::load(&overrides).unwrap().control_token.as_deref(), Some("s3cret"));
        let missing = Overrides { control_token_file: Some(dir.path().join("nope")), ..Default::default() };
        assert!(Config::load(&missing).unwrap_err().to_string().contains("cannot read the control token file"));
    }

    #[test]
    fn control_host_names_come_from_flags_or_the_file_checked_and_in_lower_case() {
        let yaml = "listen: ['127.0.0.1:0']\ncontrol_allow_hosts: [NBDfault, test-box.example.]\n";
        let from_file = load_yaml(yaml, &Overrides::default()).unwrap();
        assert_eq!(from_file.control_allow_hosts, ["nbdfault", "test-box.example"]);
        let flags = Overrides { control_allow_hosts: vec!["box".into(), String::new()], ..Default::default() };
        assert_eq!(load_yaml(yaml, &flags).unwrap().control_allow_hosts, ["box"], "the flags replace the file's");
        let bad = Overrides { control_allow_hosts: vec!["nbdfault:10810".into()], ..Default::default() };
        let error = load_yaml(yaml, &bad).unwrap_err().to_string();
        assert!(
            error.contains("`nbdfault:10810` is not a host name") && error.contains("without scheme or port"),
            "{error}"
        );
        assert!(load_yaml("listen: ['127.0.0.1:0']\n", &Overrides::default()).unwrap().control_allow_hosts.is_empty());
    }

    #[test]
    fn tls_comes_from_flags_or_the_file_and_needs_certificates() {
        let overrides =
            Overrides { tls: Some(TlsMode::Require), tls_certificates: Some("/pki".into()), ..Default::default() };
        let tls = Config::load(&overrides).unwrap().tls.unwrap();
        assert_eq!(tls, TlsSettings { mode: TlsMode::Require, certificates: "/pki".into(), verify_peer: false });

        let config = load_yaml("tls:\n  mode: on\n  certificates: pki\n  verify_peer: true\n", &Overrides::default());
        let tls = config.unwrap().tls.unwrap();
        assert_eq!(tls, TlsSettings { mode: TlsMode::On, certificates: "/etc/nbdfault/pki".into(), verify_peer: true });
        // The flag wins over the file, also to turn TLS off.
        let off = Overrides { tls: Some(TlsMode::Off), ..Default::default() };
        assert!(load_yaml("tls: {mode: require, certificates: pki}\n", &off).unwrap().tls.is_none());

        let error = |overrides: Overrides| Config::load(&overrides).unwrap_err().to_string();
        assert!(error(Overrides { tls: Some(TlsMode::On), ..Default::default() }).contains("--tls-certificates DIR"));
        let unused = Overrides { tls_certificates: Some("/pki".into()), ..Default::default() };
        assert!(error(unused).contains("--tls require"));
        assert!(error(Overrides { tls_verify_peer: true, ..Default::default() }).contains("--tls on"));
        let bad_mode = load_yaml("tls: {mode: yes}\n", &Overrides::default()).unwrap_err().to_string();
        assert!(bad_mode.contains("off") && bad_mode.contains("require"), "{bad_mode}");
    }

    #[test]
    fn unknown_fields_in_the_file_are_refused_with_their_location() {
        let error = load_yaml("listn: []\n", &Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("unknown field `listn`"), "{error}");
        let error = load_yaml("limits:\n  max_in_flight: 1MB\n", &Overrides::default()).unwrap_err().to_string();
        assert!(error.contains("ambiguous"), "{error}");
    }
}
