//! Friendships and presence: a user is online while any of its devices is, and its friends
//! are told when that changes, or when a friendship made or ended makes it news to them.

use super::{frame, ConnId, Core};
use crate::im::proto::{self, server_frame};

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

    /// Whether any device of `uid` is online.
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
    use super::super::harness::{closes, frames_to, presence, H};
    use super::super::{ImConfig, CLOSE_REPLACED};
    use crate::im::proto::server_frame::Body as S;

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
}
