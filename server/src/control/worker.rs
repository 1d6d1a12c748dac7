//! Control work off the data path: reading and checking policies, computing their warnings,
//! swapping them in and rendering large views run on one dedicated, low-priority thread, never
//! on the runtime's worker threads that serve NBD requests.
//!
//! The queue is short and bounded: when it is full the control API answers 503 at once instead
//! of piling work up. Each job's own cost is bounded by the policy limits.

use std::sync::mpsc::{SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// Jobs waiting behind the one running; more are refused.
const QUEUE: usize = 4;
/// The worker's nice value: the scheduler lets NBD threads run first when both want the CPU.
const NICE: i32 = 10;

/// Why a job did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the server is busy with other control work ({QUEUE} jobs queued); retry shortly")]
    Busy,
    #[error("the control work took over {0:?} (the server is busy); it was abandoned, unless it was just finishing")]
    TimedOut(Duration),
    #[error("the control worker has stopped")]
    Stopped,
}

/// A handle to the control worker thread; clones share it. The thread ends when the last
/// handle is dropped.
#[derive(Clone)]
pub struct ControlWorker {
    jobs: SyncSender<Job>,
    /// How long a caller waits for its job, queueing included.
    deadline: Duration,
}

impl ControlWorker {
    /// Starts the worker thread.
    pub fn start(deadline: Duration) -> std::io::Result<ControlWorker> {
        let (jobs, queue) = sync_channel::<Job>(QUEUE);
        std::thread::Builder::new().name("nbdfault-control".into()).spawn(move || {
            lower_priority();
            while let Ok(job) = queue.recv() {
                job();
            }
        })?;
        Ok(ControlWorker { jobs, deadline })
    }

    /// Runs `work` on the worker thread and waits for its result, at most the deadline. A job
    /// whose caller gave up before it started is skipped; `work` can ask [`Caller::gone`] before
    /// a step that must not happen unanswered (swapping a policy in).
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Caller<T>) -> T + Send + 'static,
    ) -> Result<T, Refused> {
        let (answer, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let caller = Caller(answer);
            if caller.gone() {
                return;
            }
            let value = work(&caller);
            // The caller may have given up meanwhile; then the result is dropped here, on this thread.
            let _ = caller.0.send(value);
        });
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(Refused::Busy),
            Err(TrySendError::Disconnected(_)) => return Err(Refused::Stopped),
        }
        match tokio::time::timeout(self.deadline, result).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(_)) => Err(Refused::Stopped),
            Err(_) => Err(Refused::TimedOut(self.deadline)),
        }
    }
}

/// Keeps the worker busy and its queue full, so every job asked for meanwhile is refused, until
/// dropped: for tests of what runs on the worker.
#[cfg(test)]
pub struct Occupied {
    release: std::sync::mpsc::Sender<()>,
    jobs: SyncSender<Job>,
}

#[cfg(test)]
impl Drop for Occupied {
    /// Releases the worker and returns once the jobs queued behind it have run: a marker queued
    /// last (a blocking send waits for room) has run.
    fn drop(&mut self) {
        let _ = self.release.send(());
        let (drained, done) = std::sync::mpsc::channel::<()>();
        self.jobs.send(Box::new(move || drained.send(()).unwrap())).unwrap();
        done.recv().unwrap();
    }
}

#[cfg(test)]
impl ControlWorker {
    /// Holds the worker with one job and fills the queue behind it; returns once the job runs.
    pub fn occupy(&self) -> Occupied {
        let release = self.hold();
        for _ in 0..QUEUE {
            self.jobs.try_send(Box::new(|| {})).unwrap();
        }
        Occupied { release, jobs: self.jobs.clone() }
    }

    /// Queues a job that keeps the worker busy until the returned sender sends (or is dropped),
    /// and returns once the job is running.
    fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (started, running) = std::sync::mpsc::channel::<()>();
        self.jobs
            .try_send(Box::new(move || {
                started.send(()).unwrap();
                let _ = hold.recv();
            }))
            .unwrap();
        running.recv().unwrap();
        release
    }
}

/// The caller of a job, waiting for its answer.
pub struct Caller<T>(oneshot::Sender<T>);

impl<T> Caller<T> {
    /// True when the caller stopped waiting (its deadline passed).
    pub fn gone(&self) -> bool {
        self.0.is_closed()
    }
}

/// Lowers this thread's scheduling priority (Linux schedules threads one by one).
fn lower_priority() {
    // SAFETY: gettid has no preconditions; setpriority only reads its arguments, and a failure
    // (no permission, say) leaves the priority as it was.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, NICE) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot lower the control worker's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Long enough never to pass in these tests, even on a loaded machine: what they prove does
    /// not depend on it.
    const NEVER: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn jobs_run_off_the_runtime_and_a_full_queue_is_refused_at_once() {
        let worker = ControlWorker::start(NEVER).unwrap();
        let name = worker.run(|_| std::thread::current().name().map(str::to_string)).await.unwrap();
        assert_eq!(name.as_deref(), Some("nbdfault-control"));

        let occupied = worker.occupy();
        // Refused at once: the answer comes without waiting for the worker, which is still held.
        assert_eq!(worker.run(|_| ()).await, Err(Refused::Busy));
        // Once the worker is free and the queue drained, jobs are taken again.
        drop(occupied);
        assert_eq!(worker.run(|_| 7).await, Ok(7));
    }

    #[tokio::test]
    async fn a_job_over_the_deadline_is_reported_as_timed_out() {
        let worker = ControlWorker::start(Duration::from_millis(50)).unwrap();
        let (started, running) = std::sync::mpsc::channel();
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let (done, finished) = std::sync::mpsc::channel();
        let mut slow = Box::pin(worker.run(move |caller| {
            started.send(()).unwrap();
            // Still running when the deadline passes: it waits to be released after it.
            hold.recv().unwrap();
            done.send(caller.gone()).unwrap();
        }));
        // Polled once: queued, and the deadline counts from now. Then the job is running.
        assert!(std::future::poll_fn(|cx| std::task::Poll::Ready(slow.as_mut().poll(cx).is_pending())).await);
        running.recv().unwrap();
        assert_eq!(slow.await, Err(Refused::TimedOut(Duration::from_millis(50))));
        release.send(()).unwrap();
        assert!(finished.recv().unwrap(), "the job sees that its caller is gone");
    }

    #[tokio::test]
    async fn a_job_whose_caller_gave_up_before_it_started_is_skipped() {
        let worker = ControlWorker::start(NEVER).unwrap();
        let release = worker.hold();
        let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&ran);
        let mut waiting = Box::pin(worker.run(move |_| flag.store(true, std::sync::atomic::Ordering::SeqCst)));
        assert!(std::future::poll_fn(|cx| std::task::Poll::Ready(waiting.as_mut().poll(cx).is_pending())).await);
        drop(waiting);
        release.send(()).unwrap();
        assert_eq!(worker.run(|_| 7).await, Ok(7), "a later job runs");
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the abandoned job was skipped");
    }
}
