//! The PostgreSQL backend: the same product on a server database, for one
//! node or several on one database.
//!
//! * Message ids are positions in one stream, assigned under the row lock
//!   of `stream` held to COMMIT (see the migration): committed ids are
//!   always a prefix of the stream, in commit order, on every node.
//! * Each node has one writer task ([`writer`]): group commit, answers
//!   after COMMIT. Membership checks run inside the writer's transaction,
//!   under the same lock, so a removal and a send cannot both win.
//! * Each node delivers in stream order through its sequencer
//!   ([`sequencer`]): its own commits as they happen, other nodes' as
//!   they announce them over NATS ([`Peers`]), or by reading the database
//!   (positions missing from what NATS brought; every
//!   `cluster.poll_interval_ms` without NATS).
//! * Reads go to a pool; membership checks for reads query the database
//!   (another node may have just changed it), nothing is cached.
//!
//! There is no file to keep a generated signing secret beside: the secret
//! must come from the configuration.

mod groups;
mod sequencer;
mod writer;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{
    Audience, Chat, ChatDetail, ChatKind, CommitSink, GroupChange, Health, HistoryPage, KeptSecret,
    Member, Message, MessageKind, MessagePage, MessageRef, NewGroup, NewMessage, OnCommit, Peers,
    ReadMarker, ReplayedMessage, Role, Store, StoreError, Timestamp, TokenCheck, User, UserRecord,
};
use crate::config::{ClusterSettings, DatabaseSettings, redacted_url};
use crate::ids::{ChatId, MessageId, UserId};
use crate::telemetry::metrics as m;

/// Embedded migrations (the same files `sqlx migrate run` applies).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A write connection idle this long is pinged before its next batch.
const WRITE_IDLE_PING_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct PgStore {
    read: PgPool,
    write: PgPool,
    writer: writer::WriterHandle,
    url: Arc<str>,
}

