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

use std::collections::VecDeque;
use std::sync::Arc;

use super::delivery::RECENT_KEEP;
use super::reads::{ReadRequest, Waiter};
use super::{ConnId, Core, Now};
use crate::store::{Presence, StoredMessage};

/// How long after a failed store read it is made again: the read of where an inbox ends,
/// and a device's stream reading older messages.
pub(super) const TIP_RETRY_MS: u64 = 1000;

/// How long appends heard beyond the next seq wait for the ones before them before the
/// devices read the gap from the store: a node hears one inbox's appends from its own commits
/// and from other nodes' publishes, in no fixed order, and the missing ones usually come
/// within milliseconds; a lost publish costs this much delay.
pub(super) const GAP_WAIT_MS: u64 = 100;

/// The most appends held ahead of a gap per user; one more reads the gap at once.
const AHEAD_KEEP: usize = 64;

/// Users with appends held ahead of a gap (`User::ahead`), each with when it stops waiting.
#[derive(Debug, Default)]
pub(super) struct GapWaits {
    due: VecDeque<(u64, Arc<str>)>,
}

/// Reads that failed, each named by `K`, to be made again at `at` (loop ms), all together.
#[derive(Debug)]
pub(super) struct Retries<K> {
    due: Vec<K>,
    at: Option<u64>,
}

impl<K> Default for Retries<K> {
    fn default() -> Self {
        Retries {
            due: Vec::new(),
            at: None,
        }
    }
}

impl<K> Retries<K> {
    /// Makes `k` again [`TIP_RETRY_MS`] after `now`, or with the retries already waiting.
    pub(super) fn push(&mut self, k: K, now: Now) {
        self.due.push(k);
        self.at.get_or_insert(now.mono_ms + TIP_RETRY_MS);
    }

    fn at(&self) -> Option<u64> {
        self.at
    }

    /// The retries due at `now`, taken.
    fn take_due(&mut self, now: Now) -> Vec<K> {
        if self.at.is_none_or(|at| at > now.mono_ms) {
            return Vec::new();
        }
        self.at = None;
        std::mem::take(&mut self.due)
    }
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
    /// Record in the cluster's presence that `device` of `uid` is on this node (`on`) or
    /// gone from it. Redis tells the user's friends, on their channels, when this makes the
    /// user's first device online or its last one offline ([`Published::Presence`]).
    Device {
        uid: Arc<str>,
        device: Arc<str>,
        on: bool,
    },
    /// The friendship of `a` and `b` was made (`present`) or ended: tell each on its channel,
    /// with whether the other is online ([`Published::Friend`]).
    Friendship { a: String, b: String, present: bool },
}

/// Where a device's login stands among the logins of the same device on other nodes.
///
/// Each login is announced on the user's channel, which Redis delivers to every node in one
/// order. A login whose own announcement came back is held; another node's announcement of
/// the same device heard after that is a newer login, and kicks it. One heard before it is an
/// older login, which that node kicks when it hears this one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Claim {
    /// A single node: logins of the same device are all here.
    Local,
    /// To be announced once this node hears the user's channel, so that its announcement
    /// comes back to it.
    Waiting,
    /// Announced as login `n` of this node; its announcement has not come back yet.
    Announced(u64),
    /// The announcement came back.
    Held,
    /// A newer login elsewhere kicked it; it is closing.
    Lost,
}

/// What a node publishes on a user's channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// A message appended to the inbox, with its seq there.
    Message(StoredMessage),
    /// The inbox reaches this seq; its messages are in the store (a send's retry, whose
    /// first attempt may have been stored without being published).
    Tip(u64),
    /// Login `login` of the publishing node, of `device_id` (see [`Claim`]).
    Login { device_id: String, login: u64 },
    /// The user joined or left group `gid`. Published to every node (not on the user's
    /// channel), since any node may cache the group's members.
    Membership { gid: String, joined: bool },
    /// Friend `uid` of the channel's user came online (its first device) or went offline
    /// (its last device, or its node's lease ran out).
    Presence { uid: String, presence: Presence },
    /// The channel's user and `uid` became friends (`present`) or stopped being friends;
    /// `uid` is as `presence` says.
    Friend {
        uid: String,
        present: bool,
        presence: Presence,
    },
}

