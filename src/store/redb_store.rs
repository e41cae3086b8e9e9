//! The durable store on redb: one file in `--data-dir`, ACID transactions, MVCC reads.
//!
//! A commit is one sequential write: every append, idempotency key and cursor of the batches
//! goes into a single record of the `log` table, keyed by a growing id, so a transaction
//! touches the few pages at the end of one B-tree whatever the number of users. (Writing each
//! message into a per-user table at commit time dirtied one scattered page per user and table,
//! and cost 5 to 20 µs of the storage thread per message; see DESIGN.md.)
//!
//! The logged entries stay readable from memory ([`Tails`]) until the storage thread moves
//! them, a generation of `--store-log-bytes` at a time and about a millisecond of work per
//! transaction, into the per-user tables: inbox chunks keyed (uid, first seq), send chunks
//! keyed (uid, first key number), cursors. Once a generation's last users are moved, its log
//! records are deleted, a piece per transaction. So every entry is always in the log, in a
//! table, or both; at start-up the log is read back into memory, skipping what the tables
//! already hold (by seq).
//!
//! Readers (the network thread) never wait for the writer (the storage thread): they copy the
//! user's entries from memory under a short lock, then read the tables in a redb snapshot
//! taken after it. An entry that moved in between is in both; every read takes what memory
//! holds from its lowest seq up, and only older entries from the tables.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use prost::Message as _;
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, Table, TableDefinition, TableHandle,
    WriteTransaction,
};

use super::assign::Assigner;
use super::records::{self, Corrupt, LogEntry};
use super::tail::{Tails, UserTail};
use super::{
    CommitError, ReadError, Sent, Store, StoreRead, StoredBatch, StoredMessage, WriteBatch,
    DEDUPE_KEEP,
};
use crate::im::proto;

/// log id -> a commit's appends, keys and cursors ([`records::encode_log`]).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// (uid, first seq) -> consecutive inbox messages ([`records::encode_inbox_chunk`]).
const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox_chunks");
/// (uid, number of its first key) -> consecutive idempotency keys
/// ([`records::encode_send_chunk`]). Keys are numbered 1, 2, ... per user; the last chunk's
/// end is the number of keys ever written.
const SENDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("send_chunks");
/// (uid, device_id) -> cursor seq.
const CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("cursors");
/// (a, b) -> () for each direction of a friendship.
const FRIENDS: TableDefinition<(&str, &str), ()> = TableDefinition::new("friends");
/// (group id, uid) -> () for each member of a group.
const MEMBERS: TableDefinition<(&str, &str), ()> = TableDefinition::new("group_members");
/// (uid, group id) -> (): the same memberships by user.
const USER_GROUPS: TableDefinition<(&str, &str), ()> = TableDefinition::new("user_groups");
/// group id -> member count, so that the size limit costs one read.
const GROUP_SIZES: TableDefinition<&str, u64> = TableDefinition::new("group_sizes");

/// The layout before the commit log: one row per message and per key. Converted at open.
const OLD_INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
const OLD_DEDUPE: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("dedupe_v2");
const OLD_DEDUPE_ORDER: TableDefinition<(&str, u64), &str> = TableDefinition::new("dedupe_order");
const OLD_DEDUPE_COUNT: TableDefinition<&str, u64> = TableDefinition::new("dedupe_count");

/// A maintenance transaction moves at most this many users, and stops taking more once it
/// has run this long: a commit waits behind one step at most (each user costs one or a few
/// scattered pages, 10 to 40 µs).
const SLICE_USERS: usize = 256;
const STEP_BUDGET: std::time::Duration = std::time::Duration::from_millis(1);
/// The log record buffer is kept between commits up to this size.
const RECORD_KEEP: usize = 4 << 20;
/// A user's last send chunk takes more keys while it holds fewer than this.
const SEND_CHUNK_JOIN: u64 = 128;
/// Log records deleted per maintenance transaction once their generation is moved.
const DROP_RECORDS: usize = 4096;

#[derive(Debug)]
pub enum StoreError {
    Open(String),
    Commit(String),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Open(e) => write!(f, "cannot open the store: {e}"),
            StoreError::Commit(e) => write!(f, "store commit failed: {e}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub struct RedbStore {
    db: Database,
    tails: Mutex<Tails>,
    /// The id of the next log record. Only the storage thread commits.
    next_log: AtomicU64,
    /// A generation of logged entries is moved into the tables once it holds this many bytes.
    log_bytes: usize,
    /// The log record being encoded, kept between commits so that it is not grown anew each
    /// time (only the storage thread commits: never contended).
    record: Mutex<Vec<u8>>,
    /// Places sends; only the storage thread commits, so it is never contended.
    assigner: Mutex<Assigner>,
}

fn commit_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Commit(e.to_string())
}

