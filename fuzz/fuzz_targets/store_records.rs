//! The redb store's record layouts (log records, inbox chunks, send chunks). Records built
//! from the input read back as written: the log's entries in order (a body shared by
//! consecutive appends written once and read back for both), a chunk's messages from any
//! seq and up to any limit, a send chunk's keys whole or after any skip. Arbitrary bytes
//! given to every decoder are an error or a value, never a panic, the decoders agree on how
//! many entries a value holds, and whatever decodes encodes to a value that decodes the same.
#![no_main]

use std::sync::Arc;

use imgate::store::records::{self, InboxChunk, LogEntry};
use imgate::store::{Append, Body, StoredBatch, StoredMessage};
use libfuzzer_sys::fuzz_target;

/// Reads the fuzz input; zeros (and empty strings) once it runs out.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn byte(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn u64(&mut self) -> u64 {
        // Small values and ones near the top of the range both matter to a varint.
        match self.byte() % 4 {
            0 => u64::from(self.byte()),
            1 => u64::MAX - u64::from(self.byte()),
            _ => (0..8).fold(0, |v, _| v << 8 | u64::from(self.byte())),
        }
    }

    fn bytes(&mut self) -> &'a [u8] {
        let n = usize::from(self.byte() % 32).min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }

    fn string(&mut self) -> String {
        String::from_utf8_lossy(self.bytes()).into_owned()
    }
}

/// Batches of appends, sends and cursors, and the log entries they must read back as.
fn log_round_trip(input: &mut Bytes<'_>) {
    let mut batches = vec![StoredBatch::default()];
    let mut prev: Option<StoredMessage> = None;
    for _ in 0..usize::from(input.byte() % 32) {
        let b = batches.last_mut().expect("one batch at least");
        match input.byte() % 5 {
            0 => batches.push(StoredBatch::default()),
            1 | 2 => {
                let msg = match prev.clone().filter(|_| input.byte() & 1 == 0) {
                    // The same send in a second inbox.
                    Some(p) => StoredMessage {
                        seq: input.u64(),
                        ..p
                    },
                    None => StoredMessage {
                        seq: input.u64(),
                        server_time_ms: input.u64() as i64,
                        body: Body::from(input.bytes()),
                    },
                };
                prev = Some(msg.clone());
                b.appends.push(Append {
                    owner: input.string().into(),
                    msg,
                });
            }
            3 => b
                .sends
                .push((input.string().into(), input.string(), input.u64())),
            _ => b
                .cursors
                .push((input.string().into(), input.string().into(), input.u64())),
        }
    }
    let mut want = Vec::new();
    for b in &batches {
        want.extend(b.appends.iter().map(|a| LogEntry::Append {
            owner: &a.owner,
            seq: a.msg.seq,
            server_time_ms: a.msg.server_time_ms,
            body: &a.msg.body,
        }));
        want.extend(b.sends.iter().map(|(uid, id, seq)| LogEntry::Send {
            uid,
            client_msg_id: id,
            seq: *seq,
        }));
        want.extend(b.cursors.iter().map(|(uid, device, seq)| LogEntry::Cursor {
            uid,
            device_id: device,
            seq: *seq,
        }));
    }
    let mut rec = Vec::new();
    let refs: Vec<&StoredBatch> = batches.iter().collect();
    records::encode_log(&refs, &mut rec);
    assert_eq!(records::decode_log(&rec).expect("a record decodes"), want);
}

fn chunk_round_trip(input: &mut Bytes<'_>) {
    let first_seq = u64::from(input.byte()) + 1;
    let mut chunk = InboxChunk::new(first_seq, usize::from(input.byte()));
    let mut want = Vec::new();
    for _ in 0..usize::from(input.byte() % 16) {
        let m = StoredMessage {
            seq: chunk.next_seq(),
            server_time_ms: input.u64() as i64,
            body: Body::from(input.bytes()),
        };
        chunk.push(m.server_time_ms, &m.body);
        want.push(m);
    }
    assert_eq!(chunk.len(), want.len() as u64);
    assert_eq!(records::inbox_chunk_len(&chunk.bytes), Ok(chunk.len()));
    assert_eq!(
        records::decode_inbox_chunk(first_seq, &chunk.bytes).as_ref(),
        Ok(&want)
    );
    let after = first_seq - 1 + u64::from(input.byte() % 20);
    let limit = usize::from(input.byte() % 20);
    let mut got = Vec::new();
    chunk.messages_after(after, limit, &mut got);
    let expected: Vec<StoredMessage> = want
        .iter()
        .filter(|m| m.seq > after)
        .take(limit)
        .cloned()
        .collect();
    assert_eq!(got, expected);
}

