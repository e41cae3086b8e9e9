//! The IM core driven as the shell drives it, by an arbitrary sequence of operations: a few
//! connections opened, logged in (valid tokens and bad ones), sending, acking, syncing,
//! pinging and closing, batches taken and committed late and in groups, room reported, time
//! advancing, friendships, group memberships, group sends, signals and admin sends.
//!
//! Slab keys are reused by the shell, so an output for a connection that has gone reaches
//! whoever holds its key next. Checked after every operation:
//! - no output addresses a connection that is closed or was never opened, and an answer
//!   (a frame with a request id) only goes to the connection that made the request;
//! - per connection, delivered seqs strictly increase, and each delivered message is
//!   already durable in that connection's user's inbox (nothing a client was told about can
//!   be lost);
//! - every SendOk's seq is > 0 and durable in the sender's inbox; every admin send is
//!   answered once;
//! - the batches only hold membership changes that are real (the memory store asserts a
//!   join is of a non-member and a removal of a member), and no group outgrows its limit;
//! - a signal names its sender and is for the connection's user or one of its groups.
#![no_main]

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use imgate::im::auth;
use imgate::im::core::{
    ClusterOp, ConnId, Core, ImConfig, Now, Output, Published, ReadId, ReadRequest, Target,
};
use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S, ClientFrame};
use imgate::im::wire;
use imgate::store::memory::MemoryStore;
use imgate::store::{Presence, Sent, StoreRead, WriteBatch};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret";
const CONNS: usize = 4;
const UIDS: [&str; 3] = ["alice", "bob", "carol"];
const START_UNIX_MS: i64 = 1_700_000_000_000;
const GROUPS: [&str; 2] = ["g1", "g2"];
const MAX_GROUP_MEMBERS: usize = 2;

/// Login tokens, issued once (signing is slow): a long-lived one per uid, then one per uid
/// that expires a minute after the start, then tokens that must be refused.
fn tokens() -> &'static [String] {
    static TOKENS: OnceLock<Vec<String>> = OnceLock::new();
    TOKENS.get_or_init(|| {
        let start = (START_UNIX_MS / 1000) as u64;
        let mut t: Vec<String> = UIDS
            .iter()
            .map(|u| auth::issue(SECRET, u, start + 1_000_000))
            .collect();
        t.extend(UIDS.iter().map(|u| auth::issue(SECRET, u, start + 60)));
        t.push(auth::issue(b"another-secret", "alice", start + 1_000_000));
        t.push(auth::issue(SECRET, "", start + 1_000_000));
        t.push("not a token".to_owned());
        t
    })
}

/// Reads the fuzz input a byte at a time; zeros once it runs out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn pick<'b, T>(&mut self, from: &'b [T]) -> &'b T {
        &from[usize::from(self.byte()) % from.len()]
    }
}

/// What the driver knows of the connection holding a key now.
#[derive(Default)]
struct Conn {
    open: bool,
    /// The core asked for it to be closed: the shell feeds it no more frames.
    closing: bool,
    /// Ids of the requests this connection sent.
    requests: HashSet<u64>,
    /// The uid its LoginOk named.
    uid: Option<String>,
    last_delivered: u64,
}

struct Driver {
    core: Core,
    store: MemoryStore,
    now: Now,
    conns: Vec<Conn>,
    /// Taken batches not committed yet, oldest first.
    taken: Vec<(u64, std::sync::Arc<WriteBatch>)>,
    /// Reads put out and not answered yet, oldest first.
    reads: Vec<(ReadId, ReadRequest)>,
    next_request: u64,
    admin_waiting: HashSet<usize>,
    next_admin: usize,
    /// Whether a batch was refused: after one, a membership change may repeat the store, and
    /// a group may pass its bound.
    refused_any: bool,
    /// The users whose channel the core wants heard.
    subscribed: HashSet<String>,
}

impl Driver {
    fn frame(&mut self, conn: ConnId, body: Option<C>) {
        let id = self.next_request;
        self.next_request += 1;
        let c = &mut self.conns[conn];
        // The shell feeds no input to a connection that waits for a read.
        if c.open && c.closing || self.core.is_waiting(conn) {
            return;
        }
        c.requests.insert(id);
        self.core.on_frame(conn, ClientFrame { id, body }, self.now);
    }

