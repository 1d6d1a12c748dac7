//! The report of one run: kernel, filesystem and every check with its verdict and evidence, as JSON
//! (one file per kernel and filesystem) and as a readable table.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::invariants::Class;
use crate::version::KernelVersion;

/// Marks the reports on a serial line, so the host finds them among anything else written there.
pub const REPORT_BEGIN: &str = "NBDFAULT-REPORT-BEGIN";
pub const REPORT_END: &str = "NBDFAULT-REPORT-END";

/// Finds the reports between each [`REPORT_BEGIN`] and [`REPORT_END`] in what a serial port
/// carried (each run of the suite in the guest writes one block).
pub fn extract_reports(serial: &str) -> Result<Vec<Report>, String> {
    let mut reports = Vec::new();
    let mut rest = serial;
    while let Some(at) = rest.find(REPORT_BEGIN) {
        let start = at + REPORT_BEGIN.len();
        let end = rest[start..].find(REPORT_END).ok_or("the report was cut short (no end marker)")? + start;
        let block: Vec<Report> =
            serde_json::from_str(rest[start..end].trim()).map_err(|e| format!("the report is not valid JSON: {e}"))?;
        reports.extend(block);
        rest = &rest[end + REPORT_END.len()..];
    }
    if reports.is_empty() && !serial.contains(REPORT_BEGIN) {
        return Err("the guest wrote no report (no begin marker)".into());
    }
    Ok(reports)
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Holds,
    Violated,
    NotApplicable,
    Error,
}

impl Verdict {
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Holds => "holds",
            Verdict::Violated => "violated",
            Verdict::NotApplicable => "n/a",
            Verdict::Error => "error",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Stable identifier, `scenario.check`; the rows of the results matrix.
    pub id: String,
    /// What the check asserts, in a sentence.
    pub title: String,
    /// The invariant's number in the catalogue (docs/invariants.md).
    pub invariant: u8,
    pub class: Class,
    pub verdict: Verdict,
    /// Why the verdict is what it is, in a sentence (always set for n/a and error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the catalogue predicts for this kernel and filesystem, where it predicts anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<Verdict>,
    /// Return codes, the bytes seen through each view, kernel log lines.
    #[serde(default)]
    pub evidence: Map<String, Value>,
}

impl CheckResult {
    /// True when the run must fail because of this check: a guaranteed invariant was violated, or
    /// the check could not be carried out.
    pub fn fails_run(&self) -> bool {
        match self.verdict {
            Verdict::Error => true,
            Verdict::Violated => self.class.violation_fails_run(),
            Verdict::Holds | Verdict::NotApplicable => false,
        }
    }

    /// True when the verdict contradicts the catalogue's prediction for this kernel.
    pub fn disagrees_with_research(&self) -> bool {
        matches!(
            (self.expected, self.verdict),
            (Some(expected @ (Verdict::Holds | Verdict::Violated)), actual @ (Verdict::Holds | Verdict::Violated))
                if expected != actual
        )
    }
}

/// The client kernel a report is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    /// `uname -r` of the client.
    pub release: String,
    /// Upstream version, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<KernelVersion>,
    /// The Debian package it came from, when the VM harness booted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package: Option<String>,
}

impl KernelInfo {
    /// The column label in the results matrix: the upstream version, else the release.
    pub fn label(&self) -> String {
        self.version.map(|v| v.to_string()).unwrap_or_else(|| self.release.clone())
    }
}

/// Everything one run of the suite found on one filesystem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub tool_version: String,
    pub kernel: KernelInfo,
    /// `xfs` or `ext4`.
    pub fs: String,
    /// Seconds since the epoch when the run started.
    pub started_unix: u64,
    pub duration_secs: f64,
    pub checks: Vec<CheckResult>,
}

/// Whether `check`, found on filesystem `fs`, makes the run fail: [`CheckResult::fails_run`] on
/// the filesystems the catalogue covers; on btrfs, whose behaviour the catalogue's classes do not
/// describe, only a check that could not be carried out.
pub fn fails_run_on(check: &CheckResult, fs: &str) -> bool {
    if fs == "btrfs" { check.verdict == Verdict::Error } else { check.fails_run() }
}

