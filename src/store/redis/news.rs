//! What one node publishes on a user's channel for the others (docs/CLUSTER.md, "Routing"),
//! as bytes. Only nodes read it, and a node reads only what a node of the same version wrote,
//! so the layout is this module's alone:
//!
//! the length of the publishing node's id (1 byte) and the id, the length of the uid (1 byte)
//! and the uid, then a kind byte: for `M` the seq and `server_time_ms` (8 bytes little-endian
//! each) and the body; for `T` the seq; for `L` the login's number and the device id; for
//! `J` (joined) and `X` (left) the group id; for `+` (came online) and `-` (went offline) the
//! friend's presence version in decimal, `:` and the friend's uid; for `A` (friendship made)
//! and `R` (ended) `1` or `0` (whether the friend is online), then the same. The presence kinds are also written by the Redis functions
//! (`super::LIBRARY`), which must follow this layout.

use crate::im::core::Published;
use crate::store::records::Corrupt;
use crate::store::{Body, Presence, StoredMessage};

const KIND_MESSAGE: u8 = b'M';
const KIND_TIP: u8 = b'T';
const KIND_LOGIN: u8 = b'L';
const KIND_JOINED: u8 = b'J';
const KIND_LEFT: u8 = b'X';
const KIND_ONLINE: u8 = b'+';
const KIND_OFFLINE: u8 = b'-';
const KIND_FRIEND: u8 = b'A';
const KIND_UNFRIEND: u8 = b'R';

/// One publish: who published it, for whose inbox, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct News<'a> {
    pub(crate) node: &'a str,
    pub(crate) uid: &'a str,
    pub(crate) news: Published,
}

/// Node ids and uids are at most 255 bytes here (uids are at most 64 everywhere).
fn short(s: &str) -> Option<u8> {
    u8::try_from(s.len()).ok()
}

impl News<'_> {
    /// The bytes of the publish, or None for an id too long to carry.
    pub(crate) fn encode(&self) -> Option<Vec<u8>> {
        let (n, u) = (short(self.node)?, short(self.uid)?);
        let tail = match &self.news {
            Published::Message(m) => 1 + 16 + m.body.len(),
            Published::Tip(_) => 1 + 8,
            Published::Login { device_id, .. } => 1 + 8 + device_id.len(),
            Published::Membership { gid, .. } => 1 + gid.len(),
            Published::Presence { uid, .. } => 22 + uid.len(),
            Published::Friend { uid, .. } => 23 + uid.len(),
        };
        let mut out = Vec::with_capacity(2 + self.node.len() + self.uid.len() + tail);
        out.push(n);
        out.extend_from_slice(self.node.as_bytes());
        out.push(u);
        out.extend_from_slice(self.uid.as_bytes());
        match &self.news {
            Published::Message(m) => {
                out.push(KIND_MESSAGE);
                out.extend_from_slice(&m.seq.to_le_bytes());
                out.extend_from_slice(&m.server_time_ms.to_le_bytes());
                out.extend_from_slice(&m.body);
            }
            Published::Tip(seq) => {
                out.push(KIND_TIP);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Published::Login { device_id, login } => {
                out.push(KIND_LOGIN);
                out.extend_from_slice(&login.to_le_bytes());
                out.extend_from_slice(device_id.as_bytes());
            }
            Published::Membership { gid, joined } => {
                out.push(if *joined { KIND_JOINED } else { KIND_LEFT });
                out.extend_from_slice(gid.as_bytes());
            }
            Published::Presence { uid, presence } => {
                out.push(if presence.online {
                    KIND_ONLINE
                } else {
                    KIND_OFFLINE
                });
                versioned(&mut out, presence.version, uid);
            }
            Published::Friend {
                uid,
                present,
                presence,
            } => {
                out.push(if *present { KIND_FRIEND } else { KIND_UNFRIEND });
                out.push(if presence.online { b'1' } else { b'0' });
                versioned(&mut out, presence.version, uid);
            }
        }
        Some(out)
    }

    /// # Errors
    /// Bytes that are not a publish of this layout.
    pub(crate) fn decode(raw: &[u8]) -> Result<News<'_>, Corrupt> {
        let (node, rest) = text(raw).ok_or(Corrupt("a publish with a bad node id"))?;
        let (uid, rest) = text(rest).ok_or(Corrupt("a publish with a bad uid"))?;
        let (&kind, rest) = rest
            .split_first()
            .ok_or(Corrupt("a publish with no kind"))?;
        let word = |b: &[u8]| -> Option<[u8; 8]> { b.get(..8)?.try_into().ok() };
        let news = match kind {
            KIND_MESSAGE => {
                let seq = word(rest).ok_or(Corrupt("a publish with no seq"))?;
                let time = word(&rest[8..]).ok_or(Corrupt("a publish with no time"))?;
                Published::Message(StoredMessage {
                    seq: u64::from_le_bytes(seq),
                    server_time_ms: i64::from_le_bytes(time),
                    body: Body::from(&rest[16..]),
                })
            }
            KIND_TIP if rest.len() == 8 => Published::Tip(u64::from_le_bytes(
                word(rest).ok_or(Corrupt("a publish with no seq"))?,
            )),
            KIND_LOGIN => {
                let login = word(rest).ok_or(Corrupt("a publish with no login"))?;
                let device_id = std::str::from_utf8(&rest[8..])
                    .map_err(|_| Corrupt("a publish with a bad device id"))?;
                Published::Login {
                    device_id: device_id.to_owned(),
                    login: u64::from_le_bytes(login),
                }
            }
            KIND_JOINED | KIND_LEFT => Published::Membership {
                gid: std::str::from_utf8(rest)
                    .map_err(|_| Corrupt("a publish with a bad group id"))?
                    .to_owned(),
                joined: kind == KIND_JOINED,
            },
            KIND_ONLINE | KIND_OFFLINE => {
                let (version, uid) = friend(rest)?;
                Published::Presence {
                    uid,
                    presence: Presence {
                        online: kind == KIND_ONLINE,
                        version,
                    },
                }
            }
            KIND_FRIEND | KIND_UNFRIEND => {
                let (online, rest) = match rest.split_first() {
                    Some((b'1', rest)) => (true, rest),
                    Some((b'0', rest)) => (false, rest),
                    _ => return Err(Corrupt("a friendship publish with no presence")),
                };
                let (version, uid) = friend(rest)?;
                Published::Friend {
                    uid,
                    present: kind == KIND_FRIEND,
                    presence: Presence { online, version },
                }
            }
            _ => return Err(Corrupt("a publish of an unknown kind")),
        };
        Ok(News { node, uid, news })
    }
}

