//! The writer: one OS thread, the only owner of the write connection.
//!
//! Message inserts are group-committed: the thread takes one queued request,
//! drains whatever else is already queued (up to `write_batch_max`), runs
//! them in one `BEGIN IMMEDIATE … COMMIT`, and only then replies and hands
//! the new rows to the [`CommitSink`] (the WebSocket hub), in id order. There
//! is no timer: an idle server commits a lone message at once, a busy one
//! commits large batches, one fsync each.
//!
//! Rarer writes (accounts, chats) go through the same thread, each in its
//! own transaction, so the database never sees two writers.
//!
//! The thread runs a synchronous rusqlite connection (the same bundled
//! SQLite as sqlx) with cached prepared statements, one row per statement.
//! It used to be a tokio task driving sqlx, whose SQLite driver runs each
//! connection on a thread of its own: every statement of a batch (BEGIN,
//! key look-up, INSERT, COMMIT) was a round trip between the two, two
//! thread wake-ups each. Now a batch costs one wake-up of this thread, and
//! the fan-out to the connections' queues ([`CommitSink`]) runs here too,
//! right after COMMIT. Blocking here (fsync) never holds up the runtime.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use super::{Message, StoreError, Timestamp, User, now_millis};
use crate::config::{DatabaseSettings, Synchronous};

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
/// Called on the writer thread: it must not block.
pub trait CommitSink: Send + Sync + 'static {
    /// `committed_at` is when COMMIT returned.
    fn committed(&self, batch: &[Arc<StoredMessage>], committed_at: Instant);

    /// Called once per batch with its size and commit duration (metrics).
    fn batch_committed(&self, _size: usize, _commit: Duration) {}
}

/// A sink that drops everything (tools and tests of the store alone).
pub struct NoopSink;

impl CommitSink for NoopSink {
    fn committed(&self, _batch: &[Arc<StoredMessage>], _committed_at: Instant) {}
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Receives a submitted message's outcome, on the writer thread: after
/// COMMIT and right after the message was handed to the [`CommitSink`], or
/// with an error when it was not stored. Must not block.
pub type OnCommit = Box<dyn FnOnce(Result<SendOutcome, StoreError>) + Send>;

const FIND_KEY: &str = "SELECT id, chat_id, content, created_at FROM messages
     WHERE sender_id = ?1 AND client_msg_id = ?2";
const INSERT_MESSAGE: &str =
    "INSERT INTO messages (chat_id, sender_id, content, client_msg_id, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5)";

/// A queued message insert.
struct Queued {
    msg: NewMessage,
    members: [i64; 2],
    on_commit: OnCommit,
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

/// Opens the write connection on `path` (already created and migrated) and
/// starts the writer thread.
pub(super) fn spawn(
    path: &Path,
    settings: &DatabaseSettings,
    sink: Arc<dyn CommitSink>,
) -> Result<WriterHandle, StoreError> {
    let conn = open(path, settings)?;
    let (tx, rx) = mpsc::channel(settings.write_queue);
    let writer = Writer {
        conn,
        rx,
        sink,
        batch_max: settings.write_batch_max,
        last_ts: 0,
    };
    std::thread::Builder::new()
        .name("shindensen-writer".into())
        .spawn(move || writer.run())?;
    Ok(WriterHandle { tx })
}

fn open(path: &Path, settings: &DatabaseSettings) -> Result<Connection, StoreError> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    // Every transaction here writes: take the write lock at BEGIN.
    conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
    conn.busy_timeout(Duration::from_millis(settings.busy_timeout_ms))?;
    let synchronous = match settings.synchronous {
        Synchronous::Off => "OFF",
        Synchronous::Normal => "NORMAL",
        Synchronous::Full => "FULL",
        Synchronous::Extra => "EXTRA",
    };
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
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

