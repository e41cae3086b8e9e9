//! Group membership. The backend owns it (admin API); a change is written with the turn's
//! batch, and once durable every online device of the member is told (`GroupChanged`). Group
//! messages are fanned out by `send`, to the members the store holds when the send is
//! accepted: a member whose removal is durable gets nothing sent after it.
//!
//! Invariant: the batches hold only real changes (a join of a non-member or a removal of a
//! member, counting the changes still in flight), so that a group's size is the store's count
//! plus the changes not in the store yet, and every `GroupChanged` is news.

use std::collections::HashMap;
use std::sync::Arc;

use super::reads::{ReadId, Then};
use super::route::{ClusterOp, Published};
use super::{frame, valid_id, BatchId, ConnId, Core};
use crate::im::proto::{self, server_frame};
use crate::store::Membership;

/// Whether `uid` is among `members` (sorted).
pub(super) fn is_in(members: &[Arc<str>], uid: &str) -> bool {
    members.binary_search_by(|m| (**m).cmp(uid)).is_ok()
}

/// What the group cache may hold in all, counting each group as one more than its members;
/// past it, the cache starts over. At most about 15 MiB (an entry is a pointer and a uid).
const GROUP_CACHE_WEIGHT: usize = 1 << 18;

/// The members of recently used groups, so that a group send or signal costs no store read.
/// Filled from the store and dropped for a group once a change of its membership is reported
/// durable, so it is never behind what was reported.
#[derive(Debug, Default)]
pub(super) struct GroupCache {
    groups: HashMap<Arc<str>, Arc<[Arc<str>]>>,
    weight: usize,
}

impl GroupCache {
    fn clear(&mut self) {
        self.groups.clear();
        self.weight = 0;
    }

    pub(super) fn forget(&mut self, gid: &str) {
        if let Some(members) = self.groups.remove(gid) {
            self.weight -= members.len() + 1;
        }
    }
}

/// Why a membership change was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MembershipError {
    /// A group id or uid that is not 1-64 bytes (HTTP 400).
    Invalid,
    /// The group has `--max-group-members` members already (HTTP 409).
    Full,
    /// The group's members could not be read, or are not cached (HTTP 503).
    Unavailable,
}

impl Core {
    /// `--max-group-members`.
    pub fn max_group_members(&self) -> usize {
        self.cfg.max_group_members
    }

    /// Reads the members of `gid` for the admin API exchange `admin` unless they are cached
    /// (or `gid` is no group id): a request that needs them ([`Core::set_membership`], a
    /// group send or signal) waits for the [`Output::AdminRead`] of the returned read, then
    /// is made again.
    ///
    /// [`Output::AdminRead`]: super::Output::AdminRead
    pub fn warm_group(&mut self, admin: ConnId, gid: &str) -> Option<ReadId> {
        if !valid_id(gid) || self.has_members(gid) {
            return None;
        }
        Some(self.read_members(gid, Then::Admin(admin)))
    }

    /// Adds `uid` to group `gid`, or removes it. Returns the batch whose commit makes the
    /// membership durable, or None when it is durable already (nothing changes).
    ///
    /// Errors: [`MembershipError::Invalid`] for bad ids, [`MembershipError::Full`] for a join
    /// that would pass `max_group_members`, [`MembershipError::Unavailable`] when the group's
    /// members are not cached (see [`Core::warm_group`]).
    pub fn set_membership(
        &mut self,
        gid: &str,
        uid: &str,
        joined: bool,
    ) -> Result<Option<BatchId>, MembershipError> {
        if !valid_id(gid) || !valid_id(uid) {
            return Err(MembershipError::Invalid);
        }
        let Some(members) = self.cached_members(gid) else {
            return Err(MembershipError::Unavailable);
        };
        let pending = self.pending_membership(gid, uid);
        let current = match pending {
            Some((_, joined)) => joined,
            None => is_in(&members, uid),
        };
        if current == joined {
            return Ok(pending.map(|(batch, _)| batch));
        }
        if joined && self.group_size(gid, &members) >= self.cfg.max_group_members {
            return Err(MembershipError::Full);
        }
        self.batch.memberships.push(Membership {
            gid: gid.into(),
            uid: uid.into(),
            joined,
        });
        Ok(Some(self.next_batch))
    }

