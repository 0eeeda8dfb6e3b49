//! Input and protocol hardening (docs/decisions/0011-input-hardening.md):
//! idempotency conflicts, invisible content, strict tokens, WebSocket
//! protocol-error closes, hyper's own answers to broken HTTP, the OpenAPI
//! document against the router, and arbitrary request bodies.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use reqwest::{Method, StatusCode};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

use crate::helpers::{DEADLINE, TEST_SECRET, TestApp, TestUser, ids};

// ---- 1. client_msg_id reused for something else ----

#[tokio::test]
async fn a_client_msg_id_reused_for_another_chat_or_content_is_an_idempotency_conflict() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let carol = app.user("carol").await;
    let with_bob = app.chat(&alice, &bob).await;
    let with_carol = app.chat(&alice, &carol).await;
    let mut ws = app.ws(&alice).await;

    ws.say(with_bob, "hello", "k-1").await;
    let first = ws.next_of("ack").await;

    // The same key for another chat, then for other content: refused.
    ws.say(with_carol, "hello", "k-1").await;
    ws.say(with_bob, "hello!", "k-1").await;
    for what in ["another chat", "other content"] {
        let e = ws.next_json().await;
        assert_eq!(e["type"], "error", "{what}: {e}");
        assert_eq!(e["code"], "idempotency_conflict", "{what}: {e}");
        assert_eq!(e["client_msg_id"], "k-1", "{what}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    }
    // A true resend still gets the original ack.
    ws.say(with_bob, "hello", "k-1").await;
    let again = ws.next_json().await;
    assert_eq!(again["type"], "ack", "{again}");
    assert_eq!(again, first);

    // Nothing was stored for the conflicts.
    let (_, history) = app.history(&alice, &with_bob.to_string(), "").await;
    assert_eq!(ids(&history), vec![first["id"].as_i64().unwrap()]);
    let (_, history) = app.history(&alice, &with_carol.to_string(), "").await;
    assert_eq!(ids(&history), Vec::<i64>::new());
}

#[tokio::test]
async fn an_idempotency_conflict_is_detected_after_a_restart_too() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    ws.say(chat, "before the restart", "k-r").await;
    let first = ws.next_of("ack").await;
    ws.close().await;
    let dir = app.stop().await;

    let app = TestApp::spawn_in(dir, |_| {}).await;
    let alice = app.user("alice").await;
    let mut ws = app.ws(&alice).await;
    ws.say(chat, "after the restart", "k-r").await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["code"].as_str(), e["client_msg_id"].as_str()),
        (Some("idempotency_conflict"), Some("k-r")),
        "{e}"
    );
    ws.say(chat, "before the restart", "k-r").await;
    assert_eq!(ws.next_json().await, first);
}

// ---- 2. invisible content, CRLF ----

#[tokio::test]
async fn content_of_only_invisible_characters_is_refused_like_whitespace() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    let invisible = [
        "\u{200B}",
        "\u{200C}\u{200D}",
        "\u{2060}",
        "\u{FEFF}",
        " \u{200E}\u{200F} ",
        "\u{202A}\u{202B}\u{202C}\u{202D}\u{202E}",
        "\u{2066}\u{2067}\u{2068}\u{2069}",
        "\u{E0001}\u{E0068}\u{E0069}\u{E007F}",
        "\n\u{200B}\t",
    ];
    for (i, content) in invisible.iter().enumerate() {
        let key = format!("inv-{i}");
        ws.say(chat, content, &key).await;
        let e = ws.next_json().await;
        assert_eq!(e["type"], "error", "{content:?}: {e}");
        assert_eq!(e["code"], "invalid_content", "{content:?}: {e}");
        assert_eq!(e["client_msg_id"], key.as_str());
    }
    // Invisible characters inside visible text are kept as sent.
    ws.say(chat, "a\u{200D}b \u{202E}c", "vis").await;
    assert_eq!(ws.next_of("ack").await["client_msg_id"], "vis");
    let (_, history) = app.history(&alice, &chat.to_string(), "").await;
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history[0]["content"], "a\u{200D}b \u{202E}c");

    // Group titles follow the same rule.
    for title in ["\u{200B}\u{FEFF}", "\u{202E}", "\u{E0020}"] {
        let (status, body) = app.create_group(&alice, title, &["bob"]).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{title:?}: {body}"
        );
        assert_eq!(body["code"], "invalid_title", "{title:?}");
    }
    let group = app.group(&alice, "Team", &[&bob]).await;
    let (status, body) = app
        .patch(
            &format!("/chats/{group}"),
            json!({"title": "\u{2060}\u{2060}"}),
            &alice.token,
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["code"], "invalid_title");
}

