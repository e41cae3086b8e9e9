//! The WebSocket engine over real loopback sockets: `imgate serve --echo` against tungstenite
//! (a client nobody here wrote) and, for what a library will not send, hand-made bytes.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{frame, limit_open_files, poll_until, read_until_closed, Raw, ServerProc, UPGRADE};
use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::Message;

type Client = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// An echo client whose reads give up after 10 s, so a server that never answers or never
/// closes fails the test instead of hanging it.
fn client(server: &ServerProc) -> Client {
    let (mut ws, resp) = tungstenite::connect(server.url("/echo")).expect("handshake");
    assert_eq!(resp.status(), 101);
    set_read_timeout(&mut ws, Duration::from_secs(10));
    ws
}

fn set_read_timeout(ws: &mut Client, timeout: Duration) {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(timeout)).unwrap();
    }
}

/// Reads until a data or close message (tungstenite surfaces pings/pongs too).
fn next_message(ws: &mut Client) -> Message {
    loop {
        match ws.read().expect("read") {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

fn close_code(ws: &mut Client) -> Option<CloseCode> {
    loop {
        match ws.read() {
            Ok(Message::Close(c)) => return c.map(|c| c.code),
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => return None,
            Err(e) => panic!("expected a Close frame, got {e}"),
        }
    }
}

#[test]
fn echoes_text_and_binary_up_to_the_limit() {
    let server = ServerProc::start(&["--echo", "--max-message-bytes", "65536"]);
    let mut ws = client(&server);
    ws.send(Message::text("héllo wörld")).unwrap();
    assert_eq!(next_message(&mut ws), Message::text("héllo wörld"));
    for size in [0usize, 1, 125, 126, 1024, 4096, 65_535, 65_536] {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(payload.clone())).unwrap();
        assert_eq!(
            next_message(&mut ws),
            Message::binary(payload),
            "size {size}"
        );
    }
    let text = "ü".repeat(32_768); // exactly 65,536 bytes
    ws.send(Message::text(text.clone())).unwrap();
    assert_eq!(next_message(&mut ws), Message::text(text));

    ws.send(Message::binary(vec![0u8; 65_537])).unwrap();
    assert_eq!(close_code(&mut ws), Some(CloseCode::Size));
}

#[test]
fn limit_counts_across_fragments() {
    let server = ServerProc::start(&[
        "--echo",
        "--max-message-bytes",
        "1000",
        // Far past CLOSE_WITHIN: only the half-close right after the Close ends it in time.
        "--close-timeout",
        "60s",
    ]);
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send(&frame(false, 0x2, &[1u8; 600]));
    raw.send(&frame(true, 0x0, &[2u8; 600]));
    assert_eq!(raw.read_close_code(), 1009);
    raw.expect_tcp_close();
}

#[test]
fn fragmented_messages_with_interleaved_pings_are_reassembled() {
    let server = ServerProc::start(&["--echo"]);
    let mut raw = Raw::open(server.addr, "/echo");
    let mut bytes = frame(false, 0x1, "frag".as_bytes());
    bytes.extend(frame(true, 0x9, b"ping-in-the-middle"));
    // Split a two-byte character across fragments: still valid UTF-8 as a whole.
    bytes.extend(frame(false, 0x0, &"ment-é".as_bytes()[..6]));
    bytes.extend(frame(true, 0x0, &"é-end".as_bytes()[1..]));
    raw.send(&bytes);
    assert_eq!(
        raw.read_frame().unwrap(),
        (true, 0xA, b"ping-in-the-middle".to_vec())
    );
    assert_eq!(
        raw.read_frame().unwrap(),
        (true, 0x1, "fragment-é-end".as_bytes().to_vec())
    );
}

#[test]
fn ping_is_answered_with_pong() {
    let server = ServerProc::start(&["--echo"]);
    let mut ws = client(&server);
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .unwrap();
    match ws.read().unwrap() {
        Message::Pong(p) => assert_eq!(&p[..], b"are you there"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn server_pings_idle_clients_and_closes_silent_ones() {
    let server = ServerProc::start(&[
        "--echo",
        "--ping-interval",
        "300ms",
        "--idle-timeout",
        "1200ms",
        "--close-timeout",
        "500ms",
    ]);
    // A client that answers pings (tungstenite does, as it reads) stays connected past the
    // idle timeout.
    let mut alive = client(&server);
    set_read_timeout(&mut alive, Duration::from_millis(100));
    // A client that never answers is closed with 1001 once the idle timeout passes.
    let mut silent = Raw::open(server.addr, "/echo");
    let started = Instant::now();
    let (_, op, _) = silent.read_frame().unwrap();
    assert_eq!(op, 0x9, "first the server pings");
    let mut pings = 0;
    while Instant::now() - started < Duration::from_millis(2_000) {
        match alive.read() {
            Ok(Message::Ping(_)) => pings += 1,
            Ok(_) => {}
            Err(tungstenite::Error::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("live client lost: {e}"),
        }
        let _ = alive.flush();
    }
    assert!(pings >= 2, "pings every interval: {pings}");
    assert_eq!(silent.read_close_code(), 1001);
    silent.expect_tcp_close();
    alive.send(Message::text("still here")).unwrap();
    set_read_timeout(&mut alive, Duration::from_secs(5));
    assert_eq!(next_message(&mut alive), Message::text("still here"));
}

#[test]
fn protocol_errors_close_with_the_right_code() {
    // Far past CLOSE_WITHIN: only the half-close right after the Close ends each in time.
    let server = ServerProc::start(&["--echo", "--close-timeout", "60s"]);
    let cases: Vec<(Vec<u8>, u16)> = vec![
        // unmasked frame
        (vec![0x81, 0x02, b'h', b'i'], 1002),
        // RSV1 without an extension
        (frame(true, 0x41, b"x"), 1002),
        // reserved opcode
        (frame(true, 0x3, b""), 1002),
        // fragmented ping
        (frame(false, 0x9, b""), 1002),
        // continuation with nothing to continue
        (frame(true, 0x0, b"x"), 1002),
        // a new message inside a fragmented one
        (
            [frame(false, 0x1, b"a"), frame(true, 0x1, b"b")].concat(),
            1002,
        ),
        // invalid UTF-8
        (
            frame(true, 0x1, &[0xce, 0xba, 0xe1, 0xbd, 0xb9, 0xcf, 0x83, 0xff]),
            1007,
        ),
        // close with a 1-byte payload, a reserved code, and a non-UTF-8 reason
        (frame(true, 0x8, &[0x03]), 1002),
        (frame(true, 0x8, &1005u16.to_be_bytes()), 1002),
        (frame(true, 0x8, &[0x03, 0xe8, 0xff]), 1002),
    ];
    for (bytes, want) in cases {
        let mut raw = Raw::open(server.addr, "/echo");
        raw.send(&bytes);
        assert_eq!(raw.read_close_code(), want, "{bytes:x?}");
        raw.expect_tcp_close();
    }
}

#[test]
fn invalid_utf8_fails_fast_before_the_message_ends() {
    let server = ServerProc::start(&["--echo"]);
    let mut raw = Raw::open(server.addr, "/echo");
    raw.send(&frame(false, 0x1, "κόσμε".as_bytes()));
    raw.send(&frame(false, 0x0, &[0xf4, 0x90, 0x80, 0x80]));
    // No final fragment was sent: the server must not wait for it.
    assert_eq!(raw.read_close_code(), 1007);
}

#[test]
fn closing_handshake_initiated_by_the_client() {
    // Far past the client's read timeout: only the half-close after the reply ends it in time.
    let server = ServerProc::start(&["--echo", "--close-timeout", "60s"]);
    let mut ws = client(&server);
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: CloseCode::Away,
        reason: "bye".into(),
    }))
    .unwrap();
    // The server echoes the code and then closes the TCP connection (tungstenite reports
    // ConnectionClosed only at the EOF; a server that stays open times the read out).
    assert_eq!(close_code(&mut ws), Some(CloseCode::Away));
    match ws.read() {
        Err(tungstenite::Error::ConnectionClosed) => {}
        other => panic!("expected the TCP close, got {other:?}"),
    }
}

#[test]
fn handshake_split_across_reads_with_pipelined_frame() {
    let server = ServerProc::start(&["--echo"]);
    let mut raw = Raw::connect(server.addr);
    let request = format!("GET /echo HTTP/1.1\r\nHost: localhost\r\n{UPGRADE}\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend(frame(true, 0x1, b"pipelined"));
    for chunk in bytes.chunks(7) {
        raw.send(chunk);
        std::thread::sleep(Duration::from_millis(2));
    }
    let head = raw.read_http_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        raw.read_frame().unwrap(),
        (true, 0x1, b"pipelined".to_vec())
    );
}

#[test]
fn bad_requests_get_http_errors() {
    let server = ServerProc::start(&["--echo", "--allowed-origins", "https://app.example"]);
    let ok_origin = "Origin: https://app.example\r\n";
    let cases: Vec<(String, &str)> = vec![
        (
            format!("GET /nope HTTP/1.1\r\nHost: x\r\n{UPGRADE}{ok_origin}\r\n"),
            "404",
        ),
        (
            format!("POST /echo HTTP/1.1\r\nHost: x\r\n{UPGRADE}{ok_origin}\r\n"),
            "405",
        ),
        ("GET /echo HTTP/1.1\r\nHost: x\r\n\r\n".into(), "426"),
        (
            format!("GET /echo HTTP/1.1\r\nHost: x\r\n{ok_origin}")
                + &UPGRADE.replace("Version: 13", "Version: 7")
                + "\r\n",
            "426",
        ),
        (
            format!("GET /echo HTTP/1.1\r\nHost: x\r\n{ok_origin}")
                + &UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dG9vIHNob3J0")
                + "\r\n",
            "400",
        ),
        (
            format!(
                "GET /echo HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n{UPGRADE}\r\n"
            ),
            "403",
        ),
        (
            format!(
                "GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n{UPGRADE}\r\n",
                "a".repeat(9000)
            ),
            "431",
        ),
    ];
    for (request, status) in cases {
        let mut raw = Raw::connect(server.addr);
        raw.send(request.as_bytes());
        let response = raw.read_to_end();
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status} ")),
            "want {status}, got {response:?}"
        );
        if status == "426" && request.contains("Version: 7") {
            assert!(response.contains("Sec-WebSocket-Version: 13\r\n"));
        }
    }
    let mut raw = Raw::connect(server.addr);
    raw.send(format!("GET /echo HTTP/1.1\r\nHost: x\r\n{ok_origin}{UPGRADE}\r\n").as_bytes());
    assert!(raw.read_http_head().starts_with("HTTP/1.1 101"));
}

#[test]
fn max_connections_answers_503() {
    let server = ServerProc::start(&["--echo", "--max-connections", "2"]);
    let mut a = client(&server);
    let _b = client(&server);
    match tungstenite::connect(server.url("/echo")) {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 503),
        Err(e) => panic!("expected 503, got {e}"),
        Ok(_) => panic!("expected 503, got a connection"),
    }
    a.close(None).unwrap();
    while a.read().is_ok() {}
    // The slot is free again once the first connection is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tungstenite::connect(server.url("/echo")) {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => panic!("slot not released: {e}"),
        }
    }
}

