//! Rules that both the HTTP API and the WebSocket protocol apply: accounts
//! (login, registration, token checks), chats and membership, read markers
//! and typing, and input validation. Handlers
//! parse the wire format and call in here; this module knows nothing of
//! HTTP or sockets.

pub mod accounts;
pub mod chats;
mod error;
pub mod membership;
pub mod validate;

pub use accounts::{Accounts, Session};
pub use chats::{Chats, Notify};
pub use error::DomainError;
