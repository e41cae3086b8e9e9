//! Committed writes that so far live only in the commit log, kept in memory per user so that
//! reads see them: inbox messages, idempotency keys and cursors.
//!
//! Two generations. `active` takes every commit. Once it holds more than the configured
//! bytes it is frozen as `flushing` and a fresh `active` starts; the storage thread then moves
//! the users of `flushing` into the per-user tables a few at a time, reading the frozen
//! generation without the lock. Once its last users are moved, its log records can go
//! (`log_to_drop`).
//!
//! Invariants: for one user, `flushing` holds older entries than `active`; each keeps the
//! user's inbox seqs contiguous and ascending, and its keys in send order. A user of
//! `flushing` listed in `done` is in the tables and no longer read from here.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::records::{self, InboxChunk};
use super::{StoredBatch, StoredMessage};

/// What entries weigh, roughly, beyond their strings and bodies.
const KEY_OVERHEAD: usize = 10;
const CURSOR_OVERHEAD: usize = 48;
/// An inbox chunk ends after this many messages or once it holds this many bytes.
const CHUNK_MESSAGES: u64 = 256;
const CHUNK_BYTES: usize = 64 * 1024;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UserTail {
    /// Inbox messages, encoded as the chunks they will be stored as (so moving them is one
    /// insert per chunk and no copy of a message body is kept alive): consecutive seqs.
    pub inbox: Vec<InboxChunk>,
    /// Idempotency keys in send order, encoded by [`records::put_send`].
    pub sends: Vec<u8>,
    pub send_count: usize,
    /// (device_id, seq), the newest per device.
    pub cursors: Vec<(Arc<str>, u64)>,
}

impl UserTail {
    /// Appends the message of seq `seq` (the next one, or it starts a new chunk).
    pub fn push_message(&mut self, seq: u64, server_time_ms: i64, body: &[u8]) -> usize {
        let room = self.inbox.last().is_some_and(|c| {
            c.next_seq() == seq && c.len() < CHUNK_MESSAGES && c.bytes.len() < CHUNK_BYTES
        });
        if !room {
            // A user whose last chunk filled up will likely fill the next: size it for that
            // at once instead of growing it by doubling.
            let capacity = self
                .inbox
                .last()
                .map_or(512, |c| c.bytes.len().min(CHUNK_BYTES + CHUNK_BYTES / 16));
            self.inbox.push(InboxChunk::new(seq, capacity));
        }
        let Some(chunk) = self.inbox.last_mut() else {
            return 0;
        };
        let before = chunk.bytes.capacity();
        chunk.push(server_time_ms, body);
        // What the chunk's buffer grew by, so that the limit counts real memory.
        chunk.bytes.capacity() - if room { before } else { 0 }
    }

    pub fn push_send(&mut self, id: &str, seq: u64) -> usize {
        let before = self.sends.len();
        records::put_send(id, seq, &mut self.sends);
        self.send_count += 1;
        KEY_OVERHEAD + self.sends.len() - before
    }

    pub fn set_cursor(&mut self, device: &Arc<str>, seq: u64) -> usize {
        match self.cursors.iter_mut().find(|(d, _)| d == device) {
            Some((_, s)) => {
                *s = (*s).max(seq);
                0
            }
            None => {
                self.cursors.push((device.clone(), seq));
                CURSOR_OVERHEAD + device.len()
            }
        }
    }

    /// Roughly what it holds in memory (as counted into [`Tail::bytes`]).
    fn weight(&self) -> usize {
        self.inbox.iter().map(|c| c.bytes.capacity()).sum::<usize>()
            + self.sends.len()
            + KEY_OVERHEAD * self.send_count
            + self
                .cursors
                .iter()
                .map(|(d, _)| CURSOR_OVERHEAD + d.len())
                .sum::<usize>()
    }

    fn sends(&self) -> impl Iterator<Item = (String, u64)> {
        // Written by `push_send` only: it always decodes.
        records::decode_sends(&self.sends)
            .unwrap_or_default()
            .into_iter()
    }
}

