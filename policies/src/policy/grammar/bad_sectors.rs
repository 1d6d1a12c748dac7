//! `bad_sectors:`, ranges that fail from the start.

use std::fmt;
use std::sync::Arc;

use serde::Deserialize;
use serde::de::{self, Deserializer, IntoDeserializer, MapAccess, Visitor};

use crate::policy::compiled::DeclaredBadSector;
use crate::policy::de::present;
use crate::policy::values::{Name, Unit};
use crate::request::Errno;
use crate::units::ByteRange;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBadSector {
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
