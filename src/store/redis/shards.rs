//! Sharded pub/sub on a Redis Cluster (`SPUBLISH`, `SSUBSCRIBE`): a user's channel lives on
//! the primary that owns its slot, so a publish there reaches only that shard and the nodes
//! subscribed on it, where a plain `PUBLISH` is copied to every shard of the cluster. The
//! subscriber holds one connection per primary, each on a thread of its own, and sends each
//! user's subscription to the primary that owns the slot of the user's channel.
//!
//! A change of the cluster's shape (a slot moved, a failover) shows on a shard's connection as
//! an error, or as an unsubscription that was not asked for. That connection's thread then
//! marks the whole set failed, and the subscriber starts over: it reads the slot map again and
//! subscribes to everything anew, which reports every subscription again, so that the core
//! catches up from the inboxes.

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use redis::{Connection, IntoConnectionInfo, Value};

use super::bus::{heard, Reporter, Sub, POLL};
use super::keys::channel;
use super::BusEvent;

/// How many slots a Redis Cluster has.
const SLOTS: u16 = 16384;

/// The slot of `key`: CRC16 of its hash tag (what lies between its first `{` and the next
/// `}`, when that is not empty), or of the whole key.
pub(super) fn slot_of(key: &str) -> u16 {
    let b = key.as_bytes();
    let tag = b.iter().position(|c| *c == b'{').and_then(|open| {
        let rest = &b[open + 1..];
        let close = rest.iter().position(|c| *c == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tag.unwrap_or(b)) % SLOTS
}

/// Which primary owns each slot, as `CLUSTER SLOTS` tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotMap {
    /// (first slot, last slot, index into `primaries`), by first slot.
    ranges: Vec<(u16, u16, usize)>,
    /// (host, port) of each primary, each once.
    primaries: Vec<(String, u16)>,
}

impl SlotMap {
    /// Reads the map through `conn`, a connection to `host` (a primary listed without an
    /// address is that host).
    ///
    /// # Errors
    /// Redis failed, or its answer is not a slot map.
    fn read(conn: &mut Connection, host: &str) -> redis::RedisResult<SlotMap> {
        let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query(conn)?;
        SlotMap::parse(&v, host).ok_or_else(|| {
            redis::RedisError::from(std::io::Error::other(format!(
                "CLUSTER SLOTS answered {v:?}"
            )))
        })
    }

    /// The map in a `CLUSTER SLOTS` answer: each entry `[first, last, [host, port, ...], ...]`.
    fn parse(v: &Value, host: &str) -> Option<SlotMap> {
        let Value::Array(entries) = v else {
            return None;
        };
        let mut map = SlotMap {
            ranges: Vec::new(),
            primaries: Vec::new(),
        };
        for e in entries {
            let Value::Array(e) = e else {
                return None;
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(p))) =
                (e.first(), e.get(1), e.get(2))
            else {
                return None;
            };
            let (Some(Value::BulkString(ip)), Some(Value::Int(port))) = (p.first(), p.get(1))
            else {
                return None;
            };
            let ip = match String::from_utf8_lossy(ip) {
                ip if ip.is_empty() || ip == "?" => host.to_owned(),
                ip => ip.into_owned(),
            };
            let primary = (ip, u16::try_from(*port).ok()?);
            let i = match map.primaries.iter().position(|q| *q == primary) {
                Some(i) => i,
                None => {
                    map.primaries.push(primary);
                    map.primaries.len() - 1
                }
            };
            map.ranges
                .push((u16::try_from(*first).ok()?, u16::try_from(*last).ok()?, i));
        }
        map.ranges.sort_unstable();
        Some(map)
    }

    /// The index of the primary that owns `slot`, if any does.
    fn owner(&self, slot: u16) -> Option<usize> {
        let i = self
            .ranges
            .partition_point(|r| r.0 <= slot)
            .checked_sub(1)?;
        let (_, last, p) = self.ranges[i];
        (slot <= last).then_some(p)
    }
}

/// The connections to the primaries, each on its own thread.
pub(super) struct Shards {
    map: SlotMap,
    ops: Vec<mpsc::Sender<Sub>>,
    threads: Vec<JoinHandle<()>>,
    failed: Arc<AtomicBool>,
}

