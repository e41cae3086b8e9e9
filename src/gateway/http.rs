//! HTTP exchanges beside the WebSocket traffic: admin API requests on `--admin-listen`, and the
//! web demo's plain GETs on the public listener that need the store or the core. One request
//! per connection; an answer that needs the store waits for its batch to commit (or for the
//! core's `AdminSent`).
//!
//! Bounds: at most `--max-admin-connections` admin exchanges at once (more get 503), and each
//! phase of an exchange (the request arriving, the answer being taken) gets
//! `--handshake-timeout`: a request still incomplete then gets 408, an answer the peer does not
//! read is dropped. Waiting for the store does not count against the peer.

use super::admin_api::{self, AdminAction, Recipient, Response, SignalRecipient};
use super::input::Cx;
use super::transport::{Phase, Transport};
use super::{ConnId, Gateway};
use std::sync::Arc;

use crate::im::core::{
    AdminSendError, BatchId, MembershipError, ReadAnswer, ReadId, ReadRequest, SignalError,
    SignalTarget, Target,
};
use crate::web;
use crate::ws::handshake::{HttpError, PlainRequest};

impl Gateway {
    /// Routes the exchange's request once it is complete and carries it out. A peer that
    /// closed before its request was complete is dropped.
    pub(super) fn http_input(&mut self, key: ConnId) {
        let Some(c) = self.conns.get(key) else {
            return;
        };
        let Transport::Http {
            request,
            phase: Phase::Request,
            ..
        } = &c.transport
        else {
            return;
        };
        match admin_api::handle(request, self.im.admin_token.as_deref()) {
            admin_api::Parsed::Partial => {
                if c.peer_eof {
                    self.remove(key);
                }
            }
            admin_api::Parsed::Done(action) => self.execute(key, action),
        }
    }

    /// Carries out a routed admin (or web demo) request for the HTTP exchange `key`: answered
    /// now, or once the store or the core has done its part. A request that needs a group's
    /// members waits for them unless they are cached, then is carried out again.
    fn execute(&mut self, key: ConnId, action: AdminAction) {
        let now = self.now;
        let core = &mut self.im.core;
        if let Some(rid) = warm_for(&action).and_then(|gid| core.warm_group(key, gid)) {
            return self.park(key, rid, action);
        }
        let read = |uid: &str| -> Arc<str> { uid.into() };
        let answer = match action {
            AdminAction::Respond(r) => r,
            AdminAction::SetFriendship { a, b, present } => {
                core.set_friendship(&a, &b, present);
                let batch = core.pending_batch_id();
                return self.wait_for_commit(key, batch);
            }
            AdminAction::SetMembership { gid, uid, joined } => {
                match core.set_membership(&gid, &uid, joined) {
                    Ok(Some(batch)) => return self.wait_for_commit(key, batch),
                    Ok(None) => Response::no_content(),
                    Err(MembershipError::Invalid) => {
                        Response::error(400, "group id and uid must be 1-64 bytes")
                    }
                    Err(MembershipError::Full) => Response::error(
                        409,
                        &format!(
                            "the group has --max-group-members ({}) members already",
                            core.max_group_members()
                        ),
                    ),
                    Err(MembershipError::Unavailable) => unavailable(),
                }
            }
            AdminAction::Signal {
                to,
                from_uid,
                kind,
                payload,
            } => {
                let to = match &to {
                    SignalRecipient::To(r) => SignalTarget::To(target(r)),
                    SignalRecipient::All => SignalTarget::All,
                };
                match core.admin_signal(to, &from_uid, kind, payload) {
                    Ok(devices) => {
                        self.dispatch_im();
                        Response::json(200, &serde_json::json!({ "devices": devices }))
                    }
                    Err(SignalError::Unavailable) => unavailable(),
                    Err(SignalError::BadRequest(why)) => Response::error(400, why),
                    Err(SignalError::TooLarge | SignalError::Forbidden) => {
                        Response::error(400, "kind is at most 32 bytes and payload at most 256")
                    }
                }
            }
            AdminAction::Send {
                from_uid,
                to,
                client_msg_id,
                content,
            } => match core.admin_send(key, &from_uid, target(&to), client_msg_id, content, now) {
                Ok(()) => {
                    self.set_phase(key, Phase::Sending);
                    // A duplicate of a durable send is answered at once.
                    self.dispatch_im();
                    return;
                }
                Err(AdminSendError::Invalid(why)) => Response::error(400, why),
                Err(AdminSendError::NoSuchGroup) => {
                    Response::error(404, "no group with this id has members")
                }
                Err(AdminSendError::Unavailable) => unavailable(),
            },
            AdminAction::GetGroup { gid } => {
                let rid = core.admin_read(key, ReadRequest::Members { gid: read(&gid) });
                return self.park(key, rid, AdminAction::GetGroup { gid });
            }
            AdminAction::GetUser { uid } => {
                let rid = core.admin_read(key, ReadRequest::User { uid: read(&uid) });
                return self.park(key, rid, AdminAction::GetUser { uid });
            }
            AdminAction::GetFriends { uid } => {
                let rid = core.admin_read(key, ReadRequest::Friends { uid: read(&uid) });
                return self.park(key, rid, AdminAction::GetFriends { uid });
            }
            AdminAction::Metrics => {
                Response::metrics(self.metrics.render(&self.connection_counts()))
            }
        };
        self.answer_http(key, answer.to_bytes());
    }

