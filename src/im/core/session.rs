//! Connections and who is on them: opening, login (token, device id, the device limit,
//! replacing an older connection of the same device), closing, and the registry of each
//! user's online devices.

use std::collections::VecDeque;
use std::sync::Arc;

use super::reads::{LoginFacts, ReadRequest, Waiter};
use super::route::ClusterOp;
use super::{
    error, frame, valid_id, Bucket, ConnId, Core, Device, Now, Output, Requester, Session,
    CLOSE_REPLACED, STORE_UNAVAILABLE,
};
use crate::im::proto::{self, server_frame, ErrorCode};
use crate::store::ReadError;
use crate::ws::code;

impl Core {
    /// A new connection on the IM endpoint (not logged in yet).
    pub fn on_open(&mut self, conn: ConnId, now: Now) {
        self.sessions.insert(
            conn,
            Session {
                device: None,
                bucket: Bucket {
                    tokens: self.cfg.rate_burst,
                    at_ms: now.mono_ms,
                },
                bad_in_row: 0,
                room: self.cfg.output_room,
                busy: None,
            },
        );
    }

    pub fn is_logged_in(&self, conn: ConnId) -> bool {
        self.sessions.get(&conn).is_some_and(|s| s.device.is_some())
    }

    /// Device ids of `uid` online now, sorted.
    pub fn online_devices(&self, uid: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .users
            .get(uid)
            .map(|u| u.devices.keys().map(|d| d.to_string()).collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The connection is gone (closed, timed out, shutdown).
    pub fn on_close(&mut self, conn: ConnId) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        // Its answers still waiting for a commit would reach whoever the shell gives its key
        // next; the sends stay accepted, and a retry is answered as a duplicate.
        let batches = self.in_flight.iter_mut().map(|f| &mut f.requesters);
        for r in batches.chain([&mut self.requesters]).flatten() {
            if matches!(r, Some(Requester::Conn { conn: c, .. }) if *c == conn) {
                *r = None;
            }
        }
        let Some(dev) = session.device else {
            return;
        };
        let Some(user) = self.users.get_mut(&dev.uid) else {
            return;
        };
        if user.devices.get(&dev.device_id) == Some(&conn) {
            user.devices.remove(&dev.device_id);
            let last = user.devices.is_empty();
            if self.cfg.cluster {
                self.route(ClusterOp::Device {
                    uid: dev.uid.clone(),
                    device: dev.device_id,
                    on: false,
                });
            } else if last {
                self.broadcast_offline(&dev.uid);
            }
            if last {
                self.maybe_evict(&dev.uid);
            }
        }
    }

    /// A Login on a connection not logged in yet: on success the device is registered (a
    /// connection of the same device is kicked), LoginOk names the online friends, and the
    /// stream resumes from `last_seq` or the stored cursor.
    pub(super) fn login(&mut self, conn: ConnId, id: u64, l: proto::Login, now: Now) {
        let now_secs = u64::try_from(now.unix_ms / 1000).unwrap_or(0);
        let uid = match self.verifier.verify(&l.token, now_secs) {
            Ok(uid) => uid,
            Err(e) => return self.fail_login(conn, id, ErrorCode::Unauthenticated, e.message()),
        };
        if !valid_id(&l.device_id) {
            return self.fail_login(
                conn,
                id,
                ErrorCode::Unauthenticated,
                "device_id must be 1-64 bytes",
            );
        }
        let uid = self.cache_user(&uid);
        if let Some(u) = self.users.get_mut(&uid) {
            u.logins += 1;
        }
        let device_id: Arc<str> = l.device_id.as_str().into();
        let req = ReadRequest::Login {
            uid: uid.clone(),
            device_id: device_id.clone(),
        };
        let waiter = Waiter::Login {
            conn,
            id,
            uid,
            device_id,
            last_seq: l.last_seq,
        };
        let rid = self.request(req, waiter);
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.busy = Some(rid);
        }
    }

