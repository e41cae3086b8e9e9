//! `fanout`: G disjoint groups of M members (each a user online on one device), made
//! through the admin API before the load starts; then group messages from the members in
//! turn at a total rate (open loop) or with K sends in flight per sending member (closed
//! loop). Every member's device checks its own inbox stream as relay does: strictly
//! increasing seqs without gaps (the seq of its own group send, which it is not sent, it
//! learns from its SendOk) or duplicates, every field and the content as sent, the group_id
//! its own group's; and the ledger checks that every message that got a SendOk reached
//! every other member exactly once. Reports sends/s, send-to-deliver latency and two
//! deliveries/s (messages delivered to devices): `delivered_per_s`, the deliveries of what
//! the measured window sent (whenever they arrived), and `arrived_per_s`, the deliveries
//! that arrived within it; they differ when the server falls behind the offered rate.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::client::{Fleet, Traffic};
use crate::coord::{child_result, run_children, secs_between, Coord, Snap};
use crate::report::{add_cpu, add_errors, add_latency, Report};
use crate::scenarios::{
    barrier, decide_procs, fd_room, final_sync, fleet_cfg, merge_parts, parse_parts, run_for,
    run_until, setup, share, Part,
};
use crate::sys::mono_ns;
use crate::verify::Groups;
use crate::{im, FanoutArgs};

/// Membership requests in flight at once (the server's default admin connection limit is 64).
const ADMIN_CONNS: usize = 8;

