//! Ordered delivery on a node of a PostgreSQL deployment.
//!
//! Several nodes write to one database; each message id is a position in
//! one stream, assigned under a row lock held to COMMIT, so the committed
//! ids are always a prefix `1..=last` of the stream. This task releases
//! positions to the [`CommitSink`] strictly in order, each exactly once:
//!
//! * A local commit (this node's writer) arrives with its messages and the
//!   answers of its sends; it is announced to the peers (NATS), and any
//!   positions before it that this node has not released yet are taken
//!   from the peers' announcements or read from the database first, so the
//!   local messages, and then their acks, follow them in order.
//! * Peers' announcements are buffered by position and released only when
//!   contiguous; a position still missing after `cluster.gap_wait_ms` is
//!   read from the database. Late or repeated announcements (below the
//!   released position) are dropped. So NATS may lose, delay, duplicate or
//!   reorder: delivery stays gap-free, duplicate-free and in order.
//! * Every `cluster.poll_interval_ms` the task reads what other nodes
//!   committed beyond its position, unless NATS is up and something
//!   arrived since the last tick (then any gap shows up as a hole before
//!   the next position heard of).
//!
//! The audience of a message is fixed at its commit. A local commit and
//! an announcement bring theirs (computed under the lock); for a message
//! read back, the node keeps each chat's members as of its position
//! (`View`), loaded exactly as of a position when first needed and moved
//! forward by the membership events it releases.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};

use crate::config::ClusterSettings;
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{
    Audience, CommitSink, Message, MessageKind, OnCommit, PeerLink, Peers, SendOutcome, StoreError,
    StoredMessage, Timestamp,
};
use crate::telemetry::metrics as m;

/// Rows read per query when catching up.
const PAGE: i64 = 1_000;
/// Chats whose members are kept; past this the view starts over (loads
/// are exact, so forgetting costs only a query).
const VIEW_MAX: usize = 100_000;

/// One entry of a local commit, in the order of the batch.
pub(super) struct Item {
    /// A message committed now, to release.
    pub message: Option<Arc<StoredMessage>>,
    /// The answer of a send, given after everything before it is released.
    pub answer: Option<(OnCommit, Result<SendOutcome, StoreError>)>,
}

enum Input {
    /// A local commit, its items in batch order.
    Local { items: Vec<Item> },
    /// Read the database now (a test, or a node told something is there).
    Poll(oneshot::Sender<()>),
}

#[derive(Clone)]
pub(super) struct SequencerHandle {
    tx: mpsc::Sender<Input>,
}

impl SequencerHandle {
    /// Hands a local commit over; its items are released and answered in order.
    pub async fn local(&self, items: Vec<Item>) {
        if let Err(mpsc::error::SendError(Input::Local { items })) =
            self.tx.send(Input::Local { items }).await
        {
            // The node is shutting down: answer what can still be answered.
            for item in items {
                if let Some((answer, outcome)) = item.answer {
                    answer(outcome);
                }
            }
        }
    }

