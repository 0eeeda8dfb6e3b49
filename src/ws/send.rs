//! One connection's frames from the client: sends (from frame to ack),
//! typing and read markers.
//!
//! A send is parsed and validated, charged to the connection's token
//! bucket, and submitted to the store without waiting for COMMIT, so sends
//! pipeline. The store answers each one right after the message's own
//! fan-out, in the order the sends arrived: the answer (`ack` or `error`)
//! is queued on the connection from there, without waking the reader.
//! Every submitted send holds a token of `in_flight` until it is answered,
//! so that on shutdown the connection can wait until everything it
//! received is committed and acked. A read marker also spends a token (it
//! is a write); typing has its own per-user interval (`domain::chats`).
//!
//! Idempotency: a send whose `client_msg_id` the sender used before gets
//! the original ack only when it is the same message (same chat, same
//! content, byte for byte); the same key for anything else is an
//! `idempotency_conflict` error frame. The store stores nothing in either
//! case; the comparison is made here, on the stored message the store
//! answers with (docs/decisions/0011-input-hardening.md).

use std::sync::Arc;

use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tracing::Instrument;

use super::hub::{ConnHandle, Outbound};
use super::protocol::{self, ClientFrame, FrameError, SendFrame};
use crate::app::AppState;
use crate::auth::Identity;
use crate::domain::DomainError;
use crate::ids::ChatId;
use crate::ratelimit::TokenBucket;
use crate::store::{Entity, Message, NewMessage, OnCommit, SendOutcome, Store, StoreError};
use crate::telemetry::{self, metrics as m};

pub(super) struct Sends {
    handle: Arc<ConnHandle>,
    state: AppState,
    store: Arc<dyn Store>,
    user: Identity,
    /// The sender's username, shared by every message of this connection.
    sender: Arc<str>,
    bucket: TokenBucket,
    max_content_chars: usize,
    in_flight: TaskTracker,
    conn_span: tracing::Span,
}

impl Sends {
    pub fn new(
        handle: Arc<ConnHandle>,
        state: &AppState,
        user: &Identity,
        conn_span: tracing::Span,
    ) -> Sends {
        let ws = &state.settings.ws;
        Sends {
            handle,
            state: state.clone(),
            store: state.store.clone(),
            user: user.clone(),
            sender: user.username.as_str().into(),
            bucket: TokenBucket::new(f64::from(ws.send_burst), ws.send_rate_per_sec),
            max_content_chars: ws.max_content_chars,
            in_flight: TaskTracker::new(),
            conn_span,
        }
    }

    /// Handles one text frame from the client.
    pub async fn on_text(&mut self, text: &str) {
        match protocol::parse_client(text, self.max_content_chars) {
            Ok(ClientFrame::Send(send)) => self.send(send).await,
            Ok(ClientFrame::Typing { chat_id }) => {
                if let Err(e) = self.state.chats.typing(chat_id, &self.user).await {
                    self.reject(domain_error(e));
                }
            }
            Ok(ClientFrame::Read { chat_id, up_to }) => {
                if self.bucket.try_take().is_err() {
                    return self.reject(rate_limited(None));
                }
                let marked = self
                    .state
                    .chats
                    .mark_read(chat_id, &self.user, up_to, Some(self.handle.id))
                    .await;
                if let Err(e) = marked {
                    self.reject(domain_error(e));
                }
            }
            Err(e) => self.reject(e),
        }
    }

