//! The scenarios, and what they share: set-up, phases, per-process results.

pub mod attack;
pub mod chaos;
pub mod echo;
pub mod fanout;
pub mod flood;
pub mod groups;
pub mod idle;
pub mod relay;
pub mod storm;

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::{Fleet, FleetCfg, Stats};
use crate::coord::Coord;
use crate::report::merge_hist;
use crate::sys::{entropy, raise_nofile};
use crate::verify::Ledger;
use crate::{check_loopback, Common};

/// File descriptors a process keeps for itself besides its connections.
const FD_MARGIN: u64 = 64;

pub struct Setup {
    /// The soft RLIMIT_NOFILE, raised to the hard limit.
    pub nofile: u64,
    pub run_id: u32,
    pub seed: u64,
    /// (index, count) when this process is a child.
    pub child: Option<(usize, usize)>,
}

pub fn setup(common: &Common) -> Result<Setup, String> {
    if common.addr.is_empty() {
        return Err("--addr needs an address".into());
    }
    for a in &common.addr {
        check_loopback(a)?;
    }
    if common.src_ips == 0 || common.src_ips > 254 {
        return Err("--src-ips must be 1..=254".into());
    }
    let nofile = raise_nofile();
    let child = match &common.child {
        None => None,
        Some(s) => {
            let (i, p) = s.split_once('/').ok_or("--child takes I/P")?;
            let i: usize = i.parse().map_err(|_| "--child takes I/P")?;
            let p: usize = p.parse().map_err(|_| "--child takes I/P")?;
            if i >= p {
                return Err("--child I/P needs I < P".into());
            }
            Some((i, p))
        }
    };
    let seed = common.seed.unwrap_or_else(entropy) ^ (child.map_or(0, |c| c.0 as u64) << 48);
    let run_id = common.run_id.unwrap_or_else(|| entropy() as u32);
    Ok(Setup {
        nofile,
        run_id,
        seed,
        child,
    })
}

pub fn secret(common: &Common) -> Result<Vec<u8>, String> {
    common
        .jwt_secret
        .as_ref()
        .map(|s| s.as_bytes().to_vec())
        .ok_or_else(|| {
            "--jwt-secret (or IMGATE_JWT_SECRET) is required to sign login tokens".into()
        })
}

pub fn fleet_cfg(common: &Common, s: &Setup, size: usize) -> Result<FleetCfg, String> {
    Ok(FleetCfg {
        addrs: common.addr.clone(),
        src_ips: common.src_ips,
        secret: secret(common)?,
        uid_prefix: common.uid_prefix.clone(),
        run_id: s.run_id,
        connect_concurrency: common.connect_concurrency.max(1),
        connect_timeout_ms: (common.connect_timeout * 1000.0) as u64,
        reconnect: false,
        resume_cursor: false,
        ack_every: 32,
        ack_tick_ms: 100,
        size: size.max(crate::im::HEADER_LEN),
        seed: s.seed,
        inject: common.inject_fault.map(|f| (f.into(), 97)),
    })
}

/// The users of process `i` of `p`: `[lo, hi)`.
pub fn share(n: u32, child: Option<(usize, usize)>) -> (u32, u32) {
    match child {
        None => (0, n),
        Some((i, p)) => {
            let lo = (u64::from(n) * i as u64 / p as u64) as u32;
            let hi = (u64::from(n) * (i as u64 + 1) / p as u64) as u32;
            (lo, hi)
        }
    }
}

/// How many processes `conns` connections need under the file limit.
pub fn decide_procs(conns: u64, requested: Option<usize>, nofile: u64) -> usize {
    if let Some(p) = requested {
        return p.max(1);
    }
    let per = nofile.saturating_sub(FD_MARGIN).max(1);
    conns.div_ceil(per).max(1) as usize
}

/// Connections one process can open under its file limit.
pub fn fd_room(nofile: u64) -> u64 {
    nofile.saturating_sub(FD_MARGIN)
}

