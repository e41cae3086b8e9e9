//! The Redis store's inbox contract (docs/CLUSTER.md), against real `redis-server` processes
//! started by the tests, each case twice: on one Redis with AOF `always`, and on a Redis
//! Cluster of three primaries. Dense seqs assigned by Redis, a body stored once and read back
//! through references, appends that land exactly once however often they are retried, bounded
//! idempotency keys, and what survives a `kill -9` of Redis.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::{RedisCluster, RedisProc};
use imgate::store::redis::{Changes, DeviceOn, RedisStore};
use imgate::store::{Body, Membership, DEDUPE_KEEP};
use imgate::store::{NewSend, Sent};

const TIMEOUT: Duration = Duration::from_secs(2);

/// What a case runs against.
enum Backend {
    One(RedisProc),
    Cluster(RedisCluster),
}

impl Backend {
    fn connect(&self) -> Result<RedisStore, imgate::store::redis::WriteError> {
        match self {
            Backend::One(r) => RedisStore::connect(&r.url(), TIMEOUT),
            Backend::Cluster(c) => RedisStore::connect_cluster(&c.urls(), TIMEOUT),
        }
    }

    /// Kills every Redis process with SIGKILL.
    fn kill9(&mut self) {
        match self {
            Backend::One(r) => r.kill9(),
            Backend::Cluster(c) => c.nodes.iter_mut().for_each(RedisProc::kill9),
        }
    }

    /// Starts every process again from its data.
    fn restart(&mut self) {
        match self {
            Backend::One(r) => r.restart(),
            Backend::Cluster(c) => c.restart_all(),
        }
    }
}

/// Each case as a test on one Redis (`one::`) and on a Redis Cluster (`cluster::`).
macro_rules! on_both {
    ($($case:ident),* $(,)?) => {
        mod one {
            $(#[test]
            fn $case() {
                super::$case(super::Backend::One(super::RedisProc::start()))
            })*
        }
        mod cluster {
            $(#[test]
            fn $case() {
                super::$case(super::Backend::Cluster(super::RedisCluster::start(3)))
            })*
        }
    };
}

on_both!(
    a_send_reaches_each_inbox_under_its_next_seq_and_reads_back_its_body,
    the_body_is_stored_once_per_send,
    a_retried_send_lands_exactly_once_in_each_inbox,
    the_newest_thousand_ids_of_an_inbox_are_remembered_and_no_more,
    seqs_stay_dense_when_several_nodes_append_to_one_inbox_at_once,
    cursors_only_rise_and_friendships_and_groups_are_kept_both_ways,
    what_redis_acknowledged_survives_its_kill_9_and_functions_it_lost_are_loaded_again,
    an_unreachable_redis_is_an_error_within_the_timeout,
    an_inbox_entry_that_does_not_parse_or_refers_to_nothing_is_an_error_not_a_guess,
    a_device_is_on_one_node_and_the_first_and_last_ones_are_told,
    a_dead_nodes_devices_are_taken_offline_once_by_one_node,
);

fn store(b: &Backend) -> RedisStore {
    b.connect().expect("connect to the test Redis")
}

fn body(text: &str) -> Body {
    Body::from(text.as_bytes())
}

fn send(from: &str, id: &str, to: &[&str]) -> NewSend {
    NewSend {
        from: from.into(),
        client_msg_id: id.into(),
        server_time_ms: 1_000 + id.len() as i64,
        body: body(&format!("{from}:{id}")),
        to: to.iter().map(|s| (*s).into()).collect(),
    }
}

/// The bodies of `uid`'s inbox, in seq order, checking that its seqs run 1, 2, 3...
fn inbox(s: &mut RedisStore, uid: &str) -> Vec<String> {
    let msgs = s.messages_after(uid, 0, 100_000).expect("read the inbox");
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.seq, i as u64 + 1, "{uid}'s seqs are dense");
    }
    assert_eq!(s.max_seq(uid), Ok(msgs.len() as u64));
    msgs.iter()
        .map(|m| String::from_utf8(m.body.to_vec()).expect("a test body"))
        .collect()
}

