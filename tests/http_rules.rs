//! HTTP message rules of RFC 9110/9112 that both HTTP parsers (the admin API and the public
//! listener's upgrade/web demo parser) enforce, and the JWT `nbf` claim, end to end against the
//! real binary over 127.0.0.1 (issue 10, "hostile input, round two").

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::im_client::Client;
use common::{Raw, ServerProc, SECRET, UPGRADE};
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};

/// Sends one raw request and returns the whole answer (the server closes after it).
fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut raw = Raw::connect(addr);
    raw.send(request.as_bytes());
    raw.read_to_end()
}

fn assert_status(response: &str, status: u16) {
    assert!(
        response.starts_with(&format!("HTTP/1.1 {status} ")),
        "wanted {status}: {response}"
    );
}

fn send_json(uid: &str, cmid: &str) -> String {
    format!(r#"{{"from_uid":"system","to_uid":"{uid}","client_msg_id":"{cmid}","text":"hi"}}"#)
}

#[test]
fn admin_content_length_values_must_agree() {
    let server = ServerProc::start(&[]);
    let body = send_json("bob", "m1");
    let n = body.len();
    let post =
        |lengths: &str| format!("POST /v1/messages HTTP/1.1\r\nHost: x\r\n{lengths}\r\n{body}");
    // Two different values: a proxy in front may have framed the body by the other one.
    let r = exchange(
        server.admin,
        &post(&format!(
            "Content-Length: {n}\r\nContent-Length: {}\r\n",
            n + 1
        )),
    );
    assert_status(&r, 400);
    assert!(r.contains("Content-Length"), "{r}");
    let r = exchange(
        server.admin,
        &post(&format!("Content-Length: {n}, {}\r\n", n - 1)),
    );
    assert_status(&r, 400);
    // The same value repeated, or listed twice, is one length.
    let r = exchange(
        server.admin,
        &post(&format!("Content-Length: {n}, {n}\r\n")),
    );
    assert_status(&r, 200);
    let r = exchange(
        server.admin,
        &post(&format!("Content-Length: {n}\r\nContent-Length: {n}\r\n")),
    );
    assert_status(&r, 200);
    // Content-Length is 1*DIGIT: no sign.
    let r = exchange(server.admin, &post(&format!("Content-Length: +{n}\r\n")));
    assert_status(&r, 400);
    // A length that overflows head + body is too large, and the server lives on.
    let huge = format!("Content-Length: {}\r\n", u64::MAX);
    assert_status(&exchange(server.admin, &post(&huge)), 413);
    assert_status(&server.admin_request("GET", "/healthz", ""), 200);
}

#[test]
fn admin_transfer_coded_body_gets_501_with_a_json_error() {
    let server = ServerProc::start(&[]);
    let body = send_json("bob", "m1");
    let r = exchange(
        server.admin,
        &format!(
            "POST /v1/messages HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
             {:x}\r\n{body}\r\n0\r\n\r\n",
            body.len()
        ),
    );
    assert_status(&r, 501);
    assert!(r.contains("Content-Type: application/json"), "{r}");
    assert!(r.contains("not supported"), "{r}");
}

#[test]
fn public_get_or_upgrade_with_a_body_is_400() {
    let server = ServerProc::start(&[]);
    let head = "GET / HTTP/1.1\r\nHost: x\r\n";
    assert_status(&exchange(server.addr, &format!("{head}\r\n")), 200);
    assert_status(
        &exchange(server.addr, &format!("{head}Content-Length: 0\r\n\r\n")),
        200,
    );
    for framing in [
        "Content-Length: 5\r\n\r\nhello",
        "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
    ] {
        assert_status(&exchange(server.addr, &format!("{head}{framing}")), 400);
        // An upgrade would otherwise take the body for WebSocket frames.
        let upgrade = format!("GET /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE}{framing}");
        assert_status(&exchange(server.addr, &upgrade), 400);
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn token_with_nbf(uid: &str, nbf: u64, exp: u64) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        nbf: u64,
        exp: u64,
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: uid, nbf, exp },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("sign")
}

fn login(server: &ServerProc, token: String) -> S {
    let mut c = Client::connect(server);
    let id = c.request(C::Login(proto::Login {
        token,
        device_id: "phone".into(),
        last_seq: 0,
    }));
    c.response(id)
}

#[test]
fn login_with_a_token_not_yet_valid_is_refused() {
    let server = ServerProc::start(&[]);
    let now = now_secs();
    match login(&server, token_with_nbf("alice", now + 3600, now + 7200)) {
        S::Error(e) => {
            assert_eq!(e.code, proto::ErrorCode::Unauthenticated as i32);
            assert_eq!(e.message, "token not yet valid");
        }
        other => panic!("logged in with nbf an hour ahead: {other:?}"),
    }
    assert!(matches!(
        login(&server, token_with_nbf("alice", now - 60, now + 3600)),
        S::LoginOk(_)
    ));
}

#[test]
fn admin_bearer_scheme_is_case_insensitive() {
    let server = ServerProc::start(&["--admin-token", "s3cret"]);
    for auth in [
        "bearer s3cret",
        "BEARER s3cret",
        "Bearer    s3cret",
        "bEaReR  s3cret ",
    ] {
        let r = server.admin_request("GET", "/healthz", &format!("Authorization: {auth}\r\n"));
        assert_status(&r, 200);
    }
    for auth in [
        "Bearer s3cre",
        "Basic s3cret",
        "Bearers3cret",
        "bearer",
        "s3cret",
    ] {
        let r = server.admin_request("GET", "/healthz", &format!("Authorization: {auth}\r\n"));
        assert_status(&r, 401);
    }
}

#[test]
fn http11_requests_need_exactly_one_host() {
    let server = ServerProc::start(&[]);
    for (addr, path) in [(server.addr, "/"), (server.admin, "/healthz")] {
        let r = exchange(addr, &format!("GET {path} HTTP/1.1\r\n\r\n"));
        assert_status(&r, 400);
        assert!(r.contains("Host"), "{r}");
        let r = exchange(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
        );
        assert_status(&r, 400);
        assert!(r.contains("Host"), "{r}");
        assert_status(
            &exchange(addr, &format!("GET {path} HTTP/1.1\r\nhost: a\r\n\r\n")),
            200,
        );
    }
    let upgrade = format!("GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n{UPGRADE}\r\n");
    assert_status(&exchange(server.addr, &upgrade), 400);
    // HTTP/1.0 has no Host requirement; the admin API still answers it.
    assert_status(
        &exchange(server.admin, "GET /healthz HTTP/1.0\r\n\r\n"),
        200,
    );
}
