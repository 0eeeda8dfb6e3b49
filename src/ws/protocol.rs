//! WebSocket frames: JSON text frames in both directions, parsed and
//! validated on the way in (a refusal becomes an `error` frame with a
//! stable code), encoded once on the way out.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

use crate::domain::chats::{ReadNotice, TypingNotice};
use crate::domain::validate;
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{Message, Timestamp};

/// Longest accepted `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 128;

/// What a client sends: `{"type": "send", "chat_id", "content",
/// "client_msg_id"}` (`type` optional), `{"type": "typing", "chat_id"}` or
/// `{"type": "read", "chat_id", "up_to"}`. Fields are read loosely so a
/// wrong type gets a precise error frame instead of a generic parse failure.
#[derive(Debug, Deserialize)]
struct RawClientFrame {
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    chat_id: Option<serde_json::Value>,
    content: Option<serde_json::Value>,
    client_msg_id: Option<serde_json::Value>,
    up_to: Option<serde_json::Value>,
}

/// A validated client frame.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Send(SendFrame),
    Typing { chat_id: ChatId },
    Read { chat_id: ChatId, up_to: MessageId },
}

/// A validated send request.
#[derive(Debug, PartialEq, Eq)]
pub struct SendFrame {
    pub chat_id: ChatId,
    pub content: String,
    pub client_msg_id: Option<String>,
}

/// Why an inbound frame was refused: becomes an `error` frame.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
    pub client_msg_id: Option<String>,
}

impl FrameError {
    pub fn new(
        code: &'static str,
        message: impl Into<String>,
        client_msg_id: Option<String>,
    ) -> Self {
        FrameError {
            code,
            message: message.into(),
            client_msg_id,
        }
    }
}

/// Parses and validates a text frame.
pub fn parse_client(text: &str, max_content_chars: usize) -> Result<ClientFrame, FrameError> {
    let raw: RawClientFrame = serde_json::from_str(text)
        .map_err(|e| FrameError::new("invalid_json", format!("invalid JSON frame: {e}"), None))?;
    match raw.kind.as_ref() {
        None | Some(serde_json::Value::Null) => {
            parse_send(raw, max_content_chars).map(ClientFrame::Send)
        }
        Some(serde_json::Value::String(k)) => match k.as_str() {
            "send" => parse_send(raw, max_content_chars).map(ClientFrame::Send),
            "typing" => Ok(ClientFrame::Typing {
                chat_id: chat_id(&raw, None)?,
            }),
            "read" => {
                let chat_id = chat_id(&raw, None)?;
                let up_to = match raw.up_to.as_ref().and_then(serde_json::Value::as_i64) {
                    Some(id) if id >= 0 => MessageId(id),
                    _ => {
                        return Err(FrameError::new(
                            "invalid_json",
                            "up_to must be a message id (a non-negative integer)",
                            None,
                        ));
                    }
                };
                Ok(ClientFrame::Read { chat_id, up_to })
            }
            _ => Err(unknown_type()),
        },
        Some(_) => Err(unknown_type()),
    }
}

fn unknown_type() -> FrameError {
    FrameError::new(
        "invalid_json",
        "unknown frame type; client frames are \"send\", \"typing\" and \"read\"",
        None,
    )
}

fn chat_id(raw: &RawClientFrame, key: Option<&String>) -> Result<ChatId, FrameError> {
    match raw.chat_id.as_ref().and_then(serde_json::Value::as_i64) {
        Some(id) if id > 0 => Ok(ChatId(id)),
        _ => Err(FrameError::new(
            "invalid_json",
            "chat_id must be a positive integer",
            key.cloned(),
        )),
    }
}

