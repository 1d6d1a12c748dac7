//! Limits on policy input, checked before the YAML is parsed, so that a hostile or careless
//! policy costs little work and little memory to refuse.
//!
//! libyaml (under serde_yaml) reads a whole document into events before serde sees it, and the
//! cost of each token grows with the flow nesting around it: `[[[[...` 80,000 deep took 90 s.
//! serde_yaml expands each alias (`*name`) in full wherever it is used, so a small file of
//! aliases to aliases unfolds into gigabytes. The pre-scan here walks the same libyaml event
//! stream serde_yaml will read, counting nesting depth and the nodes the document has once every
//! alias is expanded, and stops at the first event over a limit: its cost is bounded by the
//! input size times the depth limit.

use std::collections::HashMap;
use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use unsafe_libyaml as unsafe_sys;

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

/// Checks the size, then walks the event stream for depth, expanded nodes and time. A YAML
/// syntax error ends the walk without an error: serde_yaml reports it (with its own wording)
/// after reading the same events, which passed the limits so far.
pub(crate) fn prescan(text: &str, limits: &PolicyLimits) -> Result<(), OverLimit> {
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
    let mut parser = EventParser::new(text.as_bytes());
    let mut depth = 0usize;
    let mut nodes = 0usize;
    // The expanded size of each anchored node, and the anchored collections still open.
    let mut anchored: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut open: Vec<(Vec<u8>, usize, usize)> = Vec::new();
    let mut events = 0u64;
    while let Some((event, line, column)) = parser.next() {
        let over = |invalid| Err(OverLimit { line, column, invalid });
        events += 1;
        if events % 4096 == 0 && started.elapsed() > limits.deadline {
            return over(Invalid::new(
                format!("reading the policy took over {:?}, the limit (deadline)", limits.deadline),
                "simplify the policy: fewer nodes, less nesting",
            ));
        }
        match event {
            Event::Start(anchor) => {
                depth += 1;
                nodes += 1;
                if depth > limits.max_depth {
                    return over(Invalid::new(
                        format!("the policy nests deeper than the limit of {} levels (max_depth)", limits.max_depth),
                        "a policy needs only a few levels: remove the extra brackets or indentation",
                    ));
                }
                if let Some(anchor) = anchor {
                    open.push((anchor, nodes - 1, depth));
                }
            }
            Event::End => {
                if open.last().is_some_and(|&(_, _, at)| at == depth) {
                    let (anchor, before, _) = open.pop().expect("checked above");
                    anchored.insert(anchor, nodes - before);
                }
                depth = depth.saturating_sub(1);
            }
            Event::Scalar(anchor) => {
                nodes += 1;
                if let Some(anchor) = anchor {
                    anchored.insert(anchor, 1);
                }
            }
            // An unknown alias is serde_yaml's error to report.
            Event::Alias(anchor) => nodes = nodes.saturating_add(anchored.get(&anchor).copied().unwrap_or(1)),
            Event::Other => {}
        }
        if nodes > limits.max_nodes {
            return over(Invalid::new(
                format!(
                    "the policy has over {} YAML nodes once its aliases are expanded, the limit (max_nodes)",
                    limits.max_nodes
                ),
                "use fewer aliases (`*name`) to large anchors, or split the policy",
            ));
        }
    }
    Ok(())
}

/// What the pre-scan needs of a libyaml event.
enum Event {
    /// A mapping or sequence starts, with its anchor.
    Start(Option<Vec<u8>>),
    End,
    Scalar(Option<Vec<u8>>),
    Alias(Vec<u8>),
    Other,
}

/// libyaml's event parser over a borrowed string: the one serde_yaml runs, so the pre-scan sees
/// exactly the events serde_yaml will.
struct EventParser<'input> {
    parser: Box<MaybeUninit<unsafe_sys::yaml_parser_t>>,
    done: bool,
    _input: &'input [u8],
}

