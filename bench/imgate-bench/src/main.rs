//! imgate-bench: a load generator that speaks the imgate IM protocol over WebSocket.
//!
//! Scenarios: `idle` (many authenticated idle connections), `relay` (1:1 traffic with
//! latency and full delivery verification), `storm` (everyone reconnects at once to a
//! backlog), `echo` (plain WebSocket echo on /echo), `chaos` (relay traffic while the server
//! is killed with SIGKILL and restarted, with group messages too given `--groups`; proves
//! nothing acknowledged is lost), `flood`
//! (garbage handshakes and frames next to well-behaved clients), `fanout` (group messages
//! to disjoint groups made through the admin API, with the same verification as relay).
//!
//! No async runtime: one mio event loop per process; `idle` and `relay` spread their
//! connections over child processes (`--procs`) when one process's file limit is not enough.
//! Loopback only, and every run is bounded in time.

mod client;
mod coord;
mod im;
mod net;
mod report;
mod scenarios;
mod sys;
mod verify;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "imgate-bench",
    version,
    about = "Load generator for imgate: idle connections, 1:1 relay with verification, \
             reconnect storms, echo, kill -9 chaos, garbage floods (loopback only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Open N authenticated connections and hold them through several ping intervals.
    Idle(IdleArgs),
    /// N users online sending 1:1 messages; latency, throughput and delivery verification.
    Relay(RelayArgs),
    /// N users with messages waiting all reconnect at once: time to log in and catch up.
    Storm(StormArgs),
    /// Plain WebSocket echo against /echo (server started with --echo).
    Echo(EchoArgs),
    /// G groups of M online members sending group messages; deliveries/s, latency and
    /// delivery verification.
    Fanout(FanoutArgs),
    /// Relay (and with --groups group) traffic while the server is killed (SIGKILL) and
    /// restarted; proves no loss.
    Chaos(ChaosArgs),
    /// Garbage handshakes and frames from many connections next to well-behaved clients.
    Flood(FloodArgs),
}

/// Flags every scenario has.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Server addresses, comma-separated: 127.x.x.x only. With several (the nodes of a
    /// cluster), connection i goes to address i mod N, so that the devices of one user and
    /// the users of one conversation are spread over the nodes.
    #[arg(long, default_value = "127.0.0.1:8080", value_delimiter = ',', num_args = 1..)]
    pub addr: Vec<SocketAddr>,

    /// The server's JWT secret, to sign login tokens (chaos: taken from --server-cmd when
    /// not given).
    #[arg(long, env = "IMGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// The server's pid: report its CPU (and RSS for idle) from /proc.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Spread connections over source addresses 127.0.0.1..127.0.0.K (each has its own
    /// ephemeral port range).
    #[arg(long, default_value_t = 1)]
    pub src_ips: u32,

    /// Connections being set up (TCP + handshake + login) at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Seconds allowed for one connection to be logged in.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,

    /// Seconds allowed for all connections to be set up.
    #[arg(long, default_value_t = 120.0)]
    pub setup_timeout: f64,

    /// Prefix of the uids (`{prefix}u{i}`), to keep runs apart in one data directory.
    #[arg(long, default_value = "")]
    pub uid_prefix: String,

    /// Seed for peers, mask keys and kill times (default: from the clock).
    #[arg(long)]
    pub seed: Option<u64>,

    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,

    /// Internal: this process is child I of P.
    #[arg(long, hide = true)]
    pub child: Option<String>,

    /// Internal: the run id shared by the children.
    #[arg(long, hide = true)]
    pub run_id: Option<u32>,

    /// Self-test of the verification: pretend every 97th received message was lost
    /// (`drop`) or arrived twice (`dup`); the run must then fail.
    #[arg(long, hide = true, value_enum)]
    pub inject_fault: Option<Fault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Fault {
    Drop,
    Dup,
}

