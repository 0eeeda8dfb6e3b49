//! Chats as both the HTTP API and the WebSocket protocol use them: direct
//! chats, groups and their members, history access, read markers and
//! typing.
//!
//! * Every call is made by a member; a chat the caller is not in is
//!   `ChatNotFound`, exactly like a chat that does not exist.
//! * Membership changes are checked and applied by the store in one
//!   transaction (`domain::membership` has the rules).
//! * Read and typing notices are not stored as timeline entries; they go
//!   to the members' connections through [`Notify`].

use std::sync::Arc;
use std::time::Duration;

use super::{DomainError, validate};
use crate::auth::Identity;
use crate::config::ChatSettings;
use crate::ids::{ChatId, MessageId, UserId};
use crate::ratelimit::KeyedLimiter;
use crate::store::{
    Chat, ChatDetail, GroupChange, HistoryPage, MessagePage, NewGroup, ReadMarker, Role, Store,
};
use crate::telemetry::metrics as m;

/// A connection, as the node that holds it knows it.
pub type ConnId = u64;

/// A member's read marker moved.
#[derive(Debug, Clone)]
pub struct ReadNotice {
    pub chat: ChatId,
    pub user: UserId,
    pub username: Arc<str>,
    pub up_to: MessageId,
    /// The connection that moved it, which is not told.
    pub except: Option<ConnId>,
}

/// A member is typing.
#[derive(Debug, Clone)]
pub struct TypingNotice {
    pub chat: ChatId,
    pub user: UserId,
    pub username: Arc<str>,
}

/// Where read and typing notices go: to the connections of `audience`
/// (the hub on one node). Must not block.
pub trait Notify: Send + Sync + 'static {
    /// To every connection of `audience` but `notice.except`.
    fn read(&self, notice: &ReadNotice, audience: &[UserId]);
    /// To every connection of `audience` but the typist's own.
    fn typing(&self, notice: &TypingNotice, audience: &[UserId]);
}

pub struct Chats {
    store: Arc<dyn Store>,
    notify: Arc<dyn Notify>,
    limits: ChatSettings,
    typing: KeyedLimiter<(UserId, ChatId)>,
}

impl Chats {
    pub fn new(
        store: Arc<dyn Store>,
        notify: Arc<dyn Notify>,
        limits: ChatSettings,
        typing_interval: Duration,
    ) -> Chats {
        Chats {
            store,
            notify,
            limits,
            // One token per interval: at most one typing notice per user
            // and chat in each.
            typing: KeyedLimiter::new(1, typing_interval),
        }
    }

    /// The direct chat of `me` and the user named `target`, created if
    /// needed; the flag says whether it was created now.
    pub async fn initiate_direct(
        &self,
        me: &Identity,
        target: &str,
    ) -> Result<(ChatId, bool), DomainError> {
        let target = self
            .store
            .user_by_name(target)
            .await?
            .ok_or(DomainError::UserNotFound)?;
        if target.user.id == me.id {
            return Err(DomainError::invalid(
                "invalid_target",
                "you cannot start a chat with yourself",
            ));
        }
        Ok(self
            .store
            .initiate_direct_chat(me.id, target.user.id)
            .await?)
    }

    /// Creates a group of `creator` (its admin) and the users named in
    /// `members`; duplicates and the creator's own name are ignored. An
    /// unknown name creates nothing.
    pub async fn create_group(
        &self,
        creator: &Identity,
        title: &str,
        members: &[String],
    ) -> Result<ChatDetail, DomainError> {
        let title = self.title(title)?;
        let mut ids: Vec<UserId> = Vec::with_capacity(members.len());
        for name in members {
            let user = self
                .store
                .user_by_name(name)
                .await?
                .ok_or(DomainError::UserNotFound)?;
            if user.user.id != creator.id && !ids.contains(&user.user.id) {
                ids.push(user.user.id);
            }
            if ids.len() + 1 > self.limits.max_members {
                return Err(too_many_members(self.limits.max_members));
            }
        }
        let chat = self
            .store
            .create_group(NewGroup {
                creator: creator.id,
                title,
                members: ids,
            })
            .await?;
        self.detail(chat, creator.id).await
    }

    /// The chat with its members.
    pub async fn detail(&self, chat: ChatId, viewer: UserId) -> Result<ChatDetail, DomainError> {
        self.store
            .chat(chat, viewer)
            .await?
            .ok_or(DomainError::ChatNotFound)
    }

    /// The viewer's chats, most recent activity first.
    pub async fn list(&self, viewer: UserId) -> Result<Vec<Chat>, DomainError> {
        Ok(self.store.chats_of(viewer).await?)
    }

    /// A page of history, for members only.
    pub async fn history(
        &self,
        chat: ChatId,
        viewer: UserId,
        page: HistoryPage,
    ) -> Result<MessagePage, DomainError> {
        if !self.store.is_member(chat, viewer).await? {
            return Err(DomainError::ChatNotFound);
        }
        Ok(self.store.history(chat, page).await?)
    }

