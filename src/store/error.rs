//! The store's error: what went wrong in terms the callers can act on,
//! whichever database is behind it. The driver's own error is kept as the
//! source, for logs; it is never shown to clients.

use std::fmt;
use std::sync::Arc;

use crate::domain::membership::Refusal;

/// A driver error, kept for logs.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// What a [`StoreError::NotFound`] or [`StoreError::Conflict`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entity {
    User,
    Chat,
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Entity::User => "user",
            Entity::Chat => "chat",
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The row the call is about does not exist (or is not the caller's).
    #[error("{0} not found")]
    NotFound(Entity),
    /// The write contradicts stored state (e.g. a unique name taken).
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// A change the chat's rules do not allow (checked in the same
    /// transaction as the change).
    #[error("refused: {0:?}")]
    Refused(Refusal),
    /// The database cannot be reached or the store is shut down; nothing
    /// was written. Retrying later may succeed.
    #[error("the database is unavailable: {0}")]
    Unavailable(Source),
    /// Anything else: a bug, a corrupt row, an unexpected driver error.
    #[error("database error: {0}")]
    Internal(Source),
}

impl StoreError {
    /// The store is shut down (after [`super::Store::close`]).
    pub fn closed() -> StoreError {
        StoreError::unavailable("the store is shut down")
    }

    /// An internal error with a plain description.
    pub fn internal(what: impl Into<String>) -> StoreError {
        StoreError::Internal(Arc::new(Plain(what.into())))
    }

    /// An unavailable database with a plain description.
    pub fn unavailable(what: impl Into<String>) -> StoreError {
        StoreError::Unavailable(Arc::new(Plain(what.into())))
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

#[derive(Debug)]
struct Plain(String);

impl fmt::Display for Plain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Plain {}

// ---- driver errors → StoreError (the only place that knows them all) ----

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| code_unavailable(&c)),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(Arc::new(e))
        } else {
            StoreError::Internal(Arc::new(e))
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        StoreError::Internal(Arc::new(e))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Unavailable(Arc::new(e))
    }
}

/// A database error code that means "the database cannot be used right
/// now" rather than "this statement is wrong": SQLite's numeric codes, or
/// PostgreSQL's SQLSTATEs.
fn code_unavailable(code: &str) -> bool {
    match code.parse::<i32>() {
        Ok(sqlite) => sqlite_code_unavailable(sqlite & 0xff),
        // 08: connection exception; 53: insufficient resources; 57P0x:
        // shut down or starting up; 25006: read-only transaction (a standby).
        Err(_) => {
            code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P0")
                || code == "25006"
        }
    }
}

/// SQLite's primary result codes BUSY, LOCKED, READONLY, IOERR, FULL and
/// CANTOPEN: the file cannot be used right now.
pub(super) fn sqlite_code_unavailable(primary: i32) -> bool {
    [5, 6, 8, 10, 13, 14].contains(&primary)
}
