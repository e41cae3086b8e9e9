//! `flood`: K well-behaved users exchange 1:1 messages at a rate while many connections send
//! garbage: non-HTTP bytes, oversized heads, wrong methods, unmasked frames, reserved
//! opcodes, absurd lengths, undecodable protobuf, stalled frames. Each garbage connection
//! is replaced as soon as the server drops it (or after --garbage-ms). Reports the well-behaved
//! clients' latency before and during the flood, and verifies their deliveries. With
//! `--attack sync|empty|pings` the flood is instead a few logged-in attackers (see `attack`),
//! and the report adds the server's peak RSS.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::{new_hist, Fleet, Traffic, FOREIGN_BASE};
use crate::coord::Coord;
use crate::report::{add_errors, add_latency, Report};
use crate::scenarios::{final_sync, fleet_cfg, run_for, run_until, setup, Part};
use crate::sys::{mono_ms, mono_ns, self_cpu_s, Rng};
use crate::ws;
use crate::FloodArgs;

use super::attack::{self, Attack};

const UPGRADE: &str =
    "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// How much one attacker may make the server's RSS grow: the documented bound on one
/// connection's output (`--outbound-high-water`, 1 MiB) is far below it.
const MAX_ATTACK_RSS_GROWTH_KIB: u64 = 64 * 1024;

/// Kinds of garbage, in turn.
const KINDS: usize = 8;

/// The bytes a garbage connection of `kind` sends.
pub fn garbage(kind: usize, rng: &mut Rng) -> Vec<u8> {
    let mut random = |n: usize| -> Vec<u8> { (0..n).map(|_| rng.next_u64() as u8).collect() };
    let mask = [0x11, 0x22, 0x33, 0x44];
    match kind % KINDS {
        // Not HTTP at all.
        0 => random(300),
        // An upgrade, then an unmasked frame (1002).
        1 => {
            let mut b = UPGRADE.as_bytes().to_vec();
            b.extend_from_slice(&[0x82, 0x05]);
            b.extend(random(5));
            b
        }
        // An upgrade, then a reserved opcode (1002).
        2 => {
            let mut b = UPGRADE.as_bytes().to_vec();
            ws::write_frame(&mut b, 0x3, &random(10), mask);
            b
        }
        // An upgrade, then a frame header claiming 1 TiB (1009).
        3 => {
            let mut b = UPGRADE.as_bytes().to_vec();
            b.extend_from_slice(&[0x82, 0xFF]);
            b.extend_from_slice(&(1u64 << 40).to_be_bytes());
            b.extend_from_slice(&mask);
            b
        }
        // A request head with too many header lines (431).
        4 => {
            let mut s = String::from("GET /ws HTTP/1.1\r\nHost: x\r\n");
            for i in 0..100 {
                s.push_str(&format!("X-Junk-{i}: {}\r\n", "y".repeat(60)));
            }
            s.push_str("\r\n");
            s.into_bytes()
        }
        // An upgrade, then undecodable protobuf frames (Error, then 1008 after 10).
        5 => {
            let mut b = UPGRADE.as_bytes().to_vec();
            for _ in 0..12 {
                let junk: Vec<u8> = std::iter::once(0xFFu8).chain(random(20)).collect();
                ws::write_frame(&mut b, ws::OP_BINARY, &junk, mask);
            }
            b
        }
        // A wrong method (405).
        6 => b"POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".to_vec(),
        // An upgrade, then half a frame header, and silence.
        _ => {
            let mut b = UPGRADE.as_bytes().to_vec();
            b.push(0x82);
            b
        }
    }
}

struct Slot {
    key: Option<usize>,
    opened_ms: u64,
    kind: usize,
}

