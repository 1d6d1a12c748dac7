//! Compares the verdicts of a run of the matrix with the committed ones, cell by cell, so a
//! kernel update that changes behaviour is noticed instead of silently rewriting the results.
//!
//! A cell is (filesystem, kernel series, check). The kernel series is `major.minor` (`6.1`), so a
//! Debian update from 6.1.192 to 6.1.193 compares with the 6.1 column; the exact versions are
//! shown. When, for one filesystem, exactly one committed column and one column of the run are
//! left without a partner, they are the same column whose kernel moved to another series (sid
//! going from 7.2 to 7.3) and are compared too. Only verdicts count: timings, evidence and reasons
//! change on every run. Kernels, filesystems and checks are whatever the reports hold: a kernel
//! column or a check on one side only is reported as such.

use std::collections::BTreeMap;
use std::fmt;

use crate::report::{Report, Verdict};

/// One difference between the committed results and a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    /// The same cell has another verdict.
    Verdict { fs: String, series: String, kernels: (String, String), check: String, old: Verdict, new: Verdict },
    /// A check that is in one side's report for this kernel and filesystem, not in the other's.
    Check { fs: String, series: String, check: String, side: Side, verdict: Verdict },
    /// A kernel and filesystem with a report on one side only.
    Kernel { fs: String, series: String, kernel: String, side: Side },
}

/// Where something was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    CommittedOnly,
    RunOnly,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Verdict { fs, series, kernels, check, old, new } => {
                let kernel = if kernels.0 == kernels.1 {
                    kernels.0.clone()
                } else {
                    format!("{series} ({} committed, {} run)", kernels.0, kernels.1)
                };
                write!(f, "kernel {kernel}, {fs}, `{check}`: {} -> {}", old.word(), new.word())
            }
            Difference::Check { fs, series, check, side: Side::RunOnly, verdict } => write!(
                f,
                "kernel {series}, {fs}, `{check}`: a check the committed results do not have (verdict {})",
                verdict.word()
            ),
            Difference::Check { fs, series, check, side: Side::CommittedOnly, verdict } => write!(
                f,
                "kernel {series}, {fs}, `{check}`: committed (verdict {}) but not in this run",
                verdict.word()
            ),
            Difference::Kernel { fs, series, kernel, side: Side::RunOnly } => {
                write!(
                    f,
                    "kernel {series} ({kernel}), {fs}: in this run, but the committed results have no {series} column"
                )
            }
            Difference::Kernel { fs, series, kernel, side: Side::CommittedOnly } => {
                write!(f, "kernel {series} ({kernel}), {fs}: committed, but this run did not test it")
            }
        }
    }
}

/// What a comparison found.
#[derive(Debug, Default)]
pub struct Comparison {
    /// Differences that mean the committed results are no longer what the kernels do.
    pub differences: Vec<Difference>,
    /// Worth saying, not a failure: kernel updates with unchanged verdicts, kernels a partial run
    /// left out.
    pub notes: Vec<String>,
}

/// The column a report belongs to: `major.minor` when the version is known, else the release.
pub fn series(report: &Report) -> String {
    match report.kernel.version {
        Some(version) => format!("{}.{}", version.major, version.minor),
        None => report.kernel.release.clone(),
    }
}

type Key = (String, String);

fn index<'a>(reports: &'a [Report], side: &str) -> Result<BTreeMap<Key, &'a Report>, String> {
    let mut by_cell = BTreeMap::new();
    for report in reports {
        let key = (report.fs.clone(), series(report));
        if let Some(other) = by_cell.insert(key.clone(), report) {
            return Err(format!(
                "the {side} results hold two reports for {} on kernel {} ({} and {}): keep one",
                key.0,
                key.1,
                other.kernel.label(),
                report.kernel.label()
            ));
        }
    }
    Ok(by_cell)
}

