//! `imgate serve --redis` / `--redis-cluster`: nodes that keep the shared state in a real
//! `redis-server` started by the test (one Redis with AOF `always`, and a Redis Cluster of
//! three primaries), each case against both.

mod common;

use common::im_client::Client;
use common::redis::{RedisCluster, RedisProc};
use common::ServerProc;
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};

/// The Redis a case's nodes share.
enum Shared {
    One(RedisProc),
    Cluster(RedisCluster),
}

impl Shared {
    fn one() -> Shared {
        Shared::One(RedisProc::start())
    }

    fn cluster() -> Shared {
        Shared::Cluster(RedisCluster::start(3))
    }

    /// A node on this Redis.
    fn node(&self) -> ServerProc {
        self.node_with(&[])
    }

    fn node_with(&self, args: &[&str]) -> ServerProc {
        let (flag, target) = match self {
            Shared::One(r) => ("--redis", r.url()),
            Shared::Cluster(c) => ("--redis-cluster", c.urls().join(",")),
        };
        let mut all = vec![flag, &target];
        all.extend_from_slice(args);
        ServerProc::start(&all)
    }

    /// Kills every Redis process with SIGKILL.
    fn kill9(&mut self) {
        match self {
            Shared::One(r) => r.kill9(),
            Shared::Cluster(c) => c.nodes.iter_mut().for_each(RedisProc::kill9),
        }
    }

    /// Kills every Redis process with SIGKILL and starts it again on its data.
    fn restart(&mut self) {
        match self {
            Shared::One(r) => r.restart(),
            Shared::Cluster(c) => c.restart_all(),
        }
    }
}

fn texts(ms: &[proto::Message]) -> Vec<(u64, String)> {
    ms.iter()
        .map(|m| (m.seq, String::from_utf8_lossy(&m.content).into_owned()))
        .collect()
}

fn a_send_on_one_node_reaches_its_recipient_logging_in_on_another(shared: Shared) {
    let a = shared.node();
    let b = shared.node();
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let first = alice.send("bob", "m1", "hello");
    let second = alice.send("bob", "m2", "again");
    assert_eq!((first.seq, second.seq), (1, 2), "the sender's own inbox");
    let (mut bob, ok) = Client::login(&b, "bob", "phone", 0);
    assert_eq!(ok.max_seq, 2);
    assert_eq!(
        texts(&bob.messages(2)),
        vec![(1, "hello".into()), (2, "again".into())]
    );
    // Alice's second device, on the other node, reads her own copies.
    let (mut tablet, ok) = Client::login(&b, "alice", "tablet", 0);
    assert_eq!(ok.max_seq, 2);
    assert_eq!(
        texts(&tablet.messages(2)),
        vec![(1, "hello".into()), (2, "again".into())]
    );
    // A retry on the other node is the same send, not a new one.
    let id = tablet.request(C::Send(proto::SendMessage {
        to_uid: "bob".into(),
        client_msg_id: "m2".into(),
        content: b"again".to_vec(),
        group_id: String::new(),
    }));
    match tablet.response(id) {
        S::SendOk(ok) => assert_eq!((ok.seq, ok.duplicate), (2, true)),
        other => panic!("retry answered {other:?}"),
    }
    // Bob's cursor, moved by his ack on one node, is what another node resumes him from.
    bob.request(C::Ack(proto::Ack { seq: 2 }));
    let (mut alice2, _) = Client::login(&a, "alice", "phone", 0);
    alice2.send("bob", "m3", "third");
    drop(bob);
    let (mut bob2, _) = Client::login(&a, "bob", "phone", 0);
    assert_eq!(texts(&bob2.messages(1)), vec![(3, "third".into())]);
}

