//! Store reads as requests: the core never waits on the store. A handler that needs the
//! store's answer puts a [`ReadRequest`] out ([`Core::poll_read`]); the shell runs it off the
//! network thread ([`ReadRequest::run`]) and hands the [`ReadAnswer`] back
//! ([`Core::handle_read`]), which carries the work on from where it stopped.
//!
//! A connection's input waits while a login or a Sync of it is being read (see
//! [`Core::is_waiting`]), so that its frames are handled in order; a device's stream reading
//! older messages does not hold its input up.

use std::sync::Arc;

use super::{ConnId, Core, Now};
use crate::store::{ReadError, StoreRead, StoredMessage};

/// Identifies a read until its answer comes back.
pub type ReadId = u64;

/// A read the core needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadRequest {
    /// What a login needs of the store (see [`LoginFacts`]).
    Login { uid: Arc<str>, device_id: Arc<str> },
    /// Up to `limit` messages of `uid`'s inbox with seq > `after`, in seq order.
    Page {
        uid: Arc<str>,
        after: u64,
        limit: usize,
    },
}

/// What the store knows of a user logging in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginFacts {
    /// The newest seq of the user's inbox.
    pub max_seq: u64,
    /// The groups the user belongs to, by id.
    pub groups: Vec<String>,
    /// The device's stored delivery cursor (0 when none).
    pub cursor: u64,
    /// The user's friends, in the order the store lists them.
    pub friends: Vec<String>,
}

/// The answer to a [`ReadRequest`] of the same kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    Login(Result<LoginFacts, ReadError>),
    Page(Result<Vec<StoredMessage>, ReadError>),
}

impl ReadRequest {
    /// Runs the read against `store`: on a side thread, since it may wait on a disk or a
    /// network.
    pub fn run(&self, store: &dyn StoreRead) -> ReadAnswer {
        match self {
            ReadRequest::Login { uid, device_id } => {
                ReadAnswer::Login(store.max_seq(uid).and_then(|max_seq| {
                    Ok(LoginFacts {
                        max_seq,
                        groups: store.groups_of(uid)?,
                        cursor: store.cursor(uid, device_id),
                        friends: store.friends(uid),
                    })
                }))
            }
            ReadRequest::Page { uid, after, limit } => {
                ReadAnswer::Page(store.messages_after(uid, *after, *limit))
            }
        }
    }
}

/// What an outstanding read carries on when its answer comes.
#[derive(Debug)]
pub(super) enum Waiter {
    /// A login of `conn` (request `id`), whose token was good.
    Login {
        conn: ConnId,
        id: u64,
        uid: Arc<str>,
        device_id: Arc<str>,
        last_seq: u64,
    },
    /// Older messages for the stream of `conn`'s device.
    Stream { conn: ConnId },
    /// A Sync page for `conn` (request `id`), bounded by `limit` messages and `page_bytes`.
    Sync {
        conn: ConnId,
        id: u64,
        limit: usize,
        page_bytes: usize,
    },
}

impl Core {
    /// The next read to run, if any. Run it off the network thread, then call
    /// [`Core::handle_read`] with its answer.
    pub fn poll_read(&mut self) -> Option<(ReadId, ReadRequest)> {
        self.reads.pop_front()
    }

    /// Whether the connection's input waits for a read (its login, or a Sync): the shell
    /// then feeds it none, and takes it up again once [`Core::handle_read`] names it.
    pub fn is_waiting(&self, conn: ConnId) -> bool {
        self.sessions.get(&conn).is_some_and(|s| s.busy.is_some())
    }

    /// The answer to read `rid`. Returns the connection whose input no longer waits, if
    /// this answer was the one it waited for. An answer for a connection that has closed
    /// since (its key possibly given to another) changes nothing.
    pub fn handle_read(&mut self, rid: ReadId, answer: ReadAnswer, now: Now) -> Option<ConnId> {
        let waiter = self.waiting.remove(&rid)?;
        match (waiter, answer) {
            (
                Waiter::Login {
                    conn,
                    id,
                    uid,
                    device_id,
                    last_seq,
                },
                ReadAnswer::Login(facts),
            ) => {
                let current = self.release(conn, rid);
                self.login_read(current, id, uid, device_id, last_seq, facts, now);
                current
            }
            (Waiter::Stream { conn }, ReadAnswer::Page(page)) => {
                self.stream_read(conn, rid, page, now);
                None
            }
            (
                Waiter::Sync {
                    conn,
                    id,
                    limit,
                    page_bytes,
                },
                ReadAnswer::Page(page),
            ) => {
                let current = self.release(conn, rid)?;
                self.sync_read(current, id, limit, page_bytes, page);
                Some(current)
            }
            (w, a) => {
                log::error!("read {rid}: {a:?} does not answer {w:?}");
                None
            }
        }
    }

    /// Puts a read out for `waiter`.
    pub(super) fn request(&mut self, req: ReadRequest, waiter: Waiter) -> ReadId {
        let rid = self.next_read;
        self.next_read += 1;
        self.reads.push_back((rid, req));
        self.waiting.insert(rid, waiter);
        rid
    }

    /// `conn` if it still waits for `rid` (then no longer).
    fn release(&mut self, conn: ConnId, rid: ReadId) -> Option<ConnId> {
        let s = self.sessions.get_mut(&conn)?;
        if s.busy != Some(rid) {
            return None;
        }
        s.busy = None;
        Some(conn)
    }
}
