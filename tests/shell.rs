//! The reactor's own part, over loopback: what the sans-IO gateway cannot decide because it
//! happens in socket calls — reading a peer's FIN that arrived with its data, a reset, the
//! open-file limit the process raises for itself, and the listening line scripts parse.

mod common;

use std::io::Read;
use std::process::Stdio;
use std::time::Duration;

use common::{
    frame, limit_open_files_to, poll_until, read_until_closed, Raw, ServerProc, CLOSE_WITHIN,
};

/// Keep-alive timers far beyond [`CLOSE_WITHIN`], so that a connection that ends within it
/// was ended by the event under test, not reaped.
const LONG_TIMERS: [&str; 4] = ["--ping-interval", "300s", "--idle-timeout", "600s"];

/// Open WebSocket connections, as `/metrics` counts them.
fn open_ws_connections(server: &ServerProc) -> f64 {
    let text = server.admin_request("GET", "/metrics", "");
    // States with no connection are left out of the exposition.
    common::metric_sample(&text, "imgate_connections{state=\"open\",transport=\"ws\"}")
        .unwrap_or(0.0)
}

/// Stops a server started with its stderr piped; returns what it logged.
fn terminate_and_read_log(server: &mut ServerProc) -> String {
    assert!(server.terminate(Duration::from_secs(10)).success());
    let mut log = String::new();
    server
        .take_stderr()
        .expect("stderr piped")
        .read_to_string(&mut log)
        .unwrap();
    log
}

#[test]
fn a_fin_that_arrives_with_the_last_frame_ends_the_connection() {
    let server = ServerProc::start(&[&["--echo"][..], &LONG_TIMERS[..]].concat());
    // Data and FIN sent back to back usually reach the server as one readiness event: the
    // reactor must read on to the EOF then, since no later event will announce it.
    for i in 0..5 {
        let mut raw = Raw::open(server.addr, "/echo");
        let text = format!("last words {i}");
        raw.send(&frame(true, 0x1, text.as_bytes()));
        raw.stream.shutdown(std::net::Shutdown::Write).unwrap();
        let (fin, op, payload) = raw.read_frame().expect("the echo");
        assert_eq!((fin, op, payload), (true, 0x1, text.into_bytes()));
        read_until_closed(&mut raw.stream, CLOSE_WITHIN);
    }
}

#[test]
fn a_reset_connection_is_forgotten_at_once() {
    let server = ServerProc::start(&[&["--echo"][..], &LONG_TIMERS[..]].concat());
    let raw = Raw::open(server.addr, "/echo");
    poll_until(
        Duration::from_secs(5),
        "the connection counted",
        || match open_ws_connections(&server) {
            1.0 => Ok(()),
            n => Err(format!("{n} open")),
        },
    );
    // Closing with a zero linger sends RST instead of FIN: the server's next read fails.
    socket2::SockRef::from(&raw.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(raw);
    poll_until(
        CLOSE_WITHIN,
        "the reset connection gone",
        || match open_ws_connections(&server) {
            0.0 => Ok(()),
            n => Err(format!("{n} open")),
        },
    );
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let mut server = ServerProc::start_with(&["--echo", "--max-connections", "200"], |cmd| {
        limit_open_files_to(cmd, 64, 1024);
        cmd.stderr(Stdio::piped());
    });
    // Twice the soft limit: every one is upgraded only if the limit was raised.
    let held: Vec<Raw> = (0..128).map(|_| Raw::open(server.addr, "/echo")).collect();
    assert_eq!(open_ws_connections(&server), 128.0);
    drop(held);
    let log = terminate_and_read_log(&mut server);
    // 1024 covers --max-connections + 32, so the limit warning must not appear.
    assert!(!log.contains("open-file limit"), "{log}");
}

#[test]
fn the_listening_line_names_the_endpoints() {
    let im = ServerProc::start(&[]);
    assert!(
        im.listening
            .ends_with(&format!("ws://{} (endpoints: /ws)", im.addr)),
        "{}",
        im.listening
    );
    let both = ServerProc::start(&["--echo"]);
    assert!(
        both.listening.ends_with("(endpoints: /echo, /ws)")
            || both.listening.ends_with("(endpoints: /ws, /echo)"),
        "{}",
        both.listening
    );
}

/// The seconds since midnight of a log line (`2026-12-02T16:36:46.839Z WARN ...`).
fn logged_at(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split('T').nth(1)?;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

#[test]
fn running_out_of_descriptors_is_warned_about_at_most_once_a_second() {
    let mut server = ServerProc::start_with(&["--echo"], |cmd| {
        common::limit_open_files(cmd, 48);
        cmd.stderr(Stdio::piped());
    });
    // Two bursts of connections past the limit, well over a second apart, while the first
    // burst's connections are held: each burst is shed, and warned about.
    let mut held = Vec::new();
    for burst in [80, 20] {
        held.extend((0..burst).filter_map(|_| std::net::TcpStream::connect(server.addr).ok()));
        std::thread::sleep(Duration::from_millis(1500));
    }
    drop(held);
    let log = terminate_and_read_log(&mut server);
    let warned: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("out of file descriptors"))
        .map(|l| logged_at(l).expect("a timestamped line"))
        .collect();
    assert!(warned.len() >= 2, "a warning for each burst: {log}");
    for pair in warned.windows(2) {
        assert!(
            pair[1] - pair[0] >= 0.99,
            "warnings {pair:?} s apart: {log}"
        );
    }
}
