//! The IM domain core: login, the device registry, inboxes, delivery, sync and presence.
//!
//! Sans-IO: the shell feeds it decoded client frames, connection events and the time, and
//! drains [`Output`]s (frames to send, connections to close) and [`WriteBatch`]es (store
//! writes). A batch is taken once per loop turn and committed off the network thread; only
//! when the shell reports it durable ([`Core::on_committed`]) does the core acknowledge the
//! sends in it and deliver their messages, so nothing a client was told about can be lost.
//!
//! A message is encoded once, when it is accepted (`wire::encode_body`), and that body is
//! shared by both inboxes, the store and every delivery ([`Output::Deliver`]).
//!
//! The store, not the core, gives a send its seqs and recognises a retry: the core hands it
//! each accepted send with the uids it goes to, and acknowledges from the store's answer.
//!
//! Invariants:
//! - Only users with a device online are cached, and a cached user's `recent` messages are
//!   contiguous up to its `committed_seq`, the newest seq of its inbox the core has heard of.
//! - A device's stream is `sent_upto` over the committed inbox: messages go out in seq order,
//!   without gaps, at most `delivery_window` beyond the device's cumulative ack.
//!
//! This module holds the types the shell sees, the state the core keeps and the dispatch of
//! client frames; the rest lives beside it, one concern per file:
//! - `session`: connections opening and closing, login, the device registry.
//! - `presence`: friendships, and telling friends who comes online and goes offline.
//! - `send`: accepting a message (client or admin API) for a user or a group, rate limits
//!   and dedupe.
//! - `groups`: group membership and its announcements.
//! - `signal`: ephemeral signals to the devices online now.
//! - `batch`: the writes of a loop turn, and what their commit releases.
//! - `reads`: store reads as requests whose answers carry the work on.
//! - `delivery`: each device's stream within its window and output room, acks, Sync pages.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use super::auth::{Verifier, MAX_ID_BYTES};
use super::proto::{self, client_frame, server_frame, ClientFrame, ErrorCode, ServerFrame};
use crate::store::{Presence, StoredMessage, WriteBatch};
use crate::ws::code;

use delivery::output_cost;

mod batch;
mod delivery;
mod groups;
#[cfg(test)]
mod harness;
mod presence;
mod reads;
mod route;
mod send;
mod session;
mod signal;

pub use delivery::SYNC_MAX_BYTES;
pub use groups::MembershipError;
pub use reads::{LoginFacts, ReadAnswer, ReadId, ReadRequest, UserFacts};
pub use route::{ClusterOp, Published};
pub use signal::{SignalError, SignalTarget, MAX_SIGNAL_KIND, MAX_SIGNAL_PAYLOAD};

/// The shell's identifier of a connection (its slab key).
pub type ConnId = usize;

/// Close code for a connection replaced by a newer login of the same device.
pub const CLOSE_REPLACED: u16 = 4000;

/// What the store could not tell right now, so a request is refused instead of guessed.
const STORE_UNAVAILABLE: &str = "the store cannot be read; try again later";

/// Why an admin API send was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminSendError {
    /// Bad ids or content (HTTP 400).
    Invalid(&'static str),
    /// The store could not be read (HTTP 503).
    Unavailable,
    /// To a group that has no members (HTTP 404).
    NoSuchGroup,
}

#[derive(Debug, Clone)]
pub struct ImConfig {
    pub max_devices: usize,
    pub delivery_window: u64,
    pub ack_timeout_ms: u64,
    pub max_content_bytes: usize,
    pub rate_per_sec: f64,
    pub rate_burst: f64,
    /// Undecodable frames in a row before the connection is closed.
    pub max_bad_frames: u32,
    /// Output a new connection can take before the shell first reports its room
    /// (`--outbound-high-water`; see [`Core::handle_room`]).
    pub output_room: usize,
    /// Members a group may have (`--max-group-members`).
    pub max_group_members: usize,
    /// A node of a cluster (`--redis`): the core puts out [`ClusterOp`]s.
    pub cluster: bool,
}