fn open_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Open(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `dir/imgate.redb` with a page cache of at most `cache_bytes`, and
    /// reads its log back into memory. Logged entries are moved into the per-user tables once
    /// they hold more than `log_bytes`.
    pub fn open(dir: &Path, cache_bytes: usize, log_bytes: usize) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(open_err)?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join("imgate.redb"))
            .map_err(open_err)?;
        let txn = db.begin_write().map_err(open_err)?;
        {
            // Create the tables so readers never see them missing.
            txn.open_table(LOG).map_err(open_err)?;
            let mut inbox = txn.open_table(INBOX).map_err(open_err)?;
            let mut sends = txn.open_table(SENDS).map_err(open_err)?;
            txn.open_table(CURSORS).map_err(open_err)?;
            txn.open_table(FRIENDS).map_err(open_err)?;
            txn.open_table(MEMBERS).map_err(open_err)?;
            txn.open_table(USER_GROUPS).map_err(open_err)?;
            txn.open_table(GROUP_SIZES).map_err(open_err)?;
            migrate(&txn, &mut inbox, &mut sends)?;
        }
        txn.commit().map_err(open_err)?;
        let store = RedbStore {
            db,
            tails: Mutex::new(Tails::default()),
            next_log: AtomicU64::new(1),
            log_bytes,
            record: Mutex::new(Vec::new()),
            assigner: Mutex::new(Assigner::default()),
        };
        store.replay()?;
        Ok(store)
    }

    fn tails(&self) -> MutexGuard<'_, Tails> {
        // The lock guards plain data and no code panics while holding it.
        self.tails.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the log into memory: the entries the tables do not hold yet.
    fn replay(&self) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(open_err)?;
        let log = txn.open_table(LOG).map_err(open_err)?;
        let inbox = txn.open_table(INBOX).map_err(open_err)?;
        let sends = txn.open_table(SENDS).map_err(open_err)?;
        // Per user: the last seq its inbox chunks and its send chunks hold.
        let mut moved: HashMap<String, (u64, u64)> = HashMap::new();
        let mut tails = self.tails();
        let mut last_id = 0;
        for entry in log.iter().map_err(open_err)? {
            let (id, rec) = entry.map_err(open_err)?;
            last_id = id.value();
            let rec = rec.value();
            for e in records::decode_log(rec).map_err(open_err)? {
                let uid = match &e {
                    LogEntry::Append { owner, .. } => *owner,
                    LogEntry::Send { uid, .. } | LogEntry::Cursor { uid, .. } => *uid,
                };
                let (in_inbox, in_sends) = match moved.get(uid) {
                    Some(m) => *m,
                    None => {
                        let m = (
                            last_inbox_seq(&inbox, uid).map_err(open_err)?,
                            last_send(&sends, uid).map_err(open_err)?.map_or(0, |k| k.1),
                        );
                        moved.insert(uid.to_owned(), m);
                        m
                    }
                };
                let key: std::sync::Arc<str> = uid.into();
                let active = tails.active_mut();
                match e {
                    LogEntry::Append {
                        seq,
                        server_time_ms,
                        body,
                        ..
                    } if seq > in_inbox => {
                        active.with_user(&key, |u| u.push_message(seq, server_time_ms, body))
                    }
                    LogEntry::Send {
                        client_msg_id, seq, ..
                    } if seq > in_sends => {
                        active.with_user(&key, |u| u.push_send(client_msg_id, seq))
                    }
                    LogEntry::Cursor { device_id, seq, .. } => {
                        let device: std::sync::Arc<str> = device_id.into();
                        active.with_user(&key, |u| u.set_cursor(&device, seq))
                    }
                    _ => {}
                }
            }
            // Even a record whose entries were all moved already: its id is the generation's.
            tails.active_mut().set_last_log(last_id);
        }
        self.next_log.store(last_id + 1, Ordering::Relaxed);
        Ok(())
    }

    /// Places the batches' sends (seqs and dedupe), then logs them in one transaction. With
    /// `sync`, it is on disk when this returns.
    ///
    /// Errors: [`StoreError::Commit`] for a failed write or a failed read the placing needs.
    pub fn commit(
        &self,
        batches: &[&WriteBatch],
        sync: bool,
    ) -> Result<Vec<Vec<Sent>>, StoreError> {
        let mut assigner = self.assigner.lock().unwrap_or_else(|e| e.into_inner());
        let resolved = assigner.resolve(batches, self).map_err(commit_err)?;
        let refs: Vec<&StoredBatch> = resolved.batches.iter().collect();
        self.commit_stored(&refs, sync)?;
        Ok(assigner.applied(resolved))
    }

    /// Logs batches whose sends are placed, in one transaction. With `sync`, it is on disk
    /// when this returns.
    pub(crate) fn commit_stored(
        &self,
        batches: &[&StoredBatch],
        sync: bool,
    ) -> Result<(), StoreError> {
        let id = self.next_log.fetch_add(1, Ordering::Relaxed);
        let mut record = self.record.lock().unwrap_or_else(|e| e.into_inner());
        record.clear();
        records::encode_log(batches, &mut record);
        let mut txn = self.db.begin_write().map_err(commit_err)?;
        txn.set_durability(if sync {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(commit_err)?;
        {
            if !record.is_empty() {
                let mut log = txn.open_table(LOG).map_err(commit_err)?;
                log.insert(id, record.as_slice()).map_err(commit_err)?;
            }
            let friendships: Vec<_> = batches.iter().flat_map(|b| &b.friendships).collect();
            if !friendships.is_empty() {
                let mut friends = txn.open_table(FRIENDS).map_err(commit_err)?;
                for (a, b, present) in friendships {
                    for (x, y) in [(a, b), (b, a)] {
                        if *present {
                            friends
                                .insert((x.as_str(), y.as_str()), ())
                                .map_err(commit_err)?;
                        } else {
                            friends
                                .remove((x.as_str(), y.as_str()))
                                .map_err(commit_err)?;
                        }
                    }
                }
            }
            let memberships: Vec<_> = batches.iter().flat_map(|b| &b.memberships).collect();
            if !memberships.is_empty() {
                write_memberships(&txn, &memberships)?;
            }
        }
        txn.commit().map_err(commit_err)?;
        // A burst's buffer is not kept for good.
        if record.capacity() > RECORD_KEEP {
            *record = Vec::with_capacity(RECORD_KEEP / 4);
        }
        drop(record);
        // A batch at a time, so that a reader never waits behind a whole group commit.
        for b in batches {
            self.tails().apply(id, b);
        }
        Ok(())
    }

    /// One maintenance step, or as many as it takes to bring the memory held back under
    /// twice `--store-log-bytes` when commits outpace the moves (then commits wait:
    /// backpressure). Returns whether more is due.
    pub fn maintain(&self) -> Result<bool, StoreError> {
        loop {
            let more = self.step()?;
            if !more || self.tails().bytes() <= 2 * self.log_bytes {
                return Ok(more);
            }
        }
    }

    /// Deletes a piece of the log a moved generation left, or moves a few users of a full
    /// generation into the tables, in one transaction of about [`STEP_BUDGET`]. Its
    /// durability comes with the next synced commit: until then a crash only puts the
    /// entries back into the log's care. Returns whether more is due.
    fn step(&self) -> Result<bool, StoreError> {
        let (drop_upto, slice) = {
            let mut t = self.tails();
            let busy = t.rotate(self.log_bytes);
            match t.log_to_drop() {
                0 if busy => (0, t.next_slice(SLICE_USERS)),
                0 => return Ok(false),
                upto => (upto, None),
            }
        };
        let mut txn = self.db.begin_write().map_err(commit_err)?;
        txn.set_durability(Durability::None).map_err(commit_err)?;
        let mut moved = 0;
        let mut dropped = 0;
        {
            if drop_upto > 0 {
                let mut log = txn.open_table(LOG).map_err(commit_err)?;
                let ids: Vec<u64> = log
                    .range(..=drop_upto)
                    .map_err(commit_err)?
                    .take(DROP_RECORDS)
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(commit_err)?;
                if let (Some(first), Some(last)) = (ids.first(), ids.last()) {
                    log.retain_in(*first..=*last, |_, _| false)
                        .map_err(commit_err)?;
                }
                // Fewer than a piece left: this was the last one.
                dropped = match ids.last() {
                    Some(last) if ids.len() == DROP_RECORDS => *last,
                    _ => drop_upto,
                };
            }
            if let Some(slice) = &slice {
                let mut inbox = txn.open_table(INBOX).map_err(commit_err)?;
                let mut sends = txn.open_table(SENDS).map_err(commit_err)?;
                let mut cursors = txn.open_table(CURSORS).map_err(commit_err)?;
                let started = std::time::Instant::now();
                for uid in &slice.users {
                    if let Some(u) = slice.generation.user(uid) {
                        write_user(uid, u, &mut inbox, &mut sends, &mut cursors)
                            .map_err(commit_err)?;
                    }
                    moved += 1;
                    if started.elapsed() >= STEP_BUDGET {
                        break;
                    }
                }
            }
        }
        txn.commit().map_err(commit_err)?;
        let (done, more) = {
            let mut t = self.tails();
            if drop_upto > 0 {
                t.log_dropped(dropped);
            }
            let done = slice.as_ref().and_then(|s| t.flushed(s, moved));
            (done, t.rotate(self.log_bytes) || t.log_to_drop() > 0)
        };
        // A whole generation is freed here, not under the lock readers take.
        drop((done, slice));
        Ok(more)
    }

    /// Bytes of logged entries held in memory.
    #[cfg(test)]
    pub fn log_bytes_held(&self) -> usize {
        self.tails().bytes()
    }
}

/// Writes one user's logged entries into the tables.
/// Applies membership changes; a change that is none (joining twice) leaves the count alone.
fn write_memberships(
    txn: &redb::WriteTransaction,
    changes: &[&crate::store::Membership],
) -> Result<(), StoreError> {
    let mut members = txn.open_table(MEMBERS).map_err(commit_err)?;
    let mut by_user = txn.open_table(USER_GROUPS).map_err(commit_err)?;
    let mut sizes = txn.open_table(GROUP_SIZES).map_err(commit_err)?;
    for m in changes {
        let (gid, uid) = (&*m.gid, &*m.uid);
        let changed = if m.joined {
            by_user.insert((uid, gid), ()).map_err(commit_err)?;
            members
                .insert((gid, uid), ())
                .map_err(commit_err)?
                .is_none()
        } else {
            by_user.remove((uid, gid)).map_err(commit_err)?;
            members.remove((gid, uid)).map_err(commit_err)?.is_some()
        };
        if changed {
            let size = sizes.get(gid).map_err(commit_err)?.map_or(0, |v| v.value());
            let size = if m.joined {
                size + 1
            } else {
                size.saturating_sub(1)
            };
            if size == 0 {
                sizes.remove(gid).map_err(commit_err)?;
            } else {
                sizes.insert(gid, size).map_err(commit_err)?;
            }
        }
    }
    Ok(())
}

fn write_user(
    uid: &str,
    u: &UserTail,
    inbox: &mut Table<(&str, u64), &[u8]>,
    sends: &mut Table<(&str, u64), &[u8]>,
    cursors: &mut Table<(&str, &str), u64>,
) -> Result<(), Box<dyn std::error::Error>> {
    for chunk in &u.inbox {
        inbox.insert((uid, chunk.first_seq), chunk.bytes.as_slice())?;
    }
    write_sends(sends, uid, u.send_count, &u.sends)?;
    for (device, seq) in &u.cursors {
        let key = (uid, &**device);
        let cur = cursors.get(key)?.map(|v| v.value()).unwrap_or(0);
        if *seq > cur {
            cursors.insert(key, *seq)?;
        }
    }
    Ok(())
}

/// Appends `count` idempotency keys (encoded by [`records::put_send`]) to `uid`'s send
/// chunks and drops the chunks that hold only keys older than the newest [`DEDUPE_KEEP`].
///
/// Chunks stay between a few and about `DEDUPE_KEEP` keys: keys beyond the newest
/// `DEDUPE_KEEP` are not written, and a few keys join the last chunk when it is small, so a
/// user that sends rarely does not end up with a thousand one-key chunks to read.
fn write_sends(
    table: &mut Table<(&str, u64), &[u8]>,
    uid: &str,
    count: usize,
    keys: &[u8],
) -> Result<(), Box<dyn std::error::Error>> {
    if count == 0 {
        return Ok(());
    }
    let (count, keys) = if count > DEDUPE_KEEP {
        (DEDUPE_KEEP, records::skip_sends(keys, count - DEDUPE_KEEP)?)
    } else {
        (count, keys)
    };
    // The last chunk, and its keys when the new ones join it.
    let mut buf = Vec::new();
    let last = match table.range((uid, 0)..=(uid, u64::MAX))?.next_back() {
        Some(entry) => {
            let (k, v) = entry?;
            let n = records::send_chunk_len(v.value())?;
            let join = n < SEND_CHUNK_JOIN && n as usize + count <= DEDUPE_KEEP;
            if join {
                let old_keys = records::send_chunk_keys(v.value())?;
                records::encode_send_chunk(n as usize + count, old_keys, &mut buf);
            }
            Some((k.value().1, n, join))
        }
        None => None,
    };
    let total = match last {
        Some((first, n, true)) => {
            buf.extend_from_slice(keys);
            table.insert((uid, first), buf.as_slice())?;
            first + n - 1 + count as u64
        }
        last => {
            let total = last.map_or(0, |(first, n, _)| first + n - 1);
            records::encode_send_chunk(count, keys, &mut buf);
            table.insert((uid, total + 1), buf.as_slice())?;
            total + count as u64
        }
    };
    let mut old = Vec::new();
    for entry in table.range((uid, 0)..=(uid, u64::MAX))? {
        let (k, v) = entry?;
        let first = k.value().1;
        let last = first + records::send_chunk_len(v.value())? - 1;
        if last + DEDUPE_KEEP as u64 > total {
            break;
        }
        old.push(first);
    }
    for first in old {
        table.remove((uid, first))?;
    }
    Ok(())
}

/// The highest seq in `uid`'s inbox chunks (0 when none).
fn last_inbox_seq<T>(table: &T, uid: &str) -> Result<u64, ReadError>
where
    T: ReadableTable<(&'static str, u64), &'static [u8]>,
{
    match table.range((uid, 0)..=(uid, u64::MAX))?.next_back() {
        Some(entry) => {
            let (k, v) = entry?;
            Ok(k.value().1 + records::inbox_chunk_len(v.value())? - 1)
        }
        None => Ok(0),
    }
}

/// The newest idempotency key in `uid`'s send chunks.
fn last_send<T>(table: &T, uid: &str) -> Result<Option<(String, u64)>, ReadError>
where
    T: ReadableTable<(&'static str, u64), &'static [u8]>,
{
    match table.range((uid, 0)..=(uid, u64::MAX))?.next_back() {
        Some(entry) => Ok(records::decode_send_chunk(entry?.1.value())?.pop()),
        None => Ok(None),
    }
}

/// Converts the layout with one row per message and per key into chunks, and drops its
/// tables. Old rows hold the whole `Message`, seq included; as a body that still decodes to
/// the same message (the delivery's seq comes first, the stored one, equal, last).
fn migrate(
    txn: &WriteTransaction,
    inbox: &mut Table<(&str, u64), &[u8]>,
    sends: &mut Table<(&str, u64), &[u8]>,
) -> Result<(), StoreError> {
    let names: Vec<String> = txn
        .list_tables()
        .map_err(open_err)?
        .map(|t| t.name().to_owned())
        .collect();
    let has = |t: &str| names.iter().any(|n| n == t);
    if has(OLD_INBOX.name()) {
        let old = txn.open_table(OLD_INBOX).map_err(open_err)?;
        let mut user: Option<(String, UserTail)> = None;
        let mut write = |user: Option<(String, UserTail)>| -> Result<(), StoreError> {
            if let Some((uid, u)) = user {
                for chunk in &u.inbox {
                    inbox
                        .insert((uid.as_str(), chunk.first_seq), chunk.bytes.as_slice())
                        .map_err(open_err)?;
                }
            }
            Ok(())
        };
        for entry in old.iter().map_err(open_err)? {
            let (k, v) = entry.map_err(open_err)?;
            let (uid, seq) = k.value();
            if user.as_ref().is_none_or(|(u, _)| u != uid) {
                write(user.replace((uid.to_owned(), UserTail::default())))?;
            }
            let m = proto::Message::decode(v.value())
                .map_err(|_| open_err(Corrupt("an old inbox row")))?;
            if let Some((_, u)) = user.as_mut() {
                u.push_message(seq, m.server_time_ms, v.value());
            }
        }
        write(user)?;
        drop(old);
        txn.delete_table(OLD_INBOX).map_err(open_err)?;
    }
    if has(OLD_DEDUPE_ORDER.name()) {
        let order = txn.open_table(OLD_DEDUPE_ORDER).map_err(open_err)?;
        let dedupe = txn.open_table(OLD_DEDUPE).map_err(open_err)?;
        let mut keys: Vec<(String, String, u64)> = Vec::new();
        for entry in order.iter().map_err(open_err)? {
            let (k, v) = entry.map_err(open_err)?;
            let (uid, n) = k.value();
            let id = v.value();
            // A key used again later is numbered by its last use only.
            if let Some(at) = dedupe.get((uid, id)).map_err(open_err)? {
                let (seq, at) = at.value();
                if at == n {
                    keys.push((uid.to_owned(), id.to_owned(), seq));
                }
            }
        }
        drop((order, dedupe));
        for group in keys.chunk_by(|a, b| a.0 == b.0) {
            let mut buf = Vec::new();
            for (_, id, seq) in group {
                records::put_send(id, *seq, &mut buf);
            }
            write_sends(sends, &group[0].0, group.len(), &buf).map_err(open_err)?;
        }
    }
    txn.delete_table(OLD_DEDUPE_ORDER).map_err(open_err)?;
    txn.delete_table(OLD_DEDUPE).map_err(open_err)?;
    txn.delete_table(OLD_DEDUPE_COUNT).map_err(open_err)?;
    Ok(())
}

impl Store for RedbStore {
    fn commit(&self, batches: &[&WriteBatch], sync: bool) -> Result<Vec<Vec<Sent>>, CommitError> {
        RedbStore::commit(self, batches, sync).map_err(|e| CommitError::Broken(e.to_string()))
    }

    fn maintain(&self) -> Result<bool, String> {
        RedbStore::maintain(self).map_err(|e| e.to_string())
    }
}

impl StoreRead for RedbStore {
    fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
        if let Some(seq) = self.tails().max_seq(uid) {
            return Ok(seq);
        }
        let txn = self.db.begin_read()?;
        last_inbox_seq(&txn.open_table(INBOX)?, uid)
    }

    fn messages_after(
        &self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        if after == u64::MAX || limit == 0 {
            return Ok(Vec::new());
        }
        let (held_from, held) = {
            let t = self.tails();
            (t.min_seq(uid), t.messages_after(uid, after, limit))
        };
        if held_from.is_some_and(|first| first <= after + 1) {
            return Ok(held);
        }
        // The tables, then what memory holds beyond them (a move in between puts some in both).
        let txn = self.db.begin_read()?;
        let t = txn.open_table(INBOX)?;
        let start = match t.range((uid, 0)..=(uid, after + 1))?.next_back() {
            Some(entry) => entry?.0.value().1,
            None => 0,
        };
        let mut out = Vec::new();
        for entry in t.range((uid, start)..=(uid, u64::MAX))? {
            let (k, v) = entry?;
            let room = limit - out.len();
            records::decode_inbox_chunk_into(k.value().1, v.value(), after, room, &mut out)?;
            if out.len() >= limit {
                return Ok(out);
            }
        }
        let last = out.last().map_or(after, |m| m.seq);
        let room = limit - out.len();
        out.extend(held.into_iter().filter(|m| m.seq > last).take(room));
        Ok(out)
    }

    fn cursor(&self, uid: &str, device_id: &str) -> u64 {
        let held = self
            .tails()
            .cursors(uid)
            .into_iter()
            .find(|(d, _)| &**d == device_id)
            .map_or(0, |(_, s)| s);
        let stored = degrade(self.read_cursor(uid, device_id)).unwrap_or(0);
        held.max(stored)
    }

    fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
        let held = self.tails().cursors(uid);
        let mut out = degrade(self.scan(CURSORS, uid, |v| v)).unwrap_or_default();
        for (d, s) in held {
            match out.iter_mut().find(|(o, _)| *o == *d) {
                Some((_, o)) => *o = (*o).max(s),
                None => out.push((d.to_string(), s)),
            }
        }
        out.sort();
        out
    }

    fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        let held = self.tails().sends(uid);
        if held.len() >= DEDUPE_KEEP {
            return Ok(held[held.len() - DEDUPE_KEEP..].to_vec());
        }
        // Keys at or above the first held one were moved after memory was read: counted there.
        let first_held = held.first().map_or(u64::MAX, |k| k.1);
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SENDS)?;
        let mut older: Vec<Vec<(String, u64)>> = Vec::new();
        let mut n = held.len();
        for entry in t.range((uid, 0)..=(uid, u64::MAX))?.rev() {
            let mut keys = records::decode_send_chunk(entry?.1.value())?;
            keys.retain(|k| k.1 < first_held);
            n += keys.len();
            older.push(keys);
            if n >= DEDUPE_KEEP {
                break;
            }
        }
        let mut out: Vec<(String, u64)> = older.into_iter().rev().flatten().collect();
        out.extend(held);
        let excess = out.len().saturating_sub(DEDUPE_KEEP);
        out.drain(..excess);
        Ok(out)
    }

    fn sent(&self, uid: &str, client_msg_id: &str) -> Result<Option<u64>, ReadError> {
        let held = self.tails().find_send(uid, client_msg_id);
        if let Some((seq, newer)) = held.found {
            return Ok((newer < DEDUPE_KEEP).then_some(seq));
        }
        if held.count >= DEDUPE_KEEP {
            return Ok(None);
        }
        // The newest chunks, newest key first, until DEDUPE_KEEP keys in all were looked at.
        // Keys at or above the first held one were moved after memory was read: counted there.
        let txn = self.db.begin_read()?;
        let t = txn.open_table(SENDS)?;
        let mut seen = held.count;
        for entry in t.range((uid, 0)..=(uid, u64::MAX))?.rev() {
            let (_, v) = entry?;
            let mut keys = Vec::new();
            records::for_each_send(records::send_chunk_keys(v.value())?, |k, seq| {
                if seq < held.first_seq {
                    keys.push((k == client_msg_id, seq));
                }
            })?;
            for (same, seq) in keys.into_iter().rev() {
                if seen >= DEDUPE_KEEP {
                    return Ok(None);
                }
                if same {
                    return Ok(Some(seq));
                }
                seen += 1;
            }
        }
        Ok(None)
    }

    fn friends(&self, uid: &str) -> Vec<String> {
        degrade(self.scan(FRIENDS, uid, |()| ()))
            .map(|v| v.into_iter().map(|(friend, ())| friend).collect())
            .unwrap_or_default()
    }

    fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .scan(MEMBERS, gid, |()| ())?
            .into_iter()
            .map(|(u, ())| u)
            .collect())
    }

    fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
        let txn = self.db.begin_read()?;
        let size = txn
            .open_table(GROUP_SIZES)?
            .get(gid)?
            .map_or(0, |v| v.value());
        Ok(usize::try_from(size).unwrap_or(usize::MAX))
    }

    fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(MEMBERS)?.get((gid, uid))?.is_some())
    }

    fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .scan(USER_GROUPS, uid, |()| ())?
            .into_iter()
            .map(|(g, ())| g)
            .collect())
    }
}

