//! An in-memory store: the reference semantics for tests of the IM core.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use super::{StoreRead, StoredMessage, WriteBatch, DEDUPE_KEEP};

#[derive(Debug, Default)]
pub struct MemoryStore {
    inboxes: HashMap<String, BTreeMap<u64, StoredMessage>>,
    dedupe: HashMap<String, (HashMap<String, u64>, VecDeque<String>)>,
    cursors: HashMap<(String, String), u64>,
    friends: HashMap<String, BTreeSet<String>>,
}

impl MemoryStore {
    /// Applies a batch. Appends must continue each inbox without a gap.
    pub fn apply(&mut self, batch: &WriteBatch) {
        for (owner, msg) in &batch.appends {
            let inbox = self.inboxes.entry(owner.clone()).or_default();
            let next = inbox.keys().next_back().copied().unwrap_or(0) + 1;
            assert_eq!(msg.seq, next, "inbox of {owner} must grow by exactly 1");
            inbox.insert(msg.seq, (**msg).clone());
        }
        for (uid, id, seq) in &batch.dedupe {
            let (map, order) = self.dedupe.entry(uid.clone()).or_default();
            if map.insert(id.clone(), *seq).is_none() {
                order.push_back(id.clone());
            }
            while order.len() > DEDUPE_KEEP {
                if let Some(old) = order.pop_front() {
                    map.remove(&old);
                }
            }
        }
        for (uid, device, seq) in &batch.cursors {
            let c = self
                .cursors
                .entry((uid.clone(), device.clone()))
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
    }
}

impl StoreRead for MemoryStore {
    fn max_seq(&self, uid: &str) -> u64 {
        self.inboxes
            .get(uid)
            .and_then(|i| i.keys().next_back().copied())
            .unwrap_or(0)
    }

    fn messages_after(&self, uid: &str, after: u64, limit: usize) -> Vec<StoredMessage> {
        self.inboxes
            .get(uid)
            .map(|i| {
                i.range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, m)| m.clone())
                    .collect()
            })
            .unwrap_or_default()
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

    fn dedupe(&self, uid: &str, client_msg_id: &str) -> Option<u64> {
        self.dedupe.get(uid)?.0.get(client_msg_id).copied()
    }

    fn friends(&self, uid: &str) -> Vec<String> {
        self.friends
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}
