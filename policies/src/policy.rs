//! The policy language: YAML in, a validated and compiled [`Policy`] out.
//!
//! Every check runs inside a serde visitor while serde_yaml still stands on the node being read,
//! so every error carries the line and column of that node (see [`checked_map`]).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};

use crate::decision::Reply;
use crate::error::{Invalid, PolicyError};
use crate::index::{IndexEntry, RuleIndex};
use crate::random::name_hash;
use crate::request::{Errno, Op};
use crate::units::{
    ByteRange, DurationSpread, HumanDuration, ParsingVisitor, UnitError, format_duration, format_size, parse_size,
};

/// A validated, compiled policy. Immutable: the engine swaps whole policies.
#[derive(Debug)]
pub struct Policy {
    source: String,
    origin: String,
    description: Option<String>,
    pub(crate) seed: u64,
    /// Schedule entries first, then the rules, in file order: the evaluation order.
    pub(crate) rules: Vec<Rule>,
    /// How many of `rules` are schedule entries.
    pub(crate) scheduled: usize,
    pub(crate) bad_sectors: Vec<DeclaredBadSector>,
    /// Every trigger the policy names; rules refer to them by position.
    pub(crate) triggers: Vec<Arc<str>>,
    pub(crate) index: RuleIndex,
    pub(crate) cuts_power: bool,
}

impl Policy {
    /// Reads, checks and compiles a policy. `origin` names the source in error messages.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let spec = {
            let _context = ParseContext::start();
            serde_yaml::from_str::<PolicySpec>(text).map_err(|error| PolicyError::from_yaml_error(origin, &error))?
        };
        Ok(Policy::compile(spec, text, origin))
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
        self.seed
    }

    /// The names of the rules, in evaluation order (schedule entries not included).
    pub fn rule_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.rules[self.scheduled..].iter().map(|rule| &*rule.name)
    }

    /// How many requests the `schedule:` section decides.
    pub fn scheduled_requests(&self) -> usize {
        self.scheduled
    }

    /// Every trigger the policy names, sorted.
    pub fn trigger_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.triggers.iter().map(|name| &**name).collect();
        names.sort_unstable();
        names
    }

    /// True when some rule can cut power, so the server must keep an undo journal of unflushed
    /// writes.
    pub fn can_cut_power(&self) -> bool {
        self.cuts_power
    }

    /// What is legal but most likely not what the author meant: rules that can never decide,
    /// stalls that never hold. `nbdfault policy check` prints these after a successful check.
    pub fn warnings(&self) -> Vec<PolicyWarning> {
        let rules = &self.rules[self.scheduled..];
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
                && rule.armed_by.iter().any(|&id| self.triggers[id] == *trigger)
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

    fn compile(spec: PolicySpec, source: &str, origin: &str) -> Policy {
        let mut triggers = TriggerTable::default();
        let scheduled = spec.schedule.len();
        let mut rules = Vec::with_capacity(scheduled + spec.rules.len());
        for entry in spec.schedule {
            let when = When { ops: Some(vec![entry.op]), requests: Some(vec![entry.request]), ..When::default() };
            let mut rule = Rule::compile(entry.rule, &when, entry.then, &mut triggers);
            rule.outcome.bad_sector = entry.bad_sector;
            rules.push(rule);
        }
        for rule in spec.rules {
            rules.push(Rule::compile(rule.name, &rule.when, rule.then, &mut triggers));
        }
        let index = RuleIndex::new(rules.iter().map(|rule| IndexEntry {
            ops: rule.ops,
            ranges: &rule.ranges,
            requests: rule.requests.as_deref(),
        }));
        let cuts_power = rules.iter().any(|rule| rule.outcome.power_cut);
        Policy {
            source: source.to_string(),
            origin: origin.to_string(),
            description: spec.description,
            seed: spec.seed,
            rules,
            scheduled,
            bad_sectors: spec.bad_sectors,
            triggers: triggers.names,
            index,
            cuts_power,
        }
    }
}

/// Something legal in a policy that is probably a mistake. Displays like a [`PolicyError`] with
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
/// parsing no locations. Names are plain words (see [`check_name`]), so a textual match is exact
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

#[derive(Default)]
struct TriggerTable {
    names: Vec<Arc<str>>,
    ids: HashMap<Arc<str>, usize>,
}

impl TriggerTable {
    fn id(&mut self, name: &Arc<str>) -> usize {
        if let Some(&id) = self.ids.get(name) {
            return id;
        }
        self.names.push(name.clone());
        self.ids.insert(name.clone(), self.names.len() - 1);
        self.names.len() - 1
    }
}

// ----------------------------------------------------------------------------------------------
// Compiled form, used by the engine.

/// One rule, ready for matching.
#[derive(Debug)]
pub(crate) struct Rule {
    pub name: Arc<str>,
    pub name_hash: u64,
    /// Bit set of [`Op::bit`].
    pub ops: u8,
    /// Half-open ranges; empty means every offset.
    pub ranges: Vec<(u64, u64)>,
    /// Flags that must be set, and flags that must be clear ([`crate::RequestFlags::bits`]).
    pub flags_set: u8,
    pub flags_clear: u8,
    pub connections: Option<Vec<u64>>,
    pub requests: Option<Vec<u64>>,
    /// Policy trigger ids that must all be armed, and any of which disables the rule.
    pub armed_by: Vec<usize>,
    pub disarmed_by: Vec<usize>,
    pub window: Option<Window>,
    pub nth: Nth,
    pub limit: Option<u64>,
    /// Fires when a draw is below this; `None` means always.
    pub threshold: Option<u64>,
    pub outcome: Outcome,
}

/// When a rule is active, in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    /// Measure from the moment the `armed_by` triggers were (last) armed, not from server start.
    pub since_armed: bool,
    pub from: Duration,
    pub until: Option<Duration>,
    /// dm-flakey style: `up` then `down`, repeating; the rule is active in the down part.
    pub cycle: Option<(Duration, Duration)>,
}

