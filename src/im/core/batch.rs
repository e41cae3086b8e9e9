//! The group commit: every write of a loop turn goes into one [`WriteBatch`], taken once per
//! turn and committed off the network thread. Until the shell reports a batch durable, with
//! the store's answer to each of its sends, nothing in it is acknowledged or delivered, so
//! that nothing a client was told about can be lost.

use std::sync::Arc;

use super::route::{ClusterOp, Published};
use super::{error, BatchId, Core, InFlight, Now, Output, Requester};
use crate::im::proto::ErrorCode;

/// Why a send was not acknowledged when the store did not confirm it.
const SEND_UNCONFIRMED: &str =
    "the store did not confirm the send; send it again with the same client_msg_id";
use crate::store::{Sent, StoredMessage, WriteBatch};

impl Core {
    /// The id the writes made since the last [`Core::take_batch`] will be committed under.
    pub fn pending_batch_id(&self) -> BatchId {
        self.next_batch
    }

    /// The writes of this turn, if any. Commit it, then call [`Core::on_committed`].
    pub fn take_batch(&mut self) -> Option<(BatchId, Arc<WriteBatch>)> {
        if self.batch.is_empty() {
            return None;
        }
        let id = self.next_batch;
        self.next_batch += 1;
        // The next turn likely writes as much: room for it at once, not by doubling.
        let next = WriteBatch {
            sends: Vec::with_capacity(self.batch.sends.len()),
            ..WriteBatch::default()
        };
        let batch = Arc::new(std::mem::replace(&mut self.batch, next));
        let room = self.requesters.len();
        let requesters = std::mem::replace(&mut self.requesters, Vec::with_capacity(room));
        self.in_flight.push_back(InFlight {
            id,
            batch: batch.clone(),
            requesters,
        });
        Some((id, batch))
    }

    /// The batch `id` is durable, and `sents` answer its sends in order: acknowledge them
    /// (a duplicate with the seq the first attempt got) and deliver what they appended.
    /// Batches are reported in the order they were taken; a report of another batch than the
    /// oldest in flight is ignored (logged).
    pub fn on_committed(&mut self, id: BatchId, sents: &[Sent], now: Now) {
        self.on_committed_together(&[(id, sents)], now);
    }

    /// Batches made durable by one commit, in the order they were taken, each with the
    /// answers to its sends: as [`Core::on_committed`] for each, except that what they
    /// appended is learnt in seq order across all of them, since a store may number one
    /// commit's appends in another order than its batches and sends (Redis appends every
    /// sender's copy before the references to it).
    pub fn on_committed_together(&mut self, answers: &[(BatchId, &[Sent])], now: Now) {
        let mut appends: Vec<(Arc<str>, u64, Published)> = Vec::new();
        let mut done: Vec<Arc<WriteBatch>> = Vec::new();
        let mut last = None;
        for &(id, sents) in answers {
            let Some(InFlight {
                batch, requesters, ..
            }) = self.answered(id, "durable")
            else {
                continue;
            };
            last = Some(id);
            if sents.len() != batch.sends.len() {
                log::error!(
                    "batch {id}: {} answers to {} sends",
                    sents.len(),
                    batch.sends.len()
                );
            }
            for ((send, sent), req) in batch.sends.iter().zip(sents).zip(requesters) {
                if let Some(req) = req {
                    if !sent.duplicate {
                        self.learn_own(req, &send.from, sent.seq);
                    }
                    self.out.push(Self::acknowledgement(
                        req,
                        sent.seq,
                        sent.duplicate,
                        send.server_time_ms,
                    ));
                }
                let owners = std::iter::once(&send.from).zip(std::iter::once(&sent.seq));
                for (owner, &seq) in owners.chain(send.to.iter().zip(&sent.to_seqs)) {
                    // A duplicate's first attempt, unseen here (refused, or made on another
                    // node), may differ from it (its time, its content): the store's copy is
                    // the message, and the devices read it from there.
                    let news = if sent.duplicate {
                        Published::Tip(seq)
                    } else {
                        Published::Message(StoredMessage {
                            seq,
                            server_time_ms: send.server_time_ms,
                            body: send.body.clone(),
                        })
                    };
                    appends.push((owner.clone(), seq, news));
                }
            }
            done.push(batch);
        }
        let Some(id) = last else {
            return;
        };
        // A stable sort: each inbox's appends are learnt one after the other.
        appends.sort_by_key(|(_, seq, _)| *seq);
        let mut touched: Vec<Arc<str>> = Vec::new();
        for (owner, _, news) in appends {
            let learned = self.learn(&owner, &news, now);
            // Each user once, in order of first append.
            if let Some(user) = self.users.get_mut(&*owner) {
                if learned && user.touched_by != id {
                    user.touched_by = id;
                    touched.push(owner.clone());
                }
            }
            self.route(ClusterOp::Publish { uid: owner, news });
        }
        for batch in &done {
            for (a, b, present) in &batch.friendships {
                self.friendship_committed(a, b, *present);
            }
            for m in &batch.memberships {
                self.membership_committed(m);
            }
        }
        for uid in touched {
            self.pump_user(&uid, now);
        }
    }

