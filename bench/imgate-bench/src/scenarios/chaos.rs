//! `chaos`: the bench starts the server itself, runs relay traffic with reconnecting
//! clients, and kills the server with SIGKILL at random moments, restarting it each time
//! with the same command (same data directory, same port). Clients come back, resume their
//! inbox, and resend with the same client_msg_id whatever had no SendOk. A kill waits (up to
//! [`MAX_KILL_WAIT_S`]) for sends on the wire, so that it lands between sends and their
//! SendOks; those sends are followed to their SendOk after the restart. At the end, with the
//! server up, it proves: every message that got a SendOk reached every device of its
//! recipient, in order, without gaps and as it was sent; no message was delivered twice
//! under two seqs. With `--groups`, groups are made through the admin API before the first
//! load and a `--group-share` of their members' sends go to their group: every group
//! message that got a SendOk must then be in the inbox of every member device but the
//! sending one (the ledger expects each), once (a retry after a kill too) and without
//! gaps in any inbox, and a group message at some of them must be at all of them.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::client::{CState, Fleet, Traffic};
use crate::coord::Coord;
use crate::report::{add_errors, add_latency, Report};
use crate::scenarios::groups::{self, AdminApi};
use crate::scenarios::{final_sync, fleet_cfg, run_for, run_until, setup, Part};
use crate::sys::{mono_ns, Rng};
use crate::{check_loopback, ChaosArgs, Resume};

/// Seconds a due kill waits for sends on the wire (with group traffic: for group sends on
/// the wire; the clients may still be coming back from the previous kill); past that it
/// kills anyway.
pub const MAX_KILL_WAIT_S: f64 = 1.0;

/// From this many kills on, a run in which no kill caught a send on the wire fails: it did
/// not test what happens to a message between its send and its SendOk. The same holds for
/// group sends in a run with group traffic.
pub const MIN_KILLS_FOR_IN_FLIGHT: u32 = 3;

/// Splits a command line into words: whitespace separates, single quotes keep everything,
/// double quotes keep everything but backslash escapes. No shell is involved.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(x) => cur.push(x),
                        None => return Err("unterminated ' in --server-cmd".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(x) => cur.push(x),
                            None => return Err("dangling \\ in --server-cmd".into()),
                        },
                        Some(x) => cur.push(x),
                        None => return Err("unterminated \" in --server-cmd".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(x) => cur.push(x),
                    None => return Err("dangling \\ in --server-cmd".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    if words.is_empty() {
        return Err("--server-cmd is empty".into());
    }
    Ok(words)
}

/// 127.0.0.1 for an unspecified listen address (0.0.0.0), with its port.
fn loopback(a: SocketAddr) -> SocketAddr {
    if a.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], a.port()))
    } else {
        a
    }
}

/// What a process started by the bench prints on stdout once it serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// imgate: "listening on ws://ADDR" (then "admin API on http://ADDR" with `want_admin`).
    Imgate,
    /// redis-server: "Ready to accept connections".
    Redis,
}

/// A process under test (an imgate node, or the Redis of a cluster): started, killed and
/// restarted by the bench with the same command.
pub struct ServerCtl {
    words: Vec<String>,
    ready: Ready,
    log: Option<PathBuf>,
    child: Option<Child>,
    pub addr: Option<SocketAddr>,
    /// Wait for the "admin API on http://ADDR" line too at each start, and pin its port.
    pub want_admin: bool,
    /// The admin API of the running server (with `want_admin`).
    pub admin: Option<SocketAddr>,
    pub starts: u32,
}

impl ServerCtl {
    pub fn new(cmd: &str, log: Option<PathBuf>) -> Result<ServerCtl, String> {
        ServerCtl::of(cmd, log, Ready::Imgate)
    }

    pub fn of(cmd: &str, log: Option<PathBuf>, ready: Ready) -> Result<ServerCtl, String> {
        let words = split_words(cmd)?;
        if words
            .windows(2)
            .any(|w| w[0] == "--durability" && w[1] == "none")
            || words.iter().any(|w| w == "--durability=none")
        {
            eprintln!(
                "imgate-bench chaos: warning: --durability none may lose acknowledged messages on SIGKILL; expect violations"
            );
        }
        Ok(ServerCtl {
            words,
            ready,
            log,
            child: None,
            addr: None,
            want_admin: false,
            admin: None,
            starts: 0,
        })
    }

