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
//! Invariants:
//! - Each inbox's seqs are assigned densely (`assigned_seq`) and become visible in the same
//!   order once committed (`committed_seq`).
//! - A device's stream is `sent_upto` over the committed inbox: messages go out in seq order,
//!   without gaps, at most `delivery_window` beyond the device's cumulative ack.
//! - A cached user's send filter, once loaded, covers its newest idempotency keys: the
//!   committed ones the store had, then every send accepted since.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use super::auth::{Verifier, MAX_ID_BYTES};
use super::proto::{self, client_frame, server_frame, ClientFrame, ErrorCode, ServerFrame};
use super::wire;
use crate::store::{Append, ReadError, StoreRead, StoredMessage, WriteBatch, DEDUPE_KEEP};

/// The shell's identifier of a connection (its slab key).
pub type ConnId = usize;

/// Close code for a connection replaced by a newer login of the same device.
pub const CLOSE_REPLACED: u16 = 4000;
/// Close code for policy violations (failed login, too many bad frames, ack timeout).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for a login the store could not serve (RFC 6455: an unexpected condition).
pub const CLOSE_UNAVAILABLE: u16 = 1011;

/// What the store could not tell right now, so a request is refused instead of guessed.
const STORE_UNAVAILABLE: &str = "the store cannot be read; try again later";

/// Why an admin API send was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminSendError {
    /// Bad ids or content (HTTP 400).
    Invalid(&'static str),
    /// The store could not be read (HTTP 503).
    Unavailable,
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
}

#[derive(Debug, Default)]
struct User {
    /// Online devices: device id -> connection.
    devices: HashMap<Arc<str>, ConnId>,
    assigned_seq: u64,
    committed_seq: u64,
    /// The most recently committed messages, contiguous up to `committed_seq`, so live
    /// delivery needs no store read.
    recent: VecDeque<StoredMessage>,
    /// The ids of its newest sends, loaded at the first send of this cache lifetime.
    sends: Option<SendFilter>,
    /// Uncommitted appends to this inbox; the user stays cached while any are in flight.
    uncommitted: usize,
    /// The last batch whose commit touched this user (to visit each user once per commit).
    touched_by: BatchId,
}

/// Which client_msg_ids a user may have used lately: two generations of blocked Bloom filters
/// over a keyed 64-bit hash of the id, so that the user's newest [`DEDUPE_KEEP`] ids are
/// always covered. A miss is certain; a hit (a retry, or fewer than one in 1,000 new ids) is
/// confirmed exactly against the pending sends and the store.
///
/// Sized by use: 32 bits per key, from one block for a user with a few sends up to 4 KiB per
/// generation for one with `DEDUPE_KEEP` (a map of the ids would take several times that, and
/// miss the cache on every send). A filter smaller than that is rebuilt twice as large, from
/// the store, when it fills up; a full-size one starts a new generation instead.
///
/// A key's bits fall in one 64-byte block per generation, and the two generations' blocks
/// for it are neighbours, so a lookup costs about one cache miss.
#[derive(Debug)]
struct SendFilter {
    /// Pairs of blocks: for block `i`, generation `g`'s words are at
    /// `(2 * i + g) * BLOCK_WORDS`.
    words: Box<[u64]>,
    /// The generation that takes new keys (0 or 1).
    current: usize,
    /// Keys in the current generation, and how many one is sized for.
    count: usize,
    capacity: usize,
}

/// A key's bits all fall in one block of 8 words (a cache line) per generation.
const BLOCK_WORDS: usize = 8;
const BLOCK_BITS: u64 = 64 * BLOCK_WORDS as u64;
const FILTER_PROBES: u64 = 8;
const FILTER_BITS_PER_KEY: usize = 32;
/// The smallest filter's capacity: one block.
const FILTER_MIN_KEYS: usize = BLOCK_WORDS * 64 / FILTER_BITS_PER_KEY;

impl SendFilter {
    /// A filter holding the newest [`DEDUPE_KEEP`] of `hashes` (oldest first), sized for
    /// twice as many (at most `DEDUPE_KEEP`).
    fn with(hashes: Vec<u64>) -> SendFilter {
        // Each key once (the same key twice would count twice towards the next generation),
        // the newest ones, still oldest first: all of them fit in one generation.
        let mut seen = HashSet::with_capacity(hashes.len());
        let mut hashes: Vec<u64> = hashes
            .into_iter()
            .rev()
            .filter(|h| seen.insert(*h))
            .collect();
        hashes.truncate(DEDUPE_KEEP);
        hashes.reverse();
        let capacity = (2 * hashes.len())
            .next_power_of_two()
            .clamp(FILTER_MIN_KEYS, DEDUPE_KEEP);
        let blocks = (capacity * FILTER_BITS_PER_KEY / 64 / BLOCK_WORDS).next_power_of_two();
        let mut f = SendFilter {
            words: vec![0; 2 * blocks * BLOCK_WORDS].into_boxed_slice(),
            current: 0,
            count: 0,
            capacity,
        };
        for h in hashes {
            f.insert(h);
        }
        f
    }

    /// Whether it must be rebuilt larger before it takes another key.
    fn must_grow(&self) -> bool {
        self.count >= self.capacity && self.capacity < DEDUPE_KEEP
    }