/// A raw connection, to look at or break what the store wrote.
fn raw(b: &Backend) -> Box<dyn redis::ConnectionLike> {
    match b {
        Backend::One(r) => Box::new(
            redis::Client::open(r.url())
                .and_then(|c| c.get_connection())
                .expect("connect"),
        ),
        Backend::Cluster(c) => Box::new(
            redis::cluster::ClusterClient::new(c.urls())
                .and_then(|c| c.get_connection())
                .expect("connect"),
        ),
    }
}

fn a_send_reaches_each_inbox_under_its_next_seq_and_reads_back_its_body(r: Backend) {
    let mut s = store(&r);
    let sent = s
        .commit_sends(&[
            send("alice", "m1", &["bob", "carol"]),
            send("bob", "m1", &["alice"]),
            send("alice", "m2", &["bob"]),
        ])
        .unwrap();
    // The senders' copies come first, then the references, each sender's in its order.
    assert_eq!(
        sent,
        vec![
            Sent {
                seq: 1,
                duplicate: false,
                to_seqs: vec![2, 1]
            },
            Sent {
                seq: 1,
                duplicate: false,
                to_seqs: vec![3]
            },
            Sent {
                seq: 2,
                duplicate: false,
                to_seqs: vec![3]
            },
        ]
    );
    assert_eq!(inbox(&mut s, "alice"), ["alice:m1", "alice:m2", "bob:m1"]);
    assert_eq!(inbox(&mut s, "bob"), ["bob:m1", "alice:m1", "alice:m2"]);
    assert_eq!(inbox(&mut s, "carol"), ["alice:m1"]);
    // Pages start after the given seq and stop at the limit; times are kept.
    let page = s.messages_after("bob", 1, 1).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!((page[0].seq, page[0].server_time_ms), (2, 1_002));
    assert_eq!(&*page[0].body, b"alice:m1");
    assert_eq!(s.messages_after("bob", 3, 10), Ok(vec![]));
    assert_eq!(s.messages_after("nobody", 0, 10), Ok(vec![]));
    assert_eq!(s.messages_after("bob", 0, 0), Ok(vec![]));
}

fn the_body_is_stored_once_per_send(r: Backend) {
    let mut s = store(&r);
    let big = "x".repeat(10_000);
    let mut g = send(
        "alice",
        "big",
        &["m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8"],
    );
    g.body = body(&big);
    s.commit_sends(&[g]).unwrap();
    let mut c = raw(&r);
    let used: Vec<(String, usize)> = ["alice", "m1", "m8"]
        .iter()
        .map(|u| {
            let v: redis::Value = redis::cmd("XRANGE")
                .arg(format!("im:{{{u}}}:inbox"))
                .arg("-")
                .arg("+")
                .query(&mut *c)
                .unwrap();
            (u.to_string(), format!("{v:?}").len())
        })
        .collect();
    assert!(
        used[0].1 > 10_000,
        "the sender's copy holds the body: {used:?}"
    );
    assert!(
        used[1].1 < 500 && used[2].1 < 500,
        "recipients hold a reference: {used:?}"
    );
    for m in ["m1", "m8"] {
        assert_eq!(inbox(&mut s, m), std::slice::from_ref(&big));
    }
}

fn a_retried_send_lands_exactly_once_in_each_inbox(r: Backend) {
    let mut s = store(&r);
    s.commit_sends(&[send("alice", "warm-up", &["bob"])])
        .unwrap();
    // The first attempt stopped after the sender's copy (as if the node died between the
    // two inboxes): the retry adds the recipients, once each, and keeps the sender's seq.
    let first = s.commit_sends(&[send("alice", "m", &[])]).unwrap();
    assert_eq!(
        first[0],
        Sent {
            seq: 2,
            duplicate: false,
            to_seqs: vec![]
        }
    );
    let retry = s
        .commit_sends(&[send("alice", "m", &["bob", "carol"])])
        .unwrap();
    assert_eq!(
        retry[0],
        Sent {
            seq: 2,
            duplicate: true,
            to_seqs: vec![2, 1]
        }
    );
    // Retried again, on another connection (another node), twice in one pipeline.
    let mut other = store(&r);
    let again = other
        .commit_sends(&[
            send("alice", "m", &["bob", "carol"]),
            send("alice", "m", &["bob", "carol"]),
        ])
        .unwrap();
    assert_eq!(again, vec![retry[0].clone(), retry[0].clone()]);
    assert_eq!(inbox(&mut s, "alice"), ["alice:warm-up", "alice:m"]);
    assert_eq!(inbox(&mut s, "bob"), ["alice:warm-up", "alice:m"]);
    assert_eq!(inbox(&mut s, "carol"), ["alice:m"]);
    // The same id from another sender is another message.
    let bobs = s.commit_sends(&[send("bob", "m", &["carol"])]).unwrap();
    assert_eq!(
        bobs[0],
        Sent {
            seq: 3,
            duplicate: false,
            to_seqs: vec![2]
        }
    );
}

