//! Verification, as pure bookkeeping with no I/O:
//!
//! - [`SeqTracker`], per device: the inbox seqs it has seen, through `Message` frames and
//!   through its own `SendOk`s (a device is not sent its own live messages: it learns their
//!   seq from the SendOk). Within one session Messages must come in strictly increasing seq
//!   order; a seq seen twice is a duplicate unless it is a re-delivery the session allows (a
//!   login that resumed from the stored cursor re-sends what was not acked); at the end,
//!   every seq up to the highest must have been seen (no gaps).
//! - [`Ledger`]: message identity across devices and processes. Each sender device counts,
//!   for each message that got a SendOk, the deliveries it expects (every device of the
//!   recipient, plus the sender's other devices) and a hash of the message's identity;
//!   receiving devices count what they got. Per sender the counts and hash sums must match:
//!   a missing delivery, a message delivered twice under two seqs, or one swapped for another
//!   shows up as a difference.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::sys::mix64;

/// How a seq was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// First time: count it.
    New,
    /// Seen before, and allowed again: history from before the run at the first login, or
    /// a re-delivery after a login that resumed from the stored cursor.
    Old,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A seq seen again where no re-delivery is allowed.
    Dup(u64),
    /// A Message whose seq is not above the previous Message's in the same session.
    Reorder(u64),
}

#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Every seq <= contig has been seen.
    contig: u64,
    /// Seen seqs above `contig` (holes below them are own sends awaiting their SendOk).
    above: BTreeSet<u64>,
    /// The highest seq seen.
    hw: u64,
    /// The last Message seq of this session.
    last_msg: u64,
    /// Seen seqs up to this may be delivered again in this session.
    old_limit: u64,
}

impl SeqTracker {
    /// The first login: `max_seq` (from LoginOk) and everything before it is history from
    /// before this run, which may still be delivered (from the stored cursor).
    pub fn start(max_seq: u64) -> SeqTracker {
        SeqTracker {
            contig: max_seq,
            hw: max_seq,
            old_limit: max_seq,
            ..SeqTracker::default()
        }
    }

    /// A new session (re-login). With `from_cursor` (Login.last_seq = 0), the server
    /// resumes after its stored cursor, so seqs already seen may come again; otherwise the
    /// login passed `last_seq = hw()` and nothing seen may come again.
    pub fn new_session(&mut self, from_cursor: bool) {
        self.last_msg = 0;
        self.old_limit = if from_cursor { self.hw } else { 0 };
    }

    pub fn is_seen(&self, seq: u64) -> bool {
        seq <= self.contig || self.above.contains(&seq)
    }

    fn insert(&mut self, seq: u64) {
        self.hw = self.hw.max(seq);
        if seq == self.contig + 1 {
            self.contig = seq;
            while self.above.remove(&(self.contig + 1)) {
                self.contig += 1;
            }
        } else {
            self.above.insert(seq);
        }
    }

    /// A `Message` frame.
    pub fn on_message(&mut self, seq: u64) -> Result<Seen, Violation> {
        if seq <= self.last_msg {
            return Err(if self.is_seen(seq) {
                Violation::Dup(seq)
            } else {
                Violation::Reorder(seq)
            });
        }
        self.last_msg = seq;
        if self.is_seen(seq) {
            return if seq <= self.old_limit {
                Ok(Seen::Old)
            } else {
                Err(Violation::Dup(seq))
            };
        }
        self.insert(seq);
        Ok(Seen::New)
    }

    /// A `SendOk` for this device's own send: its seq in the device's own inbox. A
    /// `duplicate` answer (a retry) names a seq that may have been seen already.
    pub fn on_send_ok(&mut self, seq: u64, duplicate: bool) -> Result<Seen, Violation> {
        if self.is_seen(seq) {
            return if duplicate {
                Ok(Seen::Old)
            } else {
                Err(Violation::Dup(seq))
            };
        }
        self.insert(seq);
        Ok(Seen::New)
    }

    /// Everything up to here was received: what to Ack.
    pub fn contig(&self) -> u64 {
        self.contig
    }

