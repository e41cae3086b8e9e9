//! A minimal IM client for the integration tests: tungstenite on `/ws` with the generated
//! protobuf types, and tokens signed with the test servers' secret.

use std::net::TcpStream;
use std::time::Duration;

use imgate::im::proto::{self, client_frame::Body as C, server_frame::Body as S};
use prost::Message as _;
use tungstenite::Message;

use super::{ServerProc, SECRET};

pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

pub fn token(uid: &str) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &Claims { sub: uid, exp },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub struct Client {
    pub ws: Ws,
    pub next_id: u64,
}

impl Client {
    pub fn connect(server: &ServerProc) -> Client {
        let (ws, _) = tungstenite::connect(server.url("/ws")).expect("connect /ws");
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        Client { ws, next_id: 1 }
    }

    pub fn login(
        server: &ServerProc,
        uid: &str,
        device: &str,
        last_seq: u64,
    ) -> (Client, proto::LoginOk) {
        let mut c = Client::connect(server);
        let id = c.request(C::Login(proto::Login {
            token: token(uid),
            device_id: device.into(),
            last_seq,
        }));
        match c.response(id) {
            S::LoginOk(ok) => (c, ok),
            other => panic!("login failed: {other:?}"),
        }
    }

    pub fn request(&mut self, body: C) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let f = proto::ClientFrame {
            id,
            body: Some(body),
        };
        self.ws
            .send(Message::binary(f.encode_to_vec()))
            .expect("send");
        id
    }

    /// The next protobuf frame, within 10 s: the server's pings, which keep coming from a
    /// server that sends nothing else, do not extend the wait.
    pub fn next(&mut self) -> proto::ServerFrame {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no frame but pings for 10 s"
            );
            match self.ws.read().expect("read") {
                Message::Binary(b) => return proto::ServerFrame::decode(&b[..]).expect("decode"),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Reads until the answer to request `id`; frames pushed meanwhile are dropped.
    pub fn response(&mut self, id: u64) -> S {
        loop {
            let f = self.next();
            if f.id == id {
                return f.body.expect("body");
            }
        }
    }

    pub fn send(&mut self, to: &str, cmid: &str, text: &str) -> proto::SendOk {
        let id = self.request(C::Send(proto::SendMessage {
            to_uid: to.into(),
            client_msg_id: cmid.into(),
            content: text.as_bytes().to_vec(),
            group_id: String::new(),
        }));
        match self.response(id) {
            S::SendOk(ok) => ok,
            other => panic!("send failed: {other:?}"),
        }
    }

    /// Reads pushed Message frames until `n` arrived.
    pub fn messages(&mut self, n: usize) -> Vec<proto::Message> {
        let mut got = Vec::new();
        while got.len() < n {
            if let Some(S::Message(m)) = self.next().body {
                got.push(m);
            }
        }
        got
    }

    /// Reads `n` pushed Messages, acking each as it arrives, so that more than one delivery
    /// window can arrive.
    #[allow(dead_code)]
    pub fn messages_acked(&mut self, n: usize) -> Vec<proto::Message> {
        let mut got = Vec::new();
        while got.len() < n {
            if let Some(S::Message(m)) = self.next().body {
                self.request(C::Ack(proto::Ack { seq: m.seq }));
                got.push(m);
            }
        }
        got
    }
}