/// One generation.
#[derive(Debug, Default)]
pub struct Tail {
    users: HashMap<Arc<str>, UserTail>,
    bytes: usize,
    /// The newest log record whose entries are in here.
    last_log: u64,
}

impl Tail {
    /// The entries of `uid`, created if missing; `bytes` grows by what `f` reports.
    pub fn with_user(&mut self, uid: &Arc<str>, f: impl FnOnce(&mut UserTail) -> usize) {
        let user = match self.users.get_mut(&**uid) {
            Some(u) => u,
            None => self.users.entry(uid.clone()).or_default(),
        };
        self.bytes += f(user);
    }

    pub fn set_last_log(&mut self, id: u64) {
        self.last_log = self.last_log.max(id);
    }

    pub fn user(&self, uid: &str) -> Option<&UserTail> {
        self.users.get(uid)
    }
}

#[derive(Debug, Default)]
pub struct Tails {
    active: Tail,
    flushing: Arc<Tail>,
    /// The users of `flushing`, in the order they are moved; `flushed` of them are done.
    order: Vec<Arc<str>>,
    flushed: usize,
    /// `order[..flushed]`, for reads.
    done: HashSet<Arc<str>>,
    /// What the users in `done` weigh: memory the move gave back, in effect.
    moved_bytes: usize,
    /// Log records up to this id hold only moved entries: they can be deleted.
    log_to_drop: u64,
}

/// A user's idempotency keys held here, as [`Tails::find_send`] found them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldSends {
    /// The newest held key with the id looked for: its seq, and how many keys came after it.
    pub found: Option<(u64, usize)>,
    /// Keys held.
    pub count: usize,
    /// The lowest seq held (`u64::MAX` when none): every key from it up is held here.
    pub first_seq: u64,
}

/// Users of the flushing generation to move into the tables in one transaction.
#[derive(Debug)]
pub struct Slice {
    pub generation: Arc<Tail>,
    pub users: Vec<Arc<str>>,
}

impl Tails {
    /// Adds a committed batch, logged as record `log_id`.
    pub fn apply(&mut self, log_id: u64, batch: &StoredBatch) {
        let t = &mut self.active;
        for a in &batch.appends {
            let m = &a.msg;
            t.with_user(&a.owner, |u| {
                u.push_message(m.seq, m.server_time_ms, &m.body)
            });
        }
        for (uid, id, seq) in &batch.sends {
            t.with_user(uid, |u| u.push_send(id, *seq));
        }
        for (uid, device, seq) in &batch.cursors {
            t.with_user(uid, |u| u.set_cursor(device, *seq));
        }
        t.set_last_log(log_id);
    }

    /// The generation that takes new entries (for replaying the log at start-up).
    pub fn active_mut(&mut self) -> &mut Tail {
        &mut self.active
    }

    /// Bytes held in both generations, not counting users already moved.
    pub fn bytes(&self) -> usize {
        self.active.bytes + self.flushing.bytes.saturating_sub(self.moved_bytes)
    }

    /// `uid`'s entries, oldest generation first.
    fn user(&self, uid: &str) -> impl Iterator<Item = &UserTail> {
        let flushing = self.flushing.user(uid).filter(|_| !self.done.contains(uid));
        [flushing, self.active.user(uid)].into_iter().flatten()
    }

    /// The highest seq of `uid`'s inbox held here.
    pub fn max_seq(&self, uid: &str) -> Option<u64> {
        self.user(uid)
            .filter_map(|u| u.inbox.last())
            .map(|c| c.next_seq() - 1)
            .last()
    }

    /// The lowest seq of `uid`'s inbox held here: everything from it up is here.
    pub fn min_seq(&self, uid: &str) -> Option<u64> {
        self.user(uid)
            .find_map(|u| u.inbox.first())
            .map(|c| c.first_seq)
    }

    /// Up to `limit` messages of `uid` held here with seq > `after`, in seq order.
    pub fn messages_after(&self, uid: &str, after: u64, limit: usize) -> Vec<StoredMessage> {
        let mut out = Vec::new();
        for u in self.user(uid) {
            let skip = u.inbox.partition_point(|c| c.next_seq() <= after + 1);
            for c in &u.inbox[skip..] {
                if out.len() >= limit {
                    return out;
                }
                c.messages_after(after, limit - out.len(), &mut out);
            }
        }
        out
    }

