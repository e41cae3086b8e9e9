//! The gateway: every decision about a connection that is not a socket call, as one sans-IO
//! state machine.
//!
//! [`Gateway`] owns, per connection, the transport state (a [`ws::Connection`], raw TCP
//! framing, or an HTTP exchange), the service on top of it, its queued output and its one
//! timer; besides them the IM core, the timer wheel with every deadline, every close decision
//! and the metrics. It reads no clock, opens no file and touches no socket: the reactor
//! (`crate::server`) passes time in as a value, bytes in as slices and takes bytes out
//! through any [`std::io::Write`].
//!
//! # The contract
//!
//! Inputs, each taking `now` where time matters:
//! - [`Gateway::handle_accept`]: a listener accepted a socket; the gateway names it
//!   ([`ConnId`]) or refuses it with bytes to send before closing.
//! - [`Gateway::handle_input`]: bytes read from a connection. Bytes it cannot take yet (its
//!   output is full, or it used its share of the turn) are kept and handed back by
//!   [`Gateway::take_held`]; the reactor reads the socket again only while
//!   [`Gateway::wants_input`] says so.
//! - [`Gateway::handle_eof`], [`Gateway::handle_closed`]: the peer's FIN; a socket error.
//! - [`Gateway::handle_timeout`]: time passed (call it when [`Gateway::poll_timeout`] is due).
//! - [`Gateway::handle_committed`]: the store made a batch from [`Gateway::poll_batch`]
//!   durable.
//! - [`Gateway::handle_shutdown`]: stop accepting and close every connection with 1001.
//!
//! Outputs, to be drained after every input:
//! - [`Gateway::poll_transmit`]: a connection with output to write; write it with
//!   [`Gateway::write_to`] (one vectored write of its queued bytes and its fresh output).
//! - [`Gateway::poll_close`]: a socket to shut down for writing or to drop.
//! - [`Gateway::poll_resume`]: a connection whose input should be handled again next turn.
//! - [`Gateway::poll_batch`]: store writes to make durable (one group commit per turn).
//! - [`Gateway::poll_timeout`]: the next deadline.
//!
//! Invariant: output for a connection is produced into its outbox, except during
//! [`Gateway::handle_input`] of an echo connection, whose answer is staged (and may point into
//! the input buffer, for the zero-copy echo): the reactor calls [`Gateway::write_to`] for that
//! connection, with the same input buffer, before it handles another connection or reuses the
//! buffer.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Write};
use std::ops::Range;
use std::sync::Arc;

use log::debug;
use slab::Slab;

pub mod admin_api;
mod close;
mod conn;
mod http;
mod im;
mod input;
mod metrics;
mod outbox;
mod timer_wheel;
mod timers;
mod transport;

#[cfg(test)]
mod tests;

use self::admin_api::{AdminAction, Response};
use self::close::Why;
use self::conn::Conn;
use self::metrics::Metrics;
use self::timer_wheel::TimerWheel;
use self::transport::{Phase, Route, Transport};
use crate::buffer_pool::BufferPool;
use crate::config::ServerConfig;
pub use crate::im::core::Now;
use crate::im::core::{BatchId, ClusterOp, Core, Published, ReadAnswer, ReadId, ReadRequest};
use crate::store::{Sent, WriteBatch};
use crate::ws::handshake::{Endpoint, HttpError, Policy};

/// A connection's name: the reactor keys its socket (and its poll token) by it.
pub type ConnId = usize;

/// Subprotocols of `/ws`: binary protobuf (also without a subprotocol), or JSON text.
const PROTOBUF_PROTOCOL: &str = "imgate.v1.proto";
const JSON_PROTOCOL: &str = "imgate.v1.json";
/// Size of pooled per-connection buffers (partial messages, unsent output).
const POOL_BUF: usize = 16 * 1024;
/// Idle pooled buffers kept warm (at most 16 MiB).
const POOL_MAX_FREE: usize = 1024;
/// Frames handled for one connection per loop turn: a flood of tiny frames gets no bigger
/// share of the turn than a flood of bytes.
pub const FRAMES_PER_TURN: usize = 512;
/// Echoed payloads at least this large are written from the input buffer, not copied.
const ZERO_COPY_MIN: usize = 1024;
/// Bytes a closed connection may still send (while we wait for its FIN) before it is dropped.
pub const MAX_DISCARD: usize = 64 * 1024;

