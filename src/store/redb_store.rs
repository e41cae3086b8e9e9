//! The durable store on redb: one file in `--data-dir`, ACID transactions, MVCC reads.
//!
//! Readers (the network thread) never wait for the writer (the storage thread): redb readers
//! see the last committed snapshot. Messages are stored as the wire `imgate.v1.Message`.

use std::path::Path;

use prost::Message as _;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreRead, StoredMessage, WriteBatch, DEDUPE_KEEP};
use crate::im::proto;

/// (uid, seq) -> encoded `imgate.v1.Message`.
const INBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("inbox");
/// (uid, device_id) -> cursor seq.
const CURSORS: TableDefinition<(&str, &str), u64> = TableDefinition::new("cursors");
/// (uid, client_msg_id) -> (sender seq, n): n is the key's number in DEDUPE_ORDER, so that
/// forgetting the oldest key is a lookup, not a scan (ids may be reused once forgotten).
const DEDUPE: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("dedupe_v2");
/// (uid, n) -> client_msg_id, the n-th key of the user, for keeping the newest ones. The newest
/// entry is never removed, so the user's last n is the number of keys ever written: no
/// separate counter, whose page would be one more rewritten per send.
const DEDUPE_ORDER: TableDefinition<(&str, u64), &str> = TableDefinition::new("dedupe_order");
/// The per-user key counter of an earlier layout, dropped at open (DEDUPE_ORDER replaces it).
const RETIRED_DEDUPE_COUNT: TableDefinition<&str, u64> = TableDefinition::new("dedupe_count");
/// (a, b) -> () for each direction of a friendship.
const FRIENDS: TableDefinition<(&str, &str), ()> = TableDefinition::new("friends");

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
}

fn commit_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Commit(e.to_string())
}