#[tokio::test]
async fn crlf_line_breaks_in_content_are_accepted_and_stored_as_sent() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let chat = app.chat(&alice, &bob).await;
    let mut ws = app.ws(&alice).await;
    ws.say(chat, "first line\r\nsecond line\r\n", "crlf").await;
    let answer = ws
        .frames_until(|f| f["type"] == "ack" || f["type"] == "error")
        .await
        .pop()
        .unwrap();
    assert_eq!(answer["type"], "ack", "{answer}");
    assert_eq!(answer["client_msg_id"], "crlf");
    let (_, history) = app.history(&bob, &chat.to_string(), "").await;
    assert_eq!(history[0]["content"], "first line\r\nsecond line\r\n");
    // A carriage return that does not start a line break is still refused.
    ws.say(chat, "over\rwrite", "cr").await;
    let e = ws.next_json().await;
    assert_eq!(
        (e["code"].as_str(), e["client_msg_id"].as_str()),
        (Some("invalid_content"), Some("cr"))
    );
}

// ---- 3. tokens: nbf, iat, sub ----

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn forge(claims: &Value) -> String {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

/// The claims of a token the server issued, to vary one at a time.
fn claims_of(user: &TestUser) -> Value {
    let payload = user.token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

#[tokio::test]
async fn tokens_honour_nbf_refuse_a_future_iat_and_parse_sub_strictly() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let issued = claims_of(&alice);
    let with = |key: &str, value: Value| {
        let mut c = issued.clone();
        c[key] = value;
        forge(&c)
    };
    let id = alice.id;

    // Accepted: the token as issued (re-signed), a passed nbf, an iat
    // within the minute of skew.
    for (what, token) in [
        ("as issued", alice.token.clone()),
        ("re-signed", forge(&issued)),
        ("nbf passed", with("nbf", json!(now() - 60))),
        ("iat 30 s ahead", with("iat", json!(now() + 30))),
    ] {
        let (status, body) = app.get("/chats", Some(&token)).await;
        assert_eq!(status, StatusCode::OK, "{what}: {body}");
    }
    // Refused with 401 invalid_token.
    for (what, token) in [
        ("nbf in an hour", with("nbf", json!(now() + 3600))),
        ("nbf not a number", with("nbf", json!("tomorrow"))),
        ("iat in an hour", with("iat", json!(now() + 3600))),
        ("sub with a plus", with("sub", json!(format!("+{id}")))),
        (
            "sub with a leading zero",
            with("sub", json!(format!("0{id}"))),
        ),
        ("sub with a space", with("sub", json!(format!(" {id}")))),
        ("sub as a number", with("sub", json!(id))),
        ("sub zero", with("sub", json!("0"))),
    ] {
        let (status, body) = app.get("/chats", Some(&token)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}: {body}");
        assert_eq!(body["code"], "invalid_token", "{what}");
        // The WebSocket upgrade uses the same check.
        match app.try_ws(Some(&token), "").await {
            Err(tungstenite::Error::Http(res)) => {
                assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}")
            }
            Err(e) => panic!("{what}: unexpected error {e}"),
            Ok(_) => panic!("{what}: upgraded"),
        }
    }
}

// ---- 4. WebSocket protocol errors ----

