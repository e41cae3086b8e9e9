//! The cluster's shared state in Redis (docs/CLUSTER.md): inboxes with dense per-user seqs
//! assigned by Redis, idempotent appends, cursors, friendships and groups, and presence
//! (`presence`: which node holds each online device, node leases on Redis's clock, and the
//! cleanup after a node whose lease ran out).
//!
//! [`RedisStore`] is a blocking client, for side threads only: the network thread never calls
//! it. It speaks to one Redis or to a Redis Cluster. Each call is one pipeline (one round trip
//! per node it touches), but [`RedisStore::commit_sends`], which is two: the senders' copies
//! first, then the references to them.

mod backend;
mod bus;
mod entry;
mod keys;
mod news;
mod presence;
mod shards;

use std::borrow::Borrow;
use std::time::Duration;

use redis::{Connection, Value};

pub use backend::{RedisBackend, RedisTarget};
pub use bus::{Bus, BusEvent};
pub use entry::{Content, Entry};
use keys::{group_members, idempotency_key, UserKeys};
pub use presence::DeviceOn;

use super::{Body, Membership, NewSend, ReadError, Sent, StoredMessage, DEDUPE_KEEP};

/// The functions imgate calls, as one Redis function library. Functions (not `EVALSHA`
/// scripts) because Redis keeps them in its AOF and copies them to replicas, so a restarted or
/// promoted server still has them, and because a Redis Cluster pipeline can carry `FCALL`.
///
/// `imgate_append` appends one entry to one inbox unless its idempotency key is among the
/// inbox's newest `args[3]`: it answers `{seq, 1}` for a key already there, `{new seq, 0}`
/// otherwise (keys: seq, inbox, ids, idq; args: idempotency key, entry, how many keys to keep).
/// `imgate_append_all` makes many appends in one call, answering the list of their answers
/// (keys: those of each append in turn; args: how many keys to keep, then the idempotency key
/// and entry of each append).
/// `imgate_raise_cursor` raises a device's cursor, never lowers it (keys: cursors; args:
/// device id, seq). The presence functions are described in `presence`.
const LIBRARY: &str = r"#!lua name=imgate
local function append(seqk, inbox, ids, idq, key, entry, keep)
  local seen = redis.call('HGET', ids, key)
  if seen then return {tonumber(seen), 1} end
  local seq = redis.call('INCR', seqk)
  redis.call('XADD', inbox, seq .. '-1', 'm', entry)
  redis.call('HSET', ids, key, seq)
  if redis.call('RPUSH', idq, key) > keep then
    redis.call('HDEL', ids, redis.call('LPOP', idq))
  end
  return {seq, 0}
