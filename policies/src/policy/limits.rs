//! Limits on policy input, checked before the YAML is parsed, so that a hostile or careless
//! policy costs little work and little memory to refuse.
//!
//! serde_yaml has libyaml read a whole document into events before serde sees any of it, and
//! libyaml's cost for each token grows with the flow nesting around it: `[[[[...` 80,000 deep took
//! 90 s. serde_yaml also expands each alias (`*name`) in full wherever it is used, so a small file
//! of aliases to aliases unfolds into gigabytes. The pre-scan reads the text as YAML events first,
//! with saphyr-parser (pure Rust), counting nesting depth and the nodes the document has once
//! every alias is expanded, and stops at the first event over a limit: its cost is bounded by the
//! input size times the depth limit. One shape costs more: saphyr-parser reads a flow collection
//! that could be a key (`[...]` or `{...}` starting a document or a `- ` item) to its end before
//! its first event, holding its tokens: up to about 170 bytes per byte of input (350 MB for a
//! 2 MiB `[a,a,...]`, 80 MB for a 2 MiB policy written as JSON; see docs/performance.md).
//!
//! Two parsers can read one text differently. saphyr-parser reads YAML 1.2 and libyaml, which
//! serde_yaml runs, YAML 1.1; they differ mostly on scalars (`yes`, `0o17`), which are counted,
//! never interpreted. Where their structure can differ, the pre-scan follows libyaml or stops
//! trusting saphyr-parser:
//! - libyaml also ends lines at NEL, LS and PS (U+0085, U+2028, U+2029): the pre-scan reads them
//!   as line feeds, so that a comment ends where libyaml ends it;
//! - libyaml skips a byte order mark at the start like a space: so does the pre-scan. Elsewhere
//!   the parsers treat one differently, and they end an anchor name followed by `:`, `?`, `%`,
//!   `@` or a backquote at different places: the parser reads the text up to there only;
//! - in a flow collection libyaml reads `?x` as a key `x` and ` :x` as a value `x`, where
//!   saphyr-parser reads the plain scalars `?x` and `:x`: the pre-scan stops at such a scalar;
//! - saphyr-parser stops at a syntax error (or at an alias to an unknown anchor), where libyaml
//!   may read on.
//!
//! serde_yaml numbers a redefined anchor (`&a` ... `&a`) as the next new one, so an alias to it can
//! expand to another, larger node: a policy with such an anchor and aliases to it is refused.
//!
//! Past where its parser stopped, the pre-scan bounds what any YAML parser can find in the rest of
//! the text: no deeper than its `[` and `{` allow, no more than three nodes per character that is
//! not white space, aliases no larger than the largest anchor read, and aliases to anchors it could
//! not read are refused. Within the limits, serde_yaml then reads the policy and reports its own
//! syntax error, if any; over them, the policy is refused with the limit, saphyr-parser's reason
//! and where it stopped. The tests below check that on every policy the project ships and on
//! generated YAML, the counts equal those of serde_yaml's own reading.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use crate::error::Invalid;

/// How much a policy may ask of the server. Every way a policy is read ([`crate::Policy::from_yaml`],
/// the control API, `nbdfault policy check`, the server's start-up) applies the same defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyLimits {
    /// Bytes of YAML text.
    pub max_bytes: usize,
    /// Nesting of mappings and sequences. A policy needs about 6 levels.
    pub max_depth: usize,
    /// YAML nodes (scalars, mappings, sequences) once every alias is expanded.
    pub max_nodes: usize,
    /// Rules plus schedule entries.
    pub max_rules: usize,
    /// Time the pre-scan may take before it gives up: a backstop, since the other limits
    /// already bound its work (about 0.1 s for 2 MiB in a release build).
    pub deadline: Duration,
}

impl PolicyLimits {
    pub const DEFAULT: PolicyLimits = PolicyLimits {
        max_bytes: 2 << 20,
        max_depth: 64,
        max_nodes: 1_000_000,
        max_rules: 50_000,
        deadline: Duration::from_secs(30),
    };
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits::DEFAULT
    }
}

/// A limit the input went over, and where (1-based line and column).
#[derive(Debug)]
pub(crate) struct OverLimit {
    pub line: usize,
    pub column: usize,
    pub invalid: Invalid,
}

/// Checks the size, then reads the event stream for depth, expanded nodes and time. A YAML
/// syntax error within the limits is left to serde_yaml, which reports it with its own wording.
pub(crate) fn prescan(text: &str, limits: &PolicyLimits) -> Result<(), OverLimit> {
    measure(text, limits).map(|_| ())
}