/// A WebSocket client over a bare TCP stream, writing frames by hand, so
/// it can send what a client library refuses to.
struct RawWs {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// A server frame: opcode and payload.
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl RawWs {
    async fn connect(app: &TestApp, user: &TestUser) -> RawWs {
        let addr = app.base.trim_start_matches("http://").to_string();
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {}\r\n\r\n",
            user.token
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut ws = RawWs {
            tcp,
            buf: Vec::new(),
        };
        let head = ws.read_until_blank_line().await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "the upgrade failed: {head}"
        );
        ws
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, self.tcp.read(&mut chunk))
            .await
            .expect("the server answered within the deadline")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn read_until_blank_line(&mut self) -> String {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                return head;
            }
            assert!(self.fill().await > 0, "closed during the handshake");
        }
    }

    /// Writes one frame: `first` is FIN, RSV and opcode; masked unless
    /// `mask` is `None`.
    async fn write_frame(&mut self, first: u8, payload: &[u8], mask: Option<[u8; 4]>) {
        let mut frame = vec![first];
        let masked = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => frame.push(masked | n as u8),
            n => {
                frame.push(masked | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
        }
        match mask {
            Some(key) => {
                frame.extend_from_slice(&key);
                frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
            }
            None => frame.extend_from_slice(payload),
        }
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// The next server frame, or `None` when the connection ended.
    async fn next_frame(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            if self.fill().await == 0 {
                return None;
            }
        }
    }

    /// Reads until the server's close frame and returns its code (`None`:
    /// a close frame without a code). Panics if the connection ends first.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next_frame().await {
                Some(Frame {
                    opcode: 0x8,
                    payload,
                }) => {
                    return (payload.len() >= 2)
                        .then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                Some(_) => continue,
                None => panic!("the connection ended without a close frame"),
            }
        }
    }
}

fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    (buf.len() >= at + len).then(|| {
        (
            Frame {
                opcode: buf[0] & 0x0f,
                payload: buf[at..at + len].to_vec(),
            },
            at + len,
        )
    })
}

const MASK: Option<[u8; 4]> = Some([0x37, 0xfa, 0x21, 0x3d]);

/// What is wrong, the first byte (FIN, RSV, opcode), the payload, the
/// mask, and the close code expected.
type BadFrame = (&'static str, u8, &'static [u8], Option<[u8; 4]>, u16);

#[tokio::test]
async fn websocket_protocol_errors_close_with_1002_and_bad_utf8_with_1007() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;

    // The hand-written client speaks the protocol: a good frame is answered.
    let mut ws = RawWs::connect(&app, &alice).await;
    ws.write_frame(0x81, b"{not json", MASK).await;
    let answer = loop {
        let f = ws.next_frame().await.expect("an answer");
        if f.opcode == 0x1 {
            break serde_json::from_slice::<Value>(&f.payload).unwrap();
        }
    };
    assert_eq!(answer["code"], "invalid_json", "{answer}");

    let cases: [BadFrame; 9] = [
        ("text that is not UTF-8", 0x81, b"\"\xff\xfe\"", MASK, 1007),
        (
            "a truncated UTF-8 sequence",
            0x81,
            b"{\"a\":\"\xe2\x82\"}",
            MASK,
            1007,
        ),
        ("an unmasked client frame", 0x81, b"{}", None, 1002),
        ("a reserved bit set", 0xC1, b"{}", MASK, 1002),
        ("a fragmented ping", 0x09, b"", MASK, 1002),
        ("a ping over 125 bytes", 0x89, &[b'p'; 126], MASK, 1002),
        (
            "a continuation with nothing to continue",
            0x80,
            b"x",
            MASK,
            1002,
        ),
        ("a reserved opcode", 0x83, b"x", MASK, 1002),
        (
            "a close frame with a 1-byte payload",
            0x88,
            b"\x03",
            MASK,
            1002,
        ),
    ];
    for (what, first, payload, mask, code) in cases {
        let mut ws = RawWs::connect(&app, &alice).await;
        ws.write_frame(first, payload, mask).await;
        assert_eq!(ws.close_code().await, Some(code), "{what}");
    }

    // Invalid UTF-8 split across fragments is caught when they join.
    let mut ws = RawWs::connect(&app, &alice).await;
    ws.write_frame(0x01, b"\"\xe2", MASK).await;
    ws.write_frame(0x80, b"\x28\xa1\"", MASK).await;
    assert_eq!(ws.close_code().await, Some(1007), "fragmented bad UTF-8");

    // The close-reason metric names them (counted as the connection ends).
    let start = std::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        let text = app
            .http
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let named = |reason: &str| text.contains(&format!("reason=\"{reason}\""));
        if named("protocol_error") && named("invalid_utf8") {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the metrics never named protocol_error and invalid_utf8"
        );
    }
}