    /// Where `hash` falls: its block pair's first word, then its bits (double hashing).
    fn place(&self, hash: u64) -> (usize, impl Iterator<Item = (usize, u64)>) {
        let blocks = (self.words.len() / (2 * BLOCK_WORDS)) as u64;
        let pair = (hash % blocks) as usize * 2 * BLOCK_WORDS;
        let mixed = (hash / blocks).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let (first, step) = (mixed >> 32, (mixed & 0xFFFF_FFFF) | 1);
        let bits = (0..FILTER_PROBES).map(move |i| {
            let bit = first.wrapping_add(i.wrapping_mul(step)) % BLOCK_BITS;
            ((bit / 64) as usize, 1 << (bit % 64))
        });
        (pair, bits)
    }

    fn may_contain(&self, hash: u64) -> bool {
        (0..2).any(|g| {
            let (pair, bits) = self.place(hash);
            let block = &self.words[pair + g * BLOCK_WORDS..][..BLOCK_WORDS];
            { bits }.all(|(w, m)| block[w] & m != 0)
        })
    }

    fn insert(&mut self, hash: u64) {
        if self.count >= self.capacity {
            // Full size: the current generation becomes the previous one, and the previous
            // one's bits are cleared for the new current one.
            self.current ^= 1;
            let g = self.current;
            for pair in self.words.chunks_mut(2 * BLOCK_WORDS) {
                pair[g * BLOCK_WORDS..][..BLOCK_WORDS].fill(0);
            }
            self.count = 0;
        }
        let (pair, bits) = self.place(hash);
        let block = &mut self.words[pair + self.current * BLOCK_WORDS..][..BLOCK_WORDS];
        for (w, m) in bits {
            block[w] |= m;
        }
        self.count += 1;
    }
}

pub struct Core {
    cfg: ImConfig,
    verifier: Verifier,
    /// Hashes client_msg_ids for send windows; keyed per process, so ids cannot be chosen to
    /// collide.
    hasher: RandomState,
    sessions: HashMap<ConnId, Session>,
    users: HashMap<Arc<str>, User>,
    out: Vec<Output>,
    batch: WriteBatch,
    /// Acknowledgements released when the current batch is durable.
    deferred: Vec<Output>,
    in_flight: VecDeque<(BatchId, Arc<WriteBatch>, Vec<Output>)>,
    next_batch: BatchId,
    /// Reused for encoding message bodies.
    scratch: Vec<u8>,
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

/// Most content bytes in one SyncResult (a page holds at least one message).
pub const SYNC_MAX_BYTES: usize = 1024 * 1024;

/// How many committed messages per cached user are kept, at most, for live delivery of
/// devices that lag a little (a window that waits for an ack); messages every device has
/// been sent are dropped at once. A device that lags more reads the store, whose newest
/// messages are in memory too.
const RECENT_KEEP: usize = 16;

impl Core {
    pub fn new(cfg: ImConfig, jwt_secret: &[u8]) -> Core {
        Core {
            cfg,
            verifier: Verifier::new(jwt_secret),
            hasher: RandomState::new(),
            sessions: HashMap::new(),
            users: HashMap::new(),
            out: Vec::new(),
            batch: WriteBatch::default(),
            deferred: Vec::new(),
            in_flight: VecDeque::new(),
            next_batch: 1,
            scratch: Vec::new(),
        }
    }

