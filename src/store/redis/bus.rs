//! The cluster's pub/sub (docs/CLUSTER.md, "Routing"), on two side threads so that the
//! network thread never waits on Redis: one publishes each loop turn's news as one pipeline,
//! one holds the subscriptions to the channels of the users this node caches (and to the one
//! channel every node hears, for group membership changes) and hands what other nodes
//! publish there to the loop, waking it through the `mio::Waker`.
//!
//! Pub/sub delivers at most once: what is published while the subscriber is away (Redis
//! restarting, a connection lost) is not heard. So every subscription, at first and again
//! after each reconnect, is reported ([`BusEvent::Subscribed`]), and the core then reads
//! where the user's inbox ends: nothing appended is missed, only heard late.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use redis::Connection;

use super::keys::{channel, CLUSTER_CHANNEL};
use super::news::News;
use super::{RedisStore, RedisTarget, WriteError};
use crate::im::core::{ClusterOp, Published};

/// How long the subscriber waits for a publish before it looks for subscription changes:
/// the most a new subscription waits to be made.
const POLL: Duration = Duration::from_millis(20);

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
    /// A node (this one: `mine`) published `news` on `uid`'s channel. This node's own
    /// news is reported only for logins.
    Published {
        uid: Arc<str>,
        news: Published,
        mine: bool,
    },
}

enum Sub {
    On(Arc<str>),
    Off(Arc<str>),
}

/// (channel, payload) of each publish of one loop turn.
type Publishes = Vec<(String, Vec<u8>)>;

pub struct Bus {
    node: Arc<str>,
    subs: Option<mpsc::Sender<Sub>>,
    pubs: Option<mpsc::Sender<Publishes>>,
    events: mpsc::Receiver<BusEvent>,
    threads: Vec<JoinHandle<()>>,
}

