//! imgate-bench against the real server, small: relay (with zero gaps, and a self-test that
//! a lost or doubled message is caught), idle through several ping intervals, a reconnect
//! storm, echo, and kill -9 chaos with zero loss.

mod common;

use std::process::{Command, Output};

use common::{temp_data_dir, ServerProc, SECRET};

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_imgate-bench"))
        .args(args)
        .output()
        .expect("run imgate-bench")
}

/// The summary line (the last stdout line starting with "imgate-bench").
fn summary(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .rfind(|l| l.starts_with("imgate-bench "))
        .unwrap_or_else(|| panic!("no summary line in {out:?}"))
        .to_owned()
}

/// A `key=value` field of a summary line.
fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .to_owned()
}

fn num(line: &str, key: &str) -> f64 {
    field(line, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {line}"))
}

fn explain(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

const FAST: &[&str] = &[
    "--durability",
    "none",
    "--rate-limit",
    "100000",
    "--rate-burst",
    "100000",
];

#[test]
fn relay_delivers_everything_in_order() {
    let srv = ServerProc::start(FAST);
    let addr = srv.addr.to_string();
    let pid = srv.pid().to_string();
    let json = temp_data_dir().with_extension("json");
    let json_s = json.to_string_lossy().into_owned();
    let out = bench(&[
        "relay",
        "--addr",
        &addr,
        "--jwt-secret",
        SECRET,
        "--users",
        "50",
        "--devices",
        "2",
        "--rate",
        "1000",
        "--duration",
        "3",
        "--warmup",
        "0.5",
        "--server-pid",
        &pid,
        "--quiet",
        "--json",
        &json_s,
    ]);
    assert!(out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    for key in [
        "errors",
        "gaps",
        "dups",
        "reorders",
        "missing",
        "mismatched",
        "unconfirmed",
    ] {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert_eq!(num(&line, "established"), 100.0, "{line}");
    assert!(num(&line, "delivered_per_s") > 1000.0, "{line}");
    assert!(num(&line, "p99_us") > 0.0, "{line}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json report"))
            .expect("valid JSON");
    assert_eq!(report["ok"], true);
    assert_eq!(report["gaps"], 0);
    let _ = std::fs::remove_file(&json);
}

#[test]
fn relay_catches_a_lost_and_a_doubled_message() {
    let srv = ServerProc::start(FAST);
    let addr = srv.addr.to_string();
    for (fault, key) in [("drop", "gaps"), ("dup", "dups")] {
        let out = bench(&[
            "relay",
            "--addr",
            &addr,
            "--jwt-secret",
            SECRET,
            "--users",
            "10",
            "--rate",
            "500",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--quiet",
            "--uid-prefix",
            fault,
            "--inject-fault",
            fault,
        ]);
        assert!(!out.status.success(), "{fault}: {}", explain(&out));
        assert!(num(&summary(&out), key) > 0.0, "{fault}: {}", explain(&out));
    }
}

#[test]
fn idle_connections_survive_heartbeats() {
    let srv = ServerProc::start(&["--ping-interval", "1s", "--idle-timeout", "3s"]);
    let addr = srv.addr.to_string();
    let pid = srv.pid().to_string();
    let out = bench(&[
        "idle",
        "--addr",
        &addr,
        "--jwt-secret",
        SECRET,
        "--conns",
        "50",
        "--hold",
        "3",
        "--src-ips",
        "2",
        "--server-pid",
        &pid,
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    assert_eq!(num(&line, "established"), 50.0, "{line}");
    assert_eq!(num(&line, "survived"), 50.0, "{line}");
    assert_eq!(num(&line, "dropped"), 0.0, "{line}");
    assert_eq!(field(&line, "limit"), "none", "{line}");
    // Idle past the ping interval: every connection was pinged and answered.
    assert!(num(&line, "pings") >= 50.0, "{line}");
    assert!(num(&line, "rss_bytes_per_conn").is_finite(), "{line}");
}

#[test]
fn idle_reports_the_server_connection_limit() {
    let srv = ServerProc::start(&["--max-connections", "20"]);
    let addr = srv.addr.to_string();
    let out = bench(&[
        "idle",
        "--addr",
        &addr,
        "--jwt-secret",
        SECRET,
        "--conns",
        "30",
        "--hold",
        "0.5",
        "--quiet",
    ]);
    assert!(!out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    assert_eq!(num(&line, "established"), 20.0, "{line}");
    assert_eq!(field(&line, "limit"), "http:503", "{line}");
}

#[test]
fn storm_catches_everyone_up() {
    let srv = ServerProc::start(FAST);
    let addr = srv.addr.to_string();
    let out = bench(&[
        "storm",
        "--addr",
        &addr,
        "--jwt-secret",
        SECRET,
        "--users",
        "100",
        "--msgs",
        "5",
        "--senders",
        "10",
        "--send-rate",
        "2000",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    assert_eq!(num(&line, "delivered"), 500.0, "{line}");
    assert!(num(&line, "caught_up_ms") > 0.0, "{line}");
}

#[test]
fn echo_round_trips() {
    let srv = ServerProc::start(&["--echo"]);
    let addr = srv.addr.to_string();
    let out = bench(&[
        "echo",
        "--addr",
        &addr,
        "--conns",
        "10",
        "--inflight",
        "2",
        "--duration",
        "1",
        "--warmup",
        "0.2",
        "--quiet",
    ]);
    assert!(out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    assert!(num(&line, "msgs_per_s") > 100.0, "{line}");
    assert_eq!(num(&line, "errors"), 0.0, "{line}");
}

/// With a 64 KiB log, generations move all the time: kills land in the middle of moves and
/// of log deletions, and every restart reads a log back.
#[test]
fn chaos_loses_nothing_across_kill_9() {
    let dir = temp_data_dir();
    let server_cmd = format!(
        "'{}' serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --jwt-secret {SECRET} \
         --data-dir '{}' --log-level error --store-log-bytes 65536",
        env!("CARGO_BIN_EXE_imgate"),
        dir.display()
    );
    let out = bench(&[
        "chaos",
        "--server-cmd",
        &server_cmd,
        "--jwt-secret",
        SECRET,
        "--users",
        "20",
        "--kills",
        "2",
        "--duration",
        "10",
        "--rate",
        "200",
        "--seed",
        "7",
        "--quiet",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    assert_eq!(num(&line, "kills"), 2.0, "{line}");
    for key in [
        "gaps",
        "dups",
        "reorders",
        "missing",
        "mismatched",
        "unconfirmed",
        "errors",
    ] {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert!(num(&line, "delivered") > 0.0, "{line}");
    assert_eq!(num(&line, "delivered"), num(&line, "expected"), "{line}");
}
