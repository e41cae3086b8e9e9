//! `relay`: N users online (D devices each), 1:1 messages to random other users at a total
//! rate (open loop) or with K sends in flight per connection (closed loop). Measures
//! send-to-deliver latency at the recipient and throughput, then verifies every inbox:
//! strictly increasing seqs without gaps or duplicates on every device, and every message
//! that got a SendOk delivered to every device of its recipient (and the sender's others).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::{Fleet, Traffic};
use crate::coord::{child_result, run_children, secs_between, Coord, Snap};
use crate::report::{add_cpu, add_errors, add_latency, Report};
use crate::scenarios::{
    barrier, decide_procs, fd_room, final_sync, fleet_cfg, merge_parts, parse_parts, run_for,
    run_until, setup, share, Part,
};
use crate::sys::mono_ns;
use crate::RelayArgs;

pub fn run(a: RelayArgs) -> Result<ExitCode, String> {
    let s = setup(&a.common)?;
    if a.users < 2 {
        return Err("relay needs at least 2 users".into());
    }
    let devices = a.devices.max(1);
    let conns = u64::from(a.users) * u64::from(devices);
    let procs = decide_procs(conns, a.procs, s.nofile);
    if s.child.is_none() && procs > 1 {
        let limit = Duration::from_secs_f64(
            a.common.setup_timeout + a.warmup + a.duration + 2.0 * a.drain + 120.0,
        );
        let (values, snaps) = run_children(
            "relay",
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
        None => Coord::local("relay", a.common.server_pid, a.common.quiet),
    };
    let mut cfg = fleet_cfg(&a.common, &s, a.size)?;
    cfg.ack_every = a.ack_every.max(1);
    cfg.ack_tick_ms = a.ack_tick_ms.max(1);
    if let Some(k) = a.inject {
        cfg.inject = Some((k, a.inject_every.max(1)));
    }
    let (lo, hi) = share(a.users, s.child);
    let mut fleet = Fleet::new(cfg, vec![devices; a.users as usize], conns as usize)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    for u in lo..hi {
        for d in 0..devices {
            fleet.add(u, d, u * u32::from(devices) + u32::from(d), true);
        }
    }
    let mine = fleet.clients.len() as u64;
    if mine > fd_room(s.nofile) {
        eprintln!(
            "imgate-bench relay: {mine} connections in one process exceed its file limit ({}); use --procs",
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
    fleet.traffic = match a.inflight {
        Some(k) => Traffic::Inflight(k.max(1)),
        None => Traffic::Rate {
            per_s: a.rate.unwrap_or(1000.0) * mine as f64 / conns as f64,
            t0_ns: mono_ns(),
            done: 0,
        },
    };
    fleet.top_up_all();
    run_for(&mut fleet, &mut coord, "warmup", a.warmup, tick)?;
    barrier(&mut fleet, &mut coord, "measure")?;
    fleet.measure_from = Some(mono_ns());
    run_for(&mut fleet, &mut coord, "measure", a.duration, tick)?;
    barrier(&mut fleet, &mut coord, "measured")?;
    fleet.traffic = Traffic::Off;

    // Every send gets its SendOk, in every process, before the inboxes are checked.
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

fn report(a: &RelayArgs, parts: &[Part], snaps: &[Snap], procs: usize) -> ExitCode {
    let (all, hist) = merge_parts(parts);
    let st = &all.stats;
    let devices = a.devices.max(1);
    let conns = u64::from(a.users) * u64::from(devices);
    let secs = secs_between(snaps, "measure", "measured").max(1e-9);
    let check = all.ledger.check();
    let mut r = Report::new("relay");
    r.add("users", a.users)
        .add("devices", devices)
        .add("conns", conns)
        .add("established", st.established);
    match a.inflight {
        Some(k) => r.add("inflight", k),
        None => r.addf("rate", a.rate.unwrap_or(1000.0), 1),
    };
    r.add("size", a.size.max(crate::im::HEADER_LEN) as u64)
        .addf("secs", secs, 2)
        .add("sent", st.sent)
        .addf("send_ok_per_s", st.send_ok_window as f64 / secs, 0)
        .addf("delivered_per_s", st.delivered_window as f64 / secs, 0);
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
            "imgate-bench relay: {} sends skipped: the bench (or the connections it had online) could not keep up with --rate",
            st.rate_skipped
        );
    }
    r.finish(a.common.json.as_deref())
}
