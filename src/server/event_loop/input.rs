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
    /// `--outbound-high-water`.
    pub(super) high_water: usize,
    /// Frames the connection may still have handled in this loop turn.
    pub(super) frames_left: &'a mut usize,
    /// Where the shared receive buffer starts and how many bytes of it this read filled:
    /// payloads inside it can be echoed from there without a copy.
    pub(super) read_base: usize,
    pub(super) read_len: usize,
}

impl Cx<'_> {
    /// Whether the connection's output (queued, and staged during this input) has reached the
    /// high-water mark, or the IM core has no room left for it: then no more input is taken,
    /// so that no answer is built before there is room for it.
    fn output_full(&self, queued: usize) -> bool {
        let echoed: usize = self.input_refs.iter().map(|(_, r)| r.len()).sum();
        queued + self.staging.len() + echoed >= self.high_water
            || self
                .im
                .as_deref()
                .is_some_and(|im| !im.core.has_room(self.key))
    }

    /// Counts one frame against the connection's share of the loop turn; false when used up.
    fn take_frame(&mut self) -> bool {
        *self.frames_left = self.frames_left.saturating_sub(1);
        *self.frames_left > 0
    }
}

/// Why handling stopped before the end of the input; the rest is held for later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// The connection's output reached the high-water mark: dispatch it, and take the rest
    /// only once the output has drained.
    OutputFull,
    /// The connection used its share of frames for this loop turn: the rest waits a turn.
    TurnShare,
}

/// Runs received bytes through the connection's framing and its service, one frame at a
/// time, until they are used up or a [`Stop`] applies. Returns the bytes consumed; bytes a
/// closed or failed connection will never handle count as consumed.
pub(super) fn process_input(
    conn: &mut Conn,
    input: &mut [u8],
    cx: &mut Cx<'_>,
) -> (usize, Option<Stop>) {
    let queued = conn.outbox.len();
    let Conn {
        transport,
        service,
        counted_open,
        json,
        ..
    } = conn;
    let ws = match transport {
        Transport::Ws(ws) => ws,
        Transport::Tcp { framing, closed } => {
            let mut offset = 0;
            while offset < input.len() && !*closed {
                let Some(im) = cx.im.as_deref_mut() else {
                    break;
                };
                match framing.decode(&input[offset..]) {
                    Ok((used, frame)) => {
                        offset += used;
                        if let Some(payload) = frame {
                            im_frame(im, cx.key, payload, cx.now);
                            if cx.output_full(queued) {
                                return (offset, Some(Stop::OutputFull));
                            }
                            if !cx.take_frame() {
                                return (offset, Some(Stop::TurnShare));
                            }
                        }
                    }
                    Err(TooLarge(n)) => {
                        debug!("conn {}: raw TCP frame of {n} bytes", cx.key);
                        im.core.on_frame_too_large(cx.key);
                        break;
                    }
                }
            }
            return (input.len(), None);
        }
    };
    let mut offset = 0;
    while offset < input.len() {
        match process_ws(ws, service, counted_open, json, &mut input[offset..], cx) {
            Some(used) => offset += used,
            None => return (input.len(), None),
        }
        if offset < input.len() {
            if cx.output_full(queued) {
                return (offset, Some(Stop::OutputFull));
            }
            if !cx.take_frame() {
                return (offset, Some(Stop::TurnShare));
            }
        }
    }
    (input.len(), None)
}

/// Handles one step of WebSocket input (a frame, or the request head). Returns the bytes it
/// consumed, or None when the connection will take no more input from this read (failed,
/// closed, or handed over).
fn process_ws(
    ws: &mut crate::ws::Connection,
    service: &mut Option<Service>,
    counted_open: &mut bool,
    json: &mut bool,
    input: &mut [u8],
    cx: &mut Cx<'_>,
) -> Option<usize> {
    // The receive buffer's bounds, to tell whether a payload lies in it (zero-copy echo).
    let (base, input_len) = (cx.read_base, cx.read_len);
    let progress = match ws.handle(input, cx.now.mono_ms, cx.staging, cx.pool) {
        Ok(p) => p,
        Err(Failure::Http(e)) => {
            debug!("handshake rejected: {} {}", e.status(), e.detail());
            return None;
        }
        Err(Failure::Ws(e)) => {
            debug!("protocol error: {e}");
            cx.metrics.close(e.close_code(), "server");
            return None;
        }
    };
    let consumed = progress.consumed;
    match progress.event {
        None if consumed == 0 => return None,
        None => {}
        Some(Event::Upgrade(request)) => upgrade(ws, service, counted_open, json, &request, cx),
        Some(Event::Get(request)) => {
            serve_get(ws, &request, cx);
            return None;
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
                    return Some(consumed);
                };
                match (kind, *json) {
                    (MessageKind::Binary, false) => im_frame(im, cx.key, payload, cx.now),
                    (MessageKind::Text, true) => {
                        match serde_json::from_slice::<ClientFrame>(payload) {
                            Ok(f) => im.core.on_frame(cx.key, f, cx.now, &*im.store),
                            Err(_) => im.core.on_bad_frame(cx.key, "malformed JSON frame"),
                        }
                    }
                    (MessageKind::Text, false) => im
                        .core
                        .on_bad_frame(cx.key, "text frames need the imgate.v1.json subprotocol"),
                    (MessageKind::Binary, true) => im
                        .core
                        .on_bad_frame(cx.key, "binary frames are not accepted with imgate.v1.json"),
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
    Some(consumed)
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
