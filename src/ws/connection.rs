//! One WebSocket connection as a sans-IO state machine: bytes in, events and bytes out.
//!
//! ```text
//!  Handshaking --request--> AwaitingAccept --accept--> Open --close sent--> CloseSent
//!       |                        |                       |                     |
//!       +--bad request-----------+--reject---------------+--close received-----+--> Closed
//!                                                        +--protocol error--------> Closed
//! ```
//!
//! The caller owns the socket. It passes received bytes to [`Connection::handle`] until they are
//! consumed, writes whatever the connection appended to `out`, and once [`Connection::is_closed`]
//! holds it flushes `out` and closes the TCP connection. Time enters only as the value passed to
//! [`Connection::handle`] (for the empty-frame allowance); timeouts are the caller's, expressed
//! by calling [`Connection::close`].
//!
//! Data payloads are unmasked in place in the caller's input buffer; a message that arrives as
//! one complete frame in one read is handed out as a slice of that buffer without a copy. Only
//! messages split across frames or reads are assembled in a buffer borrowed from the pool.

use super::error::{code, is_valid_received_close_code, WsError};
use super::flood::EmptyFrameLimit;
use super::frame::{self, FrameHeader, OpCode, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use super::handshake::{self, HttpError, Parse, PlainRequest, UpgradeRequest, MAX_REQUEST_HEAD};
use super::utf8::Utf8Validator;
use crate::buffer_pool::BufferPool;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Reading the HTTP Upgrade request.
    Handshaking,
    /// The request is complete; the caller must [`Connection::accept`],
    /// [`Connection::reject`] or (a plain GET) [`Connection::respond`] to it.
    AwaitingAccept,
    /// Messages flow both ways.
    Open,
    /// We sent a Close frame and wait for the peer's; its data frames are discarded.
    CloseSent,
    /// Nothing more will be sent; flush the output and close the socket.
    Closed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

impl MessageKind {
    pub fn opcode(self) -> OpCode {
        match self {
            MessageKind::Text => OpCode::Text,
            MessageKind::Binary => OpCode::Binary,
        }
    }
}

/// Something the caller must act on.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A valid upgrade request arrived: route it, then `accept` or `reject`.
    Upgrade(UpgradeRequest),
    /// A plain HTTP GET without Upgrade: `respond` (or `reject`, e.g. 426), which closes.
    Get(PlainRequest),
    /// A complete data message. Text payloads are valid UTF-8.
    Message(MessageKind, &'a [u8]),
    /// The closing handshake finished (the peer's Close arrived). The reply, if one was due,
    /// is already in `out`.
    Closed { code: Option<u16>, reason: &'a str },
}

/// What one call to [`Connection::handle`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Progress<'a> {
    /// Bytes of the input consumed; feed the rest in the next call.
    pub consumed: usize,
    pub event: Option<Event<'a>>,
}

/// A fatal handshake or protocol failure. The answer (HTTP status or Close frame) is already in
/// `out` and the connection is [`State::Closed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Http(HttpError),
    Ws(WsError),
}

/// The data frame sequence being received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct MessageInProgress {
    kind: MessageKind,
    len: usize,
}

/// The frame whose payload is being received.
#[derive(Debug, Clone, Copy)]
struct FrameInProgress {
    header: FrameHeader,
    /// Payload bytes received so far (also the masking phase).
    received: u64,
}

#[derive(Debug)]
pub struct Connection {
    state: State,
    /// Bytes of a frame header split across reads.
    header_buf: [u8; MAX_HEADER_LEN],
    header_len: u8,
    frame: Option<FrameInProgress>,
    message: Option<MessageInProgress>,
    utf8: Utf8Validator,
    /// Set when the last event lent out `assembled`; it is cleared on the next call.
    assembled_lent: bool,
    max_message: usize,
    empty_frames: EmptyFrameLimit,
    /// Partial request head, partial control payload, or partial data message. Empty (no
    /// allocation) whenever nothing is half-received. Control frames interleaved in a
    /// fragmented message use `control` so they never disturb `assembled`.
    handshake: Vec<u8>,
    assembled: Vec<u8>,
    control: Vec<u8>,
}

/// Frames without data (pings, pongs, empty fragments) a connection may send per second unless
/// [`Connection::set_max_empty_frames`] says otherwise.
pub const DEFAULT_MAX_EMPTY_FRAMES: u32 = 100;

impl Connection {
    /// A connection that starts by reading an HTTP Upgrade request.
    pub fn new(max_message: usize) -> Self {
        Connection {
            state: State::Handshaking,
            header_buf: [0; MAX_HEADER_LEN],
            header_len: 0,
            frame: None,
            message: None,
            utf8: Utf8Validator::new(),
            assembled_lent: false,
            max_message,
            empty_frames: EmptyFrameLimit::new(DEFAULT_MAX_EMPTY_FRAMES),
            handshake: Vec::new(),
            assembled: Vec::new(),
            control: Vec::new(),
        }
    }

    /// A connection whose handshake already happened elsewhere (tests, fuzzing).
    pub fn new_open(max_message: usize) -> Self {
        let mut c = Self::new(max_message);
        c.state = State::Open;
        c
    }

