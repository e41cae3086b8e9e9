//! Friendships and presence: a user is online while any of its devices is, and its friends
//! are told when that changes, or when a friendship made or ended makes it news to them.
//!
//! On one node, the node knows every device and tells the friends itself. In a cluster, the
//! devices of a user may be on several nodes, so Redis decides when a user's first device
//! came online or its last went offline, and tells each friend on the friend's channel
//! (`route::Published::Presence`): this node only records its own devices
//! (`route::ClusterOp::Device`) and passes on what it hears.

use super::route::ClusterOp;
use super::{frame, ConnId, Core};
use crate::im::proto::{self, server_frame};
use crate::store::Presence;

impl Core {
    /// Sets or removes a symmetric friendship (admin API). Durable with the turn's batch.
    pub fn set_friendship(&mut self, a: &str, b: &str, present: bool) {
        self.batch
            .friendships
            .push((a.to_owned(), b.to_owned(), present));
    }

    /// A friendship made (or ended) is durable. While both are online it is news to both
    /// now: each learns the other's presence as if it had just come online (or gone offline).
    pub(super) fn friendship_committed(&mut self, a: &str, b: &str, present: bool) {
        if self.cfg.cluster {
            return self.route(ClusterOp::Friendship {
                a: a.to_owned(),
                b: b.to_owned(),
                present,
            });
        }
        for (x, y) in [(a, b), (b, a)] {
            if let Some(u) = self.users.get_mut(x) {
                u.friends.retain(|f| f != y);
                if present {
                    u.friends.push(y.to_owned());
                }
            }
        }
        for (x, y) in [(a, b), (b, a)] {
            if self.is_online(x) {
                self.tell_presence(y, x, present);
            }
        }
    }

    /// Redis's news that `friend` of `uid` came online or went offline: told to the devices
    /// of `uid` here unless they know it already, or know a newer state.
    pub(super) fn presence_heard(&mut self, uid: &str, friend: &str, p: Presence) {
        if let Some(online) = self.learn_presence(uid, friend, p) {
            self.tell_presence(uid, friend, online);
        }
    }

    /// The presence of `uid`'s friends as the store has it: what the devices of `uid` here
    /// did not know is told to them.
    pub(super) fn presence_read(&mut self, uid: &str, friends: &[String], read: &[Presence]) {
        for (friend, p) in friends.iter().zip(read) {
            self.presence_heard(uid, friend, *p);
        }
    }

    /// `uid`'s friends and their presence as the store has them once this node hears the
    /// user's channel: news published before that was missed, so a friendship ended
    /// meanwhile is one too (an online friend gone from the list is told offline).
    pub(super) fn friends_read(&mut self, uid: &str, friends: Vec<String>, read: &[Presence]) {
        let Some(user) = self.users.get_mut(uid) else {
            return;
        };
        let mut gone: Vec<String> = Vec::new();
        user.presence.retain(|f, p| {
            let kept = friends.contains(f);
            if !kept && p.online {
                gone.push(f.clone());
            }
            kept
        });
        self.presence_read(uid, &friends, read);
        if let Some(user) = self.users.get_mut(uid) {
            user.friends = friends;
        }
        for friend in gone {
            self.tell_presence(uid, &friend, false);
        }
    }

    /// Keeps `p` as the presence of `friend` of `uid` unless a newer one was heard. Returns
    /// whether `friend` is online when that changes what the devices of `uid` know.
    fn learn_presence(&mut self, uid: &str, friend: &str, p: Presence) -> Option<bool> {
        let user = self.users.get_mut(uid)?;
        let known = user.presence.entry(friend.to_owned()).or_default();
        if p.version <= known.version && known.version > 0 {
            return None;
        }
        let changed = known.online != p.online;
        *known = p;
        changed.then_some(p.online)
    }

