//! Units shared by policies and server configuration: byte sizes (`4KiB`), durations (`50ms`),
//! byte ranges (`1MiB..2MiB`) and duration ranges (`10ms..200ms`).
//!
//! Binary suffixes only: `K`/`KiB` is 1024. SI spellings such as `KB` and `MB` are refused rather
//! than guessed, because a policy that hits the wrong sector is worse than one that does not load.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Why a size, duration or range could not be read. The message says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct UnitError {
    pub message: String,
}

impl UnitError {
    pub(crate) fn new(message: impl Into<String>) -> Self {
        UnitError { message: message.into() }
    }
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("K", 1 << 10),
    ("KiB", 1 << 10),
    ("M", 1 << 20),
    ("MiB", 1 << 20),
    ("G", 1 << 30),
    ("GiB", 1 << 30),
    ("T", 1 << 40),
    ("TiB", 1 << 40),
    ("P", 1 << 50),
    ("PiB", 1 << 50),
    ("s", 512),
    ("sectors", 512),
];

/// Parses a byte count: `4096`, `4K`, `4KiB`, `1 GiB`, `8s` (512-byte sectors).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '_').unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let unit = unit.trim();
    if digits.is_empty() {
        return Err(UnitError::new(format!(
            "`{text}` is not a size: write a whole number with an optional unit, such as 4096, 64KiB or 1GiB"
        )));
    }
    if unit.starts_with('.') {
        return Err(UnitError::new(format!(
            "`{text}` has a fraction: write a whole number of a smaller unit (1536KiB, not 1.5MiB)"
        )));
    }
    let Some(&(_, multiplier)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
        let hint = match unit.to_ascii_uppercase().as_str() {
            "KB" | "MB" | "GB" | "TB" | "PB" => format!(
                "`{unit}` is ambiguous (1000 or 1024?): write {}iB for powers of 1024, or the number of bytes",
                &unit[..1].to_ascii_uppercase()
            ),
            _ => format!(
                "unknown size unit `{unit}`: use B, KiB, MiB, GiB, TiB, PiB (K, M, G, T, P also mean powers of 1024) or s for 512-byte sectors"
            ),
        };
        return Err(UnitError::new(format!("`{text}`: {hint}")));
    };
    let number: u64 = digits
        .replace('_', "")
        .parse()
        .map_err(|_| UnitError::new(format!("`{text}` is too large for a 64-bit byte count")))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| UnitError::new(format!("`{text}` is too large for a 64-bit byte count")))
}

/// Formats a byte count with the largest binary unit that divides it exactly.
pub fn format_size(bytes: u64) -> String {
    const UNITS: &[(&str, u64)] =
        &[("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for &(name, unit) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{name}", bytes / unit);
        }
    }
    bytes.to_string()
}

const DURATION_UNITS: &[(&str, u64)] = &[
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("min", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// Parses a duration: `0`, `250us`, `50ms`, `1.5s`, `2min`, `1h`.
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let text = text.trim();
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.' && c != '_').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim();
    if number.is_empty() {
        return Err(UnitError::new(format!(
            "`{text}` is not a duration: write a number and a unit, such as 50ms or 2s"
        )));
    }
    if unit.is_empty() {
        return Err(UnitError::new(format!(
            "`{text}` has no unit: write {text}ms or {text}s (units: ns, us, ms, s, min, h)"
        )));
    }
    let Some(&(_, nanos_per_unit)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(UnitError::new(format!("unknown duration unit `{unit}` in `{text}`: use ns, us, ms, s, min or h")));
    };
    let number = number.replace('_', "");
    let (whole, fraction) = number.split_once('.').unwrap_or((&number, ""));
    let too_long = || UnitError::new(format!("`{text}` is too long: durations are limited to about 584 years"));
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_long())? };
    let mut nanos = whole.checked_mul(nanos_per_unit).ok_or_else(too_long)?;
    if !fraction.is_empty() {
        if fraction.contains('.') || fraction.len() > 9 {
            return Err(UnitError::new(format!(
                "`{text}` is not a duration: use one decimal point and at most 9 decimals"
            )));
        }
        let digits: u64 = fraction.parse().map_err(|_| UnitError::new(format!("`{text}` is not a duration")))?;
        let scale = 10u64.pow(fraction.len() as u32);
        // nanos_per_unit * digits fits easily: digits < 10^9 and nanos_per_unit <= 3.6 * 10^12 could
        // overflow, so divide first where the unit allows it.
        let part = (u128::from(nanos_per_unit) * u128::from(digits) / u128::from(scale)) as u64;
        nanos = nanos.checked_add(part).ok_or_else(too_long)?;
    }
    Ok(Duration::from_nanos(nanos))
}

