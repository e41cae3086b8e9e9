//! What the IM core needs from durable storage, behind a small trait so that the embedded
//! store can later be swapped for a networked one.
//!
//! The core reads through [`StoreRead`] (reads never wait on a disk sync) and describes every
//! change of one loop turn as a [`WriteBatch`], which the shell commits as one transaction off
//! the network thread (group commit) before the core releases any acknowledgement for it.

pub mod memory;
pub mod redb_store;
pub mod writer;

use std::sync::Arc;

/// A message as stored in one user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub seq: u64,
    pub from_uid: String,
    pub to_uid: String,
    pub client_msg_id: String,
    pub from_device: String,
    pub content: Vec<u8>,
    pub server_time_ms: i64,
}

impl From<&StoredMessage> for crate::im::proto::Message {
    fn from(m: &StoredMessage) -> Self {
        crate::im::proto::Message {
            seq: m.seq,
            from_uid: m.from_uid.clone(),
            to_uid: m.to_uid.clone(),
            client_msg_id: m.client_msg_id.clone(),
            content: m.content.clone(),
            server_time_ms: m.server_time_ms,
            from_device: m.from_device.clone(),
        }
    }
}

impl From<crate::im::proto::Message> for StoredMessage {
    fn from(m: crate::im::proto::Message) -> Self {
        StoredMessage {
            seq: m.seq,
            from_uid: m.from_uid,
            to_uid: m.to_uid,
            client_msg_id: m.client_msg_id,
            from_device: m.from_device,
            content: m.content,
            server_time_ms: m.server_time_ms,
        }
    }
}

/// Everything one loop turn changes, committed atomically.
///
/// A taken batch is shared (`Arc`) by the storage thread, which commits it, and the IM core,
/// which acknowledges and delivers from it once committed: it is never copied.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WriteBatch {
    /// (owner uid, message): appends to inboxes, each at the owner's next seq. The message is
    /// shared with the core's cache of recent messages.
    pub appends: Vec<(String, Arc<StoredMessage>)>,
    /// (uid, client_msg_id, seq in the sender's inbox): idempotency keys.
    pub dedupe: Vec<(String, String, u64)>,
    /// (uid, device_id, seq): delivery cursors moved by acks.
    pub cursors: Vec<(String, String, u64)>,
    /// (a, b, present): symmetric friendships set or removed.
    pub friendships: Vec<(String, String, bool)>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.dedupe.is_empty()
            && self.cursors.is_empty()
            && self.friendships.is_empty()
    }
}

/// Read access for the IM core.
pub trait StoreRead {
    /// Highest committed seq of `uid`'s inbox (0 when empty).
    fn max_seq(&self, uid: &str) -> u64;
    /// Up to `limit` committed messages of `uid`'s inbox with seq > `after`, in seq order.
    fn messages_after(&self, uid: &str, after: u64, limit: usize) -> Vec<StoredMessage>;
    /// Stored delivery cursor of a device (0 when none).
    fn cursor(&self, uid: &str, device_id: &str) -> u64;
    /// Every stored cursor of `uid`: (device_id, seq), by device id.
    fn cursors(&self, uid: &str) -> Vec<(String, u64)>;
    /// The sender-inbox seq of an earlier accepted send with this client_msg_id.
    fn dedupe(&self, uid: &str, client_msg_id: &str) -> Option<u64>;
    fn friends(&self, uid: &str) -> Vec<String>;
}

/// A durable store: what the storage thread commits through. The embedded
/// [`redb_store::RedbStore`] is the one implementation today; a networked backend would be
/// another.
pub trait Store: StoreRead + Send + Sync {
    /// Applies the batches atomically, in order. With `sync`, they are durable on return.
    fn commit(&self, batches: &[&WriteBatch], sync: bool) -> Result<(), String>;
}

/// How many idempotency keys a store keeps per user, at least.
pub const DEDUPE_KEEP: usize = 1000;
