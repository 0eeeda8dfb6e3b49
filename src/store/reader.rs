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

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags};

use serde::Serialize;

#[cfg(test)]
use super::Message;
use super::{HistoryPage, StoreError, Timestamp};

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

/// A [`Message`] borrowed from the current row. Same fields in the same
/// order, so it serializes to the same JSON (a test compares the two).
#[derive(Serialize)]
struct MessageRef<'a> {
    id: i64,
    chat_id: i64,
    sender: &'a str,
    sender_id: i64,
    content: &'a str,
    timestamp: Timestamp,
}

pub(super) struct SyncReader {
    path: PathBuf,
    busy_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
}

fn io_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
    StoreError::Io(std::sync::Arc::new(std::io::Error::other(e)))
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

    /// The page as the API's JSON array of messages, ascending by id.
    ///
    /// Each row is serialized straight from SQLite's buffers (no `String`
    /// per field, no `Vec<Message>`), into one buffer; a descending read
    /// (the latest page, `before`) is then emitted in reverse row order.
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
        let (rows, ends) = self.with_conn(|c| {
            let mut stmt = c.prepare_cached(sql)?;
            let mut cursor = stmt.query((chat_id, after, before, i64::from(limit)))?;
            let mut rows = Vec::with_capacity(256 * limit as usize);
            let mut ends = Vec::with_capacity(limit as usize);
            while let Some(r) = cursor.next()? {
                let message = MessageRef {
                    id: r.get(0)?,
                    chat_id: r.get(1)?,
                    sender: r.get_ref(2)?.as_str().map_err(io_err)?,
                    sender_id: r.get(3)?,
                    content: r.get_ref(4)?.as_str().map_err(io_err)?,
                    timestamp: Timestamp(r.get(5)?),
                };
                serde_json::to_writer(&mut rows, &message).map_err(io_err)?;
                ends.push(rows.len());
            }
            Ok((rows, ends))
        })?;
        let mut spans: Vec<(usize, usize)> = ends
            .iter()
            .scan(0, |start, &end| Some((std::mem::replace(start, end), end)))
            .collect();
        if descending {
            spans.reverse();
        }
        let mut out = Vec::with_capacity(rows.len() + spans.len() + 2);
        out.push(b'[');
        for (i, (start, end)) in spans.into_iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&rows[start..end]);
        }
        out.push(b']');
        String::from_utf8(out)
            .map_err(|e| StoreError::Io(std::sync::Arc::new(std::io::Error::other(e))))
    }

    /// Drops the idle connections (the database is closing).
    pub(super) fn close(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_rows_serialize_like_messages() {
        let owned = Message {
            id: 7,
            chat_id: 3,
            sender: "ålice \"q\"".into(),
            sender_id: 2,
            content: "line\nbreak \u{1F600} </script>".into(),
            timestamp: Timestamp(1_795_485_166_123),
        };
        let borrowed = MessageRef {
            id: owned.id,
            chat_id: owned.chat_id,
            sender: &owned.sender,
            sender_id: owned.sender_id,
            content: &owned.content,
            timestamp: owned.timestamp,
        };
        assert_eq!(
            serde_json::to_string(&borrowed).unwrap(),
            serde_json::to_string(&owned).unwrap()
        );
    }
}