/// What the pre-scan counted in a text within the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Measure {
    /// The deepest nesting of mappings and sequences.
    pub depth: usize,
    /// Nodes once every alias is expanded, over every document of the text.
    pub nodes: usize,
    /// Where the parser stopped reading before the end, if it did (1-based line and column):
    /// the counts are then bounds, not exact.
    pub stopped: Option<(usize, usize)>,
}

pub(crate) fn measure(text: &str, limits: &PolicyLimits) -> Result<Measure, OverLimit> {
    if text.len() > limits.max_bytes {
        return Err(OverLimit {
            line: 1,
            column: 1,
            invalid: Invalid::new(
                format!(
                    "the policy has {} bytes, over the limit of {} bytes (max_bytes)",
                    text.len(),
                    limits.max_bytes
                ),
                "split it into smaller policies, or shorten it (aliases, ranges in lists)",
            ),
        });
    }
    let started = Instant::now();
    let source = Source::new(text)?;
    let mut count = Count::new(limits);
    let mut parser = Parser::new_from_str(source.readable());
    let mut events = 0u64;
    let stop = loop {
        let (event, span) = match parser.next_event() {
            None => break source.untrusted.clone(),
            Some(Ok(next)) => next,
            Some(Err(error)) => {
                let at = error.marker();
                let error = Stop { line: at.line(), column: at.col() + 1, reason: error.info().to_string() };
                // An error where the readable text ends is the end of the text cut short, not the
                // policy's: where it was cut, and why, says more.
                break match &source.untrusted {
                    Some(cut) if (error.line, error.column) >= (cut.line, cut.column) => Some(cut.clone()),
                    _ => Some(error),
                };
            }
        };
        // libyaml reads the `?` or `:` as an indicator here (in a flow collection, whatever
        // follows it); saphyr-parser, as YAML 1.2 does, as the start of a plain scalar.
        if let Event::Scalar(value, ScalarStyle::Plain, ..) = &event
            && value.starts_with(['?', ':'])
        {
            let start: String = value.chars().take(2).collect();
            let reason = format!("the scalar `{start}` starts with an indicator, which YAML parsers read differently");
            break Some(Stop { line: span.start.line(), column: span.start.col() + 1, reason });
        }
        events += 1;
        if events % 4096 == 0 && started.elapsed() > limits.deadline {
            return Err(OverLimit {
                line: span.start.line(),
                column: span.start.col() + 1,
                invalid: Invalid::new(
                    format!("reading the policy took over {:?}, the limit (deadline)", limits.deadline),
                    "simplify the policy: fewer nodes, less nesting",
                ),
            });
        }
        count.event(&event, span)?;
    };
    match stop {
        None => Ok(Measure { depth: count.deepest, nodes: count.nodes, stopped: None }),
        Some(stop) => count.bound_rest(&source, &stop),
    }
}

/// The text as the pre-scan's parser reads it: character for character the policy, with NEL, LS
/// and PS as line feeds and a byte order mark at the start as a space, as libyaml reads them.
struct Source<'t> {
    text: Cow<'t, str>,
    /// The first place where the two parsers could part, and the bytes of text before it: all
    /// the parser reads.
    untrusted: Option<Stop>,
    readable: usize,
}

/// Where the pre-scan's parser stopped reading, and why.
#[derive(Debug, Clone)]
struct Stop {
    line: usize,
    column: usize,
    reason: String,
}