    pub async fn rename(
        &self,
        chat: ChatId,
        actor: UserId,
        title: &str,
    ) -> Result<ChatDetail, DomainError> {
        let title = self.title(title)?;
        self.change(chat, actor, GroupChange::SetTitle(title))
            .await?;
        self.detail(chat, actor).await
    }

    /// Adds the user named `username`; already a member changes nothing.
    pub async fn add_member(
        &self,
        chat: ChatId,
        actor: UserId,
        username: &str,
    ) -> Result<ChatDetail, DomainError> {
        // A caller who is not a member learns nothing about the names.
        if !self.store.is_member(chat, actor).await? {
            return Err(DomainError::ChatNotFound);
        }
        let user = self
            .store
            .user_by_name(username)
            .await?
            .ok_or(DomainError::UserNotFound)?;
        self.change(chat, actor, GroupChange::AddMember(user.user.id))
            .await?;
        self.detail(chat, actor).await
    }

    pub async fn set_role(
        &self,
        chat: ChatId,
        actor: UserId,
        user: UserId,
        role: Role,
    ) -> Result<ChatDetail, DomainError> {
        self.change(chat, actor, GroupChange::SetRole(user, role))
            .await?;
        self.detail(chat, actor).await
    }

    /// Removes `user` (an admin removing a member, or a member leaving).
    pub async fn remove_member(
        &self,
        chat: ChatId,
        actor: UserId,
        user: UserId,
    ) -> Result<(), DomainError> {
        self.change(chat, actor, GroupChange::RemoveMember(user))
            .await
    }

    async fn change(
        &self,
        chat: ChatId,
        actor: UserId,
        change: GroupChange,
    ) -> Result<(), DomainError> {
        Ok(self
            .store
            .change_group(chat, actor, change, self.limits.max_members)
            .await?)
    }

    /// Moves `reader`'s marker forward; when it moved, every connection of
    /// every member but `except` is told.
    pub async fn mark_read(
        &self,
        chat: ChatId,
        reader: &Identity,
        up_to: MessageId,
        except: Option<ConnId>,
    ) -> Result<ReadMarker, DomainError> {
        let marker = self.store.mark_read(chat, reader.id, up_to).await?;
        if marker.moved {
            metrics::counter!(m::READ_MARKERS).increment(1);
            if let Some(audience) = self.store.members(chat).await? {
                let notice = ReadNotice {
                    chat,
                    user: reader.id,
                    username: reader.username.as_str().into(),
                    up_to: marker.last_read_id,
                    except,
                };
                self.notify.read(&notice, &audience);
            }
        }
        Ok(marker)
    }

    /// Tells the other members that `typist` is typing, at most once per
    /// `ws.typing_interval_ms` per user and chat (extra calls are dropped).
    pub async fn typing(&self, chat: ChatId, typist: &Identity) -> Result<(), DomainError> {
        let audience = self
            .store
            .members(chat)
            .await?
            .filter(|m| m.contains(&typist.id))
            .ok_or(DomainError::ChatNotFound)?;
        if self.typing.try_take(&(typist.id, chat)).is_err() {
            metrics::counter!(m::TYPING_THROTTLED).increment(1);
            return Ok(());
        }
        let notice = TypingNotice {
            chat,
            user: typist.id,
            username: typist.username.as_str().into(),
        };
        self.notify.typing(&notice, &audience);
        Ok(())
    }

    /// A group title: 1..=`chats.max_title_chars` characters, not only
    /// whitespace, no control characters.
    fn title(&self, title: &str) -> Result<String, DomainError> {
        validate::title(title, self.limits.max_title_chars)
            .map_err(|why| DomainError::invalid("invalid_title", why))?;
        Ok(title.to_string())
    }
}

fn too_many_members(max: usize) -> DomainError {
    DomainError::invalid(
        "too_many_members",
        format!("a group has at most {max} members (chats.max_members)"),
    )
}

impl From<crate::domain::membership::Refusal> for DomainError {
    fn from(r: crate::domain::membership::Refusal) -> Self {
        use crate::domain::membership::Refusal;
        match r {
            Refusal::NotMember => DomainError::ChatNotFound,
            Refusal::NotAGroup => {
                DomainError::invalid("not_a_group", "direct chats have no member operations")
            }
            Refusal::Forbidden => DomainError::Forbidden,
            Refusal::TargetNotMember => DomainError::UserNotFound,
            Refusal::TooManyMembers => {
                DomainError::invalid("too_many_members", "the group is full (chats.max_members)")
            }
            Refusal::BeyondLatest => {
                DomainError::BadRequest("up_to is above the chat's latest message id".into())
            }
        }
    }
}