    /// A node made (or ended) the friendship of `uid` and `friend`, whose presence is `p`:
    /// the cached friends of `uid` follow, and its devices here learn `friend`'s presence
    /// as [`Core::friendship_committed`] tells it on one node.
    pub(super) fn friend_heard(&mut self, uid: &str, friend: &str, present: bool, p: Presence) {
        let Some(u) = self.users.get_mut(uid) else {
            return;
        };
        u.friends.retain(|f| f != friend);
        // What the devices believe now: a read after the subscription held may have told
        // them already.
        let told = if present {
            u.friends.push(friend.to_owned());
            let known = u.presence.entry(friend.to_owned()).or_default();
            let believed = known.online;
            if p.version >= known.version {
                *known = p;
            }
            (p.online && !believed).then_some(true)
        } else {
            let known = u.presence.remove(friend);
            known.map_or(p.online, |k| k.online).then_some(false)
        };
        if let Some(online) = told {
            self.tell_presence(uid, friend, online);
        }
    }

    /// Whether any device of `uid` is online here.
    pub(super) fn is_online(&self, uid: &str) -> bool {
        self.users.get(uid).is_some_and(|u| !u.devices.is_empty())
    }

    /// Tells the friends of `uid` (cached: see `User::friends`) that it went offline (its
    /// last device closed).
    pub(super) fn broadcast_offline(&mut self, uid: &str) {
        let friends = self
            .users
            .get_mut(uid)
            .map(|u| std::mem::take(&mut u.friends))
            .unwrap_or_default();
        for friend in &friends {
            self.tell_presence(friend, uid, false);
        }
    }