pub fn run(a: FloodArgs) -> Result<ExitCode, String> {
    let s = setup(&a.common)?;
    if a.users < 2 {
        return Err("flood needs at least 2 users".into());
    }
    let total = u64::from(a.users) + u64::from(a.flood_conns);
    if total > crate::scenarios::fd_room(s.nofile) {
        return Err(format!(
            "{total} connections exceed this process's file limit ({})",
            s.nofile
        ));
    }
    let mut coord = Coord::local("flood", a.common.server_pid, a.common.quiet);
    let cfg = fleet_cfg(&a.common, &s, a.size)?;
    let mut fleet = Fleet::new(cfg, vec![1; a.users as usize], a.users as usize)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    for u in 0..a.users {
        fleet.add(u, 0, u, true);
    }
    let n = fleet.clients.len();
    fleet.bring_online(0..n);
    let tick = Duration::from_millis(10);
    let setup_end = Instant::now() + Duration::from_secs_f64(a.common.setup_timeout);
    run_until(&mut fleet, &mut coord, "connect", setup_end, tick, |f| {
        f.setting_up() == 0
    })?;

    // Attackers prepare (log in, fill their inboxes) before the baseline, and attack when
    // the flood starts.
    let ctl = attack::Control::default();
    let secret = crate::scenarios::secret(&a.common)?;
    let attackers: Vec<_> = if a.attack == Attack::Garbage {
        Vec::new()
    } else {
        (0..a.attackers)
            .map(|i| {
                let uid = crate::im::uid(&format!("{}attacker", a.common.uid_prefix), i);
                let token = crate::im::token(&secret, &uid);
                attack::spawn(a.attack, a.common.addr[0], uid, token, ctl.clone())
            })
            .collect()
    };

    // Baseline: traffic without flood.
    fleet.traffic = Traffic::Rate {
        per_s: a.rate,
        t0_ns: mono_ns(),
        done: 0,
    };
    fleet.measure_from = Some(mono_ns());
    run_for(&mut fleet, &mut coord, "baseline", a.warmup, tick)?;
    let baseline = std::mem::replace(&mut fleet.hist, new_hist());

    // The flood.
    let mut rng = Rng::new(s.seed ^ 0xF100D);
    let mut slots: Vec<Slot> = (0..a.flood_conns as usize)
        .map(|i| Slot {
            key: None,
            opened_ms: 0,
            kind: i,
        })
        .collect();
    if a.attack != Attack::Garbage {
        slots.clear();
    }
    ctl.go.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut rss_peak_kib = 0u64;
    let mut opened = 0u64;
    let mut dropped_by_server = 0u64;
    let mut timed_out = 0u64;
    let mut connect_errors = 0u64;
    let cpu0 = self_cpu_s();
    let srv0 = a.common.server_pid.and_then(crate::sys::sample_proc);
    let delivered0 = fleet.stats.delivered;
    let t_flood = Instant::now();
    fleet.measure_from = Some(mono_ns());
    let end = t_flood + Duration::from_secs_f64(a.duration);
    while Instant::now() < end {
        if let Some(p) = a.common.server_pid.and_then(crate::sys::sample_proc) {
            rss_peak_kib = rss_peak_kib.max(p.rss_kib);
        }
        let now_ms = mono_ms();
        for (owner, why) in std::mem::take(&mut fleet.foreign_closed) {
            if let Some(slot) = slots.get_mut(owner - FOREIGN_BASE) {
                slot.key = None;
                match why {
                    crate::net::CloseReason::Connect(_) | crate::net::CloseReason::Timeout => {
                        connect_errors += 1
                    }
                    _ => dropped_by_server += 1,
                }
            }
        }
        for (i, slot) in slots.iter_mut().enumerate() {
            if let Some(k) = slot.key {
                if now_ms >= slot.opened_ms + a.garbage_ms {
                    if fleet.net.owner_of(k) == Some(FOREIGN_BASE + i) {
                        fleet.net.close(k, 1000);
                    }
                    slot.key = None;
                    timed_out += 1;
                }
                continue;
            }
            slot.kind += 1;
            let bytes = garbage(slot.kind, &mut rng);
            match fleet
                .net
                .connect(None, FOREIGN_BASE + i, now_ms + 2000, Some(&bytes))
            {
                Ok(k) => {
                    slot.key = Some(k);
                    slot.opened_ms = now_ms;
                    opened += 1;
                }
                Err(_) => connect_errors += 1,
            }
        }
        fleet.step(tick).map_err(|e| format!("poll failed: {e}"))?;
        coord.progress("flood", || fleet.progress());
    }
    let flood_secs = t_flood.elapsed().as_secs_f64();
    ctl.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let attack_stats: Vec<attack::Stats> = attackers
        .into_iter()
        .map(|t| t.join().unwrap_or_default())
        .collect();
    let cpu1 = self_cpu_s();
    let srv1 = a.common.server_pid.and_then(crate::sys::sample_proc);
    let delivered_flood = fleet.stats.delivered - delivered0;
    for (i, slot) in slots.iter_mut().enumerate() {
        if let Some(k) = slot.key.take() {
            if fleet.net.owner_of(k) == Some(FOREIGN_BASE + i) {
                fleet.net.close(k, 1000);
            }
        }
    }
    fleet.traffic = Traffic::Off;
    let drain_end = Instant::now() + Duration::from_secs(15);
    run_until(&mut fleet, &mut coord, "drain", drain_end, tick, |f| {
        f.unacked_sends() == 0
    })?;
    final_sync(
        &mut fleet,
        &mut coord,
        Instant::now() + Duration::from_secs(15),
    )?;
    let part = Part::of(&fleet, s.nofile);
    fleet.disconnect_all();

    let st = &part.stats;
    let check = part.ledger.check();
    let mut r = Report::new("flood");
    r.add("attack", format!("{:?}", a.attack).to_lowercase());
    if !attack_stats.is_empty() {
        r.add("attackers", a.attackers)
            .add(
                "attack_connections",
                attack_stats.iter().map(|s| s.connections).sum::<u64>(),
            )
            .add(
                "attack_bytes_sent",
                attack_stats.iter().map(|s| s.bytes_sent).sum::<u64>(),
            )
            .add(
                "attack_dropped_by_server",
                attack_stats
                    .iter()
                    .map(|s| s.dropped_by_server)
                    .sum::<u64>(),
            );
    }
    r.add("users", a.users)
        .addf("rate", a.rate, 1)
        .add("flood_conns", a.flood_conns)
        .addf("secs", flood_secs, 1)
        .add("garbage_opened", opened)
        .addf("garbage_per_s", opened as f64 / flood_secs.max(1e-9), 0)
        .add("garbage_dropped_by_server", dropped_by_server)
        .add("garbage_cut_by_bench", timed_out)
        .add("garbage_connect_errors", connect_errors);
    let us = |h: &hdrhistogram::Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    if !baseline.is_empty() {
        r.addf("base_p50_us", us(&baseline, 0.5), 1)
            .addf("base_p99_us", us(&baseline, 0.99), 1);
    }
    let hist = crate::report::merge_hist([part.hist.as_slice()]);
    add_latency(&mut r, &hist);
    r.addf(
        "delivered_per_s",
        delivered_flood as f64 / flood_secs.max(1e-9),
        0,
    )
    .add("errors", st.error_count())
    .add("gaps", st.gaps)
    .add("dups", st.dups + check.extra)
    .add("reorders", st.reorders)
    .add("missing", check.missing)
    .add_checks(st)
    .add(
        "cli_cpu",
        format!("{:.0}%", (cpu1 - cpu0) / flood_secs.max(1e-9) * 100.0),
    );
    if let (Some(x), Some(y)) = (srv0, srv1) {
        r.add(
            "srv_cpu",
            format!("{:.0}%", (y.cpu_s - x.cpu_s) / flood_secs.max(1e-9) * 100.0),
        )
        .add("srv_rss_before_kib", x.rss_kib)
        .add("srv_rss_peak_kib", rss_peak_kib.max(y.rss_kib));
        let grew = rss_peak_kib.max(y.rss_kib).saturating_sub(x.rss_kib);
        if a.attack != Attack::Garbage && grew > MAX_ATTACK_RSS_GROWTH_KIB * u64::from(a.attackers)
        {
            r.fail(format!(
                "the server's RSS grew by {grew} KiB under the attack (bound: {} KiB per attacker)",
                MAX_ATTACK_RSS_GROWTH_KIB
            ));
        }
        if let Some(z) = a.common.server_pid.and_then(crate::sys::sample_proc) {
            r.add("srv_rss_after_kib", z.rss_kib);
        }
    }
    add_errors(&mut r, st);
    if st.established < u64::from(a.users) {
        r.fail(format!(
            "{} of {} well-behaved clients logged in",
            st.established, a.users
        ));
    }
    if st.error_count() > 0 {
        r.fail(format!(
            "{} errors on well-behaved clients",
            st.error_count()
        ));
    }
    r.fail_on_violations(st, &check);
    Ok(r.finish(a.common.json.as_deref()))
}
