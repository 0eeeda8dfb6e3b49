//! The hub: which connections each user has open on this node, and fan-out.
//!
//! * The store calls [`CommitSink::committed`] right after each COMMIT, in
//!   id order, with the message's audience; so every connection's queue
//!   receives its messages in id order, the order history returns.
//! * Each message is encoded once (plus once more with `client_msg_id`
//!   for the sender's own connections) and the same bytes are queued to
//!   every connection of the audience.
//! * Queues are bounded: a connection whose queue is full is told to close
//!   with 4008 (it resumes with `?since=`); nobody else waits for it.
//!
//! The hub knows nothing of the database: what it delivers arrives with
//! its audience.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc;

use super::connection::{CloseReason, ConnControl};
use super::protocol::{self, message_frame};
use crate::domain::Notify;
use crate::domain::chats::{ReadNotice, TypingNotice};
use crate::ids::{MessageId, UserId};
use crate::store::{CommitSink, StoredMessage};
use crate::telemetry::metrics as m;

/// A frame queued for one connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A chat message; the id lets a resuming connection skip what it replayed.
    Message { id: MessageId, text: Utf8Bytes },
    /// Anything else (ack, error).
    Control(Utf8Bytes),
}

impl Outbound {
    /// The frame's text, whatever it is.
    pub fn into_text(self) -> Utf8Bytes {
        match self {
            Outbound::Message { text, .. } | Outbound::Control(text) => text,
        }
    }
}

/// The hub's handle on one connection.
pub struct ConnHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Outbound>,
    pub control: Arc<ConnControl>,
}

impl ConnHandle {
    /// Queues a frame without waiting; a full queue closes the connection.
    pub fn push(&self, frame: Outbound) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.control.close(CloseReason::SlowConsumer);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }
}

#[derive(Default)]
pub struct Hub {
    users: DashMap<UserId, Vec<Arc<ConnHandle>>>,
    next_id: AtomicU64,
    connections: AtomicU64,
}

impl Hub {
    pub fn new() -> Self {
        Hub::default()
    }

    /// Registers a connection of `user_id`; from now on it receives every
    /// message committed in the user's chats.
    pub fn register(
        &self,
        user_id: UserId,
        tx: mpsc::Sender<Outbound>,
        control: Arc<ConnControl>,
    ) -> Arc<ConnHandle> {
        let handle = Arc::new(ConnHandle {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tx,
            control,
        });
        self.users.entry(user_id).or_default().push(handle.clone());
        self.connections.fetch_add(1, Ordering::Relaxed);
        gauge!(m::WS_CONNECTIONS).increment(1.0);
        counter!(m::WS_OPENED).increment(1);
        handle
    }

    /// Removes a connection; the user's entry goes when its last connection does.
    pub fn unregister(&self, user_id: UserId, conn_id: u64) {
        let mut removed = false;
        if let Some(mut conns) = self.users.get_mut(&user_id) {
            let before = conns.len();
            conns.retain(|c| c.id != conn_id);
            removed = conns.len() < before;
        }
        self.users.remove_if(&user_id, |_, conns| conns.is_empty());
        if removed {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            gauge!(m::WS_CONNECTIONS).decrement(1.0);
        }
    }

    /// Open connections.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    /// Open connections of `user`.
    pub fn connections_of(&self, user: UserId) -> usize {
        self.users.get(&user).map_or(0, |c| c.len())
    }

    /// Users with at least one open connection.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Closes `user`'s connections opened with the token `jti` (or all of
    /// them) with 4001: the token was revoked on this node.
    pub fn end_sessions(&self, user: UserId, jti: Option<&str>) {
        if let Some(conns) = self.users.get(&user) {
            for c in conns.iter() {
                if jti.is_none_or(|j| c.control.opened_with(j)) {
                    c.control.close(CloseReason::SessionEnded);
                }
            }
        }
    }

    /// Asks every connection to close with `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for entry in self.users.iter() {
            for c in entry.value() {
                c.control.close(reason);
            }
        }
    }

    /// Queues `frame` to every connection of `audience` that `keep`
    /// accepts; returns how many it was queued to.
    fn deliver_control(
        &self,
        audience: &[UserId],
        frame: &Utf8Bytes,
        keep: impl Fn(UserId, &ConnHandle) -> bool,
    ) -> u64 {
        let mut delivered = 0;
        for &user in audience {
            let Some(conns) = self.users.get(&user) else {
                continue;
            };
            for c in conns.iter().filter(|c| keep(user, c)) {
                delivered += u64::from(c.push(Outbound::Control(frame.clone())));
            }
        }
        delivered
    }

    /// Queues the message to every connection of its audience; returns
    /// how many connections it was queued to.
    fn deliver(&self, msg: &StoredMessage) -> u64 {
        let plain = message_frame(&msg.message, None);
        let own = match &msg.client_msg_id {
            Some(key) => message_frame(&msg.message, Some(key)),
            None => plain.clone(),
        };
        counter!(m::MESSAGE_ENCODINGS).increment(1 + u64::from(msg.client_msg_id.is_some()));
        let mut delivered = 0;
        for &user in msg.audience.iter() {
            let Some(conns) = self.users.get(&user) else {
                continue;
            };
            let text = if user == msg.message.sender_id {
                &own
            } else {
                &plain
            };
            for c in conns.iter() {
                let queued = c.push(Outbound::Message {
                    id: msg.message.id,
                    text: text.clone(),
                });
                delivered += u64::from(queued);
            }
        }
        delivered
    }
}

impl Notify for Hub {
    fn read(&self, notice: &ReadNotice, audience: &[UserId]) {
        let frame = protocol::read_frame(notice);
        let n = self.deliver_control(audience, &frame, |_, c| Some(c.id) != notice.except);
        counter!(m::EPHEMERAL_FRAMES, "type" => "read").increment(n);
    }

    fn typing(&self, notice: &TypingNotice, audience: &[UserId]) {
        let frame = protocol::typing_frame(notice);
        let n = self.deliver_control(audience, &frame, |user, _| user != notice.user);
        counter!(m::EPHEMERAL_FRAMES, "type" => "typing").increment(n);
    }
}

impl CommitSink for Hub {
    fn committed(&self, message: &Arc<StoredMessage>, committed_at: Instant) {
        let delivered = self.deliver(message);
        counter!(m::MESSAGES_DELIVERED).increment(delivered);
        histogram!(m::FANOUT_CONNECTIONS).record(delivered as f64);
        // The time from COMMIT until the last enqueue of this message.
        if delivered > 0 {
            histogram!(m::DELIVERY_SECONDS).record(committed_at.elapsed().as_secs_f64());
        }
    }
}
