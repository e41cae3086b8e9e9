//! Accepting a message, from a client's SendMessage or the admin API: validation, the rate
//! limit, and the send (with the inboxes it goes to) in the turn's batch. The store dedupes
//! it by client_msg_id and gives it its seqs; it is acknowledged only once that batch is
//! durable (see `batch`).

use std::sync::Arc;

use super::groups::is_in;
use super::{
    error, frame, valid_id, AdminSendError, ConnId, Core, Now, Output, Requester, Target,
    STORE_UNAVAILABLE,
};
use crate::im::proto::{self, server_frame, ErrorCode};
use crate::im::wire;
use crate::store::NewSend;

/// A group send whose group's members are not cached.
#[derive(Debug)]
struct NotCached;

impl Core {
    /// A client's SendMessage: refused at once if over the rate limit, malformed, too large
    /// or to a group the sender is not a member of; otherwise accepted (or recognised as a
    /// duplicate) and acknowledged once durable.
    pub(super) fn send(&mut self, conn: ConnId, id: u64, s: proto::SendMessage, now: Now) {
        if !self.take_token(conn, now) {
            return self.reply(conn, error(id, ErrorCode::RateLimited, "too many messages"));
        }
        let Some(to) = Target::of(&s.to_uid, &s.group_id) else {
            return self.reply(
                conn,
                error(
                    id,
                    ErrorCode::BadRequest,
                    "set exactly one of to_uid and group_id",
                ),
            );
        };
        if !to.is_valid() || !valid_id(&s.client_msg_id) {
            return self.reply(
                conn,
                error(
                    id,
                    ErrorCode::BadRequest,
                    "to_uid, group_id and client_msg_id must be 1-64 bytes",
                ),
            );
        }
        if s.content.len() > self.cfg.max_content_bytes {
            return self.reply(conn, error(id, ErrorCode::TooLarge, "content too large"));
        }
        let Some((from, device)) = self
            .sessions
            .get(&conn)
            .and_then(|s| s.device.as_ref())
            .map(|d| (d.uid.clone(), d.device_id.clone()))
        else {
            return;
        };
        if let Target::Group(gid) = to {
            match self.cached_members(gid) {
                Some(m) if is_in(&m, &from) => {}
                Some(_) => {
                    return self.reply(
                        conn,
                        error(id, ErrorCode::Forbidden, "not a member of this group"),
                    )
                }
                None => {
                    return self.reply(conn, error(id, ErrorCode::Unavailable, STORE_UNAVAILABLE))
                }
            }
        }
        let accepted = self.accept_send(
            from,
            &device,
            to,
            s.client_msg_id,
            s.content,
            now,
            Requester::Conn { conn, id },
        );
        if accepted.is_err() {
            self.reply(conn, error(id, ErrorCode::Unavailable, STORE_UNAVAILABLE));
        }
    }