impl Window {
    pub(crate) fn admits(&self, elapsed: Duration) -> bool {
        if elapsed < self.from || self.until.is_some_and(|until| elapsed >= until) {
            return false;
        }
        match self.cycle {
            None => true,
            Some((up, down)) => {
                let period = (up + down).as_nanos();
                let phase = elapsed.as_nanos() % period;
                phase >= up.as_nanos()
            }
        }
    }
}

/// Which occurrences may fire, counting the requests that met every other condition (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nth {
    pub after: u64,
    pub every: u64,
    pub first: Option<u64>,
}

impl Default for Nth {
    fn default() -> Self {
        Nth { after: 0, every: 1, first: None }
    }
}

impl Nth {
    pub(crate) fn admits(&self, occurrence: u64) -> bool {
        let Some(counted) = occurrence.checked_sub(self.after).filter(|&counted| counted > 0) else {
            return false;
        };
        counted % self.every == 0 && self.first.is_none_or(|first| counted <= first)
    }
}

/// What a rule does when it fires.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub delay: Option<DurationSpread>,
    pub stall: Option<(Arc<str>, Option<Duration>)>,
    pub action: ActionSpec,
    pub reply: Reply,
    pub power_cut: bool,
    /// With `sticky: true`, the errno the failed range keeps returning to reads.
    pub sticky: Option<Errno>,
    pub arm: Arc<[Arc<str>]>,
    pub disarm: Arc<[Arc<str>]>,
    pub arm_ids: Vec<usize>,
    pub disarm_ids: Vec<usize>,
    /// Schedule entries only: the logged decision came from a bad sector.
    pub bad_sector: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ActionSpec {
    Perform,
    Skip,
    Torn(Tear),
    Corrupt { bytes: u32, seed: Option<u64> },
}

/// How many bytes of a torn write persist: a fixed count, or a seeded choice in `min..=max` in
/// steps of `align`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tear {
    pub min: u64,
    pub max: u64,
    pub align: u64,
}

/// A range the policy declares bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeclaredBadSector {
    pub range: ByteRange,
    pub errno: Errno,
    pub write_failures: u32,
    pub name: Arc<str>,
}

impl Rule {
    /// True when the rule decides every request of its operations: nothing else narrows it.
    fn always_fires(&self) -> bool {
        self.ranges.is_empty()
            && self.flags_set == 0
            && self.flags_clear == 0
            && self.connections.is_none()
            && self.requests.is_none()
            && self.armed_by.is_empty()
            && self.disarmed_by.is_empty()
            && self.window.is_none()
            && self.nth == Nth::default()
            && self.limit.is_none()
            && self.threshold.is_none()
    }

    fn compile(name: Arc<str>, when: &When, then: Then, triggers: &mut TriggerTable) -> Rule {
        let ops = match &when.ops {
            Some(ops) => ops.iter().fold(0, |bits, op| bits | op.bit()),
            None => Op::ALL.iter().fold(0, |bits, op| bits | op.bit()),
        };
        let reply = if then.disconnect {
            Reply::Disconnect
        } else if let Some(errno) = then.error {
            Reply::Error(errno)
        } else {
            Reply::Ok
        };
        let action = if let Some(tear) = then.torn {
            ActionSpec::Torn(tear)
        } else if let Some((bytes, seed)) = then.corrupt {
            ActionSpec::Corrupt { bytes, seed }
        } else if then.drop || (reply != Reply::Ok && !then.persist) {
            ActionSpec::Skip
        } else {
            ActionSpec::Perform
        };
        let threshold = when.probability.and_then(|probability| {
            // 2^64 * p, except that p = 1 must mean "always", which no u64 threshold expresses.
            (probability < 1.0).then_some((probability * 18_446_744_073_709_551_616.0) as u64)
        });
        let stall = then.stall.map(|(trigger, timeout)| {
            triggers.id(&trigger);
            (trigger, timeout)
        });
        let window = (when.from.is_some() || when.until.is_some() || when.cycle.is_some()).then(|| Window {
            since_armed: when.since_armed,
            from: when.from.unwrap_or_default(),
            until: when.until,
            cycle: when.cycle,
        });
        Rule {
            name_hash: name_hash(&name),
            name,
            ops,
            ranges: when.ranges.iter().map(|range| (range.start, range.end_or_max())).collect(),
            flags_set: when.flags_set,
            flags_clear: when.flags_clear,
            connections: when.connections.clone(),
            requests: when.requests.clone(),
            armed_by: when.armed_by.iter().map(|name| triggers.id(name)).collect(),
            disarmed_by: when.disarmed_by.iter().map(|name| triggers.id(name)).collect(),
            window,
            nth: when.nth,
            limit: when.limit,
            threshold,
            outcome: Outcome {
                delay: then.delay,
                stall,
                action,
                reply,
                power_cut: then.power_cut,
                sticky: if then.sticky { then.error } else { None },
                arm_ids: then.arm.iter().map(|name| triggers.id(name)).collect(),
                disarm_ids: then.disarm.iter().map(|name| triggers.id(name)).collect(),
                arm: then.arm.into(),
                disarm: then.disarm.into(),
                bad_sector: false,
            },
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The YAML grammar, checked while it is read.

/// State shared by the checks of one parse: rule numbering and name uniqueness. Kept per thread
/// and reset by [`ParseContext::start`], because serde gives a visitor no other way to see its
/// siblings while it still knows its own location.
#[derive(Default)]
struct ParseContext {
    rules: usize,
    names: HashSet<Arc<str>>,
    scheduled: HashSet<u64>,
}

thread_local! {
    static CONTEXT: RefCell<ParseContext> = RefCell::default();
}

/// Resets the parse context when created and again when dropped.
struct ContextGuard;

impl ParseContext {
    fn start() -> ContextGuard {
        CONTEXT.with(|context| *context.borrow_mut() = ParseContext::default());
        ContextGuard
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        CONTEXT.with(|context| *context.borrow_mut() = ParseContext::default());
    }
}

/// Reads a mapping as `Raw`, then turns it into `T` with `check`, inside the visitor: serde_yaml
/// then reports a failed check at the mapping's own line and column.
fn checked_map<'de, D, Raw, T>(
    deserializer: D,
    expecting: &'static str,
    check: fn(Raw) -> Result<T, Invalid>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    Raw: Deserialize<'de>,
{
    struct MapVisitor<Raw, T> {
        expecting: &'static str,
        check: fn(Raw) -> Result<T, Invalid>,
    }
    impl<'de, Raw: Deserialize<'de>, T> Visitor<'de> for MapVisitor<Raw, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let raw = Raw::deserialize(de::value::MapAccessDeserializer::new(map))?;
            (self.check)(raw).map_err(Invalid::into_serde)
        }
        // A key with nothing after it (`when:`) is most often conditions commented out by
        // mistake; read as an empty mapping it would silently widen the rule.
        fn visit_unit<E: de::Error>(self) -> Result<T, E> {
            Err(Invalid::new(
                "this key has no value (perhaps its content was commented out)",
                "write `{}` for an empty mapping, or put the content back",
            )
            .into_serde())
        }
    }
    // `deserialize_any`, not `deserialize_map`: serde_yaml would hand an empty value to a map
    // visitor as an empty mapping.
    deserializer.deserialize_any(MapVisitor { expecting, check })
}

/// For optional fields: absent means `None`, but a key with no value (or `~`) is refused, not
/// read as absent, since it most often means content commented out by mistake.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
}