    /// Sets how many frames without data (pings, pongs, empty fragments) the peer may send per
    /// second; the next one fails the connection with 1008.
    pub fn set_max_empty_frames(&mut self, per_sec: u32) {
        self.empty_frames = EmptyFrameLimit::new(per_sec);
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether data messages can be sent.
    pub fn is_open(&self) -> bool {
        self.state == State::Open
    }

    /// Bytes held in the connection's own buffers (handshake, message assembly, control).
    pub fn buffered(&self) -> usize {
        self.handshake.len() + self.assembled.len() + self.control.len()
    }

    /// Gives idle buffers back to the pool. Call when a batch of input has been handled.
    pub fn release_buffers(&mut self, pool: &mut BufferPool) {
        if self.assembled_lent || self.message.is_none() {
            self.assembled_lent = false;
            pool.give(std::mem::take(&mut self.assembled));
        }
        if !self.frame.is_some_and(|f| f.header.opcode.is_control()) {
            pool.give(std::mem::take(&mut self.control));
        }
        if self.state != State::Handshaking {
            pool.give(std::mem::take(&mut self.handshake));
        }
    }

    /// Consumes a prefix of `input` and reports at most one event.
    ///
    /// Call repeatedly with the unconsumed rest until it is empty. Every call consumes at least
    /// one byte or returns an event, except in [`State::AwaitingAccept`], which waits for the
    /// caller's decision. In [`State::Closed`] all input is consumed and ignored. `now_ms` is
    /// the caller's monotonic clock in milliseconds.
    ///
    /// # Errors
    ///
    /// A [`Failure`] when the request or a frame breaks the protocol (or the empty-frame
    /// allowance); its answer is already in `out` and the connection is closed.
    pub fn handle<'a>(
        &'a mut self,
        input: &'a mut [u8],
        now_ms: u64,
        out: &mut Vec<u8>,
        pool: &mut BufferPool,
    ) -> Result<Progress<'a>, Failure> {
        if self.assembled_lent {
            self.assembled_lent = false;
            self.assembled.clear();
        }
        match self.state {
            State::Handshaking => self.handle_handshake(input, out, pool),
            State::AwaitingAccept => Ok(Progress {
                consumed: 0,
                event: None,
            }),
            State::Open | State::CloseSent => self.handle_frames(input, now_ms, out, pool),
            State::Closed => Ok(Progress {
                consumed: input.len(),
                event: None,
            }),
        }
    }

    /// Answers the pending upgrade request with the 101 `response`.
    pub fn accept(&mut self, response: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(self.state, State::AwaitingAccept);
        out.extend_from_slice(response);
        self.state = State::Open;
    }

    /// Answers the pending upgrade request with an HTTP error; the connection is closed.
    pub fn reject(&mut self, error: &HttpError, out: &mut Vec<u8>) {
        self.respond(&error.response(), out);
    }

    /// Answers the pending request with a complete HTTP `response` (which must say
    /// `Connection: close`); the connection is closed.
    pub fn respond(&mut self, response: &[u8], out: &mut Vec<u8>) {
        debug_assert!(matches!(
            self.state,
            State::Handshaking | State::AwaitingAccept
        ));
        out.extend_from_slice(response);
        self.state = State::Closed;
    }

    /// Starts the closing handshake (shutdown, timeouts, slow consumers, the application).
    ///
    /// Before the upgrade completed there is no WebSocket to close: the connection just closes.
    /// Returns whether a Close frame was written.
    pub fn close(&mut self, code: u16, reason: &str, out: &mut Vec<u8>) -> bool {
        match self.state {
            State::Open => {
                frame::write_close(out, code, reason);
                self.state = State::CloseSent;
                true
            }
            State::Handshaking | State::AwaitingAccept => {
                self.state = State::Closed;
                false
            }
            State::CloseSent | State::Closed => false,
        }
    }

    /// Gives up on the closing handshake (close timeout, peer vanished).
    pub fn abort(&mut self) {
        self.state = State::Closed;
    }

    /// Appends a data message. Returns false (and writes nothing) unless the connection is open.
    pub fn send(&self, kind: MessageKind, payload: &[u8], out: &mut Vec<u8>) -> bool {
        self.send_parts(kind, &[payload], out)
    }

    /// Appends a data message whose payload is `parts` in order, without joining them first.
    pub fn send_parts(&self, kind: MessageKind, parts: &[&[u8]], out: &mut Vec<u8>) -> bool {
        if self.state != State::Open {
            return false;
        }
        frame::write_frame_parts(out, kind.opcode(), parts);
        true
    }

    /// Appends a Ping frame (keep-alive). Returns false unless the connection is open.
    pub fn ping(&self, payload: &[u8], out: &mut Vec<u8>) -> bool {
        if self.state != State::Open {
            return false;
        }
        frame::write_frame(out, OpCode::Ping, payload);
        true
    }

    fn handle_handshake<'a>(
        &'a mut self,
        input: &'a mut [u8],
        out: &mut Vec<u8>,
        pool: &mut BufferPool,
    ) -> Result<Progress<'a>, Failure> {
        let already = self.handshake.len();
        let parsed = if already == 0 {
            handshake::parse_request(input)
        } else {
            // Never hold more than one byte past the limit: that is enough to answer 431.
            let take = input
                .len()
                .min(MAX_REQUEST_HEAD + 1 - already.min(MAX_REQUEST_HEAD));
            self.handshake.extend_from_slice(&input[..take]);
            handshake::parse_request(&self.handshake)
        };
        match parsed {
            Ok(Parse::Partial) => {
                if already == 0 {
                    if self.handshake.capacity() == 0 {
                        self.handshake = pool.take();
                    }
                    let take = input.len().min(MAX_REQUEST_HEAD + 1);
                    self.handshake.extend_from_slice(&input[..take]);
                }
                Ok(Progress {
                    consumed: input.len(),
                    event: None,
                })
            }
            Ok(Parse::Upgrade { request, head_len }) => {
                pool.give(std::mem::take(&mut self.handshake));
                self.state = State::AwaitingAccept;
                Ok(Progress {
                    consumed: head_len - already,
                    event: Some(Event::Upgrade(request)),
                })
            }
            Ok(Parse::Plain { request, head_len }) => {
                pool.give(std::mem::take(&mut self.handshake));
                self.state = State::AwaitingAccept;
                Ok(Progress {
                    consumed: head_len - already,
                    event: Some(Event::Get(request)),
                })
            }
            Err(e) => {
                pool.give(std::mem::take(&mut self.handshake));
                self.reject(&e, out);
                Err(Failure::Http(e))
            }
        }
    }

    fn handle_frames<'a>(
        &'a mut self,
        input: &'a mut [u8],
        now_ms: u64,
        out: &mut Vec<u8>,
        pool: &mut BufferPool,
    ) -> Result<Progress<'a>, Failure> {
        let step = match self.decode(input, now_ms, out, pool) {
            Ok(step) => step,
            Err(e) => {
                // Fail the connection (§7.1.7): say why, and do not wait for the peer's Close.
                if self.state == State::Open {
                    frame::write_close(out, e.close_code(), e.reason());
                }
                self.state = State::Closed;
                self.frame = None;
                self.message = None;
                return Err(Failure::Ws(e));
            }
        };
        let source = |src: Source| -> &'a [u8] {
            match src {
                Source::Input(range) => &input[range],
                Source::Assembled => &self.assembled,
                Source::Control => &self.control,
            }
        };
        let event = match step.found {
            None => None,
            Some(Found::Message(kind, src)) => Some(Event::Message(kind, source(src))),
            Some(Found::Closed(code, src)) => Some(Event::Closed {
                code,
                reason: close_reason(source(src)),
            }),
        };
        Ok(Progress {
            consumed: step.consumed,
            event,
        })
    }

    /// Decodes at most one frame's worth of `input`. Returns where an event's bytes are, not
    /// the bytes, so that errors can still update `self` (see `handle_frames`).
    fn decode(
        &mut self,
        input: &mut [u8],
        now_ms: u64,
        out: &mut Vec<u8>,
        pool: &mut BufferPool,
    ) -> Result<Step, WsError> {
        let mut consumed = 0;
        let frame = match self.frame {
            Some(f) => f,
            None => {
                let Some(n) = self.read_header(input)? else {
                    return Ok(Step::consumed(input.len()));
                };
                consumed = n;
                let header = self.start_frame(now_ms)?;
                FrameInProgress {
                    header,
                    received: 0,
                }
            }
        };
        let remaining = frame.header.payload_len - frame.received;
        let rest_len = input.len() - consumed;
        let avail = usize::try_from(remaining).map_or(rest_len, |r| r.min(rest_len));
        let payload_range = consumed..consumed + avail;
        let chunk = &mut input[payload_range.clone()];
        // `received` is bounded by the message limit, so it fits in usize.
        frame::apply_mask(chunk, frame.header.mask, frame.received as usize);
        consumed += avail;
        let complete = avail as u64 == remaining;
        let header = frame.header;
        let in_progress = Some(FrameInProgress {
            header,
            received: frame.received + avail as u64,
        });

        if header.opcode.is_control() {
            let src = if complete && frame.received == 0 {
                Source::Input(payload_range)
            } else {
                if self.control.capacity() == 0 {
                    self.control = pool.take();
                }
                self.control.extend_from_slice(chunk);
                if !complete {
                    self.frame = in_progress;
                    return Ok(Step::consumed(consumed));
                }
                Source::Control
            };
            self.frame = None;
            // `on_control` needs `&mut self`, so the control payload is moved out meanwhile.
            let control = std::mem::take(&mut self.control);
            let payload = match &src {
                Source::Input(r) => &input[r.clone()],
                _ => &control[..],
            };
            let closed = self.on_control(header.opcode, payload, out);
            self.control = control;
            return match closed? {
                Some(code) => Ok(Step {
                    consumed,
                    found: Some(Found::Closed(code, src)),
                }),
                None => {
                    self.control.clear();
                    Ok(Step::consumed(consumed))
                }
            };
        }

        let Some(msg) = self.message else {
            unreachable!("start_frame opens a message for every data frame");
        };
        if msg.kind == MessageKind::Text {
            self.utf8.feed(chunk).map_err(|_| WsError::InvalidUtf8)?;
        }
        let discard = self.state == State::CloseSent;
        if complete && header.fin && frame.received == 0 && self.assembled.is_empty() {
            // The whole message is one frame inside this input: hand it out in place.
            self.frame = None;
            self.finish_message()?;
            return Ok(Step {
                consumed,
                found: (!discard).then_some(Found::Message(msg.kind, Source::Input(payload_range))),
            });
        }
        if !discard {
            if self.assembled.capacity() == 0 {
                self.assembled = pool.take();
            }
            self.assembled.extend_from_slice(chunk);
        }
        if !complete {
            self.frame = in_progress;
            return Ok(Step::consumed(consumed));
        }
        self.frame = None;
        if !header.fin {
            return Ok(Step::consumed(consumed));
        }
        self.finish_message()?;
        if discard {
            self.assembled.clear();
            return Ok(Step::consumed(consumed));
        }
        self.assembled_lent = true;
        Ok(Step {
            consumed,
            found: Some(Found::Message(msg.kind, Source::Assembled)),
        })
    }

    /// Reads a frame header from `input`, completing one split across reads. Returns the
    /// number of input bytes it used, or `None` when all of `input` went into a partial header.
    fn read_header(&mut self, input: &[u8]) -> Result<Option<usize>, WsError> {
        let held = usize::from(self.header_len);
        let take = input.len().min(MAX_HEADER_LEN - held);
        self.header_buf[held..held + take].copy_from_slice(&input[..take]);
        match frame::parse_client_header(&self.header_buf[..held + take])? {
            Some((header, len)) => {
                self.header_len = 0;
                self.frame = Some(FrameInProgress {
                    header,
                    received: 0,
                });
                Ok(Some(len - held))
            }
            None => {
                // Fewer than MAX_HEADER_LEN bytes in total, so `take` was all of `input`.
                self.header_len = (held + take) as u8;
                Ok(None)
            }
        }
    }

    /// Applies the message-level rules to the header just read (now in `self.frame`).
    fn start_frame(&mut self, now_ms: u64) -> Result<FrameHeader, WsError> {
        let Some(FrameInProgress { header, .. }) = self.frame else {
            unreachable!("read_header stores the frame");
        };
        if carries_no_data(&header) && !self.empty_frames.allow(now_ms) {
            return Err(WsError::EmptyFrameFlood);
        }
        if !header.opcode.is_control() {
            let len = match (header.opcode, self.message) {
                (OpCode::Continuation, None) => return Err(WsError::UnexpectedContinuation),
                (OpCode::Continuation, Some(m)) => m.len,
                (_, Some(_)) => return Err(WsError::ExpectedContinuation),
                (op, None) => {
                    let kind = if op == OpCode::Text {
                        MessageKind::Text
                    } else {
                        MessageKind::Binary
                    };
                    self.message = Some(MessageInProgress { kind, len: 0 });
                    self.utf8 = Utf8Validator::new();
                    0
                }
            };
            let total = u64::try_from(len)
                .unwrap_or(u64::MAX)
                .saturating_add(header.payload_len);
            if total > self.max_message as u64 {
                return Err(WsError::MessageTooBig);
            }
            if let Some(m) = self.message.as_mut() {
                m.len = total as usize;
            }
        }
        Ok(header)
    }

    /// Ends the message whose last byte was just received.
    fn finish_message(&mut self) -> Result<(), WsError> {
        let msg = self.message.take();
        if msg.is_some_and(|m| m.kind == MessageKind::Text) && !self.utf8.is_complete() {
            return Err(WsError::InvalidUtf8);
        }
        Ok(())
    }

    /// Answers pings and Close frames. Returns `Some(code)` when the peer's Close ended the
    /// connection.
    fn on_control(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<Option<Option<u16>>, WsError> {
        debug_assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        match opcode {
            OpCode::Ping => {
                if self.state == State::Open {
                    frame::write_frame(out, OpCode::Pong, payload);
                }
                Ok(None)
            }
            OpCode::Pong => Ok(None),
            OpCode::Close => {
                let code = parse_close_payload(payload)?;
                if self.state == State::Open {
                    // Echo the peer's code (§5.5.1); a Close without one is answered with 1000.
                    frame::write_close(out, code.unwrap_or(code::NORMAL), "");
                }
                self.state = State::Closed;
                self.message = None;
                Ok(Some(code))
            }
            _ => unreachable!("only control opcodes reach here"),
        }
    }
}

