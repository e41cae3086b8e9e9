//! The cluster's pub/sub (docs/CLUSTER.md, "Routing"), on two side threads so that the
//! network thread never waits on Redis: one publishes each loop turn's news as one pipeline
//! (and keeps the node's presence: its devices, its lease, the cleanup after dead nodes),
//! one holds the subscriptions to the channels of the users this node caches (and to the one
//! channel every node hears, for group membership changes) and hands what other nodes
//! publish there to the loop, waking it through the `mio::Waker`.
//!
//! Pub/sub delivers at most once: what is published while the subscriber is away (Redis
//! restarting, a connection lost) is not heard. So every subscription, at first and again
//! after each reconnect, is reported ([`BusEvent::Subscribed`]), and the core then reads
//! where the user's inbox ends: nothing appended is missed, only heard late.

use std::collections::{HashMap, HashSet};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::Connection;

use super::keys::{channel, CLUSTER_CHANNEL};
use super::news::News;
use super::shards::Shards;
use super::{RedisStore, RedisTarget, WriteError};
use crate::im::core::{ClusterOp, Published};

/// How long the subscriber waits for a publish before it looks for subscription changes:
/// the most a new subscription waits to be made.
pub(super) const POLL: Duration = Duration::from_millis(20);

/// The longest pause between attempts to reconnect.
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// What the bus reports to the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusEvent {
    /// The subscription to `uid`'s channel holds (again): what was published before it did
    /// was not heard.
    Subscribed(Arc<str>),
    /// The channel every node hears is heard (again): news on it may have been missed.
    ClusterHeard,
    /// The node's presence lease was made anew (see [`crate::im::core::Core::handle_lease_made`]).
    LeaseMade,
    /// A node (this one: `mine`) published `news` on `uid`'s channel. This node's own
    /// news is reported only for logins, presence and friendships (which Redis decides).
    Published {
        uid: Arc<str>,
        news: Published,
        mine: bool,
    },
}

/// A subscription the loop wants made (`On`) or ended.
pub(super) enum Sub {
    On(Arc<str>),
    Off(Arc<str>),
}

/// (channel, payload) of publishes.
type Publishes = Vec<(String, Vec<u8>)>;

/// What a loop turn asks of the publishing thread.
enum Job {
    /// (channel, payload).
    Publish(String, Vec<u8>),
    Device {
        uid: Arc<str>,
        device: Arc<str>,
        on: bool,
    },
    Friendship {
        a: String,
        b: String,
        present: bool,
    },
}

pub struct Bus {
    node: Arc<str>,
    subs: Option<mpsc::Sender<Sub>>,
    pubs: Option<mpsc::Sender<Vec<Job>>>,
    events: mpsc::Receiver<BusEvent>,
    threads: Vec<JoinHandle<()>>,
}

