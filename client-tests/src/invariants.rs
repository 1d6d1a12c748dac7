//! The invariants of the catalogue (`docs/invariants.md`) that the suite checks.
//!
//! The wording is shortened; the number and the class are the catalogue's, so a reader can go
//! from any check in a report to the section that explains it.

use serde::{Deserialize, Serialize};

/// How firmly the catalogue expects an invariant to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Class {
    /// Documented and long stable on both filesystems (while the filesystem is not shut down).
    #[serde(rename = "G")]
    Guaranteed,
    /// Known to differ between kernel versions or configurations.
    #[serde(rename = "VD")]
    VersionDependent,
    /// Depends on whether the log or journal failed too.
    #[serde(rename = "SETUP")]
    SetupDependent,
    /// The 2020 thread's bug class (a mapped page that is not Uptodate) or a closely related defect.
    #[serde(rename = "BUG")]
    KnownBug,
}

impl Class {
    /// The short name the catalogue uses.
    pub fn short(self) -> &'static str {
        match self {
            Class::Guaranteed => "G",
            Class::VersionDependent => "VD",
            Class::SetupDependent => "SETUP",
            Class::KnownBug => "BUG",
        }
    }

    /// Whether a violation of an invariant of this class means the kernel broke a promise, so the
    /// run must fail.
    pub fn violation_fails_run(self) -> bool {
        self == Class::Guaranteed
    }
}

/// One invariant of the catalogue.
#[derive(Debug, Clone, Copy)]
pub struct Invariant {
    pub number: u8,
    pub class: Class,
    pub text: &'static str,
}

/// The invariants the suite tests, in the catalogue's order.
pub const INVARIANTS: &[Invariant] = &[
    inv(
        1,
        Class::Guaranteed,
        "fsync/fdatasync on every file description open before the error returns EIO at least once",
    ),
    inv(2, Class::Guaranteed, "...and exactly once: the next call on the same description returns 0"),
    inv(3, Class::Guaranteed, "dup()ed descriptors share one report; separately opened ones each get one"),
    inv(4, Class::VersionDependent, "a descriptor opened after the error, before anyone saw it, gets EIO once"),
    inv(5, Class::Guaranteed, "a descriptor opened after the error was reported elsewhere gets 0"),
    inv(
        6,
        Class::Guaranteed,
        "an error can be lost if the inode is evicted before anyone reports it (a documented limitation)",
    ),
    inv(
        7,
        Class::Guaranteed,
        "msync(MS_SYNC) reports once through the mapping's description; MS_ASYNC reports nothing",
    ),
    inv(8, Class::Guaranteed, "sync_file_range with a WAIT flag reports and consumes; WRITE alone does not report"),
    inv(9, Class::VersionDependent, "syncfs reports once per descriptor (>= 5.8)"),
    inv(10, Class::Guaranteed, "sync() returns 0 and consumes no descriptor's report"),
    inv(11, Class::Guaranteed, "close() returns 0"),
    inv(12, Class::Guaranteed, "two errors with no fsync between them give one report"),
    inv(13, Class::Guaranteed, "after a completion error the page stays Uptodate: read() returns the unpersisted data"),
    inv(14, Class::Guaranteed, "mmap loads and read() agree while the page is cached (BUG after submission errors)"),
    inv(
        15,
        Class::Guaranteed,
        "the failed page is clean: no retry; a later successful fsync does not mean the data is on disk",
    ),
    inv(16, Class::Guaranteed, "POSIX_FADV_DONTNEED and drop_caches do not evict mapped pages"),
    inv(17, Class::Guaranteed, "after eviction, overwritten blocks read back as the old on-disk data"),
    inv(
        18,
        Class::VersionDependent,
        "after eviction, a failed write into unwritten extents reads zeros, not stale blocks",
    ),
    inv(19, Class::VersionDependent, "after remount, a failed append leaves the last persisted size"),
    inv(
        20,
        Class::Guaranteed,
        "a store to a cached page after a completion error redirties it; the next writeback retries",
    ),
    inv(21, Class::SetupDependent, "a store on a shut-down XFS raises SIGBUS; loads of mapped pages still work"),
    inv(22, Class::KnownBug, "a store to a mapped page that is not Uptodate warns and redirties (no SIGBUS)"),
    inv(23, Class::Guaranteed, "a read fault on an uncached page whose disk read fails raises SIGBUS"),
    inv(
        24,
        Class::KnownBug,
        "a partial write() into a page invalidated by a submission error reverts the rest of the page",
    ),
    inv(25, Class::Guaranteed, "a data write error does not shut XFS down or trigger ext4's errors= handling"),
    inv(26, Class::Guaranteed, "a log or journal write error shuts XFS down or aborts the ext4 journal at once"),
    inv(
        27,
        Class::Guaranteed,
        "XFS metadata write errors follow /sys/fs/xfs/<dev>/error/metadata/EIO/*; fail_at_unmount=1 lets unmount finish",
    ),
    inv(28, Class::SetupDependent, "after an ext4 journal abort, remaining dirty pages stay dirty and uptodate"),
    inv(
        29,
        Class::VersionDependent,
        "fanotify FAN_FS_ERROR reports buffered write errors of iomap filesystems (>= 7.0)",
    ),
    inv(30, Class::Guaranteed, "the kernel logs each writeback error"),
];

