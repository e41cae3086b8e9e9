//! The admin API's request parser and router. On arbitrary bytes it never panics, says
//! "partial" only while a request could still fit, and every answer it gives carries a
//! status the README's admin API table documents, with a JSON error body. A complete
//! request built from the input (any method, path, token and body, with a correct
//! Content-Length) always gets a verdict, the same one whatever follows it, and no prefix of
//! it gets a different one.
#![no_main]

use imgate::gateway::admin_api::{self as admin, AdminAction, Parsed, MAX_ADMIN_REQUEST};
use libfuzzer_sys::fuzz_target;

const TOKEN: &str = "fuzz-token";

/// The statuses `handle` may answer with itself (204 comes with a durable friendship or
/// membership, 409 from the core, 408 and 503 from the shell).
const DOCUMENTED: [u16; 8] = [200, 400, 401, 404, 405, 413, 431, 501];

fn check(buf: &[u8], token: Option<&str>) -> Parsed {
    let parsed = admin::handle(buf, token);
    match &parsed {
        Parsed::Partial => assert!(buf.len() <= MAX_ADMIN_REQUEST),
        Parsed::Done(AdminAction::Respond(r)) => {
            assert!(DOCUMENTED.contains(&r.status), "undocumented {}", r.status);
            let bytes = r.to_bytes();
            assert!(bytes.starts_with(format!("HTTP/1.1 {} ", r.status).as_bytes()));
            if r.status != 200 {
                let body: serde_json::Value =
                    serde_json::from_str(&r.body).expect("an error body is JSON");
                assert!(body["error"].is_string(), "{}", r.body);
            }
        }
        Parsed::Done(AdminAction::SetFriendship { a, b, .. }) => {
            assert!(valid(a) && valid(b) && a != b, "{a:?} {b:?}");
        }
        Parsed::Done(AdminAction::GetUser { uid } | AdminAction::GetFriends { uid }) => {
            assert!(valid(uid), "{uid:?}");
        }
        Parsed::Done(AdminAction::SetMembership { gid, uid, .. }) => {
            assert!(valid(gid) && valid(uid), "{gid:?} {uid:?}");
        }
        Parsed::Done(AdminAction::GetGroup { gid }) => assert!(valid(gid), "{gid:?}"),
        Parsed::Done(
            AdminAction::Send { .. } | AdminAction::Signal { .. } | AdminAction::Metrics,
        ) => {}
    }
    parsed
}

fn valid(uid: &str) -> bool {
    !uid.is_empty() && uid.len() <= imgate::im::auth::MAX_ID_BYTES
}

fuzz_target!(|data: &[u8]| {
    for token in [None, Some(TOKEN)] {
        check(data, token);
    }
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    // The rest is the path, a space-free line, then the body.
    let (path, body) = match rest.iter().position(|&b| b == b'\n') {
        Some(n) => (&rest[..n], &rest[n + 1..]),
        None => (rest, &b""[..]),
    };
    let method = ["GET", "PUT", "DELETE", "POST", "PATCH"][usize::from(flags % 5)];
    let mut req = format!("{method} /").into_bytes();
    req.extend(path.iter().filter(|b| b.is_ascii_graphic()));
    req.extend_from_slice(b" HTTP/1.1\r\nHost: admin\r\n");
    if flags & 0x10 != 0 {
        req.extend_from_slice(format!("Authorization: Bearer {TOKEN}\r\n").as_bytes());
    }
    if flags & 0x20 != 0 || !body.is_empty() {
        req.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    req.extend_from_slice(b"\r\n");
    let head_len = req.len();
    req.extend_from_slice(body);
    let token = (flags & 0x40 != 0).then_some(TOKEN);
    let verdict = check(&req, token);
    assert!(verdict != Parsed::Partial, "a complete request is partial");
    let mut longer = req.clone();
    longer.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(
        check(&longer, token),
        verdict,
        "bytes after the request count"
    );
    for cut in head_len..req.len().min(head_len + 64) {
        let early = check(&req[..cut], token);
        assert!(
            early == Parsed::Partial || early == verdict,
            "a prefix of {cut} bytes gets {early:?}, the request {verdict:?}"
        );
    }
});