    /// The store did not confirm batch `id` (reported in the same order as commits): none of
    /// its sends is acknowledged or delivered, and each sender is told to send again with the
    /// same `client_msg_id` (UNAVAILABLE), which stores it exactly once however much of it
    /// the store did apply. For the same reason the groups whose membership it changed are
    /// read again at their next use.
    pub fn on_refused(&mut self, id: BatchId) {
        let Some(InFlight {
            batch, requesters, ..
        }) = self.answered(id, "refused")
        else {
            return;
        };
        for req in requesters.into_iter().flatten() {
            match req {
                Requester::Conn { conn, id } => {
                    self.reply(conn, error(id, ErrorCode::Unavailable, SEND_UNCONFIRMED))
                }
                Requester::Admin(admin) => self.out.push(Output::AdminRefused { admin }),
            }
        }
        for m in &batch.memberships {
            self.group_cache.forget(&m.gid);
            self.members_changed(&m.gid);
        }
    }

    /// Takes the oldest batch in flight, which the store answered (`how`); a report of
    /// another batch is ignored (logged).
    fn answered(&mut self, id: BatchId, how: &str) -> Option<InFlight> {
        let Some(front) = self.in_flight.front().map(|f| f.id) else {
            log::error!("batch {id} reported {how} with none in flight");
            return None;
        };
        if front != id {
            log::error!("batch {id} reported {how} before batch {front}");
            return None;
        }
        self.in_flight.pop_front()
    }

    /// The sending device learns its message's seq from SendOk, so its own stream skips
    /// it; told before the stream moves on, and only by the connection of the sender.
    fn learn_own(&mut self, req: Requester, from: &str, seq: u64) {
        let Requester::Conn { conn, .. } = req else {
            return;
        };
        let Some(dev) = self.sessions.get_mut(&conn).and_then(|s| s.device.as_mut()) else {
            return;
        };
        if &*dev.uid == from && seq > dev.sent_upto && dev.own.back().is_none_or(|s| *s < seq) {
            dev.own.push_back(seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::delivery::RECENT_KEEP;
    use super::super::harness::{error_code, messages_to, send_ok, H};
    use super::super::{ImConfig, Output, Target};
    use crate::im::proto::{self, client_frame::Body as C, ErrorCode};
    use crate::store::{Sent, StoreRead};

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
        assert_eq!(batch.sends.len(), 1);
        let sents = h.store.apply(&batch);
        h.core.on_committed(id, &sents, h.now);
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
    fn a_send_the_store_did_not_confirm_is_refused_and_its_retry_lands_once() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        let (id, batch) = h.core.take_batch().unwrap();
        // The store applied it, but its answer never came.
        h.store.apply(&batch);
        h.core.on_refused(id);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(error_code(&out, 1), Some(ErrorCode::Unavailable));
        assert!(send_ok(&out, 1).is_none());
        assert!(messages_to(&out, 2).is_empty(), "delivered unconfirmed");
        let out = h.send(1, "bob", "m1", "hi");
        assert_eq!(
            send_ok(&out, 1).map(|s| (s.seq, s.duplicate)),
            Some((1, true))
        );
        // This store names no seqs for a duplicate (Redis does): bob hears of the message
        // with the next one, whose seq shows the gap.
        let out = h.send(1, "bob", "m2", "more");
        assert_eq!(
            messages_to(&out, 2),
            vec![(1, "hi".into()), (2, "more".into())]
        );
        assert_eq!(h.store.max_seq("bob"), Ok(2), "stored once");
    }

    #[test]
    fn a_retry_whose_first_attempt_was_unseen_delivers_the_stored_first_attempt() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.login(3, "alice", "tablet", 0);
        h.send_uncommitted(1, "bob", "m1", "first");
        let (id, batch) = h.core.take_batch().unwrap();
        h.store.apply(&batch);
        h.core.on_refused(id);
        h.core.drain_output().for_each(drop);
        // The retry differs (its time, here its content too): the store keeps the first.
        let out = h.send(1, "bob", "m1", "second");
        assert_eq!(send_ok(&out, 1).map(|s| s.duplicate), Some(true));
        assert_eq!(
            messages_to(&out, 3),
            vec![(1, "first".into())],
            "alice's tablet"
        );
        let mut got = messages_to(&out, 2);
        got.extend(messages_to(&h.send(1, "bob", "m2", "next"), 2));
        assert_eq!(got, vec![(1, "first".into()), (2, "next".into())]);
    }

    #[test]
    fn one_commits_appends_numbered_out_of_batch_order_are_delivered_live_in_seq_order() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.login(3, "bob", "tablet", 0);
        h.send_uncommitted(1, "bob", "a1", "to bob");
        let (first, b1) = h.core.take_batch().unwrap();
        h.send_uncommitted(2, "carol", "b1", "from bob");
        let (second, b2) = h.core.take_batch().unwrap();
        // As Redis numbers them: every sender's copy first, then the references.
        let sents1 = vec![Sent {
            seq: 1,
            duplicate: false,
            to_seqs: vec![2],
        }];
        let sents2 = vec![Sent {
            seq: 1,
            duplicate: false,
            to_seqs: vec![1],
        }];
        h.store.apply(&b1);
        h.store.apply(&b2);
        h.core
            .on_committed_together(&[(first, &sents1), (second, &sents2)], h.now);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert_eq!(
            h.core.poll_read().map(|(_, r)| r),
            None,
            "nothing read from the store"
        );
        assert_eq!(
            messages_to(&out, 3),
            vec![(1, "from bob".into()), (2, "to bob".into())],
            "bob's tablet, live"
        );
        assert_eq!(messages_to(&out, 2), vec![(2, "to bob".into())]);
    }

