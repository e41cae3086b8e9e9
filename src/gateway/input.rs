//! Bytes in: a connection's input through its framing (the WebSocket state machine, the raw
//! TCP length prefix, or an HTTP exchange), the upgrade to a service, and each message to its
//! service.

use std::ops::Range;

use log::debug;

use super::close;
use super::conn::Conn;
use super::http::serve_get;
use super::im::im_frame;
use super::metrics::Metrics;
use super::transport::{Codec, Route, Service, Transport};
use super::{ConnId, Gateway, Im, Input, JSON_PROTOCOL, ZERO_COPY_MIN};
use crate::buffer_pool::BufferPool;
use crate::gateway::admin_api::AdminAction;
use crate::im::core::Now;
use crate::im::proto::ClientFrame;
use crate::im::tcp_framing::TooLarge;
use crate::ws::handshake::{self, Endpoint, HttpError, Policy, UpgradeRequest};
use crate::ws::{frame, Event, Failure, MessageKind};

impl Gateway {
    /// Claims the connection's share of input for this turn (a byte budget is the reactor's;
    /// the frame budget is [`super::FRAMES_PER_TURN`]). False if it already had its share:
    /// the rest goes on next turn, or when new bytes arrive.
    pub fn claim_turn(&mut self, conn: ConnId) -> bool {
        match self.conns.get_mut(conn) {
            Some(c) if c.read_turn != self.turn => {
                c.read_turn = self.turn;
                self.frames_left = super::FRAMES_PER_TURN;
                true
            }
            _ => false,
        }
    }

    /// `n` bytes arrived from the socket (before they are passed to
    /// [`Gateway::handle_input`]). Returns false when that ends the connection: it closed,
    /// and keeps sending past [`super::MAX_DISCARD`] bytes.
    pub fn handle_received(&mut self, conn: ConnId, n: usize, now: Now) -> bool {
        self.metrics.bytes_in.inc_by(n as u64);
        if let Some(c) = self.conns.get_mut(conn) {
            c.last_inbound = now.mono_ms;
        }
        self.discard_after_close(conn, n)
    }

    /// Runs received bytes through the connection's framing and its service, one frame at a
    /// time, until they are used up or the connection's output is full or its share of the
    /// turn is used up (the rest is then held). `input` may be unmasked in place.
    pub fn handle_input(&mut self, key: ConnId, input: &mut [u8], now: Now) -> Input {
        self.now = now;
        if self.staging_owner.is_some_and(|o| o != key) {
            self.queue_staging();
        }
        let shutting_down = self.shutdown_deadline.is_some();
        let Gateway {
            conns,
            limits,
            im,
            metrics,
            staging,
            input_refs,
            pool,
            endpoints,
            policy,
            open_count,
            frames_left,
            ..
        } = self;
        let Some(conn) = conns.get_mut(key) else {
            return Input::Gone;
        };
        let mut cx = Cx {
            key,
            metrics,
            now,
            im,
            staging,
            input_refs,
            pool,
            endpoints,
            policy,
            open_count,
            max_connections: limits.max_connections,
            shutting_down,
            handover: None,
            high_water: limits.high_water,
            frames_left,
            read_base: input.as_ptr() as usize,
            read_len: input.len(),
        };
        let (used, stop) = process_input(conn, input, &mut cx);
        let handover = cx.handover.take();
        self.staging_owner = Some(key);
        if self
            .conns
            .get(key)
            .is_some_and(|c| matches!(c.transport, Transport::Http { .. }))
        {
            self.http_input(key);
            return Input::Taken;
        }
        if let Some(action) = handover {
            self.hand_over(key, action);
            return Input::Taken;
        }
        match stop {
            None => Input::Taken,
            Some(Stop::TurnShare) => {
                self.hold(key, &input[used..]);
                self.resume.push(key);
                Input::Later
            }
            Some(Stop::OutputFull) => {
                self.hold(key, &input[used..]);
                Input::Full
            }
        }
    }

    /// After [`Input::Full`] and a write: whether input may go on now. If the connection is
    /// not throttled but the IM core still has no room, it goes on next turn instead.
    pub fn go_on(&mut self, conn: ConnId) -> bool {
        let Some(c) = self.conns.get(conn) else {
            return false;
        };
        if c.throttled {
            // Resumed once the output drains (see `write_to`).
            return false;
        }
        if c.transport.is_im() && !self.im.core.has_room(conn) {
            self.resume.push(conn);
            return false;
        }
        true
    }

    /// Keeps `bytes` for the connection to handle later.
    fn hold(&mut self, key: ConnId, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        debug_assert!(conn.held.is_empty());
        if bytes.is_empty() {
            return;
        }
        if conn.held.capacity() == 0 {
            conn.held = self.pool.take();
        }
        conn.held.extend_from_slice(bytes);
    }
}

/// Everything input processing may touch besides the connection itself.
pub(super) struct Cx<'a> {
    pub(super) key: ConnId,
    pub(super) metrics: &'a Metrics,
    pub(super) now: Now,
    pub(super) im: &'a mut Im,
    pub(super) staging: &'a mut Vec<u8>,
    pub(super) input_refs: &'a mut Vec<(usize, Range<usize>)>,
    pub(super) pool: &'a mut BufferPool,
    pub(super) endpoints: &'a [Endpoint<Route>],
    pub(super) policy: &'a Policy,
    pub(super) open_count: &'a mut usize,
    pub(super) max_connections: usize,
    pub(super) shutting_down: bool,
    /// A plain GET routed to something that needs the store or the core (see
    /// `Gateway::hand_over`).
    pub(super) handover: Option<AdminAction>,
    /// `--outbound-high-water`.
    pub(super) high_water: usize,
    /// Frames the connection may still have handled in this loop turn.
    pub(super) frames_left: &'a mut usize,
    /// Where the input buffer starts and how long it is: payloads inside it can be echoed
    /// from there without a copy.
    pub(super) read_base: usize,
    pub(super) read_len: usize,
}

