//! Accounts, chats, membership and read markers on PostgreSQL. Every write
//! that creates timeline events takes the stream lock first
//! ([`lock_stream`]), so it is serialized with every send on every node;
//! the membership rules (`domain::membership`) are checked inside that
//! transaction, against what is committed.

use std::sync::Arc;

use serde_json::json;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};

use crate::domain::membership::{self, Effect, Refusal, Roster};
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{
    Audience, ChatKind, Entity, GroupChange, Message, MessageKind, NewGroup, ReadMarker, Role,
    StoreError, StoredMessage, Timestamp, User,
};

/// Takes the stream lock (held to COMMIT) and returns the last id assigned.
pub(super) async fn lock_stream(tx: &mut PgConnection) -> Result<StreamHead, StoreError> {
    let r = sqlx::query!(
        r#"SELECT s.last_id AS "last_id!",
                  COALESCE((SELECT m.created_at FROM messages m WHERE m.id = s.last_id), 0) AS "last_ts!"
           FROM stream s WHERE s.id = 1 FOR UPDATE OF s"#
    )
    .fetch_one(tx)
    .await?;
    Ok(StreamHead {
        last_id: r.last_id,
        last_ts: r.last_ts,
    })
}

/// The stream's position when its lock was taken.
pub(super) struct StreamHead {
    /// The last id assigned.
    pub last_id: i64,
    /// That message's timestamp: every node's next timestamp is at least
    /// this, so timestamps never go backwards in id order, whatever the
    /// nodes' clocks say and across restarts.
    pub last_ts: i64,
}

impl StreamHead {
    /// `now` raised to the stream's last timestamp.
    pub fn timestamp(&self, now: i64) -> i64 {
        now.max(self.last_ts)
    }
}

/// Records `last` as the last id assigned (under the lock).
pub(super) async fn advance_stream(tx: &mut PgConnection, last: i64) -> Result<(), StoreError> {
    sqlx::query!("UPDATE stream SET last_id = $1 WHERE id = 1", last)
        .execute(tx)
        .await?;
    Ok(())
}

pub(super) async fn create_user(
    pool: &PgPool,
    username: &str,
    password_hash: Option<&str>,
    ts: i64,
) -> Result<Option<User>, StoreError> {
    let id = sqlx::query_scalar!(
        "INSERT INTO users (username, password_hash, created_at) VALUES ($1, $2, $3)
         ON CONFLICT (lower(username)) DO NOTHING RETURNING id",
        username,
        password_hash,
        ts
    )
    .fetch_optional(pool)
    .await?;
    Ok(id.map(|id| User {
        id: UserId(id),
        username: username.to_string(),
    }))
}

/// The direct chat of `a` and `b`, created (with its two members) if
/// needed. The ordered pair is unique, so concurrent calls from any node
/// converge on one chat.
pub(super) async fn initiate_chat(
    pool: &PgPool,
    a: UserId,
    b: UserId,
    ts: i64,
) -> Result<(ChatId, bool), StoreError> {
    let (lo, hi) = if a < b { (a, b) } else { (b, a) };
    let mut tx = pool.begin().await?;
    let created = sqlx::query_scalar!(
        "INSERT INTO chats (kind, user_a, user_b, created_at) VALUES ('direct', $1, $2, $3)
         ON CONFLICT (user_a, user_b) DO NOTHING RETURNING id",
        lo.get(),
        hi.get(),
        ts
    )
    .fetch_optional(&mut *tx)
    .await?;
    let result = match created {
        Some(id) => {
            sqlx::query!(
                "INSERT INTO chat_members (chat_id, user_id, role)
                 VALUES ($1, $2, 'member'), ($1, $3, 'member')",
                id,
                lo.get(),
                hi.get()
            )
            .execute(&mut *tx)
            .await?;
            (ChatId(id), true)
        }
        None => {
            let id = sqlx::query_scalar!(
                "SELECT id FROM chats WHERE user_a = $1 AND user_b = $2",
                lo.get(),
                hi.get()
            )
            .fetch_one(&mut *tx)
            .await?;
            (ChatId(id), false)
        }
    };
    tx.commit().await?;
    Ok(result)
}