/// The listening sockets a connection can come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// WebSocket upgrades and the web demo (`--listen`).
    Public,
    /// The admin HTTP API (`--admin-listen`).
    Admin,
    /// Length-prefixed IM frames (`--tcp-listen`).
    RawTcp,
}

/// The gateway's answer to an accepted socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Accept {
    /// Keep it under this name.
    Open(ConnId),
    /// Write these bytes (best effort; a fresh socket's send buffer is empty) and close it.
    Refuse(Vec<u8>),
}

/// What the reactor must do with a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketAction {
    /// Everything is written: shut down the sending side (the peer sees our FIN).
    ShutdownWrite(ConnId),
    /// The connection is gone from the gateway: deregister and close the socket.
    Drop(ConnId),
}

/// What became of bytes passed to [`Gateway::handle_input`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// All taken; the socket may be read on.
    Taken,
    /// The connection's output reached its high-water mark: write it now, then go on while
    /// [`Gateway::wants_input`] (the rest of the bytes is held).
    Full,
    /// The rest waits for a later turn (held; [`Gateway::poll_resume`] names it).
    Later,
    /// The connection is gone ([`Gateway::poll_close`] has its `Drop`).
    Gone,
}

/// Settings the gateway applies, in loop milliseconds and bytes.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    handshake_ms: u64,
    ping_ms: u64,
    idle_ms: u64,
    close_ms: u64,
    shutdown_ms: u64,
    auth_ms: u64,
    max_message_bytes: usize,
    max_connections: usize,
    max_outbound_bytes: usize,
    high_water: usize,
    max_empty_frames: u32,
    max_admins: usize,
}

/// The IM endpoint: the sans-IO core and what the admin API and the web demo need.
struct Im {
    core: Core,
    admin_token: Option<String>,
    /// The JWT secret when `--dev` is on: the web demo's `/dev/*` routes use it.
    dev_secret: Option<Vec<u8>>,
}

pub struct Gateway {
    limits: Limits,
    conns: Slab<Conn>,
    wheel: TimerWheel<ConnId>,
    fired: Vec<ConnId>,
    pool: BufferPool,
    endpoints: Vec<Endpoint<Route>>,
    policy: Policy,
    im: Im,
    metrics: Metrics,
    /// Output of the connection being handled by [`Gateway::handle_input`], written by the
    /// next [`Gateway::write_to`] for it without a copy into its outbox.
    staging: Vec<u8>,
    staging_owner: Option<ConnId>,
    /// Large echoed payloads left in the input buffer: (position in `staging` where the
    /// slice goes, range of the input buffer).
    input_refs: Vec<(usize, Range<usize>)>,
    /// Reused buffer for output into outboxes.
    scratch: Vec<u8>,
    /// Connections with output to write.
    dirty: Vec<ConnId>,
    closes: VecDeque<SocketAction>,
    resume: Vec<ConnId>,
    /// HTTP exchanges answered 204 once their batch is durable, oldest first.
    committing: VecDeque<(BatchId, ConnId)>,
    /// The requests of HTTP exchanges in `Phase::Reading`, carried out once the read answers.
    parked: HashMap<ConnId, AdminAction>,
    /// WebSocket and raw TCP connections past the upgrade (for `--max-connections`).
    open_count: usize,
    /// HTTP exchanges on the admin listener (for `--max-admin-connections`).
    admin_count: usize,
    /// Connections that are not HTTP exchanges: shutdown waits for them.
    stream_count: usize,
    shutdown_deadline: Option<u64>,
    now: Now,
    turn: u32,
    /// Frames the connection whose turn it is may still have handled.
    frames_left: usize,
}

