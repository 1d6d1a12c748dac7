//! Debian kernel packages through a private apt configuration: its own sources list, lists and
//! package cache under the harness's cache directory, so the system's apt sources and state are
//! never read or changed. Any kernel in bullseye, bookworm, trixie or sid (and their updates,
//! security and backports suites) can be picked by version.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::version::KernelVersion;

/// Why a kernel package could not be found or fetched.
#[derive(Debug, thiserror::Error)]
pub enum AptError {
    #[error("cannot run {program}: {source} (install apt, which every Debian system has)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("no Debian kernel matches `{spec}` (amd64, not cloud/rt). Available versions: {available}")]
    NoMatch { spec: String, available: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A kernel image package and the version picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

impl KernelPackage {
    /// The upstream kernel version the package carries (`6.12.117-1~deb12u1` → 6.12.117).
    pub fn upstream(&self) -> Option<KernelVersion> {
        KernelVersion::parse_leading(&self.version)
    }
}

/// The suites searched, newest last. Security suites live on a separate archive.
const SUITES: &[(&str, &str)] = &[
    ("debian", "bullseye"),
    ("debian-security", "bullseye-security"),
    ("debian", "bookworm"),
    ("debian", "bookworm-updates"),
    ("debian-security", "bookworm-security"),
    ("debian", "bookworm-backports"),
    ("debian", "trixie"),
    ("debian", "trixie-updates"),
    ("debian-security", "trixie-security"),
    ("debian", "sid"),
];

/// The sources list of the private configuration. `mirror` is the archive's base URL, such as
/// `http://deb.debian.org`.
pub fn sources_list(mirror: &str) -> String {
    let mirror = mirror.trim_end_matches('/');
    SUITES
        .iter()
        .map(|(archive, suite)| {
            format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror}/{archive} {suite} main\n")
        })
        .collect()
}

/// A private apt configuration rooted at one directory.
pub struct Apt {
    dir: PathBuf,
    mirror: String,
}

impl Apt {
    pub fn new(dir: &Path, mirror: &str) -> Self {
        Apt { dir: dir.to_path_buf(), mirror: mirror.to_string() }
    }

    fn options(&self) -> Vec<String> {
        let d = self.dir.display();
        [
            format!("Dir::Etc::SourceList={d}/sources.list"),
            "Dir::Etc::SourceParts=/dev/null".to_string(),
            format!("Dir::State={d}/state"),
            format!("Dir::State::Lists={d}/lists"),
            format!("Dir::State::status={d}/state/status"),
            format!("Dir::Cache={d}/cache"),
            // Keep apt's binary package cache (some systems turn it off): lookups then take
            // a fraction of a second instead of re-reading every list.
            "Dir::Cache::pkgcache=pkgcache.bin".to_string(),
            "Dir::Cache::srcpkgcache=srcpkgcache.bin".to_string(),
            "Debug::NoLocking=1".to_string(),
            "APT::Sandbox::User=root".to_string(),
            "Acquire::Languages=none".to_string(),
            "APT::Architecture=amd64".to_string(),
            "APT::Architectures=amd64".to_string(),
            // Only package lists: no contents, no AppStream metadata.
            "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false".to_string(),
            "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false".to_string(),
        ]
        .into_iter()
        .flat_map(|o| ["-o".to_string(), o])
        .collect()
    }