    /// Frames to send and connections to close, in order.
    pub fn drain_output(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

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
            },
        );
    }

    /// Whether the connection can take more output now (true for one the core does not
    /// know). While it cannot, the shell feeds it no input: every answer is then built only
    /// once there is room for it.
    pub fn has_room(&self, conn: ConnId) -> bool {
        self.sessions.get(&conn).is_none_or(|s| s.room > 0)
    }

    /// The shell's report of how many more bytes the connection can take (its high-water mark
    /// less what is unsent, or zero while it drains). When room comes back after it ran out,
    /// the delivery window moves on. Returns whether that produced output.
    pub fn handle_room(
        &mut self,
        conn: ConnId,
        room: usize,
        now: Now,
        store: &dyn StoreRead,
    ) -> bool {
        let Some(s) = self.sessions.get_mut(&conn) else {
            return false;
        };
        let starved = s.room == 0;
        s.room = room;
        if !starved || room == 0 || s.device.is_none() {
            return false;
        }
        let before = self.out.len();
        self.pump(conn, now, store);
        self.out.len() > before
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

    pub fn is_logged_in(&self, conn: ConnId) -> bool {
        self.sessions.get(&conn).is_some_and(|s| s.device.is_some())
    }

    /// The connection is gone (closed, timed out, shutdown).
    pub fn on_close(&mut self, conn: ConnId, store: &dyn StoreRead) {
        let Some(session) = self.sessions.remove(&conn) else {
            return;
        };
        // Its answers still waiting for a commit would reach whoever the shell gives its key
        // next; the sends stay accepted, and a retry is answered as a duplicate.
        let not_to_it = |o: &Output| !matches!(o, Output::Frame { conn: c, .. } if *c == conn);
        self.deferred.retain(not_to_it);
        for (_, _, waiting) in &mut self.in_flight {
            waiting.retain(not_to_it);
        }
        let Some(dev) = session.device else {
            return;
        };
        let Some(user) = self.users.get_mut(&dev.uid) else {
            return;
        };
        if user.devices.get(&dev.device_id) == Some(&conn) {
            user.devices.remove(&dev.device_id);
            if user.devices.is_empty() {
                self.broadcast_presence(&dev.uid, false, store);
                self.maybe_evict(&dev.uid);
            }
        }
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
                code: CLOSE_POLICY,
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
            code: CLOSE_POLICY,
            reason: "frame too large",
        });
    }

    /// A decoded client frame.
    pub fn on_frame(&mut self, conn: ConnId, f: ClientFrame, now: Now, store: &dyn StoreRead) {
        let Some(session) = self.sessions.get_mut(&conn) else {
            return;
        };
        session.bad_in_row = 0;
        let id = f.id;
        let logged_in = session.device.is_some();
        match f.body {
            None => self.reply(conn, error(id, ErrorCode::BadRequest, "empty frame")),
            Some(client_frame::Body::Login(_)) if logged_in => {
                self.reply(conn, error(id, ErrorCode::BadRequest, "already logged in"))
            }
            Some(client_frame::Body::Login(l)) => self.login(conn, id, l, now, store),
            Some(_) if !logged_in => {
                self.reply(conn, error(id, ErrorCode::Unauthenticated, "log in first"))
            }
            Some(client_frame::Body::Send(s)) => self.send(conn, id, s, now, store),
            Some(client_frame::Body::Ack(a)) => self.ack(conn, a.seq, now, store),
            Some(client_frame::Body::Sync(s)) => self.sync(conn, id, s, store),
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
                code: CLOSE_POLICY,
                reason: "ack timeout",
            });
        }
    }

    /// Sets or removes a symmetric friendship (admin API). Durable with the turn's batch.
    pub fn set_friendship(&mut self, a: &str, b: &str, present: bool) {
        self.batch
            .friendships
            .push((a.to_owned(), b.to_owned(), present));
    }

    /// The id the writes made since the last [`Core::take_batch`] will be committed under.
    pub fn pending_batch_id(&self) -> BatchId {
        self.next_batch
    }

    /// The writes of this turn, if any. Commit it, then call [`Core::on_committed`].
    pub fn take_batch(&mut self) -> Option<(BatchId, Arc<WriteBatch>)> {
        if self.batch.is_empty() {
            // Only answers to duplicates of pending sends: they wait for the newest batch in
            // flight, which holds or follows the originals, instead of a commit of their own.
            if let Some((_, _, waiting)) = self.in_flight.back_mut() {
                waiting.append(&mut self.deferred);
            }
            if self.deferred.is_empty() {
                return None;
            }
        }
        let id = self.next_batch;
        self.next_batch += 1;
        // The next turn likely writes as much: room for it at once, not by doubling.
        let next = WriteBatch {
            appends: Vec::with_capacity(self.batch.appends.len()),
            sends: Vec::with_capacity(self.batch.sends.len()),
            ..WriteBatch::default()
        };
        let batch = Arc::new(std::mem::replace(&mut self.batch, next));
        let room = self.deferred.len();
        let deferred = std::mem::replace(&mut self.deferred, Vec::with_capacity(room));
        self.in_flight.push_back((id, batch.clone(), deferred));
        Some((id, batch))
    }

    /// The batch `id` (and every one taken before it) is durable: acknowledge and deliver.
    pub fn on_committed(&mut self, id: BatchId, now: Now, store: &dyn StoreRead) {
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut conns: Vec<ConnId> = Vec::new();
        while self.in_flight.front().is_some_and(|(b, _, _)| *b <= id) {
            let Some((bid, batch, deferred)) = self.in_flight.pop_front() else {
                break;
            };
            for a in &batch.appends {
                let Some(user) = self.users.get_mut(&*a.owner) else {
                    continue;
                };
                user.committed_seq = a.msg.seq;
                user.uncommitted -= 1;
                user.recent.push_back(a.msg.clone());
                if user.recent.len() > RECENT_KEEP {
                    user.recent.pop_front();
                }
                // Each user once, in order of first append (a sort would reorder deliveries).
                if user.touched_by != bid {
                    user.touched_by = bid;
                    touched.push(a.owner.clone());
                }
            }
            self.out.extend(deferred);
            // A friendship made (or ended) while both are online is news to both now: each
            // learns the other's presence as if it had just come online (or gone offline).
            for (a, b, present) in &batch.friendships {
                for (x, y) in [(a, b), (b, a)] {
                    let x_online = self
                        .users
                        .get(x.as_str())
                        .is_some_and(|u| !u.devices.is_empty());
                    if x_online {
                        self.tell_presence(y, x, *present);
                    }
                }
            }
            for uid in touched.drain(..) {
                if let Some(u) = self.users.get(&uid) {
                    conns.extend(u.devices.values());
                }
                for conn in conns.drain(..) {
                    self.pump(conn, now, store);
                }
                self.trim_recent(&uid);
                self.maybe_evict(&uid);
            }
        }
    }

    /// Forgets the recent messages every online device of `uid` has been sent: a lagging
    /// device reads the store, and a message's body is freed while it is still in the cache.
    fn trim_recent(&mut self, uid: &str) {
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

    fn reply(&mut self, conn: ConnId, frame: ServerFrame) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.room = s
                .room
                .saturating_sub(output_cost(prost::Message::encoded_len(&frame)));
        }
        self.out.push(Output::Frame { conn, frame });
    }

    fn fail_login(&mut self, conn: ConnId, id: u64, code: ErrorCode, why: &str) {
        self.reply(conn, error(id, code, why));
        self.out.push(Output::Close {
            conn,
            code: CLOSE_POLICY,
            reason: "login refused",
        });
    }

    /// Loads (or finds) the cached state of `uid`; None when the store cannot tell its
    /// inbox's last seq (nothing may then be appended to it).
    fn user(&mut self, uid: &str, store: &dyn StoreRead) -> Option<Arc<str>> {
        if let Some((k, _)) = self.users.get_key_value(uid) {
            return Some(k.clone());
        }
        let key: Arc<str> = uid.into();
        let max = match store.max_seq(uid) {
            Ok(max) => max,
            Err(e) => {
                log::error!("{e}: user {uid} not loaded");
                return None;
            }
        };
        self.users.insert(
            key.clone(),
            User {
                assigned_seq: max,
                committed_seq: max,
                ..User::default()
            },
        );
        Some(key)
    }

    /// Drops the cache of a user nobody needs right now; the store has everything.
    fn maybe_evict(&mut self, uid: &str) {
        if self
            .users
            .get(uid)
            .is_some_and(|u| u.devices.is_empty() && u.uncommitted == 0)
        {
            self.users.remove(uid);
        }
    }

    fn login(&mut self, conn: ConnId, id: u64, l: proto::Login, now: Now, store: &dyn StoreRead) {
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
        let Some(uid) = self.user(&uid, store) else {
            self.reply(conn, error(id, ErrorCode::Unavailable, STORE_UNAVAILABLE));
            return self.out.push(Output::Close {
                conn,
                code: CLOSE_UNAVAILABLE,
                reason: "store unavailable",
            });
        };
        let device_id: Arc<str> = l.device_id.as_str().into();
        let user = self.users.get_mut(&uid).expect("loaded");
        let replaced = user.devices.get(&device_id).copied();
        if replaced.is_none() && user.devices.len() >= self.cfg.max_devices {
            self.maybe_evict(&uid);
            return self.fail_login(conn, id, ErrorCode::Forbidden, "too many devices");
        }
        let first_device = user.devices.is_empty();
        user.devices.insert(device_id.clone(), conn);
        let committed = user.committed_seq;
        if let Some(old) = replaced {
            if let Some(s) = self.sessions.get_mut(&old) {
                s.device = None;
            }
            self.reply(
                old,
                frame(
                    0,
                    server_frame::Body::Kicked(proto::Kicked {
                        reason: "logged in elsewhere with the same device_id".into(),
                    }),
                ),
            );
            self.out.push(Output::Close {
                conn: old,
                code: CLOSE_REPLACED,
                reason: "replaced",
            });
        }
        let cursor = if l.last_seq > 0 {
            l.last_seq
        } else {
            store.cursor(&uid, &device_id)
        }
        .min(committed);
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.device = Some(Device {
                uid: uid.clone(),
                device_id,
                sent_upto: cursor,
                acked: cursor,
                progress_ms: now.mono_ms,
                own: VecDeque::new(),
            });
        }
        let friends = store.friends(&uid);
        let online_friends: Vec<String> = friends
            .iter()
            .filter(|f| {
                self.users
                    .get(f.as_str())
                    .is_some_and(|u| !u.devices.is_empty())
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
                }),
            ),
        );
        if first_device && replaced.is_none() {
            self.broadcast_presence(&uid, true, store);
        }
        self.pump(conn, now, store);
    }

    fn broadcast_presence(&mut self, uid: &str, online: bool, store: &dyn StoreRead) {
        for friend in store.friends(uid) {
            self.tell_presence(&friend, uid, online);
        }
    }

    /// Sends `Presence{uid, online}` to every online device of `to`.
    fn tell_presence(&mut self, to: &str, uid: &str, online: bool) {
        let Some(u) = self.users.get(to) else {
            return;
        };
        let conns: Vec<ConnId> = u.devices.values().copied().collect();
        for conn in conns {
            self.reply(
                conn,
                frame(
                    0,
                    server_frame::Body::Presence(proto::Presence {
                        uid: uid.to_owned(),
                        online,
                    }),
                ),
            );
        }
    }

    fn take_token(&mut self, conn: ConnId, now: Now) -> bool {
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

    fn send(
        &mut self,
        conn: ConnId,
        id: u64,
        s: proto::SendMessage,
        now: Now,
        store: &dyn StoreRead,
    ) {
        if !self.take_token(conn, now) {
            return self.reply(conn, error(id, ErrorCode::RateLimited, "too many messages"));
        }
        if !valid_id(&s.to_uid) || !valid_id(&s.client_msg_id) {
            return self.reply(
                conn,
                error(
                    id,
                    ErrorCode::BadRequest,
                    "to_uid and client_msg_id must be 1-64 bytes",
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
        let accepted = self.accept_send(
            from,
            &device,
            &s.to_uid,
            s.client_msg_id,
            s.content,
            now,
            store,
            Requester::Conn { conn, id },
        );
        if accepted.is_err() {
            self.reply(conn, error(id, ErrorCode::Unavailable, STORE_UNAVAILABLE));
        }
    }

    /// A send on a user's (or the system's) behalf from the admin API, with the same
    /// validation, durability and dedupe as a client send. `Output::AdminSent` answers it.
    #[allow(clippy::too_many_arguments)]
    pub fn admin_send(
        &mut self,
        admin: usize,
        from_uid: &str,
        to_uid: &str,
        client_msg_id: String,
        content: Vec<u8>,
        now: Now,
        store: &dyn StoreRead,
    ) -> Result<(), AdminSendError> {
        if !valid_id(from_uid) || !valid_id(to_uid) || !valid_id(&client_msg_id) {
            return Err(AdminSendError::Invalid(
                "from_uid, to_uid and client_msg_id must be 1-64 bytes",
            ));
        }
        if content.len() > self.cfg.max_content_bytes {
            return Err(AdminSendError::Invalid("content too large"));
        }
        let from = self
            .user(from_uid, store)
            .ok_or(AdminSendError::Unavailable)?;
        let accepted = self.accept_send(
            from.clone(),
            "admin",
            to_uid,
            client_msg_id,
            content,
            now,
            store,
            Requester::Admin(admin),
        );
        self.maybe_evict(&from);
        accepted.map_err(|_| AdminSendError::Unavailable)
    }

    fn acknowledgement(req: Requester, seq: u64, duplicate: bool, now: Now) -> Output {
        match req {
            Requester::Conn { conn, id } => Output::Frame {
                conn,
                frame: frame(
                    id,
                    server_frame::Body::SendOk(proto::SendOk {
                        seq,
                        server_time_ms: now.unix_ms,
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

    /// Dedupes, assigns seqs in both inboxes and queues the appends; the acknowledgement is
    /// released when the batch is durable. `from` must be cached. Fails, appending nothing,
    /// when the store cannot tell whether the id was used or where the recipient's inbox ends.
    #[allow(clippy::too_many_arguments)]
    fn accept_send(
        &mut self,
        from: Arc<str>,
        device: &str,
        to_uid: &str,
        client_msg_id: String,
        content: Vec<u8>,
        now: Now,
        store: &dyn StoreRead,
        req: Requester,
    ) -> Result<(), ReadError> {
        let hash = self.hasher.hash_one(client_msg_id.as_str());
        if let Some((seq, pending)) = self.earlier_send(&from, hash, &client_msg_id, store)? {
            let ok = Self::acknowledgement(req, seq, true, now);
            // A duplicate of a send not yet durable is answered when it is.
            if pending {
                self.deferred.push(ok);
            } else {
                self.out.push(ok);
            }
            return Ok(());
        }
        let Some(to) = self.user(to_uid, store) else {
            return Err(ReadError(format!(
                "the inbox of {to_uid} could not be read"
            )));
        };
        let body = wire::encode_body(
            &wire::Body {
                from_uid: &from,
                to_uid: &to,
                client_msg_id: &client_msg_id,
                content: &content,
                server_time_ms: now.unix_ms,
                from_device: device,
            },
            &mut self.scratch,
        );
        let owners = if to == from {
            [Some(from.clone()), None]
        } else {
            [Some(from.clone()), Some(to)]
        };
        let mut sender_seq = 0;
        for owner in owners.into_iter().flatten() {
            let user = self.users.get_mut(&owner).expect("loaded");
            user.assigned_seq += 1;
            user.uncommitted += 1;
            let seq = user.assigned_seq;
            if sender_seq == 0 {
                sender_seq = seq;
            }
            self.batch.appends.push(Append {
                owner,
                msg: StoredMessage {
                    seq,
                    server_time_ms: now.unix_ms,
                    body: body.clone(),
                },
            });
        }
        if let Some(f) = self.users.get_mut(&from).and_then(|u| u.sends.as_mut()) {
            f.insert(hash);
        }
        self.batch.sends.push((from, client_msg_id, sender_seq));
        if let Requester::Conn { conn, .. } = req {
            if let Some(dev) = self.sessions.get_mut(&conn).and_then(|s| s.device.as_mut()) {
                dev.own.push_back(sender_seq);
            }
        }
        self.deferred
            .push(Self::acknowledgement(req, sender_seq, false, now));
        Ok(())
    }

    /// The sender-inbox seq of an earlier send of `uid` with this client_msg_id (`hash` is its
    /// hash), and whether it is still pending. Loads the user's send filter at its first send.
    fn earlier_send(
        &mut self,
        uid: &Arc<str>,
        hash: u64,
        client_msg_id: &str,
        store: &dyn StoreRead,
    ) -> Result<Option<(u64, bool)>, ReadError> {
        let Some(user) = self.users.get(uid) else {
            return Ok(None);
        };
        if user.sends.as_ref().is_none_or(SendFilter::must_grow) {
            // First send of this cache lifetime, or more ids than the filter was sized for:
            // (re)build it from the store's newest ids and those still in flight.
            let hashes: Vec<u64> = store
                .recent_sends(uid)?
                .iter()
                .map(|(id, _)| id.as_str())
                .chain(self.pending_sends(uid).map(|(id, _)| id))
                .map(|id| self.hasher.hash_one(id))
                .collect();
            let f = SendFilter::with(hashes);
            if let Some(u) = self.users.get_mut(uid) {
                u.sends = Some(f);
            }
        }
        let filter = self.users.get(uid).and_then(|u| u.sends.as_ref());
        if !filter.is_some_and(|f| f.may_contain(hash)) {
            return Ok(None);
        }
        // A pending id is in one batch at most: a second send of it was a duplicate.
        if let Some((_, seq)) = self.pending_sends(uid).find(|(id, _)| *id == client_msg_id) {
            return Ok(Some((seq, true)));
        }
        Ok(store.sent(uid, client_msg_id)?.map(|seq| (seq, false)))
    }

    /// The idempotency keys of `uid` not committed yet, oldest first: (client_msg_id, seq).
    fn pending_sends<'a>(&'a self, uid: &'a str) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        let batches = self.in_flight.iter().map(|(_, b, _)| &**b);
        batches
            .chain(std::iter::once(&self.batch))
            .flat_map(|b| b.sends.iter())
            .filter(move |(u, _, _)| &**u == uid)
            .map(|(_, id, seq)| (id.as_str(), *seq))
    }

    fn ack(&mut self, conn: ConnId, seq: u64, now: Now, store: &dyn StoreRead) {
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
        self.pump(conn, now, store);
    }

    fn sync(&mut self, conn: ConnId, id: u64, s: proto::Sync, store: &dyn StoreRead) {
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
        let mut msgs = match store.messages_after(&uid, s.after_seq, limit + 1) {
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

    /// Sends the device as much of its committed inbox as the delivery window allows.
    fn pump(&mut self, conn: ConnId, now: Now, store: &dyn StoreRead) {
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
                for m in user.recent.range(skip..).take(room) {
                    if *bytes_room == 0 {
                        return;
                    }
                    let before = self.out.len();
                    if !advance(dev, m, conn, now, &mut self.out) {
                        return;
                    }
                    if self.out.len() > before {
                        *bytes_room = bytes_room.saturating_sub(output_cost(m.body.len()));
                    }
                }
            } else {
                // A failed read stops the stream here; the next ack or commit tries again.
                // Read no more than the room can take, counting each message as at least
                // MIN_DELIVERY_COST, so that a connection with little room reads little.
                let room = room.min(*bytes_room / MIN_DELIVERY_COST + 1);
                let older = match store.messages_after(&dev.uid, dev.sent_upto, room) {
                    Ok(older) => older,
                    Err(e) => {
                        log::error!("{e}");
                        break;
                    }
                };
                if older.is_empty() {
                    break;
                }
                for m in &older {
                    if *bytes_room == 0 {
                        return;
                    }
                    let before = self.out.len();
                    if !advance(dev, m, conn, now, &mut self.out) {
                        return;
                    }
                    if self.out.len() > before {
                        *bytes_room = bytes_room.saturating_sub(output_cost(m.body.len()));
                    }
                }
            }
        }
    }
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
fn output_cost(encoded: usize) -> usize {
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
    use super::*;
    use crate::im::auth::tests::{token, token_with_nbf};
    use crate::store::memory::MemoryStore;
    use client_frame::Body as C;
    use server_frame::Body as S;

    const SECRET: &[u8] = b"test-secret";

    struct H {
        core: Core,
        store: MemoryStore,
        now: Now,
    }

    impl H {
        fn new(cfg: ImConfig) -> H {
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
        fn req(&mut self, conn: ConnId, id: u64, body: C) -> Vec<Output> {
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

        fn turn(&mut self) -> Vec<Output> {
            let mut out: Vec<Output> = self.core.drain_output().collect();
            if let Some((id, batch)) = self.core.take_batch() {
                self.store.apply(&batch);
                self.core.on_committed(id, self.now, &self.store);
                out.extend(self.core.drain_output());
            }
            out
        }

        fn login(&mut self, conn: ConnId, uid: &str, device: &str, last_seq: u64) -> Vec<Output> {
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

        fn send(&mut self, conn: ConnId, to: &str, cmid: &str, text: &str) -> Vec<Output> {
            self.req(
                conn,
                7,
                C::Send(proto::SendMessage {
                    to_uid: to.into(),
                    client_msg_id: cmid.into(),
                    content: text.as_bytes().to_vec(),
                }),
            )
        }

        /// A send handed to the core within a turn that has not ended: nothing is committed.
        fn send_uncommitted(&mut self, conn: ConnId, to: &str, cmid: &str, text: &str) {
            self.core.on_frame(
                conn,
                ClientFrame {
                    id: 9,
                    body: Some(C::Send(proto::SendMessage {
                        to_uid: to.into(),
                        client_msg_id: cmid.into(),
                        content: text.as_bytes().to_vec(),
                    })),
                },
                self.now,
                &self.store,
            );
        }

        fn close(&mut self, conn: ConnId) -> Vec<Output> {
            self.core.on_close(conn, &self.store);
            self.turn()
        }
    }

    /// The (uid, online) of every Presence frame to `conn`.
    fn presence(out: &[Output], conn: ConnId) -> Vec<(String, bool)> {
        frames_to(out, conn)
            .into_iter()
            .filter_map(|b| match b {
                S::Presence(p) => Some((p.uid, p.online)),
                _ => None,
            })
            .collect()
    }

    fn frames_to(out: &[Output], conn: ConnId) -> Vec<S> {
        out.iter()
            .filter_map(|o| match o {
                Output::Frame { conn: c, frame } if *c == conn => frame.body.clone(),
                _ => None,
            })
            .collect()
    }

    /// (seq, content) of every message delivered to `conn`.
    fn messages_to(out: &[Output], conn: ConnId) -> Vec<(u64, String)> {
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

    fn closes(out: &[Output]) -> Vec<(ConnId, u16)> {
        out.iter()
            .filter_map(|o| match o {
                Output::Close { conn, code, .. } => Some((*conn, *code)),
                _ => None,
            })
            .collect()
    }

    fn error_code(out: &[Output], conn: ConnId) -> Option<ErrorCode> {
        frames_to(out, conn).into_iter().find_map(|b| match b {
            S::Error(e) => ErrorCode::try_from(e.code).ok(),
            _ => None,
        })
    }

    fn send_ok(out: &[Output], conn: ConnId) -> Option<proto::SendOk> {
        frames_to(out, conn).into_iter().find_map(|b| match b {
            S::SendOk(s) => Some(s),
            _ => None,
        })
    }

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
            assert_eq!(closes(&out), vec![(2, CLOSE_POLICY)]);
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
        assert_eq!(closes(&out), vec![(1, CLOSE_POLICY)]);
        let out = login(&mut h, 2, now);
        assert!(
            matches!(frames_to(&out, 2).first(), Some(S::LoginOk(_))),
            "{out:?}"
        );
    }

    #[test]
    fn send_is_acknowledged_only_when_durable_and_appends_to_both_inboxes() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        let before: Vec<Output> = h.core.drain_output().collect();
        assert!(send_ok(&before, 1).is_none(), "no SendOk before the commit");
        assert!(
            messages_to(&before, 2).is_empty(),
            "no delivery before the commit"
        );
        let (id, batch) = h.core.take_batch().unwrap();
        assert_eq!(batch.appends.len(), 2);
        h.store.apply(&batch);
        h.core.on_committed(id, h.now, &h.store);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(
            send_ok(&out, 1).map(|s| (s.seq, s.duplicate)),
            Some((1, false))
        );
        assert_eq!(messages_to(&out, 2), vec![(1, "hi".into())]);
        assert!(
            messages_to(&out, 1).is_empty(),
            "not echoed to the sending device"
        );
        // Each inbox has its own seq; a message to oneself is stored once.
        h.send(2, "alice", "m2", "yo");
        h.send(1, "alice", "self", "note");
        assert_eq!(h.store.max_seq("alice"), Ok(3));
        assert_eq!(h.store.max_seq("bob"), Ok(2));
    }

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
        assert_eq!(closes(&h.turn()), vec![(2, CLOSE_POLICY)]);
        // Nothing outstanding: never timed out.
        h.req(2, 0, C::Ack(proto::Ack { seq: 5 }));
        h.now.mono_ms += 1_000_000;
        h.core.check_ack_timeout(2, h.now);
        assert!(closes(&h.turn()).is_empty());
    }

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
                    })),
                },
                h.now,
                &h.store,
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
        // A retry in a later turn, while the original's batch is still being committed, waits
        // for that batch instead of costing a commit of its own.
        let send = |h: &mut H, id| {
            h.core.on_frame(
                1,
                ClientFrame {
                    id,
                    body: Some(C::Send(proto::SendMessage {
                        to_uid: "bob".into(),
                        client_msg_id: "later".into(),
                        content: b"c".to_vec(),
                    })),
                },
                h.now,
                &h.store,
            )
        };
        send(&mut h, 30);
        let (first, batch) = h.core.take_batch().unwrap();
        send(&mut h, 31);
        assert!(h.core.drain_output().next().is_none());
        assert!(h.core.take_batch().is_none(), "no batch of its own");
        h.store.apply(&batch);
        h.core.on_committed(first, h.now, &h.store);
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
    fn the_send_filter_covers_the_newest_keys_and_rarely_more() {
        let keys = RandomState::new();
        let mut f = SendFilter::with(Vec::new());
        assert_eq!(
            f.words.len() * 8,
            128,
            "one block per generation to start with"
        );
        for i in 0..5_000u64 {
            if f.must_grow() {
                f = SendFilter::with((0..i).map(|k| keys.hash_one(k)).collect());
            }
            f.insert(keys.hash_one(i));
            if i % 250 == 0 || i == 4_999 {
                let newest = i.saturating_sub(DEDUPE_KEEP as u64 - 1)..=i;
                assert!(newest.into_iter().all(|k| f.may_contain(keys.hash_one(k))));
            }
        }
        let false_hits = (1_000_000..1_100_000u64)
            .filter(|k| f.may_contain(keys.hash_one(k)))
            .count();
        assert!(
            false_hits < 100,
            "{false_hits} of 100,000 new ids looked used"
        );
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

    /// The memory store, except that every read about `uid` that can fail does.
    struct Failing<'a> {
        inner: &'a MemoryStore,
        uid: &'static str,
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
            self.fail(uid)?;
            self.inner.messages_after(uid, after, limit)
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
    }

    impl Failing<'_> {
        fn fail(&self, uid: &str) -> Result<(), ReadError> {
            if uid == self.uid {
                return Err(ReadError("disk on fire".into()));
            }
            Ok(())
        }
    }

    #[test]
    fn a_store_that_cannot_be_read_refuses_instead_of_guessing() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "carol", "phone", 0);
        let frame = |to: &str| ClientFrame {
            id: 5,
            body: Some(C::Send(proto::SendMessage {
                to_uid: to.into(),
                client_msg_id: "m1".into(),
                content: b"x".to_vec(),
            })),
        };
        // Where bob's inbox ends is unknown: nothing is appended, the sender is told.
        let bob_fails = Failing {
            inner: &h.store,
            uid: "bob",
        };
        h.core.on_frame(1, frame("bob"), h.now, &bob_fails);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(error_code(&out, 1), Some(ErrorCode::Unavailable));
        assert!(closes(&out).is_empty(), "the connection stays");
        assert!(h.core.take_batch().is_none(), "nothing appended");
        // Nor can bob log in.
        h.core.on_open(3, h.now);
        let exp = (h.now.unix_ms / 1000) as u64 + 3600;
        let login = ClientFrame {
            id: 1,
            body: Some(C::Login(proto::Login {
                token: token(SECRET, "bob", Some(exp)),
                device_id: "phone".into(),
                last_seq: 0,
            })),
        };
        h.core.on_frame(3, login, h.now, &bob_fails);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(error_code(&out, 3), Some(ErrorCode::Unavailable));
        assert_eq!(closes(&out), vec![(3, CLOSE_UNAVAILABLE)]);
        // Whether carol used the id before is unknown: refused rather than taken for new.
        let carol_fails = Failing {
            inner: &h.store,
            uid: "carol",
        };
        h.core.on_frame(2, frame("alice"), h.now, &carol_fails);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(error_code(&out, 2), Some(ErrorCode::Unavailable));
        assert!(h.core.take_batch().is_none(), "nothing appended");
        // Once the store reads again, the same send goes through.
        assert!(send_ok(&h.send(2, "alice", "m1", "x"), 2).is_some());
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
    fn an_answer_waiting_for_a_commit_never_reaches_the_next_connection_with_that_key() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        h.core.on_close(1, &h.store);
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
        assert!(!h.core.handle_room(2, 0, h.now, &h.store));
        assert!(h.core.handle_room(2, 10_000, h.now, &h.store));
        let next: Vec<u64> = messages_to(&h.turn(), 2).iter().map(|m| m.0).collect();
        assert_eq!(next, (8..=14).collect::<Vec<_>>());
        // Room reported while the stream was not starved does not deliver twice.
        assert!(h.core.handle_room(2, 100_000, h.now, &h.store));
        let rest: Vec<u64> = messages_to(&h.turn(), 2).iter().map(|m| m.0).collect();
        assert_eq!(rest, (15..=20).collect::<Vec<_>>());
        assert!(!h.core.handle_room(2, 100_000, h.now, &h.store));
        assert!(h.core.has_room(2));
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
        h.core.handle_room(1, 40_000, h.now, &h.store);
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
    fn presence_and_device_replacement() {
        let mut h = H::new(ImConfig::default());
        h.core.set_friendship("alice", "bob", true);
        h.turn();
        h.login(1, "alice", "phone", 0);
        let out = h.login(2, "bob", "phone", 0);
        let Some(S::LoginOk(ok)) = frames_to(&out, 2).into_iter().next() else {
            panic!()
        };
        assert_eq!(ok.online_friends, vec!["alice".to_owned()]);
        assert_eq!(presence(&out, 1), vec![("bob".into(), true)]);
        // A second device: no presence change.
        let out = h.login(3, "bob", "laptop", 0);
        assert!(presence(&out, 1).is_empty());
        // Same device again: the old connection is kicked with 4000, friends see nothing.
        let out = h.login(4, "bob", "laptop", 0);
        assert!(frames_to(&out, 3).iter().any(|b| matches!(b, S::Kicked(_))));
        assert_eq!(closes(&out), vec![(3, CLOSE_REPLACED)]);
        assert!(presence(&out, 1).is_empty());
        let out = h.close(3);
        assert!(
            presence(&out, 1).is_empty(),
            "closing the kicked one changes nothing"
        );
        h.close(2);
        let out = h.close(4);
        assert_eq!(presence(&out, 1), vec![("bob".into(), false)]);
    }

    #[test]
    fn a_friendship_made_or_ended_while_online_is_pushed_once_durable() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.core.set_friendship("alice", "bob", true);
        assert!(
            h.core.drain_output().next().is_none(),
            "nothing before it is durable"
        );
        let out = h.turn();
        assert_eq!(presence(&out, 1), vec![("bob".into(), true)]);
        assert_eq!(presence(&out, 2), vec![("alice".into(), true)]);
        // With carol offline, only she would have news: nothing is sent.
        h.core.set_friendship("alice", "carol", true);
        assert!(presence(&h.turn(), 1).is_empty());
        h.core.set_friendship("alice", "bob", false);
        let out = h.turn();
        assert_eq!(presence(&out, 1), vec![("bob".into(), false)]);
        assert_eq!(presence(&out, 2), vec![("alice".into(), false)]);
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
        assert_eq!(closes(&out), vec![(3, CLOSE_POLICY)]);
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
    fn ping_pong() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "a", 0);
        let out = h.req(1, 42, C::Ping(proto::Ping { client_time_ms: 7 }));
        let Some(S::Pong(p)) = frames_to(&out, 1).pop() else {
            panic!()
        };
        assert_eq!((p.client_time_ms, p.server_time_ms), (7, h.now.unix_ms));
    }
}
