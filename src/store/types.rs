//! The plain data the storage interface takes and returns. None of it
//! knows how it is stored or how it is shown to clients.

use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use secrecy::SecretString;

use super::{StoreError, Timestamp};
use crate::ids::{ChatId, MessageId, UserId};

/// An account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: UserId,
    pub username: String,
}

/// A user with the stored credential, for login.
#[derive(Debug, Clone)]
pub struct UserRecord {
    pub user: User,
    /// argon2id PHC string; `None` for accounts created without a password.
    pub password_hash: Option<String>,
    /// The account's random token key (see [`TokenCheck`]).
    pub token_key: String,
}

/// What a token of an account is checked against on every request.
#[derive(Debug, Clone)]
pub struct TokenCheck {
    /// The stored username (frames use it, not the token's claim).
    pub username: String,
    /// Random per account, replaced by a password change: a token carries
    /// the key it was issued with, so it never matches an account created
    /// later with the same id (after a restore), nor one whose password
    /// changed since.
    pub token_key: String,
    /// The token's id was revoked (`POST /logout`).
    pub revoked: bool,
}

/// What a message is: text sent by a user, or a timeline event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Text,
    ChatCreated,
    MemberAdded,
    MemberRemoved,
    RoleChanged,
    TitleChanged,
}

impl MessageKind {
    pub const ALL: [MessageKind; 6] = [
        MessageKind::Text,
        MessageKind::ChatCreated,
        MessageKind::MemberAdded,
        MessageKind::MemberRemoved,
        MessageKind::RoleChanged,
        MessageKind::TitleChanged,
    ];

    /// The name stored and shown to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Text => "text",
            MessageKind::ChatCreated => "chat_created",
            MessageKind::MemberAdded => "member_added",
            MessageKind::MemberRemoved => "member_removed",
            MessageKind::RoleChanged => "role_changed",
            MessageKind::TitleChanged => "title_changed",
        }
    }

    pub fn parse(name: &str) -> Option<MessageKind> {
        MessageKind::ALL.into_iter().find(|k| k.as_str() == name)
    }
}

/// A chat's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChatKind {
    /// Exactly two members, created by `/chats/initiate`, fixed.
    Direct,
    /// 1 to `chats.max_members` members with roles.
    Group,
}

impl ChatKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatKind::Direct => "direct",
            ChatKind::Group => "group",
        }
    }

    pub fn parse(name: &str) -> Option<ChatKind> {
        match name {
            "direct" => Some(ChatKind::Direct),
            "group" => Some(ChatKind::Group),
            _ => None,
        }
    }
}

/// A member's role in a group (direct chats' members are `Member`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// A stored message: text, or a timeline event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: MessageId,
    pub chat_id: ChatId,
    /// The sender's username (for an event: who made the change).
    pub sender: String,
    pub sender_id: UserId,
    pub kind: MessageKind,
    /// The text; for an event a readable sentence (`"alice added bob"`).
    pub content: String,
    /// An event's details as a JSON object; `None` for text.
    pub event: Option<String>,
    pub timestamp: Timestamp,
}

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub chat_id: ChatId,
    pub sender_id: UserId,
    /// The sender's username, carried along so the writer need not look it up.
    pub sender: Arc<str>,
    pub content: String,
    pub client_msg_id: Option<String>,
}

/// Who receives a committed message: the users whose connections get it.
pub type Audience = Arc<[UserId]>;

/// A committed message, the idempotency key it was sent with, and its
/// audience as of its commit.
#[derive(Debug)]
pub struct StoredMessage {
    pub message: Message,
    pub client_msg_id: Option<String>,
    pub audience: Audience,
}

#[derive(Debug, Clone)]
pub enum SendOutcome {
    /// Stored now.
    Created(Arc<StoredMessage>),
    /// The sender used this `client_msg_id` before; nothing new was stored.
    Duplicate(Arc<StoredMessage>),
}

