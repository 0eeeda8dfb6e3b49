//! `shindensen migrate-data --from sqlite:… --to postgres://…`: moves a
//! deployment from SQLite to PostgreSQL.
//!
//! * The source is opened as the server would open it (pending migrations
//!   applied, so a v1 file is upgraded first) and read in one snapshot.
//! * The target is migrated, must be empty, and is filled in one
//!   transaction: users (with their password hashes), chats, members (with
//!   roles, join order and read markers), messages and events (ids,
//!   idempotency keys, timestamps). Then the stream position and the
//!   id sequences are moved past the copied rows.
//! * Every table's row count and largest id are compared afterwards.
//!
//! Stop the server (or every node) first: writes made during the copy
//! would not be in it.

use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

use super::StoreError;

/// Rows inserted per statement.
const CHUNK: usize = 5_000;

/// What was copied, per table: rows and the largest id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferReport {
    pub users: (i64, i64),
    pub chats: (i64, i64),
    pub members: (i64, i64),
    pub messages: (i64, i64),
}

const TABLES: [&str; 4] = ["users", "chats", "chat_members", "messages"];

pub async fn migrate_data(from: &str, to: &str) -> Result<TransferReport, StoreError> {
    let source_opts = SqliteConnectOptions::from_str(from)
        .map_err(|e| StoreError::internal(format!("--from must be a sqlite: URL: {e}")))?
        .foreign_keys(false);
    let mut source = source_opts.connect().await?;
    super::sqlite::MIGRATOR.run(&mut source).await?;

    let target_opts = PgConnectOptions::from_str(to)
        .map_err(|e| StoreError::internal(format!("--to must be a postgres:// URL: {e}")))?;
    let mut target = target_opts.connect().await?;
    super::postgres::MIGRATOR.run(&mut target).await?;
    let present: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM chats) + (SELECT count(*) FROM messages)",
    )
    .fetch_one(&mut target)
    .await?;
    if present > 0 {
        return Err(StoreError::Conflict(
            "the target database is not empty; migrate-data copies into an empty database only",
        ));
    }

    let mut read = source.begin().await?;
    let mut write = target.begin().await?;
    copy_users(&mut read, &mut write).await?;
    copy_chats(&mut read, &mut write).await?;
    copy_members(&mut read, &mut write).await?;
    copy_messages(&mut read, &mut write).await?;
    sqlx::query(
        "UPDATE stream SET last_id = (SELECT coalesce(max(id), 0) FROM messages) WHERE id = 1",
    )
    .execute(&mut *write)
    .await?;
    for table in ["users", "chats", "chat_members"] {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table} HAVING max(id) IS NOT NULL"
        )))
        .execute(&mut *write)
        .await?;
    }
    let copied = report(&mut write).await?;
    let expected = report_sqlite(&mut read).await?;
    if copied != expected {
        return Err(StoreError::internal(format!(
            "the copy does not match the source (rows, largest id): source {expected:?}, copy {copied:?}; nothing was committed"
        )));
    }
    write.commit().await?;
    read.commit().await?;
    Ok(copied)
}

macro_rules! report_for {
    ($name:ident, $conn:ty) => {
        async fn $name(conn: &mut $conn) -> Result<TransferReport, StoreError> {
            let mut out = [(0, 0); 4];
            for (slot, table) in out.iter_mut().zip(TABLES) {
                *slot = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "SELECT count(*), coalesce(max(id), 0) FROM {table}"
                )))
                .fetch_one(&mut *conn)
                .await?;
            }
            Ok(TransferReport {
                users: out[0],
                chats: out[1],
                members: out[2],
                messages: out[3],
            })
        }
    };
}
report_for!(report, PgConnection);
report_for!(report_sqlite, SqliteConnection);

async fn copy_users(
    read: &mut SqliteConnection,
    write: &mut PgConnection,
) -> Result<(), StoreError> {
    // The token keys too: tokens issued before the move stay valid.
    let rows: Vec<(i64, String, Option<String>, i64, String)> = sqlx::query_as(
        "SELECT id, username, password_hash, created_at, token_key FROM users ORDER BY id",
    )
    .fetch_all(&mut *read)
    .await?;
    for chunk in rows.chunks(CHUNK) {
        let keys: Vec<String> = chunk.iter().map(|r| r.4.clone()).collect();
        let four: Vec<(i64, String, Option<String>, i64)> = chunk
            .iter()
            .map(|r| (r.0, r.1.clone(), r.2.clone(), r.3))
            .collect();
        let (ids, names, hashes, ts) = unzip4(&four);
        sqlx::query(
            "INSERT INTO users (id, username, password_hash, created_at, token_key)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[])",
        )
        .bind(ids)
        .bind(names)
        .bind(hashes)
        .bind(ts)
        .bind(keys)
        .execute(&mut *write)
        .await?;
    }
    Ok(())
}