/// Creates a group, its members and its `chat_created` event.
pub(super) async fn create_group(
    pool: &PgPool,
    group: &NewGroup,
    ts: i64,
) -> Result<(ChatId, Vec<Arc<StoredMessage>>), StoreError> {
    let mut tx = pool.begin().await?;
    let head = lock_stream(&mut tx).await?;
    let (last, ts) = (head.last_id, head.timestamp(ts));
    let chat = ChatId(
        sqlx::query_scalar!(
            "INSERT INTO chats (kind, title, created_at) VALUES ('group', $1, $2) RETURNING id",
            group.title,
            ts
        )
        .fetch_one(&mut *tx)
        .await?,
    );
    let users: Vec<i64> = std::iter::once(group.creator)
        .chain(group.members.iter().copied())
        .map(UserId::get)
        .collect();
    let roles: Vec<String> = (0..users.len())
        .map(|i| {
            if i == 0 { Role::Admin } else { Role::Member }
                .as_str()
                .to_string()
        })
        .collect();
    sqlx::query!(
        "INSERT INTO chat_members (chat_id, user_id, role)
         SELECT $1, u, r FROM unnest($2::bigint[], $3::text[]) WITH ORDINALITY AS t(u, r, n) ORDER BY n",
        chat.get(),
        &users,
        &roles
    )
    .execute(&mut *tx)
    .await?;
    let creator = username(&mut tx, group.creator).await?;
    let audience: Audience = users.iter().map(|u| UserId(*u)).collect();
    let event = insert_event(
        &mut tx,
        Event {
            id: last + 1,
            chat,
            actor: group.creator,
            actor_name: &creator,
            kind: MessageKind::ChatCreated,
            content: membership::describe_created(&creator, &group.title),
            details: json!({ "title": group.title }),
            subject: None,
            audience,
        },
        ts,
    )
    .await?;
    advance_stream(&mut tx, last + 1).await?;
    tx.commit().await?;
    Ok((chat, vec![event]))
}

