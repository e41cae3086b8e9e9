//! Signals: ephemeral events (typing, read marks, the backend's pushes) that reach only the
//! devices online when they are sent. Never stored, never in Sync, no batch and no answer on
//! success; a device without output room for one does not get it (a signal is not worth a
//! slow-consumer close, and it is already stale by the time the device catches up).

use super::delivery::output_cost;
use super::groups::is_in;
use super::{error, frame, ConnId, Core, Now, Target, STORE_UNAVAILABLE};
use crate::im::proto::{self, server_frame, ErrorCode, ServerFrame};

/// Most bytes of a signal's `kind`.
pub const MAX_SIGNAL_KIND: usize = 32;
/// Most bytes of a signal's `payload`.
pub const MAX_SIGNAL_PAYLOAD: usize = 256;

/// Where a backend's signal goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalTarget<'a> {
    To(Target<'a>),
    /// Every online device.
    All,
}

/// Why a signal was refused, and the code it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalError {
    BadRequest(&'static str),
    TooLarge,
    Forbidden,
    Unavailable,
}

impl SignalError {
    fn code(self) -> (ErrorCode, &'static str) {
        match self {
            SignalError::BadRequest(why) => (ErrorCode::BadRequest, why),
            SignalError::TooLarge => (
                ErrorCode::TooLarge,
                "kind is at most 32 bytes and payload at most 256",
            ),
            SignalError::Forbidden => (ErrorCode::Forbidden, "not a member of this group"),
            SignalError::Unavailable => (ErrorCode::Unavailable, STORE_UNAVAILABLE),
        }
    }
}

/// Checks the kind and payload limits.
fn check_size(kind: &str, payload: &[u8]) -> Result<(), SignalError> {
    if kind.is_empty() {
        return Err(SignalError::BadRequest("kind must be 1-32 bytes"));
    }
    if kind.len() > MAX_SIGNAL_KIND || payload.len() > MAX_SIGNAL_PAYLOAD {
        return Err(SignalError::TooLarge);
    }
    Ok(())
}

impl Core {
    /// A client's Signal: to the other online devices of `to_uid`, or of every member of
    /// `group_id` (the sender must be one). Counted against the send rate limit.
    pub(super) fn signal(&mut self, conn: ConnId, id: u64, s: proto::Signal, now: Now) {
        if !self.take_token(conn, now) {
            return self.reply(conn, error(id, ErrorCode::RateLimited, "too many messages"));
        }
        let Some((from, device)) = self
            .sessions
            .get(&conn)
            .and_then(|s| s.device.as_ref())
            .map(|d| (d.uid.clone(), d.device_id.clone()))
        else {
            return;
        };
        let conns = Target::of(&s.to_uid, &s.group_id)
            .ok_or(SignalError::BadRequest(
                "set exactly one of to_uid and group_id",
            ))
            .and_then(|to| {
                check_size(&s.kind, &s.payload)?;
                self.signal_conns(SignalTarget::To(to), Some(&from), Some(conn))
            });
        let conns = match conns {
            Ok(conns) => conns,
            Err(e) => {
                let (code, why) = e.code();
                return self.reply(conn, error(id, code, why));
            }
        };
        let signal = proto::Signal {
            from_uid: from.to_string(),
            from_device: device.to_string(),
            ..s
        };
        self.push_signal(&conns, signal);
    }

    /// A signal from the backend (admin API), from `from_uid` (may be empty). Returns how
    /// many devices it reached.
    ///
    /// Errors: [`SignalError::BadRequest`] or [`SignalError::TooLarge`] for bad ids or
    /// sizes, [`SignalError::Unavailable`] when the group's members are not cached (see
    /// [`Core::warm_group`]).
    pub fn admin_signal(
        &mut self,
        to: SignalTarget<'_>,
        from_uid: &str,
        kind: String,
        payload: Vec<u8>,
    ) -> Result<usize, SignalError> {
        check_size(&kind, &payload)?;
        let conns = self.signal_conns(to, None, None)?;
        let (to_uid, group_id) = match to {
            SignalTarget::To(Target::User(u)) => (u, ""),
            SignalTarget::To(Target::Group(g)) => ("", g),
            SignalTarget::All => ("", ""),
        };
        let signal = proto::Signal {
            to_uid: to_uid.to_owned(),
            group_id: group_id.to_owned(),
            from_uid: from_uid.to_owned(),
            from_device: String::new(),
            kind,
            payload,
        };
        Ok(self.push_signal(&conns, signal))
    }