#[derive(Debug, Clone, Args)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections (one user each: uid u{i}, device d0).
    #[arg(long, short = 'c', default_value_t = 1000)]
    pub conns: u32,
    /// Seconds to hold them once all are up (make it several server ping intervals).
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Processes to spread the connections over (default: as many as the file limit needs).
    #[arg(long)]
    pub procs: Option<usize>,
}

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users online.
    #[arg(long, short = 'u', default_value_t = 100)]
    pub users: u32,
    /// Devices (connections) per user.
    #[arg(long, default_value_t = 1)]
    pub devices: u16,
    /// Total messages per second (open loop). The default when --inflight is not given: 1000.
    #[arg(long, conflicts_with = "inflight")]
    pub rate: Option<f64>,
    /// Closed loop: sends waiting for SendOk per connection.
    #[arg(long, short = 'k')]
    pub inflight: Option<u32>,
    /// Content bytes per message (at least the 32-byte bench header).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Measured seconds.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, short = 'w', default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds allowed after sending stops for every SendOk and delivery.
    #[arg(long, default_value_t = 15.0)]
    pub drain: f64,
    /// Ack after this many messages...
    #[arg(long, default_value_t = 32)]
    pub ack_every: u64,
    /// ...and whatever is unacked every this many milliseconds.
    #[arg(long, default_value_t = 100)]
    pub ack_tick_ms: u64,
    /// Processes to spread the connections over (default: as many as the file limit needs).
    #[arg(long)]
    pub procs: Option<usize>,
    /// Self-test of the verification: play this fault, as a faulty server would, on every
    /// --inject-every-th delivery new to its device; the run must then fail.
    #[arg(long, hide = true, value_enum)]
    pub inject: Option<client::Inject>,
    #[arg(long, hide = true, default_value_t = 97)]
    pub inject_every: u64,
}

#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// The server's admin API (the groups are made through it before the load starts).
    #[arg(long, default_value = "127.0.0.1:9090")]
    pub admin: SocketAddr,
    /// The server's --admin-token, when it has one.
    #[arg(long, env = "IMGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Groups (disjoint: group g holds users g*M .. (g+1)*M, each online on one device).
    #[arg(long, short = 'g', default_value_t = 10)]
    pub groups: u32,
    /// Members per group.
    #[arg(long, short = 'm', default_value_t = 100)]
    pub members: u32,
    /// Members of each group that send (the first ones; default all).
    #[arg(long)]
    pub senders: Option<u32>,
    /// Total group messages (sends) per second, open loop; each is delivered to M - 1
    /// devices. The default when --inflight is not given: 100.
    #[arg(long, conflicts_with = "inflight")]
    pub rate: Option<f64>,
    /// Closed loop: sends waiting for SendOk per sending member.
    #[arg(long, short = 'k')]
    pub inflight: Option<u32>,
    /// Content bytes per message (at least the 32-byte bench header).
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Measured seconds.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Warm-up seconds before measuring.
    #[arg(long, short = 'w', default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds allowed after sending stops for every SendOk and delivery.
    #[arg(long, default_value_t = 15.0)]
    pub drain: f64,
    /// Ack after this many messages...
    #[arg(long, default_value_t = 32)]
    pub ack_every: u64,
    /// ...and whatever is unacked every this many milliseconds.
    #[arg(long, default_value_t = 100)]
    pub ack_tick_ms: u64,
    /// Processes to spread the connections over (default: as many as the file limit needs).
    #[arg(long)]
    pub procs: Option<usize>,
    /// Self-test of the verification: play this fault, as a faulty server would, on every
    /// --inject-every-th delivery new to its device; the run must then fail.
    #[arg(long, hide = true, value_enum)]
    pub inject: Option<client::Inject>,
    #[arg(long, hide = true, default_value_t = 97)]
    pub inject_every: u64,
}

