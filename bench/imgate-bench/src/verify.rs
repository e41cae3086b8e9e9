//! Verification, as pure bookkeeping with no I/O:
//!
//! - [`Shape::check`], per delivery: the content is exactly the bench message its header
//!   describes; from_uid, from_device and client_msg_id are those of the header's sender; and
//!   the message is in the inbox of the user it names as recipient, or of its sender's user
//!   (the copy for the sender's other devices); a group message names no user, and its
//!   sender and the inbox's user are members of the group it names.
//! - [`SeqTracker`], per device: the inbox seqs it has seen, through `Message` frames and
//!   through its own `SendOk`s (a device is not sent its own live messages: it learns their
//!   seq from the SendOk), and the print of the message first seen under each. Within one
//!   session Messages must come in strictly increasing seq order; a seq seen twice is a
//!   duplicate unless it is a re-delivery the session allows (a login that resumed from the
//!   stored cursor re-sends what was not acked), and a seq that comes again (re-delivered,
//!   in a duplicate SendOk, in a Sync page) must carry the message first seen under it; at
//!   the end, every seq up to the highest must have been seen (no gaps).
//! - [`Ledger`]: message identity across devices and processes. Each sender device counts,
//!   for each message that got a SendOk, the deliveries it expects (every device of the
//!   recipient, plus the sender's other devices) and a hash of each delivery's identity (the
//!   message, the device it is due at, the recipient it names); receiving devices count what
//!   they got. Per sender the counts and hash sums must match: a missing delivery, a message
//!   delivered twice, one swapped for another, or one stored in a third user's inbox shows
//!   up as a difference.

use std::collections::BTreeSet;

use imgate::im::proto;
use serde::{Deserialize, Serialize};

use crate::im::{self, Header};
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
    /// A seq that came again with another message than the one first seen under it.
    Changed(u64),
}

/// A seq this far above the table of prints is tracked without a print, so that one wild
/// seq cannot make the table huge (it is a gap or an order violation anyway).
const MAX_PRINT_JUMP: usize = 1 << 22;

#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    /// Every seq <= contig has been seen.
    contig: u64,
    /// Seen seqs above `contig` (holes below them are own sends awaiting their SendOk).
    above: BTreeSet<u64>,
    /// The highest seq seen.
    hw: u64,
    /// The highest seq seen in a Message (or before the run): what to resume after. Own
    /// sends' seqs do not count, since a SendOk may come before Messages with lower seqs.
    delivered: u64,
    /// The last Message seq of this session.
    last_msg: u64,
    /// Seen seqs up to this may be delivered again in this session.
    old_limit: u64,
    /// `prints[i]`: the print of the message seen under seq `base + 1 + i`, 0 if none is
    /// known. History from before the run (seqs up to `base`) has none.
    prints: Vec<u64>,
    base: u64,
    /// Own sends first learnt from a duplicate SendOk: the first attempt was stored though
    /// its answer was lost (a node or Redis gone before it could say so), so the node that
    /// stored it did not know it was this device's own, and may still deliver it once to this
    /// device as a Message.
    stored_unanswered: BTreeSet<u64>,
}

impl SeqTracker {
    /// The first login: `max_seq` (from LoginOk) and everything before it is history from
    /// before this run, which may still be delivered (from the stored cursor).
    pub fn start(max_seq: u64) -> SeqTracker {
        SeqTracker {
            contig: max_seq,
            hw: max_seq,
            delivered: max_seq,
            old_limit: max_seq,
            base: max_seq,
            ..SeqTracker::default()
        }
    }

    /// A new session (re-login). With `from_cursor` (Login.last_seq = 0), the server
    /// resumes after its stored cursor, so seqs already seen may come again; otherwise the
    /// login passed `last_seq = resume_after()`, and only own sends beyond it may come again.
    pub fn new_session(&mut self, from_cursor: bool) {
        self.last_msg = if from_cursor { 0 } else { self.delivered };
        self.old_limit = self.hw;
    }

    pub fn is_seen(&self, seq: u64) -> bool {
        seq <= self.contig || self.above.contains(&seq)
    }

    /// Whether a Message with this seq would be an allowed re-delivery of a message of this
    /// run (one whose print is known).
    pub fn is_redelivery(&self, seq: u64) -> bool {
        seq > self.last_msg && seq <= self.old_limit && self.print_at(seq).is_some()
    }

