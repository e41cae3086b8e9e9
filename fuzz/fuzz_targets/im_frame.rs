//! Arbitrary bytes as a binary IM frame, both directions: whatever prost decodes re-encodes to
//! bytes that decode to the same value, and that encoding is stable (a second round gives the
//! same bytes), so a frame means one thing however often it is relayed.
#![no_main]

use imgate::im::proto::{ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(decoded) = M::decode(data) else {
        return;
    };
    let bytes = decoded.encode_to_vec();
    assert_eq!(bytes.len(), decoded.encoded_len());
    let again = M::decode(bytes.as_slice()).expect("an encoding decodes");
    assert_eq!(again, decoded);
    assert_eq!(again.encode_to_vec(), bytes);
}

fuzz_target!(|data: &[u8]| {
    round_trip::<ClientFrame>(data);
    round_trip::<ServerFrame>(data);
});