end
redis.register_function('imgate_append', function(keys, args)
  return append(keys[1], keys[2], keys[3], keys[4], args[1], args[2], tonumber(args[3]))
end)
redis.register_function('imgate_append_all', function(keys, args)
  local keep, out = tonumber(args[1]), {}
  for i = 0, #keys / 4 - 1 do
    local k, a = i * 4, i * 2 + 1
    local r = append(keys[k + 1], keys[k + 2], keys[k + 3], keys[k + 4], args[a + 1], args[a + 2], keep)
    out[#out + 1] = r
  end
  return out
end)
redis.register_function('imgate_raise_cursor', function(keys, args)
  local old = tonumber(redis.call('HGET', keys[1], args[1]) or '0')
  if tonumber(args[2]) > old then redis.call('HSET', keys[1], args[1], args[2]) end
  return 0
end)
local function channel(uid)
  local c = uid:sub(1, 1)
  if c == '}' or c == '~' then uid = '~' .. uid end
  return 'im:{' .. uid .. '}:ch'
end
local function tell(keys, uid, node, kind)
  local v = redis.call('INCR', keys[3])
  for _, f in ipairs(redis.call('SMEMBERS', keys[2])) do
    local news = string.char(#node) .. node .. string.char(#f) .. f .. kind .. v .. ':' .. uid
    redis.call('PUBLISH', channel(f), news)
  end
end
redis.register_function('imgate_device_on', function(keys, args)
  local prev = redis.call('HGET', keys[1], args[1])
  local first = redis.call('HLEN', keys[1]) == 0
  redis.call('HSET', keys[1], args[1], args[2])
  if first then tell(keys, args[3], args[2], '+') end
  return {prev or '', first and 1 or 0}
end)
redis.register_function('imgate_device_off', function(keys, args)
  local ours = redis.call('HGET', keys[1], args[1]) == args[2]
  if ours then redis.call('HDEL', keys[1], args[1]) end
  local rest = redis.call('HVALS', keys[1])
  local mine = 0
  for _, node in ipairs(rest) do if node == args[2] then mine = 1 end end
  local last = ours and #rest == 0
  if last then tell(keys, args[3], args[2], '-') end
  return {last and 1 or 0, mine}
end)
redis.register_function('imgate_node_gone', function(keys, args)
  local all = redis.call('HGETALL', keys[1])
  local removed = 0
  for i = 1, #all, 2 do
    if all[i + 1] == args[1] then
      redis.call('HDEL', keys[1], all[i])
      removed = removed + 1
    end
  end
  if removed > 0 and redis.call('HLEN', keys[1]) == 0 then
    tell(keys, args[2], args[3], '-')
    return 1
  end
  return 0
end)
redis.register_function('imgate_friend_news', function(keys, args)
  local online = redis.call('HLEN', keys[1]) > 0 and '1' or '0'
  local v = redis.call('GET', keys[2]) or '0'
  local node, to = args[4], args[1]
  local news = string.char(#node) .. node .. string.char(#to) .. to .. args[3] .. online .. v
    .. ':' .. args[2]
  redis.call('PUBLISH', channel(to), news)
  return 0
end)
redis.register_function('imgate_lease', function(keys, args)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return redis.call('ZADD', keys[1], now + tonumber(args[2]), args[1])
end)
redis.register_function('imgate_expired', function(keys, args)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return redis.call('ZRANGEBYSCORE', keys[1], '-inf', '(' .. now)
end)
";

/// Why a write did not complete. Every write is idempotent, so the caller may retry it as
/// it was, once Redis answers again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteError(pub String);

impl std::fmt::Display for WriteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redis write failed: {}", self.0)
    }
}

impl From<redis::RedisError> for WriteError {
    fn from(e: redis::RedisError) -> Self {
        WriteError(e.to_string())
    }
}

/// Changes that need no seq: applying one twice is the same as once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// (uid, device_id, seq): cursors, only ever raised.
    pub cursors: Vec<(String, String, u64)>,
    /// (a, b, present): symmetric friendships.
    pub friendships: Vec<(String, String, bool)>,
    pub memberships: Vec<Membership>,
}

