//! `--durability` observed in the server's system calls. The real binary runs under
//! `strace -f`, which logs the calls of all its threads in one order that follows causality
//! (a traced thread is stopped at each call's entry and exit until the line is written), and
//! a client sends messages one at a time, each waiting for its SendOk:
//!
//! - with `full`, every SendOk is written to the client's socket only after the data file
//!   was written and then synced (`fdatasync`, `fsync` or `sync_file_range` returned 0), all
//!   after the send's request was read: so at least one sync per acknowledged send;
//! - with `none`, no sync of any kind happens while the sends are acknowledged.
//!
//! Without strace on the machine the tests say so loudly and pass; install it
//! (`apt-get install -y strace`) to run them.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::im_client::token;
use common::SECRET;
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};
use prost::Message as _;
use tungstenite::Message;

const SENDS: usize = 20;

const TRACED: &str = "trace=fsync,fdatasync,msync,sync_file_range,syncfs,sync,\
    pwrite64,pwritev,pwritev2,write,writev,sendto,sendmsg,read,readv,recvfrom,recvmsg";

/// Whether strace exists and may trace a child here (ptrace can be forbidden in containers).
fn strace_works() -> bool {
    let ok = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        // CI installs strace (tests/run.sh): there, a durability check that cannot run fails.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "strace is missing or cannot trace, so the durability modes cannot be checked"
        );
        eprintln!(
            "\n!!!!! SKIPPED: strace is missing or cannot trace here; the durability modes are \
             NOT checked. Install it: apt-get install -y strace !!!!!\n"
        );
    }
    ok
}

/// `imgate serve` under strace.
struct Traced {
    strace: Child,
    addr: SocketAddr,
    trace: PathBuf,
    data_dir: PathBuf,
}

impl Traced {
    fn start(durability: &str) -> Traced {
        let data_dir = common::temp_data_dir();
        let trace = data_dir.with_extension("strace");
        let mut strace = Command::new("strace")
            .args([
                "-f",
                "-qq",
                "-yy",
                "-s",
                "0",
                "-e",
                "signal=none",
                "-e",
                TRACED,
                "-o",
            ])
            .arg(&trace)
            .arg(env!("CARGO_BIN_EXE_imgate"))
            .args(["serve", "--listen", "127.0.0.1:0", "--log-level", "warn"])
            .args(["--admin-listen", "127.0.0.1:0", "--jwt-secret", SECRET])
            .args(["--durability", durability, "--data-dir"])
            .arg(&data_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strace");
        let stdout = strace.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("imgate printed its listening line");
        let addr = line
            .split("ws://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {line:?}"));
        Traced {
            strace,
            addr,
            trace,
            data_dir,
        }
    }

    /// Stops the server with SIGTERM and returns the complete trace.
    fn finish(mut self) -> String {
        let imgate: i32 =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.strace.id()))
                .expect("strace's children")
                .split_whitespace()
                .next()
                .expect("imgate runs under strace")
                .parse()
                .unwrap();
        unsafe {
            libc::kill(imgate, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.strace.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "imgate did not exit on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(&self.trace).expect("the trace")
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        if let Ok(children) =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.strace.id()))
        {
            for pid in children.split_whitespace().filter_map(|p| p.parse().ok()) {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = self.strace.kill();
        let _ = self.strace.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(&self.trace);
    }
}

/// Logs in and sends `SENDS` messages, one at a time, each after the last one's SendOk.
/// Returns the client's local port, by which its socket is found in the trace.
fn send_one_at_a_time(addr: SocketAddr) -> u16 {
    let (mut ws, _) = tungstenite::connect(format!("ws://{addr}/ws")).expect("connect /ws");
    let port = match ws.get_ref() {
        tungstenite::stream::MaybeTlsStream::Plain(s) => {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            s.local_addr().unwrap().port()
        }
        _ => unreachable!(),
    };
    let mut call = |id: u64, body: C| -> S {
        let f = proto::ClientFrame {
            id,
            body: Some(body),
        };
        ws.send(Message::binary(f.encode_to_vec())).unwrap();
        loop {
            if let Message::Binary(b) = ws.read().expect("read") {
                let f = proto::ServerFrame::decode(&b[..]).unwrap();
                assert_eq!(f.id, id, "{f:?}");
                return f.body.unwrap();
            }
        }
    };
    let login = C::Login(proto::Login {
        token: token("dora"),
        device_id: "phone".into(),
        last_seq: 0,
    });
    assert!(matches!(call(1, login), S::LoginOk(_)));
    for i in 0..SENDS {
        let send = C::Send(proto::SendMessage {
            to_uid: "otto".into(),
            client_msg_id: format!("m{i}"),
            content: b"durable?".to_vec(),
            group_id: String::new(),
        });
        let answer = call(2 + i as u64, send);
        assert!(matches!(answer, S::SendOk(_)), "{answer:?}");
    }
    drop(ws);
    port
}

/// One system call from the trace: where its entry and its exit were logged, its first
/// argument as strace -yy annotates it, and what it returned.
#[derive(Debug, Clone)]
struct Call {
    name: String,
    target: String,
    entry: usize,
    exit: usize,
    ret: i64,
}

