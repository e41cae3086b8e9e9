//! Running one scenario over several processes.
//!
//! One process can hold only as many connections as its file limit allows, so the bench
//! re-executes itself: each child takes a share of the clients (`--child I/P`), runs the
//! same phases, and stops at each barrier (`@ready NAME` on stdout) until the parent, once
//! every child has arrived, samples the server and the children and answers `go` on their
//! stdin. Children print `@progress JSON` about once a second and `@result JSON` at the
//! end; the parent sums them. With one process the same code runs with a local coordinator
//! that passes every barrier at once.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::client::Progress;
use crate::sys::{mono_ns, sample_proc, self_cpu_s, ProcSample};

/// The server and the bench at a barrier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snap {
    pub name: String,
    pub t_ns: u64,
    pub srv: Option<ProcSample>,
    /// The bench's own CPU (all its processes), in seconds.
    pub cli_cpu_s: f64,
}

impl Snap {
    pub fn take(name: &str, server_pid: Option<u32>, cli_cpu_s: f64) -> Snap {
        Snap {
            name: name.to_owned(),
            t_ns: mono_ns(),
            srv: server_pid.and_then(sample_proc),
            cli_cpu_s,
        }
    }
}

/// Looks up a snapshot by name.
pub fn snap<'a>(snaps: &'a [Snap], name: &str) -> Option<&'a Snap> {
    snaps.iter().find(|s| s.name == name)
}

/// Seconds between two snapshots.
pub fn secs_between(snaps: &[Snap], a: &str, b: &str) -> f64 {
    match (snap(snaps, a), snap(snaps, b)) {
        (Some(x), Some(y)) => y.t_ns.saturating_sub(x.t_ns) as f64 / 1e9,
        _ => 0.0,
    }
}

pub enum Coord {
    Local {
        snaps: Vec<Snap>,
        server_pid: Option<u32>,
        label: String,
        t0: Instant,
        last_progress: Instant,
        quiet: bool,
    },
    Child {
        go: Arc<AtomicU64>,
        arrived: u64,
        last_progress: Instant,
    },
}

impl Coord {
    pub fn local(label: &str, server_pid: Option<u32>, quiet: bool) -> Coord {
        let mut c = Coord::Local {
            snaps: Vec::new(),
            server_pid,
            label: label.to_owned(),
            t0: Instant::now(),
            last_progress: Instant::now(),
            quiet,
        };
        c.arrive("start");
        c
    }

    /// A child: reads `go` lines from stdin on a thread.
    pub fn child() -> Coord {
        let go = Arc::new(AtomicU64::new(0));
        let g = go.clone();
        std::thread::spawn(move || {
            let stdin = std::io::stdin();
            for line in stdin.lock().lines() {
                match line {
                    Ok(l) if l.trim() == "go" => {
                        g.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    // The parent is gone: let every barrier pass so the child ends.
                    Err(_) => break,
                }
            }
            g.store(u64::MAX / 2, Ordering::SeqCst);
        });
        Coord::Child {
            go,
            arrived: 0,
            last_progress: Instant::now(),
        }
    }

    pub fn is_child(&self) -> bool {
        matches!(self, Coord::Child { .. })
    }

    /// Reaches the barrier `name`; poll [`Coord::released`] until it opens.
    pub fn arrive(&mut self, name: &str) {
        match self {
            Coord::Local {
                snaps, server_pid, ..
            } => snaps.push(Snap::take(name, *server_pid, self_cpu_s())),
            Coord::Child { arrived, .. } => {
                *arrived += 1;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "@ready {name}");
                let _ = out.flush();
            }
        }
    }

    pub fn released(&self) -> bool {
        match self {
            Coord::Local { .. } => true,
            Coord::Child { go, arrived, .. } => go.load(Ordering::SeqCst) >= *arrived,
        }
    }

    /// About once a second: a progress line on stderr (or to the parent). `p` is only
    /// called then.
    pub fn progress(&mut self, phase: &str, p: impl FnOnce() -> Progress) {
        match self {
            Coord::Local {
                label,
                t0,
                last_progress,
                quiet,
                ..
            } => {
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    *last_progress = Instant::now();
                    if !*quiet {
                        eprintln!("{}", progress_line(label, t0.elapsed(), phase, &p()));
                    }
                }
            }
            Coord::Child { last_progress, .. } => {
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    *last_progress = Instant::now();
                    let json = serde_json::to_string(&(phase, p())).unwrap_or_default();
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "@progress {json}");
                    let _ = out.flush();
                }
            }
        }
    }

    /// The snapshots taken at the barriers (local only; the parent has its own).
    pub fn snaps(&self) -> Vec<Snap> {
        match self {
            Coord::Local { snaps, .. } => snaps.clone(),
            Coord::Child { .. } => Vec::new(),
        }
    }
}