impl Report {
    /// The checks that make the run fail (see [`fails_run_on`]).
    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| fails_run_on(c, &self.fs))
    }

    /// A fixed-width table, one check per line, for a terminal.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} on {} ({} checks, {:.0} s)",
            self.fs,
            self.kernel.release,
            self.checks.len(),
            self.duration_secs
        );
        let width = self.checks.iter().map(|c| c.id.len()).max().unwrap_or(5).max(5);
        let _ = writeln!(out, "  {:<width$}  inv  class  verdict   note", "check");
        for check in &self.checks {
            let mut note = check.reason.clone().unwrap_or_default();
            if check.disagrees_with_research() {
                let expected = check.expected.map(Verdict::word).unwrap_or_default();
                note = format!("the catalogue expects {expected}. {note}");
            }
            let mark = if fails_run_on(check, &self.fs) { "!" } else { " " };
            let _ = writeln!(
                out,
                "{mark} {:<width$}  {:>3}  {:<5}  {:<8}  {}",
                check.id,
                check.invariant,
                check.class.short(),
                check.verdict.word(),
                note.trim()
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(class: Class, verdict: Verdict, expected: Option<Verdict>) -> CheckResult {
        CheckResult {
            id: "views.cached".into(),
            title: "t".into(),
            invariant: 13,
            class,
            verdict,
            reason: None,
            expected,
            evidence: Map::new(),
        }
    }

    #[test]
    fn a_violated_guarantee_or_an_error_fails_the_run_but_a_known_bug_does_not() {
        assert!(check(Class::Guaranteed, Verdict::Violated, None).fails_run());
        assert!(check(Class::KnownBug, Verdict::Error, None).fails_run());
        assert!(!check(Class::KnownBug, Verdict::Violated, None).fails_run());
        assert!(!check(Class::VersionDependent, Verdict::Violated, None).fails_run());
        assert!(!check(Class::Guaranteed, Verdict::NotApplicable, None).fails_run());
    }

    #[test]
    fn on_btrfs_only_errors_fail_the_run() {
        assert!(!fails_run_on(&check(Class::Guaranteed, Verdict::Violated, None), "btrfs"));
        assert!(fails_run_on(&check(Class::Guaranteed, Verdict::Error, None), "btrfs"));
        assert!(fails_run_on(&check(Class::Guaranteed, Verdict::Violated, None), "xfs"));
    }

    #[test]
    fn disagreement_needs_a_prediction_and_a_definite_verdict() {
        assert!(check(Class::KnownBug, Verdict::Holds, Some(Verdict::Violated)).disagrees_with_research());
        assert!(!check(Class::KnownBug, Verdict::Violated, Some(Verdict::Violated)).disagrees_with_research());
        assert!(!check(Class::KnownBug, Verdict::Error, Some(Verdict::Holds)).disagrees_with_research());
        assert!(!check(Class::KnownBug, Verdict::Holds, None).disagrees_with_research());
    }

    #[test]
    fn table_marks_failing_checks_and_names_the_research_expectation() {
        let report = Report {
            tool: "nbdfault-client-tests".into(),
            tool_version: "0".into(),
            kernel: KernelInfo { release: "6.1.0-56-amd64".into(), version: None, package: None },
            fs: "xfs".into(),
            started_unix: 0,
            duration_secs: 1.0,
            checks: vec![
                check(Class::Guaranteed, Verdict::Violated, None),
                check(Class::KnownBug, Verdict::Holds, Some(Verdict::Violated)),
            ],
        };
        let table = report.table();
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[2].starts_with("! views.cached"), "{table}");
        assert!(lines[3].contains("catalogue expects violated"), "{table}");
        assert_eq!(report.failures().count(), 1);
    }

    #[test]
    fn reports_are_found_between_markers_amid_serial_noise() {
        let report = Report {
            tool: "t".into(),
            tool_version: "0".into(),
            kernel: KernelInfo { release: "r".into(), version: None, package: None },
            fs: "xfs".into(),
            started_unix: 0,
            duration_secs: 0.0,
            checks: vec![],
        };
        let serial = format!(
            "garbage\r\n{REPORT_BEGIN}\r\n{}\r\n{REPORT_END}\r\n",
            serde_json::to_string(&vec![report.clone()]).unwrap()
        );
        assert_eq!(extract_reports(&serial).unwrap(), vec![report.clone()]);
        let two = format!("{serial}more noise{serial}");
        assert_eq!(extract_reports(&two).unwrap(), vec![report.clone(), report]);
        assert!(extract_reports("nothing").unwrap_err().contains("no report"));
        assert!(extract_reports(&format!("{REPORT_BEGIN}[{{")).unwrap_err().contains("cut short"));
    }

    #[test]
    fn report_round_trips_through_json() {
        let report = Report {
            tool: "nbdfault-client-tests".into(),
            tool_version: "0".into(),
            kernel: KernelInfo {
                release: "r".into(),
                version: Some(KernelVersion::new(6, 1, 2)),
                package: Some("p".into()),
            },
            fs: "ext4".into(),
            started_unix: 5,
            duration_secs: 2.5,
            checks: vec![check(Class::VersionDependent, Verdict::NotApplicable, None)],
        };
        let json = serde_json::to_string(&report).unwrap();
        assert_eq!(serde_json::from_str::<Report>(&json).unwrap(), report);
        assert_eq!(report.kernel.label(), "6.1.2");
    }
}
