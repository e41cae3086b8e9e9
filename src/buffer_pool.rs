//! A free list of byte buffers, so connections borrow memory only while they have bytes in
//! flight and give it back when idle.
//!
//! An idle connection owns no buffer at all; the pool keeps a bounded number of standard-size
//! buffers warm so busy connections do not hit the allocator on every message. Buffers that grew
//! beyond the standard size (a 16 MiB message, say) are freed instead of pooled, so one large
//! message never pins memory for the life of the process.

#[derive(Debug)]
pub struct BufferPool {
    free: Vec<Vec<u8>>,
    buf_capacity: usize,
    max_free: usize,
}

impl BufferPool {
    /// A pool of buffers of `buf_capacity` bytes that keeps at most `max_free` idle ones.
    pub fn new(buf_capacity: usize, max_free: usize) -> Self {
        BufferPool {
            free: Vec::new(),
            buf_capacity,
            max_free,
        }
    }

    /// An empty buffer with at least the standard capacity.
    pub fn take(&mut self) -> Vec<u8> {
        self.free
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.buf_capacity))
    }

    /// Returns a buffer. Empty-capacity vectors are ignored; oversized ones are freed.
    pub fn give(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() == self.buf_capacity && self.free.len() < self.max_free {
            buf.clear();
            self.free.push(buf);
        }
    }

    /// Standard capacity of pooled buffers.
    pub fn buf_capacity(&self) -> usize {
        self.buf_capacity
    }

    /// Buffers currently idle in the pool.
    pub fn idle(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_standard_buffers_and_drops_others() {
        let mut pool = BufferPool::new(1024, 2);
        let mut a = pool.take();
        assert_eq!(a.capacity(), 1024);
        a.extend_from_slice(b"data");
        let ptr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.idle(), 1);
        let b = pool.take();
        assert_eq!(b.as_ptr(), ptr, "the same allocation comes back");
        assert!(b.is_empty());

        let mut big = pool.take();
        big.resize(10_000, 0);
        pool.give(big);
        pool.give(Vec::new());
        assert_eq!(pool.idle(), 0, "grown and empty buffers are not pooled");
    }

    #[test]
    fn keeps_at_most_max_free() {
        let mut pool = BufferPool::new(64, 2);
        let bufs: Vec<_> = (0..5).map(|_| pool.take()).collect();
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.idle(), 2);
    }
}