    /// `uid`'s idempotency keys held here, in send order.
    pub fn sends(&self, uid: &str) -> Vec<(String, u64)> {
        self.user(uid).flat_map(|u| u.sends()).collect()
    }

    /// What is held here of `uid`'s keys, looking for one id.
    pub fn find_send(&self, uid: &str, id: &str) -> HeldSends {
        let mut held = HeldSends {
            found: None,
            count: 0,
            first_seq: u64::MAX,
        };
        let mut at = 0;
        for u in self.user(uid) {
            let _ = records::for_each_send(&u.sends, |k, seq| {
                held.first_seq = held.first_seq.min(seq);
                if k == id {
                    held.found = Some((seq, 0));
                    at = held.count;
                }
                held.count += 1;
            });
        }
        if let Some((_, newer)) = held.found.as_mut() {
            *newer = held.count - at - 1;
        }
        held
    }

    /// `uid`'s cursors held here: (device, seq), the newest per device.
    pub fn cursors(&self, uid: &str) -> Vec<(Arc<str>, u64)> {
        let mut out: Vec<(Arc<str>, u64)> = Vec::new();
        for (d, s) in self.user(uid).flat_map(|u| u.cursors.iter()) {
            match out.iter_mut().find(|(o, _)| o == d) {
                Some((_, o)) => *o = (*o).max(*s),
                None => out.push((d.clone(), *s)),
            }
        }
        out
    }

    /// Freezes the active generation for flushing when it holds more than `limit` bytes and
    /// no other generation is being flushed. Returns whether a generation is being flushed.
    pub fn rotate(&mut self, limit: usize) -> bool {
        if self.order.is_empty() && self.active.bytes > limit {
            let frozen = std::mem::take(&mut self.active);
            self.order = frozen.users.keys().cloned().collect();
            self.flushed = 0;
            self.flushing = Arc::new(frozen);
        }
        !self.order.is_empty()
    }

    /// Log records up to this id can be deleted (0: none).
    pub fn log_to_drop(&self) -> u64 {
        self.log_to_drop
    }

    /// The log records up to `id` are deleted (committed).
    pub fn log_dropped(&mut self, id: u64) {
        if id >= self.log_to_drop {
            self.log_to_drop = 0;
        }
    }

    /// The next (up to) `max_users` users of the flushing generation to move, if any.
    pub fn next_slice(&self, max_users: usize) -> Option<Slice> {
        if self.order.is_empty() {
            return None;
        }
        let end = (self.flushed + max_users).min(self.order.len());
        Some(Slice {
            generation: self.flushing.clone(),
            users: self.order[self.flushed..end].to_vec(),
        })
    }

