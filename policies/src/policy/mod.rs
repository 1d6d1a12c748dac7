//! The policy language: YAML in, a validated and compiled [`Policy`] out.
//!
//! Every check runs inside a serde visitor while serde_yaml still stands on the node being read,
//! so every error carries the line and column of that node (see [`de::checked_map`]).
//!
//! - this module: the public API, [`Policy`];
//! - [`compiled`]: the form the engine reads, and nothing else of this module;
//! - [`compile`]: from the checked grammar to the compiled form;
//! - [`de`] and [`values`]: serde helpers that keep line and column, and the checked values
//!   (names, units, counts, probabilities) every section shares;
//! - [`grammar`]: the grammar of each section of a policy file;
//! - [`warnings`]: what is legal but probably a mistake.

mod compile;
pub(crate) mod compiled;
mod de;
mod grammar;
mod limits;
mod values;
mod warnings;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use crate::error::{PolicyError, PolicyErrors};
use compiled::Compiled;
use de::ParseContext;
use grammar::PolicySpec;

#[cfg(test)]
pub(crate) use grammar::mapping_keys;
pub(crate) use grammar::{count_values, since_values};
pub use limits::PolicyLimits;
pub use warnings::PolicyWarning;

/// A validated, compiled policy. Immutable: the engine swaps whole policies.
#[derive(Debug)]
pub struct Policy {
    source: String,
    origin: String,
    description: Option<String>,
    compiled: Compiled,
}

impl Policy {
    /// Reads, checks and compiles a policy within the default [`PolicyLimits`]. `origin` names
    /// the source in error messages.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Policy, PolicyErrors> {
        Policy::from_yaml_within(text, origin, &PolicyLimits::DEFAULT)
    }

    /// Reads, checks and compiles a policy; input over one of `limits` is refused before it is
    /// parsed, with an error naming the limit. The work is bounded by the limits, but it is
    /// work: a server runs this off the threads that serve I/O.
    ///
    /// A refused policy gets every error the parser can find, not only the first (see
    /// [`PolicyErrors`]).
    pub fn from_yaml_within(text: &str, origin: &str, limits: &PolicyLimits) -> Result<Policy, PolicyErrors> {
        limits::prescan(text, limits).map_err(|over| PolicyError::new(origin, over.line, over.column, over.invalid))?;
        let mut spec = read_every_error(text, origin, limits)?;
        Ok(Policy {
            source: text.to_string(),
            origin: origin.to_string(),
            description: spec.description.take(),
            compiled: Compiled::new(spec),
        })
    }

    /// The YAML text the policy was read from.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
    }

    pub fn seed(&self) -> u64 {
        self.compiled.seed
    }

    /// The names of the rules, in evaluation order (schedule entries not included).
    pub fn rule_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.compiled.rules[self.compiled.scheduled..].iter().map(|rule| &*rule.name)
    }

    /// How many requests the `schedule:` section decides.
    pub fn scheduled_requests(&self) -> usize {
        self.compiled.scheduled
    }

    /// Every trigger the policy names, sorted.
    pub fn trigger_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.compiled.triggers.iter().map(|name| &**name).collect();
        names.sort_unstable();
        names
    }

    /// True when the device loses unflushed writes in a power cut (`volatile_cache:`, by default
    /// whether a rule can cut power), so the server must keep an undo journal of them.
    pub fn has_volatile_cache(&self) -> bool {
        self.compiled.volatile_cache
    }

    /// The compiled form, which is all the engine reads.
    pub(crate) fn compiled(&self) -> &Compiled {
        &self.compiled
    }
}

/// How long the passes after the first may take together: each reads the whole file again.
const RECOVERY_TIME: Duration = Duration::from_secs(2);

