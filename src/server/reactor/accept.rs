//! Accepting: the listeners and one accept routine for every kind of listener, which handles
//! running out of file descriptors the same way for all.

use std::fs::File;
use std::io::{self, Write};
use std::net::SocketAddr;

use log::{debug, warn};
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use super::Server;
use crate::gateway::{Accept, ListenerKind};

/// How long accepting pauses when out of descriptors and no reserve descriptor is left.
pub(super) const ACCEPT_PAUSE_MS: u64 = 100;

/// The listening sockets; `public` is gone once shutdown begins.
pub(super) struct Listeners {
    pub(super) public: Option<TcpListener>,
    pub(super) public_addr: SocketAddr,
    pub(super) admin: TcpListener,
    pub(super) admin_addr: SocketAddr,
    pub(super) raw_tcp: Option<TcpListener>,
}

impl Listeners {
    pub(super) fn get(&self, kind: ListenerKind) -> Option<&TcpListener> {
        match kind {
            ListenerKind::Public => self.public.as_ref(),
            ListenerKind::Admin => Some(&self.admin),
            ListenerKind::RawTcp => self.raw_tcp.as_ref(),
        }
    }
}

impl Server {
    /// Accepts every waiting connection of one listener. The same for each listener: the
    /// backlog is always drained (an edge-triggered listener left with a backlog would never
    /// be woken again), by shedding when descriptors run out, or by a pause after which every
    /// listener is tried again.
    pub(super) fn accept_all(&mut self, kind: ListenerKind) {
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listeners.get(kind) else {
                return;
            };
            match listener.accept() {
                Ok((sock, _)) => self.add(kind, sock),
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

    /// Out of descriptors: use the reserve one to accept the oldest pending connection of the
    /// listener and refuse it with the gateway's answer, so the backlog drains instead of the
    /// loop spinning on EMFILE or the listener stalling. Returns whether a connection was
    /// shed (so accepting may continue).
    fn shed_one_connection(&mut self, kind: ListenerKind) -> bool {
        if self.last_emfile_log.is_none_or(|t| self.now >= t + 1000) {
            let open = self.sockets.iter().flatten().count();
            warn!("out of file descriptors with {open} connections: refusing new ones");
            self.last_emfile_log = Some(self.now);
        }
        let Some(reserve) = self.reserve_fd.take() else {
            self.accept_paused_until = Some(self.now + ACCEPT_PAUSE_MS);
            return false;
        };
        drop(reserve);
        // Linux reports EMFILE before looking at the queue, so an empty backlog only shows
        // up here, as WouldBlock: then there is nothing left to shed.
        let shed = match self.listeners.get(kind).map(|l| l.accept()) {
            Some(Ok((mut sock, _))) => {
                // Best effort on a fresh socket, whose send buffer is empty.
                let _ = sock.write(&self.gateway.shed_answer(kind));
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

    /// Takes an accepted socket under the name the gateway gives it, or refuses it.
    fn add(&mut self, kind: ListenerKind, mut sock: TcpStream) {
        // A name the gateway gives out may be one whose socket is still to be dropped.
        self.apply_socket_actions();
        let key = match self.gateway.handle_accept(kind, self.now_value()) {
            Accept::Open(key) => key,
            Accept::Refuse(answer) => {
                // Best effort on a fresh socket, whose send buffer is empty.
                let _ = sock.write(&answer);
                return;
            }
        };
        if kind != ListenerKind::Admin {
            if let Err(e) = sock.set_nodelay(true) {
                debug!("set_nodelay: {e}");
            }
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, Token(key), interest)
        {
            warn!("register: {e}");
            self.gateway.handle_closed(key);
            return;
        }
        if self.sockets.len() <= key {
            self.sockets.resize_with(key + 1, || None);
        }
        self.sockets[key] = Some(sock);
    }
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