impl Default for ImConfig {
    fn default() -> Self {
        ImConfig {
            max_devices: 16,
            delivery_window: 256,
            ack_timeout_ms: 60_000,
            max_content_bytes: 16 * 1024,
            rate_per_sec: 50.0,
            rate_burst: 100.0,
            max_bad_frames: 10,
            output_room: 1024 * 1024,
            max_group_members: 1000,
            cluster: false,
        }
    }
}

/// The time, as the shell sees it: monotonic for timeouts, wall clock for the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub mono_ms: u64,
    pub unix_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Frame {
        conn: ConnId,
        frame: ServerFrame,
    },
    Close {
        conn: ConnId,
        code: u16,
        reason: &'static str,
    },
    /// A message of the connection's inbox (a `ServerFrame` with id 0; see `wire`).
    Deliver {
        conn: ConnId,
        msg: StoredMessage,
    },
    /// The answer to an admin API send (`POST /v1/messages`), once durable.
    AdminSent {
        admin: usize,
        seq: u64,
        duplicate: bool,
    },
    /// An admin API send the store did not confirm: send it again.
    AdminRefused {
        admin: usize,
    },
    /// The answer to read `rid` of an admin API exchange ([`Core::admin_read`]), or to the
    /// read of a group's members its request waited for (`ReadAnswer::Members`, now cached:
    /// carry the request out again).
    AdminRead {
        admin: ConnId,
        rid: ReadId,
        answer: ReadAnswer,
    },
}

/// Where a message or a signal goes: one user's inbox (and devices), or every member's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    User(&'a str),
    Group(&'a str),
}

impl<'a> Target<'a> {
    /// The target of a frame that names a user or a group: None unless exactly one is set.
    pub fn of(to_uid: &'a str, group_id: &'a str) -> Option<Target<'a>> {
        match (to_uid.is_empty(), group_id.is_empty()) {
            (false, true) => Some(Target::User(to_uid)),
            (true, false) => Some(Target::Group(group_id)),
            _ => None,
        }
    }

    fn is_valid(self) -> bool {
        match self {
            Target::User(id) | Target::Group(id) => valid_id(id),
        }
    }
}

/// Who asked for a send, and so who gets its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requester {
    Conn { conn: ConnId, id: u64 },
    Admin(usize),
}

/// Identifies a taken [`WriteBatch`] until it is committed.
pub type BatchId = u64;

/// Per-connection token bucket for sends.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

#[derive(Debug)]
struct Device {
    uid: Arc<str>,
    device_id: Arc<str>,
    /// Highest seq sent on this connection.
    sent_upto: u64,
    /// Cumulative ack (the cursor).
    acked: u64,
    /// When `acked` last moved, or when messages started to be outstanding.
    progress_ms: u64,
    /// Seqs (in its own inbox, ascending) of what this connection sent and has not passed
    /// yet: it learnt them from SendOk, so they are not delivered back to it.
    own: VecDeque<u64>,
    /// The read of older messages its stream waits for, if any.
    reading: Option<reads::ReadId>,
    /// Where its login stands among the cluster's logins of the same device.
    claim: route::Claim,
}

#[derive(Debug)]
struct Session {
    device: Option<Device>,
    bucket: Bucket,
    bad_in_row: u32,
    /// Bytes of output the connection can still take: what the shell last reported, less an
    /// estimate of what was produced since. Deliveries stop at zero, and Sync pages shrink to
    /// fit, so that output is bounded before it is built (see [`Core::handle_room`]).
    room: usize,
    /// The read (its login, or a Sync) the connection's input waits for.
    busy: Option<reads::ReadId>,
}

#[derive(Debug, Default)]
struct User {
    /// Online devices: device id -> connection.
    devices: HashMap<Arc<str>, ConnId>,
    /// The newest seq of the inbox: what the store had at login, then what commits answered.
    committed_seq: u64,
    /// The most recently committed messages, contiguous up to `committed_seq`, so live
    /// delivery needs no store read. Emptied when a commit names a seq beyond the next one
    /// (another writer appended in between): the devices then read the gap from the store.
    recent: VecDeque<StoredMessage>,
    /// A node of a cluster: appends heard beyond the next seq, by seq, held for a moment
    /// (see `route::GAP_WAIT_MS`) for the ones before them, which another node's publish or
    /// this node's commit usually brings a few milliseconds later.
    ahead: BTreeMap<u64, StoredMessage>,
    /// The last batch whose commit touched this user (to visit each user once per commit).
    touched_by: BatchId,
    /// Logins of the user being read: it stays cached meanwhile, so that no commit answered
    /// before the read's answer goes unseen.
    logins: usize,
    /// The user's friends: what the store had when its first device logged in, then what
    /// commits changed, so that going offline needs no read.
    friends: Vec<String>,
    /// A node of a cluster: the newest presence heard of each friend (from the store or
    /// Redis's news), which is what the user's devices here were told.
    presence: HashMap<String, Presence>,
    /// Whether this node hears the user's channel (a node of a cluster).
    heard: bool,
}