fn acknowledged_messages_survive_kill_9_of_the_node_and_of_redis(mut shared: Shared) {
    let mut a = shared.node();
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    for i in 1..=5 {
        assert_eq!(alice.send("bob", &format!("m{i}"), &format!("t{i}")).seq, i);
    }
    a.kill9();
    shared.restart();
    let b = shared.node();
    let (mut bob, ok) = Client::login(&b, "bob", "phone", 0);
    assert_eq!(ok.max_seq, 5);
    assert_eq!(
        texts(&bob.messages(5)),
        (1..=5).map(|i| (i, format!("t{i}"))).collect::<Vec<_>>()
    );
    // Seqs go on densely after the restart.
    let (mut alice, _) = Client::login(&b, "alice", "phone", 5);
    assert_eq!(alice.send("bob", "m6", "t6").seq, 6);
    assert_eq!(texts(&bob.messages(1)), vec![(6, "t6".into())]);
}

/// A node whose Redis cannot be reached says so and exits at start-up, rather than refuse
/// every login later.
#[test]
fn a_node_whose_redis_is_unreachable_exits_naming_it() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_imgate"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args([
            "--jwt-secret",
            "s",
            "--redis",
            &url,
            "--redis-timeout",
            "1s",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run imgate");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&url), "{err}");
}

fn send(c: &mut Client, to: &str, cmid: &str, text: &str) -> S {
    let id = c.request(C::Send(proto::SendMessage {
        to_uid: to.into(),
        client_msg_id: cmid.into(),
        content: text.as_bytes().to_vec(),
        group_id: String::new(),
    }));
    c.response(id)
}

/// Sends until Redis takes it (for at most 20 s).
fn send_once_redis_is_back(c: &mut Client, to: &str, cmid: &str, text: &str) -> proto::SendOk {
    common::poll_until(
        std::time::Duration::from_secs(20),
        "a send once Redis is back",
        || match send(c, to, cmid, text) {
            S::SendOk(ok) => Ok(ok),
            other => Err(format!("{other:?}")),
        },
    )
}

fn while_redis_is_away_sends_and_logins_get_unavailable_and_connections_stay_up(
    mut shared: Shared,
) {
    let node = shared.node_with(&["--redis-timeout", "1s"]);
    let (mut alice, _) = Client::login(&node, "alice", "phone", 0);
    let (mut bob, _) = Client::login(&node, "bob", "phone", 0);
    alice.send("bob", "m1", "one");
    assert_eq!(texts(&bob.messages(1)), vec![(1, "one".into())]);
    shared.kill9();
    match send(&mut alice, "bob", "m2", "two") {
        S::Error(e) => assert_eq!(e.code(), proto::ErrorCode::Unavailable, "{e:?}"),
        other => panic!("a send while Redis is away answered {other:?}"),
    }
    let mut carol = Client::connect(&node);
    let id = carol.request(C::Login(proto::Login {
        token: common::im_client::token("carol"),
        device_id: "phone".into(),
        last_seq: 0,
    }));
    match carol.response(id) {
        S::Error(e) => assert_eq!(e.code(), proto::ErrorCode::Unavailable, "{e:?}"),
        other => panic!("a login while Redis is away answered {other:?}"),
    }
    shared.restart();
    // The same send again, once Redis is back: stored once, delivered once, in order.
    let ok = send_once_redis_is_back(&mut alice, "bob", "m2", "two");
    assert_eq!(ok.seq, 2);
    alice.send("bob", "m3", "three");
    assert_eq!(
        texts(&bob.messages(2)),
        vec![(2, "two".into()), (3, "three".into())]
    );
    let (_, ok) = Client::login(&node, "carol", "phone", 0);
    assert_eq!(ok.max_seq, 0);
}

