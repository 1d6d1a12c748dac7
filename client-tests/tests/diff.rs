//! `nbdfault-client-tests diff` on two real reports: the committed XFS reports of the oldest and
//! the newest kernel of the matrix (client-tests/results/, written by the matrix script).

use std::path::{Path, PathBuf};
use std::process::Command;

use nbdfault_client_tests::report::Report;

/// The committed XFS reports, oldest kernel first.
fn xfs_reports() -> Vec<(PathBuf, Report)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let mut found: Vec<(PathBuf, Report)> = std::fs::read_dir(&dir)
        .expect("client-tests/results holds the matrix's reports")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with("-xfs.json"))
        .map(|p| {
            let report: Report = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p, report)
        })
        .collect();
    found.sort_by_key(|(_, r)| r.kernel.version);
    found
}

#[test]
fn diff_of_the_oldest_and_newest_xfs_reports_shows_the_submission_fix_and_nothing_unchanged() {
    let reports = xfs_reports();
    assert!(reports.len() >= 2, "the matrix commits at least two kernels");
    let (old, new) = (&reports[0], &reports[reports.len() - 1]);
    let out = Command::new(env!("CARGO_BIN_EXE_nbdfault-client-tests"))
        .args(["diff"])
        .arg(&old.0)
        .arg(&new.0)
        .env("COLUMNS", "140")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "verdicts differ, so diff exits 1: {text}");
    let heading = format!("xfs: {} -> {}: ", old.1.kernel.label(), new.1.kernel.label());
    assert!(text.starts_with(&heading), "{text}");
    // XFS stopped invalidating pages on submission errors in 5.19 (e9c3a8e820ed): the oldest
    // kernel of the matrix predates it.
    assert!(text.contains("  submission.mmap-read-agree (#14 BUG): violated -> holds\n"), "{text}");
    // Only differing checks are listed: every listed id has different verdicts in the two files.
    for line in text.lines().filter(|l| l.starts_with("  ") && !l.starts_with("    ")) {
        let id = line.trim().split(' ').next().unwrap();
        let verdict = |r: &Report| r.checks.iter().find(|c| c.id == id).map(|c| c.verdict);
        assert_ne!(verdict(&old.1), verdict(&new.1), "{id} is listed but did not change");
    }
    assert!(!text.contains("views.cached-read-new"), "unchanged checks stay out: {text}");
}

#[test]
fn diff_of_a_report_with_itself_is_empty_and_exits_0() {
    let reports = xfs_reports();
    let path = &reports[0].0;
    let out =
        Command::new(env!("CARGO_BIN_EXE_nbdfault-client-tests")).arg("diff").arg(path).arg(path).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": 0 of "), "{text}");
}