pub fn run(a: FanoutArgs) -> Result<ExitCode, String> {
    let s = setup(&a.common)?;
    if a.groups == 0 || a.members < 2 {
        return Err("fanout needs at least 1 group of at least 2 members".into());
    }
    crate::check_loopback(&a.admin)?;
    let users = a
        .groups
        .checked_mul(a.members)
        .filter(|&n| n < crate::verify::GROUP_BASE)
        .ok_or("--groups x --members is too large")?;
    let conns = u64::from(users);
    let groups = groups_of(&a);
    if s.child.is_none() {
        let t0 = Instant::now();
        make_groups(&a, &groups)?;
        if !a.common.quiet {
            eprintln!(
                "imgate-bench fanout: {} groups of {} members made in {:.2} s",
                a.groups,
                a.members,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let procs = decide_procs(conns, a.procs, s.nofile);
    if s.child.is_none() && procs > 1 {
        let limit = Duration::from_secs_f64(
            a.common.setup_timeout + a.warmup + a.duration + 2.0 * a.drain + 120.0,
        );
        let (values, snaps) = run_children(
            "fanout",
            procs,
            s.run_id,
            a.common.server_pid,
            limit,
            a.common.quiet,
        )?;
        let parts = parse_parts(values)?;
        return Ok(report(&a, &parts, &snaps, procs));
    }
    let mut coord = match s.child {
        Some(_) => Coord::child(),
        None => Coord::local("fanout", a.common.server_pid, a.common.quiet),
    };
    let mut cfg = fleet_cfg(&a.common, &s, a.size)?;
    cfg.ack_every = a.ack_every.max(1);
    cfg.ack_tick_ms = a.ack_tick_ms.max(1);
    if let Some(k) = a.inject {
        cfg.inject = Some((k, a.inject_every.max(1)));
    }
    let (lo, hi) = share(users, s.child);
    let mut fleet = Fleet::new(cfg, vec![1; users as usize], conns as usize)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    fleet.set_groups(groups);
    // Member j of every group, then member j + 1 of every group...: sending in turn then
    // goes from group to group.
    let senders = a.senders.unwrap_or(a.members).min(a.members);
    for j in 0..a.members {
        for g in 0..a.groups {
            let u = g * a.members + j;
            if (lo..hi).contains(&u) {
                fleet.add(u, 0, u, j < senders);
            }
        }
    }
    let mine = fleet.clients.len() as u64;
    if mine > fd_room(s.nofile) {
        eprintln!(
            "imgate-bench fanout: {mine} connections in one process exceed its file limit ({}); use --procs",
            s.nofile
        );
    }
    fleet.bring_online(0..mine as usize);
    let deadline = Instant::now() + Duration::from_secs_f64(a.common.setup_timeout);
    run_until(
        &mut fleet,
        &mut coord,
        "connect",
        deadline,
        Duration::from_millis(20),
        |f| f.setting_up() == 0,
    )?;
    if fleet.setting_up() > 0 {
        fleet.stats.error("timeout:setup");
        fleet.paused = true;
    }
    barrier(&mut fleet, &mut coord, "up")?;

    let tick = Duration::from_millis(10);
    let all_senders = u64::from(senders) * u64::from(a.groups);
    fleet.traffic = match a.inflight {
        Some(k) => Traffic::Inflight(k.max(1)),
        None => Traffic::Rate {
            per_s: a.rate.unwrap_or(100.0) * fleet.senders.len() as f64 / all_senders.max(1) as f64,
            t0_ns: mono_ns(),
            done: 0,
        },
    };
    fleet.top_up_all();
    run_for(&mut fleet, &mut coord, "warmup", a.warmup, tick)?;
    barrier(&mut fleet, &mut coord, "measure")?;
    fleet.measure_from = Some(mono_ns());
    let arrived_before = fleet.stats.delivered;
    run_for(&mut fleet, &mut coord, "measure", a.duration, tick)?;
    fleet.stats.arrived_window = fleet.stats.delivered - arrived_before;
    barrier(&mut fleet, &mut coord, "measured")?;
    fleet.traffic = Traffic::Off;

    let drain_end = Instant::now() + Duration::from_secs_f64(a.drain);
    run_until(&mut fleet, &mut coord, "drain", drain_end, tick, |f| {
        f.unacked_sends() == 0
    })?;
    barrier(&mut fleet, &mut coord, "drained")?;
    let verify_end = Instant::now() + Duration::from_secs_f64(a.drain);
    final_sync(&mut fleet, &mut coord, verify_end)?;
    let part = Part::of(&fleet, s.nofile);
    fleet.disconnect_all();
    if coord.is_child() {
        child_result(&part);
        return Ok(ExitCode::SUCCESS);
    }
    Ok(report(&a, &[part], &coord.snaps(), 1))
}

/// Group g holds users g*M .. (g+1)*M.
fn groups_of(a: &FanoutArgs) -> Groups {
    let p = &a.common.uid_prefix;
    let ids = (0..a.groups)
        .map(|g| im::group_id(p, a.groups, a.members, g))
        .collect();
    let members = (0..a.groups)
        .map(|g| (g * a.members..(g + 1) * a.members).collect())
        .collect();
    Groups::new(ids, members).unwrap_or_else(|e| unreachable!("disjoint by construction: {e}"))
}

/// Puts every member into its group through the admin API (each PUT answered 204 once
/// durable), several requests at once, then reads every group back: it must hold exactly
/// the run's members.
fn make_groups(a: &FanoutArgs, groups: &Groups) -> Result<(), String> {
    let p = &a.common.uid_prefix;
    let puts: Vec<String> = (0..groups.ids.len())
        .flat_map(|g| {
            groups.members[g]
                .iter()
                .map(move |&u| format!("/v1/groups/{}/members/{}", groups.ids[g], im::uid(p, u)))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    let deadline = Instant::now() + Duration::from_secs_f64(a.common.setup_timeout);
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
                let r = admin(a, "PUT", path, deadline).and_then(|(status, body)| {
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
        let (status, body) = admin(a, "GET", &path, deadline)?;
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
fn admin(
    a: &FanoutArgs,
    method: &str,
    path: &str,
    deadline: Instant,
) -> Result<(u16, String), String> {
    loop {
        let r = admin_once(a.admin, a.admin_token.as_deref(), method, path, deadline);
        match r {
            Ok((503, _)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn admin_once(
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

fn report(a: &FanoutArgs, parts: &[Part], snaps: &[Snap], procs: usize) -> ExitCode {
    let (all, hist) = merge_parts(parts);
    let st = &all.stats;
    let conns = u64::from(a.groups) * u64::from(a.members);
    let secs = secs_between(snaps, "measure", "measured").max(1e-9);
    let check = all.ledger.check();
    let mut r = Report::new("fanout");
    r.add("groups", a.groups)
        .add("members", a.members)
        .add("conns", conns)
        .add("established", st.established)
        .add(
            "senders",
            u64::from(a.senders.unwrap_or(a.members).min(a.members)) * u64::from(a.groups),
        );
    match a.inflight {
        Some(k) => r.add("inflight", k),
        None => r.addf("rate", a.rate.unwrap_or(100.0), 1),
    };
    r.add("size", a.size.max(crate::im::HEADER_LEN) as u64)
        .addf("secs", secs, 2)
        .add("sent", st.sent)
        .addf("send_ok_per_s", st.send_ok_window as f64 / secs, 0)
        .addf("delivered_per_s", st.delivered_window as f64 / secs, 0)
        .addf("arrived_per_s", st.arrived_window as f64 / secs, 0);
    add_latency(&mut r, &hist);
    let dups = st.dups + check.extra;
    r.add("errors", st.error_count())
        .add("dropped", st.dropped)
        .add("gaps", st.gaps)
        .add("dups", dups)
        .add("reorders", st.reorders)
        .add("missing", check.missing)
        .add("mismatched", check.mismatched)
        .add("unconfirmed", st.unconfirmed)
        .add_checks(st)
        .add("delivered", st.delivered)
        .add("expected", check.expected);
    if st.rate_skipped > 0 {
        r.add("rate_skipped", st.rate_skipped);
    }
    add_cpu(&mut r, snaps, "measure", "measured");
    r.add("procs", procs as u64);
    r.extra("send_ok", st.send_ok)
        .extra("send_ok_dup", st.send_ok_dup)
        .extra("old", st.old)
        .extra("foreign", st.foreign)
        .extra("pings", st.pings);
    add_errors(&mut r, st);
    if st.established < conns {
        r.fail(format!(
            "{} of {conns} connections logged in",
            st.established
        ));
    }
    if st.error_count() > 0 {
        r.fail(format!("{} errors", st.error_count()));
    }
    if st.dropped > 0 {
        r.fail(format!("{} connections dropped", st.dropped));
    }
    r.fail_on_violations(st, &check);
    if st.rate_skipped > 0 {
        eprintln!(
            "imgate-bench fanout: {} sends skipped: the bench (or the connections it had online) could not keep up with --rate",
            st.rate_skipped
        );
    }
    r.finish(a.common.json.as_deref())
}
