//! Fan-out across the nodes of a PostgreSQL deployment over NATS (core
//! NATS: at most once, no persistence).
//!
//! * After COMMIT a node announces its messages, with their audience, on
//!   `<subject>.commits`; the other nodes hand them to their store's
//!   sequencer, which releases positions in order and reads whatever is
//!   missing from PostgreSQL. NATS is only the fast path: a lost, late,
//!   repeated or reordered announcement costs a database read, never a
//!   gap, a duplicate or a reorder.
//! * Read and typing notices (never stored) go out on `<subject>.ephemeral`
//!   and the other nodes deliver them to their connections; while NATS is
//!   down they reach only the node's own connections.
//! * Publishing never blocks the writer: announcements go through a
//!   bounded queue and are dropped (and counted) while NATS is down.
//! * NATS being unreachable never stops a node: it starts, acks and
//!   delivers (by polling the database) and connects when NATS is back.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use metrics::{counter, gauge};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::{ClusterSettings, redacted_url};
use crate::domain::Notify;
use crate::domain::chats::{ReadNotice, TypingNotice};
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{Message, MessageKind, PeerLink, Peers, StoredMessage, Timestamp};
use crate::telemetry::metrics as m;

/// Announcements waiting to be published; past this they are dropped.
const OUTGOING_QUEUE: usize = 4_096;
/// Batches received and not yet taken by the sequencer.
const INCOMING_QUEUE: usize = 1_024;

/// This node's connection to NATS.
pub struct Cluster {
    outgoing: mpsc::Sender<(async_nats::Subject, bytes::Bytes)>,
    connected: Arc<AtomicBool>,
    commits: async_nats::Subject,
    ephemeral: async_nats::Subject,
}

impl Cluster {
    /// Starts connecting to `cluster.nats_url` (in the background: the node
    /// does not wait for NATS) and subscribes. Returns the link for the
    /// store and the channel of other nodes' commits.
    pub async fn connect(
        settings: &ClusterSettings,
        node: &str,
    ) -> anyhow::Result<(Arc<Cluster>, Peers, EphemeralFeed)> {
        let url = settings
            .nats_url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("cluster.nats_url is not set"))?;
        let shown = redacted_url(url);
        let connected = Arc::new(AtomicBool::new(false));
        gauge!(m::NATS_CONNECTED).set(0.0);
        let poll_ms = settings.poll_interval_ms;
        let flag = connected.clone();
        let events_url = shown.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("shindensen {node}"))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .ping_interval(Duration::from_secs(5))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2_000))
            })
            .event_callback(move |event| {
                let flag = flag.clone();
                let url = events_url.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            flag.store(true, Ordering::Relaxed);
                            gauge!(m::NATS_CONNECTED).set(1.0);
                            tracing::info!(%url, "connected to NATS: other nodes' messages arrive over NATS");
                        }
                        async_nats::Event::Disconnected => {
                            flag.store(false, Ordering::Relaxed);
                            gauge!(m::NATS_CONNECTED).set(0.0);
                            tracing::warn!(%url, poll_interval_ms = poll_ms,
                                "lost the NATS connection: reading other nodes' messages from the database until it is back");
                        }
                        other => tracing::warn!(%url, event = %other, "NATS"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|e| anyhow::anyhow!("cluster.nats_url ({shown}): {e}"))?;

        let commits = async_nats::Subject::from(format!("{}.commits", settings.nats_subject));
        let ephemeral = async_nats::Subject::from(format!("{}.ephemeral", settings.nats_subject));
        let commit_sub = client.subscribe(commits.clone()).await?;
        let ephemeral_sub = client.subscribe(ephemeral.clone()).await?;

        let (outgoing, queue) = mpsc::channel(OUTGOING_QUEUE);
        tokio::spawn(publish(client.clone(), queue));
        let (tx, incoming) = mpsc::channel(INCOMING_QUEUE);
        tokio::spawn(receive_commits(commit_sub, tx));

        let cluster = Arc::new(Cluster {
            outgoing,
            connected,
            commits,
            ephemeral,
        });
        let peers = Peers {
            link: cluster.clone(),
            incoming,
        };
        Ok((cluster, peers, EphemeralFeed(ephemeral_sub)))
    }

    /// A [`Notify`] that tells `local` (this node's hub) and the other nodes.
    pub fn notify(self: &Arc<Self>, local: Arc<dyn Notify>) -> Arc<dyn Notify> {
        Arc::new(ClusterNotify {
            local,
            cluster: self.clone(),
        })
    }

    fn enqueue(&self, subject: &async_nats::Subject, payload: Vec<u8>, kind: &'static str) {
        if !self.connected.load(Ordering::Relaxed) {
            counter!(m::NATS_DROPPED, "kind" => kind).increment(1);
            return;
        }
        if self
            .outgoing
            .try_send((subject.clone(), payload.into()))
            .is_err()
        {
            counter!(m::NATS_DROPPED, "kind" => kind).increment(1);
        }
    }
}