impl Cx<'_> {
    /// Whether the connection's output (queued, and staged during this input) has reached the
    /// high-water mark, or the IM core has no room left for it: then no more input is taken,
    /// so that no answer is built before there is room for it.
    fn output_full(&self, queued: usize) -> bool {
        let echoed: usize = self.input_refs.iter().map(|(_, r)| r.len()).sum();
        queued + self.staging.len() + echoed >= self.high_water || !self.im.core.has_room(self.key)
    }

    /// Counts one frame against the connection's share of the loop turn; false when used up.
    fn take_frame(&mut self) -> bool {
        *self.frames_left = self.frames_left.saturating_sub(1);
        *self.frames_left > 0
    }
}

/// Why handling stopped before the end of the input; the rest is held for later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// The connection's output reached the high-water mark: dispatch it, and take the rest
    /// only once the output has drained.
    OutputFull,
    /// The connection used its share of frames for this loop turn: the rest waits a turn.
    TurnShare,
}

/// Runs bytes through the connection's framing and service until they are used up or a
/// [`Stop`] applies. Returns the bytes consumed; bytes a closed or failed connection will
/// never handle count as consumed.
fn process_input(conn: &mut Conn, input: &mut [u8], cx: &mut Cx<'_>) -> (usize, Option<Stop>) {
    let queued = conn.outbox.len();
    let ws = match &mut conn.transport {
        Transport::Ws { ws, service } => (ws, service),
        Transport::Http { request, phase, .. } => {
            if *phase == super::transport::Phase::Request {
                request.extend_from_slice(input);
            }
            return (input.len(), None);
        }
        Transport::Tcp { framing, closed } => {
            let mut offset = 0;
            while offset < input.len() && !*closed {
                match framing.decode(&input[offset..]) {
                    Ok((used, frame)) => {
                        offset += used;
                        if let Some(payload) = frame {
                            im_frame(cx.im, cx.key, payload, cx.now);
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
                        cx.im.core.on_frame_too_large(cx.key);
                        break;
                    }
                }
            }
            return (input.len(), None);
        }
    };
    let (ws, service) = ws;
    let mut offset = 0;
    while offset < input.len() {
        match process_ws(
            ws,
            service,
            &mut conn.counted_open,
            &mut input[offset..],
            cx,
        ) {
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
    input: &mut [u8],
    cx: &mut Cx<'_>,
) -> Option<usize> {
    // The input buffer's bounds, to tell whether a payload lies in it (zero-copy echo).
    let (base, input_len) = (cx.read_base, cx.read_len);
    let progress = match ws.handle(input, cx.now.mono_ms, cx.staging, cx.pool) {
        Ok(p) => p,
        Err(Failure::Http(e)) => {
            debug!("handshake rejected: {} {}", e.status(), e.detail());
            return None;
        }
        Err(Failure::Ws(e)) => {
            debug!("protocol error: {e}");
            close::count_protocol_close(cx.metrics, e.close_code());
            return None;
        }
    };
    let consumed = progress.consumed;
    match progress.event {
        None if consumed == 0 => return None,
        None => {}
        Some(Event::Upgrade(request)) => upgrade(ws, service, counted_open, &request, cx),
        Some(Event::Get(request)) => {
            serve_get(ws, &request, cx);
            return None;
        }
        Some(Event::Message(kind, payload)) => match *service {
            Some(Service::Echo) => {
                let at = (payload.as_ptr() as usize).wrapping_sub(base);
                if payload.len() >= ZERO_COPY_MIN && at < input_len {
                    // Unmasked in place in the input buffer: send it from there.
                    frame::write_header(cx.staging, true, kind.opcode(), payload.len());
                    cx.input_refs
                        .push((cx.staging.len(), at..at + payload.len()));
                } else {
                    frame::write_frame(cx.staging, kind.opcode(), payload);
                }
            }
            Some(Service::Im(codec)) => {
                let core = &mut cx.im.core;
                match (kind, codec) {
                    (MessageKind::Binary, Codec::Protobuf) => {
                        im_frame(cx.im, cx.key, payload, cx.now)
                    }
                    (MessageKind::Text, Codec::Json) => {
                        match serde_json::from_slice::<ClientFrame>(payload) {
                            Ok(f) => core.on_frame(cx.key, f, cx.now),
                            Err(_) => core.on_bad_frame(cx.key, "malformed JSON frame"),
                        }
                    }
                    (MessageKind::Text, Codec::Protobuf) => {
                        core.on_bad_frame(cx.key, "text frames need the imgate.v1.json subprotocol")
                    }
                    (MessageKind::Binary, Codec::Json) => core
                        .on_bad_frame(cx.key, "binary frames are not accepted with imgate.v1.json"),
                }
            }
            None => {}
        },
        Some(Event::Closed { code, reason }) => {
            debug!("peer closed: {code:?} {reason:?}");
            close::count_peer_close(cx.metrics, code);
        }
    }
    Some(consumed)
}

fn upgrade(
    ws: &mut crate::ws::Connection,
    service: &mut Option<Service>,
    counted_open: &mut bool,
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
            *service = Some(match accepted.kind {
                Route::Echo => Service::Echo,
                Route::Im if accepted.protocol == Some(JSON_PROTOCOL) => Service::Im(Codec::Json),
                Route::Im => Service::Im(Codec::Protobuf),
            });
            if let Some(Service::Im(_)) = service {
                cx.im.core.on_open(cx.key, cx.now);
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
