//! The gateway driven without sockets: a simulated peer's bytes in, simulated time, and the
//! output collected from [`Gateway::write_to`] into memory (or refused, for a peer that does
//! not read). Each deadline and close rule of the shell is checked here.

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;

use super::*;
use crate::im::proto::{self, client_frame::Body as C, ClientFrame};
use crate::store::memory::MemoryStore;
use crate::store::{ReadError, StoreRead, StoredMessage};

const UPGRADE_ECHO: &[u8] = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";
const UPGRADE_IM: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

/// Where a simulated peer's output goes: kept, or refused (a peer that reads nothing), or
/// kept up to a budget of bytes and refused after it (a peer that reads that much).
#[derive(Default)]
struct Sink {
    bytes: Vec<u8>,
    stuck: bool,
    budget: Option<usize>,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(self.budget.unwrap_or(usize::MAX));
        if self.stuck || n == 0 && !buf.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        if let Some(b) = &mut self.budget {
            *b -= n;
        }
        self.bytes.extend_from_slice(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The store the gateway reads, shared with the harness, which applies each committed batch
/// to it as the storage thread would.
#[derive(Default)]
struct Shared(std::sync::Mutex<MemoryStore>);

impl Shared {
    fn get(&self) -> std::sync::MutexGuard<'_, MemoryStore> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StoreRead for Shared {
    fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
        self.get().max_seq(uid)
    }
    fn messages_after(
        &self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        self.get().messages_after(uid, after, limit)
    }
    fn cursor(&self, uid: &str, device_id: &str) -> u64 {
        self.get().cursor(uid, device_id)
    }
    fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
        self.get().cursors(uid)
    }
    fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        self.get().recent_sends(uid)
    }
    fn friends(&self, uid: &str) -> Vec<String> {
        self.get().friends(uid)
    }
    fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
        self.get().group_members(gid)
    }
    fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
        self.get().group_size(gid)
    }
    fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        self.get().is_member(gid, uid)
    }
    fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
        self.get().groups_of(uid)
    }
}

/// A gateway, the clock, its store, and one simulated peer per connection.
struct Harness {
    gw: Gateway,
    now: u64,
    peers: HashMap<ConnId, Sink>,
    actions: Vec<SocketAction>,
    cfg: ServerConfig,
    store: Arc<Shared>,
}

impl Harness {
    fn new(tweak: impl FnOnce(&mut ServerConfig)) -> Harness {
        let mut cfg = ServerConfig {
            echo: true,
            ..ServerConfig::default()
        };
        cfg.im.jwt_secret = b"secret".to_vec();
        tweak(&mut cfg);
        cfg.validate().expect("a valid configuration");
        let store = Arc::new(Shared::default());
        Harness {
            gw: Gateway::new(&cfg),
            now: 1_000,
            peers: HashMap::new(),
            actions: Vec::new(),
            cfg,
            store,
        }
    }

    fn at(&self) -> Now {
        Now {
            mono_ms: self.now,
            unix_ms: 1_700_000_000_000 + self.now as i64,
        }
    }

    fn accept(&mut self, kind: ListenerKind) -> ConnId {
        let now = self.at();
        match self.gw.handle_accept(kind, now) {
            Accept::Open(key) => {
                self.peers.insert(key, Sink::default());
                key
            }
            Accept::Refuse(_) => panic!("accept refused"),
        }
    }

    /// The peer sends `bytes` in one read; the turn ends with every output written.
    fn send(&mut self, key: ConnId, bytes: &[u8]) -> Input {
        self.gw.begin_turn(self.at());
        assert!(self.gw.claim_turn(key));
        let mut buf = bytes.to_vec();
        let now = self.at();
        assert!(self.gw.handle_received(key, buf.len(), now));
        let input = self.gw.handle_input(key, &mut buf, now);
        if let Some(peer) = self.peers.get_mut(&key) {
            self.gw.write_to(key, peer, &buf);
        }
        self.gw.end_input(key);
        self.pump();
        input
    }

    /// `ms` pass; due deadlines fire.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.gw.begin_turn(self.at());
        self.gw.handle_timeout(self.at());
        self.pump();
    }

    /// The storage thread's part: the turn's batch is applied to the store and reported
    /// durable.
    fn commit(&mut self) {
        if let Some((id, batch)) = self.gw.poll_batch() {
            let sents = self.store.get().apply(&batch);
            let now = self.at();
            self.gw
                .handle_committed(vec![(id, sents)], Duration::from_millis(1), now);
            self.pump();
        }
    }

    /// A `/ws` connection logged in as `uid`.
    fn logged_in(&mut self, uid: &str, device: &str) -> ConnId {
        let key = self.upgraded(UPGRADE_IM);
        let exp = (self.at().unix_ms / 1000) as u64 + 3600;
        let login = ClientFrame {
            id: 1,
            body: Some(C::Login(proto::Login {
                token: crate::im::auth::issue(b"secret", uid, exp),
                device_id: device.into(),
                last_seq: 0,
            })),
        };
        self.send(key, &client_frame(0x2, &login.encode_to_vec()));
        self.commit();
        let frames = self.frames(key);
        let ok = frames
            .iter()
            .filter_map(|(_, p)| proto::ServerFrame::decode(p.as_slice()).ok())
            .any(|f| matches!(f.body, Some(proto::server_frame::Body::LoginOk(_))));
        assert!(ok, "no LoginOk in {frames:?}");
        key
    }

    /// Writes every connection's output to its peer and collects the socket actions.
    /// Writes what is due, answers the reads the IM core put out (as the read thread would,
    /// at once), and handles the input held for connections they resumed, until none is
    /// left.
    fn pump(&mut self) {
        loop {
            while let Some(key) = self.gw.poll_transmit() {
                if let Some(peer) = self.peers.get_mut(&key) {
                    self.gw.write_to(key, peer, &[]);
                }
            }
            while let Some(a) = self.gw.poll_close() {
                self.actions.push(a);
            }
            let mut busy = false;
            while let Some((rid, req)) = self.gw.poll_read() {
                busy = true;
                let answer = req.run(&*self.store);
                let now = self.at();
                self.gw.handle_read(rid, answer, now);
            }
            // Only the connections a read resumed: a test takes up the others itself.
            while let Some(key) = busy.then(|| self.gw.poll_resume()).flatten() {
                if !self.gw.wants_input(key) {
                    continue;
                }
                let mut buf = vec![0; 1 << 20];
                let Some(n) = self.gw.take_held(key, &mut buf) else {
                    continue;
                };
                busy = true;
                buf.truncate(n);
                let now = self.at();
                self.gw.handle_input(key, &mut buf, now);
                if let Some(peer) = self.peers.get_mut(&key) {
                    self.gw.write_to(key, peer, &buf);
                }
                self.gw.end_input(key);
            }
            if !busy {
                return;
            }
        }
    }

    fn dropped(&self, key: ConnId) -> bool {
        self.actions.contains(&SocketAction::Drop(key))
    }

    /// An upgraded connection to `request`'s path, its 101 taken from the peer's bytes.
    fn upgraded(&mut self, request: &[u8]) -> ConnId {
        let key = self.accept(ListenerKind::Public);
        self.send(key, request);
        let out = self.take(key);
        assert!(
            out.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        key
    }

    /// What the peer received since the last call.
    fn take(&mut self, key: ConnId) -> Vec<u8> {
        std::mem::take(&mut self.peers.get_mut(&key).expect("peer").bytes)
    }

    /// The frames the peer received since the last call: (opcode, payload).
    fn frames(&mut self, key: ConnId) -> Vec<(u8, Vec<u8>)> {
        parse_frames(&self.take(key))
    }

    /// `imgate_closes_total{code, by}`.
    fn closes(&self, code: u16, by: &str) -> u64 {
        let text = self.gw.metrics.render(&[]);
        let labels = [format!("code=\"{code}\""), format!("by=\"{by}\"")];
        text.lines()
            .filter(|l| l.starts_with("imgate_closes_total{"))
            .filter(|l| labels.iter().all(|x| l.contains(x.as_str())))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    fn ms(&self, d: Duration) -> u64 {
        millis(d)
    }
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n < 65_536 => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [1, 2, 3, 4];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// Unmasked server frames, whole ones only.
fn parse_frames(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut frames = Vec::new();
    while b.len() >= 2 {
        let (len, head) = match b[1] & 0x7f {
            126 => (u16::from_be_bytes([b[2], b[3]]) as usize, 4),
            127 => (
                u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                10,
            ),
            n => (n as usize, 2),
        };
        if b.len() < head + len {
            break;
        }
        frames.push((b[0] & 0x0f, b[head..head + len].to_vec()));
        b = &b[head + len..];
    }
    frames
}

/// The code and reason of a Close frame's payload.
fn close_of(payload: &[u8]) -> (u16, String) {
    (
        u16::from_be_bytes([payload[0], payload[1]]),
        String::from_utf8_lossy(&payload[2..]).into_owned(),
    )
}

#[test]
fn a_silent_connection_is_dropped_at_the_handshake_deadline() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::Public);
    let deadline = h.ms(h.cfg.handshake_timeout);
    h.advance(deadline - 1);
    assert!(!h.dropped(key), "dropped before the deadline");
    h.advance(1);
    assert!(h.dropped(key), "not dropped at the deadline");
}

