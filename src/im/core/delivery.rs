//! Each device's stream: its committed inbox sent in seq order from its cursor, at most the
//! delivery window beyond its cumulative ack and only while the connection has output room;
//! acks, the ack timeout, and Sync pages bounded by count, bytes and room.

use super::reads::{ReadId, ReadRequest, Waiter};
use super::{
    error, frame, ConnId, Core, Device, Now, Output, Requester, Session, STORE_UNAVAILABLE,
};
use crate::im::proto::{self, server_frame, ErrorCode};
use crate::im::wire;
use crate::store::{ReadError, StoredMessage};
use crate::ws::code;

/// Most content bytes in one SyncResult (a page holds at least one message).
pub const SYNC_MAX_BYTES: usize = 1024 * 1024;

/// How many committed messages per cached user are kept, at most, for live delivery of
/// devices that lag a little (a window that waits for an ack); messages every device has
/// been sent are dropped at once. A device that lags more reads the store, whose newest
/// messages are in memory too.
pub(super) const RECENT_KEEP: usize = 16;

impl Core {
    /// Whether the connection can take more output now (true for one the core does not
    /// know). While it cannot, the shell feeds it no input: every answer is then built only
    /// once there is room for it.
    pub fn has_room(&self, conn: ConnId) -> bool {
        self.sessions
            .get(&conn)
            .is_none_or(|s| s.room > 0 && s.busy.is_none())
    }

    /// The shell's report of how many more bytes the connection can take (its high-water mark
    /// less what is unsent, or zero while it drains). When room comes back after it ran out,
    /// the delivery window moves on. Returns whether that produced output or a read (whose
    /// answer will).
    pub fn handle_room(&mut self, conn: ConnId, room: usize, now: Now) -> bool {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        let starved = s.room == 0;
        s.room = room;
        if !starved || room == 0 || s.device.is_none() {
            return false;
        }
        let before = (self.out.len(), self.reads.len());
        self.pump(conn, now);
        (self.out.len(), self.reads.len()) != before
    }

    /// Sends the device as much of its committed inbox as the delivery window allows.
    pub(super) fn pump(&mut self, conn: ConnId, now: Now) {
        let window = self.cfg.delivery_window;
        let Some(Session {
            device: Some(dev),
            room: bytes_room,
            ..
        }) = self.sessions.get_mut(&conn)
        else {
            return;
        };
        let Some(user) = self.users.get(&dev.uid) else {
            return;
        };
        while *bytes_room > 0
            && dev.sent_upto < user.committed_seq
            && dev.sent_upto - dev.acked < window
        {
            let room = (window - (dev.sent_upto - dev.acked)) as usize;
            let first_recent = user.committed_seq + 1 - user.recent.len() as u64;
            if dev.sent_upto + 1 >= first_recent {
                let skip = (dev.sent_upto + 1 - first_recent) as usize;
                let recent = user.recent.range(skip..);
                if !send_on(dev, bytes_room, window, recent, conn, now, &mut self.out) {
                    return;
                }
            } else {
                // Older than memory holds: read from the store, no more than the room can
                // take (counting each message as at least MIN_DELIVERY_COST, so that a
                // connection with little room reads little). The stream goes on when the
                // page comes.
                if dev.reading.is_none() {
                    let limit = room.min(*bytes_room / MIN_DELIVERY_COST + 1);
                    let req = ReadRequest::Page {
                        uid: dev.uid.clone(),
                        after: dev.sent_upto,
                        limit,
                    };
                    dev.reading = Some(self.next_read);
                    self.request(req, Waiter::Stream { conn });
                }
                return;
            }
        }
    }