    /// The connections a signal goes to. A group signal from `member` requires it to be
    /// one; `except` is the sending connection.
    fn signal_conns(
        &mut self,
        to: SignalTarget<'_>,
        member: Option<&str>,
        except: Option<ConnId>,
    ) -> Result<Vec<ConnId>, SignalError> {
        let bad_id = SignalError::BadRequest("to_uid and group_id must be 1-64 bytes");
        match to {
            SignalTarget::All => Ok(self
                .sessions
                .iter()
                .filter(|(_, s)| s.device.is_some())
                .map(|(c, _)| *c)
                .collect()),
            SignalTarget::To(t) if !t.is_valid() => Err(bad_id),
            SignalTarget::To(Target::User(uid)) => Ok(self.member_conns(&[uid.to_owned()], except)),
            SignalTarget::To(Target::Group(gid)) => {
                let members = self.cached_members(gid).ok_or(SignalError::Unavailable)?;
                if member.is_some_and(|uid| !is_in(&members, uid)) {
                    return Err(SignalError::Forbidden);
                }
                Ok(self.member_conns(&members, except))
            }
        }
    }

    /// Sends the signal to each connection with room for it; returns how many got it.
    fn push_signal(&mut self, conns: &[ConnId], signal: proto::Signal) -> usize {
        let f: ServerFrame = frame(0, server_frame::Body::Signal(signal));
        let cost = output_cost(prost::Message::encoded_len(&f));
        let mut sent = 0;
        for &conn in conns {
            if self.sessions.get(&conn).is_some_and(|s| s.room >= cost) {
                self.reply(conn, f.clone());
                sent += 1;
            }
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::{error_code, frames_to, H};
    use super::super::{ImConfig, Output};
    use super::*;
    use crate::im::proto::{client_frame::Body as C, server_frame::Body as S};
    use crate::store::StoreRead;

    fn signals(out: &[Output], conn: ConnId) -> Vec<proto::Signal> {
        frames_to(out, conn)
            .into_iter()
            .filter_map(|b| match b {
                S::Signal(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    fn sig(to_uid: &str, group_id: &str, kind: &str, payload: &[u8]) -> C {
        C::Signal(proto::Signal {
            to_uid: to_uid.into(),
            group_id: group_id.into(),
            kind: kind.into(),
            payload: payload.to_vec(),
            from_uid: "forged".into(),
            from_device: "forged".into(),
        })
    }

    #[test]
    fn a_signal_reaches_the_online_devices_only_and_is_never_stored() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.login(3, "bob", "laptop", 0);
        h.login(4, "alice", "laptop", 0);
        h.core.on_frame(
            1,
            crate::im::proto::ClientFrame {
                id: 5,
                body: Some(sig("bob", "", "typing", b"1")),
            },
            h.now,
        );
        assert!(h.core.take_batch().is_none(), "a signal is never written");
        let out: Vec<Output> = h.core.drain_output().collect();
        for conn in [2, 3] {
            let got = signals(&out, conn);
            assert_eq!(got.len(), 1);
            assert_eq!(
                (got[0].from_uid.as_str(), got[0].from_device.as_str()),
                ("alice", "phone"),
                "the sender is the server's to say"
            );
            assert_eq!(
                (got[0].kind.as_str(), &got[0].payload[..]),
                ("typing", &b"1"[..])
            );
        }
        assert!(frames_to(&out, 1).is_empty(), "no answer on success");
        assert!(signals(&out, 4).is_empty());
        // To oneself: the other devices.
        let out = h.req(1, 6, sig("alice", "", "read", b"17"));
        assert_eq!(signals(&out, 4).len(), 1);
        assert!(signals(&out, 1).is_empty());
        // Nobody online: nothing, and no error.
        let out = h.req(1, 7, sig("carol", "", "typing", b""));
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(h.store.max_seq("bob"), Ok(0));
        assert_eq!(h.store.max_seq("carol"), Ok(0));
    }

    #[test]
    fn a_group_signal_goes_to_the_members_but_the_sending_device() {
        let mut h = H::new(ImConfig::default());
        for uid in ["alice", "bob"] {
            h.member("g", uid, true);
        }
        h.login(1, "alice", "phone", 0);
        h.login(2, "alice", "laptop", 0);
        h.login(3, "bob", "phone", 0);
        h.login(4, "carol", "phone", 0);
        let out = h.req(1, 5, sig("", "g", "typing", b""));
        assert!(signals(&out, 1).is_empty());
        assert_eq!(signals(&out, 2).len(), 1);
        assert_eq!(signals(&out, 3)[0].group_id, "g");
        assert!(signals(&out, 4).is_empty(), "carol is not a member");
        let out = h.req(4, 6, sig("", "g", "typing", b""));
        assert_eq!(error_code(&out, 4), Some(ErrorCode::Forbidden));
        assert!(signals(&out, 1).is_empty());
    }

    #[test]
    fn signal_limits_and_bad_targets_are_refused() {
        let mut h = H::new(ImConfig {
            rate_burst: 20.0,
            rate_per_sec: 0.001,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        let long_kind = "k".repeat(MAX_SIGNAL_KIND + 1);
        let cases = [
            (sig("bob", "", &long_kind, b""), ErrorCode::TooLarge),
            (
                sig("bob", "", "k", &[0; MAX_SIGNAL_PAYLOAD + 1]),
                ErrorCode::TooLarge,
            ),
            (sig("bob", "", "", b""), ErrorCode::BadRequest),
            (sig("bob", "g", "k", b""), ErrorCode::BadRequest),
            (sig("", "", "k", b""), ErrorCode::BadRequest),
            (sig(&"u".repeat(65), "", "k", b""), ErrorCode::BadRequest),
        ];
        for (i, (body, code)) in cases.into_iter().enumerate() {
            let out = h.req(1, 10 + i as u64, body);
            assert_eq!(error_code(&out, 1), Some(code), "case {i}");
            assert!(signals(&out, 2).is_empty(), "case {i}");
        }
        let at_limit = "k".repeat(MAX_SIGNAL_KIND);
        let out = h.req(1, 20, sig("bob", "", &at_limit, &[1; MAX_SIGNAL_PAYLOAD]));
        assert_eq!(signals(&out, 2).len(), 1);
        // The rate limit is the sends': 20 tokens, 7 spent above.
        for i in 0..13 {
            assert!(error_code(&h.req(1, 30 + i, sig("bob", "", "k", b"")), 1).is_none());
        }
        let out = h.req(1, 50, sig("bob", "", "k", b""));
        assert_eq!(error_code(&out, 1), Some(ErrorCode::RateLimited));
    }

    #[test]
    fn a_backend_signal_reaches_a_user_a_group_or_everyone() {
        let mut h = H::new(ImConfig::default());
        h.member("g", "bob", true);
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.core.on_open(3, h.now);
        let push = |h: &mut H, to| {
            if let SignalTarget::To(Target::Group(g)) = to {
                h.warm(g);
            }
            let n = h
                .core
                .admin_signal(to, "ops", "notice".into(), b"hi".to_vec())
                .unwrap();
            (n, h.turn())
        };
        let (n, out) = push(&mut h, SignalTarget::All);
        assert_eq!(
            n, 2,
            "every logged-in device, not the connection still logging in"
        );
        assert!(signals(&out, 3).is_empty());
        assert_eq!(signals(&out, 1)[0].from_uid, "ops");
        let (n, out) = push(&mut h, SignalTarget::To(Target::Group("g")));
        assert_eq!((n, signals(&out, 1).len()), (1, 0));
        let (n, _) = push(&mut h, SignalTarget::To(Target::User("alice")));
        assert_eq!(n, 1);
        assert_eq!(
            h.core
                .admin_signal(SignalTarget::All, "", "k".repeat(33), vec![]),
            Err(SignalError::TooLarge)
        );
    }

    #[test]
    fn a_device_without_output_room_misses_the_signal_instead_of_being_closed() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.core.handle_room(2, 0, h.now);
        let out = h.req(1, 5, sig("bob", "", "typing", b""));
        assert!(signals(&out, 2).is_empty());
        assert!(super::super::harness::closes(&out).is_empty());
    }
}
