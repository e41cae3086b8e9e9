//! The HTTP/1.1 Upgrade request (RFC 6455 §4.2), parsed with httparse; sans-IO.
//!
//! [`parse_request`] turns the bytes received so far into "need more", a validated
//! [`UpgradeRequest`], or an [`HttpError`] that knows its status line and response bytes.
//! Routing and limits that depend on server state (endpoints, origins, connection count)
//! are applied by [`accept`], so each check lives in exactly one place.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha1::{Digest, Sha1};

/// Upper bound on the request head (request line + headers), in bytes. Larger heads get 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Upper bound on the number of header lines; more gets 431.
const MAX_HEADERS: usize = 64;

const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A request that can be answered with an HTTP error status, after which the socket closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// 400: malformed HTTP, no or several `Host`, a body, missing or malformed WebSocket headers.
    BadRequest(&'static str),
    /// 403: the Origin is not on the allow-list.
    Forbidden,
    /// 404: no endpoint at this path.
    NotFound,
    /// 405: anything but GET.
    MethodNotAllowed,
    /// 426: a plain HTTP request to a WebSocket endpoint.
    UpgradeRequired,
    /// 426 with `Sec-WebSocket-Version: 13`: an unsupported protocol version.
    UnsupportedVersion,
    /// 431: the request head exceeds [`MAX_REQUEST_HEAD`] or has too many headers.
    HeadersTooLarge,
    /// 503: the server is at `--max-connections` or shutting down.
    Unavailable,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::BadRequest(_) => 400,
            HttpError::Forbidden => 403,
            HttpError::NotFound => 404,
            HttpError::MethodNotAllowed => 405,
            HttpError::UpgradeRequired | HttpError::UnsupportedVersion => 426,
            HttpError::HeadersTooLarge => 431,
            HttpError::Unavailable => 503,
        }
    }

    fn reason_phrase(&self) -> &'static str {
        match self {
            HttpError::BadRequest(_) => "Bad Request",
            HttpError::Forbidden => "Forbidden",
            HttpError::NotFound => "Not Found",
            HttpError::MethodNotAllowed => "Method Not Allowed",
            HttpError::UpgradeRequired | HttpError::UnsupportedVersion => "Upgrade Required",
            HttpError::HeadersTooLarge => "Request Header Fields Too Large",
            HttpError::Unavailable => "Service Unavailable",
        }
    }

    /// Human-readable body: says what was wrong so a developer with curl can fix the request.
    pub fn detail(&self) -> &'static str {
        match self {
            HttpError::BadRequest(why) => why,
            HttpError::Forbidden => "origin not allowed",
            HttpError::NotFound => "no such endpoint",
            HttpError::MethodNotAllowed => "only GET can upgrade to a WebSocket",
            HttpError::UpgradeRequired => "this endpoint speaks WebSocket only",
            HttpError::UnsupportedVersion => "only WebSocket version 13 is supported",
            HttpError::HeadersTooLarge => "request head larger than 8 KiB",
            HttpError::Unavailable => "server at capacity or shutting down",
        }
    }

    /// The complete HTTP response; the connection closes after it.
    pub fn response(&self) -> Vec<u8> {
        let extra = match self {
            HttpError::MethodNotAllowed => "Allow: GET\r\n",
            HttpError::UpgradeRequired => "Upgrade: websocket\r\n",
            HttpError::UnsupportedVersion => "Sec-WebSocket-Version: 13\r\n",
            HttpError::Unavailable => "Retry-After: 1\r\n",
            _ => "",
        };
        let body = self.detail();
        format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n{}\r\n{}\n",
            self.status(),
            self.reason_phrase(),
            body.len() + 1,
            extra,
            body
        )
        .into_bytes()
    }
}

/// A syntactically valid WebSocket opening handshake, not yet routed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpgradeRequest {
    /// The request target without its query string.
    pub path: String,
    /// `Sec-WebSocket-Accept` value for this request's key.
    pub accept_key: String,
    /// Subprotocols the client offered, in its order of preference.
    pub protocols: Vec<String>,
    pub origin: Option<String>,
}

