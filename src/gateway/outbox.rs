//! Bytes queued for a socket that would not take them yet.
//!
//! The common case never touches the outbox: a loop turn's output for a connection is staged
//! in one shared buffer and leaves in a single write. Only what the kernel refuses is copied
//! here, into chunks borrowed from the [`BufferPool`]; the next flush sends the queued chunks
//! and any new output together in one vectored write. When the queue drains, every chunk goes
//! back to the pool and the outbox holds no memory.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use crate::buffer_pool::BufferPool;

/// Most slices handed to one `writev` (well below IOV_MAX = 1024).
const MAX_IOV: usize = 64;

#[derive(Debug, Default)]
pub struct Outbox {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of `chunks[0]` already written.
    head_written: usize,
    len: usize,
}

impl Outbox {
    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the queued bytes followed by the `fresh` slices, in order, until everything is
    /// written or `w` would block, and queues (copies) whatever of `fresh` was not written.
    ///
    /// Returns the bytes written. Errors other than `WouldBlock` and `Interrupted` are
    /// returned; the queue is then meaningless and the caller drops it.
    pub fn flush<W: Write>(
        &mut self,
        w: &mut W,
        fresh: &[&[u8]],
        pool: &mut BufferPool,
    ) -> io::Result<usize> {
        let mut written = 0;
        // Position in `fresh`: slice index and bytes of it already written.
        let (mut at, mut at_written) = (0, 0);
        let skip_empty = |at: &mut usize, at_written: &mut usize| {
            while *at < fresh.len() && *at_written == fresh[*at].len() {
                *at += 1;
                *at_written = 0;
            }
        };
        loop {
            skip_empty(&mut at, &mut at_written);
            if self.len == 0 && at == fresh.len() {
                break;
            }
            let result = if self.len == 0 && at + 1 == fresh.len() {
                w.write(&fresh[at][at_written..])
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOV];
                let mut n = 0;
                for (i, c) in self.chunks.iter().enumerate().take(MAX_IOV) {
                    let start = if i == 0 { self.head_written } else { 0 };
                    slices[n] = IoSlice::new(&c[start..]);
                    n += 1;
                }
                if n == self.chunks.len() {
                    for (i, f) in fresh[at..].iter().enumerate() {
                        if n == MAX_IOV {
                            break;
                        }
                        let start = if i == 0 { at_written } else { 0 };
                        if start < f.len() {
                            slices[n] = IoSlice::new(&f[start..]);
                            n += 1;
                        }
                    }
                }
                w.write_vectored(&slices[..n])
            };
            match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    written += n;
                    let from_queue = n.min(self.len);
                    self.consume(from_queue, pool);
                    let mut rest = n - from_queue;
                    while rest > 0 {
                        let take = rest.min(fresh[at].len() - at_written);
                        at_written += take;
                        rest -= take;
                        skip_empty(&mut at, &mut at_written);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if at < fresh.len() {
            self.push(&fresh[at][at_written..], pool);
            for f in &fresh[at + 1..] {
                self.push(f, pool);
            }
        }
        Ok(written)
    }

    /// Queues `data` behind what is already queued.
    pub fn push(&mut self, mut data: &[u8], pool: &mut BufferPool) {
        self.len += data.len();
        while !data.is_empty() {
            let need_chunk = self.chunks.back().is_none_or(|c| c.len() == c.capacity());
            if need_chunk {
                let chunk = if data.len() > pool.buf_capacity() * 4 {
                    // A large message: one exact allocation instead of many pooled chunks.
                    Vec::with_capacity(data.len())
                } else {
                    pool.take()
                };
                self.chunks.push_back(chunk);
            }
            let Some(tail) = self.chunks.back_mut() else {
                unreachable!("a chunk was just ensured");
            };
            let room = tail.capacity() - tail.len();
            let n = room.min(data.len());
            tail.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    fn consume(&mut self, mut n: usize, pool: &mut BufferPool) {
        self.len -= n;
        while n > 0 {
            let Some(head) = self.chunks.front() else {
                break;
            };
            let left = head.len() - self.head_written;
            if n < left {
                self.head_written += n;
                return;
            }
            n -= left;
            self.head_written = 0;
            if let Some(c) = self.chunks.pop_front() {
                pool.give(c);
            }
        }
        if self.len == 0 {
            for c in self.chunks.drain(..) {
                pool.give(c);
            }
            // Free the ring itself too: an idle connection keeps no allocation.
            self.chunks = VecDeque::new();
            self.head_written = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A socket that accepts at most `budget` bytes, then blocks, recording each call.
    struct Throttled {
        written: Vec<u8>,
        budget: usize,
        calls: usize,
    }

    impl Write for Throttled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls += 1;
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.budget);
                self.written.extend_from_slice(&b[..take]);
                self.budget -= take;
                n += take;
                if self.budget == 0 {
                    break;
                }
            }
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn sock(budget: usize) -> Throttled {
        Throttled {
            written: Vec::new(),
            budget,
            calls: 0,
        }
    }

    #[test]
    fn fast_path_is_one_write_and_no_memory() {
        let mut pool = BufferPool::new(16, 4);
        let mut ob = Outbox::default();
        let mut s = sock(1000);
        assert_eq!(ob.flush(&mut s, &[b"hello"], &mut pool).unwrap(), 5);
        assert!(ob.is_empty());
        assert_eq!(s.calls, 1);
        assert_eq!(s.written, b"hello");
        assert_eq!(ob.chunks.capacity(), 0);
    }

    #[test]
    fn keeps_order_across_partial_writes_and_returns_chunks() {
        let mut pool = BufferPool::new(32, 8);
        let mut ob = Outbox::default();
        let data: Vec<u8> = (0..200u8).collect();
        let mut s = sock(10);
        assert_eq!(ob.flush(&mut s, &[&data[..100]], &mut pool).unwrap(), 10);
        assert_eq!(ob.len(), 90);
        s.budget = 25;
        assert_eq!(
            ob.flush(&mut s, &[&data[100..150], &[], &data[150..]], &mut pool)
                .unwrap(),
            25
        );
        assert_eq!(ob.len(), 165);
        s.budget = usize::MAX;
        assert_eq!(ob.flush(&mut s, &[], &mut pool).unwrap(), 165);
        assert_eq!(s.written, data);
        assert!(ob.is_empty());
        assert_eq!(ob.chunks.capacity(), 0);
        assert!(pool.idle() > 0, "chunks went back to the pool");
    }

    #[test]
    fn many_fresh_slices_keep_their_order_through_any_budget() {
        let data: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        let pieces: Vec<&[u8]> = data.chunks(37).collect();
        for budget in [1, 7, 100, 999, 5000] {
            let mut pool = BufferPool::new(64, 8);
            let mut ob = Outbox::default();
            let mut s = sock(budget);
            ob.flush(&mut s, &pieces, &mut pool).unwrap();
            while !ob.is_empty() {
                s.budget = budget;
                ob.flush(&mut s, &[], &mut pool).unwrap();
            }
            assert_eq!(s.written, data, "budget {budget}");
        }
    }

    #[test]
    fn large_leftovers_take_one_exact_chunk() {
        let mut pool = BufferPool::new(16, 8);
        let mut ob = Outbox::default();
        ob.push(&[7u8; 1000], &mut pool);
        assert_eq!(ob.chunks.len(), 1);
        assert_eq!(ob.len(), 1000);
    }
}
