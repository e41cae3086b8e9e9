//! The mio reactor: the one place that owns sockets and reads the clock.
//!
//! Each turn: wait for readiness (or the gateway's next deadline), read every ready socket
//! until it would block (bounded per turn so one flooding peer cannot starve the rest) and
//! hand the bytes to the [`Gateway`], fire due deadlines, hand the turn's store writes to the
//! storage thread, then write every connection's output with one (vectored) write and carry
//! out the gateway's socket actions. Nothing here knows about WebSocket, HTTP or IM.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};

mod accept;

use self::accept::Listeners;
use super::signals::ShutdownSignals;
use crate::config::{ImSettings, ServerConfig};
use crate::gateway::{ConnId, Gateway, Input, ListenerKind, Now, SocketAction};
use crate::store::reader::Reader;
use crate::store::redb_store::RedbStore;
use crate::store::redis::{Bus, BusEvent, RedisBackend};
use crate::store::writer::{Done, Writer};
use crate::store::{Store, StoreRead};

const PUBLIC: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const STORE_WAKER: Token = Token(usize::MAX - 3);
const ADMIN: Token = Token(usize::MAX - 4);
const RAW_TCP: Token = Token(usize::MAX - 5);

/// Shared receive buffer: every socket is read into it, so idle connections need none.
const READ_BUF: usize = 64 * 1024;
/// Bytes read from one connection per loop turn before the others get their turn.
const READ_BUDGET: usize = 256 * 1024;

/// The store the storage thread commits to, and the one the read thread reads: the same
/// embedded store, or two connections to the cluster's Redis, so that reads never wait
/// behind a commit.
///
/// Errors: a store that cannot be opened, a Redis that cannot be reached.
fn open_store(im: &ImSettings) -> io::Result<(Arc<dyn Store>, Arc<dyn StoreRead + Send + Sync>)> {
    let Some(redis) = &im.redis else {
        let store = Arc::new(
            RedbStore::open(&im.data_dir, im.store_cache_bytes, im.store_log_bytes)
                .map_err(|e| io::Error::other(e.to_string()))?,
        );
        return Ok((store.clone(), store));
    };
    let io = redis_io_timeout(redis.timeout);
    let backend = || RedisBackend::new(redis.target.clone(), io, redis.timeout);
    let (store, reads) = (backend().waiting_for(redis.wait_replicas), backend());
    store
        .check()
        .map_err(|e| io::Error::other(format!("{}: {e}", redis.target)))?;
    Ok((Arc::new(store), Arc::new(reads)))
}

/// A listener on `addr` as mio binds one (SO_REUSEADDR, a backlog of 1024), with
/// SO_REUSEPORT too when `reuse_port`, so that several processes may share the port.
fn bind(addr: SocketAddr, reuse_port: bool) -> io::Result<TcpListener> {
    if !reuse_port {
        return TcpListener::bind(addr);
    }
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(TcpListener::from_std(s.into()))
}

/// How long one Redis answer may take: a third of `--redis-timeout`, so that a commit can
/// try again on a new connection before the timeout has passed.
fn redis_io_timeout(timeout: Duration) -> Duration {
    (timeout / 3).max(Duration::from_millis(50))
}

/// A name for this process among the cluster's nodes, new at every start: a restarted node
/// is another node, and what the dead one held is cleaned up after it.
fn node_id() -> String {
    use std::hash::BuildHasher;
    let seed = (std::process::id(), unix_ms(), Instant::now());
    format!(
        "{:016x}",
        std::collections::hash_map::RandomState::new().hash_one(format!("{seed:?}"))
    )
}

