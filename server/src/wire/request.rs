//! Transmission-phase requests: the 28-byte header, and the protocol's rules for which requests
//! an export accepts.

use bytes::Buf;
#[cfg(test)]
use bytes::{BufMut, BytesMut};

use super::consts::{command, command_flags, errno, transmission_flags};

pub const REQUEST_HEADER_LEN: usize = 28;

/// The largest READ or WRITE payload accepted. Linux can send 32 MiB (`max_hw_sectors`).
pub const MAX_PAYLOAD: u32 = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub magic: u32,
    pub flags: u16,
    pub kind: u16,
    /// Opaque to the server; echoed verbatim in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    pub fn decode(bytes: &[u8; REQUEST_HEADER_LEN]) -> RequestHeader {
        let mut buf = &bytes[..];
        RequestHeader {
            magic: buf.get_u32(),
            flags: buf.get_u16(),
            kind: buf.get_u16(),
            cookie: buf.get_u64(),
            offset: buf.get_u64(),
            length: buf.get_u32(),
        }
    }

    /// What a client sends; for the tests.
    #[cfg(test)]
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_u32(self.magic);
        out.put_u16(self.flags);
        out.put_u16(self.kind);
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// The commands this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    pub fn from_wire(kind: u16) -> Option<Command> {
        Some(match kind {
            command::READ => Command::Read,
            command::WRITE => Command::Write,
            command::DISC => Command::Disc,
            command::FLUSH => Command::Flush,
            command::TRIM => Command::Trim,
            command::CACHE => Command::Cache,
            command::WRITE_ZEROES => Command::WriteZeroes,
            command::BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Command::Read => "read",
            Command::Write => "write",
            Command::Disc => "disc",
            Command::Flush => "flush",
            Command::Trim => "trim",
            Command::Cache => "cache",
            Command::WriteZeroes => "write_zeroes",
            Command::BlockStatus => "block_status",
        }
    }

    fn modifies_data(self) -> bool {
        matches!(self, Command::Write | Command::Trim | Command::WriteZeroes)
    }

    /// Flags that mean something for this command, beyond FUA (accepted on any command when
    /// SEND_FUA is advertised, because clients set it on non-writes too).
    fn own_flags(self) -> u16 {
        match self {
            Command::Read => command_flags::DF,
            Command::WriteZeroes => command_flags::NO_HOLE | command_flags::FAST_ZERO,
            Command::BlockStatus => command_flags::REQ_ONE,
            _ => 0,
        }
    }
}

/// What a request is checked against: the export as this connection negotiated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub size: u64,
    /// The transmission flags advertised to this client.
    pub flags: u16,
    pub structured_replies: bool,
    /// A meta context (`base:allocation`) was selected with SET_META_CONTEXT.
    pub meta_context: bool,
}

/// A request the export refuses, and the error it gets. The connection goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub reason: String,
}

fn reject(errno: u32, reason: impl Into<String>) -> Rejection {
    Rejection { errno, reason: reason.into() }
}

