//! The pre-scan's refusals, and differential tests: its counts against serde_yaml's own reading
//! (a `serde_yaml::Value`, aliases expanded) on every policy the project ships and on generated
//! YAML.

use std::cell::Cell;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

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
    // At the top level, as libyaml counted it: the 65th bracket.
    let error = over(&format!("{}{}\n", "[".repeat(depth), "]".repeat(depth)));
    assert!(error.invalid.message.starts_with("the policy nests deeper"), "{}", error.invalid.message);
    assert_eq!((error.line, error.column), (1, 65));
    // Block nesting, and brackets the parser reads as events (under its own limit of 255).
    let block: String = (0..70).map(|level| format!("{}k{level}:\n", " ".repeat(level))).collect();
    assert_eq!(over(&block).line, 65);
    let error = over(&format!("a: {}{}", "[".repeat(100), "]".repeat(100)));
    assert_eq!((error.line, error.column), (1, 4 + 63));
    assert!(error.invalid.message.starts_with("the policy nests deeper"), "{}", error.invalid.message);
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
fn an_alias_inside_the_node_it_names_is_refused() {
    // serde_yaml would expand it until its recursion or repetition limit, building values all along.
    let error = over("a: &a [x, *a]\n");
    assert_eq!((error.line, error.column), (1, 11));
    assert!(error.invalid.message.contains("contains it") && error.invalid.message.contains("max_nodes"));
    prescan("a: &a [x, &b y, *b]\n", &PolicyLimits::DEFAULT).unwrap();
}

#[test]
fn an_anchor_defined_again_cannot_hide_an_alias_bomb() {
    // serde_yaml numbers `&a` defined again as the next new anchor, `&ranges`: every `*a` then
    // expands to the 5,000 ranges, while YAML (and a count of it) reads `2`.
    let ranges: Vec<String> = (0..5000).map(|i| format!("{i}s..+1s")).collect();
    let mut text = format!("x: &a 1\ny: &a 2\nz: &ranges [{}]\nrules:\n", ranges.join(", "));
    for i in 0..5000 {
        text.push_str(&format!("  - {{ name: r{i}, when: {{ range: *a }}, then: {{}} }}\n"));
    }
    let error = over(&text);
    assert_eq!((error.line, error.column), (2, 4));
    assert!(error.invalid.message.contains("max_nodes") && error.invalid.message.contains("`&a`"));
    // The bug it guards against, in serde_yaml itself.
    let value: serde_yaml::Value = serde_yaml::from_str("x: &a 1\ny: &a 2\nz: &b [3, 4]\nw: *a\n").unwrap();
    assert_eq!(value["w"], value["z"]);
    // Defined again, but never used: nothing to expand.
    prescan("x: &a 1\ny: &a 2\n", &PolicyLimits::DEFAULT).unwrap();
}

#[test]
fn size_is_checked_first() {
    let limits = PolicyLimits { max_bytes: 10, ..PolicyLimits::DEFAULT };
    let error = prescan("rules: [{ then: {} }]", &limits).unwrap_err();
    assert!(error.invalid.message.contains("max_bytes"), "{}", error.invalid.message);
}

#[test]
fn ordinary_policies_and_syntax_errors_pass_the_prescan() {
    prescan(include_str!("../../../scenarios/issue-example.yaml"), &PolicyLimits::DEFAULT).unwrap();
    prescan("rules: [ { then: {} ", &PolicyLimits::DEFAULT).unwrap();
    prescan("r: &a [1]\nq: *a\nz: *missing\n", &PolicyLimits::DEFAULT).unwrap();
}

#[test]
fn line_and_paragraph_separators_end_comments_as_libyaml_ends_them() {
    // libyaml (YAML 1.1) breaks lines at NEL, LS and PS: the brackets after them are structure,
    // not the rest of a comment.
    for separator in ['\u{85}', '\u{2028}', '\u{2029}'] {
        let text = format!("# a comment{separator}{}{}\n", "[".repeat(80_000), "]".repeat(80_000));
        let error = over(&text);
        assert!(error.invalid.message.contains("max_depth"), "{separator:?}: {}", error.invalid.message);
        assert_eq!((error.line, error.column), (2, 65), "{separator:?}");
    }
}

