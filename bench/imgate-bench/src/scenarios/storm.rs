//! `storm`: N users (D devices each) log in once and go offline; sender clients then put M
//! messages in each inbox; then every device reconnects at the same moment. Reports the
//! time until all are logged in and until all have received everything up to the max_seq
//! their LoginOk announced, and verifies what they received.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::{CState, Fleet, Traffic};
use crate::coord::Coord;
use crate::report::{add_errors, Report};
use crate::scenarios::{final_sync, fleet_cfg, run_for, run_until, setup, Part};
use crate::sys::{mono_ns, self_cpu_s};
use crate::StormArgs;

pub fn run(a: StormArgs) -> Result<ExitCode, String> {
    let s = setup(&a.common)?;
    if a.users == 0 || a.senders == 0 {
        return Err("storm needs --users and --senders above 0".into());
    }
    let devices = a.devices.max(1);
    let receivers = u64::from(a.users) * u64::from(devices);
    let total = receivers + u64::from(a.senders);
    if total > crate::scenarios::fd_room(s.nofile) {
        return Err(format!(
            "{total} connections exceed this process's file limit ({})",
            s.nofile
        ));
    }
    let mut coord = Coord::local("storm", a.common.server_pid, a.common.quiet);
    let cfg = fleet_cfg(&a.common, &s, a.size)?;
    let mut devices_of = vec![devices; a.users as usize];
    devices_of.extend(std::iter::repeat_n(1, a.senders as usize));
    let mut fleet = Fleet::new(cfg, devices_of, total as usize)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    for u in 0..a.users {
        for d in 0..devices {
            fleet.add(u, d, u * u32::from(devices) + u32::from(d), false);
        }
    }
    let first_sender = fleet.clients.len();
    for j in 0..a.senders {
        fleet.add(a.users + j, 0, receivers as u32 + j, true);
    }
    let recv: Vec<usize> = (0..first_sender).collect();
    let send: Vec<usize> = (first_sender..fleet.clients.len()).collect();
    let tick = Duration::from_millis(5);
    let setup_deadline = Instant::now() + Duration::from_secs_f64(a.common.setup_timeout);

    // 1. Everyone logs in once (their cursors exist), then goes offline.
    fleet.bring_online(recv.iter().copied().chain(send.iter().copied()));
    run_until(&mut fleet, &mut coord, "login", setup_deadline, tick, |f| {
        f.setting_up() == 0
    })?;
    let first_logins = fleet.stats.established;
    for &i in &recv {
        fleet.disconnect(i);
    }
    run_for(&mut fleet, &mut coord, "offline", 0.3, tick)?;

    // 2. The senders fill every inbox with M messages.
    for r in 0..a.users {
        for m in 0..a.msgs {
            let k = (u64::from(r) * u64::from(a.msgs) + u64::from(m)) as usize % send.len();
            fleet.clients[send[k]].script.push(r);
        }
    }
    fleet.scripted = true;
    fleet.traffic = Traffic::Rate {
        per_s: a.send_rate.unwrap_or(40.0 * f64::from(a.senders)),
        t0_ns: mono_ns(),
        done: 0,
    };
    let fill_deadline = Instant::now()
        + Duration::from_secs_f64(
            a.common.setup_timeout
                + f64::from(a.users) * f64::from(a.msgs)
                    / a.send_rate.unwrap_or(40.0 * f64::from(a.senders)),
        );
    let filled = run_until(&mut fleet, &mut coord, "fill", fill_deadline, tick, |f| {
        f.senders.iter().all(|&i| f.clients[i].script.is_empty()) && f.unacked_sends() == 0
    })?;
    fleet.traffic = Traffic::Off;
    if !filled {
        fleet.stats.error("timeout:fill");
    }
    let queued = fleet.stats.send_ok;

    // 3. The storm: every device reconnects at once.
    fleet.cfg.connect_concurrency = receivers as usize;
    let cpu0 = self_cpu_s();
    let srv0 = a.common.server_pid.and_then(crate::sys::sample_proc);
    let t0 = mono_ns();
    fleet.bring_online(recv.iter().copied());
    let deadline = Instant::now() + Duration::from_secs_f64(a.timeout);
    let mut all_in: Option<u64> = None;
    let mut caught_up: Option<u64> = None;
    let is_caught_up = |f: &Fleet, i: usize| {
        let c = &f.clients[i];
        c.state == CState::Online
            && c.login_at_ns >= t0
            && c.tracker
                .as_ref()
                .is_some_and(|t| t.contig() >= c.login_max_seq)
    };
    run_until(&mut fleet, &mut coord, "storm", deadline, tick, |f| {
        let now = mono_ns();
        if all_in.is_none()
            && recv
                .iter()
                .all(|&i| f.clients[i].state == CState::Online && f.clients[i].login_at_ns >= t0)
        {
            all_in = recv.iter().map(|&i| f.clients[i].login_at_ns).max();
        }
        if caught_up.is_none() && recv.iter().all(|&i| is_caught_up(f, i)) {
            caught_up = Some(now);
        }
        caught_up.is_some() && all_in.is_some()
    })?;
    let cpu1 = self_cpu_s();
    let srv1 = a.common.server_pid.and_then(crate::sys::sample_proc);
    let t1 = mono_ns();
    let verify_end = Instant::now() + Duration::from_secs_f64(15.0);
    final_sync(&mut fleet, &mut coord, verify_end)?;
    let part = Part::of(&fleet, s.nofile);
    fleet.disconnect_all();

    let st = &part.stats;
    let check = part.ledger.check();
    let ms = |t: Option<u64>| t.map(|t| (t.saturating_sub(t0)) as f64 / 1e6);
    let mut r = Report::new("storm");
    r.add("users", a.users)
        .add("devices", devices)
        .add("conns", receivers)
        .add("msgs_per_user", a.msgs)
        .add("queued", queued);
    match ms(all_in) {
        Some(v) => r.addf("login_all_ms", v, 1),
        None => r.add("login_all_ms", serde_json::Value::Null),
    };
    match ms(caught_up) {
        Some(v) => r.addf("caught_up_ms", v, 1),
        None => r.add("caught_up_ms", serde_json::Value::Null),
    };
    let wall = (t1 - t0) as f64 / 1e9;
    r.add("delivered", st.delivered)
        .add("expected", check.expected)
        .add("errors", st.error_count())
        .add("gaps", st.gaps)
        .add("dups", st.dups + check.extra)
        .add("reorders", st.reorders)
        .add("missing", check.missing)
        .add("mismatched", check.mismatched)
        .add_checks(st)
        .add(
            "cli_cpu",
            format!("{:.0}%", (cpu1 - cpu0) / wall.max(1e-9) * 100.0),
        );
    if let (Some(x), Some(y)) = (srv0, srv1) {
        r.add(
            "srv_cpu",
            format!("{:.0}%", (y.cpu_s - x.cpu_s) / wall.max(1e-9) * 100.0),
        );
    }
    add_errors(&mut r, st);
    if first_logins < total {
        r.fail(format!(
            "only {first_logins} of {total} clients logged in at first"
        ));
    }
    if all_in.is_none() {
        r.fail("not every device logged in again in time");
    }
    if caught_up.is_none() {
        r.fail("not every device caught up in time");
    }
    if st.error_count() > 0 {
        r.fail(format!("{} errors", st.error_count()));
    }
    r.fail_on_violations(st, &check);
    if queued != u64::from(a.users) * u64::from(a.msgs) {
        r.fail(format!(
            "{queued} of {} messages were queued",
            u64::from(a.users) * u64::from(a.msgs)
        ));
    }
    Ok(r.finish(a.common.json.as_deref()))
}
