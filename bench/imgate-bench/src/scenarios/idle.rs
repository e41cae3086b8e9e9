//! `idle`: N authenticated connections (uid u{i}, device d0), held through several server
//! ping intervals. Reports how many were established and survived, which limit stopped the
//! set-up if one did, and with --server-pid the server's RSS growth and CPU per connection.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::Fleet;
use crate::coord::{child_result, run_children, snap, Coord};
use crate::report::{add_cpu, add_errors, dominant_error, Report};
use crate::scenarios::{
    barrier, decide_procs, fd_room, fleet_cfg, merge_parts, parse_parts, run_for, run_until, setup,
    share, Part,
};
use crate::IdleArgs;

pub fn run(a: IdleArgs) -> Result<ExitCode, String> {
    let s = setup(&a.common)?;
    let procs = decide_procs(u64::from(a.conns), a.procs, s.nofile);
    if s.child.is_none() && procs > 1 {
        let limit = Duration::from_secs_f64(a.common.setup_timeout + a.hold + 120.0);
        let (values, snaps) = run_children(
            "idle",
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
        None => Coord::local("idle", a.common.server_pid, a.common.quiet),
    };
    let cfg = fleet_cfg(&a.common, &s, 32)?;
    let (lo, hi) = share(a.conns, s.child);
    let mut fleet = Fleet::new(cfg, vec![1; a.conns as usize], a.conns as usize)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    for u in lo..hi {
        fleet.add(u, 0, u, false);
    }
    if u64::from(hi - lo) > fd_room(s.nofile) {
        eprintln!(
            "imgate-bench idle: {} connections in one process exceed its file limit ({}); expect EMFILE (use --procs)",
            hi - lo,
            s.nofile
        );
    }
    let n = fleet.clients.len();
    fleet.bring_online(0..n);
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
        fleet.limit.get_or_insert_with(|| "timeout:setup".into());
        fleet.paused = true;
    }
    barrier(&mut fleet, &mut coord, "up")?;
    run_for(
        &mut fleet,
        &mut coord,
        "hold",
        a.hold,
        Duration::from_millis(50),
    )?;
    barrier(&mut fleet, &mut coord, "held")?;
    let part = Part::of(&fleet, s.nofile);
    fleet.disconnect_all();
    if coord.is_child() {
        child_result(&part);
        return Ok(ExitCode::SUCCESS);
    }
    Ok(report(&a, &[part], &coord.snaps(), 1))
}

fn report(a: &IdleArgs, parts: &[Part], snaps: &[crate::coord::Snap], procs: usize) -> ExitCode {
    let (all, _) = merge_parts(parts);
    let st = &all.stats;
    let mut r = Report::new("idle");
    let established = st.established;
    let limit = if established >= u64::from(a.conns) {
        "none".to_owned()
    } else {
        all.limit
            .clone()
            .or_else(|| dominant_error(st))
            .unwrap_or_else(|| "unknown".into())
    };
    r.add("conns", a.conns)
        .add("established", established)
        .add("survived", all.online_end)
        .add("dropped", st.dropped)
        .addf("hold_s", a.hold, 1)
        .add("pings", st.pings)
        .add("errors", st.error_count())
        .add("not_attempted", st.not_attempted)
        .add("limit", limit.clone())
        .add("procs", procs as u64)
        .add("src_ips", a.common.src_ips)
        .add("cli_nofile", all.nofile)
        .add("cli_rss_kib", all.rss_kib);
    let hold_s = crate::coord::secs_between(snaps, "up", "held");
    if let (Some(start), Some(up), Some(end)) = (
        snap(snaps, "start").and_then(|s| s.srv),
        snap(snaps, "up").and_then(|s| s.srv),
        snap(snaps, "held").and_then(|s| s.srv),
    ) {
        r.add("rss_before_kib", start.rss_kib)
            .add("rss_up_kib", up.rss_kib)
            .add("rss_end_kib", end.rss_kib);
        if established > 0 {
            let per =
                (end.rss_kib.saturating_sub(start.rss_kib) * 1024) as f64 / established as f64;
            r.addf("rss_bytes_per_conn", per, 0);
        }
    }
    if let Some(cpu_s) = add_cpu(&mut r, snaps, "up", "held") {
        if established > 0 && hold_s > 0.0 {
            // Server CPU per idle connection: µs of CPU per connection per second held.
            r.addf(
                "srv_cpu_us_per_conn_s",
                cpu_s * 1e6 / hold_s / established as f64,
                3,
            );
        }
    }
    add_errors(&mut r, st);
    if established < u64::from(a.conns) {
        r.fail(format!(
            "only {established} of {} connections were established (limit: {limit})",
            a.conns
        ));
    }
    if st.dropped > 0 {
        r.fail(format!(
            "{} connections dropped during the hold",
            st.dropped
        ));
    }
    if st.error_count() > 0 && established >= u64::from(a.conns) {
        r.fail(format!("{} errors", st.error_count()));
    }
    r.finish(a.common.json.as_deref())
}