/// Formats a duration in the largest unit that expresses it exactly (`50ms`, `2s`, `1500us`).
pub fn format_duration(duration: Duration) -> String {
    let nanos = duration.as_nanos();
    if nanos == 0 {
        return "0".to_string();
    }
    for &(name, unit) in
        [("h", 3_600_000_000_000u128), ("min", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000), ("us", 1_000)]
            .iter()
    {
        if nanos % unit == 0 {
            return format!("{}{name}", nanos / unit);
        }
    }
    format!("{nanos}ns")
}

/// A byte count read from YAML as an integer (`4096`) or a string with a unit (`"4KiB"`, `4KiB`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<Self, UnitError> {
        parse_size(text).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_size(self.0))
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_size(self.0))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte size such as 4096, 64KiB or 1GiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(|_| E::custom(format!("a size cannot be negative ({v})")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<ByteSize, E> {
                Err(E::custom(format!(
                    "`{v}` has a fraction: write a whole number of a smaller unit (1536KiB, not 1.5MiB)"
                )))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// A duration read from YAML as a string with a unit (`50ms`) or the integer `0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<Self, UnitError> {
        parse_duration(text).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DurationVisitor;
        impl Visitor<'_> for DurationVisitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 50ms, 2s or 1min")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                if v == 0 {
                    Ok(HumanDuration(Duration::ZERO))
                } else {
                    Err(E::custom(format!("`{v}` has no unit: write {v}ms or {v}s (units: ns, us, ms, s, min, h)")))
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!("a duration cannot be negative ({v})"))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<HumanDuration, E> {
                Err(E::custom(format!("`{v}` has no unit: write {v}s or {v}ms")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(DurationVisitor)
    }
}

/// A half-open byte range `start..end`. `end == None` means "to the end of the export".
///
/// Written as `1MiB..2MiB`, `1MiB..+4KiB` (start and length) or `1MiB..` (open end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRange {
    pub start: u64,
    pub end: Option<u64>,
}

impl ByteRange {
    /// The range covering every byte.
    pub const ALL: ByteRange = ByteRange { start: 0, end: None };

    pub fn new(start: u64, end: u64) -> Self {
        ByteRange { start, end: Some(end) }
    }

    /// True when `[offset, offset + length)` shares at least one byte with this range.
    /// A zero-length request overlaps a range that contains its offset.
    pub fn overlaps(&self, offset: u64, length: u64) -> bool {
        let request_end = offset.saturating_add(length.max(1));
        let below_end = self.end.is_none_or(|end| offset < end);
        below_end && request_end > self.start
    }

    /// True when `[offset, offset + length)` lies wholly inside this range.
    pub fn contains_span(&self, offset: u64, length: u64) -> bool {
        let Some(request_end) = offset.checked_add(length) else { return false };
        offset >= self.start && self.end.is_none_or(|end| request_end <= end)
    }

    /// The end as a number, `u64::MAX` for an open range.
    pub fn end_or_max(&self) -> u64 {
        self.end.unwrap_or(u64::MAX)
    }
}

impl FromStr for ByteRange {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<Self, UnitError> {
        let text = text.trim();
        let Some((start, end)) = text.split_once("..") else {
            return Err(UnitError::new(format!(
                "`{text}` is not a byte range: write START..END (half-open), START..+LENGTH or START.. such as 1MiB..2MiB"
            )));
        };
        let start = if start.trim().is_empty() { 0 } else { parse_size(start)? };
        let end = end.trim();
        let end = if end.is_empty() {
            None
        } else if let Some(length) = end.strip_prefix('+') {
            let length = parse_size(length)?;
            if length == 0 {
                return Err(UnitError::new(format!("`{text}` is empty: the length after `+` must be at least 1 byte")));
            }
            Some(start.checked_add(length).ok_or_else(|| UnitError::new(format!("`{text}` ends past 2^64 bytes")))?)
        } else {
            Some(parse_size(end)?)
        };
        if let Some(end) = end {
            if end == start {
                return Err(UnitError::new(format!(
                    "`{text}` is empty: the end is exclusive, so write {}..{} for one byte",
                    format_size(start),
                    start + 1
                )));
            }
            if end < start {
                return Err(UnitError::new(format!(
                    "`{text}` is inverted: the start ({start}) is past the end ({end}); swap them"
                )));
            }
        }
        Ok(ByteRange { start, end })
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end {
            Some(end) => write!(f, "{}..{}", format_size(self.start), format_size(end)),
            None => write!(f, "{}..", format_size(self.start)),
        }
    }
}

impl Serialize for ByteRange {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParsingVisitor::<ByteRange>::new("a byte range such as 1MiB..2MiB or 4KiB..+4KiB"))
    }
}