/// One value or a non-empty list of values: `op: write` or `op: [write, flush]`.
#[derive(Debug, Clone)]
struct ListOf<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ListOf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = ListOf<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListOf<T>, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(Invalid::new(
                        "an empty list here would match nothing",
                        "write at least one value, or remove the field to match them all",
                    )
                    .into_serde());
                }
                Ok(ListOf(items))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ListOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|item| ListOf(vec![item]))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ListOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|item| ListOf(vec![item]))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ListOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|item| ListOf(vec![item]))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ListOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|item| ListOf(vec![item]))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<ListOf<T>, E> {
                T::deserialize(v.into_deserializer()).map(|item| ListOf(vec![item]))
            }
        }
        deserializer.deserialize_any(ListVisitor(PhantomData))
    }
}

/// A value with a unit, parsed with a fix that says how to write it.
struct Unit<T>(T);

trait UnitKind: FromStr<Err = UnitError> {
    const EXPECTING: &'static str;
    const FIX: &'static str;
}

impl UnitKind for ByteRange {
    const EXPECTING: &'static str = "a byte range such as 1MiB..2MiB";
    const FIX: &'static str = "write a half-open range START..END, START..+LENGTH or START.. with binary units, such as 1MiB..2MiB or 8s..+8s";
}

impl UnitKind for DurationSpread {
    const EXPECTING: &'static str = "a duration such as 50ms or a range such as 10ms..200ms";
    const FIX: &'static str =
        "write a duration with a unit (ns, us, ms, s, min, h) such as 50ms, or a range such as 10ms..200ms";
}

impl UnitKind for HumanDuration {
    const EXPECTING: &'static str = "a duration such as 50ms or 2s";
    const FIX: &'static str = "write a duration with a unit (ns, us, ms, s, min, h) such as 500ms or 2s";
}

impl UnitKind for TearSize {
    const EXPECTING: &'static str = "a byte count such as 4KiB, or a range such as 512..8KiB";
    const FIX: &'static str =
        "write a byte count such as 4KiB or 8s (sectors), or an inclusive range such as 512..8KiB";
}

impl UnitKind for Size {
    const EXPECTING: &'static str = "a byte count such as 512 or 4KiB";
    const FIX: &'static str = "write a whole number of bytes with an optional binary unit, such as 512, 4KiB or 8s";
}

impl<'de, T: UnitKind> Deserialize<'de> for Unit<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParsingVisitor::<T>::with_fix(T::EXPECTING, T::FIX)).map(Unit)
    }
}

/// A plain byte count.
struct Size(u64);

impl FromStr for Size {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<Size, UnitError> {
        parse_size(text).map(Size)
    }
}

/// The persisted part of a torn write: `4KiB` or `512..8KiB` (inclusive).
struct TearSize {
    min: u64,
    max: u64,
}

impl FromStr for TearSize {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<TearSize, UnitError> {
        match text.split_once("..") {
            None => parse_size(text).map(|size| TearSize { min: size, max: size }),
            Some((min, max)) => {
                let (min, max) = (parse_size(min)?, parse_size(max)?);
                if max < min {
                    return Err(UnitError::new(format!("`{text}` is inverted: the smaller size comes first")));
                }
                Ok(TearSize { min, max })
            }
        }
    }
}

/// A rule or trigger name: it appears in URLs, logs and YAML, so it stays plain.
#[derive(Debug, Clone)]
struct Name(Arc<str>);

