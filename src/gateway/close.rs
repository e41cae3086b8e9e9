//! The close policy: why the gateway ends a connection, the close code each reason maps to,
//! and the metrics counted for it, in one place.

use log::{debug, warn};

use super::conn::Conn;
use super::metrics::Metrics;
use super::{ConnId, Gateway};
use crate::ws::code;

/// Why the gateway closes a connection with a close code (a Close frame on a WebSocket, the
/// TCP close on raw TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Why {
    /// Nothing received for `--idle-timeout`: 1001.
    IdleTimeout,
    /// The server is shutting down: 1001.
    ShuttingDown,
    /// No login within `--auth-timeout` of the accept: 1008.
    LoginTimeout,
    /// More than `--max-outbound-bytes` unsent, or throttled for `--idle-timeout`: 1008, and
    /// `imgate_slow_consumer_kills_total`.
    SlowConsumer,
    /// The IM core's decision (bad login, too many bad frames, overdue acks, kicked, the
    /// store unreadable), with its code.
    Im { code: u16, reason: &'static str },
}

impl Why {
    pub(crate) fn code(self) -> u16 {
        match self {
            Why::IdleTimeout | Why::ShuttingDown => code::GOING_AWAY,
            Why::LoginTimeout | Why::SlowConsumer => code::POLICY_VIOLATION,
            Why::Im { code, .. } => code,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Why::IdleTimeout => "idle timeout",
            Why::ShuttingDown => "server shutting down",
            Why::LoginTimeout => "login timeout",
            Why::SlowConsumer => "slow consumer",
            Why::Im { reason, .. } => reason,
        }
    }
}

impl Gateway {
    /// Starts closing `conn` for `why`, into its outbox. Does nothing (false) unless the
    /// connection is open. Returns whether a closing handshake now runs (false for raw TCP,
    /// which just flushes and closes).
    pub(crate) fn close(&mut self, conn: ConnId, why: Why) -> bool {
        let Some(c) = self.conns.get_mut(conn).filter(|c| c.transport.is_open()) else {
            return false;
        };
        self.scratch.clear();
        let handshake = start_close(conn, c, why, &self.metrics, &mut self.scratch);
        c.outbox.push(&self.scratch, &mut self.pool);
        self.mark_dirty(conn);
        handshake
    }
}

/// Starts closing `c` for `why`, the Close frame into `out`, and counts it. Does nothing
/// (false) unless the connection is open. Returns whether a closing handshake now runs.
pub(super) fn start_close(
    key: ConnId,
    c: &mut Conn,
    why: Why,
    metrics: &Metrics,
    out: &mut Vec<u8>,
) -> bool {
    if !c.transport.is_open() {
        return false;
    }
    if why == Why::SlowConsumer {
        warn!(
            "conn {key}: slow consumer ({} bytes unsent), closing with 1008",
            c.outbox.len()
        );
        metrics.slow_consumer_kills.inc();
    } else {
        debug!("conn {key}: closing {} {}", why.code(), why.reason());
    }
    metrics.close(why.code(), "server");
    c.transport.close(why.code(), why.reason(), out)
}

/// Counts a close the peer started (1005 when its Close had no code).
pub(super) fn count_peer_close(metrics: &Metrics, code: Option<u16>) {
    // 1005: "no status code present" (RFC 6455 §7.4.1).
    metrics.close(code.unwrap_or(1005), "peer");
}

/// Counts a close the WebSocket layer started for a protocol violation (its Close frame is
/// already staged).
pub(super) fn count_protocol_close(metrics: &Metrics, code: u16) {
    metrics.close(code, "server");
}
