//! imgate-bench against the real server, small: relay with zero gaps, group fanout with zero
//! gaps, idle through several ping intervals, a reconnect storm, echo, and kill -9 chaos with
//! zero loss, resuming after the last seq seen and from the stored cursor, and with group
//! messages among the 1:1 ones. The negative controls: the bench plays the faults a server
//! could make (`--inject`: a message lost, doubled under its seq or under two, reordered,
//! swapped, misrouted, with another sender or payload, re-delivered as another message; for
//! fanout a lost, misrouted or altered group message; for chaos with groups a group message
//! lost at one member) and its verification must catch each, counted as what it is; and
//! chaos against a server that acknowledges before syncing (`--durability none`) must
//! report the loss, with group traffic on too.
//!
//! imgate-bench is a crate of its own (bench/imgate-bench), so cargo does not build it for
//! these tests: they run the `imgate-bench` beside the `imgate` they test, in the workspace's
//! one target directory, which `cargo build --release --workspace` (tests/run.sh) puts there.
//! A missing one, or one older than its sources, fails every test here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::SystemTime;

use common::{temp_data_dir, ServerProc, SECRET};

/// `imgate-bench` in the directory of `imgate` (`target/release/` under `cargo test
/// --release`), checked to exist and to be newer than every source file of its crate.
fn bench_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let server = Path::new(env!("CARGO_BIN_EXE_imgate"));
        let bin = server.with_file_name(format!("imgate-bench{}", std::env::consts::EXE_SUFFIX));
        let profile = server.parent().and_then(|d| d.file_name());
        let flag = match profile.map(|p| p.to_string_lossy()) {
            None => String::new(),
            Some(p) if p == "debug" => String::new(),
            Some(p) if p == "release" => " --release".to_owned(),
            Some(p) => format!(" --profile {p}"),
        };
        let build = format!("cargo build{flag} -p imgate-bench");
        let built = std::fs::metadata(&bin)
            .and_then(|m| m.modified())
            .unwrap_or_else(|e| {
                panic!(
                    "{}: {e}. imgate-bench is not built with the server's tests; \
                     build it first: `{build}` (or `cargo build --release --workspace`)",
                    bin.display()
                )
            });
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/imgate-bench/src");
        if let Some((newer, _)) = newest_rs(&src).filter(|(_, t)| *t > built) {
            panic!(
                "{} is older than {}: rebuild it first: `{build}`",
                bin.display(),
                newer.display()
            );
        }
        bin
    })
}

/// The most recently modified `.rs` file under `dir`, if it can be read.
fn newest_rs(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut newest: Option<(PathBuf, SystemTime)> = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let found = if path.is_dir() {
            newest_rs(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .map(|t| (path, t))
        } else {
            None
        };
        if let Some(f) = found.filter(|f| newest.as_ref().is_none_or(|n| f.1 > n.1)) {
            newest = Some(f);
        }
    }
    newest
}

