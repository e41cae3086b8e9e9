//! Documented rules that no other test pins down, each checked against the real binary so
//! that breaking the rule fails a test: the HTTP refusal headers, subprotocol preference,
//! JSON and empty frames, the bad-frame count, the device and rate limits at their defaults,
//! Sync and the cursor, raw TCP closes, the admin header limit and unread answers, the
//! close, shutdown and login deadlines, and the environment.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::im_client::{token, Client};
use common::{frame, Raw, ServerProc, SECRET, UPGRADE};
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S, ErrorCode};
use prost::Message as _;
use tungstenite::Message;

/// The value of the response header `name` (matched without regard to case).
fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// One request on a fresh connection to the public listener; the whole answer.
fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut raw = Raw::connect(addr);
    raw.send(request.as_bytes());
    raw.read_to_end()
}

/// Reads until the peer ends the connection (EOF or reset) and returns how long that took
/// and what arrived first. Unlike a read timeout, which panics here: a connection that is
/// never closed must fail the test.
fn wait_for_close(s: &mut TcpStream, within: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (started.elapsed(), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted
                ) =>
            {
                return (started.elapsed(), got)
            }
            Err(e) => panic!("still open after {:?} ({e})", started.elapsed()),
        }
    }
}

fn error_code(body: &S) -> Option<ErrorCode> {
    match body {
        S::Error(e) => ErrorCode::try_from(e.code).ok(),
        _ => None,
    }
}

