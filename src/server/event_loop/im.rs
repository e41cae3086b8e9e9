//! The IM endpoint's part of the loop: the storage thread's reports, the core's output into
//! the connections' outboxes, the raw TCP listener and the IM deadlines of a connection.

use std::io;

use log::{debug, warn};
use mio::net::TcpStream;
use mio::Token;

use super::{close_slow_consumer, watch, ImService, Server};
use crate::im::core::{Now, Output};
use crate::im::proto::{server_frame, ClientFrame, ServerFrame};
use crate::im::wire;
use crate::server::admin::Response;
use crate::server::conn::Conn;
use crate::store::writer::Done;
use crate::ws::{code, MessageKind};
use prost::Message as _;

impl Server {
    /// The storage thread committed batches: acknowledge and deliver them. A failed commit
    /// stops the server (fail-stop): acknowledging anything after it could lose messages.
    pub(super) fn on_store_done(&mut self) -> io::Result<()> {
        let now = self.now_value();
        let Some(im) = self.im.as_mut() else {
            return Ok(());
        };
        let mut latest = None;
        for done in im.writer.completed() {
            match done {
                Done::Committed(id, took) => {
                    self.metrics.commit_latency.observe(took.as_secs_f64());
                    latest = Some(id);
                }
                Done::Failed(e) => {
                    log::error!("{e}; stopping: no send is acknowledged unless it is durable");
                    return Err(io::Error::other(e));
                }
            }
        }
        if let Some(id) = latest {
            im.core.on_committed(id, now, &*im.store);
            let ready: Vec<usize> = im
                .admins
                .iter()
                .filter(|(_, a)| a.waiting_for.is_some_and(|b| b <= id))
                .map(|(k, _)| k)
                .collect();
            for key in ready {
                if let Some(a) = self.im.as_mut().and_then(|im| im.admins.get_mut(key)) {
                    a.waiting_for = None;
                    a.response = Response::no_content().to_bytes();
                }
                self.on_admin(key);
            }
            self.dispatch_im();
        }
        Ok(())
    }

    /// Takes an accepted raw TCP IM connection; it counts against `--max-connections` like an
    /// upgrade, and beyond it (or while shutting down) it is closed at once.
    pub(super) fn add_tcp(&mut self, mut sock: TcpStream) {
        if self.shutdown_deadline.is_some() || self.open_count >= self.cfg.max_connections {
            return;
        }
        let _ = sock.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if !watch(self.poll.registry(), &mut sock, Token(key)) {
            return;
        }
        let mut conn = Conn::new_tcp(sock, self.cfg.max_message_bytes, self.now);
        conn.counted_open = true;
        entry.insert(conn);
        self.open_count += 1;
        let now = self.now_value();
        if let Some(im) = self.im.as_mut() {
            im.core.on_open(key, now);
        }
        self.arm_timer(key);
    }

