//! Routing between the nodes of a cluster (docs/CLUSTER.md): the core names the users whose
//! channel this node must hear (every user it caches: one with a device here, or a login
//! being read), publishes every inbox append it commits, and learns the appends that other
//! nodes publish.
//!
//! Pub/sub may lose a publish (a node reconnecting to Redis); an inbox append never is: a
//! cached user's `committed_seq` moves on with what is heard, a seq beyond the next one makes
//! the devices read the gap from the store, and each subscription, once it holds, is followed
//! by a read of the inbox's newest seq ([`Core::handle_subscribed`]), which covers whatever
//! was published before it held.

use std::sync::Arc;

use super::delivery::RECENT_KEEP;
use super::reads::{ReadRequest, Waiter};
use super::{ConnId, Core, Now};
use crate::store::StoredMessage;

/// How long after a failed read of where an inbox ends it is made again.
pub(super) const TIP_RETRY_MS: u64 = 1000;

/// Reads of where inboxes end that failed, to be made again at `at`.
#[derive(Debug, Default)]
pub(super) struct TipRetries {
    due: Vec<Arc<str>>,
    at: Option<u64>,
}

/// What the shell does for the cluster, in order. Only a core made with
/// [`super::ImConfig::cluster`] puts any out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterOp {
    /// Hear what is published for `uid` from now on, then call [`Core::handle_subscribed`].
    Subscribe(Arc<str>),
    /// Stop hearing `uid` (subscribed before).
    Unsubscribe(Arc<str>),
    /// Tell the nodes that hear `uid` of an append to its inbox committed here.
    Publish { uid: Arc<str>, news: Published },
}

/// What a node publishes on a user's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// A message appended to the inbox, with its seq there.
    Message(StoredMessage),
    /// The inbox reaches this seq; its messages are in the store (a send's retry, whose
    /// first attempt may have been stored without being published).
    Tip(u64),
}