    /// Holds the exchange until read `rid` answers ([`Gateway::admin_read`]).
    fn park(&mut self, key: ConnId, rid: ReadId, action: AdminAction) {
        self.parked.insert(key, action);
        self.set_phase(key, Phase::Reading(rid));
    }

    /// The answer to read `rid` of exchange `key`: what a GET shows, or the members of the
    /// group its request needed, after which it is carried out again.
    pub(super) fn admin_read(&mut self, key: ConnId, rid: ReadId, answer: ReadAnswer) {
        let reading = self.conns.get(key).is_some_and(
            |c| matches!(c.transport, Transport::Http { phase: Phase::Reading(r), .. } if r == rid),
        );
        let Some(action) = reading.then(|| self.parked.remove(&key)).flatten() else {
            return;
        };
        let core = &self.im.core;
        let answer = match (action, answer) {
            (AdminAction::GetGroup { .. }, ReadAnswer::Members(Ok(m))) if m.is_empty() => {
                Response::error(404, "no group with this id has members")
            }
            (AdminAction::GetGroup { gid }, ReadAnswer::Members(Ok(members))) => Response::json(
                200,
                &serde_json::json!({"group_id": gid, "members": members}),
            ),
            (AdminAction::GetUser { uid }, ReadAnswer::User(Ok(facts))) => {
                let cursors: serde_json::Map<String, serde_json::Value> = facts
                    .cursors
                    .into_iter()
                    .map(|(d, seq)| (d, seq.into()))
                    .collect();
                Response::json(
                    200,
                    &serde_json::json!({
                        "uid": uid,
                        "online_devices": facts
                            .online_devices
                            .unwrap_or_else(|| core.online_devices(&uid)),
                        "max_seq": facts.max_seq,
                        "cursors": cursors,
                        "groups": facts.groups,
                    }),
                )
            }
            (AdminAction::GetFriends { uid }, ReadAnswer::Friends(friends, online)) => {
                let online = online.map(|p| p.iter().map(|p| p.online).collect());
                let online: Vec<bool> = online.unwrap_or_else(|| {
                    let here = |f: &String| !core.online_devices(f).is_empty();
                    friends.iter().map(here).collect()
                });
                let friends: Vec<serde_json::Value> = friends
                    .into_iter()
                    .zip(online)
                    .map(|(f, online)| serde_json::json!({"uid": f, "online": online}))
                    .collect();
                Response::json(200, &serde_json::json!({"uid": uid, "friends": friends}))
            }
            (_, ReadAnswer::Members(Err(e)) | ReadAnswer::User(Err(e))) => {
                log::error!("{e}");
                unavailable()
            }
            (action, ReadAnswer::Members(Ok(_))) => return self.execute(key, action),
            (action, answer) => {
                log::error!("admin read {rid}: {answer:?} does not answer {action:?}");
                Response::error(500, "internal error")
            }
        };
        self.answer_http(key, answer.to_bytes());
    }