/// A blocking connection to one Redis server or to a Redis Cluster.
enum Conn {
    Single(Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

/// The commands of one round trip, each with whether its answer is wanted.
#[derive(Default)]
struct Batch(Vec<(redis::Cmd, bool)>);

impl Batch {
    fn push(&mut self, c: redis::Cmd, answered: bool) {
        self.0.push((c, answered));
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Conn {
    fn as_dyn(&mut self) -> &mut dyn redis::ConnectionLike {
        match self {
            Conn::Single(c) => c,
            Conn::Cluster(c) => c,
        }
    }

    fn query<T: redis::FromRedisValue>(&mut self, c: &redis::Cmd) -> redis::RedisResult<T> {
        c.query(self.as_dyn())
    }

    /// Sends the batch as one pipeline (on a cluster, one per node it touches, in parallel
    /// round trips the client makes).
    fn pipeline<T: redis::FromRedisValue>(&mut self, b: &Batch) -> redis::RedisResult<T> {
        match self {
            Conn::Single(c) => {
                let mut p = redis::pipe();
                for (cmd, answered) in &b.0 {
                    p.add_command(cmd.clone());
                    if !answered {
                        p.ignore();
                    }
                }
                p.query(c)
            }
            Conn::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for (cmd, answered) in &b.0 {
                    p.add_command(cmd.clone());
                    if !answered {
                        p.ignore();
                    }
                }
                p.query(c)
            }
        }
    }
}

/// Whether Redis does not know imgate's functions (a server that never had them, or lost
/// them with its data).
fn functions_missing(e: &redis::RedisError) -> bool {
    e.to_string().contains("Function not found")
}

/// A blocking connection to the cluster's Redis: one server or a Redis Cluster.
pub struct RedisStore {
    conn: Conn,
}

impl RedisStore {
    /// Connects to one Redis at `url` (`redis://host:port/db`), waiting at most `timeout`
    /// for the connection and for each answer afterwards, and loads imgate's functions.
    ///
    /// # Errors
    /// A bad URL, or a server that cannot be reached or does not answer within `timeout`.
    pub fn connect(url: &str, timeout: Duration) -> Result<RedisStore, WriteError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        RedisStore::with(Conn::Single(conn))
    }

    /// Connects to the Redis Cluster that `urls` (some of its nodes) belong to, with the same
    /// timeouts, and loads imgate's functions on every primary.
    ///
    /// # Errors
    /// Bad URLs, or no node that can be reached and answers within `timeout`.
    pub fn connect_cluster(urls: &[String], timeout: Duration) -> Result<RedisStore, WriteError> {
        let client = redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
            .connection_timeout(timeout)
            .response_timeout(timeout)
            .retries(1)
            .build()?;
        RedisStore::with(Conn::Cluster(Box::new(client.get_connection()?)))
    }

    fn with(conn: Conn) -> Result<RedisStore, WriteError> {
        let mut s = RedisStore { conn };
        s.load_functions()?;
        Ok(s)
    }

    fn load_functions(&mut self) -> redis::RedisResult<()> {
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(LIBRARY);
        self.conn.query::<redis::Value>(&load)?;
        Ok(())
    }

    /// Runs a batch of idempotent commands; when Redis has lost imgate's functions (a server
    /// replaced by an empty one), loads them again and runs it once more.
    fn run<T: redis::FromRedisValue>(&mut self, b: &Batch) -> redis::RedisResult<T> {
        match self.conn.pipeline(b) {
            Err(e) if functions_missing(&e) => {
                self.load_functions()?;
                self.conn.pipeline(b)
            }
            r => r,
        }
    }

    /// Waits until `replicas` replicas of every primary this connection wrote to have
    /// acknowledged its writes, for at most `timeout` (Redis `WAIT`, which a Redis Cluster
    /// client sends to every primary, taking the smallest count).
    ///
    /// # Errors
    /// Fewer replicas acknowledged in time, or Redis failed or did not answer.
    pub fn wait_replicas(&mut self, replicas: u32, timeout: Duration) -> Result<(), WriteError> {
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout.as_millis().max(1) as u64);
        let got: u64 = self.conn.query(&wait)?;
        if got < u64::from(replicas) {
            return Err(WriteError(format!(
                "{got} of {replicas} replicas acknowledged the writes within {timeout:?}"
            )));
        }
        Ok(())
    }

    /// Makes `appends`, answering (seq, duplicate) for each in order: on one Redis a
    /// function call per [`APPENDS_PER_CALL`], on a Redis Cluster one per append (each
    /// touches one slot), all in one pipeline.
    fn append_all(&mut self, appends: &[Append]) -> Result<Vec<(u64, u8)>, WriteError> {
        if appends.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = Batch::default();
        let answers: Vec<(u64, u8)> = match self.conn {
            Conn::Single(_) => {
                for chunk in appends.chunks(APPENDS_PER_CALL) {
                    b.push(append_all_call(chunk), true);
                }
                let per_call: Vec<Vec<(u64, u8)>> = self.run(&b)?;
                per_call.into_iter().flatten().collect()
            }
            Conn::Cluster(_) => {
                for a in appends {
                    b.push(a.call(), true);
                }
                self.run(&b)?
            }
        };
        if answers.len() != appends.len() {
            return Err(WriteError("an append had no answer".into()));
        }
        Ok(answers)
    }

    /// Stores sends: each in its sender's inbox with the body, then in every recipient's
    /// inbox as a reference to the sender's copy. Answers only once every append returned,
    /// so a send answered here is in every inbox it names.
    ///
    /// A send that was stored before (the same sender and `client_msg_id`, among the newest
    /// [`DEDUPE_KEEP`] of each inbox) is not stored again: its seqs are the first ones.
    ///
    /// # Errors
    /// Redis could not be reached or refused a command; then some of the appends may have
    /// been made. Retrying the same sends stores each of them exactly once.
    pub fn commit_sends<S: Borrow<NewSend>>(
        &mut self,
        sends: &[S],
    ) -> Result<Vec<Sent>, WriteError> {
        let sends: Vec<&NewSend> = sends.iter().map(Borrow::borrow).collect();
        if sends.is_empty() {
            return Ok(Vec::new());
        }
        let mut own = Vec::with_capacity(sends.len());
        for s in &sends {
            let e = Entry {
                server_time_ms: s.server_time_ms,
                content: Content::Body(s.body.clone()),
            };
            own.push(Append::new(&s.from, &s.from, &s.client_msg_id, &e));
        }
        let firsts = self.append_all(&own)?;
        if firsts.len() != sends.len() {
            return Err(WriteError("an append had no answer".into()));
        }
        let mut refs = Vec::new();
        for (s, (seq, _)) in sends.iter().zip(&firsts) {
            let e = Entry {
                server_time_ms: s.server_time_ms,
                content: Content::Ref {
                    from_uid: s.from.to_string(),
                    from_seq: *seq,
                },
            };
            for to in &s.to {
                refs.push(Append::new(to, &s.from, &s.client_msg_id, &e));
            }
        }
        let mut to_seqs = self.append_all(&refs)?.into_iter();
        let mut out = Vec::with_capacity(sends.len());
        for (s, (seq, dup)) in sends.iter().zip(firsts) {
            let mine: Vec<u64> = to_seqs.by_ref().take(s.to.len()).map(|(q, _)| q).collect();
            if mine.len() != s.to.len() {
                return Err(WriteError("an append had no answer".into()));
            }
            out.push(Sent {
                seq,
                duplicate: dup != 0,
                to_seqs: mine,
            });
        }
        Ok(out)
    }

    /// Applies cursors, friendships and memberships in one pipeline.
    ///
    /// # Errors
    /// Redis could not be reached or refused a command; some of the changes may have been
    /// made, and applying them again is harmless.
    pub fn commit(&mut self, c: &Changes) -> Result<(), WriteError> {
        let mut b = Batch::default();
        for (uid, device, seq) in &c.cursors {
            let mut f = redis::cmd("FCALL");
            f.arg("imgate_raise_cursor")
                .arg(1)
                .arg(UserKeys::of(uid).cursors)
                .arg(device.as_str())
                .arg(*seq);
            b.push(f, false);
        }
        for (a, b_uid, present) in &c.friendships {
            let op = if *present { "SADD" } else { "SREM" };
            b.push(set_op(op, UserKeys::of(a).friends, b_uid), false);
            b.push(set_op(op, UserKeys::of(b_uid).friends, a), false);
        }
        for m in &c.memberships {
            let op = if m.joined { "SADD" } else { "SREM" };
            b.push(set_op(op, group_members(&m.gid), &m.uid), false);
            b.push(set_op(op, UserKeys::of(&m.uid).groups, &m.gid), false);
        }
        if b.is_empty() {
            return Ok(());
        }
        self.run::<()>(&b)?;
        Ok(())
    }

    /// Publishes each (channel, payload) in one pipeline: as shard channels (`SPUBLISH`,
    /// which a Redis Cluster pipeline sends to the shard of each channel) when `sharded`.
    ///
    /// # Errors
    /// Redis could not be reached; some of them may have been published.
    pub fn publish(
        &mut self,
        sharded: bool,
        publishes: &[(String, Vec<u8>)],
    ) -> Result<(), WriteError> {
        let mut b = Batch::default();
        for (ch, payload) in publishes {
            let mut c = redis::cmd(if sharded { "SPUBLISH" } else { "PUBLISH" });
            c.arg(ch).arg(payload);
            b.push(c, false);
        }
        if !b.is_empty() {
            self.conn.pipeline::<()>(&b)?;
        }
        Ok(())
    }

    /// Highest seq of `uid`'s inbox (0 when empty).
    ///
    /// # Errors
    /// Redis could not be reached, or the counter is not a number.
    pub fn max_seq(&mut self, uid: &str) -> Result<u64, ReadError> {
        let n: Option<u64> = self
            .conn
            .query(redis::cmd("GET").arg(UserKeys::of(uid).seq))?;
        Ok(n.unwrap_or(0))
    }

    /// Up to `limit` messages of `uid`'s inbox with seq > `after`, in seq order, with the
    /// bodies of references fetched from the senders' inboxes (one more round trip when there
    /// are any).
    ///
    /// # Errors
    /// Redis could not be reached; an entry does not parse, breaks the dense seq order, or
    /// refers to a body that is not there.
    pub fn messages_after(
        &mut self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let v: Value = self.conn.query(
            redis::cmd("XRANGE")
                .arg(UserKeys::of(uid).inbox)
                .arg(format!("{}-0", after.saturating_add(1)))
                .arg("+")
                .arg("COUNT")
                .arg(limit),
        )?;
        let entries = stream_entries(v)?;
        let mut out = Vec::with_capacity(entries.len());
        // (index in `out`, sender, sender seq) of the entries whose body is elsewhere.
        let mut refs = Vec::new();
        for (i, (seq, raw)) in entries.into_iter().enumerate() {
            if seq != after + 1 + i as u64 {
                return Err(ReadError(format!("inbox of {uid} has a gap before {seq}")));
            }
            let e = Entry::decode(&raw)?;
            let body = match e.content {
                Content::Body(b) => b,
                Content::Ref { from_uid, from_seq } => {
                    refs.push((i, from_uid, from_seq));
                    Body::from(&[][..])
                }
            };
            out.push(StoredMessage {
                seq,
                server_time_ms: e.server_time_ms,
                body,
            });
        }
        if refs.is_empty() {
            return Ok(out);
        }
        let mut b = Batch::default();
        for (_, from_uid, from_seq) in &refs {
            let id = format!("{from_seq}-1");
            let mut x = redis::cmd("XRANGE");
            x.arg(UserKeys::of(from_uid).inbox).arg(&id).arg(&id);
            b.push(x, true);
        }
        let found: Vec<Value> = self.conn.pipeline(&b)?;
        if found.len() != refs.len() {
            return Err(ReadError("a referenced body had no answer".into()));
        }
        for ((i, from_uid, from_seq), v) in refs.into_iter().zip(found) {
            let body = stream_entries(v)?
                .into_iter()
                .next()
                .map(|(_, raw)| Entry::decode(&raw))
                .transpose()?
                .and_then(|e| match e.content {
                    Content::Body(b) => Some(b),
                    Content::Ref { .. } => None,
                })
                .ok_or_else(|| {
                    ReadError(format!("the body of {from_uid}'s {from_seq} is missing"))
                })?;
            out[i].body = body;
        }
        Ok(out)
    }

    /// Stored delivery cursor of a device (0 when none).
    ///
    /// # Errors
    /// Redis could not be reached, or the cursor is not a number.
    pub fn cursor(&mut self, uid: &str, device_id: &str) -> Result<u64, ReadError> {
        let c: Option<u64> = self.conn.query(
            redis::cmd("HGET")
                .arg(UserKeys::of(uid).cursors)
                .arg(device_id),
        )?;
        Ok(c.unwrap_or(0))
    }

    /// Every stored cursor of `uid`: (device_id, seq), by device id.
    ///
    /// # Errors
    /// Redis could not be reached, or a cursor is not a number.
    pub fn cursors(&mut self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        let mut c: Vec<(String, u64)> = self
            .conn
            .query(redis::cmd("HGETALL").arg(UserKeys::of(uid).cursors))?;
        c.sort();
        Ok(c)
    }

    /// `uid`'s friends, by uid.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn friends(&mut self, uid: &str) -> Result<Vec<String>, ReadError> {
        self.sorted_set(UserKeys::of(uid).friends)
    }

