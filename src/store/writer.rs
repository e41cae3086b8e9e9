//! The storage thread: commits the IM core's write batches off the network thread.
//!
//! The loop submits one batch per turn and never waits. The thread takes every batch that is
//! waiting, commits them in one transaction (group commit: one disk sync for many turns under
//! load), reports the newest committed batch id and wakes the loop through a `mio::Waker`.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{Store, WriteBatch};

/// Batch ids grow by one per submitted batch; a report covers every id up to it.
pub type BatchId = u64;

pub enum Done {
    /// Every batch up to this id is durable; the commit took this long.
    Committed(BatchId, std::time::Duration),
    Failed(String),
}

pub struct Writer {
    jobs: Option<mpsc::Sender<(BatchId, Arc<WriteBatch>)>>,
    done: mpsc::Receiver<Done>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread. With `sync`, a batch is reported only once it is on disk.
    pub fn spawn(
        store: Arc<dyn Store>,
        sync: bool,
        waker: Arc<mio::Waker>,
    ) -> std::io::Result<Writer> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<(BatchId, Arc<WriteBatch>)>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("imgate-store".into())
            .spawn(move || {
                // Whether the store may have upkeep due (a log read back at start-up, say):
                // then waiting for a job must not block.
                let mut upkeep = true;
                loop {
                    let first = if upkeep {
                        match jobs_rx.try_recv() {
                            Ok(job) => job,
                            Err(mpsc::TryRecvError::Empty) => {
                                match store.maintain() {
                                    Ok(more) => upkeep = more,
                                    Err(e) => return fail(&done_tx, &waker, e),
                                }
                                continue;
                            }
                            Err(mpsc::TryRecvError::Disconnected) => break,
                        }
                    } else {
                        match jobs_rx.recv() {
                            Ok(job) => job,
                            Err(_) => break,
                        }
                    };
                    let mut last = first.0;
                    let mut batches = vec![first.1];
                    while let Ok((id, b)) = jobs_rx.try_recv() {
                        last = id;
                        batches.push(b);
                    }
                    let started = std::time::Instant::now();
                    let refs: Vec<&WriteBatch> = batches.iter().map(|b| &**b).collect();
                    if let Err(e) = store.commit(&refs, sync) {
                        return fail(&done_tx, &waker, e);
                    }
                    if done_tx
                        .send(Done::Committed(last, started.elapsed()))
                        .is_err()
                    {
                        return;
                    }
                    let _ = waker.wake();
                    // One step after every commit, so that upkeep keeps pace under steady
                    // load, when a job is always waiting.
                    match store.maintain() {
                        Ok(more) => upkeep = more,
                        Err(e) => return fail(&done_tx, &waker, e),
                    }
                }
                // The loop is gone: make everything durable, whatever the durability setting.
                if let Err(e) = store.commit(&[], true) {
                    log::error!("final store sync failed: {e}");
                }
            })?;
        Ok(Writer {
            jobs: Some(jobs_tx),
            done: done_rx,
            thread: Some(thread),
        })
    }

    /// Queues a batch; never blocks.
    pub fn submit(&self, id: BatchId, batch: Arc<WriteBatch>) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send((id, batch));
        }
    }

    /// Reports that arrived since the last call.
    pub fn completed(&self) -> mpsc::TryIter<'_, Done> {
        self.done.try_iter()
    }
}

/// Reports a failed write and stops the thread: nothing may be acknowledged after it.
fn fail(done: &mpsc::Sender<Done>, waker: &mio::Waker, e: String) {
    let _ = done.send(Done::Failed(e));
    let _ = waker.wake();
}

impl Drop for Writer {
    /// Commits everything submitted, then stops the thread.
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