#[test]
fn no_login_in_time_closes_with_1008_counted_from_the_accept() {
    let mut h = Harness::new(|c| c.im.auth_timeout = Duration::from_secs(3));
    let key = h.accept(ListenerKind::Public);
    h.advance(1_000);
    h.send(key, UPGRADE_IM);
    assert!(h.take(key).starts_with(b"HTTP/1.1 101"));
    h.advance(1_999);
    assert!(h.frames(key).is_empty(), "closed before the login deadline");
    h.advance(1);
    let frames = h.frames(key);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(frames[0].0, 0x8);
    assert_eq!(close_of(&frames[0].1), (1008, "login timeout".into()));
    assert_eq!(h.closes(1008, "server"), 1);
}

#[test]
fn an_open_connection_is_pinged_then_closed_when_idle() {
    let mut h = Harness::new(|c| {
        c.ping_interval = Duration::from_secs(1);
        c.idle_timeout = Duration::from_millis(2_500);
    });
    let key = h.upgraded(UPGRADE_ECHO);
    h.advance(999);
    assert!(h.frames(key).is_empty(), "pinged early");
    h.advance(1);
    assert_eq!(h.frames(key), vec![(0x9, Vec::new())]);
    h.advance(1_000);
    assert_eq!(h.frames(key), vec![(0x9, Vec::new())]);
    h.advance(499);
    assert!(h.frames(key).is_empty(), "closed before the idle deadline");
    h.advance(1);
    let frames = h.frames(key);
    assert_eq!(frames.len(), 1);
    assert_eq!(close_of(&frames[0].1), (1001, "idle timeout".into()));
    assert_eq!(h.closes(1001, "server"), 1);
}

#[test]
fn input_postpones_the_ping_and_the_idle_close() {
    let mut h = Harness::new(|c| {
        c.ping_interval = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(2);
    });
    let key = h.upgraded(UPGRADE_ECHO);
    h.advance(900);
    h.send(key, &client_frame(0x1, b"hi"));
    assert_eq!(h.frames(key), vec![(0x1, b"hi".to_vec())]);
    h.advance(999);
    assert!(h.frames(key).is_empty(), "pinged though input arrived");
    h.advance(1);
    assert_eq!(h.frames(key), vec![(0x9, Vec::new())]);
}

#[test]
fn a_peer_that_never_answers_our_close_is_dropped_at_the_close_deadline() {
    let mut h = Harness::new(|c| {
        c.idle_timeout = Duration::from_secs(1);
        c.close_timeout = Duration::from_secs(2);
    });
    let key = h.upgraded(UPGRADE_ECHO);
    h.advance(1_000);
    assert_eq!(h.frames(key).len(), 1, "the idle close");
    h.advance(1_999);
    assert!(!h.dropped(key), "dropped before the close deadline");
    h.advance(1);
    assert!(h.dropped(key));
}

#[test]
fn the_peers_close_is_answered_and_counted() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    let mut payload = 1000u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    h.send(key, &client_frame(0x8, &payload));
    let frames = h.frames(key);
    assert_eq!(frames.len(), 1);
    assert_eq!(close_of(&frames[0].1).0, 1000);
    assert!(h.actions.contains(&SocketAction::ShutdownWrite(key)));
    assert_eq!(h.closes(1000, "peer"), 1);
    h.gw.handle_eof(key);
    h.gw.end_input(key);
    h.pump();
    assert!(h.dropped(key), "not dropped after the peer's FIN");
}

#[test]
fn a_protocol_violation_closes_with_its_code_and_counts_it() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    // An unmasked client frame: 1002.
    h.send(key, &[0x81, 0x01, b'x']);
    let frames = h.frames(key);
    assert_eq!(close_of(&frames[0].1).0, 1002);
    assert_eq!(h.closes(1002, "server"), 1);
}

#[test]
fn a_throttled_connection_that_reads_nothing_is_closed_as_a_slow_consumer() {
    let mut h = Harness::new(|c| {
        c.outbound_high_water = 64 * 1024;
        c.idle_timeout = Duration::from_secs(5);
        c.ping_interval = Duration::from_secs(60);
    });
    let key = h.upgraded(UPGRADE_ECHO);
    h.peers.get_mut(&key).unwrap().stuck = true;
    let message = client_frame(0x2, &[7; 8 * 1024]);
    let input: Vec<u8> = (0..16).flat_map(|_| message.clone()).collect();
    assert_eq!(
        h.send(key, &input),
        Input::Full,
        "no stop at the high-water mark"
    );
    assert!(
        !h.gw.wants_input(key),
        "still reading a connection over its high-water mark"
    );
    h.advance(4_999);
    assert_eq!(h.gw.metrics.slow_consumer_kills.get(), 0);
    h.advance(1);
    assert_eq!(h.gw.metrics.slow_consumer_kills.get(), 1);
    assert_eq!(h.closes(1008, "server"), 1);
    // Once it reads, the Close comes after what it had not read.
    h.peers.get_mut(&key).unwrap().stuck = false;
    h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &[]);
    let frames = h.frames(key);
    let last = frames.last().expect("frames");
    assert_eq!(last.0, 0x8);
    assert_eq!(close_of(&last.1), (1008, "slow consumer".into()));
}

