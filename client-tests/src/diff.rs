//! What changed between two runs: the checks whose verdict differs, per filesystem, with both
//! evidences side by side. Typically two kernels (`diff 6.12.118-xfs.json 7.2.13-xfs.json`, or
//! `vm --kernel 6.12 --kernel 7.2`), but any two reports of the same filesystem compare.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::report::{CheckResult, Report, Verdict};

/// One check whose verdict differs between the two sides (`None`: the side has no such check).
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'a> {
    pub fs: &'a str,
    pub id: &'a str,
    pub before: Option<&'a CheckResult>,
    pub after: Option<&'a CheckResult>,
}

/// Reads reports from a JSON file (one report or an array) or from every `*.json` in a directory.
pub fn load(path: &Path) -> Result<Vec<Report>, String> {
    if path.is_dir() {
        return crate::matrix::load_reports(path).map_err(|e| format!("{}: {e}", path.display()));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str::<Vec<Report>>(&text)
        .or_else(|_| serde_json::from_str::<Report>(&text).map(|r| vec![r]))
        .map_err(|e| format!("{} is not a report of nbdfault-client-tests: {e}", path.display()))
}

/// The reports of one side, one per filesystem; two kernels of one filesystem on one side cannot
/// be paired.
fn by_fs<'a>(side: &'a [Report], name: &str) -> Result<BTreeMap<&'a str, &'a Report>, String> {
    let mut map: BTreeMap<&str, &Report> = BTreeMap::new();
    for r in side {
        if let Some(other) = map.insert(&r.fs, r)
            && other.kernel.release != r.kernel.release
        {
            return Err(format!(
                "{name} holds two {} reports ({} and {}): give one file per side",
                r.fs, other.kernel.release, r.kernel.release
            ));
        }
    }
    Ok(map)
}

/// Every check, filesystem by filesystem, whose verdict is not the same on both sides.
pub fn changes<'a>(before: &'a [Report], after: &'a [Report]) -> Result<Vec<Change<'a>>, String> {
    let (a, b) = (by_fs(before, "the first side")?, by_fs(after, "the second side")?);
    let mut out = Vec::new();
    for (fs, ra) in &a {
        let Some(rb) = b.get(fs) else { continue };
        let mut ids: Vec<&str> = ra.checks.iter().map(|c| c.id.as_str()).collect();
        ids.extend(rb.checks.iter().map(|c| c.id.as_str()).filter(|id| !ra.checks.iter().any(|c| c.id == *id)));
        for id in ids {
            let ca = ra.checks.iter().find(|c| c.id == id);
            let cb = rb.checks.iter().find(|c| c.id == id);
            if ca.map(|c| c.verdict) != cb.map(|c| c.verdict) {
                out.push(Change { fs, id, before: ca, after: cb });
            }
        }
    }
    if a.keys().all(|fs| !b.contains_key(fs)) {
        return Err(format!(
            "the two sides share no filesystem (first: {}; second: {})",
            a.keys().copied().collect::<Vec<_>>().join(", "),
            b.keys().copied().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(out)
}

/// Fields that differ between any two runs (sequence numbers, timings, cookies): not evidence of
/// a change in behaviour.
const RUN_SPECIFIC: &[&str] = &["seq", "time_ns", "cookie", "request_index", "connection", "waited_ns", "delay_ns"];

/// The verdict, reason, expectation and evidence of a check as `(key, value)` pairs; nested
/// evidence is flattened to dotted keys (`views.read.content`, `page_flags[2].uptodate`), and the
/// kernel log is summarised by its length.
fn fields(check: Option<&CheckResult>) -> Vec<(String, String)> {
    let Some(c) = check else { return vec![("verdict".into(), "(no such check in this run)".into())] };
    let mut out = vec![("verdict".to_string(), c.verdict.word().to_string())];
    if let Some(reason) = &c.reason {
        out.push(("reason".into(), reason.clone()));
    }
    if let Some(expected) = c.expected {
        out.push(("catalogue expects".into(), expected.word().into()));
    }
    flatten("", &Value::Object(c.evidence.clone()), &mut out);
    out
}

fn flatten(prefix: &str, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                let name = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
                if key == "kernel_log" {
                    let lines = value.as_array().map_or(0, Vec::len);
                    out.push((name, format!("{lines} line(s)")));
                } else if !RUN_SPECIFIC.contains(&key.as_str()) {
                    flatten(&name, value, out);
                }
            }
        }
        // Element by element, so only the elements that differ show (one page's flags, one
        // kernel line), not the whole array twice.
        Value::Array(items) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, out);
            }
        }
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
        other => out.push((prefix.to_string(), other.to_string())),
    }
}

