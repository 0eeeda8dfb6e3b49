//! The synchronous read path for history pages, the hottest read.
//!
//! sqlx's SQLite driver runs each connection on its own thread and moves
//! every query there and back over channels; on 2 cores those context
//! switches capped a 50-message page at about 8,000 requests per second
//! (perf: most time in futex wake/wait). Here the query runs on the calling
//! task's thread with a read-only rusqlite connection taken from a small
//! stack (the same bundled SQLite as sqlx), and the rows are serialized with
//! serde. That is safe to do inline because a page is at most 200 rows read
//! through an index in WAL mode, where readers never wait for the writer:
//! tens of microseconds. (Rendering the JSON inside SQLite instead, with
//! `json_group_array` and `strftime`, was slower once rows stopped crossing
//! threads.)

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

use super::{HistoryPage, Message, StoreError, Timestamp};

/// Connections kept for reuse; more are opened under load and dropped after.
const KEEP: usize = 8;

/// The page query; `$order` picks which end of the window the LIMIT keeps.
macro_rules! page_sql {
    ($order:literal) => {
        concat!(
            "SELECT m.id, m.chat_id, u.username, m.sender_id, m.content, m.created_at
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

fn db_err(e: rusqlite::Error) -> StoreError {
    StoreError::Io(std::sync::Arc::new(std::io::Error::other(format!(
        "sqlite read: {e}"
    ))))
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
        )
        .map_err(db_err)?;
        conn.busy_timeout(self.busy_timeout).map_err(db_err)?;
        Ok(conn)
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let taken = self.idle.lock().map(|mut v| v.pop()).unwrap_or(None);
        let conn = match taken {
            Some(c) => c,
            None => self.open()?,
        };
        let result = f(&conn).map_err(db_err);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < KEEP
        {
            idle.push(conn);
        }
        result
    }

    /// The page as the API's JSON array of messages, ascending by id.
    pub(super) fn history_json(
        &self,
        chat_id: i64,
        page: HistoryPage,
    ) -> Result<String, StoreError> {
        let (sql, after, before, limit, descending) = match page {
            HistoryPage::Latest { limit } => (LATEST_FIRST, 0, i64::MAX, limit, true),
            HistoryPage::Before { id, limit } => (LATEST_FIRST, 0, id, limit, true),
            HistoryPage::After { id, limit } => (OLDEST_FIRST, id, i64::MAX, limit, false),
        };
        let mut rows = self.with_conn(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let rows = stmt.query_map((chat_id, after, before, i64::from(limit)), |r| {
                Ok(Message {
                    id: r.get(0)?,
                    chat_id: r.get(1)?,
                    sender: r.get(2)?,
                    sender_id: r.get(3)?,
                    content: r.get(4)?,
                    timestamp: Timestamp(r.get(5)?),
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>()
        })?;
        if descending {
            rows.reverse();
        }
        serde_json::to_string(&rows).map_err(|e| StoreError::Io(std::sync::Arc::new(e.into())))
    }

    /// Drops the idle connections (the database is closing).
    pub(super) fn close(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}