fn check_name(text: &str, what: &str) -> Result<Arc<str>, Invalid> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if text.is_empty() || text.len() > 128 || !text.chars().all(plain) {
        let suggestion: String = text
            .chars()
            .map(|c| if plain(c) { c } else { '-' })
            .take(128)
            .collect::<String>()
            .trim_matches('-')
            .to_string();
        let suggestion = if suggestion.is_empty() { "fail-writes".to_string() } else { suggestion };
        return Err(Invalid::new(
            format!("`{text}` is not a valid {what} name: use 1 to 128 letters, digits, `-`, `_` or `.`"),
            format!("write `{suggestion}`"),
        ));
    }
    Ok(Arc::from(text))
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl Visitor<'_> for NameVisitor {
            type Value = Name;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a name of letters, digits, `-`, `_` or `.`")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Name, E> {
                check_name(v, "rule or trigger").map(Name).map_err(Invalid::into_serde)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Name, E> {
                self.visit_str(&v.to_string())
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

fn names(list: Option<ListOf<Name>>) -> Vec<Arc<str>> {
    list.map(|list| list.0.into_iter().map(|name| name.0).collect()).unwrap_or_default()
}

/// A probability: `0.25` or `25%`.
struct Probability(f64);

impl<'de> Deserialize<'de> for Probability {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ProbabilityVisitor;
        impl ProbabilityVisitor {
            fn check<E: de::Error>(value: f64, written: &str) -> Result<Probability, E> {
                if (0.0..=1.0).contains(&value) {
                    Ok(Probability(value))
                } else {
                    Err(Invalid::new(
                        format!("the probability `{written}` is outside 0..1"),
                        "write a number from 0 to 1 such as 0.25, or a percentage such as 25%",
                    )
                    .into_serde())
                }
            }
        }
        impl Visitor<'_> for ProbabilityVisitor {
            type Value = Probability;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a probability such as 0.25 or 25%")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Probability, E> {
                Self::check(v, &v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Probability, E> {
                Self::check(v as f64, &v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Probability, E> {
                Self::check(v as f64, &v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Probability, E> {
                let parsed = match v.trim().strip_suffix('%') {
                    Some(percent) => percent.trim().parse::<f64>().map(|percent| percent / 100.0),
                    None => v.trim().parse::<f64>(),
                };
                match parsed {
                    Ok(value) if value.is_finite() => Self::check(value, v),
                    _ => Err(Invalid::new(
                        format!("`{v}` is not a probability"),
                        "write a number from 0 to 1 such as 0.25, or a percentage such as 25%",
                    )
                    .into_serde()),
                }
            }
        }
        deserializer.deserialize_any(ProbabilityVisitor)
    }
}

/// A count that must be at least 1.
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;
        impl Visitor<'_> for CountVisitor {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a whole number of at least 1")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                if v == 0 {
                    return Err(Invalid::new(
                        "a count of 0 never lets the rule fire",
                        "write 1 or more, or remove the rule",
                    )
                    .into_serde());
                }
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(Invalid::new(format!("the count {v} is negative"), "write 1 or more").into_serde()),
                }
            }
        }
        deserializer.deserialize_any(CountVisitor)
    }
}

struct PolicySpec {
    seed: u64,
    description: Option<String>,
    bad_sectors: Vec<DeclaredBadSector>,
    rules: Vec<RuleSpec>,
    schedule: Vec<ScheduleEntry>,
}

const NOTHING_TO_DO: &str = "the policy has no rules, no schedule and no bad sectors, so it would do nothing";
const NOTHING_TO_DO_FIX: &str =
    "add `rules:` with at least one rule, such as `rules: [{ when: { op: flush }, then: { error: EIO } }]`";

impl<'de> Deserialize<'de> for PolicySpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PolicyVisitor;
        impl<'de> Visitor<'de> for PolicyVisitor {
            type Value = PolicySpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a policy: a mapping with seed, bad_sectors, rules and schedule")
            }
            // An empty file reads as null.
            fn visit_unit<E: de::Error>(self) -> Result<PolicySpec, E> {
                Err(Invalid::new(NOTHING_TO_DO, NOTHING_TO_DO_FIX).into_serde())
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PolicySpec, A::Error> {
                let raw = RawPolicy::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if raw.rules.is_empty() && raw.schedule.is_empty() && raw.bad_sectors.is_empty() {
                    return Err(Invalid::new(NOTHING_TO_DO, NOTHING_TO_DO_FIX).into_serde());
                }
                Ok(PolicySpec {
                    seed: raw.seed,
                    description: raw.description,
                    bad_sectors: raw.bad_sectors,
                    rules: raw.rules,
                    schedule: raw.schedule,
                })
            }
        }
        deserializer.deserialize_map(PolicyVisitor)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    seed: u64,
    #[serde(default, deserialize_with = "present")]
    description: Option<String>,
    #[serde(default)]
    bad_sectors: Vec<DeclaredBadSector>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
    #[serde(default)]
    schedule: Vec<ScheduleEntry>,
}

// ---- bad sectors ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBadSector {
    range: Unit<ByteRange>,
    #[serde(default, deserialize_with = "present")]
    error: Option<Errno>,
    #[serde(default, deserialize_with = "present")]
    write_failures: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    name: Option<Name>,
}

impl<'de> Deserialize<'de> for DeclaredBadSector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BadSectorVisitor;
        impl<'de> Visitor<'de> for BadSectorVisitor {
            type Value = DeclaredBadSector;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte range such as 8s..+8s, or a mapping with range, error, write_failures and name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DeclaredBadSector, E> {
                let range = Unit::<ByteRange>::deserialize(v.into_deserializer())?.0;
                Ok(DeclaredBadSector { range, errno: Errno::EIO, write_failures: 0, name: Arc::from("bad-sectors") })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<DeclaredBadSector, A::Error> {
                let raw = RawBadSector::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(DeclaredBadSector {
                    range: raw.range.0,
                    errno: raw.error.unwrap_or(Errno::EIO),
                    write_failures: raw.write_failures.unwrap_or(0),
                    name: raw.name.map_or_else(|| Arc::from("bad-sectors"), |name| name.0),
                })
            }
        }
        deserializer.deserialize_any(BadSectorVisitor)
    }
}

// ---- rules ----

struct RuleSpec {
    name: Arc<str>,
    when: When,
    then: Then,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default, deserialize_with = "present")]
    name: Option<Name>,
    #[allow(dead_code)] // Documentation for people reading the policy.
    #[serde(default, deserialize_with = "present")]
    description: Option<String>,
    #[serde(default)]
    when: When,
    then: Then,
}

impl<'de> Deserialize<'de> for RuleSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "a rule: a mapping with name, when and then", check_rule)
    }
}

