//! The single-threaded mio loop: the one place that owns sockets and reads the clock.
//!
//! Each turn: wait for readiness (or the next timer), read every ready socket until it would
//! block (bounded per turn so one flooding peer cannot starve the rest), run the bytes through
//! the sans-IO connection, write each connection's output for the turn with one (vectored)
//! write, then fire due timers. Handlers are small functions over explicit state; nothing
//! captures the world.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::ops::Range;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

mod http;
mod im;
mod input;

use self::http::AdminConn;
use self::input::{process_input, Cx, Stop};
use super::conn::{Conn, Service, TimerKind};
use super::metrics::Metrics;
use super::signals::ShutdownSignals;
use super::timer_wheel::TimerWheel;
use super::transport::Transport;
use crate::buffer_pool::BufferPool;
use crate::config::ServerConfig;
use crate::im::core::{Core, Now};
use crate::server::admin::Response;
use crate::store::redb_store::RedbStore;
use crate::store::writer::Writer;
use crate::store::Store;
use crate::ws::handshake::{Endpoint, HttpError, Policy};
use crate::ws::{code, State};
use std::sync::Arc;

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const STORE_WAKER: Token = Token(usize::MAX - 3);
const ADMIN_LISTENER: Token = Token(usize::MAX - 4);
const TCP_LISTENER: Token = Token(usize::MAX - 5);
/// Subprotocols of `/ws`: binary protobuf (also without a subprotocol), or JSON text.
const PROTOBUF_PROTOCOL: &str = "imgate.v1.proto";
const JSON_PROTOCOL: &str = "imgate.v1.json";
/// Admin connections use tokens from here up; WebSocket connections use their slab key.
const ADMIN_BASE: usize = usize::MAX / 2;

/// Shared receive buffer: every socket is read into it, so idle connections need none.
const READ_BUF: usize = 64 * 1024;
/// Bytes read from one connection per loop turn before the others get their turn.
const READ_BUDGET: usize = 256 * 1024;
/// Frames handled for one connection per loop turn, besides the byte budget: a flood of tiny
/// frames gets no bigger share of the turn than a flood of bytes.
const FRAMES_PER_TURN: usize = 512;
/// Size of pooled per-connection buffers (partial messages, unsent output).
const POOL_BUF: usize = 16 * 1024;
/// Idle pooled buffers kept warm (at most 16 MiB).
const POOL_MAX_FREE: usize = 1024;
/// How long accepting pauses when out of descriptors and no reserve descriptor is left.
const ACCEPT_PAUSE_MS: u64 = 100;
/// Echoed payloads at least this large are written from the receive buffer, not copied.
const ZERO_COPY_MIN: usize = 1024;

pub struct Server {
    cfg: ServerConfig,
    poll: Poll,
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Option<ShutdownSignals>,
    conns: Slab<Conn>,
    wheel: TimerWheel<usize>,
    pool: BufferPool,
    read_buf: Vec<u8>,
    /// Output produced for the connection being handled, written at the end of its turn.
    staging: Vec<u8>,
    /// Large payloads echoed straight from `read_buf` instead of being copied into
    /// `staging`: (position in `staging` where the slice goes, range of `read_buf`). They are
    /// written before `read_buf` is reused.
    input_refs: Vec<(usize, Range<usize>)>,
    /// Connections whose read budget ran out with input possibly left in the socket.
    again: Vec<usize>,
    /// Counts loop turns (see [`Conn::read_turn`]).
    turn: u64,
    fired: Vec<usize>,
    endpoints: Vec<Endpoint<Service>>,
    policy: Policy,
    open_count: usize,
    /// A spare descriptor, given up to accept-and-close a connection when the process is out
    /// of descriptors, so the listener never spins on EMFILE.
    reserve_fd: Option<File>,
    accept_paused_until: Option<u64>,
    last_emfile_log: Option<u64>,
    shutdown_deadline: Option<u64>,
    epoch: Instant,
    now: u64,
    /// Wall-clock time of this loop turn, in Unix milliseconds.
    unix_ms: i64,
    im: Option<ImService>,
    /// Connections that got output from the IM core this turn, flushed at its end.
    dirty: Vec<usize>,
    /// Admin connections whose answer became ready.
    admin_ready: Vec<usize>,
    metrics: Metrics,
}

