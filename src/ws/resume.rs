//! Resume (`?since=`) without gap or duplicate.
//!
//! The connection registers with the hub before the replay starts, so live
//! messages queue up while the replay reads the database. The replay sends
//! every message above `since` from the user's chats, ascending, up to
//! `ws.replay_max` (then a `resync` frame); the live queue is forwarded
//! after it, skipping the ids the replay already sent. Ids grow in commit
//! order, so whatever committed after registration is either in the replay
//! or beyond it, and the two together cover every id above `since` once.

use axum::extract::ws::Message;
use futures_util::{Sink, SinkExt};

use super::hub::Outbound;
use super::protocol;
use crate::ids::{MessageId, UserId};
use crate::store::Store;

/// Rows read per replay query.
const PAGE: u32 = 500;

/// The ids a replay covered: everything up to and including `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Replayed {
    pub up_to: MessageId,
}

impl Replayed {
    /// True for a live frame the replay already sent.
    pub fn covers(&self, frame: &Outbound) -> bool {
        matches!(frame, Outbound::Message { id, .. } if *id <= self.up_to)
    }
}

/// Sends every message after `since` in `user`'s chats, at most `cap`
/// (then `resync`), and flushes.
pub(super) async fn replay<Si>(
    sink: &mut Si,
    store: &dyn Store,
    user: UserId,
    since: MessageId,
    cap: u32,
) -> anyhow::Result<Replayed>
where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let mut last = since;
    let mut sent = 0u32;
    while sent < cap {
        let page = (cap - sent).min(PAGE);
        let rows = store.messages_since(user, last, page).await?;
        let n = rows.len() as u32;
        for r in rows {
            let key = (r.message.sender_id == user)
                .then_some(r.client_msg_id.as_deref())
                .flatten();
            sink.feed(Message::Text(protocol::message_frame(&r.message, key)))
                .await?;
            last = r.message.id;
        }
        sent += n;
        if n < page {
            sink.flush().await?;
            return Ok(Replayed { up_to: last });
        }
    }
    // Hit the cap: is there more?
    if !store.messages_since(user, last, 1).await?.is_empty() {
        sink.feed(Message::Text(protocol::resync_frame(last)))
            .await?;
    }
    sink.flush().await?;
    Ok(Replayed { up_to: last })
}