    /// The highest seq seen: what to resume after (Login.last_seq).
    pub fn hw(&self) -> u64 {
        self.hw
    }

    /// Seqs below the highest one that were never seen.
    pub fn holes(&self) -> u64 {
        self.hw - self.contig - self.above.len() as u64
    }
}

/// A message's identity as a 64-bit hash: sender device index and per-sender counter.
pub fn msg_hash(sender: u32, counter: u64) -> u64 {
    mix64((u64::from(sender) << 40) ^ counter ^ 0xA5A5_0000_0000_0000)
}

/// Per-sender expected and received delivery counts and hash sums (indexed by the sender
/// device's global index). Summable across processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub exp_n: Vec<u64>,
    pub exp_h: Vec<u64>,
    pub got_n: Vec<u64>,
    pub got_h: Vec<u64>,
    /// Messages whose SendOk never came: they may or may not have been delivered.
    pub unk_n: Vec<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerCheck {
    /// Deliveries expected and not seen.
    pub missing: u64,
    /// Deliveries seen beyond those expected (a message delivered twice under two seqs).
    pub extra: u64,
    /// Senders whose counts match but whose hash sums do not (one message in place of
    /// another).
    pub mismatched: u64,
    pub expected: u64,
    pub got: u64,
}

impl Ledger {
    pub fn new(senders: usize) -> Ledger {
        Ledger {
            exp_n: vec![0; senders],
            exp_h: vec![0; senders],
            got_n: vec![0; senders],
            got_h: vec![0; senders],
            unk_n: vec![0; senders],
        }
    }

    /// A message got its SendOk: `copies` deliveries are due.
    pub fn expect(&mut self, sender: u32, counter: u64, copies: u64) {
        let s = sender as usize;
        if s < self.exp_n.len() {
            self.exp_n[s] += copies;
            self.exp_h[s] =
                self.exp_h[s].wrapping_add(msg_hash(sender, counter).wrapping_mul(copies));
        }
    }

    /// A message that never got a SendOk (up to `copies` deliveries may exist).
    pub fn unknown(&mut self, sender: u32, copies: u64) {
        if let Some(n) = self.unk_n.get_mut(sender as usize) {
            *n += copies;
        }
    }

    /// A device received a message (first time for its seq).
    pub fn got(&mut self, sender: u32, counter: u64) {
        let s = sender as usize;
        if s < self.got_n.len() {
            self.got_n[s] += 1;
            self.got_h[s] = self.got_h[s].wrapping_add(msg_hash(sender, counter));
        }
    }

    pub fn merge(&mut self, other: &Ledger) {
        fn add(a: &mut Vec<u64>, b: &[u64], wrapping: bool) {
            if a.len() < b.len() {
                a.resize(b.len(), 0);
            }
            for (x, y) in a.iter_mut().zip(b) {
                *x = if wrapping {
                    x.wrapping_add(*y)
                } else {
                    *x + *y
                };
            }
        }
        add(&mut self.exp_n, &other.exp_n, false);
        add(&mut self.exp_h, &other.exp_h, true);
        add(&mut self.got_n, &other.got_n, false);
        add(&mut self.got_h, &other.got_h, true);
        add(&mut self.unk_n, &other.unk_n, false);
    }

    pub fn check(&self) -> LedgerCheck {
        let mut c = LedgerCheck::default();
        for s in 0..self.exp_n.len() {
            let (exp, got) = (self.exp_n[s], self.got_n[s]);
            let unk = self.unk_n.get(s).copied().unwrap_or(0);
            c.expected += exp;
            c.got += got;
            if got < exp {
                c.missing += exp - got;
            } else if got > exp + unk {
                c.extra += got - exp - unk;
            } else if unk == 0 && self.exp_h[s] != self.got_h[s] {
                c.mismatched += 1;
            }
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contiguous_stream_with_own_sends_interleaved() {
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1), Ok(Seen::New));
        // Own send took seq 2; its SendOk comes after the Message with seq 3.
        assert_eq!(t.on_message(3), Ok(Seen::New));
        assert_eq!(t.contig(), 1);
        assert_eq!(t.holes(), 1);
        assert_eq!(t.on_send_ok(2, false), Ok(Seen::New));
        assert_eq!(t.contig(), 3);
        assert_eq!(t.on_message(4), Ok(Seen::New));
        assert_eq!((t.contig(), t.hw(), t.holes()), (4, 4, 0));
    }