/// The IM endpoint's state: the sans-IO core, its store and the storage thread.
struct ImService {
    core: Core,
    store: Arc<dyn Store>,
    writer: Writer,
    auth_timeout_ms: u64,
    /// Reused buffer for encoding frames to other connections.
    scratch: Vec<u8>,
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    admin_token: Option<String>,
    admins: Slab<AdminConn>,
    max_admins: usize,
    tcp_listener: Option<TcpListener>,
    /// The JWT secret when `--dev` is on: the web demo's `/dev/*` routes use it.
    dev_secret: Option<Vec<u8>>,
}

impl Server {
    /// Binds the listener and prepares the loop; nothing is accepted until [`Server::run`].
    pub fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let poll = Poll::new()?;
        let mut listener = TcpListener::bind(cfg.listen)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let local_addr = listener.local_addr()?;
        let signals = ShutdownSignals::register(poll.registry(), SIGNALS)?;
        let mut endpoints = Vec::new();
        if cfg.echo {
            endpoints.push(Endpoint {
                path: "/echo",
                protocols: &[],
                kind: Service::Echo,
            });
        }
        let im = match &cfg.im {
            Some(settings) => {
                let store: Arc<dyn Store> = Arc::new(
                    RedbStore::open(
                        &settings.data_dir,
                        settings.store_cache_bytes,
                        settings.store_log_bytes,
                    )
                    .map_err(|e| io::Error::other(e.to_string()))?,
                );
                let waker = Arc::new(mio::Waker::new(poll.registry(), STORE_WAKER)?);
                let writer = Writer::spawn(store.clone(), settings.sync, waker)?;
                endpoints.push(Endpoint {
                    path: "/ws",
                    protocols: &[PROTOBUF_PROTOCOL, JSON_PROTOCOL],
                    kind: Service::Im,
                });
                let tcp_listener = match settings.tcp_listen {
                    Some(addr) => {
                        let mut l = TcpListener::bind(addr)?;
                        poll.registry()
                            .register(&mut l, TCP_LISTENER, Interest::READABLE)?;
                        Some(l)
                    }
                    None => None,
                };
                let mut admin_listener = TcpListener::bind(settings.admin_listen)?;
                poll.registry().register(
                    &mut admin_listener,
                    ADMIN_LISTENER,
                    Interest::READABLE,
                )?;
                Some(ImService {
                    core: Core::new(settings.core.clone(), &settings.jwt_secret),
                    store,
                    writer,
                    auth_timeout_ms: millis(settings.auth_timeout),
                    scratch: Vec::new(),
                    admin_addr: admin_listener.local_addr()?,
                    admin_listener,
                    admin_token: settings.admin_token.clone(),
                    max_admins: settings.max_admin_connections,
                    admins: Slab::new(),
                    tcp_listener,
                    dev_secret: settings.dev_routes.then(|| settings.jwt_secret.clone()),
                })
            }
            None => None,
        };
        let capacity = cfg.max_connections.min(1 << 20) + 64;
        Ok(Server {
            im,
            dirty: Vec::new(),
            admin_ready: Vec::new(),
            metrics: Metrics::new(),
            unix_ms: 0,
            policy: Policy {
                allowed_origins: cfg.allowed_origins.clone(),
            },
            cfg,
            poll,
            listener: Some(listener),
            local_addr,
            signals: Some(signals),
            conns: Slab::with_capacity(capacity),
            wheel: TimerWheel::new(),
            pool: BufferPool::new(POOL_BUF, POOL_MAX_FREE),
            read_buf: vec![0; READ_BUF],
            staging: Vec::with_capacity(READ_BUF + 64),
            input_refs: Vec::new(),
            again: Vec::new(),
            turn: 0,
            fired: Vec::new(),
            endpoints,
            open_count: 0,
            reserve_fd: File::open("/dev/null").ok(),
            accept_paused_until: None,
            last_emfile_log: None,
            shutdown_deadline: None,
            epoch: Instant::now(),
            now: 0,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Address of the admin HTTP API, when the IM endpoint is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.im.as_ref().map(|im| im.admin_addr)
    }

    /// Address of the raw TCP listener, when enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.im
            .as_ref()
            .and_then(|im| im.tcp_listener.as_ref())
            .and_then(|l| l.local_addr().ok())
    }

