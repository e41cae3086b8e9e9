//! Groups and signals over loopback with the real binary: membership on the admin API, group
//! messages to every member's devices and inboxes, catch-up after a restart, kill -9 during
//! group sends, and ephemeral signals.

mod common;

use std::time::Duration;

use common::im_client::Client;
use common::ServerProc;
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};

fn status(response: &str) -> u16 {
    response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {response:?}"))
}

fn body(response: &str) -> serde_json::Value {
    let json = response.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {response:?}"))
}

fn member(server: &ServerProc, method: &str, gid: &str, uid: &str) -> u16 {
    status(&server.admin_request(method, &format!("/v1/groups/{gid}/members/{uid}"), ""))
}

fn group_send(c: &mut Client, gid: &str, cmid: &str, text: &str) -> u64 {
    c.request(C::Send(proto::SendMessage {
        group_id: gid.into(),
        client_msg_id: cmid.into(),
        content: text.as_bytes().to_vec(),
        ..Default::default()
    }))
}

fn signal(c: &mut Client, to_uid: &str, gid: &str, kind: &str) -> u64 {
    c.request(C::Signal(proto::Signal {
        to_uid: to_uid.into(),
        group_id: gid.into(),
        kind: kind.into(),
        payload: b"x".to_vec(),
        ..Default::default()
    }))
}

/// Every frame up to the answer to a Ping sent now: what the server pushed before it.
fn pushed_until_pong(c: &mut Client) -> Vec<S> {
    let id = c.request(C::Ping(proto::Ping { client_time_ms: 1 }));
    let mut got = Vec::new();
    loop {
        let f = c.next();
        if f.id == id {
            return got;
        }
        got.extend(f.body);
    }
}

fn group_messages(c: &mut Client, n: usize) -> Vec<proto::Message> {
    let got = c.messages_acked(n);
    for m in &got {
        assert_eq!(
            (m.group_id.as_str(), m.to_uid.as_str()),
            ("team", ""),
            "{m:?}"
        );
    }
    got
}