#[test]
fn where_the_parsers_could_part_the_rest_is_bounded_instead() {
    let measure_default = |text: &str| measure(text, &PolicyLimits::DEFAULT);
    // A byte order mark at the start is skipped like a space; past it, the parser stops there.
    let measured = measure_default("\u{feff}rules: [{ then: {} }]\n").unwrap();
    assert_eq!(measured, Measure { depth: 4, nodes: 6, stopped: None });
    let measured = measure_default("a: 1\n\u{feff}b: [x]\n").unwrap();
    assert_eq!(measured.stopped, Some((2, 1)));
    let text = format!("a: 1\n\u{feff}b: {}\n", "[".repeat(100));
    let error = over(&text);
    assert!(error.invalid.message.contains("max_depth") && error.invalid.message.contains("byte order mark"));
    // libyaml ends the anchor name `a` at the `:`; saphyr-parser would read `a:`.
    let measured = measure_default("x: &a: [b]\n").unwrap();
    assert_eq!(measured.stopped, Some((1, 4)));
    let bomb = format!("x: &a: [b]\n{}", (0..20).map(|i| format!("y{i}: &b{i} [*a, *a]\n")).collect::<String>());
    let error = over(&bomb);
    assert!(error.invalid.message.contains("max_nodes") && error.invalid.message.contains("anchor"), "{bomb}");
    // Stopping at `*a:`, the parser ends the mapping `&a`; libyaml reads the alias inside it.
    let error = over("&a\n'k': *a:\n");
    assert!(error.invalid.message.contains("max_nodes") && error.invalid.message.contains("anchors"));
}

#[test]
fn a_question_mark_or_colon_libyaml_reads_as_an_indicator_is_where_the_prescan_stops_reading() {
    // In a flow collection libyaml reads `?x` as the key `x` of a mapping of its own, one level
    // deeper; saphyr-parser reads the scalar `?x`. Found by the mangling property test in CI.
    for (text, at) in [
        ("[?!t   ]\n", (1, 2)),
        ("[?x]\n", (1, 2)),
        ("[ ?x]\n", (1, 3)),
        ("[a, ?b]\n", (1, 5)),
        ("{a: [?x]}\n", (1, 6)),
        ("[&a ?x]\n", (1, 2)),
        ("[?[?[?[a]]]]\n", (1, 2)),
        // libyaml reads ` :5` in a flow collection as the value 5 of an empty key.
        ("- k: {[&x\t:5, z]: ~}\n", (1, 8)),
        ("\n{[k1, [?]: {k2: 0o17, k3: z}, [k4, [a]]: ~}\n", (2, 8)),
    ] {
        let measured = measure(text, &PolicyLimits::DEFAULT).unwrap();
        assert_eq!(measured.stopped, Some(at), "{text:?}");
        let small = PolicyLimits { max_depth: 4, max_nodes: 40, ..PolicyLimits::DEFAULT };
        for limits in [PolicyLimits::DEFAULT, small] {
            let checked = check_against_serde_yaml(text, &limits);
            assert!(checked.is_ok(), "{text:?}: {}", checked.unwrap_err());
        }
    }
    // Past the cut, each `[` counts two levels when a `?` could follow it.
    let text = format!("a: [?x]\nb: {}a{}\n", "[?".repeat(33), "]".repeat(33));
    assert!(serde_yaml_reads(&text).0 > 64);
    let error = over(&text);
    assert!(
        error.invalid.message.contains("max_depth") && error.invalid.message.contains("`?x` starts with an indicator"),
        "{}",
        error.invalid.message
    );
    // Where both parsers agree, the pre-scan reads on: `? ` is a key to both, and `?x` or `:x`
    // after other text is part of a scalar to both.
    for text in ["[? x]\n", "a: b?c\n", "[x?]\n", "a: http://x:80/?q\n"] {
        assert_eq!(measure(text, &PolicyLimits::DEFAULT).unwrap().stopped, None, "{text:?}");
    }
}

