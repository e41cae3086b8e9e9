//! Presence across nodes (docs/CLUSTER.md, "How the nodes work together"): which node each
//! online device is on, and node leases on Redis's clock, so that the devices of a node that
//! died are found and taken offline by another.
//!
//! The functions behind it (in the library of `super`): `imgate_device_on` (keys: devices,
//! friends; args: device, node, uid) records a device and answers the node it was on before,
//! if any, and whether it is the user's first; `imgate_device_off` (same keys and args)
//! removes it only if it is still this node's, answering whether the user has no device left
//! and whether this node still has one of the user's; `imgate_node_gone` (keys: devices,
//! friends; args: the dead node, uid, this node) removes every device of a node, answering
//! whether that took the user offline. Each of them that takes a user online or offline
//! publishes that on the channel of every friend, in the same step, so that friends hear a
//! user's comings and goings in the order Redis made them. `imgate_friend_news` (keys: the
//! friend's devices; args: uid, friend, `A` or `R`, node) tells `uid`'s channel that a
//! friendship was made or ended, with whether the friend is online;
//! `imgate_lease` (keys: the node set; args: node, lease ms) renews a lease from Redis's
//! clock, answering 1 when the node was not in the set (it had been reaped, or is new);
//! `imgate_expired` (keys: the node set) lists the nodes whose lease ran out.

use std::time::Duration;

use super::keys::{node_reaper, node_users, UserKeys, NODES};
use super::{Batch, RedisStore, WriteError};
pub use crate::store::Presence;

/// What recording a device online found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceOn {
    /// The node the same device was on until now (itself for a second login on the same
    /// node): that connection is to be kicked.
    pub replaced_on: Option<String>,
    /// The user had no device online before: friends are to be told it came online.
    pub first: bool,
}

fn fcall(name: &str, keys: &[String]) -> redis::Cmd {
    let mut c = redis::cmd("FCALL");
    c.arg(name).arg(keys.len()).arg(keys);
    c
}

/// The keys of a presence change of `uid`: its devices, its friends, its presence version.
fn presence_keys(uid: &str) -> [String; 3] {
    let k = UserKeys::of(uid);
    [k.devices, k.friends, k.presence]
}

impl RedisStore {
    /// Records `device` of `uid` as connected to `node`.
    ///
    /// # Errors
    /// Redis could not be reached; the record may or may not have been made, and making it
    /// again is harmless but for `first`, which a retry answers as `false`.
    pub fn device_on(
        &mut self,
        node: &str,
        uid: &str,
        device: &str,
    ) -> Result<DeviceOn, WriteError> {
        let mut b = Batch::default();
        let mut on = fcall("imgate_device_on", &presence_keys(uid));
        on.arg(device).arg(node).arg(uid);
        b.push(on, true);
        let mut users = redis::cmd("SADD");
        users.arg(node_users(node)).arg(uid);
        b.push(users, false);
        let ((prev, first),): ((String, u8),) = self.run(&b)?;
        Ok(DeviceOn {
            replaced_on: (!prev.is_empty()).then_some(prev),
            first: first != 0,
        })
    }

    /// Records `device` of `uid` as gone from `node`, unless a newer login moved it
    /// elsewhere. Answers whether the user has no device online left (friends are to be told
    /// it went offline).
    ///
    /// # Errors
    /// Redis could not be reached; repeating the call is harmless.
    pub fn device_off(&mut self, node: &str, uid: &str, device: &str) -> Result<bool, WriteError> {
        let mut b = Batch::default();
        let mut off = fcall("imgate_device_off", &presence_keys(uid));
        off.arg(device).arg(node).arg(uid);
        b.push(off, true);
        let ((last, mine),): ((u8, u8),) = self.run(&b)?;
        if mine == 0 {
            let mut rem = Batch::default();
            let mut c = redis::cmd("SREM");
            c.arg(node_users(node)).arg(uid);
            rem.push(c, false);
            self.run::<()>(&rem)?;
        }
        Ok(last != 0)
    }