/// A read whose failure costs little (a cursor, the friends): logged, then taken as empty.
fn degrade<T>(r: Result<T, ReadError>) -> Option<T> {
    r.map_err(|e| log::error!("{e}")).ok()
}

impl RedbStore {
    fn read_cursor(&self, uid: &str, device_id: &str) -> Result<u64, ReadError> {
        let txn = self.db.begin_read()?;
        let t = txn.open_table(CURSORS)?;
        Ok(t.get((uid, device_id))?.map(|v| v.value()).unwrap_or(0))
    }

    /// Every `(uid, key) -> value` entry of a table keyed by `(uid, key)`, in key order.
    fn scan<V, T>(
        &self,
        table: TableDefinition<(&str, &str), V>,
        uid: &str,
        value: impl Fn(V::SelfType<'_>) -> T,
    ) -> Result<Vec<(String, T)>, ReadError>
    where
        V: redb::Value + 'static,
    {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(table)?;
        let mut out = Vec::new();
        for entry in table.range((uid, "")..)? {
            let (k, v) = entry?;
            let (owner, key) = k.value();
            if owner != uid {
                break;
            }
            out.push((key.to_owned(), value(v.value())));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::im::wire;
    use crate::store::{Append, Body};
    use redb::ReadableTableMetadata;
    use std::path::PathBuf;

    /// A data directory removed when the test ends.
    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("imgate-redb-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            Dir(d)
        }

        fn open(&self, log_bytes: usize) -> RedbStore {
            RedbStore::open(&self.0, 1 << 20, log_bytes).unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn body(owner: &str, seq: u64) -> Body {
        format!("{owner}:{seq}").into_bytes().into()
    }

    /// Appends seq `seq` to each owner's inbox, with an idempotency key `k{seq}` for the first.
    fn batch(owners: &[&str], seq: u64) -> StoredBatch {
        StoredBatch {
            appends: owners
                .iter()
                .map(|o| Append {
                    owner: (*o).into(),
                    msg: StoredMessage {
                        seq,
                        server_time_ms: seq as i64,
                        body: body(o, seq),
                    },
                })
                .collect(),
            sends: vec![(owners[0].into(), format!("k{seq}"), seq)],
            ..StoredBatch::default()
        }
    }

    /// Checks `uid`'s inbox holds exactly seqs 1..=n, each with its own body.
    fn assert_inbox(s: &RedbStore, uid: &str, n: u64) {
        assert_eq!(s.max_seq(uid).unwrap(), n, "{uid}");
        let all = s.messages_after(uid, 0, 10_000).unwrap();
        assert_eq!(all.len() as u64, n, "{uid}");
        for (i, m) in all.iter().enumerate() {
            assert_eq!(m.seq, i as u64 + 1, "{uid}");
            assert_eq!(m.body, body(uid, m.seq), "{uid}");
            assert_eq!(m.server_time_ms, m.seq as i64);
        }
        // Any page starts right after `after`.
        for after in [0, n / 3, n.saturating_sub(1), n] {
            let page = s.messages_after(uid, after, 7).unwrap();
            let want: Vec<u64> = (after + 1..=n).take(7).collect();
            assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), want);
        }
    }

    fn log_len(s: &RedbStore) -> u64 {
        let txn = s.db.begin_read().unwrap();
        let t = txn.open_table(LOG).unwrap();
        ReadableTableMetadata::len(&t).unwrap()
    }

    #[test]
    fn memberships_are_kept_both_ways_with_their_count_across_reopens() {
        use crate::store::Membership;
        let dir = Dir::new("groups");
        let change = |gid: &str, uid: &str, joined| Membership {
            gid: gid.into(),
            uid: uid.into(),
            joined,
        };
        {
            let s = dir.open(1 << 20);
            let b = StoredBatch {
                memberships: vec![
                    change("g", "bob", true),
                    change("g", "alice", true),
                    change("h", "alice", true),
                    // A repeat is no second member.
                    change("g", "bob", true),
                ],
                ..StoredBatch::default()
            };
            s.commit_stored(&[&b], true).unwrap();
            assert_eq!(s.group_members("g"), Ok(vec!["alice".into(), "bob".into()]));
            assert_eq!(s.group_size("g"), Ok(2));
            assert_eq!(s.groups_of("alice"), Ok(vec!["g".into(), "h".into()]));
            assert_eq!(s.is_member("h", "bob"), Ok(false));
            let b = StoredBatch {
                memberships: vec![change("g", "alice", false), change("g", "nobody", false)],
                ..StoredBatch::default()
            };
            s.commit_stored(&[&b], true).unwrap();
        }
        let s = dir.open(1 << 20);
        assert_eq!(s.group_members("g"), Ok(vec!["bob".into()]));
        assert_eq!(s.group_size("g"), Ok(1));
        assert_eq!(s.groups_of("alice"), Ok(vec!["h".into()]));
        assert_eq!(s.is_member("g", "alice"), Ok(false));
        assert_eq!(
            (s.group_size("none"), s.group_members("none")),
            (Ok(0), Ok(vec![]))
        );
    }

    #[test]
    fn reads_see_every_commit_across_moves_and_reopens() {
        let d = Dir::new("moves");
        {
            // A limit of one byte: every maintenance step moves what is logged.
            let s = d.open(1);
            for seq in 1..=300 {
                s.commit_stored(&[&batch(&["a", "b"], seq)], seq % 50 == 0)
                    .unwrap();
                if seq % 7 == 0 {
                    s.maintain().unwrap();
                }
                assert_eq!(s.max_seq("a").unwrap(), seq);
            }
            assert_inbox(&s, "a", 300);
            assert_inbox(&s, "b", 300);
            assert_eq!(s.recent_sends("a").unwrap().len(), 300);
            assert!(s.recent_sends("b").unwrap().is_empty());
        }
        // Reopened: what was only logged is read back from the log.
        let s = d.open(usize::MAX);
        assert_inbox(&s, "a", 300);
        let keys = s.recent_sends("a").unwrap();
        assert_eq!(keys.first(), Some(&("k1".to_owned(), 1)));
        assert_eq!(keys.last(), Some(&("k300".to_owned(), 300)));
        assert!(log_len(&s) > 0);
        drop(s);
        // Everything moved: the log is empty and nothing changed for readers.
        let s = d.open(1);
        while s.maintain().unwrap() {}
        assert_eq!(log_len(&s), 0);
        assert_eq!(s.tails().bytes(), 0);
        assert_inbox(&s, "a", 300);
        assert_inbox(&s, "b", 300);
        assert_eq!(s.recent_sends("a").unwrap(), keys);
    }

    #[test]
    fn a_stop_in_the_middle_of_a_generation_reads_back_only_what_was_not_moved() {
        let d = Dir::new("half");
        let users: Vec<String> = (0..600).map(|i| format!("u{i:03}")).collect();
        {
            let s = d.open(1);
            for u in &users {
                s.commit_stored(&[&batch(&[u], 1)], false).unwrap();
            }
            // One step moves some of the 600; the log stays whole until the last.
            assert!(s.step().unwrap());
            s.commit_stored(&[], true).unwrap();
            assert_eq!(log_len(&s), 600);
        }
        let s = d.open(usize::MAX);
        for u in &users {
            assert_inbox(&s, u, 1);
            assert_eq!(
                s.recent_sends(u).unwrap(),
                vec![("k1".to_owned(), 1)],
                "{u}"
            );
            s.commit_stored(&[&batch(&[u], 2)], false).unwrap();
            assert_inbox(&s, u, 2);
        }
    }

    #[test]
    fn logged_entries_held_in_memory_stay_within_twice_the_limit() {
        let d = Dir::new("bound");
        let limit = 64 * 1024;
        let s = d.open(limit);
        // More users than one step moves: a generation takes several steps.
        let users: Vec<String> = (0..600).map(|i| format!("u{i}")).collect();
        let mut most = 0;
        for seq in 1..=30u64 {
            let mut b = StoredBatch::default();
            for u in &users {
                b.appends.push(Append {
                    owner: u.as_str().into(),
                    msg: StoredMessage {
                        seq,
                        server_time_ms: 0,
                        body: vec![7; 100].into(),
                    },
                });
            }
            // As the storage thread does: one maintenance step after every commit.
            s.commit_stored(&[&b], false).unwrap();
            s.maintain().unwrap();
            most = most.max(s.log_bytes_held());
        }
        // One commit adds about 100 KiB (chunk buffers count by capacity): the first step
        // after it rotates a generation, and the steps go on until the bound holds.
        assert!(most <= 2 * limit + 200 * 1024, "held {most} bytes");
        assert!(log_len(&s) < 30, "moved generations leave the log");
        for u in &users {
            assert_eq!(s.messages_after(u, 0, 1000).unwrap().len(), 30);
        }
    }

    #[test]
    fn keeps_the_newest_send_keys_and_drops_older_chunks() {
        let d = Dir::new("sends");
        let s = d.open(1);
        let n = DEDUPE_KEEP as u64 + 333;
        for first in (1..=n).step_by(50) {
            let mut b = StoredBatch::default();
            for seq in first..(first + 50).min(n + 1) {
                b.sends.push(("a".into(), format!("k{seq}"), seq));
            }
            s.commit_stored(&[&b], false).unwrap();
            while s.maintain().unwrap() {}
        }
        let keys = s.recent_sends("a").unwrap();
        let want: Vec<(String, u64)> = (n - DEDUPE_KEEP as u64 + 1..=n)
            .map(|seq| (format!("k{seq}"), seq))
            .collect();
        assert_eq!(keys, want);
        // Chunks of only older keys are gone: at most one chunk's worth beyond the newest.
        let txn = s.db.begin_read().unwrap();
        let t = txn.open_table(SENDS).unwrap();
        let stored: u64 = t
            .range(("a", 0)..=("a", u64::MAX))
            .unwrap()
            .map(|e| records::send_chunk_len(e.unwrap().1.value()).unwrap())
            .sum();
        assert!(stored < DEDUPE_KEEP as u64 + 50, "{stored} keys kept");
        drop((t, txn));
        // `sent` knows exactly the newest DEDUPE_KEEP, moved or still logged.
        let check = |s: &RedbStore, newest: u64| {
            let oldest = newest - DEDUPE_KEEP as u64 + 1;
            for seq in [newest, newest - 1, oldest + 1, oldest] {
                assert_eq!(
                    s.sent("a", &format!("k{seq}")).unwrap(),
                    Some(seq),
                    "k{seq}"
                );
            }
            assert_eq!(s.sent("a", &format!("k{}", oldest - 1)).unwrap(), None);
            assert_eq!(s.sent("a", "never").unwrap(), None);
        };
        check(&s, n);
        let mut b = StoredBatch::default();
        for seq in n + 1..=n + 10 {
            b.sends.push(("a".into(), format!("k{seq}"), seq));
        }
        s.commit_stored(&[&b], false).unwrap();
        check(&s, n + 10);
        // An id used again counts at its newest use.
        let reuse = StoredBatch {
            sends: vec![("a".into(), format!("k{n}"), n + 11)],
            ..StoredBatch::default()
        };
        s.commit_stored(&[&reuse], false).unwrap();
        assert_eq!(s.sent("a", &format!("k{n}")).unwrap(), Some(n + 11));
    }

    #[test]
    fn send_chunks_stay_few_and_bounded() {
        let d = Dir::new("chunks");
        let s = d.open(1);
        let chunks = |s: &RedbStore| -> Vec<u64> {
            let txn = s.db.begin_read().unwrap();
            let t = txn.open_table(SENDS).unwrap();
            let v: Vec<u64> = t
                .range(("a", 0)..=("a", u64::MAX))
                .unwrap()
                .map(|e| records::send_chunk_len(e.unwrap().1.value()).unwrap())
                .collect();
            v
        };
        // A user that sends once per move: its keys gather in a few chunks.
        for seq in 1..=1500u64 {
            let b = StoredBatch {
                sends: vec![("a".into(), format!("k{seq}"), seq)],
                ..StoredBatch::default()
            };
            s.commit_stored(&[&b], false).unwrap();
            while s.maintain().unwrap() {}
        }
        let c = chunks(&s);
        assert!(c.len() <= 12, "{} chunks", c.len());
        let want: Vec<(String, u64)> = (501..=1500).map(|q| (format!("k{q}"), q)).collect();
        assert_eq!(s.recent_sends("a").unwrap(), want);
        // A burst of 3,000 in one move: only the newest 1,000 are written.
        let b = StoredBatch {
            sends: (1501..=4500)
                .map(|q| ("a".into(), format!("k{q}"), q))
                .collect(),
            ..StoredBatch::default()
        };
        s.commit_stored(&[&b], false).unwrap();
        while s.maintain().unwrap() {}
        assert_eq!(chunks(&s).iter().sum::<u64>(), DEDUPE_KEEP as u64);
        assert_eq!(s.sent("a", "k3501").unwrap(), Some(3501));
        assert_eq!(s.sent("a", "k3500").unwrap(), None);
    }

    #[test]
    fn keys_moved_while_memory_is_read_are_not_counted_twice() {
        let d = Dir::new("overlap");
        let s = d.open(1);
        let keys = |range: std::ops::RangeInclusive<u64>| StoredBatch {
            sends: range
                .map(|seq| ("a".into(), format!("k{seq}"), seq))
                .collect(),
            ..StoredBatch::default()
        };
        s.commit_stored(&[&keys(1..=700)], false).unwrap();
        while s.maintain().unwrap() {}
        s.commit_stored(&[&keys(701..=1100)], false).unwrap();
        // As if a move of the 400 held keys committed after memory was read and before the
        // snapshot: they are in both.
        let txn = s.db.begin_write().unwrap();
        {
            let mut sends = txn.open_table(SENDS).unwrap();
            let mut held = Vec::new();
            for seq in 701..=1100u64 {
                records::put_send(&format!("k{seq}"), seq, &mut held);
            }
            write_sends(&mut sends, "a", 400, &held).unwrap();
        }
        txn.commit().unwrap();
        // The newest 1,000 are k101..k1100, each once.
        assert_eq!(s.sent("a", "k101").unwrap(), Some(101));
        assert_eq!(s.sent("a", "k100").unwrap(), None);
        let recent = s.recent_sends("a").unwrap();
        let want: Vec<(String, u64)> = (101..=1100).map(|q| (format!("k{q}"), q)).collect();
        assert_eq!(recent, want);
    }

    #[test]
    fn cursors_only_move_forward_and_friendships_go_both_ways() {
        let d = Dir::new("cursors");
        let s = d.open(usize::MAX);
        let cursor = |seq| StoredBatch {
            cursors: vec![("b".into(), "phone".into(), seq)],
            friendships: vec![
                ("a".into(), "b".into(), true),
                ("a".into(), "c".into(), true),
            ],
            ..StoredBatch::default()
        };
        s.commit_stored(&[&cursor(5), &cursor(3)], false).unwrap();
        assert_eq!(s.cursor("b", "phone"), 5);
        assert_eq!(s.cursors("b"), vec![("phone".to_owned(), 5)]);
        assert_eq!(s.friends("a"), vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(s.friends("b"), vec!["a".to_owned()]);
        drop(s);
        let s = d.open(1);
        s.commit_stored(&[&cursor(2)], false).unwrap();
        while s.maintain().unwrap() {}
        assert_eq!(s.cursor("b", "phone"), 5, "a cursor never moves back");
        s.commit_stored(
            &[&StoredBatch {
                friendships: vec![("b".into(), "a".into(), false)],
                ..StoredBatch::default()
            }],
            false,
        )
        .unwrap();
        assert!(s.friends("a") == vec!["c".to_owned()] && s.friends("b").is_empty());
    }

    #[test]
    fn the_layout_with_a_row_per_message_is_converted_at_open() {
        let d = Dir::new("convert");
        std::fs::create_dir_all(&d.0).unwrap();
        let old_message = |seq: u64| proto::Message {
            seq,
            from_uid: "a".into(),
            to_uid: "b".into(),
            client_msg_id: format!("k{seq}"),
            content: format!("hello {seq}").into_bytes(),
            server_time_ms: 1_000 + seq as i64,
            from_device: "phone".into(),
            group_id: String::new(),
        };
        {
            let db = Database::create(d.0.join("imgate.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut inbox = txn.open_table(OLD_INBOX).unwrap();
                let mut order = txn.open_table(OLD_DEDUPE_ORDER).unwrap();
                let mut dedupe = txn.open_table(OLD_DEDUPE).unwrap();
                for seq in 1..=300u64 {
                    for uid in ["a", "b"] {
                        let m = old_message(seq).encode_to_vec();
                        inbox.insert((uid, seq), m.as_slice()).unwrap();
                    }
                    let id = format!("k{seq}");
                    order.insert(("a", seq), id.as_str()).unwrap();
                    dedupe.insert(("a", id.as_str()), (seq, seq)).unwrap();
                }
                // An id used again later counts at its last use only.
                order.insert(("a", 301), "k1").unwrap();
                dedupe.insert(("a", "k1"), (301, 301)).unwrap();
                txn.open_table(OLD_DEDUPE_COUNT)
                    .unwrap()
                    .insert("a", 301)
                    .unwrap();
                txn.open_table(CURSORS)
                    .unwrap()
                    .insert(("b", "phone"), 7)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let s = d.open(usize::MAX);
        for uid in ["a", "b"] {
            assert_eq!(s.max_seq(uid).unwrap(), 300);
            let msgs = s.messages_after(uid, 0, 1000).unwrap();
            assert_eq!(msgs.len(), 300);
            for m in &msgs {
                assert_eq!(wire::to_proto(m).unwrap(), old_message(m.seq));
                assert_eq!(m.server_time_ms, 1_000 + m.seq as i64);
            }
        }
        let keys = s.recent_sends("a").unwrap();
        assert_eq!(keys.len(), 300);
        assert_eq!(keys.first(), Some(&("k2".to_owned(), 2)));
        assert_eq!(keys.last(), Some(&("k1".to_owned(), 301)));
        assert_eq!(s.cursor("b", "phone"), 7);
        let txn = s.db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| t.name().to_owned())
            .collect();
        for old in ["inbox", "dedupe_v2", "dedupe_order", "dedupe_count"] {
            assert!(!names.iter().any(|n| n == old), "{old} in {names:?}");
        }
    }

    #[test]
    fn store_errors_say_what_failed() {
        assert_eq!(
            StoreError::Open("no space".into()).to_string(),
            "cannot open the store: no space"
        );
        assert_eq!(
            StoreError::Commit("no space".into()).to_string(),
            "store commit failed: no space"
        );
    }

    #[test]
    fn entries_the_tables_already_hold_are_not_read_back_into_memory() {
        let d = Dir::new("replay-moved");
        {
            let s = d.open(1);
            s.commit_stored(&[&batch(&["a"], 1)], false).unwrap();
            assert!(s.step().unwrap(), "the move leaves the log to delete");
            s.commit_stored(&[], true).unwrap();
        }
        let s = d.open(usize::MAX);
        assert_eq!(log_len(&s), 1);
        assert_eq!(s.log_bytes_held(), 0);
        assert_inbox(&s, "a", 1);
        assert_eq!(s.recent_sends("a").unwrap(), vec![("k1".to_owned(), 1)]);
    }

    #[test]
    fn commits_after_a_reopen_are_logged_after_the_last_record() {
        let d = Dir::new("replay-next");
        for seq in 1..=3 {
            let s = d.open(usize::MAX);
            s.commit_stored(&[&batch(&["a"], seq)], true).unwrap();
        }
        let s = d.open(usize::MAX);
        assert_eq!(log_len(&s), 3);
        assert_inbox(&s, "a", 3);
    }

    #[test]
    fn the_log_record_buffer_is_reused_up_to_its_limit_and_a_bursts_is_let_go() {
        let d = Dir::new("record");
        let s = d.open(usize::MAX);
        let record = |s: &RedbStore| {
            let r = s.record.lock().unwrap();
            (r.as_ptr(), r.capacity())
        };
        s.commit_stored(&[&batch(&["a"], 1)], false).unwrap();
        let (ptr, capacity) = record(&s);
        assert!(capacity > 0, "kept after the commit");
        s.commit_stored(&[&batch(&["a"], 2)], false).unwrap();
        assert_eq!(
            record(&s),
            (ptr, capacity),
            "the same buffer, not a new one"
        );
        *s.record.lock().unwrap() = Vec::with_capacity(RECORD_KEEP);
        s.commit_stored(&[&batch(&["a"], 3)], false).unwrap();
        assert_eq!(record(&s).1, RECORD_KEEP, "a buffer of the limit is kept");
        let burst = StoredBatch {
            appends: vec![Append {
                owner: "a".into(),
                msg: StoredMessage {
                    seq: 4,
                    server_time_ms: 4,
                    body: vec![7; RECORD_KEEP + 1].into(),
                },
            }],
            ..StoredBatch::default()
        };
        s.commit_stored(&[&burst], false).unwrap();
        assert!(record(&s).1 <= RECORD_KEEP, "{} bytes kept", record(&s).1);
        assert_eq!(
            s.messages_after("a", 3, 10).unwrap()[0].body.len(),
            RECORD_KEEP + 1
        );
    }

    /// Each append below holds about 1,100 bytes: more than the limit of 1,000, and well under
    /// twice it.
    #[test]
    fn maintain_takes_one_step_while_memory_held_is_within_twice_the_limit() {
        let d = Dir::new("maintain");
        let s = d.open(1000);
        let store: &dyn Store = &s;
        let append = |owner: &str| StoredBatch {
            appends: vec![Append {
                owner: owner.into(),
                msg: StoredMessage {
                    seq: 1,
                    server_time_ms: 1,
                    body: vec![7; 1100].into(),
                },
            }],
            ..StoredBatch::default()
        };
        s.commit_stored(&[&append("a")], false).unwrap();
        assert_eq!(s.max_seq("a"), Ok(1));
        // Moves "a"; its log record is still to be deleted.
        assert_eq!(store.maintain(), Ok(true));
        assert_eq!((log_len(&s), s.log_bytes_held()), (1, 0));
        s.commit_stored(&[&append("b")], false).unwrap();
        let held = s.log_bytes_held();
        assert!(held > 1002 && held <= 2000, "{held} bytes held");
        // Deletes the log of "a" and leaves "b", within the bound, for the next call.
        assert_eq!(store.maintain(), Ok(true));
        assert_eq!((log_len(&s), s.log_bytes_held()), (1, held));
        while store.maintain().unwrap() {}
        assert_eq!((log_len(&s), s.log_bytes_held()), (0, 0));
        assert_eq!(store.maintain(), Ok(false), "nothing is due");
        assert_eq!(s.messages_after("b", 0, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_long_log_is_deleted_a_piece_at_a_time_to_its_end() {
        let d = Dir::new("drop-pieces");
        let s = d.open(1);
        let n = DROP_RECORDS as u64 + 500;
        for seq in 1..=n {
            s.commit_stored(&[&batch(&["a"], seq)], false).unwrap();
        }
        assert!(s.step().unwrap(), "moved");
        assert!(s.step().unwrap(), "a piece deleted, more to delete");
        assert_eq!(log_len(&s), n - DROP_RECORDS as u64);
        assert!(!s.step().unwrap(), "the rest deleted");
        assert_eq!(log_len(&s), 0);
        assert_inbox(&s, "a", n);
    }

    #[test]
    fn the_step_that_deletes_the_last_of_a_generations_log_leaves_nothing_due() {
        let d = Dir::new("drop-last");
        let s = d.open(1);
        s.commit_stored(&[&batch(&["a"], 1)], false).unwrap();
        // Friendships are not logged: the generation's newest commit has no log record.
        let friends = StoredBatch {
            friendships: vec![("a".into(), "b".into(), true)],
            ..StoredBatch::default()
        };
        s.commit_stored(&[&friends], false).unwrap();
        assert!(s.step().unwrap(), "moved");
        assert!(!s.step().unwrap(), "the log deleted");
        assert_eq!(log_len(&s), 0);
        assert_inbox(&s, "a", 1);
    }

    /// `n` idempotency keys numbered from `from` (`k{from}`, ...), as the log holds them.
    fn keys_from(from: u64, n: u64) -> Vec<u8> {
        let mut out = Vec::new();
        for q in from..from + n {
            records::put_send(&format!("k{q}"), q, &mut out);
        }
        out
    }

    /// `uid`'s send chunks: (number of the first key, keys).
    fn send_chunks(t: &Table<(&str, u64), &[u8]>, uid: &str) -> Vec<(u64, u64)> {
        t.range((uid, 0)..=(uid, u64::MAX))
            .unwrap()
            .map(|e| {
                let (k, v) = e.unwrap();
                (k.value().1, records::send_chunk_len(v.value()).unwrap())
            })
            .collect()
    }

    #[test]
    fn a_send_chunk_takes_more_keys_while_it_holds_fewer_than_128_and_up_to_a_thousand() {
        let d = Dir::new("join");
        let s = d.open(usize::MAX);
        let txn = s.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SENDS).unwrap();
            let mut write = |uid: &str, from: u64, n: u64| {
                write_sends(&mut t, uid, n as usize, &keys_from(from, n)).unwrap();
                send_chunks(&t, uid)
            };
            assert_eq!(write("a", 1, 127), vec![(1, 127)]);
            assert_eq!(write("a", 128, 1), vec![(1, 128)]);
            assert_eq!(write("a", 129, 1), vec![(1, 128), (129, 1)]);
            assert_eq!(write("b", 1, 100), vec![(1, 100)]);
            assert_eq!(write("b", 101, 50), vec![(1, 150)]);
            assert_eq!(write("c", 1, 100), vec![(1, 100)]);
            assert_eq!(write("c", 101, 901), vec![(1, 100), (101, 901)]);
        }
        txn.abort().unwrap();
    }

    #[test]
    fn a_send_chunk_is_dropped_once_its_newest_key_is_not_among_the_newest_thousand() {
        let d = Dir::new("drop-chunk");
        let s = d.open(usize::MAX);
        let txn = s.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SENDS).unwrap();
            let mut write = |from: u64, n: u64| {
                write_sends(&mut t, "a", n as usize, &keys_from(from, n)).unwrap();
                send_chunks(&t, "a")
            };
            assert_eq!(write(1, 200), vec![(1, 200)]);
            assert_eq!(write(201, 100), vec![(1, 200), (201, 100)]);
            // Joined: k200 is the thousandth newest of k1199.
            assert_eq!(write(301, 899), vec![(1, 200), (201, 999)]);
            assert_eq!(write(1200, 1), vec![(201, 999), (1200, 1)]);
            // Joined, and k1199 is not among the newest thousand of k2199.
            assert_eq!(write(1201, 999), vec![(1200, 1000)]);
        }
        txn.abort().unwrap();
    }

    #[test]
    fn of_a_burst_of_keys_only_the_newest_thousand_are_written() {
        let d = Dir::new("burst");
        let s = d.open(usize::MAX);
        let txn = s.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SENDS).unwrap();
            write_sends(&mut t, "a", 3000, &keys_from(1, 3000)).unwrap();
            let chunks: Vec<Vec<(String, u64)>> = t
                .range(("a", 0)..=("a", u64::MAX))
                .unwrap()
                .map(|e| records::decode_send_chunk(e.unwrap().1.value()).unwrap())
                .collect();
            let want: Vec<(String, u64)> = (2001..=3000).map(|q| (format!("k{q}"), q)).collect();
            assert_eq!(chunks, vec![want]);
        }
        txn.abort().unwrap();
    }

    #[test]
    fn the_newest_thousand_keys_held_in_memory_are_the_ones_known() {
        let d = Dir::new("held-keys");
        let s = d.open(usize::MAX);
        let b = StoredBatch {
            sends: (1..=1200)
                .map(|q| ("a".into(), format!("k{q}"), q))
                .collect(),
            ..StoredBatch::default()
        };
        s.commit_stored(&[&b], false).unwrap();
        let want: Vec<(String, u64)> = (201..=1200).map(|q| (format!("k{q}"), q)).collect();
        assert_eq!(s.recent_sends("a").unwrap(), want);
        assert_eq!(s.sent("a", "k201").unwrap(), Some(201));
        assert_eq!(s.sent("a", "k200").unwrap(), None);
    }

    /// Logs seqs `seqs` of `uid` and moves them into the tables: one inbox chunk.
    fn moved(s: &RedbStore, uid: &str, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            s.commit_stored(&[&batch(&[uid], seq)], false).unwrap();
        }
        while s.maintain().unwrap() {}
    }

    #[test]
    fn a_page_from_the_tables_spans_their_chunks_and_stops_at_its_limit() {
        let d = Dir::new("pages");
        let s = d.open(1);
        moved(&s, "a", 1..=5);
        moved(&s, "a", 6..=10);
        let page = s.messages_after("a", 2, 4).unwrap();
        assert_eq!(page.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4, 5, 6]);
        assert_inbox(&s, "a", 10);
        for seq in 11..=14 {
            s.commit_stored(&[&batch(&["a"], seq)], false).unwrap();
        }
        // From the tables, then from memory.
        let page = s.messages_after("a", 8, 4).unwrap();
        assert_eq!(
            page.iter().map(|m| m.seq).collect::<Vec<_>>(),
            [9, 10, 11, 12]
        );
        assert_inbox(&s, "a", 14);
        assert_eq!(s.messages_after("a", u64::MAX, 10).unwrap(), vec![]);
        assert_eq!(s.messages_after("a", 0, 0).unwrap(), vec![]);
    }

