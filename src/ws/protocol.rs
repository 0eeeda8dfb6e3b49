//! WebSocket frames (JSON text frames) and their validation.

use axum::extract::ws::Utf8Bytes;
use serde::{Deserialize, Serialize};

use crate::store::{Message, Timestamp};

/// Longest accepted `client_msg_id`, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 128;

/// What a client sends: `{"type": "send", "chat_id", "content", "client_msg_id"}`,
/// `type` optional. Fields are read loosely so a wrong type gets a precise
/// error frame instead of a generic parse failure.
#[derive(Debug, Deserialize)]
struct RawClientFrame {
    #[serde(rename = "type")]
    kind: Option<serde_json::Value>,
    chat_id: Option<serde_json::Value>,
    content: Option<serde_json::Value>,
    client_msg_id: Option<serde_json::Value>,
}

/// A validated send request.
#[derive(Debug, PartialEq, Eq)]
pub struct SendFrame {
    pub chat_id: i64,
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
pub fn parse_send(text: &str, max_content_chars: usize) -> Result<SendFrame, FrameError> {
    let raw: RawClientFrame = serde_json::from_str(text)
        .map_err(|e| FrameError::new("invalid_json", format!("invalid JSON frame: {e}"), None))?;
    // Read the key first so every later error can echo it.
    let client_msg_id = match raw.client_msg_id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= MAX_CLIENT_MSG_ID => {
            Some(s)
        }
        Some(_) => {
            return Err(FrameError::new(
                "invalid_json",
                format!("client_msg_id must be a string of 1-{MAX_CLIENT_MSG_ID} bytes"),
                None,
            ));
        }
    };
    let fail = |code, msg: &str| Err(FrameError::new(code, msg, client_msg_id.clone()));
    match &raw.kind {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(k)) if k == "send" => {}
        Some(_) => {
            return fail(
                "invalid_json",
                "unknown frame type; the only client frame is \"send\"",
            );
        }
    }
    let chat_id = match raw.chat_id.as_ref().and_then(serde_json::Value::as_i64) {
        Some(id) if id > 0 => id,
        _ => return fail("invalid_json", "chat_id must be a positive integer"),
    };
    let content = match raw.content {
        Some(serde_json::Value::String(s)) => s,
        _ => return fail("invalid_content", "content must be a string"),
    };
    if let Err(why) = validate_content(&content, max_content_chars) {
        return fail("invalid_content", &why);
    }
    Ok(SendFrame {
        chat_id,
        content,
        client_msg_id,
    })
}

/// 1..=max characters, not only whitespace, no control characters but
/// newline and tab.
pub fn validate_content(content: &str, max_chars: usize) -> Result<(), String> {
    if content.trim().is_empty() {
        return Err("content must not be empty or only whitespace".into());
    }
    if content.chars().count() > max_chars {
        return Err(format!("content must be at most {max_chars} characters"));
    }
    if content
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(
            "content must not contain control characters other than newline and tab".into(),
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct MessageFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: i64,
    chat_id: i64,
    sender: &'a str,
    sender_id: i64,
    content: &'a str,
    timestamp: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<&'a str>,
}

/// Encodes a `message` frame; `client_msg_id` only for the sender's own connections.
pub fn message_frame(m: &Message, client_msg_id: Option<&str>) -> Utf8Bytes {
    encode(&MessageFrame {
        kind: "message",
        id: m.id,
        chat_id: m.chat_id,
        sender: &m.sender,
        sender_id: m.sender_id,
        content: &m.content,
        timestamp: m.timestamp,
        client_msg_id,
    })
}

#[derive(Serialize)]
struct AckFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    client_msg_id: Option<&'a str>,
    id: i64,
    chat_id: i64,
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
    last_id: i64,
}

/// Encodes the `resync` frame sent when the replay hit its cap.
pub fn resync_frame(last_id: i64) -> Utf8Bytes {
    encode(&ResyncFrame {
        kind: "resync",
        last_id,
    })
}

fn encode<T: Serialize>(frame: &T) -> Utf8Bytes {
    // Serializing these plain structs to a String cannot fail.
    Utf8Bytes::from(serde_json::to_string(frame).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_frame_parses_with_and_without_type_and_key() {
        let f = parse_send(r#"{"chat_id": 1, "content": "Hello via WS"}"#, 4000).unwrap();
        assert_eq!(f.chat_id, 1);
        assert_eq!(f.client_msg_id, None);
        let f = parse_send(
            r#"{"type":"send","chat_id":2,"content":"x","client_msg_id":"k"}"#,
            4000,
        )
        .unwrap();
        assert_eq!(f.client_msg_id.as_deref(), Some("k"));
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
        let e = parse_send(r#"{"type":"typing","chat_id":1,"content":"x"}"#, 10).unwrap_err();
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
