//! The whole gateway fed arbitrary connections: each starts on a listener the input picks
//! (public, admin or raw TCP), optionally behind a valid upgrade to `/echo` or `/ws` (protobuf
//! or JSON), then takes arbitrary bytes in arbitrary read sizes, with time passing, peers that
//! stop reading and peers that hang up. Covers routing, the WebSocket layer, the IM core's
//! frame handling, raw TCP framing and admin requests together.
//!
//! Invariants beyond "no panic": nothing is written to a connection after the gateway
//! dropped it; every connection is dropped once enough time has passed; a connection the
//! gateway stopped reading (throttled) holds at most one read's worth of unhandled input.
#![no_main]

use std::collections::HashMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use imgate::config::ServerConfig;
use imgate::gateway::{Accept, Gateway, Input, ListenerKind, SocketAction};
use imgate::im::core::Now;
use imgate::store::memory::MemoryStore;
use imgate::store::{Sent, StoreRead};
use libfuzzer_sys::fuzz_target;

const UPGRADES: [&[u8]; 3] = [
    b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
      Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
      Sec-WebSocket-Protocol: imgate.v1.json\r\n\r\n",
];

/// A peer that takes output until it is told to stop reading.
#[derive(Default)]
struct Peer {
    received: usize,
    stuck: bool,
    dropped: bool,
}

impl Write for Peer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(!self.dropped, "output for a dropped connection");
        if self.stuck {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.received += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn now(ms: u64) -> Now {
    Now {
        mono_ms: ms,
        unix_ms: 1_700_000_000_000 + ms as i64,
    }
}

/// The next seq of each inbox, as a store would give them (nothing is stored).
type Seqs = HashMap<String, u64>;

fn pump(
    gw: &mut Gateway,
    peers: &mut HashMap<usize, Peer>,
    seqs: &mut Seqs,
    store: &dyn StoreRead,
    t: u64,
) {
    // The store reads at once; input held for the read goes on.
    let mut read = false;
    while let Some((rid, req)) = gw.poll_read() {
        read = true;
        gw.handle_read(rid, req.run(store), now(t));
    }
    while let Some(key) = read.then(|| gw.poll_resume()).flatten() {
        let mut buf = vec![0; 1 << 16];
        if !gw.wants_input(key) {
            continue;
        }
        if let Some(n) = gw.take_held(key, &mut buf) {
            buf.truncate(n);
            gw.handle_input(key, &mut buf, now(t));
            if let Some(peer) = peers.get_mut(&key) {
                gw.write_to(key, peer, &buf);
            }
            gw.end_input(key);
        }
    }
    // The store commits at once.
    if let Some((id, batch)) = gw.poll_batch() {
        let mut next = |uid: &str| {
            let s = seqs.entry(uid.to_owned()).or_default();
            *s += 1;
            *s
        };
        let sents = batch
            .sends
            .iter()
            .map(|s| Sent {
                seq: next(&s.from),
                duplicate: false,
                to_seqs: s.to.iter().map(|u| next(u)).collect(),
            })
            .collect();
        gw.handle_committed(vec![(id, sents)], Duration::from_millis(1), now(t));
    }
    while let Some(key) = gw.poll_transmit() {
        let peer = peers
            .get_mut(&key)
            .expect("output for an unknown connection");
        gw.write_to(key, peer, &[]);
    }
    while let Some(action) = gw.poll_close() {
        if let SocketAction::Drop(key) = action {
            if let Some(p) = peers.get_mut(&key) {
                p.dropped = true;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut cfg = ServerConfig {
        echo: true,
        max_message_bytes: 4096,
        outbound_high_water: 16 * 1024,
        ..ServerConfig::default()
    };
    cfg.im.jwt_secret = b"fuzz".to_vec();
    cfg.im.core.delivery_window = 8;
    cfg.im.core.max_content_bytes = 1024;
    cfg.max_outbound_bytes = 256 * 1024;
    let reads: Arc<dyn StoreRead> = Arc::new(MemoryStore::default());
    let mut gw = Gateway::new(&cfg);
    let mut peers: HashMap<usize, Peer> = HashMap::new();
    let mut seqs = Seqs::new();
    let mut t = 1_000;
    gw.begin_turn(now(t));
    let kind = match mode % 3 {
        0 => ListenerKind::Public,
        1 => ListenerKind::Admin,
        _ => ListenerKind::RawTcp,
    };
    let Accept::Open(key) = gw.handle_accept(kind, now(t)) else {
        return;
    };
    peers.insert(key, Peer::default());
    let mut stream = Vec::new();
    if kind == ListenerKind::Public && (mode / 3) % 4 != 3 {
        stream.extend_from_slice(UPGRADES[usize::from(mode / 3) % 4 % 3]);
    }
    stream.extend_from_slice(rest);
    let chunk = usize::from(mode >> 4).max(1) * 7;
    let mut buf = vec![0u8; 128 * 1024];
    for (i, piece) in stream.chunks(chunk).enumerate() {
        if peers[&key].dropped {
            break;
        }
        // Every few reads, time passes and the peer stops or resumes reading.
        if i % 5 == 4 {
            t += u64::from(piece[0]) * 100;
            gw.begin_turn(now(t));
            gw.handle_timeout(now(t));
            if let Some(p) = peers.get_mut(&key) {
                p.stuck = piece[0] & 1 == 1;
            }
            pump(&mut gw, &mut peers, &mut seqs, &*reads, t);
        }
        gw.begin_turn(now(t));
        if !gw.claim_turn(key) || !gw.wants_input(key) {
            continue;
        }
        let mut n = gw.take_held(key, &mut buf).unwrap_or(0);
        assert!(n <= 64 * 1024, "held more than a read");
        buf[n..n + piece.len()].copy_from_slice(piece);
        n += piece.len();
        if !gw.handle_received(key, piece.len(), now(t)) {
            pump(&mut gw, &mut peers, &mut seqs, &*reads, t);
            break;
        }
        let input = gw.handle_input(key, &mut buf[..n], now(t));
        if input != Input::Gone {
            let peer = peers.get_mut(&key).expect("peer");
            gw.write_to(key, peer, &buf[..n]);
            gw.end_input(key);
        }
        pump(&mut gw, &mut peers, &mut seqs, &*reads, t);
        while gw.poll_resume().is_some() {}
    }
    if data.len() % 2 == 0 {
        gw.handle_eof(key);
        gw.end_input(key);
        pump(&mut gw, &mut peers, &mut seqs, &*reads, t);
    }
    // Whatever state it is in, the connection ends once every deadline has passed.
    if let Some(p) = peers.get_mut(&key) {
        p.stuck = false;
    }
    for _ in 0..4 {
        t += millis(Duration::from_secs(200));
        gw.begin_turn(now(t));
        gw.handle_timeout(now(t));
        pump(&mut gw, &mut peers, &mut seqs, &*reads, t);
    }
    assert!(peers[&key].dropped, "a connection outlived every deadline");
});

fn millis(d: Duration) -> u64 {
    d.as_millis() as u64
}
