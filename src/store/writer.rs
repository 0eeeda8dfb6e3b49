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
//!
//! WAL checkpoints are the writer's too, but after a batch's fan-out
//! rather than inside its COMMIT: SQLite's automatic checkpoint runs in
//! the COMMIT that grows the WAL past 1,000 frames (copying them into the
//! database file and syncing it), so that batch's messages waited for it.
//! A WAL hook now only notes the WAL's size, and the writer checkpoints
//! (PASSIVE, same threshold) once the batch is delivered and acked. Being
//! the only checkpointer, it keeps the WAL from growing: the next write
//! after a complete checkpoint starts the WAL over.

use std::cell::Cell;
use std::os::raw::c_int;
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
/// A repeated `(sender_id, client_msg_id)` hits the unique index and
/// inserts nothing (no row changed); only then is the original looked up.
/// (No `RETURNING id`: SQLite buffers returned rows in a temporary table,
/// dearer than reading the last rowid.)
const INSERT_MESSAGE: &str =
    "INSERT INTO messages (chat_id, sender_id, content, client_msg_id, created_at)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT DO NOTHING";

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

/// WAL frames after which the writer checkpoints (SQLite's automatic
/// checkpoint threshold).
const CHECKPOINT_FRAMES: c_int = 1_000;

thread_local! {
    /// Frames in the WAL after the writer thread's last commit.
    static WAL_FRAMES: Cell<c_int> = const { Cell::new(0) };
}

/// The writer connection's WAL hook, called inside COMMIT on the writer
/// thread. Installing it replaces SQLite's automatic checkpoint, which
/// would run right here; the writer runs it after the fan-out instead.
fn note_wal_frames(_: &rusqlite::hooks::Wal, frames: c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
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
    conn.wal_hook(Some(note_wal_frames));
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
                    self.checkpoint_if_due();
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
                    self.checkpoint_if_due();
                }
                Command::InitiateChat { a, b, reply } => {
                    let res = self.initiate_chat(a, b);
                    let _ = reply.send(res);
                    self.checkpoint_if_due();
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

    /// Checkpoints once the WAL has grown past [`CHECKPOINT_FRAMES`]; called
    /// after a write's replies and fan-out, never inside its COMMIT.
    fn checkpoint_if_due(&mut self) {
        if WAL_FRAMES.get() < CHECKPOINT_FRAMES {
            return;
        }
        WAL_FRAMES.set(0);
        // PASSIVE: copies what no reader still needs, never waits for one.
        if let Err(e) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        {
            tracing::warn!(error = %e, "WAL checkpoint failed");
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
/// before COMMIT returns. Per message one INSERT, whose unique index on
/// `(sender_id, client_msg_id)` tells a repeated key (also one first used
/// earlier in this batch: the transaction sees its own rows); only a
/// repeat is looked up. Both statements are prepared once and cached. A
/// row that fails a constraint (its chat is gone) gets its own error and
/// the others go on; any other failure rolls the whole batch back.
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
    let mut insert = tx.prepare_cached(INSERT_MESSAGE)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for q in batch {
        let m = &q.msg;
        let inserted = insert.execute(params![
            m.chat_id,
            m.sender_id,
            m.content,
            m.client_msg_id,
            ts
        ]);
        let outcome = match inserted {
            Ok(1) => SendOutcome::Created(Arc::new(StoredMessage {
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
            })),
            // Nothing inserted: only the idempotency index can refuse a row.
            Ok(_) => SendOutcome::Duplicate(Arc::new(original(tx, q)?)),
            Err(e) if is_foreign_key(&e) => {
                // Only this statement was rolled back; the rest of the batch stands.
                outcomes.push(Err(StoreError::ChatNotFound));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        outcomes.push(Ok(outcome));
    }
    Ok(outcomes)
}

/// The message first stored under `q`'s sender and `client_msg_id`.
fn original(tx: &Transaction<'_>, q: &Queued) -> Result<StoredMessage, StoreError> {
    let m = &q.msg;
    let key = m.client_msg_id.as_deref().ok_or_else(|| {
        StoreError::Io(Arc::new(std::io::Error::other(
            "insert refused a message without an idempotency key",
        )))
    })?;
    let message = tx
        .prepare_cached(FIND_KEY)?
        .query_row(params![m.sender_id, key], |r| {
            Ok(Message {
                id: r.get(0)?,
                chat_id: r.get(1)?,
                sender: m.sender.to_string(),
                sender_id: m.sender_id,
                content: r.get(2)?,
                timestamp: Timestamp(r.get(3)?),
            })
        })?;
    Ok(StoredMessage {
        message,
        client_msg_id: Some(key.to_string()),
        members: q.members,
    })
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