/// Where the bytes of a decoded event are.
enum Source {
    Input(std::ops::Range<usize>),
    Assembled,
    Control,
}

enum Found {
    Message(MessageKind, Source),
    Closed(Option<u16>, Source),
}

/// One decoding step, before its event is turned into borrowed slices.
struct Step {
    consumed: usize,
    found: Option<Found>,
}

impl Step {
    fn consumed(consumed: usize) -> Step {
        Step {
            consumed,
            found: None,
        }
    }
}

/// Pings, pongs, and data frames with no payload that are not a whole (empty) message: frames
/// that cost work and move nothing. A Close is not one of them; it ends the connection.
fn carries_no_data(h: &FrameHeader) -> bool {
    match h.opcode {
        OpCode::Ping | OpCode::Pong => true,
        OpCode::Close => false,
        OpCode::Continuation => h.payload_len == 0,
        _ => h.payload_len == 0 && !h.fin,
    }
}

/// Validates a Close payload (§5.5.1, §7.4) and returns its status code, if any.
fn parse_close_payload(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload {
        [] => Ok(None),
        [_] => Err(WsError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_received_close_code(code) {
                return Err(WsError::InvalidCloseCode);
            }
            std::str::from_utf8(reason).map_err(|_| WsError::InvalidCloseReason)?;
            Ok(Some(code))
        }
    }
}