    /// Older messages for the stream of `conn`'s device, read for it as `rid`: sent on as
    /// far as its window and room allow, then the stream goes on. A failed read is made
    /// again in [`super::route::TIP_RETRY_MS`] (or sooner, by the next ack or commit): a
    /// device with nothing outstanding sends no ack, and its inbox may get nothing new.
    pub(super) fn stream_read(
        &mut self,
        conn: ConnId,
        rid: ReadId,
        page: Result<Vec<StoredMessage>, ReadError>,
        now: Now,
    ) {
        let window = self.cfg.delivery_window;
        // A store may show appends before their commit is answered (Redis: a commit takes
        // several round trips), among them this device's own sends, whose SendOk is not
        // built yet: the stream goes no further than what this node knows is committed.
        let committed = self
            .sessions
            .get(&conn)
            .and_then(|s| s.device.as_ref())
            .and_then(|d| self.users.get(&d.uid))
            .map_or(0, |u| u.committed_seq);
        // Another node's append to the same inbox, heard first, moves `committed` past this
        // device's own sends whose commit is still being answered: those are its own too.
        let own = match &page {
            Ok(older) => self.own_unanswered(conn, older),
            Err(_) => Vec::new(),
        };
        let Some(Session {
            device: Some(dev),
            room: bytes_room,
            ..
        }) = self.sessions.get_mut(&conn)
        else {
            return;
        };
        if dev.reading != Some(rid) {
            return;
        }
        dev.reading = None;
        let mut older = match page {
            Ok(older) => older,
            Err(e) => {
                log::warn!("{e}: older messages for a stream; reading them again soon");
                self.streams.push(conn, now);
                return;
            }
        };
        older.retain(|m| m.seq <= committed);
        for seq in own {
            if seq > dev.sent_upto && !dev.own.contains(&seq) {
                let at = dev.own.partition_point(|s| *s < seq);
                dev.own.insert(at, seq);
            }
        }
        let sent = send_on(dev, bytes_room, window, &older, conn, now, &mut self.out);
        if sent && !older.is_empty() {
            self.pump(conn, now);
        }
    }

    /// The seqs in `page` of sends of `conn` whose commit has not been answered yet.
    fn own_unanswered(&self, conn: ConnId, page: &[StoredMessage]) -> Vec<u64> {
        let Some(dev) = self.sessions.get(&conn).and_then(|s| s.device.as_ref()) else {
            return Vec::new();
        };
        let mut own = Vec::new();
        for m in page {
            let Ok(p) = wire::to_proto(m) else {
                continue;
            };
            if p.from_uid != *dev.uid || p.from_device != *dev.device_id {
                continue;
            }
            let waiting = self.in_flight.iter().any(|f| {
                f.batch.sends.iter().zip(&f.requesters).any(|(s, r)| {
                    matches!(r, Some(Requester::Conn { conn: c, .. }) if *c == conn)
                        && s.client_msg_id == p.client_msg_id
                })
            });
            if waiting {
                own.push(m.seq);
            }
        }
        own
    }

    /// A cumulative ack, capped at what was sent. One that moves the cursor is stored with the
    /// turn's batch, restarts the ack timeout and moves the window on; others are ignored.
    pub(super) fn ack(&mut self, conn: ConnId, seq: u64, now: Now) {
        let Some(dev) = self.sessions.get_mut(&conn).and_then(|s| s.device.as_mut()) else {
            return;
        };
        let seq = seq.min(dev.sent_upto);
        if seq <= dev.acked {
            return;
        }
        dev.acked = seq;
        dev.progress_ms = now.mono_ms;
        self.batch
            .cursors
            .push((dev.uid.clone(), dev.device_id.clone(), seq));
        self.pump(conn, now);
    }

    /// When the connection's ack deadline falls (loop ms), while it has messages outstanding:
    /// the shell arms its timer for it.
    pub fn ack_deadline(&self, conn: ConnId) -> Option<u64> {
        let dev = self.sessions.get(&conn)?.device.as_ref()?;
        (dev.sent_upto > dev.acked).then(|| dev.progress_ms + self.cfg.ack_timeout_ms)
    }

    /// Connections with messages outstanding and no ack progress for the ack timeout are
    /// closed (they resume on reconnect). Call from the connection's timer.
    pub fn check_ack_timeout(&mut self, conn: ConnId, now: Now) {
        let Some(dev) = self.sessions.get(&conn).and_then(|s| s.device.as_ref()) else {
            return;
        };
        if dev.sent_upto > dev.acked
            && now.mono_ms.saturating_sub(dev.progress_ms) >= self.cfg.ack_timeout_ms
        {
            self.out.push(Output::Close {
                conn,
                code: code::POLICY_VIOLATION,
                reason: "ack timeout",
            });
        }
    }