pub struct Server {
    poll: Poll,
    gateway: Gateway,
    listeners: Listeners,
    signals: ShutdownSignals,
    writer: Writer,
    /// Runs the IM core's store reads; answers wake the loop through the writer's waker.
    reader: Reader,
    /// A node of a cluster: the pub/sub threads, which wake the loop through the same waker.
    bus: Option<Bus>,
    /// Sockets, indexed by the gateway's [`ConnId`].
    sockets: Vec<Option<TcpStream>>,
    read_buf: Vec<u8>,
    /// Connections whose read budget ran out with input possibly left in the socket, or that
    /// the gateway resumed: read in the next turn.
    again: Vec<ConnId>,
    /// A spare descriptor, given up to accept-and-close a connection when the process is out
    /// of descriptors, so the listener never spins on EMFILE.
    reserve_fd: Option<File>,
    accept_paused_until: Option<u64>,
    last_emfile_log: Option<u64>,
    epoch: Instant,
    /// Loop time (ms since start), read once per turn.
    now: u64,
    /// Wall-clock time of this turn, in Unix milliseconds.
    unix_ms: i64,
}

impl Server {
    /// Binds the listeners, opens the store and starts its thread; nothing is accepted until
    /// [`Server::run`].
    ///
    /// Errors: a listener that cannot be bound, a store that cannot be opened.
    pub fn bind(cfg: ServerConfig) -> io::Result<Server> {
        let poll = Poll::new()?;
        let registry = poll.registry();
        let listen = |addr, token| -> io::Result<TcpListener> {
            let mut l = bind(addr, cfg.reuse_port)?;
            registry.register(&mut l, token, Interest::READABLE)?;
            Ok(l)
        };
        let public = listen(cfg.listen, PUBLIC)?;
        let admin = listen(cfg.im.admin_listen, ADMIN)?;
        let listeners = Listeners {
            admin_addr: admin.local_addr()?,
            admin,
            public_addr: public.local_addr()?,
            public: Some(public),
            raw_tcp: cfg.im.tcp_listen.map(|a| listen(a, RAW_TCP)).transpose()?,
        };
        let signals = ShutdownSignals::register(registry, SIGNALS)?;
        let im = &cfg.im;
        let (store, reads) = open_store(im)?;
        // One waker for both threads: a poll takes one at most.
        let waker = Arc::new(mio::Waker::new(registry, STORE_WAKER)?);
        let writer = Writer::spawn(store, im.sync, waker.clone())?;
        let reader = Reader::spawn(reads.clone(), waker.clone())?;
        let bus = match &im.redis {
            Some(r) => {
                let node = node_id();
                info!("cluster node {node}");
                Some(Bus::spawn(
                    r.target.clone(),
                    redis_io_timeout(r.timeout),
                    r.lease,
                    &node,
                    waker,
                )?)
            }
            None => None,
        };
        Ok(Server {
            gateway: Gateway::new(&cfg),
            poll,
            listeners,
            signals,
            writer,
            reader,
            bus,
            // Reserved up front: growing it by doubling would leave the old copies behind in
            // the allocator, and each slot is 4 bytes.
            sockets: Vec::with_capacity(cfg.max_connections.min(1 << 20) + 64),
            read_buf: vec![0; READ_BUF],
            again: Vec::new(),
            reserve_fd: File::open("/dev/null").ok(),
            accept_paused_until: None,
            last_emfile_log: None,
            epoch: Instant::now(),
            now: 0,
            unix_ms: 0,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.public_addr
    }

    /// Address of the admin HTTP API.
    pub fn admin_addr(&self) -> SocketAddr {
        self.listeners.admin_addr
    }

    /// Address of the raw TCP listener, when enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.listeners.raw_tcp.as_ref()?.local_addr().ok()
    }

    /// Paths of the WebSocket endpoints this server exposes.
    pub fn endpoint_paths(&self) -> Vec<&'static str> {
        self.gateway.endpoint_paths()
    }