    /// Queues a message; `on_commit` gets the outcome after COMMIT.
    /// Messages queued by one caller are committed in the order queued.
    pub(super) async fn submit(
        &self,
        msg: NewMessage,
        members: [i64; 2],
        on_commit: OnCommit,
    ) -> Result<(), StoreError> {
        self.tx
            .send(Command::Send(Box::new(Queued {
                msg,
                members,
                on_commit,
            })))
            .await
            .map_err(|_| StoreError::Closed)
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

    /// Lets everything queued before it finish, then stops the thread and
    /// closes the connection.
    pub(super) async fn shutdown(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

struct Writer {
    conn: Connection,
    rx: mpsc::Receiver<Command>,
    sink: Arc<dyn CommitSink>,
    batch_max: usize,
    /// Timestamps never go backwards, even if the wall clock does.
    last_ts: i64,
}

/// Outcome of one row inside a batch transaction.
type RowResult = Result<SendOutcome, StoreError>;

impl Writer {
    fn run(mut self) {
        let mut batch: Vec<Queued> = Vec::with_capacity(self.batch_max);
        let mut next = self.rx.blocking_recv();
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
                    self.commit_messages(&mut batch);
                    if next.is_some() {
                        continue;
                    }
                }
                Command::CreateUser {
                    username,
                    password_hash,
                    reply,
                } => {
                    let res = self.create_user(&username, password_hash.as_deref());
                    let _ = reply.send(res);
                }
                Command::InitiateChat { a, b, reply } => {
                    let res = self.initiate_chat(a, b);
                    let _ = reply.send(res);
                }
                Command::Shutdown(done) => {
                    // Everything queued before the shutdown request has been
                    // handled; refuse what comes later.
                    self.rx.close();
                    while let Ok(cmd) = self.rx.try_recv() {
                        fail(cmd);
                    }
                    drop(self.conn);
                    let _ = done.send(());
                    return;
                }
            }
            next = self.rx.blocking_recv();
        }
    }

    fn timestamp(&mut self) -> i64 {
        self.last_ts = self.last_ts.max(now_millis());
        self.last_ts
    }

    fn commit_messages(&mut self, batch: &mut Vec<Queued>) {
        let ts = self.timestamp();
        let started = Instant::now();
        let span = tracing::info_span!(
            "db.write_batch",
            otel.name = "db.write_batch",
            db.system.name = "sqlite",
            db.operation.batch.size = batch.len()
        );
        let result = span.in_scope(|| insert_all(&mut self.conn, batch, ts));
        let committed_at = Instant::now();
        match result {
            Ok(outcomes) => {
                self.sink
                    .batch_committed(batch.len(), committed_at - started);
                // Each message's fan-out, then its outcome: the sender's
                // own copy and its ack land in its queue back to back, and
                // usually leave in one write.
                for (queued, outcome) in batch.drain(..).zip(outcomes) {
                    if let Ok(SendOutcome::Created(m)) = &outcome {
                        self.sink.committed(std::slice::from_ref(m), committed_at);
                    }
                    (queued.on_commit)(outcome);
                }
            }
            Err(e) => {
                // The transaction was rolled back: nothing of it is stored,
                // and every sender is told so (nothing was acknowledged).
                tracing::warn!(error = %e, size = batch.len(), "batch insert failed");
                for queued in batch.drain(..) {
                    (queued.on_commit)(Err(e.clone()));
                }
            }
        }
    }

    fn create_user(
        &mut self,
        username: &str,
        password_hash: Option<&str>,
    ) -> Result<Option<User>, StoreError> {
        let tx = self.conn.transaction()?;
        let id = insert_or_nothing(
            &tx,
            "INSERT INTO users (username, password_hash, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT DO NOTHING RETURNING id",
            params![username, password_hash, now_millis()],
        )?;
        tx.commit()?;
        Ok(id.map(|id| User {
            id,
            username: username.to_string(),
        }))
    }

