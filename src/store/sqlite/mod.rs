//! The SQLite backend: one database file in WAL mode.
//!
//! * Every write goes through the writer thread ([`writer`]), the only
//!   owner of the write connection; message inserts are group-committed,
//!   so `synchronous = FULL` costs one fsync per batch, not per message.
//! * Reads use a read-only sqlx pool, and history pages a synchronous
//!   read path ([`reader`]).
//! * Ids come from SQLite's rowid (max + 1 under the single writer, rows
//!   never deleted): they grow in commit order with no gaps.
//! * Members of each chat are cached in memory, shared by the writer and
//!   the readers. Only the writer changes members, so it overwrites
//!   entries; a reader only fills a missing one (a reader's copy that
//!   raced a change never replaces the writer's).
//!
//! SQLite-only operations live here too: the file identity check, the
//! pragmas, `VACUUM INTO` backups, and the generated signing secret kept
//! next to the database file.

mod backup;
mod groups;
mod reader;
mod secret;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{
    Audience, Chat, ChatDetail, ChatKind, GroupChange, Health, HistoryPage, KeptSecret, Member,
    Message, MessageKind, MessagePage, NewGroup, NewMessage, OnCommit, ReadMarker, ReplayedMessage,
    Role, Store, StoreError, Timestamp, TokenCheck, User, UserRecord,
};
use crate::config::{DatabaseSettings, Synchronous};
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::CommitSink;

pub use backup::backup;
pub use secret::secret_path;

/// Embedded migrations (the same files `sqlx migrate run` applies).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Members of each chat, shared by the writer and the readers.
pub(crate) type Members = Arc<DashMap<ChatId, Audience>>;

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    writer: writer::WriterHandle,
    path: Arc<PathBuf>,
    members: Members,
    /// Device and inode of the database file when it was opened.
    identity: Option<(u64, u64)>,
    /// Whether the writer's last write failed.
    health: Arc<writer::WriteHealth>,
    /// Synchronous read connections for history pages.
    reader: Arc<reader::SyncReader>,
}

