//! One hostile client at a time against the real binary: floods of requests whose answers are
//! larger than the requests, frames pipelined behind the upgrade, descriptors running out on
//! every listener, and floods of frames that carry nothing. In each case the server's memory
//! stays bounded, the attacker meets a defined answer, and a pair chatting meanwhile is served
//! as usual.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::im_client::{token, Client};
use common::{frame, limit_open_files, Raw, ServerProc, UPGRADE};
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};
use prost::Message as _;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// The highest RSS seen while sampling for `period`.
fn peak_rss_kib(pid: u32, period: Duration) -> u64 {
    let end = Instant::now() + period;
    let mut peak = 0;
    while Instant::now() < end {
        peak = peak.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(10));
    }
    peak
}

fn client_frame(id: u64, body: C) -> Vec<u8> {
    proto::ClientFrame {
        id,
        body: Some(body),
    }
    .encode_to_vec()
}

fn login(uid: &str, device: &str) -> Vec<u8> {
    client_frame(
        1,
        C::Login(proto::Login {
            token: token(uid),
            device_id: device.into(),
            last_seq: 0,
        }),
    )
}

fn sync_all() -> Vec<u8> {
    client_frame(
        9,
        C::Sync(proto::Sync {
            after_seq: 0,
            limit: 1000,
        }),
    )
}

/// A raw TCP frame: 4-byte big-endian length, then the protobuf bytes.
fn tcp_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend_from_slice(payload);
    f
}

/// A round trip this long means the pair was starved: they take about 1 ms, and took seconds
/// (or timed out) under these attacks before each connection's share of the loop was bounded.
/// The figures that matter are benchmarks (BENCHMARKS.md); this bound only catches starvation,
/// with room for a loaded test machine.
const STARVED: Duration = Duration::from_millis(250);

/// Two users chatting in a thread: each round trip is a message from one, received by the
/// other, timed. Stopping returns the round trips.
struct Chat {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Duration>>,
}

impl Chat {
    fn start(server: &ServerProc, a: &str, b: &str) -> Chat {
        let (mut sender, _) = Client::login(server, a, "phone", 0);
        let (mut receiver, _) = Client::login(server, b, "phone", 0);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let to = b.to_owned();
        let thread = std::thread::spawn(move || {
            let mut rtts = Vec::new();
            let mut i = 0u64;
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                sender.send(&to, &format!("c{i}"), "hello");
                let m = receiver.messages(1);
                rtts.push(t.elapsed());
                receiver.request(C::Ack(proto::Ack { seq: m[0].seq }));
                i += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            rtts
        });
        Chat { stop, thread }
    }

    /// Stops and returns the p99 round trip, after checking there were enough of them.
    fn p99(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let mut rtts = self.thread.join().expect("the chat failed");
        assert!(rtts.len() >= 10, "only {} round trips", rtts.len());
        rtts.sort();
        rtts[(rtts.len() * 99 / 100).min(rtts.len() - 1)]
    }
}

/// Reads until the server ends the connection; fails if it neither closes nor resets in
/// `within`.
fn expect_closed_within(s: &mut TcpStream, within: Duration) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 4096];
    loop {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the server did not close the connection within {within:?}")
            }
            Err(_) => return,
        }
    }
}

/// Fills eve's inbox with 70 messages of 16,000 bytes (about 1.1 MB that each full Sync
/// answers with).
fn fill_inbox(server: &ServerProc) {
    let (mut eve, _) = Client::login(server, "eve", "filler", 0);
    let content = "x".repeat(16_000);
    for i in 0..70 {
        eve.send("eve", &format!("m{i}"), &content);
    }
}

/// The attack of a Sync flood: `n` full Syncs in one write, then no reads for a while. The
/// server's RSS stays within 64 MiB of where it was, and others are served meanwhile.
fn sync_flood_stays_bounded(server: &ServerProc, attacker: &mut TcpStream, flood: &[u8]) {
    let pid = server.pid();
    let chat = Chat::start(server, "amy", "ben");
    std::thread::sleep(Duration::from_millis(200));
    let before = rss_kib(pid);
    attacker
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    attacker
        .write_all(flood)
        .expect("the flood fits the socket buffers");
    let peak = peak_rss_kib(pid, Duration::from_secs(2));
    let grew = peak.saturating_sub(before);
    eprintln!("RSS {before} KiB before, {peak} KiB at the peak of the flood");
    assert!(grew < 64 * 1024, "server RSS grew by {grew} KiB");
    let p99 = chat.p99();
    assert!(p99 < STARVED, "p99 round trip {p99:?}");
}

