//! Messages: history pages and the send path.

use serde::Serialize;
use utoipa::ToSchema;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;

use super::{NewMessage, OnCommit, SendOutcome, Store, StoreError, Timestamp};

/// The outcome of a submitted message, available after COMMIT.
pub struct PendingSend {
    rx: oneshot::Receiver<Result<SendOutcome, StoreError>>,
}

impl Future for PendingSend {
    type Output = Result<SendOutcome, StoreError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(StoreError::Closed)))
    }
}

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
        self.submit_message(msg).await?.await
    }

    /// Queues a message for the writer and returns at once with a future of
    /// the outcome (resolved after COMMIT). Messages submitted one after
    /// another are committed, acked and fanned out in that order, so a
    /// connection can pipeline sends. Unknown chat: `ChatNotFound`.
    pub async fn submit_message(&self, msg: NewMessage) -> Result<PendingSend, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit_message_then(
            msg,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        )
        .await?;
        Ok(PendingSend { rx })
    }

    /// Like [`Store::submit_message`], but the outcome goes to `on_commit`,
    /// called on the writer thread right after the message's fan-out
    /// (see [`OnCommit`]). The WebSocket reader uses this to queue the ack
    /// without a wake-up of its own. `on_commit` is dropped uncalled when
    /// this returns an error.
    pub async fn submit_message_then(
        &self,
        msg: NewMessage,
        on_commit: OnCommit,
    ) -> Result<(), StoreError> {
        let members = self
            .chat_members(msg.chat_id)
            .await?
            .ok_or(StoreError::ChatNotFound)?;
        self.writer.submit(msg, members, on_commit).await
    }
}

/// A page of history rendered as the API's JSON array of [`Message`]s (what
/// `GET /chats/{id}/messages` returns), read on the synchronous read path
/// (see `reader.rs`). A test compares pages with the WebSocket frames.
impl Store {
    #[tracing::instrument(name = "db.history", skip_all, fields(db.system.name = "sqlite", chat_id))]
    pub fn history_json(&self, chat_id: i64, page: HistoryPage) -> Result<String, StoreError> {
        self.reader.history_json(chat_id, page)
    }
}

/// A message replayed on resume, with its idempotency key (shown to its sender).
#[derive(Debug, Clone)]
pub struct ReplayedMessage {
    pub message: Message,
    pub client_msg_id: Option<String>,
}

impl Store {
    /// Messages with an id greater than `since` from all of the user's
    /// chats, ascending, at most `limit`.
    #[tracing::instrument(name = "db.messages_since", skip_all, fields(db.system.name = "sqlite", since))]
    pub async fn messages_since(
        &self,
        user_id: i64,
        since: i64,
        limit: u32,
    ) -> Result<Vec<ReplayedMessage>, StoreError> {
        let limit = i64::from(limit);
        let rows = sqlx::query!(
            r#"SELECT m.id AS "id!", m.chat_id, u.username AS sender, m.sender_id,
                      m.content, m.created_at, m.client_msg_id
               FROM messages m JOIN users u ON u.id = m.sender_id
               WHERE m.id > ?2
                 AND m.chat_id IN (SELECT id FROM chats WHERE user_a = ?1 OR user_b = ?1)
               ORDER BY m.id ASC LIMIT ?3"#,
            user_id,
            since,
            limit
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ReplayedMessage {
                message: Message {
                    id: r.id,
                    chat_id: r.chat_id,
                    sender: r.sender,
                    sender_id: r.sender_id,
                    content: r.content,
                    timestamp: Timestamp(r.created_at),
                },
                client_msg_id: r.client_msg_id,
            })
            .collect())
    }
}
