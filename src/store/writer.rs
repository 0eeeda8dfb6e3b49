//! The writer task: the only owner of the write connection.
//!
//! Message inserts are group-committed: the task takes one queued request,
//! drains whatever else is already queued (up to `write_batch_max`), runs
//! them in one `BEGIN IMMEDIATE … COMMIT`, and only then replies and hands
//! the new rows to the [`CommitSink`] (the WebSocket hub), in id order. There
//! is no timer: an idle server commits a lone message at once, a busy one
//! commits large batches, one fsync each.
//!
//! Rarer writes (accounts, chats) go through the same task, each in its own
//! transaction, so the database never sees two writers.

use std::sync::Arc;
use std::time::Instant;

use std::collections::HashMap;

use sqlx::{Connection, QueryBuilder, Row, Sqlite, SqliteConnection};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{Message, StoreError, Timestamp, User, now_millis};
use crate::config::DatabaseSettings;

/// A message to store.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub chat_id: i64,
    pub sender_id: i64,
    /// The sender's username, carried along so the writer need not look it up.
    pub sender: Arc<str>,
    pub content: String,
    pub client_msg_id: Option<String>,
}

/// A committed message, the idempotency key it was sent with, and the
/// members of its chat (its audience).
#[derive(Debug)]
pub struct StoredMessage {
    pub message: Message,
    pub client_msg_id: Option<String>,
    pub members: [i64; 2],
}

#[derive(Debug, Clone)]
pub enum SendOutcome {
    /// Stored now.
    Created(Arc<StoredMessage>),
    /// The sender used this `client_msg_id` before; nothing new was stored.
    Duplicate(Arc<StoredMessage>),
}

impl SendOutcome {
    pub fn stored(&self) -> &Arc<StoredMessage> {
        match self {
            SendOutcome::Created(m) | SendOutcome::Duplicate(m) => m,
        }
    }
}

/// Receives every newly committed message, in id order, right after COMMIT.
/// Called on the writer task: it must not block.
pub trait CommitSink: Send + Sync + 'static {
    /// `committed_at` is when COMMIT returned.
    fn committed(&self, batch: &[Arc<StoredMessage>], committed_at: Instant);

    /// Called once per batch with its size and commit duration (metrics).
    fn batch_committed(&self, _size: usize, _commit: std::time::Duration) {}
}

/// A sink that drops everything (tools and tests of the store alone).
pub struct NoopSink;

impl CommitSink for NoopSink {
    fn committed(&self, _batch: &[Arc<StoredMessage>], _committed_at: Instant) {}
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Keys looked up per statement (2 variables each).
const KEY_LOOKUP_CHUNK: usize = 400;
/// Rows inserted per statement (5 variables each; SQLite allows 32,766).
const INSERT_CHUNK: usize = 1000;

/// A queued message insert.
struct Queued {
    msg: NewMessage,
    members: [i64; 2],
    reply: Reply<SendOutcome>,
}

enum Command {
    Send(Box<Queued>),
    CreateUser {
        username: String,
        password_hash: Option<String>,
        reply: Reply<Option<User>>,
    },
    InitiateChat {
        a: i64,
        b: i64,
        reply: Reply<(i64, bool)>,
    },
    Shutdown(oneshot::Sender<()>),
}

#[derive(Clone)]
pub(super) struct WriterHandle {
    tx: mpsc::Sender<Command>,
}

pub(super) fn spawn(
    conn: SqliteConnection,
    settings: &DatabaseSettings,
    sink: Arc<dyn CommitSink>,
) -> WriterHandle {
    let (tx, rx) = mpsc::channel(settings.write_queue);
    let writer = Writer {
        conn,
        rx,
        sink,
        batch_max: settings.write_batch_max,
        last_ts: 0,
    };
    tokio::spawn(writer.run());
    WriterHandle { tx }
}

impl WriterHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a message; the receiver yields the outcome after COMMIT.
    /// Messages queued by one caller are committed in the order queued.
    pub(super) async fn submit(
        &self,
        msg: NewMessage,
        members: [i64; 2],
    ) -> Result<oneshot::Receiver<Result<SendOutcome, StoreError>>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Send(Box::new(Queued {
                msg,
                members,
                reply,
            })))
            .await
            .map_err(|_| StoreError::Closed)?;
        Ok(rx)
    }

    pub(super) async fn create_user(
        &self,
        username: String,
        password_hash: Option<String>,
    ) -> Result<Option<User>, StoreError> {
        self.call(|reply| Command::CreateUser {
            username,
            password_hash,
            reply,
        })
        .await
    }

    pub(super) async fn initiate_chat(&self, a: i64, b: i64) -> Result<(i64, bool), StoreError> {
        self.call(|reply| Command::InitiateChat { a, b, reply })
            .await
    }

    pub(super) async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    conn: SqliteConnection,
    rx: mpsc::Receiver<Command>,
    sink: Arc<dyn CommitSink>,
    batch_max: usize,
    /// Timestamps never go backwards, even if the wall clock does.
    last_ts: i64,
}