impl SqliteStore {
    /// Opens (creating if missing) the database, applies pending migrations
    /// and starts the writer thread. Committed messages are handed to
    /// `sink` in id order, after COMMIT.
    pub async fn open(
        settings: &DatabaseSettings,
        sink: Arc<dyn CommitSink>,
    ) -> Result<SqliteStore, StoreError> {
        let base = connect_options(&settings.url)?
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms))
            .foreign_keys(true);
        let path = base.get_filename().to_path_buf();

        // Migrations run with foreign-key enforcement off, as SQLite's
        // table rebuilds require (migrations/sqlite/*_groups.sql); every
        // key is checked right after.
        let mut write_conn = base
            .clone()
            .foreign_keys(false)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match settings.synchronous {
                Synchronous::Off => SqliteSynchronous::Off,
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
                Synchronous::Extra => SqliteSynchronous::Extra,
            })
            .connect()
            .await?;
        MIGRATOR.run(&mut write_conn).await?;
        let broken: Vec<(String, i64)> = sqlx::query_as("PRAGMA foreign_key_check")
            .fetch_all(&mut write_conn)
            .await?
            .into_iter()
            .map(|r: (String, i64, String, i64)| (r.0, r.1))
            .collect();
        if !broken.is_empty() {
            return Err(StoreError::internal(format!(
                "the database has rows whose foreign keys point nowhere (table, rowid): {broken:?}"
            )));
        }
        // The writer thread opens its own connection (see `writer.rs`).
        sqlx::Connection::close(write_conn).await?;

        let read = SqlitePoolOptions::new()
            .max_connections(settings.read_pool_size)
            .min_connections(settings.read_pool_size)
            // A local file does not go away between queries; a ping before
            // every acquire doubled the cost of a history page.
            .test_before_acquire(false)
            .connect_with(base.read_only(true))
            .await?;

        let members = Members::default();
        let health = Arc::new(writer::WriteHealth::default());
        let writer = writer::spawn(&path, settings, sink, members.clone(), health.clone())?;
        let identity = file_identity(&path);
        let reader = Arc::new(reader::SyncReader::new(
            path.clone(),
            Duration::from_millis(settings.busy_timeout_ms),
        ));
        Ok(SqliteStore {
            reader,
            read,
            writer,
            path: Arc::new(path),
            members,
            identity,
            health,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails when the database file is gone or was replaced since it was
    /// opened (a volume unmounted, the file deleted or moved): the open
    /// connections would keep working on a file nobody will see again.
    fn check_file(&self) -> Result<(), StoreError> {
        if self.identity.is_some() && file_identity(&self.path) != self.identity {
            return Err(StoreError::unavailable(
                "the database file is missing or was replaced",
            ));
        }
        Ok(())
    }

    /// The members of a chat (cached), or `None` if there is no such chat.
    async fn members_of(&self, chat: ChatId) -> Result<Option<Audience>, StoreError> {
        if let Some(m) = self.members.get(&chat) {
            return Ok(Some(m.clone()));
        }
        let chat_id = chat.get();
        let exists = sqlx::query_scalar!(r#"SELECT id AS "id!" FROM chats WHERE id = ?"#, chat_id)
            .fetch_optional(&self.read)
            .await?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let members: Audience = sqlx::query_scalar!(
            "SELECT user_id FROM chat_members WHERE chat_id = ? ORDER BY id",
            chat_id
        )
        .fetch_all(&self.read)
        .await?
        .into_iter()
        .map(UserId)
        .collect();
        Ok(Some(
            self.members.entry(chat).or_insert(members).value().clone(),
        ))
    }

    /// The chats of `user` (all, or only `only`), as the chat list shows them.
    async fn chat_rows(&self, user: UserId, only: Option<ChatId>) -> Result<Vec<Chat>, StoreError> {
        let user_id = user.get();
        let only = only.map(ChatId::get);
        let rows = sqlx::query!(
            r#"SELECT c.id AS "chat_id!", c.kind AS "kind!", c.title,
                      c.created_at AS "created_at!", me.last_read_id AS "last_read_id!",
                      (SELECT count(*) FROM chat_members x WHERE x.chat_id = c.id) AS "member_count!: i64",
                      p.id AS "peer_id?", p.username AS "peer_username?",
                      m.id AS "msg_id?", m.sender_id AS "msg_sender_id?",
                      s.username AS "msg_sender?", m.kind AS "msg_kind?",
                      m.content AS "msg_content?", m.event AS "msg_event?",
                      m.created_at AS "msg_created_at?",
                      (SELECT count(*) FROM messages u
                        WHERE u.chat_id = c.id AND u.id > me.last_read_id
                          AND u.kind = 'text' AND u.sender_id <> ?1) AS "unread_count!: i64"
               FROM chat_members me
               JOIN chats c ON c.id = me.chat_id
               LEFT JOIN users p ON c.kind = 'direct'
                    AND p.id = CASE WHEN c.user_a = ?1 THEN c.user_b ELSE c.user_a END
               LEFT JOIN messages m ON m.id = (SELECT max(id) FROM messages WHERE chat_id = c.id)
               LEFT JOIN users s ON s.id = m.sender_id
               WHERE me.user_id = ?1 AND (?2 IS NULL OR c.id = ?2)
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
impl Store for SqliteStore {
    #[tracing::instrument(name = "db.user_by_name", skip_all, fields(db.system.name = "sqlite"))]
    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError> {
        let row = sqlx::query!(
            r#"SELECT id AS "id!", username, password_hash, token_key FROM users WHERE username = ?"#,
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

    #[tracing::instrument(name = "db.token_check", skip_all, fields(db.system.name = "sqlite"))]
    async fn token_check(&self, user: UserId, jti: &str) -> Result<Option<TokenCheck>, StoreError> {
        let id = user.get();
        let row = sqlx::query!(
            r#"SELECT u.username, u.token_key,
                      EXISTS (SELECT 1 FROM revoked_tokens r WHERE r.jti = ?2) AS "revoked!: bool"
               FROM users u WHERE u.id = ?1"#,
            id,
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
        self.writer.set_password(user, password_hash).await
    }

    async fn revoke_token(&self, jti: &str, expires_at: i64) -> Result<(), StoreError> {
        self.writer.revoke_token(jti.to_string(), expires_at).await
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
        self.members_of(chat).await
    }

    #[tracing::instrument(name = "db.chat", skip_all, fields(db.system.name = "sqlite"))]
    async fn chat(&self, chat: ChatId, viewer: UserId) -> Result<Option<ChatDetail>, StoreError> {
        let Some(chat) = self.chat_rows(viewer, Some(chat)).await?.pop() else {
            return Ok(None);
        };
        let chat_id = chat.chat_id.get();
        let members = sqlx::query!(
            r#"SELECT cm.user_id, u.username, cm.role, cm.last_read_id
               FROM chat_members cm JOIN users u ON u.id = cm.user_id
               WHERE cm.chat_id = ? ORDER BY cm.id"#,
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

    #[tracing::instrument(name = "db.chats_of", skip_all, fields(db.system.name = "sqlite"))]
    async fn chats_of(&self, user: UserId) -> Result<Vec<Chat>, StoreError> {
        self.chat_rows(user, None).await
    }

    async fn submit(&self, msg: NewMessage, on_commit: OnCommit) -> Result<(), StoreError> {
        self.writer.submit(msg, on_commit).await
    }

    /// Read inline on the calling task (see `reader.rs`): a page is at most
    /// 200 rows through an index in WAL mode, where readers never wait for
    /// the writer, so it completes in tens of microseconds.
    #[tracing::instrument(name = "db.history", skip_all, fields(db.system.name = "sqlite"))]
    async fn history(&self, chat: ChatId, page: HistoryPage) -> Result<MessagePage, StoreError> {
        self.reader.page(chat, page)
    }

    #[tracing::instrument(name = "db.messages_since", skip_all, fields(db.system.name = "sqlite", since = since.get()))]
    async fn messages_since(
        &self,
        user: UserId,
        since: MessageId,
        limit: u32,
    ) -> Result<Vec<ReplayedMessage>, StoreError> {
        let (user_id, since) = (user.get(), since.get());
        let limit = i64::from(limit);
        let rows = sqlx::query!(
            r#"SELECT m.id AS "id!", m.chat_id, u.username AS sender, m.sender_id, m.kind,
                      m.content, m.event, m.created_at, m.client_msg_id
               FROM messages m JOIN users u ON u.id = m.sender_id
               WHERE m.id > ?2
                 AND (m.chat_id IN (SELECT chat_id FROM chat_members WHERE user_id = ?1)
                      OR (m.subject_id = ?1 AND m.kind = 'member_removed'
                          AND m.chat_id NOT IN (SELECT chat_id FROM chat_members WHERE user_id = ?1)))
               ORDER BY m.id ASC LIMIT ?3"#,
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
        self.check_file()?;
        if let Some(error) = self.health.failing() {
            // Not ready while writes fail; one write that succeeds (this
            // probe, or a send) makes it ready again.
            if let Err(e) = self.writer.probe().await {
                return Err(StoreError::unavailable(format!(
                    "writes are failing: {e} (last: {error})"
                )));
            }
        }
        sqlx::query_scalar!("SELECT 1 AS one")
            .fetch_one(&self.read)
            .await?;
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success = 1")
                .fetch_all(&self.read)
                .await?;
        Ok(Health {
            migrations_applied: MIGRATOR
                .iter()
                .all(|m| m.migration_type.is_up_migration() && applied.contains(&m.version)),
        })
    }

    async fn kept_signing_secret(&self) -> Result<Option<KeptSecret>, StoreError> {
        let path = secret_path(&self.path);
        let secret = secret::load_or_create(&path).map_err(|e| {
            StoreError::Unavailable(Arc::new(std::io::Error::new(
                e.kind(),
                format!(
                    "reading or creating the signing secret at {}: {e}",
                    path.display()
                ),
            )))
        })?;
        Ok(Some(KeptSecret {
            secret,
            location: path.display().to_string(),
        }))
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }

    async fn close(&self) {
        self.writer.shutdown().await;
        self.reader.close();
        self.read.close().await;
    }
}

/// Accepts `sqlite:PATH`, `sqlite://PATH` (with `?` options) or a plain path.
fn connect_options(url: &str) -> Result<SqliteConnectOptions, StoreError> {
    let opts = if url.starts_with("sqlite:") {
        SqliteConnectOptions::from_str(url)?
    } else {
        SqliteConnectOptions::new().filename(url)
    };
    Ok(opts)
}

#[cfg(unix)]
pub(super) fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
pub(super) fn file_identity(_path: &Path) -> Option<(u64, u64)> {
    None
}

// ---- driver errors → StoreError ----

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let unavailable = matches!(&e, rusqlite::Error::SqliteFailure(f, _)
            if super::error::sqlite_code_unavailable(f.extended_code & 0xff));
        if unavailable {
            StoreError::Unavailable(Arc::new(e))
        } else {
            StoreError::Internal(Arc::new(e))
        }
    }
}