#[test]
fn output_past_the_outbound_limit_closes_with_1008() {
    let mut h = Harness::new(|c| {
        c.max_outbound_bytes = 128 * 1024;
        c.outbound_high_water = 128 * 1024;
        c.im.core.delivery_window = 4;
    });
    let key = h.upgraded(UPGRADE_ECHO);
    h.peers.get_mut(&key).unwrap().stuck = true;
    // One read of 150 KiB of echoes: the third takes the output over the limit.
    let message = client_frame(0x2, &[7; 50 * 1024]);
    let input: Vec<u8> = (0..3).flat_map(|_| message.clone()).collect();
    h.send(key, &input);
    assert_eq!(h.gw.metrics.slow_consumer_kills.get(), 1);
}

#[test]
fn shutdown_closes_open_connections_with_1001_and_ends_at_its_deadline() {
    let mut h = Harness::new(|c| c.shutdown_timeout = Duration::from_secs(2));
    let key = h.upgraded(UPGRADE_ECHO);
    let now = h.at();
    h.gw.handle_shutdown(now);
    h.pump();
    let frames = h.frames(key);
    assert_eq!(
        close_of(&frames[0].1),
        (1001, "server shutting down".into())
    );
    assert_eq!(h.gw.is_finished(h.now), None);
    assert_eq!(h.gw.is_finished(h.now + 2_000), Some(1));
    // New raw TCP connections are refused while shutting down.
    assert_eq!(
        h.gw.handle_accept(ListenerKind::RawTcp, now),
        Accept::Refuse(Vec::new())
    );
}

#[test]
fn a_connection_still_handshaking_is_dropped_at_shutdown() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::Public);
    let now = h.at();
    h.gw.handle_shutdown(now);
    h.pump();
    assert!(h.dropped(key));
    assert_eq!(h.gw.is_finished(h.now), Some(0));
}

#[test]
fn an_incomplete_admin_request_gets_408_at_the_deadline() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::Admin);
    h.send(key, b"GET /metrics HTTP/1.1\r\nHost: x\r\n");
    let deadline = h.ms(h.cfg.handshake_timeout);
    h.advance(deadline - 1);
    assert!(h.take(key).is_empty());
    h.advance(1);
    assert!(h.take(key).starts_with(b"HTTP/1.1 408"));
    assert!(h.dropped(key), "the exchange goes on after its answer");
}

#[test]
fn an_admin_answer_the_peer_does_not_take_is_dropped_at_the_deadline() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::Admin);
    h.peers.get_mut(&key).unwrap().stuck = true;
    h.send(key, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(!h.dropped(key));
    let deadline = h.ms(h.cfg.handshake_timeout);
    h.advance(deadline);
    assert!(h.dropped(key));
}

#[test]
fn admin_connections_past_the_limit_get_503() {
    let mut h = Harness::new(|c| c.im.max_admin_connections = 1);
    let first = h.accept(ListenerKind::Admin);
    let now = h.at();
    let Accept::Refuse(answer) = h.gw.handle_accept(ListenerKind::Admin, now) else {
        panic!("a second admin connection was taken");
    };
    assert!(answer.starts_with(b"HTTP/1.1 503"));
    // Once the first exchange ends, there is room again.
    h.send(first, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(h.take(first).starts_with(b"HTTP/1.1 200"));
    assert!(h.dropped(first));
    assert!(matches!(
        h.gw.handle_accept(ListenerKind::Admin, now),
        Accept::Open(_)
    ));
}

#[test]
fn a_friendship_is_answered_once_its_batch_is_durable() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::Admin);
    h.send(
        key,
        b"PUT /v1/friendships/alice/bob HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(h.take(key).is_empty(), "answered before the commit");
    let (id, batch) = h.gw.poll_batch().expect("a batch");
    let sents = h.store.get().apply(&batch);
    let now = h.at();
    h.gw.handle_committed(vec![(id, sents)], Duration::from_millis(1), now);
    h.pump();
    assert!(h.take(key).starts_with(b"HTTP/1.1 204"));
}

#[test]
fn raw_tcp_past_max_connections_is_refused_and_counted_until_closed() {
    let mut h = Harness::new(|c| c.max_connections = 1);
    let key = h.accept(ListenerKind::RawTcp);
    let now = h.at();
    assert_eq!(
        h.gw.handle_accept(ListenerKind::RawTcp, now),
        Accept::Refuse(Vec::new())
    );
    h.gw.handle_closed(key);
    assert!(matches!(
        h.gw.handle_accept(ListenerKind::RawTcp, now),
        Accept::Open(_)
    ));
}

#[test]
fn out_of_descriptors_every_listener_sheds_with_its_own_answer() {
    let h = Harness::new(|_| {});
    assert!(h
        .gw
        .shed_answer(ListenerKind::Public)
        .starts_with(b"HTTP/1.1 503"));
    assert!(h
        .gw
        .shed_answer(ListenerKind::Admin)
        .starts_with(b"HTTP/1.1 503"));
    assert!(h.gw.shed_answer(ListenerKind::RawTcp).is_empty());
}

#[test]
fn each_connection_gets_one_share_of_frames_per_turn() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    let input: Vec<u8> = (0..FRAMES_PER_TURN + 10)
        .flat_map(|_| client_frame(0x1, b"x"))
        .collect();
    assert_eq!(h.send(key, &input), Input::Later);
    assert_eq!(h.frames(key).len(), FRAMES_PER_TURN);
    assert_eq!(h.gw.poll_resume(), Some(key));
    // Next turn: the held rest.
    h.gw.begin_turn(h.at());
    assert!(h.gw.claim_turn(key));
    let mut buf = vec![0; 64 * 1024];
    let n = h.gw.take_held(key, &mut buf).expect("held input");
    let now = h.at();
    assert_eq!(h.gw.handle_input(key, &mut buf[..n], now), Input::Taken);
    h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &buf);
    assert_eq!(h.frames(key).len(), 10);
}

#[test]
fn a_device_that_does_not_ack_its_deliveries_is_closed_at_the_ack_deadline() {
    let mut h = Harness::new(|c| {
        c.im.core.ack_timeout_ms = 3_000;
        c.ping_interval = Duration::from_secs(1);
        c.idle_timeout = Duration::from_secs(60);
    });
    let bob = h.logged_in("bob", "phone");
    let admin = h.accept(ListenerKind::Admin);
    let body = r#"{"from_uid":"alice","to_uid":"bob","client_msg_id":"m1","text":"hi"}"#;
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    h.send(admin, request.as_bytes());
    h.commit();
    assert!(h.take(admin).starts_with(b"HTTP/1.1 200"));
    let delivered = h.frames(bob);
    assert_eq!(delivered.len(), 1, "{delivered:?}");
    // Pings keep it alive; input (a Pong) does not count as an ack.
    h.advance(1_000);
    h.send(bob, &client_frame(0xA, b""));
    h.advance(1_999);
    assert!(
        h.frames(bob).iter().all(|(op, _)| *op != 0x8),
        "closed before the ack deadline"
    );
    h.advance(1);
    let frames = h.frames(bob);
    let close = frames.iter().find(|(op, _)| *op == 0x8).expect("a Close");
    assert_eq!(close_of(&close.1), (1008, "ack timeout".into()));
    assert_eq!(h.closes(1008, "server"), 1);
}