#[test]
fn a_sync_flood_from_a_websocket_client_that_never_reads_stays_bounded() {
    let server = ServerProc::start(&[]);
    fill_inbox(&server);
    let mut raw = Raw::open(server.addr, "/ws");
    raw.send(&frame(true, 0x2, &login("eve", "reader")));
    let one = frame(true, 0x2, &sync_all());
    sync_flood_stays_bounded(&server, &mut raw.stream, &one.repeat(1500));

    // Nothing was dropped: once it reads, every Sync has its answer, in order.
    let mut answers = 0;
    while answers < 1500 {
        let (_, op, payload) = raw.read_frame().expect("a frame");
        assert_eq!(op, 0x2);
        if let Some(S::SyncResult(r)) = proto::ServerFrame::decode(&payload[..]).unwrap().body {
            assert!(!r.messages.is_empty() && r.messages[0].seq == 1);
            answers += 1;
        }
    }
    drop(raw);
    std::thread::sleep(Duration::from_millis(500));
    eprintln!("RSS {} KiB after the attacker left", rss_kib(server.pid()));
}

#[test]
fn a_sync_flood_over_raw_tcp_stays_bounded() {
    let server = ServerProc::start(&["--tcp-listen", "127.0.0.1:0"]);
    fill_inbox(&server);
    let mut s = TcpStream::connect(server.tcp.expect("raw TCP listener")).unwrap();
    s.write_all(&tcp_frame(&login("eve", "reader"))).unwrap();
    let one = tcp_frame(&sync_all());
    sync_flood_stays_bounded(&server, &mut s, &one.repeat(1500));
}

#[test]
fn a_reader_that_never_reads_is_closed_as_a_slow_consumer_after_the_idle_timeout() {
    let server = ServerProc::start(&["--idle-timeout", "1s", "--ping-interval", "300ms"]);
    fill_inbox(&server);
    let mut raw = Raw::open(server.addr, "/ws");
    raw.send(&frame(true, 0x2, &login("eve", "reader")));
    raw.send(&frame(true, 0x2, &sync_all()).repeat(50));
    std::thread::sleep(Duration::from_secs(3));
    let metrics = server.admin_request("GET", "/metrics", "");
    assert!(
        metrics.contains("imgate_slow_consumer_kills_total 1"),
        "{metrics}"
    );
    assert_eq!(raw.read_close_code(), 1008);
}

#[test]
fn frames_pipelined_behind_the_upgrade_are_answered_after_the_101() {
    let server = ServerProc::start(&[]);
    for _ in 0..20 {
        let mut raw = Raw::connect(server.addr);
        let mut bytes =
            format!("GET /ws HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n").into_bytes();
        bytes.extend(frame(true, 0x2, &login("pip", "d")));
        bytes.extend(frame(
            true,
            0x2,
            &client_frame(2, C::Ping(proto::Ping::default())),
        ));
        raw.send(&bytes);
        let head = raw.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head:?}");
        let (_, _, ok) = raw.read_frame().unwrap();
        assert!(matches!(
            proto::ServerFrame::decode(&ok[..]).unwrap().body,
            Some(S::LoginOk(_))
        ));
        let (_, _, pong) = raw.read_frame().unwrap();
        assert!(matches!(
            proto::ServerFrame::decode(&pong[..]).unwrap().body,
            Some(S::Pong(_))
        ));
    }
}