    fn insert(&mut self, seq: u64, print: u64) {
        self.hw = self.hw.max(seq);
        if seq == self.contig + 1 {
            self.contig = seq;
            while self.above.remove(&(self.contig + 1)) {
                self.contig += 1;
            }
        } else {
            self.above.insert(seq);
        }
        let Some(i) = seq.checked_sub(self.base + 1) else {
            return;
        };
        let i = i as usize;
        if i >= self.prints.len() {
            if i - self.prints.len() > MAX_PRINT_JUMP {
                return;
            }
            self.prints.resize(i + 1, 0);
        }
        self.prints[i] = print;
    }

    fn print_at(&self, seq: u64) -> Option<u64> {
        let i = seq.checked_sub(self.base + 1)?;
        self.prints.get(i as usize).copied().filter(|&p| p != 0)
    }

    /// Whether `print` is the message first seen under `seq` (true when none is known).
    fn same(&self, seq: u64, print: u64) -> bool {
        self.print_at(seq).is_none_or(|p| p == print)
    }

    /// A `Message` frame; `print` is its [`print`].
    pub fn on_message(&mut self, seq: u64, print: u64) -> Result<Seen, Violation> {
        if seq <= self.last_msg {
            return Err(if self.is_seen(seq) {
                Violation::Dup(seq)
            } else {
                Violation::Reorder(seq)
            });
        }
        self.last_msg = seq;
        self.delivered = self.delivered.max(seq);
        if self.is_seen(seq) {
            let own_echo = self.stored_unanswered.remove(&seq);
            return if seq > self.old_limit && !own_echo {
                Err(Violation::Dup(seq))
            } else if !self.same(seq, print) {
                Err(Violation::Changed(seq))
            } else {
                Ok(Seen::Old)
            };
        }
        self.insert(seq, print);
        Ok(Seen::New)
    }

    /// A `SendOk` for this device's own send: its seq in the device's own inbox, and the
    /// print of what was sent. A `duplicate` answer (a retry) names a seq that may have been
    /// seen already, then with the same message.
    pub fn on_send_ok(&mut self, seq: u64, duplicate: bool, print: u64) -> Result<Seen, Violation> {
        if self.is_seen(seq) {
            return if !duplicate {
                Err(Violation::Dup(seq))
            } else if !self.same(seq, print) {
                Err(Violation::Changed(seq))
            } else {
                Ok(Seen::Old)
            };
        }
        if duplicate {
            self.stored_unanswered.insert(seq);
        }
        self.insert(seq, print);
        Ok(Seen::New)
    }

    /// A stored message (a Sync page): if its seq was seen, it must be what was seen.
    pub fn check_stored(&self, seq: u64, print: u64) -> Result<(), Violation> {
        if self.is_seen(seq) && !self.same(seq, print) {
            return Err(Violation::Changed(seq));
        }
        Ok(())
    }

    /// Seqs never seen, given the seqs of a Sync page asked after `contig()`: the holes
    /// below the highest seq seen, and what the server has beyond it. A hole in the page is
    /// counted once.
    pub fn unseen(&self, page: impl IntoIterator<Item = u64>) -> u64 {
        self.holes() + page.into_iter().filter(|&s| s > self.hw).count() as u64
    }

    /// Everything up to here was received: what to Ack.
    pub fn contig(&self) -> u64 {
        self.contig
    }

    /// The highest seq seen.
    pub fn hw(&self) -> u64 {
        self.hw
    }

    /// What to resume after (Login.last_seq): the highest seq seen in a Message.
    pub fn resume_after(&self) -> u64 {
        self.delivered
    }

    /// Seqs below the highest one that were never seen.
    pub fn holes(&self) -> u64 {
        self.hw - self.contig - self.above.len() as u64
    }
}

/// A 64-bit print of what a message says, all but its seq and server time: two deliveries
/// with the same print are the same message. Never 0.
pub fn print(
    content: &[u8],
    from_uid: &str,
    to_uid: &str,
    client_msg_id: &str,
    from_device: &str,
    group_id: &str,
) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for part in [
        content,
        from_uid.as_bytes(),
        to_uid.as_bytes(),
        client_msg_id.as_bytes(),
        from_device.as_bytes(),
        group_id.as_bytes(),
    ] {
        h = mix64(h ^ part.len() as u64);
        for chunk in part.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            h = mix64(h ^ u64::from_le_bytes(b));
        }
    }
    h | 1
}

