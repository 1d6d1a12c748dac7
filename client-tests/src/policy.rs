//! The policies the suite puts on the export, written in the policy language of issue 3: one rule
//! per byte range (plain `START..END` byte offsets), armed by a named trigger, failing with EIO after
//! a delay so that the client kernel meets the error in its completion path.

use std::fmt::Write as _;
use std::time::Duration;

/// Which NBD requests a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    /// NBD_CMD_FLUSH: the kernel's cache flush (REQ_PREFLUSH, blkdev_issue_flush). Has no range.
    Flush,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
        }
    }
}

/// A policy that fails one kind of request, in some byte ranges of the export (or everywhere),
/// once a trigger is armed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailPolicy {
    /// Rule name prefix; the fault log names the rule that fired.
    pub name: String,
    pub op: Op,
    /// Half-open device byte ranges; empty means every request of `op`.
    pub ranges: Vec<(u64, u64)>,
    pub trigger: String,
    /// How long the server holds the error reply. Non-zero makes the failure asynchronous.
    pub delay: Duration,
    /// Only requests whose FUA flag is set (`Some(true)`) or clear (`Some(false)`).
    pub fua: Option<bool>,
}

impl FailPolicy {
    /// The policy as YAML, ready for `PUT /v1/exports/{name}/policy`.
    pub fn to_yaml(&self) -> String {
        let mut out = String::from("# written by nbdfault-client-tests\nseed: 1\nrules:\n");
        let ranges: Vec<Option<(u64, u64)>> =
            if self.ranges.is_empty() { vec![None] } else { self.ranges.iter().copied().map(Some).collect() };
        for (i, range) in ranges.iter().enumerate() {
            let _ = writeln!(out, "  - name: {}-{i}", self.name);
            let _ = writeln!(out, "    when:");
            let _ = writeln!(out, "      op: {}", self.op.name());
            if let Some((start, end)) = range {
                let _ = writeln!(out, "      range: {start}..{end}");
            }
            if let Some(fua) = self.fua {
                let _ = writeln!(out, "      fua: {fua}");
            }
            let _ = writeln!(out, "      armed_by: {}", self.trigger);
            let _ = writeln!(out, "    then:");
            let _ = writeln!(out, "      error: EIO");
            if !self.delay.is_zero() {
                let _ = writeln!(out, "      delay: {}ms", self.delay.as_millis());
            }
        }
        out
    }
}

/// Merges overlapping or touching ranges and sorts them, so a policy has one rule per run of blocks.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|(s, e)| e > s);
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_has_one_armed_rule_per_range_with_error_and_delay() {
        let policy = FailPolicy {
            name: "fail-data".into(),
            op: Op::Write,
            ranges: vec![(4096, 8192), (1 << 20, 2 << 20)],
            trigger: "go-1".into(),
            delay: Duration::from_millis(50),
            fua: None,
        };
        let yaml = policy.to_yaml();
        assert_eq!(yaml.matches("- name: fail-data-").count(), 2);
        assert!(yaml.contains("      range: 4096..8192\n"));
        assert!(yaml.contains("      range: 1048576..2097152\n"));
        assert_eq!(yaml.matches("armed_by: go-1").count(), 2);
        assert_eq!(yaml.matches("delay: 50ms").count(), 2);
        assert!(yaml.contains("op: write"));
    }

    #[test]
    fn a_policy_without_ranges_matches_every_request_and_zero_delay_is_omitted() {
        let policy = FailPolicy {
            name: "r".into(),
            op: Op::Read,
            ranges: vec![],
            trigger: "t".into(),
            delay: Duration::ZERO,
            fua: None,
        };
        let yaml = policy.to_yaml();
        assert!(!yaml.contains("range:"));
        assert!(!yaml.contains("delay:"));
        assert!(yaml.contains("op: read"));
    }

    #[test]
    fn the_policy_language_accepts_what_the_suite_writes() {
        for policy in [
            FailPolicy {
                name: "fail-file-data".into(),
                op: Op::Write,
                ranges: vec![(98304, 114688), (1 << 20, 2 << 20)],
                trigger: "go-3".into(),
                delay: Duration::from_millis(50),
                fua: None,
            },
            FailPolicy {
                name: "fail-every-read".into(),
                op: Op::Read,
                ranges: vec![],
                trigger: "go-1".into(),
                delay: Duration::ZERO,
                fua: None,
            },
            FailPolicy {
                name: "fail-flush".into(),
                op: Op::Flush,
                ranges: vec![],
                trigger: "go-2".into(),
                delay: Duration::from_millis(50),
                fua: None,
            },
            FailPolicy {
                name: "fail-fua-writes".into(),
                op: Op::Write,
                ranges: vec![],
                trigger: "go-4".into(),
                delay: Duration::from_millis(50),
                fua: Some(true),
            },
        ] {
            let yaml = policy.to_yaml();
            let parsed = nbdfault_policies::Policy::from_yaml(&yaml, "suite");
            assert!(parsed.is_ok(), "{yaml}\n{:?}", parsed.err());
            let names: Vec<String> = parsed.unwrap().rule_names().map(str::to_string).collect();
            assert_eq!(names.len(), policy.ranges.len().max(1));
        }
    }

    #[test]
    fn merge_ranges_joins_touching_and_overlapping_runs() {
        assert_eq!(merge_ranges(vec![(8, 12), (0, 4), (4, 6), (10, 20), (30, 30)]), vec![(0, 6), (8, 20)]);
    }
}
