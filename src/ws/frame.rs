//! RFC 6455 §5.2 frame headers: parsing client frames, writing server frames, and masking.
//!
//! Pure functions over byte slices. Payloads are never copied here: the decoder in
//! [`super::connection`] unmasks them in place in the caller's buffer.

use super::error::WsError;

/// Longest possible frame header: 2 bytes + 8-byte extended length + 4-byte mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// Largest payload a control frame may carry (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_bits(bits: u8) -> Option<OpCode> {
        Some(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }

    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed, validated client frame header.
///
/// Invariants upheld by [`parse_client_header`]: RSV bits are clear, the opcode is known, the
/// frame is masked, and control frames are final and at most 125 bytes long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    pub opcode: OpCode,
    pub mask: [u8; 4],
    pub payload_len: u64,
}

/// Parses a client-to-server frame header from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole header, otherwise the header and its
/// length in bytes. Every header-level rule of §5.2 is enforced here so the error surfaces as soon
/// as the offending byte arrives, before any payload is buffered.
pub fn parse_client_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, WsError> {
    let (b0, b1) = match buf {
        [b0, b1, ..] => (*b0, *b1),
        [b0] => {
            check_first_byte(*b0)?;
            return Ok(None);
        }
        [] => return Ok(None),
    };
    let opcode = check_first_byte(b0)?;
    let fin = b0 & 0x80 != 0;
    if b1 & 0x80 == 0 {
        return Err(WsError::UnmaskedFrame);
    }
    let len7 = b1 & 0x7F;
    if opcode.is_control() {
        if !fin {
            return Err(WsError::FragmentedControl);
        }
        if usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(WsError::ControlTooLong);
        }
    }
    let (payload_len, len_bytes) = match len7 {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([b[0], b[1]]);
            if len < 126 {
                return Err(WsError::NonMinimalLength);
            }
            (u64::from(len), 2)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(b);
            let len = u64::from_be_bytes(raw);
            if len >> 63 != 0 {
                return Err(WsError::LengthHighBit);
            }
            if len <= u64::from(u16::MAX) {
                return Err(WsError::NonMinimalLength);
            }
            (len, 8)
        }
        n => (u64::from(n), 0),
    };
    let mask_at = 2 + len_bytes;
    let Some(m) = buf.get(mask_at..mask_at + 4) else {
        return Ok(None);
    };
    let mask = [m[0], m[1], m[2], m[3]];
    Ok(Some((
        FrameHeader {
            fin,
            opcode,
            mask,
            payload_len,
        },
        mask_at + 4,
    )))
}

fn check_first_byte(b0: u8) -> Result<OpCode, WsError> {
    if b0 & 0x70 != 0 {
        return Err(WsError::ReservedBits);
    }
    OpCode::from_bits(b0 & 0x0F).ok_or(WsError::ReservedOpcode)
}

