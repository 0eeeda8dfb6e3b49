//! The store's group-commit writer, through its public API on a real
//! database (a SQLite file, or PostgreSQL: see `db.rs`).

use std::collections::HashSet;
use std::sync::Arc;

use shindensen::config::DatabaseSettings;
use shindensen::ids::{ChatId, MessageId, UserId};
use shindensen::store::{
    self, Entity, HistoryPage, NewMessage, NoopSink, SendOutcome, Store, StoreError, User,
};

async fn open(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    crate::db::ensure_database(dir.path()).await;
    let settings = DatabaseSettings {
        url: crate::db::database_url(dir.path()),
        ..DatabaseSettings::default()
    };
    store::open(&settings, &Default::default(), Arc::new(NoopSink))
        .await
        .unwrap()
}

/// A store on a fresh file, with users `a` and `b` and their chat.
async fn with_chat() -> (tempfile::TempDir, Arc<dyn Store>, User, User, ChatId) {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = store.create_user("a", None).await.unwrap().unwrap();
    let b = store.create_user("b", None).await.unwrap().unwrap();
    let (chat, _) = store.initiate_direct_chat(a.id, b.id).await.unwrap();
    (dir, store, a, b, chat)
}

/// A history page as JSON values (id, content, timestamp).
async fn page(store: &dyn Store, chat: ChatId, window: HistoryPage) -> Vec<serde_json::Value> {
    let page = store.history(chat, window).await.unwrap();
    page.iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id.get(),
                "content": m.content,
                "timestamp": m.timestamp.to_rfc3339(),
            })
        })
        .collect()
}

fn msg(chat_id: ChatId, sender_id: UserId, content: String, key: Option<String>) -> NewMessage {
    NewMessage {
        chat_id,
        sender_id,
        sender: "u".into(),
        content,
        client_msg_id: key,
    }
}

