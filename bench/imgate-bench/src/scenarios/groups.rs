//! Groups made through the server's admin API, for the scenarios that send group messages
//! (fanout, chaos): G disjoint groups of M members, every membership PUT answered 204 (once
//! durable), every group read back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::im;
use crate::verify::Groups;

/// Membership requests in flight at once (the server's default admin connection limit is 64).
const ADMIN_CONNS: usize = 8;

/// Where the admin API is, and its bearer token if the server has one.
#[derive(Debug, Clone)]
pub struct AdminApi {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

/// `groups` disjoint groups of `members` users: group g holds users g*M .. (g+1)*M, and its
/// id is `{prefix}{tag}{G}x{M}g{g}` (the tag names the scenario, the shape keeps runs of
/// other shapes in one data directory apart).
pub fn disjoint(prefix: &str, tag: &str, groups: u32, members: u32) -> Groups {
    let ids = (0..groups)
        .map(|g| im::group_id(prefix, tag, groups, members, g))
        .collect();
    let members = (0..groups)
        .map(|g| (g * members..(g + 1) * members).collect())
        .collect();
    Groups::new(ids, members).unwrap_or_else(|e| unreachable!("disjoint by construction: {e}"))
}

/// Puts every member into its group through the admin API (each PUT answered 204 once
/// durable), several requests at once, then reads every group back: it must hold exactly
/// the run's members.
pub fn make(
    api: &AdminApi,
    prefix: &str,
    groups: &Groups,
    deadline: Instant,
) -> Result<(), String> {
    let p = prefix;
    let puts: Vec<String> = (0..groups.ids.len())
        .flat_map(|g| {
            groups.members[g]
                .iter()
                .map(move |&u| format!("/v1/groups/{}/members/{}", groups.ids[g], im::uid(p, u)))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|sc| {
        for _ in 0..ADMIN_CONNS.min(puts.len()) {
            sc.spawn(|| loop {
                if failure.lock().map_or(true, |f| f.is_some()) {
                    return;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(path) = puts.get(i) else {
                    return;
                };
                let r = request(api, "PUT", path, deadline).and_then(|(status, body)| {
                    if status == 204 {
                        Ok(())
                    } else {
                        Err(format!("PUT {path}: HTTP {status} {body}"))
                    }
                });
                if let Err(e) = r {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                    return;
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    for (g, id) in groups.ids.iter().enumerate() {
        let path = format!("/v1/groups/{id}");
        let (status, body) = request(api, "GET", &path, deadline)?;
        if status != 200 {
            return Err(format!("GET {path}: HTTP {status} {body}"));
        }
        let v: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}: {body}"))?;
        let mut got: Vec<String> = v["members"]
            .as_array()
            .ok_or_else(|| format!("GET {path}: no members in {body}"))?
            .iter()
            .filter_map(|m| m.as_str().map(str::to_owned))
            .collect();
        let mut want: Vec<String> = groups.members[g].iter().map(|&u| im::uid(p, u)).collect();
        got.sort();
        want.sort();
        if got != want {
            return Err(format!(
                "group {id} has {} members, not the run's {} (left over from another run? use another --uid-prefix)",
                got.len(),
                want.len()
            ));
        }
    }
    Ok(())
}

/// One admin request on its own connection (the admin API answers one per connection);
/// 503 (too many admin connections) is retried until `deadline`. Returns status and body.
pub fn request(
    api: &AdminApi,
    method: &str,
    path: &str,
    deadline: Instant,
) -> Result<(u16, String), String> {
    loop {
        let r = request_once(api.addr, api.token.as_deref(), method, path, deadline);
        match r {
            Ok((503, _)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn request_once(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    deadline: Instant,
) -> Result<(u16, String), String> {
    let err = |e: std::io::Error| format!("{method} {path} to the admin API at {addr}: {e}");
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    let mut s = TcpStream::connect_timeout(&addr, left).map_err(err)?;
    s.set_read_timeout(Some(left)).map_err(err)?;
    s.set_write_timeout(Some(left)).map_err(err)?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).map_err(err)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).map_err(err)?;
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{method} {path}: not an HTTP answer: {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .trim()
        .to_owned();
    Ok((status, body))
}