impl<'t> Source<'t> {
    fn new(text: &'t str) -> Result<Source<'t>, OverLimit> {
        let text = if text.starts_with('\u{feff}') || text.contains(['\u{85}', '\u{2028}', '\u{2029}']) {
            let mut chars = text.chars();
            let first = chars.next().map(|first| if first == '\u{feff}' { ' ' } else { first });
            Cow::Owned(
                first
                    .into_iter()
                    .chain(chars)
                    .map(|c| if matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}') { '\n' } else { c })
                    .collect(),
            )
        } else {
            Cow::Borrowed(text)
        };
        let (readable, untrusted) = match Source::scan(&text)? {
            Some((at, stop)) => (at, Some(stop)),
            None => (text.len(), None),
        };
        Ok(Source { text, untrusted, readable })
    }

    /// Finds the first byte order mark past the start, anchor or alias name that libyaml ends at
    /// a `:`, `?`, `%`, `@` or backquote (saphyr-parser reads on): its byte, line and column.
    ///
    /// Refuses an anchor name defined twice in a text that has aliases to it: serde_yaml numbers
    /// a redefined anchor as the next new one, so that an alias to it can expand to another node
    /// than the one it names, which no count of the YAML can foresee. Anchor and alias names are
    /// libyaml's (letters, digits, `_`, `-`), found wherever they could be, scalars and comments
    /// included: more than the YAML has, never fewer.
    fn scan(text: &str) -> Result<Option<(usize, Stop)>, OverLimit> {
        let mut untrusted = None;
        let mut anchors: HashMap<&str, Vec<Position>> = HashMap::new();
        let mut aliases = std::collections::HashSet::new();
        let mut position = Position::start();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            let reason = match c {
                '\u{feff}' => Some("a byte order mark (U+FEFF) past the start of the text"),
                '&' | '*' => {
                    let length = text[at + 1..].bytes().take_while(|&b| is_anchor_byte(b)).count();
                    let name = &text[at + 1..at + 1 + length];
                    if length > 0 && c == '&' {
                        anchors.entry(name).or_default().push(position);
                    } else if length > 0 {
                        aliases.insert(name);
                    }
                    let next = text.as_bytes().get(at + 1 + length);
                    (length > 0 && matches!(next, Some(b':' | b'?' | b'%' | b'@' | b'`')))
                        .then_some("an anchor or alias name followed by `:`, `?`, `%`, `@` or a backquote")
                }
                _ => None,
            };
            if let (Some(reason), None) = (reason, &untrusted) {
                let reason = format!("{reason}, which YAML parsers read differently");
                untrusted = Some((at, Stop { line: position.line, column: position.column, reason }));
            }
            position.advance(c, chars.peek().map(|&(_, next)| next));
        }
        let redefined = anchors
            .iter()
            .filter(|(name, defined)| defined.len() > 1 && aliases.contains(*name))
            .min_by_key(|(_, defined)| (defined[1].line, defined[1].column));
        if let Some((name, defined)) = redefined {
            let (first, again) = (defined[0], defined[1]);
            return Err(OverLimit {
                line: again.line,
                column: again.column,
                invalid: Invalid::new(
                    format!(
                        "the anchor `&{name}` is defined again here (first at line {} column {}), and aliases use \
                         it: the policy reader can then expand an alias to another node than the one it names, \
                         which the limit on nodes (max_nodes) cannot count",
                        first.line, first.column
                    ),
                    "give each anchor (`&name`) a name of its own",
                ),
            });
        }
        Ok(untrusted)
    }

    /// What the parser reads: the text up to the first untrusted place.
    fn readable(&self) -> &str {
        &self.text[..self.readable]
    }
}

/// A character of an anchor or alias name, as libyaml reads them.
fn is_anchor_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-'
}

/// A 1-based line and column, counted as both parsers count them: in characters, a line ending
/// at `\n`, `\r\n` or a lone `\r`.
#[derive(Debug, Clone, Copy)]
struct Position {
    line: usize,
    column: usize,
}

impl Position {
    fn start() -> Position {
        Position { line: 1, column: 1 }
    }

    fn advance(&mut self, c: char, next: Option<char>) {
        if c == '\n' || (c == '\r' && next != Some('\n')) {
            self.line += 1;
            self.column = 1;
        } else {
            self.column += 1;
        }
    }
}

/// The counts, as the events come.
struct Count<'l> {
    limits: &'l PolicyLimits,
    depth: usize,
    deepest: usize,
    nodes: usize,
    /// For each open collection, the deepest level reached inside it, aliases expanded.
    reach: Vec<usize>,
    /// The expanded size and height (levels, itself included) of each anchored node read, by
    /// the parser's anchor id (unique in the text: an anchor defined again gets a new one), and
    /// the largest of both in this document.
    anchored: HashMap<usize, (usize, usize)>,
    largest: (usize, usize),
    /// Anchored collections still open: anchor id, nodes before it, its depth.
    open: Vec<(usize, usize, usize)>,
    /// The start of the last node read (as a character index, and a position) and the depth
    /// around it: where a bound on the rest of the text starts if the parser stops.
    resume: (usize, Position, usize),
    /// Whether an anchored collection ended after that node: where the parser stops early, it
    /// ends what is open, so such a collection may really go on into the rest.
    ended_since_resume: bool,
}