    #[test]
    fn messages_moved_while_memory_is_read_are_not_returned_twice() {
        let d = Dir::new("overlap-inbox");
        let s = d.open(1);
        moved(&s, "a", 1..=3);
        for seq in 4..=6 {
            s.commit_stored(&[&batch(&["a"], seq)], false).unwrap();
        }
        // As if a move of seqs 4 and 5 committed after memory was read and before the
        // snapshot: they are in both.
        let mut u = UserTail::default();
        for seq in 4..=5 {
            u.push_message(seq, seq as i64, &body("a", seq));
        }
        let txn = s.db.begin_write().unwrap();
        {
            let mut inbox = txn.open_table(INBOX).unwrap();
            inbox.insert(("a", 4), u.inbox[0].bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        assert_inbox(&s, "a", 6);
    }

    #[test]
    fn a_held_cursor_and_a_stored_one_of_the_same_device_read_as_the_newer() {
        let d = Dir::new("cursor-merge");
        let s = d.open(1);
        let cursors = |v: &[(&str, u64)]| StoredBatch {
            cursors: v
                .iter()
                .map(|(d, q)| ("b".into(), (*d).into(), *q))
                .collect(),
            ..StoredBatch::default()
        };
        s.commit_stored(&[&cursors(&[("laptop", 2), ("phone", 5)])], false)
            .unwrap();
        while s.maintain().unwrap() {}
        s.commit_stored(&[&cursors(&[("phone", 7)])], false)
            .unwrap();
        assert_eq!(
            s.cursors("b"),
            vec![("laptop".to_owned(), 2), ("phone".to_owned(), 7)]
        );
        assert_eq!(s.cursor("b", "phone"), 7);
    }

    #[test]
    fn a_group_member_is_one_until_it_leaves() {
        use crate::store::Membership;
        let d = Dir::new("member");
        let s = d.open(usize::MAX);
        let change = |joined| StoredBatch {
            memberships: vec![Membership {
                gid: "g".into(),
                uid: "bob".into(),
                joined,
            }],
            ..StoredBatch::default()
        };
        s.commit_stored(&[&change(true)], false).unwrap();
        assert_eq!(s.is_member("g", "bob"), Ok(true));
        assert_eq!(s.is_member("g", "alice"), Ok(false));
        s.commit_stored(&[&change(false)], false).unwrap();
        assert_eq!(s.is_member("g", "bob"), Ok(false));
    }

    #[test]
    fn old_keys_of_several_users_are_converted_each_to_its_own_user() {
        let d = Dir::new("convert-keys");
        std::fs::create_dir_all(&d.0).unwrap();
        {
            let db = Database::create(d.0.join("imgate.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut order = txn.open_table(OLD_DEDUPE_ORDER).unwrap();
                let mut dedupe = txn.open_table(OLD_DEDUPE).unwrap();
                for uid in ["a", "b"] {
                    for n in 1..=2u64 {
                        let id = format!("{uid}{n}");
                        order.insert((uid, n), id.as_str()).unwrap();
                        dedupe.insert((uid, id.as_str()), (n, n)).unwrap();
                    }
                }
            }
            txn.commit().unwrap();
        }
        let s = d.open(usize::MAX);
        for uid in ["a", "b"] {
            let want: Vec<(String, u64)> = (1..=2).map(|n| (format!("{uid}{n}"), n)).collect();
            assert_eq!(s.recent_sends(uid).unwrap(), want, "{uid}");
        }
    }
}