fn the_newest_thousand_ids_of_an_inbox_are_remembered_and_no_more(r: Backend) {
    let mut s = store(&r);
    let sends: Vec<NewSend> = (0..=DEDUPE_KEEP)
        .map(|i| send("alice", &format!("id{i}"), &["bob"]))
        .collect();
    s.commit_sends(&sends).unwrap();
    let n = DEDUPE_KEEP as u64 + 1;
    assert_eq!(s.max_seq("bob"), Ok(n));
    // id1 is among the newest thousand: a duplicate.
    let kept = s.commit_sends(&[send("alice", "id1", &["bob"])]).unwrap();
    assert_eq!(
        kept[0],
        Sent {
            seq: 2,
            duplicate: true,
            to_seqs: vec![2]
        }
    );
    // id0 was dropped from both inboxes: stored again, as a new message.
    let dropped = s.commit_sends(&[send("alice", "id0", &["bob"])]).unwrap();
    assert_eq!(
        dropped[0],
        Sent {
            seq: n + 1,
            duplicate: false,
            to_seqs: vec![n + 1]
        }
    );
    let mut c = raw(&r);
    for key in ["im:{alice}:ids", "im:{bob}:ids"] {
        let held: usize = redis::cmd("HLEN").arg(key).query(&mut *c).unwrap();
        assert_eq!(held, DEDUPE_KEEP, "{key}");
    }
    let queued: usize = redis::cmd("LLEN")
        .arg("im:{bob}:idq")
        .query(&mut *c)
        .unwrap();
    assert_eq!(queued, DEDUPE_KEEP);
}

