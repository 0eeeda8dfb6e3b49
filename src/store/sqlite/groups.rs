//! Group chats, membership and read markers on the writer's connection:
//! each call runs inside one of the writer's transactions, so a change is
//! checked (`domain::membership`) and applied with no other write between.
//! Every effect of a change is stored as a timeline event: a message with
//! its own id from the same sequence as the chat's text messages.

use std::sync::Arc;

use rusqlite::{OptionalExtension, Transaction, params};
use serde_json::json;

use crate::domain::membership::{self, Effect, Refusal, Roster};
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{
    Audience, ChatKind, GroupChange, Message, MessageKind, NewGroup, ReadMarker, Role, StoreError,
    StoredMessage, Timestamp,
};

/// What a group write did: its events (in id order, each with its
/// audience) and the chat's members afterwards.
pub(super) struct Applied {
    pub events: Vec<Arc<StoredMessage>>,
    pub members: Audience,
}

const INSERT_EVENT: &str =
    "INSERT INTO messages (chat_id, sender_id, content, created_at, kind, event, subject_id)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

/// Creates the group, its members (the creator first, as admin) and its
/// `chat_created` event.
pub(super) fn create(
    tx: &Transaction<'_>,
    group: &NewGroup,
    ts: i64,
) -> Result<(ChatId, Applied), StoreError> {
    let chat = ChatId(
        tx.prepare_cached(
            "INSERT INTO chats (kind, title, created_at) VALUES ('group', ?1, ?2) RETURNING id",
        )?
        .query_row(params![group.title, ts], |r| r.get(0))?,
    );
    let mut insert =
        tx.prepare_cached("INSERT INTO chat_members (chat_id, user_id, role) VALUES (?1, ?2, ?3)")?;
    insert.execute(params![
        chat.get(),
        group.creator.get(),
        Role::Admin.as_str()
    ])?;
    for user in &group.members {
        insert.execute(params![chat.get(), user.get(), Role::Member.as_str()])?;
    }
    let members: Audience = std::iter::once(group.creator)
        .chain(group.members.iter().copied())
        .collect();
    let creator = username(tx, group.creator)?;
    let event = insert_event(
        tx,
        Event {
            chat,
            actor: group.creator,
            actor_name: &creator,
            kind: MessageKind::ChatCreated,
            content: membership::describe_created(&creator, &group.title),
            details: json!({ "title": group.title }),
            subject: None,
            audience: members.clone(),
        },
        ts,
    )?;
    Ok((
        chat,
        Applied {
            events: vec![event],
            members,
        },
    ))
}

/// Checks and applies `change` by `actor`.
pub(super) fn change(
    tx: &Transaction<'_>,
    chat: ChatId,
    actor: UserId,
    change: &GroupChange,
    max_members: usize,
    ts: i64,
) -> Result<Applied, StoreError> {
    let (kind, title, mut members) =
        roster(tx, chat)?.ok_or(StoreError::Refused(Refusal::NotMember))?;
    let effects = membership::plan(
        Roster {
            kind,
            title: title.as_deref(),
            members: &members,
        },
        actor,
        change,
        max_members,
    )
    .map_err(StoreError::Refused)?;
    let actor_name = username(tx, actor)?;
    let mut events = Vec::with_capacity(effects.len());
    for effect in &effects {
        // Who receives the event: the members before it and after it (the
        // added user gets `member_added`, the removed one `member_removed`).
        let before: Vec<UserId> = members.iter().map(|(u, _)| *u).collect();
        apply(tx, chat, effect, &mut members)?;
        let mut audience = before;
        for (u, _) in &members {
            if !audience.contains(u) {
                audience.push(*u);
            }
        }
        let subject = effect.subject();
        let subject_name = subject.map(|u| username(tx, u)).transpose()?;
        let details = match effect {
            Effect::Added(u) | Effect::Removed(u) => {
                json!({ "user": { "id": u, "username": subject_name } })
            }
            Effect::RoleChanged { user, role, .. } => {
                json!({ "user": { "id": user, "username": subject_name }, "role": role.as_str() })
            }
            Effect::TitleChanged(title) => json!({ "title": title }),
        };
        events.push(insert_event(
            tx,
            Event {
                chat,
                actor,
                actor_name: &actor_name,
                kind: effect.kind(),
                content: membership::describe(effect, &actor_name, subject_name.as_deref()),
                details,
                subject,
                audience: audience.into(),
            },
            ts,
        )?);
    }
    Ok(Applied {
        events,
        members: members.iter().map(|(u, _)| *u).collect(),
    })
}

