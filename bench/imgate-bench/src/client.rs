//! A fleet of IM clients on one event loop: each client is one device of one user. It
//! connects (from a spread of source addresses), logs in, sends bench messages when the
//! traffic says so, acks what it receives, checks every seq it sees, and with `reconnect`
//! comes back after losing its connection, resuming its inbox and resending with the same
//! client_msg_id whatever did not get a SendOk.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use hdrhistogram::Histogram;
use imgate::im::proto::{self, server_frame, ServerFrame};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::im::{self, Header};
use crate::net::{CloseReason, Ev, Net};
use crate::sys::{mono_ms, mono_ns, Rng};
use crate::verify::{
    self, Delivery, Groups, Ledger, Roster, Seen, SeqTracker, Shape, Violation, Wrong, GROUP_BASE,
};

#[derive(Debug, Clone)]
pub struct FleetCfg {
    /// The servers; connection i goes to `addrs[i % len]`.
    pub addrs: Vec<SocketAddr>,
    /// Spread connections over 127.0.0.1..127.0.0.K (1: no explicit bind).
    pub src_ips: u32,
    pub secret: Vec<u8>,
    pub uid_prefix: String,
    pub run_id: u32,
    /// Connections being set up (TCP, handshake, login) at once.
    pub connect_concurrency: usize,
    /// Time allowed for one connection to be logged in.
    pub connect_timeout_ms: u64,
    /// Come back after a lost connection (chaos) instead of counting it as an error.
    pub reconnect: bool,
    /// On re-login pass last_seq = 0 (resume from the stored cursor) instead of the highest
    /// seq seen in a Message.
    pub resume_cursor: bool,
    /// Ack once this many messages are unacked (and on every tick).
    pub ack_every: u64,
    pub ack_tick_ms: u64,
    /// Content bytes per message (at least the bench header).
    pub size: usize,
    pub seed: u64,
    /// Self-test: what to do to every how-many-th delivery, so that verification must fail.
    pub inject: Option<(Inject, u64)>,
}

/// A fault the bench plays on itself, as a faulty server would, so that its verification
/// must fail (`--inject`). It hits every N-th delivery (`--inject-every`) that is new to its
/// device (whatever its seq), counted over this process's devices, so it fires in every run
/// that delivers at least N messages; `redelivery` counts re-deliveries instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Inject {
    /// The message is lost.
    Drop,
    /// It arrives twice under its seq.
    Dup,
    /// It arrives again under the seq of its device's next message, which is lost.
    DupSeq,
    /// It arrives after its device's next message.
    Reorder,
    /// It is replaced by a message its sender never sent (every field consistent with it).
    Swap,
    /// Its to_uid names a third user: it was stored in an inbox it was not sent to.
    Misroute,
    /// Its from_uid names a third user.
    FromUid,
    /// The last byte of its content changes (with --size above the 32-byte header, a
    /// payload byte).
    Payload,
    /// A seq re-delivered after a login that resumed from the stored cursor carries another
    /// message than first came under it (needs --resume cursor and re-deliveries).
    Redelivery,
}

impl From<crate::Fault> for Inject {
    fn from(f: crate::Fault) -> Inject {
        match f {
            crate::Fault::Drop => Inject::Drop,
            crate::Fault::Dup => Inject::Dup,
        }
    }
}

/// Where `--inject` stands: deliveries counted towards the next hit, and the message held
/// back (reorder) or repeated (dup-seq) until its client's next one.
#[derive(Debug, Default)]
struct Injector {
    count: u64,
    held: Option<(usize, proto::Message)>,
}

/// Counters; summable across processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub clients: u64,
    pub connects: u64,
    /// Clients that logged in at least once.
    pub established: u64,
    pub logins: u64,
    pub reconnects: u64,
    /// Open connections lost, with reconnect on (expected under chaos).
    pub disconnects: u64,
    /// Logged-in connections lost, without reconnect (an error).
    pub dropped: u64,
    pub sent: u64,
    pub resent: u64,
    pub send_ok: u64,
    pub send_ok_dup: u64,
    pub send_ok_window: u64,
    pub delivered: u64,
    pub delivered_window: u64,
    /// Deliveries that arrived within the measured window, whenever sent (set by the
    /// scenario: under overload they fall behind what the window sent).
    #[serde(default)]
    pub arrived_window: u64,
    /// History from before the run, or allowed re-deliveries.
    pub old: u64,
    /// A device's own message from an earlier session.
    pub own_echo: u64,
    /// Bench messages of other runs.
    pub foreign: u64,
    pub pings: u64,
    pub dups: u64,
    pub reorders: u64,
    pub gaps: u64,
    /// Messages in the inbox of a user who neither is their recipient nor sent them.
    pub misrouted: u64,
    /// Messages whose from_uid, from_device or client_msg_id is not their sender's.
    pub wrong_fields: u64,
    /// Messages whose content is not the bench message its header describes, or none.
    pub corrupt: u64,
    /// Seqs that came again (re-delivered, in a SendOk, in a Sync page) with another message
    /// than first came under them.
    pub changed: u64,
    /// Faults played by `--inject`.
    pub injected: u64,
    /// Sends on the wire when the server was killed (each counted once).
    pub kill_in_flight: u64,
    /// Of those, the ones whose SendOk came (after the restart, or read after the kill).
    pub kill_confirmed: u64,
    /// Of those, the ones whose SendOk said duplicate: stored before the kill.
    pub kill_stored: u64,
    pub unconfirmed: u64,
    pub rate_skipped: u64,
    /// Sends the server refused (Error) and the bench retried (reconnect mode).
    pub refused: u64,
    /// Clients not tried because a hard limit (EMFILE, EADDRNOTAVAIL, 503) came first.
    pub not_attempted: u64,
    /// Group messages sent (first sends, not retries), of those in `sent`.
    #[serde(default)]
    pub group_sent: u64,
    /// Group messages acknowledged (SendOk), of those in `send_ok`.
    #[serde(default)]
    pub group_send_ok: u64,
    /// Deliveries of group messages, of those in `delivered`.
    #[serde(default)]
    pub group_delivered: u64,
    /// Group messages of those in `kill_in_flight`...
    #[serde(default)]
    pub group_kill_in_flight: u64,
    /// ...and of those in `kill_confirmed`.
    #[serde(default)]
    pub group_kill_confirmed: u64,
    pub errors: BTreeMap<String, u64>,
    /// The first violations, for diagnosis.
    pub notes: Vec<String>,
}