impl Gateway {
    /// A gateway for `cfg`. It reads the store through [`Gateway::poll_read`] and writes
    /// through [`Gateway::poll_batch`].
    pub fn new(cfg: &ServerConfig) -> Gateway {
        let im = &cfg.im;
        let mut endpoints = Vec::new();
        if cfg.echo {
            endpoints.push(Endpoint {
                path: "/echo",
                protocols: &[],
                kind: Route::Echo,
            });
        }
        endpoints.push(Endpoint {
            path: "/ws",
            protocols: &[PROTOBUF_PROTOCOL, JSON_PROTOCOL],
            kind: Route::Im,
        });
        Gateway {
            limits: Limits {
                handshake_ms: millis(cfg.handshake_timeout),
                ping_ms: millis(cfg.ping_interval),
                idle_ms: millis(cfg.idle_timeout),
                close_ms: millis(cfg.close_timeout),
                shutdown_ms: millis(cfg.shutdown_timeout),
                auth_ms: millis(im.auth_timeout),
                max_message_bytes: cfg.max_message_bytes,
                max_connections: cfg.max_connections,
                max_outbound_bytes: cfg.max_outbound_bytes,
                high_water: cfg.outbound_high_water,
                max_empty_frames: cfg.max_empty_frames,
                max_admins: im.max_admin_connections,
            },
            conns: Slab::with_capacity(cfg.max_connections.min(1 << 20) + 64),
            wheel: TimerWheel::new(),
            fired: Vec::new(),
            pool: BufferPool::new(POOL_BUF, POOL_MAX_FREE),
            endpoints,
            policy: Policy {
                allowed_origins: cfg.allowed_origins.clone(),
            },
            im: Im {
                core: Core::new(im.core.clone(), &im.jwt_secret),
                admin_token: im.admin_token.clone(),
                dev_secret: im.dev_routes.then(|| im.jwt_secret.clone()),
            },
            metrics: Metrics::new(),
            staging: Vec::with_capacity(64 * 1024),
            staging_owner: None,
            input_refs: Vec::new(),
            scratch: Vec::new(),
            dirty: Vec::new(),
            closes: VecDeque::new(),
            resume: Vec::new(),
            committing: VecDeque::new(),
            parked: HashMap::new(),
            open_count: 0,
            admin_count: 0,
            stream_count: 0,
            shutdown_deadline: None,
            now: Now {
                mono_ms: 0,
                unix_ms: 0,
            },
            turn: 0,
            frames_left: FRAMES_PER_TURN,
        }
    }

