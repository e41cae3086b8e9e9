//! An in-memory store: the reference semantics for tests of the IM core.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::assign::Assigner;
use super::{
    Presence, ReadError, Sent, StoreRead, StoredBatch, StoredMessage, WriteBatch, DEDUPE_KEEP,
};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inboxes: HashMap<String, BTreeMap<u64, StoredMessage>>,
    /// Idempotency keys per user, in send order.
    sends: HashMap<String, VecDeque<(String, u64)>>,
    cursors: HashMap<(String, String), u64>,
    friends: HashMap<String, BTreeSet<String>>,
    groups: HashMap<String, BTreeSet<String>>,
    user_groups: HashMap<String, BTreeSet<String>>,
    assigner: Assigner,
    /// Presence across a cluster, as Redis holds it (a user not named is offline at version
    /// 0); None for a store without it, as the embedded store is.
    pub presence: Option<Vec<(String, Presence)>>,
}

impl MemoryStore {
    /// Commits a batch as the embedded store does: seqs assigned, sends deduped, then
    /// applied. Answers each send.
    ///
    /// # Panics
    /// If a read fails, which this store's reads never do.
    pub fn apply(&mut self, batch: &WriteBatch) -> Vec<Sent> {
        let mut assigner = std::mem::take(&mut self.assigner);
        let resolved = assigner.resolve(&[batch], self);
        let resolved = resolved.expect("memory reads do not fail");
        for b in &resolved.batches {
            self.apply_stored(b);
        }
        let mut answers = assigner.applied(resolved);
        self.assigner = assigner;
        answers.pop().unwrap_or_default()
    }

    /// Applies a batch whose seqs are placed. Appends must continue each inbox without a gap.
    pub fn apply_stored(&mut self, batch: &StoredBatch) {
        for a in &batch.appends {
            let inbox = self.inboxes.entry(a.owner.to_string()).or_default();
            let next = inbox.keys().next_back().copied().unwrap_or(0) + 1;
            assert_eq!(
                a.msg.seq, next,
                "inbox of {} must grow by exactly 1",
                a.owner
            );
            inbox.insert(a.msg.seq, a.msg.clone());
        }
        for (uid, id, seq) in &batch.sends {
            let keys = self.sends.entry(uid.to_string()).or_default();
            keys.push_back((id.clone(), *seq));
            while keys.len() > DEDUPE_KEEP {
                keys.pop_front();
            }
        }
        for (uid, device, seq) in &batch.cursors {
            let c = self
                .cursors
                .entry((uid.to_string(), device.to_string()))
                .or_default();
            *c = (*c).max(*seq);
        }
        for (a, b, present) in &batch.friendships {
            for (x, y) in [(a, b), (b, a)] {
                let set = self.friends.entry(x.clone()).or_default();
                if *present {
                    set.insert(y.clone());
                } else {
                    set.remove(y);
                }
            }
        }
        for m in &batch.memberships {
            let members = self.groups.entry(m.gid.to_string()).or_default();
            let groups = self.user_groups.entry(m.uid.to_string()).or_default();
            if m.joined {
                members.insert(m.uid.to_string());
                groups.insert(m.gid.to_string());
            } else {
                members.remove(&*m.uid);
                groups.remove(&*m.gid);
            }
        }
    }
}

impl StoreRead for MemoryStore {
    fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
        Ok(self
            .inboxes
            .get(uid)
            .and_then(|i| i.keys().next_back().copied())
            .unwrap_or(0))
    }

    fn messages_after(
        &self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        Ok(self
            .inboxes
            .get(uid)
            .map(|i| {
                i.range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn cursor(&self, uid: &str, device_id: &str) -> u64 {
        self.cursors
            .get(&(uid.to_owned(), device_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .cursors
            .iter()
            .filter(|((u, _), _)| u == uid)
            .map(|((_, d), s)| (d.clone(), *s))
            .collect();
        v.sort();
        v
    }

    fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        Ok(self
            .sends
            .get(uid)
            .map(|k| k.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn friends(&self, uid: &str) -> Vec<String> {
        self.friends
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .groups
            .get(gid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
        Ok(self.groups.get(gid).map_or(0, BTreeSet::len))
    }

    fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        Ok(self.groups.get(gid).is_some_and(|s| s.contains(uid)))
    }

    fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
        Ok(self
            .user_groups
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default())
    }

    fn online(&self, uids: &[String]) -> Result<Option<Vec<Presence>>, ReadError> {
        Ok(self.presence.as_ref().map(|all| {
            let of = |uid: &String| all.iter().find(|(u, _)| u == uid).map(|(_, p)| *p);
            uids.iter().map(|u| of(u).unwrap_or_default()).collect()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_cursors_are_its_own_newest_per_device_by_device_id() {
        let mut s = MemoryStore::default();
        let mut b = WriteBatch::default();
        for (uid, device, seq) in [
            ("alice", "phone", 3),
            ("alice", "laptop", 5),
            ("bob", "phone", 7),
            ("alice", "phone", 2),
        ] {
            b.cursors.push((uid.into(), device.into(), seq));
        }
        s.apply(&b);
        assert_eq!(
            s.cursors("alice"),
            vec![("laptop".to_owned(), 5), ("phone".to_owned(), 3)]
        );
        assert_eq!(s.cursors("bob"), vec![("phone".to_owned(), 7)]);
        assert_eq!(s.cursors("carol"), vec![]);
    }
}