/// A presence version in decimal, `:`, and the friend's uid: how a presence or friendship
/// publish ends (decimal, since the Redis functions write it).
fn versioned(out: &mut Vec<u8>, version: u64, uid: &str) {
    out.extend_from_slice(version.to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(uid.as_bytes());
}

/// The version and uid a presence or friendship publish ends with.
fn friend(raw: &[u8]) -> Result<(u64, String), Corrupt> {
    let text = std::str::from_utf8(raw).map_err(|_| Corrupt("a publish with a bad friend uid"))?;
    let (version, uid) = text
        .split_once(':')
        .ok_or(Corrupt("a publish with no presence version"))?;
    let version = version
        .parse()
        .map_err(|_| Corrupt("a publish with a bad presence version"))?;
    if uid.is_empty() {
        return Err(Corrupt("a publish with no friend uid"));
    }
    Ok((version, uid.to_owned()))
}

/// A length-prefixed UTF-8 string, and what follows it.
fn text(raw: &[u8]) -> Option<(&str, &[u8])> {
    let (&n, rest) = raw.split_first()?;
    let n = usize::from(n);
    let s = std::str::from_utf8(rest.get(..n)?).ok()?;
    Some((s, &rest[n..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_and_a_tip_read_back_as_written() {
        for news in [
            Published::Message(StoredMessage {
                seq: 7,
                server_time_ms: -3,
                body: Body::from(&b"hello"[..]),
            }),
            Published::Message(StoredMessage {
                seq: u64::MAX,
                server_time_ms: 1,
                body: Body::from(&[][..]),
            }),
            Published::Tip(42),
            Published::Login {
                device_id: "phone".into(),
                login: 9,
            },
            Published::Membership {
                gid: "team".into(),
                joined: true,
            },
            Published::Membership {
                gid: "team".into(),
                joined: false,
            },
            Published::Presence {
                uid: "bob".into(),
                presence: Presence {
                    online: true,
                    version: 1,
                },
            },
            Published::Presence {
                uid: "b:o:b".into(),
                presence: Presence {
                    online: false,
                    version: u64::MAX,
                },
            },
            Published::Friend {
                uid: "bob".into(),
                present: true,
                presence: Presence {
                    online: false,
                    version: 0,
                },
            },
            Published::Friend {
                uid: "bob".into(),
                present: false,
                presence: Presence {
                    online: true,
                    version: 12,
                },
            },
        ] {
            let n = News {
                node: "node-a",
                uid: "ålice",
                news,
            };
            let raw = n.encode().unwrap();
            assert_eq!(News::decode(&raw).unwrap(), n);
        }
    }

    #[test]
    fn every_truncation_and_a_wrong_kind_is_refused_not_misread() {
        let raw = News {
            node: "n",
            uid: "u",
            news: Published::Tip(1),
        }
        .encode()
        .unwrap();
        for end in 0..raw.len() {
            assert!(News::decode(&raw[..end]).is_err(), "{end} bytes");
        }
        let mut wrong = raw.clone();
        wrong[4] = b'?';
        assert!(News::decode(&wrong).is_err());
        let message = News {
            node: "n",
            uid: "u",
            news: Published::Message(StoredMessage {
                seq: 1,
                server_time_ms: 2,
                body: Body::from(&b"b"[..]),
            }),
        }
        .encode()
        .unwrap();
        // A message may have an empty body, so it reads back down to its fixed part.
        for end in 0..5 + 16 {
            assert!(News::decode(&message[..end]).is_err(), "{end} bytes");
        }
    }

    #[test]
    fn an_id_too_long_to_carry_is_not_encoded() {
        let long = "x".repeat(256);
        let n = News {
            node: &long,
            uid: "u",
            news: Published::Tip(1),
        };
        assert_eq!(n.encode(), None);
    }
}
