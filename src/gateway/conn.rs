//! What the gateway keeps per connection: the sans-IO protocol state, queued output, flow
//! control and the one timer the connection may have. The socket itself is the reactor's.
//!
//! Kept small on purpose: an idle open connection is this struct in a slab slot plus one timer
//! entry, and no heap buffers.

use super::outbox::Outbox;
use super::timer_wheel::TimerId;
use super::transport::{Phase, Transport};
use crate::ws::{self, State};

/// Which deadline a connection's single timer currently stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimerKind {
    /// The upgrade request must arrive and be answered (`--handshake-timeout`).
    Handshake,
    /// The next keep-alive check: a ping, the idle close, the login deadline or overdue acks.
    KeepAlive,
    /// The peer must answer our Close (`--close-timeout`).
    Close,
    /// An HTTP exchange's current phase (`--handshake-timeout`).
    Exchange,
}

impl TimerKind {
    /// The deadline a connection with `transport` needs, if any.
    pub(crate) fn wanted(transport: &Transport) -> Option<TimerKind> {
        match transport {
            Transport::Http { phase, .. } => match phase {
                Phase::Request | Phase::Answer => Some(TimerKind::Exchange),
                Phase::Committing(_) | Phase::Sending | Phase::Reading(_) => None,
            },
            _ => Some(match transport.state() {
                ws::State::Handshaking | ws::State::AwaitingAccept => TimerKind::Handshake,
                ws::State::Open => TimerKind::KeepAlive,
                ws::State::CloseSent | ws::State::Closed => TimerKind::Close,
            }),
        }
    }
}

pub(crate) struct Conn {
    pub(crate) transport: Transport,
    pub(crate) outbox: Outbox,
    /// The connection's single timer and what it stands for.
    pub(crate) timer: Option<(TimerId, TimerKind)>,
    /// Loop time (ms) of the last bytes received.
    pub(crate) last_inbound: u64,
    /// Loop time (ms) of the last Ping we sent.
    pub(crate) last_ping: u64,
    /// Loop time (ms) the connection was accepted (for the login deadline).
    pub(crate) opened_ms: u64,
    /// The peer closed its sending side.
    pub(crate) peer_eof: bool,
    /// Our sending side was shut down after the last byte of a Close or HTTP error left.
    pub(crate) write_shut: bool,
    /// Counted in the open-connection total (for `--max-connections`).
    pub(crate) counted_open: bool,
    /// Set when the unsent output reached `--outbound-high-water`, cleared once it is under
    /// half of it. While set, nothing is read from the socket (the peer's bytes wait in the
    /// kernel, and TCP flow control slows it down) and the IM core builds no new output.
    pub(crate) throttled: bool,
    /// Bytes read from the socket but not handled yet, because the connection became
    /// throttled or used its share of the loop turn: handled before the socket is read again.
    /// At most one read's worth; empty (no allocation) otherwise.
    pub(crate) held: Vec<u8>,
    /// The loop turn in which input was last handled: at most once per turn, so that a
    /// connection both woken by the poller and scheduled to go on gets one share, not two.
    /// (A wrapping count: equality is all that is asked of it.)
    pub(crate) read_turn: u32,
    /// Bytes read and thrown away since the connection closed (it is only waiting for the
    /// peer's FIN); a peer that keeps sending is dropped once this passes a read's worth.
    pub(crate) discarded: u32,
    /// Listed in the gateway's connections with output to write.
    pub(crate) dirty: bool,
}

impl Conn {
    pub(crate) fn new(transport: Transport, now: u64) -> Self {
        Conn {
            transport,
            outbox: Outbox::default(),
            timer: None,
            last_inbound: now,
            last_ping: now,
            opened_ms: now,
            peer_eof: false,
            write_shut: false,
            counted_open: false,
            throttled: false,
            held: Vec::new(),
            read_turn: u32::MAX,
            discarded: 0,
            dirty: false,
        }
    }

    pub(crate) fn state(&self) -> State {
        self.transport.state()
    }
}
