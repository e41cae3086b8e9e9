//! The cluster's shared state in Redis (docs/CLUSTER.md): inboxes with dense per-user seqs
//! assigned by Redis, idempotent appends, cursors, friendships and groups.
//!
//! [`RedisStore`] is a blocking client, for side threads only: the network thread never calls
//! it. Each call is one pipeline (one round trip), but [`RedisStore::commit_sends`], which is
//! two: the senders' copies first, then the references to them.

mod entry;
mod keys;

use std::time::Duration;

use redis::{Connection, Script, Value};

pub use entry::{Content, Entry};
use keys::{group_members, idempotency_key, UserKeys};

use super::{Body, Membership, ReadError, StoredMessage, DEDUPE_KEEP};

/// Appends one entry to one inbox unless its idempotency key is among the inbox's newest
/// `ARGV[3]`; answers `{seq, 1}` for a key already there, `{new seq, 0}` otherwise.
/// KEYS: seq, inbox, ids, idq. ARGV: idempotency key, entry, how many keys to keep.
const APPEND: &str = r"
local seen = redis.call('HGET', KEYS[3], ARGV[1])
if seen then return {tonumber(seen), 1} end
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], seq .. '-1', 'm', ARGV[2])
redis.call('HSET', KEYS[3], ARGV[1], seq)
if redis.call('RPUSH', KEYS[4], ARGV[1]) > tonumber(ARGV[3]) then
  redis.call('HDEL', KEYS[3], redis.call('LPOP', KEYS[4]))
end
return {seq, 0}
";

/// Raises a device's cursor, never lowers it. KEYS: cursors. ARGV: device id, seq.
const RAISE_CURSOR: &str = r"
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > old then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 0
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

/// A message for the inboxes of `to` (and the sender's own), identified by the sender's
/// `client_msg_id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSend {
    pub from_uid: String,
    pub client_msg_id: String,
    pub server_time_ms: i64,
    /// The `imgate.v1.Message` encoding without `seq` (see `im::wire`).
    pub body: Body,
    /// The recipients, each once.
    pub to: Vec<String>,
}

/// Where a send landed: its seq in the sender's inbox, then in each recipient's (in the
/// order of [`NewSend::to`]); `duplicate` when the sender's copy was already there, so that
/// this was a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    pub duplicate: bool,
    pub to_seqs: Vec<u64>,
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

/// A blocking connection to one Redis server.
pub struct RedisStore {
    conn: Connection,
    append: Script,
    raise_cursor: Script,
}