#[test]
fn three_users_on_five_devices_in_a_group_and_one_caught_up_after_a_restart() {
    let mut server = ServerProc::start(&["--max-group-members", "3"]);
    server.keep_data = true;
    for uid in ["alice", "bob", "carol"] {
        assert_eq!(member(&server, "PUT", "team", uid), 204);
    }
    assert_eq!(
        member(&server, "PUT", "team", "dave"),
        409,
        "one member too many"
    );
    assert_eq!(
        member(&server, "PUT", "team", "alice"),
        204,
        "a member again"
    );
    let group = body(&server.admin_request("GET", "/v1/groups/team", ""));
    assert_eq!(
        group["members"],
        serde_json::json!(["alice", "bob", "carol"])
    );
    assert_eq!(
        status(&server.admin_request("GET", "/v1/groups/nobody", "")),
        404
    );
    let user = body(&server.admin_request("GET", "/v1/users/bob", ""));
    assert_eq!(user["groups"], serde_json::json!(["team"]));

    let (mut alice_phone, ok) = Client::login(&server, "alice", "phone", 0);
    assert_eq!(ok.groups, ["team"]);
    let (mut alice_laptop, _) = Client::login(&server, "alice", "laptop", 0);
    let (mut bob_phone, _) = Client::login(&server, "bob", "phone", 0);
    let (mut bob_tablet, _) = Client::login(&server, "bob", "tablet", 0);

    for i in 0..20 {
        let id = group_send(
            &mut alice_phone,
            "team",
            &format!("m{i}"),
            &format!("hello {i}"),
        );
        match alice_phone.response(id) {
            S::SendOk(ok) => assert_eq!(ok.seq, i + 1, "alice's own inbox seq"),
            other => panic!("{other:?}"),
        }
    }
    for c in [&mut alice_laptop, &mut bob_phone, &mut bob_tablet] {
        let got = group_messages(c, 20);
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1);
            assert_eq!(m.content, format!("hello {i}").into_bytes());
            assert_eq!(
                (m.from_uid.as_str(), m.from_device.as_str()),
                ("alice", "phone")
            );
        }
    }
    let back: Vec<S> = pushed_until_pong(&mut alice_phone);
    assert!(
        !back.iter().any(|b| matches!(b, S::Message(_))),
        "the sending device got its own messages: {back:?}"
    );

    // A signal to the group: every member's device but the sending one, no answer.
    signal(&mut bob_phone, "", "team", "typing");
    for c in [&mut alice_phone, &mut alice_laptop, &mut bob_tablet] {
        let s = pushed_until_pong(c);
        let signals: Vec<_> = s
            .iter()
            .filter_map(|b| match b {
                S::Signal(s) => Some((s.from_uid.as_str(), s.group_id.as_str(), s.kind.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(signals, vec![("bob", "team", "typing")]);
    }
    let quiet = pushed_until_pong(&mut bob_phone);
    assert!(
        quiet.is_empty(),
        "an answer or an echo of the signal: {quiet:?}"
    );
    let (mut dave, ok) = Client::login(&server, "dave", "phone", 0);
    assert!(ok.groups.is_empty());
    let id = group_send(&mut dave, "team", "d1", "let me in");
    match dave.response(id) {
        S::Error(e) => assert_eq!(e.code, proto::ErrorCode::Forbidden as i32),
        other => panic!("{other:?}"),
    }

    // Restart: carol, offline all along, catches up on all 20.
    let dir = server.data_dir.clone();
    let addr = server.addr.to_string();
    drop((alice_phone, alice_laptop, bob_phone, bob_tablet, dave));
    assert!(server.terminate(Duration::from_secs(10)).success());
    drop(server);
    let restarted = ServerProc::start_in(dir, &addr, &[], |_| {});
    let (mut carol, ok) = Client::login(&restarted, "carol", "phone", 0);
    assert_eq!(
        (ok.max_seq, ok.groups.clone()),
        (20, vec!["team".to_owned()])
    );
    let got = group_messages(&mut carol, 20);
    let seqs: Vec<u64> = got.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=20).collect::<Vec<_>>());
    assert_eq!(
        dave_max_seq(&restarted),
        0,
        "nothing stored for the non-member"
    );
}

fn dave_max_seq(server: &ServerProc) -> u64 {
    body(&server.admin_request("GET", "/v1/users/dave", ""))["max_seq"]
        .as_u64()
        .expect("max_seq")
}

#[test]
fn membership_changes_reach_online_devices_and_end_delivery() {
    let server = ServerProc::start(&[]);
    assert_eq!(member(&server, "PUT", "team", "alice"), 204);
    let (mut alice, _) = Client::login(&server, "alice", "phone", 0);
    let (mut bob, ok) = Client::login(&server, "bob", "phone", 0);
    let (mut bob2, _) = Client::login(&server, "bob", "laptop", 0);
    assert!(ok.groups.is_empty());
    assert_eq!(member(&server, "PUT", "team", "bob"), 204);
    for c in [&mut bob, &mut bob2] {
        let f = c.next();
        match f.body {
            Some(S::GroupChanged(g)) => assert_eq!((g.group_id.as_str(), g.joined), ("team", true)),
            other => panic!("{other:?}"),
        }
    }
    let id = group_send(&mut alice, "team", "one", "one");
    alice.response(id);
    assert_eq!(group_messages(&mut bob, 1)[0].content, b"one");
    assert_eq!(member(&server, "DELETE", "team", "bob"), 204);
    match bob.next().body {
        Some(S::GroupChanged(g)) => assert_eq!((g.group_id.as_str(), g.joined), ("team", false)),
        other => panic!("{other:?}"),
    }
    let id = group_send(&mut alice, "team", "two", "two");
    alice.response(id);
    let after = pushed_until_pong(&mut bob);
    assert!(
        !after.iter().any(|b| matches!(b, S::Message(_))),
        "a removed member got a message sent after its removal: {after:?}"
    );
    let user = body(&server.admin_request("GET", "/v1/users/bob", ""));
    assert_eq!(
        (user["max_seq"].as_u64(), &user["groups"]),
        (Some(1), &serde_json::json!([]))
    );

    // The backend pushes a signal to one user and to everyone.
    let answer = server.admin_request_with_body(
        "POST",
        "/v1/signals",
        "",
        r#"{"to_uid":"bob","kind":"notice","text":"hi","from_uid":"ops"}"#,
    );
    assert_eq!(body(&answer)["devices"], 2, "{answer}");
    let got = pushed_until_pong(&mut bob);
    assert!(
        got.iter()
            .any(|b| matches!(b, S::Signal(s) if s.from_uid == "ops" && s.payload == b"hi")),
        "{got:?}"
    );
    let answer = server.admin_request_with_body(
        "POST",
        "/v1/signals",
        "",
        r#"{"all":true,"kind":"k","text":""}"#,
    );
    assert_eq!(body(&answer)["devices"], 3, "{answer}");
    let answer = server.admin_request_with_body(
        "POST",
        "/v1/messages",
        "",
        r#"{"from_uid":"system","to_group":"team","client_msg_id":"s1","text":"notice"}"#,
    );
    assert_eq!(status(&answer), 200, "{answer}");
    let got = group_messages(&mut alice, 1);
    assert_eq!(
        (got[0].from_uid.as_str(), &got[0].content[..]),
        ("system", &b"notice"[..])
    );
}

#[test]
fn kill_9_during_group_sends_loses_nothing_acknowledged_in_any_inbox() {
    const FAST: &[&str] = &["--rate-limit", "100000", "--rate-burst", "100000"];
    let mut server = ServerProc::start(FAST);
    server.keep_data = true;
    let members = ["alice", "bob", "carol", "dave"];
    for uid in members {
        assert_eq!(member(&server, "PUT", "team", uid), 204);
    }
    let dir = server.data_dir.clone();
    let addr = server.addr.to_string();
    let (mut alice, _) = Client::login(&server, "alice", "phone", 0);
    // Ten chunks acknowledged one by one, then one more sent and the server killed at once,
    // so that the kill lands while that chunk is in flight.
    let mut ids = Vec::new();
    let mut acked: Vec<u64> = Vec::new();
    for chunk in 0..11 {
        let sent: Vec<u64> = (chunk * 50..chunk * 50 + 50)
            .map(|i| group_send(&mut alice, "team", &format!("k{i}"), &format!("msg {i}")))
            .collect();
        ids.extend(&sent);
        if chunk == 10 {
            break;
        }
        let last = *sent.last().expect("a chunk");
        loop {
            let f = alice.next();
            if let Some(S::SendOk(ok)) = f.body {
                acked.push(ok.seq);
                if f.id == last {
                    break;
                }
            }
        }
    }
    unsafe {
        libc::kill(server.pid() as libc::pid_t, libc::SIGKILL);
    }
    while let Ok(m) = alice.ws.read() {
        if let tungstenite::Message::Binary(b) = m {
            let f: proto::ServerFrame = prost::Message::decode(&b[..]).expect("decode");
            if let Some(S::SendOk(ok)) = f.body {
                assert!(ids.contains(&f.id));
                acked.push(ok.seq);
            }
        }
    }
    server.wait(Duration::from_secs(10)).expect("killed");
    drop(server);
    let newest = acked.iter().copied().max().unwrap_or(0);
    let mut restarted = ServerProc::start_in(dir, &addr, FAST, |_| {});
    restarted.keep_data = false;
    let mut stored = Vec::new();
    for uid in members {
        let (mut c, ok) = Client::login(&restarted, uid, "check", 0);
        assert!(
            ok.max_seq >= newest,
            "{uid} has {} of the {newest} acknowledged",
            ok.max_seq
        );
        for (i, m) in group_messages(&mut c, ok.max_seq as usize)
            .iter()
            .enumerate()
        {
            assert_eq!(m.seq, i as u64 + 1, "{uid}: in order, no gap");
            assert_eq!(m.content, format!("msg {i}").into_bytes(), "{uid}");
        }
        stored.push(ok.max_seq);
    }
    assert!(
        stored.windows(2).all(|w| w[0] == w[1]),
        "a group message is in every inbox or in none: {stored:?}"
    );
    eprintln!(
        "killed with {} of 550 acknowledged; {} stored in each inbox",
        acked.len(),
        stored[0]
    );
}

#[test]
fn json_clients_use_group_ids_group_changes_and_signals() {
    use common::im_client::{token, Ws};
    use tungstenite::client::IntoClientRequest;
    use tungstenite::Message;
    let server = ServerProc::start(&[]);
    let mut req = server.url("/ws").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "imgate.v1.json".parse().unwrap());
    let (mut js, _) = tungstenite::connect(req).expect("json client");
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
    let send = |js: &mut Ws, v: serde_json::Value| js.send(Message::text(v.to_string())).unwrap();
    send(
        &mut js,
        serde_json::json!({"id": "1", "login": {"token": token("kim"), "deviceId": "web"}}),
    );
    assert!(next_json(&mut js)["loginOk"].is_object());
    assert_eq!(member(&server, "PUT", "team", "kim"), 204);
    assert_eq!(
        next_json(&mut js),
        serde_json::json!({"groupChanged": {"groupId": "team", "joined": true}})
    );
    assert_eq!(member(&server, "PUT", "team", "lee"), 204);
    let (mut lee, _) = Client::login(&server, "lee", "phone", 0);

    send(
        &mut js,
        serde_json::json!({"id": "2", "send": {"groupId": "team", "clientMsgId": "j1", "content": "aGk="}}),
    );
    assert_eq!(next_json(&mut js)["sendOk"]["seq"], "1");
    let got = group_messages(&mut lee, 1);
    assert_eq!(
        (got[0].from_uid.as_str(), &got[0].content[..]),
        ("kim", &b"hi"[..])
    );

    let id = group_send(&mut lee, "team", "p1", "yo");
    lee.response(id);
    let m = next_json(&mut js);
    assert_eq!(
        (
            &m["message"]["groupId"],
            &m["message"]["fromUid"],
            m["message"].get("toUid")
        ),
        (&serde_json::json!("team"), &serde_json::json!("lee"), None)
    );
    signal(&mut lee, "", "team", "typing");
    let s = next_json(&mut js);
    assert_eq!(
        s,
        serde_json::json!({"signal": {"groupId": "team", "fromUid": "lee", "fromDevice": "phone", "kind": "typing", "payload": "eA=="}})
    );
    send(
        &mut js,
        serde_json::json!({"id": "3", "signal": {"toUid": "lee", "kind": "read", "payload": "Mg=="}}),
    );
    let got = pushed_until_pong(&mut lee);
    assert!(
        got.iter()
            .any(|b| matches!(b, S::Signal(s) if s.from_uid == "kim" && s.kind == "read")),
        "{got:?}"
    );
}