/// An admin request's bytes: `method path` with `body`.
fn admin_request(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The payloads of whole raw TCP frames (a 4-byte big-endian length, then the payload).
fn tcp_frames(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while b.len() >= 4 {
        let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if b.len() < 4 + len {
            break;
        }
        frames.push(b[4..4 + len].to_vec());
        b = &b[4 + len..];
    }
    frames
}

#[test]
fn the_websocket_endpoints_are_echo_when_enabled_and_ws() {
    let h = Harness::new(|_| {});
    assert_eq!(h.gw.endpoint_paths(), vec!["/echo", "/ws"]);
    let h = Harness::new(|c| c.echo = false);
    assert_eq!(h.gw.endpoint_paths(), vec!["/ws"]);
}

#[test]
fn a_raw_tcp_connection_is_an_im_session_from_its_accept() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::RawTcp);
    let exp = (h.at().unix_ms / 1000) as u64 + 3600;
    let login = ClientFrame {
        id: 1,
        body: Some(C::Login(proto::Login {
            token: crate::im::auth::issue(b"secret", "carol", exp),
            device_id: "laptop".into(),
            last_seq: 0,
        })),
    };
    let mut bytes = Vec::new();
    crate::im::tcp_framing::LengthPrefixed::encode(&login.encode_to_vec(), &mut bytes);
    h.send(key, &bytes);
    h.commit();
    let frames = tcp_frames(&h.take(key));
    let ok = frames
        .iter()
        .filter_map(|p| proto::ServerFrame::decode(p.as_slice()).ok())
        .any(|f| matches!(f.body, Some(proto::server_frame::Body::LoginOk(_))));
    assert!(ok, "no LoginOk over raw TCP in {frames:?}");
}

#[test]
fn a_throttled_connection_resumes_once_its_output_is_down_to_half_the_high_water_mark() {
    let mut h = Harness::new(|c| {
        c.outbound_high_water = 64 * 1024;
        c.idle_timeout = Duration::from_secs(60);
        c.ping_interval = Duration::from_secs(60);
    });
    let key = h.upgraded(UPGRADE_ECHO);
    assert!(h.gw.wants_input(key), "a fresh connection is not read");
    assert_eq!(h.gw.poll_resume(), None, "nothing to resume yet");
    h.peers.get_mut(&key).unwrap().stuck = true;
    // Echoes of 8,196 bytes each: the eighth takes the output to 65,568 bytes, over the mark.
    let message = client_frame(0x2, &[7; 8 * 1024]);
    let input: Vec<u8> = (0..16).flat_map(|_| message.clone()).collect();
    assert_eq!(h.send(key, &input), Input::Full);
    assert!(!h.gw.wants_input(key));
    // The peer reads all but 32,769 bytes: one over half the mark, still throttled.
    let peer = h.peers.get_mut(&key).unwrap();
    peer.stuck = false;
    peer.budget = Some(8 * 8196 - 32 * 1024 - 1);
    h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &[]);
    assert!(
        !h.gw.wants_input(key),
        "resumed above half the high-water mark"
    );
    assert_eq!(h.gw.poll_resume(), None);
    // One byte more: exactly half is left, and input goes on.
    h.peers.get_mut(&key).unwrap().budget = Some(1);
    h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &[]);
    assert!(
        h.gw.wants_input(key),
        "still throttled at half the high-water mark"
    );
    assert_eq!(h.gw.poll_resume(), Some(key));
    assert_eq!(h.gw.poll_resume(), None);
}

#[test]
fn output_of_exactly_the_outbound_limit_is_kept_and_one_byte_more_closes() {
    for (extra, kills) in [(0, 0), (1, 1)] {
        let mut h = Harness::new(|c| {
            c.max_outbound_bytes = 128 * 1024;
            c.outbound_high_water = 128 * 1024;
            c.im.core.delivery_window = 4;
            c.im.core.max_content_bytes = 4 * 1024;
        });
        let key = h.upgraded(UPGRADE_ECHO);
        h.peers.get_mut(&key).unwrap().stuck = true;
        // Two echoes of 65,536 bytes each (a 4-byte header), the second `extra` bytes longer.
        let mut input = client_frame(0x2, &[7; 65_532]);
        input.extend(client_frame(0x2, &vec![7; 65_532 + extra]));
        h.send(key, &input);
        assert_eq!(
            h.gw.metrics.slow_consumer_kills.get(),
            kills,
            "{} bytes unsent",
            128 * 1024 + extra
        );
    }
}

#[test]
fn a_peers_fin_drops_an_open_connection_at_once() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    h.peers.get_mut(&key).unwrap().stuck = true;
    h.send(key, &client_frame(0x1, b"hi"));
    h.gw.handle_eof(key);
    h.pump();
    assert!(
        h.dropped(key),
        "kept after the peer's FIN for output nobody reads"
    );
}

#[test]
fn after_the_peers_fin_the_answer_to_its_close_still_goes_out() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    h.peers.get_mut(&key).unwrap().stuck = true;
    h.send(key, &client_frame(0x8, &1000u16.to_be_bytes()));
    h.gw.handle_eof(key);
    h.pump();
    assert!(
        !h.dropped(key),
        "dropped before the answer to its Close left"
    );
    h.peers.get_mut(&key).unwrap().stuck = false;
    h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &[]);
    h.pump();
    let frames = h.frames(key);
    assert_eq!(frames.len(), 1);
    assert_eq!(close_of(&frames[0].1).0, 1000);
    let shut = h
        .actions
        .iter()
        .position(|a| *a == SocketAction::ShutdownWrite(key));
    let drop = h.actions.iter().position(|a| *a == SocketAction::Drop(key));
    assert!(shut.is_some() && shut < drop, "{:?}", h.actions);
}

#[test]
fn a_closed_connection_may_send_64_kib_more_and_is_dropped_past_it() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    let now = h.at();
    // An open connection's bytes are not counted.
    assert!(h.gw.handle_received(key, 200 * 1024, now));
    // Nor are they while the answer to its Close is unsent.
    h.peers.get_mut(&key).unwrap().stuck = true;
    h.send(key, &client_frame(0x8, &1000u16.to_be_bytes()));
    assert!(h.gw.handle_received(key, 200 * 1024, now));
    h.peers.get_mut(&key).unwrap().stuck = false;
    h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &[]);
    h.pump();
    assert!(h.actions.contains(&SocketAction::ShutdownWrite(key)));
    // Shut down: 64 KiB more are thrown away, the byte after them ends it.
    assert!(h.gw.handle_received(key, 64 * 1024 - 1, now));
    assert!(h.gw.handle_received(key, 1, now), "dropped at 64 KiB");
    h.pump();
    assert!(!h.dropped(key));
    assert!(!h.gw.handle_received(key, 1, now), "kept past 64 KiB");
    h.pump();
    assert!(h.dropped(key));
}

#[test]
fn the_next_deadline_is_the_earliest_timer_or_the_shutdown_deadline() {
    let mut h = Harness::new(|c| {
        c.handshake_timeout = Duration::from_secs(3);
        c.shutdown_timeout = Duration::from_secs(2);
    });
    assert_eq!(h.gw.poll_timeout(), None, "a deadline without connections");
    h.accept(ListenerKind::Public);
    // The wheel may wake the loop early (at a slot's start), never late nor in the past.
    let at = h.gw.poll_timeout().expect("the handshake deadline");
    assert!(
        h.now < at && at <= h.now + 3_000,
        "woken at {at} for a deadline at {}",
        h.now + 3_000
    );
    let now = h.at();
    h.gw.handle_shutdown(now);
    h.pump();
    // The handshaking connection is dropped: only the shutdown deadline is left.
    assert_eq!(h.gw.poll_timeout(), Some(h.now + 2_000));
}

