//! Messages: history pages and the send path.

use serde::Serialize;
use utoipa::ToSchema;

use super::{NewMessage, SendOutcome, Store, StoreError, Timestamp};

/// A stored message as clients see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Message {
    pub id: i64,
    pub chat_id: i64,
    /// The sender's username.
    pub sender: String,
    pub sender_id: i64,
    pub content: String,
    pub timestamp: Timestamp,
}

/// Which window of a chat's history to read. Results are always ascending by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryPage {
    /// The latest `limit` messages.
    Latest { limit: u32 },
    /// The `limit` messages just older than `id`.
    Before { id: i64, limit: u32 },
    /// The first `limit` messages newer than `id`.
    After { id: i64, limit: u32 },
}

impl Store {
    /// Stores a message through the group-commit writer. Returns after
    /// COMMIT; a repeated `(sender, client_msg_id)` returns the original.
    pub async fn send_message(&self, msg: NewMessage) -> Result<SendOutcome, StoreError> {
        self.writer.send(msg).await
    }

    /// A window of one chat's history, ascending by id.
    pub async fn history(
        &self,
        chat_id: i64,
        page: HistoryPage,
    ) -> Result<Vec<Message>, StoreError> {
        let (after, before, limit, descending) = match page {
            HistoryPage::Latest { limit } => (0, i64::MAX, limit, true),
            HistoryPage::Before { id, limit } => (0, id, limit, true),
            HistoryPage::After { id, limit } => (id, i64::MAX, limit, false),
        };
        let limit = i64::from(limit);
        let mut out: Vec<Message> = if descending {
            sqlx::query_as!(
                Message,
                r#"SELECT m.id AS "id!", m.chat_id, u.username AS sender, m.sender_id,
                          m.content, m.created_at AS "timestamp: Timestamp"
                   FROM messages m JOIN users u ON u.id = m.sender_id
                   WHERE m.chat_id = ? AND m.id > ? AND m.id < ?
                   ORDER BY m.id DESC LIMIT ?"#,
                chat_id,
                after,
                before,
                limit
            )
            .fetch_all(&self.read)
            .await?
        } else {
            sqlx::query_as!(
                Message,
                r#"SELECT m.id AS "id!", m.chat_id, u.username AS sender, m.sender_id,
                          m.content, m.created_at AS "timestamp: Timestamp"
                   FROM messages m JOIN users u ON u.id = m.sender_id
                   WHERE m.chat_id = ? AND m.id > ? AND m.id < ?
                   ORDER BY m.id ASC LIMIT ?"#,
                chat_id,
                after,
                before,
                limit
            )
            .fetch_all(&self.read)
            .await?
        };
        if descending {
            out.reverse();
        }
        Ok(out)
    }
}
