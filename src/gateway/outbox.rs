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

    /// A socket that takes at most `per_call` bytes per call without ever blocking, fails the
    /// next calls with `errors`, and records each call: vectored or not, and its slices' lengths.
    struct Recording {
        written: Vec<u8>,
        per_call: usize,
        errors: VecDeque<io::ErrorKind>,
        calls: Vec<(bool, Vec<usize>)>,
    }

    impl Recording {
        fn new(per_call: usize, errors: &[io::ErrorKind]) -> Self {
            Recording {
                written: Vec::new(),
                per_call,
                errors: errors.iter().copied().collect(),
                calls: Vec::new(),
            }
        }

        fn take(&mut self, vectored: bool, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.calls
                .push((vectored, bufs.iter().map(|b| b.len()).collect()));
            assert!(self.calls.len() < 10_000, "the outbox never stops writing");
            if let Some(kind) = self.errors.pop_front() {
                return Err(kind.into());
            }
            let before = self.written.len();
            for b in bufs {
                let take = b.len().min(self.per_call - (self.written.len() - before));
                self.written.extend_from_slice(&b[..take]);
            }
            Ok(self.written.len() - before)
        }
    }

    impl Write for Recording {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.take(false, &[IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            self.take(true, bufs)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
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

    #[test]
    fn one_fresh_slice_with_nothing_queued_is_one_plain_write() {
        let mut pool = BufferPool::new(16, 4);
        let mut ob = Outbox::default();
        let mut s = Recording::new(usize::MAX, &[]);
        assert_eq!(ob.flush(&mut s, &[b"hello"], &mut pool).unwrap(), 5);
        assert_eq!(s.calls, vec![(false, vec![5])]);
        assert_eq!(s.written, b"hello");
    }

    #[test]
    fn fresh_slices_with_nothing_queued_are_one_vectored_write_without_the_empty_ones() {
        let mut pool = BufferPool::new(16, 4);
        let mut ob = Outbox::default();
        let mut s = Recording::new(usize::MAX, &[]);
        let fresh: [&[u8]; 4] = [b"abc", b"", b"defg", b"h"];
        assert_eq!(ob.flush(&mut s, &fresh, &mut pool).unwrap(), 8);
        assert_eq!(s.calls, vec![(true, vec![3, 4, 1])]);
        assert_eq!(s.written, b"abcdefgh");
    }

    #[test]
    fn queued_bytes_leave_before_a_single_fresh_slice() {
        let mut pool = BufferPool::new(16, 4);
        let mut ob = Outbox::default();
        let mut s = sock(2);
        assert_eq!(ob.flush(&mut s, &[b"abcdef"], &mut pool).unwrap(), 2);
        assert_eq!(ob.len(), 4);
        s.budget = usize::MAX;
        assert_eq!(ob.flush(&mut s, &[b"ghi"], &mut pool).unwrap(), 7);
        assert_eq!(s.written, b"abcdefghi");
        assert!(ob.is_empty());
    }

    #[test]
    fn short_writes_go_on_from_the_first_unwritten_byte() {
        let data: Vec<u8> = (0..40u8).collect();
        let fresh: Vec<&[u8]> = vec![&data[..10], &data[10..17], &data[17..18], &data[18..]];
        for per_call in [1, 3, 4, 11] {
            let mut pool = BufferPool::new(16, 4);
            let mut ob = Outbox::default();
            let mut s = Recording::new(per_call, &[]);
            assert_eq!(ob.flush(&mut s, &fresh, &mut pool).unwrap(), 40);
            assert_eq!(s.written, data, "{per_call} bytes a call");
            assert!(ob.is_empty());
        }
    }

    #[test]
    fn an_interrupted_write_is_tried_again() {
        let mut pool = BufferPool::new(16, 4);
        let mut ob = Outbox::default();
        let mut s = Recording::new(usize::MAX, &[io::ErrorKind::Interrupted]);
        assert_eq!(ob.flush(&mut s, &[b"abc"], &mut pool).unwrap(), 3);
        assert_eq!(s.written, b"abc");
        assert_eq!(s.calls.len(), 2);
        assert!(ob.is_empty());
    }

    #[test]
    fn a_write_error_other_than_would_block_or_interrupted_is_returned() {
        let mut pool = BufferPool::new(16, 4);
        let mut ob = Outbox::default();
        let mut s = Recording::new(usize::MAX, &[io::ErrorKind::BrokenPipe]);
        let err = ob.flush(&mut s, &[b"abc"], &mut pool).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(s.calls.len(), 1, "not tried again");
    }

    #[test]
    fn leftovers_fill_pool_buffers_one_after_another() {
        let mut pool = BufferPool::new(16, 8);
        let mut ob = Outbox::default();
        let data: Vec<u8> = (0..40u8).collect();
        ob.push(&data[..10], &mut pool);
        ob.push(&data[10..], &mut pool);
        let sizes: Vec<(usize, usize)> =
            ob.chunks.iter().map(|c| (c.len(), c.capacity())).collect();
        assert_eq!(sizes, vec![(16, 16), (16, 16), (8, 16)]);
        let mut s = sock(usize::MAX);
        assert_eq!(ob.flush(&mut s, &[], &mut pool).unwrap(), 40);
        assert_eq!(s.written, data);
        assert_eq!(pool.idle(), 3, "every chunk went back to the pool");
    }

    #[test]
    fn a_leftover_of_exactly_four_pool_buffers_is_kept_in_pool_buffers() {
        let mut pool = BufferPool::new(16, 8);
        let mut ob = Outbox::default();
        ob.push(&[7u8; 64], &mut pool);
        assert_eq!(ob.chunks.len(), 4);
        assert!(ob.chunks.iter().all(|c| c.capacity() == 16));
        let mut s = sock(usize::MAX);
        assert_eq!(ob.flush(&mut s, &[], &mut pool).unwrap(), 64);
        assert_eq!(pool.idle(), 4, "every chunk went back to the pool");
    }
}