impl Shards {
    /// Reads the slot map through `conn` (a connection to the node at `url`) and starts a
    /// listener for each primary, with `url`'s credentials.
    ///
    /// # Errors
    /// The map could not be read, or a thread could not be started.
    pub(super) fn start(
        conn: &mut Connection,
        url: &str,
        timeout: Duration,
        node: Arc<str>,
        report: Reporter,
    ) -> redis::RedisResult<Shards> {
        let info = url.into_connection_info()?;
        let host = match info.addr() {
            redis::ConnectionAddr::Tcp(host, _) => host.clone(),
            other => other.to_string(),
        };
        let auth = info.redis_settings().password().map(|p| {
            (
                info.redis_settings().username().map(str::to_owned),
                p.to_owned(),
            )
        });
        let map = SlotMap::read(conn, &host)?;
        let failed = Arc::new(AtomicBool::new(false));
        let mut shards = Shards {
            map,
            ops: Vec::new(),
            threads: Vec::new(),
            failed: failed.clone(),
        };
        for (host, port) in shards.map.primaries.clone() {
            let (tx, rx) = mpsc::channel();
            let listener = ShardListener {
                addr: (host, port),
                auth: auth.clone(),
                timeout,
                node: node.clone(),
                ops: rx,
                report: report.clone(),
                failed: failed.clone(),
            };
            let thread = std::thread::Builder::new()
                .name("imgate-ssub".into())
                .spawn(move || listener.run())?;
            shards.ops.push(tx);
            shards.threads.push(thread);
        }
        Ok(shards)
    }

    /// Hears `uid`'s channel on the primary that owns it (reported
    /// [`BusEvent::Subscribed`] once that holds), or stops hearing it.
    pub(super) fn send(&self, sub: Sub) {
        let uid = match &sub {
            Sub::On(u) | Sub::Off(u) => u,
        };
        match self.map.owner(slot_of(&channel(uid))) {
            Some(p) => {
                if self.ops[p].send(sub).is_err() {
                    self.failed.store(true, Ordering::Relaxed);
                }
            }
            None => {
                log::warn!("pub/sub: no primary owns the slot of {uid}'s channel");
                self.failed.store(true, Ordering::Relaxed);
            }
        }
    }

