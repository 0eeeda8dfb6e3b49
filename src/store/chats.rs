//! Direct chats between two users.

use serde::Serialize;
use utoipa::ToSchema;

use super::{Message, Store, StoreError, Timestamp, User};

/// One entry of a user's chat list.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ChatSummary {
    pub chat_id: i64,
    /// Always `"direct"` for now.
    #[serde(rename = "type")]
    #[schema(example = "direct")]
    pub kind: &'static str,
    pub peer: User,
    pub created_at: Timestamp,
    pub last_message: Option<Message>,
}

impl Store {
    /// Returns the direct chat of `a` and `b`, creating it if needed; the
    /// flag says whether it was created now. The pair is unique in the
    /// schema and all writes go through one writer, so concurrent calls by
    /// either side converge on one chat.
    pub async fn initiate_direct_chat(&self, a: i64, b: i64) -> Result<(i64, bool), StoreError> {
        let (chat_id, created) = self.writer.initiate_chat(a, b).await?;
        self.members.insert(chat_id, [a.min(b), a.max(b)]);
        Ok((chat_id, created))
    }

    /// The two members of a chat, or `None` if there is no such chat.
    pub async fn chat_members(&self, chat_id: i64) -> Result<Option<[i64; 2]>, StoreError> {
        if let Some(m) = self.members.get(&chat_id) {
            return Ok(Some(*m));
        }
        let row = sqlx::query!("SELECT user_a, user_b FROM chats WHERE id = ?", chat_id)
            .fetch_optional(&self.read)
            .await?;
        Ok(row.map(|r| {
            let m = [r.user_a, r.user_b];
            self.members.insert(chat_id, m);
            m
        }))
    }

    /// True when `user_id` is a member of `chat_id` (false also when there is no such chat).
    pub async fn is_member(&self, chat_id: i64, user_id: i64) -> Result<bool, StoreError> {
        Ok(self
            .chat_members(chat_id)
            .await?
            .is_some_and(|m| m.contains(&user_id)))
    }

    /// The user's chats, most recent activity (last message, else creation) first.
    #[tracing::instrument(name = "db.chats_of", skip_all, fields(db.system.name = "sqlite"))]
    pub async fn chats_of(&self, user_id: i64) -> Result<Vec<ChatSummary>, StoreError> {
        let rows = sqlx::query!(
            r#"SELECT c.id AS "chat_id!", c.created_at AS "chat_created_at!",
                      p.id AS "peer_id!", p.username AS "peer_username!",
                      m.id AS "msg_id?", m.sender_id AS "msg_sender_id?",
                      s.username AS "msg_sender?", m.content AS "msg_content?",
                      m.created_at AS "msg_created_at?"
               FROM chats c
               JOIN users p ON p.id = CASE WHEN c.user_a = ?1 THEN c.user_b ELSE c.user_a END
               LEFT JOIN messages m ON m.id = (SELECT max(id) FROM messages WHERE chat_id = c.id)
               LEFT JOIN users s ON s.id = m.sender_id
               WHERE c.user_a = ?1 OR c.user_b = ?1
               ORDER BY coalesce(m.created_at, c.created_at) DESC, coalesce(m.id, 0) DESC, c.id DESC"#,
            user_id
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ChatSummary {
                chat_id: r.chat_id,
                kind: "direct",
                peer: User {
                    id: r.peer_id,
                    username: r.peer_username,
                },
                created_at: Timestamp(r.chat_created_at),
                last_message: match (
                    r.msg_id,
                    r.msg_sender_id,
                    r.msg_sender,
                    r.msg_content,
                    r.msg_created_at,
                ) {
                    (Some(id), Some(sender_id), Some(sender), Some(content), Some(ts)) => {
                        Some(Message {
                            id,
                            chat_id: r.chat_id,
                            sender,
                            sender_id,
                            content,
                            timestamp: Timestamp(ts),
                        })
                    }
                    _ => None,
                },
            })
            .collect())
    }
}