/// The print of a received message.
pub fn print_of(m: &proto::Message) -> u64 {
    print(
        &m.content,
        &m.from_uid,
        &m.to_uid,
        &m.client_msg_id,
        &m.from_device,
        &m.group_id,
    )
}

/// Which user and device each global device index is: user 0's devices first, then user
/// 1's, and so on (how every scenario numbers them).
#[derive(Debug, Clone, Default)]
pub struct Roster {
    /// `first[u]`: the index of user u's first device; the last entry is the total.
    first: Vec<u32>,
}

impl Roster {
    /// `devices_of[u]`: how many devices user u has.
    pub fn new(devices_of: &[u16]) -> Roster {
        let mut first = Vec::with_capacity(devices_of.len() + 1);
        let mut n = 0u32;
        for &d in devices_of {
            first.push(n);
            n += u32::from(d);
        }
        first.push(n);
        Roster { first }
    }

    pub fn users(&self) -> u32 {
        self.first.len() as u32 - 1
    }

    pub fn devices(&self, user: u32) -> u16 {
        let u = user as usize;
        match (self.first.get(u), self.first.get(u + 1)) {
            (Some(a), Some(b)) => (b - a) as u16,
            _ => 0,
        }
    }

    pub fn gidx(&self, user: u32, dev: u16) -> Option<u32> {
        (dev < self.devices(user)).then(|| self.first[user as usize] + u32::from(dev))
    }

    /// The (user, device) of a global device index.
    pub fn device(&self, gidx: u32) -> Option<(u32, u16)> {
        if gidx >= *self.first.last()? {
            return None;
        }
        let u = self.first.partition_point(|&f| f <= gidx) - 1;
        Some((u as u32, (gidx - self.first[u]) as u16))
    }

    /// The devices a message from device `sender` to user `to` is delivered to: every
    /// device of `to`, and the other devices of the sender's user.
    pub fn receivers(&self, sender: u32, to: u32) -> Vec<(u32, u16)> {
        let Some((su, sd)) = self.device(sender) else {
            return Vec::new();
        };
        let mut r: Vec<(u32, u16)> = (0..self.devices(su))
            .filter(|&d| d != sd)
            .map(|d| (su, d))
            .collect();
        if to != su {
            r.extend((0..self.devices(to)).map(|d| (to, d)));
        }
        r
    }
}

/// A message's target at or above this is group `target - GROUP_BASE`; below, a user.
pub const GROUP_BASE: u32 = 1 << 31;

/// The run's groups (fanout): disjoint, each user in at most one.
#[derive(Debug, Clone, Default)]
pub struct Groups {
    /// `ids[g]`: group g's group_id.
    pub ids: Vec<String>,
    /// `members[g]`: its users.
    pub members: Vec<Vec<u32>>,
    /// `of_user[u]`: user u's group, `u32::MAX` for none.
    of_user: Vec<u32>,
}

impl Groups {
    /// `members[g]` are the users of group `ids[g]`; a user in two groups is refused.
    pub fn new(ids: Vec<String>, members: Vec<Vec<u32>>) -> Result<Groups, String> {
        let mut of_user: Vec<u32> = Vec::new();
        for (g, ms) in members.iter().enumerate() {
            for &u in ms {
                let u = u as usize;
                if u >= of_user.len() {
                    of_user.resize(u + 1, u32::MAX);
                }
                if of_user[u] != u32::MAX {
                    return Err(format!("user {u} is in two groups"));
                }
                of_user[u] = g as u32;
            }
        }
        Ok(Groups {
            ids,
            members,
            of_user,
        })
    }

    /// The group of user `u`.
    pub fn of(&self, u: u32) -> Option<u32> {
        self.of_user
            .get(u as usize)
            .copied()
            .filter(|&g| g != u32::MAX)
    }

    /// The index of a group_id of this run.
    pub fn index(&self, id: &str) -> Option<u32> {
        self.ids.iter().position(|g| g == id).map(|g| g as u32)
    }
}

/// What this run's messages look like, to check every delivery against.
#[derive(Debug, Clone)]
pub struct Shape {
    pub run: u32,
    pub uid_prefix: String,
    /// Content bytes of every message (at least the header).
    pub size: usize,
    pub roster: Roster,
    pub groups: Groups,
}

