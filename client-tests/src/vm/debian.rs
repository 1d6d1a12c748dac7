//! Debian kernel packages through a private apt configuration: its own sources list, lists and
//! package cache under the harness's cache directory, so the system's apt sources and state are
//! never read or changed. Any kernel in bullseye, bookworm, trixie, forky or sid (and their
//! updates, security and backports suites) can be picked by version.
//!
//! Debian has packaged kernels two ways. Up to 6.x one `linux-image-ABI` package holds the image
//! (`boot/vmlinuz-*`) and the modules. From 7.x `linux-image-ABI` is a meta package whose Depends
//! name `linux-binary-ABI` (the image, `usr/lib/modules/RELEASE/vmlinuz`), `linux-modules-ABI`
//! (the modules) and `linux-base-ABI` (`modules.builtin`, the config); the unsigned image is
//! `linux-binary-unsigned-ABI`. [`companions`] follows those Depends, so either way the same
//! files end up unpacked in one tree.

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
    #[error(
        "no Debian kernel matches `{spec}` (amd64, not cloud/rt). Available versions: {available} (`nbdfault-client-tests kernels` lists every package and suite)"
    )]
    NoMatch { spec: String, available: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A kernel image package and the version picked.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct KernelPackage {
    pub name: String,
    pub version: String,
}

/// A kernel package on offer, with the suites that carry this version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub package: KernelPackage,
    /// `sid`, `bookworm-security`, ...
    pub suites: Vec<String>,
}

impl KernelPackage {
    /// The upstream kernel version the package carries (`6.12.117-1~deb12u1` → 6.12.117).
    pub fn upstream(&self) -> Option<KernelVersion> {
        KernelVersion::parse_leading(&self.version)
    }
}

