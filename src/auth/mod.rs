//! Credentials: password hashing and access tokens.

pub mod jwt;
pub mod password;

pub use jwt::{Claims, JwtKeys, TokenError, Verified};
pub use password::PasswordHasher;

use std::sync::Arc;

use crate::ids::UserId;

/// Whom a verified token was issued to, and the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub id: UserId,
    /// The account's stored username.
    pub username: String,
    pub token: Arc<TokenRef>,
}

/// What identifies a token after it was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRef {
    /// The token's id (`jti`): what `POST /logout` revokes.
    pub jti: String,
    /// The account's token key it was issued with.
    pub key: String,
    /// Unix seconds.
    pub expires_at: u64,
}