    /// Resolves once the database has been read up to its current end.
    #[allow(dead_code)]
    pub async fn poll_now(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Input::Poll(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the task at position `next` (the first id not yet committed when
/// the node starts: nobody is connected to miss anything before it).
pub(super) fn spawn(
    pool: PgPool,
    sink: Arc<dyn CommitSink>,
    next: MessageId,
    settings: &ClusterSettings,
    peers: Option<Peers>,
) -> SequencerHandle {
    let (tx, rx) = mpsc::channel(1_024);
    let (link, incoming) = match peers {
        Some(p) => (Some(p.link), Some(p.incoming)),
        None => (None, None),
    };
    let task = Sequencer {
        pool,
        sink,
        next,
        held: VecDeque::new(),
        view: HashMap::new(),
        link,
        announced: BTreeMap::new(),
        gap_since: None,
        gap_wait: Duration::from_millis(settings.gap_wait_ms),
        heard: false,
    };
    tokio::spawn(task.run(
        rx,
        incoming,
        Duration::from_millis(settings.poll_interval_ms),
    ));
    SequencerHandle { tx }
}

struct Sequencer {
    pool: PgPool,
    sink: Arc<dyn CommitSink>,
    /// The first position not yet released.
    next: MessageId,
    /// Local commits waiting for earlier positions that could not be read.
    held: VecDeque<Vec<Item>>,
    /// Members of chats as of `next - 1`.
    view: HashMap<ChatId, Vec<UserId>>,
    /// Where local commits are announced; `None` on a node without NATS.
    link: Option<Arc<dyn PeerLink>>,
    /// Peers' announcements at or beyond `next`, waiting to be contiguous.
    announced: BTreeMap<MessageId, Arc<StoredMessage>>,
    /// Since when `announced` has had a hole at `next`.
    gap_since: Option<Instant>,
    gap_wait: Duration,
    /// Something new arrived since the last poll tick.
    heard: bool,
}

/// A message read back from the database, before its audience is known.
struct Row {
    message: Message,
    client_msg_id: Option<String>,
    subject: Option<UserId>,
}

impl Sequencer {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        mut incoming: Option<mpsc::Receiver<Vec<Arc<StoredMessage>>>>,
        poll_interval: Duration,
    ) {
        let mut poll = tokio::time::interval(poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let gap_deadline = self.gap_since.map(|t| t + self.gap_wait);
            tokio::select! {
                input = rx.recv() => match input {
                    Some(Input::Local { items }) => {
                        if let Some(link) = &self.link {
                            let batch: Vec<_> =
                                items.iter().filter_map(|i| i.message.clone()).collect();
                            if !batch.is_empty() {
                                link.publish(&batch);
                            }
                        }
                        self.heard = true;
                        self.held.push_back(items);
                        self.flush_held().await;
                    }
                    Some(Input::Poll(done)) => {
                        self.catch_up(None).await;
                        self.release_announced();
                        self.flush_held().await;
                        let _ = done.send(());
                    }
                    None => break,
                },
                batch = next_batch(&mut incoming) => match batch {
                    Some(batch) => {
                        self.on_announced(batch);
                        self.flush_held().await;
                    }
                    None => incoming = None,
                },
                _ = sleep_until(gap_deadline) => {
                    self.fill_gap().await;
                    self.flush_held().await;
                }
                _ = poll.tick() => {
                    let nats_up = self.link.as_ref().is_some_and(|l| l.connected());
                    if !(nats_up && self.heard) {
                        self.catch_up(None).await;
                        self.release_announced();
                        self.flush_held().await;
                    }
                    self.heard = false;
                }
            }
        }
        // Shutting down: answer whatever is still held.
        for items in self.held.drain(..) {
            for item in items {
                if let Some((answer, outcome)) = item.answer {
                    answer(outcome);
                }
            }
        }
    }

    /// Buffers peers' announcements and releases what became contiguous.
    fn on_announced(&mut self, batch: Vec<Arc<StoredMessage>>) {
        for msg in batch {
            let id = msg.message.id;
            if id >= self.next {
                self.heard = true;
                self.announced.entry(id).or_insert(msg);
            }
        }
        self.release_announced();
    }

    /// Releases announced positions from `next` on while they are contiguous.
    fn release_announced(&mut self) {
        let at = Instant::now();
        while let Some(entry) = self.announced.first_entry() {
            let id = *entry.key();
            if id < self.next {
                entry.remove();
                continue;
            }
            if id > self.next {
                break;
            }
            let msg = entry.remove();
            self.apply_to_view(&msg.message, Some(&msg.audience), None);
            self.sink.committed(&msg, at);
            counter!(m::SEQUENCER_FROM_PEERS).increment(1);
            self.next = MessageId(id.get() + 1);
        }
        gauge!(m::SEQUENCER_POSITION).set(self.next.get() as f64);
        self.gap_since = match self.announced.is_empty() {
            true => None,
            false => Some(self.gap_since.unwrap_or(at)),
        };
    }

    /// Reads the positions missing before the first announcement.
    async fn fill_gap(&mut self) {
        let Some(&first) = self.announced.keys().next() else {
            self.gap_since = None;
            return;
        };
        counter!(m::SEQUENCER_GAP_READS).increment(1);
        if !self.catch_up(Some(first)).await {
            // The database cannot be read right now: wait again.
            self.gap_since = Some(Instant::now());
            return;
        }
        self.gap_since = None;
        self.release_announced();
    }

    /// Releases held local commits, oldest first, as far as the positions
    /// before each can be read.
    async fn flush_held(&mut self) {
        loop {
            let first = match self.held.front() {
                None => return,
                Some(items) => items
                    .iter()
                    .filter_map(|i| i.message.as_ref())
                    .map(|m| m.message.id)
                    .min(),
            };
            if first.is_some_and(|f| f > self.next) {
                self.release_announced();
            }
            if let Some(first) = first
                && first > self.next
                && !self.catch_up(Some(first)).await
            {
                // The database cannot be read right now: keep waiting.
                return;
            }
            let Some(items) = self.held.pop_front() else {
                return;
            };
            let at = Instant::now();
            for item in items {
                if let Some(msg) = item.message
                    && msg.message.id >= self.next
                {
                    self.apply_to_view(&msg.message, Some(&msg.audience), None);
                    self.sink.committed(&msg, at);
                    self.next = MessageId(msg.message.id.get() + 1);
                }
                if let Some((answer, outcome)) = item.answer {
                    answer(outcome);
                }
            }
        }
    }

    /// Reads and releases every committed position from `next` (up to,
    /// not including, `until`). False when the database could not be read.
    async fn catch_up(&mut self, until: Option<MessageId>) -> bool {
        loop {
            if until.is_some_and(|u| self.next >= u) {
                return true;
            }
            let rows = match self.read_from(self.next, until).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "reading committed messages failed; retrying");
                    counter!(m::SEQUENCER_READ_ERRORS).increment(1);
                    return false;
                }
            };
            let n = rows.len();
            let at = Instant::now();
            for row in rows {
                if row.message.id < self.next {
                    continue;
                }
                if let Some(msg) = self.announced.remove(&row.message.id) {
                    // Announced already: it brings its audience.
                    self.apply_to_view(&msg.message, Some(&msg.audience), None);
                    self.sink.committed(&msg, at);
                    self.next = MessageId(row.message.id.get() + 1);
                    continue;
                }
                let audience = match self.audience_of(&row).await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "loading a chat's members failed; retrying");
                        counter!(m::SEQUENCER_READ_ERRORS).increment(1);
                        return false;
                    }
                };
                let id = row.message.id;
                let msg = Arc::new(StoredMessage {
                    message: row.message,
                    client_msg_id: row.client_msg_id,
                    audience,
                });
                self.sink.committed(&msg, at);
                counter!(m::SEQUENCER_READ_BACK).increment(1);
                self.next = MessageId(id.get() + 1);
            }
            gauge!(m::SEQUENCER_POSITION).set(self.next.get() as f64);
            if (n as i64) < PAGE {
                if let Some(u) = until
                    && self.next < u
                {
                    // Committed ids are a prefix of the stream, so this is
                    // a hole someone made by hand: say so, and go on.
                    tracing::error!(from = %self.next, to = %u, "positions missing from the messages table; skipping them");
                    self.next = u;
                }
                return true;
            }
        }
    }

    async fn read_from(
        &self,
        from: MessageId,
        until: Option<MessageId>,
    ) -> Result<Vec<Row>, StoreError> {
        let (from, until) = (from.get(), until.map_or(i64::MAX, MessageId::get));
        let rows = sqlx::query!(
            r#"SELECT m.id, m.chat_id, u.username, m.sender_id, m.kind, m.content, m.event,
                      m.subject_id, m.client_msg_id, m.created_at
               FROM messages m JOIN users u ON u.id = m.sender_id
               WHERE m.id >= $1 AND m.id < $2
               ORDER BY m.id LIMIT $3"#,
            from,
            until,
            PAGE
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|r| {
                Ok(Row {
                    message: Message {
                        id: MessageId(r.id),
                        chat_id: ChatId(r.chat_id),
                        sender: r.username,
                        sender_id: UserId(r.sender_id),
                        kind: MessageKind::parse(&r.kind)
                            .ok_or_else(|| StoreError::internal("unknown message kind"))?,
                        content: r.content,
                        event: r.event,
                        timestamp: Timestamp(r.created_at),
                    },
                    client_msg_id: r.client_msg_id,
                    subject: r.subject_id.map(UserId),
                })
            })
            .collect()
    }

    /// The audience of a message read back: the members as of its commit
    /// (for a membership event, before and after it).
    async fn audience_of(&mut self, row: &Row) -> Result<Audience, StoreError> {
        let chat = row.message.chat_id;
        let p = row.message.id;
        if !self.view.contains_key(&chat) {
            if self.view.len() >= VIEW_MAX {
                self.view.clear();
            }
            let members = members_as_of(&self.pool, chat, MessageId(p.get() - 1)).await?;
            self.view.insert(chat, members);
        }
        if row.message.kind == MessageKind::ChatCreated {
            let members = members_as_of(&self.pool, chat, p).await?;
            self.view.insert(chat, members);
        }
        let before: Vec<UserId> = self.view.get(&chat).cloned().unwrap_or_default();
        self.apply_to_view(&row.message, None, row.subject);
        let after = self.view.get(&chat).cloned().unwrap_or_default();
        let mut audience = before;
        for u in after {
            if !audience.contains(&u) {
                audience.push(u);
            }
        }
        Ok(audience.into())
    }

    /// Moves a chat's members in the view past `message` (if the view has
    /// the chat). A local commit gives its audience; a row its subject.
    fn apply_to_view(
        &mut self,
        message: &Message,
        audience: Option<&Audience>,
        subject: Option<UserId>,
    ) {
        let subject = subject.or_else(|| event_subject(message));
        match message.kind {
            MessageKind::ChatCreated => {
                if let Some(a) = audience {
                    self.view.insert(message.chat_id, a.to_vec());
                }
            }
            MessageKind::MemberAdded => {
                if let (Some(members), Some(u)) = (self.view.get_mut(&message.chat_id), subject)
                    && !members.contains(&u)
                {
                    members.push(u);
                }
            }
            MessageKind::MemberRemoved => {
                if let (Some(members), Some(u)) = (self.view.get_mut(&message.chat_id), subject) {
                    members.retain(|m| *m != u);
                }
            }
            _ => {}
        }
    }
}