    /// The value of `flag` (`--jwt-secret`, `--admin-token`) in the server command, if it
    /// has one.
    pub fn flag_value(&self, flag: &str) -> Option<String> {
        let w = &self.words;
        let eq = format!("{flag}=");
        w.iter()
            .position(|x| x == flag)
            .and_then(|i| w.get(i + 1).cloned())
            .or_else(|| {
                w.iter()
                    .find_map(|x| x.strip_prefix(eq.as_str()).map(str::to_owned))
            })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Pins the address of `flag` (`--listen`, `--admin-listen`) for restarts (port 0
    /// becomes the port the first start got).
    fn pin(&mut self, flag: &str, addr: SocketAddr) {
        let a = addr.to_string();
        let eq = format!("{flag}=");
        let mut i = 0;
        while i < self.words.len() {
            if self.words[i] == flag && i + 1 < self.words.len() {
                self.words[i + 1] = a.clone();
                return;
            }
            if self.words[i].starts_with(eq.as_str()) {
                self.words[i] = format!("{eq}{a}");
                return;
            }
            i += 1;
        }
    }

    fn log_file(&self) -> Result<Option<std::fs::File>, String> {
        self.log
            .as_ref()
            .map(|path| {
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open {}: {e}", path.display()))
            })
            .transpose()
    }

    /// Starts the process and waits for its ready line (see [`Ready`]); for imgate, returns
    /// the address it listens on.
    pub fn start(&mut self) -> Result<Option<SocketAddr>, String> {
        let mut last_err = String::new();
        for _attempt in 0..20 {
            let mut cmd = Command::new(&self.words[0]);
            cmd.args(&self.words[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            let mut tee = self.log_file()?;
            match self.log_file()? {
                Some(f) => {
                    cmd.stderr(f);
                }
                None => {
                    cmd.stderr(Stdio::inherit());
                }
            }
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("cannot start {:?}: {e}", self.words[0]))?;
            let Some(stdout) = child.stdout.take() else {
                let _ = child.kill();
                let _ = child.wait();
                return Err("no server stdout".into());
            };
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                // Keep draining so the server never blocks on a full pipe.
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Some(f) = &mut tee {
                        let _ = writeln!(f, "{line}");
                    }
                    let _ = tx.send(line);
                }
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut found = None;
            let mut admin = None;
            let mut ready = false;
            let addr_after = |line: &str, marker: &str| {
                line.split(marker)
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .and_then(|a| a.parse::<SocketAddr>().ok())
            };
            while Instant::now() < deadline {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(line) => match self.ready {
                        Ready::Redis => {
                            if line.contains("Ready to accept connections") {
                                ready = true;
                                break;
                            }
                        }
                        Ready::Imgate => {
                            if line.contains("listening on ws://") {
                                found = addr_after(&line, "listening on ws://");
                                if found.is_none() || !self.want_admin {
                                    ready = found.is_some();
                                    break;
                                }
                            } else if found.is_some() && line.contains("admin API on http://") {
                                admin = addr_after(&line, "admin API on http://");
                                ready = admin.is_some();
                                break;
                            }
                        }
                    },
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Ok(Some(status)) = child.try_wait() {
                            last_err = format!("server exited with {status} before it was ready");
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = child.wait();
                        last_err = "server closed its stdout before it was ready".into();
                        break;
                    }
                }
            }
            if !ready {
                let _ = child.kill();
                let _ = child.wait();
                if last_err.is_empty() {
                    last_err = match (self.ready, found) {
                        (Ready::Redis, _) => {
                            "no \"Ready to accept connections\" within 30 s".into()
                        }
                        (Ready::Imgate, None) => "no listening line within 30 s".into(),
                        (Ready::Imgate, Some(_)) => {
                            "no admin API line after the listening line within 30 s".into()
                        }
                    };
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            }
            let addr = found.map(loopback);
            let admin = admin.map(loopback);
            if let Err(e) = addr.iter().chain(admin.iter()).try_for_each(check_loopback) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            if self.starts == 0 {
                if let Some(a) = addr {
                    self.pin("--listen", a);
                }
                if let Some(a) = admin {
                    self.pin("--admin-listen", a);
                }
            }
            self.starts += 1;
            self.child = Some(child);
            self.addr = addr;
            self.admin = admin;
            return Ok(addr);
        }
        Err(format!("{:?} did not start: {last_err}", self.words[0]))
    }

    /// SIGKILL, and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill on the pid of a child we have not reaped yet.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: as above.
            unsafe {
                libc::kill(c.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerCtl {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn run(a: ChaosArgs) -> Result<ExitCode, String> {
    let mut common = a.common.clone();
    let mut nodes = a
        .server_cmd
        .iter()
        .map(|c| ServerCtl::new(c, a.server_log.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut redis = a
        .redis_cmd
        .as_deref()
        .map(|c| ServerCtl::of(c, a.server_log.clone(), Ready::Redis))
        .transpose()?;
    let redis_kills = if redis.is_some() { a.redis_kills } else { 0 };
    if common.jwt_secret.is_none() {
        common.jwt_secret = nodes[0].flag_value("--jwt-secret");
    }
    if a.users < 2 {
        return Err("chaos needs at least 2 users".into());
    }
    let with_groups = a.groups > 0;
    if with_groups {
        if a.group_members < 2 {
            return Err("--group-members must be at least 2".into());
        }
        if u64::from(a.groups) * u64::from(a.group_members) > u64::from(a.users) {
            return Err(format!(
                "--groups {} x --group-members {} exceed the {} users",
                a.groups, a.group_members, a.users
            ));
        }
        if !(0.0..=1.0).contains(&a.group_share) {
            return Err("--group-share must be within 0..=1".into());
        }
    }
    if let Some(r) = &mut redis {
        r.start()?;
    }
    nodes[0].want_admin = with_groups;
    common.addr = Vec::with_capacity(nodes.len());
    for node in &mut nodes {
        let addr = node.start()?.ok_or("no address in the listening line")?;
        common.addr.push(addr);
    }
    let s = setup(&common)?;
    // The groups, made once before any load: memberships are durable when the admin API
    // answers, so every restart has them.
    let groups = with_groups
        .then(|| groups::disjoint(&common.uid_prefix, "chaos", a.groups, a.group_members));
    if let (Some(g), Some(admin)) = (&groups, nodes[0].admin) {
        let api = AdminApi {
            addr: admin,
            token: a
                .admin_token
                .clone()
                .or_else(|| nodes[0].flag_value("--admin-token")),
        };
        let t0 = Instant::now();
        groups::make(
            &api,
            &common.uid_prefix,
            g,
            t0 + Duration::from_secs_f64(common.setup_timeout),
        )?;
        if !common.quiet {
            eprintln!(
                "imgate-bench chaos: {} groups of {} members made in {:.2} s through the admin API at {admin}",
                a.groups,
                a.group_members,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    let devices = a.devices.max(1);
    let conns = u64::from(a.users) * u64::from(devices);
    if conns > crate::scenarios::fd_room(s.nofile) {
        return Err(format!(
            "{conns} connections exceed this process's file limit ({})",
            s.nofile
        ));
    }
    let mut coord = Coord::local("chaos", None, common.quiet);
    let mut cfg = fleet_cfg(&common, &s, a.size)?;
    cfg.reconnect = true;
    cfg.resume_cursor = a.resume == Resume::Cursor;
    cfg.ack_every = a.ack_every.max(1);
    cfg.ack_tick_ms = a.ack_tick_ms.max(1);
    if let Some(k) = a.inject {
        cfg.inject = Some((k, a.inject_every.max(1)));
    }
    cfg.connect_timeout_ms = cfg.connect_timeout_ms.min(5000);
    let mut fleet = Fleet::new(cfg, vec![devices; a.users as usize], conns as usize)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    if let Some(g) = groups {
        fleet.set_groups(g);
        fleet.group_share = a.group_share;
        fleet.track_group_copies();
    }
    for u in 0..a.users {
        for d in 0..devices {
            fleet.add(u, d, u * u32::from(devices) + u32::from(d), true);
        }
    }
    let n = fleet.clients.len();
    fleet.bring_online(0..n);
    let tick = Duration::from_millis(10);
    let setup_end = Instant::now() + Duration::from_secs_f64(common.setup_timeout);
    run_until(&mut fleet, &mut coord, "connect", setup_end, tick, |f| {
        f.online() == n
    })?;
    let first_online = fleet.online();

    // Kill moments, uniformly within the traffic, in order; which node is picked when due.
    let mut rng = Rng::new(s.seed ^ 0xC4A0_5000);
    let mut plan: Vec<(f64, Victim)> = (0..a.kills)
        .map(|_| Victim::Node)
        .chain((0..redis_kills).map(|_| Victim::Redis))
        .map(|v| (a.duration * (0.05 + 0.9 * rng.f64()), v))
        .collect();
    plan.sort_by(|x, y| x.0.total_cmp(&y.0));
    let t0 = Instant::now();
    fleet.traffic = Traffic::Rate {
        per_s: a.rate,
        t0_ns: mono_ns(),
        done: 0,
    };
    fleet.measure_from = Some(mono_ns());
    let mut done = 0usize;
    let mut kills = 0u32;
    let mut redis_killed = 0u32;
    let mut kills_in_flight = 0u32;
    let mut kills_in_group_flight = 0u32;
    // With group traffic a due kill waits for a group send on the wire (they fan out to
    // every member's inbox: the case to catch between send and SendOk).
    let wait_for_group = with_groups && a.group_share > 0.0;
    // The process down, and when it is started again: one at a time.
    let mut down: Option<(Instant, Down)> = None;
    let mut downtimes_ms: Vec<f64> = Vec::new();
    let mut killed_at = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.duration);
    let mut start_error = None;
    // Traffic runs for the duration, and on while a kill is still due.
    while Instant::now() < end || (done < plan.len() && start_error.is_none()) {
        fleet.step(tick).map_err(|e| format!("poll failed: {e}"))?;
        coord.progress("chaos", || fleet.progress());
        let now = Instant::now();
        let elapsed = now.duration_since(t0).as_secs_f64();
        let due = plan.get(done).copied();
        let on_wire = |f: &Fleet| {
            if wait_for_group {
                f.group_sends_on_wire()
            } else {
                f.sends_on_wire()
            }
        };
        if down.is_none()
            && due.is_some_and(|(at, _)| {
                elapsed >= at && (elapsed >= at + MAX_KILL_WAIT_S || on_wire(&fleet) > 0)
            })
        {
            let victim = match due {
                Some((_, Victim::Redis)) => Down::Redis,
                _ => Down::Node(rng.below(nodes.len() as u64) as usize),
            };
            let group_in_flight = if with_groups {
                fleet.group_sends_on_wire()
            } else {
                0
            };
            let in_flight = fleet.mark_in_flight();
            let delay = match victim {
                Down::Node(k) => {
                    nodes[k].kill9();
                    kills += 1;
                    a.restart_delay_ms + rng.below(a.restart_delay_ms + 1)
                }
                Down::Redis => {
                    if let Some(r) = &mut redis {
                        r.kill9();
                    }
                    redis_killed += 1;
                    a.redis_down_ms
                }
            };
            done += 1;
            if in_flight > 0 {
                kills_in_flight += 1;
            }
            if group_in_flight > 0 {
                kills_in_group_flight += 1;
            }
            killed_at = now;
            down = Some((now + Duration::from_millis(delay), victim));
            if !common.quiet {
                let groups = if with_groups {
                    format!(", group sends on the wire {group_in_flight}")
                } else {
                    String::new()
                };
                let what = match victim {
                    Down::Node(k) if nodes.len() > 1 => format!("node {k}"),
                    Down::Node(_) => "server".to_string(),
                    Down::Redis => "Redis".to_string(),
                };
                eprintln!(
                    "[chaos {elapsed:>6.1}s] kill -9 #{done} of {what} (online {}, sends on the wire {in_flight}{groups}, unacked sends {})",
                    fleet.online(),
                    fleet.unacked_sends()
                );
            }
        }
        if let Some((at, victim)) = down {
            if now >= at {
                down = None;
                let started = match victim {
                    Down::Node(k) => nodes[k].start().map(drop),
                    Down::Redis => redis.as_mut().map_or(Ok(()), |r| r.start().map(drop)),
                };
                match started {
                    Ok(()) => downtimes_ms.push(killed_at.elapsed().as_secs_f64() * 1000.0),
                    Err(e) => {
                        start_error = Some(e);
                        break;
                    }
                }
            }
        }
    }
    fleet.traffic = Traffic::Off;
    if start_error.is_none() {
        if let Some((_, victim)) = down.take() {
            let started = match victim {
                Down::Node(k) => nodes[k].start().map(drop),
                Down::Redis => redis.as_mut().map_or(Ok(()), |r| r.start().map(drop)),
            };
            match started {
                Ok(()) => downtimes_ms.push(killed_at.elapsed().as_secs_f64() * 1000.0),
                Err(e) => start_error = Some(e),
            }
        }
    }
    if let Some(e) = start_error {
        return Err(format!("restart after kill #{done} failed: {e}"));
    }
    let server_pid = nodes[0].pid();

    // Everyone back, every send acknowledged, then the inboxes are checked.
    let drain_end = Instant::now() + Duration::from_secs_f64(a.drain);
    run_until(&mut fleet, &mut coord, "drain", drain_end, tick, |f| {
        f.online() == n && f.unacked_sends() == 0
    })?;
    run_for(&mut fleet, &mut coord, "drain", 0.2, tick)?;
    let verify_end = Instant::now() + Duration::from_secs_f64(a.drain);
    final_sync(&mut fleet, &mut coord, verify_end)?;
    let not_back = fleet
        .clients
        .iter()
        .filter(|c| c.state != CState::Online)
        .count();
    let partial = fleet.group_partial();
    let part = Part::of(&fleet, s.nofile);
    fleet.disconnect_all();
    for node in &mut nodes {
        node.stop();
    }
    if let Some(r) = &mut redis {
        r.stop();
    }

    let st = &part.stats;
    let check = part.ledger.check();
    let hist = crate::report::merge_hist([part.hist.as_slice()]);
    let mut r = Report::new("chaos");
    let dups = st.dups + check.extra;
    r.add("users", a.users)
        .add("devices", devices)
        .add("nodes", nodes.len())
        .add("kills", kills)
        .add("redis_kills", redis_killed)
        .add(
            "restarts",
            nodes
                .iter()
                .chain(redis.iter())
                .map(|n| n.starts.saturating_sub(1))
                .sum::<u32>(),
        )
        .addf("secs", a.duration, 1)
        .add("sent", st.sent)
        .add("resent", st.resent)
        .add("send_ok", st.send_ok)
        .add("send_ok_dup", st.send_ok_dup)
        .add("delivered", st.delivered)
        .add("expected", check.expected)
        .add("reconnects", st.reconnects)
        .add("disconnects", st.disconnects)
        .add("gaps", st.gaps)
        .add("dups", dups)
        .add("reorders", st.reorders)
        .add("missing", check.missing)
        .add("mismatched", check.mismatched)
        .add("unconfirmed", st.unconfirmed)
        .add_checks(st)
        .add("errors", st.error_count())
        .add("kills_in_flight", kills_in_flight)
        .add("in_flight_at_kills", st.kill_in_flight)
        .add("in_flight_confirmed", st.kill_confirmed)
        .add("in_flight_stored", st.kill_stored);
    if let Some((n, _)) = &partial {
        r.add("groups", a.groups)
            .add("group_members", a.group_members)
            .add("group_sent", st.group_sent)
            .add("group_send_ok", st.group_send_ok)
            .add("group_delivered", st.group_delivered)
            .add("kills_in_group_flight", kills_in_group_flight)
            .add("group_in_flight_at_kills", st.group_kill_in_flight)
            .add("group_in_flight_confirmed", st.group_kill_confirmed)
            .add("group_partial", *n);
    }
    let max_down = downtimes_ms.iter().copied().fold(0.0, f64::max);
    r.addf("max_downtime_ms", max_down, 0);
    add_latency(&mut r, &hist);
    r.extra("server_pid_at_end", server_pid)
        .extra("downtimes_ms", serde_json::json!(downtimes_ms))
        .extra("own_echo", st.own_echo)
        .extra("old", st.old)
        .extra("foreign", st.foreign);
    add_errors(&mut r, st);
    if first_online < n {
        r.fail(format!(
            "only {first_online} of {n} clients logged in at first"
        ));
    }
    if not_back > 0 {
        r.fail(format!(
            "{not_back} clients were not back online at the end"
        ));
    }
    if kills < a.kills {
        r.fail(format!("only {kills} of {} kills happened", a.kills));
    }
    if redis_killed < redis_kills {
        r.fail(format!(
            "only {redis_killed} of {redis_kills} kills of Redis happened"
        ));
    }
    let all_kills = kills + redis_killed;
    if all_kills >= MIN_KILLS_FOR_IN_FLIGHT && kills_in_flight == 0 {
        r.fail(format!(
            "none of {all_kills} kills caught a send on the wire"
        ));
    }
    if st.error_count() > 0 {
        r.fail(format!("{} errors", st.error_count()));
    }
    r.fail_on_violations(st, &check);
    if let Some((n, notes)) = &partial {
        if *n > 0 {
            for note in notes {
                eprintln!("imgate-bench chaos: {note}");
            }
            r.fail(format!(
                "{n} group messages reached some of their members but not all"
            ));
        }
        if st.group_send_ok == 0 && a.group_share > 0.0 {
            r.fail("no group message was acknowledged");
        }
        if wait_for_group && all_kills >= MIN_KILLS_FOR_IN_FLIGHT && kills_in_group_flight == 0 {
            r.fail(format!(
                "none of {all_kills} kills caught a group send on the wire"
            ));
        }
    }
    if st.sent == 0 {
        r.fail("no traffic");
    }
    Ok(r.finish(common.json.as_deref()))
}

/// What a due kill takes.
#[derive(Debug, Clone, Copy)]
enum Victim {
    /// A node, picked at random when the kill is due.
    Node,
    Redis,
}

/// The process that is down until its restart.
#[derive(Debug, Clone, Copy)]
enum Down {
    Node(usize),
    Redis,
}

#[cfg(test)]
mod tests {
    use super::{split_words, ServerCtl};

    #[test]
    fn reads_flags_and_pins_both_listen_addresses() {
        let mut s = ServerCtl::new(
            "imgate serve --listen 127.0.0.1:0 --admin-listen=127.0.0.1:0 --admin-token t --jwt-secret=j",
            None,
        )
        .unwrap();
        assert_eq!(s.flag_value("--admin-token").as_deref(), Some("t"));
        assert_eq!(s.flag_value("--jwt-secret").as_deref(), Some("j"));
        assert_eq!(s.flag_value("--data-dir"), None);
        s.pin("--listen", "127.0.0.1:4001".parse().unwrap());
        s.pin("--admin-listen", "127.0.0.1:4002".parse().unwrap());
        assert_eq!(
            s.words,
            [
                "imgate",
                "serve",
                "--listen",
                "127.0.0.1:4001",
                "--admin-listen=127.0.0.1:4002",
                "--admin-token",
                "t",
                "--jwt-secret=j"
            ]
        );
    }

    #[test]
    fn splits_like_a_shell_without_one() {
        assert_eq!(
            split_words(r#"imgate serve --listen 127.0.0.1:0 --jwt-secret 'a b' --x "c\"d" e\ f"#)
                .unwrap(),
            vec![
                "imgate",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--jwt-secret",
                "a b",
                "--x",
                "c\"d",
                "e f"
            ]
        );
        assert!(split_words("  ").is_err());
        assert!(split_words("a 'b").is_err());
    }
}
