//! The storage thread: commits the IM core's write batches off the network thread.
//!
//! The loop submits one batch per turn and never waits. The thread takes every batch that is
//! waiting, commits them in one transaction (group commit: one disk sync for many turns under
//! load), reports what each batch's sends were given and wakes the loop through a
//! `mio::Waker`.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::{CommitError, Sent, Store, WriteBatch};

/// Batch ids grow by one per submitted batch, and batches are reported in that order.
pub type BatchId = u64;

#[derive(Debug)]
pub enum Done {
    /// These batches (in id order) are durable, with the answers to their sends; the
    /// commit took `took`.
    Committed {
        answers: Vec<(BatchId, Vec<Sent>)>,
        took: std::time::Duration,
    },
    /// The store did not confirm these batches (in id order) in time: nothing of them may
    /// be acknowledged. The thread goes on with the next ones.
    Refused { ids: Vec<BatchId>, error: String },
    /// The store broke; the thread has stopped.
    Failed(String),
}

pub struct Writer {
    jobs: Option<mpsc::Sender<(BatchId, Arc<WriteBatch>)>>,
    done: mpsc::Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    /// The thread's waker, kept open here too: the thread drops its own as it stops after a
    /// failure, and closing the last one takes it out of the poll with its wake-up pending,
    /// so that the failure might never be read.
    _waker: Arc<mio::Waker>,
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
        let kept = waker.clone();
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
                    let mut ids = vec![first.0];
                    let mut batches = vec![first.1];
                    while let Ok((id, b)) = jobs_rx.try_recv() {
                        ids.push(id);
                        batches.push(b);
                    }
                    let started = std::time::Instant::now();
                    let refs: Vec<&WriteBatch> = batches.iter().map(|b| &**b).collect();
                    let sents = match store.commit(&refs, sync) {
                        Ok(sents) => sents,
                        Err(CommitError::Broken(e)) => return fail(&done_tx, &waker, e),
                        Err(CommitError::Unavailable(error)) => {
                            if done_tx.send(Done::Refused { ids, error }).is_err() {
                                return;
                            }
                            let _ = waker.wake();
                            continue;
                        }
                    };
                    let answers = ids.into_iter().zip(sents).collect();
                    let took = started.elapsed();
                    if done_tx.send(Done::Committed { answers, took }).is_err() {
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
            _waker: kept,
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::store::{ReadError, StoreRead, StoredMessage};

    /// Records what the storage thread commits; it never reads.
    #[derive(Default)]
    struct Recording {
        /// (batches, sync) of every commit, in order.
        commits: Mutex<Vec<(Vec<WriteBatch>, bool)>>,
        fail: bool,
        /// Batches (by their first cursor's device) the store does not confirm.
        away: Vec<String>,
    }

    impl StoreRead for Recording {
        fn max_seq(&self, _: &str) -> Result<u64, ReadError> {
            unreachable!()
        }
        fn messages_after(
            &self,
            _: &str,
            _: u64,
            _: usize,
        ) -> Result<Vec<StoredMessage>, ReadError> {
            unreachable!()
        }
        fn cursor(&self, _: &str, _: &str) -> u64 {
            unreachable!()
        }
        fn cursors(&self, _: &str) -> Vec<(String, u64)> {
            unreachable!()
        }
        fn recent_sends(&self, _: &str) -> Result<Vec<(String, u64)>, ReadError> {
            unreachable!()
        }
        fn friends(&self, _: &str) -> Vec<String> {
            unreachable!()
        }
        fn group_members(&self, _: &str) -> Result<Vec<String>, ReadError> {
            unreachable!()
        }
        fn group_size(&self, _: &str) -> Result<usize, ReadError> {
            unreachable!()
        }
        fn is_member(&self, _: &str, _: &str) -> Result<bool, ReadError> {
            unreachable!()
        }
        fn groups_of(&self, _: &str) -> Result<Vec<String>, ReadError> {
            unreachable!()
        }
    }

    impl Store for Recording {
        fn commit(
            &self,
            batches: &[&WriteBatch],
            sync: bool,
        ) -> Result<Vec<Vec<Sent>>, CommitError> {
            let answers = batches.iter().map(|_| Vec::new()).collect();
            let ids: Vec<String> = batches.iter().map(|b| b.cursors[0].1.to_string()).collect();
            let batches = batches.iter().map(|b| (*b).clone()).collect();
            self.commits.lock().unwrap().push((batches, sync));
            if self.fail {
                return Err(CommitError::Broken("disk full".into()));
            }
            if ids.iter().any(|id| self.away.contains(id)) {
                return Err(CommitError::Unavailable("redis away".into()));
            }
            Ok(answers)
        }
    }

    fn batch(id: &str) -> WriteBatch {
        WriteBatch {
            cursors: vec![("a".into(), id.into(), 1)],
            ..WriteBatch::default()
        }
    }

    fn waker(poll: &mio::Poll) -> Arc<mio::Waker> {
        Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap())
    }

