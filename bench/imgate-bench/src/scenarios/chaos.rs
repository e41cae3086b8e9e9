//! `chaos`: the bench starts the server itself, runs relay traffic with reconnecting
//! clients, and kills the server with SIGKILL at random moments, restarting it each time
//! with the same command (same data directory, same port). Clients come back, resume their
//! inbox, and resend with the same client_msg_id whatever had no SendOk. A kill waits (up to
//! [`MAX_KILL_WAIT_S`]) for sends on the wire, so that it lands between sends and their
//! SendOks; those sends are followed to their SendOk after the restart. At the end, with the
//! server up, it proves: every message that got a SendOk reached every device of its
//! recipient, in order, without gaps and as it was sent; no message was delivered twice
//! under two seqs.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::client::{CState, Fleet, Traffic};
use crate::coord::Coord;
use crate::report::{add_errors, add_latency, Report};
use crate::scenarios::{final_sync, fleet_cfg, run_for, run_until, setup, Part};
use crate::sys::{mono_ns, Rng};
use crate::{check_loopback, ChaosArgs, Resume};

/// Seconds a due kill waits for sends on the wire (the clients may still be coming back from
/// the previous kill); past that it kills anyway.
pub const MAX_KILL_WAIT_S: f64 = 1.0;

/// From this many kills on, a run in which no kill caught a send on the wire fails: it did
/// not test what happens to a message between its send and its SendOk.
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

/// The server under test: started, killed and restarted by the bench.
pub struct ServerCtl {
    words: Vec<String>,
    log: Option<PathBuf>,
    child: Option<Child>,
    pub addr: Option<SocketAddr>,
    pub starts: u32,
}

