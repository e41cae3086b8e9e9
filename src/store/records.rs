//! The byte layouts the redb store writes around message bodies:
//!
//! - a **log record** holds every inbox append, idempotency key and cursor of one commit, in
//!   order;
//! - an **inbox chunk** holds consecutive messages of one inbox (its first seq is in the key):
//!   per message its time and its length-prefixed body, so that a chunk grows by appending;
//! - a **send chunk** holds consecutive idempotency keys of one user.
//!
//! Integers are protobuf varints (prost's encoding primitives), strings and bodies are
//! length-prefixed. A value that does not parse is corruption, which the store reports instead
//! of guessing.

use prost::encoding::decode_varint;

use super::{Body, StoredBatch, StoredMessage};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corrupt(pub &'static str);

impl std::fmt::Display for Corrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "corrupt store record: {}", self.0)
    }
}

impl std::error::Error for Corrupt {}

/// One entry of a log record, borrowed from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEntry<'a> {
    Append {
        owner: &'a str,
        seq: u64,
        server_time_ms: i64,
        body: &'a [u8],
    },
    Send {
        uid: &'a str,
        client_msg_id: &'a str,
        seq: u64,
    },
    Cursor {
        uid: &'a str,
        device_id: &'a str,
        seq: u64,
    },
}

const APPEND: u8 = 1;
const SEND: u8 = 2;
const CURSOR: u8 = 3;
/// An append with the body (and time) of the append before it: a send's two inboxes.
const APPEND_SAME: u8 = 4;

/// A protobuf varint, as prost's `encode_varint` writes it, in one `extend` instead of one
/// checked push per byte (it is on the storage thread's hot path).
fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    let mut buf = [0u8; 10];
    let mut n = 0;
    while v >= 0x80 {
        buf[n] = v as u8 | 0x80;
        v >>= 7;
        n += 1;
    }
    buf[n] = v as u8;
    out.extend_from_slice(&buf[..=n]);
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    encode_varint(b.len() as u64, out);
    out.extend_from_slice(b);
}

/// Appends the log record of `batches` (their appends, sends and cursors; friendships are
/// not logged) to `out`.
pub fn encode_log(batches: &[&StoredBatch], out: &mut Vec<u8>) {
    let mut prev: Option<&StoredMessage> = None;
    for b in batches {
        for a in &b.appends {
            let same = prev.is_some_and(|p| {
                std::sync::Arc::ptr_eq(&p.body, &a.msg.body)
                    && p.server_time_ms == a.msg.server_time_ms
            });
            out.push(if same { APPEND_SAME } else { APPEND });
            put_bytes(a.owner.as_bytes(), out);
            encode_varint(a.msg.seq, out);
            if !same {
                encode_varint(a.msg.server_time_ms as u64, out);
                put_bytes(&a.msg.body, out);
            }
            prev = Some(&a.msg);
        }
        for (uid, id, seq) in &b.sends {
            out.push(SEND);
            put_bytes(uid.as_bytes(), out);
            put_send(id, *seq, out);
        }
        for (uid, device, seq) in &b.cursors {
            out.push(CURSOR);
            put_bytes(uid.as_bytes(), out);
            put_bytes(device.as_bytes(), out);
            encode_varint(*seq, out);
        }
    }
}

fn varint(buf: &mut &[u8]) -> Result<u64, Corrupt> {
    decode_varint(buf).map_err(|_| Corrupt("bad varint"))
}

fn bytes_field<'a>(buf: &mut &'a [u8]) -> Result<&'a [u8], Corrupt> {
    let len = usize::try_from(varint(buf)?).map_err(|_| Corrupt("bad length"))?;
    if len > buf.len() {
        return Err(Corrupt("truncated"));
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Ok(head)
}

fn str_field<'a>(buf: &mut &'a [u8]) -> Result<&'a str, Corrupt> {
    std::str::from_utf8(bytes_field(buf)?).map_err(|_| Corrupt("bad utf-8"))
}

/// The entries of a log record, in order.
pub fn decode_log(mut buf: &[u8]) -> Result<Vec<LogEntry<'_>>, Corrupt> {
    let mut out = Vec::new();
    let mut prev: Option<(i64, &[u8])> = None;
    while let Some((&kind, rest)) = buf.split_first() {
        buf = rest;
        out.push(match kind {
            APPEND | APPEND_SAME => {
                let owner = str_field(&mut buf)?;
                let seq = varint(&mut buf)?;
                let (server_time_ms, body) = match (kind, prev) {
                    (APPEND, _) => (varint(&mut buf)? as i64, bytes_field(&mut buf)?),
                    (_, Some(p)) => p,
                    (_, None) => return Err(Corrupt("a repeated body comes first")),
                };
                prev = Some((server_time_ms, body));
                LogEntry::Append {
                    owner,
                    seq,
                    server_time_ms,
                    body,
                }
            }
            SEND => LogEntry::Send {
                uid: str_field(&mut buf)?,
                client_msg_id: str_field(&mut buf)?,
                seq: varint(&mut buf)?,
            },
            CURSOR => LogEntry::Cursor {
                uid: str_field(&mut buf)?,
                device_id: str_field(&mut buf)?,
                seq: varint(&mut buf)?,
            },
            _ => return Err(Corrupt("unknown log entry")),
        });
    }
    Ok(out)
}