    /// The members of group `gid`, by uid (empty for a group nobody belongs to).
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn group_members(&mut self, gid: &str) -> Result<Vec<String>, ReadError> {
        self.sorted_set(group_members(gid))
    }

    /// How many members group `gid` has.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn group_size(&mut self, gid: &str) -> Result<usize, ReadError> {
        Ok(self
            .conn
            .query(redis::cmd("SCARD").arg(group_members(gid)))?)
    }

    /// # Errors
    /// Redis could not be reached.
    pub fn is_member(&mut self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        Ok(self
            .conn
            .query(redis::cmd("SISMEMBER").arg(group_members(gid)).arg(uid))?)
    }

    /// The groups `uid` belongs to, by group id.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn groups_of(&mut self, uid: &str) -> Result<Vec<String>, ReadError> {
        self.sorted_set(UserKeys::of(uid).groups)
    }

    fn sorted_set(&mut self, key: String) -> Result<Vec<String>, ReadError> {
        let mut v: Vec<String> = self.conn.query(redis::cmd("SMEMBERS").arg(key))?;
        v.sort();
        Ok(v)
    }
}

/// The (seq, entry) pairs of an `XRANGE` answer, whose ids are `<seq>-1` and whose one field
/// is `m`.
fn stream_entries(v: Value) -> Result<Vec<(u64, Vec<u8>)>, ReadError> {
    let bad = |what: &str| ReadError(format!("unexpected XRANGE answer: {what}"));
    let Value::Array(items) = v else {
        return Err(bad("not an array"));
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(pair) = item else {
            return Err(bad("an entry that is not an array"));
        };
        let mut pair = pair.into_iter();
        let (Some(id), Some(Value::Array(fields))) = (pair.next(), pair.next()) else {
            return Err(bad("an entry without an id and fields"));
        };
        let id: String = redis::from_redis_value(id).map_err(|_| bad("an id"))?;
        let seq = id
            .strip_suffix("-1")
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| bad("an id that is not <seq>-1"))?;
        let mut fields = fields.into_iter();
        let (Some(name), Some(Value::BulkString(raw))) = (fields.next(), fields.next()) else {
            return Err(bad("an entry without its field"));
        };
        if name != Value::BulkString(b"m".to_vec()) {
            return Err(bad("an entry whose field is not m"));
        }
        out.push((seq, raw));
    }
    Ok(out)
}

