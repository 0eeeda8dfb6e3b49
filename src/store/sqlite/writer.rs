//! The writer: one OS thread, the only owner of the write connection.
//!
//! * Group commit: the thread takes one queued send, drains whatever else
//!   is queued (up to `write_batch_max`), runs them in one `BEGIN
//!   IMMEDIATE … COMMIT`, and only then hands each new message to the
//!   [`CommitSink`] and answers it, message by message, in id order. No
//!   timers: an idle server commits a lone message at once.
//! * Membership is checked here, at insert time, so it is serialized with
//!   the inserts; a row that fails (not a member, no such chat) fails alone.
//! * Other writes (accounts, chats, membership, read markers) go through
//!   the same thread, each in its own transaction: the database never sees
//!   two writers, and a membership change and a send are never concurrent.
//! * WAL checkpoints run on a checkpointer thread with its own connection,
//!   asked every `wal_checkpoint_frames`, while the writer goes on
//!   committing; the writer copies the last few frames itself, between two
//!   batches, once the WAL is four times that long, so the WAL starts over
//!   and stays bounded (docs/decisions/0013-checkpointer-thread.md).
//!
//! Why a thread with rusqlite rather than a task driving sqlx:
//! docs/decisions/0001-writer-thread.md.

use std::cell::Cell;
use std::os::raw::c_int;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Instant;

use metrics::{counter, histogram};
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, Transaction, params};
use tokio::sync::{mpsc, oneshot};

use super::{Members, groups};
use crate::config::{DatabaseSettings, Synchronous};
use crate::ids::{ChatId, MessageId, UserId};
use crate::store::{
    Audience, CommitSink, Entity, GroupChange, Message, MessageKind, NewGroup, NewMessage,
    OnCommit, ReadMarker, SendOutcome, StoreError, StoredMessage, Timestamp, User, now_millis,
};
use crate::telemetry::metrics as m;

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

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
        a: UserId,
        b: UserId,
        reply: Reply<(ChatId, bool)>,
    },
    CreateGroup {
        group: NewGroup,
        reply: Reply<ChatId>,
    },
    ChangeGroup {
        chat: ChatId,
        actor: UserId,
        change: GroupChange,
        max_members: usize,
        reply: Reply<()>,
    },
    MarkRead {
        chat: ChatId,
        user: UserId,
        up_to: MessageId,
        reply: Reply<ReadMarker>,
    },
    SetPassword {
        user: UserId,
        password_hash: String,
        reply: Reply<Option<String>>,
    },
    RevokeToken {
        jti: String,
        expires_at: i64,
        reply: Reply<()>,
    },
    /// A write that stores nothing, to learn whether writes work again.
    Probe(Reply<()>),
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
    members: Members,
    health: Arc<WriteHealth>,
) -> Result<WriterHandle, StoreError> {
    let conn = open(path, settings)?;
    // Timestamps never go backwards, also across a restart with the clock
    // behind: the floor starts at the newest stored message's (ids and
    // timestamps grow together, so that is the last id's).
    let last_ts: i64 = conn.query_row(
        "SELECT COALESCE((SELECT created_at FROM messages ORDER BY id DESC LIMIT 1), 0)",
        [],
        |r| r.get(0),
    )?;
    let (tx, rx) = mpsc::channel(settings.write_queue);
    let writer = Writer {
        conn,
        rx,
        sink,
        members,
        batch_max: settings.write_batch_max,
        last_ts,
        files: FileCheck::new(path),
        health: health.clone(),
        checkpointer: Checkpointer::spawn(path, settings)?,
    };
    std::thread::Builder::new()
        .name("shindensen-writer".into())
        .spawn(move || writer.run())?;
    Ok(WriterHandle { tx })
}

/// The checkpointer thread, as the writer sees it.
struct Checkpointer {
    ask: std::sync::mpsc::SyncSender<()>,
    /// True from the writer's ask until that checkpoint has run.
    running: Arc<AtomicBool>,
    /// WAL frames the last checkpoint could not copy (written meanwhile).
    left: Arc<AtomicI64>,
    /// WAL frames after which the writer asks for a checkpoint.
    every: c_int,
    /// WAL frames at the writer's last ask.
    asked_at: c_int,
}

