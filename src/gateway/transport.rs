//! How a connection's bytes are framed: a WebSocket (with its HTTP upgrade and closing
//! handshake), the raw TCP listener's length-prefixed IM frames, or one HTTP exchange (an
//! admin request, or a web demo request that needs the store).
//!
//! The timers, limits and the IM dispatch talk to the first two through the same small
//! surface (state, send, ping, close), so they do not care which listener a connection came
//! from.

use crate::buffer_pool::BufferPool;
use crate::im::core::{BatchId, ReadId};
use crate::im::tcp_framing::LengthPrefixed;
use crate::ws::{self, MessageKind, State};

/// How IM frames are encoded on a `/ws` connection, chosen by the subprotocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Codec {
    /// One protobuf `ClientFrame`/`ServerFrame` per binary message (`imgate.v1.proto`, or no
    /// subprotocol); always on raw TCP.
    Protobuf,
    /// One JSON frame per text message (`imgate.v1.json`).
    Json,
}

/// What runs on top of an accepted WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Service {
    /// `/echo` (only with `--echo`): every data message is sent back unchanged.
    Echo,
    /// `/ws`: the IM protocol.
    Im(Codec),
}

/// The WebSocket endpoints a request may be routed to; the subprotocol then picks the codec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Echo,
    Im,
}

/// Where an HTTP exchange is. Each phase but the waiting ones has a deadline
/// (`--handshake-timeout`): a request still incomplete gets 408, an answer still unread is
/// dropped. Waiting for the store does not count against the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// The request is arriving.
    Request,
    /// Answered 204 once this batch is durable.
    Committing(BatchId),
    /// A `POST /v1/messages` waits for the core's `AdminSent`.
    Sending,
    /// Waits for the answer to this store read (`Output::AdminRead`).
    Reading(ReadId),
    /// The answer is queued; the exchange ends once it is written.
    Answer,
}

pub(crate) enum Transport {
    /// The public listener. `service` is set once the upgrade is accepted.
    Ws {
        ws: ws::Connection,
        service: Option<Service>,
    },
    /// Raw TCP, always the IM protocol in protobuf. There is no closing handshake: `closed`
    /// means "flush, then close".
    Tcp {
        framing: LengthPrefixed,
        closed: bool,
    },
    /// One HTTP request and its answer.
    Http {
        request: Vec<u8>,
        phase: Phase,
        admin: bool,
    },
}

impl Transport {
    pub(crate) fn tcp(max_frame: usize) -> Transport {
        Transport::Tcp {
            framing: LengthPrefixed::new(max_frame),
            closed: false,
        }
    }

    /// An HTTP exchange; `admin` when it came from the admin listener (it then counts
    /// against `--max-admin-connections`).
    pub(crate) fn http(admin: bool) -> Transport {
        Transport::Http {
            request: Vec::new(),
            phase: Phase::Request,
            admin,
        }
    }

    /// The service the connection's messages go to, once known.
    pub(crate) fn service(&self) -> Option<Service> {
        match self {
            Transport::Ws { service, .. } => *service,
            Transport::Tcp { .. } => Some(Service::Im(Codec::Protobuf)),
            Transport::Http { .. } => None,
        }
    }

    /// Whether the connection carries the IM protocol (it has an IM session).
    pub(crate) fn is_im(&self) -> bool {
        matches!(self.service(), Some(Service::Im(_)))
    }

