//! The client side of RFC 6455, as pure functions: the opening handshake (request, and the
//! check of the server's 101), masked client frames, and a reader for the server's frames.

use base64::Engine as _;
use sha1::{Digest, Sha1};

pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Longest response head we wait for.
pub const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)).
pub fn accept_for(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A random 16-byte key, base64 encoded (24 characters).
pub fn new_key(random: u128) -> String {
    base64::engine::general_purpose::STANDARD.encode(random.to_le_bytes())
}

/// The Upgrade request.
pub fn request(host: &str, path: &str, key: &str, protocol: Option<&str>) -> Vec<u8> {
    let mut r = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(p) = protocol {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(p);
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The server answered with another status (503 at its connection limit, ...).
    Status(u16),
    /// A 101 that is not a valid WebSocket acceptance, or unparsable HTTP.
    Invalid(&'static str),
}

/// Checks the server's answer. `Ok(None)`: the head is not complete yet. `Ok(Some(n))`: a
/// valid 101 occupying the first `n` bytes (frames may follow).
pub fn check_response(
    buf: &[u8],
    key: &str,
    protocol: Option<&str>,
) -> Result<Option<usize>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > MAX_RESPONSE_HEAD {
                return Err(HandshakeError::Invalid("response head too long"));
            }
            return Ok(None);
        }
        Err(_) => return Err(HandshakeError::Invalid("malformed HTTP response")),
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        return Err(HandshakeError::Status(status));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_owned())
    };
    if !header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(HandshakeError::Invalid("101 without Upgrade: websocket"));
    }
    if !header("connection").is_some_and(|v| {
        v.split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    }) {
        return Err(HandshakeError::Invalid("101 without Connection: upgrade"));
    }
    if header("sec-websocket-accept").as_deref() != Some(accept_for(key).as_str()) {
        return Err(HandshakeError::Invalid("wrong Sec-WebSocket-Accept"));
    }
    match (protocol, header("sec-websocket-protocol")) {
        (Some(want), Some(got)) if got == want => {}
        (None, None) => {}
        (Some(_), _) => return Err(HandshakeError::Invalid("subprotocol not selected")),
        (None, Some(_)) => return Err(HandshakeError::Invalid("unrequested subprotocol")),
    }
    Ok(Some(head_len))
}

/// Appends a masked frame header for `len` payload bytes.
pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: u8, len: usize, mask: [u8; 4]) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
}

/// XORs `data` with the mask key, as if it started at payload offset 0.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let word = u32::from_ne_bytes(mask);
    let mut chunks = data.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

/// Appends a complete masked frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: [u8; 4]) {
    write_header(out, true, opcode, payload.len(), mask);
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], mask);
}

/// A frame header as the server sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub fin: bool,
    pub opcode: u8,
    pub len: usize,
    pub header_len: usize,
}

/// Parses one server frame header. `Ok(None)`: more bytes needed. Server frames must be
/// unmasked, without RSV bits, with a known opcode and minimal length encoding; control
/// frames must be final and at most 125 bytes.
pub fn parse_head(buf: &[u8], max_len: usize) -> Result<Option<Head>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    if b0 & 0x70 != 0 {
        return Err("RSV bits set");
    }
    let opcode = b0 & 0x0F;
    let fin = b0 & 0x80 != 0;
    match opcode {
        OP_CONT | OP_TEXT | OP_BINARY => {}
        OP_CLOSE | OP_PING | OP_PONG => {
            if !fin {
                return Err("fragmented control frame");
            }
        }
        _ => return Err("reserved opcode"),
    }
    if b1 & 0x80 != 0 {
        return Err("masked server frame");
    }
    let (len, header_len) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let l = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if l < 126 {
                return Err("non-minimal length");
            }
            (l, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let l = u64::from_be_bytes(b);
            if l <= 0xFFFF || l >> 63 != 0 {
                return Err("non-minimal length");
            }
            (l, 10)
        }
        n => (u64::from(n), 2),
    };
    if opcode >= OP_CLOSE && len > 125 {
        return Err("control frame over 125 bytes");
    }
    if len > max_len as u64 {
        return Err("frame over the size limit");
    }
    Ok(Some(Head {
        fin,
        opcode,
        len: len as usize,
        header_len,
    }))
}