#[test]
fn past_a_syntax_error_a_large_rest_is_refused_with_the_error_and_the_limit() {
    // Small: left to serde_yaml, which reports the syntax error in its words.
    let measured = measure("rules:\n  - name: a\n   then: {}\n", &PolicyLimits::DEFAULT).unwrap();
    assert!(measured.stopped.is_some(), "{measured:?}");
    // Too many brackets after the error to be sure of the depth: refused, naming both.
    let mut text = String::from("rules:\n  - name: a\n   then: {}\n");
    for i in 0..100 {
        text.push_str(&format!("  - {{ name: r{i}, then: {{}} }}\n"));
    }
    let error = over(&text);
    assert!(error.invalid.message.contains("max_depth"), "{}", error.invalid.message);
    assert!(error.invalid.fix.contains("line 3 column 4"), "{}", error.invalid.fix);
    // Aliases to anchors after the error: their expansion is unknown.
    let error = over("a: [\nb: &x [1]\nc: *x\n");
    assert!(error.invalid.message.contains("max_nodes"), "{}", error.invalid.message);
    assert_eq!(error.line, 2);
}

#[test]
fn positions_count_characters_and_line_endings_as_the_parsers_do() {
    let deep = "[".repeat(300);
    for (text, at) in [
        (format!("é: {deep}"), (1, 4 + 63)),
        (format!("a: 1\r\nb: 2\r\nc: {deep}"), (3, 4 + 63)),
        (format!("a: 1\rb: 2\r'ü': {deep}"), (3, 6 + 63)),
        (format!("a: \"ü\u{2028} x\"\nb: {deep}"), (3, 4 + 63)),
    ] {
        let error = over(&text);
        assert_eq!((error.line, error.column), at, "{text:?}: {}", error.invalid.message);
    }
}

// Differential tests.

/// Depth and nodes of a value serde_yaml read (its aliases are already expanded): a tag is not a
/// node of its own, as it is not one to the pre-scan.
fn value_counts(value: &serde_yaml::Value) -> (usize, usize) {
    match value {
        serde_yaml::Value::Sequence(items) => {
            let (depth, nodes) = items.iter().map(value_counts).fold((0, 0), |(d, n), (id, i_n)| (d.max(id), n + i_n));
            (depth + 1, nodes + 1)
        }
        serde_yaml::Value::Mapping(entries) => {
            let (depth, nodes) = entries
                .iter()
                .flat_map(|(key, value)| [value_counts(key), value_counts(value)])
                .fold((0, 0), |(d, n), (id, i_n)| (d.max(id), n + i_n));
            (depth + 1, nodes + 1)
        }
        serde_yaml::Value::Tagged(tagged) => value_counts(&tagged.value),
        _ => (0, 1),
    }
}

/// Counts what serde_yaml hands serde, as it goes: on a text serde_yaml refuses, what it read
/// before giving up (its first document, up to the error).
#[derive(Clone, Copy)]
struct Walk<'c> {
    counts: &'c Cell<(usize, usize)>,
    depth: usize,
}

impl Walk<'_> {
    fn node(&self, depth: usize) {
        let (deepest, nodes) = self.counts.get();
        self.counts.set((deepest.max(depth), nodes + 1));
    }

    fn inner(self) -> Self {
        Walk { depth: self.depth + 1, ..self }
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        self.node(self.depth);
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        self.node(self.depth);
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        self.node(self.depth);
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        self.node(self.depth);
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        self.node(self.depth);
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        self.node(self.depth);
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        self.node(self.depth + 1);
        while items.next_element_seed(self.inner())?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        self.node(self.depth + 1);
        while entries.next_key_seed(self.inner())?.is_some() {
            entries.next_value_seed(self.inner())?;
        }
        Ok(())
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, tagged: A) -> Result<(), A::Error> {
        let (_, value) = tagged.variant::<de::IgnoredAny>()?;
        de::VariantAccess::newtype_variant_seed(value, self)
    }
}

