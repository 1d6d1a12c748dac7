//! What the engine is asked about: one NBD request, as the server decoded it, and the errnos NBD
//! can carry back.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Serialize, Serializer};

/// An NBD command, in the words of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

impl Op {
    pub const ALL: [Op; 7] = [Op::Read, Op::Write, Op::Flush, Op::Trim, Op::WriteZeroes, Op::Cache, Op::BlockStatus];

    /// The name used in policies and fault logs.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }

    /// Position in [`Op::ALL`], used to index per-operation tables.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn bit(self) -> u8 {
        1 << self.index()
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = String;
    fn from_str(text: &str) -> Result<Op, String> {
        Op::ALL.into_iter().find(|op| op.name() == text).ok_or_else(|| {
            format!("unknown operation `{text}`: use read, write, flush, trim, write_zeroes, cache or block_status")
        })
    }
}

/// The command flags of one request. Serialized as the list of the flags that are set, such as
/// `["fua"]`, so a fault log stays short.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RequestFlags {
    pub fua: bool,
    pub no_hole: bool,
    pub fast_zero: bool,
    pub df: bool,
    pub req_one: bool,
}

impl RequestFlags {
    pub const NAMES: [&'static str; 5] = ["fua", "no_hole", "fast_zero", "df", "req_one"];

    /// The flags as a bit set, in the order of [`RequestFlags::NAMES`].
    pub(crate) fn bits(self) -> u8 {
        u8::from(self.fua)
            | u8::from(self.no_hole) << 1
            | u8::from(self.fast_zero) << 2
            | u8::from(self.df) << 3
            | u8::from(self.req_one) << 4
    }

    fn set(&mut self, name: &str) -> bool {
        let flag = match name {
            "fua" => &mut self.fua,
            "no_hole" => &mut self.no_hole,
            "fast_zero" => &mut self.fast_zero,
            "df" => &mut self.df,
            "req_one" => &mut self.req_one,
            _ => return false,
        };
        *flag = true;
        true
    }

    fn names(self) -> impl Iterator<Item = &'static str> {
        let bits = self.bits();
        RequestFlags::NAMES.into_iter().enumerate().filter(move |(bit, _)| bits & (1 << bit) != 0).map(|(_, name)| name)
    }
}

impl Serialize for RequestFlags {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(None)?;
        for name in self.names() {
            seq.serialize_element(name)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for RequestFlags {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FlagsVisitor;
        impl<'de> Visitor<'de> for FlagsVisitor {
            type Value = RequestFlags;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of flag names (fua, no_hole, fast_zero, df, req_one)")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<RequestFlags, A::Error> {
                let mut flags = RequestFlags::default();
                while let Some(name) = seq.next_element::<String>()? {
                    if !flags.set(&name) {
                        return Err(de::Error::unknown_variant(&name, &RequestFlags::NAMES));
                    }
                }
                Ok(flags)
            }
        }
        deserializer.deserialize_seq(FlagsVisitor)
    }
}

/// One request as the fault layer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    pub op: Op,
    pub offset: u64,
    pub length: u64,
    pub flags: RequestFlags,
    /// The server's number for the connection the request came on.
    pub connection: u64,
    /// The client's cookie (handle) for the request.
    pub cookie: u64,
}

impl Request {
    /// First byte past the request. A zero-length request covers its offset, so that it can
    /// still be placed in a range; the end never wraps.
    pub(crate) fn end(&self) -> u64 {
        self.offset.saturating_add(self.length.max(1))
    }
}

/// The errors an NBD reply can carry. The Linux kernel client turns every one of them into EIO
/// (drivers/block/nbd.c maps any non-zero reply error to BLK_STS_IOERR): the others matter only
/// to userspace clients such as libnbd, qemu-io or nbdcopy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(clippy::upper_case_acronyms)]
pub enum Errno {
    EPERM,
    EIO,
    ENOMEM,
    EINVAL,
    ENOSPC,
    EOVERFLOW,
    ENOTSUP,
    ESHUTDOWN,
}

impl Errno {
    pub const ALL: [Errno; 8] = [
        Errno::EPERM,
        Errno::EIO,
        Errno::ENOMEM,
        Errno::EINVAL,
        Errno::ENOSPC,
        Errno::EOVERFLOW,
        Errno::ENOTSUP,
        Errno::ESHUTDOWN,
    ];

    /// The value in an NBD reply, as the protocol defines it (not the host's errno).
    pub fn wire_value(self) -> u32 {
        match self {
            Errno::EPERM => 1,
            Errno::EIO => 5,
            Errno::ENOMEM => 12,
            Errno::EINVAL => 22,
            Errno::ENOSPC => 28,
            Errno::EOVERFLOW => 75,
            Errno::ENOTSUP => 95,
            Errno::ESHUTDOWN => 108,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Errno::EPERM => "EPERM",
            Errno::EIO => "EIO",
            Errno::ENOMEM => "ENOMEM",
            Errno::EINVAL => "EINVAL",
            Errno::ENOSPC => "ENOSPC",
            Errno::EOVERFLOW => "EOVERFLOW",
            Errno::ENOTSUP => "ENOTSUP",
            Errno::ESHUTDOWN => "ESHUTDOWN",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Errno {
    type Err = String;
    fn from_str(text: &str) -> Result<Errno, String> {
        Errno::ALL.into_iter().find(|errno| errno.name() == text).ok_or_else(|| {
            let upper = text.to_ascii_uppercase();
            match Errno::ALL.into_iter().find(|errno| errno.name() == upper) {
                Some(errno) => format!("errno names are upper case: write {errno}, not `{text}`"),
                None => format!(
                    "`{text}` is not an errno NBD can carry: use EIO, EPERM, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP or ESHUTDOWN"
                ),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_wire_values_follow_the_nbd_specification() {
        let values: Vec<u32> = Errno::ALL.iter().map(|errno| errno.wire_value()).collect();
        assert_eq!(values, [1, 5, 12, 22, 28, 75, 95, 108]);
        assert_eq!("EIO".parse::<Errno>(), Ok(Errno::EIO));
        assert!("eio".parse::<Errno>().unwrap_err().contains("write EIO"));
        assert!("EROFS".parse::<Errno>().unwrap_err().contains("not an errno"));
    }

    #[test]
    fn op_names_round_trip_through_serde_and_from_str() {
        for op in Op::ALL {
            assert_eq!(op.name().parse::<Op>(), Ok(op));
            assert_eq!(serde_json::to_string(&op).unwrap(), format!("\"{}\"", op.name()));
        }
        assert!("wirte".parse::<Op>().is_err());
    }

    #[test]
    fn flags_serialize_as_the_list_of_set_flags() {
        let flags = RequestFlags { fua: true, req_one: true, ..RequestFlags::default() };
        let text = serde_json::to_string(&flags).unwrap();
        assert_eq!(text, r#"["fua","req_one"]"#);
        assert_eq!(serde_json::from_str::<RequestFlags>(&text).unwrap(), flags);
        assert!(serde_json::from_str::<RequestFlags>(r#"["fuaa"]"#).is_err());
    }

    #[test]
    fn a_zero_length_request_covers_its_offset_and_never_wraps() {
        let flush =
            Request { op: Op::Flush, offset: 7, length: 0, flags: RequestFlags::default(), connection: 0, cookie: 0 };
        assert_eq!(flush.end(), 8);
        let huge = Request { offset: u64::MAX - 1, length: 10, ..flush };
        assert_eq!(huge.end(), u64::MAX);
    }
}