/// The next frame, or the close code once the server closes.
fn next_or_close(c: &mut Client) -> Result<proto::ServerFrame, u16> {
    loop {
        match c.ws.read() {
            Ok(Message::Binary(b)) => return Ok(proto::ServerFrame::decode(&b[..]).unwrap()),
            Ok(Message::Ping(_) | Message::Pong(_)) => {}
            Ok(Message::Close(Some(cf))) => return Err(u16::from(cf.code)),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn login_request(uid: &str, device: &str) -> C {
    C::Login(proto::Login {
        token: token(uid),
        device_id: device.into(),
        last_seq: 0,
    })
}

fn upgrade_request(path: &str, extra: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}{UPGRADE}\r\n")
}

#[test]
fn http_refusals_carry_their_documented_headers() {
    let server = ServerProc::start(&[
        "--allowed-origins",
        "https://app.example",
        "--max-connections",
        "1",
    ]);
    let origin = "Origin: https://app.example\r\n";

    let r = exchange(
        server.addr,
        &format!("POST /ws HTTP/1.1\r\nHost: x\r\n{origin}{UPGRADE}\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    assert_eq!(header(&r, "Allow"), Some("GET"), "{r}");

    let r = exchange(
        server.addr,
        &format!("GET /ws HTTP/1.1\r\nHost: x\r\n{origin}\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 426 "), "{r}");
    assert_eq!(header(&r, "Upgrade"), Some("websocket"), "{r}");

    // With --allowed-origins set, an upgrade that names no origin at all is refused too.
    let r = exchange(server.addr, &upgrade_request("/ws", ""));
    assert!(r.starts_with("HTTP/1.1 403 "), "{r}");

    let mut held = Raw::connect(server.addr);
    held.send(upgrade_request("/ws", origin).as_bytes());
    assert!(held.read_http_head().starts_with("HTTP/1.1 101 "));
    let r = exchange(server.addr, &upgrade_request("/ws", origin));
    assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
    assert_eq!(header(&r, "Retry-After"), Some("1"), "{r}");
}

#[test]
fn imgate_v1_proto_is_selected_when_both_subprotocols_are_offered() {
    let server = ServerProc::start(&[]);
    for offer in [
        "imgate.v1.json, imgate.v1.proto",
        "imgate.v1.proto, imgate.v1.json",
    ] {
        let mut raw = Raw::connect(server.addr);
        raw.send(
            upgrade_request("/ws", &format!("Sec-WebSocket-Protocol: {offer}\r\n")).as_bytes(),
        );
        let head = raw.read_http_head();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        assert_eq!(
            header(&head, "Sec-WebSocket-Protocol"),
            Some("imgate.v1.proto"),
            "offered {offer}: {head}"
        );
        // The connection speaks protobuf: a JSON text frame is a bad request, a binary one
        // is answered in binary.
        raw.send(&frame(
            true,
            0x1,
            br#"{"id":"1","ping":{"clientTimeMs":"1"}}"#,
        ));
        let (_, op, payload) = raw.read_frame().unwrap();
        assert_eq!(op, 0x2);
        let f = proto::ServerFrame::decode(&payload[..]).unwrap();
        assert_eq!(error_code(&f.body.unwrap()), Some(ErrorCode::BadRequest));
        let ping = proto::ClientFrame {
            id: 2,
            body: Some(C::Ping(proto::Ping { client_time_ms: 1 })),
        };
        raw.send(&frame(true, 0x2, &ping.encode_to_vec()));
        let (_, op, payload) = raw.read_frame().unwrap();
        assert_eq!(op, 0x2);
        assert_eq!(proto::ServerFrame::decode(&payload[..]).unwrap().id, 2);
    }
}

#[test]
fn json_unknown_fields_and_empty_frames_are_bad_requests() {
    let server = ServerProc::start(&[]);
    let mut raw = Raw::connect(server.addr);
    raw.send(upgrade_request("/ws", "Sec-WebSocket-Protocol: imgate.v1.json\r\n").as_bytes());
    assert!(raw.read_http_head().starts_with("HTTP/1.1 101 "));
    let mut exchange_json = |text: &str| -> serde_json::Value {
        raw.send(&frame(true, 0x1, text.as_bytes()));
        let (_, op, payload) = raw.read_frame().unwrap();
        assert_eq!(op, 0x1, "a text frame answers {text}");
        serde_json::from_slice(&payload).unwrap()
    };
    let login = serde_json::json!({"id": "1", "login": {"token": token("jo"), "deviceId": "web"}});
    assert_eq!(exchange_json(&login.to_string())["id"], "1");
    for bad in [
        r#"{"id":"2","ping":{"clientTimeMs":"5"},"colour":"red"}"#,
        r#"{"id":"3","ping":{"clientTimeMs":"5","colour":"red"}}"#,
        r#"{"id":"4"}"#,
        r#"{}"#,
    ] {
        let answer = exchange_json(bad);
        assert_eq!(
            answer["error"]["code"], "ERROR_CODE_BAD_REQUEST",
            "{bad} got {answer}"
        );
    }
    // The connection is still usable.
    let pong = exchange_json(r#"{"id":"5","ping":{"clientTimeMs":"5"}}"#);
    assert_eq!(pong["pong"]["clientTimeMs"], "5", "{pong}");

    // A protobuf frame with nothing in it.
    let (mut c, _) = Client::login(&server, "jo", "phone", 0);
    c.ws.send(Message::binary(Vec::<u8>::new())).unwrap();
    assert_eq!(
        error_code(&c.next().body.unwrap()),
        Some(ErrorCode::BadRequest)
    );
    let id = c.request(C::Ping(proto::Ping { client_time_ms: 9 }));
    assert!(matches!(c.response(id), S::Pong(_)));
}

fn expect_bad_requests(c: &mut Client, n: usize) {
    for i in 0..n {
        match next_or_close(c) {
            Ok(f) => assert_eq!(
                error_code(&f.body.unwrap()),
                Some(ErrorCode::BadRequest),
                "bad frame {i}"
            ),
            Err(code) => panic!("closed with {code} after {i} bad frames"),
        }
    }
}

#[test]
fn a_good_frame_resets_the_bad_frame_count_and_ten_in_a_row_close_1008() {
    let server = ServerProc::start(&[]);
    let (mut c, _) = Client::login(&server, "bo", "phone", 0);
    let garbage = || Message::binary(vec![0xFF, 0xFF, 0xFF]);
    for _ in 0..2 {
        for _ in 0..9 {
            c.ws.send(garbage()).unwrap();
        }
        let id = c.request(C::Ping(proto::Ping { client_time_ms: 1 }));
        expect_bad_requests(&mut c, 9);
        match next_or_close(&mut c) {
            Ok(f) => assert!(f.id == id && matches!(f.body, Some(S::Pong(_))), "{f:?}"),
            Err(code) => panic!("closed with {code} instead of answering ping {id}"),
        }
    }
    for _ in 0..10 {
        c.ws.send(garbage()).unwrap();
    }
    expect_bad_requests(&mut c, 10);
    assert_eq!(next_or_close(&mut c).map(|f| f.body), Err(1008));
}

/// Logs `n` devices of `uid` in, then one more, which must be refused with FORBIDDEN and 1008.
fn assert_device_limit(server: &ServerProc, uid: &str, n: usize) {
    let held: Vec<Client> = (0..n)
        .map(|i| Client::login(server, uid, &format!("d{i}"), 0).0)
        .collect();
    let mut extra = Client::connect(server);
    let id = extra.request(login_request(uid, "one-too-many"));
    let f = next_or_close(&mut extra).expect("an answer to the login");
    assert_eq!(f.id, id);
    assert_eq!(error_code(&f.body.unwrap()), Some(ErrorCode::Forbidden));
    assert_eq!(next_or_close(&mut extra).map(|f| f.body), Err(1008));
    drop(held);
}

#[test]
fn the_device_limit_is_16_by_default_and_follows_max_devices() {
    let server = ServerProc::start(&[]);
    assert_device_limit(&server, "dee", 16);
    let server = ServerProc::start(&["--max-devices", "2"]);
    assert_device_limit(&server, "dee", 2);
}

/// Pipelines `n` sends and returns how many got a SendOk; every other answer must be
/// RATE_LIMITED.
fn send_burst(c: &mut Client, n: usize, tag: &str) -> usize {
    let first = c.next_id;
    for i in 0..n {
        let f = proto::ClientFrame {
            id: first + i as u64,
            body: Some(C::Send(proto::SendMessage {
                to_uid: "rex".into(),
                client_msg_id: format!("{tag}-{i}"),
                content: b"x".to_vec(),
                group_id: String::new(),
            })),
        };
        c.ws.write(Message::binary(f.encode_to_vec())).unwrap();
    }
    c.ws.flush().unwrap();
    c.next_id += n as u64;
    let mut ok = 0;
    for _ in 0..n {
        let f = c.next();
        assert!((first..first + n as u64).contains(&f.id), "{f:?}");
        match f.body.unwrap() {
            S::SendOk(_) => ok += 1,
            other => assert_eq!(
                error_code(&other),
                Some(ErrorCode::RateLimited),
                "{other:?}"
            ),
        }
    }
    ok
}

#[test]
fn sends_are_limited_to_50_per_second_with_bursts_of_100_by_default() {
    let server = ServerProc::start(&[]);
    let (mut c, _) = Client::login(&server, "ray", "phone", 0);
    // A full bucket holds the burst; what trickles in while the burst is handled is bounded
    // by the rate times the time it took.
    let started = Instant::now();
    let first = send_burst(&mut c, 130, "a");
    let first_done = Instant::now();
    let refill_bound = 1 + (50.0 * (first_done - started).as_secs_f64()).ceil() as usize;
    assert!(
        (100..=100 + refill_bound).contains(&first),
        "{first} of 130 accepted from a full bucket"
    );
    // After the bucket ran dry, about 50 tokens come back per second.
    std::thread::sleep(Duration::from_millis(1000));
    let resumed = Instant::now();
    let second = send_burst(&mut c, 130, "b");
    let second_done = Instant::now();
    let at_least = (50.0 * (resumed - first_done).as_secs_f64()).floor() as usize - 1;
    let at_most = 1 + (50.0 * (second_done - started).as_secs_f64()).ceil() as usize;
    assert!(
        (at_least..=at_most).contains(&second),
        "{second} accepted after {:?}, want {at_least}..={at_most}",
        resumed - first_done
    );
}

#[test]
fn sync_does_not_move_the_cursor() {
    let server = ServerProc::start(&[]);
    for i in 1..=3 {
        let body = format!(
            r#"{{"from_uid":"system","to_uid":"sam","client_msg_id":"w{i}","text":"m{i}"}}"#
        );
        let r = server.admin_request_with_body(
            "POST",
            "/v1/messages",
            "Content-Type: application/json\r\n",
            &body,
        );
        assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    }
    let (mut c, ok) = Client::login(&server, "sam", "phone", 0);
    assert_eq!(ok.max_seq, 3);
    let seqs: Vec<u64> = c.messages(3).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [1, 2, 3]);
    c.request(C::Ack(proto::Ack { seq: 1 }));
    let id = c.request(C::Sync(proto::Sync {
        after_seq: 0,
        limit: 0,
    }));
    match c.response(id) {
        S::SyncResult(r) => {
            let seqs: Vec<u64> = r.messages.iter().map(|m| m.seq).collect();
            assert_eq!(seqs, [1, 2, 3]);
        }
        other => panic!("{other:?}"),
    }
    // A change made after the ack is answered once durable, so the ack is stored by then.
    let r = server.admin_request("PUT", "/v1/friendships/sam/zed", "");
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let r = server.admin_request("GET", "/v1/users/sam", "");
    assert!(r.contains(r#""cursors":{"phone":1}"#), "{r}");
    drop(c);
    // Reconnecting without last_seq resumes after the acked cursor, not after the Sync.
    let (mut c, _) = Client::login(&server, "sam", "phone", 0);
    let seqs: Vec<u64> = c.messages(2).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [2, 3]);
}

/// A raw TCP frame: 4-byte big-endian length, then the protobuf.
fn tcp_send(s: &mut TcpStream, f: &proto::ClientFrame) {
    let body = f.encode_to_vec();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&body);
    s.write_all(&out).unwrap();
}

fn tcp_next(s: &mut TcpStream) -> proto::ServerFrame {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).expect("a frame length");
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).expect("a frame body");
    proto::ServerFrame::decode(&body[..]).unwrap()
}

fn tcp_login(addr: SocketAddr, uid: &str, device: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    tcp_send(
        &mut s,
        &proto::ClientFrame {
            id: 1,
            body: Some(login_request(uid, device)),
        },
    );
    let f = tcp_next(&mut s);
    assert!(matches!(f.body, Some(S::LoginOk(_))), "{f:?}");
    s
}

fn tcp_ping(s: &mut TcpStream, id: u64) {
    tcp_send(
        s,
        &proto::ClientFrame {
            id,
            body: Some(C::Ping(proto::Ping { client_time_ms: 1 })),
        },
    );
    let f = tcp_next(s);
    assert!(f.id == id && matches!(f.body, Some(S::Pong(_))), "{f:?}");
}

#[test]
fn raw_tcp_connections_are_reaped_at_the_idle_timeout_unless_they_send() {
    let server = ServerProc::start(&[
        "--tcp-listen",
        "127.0.0.1:0",
        "--idle-timeout",
        "1s",
        "--ping-interval",
        "300ms",
    ]);
    let tcp = server.tcp.unwrap();
    let mut silent = tcp_login(tcp, "ida", "silent");
    let mut chatty = tcp_login(tcp, "ida", "chatty");
    // A connection that sends something more often than the idle timeout stays.
    let pinger = std::thread::spawn(move || {
        for id in 2..10 {
            std::thread::sleep(Duration::from_millis(250));
            tcp_ping(&mut chatty, id);
        }
    });
    let (after, rest) = wait_for_close(&mut silent, Duration::from_secs(6));
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        after >= Duration::from_millis(900),
        "reaped after {after:?}, before the 1 s idle timeout"
    );
    pinger.join().unwrap();
}

#[test]
fn raw_tcp_connections_beyond_max_connections_are_closed_at_once() {
    let server = ServerProc::start(&["--tcp-listen", "127.0.0.1:0", "--max-connections", "1"]);
    // A WebSocket connection takes the only slot; raw TCP counts against the same limit.
    let (mut ws, _) = Client::login(&server, "max", "ws", 0);
    let mut refused = TcpStream::connect(server.tcp.unwrap()).unwrap();
    let (_, got) = wait_for_close(&mut refused, Duration::from_secs(5));
    assert!(got.is_empty(), "{got:?}");
    let id = ws.request(C::Ping(proto::Ping { client_time_ms: 1 }));
    assert!(matches!(ws.response(id), S::Pong(_)));
}

#[test]
fn a_kicked_raw_tcp_connection_is_closed_after_the_kicked_frame() {
    let server = ServerProc::start(&["--tcp-listen", "127.0.0.1:0"]);
    let mut old = tcp_login(server.tcp.unwrap(), "kay", "phone");
    let (_new, _) = Client::login(&server, "kay", "phone", 0);
    let f = tcp_next(&mut old);
    assert!(f.id == 0 && matches!(f.body, Some(S::Kicked(_))), "{f:?}");
    let (_, rest) = wait_for_close(&mut old, Duration::from_secs(5));
    assert!(rest.is_empty(), "bytes after Kicked: {rest:?}");
}

#[test]
fn admin_requests_with_more_than_32_headers_get_431() {
    let server = ServerProc::start(&[]);
    let headers = |n: usize| (0..n).map(|i| format!("X-H{i}: v\r\n")).collect::<String>();
    // Host and 31 more: 32 in all.
    let r = server.admin_request("GET", "/healthz", &headers(31));
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let r = server.admin_request("GET", "/healthz", &headers(32));
    assert!(
        r.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{r}"
    );
    assert_eq!(header(&r, "Content-Type"), Some("application/json"));
    let body: serde_json::Value =
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(body["error"].is_string(), "{r}");
}

/// `GET /healthz` on a fresh admin connection, tolerating a refusal (503, then the close)
/// that races the request.
fn admin_status(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn an_admin_answer_the_client_never_reads_is_dropped_after_the_handshake_timeout() {
    let server = ServerProc::start(&[
        "--handshake-timeout",
        "1s",
        "--max-admin-connections",
        "1",
        "--durability",
        "none",
    ]);
    // A friends list far larger than what a small receive window and the server's send
    // buffer hold, so that the answer cannot be written out while nobody reads it.
    let long = "f".repeat(56);
    for i in 0..3000 {
        let r = server.admin_request("PUT", &format!("/v1/friendships/hub/{long}{i:04}"), "");
        assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    // Small segments keep the server's send buffer small too (Linux sizes it by the MSS).
    let mss: libc::c_int = 536;
    // SAFETY: a valid socket and a c_int option of the right size.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::IPPROTO_TCP,
            libc::TCP_MAXSEG,
            (&mss as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(set, 0, "TCP_MAXSEG: {}", std::io::Error::last_os_error());
    sock.connect(&server.admin.into()).unwrap();
    let mut unread: TcpStream = sock.into();
    let sent = Instant::now();
    unread
        .write_all(b"GET /v1/users/hub/friends HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    // While the answer is stuck, the exchange holds the only admin slot.
    let freed = loop {
        let r = admin_status(server.admin);
        if r.starts_with("HTTP/1.1 200 ") {
            break sent.elapsed();
        }
        assert!(r.starts_with("HTTP/1.1 503 "), "{r}");
        assert!(
            sent.elapsed() < Duration::from_secs(8),
            "the unread answer was never dropped"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        freed >= Duration::from_millis(900),
        "dropped after {freed:?}, before the 1 s handshake timeout"
    );
    // Only part of the answer was ever sent.
    let (_, got) = wait_for_close(&mut unread, Duration::from_secs(5));
    let text = String::from_utf8_lossy(&got);
    let length: usize = header(&text, "Content-Length").unwrap().parse().unwrap();
    let head_len = text.find("\r\n\r\n").unwrap() + 4;
    assert!(
        got.len() < head_len + length,
        "{} of {} bytes",
        got.len(),
        head_len + length
    );
}

/// Two upgrades on `/echo`, the first held open: whether the second was let in.
fn second_upgrade_allowed(server: &ServerProc) -> bool {
    let mut first = Raw::connect(server.addr);
    first.send(upgrade_request("/echo", "").as_bytes());
    assert!(first.read_http_head().starts_with("HTTP/1.1 101 "));
    let mut second = Raw::connect(server.addr);
    second.send(upgrade_request("/echo", "").as_bytes());
    let r = second.read_http_head();
    match &r[..12] {
        "HTTP/1.1 101" => true,
        "HTTP/1.1 503" => false,
        _ => panic!("{r}"),
    }
}

#[test]
fn environment_variables_configure_serve_below_flags_and_above_the_config_file() {
    let env = |cmd: &mut Command| {
        cmd.env("IMGATE_ECHO", "true")
            .env("IMGATE_MAX_CONNECTIONS", "1");
    };
    // The environment alone: /echo is on, and one connection is the limit.
    let server = ServerProc::start_with(&[], env);
    assert!(!second_upgrade_allowed(&server));
    drop(server);
    // A flag wins over the environment.
    let server = ServerProc::start_with(&["--max-connections", "2"], env);
    assert!(second_upgrade_allowed(&server));
    drop(server);
    // The environment wins over the config file.
    let dir = common::temp_data_dir();
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("imgate.toml");
    std::fs::write(&file, "max-connections = 2\n").unwrap();
    let path = file.to_str().unwrap();
    let server = ServerProc::start_with(&["--config", path], |cmd| {
        cmd.env("IMGATE_ECHO", "true");
    });
    assert!(second_upgrade_allowed(&server), "the file's setting");
    drop(server);
    let server = ServerProc::start_with(&["--config", path], env);
    assert!(
        !second_upgrade_allowed(&server),
        "the environment's setting"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn imgate_token_takes_its_secret_from_imgate_jwt_secret() {
    let server = ServerProc::start(&[]);
    let issue = |secret: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_imgate"));
        cmd.args(["token", "--uid", "tia"])
            .env_remove("IMGATE_JWT_SECRET");
        if let Some(s) = secret {
            cmd.env("IMGATE_JWT_SECRET", s);
        }
        cmd.output().expect("run imgate token")
    };
    let login = |token: &str| {
        let mut c = Client::connect(&server);
        let id = c.request(C::Login(proto::Login {
            token: token.trim().into(),
            device_id: "d".into(),
            last_seq: 0,
        }));
        c.response(id)
    };
    let out = issue(Some(SECRET));
    assert!(out.status.success(), "{out:?}");
    let answer = login(&String::from_utf8(out.stdout).unwrap());
    assert!(
        matches!(answer, S::LoginOk(ref ok) if ok.uid == "tia"),
        "{answer:?}"
    );
    let out = issue(Some("another-secret"));
    assert!(out.status.success(), "{out:?}");
    let answer = login(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(error_code(&answer), Some(ErrorCode::Unauthenticated));
    assert!(!issue(None).status.success(), "a token without any secret");
}

#[test]
fn the_login_deadline_counts_from_the_tcp_accept() {
    let server = ServerProc::start(&["--auth-timeout", "2s"]);
    let connected = Instant::now();
    let mut raw = Raw::connect(server.addr);
    // Most of the login time goes by before the upgrade; counted from the upgrade, the
    // deadline would fall 3.5 s after the connect.
    std::thread::sleep(Duration::from_millis(1500));
    raw.send(upgrade_request("/ws", "").as_bytes());
    assert!(raw.read_http_head().starts_with("HTTP/1.1 101 "));
    assert_eq!(raw.read_close_code(), 1008);
    let closed = connected.elapsed();
    assert!(
        closed >= Duration::from_millis(1900) && closed < Duration::from_millis(3000),
        "closed {closed:?} after the connect"
    );
}

#[test]
fn a_peer_that_never_answers_our_close_is_dropped_at_the_close_timeout() {
    let server = ServerProc::start(&["--auth-timeout", "300ms", "--close-timeout", "1500ms"]);
    let mut raw = Raw::open(server.addr, "/ws");
    // The login deadline makes the server close; the peer neither answers nor closes.
    assert_eq!(raw.read_close_code(), 1008);
    let (after, rest) = wait_for_close(&mut raw.stream, Duration::from_secs(8));
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        after >= Duration::from_millis(1300) && after < Duration::from_millis(4500),
        "dropped {after:?} after our Close, with a 1.5 s close timeout"
    );
}

#[test]
fn shutdown_drops_stragglers_at_the_shutdown_timeout_and_exits_0() {
    let mut server = ServerProc::start(&["--shutdown-timeout", "1500ms", "--close-timeout", "30s"]);
    let mut straggler = Raw::open(server.addr, "/ws");
    let (mut polite, _) = Client::login(&server, "pia", "phone", 0);
    let signalled = Instant::now();
    unsafe {
        libc::kill(server.pid() as libc::pid_t, libc::SIGTERM);
    }
    // A client that answers the Close is let go at once; the straggler is held for the
    // shutdown timeout, then dropped.
    assert_eq!(next_or_close(&mut polite).map(|f| f.body), Err(1001));
    while polite.ws.read().is_ok() {}
    assert_eq!(straggler.read_close_code(), 1001);
    let (_, rest) = wait_for_close(&mut straggler.stream, Duration::from_secs(8));
    assert!(rest.is_empty(), "{rest:?}");
    let dropped = signalled.elapsed();
    assert!(
        dropped >= Duration::from_millis(1400) && dropped < Duration::from_millis(5000),
        "straggler dropped {dropped:?} after SIGTERM, with a 1.5 s shutdown timeout"
    );
    let status = server.wait(Duration::from_secs(5)).expect("imgate exited");
    assert!(status.success(), "exit status {status:?}");
}