impl PgStore {
    /// Connects (failing after `database.connect_timeout_ms`), applies
    /// pending migrations (several nodes may start at once: sqlx takes an
    /// advisory lock) and starts the writer and the sequencer.
    pub async fn open(
        settings: &DatabaseSettings,
        cluster: &ClusterSettings,
        sink: Arc<dyn CommitSink>,
        peers: Option<Peers>,
    ) -> Result<PgStore, StoreError> {
        let url = redacted_url(&settings.url);
        // Every query of ours is a point or range look-up with an index.
        // Statistics lag a table that grows from empty (autoanalyze runs at
        // most once a minute), and a plan made from them may scan what is by
        // then 30,000 rows: sequential scans are priced out on our connections.
        let options = PgConnectOptions::from_str(&settings.url)
            .map_err(|e| {
                StoreError::internal(format!("database.url is not a PostgreSQL URL ({url}): {e}"))
            })?
            .options([("enable_seqscan", "off")]);
        let timeout = Duration::from_millis(settings.connect_timeout_ms);
        let pool = |size: u32| {
            PgPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(timeout)
                .connect_with(options.clone())
        };
        let read = pool(settings.read_pool_size).await?;
        MIGRATOR.run(&read).await?;
        // Under load the writer's connections skip the ping before each use
        // (one round trip per batch); one that sat idle for a second is
        // pinged first, so a database restart while the node was quiet costs
        // no failed batch. A connection that breaks mid-batch fails that
        // batch with `unavailable` (nothing acked) and is replaced.
        let write = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= WRITE_IDLE_PING_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options.clone())
            .await?;
        let last: i64 = sqlx::query_scalar!("SELECT last_id FROM stream WHERE id = 1")
            .fetch_one(&read)
            .await?;
        let sequencer = sequencer::spawn(read.clone(), sink, MessageId(last + 1), cluster, peers);
        let writer = writer::spawn(write.clone(), sequencer, settings);
        Ok(PgStore {
            read,
            write,
            writer,
            url: url.into(),
        })
    }

    /// Pool sizes for the metrics.
    fn record_pools(&self) {
        for (name, pool) in [("read", &self.read), ("write", &self.write)] {
            let idle = pool.num_idle() as f64;
            let size = f64::from(pool.size());
            metrics::gauge!(m::DB_POOL_CONNECTIONS, "pool" => name, "state" => "idle").set(idle);
            metrics::gauge!(m::DB_POOL_CONNECTIONS, "pool" => name, "state" => "in_use")
                .set(size - idle);
        }
    }

    async fn chat_rows(&self, user: UserId, only: Option<ChatId>) -> Result<Vec<Chat>, StoreError> {
        let user_id = user.get();
        let only = only.map(ChatId::get);
        let rows = sqlx::query!(
            r#"SELECT c.id AS "chat_id!", c.kind AS "kind!", c.title,
                      c.created_at AS "created_at!", me.last_read_id AS "last_read_id!",
                      (SELECT count(*) FROM chat_members x WHERE x.chat_id = c.id) AS "member_count!",
                      p.id AS "peer_id?", p.username AS "peer_username?",
                      m.id AS "msg_id?", m.sender_id AS "msg_sender_id?",
                      s.username AS "msg_sender?", m.kind AS "msg_kind?",
                      m.content AS "msg_content?", m.event AS "msg_event?",
                      m.created_at AS "msg_created_at?",
                      (SELECT count(*) FROM messages u
                        WHERE u.chat_id = c.id AND u.id > me.last_read_id
                          AND u.kind = 'text' AND u.sender_id <> $1) AS "unread_count!"
               FROM chat_members me
               JOIN chats c ON c.id = me.chat_id
               LEFT JOIN users p ON c.kind = 'direct'
                    AND p.id = CASE WHEN c.user_a = $1 THEN c.user_b ELSE c.user_a END
               LEFT JOIN messages m ON m.id = (SELECT max(id) FROM messages WHERE chat_id = c.id)
               LEFT JOIN users s ON s.id = m.sender_id
               WHERE me.user_id = $1 AND ($2::bigint IS NULL OR c.id = $2)
               ORDER BY coalesce(m.created_at, c.created_at) DESC, coalesce(m.id, 0) DESC, c.id DESC"#,
            user_id,
            only
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                let chat_id = ChatId(r.chat_id);
                let last_message = match (
                    r.msg_id,
                    r.msg_sender_id,
                    r.msg_sender,
                    r.msg_kind,
                    r.msg_content,
                    r.msg_created_at,
                ) {
                    (
                        Some(id),
                        Some(sender_id),
                        Some(sender),
                        Some(kind),
                        Some(content),
                        Some(ts),
                    ) => Some(Message {
                        id: MessageId(id),
                        chat_id,
                        sender,
                        sender_id: UserId(sender_id),
                        kind: message_kind(&kind)?,
                        content,
                        event: r.msg_event,
                        timestamp: Timestamp(ts),
                    }),
                    _ => None,
                };
                let peer = match (r.peer_id, r.peer_username) {
                    (Some(id), Some(username)) => Some(User {
                        id: UserId(id),
                        username,
                    }),
                    _ => None,
                };
                Ok(Chat {
                    chat_id,
                    kind: ChatKind::parse(&r.kind)
                        .ok_or_else(|| StoreError::internal("unknown chat kind"))?,
                    title: r.title,
                    peer,
                    member_count: r.member_count as u32,
                    created_at: Timestamp(r.created_at),
                    last_message,
                    last_read_id: MessageId(r.last_read_id),
                    unread_count: r.unread_count as u64,
                })
            })
            .collect()
    }
}

fn message_kind(name: &str) -> Result<MessageKind, StoreError> {
    MessageKind::parse(name)
        .ok_or_else(|| StoreError::internal(format!("unknown message kind {name:?}")))
}