fn check_rule(raw: RawRule) -> Result<RuleSpec, Invalid> {
    let position = CONTEXT.with(|context| {
        let mut context = context.borrow_mut();
        context.rules += 1;
        context.rules
    });
    let name = match raw.name {
        Some(name) => name.0,
        None => Arc::from(format!("rule-{position}")),
    };
    let fresh = CONTEXT.with(|context| context.borrow_mut().names.insert(name.clone()));
    if !fresh {
        return Err(Invalid::new(
            format!("the rule name `{name}` is already used by an earlier rule"),
            format!("give this rule its own name, such as `{name}-{position}`"),
        ));
    }
    check_against_ops(raw.when.ops.as_deref(), &raw.when, &raw.then)?;
    Ok(RuleSpec { name, when: raw.when, then: raw.then })
}

/// Checks what can only be judged knowing both the operations matched and the outcome.
fn check_against_ops(ops: Option<&[Op]>, when: &When, then: &Then) -> Result<(), Invalid> {
    let described = match ops {
        Some(ops) => ops.iter().map(|op| op.name()).collect::<Vec<_>>().join(", "),
        None => "every operation (no `op`)".to_string(),
    };
    let only = |allowed: &[Op]| ops.is_some_and(|ops| ops.iter().all(|op| allowed.contains(op)));
    let data_writes = [Op::Write, Op::WriteZeroes];
    let side_effects = [Op::Write, Op::WriteZeroes, Op::Trim, Op::Flush];
    if then.torn.is_some() && !only(&data_writes) {
        return Err(Invalid::new(
            format!("`torn` tears a write, but this rule matches {described}"),
            "add `op: write` (or write_zeroes) to `when`",
        ));
    }
    if then.corrupt.is_some() && !only(&[Op::Read]) {
        return Err(Invalid::new(
            format!("`corrupt` damages the data of a read, but this rule matches {described}"),
            "add `op: read` to `when`; to lose or damage writes use `drop` or `torn`",
        ));
    }
    if then.sticky && !only(&data_writes) {
        return Err(Invalid::new(
            format!("`sticky` leaves the range of a failed write bad, but this rule matches {described}"),
            "add `op: write` to `when`; for ranges that are bad from the start use `bad_sectors:`",
        ));
    }
    if then.persist && !only(&side_effects) {
        return Err(Invalid::new(
            format!("`persist` keeps the effect of a failed request, but this rule matches {described}"),
            "add `op: write` (or write_zeroes, trim, flush) to `when`",
        ));
    }
    if then.drop && !only(&side_effects) {
        return Err(Invalid::new(
            format!("`drop` loses a write while reporting success, but this rule matches {described}"),
            "add `op: write` (or write_zeroes, trim, flush) to `when`",
        ));
    }
    if let Some(ops) = ops {
        if !when.ranges.is_empty() && ops.contains(&Op::Flush) {
            return Err(Invalid::new(
                "flush has no byte range, so `range` can never match it",
                "move `flush` to a rule of its own without `range`",
            ));
        }
        for (flag, carriers) in [
            (1u8 << 1, &[Op::WriteZeroes][..]),
            (1 << 2, &[Op::WriteZeroes][..]),
            (1 << 3, &[Op::Read][..]),
            (1 << 4, &[Op::BlockStatus][..]),
        ] {
            if when.flags_set & flag != 0 && !ops.iter().any(|op| carriers.contains(op)) {
                let name = crate::request::RequestFlags::NAMES[flag.trailing_zeros() as usize];
                return Err(Invalid::new(
                    format!("the `{name}` flag only comes with {}, which this rule does not match", carriers[0]),
                    format!("add {} to `op`, or remove `{name}: true`", carriers[0]),
                ));
            }
        }
    }
    Ok(())
}

// ---- when ----

/// The checked `when` of a rule.
#[derive(Debug, Clone, Default)]
pub(crate) struct When {
    ops: Option<Vec<Op>>,
    ranges: Vec<ByteRange>,
    flags_set: u8,
    flags_clear: u8,
    connections: Option<Vec<u64>>,
    requests: Option<Vec<u64>>,
    nth: Nth,
    limit: Option<u64>,
    probability: Option<f64>,
    armed_by: Vec<Arc<str>>,
    disarmed_by: Vec<Arc<str>>,
    from: Option<Duration>,
    until: Option<Duration>,
    since_armed: bool,
    cycle: Option<(Duration, Duration)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWhen {
    #[serde(default, deserialize_with = "present")]
    op: Option<ListOf<Op>>,
    #[serde(default, deserialize_with = "present")]
    range: Option<ListOf<Unit<ByteRange>>>,
    #[serde(default, deserialize_with = "present")]
    fua: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    no_hole: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    fast_zero: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    df: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    req_one: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    connection: Option<ListOf<u64>>,
    #[serde(default, deserialize_with = "present")]
    request: Option<ListOf<u64>>,
    #[serde(default, deserialize_with = "present")]
    nth: Option<NthSpec>,
    #[serde(default, deserialize_with = "present")]
    limit: Option<Count>,
    #[serde(default, deserialize_with = "present")]
    probability: Option<Probability>,
    #[serde(default, deserialize_with = "present")]
    armed_by: Option<ListOf<Name>>,
    #[serde(default, deserialize_with = "present")]
    disarmed_by: Option<ListOf<Name>>,
    #[serde(default, deserialize_with = "present")]
    from: Option<Unit<HumanDuration>>,
    #[serde(default, deserialize_with = "present")]
    until: Option<Unit<HumanDuration>>,
    #[serde(default, deserialize_with = "present")]
    since: Option<Since>,
    #[serde(default, deserialize_with = "present")]
    cycle: Option<Cycle>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum Since {
    Start,
    Armed,
}

impl<'de> Deserialize<'de> for When {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "the conditions of a rule: a mapping such as { op: write }", check_when)
    }
}

