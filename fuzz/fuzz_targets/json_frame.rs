//! Arbitrary bytes as a JSON IM frame (the `imgate.v1.json` subprotocol, read as the event
//! loop reads it): whatever parses serialises and parses back equal. And every frame the
//! binary protocol can carry, client's or server's, survives the JSON mapping unchanged, so
//! the two subprotocols say the same things.
#![no_main]

use imgate::im::proto::{ClientFrame, ServerFrame};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use serde::{de::DeserializeOwned, Serialize};

/// `value` as JSON and back. A value with no JSON form (an enum number outside the enum) is
/// refused by the serialiser, which is fine: the server never builds one.
fn json_round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
    let Ok(json) = serde_json::to_vec(value) else {
        return;
    };
    let back: T = serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("{}: {e}", String::from_utf8_lossy(&json)));
    assert_eq!(&back, value, "{}", String::from_utf8_lossy(&json));
}

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = serde_json::from_slice::<ClientFrame>(data) {
        let json = serde_json::to_vec(&f).expect("a parsed frame serialises");
        let back: ClientFrame = serde_json::from_slice(&json).expect("its JSON parses");
        assert_eq!(back, f);
    }
    if let Ok(f) = ClientFrame::decode(data) {
        json_round_trip(&f);
    }
    if let Ok(f) = ServerFrame::decode(data) {
        json_round_trip(&f);
    }
});