impl ServerCtl {
    pub fn new(cmd: &str, log: Option<PathBuf>) -> Result<ServerCtl, String> {
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
            log,
            child: None,
            addr: None,
            starts: 0,
        })
    }

    /// The value of `--jwt-secret` in the server command, if it has one.
    pub fn jwt_secret(&self) -> Option<String> {
        let w = &self.words;
        w.iter()
            .position(|x| x == "--jwt-secret")
            .and_then(|i| w.get(i + 1).cloned())
            .or_else(|| {
                w.iter()
                    .find_map(|x| x.strip_prefix("--jwt-secret=").map(str::to_owned))
            })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// Pins the listen address for restarts (port 0 becomes the port the first start got).
    fn pin_listen(&mut self, addr: SocketAddr) {
        let a = addr.to_string();
        let mut i = 0;
        while i < self.words.len() {
            if self.words[i] == "--listen" && i + 1 < self.words.len() {
                self.words[i + 1] = a.clone();
                return;
            }
            if self.words[i].starts_with("--listen=") {
                self.words[i] = format!("--listen={a}");
                return;
            }
            i += 1;
        }
    }

    /// Starts the server and waits for its "listening on ws://ADDR" line.
    pub fn start(&mut self) -> Result<SocketAddr, String> {
        let mut last_err = String::new();
        for _attempt in 0..20 {
            let mut cmd = Command::new(&self.words[0]);
            cmd.args(&self.words[1..])
                .stdin(Stdio::null())
                .stdout(Stdio::piped());
            match &self.log {
                Some(path) => {
                    let f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
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
                    let _ = tx.send(line);
                }
            });
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut found = None;
            while Instant::now() < deadline {
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(line) => {
                        if let Some(rest) = line.split("listening on ws://").nth(1) {
                            found = rest
                                .split_whitespace()
                                .next()
                                .and_then(|a| a.parse::<SocketAddr>().ok());
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        if let Ok(Some(status)) = child.try_wait() {
                            last_err = format!("server exited with {status} before listening");
                            break;
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        let _ = child.wait();
                        last_err = "server closed its stdout before listening".into();
                        break;
                    }
                }
            }
            let Some(mut addr) = found else {
                let _ = child.kill();
                let _ = child.wait();
                if last_err.is_empty() {
                    last_err = "no listening line within 30 s".into();
                }
                std::thread::sleep(Duration::from_millis(250));
                continue;
            };
            if addr.ip().is_unspecified() {
                addr = SocketAddr::from(([127, 0, 0, 1], addr.port()));
            }
            if let Err(e) = check_loopback(&addr) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            if self.starts == 0 {
                self.pin_listen(addr);
            }
            self.starts += 1;
            self.child = Some(child);
            self.addr = Some(addr);
            return Ok(addr);
        }
        Err(format!("the server did not start: {last_err}"))
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
    let mut server = ServerCtl::new(&a.server_cmd, a.server_log.clone())?;
    if common.jwt_secret.is_none() {
        common.jwt_secret = server.jwt_secret();
    }
    let addr = server.start()?;
    common.addr = addr;
    let s = setup(&common)?;
    if a.users < 2 {
        return Err("chaos needs at least 2 users".into());
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

    // Kill moments, uniformly within the traffic, in order.
    let mut rng = Rng::new(s.seed ^ 0xC4A0_5000);
    let mut kill_at: Vec<f64> = (0..a.kills)
        .map(|_| a.duration * (0.05 + 0.9 * rng.f64()))
        .collect();
    kill_at.sort_by(f64::total_cmp);
    let t0 = Instant::now();
    fleet.traffic = Traffic::Rate {
        per_s: a.rate,
        t0_ns: mono_ns(),
        done: 0,
    };
    fleet.measure_from = Some(mono_ns());
    let mut kills = 0u32;
    let mut kills_in_flight = 0u32;
    let mut restart_at: Option<Instant> = None;
    let mut downtimes_ms: Vec<f64> = Vec::new();
    let mut killed_at = Instant::now();
    let end = t0 + Duration::from_secs_f64(a.duration);
    let mut start_error = None;
    // Traffic runs for the duration, and on while a kill is still due.
    while Instant::now() < end || ((kills as usize) < kill_at.len() && start_error.is_none()) {
        fleet.step(tick).map_err(|e| format!("poll failed: {e}"))?;
        coord.progress("chaos", || fleet.progress());
        let now = Instant::now();
        let elapsed = now.duration_since(t0).as_secs_f64();
        let due = kill_at.get(kills as usize).copied();
        if server.is_up()
            && due.is_some_and(|at| {
                elapsed >= at && (fleet.sends_on_wire() > 0 || elapsed >= at + MAX_KILL_WAIT_S)
            })
        {
            let in_flight = fleet.mark_in_flight();
            server.kill9();
            kills += 1;
            if in_flight > 0 {
                kills_in_flight += 1;
            }
            killed_at = now;
            let delay = a.restart_delay_ms + rng.below(a.restart_delay_ms + 1);
            restart_at = Some(now + Duration::from_millis(delay));
            if !common.quiet {
                eprintln!(
                    "[chaos {elapsed:>6.1}s] kill -9 #{kills} (online {}, sends on the wire {in_flight}, unacked sends {})",
                    fleet.online(),
                    fleet.unacked_sends()
                );
            }
        }
        if restart_at.is_some_and(|t| now >= t) {
            restart_at = None;
            match server.start() {
                Ok(_) => downtimes_ms.push(killed_at.elapsed().as_secs_f64() * 1000.0),
                Err(e) => {
                    start_error = Some(e);
                    break;
                }
            }
        }
    }
    fleet.traffic = Traffic::Off;
    if start_error.is_none() && !server.is_up() {
        match server.start() {
            Ok(_) => downtimes_ms.push(killed_at.elapsed().as_secs_f64() * 1000.0),
            Err(e) => start_error = Some(e),
        }
    }
    if let Some(e) = start_error {
        return Err(format!("restart after kill #{kills} failed: {e}"));
    }
    let server_pid = server.pid();

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
    let part = Part::of(&fleet, s.nofile);
    fleet.disconnect_all();
    server.stop();

    let st = &part.stats;
    let check = part.ledger.check();
    let hist = crate::report::merge_hist([part.hist.as_slice()]);
    let mut r = Report::new("chaos");
    let dups = st.dups + check.extra;
    r.add("users", a.users)
        .add("devices", devices)
        .add("kills", kills)
        .add("restarts", server.starts.saturating_sub(1))
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
    if kills >= MIN_KILLS_FOR_IN_FLIGHT && kills_in_flight == 0 {
        r.fail(format!("none of {kills} kills caught a send on the wire"));
    }
    if st.error_count() > 0 {
        r.fail(format!("{} errors", st.error_count()));
    }
    r.fail_on_violations(st, &check);
    if st.sent == 0 {
        r.fail("no traffic");
    }
    Ok(r.finish(common.json.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::split_words;

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