pub fn progress_line(label: &str, t: Duration, phase: &str, p: &Progress) -> String {
    format!(
        "[{label} {:>6.1}s] {phase}: online={} connecting={} sent={} send_ok={} delivered={} errors={} violations={}",
        t.as_secs_f64(),
        p.online,
        p.connecting,
        p.sent,
        p.send_ok,
        p.delivered,
        p.errors,
        p.violations
    )
}

/// Writes a child's result and ends its part.
pub fn child_result<T: Serialize>(result: &T) {
    let json = serde_json::to_string(result).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "@result {json}");
    let _ = out.flush();
}

/// Runs `procs` children of this same command (each with `--child I/P --run-id R`),
/// passes them through their barriers together, and returns their results and the
/// snapshots taken at each barrier.
pub fn run_children(
    label: &str,
    procs: usize,
    run_id: u32,
    server_pid: Option<u32>,
    limit: Duration,
    quiet: bool,
) -> Result<(Vec<serde_json::Value>, Vec<Snap>), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own binary: {e}"))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let mut snaps = vec![Snap::take("start", server_pid, 0.0)];
    let mut children: Vec<Child> = Vec::new();
    let (tx, rx) = mpsc::channel::<(usize, Option<String>)>();
    for i in 0..procs {
        let mut child = Command::new(&exe)
            .args(&args)
            .arg("--child")
            .arg(format!("{i}/{procs}"))
            .arg("--run-id")
            .arg(run_id.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start child process: {e}"))?;
        let stdout = child.stdout.take().ok_or("no child stdout")?;
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send((i, Some(line))).is_err() {
                    return;
                }
            }
            let _ = tx.send((i, None));
        });
        children.push(child);
    }
    drop(tx);
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let children_cpu = || -> f64 {
        pids.iter()
            .filter_map(|&p| sample_proc(p))
            .map(|s| s.cpu_s)
            .sum()
    };
    let t0 = Instant::now();
    let deadline = t0 + limit;
    let mut ready: Vec<u64> = vec![0; procs];
    let mut barrier_names: Vec<String> = Vec::new();
    let mut results: Vec<Option<serde_json::Value>> = vec![None; procs];
    let mut progress: Vec<(String, Progress)> = vec![(String::new(), Progress::default()); procs];
    let mut last_print = Instant::now();
    let mut ended = 0;
    let mut failure = None;
    while ended < procs {
        let now = Instant::now();
        if now >= deadline {
            failure = Some(format!("children did not finish within {limit:?}"));
            break;
        }
        let msg = rx.recv_timeout((deadline - now).min(Duration::from_millis(200)));
        if !quiet && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            let mut sum = Progress::default();
            for (_, p) in &progress {
                sum.online += p.online;
                sum.connecting += p.connecting;
                sum.sent += p.sent;
                sum.send_ok += p.send_ok;
                sum.delivered += p.delivered;
                sum.errors += p.errors;
                sum.violations += p.violations;
            }
            let phase = progress.first().map(|(ph, _)| ph.as_str()).unwrap_or("");
            eprintln!(
                "{}",
                progress_line(&format!("{label} x{procs}"), t0.elapsed(), phase, &sum)
            );
        }
        let (i, line) = match msg {
            Ok(m) => m,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        let Some(line) = line else {
            ended += 1;
            if results[i].is_none() {
                failure = Some(format!("child {i} ended without a result"));
                break;
            }
            continue;
        };
        if let Some(name) = line.strip_prefix("@ready ") {
            ready[i] += 1;
            let n = ready[i] as usize;
            if barrier_names.len() < n {
                barrier_names.push(name.to_owned());
            }
            if ready.iter().all(|&r| r as usize >= n) {
                snaps.push(Snap::take(name, server_pid, children_cpu()));
                for c in &mut children {
                    if let Some(stdin) = c.stdin.as_mut() {
                        let _ = writeln!(stdin, "go");
                        let _ = stdin.flush();
                    }
                }
            }
        } else if let Some(json) = line.strip_prefix("@progress ") {
            if let Ok(p) = serde_json::from_str::<(String, Progress)>(json) {
                progress[i] = p;
            }
        } else if let Some(json) = line.strip_prefix("@result ") {
            match serde_json::from_str(json) {
                Ok(v) => results[i] = Some(v),
                Err(e) => {
                    failure = Some(format!("child {i} sent an unreadable result: {e}"));
                    break;
                }
            }
        } else {
            println!("{line}");
        }
    }
    if let Some(f) = failure {
        for c in &mut children {
            let _ = c.kill();
            let _ = c.wait();
        }
        return Err(f);
    }
    for c in &mut children {
        let _ = c.wait();
    }
    snaps.push(Snap::take("end", server_pid, children_cpu()));
    Ok((results.into_iter().flatten().collect(), snaps))
}