impl Bus {
    /// Starts the threads of node `node`, which connect to `target` by themselves (and again
    /// whenever a connection fails), waiting at most `timeout` for a connection or an answer,
    /// and keep the node's presence lease of `lease`.
    ///
    /// Errors: a thread could not be started.
    pub fn spawn(
        target: RedisTarget,
        timeout: Duration,
        lease: Duration,
        node: &str,
        waker: Arc<mio::Waker>,
    ) -> std::io::Result<Bus> {
        let node: Arc<str> = node.into();
        let (subs_tx, subs_rx) = mpsc::channel();
        let (pubs_tx, pubs_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        let report = Reporter {
            events: events_tx,
            waker,
        };
        let listener = Subscriber {
            target: target.clone(),
            timeout,
            node: node.clone(),
            ops: subs_rx,
            report: report.clone(),
            wanted: HashSet::new(),
        };
        let now = Instant::now();
        let publisher = Publisher {
            target,
            timeout,
            node: node.clone(),
            lease,
            jobs: pubs_rx,
            report,
            store: None,
            plain: None,
            devices: HashMap::new(),
            renew_at: now,
            reap_at: now,
            retry_at: None,
            pause: Duration::from_millis(50),
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("imgate-sub".into())
                .spawn(move || listener.run())?,
            std::thread::Builder::new()
                .name("imgate-pub".into())
                .spawn(move || publisher.run())?,
        ];
        Ok(Bus {
            node,
            subs: Some(subs_tx),
            pubs: Some(pubs_tx),
            events: events_rx,
            threads,
        })
    }

    /// Hands one loop turn's routes to the threads; never blocks.
    pub fn submit(&self, routes: impl Iterator<Item = ClusterOp>) {
        let mut jobs = Vec::new();
        for r in routes {
            let sub = match r {
                ClusterOp::Subscribe(uid) => Sub::On(uid),
                ClusterOp::Unsubscribe(uid) => Sub::Off(uid),
                ClusterOp::Device { uid, device, on } => {
                    jobs.push(Job::Device { uid, device, on });
                    continue;
                }
                ClusterOp::Friendship { a, b, present } => {
                    jobs.push(Job::Friendship { a, b, present });
                    continue;
                }
                ClusterOp::Publish { uid, news } => {
                    let n = News {
                        node: &self.node,
                        uid: &uid,
                        news,
                    };
                    let to = match n.news {
                        Published::Membership { .. } => CLUSTER_CHANNEL.to_owned(),
                        _ => channel(&uid),
                    };
                    match n.encode() {
                        Some(raw) => jobs.push(Job::Publish(to, raw)),
                        None => log::error!("news of {uid} not published: an id too long"),
                    }
                    continue;
                }
            };
            if let Some(s) = &self.subs {
                let _ = s.send(sub);
            }
        }
        if let (false, Some(p)) = (jobs.is_empty(), &self.pubs) {
            let _ = p.send(jobs);
        }
    }

    /// What arrived since the last call.
    pub fn completed(&self) -> mpsc::TryIter<'_, BusEvent> {
        self.events.try_iter()
    }
}

