//! Data patterns that name themselves, and the evidence drawn from comparing views of the same
//! bytes (an mmap load, a read(), the server's disk).
//!
//! Byte `o` of a file written with pattern `P` is `P.tag[o % P.tag.len()]`, so any slice of any
//! view can be recognised by position alone: "old-data" on disk, "NEW-DATA" in the page cache.

use serde_json::{Value, json};

/// A recognisable fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// Short name used in evidence.
    pub name: &'static str,
    tag: &'static [u8],
}

/// What the file held before the failing write: fsynced and on the disk.
pub const OLD: Pattern = Pattern { name: "old", tag: b"old-data|" };
/// What the failing write carried.
pub const NEW: Pattern = Pattern { name: "new", tag: b"NEW-DATA|" };
/// A store made after the error.
pub const REDIRTY: Pattern = Pattern { name: "redirty", tag: b"2nd-store|" };
/// A small write made after eviction.
pub const SECOND: Pattern = Pattern { name: "second", tag: b"2nd-write|" };
/// Seeded into free blocks below the filesystem, to see whether they leak into a file.
pub const STALE: Pattern = Pattern { name: "stale", tag: b"STALE-BLOCK|" };

const KNOWN: &[Pattern] = &[OLD, NEW, REDIRTY, SECOND, STALE];

impl Pattern {
    /// The pattern's bytes for the file range `offset..offset + len`.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let n = self.tag.len() as u64;
        (0..len as u64).map(|i| self.tag[((offset + i) % n) as usize]).collect()
    }

    /// True when `data`, read at file offset `offset`, is exactly this pattern.
    pub fn matches(&self, offset: u64, data: &[u8]) -> bool {
        let n = self.tag.len() as u64;
        data.iter().enumerate().all(|(i, b)| *b == self.tag[((offset + i as u64) % n) as usize])
    }
}

/// Names what `data` (read at file offset `offset`) holds: a known pattern, `zeros`, or `mixed`.
pub fn classify(offset: u64, data: &[u8]) -> &'static str {
    if data.is_empty() {
        return "empty";
    }
    if data.iter().all(|b| *b == 0) {
        return "zeros";
    }
    KNOWN.iter().find(|p| p.matches(offset, data)).map(|p| p.name).unwrap_or("mixed")
}

/// Up to `max` bytes as text: printable ASCII kept, everything else escaped as `\xNN`.
pub fn escape(data: &[u8], max: usize) -> String {
    let mut out = String::new();
    for b in data.iter().take(max) {
        match b {
            b' '..=b'~' if *b != b'\\' => out.push(*b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    if data.len() > max {
        out.push('…');
    }
    out
}

/// How a view's bytes look, for evidence: the content class and the first bytes.
pub fn describe(offset: u64, data: &[u8]) -> Value {
    json!({ "content": classify(offset, data), "length": data.len(), "first_bytes": escape(data, 24) })
}

/// Where two views of the same range first differ, or `None` when they are equal.
pub fn first_difference(offset: u64, a: &[u8], b: &[u8]) -> Option<Value> {
    let at = a.iter().zip(b).position(|(x, y)| x != y).or(if a.len() != b.len() {
        Some(a.len().min(b.len()))
    } else {
        None
    })?;
    let end_a = (at + 16).min(a.len());
    let end_b = (at + 16).min(b.len());
    Some(json!({
        "file_offset": offset + at as u64,
        "a": escape(&a[at..end_a], 16),
        "b": escape(&b[at..end_b], 16),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_bytes_depend_on_file_offset_so_any_slice_is_recognised() {
        let whole = NEW.bytes(0, 100);
        assert!(NEW.matches(37, &whole[37..60]));
        assert!(!NEW.matches(36, &whole[37..60]));
        assert_eq!(classify(37, &whole[37..60]), "new");
        assert_eq!(classify(4096, &OLD.bytes(4096, 4096)), "old");
    }

    #[test]
    fn classify_names_zeros_and_mixtures() {
        assert_eq!(classify(0, &[0; 64]), "zeros");
        let mut data = OLD.bytes(0, 64);
        data[10] = b'!';
        assert_eq!(classify(0, &data), "mixed");
        assert_eq!(classify(0, &[]), "empty");
    }

    #[test]
    fn escape_keeps_text_and_escapes_the_rest() {
        assert_eq!(escape(b"ab\0\\c", 10), "ab\\x00\\x5cc");
        assert_eq!(escape(b"abcdef", 3), "abc…");
    }

    #[test]
    fn first_difference_reports_the_offset_and_both_sides() {
        let a = OLD.bytes(0, 64);
        let mut b = a.clone();
        b[20] = b'X';
        let d = first_difference(4096, &a, &b).unwrap();
        assert_eq!(d["file_offset"], 4116);
        assert!(d["b"].as_str().unwrap().starts_with('X'));
        assert!(first_difference(0, &a, &a).is_none());
        assert_eq!(first_difference(0, &a, &a[..10]).unwrap()["file_offset"], 10);
    }
}
