//! The demo's plain-words account of the overwrite scenario (`views`): what an mmap'd page kept
//! that the disk never got, and what read() returned after eviction.

use std::fmt::Write as _;

use serde_json::Value;

use crate::report::{Report, Verdict};

fn view(ev: &Value, phase: &str, which: &str) -> String {
    let v = &ev[phase][which];
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        return format!("error {e}");
    }
    if let Some(off) = v.get("sigbus_at_mapping_offset") {
        return format!("SIGBUS at offset {off}");
    }
    let content = v.get("content").and_then(Value::as_str).unwrap_or("?");
    let bytes = v.get("first_bytes").and_then(Value::as_str).unwrap_or("");
    format!("\"{bytes}\" ({content})")
}

/// The story of every report that ran the `views` scenario; a hint when none did.
pub fn tell(reports: &[Report]) -> String {
    let mut out = String::new();
    for report in reports {
        let Some(evicted) = report.checks.iter().find(|c| c.id == "views.evicted-read-old") else { continue };
        if evicted.verdict == Verdict::Error {
            let _ = writeln!(
                out,
                "\n{} on {}: the overwrite scenario could not run: {}",
                report.fs,
                report.kernel.release,
                evicted.reason.as_deref().unwrap_or("")
            );
            continue;
        }
        let ev = Value::Object(evicted.evidence.clone());
        let failed = ev["failed_requests"]["count"].as_u64().unwrap_or(0);
        let _ = writeln!(out, "\nWhat happened on {} with Linux {}:", report.fs, report.kernel.label());
        let _ = writeln!(
            out,
            "  1. A 64 KiB file was written with \"old-data|\" and fsynced: that is what the disk holds."
        );
        let _ = writeln!(
            out,
            "  2. A program stored \"NEW-DATA|\" into its first 32 KiB, through an mmap and with write()."
        );
        let _ = writeln!(
            out,
            "  3. Writeback sent those blocks to the server, which failed {failed} write request(s) with EIO, 50 ms late."
        );
        let _ = writeln!(out, "  4. The kernel kept the pages, marked clean, with the data the disk never got:\n");
        let _ = writeln!(
            out,
            "     | when                         | mmap load              | read()                 | server's disk          |"
        );
        let _ = writeln!(
            out,
            "     |------------------------------|------------------------|------------------------|------------------------|"
        );
        let _ = writeln!(
            out,
            "     | after the failed writeback   | {:<22} | {:<22} | {:<22} |",
            short(&view(&ev, "cached", "mmap")),
            short(&view(&ev, "cached", "read")),
            short(&view(&ev, "cached", "disk"))
        );
        let _ = writeln!(
            out,
            "     | after munmap + DONTNEED +    | {:<22} | {:<22} | {:<22} |",
            short(&view(&ev, "evicted", "mmap")),
            short(&view(&ev, "evicted", "read")),
            short(&view(&ev, "evicted", "disk"))
        );
        let _ = writeln!(
            out,
            "     |   drop_caches (evicted)      |                        |                        |                        |\n"
        );
        let teleported = ev["cached"]["read"]["content"] == "new" && ev["evicted"]["read"]["content"] == "old";
        if teleported {
            let _ = writeln!(
                out,
                "  5. So the mmap'd page (and read()) showed NEW-DATA that never reached storage, and once the page"
            );
            let _ = writeln!(
                out,
                "     was evicted read() went back to old-data: the write \"teleported backwards\", silently."
            );
        } else {
            let _ = writeln!(out, "  5. This kernel did not show the textbook sequence; see the report's evidence.");
        }
        if let Some(fsync) = report.checks.iter().find(|c| c.id == "fsync.writer") {
            let r = fsync.evidence.get("returned").and_then(Value::as_str).unwrap_or("?");
            let _ = writeln!(
                out,
                "  6. fsync on the writer returned {r} once; the next fsync returned 0, though the data is still lost."
            );
        }
    }
    for report in reports {
        tell_submission(report, &mut out);
    }
    if out.is_empty() {
        out.push_str("(no report ran the views scenario: run with --only views to see the story)\n");
    }
    out
}