impl SendOutcome {
    pub fn stored(&self) -> &Arc<StoredMessage> {
        match self {
            SendOutcome::Created(m) | SendOutcome::Duplicate(m) => m,
        }
    }
}

/// Receives a submitted message's outcome after COMMIT (right after the
/// message was handed to the [`CommitSink`]), or an error when it was not
/// stored. It may run on the store's writer thread: it must not block.
pub type OnCommit = Box<dyn FnOnce(Result<SendOutcome, StoreError>) + Send + Sync>;

/// Receives every newly committed message, in id order, right after
/// COMMIT (the WebSocket hub). It may run on the store's writer thread:
/// it must not block.
pub trait CommitSink: Send + Sync + 'static {
    /// `committed_at` is when COMMIT returned.
    fn committed(&self, message: &Arc<StoredMessage>, committed_at: Instant);
}

/// A sink that drops everything (tools and tests of the store alone).
pub struct NoopSink;

impl CommitSink for NoopSink {
    fn committed(&self, _message: &Arc<StoredMessage>, _committed_at: Instant) {}
}

/// The other nodes of a deployment as a store sees them (NATS, in
/// `crate::cluster`): where this node's commits are announced and where
/// theirs arrive. Only a hint: a store that misses an announcement reads
/// the database, so nothing depends on the link being reliable.
pub struct Peers {
    pub link: Arc<dyn PeerLink>,
    /// Batches other nodes committed, in the order they arrived.
    pub incoming: tokio::sync::mpsc::Receiver<Vec<Arc<StoredMessage>>>,
}

pub trait PeerLink: Send + Sync + 'static {
    /// Announces messages this node committed. Never blocks; may drop.
    fn publish(&self, batch: &[Arc<StoredMessage>]);
    /// Whether announcements can arrive right now.
    fn connected(&self) -> bool;
}

/// Which window of a chat's history to read. Results are always ascending by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryPage {
    /// The latest `limit` messages.
    Latest { limit: u32 },
    /// The `limit` messages just older than `id`.
    Before { id: MessageId, limit: u32 },
    /// The first `limit` messages newer than `id` (0: from the first).
    After { id: MessageId, limit: u32 },
}

impl HistoryPage {
    pub fn limit(self) -> u32 {
        match self {
            HistoryPage::Latest { limit }
            | HistoryPage::Before { limit, .. }
            | HistoryPage::After { limit, .. } => limit,
        }
    }
}

/// A page of history, ascending by id. The rows' text lives in one buffer
/// (a page is read often and shown once: no allocation per field).
#[derive(Debug, Default)]
pub struct MessagePage {
    text: String,
    rows: Vec<PageRow>,
}

#[derive(Debug)]
struct PageRow {
    id: MessageId,
    chat_id: ChatId,
    sender_id: UserId,
    kind: MessageKind,
    timestamp: Timestamp,
    sender: Range<usize>,
    content: Range<usize>,
    event: Option<Range<usize>>,
}

/// One message of a [`MessagePage`], borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MessageRef<'a> {
    pub id: MessageId,
    pub chat_id: ChatId,
    pub sender: &'a str,
    pub sender_id: UserId,
    pub kind: MessageKind,
    pub content: &'a str,
    /// An event's details as a JSON object.
    pub event: Option<&'a str>,
    pub timestamp: Timestamp,
}

impl MessagePage {
    /// An empty page with room for `rows` messages of `bytes` text in all.
    pub fn with_capacity(rows: usize, bytes: usize) -> MessagePage {
        MessagePage {
            text: String::with_capacity(bytes),
            rows: Vec::with_capacity(rows),
        }
    }

    /// Appends a row; rows may be pushed in either order, see [`Self::finish`].
    pub fn push(&mut self, m: MessageRef<'_>) {
        let sender = self.append(m.sender);
        let content = self.append(m.content);
        let event = m.event.map(|e| self.append(e));
        self.rows.push(PageRow {
            id: m.id,
            chat_id: m.chat_id,
            sender_id: m.sender_id,
            kind: m.kind,
            timestamp: m.timestamp,
            sender,
            content,
            event,
        });
    }

