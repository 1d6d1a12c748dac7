//! The kernel log, read from `/dev/kmsg`: each scenario collects the lines the kernel wrote while it
//! ran (writeback errors, NBD errors, shutdowns, warnings).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;

/// One kernel log record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsgLine {
    /// Syslog priority (0 emergency … 7 debug).
    pub level: u8,
    pub seq: u64,
    /// Microseconds since boot.
    pub usec: u64,
    pub text: String,
}

impl KmsgLine {
    /// Parses one `/dev/kmsg` record: `PRI,SEQ,USEC,FLAGS[,...];TEXT`, followed by optional
    /// continuation lines (` KEY=VALUE`) that are dropped.
    pub fn parse(record: &str) -> Option<Self> {
        let (prefix, text) = record.split_once(';')?;
        let mut fields = prefix.split(',');
        let pri: u32 = fields.next()?.parse().ok()?;
        let seq = fields.next()?.parse().ok()?;
        let usec = fields.next()?.parse().ok()?;
        let text = text.lines().next().unwrap_or("").to_string();
        Some(KmsgLine { level: (pri & 7) as u8, seq, usec, text })
    }
}

/// A reader positioned at the end of the log when opened.
pub struct Kmsg {
    file: File,
}

impl Kmsg {
    /// Opens `/dev/kmsg` and skips everything logged before now.
    pub fn open() -> io::Result<Self> {
        let mut file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open("/dev/kmsg")?;
        file.seek(SeekFrom::End(0))?;
        Ok(Kmsg { file })
    }

    /// Every record logged since the last call (or since opening).
    pub fn drain(&mut self) -> io::Result<Vec<KmsgLine>> {
        let mut lines = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if let Some(line) = KmsgLine::parse(&String::from_utf8_lossy(&buf[..n])) {
                        lines.push(line);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // The ring buffer overwrote records we had not read yet: go on from the oldest kept.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(lines)
    }
}

/// The lines whose text contains any of `needles`.
pub fn matching<'a>(lines: &'a [KmsgLine], needles: &[&str]) -> Vec<&'a KmsgLine> {
    lines.iter().filter(|l| needles.iter().any(|n| l.text.contains(n))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_priority_sequence_time_and_text() {
        let line =
            KmsgLine::parse("3,1234,5678901,-;nbd0: writeback error on inode 131, offset 0, sector 192\n").unwrap();
        assert_eq!(line.level, 3);
        assert_eq!(line.seq, 1234);
        assert_eq!(line.usec, 5678901);
        assert_eq!(line.text, "nbd0: writeback error on inode 131, offset 0, sector 192");
    }

    #[test]
    fn facility_bits_are_stripped_and_continuations_dropped() {
        let line = KmsgLine::parse("12,7,100,c;hello\n SUBSYSTEM=block\n DEVICE=+block:nbd0\n").unwrap();
        assert_eq!(line.level, 4);
        assert_eq!(line.text, "hello");
    }

    #[test]
    fn garbage_is_not_a_record() {
        assert!(KmsgLine::parse("no separator").is_none());
        assert!(KmsgLine::parse("x,1,2,-;text").is_none());
    }

    #[test]
    fn matching_finds_any_needle() {
        let lines = vec![
            KmsgLine::parse("3,1,1,-;XFS (nbd0): log I/O error -5").unwrap(),
            KmsgLine::parse("6,2,2,-;unrelated").unwrap(),
        ];
        assert_eq!(matching(&lines, &["shut down", "log I/O error"]).len(), 1);
    }
}
