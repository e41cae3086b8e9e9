//! Key names. Every key of one user (or one group) carries its id as a Redis Cluster hash tag,
//! so that each script touches one slot (docs/CLUSTER.md, "What Redis holds").

/// Redis Cluster hashes the text between a key's first `{` and the next `}`; an empty tag
/// hashes the whole key instead. An id that begins with `}` would make the tag empty, so ids
/// that begin with `}` or `~` get one more `~` in front: the written form is still one per id,
/// and its tag is never empty.
fn tagged(prefix: &str, id: &str, suffix: &str) -> String {
    let escape = id.starts_with(['}', '~']);
    let mut k = String::with_capacity(prefix.len() + id.len() + suffix.len() + 3);
    k.push_str(prefix);
    k.push('{');
    if escape {
        k.push('~');
    }
    k.push_str(id);
    k.push('}');
    k.push_str(suffix);
    k
}

/// The keys of one user's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UserKeys {
    /// The inbox's highest seq (a counter).
    pub(crate) seq: String,
    /// The inbox: a stream with one entry `<seq>-1` per message.
    pub(crate) inbox: String,
    /// Idempotency key -> seq of the newest appends.
    pub(crate) ids: String,
    /// The same idempotency keys, oldest first, for the bound.
    pub(crate) idq: String,
    /// Device id -> delivery cursor.
    pub(crate) cursors: String,
    pub(crate) friends: String,
    pub(crate) groups: String,
    /// Online device id -> the node it is connected to.
    pub(crate) devices: String,
    /// The presence version: raised each time the user comes online or goes offline, so
    /// that a node can tell a newer state from an older one heard later.
    pub(crate) presence: String,
}

impl UserKeys {
    pub(crate) fn of(uid: &str) -> UserKeys {
        UserKeys {
            seq: tagged("im:", uid, ":seq"),
            inbox: tagged("im:", uid, ":inbox"),
            ids: tagged("im:", uid, ":ids"),
            idq: tagged("im:", uid, ":idq"),
            cursors: tagged("im:", uid, ":cur"),
            friends: tagged("im:", uid, ":friends"),
            groups: tagged("im:", uid, ":groups"),
            devices: tagged("im:", uid, ":devs"),
            presence: tagged("im:", uid, ":pv"),
        }
    }
}

/// The pub/sub channel of one user: what nodes publish about its inbox.
pub(crate) fn channel(uid: &str) -> String {
    tagged("im:", uid, ":ch")
}

/// The channel every node hears: news any node may need (group membership changes).
pub(crate) const CLUSTER_CHANNEL: &str = "im:cluster";

/// The member set of a group.
pub(crate) fn group_members(gid: &str) -> String {
    tagged("im:g:", gid, ":members")
}

/// Every node's lease: a sorted set of node id by the time (Redis's clock, ms) it runs out.
pub(crate) const NODES: &str = "im:nodes";

/// The uids a node has had devices of since it last started (what to clean up after it).
pub(crate) fn node_users(node: &str) -> String {
    tagged("im:node:", node, ":users")
}

/// Held by the node that cleans up after a dead one, so that only one does.
pub(crate) fn node_reaper(node: &str) -> String {
    tagged("im:node:", node, ":reaper")
}

/// The idempotency key of an append: the sender and its `client_msg_id`, the sender's length
/// first, so that no two (sender, id) pairs give the same key whatever bytes they hold.
pub(crate) fn idempotency_key(from_uid: &str, client_msg_id: &str) -> String {
    format!("{}:{from_uid}{client_msg_id}", from_uid.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes (the rule of its `keyHashSlot`).
    fn hashed(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    fn all(k: &UserKeys) -> [&str; 9] {
        [
            &k.seq,
            &k.inbox,
            &k.ids,
            &k.idq,
            &k.cursors,
            &k.friends,
            &k.groups,
            &k.devices,
            &k.presence,
        ]
    }

    #[test]
    fn every_key_of_a_user_hashes_the_same_text_whatever_the_uid_holds() {
        for uid in ["alice", "}x", "~y", "a}b", "{a}", "}", "~", "a{b", "x:y}"] {
            let k = UserKeys::of(uid);
            let tag = hashed(&k.seq);
            assert!(!tag.is_empty(), "{uid:?}");
            assert_ne!(tag, k.seq, "{uid:?}: the tag is used, not the whole key");
            for key in all(&k) {
                assert_eq!(hashed(key), tag, "{uid:?}: {key:?}");
            }
        }
    }

    #[test]
    fn different_ids_never_share_a_key() {
        let ids = ["a", "}a", "~}a", "~a", "~~a", "}", "~", "~}", "}~"];
        let mut seen = std::collections::HashSet::new();
        for uid in ids {
            assert!(seen.insert(UserKeys::of(uid).seq), "{uid:?}");
            assert!(seen.insert(group_members(uid)), "{uid:?}");
        }
        assert_eq!(UserKeys::of("}x").seq, "im:{~}x}:seq");
        assert_eq!(UserKeys::of("~y").inbox, "im:{~~y}:inbox");
        assert_eq!(UserKeys::of("bob").cursors, "im:{bob}:cur");
        assert_eq!(group_members("g1"), "im:g:{g1}:members");
    }

    #[test]
    fn idempotency_keys_of_different_senders_differ() {
        assert_ne!(idempotency_key("ab", "c"), idempotency_key("a", "bc"));
        assert_ne!(idempotency_key("a\0", "b"), idempotency_key("a", "\0b"));
        assert_eq!(idempotency_key("alice", "m1"), "5:alicem1");
    }
}
