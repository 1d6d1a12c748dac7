//! Bad sectors, the way dm-dust models them: a read of a bad range fails; a write over it fails
//! while it has write failures left, and otherwise succeeds and remaps (clears) the range.
//!
//! Ranges come from two places: declared in the policy (`bad_sectors:`), and acquired when a rule
//! with `sticky: true` fails a write. Acquired ones survive a policy swap; declared ones are
//! replaced by the new policy's.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::request::Errno;

/// One bad range, as the control API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BadSector {
    pub start: u64,
    pub end: u64,
    pub errno: Errno,
    /// How many more writes over this range fail before one remaps it.
    pub write_failures: u32,
    /// The rule that made it bad, or the `name` of the declared entry.
    pub origin: Arc<str>,
    /// True when the policy declared it, false when a sticky rule's failed write left it.
    pub declared: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    end: u64,
    errno: Errno,
    write_failures: u32,
    origin: Arc<str>,
    declared: bool,
}

/// Non-overlapping bad ranges keyed by start.
#[derive(Debug, Clone, Default)]
pub(crate) struct BadSectors {
    map: BTreeMap<u64, Entry>,
}

/// A failure the medium reports for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MediumError {
    pub errno: Errno,
    pub origin: Arc<str>,
}

impl BadSectors {
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Splits the entry covering `position` (if any) so that no entry straddles it.
    fn split_at(&mut self, position: u64) {
        let Some((_, entry)) = self.map.range_mut(..position).next_back() else { return };
        if entry.end > position {
            let tail = entry.clone();
            entry.end = position;
            self.map.insert(position, tail);
        }
    }