    /// The store's answer to a login of `conn` (None once it has closed): the device is
    /// registered (a connection of the same device is kicked), LoginOk names the online
    /// friends, and the stream resumes from `last_seq` or the stored cursor.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn login_read(
        &mut self,
        conn: Option<ConnId>,
        id: u64,
        uid: Arc<str>,
        device_id: Arc<str>,
        last_seq: u64,
        facts: Result<LoginFacts, ReadError>,
        now: Now,
    ) {
        if let Some(u) = self.users.get_mut(&uid) {
            u.logins -= 1;
        }
        let (conn, facts) = match (conn, facts) {
            (Some(conn), Ok(facts)) => (conn, facts),
            (Some(conn), Err(e)) => {
                log::error!("{e}: user {uid} not logged in");
                self.login_unavailable(conn, id);
                return self.maybe_evict(&uid);
            }
            (None, _) => return self.maybe_evict(&uid),
        };
        // What the devices here did not know yet; the device logging in learns it in LoginOk.
        if let Some(read) = &facts.presence {
            self.presence_read(&uid, &facts.friends, read);
        }
        // Kept while its login was read.
        let Some(user) = self.users.get_mut(&uid) else {
            return;
        };
        // Commits answered while the login was read may have named newer seqs already.
        if facts.max_seq > user.committed_seq {
            user.committed_seq = facts.max_seq;
            user.recent.clear();
        }
        let replaced = user.devices.get(&device_id).copied();
        if replaced.is_none() && user.devices.len() >= self.cfg.max_devices {
            self.maybe_evict(&uid);
            return self.fail_login(conn, id, ErrorCode::Forbidden, "too many devices");
        }
        let first_device = user.devices.is_empty();
        if first_device {
            user.friends.clone_from(&facts.friends);
        }
        user.devices.insert(device_id.clone(), conn);
        let committed = user.committed_seq;
        if let Some(old) = replaced {
            if let Some(s) = self.sessions.get_mut(&old) {
                s.device = None;
            }
            self.kick(old);
        }
        let cursor = if last_seq > 0 { last_seq } else { facts.cursor }.min(committed);
        // Recorded before the login is announced, so that the node whose connection this
        // login kicks records that one gone after this one is on.
        self.route(ClusterOp::Device {
            uid: uid.clone(),
            device: device_id.clone(),
            on: true,
        });
        let claim = self.announce_login(&uid, &device_id);
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.device = Some(Device {
                uid: uid.clone(),
                device_id,
                sent_upto: cursor,
                acked: cursor,
                progress_ms: now.mono_ms,
                own: VecDeque::new(),
                reading: None,
                claim,
            });
        }
        let online_friends = facts
            .friends
            .iter()
            .filter(|f| match facts.presence {
                Some(_) => self
                    .users
                    .get(&uid)
                    .is_some_and(|u| u.presence.get(f.as_str()).is_some_and(|p| p.online)),
                None => self.is_online(f),
            })
            .cloned()
            .collect();
        self.reply(
            conn,
            frame(
                id,
                server_frame::Body::LoginOk(proto::LoginOk {
                    uid: uid.to_string(),
                    max_seq: committed,
                    online_friends,
                    server_time_ms: now.unix_ms,
                    groups: facts.groups,
                }),
            ),
        );
        if first_device && replaced.is_none() && !self.cfg.cluster {
            for friend in &facts.friends {
                self.tell_presence(friend, &uid, true);
            }
        }
        self.pump(conn, now);
    }

    /// Tells `conn`, whose device logged in again elsewhere, and closes it (4000).
    pub(super) fn kick(&mut self, conn: ConnId) {
        self.reply(
            conn,
            frame(
                0,
                server_frame::Body::Kicked(proto::Kicked {
                    reason: "logged in elsewhere with the same device_id".into(),
                }),
            ),
        );
        self.out.push(Output::Close {
            conn,
            code: CLOSE_REPLACED,
            reason: "replaced",
        });
    }

    /// A login the store could not serve: UNAVAILABLE, then 1011 (the client may retry).
    fn login_unavailable(&mut self, conn: ConnId, id: u64) {
        self.reply(conn, error(id, ErrorCode::Unavailable, STORE_UNAVAILABLE));
        self.out.push(Output::Close {
            conn,
            code: code::INTERNAL_ERROR,
            reason: "store unavailable",
        });
    }

    /// Refuses a login with `code`, then closes the connection as a policy violation.
    fn fail_login(&mut self, conn: ConnId, id: u64, code: ErrorCode, why: &str) {
        self.reply(conn, error(id, code, why));
        self.out.push(Output::Close {
            conn,
            code: code::POLICY_VIOLATION,
            reason: "login refused",
        });
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::{closes, error_code, frames_to, messages_to, H, SECRET};
    use super::*;
    use crate::im::auth::tests::{token, token_with_nbf};
    use crate::im::core::ImConfig;
    use crate::im::core::{ReadAnswer, ReadRequest};
    use crate::im::proto::{client_frame::Body as C, server_frame::Body as S};

    #[test]
    fn login_rules() {
        let mut h = H::new(ImConfig::default());
        let out = h.login(1, "alice", "phone", 0);
        let Some(S::LoginOk(ok)) = frames_to(&out, 1).into_iter().next() else {
            panic!("{out:?}")
        };
        assert_eq!((ok.uid.as_str(), ok.max_seq), ("alice", 0));
        // A second login on the same connection.
        let out = h.req(
            1,
            2,
            C::Login(proto::Login {
                token: "x".into(),
                device_id: "d".into(),
                last_seq: 0,
            }),
        );
        assert_eq!(error_code(&out, 1), Some(ErrorCode::BadRequest));
        assert!(closes(&out).is_empty());
        // Requests before login are refused but the connection stays.
        h.core.on_open(2, h.now);
        let out = h.req(2, 3, C::Ping(proto::Ping { client_time_ms: 5 }));
        assert_eq!(error_code(&out, 2), Some(ErrorCode::Unauthenticated));
        assert!(closes(&out).is_empty());
        // A bad token, an expired one, a bad device id: UNAUTHENTICATED, then close 1008.
        for (tok, device) in [
            ("garbage".to_owned(), "d"),
            (token(SECRET, "bob", Some(1)), "d"),
            (token(b"wrong", "bob", Some(u64::MAX / 2)), "d"),
            (token(SECRET, "bob", Some(u64::MAX / 2)), ""),
            (token(SECRET, "bob", Some(u64::MAX / 2)), &"d".repeat(65)),
        ] {
            let out = h.req(
                2,
                4,
                C::Login(proto::Login {
                    token: tok,
                    device_id: device.into(),
                    last_seq: 0,
                }),
            );
            assert_eq!(error_code(&out, 2), Some(ErrorCode::Unauthenticated));
            assert_eq!(closes(&out), vec![(2, code::POLICY_VIOLATION)]);
        }
    }

    #[test]
    fn a_token_not_yet_valid_is_refused_with_its_reason() {
        let mut h = H::new(ImConfig::default());
        let now = (h.now.unix_ms / 1000) as u64;
        let login = |h: &mut H, conn, nbf| {
            h.core.on_open(conn, h.now);
            h.req(
                conn,
                1,
                C::Login(proto::Login {
                    token: token_with_nbf(SECRET, "alice", Some(nbf), Some(now + 7200)),
                    device_id: "phone".into(),
                    last_seq: 0,
                }),
            )
        };
        let out = login(&mut h, 1, now + 3600);
        match frames_to(&out, 1).as_slice() {
            [S::Error(e)] => {
                assert_eq!(e.code, ErrorCode::Unauthenticated as i32);
                assert_eq!(e.message, "token not yet valid");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(closes(&out), vec![(1, code::POLICY_VIOLATION)]);
        let out = login(&mut h, 2, now);
        assert!(
            matches!(frames_to(&out, 2).first(), Some(S::LoginOk(_))),
            "{out:?}"
        );
    }

    #[test]
    fn online_devices_are_the_logged_in_ones() {
        let mut h = H::new(ImConfig::default());
        assert!(h.core.online_devices("alice").is_empty());
        h.login(1, "alice", "phone", 0);
        h.login(2, "alice", "laptop", 0);
        let mut devices = h.core.online_devices("alice");
        devices.sort();
        assert_eq!(devices, vec!["laptop".to_owned(), "phone".to_owned()]);
        h.core.on_close(1);
        assert_eq!(h.core.online_devices("alice"), vec!["laptop".to_owned()]);
        assert!(h.core.online_devices("bob").is_empty());
    }

    #[test]
    fn device_limit() {
        let mut h = H::new(ImConfig {
            max_devices: 2,
            ..ImConfig::default()
        });
        h.login(1, "alice", "a", 0);
        h.login(2, "alice", "b", 0);
        let out = h.login(3, "alice", "c", 0);
        assert_eq!(error_code(&out, 3), Some(ErrorCode::Forbidden));
        assert_eq!(closes(&out), vec![(3, code::POLICY_VIOLATION)]);
    }

    #[test]
    fn an_answer_waiting_for_a_commit_never_reaches_the_next_connection_with_that_key() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        h.core.on_close(1);
        // The shell gives the key to a new connection before the batch commits.
        let out = h.login(1, "carol", "phone", 0);
        let to_new: Vec<S> = frames_to(&out, 1);
        assert!(
            matches!(to_new.as_slice(), [S::LoginOk(_)]),
            "only carol's LoginOk: {to_new:?}"
        );
        // The send itself was accepted and stored.
        let out = h.login(2, "alice", "laptop", 0);
        assert!(frames_to(&out, 2)
            .iter()
            .any(|f| matches!(f, S::LoginOk(ok) if ok.max_seq == 1)));
    }

    #[test]
    fn a_connection_whose_login_is_being_read_takes_no_input_until_the_answer() {
        let mut h = H::new(ImConfig::default());
        h.login_pending(1, "alice", "phone");
        assert!(
            h.core.drain_output().next().is_none(),
            "no answer before the read"
        );
        assert!(h.core.is_waiting(1) && !h.core.has_room(1));
        let Some((rid, req)) = h.core.poll_read() else {
            panic!("no read put out")
        };
        assert!(matches!(req, ReadRequest::Login { ref uid, .. } if &**uid == "alice"));
        let answer = req.run(&h.store);
        assert_eq!(h.core.handle_read(rid, answer.clone(), h.now), Some(1));
        assert!(!h.core.is_waiting(1) && h.core.is_logged_in(1));
        // The same answer again (a stale one) changes nothing.
        assert_eq!(h.core.handle_read(rid, answer, h.now), None);
    }

    #[test]
    fn a_message_committed_while_the_login_is_read_is_delivered_though_the_read_missed_it() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login_pending(2, "bob", "phone");
        let (rid, req) = h.core.poll_read().unwrap();
        // The read runs before the commit; its answer arrives after the commit's.
        let answer = req.run(&h.store);
        assert!(matches!(&answer, ReadAnswer::Login(Ok(f)) if f.max_seq == 0));
        h.send(1, "bob", "m1", "hi");
        h.core.handle_read(rid, answer, h.now);
        let mut out: Vec<Output> = h.core.drain_output().collect();
        out.extend(h.turn());
        assert!(frames_to(&out, 2)
            .iter()
            .any(|f| matches!(f, S::LoginOk(ok) if ok.max_seq == 1)));
        assert_eq!(messages_to(&out, 2), vec![(1, "hi".into())]);
    }

    #[test]
    fn a_login_answered_after_its_connection_closed_registers_nothing() {
        let mut h = H::new(ImConfig::default());
        h.login_pending(1, "alice", "phone");
        let (rid, req) = h.core.poll_read().unwrap();
        h.core.on_close(1);
        // The key is given to a new connection before the answer comes.
        h.core.on_open(1, h.now);
        assert_eq!(h.core.handle_read(rid, req.run(&h.store), h.now), None);
        assert!(h.core.drain_output().next().is_none());
        assert!(!h.core.is_logged_in(1));
        assert!(h.core.online_devices("alice").is_empty());
        assert!(
            !h.core.users.contains_key("alice"),
            "its cache outlived the login"
        );
    }
}