#[test]
fn a_large_echo_refers_to_the_input_buffer_until_it_is_written() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    let now = h.at();
    for (len, refers) in [(10, false), (2 * 1024, true)] {
        assert!(!h.gw.output_refers_to_input());
        h.gw.begin_turn(now);
        assert!(h.gw.claim_turn(key));
        let mut buf = client_frame(0x2, &vec![7; len]);
        assert_eq!(h.gw.handle_input(key, &mut buf, now), Input::Taken);
        assert_eq!(h.gw.output_refers_to_input(), refers, "a {len}-byte echo");
        h.gw.write_to(key, h.peers.get_mut(&key).unwrap(), &buf);
        assert!(
            !h.gw.output_refers_to_input(),
            "still referring after the write"
        );
        h.gw.end_input(key);
        assert_eq!(h.frames(key), vec![(0x2, vec![7; len])]);
    }
}

#[test]
fn a_socket_error_drops_that_connection_without_a_drop_action_and_keeps_the_others() {
    let mut h = Harness::new(|_| {});
    let a = h.accept(ListenerKind::Public);
    let b = h.accept(ListenerKind::Public);
    // The peer of `a` leaves before its handshake: its Drop is decided, not yet polled.
    h.gw.handle_eof(a);
    h.gw.write_to(a, h.peers.get_mut(&a).unwrap(), &[]);
    h.gw.handle_closed(b);
    assert_eq!(h.gw.poll_close(), Some(SocketAction::Drop(a)));
    assert_eq!(h.gw.poll_close(), None);
}

#[test]
fn websocket_control_answers_leave_before_the_im_replies_to_later_frames() {
    let mut h = Harness::new(|_| {});
    let bob = h.logged_in("bob", "phone");
    // A Ping and an empty IM frame in one read, handled in the reactor's order: input, the
    // end of the input, one write.
    let empty = ClientFrame { id: 5, body: None };
    let mut buf = client_frame(0x9, b"p");
    buf.extend(client_frame(0x2, &empty.encode_to_vec()));
    let now = h.at();
    h.gw.begin_turn(now);
    assert!(h.gw.claim_turn(bob));
    assert!(h.gw.handle_received(bob, buf.len(), now));
    assert_eq!(h.gw.handle_input(bob, &mut buf, now), Input::Taken);
    h.gw.end_input(bob);
    h.gw.write_to(bob, h.peers.get_mut(&bob).unwrap(), &buf);
    let frames = h.frames(bob);
    let ops: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
    assert_eq!(ops, vec![0xA, 0x2], "{frames:?}");
}

#[test]
fn deliveries_get_the_room_of_the_high_water_mark_less_what_is_unsent() {
    let mut h = Harness::new(|c| {
        c.outbound_high_water = 16 * 1024;
        c.im.core.output_room = 16 * 1024;
    });
    let bob = h.logged_in("bob", "phone");
    h.peers.get_mut(&bob).unwrap().stuck = true;
    let post = |h: &mut Harness, id: usize, text: &str| {
        let admin = h.accept(ListenerKind::Admin);
        let body = format!(
            r#"{{"from_uid":"alice","to_uid":"bob","client_msg_id":"m{id}","text":"{text}"}}"#
        );
        h.send(admin, &admin_request("POST", "/v1/messages", &body));
    };
    // A 12 KiB message stays unsent: about 4 KiB of room is left.
    post(&mut h, 0, &"x".repeat(12 * 1024));
    h.commit();
    assert_eq!(h.gw.metrics.messages_out.get(), 1);
    // Ten of 1,000 bytes (each costing about 1.6 KiB of room): only some fit.
    for id in 1..=10 {
        post(&mut h, id, &"y".repeat(1000));
    }
    h.commit();
    let sent = h.gw.metrics.messages_out.get();
    assert!(
        (2..=5).contains(&sent),
        "{sent} deliveries with about 4 KiB of room"
    );
    // Once the peer reads, the rest follows.
    h.peers.get_mut(&bob).unwrap().stuck = false;
    h.gw.write_to(bob, h.peers.get_mut(&bob).unwrap(), &[]);
    h.pump();
    assert_eq!(h.gw.metrics.messages_out.get(), 11);
}

#[test]
fn after_the_input_ends_poll_transmit_names_the_connection_with_its_pong() {
    let mut h = Harness::new(|_| {});
    let bob = h.logged_in("bob", "phone");
    // A Ping alone: its Pong is the only output, and the core has nothing to add.
    let mut buf = client_frame(0x9, b"p");
    let now = h.at();
    h.gw.begin_turn(now);
    assert!(h.gw.claim_turn(bob));
    assert!(h.gw.handle_received(bob, buf.len(), now));
    assert_eq!(h.gw.handle_input(bob, &mut buf, now), Input::Taken);
    h.gw.end_input(bob);
    assert_eq!(h.gw.poll_transmit(), Some(bob), "the Pong is not listed");
    h.gw.write_to(bob, h.peers.get_mut(&bob).unwrap(), &buf);
    assert_eq!(h.frames(bob), vec![(0xA, b"p".to_vec())]);
}

