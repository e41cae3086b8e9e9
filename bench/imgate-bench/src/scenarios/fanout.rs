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

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::{Fleet, Traffic};
use crate::coord::{child_result, run_children, secs_between, Coord, Snap};
use crate::report::{add_cpu, add_errors, add_latency, Report};
use crate::scenarios::groups::{self, AdminApi};
use crate::scenarios::{
    barrier, decide_procs, fd_room, final_sync, fleet_cfg, merge_parts, parse_parts, run_for,
    run_until, setup, share, Part,
};
use crate::sys::mono_ns;
use crate::FanoutArgs;

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
    let groups = groups::disjoint(&a.common.uid_prefix, "fan", a.groups, a.members);
    if s.child.is_none() {
        let t0 = Instant::now();
        let api = AdminApi {
            addr: a.admin,
            token: a.admin_token.clone(),
        };
        let deadline = t0 + Duration::from_secs_f64(a.common.setup_timeout);
        groups::make(&api, &a.common.uid_prefix, &groups, deadline)?;
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