/// The deepest nesting and the nodes serde_yaml read of `text`, accepted or not.
fn serde_yaml_reads(text: &str) -> (usize, usize) {
    let counts = Cell::new((0, 0));
    let _ = Walk { counts: &counts, depth: 0 }.deserialize(serde_yaml::Deserializer::from_str(text));
    counts.get()
}

/// How the pre-scan's judgement compares with serde_yaml's reading.
#[derive(Debug, PartialEq, Eq)]
enum Judged {
    /// Equal counts, or the same refusal.
    Alike,
    /// The pre-scan's parser stopped early and it refused what serde_yaml reads within the
    /// limits, on a bound: conservative.
    Bounded,
    /// Refused for an anchor defined twice with aliases to it, which serde_yaml can expand to
    /// another node.
    Redefined,
}

/// Checks the pre-scan against serde_yaml on `text` under `limits`:
/// - where serde_yaml reads it, and the pre-scan's parser reads it to the end, the counts are
///   equal, and the pre-scan refuses it exactly when they are over a limit, naming that limit;
/// - whatever serde_yaml does, what it reads of a text the pre-scan lets through is within the
///   limits, and within the pre-scan's bounds when its parser stopped early.
fn check_against_serde_yaml(text: &str, limits: &PolicyLimits) -> Result<Judged, String> {
    let measured = measure(text, limits);
    if let Ok(measured) = &measured {
        let (depth, nodes) = serde_yaml_reads(text);
        if depth > limits.max_depth || nodes > limits.max_nodes {
            return Err(format!("passed {measured:?}, but serde_yaml reads depth {depth}, {nodes} nodes"));
        }
        if measured.stopped.is_some() && (depth > measured.depth || nodes > measured.nodes) {
            return Err(format!("bounds {measured:?} below what serde_yaml reads: depth {depth}, {nodes} nodes"));
        }
    }
    let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(text) else { return Ok(Judged::Alike) };
    // An empty text is one null node to serde_yaml and no document to the parser.
    if value.is_null() && matches!(measured, Ok(Measure { nodes: 0, .. })) {
        return Ok(Judged::Alike);
    }
    let (depth, nodes) = value_counts(&value);
    match measured {
        Ok(measured) if measured.stopped.is_none() && (measured.depth, measured.nodes) != (depth, nodes) => {
            Err(format!("counted {measured:?}, serde_yaml's value has depth {depth}, {nodes} nodes"))
        }
        Ok(_) => Ok(Judged::Alike),
        Err(error) => {
            let message = &error.invalid.message;
            let named = (depth > limits.max_depth && message.contains("max_depth"))
                || (nodes > limits.max_nodes && message.contains("max_nodes"));
            if named {
                Ok(Judged::Alike)
            } else if message.contains("is defined again") {
                Ok(Judged::Redefined)
            } else if message.contains("could") {
                Ok(Judged::Bounded)
            } else {
                Err(format!(
                    "refused ({message} at {}:{}), but serde_yaml reads depth {depth}, {nodes} nodes",
                    error.line, error.column
                ))
            }
        }
    }
}

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn files_in(dir: &str) -> Vec<(String, String)> {
    let dir = repository().join(dir);
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter_map(|path| Some((path.display().to_string(), std::fs::read_to_string(&path).ok()?)))
        .collect();
    files.sort();
    files
}

/// Every ```yaml block of the README and docs/.
fn documented_examples() -> Vec<(String, String)> {
    let mut pages = files_in("docs");
    let readme = repository().join("README.md");
    pages.push((readme.display().to_string(), std::fs::read_to_string(&readme).expect("README.md")));
    let mut examples = Vec::new();
    for (page, text) in pages.into_iter().filter(|(page, _)| page.ends_with(".md")) {
        let mut lines = text.lines().enumerate();
        while let Some((at, line)) = lines.next() {
            if line.trim_start().starts_with("```yaml") {
                let block: Vec<&str> = lines
                    .by_ref()
                    .map(|(_, line)| line)
                    .take_while(|line| !line.trim_start().starts_with("```"))
                    .collect();
                examples.push((format!("{page}:{}", at + 1), block.join("\n") + "\n"));
            }
        }
    }
    examples
}

