//! The synchronous read path for history pages, the hottest read: a
//! read-only rusqlite connection taken from a small stack, used on the
//! calling task's thread, rows copied straight from SQLite's buffers into
//! one [`MessagePage`]. Safe inline because a page is at most 200 rows read
//! through an index in WAL mode, where readers never wait for the writer.
//! Why not the sqlx pool: docs/decisions/0005-history-read-path.md.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{HistoryPage, MessageKind, MessagePage, MessageRef, StoreError, Timestamp};

/// Connections kept for reuse; more are opened under load and dropped after.
const KEEP: usize = 8;

/// The page query; `$order` picks which end of the window the LIMIT keeps.
macro_rules! page_sql {
    ($order:literal) => {
        concat!(
            "SELECT m.id, m.chat_id, u.username, m.sender_id, m.content, m.created_at, m.kind, m.event
             FROM messages m JOIN users u ON u.id = m.sender_id
             WHERE m.chat_id = ?1 AND m.id > ?2 AND m.id < ?3
             ORDER BY m.id ",
            $order,
            " LIMIT ?4"
        )
    };
}

const LATEST_FIRST: &str = page_sql!("DESC");
const OLDEST_FIRST: &str = page_sql!("ASC");

pub(super) struct SyncReader {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

fn not_utf8(e: rusqlite::types::FromSqlError) -> StoreError {
    StoreError::internal(format!("a stored text is not UTF-8: {e}"))
}

impl SyncReader {
    pub(super) fn new(path: PathBuf, busy_timeout: Duration) -> Self {
        SyncReader {
            path,
            busy_timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        // The query planner stability guarantee: one plan per statement,
        // whatever the bound values. Without it SQLite (3.47+) plans with
        // the value bound to `LIMIT ?`, so rebinding it expires the cached
        // statement and every page was parsed and planned again (perf:
        // `sqlite3Reprepare` under `sqlite3_step`, about a tenth of the
        // request).
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
        Ok(conn)
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let taken = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        let conn = match taken {
            Some(c) => c,
            None => self.open()?,
        };
        let result = f(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < KEEP
        {
            idle.push(conn);
        }
        result
    }

    /// A page of `chat`'s history, ascending by id. A descending read (the
    /// latest page, `before`) keeps the newest rows and is put in order at
    /// the end.
    pub(super) fn page(&self, chat: ChatId, page: HistoryPage) -> Result<MessagePage, StoreError> {
        let (sql, after, before) = match page {
            HistoryPage::Latest { .. } => (LATEST_FIRST, 0, i64::MAX),
            HistoryPage::Before { id, .. } => (LATEST_FIRST, 0, id.get()),
            HistoryPage::After { id, .. } => (OLDEST_FIRST, id.get(), i64::MAX),
        };
        let limit = page.limit();
        self.with_conn(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let mut cursor = stmt.query((chat.get(), after, before, i64::from(limit)))?;
            let mut out = MessagePage::with_capacity(limit as usize, 128 * limit as usize);
            while let Some(r) = cursor.next()? {
                let kind = r.get_ref(6)?.as_str().map_err(not_utf8)?;
                out.push(MessageRef {
                    id: MessageId(r.get(0)?),
                    chat_id: ChatId(r.get(1)?),
                    sender: r.get_ref(2)?.as_str().map_err(not_utf8)?,
                    sender_id: UserId(r.get(3)?),
                    kind: MessageKind::parse(kind)
                        .ok_or_else(|| StoreError::internal("unknown message kind"))?,
                    content: r.get_ref(4)?.as_str().map_err(not_utf8)?,
                    event: r.get_ref(7)?.as_str_or_null().map_err(not_utf8)?,
                    timestamp: Timestamp(r.get(5)?),
                });
            }
            Ok(out.finish())
        })
    }

    /// Drops the idle connections (the database is closing).
    pub(super) fn close(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}