impl RedbStore {
    /// Opens (or creates) `dir/imgate.redb` with a page cache of at most `cache_bytes`.
    pub fn open(dir: &Path, cache_bytes: usize) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Open(e.to_string()))?;
        let db = redb::Builder::new()
            .set_cache_size(cache_bytes)
            .create(dir.join("imgate.redb"))
            .map_err(|e| StoreError::Open(e.to_string()))?;
        // Create the tables so readers never see them missing.
        let txn = db
            .begin_write()
            .map_err(|e| StoreError::Open(e.to_string()))?;
        {
            let open =
                |r: Result<(), redb::TableError>| r.map_err(|e| StoreError::Open(e.to_string()));
            open(txn.open_table(INBOX).map(drop))?;
            open(txn.open_table(CURSORS).map(drop))?;
            open(txn.open_table(DEDUPE).map(drop))?;
            open(txn.open_table(DEDUPE_ORDER).map(drop))?;
            txn.delete_table(RETIRED_DEDUPE_COUNT)
                .map_err(|e| StoreError::Open(e.to_string()))?;
            open(txn.open_table(FRIENDS).map(drop))?;
        }
        txn.commit().map_err(|e| StoreError::Open(e.to_string()))?;
        Ok(RedbStore { db })
    }

    /// Applies batches in one transaction. With `sync`, it is on disk when this returns.
    pub fn commit(&self, batches: &[&WriteBatch], sync: bool) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(commit_err)?;
        txn.set_durability(if sync {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(commit_err)?;
        {
            let mut inbox = txn.open_table(INBOX).map_err(commit_err)?;
            let mut cursors = txn.open_table(CURSORS).map_err(commit_err)?;
            let mut dedupe = txn.open_table(DEDUPE).map_err(commit_err)?;
            let mut order = txn.open_table(DEDUPE_ORDER).map_err(commit_err)?;
            let mut friends = txn.open_table(FRIENDS).map_err(commit_err)?;
            for batch in batches {
                for (owner, m) in &batch.appends {
                    let bytes = proto::Message::from(&**m).encode_to_vec();
                    inbox
                        .insert((owner.as_str(), m.seq), bytes.as_slice())
                        .map_err(commit_err)?;
                }
                for (uid, cmid, seq) in &batch.dedupe {
                    let last = order
                        .range((uid.as_str(), 0)..=(uid.as_str(), u64::MAX))
                        .map_err(commit_err)?
                        .next_back()
                        .transpose()
                        .map_err(commit_err)?
                        .map(|(k, _)| k.value().1);
                    let n = last.unwrap_or(0) + 1;
                    dedupe
                        .insert((uid.as_str(), cmid.as_str()), (*seq, n))
                        .map_err(commit_err)?;
                    order
                        .insert((uid.as_str(), n), cmid.as_str())
                        .map_err(commit_err)?;
                    // Forget the oldest key once more than DEDUPE_KEEP are kept.
                    if n > DEDUPE_KEEP as u64 {
                        let old = n - DEDUPE_KEEP as u64;
                        let gone = order
                            .remove((uid.as_str(), old))
                            .map_err(commit_err)?
                            .map(|v| v.value().to_owned());
                        if let Some(old_cmid) = gone {
                            let key = (uid.as_str(), old_cmid.as_str());
                            let at = dedupe.get(key).map_err(commit_err)?.map(|v| v.value().1);
                            // Only if no newer send reused the same id.
                            if at == Some(old) {
                                dedupe.remove(key).map_err(commit_err)?;
                            }
                        }
                    }
                }
                for (uid, device, seq) in &batch.cursors {
                    let key = (uid.as_str(), device.as_str());
                    let cur = cursors
                        .get(key)
                        .map_err(commit_err)?
                        .map(|v| v.value())
                        .unwrap_or(0);
                    if *seq > cur {
                        cursors.insert(key, *seq).map_err(commit_err)?;
                    }
                }
                for (a, b, present) in &batch.friendships {
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
        }
        txn.commit().map_err(commit_err)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>,
    ) -> Option<T> {
        let txn = self.db.begin_read().ok()?;
        match f(&txn) {
            Ok(v) => Some(v),
            Err(e) => {
                log::error!("store read failed: {e}");
                None
            }
        }
    }
}

impl Store for RedbStore {
    fn commit(&self, batches: &[&WriteBatch], sync: bool) -> Result<(), String> {
        RedbStore::commit(self, batches, sync).map_err(|e| e.to_string())
    }
}

impl StoreRead for RedbStore {
    fn max_seq(&self, uid: &str) -> u64 {
        self.read(|txn| {
            let t = txn.open_table(INBOX)?;
            let last = t.range((uid, 0)..=(uid, u64::MAX))?.next_back();
            Ok(match last {
                Some(entry) => entry?.0.value().1,
                None => 0,
            })
        })
        .unwrap_or(0)
    }

    fn messages_after(&self, uid: &str, after: u64, limit: usize) -> Vec<StoredMessage> {
        if after == u64::MAX {
            return Vec::new();
        }
        self.read(|txn| {
            let t = txn.open_table(INBOX)?;
            let mut out = Vec::new();
            for entry in t.range((uid, after + 1)..=(uid, u64::MAX))?.take(limit) {
                let (_, v) = entry?;
                match proto::Message::decode(v.value()) {
                    Ok(m) => out.push(m.into()),
                    Err(e) => {
                        log::error!("corrupt message in the inbox of {uid}: {e}");
                        break;
                    }
                }
            }
            Ok(out)
        })
        .unwrap_or_default()
    }

    fn cursor(&self, uid: &str, device_id: &str) -> u64 {
        self.read(|txn| {
            let t = txn.open_table(CURSORS)?;
            Ok(t.get((uid, device_id))?.map(|v| v.value()).unwrap_or(0))
        })
        .unwrap_or(0)
    }

    fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
        self.read(|txn| scan_prefix(&txn.open_table(CURSORS)?, uid, |v| v))
            .unwrap_or_default()
    }

    fn dedupe(&self, uid: &str, client_msg_id: &str) -> Option<u64> {
        self.read(|txn| {
            let t = txn.open_table(DEDUPE)?;
            Ok(t.get((uid, client_msg_id))?.map(|v| v.value().0))
        })
        .flatten()
    }

    fn friends(&self, uid: &str) -> Vec<String> {
        self.read(|txn| scan_prefix(&txn.open_table(FRIENDS)?, uid, |()| ()))
            .map(|v| v.into_iter().map(|(friend, ())| friend).collect())
            .unwrap_or_default()
    }
}

/// Every `(uid, key) -> value` entry of a table keyed by `(uid, key)`, in key order.
fn scan_prefix<V, T>(
    table: &redb::ReadOnlyTable<(&str, &str), V>,
    uid: &str,
    value: impl Fn(V::SelfType<'_>) -> T,
) -> Result<Vec<(String, T)>, redb::Error>
where
    V: redb::Value + 'static,
{
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, text: &str) -> StoredMessage {
        StoredMessage {
            seq,
            from_uid: "a".into(),
            to_uid: "b".into(),
            client_msg_id: format!("c{seq}"),
            from_device: "d".into(),
            content: text.as_bytes().to_vec(),
            server_time_ms: 5,
        }
    }

    #[test]
    fn survives_reopen_and_reads_what_it_wrote() {
        let dir = std::env::temp_dir().join(format!("imgate-redb-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        {
            let s = RedbStore::open(&dir, 1 << 20).unwrap();
            let batch = WriteBatch {
                appends: (1..=3)
                    .map(|i| ("b".to_owned(), std::sync::Arc::new(msg(i, "hi"))))
                    .collect(),
                dedupe: vec![("a".into(), "c1".into(), 1)],
                cursors: vec![("b".into(), "phone".into(), 2)],
                friendships: vec![
                    ("a".into(), "b".into(), true),
                    ("a".into(), "c".into(), true),
                ],
            };
            s.commit(&[&batch], true).unwrap();
        }
        let s = RedbStore::open(&dir, 1 << 20).unwrap();
        assert_eq!(s.max_seq("b"), 3);
        assert_eq!(s.max_seq("a"), 0);
        assert_eq!(
            s.messages_after("b", 1, 10),
            vec![msg(2, "hi"), msg(3, "hi")]
        );
        assert_eq!(s.messages_after("b", 0, 1).len(), 1);
        assert_eq!(s.cursor("b", "phone"), 2);
        assert_eq!(s.cursors("b"), vec![("phone".to_owned(), 2)]);
        assert!(s.cursors("a").is_empty());
        assert_eq!(s.dedupe("a", "c1"), Some(1));
        assert_eq!(s.friends("a"), vec!["b".to_owned(), "c".to_owned()]);
        assert_eq!(s.friends("b"), vec!["a".to_owned()]);
        // Cursors never move back; friendships can be removed.
        let batch = WriteBatch {
            cursors: vec![("b".into(), "phone".into(), 1)],
            friendships: vec![("b".into(), "a".into(), false)],
            ..WriteBatch::default()
        };
        s.commit(&[&batch], false).unwrap();
        assert_eq!(s.cursor("b", "phone"), 2);
        assert!(s.friends("a") == vec!["c".to_owned()] && s.friends("b").is_empty());
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keeps_the_newest_dedupe_keys() {
        let dir = std::env::temp_dir().join(format!("imgate-redb-dedupe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = RedbStore::open(&dir, 1 << 20).unwrap();
        let n = DEDUPE_KEEP as u64 + 10;
        let batch = WriteBatch {
            dedupe: (1..=n)
                .map(|i| ("a".to_owned(), format!("k{i}"), i))
                .collect(),
            ..WriteBatch::default()
        };
        s.commit(&[&batch], false).unwrap();
        assert_eq!(s.dedupe("a", "k1"), None, "the oldest are forgotten");
        assert_eq!(s.dedupe("a", "k11"), Some(11), "the newest 1000 are kept");
        assert_eq!(s.dedupe("a", &format!("k{n}")), Some(n));
        // A forgotten id used again is a new key; forgetting its old entry must not drop it.
        let reuse = |id: &str, seq| WriteBatch {
            dedupe: vec![("a".to_owned(), id.to_owned(), seq)],
            ..WriteBatch::default()
        };
        s.commit(&[&reuse("k5", n + 1)], false).unwrap();
        let fillers: Vec<WriteBatch> = (0..DEDUPE_KEEP as u64)
            .map(|i| reuse(&format!("f{i}"), n + 2 + i))
            .collect();
        let fillers: Vec<&WriteBatch> = fillers.iter().collect();
        // k11..k1010 and then the filler keys push out k5's old number long before its new one.
        s.commit(&fillers[..DEDUPE_KEEP - 10], false).unwrap();
        assert_eq!(
            s.dedupe("a", "k5"),
            Some(n + 1),
            "the reused id is still known"
        );
        s.commit(&fillers[DEDUPE_KEEP - 10..], false).unwrap();
        assert_eq!(
            s.dedupe("a", "k5"),
            None,
            "and forgotten after 1000 newer ones"
        );
        drop(s);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_older_data_dir_keeps_its_dedupe_numbering_and_loses_the_counter_table() {
        let dir = std::env::temp_dir().join(format!("imgate-redb-counter-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        {
            // The earlier layout: keys 1..=3 of "a", counted in a table of their own.
            let db = Database::create(dir.join("imgate.redb")).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut order = txn.open_table(DEDUPE_ORDER).unwrap();
                let mut dedupe = txn.open_table(DEDUPE).unwrap();
                for n in 1..=3u64 {
                    let id = format!("k{n}");
                    order.insert(("a", n), id.as_str()).unwrap();
                    dedupe.insert(("a", id.as_str()), (n, n)).unwrap();
                }
                txn.open_table(RETIRED_DEDUPE_COUNT)
                    .unwrap()
                    .insert("a", 3)
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let s = RedbStore::open(&dir, 1 << 20).unwrap();
        let batch = WriteBatch {
            dedupe: vec![("a".to_owned(), "k4".to_owned(), 9)],
            ..WriteBatch::default()
        };
        s.commit(&[&batch], false).unwrap();
        let txn = s.db.begin_read().unwrap();
        let names: Vec<String> = txn
            .list_tables()
            .unwrap()
            .map(|t| redb::TableHandle::name(&t).to_owned())
            .collect();
        assert!(!names.iter().any(|n| n == "dedupe_count"), "{names:?}");
        let order = txn.open_table(DEDUPE_ORDER).unwrap();
        assert_eq!(order.get(("a", 4)).unwrap().unwrap().value(), "k4");
        assert_eq!(s.dedupe("a", "k1"), Some(1));
        assert_eq!(s.dedupe("a", "k4"), Some(9));
        drop((order, txn, s));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
