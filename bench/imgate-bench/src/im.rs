//! The IM protocol as the bench speaks it: requests built from the crate's generated types,
//! the bench header inside every message's content, ids and tokens.

use imgate::im::proto::{client_frame, ClientFrame};
use imgate::im::proto::{Ack, Login, SendMessage, Sync};

/// Request ids: Login, Sync and Ack use small fixed ids; a send uses SEND_ID_BASE + its
/// per-device counter, so its SendOk finds the message again.
pub const LOGIN_ID: u64 = 1;
pub const SYNC_ID: u64 = 2;
pub const ACK_ID: u64 = 3;
pub const SEND_ID_BASE: u64 = 1 << 40;

/// The subprotocol the bench offers.
pub const SUBPROTOCOL: &str = "imgate.v1.proto";

/// Bytes of the bench header at the start of every message's content.
pub const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"IMGB";

/// What the sender puts in a message: who sent it, its number, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub run: u32,
    /// The sending device's global index.
    pub sender: u32,
    /// Per-device counter, from 0.
    pub counter: u64,
    /// CLOCK_MONOTONIC at send, in ns.
    pub ts_ns: u64,
}

impl Header {
    /// Writes the header and padding up to `size` bytes (at least the header).
    pub fn write(&self, size: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.run.to_le_bytes());
        out.extend_from_slice(&self.sender.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&self.counter.to_le_bytes());
        out.extend_from_slice(&self.ts_ns.to_le_bytes());
        if size > out.len() {
            out.resize(size, b'.');
        }
    }

    /// The header of a bench message, or None for any other content.
    pub fn parse(content: &[u8]) -> Option<Header> {
        if content.len() < HEADER_LEN || &content[..4] != MAGIC {
            return None;
        }
        let u32_at = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&content[i..i + 4]);
            u32::from_le_bytes(b)
        };
        let u64_at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&content[i..i + 8]);
            u64::from_le_bytes(b)
        };
        Some(Header {
            run: u32_at(4),
            sender: u32_at(8),
            counter: u64_at(16),
            ts_ns: u64_at(24),
        })
    }
}

pub fn uid(prefix: &str, user: u32) -> String {
    format!("{prefix}u{user}")
}

/// Group `g` of a run shaped `groups` x `members`; `tag` names the scenario (the scenario
/// and the shape in the id keep runs of other kinds and shapes in one data directory apart).
pub fn group_id(prefix: &str, tag: &str, groups: u32, members: u32, g: u32) -> String {
    format!("{prefix}{tag}{groups}x{members}g{g}")
}

pub fn device_id(dev: u16) -> String {
    format!("d{dev}")
}

/// The idempotency key of a message: the same for every retry of it.
pub fn client_msg_id(run: u32, sender: u32, counter: u64) -> String {
    format!("b{run:08x}-{sender}-{counter}")
}

/// A login token valid for a day.
pub fn token(secret: &[u8], uid: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    imgate::im::auth::issue(secret, uid, now + 86_400)
}

pub fn login(token: &str, device_id: &str, last_seq: u64) -> ClientFrame {
    ClientFrame {
        id: LOGIN_ID,
        body: Some(client_frame::Body::Login(Login {
            token: token.to_owned(),
            device_id: device_id.to_owned(),
            last_seq,
        })),
    }
}

/// A send to a user (`to_uid`) or to a group (`group_id`, with `to_uid` empty).
pub fn send(
    counter: u64,
    to_uid: String,
    group_id: String,
    client_msg_id: String,
    content: Vec<u8>,
) -> ClientFrame {
    ClientFrame {
        id: SEND_ID_BASE + counter,
        body: Some(client_frame::Body::Send(SendMessage {
            to_uid,
            client_msg_id,
            content,
            group_id,
        })),
    }
}

pub fn ack(seq: u64) -> ClientFrame {
    ClientFrame {
        id: ACK_ID,
        body: Some(client_frame::Body::Ack(Ack { seq })),
    }
}

pub fn sync(after_seq: u64, limit: u32) -> ClientFrame {
    ClientFrame {
        id: SYNC_ID,
        body: Some(client_frame::Body::Sync(Sync { after_seq, limit })),
    }
}

/// A short name for an error code ("RATE_LIMITED").
pub fn error_name(code: i32) -> String {
    use imgate::im::proto::ErrorCode;
    match ErrorCode::try_from(code) {
        Ok(c) => c.as_str_name().trim_start_matches("ERROR_CODE_").to_owned(),
        Err(_) => format!("code{code}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_padding() {
        let h = Header {
            run: 0xDEAD_BEEF,
            sender: 1234,
            counter: 1 << 33,
            ts_ns: 987_654_321_000,
        };
        let mut buf = Vec::new();
        h.write(100, &mut buf);
        assert_eq!(buf.len(), 100);
        assert_eq!(Header::parse(&buf), Some(h));
        h.write(0, &mut buf);
        assert_eq!(buf.len(), HEADER_LEN);
        assert_eq!(Header::parse(&buf[..31]), None);
        assert_eq!(Header::parse(b"hello, this is not a bench message"), None);
        assert_eq!(error_name(5), "RATE_LIMITED");
    }
}