    /// The WebSocket lifecycle state; a raw TCP connection is Open until closed, an HTTP
    /// exchange Open until its answer is queued.
    pub(crate) fn state(&self) -> State {
        match self {
            Transport::Ws { ws, .. } => ws.state(),
            Transport::Tcp { closed: false, .. } => State::Open,
            Transport::Tcp { closed: true, .. } => State::Closed,
            Transport::Http {
                phase: Phase::Answer,
                ..
            } => State::Closed,
            Transport::Http { .. } => State::Open,
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.state() == State::Open
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.state() == State::Closed
    }

    /// Appends one message (one IM frame). Raw TCP frames are always binary. False unless
    /// open.
    pub(crate) fn send(&self, kind: MessageKind, payload: &[u8], out: &mut Vec<u8>) -> bool {
        self.send_parts(kind, &[payload], out)
    }

    /// Like [`Transport::send`], for a payload in parts.
    pub(crate) fn send_parts(&self, kind: MessageKind, parts: &[&[u8]], out: &mut Vec<u8>) -> bool {
        match self {
            Transport::Ws { ws, .. } => ws.send_parts(kind, parts, out),
            Transport::Tcp { closed: false, .. } => {
                LengthPrefixed::encode_parts(parts, out);
                true
            }
            Transport::Tcp { closed: true, .. } | Transport::Http { .. } => false,
        }
    }

    /// Appends a keep-alive ping where the transport has one (raw TCP clients send Ping
    /// frames themselves).
    pub(crate) fn ping(&self, out: &mut Vec<u8>) -> bool {
        match self {
            Transport::Ws { ws, .. } => ws.ping(b"", out),
            Transport::Tcp { .. } | Transport::Http { .. } => false,
        }
    }

    /// Starts closing: a Close frame on a WebSocket (true when one was queued); on raw TCP,
    /// just the TCP close (false: there is no closing handshake to wait for).
    pub(crate) fn close(&mut self, code: u16, reason: &str, out: &mut Vec<u8>) -> bool {
        match self {
            Transport::Ws { ws, .. } => ws.close(code, reason, out),
            Transport::Tcp { closed, .. } => {
                *closed = true;
                false
            }
            Transport::Http { .. } => false,
        }
    }

    pub(crate) fn release_buffers(&mut self, pool: &mut BufferPool) {
        match self {
            Transport::Ws { ws, .. } => ws.release_buffers(pool),
            Transport::Tcp { framing, .. } => framing.release(),
            Transport::Http { .. } => {}
        }
    }

    /// The label of `GET /metrics`'s connection gauge; None for HTTP exchanges.
    pub(crate) fn metrics_label(&self) -> Option<&'static str> {
        match self {
            Transport::Ws { .. } => Some("ws"),
            Transport::Tcp { .. } => Some("tcp"),
            Transport::Http { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::Event;

    /// Feeds one read to the WebSocket; returns the lengths of the messages it completed.
    fn read(t: &mut Transport, bytes: &[u8], pool: &mut BufferPool) -> Vec<usize> {
        let Transport::Ws { ws, .. } = t else {
            panic!("not a WebSocket");
        };
        let mut input = bytes.to_vec();
        let (mut at, mut messages) = (0, Vec::new());
        while at < input.len() {
            let p = ws
                .handle(&mut input[at..], 0, &mut Vec::new(), pool)
                .unwrap();
            if let Some(Event::Message(_, data)) = p.event {
                messages.push(data.len());
            }
            at += p.consumed;
        }
        messages
    }

    #[test]
    fn a_websockets_message_buffer_goes_back_to_the_pool_once_its_message_is_handled() {
        let mut pool = BufferPool::new(1024, 4);
        let mut t = Transport::Ws {
            ws: ws::Connection::new_open(1 << 20),
            service: Some(Service::Echo),
        };
        // One masked binary frame of 100 bytes (a zero key), split across two reads.
        let mut frame = vec![0x82, 0x80 | 100, 0, 0, 0, 0];
        frame.extend_from_slice(&[9; 100]);
        assert_eq!(read(&mut t, &frame[..50], &mut pool), Vec::<usize>::new());
        t.release_buffers(&mut pool);
        assert_eq!(pool.idle(), 0, "the half message keeps its buffer");
        assert_eq!(read(&mut t, &frame[50..], &mut pool), vec![100]);
        t.release_buffers(&mut pool);
        assert_eq!(pool.idle(), 1);
    }
}
