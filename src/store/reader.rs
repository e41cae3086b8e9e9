//! The read thread: runs the IM core's store reads off the network thread.
//!
//! The loop submits reads and never waits; the thread runs each in turn against the store
//! (a cold read may wait on the disk or, for a networked store, on the network), reports
//! the answer and wakes the loop through a `mio::Waker`.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use super::StoreRead;
use crate::im::core::{ReadAnswer, ReadId, ReadRequest};

pub struct Reader {
    jobs: Option<mpsc::Sender<(ReadId, ReadRequest)>>,
    done: mpsc::Receiver<(ReadId, ReadAnswer)>,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts the thread.
    ///
    /// Errors: the thread could not be started.
    pub fn spawn(
        store: Arc<dyn StoreRead + Send + Sync>,
        waker: Arc<mio::Waker>,
    ) -> std::io::Result<Reader> {
        let (jobs_tx, jobs_rx) = mpsc::channel::<(ReadId, ReadRequest)>();
        let (done_tx, done_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("imgate-read".into())
            .spawn(move || {
                while let Ok((rid, req)) = jobs_rx.recv() {
                    if done_tx.send((rid, req.run(&*store))).is_err() {
                        return;
                    }
                    let _ = waker.wake();
                }
            })?;
        Ok(Reader {
            jobs: Some(jobs_tx),
            done: done_rx,
            thread: Some(thread),
        })
    }

    pub fn submit(&self, rid: ReadId, req: ReadRequest) {
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send((rid, req));
        }
    }

    /// Answers that arrived since the last call.
    pub fn completed(&self) -> mpsc::TryIter<'_, (ReadId, ReadAnswer)> {
        self.done.try_iter()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;

    #[test]
    fn every_read_is_answered_and_wakes_the_loop() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        let r = Reader::spawn(Arc::new(MemoryStore::default()), waker).unwrap();
        for rid in 1..=3 {
            r.submit(
                rid,
                ReadRequest::Page {
                    uid: "a".into(),
                    after: 0,
                    limit: 10,
                },
            );
        }
        let mut got = Vec::new();
        let mut events = mio::Events::with_capacity(4);
        // The timeout only turns a missing answer into a failure instead of a hang.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while got.len() < 3 && std::time::Instant::now() < deadline {
            poll.poll(&mut events, Some(std::time::Duration::from_secs(1)))
                .unwrap();
            got.extend(r.completed());
        }
        assert_eq!(
            got,
            (1..=3)
                .map(|rid| (rid, ReadAnswer::Page(Ok(Vec::new()))))
                .collect::<Vec<_>>()
        );
    }
}