impl PeerLink for Cluster {
    fn publish(&self, batch: &[Arc<StoredMessage>]) {
        let wire: Vec<WireMessage> = batch.iter().map(|m| WireMessage::from(&**m)).collect();
        match serde_json::to_vec(&wire) {
            Ok(payload) => self.enqueue(&self.commits, payload, "commits"),
            Err(e) => tracing::error!(error = %e, "encoding an announcement failed"),
        }
    }

    fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

/// Publishes queued announcements in order.
async fn publish(
    client: async_nats::Client,
    mut queue: mpsc::Receiver<(async_nats::Subject, bytes::Bytes)>,
) {
    while let Some((subject, payload)) = queue.recv().await {
        let kind = if subject.ends_with(".commits") {
            "commits"
        } else {
            "ephemeral"
        };
        match client.publish(subject, payload).await {
            Ok(()) => counter!(m::NATS_PUBLISHED, "kind" => kind).increment(1),
            Err(e) => {
                counter!(m::NATS_DROPPED, "kind" => kind).increment(1);
                tracing::debug!(error = %e, "publishing to NATS failed");
            }
        }
    }
}

/// Decodes other nodes' commit announcements for the sequencer.
async fn receive_commits(
    mut sub: async_nats::Subscriber,
    tx: mpsc::Sender<Vec<Arc<StoredMessage>>>,
) {
    use futures_util::StreamExt;
    while let Some(msg) = sub.next().await {
        counter!(m::NATS_RECEIVED, "kind" => "commits").increment(1);
        let batch: Vec<StoredMessage> =
            match serde_json::from_slice::<Vec<WireMessage>>(&msg.payload)
                .map_err(|e| e.to_string())
                .and_then(|w| w.into_iter().map(StoredMessage::try_from).collect())
            {
                Ok(batch) => batch,
                Err(e) => {
                    counter!(m::NATS_DECODE_ERRORS).increment(1);
                    tracing::warn!(error = %e, "ignoring an undecodable announcement");
                    continue;
                }
            };
        let batch: Vec<Arc<StoredMessage>> = batch.into_iter().map(Arc::new).collect();
        if tx.send(batch).await.is_err() {
            return;
        }
    }
}

/// Other nodes' read and typing notices, to hand to this node's hub
/// ([`EphemeralFeed::deliver_to`]) once it exists.
pub struct EphemeralFeed(async_nats::Subscriber);

impl EphemeralFeed {
    /// Delivers every notice from other nodes to `local`'s connections.
    pub fn deliver_to(self, local: Arc<dyn Notify>) {
        let mut sub = self.0;
        tokio::spawn(async move {
            use futures_util::StreamExt;
            while let Some(msg) = sub.next().await {
                counter!(m::NATS_RECEIVED, "kind" => "ephemeral").increment(1);
                match serde_json::from_slice::<WireNotice>(&msg.payload) {
                    Ok(WireNotice::Read {
                        chat,
                        user,
                        username,
                        up_to,
                        audience,
                    }) => local.read(
                        &ReadNotice {
                            chat: ChatId(chat),
                            user: UserId(user),
                            username: username.into(),
                            up_to: MessageId(up_to),
                            except: None,
                        },
                        &to_users(&audience),
                    ),
                    Ok(WireNotice::Typing {
                        chat,
                        user,
                        username,
                        audience,
                    }) => local.typing(
                        &TypingNotice {
                            chat: ChatId(chat),
                            user: UserId(user),
                            username: username.into(),
                        },
                        &to_users(&audience),
                    ),
                    Err(e) => {
                        counter!(m::NATS_DECODE_ERRORS).increment(1);
                        tracing::warn!(error = %e, "ignoring an undecodable notice");
                    }
                }
            }
        });
    }
}

/// Tells this node's connections, then the other nodes.
struct ClusterNotify {
    local: Arc<dyn Notify>,
    cluster: Arc<Cluster>,
}

impl ClusterNotify {
    fn announce(&self, notice: &WireNotice) {
        if let Ok(payload) = serde_json::to_vec(notice) {
            self.cluster
                .enqueue(&self.cluster.ephemeral, payload, "ephemeral");
        }
    }
}

impl Notify for ClusterNotify {
    fn read(&self, notice: &ReadNotice, audience: &[UserId]) {
        self.local.read(notice, audience);
        self.announce(&WireNotice::Read {
            chat: notice.chat.get(),
            user: notice.user.get(),
            username: notice.username.to_string(),
            up_to: notice.up_to.get(),
            audience: audience.iter().map(|u| u.get()).collect(),
        });
    }

