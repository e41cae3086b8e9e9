//! Store reads as requests: the core never waits on the store. A handler that needs the
//! store's answer puts a [`ReadRequest`] out ([`Core::poll_read`]); the shell runs it off the
//! network thread ([`ReadRequest::run`]) and hands the [`ReadAnswer`] back
//! ([`Core::handle_read`]), which carries the work on from where it stopped.
//!
//! A connection's input waits while a login, a Sync or the members of a group it sends to
//! are being read (see [`Core::is_waiting`]), so that its frames are handled in order; a
//! device's stream reading older messages does not hold its input up.
//!
//! Group members are cached (see `groups`): a frame or an admin request that needs a group
//! not in the cache waits for a [`ReadRequest::Members`] and is then handled again, now from
//! the cache. Friends of an online user are kept with it from its login on.

use std::sync::Arc;

use super::{error, ConnId, Core, Now, Output, STORE_UNAVAILABLE};
use crate::im::proto::{ClientFrame, ErrorCode};
use crate::store::{Presence, ReadError, StoreRead, StoredMessage};

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
    /// The members of a group, by uid.
    Members { gid: Arc<str> },
    /// A user's friends (admin API).
    Friends { uid: Arc<str> },
    /// What the admin API shows of a user (see [`UserFacts`]).
    User { uid: Arc<str> },
    /// The newest seq of `uid`'s inbox.
    Tip { uid: Arc<str> },
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
    /// The presence of each friend anywhere in the cluster, in the order of `friends`, or
    /// None where presence is the node's own (the embedded store).
    pub presence: Option<Vec<Presence>>,
}

/// What the store knows of a user, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserFacts {
    pub max_seq: u64,
    /// (device_id, seq), by device id.
    pub cursors: Vec<(String, u64)>,
    pub groups: Vec<String>,
    /// The devices online anywhere in the cluster, by device id, or None where presence is
    /// the node's own.
    pub online_devices: Option<Vec<String>>,
}

/// The answer to a [`ReadRequest`] of the same kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadAnswer {
    Login(Result<LoginFacts, ReadError>),
    Page(Result<Vec<StoredMessage>, ReadError>),
    Members(Result<Vec<String>, ReadError>),
    /// The user's friends, with the presence of each anywhere in the cluster (None where
    /// presence is the node's own).
    Friends(Vec<String>, Option<Vec<Presence>>),
    User(Result<UserFacts, ReadError>),
    Tip(Result<u64, ReadError>),
}

