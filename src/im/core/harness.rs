//! A [`Core`] driven as the shell drives it, against a [`MemoryStore`], for the tests of
//! every concern: each request ends the loop turn (its batch taken, applied and reported
//! durable), and helpers pick the outputs a test asserts on.

use std::cell::Cell;

use super::{ConnId, Core, ImConfig, Now, Output};
use crate::im::auth::tests::token;
use crate::im::proto::{
    self, client_frame::Body as C, server_frame::Body as S, ClientFrame, ErrorCode,
};
use crate::im::wire;
use crate::store::memory::MemoryStore;
use crate::store::{ReadError, StoreRead, StoredMessage};

/// The key the harness signs login tokens with.
pub(super) const SECRET: &[u8] = b"test-secret";

/// The core under test, the store its batches are applied to, and the time fed to both.
pub(super) struct H {
    pub(super) core: Core,
    pub(super) store: MemoryStore,
    pub(super) now: Now,
}

impl H {
    pub(super) fn new(cfg: ImConfig) -> H {
        H {
            core: Core::new(cfg, SECRET),
            store: MemoryStore::default(),
            now: Now {
                mono_ms: 1_000,
                unix_ms: 1_700_000_000_000,
            },
        }
    }

    /// Runs a frame, then ends the loop turn: commit the batch and collect everything.
    pub(super) fn req(&mut self, conn: ConnId, id: u64, body: C) -> Vec<Output> {
        self.core.on_frame(
            conn,
            ClientFrame {
                id,
                body: Some(body),
            },
            self.now,
        );
        self.turn()
    }

    /// Ends the loop turn, and the turns after it until nothing is left to do: every read
    /// answered and every batch committed, and everything drained.
    pub(super) fn turn(&mut self) -> Vec<Output> {
        let mut out: Vec<Output> = self.core.drain_output().collect();
        loop {
            let answered = answer_reads(&mut self.core, &self.store, self.now);
            let read = !answered.is_empty();
            out.extend(answered);
            if let Some((id, batch)) = self.core.take_batch() {
                let sents = self.store.apply(&batch);
                self.core.on_committed(id, &sents, self.now);
                out.extend(self.core.drain_output());
            } else if !read {
                return out;
            }
        }
    }

    pub(super) fn login(
        &mut self,
        conn: ConnId,
        uid: &str,
        device: &str,
        last_seq: u64,
    ) -> Vec<Output> {
        self.core.on_open(conn, self.now);
        let login = self.login_frame(uid, device, last_seq);
        self.req(conn, 1, login)
    }

    /// A new connection's Login handed to the core within a turn that has not ended: its
    /// read is put out, not answered.
    pub(super) fn login_pending(&mut self, conn: ConnId, uid: &str, device: &str) {
        self.core.on_open(conn, self.now);
        let login = self.login_frame(uid, device, 0);
        self.core.on_frame(
            conn,
            ClientFrame {
                id: 1,
                body: Some(login),
            },
            self.now,
        );
    }

    /// A Login with a token for `uid` valid for an hour.
    pub(super) fn login_frame(&self, uid: &str, device: &str, last_seq: u64) -> C {
        let exp = (self.now.unix_ms / 1000) as u64 + 3600;
        C::Login(proto::Login {
            token: token(SECRET, uid, Some(exp)),
            device_id: device.into(),
            last_seq,
        })
    }

    pub(super) fn send(&mut self, conn: ConnId, to: &str, cmid: &str, text: &str) -> Vec<Output> {
        self.req(
            conn,
            7,
            C::Send(proto::SendMessage {
                to_uid: to.into(),
                client_msg_id: cmid.into(),
                content: text.as_bytes().to_vec(),
                group_id: String::new(),
            }),
        )
    }