    /// Forgets the recent messages every online device of `uid` has been sent: a lagging
    /// device reads the store, and a message's body is freed while it is still in the cache.
    pub(super) fn trim_recent(&mut self, uid: &str) {
        let Some(user) = self.users.get_mut(uid) else {
            return;
        };
        let passed = user
            .devices
            .values()
            .filter_map(|c| self.sessions.get(c)?.device.as_ref())
            .map(|d| d.sent_upto)
            .min()
            .unwrap_or(u64::MAX);
        while user.recent.front().is_some_and(|m| m.seq <= passed) {
            user.recent.pop_front();
        }
    }

    /// A Sync: one page of the inbox after `after_seq`, read from the store, at most `limit`
    /// messages (100 by default, 1,000 at most). The connection's input waits for it.
    pub(super) fn sync(&mut self, conn: ConnId, id: u64, s: proto::Sync) {
        let Some((uid, room)) = self
            .sessions
            .get(&conn)
            .and_then(|s| Some((s.device.as_ref()?.uid.clone(), s.room)))
        else {
            return;
        };
        let page_bytes = SYNC_MAX_BYTES.min(room / 2);
        let limit = match s.limit {
            0 => 100,
            n => n.min(1000) as usize,
        };
        let req = ReadRequest::Page {
            uid,
            after: s.after_seq,
            limit: limit + 1,
        };
        let waiter = Waiter::Sync {
            conn,
            id,
            limit,
            page_bytes,
        };
        let rid = self.request(req, waiter);
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.busy = Some(rid);
        }
    }

    /// The page a Sync of `conn` (request `id`) read: its answer.
    pub(super) fn sync_read(
        &mut self,
        conn: ConnId,
        id: u64,
        limit: usize,
        page_bytes: usize,
        page: Result<Vec<StoredMessage>, ReadError>,
    ) {
        let mut msgs = match page {
            Ok(msgs) => msgs,
            Err(e) => {
                log::error!("{e}");
                return self.reply(conn, error(id, ErrorCode::Unavailable, STORE_UNAVAILABLE));
            }
        };
        // Bound the page by bytes too (at least one message), so that one SyncResult stays far
        // below the outbound allowance whatever the message sizes, and within the room the
        // connection has now (as JSON it can be up to twice the stored size).
        let mut bytes = 0;
        let fit = msgs
            .iter()
            .take(limit)
            .position(|m| {
                bytes += m.body.len();
                bytes > page_bytes
            })
            .unwrap_or(limit)
            .max(1);
        let has_more = msgs.len() > fit;
        msgs.truncate(fit);
        self.reply(
            conn,
            frame(
                id,
                server_frame::Body::SyncResult(proto::SyncResult {
                    messages: msgs.iter().filter_map(decode_logged).collect(),
                    has_more,
                }),
            ),
        );
    }
}

/// Sends `msgs` (in seq order; those already sent are skipped) on the device's stream while
/// its window and its connection's room allow. False when the stream stopped short: no room
/// left, or a message that does not follow on.
fn send_on<'a>(
    dev: &mut Device,
    bytes_room: &mut usize,
    window: u64,
    msgs: impl IntoIterator<Item = &'a StoredMessage>,
    conn: ConnId,
    now: Now,
    out: &mut Vec<Output>,
) -> bool {
    for m in msgs {
        if m.seq <= dev.sent_upto {
            continue;
        }
        if *bytes_room == 0 {
            return false;
        }
        if dev.sent_upto - dev.acked >= window {
            return true;
        }
        let before = out.len();
        if !advance(dev, m, conn, now, out) {
            return false;
        }
        if out.len() > before {
            *bytes_room = bytes_room.saturating_sub(output_cost(m.body.len()));
        }
    }
    true
}

/// Moves the device's stream past `m`, delivering it unless the device sent it. False when
/// `m` does not follow on: then the stream stops rather than leave a gap.
fn advance(
    dev: &mut Device,
    m: &StoredMessage,
    conn: ConnId,
    now: Now,
    out: &mut Vec<Output>,
) -> bool {
    if m.seq != dev.sent_upto + 1 {
        log::error!("inbox of {} not contiguous at {}", dev.uid, m.seq);
        return false;
    }
    if dev.sent_upto == dev.acked {
        // Nothing was outstanding: the ack timeout starts now.
        dev.progress_ms = now.mono_ms;
    }
    dev.sent_upto = m.seq;
    if dev.own.front() == Some(&m.seq) {
        dev.own.pop_front();
        // The sending device learnt this seq from its SendOk; count it as acked if nothing
        // before it is outstanding, so the window does not fill up.
        if dev.acked + 1 == m.seq {
            dev.acked = m.seq;
        }
        return true;
    }
    out.push(Output::Deliver {
        conn,
        msg: m.clone(),
    });
    true
}

