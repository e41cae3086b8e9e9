//! Bytes in: a connection's input through its framing (the WebSocket state machine, or the
//! raw TCP length prefix), the upgrade to a service, and each message to its service.

use log::debug;

use super::http::serve_get;
use super::im::im_frame;
use super::{ImService, JSON_PROTOCOL, ZERO_COPY_MIN};
use crate::buffer_pool::BufferPool;
use crate::im::core::Now;
use crate::im::proto::ClientFrame;
use crate::im::tcp_framing::TooLarge;
use crate::server::admin::AdminAction;
use crate::server::conn::{Conn, Service};
use crate::server::metrics::Metrics;
use crate::server::transport::Transport;
use crate::ws::handshake::{self, Endpoint, HttpError, Policy, UpgradeRequest};
use crate::ws::{frame, Event, Failure, MessageKind};
use std::ops::Range;

/// Everything input processing may touch besides the connection itself.
pub(super) struct Cx<'a> {
    pub(super) key: usize,
    pub(super) metrics: &'a Metrics,
    pub(super) now: Now,
    pub(super) im: Option<&'a mut ImService>,
    pub(super) staging: &'a mut Vec<u8>,
    pub(super) input_refs: &'a mut Vec<(usize, Range<usize>)>,
    pub(super) pool: &'a mut BufferPool,
    pub(super) endpoints: &'a [Endpoint<Service>],
    pub(super) policy: &'a Policy,
    pub(super) open_count: &'a mut usize,
    pub(super) max_connections: usize,
    pub(super) shutting_down: bool,
    /// A plain GET routed to something the shell must carry out (see `hand_over_to_http`).
    pub(super) handover: Option<AdminAction>,
}

/// Runs received bytes through the connection's framing and its service.
pub(super) fn process_input(conn: &mut Conn, input: &mut [u8], cx: &mut Cx<'_>) {
    let Conn {
        transport,
        service,
        counted_open,
        json,
        ..
    } = conn;
    match transport {
        Transport::Ws(ws) => process_ws(ws, service, counted_open, json, input, cx),
        Transport::Tcp { framing, closed } => {
            let mut offset = 0;
            while offset < input.len() && !*closed {
                let Some(im) = cx.im.as_deref_mut() else {
                    return;
                };
                match framing.decode(&input[offset..]) {
                    Ok((used, frame)) => {
                        offset += used;
                        if let Some(payload) = frame {
                            im_frame(im, cx.key, payload, cx.now);
                        }
                    }
                    Err(TooLarge(n)) => {
                        debug!("conn {}: raw TCP frame of {n} bytes", cx.key);
                        im.core.on_frame_too_large(cx.key);
                        return;
                    }
                }
            }
        }
    }
}

fn process_ws(
    ws: &mut crate::ws::Connection,
    service: &mut Option<Service>,
    counted_open: &mut bool,
    json: &mut bool,
    input: &mut [u8],
    cx: &mut Cx<'_>,
) {
    let (base, input_len) = (input.as_ptr() as usize, input.len());
    let mut offset = 0;
    while offset < input.len() {
        let progress = match ws.handle(&mut input[offset..], cx.staging, cx.pool) {
            Ok(p) => p,
            Err(Failure::Http(e)) => {
                debug!("handshake rejected: {} {}", e.status(), e.detail());
                return;
            }
            Err(Failure::Ws(e)) => {
                debug!("protocol error: {e}");
                cx.metrics.close(e.close_code(), "server");
                return;
            }
        };
        offset += progress.consumed;
        match progress.event {
            None if progress.consumed == 0 => return,
            None => {}
            Some(Event::Upgrade(request)) => upgrade(ws, service, counted_open, json, &request, cx),
            Some(Event::Get(request)) => {
                serve_get(ws, &request, cx);
                return;
            }
            Some(Event::Message(kind, payload)) => match *service {
                Some(Service::Echo) => {
                    let at = (payload.as_ptr() as usize).wrapping_sub(base);
                    if payload.len() >= ZERO_COPY_MIN && at < input_len {
                        // Unmasked in place in the receive buffer: send it from there.
                        frame::write_header(cx.staging, true, kind.opcode(), payload.len());
                        cx.input_refs
                            .push((cx.staging.len(), at..at + payload.len()));
                    } else {
                        frame::write_frame(cx.staging, kind.opcode(), payload);
                    }
                }
                Some(Service::Im) => {
                    let Some(im) = cx.im.as_deref_mut() else {
                        continue;
                    };
                    match (kind, *json) {
                        (MessageKind::Binary, false) => im_frame(im, cx.key, payload, cx.now),
                        (MessageKind::Text, true) => {
                            match serde_json::from_slice::<ClientFrame>(payload) {
                                Ok(f) => im.core.on_frame(cx.key, f, cx.now, &*im.store),
                                Err(_) => im.core.on_bad_frame(cx.key, "malformed JSON frame"),
                            }
                        }
                        (MessageKind::Text, false) => im.core.on_bad_frame(
                            cx.key,
                            "text frames need the imgate.v1.json subprotocol",
                        ),
                        (MessageKind::Binary, true) => im.core.on_bad_frame(
                            cx.key,
                            "binary frames are not accepted with imgate.v1.json",
                        ),
                    }
                }
                None => {}
            },
            Some(Event::Closed { code, reason }) => {
                debug!("peer closed: {code:?} {reason:?}");
                // 1005: "no status code present" (RFC 6455 §7.4.1).
                cx.metrics.close(code.unwrap_or(1005), "peer");
            }
        }
    }
}

fn upgrade(
    ws: &mut crate::ws::Connection,
    service: &mut Option<Service>,
    counted_open: &mut bool,
    json: &mut bool,
    request: &UpgradeRequest,
    cx: &mut Cx<'_>,
) {
    let routed = if cx.shutting_down || *cx.open_count >= cx.max_connections {
        Err(HttpError::Unavailable)
    } else {
        handshake::accept(request, cx.endpoints, cx.policy)
    };
    match routed {
        Ok(accepted) => {
            ws.accept(&accepted.response, cx.staging);
            *service = Some(accepted.kind);
            *json = accepted.protocol == Some(JSON_PROTOCOL);
            if accepted.kind == Service::Im {
                if let Some(im) = cx.im.as_deref_mut() {
                    im.core.on_open(cx.key, cx.now);
                }
            }
            *counted_open = true;
            *cx.open_count += 1;
        }
        Err(e) => {
            debug!("upgrade refused: {} {}", e.status(), e.detail());
            ws.reject(&e, cx.staging);
        }
    }
}