impl RedisStore {
    /// Connects to `url` (`redis://host:port/db`), waiting at most `timeout` for the
    /// connection and for each answer afterwards, and loads the scripts.
    ///
    /// # Errors
    /// A bad URL, or a server that cannot be reached or does not answer within `timeout`.
    pub fn connect(url: &str, timeout: Duration) -> Result<RedisStore, WriteError> {
        let client = redis::Client::open(url)?;
        let conn = client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout))?;
        conn.set_write_timeout(Some(timeout))?;
        let mut s = RedisStore {
            conn,
            append: Script::new(APPEND),
            raise_cursor: Script::new(RAISE_CURSOR),
        };
        s.load_scripts()?;
        Ok(s)
    }

    fn load_scripts(&mut self) -> redis::RedisResult<()> {
        self.append.prepare_invoke().load(&mut self.conn)?;
        self.raise_cursor.prepare_invoke().load(&mut self.conn)?;
        Ok(())
    }

    /// Runs a pipeline of idempotent commands; when Redis has lost the scripts (a restart
    /// without them), loads them again and runs it once more.
    fn run<T: redis::FromRedisValue>(&mut self, p: &redis::Pipeline) -> redis::RedisResult<T> {
        match p.query(&mut self.conn) {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                self.load_scripts()?;
                p.query(&mut self.conn)
            }
            r => r,
        }
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
    pub fn commit_sends(&mut self, sends: &[NewSend]) -> Result<Vec<Sent>, WriteError> {
        if sends.is_empty() {
            return Ok(Vec::new());
        }
        let mut own = redis::pipe();
        for s in sends {
            let e = Entry {
                server_time_ms: s.server_time_ms,
                content: Content::Body(s.body.clone()),
            };
            self.add_append(&mut own, &s.from_uid, &s.from_uid, &s.client_msg_id, &e);
        }
        let firsts: Vec<(u64, u8)> = self.run(&own)?;
        if firsts.len() != sends.len() {
            return Err(WriteError("an append had no answer".into()));
        }
        let mut refs = redis::pipe();
        for (s, (seq, _)) in sends.iter().zip(&firsts) {
            let e = Entry {
                server_time_ms: s.server_time_ms,
                content: Content::Ref {
                    from_uid: s.from_uid.clone(),
                    from_seq: *seq,
                },
            };
            for to in &s.to {
                self.add_append(&mut refs, to, &s.from_uid, &s.client_msg_id, &e);
            }
        }
        let mut to_seqs = if !refs.is_empty() {
            let r: Vec<(u64, u8)> = self.run(&refs)?;
            r.into_iter()
        } else {
            Vec::new().into_iter()
        };
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

    fn add_append(
        &self,
        p: &mut redis::Pipeline,
        owner: &str,
        from_uid: &str,
        client_msg_id: &str,
        e: &Entry,
    ) {
        let k = UserKeys::of(owner);
        p.invoke_script(
            self.append
                .key(k.seq)
                .key(k.inbox)
                .key(k.ids)
                .key(k.idq)
                .arg(idempotency_key(from_uid, client_msg_id))
                .arg(e.encode())
                .arg(DEDUPE_KEEP),
        );
    }

    /// Applies cursors, friendships and memberships in one pipeline.
    ///
    /// # Errors
    /// Redis could not be reached or refused a command; some of the changes may have been
    /// made, and applying them again is harmless.
    pub fn commit(&mut self, c: &Changes) -> Result<(), WriteError> {
        let mut p = redis::pipe();
        for (uid, device, seq) in &c.cursors {
            p.invoke_script(
                self.raise_cursor
                    .key(UserKeys::of(uid).cursors)
                    .arg(device.as_str())
                    .arg(*seq),
            )
            .ignore();
        }
        for (a, b, present) in &c.friendships {
            let op = if *present { "SADD" } else { "SREM" };
            p.cmd(op)
                .arg(UserKeys::of(a).friends)
                .arg(b.as_str())
                .ignore();
            p.cmd(op)
                .arg(UserKeys::of(b).friends)
                .arg(a.as_str())
                .ignore();
        }
        for m in &c.memberships {
            let op = if m.joined { "SADD" } else { "SREM" };
            p.cmd(op).arg(group_members(&m.gid)).arg(&*m.uid).ignore();
            p.cmd(op)
                .arg(UserKeys::of(&m.uid).groups)
                .arg(&*m.gid)
                .ignore();
        }
        if p.is_empty() {
            return Ok(());
        }
        self.run::<()>(&p)?;
        Ok(())
    }

    /// Highest seq of `uid`'s inbox (0 when empty).
    ///
    /// # Errors
    /// Redis could not be reached, or the counter is not a number.
    pub fn max_seq(&mut self, uid: &str) -> Result<u64, ReadError> {
        let n: Option<u64> = redis::cmd("GET")
            .arg(UserKeys::of(uid).seq)
            .query(&mut self.conn)?;
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
        let v: Value = redis::cmd("XRANGE")
            .arg(UserKeys::of(uid).inbox)
            .arg(format!("{}-0", after.saturating_add(1)))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query(&mut self.conn)?;
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
        let mut p = redis::pipe();
        for (_, from_uid, from_seq) in &refs {
            let id = format!("{from_seq}-1");
            p.cmd("XRANGE")
                .arg(UserKeys::of(from_uid).inbox)
                .arg(&id)
                .arg(&id);
        }
        let found: Vec<Value> = p.query(&mut self.conn)?;
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
        let c: Option<u64> = redis::cmd("HGET")
            .arg(UserKeys::of(uid).cursors)
            .arg(device_id)
            .query(&mut self.conn)?;
        Ok(c.unwrap_or(0))
    }

    /// Every stored cursor of `uid`: (device_id, seq), by device id.
    ///
    /// # Errors
    /// Redis could not be reached, or a cursor is not a number.
    pub fn cursors(&mut self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        let mut c: Vec<(String, u64)> = redis::cmd("HGETALL")
            .arg(UserKeys::of(uid).cursors)
            .query(&mut self.conn)?;
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
        Ok(redis::cmd("SCARD")
            .arg(group_members(gid))
            .query(&mut self.conn)?)
    }

    /// # Errors
    /// Redis could not be reached.
    pub fn is_member(&mut self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        Ok(redis::cmd("SISMEMBER")
            .arg(group_members(gid))
            .arg(uid)
            .query(&mut self.conn)?)
    }

    /// The groups `uid` belongs to, by group id.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn groups_of(&mut self, uid: &str) -> Result<Vec<String>, ReadError> {
        self.sorted_set(UserKeys::of(uid).groups)
    }

    fn sorted_set(&mut self, key: String) -> Result<Vec<String>, ReadError> {
        let mut v: Vec<String> = redis::cmd("SMEMBERS").arg(key).query(&mut self.conn)?;
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