/// Appends an unmasked server frame header (§5.2) for a payload of `len` bytes.
pub fn write_header(out: &mut Vec<u8>, fin: bool, opcode: OpCode, len: usize) {
    let b0 = if fin { 0x80 } else { 0 } | opcode.bits();
    if len < 126 {
        out.extend_from_slice(&[b0, len as u8]);
    } else if let Ok(len16) = u16::try_from(len) {
        let l = len16.to_be_bytes();
        out.extend_from_slice(&[b0, 126, l[0], l[1]]);
    } else {
        out.extend_from_slice(&[b0, 127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
}

/// Appends a complete unmasked server frame.
pub fn write_frame(out: &mut Vec<u8>, opcode: OpCode, payload: &[u8]) {
    write_frame_parts(out, opcode, &[payload]);
}

/// Appends a complete unmasked server frame whose payload is `parts` in order.
pub fn write_frame_parts(out: &mut Vec<u8>, opcode: OpCode, parts: &[&[u8]]) {
    let len = parts.iter().map(|p| p.len()).sum();
    out.reserve(MAX_HEADER_LEN + len);
    write_header(out, true, opcode, len);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Appends a Close frame carrying `code` and `reason` (§5.5.1).
///
/// The reason is truncated on a character boundary so the payload stays within 125 bytes.
pub fn write_close(out: &mut Vec<u8>, code: u16, reason: &str) {
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    write_header(out, true, OpCode::Close, 2 + reason.len());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(reason);
}

/// XORs `buf` with the mask `key`, where `buf[0]` is byte number `offset` of the payload.
///
/// Works a machine word at a time on the aligned middle of the buffer; payloads split across
/// reads keep their phase through `offset`.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let mut key = key;
    key.rotate_left(offset % 4);
    // SAFETY: `align_to_mut` on u8 -> u64 is sound: every bit pattern is a valid u64 and the
    // function guarantees the middle slice is correctly aligned.
    let (head, words, tail) = unsafe { buf.align_to_mut::<u64>() };
    for (i, b) in head.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
    key.rotate_left(head.len() % 4);
    let mut repeated = [0u8; 8];
    repeated[..4].copy_from_slice(&key);
    repeated[4..].copy_from_slice(&key);
    let wide = u64::from_ne_bytes(repeated);
    for w in words.iter_mut() {
        *w ^= wide;
    }
    for (i, b) in tail.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: usize) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b ^= key[(offset + i) % 4];
        }
    }

    #[test]
    fn mask_matches_bytewise_for_all_alignments_and_offsets() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let data: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..8 {
            for len in [0, 1, 3, 7, 8, 9, 31, 64, 100, 190] {
                for offset in 0..4 {
                    let mut a = data.clone();
                    let mut b = data.clone();
                    apply_mask(&mut a[start..start + len], key, offset);
                    mask_bytewise(&mut b[start..start + len], key, offset);
                    assert_eq!(a, b, "start={start} len={len} offset={offset}");
                }
            }
        }
    }

    #[test]
    fn rfc_5_7_masked_hello() {
        // "A single-frame masked text message" from RFC 6455 §5.7.
        let mut frame = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (h, n) = parse_client_header(&frame).unwrap().unwrap();
        assert_eq!(n, 6);
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Text);
        assert_eq!(h.payload_len, 5);
        apply_mask(&mut frame[n..], h.mask, 0);
        assert_eq!(&frame[n..], b"Hello");
    }

    #[test]
    fn rfc_5_7_server_frames() {
        let mut out = Vec::new();
        write_frame(&mut out, OpCode::Text, b"Hello");
        assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        write_frame(&mut out, OpCode::Pong, b"Hello");
        assert_eq!(out, [0x8a, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
        out.clear();
        // 256 bytes binary message in a single unmasked frame.
        write_header(&mut out, true, OpCode::Binary, 256);
        assert_eq!(out, [0x82, 0x7E, 0x01, 0x00]);
        out.clear();
        // 64KiB binary message in a single unmasked frame.
        write_header(&mut out, true, OpCode::Binary, 65536);
        assert_eq!(
            out,
            [0x82, 0x7F, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00]
        );
    }

    #[test]
    fn rfc_5_7_fragmented_unmasked_shape_is_parsed_when_masked() {
        // The §5.7 fragmented "Hel" + "lo", as a client would send them (masked).
        let first = [0x01, 0x83, 0, 0, 0, 0, 0x48, 0x65, 0x6c];
        let (h, n) = parse_client_header(&first).unwrap().unwrap();
        assert!(!h.fin);
        assert_eq!((h.opcode, h.payload_len, n), (OpCode::Text, 3, 6));
        let second = [0x80, 0x82, 0, 0, 0, 0, 0x6c, 0x6f];
        let (h, _) = parse_client_header(&second).unwrap().unwrap();
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Continuation);
    }

    #[test]
    fn rfc_5_7_masked_ping() {
        let frame = [
            0x89, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (h, _) = parse_client_header(&frame).unwrap().unwrap();
        assert_eq!(h.opcode, OpCode::Ping);
    }

    #[test]
    fn all_length_forms() {
        let mut f = vec![0x82, 0xFE, 0x01, 0x00, 1, 2, 3, 4];
        let (h, n) = parse_client_header(&f).unwrap().unwrap();
        assert_eq!((h.payload_len, n), (256, 8));
        f = vec![0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4];
        let (h, n) = parse_client_header(&f).unwrap().unwrap();
        assert_eq!((h.payload_len, n), (65536, 14));
        // Every strict prefix is "incomplete", never an error.
        for cut in 0..f.len() {
            assert_eq!(parse_client_header(&f[..cut]).unwrap(), None, "cut {cut}");
        }
    }

    #[test]
    fn header_rule_violations() {
        let e = |b: &[u8]| parse_client_header(b).unwrap_err();
        assert_eq!(e(&[0x81, 0x05]), WsError::UnmaskedFrame);
        assert_eq!(e(&[0xC1, 0x85]), WsError::ReservedBits);
        assert_eq!(e(&[0x91]), WsError::ReservedBits);
        assert_eq!(e(&[0x83, 0x80]), WsError::ReservedOpcode);
        assert_eq!(e(&[0x8B]), WsError::ReservedOpcode);
        assert_eq!(e(&[0x09, 0x80]), WsError::FragmentedControl);
        assert_eq!(e(&[0x89, 0xFE]), WsError::ControlTooLong);
        assert_eq!(e(&[0x82, 0xFE, 0x00, 0x7D]), WsError::NonMinimalLength);
        assert_eq!(
            e(&[0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]),
            WsError::LengthHighBit
        );
        assert_eq!(
            e(&[0x82, 0xFF, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF]),
            WsError::NonMinimalLength
        );
        assert_eq!(e(&[0x82, 0xFE, 0x00, 0x7D]).close_code(), 1002);
    }

    #[test]
    fn close_reason_is_truncated_on_char_boundary() {
        let mut out = Vec::new();
        let reason = "é".repeat(100);
        write_close(&mut out, 1001, &reason);
        let len = usize::from(out[1]);
        assert!(len <= MAX_CONTROL_PAYLOAD);
        assert!(std::str::from_utf8(&out[4..]).is_ok());
        assert_eq!(&out[2..4], &1001u16.to_be_bytes());
    }

    #[test]
    fn a_control_frame_of_exactly_125_bytes_is_allowed() {
        let (h, n) = parse_client_header(&[0x89, 0x80 | 125, 1, 2, 3, 4])
            .unwrap()
            .unwrap();
        assert_eq!((h.opcode, h.payload_len, n), (OpCode::Ping, 125, 6));
    }

    #[test]
    fn a_16_bit_length_of_126_is_minimal() {
        let (h, n) = parse_client_header(&[0x82, 0xFE, 0x00, 0x7E, 1, 2, 3, 4])
            .unwrap()
            .unwrap();
        assert_eq!((h.payload_len, n), (126, 8));
    }

    #[test]
    fn server_frames_use_the_shortest_length_form() {
        let mut out = Vec::new();
        write_frame(&mut out, OpCode::Binary, &[7; 125]);
        assert_eq!(out[..2], [0x82, 125]);
        assert_eq!(out.len(), 2 + 125);
        out.clear();
        write_frame(&mut out, OpCode::Binary, &[7; 126]);
        assert_eq!(out[..4], [0x82, 0x7E, 0x00, 0x7E]);
        assert_eq!(out.len(), 4 + 126);
    }

    #[test]
    fn a_long_close_reason_is_cut_to_fill_the_125_byte_payload() {
        let mut out = Vec::new();
        write_close(&mut out, 1001, &"x".repeat(200));
        assert_eq!(out[..4], [0x88, 125, 0x03, 0xe9]);
        assert_eq!(out[4..], [b'x'; 123]);
        // Two-byte characters: 61 of them fit (122 bytes), half of the 62nd would not.
        out.clear();
        write_close(&mut out, 1001, &"é".repeat(100));
        assert_eq!(out[1], 124);
        assert_eq!(&out[4..], "é".repeat(61).as_bytes());
    }
}
