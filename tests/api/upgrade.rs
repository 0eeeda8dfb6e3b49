//! A database written by the previous release (schema version 1: direct
//! chats only) is upgraded in place at start-up and keeps everything.

use std::path::Path;
use std::sync::Arc;

use argon2::password_hash::PasswordHasher as _;
use reqwest::StatusCode;
use sqlx::ConnectOptions;
use sqlx::sqlite::SqliteConnectOptions;

use crate::helpers::{PASSWORD, TestApp, ids};

/// Writes a version-1 database at `db` the way the previous release did:
/// only its migration applied (recorded as sqlx does), then its rows.
async fn write_v1_database(db: &Path) {
    let v1 = tempfile::tempdir().unwrap();
    std::fs::copy(
        "migrations/sqlite/20261125000001_init.sql",
        v1.path().join("20261125000001_init.sql"),
    )
    .unwrap();
    let migrator = sqlx::migrate::Migrator::new(v1.path()).await.unwrap();
    let mut conn = SqliteConnectOptions::new()
        .filename(db)
        .create_if_missing(true)
        .connect()
        .await
        .unwrap();
    migrator.run(&mut conn).await.unwrap();
    let hash = argon2::Argon2::default()
        .hash_password(PASSWORD.as_bytes())
        .unwrap()
        .to_string();
    for (id, name) in [(1, "alice"), (2, "bob"), (3, "carol"), (4, "dave")] {
        sqlx::query(
            "INSERT INTO users (id, username, password_hash, created_at) VALUES (?, ?, ?, ?)",
        )
        .bind(id)
        .bind(name)
        .bind(&hash)
        .bind(1_795_000_000_000i64 + id)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    for (id, a, b) in [(1, 1, 2), (2, 2, 3)] {
        sqlx::query("INSERT INTO chats (id, user_a, user_b, created_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(a)
            .bind(b)
            .bind(1_795_000_001_000i64 + id)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    // (id, chat, sender, content, key, created_at)
    type Row = (i64, i64, i64, &'static str, Option<&'static str>, i64);
    let rows: [Row; 5] = [
        (1, 1, 1, "hello bob", Some("k-1"), 1_795_000_002_001),
        (2, 1, 2, "hi alice", None, 1_795_000_002_002),
        (3, 2, 3, "bob?", Some("c-1"), 1_795_000_002_003),
        (4, 1, 1, "lunch?", Some("k-2"), 1_795_000_002_004),
        (5, 2, 2, "here", Some("b-1"), 1_795_000_002_005),
    ];
    for (id, chat, sender, content, key, ts) in rows {
        sqlx::query(
            "INSERT INTO messages (id, chat_id, sender_id, content, client_msg_id, created_at)
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(chat)
        .bind(sender)
        .bind(content)
        .bind(key)
        .bind(ts)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    sqlx::Connection::close(conn).await.unwrap();
}

#[tokio::test]
async fn a_v1_database_opens_upgraded_with_every_chat_message_id_and_key() {
    crate::db::sqlite_only!();
    let dir = Arc::new(tempfile::tempdir().unwrap());
    write_v1_database(&dir.path().join("test.db")).await;
    let app = TestApp::spawn_in(dir, |_| {}).await;

    let (status, ready) = app.get("/readyz", None).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    // Accounts and passwords carried over.
    let alice = app.user("alice").await;
    let bob = app.user("bob").await;
    assert_eq!((alice.id, bob.id), (1, 2));

    // Every chat, as a direct chat with its peer and last message.
    let (_, list) = app.get("/chats", Some(&bob.token)).await;
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(
        (list[0]["chat_id"].as_i64(), list[1]["chat_id"].as_i64()),
        (Some(2), Some(1))
    );
    assert_eq!(list[0]["type"], "direct");
    assert_eq!(list[0]["peer"]["username"], "carol");
    assert_eq!(list[0]["member_count"], 2);
    assert_eq!(list[0]["last_message"]["id"], 5);
    assert_eq!(
        list[1]["unread_count"], 2,
        "alice's two messages, no marker yet"
    );

    // Every message with its id, sender, content and timestamp.
    let (status, history) = app.history(&alice, "1", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&history), vec![1, 2, 4]);
    assert_eq!(history[0]["content"], "hello bob");
    assert_eq!(history[0]["kind"], "text");
    assert_eq!(history[1]["sender"], "bob");
    assert_eq!(history[2]["timestamp"], "2026-11-18T11:06:42.004Z");

    // The idempotency keys: a resend gets the original ack.
    let mut ws = app.ws(&alice).await;
    ws.say(1, "lunch?", "k-2").await;
    let ack = ws.next_of("ack").await;
    assert_eq!(
        (ack["id"].as_i64(), ack["timestamp"].as_str()),
        (Some(4), Some("2026-11-18T11:06:42.004Z"))
    );

    // The seed calls still work: the old pair exists, a new pair is new,
    // new messages continue the id sequence.
    let (_, body) = app.initiate(&alice, "bob").await;
    assert_eq!(
        (body["chat_id"].as_i64(), body["status"].as_str()),
        (Some(1), Some("exists"))
    );
    let (_, body) = app.initiate(&bob, "alice").await;
    assert_eq!(body["status"], "exists");
    let (_, body) = app.initiate(&alice, "carol").await;
    assert_eq!(
        (body["chat_id"].as_i64(), body["status"].as_str()),
        (Some(3), Some("created"))
    );
    ws.say(1, "new", "k-3").await;
    assert_eq!(ws.next_of("ack").await["id"], 6);
    // Groups work on the upgraded database too.
    let dave = app.user("dave").await;
    let group = app.group(&alice, "Team", &[&bob, &dave]).await;
    assert!(group > 3);
    let (status, _) = app.history(&dave, &group.to_string(), "").await;
    assert_eq!(status, StatusCode::OK);
}
