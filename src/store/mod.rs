//! The storage interface: everything the server keeps, behind one trait.
//!
//! * [`Store`] is what the rest of the application calls; every call is
//!   async and fails with the driver-neutral [`StoreError`].
//! * Message writes are submitted in order and answered after COMMIT; the
//!   store hands each committed message, with its audience, to a
//!   [`CommitSink`] (the WebSocket hub) in id order, before the answer.
//! * Message ids grow in commit order: every id above N is a resume point.
//! * [`open`] picks the backend from the database URL: `sqlite` (one node;
//!   only it knows file checks, pragmas, `VACUUM INTO`) or `postgres`
//!   (one node or several on one database).
//!
//! Nothing here knows about HTTP or WebSocket.

mod error;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;
mod time;
#[cfg(all(feature = "sqlite", feature = "postgres"))]
pub mod transfer;
mod types;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::config::{Backend, ClusterSettings, DatabaseSettings};
use crate::ids::{ChatId, MessageId, UserId};

pub use error::{Entity, Source, StoreError};
pub use time::Timestamp;
pub use types::{
    Audience, Chat, ChatDetail, ChatKind, CommitSink, GroupChange, Health, HistoryPage, KeptSecret,
    Member, Message, MessageKind, MessagePage, MessageRef, NewGroup, NewMessage, NoopSink,
    OnCommit, PeerLink, Peers, ReadMarker, ReplayedMessage, Role, SendOutcome, StoredMessage,
    TokenCheck, User, UserRecord,
};

/// The storage interface. A trait object (`Arc<dyn Store>`) rather than an
/// enum of backends: each backend is a self-contained module that can be
/// read (and tested) alone, and the compiler holds both to one contract.
/// The boxed futures cost an allocation per call, next to a database
/// round trip or a queue hop.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    // ---- accounts ----

    /// Looks a user up by name, case-insensitively.
    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>, StoreError>;

    /// The account `user` as a token with id `jti` is checked against;
    /// `None` when there is no such account.
    async fn token_check(&self, user: UserId, jti: &str) -> Result<Option<TokenCheck>, StoreError>;

    /// Sets a new password hash and a new token key (every token issued
    /// before stops working); returns the new key, `None` if no account.
    async fn set_password(
        &self,
        user: UserId,
        password_hash: String,
    ) -> Result<Option<String>, StoreError>;

    /// Revokes the token `jti` until `expires_at` (Unix seconds).
    async fn revoke_token(&self, jti: &str, expires_at: i64) -> Result<(), StoreError>;

    /// Creates an account; `Ok(None)` when the name is taken (in any case).
    async fn create_user(
        &self,
        username: &str,
        password_hash: Option<String>,
    ) -> Result<Option<User>, StoreError>;

    // ---- chats ----

    /// Returns the direct chat of `a` and `b`, creating it if needed; the
    /// flag says whether it was created now. Concurrent calls by either
    /// side converge on one chat.
    async fn initiate_direct_chat(
        &self,
        a: UserId,
        b: UserId,
    ) -> Result<(ChatId, bool), StoreError>;

    /// Creates a group with its `chat_created` event; the creator is its
    /// admin, the others members.
    async fn create_group(&self, group: NewGroup) -> Result<ChatId, StoreError>;

    /// Applies a member's change to a group, checked against the rules
    /// (`domain::membership`) in the same transaction; each effect is a
    /// timeline event, committed and fanned out like a message. Refusals
    /// are [`StoreError::Refused`].
    async fn change_group(
        &self,
        chat: ChatId,
        actor: UserId,
        change: GroupChange,
        max_members: usize,
    ) -> Result<(), StoreError>;

    /// Moves `user`'s read marker in `chat` forward to `up_to` (a lower
    /// value changes nothing).
    async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        up_to: MessageId,
    ) -> Result<ReadMarker, StoreError>;

    /// The current members of a chat, or `None` if there is no such chat.
    async fn members(&self, chat: ChatId) -> Result<Option<Audience>, StoreError>;

    /// True when `user` is a member of `chat` (false also when there is no such chat).
    async fn is_member(&self, chat: ChatId, user: UserId) -> Result<bool, StoreError> {
        Ok(self.members(chat).await?.is_some_and(|m| m.contains(&user)))
    }

    /// The chat with its members as `viewer` sees it; `None` when `viewer`
    /// is not a member (or there is no such chat).
    async fn chat(&self, chat: ChatId, viewer: UserId) -> Result<Option<ChatDetail>, StoreError>;

    /// The user's chats, most recent activity (last message, else creation) first.
    async fn chats_of(&self, user: UserId) -> Result<Vec<Chat>, StoreError>;

    // ---- messages ----

    /// Queues a message and returns once it is queued; `on_commit` gets
    /// the outcome after COMMIT (see [`OnCommit`]). Messages submitted one
    /// after another are committed, fanned out and answered in that order,
    /// so a connection can pipeline sends. A repeated `(sender,
    /// client_msg_id)` is answered with the original. On an error here
    /// `on_commit` is dropped uncalled.
    async fn submit(&self, msg: NewMessage, on_commit: OnCommit) -> Result<(), StoreError>;

    /// A page of a chat's history, ascending by id.
    async fn history(&self, chat: ChatId, page: HistoryPage) -> Result<MessagePage, StoreError>;

    /// What resume replays: messages with an id greater than `since` from
    /// the chats the user is a member of now, and the `member_removed`
    /// events of the chats the user was removed from (and is not back in),
    /// ascending, at most `limit`.
    async fn messages_since(
        &self,
        user: UserId,
        since: MessageId,
        limit: u32,
    ) -> Result<Vec<ReplayedMessage>, StoreError>;

    // ---- operations ----

    /// One round trip to the database, and whether migrations are applied.
    async fn check(&self) -> Result<Health, StoreError>;

    /// The signing secret this store keeps for the server, created on
    /// first use; `None` when this backend keeps none (the secret must
    /// then come from the configuration).
    async fn kept_signing_secret(&self) -> Result<Option<KeptSecret>, StoreError>;

    /// Where the data lives, for logs (no credentials).
    fn describe(&self) -> String;

    /// Lets every write already queued commit and answer, then stops the
    /// writer and closes the connections. Later calls fail with
    /// [`StoreError::Unavailable`].
    async fn close(&self);

    /// Stores a message and waits for the outcome ([`Store::submit`]).
    async fn send_message(&self, msg: NewMessage) -> Result<SendOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.submit(
            msg,
            Box::new(move |outcome| {
                let _ = tx.send(outcome);
            }),
        )
        .await?;
        rx.await.unwrap_or_else(|_| Err(StoreError::closed()))
    }
}