#[derive(Debug, Clone, Args)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Users that reconnect at once.
    #[arg(long, short = 'u', default_value_t = 1000)]
    pub users: u32,
    /// Devices per user.
    #[arg(long, default_value_t = 1)]
    pub devices: u16,
    /// Messages waiting for each user when it comes back.
    #[arg(long, short = 'm', default_value_t = 10)]
    pub msgs: u32,
    /// Sending clients (extra users) that fill the inboxes while everyone is offline.
    #[arg(long, default_value_t = 20)]
    pub senders: u32,
    /// Their total rate, msgs/s (default 40 per sender, under the server's default limit).
    #[arg(long)]
    pub send_rate: Option<f64>,
    /// Content bytes per message.
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Seconds allowed for the storm (everyone logged in and caught up).
    #[arg(long, default_value_t = 60.0)]
    pub timeout: f64,
}

#[derive(Debug, Clone, Args)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, short = 'c', default_value_t = 100)]
    pub conns: u32,
    /// Messages in flight per connection.
    #[arg(long, short = 'k', default_value_t = 1)]
    pub inflight: u32,
    /// Payload bytes per message.
    #[arg(long, short = 's', default_value_t = 32)]
    pub size: usize,
    #[arg(long, short = 'd', default_value_t = 5.0)]
    pub duration: f64,
    #[arg(long, short = 'w', default_value_t = 1.0)]
    pub warmup: f64,
    /// Request path.
    #[arg(long, default_value = "/echo")]
    pub path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Resume {
    /// Login.last_seq = the highest seq the device saw in a Message (docs/PROTOCOL.md).
    Seq,
    /// Login.last_seq = 0: the server resumes after its stored cursor (re-deliveries allowed).
    Cursor,
}

#[derive(Debug, Clone, Args)]
pub struct ChaosArgs {
    #[command(flatten)]
    pub common: Common,
    /// The server command, run without a shell (quotes are honoured), for example
    /// 'target/release/imgate serve --listen 127.0.0.1:0 --admin-listen 127.0.0.1:0
    /// --jwt-secret S --data-dir /tmp/d'. Its "listening on ws://..." line gives the port;
    /// a port 0 in --listen is replaced by the first one for every restart. Given several
    /// times, each is a node of one cluster (`serve --redis URL`): connections are spread
    /// over the nodes, a kill takes a random node, and a client whose node is gone
    /// reconnects to the next one.
    #[arg(long, required = true)]
    pub server_cmd: Vec<String>,
    /// Append the servers' stdout and stderr (and Redis's output) to this file (default:
    /// stderr inherited, stdout dropped).
    #[arg(long)]
    pub server_log: Option<PathBuf>,
    /// The Redis the nodes share, started by the bench before them (without a shell, e.g.
    /// 'redis-server --port P --dir D --appendonly yes --appendfsync always'), ready at its
    /// "Ready to accept connections" line; killed with SIGKILL --redis-kills times at
    /// random moments and restarted with the same command (same data directory).
    #[arg(long)]
    pub redis_cmd: Option<String>,
    /// SIGKILLs of Redis (with --redis-cmd), each in the middle of sends on the wire.
    #[arg(long, default_value_t = 1)]
    pub redis_kills: u32,
    /// Milliseconds Redis stays down after a kill: the nodes refuse sends and logins with
    /// UNAVAILABLE meanwhile, and the clients retry.
    #[arg(long, default_value_t = 1500)]
    pub redis_down_ms: u64,
    #[arg(long, short = 'u', default_value_t = 20)]
    pub users: u32,
    #[arg(long, default_value_t = 1)]
    pub devices: u16,
    /// Total messages per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Seconds of traffic (kills happen within them).
    #[arg(long, short = 'd', default_value_t = 20.0)]
    pub duration: f64,
    /// SIGKILLs of a server (of a random node) at random moments.
    #[arg(long, default_value_t = 3)]
    pub kills: u32,
    /// Milliseconds between a kill and the restart.
    #[arg(long, default_value_t = 100)]
    pub restart_delay_ms: u64,
    /// How reconnecting devices resume their inbox.
    #[arg(long, value_enum, default_value_t = Resume::Seq)]
    pub resume: Resume,
    /// Seconds allowed at the end for every SendOk and delivery.
    #[arg(long, default_value_t = 30.0)]
    pub drain: f64,
    /// Ack after this many messages...
    #[arg(long, default_value_t = 32)]
    pub ack_every: u64,
    /// ...and whatever is unacked every this many milliseconds (long: more re-deliveries
    /// with --resume cursor).
    #[arg(long, default_value_t = 100)]
    pub ack_tick_ms: u64,
    /// Group traffic: G groups made among the users before the load starts (disjoint:
    /// group g holds users g*M .. (g+1)*M) through the server's admin API, found on its
    /// "admin API on http://..." line (a port 0 in --admin-listen is replaced by the first
    /// one for every restart). Every acknowledged group message must then be in the inbox of
    /// every member device but the sending one, once and without gaps, and a group message
    /// in all of them or in none. 0: no groups.
    #[arg(long, default_value_t = 0)]
    pub groups: u32,
    /// Members per group (--groups x --group-members at most --users).
    #[arg(long, default_value_t = 5)]
    pub group_members: u32,
    /// The share of a group member's sends that go to its group (the rest to a user).
    #[arg(long, default_value_t = 0.3)]
    pub group_share: f64,
    /// The server's --admin-token, when it has one (default: taken from --server-cmd).
    #[arg(long, env = "IMGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Self-test of the verification: play this fault, as a faulty server would, on every
    /// --inject-every-th delivery new to its device (re-delivery for `redelivery`); the run
    /// must then fail.
    #[arg(long, hide = true, value_enum)]
    pub inject: Option<client::Inject>,
    #[arg(long, hide = true, default_value_t = 97)]
    pub inject_every: u64,
}