impl<'l> Count<'l> {
    fn new(limits: &'l PolicyLimits) -> Count<'l> {
        Count {
            limits,
            depth: 0,
            deepest: 0,
            nodes: 0,
            reach: Vec::new(),
            anchored: HashMap::new(),
            largest: (0, 0),
            open: Vec::new(),
            resume: (0, Position::start(), 0),
            ended_since_resume: false,
        }
    }

    fn event(&mut self, event: &Event<'_>, span: Span) -> Result<(), OverLimit> {
        let over = |invalid| Err(OverLimit { line: span.start.line(), column: span.start.col() + 1, invalid });
        let node = |count: &mut Count<'_>| {
            let at = Position { line: span.start.line(), column: span.start.col() + 1 };
            count.resume = (span.start.index(), at, count.depth);
            count.ended_since_resume = false;
        };
        match *event {
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                node(self);
                self.depth += 1;
                self.nodes += 1;
                self.reach.push(self.depth);
                self.deepest = self.deepest.max(self.depth);
                if self.depth > self.limits.max_depth {
                    return over(self.too_deep(""));
                }
                if anchor > 0 {
                    self.open.push((anchor, self.nodes - 1, self.depth));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let reach = self.reach.pop().unwrap_or(self.depth);
                if self.open.last().is_some_and(|&(_, _, at)| at == self.depth) {
                    let (anchor, before, _) = self.open.pop().expect("checked above");
                    self.anchor(anchor, self.nodes - before, reach + 1 - self.depth);
                    self.ended_since_resume = true;
                }
                self.depth = self.depth.saturating_sub(1);
                self.reached(reach);
            }
            Event::Scalar(_, _, anchor, _) => {
                node(self);
                self.nodes += 1;
                if anchor > 0 {
                    self.anchor(anchor, 1, 0);
                }
            }
            Event::Alias(anchor) => {
                node(self);
                // The parser refuses unknown anchors: one not yet measured is still open, and
                // the alias is inside the node it names.
                let Some(&(size, height)) = self.anchored.get(&anchor) else {
                    return over(Invalid::new(
                        format!(
                            "this alias refers to a node that contains it, which expands without end: over the \
                             limit of {} YAML nodes (max_nodes)",
                            self.limits.max_nodes
                        ),
                        "an alias (`*name`) may only refer to an anchored node (`&name`) that ends before it",
                    ));
                };
                self.nodes = self.nodes.saturating_add(size);
                let reach = self.depth + height;
                self.deepest = self.deepest.max(reach);
                self.reached(reach);
                if reach > self.limits.max_depth {
                    return over(self.too_deep(" once this alias is expanded"));
                }
            }
            // Anchors do not reach across documents.
            Event::DocumentStart(_) => {
                self.anchored.clear();
                self.largest = (0, 0);
            }
            _ => {}
        }
        if self.nodes > self.limits.max_nodes {
            return over(self.too_many_nodes());
        }
        Ok(())
    }

    fn anchor(&mut self, anchor: usize, size: usize, height: usize) {
        self.anchored.insert(anchor, (size, height));
        self.largest = (self.largest.0.max(size), self.largest.1.max(height));
    }

    /// Something inside the innermost open collection reaches level `reach`.
    fn reached(&mut self, reach: usize) {
        if let Some(top) = self.reach.last_mut() {
            *top = (*top).max(reach);
        }
    }

    fn too_deep(&self, how: &str) -> Invalid {
        Invalid::new(
            format!("the policy nests deeper than the limit of {} levels (max_depth){how}", self.limits.max_depth),
            "a policy needs only a few levels: remove the extra brackets or indentation",
        )
    }

    fn too_many_nodes(&self) -> Invalid {
        Invalid::new(
            format!(
                "the policy has over {} YAML nodes once its aliases are expanded, the limit (max_nodes)",
                self.limits.max_nodes
            ),
            "use fewer aliases (`*name`) to large anchors, or split the policy",
        )
    }

