//! Serde helpers that keep line and column: checks run inside the visitor, while serde_yaml still
//! stands on the node being read, so a failed check is reported at that node.

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
}

thread_local! {
    pub(super) static CONTEXT: RefCell<ParseContext> = RefCell::default();
}

/// Resets the parse context when created and again when dropped.
pub(super) struct ContextGuard;

impl ParseContext {
    pub(super) fn start(max_rules: usize) -> ContextGuard {
        CONTEXT.with(|context| *context.borrow_mut() = ParseContext { max_rules, ..ParseContext::default() });
        ContextGuard
    }

    /// Refuses the entry about to be counted when the policy already has the most allowed.
    pub(super) fn check_room(&self) -> Result<(), Invalid> {
        if self.rules + self.scheduled.len() >= self.max_rules {
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

/// Reads a mapping as `Raw`, then turns it into `T` with `check`, inside the visitor: serde_yaml
/// then reports a failed check at the mapping's own line and column.
pub(super) fn checked_map<'de, D, Raw, T>(
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
pub(super) fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Option<T>, D::Error> {
    T::deserialize(deserializer).map(Some)
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
