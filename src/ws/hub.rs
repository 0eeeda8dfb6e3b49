//! The hub: which connections each user has open, and fan-out.
//!
//! The writer calls [`Hub::committed`] right after each COMMIT, in id
//! order, on its own thread (message by message, each followed by its
//! ack); so every connection's queue receives a chat's messages in id
//! order, the order history returns. Each message is encoded
//! once per audience (plain for everyone, plus one carrying `client_msg_id`
//! for the sender's own connections) and the same bytes are queued to each
//! connection. Queues are bounded: a connection whose queue is full is told
//! to close with 4008 (it resumes with `?since=`); nobody else waits for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use dashmap::DashMap;
use metrics::{counter, gauge, histogram};
use tokio::sync::mpsc;

use super::connection::{CloseReason, ConnControl};
use super::protocol::message_frame;
use crate::store::{CommitSink, StoredMessage};
use crate::telemetry::metrics as m;

/// A frame queued for one connection.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// A chat message; the id lets a resuming connection skip what it replayed.
    Message { id: i64, text: Utf8Bytes },
    /// Anything else (ack, error).
    Control(Utf8Bytes),
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
    users: DashMap<i64, Vec<Arc<ConnHandle>>>,
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
        user_id: i64,
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
    pub fn unregister(&self, user_id: i64, conn_id: u64) {
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

    /// Users with at least one open connection.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Asks every connection to close with `reason`.
    pub fn close_all(&self, reason: CloseReason) {
        for entry in self.users.iter() {
            for c in entry.value() {
                c.control.close(reason);
            }
        }
    }

    /// Queues the message to every connection of its audience; returns
    /// how many connections it was queued to.
    fn deliver(&self, msg: &StoredMessage) -> u64 {
        let plain = message_frame(&msg.message, None);
        let own = match &msg.client_msg_id {
            Some(key) => message_frame(&msg.message, Some(key)),
            None => plain.clone(),
        };
        let mut delivered = 0;
        for user in msg.members {
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

impl CommitSink for Hub {
    fn committed(&self, batch: &[Arc<StoredMessage>], committed_at: Instant) {
        let mut delivered = 0;
        for msg in batch {
            delivered += self.deliver(msg);
        }
        counter!(m::MESSAGES_ACCEPTED).increment(batch.len() as u64);
        counter!(m::MESSAGES_DELIVERED).increment(delivered);
        // One observation per call (the writer calls once per message): the
        // time from COMMIT until its last enqueue.
        if delivered > 0 {
            histogram!(m::DELIVERY_SECONDS).record(committed_at.elapsed().as_secs_f64());
        }
    }

    fn batch_committed(&self, size: usize, commit: Duration) {
        histogram!(m::DB_BATCH_SIZE).record(size as f64);
        histogram!(m::DB_COMMIT_SECONDS).record(commit.as_secs_f64());
    }
}