    /// The newest membership change of `uid` in `gid` not yet reported durable, and the batch
    /// that holds it.
    fn pending_membership(&self, gid: &str, uid: &str) -> Option<(BatchId, bool)> {
        self.pending_memberships()
            .filter(|(_, m)| &*m.gid == gid && &*m.uid == uid)
            .last()
            .map(|(batch, m)| (batch, m.joined))
    }

    /// Every membership change not yet reported durable, oldest first, with its batch.
    fn pending_memberships(&self) -> impl Iterator<Item = (BatchId, &Membership)> {
        let in_flight = self
            .in_flight
            .iter()
            .flat_map(|f| f.batch.memberships.iter().map(move |m| (f.id, m)));
        let current = self.batch.memberships.iter().map(|m| (self.next_batch, m));
        in_flight.chain(current)
    }

    /// The members `gid` has counting the changes in flight, from its cached `members`. A
    /// batch may be in the store (and so in a read of it) before its commit is reported, so
    /// each pending change is compared with `members` instead of being added to its count.
    /// Pending changes are few: each waits on an admin exchange, of which there are at most
    /// `--max-admin-connections`.
    fn group_size(&self, gid: &str, members: &[Arc<str>]) -> usize {
        let mut newest: HashMap<&str, bool> = HashMap::new();
        for (_, m) in self.pending_memberships().filter(|(_, m)| &*m.gid == gid) {
            newest.insert(&m.uid, m.joined);
        }
        let mut size = members.len();
        for (uid, joined) in newest {
            match (joined, is_in(members, uid)) {
                (true, false) => size += 1,
                (false, true) => size = size.saturating_sub(1),
                _ => {}
            }
        }
        size
    }

    /// Whether the members of `gid` are cached.
    pub(super) fn has_members(&self, gid: &str) -> bool {
        self.group_cache.groups.contains_key(gid)
    }

    /// The cached members of `gid`, sorted by uid, as the store had them.
    pub(super) fn cached_members(&self, gid: &str) -> Option<Arc<[Arc<str>]>> {
        self.group_cache.groups.get(gid).cloned()
    }

    /// Caches the members of `gid` as a read of the store answered them.
    pub(super) fn cache_members(&mut self, gid: &str, members: &[String]) {
        let mut members: Vec<Arc<str>> = members.iter().map(|m| Arc::from(m.as_str())).collect();
        members.sort();
        let members: Arc<[Arc<str>]> = members.into();
        let cache = &mut self.group_cache;
        cache.forget(gid);
        if cache.weight + members.len() + 1 > GROUP_CACHE_WEIGHT {
            cache.groups.clear();
            cache.weight = 0;
        }
        cache.weight += members.len() + 1;
        cache.groups.insert(gid.into(), members);
    }

    /// A membership change is durable: every online device of the member hears of it, on
    /// this node and (published to every node) on the others, which forget the group's
    /// members too.
    pub(super) fn membership_committed(&mut self, m: &Membership) {
        self.membership_heard(&m.gid, &m.uid, m.joined);
        self.route(ClusterOp::Publish {
            uid: m.uid.clone(),
            news: Published::Membership {
                gid: m.gid.to_string(),
                joined: m.joined,
            },
        });
    }

    /// This node (again) hears the news every node hears, after a time it may have missed
    /// some: every group's members are read again at their next use.
    pub fn handle_cluster_heard(&mut self) {
        self.group_cache.clear();
        for w in self.waiting.values_mut() {
            if let super::reads::Waiter::Members { fresh, .. } = w {
                *fresh = false;
            }
        }
    }

