//! Durable state in SQLite.
//!
//! * One write connection, owned by the writer thread ([`writer`]), through
//!   which every write goes: message inserts are group-committed, so
//!   `synchronous=FULL` costs one fsync per batch rather than per message.
//! * A separate read-only pool for queries (history, chat list, look-ups).
//!
//! The public surface is [`Store`] and the plain data types below; nothing
//! here knows about HTTP or WebSocket. A later PostgreSQL backend would
//! implement the same methods.

mod chats;
mod messages;
mod reader;
mod time;
mod users;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use sqlx::ConnectOptions;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use crate::config::{DatabaseSettings, Synchronous};

pub use chats::ChatSummary;
pub use messages::{HistoryPage, Message, PendingSend, ReplayedMessage};
pub use time::Timestamp;
pub use users::{User, UserRecord};
pub use writer::{CommitSink, NewMessage, NoopSink, OnCommit, SendOutcome, StoredMessage};

/// Embedded migrations (the same files `sqlx migrate run` applies).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("chat not found")]
    ChatNotFound,
    #[error("the store is shut down")]
    Closed,
    #[error("database error: {0}")]
    Database(Arc<sqlx::Error>),
    /// From the rusqlite connections (the writer and the history reader).
    #[error("database error: {0}")]
    Sqlite(Arc<rusqlite::Error>),
    #[error("migration error: {0}")]
    Migrate(Arc<sqlx::migrate::MigrateError>),
    #[error("{0}")]
    Io(Arc<std::io::Error>),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(Arc::new(e))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Sqlite(Arc::new(e))
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Migrate(Arc::new(e))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    read: SqlitePool,
    writer: writer::WriterHandle,
    path: Arc<PathBuf>,
    /// Members of each chat. Chats never change members, so entries never go stale.
    members: Arc<DashMap<i64, [i64; 2]>>,
    /// Device and inode of the database file when it was opened.
    identity: Option<(u64, u64)>,
    /// Synchronous read connections for history pages.
    reader: Arc<reader::SyncReader>,
}

impl Store {
    /// Opens (creating if missing) the database, applies pending migrations
    /// and starts the writer task. Committed messages are handed to `sink`
    /// in id order, after COMMIT.
    pub async fn open(
        settings: &DatabaseSettings,
        sink: Arc<dyn CommitSink>,
    ) -> Result<Store, StoreError> {
        let base = connect_options(&settings.url)?
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms))
            .foreign_keys(true);
        let path = base.get_filename().to_path_buf();

        let mut write_conn = base
            .clone()
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

        let writer = writer::spawn(&path, settings, sink)?;
        let identity = file_identity(&path);
        let reader = Arc::new(reader::SyncReader::new(
            path.clone(),
            Duration::from_millis(settings.busy_timeout_ms),
        ));
        Ok(Store {
            reader,
            read,
            writer,
            path: Arc::new(path),
            members: Arc::new(DashMap::new()),
            identity,
        })
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fails when the database file is gone or was replaced since it was
    /// opened (a volume unmounted, the file deleted or moved): the open
    /// connections would keep working on a file nobody will see again.
    pub fn check_file(&self) -> Result<(), StoreError> {
        if self.identity.is_some() && file_identity(&self.path) != self.identity {
            return Err(StoreError::Io(Arc::new(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the database file is missing or was replaced",
            ))));
        }
        Ok(())
    }

    /// One round trip to the database through the read pool.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query_scalar!("SELECT 1 AS one")
            .fetch_one(&self.read)
            .await?;
        Ok(())
    }

    /// True when every embedded migration has been applied.
    pub async fn migrations_applied(&self) -> Result<bool, StoreError> {
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success = 1")
                .fetch_all(&self.read)
                .await?;
        Ok(MIGRATOR
            .iter()
            .all(|m| m.migration_type.is_up_migration() && applied.contains(&m.version)))
    }

    /// Lets every write already queued commit and reply, then stops the
    /// writer and closes the connections. Later writes fail with `Closed`.
    pub async fn close(&self) {
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
fn file_identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn file_identity(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What [`backup`] copied.
#[derive(Debug, Clone, Copy)]
pub struct BackupReport {
    pub bytes: u64,
    pub users: i64,
    pub chats: i64,
    pub messages: i64,
}

/// Writes a consistent online copy of the database at `url` to `target`
/// with `VACUUM INTO` (a snapshot: writers keep going meanwhile), then
/// checks the copy with `PRAGMA integrity_check`. `target` must not exist.
pub async fn backup(url: &str, target: &Path) -> Result<BackupReport, StoreError> {
    if target.exists() {
        return Err(StoreError::Io(Arc::new(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} already exists; choose a new file", target.display()),
        ))));
    }
    let target_str = target.to_str().ok_or_else(|| {
        StoreError::Io(Arc::new(std::io::Error::other("backup path is not UTF-8")))
    })?;
    let mut source = connect_options(url)?
        .read_only(true)
        .busy_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    sqlx::query("VACUUM INTO ?")
        .bind(target_str)
        .execute(&mut source)
        .await?;
    let _ = sqlx::Connection::close(source).await;

    let mut copy = SqliteConnectOptions::new()
        .filename(target)
        .read_only(true)
        .connect()
        .await?;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await?;
    if check != "ok" {
        return Err(StoreError::Io(Arc::new(std::io::Error::other(format!(
            "integrity_check of the copy failed: {check}"
        )))));
    }
    let count = |table: &'static str| format!("SELECT count(*) FROM {table}");
    let mut report = BackupReport {
        bytes: std::fs::metadata(target)?.len(),
        users: 0,
        chats: 0,
        messages: 0,
    };
    for (table, slot) in [
        ("users", &mut report.users),
        ("chats", &mut report.chats),
        ("messages", &mut report.messages),
    ] {
        *slot = sqlx::query_scalar(sqlx::AssertSqlSafe(count(table)))
            .fetch_one(&mut copy)
            .await?;
    }
    let _ = sqlx::Connection::close(copy).await;
    Ok(report)
}