    fn commit(&mut self, n: usize) {
        let n = n.min(self.taken.len());
        if n == 0 {
            return;
        }
        let mut answers: Vec<(u64, Vec<Sent>)> = Vec::with_capacity(n);
        for (id, batch) in self.taken.drain(..n) {
            if !self.refused_any {
                // Earlier changes of the same batch count as made.
                let mut made: HashMap<(&str, &str), bool> = HashMap::new();
                for m in &batch.memberships {
                    let key = (&*m.gid, &*m.uid);
                    let member = match made.get(&key) {
                        Some(joined) => *joined,
                        None => self.store.is_member(key.0, key.1).unwrap(),
                    };
                    assert_ne!(member, m.joined, "a membership change that changes nothing");
                    made.insert(key, m.joined);
                }
            }
            answers.push((id, self.store.apply(&batch)));
        }
        // A change decided while a refused one was in flight counted on it: after a refusal
        // a group may pass its bound (by as many members as refused removals).
        for g in GROUPS.iter().filter(|_| !self.refused_any) {
            let size = self.store.group_size(g).unwrap();
            assert!(size <= MAX_GROUP_MEMBERS, "{g} has {size} members");
        }
        for (id, sents) in &answers {
            self.core.on_committed(*id, sents, self.now);
        }
    }

    /// Reports the oldest `n` taken batches unconfirmed, as a writer whose Redis went away
    /// does; with `applied`, Redis had made their writes before the answer was lost.
    fn refuse(&mut self, n: usize, applied: bool) {
        let n = n.min(self.taken.len());
        self.refused_any |= n > 0;
        for (id, batch) in self.taken.drain(..n).collect::<Vec<_>>() {
            if applied {
                self.store.apply(&batch);
            }
            self.core.on_refused(id);
        }
    }

    /// What another node of a cluster would tell about `uid`'s inbox: the stored message
    /// `seq` (heard late, twice, or after a lost one), where the inbox ends, or that the
    /// subscription holds.
    fn news_from_elsewhere(&mut self, uid: &str, seq: u64, how: u8, extra: u8) {
        match how & 0x60 {
            0x00 => {
                if let Some(m) = self
                    .store
                    .messages_after(uid, seq.saturating_sub(1), 1)
                    .unwrap()
                    .pop()
                {
                    self.core
                        .handle_published(uid, Published::Message(m), false, self.now);
                }
            }
            0x20 => {
                let tip = self.store.max_seq(uid).unwrap();
                self.core
                    .handle_published(uid, Published::Tip(tip), false, self.now);
            }
            0x40 => {
                // A login of the same device elsewhere, or this node's own coming back.
                let device = if how & 0x10 == 0 { "phone" } else { "laptop" };
                let news = Published::Login {
                    device_id: device.into(),
                    login: seq,
                };
                self.core
                    .handle_published(uid, news, how & 0x08 != 0, self.now);
            }
            _ if how & 0x08 == 0 => self.core.handle_subscribed(uid),
            _ if how & 0x10 == 0 => self.core.handle_cluster_heard(),
            _ if how & 0x02 != 0 => {
                // Redis's presence news: a friend came or went, or a friendship changed, or
                // the lease was made anew.
                let other = UIDS[usize::from(extra >> 4) % UIDS.len()];
                let presence = Presence {
                    online: extra & 1 == 0,
                    version: u64::from(extra >> 2 & 3),
                };
                let news = match extra % 4 {
                    0 | 1 => Published::Presence {
                        uid: other.into(),
                        presence,
                    },
                    2 => Published::Friend {
                        uid: other.into(),
                        present: extra & 4 != 0,
                        presence,
                    },
                    _ => return self.core.handle_lease_made(),
                };
                self.core
                    .handle_published(uid, news, extra & 8 != 0, self.now);
            }
            _ => {
                // Another node changed a membership: what it says is in the store already.
                let gid = if seq & 1 == 0 { GROUPS[0] } else { GROUPS[1] };
                let joined = self.store.is_member(gid, uid).unwrap();
                let news = Published::Membership {
                    gid: gid.into(),
                    joined,
                };
                self.core.handle_published(uid, news, false, self.now);
            }
        }
    }

