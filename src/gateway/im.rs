//! The IM core's output into the connections' outboxes: frames and deliveries encoded for
//! each connection's codec, closes, and the answers of admin sends.

use log::warn;
use prost::Message as _;

use super::close::{start_close, Why};
use super::conn::Conn;
use super::transport::{Codec, Phase, Service, Transport};
use super::{ConnId, Gateway, Im};
use crate::gateway::admin_api::Response;
use crate::im::core::{Now, Output};
use crate::im::proto::{server_frame, ClientFrame, ServerFrame};
use crate::im::wire;
use crate::ws::MessageKind;

impl Gateway {
    /// Moves the IM core's output into the connections' outboxes.
    pub(super) fn dispatch_im(&mut self) {
        self.settle_staging();
        let mut body = Vec::new();
        let mut admin_answers = Vec::new();
        let mut admin_reads = Vec::new();
        let Gateway {
            im,
            conns,
            scratch,
            pool,
            metrics,
            dirty,
            limits,
            now,
            ..
        } = self;
        for out in im.core.drain_output() {
            let key = match &out {
                Output::Frame { conn, .. }
                | Output::Deliver { conn, .. }
                | Output::Close { conn, .. } => *conn,
                Output::AdminSent {
                    admin,
                    seq,
                    duplicate,
                } => {
                    if !duplicate {
                        metrics.messages_in.inc();
                    }
                    admin_answers.push((*admin, Some((*seq, *duplicate))));
                    continue;
                }
                Output::AdminRefused { admin } => {
                    admin_answers.push((*admin, None));
                    continue;
                }
                Output::AdminRead { .. } => {
                    admin_reads.push(out);
                    continue;
                }
            };
            let Some(c) = conns.get_mut(key) else {
                continue;
            };
            let codec = match c.transport.service() {
                Some(Service::Im(codec)) => codec,
                _ => continue,
            };
            scratch.clear();
            if matches!(out, Output::Frame { .. } | Output::Deliver { .. })
                && c.outbox.len() > limits.max_outbound_bytes
            {
                // Once closed, `send` queues nothing more; what it missed is durable and
                // comes again after its cursor.
                start_close(key, c, Why::SlowConsumer, metrics, scratch);
            }
            match out {
                Output::Deliver { msg, .. } => {
                    metrics.messages_out.inc();
                    let ms = now.unix_ms.saturating_sub(msg.server_time_ms).max(0);
                    metrics.delivery_latency.observe(ms as f64 / 1000.0);
                    match codec {
                        Codec::Json => match wire::to_proto(&msg) {
                            Ok(m) => {
                                let frame = ServerFrame {
                                    id: 0,
                                    body: Some(server_frame::Body::Message(m)),
                                };
                                send_json(c, &frame, &mut body, scratch);
                            }
                            Err(e) => warn!("undecodable stored message {}: {e}", msg.seq),
                        },
                        Codec::Protobuf => {
                            let mut head = [0; wire::MAX_HEAD];
                            let n = wire::delivery_head(msg.seq, msg.body.len(), &mut head);
                            c.transport.send_parts(
                                MessageKind::Binary,
                                &[&head[..n], &msg.body],
                                scratch,
                            );
                        }
                    }
                }
                Output::Frame { frame, .. } => {
                    match &frame.body {
                        Some(server_frame::Body::LoginOk(_)) => {
                            metrics.logins.inc();
                        }
                        Some(server_frame::Body::SendOk(ok)) if !ok.duplicate => {
                            metrics.messages_in.inc();
                        }
                        _ => {}
                    }
                    match codec {
                        Codec::Json => send_json(c, &frame, &mut body, scratch),
                        Codec::Protobuf => {
                            body.clear();
                            if frame.encode(&mut body).is_ok() {
                                c.transport.send(MessageKind::Binary, &body, scratch);
                            }
                        }
                    }
                }
                Output::Close { code, reason, .. } => {
                    start_close(key, c, Why::Im { code, reason }, metrics, scratch);
                }
                Output::AdminSent { .. }
                | Output::AdminRefused { .. }
                | Output::AdminRead { .. } => {}
            }
            c.outbox.push(scratch, pool);
            if !c.dirty {
                c.dirty = true;
                dirty.push(key);
            }
        }
        for out in admin_reads {
            if let Output::AdminRead { admin, rid, answer } = out {
                self.admin_read(admin, rid, answer);
            }
        }
        for (key, answer) in admin_answers {
            let sending = self.conns.get(key).is_some_and(|c| {
                matches!(
                    c.transport,
                    Transport::Http {
                        phase: Phase::Sending,
                        ..
                    }
                )
            });
            if !sending {
                continue;
            }
            let response = match answer {
                Some((seq, duplicate)) => Response::json(
                    200,
                    &serde_json::json!({"seq": seq, "duplicate": duplicate}),
                ),
                None => super::http::unconfirmed(),
            };
            self.answer_http(key, response.to_bytes());
        }
    }

    /// The IM deadlines of an open connection: the login deadline, then the ack timeout.
    pub(super) fn im_timer(&mut self, key: ConnId) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if !self.im.core.is_logged_in(key) {
            if self.now.mono_ms >= conn.opened_ms + self.limits.auth_ms {
                self.close(key, Why::LoginTimeout);
            }
        } else {
            self.im.core.check_ack_timeout(key, self.now);
            self.dispatch_im();
        }
    }
}

/// One IM frame (a binary WebSocket message or a raw TCP frame) into the core.
pub(super) fn im_frame(im: &mut Im, key: ConnId, payload: &[u8], now: Now) {
    match ClientFrame::decode(payload) {
        Ok(f) => im.core.on_frame(key, f, now),
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
