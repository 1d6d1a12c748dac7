//! What is legal in a policy but most likely not what its author meant.

use std::collections::HashMap;
use std::fmt;

use super::Policy;
use super::compiled::Rule;

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
