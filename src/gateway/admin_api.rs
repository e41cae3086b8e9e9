//! The admin HTTP API for the app's backend, on `--admin-listen`: routing and answers, sans-IO.
//!
//! One request per connection (`Connection: close`). A request that changes data is answered
//! only after its change is durable; the shell holds the connection until then.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;

use crate::im::auth::MAX_ID_BYTES;
use crate::ws::handshake::{body_framing, check_host, BodyFraming};

/// Largest admin request (head and body) accepted.
pub const MAX_ADMIN_REQUEST: usize = 128 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Make (or remove) a symmetric friendship, then answer 204 once durable.
    SetFriendship { a: String, b: String, present: bool },
    /// Add a user to a group (or remove it), then answer 204 once durable.
    SetMembership {
        gid: String,
        uid: String,
        joined: bool,
    },
    /// Send a message on a user's or the system's behalf, answered once durable.
    Send {
        from_uid: String,
        to: Recipient,
        client_msg_id: String,
        content: Vec<u8>,
    },
    /// Push a signal to the devices online now.
    Signal {
        to: SignalRecipient,
        from_uid: String,
        kind: String,
        payload: Vec<u8>,
    },
    /// A group's members.
    GetGroup { gid: String },
    /// Online devices, max_seq and cursors of a user.
    GetUser { uid: String },
    /// A user's friends and whether each is online.
    GetFriends { uid: String },
    /// The Prometheus/OpenMetrics text exposition.
    Metrics,
    /// Answer right away.
    Respond(Response),
}

/// Who a message goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipient {
    User(String),
    Group(String),
}

/// Who a signal goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalRecipient {
    To(Recipient),
    /// Every online device.
    All,
}

/// `POST /v1/messages` body: exactly one of `to_uid` and `to_group`, and of `content`
/// (base64) and `text`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SendBody {
    from_uid: String,
    to_uid: Option<String>,
    to_group: Option<String>,
    client_msg_id: String,
    content: Option<String>,
    text: Option<String>,
}

/// `POST /v1/signals` body: exactly one of `to_uid`, `to_group` and `"all": true`, and of
/// `payload` (base64) and `text`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalBody {
    to_uid: Option<String>,
    to_group: Option<String>,
    #[serde(default)]
    all: bool,
    #[serde(default)]
    from_uid: String,
    kind: String,
    payload: Option<String>,
    text: Option<String>,
}

fn bad_request(why: &str) -> AdminAction {
    AdminAction::Respond(Response::error(400, why))
}

/// Bytes given as base64 (`b64`) or as text: exactly one of them.
fn bytes_of(b64: Option<String>, text: Option<String>, name: &str) -> Result<Vec<u8>, AdminAction> {
    match (b64, text) {
        (Some(c), None) => BASE64
            .decode(c.as_bytes())
            .map_err(|_| bad_request(&format!("{name} is not base64"))),
        (None, Some(t)) => Ok(t.into_bytes()),
        _ => Err(bad_request(&format!(
            "give exactly one of {name} (base64) and text"
        ))),
    }
}

/// The recipient named by `to_uid` or `to_group`: exactly one of them.
fn recipient(to_uid: Option<String>, to_group: Option<String>) -> Option<Recipient> {
    match (to_uid, to_group) {
        (Some(u), None) => Some(Recipient::User(u)),
        (None, Some(g)) => Some(Recipient::Group(g)),
        _ => None,
    }
}

fn json_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, AdminAction> {
    serde_json::from_slice(body).map_err(|e| bad_request(&format!("bad JSON: {e}")))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// JSON body (or metrics text); empty for 204.
    pub body: String,
    pub content_type: &'static str,
}

impl Response {
    pub fn json(status: u16, body: &serde_json::Value) -> Response {
        Response {
            status,
            body: body.to_string(),
            content_type: "application/json",
        }
    }

    pub fn metrics(text: String) -> Response {
        Response {
            status: 200,
            body: text,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }

    pub fn error(status: u16, message: &str) -> Response {
        Response {
            status,
            body: format!("{{\"error\":{}}}", json_string(message)),
            content_type: "application/json",
        }
    }

    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: String::new(),
            content_type: "application/json",
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            401 => "Unauthorized",
            404 => "Not Found",
            405 => "Method Not Allowed",
            409 => "Conflict",
            408 => "Request Timeout",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            501 => "Not Implemented",
            503 => "Service Unavailable",
            _ => "Internal Server Error",
        };
        let mut head = format!(
            "HTTP/1.1 {} {reason}\r\nConnection: close\r\nCache-Control: no-store\r\n\
             X-Content-Type-Options: nosniff\r\n",
            self.status
        );
        if self.status == 401 {
            head.push_str("WWW-Authenticate: Bearer\r\n");
        }
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: {}\r\nContent-Length: {}\r\n",
                self.content_type,
                self.body.len()
            ));
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend_from_slice(self.body.as_bytes());
        out
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Result of parsing what arrived so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Partial,
    Done(AdminAction),
}

