//! The IM endpoint /ws over loopback with the real binary: tungstenite clients speaking the
//! protobuf protocol generated from proto/.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::im_client::{token, Client, Ws};
use common::{poll_until, read_until_closed, Raw, ServerProc, CLOSE_WITHIN, SECRET};
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};
use prost::Message as _;
use tungstenite::Message;

#[test]
fn two_users_three_devices_live_and_offline() {
    let server = ServerProc::start(&[]);
    let (mut alice, ok) = Client::login(&server, "alice", "phone", 0);
    assert_eq!((ok.uid.as_str(), ok.max_seq), ("alice", 0));
    let (mut bob_phone, _) = Client::login(&server, "bob", "phone", 0);
    let (mut bob_laptop, _) = Client::login(&server, "bob", "laptop", 0);

    let ok = alice.send("bob", "m1", "hello bob");
    assert_eq!((ok.seq, ok.duplicate), (1, false));
    for dev in [&mut bob_phone, &mut bob_laptop] {
        let m = dev.messages(1);
        assert_eq!(
            (m[0].seq, m[0].from_uid.as_str(), m[0].content.as_slice()),
            (1, "alice", &b"hello bob"[..])
        );
        assert_eq!(m[0].from_device, "phone");
    }
    // Duplicate send: same seq, nothing new delivered.
    let dup = alice.send("bob", "m1", "hello bob");
    assert_eq!((dup.seq, dup.duplicate), (1, true));

    // Bob's laptop acks and goes away; two more messages arrive while it is offline.
    bob_laptop.request(C::Ack(proto::Ack { seq: 1 }));
    bob_laptop.ws.close(None).ok();
    drop(bob_laptop);
    alice.send("bob", "m2", "second");
    alice.send("bob", "m3", "third");
    assert_eq!(bob_phone.messages(2).len(), 2);
    // Once the server has its ack and has seen it go, it resumes after its stored cursor, in
    // order, then live messages follow.
    poll_until(
        Duration::from_secs(10),
        "laptop acked 1 and offline",
        || {
            let user = json_body(&server.admin_request("GET", "/v1/users/bob", ""));
            let done = user["cursors"]["laptop"] == 1
                && user["online_devices"] == serde_json::json!(["phone"]);
            if done {
                Ok(())
            } else {
                Err(user.to_string())
            }
        },
    );
    let (mut laptop, ok) = Client::login(&server, "bob", "laptop", 0);
    assert_eq!(ok.max_seq, 3);
    let seqs: Vec<u64> = laptop.messages(2).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![2, 3]);
    alice.send("bob", "m4", "live");
    assert_eq!(laptop.messages(1)[0].seq, 4);

    // Sync pages over the caller's own inbox.
    let id = laptop.request(C::Sync(proto::Sync {
        after_seq: 1,
        limit: 2,
    }));
    match laptop.response(id) {
        S::SyncResult(r) => {
            assert_eq!(
                r.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
                vec![2, 3]
            );
            assert!(r.has_more);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn replacing_a_device_kicks_the_old_connection_with_4000() {
    let server = ServerProc::start(&[]);
    let (mut old, _) = Client::login(&server, "carol", "phone", 0);
    let (_new, _) = Client::login(&server, "carol", "phone", 0);
    match old.next().body {
        Some(S::Kicked(_)) => {}
        other => panic!("expected Kicked, got {other:?}"),
    }
    match old.ws.read() {
        Ok(Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 4000),
        other => panic!("expected Close 4000, got {other:?}"),
    }
}

#[test]
fn bad_logins_garbage_and_text_frames() {
    let server = ServerProc::start(&["--auth-timeout", "500ms"]);
    // Garbage: BAD_REQUEST, and the connection stays usable.
    let mut c = Client::connect(&server);
    c.ws.send(Message::binary(vec![0xFF, 0xFF, 0xFF])).unwrap();
    match c.next().body {
        Some(S::Error(e)) => assert_eq!(e.code, proto::ErrorCode::BadRequest as i32),
        other => panic!("{other:?}"),
    }
    c.ws.send(Message::text("{}")).unwrap();
    match c.next().body {
        Some(S::Error(e)) => assert_eq!(e.code, proto::ErrorCode::BadRequest as i32),
        other => panic!("{other:?}"),
    }
    // A request before login: UNAUTHENTICATED.
    let id = c.request(C::Ping(proto::Ping { client_time_ms: 1 }));
    match c.response(id) {
        S::Error(e) => assert_eq!(e.code, proto::ErrorCode::Unauthenticated as i32),
        other => panic!("{other:?}"),
    }
    // No login in time: closed with 1008.
    let started = Instant::now();
    match c.ws.read() {
        Ok(Message::Close(Some(cf))) => assert_eq!(u16::from(cf.code), 1008),
        other => panic!("expected Close 1008, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    // A bad token: UNAUTHENTICATED then close 1008.
    let mut c = Client::connect(&server);
    let id = c.request(C::Login(proto::Login {
        token: "not-a-token".into(),
        device_id: "d".into(),
        last_seq: 0,
    }));
    match c.response(id) {
        S::Error(e) => assert_eq!(e.code, proto::ErrorCode::Unauthenticated as i32),
        other => panic!("{other:?}"),
    }
    match c.ws.read() {
        Ok(Message::Close(Some(cf))) => assert_eq!(u16::from(cf.code), 1008),
        other => panic!("expected Close 1008, got {other:?}"),
    }
}

#[test]
fn kill_9_loses_nothing_that_was_acknowledged() {
    const FAST: &[&str] = &["--rate-limit", "100000", "--rate-burst", "100000"];
    let mut server = ServerProc::start(FAST);
    server.keep_data = true;
    let dir = server.data_dir.clone();
    let addr = server.addr.to_string();
    let (mut alice, _) = Client::login(&server, "alice", "phone", 0);
    let mut acked = Vec::new();
    for i in 0..200 {
        let ok = alice.send("dave", &format!("k{i}"), &format!("msg {i}"));
        acked.push(ok.seq);
    }
    // Keep sending without waiting, and kill the server once the first of these are
    // acknowledged, so that the kill lands while sends are in flight.
    let mut in_flight = std::collections::HashMap::new();
    for i in 200..1200u64 {
        let id = alice.request(C::Send(proto::SendMessage {
            to_uid: "dave".into(),
            client_msg_id: format!("k{i}"),
            content: format!("msg {i}").into_bytes(),
            group_id: String::new(),
        }));
        in_flight.insert(id, i);
    }
    let mut acked_in_flight = 0;
    let record = |f: proto::ServerFrame, acked: &mut Vec<u64>| {
        if let (Some(i), Some(S::SendOk(ok))) = (in_flight.get(&f.id), f.body) {
            assert_eq!(ok.seq, i + 1, "dave's seq of message {i}");
            acked.push(ok.seq);
        }
    };
    while acked_in_flight < 5 {
        record(alice.next(), &mut acked);
        acked_in_flight = acked.len() - 200;
    }
    unsafe {
        libc::kill(server.pid() as libc::pid_t, libc::SIGKILL);
    }
    // Every SendOk that left the server before it died counts as a promise.
    while let Ok(m) = alice.ws.read() {
        if let Message::Binary(b) = m {
            record(
                proto::ServerFrame::decode(&b[..]).expect("decode"),
                &mut acked,
            );
        }
    }
    server.wait(Duration::from_secs(10)).expect("killed");
    drop(server);
    let mut restarted = ServerProc::start_in(dir, &addr, FAST, |_| {});
    restarted.keep_data = false;
    let (mut dave, ok) = Client::login(&restarted, "dave", "phone", 0);
    let newest_acked = acked.iter().copied().max().unwrap_or(0);
    eprintln!(
        "killed with {} of 1,000 sends acknowledged; {} stored",
        acked.len() - 200,
        ok.max_seq
    );
    assert!(
        ok.max_seq >= newest_acked,
        "every acknowledged message survived: {} of {newest_acked} ({} acked while in flight)",
        ok.max_seq,
        acked.len() - 200,
    );
    let got = dave.messages_acked(ok.max_seq as usize);
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "in order, no gap");
        assert_eq!(m.content, format!("msg {i}").into_bytes());
    }
    // A client that retries every send it was not sure of gets each stored exactly once:
    // the ones that survived answer with their old seq, the lost ones are stored anew.
    let (mut alice, _) = Client::login(&restarted, "alice", "phone", 0);
    let retries: Vec<(u64, u64)> = (200..1200u64)
        .map(|i| {
            let id = alice.request(C::Send(proto::SendMessage {
                to_uid: "dave".into(),
                client_msg_id: format!("k{i}"),
                content: format!("msg {i}").into_bytes(),
                group_id: String::new(),
            }));
            (id, i)
        })
        .collect();
    for (id, i) in retries {
        match alice.response(id) {
            S::SendOk(ok) => assert_eq!(ok.seq, i + 1, "the retry of message {i}"),
            other => panic!("retry of {i}: {other:?}"),
        }
    }
    let rest = dave.messages_acked(1200 - ok.max_seq as usize);
    for (m, i) in rest.iter().zip(ok.max_seq..) {
        assert_eq!(
            (m.seq, &m.content),
            (i + 1, &format!("msg {i}").into_bytes())
        );
    }
}

#[test]
fn presence_follows_friendships_set_on_the_admin_api() {
    let server = ServerProc::start(&["--admin-token", "adm"]);
    // The admin API wants the bearer token.
    let r = server.admin_request("PUT", "/v1/friendships/erin/frank", "");
    assert!(r.starts_with("HTTP/1.1 401 "), "{r}");
    let auth = "Authorization: Bearer adm\r\n";
    let r = server.admin_request("PUT", "/v1/friendships/erin/frank", auth);
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let r = server.admin_request("GET", "/v1/friendships/erin/frank", auth);
    assert!(
        r.starts_with("HTTP/1.1 405 ") && r.contains("\"error\""),
        "{r}"
    );
    let r = server.admin_request("GET", "/v1/nothing", auth);
    assert!(r.starts_with("HTTP/1.1 404 "), "{r}");

    let (mut erin, ok) = Client::login(&server, "erin", "phone", 0);
    assert!(ok.online_friends.is_empty());
    let (frank, ok) = Client::login(&server, "frank", "phone", 0);
    assert_eq!(ok.online_friends, vec!["erin".to_owned()]);
    match erin.next().body {
        Some(S::Presence(p)) => assert_eq!((p.uid.as_str(), p.online), ("frank", true)),
        other => panic!("{other:?}"),
    }
    drop(frank);
    match erin.next().body {
        Some(S::Presence(p)) => assert_eq!((p.uid.as_str(), p.online), ("frank", false)),
        other => panic!("{other:?}"),
    }
    // Unfriended: no more presence.
    let r = server.admin_request("DELETE", "/v1/friendships/frank/erin", auth);
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let (mut frank, ok) = Client::login(&server, "frank", "phone", 0);
    assert!(ok.online_friends.is_empty());
    let id = erin.request(C::Ping(proto::Ping { client_time_ms: 3 }));
    match erin.next() {
        proto::ServerFrame {
            id: got,
            body: Some(S::Pong(p)),
        } => assert_eq!((got, p.client_time_ms), (id, 3)),
        other => panic!("expected only the Pong, got {other:?}"),
    }
    // Befriended again while both are online: each is told of the other at once.
    let r = server.admin_request("PUT", "/v1/friendships/erin/frank", auth);
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    for (c, other) in [(&mut erin, "frank"), (&mut frank, "erin")] {
        match c.next().body {
            Some(S::Presence(p)) => assert_eq!((p.uid.as_str(), p.online), (other, true)),
            got => panic!("{got:?}"),
        }
    }
}

/// A raw TCP client: 4-byte big-endian length + protobuf per frame.
struct TcpClient {
    s: TcpStream,
}

impl TcpClient {
    fn login(addr: std::net::SocketAddr, uid: &str, device: &str) -> TcpClient {
        let s = TcpStream::connect(addr).expect("connect tcp");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut c = TcpClient { s };
        c.send_frame(&proto::ClientFrame {
            id: 1,
            body: Some(C::Login(proto::Login {
                token: token(uid),
                device_id: device.into(),
                last_seq: 0,
            })),
        });
        match c.next().body {
            Some(S::LoginOk(_)) => c,
            other => panic!("tcp login failed: {other:?}"),
        }
    }

    fn send_frame(&mut self, f: &proto::ClientFrame) {
        use std::io::Write;
        let body = f.encode_to_vec();
        let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(&body);
        // Split the frame across writes: the server must reassemble it.
        let (a, b) = bytes.split_at(bytes.len() / 2);
        self.s.write_all(a).unwrap();
        self.s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        self.s.write_all(b).unwrap();
    }

    fn next(&mut self) -> proto::ServerFrame {
        use std::io::Read;
        let mut len = [0u8; 4];
        self.s.read_exact(&mut len).expect("frame length");
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        self.s.read_exact(&mut body).expect("frame body");
        proto::ServerFrame::decode(&body[..]).expect("decode")
    }
}

#[test]
fn raw_tcp_and_websocket_clients_talk_to_each_other() {
    // The close timeout is far past CLOSE_WITHIN: only the half-close after the error ends
    // the connection in time.
    let server = ServerProc::start(&["--tcp-listen", "127.0.0.1:0", "--close-timeout", "60s"]);
    let tcp_addr = server.tcp.expect("tcp listener line");
    let mut t = TcpClient::login(tcp_addr, "tina", "tcp-device");
    let (mut w, _) = Client::login(&server, "walt", "browser", 0);

    t.send_frame(&proto::ClientFrame {
        id: 2,
        body: Some(C::Send(proto::SendMessage {
            to_uid: "walt".into(),
            client_msg_id: "t1".into(),
            content: b"from tcp".to_vec(),
            group_id: String::new(),
        })),
    });
    match t.next().body {
        Some(S::SendOk(ok)) => assert_eq!(ok.seq, 1),
        other => panic!("{other:?}"),
    }
    let m = w.messages(1);
    assert_eq!(
        (m[0].from_uid.as_str(), m[0].content.as_slice()),
        ("tina", &b"from tcp"[..])
    );

    w.send("tina", "w1", "from ws");
    match t.next().body {
        Some(S::Message(m)) => assert_eq!((m.seq, m.content.as_slice()), (2, &b"from ws"[..])),
        other => panic!("{other:?}"),
    }
    // Ping/Pong is the raw TCP keep-alive.
    t.send_frame(&proto::ClientFrame {
        id: 3,
        body: Some(C::Ping(proto::Ping { client_time_ms: 9 })),
    });
    match t.next() {
        proto::ServerFrame {
            id: 3,
            body: Some(S::Pong(p)),
        } => assert_eq!(p.client_time_ms, 9),
        other => panic!("{other:?}"),
    }
    // An oversized frame: TOO_LARGE, then the connection is closed.
    use std::io::Write;
    t.s.write_all(&(10_000_000u32).to_be_bytes()).unwrap();
    match t.next().body {
        Some(S::Error(e)) => assert_eq!(e.code, proto::ErrorCode::TooLarge as i32),
        other => panic!("{other:?}"),
    }
    let rest = read_until_closed(&mut t.s, CLOSE_WITHIN);
    assert!(rest.is_empty(), "closed right after the error: {rest:x?}");
}

/// One admin request with a JSON body.
fn admin_post(server: &ServerProc, path: &str, json: &str, auth: &str) -> String {
    let headers = format!("{auth}Content-Type: application/json\r\n");
    server.admin_request_with_body("POST", path, &headers, json)
}

fn json_body(response: &str) -> serde_json::Value {
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {response}"))
}

#[test]
fn admin_api_sends_and_reports_users() {
    let server = ServerProc::start(&["--admin-token", "adm"]);
    let auth = "Authorization: Bearer adm\r\n";
    let r = server.admin_request("GET", "/healthz", auth);
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert_eq!(json_body(&r)["status"], "ok");
    assert!(server
        .admin_request("GET", "/healthz", "")
        .starts_with("HTTP/1.1 401 "));

    // A token from `imgate token` logs in.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
        .args(["token", "--uid", "gina", "--ttl", "10m", "--secret", SECRET])
        .output()
        .unwrap();
    assert!(out.status.success());
    let tok = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let mut gina = Client::connect(&server);
    let id = gina.request(C::Login(proto::Login {
        token: tok,
        device_id: "laptop".into(),
        last_seq: 0,
    }));
    assert!(matches!(gina.response(id), S::LoginOk(_)));

    // The system sends to gina: SendOk-equivalent JSON once durable, and she receives it.
    let msg = r#"{"from_uid":"system","to_uid":"gina","client_msg_id":"welcome","text":"hello"}"#;
    let r = admin_post(&server, "/v1/messages", msg, auth);
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let body = json_body(&r);
    assert_eq!(
        (body["seq"].as_u64(), body["duplicate"].as_bool()),
        (Some(1), Some(false))
    );
    let m = gina.messages(1);
    assert_eq!(
        (m[0].from_uid.as_str(), m[0].content.as_slice()),
        ("system", &b"hello"[..])
    );
    assert_eq!(m[0].from_device, "admin");
    // Same client_msg_id: a duplicate, nothing delivered twice.
    let body = json_body(&admin_post(&server, "/v1/messages", msg, auth));
    assert_eq!(
        (body["seq"].as_u64(), body["duplicate"].as_bool()),
        (Some(1), Some(true))
    );
    // base64 content on a user's behalf.
    let b64 = r#"{"from_uid":"hank","to_uid":"gina","client_msg_id":"h1","content":"AAEC"}"#;
    let r = admin_post(&server, "/v1/messages", b64, auth);
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert_eq!(gina.messages(1)[0].content, vec![0, 1, 2]);
    // Bad JSON and bad fields: 400 with a JSON error.
    for bad in ["{", r#"{"from_uid":"a","to_uid":"b","client_msg_id":"c"}"#] {
        let r = admin_post(&server, "/v1/messages", bad, auth);
        assert!(r.starts_with("HTTP/1.1 400 "), "{r}");
        assert!(json_body(&r)["error"].is_string());
    }

    // Users: online devices, max_seq and cursors (once the ack, which has no answer, is in).
    gina.request(C::Ack(proto::Ack { seq: 2 }));
    let body = poll_until(Duration::from_secs(10), "gina's cursor at 2", || {
        let body = json_body(&server.admin_request("GET", "/v1/users/gina", auth));
        match body["cursors"]["laptop"].as_u64() {
            Some(2) => Ok(body),
            _ => Err(body.to_string()),
        }
    });
    assert_eq!(body["online_devices"], serde_json::json!(["laptop"]));
    assert_eq!(body["max_seq"], 2);
    assert_eq!(body["cursors"]["laptop"], 2);
    // Friends with their online state.
    let r = server.admin_request("PUT", "/v1/friendships/gina/hank", auth);
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let body = json_body(&server.admin_request("GET", "/v1/users/hank/friends", auth));
    assert_eq!(
        body["friends"],
        serde_json::json!([{"uid": "gina", "online": true}])
    );
    let r = server.admin_request("DELETE", "/v1/users/hank", auth);
    assert!(r.starts_with("HTTP/1.1 405 "), "{r}");
    // A body over 128 KiB is refused from its Content-Length, before it is read.
    let big = format!("{auth}Content-Length: {}\r\n", 200 * 1024);
    let r = server.admin_request("POST", "/v1/messages", &big);
    assert!(r.starts_with("HTTP/1.1 413 "), "{r}");
    assert!(json_body(&r)["error"].is_string());
}

/// The value of one sample line of the metrics text, e.g. `imgate_logins_total`.
fn metric(text: &str, sample: &str) -> f64 {
    common::metric_sample(text, sample).unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

#[test]
fn metrics_count_the_traffic() {
    let server = ServerProc::start(&[]);
    let (mut a, _) = Client::login(&server, "ida", "phone", 0);
    let (mut b1, _) = Client::login(&server, "jon", "phone", 0);
    let (mut b2, _) = Client::login(&server, "jon", "tablet", 0);
    for i in 0..3 {
        a.send("jon", &format!("m{i}"), "hi");
    }
    assert_eq!(b1.messages(3).len(), 3);
    assert_eq!(b2.messages(3).len(), 3);
    a.send("jon", "m0", "hi"); // a duplicate: not counted as a new message
                               // A protocol error closes one connection with 1002.
    let mut bad = Client::connect(&server);
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = bad.ws.get_mut() {
        s.write_all(&[0x82, 0x00]).unwrap(); // an unmasked client frame
    }
    match bad.ws.read() {
        Ok(Message::Close(Some(c))) => assert_eq!(u16::from(c.code), 1002),
        other => panic!("expected Close 1002, got {other:?}"),
    }

    let r = server.admin_request("GET", "/metrics", "");
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    assert!(
        r.contains("Content-Type: application/openmetrics-text"),
        "{r}"
    );
    let text = r.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(metric(text, "imgate_logins_total"), 3.0);
    assert_eq!(metric(text, "imgate_messages_in_total"), 3.0);
    assert_eq!(metric(text, "imgate_messages_out_total"), 6.0);
    assert_eq!(metric(text, "imgate_delivery_latency_seconds_count"), 6.0);
    assert!(metric(text, "imgate_store_commit_latency_seconds_count") >= 1.0);
    assert!(metric(text, "imgate_bytes_in_total") > 0.0);
    assert!(metric(text, "imgate_bytes_out_total") > 0.0);
    assert_eq!(
        metric(text, "imgate_closes_total{code=\"1002\",by=\"server\"}"),
        1.0
    );
    assert_eq!(metric(text, "imgate_slow_consumer_kills_total"), 0.0);
    assert!(metric(text, "imgate_connections{state=\"open\",transport=\"ws\"}") >= 3.0);
}

#[test]
fn json_subprotocol_talks_to_protobuf_clients() {
    use tungstenite::client::IntoClientRequest;
    let server = ServerProc::start(&[]);
    let mut req = server.url("/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "imgate.v1.json".parse().unwrap());
    let (mut js, resp) = tungstenite::connect(req).expect("json client");
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "imgate.v1.json");
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = js.get_ref() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }
    let next_json = |js: &mut Ws| -> serde_json::Value {
        loop {
            match js.read().expect("read") {
                Message::Text(t) => return serde_json::from_str(&t).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected a JSON text frame, got {other:?}"),
            }
        }
    };
    let login = serde_json::json!({"id": "1", "login": {"token": token("kim"), "deviceId": "web"}});
    js.send(Message::text(login.to_string())).unwrap();
    let ok = next_json(&mut js);
    assert_eq!(
        (ok["id"].as_str(), ok["loginOk"]["uid"].as_str()),
        (Some("1"), Some("kim"))
    );

    // protobuf -> JSON
    let (mut lee, _) = Client::login(&server, "lee", "phone", 0);
    lee.send("kim", "p1", "hi kim");
    let m = next_json(&mut js);
    assert_eq!(m["message"]["seq"], "1");
    assert_eq!(m["message"]["fromUid"], "lee");
    assert_eq!(m["message"]["content"], "aGkga2lt"); // base64("hi kim")

    // JSON -> protobuf
    let send = serde_json::json!({"id": "2", "send": {"toUid": "lee", "clientMsgId": "j1", "content": "aGVsbG8="}});
    js.send(Message::text(send.to_string())).unwrap();
    let ok = next_json(&mut js);
    assert_eq!(
        (ok["id"].as_str(), ok["sendOk"]["seq"].as_str()),
        (Some("2"), Some("2"))
    );
    let got = lee.messages(1);
    assert_eq!(
        (got[0].from_uid.as_str(), got[0].content.as_slice()),
        ("kim", &b"hello"[..])
    );

    // Malformed JSON and binary frames: BAD_REQUEST, and the connection stays usable.
    js.send(Message::text("{not json")).unwrap();
    assert_eq!(
        next_json(&mut js)["error"]["code"],
        "ERROR_CODE_BAD_REQUEST"
    );
    js.send(Message::binary(vec![8, 1])).unwrap();
    assert_eq!(
        next_json(&mut js)["error"]["code"],
        "ERROR_CODE_BAD_REQUEST"
    );
    js.send(Message::text(r#"{"id":"3","ping":{"clientTimeMs":"5"}}"#))
        .unwrap();
    assert_eq!(next_json(&mut js)["pong"]["clientTimeMs"], "5");
}

/// One plain HTTP GET on the public listener; returns the whole response.
fn web_get(server: &ServerProc, target: &str) -> String {
    let mut raw = Raw::connect(server.addr);
    raw.send(format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    raw.read_to_end()
}

#[test]
fn web_demo_is_served_and_its_dev_routes_need_dev() {
    let server = ServerProc::start(&[]);
    let page = web_get(&server, "/");
    assert!(page.starts_with("HTTP/1.1 200 "), "{page}");
    assert!(
        page.contains("text/html") && page.contains("/app.js"),
        "{page}"
    );
    let js = web_get(&server, "/app.js");
    assert!(js.contains("text/javascript") && js.contains("imgate.v1.json"));
    // The WebSocket path still wants an upgrade; the dev routes do not exist without --dev.
    assert!(web_get(&server, "/ws").starts_with("HTTP/1.1 426 "));
    for target in [
        "/dev/token?uid=alice",
        "/dev/befriend?uid=a&friend=b",
        "/nope",
    ] {
        let r = web_get(&server, target);
        assert!(r.starts_with("HTTP/1.1 404 "), "{target}: {r}");
    }
    assert!(web_get(&server, "/dev/config").contains(r#"{"dev":false}"#));
    drop(server);

    let server = ServerProc::start(&["--dev"]);
    let r = web_get(&server, "/dev/token?uid=gina");
    assert!(r.starts_with("HTTP/1.1 200 "), "{r}");
    let body: serde_json::Value =
        serde_json::from_str(r.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    let token = body["token"].as_str().unwrap();
    // The token logs in: it is signed with the server's secret.
    let mut c = Client::connect(&server);
    let id = c.request(C::Login(proto::Login {
        token: token.to_owned(),
        device_id: "web".into(),
        last_seq: 0,
    }));
    match c.response(id) {
        S::LoginOk(ok) => assert_eq!(ok.uid, "gina"),
        other => panic!("dev token refused: {other:?}"),
    }
    assert!(web_get(&server, "/dev/token?uid=a%20b").starts_with("HTTP/1.1 400 "));
    // befriend answers once durable; the admin API then lists the friendship.
    let r = web_get(&server, "/dev/befriend?uid=gina&friend=hank");
    assert!(r.starts_with("HTTP/1.1 204 "), "{r}");
    let r = server.admin_request("GET", "/v1/users/hank/friends", "");
    assert!(r.contains(r#"{"online":true,"uid":"gina"}"#), "{r}");
    let r = web_get(&server, "/dev/friends?uid=gina");
    assert!(r.contains(r#"{"online":false,"uid":"hank"}"#), "{r}");
}