/// Writes one effect and keeps `members` (join order) up to date.
fn apply(
    tx: &Transaction<'_>,
    chat: ChatId,
    effect: &Effect,
    members: &mut Vec<(UserId, Role)>,
) -> Result<(), StoreError> {
    match effect {
        Effect::Added(user) => {
            tx.prepare_cached(
                "INSERT INTO chat_members (chat_id, user_id, role) VALUES (?1, ?2, 'member')",
            )?
            .execute(params![chat.get(), user.get()])?;
            members.push((*user, Role::Member));
        }
        Effect::Removed(user) => {
            tx.prepare_cached("DELETE FROM chat_members WHERE chat_id = ?1 AND user_id = ?2")?
                .execute(params![chat.get(), user.get()])?;
            members.retain(|(u, _)| u != user);
        }
        Effect::RoleChanged { user, role, .. } => {
            tx.prepare_cached(
                "UPDATE chat_members SET role = ?3 WHERE chat_id = ?1 AND user_id = ?2",
            )?
            .execute(params![chat.get(), user.get(), role.as_str()])?;
            for (u, r) in members.iter_mut() {
                if u == user {
                    *r = *role;
                }
            }
        }
        Effect::TitleChanged(title) => {
            tx.prepare_cached("UPDATE chats SET title = ?2 WHERE id = ?1")?
                .execute(params![chat.get(), title])?;
        }
    }
    Ok(())
}

/// Moves `user`'s marker in `chat` forward to `up_to`.
pub(super) fn mark_read(
    tx: &Transaction<'_>,
    chat: ChatId,
    user: UserId,
    up_to: MessageId,
) -> Result<ReadMarker, StoreError> {
    let current: i64 = tx
        .prepare_cached(
            "SELECT last_read_id FROM chat_members WHERE chat_id = ?1 AND user_id = ?2",
        )?
        .query_row(params![chat.get(), user.get()], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::Refused(Refusal::NotMember))?;
    let latest: i64 = tx
        .prepare_cached("SELECT coalesce(max(id), 0) FROM messages WHERE chat_id = ?1")?
        .query_row([chat.get()], |r| r.get(0))?;
    membership::check_marker(up_to, MessageId(latest)).map_err(StoreError::Refused)?;
    let moved = up_to.get() > current;
    let marker = current.max(up_to.get());
    if moved {
        tx.prepare_cached(
            "UPDATE chat_members SET last_read_id = ?3 WHERE chat_id = ?1 AND user_id = ?2",
        )?
        .execute(params![chat.get(), user.get(), marker])?;
    }
    let unread: i64 = tx
        .prepare_cached(
            "SELECT count(*) FROM messages
             WHERE chat_id = ?1 AND id > ?2 AND kind = 'text' AND sender_id <> ?3",
        )?
        .query_row(params![chat.get(), marker, user.get()], |r| r.get(0))?;
    Ok(ReadMarker {
        chat_id: chat,
        last_read_id: MessageId(marker),
        unread_count: unread as u64,
        moved,
    })
}

/// The chat's kind, title and members in join order; `None` if there is
/// no such chat.
type RosterRows = (ChatKind, Option<String>, Vec<(UserId, Role)>);

fn roster(tx: &Transaction<'_>, chat: ChatId) -> Result<Option<RosterRows>, StoreError> {
    let Some((kind, title)) = tx
        .prepare_cached("SELECT kind, title FROM chats WHERE id = ?1")?
        .query_row([chat.get()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .optional()?
    else {
        return Ok(None);
    };
    let kind = ChatKind::parse(&kind).ok_or_else(|| StoreError::internal("unknown chat kind"))?;
    let mut stmt =
        tx.prepare_cached("SELECT user_id, role FROM chat_members WHERE chat_id = ?1 ORDER BY id")?;
    let members = stmt
        .query_map([chat.get()], |r| {
            Ok((UserId(r.get(0)?), r.get::<_, String>(1)?))
        })?
        .map(|row| {
            let (user, role) = row?;
            let role = Role::parse(&role).ok_or_else(|| StoreError::internal("unknown role"))?;
            Ok((user, role))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some((kind, title, members)))
}

fn username(tx: &Transaction<'_>, user: UserId) -> Result<String, StoreError> {
    tx.prepare_cached("SELECT username FROM users WHERE id = ?1")?
        .query_row([user.get()], |r| r.get(0))
        .optional()?
        .ok_or(StoreError::NotFound(crate::store::Entity::User))
}

struct Event<'a> {
    chat: ChatId,
    actor: UserId,
    actor_name: &'a str,
    kind: MessageKind,
    content: String,
    details: serde_json::Value,
    subject: Option<UserId>,
    audience: Audience,
}

fn insert_event(
    tx: &Transaction<'_>,
    e: Event<'_>,
    ts: i64,
) -> Result<Arc<StoredMessage>, StoreError> {
    let details = e.details.to_string();
    tx.prepare_cached(INSERT_EVENT)?.execute(params![
        e.chat.get(),
        e.actor.get(),
        e.content,
        ts,
        e.kind.as_str(),
        details,
        e.subject.map(UserId::get),
    ])?;
    Ok(Arc::new(StoredMessage {
        message: Message {
            id: MessageId(tx.last_insert_rowid()),
            chat_id: e.chat,
            sender: e.actor_name.to_string(),
            sender_id: e.actor,
            kind: e.kind,
            content: e.content,
            event: Some(details),
            timestamp: Timestamp(ts),
        },
        client_msg_id: None,
        audience: e.audience,
    }))
}
