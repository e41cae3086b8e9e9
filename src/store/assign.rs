//! Seqs and dedupe for the embedded stores: turns the core's [`WriteBatch`]es, whose sends
//! have no seq yet, into [`StoredBatch`]es with every append placed, and answers each send.
//!
//! Only the storage thread commits, so the store is the one writer of every inbox: the next
//! seq of an inbox is its stored maximum plus one, and an idempotency key is new unless the
//! store or an earlier send of the same commit holds it.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use super::filter::SendFilter;
use super::{Append, ReadError, Sent, StoreRead, StoredBatch, StoredMessage, WriteBatch};

/// Senders whose send filters are kept, at most. A filter takes 64 B to 8 KiB (a sender of
/// the full [`super::DEDUPE_KEEP`] ids), so this holds at most 128 MiB; a sender whose
/// filter was dropped has it rebuilt from the store at its next send.
const MAX_FILTERS: usize = 16_384;

/// Inboxes whose newest seq is kept, at most (about 64 bytes each).
const MAX_SEQS: usize = 65_536;

/// Assigns seqs and dedupes sends across commits. It keeps the newest seq of recently
/// written inboxes, so that an append costs no read, and one [`SendFilter`] per recent
/// sender, so that a new id (nearly every one) is known new without one either.
///
/// Invariants: a kept seq is the inbox's stored maximum, because the store learns of a
/// commit's seqs only once it is applied ([`Assigner::applied`]); a kept filter covers every
/// idempotency key of its sender the store holds, because every key the store gets passes
/// through [`Assigner::resolve`] first.
#[derive(Debug, Default)]
pub(crate) struct Assigner {
    /// Keyed per process, so that ids cannot be chosen to collide.
    hasher: RandomState,
    filters: HashMap<Arc<str>, SendFilter>,
    seqs: HashMap<Arc<str>, u64>,
}

/// Batches placed by [`Assigner::resolve`]: apply `batches`, then hand `seqs` to
/// [`Assigner::applied`].
pub(crate) struct Resolved {
    pub(crate) batches: Vec<StoredBatch>,
    /// The answers to each batch's sends.
    pub(crate) answers: Vec<Vec<Sent>>,
    seqs: HashMap<Arc<str>, u64>,
}

/// The state of one commit: the inboxes' next seqs and the keys its earlier sends took,
/// neither of which the store can tell until the commit is applied. The keys are searched
/// only when a sender's filter matches (a retry, or rarely a new id), so a list does.
#[derive(Default)]
struct Commit<'a> {
    next: HashMap<Arc<str>, u64>,
    keys: Vec<(&'a str, &'a str, u64)>,
}

impl Assigner {
    /// Places every send of `batches` (in order) on the store's state as `store` reads it,
    /// and answers each, batch by batch.
    ///
    /// Errors: a read the seqs or the dedupe depend on failed; nothing may then be applied.
    pub(crate) fn resolve(
        &mut self,
        batches: &[&WriteBatch],
        store: &dyn StoreRead,
    ) -> Result<Resolved, ReadError> {
        let mut commit = Commit::default();
        let mut stored = Vec::with_capacity(batches.len());
        let mut answers = Vec::with_capacity(batches.len());
        for &b in batches {
            let mut out = StoredBatch {
                appends: Vec::with_capacity(b.sends.len() * 2),
                sends: Vec::with_capacity(b.sends.len()),
                cursors: b.cursors.clone(),
                friendships: b.friendships.clone(),
                memberships: b.memberships.clone(),
            };
            let mut sents = Vec::with_capacity(b.sends.len());
            for s in &b.sends {
                let hash = self.hasher.hash_one(s.client_msg_id.as_str());
                if let Some(seq) = self.earlier(&s.from, &s.client_msg_id, hash, &commit, store)? {
                    sents.push(Sent {
                        seq,
                        duplicate: true,
                        to_seqs: Vec::new(),
                    });
                    continue;
                }
                let mut seq_of = |owner: &Arc<str>| -> Result<u64, ReadError> {
                    let next = match commit.next.get_mut(owner) {
                        Some(n) => n,
                        None => {
                            let max = match self.seqs.get(owner) {
                                Some(max) => *max,
                                None => store.max_seq(owner)?,
                            };
                            commit.next.entry(owner.clone()).or_insert(max)
                        }
                    };
                    *next += 1;
                    out.appends.push(Append {
                        owner: owner.clone(),
                        msg: StoredMessage {
                            seq: *next,
                            server_time_ms: s.server_time_ms,
                            body: s.body.clone(),
                        },
                    });
                    Ok(*next)
                };
                let seq = seq_of(&s.from)?;
                let mut to_seqs = Vec::with_capacity(s.to.len());
                for owner in s.to.iter().filter(|o| **o != s.from) {
                    to_seqs.push(seq_of(owner)?);
                }
                // `earlier` made the sender's filter.
                if let Some(f) = self.filters.get_mut(&s.from) {
                    f.insert(hash);
                }
                commit.keys.push((&s.from, &s.client_msg_id, seq));
                out.sends
                    .push((s.from.clone(), s.client_msg_id.clone(), seq));
                sents.push(Sent {
                    seq,
                    duplicate: false,
                    to_seqs,
                });
            }
            stored.push(out);
            answers.push(sents);
        }
        Ok(Resolved {
            batches: stored,
            answers,
            seqs: commit.next,
        })
    }