/// A complete GET request without `Upgrade: websocket`: an ordinary web request, which the
/// caller may serve (the web demo) or refuse with 426 on a WebSocket-only path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRequest {
    /// The request target without its query string.
    pub path: String,
    /// The query string after `?`, still percent-encoded; empty when there is none.
    pub query: String,
}

/// Result of feeding the bytes received so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// The head is not complete yet; call again with more bytes.
    Partial,
    /// A complete plain GET request occupying the first `head_len` bytes.
    Plain {
        request: PlainRequest,
        head_len: usize,
    },
    /// A complete, valid upgrade request occupying the first `head_len` bytes. Bytes after it
    /// were pipelined by the client and belong to the WebSocket stream.
    Upgrade {
        request: UpgradeRequest,
        head_len: usize,
    },
}

/// Parses and validates an opening handshake from the start of `buf`.
pub fn parse_request(buf: &[u8]) -> Result<Parse, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            return if buf.len() > MAX_REQUEST_HEAD {
                Err(HttpError::HeadersTooLarge)
            } else {
                Ok(Parse::Partial)
            };
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadersTooLarge),
        Err(_) => return Err(HttpError::BadRequest("malformed HTTP request")),
    };
    if head_len > MAX_REQUEST_HEAD {
        return Err(HttpError::HeadersTooLarge);
    }
    if req.method != Some("GET") {
        return Err(HttpError::MethodNotAllowed);
    }
    if req.version != Some(1) {
        return Err(HttpError::BadRequest("HTTP/1.1 required"));
    }
    check_host(req.headers, true).map_err(HttpError::BadRequest)?;
    // Body bytes would be served as the next request, or taken for WebSocket frames.
    match body_framing(req.headers).map_err(HttpError::BadRequest)? {
        BodyFraming::None | BodyFraming::Length(0) => {}
        BodyFraming::Length(_) | BodyFraming::TransferCoded => {
            return Err(HttpError::BadRequest("a GET request must not have a body"))
        }
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let path = path.to_owned();

    let mut upgrade_ws = false;
    let mut connection_upgrade = false;
    let mut version = None;
    let mut key = None;
    let mut protocols = Vec::new();
    let mut origin = None;
    for h in req.headers.iter() {
        let name = h.name;
        let value = std::str::from_utf8(h.value)
            .map_err(|_| HttpError::BadRequest("header value not UTF-8"))?
            .trim();
        if name.eq_ignore_ascii_case("upgrade") {
            upgrade_ws |= tokens(value).any(|t| t.eq_ignore_ascii_case("websocket"));
        } else if name.eq_ignore_ascii_case("connection") {
            connection_upgrade |= tokens(value).any(|t| t.eq_ignore_ascii_case("upgrade"));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            if version.replace(value).is_some() {
                return Err(HttpError::BadRequest("duplicate Sec-WebSocket-Version"));
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            if key.replace(value).is_some() {
                return Err(HttpError::BadRequest("duplicate Sec-WebSocket-Key"));
            }
        } else if name.eq_ignore_ascii_case("sec-websocket-protocol") {
            protocols.extend(tokens(value).map(str::to_owned));
        } else if name.eq_ignore_ascii_case("origin") {
            origin = Some(value.to_owned());
        }
    }
    if !upgrade_ws {
        return Ok(Parse::Plain {
            request: PlainRequest {
                path,
                query: query.to_owned(),
            },
            head_len,
        });
    }
    if !connection_upgrade {
        return Err(HttpError::BadRequest(
            "Connection header lacks the upgrade token",
        ));
    }
    if version != Some("13") {
        return Err(HttpError::UnsupportedVersion);
    }
    let key = key.ok_or(HttpError::BadRequest("missing Sec-WebSocket-Key"))?;
    match BASE64.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => {
            return Err(HttpError::BadRequest(
                "Sec-WebSocket-Key is not 16 bytes of base64",
            ))
        }
    }
    Ok(Parse::Upgrade {
        request: UpgradeRequest {
            path,
            accept_key: accept_key(key),
            protocols,
            origin,
        },
        head_len,
    })
}