/// What one complete frame amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum Item<'a> {
    /// A complete data message; `Frag` payloads were reassembled into the reader's buffer.
    Data {
        text: bool,
        payload: &'a [u8],
    },
    /// A fragment of a message was consumed; nothing to do yet.
    Fragment,
    Ping(&'a [u8]),
    Pong,
    /// The server's Close: its code (None when the payload is empty) and reason.
    Close(Option<u16>, &'a [u8]),
}

fn valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1011 | 1012..=1014 | 3000..=4999)
}

/// Reassembles server messages across fragments; holds nothing between complete messages.
#[derive(Debug, Default)]
pub struct Reader {
    /// The opcode of a fragmented message in progress.
    frag_op: Option<u8>,
    /// Its bytes so far; after the final fragment, the whole message until the next call.
    frag: Vec<u8>,
}

impl Reader {
    /// Consumes at most one frame from the front of `buf`. Returns the bytes consumed (0 when
    /// the frame is not complete yet) and what it was.
    pub fn feed<'a>(
        &'a mut self,
        buf: &'a [u8],
        max_len: usize,
    ) -> Result<(usize, Option<Item<'a>>), &'static str> {
        if self.frag_op.is_none() && self.frag.capacity() > 0 {
            // The reassembled message handed out by the previous call is released.
            self.frag = Vec::new();
        }
        let Some(h) = parse_head(buf, max_len)? else {
            return Ok((0, None));
        };
        let total = h.header_len + h.len;
        if buf.len() < total {
            return Ok((0, None));
        }
        let payload = &buf[h.header_len..total];
        let item = match h.opcode {
            OP_PING => Item::Ping(payload),
            OP_PONG => Item::Pong,
            OP_CLOSE => {
                if payload.is_empty() {
                    Item::Close(None, payload)
                } else if payload.len() == 1 {
                    return Err("close payload of 1 byte");
                } else {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !valid_close_code(code) {
                        return Err("invalid close code");
                    }
                    if std::str::from_utf8(&payload[2..]).is_err() {
                        return Err("close reason not UTF-8");
                    }
                    Item::Close(Some(code), &payload[2..])
                }
            }
            OP_CONT => {
                let Some(op) = self.frag_op else {
                    return Err("continuation without a message");
                };
                if self.frag.len() + payload.len() > max_len {
                    return Err("message over the size limit");
                }
                self.frag.extend_from_slice(payload);
                if !h.fin {
                    Item::Fragment
                } else {
                    self.frag_op = None;
                    let text = op == OP_TEXT;
                    if text && std::str::from_utf8(&self.frag).is_err() {
                        return Err("text message not UTF-8");
                    }
                    Item::Data {
                        text,
                        payload: &self.frag,
                    }
                }
            }
            op => {
                if self.frag_op.is_some() {
                    return Err("new message inside a fragmented one");
                }
                if !h.fin {
                    self.frag_op = Some(op);
                    self.frag.extend_from_slice(payload);
                    Item::Fragment
                } else {
                    let text = op == OP_TEXT;
                    if text && std::str::from_utf8(payload).is_err() {
                        return Err("text message not UTF-8");
                    }
                    Item::Data { text, payload }
                }
            }
        };
        Ok((total, Some(item)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![if fin { 0x80 } else { 0 } | op];
        match payload.len() {
            n if n < 126 => f.push(n as u8),
            n if n <= 0xFFFF => {
                f.push(126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    /// Feeds `bytes` in chunks of `step`, collecting (kind, payload) of every item.
    fn read_all(bytes: &[u8], step: usize) -> Result<Vec<(String, Vec<u8>)>, &'static str> {
        let mut r = Reader::default();
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(step) {
            buf.extend_from_slice(chunk);
            loop {
                let (n, item) = r.feed(&buf, 1 << 20)?;
                if n == 0 {
                    break;
                }
                match item {
                    Some(Item::Data { text, payload }) => {
                        out.push((if text { "text" } else { "bin" }.into(), payload.to_vec()))
                    }
                    Some(Item::Ping(p)) => out.push(("ping".into(), p.to_vec())),
                    Some(Item::Pong) => out.push(("pong".into(), vec![])),
                    Some(Item::Close(c, _)) => {
                        out.push(("close".into(), c.unwrap_or(0).to_be_bytes().to_vec()))
                    }
                    Some(Item::Fragment) | None => {}
                }
                buf.drain(..n);
            }
        }
        assert!(buf.is_empty(), "bytes left over");
        Ok(out)
    }

    #[test]
    fn reads_frames_split_at_every_byte() {
        let big = vec![7u8; 70_000];
        let mid = vec![9u8; 300];
        let mut stream = server_frame(true, OP_BINARY, b"hello");
        stream.extend(server_frame(true, OP_PING, b"p"));
        stream.extend(server_frame(true, OP_BINARY, &mid));
        stream.extend(server_frame(true, OP_BINARY, &big));
        stream.extend(server_frame(false, OP_TEXT, "hé".as_bytes()));
        stream.extend(server_frame(true, OP_PING, b""));
        stream.extend(server_frame(true, OP_CONT, b"llo"));
        stream.extend(server_frame(true, OP_BINARY, b""));
        stream.extend(server_frame(true, OP_CLOSE, &[0x03, 0xE8, b'o', b'k']));
        for step in [1, 2, 3, 7, 100, 1 << 20] {
            let items = read_all(&stream, step).unwrap();
            let kinds: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
            assert_eq!(
                kinds,
                ["bin", "ping", "bin", "bin", "ping", "text", "bin", "close"],
                "step {step}"
            );
            assert_eq!(items[0].1, b"hello");
            assert_eq!(items[2].1, mid);
            assert_eq!(items[3].1, big);
            assert_eq!(items[5].1, "héllo".as_bytes());
            assert_eq!(items[7].1, 1000u16.to_be_bytes());
        }
    }

    #[test]
    fn refuses_what_a_server_must_not_send() {
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x82, 0x81, 0, 0, 0, 0, 0], "masked server frame"),
            (vec![0xC2, 0x00], "RSV bits set"),
            (vec![0x83, 0x00], "reserved opcode"),
            (vec![0x09, 0x00], "fragmented control frame"),
            (vec![0x80, 0x00], "continuation without a message"),
            (vec![0x82, 126, 0, 5, 1, 2, 3, 4, 5], "non-minimal length"),
            (vec![0x88, 0x01, 0x03], "close payload of 1 byte"),
            (vec![0x88, 0x02, 0x03, 0xED], "invalid close code"),
            (vec![0x81, 0x01, 0xFF], "text message not UTF-8"),
        ];
        for (bytes, why) in bad {
            assert_eq!(read_all(&bytes, 100), Err(why), "{bytes:?}");
        }
        let mut frag = server_frame(false, OP_BINARY, b"a");
        frag.extend(server_frame(true, OP_BINARY, b"b"));
        assert_eq!(
            read_all(&frag, 100),
            Err("new message inside a fragmented one")
        );
        let mut ping = vec![0x89, 126, 0, 126];
        ping.extend(vec![0; 126]);
        assert_eq!(read_all(&ping, 1000), Err("control frame over 125 bytes"));
    }

    #[test]
    fn client_frames_are_masked_and_handshake_is_checked() {
        let mut out = Vec::new();
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        write_frame(&mut out, OP_BINARY, &payload, [1, 2, 3, 4]);
        assert_eq!(out[0], 0x82);
        assert_eq!(out[1], 0x80 | 126);
        assert_eq!(&out[2..4], &300u16.to_be_bytes());
        assert_eq!(&out[4..8], &[1, 2, 3, 4]);
        let mut body = out[8..].to_vec();
        apply_mask(&mut body, [1, 2, 3, 4]);
        assert_eq!(body, payload);

        // RFC 6455 section 1.3's example key.
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        assert_eq!(accept_for(key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        let ok: &[u8] =
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                  Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                  Sec-WebSocket-Protocol: imgate.v1.proto\r\n\r\n\x82\x00";
        let n = check_response(ok, key, Some("imgate.v1.proto")).unwrap();
        assert_eq!(n, Some(ok.len() - 2));
        assert_eq!(
            check_response(&ok[..20], key, Some("imgate.v1.proto")),
            Ok(None)
        );
        assert_eq!(
            check_response(ok, "AAAAAAAAAAAAAAAAAAAAAA==", Some("imgate.v1.proto")),
            Err(HandshakeError::Invalid("wrong Sec-WebSocket-Accept"))
        );
        let busy = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\r\n";
        assert_eq!(
            check_response(busy, key, None),
            Err(HandshakeError::Status(503))
        );
        assert_eq!(new_key(0).len(), 24);
    }
}