/// What a call returned; -1 also for a call that never returned (`= ?`).
fn return_value(s: &str) -> i64 {
    s.rfind(" = ")
        .and_then(|at| s[at + 3..].split_whitespace().next()?.parse().ok())
        .unwrap_or(-1)
}

/// Pairs `<unfinished ...>` lines with their `<... resumed>` lines, per thread.
fn parse(trace: &str) -> Vec<Call> {
    let mut calls = Vec::new();
    let mut pending: HashMap<&str, Call> = HashMap::new();
    for (i, line) in trace.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(resumed) = rest.strip_prefix("<... ") {
            if let Some(mut call) = pending.remove(pid) {
                assert!(
                    resumed.starts_with(&format!("{} resumed>", call.name)),
                    "{line}"
                );
                call.exit = i;
                call.ret = return_value(resumed);
                calls.push(call);
            }
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue;
        };
        let end = [", ", ")", " <unfinished"]
            .iter()
            .filter_map(|m| args.find(m))
            .min()
            .unwrap_or(args.len());
        let call = Call {
            name: name.to_owned(),
            target: args[..end].to_owned(),
            entry: i,
            exit: i,
            ret: 0,
        };
        if rest.ends_with("<unfinished ...>") {
            pending.insert(pid, call);
        } else {
            calls.push(Call {
                ret: return_value(rest),
                ..call
            });
        }
    }
    calls.sort_by_key(|c| c.entry);
    calls
}

fn on_data_file(c: &Call, data_dir: &Path) -> bool {
    c.target
        .ends_with(&format!("{}>", data_dir.join("imgate.redb").display()))
}

fn is_sync(c: &Call) -> bool {
    matches!(
        c.name.as_str(),
        "fsync" | "fdatasync" | "sync_file_range" | "msync" | "syncfs" | "sync"
    )
}

/// The client's socket on the server side: reads of its requests (exit lines) and writes of
/// the answers (entry lines), in order.
fn client_io(calls: &[Call], port: u16) -> (Vec<usize>, Vec<usize>) {
    let peer = format!("->127.0.0.1:{port}]>");
    let on_socket = |c: &&Call| c.target.ends_with(&peer) && c.ret > 0;
    let reads = calls
        .iter()
        .filter(on_socket)
        .filter(|c| matches!(c.name.as_str(), "read" | "readv" | "recvfrom" | "recvmsg"))
        .map(|c| c.exit)
        .collect();
    let writes = calls
        .iter()
        .filter(on_socket)
        .filter(|c| matches!(c.name.as_str(), "write" | "writev" | "sendto" | "sendmsg"))
        .map(|c| c.entry)
        .collect();
    (reads, writes)
}

/// The writes of the `SENDS` SendOks (after the 101 and the LoginOk), each with the read of
/// its request before it.
fn acknowledged_sends(calls: &[Call], port: u16) -> Vec<(usize, usize)> {
    let (reads, writes) = client_io(calls, port);
    assert_eq!(
        writes.len(),
        2 + SENDS,
        "one write per answer on the client's socket (tracing the right calls?)"
    );
    writes[2..]
        .iter()
        .map(|&w| {
            let r = *reads
                .iter()
                .rev()
                .find(|&&r| r < w)
                .expect("a request before each answer");
            (r, w)
        })
        .collect()
}

#[test]
fn durability_full_syncs_the_data_file_before_each_send_ok() {
    if !strace_works() {
        return;
    }
    let server = Traced::start("full");
    let data_dir = server.data_dir.clone();
    let port = send_one_at_a_time(server.addr);
    let calls = parse(&server.finish());
    let sends = acknowledged_sends(&calls, port);
    // The windows are disjoint (the next send follows the last SendOk), so this is also at
    // least one sync per acknowledged send.
    for (k, &(read, answer)) in sends.iter().enumerate() {
        let written = calls.iter().find(|c| {
            on_data_file(c, &data_dir)
                && c.name.starts_with("pwrite")
                && c.ret > 0
                && read < c.exit
                && c.exit < answer
        });
        let Some(written) = written else {
            panic!("send {k}: its SendOk went out without a write to the data file");
        };
        let synced = calls.iter().any(|c| {
            on_data_file(c, &data_dir)
                && is_sync(c)
                && c.ret == 0
                && written.exit < c.exit
                && c.exit < answer
        });
        assert!(
            synced,
            "send {k}: its SendOk went out before the data file was synced"
        );
    }
}

#[test]
fn durability_none_never_syncs_while_acknowledging() {
    if !strace_works() {
        return;
    }
    let server = Traced::start("none");
    let port = send_one_at_a_time(server.addr);
    let calls = parse(&server.finish());
    let sends = acknowledged_sends(&calls, port);
    let (from, to) = (sends[0].0, sends[SENDS - 1].1);
    let synced: Vec<&Call> = calls
        .iter()
        .filter(|c| is_sync(c) && c.entry > from && c.entry < to)
        .collect();
    assert!(
        synced.is_empty(),
        "{} syncs with --durability none, the first {:?}",
        synced.len(),
        synced.first()
    );
}