fn sends_round_trip(input: &mut Bytes<'_>) {
    let mut keys = Vec::new();
    let mut want = Vec::new();
    for _ in 0..usize::from(input.byte() % 16) {
        let (id, seq) = (input.string(), input.u64());
        records::put_send(&id, seq, &mut keys);
        want.push((id, seq));
    }
    let mut chunk = Vec::new();
    records::encode_send_chunk(want.len(), &keys, &mut chunk);
    assert_eq!(records::send_chunk_len(&chunk), Ok(want.len() as u64));
    assert_eq!(records::send_chunk_keys(&chunk), Ok(&keys[..]));
    assert_eq!(records::decode_send_chunk(&chunk).as_ref(), Ok(&want));
    assert_eq!(records::decode_sends(&keys).as_ref(), Ok(&want));
    let skip = usize::from(input.byte()) % (want.len() + 1);
    let rest = records::skip_sends(&keys, skip).expect("a key list skips");
    assert_eq!(
        records::decode_sends(rest).as_ref(),
        Ok(&want[skip..].to_vec())
    );
}

/// Every decoder on the same arbitrary bytes.
fn arbitrary(data: &[u8]) {
    if let Ok(entries) = records::decode_log(data) {
        // One batch per entry keeps their order; a body the decoder shared (an APPEND_SAME)
        // is shared again.
        let mut batches = Vec::new();
        let mut prev: Option<(&[u8], StoredMessage)> = None;
        for e in &entries {
            let mut b = StoredBatch::default();
            match *e {
                LogEntry::Append {
                    owner,
                    seq,
                    server_time_ms,
                    body,
                } => {
                    let shared = prev
                        .as_ref()
                        .filter(|(p, m)| {
                            std::ptr::eq(*p, body) && m.server_time_ms == server_time_ms
                        })
                        .map(|(_, m)| m.body.clone());
                    let msg = StoredMessage {
                        seq,
                        server_time_ms,
                        body: shared.unwrap_or_else(|| Body::from(body)),
                    };
                    prev = Some((body, msg.clone()));
                    b.appends.push(Append {
                        owner: owner.into(),
                        msg,
                    });
                }
                LogEntry::Send {
                    uid,
                    client_msg_id,
                    seq,
                } => b.sends.push((uid.into(), client_msg_id.to_owned(), seq)),
                LogEntry::Cursor {
                    uid,
                    device_id,
                    seq,
                } => b.cursors.push((uid.into(), Arc::from(device_id), seq)),
            }
            batches.push(b);
        }
        let mut rec = Vec::new();
        let refs: Vec<&StoredBatch> = batches.iter().collect();
        records::encode_log(&refs, &mut rec);
        assert_eq!(records::decode_log(&rec).as_ref(), Ok(&entries));
        assert!(rec.len() <= data.len(), "re-encoding grew the record");
    }

    let first_seq = 1 + u64::from(data.first().copied().unwrap_or(0));
    let messages = records::decode_inbox_chunk(first_seq, data);
    let count = records::inbox_chunk_len(data);
    assert_eq!(
        messages.as_ref().map(|m| m.len() as u64).ok(),
        count.clone().ok()
    );
    if let Ok(messages) = messages {
        let mut chunk = InboxChunk::new(first_seq, 0);
        for m in &messages {
            assert_eq!(m.seq, chunk.next_seq());
            chunk.push(m.server_time_ms, &m.body);
        }
        assert_eq!(
            records::decode_inbox_chunk(first_seq, &chunk.bytes),
            Ok(messages)
        );
    }

    if let Ok(keys) = records::decode_sends(data) {
        let mut n = 0;
        records::for_each_send(data, |id, seq| {
            assert_eq!((id, seq), (keys[n].0.as_str(), keys[n].1));
            n += 1;
        })
        .expect("the same keys");
        assert_eq!(n, keys.len());
        let skip = keys.len() / 2;
        let rest = records::skip_sends(data, skip).expect("skips what decodes");
        assert_eq!(records::decode_sends(rest), Ok(keys[skip..].to_vec()));
    }
    if let Ok(keys) = records::decode_send_chunk(data) {
        assert_eq!(records::send_chunk_len(data), Ok(keys.len() as u64));
        let rest = records::send_chunk_keys(data).expect("a chunk has keys");
        assert_eq!(records::decode_sends(rest), Ok(keys));
    }
    let _ = records::skip_sends(data, usize::from(data.len() as u8));
}

fuzz_target!(|data: &[u8]| {
    arbitrary(data);
    let mut input = Bytes(data);
    log_round_trip(&mut input);
    chunk_round_trip(&mut input);
    sends_round_trip(&mut input);
});
