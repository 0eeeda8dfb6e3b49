//! One WebSocket connection: a reader half and a writer half.
//!
//! * The reader parses and validates send frames, applies the connection's
//!   token bucket and submits each message to the store's writer (in order,
//!   without waiting for COMMIT, so sends pipeline). The writer thread
//!   queues each outcome as an `ack`/`error` frame right after the
//!   message's fan-out, in the order the sends arrived; the reader is not
//!   woken for it.
//! * The writer owns the socket's sending half: on resume it first replays
//!   from the database, then forwards the connection's bounded queue,
//!   feeding everything queued and flushing once; it also pings.
//!
//! Either half, the hub (slow consumer) or shutdown ends the connection by
//! calling [`ConnControl::close`] with a reason; the writer then sends the
//! matching close frame.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use super::hub::{ConnHandle, Outbound};
use super::protocol::{self, FrameError};
use crate::app::AppState;
use crate::http::extract::AuthUser;
use crate::ratelimit::TokenBucket;
use crate::store::{NewMessage, OnCommit, SendOutcome, StoreError};
use crate::telemetry::{self, metrics as m};
use tracing::Instrument;

/// How long a closing connection may take to flush on shutdown.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);
/// How long to wait for the client's close reply after our close frame.
const CLOSE_REPLY: Duration = Duration::from_secs(1);

/// Why a connection ended; decides the close frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed, or the socket failed.
    Client,
    /// Nothing (not even a pong) arrived within `ws.idle_timeout_ms`.
    Timeout,
    /// The outbound queue overflowed.
    SlowConsumer,
    /// An inbound frame exceeded `ws.max_frame_bytes`.
    TooBig,
    /// The server is shutting down.
    Shutdown,
    /// The server could not serve the connection (e.g. the replay query failed).
    ServerError,
}

impl CloseReason {
    /// Label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Timeout => "timeout",
            CloseReason::SlowConsumer => "slow_consumer",
            CloseReason::TooBig => "too_big",
            CloseReason::Shutdown => "shutdown",
            CloseReason::ServerError => "server_error",
        }
    }

    /// The close frame the server sends, if any.
    pub fn close_frame(self) -> Option<CloseFrame> {
        let (code, reason) = match self {
            CloseReason::Client => return None,
            CloseReason::Timeout => (4000, "idle timeout"),
            CloseReason::SlowConsumer => (4008, "slow consumer: resume with ?since="),
            CloseReason::TooBig => (1009, "frame too large"),
            CloseReason::Shutdown => (1001, "server shutting down"),
            CloseReason::ServerError => (1011, "server error"),
        };
        Some(CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        })
    }
}

/// Shared between the two halves and the hub.
pub struct ConnControl {
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
    started: Instant,
    /// Milliseconds since `started` when the client last sent anything.
    last_seen_ms: AtomicU64,
}

impl ConnControl {
    pub fn new() -> Self {
        ConnControl {
            token: CancellationToken::new(),
            reason: OnceLock::new(),
            started: Instant::now(),
            last_seen_ms: AtomicU64::new(0),
        }
    }