    /// Moves the IM core's output into the connections' outboxes.
    pub(super) fn dispatch_im(&mut self) {
        let Some(im) = self.im.as_mut() else {
            return;
        };
        let mut body = Vec::new();
        let mut admin_answers = Vec::new();
        for out in im.core.drain_output() {
            let conn = match &out {
                Output::Frame { conn, .. }
                | Output::Deliver { conn, .. }
                | Output::Close { conn, .. } => *conn,
                Output::AdminSent {
                    admin,
                    seq,
                    duplicate,
                } => {
                    if !duplicate {
                        self.metrics.messages_in.inc();
                    }
                    admin_answers.push((*admin, *seq, *duplicate));
                    continue;
                }
            };
            let Some(c) = self.conns.get_mut(conn) else {
                continue;
            };
            im.scratch.clear();
            if matches!(out, Output::Frame { .. } | Output::Deliver { .. })
                && c.outbox.len() > self.cfg.max_outbound_bytes
            {
                // One commit can release a whole delivery window: hand the socket what it
                // takes now, and if it still lags, close it here, so that the limit bounds
                // its memory. Once closed, `send` queues nothing more; what it missed is
                // durable and comes again after its cursor.
                if let Ok(n) = c.outbox.flush(&mut c.sock, &[], &mut self.pool) {
                    self.metrics.bytes_out.inc_by(n as u64);
                }
                if c.outbox.len() > self.cfg.max_outbound_bytes {
                    close_slow_consumer(conn, c, &self.metrics, &mut im.scratch);
                }
            }
            match out {
                Output::Deliver { msg, .. } => {
                    self.metrics.messages_out.inc();
                    let ms = self.unix_ms.saturating_sub(msg.server_time_ms).max(0);
                    self.metrics.delivery_latency.observe(ms as f64 / 1000.0);
                    if c.json {
                        match wire::to_proto(&msg) {
                            Ok(m) => {
                                let frame = ServerFrame {
                                    id: 0,
                                    body: Some(server_frame::Body::Message(m)),
                                };
                                send_json(c, &frame, &mut body, &mut im.scratch);
                            }
                            Err(e) => warn!("undecodable stored message {}: {e}", msg.seq),
                        }
                    } else {
                        let mut head = [0; wire::MAX_HEAD];
                        let n = wire::delivery_head(msg.seq, msg.body.len(), &mut head);
                        c.transport.send_parts(
                            MessageKind::Binary,
                            &[&head[..n], &msg.body],
                            &mut im.scratch,
                        );
                    }
                }
                Output::Frame { frame, .. } => {
                    match &frame.body {
                        Some(server_frame::Body::LoginOk(_)) => {
                            self.metrics.logins.inc();
                        }
                        Some(server_frame::Body::SendOk(ok)) if !ok.duplicate => {
                            self.metrics.messages_in.inc();
                        }
                        _ => {}
                    }
                    if c.json {
                        send_json(c, &frame, &mut body, &mut im.scratch);
                    } else {
                        body.clear();
                        if frame.encode(&mut body).is_ok() {
                            c.transport
                                .send(MessageKind::Binary, &body, &mut im.scratch);
                        }
                    }
                }
                Output::Close { code, reason, .. } => {
                    debug!("conn {conn}: closing {code} {reason}");
                    self.metrics.close(code, "server");
                    c.transport.close(code, reason, &mut im.scratch);
                }
                Output::AdminSent { .. } => {}
            }
            c.outbox.push(&im.scratch, &mut self.pool);
            self.dirty.push(conn);
        }
        for (key, seq, duplicate) in admin_answers {
            let Some(a) = im.admins.get_mut(key).filter(|a| a.awaiting_send) else {
                continue;
            };
            a.awaiting_send = false;
            let body = serde_json::json!({"seq": seq, "duplicate": duplicate});
            a.response = Response::json(200, &body).to_bytes();
            self.admin_ready.push(key);
        }
        for key in std::mem::take(&mut self.admin_ready) {
            self.on_admin(key);
        }
    }

    /// The IM deadlines of an open `/ws` connection: the login deadline, then the ack timeout.
    pub(super) fn im_timer(&mut self, key: usize) {
        let now = self.now_value();
        let (Some(im), Some(conn)) = (self.im.as_mut(), self.conns.get_mut(key)) else {
            return;
        };
        if !im.core.is_logged_in(key) {
            if now.mono_ms >= conn.opened_ms + im.auth_timeout_ms {
                debug!("conn {key}: no login in time");
                conn.transport
                    .close(code::POLICY_VIOLATION, "login timeout", &mut self.staging);
                self.metrics.close(code::POLICY_VIOLATION, "server");
            }
        } else {
            im.core.check_ack_timeout(key, now);
            self.dispatch_im();
        }
    }
}

/// One IM frame (a binary WebSocket message or a raw TCP frame) into the core.
pub(super) fn im_frame(im: &mut ImService, key: usize, payload: &[u8], now: Now) {
    match ClientFrame::decode(payload) {
        Ok(f) => im.core.on_frame(key, f, now, &*im.store),
        Err(_) => im.core.on_bad_frame(key, "undecodable frame"),
    }
}

/// Appends `frame` as a JSON text message (subprotocol `imgate.v1.json`).
fn send_json(c: &Conn, frame: &ServerFrame, body: &mut Vec<u8>, out: &mut Vec<u8>) {
    body.clear();
    if serde_json::to_writer(&mut *body, frame).is_ok() {
        c.transport.send(MessageKind::Text, body, out);
    }
}