fn bench(args: &[&str]) -> Output {
    Command::new(bench_bin())
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

/// The JSON report a run wrote to `path`, if it wrote a valid one; the file is removed.
fn take_report(path: &std::path::Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok();
    let _ = std::fs::remove_file(path);
    text.and_then(|t| serde_json::from_str(&t).ok())
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
    let report = take_report(&json);
    assert!(out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let line = summary(&out);
    for key in VIOLATIONS {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert_eq!(num(&line, "established"), 100.0, "{line}");
    // Every message reached both devices of its recipient and the sender's other device.
    let send_ok = report["send_ok"].as_f64().expect("send_ok");
    assert!(send_ok > 0.0, "{line}");
    assert_eq!(num(&line, "sent"), send_ok, "{line}");
    assert_eq!(num(&line, "expected"), 3.0 * send_ok, "{line}");
    assert_eq!(num(&line, "delivered"), num(&line, "expected"), "{line}");
    // Latency was measured (a value, not a bound on it).
    assert!(num(&line, "p99_us") > 0.0, "{line}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["gaps"], 0);
}

/// The counters of a relay or chaos summary that must be 0 in a clean run.
const VIOLATIONS: [&str; 11] = [
    "errors",
    "gaps",
    "dups",
    "reorders",
    "missing",
    "mismatched",
    "unconfirmed",
    "misrouted",
    "wrong_fields",
    "corrupt",
    "changed",
];

/// A small relay run against `addr` with a fault played on every 97th new delivery; it must
/// fail. Returns its summary line.
fn relay_with_fault(addr: &str, flag: &str, fault: &str) -> String {
    let prefix = format!("{fault}-");
    let out = bench(&[
        "relay",
        "--addr",
        addr,
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
        "--drain",
        "3",
        "--quiet",
        "--uid-prefix",
        &prefix,
        flag,
        fault,
    ]);
    assert!(!out.status.success(), "{fault}: {}", explain(&out));
    let line = summary(&out);
    assert!(num(&line, "injected") >= 1.0, "{fault}: {line}");
    line
}

/// A lost message is a gap and a missing delivery; one doubled under its seq a duplicate;
/// one delivered again under the next seq shows in the ledger; one out of order a
/// reordering; one swapped for a message never sent a sender whose hash sum is off.
#[test]
fn relay_catches_lost_doubled_reordered_and_swapped_messages() {
    let srv = ServerProc::start(FAST);
    let addr = srv.addr.to_string();

    let line = relay_with_fault(&addr, "--inject", "drop");
    let n = num(&line, "injected");
    assert_eq!(num(&line, "gaps"), n, "{line}");
    assert_eq!(num(&line, "missing"), n, "{line}");
    assert_eq!(num(&line, "dups") + num(&line, "reorders"), 0.0, "{line}");

    for flag in ["--inject", "--inject-fault"] {
        let line = relay_with_fault(&addr, flag, "dup");
        assert_eq!(num(&line, "dups"), num(&line, "injected"), "{line}");
        assert_eq!(num(&line, "gaps") + num(&line, "missing"), 0.0, "{line}");
    }

    let line = relay_with_fault(&addr, "--inject", "dup-seq");
    assert!(
        num(&line, "dups") + num(&line, "mismatched") >= 1.0,
        "{line}"
    );

    let line = relay_with_fault(&addr, "--inject", "reorder");
    let r = num(&line, "reorders");
    assert!(r >= 1.0 && r <= num(&line, "injected"), "{line}");

    let line = relay_with_fault(&addr, "--inject", "swap");
    assert!(num(&line, "mismatched") >= 1.0, "{line}");
    for key in ["gaps", "dups", "missing", "reorders"] {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
}

/// A message in an inbox it was not sent to, one naming another sender, and one with a
/// changed payload byte are each counted as what they are.
#[test]
fn relay_catches_misrouted_and_altered_messages() {
    let srv = ServerProc::start(FAST);
    let addr = srv.addr.to_string();
    for (fault, key) in [
        ("misroute", "misrouted"),
        ("from-uid", "wrong_fields"),
        ("payload", "corrupt"),
    ] {
        let line = relay_with_fault(&addr, "--inject", fault);
        assert_eq!(num(&line, key), num(&line, "injected"), "{fault}: {line}");
        assert_eq!(
            num(&line, "gaps") + num(&line, "dups"),
            0.0,
            "{fault}: {line}"
        );
    }
}

/// A small fanout run against `srv`: 2 groups of 20 members at 200 group messages/s, with
/// `extra` flags. Returns its output.
fn fanout(srv: &ServerProc, prefix: &str, extra: &[&str]) -> Output {
    let addr = srv.addr.to_string();
    let admin = srv.admin.to_string();
    let mut args = vec![
        "fanout",
        "--addr",
        &addr,
        "--admin",
        &admin,
        "--jwt-secret",
        SECRET,
        "--groups",
        "2",
        "--members",
        "20",
        "--uid-prefix",
        prefix,
        "--quiet",
    ];
    args.extend(extra);
    bench(&args)
}

/// Every group message reaches every other member's device once, in order, with no gap in
/// any member's inbox (the sender's own seq learnt from its SendOk), with the durable store.
#[test]
fn fanout_delivers_every_group_message_to_every_other_member() {
    let srv = ServerProc::start(&["--rate-limit", "100000", "--rate-burst", "100000"]);
    let pid = srv.pid().to_string();
    let json = temp_data_dir().with_extension("json");
    let json_s = json.to_string_lossy().into_owned();
    let out = fanout(
        &srv,
        "",
        &[
            "--rate",
            "200",
            "--duration",
            "3",
            "--warmup",
            "0.5",
            "--server-pid",
            &pid,
            "--json",
            &json_s,
        ],
    );
    let report = take_report(&json);
    assert!(out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let line = summary(&out);
    for key in VIOLATIONS {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert_eq!(num(&line, "established"), 40.0, "{line}");
    let send_ok = report["send_ok"].as_f64().expect("send_ok");
    assert!(send_ok > 0.0, "{line}");
    assert_eq!(num(&line, "sent"), send_ok, "{line}");
    // Each to the 19 other members of its group.
    assert_eq!(num(&line, "expected"), 19.0 * send_ok, "{line}");
    assert_eq!(num(&line, "delivered"), num(&line, "expected"), "{line}");
    assert!(num(&line, "delivered_per_s") > 0.0, "{line}");
    assert!(num(&line, "p99_us") > 0.0, "{line}");
    assert_eq!(report["ok"], true);
    // The groups were made through the admin API, and hold exactly the run's members.
    let g = srv.admin_request("GET", "/v1/groups/fan2x20g1", "");
    assert!(g.starts_with("HTTP/1.1 200"), "{g}");
    assert!(
        g.contains("\"u20\"") && g.contains("\"u39\"") && !g.contains("\"u19\""),
        "{g}"
    );
}

/// The negative controls for fanout: a group message lost at a member is a gap and a
/// missing delivery; one naming a user as well as the group, misrouted; one with another
/// sender, wrong fields. Each run must fail.
#[test]
fn fanout_catches_lost_and_misrouted_group_messages() {
    let srv = ServerProc::start(FAST);
    for (fault, key) in [
        ("drop", "gaps"),
        ("misroute", "misrouted"),
        ("from-uid", "wrong_fields"),
        ("payload", "corrupt"),
    ] {
        let prefix = format!("{fault}-");
        let out = fanout(
            &srv,
            &prefix,
            &[
                "--rate",
                "100",
                "--duration",
                "1",
                "--warmup",
                "0",
                "--drain",
                "3",
                "--inject",
                fault,
            ],
        );
        assert!(!out.status.success(), "{fault}: {}", explain(&out));
        let line = summary(&out);
        let n = num(&line, "injected");
        assert!(n >= 1.0, "{fault}: {line}");
        assert_eq!(num(&line, key), n, "{fault}: {line}");
        if fault == "drop" {
            assert_eq!(num(&line, "missing"), n, "{line}");
            assert_eq!(num(&line, "dups") + num(&line, "reorders"), 0.0, "{line}");
        } else {
            assert_eq!(
                num(&line, "gaps") + num(&line, "dups"),
                0.0,
                "{fault}: {line}"
            );
        }
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
    // Every connection came up and echoes flowed, each of the size sent.
    assert_eq!(num(&line, "open"), 10.0, "{line}");
    assert!(num(&line, "msgs") > 0.0, "{line}");
    assert_eq!(num(&line, "errors"), 0.0, "{line}");
}

/// `imgate serve` for chaos, in `dir`, with `extra` flags. With a 64 KiB log, generations
/// move all the time: kills land in the middle of moves and of log deletions, and every
/// restart reads a log back.
fn chaos_server(dir: &std::path::Path, extra: &str) -> String {
    format!(
        "'{}' serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 --jwt-secret {SECRET} \
         --data-dir '{}' --log-level error --store-log-bytes 65536 {extra}",
        env!("CARGO_BIN_EXE_imgate"),
        dir.display()
    )
}

/// A chaos run of 20 users at 200 msgs/s with `kills` kills over `secs` seconds.
fn chaos(
    server_cmd: &str,
    kills: &str,
    secs: &str,
    json: &std::path::Path,
    extra: &[&str],
) -> Output {
    let json = json.to_string_lossy().into_owned();
    let mut args = vec![
        "chaos",
        "--server-cmd",
        server_cmd,
        "--jwt-secret",
        SECRET,
        "--users",
        "20",
        "--kills",
        kills,
        "--duration",
        secs,
        "--rate",
        "200",
        "--seed",
        "7",
        "--quiet",
        "--json",
        &json,
    ];
    args.extend_from_slice(extra);
    bench(&args)
}

#[test]
fn chaos_loses_nothing_across_kill_9() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let out = chaos(&chaos_server(&dir, ""), "3", "10", &json, &[]);
    let _ = std::fs::remove_dir_all(&dir);
    let report = take_report(&json);
    assert!(out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let line = summary(&out);
    assert_eq!(num(&line, "kills"), 3.0, "{line}");
    for key in VIOLATIONS {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert!(num(&line, "delivered") > 0.0, "{line}");
    assert_eq!(num(&line, "delivered"), num(&line, "expected"), "{line}");
    // Kills landed on sends on the wire, and each of those got its SendOk after all.
    assert!(num(&line, "kills_in_flight") >= 1.0, "{line}");
    let in_flight = num(&line, "in_flight_at_kills");
    assert!(in_flight >= num(&line, "kills_in_flight"), "{line}");
    assert_eq!(num(&line, "in_flight_confirmed"), in_flight, "{line}");
    assert_eq!(report["ok"], true);
}

/// Acks every 3 s: whatever a device got in the last 3 s before a kill is re-delivered
/// after it, since the login resumes from the stored cursor.
const LAZY_ACKS: [&str; 6] = [
    "--resume",
    "cursor",
    "--ack-tick-ms",
    "3000",
    "--ack-every",
    "1000",
];

#[test]
fn chaos_resumed_from_the_cursor_loses_nothing() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let out = chaos(&chaos_server(&dir, ""), "3", "6", &json, &LAZY_ACKS);
    let _ = std::fs::remove_dir_all(&dir);
    let report = take_report(&json);
    assert!(out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let line = summary(&out);
    for key in VIOLATIONS {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert_eq!(num(&line, "delivered"), num(&line, "expected"), "{line}");
    // Messages were re-delivered, each as it first came.
    assert!(report["old"].as_f64().expect("old") > 0.0, "{line}");
}

/// A re-delivered seq that carries another message than first came under it is caught.
#[test]
fn chaos_catches_a_redelivery_that_is_another_message() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let mut extra = LAZY_ACKS.to_vec();
    extra.extend(["--inject", "redelivery", "--inject-every", "1"]);
    let out = chaos(&chaos_server(&dir, ""), "3", "6", &json, &extra);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = take_report(&json);
    assert!(!out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    let n = num(&line, "injected");
    assert!(n >= 1.0, "{line}");
    assert_eq!(num(&line, "changed"), n, "{line}");
    assert_eq!(num(&line, "missing") + num(&line, "gaps"), 0.0, "{line}");
}

/// A server that acknowledges before its store syncs (`--durability none`: redb commits
/// that only a later durable commit would persist, and none comes) loses what it
/// acknowledged at every kill -9, and chaos says so.
#[test]
fn chaos_reports_the_loss_when_the_store_does_not_sync() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let out = chaos(
        &chaos_server(&dir, "--durability none"),
        "1",
        "4",
        &json,
        &[],
    );
    let _ = std::fs::remove_dir_all(&dir);
    let report = take_report(&json);
    assert!(!out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let lost = &report["errors_by_kind"]["lost:max_seq below a seq already received"];
    assert!(lost.as_f64().is_some_and(|n| n >= 1.0), "{}", explain(&out));
    assert_eq!(report["kills"], 1);
}

/// Group traffic in chaos: 4 groups of 5 (all 20 users), 30% of the sends to the sender's
/// group.
const GROUPS: [&str; 6] = [
    "--groups",
    "4",
    "--group-members",
    "5",
    "--group-share",
    "0.3",
];

/// kill -9 during group sends: every acknowledged group message is at every other member,
/// once (retries after a kill too), with no gap in any inbox, and none is at some members
/// only; 1:1 traffic alongside loses nothing either.
#[test]
fn chaos_with_groups_loses_nothing_across_kill_9() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let out = chaos(&chaos_server(&dir, ""), "3", "6", &json, &GROUPS);
    let _ = std::fs::remove_dir_all(&dir);
    let report = take_report(&json);
    assert!(out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let line = summary(&out);
    assert_eq!(num(&line, "kills"), 3.0, "{line}");
    for key in VIOLATIONS.iter().chain(&["group_partial"]) {
        assert_eq!(num(&line, key), 0.0, "{key}: {line}");
    }
    assert_eq!(num(&line, "delivered"), num(&line, "expected"), "{line}");
    // Group messages were sent, acknowledged, and each delivered to the 4 other members.
    let group_ok = num(&line, "group_send_ok");
    assert!(group_ok > 0.0, "{line}");
    assert_eq!(num(&line, "group_sent"), group_ok, "{line}");
    assert_eq!(num(&line, "group_delivered"), 4.0 * group_ok, "{line}");
    assert!(num(&line, "group_sent") < num(&line, "sent"), "{line}");
    // Each kill waited for a group send on the wire, and those got their SendOk after all.
    assert_eq!(num(&line, "kills_in_group_flight"), 3.0, "{line}");
    let in_flight = num(&line, "group_in_flight_at_kills");
    assert!(in_flight >= 1.0, "{line}");
    assert_eq!(num(&line, "group_in_flight_confirmed"), in_flight, "{line}");
    assert_eq!(report["ok"], true);
}

/// A group message lost at one member (the bench drops every 20th delivery, all of them
/// group messages here) is a gap, a missing delivery, and a group message at some of its
/// members only.
#[test]
fn chaos_with_groups_catches_a_group_message_at_some_members_only() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let mut extra = GROUPS.to_vec();
    extra[5] = "1";
    extra.extend(["--inject", "drop", "--inject-every", "20", "--drain", "3"]);
    let out = chaos(&chaos_server(&dir, ""), "1", "3", &json, &extra);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = take_report(&json);
    assert!(!out.status.success(), "{}", explain(&out));
    let line = summary(&out);
    assert!(num(&line, "injected") >= 1.0, "{line}");
    assert_eq!(num(&line, "sent"), num(&line, "group_sent"), "{line}");
    let partial = num(&line, "group_partial");
    assert!(partial >= 1.0, "{line}");
    assert!(partial <= num(&line, "missing"), "{line}");
    assert!(num(&line, "gaps") >= 1.0, "{line}");
}

/// The negative control with group traffic on: a server that acknowledges before its store
/// syncs loses, at a kill -9, messages it acknowledged (and the memberships with them), and
/// chaos says so.
#[test]
fn chaos_with_groups_reports_the_loss_when_the_store_does_not_sync() {
    let dir = temp_data_dir();
    let json = dir.with_extension("json");
    let mut extra = GROUPS.to_vec();
    extra.extend(["--drain", "5"]);
    let out = chaos(
        &chaos_server(&dir, "--durability none"),
        "1",
        "4",
        &json,
        &extra,
    );
    let _ = std::fs::remove_dir_all(&dir);
    let report = take_report(&json);
    assert!(!out.status.success(), "{}", explain(&out));
    let report = report.expect("a JSON report");
    let lost = &report["errors_by_kind"]["lost:max_seq below a seq already received"];
    assert!(lost.as_f64().is_some_and(|n| n >= 1.0), "{}", explain(&out));
    assert_eq!(report["kills"], 1);
    assert!(report["group_send_ok"].as_f64().is_some_and(|n| n >= 1.0));
}