// ---- 5. hyper's own answers ----

/// Sends raw bytes and reads the whole answer until the server closes.
/// Returns the status code and the body.
async fn raw_http(app: &TestApp, request: &[u8]) -> (u16, Vec<u8>, String) {
    let addr = app.base.trim_start_matches("http://");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(DEADLINE, tcp.read_to_end(&mut answer))
        .await
        .expect("the server closed the connection within the deadline")
        .expect("read the answer");
    let text = String::from_utf8_lossy(&answer).into_owned();
    let end = text
        .find("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {text:?}"));
    let head = text[..end].to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, answer[end + 4..].to_vec(), head)
}

#[tokio::test]
async fn broken_http_gets_hypers_400_414_431_and_the_connection_is_closed() {
    let app = TestApp::spawn().await;
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let many_headers = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
        (0..120)
            .map(|i| format!("x-h{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: [(&str, Vec<u8>, u16); 6] = [
        ("garbage request line", b"GARBAGE\r\n\r\n".to_vec(), 400),
        ("no HTTP version", b"GET /healthz\r\n\r\n".to_vec(), 400),
        (
            "header without a colon",
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n".to_vec(),
            400,
        ),
        (
            "control byte in the path",
            b"GET /he\x01lthz HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            400,
        ),
        ("URI over 64 KiB", long_uri.into_bytes(), 414),
        ("over 100 headers", many_headers.into_bytes(), 431),
    ];
    for (what, request, expected) in cases {
        let (status, body, head) = raw_http(&app, &request).await;
        assert_eq!(status, expected, "{what}: {head}");
        // hyper answers these itself, before the router: no JSON body.
        assert!(body.is_empty(), "{what}: {body:?}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 0"),
            "{what}: {head}"
        );
    }
    // The server is unharmed.
    let (status, _) = app.get("/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
}

// ---- 6. OpenAPI lists what the router serves ----

#[tokio::test]
async fn every_operation_in_the_openapi_document_is_served_and_the_operational_routes_are_listed() {
    let app = TestApp::spawn().await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let group = app.group(&alice, "Team", &[&bob]).await;
    let (status, doc) = app.get("/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    let paths = doc["paths"].as_object().expect("paths");
    for listed in [
        "/livez",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
        "/ws",
        "/",
        "/app.js",
        "/style.css",
        "/chats/{chat_id}/messages",
    ] {
        assert!(
            paths.contains_key(listed),
            "{listed} is not in the document"
        );
    }
    // The check below tells a served route from an unknown one.
    let (status, body) = app.get("/no/such/route", Some(&alice.token)).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );

    for (template, item) in paths {
        let path = template
            .replace("{chat_id}", &group.to_string())
            .replace("{user_id}", &bob.id.to_string());
        for method in item.as_object().unwrap().keys() {
            let method: Method = method.to_uppercase().parse().unwrap();
            let mut req = app
                .http
                .request(method.clone(), app.url(&path))
                .bearer_auth(&alice.token);
            if method != Method::GET && method != Method::DELETE {
                req = req.json(&json!({}));
            }
            let res = req.send().await.unwrap();
            let status = res.status();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            assert!(
                !(status == StatusCode::NOT_FOUND && body["code"] == "not_found")
                    && status != StatusCode::METHOD_NOT_ALLOWED,
                "{method} {template} is documented but not routed: {status} {body}"
            );
            assert!(!status.is_server_error(), "{method} {template}: {status}");
        }
    }
}

#[tokio::test]
async fn the_openapi_document_omits_routes_the_settings_turn_off() {
    let app = TestApp::spawn_with(|s| {
        s.web.enabled = false;
        s.metrics.on_main_port = false;
    })
    .await;
    let (_, doc) = app.get("/openapi.json", None).await;
    for off in ["/", "/app.js", "/style.css", "/metrics"] {
        assert!(doc["paths"].get(off).is_none(), "{off} is listed");
        let (status, _) = app.get(off, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{off} is served");
    }
}

// ---- 7. arbitrary request bodies ----

/// Field names of the API's JSON request types, so that generated objects
/// often have the right keys with the wrong (or right) values.
const FIELDS: &[&str] = &[
    "username",
    "password",
    "target_username",
    "type",
    "title",
    "members",
    "role",
    "up_to",
];

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>().prop_map(|s| s.chars().take(40).collect()),
        "[a-z]{1,8}",
        Just("bob".to_string()),
        Just("group".to_string()),
        Just("admin".to_string()),
        Just("correct horse battery".to_string()),
        Just("\u{200B}".to_string()),
        Just("x".repeat(200)),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-2i64..3).prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(json!(u64::MAX)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..4)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A request-shaped object: some of the API's field names, any values.
fn request_body() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec((prop::sample::select(FIELDS), json_value()), 0..5),
        json_value(),
    )
        .prop_map(|(fields, extra)| {
            let mut map = match extra {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            for (k, v) in fields {
                map.insert(k.to_string(), v);
            }
            Value::Object(map)
        })
}