/// What a delivered message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A message of this run, right in every field.
    Ok(Header),
    /// A bench message of another run (history in a data directory shared between runs).
    Foreign,
    Wrong(Wrong),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wrong {
    /// The content is not a bench message, names no device of this run, or is not the
    /// message its header describes.
    Corrupt,
    /// from_uid, from_device or client_msg_id is not what the header's sender sent.
    Fields,
    /// In the inbox of a user who neither is its recipient (to_uid) nor sent it; for a
    /// group message (group_id set), one naming a user too, or in the inbox of a user who
    /// is not a member of its group, or from one who is not.
    Misrouted,
}

impl Shape {
    /// The user index of a uid of this run.
    pub fn user_of_uid(&self, uid: &str) -> Option<u32> {
        let n: u32 = uid
            .strip_prefix(self.uid_prefix.as_str())?
            .strip_prefix('u')?
            .parse()
            .ok()?;
        (n < self.roster.users() && im::uid(&self.uid_prefix, n) == uid).then_some(n)
    }

    /// The target a received message names: its group (`GROUP_BASE + g`) when it has a
    /// group_id, else its to_uid's user.
    pub fn target_of(&self, m: &proto::Message) -> Option<u32> {
        if m.group_id.is_empty() {
            self.user_of_uid(&m.to_uid)
        } else {
            self.groups.index(&m.group_id).map(|g| GROUP_BASE + g)
        }
    }

    /// The devices a message from device `sender` to `to` (a user, or `GROUP_BASE + g`) is
    /// delivered to: for a group, every device of every member but the sending one.
    pub fn receivers(&self, sender: u32, to: u32) -> Vec<(u32, u16)> {
        let Some(g) = to.checked_sub(GROUP_BASE) else {
            return self.roster.receivers(sender, to);
        };
        let from = self.roster.device(sender);
        let Some(members) = self.groups.members.get(g as usize) else {
            return Vec::new();
        };
        let mut r = Vec::with_capacity(members.len());
        for &u in members {
            for d in 0..self.roster.devices(u) {
                if Some((u, d)) != from {
                    r.push((u, d));
                }
            }
        }
        r
    }

    /// Checks a message received by a device of user `me`; `scratch` is working space.
    pub fn check(&self, m: &proto::Message, me: u32, scratch: &mut Vec<u8>) -> Delivery {
        let Some(h) = Header::parse(&m.content) else {
            return Delivery::Wrong(Wrong::Corrupt);
        };
        if h.run != self.run {
            return Delivery::Foreign;
        }
        let Some((su, sd)) = self.roster.device(h.sender) else {
            return Delivery::Wrong(Wrong::Corrupt);
        };
        h.write(self.size, scratch);
        if *scratch != m.content {
            return Delivery::Wrong(Wrong::Corrupt);
        }
        if m.from_uid != im::uid(&self.uid_prefix, su)
            || m.from_device != im::device_id(sd)
            || m.client_msg_id != im::client_msg_id(self.run, h.sender, h.counter)
        {
            return Delivery::Wrong(Wrong::Fields);
        }
        if m.group_id.is_empty() {
            if su != me && self.user_of_uid(&m.to_uid) != Some(me) {
                return Delivery::Wrong(Wrong::Misrouted);
            }
        } else {
            // A group message names no user, and both its sender and this inbox's user
            // are members of the group it names.
            let g = self.groups.index(&m.group_id);
            if g.is_none()
                || !m.to_uid.is_empty()
                || self.groups.of(me) != g
                || self.groups.of(su) != g
            {
                return Delivery::Wrong(Wrong::Misrouted);
            }
        }
        Delivery::Ok(h)
    }
}

/// A message's identity as a 64-bit hash: sender device index and per-sender counter.
pub fn msg_hash(sender: u32, counter: u64) -> u64 {
    mix64((u64::from(sender) << 40) ^ counter ^ 0xA5A5_0000_0000_0000)
}