/// The rows worth reading: every field whose value differs between the sides (a field one side
/// lacks counts as differing), keyed alike so each row holds one field of both runs. Returns the
/// rows and how many fields were the same.
fn differing_rows(before: Option<&CheckResult>, after: Option<&CheckResult>) -> (Vec<(String, String)>, usize) {
    let (a, b) = (fields(before), fields(after));
    let mut keys: Vec<&String> = a.iter().map(|(k, _)| k).collect();
    keys.extend(b.iter().map(|(k, _)| k).filter(|k| !a.iter().any(|(ka, _)| ka == *k)));
    let value = |side: &[(String, String)], key: &str| side.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
    let mut rows = Vec::new();
    let mut same = 0;
    for key in keys {
        let (va, vb) = (value(&a, key), value(&b, key));
        if va == vb {
            same += 1;
            continue;
        }
        let show = |v: Option<String>| v.map(|v| format!("{key}: {v}")).unwrap_or_else(|| format!("{key}: -"));
        rows.push((show(va), show(vb)));
    }
    (rows, same)
}

/// Wraps `line` into pieces of at most `width` characters, continuation lines indented by two.
fn wrap(line: &str, width: usize) -> Vec<String> {
    let width = width.max(8);
    let mut rest: Vec<char> = line.chars().collect();
    let mut out = vec![rest.drain(..width.min(rest.len())).collect::<String>()];
    while !rest.is_empty() {
        let piece: String = rest.drain(..(width - 2).min(rest.len())).collect();
        out.push(format!("  {piece}"));
    }
    out
}

/// Rows of two columns, each cell wrapped to `width`, the columns kept aligned.
fn side_by_side(rows: &[(String, String)], width: usize) -> String {
    let mut out = String::new();
    for (left, right) in rows {
        let (l, r) = (wrap(left, width), wrap(right, width));
        for i in 0..l.len().max(r.len()) {
            let a = l.get(i).map(String::as_str).unwrap_or("");
            let b = r.get(i).map(String::as_str).unwrap_or("");
            let pad = width + 2 - a.chars().count().min(width + 2);
            let _ = writeln!(out, "    {a}{}| {b}", " ".repeat(pad));
        }
    }
    out
}

fn label(side: &[Report], fs: &str) -> String {
    side.iter().find(|r| r.fs == fs).map(|r| r.kernel.label()).unwrap_or_default()
}

/// The changes as text for a terminal `columns` wide: per filesystem a heading naming both
/// kernels and how many checks differ, then each check with both evidences side by side.
pub fn render(before: &[Report], after: &[Report], changes: &[Change], columns: usize) -> String {
    let width = (columns.saturating_sub(8) / 2).max(30);
    let mut out = String::new();
    let mut filesystems: Vec<&str> = before.iter().map(|r| r.fs.as_str()).collect();
    filesystems.retain(|fs| after.iter().any(|r| r.fs == *fs));
    filesystems.dedup();
    for fs in filesystems {
        let (a, b) = (label(before, fs), label(after, fs));
        let total = before.iter().find(|r| r.fs == fs).map(|r| r.checks.len()).unwrap_or(0);
        let here: Vec<&Change> = changes.iter().filter(|c| c.fs == fs).collect();
        let _ = writeln!(out, "{fs}: {a} -> {b}: {} of {total} checks differ", here.len());
        for c in here {
            let spec = c.before.or(c.after).expect("a change has at least one side");
            let word = |v: Option<&CheckResult>| v.map(|c| c.verdict.word()).unwrap_or("absent");
            let _ = writeln!(
                out,
                "  {} (#{} {}): {} -> {}",
                c.id,
                spec.invariant,
                spec.class.short(),
                word(c.before),
                word(c.after)
            );
            let (mut rows, same) = differing_rows(c.before, c.after);
            rows.insert(0, (format!("{a}:"), format!("{b}:")));
            out.push_str(&side_by_side(&rows, width));
            if same > 0 {
                let _ = writeln!(out, "    ({same} more evidence field(s) the same in both runs)");
            }
        }
    }
    out
}

/// The terminal's width from `$COLUMNS`, else 160.
pub fn columns() -> usize {
    std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok()).filter(|c| *c >= 60).unwrap_or(160)
}