impl Checkpointer {
    /// Starts the thread: a connection of its own that runs a PASSIVE
    /// checkpoint each time the writer asks, while the writer goes on
    /// committing (PASSIVE never takes the write lock).
    fn spawn(path: &Path, settings: &DatabaseSettings) -> Result<Checkpointer, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_millis(settings.busy_timeout_ms))?;
        let (ask, asked) = std::sync::mpsc::sync_channel::<()>(1);
        let running = Arc::new(AtomicBool::new(false));
        let left = Arc::new(AtomicI64::new(i64::MAX));
        let (done, copied) = (running.clone(), left.clone());
        std::thread::Builder::new()
            .name("shindensen-checkpointer".into())
            .spawn(move || {
                // Ends when the writer (the only sender) is gone.
                while asked.recv().is_ok() {
                    let frames_left = match checkpoint(&conn, "checkpointer") {
                        Some((log, backfilled)) => log - backfilled,
                        None => i64::MAX,
                    };
                    copied.store(frames_left, Ordering::Release);
                    done.store(false, Ordering::Release);
                }
            })?;
        Ok(Checkpointer {
            ask,
            running,
            left,
            every: c_int::try_from(settings.wal_checkpoint_frames).unwrap_or(c_int::MAX / 8),
            asked_at: 0,
        })
    }

    /// Asks for a checkpoint unless one is running.
    fn ask(&mut self, frames: c_int) {
        self.asked_at = frames;
        if !self.running.swap(true, Ordering::AcqRel) && self.ask.try_send(()).is_err() {
            self.running.store(false, Ordering::Release);
        }
    }

    /// Called by the writer after each write with the WAL's length: true
    /// when the writer should finish the checkpoint itself, now.
    ///
    /// The checkpointer never catches up with a writer that keeps
    /// committing, and SQLite starts the WAL over only once all of it has
    /// been copied; so past four times `every` the writer copies the rest
    /// between two batches, once the checkpointer has left it little to do,
    /// and past eight times `every` whatever is left.
    fn writer_should_finish(&mut self, frames: c_int) -> bool {
        if frames < self.asked_at {
            // The WAL started over.
            self.asked_at = 0;
        }
        if frames < self.every.saturating_mul(4) {
            if frames - self.asked_at >= self.every {
                self.ask(frames);
            }
            return false;
        }
        if frames >= self.every.saturating_mul(8) {
            // A writer so fast that the checkpointer never gets close:
            // copy the rest here, however long it takes.
            self.asked_at = 0;
            return true;
        }
        if self.running.load(Ordering::Acquire) {
            return false;
        }
        let rest = self
            .left
            .load(Ordering::Acquire)
            .saturating_add(i64::from(frames - self.asked_at));
        if rest > i64::from((self.every / 16).max(16)) {
            self.ask(frames);
            return false;
        }
        self.asked_at = 0;
        true
    }
}

/// Runs a PASSIVE checkpoint (copies what no reader still needs, never
/// waits for one); `(frames in the WAL, frames copied)`, or `None` on error.
fn checkpoint(conn: &Connection, on: &'static str) -> Option<(i64, i64)> {
    let started = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
    }) {
        Ok(frames) => {
            histogram!(m::DB_CHECKPOINT_SECONDS, "on" => on)
                .record(started.elapsed().as_secs_f64());
            Some(frames)
        }
        Err(e) => {
            tracing::warn!(error = %e, on, "WAL checkpoint failed");
            None
        }
    }
}

thread_local! {
    /// Frames in the WAL after the writer thread's last commit.
    static WAL_FRAMES: Cell<c_int> = const { Cell::new(0) };
}

