//! The JSON bodies of the HTTP API, with their OpenAPI schemas. Built from
//! the store's plain types at the edge; field order is the wire order.

use serde::Serialize;
use serde::ser::SerializeSeq;
use utoipa::ToSchema;

use crate::domain::Session;
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{self, MessagePage, MessageRef, Timestamp};
use crate::ws::protocol::RawJson;

/// A user as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = User)]
pub struct UserBody {
    #[schema(value_type = i64, minimum = 1)]
    pub id: UserId,
    pub username: String,
}

impl From<store::User> for UserBody {
    fn from(u: store::User) -> Self {
        UserBody {
            id: u.id,
            username: u.username,
        }
    }
}

/// A message as clients see it: text sent by a user, or a timeline event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[schema(as = Message)]
pub struct MessageBody {
    #[schema(value_type = i64, minimum = 1)]
    pub id: MessageId,
    #[schema(value_type = i64, minimum = 1)]
    pub chat_id: ChatId,
    /// The sender's username (for an event: who made the change).
    pub sender: String,
    #[schema(value_type = i64, minimum = 1)]
    pub sender_id: UserId,
    /// `text`, or the event: `chat_created`, `member_added`,
    /// `member_removed`, `role_changed`, `title_changed`.
    #[schema(example = "text")]
    pub kind: &'static str,
    /// The text; for an event a readable sentence.
    pub content: String,
    /// An event's details (absent for text): `{"user": {"id", "username"}}`
    /// (plus `"role"`), or `{"title"}`.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "raw_json")]
    #[schema(value_type = Option<Object>)]
    pub event: Option<String>,
    pub timestamp: Timestamp,
}

fn raw_json<S: serde::Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(text) => RawJson(text).serialize(s),
        None => s.serialize_none(),
    }
}

impl From<store::Message> for MessageBody {
    fn from(m: store::Message) -> Self {
        MessageBody {
            id: m.id,
            chat_id: m.chat_id,
            sender: m.sender,
            sender_id: m.sender_id,
            kind: m.kind.as_str(),
            content: m.content,
            event: m.event,
            timestamp: m.timestamp,
        }
    }
}

/// [`MessageBody`], borrowed from a history page: the same fields in the
/// same order, so the same JSON (a test compares the two).
#[derive(Serialize)]
struct MessageJson<'a> {
    id: MessageId,
    chat_id: ChatId,
    sender: &'a str,
    sender_id: UserId,
    kind: &'static str,
    content: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event: Option<RawJson<'a>>,
    timestamp: Timestamp,
}

impl<'a> From<MessageRef<'a>> for MessageJson<'a> {
    fn from(m: MessageRef<'a>) -> Self {
        MessageJson {
            id: m.id,
            chat_id: m.chat_id,
            sender: m.sender,
            sender_id: m.sender_id,
            kind: m.kind.as_str(),
            content: m.content,
            event: m.event.map(RawJson),
            timestamp: m.timestamp,
        }
    }
}

/// A history page as the API's JSON array of [`MessageBody`], rendered
/// straight from the page's buffer (no owned copy per message).
pub fn page_json(page: &MessagePage) -> Vec<u8> {
    struct Rows<'a>(&'a MessagePage);
    impl Serialize for Rows<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut seq = s.serialize_seq(Some(self.0.len()))?;
            for m in self.0.iter() {
                seq.serialize_element(&MessageJson::from(m))?;
            }
            seq.end()
        }
    }
    let mut out = Vec::with_capacity(page.text_len() + 128 * page.len() + 2);
    // Plain strings and numbers into a Vec: serializing them cannot fail.
    let _ = serde_json::to_writer(&mut out, &Rows(page));
    out
}

/// A chat as one of its members sees it; `members` only where the
/// answer says "with members".
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Chat)]
pub struct ChatBody {
    #[schema(value_type = i64, minimum = 1)]
    pub chat_id: ChatId,
    /// `direct` or `group`.
    #[serde(rename = "type")]
    #[schema(example = "direct")]
    pub kind: &'static str,
    /// Groups only (`null` for direct chats).
    #[schema(required = true)]
    pub title: Option<String>,
    /// Direct chats only: the other member (`null` for groups).
    #[schema(required = true)]
    pub peer: Option<UserBody>,
    pub member_count: u32,
    pub created_at: Timestamp,
    /// `null` for a chat without messages.
    #[schema(required = true)]
    pub last_message: Option<MessageBody>,
    /// The caller's read marker.
    #[schema(value_type = i64, minimum = 0)]
    pub last_read_id: MessageId,
    /// Text messages above the caller's marker, not sent by the caller.
    pub unread_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<MemberBody>>,
}

