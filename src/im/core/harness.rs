//! A [`Core`] driven as the shell drives it, against a [`MemoryStore`], for the tests of
//! every concern: each request ends the loop turn (its batch taken, applied and reported
//! durable), and helpers pick the outputs a test asserts on.

use super::{ConnId, Core, ImConfig, Now, Output};
use crate::im::auth::tests::token;
use crate::im::proto::{
    self, client_frame::Body as C, server_frame::Body as S, ClientFrame, ErrorCode,
};
use crate::im::wire;
use crate::store::memory::MemoryStore;

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
            &self.store,
        );
        self.turn()
    }

    /// Ends the loop turn: everything drained, and the batch (if any) committed and its
    /// outputs drained too.
    pub(super) fn turn(&mut self) -> Vec<Output> {
        let mut out: Vec<Output> = self.core.drain_output().collect();
        if let Some((id, batch)) = self.core.take_batch() {
            self.store.apply(&batch);
            self.core.on_committed(id, self.now, &self.store);
            out.extend(self.core.drain_output());
        }
        out
    }

    pub(super) fn login(
        &mut self,
        conn: ConnId,
        uid: &str,
        device: &str,
        last_seq: u64,
    ) -> Vec<Output> {
        self.core.on_open(conn, self.now);
        let exp = (self.now.unix_ms / 1000) as u64 + 3600;
        self.req(
            conn,
            1,
            C::Login(proto::Login {
                token: token(SECRET, uid, Some(exp)),
                device_id: device.into(),
                last_seq,
            }),
        )
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
            &self.store,
        );
    }

    /// Adds (or removes) a member and ends the turn.
    pub(super) fn member(&mut self, gid: &str, uid: &str, joined: bool) -> Vec<Output> {
        self.core
            .set_membership(gid, uid, joined, &self.store)
            .expect("membership change");
        self.turn()
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
        self.core.on_close(conn, &self.store);
        self.turn()
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