/// Parses and routes one admin request. `token` is `--admin-token`, if set.
pub fn handle(buf: &[u8], token: Option<&str>) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) if buf.len() <= MAX_ADMIN_REQUEST => Parsed::Partial,
        Ok(httparse::Status::Partial) | Err(httparse::Error::TooManyHeaders) => Parsed::Done(
            AdminAction::Respond(Response::error(431, "request too large")),
        ),
        Err(_) => Parsed::Done(AdminAction::Respond(Response::error(400, "malformed HTTP"))),
        Ok(httparse::Status::Complete(head_len)) => {
            let framing = match check_host(req.headers, req.version == Some(1))
                .and_then(|()| body_framing(req.headers))
            {
                Ok(framing) => framing,
                Err(why) => return Parsed::Done(AdminAction::Respond(Response::error(400, why))),
            };
            let authorized = token.is_none_or(|t| {
                req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("authorization")
                        && bearer_credentials(h.value)
                            .is_some_and(|v| constant_time_eq(v, t.as_bytes()))
                })
            });
            if !authorized {
                return Parsed::Done(AdminAction::Respond(Response::error(
                    401,
                    "missing or wrong bearer token",
                )));
            }
            let body_len = match framing {
                BodyFraming::None => 0,
                BodyFraming::Length(n) if n <= MAX_ADMIN_REQUEST.saturating_sub(head_len) => n,
                BodyFraming::Length(_) => {
                    return Parsed::Done(AdminAction::Respond(Response::error(
                        413,
                        "body too large",
                    )))
                }
                BodyFraming::TransferCoded => {
                    return Parsed::Done(AdminAction::Respond(Response::error(
                        501,
                        "Transfer-Encoding (chunked) request bodies are not supported; \
                         send the body with Content-Length",
                    )))
                }
            };
            if buf.len() < head_len + body_len {
                return Parsed::Partial;
            }
            let body = &buf[head_len..head_len + body_len];
            Parsed::Done(route(
                req.method.unwrap_or(""),
                req.path.unwrap_or(""),
                body,
            ))
        }
    }
}