impl Core {
    /// The cluster work put out since the last call.
    pub fn drain_routes(&mut self) -> std::vec::Drain<'_, ClusterOp> {
        self.routes.drain(..)
    }

    /// A node published `news` on `uid`'s channel (`mine`: this node): the devices of `uid`
    /// here get what another node appended, and a device here that logged in again on
    /// another node is kicked (4000).
    pub fn handle_published(&mut self, uid: &str, news: Published, mine: bool, now: Now) {
        match &news {
            Published::Login { device_id, login } => {
                return self.login_heard(uid, device_id, *login, mine)
            }
            Published::Membership { gid, joined } if !mine => {
                return self.membership_heard(gid, uid, *joined)
            }
            Published::Presence {
                uid: friend,
                presence,
            } => return self.presence_heard(uid, friend, *presence),
            Published::Friend {
                uid: friend,
                present,
                presence,
            } => return self.friend_heard(uid, friend, *present, *presence),
            _ => {}
        }
        if !mine && self.learn(uid, &news, now) {
            self.pump_user(uid, now);
        }
    }

    /// The claim of a device logging in now: announced when this node is one of a cluster
    /// and hears the user's channel already.
    pub(super) fn announce_login(&mut self, uid: &Arc<str>, device_id: &str) -> Claim {
        if !self.cfg.cluster {
            return Claim::Local;
        }
        if !self.users.get(uid).is_some_and(|u| u.heard) {
            return Claim::Waiting;
        }
        let login = self.next_login;
        self.next_login += 1;
        self.route(ClusterOp::Publish {
            uid: uid.clone(),
            news: Published::Login {
                device_id: device_id.to_owned(),
                login,
            },
        });
        Claim::Announced(login)
    }

    fn login_heard(&mut self, uid: &str, device_id: &str, login: u64, mine: bool) {
        let Some(&conn) = self.users.get(uid).and_then(|u| u.devices.get(device_id)) else {
            return;
        };
        let Some(dev) = self.sessions.get_mut(&conn).and_then(|s| s.device.as_mut()) else {
            return;
        };
        match (mine, dev.claim) {
            (true, Claim::Announced(n)) if n == login => dev.claim = Claim::Held,
            (false, Claim::Held) => {
                // Closing, it is removed from the user's devices when the shell reports
                // the close, as any device is.
                dev.claim = Claim::Lost;
                self.kick(conn);
            }
            _ => {}
        }
    }

    /// The subscription to `uid`'s channel holds: what was appended before it did is read.
    pub fn handle_subscribed(&mut self, uid: &str) {
        let Some((uid, user)) = self.users.get_key_value(uid) else {
            return;
        };
        let uid = uid.clone();
        let conns: Vec<ConnId> = user.devices.values().copied().collect();
        self.request(
            ReadRequest::Tip { uid: uid.clone() },
            Waiter::Tip { uid: uid.clone() },
        );
        // Presence news published before the subscription held was not heard either.
        self.request(
            ReadRequest::Friends { uid: uid.clone() },
            Waiter::FriendsPresence { uid: uid.clone() },
        );
        if let Some(u) = self.users.get_mut(&uid) {
            u.heard = true;
        }
        for conn in conns {
            let waiting = self.sessions.get(&conn).and_then(|s| s.device.as_ref());
            let Some(device_id) = waiting
                .filter(|d| d.claim == Claim::Waiting)
                .map(|d| d.device_id.clone())
            else {
                continue;
            };
            let claim = self.announce_login(&uid, &device_id);
            if let Some(d) = self.sessions.get_mut(&conn).and_then(|s| s.device.as_mut()) {
                d.claim = claim;
            }
        }
    }

    /// The store reads that failed (where inboxes end, streams' older messages), and the
    /// appends held ahead of a gap, wait until then (loop ms): call [`Core::handle_timeout`]
    /// at it.
    pub fn poll_timeout(&self) -> Option<u64> {
        let gap = self.gaps.due.front().map(|(at, _)| *at);
        [self.tips.at(), self.streams.at(), gap]
            .into_iter()
            .flatten()
            .min()
    }

    /// Reads again where the inboxes end whose reads failed, moves on the streams whose
    /// reads failed, and makes the devices read the gaps that were not filled in time.
    pub fn handle_timeout(&mut self, now: Now) {
        while self
            .gaps
            .due
            .front()
            .is_some_and(|(at, _)| *at <= now.mono_ms)
        {
            if let Some((_, uid)) = self.gaps.due.pop_front() {
                if self.skip_gap(&uid) {
                    self.pump_user(&uid, now);
                }
            }
        }
        for uid in self.tips.take_due(now) {
            self.handle_subscribed(&uid);
        }
        for conn in self.streams.take_due(now) {
            self.pump(conn, now);
        }
    }

    /// Gives up waiting for the appends before those held ahead for `uid`: the inbox reaches
    /// the newest held, and the devices read the rest from the store. Returns whether any
    /// was held.
    fn skip_gap(&mut self, uid: &str) -> bool {
        let Some(user) = self.users.get_mut(uid) else {
            return false;
        };
        let Some((&newest, _)) = user.ahead.last_key_value() else {
            return false;
        };
        user.ahead.clear();
        if newest > user.committed_seq {
            user.committed_seq = newest;
            user.recent.clear();
        }
        true
    }

    /// The read of where `uid`'s inbox ends failed: made again in [`TIP_RETRY_MS`].
    pub(super) fn tip_failed(&mut self, uid: Arc<str>, now: Now) {
        self.tips.push(uid, now);
    }

    /// The newest seq of `uid`'s inbox as the store had it after a subscription held.
    pub(super) fn tip_read(&mut self, uid: &str, seq: u64, now: Now) {
        if self.learn_tip(uid, seq) {
            self.pump_user(uid, now);
        }
    }

    /// What `news` says of `uid`'s inbox. Returns whether it is news to a cached user.
    pub(super) fn learn(&mut self, uid: &str, news: &Published, now: Now) -> bool {
        match news {
            Published::Message(msg) => self.learn_append(uid, msg, now),
            Published::Tip(seq) => self.learn_tip(uid, *seq),
            Published::Login { .. }
            | Published::Membership { .. }
            | Published::Presence { .. }
            | Published::Friend { .. } => false,
        }
    }

    /// `msg` is in `uid`'s inbox. Returns whether it is news to a cached user. One beyond
    /// the next seq is held (on a node of a cluster) until the ones before it are heard, for
    /// at most [`GAP_WAIT_MS`].
    pub(super) fn learn_append(&mut self, uid: &str, msg: &StoredMessage, now: Now) -> bool {
        let cluster = self.cfg.cluster;
        let Some(user) = self.users.get_mut(uid) else {
            return false;
        };
        if msg.seq <= user.committed_seq {
            // Already known: the store had it at login, or a retry named it again.
            return false;
        }
        if msg.seq > user.committed_seq + 1 {
            if cluster && user.ahead.len() < AHEAD_KEEP {
                let first = user.ahead.is_empty();
                user.ahead.insert(msg.seq, msg.clone());
                if let (true, Some((key, _))) = (first, self.users.get_key_value(uid)) {
                    self.gaps
                        .due
                        .push_back((now.mono_ms + GAP_WAIT_MS, key.clone()));
                }
                return false;
            }
            user.recent.clear();
            if let Some((&newest, _)) = user.ahead.last_key_value() {
                user.committed_seq = user.committed_seq.max(newest);
            }
            user.ahead.clear();
            if msg.seq <= user.committed_seq {
                return true;
            }
        }
        user.committed_seq = msg.seq;
        user.recent.push_back(msg.clone());
        // The gap before those held is filled: they follow on.
        while let Some(next) = user.ahead.remove(&(user.committed_seq + 1)) {
            user.committed_seq = next.seq;
            user.recent.push_back(next);
        }
        let committed = user.committed_seq;
        user.ahead.retain(|seq, _| *seq > committed);
        while user.recent.len() > RECENT_KEEP {
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
        user.ahead.retain(|s, _| *s > seq);
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

    /// The node's presence lease was made anew: Redis had none, for a new node or one taken
    /// for dead (away from Redis for longer than a lease), whose devices were removed. Every
    /// device here is recorded again.
    pub fn handle_lease_made(&mut self) {
        let mut devices: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        for (uid, u) in &self.users {
            devices.extend(u.devices.keys().map(|d| (uid.clone(), d.clone())));
        }
        for (uid, device) in devices {
            self.route(ClusterOp::Device {
                uid,
                device,
                on: true,
            });
        }
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
    use super::super::harness::{
        answer_reads, closes, frames_to, messages_to, send_ok, Failing, H,
    };
    use super::super::{ImConfig, Output};
    use super::*;
    use crate::im::proto::server_frame::Body as S;
    use crate::im::wire;
    use crate::store::{NewSend, StoreRead, WriteBatch};

    fn node() -> H {
        H::new(ImConfig {
            cluster: true,
            ..ImConfig::default()
        })
    }

    fn login(device: &str, n: u64) -> Published {
        Published::Login {
            device_id: device.into(),
            login: n,
        }
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
        let device = |d: &str, on| ClusterOp::Device {
            uid: "alice".into(),
            device: d.into(),
            on,
        };
        h.login(1, "alice", "phone", 0);
        assert_eq!(
            routes(&mut h),
            vec![ClusterOp::Subscribe("alice".into()), device("phone", true)]
        );
        // The login is announced once the channel is heard, so that it comes back.
        h.core.handle_subscribed("alice");
        h.turn();
        assert_eq!(
            routes(&mut h),
            vec![ClusterOp::Publish {
                uid: "alice".into(),
                news: login("phone", 1)
            }]
        );
        h.login(2, "alice", "laptop", 0);
        assert_eq!(
            routes(&mut h),
            vec![
                device("laptop", true),
                ClusterOp::Publish {
                    uid: "alice".into(),
                    news: login("laptop", 2)
                }
            ]
        );
        h.close(2);
        assert_eq!(routes(&mut h), vec![device("laptop", false)]);
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
        assert_eq!(
            routes(&mut h),
            vec![
                device("phone", false),
                ClusterOp::Unsubscribe("alice".into())
            ]
        );
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
            .handle_published("bob", Published::Message(first.clone()), false, h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![(1, "one".into())]);
        h.core
            .handle_published("bob", Published::Message(first), false, h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![], "heard twice");
        // 3 is heard before 2: it waits for it, and both follow on without a read.
        let second = sent_elsewhere(&mut h, "bob", "c2", "two");
        let third = sent_elsewhere(&mut h, "bob", "c3", "three");
        h.core
            .handle_published("bob", Published::Message(third), false, h.now);
        assert!(messages_to(&h.turn(), 2).is_empty());
        h.core
            .handle_published("bob", Published::Message(second), false, h.now);
        assert!(h.core.poll_read().is_none(), "nothing read");
        assert_eq!(
            messages_to(&h.turn(), 2),
            vec![(2, "two".into()), (3, "three".into())]
        );
        // The publish of 4 was lost: 5 shows the gap, which is read from the store once
        // it has waited long enough.
        sent_elsewhere(&mut h, "bob", "c4", "four");
        let fifth = sent_elsewhere(&mut h, "bob", "c5", "five");
        h.core
            .handle_published("bob", Published::Message(fifth), false, h.now);
        assert!(messages_to(&h.turn(), 2).is_empty());
        assert_eq!(h.core.poll_timeout(), Some(h.now.mono_ms + GAP_WAIT_MS));
        h.now.mono_ms += GAP_WAIT_MS;
        h.core.handle_timeout(h.now);
        assert_eq!(
            messages_to(&h.turn(), 2),
            vec![(4, "four".into()), (5, "five".into())]
        );
        // The store shows appends whose commit is not answered yet: the stream stops at
        // what is known committed.
        sent_elsewhere(&mut h, "bob", "c6", "six");
        sent_elsewhere(&mut h, "bob", "c7", "seven");
        h.core
            .handle_published("bob", Published::Tip(6), false, h.now);
        assert_eq!(messages_to(&h.turn(), 2), vec![(6, "six".into())]);
        // News of a user not cached here is nobody's.
        let other = sent_elsewhere(&mut h, "dave", "c8", "x");
        h.core
            .handle_published("dave", Published::Message(other), false, h.now);
        assert!(h.turn().is_empty());
    }

    #[test]
    fn a_devices_own_send_read_before_its_commit_is_answered_is_not_delivered_to_it() {
        let mut h = node();
        h.login(1, "alice", "phone", 0);
        h.send_uncommitted(1, "bob", "m1", "mine");
        let (id, batch) = h.core.take_batch().unwrap();
        let sents = h.store.apply(&batch);
        // Another node's append to alice's inbox is heard before this commit is answered.
        let theirs = sent_elsewhere(&mut h, "alice", "c1", "theirs");
        assert_eq!(theirs.seq, 2);
        h.core
            .handle_published("alice", Published::Message(theirs), false, h.now);
        let mut out = h.turn();
        h.core.on_committed(id, &sents, h.now);
        out.extend(h.turn());
        assert_eq!(messages_to(&out, 1), vec![(2, "theirs".into())]);
        assert_eq!(send_ok(&out, 1).map(|ok| ok.seq), Some(1));
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

    #[test]
    fn a_device_logging_in_again_on_another_node_is_kicked_there_and_only_the_older_login() {
        let mut h = node();
        h.login(1, "bob", "phone", 0);
        h.login(2, "bob", "tablet", 0);
        h.core.handle_subscribed("bob");
        h.turn();
        let announced: Vec<Published> = routes(&mut h)
            .into_iter()
            .filter_map(|r| match r {
                ClusterOp::Publish { news, .. } => Some(news),
                _ => None,
            })
            .collect();
        assert_eq!(announced.len(), 2, "{announced:?}");
        // Another node's login of the phone, announced before this node's came back: that
        // one is older, and the other node kicks it when it hears this one.
        h.core
            .handle_published("bob", login("phone", 7), false, h.now);
        assert_eq!(closes(&h.turn()), vec![]);
        for news in announced {
            h.core.handle_published("bob", news, true, h.now);
        }
        assert_eq!(closes(&h.turn()), vec![]);
        // A newer login of the phone elsewhere: the phone here is told and closed, once.
        h.core
            .handle_published("bob", login("phone", 8), false, h.now);
        let out = h.turn();
        assert!(matches!(frames_to(&out, 1)[..], [S::Kicked(_)]), "{out:?}");
        assert_eq!(closes(&out), vec![(1, crate::im::core::CLOSE_REPLACED)]);
        h.core
            .handle_published("bob", login("phone", 9), false, h.now);
        assert_eq!(closes(&h.turn()), vec![]);
        // The tablet stays; the phone is gone once its close is reported.
        h.close(1);
        assert_eq!(h.core.online_devices("bob"), vec!["tablet".to_string()]);
    }

    #[test]
    fn membership_news_from_another_node_drops_the_cached_group_and_tells_the_member_here() {
        let mut h = node();
        h.login(1, "alice", "phone", 0);
        h.member("team", "alice", true);
        let published: Vec<ClusterOp> = routes(&mut h)
            .into_iter()
            .filter(|r| {
                matches!(
                    r,
                    ClusterOp::Publish {
                        news: Published::Membership { .. },
                        ..
                    }
                )
            })
            .collect();
        assert_eq!(
            published,
            vec![ClusterOp::Publish {
                uid: "alice".into(),
                news: Published::Membership {
                    gid: "team".into(),
                    joined: true
                }
            }]
        );
        h.warm("team");
        assert!(h.core.has_members("team"));
        // Its own news, heard back, changes nothing.
        let own = Published::Membership {
            gid: "team".into(),
            joined: true,
        };
        h.core.handle_published("alice", own, true, h.now);
        assert!(h.core.has_members("team"));
        assert!(h.turn().is_empty());
        // Another node removed alice: the group is read again, and her phone here is told.
        let left = Published::Membership {
            gid: "team".into(),
            joined: false,
        };
        h.core.handle_published("alice", left, false, h.now);
        assert!(!h.core.has_members("team"));
        let out = h.turn();
        assert!(
            matches!(&frames_to(&out, 1)[..], [S::GroupChanged(g)] if g.group_id == "team" && !g.joined),
            "{out:?}"
        );
        // After a time unheard, every cached group is dropped.
        h.warm("team");
        h.core.handle_cluster_heard();
        assert!(!h.core.has_members("team"));
    }
}