/// One append (`imgate_append`) to `owner`'s inbox.
/// One inbox append: its keys, its idempotency key and its entry.
struct Append {
    keys: UserKeys,
    key: String,
    entry: Vec<u8>,
}

/// The most appends one `imgate_append_all` call makes, so that one call holds Redis for a
/// few milliseconds at most.
const APPENDS_PER_CALL: usize = 256;

impl Append {
    fn new(owner: &str, from_uid: &str, client_msg_id: &str, e: &Entry) -> Append {
        Append {
            keys: UserKeys::of(owner),
            key: idempotency_key(from_uid, client_msg_id),
            entry: e.encode(),
        }
    }

    /// `imgate_append` of this one append (one slot: a Redis Cluster pipeline routes it).
    fn call(&self) -> redis::Cmd {
        let k = &self.keys;
        let mut f = redis::cmd("FCALL");
        f.arg("imgate_append")
            .arg(4)
            .arg(&k.seq)
            .arg(&k.inbox)
            .arg(&k.ids)
            .arg(&k.idq)
            .arg(&self.key)
            .arg(&self.entry)
            .arg(DEDUPE_KEEP);
        f
    }
}

/// `imgate_append_all` of several appends (keys of many slots: for one Redis only), which
/// saves a function call per append.
fn append_all_call(appends: &[Append]) -> redis::Cmd {
    let mut f = redis::cmd("FCALL");
    f.arg("imgate_append_all").arg(appends.len() * 4);
    for a in appends {
        let k = &a.keys;
        f.arg(&k.seq).arg(&k.inbox).arg(&k.ids).arg(&k.idq);
    }
    f.arg(DEDUPE_KEEP);
    for a in appends {
        f.arg(&a.key).arg(&a.entry);
    }
    f
}

/// `SADD` or `SREM` of one member.
fn set_op(op: &str, key: String, member: &str) -> redis::Cmd {
    let mut c = redis::cmd(op);
    c.arg(key).arg(member);
    c
}