fn a_message_reaches_its_recipient_online_on_another_node_as_it_is_sent(shared: Shared) {
    let (a, b) = (shared.node(), shared.node());
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let (mut bob, _) = Client::login(&b, "bob", "phone", 0);
    for i in 1..=20 {
        alice.send("bob", &format!("m{i}"), &format!("t{i}"));
    }
    assert_eq!(
        texts(&bob.messages(20)),
        (1..=20).map(|i| (i, format!("t{i}"))).collect::<Vec<_>>()
    );
    // And back, the other way.
    bob.send("alice", "r1", "back");
    assert_eq!(texts(&alice.messages(1)), vec![(21, "back".into())]);
}

fn a_user_with_devices_on_two_nodes_gets_everything_on_both(shared: Shared) {
    let (a, b) = (shared.node(), shared.node());
    let (mut phone, _) = Client::login(&a, "bob", "phone", 0);
    let (mut tablet, _) = Client::login(&b, "bob", "tablet", 0);
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let (mut carol, _) = Client::login(&b, "carol", "phone", 0);
    alice.send("bob", "a1", "from alice");
    carol.send("bob", "c1", "from carol");
    let want = vec![(1, "from alice".into()), (2, "from carol".into())];
    assert_eq!(texts(&phone.messages(2)), want);
    assert_eq!(texts(&tablet.messages(2)), want);
    // What one device sends reaches the user's other device, on the other node.
    phone.send("alice", "b1", "from the phone");
    assert_eq!(
        texts(&tablet.messages(1)),
        vec![(3, "from the phone".into())]
    );
}

fn a_group_message_reaches_members_on_every_node(shared: Shared) {
    let (a, b) = (shared.node(), shared.node());
    for uid in ["alice", "bob", "carol", "dave"] {
        let r = a.admin_request("PUT", &format!("/v1/groups/team/members/{uid}"), "");
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    }
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let (mut bob, _) = Client::login(&a, "bob", "phone", 0);
    let (mut carol, _) = Client::login(&b, "carol", "phone", 0);
    // Dave is offline: he reads it when he logs in, on either node.
    let id = carol.request(C::Send(proto::SendMessage {
        group_id: "team".into(),
        client_msg_id: "g1".into(),
        content: b"hello team".to_vec(),
        ..Default::default()
    }));
    match carol.response(id) {
        S::SendOk(ok) => assert_eq!(ok.seq, 1),
        other => panic!("group send answered {other:?}"),
    }
    for c in [&mut alice, &mut bob] {
        let got = c.messages(1);
        assert_eq!(texts(&got), vec![(1, "hello team".into())]);
        assert_eq!(got[0].group_id, "team");
    }
    let (mut dave, _) = Client::login(&b, "dave", "phone", 0);
    assert_eq!(texts(&dave.messages(1)), vec![(1, "hello team".into())]);
}

fn a_node_that_lost_redis_catches_its_devices_up_when_it_returns(mut shared: Shared) {
    let a = shared.node_with(&["--redis-timeout", "1s"]);
    let b = shared.node_with(&["--redis-timeout", "1s"]);
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let (mut bob, _) = Client::login(&b, "bob", "phone", 0);
    alice.send("bob", "m1", "before");
    assert_eq!(texts(&bob.messages(1)), vec![(1, "before".into())]);
    shared.kill9();
    shared.restart();
    // Sent as soon as Redis takes it, possibly before bob's node has subscribed again.
    let ok = send_once_redis_is_back(&mut alice, "bob", "m2", "after");
    assert_eq!(ok.seq, 2);
    assert_eq!(texts(&bob.messages(1)), vec![(2, "after".into())]);
}