    /// Answers the oldest `n` reads put out, as the read thread would.
    fn answer(&mut self, n: usize) {
        while let Some((rid, req)) = self.core.poll_read() {
            self.reads.push((rid, req));
        }
        let n = n.min(self.reads.len());
        for (rid, req) in self.reads.drain(..n).collect::<Vec<_>>() {
            let answer = req.run(&self.store);
            self.core.handle_read(rid, answer, self.now);
        }
    }

    fn check_output(&mut self) {
        for r in self.core.drain_routes().collect::<Vec<_>>() {
            match r {
                ClusterOp::Subscribe(uid) => {
                    assert!(
                        self.subscribed.insert(uid.to_string()),
                        "{uid} subscribed twice"
                    )
                }
                ClusterOp::Unsubscribe(uid) => {
                    assert!(
                        self.subscribed.remove(&*uid),
                        "{uid} unsubscribed, not subscribed"
                    )
                }
                ClusterOp::Device { uid, device, on } => {
                    let here = self.core.online_devices(&uid).contains(&device.to_string());
                    assert_eq!(
                        here, on,
                        "{device} of {uid} recorded {on}, online here {here}"
                    );
                }
                // Told once committed; a later change in the same batch may have undone it.
                ClusterOp::Friendship { .. } => {}
                ClusterOp::Publish {
                    news:
                        Published::Login { .. }
                        | Published::Membership { .. }
                        | Published::Presence { .. }
                        | Published::Friend { .. },
                    ..
                } => {}
                ClusterOp::Publish { uid, news } => {
                    let (seq, msg) = match news {
                        Published::Message(m) => (m.seq, Some(m)),
                        Published::Tip(seq) => (seq, None),
                        _ => unreachable!(),
                    };
                    let stored = self.store.messages_after(&uid, seq - 1, 1).unwrap();
                    assert_eq!(stored.len(), 1, "{uid}'s {seq} published, not durable");
                    if let Some(m) = msg {
                        assert_eq!(stored[0], m, "published unlike stored");
                    }
                }
            }
        }
        let out: Vec<Output> = self.core.drain_output().collect();
        for o in out {
            let conn = match &o {
                Output::Frame { conn, .. }
                | Output::Deliver { conn, .. }
                | Output::Close { conn, .. } => *conn,
                Output::AdminSent { admin, seq, .. } => {
                    assert!(*seq > 0, "admin send acknowledged with seq 0");
                    assert!(
                        self.admin_waiting.remove(admin),
                        "admin send {admin} answered twice or never asked"
                    );
                    continue;
                }
                Output::AdminRefused { admin } => {
                    assert!(
                        self.admin_waiting.remove(admin),
                        "admin send {admin} answered twice or never asked"
                    );
                    continue;
                }
                Output::AdminRead { .. } => continue,
            };
            let c = self
                .conns
                .get_mut(conn)
                .filter(|c| c.open)
                .unwrap_or_else(|| panic!("{o:?} addresses a closed or unknown connection"));
            match o {
                Output::Frame { frame, .. } => {
                    if frame.id != 0 {
                        assert!(
                            c.requests.contains(&frame.id),
                            "conn {conn} is answered a request it did not make: {frame:?}"
                        );
                    }
                    match &frame.body {
                        Some(S::LoginOk(ok)) => c.uid = Some(ok.uid.clone()),
                        Some(S::SendOk(ok)) => {
                            assert!(ok.seq > 0, "SendOk with seq 0");
                            let uid = c.uid.as_deref().expect("SendOk before LoginOk");
                            let durable = self.store.max_seq(uid).unwrap();
                            assert!(ok.seq <= durable, "SendOk {} not durable", ok.seq);
                        }
                        Some(S::SyncResult(r)) => {
                            let uid = c.uid.as_deref().expect("SyncResult before LoginOk");
                            for m in &r.messages {
                                assert!(
                                    m.from_uid == uid || m.to_uid == uid || !m.group_id.is_empty(),
                                    "{m:?}"
                                );
                            }
                        }
                        Some(S::Signal(sig)) => {
                            let uid = c.uid.as_deref().expect("Signal before LoginOk");
                            assert!(!sig.from_uid.is_empty(), "{sig:?}");
                            assert!(
                                sig.to_uid == uid || GROUPS.contains(&sig.group_id.as_str()),
                                "{sig:?} is not for {uid}"
                            );
                        }
                        _ => {}
                    }
                }
                Output::Deliver { msg, .. } => {
                    assert!(
                        msg.seq > c.last_delivered,
                        "conn {conn}: seq {} delivered after {}",
                        msg.seq,
                        c.last_delivered
                    );
                    c.last_delivered = msg.seq;
                    let uid = c.uid.as_deref().expect("delivery before LoginOk");
                    let stored = self.store.messages_after(uid, msg.seq - 1, 1).unwrap();
                    assert_eq!(
                        stored,
                        [msg.clone()],
                        "delivered but not durable: {:?}",
                        String::from_utf8_lossy(&msg.body)
                    );
                    let m = wire::to_proto(&msg).expect("a delivery decodes");
                    assert!(
                        m.from_uid == uid || m.to_uid == uid || !m.group_id.is_empty(),
                        "{m:?} is not {uid}'s"
                    );
                }
                Output::Close { .. } => c.closing = true,
                Output::AdminSent { .. }
                | Output::AdminRefused { .. }
                | Output::AdminRead { .. } => {
                    unreachable!()
                }
            }
        }
    }

