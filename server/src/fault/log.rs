//! The fault log: one JSON record per request a rule touched, and one per power change no
//! request decided (a power cut through the control API, a power-on), kept in memory for the
//! control API and appended to `--fault-log FILE` by a writer thread, so request tasks never wait
//! on disk.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use nbdfault_policies::{CutRecord, Decision, FaultRecord, LogEntry, PowerRecord, Request};

/// How a decided request ended, for its record.
#[derive(Debug, Clone, Default)]
pub struct Finished {
    /// How long it waited (a delay, a stall).
    pub waited: Duration,
    /// Bytes that reached storage.
    pub persisted: u64,
    /// When it ended, since server start.
    pub at: Duration,
    /// What the power cut it met did, if it met one.
    pub cut: Option<CutRecord>,
}

/// Records kept in memory; older ones are dropped (and counted) once there are more.
pub const DEFAULT_CAPACITY: usize = 1 << 18;
/// Records a reader copies out of memory per hold of the lock, so a request logging its fault
/// never waits for a whole log's copy (the log can hold [`DEFAULT_CAPACITY`] records).
const READ_SLICE: usize = 4096;

pub struct FaultLog {
    seq: AtomicU64,
    capacity: usize,
    records: Mutex<Records>,
    dropped: AtomicU64,
    sink: Mutex<Option<FileSink>>,
}

/// The records in memory and, kept with them, how many each export has.
#[derive(Default)]
struct Records {
    entries: VecDeque<Arc<LogEntry>>,
    per_export: HashMap<String, usize>,
}

struct FileSink {
    lines: mpsc::Sender<String>,
    writer: JoinHandle<()>,
}

impl FaultLog {
    /// A log kept in memory only.
    pub fn in_memory(capacity: usize) -> FaultLog {
        FaultLog {
            seq: AtomicU64::new(0),
            capacity,
            records: Mutex::new(Records::default()),
            dropped: AtomicU64::new(0),
            sink: Mutex::new(None),
        }
    }