/// The suites searched, newest last. Security suites live on a separate archive. (bullseye's
/// backports have moved to Debian's archive of old releases and are not on the mirrors.)
const SUITES: &[(&str, &str)] = &[
    ("debian", "bullseye"),
    ("debian", "bullseye-updates"),
    ("debian-security", "bullseye-security"),
    ("debian", "bookworm"),
    ("debian", "bookworm-updates"),
    ("debian-security", "bookworm-security"),
    ("debian", "bookworm-backports"),
    ("debian", "trixie"),
    ("debian", "trixie-updates"),
    ("debian-security", "trixie-security"),
    ("debian", "trixie-backports"),
    ("debian", "forky"),
    ("debian", "forky-updates"),
    ("debian-security", "forky-security"),
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
        // Rewritten only when it changes: apt rebuilds its binary cache (seconds) whenever the
        // sources list is newer than the cache.
        if changed {
            std::fs::write(&sources_path, &sources)?;
        }
        let stamp = self.dir.join("lists/.updated");
        let fresh = std::fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .is_some_and(|age| age < Duration::from_secs(24 * 3600));
        if fresh && !refresh && !changed {
            return Ok(false);
        }
        // A suite the mirror no longer carries (or does not carry yet) fails `apt-get update`
        // while every other list arrives: go on with what came, unless nothing did.
        if let Err(e) = self.run("apt-get", &["update", "-q"], None) {
            let lists = std::fs::read_dir(self.dir.join("lists"))?
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with("_Packages"))
                .count();
            if lists == 0 {
                return Err(e);
            }
            tracing::warn!("some Debian suites could not be read, going on with {lists} package lists: {e}");
        }
        std::fs::write(stamp, "")?;
        Ok(true)
    }

    /// Every bootable amd64 kernel package (not cloud, rt or debug) with each version on offer:
    /// `linux-image-*` (signed or `-unsigned`) and `linux-binary-unsigned-*`.
    pub fn kernel_packages(&self) -> Result<Vec<Offer>, AptError> {
        let mut names = Vec::new();
        for pattern in ["^linux-image-[0-9]", "^linux-binary-unsigned-[0-9]"] {
            let found = self.run("apt-cache", &["search", "--names-only", pattern], None)?;
            names.extend(
                found
                    .lines()
                    .filter_map(|l| l.split_whitespace().next())
                    .filter(|n| is_plain_amd64_image(n))
                    .map(str::to_string),
            );
        }
        self.madison(&names)
    }

    /// `apt-cache madison` of `names`: every version of each, with its suites.
    fn madison(&self, names: &[String]) -> Result<Vec<Offer>, AptError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec!["madison"];
        args.extend(names.iter().map(String::as_str));
        Ok(parse_madison(&self.run("apt-cache", &args, None)?))
    }

    /// The newest version of exactly `name`, for packages outside the listing (`linux-binary-*`,
    /// `linux-modules-*`) or a pinned companion.
    pub fn offer(&self, name: &str) -> Result<Vec<Offer>, AptError> {
        self.madison(&[name.to_string()])
    }

    /// Picks the package for `spec`: an exact package name, or a version prefix such as `6.1`,
    /// `5.10.223` or `7`, taking the newest match.
    pub fn resolve(&self, spec: &str) -> Result<Offer, AptError> {
        let mut all = self.kernel_packages()?;
        if spec.starts_with("linux-")
            && !all.iter().any(|o| o.package.name == spec)
            && let Ok(exact) = self.offer(spec)
        {
            all.extend(exact);
        }
        pick(&all, spec).ok_or_else(|| {
            let mut versions: Vec<String> =
                all.iter().filter_map(|o| o.package.upstream()).map(|v| format!("{}.{}", v.major, v.minor)).collect();
            versions.sort_by(|a, b| KernelVersion::parse_leading(a).cmp(&KernelVersion::parse_leading(b)));
            versions.dedup();
            AptError::NoMatch { spec: spec.to_string(), available: versions.join(", ") }
        })
    }

    /// Whether the package's `.deb` is already in the cache.
    pub fn has_downloaded(&self, package: &KernelPackage) -> bool {
        find_deb(&self.dir.join("debs"), package).is_some()
    }

    /// Downloads the package (once) and returns the path of the `.deb`.
    pub fn download(&self, package: &KernelPackage) -> Result<PathBuf, AptError> {
        let debs = self.dir.join("debs");
        std::fs::create_dir_all(&debs)?;
        if let Some(found) = find_deb(&debs, package) {
            return Ok(found);
        }
        self.run("apt-get", &["download", "-q", &format!("{}={}", package.name, package.version)], Some(&debs))?;
        find_deb(&debs, package).ok_or_else(|| AptError::Failed {
            command: format!("apt-get download {}", package.name),
            stderr: format!("no {}_{}_*.deb appeared in {}", package.name, package.version, debs.display()),
        })
    }
}

/// The `.deb` of `package` in `dir`, named as apt and dpkg name them (`NAME_VERSION_ARCH.deb`,
/// an epoch's colon written `%3a`).
pub fn find_deb(dir: &Path, package: &KernelPackage) -> Option<PathBuf> {
    let prefix = format!("{}_{}_", package.name, package.version.replace(':', "%3a"));
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")))
}

/// `linux-image-6.1.0-56-amd64`, `linux-image-6.12.117+deb12-amd64-unsigned`,
/// `linux-binary-unsigned-7.2.13+deb14-amd64`: yes.
/// `linux-image-6.1.0-56-cloud-amd64`, `-rt-`, `-dbg`, the meta `linux-image-amd64`: no.
pub fn is_plain_amd64_image(name: &str) -> bool {
    let base = name.strip_suffix("-unsigned").unwrap_or(name);
    ["linux-image-", "linux-binary-unsigned-"]
        .iter()
        .filter_map(|prefix| base.strip_prefix(prefix))
        .any(|v| v.starts_with(|c: char| c.is_ascii_digit()))
        && base.ends_with("-amd64")
        && !base.contains("-cloud-")
        && !base.contains("-rt-")
        && !name.contains("dbg")
}