    fn step(&mut self, input: &mut Bytes<'_>) {
        let op = input.byte();
        let conn = usize::from(op >> 4) % CONNS;
        match op % 16 {
            0 => {
                if !self.conns[conn].open {
                    self.conns[conn] = Conn {
                        open: true,
                        ..Conn::default()
                    };
                    self.core.on_open(conn, self.now);
                }
            }
            1 => {
                let token = input.pick(tokens()).clone();
                let device_id = input.pick(&["phone", "laptop", ""]).to_string();
                let last_seq = u64::from(input.byte() % 8);
                self.frame(
                    conn,
                    Some(C::Login(proto::Login {
                        token,
                        device_id,
                        last_seq,
                    })),
                );
            }
            2 | 3 => {
                let to = input.pick(&["alice", "bob", "carol", ""]).to_string();
                let (to_uid, group_id) = match input.byte() % 4 {
                    0 => (String::new(), input.pick(&GROUPS).to_string()),
                    1 => (to, input.pick(&GROUPS).to_string()),
                    _ => (to, String::new()),
                };
                let client_msg_id = input.pick(&["m1", "m2", "m3", "m4", "m5", ""]).to_string();
                let content = vec![b'x'; usize::from(input.byte() % 80)];
                self.frame(
                    conn,
                    Some(C::Send(proto::SendMessage {
                        to_uid,
                        client_msg_id,
                        content,
                        group_id,
                    })),
                );
            }
            4 => {
                let last = self.conns[conn].last_delivered;
                let seq = match input.byte() % 4 {
                    0 => last,
                    1 => last.saturating_sub(1),
                    2 => u64::MAX,
                    _ => u64::from(input.byte()),
                };
                self.frame(conn, Some(C::Ack(proto::Ack { seq })));
            }
            5 => {
                let after_seq = u64::from(input.byte() % 16);
                let limit = u32::from(input.byte() % 8);
                self.frame(conn, Some(C::Sync(proto::Sync { after_seq, limit })));
            }
            6 => {
                let b = input.byte();
                if b % 2 == 0 {
                    self.frame(conn, Some(C::Ping(proto::Ping { client_time_ms: 1 })));
                } else {
                    let to_uid = input.pick(&["alice", "bob", ""]).to_string();
                    let group_id = input.pick(&["g1", "", ""]).to_string();
                    let kind = "k".repeat(usize::from(input.byte() % 40));
                    let payload = vec![0; usize::from(input.byte()) * 2];
                    self.frame(
                        conn,
                        Some(C::Signal(proto::Signal {
                            to_uid,
                            group_id,
                            kind,
                            payload,
                            ..Default::default()
                        })),
                    );
                }
            }
            7 => self.frame(conn, None),
            8 => {
                // The shell only reports bad frames of connections it still reads.
                let c = &self.conns[conn];
                if !(c.open && c.closing) {
                    self.core.on_bad_frame(conn, "fuzz");
                }
            }
            9 => {
                self.core.on_close(conn);
                self.conns[conn].open = false;
            }
            10 => {
                if let Some(taken) = self.core.take_batch() {
                    self.taken.push(taken);
                }
            }
            11 => {
                let how = input.byte();
                let n = usize::from(how / 2 % 4) + 1;
                if how & 0x81 == 0x80 {
                    self.refuse(n, how & 0x40 != 0);
                } else if how & 1 == 0 {
                    self.commit(n);
                } else if how & 0x80 != 0 {
                    let uid = *input.pick(&UIDS);
                    let extra = input.byte();
                    self.news_from_elsewhere(uid, u64::from(how >> 2 & 7), how, extra);
                } else {
                    self.answer(n);
                }
            }
            12 => {
                let room = *input.pick(&[0, 200, 4096, 1 << 20]);
                self.core.handle_room(conn, room, self.now);
            }
            13 => {
                let ms = u64::from(input.byte()) * 250;
                self.now.mono_ms += ms;
                self.now.unix_ms += ms as i64;
                for c in 0..CONNS {
                    self.core.check_ack_timeout(c, self.now);
                }
                self.core.handle_timeout(self.now);
            }
            14 => {
                let a = *input.pick(&UIDS);
                let b = *input.pick(&UIDS);
                let how = input.byte();
                let present = how & 1 == 0;
                if how & 2 == 0 {
                    self.core.set_friendship(a, b, present);
                } else {
                    let g = *input.pick(&GROUPS);
                    // As the admin API does: the members are read first unless cached
                    // (the change is refused until the read is answered).
                    let _ = self.core.warm_group(self.next_admin, g);
                    let _ = self.core.set_membership(g, a, present);
                }
            }
            _ => {
                let from = *input.pick(&["alice", "bob", "system", ""]);
                let to = if input.byte() % 3 == 0 {
                    Target::Group(*input.pick(&GROUPS))
                } else {
                    Target::User(*input.pick(&UIDS))
                };
                let cmid = input.pick(&["m1", "m2", "a1"]).to_string();
                let content = vec![b'y'; usize::from(input.byte() % 80)];
                let admin = self.next_admin;
                self.next_admin += 1;
                let now = self.now;
                if let Target::Group(g) = to {
                    let _ = self.core.warm_group(admin, g);
                }
                if self
                    .core
                    .admin_send(admin, from, to, cmid, content, now)
                    .is_ok()
                {
                    self.admin_waiting.insert(admin);
                }
            }
        }
        self.check_output();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Bytes(data);
    let cfg = ImConfig {
        max_devices: 1 + usize::from(input.byte() % 3),
        delivery_window: 1 + u64::from(input.byte() % 8),
        ack_timeout_ms: 1000,
        max_content_bytes: 64,
        rate_per_sec: 10.0,
        rate_burst: 5.0,
        max_bad_frames: 3,
        output_room: *input.pick(&[300, 2000, 1 << 20]),
        max_group_members: MAX_GROUP_MEMBERS,
        cluster: input.byte() & 1 == 0,
    };
    let mut d = Driver {
        core: Core::new(cfg, SECRET),
        store: MemoryStore::default(),
        now: Now {
            mono_ms: 1_000,
            unix_ms: START_UNIX_MS,
        },
        conns: (0..CONNS).map(|_| Conn::default()).collect(),
        taken: Vec::new(),
        reads: Vec::new(),
        next_request: 1,
        admin_waiting: HashSet::new(),
        next_admin: 0,
        refused_any: false,
        subscribed: HashSet::new(),
    };
    while !input.0.is_empty() {
        d.step(&mut input);
    }
    // The end of the run: everything taken or pending is committed, and every admin send
    // has its answer.
    loop {
        if let Some(taken) = d.core.take_batch() {
            d.taken.push(taken);
        }
        while let Some(r) = d.core.poll_read() {
            d.reads.push(r);
        }
        if d.taken.is_empty() && d.reads.is_empty() {
            break;
        }
        d.commit(usize::MAX);
        d.answer(usize::MAX);
        d.check_output();
    }
    d.check_output();
    assert!(d.admin_waiting.is_empty(), "unanswered admin sends");
});