#[tokio::test]
async fn a_thousand_concurrent_inserts_from_50_tasks_all_commit_in_increasing_id_order() {
    let (_dir, store, a, _b, chat) = with_chat().await;

    let tasks: Vec<_> = (0..50)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for i in 0..20 {
                    let out = store
                        .send_message(msg(
                            chat,
                            a.id,
                            format!("t{t}-{i}"),
                            Some(format!("k{t}-{i}")),
                        ))
                        .await
                        .unwrap();
                    match out {
                        SendOutcome::Created(m) => {
                            ids.push((m.message.id.get(), m.message.content.clone()))
                        }
                        SendOutcome::Duplicate(_) => panic!("no duplicates were sent"),
                    }
                }
                ids
            })
        })
        .collect();
    let mut acked = Vec::new();
    for t in tasks {
        let ids = t.await.unwrap();
        // Each task's sends were sequential: its ids strictly increase.
        assert!(ids.windows(2).all(|w| w[0].0 < w[1].0));
        acked.extend(ids);
    }
    assert_eq!(acked.len(), 1000);
    let unique: HashSet<i64> = acked.iter().map(|(id, _)| *id).collect();
    assert_eq!(unique.len(), 1000);

    let mut stored = Vec::new();
    let mut after = 0;
    loop {
        let window = HistoryPage::After {
            id: MessageId(after),
            limit: 200,
        };
        let page = page(store.as_ref(), chat, window).await;
        let Some(last) = page.last() else { break };
        after = last["id"].as_i64().unwrap();
        stored.extend(page);
    }
    assert_eq!(stored.len(), 1000, "every acked insert is committed");
    let rows: Vec<(i64, String, String)> = stored
        .iter()
        .map(|m| {
            (
                m["id"].as_i64().unwrap(),
                m["content"].as_str().unwrap().to_string(),
                m["timestamp"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(rows.windows(2).all(|w| w[0].0 < w[1].0 && w[0].2 <= w[1].2));
    acked.sort();
    let from_db: Vec<(i64, String)> = rows.into_iter().map(|(id, c, _)| (id, c)).collect();
    assert_eq!(acked, from_db);
    store.close().await;
}

#[tokio::test]
async fn an_idempotent_resend_returns_the_original_id_even_after_reopening() {
    let (dir, store, a, b, chat) = with_chat().await;
    let first = store
        .send_message(msg(chat, a.id, "hello".into(), Some("key-1".into())))
        .await
        .unwrap();
    let SendOutcome::Created(orig) = first else {
        panic!("first send creates")
    };

    // Concurrent resends in one batch and a resend by another user.
    let resends = futures_util::future::join_all(
        (0..10).map(|_| store.send_message(msg(chat, a.id, "hello".into(), Some("key-1".into())))),
    )
    .await;
    for r in resends {
        match r.unwrap() {
            SendOutcome::Duplicate(m) => {
                assert_eq!(m.message.id, orig.message.id);
                assert_eq!(m.message.timestamp, orig.message.timestamp);
            }
            SendOutcome::Created(_) => panic!("resend created a message"),
        }
    }
    let other = store
        .send_message(msg(chat, b.id, "hello".into(), Some("key-1".into())))
        .await
        .unwrap();
    assert!(
        matches!(other, SendOutcome::Created(_)),
        "keys are per sender"
    );
    store.close().await;

    let store = open(&dir).await;
    let again = store
        .send_message(msg(chat, a.id, "hello".into(), Some("key-1".into())))
        .await
        .unwrap();
    match again {
        SendOutcome::Duplicate(m) => assert_eq!(m.message.id, orig.message.id),
        SendOutcome::Created(_) => panic!("resend after reopening created a message"),
    }
    assert_eq!(
        page(store.as_ref(), chat, HistoryPage::Latest { limit: 50 })
            .await
            .len(),
        2
    );
    store.close().await;
}

#[tokio::test]
async fn a_new_key_sent_concurrently_is_stored_once() {
    let (_dir, store, a, _b, chat) = with_chat().await;
    // Queued together, so the first use and its repeats usually share a batch.
    let sends = futures_util::future::join_all(
        (0..10).map(|_| store.send_message(msg(chat, a.id, "once".into(), Some("key-2".into())))),
    )
    .await;
    let mut created = Vec::new();
    let mut duplicates = Vec::new();
    for r in sends {
        match r.unwrap() {
            SendOutcome::Created(m) => created.push(m.message.id),
            SendOutcome::Duplicate(m) => duplicates.push(m.message.id),
        }
    }
    assert_eq!(created.len(), 1, "exactly one send stores the message");
    assert_eq!(duplicates, vec![created[0]; 9]);
    assert_eq!(
        page(store.as_ref(), chat, HistoryPage::Latest { limit: 50 })
            .await
            .len(),
        1
    );
    store.close().await;
}

#[tokio::test]
async fn a_bad_message_in_a_batch_fails_alone() {
    let (_dir, store, a, b, chat) = with_chat().await;
    // A sender that does not exist is queued like the others and fails
    // inside the writer's batch (not a member of the chat).
    let sends = (0..30).map(|i| {
        let sender = if i == 15 {
            UserId(b.id.get() + 999)
        } else {
            a.id
        };
        store.send_message(msg(chat, sender, format!("m{i}"), None))
    });
    let results = futures_util::future::join_all(sends).await;
    for (i, r) in results.into_iter().enumerate() {
        if i == 15 {
            assert!(
                matches!(r, Err(StoreError::NotFound(Entity::Chat))),
                "{r:?}"
            );
        } else {
            assert!(r.is_ok(), "{i}: {r:?}");
        }
    }
    assert_eq!(
        page(store.as_ref(), chat, HistoryPage::Latest { limit: 50 })
            .await
            .len(),
        29
    );
    store.close().await;
}

#[tokio::test]
async fn sending_to_a_chat_that_does_not_exist_is_chat_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let a = store.create_user("a", None).await.unwrap().unwrap();
    let err = store
        .send_message(msg(ChatId(42), a.id, "x".into(), None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(Entity::Chat)), "{err:?}");
    store.close().await;
}

#[tokio::test]
async fn writes_after_close_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    store.close().await;
    let err = store.create_user("late", None).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

#[tokio::test]
async fn checkpoints_keep_the_wal_bounded() {
    crate::db::sqlite_only!();
    let dir = tempfile::tempdir().unwrap();
    crate::db::ensure_database(dir.path()).await;
    let every = 100;
    let settings = DatabaseSettings {
        url: crate::db::database_url(dir.path()),
        wal_checkpoint_frames: every,
        ..DatabaseSettings::default()
    };
    let store = store::open(&settings, &Default::default(), Arc::new(NoopSink))
        .await
        .unwrap();
    let a = store.create_user("a", None).await.unwrap().unwrap();
    let b = store.create_user("b", None).await.unwrap().unwrap();
    let (chat, _) = store.initiate_direct_chat(a.id, b.id).await.unwrap();
    // One commit each: every commit appends at least two 4 KiB frames (the
    // table and the chat index), so without checkpoints the WAL would pass
    // 6,000 frames (24 MiB). The checkpointer copies every 100 frames and
    // the writer finishes at 400 (800 at the latest), after which the WAL
    // starts over from its beginning: it never holds 900 frames.
    let bound = 900 * (4096 + 24);
    let wal_path = dir.path().join("test.db-wal");
    let mut largest = 0;
    for i in 0..3_000 {
        store
            .send_message(msg(chat, a.id, format!("m{i}"), Some(format!("k{i}"))))
            .await
            .unwrap();
        largest = largest.max(std::fs::metadata(&wal_path).unwrap().len());
    }
    assert!(
        largest < bound,
        "the WAL grew to {largest} bytes (bound {bound}): checkpoints are not keeping up"
    );
    assert_eq!(
        page(store.as_ref(), chat, HistoryPage::Latest { limit: 200 })
            .await
            .len(),
        200
    );
    store.close().await;
}