/// Nodes started with `--reuse-port` on one address share it: the kernel spreads new
/// connections over them, and users on different nodes reach each other.
#[test]
fn nodes_sharing_one_port_each_take_connections_and_relay_between_them() {
    let shared = Shared::one();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let url = match &shared {
        Shared::One(r) => r.url(),
        Shared::Cluster(_) => unreachable!(),
    };
    let start = || {
        ServerProc::start_in(
            common::temp_data_dir(),
            &listen,
            &["--reuse-port", "--redis", &url],
            |_| {},
        )
    };
    let nodes = [start(), start()];
    let mut clients: Vec<Client> = (0..24)
        .map(|i| Client::login(&nodes[0], &format!("u{i}"), "phone", 0).0)
        .collect();
    for n in &nodes {
        let metrics = n.admin_request("GET", "/metrics", "");
        let logins = common::metric_sample(&metrics, "imgate_logins_total").unwrap_or(0.0);
        assert!(logins >= 1.0, "a node took no connection: {metrics}");
    }
    // Every user sends to the next one, wherever each landed.
    for (i, c) in clients.iter_mut().enumerate() {
        c.request(C::Send(proto::SendMessage {
            to_uid: format!("u{}", (i + 1) % 24),
            client_msg_id: "m1".into(),
            content: format!("from u{i}").into_bytes(),
            group_id: String::new(),
        }));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let from = (i + 23) % 24;
        let got = c.messages(1);
        assert_eq!(got[0].from_uid, format!("u{from}"));
        assert_eq!(got[0].content, format!("from u{from}").into_bytes());
    }
}

fn the_same_device_logging_in_on_another_node_kicks_the_older_connection(shared: Shared) {
    let (a, b) = (shared.node(), shared.node());
    let (mut old, _) = Client::login(&a, "bob", "phone", 0);
    let (mut tablet, _) = Client::login(&a, "bob", "tablet", 0);
    // The old login's announcement has come back to its node once a message to it has: the
    // channel keeps order.
    let (mut alice, _) = Client::login(&b, "alice", "phone", 0);
    alice.send("bob", "m1", "first");
    assert_eq!(texts(&old.messages(1)), vec![(1, "first".into())]);
    let (mut new, _) = Client::login(&b, "bob", "phone", 0);
    match old.next().body {
        Some(S::Kicked(_)) => {}
        other => panic!("the older phone got {other:?}"),
    }
    match old.ws.read() {
        Ok(tungstenite::Message::Close(Some(f))) => assert_eq!(u16::from(f.code), 4000),
        other => panic!("the older phone was not closed with 4000: {other:?}"),
    }
    // The new phone and the tablet go on.
    alice.send("bob", "m2", "second");
    assert_eq!(
        texts(&new.messages(2)),
        vec![(1, "first".into()), (2, "second".into())]
    );
    assert_eq!(
        texts(&tablet.messages(2)),
        vec![(1, "first".into()), (2, "second".into())]
    );
}

fn a_membership_change_on_one_node_reaches_the_group_sends_of_another(shared: Shared) {
    let (a, b) = (shared.node(), shared.node());
    for uid in ["alice", "bob"] {
        let r = a.admin_request("PUT", &format!("/v1/groups/team/members/{uid}"), "");
        assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    }
    let (mut alice, _) = Client::login(&b, "alice", "phone", 0);
    let (mut carol, _) = Client::login(&b, "carol", "phone", 0);
    let group_send = |c: &mut Client, cmid: &str| {
        let id = c.request(C::Send(proto::SendMessage {
            group_id: "team".into(),
            client_msg_id: cmid.into(),
            content: cmid.as_bytes().to_vec(),
            ..Default::default()
        }));
        match c.response(id) {
            S::SendOk(ok) => ok,
            other => panic!("group send answered {other:?}"),
        }
    };
    // Node b reads and keeps the group's members (alice, bob).
    group_send(&mut alice, "g1");
    // Carol is added on node a: her phone on node b hears of it, and node b's next send to
    // the group reaches her.
    let r = a.admin_request("PUT", "/v1/groups/team/members/carol", "");
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
    match carol.next().body {
        Some(S::GroupChanged(g)) => assert!(g.group_id == "team" && g.joined, "{g:?}"),
        other => panic!("carol got {other:?}"),
    }
    group_send(&mut alice, "g2");
    assert_eq!(texts(&carol.messages(1)), vec![(1, "g2".into())]);
}