/// The hostile inputs of server/tests/hardening.rs, at sizes serde_yaml reads quickly in a
/// debug build (over the small limits the test also applies).
fn hardening_inputs() -> Vec<(String, String)> {
    let nested = |depth: usize| format!("rules: {}{}\n", "[".repeat(depth), "]".repeat(depth));
    let many_rules = |rules: usize| {
        let mut text = String::from("rules:\n  - name: all-reads\n    when: { op: read }\n    then: { delay: 1ms }\n");
        for i in 0..rules {
            text.push_str(&format!(
                "  - name: rule-{i}\n    when: {{ op: write, range: {i}MiB..+4KiB }}\n    then: {{ error: EIO }}\n"
            ));
        }
        text
    };
    let alias_bomb = |ranges: usize, rules: usize| {
        let ranges: Vec<String> = (0..ranges).map(|i| format!("{i}s..+1s")).collect();
        let mut text = format!(
            "rules:\n  - name: anchor\n    when: {{ range: &ranges [{}] }}\n    then: {{}}\n",
            ranges.join(", ")
        );
        for i in 0..rules {
            text.push_str(&format!("  - {{ name: r{i}, when: {{ range: *ranges }}, then: {{}} }}\n"));
        }
        text
    };
    vec![
        ("nested(60)".into(), nested(60)),
        ("nested(63)".into(), nested(63)),
        ("nested(64)".into(), nested(64)),
        ("nested(120)".into(), nested(120)),
        ("many_rules(1000)".into(), many_rules(1000)),
        ("alias_bomb(300, 300)".into(), alias_bomb(300, 300)),
    ]
}

