//! Faults one client can cause, against the real binary: a consumer that stops reading, a peer
//! that trickles bytes, a peer that goes silent without closing, and a flood of garbage. In
//! each case the bad client meets its limit and the well-behaved ones go on unharmed.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::im_client::{token, Client};
use common::{frame, Raw, ServerProc, UPGRADE};
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};
use prost::Message as _;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// A Login frame, as a masked binary WebSocket frame.
fn login_frame(uid: &str, device: &str) -> Vec<u8> {
    let f = proto::ClientFrame {
        id: 1,
        body: Some(C::Login(proto::Login {
            token: token(uid),
            device_id: device.into(),
            last_seq: 0,
        })),
    };
    frame(true, 0x2, &f.encode_to_vec())
}

/// A pair that keeps chatting: messages from a to b, each checked on arrival in order.
struct Chat {
    sender: Client,
    receiver: Client,
    b: String,
    sent: usize,
}

impl Chat {
    fn login(server: &ServerProc, a: &str, b: &str) -> Chat {
        let (sender, _) = Client::login(server, a, "phone", 0);
        let (receiver, _) = Client::login(server, b, "phone", 0);
        Chat {
            sender,
            receiver,
            b: b.to_owned(),
            sent: 0,
        }
    }

    /// One message, sent and seen to arrive.
    fn exchange(&mut self) {
        let i = self.sent;
        self.sender
            .send(&self.b, &format!("c{i}"), &format!("message {i}"));
        let m = self.receiver.messages(1);
        assert_eq!(m[0].content, format!("message {i}").into_bytes());
        if i % 32 == 31 {
            self.receiver.request(C::Ack(proto::Ack { seq: m[0].seq }));
        }
        self.sent += 1;
    }
}

/// `n` messages from a to b, each checked on arrival in order.
fn chat(server: &ServerProc, a: &str, b: &str, n: usize) {
    let mut pair = Chat::login(server, a, b);
    for _ in 0..n {
        pair.exchange();
    }
}

#[test]
fn a_consumer_that_stops_reading_stays_bounded_and_loses_nothing() {
    let server = ServerProc::start(&[
        "--rate-limit",
        "100000",
        "--rate-burst",
        "100000",
        "--durability",
        "none",
        "--store-cache-bytes",
        "4194304",
        "--store-log-bytes",
        "1048576",
        "--ack-timeout",
        "2s",
        "--ping-interval",
        "500ms",
        // Far past CLOSE_WITHIN: the connection ends in time only by the closing handshake.
        "--close-timeout",
        "60s",
    ]);
    // `slow` logs in and then never reads (nor acks) again.
    let mut slow = Raw::open(server.addr, "/ws");
    slow.send(&login_frame("slow", "phone"));
    let rss_before = rss_kib(server.pid());

    // 3,000 messages of 8 KiB (24 MiB) for slow: far more than the socket buffers hold.
    let (mut fast, _) = Client::login(&server, "fast", "phone", 0);
    let content = "x".repeat(8 * 1024);
    const N: usize = 3000;
    for i in 0..N {
        fast.send("slow", &format!("f{i}"), &content);
    }
    // Meanwhile and afterwards, another pair is served as usual.
    chat(&server, "amy", "ben", 200);

    // The server holds one delivery window for slow, not 24 MiB, and closes it once its acks
    // are overdue (1008).
    let grew_kib = rss_kib(server.pid()).saturating_sub(rss_before);
    assert!(grew_kib < 16 * 1024, "server RSS grew by {grew_kib} KiB");
    assert_eq!(slow.read_close_code(), 1008);
    // Its Close reply ends the handshake, and the server the connection; nothing follows the
    // Close.
    slow.send(&frame(true, 0x8, &1008u16.to_be_bytes()));
    let rest = common::read_until_closed(&mut slow.stream, common::CLOSE_WITHIN);
    assert!(rest.is_empty(), "after the Close: {rest:x?}");
    drop(slow);

    // Nothing was lost: slow comes back and gets all 3,000, in order, from its cursor.
    let (mut again, ok) = Client::login(&server, "slow", "phone", 0);
    assert_eq!(ok.max_seq, N as u64);
    let mut next = 1;
    while next <= N as u64 {
        for m in again.messages(1) {
            assert_eq!(m.seq, next);
            next += 1;
        }
        if next % 128 == 0 {
            again.request(C::Ack(proto::Ack { seq: next - 1 }));
        }
    }
}

