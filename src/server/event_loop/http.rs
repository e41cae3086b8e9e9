//! HTTP exchanges beside the WebSocket traffic: admin API requests on `--admin-listen`, and the
//! web demo's plain GETs on the public listener. One request per connection; an answer that
//! needs the store waits for its batch to commit (or for the core's `AdminSent`).
//!
//! Bounds: at most `--max-admin-connections` admin exchanges at once (more get 503), and each
//! phase of an exchange (the request arriving, the answer being taken) gets
//! `--handshake-timeout`: a request still incomplete then gets 408, an answer the peer does not
//! read is dropped. Waiting for the store does not count against the peer.

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use mio::Token;

use super::{millis, watch, Cx, Server, ADMIN_BASE};
use crate::im::core::AdminSendError;
use crate::server::admin::{self, AdminAction, Response};
use crate::server::timer_wheel::TimerId;
use crate::server::transport::Transport;
use crate::web;
use crate::ws::handshake::{HttpError, PlainRequest};
use crate::ws::State;

/// One admin HTTP request/response exchange.
pub(super) struct AdminConn {
    pub(super) sock: TcpStream,
    pub(super) request: Vec<u8>,
    pub(super) response: Vec<u8>,
    pub(super) written: usize,
    /// Answer 204 once this batch is durable.
    pub(super) waiting_for: Option<u64>,
    /// A `POST /v1/messages` waits for the core's `AdminSent`.
    pub(super) awaiting_send: bool,
    /// The deadline of the current phase (see the module docs).
    timer: Option<TimerId>,
}

impl AdminConn {
    fn new(sock: TcpStream) -> AdminConn {
        AdminConn {
            sock,
            request: Vec::new(),
            response: Vec::new(),
            written: 0,
            waiting_for: None,
            awaiting_send: false,
            timer: None,
        }
    }

    fn waiting(&self) -> bool {
        self.waiting_for.is_some() || self.awaiting_send
    }
}

impl Server {
    /// Takes an accepted admin connection, or refuses it with 503 beyond
    /// `--max-admin-connections`.
    pub(super) fn add_admin(&mut self, mut sock: TcpStream) {
        let Some(im) = self.im.as_mut() else {
            return;
        };
        if im.admins.len() >= im.max_admins {
            // Best effort on a fresh socket, whose send buffer is empty.
            let busy = Response::error(503, "too many admin connections");
            let _ = sock.write(&busy.to_bytes());
            return;
        }
        let entry = im.admins.vacant_entry();
        let key = entry.key();
        if watch(self.poll.registry(), &mut sock, Token(ADMIN_BASE + key)) {
            let mut a = AdminConn::new(sock);
            let deadline = self.now + millis(self.cfg.handshake_timeout);
            a.timer = Some(self.wheel.insert(deadline, ADMIN_BASE + key));
            entry.insert(a);
        }
    }