/// A duration, or a range of durations from which a seeded choice is made: `50ms`, `10ms..200ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DurationSpread {
    pub min: Duration,
    pub max: Duration,
}

impl DurationSpread {
    pub fn fixed(duration: Duration) -> Self {
        DurationSpread { min: duration, max: duration }
    }

    /// Picks a duration in `[min, max]` from a uniform 64-bit random value.
    pub fn pick(&self, random: u64) -> Duration {
        let span = self.max.as_nanos() - self.min.as_nanos();
        if span == 0 {
            return self.min;
        }
        let offset = (u128::from(random) * (span + 1)) >> 64;
        self.min + Duration::from_nanos(offset as u64)
    }
}

impl FromStr for DurationSpread {
    type Err = UnitError;
    fn from_str(text: &str) -> Result<Self, UnitError> {
        match text.split_once("..") {
            None => parse_duration(text).map(DurationSpread::fixed),
            Some((min, max)) => {
                let (min, max) = (parse_duration(min)?, parse_duration(max)?);
                if max < min {
                    return Err(UnitError::new(format!("`{text}` is inverted: the shorter duration comes first")));
                }
                Ok(DurationSpread { min, max })
            }
        }
    }
}

impl fmt::Display for DurationSpread {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.min == self.max {
            f.write_str(&format_duration(self.min))
        } else {
            write!(f, "{}..{}", format_duration(self.min), format_duration(self.max))
        }
    }
}

impl Serialize for DurationSpread {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DurationSpread {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ParsingVisitor::<DurationSpread>::new(
            "a duration such as 50ms or a range such as 10ms..200ms",
        ))
    }
}

/// Parses a scalar (a string, or a number read as its text so `delay: 0` works like `delay: 0ms`)
/// while the deserializer still stands on it: serde_yaml then reports the error at the value's
/// own line and column rather than at the enclosing mapping.
pub(crate) struct ParsingVisitor<T> {
    expecting: &'static str,
    /// What to write instead, carried with the error for policy messages.
    fix: Option<&'static str>,
    parsed: std::marker::PhantomData<T>,
}

impl<T> ParsingVisitor<T> {
    pub(crate) fn new(expecting: &'static str) -> Self {
        ParsingVisitor { expecting, fix: None, parsed: std::marker::PhantomData }
    }

    pub(crate) fn with_fix(expecting: &'static str, fix: &'static str) -> Self {
        ParsingVisitor { expecting, fix: Some(fix), parsed: std::marker::PhantomData }
    }
}