#[async_trait]
impl Store for PgStore {
    #[tracing::instrument(name = "db.user_by_name", skip_all, fields(db.system.name = "postgresql"))]
    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query!(
            "SELECT id, username, password_hash, token_key FROM users WHERE lower(username) = lower($1)",
            username
        )
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|r| UserRecord {
            user: User {
                id: UserId(r.id),
                username: r.username,
            },
            password_hash: r.password_hash,
            token_key: r.token_key,
        }))
    }

    async fn token_check(&self, user: UserId, jti: &str) -> Result<Option<TokenCheck>, StoreError> {
        let row = sqlx::query!(
            r#"SELECT u.username, u.token_key,
                      EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = $2) AS "revoked!"
               FROM users u WHERE u.id = $1"#,
            user.get(),
            jti
        )
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|r| TokenCheck {
            username: r.username,
            token_key: r.token_key,
            revoked: r.revoked,
        }))
    }

    async fn set_password(
        &self,
        user: UserId,
        password_hash: String,
    ) -> Result<Option<String>, StoreError> {
        // A new token key: every token issued before stops working.
        Ok(sqlx::query_scalar!(
            "UPDATE users SET password_hash = $2,
                    token_key = md5(random()::text || clock_timestamp()::text)
             WHERE id = $1 RETURNING token_key",
            user.get(),
            password_hash
        )
        .fetch_optional(&self.write)
        .await?)
    }

    async fn revoke_token(&self, jti: &str, expires_at: i64) -> Result<(), StoreError> {
        let mut tx = self.write.begin().await?;
        sqlx::query!(
            "INSERT INTO revoked_tokens (jti, expires_at) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            jti,
            expires_at
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "DELETE FROM revoked_tokens WHERE expires_at < extract(epoch FROM now())::bigint"
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn create_user(
        &self,
        username: &str,
        password_hash: Option<String>,
    ) -> Result<Option<User>, StoreError> {
        self.writer
            .create_user(username.to_string(), password_hash)
            .await
    }

    async fn initiate_direct_chat(
        &self,
        a: UserId,
        b: UserId,
    ) -> Result<(ChatId, bool), StoreError> {
        self.writer.initiate_chat(a, b).await
    }

    async fn create_group(&self, group: NewGroup) -> Result<ChatId, StoreError> {
        self.writer.create_group(group).await
    }

    async fn change_group(
        &self,
        chat: ChatId,
        actor: UserId,
        change: GroupChange,
        max_members: usize,
    ) -> Result<(), StoreError> {
        self.writer
            .change_group(chat, actor, change, max_members)
            .await
    }

    async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        up_to: MessageId,
    ) -> Result<ReadMarker, StoreError> {
        self.writer.mark_read(chat, user, up_to).await
    }

    async fn members(&self, chat: ChatId) -> Result<Option<Audience>, StoreError> {
        let chat_id = chat.get();
        let row = sqlx::query!(
            r#"SELECT c.id, array_remove(array_agg(cm.user_id ORDER BY cm.id), NULL) AS "members!"
               FROM chats c LEFT JOIN chat_members cm ON cm.chat_id = c.id
               WHERE c.id = $1 GROUP BY c.id"#,
            chat_id
        )
        .fetch_optional(&self.read)
        .await?;
        Ok(row.map(|r| r.members.into_iter().map(UserId).collect()))
    }

    async fn is_member(&self, chat: ChatId, user: UserId) -> Result<bool, StoreError> {
        let (chat_id, user_id) = (chat.get(), user.get());
        Ok(sqlx::query_scalar!(
            r#"SELECT EXISTS (SELECT 1 FROM chat_members WHERE chat_id = $1 AND user_id = $2) AS "member!""#,
            chat_id,
            user_id
        )
        .fetch_one(&self.read)
        .await?)
    }

    #[tracing::instrument(name = "db.chat", skip_all, fields(db.system.name = "postgresql"))]
    async fn chat(&self, chat: ChatId, viewer: UserId) -> Result<Option<ChatDetail>, StoreError> {
        let Some(chat) = self.chat_rows(viewer, Some(chat)).await?.pop() else {
            return Ok(None);
        };
        let chat_id = chat.chat_id.get();
        let members = sqlx::query!(
            r#"SELECT cm.user_id, u.username, cm.role, cm.last_read_id
               FROM chat_members cm JOIN users u ON u.id = cm.user_id
               WHERE cm.chat_id = $1 ORDER BY cm.id"#,
            chat_id
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .map(|r| {
            Ok(Member {
                id: UserId(r.user_id),
                username: r.username,
                role: Role::parse(&r.role).ok_or_else(|| StoreError::internal("unknown role"))?,
                last_read_id: MessageId(r.last_read_id),
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(Some(ChatDetail { chat, members }))
    }

    #[tracing::instrument(name = "db.chats_of", skip_all, fields(db.system.name = "postgresql"))]
    async fn chats_of(&self, user: UserId) -> Result<Vec<Chat>, StoreError> {
        self.chat_rows(user, None).await
    }

    async fn submit(&self, msg: NewMessage, on_commit: OnCommit) -> Result<(), StoreError> {
        self.writer.submit(msg, on_commit).await
    }

    #[tracing::instrument(name = "db.history", skip_all, fields(db.system.name = "postgresql"))]
    async fn history(&self, chat: ChatId, page: HistoryPage) -> Result<MessagePage, StoreError> {
        let chat_id = chat.get();
        let limit = i64::from(page.limit());
        macro_rules! rows {
            ($order:literal, $after:expr, $before:expr) => {
                sqlx::query!(
                    r#"SELECT m.id, m.chat_id, u.username, m.sender_id, m.kind, m.content,
                              m.event, m.created_at
                       FROM messages m JOIN users u ON u.id = m.sender_id
                       WHERE m.chat_id = $1 AND m.id > $2 AND m.id < $3
                       ORDER BY m.id "#
                        + $order
                        + r#" LIMIT $4"#,
                    chat_id,
                    $after,
                    $before,
                    limit
                )
                .fetch_all(&self.read)
                .await?
                .into_iter()
                .map(|r| {
                    (
                        r.id,
                        r.chat_id,
                        r.username,
                        r.sender_id,
                        r.kind,
                        r.content,
                        r.event,
                        r.created_at,
                    )
                })
                .collect::<Vec<_>>()
            };
        }
        let rows = match page {
            HistoryPage::Latest { .. } => rows!("DESC", 0, i64::MAX),
            HistoryPage::Before { id, .. } => rows!("DESC", 0, id.get()),
            HistoryPage::After { id, .. } => rows!("ASC", id.get(), i64::MAX),
        };
        let mut out = MessagePage::with_capacity(rows.len(), 128 * rows.len());
        for (id, chat_id, sender, sender_id, kind, content, event, ts) in &rows {
            out.push(MessageRef {
                id: MessageId(*id),
                chat_id: ChatId(*chat_id),
                sender,
                sender_id: UserId(*sender_id),
                kind: message_kind(kind)?,
                content,
                event: event.as_deref(),
                timestamp: Timestamp(*ts),
            });
        }
        Ok(out.finish())
    }

    #[tracing::instrument(name = "db.messages_since", skip_all, fields(db.system.name = "postgresql", since = since.get()))]
    async fn messages_since(
        &self,
        user: UserId,
        since: MessageId,
        limit: u32,
    ) -> Result<Vec<ReplayedMessage>, StoreError> {
        let (user_id, since) = (user.get(), since.get());
        let limit = i64::from(limit);
        let rows = sqlx::query!(
            r#"SELECT m.id, m.chat_id, u.username AS sender, m.sender_id, m.kind,
                      m.content, m.event, m.created_at, m.client_msg_id
               FROM messages m JOIN users u ON u.id = m.sender_id
               WHERE m.id > $2
                 AND (m.chat_id IN (SELECT chat_id FROM chat_members WHERE user_id = $1)
                      OR (m.subject_id = $1 AND m.kind = 'member_removed'
                          AND m.chat_id NOT IN (SELECT chat_id FROM chat_members WHERE user_id = $1)))
               ORDER BY m.id ASC LIMIT $3"#,
            user_id,
            since,
            limit
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(ReplayedMessage {
                    message: Message {
                        id: MessageId(r.id),
                        chat_id: ChatId(r.chat_id),
                        sender: r.sender,
                        sender_id: UserId(r.sender_id),
                        kind: message_kind(&r.kind)?,
                        content: r.content,
                        event: r.event,
                        timestamp: Timestamp(r.created_at),
                    },
                    client_msg_id: r.client_msg_id,
                })
            })
            .collect()
    }

    async fn check(&self) -> Result<Health, StoreError> {
        self.record_pools();
        // (Not the SQLite backend's "SELECT 1 AS one": the offline query
        // data is keyed by the SQL text, one database per file.)
        sqlx::query_scalar!("SELECT 1::int4 AS ping")
            .fetch_one(&self.read)
            .await?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.read)
                .await?;
        Ok(Health {
            migrations_applied: MIGRATOR
                .iter()
                .all(|m| m.migration_type.is_up_migration() && applied.contains(&m.version)),
        })
    }

    async fn kept_signing_secret(&self) -> Result<Option<KeptSecret>, StoreError> {
        Ok(None)
    }

    fn describe(&self) -> String {
        self.url.to_string()
    }

    async fn close(&self) {
        self.writer.shutdown().await;
        self.read.close().await;
        self.write.close().await;
    }
}