    /// Reads the admin request, routes it, and writes the answer; closes when it is sent.
    pub(super) fn on_admin(&mut self, key: usize) {
        let Some(im) = self.im.as_mut() else {
            return;
        };
        let Some(a) = im.admins.get_mut(key) else {
            return;
        };
        if a.response.is_empty() && a.waiting_for.is_none() && !a.awaiting_send {
            let mut buf = [0u8; 4096];
            let mut eof = false;
            loop {
                match a.sock.read(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        a.request.extend_from_slice(&buf[..n]);
                        if a.request.len() > admin::MAX_ADMIN_REQUEST {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            match admin::handle(&a.request, im.admin_token.as_deref()) {
                admin::Parsed::Partial => {
                    if eof {
                        self.close_admin(key);
                    }
                    return;
                }
                admin::Parsed::Done(action) => {
                    // The request phase is over; the answer phase starts when it is written.
                    if let Some(id) = a.timer.take() {
                        self.wheel.cancel(id);
                    }
                    if !self.admin_execute(key, action) {
                        return;
                    }
                }
            }
        }
        self.admin_write(key);
    }

    /// Carries out a routed admin (or web demo) request for the HTTP exchange `key`. Returns
    /// whether its answer is ready to write now; otherwise it waits for the store or the core.
    pub(super) fn admin_execute(&mut self, key: usize, action: AdminAction) -> bool {
        let now = self.now_value();
        let Some(im) = self.im.as_mut() else {
            return false;
        };
        let Some(a) = im.admins.get_mut(key) else {
            return false;
        };
        match action {
            AdminAction::Respond(r) => a.response = r.to_bytes(),
            AdminAction::SetFriendship {
                a: x,
                b: y,
                present,
            } => {
                im.core.set_friendship(&x, &y, present);
                a.waiting_for = Some(im.core.pending_batch_id());
                return false;
            }
            AdminAction::Send {
                from_uid,
                to_uid,
                client_msg_id,
                content,
            } => {
                match im.core.admin_send(
                    key,
                    &from_uid,
                    &to_uid,
                    client_msg_id,
                    content,
                    now,
                    &*im.store,
                ) {
                    Ok(()) => {
                        a.awaiting_send = true;
                        // A duplicate of a durable send is answered at once.
                        self.dispatch_im();
                        return false;
                    }
                    Err(AdminSendError::Invalid(why)) => {
                        a.response = Response::error(400, why).to_bytes()
                    }
                    Err(AdminSendError::Unavailable) => {
                        a.response = Response::error(503, "the store cannot be read").to_bytes()
                    }
                }
            }
            AdminAction::GetUser { uid } => match im.store.max_seq(&uid) {
                Ok(max_seq) => {
                    let cursors: serde_json::Map<String, serde_json::Value> = im
                        .store
                        .cursors(&uid)
                        .into_iter()
                        .map(|(d, seq)| (d, seq.into()))
                        .collect();
                    let body = serde_json::json!({
                        "uid": uid,
                        "online_devices": im.core.online_devices(&uid),
                        "max_seq": max_seq,
                        "cursors": cursors,
                    });
                    a.response = Response::json(200, &body).to_bytes();
                }
                Err(e) => {
                    log::error!("{e}");
                    a.response = Response::error(503, "the store cannot be read").to_bytes();
                }
            },
            AdminAction::Metrics => {
                let mut counts: Vec<(&'static str, &'static str, i64)> = Vec::new();
                for (_, c) in self.conns.iter() {
                    let state = match c.transport.state() {
                        State::Handshaking | State::AwaitingAccept => "handshaking",
                        State::Open => "open",
                        State::CloseSent | State::Closed => "closing",
                    };
                    let transport = match c.transport {
                        Transport::Ws(_) => "ws",
                        Transport::Tcp { .. } => "tcp",
                    };
                    match counts
                        .iter_mut()
                        .find(|(s, t, _)| *s == state && *t == transport)
                    {
                        Some(entry) => entry.2 += 1,
                        None => counts.push((state, transport, 1)),
                    }
                }
                a.response = Response::metrics(self.metrics.render(&counts)).to_bytes();
            }
            AdminAction::GetFriends { uid } => {
                let friends: Vec<serde_json::Value> = im
                    .store
                    .friends(&uid)
                    .into_iter()
                    .map(|f| {
                        let online = !im.core.online_devices(&f).is_empty();
                        serde_json::json!({"uid": f, "online": online})
                    })
                    .collect();
                let body = serde_json::json!({"uid": uid, "friends": friends});
                a.response = Response::json(200, &body).to_bytes();
            }
        }
        true
    }

    /// Writes what the socket takes of the answer; the exchange ends once all of it is sent.
    pub(super) fn admin_write(&mut self, key: usize) {
        let Some(im) = self.im.as_mut() else {
            return;
        };
        let Some(a) = im.admins.get_mut(key) else {
            return;
        };
        while a.written < a.response.len() {
            match a.sock.write(&a.response[a.written..]) {
                Ok(n) if n > 0 => a.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if a.timer.is_none() {
                        // The peer has one period to take the rest of the answer.
                        let deadline = self.now + millis(self.cfg.handshake_timeout);
                        a.timer = Some(self.wheel.insert(deadline, ADMIN_BASE + key));
                    }
                    return;
                }
                _ => break,
            }
        }
        if a.waiting_for.is_none() && !a.response.is_empty() {
            self.close_admin(key);
        }
    }

    /// Ends the HTTP exchange `key`: closes its socket and cancels its deadline.
    pub(super) fn close_admin(&mut self, key: usize) {
        let Some(mut a) = self.im.as_mut().and_then(|im| im.admins.try_remove(key)) else {
            return;
        };
        if let Some(id) = a.timer.take() {
            self.wheel.cancel(id);
        }
        let _ = self.poll.registry().deregister(&mut a.sock);
    }

    /// A phase of the exchange `key` ran out of time: a request still incomplete gets 408, an
    /// answer still unread is dropped. (No deadline runs while the answer waits for the store.)
    pub(super) fn on_admin_timer(&mut self, key: usize) {
        let Some(a) = self.im.as_mut().and_then(|im| im.admins.get_mut(key)) else {
            return;
        };
        a.timer = None;
        if a.waiting() {
            return;
        }
        if a.response.is_empty() {
            a.response = Response::error(408, "request not complete in time").to_bytes();
            self.admin_write(key);
        }
        self.close_admin(key);
    }

    /// Moves a public connection whose plain GET needs the store or the core (the web demo's
    /// `/dev/*` routes) over to an HTTP exchange like an admin request's, and carries it out.
    pub(super) fn hand_over_to_http(&mut self, key: usize, action: AdminAction) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if let Some(id) = conn.timer.take() {
            self.wheel.cancel(id);
        }
        conn.transport.release_buffers(&mut self.pool);
        let registry = self.poll.registry();
        let _ = registry.deregister(&mut conn.sock);
        let Some(im) = self.im.as_mut() else {
            return;
        };
        let entry = im.admins.vacant_entry();
        let admin_key = entry.key();
        let mut sock = conn.sock;
        if !watch(registry, &mut sock, Token(ADMIN_BASE + admin_key)) {
            return;
        }
        entry.insert(AdminConn::new(sock));
        if self.admin_execute(admin_key, action) {
            self.admin_write(admin_key);
        }
    }
}

/// A plain GET on the public listener: 426 on a WebSocket path, else the web demo.
pub(super) fn serve_get(ws: &mut crate::ws::Connection, request: &PlainRequest, cx: &mut Cx<'_>) {
    if cx.endpoints.iter().any(|e| e.path == request.path) {
        ws.reject(&HttpError::UpgradeRequired, cx.staging);
        return;
    }
    let Some(im) = cx.im.as_deref() else {
        ws.reject(&HttpError::NotFound, cx.staging);
        return;
    };
    match web::route(request, im.dev_secret.as_deref(), cx.now.unix_ms) {
        AdminAction::Respond(r) => ws.respond(&r.to_bytes(), cx.staging),
        action => cx.handover = Some(action),
    }
}
