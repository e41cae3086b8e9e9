//! The Redis store behind the storage and read threads: [`RedisBackend`] implements
//! [`Store`] and [`StoreRead`] on a [`RedisStore`] it connects lazily, drops when a call
//! fails and connects again at the next call, so that a Redis that restarts costs the calls
//! made while it was away and nothing after.
//!
//! The writer and the reader each get their own backend (their own connection), so a read
//! never waits behind a commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{Changes, RedisStore, WriteError};
use crate::store::{
    CommitError, NewSend, Presence, ReadError, Sent, Store, StoreRead, StoredMessage, WriteBatch,
};

/// Where the cluster's Redis is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (`redis://host:port/db`).
    Single(String),
    /// Some nodes of a Redis Cluster; the client learns the rest from them.
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// A connection to the target, waiting at most `timeout` for it or for any answer.
    ///
    /// # Errors
    /// See [`RedisStore::connect`] and [`RedisStore::connect_cluster`].
    pub(crate) fn connect(&self, timeout: Duration) -> Result<RedisStore, WriteError> {
        match self {
            RedisTarget::Single(url) => RedisStore::connect(url, timeout),
            RedisTarget::Cluster(urls) => RedisStore::connect_cluster(urls, timeout),
        }
    }

    /// The addresses given.
    pub(crate) fn urls(&self) -> &[String] {
        match self {
            RedisTarget::Single(url) => std::slice::from_ref(url),
            RedisTarget::Cluster(urls) => urls,
        }
    }
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(url) => write!(f, "{url}"),
            RedisTarget::Cluster(urls) => write!(f, "cluster {}", urls.join(",")),
        }
    }
}

pub struct RedisBackend {
    target: RedisTarget,
    /// How long one connection attempt or one answer may take.
    timeout: Duration,
    /// How long a commit keeps trying (reconnecting between attempts) before it fails.
    commit_deadline: Duration,
    conn: Mutex<Option<RedisStore>>,
    /// Whether the last commit failed.
    down: AtomicBool,
    /// Replicas of each written primary that must have a commit (Redis `WAIT`).
    wait_replicas: u32,
}

impl RedisBackend {
    /// A backend that connects at its first call. `commit_deadline` bounds how long a commit
    /// retries before it is reported failed (after a failure, the next commit tries once);
    /// reads are tried once.
    pub fn new(target: RedisTarget, timeout: Duration, commit_deadline: Duration) -> RedisBackend {
        RedisBackend {
            target,
            timeout,
            commit_deadline,
            conn: Mutex::new(None),
            down: AtomicBool::new(false),
            wait_replicas: 0,
        }
    }

    /// The backend whose commits count as made only once `replicas` replicas of each
    /// primary they wrote to have acknowledged them: one that does not hear so within half
    /// the answer timeout is made again (every write is idempotent) until the commit
    /// deadline.
    pub fn waiting_for(self, replicas: u32) -> RedisBackend {
        RedisBackend {
            wait_replicas: replicas,
            ..self
        }
    }

    /// Connects now, so that a wrong address is reported at start-up.
    ///
    /// # Errors
    /// Redis cannot be reached or does not answer within the timeout.
    pub fn check(&self) -> Result<(), WriteError> {
        self.with(|_| Ok::<(), WriteError>(()))
    }

    fn connect(&self) -> Result<RedisStore, WriteError> {
        self.target.connect(self.timeout)
    }

    fn lock(&self) -> MutexGuard<'_, Option<RedisStore>> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the connection, connecting first when there is none. A failed call drops
    /// the connection, which may be broken halfway through an answer; one that failed on a
    /// connection made before (perhaps to a Redis that has restarted since) is made once
    /// more on a new one.
    fn with<T, E: From<WriteError>>(
        &self,
        mut f: impl FnMut(&mut RedisStore) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut guard = self.lock();
        let fresh = guard.is_none();
        let store = match &mut *guard {
            Some(s) => s,
            slot => slot.insert(self.connect()?),
        };
        let r = f(store);
        if r.is_ok() {
            return r;
        }
        *guard = None;
        if fresh {
            return r;
        }
        let r = f(guard.insert(self.connect()?));
        if r.is_err() {
            *guard = None;
        }
        r
    }