    #[test]
    fn an_admin_send_the_store_did_not_confirm_is_answered_refused_and_later_batches_go_on() {
        let mut h = H::new(ImConfig::default());
        h.login(2, "bob", "phone", 0);
        let target = Target::User("bob");
        h.core
            .admin_send(5, "ops", target, "a1".into(), b"x".to_vec(), h.now)
            .unwrap();
        let (first, _) = h.core.take_batch().unwrap();
        h.send_uncommitted(2, "carol", "b1", "later");
        let (second, batch) = h.core.take_batch().unwrap();
        h.core.on_refused(first);
        let sents = h.store.apply(&batch);
        h.core.on_committed(second, &sents, h.now);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert!(
            matches!(out[0], Output::AdminRefused { admin: 5 }),
            "{out:?}"
        );
        assert_eq!(send_ok(&out, 2).map(|s| s.seq), Some(1));
        assert_eq!(h.store.max_seq("bob"), Ok(1), "only bob's own send");
    }

    #[test]
    fn send_ok_carries_the_messages_own_server_time_however_late_the_commit_is_reported() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        let accepted_at = h.now.unix_ms;
        h.send_uncommitted(1, "bob", "m1", "hi");
        h.now.unix_ms += 500;
        let out = h.turn();
        assert_eq!(
            send_ok(&out, 1).map(|s| s.server_time_ms),
            Some(accepted_at)
        );
        let stored = h.store.messages_after("bob", 0, 1).unwrap();
        assert_eq!(stored[0].server_time_ms, accepted_at);
    }

    #[test]
    fn a_send_to_an_offline_user_caches_nothing_of_it() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "hi");
        h.turn();
        assert!(
            !h.core.users.contains_key("bob"),
            "a user with no device online was cached"
        );
        assert!(h.core.users.contains_key("alice"));
        assert_eq!(h.store.max_seq("bob"), Ok(1));
    }

    #[test]
    fn a_commit_naming_a_seq_beyond_the_next_makes_the_device_read_the_gap_from_the_store() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        // Another writer (a node of a cluster) appends to bob's inbox unseen by this core.
        let elsewhere = crate::store::WriteBatch {
            sends: vec![crate::store::NewSend {
                from: "carol".into(),
                client_msg_id: "c1".into(),
                server_time_ms: 5,
                body: crate::im::wire::encode_body(
                    &crate::im::wire::Body {
                        from_uid: "carol",
                        to_uid: "bob",
                        client_msg_id: "c1",
                        content: b"from afar",
                        server_time_ms: 5,
                        from_device: "d",
                        group_id: "",
                    },
                    &mut Vec::new(),
                ),
                to: vec!["bob".into()],
            }],
            ..Default::default()
        };
        h.store.apply(&elsewhere);
        let out = h.send(1, "bob", "m1", "hi");
        assert_eq!(
            messages_to(&out, 2),
            vec![(1, "from afar".into()), (2, "hi".into())],
            "the gap first, from the store, then the new message"
        );
        // A repeated answer (a retry's) changes nothing.
        let out = h.send(1, "bob", "m1", "hi");
        assert_eq!(
            send_ok(&out, 1).map(|s| (s.seq, s.duplicate)),
            Some((1, true))
        );
        assert!(messages_to(&out, 2).is_empty());
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