impl Bus {
    /// Starts the threads of node `node`, which connect to `target` by themselves (and again
    /// whenever a connection fails), waiting at most `timeout` for a connection or an answer.
    ///
    /// Errors: a thread could not be started.
    pub fn spawn(
        target: RedisTarget,
        timeout: Duration,
        node: &str,
        waker: Arc<mio::Waker>,
    ) -> std::io::Result<Bus> {
        let node: Arc<str> = node.into();
        let (subs_tx, subs_rx) = mpsc::channel();
        let (pubs_tx, pubs_rx) = mpsc::channel();
        let (events_tx, events_rx) = mpsc::channel();
        let listener = Subscriber {
            target: target.clone(),
            timeout,
            node: node.clone(),
            ops: subs_rx,
            events: events_tx,
            waker,
            wanted: HashSet::new(),
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("imgate-sub".into())
                .spawn(move || listener.run())?,
            std::thread::Builder::new()
                .name("imgate-pub".into())
                .spawn(move || publish_all(target, timeout, pubs_rx))?,
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
        let mut publishes = Publishes::new();
        for r in routes {
            let sub = match r {
                ClusterOp::Subscribe(uid) => Sub::On(uid),
                ClusterOp::Unsubscribe(uid) => Sub::Off(uid),
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
                        Some(raw) => publishes.push((to, raw)),
                        None => log::error!("news of {uid} not published: an id too long"),
                    }
                    continue;
                }
            };
            if let Some(s) = &self.subs {
                let _ = s.send(sub);
            }
        }
        if let (false, Some(p)) = (publishes.is_empty(), &self.pubs) {
            let _ = p.send(publishes);
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

/// The publishing thread: every batch of publishes waiting goes as one pipeline. A publish
/// that fails twice (a new connection the second time) is dropped: the subscribers catch up
/// from the inbox when they reconnect, and at the user's next message.
fn publish_all(target: RedisTarget, timeout: Duration, jobs: mpsc::Receiver<Publishes>) {
    let mut conn: Option<RedisStore> = None;
    while let Ok(mut all) = jobs.recv() {
        while let Ok(more) = jobs.try_recv() {
            all.extend(more);
        }
        let mut last = None;
        for _ in 0..2 {
            let store = match &mut conn {
                Some(s) => s,
                slot => match connect_store(&target, timeout) {
                    Ok(s) => slot.insert(s),
                    Err(e) => {
                        last = Some(e);
                        continue;
                    }
                },
            };
            match store.publish(&all) {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => {
                    conn = None;
                    last = Some(e);
                }
            }
        }
        if let Some(e) = last {
            log::warn!("{e}: {} publishes dropped", all.len());
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

/// The subscribing thread's state.
struct Subscriber {
    target: RedisTarget,
    timeout: Duration,
    node: Arc<str>,
    ops: mpsc::Receiver<Sub>,
    events: mpsc::Sender<BusEvent>,
    waker: Arc<mio::Waker>,
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
            let mut conn = match self.connect() {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("pub/sub: cannot connect to {}: {e}", self.target);
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                    continue;
                }
            };
            pause = Duration::from_millis(50);
            match self.listen(&mut conn) {
                Ok(()) => return,
                Err(e) => log::warn!("pub/sub connection lost ({e}); reconnecting"),
            }
        }
    }

    /// A connection to the one Redis, or to the first node of the Redis Cluster that
    /// answers (see [`connect_store`]).
    fn connect(&self) -> redis::RedisResult<Connection> {
        let mut last = None;
        for url in self.target.urls() {
            match redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection_with_timeout(self.timeout))
            {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| redis::RedisError::from(std::io::Error::other("no address"))))
    }

    /// Subscribes to everything wanted, then hears publishes and follows the loop's changes
    /// until the connection fails (Err) or the loop is gone (Ok).
    fn listen(&mut self, conn: &mut Connection) -> redis::RedisResult<()> {
        let mut ps = conn.as_pubsub();
        ps.set_read_timeout(Some(self.timeout))?;
        ps.subscribe(CLUSTER_CHANNEL)?;
        self.report(BusEvent::ClusterHeard);
        let all: Vec<Arc<str>> = self.wanted.iter().cloned().collect();
        self.subscribe(&mut ps, &all)?;
        // Answers to (un)subscribing may take the timeout; a publish is waited for a POLL.
        ps.set_read_timeout(Some(POLL))?;
        let (mut on, mut off) = (Vec::new(), Vec::new());
        loop {
            if !self.take(&mut on, &mut off) {
                return Ok(());
            }
            if !on.is_empty() || !off.is_empty() {
                ps.set_read_timeout(Some(self.timeout))?;
                if !off.is_empty() {
                    ps.unsubscribe(off.iter().map(|u| channel(u)).collect::<Vec<_>>())?;
                    off.clear();
                }
                self.subscribe(&mut ps, &on)?;
                on.clear();
                ps.set_read_timeout(Some(POLL))?;
            }
            let msg = match ps.get_message() {
                Ok(m) => m,
                Err(e) if e.is_timeout() => continue,
                Err(e) => return Err(e),
            };
            match News::decode(msg.get_payload_bytes()) {
                // This node's own news matters only to order logins.
                Ok(n) if n.node == &*self.node && !matches!(n.news, Published::Login { .. }) => {}
                Ok(n) => self.report(BusEvent::Published {
                    uid: n.uid.into(),
                    mine: n.node == &*self.node,
                    news: n.news,
                }),
                Err(e) => log::warn!("pub/sub on {}: {e}", msg.get_channel_name()),
            }
        }
    }

    fn subscribe(&self, ps: &mut redis::PubSub<'_>, uids: &[Arc<str>]) -> redis::RedisResult<()> {
        if uids.is_empty() {
            return Ok(());
        }
        ps.subscribe(uids.iter().map(|u| channel(u)).collect::<Vec<_>>())?;
        for uid in uids {
            self.report(BusEvent::Subscribed(uid.clone()));
        }
        Ok(())
    }

    fn report(&self, e: BusEvent) {
        if self.events.send(e).is_ok() {
            let _ = self.waker.wake();
        }
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