/// True for an image Debian did not sign for Secure Boot (it boots all the same under qemu).
pub fn is_unsigned(name: &str) -> bool {
    name.ends_with("-unsigned") || name.starts_with("linux-binary-unsigned-")
}

/// The suite of a madison source column: `http://deb.debian.org/debian sid/main amd64 Packages`
/// is `sid`.
fn madison_suite(source: &str) -> Option<String> {
    let component = source.split_whitespace().nth(1)?;
    Some(component.split('/').next()?.to_string())
}

/// Parses `apt-cache madison` lines: `NAME | VERSION | SOURCE`, one offer per name and version
/// with every suite that carries it.
pub fn parse_madison(text: &str) -> Vec<Offer> {
    let mut out: Vec<Offer> = Vec::new();
    for line in text.lines() {
        let mut parts = line.split('|').map(str::trim);
        let (Some(name), Some(version)) = (parts.next(), parts.next()) else { continue };
        if name.is_empty() || version.is_empty() {
            continue;
        }
        let package = KernelPackage { name: name.to_string(), version: version.to_string() };
        let suite = parts.next().and_then(madison_suite);
        let offer = match out.iter_mut().find(|o| o.package == package) {
            Some(o) => o,
            None => {
                out.push(Offer { package, suites: Vec::new() });
                out.last_mut().expect("just pushed")
            }
        };
        if let Some(suite) = suite.filter(|s| !offer.suites.contains(s)) {
            offer.suites.push(suite);
        }
    }
    out.sort_by(|a, b| a.package.cmp(&b.package));
    out
}

/// Newest first: upstream version, then Debian version; signed `linux-image-*` before unsigned
/// twins of the same build.
pub fn newest_first(a: &Offer, b: &Offer) -> Ordering {
    let (a, b) = (&a.package, &b.package);
    b.upstream()
        .cmp(&a.upstream())
        .then_with(|| deb_version_cmp(&b.version, &a.version))
        .then_with(|| is_unsigned(&a.name).cmp(&is_unsigned(&b.name)))
        .then_with(|| a.name.cmp(&b.name))
}