    /// The batches of `r` are applied: their inboxes' seqs are the stored ones now.
    pub(crate) fn applied(&mut self, r: Resolved) -> Vec<Vec<Sent>> {
        for (uid, seq) in r.seqs {
            if self.seqs.len() >= MAX_SEQS && !self.seqs.contains_key(&uid) {
                if let Some(old) = self.seqs.keys().next().cloned() {
                    self.seqs.remove(&old);
                }
            }
            self.seqs.insert(uid, seq);
        }
        r.answers
    }

    /// The sender-inbox seq of an earlier send of `from` with this id: one of this commit,
    /// or one the store keeps. Builds the sender's filter at its first send.
    fn earlier(
        &mut self,
        from: &Arc<str>,
        client_msg_id: &str,
        hash: u64,
        commit: &Commit<'_>,
        store: &dyn StoreRead,
    ) -> Result<Option<u64>, ReadError> {
        if !self.filter(from, commit, store)?.may_contain(hash) {
            return Ok(None);
        }
        let same = |(uid, id, _): &&(&str, &str, u64)| *uid == &**from && *id == client_msg_id;
        if let Some((_, _, seq)) = commit.keys.iter().rev().find(same) {
            return Ok(Some(*seq));
        }
        store.sent(from, client_msg_id)
    }

