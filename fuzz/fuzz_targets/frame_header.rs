//! The frame header parser on arbitrary bytes: never panics, and a parsed header is consistent
//! with the bytes it came from.
#![no_main]

use imgate::ws::frame::{self, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((h, len))) = frame::parse_client_header(data) {
        assert!((6..=MAX_HEADER_LEN).contains(&len) && len <= data.len());
        assert_eq!(h.fin, data[0] & 0x80 != 0);
        assert_eq!(data[0] & 0x70, 0, "RSV bits are rejected");
        assert!(data[1] & 0x80 != 0, "unmasked frames are rejected");
        if h.opcode.is_control() {
            assert!(h.fin && h.payload_len <= MAX_CONTROL_PAYLOAD as u64);
        }
        // Every prefix is "incomplete" or the same verdict, never a different header.
        for cut in 0..len {
            assert!(matches!(
                frame::parse_client_header(&data[..cut]),
                Ok(None) | Err(_)
            ));
        }
    }
    // Masking is an involution for any key and phase.
    if data.len() >= 5 {
        let key = [data[0], data[1], data[2], data[3]];
        let offset = usize::from(data[4]);
        let mut buf = data[5..].to_vec();
        frame::apply_mask(&mut buf, key, offset);
        frame::apply_mask(&mut buf, key, offset);
        assert_eq!(buf, &data[5..]);
    }
});