/// A taken batch until the store answers it: who asked for each of its sends (None once
/// that connection has closed: its key may be given to another).
#[derive(Debug)]
struct InFlight {
    id: BatchId,
    batch: Arc<WriteBatch>,
    requesters: Vec<Option<Requester>>,
}

pub struct Core {
    cfg: ImConfig,
    verifier: Verifier,
    sessions: HashMap<ConnId, Session>,
    users: HashMap<Arc<str>, User>,
    out: Vec<Output>,
    batch: WriteBatch,
    /// Who asked for each send of `batch`.
    requesters: Vec<Option<Requester>>,
    in_flight: VecDeque<InFlight>,
    next_batch: BatchId,
    /// Reused for encoding message bodies.
    scratch: Vec<u8>,
    group_cache: groups::GroupCache,
    /// Reads not yet taken by the shell, and what each outstanding read carries on.
    reads: VecDeque<(reads::ReadId, ReadRequest)>,
    waiting: HashMap<reads::ReadId, reads::Waiter>,
    next_read: reads::ReadId,
    /// Cluster work not yet taken by the shell.
    routes: Vec<ClusterOp>,
    /// Users whose inbox's end is to be read again.
    tips: route::Retries<Arc<str>>,
    /// Connections whose stream is to move on again after a failed read of older messages.
    streams: route::Retries<ConnId>,
    gaps: route::GapWaits,
    /// Numbers this node's logins, to tell its own announcements apart.
    next_login: u64,
}

fn frame(id: u64, body: server_frame::Body) -> ServerFrame {
    ServerFrame {
        id,
        body: Some(body),
    }
}

fn error(id: u64, code: ErrorCode, message: &str) -> ServerFrame {
    frame(
        id,
        server_frame::Body::Error(proto::Error {
            code: code as i32,
            message: message.to_owned(),
        }),
    )
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_BYTES
}

/// The group a send or a signal goes to, when it names a valid one and no user.
fn group_of(f: &ClientFrame) -> Option<&str> {
    let (to_uid, gid) = match &f.body {
        Some(client_frame::Body::Send(s)) => (&s.to_uid, &s.group_id),
        Some(client_frame::Body::Signal(s)) => (&s.to_uid, &s.group_id),
        _ => return None,
    };
    match Target::of(to_uid, gid) {
        Some(Target::Group(g)) if valid_id(g) => Some(g),
        _ => None,
    }
}

impl Core {
    pub fn new(cfg: ImConfig, jwt_secret: &[u8]) -> Core {
        Core {
            cfg,
            verifier: Verifier::new(jwt_secret),
            sessions: HashMap::new(),
            users: HashMap::new(),
            out: Vec::new(),
            batch: WriteBatch::default(),
            requesters: Vec::new(),
            in_flight: VecDeque::new(),
            next_batch: 1,
            scratch: Vec::new(),
            group_cache: groups::GroupCache::default(),
            reads: VecDeque::new(),
            waiting: HashMap::new(),
            next_read: 1,
            routes: Vec::new(),
            tips: route::Retries::default(),
            streams: route::Retries::default(),
            gaps: route::GapWaits::default(),
            next_login: 1,
        }
    }

    /// Frames to send and connections to close, in order.
    pub fn drain_output(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// A frame that could not be decoded (or a text frame where binary is required).
    pub fn on_bad_frame(&mut self, conn: ConnId, why: &str) {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return;
        };
        s.bad_in_row += 1;
        let close = s.bad_in_row >= self.cfg.max_bad_frames;
        self.out.push(Output::Frame {
            conn,
            frame: error(0, ErrorCode::BadRequest, why),
        });
        if close {
            self.out.push(Output::Close {
                conn,
                code: code::POLICY_VIOLATION,
                reason: "too many bad frames",
            });
        }
    }