/// The reason text of a Close payload already validated by [`parse_close_payload`].
fn close_reason(payload: &[u8]) -> &str {
    payload
        .get(2..)
        .and_then(|r| std::str::from_utf8(r).ok())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.push(if fin { 0x80 } else { 0 } | opcode);
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&KEY);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
        f
    }

    /// What the connection did with a byte stream.
    #[derive(Debug, Default, PartialEq)]
    struct Outcome {
        messages: Vec<(MessageKind, Vec<u8>)>,
        closed: Option<Option<u16>>,
        failure: Option<Failure>,
        out: Vec<u8>,
    }

    /// Feeds `bytes` to `conn` in pieces of `chunk` bytes, like reads from a socket.
    fn feed(conn: &mut Connection, bytes: &[u8], chunk: usize) -> Outcome {
        let mut pool = BufferPool::new(1024, 4);
        let mut o = Outcome::default();
        for piece in bytes.chunks(chunk.max(1)) {
            let mut buf = piece.to_vec();
            let mut off = 0;
            while off < buf.len() {
                match conn.handle(&mut buf[off..], 0, &mut o.out, &mut pool) {
                    Ok(p) => {
                        off += p.consumed;
                        match p.event {
                            Some(Event::Message(k, data)) => o.messages.push((k, data.to_vec())),
                            Some(Event::Closed { code, .. }) => o.closed = Some(code),
                            Some(Event::Upgrade(_) | Event::Get(_)) => {
                                panic!("no handshake here")
                            }
                            None => assert!(p.consumed > 0, "no progress"),
                        }
                    }
                    Err(f) => {
                        o.failure = Some(f);
                        return o;
                    }
                }
            }
            conn.release_buffers(&mut pool);
        }
        o
    }

    fn close_frame(code: u16) -> Vec<u8> {
        let mut v = Vec::new();
        frame::write_close(&mut v, code, "");
        v
    }

    fn fail_code(bytes: &[u8]) -> u16 {
        for chunk in [1, 3, bytes.len()] {
            let mut c = Connection::new_open(1 << 20);
            let o = feed(&mut c, bytes, chunk);
            let Some(Failure::Ws(e)) = o.failure else {
                panic!("no failure for {bytes:x?} in chunks of {chunk}: {o:?}");
            };
            assert!(c.is_closed());
            assert!(o.out.ends_with(&{
                let mut v = Vec::new();
                frame::write_close(&mut v, e.close_code(), e.reason());
                v
            }));
            if chunk == bytes.len() {
                return e.close_code();
            }
        }
        unreachable!()
    }

    #[test]
    fn rfc_5_7_examples_in_every_split() {
        let mut stream = masked(true, 0x1, b"Hello");
        stream.extend(masked(false, 0x1, b"Hel"));
        stream.extend(masked(true, 0x0, b"lo"));
        stream.extend(masked(true, 0x9, b"Hello"));
        stream.extend(masked(true, 0x2, &[0xAB; 256]));
        stream.extend(masked(true, 0x2, &[0xCD; 65536]));
        for chunk in [1, 2, 5, 7, 64, 1000, stream.len()] {
            let mut c = Connection::new_open(1 << 20);
            let o = feed(&mut c, &stream, chunk);
            assert_eq!(o.failure, None);
            assert_eq!(
                o.messages,
                vec![
                    (MessageKind::Text, b"Hello".to_vec()),
                    (MessageKind::Text, b"Hello".to_vec()),
                    (MessageKind::Binary, vec![0xAB; 256]),
                    (MessageKind::Binary, vec![0xCD; 65536]),
                ],
                "chunk {chunk}"
            );
            // The ping is answered with the §5.7 unmasked pong.
            assert_eq!(o.out, [0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        }
    }

    #[test]
    fn single_frame_messages_in_one_read_are_not_copied() {
        let mut c = Connection::new_open(1024);
        let mut pool = BufferPool::new(1024, 4);
        let mut buf = masked(true, 0x2, b"zero-copy");
        let start = buf.as_ptr() as usize;
        let mut out = Vec::new();
        let p = c.handle(&mut buf, 0, &mut out, &mut pool).unwrap();
        let Some(Event::Message(_, data)) = p.event else {
            panic!("{p:?}")
        };
        assert_eq!(data, b"zero-copy");
        assert_eq!(
            data.as_ptr() as usize,
            start + 6,
            "payload is a slice of the input"
        );
        assert_eq!(c.buffered(), 0);
    }

    #[test]
    fn control_frames_inside_fragmented_messages() {
        let mut s = masked(false, 0x2, b"one");
        s.extend(masked(true, 0x9, b"p1"));
        s.extend(masked(true, 0xA, b"unsolicited pong"));
        s.extend(masked(false, 0x0, b"two"));
        s.extend(masked(true, 0x9, b"p2"));
        s.extend(masked(true, 0x0, b"three"));
        for chunk in [1, 4, s.len()] {
            let mut c = Connection::new_open(1024);
            let o = feed(&mut c, &s, chunk);
            assert_eq!(
                o.messages,
                vec![(MessageKind::Binary, b"onetwothree".to_vec())]
            );
            let mut pongs = Vec::new();
            frame::write_frame(&mut pongs, OpCode::Pong, b"p1");
            frame::write_frame(&mut pongs, OpCode::Pong, b"p2");
            assert_eq!(o.out, pongs);
        }
    }

    #[test]
    fn every_frame_rule_maps_to_its_close_code() {
        assert_eq!(fail_code(&[0x81, 0x05, b'h', b'e', b'l', b'l', b'o']), 1002); // unmasked
        assert_eq!(fail_code(&masked(true, 0x40 | 0x1, b"x")), 1002); // RSV1
        assert_eq!(fail_code(&masked(true, 0x20 | 0x1, b"x")), 1002); // RSV2
        assert_eq!(fail_code(&masked(true, 0x10 | 0x1, b"x")), 1002); // RSV3
        for op in [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            assert_eq!(fail_code(&masked(true, op, b"")), 1002, "opcode {op:x}");
        }
        assert_eq!(fail_code(&masked(false, 0x9, b"")), 1002); // fragmented ping
        assert_eq!(fail_code(&masked(true, 0x9, &[0; 126])), 1002); // long ping
        assert_eq!(fail_code(&masked(true, 0x0, b"x")), 1002); // stray continuation
        let mut s = masked(false, 0x1, b"a");
        s.extend(masked(true, 0x2, b"b"));
        assert_eq!(fail_code(&s), 1002); // new message mid-fragment
        assert_eq!(fail_code(&masked(true, 0x8, &[0x03])), 1002); // 1-byte close
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert_eq!(
                fail_code(&masked(true, 0x8, &code.to_be_bytes())),
                1002,
                "{code}"
            );
        }
        assert_eq!(
            fail_code(&masked(true, 0x8, &[0x03, 0xe8, 0xc3, 0x28])),
            1002
        );
        assert_eq!(fail_code(&masked(true, 0x1, &[0xc3, 0x28])), 1007);
    }

    #[test]
    fn frames_without_data_past_the_allowance_fail_with_1008() {
        let ping = masked(true, 0x9, b"p");
        let empty_fragment = masked(false, 0x0, b"");
        // Within the allowance every ping is answered; empty messages are data and never count.
        let mut c = Connection::new_open(1024);
        c.set_max_empty_frames(3);
        let mut s: Vec<u8> = (0..10).flat_map(|_| masked(true, 0x2, b"")).collect();
        s.extend((0..3).flat_map(|_| ping.clone()));
        let o = feed(&mut c, &s, s.len());
        assert_eq!((o.failure, o.messages.len()), (None, 10));
        let one_more = feed(&mut c, &ping, ping.len());
        assert_eq!(
            one_more.failure,
            Some(Failure::Ws(WsError::EmptyFrameFlood))
        );
        assert!(
            c.is_closed()
                && one_more.out.ends_with(&{
                    let mut v = Vec::new();
                    frame::write_close(&mut v, 1008, "too many empty frames");
                    v
                })
        );

        // Empty continuations count too, and the allowance comes back each second.
        let mut c = Connection::new_open(1024);
        c.set_max_empty_frames(2);
        let mut pool = BufferPool::new(1024, 4);
        let mut out = Vec::new();
        let mut start = masked(false, 0x2, b"a");
        assert!(c.handle(&mut start, 0, &mut out, &mut pool).is_ok());
        for now in [0, 10, 1000, 1500] {
            let mut f = empty_fragment.clone();
            assert!(
                c.handle(&mut f, now, &mut out, &mut pool).is_ok(),
                "at {now}"
            );
        }
        let mut f = empty_fragment.clone();
        let err = c.handle(&mut f, 1999, &mut out, &mut pool).unwrap_err();
        assert_eq!(err, Failure::Ws(WsError::EmptyFrameFlood));
    }

    #[test]
    fn invalid_utf8_fails_fast_mid_frame_and_across_fragments() {
        // Across fragments: the bad fragment fails before the message ends.
        let mut c = Connection::new_open(1024);
        let mut s = masked(false, 0x1, "κόσμε".as_bytes());
        s.extend(masked(false, 0x0, &[0xf4, 0x90]));
        let o = feed(&mut c, &s, s.len());
        assert_eq!(o.failure, Some(Failure::Ws(WsError::InvalidUtf8)));
        // Mid-frame: only part of a 100-byte frame has arrived.
        let mut c = Connection::new_open(1024);
        let mut payload = b"ok".to_vec();
        payload.push(0xff);
        payload.resize(100, b'a');
        let f = masked(true, 0x1, &payload);
        let o = feed(&mut c, &f[..10], 10);
        assert_eq!(o.failure, Some(Failure::Ws(WsError::InvalidUtf8)));
        // A character split across fragments is fine.
        let mut c = Connection::new_open(1024);
        let mut s = masked(false, 0x1, &[0xce]);
        s.extend(masked(true, 0x0, &[0xba]));
        assert_eq!(
            feed(&mut c, &s, 1).messages,
            vec![(MessageKind::Text, "κ".into())]
        );
        // But a message may not end inside one.
        let mut c = Connection::new_open(1024);
        let o = feed(&mut c, &masked(true, 0x1, &[0xce]), 100);
        assert_eq!(o.failure, Some(Failure::Ws(WsError::InvalidUtf8)));
    }

    #[test]
    fn message_limit_counts_across_fragments_and_fails_at_the_header() {
        let mut c = Connection::new_open(10);
        let mut s = masked(false, 0x2, &[1; 6]);
        s.extend(masked(true, 0x0, &[2; 4]));
        assert_eq!(
            feed(&mut c, &s, 3).messages.len(),
            1,
            "exactly the limit is fine"
        );
        let mut c = Connection::new_open(10);
        let mut s = masked(false, 0x2, &[1; 6]);
        s.extend(masked(true, 0x0, &[2; 5]));
        let o = feed(&mut c, &s, s.len());
        assert_eq!(o.failure, Some(Failure::Ws(WsError::MessageTooBig)));
        assert_eq!(WsError::MessageTooBig.close_code(), 1009);
        // The header alone is enough to refuse a huge frame: nothing is buffered first.
        let mut c = Connection::new_open(10);
        let huge = [0x82, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 3, 4];
        let o = feed(&mut c, &huge, huge.len());
        assert_eq!(o.failure, Some(Failure::Ws(WsError::MessageTooBig)));
    }

    #[test]
    fn peer_initiated_close_is_echoed_and_closes() {
        let mut c = Connection::new_open(1024);
        let mut s = masked(true, 0x8, &[0x03, 0xe9, b'b', b'y', b'e']);
        s.extend(masked(true, 0x1, b"ignored"));
        let o = feed(&mut c, &s, 2);
        assert_eq!(o.closed, Some(Some(1001)));
        assert_eq!(o.out, close_frame(1001));
        assert!(o.messages.is_empty(), "nothing is delivered after Close");
        assert!(c.is_closed());
        // An empty Close is answered with 1000.
        let mut c = Connection::new_open(1024);
        let o = feed(&mut c, &masked(true, 0x8, b""), 100);
        assert_eq!((o.closed, o.out), (Some(None), close_frame(1000)));
    }

    #[test]
    fn server_initiated_close_waits_for_the_peer() {
        let mut c = Connection::new_open(1024);
        let mut out = Vec::new();
        assert!(c.close(1001, "bye", &mut out));
        assert_eq!(c.state(), State::CloseSent);
        assert!(!c.send(MessageKind::Text, b"late", &mut Vec::new()));
        // Data still arriving is discarded, pings are not answered, the Close completes it.
        let mut s = masked(true, 0x1, b"in flight");
        s.extend(masked(true, 0x9, b""));
        s.extend(masked(true, 0x8, &1000u16.to_be_bytes()));
        let o = feed(&mut c, &s, 3);
        assert!(o.messages.is_empty());
        assert!(
            o.out.is_empty(),
            "no reply to the peer's Close: ours was already sent"
        );
        assert_eq!(o.closed, Some(Some(1000)));
        assert!(c.is_closed());
    }

    #[test]
    fn handshake_then_frames_in_the_same_bytes() {
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        let mut bytes =
            b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
            Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                .to_vec();
        bytes.extend(masked(true, 0x1, b"hi"));
        let mut out = Vec::new();
        // Deliver the request in two pieces; the second carries the pipelined frame.
        let (first, second) = bytes.split_at_mut(20);
        let p = c.handle(first, 0, &mut out, &mut pool).unwrap();
        assert_eq!((p.consumed, p.event), (20, None));
        let p = c.handle(second, 0, &mut out, &mut pool).unwrap();
        let consumed = p.consumed;
        let Some(Event::Upgrade(req)) = p.event else {
            panic!()
        };
        assert_eq!(req.path, "/echo");
        assert_eq!(c.state(), State::AwaitingAccept);
        c.accept(b"HTTP/1.1 101 ok\r\n\r\n", &mut out);
        let rest = &mut second[consumed..];
        let p = c.handle(rest, 0, &mut out, &mut pool).unwrap();
        assert_eq!(p.event, Some(Event::Message(MessageKind::Text, b"hi")));
    }

    #[test]
    fn bad_handshake_is_answered_and_closed() {
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        let mut out = Vec::new();
        let mut req = b"DELETE / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let err = c.handle(&mut req, 0, &mut out, &mut pool).unwrap_err();
        assert_eq!(err, Failure::Http(HttpError::MethodNotAllowed));
        assert!(out.starts_with(b"HTTP/1.1 405 "));
        assert!(c.is_closed());
    }

    #[test]
    fn idle_connections_hold_no_buffers() {
        let mut c = Connection::new_open(1 << 20);
        let mut pool = BufferPool::new(1024, 4);
        let f = masked(true, 0x2, &[9; 5000]);
        let mut out = Vec::new();
        // Half a frame: the partial message is held.
        let mut a = f[..2000].to_vec();
        let p = c.handle(&mut a, 0, &mut out, &mut pool).unwrap();
        assert_eq!(p.consumed, 2000);
        c.release_buffers(&mut pool);
        assert!(c.buffered() > 0);
        let mut b = f[2000..].to_vec();
        let p = c.handle(&mut b, 0, &mut out, &mut pool).unwrap();
        assert!(matches!(p.event, Some(Event::Message(_, d)) if d.len() == 5000));
        c.release_buffers(&mut pool);
        assert_eq!(c.buffered(), 0);
        assert_eq!(
            c.assembled.capacity() + c.control.capacity() + c.handshake.capacity(),
            0
        );
    }

    const REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    /// A request head that never ends: a request line and long headers (few enough for the
    /// header count limit) past `len` bytes.
    fn endless_head(len: usize) -> Vec<u8> {
        let mut b = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        while b.len() < len {
            b.extend_from_slice(format!("X-Filler: {}\r\n", "a".repeat(500)).as_bytes());
        }
        b
    }

    /// Feeds a request head in the given reads, calling `release_buffers` after each as the
    /// gateway does; returns the first event or failure.
    fn handshake_reads(
        c: &mut Connection,
        pool: &mut BufferPool,
        reads: &[&[u8]],
    ) -> Result<Option<(usize, Event<'static>)>, Failure> {
        let mut out = Vec::new();
        for read in reads {
            let mut buf = read.to_vec();
            let p = c.handle(&mut buf, 0, &mut out, pool)?;
            if let Some(e) = p.event {
                let e = match e {
                    Event::Upgrade(r) => Event::Upgrade(r),
                    Event::Get(r) => Event::Get(r),
                    other => panic!("{other:?}"),
                };
                return Ok(Some((p.consumed, e)));
            }
            assert_eq!(p.consumed, read.len());
            c.release_buffers(pool);
        }
        Ok(None)
    }

    #[test]
    fn a_connection_is_open_from_accept_until_it_starts_closing() {
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        assert!(!c.is_open() && !c.is_closed(), "handshaking");
        assert!(!c.send(MessageKind::Text, b"early", &mut Vec::new()));
        assert!(matches!(
            handshake_reads(&mut c, &mut pool, &[REQUEST]),
            Ok(Some((_, Event::Upgrade(_))))
        ));
        assert!(!c.is_open() && !c.is_closed(), "awaiting accept");
        let mut out = Vec::new();
        c.accept(b"HTTP/1.1 101 ok\r\n\r\n", &mut out);
        assert!(c.is_open() && !c.is_closed(), "open");
        out.clear();
        assert!(c.send(MessageKind::Text, b"Hello", &mut out));
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        assert!(c.close(1001, "", &mut Vec::new()));
        assert!(!c.is_open() && !c.is_closed(), "close sent");
    }

    #[test]
    fn abort_closes_at_once_and_later_input_is_ignored() {
        let mut c = Connection::new_open(1024);
        assert!(c.close(1001, "", &mut Vec::new()));
        c.abort();
        assert!(c.is_closed());
        let o = feed(&mut c, &masked(true, 0x9, b"late"), 100);
        assert_eq!(o, Outcome::default(), "no pong, no event");
    }

    #[test]
    fn buffered_counts_a_partial_message_and_a_partial_control_frame_inside_it() {
        let mut c = Connection::new_open(1024);
        let mut pool = BufferPool::new(1024, 4);
        let mut out = Vec::new();
        let mut s = masked(false, 0x2, b"abcdef");
        let ping = masked(true, 0x9, b"ping!");
        // The ping's header and two of its five payload bytes.
        s.extend_from_slice(&ping[..ping.len() - 3]);
        let mut off = 0;
        while off < s.len() {
            let p = c.handle(&mut s[off..], 0, &mut out, &mut pool).unwrap();
            assert_eq!(p.event, None);
            off += p.consumed;
        }
        assert_eq!(c.buffered(), 6 + 2);
    }

    #[test]
    fn an_assembled_buffer_goes_back_to_the_pool_once_its_message_was_handed_out() {
        let mut c = Connection::new_open(1024);
        let mut pool = BufferPool::new(1024, 4);
        let mut out = Vec::new();
        let mut s = masked(false, 0x2, b"one");
        s.extend(masked(true, 0x0, b"two"));
        let consumed = c.handle(&mut s, 0, &mut out, &mut pool).unwrap().consumed;
        let mut rest = s[consumed..].to_vec();
        let p = c.handle(&mut rest, 0, &mut out, &mut pool).unwrap();
        assert_eq!(
            p.event,
            Some(Event::Message(MessageKind::Binary, &b"onetwo"[..]))
        );
        // The next call takes the buffer back from the event; between messages it is idle.
        let mut ping = masked(true, 0x9, b"");
        assert!(c.handle(&mut ping, 0, &mut out, &mut pool).is_ok());
        c.release_buffers(&mut pool);
        assert_eq!(c.assembled.capacity(), 0);
        assert_eq!(pool.idle(), 1);
    }

    #[test]
    fn a_request_head_split_across_reads_is_parsed_whole() {
        let long = String::from_utf8(REQUEST.to_vec()).unwrap().replacen(
            "Host: x\r\n",
            &format!("Host: x\r\nCookie: {}\r\n", "c".repeat(3000)),
            1,
        );
        let (first, second) = long.as_bytes().split_at(20);
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        let Ok(Some((consumed, Event::Upgrade(req)))) =
            handshake_reads(&mut c, &mut pool, &[first, second])
        else {
            panic!("no upgrade")
        };
        assert_eq!((consumed, req.path.as_str()), (second.len(), "/echo"));
    }

    #[test]
    fn a_plain_get_split_across_reads_consumes_only_the_rest_of_its_head() {
        let mut bytes = b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let head = bytes.len();
        bytes.extend_from_slice(b"GET /next");
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        let Ok(Some((consumed, Event::Get(req)))) =
            handshake_reads(&mut c, &mut pool, &[&bytes[..10], &bytes[10..]])
        else {
            panic!("no GET")
        };
        assert_eq!((consumed, req.path.as_str()), (head - 10, "/index.html"));
    }

    #[test]
    fn a_partial_request_head_is_held_in_a_pooled_buffer() {
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        let warm = pool.take();
        pool.give(warm);
        assert!(matches!(
            handshake_reads(&mut c, &mut pool, &[&REQUEST[..30]]),
            Ok(None)
        ));
        assert_eq!(
            (c.buffered(), pool.idle()),
            (30, 0),
            "the pool's buffer is in use"
        );
        assert!(matches!(
            handshake_reads(&mut c, &mut pool, &[&REQUEST[30..]]),
            Ok(Some((_, Event::Upgrade(_))))
        ));
        assert_eq!((c.buffered(), pool.idle()), (0, 1), "and given back");
    }

    #[test]
    fn a_request_head_of_exactly_the_limit_is_held_whole() {
        let head = endless_head(MAX_REQUEST_HEAD);
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        assert!(matches!(
            handshake_reads(&mut c, &mut pool, &[&head[..MAX_REQUEST_HEAD]]),
            Ok(None)
        ));
        assert_eq!(c.buffered(), MAX_REQUEST_HEAD);
    }

    #[test]
    fn a_request_head_past_the_limit_is_431_however_it_is_split() {
        let head = endless_head(3 * MAX_REQUEST_HEAD);
        for read in [100, 1000, 5000] {
            let reads: Vec<&[u8]> = head.chunks(read).collect();
            let mut c = Connection::new(1024);
            let mut pool = BufferPool::new(1024, 4);
            assert_eq!(
                handshake_reads(&mut c, &mut pool, &reads).unwrap_err(),
                Failure::Http(HttpError::HeadersTooLarge),
                "reads of {read}"
            );
            assert!(c.is_closed());
        }
    }

    #[test]
    fn bytes_past_the_request_head_limit_are_not_parsed() {
        // Malformed, but only after the limit: the answer is 431, not 400.
        let mut head = endless_head(MAX_REQUEST_HEAD + 2);
        head.extend_from_slice(b"Bad Name: x\r\n\r\n");
        let mut c = Connection::new(1024);
        let mut pool = BufferPool::new(1024, 4);
        assert_eq!(
            handshake_reads(&mut c, &mut pool, &[&head[..4000], &head[4000..]]).unwrap_err(),
            Failure::Http(HttpError::HeadersTooLarge)
        );
    }

    #[test]
    fn an_empty_final_continuation_counts_as_a_frame_without_data() {
        let mut c = Connection::new_open(1024);
        c.set_max_empty_frames(2);
        let mut message = masked(false, 0x2, b"a");
        message.extend(masked(true, 0x0, b""));
        let o = feed(&mut c, &[message.clone(), message.clone()].concat(), 100);
        assert_eq!((o.failure, o.messages.len()), (None, 2));
        let o = feed(&mut c, &message, 100);
        assert_eq!(o.failure, Some(Failure::Ws(WsError::EmptyFrameFlood)));
    }

    #[test]
    fn the_closed_event_carries_the_peers_reason() {
        let mut pool = BufferPool::new(1024, 4);
        let mut out = Vec::new();
        let mut c = Connection::new_open(1024);
        let mut close = masked(true, 0x8, &[0x03, 0xe9, b'b', b'y', b'e']);
        let p = c.handle(&mut close, 0, &mut out, &mut pool).unwrap();
        assert_eq!(
            p.event,
            Some(Event::Closed {
                code: Some(1001),
                reason: "bye"
            })
        );
        let mut c = Connection::new_open(1024);
        let mut close = masked(true, 0x8, b"");
        let p = c.handle(&mut close, 0, &mut out, &mut pool).unwrap();
        assert_eq!(
            p.event,
            Some(Event::Closed {
                code: None,
                reason: ""
            })
        );
    }
}