    fn append(&mut self, s: &str) -> Range<usize> {
        let start = self.text.len();
        self.text.push_str(s);
        start..self.text.len()
    }

    /// Puts the rows in ascending id order (a backend that read them
    /// newest first pushes them so, then calls this).
    pub fn finish(mut self) -> MessagePage {
        if self.rows.first().map(|r| r.id) > self.rows.last().map(|r| r.id) {
            self.rows.reverse();
        }
        self
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes of text (senders and contents) in the page.
    pub fn text_len(&self) -> usize {
        self.text.len()
    }

    /// The messages, ascending by id.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = MessageRef<'_>> + '_ {
        self.rows.iter().map(|r| MessageRef {
            id: r.id,
            chat_id: r.chat_id,
            sender: &self.text[r.sender.clone()],
            sender_id: r.sender_id,
            kind: r.kind,
            content: &self.text[r.content.clone()],
            event: r.event.clone().map(|e| &self.text[e]),
            timestamp: r.timestamp,
        })
    }
}

/// A chat as one of its members sees it.
#[derive(Debug, Clone)]
pub struct Chat {
    pub chat_id: ChatId,
    pub kind: ChatKind,
    /// Groups only.
    pub title: Option<String>,
    /// Direct chats only: the other member.
    pub peer: Option<User>,
    pub member_count: u32,
    pub created_at: Timestamp,
    pub last_message: Option<Message>,
    /// The viewer's read marker.
    pub last_read_id: MessageId,
    /// Text messages above the viewer's marker not sent by the viewer.
    pub unread_count: u64,
}

/// A member of a chat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: UserId,
    pub username: String,
    pub role: Role,
    pub last_read_id: MessageId,
}

/// A chat with its members, in join order.
#[derive(Debug, Clone)]
pub struct ChatDetail {
    pub chat: Chat,
    pub members: Vec<Member>,
}

/// A new group.
#[derive(Debug, Clone)]
pub struct NewGroup {
    pub creator: UserId,
    pub title: String,
    /// The other members (not the creator), without duplicates.
    pub members: Vec<UserId>,
}

/// A change to a group's membership or title, made by a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupChange {
    AddMember(UserId),
    RemoveMember(UserId),
    SetRole(UserId, Role),
    SetTitle(String),
}

/// A read marker after `mark_read`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadMarker {
    pub chat_id: ChatId,
    pub last_read_id: MessageId,
    pub unread_count: u64,
    /// The marker moved (a lower or equal `up_to` changes nothing).
    pub moved: bool,
}

/// A message replayed on resume, with its idempotency key (shown to its sender).
#[derive(Debug, Clone)]
pub struct ReplayedMessage {
    pub message: Message,
    pub client_msg_id: Option<String>,
}

/// What the readiness probe learns from the store. An unreachable
/// database is an `Err` of the call instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    /// Every embedded migration is applied.
    pub migrations_applied: bool,
}

/// A signing secret the store keeps for the server (SQLite: a file next to
/// the database), and where, for the log.
pub struct KeptSecret {
    pub secret: SecretString,
    pub location: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, content: &str) -> MessageRef<'_> {
        MessageRef {
            id: MessageId(id),
            chat_id: ChatId(1),
            sender: "alice",
            sender_id: UserId(2),
            kind: MessageKind::Text,
            content,
            event: None,
            timestamp: Timestamp(id),
        }
    }

    #[test]
    fn a_page_read_newest_first_comes_out_ascending() {
        let mut page = MessagePage::with_capacity(3, 0);
        for (id, c) in [(9, "c"), (7, "b"), (3, "a")] {
            page.push(row(id, c));
        }
        let page = page.finish();
        let got: Vec<_> = page.iter().map(|m| (m.id.get(), m.content)).collect();
        assert_eq!(got, vec![(3, "a"), (7, "b"), (9, "c")]);
        assert!(page.iter().all(|m| m.sender == "alice"));
    }
}