/// Checks a request the way the protocol asks, in nbdkit's order: unknown command, read-only,
/// range, FLUSH arguments, flags, size, unadvertised command, missing meta context.
/// `DISC` passes unchecked: it gets no reply whatever it carries.
pub fn validate(header: &RequestHeader, export: &Negotiated) -> Result<Command, Rejection> {
    let Some(cmd) = Command::from_wire(header.kind) else {
        return Err(reject(errno::EINVAL, format!("unknown command {}", header.kind)));
    };
    if cmd == Command::Disc {
        return Ok(cmd);
    }
    let advertised = |flag: u16| export.flags & flag != 0;
    if cmd.modifies_data() && advertised(transmission_flags::READ_ONLY) {
        return Err(reject(errno::EPERM, "the export is read-only"));
    }
    let length = u64::from(header.length);
    match cmd {
        Command::Flush => {
            if header.offset != 0 || header.length != 0 {
                return Err(reject(errno::EINVAL, "FLUSH must have offset and length 0"));
            }
        }
        _ => {
            let in_range = header.offset.checked_add(length).is_some_and(|end| end <= export.size);
            if !in_range {
                let errno =
                    if matches!(cmd, Command::Write | Command::WriteZeroes) { errno::ENOSPC } else { errno::EINVAL };
                return Err(reject(
                    errno,
                    format!(
                        "offset {} length {} is past the end of the export ({} bytes)",
                        header.offset, length, export.size
                    ),
                ));
            }
        }
    }
    let mut allowed = cmd.own_flags();
    if advertised(transmission_flags::SEND_FUA) {
        allowed |= command_flags::FUA;
    }
    if !export.structured_replies {
        allowed &= !command_flags::DF;
    }
    if !advertised(transmission_flags::SEND_FAST_ZERO) {
        allowed &= !command_flags::FAST_ZERO;
    }
    let unexpected = header.flags & !allowed;
    if unexpected != 0 {
        return Err(reject(errno::EINVAL, format!("flags {unexpected:#x} are not valid for {}", cmd.name())));
    }
    if matches!(cmd, Command::Read | Command::Write) && header.length > MAX_PAYLOAD {
        return Err(reject(
            errno::EINVAL,
            format!("{} of {} bytes is over the {} byte limit", cmd.name(), header.length, MAX_PAYLOAD),
        ));
    }
    let needed_flag = match cmd {
        Command::Flush => Some(transmission_flags::SEND_FLUSH),
        Command::Trim => Some(transmission_flags::SEND_TRIM),
        Command::WriteZeroes => Some(transmission_flags::SEND_WRITE_ZEROES),
        Command::Cache => Some(transmission_flags::SEND_CACHE),
        _ => None,
    };
    if let Some(flag) = needed_flag
        && !advertised(flag)
    {
        return Err(reject(errno::EINVAL, format!("{} was not advertised for this export", cmd.name())));
    }
    if cmd == Command::BlockStatus {
        if !export.structured_replies || !export.meta_context {
            return Err(reject(errno::EINVAL, "BLOCK_STATUS needs structured replies and a selected meta context"));
        }
        if header.length == 0 {
            return Err(reject(errno::EINVAL, "BLOCK_STATUS of length 0 cannot describe any extent"));
        }
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::consts::REQUEST_MAGIC;
    use transmission_flags::*;

    const SIZE: u64 = 1 << 20;
    const ALL: u16 = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES | SEND_CACHE | SEND_FAST_ZERO;

    fn export(flags: u16) -> Negotiated {
        Negotiated { size: SIZE, flags, structured_replies: true, meta_context: true }
    }

    fn request(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { magic: REQUEST_MAGIC, flags, kind, cookie: 0xdead_beef, offset, length }
    }

    fn errno_of(header: RequestHeader, export: Negotiated) -> u32 {
        validate(&header, &export).unwrap_err().errno
    }

    #[test]
    fn header_round_trips_and_keeps_the_cookie_verbatim() {
        let header = request(command::WRITE, command_flags::FUA, 4096, 512);
        let mut out = BytesMut::new();
        header.encode(&mut out);
        assert_eq!(out.len(), REQUEST_HEADER_LEN);
        assert_eq!(RequestHeader::decode(out[..].try_into().unwrap()), header);
    }

    #[test]
    fn in_range_requests_pass() {
        assert_eq!(validate(&request(command::READ, 0, 0, 4096), &export(ALL)), Ok(Command::Read));
        assert_eq!(validate(&request(command::WRITE, 0, SIZE - 1, 1), &export(ALL)), Ok(Command::Write));
        assert_eq!(validate(&request(command::READ, 0, SIZE, 0), &export(ALL)), Ok(Command::Read));
        assert_eq!(validate(&request(command::FLUSH, 0, 0, 0), &export(ALL)), Ok(Command::Flush));
        assert_eq!(validate(&request(command::DISC, 0xffff, 7, 7), &export(ALL)), Ok(Command::Disc));
    }

    #[test]
    fn out_of_range_writes_get_enospc_and_other_commands_einval() {
        assert_eq!(errno_of(request(command::WRITE, 0, SIZE, 1), export(ALL)), errno::ENOSPC);
        assert_eq!(errno_of(request(command::WRITE_ZEROES, 0, SIZE - 1, 2), export(ALL)), errno::ENOSPC);
        assert_eq!(errno_of(request(command::READ, 0, SIZE, 1), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::TRIM, 0, SIZE + 4096, 0), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::CACHE, 0, SIZE - 1, 2), export(ALL)), errno::EINVAL);
    }

    #[test]
    fn offset_plus_length_overflow_is_rejected_not_wrapped() {
        assert_eq!(errno_of(request(command::READ, 0, u64::MAX, 2), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::WRITE, 0, u64::MAX - 1, 4096), export(ALL)), errno::ENOSPC);
    }

    #[test]
    fn read_only_exports_refuse_every_modification_with_eperm() {
        let read_only = export(ALL | READ_ONLY);
        for kind in [command::WRITE, command::TRIM, command::WRITE_ZEROES] {
            assert_eq!(errno_of(request(kind, 0, 0, 512), read_only), errno::EPERM);
        }
        assert_eq!(validate(&request(command::READ, 0, 0, 512), &read_only), Ok(Command::Read));
    }

    #[test]
    fn unknown_commands_and_flags_get_einval() {
        assert_eq!(errno_of(request(8, 0, 0, 0), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(0xffff, 0, 0, 0), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::READ, 1 << 9, 0, 512), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::WRITE, command_flags::NO_HOLE, 0, 512), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::READ, command_flags::PAYLOAD_LEN, 0, 512), export(ALL)), errno::EINVAL);
    }

    #[test]
    fn fua_is_accepted_on_any_command_only_when_advertised() {
        assert!(validate(&request(command::READ, command_flags::FUA, 0, 512), &export(ALL)).is_ok());
        assert!(validate(&request(command::FLUSH, command_flags::FUA, 0, 0), &export(ALL)).is_ok());
        let no_fua = export(ALL & !SEND_FUA);
        assert_eq!(errno_of(request(command::WRITE, command_flags::FUA, 0, 512), no_fua), errno::EINVAL);
    }

    #[test]
    fn df_needs_structured_replies_and_fast_zero_needs_its_flag() {
        assert!(validate(&request(command::READ, command_flags::DF, 0, 512), &export(ALL)).is_ok());
        let simple = Negotiated { structured_replies: false, meta_context: false, ..export(ALL) };
        assert_eq!(errno_of(request(command::READ, command_flags::DF, 0, 512), simple), errno::EINVAL);
        assert!(validate(&request(command::WRITE_ZEROES, command_flags::FAST_ZERO, 0, 512), &export(ALL)).is_ok());
        let slow = export(ALL & !SEND_FAST_ZERO);
        assert_eq!(errno_of(request(command::WRITE_ZEROES, command_flags::FAST_ZERO, 0, 512), slow), errno::EINVAL);
    }

    #[test]
    fn flush_with_arguments_is_invalid() {
        assert_eq!(errno_of(request(command::FLUSH, 0, 512, 0), export(ALL)), errno::EINVAL);
        assert_eq!(errno_of(request(command::FLUSH, 0, 0, 512), export(ALL)), errno::EINVAL);
    }

    #[test]
    fn oversized_reads_and_writes_get_einval() {
        assert_eq!(
            errno_of(request(command::READ, 0, 0, MAX_PAYLOAD + 1), Negotiated { size: u64::MAX, ..export(ALL) }),
            errno::EINVAL
        );
        let big = Negotiated { size: u64::MAX, ..export(ALL) };
        assert!(validate(&request(command::READ, 0, 0, MAX_PAYLOAD), &big).is_ok());
        assert!(validate(&request(command::TRIM, 0, 0, u32::MAX), &big).is_ok());
    }

    #[test]
    fn unadvertised_commands_get_einval() {
        assert_eq!(errno_of(request(command::TRIM, 0, 0, 512), export(HAS_FLAGS | SEND_FLUSH)), errno::EINVAL);
        assert_eq!(errno_of(request(command::FLUSH, 0, 0, 0), export(HAS_FLAGS)), errno::EINVAL);
        assert_eq!(errno_of(request(command::WRITE_ZEROES, 0, 0, 512), export(HAS_FLAGS)), errno::EINVAL);
    }

    #[test]
    fn block_status_needs_a_meta_context_and_a_length() {
        let none = Negotiated { meta_context: false, ..export(ALL) };
        assert_eq!(errno_of(request(command::BLOCK_STATUS, 0, 0, 512), none), errno::EINVAL);
        assert_eq!(errno_of(request(command::BLOCK_STATUS, 0, 0, 0), export(ALL)), errno::EINVAL);
        assert!(validate(&request(command::BLOCK_STATUS, command_flags::REQ_ONE, 0, 512), &export(ALL)).is_ok());
    }
}
