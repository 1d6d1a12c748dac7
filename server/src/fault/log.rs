//! The fault log: one JSON record per request a rule touched, kept in memory for the control API
//! and appended to `--fault-log FILE` by a writer thread, so request tasks never wait on disk.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use nbdfault_policies::{Decision, FaultRecord, Request};

/// Records kept in memory; older ones are dropped (and counted) once there are more.
pub const DEFAULT_CAPACITY: usize = 1 << 18;

pub struct FaultLog {
    seq: AtomicU64,
    capacity: usize,
    records: Mutex<VecDeque<Arc<FaultRecord>>>,
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
        waited: Duration,
        persisted: u64,
        elapsed: Duration,
    ) -> Option<Arc<FaultRecord>> {
        decision.rule.as_ref()?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let mut record = FaultRecord::new(seq, elapsed, export, request, decision, persisted)?;
        record.waited_ns = Some(u64::try_from(waited.as_nanos()).unwrap_or(u64::MAX));
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
        let record = Arc::new(record);
        if let Some(sink) = self.sink.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // The writer thread only stops when the log is closed; a line sent after that is lost
            // with nothing to report it to.
            let _ = sink.lines.send(record.to_json_line());
        }
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        if records.len() == self.capacity {
            records.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        records.push_back(Arc::clone(&record));
        Some(record)
    }

    /// Records with `seq > since`, of one export or all, oldest first.
    pub fn since(&self, export: Option<&str>, since: u64) -> Vec<Arc<FaultRecord>> {
        let records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        records
            .iter()
            .filter(|record| record.seq > since && export.is_none_or(|name| record.export == name))
            .cloned()
            .collect()
    }

    /// How many records one export has in memory.
    pub fn count(&self, export: &str) -> usize {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|r| r.export == export).count()
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
    use nbdfault_policies::{Action, Engine, Op, Policy, RequestFlags};

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
            log.record(export, &request, &decision, Duration::ZERO, 0, Duration::from_millis(1));
        }
        let all = log.since(None, 0);
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2, 3]);
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
        log.record("a", &request, &decision, Duration::ZERO, 0, Duration::ZERO);
        assert!(log.since(None, 0).is_empty());
        // Nor do they use up a sequence number: the next record is number 1.
        let (request, decision) = failing_decision();
        log.record("a", &request, &decision, Duration::ZERO, 0, Duration::ZERO);
        assert_eq!(log.since(None, 0)[0].seq, 1);
    }

    #[test]
    fn the_file_gets_one_json_line_per_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("faults.jsonl");
        let log = FaultLog::with_file(&path, 8).unwrap();
        let (request, decision) = failing_decision();
        log.record("disk", &request, &decision, Duration::from_millis(5), 0, Duration::from_secs(1));
        log.record("disk", &request, &decision, Duration::ZERO, 0, Duration::from_secs(2));
        log.close();
        let text = std::fs::read_to_string(&path).unwrap();
        let records = nbdfault_policies::parse_fault_log(&text).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].rule, "all-writes");
        assert_eq!(records[0].waited_ns, Some(5_000_000));
        assert_eq!(records[1].seq, 2);
    }
}
