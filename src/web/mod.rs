//! The web demo on the public listener: plain `GET` requests that are not WebSocket upgrades.
//!
//! Sans-IO: a request goes in, an [`AdminAction`] comes out, answered by the same shell code as
//! the admin API. The static files are compiled into the binary. The `/dev/*` routes stand in
//! for an app's backend (they issue tokens for any uid, make friendships and add members to
//! groups), so they exist only when the server runs with `--dev`; without it they are 404 like
//! any unknown path.

use crate::gateway::admin_api::{AdminAction, Response};
use crate::im::auth;
use crate::ws::handshake::PlainRequest;

const INDEX_HTML: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE_CSS: &str = include_str!("style.css");

/// How long a dev token is valid.
pub const DEV_TOKEN_TTL_SECS: u64 = 24 * 3600;

/// Routes one plain GET. `dev_secret` is the JWT secret when `--dev` is on, else `None`;
/// `unix_ms` is the wall clock, for the expiry of dev tokens.
pub fn route(req: &PlainRequest, dev_secret: Option<&[u8]>, unix_ms: i64) -> AdminAction {
    let asset = |content_type, body: &str| {
        AdminAction::Respond(Response {
            status: 200,
            body: body.to_owned(),
            content_type,
        })
    };
    match req.path.as_str() {
        "/" | "/index.html" => asset("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "/style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        "/dev/config" => {
            // Lets the page tell a --dev server (log in by name) from a production one (paste
            // a token) without a failed request in the console.
            let body = serde_json::json!({"dev": dev_secret.is_some()});
            AdminAction::Respond(Response::json(200, &body))
        }
        path => match (path.strip_prefix("/dev/"), dev_secret) {
            (Some(route), Some(secret)) => dev_route(route, &req.query, secret, unix_ms),
            _ => AdminAction::Respond(Response::error(404, "no such page")),
        },
    }
}

fn dev_route(route: &str, query: &str, secret: &[u8], unix_ms: i64) -> AdminAction {
    let uid = match demo_uid(query, "uid") {
        Ok(uid) => uid,
        Err(r) => return AdminAction::Respond(r),
    };
    match route {
        "token" => {
            let exp = (unix_ms.max(0) as u64) / 1000 + DEV_TOKEN_TTL_SECS;
            let body = serde_json::json!({
                "uid": uid,
                "token": auth::issue(secret, &uid, exp),
                "exp": exp,
            });
            AdminAction::Respond(Response::json(200, &body))
        }
        "friends" => AdminAction::GetFriends { uid },
        "befriend" => match demo_uid(query, "friend") {
            Ok(friend) if friend != uid => AdminAction::SetFriendship {
                a: uid,
                b: friend,
                present: true,
            },
            Ok(_) => AdminAction::Respond(Response::error(400, "a user cannot befriend itself")),
            Err(r) => AdminAction::Respond(r),
        },
        // Adds `uid` to group `group` (which exists from its first member on); answered 204
        // once durable, like a backend's PUT /v1/groups/{gid}/members/{uid}.
        "join" => match demo_uid(query, "group") {
            Ok(gid) => AdminAction::SetMembership {
                gid,
                uid,
                joined: true,
            },
            Err(r) => AdminAction::Respond(r),
        },
        _ => AdminAction::Respond(Response::error(404, "no such page")),
    }
}

/// The query parameter `name`, which must be a demo uid: 1-64 of `A-Z a-z 0-9 . _ -`. The
/// restriction keeps the dev routes free of percent-decoding; real uids come from the app's
/// backend and may be any 1-64 bytes.
fn demo_uid(query: &str, name: &str) -> Result<String, Response> {
    let value = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
        .unwrap_or("");
    let ok = !value.is_empty()
        && value.len() <= auth::MAX_ID_BYTES
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(value.to_owned())
    } else {
        Err(Response::error(
            400,
            &format!("{name} must be 1-64 of A-Z a-z 0-9 . _ -"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(target: &str) -> PlainRequest {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        PlainRequest {
            path: path.to_owned(),
            query: query.to_owned(),
        }
    }

    fn status(a: &AdminAction) -> u16 {
        match a {
            AdminAction::Respond(r) => r.status,
            other => panic!("expected a response, got {other:?}"),
        }
    }

    #[test]
    fn serves_the_static_files_with_their_types() {
        for (path, ty, needle) in [
            ("/", "text/html", "<html"),
            ("/index.html", "text/html", "app.js"),
            ("/app.js", "text/javascript", "imgate.v1.json"),
            ("/style.css", "text/css", "{"),
        ] {
            let AdminAction::Respond(r) = route(&get(path), None, 0) else {
                panic!("{path}: not a response");
            };
            assert_eq!(r.status, 200, "{path}");
            assert!(r.content_type.starts_with(ty), "{path}: {}", r.content_type);
            assert!(r.body.contains(needle), "{path}");
        }
        assert_eq!(status(&route(&get("/nope"), None, 0)), 404);
    }

    #[test]
    fn dev_routes_exist_only_with_dev() {
        for path in [
            "/dev/token?uid=alice",
            "/dev/friends?uid=alice",
            "/dev/join?uid=alice&group=crew",
        ] {
            assert_eq!(status(&route(&get(path), None, 0)), 404, "{path}");
        }
        let AdminAction::Respond(r) = route(&get("/dev/config"), None, 0) else {
            panic!()
        };
        assert_eq!(r.body, r#"{"dev":false}"#);
    }

    #[test]
    fn dev_token_is_valid_for_the_uid_for_a_day() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let now_ms = 1_700_000_000_000;
        let AdminAction::Respond(r) = route(&get("/dev/token?x=1&uid=alice"), Some(secret), now_ms)
        else {
            panic!()
        };
        assert_eq!(r.status, 200);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        let token = v["token"].as_str().unwrap();
        let verifier = auth::Verifier::new(secret);
        let now = (now_ms / 1000) as u64;
        assert_eq!(verifier.verify(token, now), Ok("alice".to_owned()));
        assert!(verifier.verify(token, now + DEV_TOKEN_TTL_SECS).is_err());
    }

    #[test]
    fn dev_friend_routes_map_to_admin_actions_and_check_uids() {
        let s = Some(&b"secret"[..]);
        assert_eq!(
            route(&get("/dev/befriend?uid=alice&friend=bob"), s, 0),
            AdminAction::SetFriendship {
                a: "alice".into(),
                b: "bob".into(),
                present: true
            }
        );
        assert_eq!(
            route(&get("/dev/friends?uid=bob"), s, 0),
            AdminAction::GetFriends { uid: "bob".into() }
        );
        for bad in [
            "/dev/token",
            "/dev/token?uid=",
            "/dev/token?uid=a%20b",
            "/dev/befriend?uid=alice&friend=alice",
            "/dev/befriend?uid=alice",
        ] {
            assert_eq!(status(&route(&get(bad), s, 0)), 400, "{bad}");
        }
        let long = format!("/dev/token?uid={}", "a".repeat(65));
        assert_eq!(status(&route(&get(&long), s, 0)), 400);
        assert_eq!(status(&route(&get("/dev/other?uid=a"), s, 0)), 404);
    }

    #[test]
    fn dev_join_maps_to_set_membership_and_checks_both_ids() {
        let s = Some(&b"secret"[..]);
        assert_eq!(
            route(&get("/dev/join?group=crew&uid=frank"), s, 0),
            AdminAction::SetMembership {
                gid: "crew".into(),
                uid: "frank".into(),
                joined: true
            }
        );
        let long = format!("/dev/join?uid=erin&group={}", "g".repeat(65));
        for bad in [
            "/dev/join",
            "/dev/join?group=crew",
            "/dev/join?uid=erin",
            "/dev/join?uid=erin&group=",
            "/dev/join?uid=erin&group=a%20b",
            "/dev/join?uid=a/b&group=crew",
            &long,
        ] {
            assert_eq!(status(&route(&get(bad), s, 0)), 400, "{bad}");
        }
    }
}