async fn copy_chats(
    read: &mut SqliteConnection,
    write: &mut PgConnection,
) -> Result<(), StoreError> {
    type Row = (i64, String, Option<String>, Option<i64>, Option<i64>, i64);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT id, kind, title, user_a, user_b, created_at FROM chats ORDER BY id")
            .fetch_all(&mut *read)
            .await?;
    for chunk in rows.chunks(CHUNK) {
        let ids: Vec<i64> = chunk.iter().map(|r| r.0).collect();
        let kinds: Vec<String> = chunk.iter().map(|r| r.1.clone()).collect();
        let titles: Vec<Option<String>> = chunk.iter().map(|r| r.2.clone()).collect();
        let a: Vec<Option<i64>> = chunk.iter().map(|r| r.3).collect();
        let b: Vec<Option<i64>> = chunk.iter().map(|r| r.4).collect();
        let ts: Vec<i64> = chunk.iter().map(|r| r.5).collect();
        sqlx::query(
            "INSERT INTO chats (id, kind, title, user_a, user_b, created_at)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[])",
        )
        .bind(ids)
        .bind(kinds)
        .bind(titles)
        .bind(a)
        .bind(b)
        .bind(ts)
        .execute(&mut *write)
        .await?;
    }
    Ok(())
}

async fn copy_members(
    read: &mut SqliteConnection,
    write: &mut PgConnection,
) -> Result<(), StoreError> {
    type Row = (i64, i64, i64, String, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, chat_id, user_id, role, last_read_id FROM chat_members ORDER BY id",
    )
    .fetch_all(&mut *read)
    .await?;
    for chunk in rows.chunks(CHUNK) {
        let ids: Vec<i64> = chunk.iter().map(|r| r.0).collect();
        let chats: Vec<i64> = chunk.iter().map(|r| r.1).collect();
        let users: Vec<i64> = chunk.iter().map(|r| r.2).collect();
        let roles: Vec<String> = chunk.iter().map(|r| r.3.clone()).collect();
        let markers: Vec<i64> = chunk.iter().map(|r| r.4).collect();
        sqlx::query(
            "INSERT INTO chat_members (id, chat_id, user_id, role, last_read_id)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bigint[])",
        )
        .bind(ids)
        .bind(chats)
        .bind(users)
        .bind(roles)
        .bind(markers)
        .execute(&mut *write)
        .await?;
    }
    Ok(())
}

async fn copy_messages(
    read: &mut SqliteConnection,
    write: &mut PgConnection,
) -> Result<(), StoreError> {
    type Row = (
        i64,
        i64,
        i64,
        String,
        String,
        Option<String>,
        Option<i64>,
        Option<String>,
        i64,
    );
    let mut after = 0i64;
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, chat_id, sender_id, kind, content, event, subject_id, client_msg_id, created_at
             FROM messages WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(CHUNK as i64)
        .fetch_all(&mut *read)
        .await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.0;
        sqlx::query(
            "INSERT INTO messages (id, chat_id, sender_id, kind, content, event, subject_id, client_msg_id, created_at)
             SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::text[],
                                  $6::text[], $7::bigint[], $8::text[], $9::bigint[])",
        )
        .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.2).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.3.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.4.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.5.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.6).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.7.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|r| r.8).collect::<Vec<_>>())
        .execute(&mut *write)
        .await?;
    }
}

type Columns4 = (Vec<i64>, Vec<String>, Vec<Option<String>>, Vec<i64>);

fn unzip4(rows: &[(i64, String, Option<String>, i64)]) -> Columns4 {
    let mut out: Columns4 = Default::default();
    for (a, b, c, d) in rows {
        out.0.push(*a);
        out.1.push(b.clone());
        out.2.push(c.clone());
        out.3.push(*d);
    }
    out
}
