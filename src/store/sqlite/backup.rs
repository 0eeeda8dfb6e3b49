//! `shindensen backup PATH`: a consistent online copy with `VACUUM INTO`
//! (a snapshot: writers keep going meanwhile), checked with
//! `PRAGMA integrity_check`.

use std::path::Path;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use super::connect_options;
use crate::store::{BackupReport, StoreError};

/// Writes a copy of the database at `url` to `target` (which must not
/// exist) and checks it.
pub async fn backup(url: &str, target: &Path) -> Result<BackupReport, StoreError> {
    if target.exists() {
        return Err(StoreError::Conflict(
            "the backup file already exists; choose a new file",
        ));
    }
    let target_str = target
        .to_str()
        .ok_or_else(|| StoreError::internal("the backup path is not UTF-8"))?;
    let mut source = connect_options(url)?
        .read_only(true)
        .busy_timeout(Duration::from_secs(30))
        .connect()
        .await?;
    sqlx::query("VACUUM INTO ?")
        .bind(target_str)
        .execute(&mut source)
        .await?;
    let _ = sqlx::Connection::close(source).await;

    let mut copy = SqliteConnectOptions::new()
        .filename(target)
        .read_only(true)
        .connect()
        .await?;
    let check: String = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(&mut copy)
        .await?;
    if check != "ok" {
        return Err(StoreError::internal(format!(
            "integrity_check of the copy failed: {check}"
        )));
    }
    let count = |table: &'static str| format!("SELECT count(*) FROM {table}");
    let mut report = BackupReport {
        bytes: std::fs::metadata(target)?.len(),
        users: 0,
        chats: 0,
        messages: 0,
    };
    for (table, slot) in [
        ("users", &mut report.users),
        ("chats", &mut report.chats),
        ("messages", &mut report.messages),
    ] {
        *slot = sqlx::query_scalar(sqlx::AssertSqlSafe(count(table)))
            .fetch_one(&mut copy)
            .await?;
    }
    let _ = sqlx::Connection::close(copy).await;
    Ok(report)
}
