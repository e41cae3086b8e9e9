//! What the shell keeps per socket: the socket, the sans-IO protocol state, queued output and
//! the one timer the connection may have.
//!
//! Kept small on purpose: an idle open connection is this struct in a slab slot plus one timer
//! entry, and no heap buffers.

use mio::net::TcpStream;

use super::outbox::Outbox;
use super::timer_wheel::TimerId;
use super::transport::Transport;
use crate::ws;

/// What runs on top of the WebSocket once the upgrade is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// `/echo` (only with `--echo`): every data message is sent back unchanged.
    Echo,
    /// `/ws`: the IM protocol, one protobuf `ClientFrame` per binary message.
    Im,
}

/// Which deadline a connection's single timer currently stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKind {
    Handshake,
    KeepAlive,
    Close,
}

impl TimerKind {
    /// The deadline a connection in `state` needs.
    pub fn for_state(state: ws::State) -> TimerKind {
        match state {
            ws::State::Handshaking | ws::State::AwaitingAccept => TimerKind::Handshake,
            ws::State::Open => TimerKind::KeepAlive,
            ws::State::CloseSent | ws::State::Closed => TimerKind::Close,
        }
    }
}

pub struct Conn {
    pub sock: TcpStream,
    pub transport: Transport,
    pub service: Option<Service>,
    pub outbox: Outbox,
    /// The connection's single timer: handshake timeout, keep-alive check or close timeout,
    /// depending on the protocol state when it fires.
    pub timer: Option<TimerId>,
    pub timer_kind: TimerKind,
    /// Loop time (ms) of the last bytes received.
    pub last_inbound: u64,
    /// Loop time (ms) of the last Ping we sent.
    pub last_ping: u64,
    /// The peer closed its sending side.
    pub peer_eof: bool,
    /// We shut down our sending side after the last byte of a Close or HTTP error left.
    pub write_shut: bool,
    /// Counted in the open-connection total (for `--max-connections`).
    pub counted_open: bool,
    /// Loop time (ms) the connection was accepted (for the login deadline).
    pub opened_ms: u64,
    /// IM frames are JSON text messages (subprotocol `imgate.v1.json`), not binary protobuf.
    pub json: bool,
    /// Set when the unsent output reached `--outbound-high-water`, cleared once it is under
    /// half of it. While set, nothing is read from the socket (the peer's bytes wait in the
    /// kernel, and TCP flow control slows it down) and the IM core builds no new output.
    pub throttled: bool,
    /// Bytes read from the socket but not handled yet, because the connection became
    /// throttled or used its share of the loop turn: handled before the socket is read again.
    /// At most one read's worth; empty (no allocation) otherwise.
    pub held: Vec<u8>,
    /// The loop turn in which input was last handled: at most once per turn, so that a
    /// connection both woken by the poller and scheduled to go on gets one share, not two.
    pub read_turn: u64,
    /// Bytes read and thrown away since the connection closed (it is only waiting for the
    /// peer's FIN); a peer that keeps sending is dropped once this passes a read's worth.
    pub discarded: usize,
}

impl Conn {
    /// A connection from the raw TCP listener: it speaks the IM protocol from the first byte.
    pub fn new_tcp(sock: TcpStream, max_frame: usize, now: u64) -> Self {
        let mut c = Conn::new(sock, max_frame, now);
        c.transport = Transport::tcp(max_frame);
        c.service = Some(Service::Im);
        c
    }

    pub fn new(sock: TcpStream, max_message: usize, now: u64) -> Self {
        Conn {
            sock,
            transport: Transport::Ws(ws::Connection::new(max_message)),
            service: None,
            outbox: Outbox::default(),
            timer: None,
            timer_kind: TimerKind::Handshake,
            last_inbound: now,
            last_ping: now,
            peer_eof: false,
            write_shut: false,
            counted_open: false,
            opened_ms: now,
            json: false,
            throttled: false,
            held: Vec::new(),
            read_turn: u64::MAX,
            discarded: 0,
        }
    }
}
