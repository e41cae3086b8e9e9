//! The encodings of the delivery hot path, written with prost's encoding primitives instead of
//! through the generated structs, so that a message is encoded once and never copied per
//! inbox or per recipient:
//!
//! - a message **body** is the `imgate.v1.Message` encoding of every field but `seq`. Both
//!   inboxes a send is appended to share it, the store keeps it as it is, and the seq lives
//!   beside it (in the store's keys, in [`StoredMessage::seq`]);
//! - a **delivery** is `ServerFrame{message}` whose payload is the `seq` field followed by the
//!   body. Protobuf lets fields come in any order, so this decodes like any other encoding of
//!   the same message (the tests check both against prost's own decoder).

use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use prost::Message as _;

use super::proto;
use crate::store::{self, StoredMessage};

/// The fields of a message body (everything but `seq`).
#[derive(Debug, Clone, Copy)]
pub struct Body<'a> {
    pub from_uid: &'a str,
    pub to_uid: &'a str,
    pub client_msg_id: &'a str,
    pub content: &'a [u8],
    pub server_time_ms: i64,
    pub from_device: &'a str,
    /// Set on group messages, whose `to_uid` is then empty.
    pub group_id: &'a str,
}

/// `imgate.v1.Message` field numbers.
const FROM_UID: u32 = 2;
const TO_UID: u32 = 3;
const CLIENT_MSG_ID: u32 = 4;
const CONTENT: u32 = 5;
const SERVER_TIME_MS: u32 = 6;
const FROM_DEVICE: u32 = 7;
const GROUP_ID: u32 = 8;
/// `imgate.v1.ServerFrame.message`.
const SERVER_FRAME_MESSAGE: u32 = 5;
/// `imgate.v1.Message.seq`.
const SEQ: u32 = 1;

/// Most bytes [`delivery_head`] writes: two keys and two varints.
pub const MAX_HEAD: usize = 22;

fn delimited_len(tag: u32, len: usize) -> usize {
    if len == 0 {
        return 0;
    }
    encoded_len_varint(u64::from(tag << 3)) + encoded_len_varint(len as u64) + len
}

fn put_delimited(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    // proto3 leaves fields at their default value out.
    if bytes.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Encodes a message body into one allocation of exactly its size (`scratch` is a reusable
/// buffer).
pub fn encode_body(b: &Body<'_>, scratch: &mut Vec<u8>) -> store::Body {
    let time = b.server_time_ms as u64;
    let len = delimited_len(FROM_UID, b.from_uid.len())
        + delimited_len(TO_UID, b.to_uid.len())
        + delimited_len(CLIENT_MSG_ID, b.client_msg_id.len())
        + delimited_len(CONTENT, b.content.len())
        + if time == 0 {
            0
        } else {
            1 + encoded_len_varint(time)
        }
        + delimited_len(FROM_DEVICE, b.from_device.len())
        + delimited_len(GROUP_ID, b.group_id.len());
    let out = scratch;
    out.clear();
    out.reserve(len);
    put_delimited(FROM_UID, b.from_uid.as_bytes(), out);
    put_delimited(TO_UID, b.to_uid.as_bytes(), out);
    put_delimited(CLIENT_MSG_ID, b.client_msg_id.as_bytes(), out);
    put_delimited(CONTENT, b.content, out);
    if time != 0 {
        encode_key(SERVER_TIME_MS, WireType::Varint, out);
        encode_varint(time, out);
    }
    put_delimited(FROM_DEVICE, b.from_device.as_bytes(), out);
    put_delimited(GROUP_ID, b.group_id.as_bytes(), out);
    debug_assert_eq!(out.len(), len);
    store::Body::from(&out[..])
}

/// Writes what precedes the body in a delivery's protobuf payload (the `ServerFrame.message`
/// key and length, then `Message.seq`) and returns its length. The payload is
/// `head[..n]` followed by the body.
pub fn delivery_head(seq: u64, body_len: usize, head: &mut [u8; MAX_HEAD]) -> usize {
    let message_len = 1 + encoded_len_varint(seq) + body_len;
    let mut out = &mut head[..];
    encode_key(SERVER_FRAME_MESSAGE, WireType::LengthDelimited, &mut out);
    encode_varint(message_len as u64, &mut out);
    encode_key(SEQ, WireType::Varint, &mut out);
    encode_varint(seq, &mut out);
    MAX_HEAD - out.len()
}

/// The message as a generated struct (for JSON clients, Sync pages and tests).
pub fn to_proto(m: &StoredMessage) -> Result<proto::Message, prost::DecodeError> {
    let mut msg = proto::Message::decode(&m.body[..])?;
    msg.seq = m.seq;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body<'a>(content: &'a [u8], time: i64) -> Body<'a> {
        Body {
            from_uid: "alice",
            to_uid: "bob",
            client_msg_id: "m-1",
            content,
            server_time_ms: time,
            from_device: "phone",
            group_id: "",
        }
    }

    #[test]
    fn a_body_is_the_message_without_its_seq() {
        for (content, time) in [
            (&b"hi"[..], 1_700_000_000_000),
            (&b""[..], 0),
            (&[7u8; 300][..], -5),
        ] {
            let b = encode_body(&body(content, time), &mut Vec::new());
            let m = proto::Message::decode(&b[..]).unwrap();
            let want = proto::Message {
                seq: 0,
                from_uid: "alice".into(),
                to_uid: "bob".into(),
                client_msg_id: "m-1".into(),
                content: content.to_vec(),
                server_time_ms: time,
                from_device: "phone".into(),
                group_id: String::new(),
            };
            assert_eq!(m, want);
            // The same bytes prost writes for it.
            assert_eq!(&b[..], &want.encode_to_vec()[..]);
        }
        let group = Body {
            to_uid: "",
            group_id: "g1",
            ..body(b"all", 9)
        };
        let b = encode_body(&group, &mut Vec::new());
        let m = proto::Message::decode(&b[..]).unwrap();
        assert_eq!((m.to_uid.as_str(), m.group_id.as_str()), ("", "g1"));
        assert_eq!(&b[..], &m.encode_to_vec()[..]);
    }

    #[test]
    fn a_delivery_decodes_as_a_server_frame_with_the_seq() {
        for seq in [1, 127, 128, 300_000, u64::MAX] {
            for content in [&b"x"[..], &[1u8; 200][..]] {
                let b = encode_body(&body(content, 42), &mut Vec::new());
                let mut head = [0u8; MAX_HEAD];
                let n = delivery_head(seq, b.len(), &mut head);
                let mut payload = head[..n].to_vec();
                payload.extend_from_slice(&b);
                let f = proto::ServerFrame::decode(&payload[..]).unwrap();
                let Some(proto::server_frame::Body::Message(m)) = f.body else {
                    panic!("{f:?}")
                };
                assert_eq!(f.id, 0);
                assert_eq!((m.seq, m.content.as_slice()), (seq, content));
                let stored = StoredMessage {
                    seq,
                    server_time_ms: 42,
                    body: b.clone(),
                };
                assert_eq!(to_proto(&stored).unwrap(), m);
            }
        }
    }
}
