//! Single-connection attacks for `flood --attack`: each runs on its own thread with blocking
//! sockets, reconnecting whenever the server drops it, until told to stop.
//!
//! - `sync`: amplification. A logged-in client fills its inbox with 70 messages of 16,000
//!   bytes, then writes full Syncs (about 1.1 MB of answer each) in batches of 300 and never
//!   reads.
//! - `empty`: a fragmented message that never ends: zero-byte continuation frames, as fast as
//!   the socket takes them.
//! - `pings`: IM Ping requests as fast as the socket takes them, every answer read.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use prost::Message as _;

use crate::{im, ws};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attack {
    /// Connections that send garbage (the default).
    Garbage,
    /// Full Syncs from a client that never reads (answers far larger than requests).
    Sync,
    /// Endless zero-byte continuation frames.
    Empty,
    /// IM Ping requests whose answers are read.
    Pings,
}

/// What one attacker thread did.
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: u64,
    pub bytes_sent: u64,
    /// Connections the server ended (closed or reset).
    pub dropped_by_server: u64,
}

const MASK: [u8; 4] = [0x5a, 0x17, 0xc3, 0x88];

/// The switches of a running attack: it prepares (connects, logs in, fills its inbox), waits
/// for `go`, and runs until `stop`.
#[derive(Clone, Default)]
pub struct Control {
    pub go: Arc<AtomicBool>,
    pub stop: Arc<AtomicBool>,
}

/// Starts `attack` against `addr` on its own thread.
pub fn spawn(
    attack: Attack,
    addr: SocketAddr,
    uid: String,
    token: String,
    ctl: Control,
) -> JoinHandle<Stats> {
    std::thread::spawn(move || {
        let mut stats = Stats::default();
        while !ctl.stop.load(Ordering::Relaxed) {
            match run_once(attack, addr, &uid, &token, &ctl, &mut stats) {
                Ok(()) => {}
                Err(_) => stats.dropped_by_server += 1,
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stats
    })
}

fn frame(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    ws::write_frame(&mut out, op, payload, MASK);
    out
}

fn im_frame(f: &imgate::im::proto::ClientFrame) -> Vec<u8> {
    frame(ws::OP_BINARY, &f.encode_to_vec())
}

/// Connects and upgrades to `/ws`; the server's 101 head is read and dropped.
fn open(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let key = ws::new_key(0x1234_5678_9abc_def0);
    s.write_all(&ws::request(
        "127.0.0.1",
        "/ws",
        &key,
        Some(im::SUBPROTOCOL),
    ))?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        return Err(std::io::Error::other("upgrade refused"));
    }
    Ok(s)
}

/// One connection's attack, until the server drops it (an error) or `stop` is set.
fn run_once(
    attack: Attack,
    addr: SocketAddr,
    uid: &str,
    token: &str,
    ctl: &Control,
    stats: &mut Stats,
) -> std::io::Result<()> {
    let mut s = open(addr)?;
    stats.connections += 1;
    s.set_write_timeout(Some(Duration::from_millis(200)))?;
    let login = im_frame(&im::login(token, "attacker", 0));
    let unit = match attack {
        Attack::Garbage => return Ok(()),
        Attack::Sync => {
            let mut fill = login.clone();
            for i in 0..70 {
                let content = vec![b'x'; 16_000];
                fill.extend(im_frame(&im::send(
                    i,
                    uid.to_owned(),
                    String::new(),
                    format!("attack-{}-{i}", stats.connections),
                    content,
                )));
            }
            write_counted(&mut s, &fill, stats)?;
            im_frame(&im::sync(0, 1000)).repeat(300)
        }
        Attack::Empty => {
            let mut start = frame(ws::OP_BINARY, b"");
            start[0] &= 0x7f; // FIN clear: a message that continues
            write_counted(&mut s, &start, stats)?;
            let mut cont = frame(ws::OP_CONT, b"");
            cont[0] &= 0x7f;
            cont.repeat(8192)
        }
        Attack::Pings => {
            write_counted(&mut s, &login, stats)?;
            let mut reader = s.try_clone()?;
            std::thread::spawn(move || {
                let mut b = vec![0u8; 64 * 1024];
                while matches!(reader.read(&mut b), Ok(n) if n > 0) {}
            });
            let ping = imgate::im::proto::ClientFrame {
                id: 7,
                body: Some(imgate::im::proto::client_frame::Body::Ping(
                    imgate::im::proto::Ping::default(),
                )),
            };
            im_frame(&ping).repeat(4096)
        }
    };
    // The preparation (its sends in particular) is not part of the measured attack.
    while !ctl.go.load(Ordering::Relaxed) {
        if ctl.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    while !ctl.stop.load(Ordering::Relaxed) {
        write_counted(&mut s, &unit, stats)?;
    }
    Ok(())
}

/// Writes what the socket takes within its write timeout; a stalled socket (the server
/// throttling us) is not an error, a closed one is.
fn write_counted(s: &mut TcpStream, bytes: &[u8], stats: &mut Stats) -> std::io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        match s.write(&bytes[at..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                at += n;
                stats.bytes_sent += n as u64;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