fn check_when(raw: RawWhen) -> Result<When, Invalid> {
    let mut flags_set = 0u8;
    let mut flags_clear = 0u8;
    for (bit, flag) in [raw.fua, raw.no_hole, raw.fast_zero, raw.df, raw.req_one].into_iter().enumerate() {
        match flag {
            Some(true) => flags_set |= 1 << bit,
            Some(false) => flags_clear |= 1 << bit,
            None => {}
        }
    }
    let mut ops = raw.op.map(|list| list.0);
    if let Some(ops) = &mut ops {
        ops.sort_unstable();
        ops.dedup();
    }
    let from = raw.from.map(|from| from.0.0);
    let until = raw.until.map(|until| until.0.0);
    if let (Some(from), Some(until)) = (from, until)
        && until <= from
    {
        return Err(Invalid::new(
            format!(
                "the time window is empty: `until` ({}) is not after `from` ({})",
                format_duration(until),
                format_duration(from)
            ),
            "make `until` later than `from`, or remove one of them",
        ));
    }
    let armed_by = names(raw.armed_by);
    let disarmed_by = names(raw.disarmed_by);
    if let Some(both) = armed_by.iter().find(|name| disarmed_by.contains(name)) {
        return Err(Invalid::new(
            format!("the trigger `{both}` is in both `armed_by` and `disarmed_by`, so the rule can never be active"),
            format!("keep `{both}` in one of them"),
        ));
    }
    let since_armed = raw.since == Some(Since::Armed);
    if since_armed && armed_by.is_empty() {
        return Err(Invalid::new(
            "`since: armed` measures time from the arming of the `armed_by` triggers, but there are none",
            "add `armed_by: TRIGGER`, or write `since: start`",
        ));
    }
    if raw.since.is_some() && from.is_none() && until.is_none() && raw.cycle.is_none() {
        return Err(Invalid::new(
            "`since` says where `from`, `until` and `cycle` count from, but none of them is set",
            "add `from:`, `until:` or `cycle:`, or remove `since`",
        ));
    }
    let nth = raw.nth.map(|nth| nth.0).unwrap_or_default();
    Ok(When {
        ops,
        ranges: raw.range.map(|list| list.0.into_iter().map(|range| range.0).collect()).unwrap_or_default(),
        flags_set,
        flags_clear,
        connections: raw.connection.map(|list| list.0),
        requests: raw.request.map(|list| list.0),
        nth,
        limit: raw.limit.map(|limit| limit.0),
        probability: raw.probability.map(|probability| probability.0),
        armed_by,
        disarmed_by,
        from,
        until,
        since_armed,
        cycle: raw.cycle.map(|cycle| (cycle.up, cycle.down)),
    })
}

/// `nth: 3` (exactly the third) or `nth: { first: N, every: N, after: N }`.
struct NthSpec(Nth);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNth {
    #[serde(default, deserialize_with = "present")]
    first: Option<Count>,
    #[serde(default, deserialize_with = "present")]
    every: Option<Count>,
    #[serde(default, deserialize_with = "present")]
    after: Option<u64>,
}

impl<'de> Deserialize<'de> for NthSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NthVisitor;
        impl<'de> Visitor<'de> for NthVisitor {
            type Value = NthSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an occurrence number such as 3, or a mapping with first, every and after")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<NthSpec, E> {
                if v == 0 {
                    return Err(Invalid::new(
                        "occurrences count from 1, so `nth: 0` never fires",
                        "write `nth: 1` for the first occurrence",
                    )
                    .into_serde());
                }
                Ok(NthSpec(Nth { after: v - 1, every: 1, first: Some(1) }))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<NthSpec, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => {
                        Err(Invalid::new(format!("`nth: {v}` is negative"), "write `nth: 1` or more").into_serde())
                    }
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<NthSpec, A::Error> {
                let raw = RawNth::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if raw.first.is_none() && raw.every.is_none() && raw.after.is_none() {
                    return Err(Invalid::new(
                        "`nth` is empty",
                        "write `first: N`, `every: N` or `after: N` in it, or remove it",
                    )
                    .into_serde());
                }
                let nth = Nth {
                    after: raw.after.unwrap_or(0),
                    every: raw.every.map_or(1, |every| every.0),
                    first: raw.first.map(|first| first.0),
                };
                if let Some(first) = nth.first
                    && first < nth.every
                {
                    return Err(Invalid::new(
                        format!("`every: {}` never fires within `first: {first}`", nth.every),
                        format!("make `first` at least {}, or remove one of them", nth.every),
                    )
                    .into_serde());
                }
                Ok(NthSpec(nth))
            }
        }
        deserializer.deserialize_any(NthVisitor)
    }
}

/// dm-flakey's up and down intervals.
struct Cycle {
    up: Duration,
    down: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCycle {
    up: Unit<HumanDuration>,
    down: Unit<HumanDuration>,
}

impl<'de> Deserialize<'de> for Cycle {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "a mapping such as { up: 9s, down: 1s }", |raw: RawCycle| {
            let (up, down) = (raw.up.0.0, raw.down.0.0);
            if down.is_zero() {
                return Err(Invalid::new(
                    "with `down: 0` the cycle is never down, so the rule never fires",
                    "give `down` a length such as 1s",
                ));
            }
            Ok(Cycle { up, down })
        })
    }
}

// ---- then ----