/// Opens the store named by `settings.url` (creating and migrating it as
/// needed). Committed messages are handed to `sink`, in id order.
pub async fn open(
    settings: &DatabaseSettings,
    cluster: &ClusterSettings,
    sink: Arc<dyn CommitSink>,
) -> Result<Arc<dyn Store>, StoreError> {
    open_with_peers(settings, cluster, sink, None).await
}

/// [`open`], on a node that hears of other nodes' commits through `peers`
/// (PostgreSQL only).
pub async fn open_with_peers(
    settings: &DatabaseSettings,
    cluster: &ClusterSettings,
    sink: Arc<dyn CommitSink>,
    peers: Option<Peers>,
) -> Result<Arc<dyn Store>, StoreError> {
    let _ = (cluster, &peers);
    match settings.backend() {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite if peers.is_none() => {
            Ok(Arc::new(sqlite::SqliteStore::open(settings, sink).await?))
        }
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => Err(StoreError::internal(
            "a SQLite database serves one node: cluster.nats_url needs PostgreSQL",
        )),
        #[cfg(feature = "postgres")]
        Backend::Postgres => Ok(Arc::new(
            postgres::PgStore::open(settings, cluster, sink, peers).await?,
        )),
        #[allow(unreachable_patterns)]
        other => Err(StoreError::internal(format!(
            "this build has no {other:?} backend"
        ))),
    }
}

/// What [`backup`] copied.
#[derive(Debug, Clone)]
pub struct BackupReport {
    pub bytes: u64,
    pub users: i64,
    pub chats: i64,
    pub messages: i64,
}

/// Why `shindensen backup` does not copy a PostgreSQL database.
pub const POSTGRES_BACKUP_ADVICE: &str = "shindensen backup copies SQLite databases. \
For PostgreSQL use its own tools, which copy a consistent snapshot while nodes keep writing: \
`pg_dump --format=custom --file=shindensen.dump \"$DATABASE_URL\"` (restore with pg_restore into an \
empty database), or your platform's backups and point-in-time recovery";

/// Writes a consistent online copy of the database at `settings.url` to
/// `target` and checks it. `target` must not exist. SQLite only.
#[cfg_attr(not(feature = "sqlite"), allow(unused_variables))]
pub async fn backup(
    settings: &DatabaseSettings,
    target: &Path,
) -> Result<BackupReport, StoreError> {
    match settings.backend() {
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => sqlite::backup(&settings.url, target).await,
        _ => Err(StoreError::internal(POSTGRES_BACKUP_ADVICE)),
    }
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