    /// Starts of the entries overlapping `[start, end)`, after splitting at both ends.
    fn isolate(&mut self, start: u64, end: u64) -> Vec<u64> {
        self.split_at(start);
        self.split_at(end);
        self.map.range(start..end).map(|(&key, _)| key).collect()
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = (&u64, &Entry)> {
        let before = self.map.range(..start).next_back().filter(|(_, entry)| entry.end > start);
        before.into_iter().chain(self.map.range(start..end))
    }

    /// Marks `[start, end)` bad, replacing whatever was recorded there.
    pub(crate) fn insert(
        &mut self,
        start: u64,
        end: u64,
        errno: Errno,
        write_failures: u32,
        origin: Arc<str>,
        declared: bool,
    ) {
        if start >= end {
            return;
        }
        self.remove(start, end);
        self.map.insert(start, Entry { end, errno, write_failures, origin, declared });
    }

    /// Clears `[start, end)`: a write succeeded over it.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        if self.map.is_empty() || start >= end {
            return;
        }
        for key in self.isolate(start, end) {
            self.map.remove(&key);
        }
    }

    /// The error a read of `[start, end)` meets: that of the lowest bad range it touches.
    pub(crate) fn read_error(&self, start: u64, end: u64) -> Option<MediumError> {
        self.overlapping(start, end)
            .next()
            .map(|(_, entry)| MediumError { errno: entry.errno, origin: entry.origin.clone() })
    }

    /// Whether a write of `[start, end)` fails because a range under it still has write failures
    /// left. When it does, every such part of the range uses up one failure.
    pub(crate) fn write_error(&mut self, start: u64, end: u64) -> Option<MediumError> {
        if !self.overlapping(start, end).any(|(_, entry)| entry.write_failures > 0) {
            return None;
        }
        let mut error = None;
        for key in self.isolate(start, end) {
            let Some(entry) = self.map.get_mut(&key) else { continue };
            if entry.write_failures > 0 {
                entry.write_failures -= 1;
                error.get_or_insert_with(|| MediumError { errno: entry.errno, origin: entry.origin.clone() });
            }
        }
        error
    }

    /// Drops the declared ranges, keeping those acquired from failed writes.
    #[cfg(test)]
    pub(crate) fn forget_declared(&mut self) {
        self.map.retain(|_, entry| !entry.declared);
    }

    /// Replaces the declared ranges with `declared` (built before, outside any lock), keeping the
    /// acquired ones where no declared range covers them: what dropping the declared ranges and
    /// inserting the new ones one by one does, in time that grows with the acquired ranges only.
    /// Returns what was replaced, to be dropped outside the lock too.
    #[must_use]
    pub(crate) fn replace_declared(&mut self, declared: BadSectors) -> BadSectors {
        let old = std::mem::replace(self, declared);
        for (&start, entry) in old.map.iter().filter(|(_, entry)| !entry.declared) {
            self.insert_where_free(start, entry);
        }
        old
    }

    /// Inserts the parts of `[start, entry.end)` that no entry covers.
    fn insert_where_free(&mut self, start: u64, entry: &Entry) {
        let covered: Vec<(u64, u64)> =
            self.overlapping(start, entry.end).map(|(&from, other)| (from, other.end)).collect();
        let mut at = start;
        for (from, to) in covered {
            if from > at {
                self.map.insert(at, Entry { end: from, ..entry.clone() });
            }
            at = at.max(to);
        }
        if at < entry.end {
            self.map.insert(at, entry.clone());
        }
    }

    /// The declared ranges of a policy, inserted in order (a later one replaces an earlier one
    /// where they overlap).
    pub(crate) fn declared<'a>(
        ranges: impl IntoIterator<Item = &'a crate::policy::compiled::DeclaredBadSector>,
    ) -> BadSectors {
        let mut map = BadSectors::default();
        for declared in ranges {
            map.insert(
                declared.range.start,
                declared.range.end_or_max(),
                declared.errno,
                declared.write_failures,
                declared.name.clone(),
                true,
            );
        }
        map
    }

    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }

    pub(crate) fn list(&self) -> Vec<BadSector> {
        self.map
            .iter()
            .map(|(&start, entry)| BadSector {
                start,
                end: entry.end,
                errno: entry.errno,
                write_failures: entry.write_failures,
                origin: entry.origin.clone(),
                declared: entry.declared,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn origin() -> Arc<str> {
        Arc::from("test")
    }

    #[test]
    fn a_write_over_part_of_a_bad_range_clears_only_that_part() {
        let mut bad = BadSectors::default();
        bad.insert(0, 4096, Errno::EIO, 0, origin(), false);
        bad.remove(1024, 2048);
        let spans: Vec<(u64, u64)> = bad.list().iter().map(|sector| (sector.start, sector.end)).collect();
        assert_eq!(spans, [(0, 1024), (2048, 4096)]);
        assert!(bad.read_error(1024, 2048).is_none());
        assert_eq!(bad.read_error(1000, 1100).unwrap().errno, Errno::EIO);
    }

    #[test]
    fn write_failures_are_used_up_per_part_before_the_write_remaps() {
        let mut bad = BadSectors::default();
        bad.insert(0, 1024, Errno::ENOSPC, 2, origin(), true);
        assert_eq!(bad.write_error(0, 512).unwrap().errno, Errno::ENOSPC);
        assert_eq!(bad.write_error(0, 512).unwrap().errno, Errno::ENOSPC);
        assert!(bad.write_error(0, 512).is_none());
        // The other half still has both failures.
        assert!(bad.write_error(512, 1024).is_some());
        assert_eq!(bad.list().iter().map(|sector| sector.write_failures).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn forgetting_declared_ranges_keeps_acquired_ones() {
        let mut bad = BadSectors::default();
        bad.insert(0, 512, Errno::EIO, 0, origin(), true);
        bad.insert(512, 1024, Errno::EIO, 0, origin(), false);
        bad.forget_declared();
        assert_eq!(bad.list().len(), 1);
        assert_eq!(bad.list()[0].start, 512);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u64, u64, u32),
        Remove(u64, u64),
        Write(u64, u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        let span = (0u64..64, 1u64..24).prop_map(|(start, length)| (start, start + length));
        prop_oneof![
            (span.clone(), 0u32..3).prop_map(|((start, end), failures)| Step::Insert(start, end, failures)),
            span.clone().prop_map(|(start, end)| Step::Remove(start, end)),
            span.prop_map(|(start, end)| Step::Write(start, end)),
        ]
    }

    proptest! {
        /// Replacing the declared ranges at once is what forgetting them and inserting the new
        /// ones one by one does.
        #[test]
        fn replacing_declared_ranges_matches_inserting_them_one_by_one(
            before in prop::collection::vec((0u64..64, 1u64..24, any::<bool>()), 0..12),
            after in prop::collection::vec((0u64..64, 1u64..24), 0..12),
        ) {
            let mut slow = BadSectors::default();
            for &(start, length, declared) in &before {
                slow.insert(start, start + length, Errno::EIO, 0, origin(), declared);
            }
            let mut fast = slow.clone();
            slow.forget_declared();
            let mut declared = BadSectors::default();
            for &(start, length) in &after {
                slow.insert(start, start + length, Errno::ENOSPC, 1, origin(), true);
                declared.insert(start, start + length, Errno::ENOSPC, 1, origin(), true);
            }
            let _old = fast.replace_declared(declared);
            prop_assert_eq!(fast.list(), slow.list());
        }

        /// A byte-by-byte model: each byte is good, or bad with a count of write failures left.
        #[test]
        fn bad_sectors_behave_like_a_per_byte_model(steps in prop::collection::vec(step(), 1..40)) {
            let mut bad = BadSectors::default();
            let mut model: Vec<Option<u32>> = vec![None; 96];
            for step in steps {
                match step {
                    Step::Insert(start, end, failures) => {
                        bad.insert(start, end, Errno::EIO, failures, origin(), false);
                        for byte in start..end { model[byte as usize] = Some(failures); }
                    }
                    Step::Remove(start, end) => {
                        bad.remove(start, end);
                        for byte in start..end { model[byte as usize] = None; }
                    }
                    Step::Write(start, end) => {
                        let fails = model[start as usize..end as usize].iter().any(|byte| matches!(byte, Some(n) if *n > 0));
                        prop_assert_eq!(bad.write_error(start, end).is_some(), fails);
                        if fails {
                            for byte in &mut model[start as usize..end as usize] {
                                if let Some(n) = byte && *n > 0 { *n -= 1; }
                            }
                        }
                    }
                }
                for start in 0..96u64 {
                    prop_assert_eq!(bad.read_error(start, start + 1).is_some(), model[start as usize].is_some());
                }
                let list = bad.list();
                for pair in list.windows(2) {
                    prop_assert!(pair[0].end <= pair[1].start, "entries overlap: {:?}", pair);
                }
                for sector in &list {
                    prop_assert!(sector.start < sector.end);
                    for byte in sector.start..sector.end {
                        prop_assert_eq!(model[byte as usize], Some(sector.write_failures));
                    }
                }
            }
        }
    }
}