    /// `uid` joined or left `gid`: the group's members are read again at their next use, and
    /// the member's devices here are told.
    pub(super) fn membership_heard(&mut self, gid: &str, uid: &str, joined: bool) {
        self.group_cache.forget(gid);
        self.members_changed(gid);
        let Some(u) = self.users.get(uid) else {
            return;
        };
        let conns: Vec<ConnId> = u.devices.values().copied().collect();
        for conn in conns {
            self.reply(
                conn,
                frame(
                    0,
                    server_frame::Body::GroupChanged(proto::GroupChanged {
                        group_id: gid.to_owned(),
                        joined,
                    }),
                ),
            );
        }
    }

    /// The connections of every online device of `members`, but `except`.
    pub(super) fn member_conns<U: AsRef<str>>(
        &self,
        members: &[U],
        except: Option<ConnId>,
    ) -> Vec<ConnId> {
        members
            .iter()
            .filter_map(|uid| self.users.get(uid.as_ref()))
            .flat_map(|u| u.devices.values().copied())
            .filter(|c| Some(*c) != except)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::{error_code, frames_to, messages_to, send_ok, H};
    use super::super::{ImConfig, Output};
    use super::*;
    use crate::im::proto::{client_frame::Body as C, server_frame::Body as S, ErrorCode};
    use crate::im::wire;
    use crate::store::memory::MemoryStore;
    use crate::store::{ReadError, StoreRead, StoredMessage};

    fn group_changes(out: &[Output], conn: ConnId) -> Vec<(String, bool)> {
        frames_to(out, conn)
            .into_iter()
            .filter_map(|b| match b {
                S::GroupChanged(g) => Some((g.group_id, g.joined)),
                _ => None,
            })
            .collect()
    }

    fn login_groups(out: &[Output], conn: ConnId) -> Vec<String> {
        match frames_to(out, conn).into_iter().next() {
            Some(S::LoginOk(ok)) => ok.groups,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_membership_is_announced_to_every_device_once_durable_and_listed_at_login() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "alice", "laptop", 0);
        let batch = h.set_membership("g1", "alice", true);
        assert_eq!(batch, Ok(Some(h.core.pending_batch_id())));
        assert!(
            group_changes(&h.core.drain_output().collect::<Vec<_>>(), 1).is_empty(),
            "announced before durable"
        );
        let out = h.turn();
        for conn in [1, 2] {
            assert_eq!(group_changes(&out, conn), vec![("g1".into(), true)]);
        }
        // Joining again changes nothing: durable already, and no news.
        assert_eq!(h.set_membership("g1", "alice", true), Ok(None));
        assert!(group_changes(&h.turn(), 1).is_empty());
        h.member("g2", "alice", true);
        assert_eq!(
            login_groups(&h.login(3, "alice", "tablet", 0), 3),
            ["g1", "g2"]
        );
        let out = h.member("g1", "alice", false);
        assert_eq!(group_changes(&out, 3), vec![("g1".into(), false)]);
        assert_eq!(login_groups(&h.login(4, "alice", "watch", 0), 4), ["g2"]);
        assert_eq!(h.store.group_members("g1"), Ok(vec![]));
    }

    #[test]
    fn a_change_that_repeats_one_in_flight_waits_for_its_batch() {
        let mut h = H::new(ImConfig::default());
        assert_eq!(h.set_membership("g", "a", true), Ok(Some(1)));
        let (id, batch) = h.core.take_batch().unwrap();
        assert_eq!(
            h.set_membership("g", "a", true),
            Ok(Some(id)),
            "the same join, still in flight"
        );
        assert_eq!(h.set_membership("g", "a", false), Ok(Some(2)));
        assert!(h.core.take_batch().is_some());
        h.store.apply(&batch);
        assert_eq!(
            h.set_membership("g", "a", false),
            Ok(Some(2)),
            "the store has the join, the removal is still in flight"
        );
    }

    #[test]
    fn a_group_is_full_at_max_group_members_counting_changes_in_flight() {
        let mut h = H::new(ImConfig {
            max_group_members: 3,
            ..ImConfig::default()
        });
        assert_eq!(h.core.max_group_members(), 3);
        for uid in ["a", "b", "c"] {
            assert!(h.set_membership("g", uid, true).is_ok());
        }
        assert_eq!(h.set_membership("g", "d", true), Err(MembershipError::Full));
        // Committed to the store but not yet reported: counted once, not twice.
        let (id, batch) = h.core.take_batch().unwrap();
        h.store.apply(&batch);
        assert_eq!(h.set_membership("g", "d", true), Err(MembershipError::Full));
        assert_eq!(h.set_membership("g", "a", true), Ok(Some(id)));
        assert!(h.set_membership("g", "a", false).is_ok());
        assert!(
            h.set_membership("g", "d", true).is_ok(),
            "a removal in flight makes room"
        );
        assert_eq!(h.set_membership("g", "e", true), Err(MembershipError::Full));
        h.core.on_committed(id, &[], h.now);
        h.turn();
        assert_eq!(
            h.store.group_members("g"),
            Ok(vec!["b".into(), "c".into(), "d".into()])
        );
        assert_eq!(
            h.set_membership("g", "", true),
            Err(MembershipError::Invalid)
        );
    }

    /// alice on two devices, bob on one, carol offline: all in g.
    fn group() -> H {
        let mut h = H::new(ImConfig::default());
        for uid in ["alice", "bob", "carol"] {
            h.member("g", uid, true);
        }
        h.login(1, "alice", "phone", 0);
        h.login(2, "alice", "laptop", 0);
        h.login(3, "bob", "phone", 0);
        h
    }

    fn send_frame(gid: &str, cmid: &str) -> proto::ClientFrame {
        proto::ClientFrame {
            id: 7,
            body: Some(C::Send(proto::SendMessage {
                group_id: gid.into(),
                client_msg_id: cmid.into(),
                content: b"x".to_vec(),
                ..Default::default()
            })),
        }
    }

    #[test]
    fn a_send_to_a_group_not_cached_waits_for_its_members_and_holds_the_input_meanwhile() {
        let mut h = group();
        h.core.on_frame(1, send_frame("g", "m1"), h.now);
        assert!(h.core.is_waiting(1), "the input waits");
        assert!(h.core.take_batch().is_none(), "nothing accepted yet");
        let (rid, req) = h.core.poll_read().expect("a read");
        assert_eq!(
            req,
            crate::im::core::ReadRequest::Members { gid: "g".into() }
        );
        let answer = req.run(&h.store);
        assert_eq!(h.core.handle_read(rid, answer, h.now), Some(1));
        assert!(!h.core.is_waiting(1));
        let out = h.turn();
        assert_eq!(send_ok(&out, 1).map(|ok| ok.seq), Some(1));
        // Cached now: the next send reads nothing.
        h.core.on_frame(1, send_frame("g", "m2"), h.now);
        assert!(h.core.poll_read().is_none());
        assert!(!h.core.is_waiting(1));
    }

    #[test]
    fn members_read_before_a_membership_change_is_durable_are_not_cached_and_read_again() {
        let mut h = group();
        h.core.on_frame(1, send_frame("g", "m1"), h.now);
        let (rid, req) = h.core.poll_read().expect("a read");
        let stale = req.run(&h.store);
        h.member("g", "dave", true);
        assert_eq!(h.core.handle_read(rid, stale, h.now), Some(1));
        assert!(h.core.is_waiting(1), "the send waits for a second read");
        let out = h.turn();
        assert!(send_ok(&out, 1).is_some());
        assert_eq!(
            h.store.max_seq("dave"),
            Ok(1),
            "dave, who joined first, has it"
        );
    }

    #[test]
    fn an_admin_request_for_a_group_not_cached_is_told_when_its_members_are() {
        let mut h = group();
        let rid = h.core.warm_group(5, "g").expect("a read");
        assert_eq!(
            h.core.warm_group(5, ""),
            None,
            "no group id, nothing to read"
        );
        let (taken, req) = h.core.poll_read().expect("the read");
        assert_eq!(taken, rid);
        let answer = req.run(&h.store);
        assert_eq!(h.core.handle_read(rid, answer, h.now), None);
        let out: Vec<Output> = h.core.drain_output().collect();
        assert!(
            matches!(&out[..], [Output::AdminRead { admin: 5, rid: r, answer: crate::im::core::ReadAnswer::Members(Ok(m)) }] if *r == rid && m.len() == 3),
            "{out:?}"
        );
        assert_eq!(h.core.warm_group(5, "g"), None, "cached");
        assert_eq!(
            h.core.set_membership("g", "dave", true),
            Ok(Some(h.core.pending_batch_id()))
        );
    }

    #[test]
    fn a_group_message_reaches_every_inbox_and_every_device_but_the_sending_one() {
        let mut h = group();
        h.member("other", "bob", true);
        let out = h.group_send(1, "g", "m1", "hello");
        let ok = send_ok(&out, 1).expect("SendOk");
        assert_eq!((ok.seq, ok.duplicate), (1, false));
        assert!(
            messages_to(&out, 1).is_empty(),
            "back to the sending device"
        );
        for conn in [2, 3] {
            assert_eq!(messages_to(&out, conn), vec![(1, "hello".into())]);
        }
        for uid in ["alice", "bob", "carol"] {
            let m = h.store.messages_after(uid, 0, 10).unwrap();
            assert_eq!(m.len(), 1, "{uid}");
            let m = wire::to_proto(&m[0]).unwrap();
            assert_eq!(
                (m.group_id.as_str(), m.to_uid.as_str(), m.from_uid.as_str()),
                ("g", "", "alice")
            );
            assert_eq!(m.from_device, "phone");
        }
        let out = h.group_send(2, "g", "m2", "from the laptop");
        assert_eq!(messages_to(&out, 1), vec![(2, "from the laptop".into())]);
        assert!(messages_to(&out, 2).is_empty());
        // The body is encoded once and shared by every inbox of the send.
        h.warm("g");
        h.core.on_frame(
            1,
            crate::im::proto::ClientFrame {
                id: 9,
                body: Some(crate::im::proto::client_frame::Body::Send(
                    crate::im::proto::SendMessage {
                        group_id: "g".into(),
                        client_msg_id: "m3".into(),
                        content: b"shared".to_vec(),
                        ..Default::default()
                    },
                )),
            },
            h.now,
        );
        let (_, batch) = h.core.take_batch().unwrap();
        let [send] = &batch.sends[..] else {
            panic!("one send: {:?}", batch.sends)
        };
        assert_eq!(&*send.from, "alice", "the sender's inbox first");
        assert_eq!(send.to.len(), 2, "to every other member");
        let sents = h.store.apply(&batch);
        let bodies: Vec<_> = ["alice", "bob", "carol"]
            .map(|u| h.store.messages_after(u, 0, 10).unwrap())
            .into_iter()
            .map(|m| m.last().unwrap().body.clone())
            .collect();
        assert!(bodies
            .windows(2)
            .all(|w| std::sync::Arc::ptr_eq(&w[0], &w[1])));
        assert_eq!(sents[0].to_seqs.len(), 2);
    }

    #[test]
    fn a_group_send_is_deduped_and_refused_to_non_members() {
        let mut h = group();
        let first = send_ok(&h.group_send(1, "g", "same", "x"), 1).unwrap();
        let again = send_ok(&h.group_send(1, "g", "same", "x"), 1).unwrap();
        assert_eq!((again.seq, again.duplicate), (first.seq, true));
        assert_eq!(h.store.max_seq("carol"), Ok(1), "stored once");
        h.login(4, "dave", "phone", 0);
        let out = h.group_send(4, "g", "m", "let me in");
        assert_eq!(error_code(&out, 4), Some(ErrorCode::Forbidden));
        assert_eq!(h.store.max_seq("dave"), Ok(0));
        assert_eq!(h.store.max_seq("bob"), Ok(1), "nothing stored");
        let both = h.req(
            1,
            8,
            crate::im::proto::client_frame::Body::Send(crate::im::proto::SendMessage {
                to_uid: "bob".into(),
                group_id: "g".into(),
                client_msg_id: "both".into(),
                content: vec![],
            }),
        );
        assert_eq!(error_code(&both, 1), Some(ErrorCode::BadRequest));
    }

    #[test]
    fn a_removed_member_gets_nothing_sent_after_the_removal_and_keeps_its_history() {
        let mut h = group();
        h.group_send(1, "g", "before", "one");
        let out = h.member("g", "bob", false);
        assert_eq!(group_changes(&out, 3), vec![("g".into(), false)]);
        let out = h.group_send(1, "g", "after", "two");
        assert!(messages_to(&out, 3).is_empty());
        assert_eq!(h.store.max_seq("bob"), Ok(1), "history kept, nothing new");
        assert_eq!(h.store.max_seq("carol"), Ok(2));
        let out = h.group_send(3, "g", "m", "still here?");
        assert_eq!(error_code(&out, 3), Some(ErrorCode::Forbidden));
    }

    #[test]
    fn a_member_added_after_the_group_was_used_can_send_and_receive_at_once() {
        let mut h = H::new(ImConfig::default());
        h.member("g", "alice", true);
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.group_send(1, "g", "a", "alone");
        let out = h.group_send(2, "g", "b", "not yet");
        assert_eq!(error_code(&out, 2), Some(ErrorCode::Forbidden));
        h.member("g", "bob", true);
        let out = h.group_send(2, "g", "c", "now");
        assert!(send_ok(&out, 2).is_some(), "{out:?}");
        assert_eq!(messages_to(&out, 1), vec![(2, "now".into())]);
        let out = h.group_send(1, "g", "d", "welcome");
        assert_eq!(messages_to(&out, 2).len(), 1);
    }

    #[test]
    fn an_offline_member_catches_up_at_login() {
        let mut h = group();
        h.group_send(1, "g", "a", "one");
        h.group_send(3, "g", "b", "two");
        let out = h.login(5, "carol", "phone", 0);
        assert_eq!(login_groups(&out, 5), ["g"]);
        assert_eq!(
            messages_to(&out, 5),
            vec![(1, "one".into()), (2, "two".into())]
        );
        assert!(
            !h.core.users.contains_key("dave"),
            "nobody outside the group was loaded"
        );
    }

    #[test]
    fn an_admin_group_send_may_come_from_a_non_member() {
        let mut h = group();
        h.warm("g");
        h.core
            .admin_send(
                77,
                "system",
                super::super::Target::Group("g"),
                "sys-1".into(),
                b"notice".to_vec(),
                h.now,
            )
            .unwrap();
        let out = h.turn();
        assert!(out.iter().any(|o| matches!(
            o,
            Output::AdminSent {
                admin: 77,
                seq: 1,
                duplicate: false
            }
        )));
        for conn in [1, 2, 3] {
            assert_eq!(messages_to(&out, conn), vec![(1, "notice".into())]);
        }
        assert_eq!(h.store.max_seq("system"), Ok(1), "the sender's own copy");
        h.warm("nobody");
        assert_eq!(
            h.core.admin_send(
                78,
                "system",
                super::super::Target::Group("nobody"),
                "sys-2".into(),
                vec![],
                h.now,
            ),
            Err(super::super::AdminSendError::NoSuchGroup)
        );
        assert!(h.core.take_batch().is_none(), "nothing written");
    }

    #[test]
    fn the_groups_used_lately_are_sent_to_without_reading_the_store() {
        let mut h = group();
        h.member("other", "alice", true);
        h.member("other", "bob", true);
        h.group_send(1, "g", "m1", "hello");
        h.group_send(1, "other", "m2", "hi");
        let send = C::Send(proto::SendMessage {
            group_id: "g".into(),
            client_msg_id: "m3".into(),
            content: b"again".to_vec(),
            ..Default::default()
        });
        let (out, _) = h.req_failing(1, 7, send, "g");
        assert_eq!(
            error_code(&out, 1),
            None,
            "the members of g were read again"
        );
        assert!(send_ok(&out, 1).is_some());
        assert_eq!(messages_to(&out, 3), vec![(3, "again".into())]);
    }

    #[test]
    fn the_group_cache_holds_groups_weighing_up_to_its_limit_in_all_and_starts_over_past_it() {
        let mut h = group();
        h.member("b", "bob", true);
        // g weighs 4 (3 members and 1), b 2; b is forgotten when its membership changes.
        h.group_send(1, "g", "m1", "x");
        h.group_send(3, "b", "m2", "x");
        h.member("b", "carol", true);
        let g_is_cached = |h: &mut H, cmid: &str| {
            let send = C::Send(proto::SendMessage {
                group_id: "g".into(),
                client_msg_id: cmid.into(),
                content: b"x".to_vec(),
                ..Default::default()
            });
            let (out, _) = h.req_failing(1, 7, send, "g");
            error_code(&out, 1).is_none()
        };
        // A group weighing the rest of the limit: the cache is full, not past it.
        let big = Big {
            inner: &h.store,
            members: GROUP_CACHE_WEIGHT.saturating_sub(4 + 1),
        };
        let send = C::Send(proto::SendMessage {
            group_id: "big".into(),
            client_msg_id: "m3".into(),
            content: b"x".to_vec(),
            ..Default::default()
        });
        h.core.on_frame(
            1,
            proto::ClientFrame {
                id: 7,
                body: Some(send),
            },
            h.now,
        );
        while let Some((rid, req)) = h.core.poll_read() {
            let answer = req.run(&big);
            h.core.handle_read(rid, answer, h.now);
        }
        assert_eq!(error_code(&h.turn(), 1), Some(ErrorCode::Forbidden));
        assert!(g_is_cached(&mut h, "m4"));
        // Then a group of nobody, weighing 1: past the limit, the cache starts over.
        let out = h.group_send(1, "nobody", "m5", "x");
        assert_eq!(error_code(&out, 1), Some(ErrorCode::Forbidden));
        assert!(!g_is_cached(&mut h, "m6"));
    }

    /// The memory store with one more group, "big", of `members` members (not the users of
    /// the tests), without the cost of writing them to the memory store.
    struct Big<'a> {
        inner: &'a MemoryStore,
        members: usize,
    }

    impl StoreRead for Big<'_> {
        fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
            self.inner.max_seq(uid)
        }
        fn messages_after(
            &self,
            uid: &str,
            after: u64,
            limit: usize,
        ) -> Result<Vec<StoredMessage>, ReadError> {
            self.inner.messages_after(uid, after, limit)
        }
        fn cursor(&self, uid: &str, device_id: &str) -> u64 {
            self.inner.cursor(uid, device_id)
        }
        fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
            self.inner.cursors(uid)
        }
        fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
            self.inner.recent_sends(uid)
        }
        fn friends(&self, uid: &str) -> Vec<String> {
            self.inner.friends(uid)
        }
        fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
            if gid != "big" {
                return self.inner.group_members(gid);
            }
            Ok((0..self.members).map(|i| format!("u{i:07}")).collect())
        }
        fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
            self.inner.group_size(gid)
        }
        fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
            self.inner.is_member(gid, uid)
        }
        fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
            self.inner.groups_of(uid)
        }
    }
}