/// Any body: a request-shaped object, any JSON value, or any bytes.
fn any_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => request_body().prop_map(|v| v.to_string().into_bytes()),
        2 => json_value().prop_map(|v| v.to_string().into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..100),
    ]
}

#[tokio::test]
async fn arbitrary_request_bodies_get_a_documented_4xx_or_success_never_a_5xx() {
    let app = TestApp::spawn_with(|s| {
        // Many generated logins are registrations: keep them cheap.
        s.server.request_timeout_ms = 30_000;
    })
    .await;
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    let group = app.group(&alice, "Team", &[&bob]).await;
    let endpoints = [
        (Method::POST, "/login".to_string(), false),
        (Method::POST, "/register".to_string(), false),
        (Method::POST, "/chats/initiate".to_string(), true),
        (Method::POST, "/chats".to_string(), true),
        (Method::PATCH, format!("/chats/{group}"), true),
        (Method::POST, format!("/chats/{group}/members"), true),
        (
            Method::PATCH,
            format!("/chats/{group}/members/{}", bob.id),
            true,
        ),
        (Method::POST, format!("/chats/{group}/read"), true),
    ];
    let documented = [200, 201, 400, 401, 403, 404, 409, 413, 422, 429];
    let mut runner = TestRunner::new(Config {
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = any_body();
    const CASES: usize = 256;
    for (method, path, auth) in &endpoints {
        for _ in 0..CASES {
            let body = strategy.new_tree(&mut runner).unwrap().current();
            let mut req = app
                .http
                .request(method.clone(), app.url(path))
                .header("content-type", "application/json")
                .body(body.clone());
            if *auth {
                req = req.bearer_auth(&alice.token);
            }
            let res = tokio::time::timeout(DEADLINE, req.send())
                .await
                .expect("answered within the deadline")
                .expect("answered");
            let status = res.status().as_u16();
            let text = res.text().await.unwrap_or_default();
            let shown = String::from_utf8_lossy(&body);
            assert!(
                documented.contains(&status),
                "{method} {path} {shown:?}: {status} {text}"
            );
            if status >= 400 {
                let v: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("{method} {path} {shown:?}: not JSON: {text}"));
                assert!(
                    v["error"].is_string() && v["code"].is_string(),
                    "{method} {path} {shown:?}: {v}"
                );
            }
        }
    }
    // Alice's session survived whatever was thrown at it.
    let (status, _) = app.get("/chats", Some(&alice.token)).await;
    assert_eq!(status, StatusCode::OK);
}
