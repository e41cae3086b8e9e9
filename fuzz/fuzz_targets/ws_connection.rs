//! The WebSocket layer alone (`ws::Connection`) fed an arbitrary byte stream in arbitrary
//! read sizes, from the first request byte on. It must never panic, always make progress,
//! never emit invalid UTF-8 as text or a message over the limit, and end in a consistent
//! state. (`connection` drives the whole gateway.)
#![no_main]

use imgate::buffer_pool::BufferPool;
use imgate::ws::handshake::{self, Endpoint, Policy};
use imgate::ws::{Connection, Event, MessageKind, State};
use libfuzzer_sys::fuzz_target;

const LIMIT: usize = 4096;
const REQUEST: &[u8] = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    // Most inputs start from a valid handshake so the fuzzer spends its time on frames;
    // odd modes fuzz the handshake itself.
    let mut stream = Vec::new();
    if mode & 1 == 0 {
        stream.extend_from_slice(REQUEST);
    }
    stream.extend_from_slice(rest);
    let chunk = usize::from(mode >> 1).max(1);
    let endpoints = [Endpoint {
        path: "/echo",
        protocols: &[],
        kind: (),
    }];
    let mut conn = Connection::new(LIMIT);
    let mut pool = BufferPool::new(1024, 8);
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        let mut buf = piece.to_vec();
        let mut off = 0;
        while off < buf.len() {
            let before = conn.state();
            let progress = match conn.handle(&mut buf[off..], 0, &mut out, &mut pool) {
                Ok(p) => p,
                Err(_) => {
                    assert_eq!(conn.state(), State::Closed);
                    break;
                }
            };
            off += progress.consumed;
            match progress.event {
                Some(Event::Upgrade(req)) => {
                    match handshake::accept(&req, &endpoints, &Policy::default()) {
                        Ok(a) => conn.accept(&a.response, &mut out),
                        Err(e) => conn.reject(&e, &mut out),
                    }
                }
                Some(Event::Get(_)) => {
                    conn.reject(&handshake::HttpError::NotFound, &mut out);
                    assert_eq!(conn.state(), State::Closed);
                }
                Some(Event::Message(kind, payload)) => {
                    assert!(payload.len() <= LIMIT);
                    if kind == MessageKind::Text {
                        assert!(std::str::from_utf8(payload).is_ok());
                    }
                    let _ = conn.state();
                }
                Some(Event::Closed { .. }) => assert_eq!(conn.state(), State::Closed),
                None => assert!(
                    progress.consumed > 0 || before == State::AwaitingAccept,
                    "no progress in {before:?}"
                ),
            }
        }
        conn.release_buffers(&mut pool);
        assert!(conn.buffered() <= LIMIT + handshake::MAX_REQUEST_HEAD + 125);
    }
    if conn.is_open() {
        assert!(conn.close(1001, "done", &mut out));
        assert_eq!(conn.state(), State::CloseSent);
    }
});
