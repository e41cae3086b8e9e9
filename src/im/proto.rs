//! The client protocol types, generated from `proto/imgate/v1/imgate.proto` by `build.rs`:
//! prost for the binary encoding, pbjson for the canonical JSON mapping (serde).
#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/imgate.v1.rs"));
include!(concat!(env!("OUT_DIR"), "/imgate.v1.serde.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_mapping() {
        let f: ClientFrame = serde_json::from_str(
            r#"{"id":"7","login":{"token":"t","deviceId":"web","lastSeq":"12"}}"#,
        )
        .unwrap();
        assert_eq!(f.id, 7);
        match f.body {
            Some(client_frame::Body::Login(l)) => {
                assert_eq!((l.device_id.as_str(), l.last_seq), ("web", 12))
            }
            other => panic!("{other:?}"),
        }
        let out = ServerFrame {
            id: 0,
            body: Some(server_frame::Body::Message(Message {
                seq: 5,
                from_uid: "a".into(),
                content: b"hi".to_vec(),
                ..Message::default()
            })),
        };
        let json: serde_json::Value = serde_json::to_value(&out).unwrap();
        assert_eq!(json["message"]["seq"], "5", "64-bit integers are strings");
        assert_eq!(json["message"]["content"], "aGk=", "bytes are base64");
        assert_eq!(json["message"]["fromUid"], "a", "lowerCamelCase names");
        let err = ServerFrame {
            id: 1,
            body: Some(server_frame::Body::Error(Error {
                code: ErrorCode::BadRequest as i32,
                message: "x".into(),
            })),
        };
        let json = serde_json::to_value(&err).unwrap();
        assert_eq!(
            json["error"]["code"], "ERROR_CODE_BAD_REQUEST",
            "enums by name"
        );
        assert!(serde_json::from_str::<ClientFrame>(r#"{"id":"1","send":{"toUid":5}}"#).is_err());
    }
}
