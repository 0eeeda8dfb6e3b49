//! One WebSocket connection: a reader half and a writer half.
//!
//! * The reader half takes frames from the client and hands sends to
//!   [`Sends`]; on shutdown it stops reading and waits until every send it
//!   received is committed and acked, then closes with 1001.
//! * The writer half owns the sending side: on resume it first replays
//!   from the database ([`resume`](super::resume)), then forwards the
//!   connection's bounded queue (feeding everything queued, flushing
//!   once), and pings; last, it sends the close frame.
//! * Either half, the hub (4008, slow consumer) or shutdown ends the
//!   connection through [`ConnControl::close`]; the first reason wins and
//!   decides the close frame.
//!
//! The loop is generic over the socket's `Sink`/`Stream`, so its state
//! machine is unit-tested over channels (below).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::hub::{ConnHandle, Outbound};
use super::protocol::FrameError;
use super::resume::{self, Replayed};
use super::send::Sends;
use crate::app::AppState;
use crate::auth::Identity;
use crate::config::WsSettings;
use crate::ids::{MessageId, UserId};
use crate::telemetry::metrics as m;

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
    /// The client broke the WebSocket framing rules (RFC 6455 §7.4.1,
    /// 1002): an unmasked frame, reserved bits set, a fragmented or
    /// oversized control frame, an unknown opcode, a stray continuation.
    ProtocolError,
    /// A text frame (or a close reason) that is not valid UTF-8 (1007).
    InvalidUtf8,
    /// The token expired or was revoked (logout, password change): 4001,
    /// the client logs in or refreshes and resumes with `since`.
    SessionEnded,
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
            CloseReason::ProtocolError => "protocol_error",
            CloseReason::InvalidUtf8 => "invalid_utf8",
            CloseReason::SessionEnded => "session_ended",
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
            CloseReason::ProtocolError => (1002, "protocol error"),
            CloseReason::InvalidUtf8 => (1007, "text frame is not valid UTF-8"),
            CloseReason::SessionEnded => (4001, "token expired or revoked"),
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
    /// The id of the token the connection was opened with.
    jti: OnceLock<Arc<str>>,
    reason: OnceLock<CloseReason>,
    started: Instant,
    /// Milliseconds since `started` when the client last sent anything.
    last_seen_ms: AtomicU64,
}