    /// Holds the exchange until batch `batch` is durable, then answers 204.
    fn wait_for_commit(&mut self, key: ConnId, batch: BatchId) {
        // In batch order, which commits go in: a change already in flight may be older than
        // the ones waiting.
        let at = self.committing.partition_point(|(b, _)| *b <= batch);
        self.committing.insert(at, (batch, key));
        self.set_phase(key, Phase::Committing(batch));
    }

    /// Queues the exchange's answer; the exchange ends once it is written.
    pub(super) fn answer_http(&mut self, key: ConnId, answer: Vec<u8>) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.outbox.push(&answer, &mut self.pool);
        self.set_phase(key, Phase::Answer);
        self.mark_dirty(key);
    }

    /// Moves the exchange to `phase`, with that phase's deadline.
    fn set_phase(&mut self, key: ConnId, next: Phase) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        if let Transport::Http { phase, request, .. } = &mut c.transport {
            *phase = next;
            if next != Phase::Request {
                *request = Vec::new();
            }
        }
        if let Some((id, _)) = c.timer.take() {
            self.wheel.cancel(id);
        }
        self.arm_timer(key);
    }

    /// A phase of the exchange ran out of time: a request still incomplete gets 408, an
    /// answer still unread is dropped.
    pub(super) fn on_exchange_timer(&mut self, key: ConnId) {
        let Some(Transport::Http { phase, .. }) = self.conns.get(key).map(|c| &c.transport) else {
            return;
        };
        match phase {
            Phase::Request => {
                let answer = Response::error(408, "request not complete in time").to_bytes();
                self.answer_http(key, answer);
            }
            Phase::Answer => self.remove(key),
            Phase::Committing(_) | Phase::Sending | Phase::Reading(_) => {}
        }
    }

    /// Turns a public connection whose plain GET needs the store or the core (the web demo's
    /// `/dev/*` routes) into an HTTP exchange like an admin request's, and carries it out.
    pub(super) fn hand_over(&mut self, key: ConnId, action: AdminAction) {
        let Some(c) = self.conns.get_mut(key) else {
            return;
        };
        c.transport.release_buffers(&mut self.pool);
        c.transport = Transport::http(false);
        self.stream_count -= 1;
        self.execute(key, action);
    }
}

/// A plain GET on the public listener: 426 on a WebSocket path, else the web demo.
pub(super) fn serve_get(ws: &mut crate::ws::Connection, request: &PlainRequest, cx: &mut Cx<'_>) {
    if cx.endpoints.iter().any(|e| e.path == request.path) {
        ws.reject(&HttpError::UpgradeRequired, cx.staging);
        return;
    }
    match web::route(request, cx.im.dev_secret.as_deref(), cx.now.unix_ms) {
        AdminAction::Respond(r) => ws.respond(&r.to_bytes(), cx.staging),
        action => cx.handover = Some(action),
    }
}

/// The group whose members `action` needs cached before it can be carried out.
fn warm_for(action: &AdminAction) -> Option<&str> {
    match action {
        AdminAction::SetMembership { gid, .. }
        | AdminAction::Send {
            to: Recipient::Group(gid),
            ..
        }
        | AdminAction::Signal {
            to: SignalRecipient::To(Recipient::Group(gid)),
            ..
        } => Some(gid),
        _ => None,
    }
}

/// 503: a read the request needs failed.
fn unavailable() -> Response {
    Response::error(503, "the store cannot be read")
}

/// The answer to a change the store did not confirm; making it again is safe.
pub(super) fn unconfirmed() -> Response {
    Response::error(503, "the store did not confirm the change; make it again")
}

fn target(r: &Recipient) -> Target<'_> {
    match r {
        Recipient::User(uid) => Target::User(uid),
        Recipient::Group(gid) => Target::Group(gid),
    }
}