    /// Runs until a shutdown signal has been handled; then every connection has been closed
    /// (or the shutdown timeout passed).
    ///
    /// Errors: the poller failing, or a store commit failing (fail-stop: acknowledging
    /// anything after it could lose messages).
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            self.now = self.clock();
            if let Some(dropped) = self.gateway.is_finished(self.now) {
                info!("shutdown complete ({dropped} connections dropped at the deadline)");
                return Ok(());
            }
            if let Err(e) = self.poll.poll(&mut events, self.poll_timeout()) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.now = self.clock();
            self.unix_ms = unix_ms();
            self.gateway.begin_turn(self.now_value());
            // Connections scheduled in an earlier turn go on after this turn's events; those
            // scheduled during this turn wait for the next one.
            let scheduled = std::mem::take(&mut self.again);
            for ev in events.iter() {
                match ev.token() {
                    PUBLIC => self.accept_all(ListenerKind::Public),
                    ADMIN => self.accept_all(ListenerKind::Admin),
                    RAW_TCP => self.accept_all(ListenerKind::RawTcp),
                    STORE_WAKER => self.on_store_done()?,
                    SIGNALS => {
                        if self.signals.take() {
                            self.begin_shutdown();
                        }
                    }
                    Token(key) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(key, ev.is_read_closed() || ev.is_error());
                        }
                        if ev.is_writable() {
                            self.write(key);
                        }
                    }
                }
            }
            for key in scheduled {
                self.on_readable(key, false);
            }
            self.gateway.handle_timeout(self.now_value());
            if self.accept_paused_until.is_some_and(|t| self.now >= t) {
                self.accept_paused_until = None;
                for kind in [
                    ListenerKind::Public,
                    ListenerKind::Admin,
                    ListenerKind::RawTcp,
                ] {
                    self.accept_all(kind);
                }
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

    fn clock(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Hands the turn's store writes to the storage thread (group commit), then writes what
    /// every connection has to send: pending writes leave before the loop sleeps.
    fn end_turn(&mut self) {
        if let Some((id, batch)) = self.gateway.poll_batch() {
            self.writer.submit(id, batch);
        }
        while let Some((rid, req)) = self.gateway.poll_read() {
            self.reader.submit(rid, req);
        }
        if let Some(bus) = &self.bus {
            bus.submit(self.gateway.drain_routes());
        }
        self.flush_all();
        while let Some(key) = self.gateway.poll_resume() {
            self.again.push(key);
        }
    }

    fn flush_all(&mut self) {
        while let Some(key) = self.gateway.poll_transmit() {
            self.write(key);
        }
        self.apply_socket_actions();
    }

    fn poll_timeout(&self) -> Option<Duration> {
        if !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        [self.gateway.poll_timeout(), self.accept_paused_until]
            .into_iter()
            .flatten()
            .min()
            .map(|t| Duration::from_millis(t.saturating_sub(self.now)))
    }

    /// The storage threads answered: reads carry the IM core's work on, and committed
    /// batches are acknowledged and delivered.
    fn on_store_done(&mut self) -> io::Result<()> {
        let answers: Vec<_> = self.reader.completed().collect();
        for (rid, answer) in answers {
            let now = self.now_value();
            self.gateway.handle_read(rid, answer, now);
        }
        if let Some(bus) = &self.bus {
            let heard: Vec<BusEvent> = bus.completed().collect();
            for e in heard {
                let now = self.now_value();
                match e {
                    BusEvent::Subscribed(uid) => self.gateway.handle_subscribed(&uid),
                    BusEvent::ClusterHeard => self.gateway.handle_cluster_heard(),
                    BusEvent::LeaseMade => self.gateway.handle_lease_made(),
                    BusEvent::Published { uid, news, mine } => {
                        self.gateway.handle_published(&uid, news, mine, now)
                    }
                }
            }
        }
        let done: Vec<Done> = self.writer.completed().collect();
        for d in done {
            match d {
                Done::Committed { answers, took } => {
                    let now = self.now_value();
                    self.gateway.handle_committed(answers, took, now);
                }
                Done::Refused { ids, error } => {
                    log::warn!("{error}: {} batches refused", ids.len());
                    let now = self.now_value();
                    self.gateway.handle_refused(&ids, now);
                }
                Done::Failed(e) => {
                    log::error!("{e}; stopping: no send is acknowledged unless it is durable");
                    return Err(io::Error::other(e));
                }
            }
        }
        Ok(())
    }

    fn begin_shutdown(&mut self) {
        if let Some(mut listener) = self.listeners.public.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
        let now = self.now_value();
        self.gateway.handle_shutdown(now);
        self.flush_all();
    }

    /// Reads until the socket is drained. A short read means it is (a later arrival raises a
    /// new edge), which saves the extra read that would only return WouldBlock, unless the
    /// peer's FIN is already known to be queued: then read on until EOF.
    ///
    /// A connection the gateway does not want input for (throttled) is not read at all, and
    /// one that used its share of the turn is read again next turn, after the others.
    fn on_readable(&mut self, key: ConnId, expect_eof: bool) {
        if !self.gateway.claim_turn(key) {
            return;
        }
        let mut total = 0;
        loop {
            if !self.gateway.wants_input(key) {
                break;
            }
            let (n, from_socket) = match self.gateway.take_held(key, &mut self.read_buf) {
                Some(n) => (n, false),
                None => {
                    let Some(sock) = self.sockets.get_mut(key).and_then(Option::as_mut) else {
                        return;
                    };
                    match sock.read(&mut self.read_buf) {
                        Ok(0) => {
                            self.gateway.handle_eof(key);
                            break;
                        }
                        Ok(n) => {
                            total += n;
                            if !self.gateway.handle_received(key, n, self.now_value()) {
                                self.apply_socket_actions();
                                return;
                            }
                            (n, true)
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => {
                            debug!("conn {key}: read error: {e}");
                            self.drop_socket(key);
                            return;
                        }
                    }
                }
            };
            let now = self.now_value();
            match self.gateway.handle_input(key, &mut self.read_buf[..n], now) {
                Input::Taken => {}
                Input::Later => break,
                Input::Gone => {
                    self.apply_socket_actions();
                    return;
                }
                Input::Full => {
                    self.gateway.end_input(key);
                    self.write(key);
                    if !self.gateway.go_on(key) {
                        break;
                    }
                    continue;
                }
            }
            if self.gateway.output_refers_to_input() {
                // Written before the next read reuses `read_buf`.
                self.write(key);
            }
            if total >= READ_BUDGET {
                self.again.push(key);
                break;
            }
            if from_socket && n < self.read_buf.len() && !expect_eof {
                break;
            }
        }
        self.gateway.end_input(key);
        self.write(key);
    }

    /// Writes the connection's output with one vectored write, then carries out the socket
    /// actions the gateway decided on.
    fn write(&mut self, key: ConnId) {
        if let Some(sock) = self.sockets.get_mut(key).and_then(Option::as_mut) {
            self.gateway.write_to(key, sock, &self.read_buf);
        }
        self.apply_socket_actions();
    }

    fn apply_socket_actions(&mut self) {
        while let Some(action) = self.gateway.poll_close() {
            match action {
                SocketAction::ShutdownWrite(key) => {
                    if let Some(sock) = self.sockets.get(key).and_then(Option::as_ref) {
                        let _ = sock.shutdown(Shutdown::Write);
                    }
                }
                SocketAction::Drop(key) => self.deregister(key),
            }
        }
    }

    /// The socket failed: the gateway forgets the connection and the socket is closed.
    fn drop_socket(&mut self, key: ConnId) {
        self.gateway.handle_closed(key);
        self.deregister(key);
        self.apply_socket_actions();
    }

    fn deregister(&mut self, key: ConnId) {
        if let Some(mut sock) = self.sockets.get_mut(key).and_then(Option::take) {
            let _ = self.poll.registry().deregister(&mut sock);
        }
    }
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