    async fn send(&mut self, send: SendFrame) {
        if self.bucket.try_take().is_err() {
            return self.reject(rate_limited(send.client_msg_id));
        }
        let key = send.client_msg_id.clone();
        // One span per message, from receipt through commit and fan-out
        // (which precede the ack) to the ack.
        let span = tracing::info_span!(
            parent: &self.conn_span,
            "ws.message",
            otel.name = "ws.message",
            chat_id = send.chat_id.get(),
            message_id = tracing::field::Empty,
            duplicate = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        telemetry::record_trace_id(&span);
        // What a repeat of this key must match; kept only for keyed sends.
        let expect = key.as_ref().map(|_| Sent {
            chat_id: send.chat_id,
            content: send.content.clone(),
        });
        let on_commit = answer(
            self.handle.clone(),
            key.clone(),
            expect,
            span.clone(),
            self.in_flight.token(),
        );
        let submitted = self
            .store
            .submit(
                NewMessage {
                    chat_id: send.chat_id,
                    sender_id: self.user.id,
                    sender: self.sender.clone(),
                    content: send.content,
                    client_msg_id: send.client_msg_id,
                },
                on_commit,
            )
            .instrument(span)
            .await;
        if let Err(e) = submitted {
            self.reject(store_error(e, key));
        }
    }

    /// Queues an error frame for the connection and counts the rejection.
    pub fn reject(&self, e: FrameError) {
        reject(&self.handle, e);
    }

    /// Resolves once every send submitted so far is answered.
    pub async fn settled(&self) {
        self.in_flight.close();
        self.in_flight.wait().await;
    }
}

fn rate_limited(key: Option<String>) -> FrameError {
    FrameError::new(
        "rate_limited",
        "sending too fast; nothing was stored, retry later",
        key,
    )
}

/// A refused typing or read frame.
fn domain_error(e: DomainError) -> FrameError {
    let code = match &e {
        DomainError::ChatNotFound => "chat_not_found",
        DomainError::BadRequest(_) => "invalid_request",
        DomainError::Unavailable => "unavailable",
        DomainError::Internal(cause) => {
            tracing::error!(error = ?cause, "a client frame failed");
            "internal_error"
        }
        DomainError::Invalid { code, .. } => code,
        _ => "invalid_request",
    };
    FrameError::new(code, e.to_string(), None)
}

fn reject(handle: &ConnHandle, e: FrameError) {
    metrics::counter!(m::MESSAGES_REJECTED, "reason" => e.code).increment(1);
    handle.push(Outbound::Control(protocol::error_frame(&e)));
}

/// A keyed send as the client sent it, to compare with what its key
/// stored the first time.
struct Sent {
    chat_id: ChatId,
    content: String,
}

impl Sent {
    /// True when `stored` is this message: a true resend.
    fn matches(&self, stored: &Message) -> bool {
        stored.chat_id == self.chat_id && stored.content == self.content
    }
}

/// What the store does with a submitted message's outcome: queue the ack
/// (or the error) on the sending connection and close the message's span.
fn answer(
    handle: Arc<ConnHandle>,
    key: Option<String>,
    expect: Option<Sent>,
    span: tracing::Span,
    in_flight: TaskTrackerToken,
) -> OnCommit {
    Box::new(move |outcome| {
        let _in_flight = in_flight;
        match outcome {
            Ok(outcome) => {
                let duplicate = matches!(outcome, SendOutcome::Duplicate(_));
                let msg = &outcome.stored().message;
                if duplicate {
                    if expect.as_ref().is_some_and(|sent| !sent.matches(msg)) {
                        return reject(&handle, idempotency_conflict(key));
                    }
                    metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
                }
                span.record("message_id", msg.id.get());
                span.record("duplicate", duplicate);
                handle.push(Outbound::Control(protocol::ack_frame(msg, key.as_deref())));
            }
            Err(e) => reject(&handle, store_error(e, key)),
        }
    })
}

fn idempotency_conflict(key: Option<String>) -> FrameError {
    FrameError::new(
        "idempotency_conflict",
        "this client_msg_id was already used for a different message (another chat or other content); nothing was stored, send it with a new client_msg_id",
        key,
    )
}

fn store_error(e: StoreError, key: Option<String>) -> FrameError {
    match e {
        StoreError::NotFound(Entity::Chat) => {
            FrameError::new("chat_not_found", "chat not found", key)
        }
        StoreError::Unavailable(source) => {
            tracing::warn!(error = %source, "a message could not be stored: the database is unavailable");
            FrameError::new(
                "unavailable",
                "the server cannot store messages right now (shutting down or the database is unreachable); nothing was stored, resend later",
                key,
            )
        }
        other => {
            tracing::error!(error = %other, "storing a message failed");
            FrameError::new(
                "internal_error",
                "the message was not stored; resend it",
                key,
            )
        }
    }
}