/// An inbox chunk being built a message at a time; always a complete chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxChunk {
    pub first_seq: u64,
    pub bytes: Vec<u8>,
    count: u64,
}

impl InboxChunk {
    /// An empty chunk with room for `capacity` bytes.
    pub fn new(first_seq: u64, capacity: usize) -> InboxChunk {
        InboxChunk {
            first_seq,
            bytes: Vec::with_capacity(capacity),
            count: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The seq the next message must have.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.count
    }

    /// Appends the message of seq `next_seq()`.
    pub fn push(&mut self, server_time_ms: i64, body: &[u8]) {
        encode_varint(server_time_ms as u64, &mut self.bytes);
        put_bytes(body, &mut self.bytes);
        self.count += 1;
    }

    /// Up to `limit` of its messages with seq > `after`, appended to `out`.
    pub fn messages_after(&self, after: u64, limit: usize, out: &mut Vec<StoredMessage>) {
        // Built by `push` only: it always decodes.
        let _ = decode_inbox_chunk_into(self.first_seq, &self.bytes, after, limit, out);
    }
}

/// How many messages an inbox chunk holds.
pub fn inbox_chunk_len(mut buf: &[u8]) -> Result<u64, Corrupt> {
    let mut n = 0;
    while !buf.is_empty() {
        varint(&mut buf)?;
        bytes_field(&mut buf)?;
        n += 1;
    }
    Ok(n)
}

/// The messages of the inbox chunk that starts at `first_seq`.
pub fn decode_inbox_chunk(first_seq: u64, value: &[u8]) -> Result<Vec<StoredMessage>, Corrupt> {
    let mut out = Vec::new();
    decode_inbox_chunk_into(first_seq, value, 0, usize::MAX, &mut out)?;
    Ok(out)
}

/// Appends up to `limit` messages of the chunk with seq > `after` to `out`.
pub fn decode_inbox_chunk_into(
    first_seq: u64,
    value: &[u8],
    after: u64,
    limit: usize,
    out: &mut Vec<StoredMessage>,
) -> Result<(), Corrupt> {
    let mut buf = value;
    let mut seq = first_seq;
    let mut taken = 0;
    while !buf.is_empty() && taken < limit {
        let server_time_ms = varint(&mut buf)? as i64;
        let body = bytes_field(&mut buf)?;
        if seq > after {
            out.push(StoredMessage {
                seq,
                server_time_ms,
                body: Body::from(body),
            });
            taken += 1;
        }
        seq += 1;
    }
    Ok(())
}

/// Appends one idempotency key (client_msg_id, seq) as send chunks and log records hold it.
pub fn put_send(id: &str, seq: u64, out: &mut Vec<u8>) {
    put_bytes(id.as_bytes(), out);
    encode_varint(seq, out);
}

/// Appends a send chunk of `count` keys, each encoded by [`put_send`] into `keys`.
pub fn encode_send_chunk(count: usize, keys: &[u8], out: &mut Vec<u8>) {
    encode_varint(count as u64, out);
    out.extend_from_slice(keys);
}

/// Keys encoded by [`put_send`] one after the other, in order.
pub fn decode_sends(buf: &[u8]) -> Result<Vec<(String, u64)>, Corrupt> {
    let mut out = Vec::new();
    for_each_send(buf, |id, seq| out.push((id.to_owned(), seq)))?;
    Ok(out)
}

/// Calls `f` with each key encoded by [`put_send`] in `buf`, in order, without copying.
pub fn for_each_send(mut buf: &[u8], mut f: impl FnMut(&str, u64)) -> Result<(), Corrupt> {
    while !buf.is_empty() {
        let id = str_field(&mut buf)?;
        f(id, varint(&mut buf)?);
    }
    Ok(())
}

/// `buf` (keys encoded by [`put_send`]) without its first `n` keys.
pub fn skip_sends(mut buf: &[u8], n: usize) -> Result<&[u8], Corrupt> {
    for _ in 0..n {
        str_field(&mut buf)?;
        varint(&mut buf)?;
    }
    Ok(buf)
}

/// The keys of a send chunk without its count.
pub fn send_chunk_keys(buf: &[u8]) -> Result<&[u8], Corrupt> {
    let mut rest = buf;
    varint(&mut rest)?;
    Ok(rest)
}

/// The keys of a send chunk, in send order.
pub fn decode_send_chunk(mut buf: &[u8]) -> Result<Vec<(String, u64)>, Corrupt> {
    let n = varint(&mut buf)?;
    let keys = decode_sends(buf)?;
    if keys.len() as u64 != n {
        return Err(Corrupt("a send chunk's count is wrong"));
    }
    Ok(keys)
}

/// How many keys a send chunk holds.
pub fn send_chunk_len(mut buf: &[u8]) -> Result<u64, Corrupt> {
    varint(&mut buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Append;
    use std::sync::Arc;

    fn msg(seq: u64, body: &'static [u8]) -> StoredMessage {
        StoredMessage {
            seq,
            server_time_ms: -3 + seq as i64,
            body: Body::from(body),
        }
    }

    #[test]
    fn a_log_record_lists_its_batches_in_order() {
        let shared = msg(7, b"body");
        let a = StoredBatch {
            appends: vec![
                Append {
                    owner: "alice".into(),
                    msg: shared.clone(),
                },
                // The same send in a second inbox: its body is written once.
                Append {
                    owner: "carol".into(),
                    msg: StoredMessage { seq: 2, ..shared },
                },
                Append {
                    owner: "bob".into(),
                    msg: msg(1, b""),
                },
            ],
            sends: vec![("alice".into(), "m1".into(), 7)],
            cursors: vec![],
            friendships: vec![("x".into(), "y".into(), true)],
            memberships: vec![],
        };
        let b = StoredBatch {
            cursors: vec![(Arc::from("bob"), Arc::from("phone"), 1)],
            ..StoredBatch::default()
        };
        let mut rec = Vec::new();
        encode_log(&[&a, &b], &mut rec);
        assert_eq!(
            decode_log(&rec).unwrap(),
            vec![
                LogEntry::Append {
                    owner: "alice",
                    seq: 7,
                    server_time_ms: 4,
                    body: b"body"
                },
                LogEntry::Append {
                    owner: "carol",
                    seq: 2,
                    server_time_ms: 4,
                    body: b"body"
                },
                LogEntry::Append {
                    owner: "bob",
                    seq: 1,
                    server_time_ms: -2,
                    body: b""
                },
                LogEntry::Send {
                    uid: "alice",
                    client_msg_id: "m1",
                    seq: 7
                },
                LogEntry::Cursor {
                    uid: "bob",
                    device_id: "phone",
                    seq: 1
                },
            ]
        );
        // Every truncation is refused, never misread.
        for cut in 1..rec.len() {
            if let Ok(entries) = decode_log(&rec[..cut]) {
                assert!(entries.len() < 5, "cut at {cut} parsed as whole");
            }
        }
        assert!(decode_log(&[9]).is_err());
        let once = rec.windows(4).filter(|w| w == b"body").count();
        assert_eq!(once, 1, "a shared body is logged once");
    }

    #[test]
    fn corruption_is_reported_with_what_was_wrong() {
        assert_eq!(
            Corrupt("truncated").to_string(),
            "corrupt store record: truncated"
        );
    }

    #[test]
    fn an_inbox_chunk_is_empty_until_a_message_is_pushed() {
        let mut c = InboxChunk::new(3, 16);
        assert!(c.is_empty());
        c.push(1, b"a");
        assert!(!c.is_empty());
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn varints_are_prosts() {
        for v in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let (mut ours, mut theirs) = (Vec::new(), Vec::new());
            encode_varint(v, &mut ours);
            prost::encoding::encode_varint(v, &mut theirs);
            assert_eq!(ours, theirs);
        }
    }

    #[test]
    fn chunks_round_trip() {
        let msgs = vec![msg(5, b"a"), msg(6, b"bc"), msg(7, b"")];
        let mut c = InboxChunk::new(5, 0);
        for m in &msgs {
            assert_eq!(c.next_seq(), m.seq);
            c.push(m.server_time_ms, &m.body);
        }
        let v = &c.bytes;
        assert_eq!(inbox_chunk_len(v), Ok(3));
        assert_eq!(decode_inbox_chunk(5, v).unwrap(), msgs);
        assert!(decode_inbox_chunk(5, &v[..v.len() - 1]).is_err());
        let mut after = Vec::new();
        c.messages_after(5, 1, &mut after);
        assert_eq!(after, msgs[1..2]);

        let mut keys = Vec::new();
        put_send("k1", 3, &mut keys);
        put_send("k2", 9, &mut keys);
        let mut v = Vec::new();
        encode_send_chunk(2, &keys, &mut v);
        assert_eq!(send_chunk_len(&v), Ok(2));
        assert_eq!(
            decode_send_chunk(&v).unwrap(),
            vec![("k1".to_owned(), 3), ("k2".to_owned(), 9)]
        );
        v.push(0);
        assert!(decode_send_chunk(&v).is_err());
    }
}