/// The checked `then` of a rule.
#[derive(Debug, Clone, Default)]
pub(crate) struct Then {
    error: Option<Errno>,
    delay: Option<DurationSpread>,
    stall: Option<(Arc<str>, Option<Duration>)>,
    persist: bool,
    drop: bool,
    torn: Option<Tear>,
    corrupt: Option<(u32, Option<u64>)>,
    sticky: bool,
    disconnect: bool,
    power_cut: bool,
    arm: Vec<Arc<str>>,
    disarm: Vec<Arc<str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThen {
    #[serde(default, deserialize_with = "present")]
    error: Option<Errno>,
    #[serde(default, deserialize_with = "present")]
    delay: Option<Unit<DurationSpread>>,
    #[serde(default, deserialize_with = "present")]
    stall: Option<StallSpec>,
    #[serde(default, deserialize_with = "present")]
    persist: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    drop: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    torn: Option<TornSpec>,
    #[serde(default, deserialize_with = "present")]
    corrupt: Option<CorruptSpec>,
    #[serde(default, deserialize_with = "present")]
    sticky: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    disconnect: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    power_cut: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    arm: Option<ListOf<Name>>,
    #[serde(default, deserialize_with = "present")]
    disarm: Option<ListOf<Name>>,
}

impl<'de> Deserialize<'de> for Then {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(deserializer, "the outcome of a rule: a mapping such as { error: EIO }", check_then)
    }
}

fn check_then(raw: RawThen) -> Result<Then, Invalid> {
    let then = Then {
        error: raw.error,
        delay: raw.delay.map(|delay| delay.0),
        stall: raw.stall.map(|stall| (stall.until, stall.timeout)),
        persist: raw.persist.unwrap_or(false),
        drop: raw.drop.unwrap_or(false),
        torn: raw.torn.map(|torn| torn.0),
        corrupt: raw.corrupt.map(|corrupt| (corrupt.bytes, corrupt.seed)),
        sticky: raw.sticky.unwrap_or(false),
        disconnect: raw.disconnect.unwrap_or(false),
        power_cut: raw.power_cut.unwrap_or(false),
        arm: names(raw.arm),
        disarm: names(raw.disarm),
    };
    let fails = then.error.is_some() || then.disconnect;
    if then.delay.is_some() && then.stall.is_some() {
        return Err(Invalid::new(
            "`delay` and `stall` both say how long to hold the request",
            "keep one: `delay` for a time, `stall` to hold until a trigger releases it",
        ));
    }
    if then.error.is_some() && then.disconnect {
        return Err(Invalid::new(
            "`disconnect` closes the connection without a reply, so `error` would never be sent",
            "keep `error` to reply with it, or `disconnect` to reply nothing",
        ));
    }
    if then.persist && !fails {
        return Err(Invalid::new(
            "`persist: true` keeps the data of a failed request, but nothing here fails it",
            "add `error: EIO` (persisted but reported failed), or remove `persist`",
        ));
    }
    if then.drop && fails {
        return Err(Invalid::new(
            "`drop` reports success while losing the write, which contradicts `error`/`disconnect`",
            "remove `drop` (a failed write is not done anyway), or remove the error",
        ));
    }
    let data_outcomes = [then.persist, then.drop, then.torn.is_some(), then.corrupt.is_some()];
    if data_outcomes.iter().filter(|&&set| set).count() > 1 {
        return Err(Invalid::new(
            "`persist`, `drop`, `torn` and `corrupt` each decide what happens to the data; only one can",
            "keep one of them, or split the rule in two with different `when`",
        ));
    }
    if then.corrupt.is_some() && fails {
        return Err(Invalid::new(
            "`corrupt` hands damaged data to the client, but a failed read hands it no data",
            "remove `error`/`disconnect` to return corrupted data, or remove `corrupt`",
        ));
    }
    if then.sticky && then.error.is_none() {
        return Err(Invalid::new(
            "`sticky` makes the range of a failed write fail later reads, but this write does not fail",
            "add `error: EIO`",
        ));
    }
    if let Some(both) = then.arm.iter().find(|name| then.disarm.contains(name)) {
        return Err(Invalid::new(
            format!("the trigger `{both}` is both armed and disarmed"),
            format!("keep `{both}` in `arm` or in `disarm`"),
        ));
    }
    Ok(then)
}

/// `stall: TRIGGER` or `stall: { until: TRIGGER, timeout: 30s }`.
struct StallSpec {
    until: Arc<str>,
    timeout: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStall {
    until: Name,
    #[serde(default, deserialize_with = "present")]
    timeout: Option<Unit<HumanDuration>>,
}

impl<'de> Deserialize<'de> for StallSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StallVisitor;
        impl<'de> Visitor<'de> for StallVisitor {
            type Value = StallSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a trigger name, or a mapping such as { until: release, timeout: 30s }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<StallSpec, E> {
                let until = check_name(v, "trigger").map_err(Invalid::into_serde)?;
                Ok(StallSpec { until, timeout: None })
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<StallSpec, A::Error> {
                let raw = RawStall::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let timeout = raw.timeout.map(|timeout| timeout.0.0);
                if timeout.is_some_and(|timeout| timeout.is_zero()) {
                    return Err(Invalid::new(
                        "a stall with `timeout: 0` does not hold the request at all",
                        "give a timeout such as 30s, or remove it to wait for the trigger alone",
                    )
                    .into_serde());
                }
                Ok(StallSpec { until: raw.until.0, timeout })
            }
        }
        deserializer.deserialize_any(StallVisitor)
    }
}

/// `torn: 4KiB` or `torn: { persist: 512..8KiB, align: 512 }`.
struct TornSpec(Tear);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTorn {
    persist: Unit<TearSize>,
    #[serde(default, deserialize_with = "present")]
    align: Option<Unit<Size>>,
}

impl<'de> Deserialize<'de> for TornSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TornVisitor;
        fn tear<E: de::Error>(size: TearSize, align: Option<u64>) -> Result<TornSpec, E> {
            let align = align.unwrap_or(512);
            if align == 0 {
                return Err(
                    Invalid::new("`align: 0` is not a step", "write `align: 512` or `align: 4KiB`").into_serde()
                );
            }
            if size.min != size.max && (size.min % align != 0 || size.max % align != 0) {
                return Err(Invalid::new(
                    format!(
                        "the bounds {}..{} are not multiples of `align` ({})",
                        format_size(size.min),
                        format_size(size.max),
                        format_size(align)
                    ),
                    "make both bounds multiples of `align`, or change `align`",
                )
                .into_serde());
            }
            Ok(TornSpec(Tear { min: size.min, max: size.max, align }))
        }
        impl<'de> Visitor<'de> for TornVisitor {
            type Value = TornSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("the bytes that persist, such as 4KiB, or a mapping such as { persist: 512..8KiB }")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<TornSpec, E> {
                tear(TearSize { min: v, max: v }, None)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TornSpec, E> {
                let size = Unit::<TearSize>::deserialize(v.into_deserializer())?.0;
                tear(size, None)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<TornSpec, A::Error> {
                let raw = RawTorn::deserialize(de::value::MapAccessDeserializer::new(map))?;
                tear(raw.persist.0, raw.align.map(|align| align.0.0))
            }
        }
        deserializer.deserialize_any(TornVisitor)
    }
}