#[test]
fn output_staged_for_a_connection_that_failed_is_not_sent_to_the_next_one_under_its_name() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    let now = h.at();
    h.gw.begin_turn(now);
    assert!(h.gw.claim_turn(key));
    let mut buf = client_frame(0x1, b"lost");
    assert_eq!(h.gw.handle_input(key, &mut buf, now), Input::Taken);
    // The socket fails before the echo is written.
    h.gw.handle_closed(key);
    h.peers.remove(&key);
    let next = h.accept(ListenerKind::Public);
    assert_eq!(next, key, "the slab reuses the name");
    h.send(next, UPGRADE_ECHO);
    let out = h.take(next);
    assert!(
        out.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn a_web_demo_request_handed_over_to_the_core_is_not_counted_as_a_stream_at_shutdown() {
    let mut h = Harness::new(|c| {
        c.im.dev_routes = true;
        c.shutdown_timeout = Duration::from_secs(2);
    });
    let echo = h.upgraded(UPGRADE_ECHO);
    h.peers.get_mut(&echo).unwrap().stuck = true;
    let get = h.accept(ListenerKind::Public);
    h.send(
        get,
        b"GET /dev/friends?uid=alice HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert!(h.take(get).starts_with(b"HTTP/1.1 200"));
    assert!(h.dropped(get));
    let now = h.at();
    h.gw.handle_shutdown(now);
    h.pump();
    // The echo connection never answers the 1001: it is the one straggler.
    assert_eq!(h.gw.is_finished(h.now), None);
    assert_eq!(h.gw.is_finished(h.now + 2_000), Some(1));
}

#[test]
fn metrics_count_connections_by_state_and_transport() {
    let mut h = Harness::new(|_| {});
    h.accept(ListenerKind::Public);
    h.upgraded(UPGRADE_ECHO);
    h.upgraded(UPGRADE_ECHO);
    h.accept(ListenerKind::RawTcp);
    let closing = h.upgraded(UPGRADE_ECHO);
    h.peers.get_mut(&closing).unwrap().stuck = true;
    h.send(closing, &[0x81, 0x01, b'x']);
    let admin = h.accept(ListenerKind::Admin);
    h.send(admin, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = String::from_utf8(h.take(admin)).expect("text");
    let count = |state: &str, transport: &str| -> Option<i64> {
        let labels = [
            format!("state=\"{state}\""),
            format!("transport=\"{transport}\""),
        ];
        text.lines()
            .filter(|l| l.starts_with("imgate_connections{"))
            .find(|l| labels.iter().all(|x| l.contains(x.as_str())))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert_eq!(count("handshaking", "ws"), Some(1), "{text}");
    assert_eq!(count("open", "ws"), Some(2), "{text}");
    assert_eq!(count("open", "tcp"), Some(1), "{text}");
    assert_eq!(count("closing", "ws"), Some(1), "{text}");
    let lines = text
        .lines()
        .filter(|l| l.starts_with("imgate_connections{"))
        .count();
    assert_eq!(lines, 4, "{text}");
}

#[test]
fn a_timeout_too_long_for_milliseconds_never_fires() {
    let mut h = Harness::new(|c| {
        c.idle_timeout = Duration::MAX;
        c.ping_interval = Duration::from_secs(1);
    });
    let key = h.upgraded(UPGRADE_ECHO);
    for _ in 0..10 {
        h.advance(1_000);
    }
    let frames = h.frames(key);
    assert_eq!(frames.len(), 10, "{frames:?}");
    assert!(frames.iter().all(|(op, _)| *op == 0x9), "{frames:?}");
}

/// The timer wheel holds about 2.2 years; a connection's deadlines past that are clamped to
/// its reach, which must never be the slot the wheel is in (it would take the timer as due
/// and re-file it there for ever, inside `handle_timeout`).
#[test]
fn keep_alive_deadlines_past_the_timer_wheels_reach_wait_instead_of_firing() {
    let three_years = Duration::from_secs(3 * 365 * 24 * 3600);
    let mut h = Harness::new(|c| {
        c.idle_timeout = three_years;
        c.ping_interval = three_years;
    });
    h.advance(1_000);
    let key = h.upgraded(UPGRADE_ECHO);
    for _ in 0..10 {
        h.advance(1_000);
    }
    assert_eq!(h.frames(key), Vec::new(), "no ping, no close");
    let next =
        h.gw.poll_timeout()
            .expect("the clamped keep-alive deadline");
    assert!(
        next > h.now + 365 * 24 * 3600 * 1000,
        "next deadline {next}, now {}",
        h.now
    );
}

#[test]
fn admin_answers_carry_the_reason_of_their_status() {
    for (status, reason) in [
        (200, "OK"),
        (204, "No Content"),
        (400, "Bad Request"),
        (401, "Unauthorized"),
        (404, "Not Found"),
        (405, "Method Not Allowed"),
        (408, "Request Timeout"),
        (409, "Conflict"),
        (413, "Content Too Large"),
        (431, "Request Header Fields Too Large"),
        (501, "Not Implemented"),
        (503, "Service Unavailable"),
        (500, "Internal Server Error"),
    ] {
        let bytes = Response::error(status, "why").to_bytes();
        let text = String::from_utf8(bytes).expect("text");
        assert!(
            text.starts_with(&format!("HTTP/1.1 {status} {reason}\r\n")),
            "{text}"
        );
        assert_eq!(
            text.contains("WWW-Authenticate: Bearer\r\n"),
            status == 401,
            "{text}"
        );
        assert_eq!(text.contains("Content-Length:"), status != 204, "{text}");
    }
}

#[test]
fn an_admin_request_may_be_128_kib_head_and_body_and_no_more() {
    for (extra, too_large) in [(0, false), (1, true)] {
        let mut h = Harness::new(|_| {});
        let key = h.accept(ListenerKind::Admin);
        // The head's length does not depend on the digits: both lengths have six.
        let head = |n: usize| {
            format!("POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n")
        };
        let n = 128 * 1024 - head(100_000).len() + extra;
        h.send(key, head(n).as_bytes());
        let answer = h.take(key);
        assert_eq!(
            answer.starts_with(b"HTTP/1.1 413"),
            too_large,
            "{n} bytes of body: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[test]
fn an_admin_head_unfinished_past_128_kib_gets_431() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::Admin);
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    head.resize(128 * 1024, b'a');
    h.send(key, &head);
    assert!(h.take(key).is_empty(), "answered at 128 KiB");
    h.send(key, b"a");
    let answer = h.take(key);
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn only_the_admin_token_itself_is_let_in() {
    // Wrong tokens of the right length: one byte off, and two bytes off by the same bit.
    for (token, status) in [
        ("s3cret", "200"),
        ("s3crex", "401"),
        ("r2cret", "401"),
        ("s3cre", "401"),
    ] {
        let mut h = Harness::new(|c| c.im.admin_token = Some("s3cret".into()));
        let key = h.accept(ListenerKind::Admin);
        let request =
            format!("GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
        h.send(key, request.as_bytes());
        let answer = h.take(key);
        assert!(
            answer.starts_with(format!("HTTP/1.1 {status}").as_bytes()),
            "{token}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[test]
fn admin_ids_are_1_to_64_bytes() {
    for (uid, status) in [
        ("u".repeat(64), "200"),
        ("u".repeat(65), "400"),
        (String::new(), "400"),
    ] {
        let mut h = Harness::new(|_| {});
        let key = h.accept(ListenerKind::Admin);
        let request = format!("GET /v1/users/{uid} HTTP/1.1\r\nHost: x\r\n\r\n");
        h.send(key, request.as_bytes());
        let answer = h.take(key);
        assert!(
            answer.starts_with(format!("HTTP/1.1 {status}").as_bytes()),
            "{} bytes: {}",
            uid.len(),
            String::from_utf8_lossy(&answer)
        );
    }
}

#[test]
fn a_friendship_needs_two_valid_and_different_uids() {
    let long = "u".repeat(65);
    for path in [
        format!("alice/{long}"),
        format!("{long}/bob"),
        "alice/alice".to_owned(),
    ] {
        let mut h = Harness::new(|_| {});
        let key = h.accept(ListenerKind::Admin);
        let request = format!("PUT /v1/friendships/{path} HTTP/1.1\r\nHost: x\r\n\r\n");
        h.send(key, request.as_bytes());
        let answer = h.take(key);
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{path}: {}",
            String::from_utf8_lossy(&answer)
        );
        assert!(h.gw.poll_batch().is_none(), "{path}: a change was made");
    }
}

#[test]
fn a_users_friends_are_listed_with_whether_they_are_online() {
    let mut h = Harness::new(|_| {});
    for friend in ["bob", "carol"] {
        let admin = h.accept(ListenerKind::Admin);
        let request = format!("PUT /v1/friendships/alice/{friend} HTTP/1.1\r\nHost: x\r\n\r\n");
        h.send(admin, request.as_bytes());
        h.commit();
        assert!(h.take(admin).starts_with(b"HTTP/1.1 204"));
    }
    h.logged_in("bob", "phone");
    let admin = h.accept(ListenerKind::Admin);
    h.send(
        admin,
        b"GET /v1/users/alice/friends HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let answer = String::from_utf8(h.take(admin)).expect("text");
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
    let online = |uid: &str| {
        json["friends"]
            .as_array()
            .expect("friends")
            .iter()
            .find(|f| f["uid"] == uid)
            .map(|f| f["online"].clone())
    };
    assert_eq!(online("bob"), Some(serde_json::Value::Bool(true)), "{body}");
    assert_eq!(
        online("carol"),
        Some(serde_json::Value::Bool(false)),
        "{body}"
    );
}

const UPGRADE_JSON: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: imgate.v1.json\r\n\r\n";

/// A client `SendMessage` to `to_uid`, as a masked binary frame.
fn send_frame(id: u64, to_uid: &str, client_msg_id: &str, content: &[u8]) -> Vec<u8> {
    let send = ClientFrame {
        id,
        body: Some(C::Send(proto::SendMessage {
            to_uid: to_uid.into(),
            client_msg_id: client_msg_id.into(),
            content: content.to_vec(),
            group_id: String::new(),
        })),
    };
    client_frame(0x2, &send.encode_to_vec())
}

/// The protobuf server frames among `frames` (binary messages).
fn server_frames(frames: &[(u8, Vec<u8>)]) -> Vec<proto::ServerFrame> {
    frames
        .iter()
        .filter(|(op, _)| *op == 0x2)
        .filter_map(|(_, p)| proto::ServerFrame::decode(p.as_slice()).ok())
        .collect()
}

#[test]
fn a_connection_gets_one_share_of_input_per_turn() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    h.gw.begin_turn(h.at());
    assert!(h.gw.claim_turn(key));
    assert!(
        !h.gw.claim_turn(key),
        "a second share of the same turn (woken and scheduled)"
    );
    h.gw.begin_turn(h.at());
    assert!(h.gw.claim_turn(key), "no share in the next turn");
}

#[test]
fn an_echo_staged_for_one_connection_goes_to_it_when_another_connections_input_comes_first() {
    let mut h = Harness::new(|_| {});
    let a = h.upgraded(UPGRADE_ECHO);
    let b = h.upgraded(UPGRADE_ECHO);
    let now = h.at();
    h.gw.begin_turn(now);
    // Small echoes are copied, so nothing refers to the input and `a` need not be written
    // before `b`'s input.
    for (key, text) in [(a, b"to a"), (b, b"to b")] {
        assert!(h.gw.claim_turn(key));
        let mut buf = client_frame(0x1, text);
        assert_eq!(h.gw.handle_input(key, &mut buf, now), Input::Taken);
    }
    h.gw.write_to(b, h.peers.get_mut(&b).unwrap(), &[]);
    h.gw.end_input(b);
    h.pump();
    assert_eq!(h.frames(b), vec![(0x1, b"to b".to_vec())]);
    assert_eq!(h.frames(a), vec![(0x1, b"to a".to_vec())]);
}

#[test]
fn input_stopped_at_the_high_water_mark_goes_on_only_once_its_output_is_written() {
    let mut h = Harness::new(|c| c.outbound_high_water = 1024);
    let bob = h.logged_in("bob", "phone");
    // Pongs of 102 bytes, staged by the WebSocket layer: the eleventh reaches the mark.
    let pings: Vec<u8> = (0..20).flat_map(|_| client_frame(0x9, &[7; 100])).collect();
    assert_eq!(h.send(bob, &pings), Input::Full);
    assert!(h.gw.go_on(bob), "the peer took everything, yet input waits");
    let mut buf = vec![0; 64 * 1024];
    let n = h.gw.take_held(bob, &mut buf).expect("held input");
    let now = h.at();
    assert_eq!(h.gw.handle_input(bob, &mut buf[..n], now), Input::Taken);
    h.gw.write_to(bob, h.peers.get_mut(&bob).unwrap(), &buf);
    h.gw.end_input(bob);
    let frames = h.frames(bob);
    assert_eq!(frames.len(), 20, "{frames:?}");
    assert!(
        frames.iter().all(|f| *f == (0xA, vec![7; 100])),
        "{frames:?}"
    );
    // A peer that reads nothing: throttled, and its input waits until the output drains.
    h.peers.get_mut(&bob).unwrap().stuck = true;
    assert_eq!(h.send(bob, &pings), Input::Full);
    assert!(!h.gw.go_on(bob), "input goes on over the high-water mark");
}

#[test]
fn a_read_of_exactly_a_turns_share_of_frames_is_all_taken() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    let input: Vec<u8> = (0..FRAMES_PER_TURN)
        .flat_map(|_| client_frame(0x1, b"x"))
        .collect();
    assert_eq!(h.send(key, &input), Input::Taken);
    assert_eq!(h.gw.poll_resume(), None, "resumed with nothing held");
    assert_eq!(h.frames(key).len(), FRAMES_PER_TURN);
}

#[test]
fn every_raw_tcp_frame_of_one_read_is_handled() {
    let mut h = Harness::new(|_| {});
    let key = h.accept(ListenerKind::RawTcp);
    let exp = (h.at().unix_ms / 1000) as u64 + 3600;
    let login = ClientFrame {
        id: 1,
        body: Some(C::Login(proto::Login {
            token: crate::im::auth::issue(b"secret", "carol", exp),
            device_id: "laptop".into(),
            last_seq: 0,
        })),
    };
    let ping = ClientFrame {
        id: 2,
        body: Some(C::Ping(proto::Ping { client_time_ms: 7 })),
    };
    let mut bytes = Vec::new();
    for f in [&login, &ping] {
        crate::im::tcp_framing::LengthPrefixed::encode(&f.encode_to_vec(), &mut bytes);
    }
    // The ping waits for the login's read, then is handled.
    assert_eq!(h.send(key, &bytes), Input::Full);
    h.commit();
    let answers: Vec<proto::ServerFrame> = tcp_frames(&h.take(key))
        .iter()
        .filter_map(|p| proto::ServerFrame::decode(p.as_slice()).ok())
        .collect();
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert!(
        matches!(
            answers[0],
            proto::ServerFrame {
                id: 1,
                body: Some(proto::server_frame::Body::LoginOk(_))
            }
        ),
        "{answers:?}"
    );
    assert!(
        matches!(
            answers[1],
            proto::ServerFrame {
                id: 2,
                body: Some(proto::server_frame::Body::Pong(_))
            }
        ),
        "{answers:?}"
    );
}

#[test]
fn an_upgrade_past_max_connections_or_during_shutdown_gets_503() {
    let mut h = Harness::new(|c| c.max_connections = 1);
    h.upgraded(UPGRADE_ECHO);
    let key = h.accept(ListenerKind::Public);
    h.send(key, UPGRADE_ECHO);
    let answer = h.take(key);
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "past max_connections: {}",
        String::from_utf8_lossy(&answer)
    );
    let mut h = Harness::new(|_| {});
    let now = h.at();
    h.gw.handle_shutdown(now);
    let key = h.accept(ListenerKind::Public);
    h.send(key, UPGRADE_ECHO);
    let answer = h.take(key);
    assert!(
        answer.starts_with(b"HTTP/1.1 503"),
        "shutting down: {}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn a_json_connection_is_answered_in_json_text_frames() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_JSON);
    let exp = (h.at().unix_ms / 1000) as u64 + 3600;
    let login = ClientFrame {
        id: 1,
        body: Some(C::Login(proto::Login {
            token: crate::im::auth::issue(b"secret", "bob", exp),
            device_id: "phone".into(),
            last_seq: 0,
        })),
    };
    h.send(
        key,
        &client_frame(0x1, &serde_json::to_vec(&login).expect("JSON")),
    );
    h.commit();
    let frames = h.frames(key);
    assert!(!frames.is_empty(), "no answer");
    assert!(frames.iter().all(|(op, _)| *op == 0x1), "{frames:?}");
    let answer: proto::ServerFrame =
        serde_json::from_slice(&frames[0].1).expect("a JSON server frame");
    assert!(
        matches!(
            answer.body,
            Some(proto::server_frame::Body::LoginOk(ref ok)) if ok.uid == "bob"
        ),
        "{answer:?}"
    );
}

#[test]
fn logins_and_accepted_messages_are_counted_and_duplicates_are_not() {
    let mut h = Harness::new(|_| {});
    let bob = h.logged_in("bob", "phone");
    assert_eq!(h.gw.metrics.logins.get(), 1);
    // The same client_msg_id twice: the second is a duplicate.
    for duplicate in [false, true] {
        h.send(bob, &send_frame(2, "alice", "m1", b"hi"));
        h.commit();
        let oks: Vec<bool> = server_frames(&h.frames(bob))
            .into_iter()
            .filter_map(|f| match f.body {
                Some(proto::server_frame::Body::SendOk(ok)) => Some(ok.duplicate),
                _ => None,
            })
            .collect();
        assert_eq!(oks, vec![duplicate]);
        assert_eq!(h.gw.metrics.messages_in.get(), 1, "duplicate: {duplicate}");
    }
}

#[test]
fn delivery_latency_is_observed_in_seconds() {
    let mut h = Harness::new(|_| {});
    let bob = h.logged_in("bob", "phone");
    let admin = h.accept(ListenerKind::Admin);
    let body = r#"{"from_uid":"alice","to_uid":"bob","client_msg_id":"m1","text":"hi"}"#;
    h.send(admin, &admin_request("POST", "/v1/messages", body));
    // Its commit takes 1.5 s: bob gets it 1.5 s after it was accepted.
    h.now += 1_500;
    h.commit();
    assert_eq!(h.frames(bob).len(), 1);
    let text = h.gw.metrics.render(&[]);
    let sum = text
        .lines()
        .find_map(|l| l.strip_prefix("imgate_delivery_latency_seconds_sum "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(sum, Some(1.5), "{text}");
}

#[test]
fn im_frames_are_queued_while_the_output_is_within_the_outbound_limit() {
    let mut h = Harness::new(|c| {
        c.max_message_bytes = 1024;
        c.max_outbound_bytes = 1270;
        c.outbound_high_water = 1270;
        c.im.core.delivery_window = 1;
        c.im.core.max_content_bytes = 3;
    });
    let bob = h.logged_in("bob", "phone");
    h.peers.get_mut(&bob).unwrap().stuck = true;
    // Two sends, answered at their commit, then ten Pongs of 127 bytes: exactly the limit.
    let mut input = send_frame(2, "alice", "m1", b"hi");
    input.extend(send_frame(3, "alice", "m2", b"hi"));
    for _ in 0..10 {
        input.extend(client_frame(0x9, &[7; 125]));
    }
    assert_eq!(h.send(bob, &input), Input::Taken);
    assert_eq!(h.gw.conns[bob].outbox.len(), 1270);
    assert_eq!(h.gw.metrics.slow_consumer_kills.get(), 0);
    // The first SendOk finds the output at the limit, the second past it.
    h.commit();
    assert_eq!(h.gw.metrics.slow_consumer_kills.get(), 1);
    h.peers.get_mut(&bob).unwrap().stuck = false;
    h.gw.write_to(bob, h.peers.get_mut(&bob).unwrap(), &[]);
    let frames = h.frames(bob);
    let ops: Vec<u8> = frames.iter().map(|(op, _)| *op).collect();
    let mut expected = vec![0xA; 10];
    expected.extend([0x2, 0x8]);
    assert_eq!(ops, expected, "{frames:?}");
    assert!(matches!(
        server_frames(&frames)[..],
        [proto::ServerFrame {
            id: 2,
            body: Some(proto::server_frame::Body::SendOk(_))
        }]
    ));
    assert_eq!(close_of(&frames[11].1), (1008, "slow consumer".into()));
}

#[test]
fn a_group_is_not_found_until_it_has_members() {
    let mut h = Harness::new(|_| {});
    let get = |h: &mut Harness| {
        let admin = h.accept(ListenerKind::Admin);
        h.send(admin, b"GET /v1/groups/g1 HTTP/1.1\r\nHost: x\r\n\r\n");
        String::from_utf8(h.take(admin)).expect("text")
    };
    let answer = get(&mut h);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let admin = h.accept(ListenerKind::Admin);
    h.send(
        admin,
        b"PUT /v1/groups/g1/members/alice HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    h.commit();
    assert!(h.take(admin).starts_with(b"HTTP/1.1 204"));
    let answer = get(&mut h);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).expect("a body");
    let json: serde_json::Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(json["members"], serde_json::json!(["alice"]), "{body}");
}

#[test]
fn admin_changes_are_answered_once_their_own_batch_is_durable() {
    let mut h = Harness::new(|_| {});
    let put = |h: &mut Harness, path: &str| {
        let admin = h.accept(ListenerKind::Admin);
        h.send(
            admin,
            format!("PUT {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        );
        admin
    };
    // Two batches in flight, then the first one's membership again: it waits for the older
    // batch, not for the newest.
    let first = put(&mut h, "/v1/groups/g1/members/alice");
    let (id1, batch1) = h.gw.poll_batch().expect("the first batch");
    let second = put(&mut h, "/v1/friendships/alice/bob");
    let (id2, batch2) = h.gw.poll_batch().expect("the second batch");
    let again = put(&mut h, "/v1/groups/g1/members/alice");
    assert!(
        h.gw.poll_batch().is_none(),
        "the repeated change was written"
    );
    for (id, batch) in [(id1, batch1), (id2, batch2)] {
        let sents = h.store.get().apply(&batch);
        let now = h.at();
        h.gw.handle_committed(vec![(id, sents)], Duration::from_millis(1), now);
        h.pump();
        let answered = [first, second, again].map(|k| h.take(k).starts_with(b"HTTP/1.1 204"));
        let expected = if id == id1 {
            [true, false, true]
        } else {
            [false, true, false]
        };
        assert_eq!(answered, expected, "after batch {id}");
    }
}

/// Up to `--max-admin-connections` exchanges may wait for the store at once; none keeps its
/// request (up to 128 KiB) meanwhile.
#[test]
fn an_admin_exchange_waiting_for_its_commit_keeps_no_copy_of_its_request() {
    let mut h = Harness::new(|_| {});
    let admin = h.accept(ListenerKind::Admin);
    h.send(
        admin,
        b"PUT /v1/friendships/alice/bob HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    let Transport::Http { request, phase, .. } = &h.gw.conns[admin].transport else {
        panic!("not an HTTP exchange");
    };
    assert!(matches!(phase, Phase::Committing(_)), "{phase:?}");
    assert_eq!(request.capacity(), 0, "the request is kept");
}

#[test]
fn a_large_turn_does_not_leave_the_shared_staging_buffer_large() {
    let mut h = Harness::new(|_| {});
    let key = h.upgraded(UPGRADE_ECHO);
    // 400 echoes of 1,000 bytes, under the zero-copy size: about 400 KB copied and staged.
    let input: Vec<u8> = (0..400)
        .flat_map(|_| client_frame(0x2, &[7; 1000]))
        .collect();
    assert_eq!(h.send(key, &input), Input::Taken);
    assert_eq!(h.frames(key).len(), 400);
    let capacity = h.gw.staging.capacity();
    assert!(capacity <= 256 * 1024, "{capacity} bytes kept");
}