impl<T: FromStr<Err = UnitError>> Visitor<'_> for ParsingVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.expecting)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<T, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(|error: UnitError| match self.fix {
            Some(fix) => crate::error::Invalid::new(error.message, fix).into_serde(),
            None => E::custom(error),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_binary_units_and_sectors() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("1 GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("8s").unwrap(), 4096);
        assert_eq!(parse_size("1_000").unwrap(), 1000);
    }

    #[test]
    fn sizes_refuse_ambiguous_fractional_and_unknown_units() {
        assert!(parse_size("1MB").unwrap_err().message.contains("MiB"));
        assert!(parse_size("1.5MiB").unwrap_err().message.contains("fraction"));
        assert!(parse_size("3 parsecs").unwrap_err().message.contains("unknown size unit"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("16777216TiB").unwrap_err().message.contains("too large"));
    }

    #[test]
    fn durations_parse_units_and_decimals() {
        assert_eq!(parse_duration("50ms").unwrap(), Duration::from_millis(50));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("2min").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("50").unwrap_err().message.contains("no unit"));
        assert!(parse_duration("5 fortnights").is_err());
    }

    #[test]
    fn formatting_round_trips() {
        for text in ["4KiB", "1GiB", "4097", "3MiB"] {
            assert_eq!(format_size(parse_size(text).unwrap()), text);
        }
        for text in ["50ms", "2s", "1500us", "2min", "1h", "0"] {
            assert_eq!(format_duration(parse_duration(text).unwrap()), text);
        }
    }

    #[test]
    fn ranges_are_half_open_and_reject_empty_or_inverted() {
        let range: ByteRange = "1MiB..2MiB".parse().unwrap();
        assert_eq!(range, ByteRange::new(1 << 20, 2 << 20));
        assert!(range.overlaps((2 << 20) - 1, 1));
        assert!(!range.overlaps(2 << 20, 4096));
        assert!(!range.overlaps((1 << 20) - 4096, 4096));
        assert!(range.overlaps((1 << 20) - 4096, 4097));
        let plus: ByteRange = "4KiB..+4KiB".parse().unwrap();
        assert_eq!(plus, ByteRange::new(4096, 8192));
        let open: ByteRange = "1GiB..".parse().unwrap();
        assert!(open.overlaps(u64::MAX - 1, 10));
        assert!("4KiB..4KiB".parse::<ByteRange>().unwrap_err().message.contains("empty"));
        assert!("8KiB..4KiB".parse::<ByteRange>().unwrap_err().message.contains("inverted"));
        assert!("4KiB".parse::<ByteRange>().is_err());
    }

    #[test]
    fn overlap_is_overflow_safe() {
        let range = ByteRange::new(u64::MAX - 10, u64::MAX);
        assert!(range.overlaps(u64::MAX - 5, u64::MAX));
        assert!(!range.contains_span(u64::MAX - 5, 100));
    }

    #[test]
    fn duration_spread_picks_within_bounds() {
        let spread: DurationSpread = "10ms..200ms".parse().unwrap();
        assert_eq!(spread.pick(0), Duration::from_millis(10));
        assert_eq!(spread.pick(u64::MAX), Duration::from_millis(200));
        let middle = spread.pick(u64::MAX / 2);
        assert!(middle > Duration::from_millis(100) && middle < Duration::from_millis(110));
        assert!("200ms..10ms".parse::<DurationSpread>().is_err());
    }

    #[test]
    fn yaml_values_deserialize_with_units() {
        #[derive(Debug, Deserialize)]
        struct Sample {
            size: ByteSize,
            other: ByteSize,
            delay: DurationSpread,
            zero: DurationSpread,
            range: ByteRange,
        }
        let sample: Sample =
            serde_yaml::from_str("size: 4096\nother: 1GiB\ndelay: 10ms..20ms\nzero: 0\nrange: 0..+512\n").unwrap();
        assert_eq!(sample.size, ByteSize(4096));
        assert_eq!(sample.other, ByteSize(1 << 30));
        assert_eq!(sample.delay.max, Duration::from_millis(20));
        assert_eq!(sample.zero, DurationSpread::fixed(Duration::ZERO));
        assert_eq!(sample.range, ByteRange::new(0, 512));
        let error =
            serde_yaml::from_str::<Sample>("size: 1MB\nother: 1\ndelay: 1s\nzero: 0\nrange: 0..1\n").unwrap_err();
        assert!(error.to_string().contains("ambiguous"), "{error}");
        assert!(error.location().is_some());
    }
}
