//! The bare relay: what this machine allows for the same frames with no
//! authentication, no database and no hub bookkeeping beyond a map. It
//! parses and validates a send frame with shindensen's own parser, encodes
//! the `message` and `ack` frames with shindensen's own encoders, and queues
//! them to both members of the chat (chat k is users 2k-1 and 2k).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use dashmap::DashMap;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use shindensen::ids::{ChatId, MessageId, UserId};
use shindensen::store::{Message as ChatMessage, MessageKind, Timestamp};
use shindensen::ws::protocol;
use tokio::sync::mpsc;

#[derive(Default)]
struct Relay {
    conns: DashMap<i64, mpsc::Sender<Utf8Bytes>>,
    next_id: AtomicI64,
}

#[derive(Deserialize)]
struct Params {
    user: i64,
}

pub async fn serve(listen: &str) -> anyhow::Result<()> {
    let relay = Arc::new(Relay::default());
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws", get(upgrade))
        .with_state(relay);
    use axum::serve::ListenerExt;
    // TCP_NODELAY like shindensen's own server, or Nagle adds its delay.
    let listener = tokio::net::TcpListener::bind(listen).await?.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

async fn upgrade(
    State(relay): State<Arc<Relay>>,
    Query(p): Query<Params>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.read_buffer_size(4 * 1024)
        .write_buffer_size(8 * 1024)
        .on_upgrade(move |socket| connection(socket, relay, p.user))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn connection(socket: WebSocket, relay: Arc<Relay>, user: i64) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(1024);
    relay.conns.insert(user, tx.clone());
    let writer = tokio::spawn(async move {
        let mut batch = Vec::with_capacity(64);
        while rx.recv_many(&mut batch, 256).await > 0 {
            for text in batch.drain(..) {
                if sink.feed(Message::Text(text)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let sender = format!("u{user}");
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(protocol::ClientFrame::Send(send)) = protocol::parse_client(text.as_str(), 4000)
        else {
            continue;
        };
        let m = ChatMessage {
            id: MessageId(relay.next_id.fetch_add(1, Ordering::Relaxed) + 1),
            chat_id: send.chat_id,
            sender: sender.clone(),
            sender_id: UserId(user),
            kind: MessageKind::Text,
            content: send.content,
            event: None,
            timestamp: Timestamp(now_ms()),
        };
        let frame = protocol::message_frame(&m, None);
        let ChatId(chat) = send.chat_id;
        for member in [2 * chat - 1, 2 * chat] {
            if let Some(c) = relay.conns.get(&member) {
                let _ = c.try_send(frame.clone());
            }
        }
        let _ = tx.try_send(protocol::ack_frame(&m, None));
    }
    relay.conns.remove(&user);
    writer.abort();
}
