//! Credentials: password hashing and access tokens.

pub mod jwt;
pub mod password;

pub use jwt::{Claims, JwtKeys, TokenError};
pub use password::PasswordHasher;