    /// A raw TCP frame over the size limit: the stream cannot be resynchronised.
    pub fn on_frame_too_large(&mut self, conn: ConnId) {
        self.out.push(Output::Frame {
            conn,
            frame: error(0, ErrorCode::TooLarge, "frame too large"),
        });
        self.out.push(Output::Close {
            conn,
            code: code::POLICY_VIOLATION,
            reason: "frame too large",
        });
    }

    /// A decoded client frame. One to a group whose members are not cached waits for them
    /// (the connection's input with it; see `reads`).
    pub fn on_frame(&mut self, conn: ConnId, f: ClientFrame, now: Now) {
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        session.bad_in_row = 0;
        let id = f.id;
        let logged_in = session.device.is_some();
        if let Some(gid) = group_of(&f).filter(|g| logged_in && !self.has_members(g)) {
            let gid = gid.to_owned();
            self.read_members(&gid, reads::Then::Frame { conn, frame: f });
            return;
        }
        match f.body {
            None => self.reply(conn, error(id, ErrorCode::BadRequest, "empty frame")),
            Some(client_frame::Body::Login(_)) if logged_in => {
                self.reply(conn, error(id, ErrorCode::BadRequest, "already logged in"))
            }
            Some(client_frame::Body::Login(l)) => self.login(conn, id, l, now),
            Some(_) if !logged_in => {
                self.reply(conn, error(id, ErrorCode::Unauthenticated, "log in first"))
            }
            Some(client_frame::Body::Send(s)) => self.send(conn, id, s, now),
            Some(client_frame::Body::Ack(a)) => self.ack(conn, a.seq, now),
            Some(client_frame::Body::Sync(s)) => self.sync(conn, id, s),
            Some(client_frame::Body::Signal(s)) => self.signal(conn, id, s, now),
            Some(client_frame::Body::Ping(p)) => self.reply(
                conn,
                frame(
                    id,
                    server_frame::Body::Pong(proto::Pong {
                        client_time_ms: p.client_time_ms,
                        server_time_ms: now.unix_ms,
                    }),
                ),
            ),
        }
    }

    fn reply(&mut self, conn: ConnId, frame: ServerFrame) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.room = s
                .room
                .saturating_sub(output_cost(prost::Message::encoded_len(&frame)));
        }
        self.out.push(Output::Frame { conn, frame });
    }

    /// Finds or creates the cached state of `uid`. A new one knows no seq of its inbox until
    /// a login read answers (see `session`).
    fn cache_user(&mut self, uid: &str) -> Arc<str> {
        if let Some((k, _)) = self.users.get_key_value(uid) {
            return k.clone();
        }
        let key: Arc<str> = uid.into();
        self.users.insert(key.clone(), User::default());
        self.route(ClusterOp::Subscribe(key.clone()));
        key
    }

    /// Drops the cache of a user nobody needs right now; the store has everything.
    fn maybe_evict(&mut self, uid: &str) {
        if self
            .users
            .get(uid)
            .is_some_and(|u| u.devices.is_empty() && u.logins == 0)
        {
            if let Some((key, _)) = self.users.remove_entry(uid) {
                self.route(ClusterOp::Unsubscribe(key));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::harness::{closes, error_code, frames_to, H};
    use super::*;
    use client_frame::Body as C;
    use server_frame::Body as S;

    #[test]
    fn ping_pong() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "a", 0);
        let out = h.req(1, 42, C::Ping(proto::Ping { client_time_ms: 7 }));
        let Some(S::Pong(p)) = frames_to(&out, 1).pop() else {
            panic!()
        };
        assert_eq!((p.client_time_ms, p.server_time_ms), (7, h.now.unix_ms));
    }

    #[test]
    fn a_raw_tcp_frame_over_the_limit_is_answered_too_large_and_closes_the_connection() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "a", 0);
        h.core.on_frame_too_large(1);
        let out = h.turn();
        assert_eq!(error_code(&out, 1), Some(ErrorCode::TooLarge));
        assert_eq!(closes(&out), vec![(1, code::POLICY_VIOLATION)]);
    }
}