impl ReadRequest {
    /// Runs the read against `store`: on a side thread, since it may wait on a disk or a
    /// network.
    pub fn run(&self, store: &dyn StoreRead) -> ReadAnswer {
        match self {
            ReadRequest::Login { uid, device_id } => {
                ReadAnswer::Login(store.max_seq(uid).and_then(|max_seq| {
                    let friends = store.friends(uid);
                    Ok(LoginFacts {
                        max_seq,
                        groups: store.groups_of(uid)?,
                        cursor: store.cursor(uid, device_id),
                        presence: store.online(&friends)?,
                        friends,
                    })
                }))
            }
            ReadRequest::Page { uid, after, limit } => {
                ReadAnswer::Page(store.messages_after(uid, *after, *limit))
            }
            ReadRequest::Members { gid } => ReadAnswer::Members(store.group_members(gid)),
            ReadRequest::Friends { uid } => {
                let friends = store.friends(uid);
                // A friend's presence that cannot be read is left to the node's own view.
                let online = store.online(&friends).unwrap_or_else(|e| {
                    log::warn!("{e}: presence of {uid}'s friends not read");
                    None
                });
                ReadAnswer::Friends(friends, online)
            }
            ReadRequest::User { uid } => ReadAnswer::User(store.max_seq(uid).and_then(|max_seq| {
                Ok(UserFacts {
                    max_seq,
                    cursors: store.cursors(uid),
                    groups: store.groups_of(uid)?,
                    online_devices: store.online_devices(uid)?,
                })
            })),
            ReadRequest::Tip { uid } => ReadAnswer::Tip(store.max_seq(uid)),
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
    /// The members of `gid`, for `then`. `fresh` until a change of the group's membership is
    /// reported durable while the read is out: the answer may predate it, so it is not
    /// cached then.
    Members {
        gid: Arc<str>,
        fresh: bool,
        then: Then,
    },
    /// A read for an admin API exchange, answered with [`Output::AdminRead`].
    Admin { admin: ConnId },
    /// Where `uid`'s inbox ends, once this node hears its channel.
    Tip { uid: Arc<str> },
    /// The presence of `uid`'s friends, once this node hears its channel.
    FriendsPresence { uid: Arc<str> },
}

/// What waits for a group's members, to be carried out again once they are cached.
#[derive(Debug)]
pub(super) enum Then {
    /// A frame of `conn` (whose input waits meanwhile).
    Frame { conn: ConnId, frame: ClientFrame },
    /// An admin API exchange, told by [`Output::AdminRead`].
    Admin(ConnId),
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
            (Waiter::Members { gid, fresh, then }, ReadAnswer::Members(members)) => {
                if let (true, Ok(m)) = (fresh, &members) {
                    self.cache_members(&gid, m);
                }
                match then {
                    Then::Frame { conn, frame } => {
                        let current = self.release(conn, rid)?;
                        match members {
                            Ok(_) => self.on_frame(current, frame, now),
                            Err(e) => {
                                log::error!("{e}: group {gid}");
                                self.reply(
                                    current,
                                    error(frame.id, ErrorCode::Unavailable, STORE_UNAVAILABLE),
                                );
                            }
                        }
                        Some(current)
                    }
                    Then::Admin(admin) => {
                        self.out.push(Output::AdminRead {
                            admin,
                            rid,
                            answer: ReadAnswer::Members(members),
                        });
                        None
                    }
                }
            }
            (Waiter::Tip { uid }, ReadAnswer::Tip(tip)) => {
                match tip {
                    Ok(seq) => self.tip_read(&uid, seq, now),
                    Err(e) => {
                        log::warn!("{e}: where the inbox of {uid} ends; reading it again soon");
                        self.tip_failed(uid, now);
                    }
                }
                None
            }
            (Waiter::FriendsPresence { uid }, ReadAnswer::Friends(friends, presence)) => {
                if let Some(presence) = presence {
                    self.friends_read(&uid, friends, &presence);
                }
                None
            }
            (Waiter::Admin { admin }, answer) => {
                self.out.push(Output::AdminRead { admin, rid, answer });
                None
            }
            (w, a) => {
                log::error!("read {rid}: {a:?} does not answer {w:?}");
                None
            }
        }
    }

    /// Puts a read out for the admin API exchange `admin`: its answer comes as
    /// [`Output::AdminRead`] with the returned id.
    pub fn admin_read(&mut self, admin: ConnId, req: ReadRequest) -> ReadId {
        self.request(req, Waiter::Admin { admin })
    }

    /// Reads the members of `gid` for `then`. A connection's input waits meanwhile.
    pub(super) fn read_members(&mut self, gid: &str, then: Then) -> ReadId {
        let gid: Arc<str> = gid.into();
        let conn = match &then {
            Then::Frame { conn, .. } => Some(*conn),
            Then::Admin(_) => None,
        };
        let req = ReadRequest::Members { gid: gid.clone() };
        let rid = self.request(
            req,
            Waiter::Members {
                gid,
                fresh: true,
                then,
            },
        );
        if let Some(s) = conn.and_then(|c| self.sessions.get_mut(&c)) {
            s.busy = Some(rid);
        }
        rid
    }

    /// A change of `gid`'s membership is durable: reads of its members already out may
    /// predate it.
    pub(super) fn members_changed(&mut self, changed: &str) {
        for w in self.waiting.values_mut() {
            if let Waiter::Members { gid, fresh, .. } = w {
                if &**gid == changed {
                    *fresh = false;
                }
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