/// The packages that complete `package` into a bootable kernel, from its `Depends` field: every
/// dependency on a `linux-*` package pinned to this very version (`linux-binary-ABI (= V)`,
/// `linux-modules-ABI (= V)`, `linux-base-ABI (= V)`). A `linux-binary-*` image without such a
/// modules dependency (the unsigned one) gets `linux-modules-ABI` of its version. Old
/// single-package kernels pin nothing and need no companion.
pub fn companions(package: &KernelPackage, depends: &str) -> Vec<KernelPackage> {
    let mut out: Vec<KernelPackage> = Vec::new();
    for clause in depends.split(',') {
        // Alternatives (`dracut | initramfs-tools`) are never part of the kernel itself.
        if clause.contains('|') {
            continue;
        }
        let clause = clause.trim();
        let (name, rest) = clause.split_once(' ').unwrap_or((clause, ""));
        let name = name.split(':').next().unwrap_or(name);
        let pinned = rest.trim().trim_start_matches('(').trim_end_matches(')').trim();
        if name.starts_with("linux-") && pinned.strip_prefix('=').map(str::trim) == Some(package.version.as_str()) {
            out.push(KernelPackage { name: name.to_string(), version: package.version.clone() });
        }
    }
    let abi = ["linux-binary-unsigned-", "linux-binary-"].iter().find_map(|p| package.name.strip_prefix(p));
    if let Some(abi) = abi
        && !out.iter().any(|p| p.name.starts_with("linux-modules-"))
    {
        out.push(KernelPackage { name: format!("linux-modules-{abi}"), version: package.version.clone() });
    }
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

/// The package `spec` names: an exact package name (newest version), the newest package whose
/// upstream version starts with `spec`, or the newest package of the suite `spec` (`sid`,
/// `trixie-backports`). Signed images win over unsigned twins.
pub fn pick(all: &[Offer], spec: &str) -> Option<Offer> {
    all.iter()
        .filter(|o| {
            o.package.name == spec
                || o.package.upstream().is_some_and(|v| version_matches(spec, v))
                || o.suites.iter().any(|s| s == spec)
        })
        .min_by(|a, b| newest_first(a, b))
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

    fn offer(name: &str, version: &str) -> Offer {
        Offer { package: pkg(name, version), suites: vec!["sid".into()] }
    }

    #[test]
    fn sources_list_names_every_suite_signed_by_the_archive_keyring() {
        let list = sources_list("http://deb.debian.org/");
        assert_eq!(list.lines().count(), SUITES.len());
        assert!(list.contains("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bullseye main\n"));
        assert!(list.contains("http://deb.debian.org/debian-security bookworm-security main"));
        for suite in ["bullseye", "bookworm-backports", "trixie-backports", "forky", "sid"] {
            assert!(list.contains(&format!(" {suite} main")), "{suite} missing from\n{list}");
        }
    }

    #[test]
    fn only_plain_amd64_images_are_candidates() {
        assert!(is_plain_amd64_image("linux-image-6.1.0-56-amd64"));
        assert!(is_plain_amd64_image("linux-image-6.12.117+deb12-amd64-unsigned"));
        assert!(is_plain_amd64_image("linux-image-7.2.13+deb14-amd64"));
        assert!(is_plain_amd64_image("linux-binary-unsigned-7.2.13+deb14-amd64"));
        assert!(!is_plain_amd64_image("linux-binary-unsigned-7.2.13+deb14-cloud-amd64"));
        assert!(!is_plain_amd64_image("linux-image-6.1.0-56-cloud-amd64"));
        assert!(!is_plain_amd64_image("linux-image-6.12.113+deb13-rt-amd64"));
        assert!(!is_plain_amd64_image("linux-image-6.1.0-56-amd64-dbg"));
        assert!(!is_plain_amd64_image("linux-image-amd64"));
        assert!(is_unsigned("linux-binary-unsigned-7.2.13+deb14-amd64"));
        assert!(is_unsigned("linux-image-5.10.0-46-amd64-unsigned"));
        assert!(!is_unsigned("linux-image-7.2.13+deb14-amd64"));
    }

    #[test]
    fn madison_lines_are_parsed_with_their_suites_and_merged() {
        let text = " linux-image-6.12.117+deb13-amd64 | 6.12.117-1 | http://deb.debian.org/debian trixie/main amd64 Packages\n\
                    linux-image-6.12.117+deb13-amd64 | 6.12.117-1 | http://deb.debian.org/debian-security trixie-security/main amd64 Packages\n\
                    linux-image-6.1.0-56-amd64 |  6.1.192-2 | http://deb.debian.org/debian-security bookworm-security/main amd64 Packages\n";
        assert_eq!(
            parse_madison(text),
            vec![
                Offer {
                    package: pkg("linux-image-6.1.0-56-amd64", "6.1.192-2"),
                    suites: vec!["bookworm-security".into()]
                },
                Offer {
                    package: pkg("linux-image-6.12.117+deb13-amd64", "6.12.117-1"),
                    suites: vec!["trixie".into(), "trixie-security".into()]
                },
            ]
        );
    }

    #[test]
    fn a_version_prefix_picks_the_newest_matching_kernel_and_6_1_is_not_6_12() {
        let all = vec![
            offer("linux-image-6.1.0-55-amd64", "6.1.192-1"),
            offer("linux-image-6.1.0-56-amd64", "6.1.192-2"),
            offer("linux-image-6.1.0-56-amd64-unsigned", "6.1.192-2"),
            offer("linux-image-6.12.117+deb12-amd64", "6.12.117-1~deb12u1"),
            offer("linux-image-6.12.118+deb13-amd64", "6.12.118-1"),
            offer("linux-image-5.10.0-46-amd64-unsigned", "5.10.262-1"),
            offer("linux-binary-unsigned-7.2.13+deb14-amd64", "7.2.13-1"),
            offer("linux-image-7.2.13+deb14-amd64", "7.2.13-1"),
        ];
        let name = |spec| pick(&all, spec).unwrap().package.name;
        assert_eq!(name("6.1"), "linux-image-6.1.0-56-amd64");
        assert_eq!(name("6.12"), "linux-image-6.12.118+deb13-amd64");
        assert_eq!(pick(&all, "6.12.117").unwrap().package.version, "6.12.117-1~deb12u1");
        assert_eq!(name("5.10"), "linux-image-5.10.0-46-amd64-unsigned");
        assert_eq!(name("7"), "linux-image-7.2.13+deb14-amd64");
        assert_eq!(name("7.2"), "linux-image-7.2.13+deb14-amd64");
        assert_eq!(name("linux-binary-unsigned-7.2.13+deb14-amd64"), "linux-binary-unsigned-7.2.13+deb14-amd64");
        assert_eq!(pick(&all, "linux-image-6.1.0-55-amd64").unwrap().package.version, "6.1.192-1");
        assert!(pick(&all, "4.19").is_none());
        assert!(pick(&all, "six").is_none());
        let mut suites = all.clone();
        suites[3].suites = vec!["bookworm-backports".into()];
        assert_eq!(pick(&suites, "sid").unwrap().package.name, "linux-image-7.2.13+deb14-amd64");
        assert_eq!(pick(&suites, "bookworm-backports").unwrap().package.name, "linux-image-6.12.117+deb12-amd64");
        let mut sorted = all.clone();
        sorted.sort_by(newest_first);
        assert_eq!(sorted[0].package.name, "linux-image-7.2.13+deb14-amd64");
        assert_eq!(sorted[1].package.name, "linux-binary-unsigned-7.2.13+deb14-amd64");
        assert_eq!(sorted.last().unwrap().package.name, "linux-image-5.10.0-46-amd64-unsigned");
    }

    #[test]
    fn the_split_7x_packaging_is_completed_from_its_depends() {
        // Debian's own Depends fields (sid, 7.2.13-1).
        let meta = pkg("linux-image-7.2.13+deb14-amd64", "7.2.13-1");
        let depends = "dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-7.2.13+deb14-amd64 (= 7.2.13-1), linux-binary-7.2.13+deb14-amd64 (= 7.2.13-1), linux-modules-7.2.13+deb14-amd64 (= 7.2.13-1)";
        let names: Vec<String> = companions(&meta, depends).into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            ["linux-base-7.2.13+deb14-amd64", "linux-binary-7.2.13+deb14-amd64", "linux-modules-7.2.13+deb14-amd64"]
        );
        let unsigned = pkg("linux-binary-unsigned-7.2.13+deb14-amd64", "7.2.13-1");
        let got = companions(&unsigned, "linux-base-7.2.13+deb14-amd64 (= 7.2.13-1)");
        assert_eq!(
            got,
            vec![pkg("linux-base-7.2.13+deb14-amd64", "7.2.13-1"), pkg("linux-modules-7.2.13+deb14-amd64", "7.2.13-1")]
        );
        // The modules depend on kmod and linux-base; the old single package pins nothing.
        let modules = pkg("linux-modules-7.2.13+deb14-amd64", "7.2.13-1");
        assert_eq!(
            companions(&modules, "kmod, linux-base-7.2.13+deb14-amd64 (= 7.2.13-1)"),
            vec![pkg("linux-base-7.2.13+deb14-amd64", "7.2.13-1")]
        );
        let old = pkg("linux-image-6.1.0-56-amd64", "6.1.192-2");
        assert!(
            companions(&old, "kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool")
                .is_empty()
        );
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