    /// Paths of the WebSocket endpoints this server exposes.
    pub fn endpoint_paths(&self) -> Vec<&'static str> {
        self.endpoints.iter().map(|e| e.path).collect()
    }

    /// Runs until a shutdown signal has been handled; then every connection has been closed
    /// (or the shutdown timeout passed).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            self.now = self.clock();
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || self.now >= deadline {
                    info!(
                        "shutdown complete ({} connections dropped at the deadline)",
                        self.conns.len()
                    );
                    return Ok(());
                }
            }
            if let Err(e) = self.poll.poll(&mut events, self.poll_timeout()) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = self.clock();
            self.unix_ms = unix_ms();
            self.turn += 1;
            // Connections scheduled in an earlier turn go on after this turn's events; those
            // scheduled during this turn wait for the next one.
            let scheduled = std::mem::take(&mut self.again);
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept_all(Listener::Public),
                    STORE_WAKER => self.on_store_done()?,
                    ADMIN_LISTENER => self.accept_all(Listener::Admin),
                    TCP_LISTENER => self.accept_all(Listener::RawTcp),
                    SIGNALS => {
                        if self.signals.as_mut().is_some_and(|s| s.take()) {
                            self.begin_shutdown();
                        }
                    }
                    // After the fixed tokens above, which lie in the same range.
                    Token(t) if t >= ADMIN_BASE => self.on_admin(t - ADMIN_BASE),
                    Token(key) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(key, ev.is_read_closed() || ev.is_error());
                        }
                        if ev.is_writable() {
                            self.after_io(key);
                        }
                    }
                }
            }
            for key in scheduled {
                self.on_readable(key, false);
            }
            let mut fired = std::mem::take(&mut self.fired);
            self.wheel.expire(self.now, &mut fired);
            for key in fired.drain(..) {
                self.on_timer(key);
            }
            self.fired = fired;
            if self.accept_paused_until.is_some_and(|t| self.now >= t) {
                self.accept_paused_until = None;
                self.accept_everywhere();
            }
            self.end_turn();
        }
    }

    fn now_value(&self) -> Now {
        Now {
            mono_ms: self.now,
            unix_ms: self.unix_ms,
        }
    }

    /// Hands the turn's store writes to the storage thread (group commit) and writes the
    /// output the IM core produced for other connections.
    fn end_turn(&mut self) {
        if let Some(im) = self.im.as_mut() {
            if let Some((id, batch)) = im.core.take_batch() {
                im.writer.submit(id, batch);
            }
        }
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty.drain(..) {
            self.after_io(key);
        }
        self.dirty = dirty;
    }

    fn clock(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        [
            self.wheel.next_wakeup(),
            self.accept_paused_until,
            self.shutdown_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|t| Duration::from_millis(t.saturating_sub(self.now)))
    }

    fn listener(&self, kind: Listener) -> Option<&TcpListener> {
        match kind {
            Listener::Public => self.listener.as_ref(),
            Listener::Admin => self.im.as_ref().map(|im| &im.admin_listener),
            Listener::RawTcp => self.im.as_ref().and_then(|im| im.tcp_listener.as_ref()),
        }
    }

    /// Accepts every waiting connection of one listener. The same for each listener: the
    /// backlog is always drained (an edge-triggered listener left with a backlog would never
    /// be woken again), by shedding when descriptors run out, or by a pause after which every
    /// listener is tried again.
    fn accept_all(&mut self, kind: Listener) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listener(kind) else {
                return;
            };
            match listener.accept() {
                Ok((sock, _)) => match kind {
                    Listener::Public => self.add_conn(sock),
                    Listener::Admin => self.add_admin(sock),
                    Listener::RawTcp => self.add_tcp(sock),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_transient_accept_error(&e) => {}
                Err(e) if is_fd_exhaustion(&e) => {
                    if !self.shed_one_connection(kind) {
                        return;
                    }
                }
                Err(e) => {
                    warn!("accept on the {kind:?} listener failed: {e}; pausing accepts for {ACCEPT_PAUSE_MS} ms");
                    self.accept_paused_until = Some(self.now + ACCEPT_PAUSE_MS);
                    return;
                }
            }
        }
    }

    /// Accepts on every listener (after a pause).
    fn accept_everywhere(&mut self) {
        for kind in [Listener::Public, Listener::Admin, Listener::RawTcp] {
            self.accept_all(kind);
        }
    }

    /// Out of descriptors: use the reserve one to accept the oldest pending connection of the
    /// listener and refuse it (503 on HTTP, a plain close on raw TCP), so the backlog drains
    /// instead of the loop spinning on EMFILE or the listener stalling. Returns whether a
    /// connection was shed (so accepting may continue).
    fn shed_one_connection(&mut self, kind: Listener) -> bool {
        if self.last_emfile_log.is_none_or(|t| self.now >= t + 1000) {
            warn!(
                "out of file descriptors with {} connections: refusing new ones",
                self.conns.len()
            );
            self.last_emfile_log = Some(self.now);
        }
        let Some(reserve) = self.reserve_fd.take() else {
            self.accept_paused_until = Some(self.now + ACCEPT_PAUSE_MS);
            return false;
        };
        drop(reserve);
        // Linux reports EMFILE before looking at the queue, so an empty backlog only shows
        // up here, as WouldBlock: then there is nothing left to shed.
        let shed = match self.listener(kind).map(|l| l.accept()) {
            Some(Ok((mut sock, _))) => {
                let refusal = match kind {
                    Listener::Public => HttpError::Unavailable.response(),
                    Listener::Admin => {
                        Response::error(503, "out of file descriptors; try again").to_bytes()
                    }
                    Listener::RawTcp => Vec::new(),
                };
                // Best effort on a fresh socket, whose send buffer is empty.
                let _ = sock.write(&refusal);
                true
            }
            _ => false,
        };
        self.reserve_fd = File::open("/dev/null").ok();
        if self.reserve_fd.is_none() {
            self.accept_paused_until = Some(self.now + ACCEPT_PAUSE_MS);
            return false;
        }
        shed
    }

    fn add_conn(&mut self, mut sock: TcpStream) {
        if let Err(e) = sock.set_nodelay(true) {
            debug!("set_nodelay: {e}");
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if !watch(self.poll.registry(), &mut sock, Token(key)) {
            return;
        }
        let mut conn = Conn::new(sock, self.cfg.max_message_bytes, self.now);
        if let Transport::Ws(ws) = &mut conn.transport {
            ws.set_max_empty_frames(self.cfg.max_empty_frames);
        }
        entry.insert(conn);
        let deadline = self.now + millis(self.cfg.handshake_timeout);
        self.conns[key].timer = Some(self.wheel.insert(deadline, key));
    }

    /// Reads until the socket is drained. A short read means it is (a later arrival raises a
    /// new edge), which saves the extra read that would only return WouldBlock, unless the
    /// peer's FIN is already known to be queued: then read on until EOF.
    ///
    /// A throttled connection is not read at all (see [`Conn::throttled`]), and one that used
    /// its share of the turn (bytes or frames) is read again next turn, after the others.
    fn on_readable(&mut self, key: usize, expect_eof: bool) {
        match self.conns.get_mut(key) {
            // Already had its share this turn: the rest is scheduled for the next one, or
            // the socket was drained (and new bytes raise a new event).
            Some(conn) if conn.read_turn == self.turn => return,
            Some(conn) => conn.read_turn = self.turn,
            None => return,
        }
        let mut total = 0;
        let mut frames_left = FRAMES_PER_TURN;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            if conn.throttled {
                break;
            }
            let (n, from_socket) = if conn.held.is_empty() {
                match conn.sock.read(&mut self.read_buf) {
                    Ok(0) => {
                        conn.peer_eof = true;
                        break;
                    }
                    Ok(n) => {
                        conn.last_inbound = self.now;
                        total += n;
                        self.metrics.bytes_in.inc_by(n as u64);
                        if conn.transport.is_closed() && conn.write_shut {
                            conn.discarded += n;
                            if conn.discarded > READ_BUF {
                                // Closed, and still sending: nothing it sends is read any
                                // more, so reading it on until the close timeout is waste.
                                debug!("conn {key}: still sending after the close; dropped");
                                self.remove(key);
                                return;
                            }
                        }
                        (n, true)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        debug!("conn {key}: read error: {e}");
                        self.remove(key);
                        return;
                    }
                }
            } else {
                let n = conn.held.len();
                self.read_buf[..n].copy_from_slice(&conn.held);
                self.pool.give(std::mem::take(&mut conn.held));
                (n, false)
            };
            match self.handle_read(key, n, &mut frames_left) {
                Handled::All => {}
                Handled::Held => break,
                Handled::Removed => return,
            }
            if total >= READ_BUDGET {
                self.again.push(key);
                break;
            }
            if from_socket && n < self.read_buf.len() && !expect_eof {
                break;
            }
        }
        if let Some(conn) = self.conns.get_mut(key) {
            conn.transport.release_buffers(&mut self.pool);
        }
        self.queue_staged(key);
        self.dispatch_im();
        self.after_io(key);
    }

    /// Handles the first `n` bytes of `read_buf` for connection `key`, frame by frame. When
    /// the connection's output reaches the high-water mark, what it has so far is dispatched
    /// and written; if that does not make room, the rest of the bytes is held (as it is when
    /// the connection's share of the turn runs out).
    fn handle_read(&mut self, key: usize, n: usize, frames_left: &mut usize) -> Handled {
        let mut off = 0;
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return Handled::Removed;
            };
            let mut cx = Cx {
                key,
                metrics: &self.metrics,
                now: Now {
                    mono_ms: self.now,
                    unix_ms: self.unix_ms,
                },
                im: self.im.as_mut(),
                staging: &mut self.staging,
                input_refs: &mut self.input_refs,
                pool: &mut self.pool,
                endpoints: &self.endpoints,
                policy: &self.policy,
                open_count: &mut self.open_count,
                max_connections: self.cfg.max_connections,
                shutting_down: self.shutdown_deadline.is_some(),
                handover: None,
                high_water: self.cfg.outbound_high_water,
                frames_left,
                read_base: self.read_buf.as_ptr() as usize,
                read_len: n,
            };
            let (used, stop) = process_input(conn, &mut self.read_buf[off..n], &mut cx);
            off += used;
            if let Some(action) = cx.handover.take() {
                self.hand_over_to_http(key, action);
                return Handled::Removed;
            }
            if !self.input_refs.is_empty() {
                // The next read reuses `read_buf`: write what points into it now.
                if let Err(e) = self.flush(key) {
                    debug!("conn {key}: write error: {e}");
                    self.remove(key);
                    return Handled::Removed;
                }
            }
            match stop {
                None => return Handled::All,
                Some(Stop::TurnShare) => {
                    self.hold(key, off..n);
                    self.again.push(key);
                    return Handled::Held;
                }
                Some(Stop::OutputFull) => {
                    self.queue_staged(key);
                    self.dispatch_im();
                    self.after_io(key);
                    let Some(conn) = self.conns.get(key) else {
                        return Handled::Removed;
                    };
                    let has_room = self.im.as_ref().is_none_or(|im| im.core.has_room(key));
                    if conn.throttled {
                        // Resumed (scheduled again) once the output drains.
                        self.hold(key, off..n);
                        return Handled::Held;
                    }
                    if !has_room {
                        self.hold(key, off..n);
                        self.again.push(key);
                        return Handled::Held;
                    }
                }
            }
        }
    }

    /// Keeps `read_buf[range]` for the connection to handle later.
    fn hold(&mut self, key: usize, range: Range<usize>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        debug_assert!(conn.held.is_empty());
        if range.is_empty() {
            return;
        }
        if conn.held.capacity() == 0 {
            conn.held = self.pool.take();
        }
        conn.held.extend_from_slice(&self.read_buf[range]);
    }

    /// Queues the connection's staged output behind its outbox, so that what the IM core
    /// produces next leaves after it: output leaves in the order it was produced (the `101`
    /// before the answer to a frame pipelined behind the upgrade request).
    fn queue_staged(&mut self, key: usize) {
        if self.staging.is_empty() || !self.input_refs.is_empty() {
            return;
        }
        if let Some(conn) = self.conns.get_mut(key) {
            if conn.service == Some(Service::Im) {
                conn.outbox.push(&self.staging, &mut self.pool);
                self.staging.clear();
            }
        }
    }

    /// Writes the turn's output, enforces the outbound limit, re-arms the timer for the
    /// current state and takes the connection through the TCP close when it is done.
    ///
    /// Also keeps the connection's flow control: it becomes throttled when its unsent output
    /// reaches the high-water mark and is resumed (read again, next turn) once that is under
    /// half of it; the IM core learns how much room is left, and a delivery window that
    /// stopped for lack of room moves on.
    fn after_io(&mut self, key: usize) {
        loop {
            if let Err(e) = self.flush(key) {
                debug!("conn {key}: write error: {e}");
                self.remove(key);
                return;
            }
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let high_water = self.cfg.outbound_high_water;
            let queued = conn.outbox.len();
            if conn.throttled && queued <= high_water / 2 {
                conn.throttled = false;
                self.again.push(key);
            } else if !conn.throttled && queued >= high_water {
                conn.throttled = true;
            }
            let room = if conn.throttled {
                0
            } else {
                high_water - queued
            };
            let is_im = conn.service == Some(Service::Im);
            let now = self.now_value();
            let produced = is_im
                && self
                    .im
                    .as_mut()
                    .is_some_and(|im| im.core.handle_room(key, room, now, &*im.store));
            if !produced {
                break;
            }
            self.dispatch_im();
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.outbox.len() > self.cfg.max_outbound_bytes {
            close_slow_consumer(key, conn, &self.metrics, &mut self.staging);
            conn.outbox.push(&self.staging, &mut self.pool);
            self.staging.clear();
        }
        if conn.transport.is_closed() && conn.outbox.is_empty() && !conn.write_shut {
            let _ = conn.sock.shutdown(Shutdown::Write);
            conn.write_shut = true;
        }
        let done = conn.peer_eof && (!conn.transport.is_closed() || conn.outbox.is_empty());
        if done {
            self.remove(key);
            return;
        }
        self.arm_timer(key);
    }

    /// Writes the staged output (with any slices of `read_buf` it refers to) behind the
    /// connection's queued output, in one write; what the socket does not take is queued.
    fn flush(&mut self, key: usize) -> io::Result<()> {
        let result = match self.conns.get_mut(key) {
            Some(conn) if self.input_refs.is_empty() => {
                conn.outbox
                    .flush(&mut conn.sock, &[&self.staging], &mut self.pool)
            }
            Some(conn) => {
                let mut slices: Vec<&[u8]> = Vec::with_capacity(2 * self.input_refs.len() + 1);
                let mut at = 0;
                for (pos, range) in &self.input_refs {
                    slices.push(&self.staging[at..*pos]);
                    slices.push(&self.read_buf[range.clone()]);
                    at = *pos;
                }
                slices.push(&self.staging[at..]);
                conn.outbox.flush(&mut conn.sock, &slices, &mut self.pool)
            }
            None => Ok(0),
        };
        let result = result.map(|n| {
            self.metrics.bytes_out.inc_by(n as u64);
        });
        self.staging.clear();
        self.input_refs.clear();
        if self.staging.capacity() > 4 * READ_BUF {
            self.staging.shrink_to(READ_BUF + 64);
        }
        result
    }

    /// Makes sure the connection's timer matches its state: a handshake deadline, the next
    /// keep-alive check, or the close deadline.
    fn arm_timer(&mut self, key: usize) {
        let conn = &mut self.conns[key];
        let want = TimerKind::for_state(conn.transport.state());
        if conn.timer.is_some() && conn.timer_kind == want {
            return;
        }
        let deadline = match want {
            TimerKind::Handshake => self.now + millis(self.cfg.handshake_timeout),
            TimerKind::KeepAlive => {
                let mut at = keepalive_deadline(conn, &self.cfg);
                if let Some(im) = &self.im {
                    if conn.service == Some(Service::Im) && !im.core.is_logged_in(key) {
                        at = at.min(conn.opened_ms + im.auth_timeout_ms);
                    }
                }
                at
            }
            TimerKind::Close => self.now + millis(self.cfg.close_timeout),
        };
        if let Some(id) = conn.timer.take() {
            self.wheel.cancel(id);
        }
        conn.timer = Some(self.wheel.insert(deadline, key));
        conn.timer_kind = want;
    }

    fn on_timer(&mut self, key: usize) {
        if key >= ADMIN_BASE {
            return self.on_admin_timer(key - ADMIN_BASE);
        }
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.timer = None;
        match conn.transport.state() {
            State::Handshaking | State::AwaitingAccept => {
                debug!("conn {key}: handshake timeout");
                self.remove(key);
            }
            State::Open => {
                let now = self.now;
                if now >= conn.last_inbound + millis(self.cfg.idle_timeout) && conn.throttled {
                    // Nothing was read from it all this time because it reads nothing.
                    close_slow_consumer(key, conn, &self.metrics, &mut self.staging);
                } else if now >= conn.last_inbound + millis(self.cfg.idle_timeout) {
                    debug!("conn {key}: idle timeout");
                    conn.transport
                        .close(code::GOING_AWAY, "idle timeout", &mut self.staging);
                    self.metrics.close(code::GOING_AWAY, "server");
                } else if now
                    >= conn.last_inbound.max(conn.last_ping) + millis(self.cfg.ping_interval)
                {
                    conn.transport.ping(&mut self.staging);
                    conn.last_ping = now;
                }
                if conn.service == Some(Service::Im) {
                    // The ping staged above leaves before whatever the IM core says now (a
                    // Close for overdue acks): output leaves in the order it was produced.
                    self.queue_staged(key);
                    self.im_timer(key);
                }
                self.after_io(key);
            }
            State::CloseSent | State::Closed => {
                debug!("conn {key}: close timeout");
                self.remove(key);
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline.is_some() {
            return;
        }
        info!(
            "shutting down: closing {} connections with 1001",
            self.conns.len()
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        self.shutdown_deadline = Some(self.now + millis(self.cfg.shutdown_timeout));
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            if conn
                .transport
                .close(code::GOING_AWAY, "server shutting down", &mut self.staging)
            {
                self.metrics.close(code::GOING_AWAY, "server");
                self.after_io(key);
            } else {
                self.remove(key);
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if let Some(id) = conn.timer.take() {
            self.wheel.cancel(id);
        }
        if conn.counted_open {
            self.open_count -= 1;
        }
        let _ = self.poll.registry().deregister(&mut conn.sock);
        conn.transport.release_buffers(&mut self.pool);
        self.pool.give(std::mem::take(&mut conn.held));
        if conn.service == Some(Service::Im) {
            if let Some(im) = self.im.as_mut() {
                im.core.on_close(key, &*im.store);
                self.dispatch_im();
            }
        }
    }
}

/// The listening sockets; each accepts through [`Server::accept_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Listener {
    /// WebSocket upgrades and the web demo (`--listen`).
    Public,
    /// The admin HTTP API (`--admin-listen`).
    Admin,
    /// Length-prefixed IM frames (`--tcp-listen`).
    RawTcp,
}

/// How far [`Server::handle_read`] got with a read.
enum Handled {
    /// Every byte was handled.
    All,
    /// The rest is held in [`Conn::held`] for later.
    Held,
    /// The connection is gone (closed, failed, or handed over to an HTTP exchange).
    Removed,
}

/// Starts closing a connection with more than `--max-outbound-bytes` unsent: the Close frame
/// goes to `out`. Does nothing if it is not open (already closing).
fn close_slow_consumer(key: usize, conn: &mut Conn, metrics: &Metrics, out: &mut Vec<u8>) {
    if !conn.transport.is_open() {
        return;
    }
    warn!(
        "conn {key}: slow consumer ({} bytes unsent), closing with 1008",
        conn.outbox.len()
    );
    conn.transport
        .close(code::POLICY_VIOLATION, "slow consumer", out);
    metrics.slow_consumer_kills.inc();
    metrics.close(code::POLICY_VIOLATION, "server");
}

/// When the keep-alive timer must next look at an open connection: the idle deadline, or the
/// next ping if that comes first. Both count from the last inbound byte.
fn keepalive_deadline(conn: &Conn, cfg: &ServerConfig) -> u64 {
    let idle = conn.last_inbound + millis(cfg.idle_timeout);
    let ping = conn.last_inbound.max(conn.last_ping) + millis(cfg.ping_interval);
    idle.min(ping)
}

/// Registers an accepted socket for reading and writing (edge-triggered); false, logged,
/// when the poller refuses it (the socket is then dropped).
fn watch(registry: &mio::Registry, sock: &mut TcpStream, token: Token) -> bool {
    match registry.register(sock, token, Interest::READABLE | Interest::WRITABLE) {
        Ok(()) => true,
        Err(e) => {
            warn!("register: {e}");
            false
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX / 4)
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) || matches!(e.raw_os_error(), Some(libc::EPROTO | libc::EPERM))
}