    fn initiate_chat(&mut self, a: i64, b: i64) -> Result<(i64, bool), StoreError> {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let tx = self.conn.transaction()?;
        let created = insert_or_nothing(
            &tx,
            "INSERT INTO chats (user_a, user_b, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (user_a, user_b) DO NOTHING RETURNING id",
            params![lo, hi, now_millis()],
        )?;
        let result = match created {
            Some(id) => (id, true),
            None => {
                let id = tx
                    .prepare_cached("SELECT id FROM chats WHERE user_a = ?1 AND user_b = ?2")?
                    .query_row(params![lo, hi], |r| r.get(0))?;
                (id, false)
            }
        };
        tx.commit()?;
        Ok(result)
    }
}

/// Runs an `INSERT … ON CONFLICT DO NOTHING RETURNING id`: the new row's
/// id, or `None` when the row was already there.
fn insert_or_nothing(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<Option<i64>, StoreError> {
    Ok(tx
        .prepare_cached(sql)?
        .query_row(params, |r| r.get(0))
        .optional()?)
}

/// Inserts the batch in one transaction; nothing is visible or replied
/// before COMMIT returns. Per message: a look-up of its idempotency key
/// (if it has one), then the INSERT; both statements are prepared once and
/// cached. A row that fails a constraint (its chat is gone) gets its own
/// error and the others go on; any other failure rolls the whole batch back.
fn insert_all(
    conn: &mut Connection,
    batch: &[Queued],
    ts: i64,
) -> Result<Vec<RowResult>, StoreError> {
    let tx = conn.transaction()?;
    let outcomes = insert_rows(&tx, batch, ts)?;
    tx.commit()?;
    Ok(outcomes)
}

fn insert_rows(
    tx: &Transaction<'_>,
    batch: &[Queued],
    ts: i64,
) -> Result<Vec<RowResult>, StoreError> {
    let mut find = tx.prepare_cached(FIND_KEY)?;
    let mut insert = tx.prepare_cached(INSERT_MESSAGE)?;
    // Keys first used in this batch: a repeat is a duplicate of that row.
    let mut in_batch: HashMap<(i64, &str), Arc<StoredMessage>> = HashMap::new();
    let mut outcomes = Vec::with_capacity(batch.len());
    for q in batch {
        let m = &q.msg;
        if let Some(key) = m.client_msg_id.as_deref() {
            if let Some(first) = in_batch.get(&(m.sender_id, key)) {
                outcomes.push(Ok(SendOutcome::Duplicate(first.clone())));
                continue;
            }
            let found = find
                .query_row(params![m.sender_id, key], |r| {
                    Ok(Message {
                        id: r.get(0)?,
                        chat_id: r.get(1)?,
                        sender: m.sender.to_string(),
                        sender_id: m.sender_id,
                        content: r.get(2)?,
                        timestamp: Timestamp(r.get(3)?),
                    })
                })
                .optional()?;
            if let Some(message) = found {
                outcomes.push(Ok(SendOutcome::Duplicate(Arc::new(StoredMessage {
                    message,
                    client_msg_id: Some(key.to_string()),
                    members: q.members,
                }))));
                continue;
            }
        }
        match insert.execute(params![
            m.chat_id,
            m.sender_id,
            m.content,
            m.client_msg_id,
            ts
        ]) {
            Ok(_) => {}
            Err(e) if is_foreign_key(&e) => {
                // Only this statement was rolled back; the rest of the batch stands.
                outcomes.push(Err(StoreError::ChatNotFound));
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        let stored = Arc::new(StoredMessage {
            message: Message {
                id: tx.last_insert_rowid(),
                chat_id: m.chat_id,
                sender: m.sender.to_string(),
                sender_id: m.sender_id,
                content: m.content.clone(),
                timestamp: Timestamp(ts),
            },
            client_msg_id: m.client_msg_id.clone(),
            members: q.members,
        });
        if let Some(key) = m.client_msg_id.as_deref() {
            in_batch.insert((m.sender_id, key), stored.clone());
        }
        outcomes.push(Ok(SendOutcome::Created(stored)));
    }
    Ok(outcomes)
}

/// A foreign-key failure on insert means the chat (or sender) does not exist.
fn is_foreign_key(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(err, _)
        if err.code == ErrorCode::ConstraintViolation
            && err.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_FOREIGNKEY)
}

fn fail(cmd: Command) {
    match cmd {
        Command::Send(queued) => (queued.on_commit)(Err(StoreError::Closed)),
        Command::CreateUser { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::InitiateChat { reply, .. } => drop(reply.send(Err(StoreError::Closed))),
        Command::Shutdown(done) => drop(done.send(())),
    }
}
