//! Why a policy was refused: where, what is wrong, and what to write instead.

use std::fmt;

/// Separates the message from its fix inside the text of a serde error, so a check deep inside
/// deserialization can carry both out through serde_yaml, which only transports a string.
pub(crate) const FIX_MARK: &str = "\n  fix: ";

/// A check that failed: what is wrong and what to write instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Invalid {
    pub message: String,
    pub fix: String,
}

impl Invalid {
    pub(crate) fn new(message: impl Into<String>, fix: impl Into<String>) -> Self {
        Invalid { message: message.into(), fix: fix.into() }
    }

    /// The text handed to serde, from which [`PolicyError::from_yaml_error`] recovers both parts.
    pub(crate) fn encode(&self) -> String {
        format!("{}{FIX_MARK}{}", self.message, self.fix)
    }

    pub(crate) fn into_serde<E: serde::de::Error>(self) -> E {
        E::custom(self.encode())
    }
}

/// A policy that could not be used. Displays as
/// `ORIGIN:LINE:COLUMN: what is wrong` then `  fix: what to write instead` on a second line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyError {
    /// Where the policy came from: a file name, or a label such as `PUT /v1/exports/x/policy`.
    pub origin: String,
    /// 1-based line of the offending YAML node.
    pub line: usize,
    /// 1-based column of the offending YAML node.
    pub column: usize,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: {}{FIX_MARK}{}", self.origin, self.line, self.column, self.message, self.fix)
    }
}

impl PolicyError {
    pub(crate) fn new(origin: &str, line: usize, column: usize, invalid: Invalid) -> Self {
        PolicyError { origin: origin.to_string(), line, column, message: invalid.message, fix: invalid.fix }
    }

    /// Splits a serde_yaml error into location, message and fix. Errors raised by this crate's
    /// checks carry their fix; serde's and libyaml's own get one from [`explain`].
    pub(crate) fn from_yaml_error(origin: &str, error: &serde_yaml::Error) -> Self {
        let mut text = error.to_string();
        let (line, column) = match error.location() {
            Some(location) => {
                let suffix = format!(" at line {} column {}", location.line(), location.column());
                if let Some(at) = text.rfind(&suffix) {
                    text.replace_range(at..at + suffix.len(), "");
                }
                (location.line(), location.column())
            }
            None => (1, 1),
        };
        let invalid = match text.split_once(FIX_MARK) {
            Some((message, fix)) => Invalid::new(message, fix),
            None => explain(&text),
        };
        PolicyError::new(origin, line, column, invalid)
    }
}

/// Every error found in a policy, in the order of the file: the parser goes on past an error
/// wherever it can (each rule, each field of `when` and `then`, each list item is read even when
/// an earlier one failed). Never empty. Displays each error as [`PolicyError`] does, one after the
/// other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors {
    errors: Vec<PolicyError>,
    /// True when the parser stopped looking before the end ([`PolicyErrors::MAX`] errors, or the
    /// time it may take): more errors may follow.
    pub truncated: bool,
}

impl PolicyErrors {
    /// The most errors reported for one policy: each costs a reading of the whole file.
    pub const MAX: usize = 20;

    /// Sorts by position and drops repeats; `errors` must not be empty.
    pub(crate) fn new(mut errors: Vec<PolicyError>, truncated: bool) -> PolicyErrors {
        assert!(!errors.is_empty(), "a refusal has an error");
        errors.sort_by_key(|error| (error.line, error.column));
        errors.dedup();
        PolicyErrors { errors, truncated }
    }

    /// The first error in the file.
    pub fn first(&self) -> &PolicyError {
        &self.errors[0]
    }

    pub fn iter(&self) -> std::slice::Iter<'_, PolicyError> {
        self.errors.iter()
    }
}

impl std::ops::Deref for PolicyErrors {
    type Target = [PolicyError];
    fn deref(&self) -> &[PolicyError] {
        &self.errors
    }
}