    /// Records each (uid, device, on) change of `node`'s devices, as [`RedisStore::device_on`]
    /// and [`RedisStore::device_off`] do, in one round trip (two when a user's last device
    /// here went). At most one change per device.
    ///
    /// # Errors
    /// Redis could not be reached; making the same changes again is harmless.
    pub fn record_devices(
        &mut self,
        node: &str,
        changes: &[(&str, &str, bool)],
    ) -> Result<(), WriteError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut b = Batch::default();
        for &(uid, device, on) in changes {
            let name = if on {
                "imgate_device_on"
            } else {
                "imgate_device_off"
            };
            let mut c = fcall(name, &presence_keys(uid));
            c.arg(device).arg(node).arg(uid);
            b.push(c, true);
            if on {
                let mut users = redis::cmd("SADD");
                users.arg(node_users(node)).arg(uid);
                b.push(users, false);
            }
        }
        let answers: Vec<(redis::Value, u8)> = self.run(&b)?;
        // The users this node has no device of left, unless one came on in the same changes.
        let on: std::collections::HashSet<&str> = changes
            .iter()
            .filter_map(|&(uid, _, on)| on.then_some(uid))
            .collect();
        let mut rem = Batch::default();
        for (&(uid, _, is_on), (_, mine)) in changes.iter().zip(&answers) {
            if !is_on && *mine == 0 && !on.contains(uid) {
                let mut c = redis::cmd("SREM");
                c.arg(node_users(node)).arg(uid);
                rem.push(c, false);
            }
        }
        if !rem.is_empty() {
            self.run::<()>(&rem)?;
        }
        Ok(())
    }

    /// The devices of `uid` online, each with its node: (device id, node id), by device id.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn devices(&mut self, uid: &str) -> Result<Vec<(String, String)>, WriteError> {
        let mut d: Vec<(String, String)> = self
            .conn
            .query(redis::cmd("HGETALL").arg(UserKeys::of(uid).devices))?;
        d.sort();
        Ok(d)
    }

    /// Renews `node`'s lease for `lease` from now on Redis's clock (nodes' clocks need not
    /// agree). Answers `true` when the node had no lease: it is new, or it was taken for dead
    /// and its devices were removed, which it must then record again.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn renew_lease(&mut self, node: &str, lease: Duration) -> Result<bool, WriteError> {
        let mut b = Batch::default();
        let mut c = fcall("imgate_lease", &[NODES.to_owned()]);
        c.arg(node).arg(lease.as_millis() as u64);
        b.push(c, true);
        let (added,): (u8,) = self.run(&b)?;
        Ok(added != 0)
    }

    /// The nodes whose lease ran out, by id.
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn expired_nodes(&mut self) -> Result<Vec<String>, WriteError> {
        let mut b = Batch::default();
        b.push(fcall("imgate_expired", &[NODES.to_owned()]), true);
        let (mut nodes,): (Vec<String>,) = self.run(&b)?;
        nodes.sort();
        Ok(nodes)
    }

    /// Cleans up after `dead`, a node whose lease ran out, as node `by`: removes every device
    /// it had and its lease. Answers the users that this took offline, whose friends are told
    /// (by Redis, on their channels). Only
    /// one node cleans up after a dead one at a time (a claim that lasts `claim`); the others
    /// get an empty answer.
    ///
    /// # Errors
    /// Redis could not be reached; the claim then runs out and the cleanup is made again,
    /// by this node or another, without answering again the users already taken offline.
    pub fn reap_node(
        &mut self,
        dead: &str,
        by: &str,
        claim: Duration,
    ) -> Result<Vec<String>, WriteError> {
        let claimed: Option<String> = self.conn.query(
            redis::cmd("SET")
                .arg(node_reaper(dead))
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(claim.as_millis() as u64),
        )?;
        if claimed.is_none() {
            return Ok(Vec::new());
        }
        let mut users: Vec<String> = self
            .conn
            .query(redis::cmd("SMEMBERS").arg(node_users(dead)))?;
        users.sort();
        let mut offline = Vec::new();
        if !users.is_empty() {
            let mut b = Batch::default();
            for uid in &users {
                let mut c = fcall("imgate_node_gone", &presence_keys(uid));
                c.arg(dead).arg(uid.as_str()).arg(by);
                b.push(c, true);
            }
            let gone: Vec<u8> = self.run(&b)?;
            offline = users
                .into_iter()
                .zip(gone)
                .filter_map(|(u, g)| (g != 0).then_some(u))
                .collect();
        }
        let mut b = Batch::default();
        let mut del = redis::cmd("DEL");
        del.arg(node_users(dead));
        b.push(del, false);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(NODES).arg(dead);
        b.push(zrem, false);
        self.run::<()>(&b)?;
        Ok(offline)
    }

    /// Tells `a` and `b`, on their channels, that their friendship was made (`present`) or
    /// ended, each with whether the other is online, as node `node`.
    ///
    /// # Errors
    /// Redis could not be reached; the news may have reached one of them.
    pub fn friendship_news(
        &mut self,
        a: &str,
        b: &str,
        present: bool,
        node: &str,
    ) -> Result<(), WriteError> {
        let mut batch = Batch::default();
        for (to, friend) in [(a, b), (b, a)] {
            let k = UserKeys::of(friend);
            let mut c = fcall("imgate_friend_news", &[k.devices, k.presence]);
            c.arg(to).arg(friend).arg(if present { "A" } else { "R" });
            c.arg(node);
            batch.push(c, false);
        }
        Ok(self.run::<()>(&batch)?)
    }

    /// The presence of each of `uids`: whether it has a device online, and the version of
    /// that state (0 for a user never online).
    ///
    /// # Errors
    /// Redis could not be reached.
    pub fn online(&mut self, uids: &[String]) -> Result<Vec<Presence>, WriteError> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = Batch::default();
        for uid in uids {
            let k = UserKeys::of(uid);
            let mut c = redis::cmd("HLEN");
            c.arg(k.devices);
            b.push(c, true);
            let mut c = redis::cmd("GET");
            c.arg(k.presence);
            b.push(c, true);
        }
        let n: Vec<Option<u64>> = self.run(&b)?;
        Ok(n.chunks(2)
            .map(|p| Presence {
                online: p[0].unwrap_or(0) > 0,
                version: p.get(1).copied().flatten().unwrap_or(0),
            })
            .collect())
    }
}