#[derive(Debug, Clone, Args)]
pub struct FloodArgs {
    #[command(flatten)]
    pub common: Common,
    /// Well-behaved users (relay traffic among them).
    #[arg(long, short = 'u', default_value_t = 20)]
    pub users: u32,
    /// Their total messages per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    #[arg(long, short = 's', default_value_t = 64)]
    pub size: usize,
    /// Garbage connections open at once (each reconnects when the server drops it).
    #[arg(long, default_value_t = 200)]
    pub flood_conns: u32,
    /// Measured seconds of flood.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Milliseconds before the bench drops a garbage connection the server has not.
    #[arg(long, default_value_t = 250)]
    pub garbage_ms: u64,
    /// Seconds of traffic without flood first (the baseline latency).
    #[arg(long, short = 'w', default_value_t = 3.0)]
    pub warmup: f64,
    /// What floods: garbage connections, or single logged-in attackers (sync: full Syncs
    /// never read; empty: endless empty continuations; pings: IM Pings, answers read).
    #[arg(long, value_enum, default_value = "garbage")]
    pub attack: scenarios::attack::Attack,
    /// Attacker connections at once (for --attack other than garbage).
    #[arg(long, default_value_t = 1)]
    pub attackers: u32,
}

/// Refuses anything but IPv4 loopback.
pub fn check_loopback(addr: &SocketAddr) -> Result<(), String> {
    match addr {
        SocketAddr::V4(a) if a.ip().is_loopback() => Ok(()),
        _ => Err(format!(
            "refusing target {addr}: imgate-bench only connects to 127.x.x.x"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Idle(a) => scenarios::idle::run(a),
        Cmd::Relay(a) => scenarios::relay::run(a),
        Cmd::Storm(a) => scenarios::storm::run(a),
        Cmd::Echo(a) => scenarios::echo::run(a),
        Cmd::Fanout(a) => scenarios::fanout::run(a),
        Cmd::Chaos(a) => scenarios::chaos::run(a),
        Cmd::Flood(a) => scenarios::flood::run(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imgate-bench: {e}");
            ExitCode::from(2)
        }
    }
}
