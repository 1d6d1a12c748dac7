//! The undo journal behind "power cut": the previous contents of every range written since the
//! last successful FLUSH, so the writes can be undone as if they never left a volatile cache.

use bytes::Bytes;

/// One undo entry: what `[offset, offset + before.len())` held before an unflushed write.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// Order of recording; a flush covers the entries recorded before it started.
    seq: u64,
    offset: u64,
    before: Bytes,
}

impl Entry {
    fn end(&self) -> u64 {
        self.offset + self.before.len() as u64
    }
}

/// Entries a [`UndoJournal::clear`] took out: dropping them frees their memory.
#[derive(Debug, Default)]
pub struct Forgotten {
    pub writes: usize,
    pub bytes: u64,
    /// Held only to be dropped where the caller chooses.
    _entries: Vec<Entry>,
}

impl Forgotten {
    /// Frees the entries (up to the journal's limit of buffers) on a blocking thread, not on one
    /// that serves NBD; an empty journal spawns nothing.
    pub fn free_in_background(self) {
        if self.writes > 0 {
            tokio::task::spawn_blocking(move || drop(self));
        }
    }
}

/// The unflushed writes of one export, oldest first.
#[derive(Debug)]
pub struct UndoJournal {
    entries: Vec<Entry>,
    next_seq: u64,
    bytes: u64,
    limit: u64,
    /// Writes that could not be journaled because the limit was reached since the last flush.
    overflowed: u64,
    /// Changes whenever the journal is emptied other than by a flush or a cut (a reset, a policy
    /// that keeps no journal): a write that read its old contents before that records nothing.
    epoch: u64,
}

impl UndoJournal {
    pub fn new(limit: u64) -> UndoJournal {
        UndoJournal { entries: Vec::new(), next_seq: 0, bytes: 0, limit, overflowed: 0, epoch: 0 }
    }

    /// The journal's epoch now: what a write reads its old contents in, to record them in.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Remembers what a write is about to overwrite, read in `epoch`. Returns false, and
    /// remembers nothing, when the journal is full (that write will survive a power cut) or was
    /// emptied since `epoch` began (a reset, or a policy that keeps no journal).
    pub fn record(&mut self, epoch: u64, offset: u64, before: Bytes) -> bool {
        if epoch != self.epoch {
            return false;
        }
        if !self.has_room(before.len() as u64) {
            self.count_unjournaled();
            return false;
        }
        self.bytes += before.len() as u64;
        self.entries.push(Entry { seq: self.next_seq, offset, before });
        self.next_seq += 1;
        true
    }

    /// True when `length` more bytes fit, so reading them for the journal is worth it.
    pub fn has_room(&self, length: u64) -> bool {
        self.bytes.saturating_add(length) <= self.limit
    }

    /// A write that will not be undone by a power cut, because the journal was full.
    pub fn count_unjournaled(&mut self) {
        self.overflowed += 1;
    }

    /// Where a flush starting now draws its line: it covers entries recorded before this mark.
    pub fn mark(&self) -> u64 {
        self.next_seq
    }

    /// A flush that started at `mark` succeeded: the writes recorded before it are durable.
    pub fn clear_through(&mut self, mark: u64) {
        self.entries.retain(|entry| entry.seq >= mark);
        self.bytes = self.entries.iter().map(|entry| entry.before.len() as u64).sum();
        if self.entries.is_empty() {
            self.overflowed = 0;
        }
    }

    /// A FUA write made `[offset, offset + length)` durable: nothing may undo it any more, so
    /// the overlapping parts of older entries are dropped.
    pub fn forget_range(&mut self, offset: u64, length: u64) {
        let end = offset.saturating_add(length);
        let mut kept = Vec::with_capacity(self.entries.len());
        for entry in self.entries.drain(..) {
            if entry.end() <= offset || entry.offset >= end {
                kept.push(entry);
                continue;
            }
            if entry.offset < offset {
                let take = (offset - entry.offset) as usize;
                kept.push(Entry { seq: entry.seq, offset: entry.offset, before: entry.before.slice(..take) });
            }
            if entry.end() > end {
                let skip = (end - entry.offset) as usize;
                kept.push(Entry { seq: entry.seq, offset: end, before: entry.before.slice(skip..) });
            }
        }
        self.entries = kept;
        self.bytes = self.entries.iter().map(|entry| entry.before.len() as u64).sum();
    }

