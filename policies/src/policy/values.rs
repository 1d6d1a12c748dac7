//! The checked values every section of a policy shares: names, sizes and durations with units,
//! probabilities and counts. Each refuses what it cannot read with a fix saying how to write it.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

use super::de::ListOf;
use crate::error::Invalid;
use crate::units::{ByteRange, DurationSpread, HumanDuration, ParsingVisitor, UnitError, format_size, parse_size};

/// A value with a unit, parsed with a fix that says how to write it.
pub(super) struct Unit<T>(pub(super) T);

pub(super) trait UnitKind: FromStr<Err = UnitError> {
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

impl UnitKind for LengthRange {
    const EXPECTING: &'static str = "a request length such as 64KiB, a range such as 4KiB..64KiB, or \">=1MiB\"";
    const FIX: &'static str = "write a length such as 64KiB, an inclusive range such as 4KiB..64KiB (1MiB.. and ..4KiB leave a side open), or a comparison such as \">=1MiB\" (quoted: YAML reads a leading > as a folded block)";
}

/// The lengths a `length:` condition admits, both bounds included: `64KiB`, `4KiB..64KiB`,
/// `1MiB..`, `..4KiB`, `>=1MiB`, `>1MiB`, `<=4KiB`, `<4KiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct LengthRange {
    pub(super) min: u64,
    pub(super) max: u64,
}

/// The longest request NBD can carry: its length field has 32 bits.
const MAX_REQUEST_LENGTH: u64 = u32::MAX as u64;

impl FromStr for LengthRange {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<LengthRange, UnitError> {
        let trimmed = text.trim();
        let (min, max) = if let Some(rest) = trimmed.strip_prefix(">=") {
            (parse_size(rest)?, u64::MAX)
        } else if let Some(rest) = trimmed.strip_prefix("<=") {
            (0, parse_size(rest)?)
        } else if let Some(rest) = trimmed.strip_prefix('>') {
            (parse_size(rest)?.saturating_add(1), u64::MAX)
        } else if let Some(rest) = trimmed.strip_prefix('<') {
            let below = parse_size(rest)?;
            if below == 0 {
                return Err(UnitError::new(format!("`{text}` admits no length: a length is never below 0")));
            }
            (0, below - 1)
        } else if let Some((min, max)) = trimmed.split_once("..") {
            let min = if min.trim().is_empty() { 0 } else { parse_size(min)? };
            let max = if max.trim().is_empty() { u64::MAX } else { parse_size(max)? };
            if max < min {
                return Err(UnitError::new(format!(
                    "`{text}` is inverted: the start ({min}) is past the end ({max}); swap them"
                )));
            }
            (min, max)
        } else {
            let exact = parse_size(trimmed)?;
            (exact, exact)
        };
        // Requests of length 0 are answered by the protocol layer and never reach the rules.
        if max == 0 {
            return Err(UnitError::new(format!(
                "`{text}` only admits length 0, and requests of length 0 never reach the rules"
            )));
        }
        if min > MAX_REQUEST_LENGTH {
            return Err(UnitError::new(format!(
                "`{text}` only admits lengths over {}, and an NBD request is at most {MAX_REQUEST_LENGTH} bytes",
                format_size(MAX_REQUEST_LENGTH)
            )));
        }
        Ok(LengthRange { min: min.max(1), max: max.min(MAX_REQUEST_LENGTH) })
    }
}

/// A plain byte count.
pub(super) struct Size(pub(super) u64);

impl FromStr for Size {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<Size, UnitError> {
        parse_size(text).map(Size)
    }
}

/// The persisted part of a torn write: `4KiB` or `512..8KiB` (inclusive).
pub(super) struct TearSize {
    pub(super) min: u64,
    pub(super) max: u64,
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
pub(super) struct Name(pub(super) Arc<str>);

pub(super) fn check_name(text: &str, what: &str) -> Result<Arc<str>, Invalid> {
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

pub(super) fn names(list: Option<ListOf<Name>>) -> Vec<Arc<str>> {
    list.map(|list| list.0.into_iter().map(|name| name.0).collect()).unwrap_or_default()
}

/// A probability: `0.25` or `25%`.
pub(super) struct Probability(pub(super) f64);

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
pub(super) struct Count(pub(super) u64);

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