/// The next Presence frame to `c`, as (uid, online); other frames are skipped.
fn next_presence(c: &mut Client) -> (String, bool) {
    loop {
        if let Some(S::Presence(p)) = c.next().body {
            return (p.uid, p.online);
        }
    }
}

fn befriend(node: &ServerProc, a: &str, b: &str, present: bool) {
    let method = if present { "PUT" } else { "DELETE" };
    let r = node.admin_request(method, &format!("/v1/friendships/{a}/{b}"), "");
    assert!(r.starts_with("HTTP/1.1 204"), "{r}");
}

/// What the admin API of `node` answers for `path`, as JSON.
fn admin_json(node: &ServerProc, path: &str) -> serde_json::Value {
    let r = node.admin_request("GET", path, "");
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let body = r.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {r}"))
}

fn online_devices(node: &ServerProc, uid: &str) -> serde_json::Value {
    admin_json(node, &format!("/v1/users/{uid}"))["online_devices"].clone()
}

fn friends_see_a_user_come_online_on_any_node_and_go_offline_with_its_last_device(shared: Shared) {
    let (a, b, c) = (shared.node(), shared.node(), shared.node());
    befriend(&a, "alice", "bob", true);
    let (mut bob, _) = Client::login(&b, "bob", "phone", 0);
    let (_phone, ok) = Client::login(&c, "alice", "phone", 0);
    assert_eq!(
        ok.online_friends,
        vec!["bob".to_string()],
        "bob is on another node"
    );
    assert_eq!(next_presence(&mut bob), ("alice".into(), true));
    // The admin API of a node with none of alice's devices sees them.
    assert_eq!(online_devices(&a, "alice"), serde_json::json!(["phone"]));
    let friends = admin_json(&a, "/v1/users/bob/friends");
    assert_eq!(
        friends["friends"],
        serde_json::json!([{"uid": "alice", "online": true}])
    );
    // A second device on a third node, then the first one gone: alice stays online.
    let (tablet, _) = Client::login(&a, "alice", "tablet", 0);
    drop(_phone);
    common::poll_until(
        std::time::Duration::from_secs(10),
        "the phone recorded gone",
        || match online_devices(&a, "alice") {
            d if d == serde_json::json!(["tablet"]) => Ok(()),
            d => Err(format!("{d}")),
        },
    );
    drop(tablet);
    assert_eq!(
        next_presence(&mut bob),
        ("alice".into(), false),
        "with her last device"
    );
    let (_again, ok) = Client::login(&b, "alice", "phone", 0);
    assert_eq!(ok.online_friends, vec!["bob".to_string()]);
    assert_eq!(
        next_presence(&mut bob),
        ("alice".into(), true),
        "one offline only, when the last device went"
    );
}

fn a_friendship_made_on_one_node_is_news_to_both_friends_on_others(shared: Shared) {
    let (a, b, c) = (shared.node(), shared.node(), shared.node());
    let (mut alice, ok) = Client::login(&b, "alice", "phone", 0);
    assert!(ok.online_friends.is_empty());
    let (mut bob, _) = Client::login(&c, "bob", "phone", 0);
    befriend(&a, "alice", "bob", true);
    assert_eq!(next_presence(&mut alice), ("bob".into(), true));
    assert_eq!(next_presence(&mut bob), ("alice".into(), true));
    // The nodes' own lists follow: bob going offline is told to alice.
    drop(bob);
    assert_eq!(next_presence(&mut alice), ("bob".into(), false));
    let (mut bob, _) = Client::login(&c, "bob", "phone", 0);
    assert_eq!(next_presence(&mut alice), ("bob".into(), true));
    befriend(&a, "alice", "bob", false);
    assert_eq!(next_presence(&mut alice), ("bob".into(), false));
    assert_eq!(next_presence(&mut bob), ("alice".into(), false));
}

