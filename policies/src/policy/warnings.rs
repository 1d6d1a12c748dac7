//! What is legal in a policy but most likely not what its author meant.

use std::collections::HashMap;
use std::fmt;

use super::Policy;
use super::compiled::{Nth, Rule};

impl Policy {
    /// What is legal but most likely not what the author meant: rules that can never decide,
    /// stalls that never hold. `nbdfault policy check` prints these after a successful check.
    ///
    /// Linear in the number of rules (operations are a 7-bit set, so "an earlier rule that
    /// decides every request of these operations" is a lookup in a table of 128 entries), plus
    /// one pass over the source to place the warnings.
    pub fn warnings(&self) -> Vec<PolicyWarning> {
        let rules = &self.compiled.rules[self.compiled.scheduled..];
        let mut found: Vec<(&Rule, String, String)> = Vec::new();
        // For each set of operations, the first rule that decides every request of exactly them.
        let mut first_always: [Option<usize>; 128] = [None; 128];
        for (position, rule) in rules.iter().enumerate() {
            let earlier = (0..128usize)
                .filter(|&ops| ops as u8 & rule.ops == rule.ops)
                .filter_map(|ops| first_always[ops])
                .min()
                .map(|earlier| &rules[earlier]);
            if let Some(earlier) = earlier
                && rule.requests.is_none()
            {
                found.push((
                    rule,
                    format!(
                        "rule `{}` never decides a request: `{}` above it decides every request of the operations it matches",
                        rule.name, earlier.name
                    ),
                    format!("move `{}` above `{}`, or narrow `{}`'s `when`", rule.name, earlier.name, earlier.name),
                ));
            }
            if rule.always_fires() && first_always[usize::from(rule.ops & 127)].is_none() {
                first_always[usize::from(rule.ops & 127)] = Some(position);
            }
            if rule.threshold == Some(0) {
                found.push((
                    rule,
                    format!("rule `{}` has probability 0, so it never fires", rule.name),
                    "raise the probability, or remove the rule".to_string(),
                ));
            }
            if let Some(until) = rule.outcome.power_cut.as_ref().and_then(|cut| cut.until.as_ref())
                && rule.armed_by.iter().any(|&id| self.compiled.triggers[id] == *until)
            {
                found.push((
                    rule,
                    format!("rule `{}` keeps the power off until `{until}` is armed, but it only cuts while `{until}` is armed, so the power is back at once", rule.name),
                    "power on with another trigger than the one in `armed_by`, such as `power-on`, or write `power_cut: true`".to_string(),
                ));
            }
            if let Some((message, fix)) = counting_warning(rule, &self.compiled.triggers) {
                found.push((rule, message, fix));
            }
            if let Some((trigger, _)) = &rule.outcome.stall
                && rule.armed_by.iter().any(|&id| self.compiled.triggers[id] == *trigger)
            {
                found.push((
                    rule,
                    format!("rule `{}` stalls until `{trigger}` is armed, but it is only active while `{trigger}` is armed, so it never holds a request", rule.name),
                    format!("stall on another trigger than the one in `armed_by`, such as `release-{trigger}`"),
                ));
            }
        }
        if found.is_empty() {
            return Vec::new();
        }
        let places = name_places(&self.source);
        found
            .into_iter()
            .map(|(rule, message, fix)| {
                let (line, column) = places.get(&*rule.name).copied().unwrap_or((1, 1));
                PolicyWarning { origin: self.origin.clone(), line, column, message, fix }
            })
            .collect()
    }
}

/// What is ambiguous about what a rule's occurrence counts count over, if anything.
fn counting_warning(rule: &Rule, triggers: &[std::sync::Arc<str>]) -> Option<(String, String)> {
    let counted = rule.nth != Nth::default() || rule.limit.is_some() || rule.threshold.is_some();
    let name = &rule.name;
    if !counted {
        return rule.counting.explicit.then(|| {
            (
                format!("rule `{name}` has `count`, but no `nth`, `limit` or `probability` to count for"),
                "remove `count`, or add the `nth`, `limit` or `probability` it was meant for".to_string(),
            )
        });
    }
    if rule.counting.explicit {
        return None;
    }
    let names = |ids: &[usize]| ids.iter().map(|&id| format!("`{}`", triggers[id])).collect::<Vec<_>>().join(", ");
    if rule.armed_by.len() > 1 {
        return Some((
            format!(
                "rule `{name}` counts `nth`, `limit` and `probability` per arming, and restarts whenever any of {} is armed again",
                names(&rule.armed_by)
            ),
            "write `count: per_arming` to confirm, or `count: lifetime` to count across armings".to_string(),
        ));
    }
    if rule.armed_by.is_empty() && !rule.disarmed_by.is_empty() {
        return Some((
            format!(
                "rule `{name}` is switched by `disarmed_by` ({}), but its `nth`, `limit` and `probability` count over the policy's lifetime: they do not restart when the rule is switched on again",
                names(&rule.disarmed_by)
            ),
            "write `count: lifetime` to confirm; to restart the counts, switch the rule with `armed_by` instead"
                .to_string(),
        ));
    }
    if rule.window.is_some_and(|window| window.cycle.is_some()) {
        return Some((
            format!(
                "rule `{name}` is active in each `down` part of `cycle`, but its `nth`, `limit` and `probability` count over the policy's lifetime, not per period"
            ),
            "write `count: lifetime` to confirm; for a count per period, arm a trigger at each period and use `armed_by`".to_string(),
        ));
    }
    None
}

