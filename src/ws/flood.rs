//! The allowance for frames that carry no data.
//!
//! Pings, pongs and empty fragments cost the server a frame's worth of work each but move no
//! application data, so a peer can send millions of them a second for free. Past a rate no
//! real client needs they are treated as abuse and the connection is failed with 1008.

/// Counts empty frames per one-second window. The time comes from the caller.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EmptyFrameLimit {
    per_sec: u32,
    window_start_ms: u64,
    count: u32,
}

impl EmptyFrameLimit {
    pub(crate) fn new(per_sec: u32) -> Self {
        EmptyFrameLimit {
            per_sec,
            window_start_ms: 0,
            count: 0,
        }
    }

    /// Counts one empty frame at `now_ms`; false once the window's allowance is used up.
    pub(crate) fn allow(&mut self, now_ms: u64) -> bool {
        if now_ms >= self.window_start_ms.saturating_add(1000) || now_ms < self.window_start_ms {
            self.window_start_ms = now_ms;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count <= self.per_sec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_the_rate_per_second_and_refills_each_second() {
        let mut l = EmptyFrameLimit::new(3);
        assert!((0..3).all(|_| l.allow(10)));
        assert!(
            !l.allow(500),
            "a fourth frame within the same second is refused"
        );
        assert!(l.allow(1010), "the next second has a new allowance");
        assert!(l.allow(1500) && l.allow(1600));
        assert!(!l.allow(2009));
    }
}