    /// A log that also appends every record to `path`.
    pub fn with_file(path: &Path, capacity: usize) -> io::Result<FaultLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let log = FaultLog::in_memory(capacity);
        let (lines, receiver) = mpsc::channel::<String>();
        let writer = std::thread::Builder::new().name("fault-log".into()).spawn(move || write_lines(file, receiver))?;
        *log.sink.lock().unwrap_or_else(|p| p.into_inner()) = Some(FileSink { lines, writer });
        Ok(log)
    }

    /// Logs a finished request and returns its record. Requests no rule touched are not logged.
    pub fn record(
        &self,
        export: &str,
        request: &Request,
        decision: &Decision,
        finished: Finished,
    ) -> Option<Arc<LogEntry>> {
        decision.rule.as_ref()?;
        let seq = self.next_seq();
        let mut record = FaultRecord::new(seq, finished.at, export, request, decision, finished.persisted)?;
        record.waited_ns = Some(u64::try_from(finished.waited.as_nanos()).unwrap_or(u64::MAX));
        record.cut = finished.cut;
        tracing::info!(
            seq,
            export,
            rule = %record.rule,
            op = %request.op,
            offset = request.offset,
            length = request.length,
            outcome = ?record.outcome,
            errno = ?record.errno,
            "fault injected"
        );
        Some(self.keep(LogEntry::Request(record)))
    }

    /// Logs a power change no request decided; `seq` is filled in. Returns the entry.
    pub fn record_power(&self, mut record: PowerRecord) -> Arc<LogEntry> {
        record.seq = self.next_seq();
        tracing::info!(
            seq = record.seq,
            export = %record.export,
            event = ?record.event,
            origin = ?record.origin,
            undone_writes = record.cut.as_ref().map(|cut| cut.undone_writes),
            "power change logged"
        );
        self.keep(LogEntry::Power(record))
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Sends an entry to the file and keeps it in memory.
    fn keep(&self, entry: LogEntry) -> Arc<LogEntry> {
        let entry = Arc::new(entry);
        if let Some(sink) = self.sink.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // The writer thread only stops when the log is closed; a line sent after that is lost
            // with nothing to report it to.
            let _ = sink.lines.send(entry.to_json_line());
        }
        let mut records = self.records();
        if records.entries.len() == self.capacity
            && let Some(oldest) = records.entries.pop_front()
        {
            if let Some(count) = records.per_export.get_mut(oldest.export()) {
                *count -= 1;
            }
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        match records.per_export.get_mut(entry.export()) {
            Some(count) => *count += 1,
            None => {
                records.per_export.insert(entry.export().to_string(), 1);
            }
        }
        records.entries.push_back(Arc::clone(&entry));
        entry
    }

    fn records(&self) -> std::sync::MutexGuard<'_, Records> {
        // Every update under this lock is a push and a pop with their counts; a panic cannot
        // leave one half done.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records with `seq > since`, of one export or all, oldest first. Copied out
    /// [`READ_SLICE`] records per hold of the lock: records that fall out of memory meanwhile are
    /// skipped, records logged meanwhile are included.
    pub fn since(&self, export: Option<&str>, since: u64) -> Vec<Arc<LogEntry>> {
        self.since_between_slices(export, since, || {})
    }

    /// [`FaultLog::since`], calling `between` each time it lets go of the lock (tests log there).
    fn since_between_slices(&self, export: Option<&str>, since: u64, mut between: impl FnMut()) -> Vec<Arc<LogEntry>> {
        let mut out = Vec::new();
        // Positions count every record ever kept, so they survive the oldest being dropped.
        let mut next = self.dropped.load(Ordering::Relaxed);
        loop {
            let records = self.records();
            let dropped = self.dropped.load(Ordering::Relaxed);
            let start = usize::try_from(next.saturating_sub(dropped)).unwrap_or(usize::MAX);
            if start >= records.entries.len() {
                return out;
            }
            let end = records.entries.len().min(start + READ_SLICE);
            out.extend(
                records
                    .entries
                    .range(start..end)
                    .filter(|record| record.seq() > since && export.is_none_or(|name| record.export() == name))
                    .cloned(),
            );
            next = dropped + end as u64;
            drop(records);
            between();
        }
    }

    /// The request records in memory, oldest first, for tests.
    #[cfg(test)]
    pub fn requests(&self) -> Vec<FaultRecord> {
        self.since(None, 0).iter().filter_map(|entry| entry.request().cloned()).collect()
    }

    /// The power records in memory, oldest first, for tests.
    #[cfg(test)]
    pub fn power_records(&self) -> Vec<PowerRecord> {
        self.since(None, 0).iter().filter_map(|entry| entry.power().cloned()).collect()
    }

    /// How many records one export has in memory.
    pub fn count(&self, export: &str) -> usize {
        self.records().per_export.get(export).copied().unwrap_or(0)
    }

    /// Records dropped from memory because there were more than the capacity (the file keeps all).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Writes out every pending line and closes the file.
    pub fn close(&self) {
        let sink = self.sink.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(FileSink { lines, writer }) = sink {
            drop(lines);
            if writer.join().is_err() {
                tracing::error!("the fault log writer thread panicked; the file may miss its last records");
            }
        }
    }
}

fn write_lines(file: File, lines: mpsc::Receiver<String>) {
    let mut out = BufWriter::new(file);
    let mut failed = false;
    while let Ok(line) = lines.recv() {
        let mut result = writeln!(out, "{line}");
        // Write whatever else is queued, then flush, so readers of the file see records promptly.
        while result.is_ok() {
            match lines.try_recv() {
                Ok(next) => result = writeln!(out, "{next}"),
                Err(_) => break,
            }
        }
        if result.is_ok() {
            result = out.flush();
        }
        if let Err(error) = result
            && !failed
        {
            failed = true;
            tracing::error!(%error, "writing the fault log file failed; records stay available in memory");
        }
    }
    let _ = out.flush();
}

