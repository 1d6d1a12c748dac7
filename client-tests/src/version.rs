//! Kernel versions: parsing them from `uname -r`, `/proc/version` and Debian package versions, and
//! comparing them, so a check can say what the catalogue (docs/invariants.md) expects of this kernel.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An upstream kernel version, `major.minor.patch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        KernelVersion { major, minor, patch }
    }

    /// Reads the leading `X.Y[.Z]` of a release or package version: `6.1.0-56-amd64`,
    /// `6.12.118+deb13-amd64`, `5.10.262-1`. `None` when it does not start with two numbers.
    pub fn parse_leading(text: &str) -> Option<Self> {
        let end = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
        let mut parts = text[..end].split('.').filter(|p| !p.is_empty());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(KernelVersion { major, minor, patch })
    }

    /// The upstream version of a running kernel. Debian's release strings (`6.1.0-56-amd64`) carry
    /// only the ABI, so the `Debian 6.1.192-2` part of `/proc/version` wins when present.
    pub fn from_running(release: &str, proc_version: &str) -> Option<Self> {
        let debian = proc_version
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[0] == "Debian")
            .and_then(|w| KernelVersion::parse_leading(w[1]));
        debian.or_else(|| KernelVersion::parse_leading(release))
    }

    /// True when this version is at least `major.minor`.
    pub fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// What the running kernel says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningKernel {
    /// `uname -r`.
    pub release: String,
    /// The upstream version, when it could be worked out.
    pub version: Option<KernelVersion>,
}

impl RunningKernel {
    /// Reads `/proc/sys/kernel/osrelease` and `/proc/version`.
    pub fn detect() -> std::io::Result<Self> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string();
        let proc_version = std::fs::read_to_string("/proc/version").unwrap_or_default();
        let version = KernelVersion::from_running(&release, &proc_version);
        Ok(RunningKernel { release, version })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_version_reads_release_and_package_spellings() {
        assert_eq!(KernelVersion::parse_leading("6.12.118+deb13-amd64"), Some(KernelVersion::new(6, 12, 118)));
        assert_eq!(KernelVersion::parse_leading("5.10.262-1"), Some(KernelVersion::new(5, 10, 262)));
        assert_eq!(KernelVersion::parse_leading("6.1"), Some(KernelVersion::new(6, 1, 0)));
        assert_eq!(KernelVersion::parse_leading("linux"), None);
        assert_eq!(KernelVersion::parse_leading("6"), None);
    }

    #[test]
    fn debian_proc_version_beats_the_abi_release() {
        let proc_version = "Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14+deb12u1) 12.2.0) #1 SMP PREEMPT_DYNAMIC Debian 6.1.192-2 (2026-10-01)";
        let v = KernelVersion::from_running("6.1.0-56-amd64", proc_version).unwrap();
        assert_eq!(v, KernelVersion::new(6, 1, 192));
    }

    #[test]
    fn a_kernel_without_debian_tag_uses_its_release() {
        let v = KernelVersion::from_running("6.15.2-custom", "Linux version 6.15.2-custom (me@host) #3 SMP").unwrap();
        assert_eq!(v, KernelVersion::new(6, 15, 2));
    }

    #[test]
    fn versions_order_numerically_not_lexically() {
        assert!(KernelVersion::new(6, 12, 0) > KernelVersion::new(6, 1, 192));
        assert!(KernelVersion::new(5, 19, 0).at_least(5, 19));
        assert!(!KernelVersion::new(5, 10, 262).at_least(5, 19));
    }
}