/// Compares verdicts cell by cell. With `partial`, the run tested some kernels only on purpose:
/// committed kernels it left out are notes, not differences.
pub fn compare(committed: &[Report], run: &[Report], partial: bool) -> Result<Comparison, String> {
    let committed = index(committed, "committed")?;
    let run = index(run, "run's")?;
    let mut out = Comparison::default();
    let mut pairs: Vec<(&Key, &Report, &Report)> = Vec::new();
    let mut committed_only: Vec<(&Key, &Report)> = Vec::new();
    for (key, old) in &committed {
        match run.get(key) {
            Some(new) => pairs.push((key, old, new)),
            None => committed_only.push((key, old)),
        }
    }
    let mut run_only: Vec<(&Key, &Report)> =
        run.iter().filter(|(key, _)| !committed.contains_key(*key)).map(|(key, report)| (key, *report)).collect();
    // One column left over on each side, for one filesystem: the kernel moved to a new series.
    if !partial {
        let filesystems: Vec<&String> = committed_only.iter().map(|(key, _)| &key.0).collect();
        for fs in filesystems {
            let old: Vec<usize> = (0..committed_only.len()).filter(|&i| &committed_only[i].0.0 == fs).collect();
            let new: Vec<usize> = (0..run_only.len()).filter(|&i| &run_only[i].0.0 == fs).collect();
            if let ([o], [n]) = (old.as_slice(), new.as_slice()) {
                let (key, old_report) = committed_only.remove(*o);
                let (_, new_report) = run_only.remove(*n);
                pairs.push((key, old_report, new_report));
            }
        }
    }
    for (key, old, new) in pairs {
        let (fs, committed_series) = key;
        let run_series = series(new);
        let series =
            if run_series == *committed_series { run_series } else { format!("{committed_series} -> {run_series}") };
        let kernels = (old.kernel.label(), new.kernel.label());
        let before = out.differences.len();
        for check in &old.checks {
            match new.checks.iter().find(|c| c.id == check.id) {
                Some(now) if now.verdict != check.verdict => out.differences.push(Difference::Verdict {
                    fs: fs.clone(),
                    series: series.clone(),
                    kernels: kernels.clone(),
                    check: check.id.clone(),
                    old: check.verdict,
                    new: now.verdict,
                }),
                Some(_) => {}
                None => out.differences.push(Difference::Check {
                    fs: fs.clone(),
                    series: series.clone(),
                    check: check.id.clone(),
                    side: Side::CommittedOnly,
                    verdict: check.verdict,
                }),
            }
        }
        for check in new.checks.iter().filter(|c| !old.checks.iter().any(|o| o.id == c.id)) {
            out.differences.push(Difference::Check {
                fs: fs.clone(),
                series: series.clone(),
                check: check.id.clone(),
                side: Side::RunOnly,
                verdict: check.verdict,
            });
        }
        if kernels.0 != kernels.1 && out.differences.len() == before {
            out.notes.push(format!("kernel {series}, {fs}: {} -> {}, every verdict unchanged", kernels.0, kernels.1));
        }
    }
    for ((fs, series), old) in committed_only {
        let kernel = old.kernel.label();
        if partial {
            out.notes.push(format!("kernel {series} ({kernel}), {fs}: not run this time; its committed results stay"));
        } else {
            out.differences.push(Difference::Kernel {
                fs: fs.clone(),
                series: series.clone(),
                kernel,
                side: Side::CommittedOnly,
            });
        }
    }
    for ((fs, series), new) in run_only {
        out.differences.push(Difference::Kernel {
            fs: fs.clone(),
            series: series.clone(),
            kernel: new.kernel.label(),
            side: Side::RunOnly,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::load_reports;
    use crate::version::KernelVersion;

    /// The committed reports: real runs of the suite on real kernels.
    fn committed() -> Vec<Report> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
        let reports = load_reports(&dir).unwrap();
        assert!(reports.len() >= 2, "the committed reports are in {}", dir.display());
        reports
    }

    #[test]
    fn the_same_reports_have_no_differences_even_with_other_timings_evidence_and_reasons() {
        let committed = committed();
        let mut run = committed.clone();
        for report in &mut run {
            report.duration_secs += 17.0;
            report.started_unix += 86400;
            for check in &mut report.checks {
                check.evidence.insert("elapsed_ms".into(), serde_json::json!(123));
                check.reason = Some("another wording".into());
            }
        }
        let comparison = compare(&committed, &run, false).unwrap();
        assert_eq!(comparison.differences, vec![]);
        assert_eq!(comparison.notes, Vec::<String>::new());
    }

    #[test]
    fn a_changed_verdict_names_its_kernel_filesystem_check_and_both_verdicts() {
        let committed = committed();
        let mut run = committed.clone();
        let (fs, series, check, old) =
            (run[0].fs.clone(), super::series(&run[0]), run[0].checks[0].id.clone(), run[0].checks[0].verdict);
        run[0].checks[0].verdict = if old == Verdict::Holds { Verdict::Violated } else { Verdict::Holds };
        let comparison = compare(&committed, &run, false).unwrap();
        assert_eq!(comparison.differences.len(), 1, "{:?}", comparison.differences);
        let Difference::Verdict { fs: f, series: s, check: c, old: o, new, .. } = &comparison.differences[0] else {
            panic!("{:?}", comparison.differences)
        };
        assert_eq!((f, s, c, *o), (&fs, &series, &check, old));
        assert_ne!(*new, old);
        let shown = comparison.differences[0].to_string();
        let label = run[0].kernel.label();
        assert_eq!(shown, format!("kernel {label}, {fs}, `{check}`: {} -> {}", old.word(), new.word()));
    }

    #[test]
    fn a_kernel_update_with_the_same_verdicts_is_a_note_and_with_a_changed_one_shows_both_versions() {
        let committed = committed();
        let mut run = committed.clone();
        let version = run[0].kernel.version.expect("Debian kernels have a version");
        run[0].kernel.version = Some(KernelVersion::new(version.major, version.minor, version.patch + 1));
        let comparison = compare(&committed, &run, false).unwrap();
        assert_eq!(comparison.differences, vec![]);
        assert_eq!(comparison.notes.len(), 1);
        assert!(comparison.notes[0].contains("every verdict unchanged"), "{:?}", comparison.notes);

        run[0].checks[0].verdict = Verdict::Error;
        let shown = compare(&committed, &run, false).unwrap().differences[0].to_string();
        assert!(shown.contains(&format!("({} committed, {} run)", version, run[0].kernel.label())), "{shown}");
    }

    #[test]
    fn checks_and_kernels_on_one_side_only_are_differences_unless_the_run_is_partial() {
        let committed = committed();
        let mut run = committed.clone();
        let removed = run[0].checks.remove(0).id;
        let mut added = run[0].checks[0].clone();
        added.id = "new_scenario.new_check".into();
        run[0].checks.push(added);
        let mut new_kernel = run[0].clone();
        new_kernel.kernel.version = Some(KernelVersion::new(8, 9, 1));
        new_kernel.kernel.release = "8.9.1+deb15-amd64".into();
        run.push(new_kernel);
        // A column of the other filesystem goes, so no pair of leftovers is formed.
        let other_fs = run.iter().position(|r| r.fs != run[0].fs).expect("reports of two filesystems");
        let dropped = run.remove(other_fs);

        let shown: Vec<String> =
            compare(&committed, &run, false).unwrap().differences.iter().map(|d| d.to_string()).collect();
        assert!(
            shown.iter().any(|d| d.contains(&format!("`{removed}`: committed")) && d.contains("not in this run")),
            "{shown:?}"
        );
        assert!(
            shown.iter().any(|d| d.contains("`new_scenario.new_check`: a check the committed results do not have")),
            "{shown:?}"
        );
        assert!(shown.iter().any(|d| d.contains("kernel 8.9 (8.9.1)") && d.contains("no 8.9 column")), "{shown:?}");
        let dropped_series = series(&dropped);
        assert!(
            shown
                .iter()
                .any(|d| d.contains(&format!("kernel {dropped_series}")) && d.contains("this run did not test it")),
            "{shown:?}"
        );

        let partial = compare(&committed, &run, true).unwrap();
        assert!(!partial.differences.iter().any(|d| matches!(d, Difference::Kernel { side: Side::CommittedOnly, .. })));
        assert!(partial.notes.iter().any(|n| n.contains("not run this time")), "{:?}", partial.notes);
    }

    #[test]
    fn a_column_whose_kernel_moved_to_a_new_series_is_compared_with_its_old_self() {
        let committed = committed();
        let mut run = committed.clone();
        let newest = (0..run.len()).max_by_key(|&i| run[i].kernel.version).unwrap();
        let version = run[newest].kernel.version.unwrap();
        run[newest].kernel.version = Some(KernelVersion::new(version.major, version.minor + 1, 1));
        let comparison = compare(&committed, &run, false).unwrap();
        assert_eq!(comparison.differences, vec![]);
        let moved = format!("{}.{} -> {}.{}", version.major, version.minor, version.major, version.minor + 1);
        assert!(
            comparison.notes.iter().any(|n| n.contains(&moved) && n.contains("unchanged")),
            "{:?}",
            comparison.notes
        );

        run[newest].checks[0].verdict = Verdict::Error;
        let shown = compare(&committed, &run, false).unwrap().differences[0].to_string();
        assert!(shown.contains(&moved) && shown.ends_with("-> error"), "{shown}");
    }

    #[test]
    fn two_reports_for_one_cell_are_refused() {
        let committed = committed();
        let mut run = committed.clone();
        run.push(run[0].clone());
        let error = compare(&committed, &run, false).unwrap_err();
        assert!(error.contains("two reports for"), "{error}");
    }
}