/// A power-on of `export` through the control API, as tests log one.
#[cfg(test)]
pub(crate) fn power_on_record(export: &str) -> PowerRecord {
    PowerRecord {
        seq: 0,
        time_ns: 7,
        export: export.to_string(),
        event: nbdfault_policies::PowerEvent::PowerOn,
        origin: nbdfault_policies::PowerOrigin::ControlApi,
        next_request_index: 0,
        trigger: None,
        cut: None,
        power_off: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nbdfault_policies::{Action, Engine, Op, Policy, PowerEvent, RequestFlags};

    fn failing_decision() -> (Request, Decision) {
        let policy = Policy::from_yaml(
            "rules:\n  - name: all-writes\n    when: { op: write }\n    then: { error: EIO }\n",
            "test",
        )
        .unwrap();
        let engine = Engine::new(Some(policy));
        let request = Request {
            op: Op::Write,
            offset: 4096,
            length: 512,
            flags: RequestFlags::default(),
            connection: 1,
            cookie: 7,
        };
        let decision = engine.decide(&request, Duration::ZERO);
        assert_eq!(decision.action, Action::Skip);
        (request, decision)
    }

    #[test]
    fn records_are_numbered_filtered_and_bounded() {
        let log = FaultLog::in_memory(2);
        let (request, decision) = failing_decision();
        for export in ["a", "b", "a"] {
            log.record(export, &request, &decision, Finished { at: Duration::from_millis(1), ..Finished::default() });
        }
        let all = log.since(None, 0);
        assert_eq!(all.iter().map(|r| r.seq()).collect::<Vec<_>>(), vec![2, 3]);
        assert_eq!(log.dropped(), 1);
        assert_eq!(log.since(Some("a"), 0).len(), 1);
        assert_eq!(log.since(None, 2).len(), 1);
        assert_eq!(log.count("b"), 1);
    }

    #[test]
    fn each_exports_count_follows_its_records_into_and_out_of_memory() {
        let log = FaultLog::in_memory(3);
        let (request, decision) = failing_decision();
        let counts = |log: &FaultLog| (log.count("a"), log.count("b"), log.count("never"));
        log.record("a", &request, &decision, Finished::default());
        log.record("b", &request, &decision, Finished::default());
        log.record_power(power_on_record("a"));
        assert_eq!(counts(&log), (2, 1, 0));
        // Each new record pushes the oldest out: "a", then "b", then the power record of "a".
        log.record("b", &request, &decision, Finished::default());
        assert_eq!(counts(&log), (1, 2, 0));
        log.record("b", &request, &decision, Finished::default());
        assert_eq!(counts(&log), (1, 2, 0));
        log.record("b", &request, &decision, Finished::default());
        assert_eq!(counts(&log), (0, 3, 0));
        for export in ["a", "b"] {
            assert_eq!(log.count(export), log.since(Some(export), 0).len());
        }
    }

    #[test]
    fn a_log_longer_than_a_read_slice_reads_back_whole_in_order_and_filtered() {
        let capacity = 2 * READ_SLICE + 10;
        let log = FaultLog::in_memory(capacity);
        let (request, decision) = failing_decision();
        let total = capacity + 100;
        for i in 0..total {
            log.record(if i % 3 == 0 { "a" } else { "b" }, &request, &decision, Finished::default());
        }
        let all = log.since(None, 0);
        let expected: Vec<u64> = (total - capacity + 1..=total).map(|seq| seq as u64).collect();
        assert_eq!(all.iter().map(|record| record.seq()).collect::<Vec<_>>(), expected);
        let a = log.since(Some("a"), 0);
        assert_eq!(a.len(), log.count("a"));
        assert!(a.iter().all(|record| record.export() == "a" && (record.seq() - 1) % 3 == 0));
        let later = log.since(None, total as u64 - 5);
        assert_eq!(later.len(), 5);
    }

    #[test]
    fn a_reader_copying_while_requests_log_gets_no_record_twice_and_keeps_their_order() {
        let capacity = READ_SLICE + 7;
        let log = Arc::new(FaultLog::in_memory(capacity));
        let (request, decision) = failing_decision();
        for _ in 0..capacity {
            log.record("a", &request, &decision, Finished::default());
        }
        let writer = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for _ in 0..20 * READ_SLICE {
                    log.record("a", &request, &decision, Finished::default());
                }
            })
        };
        let mut reads = 0;
        while !writer.is_finished() || reads == 0 {
            let seqs: Vec<u64> = log.since(Some("a"), 0).iter().map(|record| record.seq()).collect();
            // One writer numbers the records in the order it keeps them: a copy holds them in
            // that order, none twice.
            assert!(!seqs.is_empty());
            assert!(seqs.windows(2).all(|pair| pair[1] > pair[0]), "a repeat or a step back in {seqs:?}");
            reads += 1;
        }
        writer.join().unwrap();
        assert_eq!(log.count("a"), capacity);
    }

    #[test]
    fn records_logged_between_two_slices_of_a_copy_neither_repeat_nor_hide_what_memory_still_holds() {
        let (request, decision) = failing_decision();
        let capacity = 2 * READ_SLICE;
        // How many records are logged while the copy has let go of the lock after its first
        // slice, and the first and last record numbers the copy returns.
        for (logged, first, last) in [
            (1, 1, 2 * READ_SLICE + 1),
            (READ_SLICE, 1, 3 * READ_SLICE),
            // More than the copy had taken fall out of memory: it goes on from the oldest left.
            (READ_SLICE + 5, 1, 3 * READ_SLICE + 5),
        ] {
            let log = FaultLog::in_memory(capacity);
            for _ in 0..capacity {
                log.record("a", &request, &decision, Finished::default());
            }
            let mut slices = 0;
            let seqs: Vec<u64> = log
                .since_between_slices(Some("a"), 0, || {
                    slices += 1;
                    if slices == 1 {
                        for _ in 0..logged {
                            log.record("a", &request, &decision, Finished::default());
                        }
                    }
                })
                .iter()
                .map(|record| record.seq())
                .collect();
            let skipped = logged.saturating_sub(READ_SLICE);
            let expected: Vec<u64> =
                (first..=READ_SLICE).chain(READ_SLICE + 1 + skipped..=last).map(|seq| seq as u64).collect();
            assert_eq!(seqs, expected, "{logged} records logged between the slices");
        }
    }

    #[test]
    fn untouched_requests_are_not_logged() {
        let log = FaultLog::in_memory(8);
        let engine = Engine::new(None);
        let request =
            Request { op: Op::Read, offset: 0, length: 1, flags: RequestFlags::default(), connection: 1, cookie: 1 };
        let decision = engine.decide(&request, Duration::ZERO);
        log.record("a", &request, &decision, Finished::default());
        assert!(log.since(None, 0).is_empty());
        // Nor do they use up a sequence number: the next record is number 1.
        let (request, decision) = failing_decision();
        log.record("a", &request, &decision, Finished::default());
        assert_eq!(log.since(None, 0)[0].seq(), 1);
    }

    #[test]
    fn the_file_gets_one_json_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults.jsonl");
        let log = FaultLog::with_file(&path, 8).unwrap();
        let (request, decision) = failing_decision();
        log.record(
            "disk",
            &request,
            &decision,
            Finished { waited: Duration::from_millis(5), at: Duration::from_secs(1), ..Finished::default() },
        );
        log.record_power(power_on_record("disk"));
        log.record("disk", &request, &decision, Finished { at: Duration::from_secs(2), ..Finished::default() });
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let entries = nbdfault_policies::parse_fault_log(&text).unwrap();
        assert_eq!(entries.len(), 3);
        let first = entries[0].request().unwrap();
        assert_eq!((first.rule.as_str(), first.waited_ns), ("all-writes", Some(5_000_000)));
        let power = entries[1].power().expect("the power record, in its place");
        assert_eq!((power.seq, power.event), (2, PowerEvent::PowerOn));
        assert_eq!(entries[2].seq(), 3);
    }
}
