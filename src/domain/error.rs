//! The domain's error: what went wrong, with the stable code clients see.
//! `http` renders it as a JSON error response, `ws` as an error frame.

use std::time::Duration;

use crate::store::{Entity, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// Input that is well-formed but not acceptable (422 over HTTP):
    /// `invalid_username`, `invalid_password`, `password_required`,
    /// `invalid_target`, `invalid_content`, ...
    #[error("{message}")]
    Invalid { code: &'static str, message: String },
    #[error("invalid username or password")]
    InvalidCredentials,
    #[error("invalid or expired token")]
    InvalidToken,
    /// A request that is malformed in a way the wire format cannot catch
    /// (400 over HTTP), e.g. a read marker above the chat's latest message.
    #[error("{0}")]
    BadRequest(String),
    /// A member without the right (e.g. not an admin).
    #[error("only a group admin can do this")]
    Forbidden,
    #[error("username is already taken")]
    UsernameTaken,
    #[error("user not found")]
    UserNotFound,
    /// No such chat, or the caller is not in it (existence is not leaked).
    #[error("chat not found")]
    ChatNotFound,
    #[error("too many attempts; retry later")]
    RateLimited { retry_after: Duration },
    /// The database is unreachable or the server is shutting down.
    #[error("the service is unavailable; retry later")]
    Unavailable,
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl DomainError {
    pub fn invalid(code: &'static str, message: impl Into<String>) -> DomainError {
        DomainError::Invalid {
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for DomainError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(Entity::Chat) => DomainError::ChatNotFound,
            StoreError::NotFound(Entity::User) => DomainError::UserNotFound,
            StoreError::Refused(refusal) => refusal.into(),
            StoreError::Unavailable(source) => {
                tracing::warn!(error = %source, "the database is unavailable");
                DomainError::Unavailable
            }
            other => DomainError::Internal(other.into()),
        }
    }
}

impl From<anyhow::Error> for DomainError {
    fn from(e: anyhow::Error) -> Self {
        DomainError::Internal(e)
    }
}