/// Something legal in a policy that is probably a mistake. Displays like a [`crate::PolicyError`] with
/// `warning: ` before the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    /// The policy's origin; empty for a warning about an export without a policy.
    pub origin: String,
    /// 1-based; the rule's `name:` when it has one, else line 1. 0 when the warning is about the
    /// policy as a whole (a trigger it never names): no line, no column.
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.origin.is_empty(), self.line) {
            (true, _) => write!(f, "warning: {}", self.message)?,
            (false, 0) => write!(f, "{}: warning: {}", self.origin, self.message)?,
            (false, line) => write!(f, "{}:{line}:{}: warning: {}", self.origin, self.column, self.message)?,
        }
        write!(f, "\n  fix: {}", self.fix)
    }
}

impl PolicyWarning {
    /// The warning for arming (`armed: true`) or disarming a trigger through the control API when
    /// no rule of the export's policy names it: the change cannot alter any decision, which most
    /// often means a typo. `None` when a rule names the trigger.
    pub fn for_trigger(policy: Option<&Policy>, trigger: &str, armed: bool) -> Option<PolicyWarning> {
        let verb = if armed { "arming" } else { "disarming" };
        let Some(policy) = policy else {
            return Some(PolicyWarning {
                origin: String::new(),
                line: 0,
                column: 0,
                message: format!(
                    "the export has no policy, so no rule names the trigger `{trigger}`: {verb} it changes nothing until a policy that names it is installed"
                ),
                fix: "install the policy first (`nbdfault ctl set-policy`), or ignore this if you set the trigger ahead of the policy on purpose".to_string(),
            });
        };
        if policy.compiled.triggers.iter().any(|name| **name == *trigger) {
            return None;
        }
        // Bounded work: the API answers this on the runtime, and a policy may name many triggers.
        const SHOWN: usize = 16;
        const SEARCHED: usize = 1024;
        let names = policy.trigger_names();
        let known: Vec<String> = names.iter().take(SEARCHED).map(|name| name.to_string()).collect();
        let listed = match names.len() {
            n if n > SHOWN => format!("{}, and {} more", known[..SHOWN].join(", "), n - SHOWN),
            _ => known.join(", "),
        };
        let fix = match crate::error::closest(trigger, &known) {
            Some(best) => format!("write `{best}` instead of `{trigger}` (the policy's triggers: {listed})"),
            None if known.is_empty() => {
                format!("this policy names no trigger; add `armed_by: {trigger}` to the rule that should wait for it")
            }
            None => format!(
                "the policy's triggers are: {listed}; or name `{trigger}` in a rule (`armed_by`, `disarmed_by`, `stall`)"
            ),
        };
        Some(PolicyWarning {
            origin: policy.origin.clone(),
            line: 0,
            column: 0,
            message: format!("no rule of this policy names the trigger `{trigger}`, so {verb} it changes nothing"),
            fix,
        })
    }
}