    /// Whether a shard's connection failed or the cluster changed shape: start over.
    pub(super) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

impl Drop for Shards {
    /// Stops the threads (each within a [`POLL`] or a timeout).
    fn drop(&mut self) {
        self.ops.clear();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One primary's subscriptions, on a connection of its own.
struct ShardListener {
    addr: (String, u16),
    /// (username, password) to authenticate with, if any.
    auth: Option<(Option<String>, String)>,
    timeout: Duration,
    node: Arc<str>,
    ops: mpsc::Receiver<Sub>,
    report: Reporter,
    failed: Arc<AtomicBool>,
}

/// A shard's subscriptions: channel → uid for those wanted, and the unsubscriptions asked
/// for and not yet confirmed, by channel.
#[derive(Default)]
struct ShardSubs {
    wanted: HashMap<String, Arc<str>>,
    leaving: HashMap<String, u32>,
}

impl ShardListener {
    fn run(self) {
        if let Err(e) = self.listen() {
            log::warn!(
                "pub/sub on {}:{}: {e}; subscribing again",
                self.addr.0,
                self.addr.1
            );
            self.failed.store(true, Ordering::Relaxed);
        }
    }

    fn connect(&self) -> Result<TcpStream, String> {
        let addr: SocketAddr = (self.addr.0.as_str(), self.addr.1)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .next()
            .ok_or("no address")?;
        let s = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// Subscribes as the subscriber asks and hears the shard's publishes until the
    /// connection fails or the shape of the cluster changes (Err), or the subscriber is gone
    /// (Ok).
    fn listen(&self) -> Result<(), String> {
        let mut s = self.connect()?;
        let mut parser = redis::Parser::new();
        if let Some((user, password)) = &self.auth {
            let mut auth = redis::cmd("AUTH");
            if let Some(u) = user {
                auth.arg(u.as_str());
            }
            auth.arg(password.as_str());
            write(&mut s, &auth)?;
            s.set_read_timeout(Some(self.timeout))
                .map_err(|e| e.to_string())?;
            if let Value::ServerError(e) = parser.parse_value(&mut s).map_err(|e| e.to_string())? {
                return Err(format!("AUTH: {e:?}"));
            }
        }
        s.set_read_timeout(Some(POLL)).map_err(|e| e.to_string())?;
        let mut subs = ShardSubs::default();
        let mut last_heard = Instant::now();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (mut on, mut off) = (Vec::new(), Vec::new());
            loop {
                match self.ops.try_recv() {
                    Ok(Sub::On(uid)) => {
                        let ch = channel(&uid);
                        subs.wanted.insert(ch.clone(), uid);
                        on.push(ch);
                    }
                    Ok(Sub::Off(uid)) => {
                        let ch = channel(&uid);
                        if subs.wanted.remove(&ch).is_some() {
                            *subs.leaving.entry(ch.clone()).or_default() += 1;
                            off.push(ch);
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            // One command per channel: the channels of one command must share a slot.
            let changes = off
                .iter()
                .map(|ch| ("SUNSUBSCRIBE", ch))
                .chain(on.iter().map(|ch| ("SSUBSCRIBE", ch)));
            let mut packed = Vec::new();
            for (verb, ch) in changes {
                packed.extend(redis::cmd(verb).arg(ch).get_packed_command());
            }
            if !packed.is_empty() {
                s.write_all(&packed).map_err(|e| e.to_string())?;
            }
            match parser.parse_value(&mut s) {
                Ok(v) => {
                    last_heard = Instant::now();
                    self.on_value(v, &mut subs)?;
                }
                Err(e) if e.is_timeout() => {
                    // A connection with no subscription hears nothing; one that answers
                    // nothing to a ping for a timeout is gone.
                    if last_heard.elapsed() >= self.timeout {
                        write(&mut s, &redis::cmd("PING"))?;
                        last_heard = Instant::now();
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// What the shard sent: a publish, or the answer to a subscription change.
    fn on_value(&self, v: Value, subs: &mut ShardSubs) -> Result<(), String> {
        let items = match v {
            Value::Array(items) | Value::Push { data: items, .. } => items,
            Value::ServerError(e) => return Err(format!("{e:?}")),
            _ => return Ok(()),
        };
        let text = |i: usize| match items.get(i) {
            Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
            Some(Value::SimpleString(s)) => s.clone(),
            _ => String::new(),
        };
        match text(0).as_str() {
            "smessage" => {
                if let Some(Value::BulkString(payload)) = items.get(2) {
                    heard(&self.report, &self.node, payload, &text(1));
                }
            }
            "ssubscribe" => {
                if let Some(uid) = subs.wanted.get(&text(1)) {
                    self.report.send(BusEvent::Subscribed(uid.clone()));
                }
            }
            "sunsubscribe" => {
                let ch = text(1);
                match subs.leaving.get_mut(&ch) {
                    Some(n) if *n > 1 => *n -= 1,
                    Some(_) => {
                        subs.leaving.remove(&ch);
                    }
                    // Not asked for: the slot moved to another primary.
                    None if subs.wanted.contains_key(&ch) => {
                        return Err(format!("{ch} unsubscribed by the server"));
                    }
                    None => {}
                }
            }
            _ => {}
        }
        Ok(())
    }
}

fn write(s: &mut TcpStream, c: &redis::Cmd) -> Result<(), String> {
    s.write_all(&c.get_packed_command())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_the_hash_tag_as_redis_cluster_computes_them() {
        // Figures from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot_of("123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot_of("foo"), 12182);
        assert_eq!(slot_of("{foo}.bar"), 12182);
        assert_eq!(slot_of("im:{foo}:ch"), slot_of("im:{foo}:seq"));
        // An empty tag hashes the whole key.
        assert_eq!(
            slot_of("{}foo"),
            crc16::State::<crc16::XMODEM>::calculate(b"{}foo") % SLOTS
        );
    }

    #[test]
    fn the_slot_map_names_each_primary_once_and_finds_each_slots_owner() {
        let entry = |first: i64, last: i64, ip: &str, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![
                    Value::BulkString(ip.as_bytes().to_vec()),
                    Value::Int(port),
                    Value::BulkString(b"id".to_vec()),
                ]),
            ])
        };
        let v = Value::Array(vec![
            entry(5461, 10922, "127.0.0.1", 7001),
            entry(0, 5460, "", 7000),
            entry(10923, 16383, "127.0.0.1", 7000),
        ]);
        let map = SlotMap::parse(&v, "10.0.0.1").expect("a map");
        assert_eq!(
            map.primaries,
            vec![
                ("127.0.0.1".into(), 7001),
                ("10.0.0.1".into(), 7000),
                ("127.0.0.1".into(), 7000)
            ]
        );
        assert_eq!(map.owner(0), Some(1));
        assert_eq!(map.owner(5460), Some(1));
        assert_eq!(map.owner(5461), Some(0));
        assert_eq!(map.owner(16383), Some(2));
        assert_eq!(SlotMap::parse(&Value::Int(1), "h"), None);
        let holes = SlotMap::parse(&Value::Array(vec![entry(10, 20, "h", 1)]), "h").expect("a map");
        assert_eq!((holes.owner(9), holes.owner(21)), (None, None));
    }
}