impl ConnControl {
    pub fn new() -> Self {
        ConnControl {
            token: CancellationToken::new(),
            jti: OnceLock::new(),
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

    /// Whether the connection was opened with the token `jti`.
    pub fn opened_with(&self, jti: &str) -> bool {
        self.jti.get().is_some_and(|j| &**j == jti)
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
pub async fn serve(socket: WebSocket, state: AppState, user: Identity, since: Option<MessageId>) {
    let (sink, stream) = socket.split();
    run(sink, stream, state, user, since).await;
}

/// The connection loop over any message sink and stream.
pub async fn run<Si, St>(
    sink: Si,
    stream: St,
    state: AppState,
    user: Identity,
    since: Option<MessageId>,
) where
    Si: Sink<Message, Error = axum::Error> + Send + Unpin + 'static,
    St: Stream<Item = Result<Message, axum::Error>> + Send + Unpin,
{
    // Keeps shutdown waiting until this connection has flushed and closed.
    let _tracked = state.ws_tracker.token();
    // Read again after the end during the close handshake: ends stay ends.
    let mut stream = stream.fuse();
    let control = Arc::new(ConnControl::new());
    let _ = control.jti.set(user.token.jti.as_str().into());
    let (tx, rx) = mpsc::channel(state.settings.ws.outbound_queue);
    let handle = state.hub.register(user.id, tx, control.clone());
    tracing::debug!(user_id = %user.id, conn = handle.id, "websocket connected");

    let span = tracing::info_span!(
        "ws_connection",
        otel.name = "WS /ws",
        otel.kind = "server",
        enduser.id = user.id.get(),
        ws.resume_since = since.map(MessageId::get),
        ws.close_reason = tracing::field::Empty,
    );
    let writer = tokio::spawn(
        write_half(sink, rx, control.clone(), state.clone(), user.id, since)
            .instrument(span.clone()),
    );
    tokio::select! {
        biased;
        _ = read_half(&mut stream, &handle, &control, &state, &user, &span)
            .instrument(span.clone()) => {}
        _ = watch_session(&control, &state, &user) => {}
    }
    state.hub.unregister(user.id, handle.id);
    drop(handle);
    let reason = control.reason().as_str();
    span.record("ws.close_reason", reason);
    metrics::counter!(m::WS_CLOSED, "reason" => reason).increment(1);
    finish_close_handshake(&mut stream, writer).await;
    tracing::debug!(user_id = %user.id, reason, "websocket closed");
}

/// Closes the connection with 4001 when its token expires or stops being
/// valid; never returns before that. The token is checked again every
/// `ws.ping_interval_ms` (revoked on another node, or the password changed
/// there); on the node that revokes it, the connection is closed at once
/// (`Hub::end_sessions`).
async fn watch_session(control: &ConnControl, state: &AppState, user: &Identity) {
    let recheck = Duration::from_millis(state.settings.ws.ping_interval_ms);
    loop {
        let now = jsonwebtoken::get_current_timestamp();
        let left = Duration::from_secs(user.token.expires_at.saturating_sub(now));
        tokio::time::sleep(left.min(recheck)).await;
        // A failed check (database unreachable) keeps the connection.
        if let Ok(false) = state.accounts.still_valid(user).await {
            control.close(CloseReason::SessionEnded);
            break;
        }
    }
    std::future::pending::<()>().await;
}

/// Reads until the connection is closed. On shutdown it stops reading and
/// returns once every send received before is answered.
async fn read_half<St>(
    stream: &mut St,
    handle: &Arc<ConnHandle>,
    control: &ConnControl,
    state: &AppState,
    user: &Identity,
    span: &tracing::Span,
) where
    St: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let mut sends = Sends::new(handle.clone(), state, user, span.clone());
    loop {
        let frame = tokio::select! {
            biased;
            _ = control.closed() => return,
            _ = state.shutdown.cancelled() => break,
            frame = stream.next() => frame,
        };
        control.touch();
        match frame {
            Some(Ok(Message::Text(text))) => sends.on_text(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => sends.reject(FrameError::new(
                "invalid_json",
                "binary frames are not supported; send JSON text frames",
                None,
            )),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => return control.close(CloseReason::Client),
            Some(Err(e)) => return control.close(read_error_reason(e)),
        }
    }
    // Shutdown: every send received so far commits and is acked first.
    tokio::select! {
        _ = control.closed() => {}
        _ = sends.settled() => control.close(CloseReason::Shutdown),
    }
}

/// Why a read failed, as a close reason: the client's fault gets its
/// RFC 6455 code; a vanished peer or an I/O error is just the end.
fn read_error_reason(e: axum::Error) -> CloseReason {
    use tungstenite::error::ProtocolError as P;
    let Ok(e) = e.into_inner().downcast::<tungstenite::Error>() else {
        return CloseReason::Client;
    };
    match *e {
        tungstenite::Error::Capacity(_) => CloseReason::TooBig,
        tungstenite::Error::Utf8(_) => CloseReason::InvalidUtf8,
        tungstenite::Error::Protocol(
            P::NonZeroReservedBits
            | P::UnmaskedFrameFromClient
            | P::FragmentedControlFrame
            | P::ControlFrameTooBig
            | P::UnknownControlFrameType(_)
            | P::UnknownDataFrameType(_)
            | P::UnexpectedContinueFrame
            | P::ExpectedFragment(_)
            | P::InvalidOpcode(_)
            | P::InvalidCloseSequence,
        ) => CloseReason::ProtocolError,
        // The peer reset or left, sent after its close, or ours failed:
        // nobody is left to read a close code.
        _ => CloseReason::Client,
    }
}

/// Completes the close handshake: keeps reading until the client's close
/// reply (or the end of the stream) while the writer sends our close
/// frame, so the client reads everything queued before it instead of a
/// reset; gives up shortly after the writer is done.
async fn finish_close_handshake<St>(stream: &mut St, mut writer: JoinHandle<()>)
where
    St: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    let drain = async {
        while let Some(Ok(frame)) = stream.next().await {
            if matches!(frame, Message::Close(_)) {
                break;
            }
        }
    };
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {
            let _ = writer.await;
        }
        _ = &mut writer => {
            let _ = tokio::time::timeout(CLOSE_REPLY, drain).await;
        }
    }
}

async fn write_half<Si>(
    mut sink: Si,
    mut rx: mpsc::Receiver<Outbound>,
    control: Arc<ConnControl>,
    state: AppState,
    user: UserId,
    since: Option<MessageId>,
) where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let ws = &state.settings.ws;
    let mut replayed = Replayed::default();
    if let Some(since) = since {
        let replay = resume::replay(&mut sink, state.store.as_ref(), user, since, ws.replay_max);
        tokio::select! {
            r = replay => match r {
                Ok(r) => replayed = r,
                Err(e) => {
                    tracing::warn!(error = %e, "resume replay failed");
                    control.close(CloseReason::ServerError);
                }
            },
            _ = control.closed() => {}
        }
    }
    forward(&mut sink, &mut rx, &control, ws, replayed).await;
    finish(sink, rx, &control, ws).await;
}

/// Forwards the queue to the socket (everything queued, then one flush)
/// and pings, until the connection is closed.
async fn forward<Si>(
    sink: &mut Si,
    rx: &mut mpsc::Receiver<Outbound>,
    control: &ConnControl,
    ws: &WsSettings,
    replayed: Replayed,
) where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let period = Duration::from_millis(ws.ping_interval_ms);
    let idle_timeout = Duration::from_millis(ws.idle_timeout_ms);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Grows to the largest batch this connection has seen: an idle
    // connection keeps none (64 slots up front were 2.5 KiB each).
    let mut batch = Vec::new();
    loop {
        let written = tokio::select! {
            biased;
            _ = control.closed() => return,
            n = rx.recv_many(&mut batch, 256) => {
                if n == 0 {
                    return;
                }
                let frames = batch.drain(..).filter(|f| !replayed.covers(f));
                write_all(sink, frames, control).await
            }
            _ = ping.tick() => {
                if control.idle_for() > idle_timeout {
                    return control.close(CloseReason::Timeout);
                }
                let ping = sink.send(Message::Ping(Default::default()));
                tokio::select! {
                    r = ping => r,
                    _ = control.closed() => return,
                }
            }
        };
        if written.is_err() {
            return control.close(CloseReason::Client);
        }
    }
}