#[test]
fn every_listener_sheds_at_the_descriptor_limit_and_accepts_again_after_it() {
    let server = ServerProc::start_with(&["--tcp-listen", "127.0.0.1:0"], |cmd| {
        limit_open_files(cmd, 48)
    });
    let tcp = server.tcp.expect("raw TCP listener");
    // Far more public connections than descriptors.
    let held: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect(server.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // The admin API answers 503 rather than nothing.
    let mut admin = TcpStream::connect(server.admin).unwrap();
    admin
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    admin
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut answer = String::new();
    let _ = admin.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer:?}");
    // A raw TCP client is closed rather than left hanging.
    let mut raw = TcpStream::connect(tcp).unwrap();
    expect_closed_within(&mut raw, Duration::from_secs(3));

    // Once descriptors are free, both listeners serve again without a new arrival to wake
    // them: a request already waiting is answered.
    let mut waiting = TcpStream::connect(server.admin).unwrap();
    waiting
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    drop(held);
    waiting
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    let _ = waiting.read_to_string(&mut answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.1 503"),
        "the waiting admin request got {answer:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = server.admin_request("GET", "/healthz", "");
        if health.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the admin API never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut s = TcpStream::connect(tcp).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&tcp_frame(&login("late", "d"))).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("raw TCP answers again");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).unwrap();
    assert!(matches!(
        proto::ServerFrame::decode(&body[..]).unwrap().body,
        Some(S::LoginOk(_))
    ));
}

/// Streams `unit` to the server until it closes or `limit` passes; returns how long it took.
fn flood(stream: &mut TcpStream, unit: &[u8], limit: Duration) -> Duration {
    let batch = unit.repeat(64 * 1024 / unit.len());
    stream
        .set_write_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Err(e) = stream.write_all(&batch) {
            if e.kind() != std::io::ErrorKind::WouldBlock
                && e.kind() != std::io::ErrorKind::TimedOut
            {
                break;
            }
        }
    }
    start.elapsed()
}

#[test]
fn floods_of_frames_without_data_are_closed_with_1008_and_others_stay_fast() {
    // A long close timeout: a flooder that goes on after the Close must be dropped at once,
    // not read (and thrown away) until the timeout.
    let server = ServerProc::start(&["--echo", "--close-timeout", "60s"]);
    let chat = Chat::start(&server, "amy", "ben");
    let fragment_start = frame(false, 0x2, b"a");
    let empty_continuation = frame(false, 0x0, b"");
    let ping = frame(true, 0x9, b"");
    for (what, unit) in [
        ("empty continuations", &empty_continuation),
        ("pings", &ping),
    ] {
        for path in ["/ws", "/echo"] {
            // Flooders come back as soon as they are dropped, for a while, so that the pair
            // chats through the attack.
            let until = Instant::now() + Duration::from_millis(1500);
            while Instant::now() < until {
                let mut raw = Raw::open(server.addr, path);
                if what == "empty continuations" {
                    raw.send(&fragment_start);
                }
                let mut reader = raw.stream.try_clone().unwrap();
                let closed = std::thread::spawn(move || {
                    let mut r = Raw {
                        stream: reader.try_clone().unwrap(),
                    };
                    let code = r.read_close_code();
                    expect_closed_within(&mut reader, Duration::from_secs(5));
                    code
                });
                let took = flood(&mut raw.stream, unit, Duration::from_secs(10));
                assert!(
                    took < Duration::from_secs(10),
                    "{what} on {path}: never closed"
                );
                assert_eq!(closed.join().unwrap(), 1008, "{what} on {path}");
            }
        }
    }
    let metrics = server.admin_request("GET", "/metrics", "");
    assert!(metrics.contains("code=\"1008\""), "{metrics}");
    let p99 = chat.p99();
    assert!(p99 < STARVED, "p99 round trip {p99:?}");
}

#[test]
fn a_flood_of_small_requests_gets_its_share_of_the_loop_and_no_more() {
    let server = ServerProc::start(&[]);
    let chat = Chat::start(&server, "amy", "ben");
    let mut raw = Raw::open(server.addr, "/ws");
    raw.send(&frame(true, 0x2, &login("eve", "pinger")));
    // Read everything the server answers, so the flood is never throttled by its output.
    let mut reader = raw.stream.try_clone().unwrap();
    let pongs = std::thread::spawn(move || {
        let mut b = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        reader
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        while let Ok(n) = reader.read(&mut b) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let ping = frame(true, 0x2, &client_frame(3, C::Ping(proto::Ping::default())));
    flood(&mut raw.stream, &ping, Duration::from_secs(3));
    let p99 = chat.p99();
    raw.stream.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(pongs.join().unwrap() > 0, "the pings were answered");
    assert!(p99 < STARVED, "p99 round trip {p99:?}");
}