impl Drop for Bus {
    /// Publishes what was submitted, then stops the threads.
    fn drop(&mut self) {
        self.subs.take();
        self.pubs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The most device changes kept for Redis while it is away; more are dropped (logged), and
/// those devices stay as Redis had them until this node's lease runs out or it is made anew.
const MAX_PENDING_DEVICES: usize = 200_000;

/// The publishing thread's state: it also keeps the node's presence in Redis (its devices and
/// its lease) and cleans up after nodes whose lease ran out.
struct Publisher {
    target: RedisTarget,
    timeout: Duration,
    node: Arc<str>,
    lease: Duration,
    jobs: mpsc::Receiver<Vec<Job>>,
    report: Reporter,
    /// For presence and leases: cluster-aware, each call sent to the node of its slot.
    store: Option<RedisStore>,
    /// For publishes (see [`connect_store`]).
    plain: Option<RedisStore>,
    /// Device changes Redis has not confirmed: the newest wanted state of each device. Only
    /// the newest matters, since each change states where the device is, not what moved.
    devices: HashMap<(Arc<str>, Arc<str>), bool>,
    renew_at: Instant,
    reap_at: Instant,
    /// While device changes wait for Redis: when they are tried again.
    retry_at: Option<Instant>,
    pause: Duration,
}

impl Publisher {
    fn run(mut self) {
        loop {
            let wake = [Some(self.renew_at), Some(self.reap_at), self.retry_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(self.reap_at);
            let mut jobs = Vec::new();
            let gone = match self
                .jobs
                .recv_timeout(wake.saturating_duration_since(Instant::now()))
            {
                Ok(first) => {
                    jobs.extend(first);
                    jobs.extend(self.jobs.try_iter().flatten());
                    false
                }
                Err(mpsc::RecvTimeoutError::Timeout) => false,
                Err(mpsc::RecvTimeoutError::Disconnected) => true,
            };
            let (mut publishes, mut friendships) = (Publishes::new(), Vec::new());
            for job in jobs {
                match job {
                    Job::Publish(channel, raw) => publishes.push((channel, raw)),
                    Job::Device { uid, device, on } => self.want_device(uid, device, on),
                    Job::Friendship { a, b, present } => friendships.push((a, b, present)),
                }
            }
            if Instant::now() >= self.renew_at {
                self.renew();
            }
            // Before the publishes: a login is on before it is announced.
            if !self.devices.is_empty() && self.retry_at.is_none_or(|t| t <= Instant::now()) {
                self.record_devices();
            }
            for (a, b, present) in friendships {
                let node = self.node.clone();
                if let Err(e) = self.with_store(|s| s.friendship_news(&a, &b, present, &node)) {
                    log::warn!("{e}: the friendship of {a} and {b} not told to their nodes");
                }
            }
            if !publishes.is_empty() {
                self.publish(publishes);
            }
            if Instant::now() >= self.reap_at {
                self.reap();
            }
            if gone {
                return self.leave();
            }
        }
    }

    fn want_device(&mut self, uid: Arc<str>, device: Arc<str>, on: bool) {
        let key = (uid, device);
        if self.devices.len() >= MAX_PENDING_DEVICES && !self.devices.contains_key(&key) {
            log::error!(
                "device {} of {} not recorded: too many waiting for Redis",
                key.1,
                key.0
            );
            return;
        }
        self.devices.insert(key, on);
    }

    /// Runs `f` on the presence connection, made first when there is none; a failure drops
    /// it, and `f` is made once more on a new one.
    fn with_store<T>(
        &mut self,
        mut f: impl FnMut(&mut RedisStore) -> Result<T, WriteError>,
    ) -> Result<T, WriteError> {
        let mut last = WriteError("not tried".into());
        for _ in 0..2 {
            let store = match &mut self.store {
                Some(s) => s,
                slot => match self.target.connect(self.timeout) {
                    Ok(s) => slot.insert(s),
                    Err(e) => {
                        last = e;
                        continue;
                    }
                },
            };
            match f(store) {
                Ok(t) => return Ok(t),
                Err(e) => {
                    self.store = None;
                    last = e;
                }
            }
        }
        Err(last)
    }

    fn renew(&mut self) {
        let (node, lease) = (self.node.clone(), self.lease);
        match self.with_store(|s| s.renew_lease(&node, lease)) {
            Ok(made) => {
                self.renew_at = Instant::now() + self.lease / 3;
                if made {
                    self.report.send(BusEvent::LeaseMade);
                }
            }
            Err(e) => {
                log::warn!("{e}: the lease of node {node} not renewed");
                self.renew_at = Instant::now() + (self.lease / 10).min(MAX_PAUSE);
            }
        }
    }

    fn record_devices(&mut self) {
        let node = self.node.clone();
        let changes: Vec<(Arc<str>, Arc<str>, bool)> = self
            .devices
            .iter()
            .map(|((u, d), on)| (u.clone(), d.clone(), *on))
            .collect();
        let borrowed: Vec<(&str, &str, bool)> =
            changes.iter().map(|(u, d, on)| (&**u, &**d, *on)).collect();
        match self.with_store(|s| s.record_devices(&node, &borrowed)) {
            Ok(()) => {
                self.devices.clear();
                self.retry_at = None;
                self.pause = Duration::from_millis(50);
            }
            Err(e) => {
                log::warn!("{e}: {} device changes wait for Redis", changes.len());
                self.retry_at = Some(Instant::now() + self.pause);
                self.pause = (self.pause * 2).min(MAX_PAUSE);
            }
        }
    }

    /// Every publish waiting goes as one pipeline: on a Redis Cluster, a user's news to its
    /// channel's shard (`SPUBLISH`) and the rest to every shard. One that fails twice (a new
    /// connection the second time) is dropped: the subscribers catch up from the inbox when
    /// they reconnect, and at the user's next message.
    fn publish(&mut self, all: Publishes) {
        let (all, sharded): (Publishes, Publishes) = match self.target {
            RedisTarget::Cluster(_) => all.into_iter().partition(|(ch, _)| ch == CLUSTER_CHANNEL),
            RedisTarget::Single(_) => (all, Publishes::new()),
        };
        if !sharded.is_empty() {
            if let Err(e) = self.with_store(|s| s.publish(true, &sharded)) {
                log::warn!("{e}: {} publishes dropped", sharded.len());
            }
        }
        if all.is_empty() {
            return;
        }
        let mut last = None;
        for _ in 0..2 {
            let store = match &mut self.plain {
                Some(s) => s,
                slot => match connect_store(&self.target, self.timeout) {
                    Ok(s) => slot.insert(s),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                },
            };
            match store.publish(false, &all) {
                Ok(()) => return,
                Err(e) => {
                    self.plain = None;
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            log::warn!("{e}: {} publishes dropped", all.len());
        }
    }

    /// Takes offline the devices of every other node whose lease ran out (Redis tells their
    /// friends); a node that is away from Redis does not know whether its own ran out, and
    /// learns it when it renews.
    fn reap(&mut self) {
        self.reap_at = Instant::now() + (self.lease / 10).max(Duration::from_millis(30));
        let node = self.node.clone();
        let expired = match self.with_store(|s| s.expired_nodes()) {
            Ok(e) => e,
            Err(_) => return,
        };
        for dead in expired.iter().filter(|n| **n != *node) {
            let claim = self.lease;
            match self.with_store(|s| s.reap_node(dead, &node, claim)) {
                Ok(users) if !users.is_empty() => {
                    log::info!(
                        "node {dead}'s lease ran out: {} users went offline",
                        users.len()
                    )
                }
                Ok(_) => {}
                Err(e) => log::warn!("{e}: node {dead} not cleaned up yet"),
            }
        }
    }

    /// The loop stops: what it asked for is done, and the devices still recorded as this
    /// node's are taken offline with its lease, rather than when the lease runs out.
    fn leave(mut self) {
        if !self.devices.is_empty() {
            self.record_devices();
        }
        let node = self.node.clone();
        if let Err(e) = self.with_store(|s| s.reap_node(&node, &node, Duration::from_secs(5))) {
            log::warn!("{e}: node {node}'s devices stay in Redis until its lease runs out");
        }
    }
}

/// Hands events to the loop and wakes it.
#[derive(Clone)]
pub(super) struct Reporter {
    events: mpsc::Sender<BusEvent>,
    waker: Arc<mio::Waker>,
}

impl Reporter {
    pub(super) fn send(&self, e: BusEvent) {
        if self.events.send(e).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// A connection to the one Redis, or to the first node of the Redis Cluster that answers:
/// a plain `PUBLISH` on any node of a Redis Cluster reaches the subscribers of every node
/// (and a cluster pipeline may not carry it).
fn connect_store(target: &RedisTarget, timeout: Duration) -> Result<RedisStore, WriteError> {
    let mut last = WriteError("no address".into());
    for url in target.urls() {
        match RedisStore::connect(url, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What a node published on `channel` (heard by node `node`), told to the loop. This node's
/// own news matters only where Redis decides: the order of logins, and presence.
pub(super) fn heard(report: &Reporter, node: &str, payload: &[u8], channel: &str) {
    match News::decode(payload) {
        Ok(n) if n.node == node && !decided_by_redis(&n.news) => {}
        Ok(n) => report.send(BusEvent::Published {
            uid: n.uid.into(),
            mine: n.node == node,
            news: n.news,
        }),
        Err(e) => log::warn!("pub/sub on {channel}: {e}"),
    }
}

/// News that this node hears back from itself: what Redis orders or decides.
fn decided_by_redis(news: &Published) -> bool {
    matches!(
        news,
        Published::Login { .. } | Published::Presence { .. } | Published::Friend { .. }
    )
}

/// The subscribing thread's state.
struct Subscriber {
    target: RedisTarget,
    timeout: Duration,
    node: Arc<str>,
    ops: mpsc::Receiver<Sub>,
    report: Reporter,
    /// The users whose channel the loop wants heard.
    wanted: HashSet<Arc<str>>,
}

impl Subscriber {
    fn run(mut self) {
        let mut pause = Duration::from_millis(50);
        loop {
            // Changes made while away are taken before subscribing to all that is wanted.
            let (mut on, mut off) = (Vec::new(), Vec::new());
            if !self.take(&mut on, &mut off) {
                return;
            }
            let (mut conn, url) = match self.connect() {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("pub/sub: cannot connect to {}: {e}", self.target);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                    continue;
                }
            };
            pause = Duration::from_millis(50);
            match self.listen(&mut conn, &url) {
                Ok(()) => return,
                Err(e) => log::warn!("pub/sub connection lost ({e}); reconnecting"),
            }
        }
    }

    /// A connection to the one Redis, or to the first node of the Redis Cluster that
    /// answers (see [`connect_store`]), with its address.
    fn connect(&self) -> redis::RedisResult<(Connection, String)> {
        let mut last = None;
        for url in self.target.urls() {
            match redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection_with_timeout(self.timeout))
            {
                Ok(c) => return Ok((c, url.clone())),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from(std::io::Error::other("no address"))))
    }

    /// Subscribes to everything wanted, then hears publishes and follows the loop's changes
    /// until the connection fails (Err) or the loop is gone (Ok).
    ///
    /// On a Redis Cluster a user's inbox news is heard on the shard that owns its channel
    /// ([`Shards`]), while this connection (`conn`, to the node at `url`) hears what is
    /// published to every shard: group membership changes, and presence news, which Redis
    /// functions publish and which may not reach into other slots.
    fn listen(&mut self, conn: &mut Connection, url: &str) -> redis::RedisResult<()> {
        let shards = match self.target {
            RedisTarget::Cluster(_) => Some(Shards::start(
                conn,
                url,
                self.timeout,
                self.node.clone(),
                self.report.clone(),
            )?),
            RedisTarget::Single(_) => None,
        };
        let shards = shards.as_ref();
        let mut ps = conn.as_pubsub();
        ps.set_read_timeout(Some(self.timeout))?;
        ps.subscribe(CLUSTER_CHANNEL)?;
        self.report(BusEvent::ClusterHeard);
        let all: Vec<Arc<str>> = self.wanted.iter().cloned().collect();
        self.subscribe(&mut ps, shards, &all)?;
        // Answers to (un)subscribing may take the timeout; a publish is waited for a POLL.
        ps.set_read_timeout(Some(POLL))?;
        let (mut on, mut off) = (Vec::new(), Vec::new());
        loop {
            if !self.take(&mut on, &mut off) {
                return Ok(());
            }
            if shards.is_some_and(Shards::failed) {
                return Err(std::io::Error::other("a shard's subscriptions failed").into());
            }
            if !on.is_empty() || !off.is_empty() {
                ps.set_read_timeout(Some(self.timeout))?;
                if !off.is_empty() {
                    ps.unsubscribe(off.iter().map(|u| channel(u)).collect::<Vec<_>>())?;
                    for uid in off.drain(..) {
                        if let Some(sh) = shards {
                            sh.send(Sub::Off(uid));
                        }
                    }
                }
                self.subscribe(&mut ps, shards, &on)?;
                on.clear();
                ps.set_read_timeout(Some(POLL))?;
            }
            let msg = match ps.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e),
            };
            heard(
                &self.report,
                &self.node,
                msg.get_payload_bytes(),
                msg.get_channel_name(),
            );
        }
    }

    /// Subscribes to the channels of `uids`, here and, on a Redis Cluster, on their shards,
    /// which report each subscription once it holds there.
    fn subscribe(
        &self,
        ps: &mut redis::PubSub<'_>,
        shards: Option<&Shards>,
        uids: &[Arc<str>],
    ) -> redis::RedisResult<()> {
        if uids.is_empty() {
            return Ok(());
        }
        ps.subscribe(uids.iter().map(|u| channel(u)).collect::<Vec<_>>())?;
        for uid in uids {
            match shards {
                Some(sh) => sh.send(Sub::On(uid.clone())),
                None => self.report(BusEvent::Subscribed(uid.clone())),
            }
        }
        Ok(())
    }

    fn report(&self, e: BusEvent) {
        self.report.send(e);
    }

    /// Takes the loop's changes into `wanted`, with what to subscribe to and unsubscribe
    /// from now (a change undone before it was made makes none). Returns false once the
    /// loop is gone.
    fn take(&mut self, on: &mut Vec<Arc<str>>, off: &mut Vec<Arc<str>>) -> bool {
        loop {
            match self.ops.try_recv() {
                Ok(Sub::On(uid)) => {
                    if let Some(i) = off.iter().position(|u| *u == uid) {
                        off.swap_remove(i);
                        self.wanted.insert(uid);
                    } else if self.wanted.insert(uid.clone()) {
                        on.push(uid);
                    }
                }
                Ok(Sub::Off(uid)) => {
                    if let Some(i) = on.iter().position(|u| *u == uid) {
                        on.swap_remove(i);
                        self.wanted.remove(&uid);
                    } else if self.wanted.remove(&uid) {
                        off.push(uid);
                    }
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            }
        }
    }
}