fn a_killed_nodes_users_go_offline_for_their_friends_and_come_back_elsewhere(shared: Shared) {
    let lease = ["--node-lease", "1s"];
    let (a, mut b, c) = (
        shared.node_with(&lease),
        shared.node_with(&lease),
        shared.node_with(&lease),
    );
    befriend(&a, "alice", "bob", true);
    let (mut bob, _) = Client::login(&a, "bob", "phone", 0);
    let (mut alice, _) = Client::login(&b, "alice", "phone", 0);
    assert_eq!(next_presence(&mut bob), ("alice".into(), true));
    assert_eq!(alice.send("bob", "m1", "before").seq, 1);
    assert_eq!(texts(&bob.messages(1)), vec![(1, "before".into())]);
    b.kill9();
    // Within a lease (and the next look for expired leases).
    assert_eq!(next_presence(&mut bob), ("alice".into(), false));
    assert_eq!(online_devices(&c, "alice"), serde_json::json!([]));
    let (mut alice, ok) = Client::login(&c, "alice", "phone", 0);
    assert_eq!(ok.max_seq, 1, "nothing acknowledged is lost");
    assert_eq!(next_presence(&mut bob), ("alice".into(), true));
    assert_eq!(alice.send("bob", "m2", "after").seq, 2);
    assert_eq!(texts(&bob.messages(1)), vec![(2, "after".into())]);
}

fn devices_are_recorded_again_when_redis_lost_them_while_away(mut shared: Shared) {
    let lease = ["--node-lease", "1s", "--redis-timeout", "1s"];
    let (a, b) = (shared.node_with(&lease), shared.node_with(&lease));
    let (_alice, _) = Client::login(&a, "alice", "phone", 0);
    let (_bob, _) = Client::login(&b, "bob", "phone", 0);
    assert_eq!(online_devices(&b, "alice"), serde_json::json!(["phone"]));
    // Away for longer than a lease: one node takes the other for dead when Redis is back.
    shared.kill9();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    shared.restart();
    for (node, uid) in [(&a, "bob"), (&b, "alice")] {
        common::poll_until(
            std::time::Duration::from_secs(20),
            "devices recorded",
            || match online_devices(node, uid) {
                d if d == serde_json::json!(["phone"]) => Ok(()),
                d => Err(format!("{uid}: {d}")),
            },
        );
    }
}

/// With `--redis-wait-replicas 1` a send is answered only once a replica has it, so that an
/// acknowledged message survives the loss of the primary (its replica promoted); while the
/// replica is gone, sends get UNAVAILABLE, and once it is back the same send is stored once.
#[test]
fn with_wait_replicas_acknowledged_messages_survive_the_loss_of_the_primary() {
    let mut primary = RedisProc::start();
    let primary_port = primary.port.to_string();
    let mut replica = RedisProc::start_with(&["--replicaof", "127.0.0.1", &primary_port]);
    let node = ServerProc::start(&[
        "--redis",
        &primary.url(),
        "--redis-wait-replicas",
        "1",
        "--redis-timeout",
        "1s",
    ]);
    let (mut alice, _) = Client::login(&node, "alice", "phone", 0);
    // The replica may still be making its first copy.
    assert_eq!(
        send_once_redis_is_back(&mut alice, "bob", "m1", "one").seq,
        1
    );
    replica.kill9();
    match send(&mut alice, "bob", "m2", "two") {
        S::Error(e) => assert_eq!(e.code(), proto::ErrorCode::Unavailable, "{e:?}"),
        other => panic!("a send without a replica answered {other:?}"),
    }
    replica.restart();
    assert_eq!(
        send_once_redis_is_back(&mut alice, "bob", "m2", "two").seq,
        2
    );
    drop(alice);
    drop(node);
    primary.kill9();
    let mut promote = redis::Client::open(replica.url())
        .and_then(|c| c.get_connection())
        .expect("connect to the replica");
    redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query::<()>(&mut promote)
        .expect("promote the replica");
    let node = ServerProc::start(&["--redis", &replica.url()]);
    let (mut bob, ok) = Client::login(&node, "bob", "phone", 0);
    assert_eq!(ok.max_seq, 2);
    assert_eq!(
        texts(&bob.messages(2)),
        vec![(1, "one".into()), (2, "two".into())]
    );
}