/// Writes `bytes` one at a time, `gap` apart, until the server closes; returns how many it
/// took (all of them if it never closed).
fn trickle(stream: &mut TcpStream, bytes: &[u8], gap: Duration) -> usize {
    stream
        .set_read_timeout(Some(Duration::from_millis(1)))
        .unwrap();
    for (i, b) in bytes.iter().enumerate() {
        if stream.write_all(&[*b]).is_err() {
            return i;
        }
        std::thread::sleep(gap);
        let mut buf = [0u8; 256];
        match stream.read(&mut buf) {
            Ok(0) => return i + 1,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return i + 1,
        }
    }
    bytes.len()
}

#[test]
fn trickling_peers_are_held_to_their_timeouts() {
    let server = ServerProc::start(&["--handshake-timeout", "1s", "--auth-timeout", "1s"]);
    let gap = Duration::from_millis(100);

    // A handshake at 10 bytes/s would take 20 s; the handshake timeout ends it after 1 s.
    let request = format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
    let mut s = TcpStream::connect(server.addr).unwrap();
    let sent = trickle(&mut s, request.as_bytes(), gap);
    assert!(sent < request.len() / 2, "closed after {sent} bytes");

    // After the upgrade, a Login at 10 bytes/s (~40 s) is cut off by the login deadline.
    let mut raw = Raw::open(server.addr, "/ws");
    let login = login_frame("tess", "phone");
    let sent = trickle(&mut raw.stream, &login, gap);
    assert!(
        sent < login.len() / 2,
        "closed after {sent} of {}",
        login.len()
    );

    // A logged-in client may be slow: a message trickled over ~3 s still arrives intact, and
    // the others are served meanwhile.
    let mut tess = Raw::open(server.addr, "/ws");
    tess.send(&login_frame("tess", "phone"));
    let (_, op, payload) = tess.read_frame().unwrap();
    assert_eq!(op, 0x2);
    assert!(matches!(
        proto::ServerFrame::decode(&payload[..]).unwrap().body,
        Some(S::LoginOk(_))
    ));
    let (mut uma, _) = Client::login(&server, "uma", "phone", 0);
    let send = proto::ClientFrame {
        id: 2,
        body: Some(C::Send(proto::SendMessage {
            to_uid: "uma".into(),
            client_msg_id: "t1".into(),
            content: b"slowly".to_vec(),
            group_id: String::new(),
        })),
    };
    let bytes = frame(true, 0x2, &send.encode_to_vec());
    std::thread::scope(|scope| {
        let chatter = scope.spawn(|| chat(&server, "vic", "wes", 50));
        let gap = Duration::from_millis(3000 / bytes.len() as u64);
        assert_eq!(trickle(&mut tess.stream, &bytes, gap), bytes.len());
        chatter.join().unwrap();
    });
    let m = uma.messages(1);
    assert_eq!(
        (m[0].from_uid.as_str(), &m[0].content[..]),
        ("tess", &b"slowly"[..])
    );
}