/// The submission scenario, when it ran and reached a verdict: the 2020 thread's own state.
fn tell_submission(report: &Report, out: &mut String) {
    let Some(agree) = report.checks.iter().find(|c| c.id == "submission.mmap-read-agree") else { return };
    let ev = Value::Object(agree.evidence.clone());
    let _ = writeln!(
        out,
        "\nWhen writeback fails before the data is even sent ({} on Linux {}):",
        report.fs,
        report.kernel.label()
    );
    let _ = writeln!(
        out,
        "  A new file got \"NEW-DATA|\" with write() and was mapped; then every read the server got failed,"
    );
    let _ = writeln!(
        out,
        "  so block allocation could not read its metadata and writeback gave up before sending the data."
    );
    match agree.verdict {
        Verdict::Violated => {
            let _ = writeln!(
                out,
                "  The page stayed mapped but stopped being Uptodate: the mmap load shows {}, read() shows {}.",
                short(&view(&ev, "views", "mmap")),
                short(&view(&ev, "views", "read"))
            );
            if let Some(warn) =
                report.checks.iter().find(|c| c.id == "submission.store-no-warning" && c.verdict == Verdict::Violated)
            {
                let line = warn.evidence.get("warnings").and_then(|w| w.get(0)).and_then(Value::as_str).unwrap_or("");
                let _ = writeln!(out, "  A store into another such page made the kernel warn: {line}");
            }
            let _ = writeln!(
                out,
                "  This is the state the 2020 thread \"iomap: Handle I/O errors gracefully in page_mkwrite\" is about."
            );
        }
        Verdict::Holds => {
            let _ = writeln!(
                out,
                "  The page stayed Uptodate, so the mmap load and read() agree ({}).",
                view(&ev, "views", "read")
            );
        }
        _ => {
            let _ = writeln!(out, "  Not reached here: {}", agree.reason.as_deref().unwrap_or(""));
        }
    }
}

fn short(s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() > 22 { format!("{}…", chars[..21].iter().collect::<String>()) } else { s.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invariants::Class;
    use crate::report::{CheckResult, KernelInfo};
    use serde_json::json;

    #[test]
    fn story_tells_the_teleport_when_the_views_show_it() {
        let evidence = json!({
            "failed_requests": { "count": 2 },
            "cached": { "mmap": { "content": "new", "first_bytes": "NEW-DATA|NEW" }, "read": { "content": "new", "first_bytes": "NEW-DATA|NEW" }, "disk": { "content": "old", "first_bytes": "old-data|old" } },
            "evicted": { "mmap": { "content": "old", "first_bytes": "old-data|old" }, "read": { "content": "old", "first_bytes": "old-data|old" }, "disk": { "content": "old", "first_bytes": "old-data|old" } },
        });
        let report = Report {
            tool: "t".into(),
            tool_version: "0".into(),
            kernel: KernelInfo { release: "6.1.0-56-amd64".into(), version: None, package: None },
            fs: "xfs".into(),
            started_unix: 0,
            duration_secs: 1.0,
            checks: vec![CheckResult {
                id: "views.evicted-read-old".into(),
                title: "t".into(),
                invariant: 17,
                class: Class::Guaranteed,
                verdict: Verdict::Holds,
                reason: None,
                expected: None,
                evidence: evidence.as_object().unwrap().clone(),
            }],
        };
        let story = tell(&[report]);
        assert!(story.contains("failed 2 write request(s)"), "{story}");
        assert!(story.contains("teleported backwards"), "{story}");
        assert!(story.contains("\"NEW-DATA|NEW\" (new)"), "{story}");
        assert!(tell(&[]).contains("--only views"));
    }
}