impl From<PolicyError> for PolicyErrors {
    fn from(error: PolicyError) -> Self {
        PolicyErrors { errors: vec![error], truncated: false }
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        if self.truncated {
            write!(f, "\n{}: more errors may follow; fix these first", self.errors[0].origin)?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// A fix for the messages serde and libyaml write themselves.
fn explain(message: &str) -> Invalid {
    let quoted = backticked(message);
    let fix = if message.contains("unknown field") || message.contains("unknown variant") {
        let wrong = quoted.first().cloned().unwrap_or_default();
        let allowed = &quoted[quoted.len().min(1)..];
        match closest(&wrong, allowed) {
            Some(best) => format!("write `{best}` instead of `{wrong}`"),
            None if allowed.is_empty() => format!("remove `{wrong}`: nothing else belongs here"),
            None if message.contains("unknown variant") => format!("write one of: {}", allowed.join(", ")),
            None => format!("remove `{wrong}`; the fields here are: {}", allowed.join(", ")),
        }
    } else if message.contains("missing field") {
        let field = quoted.first().cloned().unwrap_or_default();
        format!("add `{field}:` here (docs/policy-reference.md describes it)")
    } else if message.contains("duplicate field") {
        let field = quoted.first().cloned().unwrap_or_default();
        format!("keep a single `{field}:` in this mapping")
    } else if let Some((_, expected)) = message.split_once(", expected ") {
        format!("write {expected} here")
    } else if message.contains("recursion limit") {
        "nest the YAML less deeply: a policy needs only a few levels".to_string()
    } else if message.contains("repetition limit") {
        "expand the aliases (`*name`) by hand: this many repetitions are refused".to_string()
    } else if message.contains("block scalar") {
        "quote a value that starts with `>` or `|`, such as length: \">=1MiB\" (or write 1MiB..): YAML reads them as block text".to_string()
    } else if message.contains("cannot start any token") {
        "indent with spaces (YAML refuses tabs), and quote values that start with `@`, `` ` ``, `%` or `>`, such as length: \">=1MiB\"".to_string()
    } else if message.contains("more than one document") {
        "keep one YAML document: remove the `---` separators and merge the rules into one `rules:` list".to_string()
    } else {
        "check the YAML syntax here: indentation, a missing `:` after a key, an unclosed bracket or quote".to_string()
    };
    Invalid::new(message, fix)
}

/// The words between backticks, in order.
fn backticked(message: &str) -> Vec<String> {
    message.split('`').skip(1).step_by(2).map(str::to_string).collect()
}

/// The allowed word nearest to what was written, if it is near enough to be a typo.
pub(crate) fn closest(wrong: &str, allowed: &[String]) -> Option<String> {
    let lower = wrong.to_ascii_lowercase();
    allowed
        .iter()
        .map(|candidate| (edit_distance(&lower, &candidate.to_ascii_lowercase()), candidate))
        .filter(|(distance, candidate)| *distance <= 2.max(candidate.len() / 4) && *distance < candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.clone())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_get_the_nearest_allowed_name() {
        let invalid = explain("rules[0].when: unknown field `rnage`, expected one of `op`, `range`, `fua`");
        assert_eq!(invalid.fix, "write `range` instead of `rnage`");
        let invalid = explain("unknown variant `eio`, expected one of `EPERM`, `EIO`");
        assert_eq!(invalid.fix, "write `EIO` instead of `eio`");
        let invalid = explain("unknown field `colour`, expected `op` or `range`");
        assert_eq!(invalid.fix, "remove `colour`; the fields here are: op, range");
        let invalid = explain("unknown variant `EROFS`, expected one of `EPERM`, `EIO`");
        assert_eq!(invalid.fix, "write one of: EPERM, EIO");
    }

    #[test]
    fn type_errors_say_what_to_write() {
        let invalid = explain("seed: invalid type: string \"x\", expected u64");
        assert_eq!(invalid.fix, "write u64 here");
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("write", "wirte"), 2);
        assert_eq!(edit_distance("flush", "flush"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn display_puts_the_fix_on_its_own_line() {
        let error = PolicyError::new("p.yaml", 3, 7, Invalid::new("bad", "good"));
        assert_eq!(error.to_string(), "p.yaml:3:7: bad\n  fix: good");
    }
}