#[test]
fn a_peer_that_goes_silent_is_reaped_and_its_friends_see_it_offline() {
    let server = ServerProc::start(&["--ping-interval", "300ms", "--idle-timeout", "1s"]);
    let r = server.admin_request("PUT", "/v1/friendships/xena/yuri", "");
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let (mut xena, _) = Client::login(&server, "xena", "phone", 0);
    // yuri logs in, then vanishes without a FIN: no Pong, no reads, no close. The socket
    // stays open on our side, like a peer behind a dead NAT mapping.
    let mut yuri = Raw::open(server.addr, "/ws");
    yuri.send(&login_frame("yuri", "phone"));
    let started = Instant::now();
    let mut seen = Vec::new();
    while seen != [true, false] {
        if let Some(S::Presence(p)) = xena.next().body {
            assert_eq!(p.uid, "yuri");
            seen.push(p.online);
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{seen:?}");
    }
    // The server closed it with 1001 "idle timeout".
    assert_eq!(yuri.read_close_code(), 1001);
}

#[test]
fn a_garbage_flood_does_not_stop_well_behaved_clients() {
    let server = ServerProc::start(&["--handshake-timeout", "2s", "--rate-limit", "100000"]);
    // Each flooder makes a fixed number of attempts, and the good pair chats until every
    // flooder is done: the two overlap however fast or slow either side runs.
    const ATTEMPTS: usize = 60;
    let attempts = Arc::new(AtomicUsize::new(0));
    let flooders: Vec<_> = (0..4)
        .map(|t| {
            let (attempts, addr) = (attempts.clone(), server.addr);
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15u64 ^ t;
                let mut junk = [0u8; 512];
                for _ in 0..ATTEMPTS {
                    for b in junk.iter_mut() {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        *b = seed as u8;
                    }
                    let mut s = TcpStream::connect(addr).expect("connect during the flood");
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let payload: Vec<u8> = match seed % 3 {
                        // Random bytes instead of a request.
                        0 => junk.to_vec(),
                        // A valid upgrade, then random frames.
                        1 => [
                            format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n").as_bytes(),
                            &junk[..],
                        ]
                        .concat(),
                        // A valid upgrade, then well-formed frames of garbage protobuf.
                        _ => [
                            format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n").into_bytes(),
                            frame(true, 0x2, &junk[..64]).repeat(20),
                        ]
                        .concat(),
                    };
                    let _ = s.write_all(&payload);
                    let mut sink = [0u8; 4096];
                    let _ = s.read(&mut sink);
                    attempts.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // The good clients chat through the flood: it has begun before they start, and they go
    // on (for 300 messages at least) until it is over.
    common::poll_until(
        Duration::from_secs(20),
        "the flood began",
        || match attempts.load(Ordering::Relaxed) {
            0 => Err("no attempt yet".into()),
            _ => Ok(()),
        },
    );
    let mut pair = Chat::login(&server, "gia", "hal");
    while pair.sent < 300 || flooders.iter().any(|f| !f.is_finished()) {
        pair.exchange();
    }
    for f in flooders {
        f.join().unwrap();
    }
    assert_eq!(attempts.load(Ordering::Relaxed), 4 * ATTEMPTS);
    // And the server still takes new logins.
    let (_, ok) = Client::login(&server, "ivy", "phone", 0);
    assert_eq!(ok.uid, "ivy");
}

#[test]
fn a_reader_that_never_acks_holds_one_window_until_the_ack_timeout() {
    let server = ServerProc::start(&[
        "--delivery-window",
        "16",
        "--ack-timeout",
        "1s",
        "--ping-interval",
        "300ms",
    ]);
    let mut lazy = Raw::open(server.addr, "/ws");
    lazy.send(&login_frame("lazy", "phone"));
    let (mut other, _) = Client::login(&server, "olga", "phone", 0);
    for i in 0..40 {
        other.send("lazy", &format!("o{i}"), "hi");
    }
    // Exactly one window of messages arrives, then the 1008 close for the missing acks.
    let mut seqs = Vec::new();
    let code = loop {
        let (_, op, payload) = lazy.read_frame().expect("frames, then a Close");
        match op {
            0x2 => {
                if let Some(S::Message(m)) = proto::ServerFrame::decode(&payload[..]).unwrap().body
                {
                    seqs.push(m.seq);
                }
            }
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    assert_eq!(code, 1008);
    assert_eq!(seqs, (1..=16).collect::<Vec<u64>>());
}

/// Nothing follows the server's Close on the wire, also when the turn that closes a connection
/// for its overdue acks pings it too (the ack deadline is looked at when the keep-alive timer
/// fires, so with a silent peer the two come together).
#[test]
fn nothing_follows_the_close_for_overdue_acks() {
    let server = ServerProc::start(&[
        "--delivery-window",
        "4",
        "--ack-timeout",
        "1s",
        "--ping-interval",
        "250ms",
        "--close-timeout",
        "60s",
    ]);
    let mut lazy = Raw::open(server.addr, "/ws");
    lazy.send(&login_frame("lazy", "phone"));
    let (mut other, _) = Client::login(&server, "olga", "phone", 0);
    for i in 0..4 {
        other.send("lazy", &format!("o{i}"), "hi");
    }
    assert_eq!(lazy.read_close_code(), 1008);
    lazy.send(&frame(true, 0x8, &1008u16.to_be_bytes()));
    lazy.expect_tcp_close();
}

/// Reads whatever the server sends until it closes, which it must do within `within`.
fn read_until_closed(s: &mut TcpStream, within: Duration) -> String {
    String::from_utf8_lossy(&common::read_until_closed(s, within)).into_owned()
}

#[test]
fn admin_connections_are_capped_and_a_slow_request_gets_408() {
    let server = ServerProc::start(&["--handshake-timeout", "1s", "--max-admin-connections", "2"]);
    // Two exchanges that never finish their request hold both slots...
    let mut idle = TcpStream::connect(server.admin).unwrap();
    let mut slow = TcpStream::connect(server.admin).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // ...so a third is refused at once with 503 (the kernel's accept queue is in connect
    // order: the server takes the two before the third, whenever it gets to them).
    let mut third = TcpStream::connect(server.admin).unwrap();
    let r = read_until_closed(&mut third, Duration::from_secs(5));
    assert!(r.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{r}");
    // At the 1 s deadline the incomplete request is answered 408 (well before 5 s) and both
    // slots are freed.
    let r = read_until_closed(&mut slow, Duration::from_secs(5));
    assert!(r.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{r}");
    let r = read_until_closed(&mut idle, Duration::from_secs(10));
    assert!(r.starts_with("HTTP/1.1 408 "), "{r}");
    let r = server.admin_request("GET", "/healthz", "");
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
}