/// How a request delimits its body (RFC 9112 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// Neither `Content-Length` nor `Transfer-Encoding`: no body.
    None,
    /// `Content-Length`: one value, however often it is repeated.
    Length(usize),
    /// `Transfer-Encoding`, which overrides any `Content-Length` (§6.3) and which this server
    /// does not decode.
    TransferCoded,
}

/// The body framing of a request. Differing `Content-Length` values are an error rather than
/// "the first one wins": a proxy that picked another one would see a different end of the
/// request (request smuggling), so RFC 9112 §6.3 makes them a 400. Shared by every HTTP parser
/// of the server.
pub fn body_framing(headers: &[httparse::Header<'_>]) -> Result<BodyFraming, &'static str> {
    let mut length = None;
    let mut transfer_coded = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            transfer_coded = true;
        } else if h.name.eq_ignore_ascii_case("content-length") {
            for element in h.value.split(|&b| b == b',') {
                let n = decimal(element.trim_ascii()).ok_or("bad Content-Length")?;
                if length.replace(n).is_some_and(|first| first != n) {
                    return Err("conflicting Content-Length values");
                }
            }
        }
    }
    Ok(match (transfer_coded, length) {
        (true, _) => BodyFraming::TransferCoded,
        (false, Some(n)) => BodyFraming::Length(n),
        (false, None) => BodyFraming::None,
    })
}

/// `1*DIGIT` as a number; `str::parse` alone would also take a leading `+`.
fn decimal(digits: &[u8]) -> Option<usize> {
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// RFC 9112 §3.2: an HTTP/1.1 request without `Host`, and any request with more than one, is
/// a 400. Shared by every HTTP parser of the server.
pub fn check_host(headers: &[httparse::Header<'_>], http11: bool) -> Result<(), &'static str> {
    match headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("host"))
        .count()
    {
        0 if http11 => Err("missing Host header"),
        0 | 1 => Ok(()),
        _ => Err("more than one Host header"),
    }
}

/// Comma-separated list elements of a header value, trimmed, empty ones skipped.
fn tokens(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|t| !t.is_empty())
}

/// `Sec-WebSocket-Accept` for a client key (§4.2.2 step 5.4).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID);
    BASE64.encode(sha.finalize())
}

/// A WebSocket endpoint the server exposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint<K> {
    pub path: &'static str,
    /// Subprotocols the endpoint speaks, in the server's order of preference. Empty: the
    /// endpoint does not negotiate one.
    pub protocols: &'static [&'static str],
    /// What the server runs on connections to this endpoint.
    pub kind: K,
}

/// Server-side policy for accepting upgrades.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Origins allowed to connect; empty allows every origin (and requests without one).
    pub allowed_origins: Vec<String>,
}

/// A routed upgrade, ready to be answered with 101.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted<K> {
    pub kind: K,
    pub protocol: Option<&'static str>,
    pub response: Vec<u8>,
}

