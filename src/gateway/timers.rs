//! Every deadline of a connection, on its one timer: the handshake, the keep-alive check
//! (ping, idle close, login deadline, overdue acks), the close handshake and the phases of an
//! HTTP exchange.

use log::debug;

use super::close::Why;
use super::conn::TimerKind;
use super::{ConnId, Gateway};
use crate::ws::State;

impl Gateway {
    /// Makes sure the connection's timer matches its state. A keep-alive timer is moved only
    /// when its deadline must come earlier (a delivery started the ack deadline); input that
    /// postpones the ping or the idle close leaves it, and it re-checks when it fires.
    pub(super) fn arm_timer(&mut self, key: ConnId) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(want) = TimerKind::wanted(&conn.transport) else {
            if let Some((id, _)) = conn.timer.take() {
                self.wheel.cancel(id);
            }
            return;
        };
        let now = self.now.mono_ms;
        let limits = &self.limits;
        let deadline = match want {
            TimerKind::Handshake | TimerKind::Exchange => now + limits.handshake_ms,
            TimerKind::KeepAlive => {
                let idle = conn.last_inbound + limits.idle_ms;
                let ping = conn.last_inbound.max(conn.last_ping) + limits.ping_ms;
                let mut at = idle.min(ping);
                if conn.transport.is_im() {
                    let core = &self.im.core;
                    if !core.is_logged_in(key) {
                        at = at.min(conn.opened_ms + limits.auth_ms);
                    } else if let Some(ack) = core.ack_deadline(key) {
                        at = at.min(ack);
                    }
                }
                at
            }
            TimerKind::Close => now + limits.close_ms,
        };
        let keep = matches!(conn.timer, Some((id, kind))
            if kind == want
                && (kind != TimerKind::KeepAlive
                    || self.wheel.deadline(id).is_some_and(|at| at <= deadline)));
        if keep {
            return;
        }
        if let Some((id, _)) = conn.timer.take() {
            self.wheel.cancel(id);
        }
        conn.timer = Some((self.wheel.insert(deadline, key), want));
    }

    /// The connection's timer fired.
    pub(super) fn on_timer(&mut self, key: ConnId) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some((_, kind)) = conn.timer.take() else {
            return;
        };
        if kind == TimerKind::Exchange {
            self.on_exchange_timer(key);
            self.arm_timer(key);
            return;
        }
        match conn.state() {
            State::Handshaking | State::AwaitingAccept => {
                debug!("conn {key}: handshake timeout");
                self.remove(key);
            }
            State::Open => {
                let now = self.now.mono_ms;
                let idle = now >= conn.last_inbound + self.limits.idle_ms;
                if idle && conn.throttled {
                    // Nothing was read from it all this time because it reads nothing.
                    self.close(key, Why::SlowConsumer);
                } else if idle {
                    self.close(key, Why::IdleTimeout);
                } else if now >= conn.last_inbound.max(conn.last_ping) + self.limits.ping_ms {
                    self.scratch.clear();
                    conn.last_ping = now;
                    if conn.transport.ping(&mut self.scratch) {
                        conn.outbox.push(&self.scratch, &mut self.pool);
                        self.mark_dirty(key);
                    }
                }
                if self.conns.get(key).is_some_and(|c| c.transport.is_im()) {
                    // The ping queued above leaves before whatever the IM core says now (a
                    // Close for overdue acks): output leaves in the order it was produced.
                    self.im_timer(key);
                }
                self.arm_timer(key);
            }
            State::CloseSent | State::Closed => {
                debug!("conn {key}: close timeout");
                self.remove(key);
            }
        }
    }
}
