//! The admin HTTP API for the app's backend, on `--admin-listen`: routing and answers, sans-IO.
//!
//! One request per connection (`Connection: close`). A request that changes data is answered
//! only after its change is durable; the shell holds the connection until then.

use crate::im::auth::MAX_ID_BYTES;

/// Largest admin request head accepted.
pub const MAX_ADMIN_REQUEST: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Make (or remove) a symmetric friendship, then answer 204 once durable.
    SetFriendship { a: String, b: String, present: bool },
    /// Answer right away.
    Respond(Response),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// JSON body; empty for 204.
    pub body: String,
}

impl Response {
    fn error(status: u16, message: &str) -> Response {
        Response {
            status,
            body: format!("{{\"error\":{}}}", json_string(message)),
        }
    }

    pub fn no_content() -> Response {
        Response {
            status: 204,
            body: String::new(),
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
            431 => "Request Header Fields Too Large",
            _ => "Internal Server Error",
        };
        let mut head = format!("HTTP/1.1 {} {reason}\r\nConnection: close\r\n", self.status);
        if self.status == 401 {
            head.push_str("WWW-Authenticate: Bearer\r\n");
        }
        if self.status != 204 {
            head.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
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
        Ok(httparse::Status::Complete(_)) => {
            let authorized = token.is_none_or(|t| {
                req.headers.iter().any(|h| {
                    h.name.eq_ignore_ascii_case("authorization")
                        && std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().strip_prefix("Bearer "))
                            .is_some_and(|v| constant_time_eq(v.trim().as_bytes(), t.as_bytes()))
                })
            });
            if !authorized {
                return Parsed::Done(AdminAction::Respond(Response::error(
                    401,
                    "missing or wrong bearer token",
                )));
            }
            Parsed::Done(route(req.method.unwrap_or(""), req.path.unwrap_or("")))
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn route(method: &str, target: &str) -> AdminAction {
    let path = target.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["v1", "friendships", a, b] => {
            let present = match method {
                "PUT" => true,
                "DELETE" => false,
                _ => {
                    return AdminAction::Respond(Response::error(
                        405,
                        "use PUT or DELETE on /v1/friendships/{a}/{b}",
                    ))
                }
            };
            let valid = |s: &str| !s.is_empty() && s.len() <= MAX_ID_BYTES;
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
            AdminAction::SetFriendship { .. } => 0,
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
            action("DELETE /v1/friendships/alice/bob HTTP/1.1\r\n\r\n", None),
            AdminAction::SetFriendship {
                a: "alice".into(),
                b: "bob".into(),
                present: false
            }
        );
        assert_eq!(
            status("GET /v1/friendships/a/b HTTP/1.1\r\n\r\n", None),
            405
        );
        assert_eq!(
            status("PUT /v1/friendships/a/a HTTP/1.1\r\n\r\n", None),
            400
        );
        assert_eq!(status("PUT /v1/nope HTTP/1.1\r\n\r\n", None), 404);
        assert_eq!(status("garbage\r\n\r\n", None), 400);
        assert_eq!(handle(b"PUT /v1/friend", None), Parsed::Partial);
    }

    #[test]
    fn bearer_token() {
        let req = "PUT /v1/friendships/a/b HTTP/1.1\r\nAuthorization: Bearer s3cret\r\n\r\n";
        assert_eq!(status(req, Some("s3cret")), 0);
        assert_eq!(status(req, Some("other")), 401);
        assert_eq!(
            status("PUT /v1/friendships/a/b HTTP/1.1\r\n\r\n", Some("s3cret")),
            401
        );
        let r = Response::error(401, "x").to_bytes();
        assert!(String::from_utf8(r)
            .unwrap()
            .contains("WWW-Authenticate: Bearer"));
    }

    #[test]
    fn error_bodies_are_json() {
        match action("PUT /x HTTP/1.1\r\n\r\n", None) {
            AdminAction::Respond(r) => assert_eq!(r.body, "{\"error\":\"no such route\"}"),
            a => panic!("{a:?}"),
        }
        assert_eq!(json_string("a\"b\\\n"), "\"a\\\"b\\\\\\u000a\"");
    }
}