/// Where each `name: NAME` is first written, found in the text because serde gives checks
/// after parsing no locations. Names are plain words (see [`super::values::check_name`]), so a
/// textual match is exact enough; a rule with a default name has none, and gets line 1.
fn name_places(source: &str) -> HashMap<&str, (usize, usize)> {
    let mut places = HashMap::new();
    for (number, line) in source.lines().enumerate() {
        let mut rest = line;
        let mut offset = 0;
        while let Some(found) = rest.find("name:") {
            let after = rest[found + 5..].trim_start().trim_start_matches(['"', '\'']);
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
                .unwrap_or(after.len());
            places.entry(&after[..end]).or_insert((number + 1, offset + found + 1));
            offset += found + 5;
            rest = &rest[found + 5..];
        }
    }
    places
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_point_at_rules_that_can_never_decide() {
        let policy = Policy::from_yaml(
            "rules:
  - name: slow-reads
    when: { op: read }
    then: { delay: 1ms }
  - name: failing-reads
    when: { op: read, range: 0..4KiB }
    then: { error: EIO }
  - name: never
    when: { op: write, probability: 0 }
    then: { error: EIO }
  - { name: held, when: { armed_by: go }, then: { stall: go } }
",
            "w.yaml",
        )
        .unwrap();
        let warnings: Vec<String> = policy.warnings().iter().map(|warning| warning.to_string()).collect();
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].starts_with("w.yaml:5:5: warning: rule `failing-reads` never decides"), "{}", warnings[0]);
        assert!(warnings[1].contains("probability 0"), "{}", warnings[1]);
        assert!(
            warnings[2].starts_with("w.yaml:11:7: warning:") && warnings[2].contains("never holds"),
            "{}",
            warnings[2]
        );
        let clean = Policy::from_yaml(include_str!("../../scenarios/issue-example.yaml"), "ok.yaml").unwrap();
        assert!(clean.warnings().is_empty());
    }

    #[test]
    fn a_power_cut_kept_off_until_its_own_armed_by_trigger_is_warned_about() {
        let policy = Policy::from_yaml(
            "rules:\n  - { name: crash, when: { armed_by: crash, nth: 1 }, then: { power_cut: { until: crash } } }\n",
            "p.yaml",
        )
        .unwrap();
        let warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("the power is back at once"), "{}", warnings[0]);
    }

    #[test]
    fn ambiguous_counting_scopes_are_warned_about_until_count_says_which() {
        let policy = Policy::from_yaml(
            "rules:
  - { name: both, when: { op: read, armed_by: [a, b], nth: 1 }, then: { error: EIO } }
  - { name: switched-off, when: { op: write, disarmed_by: stop, limit: 3 }, then: { error: EIO } }
  - { name: flaky, when: { op: trim, cycle: { up: 9s, down: 1s }, nth: 1 }, then: { error: EIO } }
  - { name: pointless, when: { op: flush, armed_by: go, count: lifetime }, then: { error: EIO } }
  - { name: plain, when: { op: cache, armed_by: go, nth: 1 }, then: { error: EIO } }
  - { name: forever, when: { op: block_status, nth: 1 }, then: { error: EIO } }
",
            "c.yaml",
        )
        .unwrap();
        let warnings: Vec<String> = policy.warnings().iter().map(ToString::to_string).collect();
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        assert!(warnings[0].contains("`both`") && warnings[0].contains("any of `a`, `b`"), "{}", warnings[0]);
        assert!(warnings[1].contains("`switched-off`") && warnings[1].contains("count: lifetime"), "{}", warnings[1]);
        assert!(warnings[2].contains("`flaky`") && warnings[2].contains("not per period"), "{}", warnings[2]);
        assert!(warnings[3].contains("`pointless` has `count`"), "{}", warnings[3]);
        let explicit = Policy::from_yaml(
            "rules:
  - { name: both, when: { op: read, armed_by: [a, b], nth: 1, count: per_arming }, then: { error: EIO } }
  - { name: switched-off, when: { op: write, disarmed_by: stop, limit: 3, count: lifetime }, then: { error: EIO } }
",
            "c.yaml",
        )
        .unwrap();
        assert!(explicit.warnings().is_empty(), "{:?}", explicit.warnings());
    }

    #[test]
    fn setting_a_trigger_no_rule_names_warns_with_the_nearest_name() {
        let policy = Policy::from_yaml(
            "rules:\n  - { name: a, when: { armed_by: file-bad }, then: { error: EIO } }\n  - { name: b, when: { disarmed_by: go }, then: {} }\n",
            "p.yaml",
        )
        .unwrap();
        assert_eq!(PolicyWarning::for_trigger(Some(&policy), "file-bad", true), None);
        assert_eq!(PolicyWarning::for_trigger(Some(&policy), "go", false), None);
        let typo = PolicyWarning::for_trigger(Some(&policy), "fil-bad", true).unwrap().to_string();
        assert_eq!(
            typo,
            "p.yaml: warning: no rule of this policy names the trigger `fil-bad`, so arming it changes nothing\n  \
             fix: write `file-bad` instead of `fil-bad` (the policy's triggers: file-bad, go)"
        );
        let other = PolicyWarning::for_trigger(Some(&policy), "release", false).unwrap().to_string();
        assert!(
            other.contains("disarming it changes nothing") && other.contains("triggers are: file-bad, go"),
            "{other}"
        );
        let none = PolicyWarning::for_trigger(None, "go", true).unwrap().to_string();
        assert!(none.starts_with("warning: the export has no policy"), "{none}");
    }
}