impl Core {
    /// The cluster work put out since the last call.
    pub fn drain_routes(&mut self) -> std::vec::Drain<'_, ClusterOp> {
        self.routes.drain(..)
    }

    /// Another node published `news` on `uid`'s channel: the devices of `uid` here get what
    /// it appended.
    pub fn handle_published(&mut self, uid: &str, news: Published, now: Now) {
        let learned = match news {
            Published::Message(msg) => self.learn_append(uid, &msg),
            Published::Tip(seq) => self.learn_tip(uid, seq),
        };
        if learned {
            self.pump_user(uid, now);
        }
    }

    /// The subscription to `uid`'s channel holds: what was appended before it did is read.
    pub fn handle_subscribed(&mut self, uid: &str) {
        let Some((uid, _)) = self.users.get_key_value(uid) else {
            return;
        };
        let uid = uid.clone();
        self.request(ReadRequest::Tip { uid: uid.clone() }, Waiter::Tip { uid });
    }

    /// The reads of where inboxes end that failed wait until then (loop ms): call
    /// [`Core::handle_timeout`] at it.
    pub fn poll_timeout(&self) -> Option<u64> {
        self.tips.at
    }

    /// Reads again where the inboxes end whose reads failed.
    pub fn handle_timeout(&mut self, now: Now) {
        if self.tips.at.is_none_or(|at| at > now.mono_ms) {
            return;
        }
        self.tips.at = None;
        for uid in std::mem::take(&mut self.tips.due) {
            self.handle_subscribed(&uid);
        }
    }

    /// The read of where `uid`'s inbox ends failed: made again in [`TIP_RETRY_MS`].
    pub(super) fn tip_failed(&mut self, uid: Arc<str>, now: Now) {
        self.tips.due.push(uid);
        self.tips.at.get_or_insert(now.mono_ms + TIP_RETRY_MS);
    }

    /// The newest seq of `uid`'s inbox as the store had it after a subscription held.
    pub(super) fn tip_read(&mut self, uid: &str, seq: u64, now: Now) {
        if self.learn_tip(uid, seq) {
            self.pump_user(uid, now);
        }
    }

    /// `msg` is in `uid`'s inbox. Returns whether it is news to a cached user.
    pub(super) fn learn_append(&mut self, uid: &str, msg: &StoredMessage) -> bool {
        let Some(user) = self.users.get_mut(uid) else {
            return false;
        };
        if msg.seq <= user.committed_seq {
            // Already known: the store had it at login, or a retry named it again.
            return false;
        }
        if msg.seq > user.committed_seq + 1 {
            user.recent.clear();
        }
        user.committed_seq = msg.seq;
        user.recent.push_back(msg.clone());
        if user.recent.len() > RECENT_KEEP {
            user.recent.pop_front();
        }
        true
    }

    /// `uid`'s inbox reaches `seq`, with messages unseen here: the devices read them from
    /// the store. Returns whether it is news to a cached user.
    pub(super) fn learn_tip(&mut self, uid: &str, seq: u64) -> bool {
        let Some(user) = self.users.get_mut(uid) else {
            return false;
        };
        if seq <= user.committed_seq {
            return false;
        }
        user.committed_seq = seq;
        user.recent.clear();
        true
    }

    /// Delivers on to every device of `uid` here.
    pub(super) fn pump_user(&mut self, uid: &str, now: Now) {
        let conns: Vec<ConnId> = match self.users.get(uid) {
            Some(u) => u.devices.values().copied().collect(),
            None => return,
        };
        for conn in conns {
            self.pump(conn, now);
        }
        self.trim_recent(uid);
    }

    /// Puts out `route` when this core is a node of a cluster.
    pub(super) fn route(&mut self, route: ClusterOp) {
        if self.cfg.cluster {
            self.routes.push(route);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::{answer_reads, messages_to, Failing, H};
    use super::super::{ImConfig, Output};
    use super::*;
    use crate::im::wire;
    use crate::store::{NewSend, StoreRead, WriteBatch};

    fn node() -> H {
        H::new(ImConfig {
            cluster: true,
            ..ImConfig::default()
        })
    }

    fn routes(h: &mut H) -> Vec<ClusterOp> {
        h.core.drain_routes().collect()
    }

    /// A send from carol to `to` made by another node: in the store, not heard here.
    fn sent_elsewhere(h: &mut H, to: &str, cmid: &str, text: &str) -> StoredMessage {
        let body = wire::encode_body(
            &wire::Body {
                from_uid: "carol",
                to_uid: to,
                client_msg_id: cmid,
                content: text.as_bytes(),
                server_time_ms: 5,
                from_device: "d",
                group_id: "",
            },
            &mut Vec::new(),
        );
        let sents = h.store.apply(&WriteBatch {
            sends: vec![NewSend {
                from: "carol".into(),
                client_msg_id: cmid.into(),
                server_time_ms: 5,
                body,
                to: vec![to.into()],
            }],
            ..WriteBatch::default()
        });
        let seq = sents[0].to_seqs[0];
        h.store.messages_after(to, seq - 1, 1).unwrap().remove(0)
    }

    #[test]
    fn a_node_hears_a_user_while_it_caches_it_and_publishes_every_append_it_commits() {
        let mut h = node();
        h.login(1, "alice", "phone", 0);
        assert_eq!(routes(&mut h), vec![ClusterOp::Subscribe("alice".into())]);
        h.send(1, "bob", "m1", "hi");
        let published: Vec<(String, u64)> = routes(&mut h)
            .into_iter()
            .map(|r| match r {
                ClusterOp::Publish {
                    uid,
                    news: Published::Message(m),
                } => (uid.to_string(), m.seq),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(published, vec![("alice".into(), 1), ("bob".into(), 1)]);
        // A retry publishes where the inboxes end, not its own body.
        h.send(1, "bob", "m1", "hi");
        assert!(routes(&mut h).iter().all(|r| matches!(
            r,
            ClusterOp::Publish {
                news: Published::Tip(1),
                ..
            }
        )));
        h.close(1);
        assert_eq!(routes(&mut h), vec![ClusterOp::Unsubscribe("alice".into())]);
    }

    #[test]
    fn a_single_node_puts_out_no_cluster_work() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.send(1, "bob", "m1", "hi");
        h.close(1);
        assert_eq!(routes(&mut h), vec![]);
    }

    #[test]
    fn news_from_another_node_reaches_the_devices_here_once_in_order_and_a_gap_is_read() {
        let mut h = node();
        h.login(2, "bob", "phone", 0);
        let first = sent_elsewhere(&mut h, "bob", "c1", "one");
        h.core
            .handle_published("bob", Published::Message(first.clone()), h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![(1, "one".into())]);
        h.core
            .handle_published("bob", Published::Message(first), h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![], "heard twice");
        // The publish of 2 was lost: 3 shows the gap, which is read from the store.
        sent_elsewhere(&mut h, "bob", "c2", "two");
        let third = sent_elsewhere(&mut h, "bob", "c3", "three");
        h.core
            .handle_published("bob", Published::Message(third), h.now);
        assert_eq!(
            messages_to(&h.turn(), 2),
            vec![(2, "two".into()), (3, "three".into())]
        );
        // News of a user not cached here is nobody's.
        let other = sent_elsewhere(&mut h, "dave", "c4", "x");
        h.core
            .handle_published("dave", Published::Message(other), h.now);
        assert!(h.turn().is_empty());
    }

    #[test]
    fn once_subscribed_a_node_reads_where_the_inbox_ends_and_again_when_that_read_fails() {
        let mut h = node();
        h.login(2, "bob", "phone", 0);
        // Appended while the subscription was being made: never heard.
        sent_elsewhere(&mut h, "bob", "c1", "unheard");
        h.core.handle_subscribed("bob");
        assert_eq!(messages_to(&h.turn(), 2), vec![(1, "unheard".into())]);
        sent_elsewhere(&mut h, "bob", "c2", "later");
        h.core.handle_subscribed("bob");
        let failing = Failing::new(&h.store, "bob");
        let out: Vec<Output> = answer_reads(&mut h.core, &failing, h.now);
        assert_eq!(messages_to(&out, 2), vec![]);
        let at = h.now.mono_ms + TIP_RETRY_MS;
        assert_eq!(h.core.poll_timeout(), Some(at));
        h.now.mono_ms = at - 1;
        h.core.handle_timeout(h.now);
        assert!(h.turn().is_empty(), "read again too early");
        h.now.mono_ms = at;
        h.core.handle_timeout(h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![(2, "later".into())]);
        assert_eq!(h.core.poll_timeout(), None);
    }
}
