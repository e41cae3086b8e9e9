//! The value of one inbox stream entry (docs/CLUSTER.md, "The inbox entry and the body stored
//! once"): the message's time, then either its body or a reference to the body in the
//! sender's inbox. Redis never looks inside it; only this module writes and reads it.
//!
//! Layout: a kind byte, `server_time_ms` as 8 bytes little-endian, then for [`KIND_BODY`] the
//! body, for [`KIND_REF`] the sender-inbox seq as 8 bytes little-endian and the sender's uid.

use crate::store::records::Corrupt;
use crate::store::Body;

const KIND_BODY: u8 = b'B';
const KIND_REF: u8 = b'R';
const HEAD: usize = 1 + 8;

/// What an inbox entry holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// The body itself: the sender's own copy.
    Body(Body),
    /// The body is the entry `from_seq` of `from_uid`'s inbox.
    Ref { from_uid: String, from_seq: u64 },
}

/// An inbox entry: when the message was accepted, and its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub server_time_ms: i64,
    pub content: Content,
}

impl Entry {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let tail = match &self.content {
            Content::Body(b) => b.len(),
            Content::Ref { from_uid, .. } => 8 + from_uid.len(),
        };
        let mut out = Vec::with_capacity(HEAD + tail);
        out.push(match self.content {
            Content::Body(_) => KIND_BODY,
            Content::Ref { .. } => KIND_REF,
        });
        out.extend_from_slice(&self.server_time_ms.to_le_bytes());
        match &self.content {
            Content::Body(b) => out.extend_from_slice(b),
            Content::Ref { from_uid, from_seq } => {
                out.extend_from_slice(&from_seq.to_le_bytes());
                out.extend_from_slice(from_uid.as_bytes());
            }
        }
        out
    }

    /// Reads back what [`Entry::encode`] wrote.
    ///
    /// # Errors
    /// [`Corrupt`] when `v` is shorter than its kind needs, of no known kind, or names a
    /// sender that is not UTF-8.
    pub(crate) fn decode(v: &[u8]) -> Result<Entry, Corrupt> {
        if v.len() < HEAD {
            return Err(Corrupt("inbox entry shorter than its header"));
        }
        let mut time = [0u8; 8];
        time.copy_from_slice(&v[1..HEAD]);
        let server_time_ms = i64::from_le_bytes(time);
        let rest = &v[HEAD..];
        let content = match v[0] {
            KIND_BODY => Content::Body(Body::from(rest)),
            KIND_REF => {
                if rest.len() < 8 {
                    return Err(Corrupt("inbox reference without its seq"));
                }
                let mut seq = [0u8; 8];
                seq.copy_from_slice(&rest[..8]);
                let from_uid = std::str::from_utf8(&rest[8..])
                    .map_err(|_| Corrupt("inbox reference to a uid that is not UTF-8"))?;
                Content::Ref {
                    from_uid: from_uid.to_owned(),
                    from_seq: u64::from_le_bytes(seq),
                }
            }
            _ => return Err(Corrupt("inbox entry of an unknown kind")),
        };
        Ok(Entry {
            server_time_ms,
            content,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_written() {
        for e in [
            Entry {
                server_time_ms: 1_700_000_000_123,
                content: Content::Body(Body::from(&b"\x0a\x03bob"[..])),
            },
            Entry {
                server_time_ms: -1,
                content: Content::Body(Body::from(&b""[..])),
            },
            Entry {
                server_time_ms: 7,
                content: Content::Ref {
                    from_uid: "alice}{".into(),
                    from_seq: u64::MAX - 3,
                },
            },
        ] {
            assert_eq!(Entry::decode(&e.encode()), Ok(e));
        }
    }

    #[test]
    fn the_layout_is_kind_time_then_content() {
        let e = Entry {
            server_time_ms: 0x0102,
            content: Content::Ref {
                from_uid: "al".into(),
                from_seq: 5,
            },
        };
        assert_eq!(e.encode(), b"R\x02\x01\0\0\0\0\0\0\x05\0\0\0\0\0\0\0al");
    }

    #[test]
    fn what_does_not_parse_is_corrupt_not_guessed() {
        let ok = Entry {
            server_time_ms: 1,
            content: Content::Ref {
                from_uid: "a".into(),
                from_seq: 1,
            },
        }
        .encode();
        assert!(Entry::decode(&ok[..HEAD - 1]).is_err());
        assert!(Entry::decode(&ok[..HEAD + 7]).is_err(), "seq cut short");
        let mut bad_kind = ok.clone();
        bad_kind[0] = b'X';
        assert_eq!(
            Entry::decode(&bad_kind),
            Err(Corrupt("inbox entry of an unknown kind"))
        );
        let mut bad_uid = ok;
        bad_uid.push(0xff);
        assert!(Entry::decode(&bad_uid).is_err());
        assert!(Entry::decode(&ok_body_of_header_only()).is_ok());
    }

    fn ok_body_of_header_only() -> Vec<u8> {
        let mut v = vec![KIND_BODY];
        v.extend_from_slice(&0i64.to_le_bytes());
        v
    }
}