fn seqs_stay_dense_when_several_nodes_append_to_one_inbox_at_once(r: Backend) {
    let r = Arc::new(r);
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                let mut s = store(&r);
                let from = format!("node{t}");
                for chunk in 0..10 {
                    let batch: Vec<NewSend> = (0..25)
                        .map(|i| send(&from, &format!("{chunk}-{i}"), &["bob"]))
                        .collect();
                    s.commit_sends(&batch).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut s = store(&r);
    let mut got = inbox(&mut s, "bob");
    assert_eq!(got.len(), 1000);
    got.sort();
    got.dedup();
    assert_eq!(got.len(), 1000, "each message once");
}

fn cursors_only_rise_and_friendships_and_groups_are_kept_both_ways(r: Backend) {
    let mut s = store(&r);
    let m = |gid: &str, uid: &str, joined| Membership {
        gid: gid.into(),
        uid: uid.into(),
        joined,
    };
    s.commit(&Changes {
        cursors: vec![
            ("bob".into(), "phone".into(), 5),
            ("bob".into(), "phone".into(), 3),
            ("bob".into(), "web".into(), 1),
        ],
        friendships: vec![
            ("alice".into(), "bob".into(), true),
            ("alice".into(), "carol".into(), true),
        ],
        memberships: vec![
            m("g1", "alice", true),
            m("g1", "bob", true),
            m("g2", "bob", true),
        ],
    })
    .unwrap();
    assert_eq!(s.cursor("bob", "phone"), Ok(5));
    assert_eq!(s.cursor("bob", "tablet"), Ok(0));
    assert_eq!(
        s.cursors("bob"),
        Ok(vec![("phone".into(), 5), ("web".into(), 1)])
    );
    assert_eq!(s.friends("alice"), Ok(vec!["bob".into(), "carol".into()]));
    assert_eq!(s.friends("carol"), Ok(vec!["alice".into()]));
    assert_eq!(
        s.group_members("g1"),
        Ok(vec!["alice".into(), "bob".into()])
    );
    assert_eq!(s.groups_of("bob"), Ok(vec!["g1".into(), "g2".into()]));
    s.commit(&Changes {
        cursors: vec![("bob".into(), "phone".into(), 9)],
        friendships: vec![("carol".into(), "alice".into(), false)],
        memberships: vec![m("g1", "alice", false)],
    })
    .unwrap();
    assert_eq!(s.cursor("bob", "phone"), Ok(9));
    assert_eq!(s.friends("alice"), Ok(vec!["bob".into()]));
    assert_eq!(s.friends("carol"), Ok(vec![]));
    assert_eq!(s.group_size("g1"), Ok(1));
    assert_eq!(s.is_member("g1", "alice"), Ok(false));
    assert_eq!(s.is_member("g1", "bob"), Ok(true));
    assert_eq!(s.groups_of("alice"), Ok(vec![]));
    s.commit(&Changes::default()).unwrap();
}

fn what_redis_acknowledged_survives_its_kill_9_and_functions_it_lost_are_loaded_again(
    mut r: Backend,
) {
    let mut s = store(&r);
    let sends: Vec<NewSend> = (0..50)
        .map(|i| send("alice", &format!("m{i}"), &["bob"]))
        .collect();
    s.commit_sends(&sends).unwrap();
    s.commit(&Changes {
        cursors: vec![("bob".into(), "phone".into(), 40)],
        ..Changes::default()
    })
    .unwrap();
    r.kill9();
    r.restart();
    // The restarted Redis read its AOF back; a Redis that lost imgate's functions (flushed
    // here) gets them again from the store.
    let mut s = store(&r);
    assert_eq!(inbox(&mut s, "bob").len(), 50);
    assert_eq!(s.cursor("bob", "phone"), Ok(40));
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut *raw(&r))
        .unwrap();
    let retried = s
        .commit_sends(&[
            send("alice", "m49", &["bob"]),
            send("alice", "new", &["bob"]),
        ])
        .unwrap();
    assert_eq!(
        retried[0],
        Sent {
            seq: 50,
            duplicate: true,
            to_seqs: vec![50]
        }
    );
    assert_eq!(
        retried[1],
        Sent {
            seq: 51,
            duplicate: false,
            to_seqs: vec![51]
        }
    );
    let _: () = redis::cmd("FUNCTION")
        .arg("FLUSH")
        .query(&mut *raw(&r))
        .unwrap();
    s.commit(&Changes {
        cursors: vec![("bob".into(), "phone".into(), 51)],
        ..Changes::default()
    })
    .unwrap();
    assert_eq!(s.cursor("bob", "phone"), Ok(51));
}

fn an_unreachable_redis_is_an_error_within_the_timeout(mut r: Backend) {
    let mut s = store(&r);
    r.kill9();
    let started = Instant::now();
    assert!(s.commit_sends(&[send("alice", "m", &["bob"])]).is_err());
    assert!(s.max_seq("bob").is_err());
    assert!(started.elapsed() < TIMEOUT * 4, "{:?}", started.elapsed());
    assert!(r.connect().is_err());
    assert!(RedisStore::connect("not a url", TIMEOUT).is_err());
}