/// Reads the policy; on an error, reads it again skipping what failed, until it reads to the
/// end, finds an error it cannot go past, or has found [`PolicyErrors::MAX`] errors (see
/// [`de`]'s comment for how).
fn read_every_error(text: &str, origin: &str, limits: &PolicyLimits) -> Result<PolicySpec, PolicyErrors> {
    let started = Instant::now();
    let mut errors = Vec::new();
    let mut skip = HashSet::new();
    loop {
        let read = {
            let _context = ParseContext::start(limits.max_rules, skip);
            let read = serde_yaml::from_str::<PolicySpec>(text);
            let (skipped, failed) = ParseContext::finish();
            skip = skipped;
            read.map_err(|error| (error, failed))
        };
        match read {
            Ok(spec) if errors.is_empty() => return Ok(spec),
            Ok(_) => return Err(PolicyErrors::new(errors, false)),
            Err((error, failed)) => {
                errors.push(PolicyError::from_yaml_error(origin, &error));
                let Some(failed) = failed else { return Err(PolicyErrors::new(errors, false)) };
                if errors.len() >= PolicyErrors::MAX || started.elapsed() > RECOVERY_TIME {
                    return Err(PolicyErrors::new(errors, true));
                }
                skip.insert(failed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> PolicyError {
        Policy::from_yaml(text, "test.yaml").expect_err("the policy should be refused").first().clone()
    }

    #[test]
    fn errors_point_at_the_offending_node() {
        let error = refused(
            "rules:\n  - name: a\n    when:\n      op: write\n      range: 2MiB..1MiB\n    then: { error: EIO }\n",
        );
        assert_eq!((error.line, error.column), (5, 14), "{error}");
        assert!(error.message.contains("inverted"), "{error}");
        assert!(error.fix.contains("1MiB..2MiB"), "{error}");
    }

    #[test]
    fn a_rule_level_check_points_at_its_rule() {
        let error = refused(
            "rules:\n  - name: ok\n    then: { delay: 1ms }\n  - name: torn-read\n    when: { op: read }\n    then: { torn: 4KiB }\n",
        );
        assert_eq!((error.line, error.column), (4, 5), "{error}");
        assert!(error.message.contains("`torn` tears a write"), "{error}");
        assert_eq!(error.fix, "add `op: write` (or write_zeroes) to `when`");
    }

    #[test]
    fn duplicate_rule_names_are_refused_at_the_second_rule() {
        let error = refused("rules:\n  - name: a\n    then: {}\n  - name: a\n    then: {}\n");
        assert_eq!(error.line, 4, "{error}");
        assert!(error.message.contains("already used"), "{error}");
    }

    #[test]
    fn unknown_fields_name_the_nearest_field() {
        let error = refused("rules:\n  - when: { op: write, rnage: 0..4KiB }\n    then: { error: EIO }\n");
        assert_eq!(error.line, 2);
        assert!(error.message.contains("unknown field `rnage`"), "{error}");
        assert_eq!(error.fix, "write `range` instead of `rnage`");
    }

    #[test]
    fn typos_in_enumerations_get_a_suggestion() {
        let error = refused("rules:\n  - when: { op: wirte }\n    then: { error: EIO }\n");
        assert_eq!(error.fix, "write `write` instead of `wirte`", "{error}");
        let error = refused("rules:\n  - then: { error: eio }\n");
        assert_eq!(error.fix, "write `EIO` instead of `eio`", "{error}");
    }

    #[test]
    fn impossible_combinations_are_refused() {
        for (text, wanted) in [
            ("rules: [{ when: { op: write }, then: { corrupt: 4 } }]", "`corrupt` damages the data of a read"),
            ("rules: [{ when: { op: read }, then: { error: EIO, sticky: true } }]", "`sticky`"),
            ("rules: [{ when: { op: write }, then: { drop: true, error: EIO } }]", "`drop` reports success"),
            ("rules: [{ when: { op: write }, then: { persist: true } }]", "nothing here fails it"),
            ("rules: [{ then: { delay: 1ms, stall: go } }]", "`delay` and `stall`"),
            ("rules: [{ then: { delay: 200ms..10ms } }]", "inverted"),
            ("rules: [{ when: { from: 10s, until: 5s }, then: {} }]", "time window is empty"),
            ("rules: [{ when: { op: [write, flush], range: 0..4KiB }, then: {} }]", "flush has no byte range"),
            ("rules: [{ when: { op: write, df: true }, then: {} }]", "`df` flag"),
            ("rules: [{ when: { probability: 1.5 }, then: {} }]", "outside 0..1"),
            ("rules: [{ when: { nth: { every: 3, first: 2 } }, then: {} }]", "never fires within"),
            ("rules: [{ when: { limit: 0 }, then: {} }]", "a count of 0"),
            ("rules: [{ when: { op: [] }, then: {} }]", "empty list"),
            ("rules: [{ when: { since: armed, from: 1s }, then: {} }]", "there are none"),
            ("rules: [{ when: { armed_by: go, disarmed_by: go }, then: {} }]", "both `armed_by` and `disarmed_by`"),
            ("rules: [{ then: { arm: x, disarm: x } }]", "both armed and disarmed"),
            ("rules: [{ when: { armed_by: 'go now' }, then: {} }]", "not a valid"),
            ("rules: [{ when: { op: write }, then: { torn: { persist: 100..8KiB } } }]", "multiples of `align`"),
            ("rules: [{ when: { cycle: { up: 1s, down: 0 } }, then: {} }]", "never down"),
            ("rules: [{ then: { delay: 50 } }]", "no unit"),
            ("rules: [{ when: { range: 0..1MB }, then: {} }]", "ambiguous"),
            ("rules: [{ when: { length: 64KiB..4KiB }, then: {} }]", "inverted"),
            ("rules: [{ when: { nth: 1, count: per_arming }, then: {} }]", "there are none"),
            ("rules: [{ then: { power_cut: true, error: EIO } }]", "`error` would never be sent"),
            ("rules: [{ when: { op: write }, then: { power_cut: true, drop: true } }]", "`drop` reports success"),
            ("rules: [{ when: { op: read }, then: { power_cut: true, corrupt: 2 } }]", "`corrupt` hands damaged data"),
            ("rules: [{ then: { power_cut: {} } }]", "how long the export stays off"),
            ("rules: [{ then: { power_cut: { timeout: 0 } } }]", "for no time at all"),
            ("rules: [{ then: { power_cut: { until: 'a b' } } }]", "not a valid"),
            ("rules: [{ then: { power_cut: { untl: on } } }]", "unknown field `untl`"),
            ("volatile_cache: false", "no rules"),
            ("rules: [{ when: { armed_by: go, count: per_armng }, then: {} }]", "unknown variant"),
            ("rules: [{ when: { length: 0 }, then: {} }]", "never reach the rules"),
            ("rules: [{ when: { length: '<1' }, then: {} }]", "only admits length 0"),
            ("rules: [{ when: { length: '<0' }, then: {} }]", "admits no length"),
            ("rules: [{ when: { length: 8GiB }, then: {} }]", "at most 4294967295 bytes"),
            ("rules: [{ when: { length: 64KB }, then: {} }]", "ambiguous"),
            ("rules: [{ when: { op: [write, flush], length: 4KiB }, then: {} }]", "flush has no length"),
            ("rules: [{ when: { length: [] }, then: {} }]", "empty list"),
            ("seed: 1\n", "no rules"),
            ("", "no rules"),
            ("rules: {}", "invalid type"),
            ("rules:\n  - when:\n    then: { error: EIO }\n", "has no value"),
            ("rules:\n  - when: { op: write }\n    then:\n", "has no value"),
            ("rules:\n  - when: { op: write }\n    then: { error: }\n", "unknown variant ``"),
            ("bad_sectors: [{ range: 0..512, write_failures: ~ }]", "invalid type: unit value"),
        ] {
            let error = refused(text);
            assert!(error.message.contains(wanted), "{text}: wanted {wanted:?}, got {error}");
            assert!(!error.fix.is_empty(), "{text}: no fix in {error}");
        }
    }

    #[test]
    fn rules_over_the_limit_are_refused_at_the_first_one_too_many() {
        let limits = PolicyLimits { max_rules: 2, ..PolicyLimits::DEFAULT };
        let text = "rules:\n  - then: {}\n  - then: {}\n  - then: {}\n";
        let errors = Policy::from_yaml_within(text, "many.yaml", &limits).unwrap_err();
        assert_eq!(errors.len(), 1, "a limit is one error, not one per rule over it: {errors}");
        let error = errors.first();
        assert_eq!(error.line, 4, "{error}");
        assert!(error.message.contains("max_rules"), "{error}");
        let schedule = "schedule:\n  - { request: 0, op: read, rule: a, then: {} }\n  - { request: 1, op: read, rule: a, then: {} }\nrules:\n  - then: {}\n";
        let error = Policy::from_yaml_within(schedule, "many.yaml", &limits).unwrap_err();
        assert!(error.first().message.contains("max_rules"), "{error}");
        Policy::from_yaml_within("rules:\n  - then: {}\n  - then: {}\n", "two.yaml", &limits).unwrap();
    }

    /// Every error of a policy, as `(line, column, start of the message)`.
    fn every_error(text: &str) -> Vec<(usize, usize, String)> {
        let errors = Policy::from_yaml(text, "all.yaml").expect_err("the policy should be refused");
        assert!(!errors.truncated);
        errors
            .iter()
            .map(|error| {
                assert!(!error.fix.is_empty(), "{error}");
                (error.line, error.column, error.message.chars().take(80).collect())
            })
            .collect()
    }

    #[test]
    fn every_error_of_a_rule_and_of_every_rule_is_reported_at_once() {
        let errors = every_error(
            "rules:
  - name: three-errors
    when: { op: wirte, range: 2MiB..1MiB }
    then: { error: EIOO, delay: 50 }
  - name: bad-count
    when: { op: read, nth: 0 }
    then: { torn: 4KiB }
  - name: torn-read
    when: { op: read }
    then: { torn: 4KiB }
  - name: fine
    then: { error: EIO }
  - name: unknown-field
    when: { rnage: 0..4KiB }
    then: { delay: 5 }
  - { name: two-bad-ops, when: { op: [flsh, raed] }, then: {} }
  - { name: fine, then: {} }
",
        );
        let at: Vec<(usize, usize)> = errors.iter().map(|(line, column, _)| (*line, *column)).collect();
        assert_eq!(
            at,
            [(3, 17), (3, 31), (4, 20), (4, 33), (6, 28), (8, 5), (14, 13), (15, 20), (16, 39), (16, 45), (17, 5)],
            "{errors:#?}"
        );
        assert!(errors[0].2.contains("unknown variant `wirte`"), "{errors:?}");
        assert!(errors[1].2.contains("inverted"), "{errors:?}");
        assert!(errors[5].2.contains("`torn` tears a write"), "{errors:?}");
        assert!(errors[10].2.contains("already used"), "{errors:?}");
    }

    #[test]
    fn what_stands_in_for_a_broken_part_raises_no_error_of_its_own() {
        // Without its `op`, the rule would match every operation, which `torn` refuses; with an
        // empty `nth`, `nth` itself would be refused; with no rule left, the policy.
        for (text, only) in [
            ("rules: [{ when: { op: wirte }, then: { torn: 4KiB } }]", "unknown variant"),
            ("rules: [{ when: { op: write, nth: { first: 0 } }, then: {} }]", "a count of 0"),
            ("rules: [{ when: { op: write }, then: { torn: { persist: 0..8KiB, align: 0x } } }]", "`0x`"),
            ("rules: [{ when: { op: [] }, then: {} }]", "empty list"),
            ("rules: [{ when: { op: [wirte] }, then: {} }]", "unknown variant"),
            ("rules:\n  - when: { op: write }\n    then: { error: EIOO, persist: true }\n", "unknown variant"),
            ("seed: x\nrules: [{ then: {} }]", "invalid type"),
            ("rules: [{ name: 'a b', then: {} }, { name: c, then: {} }]", "not a valid"),
        ] {
            let errors = every_error(text);
            assert_eq!(errors.len(), 1, "{text}: {errors:#?}");
            assert!(errors[0].2.contains(only) || errors[0].2.starts_with(only), "{text}: {errors:?}");
        }
        // A YAML syntax error stops the reading: what comes before it is reported, nothing after.
        let errors = every_error(
            "rules: [{ when: { op: wirte }, then: {error: EIOO} }\n  - broken: [\n  - { then: { error: EIOO } }\n",
        );
        assert_eq!(errors.len(), 3, "{errors:#?}");
        assert!(errors[2].2.contains("did not find expected"), "{errors:#?}");
    }

    #[test]
    fn at_most_max_errors_are_reported_and_the_rest_announced() {
        let text: String = std::iter::once("rules:\n".to_string())
            .chain((0..30).map(|i| format!("  - {{ name: r{i}, when: {{ op: wirte }}, then: {{}} }}\n")))
            .collect();
        let errors = Policy::from_yaml(&text, "many.yaml").unwrap_err();
        assert_eq!(errors.len(), PolicyErrors::MAX);
        assert!(errors.truncated);
        assert!(errors.to_string().ends_with("many.yaml: more errors may follow; fix these first"), "{errors}");
    }

    #[test]
    fn an_unquoted_greater_than_length_gets_a_fix_that_quotes_it() {
        let error = refused("rules:\n  - when: { op: write, length: >=1MiB }\n    then: { error: EIO }\n");
        assert!(error.fix.contains("\">=1MiB\""), "{error}");
        let error = refused("rules:\n  - when:\n      op: write\n      length: >=1MiB\n    then: { error: EIO }\n");
        assert!(error.fix.contains("quote"), "{error}");
    }

    #[test]
    fn the_journal_follows_volatile_cache_and_by_default_power_cut_rules() {
        let journals = |text: &str| Policy::from_yaml(text, "v.yaml").unwrap().has_volatile_cache();
        assert!(journals("rules: [{ when: { armed_by: cut }, then: { power_cut: true } }]"));
        assert!(journals("rules: [{ when: { armed_by: cut }, then: { power_cut: { until: on, timeout: 5s } } }]"));
        assert!(journals("volatile_cache: true"), "a policy of only a volatile cache is useful: API power cuts");
        assert!(
            !journals("volatile_cache: false\nrules: [{ then: { power_cut: true } }]"),
            "a device with power-loss protection"
        );
        assert!(!journals("rules: [{ then: { power_cut: false } }]"));
        assert!(!journals("rules: [{ then: {} }]"));
        let policy = Policy::from_yaml("rules: [{ then: { power_cut: { until: power-on } } }]", "v.yaml").unwrap();
        assert_eq!(policy.trigger_names(), ["power-on"], "the power-on trigger is one the policy names");
    }

    #[test]
    fn the_issue_example_is_accepted() {
        let policy =
            Policy::from_yaml(include_str!("../../scenarios/issue-example.yaml"), "issue-example.yaml").unwrap();
        assert_eq!(
            policy.rule_names().collect::<Vec<_>>(),
            ["fail-file-data", "every-third-fua-write", "flaky-flush", "slow-reads"]
        );
        assert_eq!(policy.seed(), 42);
        assert_eq!(policy.trigger_names(), ["go"]);
        assert!(!policy.has_volatile_cache());
    }
}