    #[test]
    fn detects_gap_dup_and_reorder() {
        // A gap: 3 never arrives.
        let mut t = SeqTracker::start(0);
        for s in [1, 2, 4, 5] {
            assert_eq!(t.on_message(s), Ok(Seen::New));
        }
        assert_eq!(t.holes(), 1);
        assert_eq!(t.contig(), 2);

        // A duplicate within a session.
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1), Ok(Seen::New));
        assert_eq!(t.on_message(2), Ok(Seen::New));
        assert_eq!(t.on_message(2), Err(Violation::Dup(2)));
        // A SendOk (not a retry) for a seq already delivered.
        assert_eq!(t.on_send_ok(1, false), Err(Violation::Dup(1)));
        assert_eq!(t.on_send_ok(1, true), Ok(Seen::Old));

        // Reordering: 3 before 2.
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1), Ok(Seen::New));
        assert_eq!(t.on_message(3), Ok(Seen::New));
        assert_eq!(t.on_message(2), Err(Violation::Reorder(2)));
    }

    #[test]
    fn history_and_resumed_sessions() {
        // 10 messages before the run; the stored cursor was 7, so 8..=10 come again.
        let mut t = SeqTracker::start(10);
        for s in 8..=10 {
            assert_eq!(t.on_message(s), Ok(Seen::Old));
        }
        assert_eq!(t.on_message(11), Ok(Seen::New));
        // Resumed with last_seq = hw: nothing seen may come again.
        t.new_session(false);
        assert_eq!(t.on_message(11), Err(Violation::Dup(11)));
        // Resumed from the stored cursor: re-delivery is fine, and a seq never seen (an own
        // send whose SendOk was lost) is new.
        let mut t = SeqTracker::start(0);
        t.on_message(1).unwrap();
        t.on_message(3).unwrap();
        t.new_session(true);
        assert_eq!(t.on_message(1), Ok(Seen::Old));
        assert_eq!(t.on_message(2), Ok(Seen::New));
        assert_eq!(t.on_message(3), Ok(Seen::Old));
        assert_eq!(t.on_message(4), Ok(Seen::New));
        assert_eq!(t.holes(), 0);
        // ...but order still holds within the session.
        assert_eq!(t.on_message(4), Err(Violation::Dup(4)));
    }

    #[test]
    fn ledger_finds_missing_extra_and_swapped() {
        let mut send = Ledger::new(3);
        let mut recv_a = Ledger::new(3);
        let mut recv_b = Ledger::new(3);
        for c in 0..10 {
            send.expect(1, c, 2);
            recv_a.got(1, c);
            recv_b.got(1, c);
        }
        let mut all = send.clone();
        all.merge(&recv_a);
        all.merge(&recv_b);
        assert_eq!(
            all.check(),
            LedgerCheck {
                expected: 20,
                got: 20,
                ..LedgerCheck::default()
            }
        );

        let mut missing = send.clone();
        missing.merge(&recv_a);
        assert_eq!(missing.check().missing, 10);

        let mut extra = all.clone();
        extra.got(1, 3);
        assert_eq!(extra.check().extra, 1);

        let mut swapped = send.clone();
        swapped.merge(&recv_a);
        for c in 0..9 {
            swapped.got(1, c);
        }
        swapped.got(1, 99);
        let c = swapped.check();
        assert_eq!((c.missing, c.extra, c.mismatched), (0, 0, 1));

        // A message without SendOk may or may not arrive.
        let mut unk = all.clone();
        unk.unknown(1, 2);
        unk.got(1, 10);
        assert_eq!(unk.check().extra, 0);
    }
}