    fn typing(&self, notice: &TypingNotice, audience: &[UserId]) {
        self.local.typing(notice, audience);
        self.announce(&WireNotice::Typing {
            chat: notice.chat.get(),
            user: notice.user.get(),
            username: notice.username.to_string(),
            audience: audience.iter().map(|u| u.get()).collect(),
        });
    }
}

fn to_users(ids: &[i64]) -> Vec<UserId> {
    ids.iter().copied().map(UserId).collect()
}

/// A committed message as announced between nodes.
#[derive(Serialize, Deserialize)]
struct WireMessage {
    id: i64,
    chat: i64,
    sender: String,
    sender_id: i64,
    kind: String,
    content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event: Option<String>,
    ts: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_msg_id: Option<String>,
    audience: Vec<i64>,
}

impl From<&StoredMessage> for WireMessage {
    fn from(s: &StoredMessage) -> Self {
        let m = &s.message;
        WireMessage {
            id: m.id.get(),
            chat: m.chat_id.get(),
            sender: m.sender.clone(),
            sender_id: m.sender_id.get(),
            kind: m.kind.as_str().to_string(),
            content: m.content.clone(),
            event: m.event.clone(),
            ts: m.timestamp.0,
            client_msg_id: s.client_msg_id.clone(),
            audience: s.audience.iter().map(|u| u.get()).collect(),
        }
    }
}

impl TryFrom<WireMessage> for StoredMessage {
    type Error = String;
    fn try_from(w: WireMessage) -> Result<Self, String> {
        if w.id <= 0 || w.chat <= 0 {
            return Err(format!("invalid ids {} / {}", w.id, w.chat));
        }
        Ok(StoredMessage {
            message: Message {
                id: MessageId(w.id),
                chat_id: ChatId(w.chat),
                sender: w.sender,
                sender_id: UserId(w.sender_id),
                kind: MessageKind::parse(&w.kind)
                    .ok_or_else(|| format!("unknown message kind {:?}", w.kind))?,
                content: w.content,
                event: w.event,
                timestamp: Timestamp(w.ts),
            },
            client_msg_id: w.client_msg_id,
            audience: to_users(&w.audience).into(),
        })
    }
}

/// A read or typing notice as announced between nodes.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum WireNotice {
    Read {
        chat: i64,
        user: i64,
        username: String,
        up_to: i64,
        audience: Vec<i64>,
    },
    Typing {
        chat: i64,
        user: i64,
        username: String,
        audience: Vec<i64>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announced_message_decodes_to_what_was_committed() {
        let stored = StoredMessage {
            message: Message {
                id: MessageId(7),
                chat_id: ChatId(3),
                sender: "alice".into(),
                sender_id: UserId(1),
                kind: MessageKind::MemberAdded,
                content: "alice added bob".into(),
                event: Some(r#"{"user":{"id":2}}"#.into()),
                timestamp: Timestamp(1_700_000_000_123),
            },
            client_msg_id: Some("k-1".into()),
            audience: vec![UserId(1), UserId(2)].into(),
        };
        let bytes = serde_json::to_vec(&[WireMessage::from(&stored)]).unwrap();
        let back: Vec<WireMessage> = serde_json::from_slice(&bytes).unwrap();
        let back = StoredMessage::try_from(back.into_iter().next().unwrap()).unwrap();
        assert_eq!(back.message, stored.message);
        assert_eq!(back.client_msg_id, stored.client_msg_id);
        assert_eq!(&*back.audience, &*stored.audience);
    }

    #[test]
    fn nonsense_is_refused() {
        let w: WireMessage = serde_json::from_str(
            r#"{"id":0,"chat":1,"sender":"a","sender_id":1,"kind":"text","content":"x","ts":1,"audience":[]}"#,
        )
        .unwrap();
        assert!(StoredMessage::try_from(w).is_err());
        let w: WireMessage = serde_json::from_str(
            r#"{"id":1,"chat":1,"sender":"a","sender_id":1,"kind":"bogus","content":"x","ts":1,"audience":[]}"#,
        )
        .unwrap();
        assert!(StoredMessage::try_from(w).is_err());
    }
}
