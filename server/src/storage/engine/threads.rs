//! The fallback engine: a fixed set of I/O threads fed by one queue, as nbdkit's thread model.
//! The number of threads never grows, whatever the load: requests wait in the queue instead.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

pub struct Threads {
    /// `None` once dropping: the threads then finish the queued jobs and end.
    queue: Option<mpsc::Sender<Job>>,
    workers: Vec<JoinHandle<()>>,
}

impl Threads {
    /// Starts `count` I/O threads.
    pub fn start(count: usize) -> std::io::Result<Threads> {
        let (sender, receiver) = mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut workers = Vec::with_capacity(count);
        for index in 0..count.max(1) {
            let receiver = Arc::clone(&receiver);
            let worker = std::thread::Builder::new().name(format!("nbdfault-io-{index}")).spawn(move || {
                loop {
                    // Only an idle thread waits on the lock; a busy one holds no lock at all.
                    let job = receiver.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).recv();
                    match job {
                        // A job that panics loses its result, not its thread: `fence` counts on
                        // every thread taking jobs.
                        Ok(job) => {
                            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                        }
                        Err(mpsc::RecvError) => return,
                    }
                }
            })?;
            workers.push(worker);
        }
        Ok(Threads { queue: Some(sender), workers })
    }

    /// Runs `job` on an I/O thread. The job owns everything it touches (the file, the buffer), so
    /// a caller that stops waiting leaves it to finish on its own; the result is then dropped.
    pub async fn run<T, F>(&self, job: F) -> std::io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = done.send(job());
        });
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        queue.send(job).map_err(|_| stopped())?;
        result.await.map_err(|_| stopped())
    }

    /// Waits until every job queued before the call has finished, also those whose callers
    /// stopped waiting. One job per thread joins a barrier: the queue is FIFO and a thread takes
    /// its next job only once the last is done, so when every thread holds one of these, every
    /// job queued before them has run. Nothing is added to the jobs themselves.
    pub async fn fence(&self) -> std::io::Result<()> {
        let queue = self.queue.as_ref().ok_or_else(stopped)?;
        let barrier = Arc::new(std::sync::Barrier::new(self.workers.len()));
        let mut passed = Vec::with_capacity(self.workers.len());
        // Queued all at once, before any await: a fence dropped half-queued would hold threads.
        for _ in 0..self.workers.len() {
            let (done, through) = oneshot::channel();
            let barrier = Arc::clone(&barrier);
            queue
                .send(Box::new(move || {
                    barrier.wait();
                    let _ = done.send(());
                }))
                .map_err(|_| stopped())?;
            passed.push(through);
        }
        for through in passed {
            through.await.map_err(|_| stopped())?;
        }
        Ok(())
    }
}

impl Drop for Threads {
    /// Stops taking jobs, lets the queued ones finish and waits for every thread to end.
    fn drop(&mut self) {
        self.queue.take();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

fn stopped() -> std::io::Error {
    std::io::Error::other("the I/O threads have stopped")
}