#[test]
fn slow_consumer_is_throttled_then_closed_without_hurting_others() {
    let server = ServerProc::start(&[
        "--echo",
        "--max-outbound-bytes",
        "262144",
        // The IM endpoint's delivery window must fit in the small allowance too.
        "--delivery-window",
        "8",
        "--close-timeout",
        "10s",
        "--idle-timeout",
        "2s",
        "--ping-interval",
        "500ms",
    ]);
    // Never reads: the echoes pile up to the high-water mark, then the server stops reading
    // it, so its own writes stall (TCP flow control) instead of the server's memory growing.
    let mut slow = Raw::open(server.addr, "/echo");
    slow.stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut fast = client(&server);
    let msg = frame(true, 0x2, &[7u8; 60_000]);
    let started = Instant::now();
    let mut round = 0u32;
    let stalled = loop {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "writes never stalled"
        );
        if slow.stream.write_all(&msg).is_err() {
            break started.elapsed();
        }
        round += 1;
        if round.is_multiple_of(16) {
            fast.send(Message::text(format!("tick {round}"))).unwrap();
            assert_eq!(
                next_message(&mut fast),
                Message::text(format!("tick {round}"))
            );
        }
    };
    // Throttled for the idle timeout: closed as a slow consumer (1008), after the echoes it
    // was owed. Reading them would end the throttling, so the kill is first awaited on the
    // metric, without a read.
    fast.send(Message::text("after")).unwrap();
    assert_eq!(next_message(&mut fast), Message::text("after"));
    poll_until(Duration::from_secs(20), "one slow-consumer kill", || {
        let metrics = server.admin_request("GET", "/metrics", "");
        let kills = metrics
            .lines()
            .find(|l| l.starts_with("imgate_slow_consumer_kills_total "));
        match kills {
            Some("imgate_slow_consumer_kills_total 1") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(slow.read_close_code(), 1008, "stalled after {stalled:?}");
    slow.expect_tcp_close();
}

#[test]
fn graceful_shutdown_closes_everyone_with_1001_and_exits_0() {
    let mut server = ServerProc::start(&["--echo"]);
    let mut a = client(&server);
    let mut b = client(&server);
    a.send(Message::text("x")).unwrap();
    assert_eq!(next_message(&mut a), Message::text("x"));
    let waiter = std::thread::spawn(move || (close_code(&mut a), close_code(&mut b), a, b));
    let status = server.terminate(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
    let (ca, cb, _a, _b) = waiter.join().unwrap();
    assert_eq!(ca, Some(CloseCode::Away));
    assert_eq!(cb, Some(CloseCode::Away));
    // The listener is gone.
    assert!(TcpStream::connect(server.addr).is_err());
}

/// The loop at the descriptor limit. A loop that retried accept there would either hang in
/// the accept (the steady client goes unanswered), leave the backlog unanswered (silent
/// connections), or spin: for that one its wake-ups are counted, which do not depend on how
/// fast or busy the machine is.
#[test]
fn running_out_of_descriptors_neither_spins_nor_kills_the_listener() {
    let server = ServerProc::start_with(&["--echo"], |cmd| limit_open_files(cmd, 48));
    let mut steady = client(&server);
    // Far more connections than descriptors, all in the backlog at once, then each asks for
    // an upgrade: every one is answered, 101 while descriptors last and 503 after.
    let mut pending: Vec<Raw> = (0..80).map(|_| Raw::connect(server.addr)).collect();
    let request = format!("GET /echo HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n");
    for raw in &mut pending {
        // A refused connection may be closed already; its 503 is still there to read.
        let _ = raw.stream.write_all(request.as_bytes());
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for mut raw in pending {
        let head = raw.read_http_head();
        if head.starts_with("HTTP/1.1 101 ") {
            held.push(raw);
        } else {
            assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
            refused += 1;
        }
    }
    assert!(refused > 0, "no connection was refused with 503");
    assert!(!held.is_empty(), "no connection was accepted");
    // At the limit: the connections already open are served, and the listener still sheds.
    steady.send(Message::text("at the limit")).unwrap();
    assert_eq!(next_message(&mut steady), Message::text("at the limit"));
    let mut late = Raw::connect(server.addr);
    late.send(request.as_bytes());
    let response = late.read_to_end();
    assert!(response.starts_with("HTTP/1.1 503 "), "{response}");
    // A quiet window at the limit; its wake-ups are counted below, once a descriptor is free
    // for the metrics request.
    std::thread::sleep(Duration::from_secs(2));
    drop(held);
    // Once descriptors are free again, the listener still accepts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match tungstenite::connect(server.url("/echo")) {
            Ok((mut ws, _)) => {
                ws.send(Message::text("back")).unwrap();
                assert_eq!(next_message(&mut ws), Message::text("back"));
                break;
            }
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("listener dead after EMFILE: {e}"),
        }
    }
    // The whole test wakes the loop a few hundred times; a loop that spun in the quiet window
    // would have woken hundreds of thousands of times.
    let metrics = server.admin_request("GET", "/metrics", "");
    let turns: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("imgate_loop_turns_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no loop turn count in {metrics}"));
    assert!(
        turns < 20_000.0,
        "the loop spun at the descriptor limit: {turns} wake-ups"
    );
}

#[test]
fn handshake_timeout_closes_silent_sockets() {
    let server = ServerProc::start(&["--echo", "--handshake-timeout", "300ms"]);
    let mut raw = Raw::connect(server.addr);
    raw.send(b"GET /echo HTTP/1.1\r\n");
    // Closed without an answer, well before the 10 s default would have ended it.
    let rest = read_until_closed(&mut raw.stream, Duration::from_secs(5));
    assert!(rest.is_empty(), "{rest:x?}");
}

#[test]
fn echo_endpoint_is_off_by_default() {
    let server = ServerProc::start(&[]);
    let mut raw = Raw::connect(server.addr);
    raw.send(format!("GET /echo HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n").as_bytes());
    assert!(raw.read_to_end().starts_with("HTTP/1.1 404 "));
}

#[test]
fn sends_nothing_after_close_and_writes_flush_before_close() {
    // A burst of messages then a Close in one write: every echo arrives before the Close
    // reply, and nothing after it. The close timeout is far past CLOSE_WITHIN: only the
    // half-close right after the reply ends the connection in time.
    let server = ServerProc::start(&["--echo", "--close-timeout", "60s"]);
    let mut raw = Raw::open(server.addr, "/echo");
    let mut bytes = Vec::new();
    for i in 0..100u8 {
        bytes.extend(frame(true, 0x2, &[i; 100]));
    }
    bytes.extend(frame(true, 0x8, &1000u16.to_be_bytes()));
    bytes.extend(frame(true, 0x2, b"after close"));
    raw.send(&bytes);
    for i in 0..100u8 {
        assert_eq!(raw.read_frame().unwrap(), (true, 0x2, vec![i; 100]));
    }
    let (fin, op, payload) = raw.read_frame().expect("the Close reply");
    assert_eq!((fin, op), (true, 0x8), "{payload:x?}");
    assert_eq!(payload, 1000u16.to_be_bytes());
    raw.expect_tcp_close();
}