/// A member of a chat.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(as = Member)]
pub struct MemberBody {
    #[schema(value_type = i64, minimum = 1)]
    pub id: UserId,
    pub username: String,
    /// `admin` or `member`.
    #[schema(example = "member")]
    pub role: &'static str,
    #[schema(value_type = i64, minimum = 0)]
    pub last_read_id: MessageId,
}

impl From<store::Chat> for ChatBody {
    fn from(c: store::Chat) -> Self {
        ChatBody {
            chat_id: c.chat_id,
            kind: c.kind.as_str(),
            title: c.title,
            peer: c.peer.map(Into::into),
            member_count: c.member_count,
            created_at: c.created_at,
            last_message: c.last_message.map(Into::into),
            last_read_id: c.last_read_id,
            unread_count: c.unread_count,
            members: None,
        }
    }
}

impl From<store::ChatDetail> for ChatBody {
    fn from(d: store::ChatDetail) -> Self {
        let mut body = ChatBody::from(d.chat);
        body.members = Some(
            d.members
                .into_iter()
                .map(|m| MemberBody {
                    id: m.id,
                    username: m.username,
                    role: m.role.as_str(),
                    last_read_id: m.last_read_id,
                })
                .collect(),
        );
        body
    }
}

/// `POST /chats/{chat_id}/read`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadMarkerBody {
    #[schema(value_type = i64, minimum = 1)]
    pub chat_id: ChatId,
    #[schema(value_type = i64, minimum = 0)]
    pub last_read_id: MessageId,
    pub unread_count: u64,
}

impl From<store::ReadMarker> for ReadMarkerBody {
    fn from(m: store::ReadMarker) -> Self {
        ReadMarkerBody {
            chat_id: m.chat_id,
            last_read_id: m.last_read_id,
            unread_count: m.unread_count,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// HS256 JWT for `Authorization: Bearer`.
    pub token: String,
    #[schema(example = "Bearer")]
    pub token_type: &'static str,
    /// Seconds until the token expires.
    pub expires_in: u64,
    pub user: UserBody,
    /// True when this call created the account.
    pub created: bool,
}

impl From<Session> for LoginResponse {
    fn from(s: Session) -> Self {
        LoginResponse {
            token: s.token,
            token_type: "Bearer",
            expires_in: s.expires_in,
            user: s.user.into(),
            created: s.created,
        }
    }
}

impl utoipa::PartialSchema for Timestamp {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .schema_type(utoipa::openapi::schema::Type::String)
            .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                utoipa::openapi::KnownFormat::DateTime,
            )))
            .examples(["2026-11-24T01:52:46.123Z"])
            .into()
    }
}

impl utoipa::ToSchema for Timestamp {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_renders_like_owned_messages() {
        let text = MessageBody {
            id: MessageId(7),
            chat_id: ChatId(3),
            sender: "ålice \"q\"".into(),
            sender_id: UserId(2),
            kind: "text",
            content: "line\nbreak \u{1F600} </script>".into(),
            event: None,
            timestamp: Timestamp(1_795_485_166_123),
        };
        let event = MessageBody {
            id: MessageId(8),
            kind: "member_added",
            content: "alice added bob".into(),
            event: Some(r#"{"user":{"id":4,"username":"bob"}}"#.into()),
            ..text.clone()
        };
        let mut page = MessagePage::with_capacity(2, 0);
        for owned in [&text, &event] {
            page.push(MessageRef {
                id: owned.id,
                chat_id: owned.chat_id,
                sender: &owned.sender,
                sender_id: owned.sender_id,
                kind: store::MessageKind::parse(owned.kind).unwrap(),
                content: &owned.content,
                event: owned.event.as_deref(),
                timestamp: owned.timestamp,
            });
        }
        assert_eq!(
            String::from_utf8(page_json(&page.finish())).unwrap(),
            serde_json::to_string(&[&text, &event]).unwrap()
        );
    }
}