/// On a Redis Cluster a user's inbox news goes to the one shard that owns the user's channel
/// (sharded pub/sub): the node of the user's device subscribes there and nowhere else, and
/// what is sent to the user arrives through it.
#[test]
fn on_a_redis_cluster_a_users_channel_is_heard_on_its_shard_only() {
    let shared = Shared::cluster();
    let (a, b) = (shared.node(), shared.node());
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let (mut bob, _) = Client::login(&b, "bob", "phone", 0);
    alice.send("bob", "m1", "one");
    // Once one message has arrived the subscription holds; the next one can come only
    // through it.
    assert_eq!(texts(&bob.messages(1)), vec![(1, "one".into())]);
    alice.send("bob", "m2", "two");
    assert_eq!(texts(&bob.messages(1)), vec![(2, "two".into())]);
    let Shared::Cluster(c) = &shared else {
        unreachable!()
    };
    // A node that does not own the channel's slot answers MOVED.
    let counts: Vec<Option<i64>> = c
        .nodes
        .iter()
        .map(|n| {
            let mut conn = redis::Client::open(n.url())
                .and_then(|c| c.get_connection())
                .expect("connect to a Redis node");
            redis::cmd("PUBSUB")
                .arg("SHARDNUMSUB")
                .arg("im:{bob}:ch")
                .query::<(String, i64)>(&mut conn)
                .ok()
                .map(|(_, n)| n)
        })
        .collect();
    let mut answered: Vec<i64> = counts.iter().flatten().copied().collect();
    answered.sort_unstable();
    assert_eq!(answered.last(), Some(&1), "{counts:?}");
    assert_eq!(answered.iter().sum::<i64>(), 1, "{counts:?}");
}

/// A node of a Redis Cluster: a connection to it.
fn redis_conn(n: &RedisProc) -> redis::Connection {
    redis::Client::open(n.url())
        .and_then(|c| c.get_connection())
        .expect("connect to a Redis node")
}

/// Moves `slot` with its keys from the primary that owns it to another, as
/// `redis-cli --cluster reshard` does; returns the new owner's index.
fn move_slot(c: &RedisCluster, slot: i64) -> usize {
    let mut conns: Vec<redis::Connection> = c.nodes.iter().map(redis_conn).collect();
    let ids: Vec<String> = conns
        .iter_mut()
        .map(|k| redis::cmd("CLUSTER").arg("MYID").query(k).expect("MYID"))
        .collect();
    let slots: Vec<(i64, i64, Vec<redis::Value>)> = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query::<Vec<Vec<redis::Value>>>(&mut conns[0])
        .expect("CLUSTER SLOTS")
        .into_iter()
        .map(|e| {
            let first = redis::from_redis_value::<i64>(e[0].clone()).expect("first");
            let last = redis::from_redis_value::<i64>(e[1].clone()).expect("last");
            (first, last, e)
        })
        .collect();
    let (_, _, entry) = slots
        .iter()
        .find(|(f, l, _)| (*f..=*l).contains(&slot))
        .expect("an owner");
    let owner_port: i64 = match &entry[2] {
        redis::Value::Array(p) => redis::from_redis_value(p[1].clone()).expect("port"),
        other => panic!("{other:?}"),
    };
    let from = c
        .nodes
        .iter()
        .position(|n| i64::from(n.port) == owner_port)
        .expect("the owner among the nodes");
    let to = (from + 1) % c.nodes.len();
    let setslot = |k: &mut redis::Connection, how: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(how)
            .arg(id)
            .query::<()>(k)
            .unwrap_or_else(|e| panic!("SETSLOT {how}: {e}"));
    };
    setslot(&mut conns[to], "IMPORTING", &ids[from]);
    setslot(&mut conns[from], "MIGRATING", &ids[to]);
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query(&mut conns[from])
            .expect("GETKEYSINSLOT");
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(c.nodes[to].port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query::<()>(&mut conns[from])
            .expect("MIGRATE");
    }
    // The new owner first, then the old one, then the rest.
    let others = (0..conns.len()).filter(|k| *k != to && *k != from);
    let order: Vec<usize> = [to, from].into_iter().chain(others).collect();
    for k in order {
        setslot(&mut conns[k], "NODE", &ids[to]);
    }
    to
}