    /// The first `moved` users of `slice` are in the tables now (committed). When they were
    /// the generation's last, its log records may go, and the generation is returned, for the
    /// caller to free outside the lock.
    pub fn flushed(&mut self, slice: &Slice, moved: usize) -> Option<Arc<Tail>> {
        self.flushed += moved;
        if self.flushed < self.order.len() {
            for uid in &slice.users[..moved] {
                self.moved_bytes += slice.generation.user(uid).map_or(0, UserTail::weight);
                self.done.insert(uid.clone());
            }
            return None;
        }
        self.order.clear();
        self.done.clear();
        self.moved_bytes = 0;
        self.flushed = 0;
        self.log_to_drop = self.log_to_drop.max(self.flushing.last_log);
        Some(std::mem::take(&mut self.flushing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Append;

    fn batch(owner: &str, seqs: std::ops::RangeInclusive<u64>) -> StoredBatch {
        StoredBatch {
            appends: seqs
                .clone()
                .map(|seq| Append {
                    owner: owner.into(),
                    msg: StoredMessage {
                        seq,
                        server_time_ms: 1,
                        body: vec![b'x'; 100].into(),
                    },
                })
                .collect(),
            sends: seqs.map(|s| (owner.into(), format!("k{s}"), s)).collect(),
            cursors: vec![(owner.into(), "phone".into(), 1)],
            friendships: vec![],
            memberships: Vec::new(),
        }
    }

    fn seqs(v: &[StoredMessage]) -> Vec<u64> {
        v.iter().map(|m| m.seq).collect()
    }

    #[test]
    fn reads_span_both_generations_in_order() {
        let mut t = Tails::default();
        t.apply(1, &batch("a", 1..=3));
        assert!(!t.rotate(1_000_000), "under the limit: nothing to flush");
        assert!(t.rotate(100));
        t.apply(2, &batch("a", 4..=5));
        t.apply(2, &batch("b", 1..=1));
        assert_eq!(t.max_seq("a"), Some(5));
        assert_eq!(t.min_seq("a"), Some(1));
        assert_eq!(t.min_seq("b"), Some(1));
        assert_eq!(t.max_seq("c"), None);
        assert_eq!(seqs(&t.messages_after("a", 0, 10)), vec![1, 2, 3, 4, 5]);
        assert_eq!(seqs(&t.messages_after("a", 2, 2)), vec![3, 4]);
        assert_eq!(seqs(&t.messages_after("a", 5, 2)), Vec::<u64>::new());
        assert_eq!(
            t.sends("a"),
            (1..=5).map(|s| (format!("k{s}"), s)).collect::<Vec<_>>()
        );
        // One cursor per device, the newest.
        let mut b = StoredBatch::default();
        b.cursors.push(("a".into(), "phone".into(), 4));
        b.cursors.push(("a".into(), "laptop".into(), 2));
        t.apply(3, &b);
        assert_eq!(
            t.cursors("a"),
            vec![(Arc::from("phone"), 4), (Arc::from("laptop"), 2)]
        );
        assert!(t.rotate(0));
        let s = t.next_slice(10).unwrap();
        assert_eq!(
            s.users.iter().map(|u| &**u).collect::<Vec<_>>(),
            vec!["a"],
            "one generation flushes at a time"
        );
    }

    #[test]
    fn an_inbox_chunk_ends_after_256_messages() {
        let mut u = UserTail::default();
        for seq in 1..=300 {
            u.push_message(seq, 1, b"x");
        }
        let chunks: Vec<(u64, u64)> = u.inbox.iter().map(|c| (c.first_seq, c.len())).collect();
        assert_eq!(chunks, vec![(1, 256), (257, 44)]);
    }

    #[test]
    fn an_inbox_chunk_ends_once_it_holds_64_kib() {
        let mut u = UserTail::default();
        // 65 messages of 1,003 bytes (time, length, body), then one of 341: exactly 64 KiB.
        for seq in 1..=65 {
            u.push_message(seq, 1, &[b'x'; 1000]);
        }
        u.push_message(66, 1, &[b'x'; 338]);
        assert_eq!(u.inbox.len(), 1, "under 64 KiB a chunk takes more");
        assert_eq!(u.inbox[0].bytes.len(), 64 * 1024);
        u.push_message(67, 1, b"x");
        let chunks: Vec<(u64, u64)> = u.inbox.iter().map(|c| (c.first_seq, c.len())).collect();
        assert_eq!(chunks, vec![(1, 66), (67, 1)]);
    }

    #[test]
    fn the_chunk_after_an_oversized_message_is_sized_for_68_kib_not_for_that_message() {
        let mut u = UserTail::default();
        u.push_message(1, 1, &[b'x'; 100_000]);
        let grew = u.push_message(2, 1, b"x");
        assert_eq!(u.inbox.len(), 2);
        let capacity = u.inbox[1].bytes.capacity();
        assert_eq!(grew, capacity, "a new chunk counts its whole buffer");
        assert!(
            (68 * 1024..100_000).contains(&capacity),
            "capacity {capacity}"
        );
    }

    #[test]
    fn a_moved_user_gives_back_exactly_the_bytes_its_entries_were_counted_as() {
        let mut t = Tails::default();
        t.apply(1, &batch("a", 1..=3));
        let bytes_a = t.bytes();
        // b's chunk outgrows its first buffer, and b has a second device.
        t.apply(2, &batch("b", 1..=8));
        let mut laptop = StoredBatch::default();
        laptop.cursors.push(("b".into(), "laptop".into(), 3));
        t.apply(3, &laptop);
        let bytes_b = t.bytes() - bytes_a;
        assert!(t.rotate(0));
        let s = t.next_slice(1).unwrap();
        assert!(t.flushed(&s, 1).is_none());
        let left = if &*s.users[0] == "a" {
            bytes_b
        } else {
            bytes_a
        };
        assert_eq!(t.bytes(), left, "{} was moved", s.users[0]);
    }

    #[test]
    fn a_generation_is_frozen_only_once_it_holds_more_than_the_limit() {
        let mut t = Tails::default();
        t.apply(1, &batch("a", 1..=2));
        let held = t.bytes();
        assert!(!t.rotate(held), "exactly at the limit");
        assert!(t.rotate(held - 1));
    }

    #[test]
    fn a_found_key_is_the_newest_with_its_id_and_counts_the_keys_sent_after_it() {
        let mut t = Tails::default();
        t.apply(1, &batch("a", 1..=3));
        assert!(t.rotate(0));
        t.apply(2, &batch("a", 4..=5));
        let mut again = StoredBatch::default();
        again.sends.push(("a".into(), "k1".into(), 6));
        t.apply(3, &again);
        // Held now, oldest first: k1 k2 k3 (flushing), k4 k5 k1 (active).
        let held = |id| t.find_send("a", id);
        assert_eq!(
            held("k2"),
            HeldSends {
                found: Some((2, 4)),
                count: 6,
                first_seq: 1
            }
        );
        assert_eq!(held("k5").found, Some((5, 1)));
        assert_eq!(held("k1").found, Some((6, 0)), "the id's newest use");
        assert_eq!(held("k9").found, None);
        assert_eq!(held("k9").count, 6);
        assert_eq!(
            t.find_send("b", "k1"),
            HeldSends {
                found: None,
                count: 0,
                first_seq: u64::MAX
            }
        );
    }

    #[test]
    fn flushing_goes_a_slice_at_a_time_and_the_last_one_drops_the_log() {
        let mut t = Tails::default();
        for (i, u) in ["a", "b", "c"].iter().enumerate() {
            t.apply(i as u64 + 1, &batch(u, 1..=2));
        }
        let before = t.bytes();
        assert!(before > 3 * 200);
        assert!(t.rotate(0));
        t.apply(9, &batch("a", 3..=3));
        let s = t.next_slice(2).unwrap();
        assert_eq!(s.users.len(), 2);
        assert!(t.flushed(&s, 1).is_none(), "a slice may be moved in part");
        let mut moved = vec![s.users[0].clone()];
        let s = t.next_slice(2).unwrap();
        assert_eq!(s.users.len(), 2, "the rest of the generation");
        assert!(!moved.contains(&s.users[0]));
        assert!(t.flushed(&s, 1).is_none());
        moved.push(s.users[0].clone());
        assert_eq!(
            t.log_to_drop(),
            0,
            "the log stays until the generation is moved"
        );
        // Moved users are read from the tables, no longer from here.
        for u in &moved {
            let want: &[u64] = if &**u == "a" { &[3] } else { &[] };
            assert_eq!(seqs(&t.messages_after(u, 0, 10)), want);
        }
        let s = t.next_slice(2).unwrap();
        assert_eq!(s.users.len(), 1);
        let generation = t
            .flushed(&s, 1)
            .expect("the last slice frees the generation");
        assert_eq!(t.log_to_drop(), 3);
        t.log_dropped(3);
        assert_eq!(t.log_to_drop(), 0);
        assert_eq!(generation.user("b").map(|u| u.inbox[0].len()), Some(2));
        assert!(t.next_slice(2).is_none());
        // Only the active generation's entries are left, and the next rotation may start.
        assert_eq!(seqs(&t.messages_after("a", 0, 10)), vec![3]);
        assert!(t.bytes() < before / 3);
        assert!(t.rotate(0));
    }
}