    fn commit_once(&self, batches: &[&WriteBatch]) -> Result<Vec<Vec<Sent>>, WriteError> {
        let sends: Vec<&NewSend> = batches.iter().flat_map(|b| &b.sends).collect();
        let changes = changes_of(batches);
        self.with(|s| {
            let mut sents = s.commit_sends(&sends)?.into_iter();
            s.commit(&changes)?;
            if self.wait_replicas > 0 {
                s.wait_replicas(self.wait_replicas, self.timeout / 2)?;
            }
            Ok(batches
                .iter()
                .map(|b| sents.by_ref().take(b.sends.len()).collect())
                .collect())
        })
    }
}

/// The changes of `batches` that need no seq, in order.
fn changes_of(batches: &[&WriteBatch]) -> Changes {
    let mut c = Changes::default();
    for b in batches {
        c.cursors.extend(
            b.cursors
                .iter()
                .map(|(uid, dev, seq)| (uid.to_string(), dev.to_string(), *seq)),
        );
        c.friendships.extend(b.friendships.iter().cloned());
        c.memberships.extend(b.memberships.iter().cloned());
    }
    c
}

impl From<WriteError> for ReadError {
    fn from(e: WriteError) -> Self {
        ReadError(e.0)
    }
}

impl Store for RedisBackend {
    /// Every write is idempotent, so a failed attempt is simply made again, on a new
    /// connection, until one succeeds or `commit_deadline` has passed. Durability is Redis's
    /// (its AOF settings): `sync` asks nothing more of it.
    fn commit(&self, batches: &[&WriteBatch], _sync: bool) -> Result<Vec<Vec<Sent>>, CommitError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        // While Redis is known to be away, one attempt: the sends waiting behind this commit
        // should hear so at once, not one deadline each.
        let patient = !self.down.load(Ordering::Relaxed);
        loop {
            match self.commit_once(batches) {
                Ok(sents) => {
                    self.down.store(false, Ordering::Relaxed);
                    return Ok(sents);
                }
                Err(e) if !patient || started.elapsed() + pause >= self.commit_deadline => {
                    self.down.store(true, Ordering::Relaxed);
                    return Err(CommitError::Unavailable(e.0));
                }
                Err(e) => {
                    log::warn!("{e}; trying again");
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

impl StoreRead for RedisBackend {
    fn max_seq(&self, uid: &str) -> Result<u64, ReadError> {
        self.with(|s| s.max_seq(uid))
    }

    fn messages_after(
        &self,
        uid: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, ReadError> {
        self.with(|s| s.messages_after(uid, after, limit))
    }

    fn cursor(&self, uid: &str, device_id: &str) -> u64 {
        degrade(self.with(|s| s.cursor(uid, device_id)), "a cursor")
    }

    fn cursors(&self, uid: &str) -> Vec<(String, u64)> {
        degrade(self.with(|s| s.cursors(uid)), "cursors")
    }

    /// Redis dedupes in its append function: nothing here needs the keys.
    fn recent_sends(&self, uid: &str) -> Result<Vec<(String, u64)>, ReadError> {
        Err(ReadError(format!(
            "the idempotency keys of {uid} stay in Redis"
        )))
    }

    fn friends(&self, uid: &str) -> Vec<String> {
        degrade(self.with(|s| s.friends(uid)), "friends")
    }

    fn group_members(&self, gid: &str) -> Result<Vec<String>, ReadError> {
        self.with(|s| s.group_members(gid))
    }

    fn group_size(&self, gid: &str) -> Result<usize, ReadError> {
        self.with(|s| s.group_size(gid))
    }

    fn is_member(&self, gid: &str, uid: &str) -> Result<bool, ReadError> {
        self.with(|s| s.is_member(gid, uid))
    }

    fn groups_of(&self, uid: &str) -> Result<Vec<String>, ReadError> {
        self.with(|s| s.groups_of(uid))
    }

    fn online(&self, uids: &[String]) -> Result<Option<Vec<Presence>>, ReadError> {
        self.with::<_, ReadError>(|s| Ok(s.online(uids)?)).map(Some)
    }

    fn online_devices(&self, uid: &str) -> Result<Option<Vec<String>>, ReadError> {
        let devices = self.with::<_, ReadError>(|s| Ok(s.devices(uid)?))?;
        Ok(Some(devices.into_iter().map(|(d, _node)| d).collect()))
    }
}

/// The answer of a read whose failure only costs a repeat delivery or a missed presence.
fn degrade<T: Default>(r: Result<T, ReadError>, what: &str) -> T {
    r.unwrap_or_else(|e| {
        log::warn!("{e}: {what} taken as none");
        T::default()
    })
}