    /// The sender's filter, (re)built from the store's newest keys and this commit's when it
    /// is missing or must grow.
    fn filter(
        &mut self,
        from: &Arc<str>,
        commit: &Commit<'_>,
        store: &dyn StoreRead,
    ) -> Result<&mut SendFilter, ReadError> {
        if self.filters.get(from).is_none_or(SendFilter::must_grow) {
            // Oldest first: the store's keys precede this commit's.
            let mut hashes: Vec<(u64, u64)> = store
                .recent_sends(from)?
                .iter()
                .map(|(id, seq)| (*seq, self.hasher.hash_one(id.as_str())))
                .collect();
            hashes.extend(
                commit
                    .keys
                    .iter()
                    .filter(|(uid, _, _)| *uid == &**from)
                    .map(|(_, id, seq)| (*seq, self.hasher.hash_one(*id))),
            );
            hashes.sort_unstable_by_key(|(seq, _)| *seq);
            if self.filters.len() >= MAX_FILTERS && !self.filters.contains_key(from) {
                if let Some(old) = self.filters.keys().next().cloned() {
                    self.filters.remove(&old);
                }
            }
            let f = SendFilter::with(hashes.into_iter().map(|(_, h)| h).collect());
            self.filters.insert(from.clone(), f);
        }
        Ok(self
            .filters
            .entry(from.clone())
            .or_insert_with(|| SendFilter::with(Vec::new())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::memory::MemoryStore;
    use crate::store::NewSend;

    fn send(from: &str, id: &str, to: &[&str]) -> NewSend {
        NewSend {
            from: from.into(),
            client_msg_id: id.into(),
            server_time_ms: 1,
            body: vec![1, 2, 3].into(),
            to: to.iter().map(|u| Arc::from(*u)).collect(),
        }
    }

    fn batch(sends: Vec<NewSend>) -> WriteBatch {
        WriteBatch {
            sends,
            ..WriteBatch::default()
        }
    }

    fn answers(sents: &[Sent]) -> Vec<(u64, bool, Vec<u64>)> {
        sents
            .iter()
            .map(|s| (s.seq, s.duplicate, s.to_seqs.clone()))
            .collect()
    }

    #[test]
    fn seqs_continue_each_inbox_across_the_batches_of_one_commit() {
        let store = MemoryStore::default();
        let mut a = Assigner::default();
        let one = batch(vec![send("a", "1", &["b"]), send("b", "2", &["a", "c"])]);
        let two = batch(vec![send("c", "3", &["a"])]);
        let r = a.resolve(&[&one, &two], &store).unwrap();
        let (stored, sents) = (&r.batches, &r.answers);
        assert_eq!(
            answers(&sents[0]),
            [(1, false, vec![1]), (2, false, vec![2, 1])]
        );
        assert_eq!(answers(&sents[1]), [(2, false, vec![3])]);
        let placed: Vec<(&str, u64)> = stored
            .iter()
            .flat_map(|b| &b.appends)
            .map(|a| (&*a.owner, a.msg.seq))
            .collect();
        assert_eq!(
            placed,
            [
                ("a", 1),
                ("b", 1),
                ("b", 2),
                ("a", 2),
                ("c", 1),
                ("c", 2),
                ("a", 3)
            ]
        );
        assert_eq!(stored[1].sends, vec![("c".into(), "3".to_string(), 2)]);
        // Never applied (the write failed): the next commit places the same seqs again.
        let again = a.resolve(&[&two], &store).unwrap();
        assert_eq!(answers(&again.answers[0]), [(1, false, vec![1])]);
        // Applied: the kept seqs continue without reading the store.
        let r = a.resolve(&[&two], &store).unwrap();
        a.applied(r);
        let next = a
            .resolve(&[&batch(vec![send("a", "4", &[])])], &store)
            .unwrap();
        assert_eq!(answers(&next.answers[0]), [(2, false, vec![])]);
    }

    #[test]
    fn a_retry_is_found_in_the_same_commit_and_in_the_store() {
        let mut store = MemoryStore::default();
        let sents = store.apply(&batch(vec![send("a", "x", &["b"]), send("a", "x", &["b"])]));
        assert_eq!(answers(&sents), [(1, false, vec![1]), (1, true, vec![])]);
        // A store the assigner has not seen written: its keys are read back at first send.
        let mut fresh = Assigner::default();
        let r = fresh
            .resolve(
                &[&batch(vec![send("a", "x", &["b"]), send("a", "y", &[])])],
                &store,
            )
            .unwrap();
        assert_eq!(
            answers(&r.answers[0]),
            [(1, true, vec![]), (2, false, vec![])]
        );
        assert_eq!(r.batches[0].appends.len(), 1, "only the new send is placed");
    }

    #[test]
    fn a_failed_read_fails_the_whole_commit() {
        struct NoSeq(MemoryStore);
        impl StoreRead for NoSeq {
            fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
                if uid == "b" {
                    return Err(ReadError("disk on fire".into()));
                }
                self.0.max_seq(uid)
            }
            fn messages_after(
                &self,
                uid: &str,
                after: u64,
                limit: usize,
            ) -> Result<Vec<StoredMessage>, ReadError> {
                self.0.messages_after(uid, after, limit)
            }
            fn cursor(&self, uid: &str, device_id: &str) -> u64 {
                self.0.cursor(uid, device_id)
            }
            fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
                self.0.cursors(uid)
            }
            fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
                self.0.recent_sends(uid)
            }
            fn friends(&self, uid: &str) -> Vec<String> {
                self.0.friends(uid)
            }
            fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
                self.0.group_members(gid)
            }
            fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
                self.0.group_size(gid)
            }
            fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
                self.0.is_member(gid, uid)
            }
            fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
                self.0.groups_of(uid)
            }
        }
        let store = NoSeq(MemoryStore::default());
        let b = batch(vec![send("a", "1", &[]), send("a", "2", &["b"])]);
        let r = Assigner::default().resolve(&[&b], &store);
        assert_eq!(r.err().map(|e| e.0), Some("disk on fire".into()));
    }
}
