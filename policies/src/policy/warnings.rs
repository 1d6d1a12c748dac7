//! What is legal in a policy but most likely not what its author meant.

use std::fmt;

use super::Policy;
use super::compiled::Rule;

impl Policy {
    /// What is legal but most likely not what the author meant: rules that can never decide,
    /// stalls that never hold. `nbdfault policy check` prints these after a successful check.
    pub fn warnings(&self) -> Vec<PolicyWarning> {
        let rules = &self.compiled.rules[self.compiled.scheduled..];
        let mut warnings = Vec::new();
        let warn = |rule: &Rule, message: String, fix: String| {
            let (line, column) = locate_rule(&self.source, &rule.name);
            PolicyWarning { origin: self.origin.clone(), line, column, message, fix }
        };
        for (position, rule) in rules.iter().enumerate() {
            if let Some(earlier) = rules[..position]
                .iter()
                .find(|earlier| earlier.always_fires() && earlier.ops & rule.ops == rule.ops && rule.requests.is_none())
            {
                warnings.push(warn(
                    rule,
                    format!(
                        "rule `{}` never decides a request: `{}` above it decides every request of the operations it matches",
                        rule.name, earlier.name
                    ),
                    format!("move `{}` above `{}`, or narrow `{}`'s `when`", rule.name, earlier.name, earlier.name),
                ));
            }
            if rule.threshold == Some(0) {
                warnings.push(warn(
                    rule,
                    format!("rule `{}` has probability 0, so it never fires", rule.name),
                    "raise the probability, or remove the rule".to_string(),
                ));
            }
            if let Some((trigger, _)) = &rule.outcome.stall
                && rule.armed_by.iter().any(|&id| self.compiled.triggers[id] == *trigger)
            {
                warnings.push(warn(
                    rule,
                    format!("rule `{}` stalls until `{trigger}` is armed, but it is only active while `{trigger}` is armed, so it never holds a request", rule.name),
                    format!("stall on another trigger than the one in `armed_by`, such as `release-{trigger}`"),
                ));
            }
        }
        warnings
    }
}

/// Something legal in a policy that is probably a mistake. Displays like a [`crate::PolicyError`] with
/// `warning: ` before the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyWarning {
    pub origin: String,
    /// 1-based; the rule's `name:` when it has one, else line 1.
    pub line: usize,
    pub column: usize,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: warning: {}\n  fix: {}", self.origin, self.line, self.column, self.message, self.fix)
    }
}

/// Where a rule's `name: NAME` is written, found in the text because serde gives checks after
/// parsing no locations. Names are plain words (see [`super::values::check_name`]), so a textual match is exact
/// enough; a rule with a default name has none, and gets line 1.
fn locate_rule(source: &str, name: &str) -> (usize, usize) {
    for (number, line) in source.lines().enumerate() {
        let mut rest = line;
        let mut offset = 0;
        while let Some(found) = rest.find("name:") {
            let after = rest[found + 5..].trim_start().trim_start_matches(['"', '\'']);
            let value: String =
                after.chars().take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')).collect();
            if value == name {
                return (number + 1, offset + found + 1);
            }
            offset += found + 5;
            rest = &rest[found + 5..];
        }
    }
    (1, 1)
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
}
