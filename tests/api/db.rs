//! The database behind a test: a SQLite file in the test's directory, or,
//! when `SHINDENSEN_TEST_POSTGRES` names a PostgreSQL server (scripts/test
//! starts one and runs the suite a second time), a fresh database on it
//! per test directory. Restarts on the same directory reuse the database.

use std::hash::{Hash, Hasher};
use std::path::Path;

use sqlx::ConnectOptions;

/// The PostgreSQL server the suite runs against, if any.
pub fn postgres_server() -> Option<String> {
    std::env::var("SHINDENSEN_TEST_POSTGRES")
        .ok()
        .filter(|v| !v.is_empty())
        .map(|v| v.trim_end_matches('/').to_string())
}

pub fn on_postgres() -> bool {
    postgres_server().is_some()
}

/// Returns early from a test that is about SQLite (a file, `VACUUM INTO`,
/// the secret kept next to the file); the PostgreSQL run has its own.
macro_rules! sqlite_only {
    () => {
        if crate::db::on_postgres() {
            eprintln!("SQLite only: not run against PostgreSQL");
            return;
        }
    };
}
pub(crate) use sqlite_only;

/// Returns early from a test that needs PostgreSQL.
macro_rules! postgres_only {
    () => {
        if !crate::db::on_postgres() {
            eprintln!("PostgreSQL only: set SHINDENSEN_TEST_POSTGRES (scripts/test does)");
            return;
        }
    };
}
pub(crate) use postgres_only;

fn database_name(dir: &Path) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    dir.hash(&mut h);
    format!("t{:016x}", h.finish())
}

/// The database URL of the test directory `dir`.
pub fn database_url(dir: &Path) -> String {
    match postgres_server() {
        Some(server) => format!("{server}/{}", database_name(dir)),
        None => format!("sqlite:{}", dir.join("test.db").display()),
    }
}

/// Creates the directory's PostgreSQL database if it does not exist yet.
pub async fn ensure_database(dir: &Path) {
    let Some(server) = postgres_server() else {
        return;
    };
    let mut admin = sqlx::postgres::PgConnectOptions::new();
    admin = server
        .parse::<sqlx::postgres::PgConnectOptions>()
        .unwrap_or(admin)
        .database("postgres");
    let mut conn = admin
        .connect()
        .await
        .expect("the test PostgreSQL server answers");
    let name = database_name(dir);
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    if !exists {
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
    }
}

/// Runs `sql` (integer literals only, no parameters: the same text works
/// on both databases) on the test directory's database and returns the
/// first column of every row.
pub async fn column_i64(dir: &Path, sql: &str) -> Vec<i64> {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    if let Some(server) = postgres_server() {
        let opts: sqlx::postgres::PgConnectOptions = server.parse().unwrap();
        let mut conn = opts.database(&database_name(dir)).connect().await.unwrap();
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_all(&mut conn)
            .await
            .unwrap()
    } else {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("test.db"))
            .read_only(true)
            .connect()
            .await
            .unwrap();
        sqlx::query_scalar::<_, i64>(sql)
            .fetch_all(&mut conn)
            .await
            .unwrap()
    }
}

/// Runs the statement `sql` (literals only, as in [`column_i64`]) on the
/// test directory's database, while no server has it open.
pub async fn execute(dir: &Path, sql: &str) {
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    if let Some(server) = postgres_server() {
        let opts: sqlx::postgres::PgConnectOptions = server.parse().unwrap();
        let mut conn = opts.database(&database_name(dir)).connect().await.unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    } else {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(dir.join("test.db"))
            .connect()
            .await
            .unwrap();
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
}

/// SQLite's `PRAGMA integrity_check` of the directory's database; `None`
/// on PostgreSQL, which has no such check to run.
pub async fn integrity_check(dir: &Path) -> Option<String> {
    if on_postgres() {
        return None;
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.join("test.db"))
        .connect()
        .await
        .unwrap();
    Some(
        sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&mut conn)
            .await
            .unwrap(),
    )
}

/// A PostgreSQL server of a test's own (scripts/pg-scratch), for what must
/// not touch the shared one: stopping and restarting the server.
pub struct OwnPostgres {
    pub url: String,
    dir: tempfile::TempDir,
}

impl OwnPostgres {
    fn script(args: &[&str]) -> std::process::Output {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-scratch");
        let out = std::process::Command::new(script)
            .args(args)
            .output()
            .expect("scripts/pg-scratch runs");
        assert!(
            out.status.success(),
            "pg-scratch {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn start() -> OwnPostgres {
        let dir = tempfile::tempdir().unwrap();
        let pg = dir.path().join("pg");
        let out = Self::script(&["start", pg.to_str().unwrap()]);
        let text = String::from_utf8_lossy(&out.stdout);
        let url = text
            .split(';')
            .find_map(|kv| kv.trim().strip_prefix("PG_URL="))
            .expect("pg-scratch prints PG_URL")
            .to_string();
        OwnPostgres {
            url: format!("{url}/postgres"),
            dir,
        }
    }

    fn pg_dir(&self) -> String {
        self.dir.path().join("pg").display().to_string()
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn down(&self) {
        Self::script(&["down", &self.pg_dir()]);
    }

    /// Starts it again on the same port and data.
    pub fn up(&self) {
        Self::script(&["up", &self.pg_dir()]);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ =
            std::process::Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-scratch"))
                .args(["stop", &self.pg_dir()])
                .output();
    }
}