    /// Ends the connection; the first reason given wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.token.cancel();
    }

    pub fn reason(&self) -> CloseReason {
        self.reason.get().copied().unwrap_or(CloseReason::Client)
    }

    async fn closed(&self) {
        self.token.cancelled().await
    }

    fn touch(&self) {
        self.last_seen_ms
            .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_seen_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

impl Default for ConnControl {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves one upgraded connection until it ends.
pub async fn serve(socket: WebSocket, state: AppState, user: AuthUser, since: Option<i64>) {
    // Keeps shutdown waiting until this connection has flushed and closed.
    let _tracked = state.ws_tracker.token();
    let control = Arc::new(ConnControl::new());
    let (tx, rx) = mpsc::channel(state.settings.ws.outbound_queue);
    let handle = state.hub.register(user.id, tx, control.clone());
    tracing::debug!(user_id = user.id, conn = handle.id, "websocket connected");

    let span = tracing::info_span!(
        "ws_connection",
        otel.name = "WS /ws",
        otel.kind = "server",
        enduser.id = user.id,
        ws.resume_since = since,
        ws.close_reason = tracing::field::Empty,
    );
    let (sink, stream) = socket.split();
    let writer = tokio::spawn(
        write_half(sink, rx, control.clone(), state.clone(), user.id, since)
            .instrument(span.clone()),
    );
    let mut stream = read_half(stream, &handle, &control, &state, &user, &span)
        .instrument(span.clone())
        .await;
    state.hub.unregister(user.id, handle.id);
    drop(handle);
    let reason = control.reason().as_str();
    span.record("ws.close_reason", reason);
    metrics::counter!(m::WS_CLOSED, "reason" => reason).increment(1);

    // Complete the close handshake: keep reading until the client's close
    // reply (or the end of the stream) while the writer sends our close
    // frame, so the client reads everything queued before it instead of a
    // reset; give up shortly after the writer is done.
    let drain = async {
        while let Some(Ok(frame)) = stream.next().await {
            if matches!(frame, Message::Close(_)) {
                break;
            }
        }
    };
    tokio::pin!(drain);
    let mut writer = writer;
    tokio::select! {
        _ = &mut drain => {
            let _ = writer.await;
        }
        _ = &mut writer => {
            let _ = tokio::time::timeout(CLOSE_REPLY, drain).await;
        }
    }
    tracing::debug!(
        user_id = user.id,
        reason = control.reason().as_str(),
        "websocket closed"
    );
}

/// Sends submitted but not yet answered; on shutdown the reader waits for
/// zero before it closes, so every message received before is acked.
#[derive(Default)]
struct InFlight {
    count: AtomicU64,
    settled: Notify,
}

/// Held by one submitted message's `on_commit`: whether that runs or is
/// dropped unrun (the writer is gone), the message stops being in flight.
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(in_flight: &Arc<InFlight>) -> Self {
        in_flight.count.fetch_add(1, Ordering::AcqRel);
        InFlightGuard(in_flight.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.settled.notify_one();
        }
    }
}

/// Returns the stream so the caller can finish the close handshake.
async fn read_half(
    mut stream: SplitStream<WebSocket>,
    handle: &Arc<ConnHandle>,
    control: &ConnControl,
    state: &AppState,
    user: &AuthUser,
    conn_span: &tracing::Span,
) -> SplitStream<WebSocket> {
    let ws = &state.settings.ws;
    let mut bucket = TokenBucket::new(f64::from(ws.send_burst), ws.send_rate_per_sec);
    let sender: Arc<str> = user.username.as_str().into();
    let in_flight = Arc::new(InFlight::default());
    let mut draining = false;
    let error = |e: FrameError| reject(handle, e);
    let closed = control.closed();
    let shutdown = state.shutdown.cancelled();
    tokio::pin!(closed, shutdown);

    loop {
        tokio::select! {
            biased;
            _ = &mut closed => break,
            _ = in_flight.settled.notified(), if draining => {}
            _ = &mut shutdown, if !draining => draining = true,
            frame = stream.next(), if !draining => {
                control.touch();
                match frame {
                    Some(Ok(Message::Text(text))) => {
                        let send = match protocol::parse_send(text.as_str(), ws.max_content_chars) {
                            Ok(send) => send,
                            Err(e) => {
                                error(e);
                                continue;
                            }
                        };
                        if bucket.try_take().is_err() {
                            error(FrameError::new(
                                "rate_limited",
                                "sending too fast; nothing was stored, retry later",
                                send.client_msg_id,
                            ));
                            continue;
                        }
                        let key = send.client_msg_id.clone();
                        // One span per message, from receipt through commit and
                        // fan-out (which precede the ack) to the ack.
                        let msg_span = tracing::info_span!(
                            parent: conn_span,
                            "ws.message",
                            otel.name = "ws.message",
                            chat_id = send.chat_id,
                            message_id = tracing::field::Empty,
                            duplicate = tracing::field::Empty,
                            trace_id = tracing::field::Empty,
                            span_id = tracing::field::Empty,
                        );
                        telemetry::record_trace_id(&msg_span);
                        match state.store.is_member(send.chat_id, user.id).instrument(msg_span.clone()).await {
                            Ok(true) => {}
                            Ok(false) => {
                                error(FrameError::new("chat_not_found", "chat not found", key));
                                continue;
                            }
                            Err(e) => {
                                error(store_error(e, key));
                                continue;
                            }
                        }
                        let on_commit = answer(handle.clone(), key.clone(), msg_span.clone(), InFlightGuard::new(&in_flight));
                        let submitted = state
                            .store
                            .submit_message_then(
                                NewMessage {
                                    chat_id: send.chat_id,
                                    sender_id: user.id,
                                    sender: sender.clone(),
                                    content: send.content,
                                    client_msg_id: send.client_msg_id,
                                },
                                on_commit,
                            )
                            .instrument(msg_span)
                            .await;
                        if let Err(e) = submitted {
                            error(store_error(e, key));
                        }
                    }
                    Some(Ok(Message::Binary(_))) => {
                        error(FrameError::new(
                            "invalid_json",
                            "binary frames are not supported; send JSON text frames",
                            None,
                        ));
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(Message::Close(_))) | None => {
                        control.close(CloseReason::Client);
                        break;
                    }
                    Some(Err(e)) => {
                        control.close(if is_too_big(e) { CloseReason::TooBig } else { CloseReason::Client });
                        break;
                    }
                }
            }
        }
        if draining && in_flight.count.load(Ordering::Acquire) == 0 {
            // Every message received before shutdown is committed and acked.
            control.close(CloseReason::Shutdown);
            break;
        }
    }
    stream
}

/// Queues an error frame for the connection and counts the rejection.
fn reject(handle: &ConnHandle, e: FrameError) -> bool {
    metrics::counter!(m::MESSAGES_REJECTED, "reason" => e.code).increment(1);
    handle.push(Outbound::Control(protocol::error_frame(&e)))
}

/// What the writer thread does with a submitted message's outcome: queue
/// the ack (or the error) on the sending connection, right after the
/// message's own fan-out, and close the message's span. Acks of one
/// connection's sends are queued in the order the sends arrived (the writer
/// commits them in that order).
fn answer(
    handle: Arc<ConnHandle>,
    key: Option<String>,
    span: tracing::Span,
    guard: InFlightGuard,
) -> OnCommit {
    Box::new(move |outcome| {
        let _guard = guard;
        match outcome {
            Ok(outcome) => {
                let duplicate = matches!(outcome, SendOutcome::Duplicate(_));
                if duplicate {
                    metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
                }
                let msg = &outcome.stored().message;
                span.record("message_id", msg.id);
                span.record("duplicate", duplicate);
                handle.push(Outbound::Control(protocol::ack_frame(msg, key.as_deref())));
            }
            Err(e) => {
                reject(&handle, store_error(e, key));
            }
        }
    })
}

fn store_error(e: StoreError, key: Option<String>) -> FrameError {
    match e {
        StoreError::ChatNotFound => FrameError::new("chat_not_found", "chat not found", key),
        StoreError::Closed => FrameError::new(
            "unavailable",
            "the server is shutting down; nothing was stored, resend after reconnecting",
            key,
        ),
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

fn is_too_big(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast::<tungstenite::Error>().map(|b| *b),
        Ok(tungstenite::Error::Capacity(_))
    )
}

async fn write_half(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    control: Arc<ConnControl>,
    state: AppState,
    user_id: i64,
    since: Option<i64>,
) {
    let ws = &state.settings.ws;
    // Messages up to this id were replayed; skip them when they come live.
    let mut replayed_up_to = 0;
    if let Some(since) = since {
        let replay = replay(&mut sink, &state, user_id, since);
        tokio::select! {
            r = replay => match r {
                Ok(last) => replayed_up_to = last,
                Err(e) => {
                    tracing::warn!(error = %e, "resume replay failed");
                    control.close(CloseReason::ServerError);
                }
            },
            _ = control.closed() => {}
        }
    }

    let period = Duration::from_millis(ws.ping_interval_ms);
    let idle_timeout = Duration::from_millis(ws.idle_timeout_ms);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(64);
    let closed = control.closed();
    tokio::pin!(closed);
    loop {
        tokio::select! {
            biased;
            _ = &mut closed => break,
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    break;
                }
                let write = async {
                    for frame in batch.drain(..) {
                        let text = match frame {
                            Outbound::Message { id, .. } if id <= replayed_up_to => continue,
                            Outbound::Message { text, .. } | Outbound::Control(text) => text,
                        };
                        sink.feed(Message::Text(text)).await?;
                    }
                    sink.flush().await
                };
                tokio::select! {
                    r = write => if r.is_err() {
                        control.close(CloseReason::Client);
                        break;
                    },
                    _ = &mut closed => break,
                }
            }
            _ = ping.tick() => {
                if control.idle_for() > idle_timeout {
                    control.close(CloseReason::Timeout);
                    break;
                }
                tokio::select! {
                    r = sink.send(Message::Ping(Default::default())) => if r.is_err() {
                        control.close(CloseReason::Client);
                        break;
                    },
                    _ = &mut closed => break,
                }
            }
        }
    }

    let reason = control.reason();
    let flush_for = match reason {
        CloseReason::Shutdown => SHUTDOWN_FLUSH,
        // A client that does not read gets its close frame when it reads
        // again, or is dropped after the idle timeout; its queue goes now.
        _ => idle_timeout,
    };
    let mut pending = Vec::new();
    if reason == CloseReason::Shutdown {
        // Acks of everything received before shutdown are queued: flush them.
        while let Ok(frame) = rx.try_recv() {
            pending.push(frame);
        }
    }
    drop(rx);
    let _ = tokio::time::timeout(flush_for, async {
        for frame in pending {
            let text = match frame {
                Outbound::Message { text, .. } | Outbound::Control(text) => text,
            };
            sink.feed(Message::Text(text)).await?;
        }
        if let Some(frame) = reason.close_frame() {
            sink.send(Message::Close(Some(frame))).await?;
        }
        sink.close().await
    })
    .await;
}

/// Sends every message after `since` in the user's chats, up to the replay
/// cap (then `resync`). Returns the last id sent.
async fn replay(
    sink: &mut SplitSink<WebSocket, Message>,
    state: &AppState,
    user_id: i64,
    since: i64,
) -> Result<i64, anyhow::Error> {
    let cap = state.settings.ws.replay_max;
    let mut last = since;
    let mut sent = 0u32;
    while sent < cap {
        let page = (cap - sent).min(500);
        let rows = state.store.messages_since(user_id, last, page).await?;
        let n = rows.len() as u32;
        for r in rows {
            let key = (r.message.sender_id == user_id)
                .then_some(r.client_msg_id.as_deref())
                .flatten();
            sink.feed(Message::Text(protocol::message_frame(&r.message, key)))
                .await?;
            last = r.message.id;
        }
        sent += n;
        if n < page {
            sink.flush().await?;
            return Ok(last);
        }
    }
    // Hit the cap: is there more?
    if !state
        .store
        .messages_since(user_id, last, 1)
        .await?
        .is_empty()
    {
        sink.feed(Message::Text(protocol::resync_frame(last)))
            .await?;
    }
    sink.flush().await?;
    Ok(last)
}