/// The writer connection's WAL hook, called inside COMMIT on the writer
/// thread. Installing it replaces SQLite's automatic checkpoint, which
/// would run right here; [`Checkpointer`] runs them instead.
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
    conn.busy_timeout(std::time::Duration::from_millis(settings.busy_timeout_ms))?;
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
            .map_err(|_| StoreError::closed())?;
        rx.await.map_err(|_| StoreError::closed())?
    }

    /// Queues a message; `on_commit` gets the outcome after COMMIT.
    /// Messages queued by one caller are committed in the order queued.
    pub(super) async fn submit(
        &self,
        msg: NewMessage,
        on_commit: OnCommit,
    ) -> Result<(), StoreError> {
        self.tx
            .send(Command::Send(Box::new(Queued { msg, on_commit })))
            .await
            .map_err(|_| StoreError::closed())
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

    pub(super) async fn set_password(
        &self,
        user: UserId,
        password_hash: String,
    ) -> Result<Option<String>, StoreError> {
        self.call(|reply| Command::SetPassword {
            user,
            password_hash,
            reply,
        })
        .await
    }

    pub(super) async fn revoke_token(
        &self,
        jti: String,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        self.call(|reply| Command::RevokeToken {
            jti,
            expires_at,
            reply,
        })
        .await
    }

    pub(super) async fn probe(&self) -> Result<(), StoreError> {
        self.call(Command::Probe).await
    }

    pub(super) async fn initiate_chat(
        &self,
        a: UserId,
        b: UserId,
    ) -> Result<(ChatId, bool), StoreError> {
        self.call(|reply| Command::InitiateChat { a, b, reply })
            .await
    }

    pub(super) async fn create_group(&self, group: NewGroup) -> Result<ChatId, StoreError> {
        self.call(|reply| Command::CreateGroup { group, reply })
            .await
    }

    pub(super) async fn change_group(
        &self,
        chat: ChatId,
        actor: UserId,
        change: GroupChange,
        max_members: usize,
    ) -> Result<(), StoreError> {
        self.call(|reply| Command::ChangeGroup {
            chat,
            actor,
            change,
            max_members,
            reply,
        })
        .await
    }

    pub(super) async fn mark_read(
        &self,
        chat: ChatId,
        user: UserId,
        up_to: MessageId,
    ) -> Result<ReadMarker, StoreError> {
        self.call(|reply| Command::MarkRead {
            chat,
            user,
            up_to,
            reply,
        })
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
    /// Runs checkpoints beside this thread (decision 0013).
    checkpointer: Checkpointer,
    rx: mpsc::Receiver<Command>,
    sink: Arc<dyn CommitSink>,
    members: Members,
    batch_max: usize,
    /// Timestamps never go backwards, even if the wall clock does.
    last_ts: i64,
    /// The files this connection writes, checked after every COMMIT.
    files: FileCheck,
    health: Arc<WriteHealth>,
}

/// Whether the writer's last write failed (shared with readiness): a full
/// disk, a lock held past the busy timeout, a database file gone. Cleared
/// by the next write that succeeds (readiness probes with one).
#[derive(Default)]
pub(super) struct WriteHealth {
    failing: std::sync::Mutex<Option<String>>,
}

impl WriteHealth {
    pub(super) fn failing(&self) -> Option<String> {
        self.failing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn record<T>(&self, res: &Result<T, StoreError>) {
        let now = match res {
            Ok(_) => None,
            Err(e) if e.is_unavailable() => Some(e.to_string()),
            // A refusal (not a member, ...) says nothing about the disk.
            Err(_) => return,
        };
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if *failing != now {
            *failing = now;
        }
    }
}

/// The database file and its `-wal` as they were when the writer opened
/// them. If either is deleted, moved or replaced under the running server,
/// COMMIT still succeeds, into a file nobody will open again: the writer
/// then answers `unavailable` instead of acking (and readiness fails on
/// the same check).
struct FileCheck {
    db: PathBuf,
    wal: PathBuf,
    db_id: Option<(u64, u64)>,
    wal_id: Option<(u64, u64)>,
}

impl FileCheck {
    fn new(db: &Path) -> FileCheck {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        let wal = PathBuf::from(wal);
        FileCheck {
            db_id: super::file_identity(db),
            wal_id: super::file_identity(&wal),
            db: db.to_path_buf(),
            wal,
        }
    }

    fn verify(&mut self) -> Result<(), StoreError> {
        if self.db_id.is_some() && super::file_identity(&self.db) != self.db_id {
            return Err(StoreError::unavailable(
                "the database file is missing or was replaced",
            ));
        }
        match (self.wal_id, super::file_identity(&self.wal)) {
            (Some(known), now) if now != Some(known) => Err(StoreError::unavailable(
                "the database's -wal file is missing or was replaced",
            )),
            (None, now) => {
                self.wal_id = now;
                Ok(())
            }
            _ => Ok(()),
        }
    }
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
                Command::SetPassword {
                    user,
                    password_hash,
                    reply,
                } => {
                    let res = self.transaction(|tx| {
                        // A new token key: every token issued before stops working.
                        Ok(tx
                            .query_row(
                                "UPDATE users SET password_hash = ?2, token_key = lower(hex(randomblob(16)))
                                 WHERE id = ?1 RETURNING token_key",
                                params![user.get(), password_hash],
                                |r| r.get::<_, String>(0),
                            )
                            .optional()?)
                    });
                    let _ = reply.send(res);
                }
                Command::RevokeToken {
                    jti,
                    expires_at,
                    reply,
                } => {
                    let res = self.transaction(|tx| {
                        tx.execute(
                            "INSERT OR IGNORE INTO revoked_tokens (jti, expires_at) VALUES (?1, ?2)",
                            params![jti, expires_at],
                        )?;
                        tx.execute(
                            "DELETE FROM revoked_tokens WHERE expires_at < ?1",
                            params![now_millis() / 1000],
                        )?;
                        Ok(())
                    });
                    let _ = reply.send(res);
                }
                Command::Probe(reply) => {
                    let res = self
                        .transaction(|tx| {
                            // Insert and delete one row: COMMIT appends to
                            // the WAL and syncs like any write.
                            tx.execute(
                                "INSERT INTO revoked_tokens (jti, expires_at) VALUES ('readiness-probe', 0)
                                 ON CONFLICT DO NOTHING",
                                [],
                            )?;
                            tx.execute("DELETE FROM revoked_tokens WHERE jti = 'readiness-probe'", [])?;
                            Ok(())
                        })
                        .and_then(|()| self.files.verify());
                    self.health.record(&res);
                    let _ = reply.send(res);
                }
                Command::InitiateChat { a, b, reply } => {
                    let res = self.initiate_chat(a, b);
                    let _ = reply.send(res);
                    self.checkpoint_if_due();
                }
                Command::CreateGroup { group, reply } => {
                    let res = self.group_write(|tx, ts| groups::create(tx, &group, ts));
                    let _ = reply.send(res);
                    self.checkpoint_if_due();
                }
                Command::ChangeGroup {
                    chat,
                    actor,
                    change,
                    max_members,
                    reply,
                } => {
                    let res = self.group_write(|tx, ts| {
                        groups::change(tx, chat, actor, &change, max_members, ts)
                            .map(|applied| (chat, applied))
                    });
                    let _ = reply.send(res.map(|_| ()));
                    self.checkpoint_if_due();
                }
                Command::MarkRead {
                    chat,
                    user,
                    up_to,
                    reply,
                } => {
                    let res = self.transaction(|tx| groups::mark_read(tx, chat, user, up_to));
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

    /// Asks for or finishes a WAL checkpoint when due; called after a
    /// write's replies and fan-out, never inside its COMMIT.
    fn checkpoint_if_due(&mut self) {
        if self.checkpointer.writer_should_finish(WAL_FRAMES.get()) {
            WAL_FRAMES.set(0);
            checkpoint(&self.conn, "writer");
        }
    }

    fn timestamp(&mut self) -> i64 {
        self.last_ts = self.last_ts.max(now_millis());
        self.last_ts
    }

    /// The members of `chat` (cached; read through this connection on a
    /// miss), or `None` when there is no such chat.
    fn members_of(&self, chat: ChatId) -> Result<Option<Audience>, StoreError> {
        if let Some(m) = self.members.get(&chat) {
            return Ok(Some(m.clone()));
        }
        let exists = self
            .conn
            .prepare_cached("SELECT 1 FROM chats WHERE id = ?1")?
            .query_row([chat.get()], |_| Ok(()))
            .optional()?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let members: Audience = self
            .conn
            .prepare_cached("SELECT user_id FROM chat_members WHERE chat_id = ?1 ORDER BY id")?
            .query_map([chat.get()], |r| Ok(UserId(r.get(0)?)))?
            .collect::<Result<_, _>>()?;
        // Only the writer changes members, so what it reads is current and
        // may replace what a reader cached.
        self.members.insert(chat, members.clone());
        Ok(Some(members))
    }

    /// Runs `f` in a transaction of its own.
    fn transaction<T>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Runs a group write in its own transaction; after COMMIT updates the
    /// chat's cached members and hands its events to the sink, in id order.
    fn group_write(
        &mut self,
        f: impl FnOnce(&Transaction<'_>, i64) -> Result<(ChatId, groups::Applied), StoreError>,
    ) -> Result<ChatId, StoreError> {
        let ts = self.timestamp();
        let (chat, applied) = self.transaction(|tx| f(tx, ts))?;
        let committed_at = Instant::now();
        self.members.insert(chat, applied.members);
        for event in &applied.events {
            self.sink.committed(event, committed_at);
            counter!(m::CHAT_EVENTS, "kind" => event.message.kind.as_str()).increment(1);
        }
        Ok(chat)
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
        let result = span.in_scope(|| {
            let audiences = batch
                .iter()
                .map(|q| self.members_of(q.msg.chat_id))
                .collect::<Result<Vec<_>, _>>()?;
            insert_all(&mut self.conn, batch, audiences, ts)
        });
        let committed_at = Instant::now();
        let result = result.and_then(|outcomes| self.files.verify().map(|()| outcomes));
        self.health.record(&result);
        match result {
            Ok(outcomes) => {
                histogram!(m::DB_BATCH_SIZE).record(batch.len() as f64);
                histogram!(m::DB_COMMIT_SECONDS).record((committed_at - started).as_secs_f64());
                let mut created = 0;
                // Each message's fan-out, then its outcome: the sender's
                // own copy and its ack land in its queue back to back, and
                // usually leave in one write.
                for (queued, outcome) in batch.drain(..).zip(outcomes) {
                    if let Ok(SendOutcome::Created(m)) = &outcome {
                        self.sink.committed(m, committed_at);
                        created += 1;
                    }
                    (queued.on_commit)(outcome);
                }
                counter!(m::MESSAGES_ACCEPTED).increment(created);
            }
            Err(e) => {
                // Rolled back, or committed to a file that is gone: either
                // way nothing is acknowledged, and every sender is told so.
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
            "INSERT INTO users (username, password_hash, created_at, token_key)
             VALUES (?1, ?2, ?3, lower(hex(randomblob(16))))
             ON CONFLICT DO NOTHING RETURNING id",
            params![username, password_hash, now_millis()],
        )?;
        tx.commit()?;
        Ok(id.map(|id| User {
            id: UserId(id),
            username: username.to_string(),
        }))
    }

    fn initiate_chat(&mut self, a: UserId, b: UserId) -> Result<(ChatId, bool), StoreError> {
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let tx = self.conn.transaction()?;
        let inserted = insert_or_nothing(
            &tx,
            "INSERT INTO chats (kind, user_a, user_b, created_at) VALUES ('direct', ?1, ?2, ?3)
             ON CONFLICT (user_a, user_b) DO NOTHING RETURNING id",
            params![lo.get(), hi.get(), now_millis()],
        )?;
        let created = inserted.is_some();
        let result = match inserted {
            Some(id) => (ChatId(id), true),
            None => {
                let id = tx
                    .prepare_cached("SELECT id FROM chats WHERE user_a = ?1 AND user_b = ?2")?
                    .query_row(params![lo.get(), hi.get()], |r| r.get(0))?;
                (ChatId(id), false)
            }
        };
        if created {
            tx.prepare_cached(
                "INSERT INTO chat_members (chat_id, user_id, role) VALUES (?1, ?2, 'member'), (?1, ?3, 'member')",
            )?
            .execute(params![result.0.get(), lo.get(), hi.get()])?;
        }
        tx.commit()?;
        self.members.insert(result.0, Arc::new([lo, hi]));
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

/// Inserts the batch in one transaction; nothing is visible or answered
/// before COMMIT returns. Per message one INSERT, whose unique index on
/// `(sender_id, client_msg_id)` tells a repeated key (also one first used
/// earlier in this batch: the transaction sees its own rows); only a
/// repeat is looked up. A row whose sender is not a member of its chat
/// (or whose chat does not exist) gets its own error and the others go
/// on; any other failure rolls the whole batch back.
fn insert_all(
    conn: &mut Connection,
    batch: &[Queued],
    audiences: Vec<Option<Audience>>,
    ts: i64,
) -> Result<Vec<RowResult>, StoreError> {
    let tx = conn.transaction()?;
    let outcomes = insert_rows(&tx, batch, audiences, ts)?;
    tx.commit()?;
    Ok(outcomes)
}

fn insert_rows(
    tx: &Transaction<'_>,
    batch: &[Queued],
    audiences: Vec<Option<Audience>>,
    ts: i64,
) -> Result<Vec<RowResult>, StoreError> {
    let mut insert = tx.prepare_cached(INSERT_MESSAGE)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for (q, audience) in batch.iter().zip(audiences) {
        let m = &q.msg;
        let Some(audience) = audience.filter(|a| a.contains(&m.sender_id)) else {
            outcomes.push(Err(StoreError::NotFound(Entity::Chat)));
            continue;
        };
        let inserted = insert.execute(params![
            m.chat_id.get(),
            m.sender_id.get(),
            m.content,
            m.client_msg_id,
            ts
        ]);
        let outcome = match inserted {
            Ok(1) => SendOutcome::Created(Arc::new(StoredMessage {
                message: Message {
                    id: MessageId(tx.last_insert_rowid()),
                    chat_id: m.chat_id,
                    sender: m.sender.to_string(),
                    sender_id: m.sender_id,
                    kind: MessageKind::Text,
                    content: m.content.clone(),
                    event: None,
                    timestamp: Timestamp(ts),
                },
                client_msg_id: m.client_msg_id.clone(),
                audience,
            })),
            // Nothing inserted: only the idempotency index can refuse a row.
            Ok(_) => SendOutcome::Duplicate(Arc::new(original(tx, q, audience)?)),
            Err(e) if is_foreign_key(&e) => {
                // Only this statement was rolled back; the rest of the batch stands.
                outcomes.push(Err(StoreError::NotFound(Entity::Chat)));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        outcomes.push(Ok(outcome));
    }
    Ok(outcomes)
}

/// The message first stored under `q`'s sender and `client_msg_id`.
fn original(
    tx: &Transaction<'_>,
    q: &Queued,
    audience: Audience,
) -> Result<StoredMessage, StoreError> {
    let m = &q.msg;
    let key = m.client_msg_id.as_deref().ok_or_else(|| {
        StoreError::internal("insert refused a message without an idempotency key")
    })?;
    let message = tx
        .prepare_cached(FIND_KEY)?
        .query_row(params![m.sender_id.get(), key], |r| {
            Ok(Message {
                id: MessageId(r.get(0)?),
                chat_id: ChatId(r.get(1)?),
                sender: m.sender.to_string(),
                sender_id: m.sender_id,
                kind: MessageKind::Text,
                content: r.get(2)?,
                event: None,
                timestamp: Timestamp(r.get(3)?),
            })
        })?;
    Ok(StoredMessage {
        message,
        client_msg_id: Some(key.to_string()),
        audience,
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
        Command::Send(queued) => (queued.on_commit)(Err(StoreError::closed())),
        Command::CreateUser { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::InitiateChat { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::CreateGroup { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::ChangeGroup { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::MarkRead { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::SetPassword { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::RevokeToken { reply, .. } => drop(reply.send(Err(StoreError::closed()))),
        Command::Probe(reply) => drop(reply.send(Err(StoreError::closed()))),
        Command::Shutdown(done) => drop(done.send(())),
    }
}