/// `corrupt: 16` (bytes) or `corrupt: { bytes: 16, seed: 7 }`.
struct CorruptSpec {
    bytes: u32,
    seed: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCorrupt {
    #[serde(default, deserialize_with = "present")]
    bytes: Option<u32>,
    #[serde(default, deserialize_with = "present")]
    seed: Option<u64>,
}

impl<'de> Deserialize<'de> for CorruptSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CorruptVisitor;
        fn corrupt<E: de::Error>(bytes: u32, seed: Option<u64>) -> Result<CorruptSpec, E> {
            if bytes == 0 {
                return Err(Invalid::new("corrupting 0 bytes changes nothing", "write `bytes: 1` or more").into_serde());
            }
            Ok(CorruptSpec { bytes, seed })
        }
        impl<'de> Visitor<'de> for CorruptVisitor {
            type Value = CorruptSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of bytes to corrupt, or a mapping such as { bytes: 16, seed: 7 }")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CorruptSpec, E> {
                let bytes = u32::try_from(v).map_err(|_| {
                    Invalid::new(format!("{v} bytes is too many to corrupt"), "write at most 4294967295").into_serde()
                })?;
                corrupt(bytes, None)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<CorruptSpec, E> {
                if v {
                    corrupt(1, None)
                } else {
                    Err(Invalid::new("`corrupt: false` corrupts nothing", "remove `corrupt`").into_serde())
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CorruptSpec, A::Error> {
                let raw = RawCorrupt::deserialize(de::value::MapAccessDeserializer::new(map))?;
                corrupt(raw.bytes.unwrap_or(1), raw.seed)
            }
        }
        deserializer.deserialize_any(CorruptVisitor)
    }
}

// ---- schedule ----

/// One request decided by its index, as [`crate::replay_policy`] writes them.
struct ScheduleEntry {
    request: u64,
    op: Op,
    rule: Arc<str>,
    then: Then,
    bad_sector: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduleEntry {
    request: u64,
    op: Op,
    rule: Name,
    then: Then,
    /// The logged failure came from a bad sector, not from the rule itself.
    #[serde(default)]
    bad_sector: bool,
}

impl<'de> Deserialize<'de> for ScheduleEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        checked_map(
            deserializer,
            "a schedule entry: a mapping with request, op, rule and then",
            |raw: RawScheduleEntry| {
                let fresh = CONTEXT.with(|context| context.borrow_mut().scheduled.insert(raw.request));
                if !fresh {
                    return Err(Invalid::new(
                        format!("request {} is scheduled twice", raw.request),
                        "keep one entry per request index",
                    ));
                }
                check_against_ops(Some(&[raw.op]), &When::default(), &raw.then)?;
                if raw.bad_sector && raw.then.error.is_none() {
                    return Err(Invalid::new(
                        "`bad_sector: true` marks a failure from a bad sector, but `then` has no `error`",
                        "add the errno the bad sector returned, such as `error: EIO`",
                    ));
                }
                Ok(ScheduleEntry {
                    request: raw.request,
                    op: raw.op,
                    rule: raw.rule.0,
                    then: raw.then,
                    bad_sector: raw.bad_sector,
                })
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(text: &str) -> PolicyError {
        Policy::from_yaml(text, "test.yaml").expect_err("the policy should be refused")
    }

    #[test]
    fn nth_counts_after_skipping_and_within_first() {
        let every_third = Nth { after: 0, every: 3, first: None };
        assert_eq!((1..=9).filter(|&k| every_third.admits(k)).collect::<Vec<_>>(), [3, 6, 9]);
        let after_two = Nth { after: 2, every: 1, first: Some(2) };
        assert_eq!((1..=9).filter(|&k| after_two.admits(k)).collect::<Vec<_>>(), [3, 4]);
        let third_only = Nth { after: 2, every: 1, first: Some(1) };
        assert_eq!((1..=9).filter(|&k| third_only.admits(k)).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn a_cycle_is_active_only_in_its_down_part() {
        let window = Window {
            since_armed: false,
            from: Duration::ZERO,
            until: None,
            cycle: Some((Duration::from_secs(9), Duration::from_secs(1))),
        };
        assert!(!window.admits(Duration::from_millis(8999)));
        assert!(window.admits(Duration::from_millis(9000)));
        assert!(window.admits(Duration::from_millis(9999)));
        assert!(!window.admits(Duration::from_millis(10_000)));
        assert!(window.admits(Duration::from_millis(19_500)));
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
        let clean = Policy::from_yaml(include_str!("../scenarios/issue-example.yaml"), "ok.yaml").unwrap();
        assert!(clean.warnings().is_empty());
    }

    #[test]
    fn the_issue_example_is_accepted() {
        let policy = Policy::from_yaml(include_str!("../scenarios/issue-example.yaml"), "issue-example.yaml").unwrap();
        assert_eq!(
            policy.rule_names().collect::<Vec<_>>(),
            ["fail-file-data", "every-third-fua-write", "flaky-flush", "slow-reads"]
        );
        assert_eq!(policy.seed(), 42);
        assert_eq!(policy.trigger_names(), ["go"]);
        assert!(!policy.can_cut_power());
    }
}