const fn inv(number: u8, class: Class, text: &'static str) -> Invariant {
    Invariant { number, class, text }
}

/// The invariant with this number, if the suite tests it.
pub fn invariant(number: u8) -> Option<&'static Invariant> {
    INVARIANTS.iter().find(|i| i.number == number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariants_are_listed_once_in_research_order() {
        let numbers: Vec<u8> = INVARIANTS.iter().map(|i| i.number).collect();
        let mut sorted = numbers.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(numbers, sorted);
    }

    #[test]
    fn only_guaranteed_violations_fail_a_run() {
        assert!(Class::Guaranteed.violation_fails_run());
        assert!(!Class::VersionDependent.violation_fails_run());
        assert!(!Class::SetupDependent.violation_fails_run());
        assert!(!Class::KnownBug.violation_fails_run());
    }

    /// docs/invariants.md is the catalogue in words: every invariant the suite tests has its
    /// section there, with its class, and names every check that tests it.
    #[test]
    fn the_catalogue_document_names_every_check_under_its_invariant() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/invariants.md");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let section = |number: u8| -> &str {
            let heading = format!("\n### {number}. ");
            let start = text.find(&heading).unwrap_or_else(|| panic!("docs/invariants.md has no section {number}"));
            let rest = &text[start + 1..];
            &rest[..rest[4..].find("\n### ").map_or(rest.len(), |end| end + 4)]
        };
        for invariant in INVARIANTS {
            let heading = section(invariant.number).lines().next().unwrap();
            assert!(
                heading.contains(&format!("({}", invariant.class.short()))
                    || heading.contains(&format!("{})", invariant.class.short()))
                    || heading.contains(&format!("/{}", invariant.class.short())),
                "docs/invariants.md: section {} should give the class {}: {heading}",
                invariant.number,
                invariant.class.short()
            );
        }
        for scenario in crate::suite::scenarios() {
            for check in scenario.checks {
                let checked_by = section(check.invariant).split("Checked by:").nth(1).unwrap_or_default();
                assert!(
                    checked_by.contains(&format!("`{}`", check.id)),
                    "docs/invariants.md: section {} should name the check `{}` under \"Checked by:\"",
                    check.invariant,
                    check.id
                );
            }
        }
    }

    #[test]
    fn class_serializes_as_the_research_abbreviation() {
        assert_eq!(serde_json::to_string(&Class::KnownBug).unwrap(), "\"BUG\"");
        assert_eq!(invariant(18).unwrap().class.short(), "VD");
    }
}