impl<'input> EventParser<'input> {
    fn new(input: &'input [u8]) -> EventParser<'input> {
        let mut parser = Box::new(MaybeUninit::<unsafe_sys::yaml_parser_t>::uninit());
        // SAFETY: libyaml initializes the parser in place and reads `input`, which outlives it
        // (the borrow is held in `_input`); the parser is boxed, so it never moves.
        let ok = unsafe {
            let raw = parser.as_mut_ptr();
            let ok = unsafe_sys::yaml_parser_initialize(raw).ok;
            if ok {
                unsafe_sys::yaml_parser_set_encoding(raw, unsafe_sys::YAML_UTF8_ENCODING);
                unsafe_sys::yaml_parser_set_input_string(raw, input.as_ptr(), input.len() as u64);
            }
            ok
        };
        assert!(ok, "libyaml could not allocate a parser");
        EventParser { parser, done: false, _input: input }
    }

    /// The next event with its 1-based line and column, or `None` at the end or a syntax error.
    fn next(&mut self) -> Option<(Event, usize, usize)> {
        if self.done {
            return None;
        }
        let mut event = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser was initialized in `new`; libyaml fills `event` when it succeeds,
        // and the event is read only then, and deleted before it goes out of scope.
        unsafe {
            let raw = self.parser.as_mut_ptr();
            if unsafe_sys::yaml_parser_parse(raw, event.as_mut_ptr()).fail {
                self.done = true;
                return None;
            }
            let event = event.as_mut_ptr();
            let mark = (*event).start_mark;
            let anchor =
                |pointer: *mut u8| (!pointer.is_null()).then(|| CStr::from_ptr(pointer.cast()).to_bytes().to_vec());
            let converted = match (*event).type_ {
                unsafe_sys::YAML_STREAM_END_EVENT => {
                    self.done = true;
                    Event::Other
                }
                unsafe_sys::YAML_SEQUENCE_START_EVENT => Event::Start(anchor((*event).data.sequence_start.anchor)),
                unsafe_sys::YAML_MAPPING_START_EVENT => Event::Start(anchor((*event).data.mapping_start.anchor)),
                unsafe_sys::YAML_SEQUENCE_END_EVENT | unsafe_sys::YAML_MAPPING_END_EVENT => Event::End,
                unsafe_sys::YAML_SCALAR_EVENT => Event::Scalar(anchor((*event).data.scalar.anchor)),
                unsafe_sys::YAML_ALIAS_EVENT => Event::Alias(anchor((*event).data.alias.anchor).unwrap_or_default()),
                _ => Event::Other,
            };
            unsafe_sys::yaml_event_delete(event);
            Some((converted, mark.line as usize + 1, mark.column as usize + 1))
        }
    }
}

impl Drop for EventParser<'_> {
    fn drop(&mut self) {
        // SAFETY: the parser was initialized in `new` and is deleted once, here.
        unsafe { unsafe_sys::yaml_parser_delete(self.parser.as_mut_ptr()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn over(text: &str) -> OverLimit {
        prescan(text, &PolicyLimits::DEFAULT).expect_err("the input should be over a limit")
    }

    #[test]
    fn deep_nesting_is_refused_at_the_first_level_over_the_limit() {
        let depth = 80_000;
        let text = format!("rules: {}{}\n", "[".repeat(depth), "]".repeat(depth));
        let started = Instant::now();
        let error = over(&text);
        assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
        assert!(error.invalid.message.contains("max_depth"), "{}", error.invalid.message);
        assert_eq!((error.line, error.column), (1, 8 + 63));
    }

    #[test]
    fn aliases_count_as_what_they_expand_to() {
        let ranges: String = (0..5000).map(|i| format!("'{i}s..+1s', ")).collect();
        let mut text = format!("x: &r [{ranges}]\nrules:\n");
        for _ in 0..5000 {
            text.push_str("  - { when: { range: *r }, then: {} }\n");
        }
        let error = over(&text);
        assert!(error.invalid.message.contains("max_nodes"), "{}", error.invalid.message);
        // Anchors of anchors: each level doubles.
        let mut doubling = String::from("a0: &a0 [x, x]\n");
        for level in 1..40 {
            doubling.push_str(&format!("a{level}: &a{level} [*a{}, *a{}]\n", level - 1, level - 1));
        }
        assert!(over(&doubling).invalid.message.contains("max_nodes"));
    }

    #[test]
    fn size_is_checked_first() {
        let limits = PolicyLimits { max_bytes: 10, ..PolicyLimits::DEFAULT };
        let error = prescan("rules: [{ then: {} }]", &limits).unwrap_err();
        assert!(error.invalid.message.contains("max_bytes"), "{}", error.invalid.message);
    }

    #[test]
    fn ordinary_policies_and_syntax_errors_pass_the_prescan() {
        prescan(include_str!("../../scenarios/issue-example.yaml"), &PolicyLimits::DEFAULT).unwrap();
        prescan("rules: [ { then: {} ", &PolicyLimits::DEFAULT).unwrap();
        prescan("r: &a [1]\nq: *a\nz: *missing\n", &PolicyLimits::DEFAULT).unwrap();
    }
}