/// The token of an `Authorization: Bearer <token>` value. RFC 9110 §11.1 makes the scheme
/// case-insensitive, and §11.4 separates it from the token by `1*SP`: backends and proxies
/// send `bearer` and extra spaces too.
fn bearer_credentials(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at(value.iter().position(|&b| b == b' ')?);
    let token = &rest[rest.iter().position(|&b| b != b' ')?..];
    scheme.eq_ignore_ascii_case(b"bearer").then_some(token)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn valid(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_ID_BYTES
}

fn method_not_allowed(allowed: &str) -> AdminAction {
    AdminAction::Respond(Response::error(405, &format!("use {allowed}")))
}

fn route(method: &str, target: &str, body: &[u8]) -> AdminAction {
    let path = target.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["metrics"] => match method {
            "GET" => AdminAction::Metrics,
            _ => method_not_allowed("GET"),
        },
        ["healthz"] => match method {
            "GET" => {
                AdminAction::Respond(Response::json(200, &serde_json::json!({"status": "ok"})))
            }
            _ => method_not_allowed("GET"),
        },
        ["v1", "friendships", a, b] => {
            let present = match method {
                "PUT" => true,
                "DELETE" => false,
                _ => return method_not_allowed("PUT or DELETE"),
            };
            if !valid(a) || !valid(b) || a == b {
                return AdminAction::Respond(Response::error(
                    400,
                    "uids must be 1-64 bytes and different",
                ));
            }
            AdminAction::SetFriendship {
                a: (*a).to_owned(),
                b: (*b).to_owned(),
                present,
            }
        }
        ["v1", "users", uid] | ["v1", "users", uid, "friends"] => {
            if method != "GET" {
                return method_not_allowed("GET");
            }
            if !valid(uid) {
                return AdminAction::Respond(Response::error(400, "uid must be 1-64 bytes"));
            }
            let uid = (*uid).to_owned();
            if parts.len() == 3 {
                AdminAction::GetUser { uid }
            } else {
                AdminAction::GetFriends { uid }
            }
        }
        ["v1", "groups", gid, "members", uid] => {
            let joined = match method {
                "PUT" => true,
                "DELETE" => false,
                _ => return method_not_allowed("PUT or DELETE"),
            };
            if !valid(gid) || !valid(uid) {
                return bad_request("group id and uid must be 1-64 bytes");
            }
            AdminAction::SetMembership {
                gid: (*gid).to_owned(),
                uid: (*uid).to_owned(),
                joined,
            }
        }
        ["v1", "groups", gid] => {
            if method != "GET" {
                return method_not_allowed("GET");
            }
            if !valid(gid) {
                return bad_request("group id must be 1-64 bytes");
            }
            AdminAction::GetGroup {
                gid: (*gid).to_owned(),
            }
        }
        ["v1", "messages"] => {
            if method != "POST" {
                return method_not_allowed("POST");
            }
            let b: SendBody = match json_body(body) {
                Ok(b) => b,
                Err(answer) => return answer,
            };
            let content = match bytes_of(b.content, b.text, "content") {
                Ok(c) => c,
                Err(answer) => return answer,
            };
            let Some(to) = recipient(b.to_uid, b.to_group) else {
                return bad_request("give exactly one of to_uid and to_group");
            };
            AdminAction::Send {
                from_uid: b.from_uid,
                to,
                client_msg_id: b.client_msg_id,
                content,
            }
        }
        ["v1", "signals"] => {
            if method != "POST" {
                return method_not_allowed("POST");
            }
            let b: SignalBody = match json_body(body) {
                Ok(b) => b,
                Err(answer) => return answer,
            };
            let payload = match bytes_of(b.payload, b.text, "payload") {
                Ok(p) => p,
                Err(answer) => return answer,
            };
            let to = match (recipient(b.to_uid.clone(), b.to_group.clone()), b.all) {
                (Some(to), false) => SignalRecipient::To(to),
                (None, true) if b.to_uid.is_none() && b.to_group.is_none() => SignalRecipient::All,
                _ => return bad_request("give exactly one of to_uid, to_group and \"all\": true"),
            };
            AdminAction::Signal {
                to,
                from_uid: b.from_uid,
                kind: b.kind,
                payload,
            }
        }
        _ => AdminAction::Respond(Response::error(404, "no such route")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn action(req: &str, token: Option<&str>) -> AdminAction {
        match handle(req.as_bytes(), token) {
            Parsed::Done(a) => a,
            Parsed::Partial => panic!("partial"),
        }
    }

    fn status(req: &str, token: Option<&str>) -> u16 {
        match action(req, token) {
            AdminAction::Respond(r) => r.status,
            _ => 0,
        }
    }

    #[test]
    fn friendship_routes() {
        assert_eq!(
            action(
                "PUT /v1/friendships/alice/bob HTTP/1.1\r\nHost: x\r\n\r\n",
                None
            ),
            AdminAction::SetFriendship {
                a: "alice".into(),
                b: "bob".into(),
                present: true
            }
        );
        assert_eq!(
            action(
                "DELETE /v1/friendships/alice/bob HTTP/1.1\r\nHost: x\r\n\r\n",
                None
            ),
            AdminAction::SetFriendship {
                a: "alice".into(),
                b: "bob".into(),
                present: false
            }
        );
        assert_eq!(
            status("GET /v1/friendships/a/b HTTP/1.1\r\nHost: x\r\n\r\n", None),
            405
        );
        assert_eq!(
            status("PUT /v1/friendships/a/a HTTP/1.1\r\nHost: x\r\n\r\n", None),
            400
        );
        assert_eq!(
            status("PUT /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n", None),
            404
        );
        assert_eq!(status("garbage\r\n\r\n", None), 400);
        assert_eq!(handle(b"PUT /v1/friend", None), Parsed::Partial);
    }

    #[test]
    fn user_routes_health_and_messages() {
        assert_eq!(
            action("GET /v1/users/alice HTTP/1.1\r\nHost: x\r\n\r\n", None),
            AdminAction::GetUser {
                uid: "alice".into()
            }
        );
        assert_eq!(
            action(
                "GET /v1/users/alice/friends HTTP/1.1\r\nHost: x\r\n\r\n",
                None
            ),
            AdminAction::GetFriends {
                uid: "alice".into()
            }
        );
        assert_eq!(
            status("POST /v1/users/alice HTTP/1.1\r\nHost: x\r\n\r\n", None),
            405
        );
        assert_eq!(
            status("GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", None),
            200
        );
        let post = |body: &str| {
            format!(
                "POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        assert_eq!(
            action(
                &post(r#"{"from_uid":"sys","to_uid":"bob","client_msg_id":"x","text":"hi"}"#),
                None
            ),
            AdminAction::Send {
                from_uid: "sys".into(),
                to: Recipient::User("bob".into()),
                client_msg_id: "x".into(),
                content: b"hi".to_vec()
            }
        );
        assert_eq!(
            action(
                &post(r#"{"from_uid":"sys","to_group":"g","client_msg_id":"x","text":"hi"}"#),
                None
            ),
            AdminAction::Send {
                from_uid: "sys".into(),
                to: Recipient::Group("g".into()),
                client_msg_id: "x".into(),
                content: b"hi".to_vec()
            }
        );
        assert!(matches!(
            action(&post(r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x","content":"aGk="}"#), None),
            AdminAction::Send { content, .. } if content == b"hi"
        ));
        for bad in [
            "{not json",
            r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x"}"#,
            r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x","text":"t","content":"aGk="}"#,
            r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x","content":"!!"}"#,
            r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x","text":"t","extra":1}"#,
            r#"{"from_uid":"a","client_msg_id":"x","text":"t"}"#,
            r#"{"from_uid":"a","to_uid":"b","to_group":"g","client_msg_id":"x","text":"t"}"#,
        ] {
            assert_eq!(status(&post(bad), None), 400, "{bad}");
        }
        assert_eq!(
            status("GET /v1/messages HTTP/1.1\r\nHost: x\r\n\r\n", None),
            405
        );
        // The body may arrive after the head.
        let full = post(r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x","text":"t"}"#);
        assert_eq!(
            handle(&full.as_bytes()[..full.len() - 3], None),
            Parsed::Partial
        );
    }

    #[test]
    fn group_and_signal_routes() {
        let req = |m: &str, path: &str| format!("{m} {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        for (m, joined) in [("PUT", true), ("DELETE", false)] {
            assert_eq!(
                action(&req(m, "/v1/groups/g1/members/alice"), None),
                AdminAction::SetMembership {
                    gid: "g1".into(),
                    uid: "alice".into(),
                    joined
                }
            );
        }
        assert_eq!(
            status(&req("POST", "/v1/groups/g1/members/alice"), None),
            405
        );
        let long = "g".repeat(65);
        assert_eq!(
            status(&req("PUT", &format!("/v1/groups/{long}/members/a")), None),
            400
        );
        assert_eq!(
            action(&req("GET", "/v1/groups/g1"), None),
            AdminAction::GetGroup { gid: "g1".into() }
        );
        assert_eq!(status(&req("DELETE", "/v1/groups/g1"), None), 405);
        let post = |body: &str| {
            format!(
                "POST /v1/signals HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        assert_eq!(
            action(
                &post(r#"{"to_group":"g","kind":"typing","text":"1"}"#),
                None
            ),
            AdminAction::Signal {
                to: SignalRecipient::To(Recipient::Group("g".into())),
                from_uid: String::new(),
                kind: "typing".into(),
                payload: b"1".to_vec(),
            }
        );
        assert_eq!(
            action(
                &post(r#"{"all":true,"from_uid":"ops","kind":"k","payload":"aGk="}"#),
                None
            ),
            AdminAction::Signal {
                to: SignalRecipient::All,
                from_uid: "ops".into(),
                kind: "k".into(),
                payload: b"hi".to_vec(),
            }
        );
        for bad in [
            r#"{"kind":"k","text":"t"}"#,
            r#"{"all":true,"to_uid":"a","kind":"k","text":"t"}"#,
            r#"{"to_uid":"a","to_group":"g","kind":"k","text":"t"}"#,
            r#"{"to_uid":"a","kind":"k"}"#,
            r#"{"to_uid":"a","kind":"k","payload":"!!"}"#,
            r#"{"to_uid":"a","text":"t"}"#,
        ] {
            assert_eq!(status(&post(bad), None), 400, "{bad}");
        }
    }

    #[test]
    fn a_signal_to_all_names_no_user_and_no_group() {
        let post = |body: &str| {
            format!(
                "POST /v1/signals HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
        };
        for bad in [
            r#"{"all":true,"to_uid":"a","to_group":"g","kind":"k","text":"t"}"#,
            r#"{"all":true,"to_group":"g","kind":"k","text":"t"}"#,
        ] {
            assert_eq!(status(&post(bad), None), 400, "{bad}");
        }
    }

    #[test]
    fn content_length_values_must_agree() {
        let body = r#"{"from_uid":"a","to_uid":"b","client_msg_id":"x","text":"t"}"#;
        let n = body.len();
        let post = |lengths: String| {
            format!("POST /v1/messages HTTP/1.1\r\nHost: x\r\n{lengths}\r\n{body}")
        };
        for same in [
            format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"),
            format!("Content-Length: {n}, {n}\r\n"),
            format!("Content-Length: {n}\r\ncontent-length: {n} , {n}\r\n"),
        ] {
            assert!(
                matches!(action(&post(same.clone()), None), AdminAction::Send { .. }),
                "{same}"
            );
        }
        for bad in [
            format!("Content-Length: {n}\r\nContent-Length: {}\r\n", n - 1),
            format!("Content-Length: {}\r\nContent-Length: {n}\r\n", n + 1),
            format!("Content-Length: {n}, {}\r\n", n - 1),
            format!("Content-Length: +{n}\r\n"),
            format!("Content-Length: {n},\r\n"),
            "Content-Length: \r\n".to_owned(),
            "Content-Length: 0x10\r\n".to_owned(),
        ] {
            assert_eq!(status(&post(bad.clone()), None), 400, "{bad}");
        }
        // A length near usize::MAX must not overflow the size check.
        let huge = format!("Content-Length: {}\r\n", usize::MAX);
        assert_eq!(status(&post(huge), None), 413);
    }

    #[test]
    fn transfer_coded_bodies_get_501_with_a_json_error() {
        for te in [
            "Transfer-Encoding: chunked\r\n",
            "transfer-encoding: gzip, chunked\r\n",
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        ] {
            let req =
                format!("POST /v1/messages HTTP/1.1\r\nHost: x\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n");
            match action(&req, None) {
                AdminAction::Respond(r) => {
                    assert_eq!(r.status, 501, "{te}");
                    assert_eq!(r.content_type, "application/json");
                    assert!(r.body.contains("not supported"), "{}", r.body);
                    let bytes = String::from_utf8(r.to_bytes()).unwrap();
                    assert!(bytes.starts_with("HTTP/1.1 501 Not Implemented\r\n"));
                }
                a => panic!("{te}: {a:?}"),
            }
        }
    }

    #[test]
    fn bearer_token() {
        let req =
            "PUT /v1/friendships/a/b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(status(req, Some("s3cret")), 0);
        assert_eq!(status(req, Some("other")), 401);
        assert_eq!(
            status(
                "PUT /v1/friendships/a/b HTTP/1.1\r\nHost: x\r\n\r\n",
                Some("s3cret")
            ),
            401
        );
        // The scheme is case-insensitive and 1*SP separates it from the token.
        for value in [
            "bearer s3cret",
            "BEARER s3cret",
            "Bearer   s3cret",
            " bEaReR  s3cret ",
        ] {
            let req = format!(
                "PUT /v1/friendships/a/b HTTP/1.1\r\nHost: x\r\nAuthorization: {value}\r\n\r\n"
            );
            assert_eq!(status(&req, Some("s3cret")), 0, "{value}");
        }
        for value in [
            "Bearer s3cre",
            "Bearer s3cret2",
            "Bearers3cret",
            "Bearer\ts3cret",
            "Basic s3cret",
            "Bearer",
            "Bearer ",
            "s3cret",
            "Bearer s3cret extra",
        ] {
            let req = format!(
                "PUT /v1/friendships/a/b HTTP/1.1\r\nHost: x\r\nAuthorization: {value}\r\n\r\n"
            );
            assert_eq!(status(&req, Some("s3cret")), 401, "{value}");
        }
        let r = Response::error(401, "x").to_bytes();
        assert!(String::from_utf8(r)
            .unwrap()
            .contains("WWW-Authenticate: Bearer"));
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        for (req, why) in [
            ("GET /healthz HTTP/1.1\r\n\r\n", "missing Host header"),
            (
                "GET /healthz HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
                "more than one Host header",
            ),
            (
                "GET /healthz HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
                "more than one Host header",
            ),
        ] {
            match action(req, None) {
                AdminAction::Respond(r) => {
                    assert_eq!(r.status, 400, "{req}");
                    assert!(r.body.contains(why), "{req}: {}", r.body);
                }
                a => panic!("{req}: {a:?}"),
            }
        }
        // Refused before the token is looked at, like any other malformed request.
        assert_eq!(status("GET /healthz HTTP/1.1\r\n\r\n", Some("t")), 400);
        assert_eq!(
            status("GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n", None),
            200
        );
        // HTTP/1.0 has no Host requirement.
        assert_eq!(status("GET /healthz HTTP/1.0\r\n\r\n", None), 200);
    }

    #[test]
    fn error_bodies_are_json() {
        match action("PUT /x HTTP/1.1\r\nHost: x\r\n\r\n", None) {
            AdminAction::Respond(r) => assert_eq!(r.body, "{\"error\":\"no such route\"}"),
            a => panic!("{a:?}"),
        }
        assert_eq!(json_string("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