    /// A send handed to the core within a turn that has not ended: nothing is committed.
    pub(super) fn send_uncommitted(&mut self, conn: ConnId, to: &str, cmid: &str, text: &str) {
        self.core.on_frame(
            conn,
            ClientFrame {
                id: 9,
                body: Some(C::Send(proto::SendMessage {
                    to_uid: to.into(),
                    client_msg_id: cmid.into(),
                    content: text.as_bytes().to_vec(),
                    group_id: String::new(),
                })),
            },
            self.now,
        );
    }

    /// Adds (or removes) a member and ends the turn.
    pub(super) fn member(&mut self, gid: &str, uid: &str, joined: bool) -> Vec<Output> {
        self.set_membership(gid, uid, joined)
            .expect("membership change");
        self.turn()
    }

    /// Changes a membership as the admin API does: the group's members read first unless
    /// cached. Their answer is not among the outputs.
    pub(super) fn set_membership(
        &mut self,
        gid: &str,
        uid: &str,
        joined: bool,
    ) -> Result<Option<super::BatchId>, super::MembershipError> {
        self.warm(gid);
        self.core.set_membership(gid, uid, joined)
    }

    /// Reads the members of `gid` into the cache as the admin API does, unless they are.
    pub(super) fn warm(&mut self, gid: &str) {
        if self.core.warm_group(ADMIN, gid).is_some() {
            let answered = answer_reads(&mut self.core, &self.store, self.now);
            assert!(
                answered
                    .iter()
                    .all(|o| matches!(o, Output::AdminRead { admin: ADMIN, .. })),
                "{answered:?}"
            );
        }
    }

    /// A SendMessage to group `gid`, then the end of the turn.
    pub(super) fn group_send(
        &mut self,
        conn: ConnId,
        gid: &str,
        cmid: &str,
        text: &str,
    ) -> Vec<Output> {
        self.req(
            conn,
            7,
            C::Send(proto::SendMessage {
                group_id: gid.into(),
                client_msg_id: cmid.into(),
                content: text.as_bytes().to_vec(),
                ..Default::default()
            }),
        )
    }

    pub(super) fn close(&mut self, conn: ConnId) -> Vec<Output> {
        self.core.on_close(conn);
        self.turn()
    }

    /// Runs a frame against the store as [`Failing`] for `uid` shows it, then ends the turn
    /// with the store itself. Returns the outputs and the inbox reads the frame made.
    pub(super) fn req_failing(
        &mut self,
        conn: ConnId,
        id: u64,
        body: C,
        uid: &'static str,
    ) -> (Vec<Output>, Reads) {
        let store = Failing::new(&self.store, uid);
        self.core.on_frame(
            conn,
            ClientFrame {
                id,
                body: Some(body),
            },
            self.now,
        );
        let mut out: Vec<Output> = self.core.drain_output().collect();
        out.extend(answer_reads(&mut self.core, &store, self.now));
        let reads = store.reads.get();
        out.extend(self.turn());
        (out, reads)
    }

    /// Ends the turn as [`H::turn`] does, except that the core reads the store as [`Failing`]
    /// for `uid` shows it when it hears of the commit. Also returns the inbox reads that made.
    pub(super) fn turn_failing(&mut self, uid: &'static str) -> (Vec<Output>, Reads) {
        let mut out: Vec<Output> = self.core.drain_output().collect();
        let Some((id, batch)) = self.core.take_batch() else {
            return (out, Reads::default());
        };
        let sents = self.store.apply(&batch);
        let store = Failing::new(&self.store, uid);
        self.core.on_committed(id, &sents, self.now);
        out.extend(self.core.drain_output());
        out.extend(answer_reads(&mut self.core, &store, self.now));
        (out, store.reads.get())
    }
}

/// The admin API exchange the harness's admin requests come from.
pub(super) const ADMIN: ConnId = 9_999;

/// Runs the core's reads against `store` as the read thread does, and every read they lead
/// to, until none is left; returns what the answers produced.
pub(super) fn answer_reads(core: &mut Core, store: &dyn StoreRead, now: Now) -> Vec<Output> {
    let mut out = Vec::new();
    while let Some((rid, req)) = core.poll_read() {
        let answer = req.run(store);
        core.handle_read(rid, answer, now);
        out.extend(core.drain_output());
    }
    out
}