fn parse_send(raw: RawClientFrame, max_content_chars: usize) -> Result<SendFrame, FrameError> {
    // Read the key first so every later error can echo it.
    let client_msg_id = match raw.client_msg_id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(ref s)) if !s.is_empty() && s.len() <= MAX_CLIENT_MSG_ID => {
            Some(s.clone())
        }
        Some(_) => {
            return Err(FrameError::new(
                "invalid_json",
                format!("client_msg_id must be a string of 1-{MAX_CLIENT_MSG_ID} bytes"),
                None,
            ));
        }
    };
    let chat_id = chat_id(&raw, client_msg_id.as_ref())?;
    let fail = |code, msg: &str| Err(FrameError::new(code, msg, client_msg_id.clone()));
    let content = match raw.content {
        Some(serde_json::Value::String(s)) => s,
        _ => return fail("invalid_content", "content must be a string"),
    };
    if let Err(why) = validate::content(&content, max_content_chars) {
        return fail("invalid_content", &why);
    }
    Ok(SendFrame {
        chat_id,
        content,
        client_msg_id,
    })
}

#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    frame: &'static str,
    id: MessageId,
    chat_id: ChatId,
    sender: &'a str,
    sender_id: UserId,
    kind: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<RawJson<'a>>,
    timestamp: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
}

/// A stored JSON object written as it is (an event's details).
#[derive(Clone, Copy)]
pub struct RawJson<'a>(pub &'a str);

impl Serialize for RawJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let raw: &serde_json::value::RawValue =
            serde_json::from_str(self.0).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }
}

/// Encodes a `message` frame; `client_msg_id` only for the sender's own connections.
pub fn message_frame(m: &Message, client_msg_id: Option<&str>) -> Utf8Bytes {
    encode(&MessageFrame {
        frame: "message",
        id: m.id,
        chat_id: m.chat_id,
        sender: &m.sender,
        sender_id: m.sender_id,
        kind: m.kind.as_str(),
        content: &m.content,
        event: m.event.as_deref().map(RawJson),
        timestamp: m.timestamp,
        client_msg_id,
    })
}

#[derive(Serialize)]
struct AckFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    client_msg_id: Option<&'a str>,
    id: MessageId,
    chat_id: ChatId,
    timestamp: Timestamp,
}

/// Encodes an `ack` frame (sent after COMMIT).
pub fn ack_frame(m: &Message, client_msg_id: Option<&str>) -> Utf8Bytes {
    encode(&AckFrame {
        kind: "ack",
        client_msg_id,
        id: m.id,
        chat_id: m.chat_id,
        timestamp: m.timestamp,
    })
}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    code: &'a str,
    message: &'a str,
    client_msg_id: Option<&'a str>,
}

/// Encodes an `error` frame; the connection stays open.
pub fn error_frame(e: &FrameError) -> Utf8Bytes {
    encode(&ErrorFrame {
        kind: "error",
        code: e.code,
        message: &e.message,
        client_msg_id: e.client_msg_id.as_deref(),
    })
}

#[derive(Serialize)]
struct ResyncFrame {
    #[serde(rename = "type")]
    kind: &'static str,
    /// Id of the last message replayed; page the rest over HTTP with `after`.
    last_id: MessageId,
}

/// Encodes the `resync` frame sent when the replay hit its cap.
pub fn resync_frame(last_id: MessageId) -> Utf8Bytes {
    encode(&ResyncFrame {
        kind: "resync",
        last_id,
    })
}

#[derive(Serialize)]
struct ReadFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    chat_id: ChatId,
    user_id: UserId,
    username: &'a str,
    up_to: MessageId,
}

/// Encodes a `read` frame: a member's read marker moved.
pub fn read_frame(n: &ReadNotice) -> Utf8Bytes {
    encode(&ReadFrame {
        kind: "read",
        chat_id: n.chat,
        user_id: n.user,
        username: &n.username,
        up_to: n.up_to,
    })
}

#[derive(Serialize)]
struct TypingFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    chat_id: ChatId,
    user_id: UserId,
    username: &'a str,
}

/// Encodes a `typing` frame.
pub fn typing_frame(n: &TypingNotice) -> Utf8Bytes {
    encode(&TypingFrame {
        kind: "typing",
        chat_id: n.chat,
        user_id: n.user,
        username: &n.username,
    })
}