impl Stats {
    pub fn merge(&mut self, o: &Stats) {
        macro_rules! add {
            ($($f:ident),*) => { $( self.$f += o.$f; )* };
        }
        add!(
            clients,
            connects,
            established,
            logins,
            reconnects,
            disconnects,
            dropped,
            sent,
            resent,
            send_ok,
            send_ok_dup,
            send_ok_window,
            delivered,
            delivered_window,
            arrived_window,
            old,
            own_echo,
            foreign,
            pings,
            dups,
            reorders,
            gaps,
            misrouted,
            wrong_fields,
            corrupt,
            changed,
            injected,
            kill_in_flight,
            kill_confirmed,
            kill_stored,
            unconfirmed,
            rate_skipped,
            refused,
            not_attempted,
            group_sent,
            group_send_ok,
            group_delivered,
            group_kill_in_flight,
            group_kill_confirmed
        );
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for n in &o.notes {
            if self.notes.len() < 20 {
                self.notes.push(n.clone());
            }
        }
    }

    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Deliveries that broke a rule as they came (not counting gaps and the ledger).
    pub fn violations(&self) -> u64 {
        self.dups + self.reorders + self.misrouted + self.wrong_fields + self.corrupt + self.changed
    }

    fn note(&mut self, s: String) {
        if self.notes.len() < 20 {
            self.notes.push(s);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CState {
    /// Not wanted online (or given up).
    Off,
    Queued,
    /// TCP connect and WebSocket handshake.
    Connecting,
    LoggingIn,
    Online,
    /// Waiting to reconnect.
    Backoff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PState {
    /// Written on the current connection; waiting for SendOk.
    Wire,
    /// To be (re)sent once logged in.
    Unsent,
    Acked,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    counter: u64,
    to: u32,
    ts: u64,
    st: PState,
    /// It was on the wire when the server was killed.
    at_kill: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    None,
    Asked,
    Clean,
    /// Seqs the device never saw: holes plus messages the server still has beyond it.
    Dirty(u64),
}

/// Milliseconds between rounds of resending what the server refused (UNAVAILABLE while
/// Redis is away, RATE_LIMITED): the same client_msg_id each time.
pub const RESEND_REFUSED_MS: u64 = 100;

pub struct Client {
    pub user: u32,
    pub dev: u16,
    pub gidx: u32,
    pub uid: String,
    pub device_id: String,
    token: Option<String>,
    pub state: CState,
    pub conn: Option<usize>,
    /// Connect/login deadline, or when to retry.
    deadline_ms: u64,
    attempts: u32,
    /// Connections lost or refused so far: with reconnect, each moves the client on to the
    /// next server address.
    hops: usize,
    pub tracker: Option<SeqTracker>,
    /// max_seq of the latest LoginOk.
    pub login_max_seq: u64,
    /// When the latest login completed (ns).
    pub login_at_ns: u64,
    last_ack: u64,
    /// Messages received since the last Ack.
    since_ack: u64,
    ack_listed: bool,
    pub next_counter: u64,
    pending: VecDeque<Pending>,
    pub on_wire: u32,
    /// Recipients still to send to (scripted traffic), taken from the end.
    pub script: Vec<u32>,
    pub sync: SyncState,
    /// Why it gave up, when it did.
    pub failed: Option<String>,
}

impl Client {
    pub fn pending_unacked(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| p.st != PState::Acked)
            .count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Traffic {
    Off,
    /// Open loop: this many messages per second over all sending clients, in turn.
    Rate {
        per_s: f64,
        t0_ns: u64,
        done: u64,
    },
    /// Closed loop: each sending client keeps this many sends waiting for SendOk.
    Inflight(u32),
}

/// Progress figures, printed about once a second (summed over processes).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub online: u64,
    pub connecting: u64,
    pub sent: u64,
    pub send_ok: u64,
    pub delivered: u64,
    pub errors: u64,
    pub violations: u64,
}

pub struct Fleet {
    pub cfg: FleetCfg,
    pub net: Net,
    pub clients: Vec<Client>,
    /// What every delivery must look like; who each device index is.
    shape: Shape,
    /// Random recipients are drawn from this range of users.
    pub targets: (u32, u32),
    /// Clients that send, in turn.
    pub senders: Vec<usize>,
    rr: usize,
    pub traffic: Traffic,
    /// Only scripted recipients (no random ones once a script is done).
    pub scripted: bool,
    pub stats: Stats,
    pub ledger: Ledger,
    pub hist: Histogram<u64>,
    /// Deliveries of messages sent from this time on are measured.
    pub measure_from: Option<u64>,
    queue: VecDeque<usize>,
    retry: BinaryHeap<Reverse<(u64, usize)>>,
    in_progress: usize,
    need_ack: Vec<usize>,
    /// A hard limit that stopped new connections (no reconnect mode).
    pub limit: Option<String>,
    /// No new connections (end of a chaos run is not this; storm disconnects are).
    pub paused: bool,
    /// When refused sends last went out again: they are retried every
    /// [`RESEND_REFUSED_MS`], as a client backs off from a server that is unavailable.
    resent_refused_ms: u64,
    rng: Rng,
    content: Vec<u8>,
    /// Working space for checking a delivery's content.
    scratch: Vec<u8>,
    inj: Injector,
    last_ack_tick: u64,
    last_expire: u64,
    /// Closed connections of foreign owners: (owner, why).
    pub foreign_closed: Vec<(usize, CloseReason)>,
    /// The share of a group member's sends that go to its group (the rest to a user).
    pub group_share: f64,
    /// With [`Fleet::track_group_copies`]: per group message (sender device, counter), its
    /// group target and the devices it reached, to tell a message at some of its receivers
    /// but not all (one process only: the map is not summed across processes).
    group_copies: Option<HashMap<(u32, u64), (u32, u32)>>,
}

/// Connection owners from here up are not clients (flood's garbage connections); their
/// events are handed over in [`Fleet::foreign_closed`].
pub const FOREIGN_BASE: usize = 1 << 40;

pub fn new_hist() -> Histogram<u64> {
    // 1 ns .. 1 hour at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000_000, 3).unwrap_or_else(|_| {
        Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant digits are valid"))
    })
}

impl Fleet {
    /// `devices_of[u]`: how many devices user u has (all users of the run, across processes);
    /// `gidx_count`: the number of device indices (ledger size).
    pub fn new(cfg: FleetCfg, devices_of: Vec<u16>, gidx_count: usize) -> std::io::Result<Fleet> {
        let net = Net::new(cfg.addrs.clone(), "/ws", Some(im::SUBPROTOCOL), cfg.seed)?;
        let users = devices_of.len() as u32;
        let shape = Shape {
            run: cfg.run_id,
            uid_prefix: cfg.uid_prefix.clone(),
            size: cfg.size,
            roster: Roster::new(&devices_of),
            groups: Groups::default(),
        };
        Ok(Fleet {
            rng: Rng::new(cfg.seed ^ 0x1234),
            cfg,
            net,
            clients: Vec::new(),
            shape,
            targets: (0, users),
            senders: Vec::new(),
            rr: 0,
            traffic: Traffic::Off,
            scripted: false,
            stats: Stats::default(),
            ledger: Ledger::new(gidx_count),
            hist: new_hist(),
            measure_from: None,
            queue: VecDeque::new(),
            retry: BinaryHeap::new(),
            in_progress: 0,
            need_ack: Vec::new(),
            limit: None,
            paused: false,
            resent_refused_ms: 0,
            content: Vec::new(),
            scratch: Vec::new(),
            inj: Injector::default(),
            last_ack_tick: 0,
            last_expire: 0,
            foreign_closed: Vec::new(),
            group_share: 1.0,
            group_copies: None,
        })
    }

    /// The run's groups: a sending member sends to its group (a [`Fleet::group_share`] of
    /// its sends; the rest go to a user).
    pub fn set_groups(&mut self, groups: Groups) {
        self.shape.groups = groups;
    }

    /// Counts, per group message, the devices it reached (see [`Fleet::group_partial`]).
    pub fn track_group_copies(&mut self) {
        self.group_copies = Some(HashMap::new());
    }

    /// Group messages at some but not all of their receivers (every member device but the
    /// sending one), whether acknowledged or not: a group message must reach all or none.
    /// `None` without [`Fleet::track_group_copies`]. Call after the final syncs.
    pub fn group_partial(&self) -> Option<(u64, Vec<String>)> {
        let copies = self.group_copies.as_ref()?;
        let mut n = 0;
        let mut notes = Vec::new();
        for (&(sender, counter), &(to, got)) in copies {
            let want = self.shape.receivers(sender, to).len() as u32;
            if got < want {
                n += 1;
                if notes.len() < 5 {
                    notes.push(format!(
                        "partial: group message {counter} of device {sender} at {got} of its {want} receivers"
                    ));
                }
            }
        }
        Some((n, notes))
    }

    /// Adds device `dev` of `user` with global device index `gidx`; returns its index.
    pub fn add(&mut self, user: u32, dev: u16, gidx: u32, sends: bool) -> usize {
        debug_assert_eq!(self.shape.roster.gidx(user, dev), Some(gidx));
        let i = self.clients.len();
        self.clients.push(Client {
            user,
            dev,
            gidx,
            uid: im::uid(&self.cfg.uid_prefix, user),
            device_id: im::device_id(dev),
            token: None,
            state: CState::Off,
            conn: None,
            deadline_ms: 0,
            attempts: 0,
            hops: 0,
            tracker: None,
            login_max_seq: 0,
            login_at_ns: 0,
            last_ack: 0,
            since_ack: 0,
            ack_listed: false,
            next_counter: 0,
            pending: VecDeque::new(),
            on_wire: 0,
            script: Vec::new(),
            sync: SyncState::None,
            failed: None,
        });
        self.stats.clients += 1;
        if sends {
            self.senders.push(i);
        }
        i
    }

    /// Queues clients to connect and log in.
    pub fn bring_online(&mut self, idx: impl IntoIterator<Item = usize>) {
        for i in idx {
            let c = &mut self.clients[i];
            if matches!(c.state, CState::Off) {
                c.state = CState::Queued;
                c.failed = None;
                self.queue.push_back(i);
            }
        }
    }

    /// Closes every connection (Close 1000) without reconnecting.
    pub fn disconnect_all(&mut self) {
        for i in 0..self.clients.len() {
            self.disconnect(i);
        }
        self.queue.clear();
        self.retry.clear();
    }

    pub fn disconnect(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if let Some(key) = c.conn.take() {
            self.net.close(key, 1000);
        }
        if matches!(c.state, CState::Connecting | CState::LoggingIn) {
            self.in_progress -= 1;
        }
        for p in c.pending.iter_mut() {
            if p.st == PState::Wire {
                p.st = PState::Unsent;
            }
        }
        c.on_wire = 0;
        c.state = CState::Off;
    }

    pub fn count(&self, st: CState) -> usize {
        self.clients.iter().filter(|c| c.state == st).count()
    }

    pub fn online(&self) -> usize {
        self.count(CState::Online)
    }

    /// Clients still on their way in (queued, connecting, logging in, backing off).
    pub fn setting_up(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| {
                matches!(
                    c.state,
                    CState::Queued | CState::Connecting | CState::LoggingIn | CState::Backoff
                )
            })
            .count()
    }

    pub fn progress(&self) -> Progress {
        Progress {
            online: self.online() as u64,
            connecting: self.in_progress as u64,
            sent: self.stats.sent,
            send_ok: self.stats.send_ok,
            delivered: self.stats.delivered,
            errors: self.stats.error_count(),
            violations: self.stats.violations(),
        }
    }

    /// Sends waiting for SendOk, over all clients.
    pub fn unacked_sends(&self) -> usize {
        self.clients.iter().map(Client::pending_unacked).sum()
    }

    /// Sends written on the current connections and not answered yet.
    pub fn sends_on_wire(&self) -> u64 {
        self.clients
            .iter()
            .filter(|c| c.conn.is_some())
            .map(|c| u64::from(c.on_wire))
            .sum()
    }

    /// Group sends written on the current connections and not answered yet.
    pub fn group_sends_on_wire(&self) -> u64 {
        self.clients
            .iter()
            .filter(|c| c.conn.is_some())
            .flat_map(|c| c.pending.iter())
            .filter(|p| p.st == PState::Wire && p.to >= GROUP_BASE)
            .count() as u64
    }

    /// The server is about to be killed: the sends on the wire are followed to their
    /// SendOk ([`Stats::kill_confirmed`], [`Stats::kill_stored`]). Returns how many there are.
    pub fn mark_in_flight(&mut self) -> u64 {
        let mut n = 0;
        for c in &mut self.clients {
            if c.conn.is_none() {
                continue;
            }
            for p in c.pending.iter_mut().filter(|p| p.st == PState::Wire) {
                n += 1;
                if !p.at_kill {
                    p.at_kill = true;
                    self.stats.kill_in_flight += 1;
                    if p.to >= GROUP_BASE {
                        self.stats.group_kill_in_flight += 1;
                    }
                }
            }
        }
        n
    }

    /// One turn of the loop: poll (at most `timeout`), handle what came, start connections,
    /// generate traffic, ack, write.
    pub fn step(&mut self, timeout: Duration) -> std::io::Result<()> {
        let blocked = self.limit.is_some() || self.paused;
        let timeout =
            if self.queue.is_empty() || blocked || self.in_progress >= self.cfg.connect_concurrency
            {
                timeout
            } else {
                Duration::ZERO
            };
        let timeout = match self.traffic {
            // Wake up for the next message the rate says is due, not before.
            Traffic::Rate { per_s, t0_ns, done } if per_s > 0.0 && !self.senders.is_empty() => {
                let next = t0_ns + ((done + 1) as f64 * 1e9 / per_s) as u64;
                timeout.min(Duration::from_nanos(next.saturating_sub(mono_ns())))
            }
            _ => timeout,
        };
        let (events, arena) = self.net.poll(Some(timeout))?;
        let now_ns = mono_ns();
        for e in &events {
            if e.owner >= FOREIGN_BASE {
                if let Ev::Closed(why) = &e.ev {
                    self.foreign_closed.push((e.owner, why.clone()));
                }
                continue;
            }
            let Some(c) = self.clients.get(e.owner) else {
                continue;
            };
            if c.conn != Some(e.key) {
                continue;
            }
            match &e.ev {
                Ev::Open => self.on_open(e.owner),
                Ev::Data { text, start, end } => {
                    if *text {
                        self.stats.error("protocol:text frame");
                        continue;
                    }
                    match ServerFrame::decode(&arena[*start..*end]) {
                        Ok(f) => self.on_frame(e.owner, f, now_ns),
                        Err(_) => self.stats.error("protocol:undecodable ServerFrame"),
                    }
                }
                Ev::Ping => self.stats.pings += 1,
                Ev::Closed(why) => self.on_closed(e.owner, why.clone()),
            }
        }
        self.net.recycle(events, arena);
        let now_ms = now_ns / 1_000_000;
        if now_ms >= self.last_expire + 100 {
            self.last_expire = now_ms;
            self.expire(now_ms);
        }
        self.start_connects(now_ms);
        self.generate(now_ns);
        self.acks(now_ms);
        self.net.flush();
        Ok(())
    }

    fn expire(&mut self, now_ms: u64) {
        self.net.expire(now_ms);
        if self.cfg.reconnect && now_ms >= self.resent_refused_ms + RESEND_REFUSED_MS {
            self.resent_refused_ms = now_ms;
            self.resend_refused();
        }
        for i in 0..self.clients.len() {
            let c = &self.clients[i];
            if c.state == CState::LoggingIn && c.deadline_ms <= now_ms {
                self.give_up_or_retry(i, "timeout:login".into(), false);
            }
        }
        while let Some(Reverse((at, i))) = self.retry.peek().copied() {
            if at > now_ms {
                break;
            }
            self.retry.pop();
            if self.clients[i].state == CState::Backoff {
                self.clients[i].state = CState::Queued;
                self.queue.push_back(i);
            }
        }
    }

    fn start_connects(&mut self, now_ms: u64) {
        if self.limit.is_some() && !self.cfg.reconnect {
            // A hard limit was hit: the clients still queued are not attempted.
            while let Some(i) = self.queue.pop_front() {
                let c = &mut self.clients[i];
                if c.state == CState::Queued {
                    c.state = CState::Off;
                    c.failed = Some("not attempted".into());
                    self.stats.not_attempted += 1;
                }
            }
            return;
        }
        while self.in_progress < self.cfg.connect_concurrency
            && self.limit.is_none()
            && !self.paused
        {
            let Some(i) = self.queue.pop_front() else {
                break;
            };
            if self.clients[i].state != CState::Queued {
                continue;
            }
            let src = if self.cfg.src_ips > 1 {
                Some(Ipv4Addr::new(
                    127,
                    0,
                    0,
                    1 + (self.clients[i].gidx % self.cfg.src_ips) as u8,
                ))
            } else {
                None
            };
            self.stats.connects += 1;
            let deadline = now_ms + self.cfg.connect_timeout_ms;
            let via = i + self.clients[i].hops;
            match self.net.connect_via(src, i, via, deadline, None) {
                Ok(key) => {
                    let c = &mut self.clients[i];
                    c.conn = Some(key);
                    c.state = CState::Connecting;
                    c.deadline_ms = deadline;
                    self.in_progress += 1;
                }
                Err(why) => {
                    self.clients[i].state = CState::Connecting;
                    self.in_progress += 1;
                    self.on_closed(i, why);
                }
            }
        }
    }

    fn on_open(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if c.token.is_none() {
            c.token = Some(im::token(&self.cfg.secret, &c.uid));
        }
        let last_seq = match &c.tracker {
            Some(t) if !self.cfg.resume_cursor => t.resume_after(),
            _ => 0,
        };
        let f = im::login(
            c.token.as_deref().unwrap_or_default(),
            &c.device_id,
            last_seq,
        );
        c.state = CState::LoggingIn;
        if let Some(key) = c.conn {
            self.net.send_proto(key, &f);
        }
    }

    /// A connection ended: count it, and reconnect or give up.
    fn on_closed(&mut self, i: usize, why: CloseReason) {
        if self.inj.held.as_ref().is_some_and(|(j, _)| *j == i) {
            // Its next message will come on another connection, if at all: the held one is
            // lost with this one.
            self.inj.held = None;
        }
        let c = &mut self.clients[i];
        c.conn = None;
        let was = c.state;
        if matches!(was, CState::Connecting | CState::LoggingIn) {
            self.in_progress -= 1;
        }
        for p in c.pending.iter_mut() {
            if p.st == PState::Wire {
                p.st = PState::Unsent;
            }
        }
        c.on_wire = 0;
        c.state = CState::Off;
        if was == CState::Online {
            if self.cfg.reconnect {
                self.stats.disconnects += 1;
            } else {
                self.stats.dropped += 1;
            }
        }
        let hard = matches!(
            why,
            CloseReason::Connect(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL)
                | CloseReason::Http(503)
        );
        self.give_up_or_retry(i, why.kind(), hard);
    }

    fn give_up_or_retry(&mut self, i: usize, kind: String, hard: bool) {
        let now = mono_ms();
        let c = &mut self.clients[i];
        if let Some(key) = c.conn.take() {
            self.net.close(key, 1000);
        }
        if matches!(c.state, CState::Connecting | CState::LoggingIn) {
            self.in_progress -= 1;
        }
        if self.cfg.reconnect {
            c.attempts += 1;
            c.hops += 1;
            let backoff = (20u64 << c.attempts.min(5)).min(500);
            let at = now + backoff / 2 + self.rng.below(backoff / 2 + 1);
            c.state = CState::Backoff;
            c.deadline_ms = at;
            self.retry.push(Reverse((at, i)));
            return;
        }
        c.state = CState::Off;
        if c.failed.is_none() {
            c.failed = Some(kind.clone());
        }
        self.stats.error(kind.clone());
        if hard && self.limit.is_none() {
            self.limit = Some(kind);
        }
    }

    fn on_frame(&mut self, i: usize, f: ServerFrame, now_ns: u64) {
        use server_frame::Body;
        match f.body {
            Some(Body::LoginOk(ok)) => self.on_login_ok(i, ok.max_seq, now_ns),
            Some(Body::SendOk(ok)) => self.on_send_ok(i, f.id, ok.seq, ok.duplicate),
            Some(Body::Message(m)) => self.on_message(i, m, now_ns),
            Some(Body::SyncResult(r)) => {
                let c = &mut self.clients[i];
                let Some(t) = &c.tracker else {
                    return;
                };
                let changed: Vec<Violation> = r
                    .messages
                    .iter()
                    .filter_map(|m| t.check_stored(m.seq, verify::print_of(m)).err())
                    .collect();
                let bad = t.unseen(r.messages.iter().map(|m| m.seq));
                c.sync = if bad == 0 {
                    SyncState::Clean
                } else {
                    SyncState::Dirty(bad)
                };
                let (user, dev) = (c.user, c.dev);
                for v in changed {
                    self.violation(user, dev, v, "Sync");
                }
            }
            Some(Body::Error(e)) => {
                let name = im::error_name(e.code);
                if f.id == im::LOGIN_ID {
                    self.give_up_or_retry(i, format!("login:{name}"), false);
                } else if f.id >= im::SEND_ID_BASE {
                    // The send was refused: it will never be delivered.
                    let counter = f.id - im::SEND_ID_BASE;
                    let retry = self.cfg.reconnect;
                    let c = &mut self.clients[i];
                    if let Some(p) = find(&mut c.pending, counter) {
                        // With reconnect (chaos) it is sent again later with the same
                        // client_msg_id: it may be a retry of a message already stored.
                        p.st = if retry { PState::Unsent } else { PState::Acked };
                        c.on_wire = c.on_wire.saturating_sub(1);
                    }
                    pop_acked(&mut c.pending);
                    if retry {
                        self.stats.refused += 1;
                    } else {
                        self.stats.error(format!("error:{name}"));
                    }
                } else {
                    self.stats.error(format!("error:{name}"));
                }
            }
            Some(Body::Kicked(_)) => self.stats.error("kicked"),
            Some(Body::Pong(_) | Body::Presence(_) | Body::GroupChanged(_) | Body::Signal(_)) => {}
            None => self.stats.error("protocol:empty ServerFrame"),
        }
    }

    fn on_login_ok(&mut self, i: usize, max_seq: u64, now_ns: u64) {
        let c = &mut self.clients[i];
        if c.state != CState::LoggingIn {
            self.stats.error("protocol:unexpected LoginOk");
            return;
        }
        self.in_progress -= 1;
        c.state = CState::Online;
        c.attempts = 0;
        c.login_max_seq = max_seq;
        c.login_at_ns = now_ns;
        self.stats.logins += 1;
        match &mut c.tracker {
            None => {
                c.tracker = Some(SeqTracker::start(max_seq));
                self.stats.established += 1;
            }
            Some(t) => {
                if max_seq < t.hw() {
                    // The server forgot messages this device already received.
                    self.stats
                        .error("lost:max_seq below a seq already received");
                    if self.stats.notes.len() < 20 {
                        self.stats.notes.push(format!(
                            "lost: {}/{} LoginOk max_seq {max_seq} < seq {} already received",
                            c.uid,
                            c.device_id,
                            t.hw()
                        ));
                    }
                }
                t.new_session(self.cfg.resume_cursor);
                self.stats.reconnects += 1;
            }
        }
        // Resend, with the same client_msg_id, whatever did not get a SendOk.
        let resend: Vec<Pending> = c
            .pending
            .iter()
            .filter(|p| p.st == PState::Unsent)
            .copied()
            .collect();
        for p in resend {
            self.write_send(i, p.counter, p.to, p.ts);
            self.stats.resent += 1;
        }
        let c = &mut self.clients[i];
        for p in c.pending.iter_mut() {
            if p.st == PState::Unsent {
                p.st = PState::Wire;
            }
        }
        c.on_wire = c.pending.iter().filter(|p| p.st == PState::Wire).count() as u32;
        if let Traffic::Inflight(k) = self.traffic {
            self.top_up(i, k);
        }
    }

    /// Sends the server refused go out again (same client_msg_id).
    fn resend_refused(&mut self) {
        for i in 0..self.clients.len() {
            let c = &mut self.clients[i];
            if c.state != CState::Online || c.conn.is_none() {
                continue;
            }
            let again: Vec<Pending> = c
                .pending
                .iter_mut()
                .filter(|p| p.st == PState::Unsent)
                .map(|p| {
                    p.st = PState::Wire;
                    *p
                })
                .collect();
            c.on_wire += again.len() as u32;
            for p in again {
                self.write_send(i, p.counter, p.to, p.ts);
                self.stats.resent += 1;
            }
        }
    }

    /// (to_uid, group_id) of a message to `to`: a user, or `GROUP_BASE + g`.
    fn target_fields(&self, to: u32) -> (String, String) {
        match to.checked_sub(GROUP_BASE) {
            Some(g) => (
                String::new(),
                self.shape
                    .groups
                    .ids
                    .get(g as usize)
                    .cloned()
                    .unwrap_or_default(),
            ),
            None => (im::uid(&self.cfg.uid_prefix, to), String::new()),
        }
    }

    /// The print of what client `i` sent as `p` (the message as its recipients get it).
    fn print_sent(&mut self, i: usize, p: &Pending) -> u64 {
        let c = &self.clients[i];
        Header {
            run: self.cfg.run_id,
            sender: c.gidx,
            counter: p.counter,
            ts_ns: p.ts,
        }
        .write(self.cfg.size, &mut self.scratch);
        let (to_uid, group_id) = self.target_fields(p.to);
        verify::print(
            &self.scratch,
            &c.uid,
            &to_uid,
            &im::client_msg_id(self.cfg.run_id, c.gidx, p.counter),
            &c.device_id,
            &group_id,
        )
    }

    fn on_send_ok(&mut self, i: usize, id: u64, seq: u64, duplicate: bool) {
        if id < im::SEND_ID_BASE {
            self.stats.error("protocol:SendOk for no send");
            return;
        }
        let counter = id - im::SEND_ID_BASE;
        let c = &mut self.clients[i];
        let Some(p) = find(&mut c.pending, counter).copied() else {
            self.stats.error("protocol:SendOk for no send");
            return;
        };
        let print = self.print_sent(i, &p);
        let c = &mut self.clients[i];
        if let Some(t) = &mut c.tracker {
            match t.on_send_ok(seq, duplicate, print) {
                Ok(_) => {}
                Err(v) => {
                    let (user, dev) = (c.user, c.dev);
                    self.violation(user, dev, v, "SendOk");
                }
            }
        }
        let c = &mut self.clients[i];
        if duplicate {
            self.stats.send_ok_dup += 1;
        }
        if p.st != PState::Acked {
            let gidx = c.gidx;
            if let Some(q) = find(&mut c.pending, counter) {
                q.st = PState::Acked;
            }
            c.on_wire = c.on_wire.saturating_sub(1);
            pop_acked(&mut c.pending);
            let receivers = self.shape.receivers(gidx, p.to);
            self.ledger.expect(gidx, counter, p.to, &receivers);
            if p.at_kill {
                self.stats.kill_confirmed += 1;
                if p.to >= GROUP_BASE {
                    self.stats.group_kill_confirmed += 1;
                }
                if duplicate {
                    self.stats.kill_stored += 1;
                }
            }
            self.stats.send_ok += 1;
            if p.to >= GROUP_BASE {
                self.stats.group_send_ok += 1;
            }
            if self.measure_from.is_some_and(|t0| p.ts >= t0) {
                self.stats.send_ok_window += 1;
            }
        }
        self.list_for_ack(i);
        if let Traffic::Inflight(k) = self.traffic {
            self.top_up(i, k);
        }
    }

    fn violation(&mut self, user: u32, dev: u16, v: Violation, what: &str) {
        match v {
            Violation::Dup(s) => {
                self.stats.dups += 1;
                self.stats
                    .note(format!("dup: u{user}/d{dev} {what} seq {s} seen before"));
            }
            Violation::Reorder(s) => {
                self.stats.reorders += 1;
                self.stats.note(format!(
                    "reorder: u{user}/d{dev} {what} seq {s} after a higher one"
                ));
            }
            Violation::Changed(s) => {
                self.stats.changed += 1;
                self.stats.note(format!(
                    "changed: u{user}/d{dev} {what} seq {s} holds another message than first came under it"
                ));
            }
        }
    }

    fn wrong(&mut self, user: u32, dev: u16, w: Wrong, m: &proto::Message) {
        let what = match w {
            Wrong::Corrupt => {
                self.stats.corrupt += 1;
                "corrupt content"
            }
            Wrong::Fields => {
                self.stats.wrong_fields += 1;
                "from_uid, from_device or client_msg_id not its sender's"
            }
            Wrong::Misrouted => {
                self.stats.misrouted += 1;
                "not in its recipient's or sender's inbox (or its group's members')"
            }
        };
        let group = if m.group_id.is_empty() {
            String::new()
        } else {
            format!(" group {}", m.group_id)
        };
        self.stats.note(format!(
            "wrong: u{user}/d{dev} seq {} ({} -> {}{group}, {}): {what}",
            m.seq, m.from_uid, m.to_uid, m.client_msg_id
        ));
    }

    /// A Message, after `--inject` had its way with it.
    fn on_message(&mut self, i: usize, mut m: proto::Message, now_ns: u64) {
        let Some((kind, every)) = self.cfg.inject else {
            return self.on_message_checked(i, m, now_ns);
        };
        if let Some((j, held)) = self.inj.held.take() {
            if j == i {
                if kind == Inject::Reorder {
                    self.on_message_checked(i, m, now_ns);
                    self.on_message_checked(i, held, now_ns);
                } else {
                    let again = proto::Message {
                        seq: m.seq,
                        server_time_ms: m.server_time_ms,
                        ..held
                    };
                    self.on_message_checked(i, again, now_ns);
                }
                return;
            }
            self.inj.held = Some((j, held));
        }
        let c = &self.clients[i];
        let Some(t) = &c.tracker else {
            return self.on_message_checked(i, m, now_ns);
        };
        let ours = || Header::parse(&m.content).is_some_and(|h| h.run == self.cfg.run_id);
        let eligible = match kind {
            Inject::Redelivery => t.is_redelivery(m.seq) && ours(),
            Inject::Swap => !t.is_seen(m.seq) && ours(),
            Inject::Misroute | Inject::FromUid => {
                !t.is_seen(m.seq) && m.from_uid != c.uid && self.shape.roster.users() >= 3
            }
            Inject::Reorder | Inject::DupSeq => !t.is_seen(m.seq) && self.inj.held.is_none(),
            Inject::Drop | Inject::Dup | Inject::Payload => !t.is_seen(m.seq),
        };
        if !eligible {
            return self.on_message_checked(i, m, now_ns);
        }
        self.inj.count += 1;
        if self.inj.count < every.max(1) {
            return self.on_message_checked(i, m, now_ns);
        }
        self.inj.count = 0;
        self.stats.injected += 1;
        let third = || {
            let n = self.shape.roster.users();
            let (me, from) = (c.user, self.shape.user_of_uid(&m.from_uid));
            let mut x = (me + 1) % n;
            while x == me || Some(x) == from {
                x = (x + 1) % n;
            }
            im::uid(&self.cfg.uid_prefix, x)
        };
        match kind {
            Inject::Drop => {}
            Inject::Dup => {
                self.on_message_checked(i, m.clone(), now_ns);
                self.on_message_checked(i, m, now_ns);
            }
            Inject::Reorder => self.inj.held = Some((i, m)),
            Inject::DupSeq => {
                self.on_message_checked(i, m.clone(), now_ns);
                self.inj.held = Some((i, m));
            }
            Inject::Swap | Inject::Redelivery => {
                if let Some(mut h) = Header::parse(&m.content) {
                    if kind == Inject::Swap {
                        // A counter its sender never reaches.
                        h.counter = h.counter.wrapping_add(1 << 39);
                        m.client_msg_id = im::client_msg_id(h.run, h.sender, h.counter);
                    } else {
                        h.ts_ns ^= 1;
                    }
                    h.write(m.content.len(), &mut m.content);
                }
                self.on_message_checked(i, m, now_ns);
            }
            Inject::Misroute => {
                m.to_uid = third();
                self.on_message_checked(i, m, now_ns);
            }
            Inject::FromUid => {
                m.from_uid = third();
                self.on_message_checked(i, m, now_ns);
            }
            Inject::Payload => {
                if let Some(b) = m.content.last_mut() {
                    *b ^= 0x20;
                }
                self.on_message_checked(i, m, now_ns);
            }
        }
    }

    fn on_message_checked(&mut self, i: usize, m: proto::Message, now_ns: u64) {
        let c = &mut self.clients[i];
        let Some(t) = &mut c.tracker else {
            self.stats.error("protocol:Message before LoginOk");
            return;
        };
        let (user, dev, gidx) = (c.user, c.dev, c.gidx);
        let seen = t.on_message(m.seq, verify::print_of(&m));
        if seen.is_ok() {
            c.since_ack += 1;
        }
        // Every delivery is checked, a re-delivery too.
        let delivery = self.shape.check(&m, user, &mut self.scratch);
        if let Delivery::Wrong(w) = delivery {
            self.wrong(user, dev, w, &m);
        }
        match seen {
            Err(v) => self.violation(user, dev, v, "Message"),
            Ok(Seen::Old) => self.stats.old += 1,
            Ok(Seen::New) => match delivery {
                Delivery::Ok(h) if h.sender == gidx => self.stats.own_echo += 1,
                Delivery::Ok(h) => {
                    let to = self.shape.target_of(&m).unwrap_or(u32::MAX);
                    self.ledger.got(h.sender, h.counter, to, (user, dev));
                    self.stats.delivered += 1;
                    if to >= GROUP_BASE && to != u32::MAX {
                        self.stats.group_delivered += 1;
                        if let Some(copies) = &mut self.group_copies {
                            copies.entry((h.sender, h.counter)).or_insert((to, 0)).1 += 1;
                        }
                    }
                    if self.measure_from.is_some_and(|t0| h.ts_ns >= t0) {
                        let lat = now_ns.saturating_sub(h.ts_ns).max(1);
                        let _ = self.hist.record(lat.min(3_600_000_000_000));
                        self.stats.delivered_window += 1;
                    }
                }
                Delivery::Foreign => self.stats.foreign += 1,
                // Counted above; not a delivery of what was sent.
                Delivery::Wrong(_) => {}
            },
        }
        self.list_for_ack(i);
    }

    fn list_for_ack(&mut self, i: usize) {
        let c = &mut self.clients[i];
        if !c.ack_listed {
            c.ack_listed = true;
            self.need_ack.push(i);
        }
    }

    /// Acks every `ack_every` messages, and everything on each tick. The Ack carries the
    /// contiguous seq; while history from before the run streams in, that is above what the
    /// server has sent, and it takes the Ack as far as it has sent, so every batch of history
    /// is acked again.
    fn acks(&mut self, now_ms: u64) {
        if self.need_ack.is_empty() {
            return;
        }
        let tick = now_ms >= self.last_ack_tick + self.cfg.ack_tick_ms;
        if tick {
            self.last_ack_tick = now_ms;
        }
        let mut list = std::mem::take(&mut self.need_ack);
        list.retain(|&i| {
            let c = &mut self.clients[i];
            let (Some(t), Some(key), CState::Online) = (&c.tracker, c.conn, c.state) else {
                c.ack_listed = false;
                return false;
            };
            let contig = t.contig();
            if contig <= c.last_ack && c.since_ack == 0 {
                c.ack_listed = false;
                return false;
            }
            if tick
                || c.since_ack >= self.cfg.ack_every
                || contig.saturating_sub(c.last_ack) >= self.cfg.ack_every
            {
                self.net.send_proto(key, &im::ack(contig));
                c.last_ack = contig;
                c.since_ack = 0;
                c.ack_listed = false;
                return false;
            }
            true
        });
        self.need_ack = list;
    }

    /// Open-loop traffic: send what the rate says is due, one sender after another.
    fn generate(&mut self, now_ns: u64) {
        let Traffic::Rate { per_s, t0_ns, done } = self.traffic else {
            return;
        };
        if self.senders.is_empty() || now_ns < t0_ns {
            return;
        }
        let due_total = ((now_ns - t0_ns) as f64 * per_s / 1e9) as u64;
        let mut due = due_total.saturating_sub(done);
        // Never more than 100 ms worth at once: past that the bench is behind, and says so.
        let cap = (per_s / 10.0).max(1.0) as u64;
        if due > cap {
            self.stats.rate_skipped += due - cap;
            due = cap;
        }
        let mut sent = 0;
        let mut tries = 0;
        let n = self.senders.len();
        while sent < due && tries < n {
            let i = self.senders[self.rr % n];
            self.rr = self.rr.wrapping_add(1);
            if self.send_new(i) {
                sent += 1;
                tries = 0;
            } else {
                tries += 1;
            }
        }
        self.stats.rate_skipped += due - sent;
        self.traffic = Traffic::Rate {
            per_s,
            t0_ns,
            done: due_total,
        };
    }

    /// Starts closed-loop traffic (or tops up after a SendOk).
    pub fn top_up_all(&mut self) {
        if let Traffic::Inflight(k) = self.traffic {
            for n in 0..self.senders.len() {
                let i = self.senders[n];
                self.top_up(i, k);
            }
        }
    }

    fn top_up(&mut self, i: usize, k: u32) {
        while self.clients[i].state == CState::Online && self.clients[i].on_wire < k {
            if !self.send_new(i) {
                break;
            }
        }
    }

    /// A new message from client `i` (to a scripted or random recipient).
    fn send_new(&mut self, i: usize) -> bool {
        let c = &self.clients[i];
        if c.state != CState::Online {
            return false;
        }
        let (user, script) = (c.user, c.script.last().copied());
        let to = if let Some(t) = script {
            t
        } else if let Some(g) = self
            .shape
            .groups
            .of(user)
            .filter(|_| self.group_share >= 1.0 || self.rng.f64() < self.group_share)
        {
            GROUP_BASE + g
        } else if self.scripted {
            return false;
        } else {
            let (lo, hi) = self.targets;
            if hi - lo < 2 {
                return false;
            }
            let mut t = lo + self.rng.below(u64::from(hi - lo - 1)) as u32;
            if t >= user {
                t += 1;
            }
            if t >= hi {
                t = lo;
            }
            t
        };
        let c = &mut self.clients[i];
        c.script.pop();
        let counter = c.next_counter;
        c.next_counter += 1;
        let ts = mono_ns();
        c.pending.push_back(Pending {
            counter,
            to,
            ts,
            st: PState::Wire,
            at_kill: false,
        });
        c.on_wire += 1;
        self.write_send(i, counter, to, ts);
        self.stats.sent += 1;
        if to >= GROUP_BASE {
            self.stats.group_sent += 1;
        }
        true
    }

    fn write_send(&mut self, i: usize, counter: u64, to: u32, ts: u64) {
        let c = &self.clients[i];
        let Some(key) = c.conn else {
            return;
        };
        Header {
            run: self.cfg.run_id,
            sender: c.gidx,
            counter,
            ts_ns: ts,
        }
        .write(self.cfg.size, &mut self.content);
        let (to_uid, group_id) = self.target_fields(to);
        let f = im::send(
            counter,
            to_uid,
            group_id,
            im::client_msg_id(self.cfg.run_id, c.gidx, counter),
            self.content.clone(),
        );
        self.net.send_proto(key, &f);
    }

    /// Asks every online client that has not come out clean for the messages the server
    /// has after its contiguous seq (the final gap check).
    pub fn request_sync(&mut self) {
        for c in &mut self.clients {
            if c.state != CState::Online || c.sync == SyncState::Clean {
                continue;
            }
            if c.sync == SyncState::Asked {
                continue;
            }
            let (Some(t), Some(key)) = (&c.tracker, c.conn) else {
                continue;
            };
            c.sync = SyncState::Asked;
            self.net.send_proto(key, &im::sync(t.contig(), 1000));
        }
        self.net.flush();
    }

    /// After the final syncs: gaps (per device, seqs never seen) and unconfirmed sends
    /// enter the stats and the ledger.
    pub fn finish(&mut self) {
        let mut gaps = 0;
        let mut unconfirmed = Vec::new();
        for c in &self.clients {
            match c.sync {
                SyncState::Dirty(n) => {
                    gaps += n;
                    if self.stats.notes.len() < 20 {
                        self.stats.notes.push(format!(
                            "gap: {}/{} misses {n} seq(s) after {}",
                            c.uid,
                            c.device_id,
                            c.tracker.as_ref().map_or(0, SeqTracker::contig)
                        ));
                    }
                }
                SyncState::Asked | SyncState::None if c.tracker.is_some() => {
                    let holes = c.tracker.as_ref().map_or(0, SeqTracker::holes);
                    gaps += holes;
                }
                _ => {}
            }
            for p in &c.pending {
                if p.st != PState::Acked {
                    unconfirmed.push((c.gidx, p.to));
                }
            }
        }
        self.stats.gaps += gaps;
        for (gidx, to) in unconfirmed {
            let copies = self.shape.receivers(gidx, to).len() as u64;
            self.ledger.unknown(gidx, copies);
            self.stats.unconfirmed += 1;
        }
    }

    /// Clients whose final sync is not clean yet.
    pub fn unsynced(&self) -> usize {
        self.clients
            .iter()
            .filter(|c| c.tracker.is_some() && c.sync != SyncState::Clean)
            .count()
    }

    /// Marks dirty syncs for another try.
    pub fn retry_dirty_syncs(&mut self) {
        for c in &mut self.clients {
            if matches!(c.sync, SyncState::Dirty(_)) {
                c.sync = SyncState::None;
            }
        }
    }

    pub fn histogram_pairs(&self) -> Vec<(u64, u64)> {
        hist_pairs(&self.hist)
    }
}

pub fn hist_pairs(h: &Histogram<u64>) -> Vec<(u64, u64)> {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

fn find(pending: &mut VecDeque<Pending>, counter: u64) -> Option<&mut Pending> {
    let first = pending.front()?.counter;
    let idx = counter.checked_sub(first)? as usize;
    let p = pending.get_mut(idx)?;
    (p.counter == counter).then_some(p)
}

fn pop_acked(pending: &mut VecDeque<Pending>) {
    while pending.front().is_some_and(|p| p.st == PState::Acked) {
        pending.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: u32 = 12;
    /// The device every test message comes from.
    const SENDER: u32 = USERS - 1;

    /// Twelve single-device users, all logged in with empty inboxes.
    fn fleet(inject: Option<(Inject, u64)>) -> Fleet {
        let cfg = FleetCfg {
            addrs: vec![SocketAddr::from(([127, 0, 0, 1], 9))],
            src_ips: 1,
            secret: b"secret".to_vec(),
            uid_prefix: "t".into(),
            run_id: 7,
            connect_concurrency: 1,
            connect_timeout_ms: 1000,
            reconnect: false,
            resume_cursor: false,
            ack_every: 32,
            ack_tick_ms: 100,
            size: 40,
            seed: 1,
            inject,
        };
        let mut f = Fleet::new(cfg, vec![1; USERS as usize], USERS as usize).unwrap();
        for u in 0..USERS {
            let i = f.add(u, 0, u, false);
            f.clients[i].tracker = Some(SeqTracker::start(0));
        }
        f
    }

    /// What SENDER's `counter`-th message to user `to` looks like under `seq`.
    fn msg(f: &Fleet, to: u32, counter: u64, seq: u64) -> proto::Message {
        let mut content = Vec::new();
        Header {
            run: f.cfg.run_id,
            sender: SENDER,
            counter,
            ts_ns: 1,
        }
        .write(f.cfg.size, &mut content);
        proto::Message {
            seq,
            from_uid: im::uid("t", SENDER),
            to_uid: im::uid("t", to),
            client_msg_id: im::client_msg_id(f.cfg.run_id, SENDER, counter),
            content,
            server_time_ms: 1,
            from_device: im::device_id(0),
            group_id: String::new(),
        }
    }

    /// Users 0..10 each get 20 messages (seqs 1..=20: none a multiple of 97), and the ledger
    /// expects them; with `again`, every device then resumes from the stored cursor and
    /// gets them all once more.
    fn deliver(f: &mut Fleet, again: bool) {
        for round in 0..if again { 2 } else { 1 } {
            for to in 0..10 {
                if round == 1 {
                    if let Some(t) = &mut f.clients[to as usize].tracker {
                        t.new_session(true);
                    }
                }
                for s in 1..=20 {
                    let m = msg(f, to, u64::from(to) * 100 + s, s);
                    if round == 0 {
                        let c = m.content.clone();
                        let h = Header::parse(&c).unwrap();
                        f.ledger.expect(SENDER, h.counter, to, &[(to, 0)]);
                    }
                    f.on_message(to as usize, m, 0);
                }
            }
        }
    }

    fn holes(f: &Fleet) -> u64 {
        f.clients
            .iter()
            .filter_map(|c| c.tracker.as_ref())
            .map(SeqTracker::holes)
            .sum()
    }

    #[test]
    fn clean_deliveries_pass_every_check() {
        let mut f = fleet(None);
        deliver(&mut f, true);
        assert_eq!(f.stats.delivered, 200);
        assert_eq!(f.stats.old, 200);
        assert_eq!(f.stats.violations(), 0, "{:?}", f.stats.notes);
        assert_eq!(holes(&f), 0);
        let c = f.ledger.check();
        assert_eq!((c.missing, c.extra, c.mismatched), (0, 0, 0));
    }

    #[test]
    fn injection_hits_every_nth_new_delivery_whatever_its_seq() {
        let mut f = fleet(Some((Inject::Drop, 97)));
        deliver(&mut f, false);
        assert_eq!(f.stats.injected, 2);
        assert_eq!(holes(&f), 2);
        assert_eq!(f.ledger.check().missing, 2);
    }

    #[test]
    fn every_injected_fault_is_caught() {
        for kind in [
            Inject::Drop,
            Inject::Dup,
            Inject::DupSeq,
            Inject::Reorder,
            Inject::Swap,
            Inject::Misroute,
            Inject::FromUid,
            Inject::Payload,
            Inject::Redelivery,
        ] {
            // Every 31st: never the last message of a device, which has no next one.
            let mut f = fleet(Some((kind, 31)));
            deliver(&mut f, kind == Inject::Redelivery);
            let st = &f.stats;
            let c = f.ledger.check();
            let n = st.injected;
            assert!(n >= 5, "{kind:?} fired {n} times");
            let caught = match kind {
                Inject::Drop => holes(&f) == n && c.missing == n,
                Inject::Dup => st.dups == n,
                Inject::DupSeq => c.extra + c.mismatched > 0 && c.missing + c.mismatched > 0,
                Inject::Reorder => st.reorders == n,
                Inject::Swap => c.mismatched > 0 && st.violations() == 0,
                Inject::Misroute => st.misrouted == n,
                Inject::FromUid => st.wrong_fields == n,
                Inject::Payload => st.corrupt == n,
                Inject::Redelivery => st.changed == n,
            };
            assert!(caught, "{kind:?}: {st:?} {c:?}");
        }
    }
}
