//! Serde helpers that keep line and column: checks run inside the visitor, while serde_yaml still
//! stands on the node being read, so a failed check is reported at that node.
//!
//! They also let a parse go on past an error, so a file's errors are reported all at once. serde
//! stops at the first error, and serde_yaml cannot resume inside a node it failed in, so the
//! policy is read again, skipping what failed before: every optional field, rule, schedule
//! entry, bad sector and list item is a *recovery point* ([`recover`]). The innermost recovery
//! point an error passes through is remembered by its address (the path of child positions from
//! the document's root, hashed); the next pass reads that node as [`de::IgnoredAny`] and puts a
//! placeholder in its place, and the checks that would judge a mapping holding a placeholder are
//! left out (they would complain about what is missing). Addresses outside a skipped node do not
//! change from pass to pass, so each pass finds the next error.

use std::cell::RefCell;
use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, MapAccess, SeqAccess, Visitor};

use crate::error::Invalid;

/// State shared by the checks of one parse: rule numbering and name uniqueness. Kept per thread
/// and reset by [`ParseContext::start`], because serde gives a visitor no other way to see its
/// siblings while it still knows its own location.
#[derive(Default)]
pub(super) struct ParseContext {
    pub(super) rules: usize,
    pub(super) names: HashSet<Arc<str>>,
    pub(super) scheduled: HashSet<u64>,
    /// The most rules plus schedule entries the policy may have.
    pub(super) max_rules: usize,
    /// The recovery points being read, innermost last: each one's address and how many recovery
    /// points it has entered so far.
    points: Vec<(u64, u64)>,
    /// The recovery points this pass skips: where earlier passes failed.
    skip: HashSet<u64>,
    /// The innermost recovery point the error of this pass passed through.
    failed: Option<u64>,
    /// How many recovery points this pass has skipped so far: a mapping that holds one cannot be
    /// checked as a whole.
    skipped: u64,
    /// The error of this pass is about the policy as a whole (a limit): reading on past it
    /// would only repeat it.
    final_error: bool,
}

thread_local! {
    pub(super) static CONTEXT: RefCell<ParseContext> = RefCell::default();
}

/// Resets the parse context when created and again when dropped.
pub(super) struct ContextGuard;

/// The address of the document's root, the parent of the outermost recovery points.
const ROOT: u64 = 0x6e62_6466_6175_6c74;

impl ParseContext {
    /// Starts a pass that skips the recovery points in `skip` (where earlier passes failed).
    pub(super) fn start(max_rules: usize, skip: HashSet<u64>) -> ContextGuard {
        CONTEXT.with(|context| {
            *context.borrow_mut() = ParseContext { max_rules, points: vec![(ROOT, 0)], skip, ..ParseContext::default() }
        });
        ContextGuard
    }

    /// Ends a pass: the recovery points it skipped, and the one its error passed through first.
    pub(super) fn finish() -> (HashSet<u64>, Option<u64>) {
        CONTEXT.with(|context| {
            let mut context = context.borrow_mut();
            let failed = context.failed.take().filter(|_| !context.final_error);
            (std::mem::take(&mut context.skip), failed)
        })
    }

    /// How many recovery points were skipped so far; compare with a later value to learn
    /// whether a placeholder stands in what was read in between.
    pub(super) fn skipped() -> u64 {
        CONTEXT.with(|context| context.borrow().skipped)
    }

    /// Refuses the entry about to be counted when the policy already has the most allowed.
    pub(super) fn check_room(&mut self) -> Result<(), Invalid> {
        if self.rules + self.scheduled.len() >= self.max_rules {
            self.final_error = true;
            return Err(Invalid::new(
                format!(
                    "the policy has more than {} rules and schedule entries, the limit (max_rules)",
                    self.max_rules
                ),
                "split the policy, or merge rules that differ only in `range` into one rule with a list of ranges",
            ));
        }
        Ok(())
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        CONTEXT.with(|context| *context.borrow_mut() = ParseContext::default());
    }
}

