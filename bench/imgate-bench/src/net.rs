//! The socket layer: one mio poll (edge-triggered), many client WebSocket connections.
//!
//! Reads go into one shared scratch buffer; only an incomplete frame is copied into the
//! connection's own buffer, so an idle connection holds no buffers. Output is appended to a
//! per-connection buffer and written once per loop turn ([`Net::flush`]), so a batch of
//! frames costs one `write()`.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use crate::sys::{errno_name, Rng};
use crate::ws::{self, HandshakeError, Item};

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// socket(), bind() or connect() failed (errno).
    Connect(i32),
    /// TCP connect and handshake not done before the deadline.
    Timeout,
    /// The server answered the upgrade with this status.
    Http(u16),
    /// An invalid handshake answer.
    Handshake(&'static str),
    /// The server broke RFC 6455.
    Protocol(&'static str),
    /// The server's Close frame (its code; 1005 when it had none).
    ServerClose(u16),
    /// The TCP connection ended without a Close frame.
    Eof,
    /// A read or write error (errno).
    Io(i32),
}

impl CloseReason {
    /// A short tally key: "connect:EMFILE", "http:503", "close:1008", "eof", ...
    pub fn kind(&self) -> String {
        match self {
            CloseReason::Connect(e) => format!("connect:{}", errno_name(*e)),
            CloseReason::Timeout => "timeout:connect".into(),
            CloseReason::Http(s) => format!("http:{s}"),
            CloseReason::Handshake(w) => format!("handshake:{w}"),
            CloseReason::Protocol(w) => format!("protocol:{w}"),
            CloseReason::ServerClose(c) => format!("close:{c}"),
            CloseReason::Eof => "eof".into(),
            CloseReason::Io(e) => format!("io:{}", errno_name(*e)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    /// The handshake completed.
    Open,
    /// A data message; its payload is `arena[start..end]`.
    Data {
        text: bool,
        start: usize,
        end: usize,
    },
    /// The server pinged (answered already).
    Ping,
    /// The connection is gone (removed from the net).
    Closed(CloseReason),
}

#[derive(Debug, Clone)]
pub struct Event {
    pub key: usize,
    pub owner: usize,
    pub ev: Ev,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Connecting,
    Handshake,
    Open,
    /// Raw bytes out, everything read is discarded (garbage connections).
    Raw,
}

struct Conn {
    sock: TcpStream,
    owner: usize,
    st: St,
    raw: bool,
    key: [u8; 24],
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    reader: ws::Reader,
    deadline_ms: u64,
    dirty: bool,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct NetStats {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub pings: u64,
}

pub struct Net {
    poll: Poll,
    events: Events,
    conns: Slab<Conn>,
    scratch: Vec<u8>,
    dirty: Vec<usize>,
    ready: Vec<(usize, bool, bool, bool)>,
    out: Vec<Event>,
    arena: Vec<u8>,
    /// The servers: connection owner i goes to `targets[i % len]` (never empty).
    pub targets: Vec<SocketAddr>,
    path: String,
    protocol: Option<String>,
    max_msg: usize,
    rng: Rng,
    pub stats: NetStats,
}

/// What the frame reader needs besides the connection.
struct Cx<'a> {
    out: &'a mut Vec<Event>,
    arena: &'a mut Vec<u8>,
    stats: &'a mut NetStats,
    dirty: &'a mut Vec<usize>,
    rng: &'a mut Rng,
    protocol: Option<&'a str>,
    max_msg: usize,
}

const SCRATCH: usize = 256 * 1024;

impl Net {
    pub fn new(
        targets: Vec<SocketAddr>,
        path: &str,
        protocol: Option<&str>,
        seed: u64,
    ) -> io::Result<Net> {
        Ok(Net {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            conns: Slab::new(),
            scratch: vec![0; SCRATCH],
            dirty: Vec::new(),
            ready: Vec::new(),
            out: Vec::new(),
            arena: Vec::new(),
            targets,
            path: path.to_owned(),
            protocol: protocol.map(str::to_owned),
            max_msg: 16 << 20,
            rng: Rng::new(seed),
            stats: NetStats::default(),
        })
    }

    /// Starts a non-blocking connect (from `src` when given) to `targets[owner % len]` and
    /// queues the Upgrade request, or with `raw` those bytes instead (a connection that never
    /// speaks WebSocket). Fails at once on socket/bind/connect errors (EMFILE,
    /// EADDRNOTAVAIL...).
    pub fn connect(
        &mut self,
        src: Option<Ipv4Addr>,
        owner: usize,
        deadline_ms: u64,
        raw: Option<&[u8]>,
    ) -> Result<usize, CloseReason> {
        self.connect_via(src, owner, owner, deadline_ms, raw)
    }

    /// [`Net::connect`] to `targets[via % len]`: a reconnecting client moves on to the next
    /// server, as a client of a cluster does when its node is gone.
    pub fn connect_via(
        &mut self,
        src: Option<Ipv4Addr>,
        owner: usize,
        via: usize,
        deadline_ms: u64,
        raw: Option<&[u8]>,
    ) -> Result<usize, CloseReason> {
        let target = self.targets[via % self.targets.len()];
        let sock = open_socket(src, target).map_err(|e| CloseReason::Connect(errno(&e)))?;
        let mut sock = TcpStream::from_std(sock);
        let entry = self.conns.vacant_entry();
        let id = entry.key();
        self.poll
            .registry()
            .register(
                &mut sock,
                Token(id),
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(|e| CloseReason::Connect(errno(&e)))?;
        let ws_key =
            ws::new_key(u128::from(self.rng.next_u64()) << 64 | u128::from(self.rng.next_u64()));
        let mut key = [0u8; 24];
        key.copy_from_slice(&ws_key.as_bytes()[..24]);
        let outbuf = match raw {
            Some(bytes) => bytes.to_vec(),
            None => ws::request(
                &target.to_string(),
                &self.path,
                &ws_key,
                self.protocol.as_deref(),
            ),
        };
        entry.insert(Conn {
            sock,
            owner,
            st: St::Connecting,
            raw: raw.is_some(),
            key,
            inbuf: Vec::new(),
            outbuf,
            reader: ws::Reader::default(),
            deadline_ms,
            dirty: false,
        });
        Ok(id)
    }

    fn mark(dirty: &mut Vec<usize>, c: &mut Conn, key: usize) {
        if !c.dirty {
            c.dirty = true;
            dirty.push(key);
        }
    }

    /// Appends a binary message as one masked frame; `encode` appends exactly `len` payload
    /// bytes to the buffer it is given.
    pub fn send_with(&mut self, key: usize, len: usize, encode: impl FnOnce(&mut Vec<u8>)) {
        let mask = (self.rng.next_u64() as u32).to_ne_bytes();
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        ws::write_header(&mut c.outbuf, true, ws::OP_BINARY, len, mask);
        let start = c.outbuf.len();
        encode(&mut c.outbuf);
        debug_assert_eq!(c.outbuf.len() - start, len);
        ws::apply_mask(&mut c.outbuf[start..], mask);
        Self::mark(&mut self.dirty, c, key);
    }

    /// Appends a protobuf message as one binary frame.
    pub fn send_proto<M: prost::Message>(&mut self, key: usize, m: &M) {
        let len = m.encoded_len();
        self.send_with(key, len, |buf| {
            // Encoding into a Vec cannot run out of room.
            let _ = m.encode(buf);
        });
    }

    /// Sends a Close frame (when open) and drops the connection without waiting for the
    /// server's Close. No event follows.
    pub fn close(&mut self, key: usize, code: u16) {
        let mask = (self.rng.next_u64() as u32).to_ne_bytes();
        if let Some(c) = self.conns.get_mut(key) {
            if c.st == St::Open {
                ws::write_frame(&mut c.outbuf, ws::OP_CLOSE, &code.to_be_bytes(), mask);
                let _ = write_out(c, &mut self.stats);
                let _ = c.sock.shutdown(std::net::Shutdown::Write);
            }
        }
        self.drop_conn(key);
    }

    fn drop_conn(&mut self, key: usize) -> Option<usize> {
        let mut c = self.conns.try_remove(key)?;
        let _ = self.poll.registry().deregister(&mut c.sock);
        Some(c.owner)
    }

    /// Ends a connection and reports it.
    fn fail(&mut self, key: usize, why: CloseReason) {
        if let Some(c) = self.conns.get_mut(key) {
            // Best effort: a Close reply queued by the reader goes out first.
            let _ = write_out(c, &mut self.stats);
        }
        if let Some(owner) = self.drop_conn(key) {
            self.out.push(Event {
                key,
                owner,
                ev: Ev::Closed(why),
            });
        }
    }

    /// Closes connections still connecting or handshaking past their deadline.
    pub fn expire(&mut self, now_ms: u64) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.st, St::Connecting | St::Handshake)
                    && c.deadline_ms != 0
                    && c.deadline_ms <= now_ms
            })
            .map(|(k, _)| k)
            .collect();
        for k in late {
            self.fail(k, CloseReason::Timeout);
        }
    }

    /// Waits for readiness (at most `timeout`), reads everything available and returns the
    /// events since the last call with the arena their payloads live in. Give both back with
    /// [`Net::recycle`].
    pub fn poll(
        &mut self,
        timeout: Option<std::time::Duration>,
    ) -> io::Result<(Vec<Event>, Vec<u8>)> {
        let timeout = if self.out.is_empty() {
            timeout
        } else {
            Some(std::time::Duration::ZERO)
        };
        match self.poll.poll(&mut self.events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        let mut ready = std::mem::take(&mut self.ready);
        ready.clear();
        ready.extend(self.events.iter().map(|e| {
            (
                e.token().0,
                e.is_readable() || e.is_read_closed() || e.is_error(),
                e.is_writable() || e.is_error(),
                e.is_read_closed() || e.is_error(),
            )
        }));
        for &(key, readable, writable, closed) in &ready {
            self.on_event(key, readable, writable, closed);
        }
        self.ready = ready;
        Ok((
            std::mem::take(&mut self.out),
            std::mem::take(&mut self.arena),
        ))
    }

    /// Takes back the buffers [`Net::poll`] handed out.
    pub fn recycle(&mut self, mut events: Vec<Event>, mut arena: Vec<u8>) {
        events.clear();
        arena.clear();
        if arena.capacity() > 8 << 20 {
            arena = Vec::new();
        }
        // Events produced meanwhile (by flush) are kept.
        events.append(&mut self.out);
        self.out = events;
        self.arena = arena;
    }

    fn on_event(&mut self, key: usize, readable: bool, writable: bool, closed: bool) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if c.st == St::Connecting {
            match c.sock.take_error() {
                Ok(Some(e)) | Err(e) => return self.fail(key, CloseReason::Connect(errno(&e))),
                Ok(None) => {}
            }
            match c.sock.peer_addr() {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
                Err(e) => return self.fail(key, CloseReason::Connect(errno(&e))),
            }
            c.st = if c.raw { St::Raw } else { St::Handshake };
            if let Err(e) = write_out(c, &mut self.stats) {
                return self.fail(key, e);
            }
        } else if writable && !c.outbuf.is_empty() {
            if let Err(e) = write_out(c, &mut self.stats) {
                return self.fail(key, e);
            }
        }
        if readable {
            loop {
                match self.read_once(key, closed) {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(why) => return self.fail(key, why),
                }
            }
        }
    }

    /// One read() and the frames in it. Returns whether to read again.
    fn read_once(&mut self, key: usize, closed: bool) -> Result<bool, CloseReason> {
        let Net {
            conns,
            scratch,
            out,
            arena,
            stats,
            dirty,
            rng,
            protocol,
            max_msg,
            ..
        } = self;
        let Some(c) = conns.get_mut(key) else {
            return Ok(false);
        };
        let n = match c.sock.read(scratch) {
            Ok(0) => return Err(CloseReason::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(true),
            Err(e) => return Err(CloseReason::Io(errno(&e))),
        };
        stats.bytes_in += n as u64;
        let mut cx = Cx {
            out,
            arena,
            stats,
            dirty,
            rng,
            protocol: protocol.as_deref(),
            max_msg: *max_msg,
        };
        if c.inbuf.is_empty() {
            let used = process(c, key, &scratch[..n], &mut cx)?;
            if used < n {
                c.inbuf.extend_from_slice(&scratch[used..n]);
            }
        } else {
            c.inbuf.extend_from_slice(&scratch[..n]);
            let mut buf = std::mem::take(&mut c.inbuf);
            let used = process(c, key, &buf, &mut cx)?;
            buf.drain(..used);
            if buf.is_empty() {
                // An idle connection holds no buffer.
                buf = Vec::new();
            }
            c.inbuf = buf;
        }
        // Edge-triggered: a short read means the socket is drained for now, unless the peer
        // also closed (then read on to see the EOF, which brings no further edge).
        Ok(n == scratch.len() || closed)
    }

    /// Writes every connection's pending output once.
    pub fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &key in &dirty {
            let Some(c) = self.conns.get_mut(key) else {
                continue;
            };
            c.dirty = false;
            if c.st == St::Connecting {
                continue;
            }
            if let Err(e) = write_out(c, &mut self.stats) {
                self.fail(key, e);
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }

    pub fn owner_of(&self, key: usize) -> Option<usize> {
        self.conns.get(key).map(|c| c.owner)
    }

    pub fn is_open(&self, key: usize) -> bool {
        self.conns.get(key).is_some_and(|c| c.st == St::Open)
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

/// Parses received bytes; returns how many were consumed (the rest is an incomplete frame
/// or response head). Answers pings and the server's Close in the connection's own buffer.
fn process(c: &mut Conn, key: usize, data: &[u8], cx: &mut Cx<'_>) -> Result<usize, CloseReason> {
    let mut pos = 0;
    match c.st {
        St::Raw => return Ok(data.len()),
        St::Connecting | St::Handshake => {
            let key_str = std::str::from_utf8(&c.key).unwrap_or_default();
            match ws::check_response(data, key_str, cx.protocol) {
                Ok(None) => return Ok(0),
                Ok(Some(n)) => {
                    pos = n;
                    c.st = St::Open;
                    cx.out.push(Event {
                        key,
                        owner: c.owner,
                        ev: Ev::Open,
                    });
                }
                Err(HandshakeError::Status(s)) => return Err(CloseReason::Http(s)),
                Err(HandshakeError::Invalid(w)) => return Err(CloseReason::Handshake(w)),
            }
        }
        St::Open => {}
    }
    while pos < data.len() {
        let (n, item) = c
            .reader
            .feed(&data[pos..], cx.max_msg)
            .map_err(CloseReason::Protocol)?;
        if n == 0 {
            break;
        }
        pos += n;
        match item {
            Some(Item::Data { text, payload }) => {
                let start = cx.arena.len();
                cx.arena.extend_from_slice(payload);
                cx.out.push(Event {
                    key,
                    owner: c.owner,
                    ev: Ev::Data {
                        text,
                        start,
                        end: cx.arena.len(),
                    },
                });
            }
            Some(Item::Ping(p)) => {
                let mask = (cx.rng.next_u64() as u32).to_ne_bytes();
                ws::write_frame(&mut c.outbuf, ws::OP_PONG, p, mask);
                if !c.dirty {
                    c.dirty = true;
                    cx.dirty.push(key);
                }
                cx.stats.pings += 1;
                cx.out.push(Event {
                    key,
                    owner: c.owner,
                    ev: Ev::Ping,
                });
            }
            Some(Item::Close(code, _)) => {
                let mask = (cx.rng.next_u64() as u32).to_ne_bytes();
                let echo = code.map(u16::to_be_bytes);
                ws::write_frame(
                    &mut c.outbuf,
                    ws::OP_CLOSE,
                    echo.as_ref().map_or(&[][..], |b| &b[..]),
                    mask,
                );
                return Err(CloseReason::ServerClose(code.unwrap_or(1005)));
            }
            Some(Item::Pong) | Some(Item::Fragment) | None => {}
        }
    }
    Ok(pos)
}

fn write_out(c: &mut Conn, stats: &mut NetStats) -> Result<(), CloseReason> {
    while !c.outbuf.is_empty() {
        match c.sock.write(&c.outbuf) {
            Ok(0) => return Err(CloseReason::Eof),
            Ok(n) => {
                stats.bytes_out += n as u64;
                if n == c.outbuf.len() {
                    c.outbuf.clear();
                } else {
                    c.outbuf.drain(..n);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => return Err(CloseReason::Io(errno(&e))),
        }
    }
    if c.outbuf.capacity() > 4096 {
        c.outbuf = Vec::new();
    }
    Ok(())
}

/// A non-blocking TCP socket, bound to `src` (port chosen at connect time thanks to
/// IP_BIND_ADDRESS_NO_PORT, so each source address has its own ephemeral port range), with
/// the connect started.
fn open_socket(src: Option<Ipv4Addr>, target: SocketAddr) -> io::Result<std::net::TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(&SockAddr::from(SocketAddr::from((ip, 0))))?;
    }
    match sock.connect(&SockAddr::from(target)) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(sock.into())
}