    /// Takes one send from the connection's token bucket, refilled at `rate_per_sec` up to
    /// `rate_burst`; false when it is empty.
    pub(super) fn take_token(&mut self, conn: ConnId, now: Now) -> bool {
        let (rate, burst) = (self.cfg.rate_per_sec, self.cfg.rate_burst);
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        let b = &mut s.bucket;
        let elapsed = now.mono_ms.saturating_sub(b.at_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * rate).min(burst);
        b.at_ms = now.mono_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// A send on a user's (or the system's) behalf from the admin API, with the same
    /// validation, durability and dedupe as a client send; to a group, `from_uid` need not be
    /// a member. `Output::AdminSent` answers it.
    ///
    /// Errors: [`AdminSendError::Invalid`] for bad ids or content,
    /// [`AdminSendError::NoSuchGroup`] for a group without members,
    /// [`AdminSendError::Unavailable`] when the group's members are not cached (see
    /// [`Core::warm_group`]; nothing is stored).
    #[allow(clippy::too_many_arguments)]
    pub fn admin_send(
        &mut self,
        admin: usize,
        from_uid: &str,
        to: Target<'_>,
        client_msg_id: String,
        content: Vec<u8>,
        now: Now,
    ) -> Result<(), AdminSendError> {
        if !valid_id(from_uid) || !to.is_valid() || !valid_id(&client_msg_id) {
            return Err(AdminSendError::Invalid(
                "from_uid, to_uid (or to_group) and client_msg_id must be 1-64 bytes",
            ));
        }
        if content.len() > self.cfg.max_content_bytes {
            return Err(AdminSendError::Invalid("content too large"));
        }
        if let Target::Group(gid) = to {
            match self.cached_members(gid).map(|m| m.len()) {
                Some(0) => return Err(AdminSendError::NoSuchGroup),
                Some(_) => {}
                None => return Err(AdminSendError::Unavailable),
            }
        }
        let from = match self.users.get_key_value(from_uid) {
            Some((k, _)) => k.clone(),
            None => from_uid.into(),
        };
        self.accept_send(
            from,
            "admin",
            to,
            client_msg_id,
            content,
            now,
            Requester::Admin(admin),
        )
        .map_err(|_| AdminSendError::Unavailable)
    }

    /// The answer to a send; `server_time_ms` is the message's own (what its deliveries and
    /// read marks carry).
    pub(super) fn acknowledgement(
        req: Requester,
        seq: u64,
        duplicate: bool,
        server_time_ms: i64,
    ) -> Output {
        match req {
            Requester::Conn { conn, id } => Output::Frame {
                conn,
                frame: frame(
                    id,
                    server_frame::Body::SendOk(proto::SendOk {
                        seq,
                        server_time_ms,
                        duplicate,
                    }),
                ),
            },
            Requester::Admin(admin) => Output::AdminSent {
                admin,
                seq,
                duplicate,
            },
        }
    }

    /// Queues the send with the inboxes it goes to; the store gives it its seqs (or finds
    /// it a retry) at the commit, and the acknowledgement is built from that answer. Fails,
    /// queueing nothing, when the group's members are not cached.
    #[allow(clippy::too_many_arguments)]
    fn accept_send(
        &mut self,
        from: Arc<str>,
        device: &str,
        to: Target<'_>,
        client_msg_id: String,
        content: Vec<u8>,
        now: Now,
        req: Requester,
    ) -> Result<(), NotCached> {
        let (to_uid, group_id, others) = match to {
            Target::User(uid) if uid == &*from => (uid, "", Vec::new()),
            Target::User(uid) => {
                let owner = match self.users.get_key_value(uid) {
                    Some((k, _)) => k.clone(),
                    None => uid.into(),
                };
                (uid, "", vec![owner])
            }
            Target::Group(gid) => {
                let members = self.cached_members(gid).ok_or(NotCached)?;
                let others = members.iter().filter(|u| **u != from).cloned().collect();
                ("", gid, others)
            }
        };
        let body = wire::encode_body(
            &wire::Body {
                from_uid: &from,
                to_uid,
                client_msg_id: &client_msg_id,
                content: &content,
                server_time_ms: now.unix_ms,
                from_device: device,
                group_id,
            },
            &mut self.scratch,
        );
        self.batch.sends.push(NewSend {
            from,
            client_msg_id,
            server_time_ms: now.unix_ms,
            body,
            to: others,
        });
        self.requesters.push(Some(req));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::{closes, error_code, send_ok, H};
    use super::super::ImConfig;
    use super::*;
    use crate::im::proto::{
        client_frame::Body as C, server_frame::Body as S, ClientFrame, ServerFrame,
    };
    use crate::store::StoreRead;
    use crate::ws::code;

    #[test]
    fn idempotent_send() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        let first = send_ok(&h.send(1, "bob", "same", "a"), 1).unwrap();
        let again = send_ok(&h.send(1, "bob", "same", "a"), 1).unwrap();
        assert_eq!((again.seq, again.duplicate), (first.seq, true));
        assert_eq!(h.store.max_seq("bob"), Ok(1), "nothing appended");
        // A retry while the original is still uncommitted is answered after it commits.
        for id in [20, 21] {
            h.core.on_frame(
                1,
                ClientFrame {
                    id,
                    body: Some(C::Send(proto::SendMessage {
                        to_uid: "bob".into(),
                        client_msg_id: "fresh".into(),
                        content: b"b".to_vec(),
                        group_id: String::new(),
                    })),
                },
                h.now,
            );
        }
        assert!(h.core.drain_output().next().is_none());
        let out = h.turn();
        let oks: Vec<(u64, u64, bool)> = out
            .iter()
            .filter_map(|o| match o {
                Output::Frame {
                    frame:
                        ServerFrame {
                            id,
                            body: Some(S::SendOk(s)),
                        },
                    ..
                } => Some((*id, s.seq, s.duplicate)),
                _ => None,
            })
            .collect();
        assert_eq!(oks, vec![(20, 2, false), (21, 2, true)]);
        // A retry in a later turn, while the original's batch is still being committed, is
        // answered with the original's seq once its own batch is.
        let send = |h: &mut H, id| {
            h.core.on_frame(
                1,
                ClientFrame {
                    id,
                    body: Some(C::Send(proto::SendMessage {
                        to_uid: "bob".into(),
                        client_msg_id: "later".into(),
                        content: b"c".to_vec(),
                        group_id: String::new(),
                    })),
                },
                h.now,
            )
        };
        send(&mut h, 30);
        let (first, batch) = h.core.take_batch().unwrap();
        send(&mut h, 31);
        assert!(h.core.drain_output().next().is_none());
        let (second, retry) = h.core.take_batch().unwrap();
        for (id, b) in [(first, batch), (second, retry)] {
            let sents = h.store.apply(&b);
            h.core.on_committed(id, &sents, h.now);
        }
        let acked: Vec<(u64, bool)> = h
            .core
            .drain_output()
            .filter_map(|o| match o {
                Output::Frame {
                    frame:
                        ServerFrame {
                            id,
                            body: Some(S::SendOk(s)),
                        },
                    ..
                } => Some((id, s.duplicate)),
                _ => None,
            })
            .collect();
        assert_eq!(acked, vec![(30, false), (31, true)]);
        // Validation of ids.
        let out = h.send(1, "bob", "", "x");
        assert_eq!(error_code(&out, 1), Some(ErrorCode::BadRequest));
        let out = h.send(1, &"b".repeat(65), "id", "x");
        assert_eq!(error_code(&out, 1), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn idempotency_outlives_the_session_and_covers_the_newest_thousand() {
        let mut h = H::new(ImConfig {
            rate_burst: 1e9,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        for i in 0..1100 {
            h.send(1, "bob", &format!("m{i}"), "x");
        }
        // A new session of a user the core had forgotten: its ids come from the store.
        h.close(1);
        h.login(2, "alice", "laptop", 0);
        let retry = |h: &mut H, id: &str| {
            let ok = send_ok(&h.send(2, "bob", id, "x"), 2).unwrap();
            (ok.seq, ok.duplicate)
        };
        assert_eq!(retry(&mut h, "m1099"), (1100, true));
        assert_eq!(retry(&mut h, "m100"), (101, true));
        // Older than the newest 1,000: a new message.
        assert_eq!(retry(&mut h, "m99"), (1101, false));
        assert_eq!(retry(&mut h, "m99"), (1101, true));
    }

    #[test]
    fn a_store_that_cannot_be_read_refuses_instead_of_guessing() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.member("g", "alice", true);
        let frame = |to: &str, group: &str| ClientFrame {
            id: 5,
            body: Some(C::Send(proto::SendMessage {
                to_uid: to.into(),
                client_msg_id: "m1".into(),
                content: b"x".to_vec(),
                group_id: group.into(),
            })),
        };
        // Who is in the group is unknown: nothing is queued, the sender is told.
        let body = frame("", "g").body.unwrap();
        let (out, _) = h.req_failing(1, 5, body, "g");
        assert_eq!(error_code(&out, 1), Some(ErrorCode::Unavailable));
        assert!(closes(&out).is_empty(), "the connection stays");
        assert_eq!(h.store.max_seq("alice"), Ok(0), "nothing stored");
        // Where bob's inbox ends is the store's business at the commit: the send is queued
        // without a read.
        h.core.on_frame(1, frame("bob", ""), h.now);
        assert!(h.core.poll_read().is_none());
        assert!(h.core.drain_output().next().is_none());
        assert!(send_ok(&h.turn(), 1).is_some());
        // Bob cannot log in while his inbox cannot be read: his stream could not tell what
        // is new.
        h.core.on_open(3, h.now);
        let login = h.login_frame("bob", "phone", 0);
        let (out, _) = h.req_failing(3, 1, login, "bob");
        assert_eq!(error_code(&out, 3), Some(ErrorCode::Unavailable));
        assert_eq!(closes(&out), vec![(3, code::INTERNAL_ERROR)]);
        // Once the store reads again, the group send goes through.
        assert!(send_ok(&h.group_send(1, "g", "m2", "x"), 1).is_some());
    }

    #[test]
    fn limits_rate_and_bad_frames() {
        let mut h = H::new(ImConfig {
            max_content_bytes: 4,
            rate_burst: 3.0,
            rate_per_sec: 1.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "a", 0);
        assert_eq!(
            error_code(&h.send(1, "bob", "big", "12345"), 1),
            Some(ErrorCode::TooLarge)
        );
        h.send(1, "bob", "r1", "x");
        h.send(1, "bob", "r2", "x");
        assert_eq!(
            error_code(&h.send(1, "bob", "r3", "x"), 1),
            Some(ErrorCode::RateLimited)
        );
        h.now.mono_ms += 1000;
        assert!(
            send_ok(&h.send(1, "bob", "r4", "x"), 1).is_some(),
            "the bucket refills"
        );
        for i in 1..=10 {
            h.core.on_bad_frame(1, "undecodable frame");
            let out = h.turn();
            assert_eq!(error_code(&out, 1), Some(ErrorCode::BadRequest));
            assert_eq!(
                closes(&out).is_empty(),
                i < 10,
                "closed after 10 in a row ({i})"
            );
        }
    }

    #[test]
    fn content_of_exactly_max_content_bytes_is_taken_and_one_byte_more_is_too_large() {
        let mut h = H::new(ImConfig {
            max_content_bytes: 4,
            ..ImConfig::default()
        });
        h.login(1, "alice", "a", 0);
        assert!(send_ok(&h.send(1, "bob", "m1", "1234"), 1).is_some());
        assert_eq!(
            error_code(&h.send(1, "bob", "m2", "12345"), 1),
            Some(ErrorCode::TooLarge)
        );
    }

    #[test]
    fn the_token_bucket_refills_at_rate_per_sec() {
        let mut h = H::new(ImConfig {
            rate_burst: 2.0,
            rate_per_sec: 2.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "a", 0);
        let mut n = 0;
        let mut sent = |h: &mut H| {
            n += 1;
            send_ok(&h.send(1, "bob", &format!("m{n}"), "x"), 1).is_some()
        };
        assert_eq!(
            [sent(&mut h), sent(&mut h), sent(&mut h)],
            [true, true, false]
        );
        // Half a second at 2 a second: one more send, not two.
        h.now.mono_ms += 500;
        assert_eq!([sent(&mut h), sent(&mut h)], [true, false]);
    }

    #[test]
    fn an_admin_send_needs_valid_ids_and_content_of_at_most_max_content_bytes() {
        let mut h = H::new(ImConfig {
            max_content_bytes: 4,
            ..ImConfig::default()
        });
        let mut admin_send = |from: &str, to: &str, cmid: &str, content: &str| {
            let r = h.core.admin_send(
                1,
                from,
                Target::User(to),
                cmid.into(),
                content.into(),
                h.now,
            );
            h.turn();
            r
        };
        let invalid = |r: Result<(), AdminSendError>| matches!(r, Err(AdminSendError::Invalid(_)));
        assert!(invalid(admin_send("", "bob", "m1", "x")), "no sender");
        assert!(invalid(admin_send("system", "", "m1", "x")), "no recipient");
        assert!(invalid(admin_send("system", &"b".repeat(65), "m1", "x")));
        assert!(invalid(admin_send("system", "bob", "", "x")), "no id");
        assert!(invalid(admin_send("system", "bob", "m1", "12345")));
        assert_eq!(admin_send("system", "bob", "m1", "1234"), Ok(()));
        assert_eq!(h.store.max_seq("bob"), Ok(1));
    }
}