/// Runs the loop until `cond` holds or `deadline` passes; returns whether it held.
pub fn run_until(
    fleet: &mut Fleet,
    coord: &mut Coord,
    phase: &str,
    deadline: Instant,
    tick: Duration,
    mut cond: impl FnMut(&Fleet) -> bool,
) -> Result<bool, String> {
    loop {
        if cond(fleet) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        fleet.step(tick).map_err(|e| format!("poll failed: {e}"))?;
        coord.progress(phase, || fleet.progress());
    }
}

/// Runs the loop for `secs`.
pub fn run_for(
    fleet: &mut Fleet,
    coord: &mut Coord,
    phase: &str,
    secs: f64,
    tick: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
    run_until(fleet, coord, phase, deadline, tick, |_| false).map(|_| ())
}

/// Reaches a barrier and keeps the loop running until every process has.
pub fn barrier(fleet: &mut Fleet, coord: &mut Coord, name: &str) -> Result<(), String> {
    coord.arrive(name);
    while !coord.released() {
        fleet
            .step(Duration::from_millis(2))
            .map_err(|e| format!("poll failed: {e}"))?;
        coord.progress(name, || fleet.progress());
    }
    Ok(())
}

/// The final check: every device asks the server what it has after the device's contiguous
/// seq, until all come out clean or `deadline` passes; then gaps and unconfirmed sends are
/// counted.
pub fn final_sync(fleet: &mut Fleet, coord: &mut Coord, deadline: Instant) -> Result<(), String> {
    loop {
        fleet.request_sync();
        let round = (Instant::now() + Duration::from_secs(3)).min(deadline);
        run_until(
            fleet,
            coord,
            "verify",
            round,
            Duration::from_millis(5),
            |f| {
                f.clients
                    .iter()
                    .all(|c| c.sync != crate::client::SyncState::Asked)
            },
        )?;
        if fleet.unsynced() == 0 || Instant::now() >= deadline {
            break;
        }
        // Deliveries may still be on their way: let them land, then ask again.
        run_for(fleet, coord, "verify", 0.2, Duration::from_millis(5))?;
        fleet.retry_dirty_syncs();
    }
    fleet.finish();
    Ok(())
}

/// What one process reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Part {
    pub stats: Stats,
    pub ledger: Ledger,
    pub hist: Vec<(u64, u64)>,
    /// Clients logged in at the end.
    pub online_end: u64,
    /// A hard limit that stopped new connections.
    pub limit: Option<String>,
    pub nofile: u64,
    /// This process's own VmRSS (KiB).
    pub rss_kib: u64,
}

impl Part {
    pub fn of(fleet: &Fleet, nofile: u64) -> Part {
        Part {
            stats: fleet.stats.clone(),
            ledger: fleet.ledger.clone(),
            hist: fleet.histogram_pairs(),
            online_end: fleet.online() as u64,
            limit: fleet.limit.clone(),
            nofile,
            rss_kib: crate::sys::sample_proc(std::process::id()).map_or(0, |p| p.rss_kib),
        }
    }
}

/// Sums the parts of all processes.
pub fn merge_parts(parts: &[Part]) -> (Part, hdrhistogram::Histogram<u64>) {
    let mut all = Part::default();
    for p in parts {
        all.stats.merge(&p.stats);
        all.ledger.merge(&p.ledger);
        all.online_end += p.online_end;
        if all.limit.is_none() {
            all.limit.clone_from(&p.limit);
        }
        all.nofile = all.nofile.max(p.nofile);
        all.rss_kib += p.rss_kib;
    }
    let hist = merge_hist(parts.iter().map(|p| p.hist.as_slice()));
    (all, hist)
}

/// Parses the children's results.
pub fn parse_parts(values: Vec<serde_json::Value>) -> Result<Vec<Part>, String> {
    values
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(|e| format!("bad child result: {e}")))
        .collect()
}
