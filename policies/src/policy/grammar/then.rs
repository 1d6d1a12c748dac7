//! `then:`, the outcome of a rule.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, MapAccess, Visitor};

use crate::decision::PowerCut;
use crate::error::Invalid;
use crate::policy::compiled::Tear;
use crate::policy::de::{ListOf, ParseContext, checked_map, present};
use crate::policy::values::{Name, Size, TearSize, Unit, check_name, names};
use crate::request::Errno;
use crate::units::{DurationSpread, HumanDuration, format_size};

/// The checked `then` of a rule.
#[derive(Debug, Clone, Default)]
pub(crate) struct Then {
    pub error: Option<Errno>,
    pub delay: Option<DurationSpread>,
    pub stall: Option<(Arc<str>, Option<Duration>)>,
    pub persist: bool,
    pub drop: bool,
    pub torn: Option<Tear>,
    pub corrupt: Option<(u32, Option<u64>)>,
    pub sticky: bool,
    pub disconnect: bool,
    pub power_cut: Option<PowerCut>,
    pub arm: Vec<Arc<str>>,
    pub disarm: Vec<Arc<str>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawThen {
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
    power_cut: Option<PowerCutSpec>,
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
        power_cut: raw.power_cut.and_then(|cut| cut.0),
        arm: names(raw.arm),
        disarm: names(raw.disarm),
    };
    if then.error.is_some() && then.power_cut.is_some() {
        return Err(Invalid::new(
            "a power cut drops every connection of the export, so `error` would never be sent",
            "keep `power_cut` (the client hears nothing), or `error` without it",
        ));
    }
    let fails = then.error.is_some() || then.disconnect || then.power_cut.is_some();
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
            "`drop` reports success while losing the write, which contradicts `error`/`disconnect`/`power_cut`",
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
            "remove `error`/`disconnect`/`power_cut` to return corrupted data, or remove `corrupt`",
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
pub(super) struct RawStall {
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

/// `power_cut: true` or `power_cut: { until: TRIGGER, timeout: 30s }` (the export stays off
/// until the trigger is armed or the timeout passes); `power_cut: false` is no power cut.
struct PowerCutSpec(Option<PowerCut>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPowerCut {
    #[serde(default, deserialize_with = "present")]
    until: Option<Name>,
    #[serde(default, deserialize_with = "present")]
    timeout: Option<Unit<HumanDuration>>,
}

impl<'de> Deserialize<'de> for PowerCutSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PowerCutVisitor;
        impl<'de> Visitor<'de> for PowerCutVisitor {
            type Value = PowerCutSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, or a mapping such as { until: power-on, timeout: 30s }")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<PowerCutSpec, E> {
                Ok(PowerCutSpec(v.then(PowerCut::default)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PowerCutSpec, A::Error> {
                let skipped = ParseContext::skipped();
                let raw = RawPowerCut::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let timeout = raw.timeout.map(|timeout| timeout.0.0);
                if ParseContext::skipped() == skipped {
                    if raw.until.is_none() && timeout.is_none() {
                        return Err(Invalid::new(
                            "`power_cut: {}` says nothing about how long the export stays off",
                            "write `power_cut: true` (power back at once), or give `until: TRIGGER` and/or `timeout: 30s`",
                        )
                        .into_serde());
                    }
                    if timeout.is_some_and(|timeout| timeout.is_zero()) {
                        return Err(Invalid::new(
                            "`timeout: 0` keeps the export off for no time at all",
                            "write `power_cut: true` for power back at once, or give a timeout such as 5s",
                        )
                        .into_serde());
                    }
                }
                Ok(PowerCutSpec(Some(PowerCut { until: raw.until.map(|name| name.0), timeout })))
            }
        }
        deserializer.deserialize_any(PowerCutVisitor)
    }
}

/// `torn: 4KiB` or `torn: { persist: 512..8KiB, align: 512 }`.
struct TornSpec(Tear);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTorn {
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
                let skipped = ParseContext::skipped();
                let raw = RawTorn::deserialize(de::value::MapAccessDeserializer::new(map))?;
                if ParseContext::skipped() != skipped {
                    return Ok(TornSpec(Tear { min: 0, max: 0, align: 512 }));
                }
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
pub(super) struct RawCorrupt {
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