impl Writer {
    async fn run(mut self) {
        let mut batch: Vec<Queued> = Vec::with_capacity(self.batch_max);
        let mut next = self.rx.recv().await;
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Send(queued) => {
                    batch.push(*queued);
                    // Drain what is already queued; stop at the first non-send.
                    while batch.len() < self.batch_max {
                        match self.rx.try_recv() {
                            Ok(Command::Send(queued)) => batch.push(*queued),
                            Ok(other) => {
                                next = Some(other);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    self.commit_messages(&mut batch).await;
                    if next.is_some() {
                        continue;
                    }
                }
                Command::CreateUser {
                    username,
                    password_hash,
                    reply,
                } => {
                    let res = self.create_user(&username, password_hash.as_deref()).await;
                    let _ = reply.send(res);
                }
                Command::InitiateChat { a, b, reply } => {
                    let res = self.initiate_chat(a, b).await;
                    let _ = reply.send(res);
                }
                Command::Shutdown(done) => {
                    // Everything queued before the shutdown request has been
                    // handled; refuse what comes later.
                    self.rx.close();
                    while let Ok(cmd) = self.rx.try_recv() {
                        fail(cmd);
                    }
                    let _ = self.conn.close().await;
                    let _ = done.send(());
                    return;
                }
            }
            next = self.rx.recv().await;
        }
        let _ = self.conn.close().await;
    }

    fn timestamp(&mut self) -> i64 {
        self.last_ts = self.last_ts.max(now_millis());
        self.last_ts
    }

    async fn commit_messages(&mut self, batch: &mut Vec<Queued>) {
        let ts = self.timestamp();
        let started = Instant::now();
        let span = tracing::info_span!(
            "db.write_batch",
            otel.name = "db.write_batch",
            db.system.name = "sqlite",
            db.operation.batch.size = batch.len()
        );
        let result = self.insert_all(batch, ts).instrument(span).await;
        let committed_at = Instant::now();
        match result {
            Ok(outcomes) => {
                let size = batch.len();
                self.sink.batch_committed(size, committed_at - started);
                let created: Vec<Arc<StoredMessage>> = outcomes
                    .iter()
                    .filter_map(|o| match o {
                        SendOutcome::Created(m) => Some(m.clone()),
                        SendOutcome::Duplicate(_) => None,
                    })
                    .collect();
                if !created.is_empty() {
                    self.sink.committed(&created, committed_at);
                }
                for (queued, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = queued.reply.send(Ok(outcome));
                }
            }
            Err(batch_err) => {
                // One bad request must not sink the others: retry one by one,
                // each in its own transaction, and report each result.
                tracing::warn!(error = %batch_err, size = batch.len(), "batch insert failed; retrying one by one");
                for queued in batch.drain(..) {
                    let res = self.insert_all(std::slice::from_ref(&queued), ts).await;
                    let reply = queued.reply;
                    match res {
                        Ok(mut outcomes) => {
                            let outcome = outcomes.pop().expect("one outcome");
                            if let SendOutcome::Created(m) = &outcome {
                                self.sink.committed(std::slice::from_ref(m), Instant::now());
                            }
                            let _ = reply.send(Ok(outcome));
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
            }
        }
    }

    /// Inserts the batch in one transaction; nothing is visible or replied
    /// before COMMIT returns. Three statements per batch, whatever its size:
    /// one look-up of the idempotency keys already stored, one multi-row
    /// INSERT of the new messages, COMMIT. (These are the store's only
    /// dynamic queries; the shape is fixed, only the row count varies.)
    async fn insert_all(
        &mut self,
        batch: &[Queued],
        ts: i64,
    ) -> Result<Vec<SendOutcome>, StoreError> {
        let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;

        // Keys this batch uses that are already stored: those sends are duplicates.
        let mut stored: HashMap<(i64, &str), Arc<StoredMessage>> = HashMap::new();
        let keyed: Vec<&Queued> = batch
            .iter()
            .filter(|q| q.msg.client_msg_id.is_some())
            .collect();
        for chunk in keyed.chunks(KEY_LOOKUP_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "SELECT k.column1 AS sender_id, k.column2 AS client_msg_id, m.id, m.chat_id, m.content, m.created_at FROM (",
            );
            qb.push_values(chunk, |mut row, q| {
                row.push_bind(q.msg.sender_id)
                    .push_bind(q.msg.client_msg_id.as_deref());
            });
            qb.push(
                ") AS k JOIN messages m ON m.sender_id = k.column1 AND m.client_msg_id = k.column2",
            );
            for row in qb.build().fetch_all(&mut *tx).await? {
                let sender_id: i64 = row.try_get("sender_id")?;
                let key: String = row.try_get("client_msg_id")?;
                let Some(q) = chunk.iter().find(|q| {
                    q.msg.sender_id == sender_id
                        && q.msg.client_msg_id.as_deref() == Some(key.as_str())
                }) else {
                    continue;
                };
                let message = Message {
                    id: row.try_get("id")?,
                    chat_id: row.try_get("chat_id")?,
                    sender: q.msg.sender.to_string(),
                    sender_id,
                    content: row.try_get("content")?,
                    timestamp: Timestamp(row.try_get("created_at")?),
                };
                let key_ref = q.msg.client_msg_id.as_deref().unwrap_or_default();
                stored.insert(
                    (sender_id, key_ref),
                    Arc::new(StoredMessage {
                        message,
                        client_msg_id: Some(key),
                        members: q.members,
                    }),
                );
            }
        }

        // New rows, in queue order; a key repeated within the batch is stored once.
        let mut fresh: Vec<usize> = Vec::with_capacity(batch.len());
        let mut first_use: HashMap<(i64, &str), usize> = HashMap::new();
        for (i, q) in batch.iter().enumerate() {
            if let Some(key) = q.msg.client_msg_id.as_deref() {
                if stored.contains_key(&(q.msg.sender_id, key)) {
                    continue;
                }
                if first_use.insert((q.msg.sender_id, key), i).is_some() {
                    continue;
                }
            }
            fresh.push(i);
        }
        let mut ids: Vec<i64> = Vec::with_capacity(fresh.len());
        for chunk in fresh.chunks(INSERT_CHUNK) {
            let mut qb = QueryBuilder::<Sqlite>::new(
                "INSERT INTO messages (chat_id, sender_id, content, client_msg_id, created_at) ",
            );
            qb.push_values(chunk, |mut row, &i| {
                let m = &batch[i].msg;
                row.push_bind(m.chat_id)
                    .push_bind(m.sender_id)
                    .push_bind(m.content.as_str())
                    .push_bind(m.client_msg_id.as_deref())
                    .push_bind(ts);
            });
            qb.push(" RETURNING id");
            let mut chunk_ids: Vec<i64> = qb
                .build_query_scalar::<i64>()
                .fetch_all(&mut *tx)
                .await
                .map_err(map_fk)?;
            // The single writer assigns rowids in VALUES order: ascending ids
            // are the rows in order.
            chunk_ids.sort_unstable();
            ids.extend(chunk_ids);
        }
        if ids.len() != fresh.len() {
            return Err(StoreError::Database(Arc::new(sqlx::Error::Protocol(
                format!("inserted {} rows for {} messages", ids.len(), fresh.len()),
            ))));
        }
        tx.commit().await?;

        let mut created: HashMap<usize, Arc<StoredMessage>> = HashMap::with_capacity(fresh.len());
        for (&i, id) in fresh.iter().zip(ids) {
            let q = &batch[i];
            created.insert(
                i,
                Arc::new(StoredMessage {
                    message: Message {
                        id,
                        chat_id: q.msg.chat_id,
                        sender: q.msg.sender.to_string(),
                        sender_id: q.msg.sender_id,
                        content: q.msg.content.clone(),
                        timestamp: Timestamp(ts),
                    },
                    client_msg_id: q.msg.client_msg_id.clone(),
                    members: q.members,
                }),
            );
        }
        Ok(batch
            .iter()
            .enumerate()
            .map(|(i, q)| {
                if let Some(m) = created.get(&i) {
                    return SendOutcome::Created(m.clone());
                }
                let key = (
                    q.msg.sender_id,
                    q.msg.client_msg_id.as_deref().unwrap_or_default(),
                );
                match stored.get(&key) {
                    Some(m) => SendOutcome::Duplicate(m.clone()),
                    // Repeated within this batch: the duplicate of its first use.
                    None => SendOutcome::Duplicate(created[&first_use[&key]].clone()),
                }
            })
            .collect())
    }

    async fn create_user(
        &mut self,
        username: &str,
        password_hash: Option<&str>,
    ) -> Result<Option<User>, StoreError> {
        let now = now_millis();
        let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
        let id = sqlx::query_scalar!(
            "INSERT INTO users (username, password_hash, created_at) VALUES (?, ?, ?)
             ON CONFLICT DO NOTHING RETURNING id AS \"id!\"",
            username,
            password_hash,
            now
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id.map(|id| User {
            id,
            username: username.to_string(),
        }))
    }

    async fn initiate_chat(&mut self, a: i64, b: i64) -> Result<(i64, bool), StoreError> {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let now = now_millis();
        let mut tx = self.conn.begin_with("BEGIN IMMEDIATE").await?;
        let created = sqlx::query_scalar!(
            "INSERT INTO chats (user_a, user_b, created_at) VALUES (?, ?, ?)
             ON CONFLICT (user_a, user_b) DO NOTHING RETURNING id AS \"id!\"",
            lo,
            hi,
            now
        )
        .fetch_optional(&mut *tx)
        .await?;
        let result = match created {
            Some(id) => (id, true),
            None => {
                let id = sqlx::query_scalar!(
                    r#"SELECT id AS "id!" FROM chats WHERE user_a = ? AND user_b = ?"#,
                    lo,
                    hi
                )
                .fetch_one(&mut *tx)
                .await?;
                (id, false)
            }
        };
        tx.commit().await?;
        Ok(result)
    }
}

/// A foreign-key failure on insert means the chat (or sender) does not exist.
fn map_fk(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => StoreError::ChatNotFound,
        _ => e.into(),
    }
}

fn fail(cmd: Command) {
    match cmd {
        Command::Send(queued) => drop(queued.reply.send(Err(StoreError::Closed))),
        Command::CreateUser { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::InitiateChat { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Shutdown(done) => drop(done.send(())),
    }
}