    fn run(&self, program: &str, args: &[&str], cwd: Option<&Path>) -> Result<String, AptError> {
        let mut cmd = Command::new(program);
        cmd.args(self.options()).args(args).env("DEBIAN_FRONTEND", "noninteractive");
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let out = cmd.output().map_err(|source| AptError::Spawn { program: program.to_string(), source })?;
        if !out.status.success() {
            return Err(AptError::Failed {
                command: format!("{program} {}", args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Downloads the package lists when they are missing, older than a day, or `refresh` asks.
    /// Returns whether it downloaded.
    pub fn update(&self, refresh: bool) -> Result<bool, AptError> {
        for sub in ["lists/partial", "cache/archives/partial", "state", "debs"] {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        let status = self.dir.join("state/status");
        if !status.exists() {
            std::fs::write(&status, "")?;
        }
        let sources = sources_list(&self.mirror);
        let sources_path = self.dir.join("sources.list");
        let changed = std::fs::read_to_string(&sources_path).ok().as_deref() != Some(sources.as_str());
        std::fs::write(&sources_path, &sources)?;
        let stamp = self.dir.join("lists/.updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(24 * 3600));
        if fresh && !refresh && !changed {
            return Ok(false);
        }
        self.run("apt-get", &["update", "-q"], None)?;
        std::fs::write(stamp, "")?;
        Ok(true)
    }

    /// Every amd64 kernel image package (not cloud, rt or debug) with each version on offer.
    pub fn kernel_packages(&self) -> Result<Vec<KernelPackage>, AptError> {
        let names = self.run("apt-cache", &["search", "--names-only", "^linux-image-[0-9]"], None)?;
        let names: Vec<&str> =
            names.lines().filter_map(|l| l.split_whitespace().next()).filter(|n| is_plain_amd64_image(n)).collect();
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["madison"];
        args.extend(&names);
        Ok(parse_madison(&self.run("apt-cache", &args, None)?))
    }

    /// Picks the package for `spec`: an exact package name, or a version prefix such as `6.1`,
    /// `5.10.223` or `6.12`, taking the newest match.
    pub fn resolve(&self, spec: &str) -> Result<KernelPackage, AptError> {
        let all = self.kernel_packages()?;
        pick(&all, spec).ok_or_else(|| {
            let mut versions: Vec<String> =
                all.iter().filter_map(|p| p.upstream()).map(|v| format!("{}.{}", v.major, v.minor)).collect();
            versions.sort_by(|a, b| KernelVersion::parse_leading(a).cmp(&KernelVersion::parse_leading(b)));
            versions.dedup();
            AptError::NoMatch { spec: spec.to_string(), available: versions.join(", ") }
        })
    }

    /// Downloads the package (once) and returns the path of the `.deb`.
    pub fn download(&self, package: &KernelPackage) -> Result<PathBuf, AptError> {
        let debs = self.dir.join("debs");
        std::fs::create_dir_all(&debs)?;
        let prefix = format!("{}_{}_", package.name, package.version.replace(':', "%3a"));
        let find = || -> Option<PathBuf> {
            std::fs::read_dir(&debs).ok()?.flatten().map(|e| e.path()).find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
            })
        };
        if let Some(found) = find() {
            return Ok(found);
        }
        self.run("apt-get", &["download", "-q", &format!("{}={}", package.name, package.version)], Some(&debs))?;
        find().ok_or_else(|| AptError::Failed {
            command: format!("apt-get download {}", package.name),
            stderr: format!("no {prefix}*.deb appeared in {}", debs.display()),
        })
    }
}

/// `linux-image-6.1.0-56-amd64`, `linux-image-6.12.117+deb12-amd64-unsigned`: yes.
/// `linux-image-6.1.0-56-cloud-amd64`, `-rt-`, `-dbg`: no.
pub fn is_plain_amd64_image(name: &str) -> bool {
    let base = name.strip_suffix("-unsigned").unwrap_or(name);
    base.strip_prefix("linux-image-").is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        && base.ends_with("-amd64")
        && !base.contains("-cloud-")
        && !base.contains("-rt-")
        && !name.contains("dbg")
}

/// Parses `apt-cache madison` lines: `NAME | VERSION | SOURCE`.
pub fn parse_madison(text: &str) -> Vec<KernelPackage> {
    let mut out: Vec<KernelPackage> = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split('|').map(str::trim);
            let name = parts.next()?.to_string();
            let version = parts.next()?.to_string();
            (!name.is_empty() && !version.is_empty()).then_some(KernelPackage { name, version })
        })
        .collect();
    out.sort_by(|a, b| (&a.name, &a.version).cmp(&(&b.name, &b.version)));
    out.dedup();
    out
}

/// True when `spec` (dotted numbers) is a prefix of `version`'s numbers: `6.1` matches 6.1.192
/// but not 6.12.0.
pub fn version_matches(spec: &str, version: KernelVersion) -> bool {
    let parts: Vec<u32> = match spec.split('.').map(str::parse).collect() {
        Ok(p) => p,
        Err(_) => return false,
    };
    let have = [version.major, version.minor, version.patch];
    !parts.is_empty() && parts.len() <= 3 && parts.iter().zip(have.iter()).all(|(a, b)| a == b)
}

/// The package `spec` names: an exact package name (newest version), or the newest package
/// whose upstream version starts with `spec`. Signed images win over `-unsigned` twins.
pub fn pick(all: &[KernelPackage], spec: &str) -> Option<KernelPackage> {
    let candidates = all.iter().filter(|p| p.name == spec || p.upstream().is_some_and(|v| version_matches(spec, v)));
    candidates
        .max_by(|a, b| {
            a.upstream()
                .cmp(&b.upstream())
                .then_with(|| deb_version_cmp(&a.version, &b.version))
                .then_with(|| b.name.ends_with("-unsigned").cmp(&a.name.ends_with("-unsigned")))
                .then_with(|| b.name.cmp(&a.name))
        })
        .cloned()
}

/// Debian version comparison (deb-version(7)): epoch, then upstream and revision compared in
/// alternating non-digit and digit runs, where `~` sorts before everything, even the end.
pub fn deb_version_cmp(a: &str, b: &str) -> Ordering {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, r)) => (e.parse().unwrap_or(0), r),
            None => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((up, rev)) => (epoch, up, rev),
            None => (epoch, rest, ""),
        }
    }
    fn order(c: Option<char>) -> i32 {
        match c {
            None => 0,
            Some('~') => -1,
            Some(c) if c.is_ascii_alphabetic() => c as i32,
            Some(c) => c as i32 + 256,
        }
    }
    fn part(mut a: &str, mut b: &str) -> Ordering {
        while !a.is_empty() || !b.is_empty() {
            let na = a.find(|c: char| c.is_ascii_digit()).unwrap_or(a.len());
            let nb = b.find(|c: char| c.is_ascii_digit()).unwrap_or(b.len());
            let (sa, sb) = (&a[..na], &b[..nb]);
            let (mut ia, mut ib) = (sa.chars(), sb.chars());
            loop {
                let (ca, cb) = (ia.next(), ib.next());
                if ca.is_none() && cb.is_none() {
                    break;
                }
                match order(ca).cmp(&order(cb)) {
                    Ordering::Equal => {}
                    o => return o,
                }
            }
            a = &a[na..];
            b = &b[nb..];
            let da = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
            let db = b.find(|c: char| !c.is_ascii_digit()).unwrap_or(b.len());
            let va: u128 = a[..da].parse().unwrap_or(0);
            let vb: u128 = b[..db].parse().unwrap_or(0);
            match va.cmp(&vb) {
                Ordering::Equal => {}
                o => return o,
            }
            a = &a[da..];
            b = &b[db..];
        }
        Ordering::Equal
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb).then_with(|| part(ua, ub)).then_with(|| part(ra, rb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pkg(name: &str, version: &str) -> KernelPackage {
        KernelPackage { name: name.into(), version: version.into() }
    }

    #[test]
    fn sources_list_names_every_suite_signed_by_the_archive_keyring() {
        let list = sources_list("http://deb.debian.org/");
        assert_eq!(list.lines().count(), SUITES.len());
        assert!(list.contains("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main\n"));
        assert!(list.contains("http://deb.debian.org/debian-security bookworm-security main"));
    }

    #[test]
    fn only_plain_amd64_images_are_candidates() {
        assert!(is_plain_amd64_image("linux-image-6.1.0-56-amd64"));
        assert!(is_plain_amd64_image("linux-image-6.12.117+deb12-amd64-unsigned"));
        assert!(!is_plain_amd64_image("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!is_plain_amd64_image("linux-image-6.12.113+deb13-rt-amd64"));
        assert!(!is_plain_amd64_image("linux-image-6.1.0-56-amd64-dbg"));
        assert!(!is_plain_amd64_image("linux-image-amd64"));
    }

    #[test]
    fn madison_lines_are_parsed_and_deduplicated() {
        let text = " linux-image-6.12.117+deb13-amd64 | 6.12.117-1 | http://deb.debian.org/debian trixie/main amd64 Packages\n\
                    linux-image-6.12.117+deb13-amd64 | 6.12.117-1 | http://deb.debian.org/debian trixie/main amd64 Packages\n\
                    linux-image-6.1.0-56-amd64 |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n";
        assert_eq!(
            parse_madison(text),
            vec![pkg("linux-image-6.1.0-56-amd64", "6.1.192-2"), pkg("linux-image-6.12.117+deb13-amd64", "6.12.117-1")]
        );
    }

    #[test]
    fn a_version_prefix_picks_the_newest_matching_kernel_and_6_1_is_not_6_12() {
        let all = vec![
            pkg("linux-image-6.1.0-55-amd64", "6.1.192-1"),
            pkg("linux-image-6.1.0-56-amd64", "6.1.192-2"),
            pkg("linux-image-6.1.0-56-amd64-unsigned", "6.1.192-2"),
            pkg("linux-image-6.12.117+deb12-amd64", "6.12.117-1~deb12u1"),
            pkg("linux-image-6.12.118+deb13-amd64", "6.12.118-1"),
            pkg("linux-image-5.10.0-46-amd64-unsigned", "5.10.262-1"),
        ];
        assert_eq!(pick(&all, "6.1").unwrap().name, "linux-image-6.1.0-56-amd64");
        assert_eq!(pick(&all, "6.12").unwrap().name, "linux-image-6.12.118+deb13-amd64");
        assert_eq!(pick(&all, "6.12.117").unwrap().version, "6.12.117-1~deb12u1");
        assert_eq!(pick(&all, "5.10").unwrap().name, "linux-image-5.10.0-46-amd64-unsigned");
        assert_eq!(pick(&all, "linux-image-6.1.0-55-amd64").unwrap().version, "6.1.192-1");
        assert!(pick(&all, "4.19").is_none());
        assert!(pick(&all, "six").is_none());
    }

    #[test]
    fn debian_versions_compare_like_dpkg() {
        use Ordering::*;
        assert_eq!(deb_version_cmp("6.1.192-2", "6.1.192-1"), Greater);
        assert_eq!(deb_version_cmp("6.12.117-1~deb12u1", "6.12.117-1"), Less);
        assert_eq!(deb_version_cmp("6.12.95-1~bpo12+1", "6.12.95-1"), Less);
        assert_eq!(deb_version_cmp("1:1.0-1", "2.0-1"), Greater);
        assert_eq!(deb_version_cmp("5.10.10-1", "5.10.9-1"), Greater);
        assert_eq!(deb_version_cmp("1.0a-1", "1.0-1"), Greater);
        assert_eq!(deb_version_cmp("1.0-1", "1.0-1"), Equal);
    }

    #[test]
    fn version_prefixes_match_whole_components() {
        let v = KernelVersion::new(6, 12, 5);
        assert!(version_matches("6", v));
        assert!(version_matches("6.12", v));
        assert!(!version_matches("6.1", v));
        assert!(!version_matches("6.12.5.1", v));
        assert!(!version_matches("", v));
    }
}