/// A user's slot moved to another primary while the user's device is online: the node
/// subscribes on the new owner by itself, and messages go on arriving.
#[test]
fn a_users_slot_moving_to_another_primary_keeps_its_messages_coming() {
    let shared = Shared::cluster();
    let (a, b) = (shared.node(), shared.node());
    let (mut alice, _) = Client::login(&a, "alice", "phone", 0);
    let (mut bob, _) = Client::login(&b, "bob", "phone", 0);
    alice.send("bob", "m1", "one");
    assert_eq!(texts(&bob.messages(1)), vec![(1, "one".into())]);
    let Shared::Cluster(c) = &shared else {
        unreachable!()
    };
    let slot: i64 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("im:{bob}:ch")
        .query(&mut redis_conn(&c.nodes[0]))
        .expect("KEYSLOT");
    let to = move_slot(c, slot);
    // Sends may be refused while the clients learn the new owner: retried with the same id.
    let ok = send_once_redis_is_back(&mut alice, "bob", "m2", "two");
    assert_eq!(ok.seq, 2);
    assert_eq!(texts(&bob.messages(1)), vec![(2, "two".into())]);
    common::poll_until(
        std::time::Duration::from_secs(10),
        "bob's channel subscribed on its new shard",
        || {
            let n: (String, i64) = redis::cmd("PUBSUB")
                .arg("SHARDNUMSUB")
                .arg("im:{bob}:ch")
                .query(&mut redis_conn(&c.nodes[to]))
                .map_err(|e| e.to_string())?;
            if n.1 == 1 {
                Ok(())
            } else {
                Err(format!("{n:?}"))
            }
        },
    );
    alice.send("bob", "m3", "three");
    assert_eq!(texts(&bob.messages(1)), vec![(3, "three".into())]);
}

macro_rules! against_both {
    ($($case:ident),* $(,)?) => {
        mod one_redis {
            $(#[test] fn $case() { super::$case(super::Shared::one()) })*
        }
        mod redis_cluster {
            $(#[test] fn $case() { super::$case(super::Shared::cluster()) })*
        }
    };
}

against_both!(
    a_send_on_one_node_reaches_its_recipient_logging_in_on_another,
    acknowledged_messages_survive_kill_9_of_the_node_and_of_redis,
    while_redis_is_away_sends_and_logins_get_unavailable_and_connections_stay_up,
    a_message_reaches_its_recipient_online_on_another_node_as_it_is_sent,
    a_user_with_devices_on_two_nodes_gets_everything_on_both,
    a_group_message_reaches_members_on_every_node,
    a_node_that_lost_redis_catches_its_devices_up_when_it_returns,
    the_same_device_logging_in_on_another_node_kicks_the_older_connection,
    a_membership_change_on_one_node_reaches_the_group_sends_of_another,
    friends_see_a_user_come_online_on_any_node_and_go_offline_with_its_last_device,
    a_friendship_made_on_one_node_is_news_to_both_friends_on_others,
    a_killed_nodes_users_go_offline_for_their_friends_and_come_back_elsewhere,
    devices_are_recorded_again_when_redis_lost_them_while_away,
);