/// One delivery's identity: the message, the device it is at (user, device), and the
/// recipient it names.
pub fn copy_hash(sender: u32, counter: u64, to: u32, at: (u32, u16)) -> u64 {
    let h = mix64(msg_hash(sender, counter) ^ (u64::from(at.0) << 16 | u64::from(at.1)));
    mix64(h ^ u64::from(to) ^ 0x5BD1_E995_0000_0000)
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
    /// another, or in another device's or user's inbox).
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

    /// A message to user `to` got its SendOk: one delivery is due at each of `receivers`
    /// (user, device).
    pub fn expect(&mut self, sender: u32, counter: u64, to: u32, receivers: &[(u32, u16)]) {
        let s = sender as usize;
        if s < self.exp_n.len() {
            self.exp_n[s] += receivers.len() as u64;
            for &at in receivers {
                self.exp_h[s] = self.exp_h[s].wrapping_add(copy_hash(sender, counter, to, at));
            }
        }
    }

    /// A message that never got a SendOk (up to `copies` deliveries may exist).
    pub fn unknown(&mut self, sender: u32, copies: u64) {
        if let Some(n) = self.unk_n.get_mut(sender as usize) {
            *n += copies;
        }
    }

    /// Device `at` (user, device) received a message naming `to` as its recipient (first
    /// time for its seq).
    pub fn got(&mut self, sender: u32, counter: u64, to: u32, at: (u32, u16)) {
        let s = sender as usize;
        if s < self.got_n.len() {
            self.got_n[s] += 1;
            self.got_h[s] = self.got_h[s].wrapping_add(copy_hash(sender, counter, to, at));
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

    /// A stand-in print for the message under seq `s`.
    fn p(s: u64) -> u64 {
        mix64(s) | 1
    }

    #[test]
    fn contiguous_stream_with_own_sends_interleaved() {
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::New));
        // Own send took seq 2; its SendOk comes after the Message with seq 3.
        assert_eq!(t.on_message(3, p(3)), Ok(Seen::New));
        assert_eq!(t.contig(), 1);
        assert_eq!(t.holes(), 1);
        assert_eq!(t.on_send_ok(2, false, p(2)), Ok(Seen::New));
        assert_eq!(t.contig(), 3);
        assert_eq!(t.on_message(4, p(4)), Ok(Seen::New));
        assert_eq!((t.contig(), t.hw(), t.holes()), (4, 4, 0));
    }

    #[test]
    fn detects_gap_dup_and_reorder() {
        // A gap: 3 never arrives.
        let mut t = SeqTracker::start(0);
        for s in [1, 2, 4, 5] {
            assert_eq!(t.on_message(s, p(s)), Ok(Seen::New));
        }
        assert_eq!(t.holes(), 1);
        assert_eq!(t.contig(), 2);

        // A duplicate within a session.
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::New));
        assert_eq!(t.on_message(2, p(2)), Ok(Seen::New));
        assert_eq!(t.on_message(2, p(2)), Err(Violation::Dup(2)));
        // A SendOk (not a retry) for a seq already delivered.
        assert_eq!(t.on_send_ok(1, false, p(1)), Err(Violation::Dup(1)));
        assert_eq!(t.on_send_ok(1, true, p(1)), Ok(Seen::Old));

        // Reordering: 3 before 2.
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::New));
        assert_eq!(t.on_message(3, p(3)), Ok(Seen::New));
        assert_eq!(t.on_message(2, p(2)), Err(Violation::Reorder(2)));
    }

    #[test]
    fn an_own_send_stored_without_its_answer_may_come_back_once() {
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::New));
        // The retry's SendOk says the first attempt was stored under 2...
        assert_eq!(t.on_send_ok(2, true, p(2)), Ok(Seen::New));
        // ...so the node that stored it may deliver it as a Message, once.
        assert_eq!(t.on_message(2, p(2)), Ok(Seen::Old));
        assert_eq!(t.on_message(3, p(3)), Ok(Seen::New));
        // An own send answered the first time never comes back in the same session.
        assert_eq!(t.on_send_ok(4, false, p(4)), Ok(Seen::New));
        assert_eq!(t.on_message(4, p(4)), Err(Violation::Dup(4)));
        // Nor one whose echo already came.
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_send_ok(1, true, p(1)), Ok(Seen::New));
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::Old));
        assert_eq!(t.on_message(1, p(1)), Err(Violation::Dup(1)));
    }

    #[test]
    fn a_session_resumes_after_the_highest_message_not_after_an_own_send() {
        let mut t = SeqTracker::start(0);
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::New));
        // The stream stops at 1 while this device's own send is stored as 5.
        assert_eq!(t.on_send_ok(5, false, p(5)), Ok(Seen::New));
        assert_eq!(t.resume_after(), 1);
        t.new_session(false);
        assert_eq!(t.on_message(1, p(1)), Err(Violation::Dup(1)));
        for s in 2..=4 {
            assert_eq!(t.on_message(s, p(s)), Ok(Seen::New));
        }
        assert_eq!(t.on_message(5, p(5)), Ok(Seen::Old));
        assert_eq!(t.on_message(5, p(5)), Err(Violation::Dup(5)));
        assert_eq!((t.contig(), t.holes(), t.resume_after()), (5, 0, 5));
    }

    #[test]
    fn history_and_resumed_sessions() {
        // 10 messages before the run; the stored cursor was 7, so 8..=10 come again.
        let mut t = SeqTracker::start(10);
        for s in 8..=10 {
            assert_eq!(t.on_message(s, p(s)), Ok(Seen::Old));
        }
        assert_eq!(t.on_message(11, p(11)), Ok(Seen::New));
        // Resumed after the highest Message: nothing seen may come again.
        t.new_session(false);
        assert_eq!(t.on_message(11, p(11)), Err(Violation::Dup(11)));
        // Resumed from the stored cursor: re-delivery is fine, and a seq never seen (an own
        // send whose SendOk was lost) is new.
        let mut t = SeqTracker::start(0);
        t.on_message(1, p(1)).unwrap();
        t.on_message(3, p(3)).unwrap();
        t.new_session(true);
        assert!(t.is_redelivery(1) && !t.is_redelivery(2) && t.is_redelivery(3));
        assert_eq!(t.on_message(1, p(1)), Ok(Seen::Old));
        assert_eq!(t.on_message(2, p(2)), Ok(Seen::New));
        assert_eq!(t.on_message(3, p(3)), Ok(Seen::Old));
        assert_eq!(t.on_message(4, p(4)), Ok(Seen::New));
        assert_eq!(t.holes(), 0);
        // ...but order still holds within the session.
        assert_eq!(t.on_message(4, p(4)), Err(Violation::Dup(4)));
    }

    #[test]
    fn a_seq_that_comes_again_must_carry_the_same_message() {
        let mut t = SeqTracker::start(5);
        assert_eq!(t.on_message(6, p(6)), Ok(Seen::New));
        assert_eq!(t.on_send_ok(7, false, p(7)), Ok(Seen::New));
        assert_eq!(t.on_message(8, p(8)), Ok(Seen::New));
        t.new_session(true);
        // History from before the run has no print to compare with.
        assert_eq!(t.on_message(5, p(99)), Ok(Seen::Old));
        // A re-delivery of 6 with another message under it.
        assert_eq!(t.on_message(6, p(99)), Err(Violation::Changed(6)));
        // The own send, re-delivered as it was sent.
        assert_eq!(t.on_message(7, p(7)), Ok(Seen::Old));
        // A duplicate SendOk naming a seq that holds another message.
        assert_eq!(t.on_send_ok(8, true, p(99)), Err(Violation::Changed(8)));
        assert_eq!(t.on_send_ok(8, true, p(8)), Ok(Seen::Old));
        // A Sync page: what is stored under a seen seq must be what was seen.
        assert_eq!(t.check_stored(8, p(8)), Ok(()));
        assert_eq!(t.check_stored(6, p(99)), Err(Violation::Changed(6)));
        assert_eq!(t.check_stored(9, p(99)), Ok(()));
    }

    #[test]
    fn a_hole_in_a_sync_page_is_one_unseen_seq() {
        let mut t = SeqTracker::start(0);
        for s in [1, 2, 4] {
            t.on_message(s, p(s)).unwrap();
        }
        // Asked after 2: the server has 3, 4 and 5; 3 and 5 were never seen.
        assert_eq!(t.unseen([3, 4, 5]), 2);
        // A page that stops short of the hole still counts it.
        assert_eq!(t.unseen([]), 1);
    }

    #[test]
    fn roster_numbers_devices_user_by_user() {
        let r = Roster::new(&[2, 1, 3]);
        assert_eq!(r.users(), 3);
        assert_eq!(r.device(0), Some((0, 0)));
        assert_eq!(r.device(1), Some((0, 1)));
        assert_eq!(r.device(2), Some((1, 0)));
        assert_eq!(r.device(5), Some((2, 2)));
        assert_eq!(r.device(6), None);
        assert_eq!(r.gidx(2, 2), Some(5));
        assert_eq!(r.gidx(1, 1), None);
        // From user 0's second device to user 2: user 2's three devices and user 0's first.
        assert_eq!(r.receivers(1, 2), vec![(0, 0), (2, 0), (2, 1), (2, 2)]);
        // To its own user: only the other device.
        assert_eq!(r.receivers(1, 0), vec![(0, 0)]);
    }

    #[test]
    fn ledger_finds_missing_extra_and_swapped() {
        // Sender device 1 (user 1 of three single-device users) sends to user 2 ten times;
        // one device of user 2 receives them.
        let mut send = Ledger::new(3);
        let mut recv = Ledger::new(3);
        for c in 0..10 {
            send.expect(1, c, 2, &[(2, 0)]);
            recv.got(1, c, 2, (2, 0));
        }
        let mut all = send.clone();
        all.merge(&recv);
        assert_eq!(
            all.check(),
            LedgerCheck {
                expected: 10,
                got: 10,
                ..LedgerCheck::default()
            }
        );

        assert_eq!(send.check().missing, 10);

        let mut extra = all.clone();
        extra.got(1, 3, 2, (2, 0));
        assert_eq!(extra.check().extra, 1);

        let mut swapped = send.clone();
        for c in 0..9 {
            swapped.got(1, c, 2, (2, 0));
        }
        swapped.got(1, 99, 2, (2, 0));
        let c = swapped.check();
        assert_eq!((c.missing, c.extra, c.mismatched), (0, 0, 1));

        // A message without SendOk may or may not arrive.
        let mut unk = all.clone();
        unk.unknown(1, 1);
        unk.got(1, 10, 2, (2, 0));
        assert_eq!(unk.check().extra, 0);
    }

    #[test]
    fn ledger_finds_a_delivery_at_the_wrong_device_or_naming_the_wrong_recipient() {
        // User 0 sends to user 1; users 1 and 2 have two devices each.
        let mut base = Ledger::new(5);
        base.expect(0, 7, 1, &[(1, 0), (1, 1)]);

        // Stored in a third user's inbox: user 2's devices get it, user 1's do not.
        let mut third = base.clone();
        third.got(0, 7, 1, (2, 0));
        third.got(0, 7, 1, (2, 1));
        assert_eq!(third.check().mismatched, 1);

        // One device gets it twice, the other never.
        let mut twice = base.clone();
        twice.got(0, 7, 1, (1, 0));
        twice.got(0, 7, 1, (1, 0));
        assert_eq!(twice.check().mismatched, 1);

        // The right devices, but the copy names another recipient.
        let mut to = base.clone();
        to.got(0, 7, 1, (1, 0));
        to.got(0, 7, 2, (1, 1));
        assert_eq!(to.check().mismatched, 1);

        let mut right = base.clone();
        right.got(0, 7, 1, (1, 1));
        right.got(0, 7, 1, (1, 0));
        assert_eq!(
            right.check(),
            LedgerCheck {
                expected: 2,
                got: 2,
                ..LedgerCheck::default()
            }
        );
    }

    /// Users 0..4 with one device each, except user 1 with two (devices 1 and 2).
    fn shape() -> Shape {
        Shape {
            run: 0xBEEF,
            uid_prefix: "p".into(),
            size: 48,
            roster: Roster::new(&[1, 2, 1, 1]),
            groups: Groups::default(),
        }
    }

    /// What device `sender` sends to user `to`, as the server delivers it.
    fn msg(s: &Shape, sender: u32, counter: u64, to: u32) -> proto::Message {
        let (su, sd) = s.roster.device(sender).unwrap();
        let mut content = Vec::new();
        Header {
            run: s.run,
            sender,
            counter,
            ts_ns: 12_345,
        }
        .write(s.size, &mut content);
        proto::Message {
            seq: 1,
            from_uid: im::uid(&s.uid_prefix, su),
            to_uid: im::uid(&s.uid_prefix, to),
            client_msg_id: im::client_msg_id(s.run, sender, counter),
            content,
            server_time_ms: 1,
            from_device: im::device_id(sd),
            group_id: String::new(),
        }
    }

    #[test]
    fn check_finds_every_field_that_is_not_what_was_sent() {
        let s = shape();
        let mut scratch = Vec::new();
        let mut check = |m: &proto::Message, me: u32| s.check(m, me, &mut scratch);
        let good = msg(&s, 2, 5, 3);
        assert!(matches!(check(&good, 3), Delivery::Ok(h) if h.sender == 2 && h.counter == 5));
        // The copy for the sender's other device: in its own user's inbox.
        assert!(matches!(check(&good, 1), Delivery::Ok(_)));
        // In the inbox of user 0, who neither sent it nor is its recipient.
        assert_eq!(check(&good, 0), Delivery::Wrong(Wrong::Misrouted));
        // to_uid names another user than the inbox's.
        let mut m = good.clone();
        m.to_uid = im::uid(&s.uid_prefix, 0);
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Misrouted));
        m.to_uid = "pu3x".into();
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Misrouted));

        let mut m = good.clone();
        m.from_uid = im::uid(&s.uid_prefix, 0);
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Fields));
        let mut m = good.clone();
        m.from_device = im::device_id(0);
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Fields));
        let mut m = good.clone();
        m.client_msg_id = im::client_msg_id(s.run, 2, 6);
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Fields));

        // A byte of the payload changed, a byte more, a byte less.
        let mut m = good.clone();
        m.content[40] ^= 1;
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Corrupt));
        let mut m = good.clone();
        m.content.push(b'.');
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Corrupt));
        let mut m = good.clone();
        m.content.pop();
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Corrupt));
        // Content that is no bench message at all is corrupt, not someone else's.
        let mut m = good.clone();
        m.content = b"hello, this is not a bench message".to_vec();
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Corrupt));
        // A sender index no device of the run has.
        let mut m = good.clone();
        m.content[8] = 200;
        assert_eq!(check(&m, 3), Delivery::Wrong(Wrong::Corrupt));
        // A bench message of another run is history, not this run's business.
        let mut m = good.clone();
        m.content[4] ^= 1;
        assert_eq!(check(&m, 3), Delivery::Foreign);
    }

    #[test]
    fn group_messages_go_to_the_other_members_of_their_group_only() {
        // Group 0: users 0 and 1 (user 1 with two devices); group 1: users 2 and 3.
        let mut s = shape();
        s.groups =
            Groups::new(vec!["gA".into(), "gB".into()], vec![vec![0, 1], vec![2, 3]]).unwrap();
        assert!(Groups::new(vec!["x".into(), "y".into()], vec![vec![0], vec![0]]).is_err());
        // From user 1's second device (index 2): user 0 and user 1's first device.
        assert_eq!(s.receivers(2, GROUP_BASE), vec![(0, 0), (1, 0)]);
        assert_eq!(s.receivers(3, GROUP_BASE + 1), vec![(3, 0)]);
        let mut good = msg(&s, 2, 5, 0);
        good.to_uid.clear();
        good.group_id = "gA".into();
        assert_eq!(s.target_of(&good), Some(GROUP_BASE));
        let mut scratch = Vec::new();
        let mut check = |m: &proto::Message, me: u32| s.check(m, me, &mut scratch);
        assert!(matches!(check(&good, 0), Delivery::Ok(_)));
        assert!(matches!(check(&good, 1), Delivery::Ok(_)));
        // A user of the other group.
        assert_eq!(check(&good, 2), Delivery::Wrong(Wrong::Misrouted));
        // A group message that also names a user.
        let mut m = good.clone();
        m.to_uid = im::uid(&s.uid_prefix, 0);
        assert_eq!(check(&m, 0), Delivery::Wrong(Wrong::Misrouted));
        // Another group, or one the run does not have.
        for g in ["gB", "gC"] {
            let mut m = good.clone();
            m.group_id = g.into();
            assert_eq!(check(&m, 0), Delivery::Wrong(Wrong::Misrouted), "{g}");
        }
        // From a sender who is not a member.
        let mut m = msg(&s, 3, 1, 0);
        m.to_uid.clear();
        m.group_id = "gA".into();
        assert_eq!(check(&m, 0), Delivery::Wrong(Wrong::Misrouted));
    }

    #[test]
    fn prints_tell_messages_apart_by_every_field() {
        let s = shape();
        let good = msg(&s, 2, 5, 3);
        let base = print_of(&good);
        assert_ne!(base, 0);
        let mut m = good.clone();
        m.seq = 9;
        m.server_time_ms = 9;
        assert_eq!(print_of(&m), base);
        for f in 0..6 {
            let mut m = good.clone();
            match f {
                0 => m.content[40] ^= 1,
                1 => m.from_uid.push('x'),
                2 => m.to_uid.push('x'),
                3 => m.client_msg_id.push('x'),
                4 => m.from_device.push('x'),
                _ => m.group_id.push('x'),
            }
            assert_ne!(print_of(&m), base, "field {f}");
        }
        // A field's bytes do not run into the next one's.
        assert_ne!(
            print(b"", "ab", "c", "", "", ""),
            print(b"", "a", "bc", "", "", "")
        );
    }
}