/// The least a delivery is taken to cost a connection's room (see [`output_cost`]).
const MIN_DELIVERY_COST: usize = 256;

/// What an output of `encoded` protobuf bytes is taken to cost a connection's room: JSON
/// grows content by 4/3 and adds field names, and each frame has a header.
pub(super) fn output_cost(encoded: usize) -> usize {
    encoded + encoded / 2 + 64
}

/// A stored message as a protobuf struct, or None (logged) if it does not decode.
fn decode_logged(m: &StoredMessage) -> Option<proto::Message> {
    wire::to_proto(m)
        .map_err(|e| log::error!("undecodable stored message (seq {}): {e}", m.seq))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::super::harness::{closes, frames_to, messages_to, H};
    use super::super::ImConfig;
    use super::*;
    use crate::im::proto::{client_frame::Body as C, server_frame::Body as S};
    use crate::store::StoreRead;

    #[test]
    fn every_device_of_both_users_gets_it_except_the_sender() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "alice", "laptop", 0);
        h.login(3, "bob", "phone", 0);
        h.login(4, "bob", "tablet", 0);
        h.login(5, "bob", "web", 0);
        let out = h.send(1, "bob", "m1", "hello");
        assert!(messages_to(&out, 1).is_empty());
        assert_eq!(messages_to(&out, 2), vec![(1, "hello".into())]);
        for bob in [3, 4, 5] {
            assert_eq!(messages_to(&out, bob), vec![(1, "hello".into())]);
        }
    }

    #[test]
    fn offline_catch_up_cursor_resume_and_last_seq() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        for i in 1..=5 {
            h.send(1, "bob", &format!("m{i}"), &format!("t{i}"));
        }
        // Bob logs in: everything after cursor 0, in order.
        let out = h.login(2, "bob", "phone", 0);
        let got: Vec<u64> = messages_to(&out, 2).iter().map(|m| m.0).collect();
        assert_eq!(got, vec![1, 2, 3, 4, 5]);
        h.req(2, 3, C::Ack(proto::Ack { seq: 3 }));
        h.close(2);
        // Reconnect: resumes after the stored cursor.
        let out = h.login(3, "bob", "phone", 0);
        assert_eq!(
            messages_to(&out, 3).iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
        h.close(3);
        // Login.last_seq overrides the stored cursor.
        let out = h.login(4, "bob", "phone", 1);
        assert_eq!(messages_to(&out, 4).len(), 4);
        // Live messages follow the backlog without a gap.
        let out = h.send(1, "bob", "m6", "t6");
        assert_eq!(messages_to(&out, 4), vec![(6, "t6".into())]);
    }

    #[test]
    fn delivery_window_waits_for_acks_and_ack_timeout_disconnects() {
        let mut h = H::new(ImConfig {
            delivery_window: 2,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        let mut seen = Vec::new();
        for i in 1..=5 {
            let out = h.send(1, "bob", &format!("m{i}"), "x");
            seen.extend(messages_to(&out, 2).into_iter().map(|m| m.0));
        }
        assert_eq!(seen, vec![1, 2], "at most the window in flight");
        let out = h.req(2, 0, C::Ack(proto::Ack { seq: 1 }));
        assert_eq!(
            messages_to(&out, 2).iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![3]
        );
        let out = h.req(2, 0, C::Ack(proto::Ack { seq: 3 }));
        assert_eq!(
            messages_to(&out, 2).iter().map(|m| m.0).collect::<Vec<_>>(),
            vec![4, 5]
        );
        // No ack progress for the ack timeout: disconnected.
        h.now.mono_ms += 59_999;
        h.core.check_ack_timeout(2, h.now);
        assert!(closes(&h.turn()).is_empty());
        h.now.mono_ms += 1;
        h.core.check_ack_timeout(2, h.now);
        assert_eq!(closes(&h.turn()), vec![(2, code::POLICY_VIOLATION)]);
        // Nothing outstanding: never timed out.
        h.req(2, 0, C::Ack(proto::Ack { seq: 5 }));
        h.now.mono_ms += 1_000_000;
        h.core.check_ack_timeout(2, h.now);
        assert!(closes(&h.turn()).is_empty());
    }

    #[test]
    fn deliveries_stop_when_the_connection_has_no_room_and_go_on_when_it_does() {
        let mut h = H::new(ImConfig {
            output_room: 10_000,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        for i in 1..=20 {
            h.send(1, "bob", &format!("m{i}"), &"x".repeat(1000));
        }
        // Each delivery is taken to cost about 1.5 times its size: 7 fit in 10,000 bytes.
        let out = h.login(2, "bob", "phone", 0);
        let first: Vec<u64> = messages_to(&out, 2).iter().map(|m| m.0).collect();
        assert_eq!(first, (1..=7).collect::<Vec<_>>());
        assert!(
            !h.core.has_room(2),
            "no input is taken while there is no room"
        );
        // A report of no room changes nothing; room again moves the stream on, in order.
        assert!(!h.core.handle_room(2, 0, h.now));
        assert!(h.core.handle_room(2, 10_000, h.now));
        let next: Vec<u64> = messages_to(&h.turn(), 2).iter().map(|m| m.0).collect();
        assert_eq!(next, (8..=14).collect::<Vec<_>>());
        // Room reported while the stream was not starved does not deliver twice.
        assert!(h.core.handle_room(2, 100_000, h.now));
        let rest: Vec<u64> = messages_to(&h.turn(), 2).iter().map(|m| m.0).collect();
        assert_eq!(rest, (15..=20).collect::<Vec<_>>());
        assert!(!h.core.handle_room(2, 100_000, h.now));
        assert!(h.core.has_room(2));
    }

    #[test]
    fn sync_pages() {
        let mut h = H::new(ImConfig {
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        for i in 1..=150 {
            h.send(1, "alice", &format!("m{i}"), "x");
        }
        let page = |h: &mut H, after, limit| match frames_to(
            &h.req(
                1,
                5,
                C::Sync(proto::Sync {
                    after_seq: after,
                    limit,
                }),
            ),
            1,
        )
        .pop()
        {
            Some(S::SyncResult(r)) => (
                r.messages.first().map(|m| m.seq),
                r.messages.len(),
                r.has_more,
            ),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            page(&mut h, 0, 0),
            (Some(1), 100, true),
            "default limit 100"
        );
        assert_eq!(page(&mut h, 100, 0), (Some(101), 50, false));
        assert_eq!(page(&mut h, 140, 5), (Some(141), 5, true));
        assert_eq!(
            page(&mut h, 0, 5000),
            (Some(1), 150, false),
            "limit capped at 1000"
        );
        assert_eq!(page(&mut h, 150, 10), (None, 0, false));
    }

    #[test]
    fn sync_pages_are_bounded_by_bytes_too() {
        let mut h = H::new(ImConfig {
            max_content_bytes: 2 * SYNC_MAX_BYTES,
            output_room: 8 * SYNC_MAX_BYTES,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        let big = "x".repeat(SYNC_MAX_BYTES * 2 / 5);
        for i in 1..=4 {
            h.send(1, "bob", &format!("m{i}"), &big);
        }
        h.send(1, "bob", "huge", &"y".repeat(SYNC_MAX_BYTES + 1));
        let mut page = |after| {
            let out = h.req(
                1,
                5,
                C::Sync(proto::Sync {
                    after_seq: after,
                    limit: 100,
                }),
            );
            match frames_to(&out, 1).pop() {
                Some(S::SyncResult(r)) => (r.messages.len(), r.has_more),
                other => panic!("{other:?}"),
            }
        };
        // Two of 0.4 MiB fit in 1 MiB, a third would not; a message over 1 MiB comes alone.
        assert_eq!(page(0), (2, true));
        assert_eq!(page(2), (2, true));
        assert_eq!(page(4), (1, false));
    }

    #[test]
    fn a_sync_page_fits_half_the_room_and_an_answer_uses_it_up() {
        let mut h = H::new(ImConfig {
            output_room: 40_000,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        for i in 1..=30 {
            h.send(1, "alice", &format!("m{i}"), &"x".repeat(1000));
        }
        h.core.handle_room(1, 40_000, h.now);
        let page = |h: &mut H| match frames_to(
            &h.req(
                1,
                5,
                C::Sync(proto::Sync {
                    after_seq: 0,
                    limit: 1000,
                }),
            ),
            1,
        )
        .pop()
        {
            Some(S::SyncResult(r)) => (r.messages.len(), r.has_more),
            other => panic!("{other:?}"),
        };
        // Half the room is 20,000 bytes: 19 stored messages of about 1,030 bytes (a 20th
        // would pass it).
        assert_eq!(page(&mut h), (19, true));
        // Each answer uses up room (about 1.5 times its size), so the next pages shrink until
        // there is none; with no room a page still holds one message, so Sync progresses.
        let mut sizes = Vec::new();
        while h.core.has_room(1) {
            sizes.push(page(&mut h).0);
        }
        assert!(
            sizes.windows(2).all(|w| w[0] >= w[1]) && sizes[0] < 19,
            "{sizes:?}"
        );
        assert_eq!(page(&mut h), (1, true));
    }

    #[test]
    fn room_coming_back_with_nothing_to_deliver_produces_no_output() {
        let mut h = H::new(ImConfig {
            output_room: 100,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        while h.core.has_room(1) {
            h.req(1, 42, C::Ping(proto::Ping { client_time_ms: 7 }));
        }
        assert!(!h.core.handle_room(1, 10_000, h.now));
        assert!(h.turn().is_empty());
        assert!(h.core.has_room(1));
    }

    #[test]
    fn a_failed_inbox_read_is_tried_again_at_the_next_commit_not_at_a_room_report() {
        let mut h = H::new(ImConfig {
            delivery_window: 1,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        for i in 1..=20 {
            h.send(1, "bob", &format!("m{i}"), &format!("t{i}"));
        }
        // Bob has 1; 2 is no longer in memory, and the store cannot be read.
        let (out, reads) = h.req_failing(2, 0, C::Ack(proto::Ack { seq: 1 }), "bob");
        assert!(messages_to(&out, 2).is_empty());
        assert_eq!(reads.calls, 1);
        // The connection never ran out of room: a report of room is no reason to read again.
        assert!(h.core.has_room(2));
        assert!(!h.core.handle_room(2, 1024 * 1024, h.now));
        assert!(messages_to(&h.turn(), 2).is_empty());
        let out = h.send(1, "bob", "m21", "t21");
        assert_eq!(messages_to(&out, 2), vec![(2, "t2".into())]);
    }

    #[test]
    fn a_failed_inbox_read_is_made_again_by_itself_when_nothing_else_comes() {
        let mut h = H::new(ImConfig {
            delivery_window: 1,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        for i in 1..=20 {
            h.send(1, "bob", &format!("m{i}"), &format!("t{i}"));
        }
        let (out, reads) = h.req_failing(2, 0, C::Ack(proto::Ack { seq: 1 }), "bob");
        assert!(messages_to(&out, 2).is_empty());
        assert_eq!(reads.calls, 1);
        // No ack is outstanding and no send comes: only the retry moves the stream on.
        let at = h.now.mono_ms + super::super::route::TIP_RETRY_MS;
        assert_eq!(h.core.poll_timeout(), Some(at));
        h.now.mono_ms = at - 1;
        h.core.handle_timeout(h.now);
        assert!(messages_to(&h.turn(), 2).is_empty(), "read again too early");
        h.now.mono_ms = at;
        h.core.handle_timeout(h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![(2, "t2".into())]);
        assert_eq!(h.core.poll_timeout(), None);
    }

    #[test]
    fn a_connection_without_room_reads_nothing_from_the_store() {
        let mut h = H::new(ImConfig {
            output_room: 10_000,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        for i in 1..=20 {
            h.send(1, "bob", &format!("m{i}"), &"x".repeat(1000));
        }
        let out = h.login(2, "bob", "phone", 0);
        assert_eq!(messages_to(&out, 2).len(), 7);
        assert!(!h.core.has_room(2));
        // A new message to bob: his stream is far behind it, in the store, but he has no room.
        h.send_uncommitted(1, "bob", "m21", "x");
        let (out, reads) = h.turn_failing("");
        assert!(messages_to(&out, 2).is_empty());
        assert_eq!(reads.calls, 0);
    }

    #[test]
    fn a_connection_with_under_256_bytes_of_room_reads_one_message_at_a_time() {
        let mut h = H::new(ImConfig {
            output_room: 250,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        for i in 1..=10 {
            h.send(1, "bob", &format!("m{i}"), "x");
        }
        h.core.on_open(2, h.now);
        let login = h.login_frame("bob", "phone", 0);
        let (out, reads) = h.req_failing(2, 1, login, "");
        let got = messages_to(&out, 2).len();
        assert!(got >= 1, "the stream is stuck");
        assert_eq!(reads.messages, got, "read more than there was room for");
    }

    #[test]
    fn a_devices_own_messages_read_back_from_the_store_cost_it_no_room() {
        let mut h = H::new(ImConfig {
            delivery_window: 1,
            output_room: 10_000,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.send(2, "alice", "b1", "hi");
        // While 1 waits for its ack, alice's phone sends 30 of 1,000 bytes; only the newest
        // 16 of them stay in memory.
        for i in 1..=30 {
            h.send(1, "bob", &format!("m{i}"), &"x".repeat(1000));
        }
        h.req(1, 0, C::Ack(proto::Ack { seq: 1 }));
        assert!(h.core.has_room(1));
        let out = h.send(2, "alice", "b2", "yo");
        assert_eq!(messages_to(&out, 1), vec![(32, "yo".into())]);
    }

    #[test]
    fn a_devices_own_messages_take_no_window_unless_one_before_them_is_outstanding() {
        let mut h = H::new(ImConfig {
            delivery_window: 2,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        for i in 1..=3 {
            h.send(1, "bob", &format!("m{i}"), "x");
        }
        assert_eq!(h.core.ack_deadline(1), None, "her own 1 to 3 are acked");
        let out = h.send(2, "alice", "b1", "hi");
        assert_eq!(messages_to(&out, 1), vec![(4, "hi".into())]);
        // Behind 4, which she has not acked, her own 5 waits for an ack like any other.
        h.send(1, "bob", "m4", "x");
        let out = h.send(2, "alice", "b2", "yo");
        assert!(messages_to(&out, 1).is_empty(), "the window of 2 is full");
        let out = h.req(1, 0, C::Ack(proto::Ack { seq: 4 }));
        assert_eq!(messages_to(&out, 1), vec![(6, "yo".into())]);
    }

    #[test]
    fn the_ack_deadline_runs_from_the_first_delivery_after_none_was_outstanding_or_the_last_ack() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        assert_eq!(h.core.ack_deadline(2), None, "nothing outstanding");
        h.now.mono_ms += 5_000;
        h.send(1, "bob", "m1", "x");
        let first = h.now.mono_ms;
        assert_eq!(h.core.ack_deadline(2), Some(first + 60_000));
        h.now.mono_ms += 5_000;
        h.send(1, "bob", "m2", "x");
        assert_eq!(
            h.core.ack_deadline(2),
            Some(first + 60_000),
            "a further delivery is no progress"
        );
        h.now.mono_ms += 5_000;
        h.req(2, 0, C::Ack(proto::Ack { seq: 1 }));
        assert_eq!(h.core.ack_deadline(2), Some(h.now.mono_ms + 60_000));
        h.req(2, 0, C::Ack(proto::Ack { seq: 2 }));
        assert_eq!(h.core.ack_deadline(2), None);
    }

    #[test]
    fn messages_every_online_device_was_sent_leave_memory_so_a_device_logging_in_reads_the_store() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        for i in 1..=3 {
            h.send(1, "bob", &format!("m{i}"), &format!("t{i}"));
        }
        h.core.on_open(3, h.now);
        let login = h.login_frame("bob", "laptop", 0);
        let (out, reads) = h.req_failing(3, 1, login, "");
        assert_eq!(
            messages_to(&out, 3),
            vec![(1, "t1".into()), (2, "t2".into()), (3, "t3".into())]
        );
        assert_eq!(reads.calls, 1);
    }

    #[test]
    fn a_sync_page_may_fill_exactly_half_the_room() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        for i in 1..=3 {
            h.send(1, "alice", &format!("m{i}"), &"x".repeat(100));
        }
        let two: usize = h
            .store
            .messages_after("alice", 0, 2)
            .unwrap()
            .iter()
            .map(|m| m.body.len())
            .sum();
        h.core.handle_room(1, 2 * two, h.now);
        let out = h.req(
            1,
            5,
            C::Sync(proto::Sync {
                after_seq: 0,
                limit: 10,
            }),
        );
        match frames_to(&out, 1).pop() {
            Some(S::SyncResult(r)) => assert_eq!((r.messages.len(), r.has_more), (2, true)),
            other => panic!("{other:?}"),
        }
    }
}