/// Feeds `frames` and flushes once; gives up when the connection closes.
async fn write_all<Si>(
    sink: &mut Si,
    frames: impl Iterator<Item = Outbound>,
    control: &ConnControl,
) -> Result<(), axum::Error>
where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let write = async {
        for frame in frames {
            sink.feed(Message::Text(frame.into_text())).await?;
        }
        sink.flush().await
    };
    tokio::select! {
        r = write => r,
        _ = control.closed() => Ok(()),
    }
}

/// Sends what must still go out and the close frame. On shutdown that is
/// the queue (the acks of everything received); a client closed for any
/// other reason loses its queue (it resumes with `?since=`), and gets its
/// close frame when it reads again or is dropped after the idle timeout.
async fn finish<Si>(
    mut sink: Si,
    mut rx: mpsc::Receiver<Outbound>,
    control: &ConnControl,
    ws: &WsSettings,
) where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let reason = control.reason();
    let mut pending = Vec::new();
    let flush_for = if reason == CloseReason::Shutdown {
        while let Ok(frame) = rx.try_recv() {
            pending.push(frame);
        }
        SHUTDOWN_FLUSH
    } else {
        Duration::from_millis(ws.idle_timeout_ms)
    };
    drop(rx);
    let _ = tokio::time::timeout(flush_for, async {
        for frame in pending {
            sink.feed(Message::Text(frame.into_text())).await?;
        }
        if let Some(frame) = reason.close_frame() {
            sink.send(Message::Close(Some(frame))).await?;
        }
        sink.close().await
    })
    .await;
}

#[cfg(test)]
mod tests;