/// The memory store, except that every read about `uid` that can fail does (none when no
/// user or group has that id); it counts the inbox reads (`messages_after`).
pub(super) struct Failing<'a> {
    inner: &'a MemoryStore,
    uid: &'static str,
    pub(super) reads: Cell<Reads>,
}

/// Inbox reads through [`Failing`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Reads {
    /// How many, failed or not.
    pub(super) calls: usize,
    /// How many messages they returned.
    pub(super) messages: usize,
}

impl<'a> Failing<'a> {
    pub(super) fn new(inner: &'a MemoryStore, uid: &'static str) -> Self {
        Failing {
            inner,
            uid,
            reads: Cell::default(),
        }
    }

    fn fail(&self, uid: &str) -> Result<(), ReadError> {
        if uid == self.uid {
            return Err(ReadError("disk on fire".into()));
        }
        Ok(())
    }
}

impl StoreRead for Failing<'_> {
    fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
        self.fail(uid)?;
        self.inner.max_seq(uid)
    }
    fn messages_after(
        &self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        let mut reads = self.reads.get();
        reads.calls += 1;
        self.reads.set(reads);
        self.fail(uid)?;
        let msgs = self.inner.messages_after(uid, after, limit)?;
        reads.messages += msgs.len();
        self.reads.set(reads);
        Ok(msgs)
    }
    fn cursor(&self, uid: &str, device_id: &str) -> u64 {
        self.inner.cursor(uid, device_id)
    }
    fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
        self.inner.cursors(uid)
    }
    fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        self.fail(uid)?;
        self.inner.recent_sends(uid)
    }
    fn friends(&self, uid: &str) -> Vec<String> {
        self.inner.friends(uid)
    }
    fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
        self.fail(gid)?;
        self.inner.group_members(gid)
    }
    fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
        self.fail(gid)?;
        self.inner.group_size(gid)
    }
    fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        self.fail(gid)?;
        self.fail(uid)?;
        self.inner.is_member(gid, uid)
    }
    fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
        self.fail(uid)?;
        self.inner.groups_of(uid)
    }
}

/// The (uid, online) of every Presence frame to `conn`.
pub(super) fn presence(out: &[Output], conn: ConnId) -> Vec<(String, bool)> {
    frames_to(out, conn)
        .into_iter()
        .filter_map(|b| match b {
            S::Presence(p) => Some((p.uid, p.online)),
            _ => None,
        })
        .collect()
}

pub(super) fn frames_to(out: &[Output], conn: ConnId) -> Vec<S> {
    out.iter()
        .filter_map(|o| match o {
            Output::Frame { conn: c, frame } if *c == conn => frame.body.clone(),
            _ => None,
        })
        .collect()
}

/// (seq, content) of every message delivered to `conn`.
pub(super) fn messages_to(out: &[Output], conn: ConnId) -> Vec<(u64, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Deliver { conn: c, msg } if *c == conn => {
                let m = wire::to_proto(msg).unwrap();
                assert_eq!(m.seq, msg.seq);
                Some((m.seq, String::from_utf8(m.content).unwrap()))
            }
            _ => None,
        })
        .collect()
}

pub(super) fn closes(out: &[Output]) -> Vec<(ConnId, u16)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Close { conn, code, .. } => Some((*conn, *code)),
            _ => None,
        })
        .collect()
}

pub(super) fn error_code(out: &[Output], conn: ConnId) -> Option<ErrorCode> {
    frames_to(out, conn).into_iter().find_map(|b| match b {
        S::Error(e) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    })
}

pub(super) fn send_ok(out: &[Output], conn: ConnId) -> Option<proto::SendOk> {
    frames_to(out, conn).into_iter().find_map(|b| match b {
        S::SendOk(s) => Some(s),
        _ => None,
    })
}