/// Routes a parsed request to an endpoint, checks the origin, selects a subprotocol and builds
/// the 101 response.
pub fn accept<K: Copy>(
    request: &UpgradeRequest,
    endpoints: &[Endpoint<K>],
    policy: &Policy,
) -> Result<Accepted<K>, HttpError> {
    let endpoint = endpoints
        .iter()
        .find(|e| e.path == request.path)
        .ok_or(HttpError::NotFound)?;
    if !policy.allowed_origins.is_empty() {
        let allowed = request.origin.as_deref().is_some_and(|o| {
            policy
                .allowed_origins
                .iter()
                .any(|a| a.eq_ignore_ascii_case(o))
        });
        if !allowed {
            return Err(HttpError::Forbidden);
        }
    }
    // The server's preference wins among the protocols the client offered.
    let protocol = endpoint
        .protocols
        .iter()
        .copied()
        .find(|p| request.protocols.iter().any(|offered| offered == p));
    let mut response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n",
        request.accept_key
    );
    if let Some(p) = protocol {
        response.push_str("Sec-WebSocket-Protocol: ");
        response.push_str(p);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    Ok(Accepted {
        kind: endpoint.kind,
        protocol,
        response: response.into_bytes(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str =
        "GET /chat?x=1 HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn upgrade(buf: &[u8]) -> (UpgradeRequest, usize) {
        match parse_request(buf).unwrap() {
            Parse::Upgrade { request, head_len } => (request, head_len),
            other => panic!("not an upgrade: {other:?}"),
        }
    }

    #[test]
    fn a_get_without_upgrade_is_a_plain_request_for_the_caller_to_route() {
        let req = b"GET /dev/token?uid=alice HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\nrest";
        assert_eq!(
            parse_request(req),
            Ok(Parse::Plain {
                request: PlainRequest {
                    path: "/dev/token".into(),
                    query: "uid=alice".into()
                },
                head_len: req.len() - 4,
            })
        );
        // `Upgrade: h2c` is not a WebSocket upgrade either.
        let h2c = b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n";
        assert!(matches!(parse_request(h2c), Ok(Parse::Plain { .. })));
        // Methods and versions are still checked first.
        let post = b"POST / HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(parse_request(post), Err(HttpError::MethodNotAllowed));
    }

    fn with_header(replace: &str, by: &str) -> Vec<u8> {
        assert!(GOOD.contains(replace));
        GOOD.replacen(replace, by, 1).into_bytes()
    }

    #[test]
    fn rfc_sample_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_a_valid_request() {
        let (req, n) = upgrade(GOOD.as_bytes());
        assert_eq!(n, GOOD.len());
        assert_eq!(req.path, "/chat");
        assert_eq!(req.protocols, ["chat", "superchat"]);
        assert_eq!(req.origin.as_deref(), Some("http://example.com"));
        assert_eq!(req.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn split_at_every_byte_is_partial_until_complete() {
        let b = GOOD.as_bytes();
        for cut in 0..b.len() {
            assert_eq!(parse_request(&b[..cut]), Ok(Parse::Partial), "cut {cut}");
        }
    }

    #[test]
    fn pipelined_bytes_are_left_for_the_websocket_stream() {
        let mut b = GOOD.as_bytes().to_vec();
        b.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let (_, n) = upgrade(&b);
        assert_eq!(&b[n..], &[0x81, 0x80, 1, 2, 3, 4]);
    }

    #[test]
    fn header_names_and_tokens_are_case_insensitive() {
        let b = GOOD
            .replace("Upgrade: websocket", "UPGRADE: WebSocket")
            .replace("Connection: keep-alive, Upgrade", "connection: UPGRADE");
        upgrade(b.as_bytes());
    }

    #[test]
    fn each_rejection_has_its_status() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (with_header("GET", "POST"), 405),
            (with_header("HTTP/1.1", "HTTP/1.0"), 400),
            (with_header("keep-alive, Upgrade", "keep-alive"), 400),
            (
                with_header("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                426,
            ),
            (with_header("Sec-WebSocket-Version: 13\r\n", ""), 426),
            (with_header("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="), 400),
            (with_header("dGhlIHNhbXBsZSBub25jZQ==", "not base64!!"), 400),
            (
                with_header("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                400,
            ),
            (with_header("Host: server.example.com\r\n", ""), 400),
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
        ];
        for (req, status) in cases {
            let err = parse_request(&req).unwrap_err();
            assert_eq!(err.status(), status, "{}", String::from_utf8_lossy(&req));
            let resp = String::from_utf8(err.response()).unwrap();
            assert!(resp.starts_with(&format!("HTTP/1.1 {status} ")), "{resp}");
        }
    }

    #[test]
    fn a_get_or_upgrade_needs_exactly_one_host() {
        let plain = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for req in [plain, GOOD] {
            let none = req.replacen("Host: ", "X-Host: ", 1);
            assert_eq!(
                parse_request(none.as_bytes()),
                Err(HttpError::BadRequest("missing Host header")),
                "{none}"
            );
            let two = req.replacen("Host: ", "host: a\r\nHOST: ", 1);
            assert_eq!(
                parse_request(two.as_bytes()),
                Err(HttpError::BadRequest("more than one Host header")),
                "{two}"
            );
            let lower = req.replacen("Host: ", "host: ", 1);
            assert!(parse_request(lower.as_bytes()).is_ok(), "{lower}");
        }
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\n\r\n"),
            Err(HttpError::BadRequest("missing Host header"))
        );
    }

    #[test]
    fn a_get_or_upgrade_with_a_body_is_400() {
        let plain = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        for framing in [
            "Content-Length: 5\r\n",
            "Transfer-Encoding: chunked\r\n",
            "Content-Length: 0\r\nContent-Length: 5\r\n",
            "Content-Length: 0, 5\r\n",
            "Content-Length: +0\r\n",
        ] {
            for req in [plain, GOOD] {
                let req = req.replacen("Host:", &format!("{framing}Host:"), 1);
                let err = parse_request(req.as_bytes()).unwrap_err();
                assert_eq!(err.status(), 400, "{req}");
            }
        }
        // A zero length declares no body.
        for req in [plain, GOOD] {
            let req = req.replacen("Host:", "Content-Length: 0\r\nHost:", 1);
            assert!(parse_request(req.as_bytes()).is_ok(), "{req}");
        }
    }

    #[test]
    fn body_framing_follows_rfc_9112() {
        let framing = |lines: &[(&'static str, &'static str)]| {
            let headers: Vec<httparse::Header<'_>> = lines
                .iter()
                .map(|(name, value)| httparse::Header {
                    name,
                    value: value.as_bytes(),
                })
                .collect();
            body_framing(&headers)
        };
        assert_eq!(framing(&[]), Ok(BodyFraming::None));
        assert_eq!(
            framing(&[("Content-Length", "12")]),
            Ok(BodyFraming::Length(12))
        );
        assert_eq!(
            framing(&[("content-length", "12"), ("CONTENT-LENGTH", " 12 ,12")]),
            Ok(BodyFraming::Length(12))
        );
        assert_eq!(
            framing(&[("Content-Length", "12"), ("Content-Length", "13")]),
            Err("conflicting Content-Length values")
        );
        for bad in [
            "",
            "-1",
            "+1",
            "1 2",
            "0x1",
            "1,",
            "99999999999999999999999",
        ] {
            assert_eq!(
                framing(&[("Content-Length", bad)]),
                Err("bad Content-Length"),
                "{bad:?}"
            );
        }
        assert_eq!(
            framing(&[("Transfer-Encoding", "chunked"), ("Content-Length", "3")]),
            Ok(BodyFraming::TransferCoded)
        );
    }

    #[test]
    fn version_426_names_the_supported_version() {
        let req = with_header("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
        let resp = String::from_utf8(parse_request(&req).unwrap_err().response()).unwrap();
        assert!(resp.contains("\r\nSec-WebSocket-Version: 13\r\n"), "{resp}");
    }

    #[test]
    fn oversized_heads_get_431() {
        let mut b = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
        while b.len() <= MAX_REQUEST_HEAD {
            b.extend_from_slice(
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
            );
        }
        assert_eq!(parse_request(&b).unwrap_err().status(), 431);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&many).unwrap_err().status(), 431);
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Kind {
        Chat,
    }

    const ENDPOINTS: &[Endpoint<Kind>] = &[Endpoint {
        path: "/chat",
        protocols: &["superchat", "chat"],
        kind: Kind::Chat,
    }];

    #[test]
    fn accept_routes_selects_protocol_and_answers_101() {
        let (req, _) = upgrade(GOOD.as_bytes());
        let a = accept(&req, ENDPOINTS, &Policy::default()).unwrap();
        assert_eq!(a.kind, Kind::Chat);
        assert_eq!(a.protocol, Some("superchat"));
        let resp = String::from_utf8(a.response).unwrap();
        assert!(resp.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(resp.contains("Sec-WebSocket-Protocol: superchat\r\n"));
        assert!(resp.ends_with("\r\n\r\n"));
    }

    #[test]
    fn no_common_protocol_means_no_protocol_header() {
        let (req, _) = upgrade(&with_header("chat, superchat", "mqtt"));
        let a = accept(&req, ENDPOINTS, &Policy::default()).unwrap();
        assert_eq!(a.protocol, None);
        assert!(!String::from_utf8(a.response)
            .unwrap()
            .contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn unknown_path_is_404_and_origin_allow_list_is_enforced() {
        let (req, _) = upgrade(&with_header("/chat?x=1", "/nope"));
        assert_eq!(
            accept(&req, ENDPOINTS, &Policy::default()),
            Err(HttpError::NotFound)
        );
        let (req, _) = upgrade(GOOD.as_bytes());
        let strict = Policy {
            allowed_origins: vec!["https://app.example".into()],
        };
        assert_eq!(accept(&req, ENDPOINTS, &strict), Err(HttpError::Forbidden));
        let ok = Policy {
            allowed_origins: vec!["HTTP://EXAMPLE.COM".into()],
        };
        assert!(accept(&req, ENDPOINTS, &ok).is_ok());
    }

    #[test]
    fn an_error_response_names_its_status_and_says_what_was_wrong() {
        assert_eq!(
            String::from_utf8(HttpError::NotFound.response()).unwrap(),
            "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: 17\r\nConnection: close\r\n\r\nno such endpoint\n"
        );
        for (e, status_line, body) in [
            (
                HttpError::BadRequest("missing Host header"),
                "400 Bad Request",
                "missing Host header",
            ),
            (HttpError::Forbidden, "403 Forbidden", "origin not allowed"),
            (
                HttpError::MethodNotAllowed,
                "405 Method Not Allowed",
                "only GET can upgrade to a WebSocket",
            ),
            (
                HttpError::UpgradeRequired,
                "426 Upgrade Required",
                "this endpoint speaks WebSocket only",
            ),
            (
                HttpError::UnsupportedVersion,
                "426 Upgrade Required",
                "only WebSocket version 13 is supported",
            ),
            (
                HttpError::HeadersTooLarge,
                "431 Request Header Fields Too Large",
                "request head larger than 8 KiB",
            ),
            (
                HttpError::Unavailable,
                "503 Service Unavailable",
                "server at capacity or shutting down",
            ),
        ] {
            let resp = String::from_utf8(e.response()).unwrap();
            assert!(
                resp.starts_with(&format!("HTTP/1.1 {status_line}\r\n")),
                "{resp}"
            );
            assert!(resp.ends_with(&format!("\r\n\r\n{body}\n")), "{resp}");
            assert_eq!(e.detail(), body);
        }
    }

    #[test]
    fn error_responses_carry_the_headers_their_status_calls_for() {
        for (e, header) in [
            (HttpError::MethodNotAllowed, "\r\nAllow: GET\r\n"),
            (HttpError::UpgradeRequired, "\r\nUpgrade: websocket\r\n"),
            (HttpError::Unavailable, "\r\nRetry-After: 1\r\n"),
        ] {
            let resp = String::from_utf8(e.response()).unwrap();
            assert!(resp.contains(header), "{resp}");
        }
    }

    /// A plain GET whose head is `len` bytes long, cut to `cut` bytes.
    fn get_of(len: usize, cut: usize) -> Vec<u8> {
        let start = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: ";
        let mut b = start.to_vec();
        b.resize(len - 4, b'a');
        b.extend_from_slice(b"\r\n\r\n");
        b.truncate(cut);
        b
    }

    #[test]
    fn a_request_head_may_be_8_kib_and_not_a_byte_more() {
        assert!(matches!(
            parse_request(&get_of(8192, 8192)),
            Ok(Parse::Plain { head_len: 8192, .. })
        ));
        assert_eq!(
            parse_request(&get_of(8193, 8193)),
            Err(HttpError::HeadersTooLarge)
        );
        // Unfinished: 8 KiB may still become a valid head, one byte more may not.
        assert_eq!(parse_request(&get_of(9000, 8192)), Ok(Parse::Partial));
        assert_eq!(
            parse_request(&get_of(9000, 8193)),
            Err(HttpError::HeadersTooLarge)
        );
    }
}