/// Checks and applies `change` by `actor`; returns its events in id order.
pub(super) async fn change(
    pool: &PgPool,
    chat: ChatId,
    actor: UserId,
    change: &GroupChange,
    max_members: usize,
    ts: i64,
) -> Result<(ChatId, Vec<Arc<StoredMessage>>), StoreError> {
    let mut tx = pool.begin().await?;
    let head = lock_stream(&mut tx).await?;
    let (mut last, ts) = (head.last_id, head.timestamp(ts));
    let (kind, title, mut members) = roster(&mut tx, chat)
        .await?
        .ok_or(StoreError::Refused(Refusal::NotMember))?;
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
    if effects.is_empty() {
        tx.rollback().await?;
        return Ok((chat, Vec::new()));
    }
    let actor_name = username(&mut tx, actor).await?;
    let mut events = Vec::with_capacity(effects.len());
    for effect in &effects {
        let before: Vec<UserId> = members.iter().map(|(u, _)| *u).collect();
        apply(&mut tx, chat, effect, &mut members).await?;
        let mut audience = before;
        for (u, _) in &members {
            if !audience.contains(u) {
                audience.push(*u);
            }
        }
        let subject = effect.subject();
        let subject_name = match subject {
            Some(u) => Some(username(&mut tx, u).await?),
            None => None,
        };
        let details = match effect {
            Effect::Added(u) | Effect::Removed(u) => {
                json!({ "user": { "id": u, "username": subject_name } })
            }
            Effect::RoleChanged { user, role, .. } => {
                json!({ "user": { "id": user, "username": subject_name }, "role": role.as_str() })
            }
            Effect::TitleChanged(title) => json!({ "title": title }),
        };
        last += 1;
        events.push(
            insert_event(
                &mut tx,
                Event {
                    id: last,
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
            )
            .await?,
        );
    }
    advance_stream(&mut tx, last).await?;
    tx.commit().await?;
    Ok((chat, events))
}

async fn apply(
    tx: &mut PgConnection,
    chat: ChatId,
    effect: &Effect,
    members: &mut Vec<(UserId, Role)>,
) -> Result<(), StoreError> {
    let chat_id = chat.get();
    match effect {
        Effect::Added(user) => {
            sqlx::query!(
                "INSERT INTO chat_members (chat_id, user_id, role) VALUES ($1, $2, 'member')",
                chat_id,
                user.get()
            )
            .execute(tx)
            .await?;
            members.push((*user, Role::Member));
        }
        Effect::Removed(user) => {
            sqlx::query!(
                "DELETE FROM chat_members WHERE chat_id = $1 AND user_id = $2",
                chat_id,
                user.get()
            )
            .execute(tx)
            .await?;
            members.retain(|(u, _)| u != user);
        }
        Effect::RoleChanged { user, role, .. } => {
            sqlx::query!(
                "UPDATE chat_members SET role = $3 WHERE chat_id = $1 AND user_id = $2",
                chat_id,
                user.get(),
                role.as_str()
            )
            .execute(tx)
            .await?;
            for (u, r) in members.iter_mut() {
                if u == user {
                    *r = *role;
                }
            }
        }
        Effect::TitleChanged(title) => {
            sqlx::query!("UPDATE chats SET title = $2 WHERE id = $1", chat_id, title)
                .execute(tx)
                .await?;
        }
    }
    Ok(())
}

/// Moves `user`'s marker in `chat` forward to `up_to`.
pub(super) async fn mark_read(
    pool: &PgPool,
    chat: ChatId,
    user: UserId,
    up_to: MessageId,
) -> Result<ReadMarker, StoreError> {
    let (chat_id, user_id) = (chat.get(), user.get());
    let mut tx = pool.begin().await?;
    let current = sqlx::query_scalar!(
        "SELECT last_read_id FROM chat_members WHERE chat_id = $1 AND user_id = $2 FOR UPDATE",
        chat_id,
        user_id
    )
    .fetch_optional(&mut *tx)
    .await?
    .ok_or(StoreError::Refused(Refusal::NotMember))?;
    let latest = sqlx::query_scalar!(
        r#"SELECT coalesce(max(id), 0) AS "latest!" FROM messages WHERE chat_id = $1"#,
        chat_id
    )
    .fetch_one(&mut *tx)
    .await?;
    membership::check_marker(up_to, MessageId(latest)).map_err(StoreError::Refused)?;
    let moved = up_to.get() > current;
    let marker = current.max(up_to.get());
    if moved {
        sqlx::query!(
            "UPDATE chat_members SET last_read_id = $3 WHERE chat_id = $1 AND user_id = $2",
            chat_id,
            user_id,
            marker
        )
        .execute(&mut *tx)
        .await?;
    }
    let unread = sqlx::query_scalar!(
        r#"SELECT count(*) AS "n!" FROM messages
           WHERE chat_id = $1 AND id > $2 AND kind = 'text' AND sender_id <> $3"#,
        chat_id,
        marker,
        user_id
    )
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(ReadMarker {
        chat_id: chat,
        last_read_id: MessageId(marker),
        unread_count: unread as u64,
        moved,
    })
}

type RosterRows = (ChatKind, Option<String>, Vec<(UserId, Role)>);

async fn roster(tx: &mut PgConnection, chat: ChatId) -> Result<Option<RosterRows>, StoreError> {
    let chat_id = chat.get();
    let Some(row) = sqlx::query!("SELECT kind, title FROM chats WHERE id = $1", chat_id)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(None);
    };
    let kind =
        ChatKind::parse(&row.kind).ok_or_else(|| StoreError::internal("unknown chat kind"))?;
    let members = sqlx::query!(
        "SELECT user_id, role FROM chat_members WHERE chat_id = $1 ORDER BY id",
        chat_id
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| {
        let role = Role::parse(&r.role).ok_or_else(|| StoreError::internal("unknown role"))?;
        Ok((UserId(r.user_id), role))
    })
    .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(Some((kind, row.title, members)))
}

async fn username(tx: &mut PgConnection, user: UserId) -> Result<String, StoreError> {
    sqlx::query_scalar!("SELECT username FROM users WHERE id = $1", user.get())
        .fetch_optional(tx)
        .await?
        .ok_or(StoreError::NotFound(Entity::User))
}

struct Event<'a> {
    id: i64,
    chat: ChatId,
    actor: UserId,
    actor_name: &'a str,
    kind: MessageKind,
    content: String,
    details: serde_json::Value,
    subject: Option<UserId>,
    audience: Audience,
}

async fn insert_event(
    tx: &mut Transaction<'_, Postgres>,
    e: Event<'_>,
    ts: i64,
) -> Result<Arc<StoredMessage>, StoreError> {
    let details = e.details.to_string();
    sqlx::query!(
        "INSERT INTO messages (id, chat_id, sender_id, content, created_at, kind, event, subject_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        e.id,
        e.chat.get(),
        e.actor.get(),
        e.content,
        ts,
        e.kind.as_str(),
        details,
        e.subject.map(UserId::get)
    )
    .execute(&mut **tx)
    .await?;
    Ok(Arc::new(StoredMessage {
        message: Message {
            id: MessageId(e.id),
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
