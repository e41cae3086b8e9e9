//! What the IM core needs from durable storage, behind a small trait so that the embedded
//! store can later be swapped for a networked one.
//!
//! The core reads through [`StoreRead`] (reads never wait on a disk sync) and describes every
//! change of one loop turn as a [`WriteBatch`], which the shell commits as one transaction off
//! the network thread (group commit) before the core releases any acknowledgement for it.
//! The store, not the core, gives each send its seqs and recognises a retry ([`Sent`]), so
//! that several writers may share an inbox.

pub(crate) mod assign;
pub(crate) mod filter;
pub mod memory;
pub(crate) mod reader;
pub mod records;
pub(crate) mod redb_store;
pub mod redis;
pub(crate) mod tail;
pub(crate) mod writer;

use std::sync::Arc;

/// An encoded message body, shared (never copied) by both inboxes it is appended to, the
/// storage thread and every delivery.
pub type Body = Arc<[u8]>;

/// A message as stored in one user's inbox.
///
/// `body` is the `imgate.v1.Message` encoding of every field but `seq` (see `im::wire`): the
/// two inboxes a send goes to share it. `server_time_ms` repeats the body's field so that
/// delivery metrics need no decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub server_time_ms: i64,
    pub body: Body,
}

/// An append to `owner`'s inbox, at the owner's next seq (`msg.seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    pub owner: Arc<str>,
    pub msg: StoredMessage,
}

/// A send the core accepted, not yet given a seq anywhere: the store dedupes it by
/// `(from, client_msg_id)` and appends `body` to the sender's inbox and to each of `to`'s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSend {
    pub from: Arc<str>,
    pub client_msg_id: String,
    pub server_time_ms: i64,
    pub body: Body,
    /// The other inboxes it goes to, each once, never the sender's.
    pub to: Vec<Arc<str>>,
}

/// What the store did with a [`NewSend`]: the seq of the sender's copy, whether an earlier
/// send with the same key had taken it (`duplicate`), and the seq in each of `to`'s inboxes,
/// in the same order. A duplicate's `to_seqs` name what that earlier send was given, or are
/// empty when the store knows every one was appended with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    pub duplicate: bool,
    pub to_seqs: Vec<u64>,
}

/// Everything one loop turn changes, committed atomically.
///
/// A taken batch is shared (`Arc`) by the storage thread, which commits it, and the IM core,
/// which acknowledges and delivers from it once committed: it is never copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// Accepted sends, in order; the commit answers each with a [`Sent`].
    pub sends: Vec<NewSend>,
    /// (uid, device_id, seq): delivery cursors moved by acks.
    pub cursors: Vec<(Arc<str>, Arc<str>, u64)>,
    /// (a, b, present): symmetric friendships set or removed.
    pub friendships: Vec<(String, String, bool)>,
    /// Group memberships that change: each one joins a non-member or removes a member,
    /// unless an earlier batch it was decided against was refused
    /// ([`CommitError::Unavailable`]). Stores apply them as set operations, so a repeat is
    /// harmless.
    pub memberships: Vec<Membership>,
}

/// A [`WriteBatch`] once its sends have seqs: what the embedded store logs and applies.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StoredBatch {
    /// Appends to inboxes, each inbox in seq order.
    pub appends: Vec<Append>,
    /// (uid, client_msg_id, seq in the sender's inbox): idempotency keys, in send order.
    pub sends: Vec<(Arc<str>, String, u64)>,
    /// (uid, device_id, seq): delivery cursors moved by acks.
    pub cursors: Vec<(Arc<str>, Arc<str>, u64)>,
    /// (a, b, present): symmetric friendships set or removed.
    pub friendships: Vec<(String, String, bool)>,
    /// Group memberships that change: each one joins a non-member or removes a member.
    pub memberships: Vec<Membership>,
}

/// A user joining (or leaving) a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Membership {
    pub gid: Arc<str>,
    pub uid: Arc<str>,
    pub joined: bool,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.sends.is_empty()
            && self.cursors.is_empty()
            && self.friendships.is_empty()
            && self.memberships.is_empty()
    }
}

/// A read the store could not complete (an I/O error, a corrupt value). What depends on it
/// is refused, never guessed: a seq assigned after a wrong `max_seq` would overwrite
/// messages, and a duplicate taken for a new send would be stored twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadError(pub String);

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "store read failed: {}", self.0)
    }
}

impl<E: std::error::Error> From<E> for ReadError {
    fn from(e: E) -> Self {
        ReadError(e.to_string())
    }
}