    /// Paths of the WebSocket endpoints.
    pub fn endpoint_paths(&self) -> Vec<&'static str> {
        self.endpoints.iter().map(|e| e.path).collect()
    }

    /// Starts a loop turn at `now`: each connection gets one share of input per turn.
    pub fn begin_turn(&mut self, now: Now) {
        self.now = now;
        self.turn = self.turn.wrapping_add(1);
        self.metrics.loop_turns.inc();
    }

    /// A listener accepted a socket.
    ///
    /// Refused (with what to send) beyond `--max-connections` (raw TCP; a WebSocket is
    /// counted at its upgrade) or `--max-admin-connections`, and while shutting down.
    pub fn handle_accept(&mut self, kind: ListenerKind, now: Now) -> Accept {
        self.now = now;
        let at = now.mono_ms;
        let transport = match kind {
            ListenerKind::Public => {
                let mut ws = crate::ws::Connection::new(self.limits.max_message_bytes);
                ws.set_max_empty_frames(self.limits.max_empty_frames);
                Transport::Ws { ws, service: None }
            }
            ListenerKind::RawTcp => {
                if self.shutdown_deadline.is_some()
                    || self.open_count >= self.limits.max_connections
                {
                    return Accept::Refuse(Vec::new());
                }
                Transport::tcp(self.limits.max_message_bytes)
            }
            ListenerKind::Admin => {
                if self.admin_count >= self.limits.max_admins {
                    return Accept::Refuse(
                        Response::error(503, "too many admin connections").to_bytes(),
                    );
                }
                Transport::http(true)
            }
        };
        let mut conn = Conn::new(transport, at);
        match kind {
            ListenerKind::Admin => self.admin_count += 1,
            ListenerKind::RawTcp => {
                conn.counted_open = true;
                self.open_count += 1;
                self.stream_count += 1;
            }
            ListenerKind::Public => self.stream_count += 1,
        }
        let key = self.conns.insert(conn);
        if kind == ListenerKind::RawTcp {
            self.im.core.on_open(key, now);
        }
        self.arm_timer(key);
        Accept::Open(key)
    }

    /// What to send on a connection accepted only to be refused, because the process is out
    /// of file descriptors: 503 on HTTP listeners, nothing (a plain close) on raw TCP.
    pub fn shed_answer(&self, kind: ListenerKind) -> Vec<u8> {
        match kind {
            ListenerKind::Public => HttpError::Unavailable.response(),
            ListenerKind::Admin => {
                Response::error(503, "out of file descriptors; try again").to_bytes()
            }
            ListenerKind::RawTcp => Vec::new(),
        }
    }

    /// Whether the reactor should hand the connection input now: it exists, is not
    /// throttled, and (for IM) the core has room for what the input would produce.
    pub fn wants_input(&self, conn: ConnId) -> bool {
        self.conns.get(conn).is_some_and(|c| !c.throttled) && !self.im.core.is_waiting(conn)
    }

    /// Moves the connection's held input (see [`Input`]) into `buf`; returns its length, or
    /// None when nothing is held and the socket should be read.
    pub fn take_held(&mut self, conn: ConnId, buf: &mut [u8]) -> Option<usize> {
        let c = self.conns.get_mut(conn)?;
        if c.held.is_empty() {
            return None;
        }
        let n = c.held.len();
        buf[..n].copy_from_slice(&c.held);
        self.pool.give(std::mem::take(&mut c.held));
        Some(n)
    }

    /// The peer closed its sending side.
    pub fn handle_eof(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.peer_eof = true;
            if matches!(c.transport, Transport::Http { .. }) {
                self.http_input(conn);
            }
            // What is left to write decides when the connection ends (see `after_write`).
            self.mark_dirty(conn);
        }
    }

    /// The socket failed (a read or write error): the connection is gone. No
    /// [`SocketAction::Drop`] follows; the reactor drops the socket itself.
    pub fn handle_closed(&mut self, conn: ConnId) {
        self.remove(conn);
        self.closes.retain(|a| *a != SocketAction::Drop(conn));
    }

    /// Ends the connection's read for this turn: frees its idle protocol buffers and moves
    /// what the input produced towards its outbox.
    pub fn end_input(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.transport.release_buffers(&mut self.pool);
        }
        self.settle_staging();
        self.dispatch_im();
    }

    /// Time passed: fires every due deadline.
    pub fn handle_timeout(&mut self, now: Now) {
        self.now = now;
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.expire(now.mono_ms, &mut fired);
        for key in fired.drain(..) {
            self.on_timer(key);
        }
        self.fired = fired;
        self.im.core.handle_timeout(now);
    }

    /// The next deadline (loop milliseconds), if any.
    pub fn poll_timeout(&self) -> Option<u64> {
        [
            self.wheel.next_wakeup(),
            self.shutdown_deadline,
            self.im.core.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The store writes of this turn, to be committed together.
    pub fn poll_batch(&mut self) -> Option<(BatchId, Arc<WriteBatch>)> {
        self.im.core.take_batch()
    }

    /// The next store read the IM core needs: run it off the network thread, then hand its
    /// answer to [`Gateway::handle_read`].
    pub fn poll_read(&mut self) -> Option<(ReadId, ReadRequest)> {
        self.im.core.poll_read()
    }

    /// The answer to a store read: the IM core carries on, and a connection whose input
    /// waited for it is read again ([`Gateway::poll_resume`]).
    pub fn handle_read(&mut self, rid: ReadId, answer: ReadAnswer, now: Now) {
        self.now = now;
        if let Some(conn) = self.im.core.handle_read(rid, answer, now) {
            self.resume.push(conn);
        }
        self.dispatch_im();
    }

    /// The cluster work of this turn (subscriptions, publishes), for the bus.
    pub fn drain_routes(&mut self) -> std::vec::Drain<'_, ClusterOp> {
        self.im.core.drain_routes()
    }

    /// A node (this one: `mine`) published news on `uid`'s channel.
    pub fn handle_published(&mut self, uid: &str, news: Published, mine: bool, now: Now) {
        self.now = now;
        self.im.core.handle_published(uid, news, mine, now);
        self.dispatch_im();
    }

    /// The channel every node hears is heard (again): cached group members are dropped.
    pub fn handle_cluster_heard(&mut self) {
        self.im.core.handle_cluster_heard();
    }

    /// The node's presence lease was made anew: its devices are recorded again.
    pub fn handle_lease_made(&mut self) {
        self.im.core.handle_lease_made();
    }

    /// The subscription to `uid`'s channel holds: the core reads where its inbox ends.
    pub fn handle_subscribed(&mut self, uid: &str) {
        self.im.core.handle_subscribed(uid);
    }

    /// These batches (in id order, with the answers to their sends) are durable (`took`: how
    /// long the commit took): acknowledge and deliver them, and answer the admin requests
    /// that waited for them.
    pub fn handle_committed(
        &mut self,
        answers: Vec<(BatchId, Vec<Sent>)>,
        took: std::time::Duration,
        now: Now,
    ) {
        self.now = now;
        self.metrics.commit_latency.observe(took.as_secs_f64());
        let Some(id) = answers.last().map(|(id, _)| *id) else {
            return;
        };
        let together: Vec<(BatchId, &[Sent])> =
            answers.iter().map(|(b, s)| (*b, s.as_slice())).collect();
        self.im.core.on_committed_together(&together, now);
        self.answer_committing(id, Response::no_content);
        self.dispatch_im();
    }

    /// The store did not confirm these batches (in id order): their sends are refused
    /// (UNAVAILABLE; 503 on the admin API), and the admin changes that waited for them are
    /// answered 503.
    pub fn handle_refused(&mut self, ids: &[BatchId], now: Now) {
        self.now = now;
        self.metrics.commits_refused.inc_by(ids.len() as u64);
        let Some(&last) = ids.last() else {
            return;
        };
        for &id in ids {
            self.im.core.on_refused(id);
        }
        self.answer_committing(last, http::unconfirmed);
        self.dispatch_im();
    }

    /// Answers the admin changes that wait for batches up to `id`.
    fn answer_committing(&mut self, id: BatchId, response: fn() -> Response) {
        while self.committing.front().is_some_and(|(b, _)| *b <= id) {
            let Some((batch, key)) = self.committing.pop_front() else {
                break;
            };
            let waiting = self.conns.get(key).is_some_and(|c| {
                matches!(c.transport, Transport::Http { phase: Phase::Committing(b), .. } if b == batch)
            });
            if waiting {
                self.answer_http(key, response().to_bytes());
            }
        }
    }

    /// Stops taking connections and closes every open one with 1001; the rest are dropped.
    /// The reactor stops listening on the public port itself.
    pub fn handle_shutdown(&mut self, now: Now) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        self.now = now;
        log::info!(
            "shutting down: closing {} connections with 1001",
            self.stream_count
        );
        self.shutdown_deadline = Some(now.mono_ms + self.limits.shutdown_ms);
        let keys: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c.transport, Transport::Http { .. }))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            if !self.close(key, Why::ShuttingDown) {
                self.remove(key);
            }
        }
    }

    /// Whether a shutdown has finished: every connection is closed, or the deadline passed
    /// (the stragglers' count is returned with it).
    pub fn is_finished(&self, now: u64) -> Option<usize> {
        let deadline = self.shutdown_deadline?;
        (self.stream_count == 0 || now >= deadline).then_some(self.stream_count)
    }

    /// Whether staged output points into the input buffer: then it must be written (see
    /// [`Gateway::write_to`]) before the buffer is reused.
    pub fn output_refers_to_input(&self) -> bool {
        !self.input_refs.is_empty()
    }

    /// A connection with output to write, each once per call of [`Gateway::write_to`].
    pub fn poll_transmit(&mut self) -> Option<ConnId> {
        while let Some(key) = self.dirty.pop() {
            // Not dirty any more when it was written since it was listed.
            if self.conns.get(key).is_some_and(|c| c.dirty) {
                return Some(key);
            }
        }
        None
    }

    /// The next socket action, in the order decided.
    pub fn poll_close(&mut self) -> Option<SocketAction> {
        self.closes.pop_front()
    }

    /// A connection whose input goes on next turn (it used its share, or it was throttled
    /// and its output drained).
    pub fn poll_resume(&mut self) -> Option<ConnId> {
        self.resume.pop()
    }

    /// Writes the connection's output to `w` in one vectored write: its queued bytes, then
    /// what its last input produced (slices of `input` included: pass the buffer that input
    /// was in). Then keeps the connection's flow control: it becomes throttled at the
    /// high-water mark and resumes under half of it; the IM core learns how much room is
    /// left, and what that releases is written in the same call.
    ///
    /// Errors: a write error other than `WouldBlock` ends the connection (a `Drop` follows).
    pub fn write_to(&mut self, conn: ConnId, w: &mut impl Write, input: &[u8]) {
        if let Some(c) = self.conns.get_mut(conn) {
            c.dirty = false;
        }
        loop {
            if let Err(e) = self.flush(conn, w, input) {
                debug!("conn {conn}: write error: {e}");
                self.remove(conn);
                return;
            }
            let Some(c) = self.conns.get_mut(conn) else {
                return;
            };
            let high_water = self.limits.high_water;
            let queued = c.outbox.len();
            if c.throttled && queued <= high_water / 2 {
                c.throttled = false;
                self.resume.push(conn);
            } else if !c.throttled && queued >= high_water {
                c.throttled = true;
            }
            let room = if c.throttled { 0 } else { high_water - queued };
            let produced = c.transport.is_im() && self.im.core.handle_room(conn, room, self.now);
            if !produced {
                break;
            }
            self.dispatch_im();
        }
        self.after_write(conn);
    }

    /// Close decisions once a connection's output is written: the slow-consumer limit, the
    /// half-close after the last byte of a Close, the end of the connection.
    fn after_write(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        if c.outbox.len() > self.limits.max_outbound_bytes {
            self.close(conn, Why::SlowConsumer);
        }
        let Some(c) = self.conns.get_mut(conn) else {
            return;
        };
        let closed = c.transport.is_closed();
        if closed && c.outbox.is_empty() && !c.write_shut {
            if matches!(c.transport, Transport::Http { .. }) {
                // One exchange per connection: the answer is out.
                self.remove(conn);
                return;
            }
            self.closes.push_back(SocketAction::ShutdownWrite(conn));
            c.write_shut = true;
        }
        // An HTTP exchange's peer may half-close after its request and still read the answer.
        let http = matches!(c.transport, Transport::Http { .. });
        if c.peer_eof && !http && (!closed || c.outbox.is_empty()) {
            self.remove(conn);
            return;
        }
        self.arm_timer(conn);
    }

    /// Bytes read from a connection that closed and shut its side down, counted until
    /// [`MAX_DISCARD`]: past it the connection is dropped. Returns whether it is still there.
    fn discard_after_close(&mut self, conn: ConnId, n: usize) -> bool {
        let Some(c) = self.conns.get_mut(conn) else {
            return false;
        };
        if !(c.transport.is_closed() && c.write_shut) {
            return true;
        }
        c.discarded = c.discarded.saturating_add(n.try_into().unwrap_or(u32::MAX));
        if c.discarded as usize > MAX_DISCARD {
            // Closed, and still sending: nothing it sends is read any more, so reading it
            // on until the close timeout is waste.
            debug!("conn {conn}: still sending after the close; dropped");
            self.remove(conn);
            return false;
        }
        true
    }

    /// One write of `conn`'s queue, its staged output (if it owns the staging buffer) and
    /// the input slices that output refers to.
    fn flush(&mut self, conn: ConnId, w: &mut impl Write, input: &[u8]) -> io::Result<()> {
        let staged = self.staging_owner == Some(conn);
        let Some(c) = self.conns.get_mut(conn) else {
            return Ok(());
        };
        let result = if !staged {
            c.outbox.flush(w, &[], &mut self.pool)
        } else if self.input_refs.is_empty() {
            c.outbox.flush(w, &[&self.staging], &mut self.pool)
        } else {
            let mut slices: Vec<&[u8]> = Vec::with_capacity(2 * self.input_refs.len() + 1);
            let mut at = 0;
            for (pos, range) in &self.input_refs {
                slices.push(&self.staging[at..*pos]);
                slices.push(&input[range.clone()]);
                at = *pos;
            }
            slices.push(&self.staging[at..]);
            c.outbox.flush(w, &slices, &mut self.pool)
        };
        if staged {
            self.staging.clear();
            self.input_refs.clear();
            self.staging_owner = None;
            if self.staging.capacity() > 256 * 1024 {
                self.staging.shrink_to(64 * 1024);
            }
        }
        result.map(|n| {
            self.metrics.bytes_out.inc_by(n as u64);
        })
    }

    /// Moves an IM connection's staged output into its outbox, so that what the core
    /// produces for it next leaves after it. An echo connection's stays staged (nothing else
    /// is produced for it), to be written without a copy.
    fn settle_staging(&mut self) {
        let im_owner = self
            .staging_owner
            .is_some_and(|o| self.conns.get(o).is_some_and(|c| c.transport.is_im()));
        if im_owner {
            self.queue_staging();
        }
    }

    /// Moves staged output into its owner's outbox, whatever the owner. Staged output that
    /// points into the input stays (see the module docs).
    fn queue_staging(&mut self) {
        let Some(owner) = self.staging_owner else {
            return;
        };
        if !self.input_refs.is_empty() {
            return;
        }
        if let Some(c) = self.conns.get_mut(owner) {
            c.outbox.push(&self.staging, &mut self.pool);
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(owner);
            }
        }
        self.staging.clear();
        self.staging_owner = None;
    }

    fn mark_dirty(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.get_mut(conn) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(conn);
            }
        }
    }

    /// Forgets a connection: its timer, its counts, its buffers, its IM session; the reactor
    /// is told to drop the socket.
    fn remove(&mut self, key: ConnId) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if let Some((id, _)) = conn.timer.take() {
            self.wheel.cancel(id);
        }
        if conn.counted_open {
            self.open_count -= 1;
        }
        if let Transport::Http { .. } = conn.transport {
            self.parked.remove(&key);
        }
        match conn.transport {
            Transport::Http { admin: true, .. } => self.admin_count -= 1,
            Transport::Http { admin: false, .. } => {}
            _ => self.stream_count -= 1,
        }
        if self.staging_owner == Some(key) {
            self.staging.clear();
            self.input_refs.clear();
            self.staging_owner = None;
        }
        conn.transport.release_buffers(&mut self.pool);
        self.pool.give(std::mem::take(&mut conn.held));
        self.closes.push_back(SocketAction::Drop(key));
        if conn.transport.is_im() {
            self.im.core.on_close(key);
            self.dispatch_im();
        }
    }

    /// The connection counts per state and transport for `GET /metrics`.
    fn connection_counts(&self) -> Vec<(&'static str, &'static str, i64)> {
        let mut counts: Vec<(&'static str, &'static str, i64)> = Vec::new();
        for (_, c) in self.conns.iter() {
            let Some(transport) = c.transport.metrics_label() else {
                continue;
            };
            let state = match c.state() {
                crate::ws::State::Handshaking | crate::ws::State::AwaitingAccept => "handshaking",
                crate::ws::State::Open => "open",
                crate::ws::State::CloseSent | crate::ws::State::Closed => "closing",
            };
            match counts
                .iter_mut()
                .find(|(s, t, _)| *s == state && *t == transport)
            {
                Some(entry) => entry.2 += 1,
                None => counts.push((state, transport, 1)),
            }
        }
        counts
    }
}

pub(crate) fn millis(d: std::time::Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX / 4)
}
