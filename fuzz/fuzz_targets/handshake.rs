//! The Upgrade request parser on arbitrary bytes: never panics, errors always carry a response,
//! and a complete request never claims more bytes than it was given. Plain GETs go through the
//! web demo's router.
#![no_main]

use imgate::gateway::admin_api::AdminAction;
use imgate::web;
use imgate::ws::handshake::{self, Endpoint, Parse, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match handshake::parse_request(data) {
        Ok(Parse::Partial) => assert!(data.len() <= handshake::MAX_REQUEST_HEAD),
        Ok(Parse::Upgrade { request, head_len }) => {
            assert!(head_len <= data.len() && head_len <= handshake::MAX_REQUEST_HEAD);
            let endpoints = [Endpoint {
                path: "/echo",
                protocols: &["a", "b"],
                kind: (),
            }];
            match handshake::accept(&request, &endpoints, &Policy::default()) {
                Ok(a) => assert!(a.response.starts_with(b"HTTP/1.1 101 ")),
                Err(e) => assert_eq!(e.status(), 404),
            }
        }
        Ok(Parse::Plain { request, head_len }) => {
            assert!(head_len <= data.len() && head_len <= handshake::MAX_REQUEST_HEAD);
            // The web demo's router takes any plain GET, with and without --dev.
            for secret in [None, Some(&b"fuzz-secret"[..])] {
                if let AdminAction::Respond(r) = web::route(&request, secret, 0) {
                    assert!(matches!(r.status, 200 | 204 | 400 | 404), "{}", r.status);
                }
            }
        }
        Err(e) => {
            let r = e.response();
            assert!(r.starts_with(b"HTTP/1.1 4") || r.starts_with(b"HTTP/1.1 5"));
        }
    }
});