/// The next batch from the peers; pending forever on a node without them.
async fn next_batch(
    incoming: &mut Option<mpsc::Receiver<Vec<Arc<StoredMessage>>>>,
) -> Option<Vec<Arc<StoredMessage>>> {
    match incoming {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; pending forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The user a membership event is about, from its details.
fn event_subject(message: &Message) -> Option<UserId> {
    let event: serde_json::Value = serde_json::from_str(message.event.as_deref()?).ok()?;
    event["user"]["id"].as_i64().map(UserId)
}

/// The members of `chat` as of position `at`: the current members, with
/// every membership event after `at` undone, read in one snapshot.
async fn members_as_of(
    pool: &PgPool,
    chat: ChatId,
    at: MessageId,
) -> Result<Vec<UserId>, StoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query!("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let chat_id = chat.get();
    let mut members: Vec<UserId> = sqlx::query_scalar!(
        "SELECT user_id FROM chat_members WHERE chat_id = $1 ORDER BY id",
        chat_id
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(UserId)
    .collect();
    let later = sqlx::query!(
        r#"SELECT kind, subject_id FROM messages
           WHERE chat_id = $1 AND id > $2
             AND kind IN ('chat_created', 'member_added', 'member_removed')
           ORDER BY id DESC"#,
        chat_id,
        at.get()
    )
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    for event in later {
        match (event.kind.as_str(), event.subject_id.map(UserId)) {
            ("chat_created", _) => members.clear(),
            ("member_added", Some(u)) => members.retain(|m| *m != u),
            ("member_removed", Some(u)) if !members.contains(&u) => members.push(u),
            _ => {}
        }
    }
    Ok(members)
}