/// Why a commit did not complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitError {
    /// The store cannot be trusted with another write (a failed disk write): the process
    /// stops rather than acknowledge anything that might not be durable.
    Broken(String),
    /// The store did not confirm the writes in time (Redis unreachable): their senders are
    /// told to retry, and the next commit tries again.
    Unavailable(String),
}

impl std::fmt::Display for CommitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommitError::Broken(e) => write!(f, "store commit failed: {e}"),
            CommitError::Unavailable(e) => write!(f, "store unavailable: {e}"),
        }
    }
}

/// Read access for the IM core. Cursors and friends degrade on a failed read (logged): a
/// device then gets messages again, or friends miss a presence.
/// A user's presence in a cluster: whether any device of it is online, and the version of
/// that state, raised at each change, so that of two states heard the newer one wins.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Presence {
    pub online: bool,
    pub version: u64,
}

pub trait StoreRead {
    /// Highest committed seq of `uid`'s inbox (0 when empty).
    fn max_seq(&self, uid: &str) -> Result<u64, ReadError>;
    /// Up to `limit` committed messages of `uid`'s inbox with seq > `after`, in seq order.
    fn messages_after(
        &self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError>;
    /// Stored delivery cursor of a device (0 when none).
    fn cursor(&self, uid: &str, device_id: &str) -> u64;
    /// Every stored cursor of `uid`: (device_id, seq), by device id.
    fn cursors(&self, uid: &str) -> Vec<(String, u64)>;
    /// The newest idempotency keys of `uid` (client_msg_id, seq in the sender's inbox), at most
    /// [`DEDUPE_KEEP`], oldest first.
    fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError>;
    /// The sender-inbox seq of the send of `uid` with this client_msg_id, if it is among the
    /// newest [`DEDUPE_KEEP`] (the newest such send, should an id have been used again).
    fn sent(&self, uid: &str, client_msg_id: &str) -> Result<Option<u64>, ReadError> {
        Ok(self
            .recent_sends(uid)?
            .into_iter()
            .rev()
            .find(|(id, _)| id == client_msg_id)
            .map(|(_, seq)| seq))
    }
    fn friends(&self, uid: &str) -> Vec<String>;
    /// The members of group `gid`, by uid (empty for a group nobody belongs to).
    fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError>;
    /// How many members group `gid` has.
    fn group_size(&self, gid: &str) -> Result<usize, ReadError>;
    fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError>;
    /// The groups `uid` belongs to, by group id.
    fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError>;
    /// The presence of each of `uids` anywhere in the cluster, or None for a store that does
    /// not hold presence (a single node knows its own devices).
    fn online(&self, _uids: &[String]) -> Result<Option<Vec<Presence>>, ReadError> {
        Ok(None)
    }
    /// The devices of `uid` online anywhere in the cluster, by device id, or None for a store
    /// that does not hold presence.
    fn online_devices(&self, _uid: &str) -> Result<Option<Vec<String>>, ReadError> {
        Ok(None)
    }
}

/// A durable store: what the storage thread commits through. The embedded
/// [`redb_store::RedbStore`] is the one implementation today; a networked backend would be
/// another.
pub trait Store: StoreRead + Send + Sync {
    /// Applies the batches atomically, in order, and answers each of their sends, batch by
    /// batch. With `sync`, they are durable on return. Reads see them once this returns.
    ///
    /// Errors: [`CommitError::Broken`] for a failed write, or a read the seqs or the dedupe
    /// depend on, after which nothing of the batches is applied and the store may not be
    /// written again; [`CommitError::Unavailable`] for a store that did not answer in time,
    /// after which part of the batches may be applied and committing them again applies the
    /// rest (every write is idempotent).
    fn commit(&self, batches: &[&WriteBatch], sync: bool) -> Result<Vec<Vec<Sent>>, CommitError>;
    /// One bounded step of upkeep that commits may leave behind (for the redb store: moving
    /// the commit log into the per-user tables). Returns whether more is due. The storage
    /// thread runs it between commits, so no step delays a commit by much.
    fn maintain(&self) -> Result<bool, String> {
        Ok(false)
    }
}

/// How many idempotency keys a store keeps per user, at least.
pub const DEDUPE_KEEP: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_error_says_the_store_read_failed_and_why() {
        assert_eq!(
            ReadError("disk gone".into()).to_string(),
            "store read failed: disk gone"
        );
    }
}