#[test]
fn counts_agree_with_serde_yaml_on_every_policy_the_project_ships() {
    let mut inputs = files_in("policies/scenarios");
    inputs.extend(files_in("fuzz/seeds/policy"));
    inputs.extend(documented_examples());
    inputs.extend(hardening_inputs());
    let shipped = inputs.len();
    for text in [
        "rules: [ { then: {} ",
        "r: &a [1]\nq: *a\nz: *missing\n",
        "a: &a [x, &b y, *b]\n",
        "a: &a [[x]]\nb: [[*a, *a]]\n",
        // A `:` after where the parser stopped makes the flow mapping read before it a key.
        "!t\n- &a1\n  -\n    - -2.5\n- {[k1, *a1]: &a2 [-2.5], k2: a}&x:\n",
        "\u{feff}rules: [{ then: {} }]\n",
        "x: &a: [b]\n",
        "---\na: 1\n---\nb: [2]\n",
        "%YAML 1.1\n---\n? [a, b]\n: !!set { x, y }\nbase: &b { k: v }\nmerged: { <<: *b, w: 1 }\n",
        "",
        "# only a comment\n",
    ] {
        inputs.push((format!("{text:?}"), text.to_string()));
    }
    let small = PolicyLimits { max_depth: 4, max_nodes: 60, ..PolicyLimits::DEFAULT };
    let mut failures = Vec::new();
    for (name, text) in &inputs {
        for limits in [PolicyLimits::DEFAULT, small] {
            match check_against_serde_yaml(text, &limits) {
                Ok(Judged::Alike) => {}
                Ok(judged @ (Judged::Bounded | Judged::Redefined)) => {
                    failures.push(format!("{name} (max_depth {}): {judged:?}", limits.max_depth))
                }
                Err(failure) => failures.push(format!("{name} (max_depth {}): {failure}", limits.max_depth)),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(shipped > 30, "only {shipped} inputs: the corpus moved?");
}

/// A YAML node to render.
#[derive(Debug, Clone)]
enum Node {
    Scalar(&'static str),
    /// An alias to one of the anchors rendered before it (by number, modulo how many there are).
    Alias(usize),
    Sequence(Vec<Node>, Style),
    Mapping(Vec<(Node, Node)>, Style),
}

#[derive(Debug, Clone, Copy)]
struct Style {
    flow: bool,
    anchor: bool,
    tag: bool,
}

fn node_strategy() -> impl Strategy<Value = Node> {
    let scalar = prop::sample::select(vec![
        "a",
        "1",
        "-2.5",
        "yes",
        "~",
        "''",
        "\"q\\\"t\"",
        "'it''s'",
        "0o17",
        "\"x\\ty\"",
        "2001-12-14",
        "null",
        "é",
    ])
    .prop_map(Node::Scalar);
    let leaf = prop_oneof![4 => scalar, 1 => (0..8usize).prop_map(Node::Alias)];
    let style = (any::<bool>(), prop::bool::weighted(0.3), prop::bool::weighted(0.1))
        .prop_map(|(flow, anchor, tag)| Style { flow, anchor, tag });
    leaf.prop_recursive(7, 80, 5, move |inner| {
        prop_oneof![
            (prop::collection::vec(inner.clone(), 0..5), style.clone())
                .prop_map(|(items, style)| Node::Sequence(items, style)),
            (prop::collection::vec((inner.clone(), inner), 0..5), style.clone())
                .prop_map(|(entries, style)| Node::Mapping(entries, style)),
        ]
    })
}

/// Renders nodes as YAML, block or flow as each collection asks (flow inside flow), with keys
/// made unique so that serde_yaml reads every mapping.
struct Render {
    /// The anchors of the nodes rendered so far (not those still open).
    anchors: Vec<String>,
    named: usize,
    keys: usize,
}

impl Render {
    fn properties(&mut self, style: Style) -> (String, Option<String>) {
        let anchor = style.anchor.then(|| {
            self.named += 1;
            format!("a{}", self.named)
        });
        let mut properties = String::new();
        if let Some(anchor) = &anchor {
            properties.push_str(&format!("&{anchor} "));
        }
        if style.tag {
            properties.push_str("!t ");
        }
        (properties, anchor)
    }

    fn alias(&self, which: usize) -> String {
        match self.anchors.len() {
            0 => "z".to_string(),
            n => format!("*{} ", self.anchors[which % n]),
        }
    }

    fn key(&mut self, key: &Node, flow: bool) -> String {
        self.keys += 1;
        let unique = format!("k{}", self.keys);
        match key {
            Node::Scalar(_) => unique,
            // A collection as a key, or an alias to one: flow style keeps it on one line.
            Node::Alias(which) if flow => format!("[{unique}, {}]", self.alias(*which).trim_end()),
            _ if flow => format!("[{unique}, {}]", self.flow(key)),
            _ => unique,
        }
    }

    fn flow(&mut self, node: &Node) -> String {
        match node {
            Node::Scalar(text) => text.to_string(),
            Node::Alias(which) => self.alias(*which),
            Node::Sequence(items, style) => {
                let (properties, anchor) = self.properties(*style);
                let items: Vec<String> = items.iter().map(|item| self.flow(item)).collect();
                self.done(anchor);
                format!("{properties}[{}]", items.join(", "))
            }
            Node::Mapping(entries, style) => {
                let (properties, anchor) = self.properties(*style);
                let entries: Vec<String> = entries
                    .iter()
                    .map(|(key, value)| format!("{}: {}", self.key(key, true), self.flow(value)))
                    .collect();
                self.done(anchor);
                format!("{properties}{{{}}}", entries.join(", "))
            }
        }
    }

    fn done(&mut self, anchor: Option<String>) {
        self.anchors.extend(anchor);
    }

    /// A node in block context at `indent`: what follows `- ` or `key:` (with its own line
    /// break for a block collection).
    fn block(&mut self, node: &Node, indent: usize) -> String {
        let pad = " ".repeat(indent);
        match node {
            Node::Sequence(items, style) if !style.flow && !items.is_empty() => {
                let (properties, anchor) = self.properties(*style);
                let mut text = properties.trim_end().to_string();
                for item in items {
                    let item = self.block(item, indent + 2);
                    text.push_str(&format!("\n{pad}-"));
                    text.push_str(&if item.starts_with('\n') { item } else { format!(" {item}") });
                }
                self.done(anchor);
                text
            }
            Node::Mapping(entries, style) if !style.flow && !entries.is_empty() => {
                let (properties, anchor) = self.properties(*style);
                let mut text = properties.trim_end().to_string();
                for (key, value) in entries {
                    let key = match key {
                        Node::Sequence(..) | Node::Mapping(..) => {
                            // A complex key.
                            let key = self.key(key, true);
                            text.push_str(&format!("\n{pad}? {key}\n{pad}:"));
                            let value = self.block(value, indent + 2);
                            text.push_str(&if value.starts_with('\n') { value } else { format!(" {value}") });
                            continue;
                        }
                        _ => self.key(key, false),
                    };
                    let value = self.block(value, indent + 2);
                    text.push_str(&format!("\n{pad}{key}:"));
                    text.push_str(&if value.starts_with('\n') { value } else { format!(" {value}") });
                }
                self.done(anchor);
                text
            }
            _ => self.flow(node),
        }
    }

    fn document(node: &Node) -> String {
        let mut render = Render { anchors: Vec::new(), named: 0, keys: 0 };
        let text = render.block(node, 0);
        text.trim_start_matches('\n').to_string() + "\n"
    }
}

/// Characters and tokens where YAML 1.1 and 1.2 parsers, or two implementations, part ways.
const NOISE: [&str; 32] = [
    "?",
    ":",
    "?x",
    "!",
    "[",
    "]",
    "{",
    "}",
    ",",
    ": ",
    "- ",
    "? ",
    "#",
    "&a ",
    "*a",
    "*a0 ",
    "&x:",
    "!t ",
    "|",
    ">-",
    "'",
    "\"",
    "\t",
    "\n",
    "\n  ",
    "\u{85}",
    "\u{2028}",
    "\u{feff}",
    "\r",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn counts_agree_with_serde_yaml_on_generated_nested_and_aliased_yaml(node in node_strategy()) {
        let text = Render::document(&node);
        let small = PolicyLimits { max_depth: 4, max_nodes: 40, ..PolicyLimits::DEFAULT };
        for limits in [PolicyLimits::DEFAULT, small] {
            let checked = check_against_serde_yaml(&text, &limits);
            prop_assert_eq!(checked, Ok(Judged::Alike), "{}", text);
        }
        // The renderer writes nothing the parsers read differently: the pre-scan reads all of it.
        prop_assert!(measure(&text, &PolicyLimits::DEFAULT).map_or(true, |measured| measured.stopped.is_none()), "{text}");
    }

    #[test]
    fn what_passes_the_prescan_stays_within_the_limits_for_serde_yaml_even_when_mangled(
        node in node_strategy(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), prop::sample::select(NOISE.to_vec()), any::<bool>()), 1..4),
    ) {
        let mut text = Render::document(&node);
        for (at, noise, replace) in edits {
            let boundaries: Vec<usize> = text.char_indices().map(|(at, _)| at).chain([text.len()]).collect();
            let at = boundaries[at.index(boundaries.len())];
            let end = if replace { text[at..].chars().next().map_or(at, |c| at + c.len_utf8()) } else { at };
            text.replace_range(at..end, noise);
        }
        let small = PolicyLimits { max_depth: 4, max_nodes: 40, ..PolicyLimits::DEFAULT };
        for limits in [PolicyLimits::DEFAULT, small] {
            let checked = check_against_serde_yaml(&text, &limits);
            prop_assert!(checked.is_ok(), "{:?}\n{}", text, checked.unwrap_err());
        }
    }
}
