//! The fault log: one JSON record per request a rule touched, and one per power change no
//! request decided (a power cut through the control API, a power-on), kept in memory for the
//! control API and appended to `--fault-log FILE` by a writer thread, so request tasks never wait
//! on disk.

use std::collections::VecDeque;
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

pub struct FaultLog {
    seq: AtomicU64,
    capacity: usize,
    records: Mutex<VecDeque<Arc<LogEntry>>>,
    dropped: AtomicU64,
    sink: Mutex<Option<FileSink>>,
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
            records: Mutex::new(VecDeque::new()),
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
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == self.capacity {
            records.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        records.push_back(Arc::clone(&entry));
        entry
    }

    /// Records with `seq > since`, of one export or all, oldest first.
    pub fn since(&self, export: Option<&str>, since: u64) -> Vec<Arc<LogEntry>> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .filter(|record| record.seq() > since && export.is_none_or(|name| record.export() == name))
            .cloned()
            .collect()
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
        self.records.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|r| r.export() == export).count()
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

#[cfg(test)]
mod tests {
    use super::*;
    use nbdfault_policies::{Action, Engine, Op, Policy, PowerEvent, PowerOrigin, RequestFlags};

    fn power_on(export: &str) -> PowerRecord {
        PowerRecord {
            seq: 0,
            time_ns: 7,
            export: export.to_string(),
            event: PowerEvent::PowerOn,
            origin: PowerOrigin::ControlApi,
            next_request_index: 0,
            trigger: None,
            cut: None,
            power_off: None,
        }
    }

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
        log.record_power(power_on("disk"));
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