    #[test]
    fn a_store_has_no_upkeep_due_unless_it_says_so() {
        assert_eq!(Recording::default().maintain(), Ok(false));
    }

    #[test]
    fn dropping_the_writer_commits_and_reports_everything_submitted_then_syncs() {
        let poll = mio::Poll::new().unwrap();
        let store = Arc::new(Recording::default());
        let mut w = Writer::spawn(store.clone(), false, waker(&poll)).unwrap();
        w.submit(1, Arc::new(batch("m1")));
        w.submit(2, Arc::new(batch("m2")));
        let done = std::mem::replace(&mut w.done, mpsc::channel().1);
        drop(w);
        let commits = store.commits.lock().unwrap().clone();
        let (last, earlier) = commits.split_last().unwrap();
        assert_eq!(last, &(vec![], true), "a final sync, once all is committed");
        let committed: Vec<WriteBatch> = earlier.iter().flat_map(|(b, _)| b.clone()).collect();
        assert_eq!(committed, vec![batch("m1"), batch("m2")]);
        assert!(earlier.iter().all(|(_, sync)| !sync));
        let reported: Vec<BatchId> = done
            .try_iter()
            .flat_map(|d| match d {
                Done::Committed { answers, .. } => answers.into_iter().map(|(id, _)| id),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reported, vec![1, 2], "each batch once, in order");
    }

    #[test]
    fn a_failed_commit_is_reported_wakes_the_loop_and_stops_the_thread() {
        let mut poll = mio::Poll::new().unwrap();
        let store = Arc::new(Recording {
            fail: true,
            ..Recording::default()
        });
        let w = Writer::spawn(store.clone(), true, waker(&poll)).unwrap();
        w.submit(1, Arc::new(batch("m1")));
        // The timeouts only turn a missing report or wake-up into a failure instead of a hang.
        let guard = std::time::Duration::from_secs(10);
        match w.done.recv_timeout(guard) {
            Ok(Done::Failed(e)) => assert_eq!(e, "disk full"),
            Ok(other) => panic!("reported {other:?}"),
            Err(e) => panic!("no report: {e}"),
        }
        let mut events = mio::Events::with_capacity(4);
        // The thread may have stopped and dropped its waker by now: the Writer keeps one open.
        poll.poll(&mut events, Some(guard)).unwrap();
        assert!(events.iter().any(|e| e.token() == mio::Token(0)));
        // Nothing is committed after a failure, not even the final sync.
        w.submit(2, Arc::new(batch("m2")));
        drop(w);
        assert_eq!(store.commits.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_refused_commit_is_reported_and_the_thread_goes_on_with_the_next() {
        let poll = mio::Poll::new().unwrap();
        let store = Arc::new(Recording {
            away: vec!["m1".into()],
            ..Recording::default()
        });
        let w = Writer::spawn(store.clone(), true, waker(&poll)).unwrap();
        // The timeout only turns a missing report into a failure instead of a hang.
        let guard = std::time::Duration::from_secs(10);
        w.submit(1, Arc::new(batch("m1")));
        match w.done.recv_timeout(guard) {
            Ok(Done::Refused { ids, error }) => {
                assert_eq!((ids, error.as_str()), (vec![1], "redis away"))
            }
            other => panic!("reported {other:?}"),
        }
        w.submit(2, Arc::new(batch("m2")));
        match w.done.recv_timeout(guard) {
            Ok(Done::Committed { answers, .. }) => assert_eq!(answers, vec![(2, vec![])]),
            other => panic!("reported {other:?}"),
        }
    }
}
