//! Credentials: password hashing and access tokens.

pub mod jwt;
pub mod password;

pub use jwt::{Claims, JwtKeys, TokenError};
pub use password::PasswordHasher;

use crate::ids::UserId;

/// Whom a verified token was issued to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: UserId,
    pub username: String,
}