fn an_inbox_entry_that_does_not_parse_or_refers_to_nothing_is_an_error_not_a_guess(r: Backend) {
    let mut s = store(&r);
    let mut c = raw(&r);
    // A reference (kind R, time, seq 7) to a body ghost never stored.
    let mut dangling = b"R".to_vec();
    dangling.extend_from_slice(&5i64.to_le_bytes());
    dangling.extend_from_slice(&7u64.to_le_bytes());
    dangling.extend_from_slice(b"ghost");
    let _: String = redis::cmd("XADD")
        .arg("im:{bob}:inbox")
        .arg("1-1")
        .arg("m")
        .arg(dangling)
        .query(&mut *c)
        .unwrap();
    let e = s.messages_after("bob", 0, 10).unwrap_err();
    assert!(e.0.contains("ghost's 7 is missing"), "{e}");
    let _: String = redis::cmd("XADD")
        .arg("im:{carol}:inbox")
        .arg("1-1")
        .arg("m")
        .arg("?")
        .query(&mut *c)
        .unwrap();
    assert!(s.messages_after("carol", 0, 10).is_err());
    // A gap in the seqs (an entry 2 with none at 1) is corruption too.
    s.commit_sends(&[send("dave", "m", &[])]).unwrap();
    let _: () = redis::cmd("XDEL")
        .arg("im:{dave}:inbox")
        .arg("1-1")
        .query(&mut *c)
        .map(|_: i64| ())
        .unwrap();
    s.commit_sends(&[send("dave", "n", &[])]).unwrap();
    let e = s.messages_after("dave", 0, 10).unwrap_err();
    assert!(e.0.contains("gap"), "{e}");
}

fn a_device_is_on_one_node_and_the_first_and_last_ones_are_told(r: Backend) {
    let mut a = store(&r);
    let mut b = store(&r);
    let on = |replaced_on: Option<&str>, first| DeviceOn {
        replaced_on: replaced_on.map(String::from),
        first,
    };
    assert_eq!(a.device_on("A", "bob", "phone"), Ok(on(None, true)));
    assert_eq!(b.device_on("B", "bob", "web"), Ok(on(None, false)));
    // The phone logs in again on node B: node A's connection is to be kicked.
    assert_eq!(b.device_on("B", "bob", "phone"), Ok(on(Some("A"), false)));
    assert_eq!(
        a.devices("bob"),
        Ok(vec![
            ("phone".into(), "B".into()),
            ("web".into(), "B".into())
        ])
    );
    // Node A's kicked connection closing changes nothing: the phone is node B's now.
    assert_eq!(a.device_off("A", "bob", "phone"), Ok(false));
    assert_eq!(a.devices("bob").unwrap().len(), 2);
    assert_eq!(b.device_off("B", "bob", "web"), Ok(false));
    assert_eq!(b.device_off("B", "bob", "phone"), Ok(true), "the last one");
    assert_eq!(b.device_off("B", "bob", "phone"), Ok(false), "already gone");
    assert_eq!(a.devices("bob"), Ok(vec![]));
    // Node B has none of bob's devices left, so it has nothing of bob's to clean up.
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg("im:node:{B}:users")
        .query(&mut *raw(&r))
        .unwrap();
    assert!(members.is_empty(), "{members:?}");
}

fn a_dead_nodes_devices_are_taken_offline_once_by_one_node(r: Backend) {
    let mut a = store(&r);
    let mut b = store(&r);
    assert_eq!(
        a.renew_lease("A", Duration::from_millis(300)),
        Ok(true),
        "new"
    );
    assert_eq!(b.renew_lease("B", Duration::from_secs(60)), Ok(true));
    assert_eq!(
        b.renew_lease("B", Duration::from_secs(60)),
        Ok(false),
        "renewed"
    );
    a.device_on("A", "ann", "phone").unwrap();
    a.device_on("A", "bob", "phone").unwrap();
    b.device_on("B", "bob", "web").unwrap();
    // A stops renewing (it was killed): once its lease runs out, B sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.expired_nodes().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the lease never ran out");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.expired_nodes(), Ok(vec!["A".to_string()]));
    // ann had only A's device: offline; bob still has B's.
    assert_eq!(
        b.reap_node("A", "B", Duration::from_secs(5)),
        Ok(vec!["ann".to_string()])
    );
    assert_eq!(b.devices("ann"), Ok(vec![]));
    assert_eq!(b.devices("bob"), Ok(vec![("web".into(), "B".into())]));
    assert_eq!(b.expired_nodes(), Ok(vec![]));
    // Another node cleaning up after A at the same time gets nothing to tell.
    let mut c = store(&r);
    assert_eq!(c.reap_node("A", "C", Duration::from_secs(5)), Ok(vec![]));
    // A was only slow: its next renewal says its devices were removed.
    assert_eq!(a.renew_lease("A", Duration::from_secs(60)), Ok(true));
}
