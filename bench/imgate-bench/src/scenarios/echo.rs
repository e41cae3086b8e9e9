//! `echo`: plain WebSocket echo (the server's /echo, or any echo server): N connections,
//! each with K binary messages of S bytes in flight, replaced as their echoes come back.
//! Round-trip time from queuing a message to reading its echo (matched in order per
//! connection), messages per second over the measured window.

use std::collections::VecDeque;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::client::new_hist;
use crate::coord::Snap;
use crate::net::{Ev, Net};
use crate::report::{add_cpu, add_latency, Report};
use crate::scenarios::setup;
use crate::sys::{mono_ns, self_cpu_s};
use crate::EchoArgs;

struct Conn {
    key: Option<usize>,
    opened: bool,
    sent: VecDeque<u64>,
}

pub fn run(a: EchoArgs) -> Result<ExitCode, String> {
    let s = setup(&a.common)?;
    if u64::from(a.conns) > crate::scenarios::fd_room(s.nofile) {
        return Err(format!(
            "{} connections exceed this process's file limit ({})",
            a.conns, s.nofile
        ));
    }
    let mut net = Net::new(a.common.addr.clone(), &a.path, None, s.seed)
        .map_err(|e| format!("cannot create the event loop: {e}"))?;
    let payload: Vec<u8> = (0..a.size).map(|i| (i % 251) as u8).collect();
    let mut conns: Vec<Conn> = (0..a.conns)
        .map(|_| Conn {
            key: None,
            opened: false,
            sent: VecDeque::new(),
        })
        .collect();
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    fn err(errors: &mut std::collections::BTreeMap<String, u64>, k: String) {
        *errors.entry(k).or_default() += 1;
    }
    let mut snaps = vec![Snap::take("start", a.common.server_pid, self_cpu_s())];
    let t_start = Instant::now();
    let setup_deadline = t_start + Duration::from_secs_f64(a.common.setup_timeout);
    let conn_timeout_ms = (a.common.connect_timeout * 1000.0) as u64;
    let mut next = 0usize;
    let mut connecting = 0usize;
    let mut open = 0usize;
    let mut failed = 0usize;
    let mut hist = new_hist();
    let mut msgs_window = 0u64;
    let mut window: Option<(u64, u64)> = None; // (start, end) ns
    let mut phase = 0; // 0 connect, 1 warmup, 2 measure, 3 done
    let mut phase_end = Instant::now();
    let mut last_progress = Instant::now();
    let mut total_echoes = 0u64;
    loop {
        let now = Instant::now();
        // Start connections.
        while phase == 0 && next < conns.len() && connecting < a.common.connect_concurrency {
            let src = if a.common.src_ips > 1 {
                Some(std::net::Ipv4Addr::new(
                    127,
                    0,
                    0,
                    1 + (next as u32 % a.common.src_ips) as u8,
                ))
            } else {
                None
            };
            match net.connect(src, next, crate::sys::mono_ms() + conn_timeout_ms, None) {
                Ok(k) => {
                    conns[next].key = Some(k);
                    connecting += 1;
                }
                Err(why) => {
                    err(&mut errors, why.kind());
                    failed += 1;
                }
            }
            next += 1;
        }
        if phase == 0 && (open + failed == conns.len() || now >= setup_deadline) {
            if open < conns.len() {
                err(&mut errors, "setup: not all connections opened".into());
            }
            phase = 1;
            phase_end = now + Duration::from_secs_f64(a.warmup);
            // Start the closed loops.
            for c in conns.iter_mut() {
                if let Some(k) = c.key.filter(|&k| net.is_open(k)) {
                    for _ in 0..a.inflight {
                        c.sent.push_back(mono_ns());
                        net.send_with(k, payload.len(), |b| b.extend_from_slice(&payload));
                    }
                }
            }
        } else if phase == 1 && now >= phase_end {
            phase = 2;
            phase_end = now + Duration::from_secs_f64(a.duration);
            snaps.push(Snap::take("measure", a.common.server_pid, self_cpu_s()));
            window = Some((mono_ns(), 0));
        } else if phase == 2 && now >= phase_end {
            snaps.push(Snap::take("measured", a.common.server_pid, self_cpu_s()));
            if let Some(w) = window.as_mut() {
                w.1 = mono_ns();
            }
            break;
        }
        net.flush();
        if now.duration_since(last_progress) >= Duration::from_secs(1) && !a.common.quiet {
            last_progress = now;
            eprintln!(
                "[echo {:>6.1}s] open={open} echoes={total_echoes} errors={}",
                t_start.elapsed().as_secs_f64(),
                errors.values().sum::<u64>()
            );
        }
        let (events, arena) = net
            .poll(Some(Duration::from_millis(if phase == 0 { 10 } else { 1 })))
            .map_err(|e| format!("poll failed: {e}"))?;
        let t = mono_ns();
        for e in &events {
            let Some(c) = conns.get_mut(e.owner) else {
                continue;
            };
            if c.key != Some(e.key) {
                continue;
            }
            match &e.ev {
                Ev::Open => {
                    c.opened = true;
                    connecting -= 1;
                    open += 1;
                    if phase >= 1 {
                        for _ in 0..a.inflight {
                            c.sent.push_back(mono_ns());
                            net.send_with(e.key, payload.len(), |b| b.extend_from_slice(&payload));
                        }
                    }
                }
                Ev::Data { start, end, .. } => {
                    let Some(ts) = c.sent.pop_front() else {
                        err(&mut errors, "unsolicited message".into());
                        continue;
                    };
                    if end - start != payload.len() {
                        err(&mut errors, "wrong echo size".into());
                    }
                    total_echoes += 1;
                    if let Some((w0, 0)) = window {
                        if ts >= w0 {
                            let _ = hist.record(t.saturating_sub(ts).max(1));
                        }
                        msgs_window += 1;
                    }
                    c.sent.push_back(mono_ns());
                    net.send_with(e.key, payload.len(), |b| b.extend_from_slice(&payload));
                }
                Ev::Ping => {}
                Ev::Closed(why) => {
                    if !c.opened {
                        connecting -= 1;
                        failed += 1;
                    } else {
                        open -= 1;
                    }
                    c.key = None;
                    err(&mut errors, why.kind());
                }
            }
        }
        net.recycle(events, arena);
        net.expire(crate::sys::mono_ms());
    }
    let secs = crate::coord::secs_between(&snaps, "measure", "measured").max(1e-9);
    let mut r = Report::new("echo");
    let errs: u64 = errors.values().sum();
    r.add("conns", a.conns)
        .add("open", open as u64)
        .add("size", a.size as u64)
        .add("inflight", a.inflight)
        .addf("secs", secs, 2)
        .add("msgs", msgs_window)
        .addf("msgs_per_s", msgs_window as f64 / secs, 0);
    add_latency(&mut r, &hist);
    r.add("errors", errs);
    if let Some(srv_cpu) = add_cpu(&mut r, &snaps, "measure", "measured") {
        if msgs_window > 0 {
            r.addf("srv_us_per_msg", srv_cpu * 1e6 / msgs_window as f64, 2);
        }
    }
    r.extra("errors_by_kind", serde_json::json!(errors));
    for (k, v) in &errors {
        eprintln!("  error {k}: {v}");
    }
    if errs > 0 {
        r.fail(format!("{errs} errors"));
    }
    Ok(r.finish(a.common.json.as_deref()))
}
