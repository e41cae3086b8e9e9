//! The group commit: every write of a loop turn goes into one [`WriteBatch`], taken once per
//! turn and committed off the network thread. Until the shell reports a batch durable, the
//! acknowledgements of its sends wait beside it and its messages are not delivered, so that
//! nothing a client was told about can be lost.

use std::sync::Arc;

use super::delivery::RECENT_KEEP;
use super::{BatchId, ConnId, Core, Now};
use crate::store::{StoreRead, WriteBatch};

impl Core {
    /// The id the writes made since the last [`Core::take_batch`] will be committed under.
    pub fn pending_batch_id(&self) -> BatchId {
        self.next_batch
    }

    /// The writes of this turn, if any. Commit it, then call [`Core::on_committed`].
    pub fn take_batch(&mut self) -> Option<(BatchId, Arc<WriteBatch>)> {
        if self.batch.is_empty() {
            // Only answers to duplicates of pending sends: they wait for the newest batch in
            // flight, which holds or follows the originals, instead of a commit of their own.
            if let Some((_, _, waiting)) = self.in_flight.back_mut() {
                waiting.append(&mut self.deferred);
            }
            if self.deferred.is_empty() {
                return None;
            }
        }
        let id = self.next_batch;
        self.next_batch += 1;
        // The next turn likely writes as much: room for it at once, not by doubling.
        let next = WriteBatch {
            appends: Vec::with_capacity(self.batch.appends.len()),
            sends: Vec::with_capacity(self.batch.sends.len()),
            ..WriteBatch::default()
        };
        let batch = Arc::new(std::mem::replace(&mut self.batch, next));
        let room = self.deferred.len();
        let deferred = std::mem::replace(&mut self.deferred, Vec::with_capacity(room));
        self.in_flight.push_back((id, batch.clone(), deferred));
        Some((id, batch))
    }

    /// The batch `id` (and every one taken before it) is durable: acknowledge and deliver.
    pub fn on_committed(&mut self, id: BatchId, now: Now, store: &dyn StoreRead) {
        let mut touched: Vec<Arc<str>> = Vec::new();
        let mut conns: Vec<ConnId> = Vec::new();
        while self.in_flight.front().is_some_and(|(b, _, _)| *b <= id) {
            let Some((bid, batch, deferred)) = self.in_flight.pop_front() else {
                break;
            };
            for a in &batch.appends {
                let Some(user) = self.users.get_mut(&*a.owner) else {
                    continue;
                };
                user.committed_seq = a.msg.seq;
                user.uncommitted -= 1;
                user.recent.push_back(a.msg.clone());
                if user.recent.len() > RECENT_KEEP {
                    user.recent.pop_front();
                }
                // Each user once, in order of first append (a sort would reorder deliveries).
                if user.touched_by != bid {
                    user.touched_by = bid;
                    touched.push(a.owner.clone());
                }
            }
            self.out.extend(deferred);
            for (a, b, present) in &batch.friendships {
                self.friendship_committed(a, b, *present);
            }
            for m in &batch.memberships {
                self.membership_committed(m);
            }
            for uid in touched.drain(..) {
                if let Some(u) = self.users.get(&uid) {
                    conns.extend(u.devices.values());
                }
                for conn in conns.drain(..) {
                    self.pump(conn, now, store);
                }
                self.trim_recent(&uid);
                self.maybe_evict(&uid);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::delivery::RECENT_KEEP;
    use super::super::harness::{messages_to, send_ok, H};
    use super::super::{ImConfig, Output};
    use crate::im::proto::{self, client_frame::Body as C};
    use crate::store::StoreRead;

    #[test]
    fn send_is_acknowledged_only_when_durable_and_appends_to_both_inboxes() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        let before: Vec<Output> = h.core.drain_output().collect();
        assert!(send_ok(&before, 1).is_none(), "no SendOk before the commit");
        assert!(
            messages_to(&before, 2).is_empty(),
            "no delivery before the commit"
        );
        let (id, batch) = h.core.take_batch().unwrap();
        assert_eq!(batch.appends.len(), 2);
        h.store.apply(&batch);
        h.core.on_committed(id, h.now, &h.store);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(
            send_ok(&out, 1).map(|s| (s.seq, s.duplicate)),
            Some((1, false))
        );
        assert_eq!(messages_to(&out, 2), vec![(1, "hi".into())]);
        assert!(
            messages_to(&out, 1).is_empty(),
            "not echoed to the sending device"
        );
        // Each inbox has its own seq; a message to oneself is stored once.
        h.send(2, "alice", "m2", "yo");
        h.send(1, "alice", "self", "note");
        assert_eq!(h.store.max_seq("alice"), Ok(3));
        assert_eq!(h.store.max_seq("bob"), Ok(2));
    }

    #[test]
    fn an_offline_users_cache_is_dropped_once_its_appends_are_durable() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        assert!(
            h.core.users.contains_key("bob"),
            "bob's inbox is written through the cache"
        );
        h.turn();
        assert!(
            !h.core.users.contains_key("bob"),
            "the cache of a user with no device online outlived the commit"
        );
        assert!(
            h.core.users.contains_key("alice"),
            "an online user's cache was dropped"
        );
    }

    #[test]
    fn a_device_lagging_by_up_to_16_messages_is_fed_from_memory_and_one_lagging_more_reads_the_store(
    ) {
        let mut h = H::new(ImConfig {
            delivery_window: 1,
            rate_burst: 1000.0,
            ..ImConfig::default()
        });
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        let lag = RECENT_KEEP as u64;
        for i in 1..=lag + 1 {
            h.send(1, "bob", &format!("m{i}"), &format!("t{i}"));
        }
        // Bob has 1 and waits for its ack; the 16 after it are still in memory.
        for seq in 1..=lag {
            let (out, reads) = h.req_failing(2, 0, C::Ack(proto::Ack { seq }), "bob");
            assert_eq!(
                messages_to(&out, 2),
                vec![(seq + 1, format!("t{}", seq + 1))]
            );
            assert_eq!(reads.calls, 0, "the store was read for {}", seq + 1);
        }
        // Lagging by 17: the oldest of them has left the cache.
        for i in lag + 2..=2 * lag + 2 {
            h.send(1, "bob", &format!("m{i}"), &format!("t{i}"));
        }
        let (out, reads) = h.req_failing(2, 0, C::Ack(proto::Ack { seq: lag + 1 }), "");
        assert_eq!(
            messages_to(&out, 2),
            vec![(lag + 2, format!("t{}", lag + 2))]
        );
        assert_eq!(reads.calls, 1);
    }
}