/// Whether a verdict change is one a reader should see first: anything from or to `holds`.
pub fn is_flip(c: &Change) -> bool {
    matches!(
        (c.before.map(|c| c.verdict), c.after.map(|c| c.verdict)),
        (Some(Verdict::Holds), Some(Verdict::Violated)) | (Some(Verdict::Violated), Some(Verdict::Holds))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::Class;
    use crate::report::KernelInfo;
    use crate::version::KernelVersion;
    use serde_json::{Map, json};

    fn evidence(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    fn check(id: &str, verdict: Verdict, ev: Map<String, Value>) -> CheckResult {
        CheckResult {
            id: id.into(),
            title: "t".into(),
            invariant: 14,
            class: Class::KnownBug,
            verdict,
            reason: (verdict != Verdict::Holds).then(|| "mmap shows new data but read() returns zeros".into()),
            expected: None,
            evidence: ev,
        }
    }

    fn report(fs: &str, v: KernelVersion, checks: Vec<CheckResult>) -> Report {
        Report {
            tool: "t".into(),
            tool_version: "0".into(),
            kernel: KernelInfo { release: format!("{v}-amd64"), version: Some(v), package: None },
            fs: fs.into(),
            started_unix: 0,
            duration_secs: 1.0,
            checks,
        }
    }

    #[test]
    fn only_checks_whose_verdict_differs_are_listed_with_both_evidences() {
        let old = vec![report(
            "xfs",
            KernelVersion::new(5, 10, 262),
            vec![
                check("views.cached-read-new", Verdict::Holds, Map::new()),
                check(
                    "submission.mmap-read-agree",
                    Verdict::Violated,
                    evidence(&[
                        ("views", json!({"mmap": {"content": "new"}, "read": {"content": "zeros"}})),
                        ("kernel_log", json!(["a", "b"])),
                    ]),
                ),
            ],
        )];
        let new = vec![report(
            "xfs",
            KernelVersion::new(7, 2, 13),
            vec![
                check("views.cached-read-new", Verdict::Holds, Map::new()),
                check(
                    "submission.mmap-read-agree",
                    Verdict::Holds,
                    evidence(&[("views", json!({"mmap": {"content": "new"}, "read": {"content": "new"}}))]),
                ),
                check("fanotify.buffered-write-error", Verdict::Holds, Map::new()),
            ],
        )];
        let found = changes(&old, &new).unwrap();
        let ids: Vec<&str> = found.iter().map(|c| c.id).collect();
        assert_eq!(ids, ["submission.mmap-read-agree", "fanotify.buffered-write-error"]);
        assert!(is_flip(&found[0]));
        assert!(found[1].before.is_none());
        let text = render(&old, &new, &found, 120);
        assert!(text.starts_with("xfs: 5.10.262 -> 7.2.13: 2 of 2 checks differ\n"), "{text}");
        assert!(text.contains("  submission.mmap-read-agree (#14 BUG): violated -> holds\n"), "{text}");
        let row = text.lines().find(|l| l.contains("views.read.content")).unwrap();
        assert!(row.contains("views.read.content: zeros") && row.contains("| views.read.content: new"), "{text}");
        assert!(!text.contains("views.mmap.content"), "the same on both sides: {text}");
        assert!(text.contains("(1 more evidence field(s) the same in both runs)"), "{text}");
        assert!(text.contains("kernel_log: 2 line(s)") && text.contains("| kernel_log: -"), "{text}");
        assert!(text.contains("(no such check in this run)"), "{text}");
        assert!(!text.contains("views.cached-read-new"), "{text}");
    }

    #[test]
    fn sides_without_a_common_filesystem_or_with_two_kernels_are_refused() {
        let x = report("xfs", KernelVersion::new(6, 1, 0), vec![]);
        let e = report("ext4", KernelVersion::new(6, 1, 0), vec![]);
        let one = std::slice::from_ref(&x);
        assert!(changes(one, &[e]).unwrap_err().contains("share no filesystem"));
        let other = report("xfs", KernelVersion::new(6, 12, 0), vec![]);
        assert!(changes(&[x.clone(), other], one).unwrap_err().contains("two xfs reports"));
        assert!(changes(one, one).unwrap().is_empty());
    }

    #[test]
    fn run_specific_fields_are_not_differences() {
        let ev = |seq: u64, errno: &str| {
            evidence(&[("first_failed", json!({"seq": seq, "time_ns": seq * 7, "errno": errno}))])
        };
        let a = check("x.y", Verdict::Violated, ev(3, "EIO"));
        let b = check("x.y", Verdict::Holds, ev(9, "EIO"));
        let (rows, same) = differing_rows(Some(&a), Some(&b));
        assert_eq!(rows[0], ("verdict: violated".to_string(), "verdict: holds".to_string()));
        assert!(rows.iter().all(|(l, _)| !l.contains("seq") && !l.contains("time_ns")), "{rows:?}");
        assert_eq!(same, 1, "errno is the same");
    }

    #[test]
    fn long_evidence_wraps_inside_its_column() {
        let text = side_by_side(&[("x".repeat(70), "short".into())], 30);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].ends_with("| short"), "{text}");
        assert!(lines.iter().all(|l| l.find('|') == lines[0].find('|')), "{text}");
        assert!(lines.iter().all(|l| l[..l.find('|').unwrap()].ends_with(' ')), "a space before every bar: {text}");
    }
}