/// Reads one node as a recovery point (see the module's comment): in a pass that skips it, the
/// node is read as nothing and `placeholder` stands in for it; otherwise `read` reads it, and an
/// error it returns is remembered as this point's, unless a recovery point inside took it.
pub(super) fn recover<'de, D, T>(
    deserializer: D,
    placeholder: impl FnOnce() -> T,
    read: impl FnOnce(D) -> Result<T, D::Error>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let (address, skip) = CONTEXT.with(|context| {
        let mut context = context.borrow_mut();
        let Some(parent) = context.points.last_mut() else {
            // Outside a parse (the schema's introspection): nothing to recover.
            return (None, false);
        };
        let child = parent.1;
        parent.1 += 1;
        let address = (parent.0.rotate_left(23) ^ child).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let skip = context.skip.contains(&address);
        context.points.push((address, 0));
        (Some(address), skip)
    });
    let leave = |failed: bool| {
        CONTEXT.with(|context| {
            let mut context = context.borrow_mut();
            context.points.pop();
            if skip {
                context.skipped += 1;
            } else if failed && context.failed.is_none() {
                context.failed = address;
            }
        })
    };
    if skip {
        let ignored = de::IgnoredAny::deserialize(deserializer);
        leave(false);
        return ignored.map(|_| placeholder());
    }
    let result = read(deserializer);
    if address.is_some() {
        leave(result.is_err());
    }
    result
}

/// A field read as a recovery point, with its default as the placeholder: `then`, `when`, `seed`.
pub(super) fn recovering<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    deserializer: D,
) -> Result<T, D::Error> {
    recover(deserializer, T::default, T::deserialize)
}

/// A list whose items are each a recovery point: rules, schedule entries, bad sectors. Items
/// that failed in an earlier pass are left out.
pub(super) fn recovering_list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Vec<T>, D::Error> {
    recover(deserializer, Vec::new, |deserializer| {
        let items = Vec::<Recovered<T>>::deserialize(deserializer)?;
        Ok(items.into_iter().filter_map(|item| item.0).collect())
    })
}

/// One item of a list, read as a recovery point: `None` where an earlier pass failed.
pub(super) struct Recovered<T>(pub(super) Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Recovered<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        recover(
            deserializer,
            || Recovered(None),
            |deserializer| T::deserialize(deserializer).map(|item| Recovered(Some(item))),
        )
    }
}

/// Reads a mapping as `Raw`, then turns it into `T` with `check`, inside the visitor: serde_yaml
/// then reports a failed check at the mapping's own line and column. When a placeholder stands in
/// for part of the mapping (its error was reported in an earlier pass), the check is left out and
/// `T::default()` stands in for the whole.
pub(super) fn checked_map<'de, D, Raw, T>(
    deserializer: D,
    expecting: &'static str,
    check: fn(Raw) -> Result<T, Invalid>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    Raw: Deserialize<'de>,
    T: Default,
{
    struct MapVisitor<Raw, T> {
        expecting: &'static str,
        check: fn(Raw) -> Result<T, Invalid>,
    }
    impl<'de, Raw: Deserialize<'de>, T: Default> Visitor<'de> for MapVisitor<Raw, T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
            let skipped = ParseContext::skipped();
            let raw = Raw::deserialize(de::value::MapAccessDeserializer::new(map))?;
            if ParseContext::skipped() != skipped {
                return Ok(T::default());
            }
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
/// Each is a recovery point: `None` stands in where an earlier pass failed.
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    recover(deserializer, || None, |deserializer| T::deserialize(deserializer).map(Some))
}

/// One value or a non-empty list of values: `op: write` or `op: [write, flush]`.
#[derive(Debug, Clone)]
pub(super) struct ListOf<T>(pub(super) Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for ListOf<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ListVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ListVisitor<T> {
            type Value = ListOf<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("one value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<ListOf<T>, A::Error> {
                let skipped = ParseContext::skipped();
                let mut items = Vec::new();
                while let Some(Recovered(item)) = seq.next_element()? {
                    items.extend(item);
                }
                if items.is_empty() && ParseContext::skipped() == skipped {
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

/// The names a derived `Deserialize` knows: the fields of a struct, or the variants of an enum.
/// The JSON schema takes them from the types, so it cannot drift from what the parser reads.
pub(super) fn names_read_by<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    /// A deserializer that only records what it is asked for, then stops.
    struct Introspect<'a>(&'a mut &'static [&'static str]);

    #[derive(Debug)]
    struct Stop;
    impl fmt::Display for Stop {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("introspection stops here")
        }
    }
    impl std::error::Error for Stop {}
    impl de::Error for Stop {
        fn custom<M: fmt::Display>(_: M) -> Self {
            Stop
        }
    }

    impl<'de> Deserializer<'de> for Introspect<'_> {
        type Error = Stop;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = fields;
            Err(Stop)
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            variants: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.0 = variants;
            Err(Stop)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option
            unit unit_struct newtype_struct seq tuple tuple_struct map identifier ignored_any
        }
    }

    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Introspect(&mut names));
    names
}