fn encode<T: Serialize>(frame: &T) -> Utf8Bytes {
    // Serializing these plain structs to a String cannot fail.
    Utf8Bytes::from(serde_json::to_string(frame).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_send(text: &str, max: usize) -> Result<SendFrame, FrameError> {
        match parse_client(text, max)? {
            ClientFrame::Send(f) => Ok(f),
            other => panic!("not a send: {other:?}"),
        }
    }

    #[test]
    fn seed_frame_parses_with_and_without_type_and_key() {
        let f = parse_send(r#"{"chat_id": 1, "content": "Hello via WS"}"#, 4000).unwrap();
        assert_eq!(f.chat_id, ChatId(1));
        assert_eq!(f.client_msg_id, None);
        let f = parse_send(
            r#"{"type":"send","chat_id":2,"content":"x","client_msg_id":"k"}"#,
            4000,
        )
        .unwrap();
        assert_eq!(f.client_msg_id.as_deref(), Some("k"));
    }

    #[test]
    fn typing_and_read_frames_parse() {
        assert_eq!(
            parse_client(r#"{"type":"typing","chat_id":3}"#, 10),
            Ok(ClientFrame::Typing { chat_id: ChatId(3) })
        );
        assert_eq!(
            parse_client(r#"{"type":"read","chat_id":3,"up_to":17}"#, 10),
            Ok(ClientFrame::Read {
                chat_id: ChatId(3),
                up_to: MessageId(17)
            })
        );
        for bad in [
            r#"{"type":"read","chat_id":3}"#,
            r#"{"type":"read","chat_id":3,"up_to":"7"}"#,
            r#"{"type":"typing"}"#,
        ] {
            assert_eq!(
                parse_client(bad, 10).unwrap_err().code,
                "invalid_json",
                "{bad}"
            );
        }
    }

    #[test]
    fn event_details_are_embedded_as_json() {
        let m = Message {
            id: MessageId(5),
            chat_id: ChatId(2),
            sender: "alice".into(),
            sender_id: UserId(1),
            kind: crate::store::MessageKind::MemberAdded,
            content: "alice added bob".into(),
            event: Some(r#"{"user":{"id":2,"username":"bob"}}"#.into()),
            timestamp: Timestamp(0),
        };
        let v: serde_json::Value = serde_json::from_str(message_frame(&m, None).as_str()).unwrap();
        assert_eq!(v["kind"], "member_added");
        assert_eq!(v["event"]["user"]["username"], "bob");
    }

    #[test]
    fn bad_frames_get_codes_and_echo_the_key() {
        let e = parse_send("not json", 10).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        let e = parse_send(r#"{"chat_id":"1","content":"x","client_msg_id":"k"}"#, 10).unwrap_err();
        assert_eq!(
            (e.code, e.client_msg_id.as_deref()),
            ("invalid_json", Some("k"))
        );
        let e = parse_client(r#"{"type":"dance","chat_id":1,"content":"x"}"#, 10).unwrap_err();
        assert_eq!(e.code, "invalid_json");
        for content in [
            "",
            "  \n\t ",
            "a\u{0000}b",
            "a\rb",
            "\u{1b}[31m",
            "12345678901",
        ] {
            let frame = serde_json::json!({"chat_id": 1, "content": content, "client_msg_id": "k"});
            let e = parse_send(&frame.to_string(), 10).unwrap_err();
            assert_eq!(e.code, "invalid_content", "{content:?}");
            assert_eq!(e.client_msg_id.as_deref(), Some("k"));
        }
        assert!(parse_send(r#"{"chat_id":1,"content":"line\nnext\ttab"}"#, 20).is_ok());
        // The limit counts characters, not bytes.
        assert!(parse_send(r#"{"chat_id":1,"content":"ünïcödé ✓"}"#, 9).is_ok());
    }
}

/// Property tests: whatever a client sends, the parser does not panic, and
/// it either yields a frame that satisfies every rule or refuses with one of
/// the documented codes (echoing the `client_msg_id` once it was read).
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{Map, Value};

    const MAX: usize = 40;

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Text a client might send: short strings, some of them edge cases.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>().prop_map(|s| s.chars().take(50).collect()),
            Just(String::new()),
            Just(" \u{200B}\u{FEFF}\u{202E}\u{E0041}".to_string()),
            Just("line\r\nnext".to_string()),
            Just("a\rb".to_string()),
            Just("x".repeat(MAX + 1)),
            Just("k".repeat(MAX_CLIENT_MSG_ID + 1)),
            Just("send".to_string()),
            Just("typing".to_string()),
            Just("read".to_string()),
        ]
    }

    fn number() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<i64>().prop_map(Value::from),
            (-3i64..5).prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            Just(Value::from(i64::MAX)),
            Just(serde_json::json!(1.0)),
        ]
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            number(),
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

    /// A frame-shaped object: the protocol's field names with any values.
    fn frame() -> impl Strategy<Value = Value> {
        let field = |name: &'static str, value: BoxedStrategy<Value>| {
            prop::option::weighted(0.7, value).prop_map(move |v| (name, v))
        };
        let kind = prop_oneof![
            Just(Value::from("send")),
            Just(Value::from("typing")),
            Just(Value::from("read")),
            json(),
        ]
        .boxed();
        let id = prop_oneof![number(), json()].boxed();
        let string = prop_oneof![text().prop_map(Value::String), json()].boxed();
        (
            field("type", kind),
            field("chat_id", id.clone()),
            field("content", string.clone()),
            field("client_msg_id", string),
            field("up_to", id),
            json(),
        )
            .prop_map(|(a, b, c, d, e, extra)| {
                let mut map = match extra {
                    Value::Object(m) => m,
                    _ => Map::new(),
                };
                for (name, value) in [a, b, c, d, e] {
                    match value {
                        Some(v) => map.insert(name.to_string(), v),
                        None => map.remove(name),
                    };
                }
                Value::Object(map)
            })
    }

    /// The key a send frame carries, if it is a valid one.
    fn valid_key(v: &Value) -> Option<&str> {
        let is_send = matches!(v.get("type"), None | Some(Value::Null))
            || v.get("type") == Some(&Value::from("send"));
        let key = v.get("client_msg_id")?.as_str()?;
        (is_send && !key.is_empty() && key.len() <= MAX_CLIENT_MSG_ID).then_some(key)
    }

    fn check(text: &str, sent: Option<&Value>) -> Result<(), TestCaseError> {
        match parse_client(text, MAX) {
            Ok(ClientFrame::Send(f)) => {
                prop_assert!(f.chat_id.get() > 0);
                prop_assert!(
                    validate::content(&f.content, MAX).is_ok(),
                    "{:?}",
                    f.content
                );
                if let Some(k) = &f.client_msg_id {
                    prop_assert!(!k.is_empty() && k.len() <= MAX_CLIENT_MSG_ID);
                }
                if let Some(v) = sent {
                    prop_assert_eq!(
                        v.get("content").and_then(Value::as_str),
                        Some(f.content.as_str())
                    );
                }
            }
            Ok(ClientFrame::Typing { chat_id }) => prop_assert!(chat_id.get() > 0),
            Ok(ClientFrame::Read { chat_id, up_to }) => {
                prop_assert!(chat_id.get() > 0);
                prop_assert!(up_to.get() >= 0);
            }
            Err(e) => {
                prop_assert!(
                    ["invalid_json", "invalid_content"].contains(&e.code),
                    "undocumented code {}",
                    e.code
                );
                prop_assert!(!e.message.is_empty());
                if let Some(v) = sent
                    && let Some(key) = valid_key(v)
                {
                    prop_assert_eq!(e.client_msg_id.as_deref(), Some(key), "{}", e.message);
                }
                // The error frame itself is valid JSON of the documented shape.
                let frame: Value = serde_json::from_str(error_frame(&e).as_str()).unwrap();
                prop_assert_eq!(&frame["type"], "error");
                prop_assert_eq!(&frame["code"], e.code);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn arbitrary_bytes_parse_or_are_invalid_json(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            // Text frames are UTF-8 by the time they reach the parser
            // (anything else closes with 1007).
            check(&String::from_utf8_lossy(&bytes), None)?;
        }

        #[test]
        fn arbitrary_json_values_parse_or_get_a_documented_error(v in json()) {
            check(&v.to_string(), None)?;
        }

        #[test]
        fn frame_shaped_objects_parse_or_get_a_documented_error(v in frame()) {
            check(&v.to_string(), Some(&v))?;
        }
    }
}
