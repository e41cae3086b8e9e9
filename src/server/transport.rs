//! How a connection's bytes are framed: a WebSocket (with its HTTP upgrade and closing
//! handshake), or the raw TCP listener's length-prefixed IM frames.
//!
//! The shell talks to both through the same small surface (state, send, ping, close), so the
//! timers, limits and the IM dispatch do not care which listener a connection came from.

use crate::buffer_pool::BufferPool;
use crate::im::tcp_framing::LengthPrefixed;
use crate::ws::{self, MessageKind, State};

pub enum Transport {
    Ws(ws::Connection),
    /// Raw TCP. There is no closing handshake: `closed` means "flush, then close".
    Tcp {
        framing: LengthPrefixed,
        closed: bool,
    },
}

impl Transport {
    pub fn tcp(max_frame: usize) -> Transport {
        Transport::Tcp {
            framing: LengthPrefixed::new(max_frame),
            closed: false,
        }
    }

    /// The WebSocket lifecycle state; a raw TCP connection is Open until closed.
    pub fn state(&self) -> State {
        match self {
            Transport::Ws(c) => c.state(),
            Transport::Tcp { closed: false, .. } => State::Open,
            Transport::Tcp { closed: true, .. } => State::Closed,
        }
    }

    pub fn is_open(&self) -> bool {
        self.state() == State::Open
    }

    pub fn is_closed(&self) -> bool {
        self.state() == State::Closed
    }

    /// Appends one message (one IM frame). Raw TCP frames are always binary. False unless
    /// open.
    pub fn send(&self, kind: MessageKind, payload: &[u8], out: &mut Vec<u8>) -> bool {
        self.send_parts(kind, &[payload], out)
    }

    /// Like [`Transport::send`], for a payload in parts.
    pub fn send_parts(&self, kind: MessageKind, parts: &[&[u8]], out: &mut Vec<u8>) -> bool {
        match self {
            Transport::Ws(c) => c.send_parts(kind, parts, out),
            Transport::Tcp { closed: false, .. } => {
                LengthPrefixed::encode_parts(parts, out);
                true
            }
            Transport::Tcp { closed: true, .. } => false,
        }
    }

    /// Appends a keep-alive ping where the transport has one (raw TCP clients send Ping
    /// frames themselves).
    pub fn ping(&self, out: &mut Vec<u8>) -> bool {
        match self {
            Transport::Ws(c) => c.ping(b"", out),
            Transport::Tcp { .. } => false,
        }
    }

    /// Starts closing: a Close frame on a WebSocket; on raw TCP, just the TCP close.
    pub fn close(&mut self, code: u16, reason: &str, out: &mut Vec<u8>) -> bool {
        match self {
            Transport::Ws(c) => c.close(code, reason, out),
            Transport::Tcp { closed, .. } => {
                *closed = true;
                false
            }
        }
    }

    pub fn release_buffers(&mut self, pool: &mut BufferPool) {
        match self {
            Transport::Ws(c) => c.release_buffers(pool),
            Transport::Tcp { framing, .. } => framing.release(),
        }
    }
}