    /// The parser stopped at `stop`: bounds what any parser can find from the last node read to
    /// the end of the text, and refuses the policy if the bounds are over the limits.
    ///
    /// - Flow levels: one per `{`, and per `[` (two when the rest has a `:` or a `?`: `[a: b]`
    ///   and `[?a]` are sequences of a mapping).
    /// - Block levels: a nested block collection starts at a greater column than the one around
    ///   it, except a sequence in a mapping, which may start at the mapping's column (but not a
    ///   mapping in that sequence). Its column is a line's indentation or follows `- `, `? ` or a
    ///   line's leading `: `; so a chain of block collections has at most two per such column.
    /// - A `:` can make the node before it a key, and so add a mapping around it (a block
    ///   mapping, or a pair in a flow sequence): libyaml looks for that `:` on the key's line
    ///   only, so each `:` on the rest of the last line read can add a level around what is open.
    /// - Nodes: at most three per character that is not white space (`? ` alone is a mapping, an
    ///   empty key and an empty value); aliases at most the largest anchor read, and none to an
    ///   anchor not read or whose collection the parser ended only where it stopped.
    fn bound_rest(self, source: &Source<'_>, stop: &Stop) -> Result<Measure, OverLimit> {
        let (index, mut position, around) = self.resume;
        let start = source.text.char_indices().nth(index).map_or(source.text.len(), |(at, _)| at);
        let rest = &source.text[start..];
        let unread = format!(
            "the YAML from line {} column {} on could not be read to count it ({})",
            stop.line, stop.column, stop.reason
        );
        let fix_here = format!("check the YAML syntax at line {} column {}", stop.line, stop.column);
        let too_deep = |line, column, here: &str| OverLimit {
            line,
            column,
            invalid: Invalid::new(
                format!(
                    "the policy could nest deeper than the limit of {} levels (max_depth): {unread}, and {here}",
                    self.limits.max_depth
                ),
                format!("a policy needs only a few levels: remove the extra brackets, and {fix_here}"),
            ),
        };
        let (mut brackets, mut solid, mut anchors, mut aliases) = (0usize, 0usize, 0usize, 0usize);
        let pairs = usize::from(rest.contains([':', '?']));
        let resume_line = rest.split(['\n', '\r']).next().unwrap_or_default();
        let keys = resume_line.matches(':').count().min(around + 1);
        let around = around + keys;
        let mut columns = std::collections::BTreeSet::new();
        // Whether the next character that is not white space starts a line, or follows `- `,
        // `? ` or a line's leading `: `.
        let (mut line_start, mut after_indicator) = (true, false);
        let mut chars = rest.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            let next = chars.peek().map(|&(_, next)| next);
            let blank = matches!(c, ' ' | '\t' | '\n' | '\r');
            if !blank {
                solid += 1;
                if line_start || after_indicator {
                    columns.insert(position.column);
                }
                let leading = line_start;
                (line_start, after_indicator) = (false, false);
                if matches!(c, '-' | '?') || (c == ':' && leading) {
                    after_indicator = matches!(next, Some(' ' | '\t'));
                }
            }
            match c {
                '[' | '{' => {
                    brackets += if c == '[' { 1 + pairs } else { 1 };
                    if around + brackets > self.limits.max_depth {
                        let (line, column) = (position.line, position.column);
                        // The parser's own limit: 255 brackets open at once, so certainly too deep.
                        if stop.reason.contains("recursion limit") && keys + pairs == 0 {
                            return Err(OverLimit { line, column, invalid: self.too_deep("") });
                        }
                        let level = around + brackets;
                        return Err(too_deep(line, column, &format!("its brackets could open level {level} here")));
                    }
                }
                '&' | '*' if rest.as_bytes().get(at + 1).is_some_and(|&b| is_anchor_byte(b)) => {
                    if c == '&' {
                        anchors += 1;
                    } else {
                        aliases += 1;
                    }
                }
                _ => {}
            }
            position.advance(c, next);
            if position.column == 1 {
                (line_start, after_indicator) = (true, false);
            }
        }
        let (largest_size, largest_height) = self.largest;
        let expanded = if aliases > 0 { largest_height } else { 0 };
        let depth = (around + 2 * columns.len() + brackets + expanded).max(self.deepest + keys);
        if depth > self.limits.max_depth {
            let here = format!(
                "what follows could nest {depth} levels ({} columns of block indentation, {brackets} brackets)",
                columns.len()
            );
            return Err(too_deep(stop.line, stop.column, &here));
        }
        let over_nodes = |why: String| {
            Err(OverLimit {
                line: stop.line,
                column: stop.column,
                invalid: Invalid::new(
                    format!(
                        "the policy could have over {} YAML nodes once its aliases are expanded, the limit \
                         (max_nodes): {unread}, and {why}",
                        self.limits.max_nodes
                    ),
                    format!("{fix_here}, or split the policy"),
                ),
            })
        };
        if aliases > 0 && (anchors > 0 || !self.open.is_empty() || self.ended_since_resume) {
            return over_nodes("what follows has aliases (`*name`) to anchors that were not read".to_string());
        }
        let nodes = self.nodes.saturating_add(solid.saturating_mul(3)).saturating_add(1);
        let nodes = nodes.saturating_add(aliases.saturating_mul(largest_size));
        if nodes > self.limits.max_nodes {
            return over_nodes(format!("what follows could hold up to {nodes} nodes"));
        }
        Ok(Measure { depth, nodes, stopped: Some((stop.line, stop.column)) })
    }
}

#[cfg(test)]
mod tests;