    /// Forgets everything (the storage was reset, or the writes reached the medium), also what
    /// writes in flight read before this: they record nothing. Returns what it forgot (to be
    /// dropped outside the lock), how many writes and bytes.
    pub fn clear(&mut self) -> Forgotten {
        self.epoch += 1;
        self.overflowed = 0;
        let bytes = std::mem::take(&mut self.bytes);
        Forgotten { writes: self.entries.len(), bytes, _entries: std::mem::take(&mut self.entries) }
    }

    /// Takes the entries to undo, newest first, and empties the journal. The second value is how
    /// many writes since the last flush were too many to journal (they cannot be undone).
    pub fn take_for_undo(&mut self) -> (Vec<(u64, Bytes)>, u64) {
        let overflowed = std::mem::take(&mut self.overflowed);
        self.bytes = 0;
        let undo = self.entries.drain(..).rev().map(|entry| (entry.offset, entry.before)).collect();
        (undo, overflowed)
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn undo_runs_newest_first_so_the_oldest_contents_win() {
        let mut journal = UndoJournal::new(1 << 20);
        journal.record(0, 0, Bytes::from_static(b"AAAA"));
        journal.record(0, 0, Bytes::from_static(b"BBBB"));
        let (undo, overflowed) = journal.take_for_undo();
        assert_eq!(undo, vec![(0, Bytes::from_static(b"BBBB")), (0, Bytes::from_static(b"AAAA"))]);
        assert_eq!(overflowed, 0);
        assert!(journal.is_empty());
    }

    #[test]
    fn fua_writes_cut_their_range_out_of_older_entries() {
        let mut journal = UndoJournal::new(1 << 20);
        journal.record(0, 0, Bytes::from_static(b"0123456789"));
        journal.forget_range(3, 4);
        let (undo, _) = journal.take_for_undo();
        assert_eq!(undo, vec![(7, Bytes::from_static(b"789")), (0, Bytes::from_static(b"012"))]);
    }

    #[test]
    fn a_full_journal_refuses_and_counts_what_it_could_not_keep() {
        let mut journal = UndoJournal::new(6);
        assert!(journal.record(0, 0, Bytes::from_static(b"1234")));
        assert!(!journal.record(0, 8, Bytes::from_static(b"5678")));
        assert_eq!(journal.bytes(), 4);
        let (undo, overflowed) = journal.take_for_undo();
        assert_eq!((undo.len(), overflowed), (1, 1));
    }

    #[test]
    fn a_flush_covers_only_writes_recorded_before_it_started() {
        let mut journal = UndoJournal::new(1 << 20);
        journal.record(0, 0, Bytes::from_static(b"old"));
        let mark = journal.mark();
        journal.record(0, 8, Bytes::from_static(b"new"));
        journal.clear_through(mark);
        let (undo, _) = journal.take_for_undo();
        assert_eq!(undo, vec![(8, Bytes::from_static(b"new"))]);
    }

    #[test]
    fn clearing_forgets_everything_also_what_writes_in_flight_read_before_it() {
        let mut journal = UndoJournal::new(1 << 20);
        journal.record(journal.epoch(), 0, Bytes::from_static(b"x"));
        let in_flight = journal.epoch();
        let forgotten = journal.clear();
        assert_eq!((forgotten.writes, forgotten.bytes), (1, 1));
        assert_eq!((journal.len(), journal.bytes()), (0, 0));
        assert!(!journal.record(in_flight, 8, Bytes::from_static(b"y")), "read before the clear: not recorded");
        assert!(journal.is_empty());
        assert!(journal.record(journal.epoch(), 8, Bytes::from_static(b"z")));
    }
}