    /// Sends `Presence{uid, online}` to every online device of `to`.
    pub(super) fn tell_presence(&mut self, to: &str, uid: &str, online: bool) {
        let Some(u) = self.users.get(to) else {
            return;
        };
        let conns: Vec<ConnId> = u.devices.values().copied().collect();
        for conn in conns {
            self.reply(
                conn,
                frame(
                    0,
                    server_frame::Body::Presence(proto::Presence {
                        uid: uid.to_owned(),
                        online,
                    }),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::harness::{answer_reads, closes, frames_to, presence, H};
    use super::super::reads::{LoginFacts, ReadAnswer};
    use super::super::route::{ClusterOp, Published};
    use super::super::{ImConfig, CLOSE_REPLACED};
    use crate::im::proto::{server_frame::Body as S, ClientFrame};
    use crate::store::Presence;

    #[test]
    fn presence_and_device_replacement() {
        let mut h = H::new(ImConfig::default());
        h.core.set_friendship("alice", "bob", true);
        h.turn();
        h.login(1, "alice", "phone", 0);
        let out = h.login(2, "bob", "phone", 0);
        let Some(S::LoginOk(ok)) = frames_to(&out, 2).into_iter().next() else {
            panic!()
        };
        assert_eq!(ok.online_friends, vec!["alice".to_owned()]);
        assert_eq!(presence(&out, 1), vec![("bob".into(), true)]);
        // A second device: no presence change.
        let out = h.login(3, "bob", "laptop", 0);
        assert!(presence(&out, 1).is_empty());
        // Same device again: the old connection is kicked with 4000, friends see nothing.
        let out = h.login(4, "bob", "laptop", 0);
        assert!(frames_to(&out, 3).iter().any(|b| matches!(b, S::Kicked(_))));
        assert_eq!(closes(&out), vec![(3, CLOSE_REPLACED)]);
        assert!(presence(&out, 1).is_empty());
        let out = h.close(3);
        assert!(
            presence(&out, 1).is_empty(),
            "closing the kicked one changes nothing"
        );
        h.close(2);
        let out = h.close(4);
        assert_eq!(presence(&out, 1), vec![("bob".into(), false)]);
    }

    #[test]
    fn a_friendship_made_or_ended_while_online_is_pushed_once_durable() {
        let mut h = H::new(ImConfig::default());
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.core.set_friendship("alice", "bob", true);
        assert!(
            h.core.drain_output().next().is_none(),
            "nothing before it is durable"
        );
        let out = h.turn();
        assert_eq!(presence(&out, 1), vec![("bob".into(), true)]);
        assert_eq!(presence(&out, 2), vec![("alice".into(), true)]);
        // With carol offline, only she would have news: nothing is sent.
        h.core.set_friendship("alice", "carol", true);
        assert!(presence(&h.turn(), 1).is_empty());
        h.core.set_friendship("alice", "bob", false);
        let out = h.turn();
        assert_eq!(presence(&out, 1), vec![("bob".into(), false)]);
        assert_eq!(presence(&out, 2), vec![("alice".into(), false)]);
    }

    #[test]
    fn going_offline_is_told_to_the_friends_of_the_moment_without_a_read() {
        let mut h = H::new(ImConfig::default());
        h.core.set_friendship("alice", "carol", true);
        h.turn();
        h.login(1, "alice", "phone", 0);
        h.login(2, "bob", "phone", 0);
        h.login(3, "carol", "phone", 0);
        // Made and ended after alice logged in: her friends are bob now, not carol.
        h.core.set_friendship("alice", "bob", true);
        h.core.set_friendship("alice", "carol", false);
        h.turn();
        h.core.on_close(1);
        assert!(h.core.poll_read().is_none(), "no read");
        let out = h.turn();
        assert_eq!(presence(&out, 2), vec![("alice".into(), false)]);
        assert!(presence(&out, 3).is_empty());
    }

    fn node() -> H {
        H::new(ImConfig {
            cluster: true,
            ..ImConfig::default()
        })
    }

    /// The device changes put out, as (uid, device, on).
    fn devices(h: &mut H) -> Vec<(String, String, bool)> {
        h.core
            .drain_routes()
            .filter_map(|r| match r {
                ClusterOp::Device { uid, device, on } => {
                    Some((uid.to_string(), device.to_string(), on))
                }
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_node_of_a_cluster_records_its_devices_and_tells_friends_only_what_redis_decided() {
        let mut h = node();
        h.core.set_friendship("alice", "bob", true);
        h.turn();
        assert!(h.core.drain_routes().any(|r| r
            == ClusterOp::Friendship {
                a: "alice".into(),
                b: "bob".into(),
                present: true
            }));
        h.login(1, "bob", "phone", 0);
        assert_eq!(devices(&mut h), vec![("bob".into(), "phone".into(), true)]);
        let out = h.login(2, "alice", "laptop", 0);
        assert_eq!(
            devices(&mut h),
            vec![("alice".into(), "laptop".into(), true)]
        );
        assert!(
            presence(&out, 1).is_empty(),
            "another node of alice may be online: Redis decides"
        );
        let online = Published::Presence {
            uid: "alice".into(),
            presence: Presence {
                online: true,
                version: 1,
            },
        };
        h.core.handle_published("bob", online, true, h.now);
        assert_eq!(presence(&h.turn(), 1), vec![("alice".into(), true)]);
        let out = h.close(2);
        assert_eq!(
            devices(&mut h),
            vec![("alice".into(), "laptop".into(), false)]
        );
        assert!(presence(&out, 1).is_empty());
        let offline = |version| Published::Presence {
            uid: "alice".into(),
            presence: Presence {
                online: false,
                version,
            },
        };
        h.core.handle_published("bob", offline(2), false, h.now);
        assert_eq!(presence(&h.turn(), 1), vec![("alice".into(), false)]);
        for stale_or_known in [1, 2] {
            let news = Published::Presence {
                uid: "alice".into(),
                presence: Presence {
                    online: stale_or_known == 1,
                    version: stale_or_known,
                },
            };
            h.core.handle_published("bob", news, false, h.now);
            assert!(presence(&h.turn(), 1).is_empty(), "{stale_or_known}");
        }
        // The store's answer after the subscription holds tells what was missed.
        h.core.handle_subscribed("bob");
        let online = Presence {
            online: true,
            version: 3,
        };
        h.store.presence = Some(vec![("alice".into(), online)]);
        let out = answer_reads(&mut h.core, &h.store, h.now);
        assert_eq!(presence(&out, 1), vec![("alice".into(), true)]);
    }

    #[test]
    fn a_friendship_heard_from_redis_is_news_when_the_friend_is_online() {
        let mut h = node();
        h.login(1, "bob", "phone", 0);
        let heard = |h: &mut H, present, online| {
            let news = Published::Friend {
                uid: "carol".into(),
                present,
                presence: Presence { online, version: 1 },
            };
            h.core.handle_published("bob", news, false, h.now);
            presence(&h.turn(), 1)
        };
        assert_eq!(heard(&mut h, true, true), vec![("carol".into(), true)]);
        assert_eq!(heard(&mut h, false, true), vec![("carol".into(), false)]);
        assert!(heard(&mut h, true, false).is_empty());
        // A friendship ended while the channel was not heard: the read after it holds tells.
        heard(&mut h, true, true);
        h.store.presence = Some(vec![(
            "carol".into(),
            Presence {
                online: true,
                version: 1,
            },
        )]);
        h.core.handle_subscribed("bob");
        let out = h.turn();
        assert_eq!(
            presence(&out, 1),
            vec![("carol".into(), false)],
            "no friend in the store"
        );
        h.core.set_friendship("bob", "carol", true);
        h.turn();
        h.core.handle_subscribed("bob");
        assert_eq!(presence(&h.turn(), 1), vec![("carol".into(), true)]);
        h.core.handle_subscribed("bob");
        assert!(presence(&h.turn(), 1).is_empty(), "known already");
        h.core.set_friendship("bob", "carol", false);
        h.turn();
        h.core.handle_subscribed("bob");
        assert_eq!(presence(&h.turn(), 1), vec![("carol".into(), false)]);
        // Nobody here to tell: nothing is.
        let news = Published::Presence {
            uid: "bob".into(),
            presence: Presence {
                online: true,
                version: 1,
            },
        };
        h.core.handle_published("dave", news, false, h.now);
        assert!(h.turn().is_empty());
    }

    #[test]
    fn login_ok_names_the_friends_online_anywhere_when_the_store_knows() {
        let mut h = node();
        h.login(1, "carol", "phone", 0);
        h.core.on_open(2, h.now);
        let login = h.login_frame("bob", "phone", 0);
        h.core.on_frame(
            2,
            ClientFrame {
                id: 1,
                body: Some(login),
            },
            h.now,
        );
        let (rid, _) = h.core.poll_read().expect("the login's read");
        let facts = LoginFacts {
            max_seq: 0,
            groups: vec![],
            cursor: 0,
            friends: vec!["alice".into(), "carol".into()],
            presence: Some(vec![
                Presence {
                    online: true,
                    version: 1,
                },
                Presence::default(),
            ]),
        };
        h.core.handle_read(rid, ReadAnswer::Login(Ok(facts)), h.now);
        let out = h.turn();
        let ok = frames_to(&out, 2)
            .into_iter()
            .find_map(|f| match f {
                S::LoginOk(ok) => Some(ok),
                _ => None,
            })
            .expect("LoginOk");
        assert_eq!(
            ok.online_friends,
            vec!["alice".to_owned()],
            "the store's answer, not this node's view (carol is on this node, not online anywhere)"
        );
        assert!(presence(&out, 1).is_empty());
    }

    #[test]
    fn a_lease_made_anew_records_every_device_here_again() {
        let mut h = node();
        h.login(1, "bob", "phone", 0);
        h.login(2, "bob", "laptop", 0);
        h.login(3, "carol", "phone", 0);
        devices(&mut h);
        h.core.handle_lease_made();
        let mut again = devices(&mut h);
        again.sort();
        assert_eq!(
            again,
            vec![
                ("bob".into(), "laptop".into(), true),
                ("bob".into(), "phone".into(), true),
                ("carol".into(), "phone".into(), true),
            ]
        );
        // A device of the same node replaced: it stays on.
        h.login(4, "carol", "phone", 0);
        assert_eq!(
            devices(&mut h),
            vec![("carol".into(), "phone".into(), true)]
        );
        h.close(3);
        assert!(
            devices(&mut h).is_empty(),
            "the replaced connection's device is not off"
        );
    }
}
